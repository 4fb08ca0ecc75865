/* SPDX-License-Identifier: MIT */
/* The spool: accepted frames, byte for byte as the bulb signed them (the cloud verifies the
 * bulb's own signature, PROTOCOL.md 3), until the cloud acknowledges them. */
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "db-internal.h"
#include "iothub/frame.h"
#include "iothub/spool.h"

int spool_append(struct db *db, const char *dev, int64_t seq, const uint8_t *jws, size_t len,
                 int64_t received_at_usec) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        int rc;

        if (!db || !dev || !device_id_is_valid(dev, strnlen(dev, DEVICE_ID_MAX + 1)) || !jws || len == 0)
                return -EINVAL;
        if (seq < 1 || seq > FRAME_SEQ_MAX)
                return -ERANGE;
        if (len > FRAME_MAX_BYTES_LIMIT)
                return -EFBIG;

        s = db_stmt(db, DB_STMT_SPOOL_INSERT);
        /* SQLITE_STATIC: the statement is stepped and reset (bindings cleared) before this
         * returns, so SQLite never keeps a pointer into the caller's buffers. */
        if ((rc = sqlite3_bind_text(s, 1, dev, -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 2, seq)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 3, received_at_usec)) != SQLITE_OK ||
            (rc = sqlite3_bind_blob(s, 4, jws, (int) len, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 5, db_spool_next_id(db))) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        /* No UNIQUE (dev, seq) here (it cost a page write per bulb and commit, see migration 5
         * in db.c): the caller refuses a seq that does not move forward and stores the bulb's
         * newest seq in the same transaction (registry_store_seq()). */
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

int spool_stats(struct db *db, uint64_t *ret_pending, uint64_t *ret_bytes) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        int64_t pending, bytes;
        int rc;

        if (!db)
                return -EINVAL;
        s = db_stmt(db, DB_STMT_SPOOL_STATS);
        rc = sqlite3_step(s);
        if (rc != SQLITE_ROW)
                return rc == SQLITE_DONE ? -EIO : db_errno(rc);
        /* length() of a BLOB reads its size from the record header, not the content. */
        pending = sqlite3_column_int64(s, 0);
        bytes = sqlite3_column_int64(s, 1);
        if (pending < 0 || bytes < 0)
                return -EUCLEAN;
        if (ret_pending)
                *ret_pending = (uint64_t) pending;
        if (ret_bytes)
                *ret_bytes = (uint64_t) bytes;
        return 0;
}

int spool_read_batch(struct db *db, unsigned max, int (*cb)(const struct spool_entry *e, void *userdata),
                     void *userdata) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        int n = 0, rc, r;

        if (!db || !cb || max == 0 || max > INT_MAX)
                return -EINVAL;
        s = db_stmt(db, DB_STMT_SPOOL_BATCH);
        rc = sqlite3_bind_int64(s, 1, max);
        if (rc != SQLITE_OK)
                return db_errno(rc);
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                struct spool_entry e = {
                        .id = sqlite3_column_int64(s, 0),
                        .jws = sqlite3_column_blob(s, 2),
                        .len = (size_t) sqlite3_column_bytes(s, 2),
                };
                if (!e.jws)
                        return -EUCLEAN;
                r = cb(&e, userdata);
                if (r < 0)
                        return r;
                n++;
        }
        return rc == SQLITE_DONE ? n : db_errno(rc);
}

/* The newest seq of each bulb among frames leaving the spool. */
struct seq_max {
        char dev[DEVICE_ID_MAX + 1];
        int64_t seq;
};

/* Raises each bulb's stored last seq to the newest of its frames that leave the spool, inside
 * the transaction that deletes them. While a frame is in the spool its (dev, seq) row is the
 * record of its bulb's seq (spool_max_seqs() reads it at start), so the frame path does not
 * write bulb_seqs at every commit (see ingest.c); once it leaves, bulb_seqs must hold it, or a
 * restart would reopen the replay window. The upsert only moves forward. */
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

/* Steps a DELETE ... RETURNING length(jws), dev, seq statement, summing what it removed and
 * moving the seqs of its bulbs forward (seqs_forward()). The caller holds a transaction. */
static int step_deleted(struct db *db, sqlite3_stmt *s, uint64_t *ret_count, uint64_t *ret_bytes) {
        _cleanup_free_ struct seq_max *m = NULL;
        size_t n = 0, cap = 0;
        uint64_t count = 0, bytes = 0;
        int rc, r;

        /* SQLite runs the whole DELETE at the first step and hands out the RETURNING rows from
         * memory, so other statements may run once they are read. */
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                const char *dev = (const char *) sqlite3_column_text(s, 1);
                int64_t seq = sqlite3_column_int64(s, 2);
                size_t i;

                count++;
                bytes += (uint64_t) sqlite3_column_int64(s, 0);
                if (!dev || !device_id_is_valid(dev, strnlen(dev, DEVICE_ID_MAX + 1)))
                        return -EUCLEAN;
                for (i = 0; i < n && !streq(m[i].dev, dev); i++)
                        ;
                if (i == n) {
                        if (n == cap) {
                                size_t c = cap ? cap * 2 : 16;
                                struct seq_max *t = reallocarray(m, c, sizeof *t);
                                if (!t)
                                        return -ENOMEM;
                                m = t;
                                cap = c;
                        }
                        memcpy(m[n].dev, dev, strlen(dev) + 1);
                        m[n++].seq = seq;
                } else if (seq > m[i].seq)
                        m[i].seq = seq;
        }
        if (rc != SQLITE_DONE)
                return db_errno(rc);
        r = seqs_forward(db, m, n);
        if (r < 0)
                return r;
        if (ret_count)
                *ret_count = count;
        if (ret_bytes)
                *ret_bytes = bytes;
        return 0;
}

int spool_delete(struct db *db, int64_t first_id, int64_t last_id, uint64_t *ret_count, uint64_t *ret_bytes) {
        bool own;
        int rc, r;

        if (!db || first_id > last_id)
                return -EINVAL;
        /* The delete and the seqs it moves forward commit together. */
        own = !db_in_transaction(db);
        if (own) {
                r = db_begin(db);
                if (r < 0)
                        return r;
        }
        {
                _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(db, DB_STMT_SPOOL_DELETE);
                if ((rc = sqlite3_bind_int64(s, 1, first_id)) != SQLITE_OK ||
                    (rc = sqlite3_bind_int64(s, 2, last_id)) != SQLITE_OK)
                        r = db_errno(rc);
                else
                        r = step_deleted(db, s, ret_count, ret_bytes);
        }
        if (!own)
                return r;
        if (r >= 0)
                r = db_commit(db);
        if (r < 0 && db_in_transaction(db))
                (void) db_rollback(db);
        return r;
}

int spool_move_aside(struct db *db, int64_t first_id, int64_t last_id, long http_status, const char *reason,
                     uint64_t *ret_count, uint64_t *ret_bytes) {
        int rc, r;

        if (!db || first_id > last_id || !reason)
                return -EINVAL;
        r = db_begin(db);
        if (r < 0)
                return r;
        {
                _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(db, DB_STMT_SPOOL_MOVE_ASIDE);
                if ((rc = sqlite3_bind_int64(s, 1, first_id)) != SQLITE_OK ||
                    (rc = sqlite3_bind_int64(s, 2, last_id)) != SQLITE_OK ||
                    (rc = sqlite3_bind_int64(s, 3, (int64_t) (now_realtime_usec() / 1000000))) != SQLITE_OK ||
                    (rc = sqlite3_bind_int64(s, 4, http_status)) != SQLITE_OK ||
                    (rc = sqlite3_bind_text(s, 5, reason, -1, SQLITE_STATIC)) != SQLITE_OK ||
                    (rc = sqlite3_step(s)) != SQLITE_DONE) {
                        (void) db_rollback(db);
                        return db_errno(rc);
                }
        }
        r = spool_delete(db, first_id, last_id, ret_count, ret_bytes);
        if (r < 0) {
                (void) db_rollback(db);
                return r;
        }
        return db_commit(db);
}

int spool_drop_oldest(struct db *db, unsigned n, uint64_t *ret_count, uint64_t *ret_bytes) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        int rc;

        if (!db || n == 0)
                return -EINVAL;
        s = db_stmt(db, DB_STMT_SPOOL_DROP_OLDEST);
        rc = sqlite3_bind_int64(s, 1, n);
        if (rc != SQLITE_OK)
                return db_errno(rc);
        return step_deleted(db, s, ret_count, ret_bytes);
}

int spool_seqs_store(struct db *db, const char *dev, int64_t seq) {
        struct seq_max m = { .seq = seq };

        if (!db || !dev || !device_id_is_valid(dev, strnlen(dev, DEVICE_ID_MAX + 1)))
                return -EINVAL;
        if (seq < 1 || seq > FRAME_SEQ_MAX)
                return -ERANGE;
        memcpy(m.dev, dev, strlen(dev) + 1);
        return seqs_forward(db, &m, 1);
}

/* meta key: every frame with an id up to this one has its seq in bulb_seqs. */
#define SPOOL_SEQS_MARK "spool_seqs_stored_through_id"

int spool_seqs_mark(struct db *db) {
        char v[24];

        if (!db)
                return -EINVAL;
        (void) snprintf(v, sizeof v, "%" PRId64, db_spool_last_id(db));
        return db_meta_set(db, SPOOL_SEQS_MARK, v);
}

int spool_max_seqs(struct db *db, int (*cb)(const char *dev, int64_t seq, void *userdata), void *userdata) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        _cleanup_free_ char *mark = NULL;
        int64_t after = 0;
        int rc, r;

        if (!db || !cb)
                return -EINVAL;
        /* Once at start, over the frames after the mark only: a range of the rowid, not a scan
         * of the whole spool (it has no index on dev, see migration 5; a full spool of 256 MiB
         * took 0.6 to 1.6 s to scan on x86). Without a mark (the first start since), all. */
        r = db_meta_get(db, SPOOL_SEQS_MARK, &mark);
        if (r < 0 && r != -ENOENT)
                return r;
        if (mark) {
                char *end = NULL;
                errno = 0;
                long long v = strtoll(mark, &end, 10);
                if (errno != 0 || end == mark || *end != '\0' || v < 0)
                        return -EUCLEAN;
                after = (int64_t) v;
        }
        rc = sqlite3_prepare_v2(db_handle(db), "SELECT dev, max(seq) FROM spool WHERE id > ?1 GROUP BY dev", -1, &s,
                                NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(s, 1, after);
        if (rc != SQLITE_OK)
                return db_errno(rc);
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                const char *dev = (const char *) sqlite3_column_text(s, 0);
                int64_t seq = sqlite3_column_int64(s, 1);

                if (!dev || !device_id_is_valid(dev, strnlen(dev, DEVICE_ID_MAX + 1)) || seq < 1 || seq > FRAME_SEQ_MAX)
                        return -EUCLEAN;
                r = cb(dev, seq, userdata);
                if (r < 0)
                        return r;
        }
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

int spool_oldest(struct db *db, int64_t *ret_id, int64_t *ret_received_at_usec) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        int rc;

        if (!db)
                return -EINVAL;
        s = db_stmt(db, DB_STMT_SPOOL_OLDEST);
        rc = sqlite3_step(s);
        if (rc == SQLITE_DONE)
                return -ENOENT;
        if (rc != SQLITE_ROW)
                return db_errno(rc);
        if (ret_id)
                *ret_id = sqlite3_column_int64(s, 0);
        if (ret_received_at_usec)
                *ret_received_at_usec = sqlite3_column_int64(s, 1);
        return 0;
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
