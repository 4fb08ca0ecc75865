/* SPDX-License-Identifier: MIT */
/* The segment log's records (include/iothub/seglog.h): encoding, a strict parser and the scan of
 * a segment that survives damage. Pure: no I/O here, so that the parser is fuzzed whole. */
#include <string.h>

#include "iothub/seglog.h"

/* CRC-32C rather than zlib's CRC-32: the same cost in software, better error detection for the
 * record sizes here, and no library for 20 lines. Table built once, on first use. */
static uint32_t crc_table[256];
static bool crc_table_ready;

static void crc_table_init(void) {
        for (uint32_t i = 0; i < 256; i++) {
                uint32_t c = i;
                for (int k = 0; k < 8; k++)
                        c = (c & 1) ? (c >> 1) ^ UINT32_C(0x82f63b78) : c >> 1;
                crc_table[i] = c;
        }
        crc_table_ready = true;
}

uint32_t seglog_crc32c(uint32_t crc, const void *buf, size_t len) {
        const uint8_t *p = buf;

        if (!crc_table_ready)
                crc_table_init();
        crc = ~crc;
        for (size_t i = 0; i < len; i++)
                crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
        return ~crc;
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
                        if (next >= len)
                                break; /* the tail */
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
