/* SPDX-License-Identifier: MIT */
/* The state database: one SQLite file in WAL mode in the state directory. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <systemd/sd-event.h>

#include "iothub/util.h"

#define DB_FILE_NAME "iothub.db"

struct db;

/* Opens (creating when missing, mode 0600) <state_dir>/iothub.db, WAL, synchronous=FULL (see
 * db_sync_start()),
 * foreign keys on, and brings the schema to the current version. Returns 0 or a negative
 * errno (-EIO for SQLite errors, with the reason in ret_error when not NULL). */
int db_open(const char *state_dir, struct db **ret, char **ret_error);
void db_close(struct db *db);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct db *, db_close);

/* Transactions: BEGIN IMMEDIATE / COMMIT / ROLLBACK. Return 0 or a negative errno. */
int db_begin(struct db *db);
int db_commit(struct db *db);
int db_rollback(struct db *db);
/* Whether a transaction is open on this connection (the frame path's group commit between
 * an MQTT read and its commit): a module with writes of its own waits rather than write
 * into it. SQLite ends one by itself on some errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM
 * may roll it back), after which statements run in autocommit. */
bool db_in_transaction(struct db *db);

/* Whether <state_dir>/iothub.db is still the file this connection opened: 0, -ENOENT when the
 * name is gone (deleted under the running daemon), -ESTALE when another file took it. */
int db_check_file(struct db *db);
/* Puts the database back under its name from the open connection (consistent copy with
 * VACUUM INTO, fsync, rename), then reopens it; db stays valid for its users. Returns 0 or a
 * negative errno with the reason in ret_error. After a failure past the copy, db has no
 * connection and every call on it fails. */
int db_restore_file(struct db *db, char **ret_error);

/* The text of the last SQLite error on this connection (for log messages). */
const char *db_errmsg(struct db *db);
/* The cause of a failure r of the last call on this connection: the system's errno (ENOSPC,
 * EROFS, ...) when SQLite reported an I/O error and kept one, else r itself. */
int db_cause(struct db *db, int r);

/* For the modules built on it (registry, spool): the raw handle. */
struct sqlite3 *db_handle(struct db *db);
/* Translates an SQLite result code into a negative errno (one place for all of them). */
int db_errno(int sqlite_rc);

/* Small persistent settings in the meta table. db_meta_get: -ENOENT when unset; the value is
 * malloc'ed. */
int db_meta_get(struct db *db, const char *key, char **ret);
int db_meta_set(struct db *db, const char *key, const char *value);

/* Durability off the loop (issue 13). db_sync_start() switches this connection to
 * synchronous = NORMAL (a commit writes the WAL without fsync, so a power cut may lose it) and
 * starts one thread that fdatasyncs the WAL after commits and checkpoints (PASSIVE, on its own
 * connection) once the WAL holds 16 MiB; cb runs on e's thread with the newest commit generation
 * that is on disk (error: a negative errno when an fdatasync failed: gen never moves again, the
 * thread syncs nothing more until the database is opened again). Only a sync that began after a commit returned counts for it. Returns 0 or a
 * negative errno (commits stay durable on return then). */
typedef void (*db_synced_t)(void *userdata, uint64_t gen, int error);
int db_sync_start(struct db *db, sd_event *e, db_synced_t cb, void *userdata);
/* Makes every commit so far durable (blocking), reports it to cb, stops the thread; commits are
 * durable on return again. db_close() stops it too, without calling cb. NULL or not started: no-op. */
void db_sync_stop(struct db *db);
/* Calls cb(userdata, 0) on e's thread once every commit so far on this connection is on disk
 * (a sync that began after the newest of them ended), or cb(userdata, -errno) when an fdatasync
 * failed first: for an answer that must not come before the change it reports is durable (a
 * revocation a power cut must not undo). Returns 1 and *ret, the wait, owned by the caller until
 * cb runs (db_sync_wait_cancel() drops it; cb never runs then; it must be cancelled or done before
 * db_close()); 0 when all is durable already (no sync thread, or synced), cb not called and *ret
 * untouched; a negative errno when a sync failed earlier (or -ENOMEM). */
struct db_sync_wait;
typedef void (*db_sync_wait_t)(void *userdata, int error);
int db_sync_wait(struct db *db, db_sync_wait_t cb, void *userdata, struct db_sync_wait **ret);
void db_sync_wait_cancel(struct db_sync_wait *w);
/* The generation of the newest commit on this connection (counts every commit, autocommit ones
 * too): what cb's gen is compared with. */
/* A commit that wrote the spool's segment log (spool.h) and maybe no SQLite row: a new commit
 * generation whose sync covers the segments written since (and the WAL), reported like a
 * commit's; without the sync thread the segments are synced before it returns. Returns 0 or a
 * negative errno (that sync failed). */
int db_sync_request(struct db *db);
uint64_t db_commit_gen(struct db *db);
