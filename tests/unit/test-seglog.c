/* SPDX-License-Identifier: MIT */
/* src/seglog.c: the segment log's records and the scan of a segment (torn tail, damage, bounds). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

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
        assert_int_equal(seglog_crc32c_portable(0, "123456789", 9), 0xe3069283);
        assert_int_equal(seglog_crc32c(0, "", 0), 0);
}

/* The instruction (where the CPU has it) and the table agree for every length and alignment, in
 * one piece and in two. Which one ran is printed: on amd64 and under qemu-aarch64 (the arm64
 * package's tests) it is the instruction. */
static void test_crc32c_paths(void **state) {
        uint8_t buf[600];
        uint32_t x = 0x12345678;

        for (size_t i = 0; i < sizeof buf; i++) {
                x = x * 1103515245u + 12345u;
                buf[i] = (uint8_t) (x >> 16);
        }
        print_message("CRC-32C: %s\n", seglog_crc32c_accelerated() ? "the CPU's instruction" : "the table");
        for (size_t off = 0; off < 8; off++)
                for (size_t len = 0; len + off <= sizeof buf; len += (len < 40 ? 1 : 37)) {
                        uint32_t want = seglog_crc32c_portable(0, buf + off, len);
                        assert_int_equal(seglog_crc32c(0, buf + off, len), want);
                        assert_int_equal(seglog_crc32c(seglog_crc32c(0, buf + off, len / 3), buf + off + len / 3, len - len / 3),
                                         want);
                }
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
                assert_false(s.tail_damaged);
                assert_int_equal(s.last_frame_id, (int64_t) want);
        }
}

/* The last record complete but damaged in place (a flipped bit on the card): the tail all the
 * same (nothing intact after it), but damage, not a torn append, which a crash leaves as a record
 * cut short or as zeros. Before, both were "torn": never acknowledged, said the start. */
static void test_scan_damaged_last_record(void **state) {
        uint8_t buf[1024];
        size_t last, n = 0;

        n += put_frame(buf + n, sizeof buf - n, 1, "bulb-1", 1);
        last = n;
        n += put_frame(buf + n, sizeof buf - n, 2, "bulb-2", 1);
        for (size_t i = last; i < n; i++) {
                struct collected c = {};
                struct seglog_scan_result s;
                uint8_t bad[1024];

                memcpy(bad, buf, n);
                bad[i] ^= 0x04;
                assert_int_equal(seglog_scan(bad, n, collect, &c, &s), 0);
                assert_int_equal(c.n, 1);
                assert_int_equal(s.good_end, last);
                assert_int_equal(s.tail_bytes, n - last);
                assert_int_equal(s.damaged, 0);
                /* A flip in the length field that makes the record look longer than the file
                 * reads as a record cut short: that one cannot be told from a torn append. */
                struct seglog_record r;
                bool looks_cut = seglog_record_parse(bad + last, n - last, &r) == -EAGAIN;
                assert_true(s.tail_damaged == !looks_cut);
        }
        /* A last record whose second part is a sector of zeros (a page of it never reached the
         * disk): torn, not damage. The record is made long enough to hold a whole sector. */
        {
                static uint8_t big[4096];
                static char jws[1500];
                struct seglog_scan_result s;
                struct seglog_record r = { .type = SEGLOG_FRAME, .id = 2, .seq = 1, .received_at_usec = 1 };
                size_t first = (size_t) put_frame(big, sizeof big, 1, "bulb-1", 1), end;

                memset(jws, 'e', sizeof jws - 1);
                r.jws = (const uint8_t *) jws;
                r.len = strlen(jws);
                (void) snprintf(r.dev, sizeof r.dev, "bulb-2");
                int m = seglog_record_encode(&r, big + first, sizeof big - first);
                assert_true(m > 1024);
                end = first + (size_t) m;
                assert_int_equal(seglog_scan(big, end, NULL, NULL, &s), 0);
                assert_int_equal(s.records, 2);
                memset(big + 1024, 0, 512); /* a sector inside the second record */
                assert_int_equal(seglog_scan(big, end, NULL, NULL, &s), 0);
                assert_int_equal(s.records, 1);
                assert_int_equal(s.tail_bytes, end - first);
                assert_false(s.tail_damaged);
                big[1024 + 100] = 1; /* no longer a whole sector of zeros: damage */
                assert_int_equal(seglog_scan(big, end, NULL, NULL, &s), 0);
                assert_true(s.tail_damaged);
        }
        /* Zeros where the last record should be: pages that never reached the disk. */
        {
                struct seglog_scan_result s;
                uint8_t z[1024];

                memcpy(z, buf, n);
                memset(z + last, 0, n - last);
                assert_int_equal(seglog_scan(z, n, NULL, NULL, &s), 0);
                assert_int_equal(s.tail_bytes, n - last);
                assert_false(s.tail_damaged);
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


/* The files: a fresh state directory per test. */
static char dir[64];

static int setup_dir(void **state) {
        (void) snprintf(dir, sizeof dir, "/tmp/test-seglog-XXXXXX");
        assert_non_null(mkdtemp(dir));
        return 0;
}

static int teardown_dir(void **state) {
        char path[160];
        DIR *d;
        struct dirent *de;

        (void) snprintf(path, sizeof path, "%s/spool", dir);
        d = opendir(path);
        while (d && (de = readdir(d)))
                if (de->d_name[0] != '.') {
                        char f[512];
                        (void) snprintf(f, sizeof f, "%s/%s", path, de->d_name);
                        (void) unlink(f);
                }
        if (d)
                (void) closedir(d);
        (void) rmdir(path);
        (void) rmdir(dir);
        return 0;
}

static struct seglog_record fr(int64_t id, const char *dev, int64_t seq) {
        struct seglog_record r = { .type = SEGLOG_FRAME, .id = id, .seq = seq, .received_at_usec = id,
                                   .jws = (const uint8_t *) JWS, .len = strlen(JWS) };
        (void) snprintf(r.dev, sizeof r.dev, "%s", dev);
        return r;
}

struct seqs {
        char dev[8][DEVICE_ID_MAX + 1];
        int64_t seq[8];
        size_t n;
};

static int take_seq(const char *dev, int64_t seq, void *userdata) {
        struct seqs *s = userdata;
        size_t i;

        for (i = 0; i < s->n && strcmp(s->dev[i], dev) != 0; i++)
                ;
        if (i == s->n) {
                assert_true(s->n < 8);
                (void) snprintf(s->dev[s->n++], DEVICE_ID_MAX + 1, "%s", dev);
                s->seq[i] = 0;
        }
        if (seq > s->seq[i])
                s->seq[i] = seq;
        return 0;
}

static int64_t seq_of(const struct seqs *s, const char *dev) {
        for (size_t i = 0; i < s->n; i++)
                if (strcmp(s->dev[i], dev) == 0)
                        return s->seq[i];
        return 0;
}

static int take_id(const struct seglog_record *r, void *userdata) {
        struct collected *c = userdata;
        if (c->n < ELEMENTSOF(c->ids))
                c->ids[c->n] = r->id;
        c->n++;
        return 0;
}

static struct seglog *open_log(size_t segment_bytes, int64_t mark, struct seqs *s, struct seglog_found *f) {
        struct seglog *l = NULL;
        char *err = NULL;
        int r = seglog_open(dir, segment_bytes, mark, s ? take_seq : NULL, s, NULL, 0, &l, f, &err);

        if (r < 0)
                fail_msg("seglog_open: %s", err ? err : strerror(-r));
        return l;
}

static size_t count_segments(void) {
        char path[160];
        size_t n = 0;
        DIR *d;
        struct dirent *de;

        (void) snprintf(path, sizeof path, "%s/spool", dir);
        d = opendir(path);
        assert_non_null(d);
        while ((de = readdir(d)))
                n += strncmp(de->d_name, "seg-", 4) == 0;
        (void) closedir(d);
        return n;
}

static void test_file_append_read_consume_reopen(void **state) {
        struct seglog *l = open_log(1 << 20, 0, NULL, NULL);
        struct seglog_record b1[] = { fr(1, "bulb-1", 10), fr(2, "bulb-2", 20) }, b2[] = { fr(3, "bulb-1", 11) };
        struct collected c = {};
        struct seglog_found f;
        struct seqs s = {};
        uint64_t pending, bytes, count;
        char path[160];
        struct stat st;

        (void) snprintf(path, sizeof path, "%s/spool", dir);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0700);
        assert_int_equal(seglog_append(l, b1, 2), 0);
        assert_int_equal(seglog_append(l, b2, 1), 0);
        assert_int_equal(seglog_append(l, b2, 1), -EINVAL); /* ids only grow */
        assert_int_equal(seglog_sync(l), 0);
        seglog_counts(l, &pending, &bytes);
        assert_int_equal(pending, 3);
        assert_int_equal(bytes, 3 * strlen(JWS));
        assert_int_equal(seglog_read_batch(l, 2, take_id, &c), 2);
        assert_int_equal(c.ids[0], 1);
        assert_int_equal(c.ids[1], 2);
        assert_int_equal(seglog_consume(l, 2, &count, &bytes), 0);
        assert_int_equal(count, 2);
        assert_int_equal(bytes, 2 * strlen(JWS));
        c.n = 0;
        assert_int_equal(seglog_read_batch(l, 10, take_id, &c), 1);
        assert_int_equal(c.ids[0], 3);
        assert_int_equal(seglog_sync(l), 0);
        seglog_close(l);

        /* A restart: the cursor holds, and the seqs of frames after the mark are reported. */
        l = open_log(1 << 20, 1, &s, &f);
        assert_int_equal(f.segments, 1);
        assert_int_equal(f.torn_bytes, 0);
        assert_int_equal(f.damaged, 0);
        seglog_counts(l, &pending, &bytes);
        assert_int_equal(pending, 1);
        assert_int_equal(seglog_last_id(l), 3);
        assert_int_equal(s.n, 2);
        assert_int_equal(seq_of(&s, "bulb-1"), 11);
        assert_int_equal(seq_of(&s, "bulb-2"), 20);
        c.n = 0;
        assert_int_equal(seglog_read_batch(l, 10, take_id, &c), 1);
        assert_int_equal(c.ids[0], 3);
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 1);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0600);
        seglog_close(l);
}

static void test_file_torn_tail_cut(void **state) {
        struct seglog *l = open_log(1 << 20, 0, NULL, NULL);
        struct seglog_record b[] = { fr(1, "a", 1), fr(2, "a", 2) };
        struct seglog_found f;
        uint8_t half[40];
        char path[160];
        struct stat st;
        uint64_t pending;
        int fd;

        assert_int_equal(seglog_append(l, b, 2), 0);
        assert_int_equal(seglog_sync(l), 0);
        seglog_close(l);
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 1);
        assert_int_equal(stat(path, &st), 0);
        /* A third record cut short by a crash. */
        struct seglog_record third = fr(3, "a", 3);
        uint8_t rec[256];
        assert_true(seglog_record_encode(&third, rec, sizeof rec) > (int) sizeof half);
        memcpy(half, rec, sizeof half);
        fd = open(path, O_WRONLY | O_APPEND);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, half, sizeof half), (ssize_t) sizeof half);
        (void) close(fd);

        l = open_log(1 << 20, 0, NULL, &f);
        assert_int_equal(f.torn_bytes, sizeof half);
        assert_int_equal(f.damaged, 0);
        seglog_counts(l, &pending, NULL);
        assert_int_equal(pending, 2);
        struct stat st2;
        assert_int_equal(stat(path, &st2), 0);
        assert_int_equal(st2.st_size, st.st_size); /* cut back */
        /* The next append follows the intact records, and is read back after them. */
        assert_int_equal(seglog_append(l, &third, 1), 0);
        struct collected c = {};
        assert_int_equal(seglog_read_batch(l, 10, take_id, &c), 3);
        assert_int_equal(c.ids[2], 3);
        seglog_close(l);
}

/* The newest segment's last record, synced, then damaged in place: counted as damage (an error
 * at start), not as an append a crash cut short (a notice that says it was never acknowledged);
 * cut off all the same so that appends go on after the intact records. */
static void test_file_damaged_last_record(void **state) {
        struct seglog *l = open_log(1 << 20, 0, NULL, NULL);
        struct seglog_record b[] = { fr(1, "a", 1), fr(2, "a", 2) };
        size_t rec = seglog_frame_record_size(1, strlen(JWS));
        struct seglog_found f;
        char path[160];
        struct stat st;
        uint64_t pending;
        uint8_t byte;
        int fd;

        assert_int_equal(seglog_append(l, b, 2), 0);
        assert_int_equal(seglog_sync(l), 0);
        seglog_close(l);
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 1);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal((size_t) st.st_size, 2 * rec);
        fd = open(path, O_RDWR);
        assert_true(fd >= 0);
        assert_int_equal(pread(fd, &byte, 1, st.st_size - 3), 1);
        byte ^= 0x10; /* in the JWS bytes of the second record */
        assert_int_equal(pwrite(fd, &byte, 1, st.st_size - 3), 1);
        (void) close(fd);

        l = open_log(1 << 20, 0, NULL, &f);
        assert_int_equal(f.damaged, 1);
        assert_int_equal(f.damaged_bytes, rec);
        assert_int_equal(f.torn_bytes, 0);
        seglog_counts(l, &pending, NULL);
        assert_int_equal(pending, 1);
        struct stat st2;
        assert_int_equal(stat(path, &st2), 0);
        assert_int_equal((size_t) st2.st_size, rec); /* cut back to the intact record */
        struct seglog_record third = fr(3, "a", 3);
        assert_int_equal(seglog_append(l, &third, 1), 0);
        struct collected c = {};
        assert_int_equal(seglog_read_batch(l, 10, take_id, &c), 2);
        assert_int_equal(c.ids[0], 1);
        assert_int_equal(c.ids[1], 3);
        seglog_close(l);
}

static void test_file_segments_damage_drop_retire(void **state) {
        /* Small segments: one record each, about. */
        size_t rec = seglog_frame_record_size(1, strlen(JWS));
        struct seglog *l = open_log(rec + 1, 0, NULL, NULL);
        struct seglog_found f;
        struct seqs s = {};
        struct collected c = {};
        uint64_t pending, count, bytes;
        char path[160];
        int fd;

        for (int64_t id = 1; id <= 4; id++) {
                struct seglog_record r = fr(id, id % 2 ? "a" : "b", 100 + id);
                assert_int_equal(seglog_append(l, &r, 1), 0);
        }
        assert_int_equal(seglog_sync(l), 0);
        assert_int_equal(count_segments(), 4);
        seglog_close(l);

        /* Segment 2 (not the newest) spoilt: its one record is lost; segments 3 and 4 are intact. */
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 2);
        fd = open(path, O_WRONLY);
        assert_true(fd >= 0);
        assert_int_equal(pwrite(fd, "X", 1, 50), 1);
        (void) close(fd);
        l = open_log(rec + 1, 0, &s, &f);
        assert_int_equal(f.segments, 4);
        /* Nothing intact after it in its segment, but a complete record that fails its check is
         * not what a crash leaves (a record cut short, zeros; test_file_older_torn_tail_not_damage):
         * damage, counted, and skipped all the same. */
        assert_int_equal(f.damaged, 1);
        assert_int_equal(f.damaged_bytes, rec);
        assert_int_equal(f.torn_older, 0);
        seglog_counts(l, &pending, NULL);
        assert_int_equal(pending, 3);
        assert_int_equal(seglog_read_batch(l, 10, take_id, &c), 3);
        assert_int_equal(c.ids[0], 1);
        assert_int_equal(c.ids[1], 3);
        assert_int_equal(c.ids[2], 4);
        assert_int_equal(seq_of(&s, "a"), 103);
        assert_int_equal(seq_of(&s, "b"), 104);

        /* [spool] max_bytes: the oldest segment's frames go; then it may be retired. */
        assert_int_equal(seglog_retirable(l, NULL, NULL), 0); /* frame 1 still waits */
        assert_int_equal(seglog_drop_oldest(l, &count, &bytes), 0);
        assert_int_equal(count, 1);
        seglog_counts(l, &pending, NULL);
        assert_int_equal(pending, 2);
        memset(&s, 0, sizeof s);
        assert_int_equal(seglog_retirable(l, take_seq, &s), 1);
        assert_int_equal(seq_of(&s, "a"), 101);
        assert_int_equal(seglog_retire(l), 0);
        assert_int_equal(count_segments(), 3);
        /* Segment 2 holds nothing intact that waits: it goes too. */
        assert_int_equal(seglog_retirable(l, NULL, NULL), 1);
        assert_int_equal(seglog_retire(l), 0);
        assert_int_equal(count_segments(), 2);
        /* Uploading 3 retires segment 3; segment 4 is the one written, it stays. */
        assert_int_equal(seglog_consume(l, 3, &count, NULL), 0);
        assert_int_equal(count, 1);
        assert_int_equal(seglog_retirable(l, NULL, NULL), 1);
        assert_int_equal(seglog_retire(l), 0);
        assert_int_equal(seglog_consume(l, 4, &count, NULL), 0);
        assert_int_equal(seglog_retirable(l, NULL, NULL), 0);
        assert_int_equal(seglog_drop_oldest(l, &count, &bytes), -ENOENT);
        seglog_counts(l, &pending, NULL);
        assert_int_equal(pending, 0);
        assert_int_equal(seglog_sync(l), 0);
        seglog_close(l);

        /* After a restart nothing waits, and ids go on from 4. */
        l = open_log(rec + 1, 0, NULL, &f);
        seglog_counts(l, &pending, NULL);
        assert_int_equal(pending, 0);
        assert_int_equal(seglog_last_id(l), 4);
        seglog_close(l);
}

/* The batch after the one in flight (cloud.c's follower): the frames past after_id, or past the
 * cursor when [spool] max_bytes dropped beyond after_id meanwhile; the one in flight is not read
 * for the caller, and consuming it leaves the follower's frames waiting. */
static void test_file_read_after(void **state) {
        size_t rec = seglog_frame_record_size(1, strlen(JWS));
        struct seglog *l = open_log(2 * rec + 1, 0, NULL, NULL); /* two frames a segment */
        struct collected c = {};
        uint64_t count, pending;

        for (int64_t id = 1; id <= 8; id++) {
                struct seglog_record r = fr(id, "a", id);
                assert_int_equal(seglog_append(l, &r, 1), 0);
        }
        assert_int_equal(seglog_sync(l), 0);
        assert_int_equal(seglog_read_batch(l, 3, take_id, &c), 3); /* the head: 1..3 */
        assert_int_equal(c.ids[2], 3);
        c.n = 0;
        assert_int_equal(seglog_read_batch_after(l, 3, 3, take_id, &c), 3); /* the follower: 4..6 */
        assert_int_equal(c.ids[0], 4);
        assert_int_equal(c.ids[2], 6);
        c.n = 0;
        assert_int_equal(seglog_read_batch_after(l, 8, 3, take_id, &c), 0); /* nothing after the newest */
        c.n = 0;
        assert_int_equal(seglog_read_batch_after(l, 0, 2, take_id, &c), 2); /* after 0: the oldest */
        assert_int_equal(c.ids[0], 1);
        assert_int_equal(seglog_read_batch_after(l, 3, 0, take_id, &c), -EINVAL);
        /* The head uploaded: the follower's frames still wait, read from the new position. */
        assert_int_equal(seglog_consume(l, 3, &count, NULL), 0);
        assert_int_equal(count, 3);
        c.n = 0;
        assert_int_equal(seglog_read_batch_after(l, 3, 3, take_id, &c), 3);
        assert_int_equal(c.ids[0], 4);
        /* The cap drops the oldest segments past after_id: the read starts at the cursor. */
        do {
                assert_int_equal(seglog_drop_oldest(l, &count, NULL), 0);
                seglog_counts(l, &pending, NULL);
        } while (pending > 3);
        assert_true(pending >= 1);
        c.n = 0;
        assert_int_equal(seglog_read_batch_after(l, 3, 3, take_id, &c), (int) pending);
        assert_int_equal(c.ids[0], 8 - (int64_t) pending + 1);
        assert_int_equal(c.ids[pending - 1], 8);
        seglog_close(l);
}

/* Older segments: a tail with nothing intact after it is a crash (a power cut after a roll, before
 * the sync), ignored quietly; a bad region with an intact record after it is damage, counted. */
static void test_file_older_torn_tail_not_damage(void **state) {
        struct seglog *l = open_log(1 << 20, 0, NULL, NULL);
        size_t rec = seglog_frame_record_size(1, strlen(JWS));
        struct seglog_found f;
        struct collected c = {};
        uint8_t buf[256];
        char path[160];
        uint64_t pending;
        int fd, n;

        for (int64_t id = 1; id <= 5; id++) {
                struct seglog_record r = fr(id, "a", id);
                assert_int_equal(seglog_append(l, &r, 1), 0);
                if (id % 2 == 0)
                        seglog_roll(l); /* segments 1 {1, 2}, 3 {3, 4}, 5 {5} */
        }
        assert_int_equal(seglog_sync(l), 0);
        seglog_close(l);
        assert_int_equal(count_segments(), 3);

        /* Segment 1: record 1 spoilt, record 2 intact after it: damage. */
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 1);
        fd = open(path, O_WRONLY);
        assert_true(fd >= 0);
        assert_int_equal(pwrite(fd, "X", 1, 50), 1);
        (void) close(fd);
        /* Segment 3: an append cut short by the crash, nothing after it. */
        struct seglog_record torn = fr(9, "a", 9);
        n = seglog_record_encode(&torn, buf, sizeof buf);
        assert_true(n > 40);
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 3);
        fd = open(path, O_WRONLY | O_APPEND);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, buf, 40), 40);
        (void) close(fd);

        l = open_log(1 << 20, 0, NULL, &f);
        assert_int_equal(f.segments, 3);
        assert_int_equal(f.damaged, 1);
        assert_int_equal(f.damaged_bytes, rec);
        assert_int_equal(f.torn_older, 1);
        assert_int_equal(f.torn_older_bytes, 40);
        assert_int_equal(f.torn_bytes, 0);
        seglog_counts(l, &pending, NULL);
        assert_int_equal(pending, 4);
        struct seglog_record six = fr(6, "a", 6);
        assert_int_equal(seglog_append(l, &six, 1), 0);
        assert_int_equal(seglog_read_batch(l, 10, take_id, &c), 5);
        assert_int_equal(c.ids[0], 2);
        assert_int_equal(c.ids[1], 3);
        assert_int_equal(c.ids[2], 4);
        assert_int_equal(c.ids[3], 5);
        assert_int_equal(c.ids[4], 6);
        seglog_close(l);
}

static void test_file_undo(void **state) {
        struct seglog *l = open_log(1 << 20, 0, NULL, NULL);
        struct seglog_record a = fr(1, "a", 1), b = fr(2, "a", 2);
        struct collected c = {};
        uint64_t pending;

        assert_int_equal(seglog_undo_append(l), -ENOENT);
        assert_int_equal(seglog_append(l, &a, 1), 0);
        assert_int_equal(seglog_undo_append(l), 0); /* the first segment goes again */
        assert_int_equal(count_segments(), 0);
        seglog_counts(l, &pending, NULL);
        assert_int_equal(pending, 0);
        assert_int_equal(seglog_last_id(l), 0);
        assert_int_equal(seglog_append(l, &a, 1), 0);
        assert_int_equal(seglog_append(l, &b, 1), 0);
        assert_int_equal(seglog_undo_append(l), 0);
        assert_int_equal(seglog_read_batch(l, 10, take_id, &c), 1);
        assert_int_equal(seglog_last_id(l), 1);
        assert_int_equal(seglog_append(l, &b, 1), 0); /* the id is free again */
        seglog_close(l);
}

static int check_big(const struct seglog_record *r, void *userdata) {
        struct collected *c = userdata;

        assert_int_equal(r->len, 60000);
        for (size_t i = 0; i < r->len; i++)
                if (r->jws[i] != (uint8_t) ('A' + r->id % 26))
                        fail_msg("frame %lld byte %zu", (long long) r->id, i);
        if (c->n < ELEMENTSOF(c->ids))
                c->ids[c->n] = r->id;
        c->n++;
        return 0;
}

/* Frames larger than the first read window, and damage in the middle of a big segment: read
 * back whole, in order, the damaged one skipped. */
static void test_file_big_frames_damage(void **state) {
        static uint8_t big[60000];
        struct seglog *l = open_log(4 << 20, 0, NULL, NULL);
        struct seglog_found f;
        struct collected c = {};
        uint64_t pending, count;
        char path[160];
        int fd;

        for (int64_t id = 1; id <= 10; id++) {
                struct seglog_record r = fr(id, "big", id);
                memset(big, 'A' + (int) (id % 26), sizeof big);
                r.jws = big;
                r.len = sizeof big;
                assert_int_equal(seglog_append(l, &r, 1), 0);
        }
        assert_int_equal(seglog_sync(l), 0);
        seglog_close(l);
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 1);
        fd = open(path, O_WRONLY);
        assert_true(fd >= 0);
        /* Inside the third frame's JWS: 2 records of 60,043 bytes before it. */
        assert_int_equal(pwrite(fd, "#", 1, 2 * 60043 + 30000), 1);
        (void) close(fd);
        l = open_log(4 << 20, 0, NULL, &f);
        assert_int_equal(f.damaged, 1);
        seglog_counts(l, &pending, NULL);
        assert_int_equal(pending, 9);
        assert_int_equal(seglog_read_batch(l, 100, check_big, &c), 9);
        assert_int_equal(c.ids[0], 1);
        assert_int_equal(c.ids[1], 2);
        assert_int_equal(c.ids[2], 4);
        assert_int_equal(c.ids[8], 10);
        assert_int_equal(seglog_consume(l, 4, &count, NULL), 0);
        assert_int_equal(count, 3);
        c.n = 0;
        assert_int_equal(seglog_read_batch(l, 1, check_big, &c), 1);
        assert_int_equal(c.ids[0], 5);
        seglog_close(l);
}

/* What a start finds, to compare a start from summaries with one that reads every segment. */
struct opened {
        struct seglog_found f;
        struct seqs s;
        uint64_t pending, bytes;
        int64_t last_id;
        struct collected ids;
};

static void open_and_take(size_t segment_bytes, const struct seglog_summary *sums, size_t n_sums,
                          struct opened *o) {
        struct seglog *l = NULL;
        char *err = NULL;
        int r;

        memset(o, 0, sizeof *o);
        r = seglog_open(dir, segment_bytes, 0, take_seq, &o->s, sums, n_sums, &l, &o->f, &err);
        if (r < 0)
                fail_msg("seglog_open: %s", err ? err : strerror(-r));
        seglog_counts(l, &o->pending, &o->bytes);
        o->last_id = seglog_last_id(l);
        assert_true(seglog_read_batch(l, 100, take_id, &o->ids) >= 0);
        seglog_close(l);
}

static void assert_same_log(const struct opened *a, const struct opened *b) {
        assert_int_equal(a->f.segments, b->f.segments);
        assert_int_equal(a->pending, b->pending);
        assert_int_equal(a->bytes, b->bytes);
        assert_int_equal(a->last_id, b->last_id);
        assert_int_equal(a->ids.n, b->ids.n);
        for (size_t i = 0; i < a->ids.n && i < ELEMENTSOF(a->ids.ids); i++)
                assert_int_equal(a->ids.ids[i], b->ids.ids[i]);
}

static off_t file_size(int64_t name_id) {
        char path[160];
        struct stat st;

        (void) snprintf(path, sizeof path, "%s/spool/seg-%016llx.log", dir, (unsigned long long) name_id);
        assert_int_equal(stat(path, &st), 0);
        return st.st_size;
}

/* Closed segments get summaries once a sync covered them; a start takes a summarized segment
 * from its summary (no read, its seqs not reported: they were stored with it) and gives the same
 * counts, ids, cursor and last id as one that reads everything. A missing summary, one whose size
 * is not the file's, one for a file that is gone: read (or ignored) as before. */
static void test_file_summaries(void **state) {
        struct seglog *l = open_log(1 << 20, 0, NULL, NULL);
        struct seglog_record seg1[] = { fr(1, "a", 1), fr(2, "b", 5) }, seg3[] = { fr(3, "a", 2), fr(4, "b", 6) },
                             seg5[] = { fr(5, "a", 3) }, seg6[] = { fr(6, "c", 1) };
        struct seglog_summary sums[4], x;
        struct opened full, fast;
        struct seqs s = {};
        uint64_t token, count;
        char path[160];
        size_t n = 0;
        int fd;

        assert_int_equal(seglog_append(l, seg1, 2), 0);
        assert_int_equal(seglog_consume(l, 1, &count, NULL), 0); /* a cursor record in segment 1 */
        seglog_roll(l);
        /* Closed, but its bytes not handed to a sync yet: no summary. */
        assert_int_equal(seglog_summary_pending(l), 0);
        assert_int_equal(seglog_sync(l), 0);
        token = seglog_summary_pending(l);
        assert_true(token > 0);
        assert_int_equal(seglog_append(l, seg3, 2), 0);
        seglog_roll(l);
        assert_int_equal(seglog_append(l, seg5, 1), 0);
        seglog_roll(l);
        assert_int_equal(seglog_append(l, seg6, 1), 0);
        /* Only what the first hand-over covered: segment 3 and 5 were handed over after it. */
        assert_int_equal(seglog_summary_next(l, token, take_seq, &s, &x), 1);
        assert_int_equal(x.name_id, 1);
        assert_int_equal(x.first_id, 1);
        assert_int_equal(x.last_id, 2);
        assert_int_equal(x.frames, 2);
        assert_int_equal(x.bytes, 2 * strlen(JWS));
        assert_int_equal(x.cursor, 1);
        assert_int_equal(seq_of(&s, "a"), 1);
        assert_int_equal(seq_of(&s, "b"), 5);
        /* Not stored yet: reported again. */
        assert_int_equal(seglog_summary_next(l, token, NULL, NULL, &x), 1);
        assert_int_equal(x.name_id, 1);
        seglog_summary_stored(l, 1);
        sums[n++] = x;
        assert_int_equal(seglog_summary_next(l, token, NULL, NULL, &x), 0);
        assert_int_equal(seglog_sync(l), 0);
        token = seglog_summary_pending(l);
        assert_true(token > 0);
        while (seglog_summary_next(l, token, NULL, NULL, &x) == 1) {
                seglog_summary_stored(l, x.name_id);
                sums[n++] = x;
        }
        /* 3 and 5; 6 is the one written. */
        assert_int_equal(n, 3);
        assert_int_equal(sums[1].name_id, 3);
        assert_int_equal(sums[1].cursor, 1);
        assert_int_equal(sums[2].name_id, 5);
        assert_int_equal(sums[2].frames, 1);
        assert_int_equal(seglog_summary_pending(l), 0);
        seglog_close(l);
        for (size_t i = 0; i < n; i++)
                assert_int_equal(sums[i].size, file_size(sums[i].name_id));

        open_and_take(1 << 20, NULL, 0, &full);
        open_and_take(1 << 20, sums, n, &fast);
        assert_int_equal(full.f.summarized, 0);
        assert_int_equal(fast.f.summarized, 3);
        assert_same_log(&full, &fast);
        assert_int_equal(fast.pending, 5); /* the cursor (1) came back */
        assert_int_equal(fast.ids.ids[0], 2);
        /* The full scan reports every bulb's seq; the summarized start only those of segment 6. */
        assert_int_equal(seq_of(&full.s, "a"), 3);
        assert_int_equal(seq_of(&full.s, "b"), 6);
        assert_int_equal(fast.s.n, 1);
        assert_int_equal(seq_of(&fast.s, "c"), 1);

        /* Segment 5 without its summary: read, its seq reported. */
        open_and_take(1 << 20, sums, 2, &fast);
        assert_int_equal(fast.f.summarized, 2);
        assert_same_log(&full, &fast);
        assert_int_equal(seq_of(&fast.s, "a"), 3);
        assert_int_equal(seq_of(&fast.s, "b"), 0);

        /* Segment 3 one byte longer than its summary says (a torn tail): read, not summarized. */
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 3);
        fd = open(path, O_WRONLY | O_APPEND);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, "S", 1), 1);
        (void) close(fd);
        open_and_take(1 << 20, sums, n, &fast);
        assert_int_equal(fast.f.summarized, 2);
        assert_int_equal(fast.f.torn_older, 1);
        assert_same_log(&full, &fast);
        assert_int_equal(seq_of(&fast.s, "a"), 2);
        assert_int_equal(seq_of(&fast.s, "b"), 6);

        /* Summaries that do not add up are not used. */
        struct seglog_summary bad[3] = { sums[0], sums[1], sums[2] };
        bad[0].frames = 1000;
        bad[2].first_id = 4; /* below its name */
        open_and_take(1 << 20, bad, 3, &fast);
        assert_int_equal(fast.f.summarized, 0);
        assert_same_log(&full, &fast);

        /* Segment 1 gone: its summary stands for nothing; the others still count. The log
         * without it, read whole, is the reference. */
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 1);
        assert_int_equal(unlink(path), 0);
        open_and_take(1 << 20, NULL, 0, &full);
        open_and_take(1 << 20, sums, n, &fast);
        assert_int_equal(fast.f.summarized, 1); /* 5 (3 is torn) */
        assert_same_log(&full, &fast);
        assert_int_equal(fast.pending, 4);
        l = open_log(1 << 20, 0, NULL, NULL);
        assert_false(seglog_has_segment(l, 1));
        assert_true(seglog_has_segment(l, 3));
        seglog_close(l);

        /* The newest segment gone: the cursor is still known from the summaries (segment 5's). */
        (void) snprintf(path, sizeof path, "%s/spool/seg-%016x.log", dir, 6);
        assert_int_equal(unlink(path), 0);
        open_and_take(1 << 20, NULL, 0, &full);
        open_and_take(1 << 20, sums, n, &fast);
        assert_same_log(&full, &fast);
        assert_int_equal(fast.pending, 3);
}

/* Segments found at open: an older one without a summary is summarizable once a sync of it is
 * through (an earlier run's bytes may be in the page cache only): it goes with the next
 * hand-over, a few at a time. The newest one only once appended to, closed and synced. */
static void test_file_summaries_after_open(void **state) {
        struct seglog *l = open_log(1 << 20, 0, NULL, NULL);
        struct seglog_record a = fr(1, "a", 1), b = fr(2, "a", 2), c = fr(3, "a", 3), d = fr(4, "a", 4);
        struct seglog_summary x;
        uint64_t token;
        int fds[8];
        size_t n;

        assert_int_equal(seglog_append(l, &a, 1), 0);
        seglog_roll(l);
        assert_int_equal(seglog_append(l, &b, 1), 0);
        seglog_roll(l);
        assert_int_equal(seglog_append(l, &c, 1), 0);
        seglog_close(l); /* never synced by this log: segments 1, 2, 3 */

        l = open_log(1 << 20, 0, NULL, NULL);
        /* Nothing handed over yet. */
        assert_int_equal(seglog_summary_pending(l), 0);
        /* A hand-over with room for one more descriptor: segment 1 goes with it. */
        assert_int_equal(seglog_sync_handoff(l, fds, 1, &n), 0);
        assert_int_equal(n, 1);
        (void) close(fds[0]);
        token = seglog_summary_pending(l);
        assert_true(token > 0);
        assert_int_equal(seglog_summary_next(l, token, NULL, NULL, &x), 1);
        assert_int_equal(x.name_id, 1);
        seglog_summary_stored(l, 1);
        assert_int_equal(seglog_summary_next(l, token, NULL, NULL, &x), 0);
        /* Segment 2 with the next sync; segment 3 is the newest: not before it is written. */
        assert_int_equal(seglog_sync(l), 0);
        token = seglog_summary_pending(l);
        assert_int_equal(seglog_summary_next(l, token, NULL, NULL, &x), 1);
        assert_int_equal(x.name_id, 2);
        assert_int_equal(x.size, file_size(2));
        seglog_summary_stored(l, 2);
        assert_int_equal(seglog_summary_next(l, token, NULL, NULL, &x), 0);
        seglog_roll(l);
        assert_int_equal(seglog_sync(l), 0);
        assert_int_equal(seglog_summary_pending(l), 0);
        seglog_close(l);

        l = open_log(1 << 20, 0, NULL, NULL);
        assert_int_equal(seglog_append(l, &d, 1), 0); /* into segment 3, the newest */
        seglog_roll(l);
        assert_int_equal(seglog_summary_pending(l), 0);
        assert_int_equal(seglog_sync(l), 0);
        token = seglog_summary_pending(l);
        assert_true(token > 0);
        /* Segments 1 and 2 are found again without summaries (none was passed): synced again. */
        while (seglog_summary_next(l, token, NULL, NULL, &x) == 1 && x.name_id != 3)
                seglog_summary_stored(l, x.name_id);
        assert_int_equal(x.name_id, 3);
        assert_int_equal(x.frames, 2);
        assert_int_equal(x.size, file_size(3));
        seglog_summary_stored(l, 3);
        assert_int_equal(seglog_summary_next(l, token, NULL, NULL, &x), 0);
        seglog_close(l);
}

/* A measurement, not a check: IOTHUB_SEGLOG_BENCH=<segments> fills that many 1 MiB segments
 * with frames like a bulb's (about 330 bytes a record; 8 bulbs: struct seqs holds no more) and times seglog_open() reading
 * them all and taking the closed ones from their summaries (warm page cache). Without the
 * variable, 4 segments, to keep the path tested. */
static void test_file_summaries_bench(void **state) {
        const char *env = getenv("IOTHUB_SEGLOG_BENCH");
        long segments = env ? strtol(env, NULL, 10) : 4;
        size_t seg_bytes = 1 << 20;
        static uint8_t jws[280];
        struct seglog *l = open_log(seg_bytes, 0, NULL, NULL);
        struct seglog_summary *sums = NULL;
        size_t n = 0, cap = 0;
        struct seglog_record batch[64];
        int64_t id = 0;
        uint64_t token, t0, t1, t2;
        struct seglog_found f;
        struct opened full, fast;
        struct seglog_summary x;

        memset(jws, 'J', sizeof jws);
        assert_true(segments >= 2 && segments <= 4096);
        for (;;) {
                for (size_t i = 0; i < ELEMENTSOF(batch); i++) {
                        id++;
                        batch[i] = fr(id, "x", (id + 7) / 8);
                        (void) snprintf(batch[i].dev, sizeof batch[i].dev, "bulb-%d", (int) (id % 8));
                        batch[i].jws = jws;
                        batch[i].len = sizeof jws;
                }
                assert_int_equal(seglog_append(l, batch, ELEMENTSOF(batch)), 0);
                if (count_segments() > (size_t) segments)
                        break;
        }
        assert_int_equal(seglog_sync(l), 0);
        token = seglog_summary_pending(l);
        while (seglog_summary_next(l, token, NULL, NULL, &x) == 1) {
                if (n == cap) {
                        cap = cap ? 2 * cap : 64;
                        sums = reallocarray(sums, cap, sizeof *sums);
                        assert_non_null(sums);
                }
                sums[n++] = x;
                seglog_summary_stored(l, x.name_id);
        }
        seglog_close(l);
        assert_int_equal(n, (size_t) segments);

        open_and_take(seg_bytes, NULL, 0, &full); /* warms the page cache */
        t0 = now_monotonic_usec();
        open_and_take(seg_bytes, NULL, 0, &full);
        t1 = now_monotonic_usec();
        open_and_take(seg_bytes, sums, n, &fast);
        t2 = now_monotonic_usec();
        assert_same_log(&full, &fast);
        assert_int_equal(fast.f.summarized, (uint64_t) segments);
        print_message("seglog_open of %ld closed segments + 1 (%lld frames): read whole %.1f ms, "
                      "from summaries %.1f ms (each including one read of the oldest batch)\n",
                      segments, (long long) id, (double) (t1 - t0) / 1000.0, (double) (t2 - t1) / 1000.0);
        (void) f;
        free(sums);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_crc32c),          cmocka_unit_test(test_crc32c_paths),          cmocka_unit_test(test_roundtrip),
                cmocka_unit_test(test_encode_bounds),   cmocka_unit_test(test_parse_refuses),
                cmocka_unit_test(test_scan_torn_tail),  cmocka_unit_test(test_scan_damaged_last_record),  cmocka_unit_test(test_scan_damage_in_the_middle),
                cmocka_unit_test(test_scan_id_going_back_is_damage), cmocka_unit_test(test_scan_garbage),
                cmocka_unit_test(test_scan_callback_stops),
                cmocka_unit_test_setup_teardown(test_file_append_read_consume_reopen, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_torn_tail_cut, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_damaged_last_record, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_older_torn_tail_not_damage, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_segments_damage_drop_retire, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_undo, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_read_after, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_big_frames_damage, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_summaries, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_summaries_after_open, setup_dir, teardown_dir),
                cmocka_unit_test_setup_teardown(test_file_summaries_bench, setup_dir, teardown_dir),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
