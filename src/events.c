/* SPDX-License-Identifier: MIT */
/* Security events (PROTOCOL.md 5, iothub-protocol(7) "Security events").
 *
 * Noting an event is memory only: events_note() adds its count to the entry of the current
 * interval with the same (type, reason, dev), at most EVENTS_AGG_MAX entries with a bulb and
 * EVENTS_AGG_EXTRA more without one (a flood of made-up device ids ends up in entries without
 * a bulb, then in events_dropped), so a peer can never grow memory. A frame's content never
 * comes here: only static names, checked device ids and counts.
 *
 * Every [cloud] events_interval_s (default 60 s) the interval's entries are written to the
 * events table of the state database (migration 4) in one transaction, and a POST
 * /v1/hubs/<id>/events of the oldest spooled rows (at most EVENTS_BATCH_MAX) goes out through
 * uplink_request(): signed (RFC 9421) and authorized like every request, on a request of its
 * own, so it never holds up a status batch. At most one events request is in flight. Rows
 * leave the table when the cloud answered 2xx, or a final 4xx (not 401, 408, 429: those and
 * 5xx and transport errors back off, 2 s .. 300 s). A backlog of more than one batch goes in
 * consecutive requests. The table holds at most EVENTS_SPOOL_MAX rows: the oldest go first,
 * counted (events.dropped) and reported as an events_dropped event, written in the same
 * transaction as the drop (so that a drop at exit is reported too).
 *
 * Urgent events (flood, key_error, command_rejected) do not wait for the interval: they are
 * spooled and sent after EVENTS_URGENT_DELAY_USEC, but not sooner than EVENTS_URGENT_GAP_USEC
 * after the previous urgent send, so a peer that keeps causing them cannot make the hub sign
 * more than one request per gap. Status goes first: a regular send is put off while the
 * status spool holds more than a batch, EVENTS_DEFER_MAX intervals at most. */
#include <inttypes.h>
#include <stdio.h>

#include "db-internal.h"
#include "iothub/cloud.h"
#include "iothub/uplink-client.h"
#include "iothub/events.h"
#include "iothub/log.h"
#include "iothub/uplink-proto.h"

#define USEC_PER_SEC UINT64_C(1000000)

#define EVENTS_AGG_MAX 256      /* entries with a bulb per interval */
#define EVENTS_AGG_EXTRA 64     /* ... and without one (also for bulbs beyond EVENTS_AGG_MAX) */
#define EVENTS_REASON_MAX 32    /* [a-z0-9_] */
#define EVENTS_SPOOL_MAX 2000   /* rows of the events table */
#define EVENTS_BATCH_MAX 200    /* events in one POST */
#define EVENTS_FLOOD_REJECTIONS 100 /* rejected frames of one bulb in one interval that make a flood */
#define EVENTS_URGENT_DELAY_USEC (1 * USEC_PER_SEC)
#define EVENTS_URGENT_GAP_USEC (10 * USEC_PER_SEC)
#define EVENTS_DEFER_MAX 5
#define EVENTS_BACKOFF_MIN_MS 2000u
#define EVENTS_BACKOFF_MAX_MS 300000u
#define EVENTS_RETRY_USEC (1 * USEC_PER_SEC) /* after a database error */

static const char *const type_names[_EVENT_TYPE_MAX] = {
        [EVENT_FRAME_REJECTED] = "frame_rejected",
        [EVENT_FLOOD] = "flood",
        [EVENT_BULB_ENROLLED] = "bulb_enrolled",
        [EVENT_BULB_REVOKED] = "bulb_revoked",
        [EVENT_CONTROL_REFUSED] = "control_refused",
        [EVENT_CONFIG_RELOADED] = "config_reloaded",
        [EVENT_SIGNIN_CHANGED] = "signin_changed",
        [EVENT_KEY_ERROR] = "key_error",
        [EVENT_COMMAND_REJECTED] = "command_rejected",
        [EVENT_EVENTS_DROPPED] = "events_dropped",
};

const char *event_type_to_string(enum event_type t) {
        if ((int) t < 0 || t >= _EVENT_TYPE_MAX)
                return NULL;
        return type_names[t];
}

static bool type_is_urgent(enum event_type t) {
        return t == EVENT_FLOOD || t == EVENT_KEY_ERROR || t == EVENT_COMMAND_REJECTED;
}

struct agg {
        enum event_type type;
        char reason[EVENTS_REASON_MAX + 1]; /* "" for none */
        char dev[DEVICE_ID_MAX + 1];        /* "" for none */
        uint64_t count;
        int64_t at; /* Unix seconds of the first one in this interval */
};

struct events {
        sd_event *event;
        const struct iothub_conf *conf;
        struct db *db;
        struct cloud *cloud;   /* cloud_ready() */
        struct uplink_client *req;  /* the requests */
        const struct spool_counts *spool; /* hub.c's: status frames waiting */
        sd_event_source *timer;
        struct agg agg[EVENTS_AGG_MAX + EVENTS_AGG_EXTRA];
        size_t n_agg, n_agg_dev;
        uint64_t lost; /* not aggregated (table full) in this interval */

        uint64_t interval_at; /* monotonic usec of the next regular flush and send */
        uint64_t urgent_at;   /* of the next urgent one, 0 for none */
        uint64_t last_urgent; /* when the last urgent one went */
        uint64_t retry_at;    /* no send before this (backoff, database errors) */
        unsigned deferred;    /* regular sends put off behind status */
        unsigned failures;

        struct uplink_call *call;
        int64_t call_last_id; /* the last row id of the batch in flight */
        uint64_t spooled;     /* rows in the table */

        struct {
                uint64_t noted, spooled, sent, requests, dropped, refused, failed, store_errors;
        } counters;
        char last_error[128];
};

/* ---- noting ---- */

static bool reason_is_valid(const char *s) {
        size_t n = strlen(s);

        if (n == 0 || n > EVENTS_REASON_MAX)
                return false;
        for (; *s; s++)
                if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
                        return false;
        return true;
}

static struct agg *agg_find(struct events *ev, enum event_type type, const char *reason, const char *dev) {
        for (size_t i = 0; i < ev->n_agg; i++) {
                struct agg *a = &ev->agg[i];
                if (a->type == type && streq(a->reason, reason) && streq(a->dev, dev))
                        return a;
        }
        return NULL;
}

static struct agg *agg_add(struct events *ev, enum event_type type, const char *reason, const char *dev) {
        struct agg *a;

        if (ev->n_agg >= ELEMENTSOF(ev->agg))
                return NULL;
        a = &ev->agg[ev->n_agg++];
        *a = (struct agg){ .type = type, .at = (int64_t) (now_realtime_usec() / USEC_PER_SEC) };
        (void) snprintf(a->reason, sizeof a->reason, "%s", reason);
        (void) snprintf(a->dev, sizeof a->dev, "%s", dev);
        if (dev[0])
                ev->n_agg_dev++;
        return a;
}

static void schedule(struct events *ev, uint64_t at);

/* An urgent event goes after EVENTS_URGENT_DELAY_USEC, urgent sends at most one per
 * EVENTS_URGENT_GAP_USEC. */
static void make_urgent(struct events *ev) {
        if (ev->urgent_at)
                return;
        ev->urgent_at = now_monotonic_usec() + EVENTS_URGENT_DELAY_USEC;
        if (ev->last_urgent && ev->urgent_at < ev->last_urgent + EVENTS_URGENT_GAP_USEC)
                ev->urgent_at = ev->last_urgent + EVENTS_URGENT_GAP_USEC;
        schedule(ev, ev->urgent_at);
}

static void agg_note(struct events *ev, enum event_type type, const char *reason, const char *dev, uint64_t count) {
        struct agg *a = agg_find(ev, type, reason, dev);

        /* Bulbs beyond EVENTS_AGG_MAX are counted together, without their id. */
        if (!a && dev[0] && ev->n_agg_dev >= EVENTS_AGG_MAX) {
                dev = "";
                a = agg_find(ev, type, reason, dev);
        }
        if (!a)
                a = agg_add(ev, type, reason, dev);
        if (!a) {
                ev->lost += count;
                return;
        }
        a->count += count;
}

/* PROTOCOL.md 5 "floods": a bulb that hit the rate limit, or had EVENTS_FLOOD_REJECTIONS frames
 * rejected in this interval, raises one urgent flood event per interval. */
static void flood_check(struct events *ev, const char *reason, const char *dev) {
        uint64_t total = 0;

        if (agg_find(ev, EVENT_FLOOD, "rate_limited", dev) || agg_find(ev, EVENT_FLOOD, "rejections", dev))
                return;
        for (size_t i = 0; i < ev->n_agg; i++)
                if (ev->agg[i].type == EVENT_FRAME_REJECTED && streq(ev->agg[i].dev, dev))
                        total += ev->agg[i].count;
        if (streq(reason, "rate_limited"))
                agg_note(ev, EVENT_FLOOD, "rate_limited", dev, total);
        else if (total >= EVENTS_FLOOD_REJECTIONS)
                agg_note(ev, EVENT_FLOOD, "rejections", dev, total);
        else
                return;
        log_event(LOG_WARNING, 0, IOTHUB_MID_FRAME_REJECTED, dev[0] ? dev : NULL, reason,
                  "Flood of frames from %s (%" PRIu64 " rejected in this interval): reported to the cloud",
                  dev[0] ? dev : "unknown devices", total);
        make_urgent(ev);
}

void events_note(struct events *ev, enum event_type type, const char *reason, const char *dev, uint64_t count) {
        if (!ev || (int) type < 0 || type >= _EVENT_TYPE_MAX || count == 0)
                return;
        /* Only what is known to be safe leaves the hub: a reason of our own names, a device id. */
        if (!reason || !reason_is_valid(reason))
                reason = "";
        if (!dev || !device_id_is_valid(dev, strlen(dev)))
                dev = "";
        ev->counters.noted += count;
        agg_note(ev, type, reason, dev, count);
        if (type == EVENT_FRAME_REJECTED)
                flood_check(ev, reason, dev);
        if (type_is_urgent(type))
                make_urgent(ev);
}

/* ---- the spool (events table) ---- */

static int prepare(struct events *ev, const char *sql, sqlite3_stmt **ret) {
        return db_errno(sqlite3_prepare_v2(db_handle(ev->db), sql, -1, ret, NULL));
}

static int count_rows(struct events *ev, uint64_t *ret) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        int r = prepare(ev, "SELECT COUNT(*) FROM events", &s);

        if (r < 0)
                return r;
        if (sqlite3_step(s) != SQLITE_ROW)
                return db_errno(sqlite3_errcode(db_handle(ev->db)));
        *ret = (uint64_t) sqlite3_column_int64(s, 0);
        return 0;
}

static int insert_row(sqlite3_stmt *s, int64_t at, const char *type, const char *reason, const char *dev,
                      uint64_t count) {
        int rc;

        (void) sqlite3_reset(s);
        if ((rc = sqlite3_bind_int64(s, 1, at)) != SQLITE_OK ||
            (rc = sqlite3_bind_text(s, 2, type, -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = (reason[0] ? sqlite3_bind_text(s, 3, reason, -1, SQLITE_STATIC) : sqlite3_bind_null(s, 3))) !=
                    SQLITE_OK ||
            (rc = (dev[0] ? sqlite3_bind_text(s, 4, dev, -1, SQLITE_STATIC) : sqlite3_bind_null(s, 4))) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 5, count > INT64_MAX ? INT64_MAX : (int64_t) count)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

/* Writes the interval's entries (and a note of what was dropped) in one transaction, dropping
 * the oldest rows beyond EVENTS_SPOOL_MAX. The events_dropped row of that drop goes in the same
 * transaction: left in memory for the next interval, it made that interval drop one more event
 * to make room for it (one event lost per interval, for as long as the cloud refused them), and
 * the drop made by the flush at exit (events_free()) was never reported. */
static int flush(struct events *ev) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *ins = NULL, *drop = NULL;
        struct db *db = ev->db;
        uint64_t n = ev->n_agg + (ev->lost > 0), excess = 0;
        int64_t now = (int64_t) (now_realtime_usec() / USEC_PER_SEC);
        int r;

        if (n == 0)
                return 0;
        /* Never write into the frame path's transaction (committed before the loop goes on). */
        if (db_in_transaction(ev->db))
                return -EBUSY;
        /* One more row, the events_dropped one, when anything must go. */
        if (ev->spooled + n > EVENTS_SPOOL_MAX)
                excess = ev->spooled + n + 1 - EVENTS_SPOOL_MAX;
        if (excess > ev->spooled)
                excess = ev->spooled;
        r = prepare(ev, "INSERT INTO events (at, type, reason, dev, count) VALUES (?1, ?2, ?3, ?4, ?5)", &ins);
        if (r >= 0 && excess > 0)
                r = prepare(ev, "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?1)", &drop);
        if (r < 0)
                return r;
        r = db_begin(db);
        if (r < 0)
                return r;
        if (excess > 0) {
                int rc = sqlite3_bind_int64(drop, 1, (int64_t) excess);
                if (rc == SQLITE_OK)
                        rc = sqlite3_step(drop);
                if (rc != SQLITE_DONE) {
                        r = db_errno(rc);
                        goto fail;
                }
        }
        for (size_t i = 0; i < ev->n_agg; i++) {
                const struct agg *a = &ev->agg[i];
                r = insert_row(ins, a->at, type_names[a->type], a->reason, a->dev, a->count);
                if (r < 0)
                        goto fail;
        }
        if (ev->lost > 0) {
                r = insert_row(ins, now, type_names[EVENT_EVENTS_DROPPED], "aggregation", "", ev->lost);
                if (r < 0)
                        goto fail;
        }
        if (excess > 0) {
                r = insert_row(ins, now, type_names[EVENT_EVENTS_DROPPED], "spool_full", "", excess);
                if (r < 0)
                        goto fail;
                n++;
        }
        (void) sqlite3_reset(ins);
        r = db_commit(db);
        if (r < 0)
                goto fail;
        if (excess > 0) {
                ev->counters.dropped += excess;
                log_warning("Security event spool full: dropped the %" PRIu64 " oldest events", excess);
        }
        ev->counters.spooled += n;
        ev->spooled = ev->spooled - excess + n;
        ev->n_agg = ev->n_agg_dev = 0;
        ev->lost = 0;
        return 0;
fail:
        (void) sqlite3_reset(ins);
        (void) db_rollback(db);
        return r;
}

/* The body of the next batch: {"events":[{"at":..,"type":..,"reason":..,"dev":..,"count":..}]},
 * oldest first. *ret_last_id is the id of its last row; *ret NULL when the table is empty. */
static int read_batch(struct events *ev, char **ret, int64_t *ret_last_id) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        json_t *arr, *o;
        int64_t last = 0;
        char *body;
        int r, rc;

        r = prepare(ev, "SELECT id, at, type, reason, dev, count FROM events ORDER BY id LIMIT ?1", &s);
        if (r < 0)
                return r;
        rc = sqlite3_bind_int(s, 1, EVENTS_BATCH_MAX);
        if (rc != SQLITE_OK)
                return db_errno(rc);
        arr = json_array();
        if (!arr)
                return -ENOMEM;
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                const char *type = (const char *) sqlite3_column_text(s, 2),
                           *reason = (const char *) sqlite3_column_text(s, 3),
                           *dev = (const char *) sqlite3_column_text(s, 4);
                json_t *e;

                last = sqlite3_column_int64(s, 0);
                /* A damaged row is skipped (and deleted with the batch), never sent as it is. */
                if (!type || (reason && !reason_is_valid(reason)) || (dev && !device_id_is_valid(dev, strlen(dev))) ||
                    sqlite3_column_int64(s, 5) < 1)
                        continue;
                e = json_pack("{s:I,s:s,s:I}", "at", (json_int_t) sqlite3_column_int64(s, 1), "type", type, "count",
                              (json_int_t) sqlite3_column_int64(s, 5));
                if (e && reason)
                        (void) json_object_set_new(e, "reason", json_string(reason));
                if (e && dev)
                        (void) json_object_set_new(e, "dev", json_string(dev));
                if (!e || json_array_append_new(arr, e) < 0) {
                        json_decref(arr);
                        return -ENOMEM;
                }
        }
        if (rc != SQLITE_DONE) {
                json_decref(arr);
                return db_errno(rc);
        }
        if (last == 0) {
                json_decref(arr);
                *ret = NULL;
                *ret_last_id = 0;
                return 0;
        }
        o = json_pack("{s:o}", "events", arr);
        body = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (!body)
                return -ENOMEM;
        *ret = body;
        *ret_last_id = last;
        return 0;
}

static int delete_through(struct events *ev, int64_t last_id, uint64_t *ret_deleted) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        int r = prepare(ev, "DELETE FROM events WHERE id <= ?1", &s), rc;

        if (r < 0)
                return r;
        rc = sqlite3_bind_int64(s, 1, last_id);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(s);
        if (rc != SQLITE_DONE)
                return db_errno(rc);
        *ret_deleted = (uint64_t) sqlite3_changes(db_handle(ev->db));
        return 0;
}

/* ---- sending ---- */

static void work(struct events *ev);

static void on_sent(void *userdata, const struct uplink_answer *a) {
        struct events *ev = userdata;
        /* A transport failure is status 0 below, as "no answer". */
        long status = a->error < 0 ? 0 : a->status;
        int r = 0;
        uint64_t deleted = 0;
        bool final = false;

        ev->call = NULL;
        if (r >= 0 && status >= 200 && status < 300)
                final = true;
        else if (r >= 0 && status >= 400 && status < 500 && status != 401 && status != 408 && status != 429) {
                /* The cloud will never take them: not in a loop (PROTOCOL.md 3). */
                final = true;
                ev->counters.refused++;
                log_warning("The cloud refused security events with HTTP %ld; dropped", status);
        }
        if (final) {
                int k = delete_through(ev, ev->call_last_id, &deleted);
                if (k < 0) {
                        /* They go again (the cloud takes them at least once). */
                        ev->counters.store_errors++;
                        log_warning_errno(k, "Failed to remove sent security events: %m");
                        ev->retry_at = now_monotonic_usec() + EVENTS_RETRY_USEC;
                } else {
                        ev->spooled = deleted > ev->spooled ? 0 : ev->spooled - deleted;
                        if (status < 300)
                                ev->counters.sent += deleted;
                        ev->failures = 0;
                        ev->last_error[0] = '\0';
                        /* A backlog of more than one batch goes on at once. */
                        if (ev->spooled > 0)
                                ev->retry_at = 0;
                }
        } else {
                uint32_t rnd = 0;
                (void) random_bytes(&rnd, sizeof rnd);
                ev->counters.failed++;
                ev->retry_at = now_monotonic_usec() +
                               backoff_ms(++ev->failures, EVENTS_BACKOFF_MIN_MS, EVENTS_BACKOFF_MAX_MS, rnd) * 1000;
                if (r < 0 || status == 0)
                        (void) snprintf(ev->last_error, sizeof ev->last_error, "sending events failed: %s",
                                        r < 0 ? strerror(-r) : "no answer");
                else
                        (void) snprintf(ev->last_error, sizeof ev->last_error, "sending events answered HTTP %ld",
                                        status);
                if (ev->failures == 1)
                        log_notice("%s; retrying with backoff", ev->last_error);
        }
        if (ev->spooled > 0 && ev->retry_at <= now_monotonic_usec())
                work(ev);
        else if (ev->spooled > 0)
                schedule(ev, ev->retry_at);
}

static int send_batch(struct events *ev) {
        _cleanup_free_ char *body = NULL;
        int64_t last = 0;
        int r;

        r = read_batch(ev, &body, &last);
        if (r < 0 || !body)
                return r;
        size_t len = strlen(body);
        r = uplink_request(ev->req, UPLINK_KIND_EVENTS, NULL, TAKE_PTR(body), len, 0, on_sent, ev, &ev->call);
        if (r < 0)
                return r;
        ev->call_last_id = last;
        ev->counters.requests++;
        return 0;
}

/* One pass: spool the interval's entries when due (or urgent), then send when allowed. */
static void work(struct events *ev) {
        uint64_t now = now_monotonic_usec(), interval = (uint64_t) ev->conf->cloud.events_interval_s * USEC_PER_SEC;
        bool regular = now >= ev->interval_at, urgent = ev->urgent_at && now >= ev->urgent_at;
        int r;

        if (regular || urgent) {
                r = flush(ev);
                if (r < 0) {
                        if (r != -EBUSY) {
                                ev->counters.store_errors++;
                                log_warning_errno(r, "Failed to spool security events, trying again: %m (%s)",
                                                  db_errmsg(ev->db));
                        }
                        schedule(ev, now + EVENTS_RETRY_USEC);
                        return;
                }
                if (regular)
                        ev->interval_at = now + interval;
        }
        /* Status first: a regular send waits while the status spool holds more than a batch. */
        if (regular && !urgent && ev->spool->pending > ev->conf->cloud.batch_max_frames &&
            ev->deferred < EVENTS_DEFER_MAX && ev->spooled > 0) {
                ev->deferred++;
                schedule(ev, ev->interval_at);
                return;
        }
        /* work() runs at the interval, for urgent events, after a backoff and to go on with a
         * backlog: that is when a request may go. */
        if (ev->spooled > 0 && !ev->call && now >= ev->retry_at && cloud_ready(ev->cloud)) {
                ev->deferred = 0;
                r = send_batch(ev);
                if (r < 0) {
                        (void) snprintf(ev->last_error, sizeof ev->last_error, "cannot send events: %s", strerror(-r));
                        ev->retry_at = now + EVENTS_RETRY_USEC;
                } else if (urgent)
                        ev->last_urgent = now;
        }
        if (urgent)
                ev->urgent_at = 0;
        schedule(ev, ev->interval_at);
        if (ev->spooled > 0 && !ev->call && ev->retry_at > now)
                schedule(ev, ev->retry_at);
        if (ev->urgent_at)
                schedule(ev, ev->urgent_at);
}

static void schedule(struct events *ev, uint64_t at) {
        uint64_t cur = 0;
        int r;

        /* The earliest of what is asked and what is armed. */
        if (sd_event_source_get_enabled(ev->timer, NULL) > 0 && sd_event_source_get_time(ev->timer, &cur) >= 0 &&
            cur < at && cur > now_monotonic_usec())
                return;
        r = sd_event_source_set_time(ev->timer, at);
        if (r >= 0)
                r = sd_event_source_set_enabled(ev->timer, SD_EVENT_ONESHOT);
        if (r < 0)
                log_error_errno(r, "Failed to arm the security events timer: %m");
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct events *ev = userdata;

        /* Turned off now; work() arms it again. */
        (void) sd_event_source_set_enabled(ev->timer, SD_EVENT_OFF);
        work(ev);
        return 0;
}

/* ---- API ---- */

int events_new(sd_event *e, const struct iothub_conf *conf, struct db *db, struct cloud *cloud, struct uplink_client *req,
               const struct spool_counts *spool, struct events **ret) {
        struct events *ev;
        int r;

        if (!cloud) {
                *ret = NULL;
                return 0;
        }
        ev = calloc(1, sizeof *ev);
        if (!ev)
                return -ENOMEM;
        ev->event = e;
        ev->conf = conf;
        ev->db = db;
        ev->cloud = cloud;
        ev->req = req;
        ev->spool = spool;
        r = count_rows(ev, &ev->spooled);
        if (r < 0) {
                log_error_errno(r, "Failed to read the security event spool: %m (%s)", db_errmsg(db));
                free(ev);
                return r;
        }
        ev->interval_at = now_monotonic_usec() + (uint64_t) conf->cloud.events_interval_s * USEC_PER_SEC;
        r = sd_event_add_time(e, &ev->timer, CLOCK_MONOTONIC, ev->interval_at, 0, on_timer, ev);
        if (r < 0) {
                free(ev);
                return r;
        }
        if (ev->spooled > 0)
                log_info("%" PRIu64 " security events of the last run wait to be sent", ev->spooled);
        *ret = ev;
        return 0;
}

void events_free(struct events *ev) {
        int r;

        if (!ev)
                return;
        uplink_call_cancel(ev->call);
        r = flush(ev);
        if (r < 0)
                log_warning_errno(r, "Failed to spool security events at exit: %m");
        sd_event_source_disable_unref(ev->timer);
        free(ev);
}

int events_status_json(struct events *ev, json_t *o) {
        json_t *e;

        if (!ev)
                e = json_pack("{s:b}", "configured", 0);
        else {
                uint64_t pending = 0;
                for (size_t i = 0; i < ev->n_agg; i++)
                        pending += ev->agg[i].count;
                e = json_pack("{s:b,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "configured", 1, "interval_s",
                              (json_int_t) ev->conf->cloud.events_interval_s, "noted", (json_int_t) ev->counters.noted,
                              "pending", (json_int_t) pending, "spooled", (json_int_t) ev->spooled, "sent",
                              (json_int_t) ev->counters.sent, "requests", (json_int_t) ev->counters.requests, "dropped",
                              (json_int_t) ev->counters.dropped, "refused", (json_int_t) ev->counters.refused,
                              "failed", (json_int_t) ev->counters.failed, "store_errors",
                              (json_int_t) ev->counters.store_errors, "in_flight", (json_int_t) (ev->call != NULL));
                if (e)
                        (void) json_object_set_new(e, "last_error",
                                                   ev->last_error[0] ? json_string(ev->last_error) : json_null());
        }
        if (!e)
                return -ENOMEM;
        return json_object_set_new(o, "events", e) < 0 ? -ENOMEM : 0;
}
