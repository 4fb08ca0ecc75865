/* SPDX-License-Identifier: MIT */
/* The state database: one SQLite file in WAL mode in the state directory. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "iothub/util.h"

#define DB_FILE_NAME "iothub.db"

struct db;

/* Opens (creating when missing, mode 0600) <state_dir>/iothub.db, WAL, synchronous=FULL,
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
