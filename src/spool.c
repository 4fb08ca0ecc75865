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
            (rc = sqlite3_bind_blob(s, 4, jws, (int) len, SQLITE_STATIC)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        /* A second frame with the same (dev, seq) is a UNIQUE clash: -EEXIST. */
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
