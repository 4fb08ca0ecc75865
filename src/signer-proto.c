/* SPDX-License-Identifier: MIT */
/* The signer channel's codec (include/iothub/signer-proto.h). Pure: both sides frame, decode and
 * encode with it, the fuzzer drives it (tests/fuzz/fuzz-signer.c). */
#include <errno.h>
#include <string.h>

#include <openssl/crypto.h>

#include "iothub/signer-proto.h"

#define KIB 1024u
#define MIB (1024u * KIB)

struct tag_info {
        const char *name;
        enum signer_kind kind;
        uint32_t min, max;
};

#define T(n, lo, hi) { #n, SIGNER_KIND_TEXT, lo, hi }
static const struct tag_info tags[_SIGNER_TAG_MAX] = {
        [SIGNER_TAG_KEY_ID] = T(KEY_ID, 43, 43),
        [SIGNER_TAG_JWK] = T(JWK, 1, 1024),
        [SIGNER_TAG_BACKEND] = T(BACKEND, 1, 8),
        [SIGNER_TAG_METHOD] = T(METHOD, 1, 8),
        [SIGNER_TAG_TARGET_URI] = T(TARGET_URI, 1, 2048),
        [SIGNER_TAG_AUTHORIZATION] = T(AUTHORIZATION, 1, 8 * KIB),
        [SIGNER_TAG_BODY] = { "BODY", SIGNER_KIND_BYTES, 0, MIB },
        [SIGNER_TAG_PRIO] = { "PRIO", SIGNER_KIND_U8, 1, 1 },
        [SIGNER_TAG_CONTENT_DIGEST] = T(CONTENT_DIGEST, 1, 256),
        [SIGNER_TAG_SIGNATURE_INPUT] = T(SIGNATURE_INPUT, 1, 1024),
        [SIGNER_TAG_SIGNATURE] = T(SIGNATURE, 1, 256),
        [SIGNER_TAG_URL] = T(URL, 1, 2048),
        [SIGNER_TAG_ATH] = T(ATH, 43, 43),
        [SIGNER_TAG_NONCE] = T(NONCE, 1, 512),
        [SIGNER_TAG_PROOF] = T(PROOF, 1, 8 * KIB),
        [SIGNER_TAG_DEV] = T(DEV, 1, 64),
        [SIGNER_TAG_CMD_ID] = T(CMD_ID, 1, 64),
        [SIGNER_TAG_IAT] = { "IAT", SIGNER_KIND_U64, 8, 8 },
        [SIGNER_TAG_EXP] = { "EXP", SIGNER_KIND_U64, 8, 8 },
        [SIGNER_TAG_SET] = T(SET, 2, 4 * KIB),
        [SIGNER_TAG_CLOUD_JWS] = T(CLOUD_JWS, 1, 8 * KIB),
        [SIGNER_TAG_JWS] = T(JWS, 1, 24 * KIB),
        [SIGNER_TAG_ACCESS_TOKEN] = T(ACCESS_TOKEN, 1, 4 * KIB),
        [SIGNER_TAG_REFRESH_TOKEN] = T(REFRESH_TOKEN, 1, 4 * KIB),
        [SIGNER_TAG_TOKEN_TYPE] = T(TOKEN_TYPE, 1, 16),
        [SIGNER_TAG_SCOPE] = T(SCOPE, 1, 1024),
        [SIGNER_TAG_EXPIRES_AT] = { "EXPIRES_AT", SIGNER_KIND_U64, 8, 8 },
        [SIGNER_TAG_EVIDENCE] = T(EVIDENCE, 2, 16 * KIB),
        [SIGNER_TAG_CHALLENGE] = T(CHALLENGE, 1, 16 * KIB),
        [SIGNER_TAG_ANSWER] = T(ANSWER, 2, 16 * KIB),
        [SIGNER_TAG_SIGNATURES] = { "SIGNATURES", SIGNER_KIND_U64, 8, 8 },
        [SIGNER_TAG_REFUSED_POLICY] = { "REFUSED_POLICY", SIGNER_KIND_U64, 8, 8 },
        [SIGNER_TAG_REFUSED_RATE] = { "REFUSED_RATE", SIGNER_KIND_U64, 8, 8 },
        [SIGNER_TAG_REFUSED_PEER] = { "REFUSED_PEER", SIGNER_KIND_U64, 8, 8 },
        [SIGNER_TAG_MALFORMED] = { "MALFORMED", SIGNER_KIND_U64, 8, 8 },
        [SIGNER_TAG_TPM_ERRORS] = { "TPM_ERRORS", SIGNER_KIND_U64, 8, 8 },
        [SIGNER_TAG_LAST_ERROR] = T(LAST_ERROR, 1, 256),
};
#undef T

/* Per op: the request's and the answer's tags, 'r' required, 'o' optional, by tag number. */
struct op_info {
        const char *name;
        struct {
                unsigned char tag, rule;
        } req[8], ans[8];
};
#define R(t) { SIGNER_TAG_##t, 2 }
#define O(t) { SIGNER_TAG_##t, 1 }
static const struct op_info ops[_SIGNER_OP_MAX] = {
        [SIGNER_OP_KEY_INFO] = { "KEY_INFO", {}, { R(KEY_ID), R(JWK), R(BACKEND) } },
        [SIGNER_OP_SIGN_HTTP] = { "SIGN_HTTP",
                                  { R(METHOD), R(TARGET_URI), R(AUTHORIZATION), O(BODY), R(PRIO) },
                                  { O(CONTENT_DIGEST), R(SIGNATURE_INPUT), R(SIGNATURE) } },
        [SIGNER_OP_SIGN_DPOP] = { "SIGN_DPOP", { R(METHOD), R(URL), O(ATH), O(NONCE) }, { R(PROOF) } },
        [SIGNER_OP_SIGN_COMMAND] = { "SIGN_COMMAND",
                                     { R(DEV), R(CMD_ID), R(IAT), R(EXP), R(SET), O(CLOUD_JWS) },
                                     { R(JWS) } },
        [SIGNER_OP_TOKENS_GET] = { "TOKENS_GET",
                                   {},
                                   { R(ACCESS_TOKEN), O(REFRESH_TOKEN), R(TOKEN_TYPE), O(SCOPE), R(EXPIRES_AT) } },
        [SIGNER_OP_TOKENS_PUT] = { "TOKENS_PUT",
                                   { R(ACCESS_TOKEN), O(REFRESH_TOKEN), R(TOKEN_TYPE), O(SCOPE), R(EXPIRES_AT) },
                                   {} },
        [SIGNER_OP_TOKENS_ERASE] = { "TOKENS_ERASE", {}, {} },
        [SIGNER_OP_ATTEST_BEGIN] = { "ATTEST_BEGIN", {}, { R(EVIDENCE) } },
        [SIGNER_OP_ATTEST_ANSWER] = { "ATTEST_ANSWER", { R(CHALLENGE) }, { R(ANSWER) } },
        [SIGNER_OP_STATUS] = { "STATUS",
                               {},
                               { R(SIGNATURES), R(REFUSED_POLICY), R(REFUSED_RATE), R(REFUSED_PEER), R(MALFORMED),
                                 R(TPM_ERRORS), O(LAST_ERROR) } },
};
#undef R
#undef O

const char *signer_op_to_string(unsigned op) {
        return op > 0 && op < _SIGNER_OP_MAX ? ops[op].name : NULL;
}

const char *signer_tag_to_string(unsigned tag) {
        return tag > 0 && tag < _SIGNER_TAG_MAX ? tags[tag].name : NULL;
}

int signer_tag_limits(unsigned tag, enum signer_kind *ret_kind, uint32_t *ret_min, uint32_t *ret_max) {
        if (tag == 0 || tag >= _SIGNER_TAG_MAX)
                return -EINVAL;
        if (ret_kind)
                *ret_kind = tags[tag].kind;
        if (ret_min)
                *ret_min = tags[tag].min;
        if (ret_max)
                *ret_max = tags[tag].max;
        return 0;
}

int signer_tag_rule(unsigned op, bool answer, unsigned tag) {
        if (op == 0 || op >= _SIGNER_OP_MAX || tag == 0 || tag >= _SIGNER_TAG_MAX)
                return 0;
        for (size_t i = 0; i < ELEMENTSOF(ops[op].req); i++) {
                unsigned t = answer ? ops[op].ans[i].tag : ops[op].req[i].tag;
                if (t == tag)
                        return answer ? ops[op].ans[i].rule : ops[op].req[i].rule;
        }
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

int signer_msg_frame(const uint8_t *buf, size_t len, size_t *ret_need) {
        uint32_t n;

        if (!buf || len < SIGNER_PREFIX_LEN) {
                *ret_need = SIGNER_PREFIX_LEN;
                return 0;
        }
        n = get_u32(buf);
        if (n < SIGNER_HEADER_LEN - SIGNER_PREFIX_LEN || n > SIGNER_MSG_MAX)
                return -EBADMSG;
        *ret_need = SIGNER_PREFIX_LEN + (size_t) n;
        return len >= *ret_need ? 1 : 0;
}

int signer_msg_peek_id(const uint8_t *buf, size_t len, uint32_t *ret_id) {
        if (!buf || len < SIGNER_HEADER_LEN)
                return -EBADMSG;
        *ret_id = get_u32(buf + 4);
        return 0;
}

int signer_msg_decode(const uint8_t *buf, size_t len, struct signer_msg *ret) {
        struct signer_msg m = {};
        uint16_t op;
        size_t at;

        if (!buf || !ret || len < SIGNER_HEADER_LEN || len - SIGNER_PREFIX_LEN != get_u32(buf) ||
            len - SIGNER_PREFIX_LEN > SIGNER_MSG_MAX)
                return -EBADMSG;
        m.id = get_u32(buf + 4);
        op = get_u16(buf + 8);
        m.answer = (op & SIGNER_ANSWER) != 0;
        m.op = (uint16_t) (op & ~SIGNER_ANSWER);
        m.status = (int16_t) get_u16(buf + 10);
        if (m.op == 0 || m.op >= _SIGNER_OP_MAX)
                return -EBADMSG;
        if (m.status > 0 || (!m.answer && m.status != 0))
                return -EBADMSG;

        for (at = SIGNER_HEADER_LEN; at < len;) {
                const struct tag_info *ti;
                uint16_t tag;
                uint32_t flen;

                /* A field header cut short is trailing bytes. */
                if (len - at < SIGNER_FIELD_HEADER_LEN)
                        return -EBADMSG;
                tag = get_u16(buf + at);
                flen = get_u32(buf + at + 2);
                at += SIGNER_FIELD_HEADER_LEN;
                if (tag == 0 || tag >= _SIGNER_TAG_MAX || m.f[tag].present)
                        return -EBADMSG;
                /* An error answer carries nothing; otherwise only the op's tags. */
                if (m.status < 0 || signer_tag_rule(m.op, m.answer, tag) == 0)
                        return -EBADMSG;
                ti = &tags[tag];
                /* The limit before the bytes are looked at (or copied by the caller). */
                if (flen < ti->min || flen > ti->max || flen > len - at)
                        return -EBADMSG;
                if (ti->kind == SIGNER_KIND_TEXT && memchr(buf + at, '\0', flen))
                        return -EBADMSG;
                m.f[tag] = (struct signer_field){ .data = buf + at, .len = flen, .present = true };
                at += flen;
        }
        if (m.status == 0)
                for (unsigned t = 1; t < _SIGNER_TAG_MAX; t++)
                        if (signer_tag_rule(m.op, m.answer, t) == 2 && !m.f[t].present)
                                return -EBADMSG;
        *ret = m;
        return 0;
}

bool signer_msg_has(const struct signer_msg *m, unsigned tag) {
        return m && tag > 0 && tag < _SIGNER_TAG_MAX && m->f[tag].present;
}

int signer_msg_strdup(const struct signer_msg *m, unsigned tag, char **ret) {
        char *s;

        if (!signer_msg_has(m, tag))
                return -ENOENT;
        s = strndup((const char *) m->f[tag].data, m->f[tag].len);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

int signer_msg_u64(const struct signer_msg *m, unsigned tag, uint64_t *ret) {
        const uint8_t *p;

        if (!signer_msg_has(m, tag))
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

int signer_msg_u8(const struct signer_msg *m, unsigned tag, uint8_t *ret) {
        if (!signer_msg_has(m, tag))
                return -ENOENT;
        if (m->f[tag].len != 1)
                return -EINVAL;
        *ret = m->f[tag].data[0];
        return 0;
}

/* Room for n more bytes. The buffer grows by doubling, up to what a few queued answers need. */
static int buf_reserve(struct signer_buf *b, size_t n) {
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

int signer_msg_begin(struct signer_buf *b, uint32_t id, unsigned op, bool answer, int status) {
        int r;

        if (!b || b->open || status > 0 || status < INT16_MIN || (!answer && status != 0))
                return -EINVAL;
        /* An error answer echoes whatever op the request carried (iothub-signer(8): an unknown
         * op's -EBADMSG, or 0 when the header was unreadable); anything else names a known op. */
        if (answer && status < 0 ? op > (uint16_t) ~SIGNER_ANSWER : op == 0 || op >= _SIGNER_OP_MAX)
                return -EINVAL;
        r = buf_reserve(b, SIGNER_HEADER_LEN);
        if (r < 0)
                return r;
        b->start = b->len;
        put_u32(b->data + b->len, 0); /* written by end() */
        put_u32(b->data + b->len + 4, id);
        put_u16(b->data + b->len + 8, (uint16_t) (op | (answer ? SIGNER_ANSWER : 0)));
        put_u16(b->data + b->len + 10, (uint16_t) (int16_t) status);
        b->len += SIGNER_HEADER_LEN;
        b->open = true;
        b->error = 0;
        return 0;
}

int signer_msg_add(struct signer_buf *b, unsigned tag, const void *data, size_t len) {
        int r;

        if (!b || !b->open)
                return -EINVAL;
        if (b->error < 0)
                return b->error;
        if (tag == 0 || tag >= _SIGNER_TAG_MAX || len > tags[tag].max || (len > 0 && !data)) {
                b->error = -EINVAL;
                return b->error;
        }
        r = buf_reserve(b, SIGNER_FIELD_HEADER_LEN + len);
        if (r < 0) {
                b->error = r;
                return r;
        }
        put_u16(b->data + b->len, (uint16_t) tag);
        put_u32(b->data + b->len + 2, (uint32_t) len);
        if (len > 0)
                memcpy(b->data + b->len + SIGNER_FIELD_HEADER_LEN, data, len);
        b->len += SIGNER_FIELD_HEADER_LEN + len;
        return 0;
}

int signer_msg_add_str(struct signer_buf *b, unsigned tag, const char *s) {
        if (!s) {
                if (b)
                        b->error = b->error ?: -EINVAL;
                return -EINVAL;
        }
        return signer_msg_add(b, tag, s, strlen(s));
}

int signer_msg_add_u64(struct signer_buf *b, unsigned tag, uint64_t v) {
        uint8_t p[8];

        put_u32(p, (uint32_t) (v >> 32));
        put_u32(p + 4, (uint32_t) v);
        return signer_msg_add(b, tag, p, sizeof p);
}

int signer_msg_add_u8(struct signer_buf *b, unsigned tag, uint8_t v) {
        return signer_msg_add(b, tag, &v, 1);
}

static void drop_open(struct signer_buf *b) {
        OPENSSL_cleanse(b->data + b->start, b->len - b->start);
        b->len = b->start;
        b->open = false;
}

int signer_msg_end(struct signer_buf *b) {
        struct signer_msg m;
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
        if (n - SIGNER_PREFIX_LEN > SIGNER_MSG_MAX) {
                drop_open(b);
                return -EMSGSIZE;
        }
        put_u32(b->data + b->start, (uint32_t) (n - SIGNER_PREFIX_LEN));
        /* What the other side would refuse is never sent: a missing required field, a field the
         * op does not take, a NUL in a text, a length out of range. An error answer without
         * fields has nothing to check, and may echo an op unknown to the decoder (begin()). */
        bool bare_error = n == SIGNER_HEADER_LEN && (get_u16(b->data + b->start + 8) & SIGNER_ANSWER) &&
                          (int16_t) get_u16(b->data + b->start + 10) < 0;
        if (!bare_error && signer_msg_decode(b->data + b->start, n, &m) < 0) {
                drop_open(b);
                return -EINVAL;
        }
        b->open = false;
        return 0;
}

void signer_buf_consume(struct signer_buf *b, size_t n) {
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

void signer_buf_done(struct signer_buf *b) {
        if (!b)
                return;
        if (b->data) {
                OPENSSL_cleanse(b->data, b->cap);
                free(b->data);
        }
        *b = (struct signer_buf){};
}
