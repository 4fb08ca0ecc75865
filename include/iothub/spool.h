/* SPDX-License-Identifier: MIT */
/* The spool: accepted frames not yet acknowledged by the cloud, byte for byte, in the
 * database. A frame counts as accepted once the transaction that appended it committed. */
#pragma once

#include <stdint.h>

#include "iothub/db.h"

/* Appends a frame inside the caller's transaction. Returns 0 or a negative errno. */
int spool_append(struct db *db, const char *dev, int64_t seq, const uint8_t *jws, size_t len,
                 int64_t received_at_usec);

/* The spool's size, kept in memory so that the frame path never counts rows. One instance,
 * owned by hub.c (it reads it for status), written by the two modules that change the spool:
 * ingest (frames added, the oldest dropped at [spool] max_bytes) and cloud (frames uploaded
 * or moved aside). */
struct spool_counts {
        uint64_t pending, bytes;
        uint64_t dropped; /* oldest frames dropped at [spool] max_bytes since start */
};

/* Frames waiting and their total size in bytes. Returns 0 or a negative errno. */
int spool_stats(struct db *db, uint64_t *ret_pending, uint64_t *ret_bytes);

/* One frame of a batch read from the spool; jws points into SQLite's buffer and is valid
 * only during the callback. */
struct spool_entry {
        int64_t id;
        const uint8_t *jws;
        size_t len;
};

/* Calls cb for each of the oldest 'max' frames, oldest first. Stops early and returns cb's
 * negative return value if it fails. Returns the number of frames, or a negative errno. */
int spool_read_batch(struct db *db, unsigned max, int (*cb)(const struct spool_entry *e, void *userdata),
                     void *userdata);

/* Deletes frames first_id..last_id (the cloud has them). Frames already gone (dropped at the
 * cap meanwhile) are skipped. Every path that removes frames from the spool moves their bulbs'
 * stored last seq forward to the newest of them in the same transaction (its own one unless the
 * caller holds one), since the spool is where an accepted frame's seq is recorded until then
 * (spool_max_seqs()). Returns 0 and the count and bytes deleted, or a negative errno. */
int spool_delete(struct db *db, int64_t first_id, int64_t last_id, uint64_t *ret_count, uint64_t *ret_bytes);

/* Copies frames first_id..last_id into the moved_aside table with the HTTP status and a
 * reason, then deletes them from the spool, in one transaction. */
int spool_move_aside(struct db *db, int64_t first_id, int64_t last_id, long http_status, const char *reason,
                     uint64_t *ret_count, uint64_t *ret_bytes);

/* Deletes the n oldest frames (the cap of [spool] max_bytes), inside the caller's transaction. */
int spool_drop_oldest(struct db *db, unsigned n, uint64_t *ret_count, uint64_t *ret_bytes);

/* Raises dev's stored last seq to seq (never lowers it), inside the caller's transaction.
 * Returns 0 or a negative errno. */
int spool_seqs_store(struct db *db, const char *dev, int64_t seq);

/* Notes, inside the caller's transaction, that every frame appended so far has its seq in
 * bulb_seqs too (the caller wrote them in the same transaction), so that spool_max_seqs() need
 * not read those frames. Returns 0 or a negative errno. */
int spool_seqs_mark(struct db *db);

/* Calls cb with the newest seq of each bulb that has frames in the spool after the last
 * spool_seqs_mark() (at start: together with bulb_seqs, the last accepted seq of every bulb).
 * Stops at cb's negative return value. Returns 0, -EUCLEAN for a damaged row or mark, or a
 * negative errno. */
int spool_max_seqs(struct db *db, int (*cb)(const char *dev, int64_t seq, void *userdata), void *userdata);

/* The oldest frame's id and arrival time; -ENOENT when the spool is empty. */
int spool_oldest(struct db *db, int64_t *ret_id, int64_t *ret_received_at_usec);

/* Frames kept in moved_aside. */
int spool_moved_aside_count(struct db *db, uint64_t *ret);
