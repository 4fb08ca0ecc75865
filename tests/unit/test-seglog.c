/* SPDX-License-Identifier: MIT */
/* src/seglog.c: the segment log's records and the scan of a segment (torn tail, damage, bounds). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "iothub/seglog.h"

static const char JWS[] = "eyJhbGciOiJFUzI1NiJ9.eyJzZXEiOjF9.c2ln";

static size_t put_frame(uint8_t *buf, size_t cap, int64_t id, const char *dev, int64_t seq) {
        struct seglog_record r = { .type = SEGLOG_FRAME, .id = id, .seq = seq, .received_at_usec = 1000 * id,
                                   .jws = (const uint8_t *) JWS, .len = strlen(JWS) };
        int n;

        (void) snprintf(r.dev, sizeof r.dev, "%s", dev);
        n = seglog_record_encode(&r, buf, cap);
        assert_true(n > 0);
        assert_int_equal(n, seglog_frame_record_size(strlen(dev), strlen(JWS)));
        return (size_t) n;
}

struct collected {
        int64_t ids[16];
        size_t offs[16];
        size_t n;
};

static int collect(const struct seglog_record *r, size_t off, size_t size, void *userdata) {
        struct collected *c = userdata;

        if (c->n < ELEMENTSOF(c->ids)) {
                c->ids[c->n] = r->type == SEGLOG_CURSOR ? -r->id : r->id;
                c->offs[c->n] = off;
        }
        c->n++;
        return 0;
}

static void test_crc32c(void **state) {
        /* The standard check value of CRC-32C (RFC 3720 B.4 and every CRC catalogue). */
        assert_int_equal(seglog_crc32c(0, "123456789", 9), 0xe3069283);
        /* In pieces, the same. */
        assert_int_equal(seglog_crc32c(seglog_crc32c(0, "1234", 4), "56789", 5), 0xe3069283);
}

static void test_roundtrip(void **state) {
        uint8_t buf[512];
        struct seglog_record r, c = { .type = SEGLOG_CURSOR, .id = 77 };
        size_t n = put_frame(buf, sizeof buf, 5, "bulb-1", 42);
        int m;

        assert_int_equal(seglog_record_parse(buf, n, &r), (int) n);
        assert_int_equal(r.type, SEGLOG_FRAME);
        assert_int_equal(r.id, 5);
        assert_int_equal(r.seq, 42);
        assert_int_equal(r.received_at_usec, 5000);
        assert_string_equal(r.dev, "bulb-1");
        assert_int_equal(r.len, strlen(JWS));
        assert_memory_equal(r.jws, JWS, r.len);
        /* Bytes after a record are the next record's business, not this one's. */
        assert_int_equal(seglog_record_parse(buf, sizeof buf, &r), (int) n);

        m = seglog_record_encode(&c, buf, sizeof buf);
        assert_int_equal(m, SEGLOG_HEADER_BYTES + SEGLOG_BODY_FIXED);
        assert_int_equal(seglog_record_parse(buf, (size_t) m, &r), m);
        assert_int_equal(r.type, SEGLOG_CURSOR);
        assert_int_equal(r.id, 77);
}

static void test_encode_bounds(void **state) {
        static uint8_t big[FRAME_MAX_BYTES_LIMIT + 1], buf[SEGLOG_RECORD_MAX + 16];
        struct seglog_record r = { .type = SEGLOG_FRAME, .id = 1, .seq = 1, .dev = "b", .jws = big };

        memset(big, 'A', sizeof big);
        r.len = FRAME_MAX_BYTES_LIMIT;
        assert_int_equal(seglog_record_encode(&r, buf, sizeof buf), SEGLOG_HEADER_BYTES + SEGLOG_FRAME_FIXED + 1 + FRAME_MAX_BYTES_LIMIT);
        assert_int_equal(seglog_record_encode(&r, buf, 100), -ENOBUFS);
        r.len = FRAME_MAX_BYTES_LIMIT + 1;
        assert_int_equal(seglog_record_encode(&r, buf, sizeof buf), -EINVAL);
        r.len = 0;
        assert_int_equal(seglog_record_encode(&r, buf, sizeof buf), -EINVAL);
        r.len = 1;
        r.seq = 0;
        assert_int_equal(seglog_record_encode(&r, buf, sizeof buf), -EINVAL);
        r.seq = FRAME_SEQ_MAX + 1;
        assert_int_equal(seglog_record_encode(&r, buf, sizeof buf), -EINVAL);
        r.seq = 1;
        r.id = 0;
        assert_int_equal(seglog_record_encode(&r, buf, sizeof buf), -EINVAL);
        r.id = 1;
        memset(r.dev, 'd', DEVICE_ID_MAX); /* 64 characters: the longest id */
        assert_true(seglog_record_encode(&r, buf, sizeof buf) > 0);
        (void) snprintf(r.dev, sizeof r.dev, "a/b");
        assert_int_equal(seglog_record_encode(&r, buf, sizeof buf), -EINVAL);
}

static void test_parse_refuses(void **state) {
        uint8_t buf[512], bad[512];
        struct seglog_record r = { .id = -1 };
        size_t n = put_frame(buf, sizeof buf, 5, "bulb-1", 42);

        /* Every single bit flipped anywhere: refused (the CRC or the magic), never accepted. */
        for (size_t i = 0; i < n; i++)
                for (int b = 0; b < 8; b++) {
                        memcpy(bad, buf, n);
                        bad[i] ^= (uint8_t) (1u << b);
                        int m = seglog_record_parse(bad, n, &r);
                        assert_true(m == -EBADMSG || m == -EAGAIN);
                }
        assert_int_equal(r.id, -1); /* untouched on failure */
        /* Cut anywhere: incomplete, not damaged (a torn append). */
        for (size_t i = 0; i < n; i++)
                assert_int_equal(seglog_record_parse(buf, i, &r), -EAGAIN);
        /* A length beyond the largest record is damage, not a record still to come. */
        bad[0] = 'S', bad[1] = 'E', bad[2] = 'G', bad[3] = '1';
        uint32_t len = SEGLOG_FRAME_FIXED + DEVICE_ID_MAX + FRAME_MAX_BYTES_LIMIT + 1;
        for (int i = 0; i < 4; i++)
                bad[4 + i] = (uint8_t) (len >> (8 * i));
        assert_int_equal(seglog_record_parse(bad, 12, &r), -EBADMSG);
}

static void test_scan_torn_tail(void **state) {
        uint8_t buf[1024];
        size_t ends[3], n = 0;

        n += put_frame(buf + n, sizeof buf - n, 1, "bulb-1", 1);
        ends[0] = n;
        n += put_frame(buf + n, sizeof buf - n, 2, "bulb-2", 1);
        ends[1] = n;
        n += put_frame(buf + n, sizeof buf - n, 3, "bulb-1", 2);
        ends[2] = n;
        /* A crash may stop an append at any byte: what is complete is kept, the rest is the tail. */
        for (size_t cut = 0; cut <= n; cut++) {
                struct collected c = {};
                struct seglog_scan_result s;
                size_t want = cut >= ends[2] ? 3 : cut >= ends[1] ? 2 : cut >= ends[0] ? 1 : 0;

                assert_int_equal(seglog_scan(buf, cut, collect, &c, &s), 0);
                assert_int_equal(c.n, want);
                assert_int_equal(s.records, want);
                assert_int_equal(s.damaged, 0);
                assert_int_equal(s.good_end, want ? ends[want - 1] : 0);
                assert_int_equal(s.tail_bytes, cut - s.good_end);
                assert_int_equal(s.last_frame_id, (int64_t) want);
        }
}

static void test_scan_damage_in_the_middle(void **state) {
        uint8_t buf[1024];
        struct collected c = {};
        struct seglog_scan_result s;
        struct seglog_record cur = { .type = SEGLOG_CURSOR, .id = 1 };
        size_t n = 0, second;

        n += put_frame(buf + n, sizeof buf - n, 1, "bulb-1", 1);
        second = n;
        n += put_frame(buf + n, sizeof buf - n, 2, "bulb-2", 1);
        n += (size_t) seglog_record_encode(&cur, buf + n, sizeof buf - n);
        n += put_frame(buf + n, sizeof buf - n, 3, "bulb-1", 2);
        buf[second + 40] ^= 0x20; /* inside the second frame's body */
        assert_int_equal(seglog_scan(buf, n, collect, &c, &s), 0);
        /* The damaged record is skipped and counted; the cursor and the frame after it are kept. */
        assert_int_equal(c.n, 3);
        assert_int_equal(c.ids[0], 1);
        assert_int_equal(c.ids[1], -1);
        assert_int_equal(c.ids[2], 3);
        assert_int_equal(s.damaged, 1);
        assert_int_equal(s.damaged_bytes, seglog_frame_record_size(6, strlen(JWS)));
        assert_int_equal(s.tail_bytes, 0);
        assert_int_equal(s.good_end, n);
}

static void test_scan_id_going_back_is_damage(void **state) {
        uint8_t buf[1024];
        struct collected c = {};
        struct seglog_scan_result s;
        size_t n = 0;

        n += put_frame(buf + n, sizeof buf - n, 5, "bulb-1", 1);
        n += put_frame(buf + n, sizeof buf - n, 5, "bulb-1", 1); /* the same id again */
        n += put_frame(buf + n, sizeof buf - n, 6, "bulb-1", 2);
        assert_int_equal(seglog_scan(buf, n, collect, &c, &s), 0);
        assert_int_equal(c.n, 2);
        assert_int_equal(c.ids[1], 6);
        assert_int_equal(s.damaged, 1);
}

static void test_scan_garbage(void **state) {
        static uint8_t buf[1 << 16];
        struct collected c = {};
        struct seglog_scan_result s;

        /* Zeros (a file extended but never written) and magic bytes with nothing valid after them:
         * all tail, no record, quickly. */
        for (size_t i = 0; i + 4 <= sizeof buf; i += 4)
                memcpy(buf + i, (i / 4) % 2 ? "SEG1" : "\0\0\0\0", 4);
        assert_int_equal(seglog_scan(buf, sizeof buf, collect, &c, &s), 0);
        assert_int_equal(c.n, 0);
        assert_int_equal(s.good_end, 0);
        assert_int_equal(s.tail_bytes, sizeof buf);
        assert_int_equal(seglog_scan(NULL, 0, NULL, NULL, &s), 0);
        assert_int_equal(s.tail_bytes, 0);
}

static int stop_at_two(const struct seglog_record *r, size_t off, size_t size, void *userdata) {
        return r->id == 2 ? -ECANCELED : 0;
}

static void test_scan_callback_stops(void **state) {
        uint8_t buf[1024];
        struct seglog_scan_result s = { .records = 99 };
        size_t n = 0;

        n += put_frame(buf + n, sizeof buf - n, 1, "a", 1);
        n += put_frame(buf + n, sizeof buf - n, 2, "a", 2);
        assert_int_equal(seglog_scan(buf, n, stop_at_two, NULL, &s), -ECANCELED);
        assert_int_equal(s.records, 99);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_crc32c),          cmocka_unit_test(test_roundtrip),
                cmocka_unit_test(test_encode_bounds),   cmocka_unit_test(test_parse_refuses),
                cmocka_unit_test(test_scan_torn_tail),  cmocka_unit_test(test_scan_damage_in_the_middle),
                cmocka_unit_test(test_scan_id_going_back_is_damage), cmocka_unit_test(test_scan_garbage),
                cmocka_unit_test(test_scan_callback_stops),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
