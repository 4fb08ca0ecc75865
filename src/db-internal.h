/* SPDX-License-Identifier: MIT */
/* Private to the database modules (db.c, registry.c, spool.c, commands.c): the statements of the frame
 * path, prepared once when the database is opened and reused for every frame. */
#pragma once

#include <sqlite3.h>

#include "iothub/db.h"
#include "iothub/seglog.h"

enum db_stmt {
        DB_STMT_BEGIN,
        DB_STMT_COMMIT,
        DB_STMT_ROLLBACK,
        DB_STMT_BULB_SET_SEQ, /* ?1 seq, ?2 id; only moves forward, only for an enrolled bulb */
        DB_STMT_MOVED_ASIDE_INSERT, /* ?1 dev, ?2 seq, ?3 received_at_usec, ?4 jws, ?5 moved_at, ?6 status, ?7 reason */
        DB_STMT_MOVED_ASIDE_COUNT,
        DB_STMT_META_GET, /* ?1 key -> value */
        DB_STMT_META_SET, /* ?1 key, ?2 value */
        DB_STMT_CMD_INSERT, /* ?1 id, ?2 dev, ?3 state, ?4 jws, ?5 exp, ?6 detail, ?7 received_at,
                             * ?8 delivered_at, ?9 done_at, ?10 reported */
        DB_STMT_CMD_UPDATE, /* ?1 id, ?2 state, ?3 delivered_at, ?4 done_at, ?5 detail, ?6 reported */
        DB_STMT_CMD_EXISTS, /* ?1 id -> 1 */
        DB_STMT_CMD_LOAD,   /* ?1 limit -> the columns of the INSERT, not yet fully reported, oldest first */
        DB_STMT_CMD_PRUNE,  /* ?1 done before (Unix s), ?2 how many reported rows to keep at most */
        DB_STMT_SEGMENT_SET,    /* ?1 name id, ?2 first_id, ?3 last_id, ?4 frames, ?5 bytes, ?6 size, ?7 cursor */
        DB_STMT_SEGMENT_DELETE, /* ?1 name id */
        _DB_STMT_MAX,
};

/* The cached statement, reset and with no bindings. Never NULL on an open database. Reset it
 * after use, best with _cleanup_db_stmt_reset_, so that it holds no lock and no pointer into
 * the caller's buffers. */
sqlite3_stmt *db_stmt(struct db *db, enum db_stmt s);

/* The id of the next spooled frame: one more than any id this connection handed out or found
 * when it opened, so that no id comes back while the cloud may still answer for it (frames
 * dropped at the cap or rolled back leave gaps, which is fine). */
int64_t db_spool_next_id(struct db *db);
/* The last id db_spool_next_id() handed out (0: none yet). */
int64_t db_spool_last_id(struct db *db);

static inline void db_stmt_resetp(sqlite3_stmt **s) {
        if (*s) {
                (void) sqlite3_reset(*s);
                (void) sqlite3_clear_bindings(*s);
        }
}
#define _cleanup_db_stmt_reset_ _cleanup_(db_stmt_resetp)

DEFINE_TRIVIAL_CLEANUP_FUNC(sqlite3_stmt *, sqlite3_finalize);

/* The spool's state kept with the connection (spool.c's): the segment log, and the segment whose
 * bulbs' seqs were stored and that waits for that commit's sync before it is unlinked. */
struct db_spool {
        struct seglog *log;
        struct db_sync_wait *retire_wait;
        /* Closed segments' summaries (spool_segments): the sync awaited for the hand-overs up to
         * summary_token (seglog_summary_pending()); summary_ready once it completed and the
         * summaries wait for a moment outside a transaction to be stored. */
        struct db_sync_wait *summary_wait;
        uint64_t summary_token;
        bool summary_ready;
        struct seglog_found found; /* what the log's start found, for hub.c to say (spool_found()) */
        /* Each bulb's newest seq in the segments, gathered by the open's scan for the first
         * spool_max_seqs() (spool.c's struct seq_max). */
        void *open_seqs;
        size_t n_open_seqs;
        bool open_seqs_valid;
};
struct db_spool *db_spool(struct db *db);

/* The state directory the database was opened in. */
const char *db_state_dir(struct db *db);

/* Raises the spool's id counter to at least id (the segment log's last id at open). */
void db_spool_raise_id(struct db *db, int64_t id);
