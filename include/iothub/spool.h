/* SPDX-License-Identifier: MIT */
/* The spool: accepted frames not yet acknowledged by the cloud, byte for byte, in the segment
 * log beside the database (seglog.h; issue 13). A frame counts as accepted once its segment is
 * on disk: db_sync_request() after the append (with the sync thread: when it reports the commit
 * generation; without: when it returns), together with any SQLite rows of the same commit. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "iothub/db.h"
#include "iothub/seglog.h"

/* Opens the spool of an open database: the segment log in <state_dir>/spool/ (created, 0700),
 * each segment read whole once unless a summary in spool_segments stands for it (the counts,
 * each record's CRC, each bulb's newest seq for spool_max_seqs(); a summarized segment's seqs
 * are in bulb_seqs already, its CRCs are checked by the upload's reads only; a torn tail cut off
 * the newest segment and ignored in older ones, damage with intact records after
 * it skipped and counted: spool_found()), the summaries of segments that are gone deleted,
 * and the frames an older version kept in the database's spool table moved into it, once. The
 * daemon's only; db_close() closes it. Returns 0 or a negative errno with ret_error. */
int spool_open(struct db *db, char **ret_error);

/* One frame: to append (jws is copied), or as spool_frames_newest_first() reads it back. */
struct spool_frame {
        const char *dev;
        int64_t seq;
        const uint8_t *jws;
        size_t len;
        int64_t received_at_usec;
};

/* Appends n frames with one write (ids handed out by db.c), not yet durable: the caller's
 * commit ends with db_sync_request(). Nothing is appended when a frame is out of bounds.
 * Returns 0 or a negative errno (-EINVAL, -ERANGE for a seq, -EFBIG for a size). */
int spool_append_frames(struct db *db, const struct spool_frame *f, size_t n);
/* Takes back the last spool_append_frames() (the rest of its commit failed). */
int spool_undo_append(struct db *db);
/* Appends one frame as its own commit (durable, or synced by the thread, on return). */
int spool_append(struct db *db, const char *dev, int64_t seq, const uint8_t *jws, size_t len,
                 int64_t received_at_usec);
/* A segment holds at most a 16th of [spool] max_bytes (16 KiB to 1 MiB): the cap drops whole
 * segments, oldest first. */
void spool_set_max_bytes(struct db *db, uint64_t max_bytes);
/* What opening the log found (damage skipped, a torn tail cut), for the daemon to say. */
void spool_found(struct db *db, struct seglog_found *ret);

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
/* The same for the oldest frames with an id above after_id (the next batch while the one up to
 * after_id is in flight; frames dropped meanwhile at [spool] max_bytes are not read). */
int spool_read_batch_after(struct db *db, int64_t after_id, unsigned max,
                           int (*cb)(const struct spool_entry *e, void *userdata), void *userdata);

/* Every frame up to last_id leaves (the cloud has first_id..last_id, the oldest waiting; frames
 * already gone, dropped at the cap meanwhile, are skipped). A segment that nothing waits in any
 * more is unlinked once its bulbs' newest seqs are in bulb_seqs and that commit is on disk,
 * since a segment is where an accepted frame's seq is recorded until then (spool_max_seqs()).
 * Returns 0 and the count and bytes that left, or a negative errno. */
int spool_delete(struct db *db, int64_t first_id, int64_t last_id, uint64_t *ret_count, uint64_t *ret_bytes);

/* Copies frames first_id..last_id into the moved_aside table with the HTTP status and a
 * reason (one transaction; a frame already there, by dev and seq, is not copied again: a crash
 * before the frames left the log), then they leave the spool as with spool_delete(). */
int spool_move_aside(struct db *db, int64_t first_id, int64_t last_id, long http_status, const char *reason,
                     uint64_t *ret_count, uint64_t *ret_bytes);

/* The cap of [spool] max_bytes: the frames of the oldest segments leave, whole segments (the
 * one being written is closed first when it is the only one), until at least n (> 0) have left
 * or nothing waits. Not inside a transaction of the caller's. Returns 0 and what left (0
 * frames: nothing waits), or a negative errno when nothing left. */
int spool_drop_oldest(struct db *db, unsigned n, uint64_t *ret_count, uint64_t *ret_bytes);

/* Calls cb with the newest seq of each bulb that has frames in the spool's segments (at start:
 * only those of the segments read, the others' are in bulb_seqs with their summaries; together
 * with bulb_seqs, the last accepted seq of every bulb; a segment is unlinked only once
 * bulb_seqs holds its seqs). Stops at cb's negative return value. Returns 0 or a negative
 * errno. */
int spool_max_seqs(struct db *db, int (*cb)(const char *dev, int64_t seq, void *userdata), void *userdata);

/* Calls cb with every frame still in the segment files, waiting or already uploaded (a segment
 * is unlinked only after a later commit is on disk), a segment at a time from the newest to the
 * oldest, each segment's frames oldest first; segment_start is true for a segment's first frame,
 * so that a caller looking for recent frames can stop once a segment began before them. f's
 * pointers are valid during the call only. cb returns 0 to go on, a positive value to stop, or a
 * negative errno; that value is returned, else 0. */
int spool_frames_newest_first(struct db *db,
                              int (*cb)(const struct spool_frame *f, bool segment_start, void *userdata),
                              void *userdata);

/* The oldest frame's id and arrival time; -ENOENT when the spool is empty. */
int spool_oldest(struct db *db, int64_t *ret_id, int64_t *ret_received_at_usec);

/* Frames kept in moved_aside. */
int spool_moved_aside_count(struct db *db, uint64_t *ret);
