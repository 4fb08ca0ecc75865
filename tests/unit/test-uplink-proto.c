/* SPDX-License-Identifier: MIT */
/* The uplink channel's table (src/uplink-proto.c) on the codec (src/tlv.c): round trips of every
 * op and kind, each -EBADMSG rule on messages built byte by byte here (not with the encoder under
 * test), the encoder refusing the same, and uplink_request_target(): every URL it builds is one
 * the signer's policy signs (signer_policy_http(), signer_policy_dpop()), and every near miss of
 * it is refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "iothub/conf.h"
#include "iothub/signer-policy.h"
#include "iothub/uplink-proto.h"
#include "iothub/util.h"

/* ---- messages built by hand: header, then fields {tag, value, length} ---- */
struct rf {
        unsigned tag;
        const void *v;
        size_t len;
};
#define S(t, s) { UPLINK_TAG_##t, s, sizeof(s) - 1 }
#define U8V(t, x) { UPLINK_TAG_##t, (const uint8_t[]){ x }, 1 }
#define U64V(t, x) { UPLINK_TAG_##t, (const uint8_t[]){ 0, 0, 0, 0, (x) >> 24 & 0xff, (x) >> 16 & 0xff, (x) >> 8 & 0xff, (x) & 0xff }, 8 }

static uint8_t raw_buf[8192];

static void put_be(uint8_t *p, uint64_t v, unsigned n) {
        for (unsigned i = 0; i < n; i++)
                p[i] = (uint8_t) (v >> (8 * (n - 1 - i)));
}

/* The message, its length in *ret_len. */
static const uint8_t *raw(size_t *ret_len, unsigned op_and_answer, int status, const struct rf *f, size_t n) {
        size_t at = 12;

        put_be(raw_buf + 4, 77, 4);
        put_be(raw_buf + 8, op_and_answer, 2);
        put_be(raw_buf + 10, (uint16_t) (int16_t) status, 2);
        for (size_t i = 0; i < n; i++) {
                assert_true(at + 6 + f[i].len <= sizeof raw_buf);
                put_be(raw_buf + at, f[i].tag, 2);
                put_be(raw_buf + at + 2, f[i].len, 4);
                memcpy(raw_buf + at + 6, f[i].v, f[i].len);
                at += 6 + f[i].len;
        }
        put_be(raw_buf, at - 4, 4);
        *ret_len = at;
        return raw_buf;
}

/* Decodes op's message (status 0) with the fields given: 0 or -EBADMSG. */
#define DEC(op, ...)                                                                                              \
        ({                                                                                                        \
                const struct rf fs_[] = { __VA_ARGS__ };                                                          \
                size_t n_;                                                                                        \
                struct tlv_msg m_;                                                                                \
                const uint8_t *b_ = raw(&n_, (op), 0, fs_, ELEMENTSOF(fs_));                                      \
                uplink_msg_decode(b_, n_, &m_);                                                                   \
        })
#define REQ UPLINK_OP_REQUEST
#define ANS(op) ((op) | TLV_ANSWER)

/* ---- round trips ---- */

static void test_round_trip_request(void **state) {
        static const struct {
                unsigned kind;
                const char *arg;
                bool body;
        } rows[] = {
                { UPLINK_KIND_STATUS, NULL, true },          { UPLINK_KIND_DEVICES, NULL, true },
                { UPLINK_KIND_EVENTS, NULL, true },          { UPLINK_KIND_COMMANDS_POLL, "30", false },
                { UPLINK_KIND_COMMANDS_POLL, "007", false }, { UPLINK_KIND_COMMAND_RESULT, "cmd-1.A_b", true },
        };
        uint8_t body[512];

        for (size_t i = 0; i < sizeof body; i++)
                body[i] = (uint8_t) i; /* NULs included: BODY is bytes */
        for (size_t i = 0; i < ELEMENTSOF(rows); i++) {
                struct tlv_buf b = {};
                struct tlv_msg m;
                size_t need = 0;
                uint8_t kind = 0;
                uint64_t v = 0;
                char *s = NULL;

                assert_int_equal(uplink_msg_begin(&b, (uint32_t) i + 1, UPLINK_OP_REQUEST, false, 0), 0);
                assert_int_equal(tlv_msg_add_u8(&b, UPLINK_TAG_KIND, (uint8_t) rows[i].kind), 0);
                if (rows[i].arg)
                        assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_ARG, rows[i].arg), 0);
                if (rows[i].body)
                        assert_int_equal(tlv_msg_add(&b, UPLINK_TAG_BODY, body, sizeof body), 0);
                assert_int_equal(tlv_msg_add_u64(&b, UPLINK_TAG_TIMEOUT, UPLINK_TIMEOUT_MAX_S), 0);
                assert_int_equal(tlv_msg_end(&b), 0);
                /* The answer queued behind it. */
                assert_int_equal(uplink_msg_begin(&b, (uint32_t) i + 1, UPLINK_OP_REQUEST, true, 0), 0);
                assert_int_equal(tlv_msg_add_u64(&b, UPLINK_TAG_HTTP_STATUS, 503), 0);
                assert_int_equal(tlv_msg_add(&b, UPLINK_TAG_BODY, NULL, 0), 0);
                assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_RETRY_AFTER, "120"), 0);
                assert_int_equal(tlv_msg_end(&b), 0);

                assert_int_equal(uplink_msg_frame(b.data, b.len, &need), 1);
                assert_int_equal(uplink_msg_decode(b.data, need, &m), 0);
                assert_int_equal(m.id, i + 1);
                assert_int_equal(m.op, UPLINK_OP_REQUEST);
                assert_false(m.answer);
                assert_int_equal(tlv_msg_u8(&m, UPLINK_TAG_KIND, &kind), 0);
                assert_int_equal(kind, rows[i].kind);
                assert_int_equal(tlv_msg_has(&m, UPLINK_TAG_ARG), rows[i].arg != NULL);
                if (rows[i].arg) {
                        assert_int_equal(tlv_msg_strdup(&m, UPLINK_TAG_ARG, &s), 0);
                        assert_string_equal(s, rows[i].arg);
                        free(s);
                }
                assert_int_equal(tlv_msg_has(&m, UPLINK_TAG_BODY), rows[i].body);
                if (rows[i].body) {
                        assert_int_equal(m.f[UPLINK_TAG_BODY].len, sizeof body);
                        assert_memory_equal(m.f[UPLINK_TAG_BODY].data, body, sizeof body);
                }
                assert_int_equal(tlv_msg_u64(&m, UPLINK_TAG_TIMEOUT, &v), 0);
                assert_int_equal(v, UPLINK_TIMEOUT_MAX_S);

                tlv_buf_consume(&b, need);
                assert_int_equal(uplink_msg_frame(b.data, b.len, &need), 1);
                assert_int_equal(need, b.len);
                assert_int_equal(uplink_msg_decode(b.data, b.len, &m), 0);
                assert_true(m.answer);
                assert_int_equal(tlv_msg_u64(&m, UPLINK_TAG_HTTP_STATUS, &v), 0);
                assert_int_equal(v, 503);
                assert_true(tlv_msg_has(&m, UPLINK_TAG_BODY));
                assert_int_equal(m.f[UPLINK_TAG_BODY].len, 0);
                assert_int_equal(tlv_msg_strdup(&m, UPLINK_TAG_RETRY_AFTER, &s), 0);
                assert_string_equal(s, "120");
                free(s);
                tlv_buf_done(&b);
                assert_null(b.data);
        }
}

static void test_round_trip_every_op(void **state) {
        /* Every op's request and answer with all of their tags, text and bytes at their maxima
         * (a REQUEST: the kind that takes each tag). */
        static uint8_t big[1024 * 1024];

        memset(big, '7', sizeof big);
        for (unsigned op = 1; op < _UPLINK_OP_MAX; op++)
                for (int answer = 0; answer <= 1; answer++) {
                        struct tlv_buf b = {};
                        struct tlv_msg m;

                        assert_non_null(tlv_op_to_string(&uplink_proto, op));
                        assert_int_equal(uplink_msg_begin(&b, op, op, answer, 0), 0);
                        if (op == UPLINK_OP_CANCEL && answer) {
                                /* Never answered: the encoder refuses it as the decoder does. */
                                assert_int_equal(tlv_msg_end(&b), -EINVAL);
                                tlv_buf_done(&b);
                                continue;
                        }
                        for (unsigned t = 1; t < _UPLINK_TAG_MAX; t++) {
                                enum tlv_kind kind;
                                uint32_t lo, hi;

                                if (tlv_tag_rule(&uplink_proto, op, answer, t) == 0)
                                        continue;
                                assert_int_equal(tlv_tag_limits(&uplink_proto, t, &kind, &lo, &hi), 0);
                                if (t == UPLINK_TAG_KIND)
                                        assert_int_equal(tlv_msg_add_u8(&b, t, UPLINK_KIND_COMMANDS_POLL), 0);
                                else if (t == UPLINK_TAG_ARG)
                                        assert_int_equal(tlv_msg_add_str(&b, t, "999"), 0);
                                else if (t == UPLINK_TAG_BODY && !answer)
                                        continue; /* a poll has none */
                                else if (t == UPLINK_TAG_HTTP_STATUS)
                                        assert_int_equal(tlv_msg_add_u64(&b, t, 599), 0);
                                else if (t == UPLINK_TAG_TIMEOUT)
                                        assert_int_equal(tlv_msg_add_u64(&b, t, 0), 0);
                                else if (kind == TLV_KIND_U64)
                                        assert_int_equal(tlv_msg_add_u64(&b, t, UINT64_MAX), 0);
                                else
                                        assert_int_equal(tlv_msg_add(&b, t, big, hi), 0);
                        }
                        assert_int_equal(tlv_msg_end(&b), 0);
                        assert_int_equal(uplink_msg_decode(b.data, b.len, &m), 0);
                        assert_int_equal(m.op, op);
                        assert_int_equal(m.answer, answer);
                        for (unsigned t = 1; t < _UPLINK_TAG_MAX; t++)
                                if (!(t == UPLINK_TAG_BODY && op == UPLINK_OP_REQUEST && !answer))
                                        assert_int_equal(tlv_msg_has(&m, t), tlv_tag_rule(&uplink_proto, op, answer, t) != 0);
                        tlv_buf_done(&b);
                }
        /* Every tag has a name, a kind and limits; none past the end. */
        for (unsigned t = 1; t < _UPLINK_TAG_MAX; t++)
                assert_non_null(tlv_tag_to_string(&uplink_proto, t));
        assert_null(tlv_tag_to_string(&uplink_proto, _UPLINK_TAG_MAX));
        assert_null(tlv_op_to_string(&uplink_proto, _UPLINK_OP_MAX));
        assert_null(uplink_kind_to_string(0));
        assert_null(uplink_kind_to_string(_UPLINK_KIND_MAX));
        assert_string_equal(uplink_kind_to_string(UPLINK_KIND_COMMAND_RESULT), "COMMAND_RESULT");
}

static void test_error_answer(void **state) {
        static const int errs[] = { -ETIMEDOUT, -ECONNREFUSED, -ENOKEY, -EACCES, -EFBIG, -EBADMSG };
        size_t n;

        for (size_t i = 0; i < ELEMENTSOF(errs); i++) {
                struct tlv_buf b = {};
                struct tlv_msg m;

                assert_int_equal(uplink_msg_begin(&b, 9, UPLINK_OP_REQUEST, true, errs[i]), 0);
                assert_int_equal(tlv_msg_end(&b), 0);
                assert_int_equal(uplink_msg_decode(b.data, b.len, &m), 0);
                assert_int_equal(m.status, errs[i]);
                tlv_buf_done(&b);
        }
        /* An error answer carries nothing. */
        raw(&n, ANS(UPLINK_OP_REQUEST), -ETIMEDOUT, (const struct rf[]){ U64V(HTTP_STATUS, 200) }, 1);
        assert_int_equal(uplink_msg_decode(raw_buf, n, &(struct tlv_msg){}), -EBADMSG);
        /* A request with a status, an answer with a positive one. */
        raw(&n, UPLINK_OP_LOGOUT, -1, NULL, 0);
        assert_int_equal(uplink_msg_decode(raw_buf, n, &(struct tlv_msg){}), -EBADMSG);
        raw(&n, ANS(UPLINK_OP_LOGOUT), 1, NULL, 0);
        assert_int_equal(uplink_msg_decode(raw_buf, n, &(struct tlv_msg){}), -EBADMSG);
        raw(&n, ANS(UPLINK_OP_LOGOUT), 0, NULL, 0);
        assert_int_equal(uplink_msg_decode(raw_buf, n, &(struct tlv_msg){}), 0);

        /* -EBADMSG to an unknown op echoes that op, or 0 when the header was unreadable
         * (iothub-uplink(8) WIRE FORMAT, the codec shared with the signer's channel); never
         * with a field, never in a successful answer or a request. */
        static const uint8_t unknown[] = { 0, 0, 0, 8, 0, 0, 0, 11, 0x80, 99, 0xff, (uint8_t) -EBADMSG };
        static const uint8_t none[] = { 0, 0, 0, 8, 0, 0, 0, 0, 0x80, 0, 0xff, (uint8_t) -EBADMSG };
        struct tlv_buf b = {};
        assert_int_equal(uplink_msg_begin(&b, 11, 99, true, -EBADMSG), 0);
        assert_int_equal(tlv_msg_end(&b), 0);
        assert_int_equal(b.len, TLV_HEADER_LEN);
        assert_memory_equal(b.data, unknown, sizeof unknown);
        assert_int_equal(uplink_msg_begin(&b, 0, 0, true, -EBADMSG), 0);
        assert_int_equal(tlv_msg_end(&b), 0);
        assert_memory_equal(b.data + TLV_HEADER_LEN, none, sizeof none);
        assert_int_equal(uplink_msg_begin(&b, 12, 99, true, -EBADMSG), 0);
        assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_MESSAGE, "x"), 0);
        assert_int_equal(tlv_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 2 * TLV_HEADER_LEN);
        assert_int_equal(uplink_msg_begin(&b, 13, 99, true, 0), -EINVAL);
        assert_int_equal(uplink_msg_begin(&b, 13, 0x8000, true, -EBADMSG), -EINVAL);
        assert_int_equal(uplink_msg_begin(&b, 13, 99, false, 0), -EINVAL);
        assert_int_equal(uplink_msg_begin(&b, 13, 0, false, 0), -EINVAL);
        tlv_buf_done(&b);
}

/* ---- every -EBADMSG rule ---- */

static void test_badmsg_structure(void **state) {
        static char arg65[66];
        uint8_t nul[] = { 'a', 0, 'b' };
        struct tlv_msg m;
        size_t n, need;

        memset(arg65, 'a', 65);
        /* The hand builder makes what decodes. */
        assert_int_equal(DEC(REQ, U8V(KIND, 1), { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, 5)), 0);
        /* Unknown op: 0, past the end, far out; an answer to an unknown op. */
        assert_int_equal(DEC(0, ), -EBADMSG);
        assert_int_equal(DEC(_UPLINK_OP_MAX, ), -EBADMSG);
        assert_int_equal(DEC(0x7fff, ), -EBADMSG);
        assert_int_equal(DEC(ANS(_UPLINK_OP_MAX), ), -EBADMSG);
        assert_int_equal(DEC(UPLINK_OP_LOGOUT, ), 0);
        /* CANCEL: no fields, and never answered, not even with an error. */
        assert_int_equal(DEC(UPLINK_OP_CANCEL, ), 0);
        assert_int_equal(DEC(UPLINK_OP_CANCEL, U64V(TIMEOUT, 5)), -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_CANCEL), ), -EBADMSG);
        raw(&n, ANS(UPLINK_OP_CANCEL), -ECANCELED, NULL, 0);
        assert_int_equal(uplink_msg_decode(raw_buf, n, &(struct tlv_msg){}), -EBADMSG);
        /* Unknown tag: 0, past the end. */
        assert_int_equal(DEC(UPLINK_OP_LOGOUT, { 0, "x", 1 }), -EBADMSG);
        assert_int_equal(DEC(UPLINK_OP_LOGOUT, { _UPLINK_TAG_MAX, "x", 1 }), -EBADMSG);
        assert_int_equal(DEC(UPLINK_OP_LOGOUT, { 0xffff, "x", 1 }), -EBADMSG);
        /* A known tag the op does not take: another op's, the answer's in a request, the request's
         * in an answer. */
        assert_int_equal(DEC(UPLINK_OP_LOGOUT, U64V(SINCE, 1)), -EBADMSG);
        assert_int_equal(DEC(UPLINK_OP_WATCH, U64V(SINCE, 1), U64V(GEN, 1)), -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_WATCH), U64V(GEN, 1), S(EVENTS, "[]"), U64V(SINCE, 1)), -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_WATCH), U64V(GEN, 1), S(EVENTS, "[]")), 0);
        /* Duplicate. */
        assert_int_equal(DEC(UPLINK_OP_WATCH, U64V(SINCE, 1), U64V(SINCE, 2)), -EBADMSG);
        assert_int_equal(DEC(REQ, U8V(KIND, 1), { UPLINK_TAG_BODY, "", 0 }, { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, 5)),
                         -EBADMSG);
        /* Missing required, in requests and answers. */
        assert_int_equal(DEC(UPLINK_OP_WATCH, ), -EBADMSG);
        assert_int_equal(DEC(REQ, { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, 5)), -EBADMSG);
        assert_int_equal(DEC(REQ, U8V(KIND, 1), { UPLINK_TAG_BODY, "", 0 }), -EBADMSG);
        assert_int_equal(DEC(ANS(REQ), { UPLINK_TAG_BODY, "", 0 }), -EBADMSG);
        assert_int_equal(DEC(ANS(REQ), U64V(HTTP_STATUS, 200)), -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_REGISTER), U64V(HTTP_STATUS, 200)), -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_LOGIN_START), S(USER_CODE, "ABCD-EFGH"), U64V(EXPIRES_IN, 600)), -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_LOGIN_START), S(USER_CODE, "ABCD-EFGH"),
                             S(VERIFICATION_URI, "https://as.example/device"), U64V(EXPIRES_IN, 600)),
                         0);
        assert_int_equal(DEC(ANS(UPLINK_OP_LOGIN_WAIT), ), -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_STATUS), ), -EBADMSG);
        /* Lengths out of range: text below its minimum and above its maximum, a u8 and a u64 of
         * another size. */
        assert_int_equal(DEC(REQ, U8V(KIND, 4), { UPLINK_TAG_ARG, "", 0 }, U64V(TIMEOUT, 5)), -EBADMSG);
        assert_int_equal(DEC(REQ, U8V(KIND, 5), { UPLINK_TAG_ARG, arg65, 65 }, { UPLINK_TAG_BODY, "", 0 },
                             U64V(TIMEOUT, 5)),
                         -EBADMSG);
        assert_int_equal(DEC(REQ, U8V(KIND, 5), { UPLINK_TAG_ARG, arg65, 64 }, { UPLINK_TAG_BODY, "", 0 },
                             U64V(TIMEOUT, 5)),
                         0);
        assert_int_equal(DEC(REQ, { UPLINK_TAG_KIND, "\0\1", 2 }, { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, 5)), -EBADMSG);
        assert_int_equal(DEC(REQ, U8V(KIND, 1), { UPLINK_TAG_BODY, "", 0 }, { UPLINK_TAG_TIMEOUT, "\0\0\0\0\0\0\5", 7 }),
                         -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_STATUS), S(STATUS_JSON, "{")), -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_STATUS), S(STATUS_JSON, "{}")), 0);
        /* A NUL inside a text (not in bytes). */
        assert_int_equal(DEC(ANS(UPLINK_OP_LOGIN_WAIT), { UPLINK_TAG_RESULT, nul, sizeof nul }), -EBADMSG);
        assert_int_equal(DEC(ANS(REQ), U64V(HTTP_STATUS, 200), { UPLINK_TAG_BODY, nul, sizeof nul }), 0);
        /* Trailing bytes: a field header cut short; a field longer than what is left. */
        raw(&n, UPLINK_OP_LOGOUT, 0, NULL, 0);
        raw_buf[n++] = 0;
        raw_buf[n++] = UPLINK_TAG_SINCE;
        put_be(raw_buf, n - 4, 4);
        assert_int_equal(uplink_msg_decode(raw_buf, n, &m), -EBADMSG);
        raw(&n, UPLINK_OP_WATCH, 0, (const struct rf[]){ U64V(SINCE, 1) }, 1);
        put_be(raw_buf + 14, 9, 4);
        assert_int_equal(uplink_msg_decode(raw_buf, n, &m), -EBADMSG);
        /* The prefix disagrees with the buffer; a buffer shorter than a header. */
        raw(&n, UPLINK_OP_LOGOUT, 0, NULL, 0);
        assert_int_equal(uplink_msg_decode(raw_buf, n - 1, &m), -EBADMSG);
        raw_buf[3]++;
        assert_int_equal(uplink_msg_decode(raw_buf, n, &m), -EBADMSG);
        assert_int_equal(uplink_msg_decode(raw_buf, 11, &m), -EBADMSG);
        /* Framing: a prefix shorter than a header or longer than UPLINK_MSG_MAX stops the stream;
         * a message cut anywhere asks for more. */
        put_be(raw_buf, 7, 4);
        assert_int_equal(uplink_msg_frame(raw_buf, 4, &need), -EBADMSG);
        put_be(raw_buf, UPLINK_MSG_MAX + 1, 4);
        assert_int_equal(uplink_msg_frame(raw_buf, 4, &need), -EBADMSG);
        put_be(raw_buf, UPLINK_MSG_MAX, 4);
        assert_int_equal(uplink_msg_frame(raw_buf, 4, &need), 0);
        assert_int_equal(need, 4 + UPLINK_MSG_MAX);
        raw(&n, UPLINK_OP_WATCH, 0, (const struct rf[]){ U64V(SINCE, 1) }, 1);
        for (size_t cut = 0; cut < n; cut++) {
                assert_int_equal(uplink_msg_frame(raw_buf, cut, &need), 0);
                assert_int_equal(need, cut < 4 ? 4 : n);
        }
        assert_int_equal(uplink_msg_frame(raw_buf, n, &need), 1);
}

static void test_badmsg_values(void **state) {
        /* KIND outside the enum. */
        assert_int_equal(DEC(REQ, U8V(KIND, 0), { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, 5)), -EBADMSG);
        assert_int_equal(DEC(REQ, U8V(KIND, _UPLINK_KIND_MAX), { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, 5)), -EBADMSG);
        assert_int_equal(DEC(REQ, U8V(KIND, 0xff), { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, 5)), -EBADMSG);
        /* ARG where the kind takes none. */
        for (unsigned k = UPLINK_KIND_STATUS; k <= UPLINK_KIND_EVENTS; k++) {
                assert_int_equal(DEC(REQ, U8V(KIND, k), { UPLINK_TAG_BODY, "{}", 2 }, U64V(TIMEOUT, 5)), 0);
                assert_int_equal(DEC(REQ, U8V(KIND, k), S(ARG, "1"), { UPLINK_TAG_BODY, "{}", 2 }, U64V(TIMEOUT, 5)),
                                 -EBADMSG);
        }
        /* COMMANDS_POLL: 1..3 digits, required; no BODY. */
        assert_int_equal(DEC(REQ, U8V(KIND, 4), S(ARG, "0"), U64V(TIMEOUT, 5)), 0);
        assert_int_equal(DEC(REQ, U8V(KIND, 4), S(ARG, "999"), U64V(TIMEOUT, 5)), 0);
        assert_int_equal(DEC(REQ, U8V(KIND, 4), U64V(TIMEOUT, 5)), -EBADMSG);
        static const char *const bad_waits[] = { "1000", "1a", " 1", "1 ", "-1", "+1", "0x1", "1.5", "٣" };
        for (size_t i = 0; i < ELEMENTSOF(bad_waits); i++) {
                const struct rf fs[] = { U8V(KIND, 4), { UPLINK_TAG_ARG, bad_waits[i], strlen(bad_waits[i]) },
                                         U64V(TIMEOUT, 5) };
                size_t n;

                raw(&n, REQ, 0, fs, ELEMENTSOF(fs));
                assert_int_equal(uplink_msg_decode(raw_buf, n, &(struct tlv_msg){}), -EBADMSG);
                assert_false(uplink_kind_arg_is_valid(UPLINK_KIND_COMMANDS_POLL, bad_waits[i], strlen(bad_waits[i])));
        }
        assert_int_equal(DEC(REQ, U8V(KIND, 4), S(ARG, "30"), { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, 5)), -EBADMSG);
        /* COMMAND_RESULT: a command id, required; a BODY. */
        assert_int_equal(DEC(REQ, U8V(KIND, 5), S(ARG, "c-1"), { UPLINK_TAG_BODY, "{}", 2 }, U64V(TIMEOUT, 5)), 0);
        assert_int_equal(DEC(REQ, U8V(KIND, 5), { UPLINK_TAG_BODY, "{}", 2 }, U64V(TIMEOUT, 5)), -EBADMSG);
        assert_int_equal(DEC(REQ, U8V(KIND, 5), S(ARG, "c-1"), U64V(TIMEOUT, 5)), -EBADMSG);
        static const char *const bad_ids[] = { ".", "..", "a/b", "a?b", "a#b", "a%2f", "a b", "a\\b", "é" };
        for (size_t i = 0; i < ELEMENTSOF(bad_ids); i++) {
                const struct rf fs[] = { U8V(KIND, 5), { UPLINK_TAG_ARG, bad_ids[i], strlen(bad_ids[i]) },
                                         { UPLINK_TAG_BODY, "{}", 2 }, U64V(TIMEOUT, 5) };
                size_t n;

                raw(&n, REQ, 0, fs, ELEMENTSOF(fs));
                assert_int_equal(uplink_msg_decode(raw_buf, n, &(struct tlv_msg){}), -EBADMSG);
        }
        /* The kinds with a body need it (empty is one). */
        assert_int_equal(DEC(REQ, U8V(KIND, 1), U64V(TIMEOUT, 5)), -EBADMSG);
        /* TIMEOUT above its maximum. */
        assert_int_equal(DEC(REQ, U8V(KIND, 1), { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, UPLINK_TIMEOUT_MAX_S)), 0);
        assert_int_equal(DEC(REQ, U8V(KIND, 1), { UPLINK_TAG_BODY, "", 0 }, U64V(TIMEOUT, UPLINK_TIMEOUT_MAX_S + 1)),
                         -EBADMSG);
        assert_int_equal(DEC(REQ, U8V(KIND, 1), { UPLINK_TAG_BODY, "", 0 },
                             { UPLINK_TAG_TIMEOUT, "\x80\0\0\0\0\0\0\0", 8 }),
                         -EBADMSG);
        /* HTTP_STATUS outside 100..599, in REQUEST's and REGISTER's answers. */
        assert_int_equal(DEC(ANS(REQ), U64V(HTTP_STATUS, 100), { UPLINK_TAG_BODY, "", 0 }), 0);
        assert_int_equal(DEC(ANS(REQ), U64V(HTTP_STATUS, 99), { UPLINK_TAG_BODY, "", 0 }), -EBADMSG);
        assert_int_equal(DEC(ANS(REQ), U64V(HTTP_STATUS, 600), { UPLINK_TAG_BODY, "", 0 }), -EBADMSG);
        assert_int_equal(DEC(ANS(REQ), U64V(HTTP_STATUS, 0), { UPLINK_TAG_BODY, "", 0 }), -EBADMSG);
        assert_int_equal(DEC(ANS(UPLINK_OP_REGISTER), U64V(HTTP_STATUS, 201), S(MESSAGE, "registered")), 0);
        /* A registration that failed before a final answer: its reason only. */
        assert_int_equal(DEC(ANS(UPLINK_OP_REGISTER), S(MESSAGE, "attestation failed: x")), 0);
        assert_int_equal(DEC(ANS(UPLINK_OP_REGISTER), U64V(HTTP_STATUS, 1000), S(MESSAGE, "registered")), -EBADMSG);
}

static void test_encoder_refuses(void **state) {
        struct tlv_buf b = {};
        static uint8_t big[UPLINK_BODY_MAX + 1];

        /* Unknown op, a status on a request, a positive one. */
        assert_int_equal(uplink_msg_begin(&b, 1, 0, false, 0), -EINVAL);
        assert_int_equal(uplink_msg_begin(&b, 1, _UPLINK_OP_MAX, false, 0), -EINVAL);
        assert_int_equal(uplink_msg_begin(&b, 1, UPLINK_OP_LOGOUT, false, -1), -EINVAL);
        assert_int_equal(uplink_msg_begin(&b, 1, UPLINK_OP_LOGOUT, true, 1), -EINVAL);
        /* What decoding refuses is never sent: the message is dropped, the buffer as before. */
        assert_int_equal(uplink_msg_begin(&b, 1, UPLINK_OP_REQUEST, false, 0), 0);
        assert_int_equal(tlv_msg_add_u8(&b, UPLINK_TAG_KIND, UPLINK_KIND_STATUS), 0);
        assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_ARG, "5"), 0); /* STATUS takes none */
        assert_int_equal(tlv_msg_add(&b, UPLINK_TAG_BODY, "{}", 2), 0);
        assert_int_equal(tlv_msg_add_u64(&b, UPLINK_TAG_TIMEOUT, 5), 0);
        assert_int_equal(tlv_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 0);
        /* A BODY over its maximum fails at add(), and end() says so. */
        assert_int_equal(uplink_msg_begin(&b, 1, UPLINK_OP_REQUEST, false, 0), 0);
        assert_int_equal(tlv_msg_add(&b, UPLINK_TAG_BODY, big, sizeof big), -EINVAL);
        assert_int_equal(tlv_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 0);
        /* An unknown tag, a tag of the signer's table past this one's. */
        assert_int_equal(uplink_msg_begin(&b, 1, UPLINK_OP_LOGOUT, false, 0), 0);
        assert_int_equal(tlv_msg_add_str(&b, _UPLINK_TAG_MAX, "x"), -EINVAL);
        assert_int_equal(tlv_msg_end(&b), -EINVAL);
        /* A status answer that the other side could not read. */
        assert_int_equal(uplink_msg_begin(&b, 1, UPLINK_OP_STATUS, true, 0), 0);
        assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_STATUS_JSON, "{"), 0);
        assert_int_equal(tlv_msg_end(&b), -EINVAL);
        assert_int_equal(b.len, 0);
        tlv_buf_done(&b);
}

/* ---- the request each kind is, against the signer's policy ---- */

struct target_case {
        const char *cloud_url; /* [cloud] url */
        const char *hub_id;
};
static const struct target_case target_cases[] = {
        { "https://cloud.example", "hub-1" },
        { "https://cloud.example/", "hub-1" },
        { "https://Cloud.Example:8443/api/", "Hub_2.x" },
        { "HTTPS://cloud.example/api//", "h" },
        { "https://127.0.0.1:18443", "a-b-c" },
        { "https://[::1]:18443/x/y", "0123456789012345678901234567890123456789012345678901234567890123" },
};

static const struct {
        unsigned kind;
        const char *arg;
        const char *method;
        const char *tail; /* after the base URL's path */
} target_rows[] = {
        { UPLINK_KIND_STATUS, NULL, "POST", "/v1/hubs/%s/status" },
        { UPLINK_KIND_DEVICES, NULL, "PUT", "/v1/hubs/%s/devices" },
        { UPLINK_KIND_EVENTS, NULL, "POST", "/v1/hubs/%s/events" },
        { UPLINK_KIND_COMMANDS_POLL, "30", "GET", "/v1/hubs/%s/commands?wait=30" },
        { UPLINK_KIND_COMMANDS_POLL, "0", "GET", "/v1/hubs/%s/commands?wait=0" },
        { UPLINK_KIND_COMMANDS_POLL, "999", "GET", "/v1/hubs/%s/commands?wait=999" },
        { UPLINK_KIND_COMMAND_RESULT, "c1", "POST", "/v1/hubs/%s/commands/c1/result" },
        { UPLINK_KIND_COMMAND_RESULT, ".a", "POST", "/v1/hubs/%s/commands/.a/result" },
        { UPLINK_KIND_COMMAND_RESULT, "...", "POST", "/v1/hubs/%s/commands/.../result" },
        { UPLINK_KIND_COMMAND_RESULT, "0123456789012345678901234567890123456789012345678901234567890123", "POST",
          "/v1/hubs/%s/commands/0123456789012345678901234567890123456789012345678901234567890123/result" },
};

static int policy_for(const struct target_case *c, struct signer_policy *ret) {
        struct iothub_conf conf = {};

        conf.hub.id = (char *) c->hub_id;
        conf.cloud.url = (char *) c->cloud_url;
        return signer_policy_init(ret, &conf, NULL);
}

/* Whether the signer signs the request (SIGN_HTTP); its DPoP proof (SIGN_DPOP, RFC 9449 7.1: a
 * DPoP-bound token on the cloud's requests) must be signed for exactly the same ones. */
static bool signs(const struct signer_policy *p, const char *method, const char *url) {
        const char *why = NULL;
        bool http = signer_policy_http(p, method, url, "DPoP abc.def", &why) == 0;

        assert_int_equal(signer_policy_dpop(p, method, url, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ", NULL, &why) == 0,
                         http);
        return http;
}

/* The policy signs url with method, and none of the near misses of it: another method; a byte
 * appended; a byte dropped anywhere after the origin but inside arg (a shorter command id or
 * wait is another valid request of the same row, not a near miss). */
static void check_near_misses(const struct signer_policy *p, const char *method, const char *url, const char *arg) {
        static const char *const methods[] = { "GET", "POST", "PUT", "DELETE" };
        static const char *const appended[] = { "/", "x", "/x", "?", "#", "?x=1", "&x=1", "%2f", "/.", "/..", "0" };
        const char *wait = strstr(url, "?wait=");
        size_t arg_at = 0, arg_len = arg ? strlen(arg) : 0;
        char *s;

        if (arg) {
                const char *where = wait ? wait + 6 : strstr(url, "/commands/") + 10;
                arg_at = (size_t) (where - url);
                assert_memory_equal(url + arg_at, arg, arg_len);
        }
        assert_true(signs(p, method, url));
        for (size_t i = 0; i < ELEMENTSOF(methods); i++)
                if (!streq(methods[i], method))
                        assert_false(signs(p, methods[i], url));
        for (size_t i = 0; i < ELEMENTSOF(appended); i++) {
                /* A wait of 1 or 2 digits and one more is still 1..3 digits. */
                if (wait && arg_len < UPLINK_POLL_WAIT_DIGITS && streq(appended[i], "0"))
                        continue;
                s = strdup_printf("%s%s", url, appended[i]);
                assert_non_null(s);
                assert_false(signs(p, method, s));
                free(s);
        }
        for (size_t at = strcspn(url + 8, "/") + 8; url[at]; at++) {
                if (arg && at >= arg_at && at < arg_at + arg_len)
                        continue;
                s = strdup(url);
                assert_non_null(s);
                memmove(s + at, s + at + 1, strlen(s + at));
                assert_false(signs(p, method, s));
                free(s);
        }
}

static void test_target_signed(void **state) {
        for (size_t c = 0; c < ELEMENTSOF(target_cases); c++) {
                struct signer_policy p;

                assert_int_equal(policy_for(&target_cases[c], &p), 0);
                for (size_t i = 0; i < ELEMENTSOF(target_rows); i++) {
                        const char *method = NULL;
                        char *url = NULL, *tail, *want;
                        size_t base = strlen(target_cases[c].cloud_url);

                        while (target_cases[c].cloud_url[base - 1] == '/')
                                base--;
                        assert_int_equal(uplink_request_target(target_rows[i].kind, target_rows[i].arg,
                                                               target_cases[c].cloud_url, target_cases[c].hub_id,
                                                               &method, &url),
                                         0);
                        assert_string_equal(method, target_rows[i].method);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
                        tail = strdup_printf(target_rows[i].tail, target_cases[c].hub_id);
#pragma GCC diagnostic pop
                        want = strdup_printf("%.*s%s", (int) base, target_cases[c].cloud_url, tail);
                        assert_string_equal(url, want);
                        check_near_misses(&p, method, url, target_rows[i].arg);
                        free(tail);
                        free(want);
                        free(url);
                }
                /* Another hub's request, built for it, is refused by this hub's policy. */
                {
                        const char *method = NULL;
                        char *url = NULL;
                        assert_int_equal(uplink_request_target(UPLINK_KIND_STATUS, NULL, target_cases[c].cloud_url,
                                                               "other-hub", &method, &url),
                                         0);
                        assert_false(signs(&p, method, url));
                        free(url);
                }
                signer_policy_done(&p);
        }
}

static void test_target_refused(void **state) {
        static char long_url[UPLINK_URL_MAX + 2];
        static const struct {
                unsigned kind;
                const char *arg, *url, *hub;
        } bad[] = {
                { 0, NULL, "https://cloud.example", "hub-1" },
                { _UPLINK_KIND_MAX, NULL, "https://cloud.example", "hub-1" },
                { UPLINK_KIND_STATUS, "1", "https://cloud.example", "hub-1" },
                { UPLINK_KIND_COMMANDS_POLL, NULL, "https://cloud.example", "hub-1" },
                { UPLINK_KIND_COMMANDS_POLL, "1000", "https://cloud.example", "hub-1" },
                { UPLINK_KIND_COMMANDS_POLL, "", "https://cloud.example", "hub-1" },
                { UPLINK_KIND_COMMAND_RESULT, NULL, "https://cloud.example", "hub-1" },
                { UPLINK_KIND_COMMAND_RESULT, "..", "https://cloud.example", "hub-1" },
                { UPLINK_KIND_COMMAND_RESULT, "a/../b", "https://cloud.example", "hub-1" },
                { UPLINK_KIND_STATUS, NULL, "http://cloud.example", "hub-1" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example/?x", "hub-1" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example/#x", "hub-1" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example/%2e", "hub-1" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example/a b", "hub-1" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example\\x", "hub-1" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example", "" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example", ".hub" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example", "hub/1" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example", "hub?1" },
                { UPLINK_KIND_STATUS, NULL, "https://cloud.example",
                  "01234567890123456789012345678901234567890123456789012345678901234" },
        };
        const char *method = "unchanged";
        char *url = NULL;

        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                assert_int_equal(uplink_request_target(bad[i].kind, bad[i].arg, bad[i].url, bad[i].hub, &method, &url),
                                 -EINVAL);
                assert_string_equal(method, "unchanged");
                assert_null(url);
        }
        memcpy(long_url, "https://cloud.example/", 22);
        memset(long_url + 22, 'a', sizeof long_url - 23);
        assert_int_equal(uplink_request_target(UPLINK_KIND_STATUS, NULL, long_url, "h", &method, &url), -EINVAL);
        long_url[UPLINK_URL_MAX] = '\0';
        assert_int_equal(uplink_request_target(UPLINK_KIND_STATUS, NULL, long_url, "h", &method, &url), 0);
        free(url);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_round_trip_request), cmocka_unit_test(test_round_trip_every_op),
                cmocka_unit_test(test_error_answer),       cmocka_unit_test(test_badmsg_structure),
                cmocka_unit_test(test_badmsg_values),      cmocka_unit_test(test_encoder_refuses),
                cmocka_unit_test(test_target_signed),      cmocka_unit_test(test_target_refused),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
