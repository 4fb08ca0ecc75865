/* SPDX-License-Identifier: MIT */
/* The relay to the vendor's web service (PROTOCOL.md 3).
 *
 * Requests go through iothub-uplink (uplink-client.c; the uplink authorizes, signs, sends and
 * handles a 401): this file decides what goes up and reads the answers (issue 14 stage 2: what
 * stays in iothubd, the process that holds no secret).
 *
 * Uploads: a batch goes when [cloud] batch_max_frames are waiting or the oldest waiting frame
 * is [cloud] batch_max_delay_ms old. It is the oldest frames of the spool, sent byte for byte,
 * and they leave the spool only when the cloud answered 200. Each request costs exactly one hub
 * key signature (RFC 9421). At most two status batches are out: the head, and, while it is out
 * and a FULL batch waits behind it, the follower (the frames after the head's last id), which
 * the uplink signs at once but sends only after the head's 200 (cloudreq.c, chained calls): the
 * signature (~70 ms on a TPM chip) is made while the head is on the wire, and the cloud still
 * sees one batch at a time, in order. On the head's 200 the follower becomes the head, and its
 * wait for an answer ([cloud] timeout_s and the client's margin) starts over, as its time on the
 * wire does in the uplink (uplink_call_restart_timeout()); on any
 * other end of the head the follower is cancelled before the backoff, so that the head goes
 * again before anything newer (the uplink does not send it either: its answer then is
 * -ECANCELED, which is no failure). Batches due to the timer go alone. The
 * list of enrolled bulbs is PUT before any batch that follows a change of it, so that the
 * cloud can check every frame against the key the hub checked it with. */
#include <inttypes.h>
#include <stdio.h>

#include "iothub/cloud.h"
#include "iothub/uplink-client.h"
#include "iothub/log.h"
#include "iothub/registry.h"
#include "iothub/spool.h"
#include "iothub/uplink-proto.h"

/* A status batch carries at most batch_max_frames frames (PROTOCOL.md 3, the cloud relies on it)
 * and at most this many bytes. While a batch is sent, frames pile up in the spool and the next
 * batch takes them, up to batch_max_frames; a full one is signed meanwhile (the follower, above),
 * so a cycle is about the longer of a signature (a TPM chip: ~70 ms) and an upload, not their sum,
 * and the relay reaches about batch_max_frames per cycle at most (256 x 1000 / 70 = 3,657 frames/s
 * with a 70 ms TPM). Measured (make bench, 5,000 frames/s offered, 70 ms TPM, a 2-core machine
 * that also runs the reference cloud and the load): 2,800-3,300 frames/s while publishing, where
 * one batch at a time reached 1,800-2,250. A hub that must relay more raises batch_max_frames
 * (iothub.conf(5)).
 * 512 KiB: at ~260 bytes a frame that is ~2,000 frames, more than the largest batch_max_frames of
 * typical frames; frames of the largest size (4 KiB, the reference cloud's per-frame limit) still
 * fit 127 to a batch. The cap is memory: the body is built here and libcurl copies it (1 MiB cost
 * ~2-3 MiB more private memory at peak in the bench; DESIGN.md: 4 MiB in all). The buffer starts
 * at 16 KiB and doubles, so it never passes the cap (a power of two times 16 KiB). */
#define CLOUD_BATCH_MAX_BYTES (512 * 1024)

#define META_DEVICES_DIRTY "devices_dirty"
#define META_REGISTERED "registered"

struct cloud_call {
        struct cloud *cloud;
        struct uplink_call *call;
        void (*done)(void *userdata, long status, const char *message);
        void *userdata;
        struct cloud_call *next; /* in cloud->registers */
};

/* A status batch out: its call and the spool ids in it. */
struct status_batch {
        struct cloud *cloud;
        struct uplink_call *call; /* NULL: not out */
        int64_t first_id, last_id;
        unsigned frames;
        size_t bytes; /* of its frames */
};

struct cloud {
        sd_event *event;
        const struct iothub_conf *conf;
        struct db *db;
        struct registry *registry;
        struct uplink_client *req;       /* authorizes, signs, sends */
        struct spool_counts *spool; /* hub.c's; lowered as frames leave the spool */
        struct cloud_events ev;
        sd_event_source *batch_timer;
        /* The status batches out (see the top): head and follower point into slots. */
        struct status_batch slots[2];
        struct status_batch *head, *follower;
        bool follower_ended; /* the follower ended before the head: none more until the head ends */
        /* The list of bulbs in flight, and the generation of the list it carries. */
        struct uplink_call *devices_call;
        uint64_t devices_call_gen;
        struct cloud_call *registers; /* iothubctl register's, waiting */
        bool registered;          /* iothubctl register succeeded (persisted) */
        bool devices_dirty;
        uint64_t devices_gen; /* bumped at every change of the bulb list */
        unsigned failures, devices_failures;
        uint64_t devices_backoff_until;
        struct cloud_counters counters;
        uint64_t last_error_at; /* CLOCK_MONOTONIC usec; the newer of this and the uplink's is shown */
        json_t *rejected_reasons; /* reason -> count of per-frame rejections by the cloud */
};

uint64_t cloud_backoff_ms(unsigned failures, uint32_t rnd) {
        return backoff_ms(failures, CLOUD_BACKOFF_MIN_MS, CLOUD_BACKOFF_MAX_MS, rnd);
}

int cloud_parse_retry_after(const char *value, int64_t *ret_seconds) {
        int64_t s = 0;
        const char *p = value;

        if (!value)
                return -EINVAL;
        while (*p == ' ' || *p == '\t')
                p++;
        if (*p >= '0' && *p <= '9') {
                for (; *p >= '0' && *p <= '9'; p++) {
                        s = s * 10 + (*p - '0');
                        if (s > CLOUD_RETRY_AFTER_MAX_S)
                                s = CLOUD_RETRY_AFTER_MAX_S + 1;
                }
                while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
                        p++;
                if (*p)
                        return -EINVAL;
        } else
                /* An HTTP-date (RFC 9110 5.6.7) is turned into delay-seconds by the uplink, which
                 * links the HTTP library: none reaches here. */
                return -EINVAL;
        if (s > CLOUD_RETRY_AFTER_MAX_S)
                s = CLOUD_RETRY_AFTER_MAX_S;
        *ret_seconds = s;
        return 0;
}

static void set_last_error(struct cloud *c, const char *fmt, ...) _printf_(2, 3);
static void set_last_error(struct cloud *c, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(c->counters.last_error, sizeof c->counters.last_error, fmt, ap);
        va_end(ap);
        c->last_error_at = now_monotonic_usec();
}

/* The last error to show: the relay's own or the uplink's (the token, the key, the channel),
 * whichever is newer. */
static const char *last_error(struct cloud *c) {
        uint64_t at = 0;
        const char *e = uplink_last_error(c->req, &at);

        return e[0] && (at > c->last_error_at || !c->counters.last_error[0]) ? e : c->counters.last_error;
}

/* ---- status batches ---- */

static void cloud_maybe_send(struct cloud *c);

static void arm_batch_timer(struct cloud *c, uint64_t at_usec) {
        int r;

        if (!c->batch_timer)
                return;
        r = sd_event_source_set_time(c->batch_timer, at_usec);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->batch_timer, SD_EVENT_ONESHOT);
        if (r < 0)
                log_error_errno(r, "Failed to arm the batch timer: %m");
}

static void cloud_backoff(struct cloud *c, const char *retry_after) {
        uint32_t rnd = 0;
        uint64_t delay_ms;
        int64_t ra;

        c->failures++;
        (void) random_bytes(&rnd, sizeof rnd);
        delay_ms = cloud_backoff_ms(c->failures, rnd);
        /* RFC 9110 10.2.3: the server says how long; we wait at least that. */
        if (retry_after && retry_after[0] &&
            cloud_parse_retry_after(retry_after, &ra) >= 0 &&
            (uint64_t) ra * 1000 > delay_ms)
                delay_ms = (uint64_t) ra * 1000;
        c->counters.backoff_until = now_monotonic_usec() + delay_ms * 1000;
        arm_batch_timer(c, c->counters.backoff_until);
        log_debug("Cloud upload backing off for %" PRIu64 " ms", delay_ms);
}

struct batch_builder {
        char *buf;
        size_t len, cap;
        int64_t first_id, last_id;
        unsigned n;
        size_t frame_bytes;
};

static int batch_add(const struct spool_entry *e, void *userdata) {
        struct batch_builder *b = userdata;
        size_t need = b->len + e->len + 4;

        /* Full: -ENOBUFS ends the walk (cloud_send_batch sends what it has). */
        if (b->n > 0 && need + 3 > CLOUD_BATCH_MAX_BYTES)
                return -ENOBUFS;
        /* The frames passed the parser: base64url and dots only. Checked again, since they go
         * into JSON strings unescaped. */
        for (size_t i = 0; i < e->len; i++) {
                char ch = (char) e->jws[i];
                if (!(ch == '.' || b64url_char_is_valid(ch)))
                        return -EUCLEAN;
        }
        if (need + 3 > b->cap) {
                size_t cap = b->cap ? b->cap * 2 : 16384;
                while (cap < need + 3)
                        cap *= 2;
                char *t = realloc(b->buf, cap);
                if (!t)
                        return -ENOMEM;
                b->buf = t;
                b->cap = cap;
        }
        if (b->n > 0)
                b->buf[b->len++] = ',';
        b->buf[b->len++] = '"';
        memcpy(b->buf + b->len, e->jws, e->len);
        b->len += e->len;
        b->buf[b->len++] = '"';
        if (b->n == 0)
                b->first_id = e->id;
        b->last_id = e->id;
        b->n++;
        b->frame_bytes += e->len;
        return 0;
}

static void on_status_done(void *userdata, const struct uplink_answer *a);

/* Reads and sends a batch into slot s: the oldest frames (s the head), or those after the head's
 * last id (s the follower, chained behind the head in the uplink). Returns 0 when one went or
 * nothing waits, or a negative errno. */
static int cloud_send_batch(struct cloud *c, struct status_batch *s) {
        bool follower = s == c->follower;
        struct batch_builder b = {};
        char *body;
        int r;

        b.cap = 16384;
        b.buf = malloc(b.cap);
        if (!b.buf)
                return -ENOMEM;
        memcpy(b.buf, "{\"frames\":[", 11);
        b.len = 11;
        r = follower ? spool_read_batch_after(c->db, c->head->last_id, c->conf->cloud.batch_max_frames, batch_add,
                                              &b)
                     : spool_read_batch(c->db, c->conf->cloud.batch_max_frames, batch_add, &b);
        if (r == -ENOBUFS && b.n > 0)
                r = (int) b.n;
        if (r <= 0) {
                free(b.buf);
                return r;
        }
        memcpy(b.buf + b.len, "]}", 3);
        b.len += 2;
        body = b.buf;
        r = uplink_request(c->req, UPLINK_KIND_STATUS, NULL, body, b.len, 0, on_status_done, s, &s->call);
        if (r < 0)
                return r;
        s->first_id = b.first_id;
        s->last_id = b.last_id;
        s->frames = b.n;
        s->bytes = b.frame_bytes;
        log_debug("Uploading %u frames (%zu bytes)%s", b.n, b.len, follower ? ", after the batch on the wire" : "");
        return 0;
}

/* While the head is out: the follower goes when a full batch waits behind it (by count or by
 * bytes); a partial one waits for the head's end, nothing is gained by chaining it. */
static void cloud_maybe_send_follower(struct cloud *c) {
        uint64_t behind, behind_bytes;
        int r;

        if (c->follower->call || c->follower_ended)
                return;
        behind = c->spool->pending > c->head->frames ? c->spool->pending - c->head->frames : 0;
        behind_bytes = c->spool->bytes > c->head->bytes ? c->spool->bytes - c->head->bytes : 0;
        if (behind < c->conf->cloud.batch_max_frames && behind_bytes < CLOUD_BATCH_MAX_BYTES)
                return;
        r = cloud_send_batch(c, c->follower);
        if (r < 0)
                /* Nothing lost: the frames go after the head then. */
                log_debug_errno(r, "Failed to prepare the next batch while one is out: %m");
}

static void cloud_maybe_send(struct cloud *c) {
        uint64_t now = now_monotonic_usec();
        int64_t oldest_usec = 0;
        int r;

        /* What the uplink said last (its STATUS, hub.c kicks at every change): it cannot
         * authorize a request yet. Its own words when it has some (a token file it cannot
         * read, no [oauth]). */
        if (!uplink_have_key(c->req) || !uplink_have_token(c->req)) {
                const char *e = uplink_last_error(c->req, NULL);
                if (uplink_have_key(c->req) && uplink_login_required(c->req))
                        set_last_error(c, "not signed in: run 'iothubctl login'");
                else if (e[0] && !streq(e, c->counters.last_error))
                        set_last_error(c, "%s", e);
                return;
        }
        /* Nothing goes up before the hub is registered: the cloud could not check it. */
        if (!c->registered) {
                set_last_error(c, "not registered yet: run 'iothubctl register'");
                return;
        }
        if (c->devices_dirty && !c->devices_call && now >= c->devices_backoff_until) {
                /* The devices list goes first (see the top of this file). */
                extern void cloud_send_devices(struct cloud *);
                cloud_send_devices(c);
        }
        if (c->devices_dirty)
                return;
        if (c->head->call) {
                cloud_maybe_send_follower(c);
                return;
        }
        if (c->counters.backoff_until > now)
                return;
        c->counters.backoff_until = 0;
        if (c->spool->pending == 0)
                return;
        if (c->spool->pending < c->conf->cloud.batch_max_frames) {
                /* Runs after every commit: while the timer for the oldest frame is armed, a
                 * newer frame cannot make the batch due sooner, so skip the query. */
                if (sd_event_source_get_enabled(c->batch_timer, NULL) > 0)
                        return;
                r = spool_oldest(c->db, NULL, &oldest_usec);
                if (r < 0)
                        return;
                /* received_at is a date (it survives restarts), so the age is taken on the real-time
                 * clock. A clock stepped back since (NTP correcting a clock that ran ahead) makes it
                 * negative: the batch is due now, not after the step's size on top of the delay. */
                int64_t age_usec = (int64_t) now_realtime_usec() - oldest_usec;
                int64_t delay_usec = (int64_t) c->conf->cloud.batch_max_delay_ms * 1000;
                if (age_usec >= 0 && age_usec < delay_usec) {
                        arm_batch_timer(c, now + (uint64_t) (delay_usec - age_usec));
                        return;
                }
        }
        r = cloud_send_batch(c, c->head);
        if (r >= 0 && c->head->call)
                /* A full batch may wait behind it already (no commit may come to kick). */
                cloud_maybe_send_follower(c);
        if (r < 0) {
                /* The uplink signs (a key that cannot sign shows in its answer, the relay
                 * backs off then): a failure here is local. */
                set_last_error(c, "cannot prepare a batch: %s", strerror(-r));
                log_error_errno(r, "Failed to prepare an upload batch: %m");
                cloud_backoff(c, NULL);
        }
}

void cloud_kick(struct cloud *c) {
        if (c)
                cloud_maybe_send(c);
}

static int on_batch_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        cloud_maybe_send(userdata);
        return 0;
}

int cloud_parse_status_answer(const char *body, size_t len, json_t **ret_rejected) {
        json_error_t jerr;
        json_t *resp = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
        json_t *acc = json_object_get(resp, "accepted"), *rej = json_object_get(resp, "rejected");

        if (!json_is_integer(acc) || (rej && !json_is_array(rej))) {
                json_decref(resp);
                return -EBADMSG;
        }
        *ret_rejected = json_incref(rej);
        json_decref(resp);
        return 0;
}

void cloud_rejection_key(const json_t *rejection, char ret_key[static CLOUD_REJECTION_KEY_MAX]) {
        const char *reason = json_string_value(json_object_get(rejection, "reason"));

        if (!reason || reason[0] == '\0' || strlen(reason) >= CLOUD_REJECTION_KEY_MAX)
                reason = "other"; /* an empty reason would name no counter */
        /* Reasons come from the network: keep only a safe token as a counter name. */
        (void) snprintf(ret_key, CLOUD_REJECTION_KEY_MAX, "%s", reason);
        for (char *p = ret_key; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_'))
                        *p = '_';
}

static void count_rejections(struct cloud *c, json_t *rejected, unsigned n_frames) {
        size_t i;
        json_t *v;

        json_array_foreach(rejected, i, v) {
                char key[CLOUD_REJECTION_KEY_MAX];

                cloud_rejection_key(v, key);
                json_int_t old = json_integer_value(json_object_get(c->rejected_reasons, key));
                if (json_object_size(c->rejected_reasons) < 32 || json_object_get(c->rejected_reasons, key))
                        (void) json_object_set_new(c->rejected_reasons, key, json_integer(old + 1));
        }
}

/* The final answer to a status batch (the uplink handled a 401 it could: one here is final and
 * backs off like a 5xx; so does an uplink that cannot be reached: frames stay spooled). */
static void status_answer(struct cloud *c, struct status_batch *s, const struct uplink_answer *resp_) {
        long status = resp_->status;
        int r = resp_->error;
        uint64_t count = 0, bytes = 0;

        if (r == 0 && status == 200) {
                json_t *rej = NULL;
                if (cloud_parse_status_answer(resp_->body, resp_->body_len, &rej) < 0) {
                        set_last_error(c, "the cloud answered 200 with an unexpected body");
                        log_warning("Cloud answered 200 with an unexpected body; the batch will be sent again");
                        cloud_backoff(c, NULL);
                        return;
                }
                size_t n_rej = rej ? json_array_size(rej) : 0;
                if (n_rej > s->frames)
                        n_rej = s->frames;
                count_rejections(c, rej, s->frames);
                json_decref(rej);
                /* Accepted and rejected frames both leave: rejected ones are never retried. */
                r = spool_delete(c->db, s->first_id, s->last_id, &count, &bytes);
                if (r < 0) {
                        log_error_errno(r, "Failed to remove an uploaded batch from the spool: %m (%s)",
                                        db_errmsg(c->db));
                        cloud_backoff(c, NULL);
                        return;
                }
                c->spool->pending -= count <= c->spool->pending ? count : c->spool->pending;
                c->spool->bytes -= bytes <= c->spool->bytes ? bytes : c->spool->bytes;
                c->counters.uploaded += s->frames - n_rej;
                c->counters.rejected += n_rej;
                c->counters.batches++;
                c->counters.last_success = (int64_t) (now_realtime_usec() / 1000000);
                c->counters.last_error[0] = '\0';
                c->failures = 0;
                if (n_rej > 0)
                        log_notice("The cloud rejected %zu of %u frames (dropped, see cloud.rejected)", n_rej,
                                   s->frames);
                return;
        }
        if (r < 0 || status == 401 || status == 408 || status == 429 || status >= 500 || status < 200 ||
            (status >= 300 && status < 400) || (status > 200 && status < 300)) {
                /* The uplink could not sign with the hub key (another TPM in its place, the
                 * TPM gone): said with the key's MESSAGE_ID, once per backoff step. */
                if (r == -ENOKEY || r == -EHOSTDOWN)
                        log_event(LOG_ERR, r, IOTHUB_MID_KEY_UNAVAILABLE, NULL,
                                  r == -ENOKEY ? "key_not_in_tpm" : "tpm_unreachable",
                                  "Cannot sign uploads with the hub key, frames stay spooled: %s",
                                  r == -EHOSTDOWN && uplink_key_error(c->req) ? uplink_key_error(c->req)
                                                                             : resp_->error_text);
                if (r < 0)
                        set_last_error(c, "upload failed: %s", resp_->error_text);
                else
                        set_last_error(c, "upload answered HTTP %ld", status);
                log_warning("Upload of %u frames failed (%s), retrying later", s->frames, c->counters.last_error);
                cloud_backoff(c, resp_->retry_after);
                return;
        }
        /* Any other 4xx: the cloud will never take this batch. Keep it aside, do not loop. */
        char reason[CLOUD_REFUSAL_REASON_MAX];
        uplink_refusal_reason(status, resp_->body, resp_->body_len, reason, sizeof reason);
        r = spool_move_aside(c->db, s->first_id, s->last_id, status, reason, &count, &bytes);
        if (r < 0) {
                log_error_errno(r, "Failed to move a refused batch aside: %m (%s)", db_errmsg(c->db));
                cloud_backoff(c, NULL);
                return;
        }
        c->spool->pending -= count <= c->spool->pending ? count : c->spool->pending;
        c->spool->bytes -= bytes <= c->spool->bytes ? bytes : c->spool->bytes;
        c->counters.moved_aside += count;
        set_last_error(c, "a batch was refused (%s) and moved aside", reason);
        log_event(LOG_ERR, 0, IOTHUB_MID_BATCH_MOVED_ASIDE, NULL, NULL,
                  "The cloud refused a batch of %" PRIu64 " frames (%s); moved aside, not retried", count, reason);
}

static void on_status_done(void *userdata, const struct uplink_answer *a) {
        struct status_batch *s = userdata;
        struct cloud *c = s->cloud;

        s->call = NULL;
        if (s != c->head) {
                /* The follower ended first: not sent (the head failed, its answer is on the way
                 * or was read already), or it could not be signed. Its frames go after the head,
                 * with no backoff of their own: the head's end decides. */
                if (a->error == -ECANCELED)
                        log_debug("The batch after the one on the wire was not sent (%s)", a->error_text);
                else
                        log_debug("The batch after the one on the wire ended first (%s, HTTP %ld); sent again later",
                                  a->error < 0 ? a->error_text : "answered", a->status);
                c->follower_ended = true; /* no retry loop while the head is out (a key that cannot sign) */
                return;
        }
        c->follower_ended = false;
        if (!(a->error == 0 && a->status == 200) && c->follower->call) {
                /* Before any backoff: the head goes again before anything newer. */
                uplink_call_cancel(c->follower->call);
                c->follower->call = NULL;
        }
        status_answer(c, s, a);
        if (c->follower->call && c->counters.backoff_until <= now_monotonic_usec()) {
                /* The head left the spool: the follower is the batch on the wire now. Its wait
                 * for the answer counts from here: the uplink sent it only now (it held it for
                 * the head's 200, which is this answer), and behind a head that took nearly
                 * [cloud] timeout_s the wait counted from its submission would end while the
                 * uplink still sends it: a timeout here, a backoff and the batch uploaded twice. */
                c->head = c->follower;
                c->follower = s;
                uplink_call_restart_timeout(c->head->call);
        } else if (c->follower->call) {
                /* A 200 whose answer could not be used (backs off): the follower goes again too. */
                uplink_call_cancel(c->follower->call);
                c->follower->call = NULL;
        }
        cloud_maybe_send(c);
        if (c->spool->pending == 0 && a->error == 0 && a->status == 200 && c->ev.drained)
                c->ev.drained(c->ev.userdata);
}

/* ---- the device list ---- */

static int build_devices_body(struct cloud *c, char **ret, size_t *ret_len) {
        json_t *arr = json_array(), *o;
        char *s;

        if (!arr)
                return -ENOMEM;
        for (size_t i = 0; i < registry_count(c->registry); i++) {
                struct bulb *b = registry_get(c->registry, i);
                json_t *jwk = NULL;
                int r = verify_raw_to_jwk(&b->pub, &jwk);
                if (r < 0) {
                        json_decref(arr);
                        return r;
                }
                (void) json_array_append_new(arr, json_pack("{s:s,s:o,s:b}", "id", b->id, "jwk", jwk, "revoked",
                                                            b->revoked));
        }
        o = json_pack("{s:o}", "devices", arr);
        s = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (!s)
                return -ENOMEM;
        *ret = s;
        *ret_len = strlen(s);
        return 0;
}

static void on_devices_done(void *userdata, const struct uplink_answer *a);

void cloud_send_devices(struct cloud *c);
void cloud_send_devices(struct cloud *c) {
        char *body = NULL;
        size_t len = 0;
        int r;

        r = build_devices_body(c, &body, &len);
        if (r >= 0)
                r = uplink_request(c->req, UPLINK_KIND_DEVICES, NULL, body, len, 0, on_devices_done, c,
                                     &c->devices_call);
        if (r >= 0)
                c->devices_call_gen = c->devices_gen;
        if (r < 0)
                log_error_errno(r, "Failed to send the list of bulbs: %m");
}

/* The final answer to the list of bulbs (a 401 that the uplink could answer was sent again
 * there). */
static void devices_answer(struct cloud *c, const struct uplink_answer *resp) {
        long status = resp->status;
        int r = resp->error;
        uint32_t rnd = 0;

        if (r == 0 && status >= 200 && status < 300) {
                if (c->devices_call_gen != c->devices_gen) {
                        /* The list changed while this one was on its way: send the new one. */
                        c->devices_failures = 0;
                        c->devices_backoff_until = 0;
                        return;
                }
                c->devices_dirty = false;
                c->devices_failures = 0;
                c->devices_backoff_until = 0;
                /* The timer may still be armed for the list's backoff: the batch schedule is
                 * worked out afresh (cloud_maybe_send keeps an armed timer). */
                (void) sd_event_source_set_enabled(c->batch_timer, SD_EVENT_OFF);
                r = db_meta_set(c->db, META_DEVICES_DIRTY, "0");
                if (r < 0)
                        log_warning_errno(r, "Failed to record the bulb list as sent: %m");
                log_info("Sent the list of bulbs to the cloud (%zu now)", registry_count(c->registry));
                return;
        }
        if (r < 0)
                set_last_error(c, "sending the bulb list failed: %s", resp->error_text);
        else
                set_last_error(c, "sending the bulb list answered HTTP %ld", status);
        log_warning("%s; retrying later", c->counters.last_error);
        c->devices_failures++;
        (void) random_bytes(&rnd, sizeof rnd);
        c->devices_backoff_until = now_monotonic_usec() + cloud_backoff_ms(c->devices_failures, rnd) * 1000;
        arm_batch_timer(c, c->devices_backoff_until);
}

static void on_devices_done(void *userdata, const struct uplink_answer *a) {
        struct cloud *c = userdata;

        c->devices_call = NULL;
        devices_answer(c, a);
        cloud_maybe_send(c);
}

void cloud_devices_changed(struct cloud *c) {
        int r;

        if (!c)
                return;
        c->devices_dirty = true;
        c->devices_gen++;
        if (c->counters.backoff_until <= now_monotonic_usec())
                (void) sd_event_source_set_enabled(c->batch_timer, SD_EVENT_OFF);
        /* Persisted: a restart before the PUT still sends it. */
        r = db_meta_set(c->db, META_DEVICES_DIRTY, "1");
        if (r < 0)
                log_warning_errno(r, "Failed to record a change of the bulb list: %m");
        c->devices_backoff_until = 0;
        cloud_maybe_send(c);
}

/* ---- register ---- */

static void register_unlink(struct cloud_call *w) {
        for (struct cloud_call **p = &w->cloud->registers; *p; p = &(*p)->next)
                if (*p == w) {
                        *p = w->next;
                        break;
                }
}

void cloud_registered(struct cloud *c) {
        if (!c)
                return;
        c->counters.last_error[0] = '\0';
        if (c->registered)
                return;
        c->registered = true;
        if (c->ev.registered)
                c->ev.registered(c->ev.userdata);
        if (db_meta_set(c->db, META_REGISTERED, "1") < 0)
                log_warning("Failed to record the registration; run 'iothubctl register' again after a restart");
        cloud_maybe_send(c);
}

/* The uplink's answer to a registration: recorded here (the relay's state), then told. */
static void on_register_done(void *userdata, long status, const char *message) {
        struct cloud_call *w = userdata;
        struct cloud *c = w->cloud;

        register_unlink(w);
        if (status == 200 || status == 201)
                cloud_registered(c);
        w->done(w->userdata, status, message);
        free(w);
        cloud_maybe_send(c);
}

int cloud_register(struct cloud *c, void (*done)(void *userdata, long status, const char *message),
                   void *userdata, struct cloud_call **ret) {
        struct cloud_call *w;
        int r;

        if (!c || !done)
                return -EINVAL;
        w = calloc(1, sizeof *w);
        if (!w)
                return -ENOMEM;
        w->cloud = c;
        w->done = done;
        w->userdata = userdata;
        r = uplink_register(c->req, on_register_done, w, &w->call);
        if (r < 0) {
                free(w);
                return r;
        }
        w->next = c->registers;
        c->registers = w;
        *ret = w;
        return 0;
}

void cloud_register_cancel(struct cloud_call *w) {
        if (!w)
                return;
        register_unlink(w);
        uplink_call_cancel(w->call);
        free(w);
}

/* ---- for other modules ---- */

bool cloud_ready(struct cloud *c) {
        /* Registered too: before that the cloud cannot check a request (and would answer
         * 401, which would send the sign-in refreshing for nothing). */
        return c && uplink_have_key(c->req) && uplink_have_token(c->req) && c->registered;
}

/* The uplink has the hub key and a token now (its news, hub.c): what waited for them goes. */
void cloud_key_ready(struct cloud *c) {
        if (!c)
                return;
        if (strncmp(c->counters.last_error, "no hub key", strlen("no hub key")) == 0)
                c->counters.last_error[0] = '\0';
        cloud_maybe_send(c);
}

int cloud_new(sd_event *e, const struct iothub_conf *conf, struct db *db, struct registry *registry,
              struct uplink_client *req, struct spool_counts *spool, const struct cloud_events *ev, struct cloud **ret) {
        _cleanup_free_ char *dirty = NULL;
        struct cloud *c;
        int r;

        if (!conf->cloud.url) {
                *ret = NULL;
                return 0;
        }
        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->event = e;
        c->conf = conf;
        c->db = db;
        c->registry = registry;
        c->req = req;
        c->spool = spool;
        c->slots[0].cloud = c->slots[1].cloud = c;
        c->head = &c->slots[0];
        c->follower = &c->slots[1];
        if (ev)
                c->ev = *ev;
        c->rejected_reasons = json_object();
        if (!c->rejected_reasons || !req) {
                r = c->rejected_reasons ? -EINVAL : -ENOMEM;
                goto fail;
        }
        /* Accuracy 1 us: sd-event's default (0 = 250 ms) would add up to a quarter second to
         * every batch that waits for batch_max_delay_ms, and between batches when draining. */
        r = sd_event_add_time(e, &c->batch_timer, CLOCK_MONOTONIC, UINT64_MAX, 1, on_batch_timer, c);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->batch_timer, SD_EVENT_OFF);
        if (r < 0)
                goto fail;

        {
                _cleanup_free_ char *reg = NULL;
                c->registered = db_meta_get(db, META_REGISTERED, &reg) >= 0 && streq(reg, "1");
        }
        /* The bulb list is dirty after a change not yet sent, and on the very first start. */
        r = db_meta_get(db, META_DEVICES_DIRTY, &dirty);
        c->devices_dirty = r == -ENOENT ? true : (r >= 0 && streq(dirty, "1"));

        /* Until the uplink's first STATUS says otherwise. */
        if (!uplink_have_key(req))
                set_last_error(c, "no hub key yet");
        *ret = c;
        return 0;
fail:
        cloud_free(c);
        return r;
}

void cloud_free(struct cloud *c) {
        if (!c)
                return;
        /* Its calls (and their waits for a refresh): no answer may reach a freed relay. */
        uplink_call_cancel(c->slots[0].call);
        uplink_call_cancel(c->slots[1].call);
        uplink_call_cancel(c->devices_call);
        while (c->registers) {
                struct cloud_call *w = c->registers;
                c->registers = w->next;
                uplink_call_cancel(w->call);
                w->done(w->userdata, -ECANCELED, "the daemon is stopping");
                free(w);
        }
        sd_event_source_disable_unref(c->batch_timer);
        json_decref(c->rejected_reasons);
        free(c);
}

int cloud_status_json(struct cloud *c, json_t *o) {
        uint64_t now = now_monotonic_usec();
        json_t *cl;

        if (!c) {
                (void) json_object_set_new(o, "cloud", json_pack("{s:b}", "configured", 0));
                return 0;
        }
        cl = json_pack("{s:b,s:I,s:I,s:I,s:O,s:I,s:s*,s:I}", "configured", 1, "uploaded",
                       (json_int_t) c->counters.uploaded, "batches", (json_int_t) c->counters.batches,
                       "rejected", (json_int_t) c->counters.rejected, "rejected_reasons", c->rejected_reasons,
                       "last_success", (json_int_t) c->counters.last_success, "last_error",
                       last_error(c)[0] ? last_error(c) : NULL, "backoff_s",
                       (json_int_t) (c->counters.backoff_until > now
                                             ? (c->counters.backoff_until - now + 999999) / 1000000
                                             : 0));
        if (!cl)
                return -ENOMEM;
        (void) json_object_set_new(cl, "devices_synced", json_boolean(!c->devices_dirty));
        (void) json_object_set_new(cl, "registered", json_boolean(c->registered));
        (void) json_object_set_new(o, "cloud", cl);
        return 0;
}

void cloud_status_line(struct cloud *c, char *buf, size_t len) {
        uint64_t now = now_monotonic_usec();

        if (!c)
                (void) snprintf(buf, len, "cloud not configured");
        else if (c->counters.backoff_until > now)
                (void) snprintf(buf, len, "cloud retry in %" PRIu64 " s (%s)",
                                (c->counters.backoff_until - now) / 1000000, last_error(c));
        else if (last_error(c)[0])
                (void) snprintf(buf, len, "cloud: %s", last_error(c));
        else if (c->counters.last_success)
                (void) snprintf(buf, len, "last upload at %" PRId64, c->counters.last_success);
        else
                (void) snprintf(buf, len, "no upload yet");
}
