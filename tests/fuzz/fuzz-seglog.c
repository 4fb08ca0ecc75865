/* SPDX-License-Identifier: MIT */
/* libFuzzer target for the spool's segment files (src/seglog.c): any bytes as a whole segment.
 * Invariants the spool relies on:
 *   - every byte is in exactly one of: an intact record, a skipped damaged region, the tail;
 *   - an intact record re-encodes to exactly its bytes on disk, and its fields are in bounds
 *     (device id charset and length, seq, frame size);
 *   - frame ids only grow;
 *   - nothing intact after damage is lost: the input framed by a known first frame and a known
 *     last record gives both back (the last one unless an intact record of the input covers
 *     where it starts: a record may be crafted with a valid CRC over the bytes after it). */
#include "iothub/seglog.h"
#include "check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct seen {
        const uint8_t *buf;
        size_t bytes, records;
        int64_t last_frame_id;
        size_t first_off;
        int64_t first_id;
        bool b_seen, b_covered;
        size_t b_off;
        uint8_t enc[SEGLOG_RECORD_MAX];
};

static int on_record(const struct seglog_record *r, size_t off, size_t n, void *userdata) {
        struct seen *s = userdata;
        int m;

        CHECK(n >= SEGLOG_HEADER_BYTES + SEGLOG_BODY_FIXED && n <= SEGLOG_RECORD_MAX);
        CHECK(r->id >= 1);
        if (r->type == SEGLOG_FRAME) {
                CHECK(fuzz_id_chars_valid(r->dev, DEVICE_ID_MAX));
                CHECK(r->seq >= 1 && r->seq <= FRAME_SEQ_MAX);
                CHECK(r->received_at_usec >= 0);
                CHECK(r->len >= 1 && r->len <= FRAME_MAX_BYTES_LIMIT);
                CHECK(r->jws >= s->buf + off && r->jws + r->len == s->buf + off + n);
                CHECK(r->id > s->last_frame_id);
                s->last_frame_id = r->id;
        } else
                CHECK(r->type == SEGLOG_CURSOR);
        m = seglog_record_encode(r, s->enc, sizeof s->enc);
        CHECK(m > 0 && (size_t) m == n && memcmp(s->enc, s->buf + off, n) == 0);
        if (s->records == 0) {
                s->first_off = off;
                s->first_id = r->id;
        }
        if (off == s->b_off && r->type == SEGLOG_CURSOR && r->id == INT64_MAX)
                s->b_seen = true;
        if (off < s->b_off && off + n > s->b_off)
                s->b_covered = true;
        s->bytes += n;
        s->records++;
        return 0;
}

static void scan(const uint8_t *buf, size_t len, struct seen *s, struct seglog_scan_result *res) {
        s->buf = buf;
        CHECK(seglog_scan(buf, len, on_record, s, res) == 0);
        CHECK(res->records == s->records);
        CHECK(res->good_end <= len && res->tail_bytes == len - res->good_end);
        CHECK(s->bytes + res->damaged_bytes + res->tail_bytes == len);
        CHECK(!res->tail_damaged || res->tail_bytes > 0);
        CHECK(res->last_frame_id == s->last_frame_id);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static struct seen s;
        static uint8_t framed[2 * SEGLOG_RECORD_MAX + 4096];
        struct seglog_scan_result res;
        struct seglog_record a = { .type = SEGLOG_FRAME, .id = 1, .seq = 1, .dev = "bulb-a", .jws = (const uint8_t *) "x.y.z", .len = 5 };
        struct seglog_record b = { .type = SEGLOG_CURSOR, .id = INT64_MAX };
        size_t n;
        int m;

        memset(&s, 0, sizeof s);
        s.b_off = SIZE_MAX;
        scan(data, size, &s, &res);

        if (size > sizeof framed - 2 * 128)
                return 0;
        memset(&s, 0, sizeof s);
        m = seglog_record_encode(&a, framed, sizeof framed);
        CHECK(m > 0);
        n = (size_t) m;
        memcpy(framed + n, data, size);
        n += size;
        s.b_off = n;
        m = seglog_record_encode(&b, framed + n, sizeof framed - n);
        CHECK(m > 0);
        n += (size_t) m;
        scan(framed, n, &s, &res);
        CHECK(s.records >= 1 && s.first_off == 0 && s.first_id == 1);
        CHECK(s.b_seen || s.b_covered);
        if (s.b_seen)
                CHECK(res.good_end == n && res.tail_bytes == 0);
        return 0;
}
