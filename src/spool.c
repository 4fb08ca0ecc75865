/* SPDX-License-Identifier: MIT */
/* The spool: accepted frames, byte for byte as the bulb signed them (the cloud verifies the
 * bulb's own signature, PROTOCOL.md 3), until the cloud acknowledges them. */
#include <limits.h>

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

/* Steps a DELETE ... RETURNING length(jws) statement, summing what it removed. */
static int step_deleted(sqlite3_stmt *s, uint64_t *ret_count, uint64_t *ret_bytes) {
        uint64_t count = 0, bytes = 0;
        int rc;

        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                count++;
                bytes += (uint64_t) sqlite3_column_int64(s, 0);
        }
        if (rc != SQLITE_DONE)
                return db_errno(rc);
        if (ret_count)
                *ret_count = count;
        if (ret_bytes)
                *ret_bytes = bytes;
        return 0;
}

int spool_delete(struct db *db, int64_t first_id, int64_t last_id, uint64_t *ret_count, uint64_t *ret_bytes) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        int rc;

        if (!db || first_id > last_id)
                return -EINVAL;
        s = db_stmt(db, DB_STMT_SPOOL_DELETE);
        if ((rc = sqlite3_bind_int64(s, 1, first_id)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 2, last_id)) != SQLITE_OK)
                return db_errno(rc);
        return step_deleted(s, ret_count, ret_bytes);
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
        return step_deleted(s, ret_count, ret_bytes);
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
