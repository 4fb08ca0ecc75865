/* SPDX-License-Identifier: MIT */
/* End-to-end acknowledgement of status frames (PROTOCOL.md 1, decisions in iothub-protocol(7)).
 * libmosquitto 2.0 sends PUBACK before the hub has stored a frame, so PUBACK tells a bulb
 * nothing; this ack does: it is published only once the frame's transaction committed.
 *
 * Each bulb that ever got an ack has one entry (hung on its struct bulb, so memory is bounded
 * by the enrolled bulbs). An entry is staged while its frames wait for the commit, then
 * waiting for the fdatasync that makes its commit durable (db_sync_start(): a commit no longer
 * syncs by itself; nothing is acked that a power cut could lose), then pending until it may be
 * published: at most one ack per bulb per 100 ms, the newest seq winning. One sd-event timer, armed at the earliest due time, serves every pending bulb. */
#include <inttypes.h>
#include <stdio.h>

#include "iothub/ack.h"
#include "iothub/mqtt.h"

#define ACK_INTERVAL_USEC (100 * UINT64_C(1000))
/* The timer may fire up to this late (sd-event's default would be 250 ms); never early. */
#define ACK_TIMER_ACCURACY_USEC (5 * UINT64_C(1000))
/* Acks handed to libmosquitto and not yet PUBACKed by the broker, at most (with everything
 * else of ours it holds: mqtt_unacked()). libmosquitto's queue has no bound, and a broker that
 * takes frames but stops answering our publishes would grow it by up to 10 acks/s per bulb,
 * for good. Past this, an ack stays pending (one per bulb, the newest seq winning) and is tried
 * again an interval later: nothing is lost, an ack only says "up to seq". 4x the send window
 * (mqtt.c's MQTT_SEND_MAXIMUM), so that a healthy broker's round trip never reaches it. */
#define ACK_UNACKED_MAX 1024
/* "<prefix>/<device-id>/ack": [mqtt] topic_prefix is at most 128 bytes (conf.c). */
#define ACK_TOPIC_MAX (128 + 1 + DEVICE_ID_MAX + 4)

struct ack_entry {
        struct bulb *bulb;
        int64_t staged;      /* highest seq the open transaction will commit, 0: none */
        /* Committed seqs waiting for a sync: [0] of an older commit generation than [1]. Two
         * slots, so that a bulb in every commit is still acked after each sync that covers its
         * older one (one slot, moved on by each commit, could wait forever). gen 0: empty. */
        int64_t wait_seq[2];
        uint64_t wait_gen[2];
        int64_t pending;     /* committed seq waiting to be published, 0: none */
        uint64_t last_usec;  /* when the last ack was handed to the MQTT client, 0: never */
        struct ack_entry *all_next, *staged_next, *waiting_next, *pending_next;
        bool on_staged, on_waiting, on_pending;
};

struct ack {
        const struct iothub_conf *conf;
        struct mqtt *mqtt;
        sd_event_source *timer;
        uint64_t timer_usec; /* when the timer fires, 0: disarmed */
        bool connected;
        bool sync_failed; /* ack_sync_failed(): nothing committed is acked any more */
        struct ack_entry *all, *staged, *waiting, *pending;
        uint64_t n_pending;
        uint64_t published, publish_failed, held_back;
};

static uint64_t entry_due(const struct ack_entry *e) {
        return e->last_usec ? e->last_usec + ACK_INTERVAL_USEC : 0;
}

/* Hands one ack to the MQTT client. Returns 0, -ENOTCONN, -EAGAIN (ACK_UNACKED_MAX reached:
 * due again an interval later), or another negative errno. */
static int ack_publish(struct ack *a, struct ack_entry *e, uint64_t now) {
        char topic[ACK_TOPIC_MAX + 1], payload[40];
        int n, m, r;

        if (mqtt_unacked(a->mqtt) >= ACK_UNACKED_MAX) {
                e->last_usec = now;
                a->held_back++;
                return -EAGAIN;
        }
        n = snprintf(topic, sizeof topic, "%s/%s/ack", a->conf->mqtt.topic_prefix, e->bulb->id);
        m = snprintf(payload, sizeof payload, "{\"seq\":%" PRId64 "}", e->pending);
        if (n < 0 || (size_t) n >= sizeof topic || m < 0 || (size_t) m >= sizeof payload)
                return -ENAMETOOLONG;
        r = mqtt_publish(a->mqtt, topic, payload, (size_t) m, 1, NULL);
        if (r == -ENOTCONN)
                return r;
        /* A refusal other than "not connected" waits a full interval too, so that it cannot
         * spin; the seq stays pending. */
        e->last_usec = now;
        if (r < 0) {
                a->publish_failed++;
                return r;
        }
        a->published++;
        e->pending = 0;
        return 0;
}

static void ack_arm(struct ack *a, uint64_t usec) {
        if (a->timer_usec != 0 && a->timer_usec <= usec)
                return;
        if (sd_event_source_set_time(a->timer, usec) < 0 ||
            sd_event_source_set_enabled(a->timer, SD_EVENT_ONESHOT) < 0)
                return; /* only ENOMEM-like failures; the next commit or reconnect tries again */
        a->timer_usec = usec;
}

/* Publishes every pending ack that is due, and arms the timer for the earliest of the rest. */
static void ack_flush(struct ack *a) {
        uint64_t now = now_monotonic_usec(), next = 0;

        if (!a->connected)
                return;
        for (struct ack_entry **p = &a->pending; *p;) {
                struct ack_entry *e = *p;
                uint64_t due = entry_due(e);

                if (due <= now) {
                        int r = ack_publish(a, e, now);
                        if (r == -ENOTCONN)
                                return; /* kept; ack_connected() flushes again */
                        if (r >= 0) {
                                *p = e->pending_next;
                                e->pending_next = NULL;
                                e->on_pending = false;
                                a->n_pending--;
                                continue;
                        }
                        due = entry_due(e);
                }
                if (next == 0 || due < next)
                        next = due;
                p = &e->pending_next;
        }
        if (next != 0)
                ack_arm(a, next);
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct ack *a = userdata;

        a->timer_usec = 0;
        ack_flush(a);
        return 0;
}

/* seq of e's bulb is committed: publish it now if the bulb's interval allows, else keep it
 * pending (the newest seq wins) for the timer. */
static void ack_due(struct ack *a, struct ack_entry *e, int64_t seq, uint64_t now) {
        if (seq > e->pending)
                e->pending = seq;
        if (e->on_pending) {
                return; /* already waiting for its slot, with the timer armed for it */
        }
        if (a->connected && entry_due(e) <= now) {
                int r = ack_publish(a, e, now);
                if (r >= 0)
                        return;
        }
        e->on_pending = true;
        e->pending_next = a->pending;
        a->pending = e;
        a->n_pending++;
        if (a->connected)
                ack_arm(a, entry_due(e));
}

void ack_stage(struct ack *a, struct bulb *b, int64_t seq, bool committed) {
        struct ack_entry *e;

        if (!a || seq <= 0)
                return;
        e = b->ack;
        if (!e) {
                e = calloc(1, sizeof *e);
                if (!e)
                        return;
                e->bulb = b;
                e->all_next = a->all;
                a->all = e;
                b->ack = e;
        }
        if (committed) {
                /* Acks of this bulb wait for a sync: they carry its newest seq, which this is. */
                if (e->wait_gen[0] == 0 && !a->sync_failed)
                        ack_due(a, e, seq, now_monotonic_usec());
                return;
        }
        if (seq > e->staged)
                e->staged = seq;
        if (!e->on_staged) {
                e->on_staged = true;
                e->staged_next = a->staged;
                a->staged = e;
        }
}

static void ack_wait(struct ack *a, struct ack_entry *e, int64_t seq, uint64_t gen) {
        if (a->sync_failed)
                return;
        if (e->wait_gen[0] == 0 || e->wait_gen[0] == gen) {
                e->wait_gen[0] = gen;
                if (seq > e->wait_seq[0])
                        e->wait_seq[0] = seq;
        } else {
                e->wait_gen[1] = gen;
                if (seq > e->wait_seq[1])
                        e->wait_seq[1] = seq;
        }
        if (!e->on_waiting) {
                e->on_waiting = true;
                e->waiting_next = a->waiting;
                a->waiting = e;
        }
}

void ack_commit_done(struct ack *a, bool ok, uint64_t gen) {
        if (!a)
                return;
        while (a->staged) {
                struct ack_entry *e = a->staged;

                a->staged = e->staged_next;
                e->staged_next = NULL;
                e->on_staged = false;
                /* Nothing is announced before its commit is on disk; a failed commit announces
                 * nothing. */
                if (ok)
                        ack_wait(a, e, e->staged, gen);
                e->staged = 0;
        }
}

void ack_synced(struct ack *a, uint64_t gen) {
        uint64_t now;

        if (!a)
                return;
        now = now_monotonic_usec();
        for (struct ack_entry **p = &a->waiting; *p;) {
                struct ack_entry *e = *p;
                int64_t seq = 0;

                if (e->wait_gen[1] != 0 && e->wait_gen[1] <= gen) {
                        seq = e->wait_seq[1];
                        e->wait_gen[0] = e->wait_gen[1] = 0;
                        e->wait_seq[0] = e->wait_seq[1] = 0;
                } else if (e->wait_gen[0] <= gen) {
                        seq = e->wait_seq[0];
                        e->wait_gen[0] = e->wait_gen[1];
                        e->wait_seq[0] = e->wait_seq[1];
                        e->wait_gen[1] = 0;
                        e->wait_seq[1] = 0;
                }
                if (seq > 0)
                        ack_due(a, e, seq, now);
                if (e->wait_gen[0] == 0) {
                        *p = e->waiting_next;
                        e->waiting_next = NULL;
                        e->on_waiting = false;
                        continue;
                }
                p = &e->waiting_next;
        }
}

void ack_sync_failed(struct ack *a) {
        if (!a)
                return;
        a->sync_failed = true;
        while (a->waiting) {
                struct ack_entry *e = a->waiting;

                a->waiting = e->waiting_next;
                e->waiting_next = NULL;
                e->on_waiting = false;
                e->wait_gen[0] = e->wait_gen[1] = 0;
                e->wait_seq[0] = e->wait_seq[1] = 0;
        }
}

void ack_connected(struct ack *a, bool connected) {
        if (!a)
                return;
        a->connected = connected;
        if (!connected) {
                /* Pending acks stay (newest seq per bulb) until the broker is back. */
                (void) sd_event_source_set_enabled(a->timer, SD_EVENT_OFF);
                a->timer_usec = 0;
                return;
        }
        ack_flush(a);
}

int ack_status_json(struct ack *a, json_t *status) {
        json_t *frames = json_object_get(status, "frames");

        if (!a || !frames)
                return 0;
        if (json_object_set_new(frames, "acks_published", json_integer((json_int_t) a->published)) < 0 ||
            json_object_set_new(frames, "acks_pending", json_integer((json_int_t) a->n_pending)) < 0 ||
            json_object_set_new(frames, "acks_failed", json_integer((json_int_t) a->publish_failed)) < 0 ||
            json_object_set_new(frames, "acks_held_back", json_integer((json_int_t) a->held_back)) < 0)
                return -ENOMEM;
        return 0;
}

int ack_new(sd_event *e, const struct iothub_conf *conf, struct mqtt *mqtt, struct ack **ret) {
        struct ack *a;
        int r;

        a = calloc(1, sizeof *a);
        if (!a)
                return -ENOMEM;
        a->conf = conf;
        a->mqtt = mqtt;
        a->connected = mqtt_is_connected(mqtt);
        r = sd_event_add_time(e, &a->timer, CLOCK_MONOTONIC, 0, ACK_TIMER_ACCURACY_USEC, on_timer, a);
        if (r >= 0)
                r = sd_event_source_set_enabled(a->timer, SD_EVENT_OFF);
        if (r < 0) {
                ack_free(a);
                return r;
        }
        (void) sd_event_source_set_description(a->timer, "ack-timer");
        *ret = a;
        return 0;
}

void ack_free(struct ack *a) {
        if (!a)
                return;
        sd_event_source_disable_unref(a->timer);
        while (a->all) {
                struct ack_entry *e = a->all;

                a->all = e->all_next;
                e->bulb->ack = NULL;
                free(e);
        }
        free(a);
}
