/* SPDX-License-Identifier: MIT */
/* The spool's segment log (include/iothub/seglog.h). First the records: encoding, a strict parser
 * and the scan of a segment that survives damage, pure (no I/O), fuzzed whole
 * (tests/fuzz/fuzz-seglog.c). Then the segment files: a directory of append-only files, the
 * newest one written, the oldest ones unlinked once nothing in them waits; records are read back
 * through windows of at most WINDOW bytes, so that memory stays small whatever the segment size, and the
 * scan checks every record it passes. */
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "iothub/seglog.h"

/* CRC-32C rather than zlib's CRC-32: better error detection for the record sizes here, no
 * library, and an instruction of its own on both the hub's CPUs (ARMv8's CRC32 extension, which
 * every Raspberry Pi from the 3 on has, and SSE 4.2 on a PC). Every record is summed twice (its
 * write, its read for the upload), and the byte-at-a-time table took 2.3 % of the daemon's CPU
 * in the relay bench's profile (issue 13, "CPU"): the instruction does 8 bytes in about the time
 * the table takes for one. The table stays for CPUs without it, checked against the instruction
 * by test-seglog. The choice and the table are made before main() (a constructor), so that the
 * sync thread and the loop never race to make them. */
static uint32_t crc_table[256];

uint32_t seglog_crc32c_portable(uint32_t crc, const void *buf, size_t len) {
        const uint8_t *p = buf;

        crc = ~crc;
        for (size_t i = 0; i < len; i++)
                crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
        return ~crc;
}

#if (defined(__x86_64__) || defined(__aarch64__)) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define CRC_HW 1
#if defined(__x86_64__)
#include <nmmintrin.h>
#define CRC_TARGET __attribute__((target("sse4.2")))
#define CRC_U64(c, v) ((uint32_t) _mm_crc32_u64((c), (v)))
#define CRC_U8(c, v) _mm_crc32_u8((c), (v))
static bool crc_hw_present(void) {
        return __builtin_cpu_supports("sse4.2");
}
#else
#include <arm_acle.h>
#include <sys/auxv.h>
#define CRC_TARGET __attribute__((target("+crc")))
#define CRC_U64(c, v) __crc32cd((c), (v))
#define CRC_U8(c, v) __crc32cb((c), (v))
static bool crc_hw_present(void) {
        return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}
#endif

/* The same sum (the instruction is the reflected Castagnoli polynomial, without the inversions). */
CRC_TARGET static uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len) {
        const uint8_t *p = buf;
        uint32_t c = ~crc;

        for (; len >= 8; p += 8, len -= 8) {
                uint64_t v;
                memcpy(&v, p, sizeof v);
                c = CRC_U64(c, v);
        }
        for (; len > 0; p++, len--)
                c = CRC_U8(c, *p);
        return ~c;
}
#endif

static uint32_t (*crc32c_impl)(uint32_t crc, const void *buf, size_t len) = seglog_crc32c_portable;

__attribute__((constructor)) static void crc_init(void) {
        for (uint32_t i = 0; i < 256; i++) {
                uint32_t c = i;
                for (int k = 0; k < 8; k++)
                        c = (c & 1) ? (c >> 1) ^ UINT32_C(0x82f63b78) : c >> 1;
                crc_table[i] = c;
        }
#ifdef CRC_HW
        if (crc_hw_present())
                crc32c_impl = crc32c_hw;
#endif
}

bool seglog_crc32c_accelerated(void) {
        return crc32c_impl != seglog_crc32c_portable;
}

uint32_t seglog_crc32c(uint32_t crc, const void *buf, size_t len) {
        return crc32c_impl(crc, buf, len);
}

static void put_u32(uint8_t *p, uint32_t v) {
        for (int i = 0; i < 4; i++)
                p[i] = (uint8_t) (v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v) {
        for (int i = 0; i < 8; i++)
                p[i] = (uint8_t) (v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static uint64_t get_u64(const uint8_t *p) {
        uint64_t v = 0;
        for (int i = 7; i >= 0; i--)
                v = v << 8 | p[i];
        return v;
}

/* The body's length bounds, by type (the header's len is checked against the widest first). */
#define BODY_MIN SEGLOG_BODY_FIXED
#define BODY_MAX (SEGLOG_FRAME_FIXED + DEVICE_ID_MAX + FRAME_MAX_BYTES_LIMIT)

int seglog_record_encode(const struct seglog_record *r, uint8_t *buf, size_t cap) {
        size_t devlen = 0, body, size;

        if (!r || !buf || r->id < 1)
                return -EINVAL;
        if (r->type == SEGLOG_FRAME) {
                devlen = strnlen(r->dev, DEVICE_ID_MAX + 1);
                if (!device_id_is_valid(r->dev, devlen) || r->seq < 1 || r->seq > FRAME_SEQ_MAX ||
                    r->received_at_usec < 0 || !r->jws || r->len == 0 || r->len > FRAME_MAX_BYTES_LIMIT)
                        return -EINVAL;
                body = SEGLOG_FRAME_FIXED + devlen + r->len;
        } else if (r->type == SEGLOG_CURSOR)
                body = SEGLOG_BODY_FIXED;
        else
                return -EINVAL;
        size = SEGLOG_HEADER_BYTES + body;
        if (cap < size)
                return -ENOBUFS;
        put_u32(buf, SEGLOG_MAGIC);
        put_u32(buf + 4, (uint32_t) body);
        uint8_t *b = buf + SEGLOG_HEADER_BYTES;
        b[0] = (uint8_t) r->type;
        b[1] = (uint8_t) devlen;
        b[2] = b[3] = 0;
        put_u64(b + 4, (uint64_t) r->id);
        if (r->type == SEGLOG_FRAME) {
                put_u64(b + 12, (uint64_t) r->seq);
                put_u64(b + 20, (uint64_t) r->received_at_usec);
                memcpy(b + SEGLOG_FRAME_FIXED, r->dev, devlen);
                memcpy(b + SEGLOG_FRAME_FIXED + devlen, r->jws, r->len);
        }
        put_u32(buf + 8, seglog_crc32c(seglog_crc32c(0, buf + 4, 4), b, body));
        return (int) size;
}

int seglog_record_parse(const uint8_t *buf, size_t len, struct seglog_record *ret) {
        struct seglog_record r = {};
        uint32_t body;
        const uint8_t *b;

        if (!buf || !ret)
                return -EINVAL;
        /* A header cut short: only its magic so far can say whether a record began here. */
        if (len < SEGLOG_HEADER_BYTES) {
                uint8_t m[4];
                put_u32(m, SEGLOG_MAGIC);
                return memcmp(buf, m, len < 4 ? len : 4) == 0 ? -EAGAIN : -EBADMSG;
        }
        if (get_u32(buf) != SEGLOG_MAGIC)
                return -EBADMSG;
        body = get_u32(buf + 4);
        if (body < BODY_MIN || body > BODY_MAX)
                return -EBADMSG;
        if (len - SEGLOG_HEADER_BYTES < body)
                return -EAGAIN;
        b = buf + SEGLOG_HEADER_BYTES;
        if (seglog_crc32c(seglog_crc32c(0, buf + 4, 4), b, body) != get_u32(buf + 8))
                return -EBADMSG;
        if (b[2] != 0 || b[3] != 0)
                return -EBADMSG;
        r.id = (int64_t) get_u64(b + 4);
        if (r.id < 1)
                return -EBADMSG;
        switch (b[0]) {
        case SEGLOG_CURSOR:
                if (b[1] != 0 || body != SEGLOG_BODY_FIXED)
                        return -EBADMSG;
                r.type = SEGLOG_CURSOR;
                break;
        case SEGLOG_FRAME: {
                size_t devlen = b[1];
                uint64_t seq, at;

                if (body < SEGLOG_FRAME_FIXED || devlen < 1 || devlen > DEVICE_ID_MAX ||
                    body - SEGLOG_FRAME_FIXED <= devlen)
                        return -EBADMSG;
                seq = get_u64(b + 12);
                at = get_u64(b + 20);
                if (seq < 1 || seq > (uint64_t) FRAME_SEQ_MAX || at > (uint64_t) INT64_MAX)
                        return -EBADMSG;
                if (!device_id_is_valid((const char *) b + SEGLOG_FRAME_FIXED, devlen))
                        return -EBADMSG;
                r.type = SEGLOG_FRAME;
                r.seq = (int64_t) seq;
                r.received_at_usec = (int64_t) at;
                memcpy(r.dev, b + SEGLOG_FRAME_FIXED, devlen);
                r.dev[devlen] = '\0';
                r.jws = b + SEGLOG_FRAME_FIXED + devlen;
                r.len = body - SEGLOG_FRAME_FIXED - devlen;
                if (r.len > FRAME_MAX_BYTES_LIMIT)
                        return -EBADMSG;
                break;
        }
        default:
                return -EBADMSG;
        }
        *ret = r;
        return (int) (SEGLOG_HEADER_BYTES + body);
}

/* The next offset at or after from where an intact record starts, or len. Only offsets with the
 * magic are parsed, so a scan over garbage costs a memcmp per byte, not a CRC. */
static size_t next_intact(const uint8_t *buf, size_t len, size_t from, int64_t last_frame_id) {
        uint8_t m[4];

        put_u32(m, SEGLOG_MAGIC);
        for (size_t o = from; o + SEGLOG_HEADER_BYTES <= len; o++) {
                struct seglog_record r;
                const uint8_t *p = memchr(buf + o, m[0], len - o);

                if (!p)
                        break;
                o = (size_t) (p - buf);
                if (len - o < SEGLOG_HEADER_BYTES)
                        break;
                if (memcmp(p, m, 4) != 0)
                        continue;
                if (seglog_record_parse(p, len - o, &r) > 0 && (r.type != SEGLOG_FRAME || r.id > last_frame_id))
                        return o;
        }
        return len;
}

static bool all_zero(const uint8_t *p, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (p[i] != 0)
                        return false;
        return true;
}

/* Whether buf[off, len) (buf: a segment from its first byte) shows pages that never reached the
 * disk: all zeros, or a whole 512-byte sector of zeros, which no record holds (a JWS is text). */
#define SEGLOG_SECTOR 512u
static bool looks_unwritten(const uint8_t *buf, size_t off, size_t len) {
        if (all_zero(buf + off, len - off))
                return true;
        for (size_t o = (off + SEGLOG_SECTOR - 1) / SEGLOG_SECTOR * SEGLOG_SECTOR; o + SEGLOG_SECTOR <= len;
             o += SEGLOG_SECTOR)
                if (all_zero(buf + o, SEGLOG_SECTOR))
                        return true;
        return false;
}

int seglog_scan(const uint8_t *buf, size_t len,
                int (*cb)(const struct seglog_record *r, size_t off, size_t size, void *userdata),
                void *userdata, struct seglog_scan_result *ret) {
        struct seglog_scan_result s = {};
        size_t off = 0;

        if ((!buf && len > 0) || !ret)
                return -EINVAL;
        while (off < len) {
                struct seglog_record r;
                int n = seglog_record_parse(buf + off, len - off, &r);

                if (n > 0 && r.type == SEGLOG_FRAME && r.id <= s.last_frame_id)
                        n = -EBADMSG; /* ids only grow: an old record where it cannot be is damage */
                if (n < 0) {
                        size_t next = next_intact(buf, len, off + 1, s.last_frame_id);
                        if (next >= len) {
                                /* The tail. A record cut short (-EAGAIN), or zeros (pages that
                                 * never reached the disk, looks_unwritten()), is what a crash
                                 * leaves of an append.
                                 * Bytes that are all there but are not a record (a flipped bit, a
                                 * header that makes no sense) were damaged after they were
                                 * written, possibly after they were synced and acknowledged. */
                                s.tail_damaged = n == -EBADMSG && !looks_unwritten(buf, off, len);
                                break;
                        }
                        s.damaged++;
                        s.damaged_bytes += next - off;
                        off = next;
                        continue;
                }
                if (cb) {
                        int r2 = cb(&r, off, (size_t) n, userdata);
                        if (r2 < 0)
                                return r2;
                }
                s.records++;
                if (r.type == SEGLOG_FRAME)
                        s.last_frame_id = r.id;
                off += (size_t) n;
                s.good_end = off;
        }
        s.tail_bytes = len - s.good_end;
        *ret = s;
        return 0;
}

/* ---- The segment files ---- */

#define SPOOL_DIR "spool"
/* A window holds at least two of the largest records, so that every window read makes
 * progress (a record cut by the window's end is read again at the start of the next). */
#define WINDOW (256u * 1024u)
_Static_assert(WINDOW >= 2 * SEGLOG_RECORD_MAX, "a window must hold two records");
/* Reads start with a window this small (a batch of ordinary frames, the oldest frame's time),
 * and take the full one only where no record is complete in it. */
#define WINDOW_SMALL (32u * 1024u)
/* Older segments found at open without a summary (an earlier version's, or closed just before
 * a stop) handed over to the sync with each hand-over, at most this many at a time (each is a
 * sync of a file that is normally clean, and a read on the loop for its summary after). */
#define FOUND_SYNC_MAX 4u
/* The largest segment file read at start: segment_bytes is at most this minus one record. */
#define SEGMENT_FILE_MAX (64u * 1024u * 1024u)

struct segment {
        int64_t name_id;         /* the id in the file name */
        int64_t first_id, last_id; /* its frames' ids (0 when it holds none) */
        uint64_t frames, bytes;  /* all its frames and their JWS bytes */
        uint64_t size;           /* where the next record goes (the newest) or the end */
        int64_t cursor;          /* the highest cursor record in it (0: none) */
        int fd;                  /* open while written or waiting for its sync, -1 otherwise */
        bool dirty;              /* written since its last fdatasync */
        /* For seglog_summary_next(): the hand-over (seglog_sync(), seglog_sync_handoff(), counted
         * in l->handoffs) that took its last bytes, 0: none since it was opened (a segment an
         * earlier run left may be in the page cache only); and whether its summary is stored
         * (taken from one at open, or seglog_summary_stored()). */
        uint64_t covered_at;
        bool summarized;
        bool found_unsynced;     /* an older segment read whole at open, intact to its end */
};

struct seglog {
        int dir_fd;
        struct segment *segs;
        size_t n, cap;
        bool writing;            /* the last segment is the one appended to */
        bool dir_dirty;          /* a segment was created since the directory's last fsync */
        size_t segment_bytes;
        int64_t last_id;
        int64_t cursor;          /* every frame up to this id has left the spool */
        uint64_t pending, bytes;
        size_t rd_seg;           /* where the first waiting frame is, or the end */
        uint64_t rd_off;
        bool retire_ready;       /* seglog_retirable() reported segs[0] */
        uint64_t handoffs;       /* seglog_sync() and seglog_sync_handoff() calls that took bytes */
        struct {
                bool valid, created;
                uint64_t size, frames, bytes, pending, pbytes;
                int64_t first_id, last_id, l_last_id;
        } undo;
        uint8_t *buf;
        size_t cap_buf;
};

static void name_of(int64_t id, char out[32]) {
        (void) snprintf(out, 32, "seg-%016" PRIx64 ".log", (uint64_t) id);
}

/* seg-<16 lower-case hex digits>.log, nothing else. */
static bool parse_name(const char *s, int64_t *ret) {
        uint64_t v = 0;

        if (strlen(s) != 24 || strncmp(s, "seg-", 4) != 0 || strcmp(s + 20, ".log") != 0)
                return false;
        for (int i = 4; i < 20; i++) {
                char c = s[i];
                if (c >= '0' && c <= '9')
                        v = v << 4 | (uint64_t) (c - '0');
                else if (c >= 'a' && c <= 'f')
                        v = v << 4 | (uint64_t) (c - 'a' + 10);
                else
                        return false;
        }
        if (v < 1 || v > INT64_MAX)
                return false;
        *ret = (int64_t) v;
        return true;
}

static int cmp_seg(const void *a, const void *b) {
        const struct segment *x = a, *y = b;
        return x->name_id < y->name_id ? -1 : x->name_id > y->name_id;
}

void seglog_close(struct seglog *l) {
        if (!l)
                return;
        for (size_t i = 0; i < l->n; i++)
                if (l->segs[i].fd >= 0)
                        (void) close(l->segs[i].fd);
        if (l->dir_fd >= 0)
                (void) close(l->dir_fd);
        free(l->segs);
        free(l->buf);
        free(l);
}

static int open_seg(struct seglog *l, struct segment *s, int flags) {
        char name[32];
        int fd;

        if (s->fd >= 0)
                return s->fd;
        name_of(s->name_id, name);
        fd = openat(l->dir_fd, name, flags | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0600);
        if (fd < 0)
                return -errno;
        return fd;
}

static int pread_full(int fd, uint8_t *buf, size_t len, uint64_t off, size_t *ret) {
        size_t got = 0;

        while (got < len) {
                ssize_t k = pread(fd, buf + got, len - got, (off_t) (off + got));
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        break;
                got += (size_t) k;
        }
        *ret = got;
        return 0;
}

static int pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t off) {
        size_t done = 0;

        while (done < len) {
                ssize_t k = pwrite(fd, buf + done, len - done, (off_t) (off + done));
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        return -EIO;
                done += (size_t) k;
        }
        return 0;
}

/* Walks the records from segment s, offset off, to the end of the log, through windows; cb
 * returns 0 to go on, 1 to stop (the walk returns 1), or a negative errno. */
typedef int (*walk_cb)(const struct seglog_record *r, size_t seg, uint64_t off, size_t size, void *userdata);

struct walk_ctx {
        walk_cb cb;
        void *userdata;
        size_t seg;
        uint64_t base;
        int stop;
};

static int walk_one(const struct seglog_record *r, size_t off, size_t size, void *userdata) {
        struct walk_ctx *w = userdata;
        int k = w->cb(r, w->seg, w->base + off, size, w->userdata);

        if (k > 0) {
                w->stop = k;
                return -ECANCELED;
        }
        return k;
}

static int walk(struct seglog *l, size_t s, uint64_t off, size_t last_seg, walk_cb cb, void *userdata) {
        _cleanup_free_ uint8_t *buf = NULL;
        size_t cap = 0, win = WINDOW_SMALL;
        int r;

        for (; s <= last_seg && s < l->n; s++, off = 0) {
                struct segment *g = &l->segs[s];
                _cleanup_close_ int own = -1;
                int fd = g->fd;

                if (off >= g->size)
                        continue;
                if (fd < 0) {
                        own = open_seg(l, g, O_RDONLY);
                        if (own < 0)
                                return own;
                        fd = own;
                }
                while (off < g->size) {
                        struct walk_ctx w = { .cb = cb, .userdata = userdata, .seg = s, .base = off };
                        struct seglog_scan_result res;
                        size_t want = g->size - off < win ? (size_t) (g->size - off) : win, got;

                        if (want > cap) {
                                uint8_t *t = realloc(buf, want);
                                if (!t)
                                        return -ENOMEM;
                                buf = t;
                                cap = want;
                        }
                        r = pread_full(fd, buf, want, off, &got);
                        if (r < 0)
                                return r;
                        /* pread_full() sets got unless it returns -errno < 0:
                         * NOLINTNEXTLINE(clang-analyzer-core.UndefinedBinaryOperatorResult) */
                        if (got < want)
                                return -EUCLEAN; /* the file shrank behind our back */
                        r = seglog_scan(buf, got, walk_one, &w, &res);
                        if (r == -ECANCELED && w.stop)
                                return w.stop;
                        if (r < 0)
                                return r;
                        if (off + got >= g->size)
                                break; /* the segment's end: its tail was cut or counted at start */
                        if (res.good_end == 0 && win < WINDOW) {
                                /* No record complete in a small window (a large frame, or
                                 * damage): the same place again through the full one. */
                                win = WINDOW;
                                continue;
                        }
                        /* Next window at the first record not yet complete here; past damage
                         * with no record in this window, by what surely holds no record start
                         * of an intact one that fits. */
                        off += res.good_end > 0 ? res.good_end : got - SEGLOG_RECORD_MAX;
                }
        }
        return 0;
}

/* Start: one segment's records. */
struct open_ctx {
        struct segment *seg;
        int64_t mark, cursor;
        int (*seq_cb)(const char *dev, int64_t seq, void *userdata);
        void *userdata;
};

static int open_one(const struct seglog_record *r, size_t off, size_t size, void *userdata) {
        struct open_ctx *c = userdata;
        int k;

        if (r->type == SEGLOG_CURSOR) {
                if (r->id > c->cursor)
                        c->cursor = r->id;
                if (r->id > c->seg->cursor)
                        c->seg->cursor = r->id;
                return 0;
        }
        if (c->seg->frames == 0)
                c->seg->first_id = r->id;
        c->seg->last_id = r->id;
        c->seg->frames++;
        c->seg->bytes += r->len;
        if (c->seq_cb && r->id > c->mark) {
                k = c->seq_cb(r->dev, r->seq, c->userdata);
                if (k < 0)
                        return k;
        }
        return 0;
}

/* Start: counting the waiting frames of the segment the cursor is in, and where they begin. */
struct pend_ctx {
        struct seglog *l;
        bool found;
};

static int pend_one(const struct seglog_record *r, size_t seg, uint64_t off, size_t size, void *userdata) {
        struct pend_ctx *c = userdata;

        if (r->type != SEGLOG_FRAME || r->id <= c->l->cursor)
                return 0;
        if (!c->found) {
                c->found = true;
                c->l->rd_seg = seg;
                c->l->rd_off = off;
        }
        c->l->pending++;
        c->l->bytes += r->len;
        return 0;
}

static int cmp_summary(const void *key, const void *elem) {
        const int64_t *id = key;
        const struct seglog_summary *x = elem;
        return *id < x->name_id ? -1 : *id > x->name_id;
}

/* A summary that can stand for a file of this size: the numbers fit together (they come from
 * the database, which holds them for this log only; still, a wrong one must not make the
 * counts absurd). */
static bool summary_fits(const struct seglog_summary *x, uint64_t file_size) {
        if (x->size != file_size || x->size > SEGMENT_FILE_MAX || x->cursor < 0 || x->bytes > x->size)
                return false;
        if (x->frames == 0)
                return x->first_id == 0 && x->last_id == 0 && x->bytes == 0;
        return x->first_id >= x->name_id && x->last_id >= x->first_id &&
               x->frames - 1 <= (uint64_t) (x->last_id - x->first_id) &&
               x->frames <= x->size / (SEGLOG_HEADER_BYTES + SEGLOG_FRAME_FIXED + 2);
}

int seglog_open(const char *state_dir, size_t segment_bytes, int64_t seqs_mark,
                int (*seq_cb)(const char *dev, int64_t seq, void *userdata), void *userdata,
                const struct seglog_summary *sums, size_t n_sums, struct seglog **ret,
                struct seglog_found *ret_found, char **ret_error) {
        _cleanup_(seglog_closep) struct seglog *l = NULL;
        _cleanup_close_ int sfd = -1, dir_fd = -1;
        struct seglog_found found = {};
        struct stat st;
        DIR *d;
        int r;

        if (!state_dir || !ret || segment_bytes == 0 || segment_bytes > SEGMENT_FILE_MAX - SEGLOG_RECORD_MAX)
                return -EINVAL;
        sfd = open(state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (sfd < 0)
                return set_error_message(ret_error, -errno, "cannot open %s: %s", state_dir, strerror(errno));
        if (mkdirat(sfd, SPOOL_DIR, 0700) < 0 && errno != EEXIST)
                return set_error_message(ret_error, -errno, "cannot create %s/" SPOOL_DIR ": %s", state_dir,
                                         strerror(errno));
        dir_fd = openat(sfd, SPOOL_DIR, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
        if (dir_fd < 0)
                return set_error_message(ret_error, -errno, "cannot open %s/" SPOOL_DIR ": %s", state_dir,
                                         strerror(errno));
        if (fstat(dir_fd, &st) < 0)
                return set_error_message(ret_error, -errno, "cannot stat %s/" SPOOL_DIR ": %s", state_dir,
                                         strerror(errno));
        if (st.st_uid != geteuid())
                return set_error_message(ret_error, -EPERM, "%s/" SPOOL_DIR " is owned by uid %u, not us (uid %u)",
                                         state_dir, (unsigned) st.st_uid, (unsigned) geteuid());
        if ((st.st_mode & 077) != 0 && fchmod(dir_fd, 0700) < 0)
                return set_error_message(ret_error, -errno, "cannot make %s/" SPOOL_DIR " private: %s", state_dir,
                                         strerror(errno));

        /* Allocated once the directory is checked: the checks above return with nothing to free. */
        l = calloc(1, sizeof *l);
        if (!l)
                return -ENOMEM;
        l->dir_fd = TAKE_FD(dir_fd);
        l->segment_bytes = segment_bytes;

        /* The segments, oldest first. Other names are not ours and are left alone. */
        int dfd = dup(l->dir_fd);
        if (dfd < 0 || !(d = fdopendir(dfd))) {
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees l */
                r = -errno;
                if (dfd >= 0)
                        (void) close(dfd);
                /* cppcheck-suppress memleak ; freed by _cleanup_(seglog_closep) */
                return set_error_message(ret_error, r, "cannot list %s/" SPOOL_DIR ": %s", state_dir, strerror(-r));
        }
        for (struct dirent *de; (errno = 0, de = readdir(d));) {
                int64_t id;

                if (!parse_name(de->d_name, &id))
                        continue;
                if (l->n == l->cap) {
                        size_t cap = l->cap ? l->cap * 2 : 16;
                        struct segment *t = reallocarray(l->segs, cap, sizeof *t);
                        if (!t) {
                                (void) closedir(d);
                                return -ENOMEM;
                        }
                        l->segs = t;
                        l->cap = cap;
                }
                l->segs[l->n++] = (struct segment){ .name_id = id, .fd = -1 };
        }
        r = errno ? -errno : 0;
        (void) closedir(d);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot list %s/" SPOOL_DIR ": %s", state_dir, strerror(-r));
        if (l->n > 0)
                qsort(l->segs, l->n, sizeof *l->segs, cmp_seg);

        for (size_t i = 0; i < l->n; i++) {
                struct segment *g = &l->segs[i];
                bool newest = i + 1 == l->n;
                _cleanup_free_ uint8_t *data = NULL;
                _cleanup_close_ int fd = -1;
                struct seglog_scan_result res;
                struct open_ctx c = { .seg = g, .mark = seqs_mark, .cursor = l->cursor, .seq_cb = seq_cb,
                                      .userdata = userdata };
                const struct seglog_summary *sum = NULL;
                char name[32];
                size_t got;

                name_of(g->name_id, name);
                /* A closed segment whose summary was stored after a sync covered it, and whose
                 * size is still the summary's: taken from it, not read (its frames' seqs were
                 * stored in bulb_seqs with it). The newest segment is always read: it is the one
                 * appended to from now on. */
                if (!newest && n_sums > 0)
                        sum = bsearch(&g->name_id, sums, n_sums, sizeof *sums, cmp_summary);
                if (sum) {
                        if (fstatat(l->dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                                return set_error_message(ret_error, -errno, "cannot stat %s/" SPOOL_DIR "/%s: %s",
                                                         state_dir, name, strerror(errno));
                        /* Ids that overlap the segment before: read, and refused there if so. */
                        if (S_ISREG(st.st_mode) && st.st_size >= 0 && summary_fits(sum, (uint64_t) st.st_size) &&
                            (sum->frames == 0 || sum->first_id > l->last_id)) {
                                g->first_id = sum->first_id;
                                g->last_id = sum->last_id;
                                g->frames = sum->frames;
                                g->bytes = sum->bytes;
                                g->size = sum->size;
                                g->cursor = sum->cursor;
                                g->summarized = true;
                                if (sum->cursor > l->cursor)
                                        l->cursor = sum->cursor;
                                if (g->frames > 0)
                                        l->last_id = g->last_id;
                                found.summarized++;
                                continue;
                        }
                }
                fd = openat(l->dir_fd, name, (newest ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
                if (fd < 0 || fstat(fd, &st) < 0)
                        return set_error_message(ret_error, -errno, "cannot open %s/" SPOOL_DIR "/%s: %s", state_dir,
                                                 name, strerror(errno));
                if (!S_ISREG(st.st_mode))
                        return set_error_message(ret_error, -EUCLEAN, "%s/" SPOOL_DIR "/%s is not a regular file",
                                                 state_dir, name);
                if ((uint64_t) st.st_size > SEGMENT_FILE_MAX)
                        return set_error_message(ret_error, -EFBIG, "%s/" SPOOL_DIR "/%s is larger than %u bytes",
                                                 state_dir, name, SEGMENT_FILE_MAX);
                data = malloc((size_t) st.st_size ?: 1);
                if (!data)
                        return -ENOMEM;
                r = pread_full(fd, data, (size_t) st.st_size, 0, &got);
                if (r < 0)
                        return set_error_message(ret_error, r, "cannot read %s/" SPOOL_DIR "/%s: %s", state_dir, name,
                                                 strerror(-r));
                r = seglog_scan(data, got, open_one, &c, &res);
                if (r < 0)
                        return set_error_message(ret_error, r, "cannot read %s/" SPOOL_DIR "/%s: %s", state_dir, name,
                                                 strerror(-r));
                if (g->frames > 0 && (g->first_id <= l->last_id))
                        return set_error_message(ret_error, -EUCLEAN,
                                                 "%s/" SPOOL_DIR "/%s: frame ids overlap the segment before it",
                                                 state_dir, name);
                l->cursor = c.cursor;
                if (g->frames > 0)
                        l->last_id = g->last_id;
                found.damaged += res.damaged;
                found.damaged_bytes += res.damaged_bytes;
                if (res.tail_damaged) {
                        /* The last record damaged in place: counted as damage, not as a crash
                         * (it may have been acknowledged); cut or ignored like a torn tail. */
                        found.damaged++;
                        found.damaged_bytes += res.tail_bytes;
                }
                if (newest) {
                        /* An append that a crash cut short: never synced, never acked. */
                        if (res.tail_bytes > 0 && ftruncate(fd, (off_t) res.good_end) < 0)
                                return set_error_message(ret_error, -errno, "cannot cut the torn end of %s/" SPOOL_DIR
                                                         "/%s: %s", state_dir, name, strerror(errno));
                        if (!res.tail_damaged)
                                found.torn_bytes = res.tail_bytes;
                        g->size = res.good_end;
                        g->fd = TAKE_FD(fd);
                        g->dirty = res.tail_bytes > 0;
                        l->writing = true;
                } else {
                        /* A torn tail here is a crash too, not damage: an older segment ends torn
                         * when power failed after a roll but before the sync of its last append
                         * (write-back does not keep the order of writes: the new segment's name
                         * and records may be on disk while the old one's last pages are not), or
                         * after a start that cut the newest segment's tail and rolled before that
                         * cut was synced. Nothing of it was acknowledged (a sync covers every
                         * dirty segment at once). Left as it is, never read (size stops at the
                         * last intact record), unlinked with the segment. */
                        if (res.tail_bytes > 0 && !res.tail_damaged) {
                                found.torn_older++;
                                found.torn_older_bytes += res.tail_bytes;
                        }
                        g->size = res.good_end;
                        /* Summarized once a sync of it is through (seglog_sync_handoff()). */
                        g->found_unsynced = res.tail_bytes == 0;
                }
        }
        found.segments = l->n;

        /* What waits: the frames above the cursor (the walk also finds where they begin). */
        l->rd_seg = l->n;
        for (size_t i = 0; i < l->n; i++)
                if (l->segs[i].frames > 0 && l->segs[i].last_id > l->cursor) {
                        struct pend_ctx p = { .l = l };
                        r = walk(l, i, 0, i, pend_one, &p);
                        if (r < 0)
                                return set_error_message(ret_error, r, "cannot read the spool's segments: %s",
                                                         strerror(-r));
                        for (size_t j = i + 1; j < l->n; j++) {
                                l->pending += l->segs[j].frames;
                                l->bytes += l->segs[j].bytes;
                        }
                        break;
                }
        if (ret_found)
                *ret_found = found;
        *ret = TAKE_PTR(l);
        return 0;
}

void seglog_counts(const struct seglog *l, uint64_t *ret_pending, uint64_t *ret_bytes) {
        if (ret_pending)
                *ret_pending = l->pending;
        if (ret_bytes)
                *ret_bytes = l->bytes;
}

int64_t seglog_last_id(const struct seglog *l) {
        return l->last_id;
}

static int buf_reserve(struct seglog *l, size_t need) {
        if (need <= l->cap_buf)
                return 0;
        size_t cap = l->cap_buf ? l->cap_buf : 4096;
        while (cap < need)
                cap *= 2;
        uint8_t *b = realloc(l->buf, cap);
        if (!b)
                return -ENOMEM;
        l->buf = b;
        l->cap_buf = cap;
        return 0;
}

static int add_seg(struct seglog *l, int64_t id) {
        struct segment *g;
        char name[32];
        int fd;

        if (l->n == l->cap) {
                size_t cap = l->cap ? l->cap * 2 : 16;
                struct segment *t = reallocarray(l->segs, cap, sizeof *t);
                if (!t)
                        return -ENOMEM;
                l->segs = t;
                l->cap = cap;
        }
        name_of(id, name);
        fd = openat(l->dir_fd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0600);
        if (fd < 0)
                return -errno;
        g = &l->segs[l->n++];
        *g = (struct segment){ .name_id = id, .fd = fd };
        l->writing = true;
        l->dir_dirty = true;
        return 0;
}

/* The segment appended to is done with: its descriptor stays open until its sync if it has
 * unsynced bytes. */
void seglog_roll(struct seglog *l) {
        if (!l->writing)
                return;
        l->writing = false;
        /* Closed for good: not even an undo changes it now (its summary would be wrong). */
        l->undo.valid = false;
        struct segment *g = &l->segs[l->n - 1];
        if (!g->dirty && g->fd >= 0) {
                (void) close(g->fd);
                g->fd = -1;
        }
}

static int append_records(struct seglog *l, const struct seglog_record *frames, size_t n) {
        struct seglog_record cur = { .type = SEGLOG_CURSOR, .id = 0 };
        size_t need = 0, len = 0;
        int64_t id = l->last_id;
        struct segment *g;
        bool created = false, none_waiting = l->pending == 0;
        int r, k;

        l->undo.valid = false;
        if (n == 0)
                return 0;
        for (size_t i = 0; i < n; i++) {
                if (frames[i].type != SEGLOG_FRAME || frames[i].id <= id || frames[i].len > FRAME_MAX_BYTES_LIMIT)
                        return -EINVAL;
                id = frames[i].id;
                need += seglog_frame_record_size(DEVICE_ID_MAX, frames[i].len);
        }
        if (l->writing && l->segs[l->n - 1].size > 0 && l->segs[l->n - 1].size + need > l->segment_bytes)
                seglog_roll(l);
        if (!l->writing) {
                r = add_seg(l, frames[0].id);
                if (r < 0)
                        return r;
                created = true;
        }
        g = &l->segs[l->n - 1];
        r = buf_reserve(l, need + SEGLOG_HEADER_BYTES + SEGLOG_BODY_FIXED);
        if (r < 0)
                goto fail;
        /* A new segment starts with the cursor, so that the newest file always has it. */
        if (created && l->cursor > 0) {
                cur.id = l->cursor;
                k = seglog_record_encode(&cur, l->buf, l->cap_buf);
                if (k < 0) {
                        r = k;
                        goto fail;
                }
                len += (size_t) k;
        }
        for (size_t i = 0; i < n; i++) {
                k = seglog_record_encode(&frames[i], l->buf + len, l->cap_buf - len);
                if (k < 0) {
                        r = k;
                        goto fail;
                }
                len += (size_t) k;
        }
        r = pwrite_full(g->fd, l->buf, len, g->size);
        if (r < 0) {
                /* Whatever part went in, it goes (a later append would otherwise follow it). */
                if (!created && ftruncate(g->fd, (off_t) g->size) < 0)
                        r = -EIO;
                goto fail;
        }
        l->undo = (__typeof__(l->undo)){ .valid = true, .created = created, .size = g->size, .frames = g->frames,
                                     .bytes = g->bytes, .pending = l->pending, .pbytes = l->bytes,
                                     .first_id = g->first_id, .last_id = g->last_id, .l_last_id = l->last_id };
        if (g->frames == 0)
                g->first_id = frames[0].id;
        g->last_id = id;
        g->size += len;
        g->dirty = true;
        g->summarized = false;
        if (created && l->cursor > 0)
                g->cursor = l->cursor;
        for (size_t i = 0; i < n; i++) {
                g->frames++;
                g->bytes += frames[i].len;
                l->pending++;
                l->bytes += frames[i].len;
        }
        if (none_waiting) {
                /* Nothing was waiting: the first of these is where the waiting frames begin. */
                l->rd_seg = l->n - 1;
                l->rd_off = l->undo.size + (created && l->cursor > 0 ? SEGLOG_HEADER_BYTES + SEGLOG_BODY_FIXED : 0);
        }
        l->last_id = id;
        return 0;
fail:
        if (created) {
                char name[32];
                name_of(g->name_id, name);
                (void) close(g->fd);
                (void) unlinkat(l->dir_fd, name, 0);
                l->n--;
                l->writing = false;
        }
        return r;
}

/* The staging buffer of an append larger than this is freed after it: a burst's commits grow it
 * to 128 KiB, which would stay touched (private memory, DESIGN.md Targets) long after. */
#define SEGLOG_BUF_KEEP (16 * 1024)

int seglog_append(struct seglog *l, const struct seglog_record *frames, size_t n) {
        int r = append_records(l, frames, n);

        if (l->cap_buf > SEGLOG_BUF_KEEP) {
                free(l->buf);
                l->buf = NULL;
                l->cap_buf = 0;
        }
        return r;
}

int seglog_undo_append(struct seglog *l) {
        struct segment *g;

        if (!l->undo.valid)
                return -ENOENT;
        l->undo.valid = false;
        g = &l->segs[l->n - 1];
        if (l->undo.created) {
                char name[32];
                name_of(g->name_id, name);
                if (unlinkat(l->dir_fd, name, 0) < 0)
                        return -errno;
                (void) close(g->fd);
                l->n--;
                l->writing = false;
                if (l->rd_seg > l->n)
                        l->rd_seg = l->n;
        } else {
                if (ftruncate(g->fd, (off_t) l->undo.size) < 0)
                        return -errno;
                g->size = l->undo.size;
                g->frames = l->undo.frames;
                g->bytes = l->undo.bytes;
                g->first_id = l->undo.first_id;
                g->last_id = l->undo.last_id;
        }
        if (l->undo.pending == 0) {
                l->rd_seg = l->n;
                l->rd_off = 0;
        }
        l->pending = l->undo.pending;
        l->bytes = l->undo.pbytes;
        l->last_id = l->undo.l_last_id;
        return 0;
}

int seglog_sync(struct seglog *l) {
        bool took = false;

        for (size_t i = 0; i < l->n; i++) {
                struct segment *g = &l->segs[i];
                bool current = l->writing && i + 1 == l->n;

                if (g->fd < 0 || !g->dirty)
                        continue;
                if (fdatasync(g->fd) < 0)
                        return -errno;
                if (!took) {
                        took = true;
                        l->handoffs++;
                }
                g->dirty = false;
                g->covered_at = l->handoffs;
                if (!current) {
                        (void) close(g->fd);
                        g->fd = -1;
                }
        }
        for (size_t i = 0, k = 0; i < l->n && k < FOUND_SYNC_MAX; i++) {
                struct segment *g = &l->segs[i];
                int fd;

                if (!g->found_unsynced || g->fd >= 0)
                        continue;
                g->found_unsynced = false;
                fd = open_seg(l, g, O_RDONLY);
                if (fd < 0)
                        continue; /* no summary then */
                if (fdatasync(fd) < 0) {
                        int r = -errno;
                        (void) close(fd);
                        return r;
                }
                (void) close(fd);
                if (!took) {
                        took = true;
                        l->handoffs++;
                }
                g->covered_at = l->handoffs;
                k++;
        }
        /* A new file's name is in the directory, which fdatasync() of the file does not sync. */
        if (l->dir_dirty) {
                if (fsync(l->dir_fd) < 0)
                        return -errno;
                l->dir_dirty = false;
        }
        return 0;
}

struct read_ctx {
        struct seglog *l;
        int64_t after; /* frames with a greater id only (the cursor at least) */
        unsigned max, n;
        int (*cb)(const struct seglog_record *r, void *userdata);
        void *userdata;
};

static int read_one(const struct seglog_record *r, size_t seg, uint64_t off, size_t size, void *userdata) {
        struct read_ctx *c = userdata;
        int k;

        if (r->type != SEGLOG_FRAME || r->id <= c->after)
                return 0;
        k = c->cb(r, c->userdata);
        if (k < 0)
                return k;
        return ++c->n >= c->max ? 1 : 0;
}

int seglog_read_batch(struct seglog *l, unsigned max, int (*cb)(const struct seglog_record *r, void *userdata),
                      void *userdata) {
        return seglog_read_batch_after(l, INT64_MIN, max, cb, userdata);
}

int seglog_read_batch_after(struct seglog *l, int64_t after_id, unsigned max,
                            int (*cb)(const struct seglog_record *r, void *userdata), void *userdata) {
        struct read_ctx c = { .l = l, .after = after_id > l->cursor ? after_id : l->cursor, .max = max, .cb = cb,
                              .userdata = userdata };
        int r;

        if (!cb || max == 0 || max > INT32_MAX)
                return -EINVAL;
        if (l->pending == 0)
                return 0;
        r = walk(l, l->rd_seg, l->rd_off, SIZE_MAX, read_one, &c);
        return r < 0 ? r : (int) c.n;
}

/* Frames up to last_id leave: counted, and the read position moves to the first one after. */
struct consume_ctx {
        struct seglog *l;
        int64_t last_id;
        uint64_t count, bytes;
        bool found;
        size_t seg;
        uint64_t off;
};

static int consume_one(const struct seglog_record *r, size_t seg, uint64_t off, size_t size, void *userdata) {
        struct consume_ctx *c = userdata;

        if (r->type != SEGLOG_FRAME || r->id <= c->l->cursor)
                return 0;
        if (r->id > c->last_id) {
                c->found = true;
                c->seg = seg;
                c->off = off;
                return 1;
        }
        c->count++;
        c->bytes += r->len;
        return 0;
}

static int consume(struct seglog *l, int64_t last_id, size_t last_seg, uint64_t *ret_count, uint64_t *ret_bytes) {
        struct consume_ctx c = { .l = l, .last_id = last_id };
        int r;

        if (l->pending > 0) {
                r = walk(l, l->rd_seg, l->rd_off, last_seg, consume_one, &c);
                if (r < 0)
                        return r;
        }
        if (c.found) {
                l->rd_seg = c.seg;
                l->rd_off = c.off;
        } else if (last_seg >= l->n) {
                l->rd_seg = l->n;
                l->rd_off = 0;
        } else {
                l->rd_seg = last_seg + 1;
                l->rd_off = 0;
        }
        if (last_id > l->cursor)
                l->cursor = last_id;
        l->pending -= c.count <= l->pending ? c.count : l->pending;
        l->bytes -= c.bytes <= l->bytes ? c.bytes : l->bytes;
        if (l->pending == 0) {
                l->rd_seg = l->n;
                l->rd_off = 0;
        }
        /* The cursor goes on disk with the next sync: a restart sends again at most what left
         * since (the cloud de-duplicates by (dev, seq), PROTOCOL.md 3). */
        if (l->writing) {
                struct segment *g = &l->segs[l->n - 1];
                struct seglog_record cur = { .type = SEGLOG_CURSOR, .id = l->cursor };
                uint8_t b[SEGLOG_HEADER_BYTES + SEGLOG_BODY_FIXED];
                int k = seglog_record_encode(&cur, b, sizeof b);

                if (k < 0)
                        return k;
                r = pwrite_full(g->fd, b, (size_t) k, g->size);
                if (r < 0) {
                        if (ftruncate(g->fd, (off_t) g->size) < 0)
                                r = -EIO; /* the next append writes at g->size anyway */
                        return r;
                }
                g->size += (size_t) k;
                g->dirty = true;
                g->summarized = false;
                g->cursor = l->cursor;
                l->undo.valid = false;
        }
        if (ret_count)
                *ret_count = c.count;
        if (ret_bytes)
                *ret_bytes = c.bytes;
        return 0;
}

int seglog_consume(struct seglog *l, int64_t last_id, uint64_t *ret_count, uint64_t *ret_bytes) {
        if (last_id < 1)
                return -EINVAL;
        return consume(l, last_id, SIZE_MAX, ret_count, ret_bytes);
}

int seglog_drop_oldest(struct seglog *l, uint64_t *ret_count, uint64_t *ret_bytes) {
        size_t i;

        /* The oldest segment with waiting frames, if it is not the one being written. */
        for (i = l->rd_seg; i < l->n && l->segs[i].last_id <= l->cursor; i++)
                ;
        if (i >= l->n || (l->writing && i == l->n - 1))
                return -ENOENT;
        return consume(l, l->segs[i].last_id, i, ret_count, ret_bytes);
}

/* The newest seq of each bulb in the segment to retire, for bulb_seqs. */
struct seq_ctx {
        int (*cb)(const char *dev, int64_t seq, void *userdata);
        void *userdata;
};

static int seq_one(const struct seglog_record *r, size_t seg, uint64_t off, size_t size, void *userdata) {
        struct seq_ctx *c = userdata;

        if (r->type != SEGLOG_FRAME)
                return 0;
        return c->cb(r->dev, r->seq, c->userdata);
}

int seglog_retirable(struct seglog *l, int (*cb)(const char *dev, int64_t seq, void *userdata), void *userdata) {
        struct seq_ctx c = { .cb = cb, .userdata = userdata };
        int r;

        l->retire_ready = false;
        if (l->n == 0 || (l->writing && l->n == 1))
                return 0;
        if (l->segs[0].frames > 0 && l->segs[0].last_id > l->cursor)
                return 0;
        if (cb) {
                r = walk(l, 0, 0, 0, seq_one, &c);
                if (r < 0)
                        return r;
        }
        l->retire_ready = true;
        return 1;
}

int seglog_retire(struct seglog *l) {
        struct segment *g;
        char name[32];

        if (!l->retire_ready)
                return -ENOENT;
        l->retire_ready = false;
        g = &l->segs[0];
        name_of(g->name_id, name);
        /* Synced first if it is still dirty (a cursor record): not needed for the frames, but
         * its descriptor must not be lost with unsynced bytes the caller counts on. */
        if (unlinkat(l->dir_fd, name, 0) < 0 && errno != ENOENT)
                return -errno;
        if (g->fd >= 0)
                (void) close(g->fd);
        memmove(l->segs, l->segs + 1, (l->n - 1) * sizeof *l->segs);
        l->n--;
        if (l->rd_seg > 0)
                l->rd_seg--;
        else
                l->rd_off = 0;
        return 0;
}

int64_t seglog_retirable_id(const struct seglog *l) {
        return l->retire_ready ? l->segs[0].name_id : 0;
}

/* The oldest segment that can be summarized: closed, its last bytes handed over at or before
 * hand-over token, no summary yet, not the one about to be unlinked. */
static bool summary_candidate(const struct seglog *l, uint64_t token, size_t *ret) {
        for (size_t i = 0; i < l->n; i++) {
                const struct segment *g = &l->segs[i];

                if (l->writing && i + 1 == l->n)
                        break;
                if (g->summarized || g->dirty || g->covered_at == 0 || g->covered_at > token ||
                    (i == 0 && l->retire_ready))
                        continue;
                *ret = i;
                return true;
        }
        return false;
}

uint64_t seglog_summary_pending(const struct seglog *l) {
        size_t i;

        return summary_candidate(l, l->handoffs, &i) ? l->handoffs : 0;
}

int seglog_summary_next(struct seglog *l, uint64_t token, int (*cb)(const char *dev, int64_t seq, void *userdata),
                        void *userdata, struct seglog_summary *ret) {
        struct seq_ctx c = { .cb = cb, .userdata = userdata };
        const struct segment *g;
        size_t i;
        int r;

        if (!ret)
                return -EINVAL;
        if (!summary_candidate(l, token, &i))
                return 0;
        if (cb) {
                r = walk(l, i, 0, i, seq_one, &c);
                if (r < 0)
                        return r;
        }
        g = &l->segs[i];
        *ret = (struct seglog_summary){ .name_id = g->name_id, .first_id = g->first_id, .last_id = g->last_id,
                                        .frames = g->frames, .bytes = g->bytes, .size = g->size,
                                        .cursor = g->cursor };
        return 1;
}

bool seglog_has_segment(const struct seglog *l, int64_t name_id) {
        for (size_t i = 0; i < l->n; i++)
                if (l->segs[i].name_id == name_id)
                        return true;
        return false;
}

void seglog_summary_stored(struct seglog *l, int64_t name_id) {
        for (size_t i = 0; i < l->n; i++)
                if (l->segs[i].name_id == name_id)
                        l->segs[i].summarized = true;
}

int seglog_sync_handoff(struct seglog *l, int *fds, size_t max, size_t *ret_n) {
        size_t n = 0, need = l->dir_dirty ? 1 : 0, n_found = 0, found[FOUND_SYNC_MAX];

        for (size_t i = 0; i < l->n; i++)
                need += l->segs[i].fd >= 0 && l->segs[i].dirty;
        if (need > max)
                return -ENOBUFS;
        for (size_t i = 0; i < l->n; i++) {
                struct segment *g = &l->segs[i];

                if (g->fd < 0 || !g->dirty)
                        continue;
                fds[n] = fcntl(g->fd, F_DUPFD_CLOEXEC, 3);
                if (fds[n] < 0)
                        goto fail;
                n++;
        }
        /* Older segments found at open, with what room is left: descriptors of their own. */
        for (size_t i = 0; i < l->n && n_found < FOUND_SYNC_MAX && n + 1 + (l->dir_dirty ? 1u : 0u) <= max; i++) {
                struct segment *g = &l->segs[i];

                if (!g->found_unsynced || g->fd >= 0)
                        continue;
                fds[n] = open_seg(l, g, O_RDONLY);
                if (fds[n] < 0) {
                        g->found_unsynced = false; /* no summary then */
                        continue;
                }
                n++;
                found[n_found++] = i;
        }
        if (l->dir_dirty) {
                fds[n] = fcntl(l->dir_fd, F_DUPFD_CLOEXEC, 3);
                if (fds[n] < 0)
                        goto fail;
                n++;
        }
        /* Handed over: the copies are synced by the caller; a closed segment's own descriptor is
         * not needed any more. */
        if (n > (l->dir_dirty ? 1u : 0u))
                l->handoffs++;
        for (size_t k = 0; k < n_found; k++) {
                l->segs[found[k]].found_unsynced = false;
                l->segs[found[k]].covered_at = l->handoffs;
        }
        for (size_t i = 0; i < l->n; i++) {
                struct segment *g = &l->segs[i];
                bool current = l->writing && i + 1 == l->n;

                if (g->fd < 0 || !g->dirty)
                        continue;
                g->dirty = false;
                g->covered_at = l->handoffs;
                if (!current) {
                        (void) close(g->fd);
                        g->fd = -1;
                }
        }
        l->dir_dirty = false;
        *ret_n = n;
        return 0;
fail: {
        int r = -errno;
        while (n > 0)
                (void) close(fds[--n]);
        return r;
}
}

struct after_ctx {
        int64_t after;
        int (*cb)(const char *dev, int64_t seq, void *userdata);
        void *userdata;
};

static int after_one(const struct seglog_record *r, size_t seg, uint64_t off, size_t size, void *userdata) {
        struct after_ctx *c = userdata;

        if (r->type != SEGLOG_FRAME || r->id <= c->after)
                return 0;
        return c->cb(r->dev, r->seq, c->userdata);
}

int seglog_frames_after(struct seglog *l, int64_t after, int (*cb)(const char *dev, int64_t seq, void *userdata),
                        void *userdata) {
        struct after_ctx c = { .after = after, .cb = cb, .userdata = userdata };
        size_t i;

        if (!cb)
                return -EINVAL;
        for (i = 0; i < l->n && (l->segs[i].frames == 0 || l->segs[i].last_id <= after); i++)
                ;
        return i < l->n ? walk(l, i, 0, SIZE_MAX, after_one, &c) : 0;
}

struct newest_ctx {
        int (*cb)(const struct seglog_record *r, bool seg_first, void *userdata);
        void *userdata;
        bool seen; /* a frame of the segment being read was passed on */
};

static int newest_one(const struct seglog_record *r, size_t seg, uint64_t off, size_t size, void *userdata) {
        struct newest_ctx *c = userdata;
        bool first = !c->seen;

        if (r->type != SEGLOG_FRAME)
                return 0;
        c->seen = true;
        return c->cb(r, first, c->userdata);
}

int seglog_frames_newest_first(struct seglog *l,
                               int (*cb)(const struct seglog_record *r, bool seg_first, void *userdata),
                               void *userdata) {
        struct newest_ctx c = { .cb = cb, .userdata = userdata };

        if (!l || !cb)
                return -EINVAL;
        for (size_t i = l->n; i > 0; i--) {
                int r;

                if (l->segs[i - 1].frames == 0)
                        continue;
                c.seen = false;
                r = walk(l, i - 1, 0, i - 1, newest_one, &c);
                if (r != 0)
                        return r;
        }
        return 0;
}

void seglog_set_segment_bytes(struct seglog *l, size_t segment_bytes) {
        if (segment_bytes > 0 && segment_bytes <= SEGMENT_FILE_MAX - SEGLOG_RECORD_MAX)
                l->segment_bytes = segment_bytes;
}
