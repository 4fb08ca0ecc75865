/* SPDX-License-Identifier: MIT */
/* The spool: accepted frames, byte for byte as the bulb signed them (the cloud verifies the
 * bulb's own signature, PROTOCOL.md 3), until the cloud acknowledges them. They are in the
 * segment log (seglog.c, <state_dir>/spool/: written once, unlinked once uploaded, issue 13);
 * SQLite keeps what is small and changes in place: each bulb's last seq (bulb_seqs, written from
 * a segment's own frames when it is summarized or retires, never from memory), the closed
 * segments' summaries (spool_segments: a start need not read them), the frames moved aside. */
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "db-internal.h"
#include "iothub/frame.h"
#include "iothub/seglog.h"
#include "iothub/spool.h"

/* A segment holds at most this much (a 16th of [spool] max_bytes, within these bounds): the
 * cap drops the oldest segment whole, and a segment is unlinked only once all of it left. */
#define SPOOL_SEGMENT_MIN (16u * 1024u)
#define SPOOL_SEGMENT_MAX (1024u * 1024u)
/* Frames of the old spool table moved per append when the log is opened. */
#define SPOOL_MOVE_CHUNK 256u

static struct seglog *log_of(struct db *db) {
        return db_spool(db)->log;
}

static void summarize(struct db *db);

static bool frame_fields_valid(const char *dev, int64_t seq, const uint8_t *jws, size_t len, int *ret) {
        if (!dev || !device_id_is_valid(dev, strnlen(dev, DEVICE_ID_MAX + 1)) || !jws || len == 0)
                *ret = -EINVAL;
        else if (seq < 1 || seq > FRAME_SEQ_MAX)
                *ret = -ERANGE;
        else if (len > FRAME_MAX_BYTES_LIMIT)
                *ret = -EFBIG;
        else
                return true;
        return false;
}

int spool_append_frames(struct db *db, const struct spool_frame *f, size_t n) {
        _cleanup_free_ struct seglog_record *recs = NULL;
        int r;

        if (!db || !log_of(db) || (!f && n > 0))
                return -EINVAL;
        if (n == 0)
                return 0;
        recs = calloc(n, sizeof *recs);
        if (!recs)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                if (!frame_fields_valid(f[i].dev, f[i].seq, f[i].jws, f[i].len, &r))
                        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees recs */
                        return r;
                recs[i] = (struct seglog_record){ .type = SEGLOG_FRAME, .seq = f[i].seq,
                                                  .received_at_usec = f[i].received_at_usec < 0 ? 0 : f[i].received_at_usec,
                                                  .jws = f[i].jws, .len = f[i].len };
                memcpy(recs[i].dev, f[i].dev, strlen(f[i].dev) + 1);
        }
        /* Before the append (which may close a segment: its summary waits for the sync of a
         * later call), so that no other commit comes between it and the caller's. */
        summarize(db);
        /* What the open's scan gathered is out of date from now on (spool_max_seqs() walks). */
        if (db_spool(db)->open_seqs_valid) {
                free(db_spool(db)->open_seqs);
                db_spool(db)->open_seqs = NULL;
                db_spool(db)->n_open_seqs = 0;
                db_spool(db)->open_seqs_valid = false;
        }
        /* Ids are handed out only once all are valid; a failed append leaves a gap, never a
         * reused id (db_spool_next_id()). */
        for (size_t i = 0; i < n; i++)
                recs[i].id = db_spool_next_id(db);
        return seglog_append(log_of(db), recs, n);
}

int spool_undo_append(struct db *db) {
        if (!db || !log_of(db))
                return -EINVAL;
        return seglog_undo_append(log_of(db));
}

int spool_append(struct db *db, const char *dev, int64_t seq, const uint8_t *jws, size_t len,
                 int64_t received_at_usec) {
        struct spool_frame f = { .dev = dev, .seq = seq, .jws = jws, .len = len, .received_at_usec = received_at_usec };
        int r;

        if (!db || !frame_fields_valid(dev, seq, jws, len, &r))
                return db ? r : -EINVAL;
        r = spool_append_frames(db, &f, 1);
        if (r < 0)
                return r;
        /* Alone, the frame is its own commit. */
        r = db_sync_request(db);
        if (r < 0) {
                (void) spool_undo_append(db);
                return r;
        }
        summarize(db);
        return 0;
}

int spool_stats(struct db *db, uint64_t *ret_pending, uint64_t *ret_bytes) {
        if (!db || !log_of(db))
                return -EINVAL;
        seglog_counts(log_of(db), ret_pending, ret_bytes);
        return 0;
}

struct read_adapter {
        int (*cb)(const struct spool_entry *e, void *userdata);
        void *userdata;
};

static int read_one(const struct seglog_record *r, void *userdata) {
        struct read_adapter *a = userdata;
        struct spool_entry e = { .id = r->id, .jws = r->jws, .len = r->len };

        return a->cb(&e, a->userdata);
}

int spool_read_batch_after(struct db *db, int64_t after_id, unsigned max,
                           int (*cb)(const struct spool_entry *e, void *userdata), void *userdata) {
        struct read_adapter a = { .cb = cb, .userdata = userdata };

        if (!db || !log_of(db) || !cb || max == 0 || max > INT_MAX)
                return -EINVAL;
        return seglog_read_batch_after(log_of(db), after_id, max, read_one, &a);
}

int spool_read_batch(struct db *db, unsigned max, int (*cb)(const struct spool_entry *e, void *userdata),
                     void *userdata) {
        return spool_read_batch_after(db, INT64_MIN, max, cb, userdata);
}

/* The newest seq of each bulb in a segment about to be unlinked. */
struct seq_max {
        char dev[DEVICE_ID_MAX + 1];
        int64_t seq;
};

struct seq_set {
        struct seq_max *m;
        size_t n, cap;
        /* An index of m by device id (open addressing, slot = index + 1, 0 empty): the start
         * passes every frame of the spool through seq_take(), with thousands of bulbs. */
        uint32_t *slots;
        size_t n_slots; /* a power of two, at least twice n */
};

static uint32_t hash_dev(const char *dev) {
        uint32_t h = UINT32_C(2166136261); /* FNV-1a */

        for (; *dev; dev++)
                h = (h ^ (uint8_t) *dev) * UINT32_C(16777619);
        return h;
}

static void seq_slot(struct seq_set *s, const char *dev, size_t *ret_slot) {
        size_t mask = s->n_slots - 1, i = hash_dev(dev) & mask;

        while (s->slots[i] != 0 && !streq(s->m[s->slots[i] - 1].dev, dev))
                i = (i + 1) & mask;
        *ret_slot = i;
}

static int seq_rehash(struct seq_set *s, size_t n_slots) {
        uint32_t *t = calloc(n_slots, sizeof *t);
        size_t slot;

        if (!t)
                return -ENOMEM;
        free(s->slots);
        s->slots = t;
        s->n_slots = n_slots;
        for (size_t k = 0; k < s->n; k++) {
                (void) seq_slot(s, s->m[k].dev, &slot);
                s->slots[slot] = (uint32_t) (k + 1);
        }
        return 0;
}

static void seq_set_free(struct seq_set *s) {
        free(s->m);
        free(s->slots);
        *s = (struct seq_set){};
}

static int seq_take(const char *dev, int64_t seq, void *userdata) {
        struct seq_set *s = userdata;
        size_t slot;
        int r;

        if (2 * (s->n + 1) > s->n_slots) {
                size_t n_slots = s->n_slots ? s->n_slots : 64;
                while (2 * (s->n + 1) > n_slots)
                        n_slots *= 2;
                r = seq_rehash(s, n_slots);
                if (r < 0)
                        return r;
        }
        (void) seq_slot(s, dev, &slot);
        if (s->slots[slot] != 0) {
                struct seq_max *x = &s->m[s->slots[slot] - 1];
                if (seq > x->seq)
                        x->seq = seq;
                return 0;
        }
        if (s->n == s->cap) {
                size_t c = s->cap ? s->cap * 2 : 16;
                struct seq_max *t = reallocarray(s->m, c, sizeof *t);
                if (!t)
                        return -ENOMEM;
                s->m = t;
                s->cap = c;
        }
        memcpy(s->m[s->n].dev, dev, strlen(dev) + 1);
        s->m[s->n].seq = seq;
        s->slots[slot] = (uint32_t) ++s->n;
        return 0;
}

/* Raises each bulb's stored last seq to seq (the upsert only moves forward). */
static int seqs_forward(struct db *db, const struct seq_max *m, size_t n) {
        for (size_t i = 0; i < n; i++) {
                _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(db, DB_STMT_BULB_SET_SEQ);
                int rc;

                if ((rc = sqlite3_bind_int64(s, 1, m[i].seq)) != SQLITE_OK ||
                    (rc = sqlite3_bind_text(s, 2, m[i].dev, -1, SQLITE_STATIC)) != SQLITE_OK)
                        return db_errno(rc);
                rc = sqlite3_step(s);
                if (rc != SQLITE_DONE)
                        return db_errno(rc);
        }
        return 0;
}

static int summary_insert(struct db *db, const struct seglog_summary *x) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(db, DB_STMT_SEGMENT_SET);
        int rc;

        if ((rc = sqlite3_bind_int64(s, 1, x->name_id)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 2, x->first_id)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 3, x->last_id)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 4, (int64_t) x->frames)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 5, (int64_t) x->bytes)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 6, (int64_t) x->size)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 7, x->cursor)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

static int summary_delete(struct db *db, int64_t name_id) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(db, DB_STMT_SEGMENT_DELETE);
        int rc;

        if ((rc = sqlite3_bind_int64(s, 1, name_id)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

/* The summaries of the closed segments that the completed sync covered (hand-overs up to
 * token), one transaction each: the summary and the segment's bulbs' newest seqs together, so
 * that a start that skips the segment finds its seqs in bulb_seqs (spool_max_seqs()). */
static int summaries_store(struct db *db, uint64_t token) {
        struct db_spool *sp = db_spool(db);

        for (;;) {
                struct seq_set set = {};
                struct seglog_summary x;
                int r = seglog_summary_next(sp->log, token, seq_take, &set, &x);

                if (r <= 0) {
                        seq_set_free(&set);
                        return r;
                }
                r = db_begin(db);
                if (r >= 0)
                        r = seqs_forward(db, set.m, set.n);
                seq_set_free(&set);
                if (r >= 0)
                        r = summary_insert(db, &x);
                if (r >= 0)
                        r = db_commit(db);
                if (r < 0) {
                        (void) db_rollback(db);
                        return r;
                }
                seglog_summary_stored(sp->log, x.name_id);
        }
}

/* Stored at once (the daemon may go quiet, or stop, before the next summarize()), but no new
 * wait begins here: this may run while the syncer stops (db_sync_stop(), db_restore_file(),
 * which wants no wait left). A commit then is lost with the connection's others or kept, the
 * summary and its seqs together. A failed sync: no summaries (read at the next start). */
static void summary_synced(void *userdata, int error) {
        struct db *db = userdata;
        struct db_spool *sp = db_spool(db);

        sp->summary_wait = NULL;
        if (error < 0)
                return;
        sp->summary_ready = true;
        if (sp->log && !db_in_transaction(db)) {
                (void) summaries_store(db, sp->summary_token);
                sp->summary_ready = false;
        }
}

/* Closed segments get their summaries (spool_segments; seglog.h) so that the next start need
 * not read them: once a sync that began after their last bytes were handed over completed, never
 * before (the WAL is synced before the segments: a summary on disk before its segment could
 * stand for bytes a power cut took). Called where the spool changes, outside the caller's
 * transaction (else: later): stores what a completed sync covers, then waits for the next
 * sync when more segments closed. Errors are nobody's: a segment without a summary is read at
 * start, as before. */
static void summarize(struct db *db) {
        struct db_spool *sp = db_spool(db);
        uint64_t token;
        int r;

        if (!sp->log || sp->summary_wait)
                return;
        if (sp->summary_ready) {
                if (db_in_transaction(db))
                        return;
                (void) summaries_store(db, sp->summary_token);
                sp->summary_ready = false;
        }
        token = seglog_summary_pending(sp->log);
        if (token == 0 || token <= sp->summary_token)
                return;
        r = db_sync_wait(db, summary_synced, db, &sp->summary_wait);
        if (r < 0)
                return;
        sp->summary_token = token;
        if (r == 0) {
                /* Durable already (no sync thread: seglog_sync() when handed over). */
                sp->summary_ready = true;
                if (!db_in_transaction(db)) {
                        (void) summaries_store(db, token);
                        sp->summary_ready = false;
                }
        }
}

static void retire_synced(void *userdata, int error) {
        struct db *db = userdata;
        struct db_spool *sp = db_spool(db);

        sp->retire_wait = NULL;
        /* Unlinked only once the seqs are durable: a failed sync keeps the segment (its frames
         * are the record of those seqs at the next start). */
        if (error == 0 && sp->log)
                (void) seglog_retire(sp->log);
}

/* Segments that nothing waits in any more go: each bulb's newest seq in one moves into
 * bulb_seqs first (a segment on disk is the record of its frames' seqs until then: the start
 * reads them, spool_max_seqs()), and the file is unlinked once that commit is on disk. One at a
 * time while a sync is awaited; without the sync thread, all at once. Not inside the caller's
 * transaction: then later. Errors are not the caller's (the frames left already); the segment
 * stays and the next call tries again. */
static void retire(struct db *db) {
        struct db_spool *sp = db_spool(db);

        while (sp->log && !sp->retire_wait && !db_in_transaction(db)) {
                struct seq_set set = {};
                int r = seglog_retirable(sp->log, seq_take, &set);

                if (r <= 0) {
                        seq_set_free(&set);
                        return;
                }
                r = db_begin(db);
                if (r >= 0)
                        r = seqs_forward(db, set.m, set.n);
                seq_set_free(&set);
                /* Its summary goes before the file: a summary never outlives its segment. */
                if (r >= 0)
                        r = summary_delete(db, seglog_retirable_id(sp->log));
                if (r >= 0)
                        r = db_commit(db);
                if (r < 0) {
                        (void) db_rollback(db);
                        return;
                }
                r = db_sync_wait(db, retire_synced, db, &sp->retire_wait);
                if (r < 0)
                        return;
                if (r > 0)
                        return; /* retire_synced() unlinks it */
                if (seglog_retire(sp->log) < 0)
                        return;
        }
}

int spool_delete(struct db *db, int64_t first_id, int64_t last_id, uint64_t *ret_count, uint64_t *ret_bytes) {
        int r;

        if (!db || !log_of(db) || first_id > last_id || last_id < 1)
                return -EINVAL;
        r = seglog_consume(log_of(db), last_id, ret_count, ret_bytes);
        if (r < 0)
                return r;
        /* The cursor record goes to disk with the next sync; losing it only sends again. */
        (void) db_sync_request(db);
        retire(db);
        summarize(db);
        return 0;
}

struct aside_ctx {
        struct db *db;
        int64_t first_id, last_id, moved_at;
        long http_status;
        const char *reason;
};

static int aside_one(const struct seglog_record *r, void *userdata) {
        struct aside_ctx *c = userdata;
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        int rc;

        if (r->id > c->last_id)
                return -ECANCELED; /* past the batch: done */
        if (r->id < c->first_id)
                return 0;
        s = db_stmt(c->db, DB_STMT_MOVED_ASIDE_INSERT);
        if ((rc = sqlite3_bind_text(s, 1, r->dev, -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 2, r->seq)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 3, r->received_at_usec)) != SQLITE_OK ||
            (rc = sqlite3_bind_blob(s, 4, r->jws, (int) r->len, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 5, c->moved_at)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 6, c->http_status)) != SQLITE_OK ||
            (rc = sqlite3_bind_text(s, 7, c->reason, -1, SQLITE_STATIC)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

int spool_move_aside(struct db *db, int64_t first_id, int64_t last_id, long http_status, const char *reason,
                     uint64_t *ret_count, uint64_t *ret_bytes) {
        struct aside_ctx c = { .db = db, .first_id = first_id, .last_id = last_id,
                               .moved_at = (int64_t) (now_realtime_usec() / 1000000), .http_status = http_status,
                               .reason = reason };
        uint64_t pending = 0;
        int r;

        if (!db || !log_of(db) || first_id > last_id || last_id < 1 || !reason)
                return -EINVAL;
        /* Copied into moved_aside and committed before they leave the log: a crash between the
         * two keeps them in both, never in neither; the next answer moves them aside again, and
         * the copy skips what moved_aside has already (unique (dev, seq), db.c migration 6). */
        seglog_counts(log_of(db), &pending, NULL);
        r = db_begin(db);
        if (r < 0)
                return r;
        if (pending > 0) {
                r = seglog_read_batch(log_of(db), pending > INT32_MAX ? INT32_MAX : (unsigned) pending, aside_one, &c);
                if (r == -ECANCELED)
                        r = 0;
        }
        if (r >= 0)
                r = db_commit(db);
        if (r < 0) {
                (void) db_rollback(db);
                return r;
        }
        return spool_delete(db, first_id, last_id, ret_count, ret_bytes);
}

int spool_drop_oldest(struct db *db, unsigned n, uint64_t *ret_count, uint64_t *ret_bytes) {
        uint64_t count = 0, bytes = 0;
        int r = 0;

        if (!db || !log_of(db) || n == 0)
                return -EINVAL;
        /* A whole segment at a time: the oldest one, or the one being written, closed first;
         * until n frames have left or nothing waits. */
        while (count < n) {
                uint64_t c = 0, b = 0;

                r = seglog_drop_oldest(log_of(db), &c, &b);
                if (r == -ENOENT) {
                        seglog_roll(log_of(db));
                        r = seglog_drop_oldest(log_of(db), &c, &b);
                        if (r == -ENOENT) {
                                r = 0;
                                break; /* nothing waits */
                        }
                }
                if (r < 0)
                        break;
                count += c;
                bytes += b;
        }
        /* Frames that left before a failure are gone all the same: their cursor goes to disk. */
        if (r < 0 && count == 0)
                return r;
        (void) db_sync_request(db);
        retire(db);
        summarize(db);
        if (ret_count)
                *ret_count = count;
        if (ret_bytes)
                *ret_bytes = bytes;
        return 0;
}

void spool_set_max_bytes(struct db *db, uint64_t max_bytes) {
        uint64_t seg = max_bytes / 16;

        if (!db || !log_of(db))
                return;
        seg = seg < SPOOL_SEGMENT_MIN ? SPOOL_SEGMENT_MIN : seg > SPOOL_SEGMENT_MAX ? SPOOL_SEGMENT_MAX : seg;
        seglog_set_segment_bytes(log_of(db), (size_t) seg);
}

int spool_max_seqs(struct db *db, int (*cb)(const char *dev, int64_t seq, void *userdata), void *userdata) {
        struct db_spool *sp;
        struct seq_set set = {};
        int r = 0;

        if (!db || !log_of(db) || !cb)
                return -EINVAL;
        sp = db_spool(db);
        /* At start, what the open's scan of the segments it read gathered (one pass for the
         * counts, the checks and the seqs; the summarized segments' seqs are in bulb_seqs);
         * later, a walk of every segment. */
        if (sp->open_seqs_valid) {
                set.m = (struct seq_max *) sp->open_seqs;
                set.n = sp->n_open_seqs;
                sp->open_seqs = NULL;
                sp->n_open_seqs = 0;
                sp->open_seqs_valid = false;
        } else
                r = seglog_frames_after(log_of(db), 0, seq_take, &set);
        for (size_t i = 0; r >= 0 && i < set.n; i++)
                r = cb(set.m[i].dev, set.m[i].seq, userdata);
        seq_set_free(&set);
        return r < 0 ? r : 0;
}

struct newest_adapter {
        int (*cb)(const struct spool_frame *f, bool segment_start, void *userdata);
        void *userdata;
};

static int newest_one(const struct seglog_record *r, bool seg_first, void *userdata) {
        struct newest_adapter *a = userdata;
        struct spool_frame f = { .dev = r->dev, .seq = r->seq, .jws = r->jws, .len = r->len,
                                 .received_at_usec = r->received_at_usec };

        return a->cb(&f, seg_first, a->userdata);
}

int spool_frames_newest_first(struct db *db,
                              int (*cb)(const struct spool_frame *f, bool segment_start, void *userdata),
                              void *userdata) {
        struct newest_adapter a = { .cb = cb, .userdata = userdata };

        if (!db || !log_of(db) || !cb)
                return -EINVAL;
        return seglog_frames_newest_first(log_of(db), newest_one, &a);
}

struct oldest_ctx {
        int64_t id, at;
};

static int oldest_one(const struct seglog_record *r, void *userdata) {
        struct oldest_ctx *c = userdata;

        c->id = r->id;
        c->at = r->received_at_usec;
        return 0;
}

int spool_oldest(struct db *db, int64_t *ret_id, int64_t *ret_received_at_usec) {
        struct oldest_ctx c = {};
        int r;

        if (!db || !log_of(db))
                return -EINVAL;
        r = seglog_read_batch(log_of(db), 1, oldest_one, &c);
        if (r < 0)
                return r;
        if (r == 0)
                return -ENOENT;
        if (ret_id)
                *ret_id = c.id;
        if (ret_received_at_usec)
                *ret_received_at_usec = c.at;
        return 0;
}

/* The frames an older version left in the spool table (schema 5 and before) go into the log
 * once: appended and synced first, then deleted from the table, so that a crash between the two
 * finds them in both and only the ones not yet in the log (ids above its last) are appended. */
static int move_table(struct db *db, struct seq_set *set) {
        struct seglog *l = log_of(db);
        int r, rc;

        for (;;) {
                _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
                _cleanup_free_ struct seglog_record *recs = calloc(SPOOL_MOVE_CHUNK, sizeof *recs);
                _cleanup_free_ uint8_t *buf = NULL;
                size_t n = 0, used = 0, cap = 0, offs[SPOOL_MOVE_CHUNK];

                if (!recs)
                        return -ENOMEM;
                rc = sqlite3_prepare_v2(db_handle(db),
                                        "SELECT id, dev, seq, received_at_usec, jws FROM spool WHERE id > ?1 ORDER BY id "
                                        "LIMIT ?2",
                                        -1, &s, NULL);
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_int64(s, 1, seglog_last_id(l));
                if (rc == SQLITE_OK)
                        rc = sqlite3_bind_int64(s, 2, SPOOL_MOVE_CHUNK);
                if (rc != SQLITE_OK)
                        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees recs */
                        return db_errno(rc);
                /* The blobs are copied: SQLite's buffers last only until the next step. */
                while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                        const char *dev = (const char *) sqlite3_column_text(s, 1);
                        const void *jws = sqlite3_column_blob(s, 4);
                        size_t len = (size_t) sqlite3_column_bytes(s, 4);
                        struct seglog_record *x = &recs[n];

                        if (!frame_fields_valid(dev, sqlite3_column_int64(s, 2), jws, len, &r))
                                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees recs */
                                return -EUCLEAN;
                        if (used + len > cap) {
                                size_t c = cap ? cap : 65536;
                                while (c < used + len)
                                        c *= 2;
                                uint8_t *t = realloc(buf, c);
                                if (!t)
                                        return -ENOMEM;
                                buf = t;
                                cap = c;
                        }
                        /* len > 0 (frame_fields_valid), so buf was allocated above:
                         * NOLINTNEXTLINE(clang-analyzer-core.NonNullParamChecker) */
                        memcpy(buf + used, jws, len);
                        *x = (struct seglog_record){ .type = SEGLOG_FRAME, .id = sqlite3_column_int64(s, 0),
                                                     .seq = sqlite3_column_int64(s, 2),
                                                     .received_at_usec = sqlite3_column_int64(s, 3),
                                                     .len = len };
                        offs[n] = used;
                        if (x->received_at_usec < 0)
                                x->received_at_usec = 0;
                        memcpy(x->dev, dev, strlen(dev) + 1);
                        used += len;
                        n++;
                }
                if (rc != SQLITE_DONE)
                        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees buf */
                        return db_errno(rc);
                if (n == 0)
                        break;
                for (size_t i = 0; i < n; i++) {
                        recs[i].jws = buf + offs[i];
                        r = seq_take(recs[i].dev, recs[i].seq, set);
                        if (r < 0)
                                return r;
                }
                r = seglog_append(l, recs, n);
                if (r < 0)
                        return r;
        }
        r = seglog_sync(l);
        if (r < 0)
                return r;
        rc = sqlite3_exec(db_handle(db), "DELETE FROM spool", NULL, NULL, NULL);
        return rc == SQLITE_OK ? 0 : db_errno(rc);
}

/* The closed segments' summaries, by name id (spool_segments, migration 7). */
static int summaries_load(struct db *db, struct seglog_summary **ret, size_t *ret_n) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        _cleanup_free_ struct seglog_summary *v = NULL;
        size_t n = 0, cap = 0;
        int rc;

        rc = sqlite3_prepare_v2(db_handle(db),
                                "SELECT id, first_id, last_id, frames, bytes, size, cursor FROM spool_segments ORDER BY id",
                                -1, &s, NULL);
        if (rc != SQLITE_OK)
                return db_errno(rc);
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                if (n == cap) {
                        size_t c = cap ? cap * 2 : 64;
                        struct seglog_summary *t = reallocarray(v, c, sizeof *t);
                        if (!t)
                                return -ENOMEM;
                        v = t;
                        cap = c;
                }
                v[n++] = (struct seglog_summary){ .name_id = sqlite3_column_int64(s, 0),
                                                  .first_id = sqlite3_column_int64(s, 1),
                                                  .last_id = sqlite3_column_int64(s, 2),
                                                  .frames = (uint64_t) sqlite3_column_int64(s, 3),
                                                  .bytes = (uint64_t) sqlite3_column_int64(s, 4),
                                                  .size = (uint64_t) sqlite3_column_int64(s, 5),
                                                  .cursor = sqlite3_column_int64(s, 6) };
        }
        if (rc != SQLITE_DONE)
                return db_errno(rc);
        *ret = TAKE_PTR(v);
        *ret_n = n;
        return 0;
}

/* Summaries of segments that are gone (unlinked after a crash between the retiring commit and
 * the unlink cannot be: the summary goes first; a state directory put back from elsewhere, a
 * file removed by hand) go before any segment is made, so that none stands for a new segment of
 * the same name (ids start again from the newest segment left). */
static int summaries_prune(struct db *db, const struct seglog_summary *v, size_t n) {
        bool open = false;
        int r = 0;

        for (size_t i = 0; r >= 0 && i < n; i++) {
                if (seglog_has_segment(log_of(db), v[i].name_id))
                        continue;
                if (!open) {
                        r = db_begin(db);
                        open = r >= 0;
                }
                if (r >= 0)
                        r = summary_delete(db, v[i].name_id);
        }
        if (open && r >= 0)
                r = db_commit(db);
        if (r < 0)
                (void) db_rollback(db);
        return r;
}

int spool_open(struct db *db, char **ret_error) {
        struct db_spool *sp;
        const char *state_dir;
        struct seglog_found found = {};
        struct seq_set set = {};
        _cleanup_free_ struct seglog_summary *sums = NULL;
        size_t n_sums = 0;
        int r;

        if (!db)
                return -EINVAL;
        sp = db_spool(db);
        if (sp->log)
                return -EALREADY;
        state_dir = db_state_dir(db);
        /* Without them (a damaged database: the start says so where it reads the tables, at
         * the registry), every segment is read, as before summaries. */
        r = summaries_load(db, &sums, &n_sums);
        if (r < 0)
                n_sums = 0; /* sums untouched: NULL */
        /* One pass over the segments that have no summary (normally only the newest): the
         * counts, the checks, each bulb's newest seq; the others' seqs are in bulb_seqs. */
        r = seglog_open(state_dir, SPOOL_SEGMENT_MAX, 0, seq_take, &set, sums, n_sums, &sp->log, &found, ret_error);
        if (r < 0) {
                seq_set_free(&set);
                return r;
        }
        /* A failure is the database's, said where the start reads its tables (the registry);
         * a summary left behind is replaced when a segment of its name gets its own. */
        (void) summaries_prune(db, sums, n_sums);
        /* Library code does not log: what the scan found is for hub.c to say (spool_found()). */
        sp->found = found;
        r = move_table(db, &set);
        if (r < 0) {
                seq_set_free(&set);
                return set_error_message(ret_error, r, "cannot move the spool table's frames into %s/spool: %s",
                                         state_dir, strerror(-r));
        }
        free(set.slots);
        sp->open_seqs = set.m;
        sp->n_open_seqs = set.n;
        sp->open_seqs_valid = true;
        db_spool_raise_id(db, seglog_last_id(sp->log));
        return 0;
}

void spool_found(struct db *db, struct seglog_found *ret) {
        *ret = db_spool(db)->found;
}

int spool_moved_aside_count(struct db *db, uint64_t *ret) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        int rc;

        if (!db)
                return -EINVAL;
        s = db_stmt(db, DB_STMT_MOVED_ASIDE_COUNT);
        rc = sqlite3_step(s);
        if (rc != SQLITE_ROW)
                return db_errno(rc);
        *ret = (uint64_t) sqlite3_column_int64(s, 0);
        return 0;
}
