/* SPDX-License-Identifier: MIT */
/* The state database: one SQLite file, <state_dir>/iothub.db, in WAL mode. Its schema is
 * versioned with PRAGMA user_version and brought up to date by the migrations below, one
 * transaction for all of them; a database newer than this code is refused, never touched.
 * The statements of the frame path are prepared once here (db-internal.h). */
#include <assert.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "db-internal.h"

#define DB_BUSY_TIMEOUT_MS 5000
/* The page cache, in KiB (negative, as PRAGMA cache_size takes it): 256 KiB instead of SQLite's
 * 2 MiB. The frame path touches the spool's last pages (and bulb_seqs when frames leave the
 * spool); an upload reads pages written a moment ago, which the kernel's page cache holds
 * anyway; the registry is read once at start. The cache only ever grew to its limit, 2 MiB of the daemon's private memory (issue 13,
 * "Memory"); a transaction larger than the cache spills pages into the WAL early, which writes
 * nothing more in the end. */
#define DB_CACHE_SIZE "-256"
/* The syncer checkpoints once the WAL holds this many pages (what wal_autocheckpoint did on the
 * loop's connection, same size: see db_open()). */
#define DB_CHECKPOINT_PAGES 4096

/* Durability off the loop (issue 13): the loop's connection commits with synchronous = NORMAL
 * (a commit writes the WAL, no fsync); this thread fdatasyncs the WAL (an fd of the -wal file:
 * an fsync of any descriptor of an inode syncs it) and checkpoints on a second connection of its
 * own, then tells the loop through an eventfd. Shared fields under mu. */
struct db_syncer {
        pthread_t thread;
        pthread_mutex_t mu;
        pthread_cond_t cond;
        int wal_fd, event_fd;
        sqlite3 *ckpt; /* used by the thread only */
        sd_event_source *source;
        uint64_t requested; /* the newest commit generation to make durable */
        uint64_t synced;    /* every commit up to this generation is on disk */
        int error;          /* a failed fdatasync (the thread stops syncing), 0: none */
        bool checkpoint, stop;
        bool started; /* thread runs (loop's thread only) */
        /* Segment files of the spool (and its directory) written by commits up to requested,
         * handed over by the loop (seglog_sync_handoff()): synced with the WAL, then closed. */
        int *seg_fds;
        size_t n_seg_fds, cap_seg_fds;
};

/* One owner waiting for its commits to be on disk (db_sync_wait()); loop's thread only. */
struct db_sync_wait {
        uint64_t gen; /* the commit generation that must be synced */
        db_sync_wait_t cb;
        void *userdata;
        struct db_sync_wait *next, **prevp;
};

struct db {
        sqlite3 *sqlite;
        sqlite3_stmt *stmts[_DB_STMT_MAX];
        char *state_dir, *path;
        dev_t dev; /* the file opened, to notice that its name went away (db_check_file()) */
        ino_t ino;
        int64_t spool_last_id; /* the largest spool id handed out or found (migration 5) */
        /* Commits on this connection so far (sqlite3_wal_hook() counts them). */
        uint64_t commit_gen;
        struct db_syncer *syncer; /* NULL: commits are durable when they return (FULL) */
        sd_event *sync_event;     /* what db_sync_start() was given, for db_restore_file() */
        db_synced_t sync_cb;
        void *sync_userdata;
        /* db_sync_wait() owners, in the order they came; they survive db_restore_file(). */
        struct db_sync_wait *waits;
        int sync_error; /* the last syncer's failed fdatasync, for later waits; 0: none */
        struct db_spool spool; /* spool.c's: the segment log */
};

/* Migrations: entry i brings the schema from version i to i+1. Append only; never edit one
 * that has shipped. STRICT tables (SQLite 3.37) make a type mistake an error, not a silently
 * converted value. */
static const char *const migrations[] = {
        /* 1: enrolled bulbs, the spool, and a place for small settings. */
        "CREATE TABLE bulbs ("
        "  id TEXT PRIMARY KEY,"
        "  alg TEXT NOT NULL,"
        "  pubkey_pem TEXT NOT NULL,"
        "  revoked INTEGER NOT NULL DEFAULT 0,"
        "  last_seq INTEGER NOT NULL DEFAULT 0,"
        "  enrolled_at INTEGER NOT NULL,"
        "  revoked_at INTEGER"
        ") STRICT;"
        "CREATE TABLE spool ("
        "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
        "  dev TEXT NOT NULL,"
        "  seq INTEGER NOT NULL,"
        "  received_at_usec INTEGER NOT NULL,"
        "  jws BLOB NOT NULL,"
        "  UNIQUE (dev, seq)"
        ") STRICT;"
        "CREATE TABLE meta ("
        "  key TEXT PRIMARY KEY,"
        "  value TEXT"
        ") STRICT;",
        /* 2: batches the cloud refused for good (a 4xx other than 401, 408, 429), kept for the
         * operator instead of being retried in a loop or thrown away (PROTOCOL.md 3). */
        "CREATE TABLE moved_aside ("
        "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
        "  dev TEXT NOT NULL,"
        "  seq INTEGER NOT NULL,"
        "  received_at_usec INTEGER NOT NULL,"
        "  jws BLOB NOT NULL,"
        "  moved_at INTEGER NOT NULL,"
        "  http_status INTEGER NOT NULL,"
        "  reason TEXT NOT NULL"
        ") STRICT;",
        /* 3: commands from the cloud (PROTOCOL.md 2 and 3). One row per command id the hub took
         * (published or rejected), so that a command delivered again (delivery is at least once)
         * is recognised after a restart too; the JWS exactly as signed and published; and how far
         * its outcome was reported: reported 0 nothing yet, 1 "delivered", 2 the final result.
         * dev is '' when the cloud sent no valid device id; jws is NULL for a command that was
         * never signed (rejected, or expired before it could go out). Times are Unix seconds. */
        "CREATE TABLE commands ("
        "  id TEXT PRIMARY KEY,"
        "  dev TEXT NOT NULL,"
        "  state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'acked', 'failed', 'expired', "
        "'rejected')),"
        "  jws TEXT,"
        "  exp INTEGER NOT NULL,"
        "  detail TEXT,"
        "  received_at INTEGER NOT NULL,"
        "  delivered_at INTEGER,"
        "  done_at INTEGER,"
        "  reported INTEGER NOT NULL DEFAULT 0 CHECK (reported BETWEEN 0 AND 2)"
        ") STRICT;",
        /* 4: security events not yet taken by the cloud (PROTOCOL.md 5, src/events.c): one row per
         * aggregated event of an interval, at most EVENTS_SPOOL_MAX rows (the oldest are dropped
         * and counted). reason and dev are NULL when the event has none. */
        "CREATE TABLE events ("
        "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
        "  at INTEGER NOT NULL,"
        "  type TEXT NOT NULL,"
        "  reason TEXT,"
        "  dev TEXT,"
        "  count INTEGER NOT NULL CHECK (count > 0)"
        ") STRICT;",
        /* 5: fewer pages per commit (issue 13). Each commit rewrote, besides the spool's last
         * leaf page, one page of the UNIQUE (dev, seq) index per bulb in the batch (the index is
         * in bulb order, the inserts in time order, so every bulb's frame lands on another index
         * page), up to one page of bulbs per bulb for last_seq (rows of about 250 bytes, 16 to a
         * 4 KiB page: the PEM key makes them wide) and the sqlite_sequence page of AUTOINCREMENT;
         * each such page is a 4 KiB WAL frame, written again by the checkpoint. Measured
         * (tests/bench/README.md, "Issue 13 on h/spool"): this helps large commits (a backlog:
         * 4.2 -> 2.5x the frame size); a commit of one frame still costs 10 to 13 KB of
         * write_bytes, with or without it.
         * - spool without the index and without AUTOINCREMENT: a commit appends to the table's
         *   last pages only. (dev, seq) is unique without the index: the frame path refuses a
         *   seq at or below the bulb's newest one in memory, which moves ahead frame by frame,
         *   and stores each bulb's newest seq in the same transaction as its frames with an
         *   upsert that only moves forward (DB_STMT_BULB_SET_SEQ; since migration 7, spool.c writes
         *   it from synced segments); a batch in which either
         *   fails is rolled back whole (ingest.c). Ids are handed out by db.c from memory, one
         *   more than any id seen, so that an id is never used twice while a batch of it is in
         *   flight (what AUTOINCREMENT gave, without its page write per commit).
         * - last_seq in a narrow table of its own, WITHOUT ROWID: about 20 bytes a bulb, 200
         *   bulbs on two pages instead of thirteen. Its row is made at enrolment, so that a
         *   frame only updates one in place: first frames inserting rows in random id order
         *   split pages, measured at 24x the frame size for two frames from each of 5,000 new
         *   bulbs. */
        "CREATE TABLE bulb_seqs ("
        "  id TEXT PRIMARY KEY,"
        "  last_seq INTEGER NOT NULL"
        ") STRICT, WITHOUT ROWID;"
        "INSERT INTO bulb_seqs (id, last_seq) SELECT id, last_seq FROM bulbs;"
        "ALTER TABLE bulbs DROP COLUMN last_seq;"
        "CREATE TABLE spool_v4 ("
        "  id INTEGER PRIMARY KEY,"
        "  dev TEXT NOT NULL,"
        "  seq INTEGER NOT NULL,"
        "  received_at_usec INTEGER NOT NULL,"
        "  jws BLOB NOT NULL"
        ") STRICT;"
        "INSERT INTO spool_v4 (id, dev, seq, received_at_usec, jws) "
        "  SELECT id, dev, seq, received_at_usec, jws FROM spool ORDER BY id;"
        "DROP TABLE spool;"
        "ALTER TABLE spool_v4 RENAME TO spool;",
        /* 6: a frame is in moved_aside once. spool_move_aside() commits the copy before the
         * frames' cursor record is on disk (a crash between the two keeps them in both, never in
         * neither), so a crash there moved them aside again at the cloud's next answer: a second
         * row. A frame is (dev, seq): the frame path accepts a seq only above the bulb's last
         * one, kept across a restart, a revocation and a new enrolment (registry.c); the spool id
         * is not, once every segment is gone (ids start again from the newest one left). The
         * copies a crash made before this are removed, the first one kept. */
        "DELETE FROM moved_aside WHERE id NOT IN (SELECT MIN(id) FROM moved_aside GROUP BY dev, seq);"
        "CREATE UNIQUE INDEX moved_aside_frame ON moved_aside (dev, seq);",
        /* 7: what each closed segment of the spool holds (seglog.h, struct seglog_summary; id is
         * the segment's name id), so that a start reads only the segments without one instead of
         * all of them (a full 256 MiB spool took 0.13 s from the page cache, 0.54 s from disk on
         * a PC, seconds on an SD card). A row is written, with the segment's bulbs' newest seqs
         * in bulb_seqs in the same transaction, only after a sync covered the segment's last
         * bytes (the WAL is synced before the segments: a row must never be on disk before its
         * segment is); it goes in the transaction that retires the segment. A row whose size is
         * not the file's is not used. */
        "CREATE TABLE spool_segments ("
        "  id INTEGER PRIMARY KEY,"
        "  first_id INTEGER NOT NULL,"
        "  last_id INTEGER NOT NULL,"
        "  frames INTEGER NOT NULL,"
        "  bytes INTEGER NOT NULL,"
        "  size INTEGER NOT NULL,"
        "  cursor INTEGER NOT NULL"
        ") STRICT;",
};
#define DB_SCHEMA_VERSION ((int) ELEMENTSOF(migrations))

static const char *const stmt_sql[_DB_STMT_MAX] = {
        [DB_STMT_BEGIN] = "BEGIN IMMEDIATE",
        [DB_STMT_COMMIT] = "COMMIT",
        [DB_STMT_ROLLBACK] = "ROLLBACK",
        /* Only for an enrolled bulb (the SELECT finds none otherwise: no row, no change), and
         * only forward. */
        [DB_STMT_BULB_SET_SEQ] = "INSERT INTO bulb_seqs (id, last_seq) SELECT id, ?1 FROM bulbs WHERE id = ?2 "
                                 "ON CONFLICT (id) DO UPDATE SET last_seq = excluded.last_seq "
                                 "WHERE last_seq < excluded.last_seq",
        [DB_STMT_MOVED_ASIDE_INSERT] =
                "INSERT INTO moved_aside (dev, seq, received_at_usec, jws, moved_at, http_status, reason) "
                "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (dev, seq) DO NOTHING",
        [DB_STMT_MOVED_ASIDE_COUNT] = "SELECT COUNT(*) FROM moved_aside",
        [DB_STMT_META_GET] = "SELECT value FROM meta WHERE key = ?1",
        [DB_STMT_META_SET] = "INSERT INTO meta (key, value) VALUES (?1, ?2) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [DB_STMT_CMD_INSERT] = "INSERT INTO commands (id, dev, state, jws, exp, detail, received_at, "
                               "delivered_at, done_at, reported) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        [DB_STMT_CMD_UPDATE] = "UPDATE commands SET state = ?2, delivered_at = ?3, done_at = ?4, detail = ?5, "
                               "reported = ?6 WHERE id = ?1",
        [DB_STMT_CMD_EXISTS] = "SELECT 1 FROM commands WHERE id = ?1",
        [DB_STMT_CMD_LOAD] = "SELECT id, dev, state, jws, exp, detail, received_at, delivered_at, done_at, reported "
                             "FROM commands WHERE reported < 2 ORDER BY rowid LIMIT ?1",
        [DB_STMT_SEGMENT_SET] = "INSERT OR REPLACE INTO spool_segments (id, first_id, last_id, frames, bytes, size, "
                                "cursor) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        [DB_STMT_SEGMENT_DELETE] = "DELETE FROM spool_segments WHERE id = ?1",
        [DB_STMT_CMD_PRUNE] = "DELETE FROM commands WHERE reported = 2 AND (done_at < ?1 OR id NOT IN (SELECT id "
                              "FROM commands WHERE reported = 2 ORDER BY done_at DESC, rowid DESC LIMIT ?2))",
};

/* SQLite result codes as errnos, for every module on the database. Extended codes are on
 * (SQLITE_OPEN_EXRESCODE), so the primary code is the low byte:
 *   BUSY, LOCKED              -EBUSY   another connection holds the lock past busy_timeout
 *   NOMEM, IOERR_NOMEM        -ENOMEM
 *   FULL                      -ENOSPC  the disk (or the state directory's quota) is full
 *   CONSTRAINT                -EEXIST  a UNIQUE or PRIMARY KEY clash (a duplicate);
 *                                      NOT NULL, CHECK and the like: -EINVAL
 *   READONLY, PERM, AUTH      -EACCES
 *   CORRUPT, NOTADB           -EUCLEAN "structure needs cleaning": the file is damaged or
 *                                      is not a database; only an operator can repair it
 *   CANTOPEN                  -ENOENT  (db_open() reports the exact errno of the failure)
 *   TOOBIG                    -EFBIG
 *   anything else             -EIO
 * SQLITE_OK, SQLITE_ROW and SQLITE_DONE are 0. */
int db_errno(int sqlite_rc) {
        switch (sqlite_rc) {
        case SQLITE_OK:
        case SQLITE_ROW:
        case SQLITE_DONE:
                return 0;
        case SQLITE_IOERR_NOMEM:
                return -ENOMEM;
        case SQLITE_CONSTRAINT_NOTNULL:
        case SQLITE_CONSTRAINT_CHECK:
        case SQLITE_CONSTRAINT_DATATYPE:
        case SQLITE_CONSTRAINT_FOREIGNKEY:
        case SQLITE_CONSTRAINT_TRIGGER:
        case SQLITE_CONSTRAINT_FUNCTION:
                return -EINVAL;
        }
        switch (sqlite_rc & 0xff) {
        case SQLITE_BUSY:
        case SQLITE_LOCKED:
                return -EBUSY;
        case SQLITE_NOMEM:
                return -ENOMEM;
        case SQLITE_FULL:
                return -ENOSPC;
        case SQLITE_CONSTRAINT:
                return -EEXIST;
        case SQLITE_READONLY:
        case SQLITE_PERM:
        case SQLITE_AUTH:
                return -EACCES;
        case SQLITE_CORRUPT:
        case SQLITE_NOTADB:
                return -EUCLEAN;
        case SQLITE_CANTOPEN:
                return -ENOENT;
        case SQLITE_TOOBIG:
                return -EFBIG;
        default:
                return -EIO;
        }
}

/* The errno of a failed call on this connection: for CANTOPEN and I/O errors, the system's
 * own errno when SQLite kept it, which says more than db_errno() can from the code alone. */
static int db_errno_of(sqlite3 *s, int rc) {
        int e = s ? sqlite3_system_errno(s) : 0;

        if (((rc & 0xff) == SQLITE_CANTOPEN || (rc & 0xff) == SQLITE_IOERR) && e > 0)
                return -e;
        return db_errno(rc);
}

static void db_syncer_free(struct db *db, bool report);
static int db_syncer_new(struct db *db);
static void db_sync_waits_report(struct db *db, uint64_t gen, int error);

void db_close(struct db *db) {
        if (!db)
                return;
        db_syncer_free(db, false);
        /* The spool's state (spool.c's, opened by spool_open()). */
        db_sync_wait_cancel(db->spool.retire_wait);
        db_sync_wait_cancel(db->spool.summary_wait);
        free(db->spool.open_seqs);
        seglog_close(db->spool.log);
        for (size_t i = 0; i < _DB_STMT_MAX; i++)
                (void) sqlite3_finalize(db->stmts[i]);
        /* Rolls back an open transaction; with no statements left, it cannot fail with BUSY. */
        (void) sqlite3_close(db->sqlite);
        free(db->state_dir);
        free(db->path);
        free(db);
}

static int db_exec(struct db *db, const char *sql) {
        return db_errno(sqlite3_exec(db->sqlite, sql, NULL, NULL, NULL));
}

static int db_pragma_int(struct db *db, const char *sql, int *ret) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db->sqlite, sql, -1, &s, NULL);
        if (rc != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        if (rc != SQLITE_ROW)
                return rc == SQLITE_DONE ? -EIO : db_errno(rc);
        *ret = sqlite3_column_int(s, 0);
        return 0;
}

/* The spool's largest id: the rowid B-tree's last entry, one page per level. */
static int db_spool_max_id(struct db *db, int64_t *ret) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db->sqlite, "SELECT COALESCE(MAX(id), 0) FROM spool", -1, &s, NULL);
        if (rc != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        if (rc != SQLITE_ROW)
                return rc == SQLITE_DONE ? -EIO : db_errno(rc);
        *ret = sqlite3_column_int64(s, 0);
        return 0;
}

static int db_journal_wal(struct db *db) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        const char *mode;
        int rc;

        rc = sqlite3_prepare_v2(db->sqlite, "PRAGMA journal_mode = WAL", -1, &s, NULL);
        if (rc != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        if (rc != SQLITE_ROW)
                return rc == SQLITE_DONE ? -EIO : db_errno(rc);
        mode = (const char *) sqlite3_column_text(s, 0);
        return mode && strcasecmp(mode, "wal") == 0 ? 0 : -EIO;
}

static int db_check_version(struct db *db, const char *path, int *ret_version, char **ret_error) {
        int r, version = 0;

        r = db_pragma_int(db, "PRAGMA user_version", &version);
        if (r < 0)
                return set_error_message(ret_error, r, "%s: cannot read the schema version: %s", path,
                                 sqlite3_errmsg(db->sqlite));
        if (version < 0 || version > DB_SCHEMA_VERSION)
                return set_error_message(ret_error, -EPROTO,
                                 "%s: schema version %d is newer than this iothubd knows (%d); refusing to "
                                 "touch it (was the package downgraded?)",
                                 path, version, DB_SCHEMA_VERSION);
        *ret_version = version;
        return 0;
}

static int db_migrate(struct db *db, const char *path, char **ret_error) {
        char sql[64];
        int r, version = 0;

        /* BEGIN IMMEDIATE first and the version read again inside: two processes opening a
         * fresh database at once must not both run migration 1. */
        r = db_exec(db, "BEGIN IMMEDIATE");
        if (r < 0)
                return set_error_message(ret_error, r, "%s: %s", path, sqlite3_errmsg(db->sqlite));
        r = db_check_version(db, path, &version, ret_error);
        if (r < 0)
                goto fail;
        for (int v = version; v < DB_SCHEMA_VERSION; v++) {
                r = db_exec(db, migrations[v]);
                if (r < 0) {
                        (void) set_error_message(ret_error, r, "%s: migration to schema version %d failed: %s", path,
                                         v + 1, sqlite3_errmsg(db->sqlite));
                        goto fail;
                }
        }
        /* PRAGMA takes no parameters; the value is our own constant. */
        (void) snprintf(sql, sizeof sql, "PRAGMA user_version = %d", DB_SCHEMA_VERSION);
        r = version < DB_SCHEMA_VERSION ? db_exec(db, sql) : 0;
        if (r >= 0)
                r = db_exec(db, "COMMIT");
        if (r < 0) {
                (void) set_error_message(ret_error, r, "%s: cannot record schema version %d: %s", path,
                                 DB_SCHEMA_VERSION, sqlite3_errmsg(db->sqlite));
                goto fail;
        }
        return 0;

fail:
        (void) db_exec(db, "ROLLBACK");
        return r;
}

/* Creates the file if needed with mode 0600 before SQLite sees it (SQLite would create it
 * 0644 & ~umask, and its -wal and -shm files copy the database's mode), refuses anything but
 * a regular file, and tightens a file that is readable by others. The descriptor is closed
 * before SQLite opens the file: closing any descriptor of a file drops the process's POSIX
 * locks on it, SQLite's included. */
static int db_create_file(const char *path, char **ret_error) {
        _cleanup_close_ int fd = -1;
        struct stat st;

        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0600);
        if (fd < 0)
                return set_error_message(ret_error, -errno, "cannot open %s: %s", path, strerror(errno));
        if (fstat(fd, &st) < 0)
                return set_error_message(ret_error, -errno, "cannot stat %s: %s", path, strerror(errno));
        if (!S_ISREG(st.st_mode))
                return set_error_message(ret_error, -EBADF, "%s is not a regular file", path);
        if ((st.st_mode & 07077) != 0 && fchmod(fd, 0600) < 0)
                return set_error_message(ret_error, -errno, "cannot make %s private (mode 0600): %s", path,
                                 strerror(errno));
        return 0;
}

int db_open(const char *state_dir, struct db **ret, char **ret_error) {
        _cleanup_(db_closep) struct db *db = NULL;
        _cleanup_free_ char *path = NULL;
        int r, rc, version = 0;

        if (!state_dir || !ret)
                return -EINVAL;
        if (asprintf(&path, "%s/%s", state_dir, DB_FILE_NAME) < 0)
                return -ENOMEM;
        r = db_create_file(path, ret_error);
        if (r < 0)
                return r;

        db = calloc(1, sizeof *db);
        if (!db)
                return -ENOMEM;
        db->state_dir = strdup(state_dir);
        if (!db->state_dir)
                /* cppcheck-suppress memleak ; freed by _cleanup_(db_closep) */
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees db */
                return -ENOMEM;
        rc = sqlite3_open_v2(path, &db->sqlite,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOFOLLOW | SQLITE_OPEN_EXRESCODE, NULL);
        if (rc != SQLITE_OK)
                return set_error_message(ret_error, db_errno_of(db->sqlite, rc), "cannot open %s: %s", path,
                                 db->sqlite ? sqlite3_errmsg(db->sqlite) : sqlite3_errstr(rc));

        /* Defensive mode: no SQL can corrupt the file on purpose (writable_schema and the like),
         * and no function in the schema runs with our privileges. */
        if (sqlite3_db_config(db->sqlite, SQLITE_DBCONFIG_DEFENSIVE, 1, NULL) != SQLITE_OK ||
            sqlite3_db_config(db->sqlite, SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0, NULL) != SQLITE_OK)
                return set_error_message(ret_error, -EIO, "%s: %s", path, sqlite3_errmsg(db->sqlite));
        (void) sqlite3_busy_timeout(db->sqlite, DB_BUSY_TIMEOUT_MS);

        /* Before anything is written: a database from a newer version is left alone. This is
         * also the first read, where a file that is no database shows (-EUCLEAN). */
        r = db_check_version(db, path, &version, ret_error);
        if (r < 0)
                return r;

        /* WAL: readers never block the writer and a commit is one append (plus fsync). The
         * pragma answers with the mode now in force. */
        r = db_journal_wal(db);
        if (r < 0)
                return set_error_message(ret_error, r, "%s: cannot enable WAL: %s", path,
                                 r == -EIO ? "journal mode unchanged" : sqlite3_errmsg(db->sqlite));
        /* FULL: a commit is durable when it returns, which is what "accepted" means.
         * secure_delete FAST: Debian builds SQLite with SECURE_DELETE on, which zeroes every
         * deleted row in place: each batch the cloud took rewrote the pages of its frames once
         * more (WAL and checkpoint), for content that was on its way to the cloud anyway in a
         * file only the daemon can read. FAST zeroes only inside pages that are written anyway
         * and drops freed pages without writing them.
         * wal_autocheckpoint 4096 pages (16 MiB) instead of 1000: a checkpoint copies the newest
         * version of each page once, so pages that every commit rewrites (page 1, the freelist
         * trunk, the spool's interior pages, bulb_seqs, and spool pages that uploads free and
         * new frames reuse) reach the database file a quarter as often. Measured in the relay
         * bench, same machine, back to back (write_bytes per frame / frame size): 5,000/s paced
         * 4.2 -> 3.6, unpaced 4.5 -> 2.5. journal_size_limit: the WAL file is cut back to 16 MiB
         * after a checkpoint that found it larger (a big transaction grows it). */
        r = db_exec(db, "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA secure_delete = FAST; "
                        "PRAGMA wal_autocheckpoint = 4096; PRAGMA journal_size_limit = 16777216; "
                        "PRAGMA cache_size = " DB_CACHE_SIZE);
        if (r < 0)
                return set_error_message(ret_error, r, "%s: %s", path, sqlite3_errmsg(db->sqlite));

        r = db_migrate(db, path, ret_error);
        if (r < 0)
                return r;

        for (size_t i = 0; i < _DB_STMT_MAX; i++) {
                rc = sqlite3_prepare_v3(db->sqlite, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
                                        &db->stmts[i], NULL);
                if (rc != SQLITE_OK)
                        return set_error_message(ret_error, db_errno(rc), "%s: cannot prepare \"%s\": %s", path,
                                         stmt_sql[i], sqlite3_errmsg(db->sqlite));
        }

        r = db_spool_max_id(db, &db->spool_last_id);
        if (r < 0)
                return set_error_message(ret_error, r, "%s: cannot read the spool: %s", path,
                                 sqlite3_errmsg(db->sqlite));

        /* What was opened under that name (SQLite opened it after db_create_file() made it). */
        struct stat st;
        if (stat(path, &st) < 0)
                return set_error_message(ret_error, -errno, "cannot stat %s: %s", path, strerror(errno));
        db->dev = st.st_dev;
        db->ino = st.st_ino;
        db->path = TAKE_PTR(path);
        *ret = TAKE_PTR(db);
        return 0;
}

const char *db_state_dir(struct db *db) {
        return db->state_dir;
}

int db_check_file(struct db *db) {
        struct stat st;

        if (!db || !db->path)
                return -EINVAL;
        if (stat(db->path, &st) < 0)
                return -errno;
        if (st.st_dev != db->dev || st.st_ino != db->ino)
                return -ESTALE;
        return 0;
}

/* The connection still holds the deleted file (and its -wal) open: SQLite reads it as before.
 * VACUUM INTO writes a consistent copy of it, transactions included, to a new private file,
 * which takes the database's name once it is on disk. Then the connection is closed (which
 * removes the old -wal and -shm by name: before anything new of that name exists) and the
 * restored file opened as db_open() does. */
int db_restore_file(struct db *db, char **ret_error) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        _cleanup_(db_closep) struct db *n = NULL;
        _cleanup_free_ char *tmp = NULL;
        _cleanup_close_ int fd = -1, dfd = -1;
        struct db old;
        int r, rc;

        if (!db || !db->sqlite || !db->path)
                return -EINVAL;
        if (asprintf(&tmp, "%s.restore", db->path) < 0)
                return -ENOMEM;
        if (unlink(tmp) < 0 && errno != ENOENT)
                return set_error_message(ret_error, -errno, "cannot remove %s: %s", tmp, strerror(errno));
        r = db_create_file(tmp, ret_error); /* empty, mode 0600: VACUUM INTO accepts an empty file */
        if (r < 0)
                return r;
        rc = sqlite3_prepare_v2(db->sqlite, "VACUUM INTO ?1", -1, &s, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(s, 1, tmp, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(s);
        if (rc != SQLITE_DONE) {
                r = db_errno_of(db->sqlite, rc);
                (void) set_error_message(ret_error, r, "cannot copy the open database to %s: %s", tmp,
                                         sqlite3_errmsg(db->sqlite));
                (void) unlink(tmp);
                return r;
        }
        (void) sqlite3_finalize(TAKE_PTR(s));
        fd = open(tmp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        dfd = open(db->state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 || dfd < 0 || fsync(fd) < 0 || rename(tmp, db->path) < 0 || fsync(dfd) < 0) {
                r = -errno;
                (void) unlink(tmp);
                return set_error_message(ret_error, r, "cannot put the copy in place as %s: %s", db->path,
                                         strerror(-r));
        }
        /* The last sync of the old connection's commits, reported, before it closes. */
        bool syncing = db->syncer != NULL;
        db_syncer_free(db, true);
        /* From here on the old connection is of no use: close it first (see above). */
        for (size_t i = 0; i < _DB_STMT_MAX; i++) {
                (void) sqlite3_finalize(db->stmts[i]);
                db->stmts[i] = NULL;
        }
        (void) sqlite3_close(db->sqlite);
        db->sqlite = NULL;
        r = db_open(db->state_dir, &n, ret_error);
        if (r < 0)
                return r; /* db is left without a connection: every call on it fails (SQLITE_MISUSE) */
        old = *db;
        *db = *n;
        *n = old; /* n now holds the closed connection's names, freed by its cleanup */
        /* What the callers hold stays: the commit count, the syncer's listener. */
        db->commit_gen = old.commit_gen;
        db->sync_event = old.sync_event;
        db->sync_cb = old.sync_cb;
        db->sync_userdata = old.sync_userdata;
        db->sync_error = old.sync_error;
        /* The spool's segments are not the database: the open log goes on as it is. */
        db->spool = old.spool;
        db->spool_last_id = old.spool_last_id;
        n->spool = (struct db_spool){};
        /* The last sync above completed every wait (a failure completes them all). */
        assert(!old.waits);
        n->sync_event = NULL;
        if (syncing) {
                r = db_syncer_new(db);
                if (r < 0)
                        return set_error_message(ret_error, r, "cannot start syncing %s again: %s", db->path,
                                                 strerror(-r));
        }
        return 0;
}

int64_t db_spool_next_id(struct db *db) {
        return ++db->spool_last_id;
}

int64_t db_spool_last_id(struct db *db) {
        return db->spool_last_id;
}

void db_spool_raise_id(struct db *db, int64_t id) {
        if (id > db->spool_last_id)
                db->spool_last_id = id;
}

struct db_spool *db_spool(struct db *db) {
        return &db->spool;
}

sqlite3_stmt *db_stmt(struct db *db, enum db_stmt s) {
        return db->stmts[s];
}

static int db_step_cached(struct db *db, enum db_stmt s) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *st = db_stmt(db, s);
        int rc;

        rc = sqlite3_step(st);
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

int db_begin(struct db *db) {
        if (!db)
                return -EINVAL;
        return db_step_cached(db, DB_STMT_BEGIN);
}

/* When COMMIT fails (-EBUSY, -ENOSPC, ...), the transaction may still be open: call
 * db_rollback(), which is a no-op when there is none. */
int db_commit(struct db *db) {
        if (!db)
                return -EINVAL;
        return db_step_cached(db, DB_STMT_COMMIT);
}

int db_rollback(struct db *db) {
        if (!db)
                return -EINVAL;
        if (sqlite3_get_autocommit(db->sqlite)) /* no transaction open (or SQLite ended it) */
                return 0;
        return db_step_cached(db, DB_STMT_ROLLBACK);
}

const char *db_errmsg(struct db *db) {
        if (!db || !db->sqlite)
                return "no database";
        return sqlite3_errmsg(db->sqlite);
}

int db_cause(struct db *db, int r) {
        int e;

        if (!db || !db->sqlite || r != -EIO)
                return r;
        e = sqlite3_system_errno(db->sqlite);
        return e > 0 ? -e : r;
}

bool db_in_transaction(struct db *db) {
        return db && db->sqlite && !sqlite3_get_autocommit(db->sqlite);
}

struct sqlite3 *db_handle(struct db *db) {
        return db ? db->sqlite : NULL;
}

int db_meta_get(struct db *db, const char *key, char **ret) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        const unsigned char *v;
        char *copy;
        int rc;

        if (!db || !key)
                return -EINVAL;
        s = db_stmt(db, DB_STMT_META_GET);
        if ((rc = sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        if (rc == SQLITE_DONE)
                return -ENOENT;
        if (rc != SQLITE_ROW)
                return db_errno(rc);
        v = sqlite3_column_text(s, 0);
        copy = strdup(v ? (const char *) v : "");
        if (!copy)
                return -ENOMEM;
        *ret = copy;
        return 0;
}

int db_meta_set(struct db *db, const char *key, const char *value) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = NULL;
        int rc;

        if (!db || !key || !value)
                return -EINVAL;
        s = db_stmt(db, DB_STMT_META_SET);
        if ((rc = sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = sqlite3_bind_text(s, 2, value, -1, SQLITE_STATIC)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

/* The spool's segments written since the last hand-over go to the syncer with the commit that
 * follows; at most a few are written between two syncs (one, or two across a new segment). If
 * they do not fit here, they are synced on the loop rather than not at all. Returns 0 or a
 * negative errno (that sync failed). Called with y->mu held. */
static int db_syncer_take_segments(struct db *db, struct db_syncer *y) {
        int fds[16];
        size_t n = 0;
        int r;

        if (!db->spool.log)
                return 0;
        r = seglog_sync_handoff(db->spool.log, fds, ELEMENTSOF(fds), &n);
        if (r == -ENOBUFS)
                return seglog_sync(db->spool.log);
        if (r < 0)
                return r;
        if (n == 0)
                return 0;
        if (y->n_seg_fds + n > y->cap_seg_fds) {
                size_t cap = y->cap_seg_fds ? y->cap_seg_fds * 2 : 16;
                while (cap < y->n_seg_fds + n)
                        cap *= 2;
                int *t = reallocarray(y->seg_fds, cap, sizeof *t);
                if (!t) {
                        /* Handed over already: synced here, on the loop, then. */
                        r = 0;
                        for (size_t i = 0; i < n; i++) {
                                if (r == 0 && fsync(fds[i]) < 0)
                                        r = -errno;
                                (void) close(fds[i]);
                        }
                        return r;
                }
                y->seg_fds = t;
                y->cap_seg_fds = cap;
        }
        memcpy(y->seg_fds + y->n_seg_fds, fds, n * sizeof *fds);
        y->n_seg_fds += n;
        return 0;
}

/* Called by SQLite after each commit on the loop's connection, once the commit is written to
 * the WAL and its write lock released ("the callback is invoked by SQLite after the commit has
 * taken place", sqlite3_wal_hook()): a sync that the syncer begins after this call covers it.
 * Installing the hook replaces wal_autocheckpoint; the syncer checkpoints instead. */
static int db_wal_hook(void *userdata, sqlite3 *s, const char *name, int pages) {
        struct db *db = userdata;
        struct db_syncer *y = db->syncer;

        db->commit_gen++;
        if (!y)
                return SQLITE_OK;
        pthread_mutex_lock(&y->mu);
        /* A failure here is a sync that failed, as the thread's own would be. */
        int r = db_syncer_take_segments(db, y);
        if (r < 0 && y->error == 0)
                y->error = r;
        y->requested = db->commit_gen;
        if (pages >= DB_CHECKPOINT_PAGES)
                y->checkpoint = true;
        pthread_cond_signal(&y->cond);
        pthread_mutex_unlock(&y->mu);
        return SQLITE_OK;
}

static void *db_syncer_main(void *userdata) {
        struct db_syncer *y = userdata;
        uint64_t one = 1;

        pthread_mutex_lock(&y->mu);
        for (;;) {
                while (!y->stop && y->requested == y->synced && !y->checkpoint)
                        pthread_cond_wait(&y->cond, &y->mu);
                /* Descriptors handed over at the stop without a commit after them (segments
                 * found at open, seglog_sync_handoff()) are synced too, not just closed. */
                if (y->stop && y->requested == y->synced && y->n_seg_fds == 0)
                        break;
                /* Every commit up to target returned before this point: the sync below began
                 * after them, so it covers them. */
                uint64_t target = y->requested;
                bool checkpoint = y->checkpoint;
                int *seg_fds = y->seg_fds;
                size_t n_seg_fds = y->n_seg_fds;
                int r = y->error;

                y->seg_fds = NULL;
                y->n_seg_fds = y->cap_seg_fds = 0;
                y->checkpoint = false;
                pthread_mutex_unlock(&y->mu);
                if (r == 0 && fdatasync(y->wal_fd) < 0)
                        r = -errno;
                /* The spool's segments of the same commits (a directory too: fsync for both). */
                for (size_t i = 0; i < n_seg_fds; i++) {
                        if (r == 0 && fsync(seg_fds[i]) < 0)
                                r = -errno;
                        (void) close(seg_fds[i]);
                }
                free(seg_fds);
                /* PASSIVE never waits for the loop's connection (a reader or the writer): it
                 * copies what it can, syncs the WAL and then the database file, and the writer
                 * starts the WAL over once a checkpoint was complete. */
                if (r == 0 && checkpoint)
                        (void) sqlite3_wal_checkpoint_v2(y->ckpt, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
                pthread_mutex_lock(&y->mu);
                if (r == 0)
                        y->synced = target;
                else
                        y->error = r;
                /* Only EAGAIN can fail here (the counter is full): the loop wakes up anyway. */
                if (write(y->event_fd, &one, sizeof one) < 0)
                        (void) 0;
                if (r < 0) {
                        /* After a failed fdatasync the kernel may have dropped the dirty pages
                         * (PostgreSQL's "fsyncgate"), and a later success proves nothing about
                         * them; SQLite's WAL recovery also stops at the first bad frame, so later
                         * commits are no safer. Nothing more is made durable until a restart. */
                        while (!y->stop)
                                pthread_cond_wait(&y->cond, &y->mu);
                        break;
                }
        }
        pthread_mutex_unlock(&y->mu);
        return NULL;
}

static void db_sync_wait_unlink(struct db_sync_wait *w) {
        if (w->next)
                w->next->prevp = w->prevp;
        *w->prevp = w->next;
        w->next = NULL;
        w->prevp = NULL;
}

/* Completes the waits that gen covers (all of them after a failure): each is unlinked and freed
 * before its callback runs, which may add or cancel others. */
static void db_sync_waits_report(struct db *db, uint64_t gen, int error) {
        if (error < 0 && db->sync_error == 0)
                db->sync_error = error;
        for (;;) {
                struct db_sync_wait *w = db->waits;

                /* a freed wait is unlinked first: *w->prevp is db->waits for the head:
                 * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
                while (w && error == 0 && w->gen > gen)
                        w = w->next;
                if (!w)
                        return;
                /* a freed wait is unlinked first: *w->prevp is db->waits for the head:
                 * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
                db_sync_wait_t cb = w->cb;
                void *userdata = w->userdata;

                db_sync_wait_unlink(w);
                free(w);
                cb(userdata, error < 0 ? error : 0);
        }
}

/* Takes the syncer's news on the loop's thread. */
static void db_syncer_report(struct db *db) {
        struct db_syncer *y = db->syncer;
        uint64_t gen;
        int error;

        pthread_mutex_lock(&y->mu);
        gen = y->synced;
        error = y->error;
        pthread_mutex_unlock(&y->mu);
        if (db->sync_cb)
                db->sync_cb(db->sync_userdata, gen, error);
        db_sync_waits_report(db, gen, error);
}

static int on_syncer_event(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        uint64_t n;

        if (read(fd, &n, sizeof n) < 0)
                (void) 0; /* EAGAIN: a report raced with an earlier read */
        db_syncer_report(userdata);
        return 0;
}

/* Stops the thread after a last sync of every commit so far (report: and tells the callback). */
static void db_syncer_free(struct db *db, bool report) {
        struct db_syncer *y = db->syncer;

        if (!y)
                return;
        if (y->started) {
                pthread_mutex_lock(&y->mu);
                int r = db_syncer_take_segments(db, y);
                if (r < 0 && y->error == 0)
                        y->error = r;
                y->requested = db->commit_gen;
                y->stop = true;
                pthread_cond_signal(&y->cond);
                pthread_mutex_unlock(&y->mu);
                (void) pthread_join(y->thread, NULL);
                if (report)
                        db_syncer_report(db);
        }
        sd_event_source_disable_unref(y->source);
        for (size_t i = 0; i < y->n_seg_fds; i++)
                (void) close(y->seg_fds[i]);
        free(y->seg_fds);
        (void) sqlite3_close(y->ckpt);
        if (y->wal_fd >= 0)
                (void) close(y->wal_fd);
        if (y->event_fd >= 0)
                (void) close(y->event_fd);
        pthread_cond_destroy(&y->cond);
        pthread_mutex_destroy(&y->mu);
        free(y);
        db->syncer = NULL;
}

/* Without the thread, commits are durable when they return again (and the autocheckpoint
 * takes back the WAL hook). */
static void db_sync_durable(struct db *db) {
        if (db->sqlite)
                (void) db_exec(db, "PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 4096");
}

static int db_syncer_new(struct db *db) {
        _cleanup_free_ char *wal = NULL;
        struct db_syncer *y;
        int r, rc;

        if (asprintf(&wal, "%s-wal", db->path) < 0)
                return -ENOMEM;
        y = calloc(1, sizeof *y);
        if (!y)
                return -ENOMEM;
        y->wal_fd = y->event_fd = -1;
        pthread_mutex_init(&y->mu, NULL);
        pthread_cond_init(&y->cond, NULL);
        y->requested = y->synced = db->commit_gen;
        db->syncer = y;

        /* The -wal file exists while a connection is open (db_open() read and wrote through it).
         * O_RDONLY is enough for fdatasync(). */
        y->wal_fd = open(wal, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
        if (y->wal_fd < 0) {
                r = -errno;
                goto fail;
        }
        /* Once, here: what an earlier run committed without a sync (it was killed before its
         * sync) is in the page cache, and this run reads it (bulbs' seqs) and acks resends
         * with it. */
        if (fdatasync(y->wal_fd) < 0) {
                r = -errno;
                goto fail;
        }
        y->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (y->event_fd < 0) {
                r = -errno;
                goto fail;
        }
        /* The checkpointer's own connection; a second connection also keeps the -wal file (and
         * so wal_fd's inode) in place while the loop's connection lives. A checkpoint copies
         * pages through a buffer of its own, not the page cache: 64 KiB of cache is plenty. */
        rc = sqlite3_open_v2(db->path, &y->ckpt, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOFOLLOW | SQLITE_OPEN_EXRESCODE,
                             NULL);
        if (rc != SQLITE_OK) {
                r = db_errno_of(y->ckpt, rc);
                goto fail;
        }
        (void) sqlite3_busy_timeout(y->ckpt, DB_BUSY_TIMEOUT_MS);
        rc = sqlite3_exec(y->ckpt,
                          "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0; "
                          "PRAGMA journal_size_limit = 16777216; PRAGMA cache_size = -64",
                          NULL, NULL, NULL);
        if (rc != SQLITE_OK) {
                r = db_errno(rc);
                goto fail;
        }
        r = sd_event_add_io(db->sync_event, &y->source, y->event_fd, EPOLLIN, on_syncer_event, db);
        if (r < 0)
                goto fail;
        (void) sd_event_source_set_description(y->source, "db-sync");
        /* NORMAL in WAL mode: a commit writes the WAL and does not fsync it (sqlite.org/pragma.html,
         * "synchronous"); durability is the syncer's fdatasync. The hook replaces the
         * autocheckpoint, which would fsync on the loop inside a commit. */
        r = db_exec(db, "PRAGMA synchronous = NORMAL");
        if (r < 0)
                goto fail;
        (void) sqlite3_wal_hook(db->sqlite, db_wal_hook, db);
        r = -pthread_create(&y->thread, NULL, db_syncer_main, y);
        if (r < 0)
                goto fail;
        y->started = true;
        return 0;
fail:
        db_syncer_free(db, false);
        db_sync_durable(db);
        return r;
}

int db_sync_start(struct db *db, sd_event *e, db_synced_t cb, void *userdata) {
        if (!db || !db->sqlite || !e || db->syncer)
                return -EINVAL;
        db->sync_event = e;
        db->sync_cb = cb;
        db->sync_userdata = userdata;
        return db_syncer_new(db);
}

void db_sync_stop(struct db *db) {
        if (!db)
                return;
        db_syncer_free(db, true);
        db_sync_durable(db);
        db->sync_event = NULL;
        db->sync_cb = NULL;
}

int db_sync_wait(struct db *db, db_sync_wait_t cb, void *userdata, struct db_sync_wait **ret) {
        struct db_sync_wait *w, **p;
        uint64_t synced;
        int error;

        if (!db || !cb || !ret)
                return -EINVAL;
        if (db->sync_error < 0)
                return db->sync_error;
        if (!db->syncer)
                return 0; /* synchronous = FULL: a commit was durable when it returned */
        pthread_mutex_lock(&db->syncer->mu);
        synced = db->syncer->synced;
        error = db->syncer->error;
        pthread_mutex_unlock(&db->syncer->mu);
        /* A failure not yet reported to the loop counts already: nothing is synced after it. */
        if (error < 0)
                return error;
        if (synced >= db->commit_gen)
                return 0;
        w = calloc(1, sizeof *w);
        if (!w)
                return -ENOMEM;
        w->gen = db->commit_gen;
        w->cb = cb;
        w->userdata = userdata;
        for (p = &db->waits; *p; p = &(*p)->next)
                ;
        w->prevp = p;
        *p = w;
        *ret = w;
        return 1;
}

void db_sync_wait_cancel(struct db_sync_wait *w) {
        if (!w)
                return;
        db_sync_wait_unlink(w);
        free(w);
}

int db_sync_request(struct db *db) {
        struct db_syncer *y;
        int r;

        if (!db)
                return -EINVAL;
        y = db->syncer;
        if (!y)
                return db->spool.log ? seglog_sync(db->spool.log) : 0;
        db->commit_gen++;
        pthread_mutex_lock(&y->mu);
        r = db_syncer_take_segments(db, y);
        if (r < 0 && y->error == 0)
                y->error = r;
        y->requested = db->commit_gen;
        pthread_cond_signal(&y->cond);
        pthread_mutex_unlock(&y->mu);
        return 0;
}

uint64_t db_commit_gen(struct db *db) {
        return db ? db->commit_gen : 0;
}
