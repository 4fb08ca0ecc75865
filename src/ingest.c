/* SPDX-License-Identifier: MIT */
/* The frame path. Checks run cheapest first (PROTOCOL.md 1), and the order is part of the
 * contract documented in iothub-protocol(7): size, structure and schema, topic agreement,
 * enrolment, revocation, rate, clock window, replay, signature. Nothing from a frame is
 * stored before its signature verified, and a bulb's seq only advances after all passed.
 * Accepted frames are appended inside one transaction per MQTT read (group commit), so a
 * burst costs one fsync, not one per frame. */
#include <inttypes.h>
#include <fcntl.h>

#include "iothub/ack.h"
#include "iothub/cloud.h"
#include "iothub/commands.h"
#include "iothub/ingest.h"
#include "iothub/log.h"
#include "iothub/spool.h"
#include "iothub/events.h"

/* Rejections logged per bulb (and for all unknown devices together) per window; the
 * counters always count every one. */
#define REJECT_LOG_WINDOW_USEC (10 * UINT64_C(1000000))
#define REJECT_LOG_BURST 5

static bool log_allowed(struct ratelimit *rl, uint64_t now, const char *dev) {
        uint64_t suppressed;
        bool ok = ratelimit_allow(rl, now, REJECT_LOG_WINDOW_USEC, REJECT_LOG_BURST, &suppressed);

        if (suppressed > 0)
                log_event(LOG_NOTICE, 0, IOTHUB_MID_FRAME_REJECTED, dev, NULL,
                          "Suppressed %" PRIu64 " more rejection messages for %s", suppressed, dev);
        return ok;
}

static void reject(struct hub *h, struct bulb *b, const char *dev, enum frame_reason reason) {
        uint64_t now = now_monotonic_usec();
        bool ok;

        h->counters.frames_rejected[reason]++;
        events_note(h->events, EVENT_FRAME_REJECTED, frame_reason_to_string(reason), dev, 1);
        /* A resent frame the hub has (replay, or stale by now): tell the bulb again what is
         * committed, or a bulb that lost the ack resends forever (iothub-protocol(7)). */
        if (b && (reason == FRAME_REPLAY || reason == FRAME_STALE))
                ack_stage(h->ack, b, b->last_seq, !h->batch.open);
        if (b)
                ok = log_allowed(&b->log_rl, now, b->id);
        else
                ok = log_allowed(&h->unknown_log_rl, now, "unknown devices");
        /* Only the device id (already checked to be a short, safe token, or "?") and the
         * reason: never the payload of a frame whose sender is unproven. */
        if (ok)
                log_event(LOG_WARNING, 0, IOTHUB_MID_FRAME_REJECTED, dev, frame_reason_to_string(reason),
                          "Rejected frame from %s: %s", dev, frame_reason_to_string(reason));
}

/* [spool] max_bytes: the spool never grows past the cap. To make room the oldest frames go
 * (a light's newest state is worth more than its oldest), counted in spool.dropped and
 * logged; a frame still in an upload batch may go too, which only means that the cloud's
 * answer deletes fewer rows. */
static int make_room(struct hub *h, size_t len) {
        uint64_t max = h->conf->spool.max_bytes, count = 0, bytes = 0;
        int r;

        while (h->spool_bytes + h->batch.bytes + len > max && h->spool_pending > 0) {
                r = spool_drop_oldest(h->db, 16, &count, &bytes);
                if (r < 0)
                        return r;
                if (count == 0)
                        break;
                h->spool_pending -= count <= h->spool_pending ? count : h->spool_pending;
                h->spool_bytes -= bytes <= h->spool_bytes ? bytes : h->spool_bytes;
                h->spool_dropped += count;
                log_event(LOG_WARNING, 0, IOTHUB_MID_SPOOL_FULL, NULL, NULL,
                          "Spool full ([spool] max_bytes = %" PRIu64 "): dropped the %" PRIu64 " oldest frames",
                          max, count);
        }
        return 0;
}

/* IOTHUB_REASON= and status "storage.reason" of a failure to store frames: what the operator
 * has to fix (the catalog entry of IOTHUB_MID_STORE_FAILED explains each). */
const char *ingest_store_reason(int r) {
        switch (r) {
        case 0:
                return NULL;
        case -ENOSPC:
        case -EDQUOT:
                return "disk_full";
        case -EROFS:
        case -EACCES:
        case -EPERM:
                return "read_only";
        case -EUCLEAN:
                return "corrupt";
        case -EBUSY:
                return "locked";
        default:
                return "io_error";
        }
}

/* n frames that passed every check could not be stored: they are not accepted and not acked
 * (their bulbs resend them). Said once per cause, not per frame: a full disk under a fleet
 * would otherwise write a line per frame to the journal that shares the disk. */
static void store_failed(struct hub *h, int r, unsigned n) {
        r = db_cause(h->db, r);
        /* SQLite may report an I/O error without the system's errno, or with EIO: ask the file
         * system itself with an unnamed file that vanishes on close. ext4 turned read-only by
         * an error (errors=remount-ro) answers EROFS here while statvfs() still says rw. */
        if (r == -EIO) {
                int fd = open(h->conf->hub.state_dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
                if (fd >= 0)
                        (void) close(fd);
                else if (errno == EROFS || errno == ENOSPC || errno == EDQUOT)
                        r = -errno;
        }
        h->counters.frames_store_failed += n;
        h->store_refused += n;
        if (r == h->store_errno)
                return;
        h->store_errno = r;
        log_event(LOG_ERR, r, IOTHUB_MID_STORE_FAILED, NULL, ingest_store_reason(r),
                  "Cannot store frames in %s/iothub.db: %m (%s); they are not acknowledged, bulbs resend them",
                  h->conf->hub.state_dir, db_errmsg(h->db));
        hub_notify_status(h);
}

static void store_ok(struct hub *h) {
        if (h->store_errno == 0)
                return;
        log_event(LOG_NOTICE, 0, IOTHUB_MID_STORE_RECOVERED, NULL, NULL,
                  "Storing frames again; %" PRIu64 " were refused meanwhile (their bulbs resend them)",
                  h->store_refused);
        h->store_errno = 0;
        h->store_refused = 0;
        hub_notify_status(h);
}

/* Ends the open transaction without accepting any of its frames: the database keeps the old
 * seqs, and so must memory, or the bulbs' honest resends (PROTOCOL.md 1, end-to-end
 * acknowledgement) would be replays. Their acks are dropped unsent. */
static void batch_abort(struct hub *h) {
        h->batch.open = false;
        ack_commit_done(h->ack, false);
        (void) db_rollback(h->db);
        for (size_t i = 0; i < h->batch.n_undo; i++) {
                struct bulb *b = registry_find(h->registry, h->batch.undo[i].dev);
                if (b)
                        b->last_seq = h->batch.undo[i].last_seq;
        }
        h->batch.n_undo = 0;
        h->batch.count = 0;
        h->batch.bytes = 0;
        h->batch.n_acks = 0;
        /* Frames dropped for room were rolled back too: count again from the table. */
        (void) spool_stats(h->db, &h->spool_pending, &h->spool_bytes);
}

static void batch_add_ack(struct hub *h, const struct frame *f) {
        struct ingest_batch *b = &h->batch;

        if (b->n_acks == b->cap_acks) {
                size_t cap = b->cap_acks ? b->cap_acks * 2 : 16;
                struct ingest_ack *t = reallocarray(b->acks, cap, sizeof *t);
                if (!t) {
                        log_error("Out of memory: the ack of command %s from %s is not handled", f->ack.id, f->dev);
                        return;
                }
                b->acks = t;
                b->cap_acks = cap;
        }
        struct ingest_ack *a = &b->acks[b->n_acks++];
        memcpy(a->dev, f->dev, sizeof a->dev);
        memcpy(a->id, f->ack.id, sizeof a->id);
        a->ok = f->ack.ok;
        if (f->ack.has_err)
                memcpy(a->err, f->ack.err, sizeof a->err);
        else
                a->err[0] = '\0';
}

/* Remembers b's last seq before this transaction touched it (once per bulb and batch), so
 * that a failed commit can put memory back where the database is. */
static int batch_note_seq(struct hub *h, const struct bulb *b) {
        struct ingest_batch *t = &h->batch;

        for (size_t i = 0; i < t->n_undo; i++)
                if (streq(t->undo[i].dev, b->id))
                        return 0;
        if (t->n_undo == t->cap_undo) {
                size_t cap = t->cap_undo ? t->cap_undo * 2 : 16;
                struct ingest_seq_undo *u = reallocarray(t->undo, cap, sizeof *u);
                if (!u)
                        return -ENOMEM;
                t->undo = u;
                t->cap_undo = cap;
        }
        struct ingest_seq_undo *u = &t->undo[t->n_undo++];
        (void) snprintf(u->dev, sizeof u->dev, "%s", b->id);
        u->last_seq = b->last_seq;
        return 0;
}

void ingest_message(struct hub *h, const char *topic, const uint8_t *payload, size_t len) {
        const struct iothub_conf *c = h->conf;
        char dev[DEVICE_ID_MAX + 1];
        enum frame_reason reason;
        struct frame f;
        struct bulb *b;
        int64_t now_s;
        int r;

        h->counters.frames_received++;

        if (frame_topic_device(topic, c->mqtt.topic_prefix, "status", dev) < 0) {
                reject(h, NULL, "?", FRAME_MALFORMED);
                return;
        }
        reason = frame_parse(payload, len, dev, c->frames.max_bytes, &f);
        if (reason != FRAME_OK) {
                b = registry_find(h->registry, dev);
                reject(h, b, dev, reason);
                return;
        }
        b = registry_find(h->registry, dev);
        if (!b) {
                reject(h, NULL, dev, FRAME_UNKNOWN_DEVICE);
                return;
        }
        if (b->revoked) {
                reject(h, b, dev, FRAME_REVOKED);
                return;
        }
        /* Before the signature: a flood must not buy CPU time (see iothub-protocol(7)). */
        if (!bulb_rate_take(b, c->frames.rate_per_device, now_monotonic_usec())) {
                reject(h, b, dev, FRAME_RATE_LIMITED);
                return;
        }
        now_s = (int64_t) (now_realtime_usec() / UINT64_C(1000000));
        if (f.iat < now_s - (int64_t) c->frames.max_clock_skew_s || f.iat > now_s + (int64_t) c->frames.max_clock_skew_s) {
                reject(h, b, dev, FRAME_STALE);
                return;
        }
        if (f.seq <= b->last_seq) {
                reject(h, b, dev, FRAME_REPLAY);
                return;
        }
        if (verify_signature(b->key, f.alg, f.signing_input, f.signing_input_len, f.sig, f.sig_len) < 0) {
                reject(h, b, dev, FRAME_BAD_SIGNATURE);
                return;
        }

        if (!h->batch.open) {
                r = db_begin(h->db);
                if (r < 0)
                        goto store_failed;
                h->batch.open = true;
                h->batch.count = 0;
        }
        r = make_room(h, len);
        if (r >= 0)
                r = batch_note_seq(h, b);
        if (r < 0)
                goto store_failed;
        r = spool_append(h->db, dev, f.seq, payload, len, (int64_t) now_realtime_usec());
        if (r >= 0)
                r = registry_store_seq(h->registry, b, f.seq);
        if (r < 0)
                goto store_failed;
        /* Memory moves ahead of the commit so that a second frame of this read with the same
         * seq is a replay; if the commit fails, these frames were never accepted: ingest_commit()
         * puts memory back from the undo list, so that a bulb resending them is accepted. */
        registry_seq_committed(b, f.seq);
        ack_stage(h->ack, b, f.seq, false);
        h->batch.count++;
        h->batch.bytes += len;
        if (f.has_ack && h->commands)
                batch_add_ack(h, &f);
        return;

store_failed:
        if (h->batch.open && !db_in_transaction(h->db)) {
                /* SQLite rolled the transaction back by itself (SQLITE_FULL, an I/O error): the
                 * frames appended before this one are gone too, and what follows must not run
                 * in autocommit, each statement committed on its own behind the batch's back. */
                store_failed(h, r, 1 + h->batch.count);
                batch_abort(h);
                return;
        }
        store_failed(h, r, 1);
}

int ingest_commit(struct hub *h) {
        int r;

        if (!h->batch.open)
                return 0;
        h->batch.open = false;
        r = db_commit(h->db);
        if (r < 0) {
                store_failed(h, r, h->batch.count);
                batch_abort(h);
                return r;
        }
        ack_commit_done(h->ack, true);
        if (h->batch.count > 0)
                store_ok(h);
        h->batch.n_undo = 0;
        h->counters.frames_accepted += h->batch.count;
        h->spool_pending += h->batch.count;
        h->spool_bytes += h->batch.bytes;
        h->batch.count = 0;
        h->batch.bytes = 0;
        /* Acks count only once their frames are accepted, that is now. */
        for (size_t i = 0; i < h->batch.n_acks; i++) {
                const struct ingest_ack *a = &h->batch.acks[i];
                commands_on_ack(h->commands, a->dev, a->id, a->ok, a->err[0] ? a->err : NULL);
        }
        h->batch.n_acks = 0;
        cloud_kick(h->cloud);
        return 0;
}
