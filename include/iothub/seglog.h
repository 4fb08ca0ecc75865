/* SPDX-License-Identifier: MIT */
/* The segment log of the spool (issue 13, SD-card wear): accepted frames appended once to files
 * under <state_dir>/spool/, each file ("segment") unlinked once every frame in it has left the
 * spool. SQLite writes every page twice (WAL, then checkpoint) and rewrites shared pages at every
 * commit; an append writes each byte once. This header is the on-disk record format (pure,
 * fuzzed: tests/fuzz/fuzz-seglog.c) and the segment files.
 *
 * Record (all integers little-endian):
 *   u32 magic   SEGLOG_MAGIC, so that a scan past a damaged region finds the next record
 *               without a CRC at every byte
 *   u32 len     bytes of the body that follows the 12-byte header
 *   u32 crc     CRC-32C of len (its 4 bytes) and the body
 *   body:
 *     u8 type   SEGLOG_FRAME or SEGLOG_CURSOR
 *     u8 devlen 1..DEVICE_ID_MAX for a frame, 0 for a cursor
 *     u16 zero
 *     u64 id    frame: the spool id (strictly increasing in a segment);
 *               cursor: every frame up to this id has left the spool
 *     frame only:
 *       i64 seq              1..FRAME_SEQ_MAX
 *       i64 received_at_usec >= 0
 *       dev[devlen]          a valid device id
 *       jws[len - 28 - devlen] 1..FRAME_MAX_BYTES_LIMIT bytes, exactly as the bulb signed it */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "iothub/frame.h"
#include "iothub/util.h"

#define SEGLOG_MAGIC UINT32_C(0x31474553) /* "SEG1" */
#define SEGLOG_HEADER_BYTES 12u
#define SEGLOG_BODY_FIXED 12u        /* type, devlen, zero, id */
#define SEGLOG_FRAME_FIXED 28u       /* ... and seq, received_at_usec */
#define SEGLOG_RECORD_MAX (SEGLOG_HEADER_BYTES + SEGLOG_FRAME_FIXED + DEVICE_ID_MAX + FRAME_MAX_BYTES_LIMIT)

enum seglog_type {
        SEGLOG_FRAME = 1,
        SEGLOG_CURSOR = 2,
};

/* One record; dev and jws point into the parsed buffer. */
struct seglog_record {
        enum seglog_type type;
        int64_t id;
        int64_t seq;              /* frames only */
        int64_t received_at_usec; /* frames only */
        char dev[DEVICE_ID_MAX + 1];
        const uint8_t *jws;
        size_t len;
};

/* CRC-32C (Castagnoli), reflected, initial and final value 0xffffffff; crc is the value of the
 * bytes before (0 to start). */
uint32_t seglog_crc32c(uint32_t crc, const void *buf, size_t len);
/* The same with the table, whatever the CPU has (tests compare the two); and whether
 * seglog_crc32c() uses the CPU's CRC32C instruction (SSE 4.2, ARMv8 CRC32). */
uint32_t seglog_crc32c_portable(uint32_t crc, const void *buf, size_t len);
bool seglog_crc32c_accelerated(void);

/* The size of a frame record with this device id and frame length. */
static inline size_t seglog_frame_record_size(size_t devlen, size_t len) {
        return SEGLOG_HEADER_BYTES + SEGLOG_FRAME_FIXED + devlen + len;
}

/* Writes r (a frame or a cursor) as one record into buf (cap bytes). Returns the record's
 * size, -EINVAL for a field out of its bounds, or -ENOBUFS when cap is too small. */
int seglog_record_encode(const struct seglog_record *r, uint8_t *buf, size_t cap);

/* Parses the record at the start of buf. Returns its size and fills ret; -EAGAIN when buf ends
 * inside a record whose header is plausible (a torn tail, or the caller must read more);
 * -EBADMSG for anything else (bad magic, length out of bounds, CRC, a field out of bounds,
 * bytes after the fields). ret is untouched on failure. */
int seglog_record_parse(const uint8_t *buf, size_t len, struct seglog_record *ret);

/* What seglog_scan() found. */
struct seglog_scan_result {
        size_t good_end;      /* offset just after the last intact record (0: none) */
        uint64_t records;     /* intact records passed to the callback */
        uint64_t damaged;     /* damaged regions with an intact record after them (skipped) */
        uint64_t damaged_bytes;
        size_t tail_bytes;    /* bytes after good_end with no intact record in them */
        bool tail_damaged;    /* ... and they are not what a crash leaves of an append (a record
                               * cut short, or zeros) but a complete record failing its checks */
        int64_t last_frame_id; /* the largest frame id seen, 0: none */
};

/* Reads the records of one segment, in order, calling cb for each intact one with its offset and
 * size in buf (it stops at cb's
 * negative return value, returned). A damaged region followed by an intact record is skipped,
 * counted in damaged and scanning goes on at that record: nothing intact after damage is lost.
 * What follows the last intact record and holds none is the tail (tail_bytes): what a crash left
 * of an unfinished append, in any segment (seglog_open()). A frame whose id is not above the
 * previous frame's counts as damage too. Returns 0. */
int seglog_scan(const uint8_t *buf, size_t len,
                int (*cb)(const struct seglog_record *r, size_t off, size_t size, void *userdata),
                void *userdata, struct seglog_scan_result *ret);

/* The segment files: <state_dir>/spool/ (0700, created here), one file per segment named
 * seg-<first id, 16 hex digits>.log (0600), appended only, the newest one written. Not
 * thread-safe; no logging (the caller logs what seglog_open() found). */
struct seglog;

/* What seglog_open() found. */
struct seglog_found {
        uint64_t segments;
        uint64_t damaged;       /* damaged regions, skipped: with an intact record after them, or a
                                 * segment's tail that is a complete record failing its checks */
        uint64_t damaged_bytes;
        uint64_t torn_bytes;    /* cut off the newest segment: an append a crash interrupted */
        uint64_t torn_older;    /* older segments ending torn (a crash before a roll's sync), */
        uint64_t torn_older_bytes; /* their tails ignored, not damage */
        uint64_t summarized;    /* segments taken from their summaries, not read */
};

/* What a closed segment holds, so that a start need not read it (seglog_open()). The caller
 * stores it (spool.c: SQLite's spool_segments, together with each bulb's newest seq in it, in
 * bulb_seqs) once seglog_summary_next() reported it, which is only after the segment was closed
 * and its last bytes handed to a sync that the caller waited for. */
struct seglog_summary {
        int64_t name_id;           /* the id in the file's name */
        int64_t first_id, last_id; /* its frames' ids (0: none) */
        uint64_t frames, bytes;    /* its frames and their JWS bytes */
        uint64_t size;             /* the end of its last record: the file's size */
        int64_t cursor;            /* the highest cursor record in it (0: none) */
};

/* Opens (creating) the directory and reads the segments: the newest one's torn tail is cut off,
 * an older one's ignored (a tail with no intact record after it is a crash, in any segment);
 * damage (a bad region with an intact record after it) is skipped and counted in ret_found.
 * An older segment that has a summary in sums (n_sums of them, sorted by name_id) whose size is
 * the file's size is taken from it and not read at all: neither its CRCs are checked (the
 * upload's reads still check them) nor its frames passed to seq_cb (their seqs were stored with
 * the summary). Every other segment is read whole, as is the newest. Summaries of segments not
 * there are ignored (the caller deletes them before a segment of that name can be made again).
 * seq_cb, if given, is called with each frame read whose id is above seqs_mark (the frames whose
 * bulbs' seqs bulb_seqs may not hold yet).
 * segment_bytes: a segment is closed once it holds this much (a record never spans two).
 * Returns 0, or a negative errno with a message in ret_error. */
int seglog_open(const char *state_dir, size_t segment_bytes, int64_t seqs_mark,
                int (*seq_cb)(const char *dev, int64_t seq, void *userdata), void *userdata,
                const struct seglog_summary *sums, size_t n_sums, struct seglog **ret,
                struct seglog_found *ret_found, char **ret_error);
void seglog_close(struct seglog *l);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct seglog *, seglog_close);

/* Frames waiting (above the upload cursor) and their JWS bytes. */
void seglog_counts(const struct seglog *l, uint64_t *ret_pending, uint64_t *ret_bytes);
/* The largest frame id in the log (0: none ever), so that ids keep growing across restarts. */
int64_t seglog_last_id(const struct seglog *l);

/* Appends n frames (ids above seglog_last_id(), increasing) with one write(), opening a new
 * segment first when the current one is full. Not durable until seglog_sync(). On failure
 * nothing of them stays in the file. Returns 0 or a negative errno. */
int seglog_append(struct seglog *l, const struct seglog_record *frames, size_t n);

/* Takes back the last seglog_append() (the caller's transaction for the same commit failed):
 * the file is cut back to where it was. Returns 0 or a negative errno. */
int seglog_undo_append(struct seglog *l);

/* fdatasync() of every segment written since the last call, and of the directory when a segment
 * was created since. Returns 0 or a negative errno (then nothing is known to be durable). */
int seglog_sync(struct seglog *l);

/* Calls cb for the oldest frames waiting, at most max, oldest first; jws points into a buffer
 * valid during the call. Returns the number of frames or a negative errno (cb's included). */
int seglog_read_batch(struct seglog *l, unsigned max, int (*cb)(const struct seglog_record *r, void *userdata),
                      void *userdata);
/* The same, for the frames waiting with an id above after_id (a batch read while the one up to
 * after_id is in flight). The walk starts at the read position: the frames up to after_id are
 * passed over, not read for the caller. */
int seglog_read_batch_after(struct seglog *l, int64_t after_id, unsigned max,
                            int (*cb)(const struct seglog_record *r, void *userdata), void *userdata);

/* Every frame up to last_id has left the spool (uploaded or moved aside): moves the cursor, and
 * appends a cursor record so that a restart does not send them again. Returns 0 and the frames
 * and bytes that left, or a negative errno. */
int seglog_consume(struct seglog *l, int64_t last_id, uint64_t *ret_count, uint64_t *ret_bytes);

/* Drops the oldest segment's waiting frames ([spool] max_bytes): the cursor moves past them.
 * -ENOENT when only the segment being written is left (the caller closes it first with
 * seglog_roll()). Returns 0 and the frames and bytes dropped, or a negative errno. */
int seglog_drop_oldest(struct seglog *l, uint64_t *ret_count, uint64_t *ret_bytes);

/* Closes the segment being written (the next append opens a new one). */
void seglog_roll(struct seglog *l);

/* The oldest segment that no frame waits in any more (not the one being written): calls cb with
 * each bulb's newest seq in it, so that the caller stores them (bulb_seqs) before
 * seglog_retire() unlinks it. Returns 1 when there is one, 0 when none, or a negative errno. */
int seglog_retirable(struct seglog *l, int (*cb)(const char *dev, int64_t seq, void *userdata), void *userdata);
/* Unlinks the segment seglog_retirable() reported. Returns 0 or a negative errno. */
int seglog_retire(struct seglog *l);
/* The name id of the segment seglog_retirable() reported (its summary goes with it), 0: none. */
int64_t seglog_retirable_id(const struct seglog *l);

/* Summaries (struct seglog_summary). A segment can be summarized once it is closed (never
 * written again) and its last bytes were handed over to a sync (seglog_sync(), or
 * seglog_sync_handoff(): each call that takes bytes is one hand-over, numbered). An older
 * segment found at open without a summary and intact to its end (an earlier run's bytes may be
 * in the page cache only) is handed over too, a few with each hand-over; the newest one found
 * at open only once it was written to. seglog_summary_pending() returns the number of the newest hand-over
 * when a segment can be summarized (0: none); once a sync that began after that hand-over
 * completed, seglog_summary_next(token) reports the oldest segment covered by hand-overs up to
 * token without a summary (1, ret filled, cb called with each bulb's newest seq in it; 0: none;
 * or a negative errno), and seglog_summary_stored() says that its summary was committed. */
uint64_t seglog_summary_pending(const struct seglog *l);
int seglog_summary_next(struct seglog *l, uint64_t token, int (*cb)(const char *dev, int64_t seq, void *userdata),
                        void *userdata, struct seglog_summary *ret);
void seglog_summary_stored(struct seglog *l, int64_t name_id);
/* Whether a segment of this name id is in the log. */
bool seglog_has_segment(const struct seglog *l, int64_t name_id);

/* For a sync on another thread: hands over, as new descriptors (dup()) in fds (at most max;
 * ret_n of them), every segment written since the last hand-over or seglog_sync(), and the
 * directory when a segment was created since, and with the room left a few older segments
 * found at open that no sync covered yet (for their summaries); the caller fdatasyncs them (the directory: fsync)
 * and closes them. They count as synced for this log from now on. Returns 0, -ENOBUFS when max
 * is too small (nothing handed over), or a negative errno. */
int seglog_sync_handoff(struct seglog *l, int *fds, size_t max, size_t *ret_n);

/* Calls cb with the device and seq of every frame whose id is above after, oldest first (those
 * frames' bulbs may have seqs that bulb_seqs does not hold yet). Reads only the segments that
 * have such frames. Returns 0 or a negative errno. */
int seglog_frames_after(struct seglog *l, int64_t after, int (*cb)(const char *dev, int64_t seq, void *userdata),
                        void *userdata);

/* Calls cb with every frame record still in the segment files, waiting or already uploaded (a
 * segment stays until it retires), a segment at a time from the newest to the oldest, each
 * segment's frames in their order; seg_first is true for the first frame of each segment. For
 * what a lost SQLite commit left only in the segments (commands.c, at start). cb returns 0 to go
 * on, a positive value to stop (returned), or a negative errno (returned). Returns 0 once every
 * segment was read. */
int seglog_frames_newest_first(struct seglog *l,
                               int (*cb)(const struct seglog_record *r, bool seg_first, void *userdata),
                               void *userdata);

/* The size at which a segment is closed (the next append opens a new one). */
void seglog_set_segment_bytes(struct seglog *l, size_t segment_bytes);
