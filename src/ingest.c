/* SPDX-License-Identifier: MIT */
/* The frame path. Checks run cheapest first (PROTOCOL.md 1), and the order is part of the
 * contract documented in iothub-protocol(7): size, structure and schema, topic agreement,
 * enrolment, revocation, rate, clock window, replay, signature. Nothing from a frame is
 * stored before its signature verified, and a bulb's seq only advances after all passed.
 * Accepted frames are held in memory and written in one commit (group commit) when
 * INGEST_HOLD_FRAMES or INGEST_HOLD_BYTES are held, or [frames] commit_delay_ms after the first
 * of them: SD-card wear is set by commits as much as by bytes (a commit of one frame dirtied 10
 * to 13 KB, 41 to 50 times a frame, tests/bench/README.md), so a hub that keeps up must not
 * commit per frame. A commit is one append to the spool's segment log (spool.c) and, when the
 * frames carry command acks, one SQLite transaction for those. A frame is accepted, and acked to
 * its bulb, only once its commit is on disk: a sync by the sync thread (the segment's and the
 * WAL's) that began after the commit returned finished (db_sync_request(): nothing syncs on the
 * loop, issue 13; frames.accepted moves then too); the transaction is open only inside
 * ingest_commit(), never across a turn of the loop, so the other writers (commands, the relay,
 * events) never write into it. */
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>

#include "iothub/ack.h"
#include "iothub/ingest.h"
#include "iothub/log.h"
#include "iothub/spool.h"

/* Rejections logged per bulb (and for all unknown devices together) per window, and at most
 * REJECT_LOG_TOTAL_BURST lines for all of them together: 1,000 flooding bulbs would otherwise
 * write 5,000 lines per window, and journald's own limit (RateLimitBurst=10000 per 30 s by
 * default, per service) would answer by dropping every message of the daemon, the ones that
 * matter included. The counters always count every one. */
#define REJECT_LOG_WINDOW_USEC (10 * UINT64_C(1000000))
#define REJECT_LOG_BURST 5
#define REJECT_LOG_TOTAL_BURST 50

/* What one commit holds at most, whatever [frames] commit_delay_ms says: a backlog commits at
 * once in these steps, and memory stays bounded (the frames' bytes are copied). */
#define INGEST_HOLD_FRAMES 256u
#define INGEST_HOLD_BYTES (256u * 1024u)
/* Commits waiting for their sync, for frames.accepted: at most this many entries, the newest
 * absorbing more commits when full (their frames count after the later sync, never earlier). */
#define INGEST_UNSYNCED_MAX 64
/* The hold timer may fire this late (never early). */
#define INGEST_HOLD_ACCURACY_USEC (1 * UINT64_C(1000))

/* A frame that passed every check, held for the next commit; its bytes are in batch.buf. */
struct ingest_frame {
        struct bulb *bulb; /* registry entries are never freed while the daemon runs */
        int64_t seq;
        int64_t received_at_usec;
        size_t off, len;
};

/* The command ack a held frame carries, recorded in the same transaction as the frame. */
struct ingest_ack {
        char dev[DEVICE_ID_MAX + 1];
        char id[DEVICE_ID_MAX + 1];
        bool ok;
        char err[FRAME_ACK_ERR_MAX + 1];
};

struct ingest_seq_undo {
        char dev[DEVICE_ID_MAX + 1];
        int64_t last_seq;
};

struct ingest_batch {
        bool open;      /* frames are held for the next commit */
        unsigned count; /* frames held */
        uint64_t bytes; /* their size */
        uint64_t first_usec; /* CLOCK_MONOTONIC when the first of them was accepted */
        struct ingest_frame *frames;
        size_t cap_frames;
        uint8_t *buf; /* their bytes, back to back */
        size_t cap_buf;
        /* Command acks of these frames, recorded in their transaction. */
        struct ingest_ack *acks;
        size_t n_acks, cap_acks;
        /* The last seq each bulb had before this transaction: restored if the commit fails. */
        struct ingest_seq_undo *undo;
        size_t n_undo, cap_undo;
};

struct ingest {
        const struct iothub_conf *conf;
        sd_event_source *hold_timer; /* [frames] commit_delay_ms after the first held frame */
        struct db *db;
        struct registry *registry;
        struct ack *ack;
        struct spool_counts *spool; /* hub.c's; cloud.c lowers it as frames leave */
        struct ingest_events ev;
        struct ingest_counters counters;
        struct ingest_batch batch;
        /* Unknown devices have no per-bulb log limit: one shared window for them. */
        struct ratelimit unknown_log_rl;
        struct ratelimit reject_log_rl; /* every rejection line together */
        /* Storing frames fails (disk full, read-only, damaged database): the cause, 0 while
         * storing works, and the frames refused since it began. */
        int store_errno;
        uint64_t store_refused;
        /* Frames committed but not yet on disk, per commit generation, oldest first. */
        struct {
                uint64_t gen, frames;
        } unsynced[INGEST_UNSYNCED_MAX];
        size_t n_unsynced;
        int sync_errno; /* an fdatasync failed with it (for good), 0: none did */
};

static bool log_allowed(struct ingest *in, struct ratelimit *rl, uint64_t now, const char *dev) {
        uint64_t suppressed, total_suppressed;
        bool ok = ratelimit_allow(rl, now, REJECT_LOG_WINDOW_USEC, REJECT_LOG_BURST, &suppressed);
        bool total_ok;

        if (!ok && suppressed == 0)
                return false;
        total_ok = ratelimit_allow(&in->reject_log_rl, now, REJECT_LOG_WINDOW_USEC, REJECT_LOG_TOTAL_BURST,
                                   &total_suppressed);
        if (total_suppressed > 0)
                log_event(LOG_NOTICE, 0, IOTHUB_MID_FRAME_REJECTED, NULL, NULL,
                          "Suppressed %" PRIu64 " more rejection messages (all bulbs together)", total_suppressed);
        if (!total_ok)
                return false;
        if (suppressed > 0)
                log_event(LOG_NOTICE, 0, IOTHUB_MID_FRAME_REJECTED, dev, NULL,
                          "Suppressed %" PRIu64 " more rejection messages for %s", suppressed, dev);
        return ok;
}

/* Counts a rejection (and acks a resent frame) without logging it. */
static void reject_quiet(struct ingest *in, struct bulb *b, const char *dev, enum frame_reason reason) {
        in->counters.frames_rejected[reason]++;
        if (in->ev.rejected)
                in->ev.rejected(in->ev.userdata, dev, reason);
        /* A resent frame the hub has (replay, or stale by now): tell the bulb again what is
         * committed, or a bulb that lost the ack resends forever (iothub-protocol(7)). */
        if (b && (reason == FRAME_REPLAY || reason == FRAME_STALE))
                ack_stage(in->ack, b, b->last_seq, !in->batch.open);
}

static void reject(struct ingest *in, struct bulb *b, const char *dev, enum frame_reason reason) {
        uint64_t now = now_monotonic_usec();
        bool ok;

        reject_quiet(in, b, dev, reason);
        if (b)
                ok = log_allowed(in, &b->log_rl, now, b->id);
        else
                ok = log_allowed(in, &in->unknown_log_rl, now, "unknown devices");
        /* Only the device id (already checked to be a short, safe token, or "?") and the
         * reason: never the payload of a frame whose sender is unproven. */
        if (ok)
                log_event(LOG_WARNING, 0, IOTHUB_MID_FRAME_REJECTED, dev, frame_reason_to_string(reason),
                          "Rejected frame from %s: %s", dev, frame_reason_to_string(reason));
}

/* [spool] max_bytes: the spool never grows past the cap. To make room the oldest frames go, a
 * segment at a time (a light's newest state is worth more than its oldest), counted in
 * spool.dropped and logged; a frame still in an upload batch may go too, which only means that
 * the cloud's answer removes fewer. Before the commit's transaction, not in it (spool.c). */
static int make_room(struct ingest *in) {
        uint64_t max = in->conf->spool.max_bytes, count = 0, bytes = 0;
        int r;

        while (in->spool->bytes + in->batch.bytes > max && in->spool->pending > 0) {
                /* One segment (at least one frame) at a time: the loop stops once the rest fits. */
                r = spool_drop_oldest(in->db, 1, &count, &bytes);
                if (r < 0)
                        return r;
                if (count == 0)
                        break;
                in->spool->pending -= count <= in->spool->pending ? count : in->spool->pending;
                in->spool->bytes -= bytes <= in->spool->bytes ? bytes : in->spool->bytes;
                in->spool->dropped += count;
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

int ingest_storage(const struct ingest *in, uint64_t *ret_refused) {
        if (ret_refused)
                *ret_refused = in->store_refused;
        return in->store_errno;
}

static void storage_changed(struct ingest *in) {
        if (in->ev.storage_changed)
                in->ev.storage_changed(in->ev.userdata);
}

/* n frames that passed every check could not be stored: they are not accepted and not acked
 * (their bulbs resend them). Said once per cause, not per frame: a full disk under a fleet
 * would otherwise write a line per frame to the journal that shares the disk. */
static void store_failed(struct ingest *in, int r, unsigned n) {
        r = db_cause(in->db, r);
        /* SQLite may report an I/O error without the system's errno, or with EIO: ask the file
         * system itself with an unnamed file that vanishes on close. ext4 turned read-only by
         * an error (errors=remount-ro) answers EROFS here while statvfs() still says rw. */
        if (r == -EIO) {
                int fd = open(in->conf->hub.state_dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
                if (fd >= 0)
                        (void) close(fd);
                else if (errno == EROFS || errno == ENOSPC || errno == EDQUOT)
                        r = -errno;
        }
        in->counters.frames_store_failed += n;
        in->store_refused += n;
        if (r == in->store_errno)
                return;
        in->store_errno = r;
        log_event(LOG_ERR, r, IOTHUB_MID_STORE_FAILED, NULL, ingest_store_reason(r),
                  "Cannot store frames in %s (spool/, iothub.db): %m (%s); they are not acknowledged, bulbs resend them",
                  in->conf->hub.state_dir, db_errmsg(in->db));
        storage_changed(in);
}

static void store_ok(struct ingest *in) {
        if (in->store_errno == 0)
                return;
        log_event(LOG_NOTICE, 0, IOTHUB_MID_STORE_RECOVERED, NULL, NULL,
                  "Storing frames again; %" PRIu64 " were refused meanwhile (their bulbs resend them)",
                  in->store_refused);
        in->store_errno = 0;
        in->store_refused = 0;
        storage_changed(in);
}

/* A batch's arrays larger than this are freed once the batch ends (committed or not): a burst
 * grows them to 128 KiB and more, which would otherwise stay touched (private memory, DESIGN.md
 * Targets) through every quiet hour after it. Below it they are kept for the next batch; a
 * regrowth costs a few doublings per commit, nothing beside the commit's fdatasync. */
#define INGEST_BATCH_KEEP (16 * 1024)

static void batch_release(struct ingest_batch *t) {
        if (t->cap_buf > INGEST_BATCH_KEEP) {
                free(t->buf);
                t->buf = NULL;
                t->cap_buf = 0;
        }
        if (t->cap_frames * sizeof *t->frames > INGEST_BATCH_KEEP) {
                free(t->frames);
                t->frames = NULL;
                t->cap_frames = 0;
        }
        if (t->cap_undo * sizeof *t->undo > INGEST_BATCH_KEEP) {
                free(t->undo);
                t->undo = NULL;
                t->cap_undo = 0;
        }
        if (t->cap_acks * sizeof *t->acks > INGEST_BATCH_KEEP) {
                free(t->acks);
                t->acks = NULL;
                t->cap_acks = 0;
        }
}

/* Ends the batch without accepting any of its frames (the transaction, if one is open, is
 * rolled back): the database keeps the old seqs, and so must memory, or the bulbs' honest
 * resends (PROTOCOL.md 1, end-to-end acknowledgement) would be replays. Their acks are dropped
 * unsent, and the command acks they carried were never recorded. */
static void batch_abort(struct ingest *in, bool began) {
        in->batch.open = false;
        ack_commit_done(in->ack, false, 0);
        /* SQLite may have rolled back by itself already (SQLITE_FULL, an I/O error). */
        if (began && db_in_transaction(in->db))
                (void) db_rollback(in->db);
        if (in->batch.n_acks > 0 && in->ev.command_acks_done)
                in->ev.command_acks_done(in->ev.userdata, false);
        for (size_t i = 0; i < in->batch.n_undo; i++) {
                struct bulb *b = registry_find(in->registry, in->batch.undo[i].dev);
                if (b) {
                        b->last_seq = in->batch.undo[i].last_seq;
                        b->in_batch = false;
                }
        }
        in->batch.n_undo = 0;
        in->batch.count = 0;
        in->batch.bytes = 0;
        in->batch.n_acks = 0;
        batch_release(&in->batch);
        (void) sd_event_source_set_enabled(in->hold_timer, SD_EVENT_OFF);
        /* Frames dropped for room were rolled back too: count again from the table. */
        if (began)
                (void) spool_stats(in->db, &in->spool->pending, &in->spool->bytes);
}

static int batch_add_ack(struct ingest *in, const struct frame *f) {
        struct ingest_batch *b = &in->batch;

        if (b->n_acks == b->cap_acks) {
                size_t cap = b->cap_acks ? b->cap_acks * 2 : 16;
                struct ingest_ack *t = reallocarray(b->acks, cap, sizeof *t);
                if (!t)
                        return -ENOMEM;
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
        return 0;
}

/* Keeps a copy of an accepted frame for the next commit. */
static int batch_hold(struct ingest *in, struct bulb *b, int64_t seq, const uint8_t *payload, size_t len) {
        struct ingest_batch *t = &in->batch;

        if (t->count == t->cap_frames) {
                size_t cap = t->cap_frames ? t->cap_frames * 2 : 16;
                struct ingest_frame *f = reallocarray(t->frames, cap, sizeof *f);
                if (!f)
                        return -ENOMEM;
                t->frames = f;
                t->cap_frames = cap;
        }
        if (t->bytes + len > t->cap_buf) {
                size_t cap = t->cap_buf ? t->cap_buf : 4096;
                while (cap < t->bytes + len)
                        cap *= 2;
                uint8_t *nb = realloc(t->buf, cap);
                if (!nb)
                        return -ENOMEM;
                t->buf = nb;
                t->cap_buf = cap;
        }
        memcpy(t->buf + t->bytes, payload, len);
        t->frames[t->count] = (struct ingest_frame){
                .bulb = b,
                .seq = seq,
                .received_at_usec = (int64_t) now_realtime_usec(),
                .off = (size_t) t->bytes,
                .len = len,
        };
        return 0;
}

/* Remembers b's last seq before this batch touched it (once per bulb and batch), so that a
 * failed commit can put memory back where the database is. */
static int batch_note_seq(struct ingest *in, struct bulb *b) {
        struct ingest_batch *t = &in->batch;

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

static bool batch_full(const struct ingest *in) {
        return in->batch.count >= INGEST_HOLD_FRAMES || in->batch.bytes >= INGEST_HOLD_BYTES;
}

void ingest_message(struct ingest *in, const char *topic, const uint8_t *payload, size_t len) {
        const struct iothub_conf *c = in->conf;
        char dev[DEVICE_ID_MAX + 1];
        enum frame_reason reason;
        struct frame f;
        struct bulb *b;
        int64_t now_s;
        int r;

        in->counters.frames_received++;

        if (frame_topic_device(topic, c->mqtt.topic_prefix, "status", dev) < 0) {
                reject(in, NULL, "?", FRAME_MALFORMED);
                return;
        }
        reason = frame_parse(payload, len, dev, c->frames.max_bytes, &f);
        if (reason != FRAME_OK) {
                b = registry_find(in->registry, dev);
                reject(in, b, dev, reason);
                return;
        }
        b = registry_find(in->registry, dev);
        if (!b) {
                reject(in, NULL, dev, FRAME_UNKNOWN_DEVICE);
                return;
        }
        if (b->revoked) {
                reject(in, b, dev, FRAME_REVOKED);
                return;
        }
        /* Before the signature: a flood must not buy CPU time (see iothub-protocol(7)). */
        if (!bulb_rate_take(b, c->frames.rate_per_device, now_monotonic_usec())) {
                reject(in, b, dev, FRAME_RATE_LIMITED);
                return;
        }
        now_s = (int64_t) (now_realtime_usec() / UINT64_C(1000000));
        if (f.iat < now_s - (int64_t) c->frames.max_clock_skew_s || f.iat > now_s + (int64_t) c->frames.max_clock_skew_s) {
                reject(in, b, dev, FRAME_STALE);
                return;
        }
        if (f.seq <= b->last_seq) {
                reject(in, b, dev, FRAME_REPLAY);
                return;
        }
        r = registry_verify(in->registry, b, f.alg, f.signing_input, f.signing_input_len, f.sig, f.sig_len);
        if (r == -EUCLEAN) {
                /* Not the bulb's fault but the database's: said apart in the log (rate-limited
                 * with the bulb's rejections), counted as bad_signature (nothing proves the frame). */
                if (log_allowed(in, &b->log_rl, now_monotonic_usec(), b->id))
                        log_event(LOG_ERR, r, IOTHUB_MID_FRAME_REJECTED, dev,
                                  frame_reason_to_string(FRAME_BAD_SIGNATURE),
                                  "Enrolled key of %s in the database does not load (damaged); its frames "
                                  "are refused until it is enrolled again (bulb remove, bulb add)",
                                  dev);
                reject_quiet(in, b, dev, FRAME_BAD_SIGNATURE);
                return;
        }
        if (r == -ENOMEM) {
                /* A miss of the key cache could not build the key: nothing is wrong with the
                 * frame. Refused like a frame the database refused (not acked, the bulb resends
                 * it), not as a bad signature, which would be a false security event. */
                in->counters.frames_store_failed++;
                if (log_allowed(in, &b->log_rl, now_monotonic_usec(), b->id))
                        log_error_errno(r, "Cannot load the key of %s to check its frame: %m; it is not acked, "
                                           "the bulb resends it",
                                        dev);
                return;
        }
        if (r < 0) {
                reject(in, b, dev, FRAME_BAD_SIGNATURE);
                return;
        }

        /* Held, not yet accepted: without memory for it the frame is refused like a frame the
         * database refused (not acked; the bulb resends it). batch_hold() changes nothing
         * visible until count moves, so only the ack needs taking back. */
        bool added_ack = false;
        r = batch_hold(in, b, f.seq, payload, len);
        if (r >= 0 && f.has_ack && in->ev.command_ack) {
                r = batch_add_ack(in, &f);
                added_ack = r >= 0;
        }
        if (r >= 0)
                r = batch_note_seq(in, b);
        if (r < 0) {
                if (added_ack)
                        in->batch.n_acks--;
                in->counters.frames_store_failed++;
                log_error_errno(r, "Cannot hold a frame from %s for its commit: %m; it is not acked, the bulb resends it", dev);
                return;
        }
        if (!in->batch.open) {
                in->batch.open = true;
                in->batch.first_usec = now_monotonic_usec();
        }
        /* Memory moves ahead of the commit so that a second frame with the same seq is a
         * replay; if the commit fails, these frames were never accepted: batch_abort() puts
         * memory back from the undo list, so that a bulb resending them is accepted. */
        registry_seq_committed(b, f.seq);
        ack_stage(in->ack, b, f.seq, false);
        in->batch.count++;
        in->batch.bytes += len;
        if (batch_full(in))
                (void) ingest_commit(in);
}

static int on_hold_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        (void) ingest_commit(userdata);
        return 0;
}

void ingest_read_done(struct ingest *in) {
        uint64_t delay = (uint64_t) in->conf->frames.commit_delay_ms * 1000;
        int r;

        if (!in->batch.open)
                return;
        if (delay == 0 || batch_full(in)) {
                (void) ingest_commit(in);
                return;
        }
        r = sd_event_source_get_enabled(in->hold_timer, NULL);
        if (r > 0)
                return; /* armed at the first frame's time + delay */
        r = sd_event_source_set_time(in->hold_timer, in->batch.first_usec + delay);
        if (r >= 0)
                r = sd_event_source_set_enabled(in->hold_timer, SD_EVENT_ONESHOT);
        if (r < 0)
                (void) ingest_commit(in); /* no timer: commit now rather than hold forever */
}

/* The batch's frames, in the order they came, appended to the spool's segment log with one
 * write (spool.c; issue 13: each byte written once, not a WAL frame and a checkpoint per page).
 * The bulbs' seqs are not written by the frame path at all: the segments are their record
 * (dev, seq) until a segment is unlinked, which happens only once its bulbs' seqs are in
 * bulb_seqs, written from the segment itself (spool.c). bulb_seqs written from memory here
 * would be a second file beside the segment: a power cut could keep it and lose the segment
 * (the kernel writes either back when it likes), and an honest resend of a frame that never
 * reached the disk would be refused as a replay. */
static int batch_append(struct ingest *in) {
        _cleanup_free_ struct spool_frame *f = calloc(in->batch.count ?: 1, sizeof *f);

        if (!f)
                return -ENOMEM;
        for (unsigned i = 0; i < in->batch.count; i++) {
                const struct ingest_frame *h = &in->batch.frames[i];

                f[i] = (struct spool_frame){ .dev = h->bulb->id, .seq = h->seq, .jws = in->batch.buf + h->off,
                                             .len = h->len, .received_at_usec = h->received_at_usec };
        }
        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees f */
        return spool_append_frames(in->db, f, in->batch.count);
}

/* The rows of the same commit in SQLite, in one transaction: the command acks. */
static int batch_write_rows(struct ingest *in) {
        int r;

        for (size_t i = 0; i < in->batch.n_acks; i++) {
                const struct ingest_ack *a = &in->batch.acks[i];

                r = in->ev.command_ack(in->ev.userdata, a->dev, a->id, a->ok, a->err[0] ? a->err : NULL);
                if (r < 0)
                        return r;
        }
        return 0;
}

int ingest_commit(struct ingest *in) {
        int r;

        if (!in->batch.open)
                return 0;
        (void) sd_event_source_set_enabled(in->hold_timer, SD_EVENT_OFF);
        if (in->sync_errno != 0) {
                /* Nothing reaches the disk any more (on_synced()): refused like a failed commit. */
                store_failed(in, in->sync_errno, in->batch.count);
                batch_abort(in, false);
                return in->sync_errno;
        }
        r = make_room(in);
        if (r >= 0)
                r = batch_append(in);
        if (r < 0) {
                store_failed(in, r, in->batch.count);
                batch_abort(in, false);
                return r;
        }
        if (in->batch.n_acks > 0) {
                r = db_begin(in->db);
                if (r >= 0)
                        r = batch_write_rows(in);
                if (r >= 0)
                        r = db_commit(in->db);
        }
        /* The segment (and the rows) to disk: the frames count once the sync of this commit
         * generation is reported (on_synced()); without the sync thread, now. */
        if (r >= 0)
                r = db_sync_request(in->db);
        if (r < 0) {
                /* Whatever failed, nothing of the batch is kept. */
                store_failed(in, r, in->batch.count);
                (void) spool_undo_append(in->db);
                batch_abort(in, true);
                return r;
        }
        in->batch.open = false;
        uint64_t gen = db_commit_gen(in->db);
        ack_commit_done(in->ack, true, gen);
        if (in->n_unsynced == INGEST_UNSYNCED_MAX) {
                in->unsynced[INGEST_UNSYNCED_MAX - 1].gen = gen;
                in->unsynced[INGEST_UNSYNCED_MAX - 1].frames += in->batch.count;
        } else {
                in->unsynced[in->n_unsynced].gen = gen;
                in->unsynced[in->n_unsynced++].frames = in->batch.count;
        }
        if (in->batch.n_acks > 0 && in->ev.command_acks_done)
                in->ev.command_acks_done(in->ev.userdata, true);
        in->batch.n_acks = 0;
        store_ok(in);
        /* The bulbs leave the batch. */
        for (size_t i = 0; i < in->batch.n_undo; i++) {
                struct bulb *b = registry_find(in->registry, in->batch.undo[i].dev);
                if (b)
                        b->in_batch = false;
        }
        in->batch.n_undo = 0;
        in->spool->pending += in->batch.count;
        in->spool->bytes += in->batch.bytes;
        in->batch.count = 0;
        in->batch.bytes = 0;
        batch_release(&in->batch);
        if (in->ev.committed)
                in->ev.committed(in->ev.userdata);
        return 0;
}

/* Every commit up to gen is on disk: its frames are accepted, their bulbs acked. A failed sync
 * is for good (db_sync_start()): the frames waiting for one are refused (never acked; their
 * bulbs resend them and are acked after a restart), and so is every later batch. */
static void on_synced(void *userdata, uint64_t gen, int error) {
        struct ingest *in = userdata;
        size_t done = 0;

        if (in->sync_errno != 0)
                return;
        if (error < 0) {
                uint64_t n = 0;

                for (size_t i = 0; i < in->n_unsynced; i++)
                        if (in->unsynced[i].gen > gen)
                                n += in->unsynced[i].frames;
                in->sync_errno = error;
                ack_sync_failed(in->ack);
                store_failed(in, error, (unsigned) n);
        }
        ack_synced(in->ack, gen);
        while (done < in->n_unsynced && in->unsynced[done].gen <= gen)
                in->counters.frames_accepted += in->unsynced[done++].frames;
        if (done > 0) {
                memmove(in->unsynced, in->unsynced + done, (in->n_unsynced - done) * sizeof in->unsynced[0]);
                in->n_unsynced -= done;
        }
        if (error < 0)
                in->n_unsynced = 0;
}

void ingest_sync(struct ingest *in) {
        if (in)
                db_sync_stop(in->db);
}

/* At start: a bulb's last accepted seq is the newer of bulb_seqs (loaded by the registry) and
 * its newest frame still in the spool. */
static int take_spool_seq(const char *dev, int64_t seq, void *userdata) {
        struct ingest *in = userdata;

        registry_seq_committed(registry_find(in->registry, dev), seq);
        return 0;
}

int ingest_new(sd_event *e, const struct iothub_conf *conf, struct db *db, struct registry *registry, struct ack *ack,
               struct spool_counts *spool, const struct ingest_events *ev, struct ingest **ret) {
        struct ingest *in = calloc(1, sizeof *in);
        int r;

        if (!in)
                return -ENOMEM;
        in->conf = conf;
        in->db = db;
        in->registry = registry;
        in->ack = ack;
        in->spool = spool;
        if (ev)
                in->ev = *ev;
        spool_set_max_bytes(db, conf->spool.max_bytes);
        r = spool_max_seqs(db, take_spool_seq, in);
        if (r < 0) {
                ingest_free(in);
                return r;
        }
        r = sd_event_add_time(e, &in->hold_timer, CLOCK_MONOTONIC, 0, INGEST_HOLD_ACCURACY_USEC, on_hold_timer, in);
        if (r >= 0)
                r = sd_event_source_set_enabled(in->hold_timer, SD_EVENT_OFF);
        if (r < 0) {
                ingest_free(in);
                return r;
        }
        (void) sd_event_source_set_description(in->hold_timer, "ingest-hold");
        r = db_sync_start(db, e, on_synced, in);
        if (r < 0) {
                ingest_free(in);
                return r;
        }
        *ret = in;
        return 0;
}

void ingest_free(struct ingest *in) {
        if (!in)
                return;
        /* The listeners may be gone already (ingest_sync() was the time to ack). */
        in->ack = NULL;
        db_sync_stop(in->db);
        sd_event_source_disable_unref(in->hold_timer);
        free(in->batch.frames);
        free(in->batch.buf);
        free(in->batch.acks);
        free(in->batch.undo);
        free(in);
}

const struct ingest_counters *ingest_counters(const struct ingest *in) {
        return &in->counters;
}
