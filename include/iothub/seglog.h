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
        int64_t last_frame_id; /* the largest frame id seen, 0: none */
};

/* Reads the records of one segment, in order, calling cb for each intact one with its offset and
 * size in buf (it stops at cb's
 * negative return value, returned). A damaged region followed by an intact record is skipped,
 * counted in damaged and scanning goes on at that record: nothing intact after damage is lost.
 * What follows the last intact record and holds none is the tail (tail_bytes): in the newest
 * segment that is what a crash left of an unfinished append (the caller cuts it off); in any
 * other it is damage. A frame whose id is not above the previous frame's counts as damage too.
 * Returns 0. */
int seglog_scan(const uint8_t *buf, size_t len,
                int (*cb)(const struct seglog_record *r, size_t off, size_t size, void *userdata),
                void *userdata, struct seglog_scan_result *ret);
