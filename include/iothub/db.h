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
 * into it. */
bool db_in_transaction(struct db *db);

/* The text of the last SQLite error on this connection (for log messages). */
const char *db_errmsg(struct db *db);

/* For the modules built on it (registry, spool): the raw handle. */
struct sqlite3 *db_handle(struct db *db);
/* Translates an SQLite result code into a negative errno (one place for all of them). */
int db_errno(int sqlite_rc);

/* Small persistent settings in the meta table. db_meta_get: -ENOENT when unset; the value is
 * malloc'ed. */
int db_meta_get(struct db *db, const char *key, char **ret);
int db_meta_set(struct db *db, const char *key, const char *value);
