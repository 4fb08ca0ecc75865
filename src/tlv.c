/* SPDX-License-Identifier: MIT */
/* The channels' codec (include/iothub/tlv.h), driven by a channel's table. Pure: both sides of
 * each channel frame, decode and encode with it, the fuzzers drive it (tests/fuzz/fuzz-signer.c,
 * tests/fuzz/fuzz-uplink.c). */
#include <errno.h>
#include <string.h>

#include <openssl/crypto.h>

#include "iothub/tlv.h"

const char *tlv_op_to_string(const struct tlv_proto *p, unsigned op) {
        return p && op > 0 && op < p->n_ops ? p->ops[op].name : NULL;
}

const char *tlv_tag_to_string(const struct tlv_proto *p, unsigned tag) {
        return p && tag > 0 && tag < p->n_tags ? p->tags[tag].name : NULL;
}

int tlv_tag_limits(const struct tlv_proto *p, unsigned tag, enum tlv_kind *ret_kind, uint32_t *ret_min,
                   uint32_t *ret_max) {
        if (!tlv_tag_to_string(p, tag))
                return -EINVAL;
        if (ret_kind)
                *ret_kind = p->tags[tag].kind;
        if (ret_min)
                *ret_min = p->tags[tag].min;
        if (ret_max)
                *ret_max = p->tags[tag].max;
        return 0;
}

int tlv_tag_rule(const struct tlv_proto *p, unsigned op, bool answer, unsigned tag) {
        const struct tlv_rule *rules;

        if (!tlv_op_to_string(p, op) || !tlv_tag_to_string(p, tag))
                return 0;
        rules = answer ? p->ops[op].ans : p->ops[op].req;
        for (size_t i = 0; i < TLV_OP_TAGS && rules[i].tag != 0; i++)
                if (rules[i].tag == tag)
                        return rules[i].rule;
        return 0;
}

static uint32_t get_u32(const uint8_t *p) {
        return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
}

static uint16_t get_u16(const uint8_t *p) {
        return (uint16_t) (p[0] << 8 | p[1]);
}

static void put_u32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) (v >> 24);
        p[1] = (uint8_t) (v >> 16);
        p[2] = (uint8_t) (v >> 8);
        p[3] = (uint8_t) v;
}

static void put_u16(uint8_t *p, uint16_t v) {
        p[0] = (uint8_t) (v >> 8);
        p[1] = (uint8_t) v;
}

/* What every function taking a table relies on: its arrays fit struct tlv_msg and the op field. */
static bool proto_is_valid(const struct tlv_proto *p) {
        return p && p->tags && p->ops && p->n_tags <= TLV_TAG_MAX && p->n_ops <= TLV_ANSWER &&
               p->msg_max >= TLV_HEADER_LEN - TLV_PREFIX_LEN;
}

int tlv_msg_frame(const struct tlv_proto *p, const uint8_t *buf, size_t len, size_t *ret_need) {
        uint32_t n;

        if (!proto_is_valid(p))
                return -EINVAL;
        if (!buf || len < TLV_PREFIX_LEN) {
                *ret_need = TLV_PREFIX_LEN;
                return 0;
        }
        n = get_u32(buf);
        if (n < TLV_HEADER_LEN - TLV_PREFIX_LEN || n > p->msg_max)
                return -EBADMSG;
        *ret_need = TLV_PREFIX_LEN + (size_t) n;
        return len >= *ret_need ? 1 : 0;
}

int tlv_msg_peek_id(const uint8_t *buf, size_t len, uint32_t *ret_id) {
        if (!buf || len < TLV_HEADER_LEN)
                return -EBADMSG;
        *ret_id = get_u32(buf + 4);
        return 0;
}

int tlv_msg_decode(const struct tlv_proto *p, const uint8_t *buf, size_t len, struct tlv_msg *ret) {
        struct tlv_msg m = {};
        uint16_t op;
        size_t at;

        if (!proto_is_valid(p) || !buf || !ret || len < TLV_HEADER_LEN || len - TLV_PREFIX_LEN != get_u32(buf) ||
            len - TLV_PREFIX_LEN > p->msg_max)
                return -EBADMSG;
        m.id = get_u32(buf + 4);
        op = get_u16(buf + 8);
        m.answer = (op & TLV_ANSWER) != 0;
        m.op = (uint16_t) (op & ~TLV_ANSWER);
        m.status = (int16_t) get_u16(buf + 10);
        if (!tlv_op_to_string(p, m.op))
                return -EBADMSG;
        if (m.status > 0 || (!m.answer && m.status != 0))
                return -EBADMSG;

        for (at = TLV_HEADER_LEN; at < len;) {
                const struct tlv_tag *ti;
                uint16_t tag;
                uint32_t flen;

                /* A field header cut short is trailing bytes. */
                if (len - at < TLV_FIELD_HEADER_LEN)
                        return -EBADMSG;
                tag = get_u16(buf + at);
                flen = get_u32(buf + at + 2);
                at += TLV_FIELD_HEADER_LEN;
                if (!tlv_tag_to_string(p, tag) || m.f[tag].present)
                        return -EBADMSG;
                /* An error answer carries nothing; otherwise only the op's tags. */
                if (m.status < 0 || tlv_tag_rule(p, m.op, m.answer, tag) == 0)
                        return -EBADMSG;
                ti = &p->tags[tag];
                /* The limit before the bytes are looked at (or copied by the caller). */
                if (flen < ti->min || flen > ti->max || flen > len - at)
                        return -EBADMSG;
                if (ti->kind == TLV_KIND_TEXT && memchr(buf + at, '\0', flen))
                        return -EBADMSG;
                m.f[tag] = (struct tlv_field){ .data = buf + at, .len = flen, .present = true };
                at += flen;
        }
        if (m.status == 0)
                for (unsigned t = 1; t < p->n_tags; t++)
                        if (tlv_tag_rule(p, m.op, m.answer, t) == TLV_REQUIRED && !m.f[t].present)
                                return -EBADMSG;
        /* The table's own rules see only a message that passed all of the above. */
        if (p->check && p->check(&m) < 0)
                return -EBADMSG;
        *ret = m;
        return 0;
}

bool tlv_msg_has(const struct tlv_msg *m, unsigned tag) {
        return m && tag > 0 && tag < TLV_TAG_MAX && m->f[tag].present;
}

int tlv_msg_strdup(const struct tlv_msg *m, unsigned tag, char **ret) {
        char *s;

        if (!tlv_msg_has(m, tag))
                return -ENOENT;
        s = strndup((const char *) m->f[tag].data, m->f[tag].len);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

int tlv_msg_u64(const struct tlv_msg *m, unsigned tag, uint64_t *ret) {
        const uint8_t *p;

        if (!tlv_msg_has(m, tag))
                return -ENOENT;
        if (m->f[tag].len == 1) {
                *ret = m->f[tag].data[0];
                return 0;
        }
        if (m->f[tag].len != 8)
                return -EINVAL;
        p = m->f[tag].data;
        *ret = (uint64_t) get_u32(p) << 32 | get_u32(p + 4);
        return 0;
}

int tlv_msg_u8(const struct tlv_msg *m, unsigned tag, uint8_t *ret) {
        if (!tlv_msg_has(m, tag))
                return -ENOENT;
        if (m->f[tag].len != 1)
                return -EINVAL;
        *ret = m->f[tag].data[0];
        return 0;
}

/* Room for n more bytes. The buffer grows by doubling, up to what a few queued answers need. */
static int buf_reserve(struct tlv_buf *b, size_t n) {
        size_t want, cap;
        uint8_t *p;

        if (n > SIZE_MAX - b->len)
                return -ENOMEM;
        want = b->len + n;
        if (want <= b->cap)
                return 0;
        cap = b->cap ? b->cap : 256;
        while (cap < want)
                cap = cap > SIZE_MAX / 2 ? want : cap * 2;
        /* Not realloc(): the old block may hold a token, and is wiped before it is freed. */
        p = malloc(cap);
        if (!p)
                return -ENOMEM;
        if (b->data) {
                memcpy(p, b->data, b->len);
                OPENSSL_cleanse(b->data, b->cap);
                free(b->data);
        }
        b->data = p;
        b->cap = cap;
        return 0;
}

int tlv_msg_begin(struct tlv_buf *b, const struct tlv_proto *p, uint32_t id, unsigned op, bool answer, int status) {
        int r;

        if (!b || b->open || !proto_is_valid(p) || status > 0 || status < INT16_MIN || (!answer && status != 0))
                return -EINVAL;
        /* An error answer echoes whatever op the request carried (iothub-signer(8), iothub-uplink(8)
         * WIRE FORMAT: an unknown op's -EBADMSG, or 0 when the header was unreadable); anything
         * else names an op of the table. */
        if (answer && status < 0 ? op > (uint16_t) ~TLV_ANSWER : !tlv_op_to_string(p, op))
                return -EINVAL;
        r = buf_reserve(b, TLV_HEADER_LEN);
        if (r < 0)
                return r;
        b->start = b->len;
        put_u32(b->data + b->len, 0); /* written by end() */
        put_u32(b->data + b->len + 4, id);
        put_u16(b->data + b->len + 8, (uint16_t) (op | (answer ? TLV_ANSWER : 0)));
        put_u16(b->data + b->len + 10, (uint16_t) (int16_t) status);
        b->len += TLV_HEADER_LEN;
        b->open = true;
        b->error = 0;
        b->proto = p;
        return 0;
}

int tlv_msg_add(struct tlv_buf *b, unsigned tag, const void *data, size_t len) {
        int r;

        if (!b || !b->open)
                return -EINVAL;
        if (b->error < 0)
                return b->error;
        if (!tlv_tag_to_string(b->proto, tag) || len > b->proto->tags[tag].max || (len > 0 && !data)) {
                b->error = -EINVAL;
                return b->error;
        }
        r = buf_reserve(b, TLV_FIELD_HEADER_LEN + len);
        if (r < 0) {
                b->error = r;
                return r;
        }
        put_u16(b->data + b->len, (uint16_t) tag);
        put_u32(b->data + b->len + 2, (uint32_t) len);
        if (len > 0)
                memcpy(b->data + b->len + TLV_FIELD_HEADER_LEN, data, len);
        b->len += TLV_FIELD_HEADER_LEN + len;
        return 0;
}

int tlv_msg_add_str(struct tlv_buf *b, unsigned tag, const char *s) {
        if (!s) {
                if (b)
                        b->error = b->error ?: -EINVAL;
                return -EINVAL;
        }
        return tlv_msg_add(b, tag, s, strlen(s));
}

int tlv_msg_add_u64(struct tlv_buf *b, unsigned tag, uint64_t v) {
        uint8_t p[8];

        put_u32(p, (uint32_t) (v >> 32));
        put_u32(p + 4, (uint32_t) v);
        return tlv_msg_add(b, tag, p, sizeof p);
}

int tlv_msg_add_u8(struct tlv_buf *b, unsigned tag, uint8_t v) {
        return tlv_msg_add(b, tag, &v, 1);
}

static void drop_open(struct tlv_buf *b) {
        OPENSSL_cleanse(b->data + b->start, b->len - b->start);
        b->len = b->start;
        b->open = false;
}

int tlv_msg_end(struct tlv_buf *b) {
        struct tlv_msg m;
        size_t n;
        int r;

        if (!b || !b->open)
                return -EINVAL;
        if (b->error < 0) {
                r = b->error;
                drop_open(b);
                return r;
        }
        n = b->len - b->start;
        if (n - TLV_PREFIX_LEN > b->proto->msg_max) {
                drop_open(b);
                return -EMSGSIZE;
        }
        put_u32(b->data + b->start, (uint32_t) (n - TLV_PREFIX_LEN));
        /* What the other side would refuse is never sent: a missing required field, a field the
         * op does not take, a NUL in a text, a length out of range. An error answer without
         * fields has nothing to check, and may echo an op unknown to the decoder (begin()). */
        bool bare_error = n == TLV_HEADER_LEN && (get_u16(b->data + b->start + 8) & TLV_ANSWER) &&
                          (int16_t) get_u16(b->data + b->start + 10) < 0;
        if (!bare_error && tlv_msg_decode(b->proto, b->data + b->start, n, &m) < 0) {
                drop_open(b);
                return -EINVAL;
        }
        b->open = false;
        return 0;
}

void tlv_buf_consume(struct tlv_buf *b, size_t n) {
        if (!b || n == 0)
                return;
        if (n > b->len)
                n = b->len;
        /* Only whole messages already built leave; one being built stays where it is. */
        if (b->open && n > b->start)
                n = b->start;
        memmove(b->data, b->data + n, b->len - n);
        OPENSSL_cleanse(b->data + b->len - n, n);
        b->len -= n;
        if (b->open)
                b->start -= n;
}

void tlv_buf_done(struct tlv_buf *b) {
        if (!b)
                return;
        if (b->data) {
                OPENSSL_cleanse(b->data, b->cap);
                free(b->data);
        }
        *b = (struct tlv_buf){};
}
