/* SPDX-License-Identifier: MIT */
/* The signer channel's codec (src/signer-proto.c): round trips of every op both ways, framing of
 * a stream cut anywhere, and each -EBADMSG rule of the format on messages built byte by byte
 * here (not with the encoder under test). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "iothub/signer-proto.h"
#include "iothub/util.h"

/* ---- a raw message builder, independent of the encoder ---- */
struct raw {
        uint8_t b[4096];
        size_t n;
};

static void raw_u16(struct raw *r, unsigned v) {
        r->b[r->n++] = (uint8_t) (v >> 8);
        r->b[r->n++] = (uint8_t) v;
}

static void raw_u32(struct raw *r, uint32_t v) {
        raw_u16(r, v >> 16);
        raw_u16(r, v & 0xffff);
}

static void raw_begin(struct raw *r, uint32_t id, unsigned op, int status) {
        r->n = 0;
        raw_u32(r, 0);
        raw_u32(r, id);
        raw_u16(r, op);
        raw_u16(r, (uint16_t) (int16_t) status);
}

static void raw_field(struct raw *r, unsigned tag, const void *v, size_t len) {
        raw_u16(r, tag);
        raw_u32(r, (uint32_t) len);
        memcpy(r->b + r->n, v, len);
        r->n += len;
}

static void raw_str(struct raw *r, unsigned tag, const char *s) {
        raw_field(r, tag, s, strlen(s));
}

static void raw_end(struct raw *r) {
        uint32_t n = (uint32_t) (r->n - 4);
        r->b[0] = (uint8_t) (n >> 24);
        r->b[1] = (uint8_t) (n >> 16);
        r->b[2] = (uint8_t) (n >> 8);
        r->b[3] = (uint8_t) n;
}

static const char KID[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ"; /* 43 */

static void raw_sign_dpop(struct raw *r) {
        raw_begin(r, 7, SIGNER_OP_SIGN_DPOP, 0);
        raw_str(r, SIGNER_TAG_METHOD, "POST");
        raw_str(r, SIGNER_TAG_URL, "https://as.example/token");
        raw_end(r);
}

static int decode(const struct raw *r) {
        struct signer_msg m;
        return signer_msg_decode(r->b, r->n, &m);
}

/* ---- round trips ---- */

static void test_round_trip_http(void **state) {
        struct signer_buf b = {};
        struct signer_msg m;
        uint8_t body[300];
        char *s = NULL;
        uint8_t prio = 9;
        size_t need = 0;

        for (size_t i = 0; i < sizeof body; i++)
                body[i] = (uint8_t) i; /* NULs included: BODY is bytes */
        assert_int_equal(signer_msg_begin(&b, 0xdeadbeef, SIGNER_OP_SIGN_HTTP, false, 0), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_METHOD, "POST"), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_TARGET_URI, "https://cloud.example/v1/x?y=1"), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_AUTHORIZATION, "Bearer abc"), 0);
        assert_int_equal(signer_msg_add(&b, SIGNER_TAG_BODY, body, sizeof body), 0);
        assert_int_equal(signer_msg_add_u8(&b, SIGNER_TAG_PRIO, 1), 0);
        assert_int_equal(signer_msg_end(&b), 0);

        assert_int_equal(signer_msg_frame(b.data, b.len, &need), 1);
        assert_int_equal(need, b.len);
        assert_int_equal(signer_msg_decode(b.data, b.len, &m), 0);
        assert_int_equal(m.id, 0xdeadbeef);
        assert_int_equal(m.op, SIGNER_OP_SIGN_HTTP);
        assert_false(m.answer);
        assert_int_equal(m.status, 0);
        assert_int_equal(signer_msg_strdup(&m, SIGNER_TAG_TARGET_URI, &s), 0);
        assert_string_equal(s, "https://cloud.example/v1/x?y=1");
        free(s);
        assert_int_equal(m.f[SIGNER_TAG_BODY].len, sizeof body);
        assert_memory_equal(m.f[SIGNER_TAG_BODY].data, body, sizeof body);
        assert_int_equal(signer_msg_u8(&m, SIGNER_TAG_PRIO, &prio), 0);
        assert_int_equal(prio, 1);
        assert_false(signer_msg_has(&m, SIGNER_TAG_NONCE));
        assert_int_equal(signer_msg_strdup(&m, SIGNER_TAG_NONCE, &s), -ENOENT);

        /* The answer, after the request in the same buffer: two messages queued. */
        assert_int_equal(signer_msg_begin(&b, 0xdeadbeef, SIGNER_OP_SIGN_HTTP, true, 0), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_SIGNATURE_INPUT, "Signature-Input: hub=()"), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_SIGNATURE, "Signature: hub=:AA==:"), 0);
        assert_int_equal(signer_msg_end(&b), 0);
        signer_buf_consume(&b, need);
        assert_int_equal(signer_msg_frame(b.data, b.len, &need), 1);
        assert_int_equal(signer_msg_decode(b.data, b.len, &m), 0);
        assert_true(m.answer);
        assert_int_equal(m.op, SIGNER_OP_SIGN_HTTP);
        assert_true(signer_msg_has(&m, SIGNER_TAG_SIGNATURE));
        assert_false(signer_msg_has(&m, SIGNER_TAG_CONTENT_DIGEST));
        signer_buf_done(&b);
        assert_null(b.data);
}

static void test_round_trip_every_op(void **state) {
        /* Every op's request and answer with all of their tags, values at their maxima. */
        static uint8_t big[1024 * 1024];
        memset(big, 'a', sizeof big);
        for (unsigned op = 1; op < _SIGNER_OP_MAX; op++)
                for (int answer = 0; answer <= 1; answer++) {
                        struct signer_buf b = {};
                        struct signer_msg m;
                        unsigned n = 0;

                        assert_int_equal(signer_msg_begin(&b, op * 10u + (unsigned) answer, op, answer, 0), 0);
                        if (op == SIGNER_OP_CANCEL && answer) {
                                /* Never answered: the encoder refuses it as the decoder does. */
                                assert_int_equal(signer_msg_end(&b), -EINVAL);
                                assert_int_equal(b.len, 0);
                                assert_non_null(signer_op_to_string(op));
                                signer_buf_done(&b);
                                continue;
                        }
                        for (unsigned t = 1; t < _SIGNER_TAG_MAX; t++) {
                                enum signer_kind kind;
                                uint32_t lo, hi;
                                if (signer_tag_rule(op, answer, t) == 0)
                                        continue;
                                assert_int_equal(signer_tag_limits(t, &kind, &lo, &hi), 0);
                                if (kind == SIGNER_KIND_U64)
                                        assert_int_equal(signer_msg_add_u64(&b, t, UINT64_C(0x0102030405060708) + t), 0);
                                else if (kind == SIGNER_KIND_U8)
                                        assert_int_equal(signer_msg_add_u8(&b, t, 1), 0);
                                else
                                        assert_int_equal(signer_msg_add(&b, t, big, hi), 0);
                                n++;
                        }
                        assert_int_equal(signer_msg_end(&b), 0);
                        assert_int_equal(signer_msg_decode(b.data, b.len, &m), 0);
                        assert_int_equal(m.op, op);
                        assert_int_equal(m.answer, answer);
                        assert_int_equal(m.id, op * 10u + (unsigned) answer);
                        for (unsigned t = 1; t < _SIGNER_TAG_MAX; t++) {
                                uint64_t v;
                                assert_int_equal(signer_msg_has(&m, t), signer_tag_rule(op, answer, t) != 0);
                                enum signer_kind kind = SIGNER_KIND_TEXT;
                                assert_int_equal(signer_tag_limits(t, &kind, NULL, NULL), 0);
                                if (signer_msg_has(&m, t) && kind == SIGNER_KIND_U64) {
                                        assert_int_equal(signer_msg_u64(&m, t, &v), 0);
                                        assert_true(v == UINT64_C(0x0102030405060708) + t);
                                }
                                n -= signer_msg_has(&m, t);
                        }
                        assert_int_equal(n, 0);
                        assert_non_null(signer_op_to_string(op));
                        signer_buf_done(&b);
                }
}

static void test_error_answer(void **state) {
        struct signer_buf b = {};
        struct signer_msg m;

        /* An error answer carries no field, not even the required ones. */
        assert_int_equal(signer_msg_begin(&b, 5, SIGNER_OP_KEY_INFO, true, -ENOENT), 0);
        assert_int_equal(signer_msg_end(&b), 0);
        assert_int_equal(signer_msg_decode(b.data, b.len, &m), 0);
        assert_int_equal(m.status, -ENOENT);
        assert_int_equal(b.len, SIGNER_HEADER_LEN);
        /* With a field it is not sent. */
        assert_int_equal(signer_msg_begin(&b, 6, SIGNER_OP_KEY_INFO, true, -EPERM), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_BACKEND, "tpm"), 0);
        assert_int_equal(signer_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, SIGNER_HEADER_LEN);
        /* -EBADMSG to an unknown op echoes that op (iothub-signer(8) WIRE FORMAT), or 0 when
         * the header was unreadable; never with a field, never in a successful answer. */
        static const uint8_t unknown[] = { 0, 0, 0, 8, 0, 0, 0, 11, 0x80, 99, 0xff, (uint8_t) -EBADMSG };
        static const uint8_t none[] = { 0, 0, 0, 8, 0, 0, 0, 0, 0x80, 0, 0xff, (uint8_t) -EBADMSG };
        assert_int_equal(signer_msg_begin(&b, 11, 99, true, -EBADMSG), 0);
        assert_int_equal(signer_msg_end(&b), 0);
        assert_int_equal(b.len, 2 * SIGNER_HEADER_LEN);
        assert_memory_equal(b.data + SIGNER_HEADER_LEN, unknown, sizeof unknown);
        assert_int_equal(signer_msg_begin(&b, 0, 0, true, -EBADMSG), 0);
        assert_int_equal(signer_msg_end(&b), 0);
        assert_memory_equal(b.data + 2 * SIGNER_HEADER_LEN, none, sizeof none);
        assert_int_equal(signer_msg_begin(&b, 12, 99, true, -EBADMSG), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_BACKEND, "tpm"), 0);
        assert_int_equal(signer_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 3 * SIGNER_HEADER_LEN);
        assert_int_equal(signer_msg_begin(&b, 13, 99, true, 0), -EINVAL);
        assert_int_equal(signer_msg_begin(&b, 13, 0x8000, true, -EBADMSG), -EINVAL);
        assert_int_equal(signer_msg_begin(&b, 13, 0, false, 0), -EINVAL);
        /* CANCEL is never answered; the -EBADMSG to a CANCEL with a field echoes its op as to any
         * malformed request (then the close), and the client's decoder refuses it as it would an
         * unknown op's. A successful answer to CANCEL is never built. */
        assert_int_equal(signer_msg_begin(&b, 14, SIGNER_OP_CANCEL, true, -EBADMSG), 0);
        assert_int_equal(signer_msg_end(&b), 0);
        assert_int_equal(b.len, 4 * SIGNER_HEADER_LEN);
        assert_int_equal(signer_msg_decode(b.data + 3 * SIGNER_HEADER_LEN, SIGNER_HEADER_LEN, &m), -EBADMSG);
        assert_int_equal(signer_msg_begin(&b, 15, SIGNER_OP_CANCEL, true, 0), 0);
        assert_int_equal(signer_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 4 * SIGNER_HEADER_LEN);
        signer_buf_done(&b);
}

static void test_encoder_refuses(void **state) {
        struct signer_buf b = {};
        char big[8 * 1024 + 2]; /* one more than AUTHORIZATION's maximum */

        memset(big, 'x', sizeof big - 1);
        big[sizeof big - 1] = '\0';
        /* Requests have status 0; a positive status is no errno. */
        assert_int_equal(signer_msg_begin(&b, 1, SIGNER_OP_STATUS, false, -EPERM), -EINVAL);
        assert_int_equal(signer_msg_begin(&b, 1, SIGNER_OP_STATUS, true, 1), -EINVAL);
        assert_int_equal(signer_msg_begin(&b, 1, 0, false, 0), -EINVAL);
        assert_int_equal(signer_msg_begin(&b, 1, _SIGNER_OP_MAX, false, 0), -EINVAL);
        assert_null(b.data);

        /* Missing required tag: dropped, nothing left behind. */
        assert_int_equal(signer_msg_begin(&b, 1, SIGNER_OP_SIGN_DPOP, false, 0), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_METHOD, "GET"), 0);
        assert_int_equal(signer_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 0);
        /* Over-long value: the add fails, and so does end(). */
        assert_int_equal(signer_msg_begin(&b, 1, SIGNER_OP_SIGN_HTTP, false, 0), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_AUTHORIZATION, big), -EINVAL);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_METHOD, "GET"), -EINVAL);
        assert_int_equal(signer_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 0);
        /* A tag the op does not take, a duplicate: refused by end()'s decode. */
        assert_int_equal(signer_msg_begin(&b, 1, SIGNER_OP_STATUS, false, 0), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_METHOD, "GET"), 0);
        assert_int_equal(signer_msg_end(&b), -EINVAL);
        assert_int_equal(signer_msg_begin(&b, 1, SIGNER_OP_ATTEST_ANSWER, false, 0), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_CHALLENGE, "{}"), 0);
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_CHALLENGE, "{}"), 0);
        assert_int_equal(signer_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 0);
        /* NUL inside a text. */
        assert_int_equal(signer_msg_begin(&b, 1, SIGNER_OP_ATTEST_ANSWER, false, 0), 0);
        assert_int_equal(signer_msg_add(&b, SIGNER_TAG_CHALLENGE, "a\0b", 3), 0);
        assert_int_equal(signer_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 0);
        /* Not begun. */
        assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_METHOD, "GET"), -EINVAL);
        assert_int_equal(signer_msg_end(&b), -EINVAL);
        signer_buf_done(&b);
}

/* ---- framing ---- */

static void test_frame(void **state) {
        struct raw r;
        size_t need = 0;
        uint32_t id = 0;

        raw_sign_dpop(&r);
        assert_int_equal(decode(&r), 0);
        /* Fed byte by byte: 0 until the last byte, then 1 with the whole size. */
        for (size_t i = 0; i < r.n; i++) {
                assert_int_equal(signer_msg_frame(r.b, i, &need), 0);
                assert_int_equal(need, i < 4 ? 4 : r.n);
        }
        assert_int_equal(signer_msg_frame(r.b, r.n, &need), 1);
        assert_int_equal(need, r.n);
        /* More bytes behind it (the next message) do not change the first one's size. */
        assert_int_equal(signer_msg_frame(r.b, r.n + 5, &need), 1);
        assert_int_equal(need, r.n);
        assert_int_equal(signer_msg_peek_id(r.b, r.n, &id), 0);
        assert_int_equal(id, 7);
        assert_int_equal(signer_msg_peek_id(r.b, 11, &id), -EBADMSG);

        /* A prefix out of range: shorter than the header, longer than SIGNER_MSG_MAX. */
        memcpy(r.b, (uint8_t[]){ 0, 0, 0, 7 }, 4);
        assert_int_equal(signer_msg_frame(r.b, 4, &need), -EBADMSG);
        memcpy(r.b, (uint8_t[]){ 0, 0, 0, 8 }, 4);
        assert_int_equal(signer_msg_frame(r.b, 4, &need), 0);
        assert_int_equal(need, 12);
        r.b[0] = 0, r.b[1] = 0x11, r.b[2] = 0, r.b[3] = 0; /* 1 MiB + 64 KiB */
        assert_int_equal(signer_msg_frame(r.b, 4, &need), 0);
        assert_int_equal(need, 4 + SIGNER_MSG_MAX);
        r.b[3] = 1;
        assert_int_equal(signer_msg_frame(r.b, 4, &need), -EBADMSG);
        memset(r.b, 0xff, 4);
        assert_int_equal(signer_msg_frame(r.b, 4, &need), -EBADMSG);
}

/* ---- every -EBADMSG rule ---- */

static void test_badmsg(void **state) {
        struct raw r;
        uint8_t eight[8] = {};

        /* Unknown ops, 0 and past the end. */
        raw_begin(&r, 1, 0, 0);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, _SIGNER_OP_MAX, 0);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, 0x7fff, 0);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        /* A known op with no field decodes. */
        raw_begin(&r, 1, SIGNER_OP_STATUS, 0);
        raw_end(&r);
        assert_int_equal(decode(&r), 0);
        /* CANCEL: no fields, and never answered, not even with an error. */
        raw_begin(&r, 9, SIGNER_OP_CANCEL, 0);
        raw_end(&r);
        assert_int_equal(decode(&r), 0);
        raw_begin(&r, 9, SIGNER_OP_CANCEL, 0);
        raw_field(&r, SIGNER_TAG_PRIO, "\0", 1);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 9, SIGNER_OP_CANCEL, 0);
        raw_field(&r, SIGNER_TAG_IAT, eight, 8);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 9, SIGNER_OP_CANCEL | SIGNER_ANSWER, 0);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 9, SIGNER_OP_CANCEL | SIGNER_ANSWER, -ECANCELED);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        /* STATUS's answer: CANCELLED optional (an older signer has none), a u64. */
        raw_begin(&r, 1, SIGNER_OP_STATUS | SIGNER_ANSWER, 0);
        for (unsigned t = SIGNER_TAG_SIGNATURES; t <= SIGNER_TAG_TPM_ERRORS; t++)
                raw_field(&r, t, eight, 8);
        raw_end(&r);
        assert_int_equal(decode(&r), 0);
        raw_field(&r, SIGNER_TAG_CANCELLED, eight, 8);
        raw_end(&r);
        assert_int_equal(decode(&r), 0);
        raw_begin(&r, 1, SIGNER_OP_STATUS | SIGNER_ANSWER, 0);
        for (unsigned t = SIGNER_TAG_SIGNATURES; t <= SIGNER_TAG_TPM_ERRORS; t++)
                raw_field(&r, t, eight, 8);
        raw_field(&r, SIGNER_TAG_CANCELLED, eight, 7);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        /* A request with a status; an answer with a positive status. */
        raw_begin(&r, 1, SIGNER_OP_STATUS, -1);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, SIGNER_OP_STATUS | SIGNER_ANSWER, 5);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        /* The length prefix disagrees with the buffer. */
        raw_sign_dpop(&r);
        r.b[3]++;
        assert_int_equal(decode(&r), -EBADMSG);
        raw_sign_dpop(&r);
        r.b[3]--;
        assert_int_equal(decode(&r), -EBADMSG);

        /* Unknown tag, tag 0. */
        raw_begin(&r, 1, SIGNER_OP_STATUS, 0);
        raw_str(&r, _SIGNER_TAG_MAX, "x");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, SIGNER_OP_STATUS, 0);
        raw_str(&r, 0, "x");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        /* A known tag the op does not take (request side and answer side). */
        raw_begin(&r, 1, SIGNER_OP_STATUS, 0);
        raw_str(&r, SIGNER_TAG_METHOD, "GET");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, SIGNER_OP_SIGN_DPOP, 0);
        raw_str(&r, SIGNER_TAG_METHOD, "POST");
        raw_str(&r, SIGNER_TAG_URL, "https://as.example/token");
        raw_str(&r, SIGNER_TAG_PROOF, "x.y.z"); /* an answer's tag */
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        /* Duplicate. */
        raw_begin(&r, 1, SIGNER_OP_SIGN_DPOP, 0);
        raw_str(&r, SIGNER_TAG_METHOD, "POST");
        raw_str(&r, SIGNER_TAG_URL, "https://as.example/token");
        raw_str(&r, SIGNER_TAG_METHOD, "POST");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        /* Missing required (request, answer); the order of fields is free. */
        raw_begin(&r, 1, SIGNER_OP_SIGN_DPOP, 0);
        raw_str(&r, SIGNER_TAG_URL, "https://as.example/token");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_str(&r, SIGNER_TAG_METHOD, "GET");
        raw_end(&r);
        assert_int_equal(decode(&r), 0);
        raw_begin(&r, 1, SIGNER_OP_KEY_INFO | SIGNER_ANSWER, 0);
        raw_str(&r, SIGNER_TAG_KEY_ID, KID);
        raw_str(&r, SIGNER_TAG_JWK, "{}");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_str(&r, SIGNER_TAG_BACKEND, "tpm");
        raw_end(&r);
        assert_int_equal(decode(&r), 0);
        /* An error answer with a field. */
        raw_begin(&r, 1, SIGNER_OP_KEY_INFO | SIGNER_ANSWER, -ENOENT);
        raw_str(&r, SIGNER_TAG_BACKEND, "tpm");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);

        /* Over-long and too short values; fixed-size numbers of the wrong size. */
        raw_begin(&r, 1, SIGNER_OP_SIGN_DPOP, 0);
        raw_str(&r, SIGNER_TAG_METHOD, "123456789");
        raw_str(&r, SIGNER_TAG_URL, "https://as.example/token");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, SIGNER_OP_SIGN_DPOP, 0);
        raw_str(&r, SIGNER_TAG_METHOD, "");
        raw_str(&r, SIGNER_TAG_URL, "https://as.example/token");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, SIGNER_OP_SIGN_DPOP, 0);
        raw_str(&r, SIGNER_TAG_METHOD, "GET");
        raw_str(&r, SIGNER_TAG_URL, "https://as.example/token");
        raw_str(&r, SIGNER_TAG_ATH, "tooshort");
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, SIGNER_OP_TOKENS_PUT, 0);
        raw_str(&r, SIGNER_TAG_ACCESS_TOKEN, "a");
        raw_str(&r, SIGNER_TAG_TOKEN_TYPE, "Bearer");
        raw_field(&r, SIGNER_TAG_EXPIRES_AT, eight, 7);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, SIGNER_OP_TOKENS_PUT, 0);
        raw_str(&r, SIGNER_TAG_ACCESS_TOKEN, "a");
        raw_str(&r, SIGNER_TAG_TOKEN_TYPE, "Bearer");
        raw_field(&r, SIGNER_TAG_EXPIRES_AT, eight, 8);
        raw_end(&r);
        assert_int_equal(decode(&r), 0);
        /* A field length past the end of the message (huge, and by one). */
        raw_begin(&r, 1, SIGNER_OP_ATTEST_ANSWER, 0);
        raw_u16(&r, SIGNER_TAG_CHALLENGE);
        raw_u32(&r, 0xffffffffu);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, SIGNER_OP_ATTEST_ANSWER, 0);
        raw_u16(&r, SIGNER_TAG_CHALLENGE);
        raw_u32(&r, 3);
        r.b[r.n++] = '{';
        r.b[r.n++] = '}';
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);

        /* NUL inside a text value; bytes (BODY) may hold one. */
        raw_begin(&r, 1, SIGNER_OP_ATTEST_ANSWER, 0);
        raw_field(&r, SIGNER_TAG_CHALLENGE, "{\0}", 3);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);
        raw_begin(&r, 1, SIGNER_OP_SIGN_HTTP, 0);
        raw_str(&r, SIGNER_TAG_METHOD, "POST");
        raw_str(&r, SIGNER_TAG_TARGET_URI, "https://c.example/");
        raw_str(&r, SIGNER_TAG_AUTHORIZATION, "Bearer a");
        raw_field(&r, SIGNER_TAG_BODY, "a\0b", 3);
        raw_field(&r, SIGNER_TAG_PRIO, "\0", 1);
        raw_end(&r);
        assert_int_equal(decode(&r), 0);
        /* SIGN_HTTP without AUTHORIZATION: required (PROTOCOL.md 3, every request is signed with it). */
        raw_begin(&r, 1, SIGNER_OP_SIGN_HTTP, 0);
        raw_str(&r, SIGNER_TAG_METHOD, "POST");
        raw_str(&r, SIGNER_TAG_TARGET_URI, "https://c.example/");
        raw_field(&r, SIGNER_TAG_PRIO, "\0", 1);
        raw_end(&r);
        assert_int_equal(decode(&r), -EBADMSG);

        /* Trailing bytes: 1..5 bytes after the last field (a cut field header). */
        for (size_t extra = 1; extra < SIGNER_FIELD_HEADER_LEN; extra++) {
                raw_sign_dpop(&r);
                memset(r.b + r.n, 0, extra);
                r.n += extra;
                raw_end(&r);
                assert_int_equal(decode(&r), -EBADMSG);
        }
        /* A buffer shorter than a header. */
        assert_int_equal(signer_msg_decode(r.b, 11, &(struct signer_msg){}), -EBADMSG);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_round_trip_http), cmocka_unit_test(test_round_trip_every_op),
                cmocka_unit_test(test_error_answer),    cmocka_unit_test(test_encoder_refuses),
                cmocka_unit_test(test_frame),           cmocka_unit_test(test_badmsg),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
