/* SPDX-License-Identifier: MIT */
/* The frame path. Checks run cheapest first (PROTOCOL.md 1), and the order is part of the
 * contract documented in iothub-protocol(7): size, structure and schema, topic agreement,
 * enrolment, revocation, rate, clock window, replay, signature. Nothing from a frame is
 * stored before its signature verified, and a bulb's seq only advances after all passed.
 * Accepted frames are appended inside one transaction per MQTT read (group commit), so a
 * burst costs one fsync, not one per frame. */
#include <inttypes.h>

#include "iothub/ack.h"
#include "iothub/cloud.h"
#include "iothub/commands.h"
#include "iothub/ingest.h"
#include "iothub/log.h"
#include "iothub/spool.h"

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

static int ingest_commit_or_abort(struct hub *h, bool abort);

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
static int batch_note_seq(struct hub *h, struct bulb *b) {
        struct ingest_batch *t = &h->batch;

        if (b->in_batch)
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
        b->in_batch = true;
        return 0;
}

/* Before COMMIT: each bulb of the batch's newest seq, one statement per bulb and batch rather
 * than one per frame (memory moved ahead frame by frame, so a second frame with a seq of this
 * batch was a replay already). The UPDATE only moves forward: -ESTALE here means the database
 * holds a later seq than memory, and the batch must not commit. */
static int batch_store_seqs(struct hub *h) {
        for (size_t i = 0; i < h->batch.n_undo; i++) {
                struct bulb *b = registry_find(h->registry, h->batch.undo[i].dev);
                int r;

                if (!b)
                        return -ENOENT;
                r = registry_store_seq(h->registry, b, b->last_seq);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* The undo list is done with (commit or rollback): the bulbs leave the batch. */
static void batch_clear_undo(struct hub *h) {
        for (size_t i = 0; i < h->batch.n_undo; i++) {
                struct bulb *b = registry_find(h->registry, h->batch.undo[i].dev);
                if (b)
                        b->in_batch = false;
        }
        h->batch.n_undo = 0;
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
        /* The seq goes to the database at the commit (batch_store_seqs()), in the same
         * transaction as the frame. */
        r = spool_append(h->db, dev, f.seq, payload, len, (int64_t) now_realtime_usec());
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
        h->counters.frames_store_failed++;
        log_error_errno(r, "Failed to store frame %" PRId64 " of %s: %m (%s)", f.seq, dev, db_errmsg(h->db));
        /* The spool row and the seq go together or not at all (the spool has no UNIQUE index,
         * see migration 4 in db.c): a half-stored frame takes its whole batch back with it. The
         * bulbs resend what was not acked. */
        if (h->batch.open)
                (void) ingest_commit_or_abort(h, true);
}

static int ingest_commit_or_abort(struct hub *h, bool abort) {
        int r;

        if (!h->batch.open)
                return 0;
        h->batch.open = false;
        r = abort ? -ECANCELED : batch_store_seqs(h);
        if (r >= 0)
                r = db_commit(h->db);
        ack_commit_done(h->ack, r >= 0);
        if (r < 0) {
                unsigned n = h->batch.count;

                h->counters.frames_store_failed += n;
                if (!abort)
                        log_error_errno(r, "Failed to commit %u frames: %m (%s)", n, db_errmsg(h->db));
                (void) db_rollback(h->db);
                /* The database kept the old seqs: so must memory, or the bulb's honest
                 * resends (PROTOCOL.md 1, end-to-end acknowledgement) would be replays. */
                for (size_t i = 0; i < h->batch.n_undo; i++) {
                        struct bulb *b = registry_find(h->registry, h->batch.undo[i].dev);
                        if (b)
                                b->last_seq = h->batch.undo[i].last_seq;
                }
                batch_clear_undo(h);
                h->batch.count = 0;
                h->batch.bytes = 0;
                h->batch.n_acks = 0;
                /* Frames dropped for room were rolled back too: count again from the table. */
                (void) spool_stats(h->db, &h->spool_pending, &h->spool_bytes);
                return r;
        }
        batch_clear_undo(h);
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

int ingest_commit(struct hub *h) {
        return ingest_commit_or_abort(h, false);
}
