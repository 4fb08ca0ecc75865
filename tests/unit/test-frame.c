/* SPDX-License-Identifier: MIT */
/* Unit tests of the status-frame parser (src/frame.c, PROTOCOL.md 1). Frames are built here from
 * JSON text, base64url-encoded with the code under test's encoder (itself checked against the
 * RFC 4648 10 vectors below) and a dummy signature. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <cmocka.h>
#include <jansson.h>

#include "iothub/frame.h"

#define TOPIC_DEV "bulb-1"
#define MAX_BYTES 4096
#define DEFAULT_SIG_LEN 64

#define HDR_ES256 "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}"
#define HDR_EDDSA "{\"alg\":\"EdDSA\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}"
#define HDR_ALG(a) "{\"alg\":\"" a "\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}"
#define HDR_KID(k) "{\"alg\":\"ES256\",\"kid\":\"" k "\",\"typ\":\"iothub-status\"}"
#define HDR_PLUS(m) "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"," m "}"

/* Payload with the required members and extra members m appended. */
#define PL(m) "{\"dev\":\"bulb-1\",\"seq\":42,\"iat\":1700000000,\"state\":{\"on\":true}" m "}"
/* Payload with the given state object. */
#define PL_STATE(s) "{\"dev\":\"bulb-1\",\"seq\":42,\"iat\":1700000000,\"state\":" s "}"
/* Payload with the given seq and iat. */
#define PL_SEQ_IAT(q, t) "{\"dev\":\"bulb-1\",\"seq\":" q ",\"iat\":" t ",\"state\":{\"on\":true}}"
#define PL_SEQ(q) PL_SEQ_IAT(q, "1700000000")
#define PL_IAT(t) PL_SEQ_IAT("42", t)
#define PL_ACK(a) PL(",\"ack\":" a)

#define S10 "0123456789"
#define S64 S10 S10 S10 S10 S10 S10 "0123"
#define S128 S64 S64
#define E8 "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9" /* "é" x 4: 8 bytes of UTF-8 */
#define E64 E8 E8 E8 E8 E8 E8 E8 E8

struct frame_case {
        const char *name;
        const char *header;  /* JSON text; NULL: HDR_ES256 */
        const char *payload; /* JSON text; NULL: PL("") */
        size_t payload_len;  /* 0: strlen(payload), else for embedded NUL bytes */
        size_t sig_len;      /* 0: DEFAULT_SIG_LEN */
        /* Raw base64url text instead of encoding header / payload / signature. */
        const char *header_b64, *payload_b64, *sig_b64;
        unsigned parts;              /* 0: three; 1, 2 or 4 to build too few or too many */
        const char *prefix, *suffix; /* raw bytes around the whole frame */
        const char *topic;           /* NULL: TOPIC_DEV */
        enum frame_reason expect;
};

static void fill_sig(uint8_t *sig, size_t n) {
        for (size_t i = 0; i < n; i++)
                sig[i] = (uint8_t) (i * 7 + 1);
}

/* Builds the frame of a case; the caller frees it. */
static uint8_t *build_frame(const struct frame_case *c, size_t *ret_len) {
        const char *hjson = c->header ?: HDR_ES256, *pjson = c->payload ?: PL("");
        size_t hlen = strlen(hjson), plen = c->payload_len ?: strlen(pjson);
        size_t slen = c->sig_len ?: DEFAULT_SIG_LEN;
        size_t cap = 4 * (hlen + plen + slen) + 64 + (c->prefix ? strlen(c->prefix) : 0) +
                     (c->suffix ? strlen(c->suffix) : 0) + (c->header_b64 ? strlen(c->header_b64) : 0) +
                     (c->payload_b64 ? strlen(c->payload_b64) : 0) + (c->sig_b64 ? strlen(c->sig_b64) : 0);
        char *out = malloc(cap), *sig_text = NULL, *p;
        uint8_t sig[512];
        unsigned parts = c->parts ?: 3;

        assert_non_null(out);
        assert_true(slen <= sizeof(sig));
        p = out;
        if (c->prefix)
                p = stpcpy(p, c->prefix);

        if (c->header_b64)
                p = stpcpy(p, c->header_b64);
        else
                p += b64url_encode((const uint8_t *) hjson, hlen, p);

        if (parts >= 2) {
                *p++ = '.';
                if (c->payload_b64)
                        p = stpcpy(p, c->payload_b64);
                else
                        p += b64url_encode((const uint8_t *) pjson, plen, p);
        }

        if (parts >= 3) {
                sig_text = p + 1;
                *p++ = '.';
                if (c->sig_b64)
                        p = stpcpy(p, c->sig_b64);
                else {
                        fill_sig(sig, slen);
                        p += b64url_encode(sig, slen, p);
                }
        }
        if (parts >= 4) {
                size_t n = strlen(sig_text);

                *p++ = '.';
                memmove(p, sig_text, n);
                p += n;
        }

        if (c->suffix)
                p = stpcpy(p, c->suffix);
        *p = '\0';
        assert_true((size_t) (p - out) < cap);
        *ret_len = (size_t) (p - out);
        return (uint8_t *) out;
}

static const struct frame_case frame_cases[] = {
        /* ---- valid ---- */
        { .name = "es256 minimal", .expect = FRAME_OK },
        { .name = "eddsa minimal", .header = HDR_EDDSA, .expect = FRAME_OK },
        { .name = "es256 every member",
          .payload = "{\"dev\":\"bulb-1\",\"seq\":9007199254740991,\"iat\":0,"
                     "\"state\":{\"on\":false,\"bri\":254,\"ct\":500,\"xy\":[0.3127,0.329]},"
                     "\"ack\":{\"id\":\"cmd-7\",\"ok\":false,\"err\":\"busy\"}}",
          .expect = FRAME_OK },
        { .name = "eddsa every member",
          .header = HDR_EDDSA,
          .payload = "{\"dev\":\"bulb-1\",\"seq\":1,\"iat\":9007199254740991,"
                     "\"state\":{\"on\":true,\"bri\":0,\"ct\":153,\"xy\":[0,1]},"
                     "\"ack\":{\"id\":\"c\",\"ok\":true}}",
          .expect = FRAME_OK },
        { .name = "members in another order",
          .header = "{\"typ\":\"iothub-status\",\"kid\":\"bulb-1\",\"alg\":\"ES256\"}",
          .payload =
                  "{\"state\":{\"xy\":[1.0,0.0],\"on\":true},\"iat\":5,\"ack\":{\"ok\":true,\"id\":\"x\"},"
                  "\"seq\":3,\"dev\":\"bulb-1\"}",
          .expect = FRAME_OK },
        { .name = "JSON whitespace inside header and payload (RFC 8259 2)",
          .header = " {\n\t\"alg\" : \"ES256\" ,\r\n \"kid\":\"bulb-1\", \"typ\":\"iothub-status\" }\n",
          .payload = "{ \"dev\" : \"bulb-1\",\n \"seq\" : 42 , \"iat\":1,\t\"state\" : { \"on\" : true ,"
                     " \"xy\" : [ 0.5 , 0.5 ] } }\r\n",
          .expect = FRAME_OK },
        { .name = "xy reals in exponent form",
          .payload = PL_STATE("{\"on\":true,\"xy\":[1e-1,0.5E0]}"),
          .expect = FRAME_OK },
        { .name = "xy negative zero",
          .payload = PL_STATE("{\"on\":true,\"xy\":[-0.0,-0]}"),
          .expect = FRAME_OK },
        { .name = "iat negative zero is zero", .payload = PL_IAT("-0"), .expect = FRAME_OK },
        { .name = "ack err of 128 bytes",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"" S128 "\"}"),
          .expect = FRAME_OK },
        { .name = "ack err of 128 UTF-8 bytes",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"" E64 S64 "\"}"),
          .expect = FRAME_OK },
        { .name = "ack err with 3- and 4-byte UTF-8",
          .payload = PL_ACK(
                  "{\"id\":\"a\",\"ok\":false,\"err\":\"\xe2\x82\xac \xf0\x9f\x92\xa1 \xf4\x8f\xbf\xbf\"}"),
          .expect = FRAME_OK },
        { .name = "ack err with escapes",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"\\\"\\n\\u00e9\\ud83d\\udca1\"}"),
          .expect = FRAME_OK },
        { .name = "ack id with a leading dot",
          .payload = PL_ACK("{\"id\":\".c-1\",\"ok\":true}"),
          .expect = FRAME_OK },
        { .name = "ack id of 64 characters",
          .payload = PL_ACK("{\"id\":\"" S64 "\",\"ok\":true}"),
          .expect = FRAME_OK },
        { .name = "device id of 64 characters",
          .header = HDR_KID(S64),
          .payload = "{\"dev\":\"" S64 "\",\"seq\":42,\"iat\":1,\"state\":{\"on\":true}}",
          .topic = S64,
          .expect = FRAME_OK },
        { .name = "signature of 70 bytes (DER) is the verifier's to reject",
          .sig_len = 70,
          .expect = FRAME_OK },
        { .name = "signature of FRAME_SIG_MAX bytes", .sig_len = FRAME_SIG_MAX, .expect = FRAME_OK },
        { .name = "signature of 1 byte", .sig_len = 1, .expect = FRAME_OK },

        /* ---- structure (RFC 7515 7.1) ---- */
        { .name = "one part", .parts = 1, .expect = FRAME_MALFORMED },
        { .name = "two parts", .parts = 2, .expect = FRAME_MALFORMED },
        { .name = "four parts", .parts = 4, .expect = FRAME_MALFORMED },
        { .name = "empty header part", .header_b64 = "", .expect = FRAME_MALFORMED },
        { .name = "empty payload part", .payload_b64 = "", .expect = FRAME_MALFORMED },
        { .name = "empty signature part (unsecured JWS)", .sig_b64 = "", .expect = FRAME_MALFORMED },
        { .name = "trailing dot", .suffix = ".", .expect = FRAME_MALFORMED },
        { .name = "leading dot", .prefix = ".", .expect = FRAME_MALFORMED },
        { .name = "padding on the signature", .sig_len = 65, .suffix = "=", .expect = FRAME_MALFORMED },
        { .name = "padding on the signature (two)",
          .sig_len = 64,
          .suffix = "==",
          .expect = FRAME_MALFORMED },
        { .name = "padding on the header",
          .header_b64 = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImJ1bGItMSIsInR5cCI6ImlvdGh1Yi1zdGF0dXMifQ==",
          .expect = FRAME_MALFORMED },
        { .name = "'+' in a part (base64, not base64url)",
          .sig_b64 = "AAAA+AAA",
          .expect = FRAME_MALFORMED },
        { .name = "'/' in a part (base64, not base64url)",
          .payload_b64 = "eyJk/AAA",
          .expect = FRAME_MALFORMED },
        { .name = "trailing newline", .suffix = "\n", .expect = FRAME_MALFORMED },
        { .name = "trailing CRLF", .suffix = "\r\n", .expect = FRAME_MALFORMED },
        { .name = "leading space", .prefix = " ", .expect = FRAME_MALFORMED },
        { .name = "space inside a part", .sig_b64 = "AAAA AAAA", .expect = FRAME_MALFORMED },
        { .name = "tab inside a part", .sig_b64 = "AAAA\tAAAA", .expect = FRAME_MALFORMED },
        { .name = "trailing garbage after the signature", .suffix = "!", .expect = FRAME_MALFORMED },
        { .name = "control byte after the signature", .suffix = "\x01", .expect = FRAME_MALFORMED },
        { .name = "non-zero trailing bits (RFC 4648 3.5)", .sig_b64 = "AAAAAR", .expect = FRAME_MALFORMED },
        { .name = "non-zero trailing bits, 3 characters", .sig_b64 = "AAAAAAB", .expect = FRAME_MALFORMED },
        { .name = "impossible length (4n+1)", .sig_b64 = "AAAAA", .expect = FRAME_MALFORMED },
        { .name = "8-bit byte in a part", .sig_b64 = "AAAA\xc3\xa9", .expect = FRAME_MALFORMED },
        { .name = "header is not JSON", .header_b64 = "AAAA", .expect = FRAME_MALFORMED },
        { .name = "payload is not JSON", .payload_b64 = "AAAA", .expect = FRAME_MALFORMED },

        /* ---- protected header ---- */
        { .name = "alg none", .header = HDR_ALG("none"), .expect = FRAME_MALFORMED },
        { .name = "alg HS256", .header = HDR_ALG("HS256"), .expect = FRAME_MALFORMED },
        { .name = "alg RS256", .header = HDR_ALG("RS256"), .expect = FRAME_MALFORMED },
        { .name = "alg ES384", .header = HDR_ALG("ES384"), .expect = FRAME_MALFORMED },
        { .name = "alg Ed25519", .header = HDR_ALG("Ed25519"), .expect = FRAME_MALFORMED },
        { .name = "alg case differs (RFC 7515 4.1.1)",
          .header = HDR_ALG("es256"),
          .expect = FRAME_MALFORMED },
        { .name = "alg with trailing NUL escape",
          .header = HDR_ALG("ES256\\u0000"),
          .expect = FRAME_MALFORMED },
        { .name = "alg not a string",
          .header = "{\"alg\":1,\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "alg null",
          .header = "{\"alg\":null,\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "alg missing",
          .header = "{\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "kid missing",
          .header = "{\"alg\":\"ES256\",\"typ\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "typ missing",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\"}",
          .expect = FRAME_MALFORMED },
        { .name = "extra header member", .header = HDR_PLUS("\"x\":1"), .expect = FRAME_MALFORMED },
        { .name = "crit (RFC 7515 4.1.11)",
          .header = HDR_PLUS("\"crit\":[\"exp\"]"),
          .expect = FRAME_MALFORMED },
        { .name = "jwk in header", .header = HDR_PLUS("\"jwk\":{}"), .expect = FRAME_MALFORMED },
        { .name = "three members, one unknown",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"cty\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "duplicate alg",
          .header = "{\"alg\":\"ES256\",\"alg\":\"none\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "duplicate alg, same value, member count right",
          .header = "{\"alg\":\"ES256\",\"alg\":\"ES256\",\"kid\":\"bulb-1\"}",
          .expect = FRAME_MALFORMED },
        { .name = "typ JWT",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"JWT\"}",
          .expect = FRAME_MALFORMED },
        { .name = "typ with media type prefix",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"application/iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "typ not a string",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":true}",
          .expect = FRAME_MALFORMED },
        { .name = "kid empty", .header = HDR_KID(""), .expect = FRAME_MALFORMED },
        { .name = "kid starts with a dot", .header = HDR_KID(".bulb-1"), .expect = FRAME_MALFORMED },
        { .name = "kid with a slash", .header = HDR_KID("bulb/1"), .expect = FRAME_MALFORMED },
        { .name = "kid of 65 characters", .header = HDR_KID(S64 "5"), .expect = FRAME_MALFORMED },
        { .name = "kid with NUL escape", .header = HDR_KID("bulb-1\\u0000"), .expect = FRAME_MALFORMED },
        { .name = "kid not a string",
          .header = "{\"alg\":\"ES256\",\"kid\":7,\"typ\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "header is an array",
          .header = "[\"ES256\",\"bulb-1\",\"iothub-status\"]",
          .expect = FRAME_MALFORMED },
        { .name = "header is a string", .header = "\"ES256\"", .expect = FRAME_MALFORMED },
        { .name = "header empty JSON object", .header = "{}", .expect = FRAME_MALFORMED },
        { .name = "header trailing garbage", .header = HDR_ES256 "x", .expect = FRAME_MALFORMED },
        { .name = "header followed by a second object",
          .header = HDR_ES256 "{}",
          .expect = FRAME_MALFORMED },
        { .name = "header truncated",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"",
          .expect = FRAME_MALFORMED },
        { .name = "header invalid UTF-8 (0xff)",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\",\"x\":\"\xff\"}",
          .expect = FRAME_MALFORMED },
        { .name = "header overlong UTF-8",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\xc0\xaf\"}",
          .expect = FRAME_MALFORMED },
        { .name = "header UTF-8 surrogate",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\xed\xa0\x80\"}",
          .expect = FRAME_MALFORMED },
        { .name = "header truncated UTF-8 at the end",
          .header = HDR_ES256 "\xe2\x82",
          .expect = FRAME_MALFORMED },
        { .name = "header raw control character in a string",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\x01\"}",
          .expect = FRAME_MALFORMED },
        { .name = "header raw control character outside strings",
          .header = "{\"alg\":\"ES256\",\x0c\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "header non-ASCII outside strings",
          .header = "{\"alg\":\"ES256\",\xc2\xa0\"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },
        { .name = "header nested deeper than FRAME_MAX_DEPTH",
          .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"iothub-status\",\"x\":[[[0]]]}",
          .expect = FRAME_MALFORMED },

        /* ---- kid, dev and topic ---- */
        { .name = "kid differs from the topic",
          .header = HDR_KID("bulb-2"),
          .payload = "{\"dev\":\"bulb-2\",\"seq\":42,\"iat\":1,\"state\":{\"on\":true}}",
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "kid differs from the topic in case",
          .header = HDR_KID("Bulb-1"),
          .payload = "{\"dev\":\"Bulb-1\",\"seq\":42,\"iat\":1,\"state\":{\"on\":true}}",
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "kid is a prefix of the topic's id",
          .header = HDR_KID("bulb-"),
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "topic's id is a prefix of kid",
          .header = HDR_KID("bulb-10"),
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "kid and dev are a prefix of the topic's id",
          .header = HDR_KID("bulb-"),
          .payload = "{\"dev\":\"bulb-\",\"seq\":42,\"iat\":1,\"state\":{\"on\":true}}",
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "kid and dev extend the topic's id",
          .header = HDR_KID("bulb-10"),
          .payload = "{\"dev\":\"bulb-10\",\"seq\":42,\"iat\":1,\"state\":{\"on\":true}}",
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "dev differs from kid",
          .payload = "{\"dev\":\"bulb-2\",\"seq\":42,\"iat\":1,\"state\":{\"on\":true}}",
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "kid mismatch is reported before a malformed payload",
          .header = HDR_KID("bulb-2"),
          .payload = "[",
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "kid mismatch is reported before an oversized signature",
          .header = HDR_KID("bulb-2"),
          .sig_len = FRAME_SIG_MAX + 1,
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "dev mismatch is reported before other payload errors",
          .payload = "{\"dev\":\"bulb-2\",\"seq\":0,\"iat\":-1,\"state\":{}}",
          .expect = FRAME_TOPIC_MISMATCH },
        { .name = "a malformed header is reported before the topic",
          .header = "{\"alg\":\"none\",\"kid\":\"bulb-2\",\"typ\":\"iothub-status\"}",
          .expect = FRAME_MALFORMED },

        /* ---- payload ---- */
        { .name = "payload is an array", .payload = "[1]", .expect = FRAME_MALFORMED },
        { .name = "payload is an empty object", .payload = "{}", .expect = FRAME_MALFORMED },
        { .name = "dev missing",
          .payload = "{\"seq\":42,\"iat\":1,\"state\":{\"on\":true}}",
          .expect = FRAME_MALFORMED },
        { .name = "seq missing",
          .payload = "{\"dev\":\"bulb-1\",\"iat\":1,\"state\":{\"on\":true}}",
          .expect = FRAME_MALFORMED },
        { .name = "iat missing",
          .payload = "{\"dev\":\"bulb-1\",\"seq\":42,\"state\":{\"on\":true}}",
          .expect = FRAME_MALFORMED },
        { .name = "state missing",
          .payload = "{\"dev\":\"bulb-1\",\"seq\":42,\"iat\":1}",
          .expect = FRAME_MALFORMED },
        { .name = "dev not a string",
          .payload = "{\"dev\":1,\"seq\":42,\"iat\":1,\"state\":{\"on\":true}}",
          .expect = FRAME_MALFORMED },
        { .name = "dev invalid",
          .payload = "{\"dev\":\"bulb 1\",\"seq\":42,\"iat\":1,\"state\":{\"on\":true}}",
          .expect = FRAME_MALFORMED },
        { .name = "unknown payload member", .payload = PL(",\"foo\":1"), .expect = FRAME_MALFORMED },
        { .name = "unknown payload member exp",
          .payload = PL(",\"exp\":1700000300"),
          .expect = FRAME_MALFORMED },
        { .name = "ack null", .payload = PL(",\"ack\":null"), .expect = FRAME_MALFORMED },
        { .name = "duplicate seq in payload", .payload = PL(",\"seq\":43"), .expect = FRAME_MALFORMED },
        { .name = "duplicate dev in payload",
          .payload = PL(",\"dev\":\"bulb-1\""),
          .expect = FRAME_MALFORMED },
        { .name = "duplicate member in state",
          .payload = PL_STATE("{\"on\":true,\"on\":false}"),
          .expect = FRAME_MALFORMED },
        { .name = "payload trailing garbage", .payload = PL("") "x", .expect = FRAME_MALFORMED },
        { .name = "payload followed by a second object",
          .payload = PL("") PL(""),
          .expect = FRAME_MALFORMED },
        { .name = "payload with a raw NUL byte",
          .payload = PL("") "\0",
          .payload_len = sizeof(PL("")),
          .expect = FRAME_MALFORMED },
        { .name = "payload with a raw NUL in a string",
          .payload = PL(",\"ack\":{\"id\":\"a\",\"ok\":false,\"err\":\"a\0b\"}"),
          .payload_len = sizeof(PL(",\"ack\":{\"id\":\"a\",\"ok\":false,\"err\":\"a\0b\"}")) - 1,
          .expect = FRAME_MALFORMED },
        { .name = "payload invalid UTF-8 (lone continuation)",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"\x80\"}"),
          .expect = FRAME_MALFORMED },
        { .name = "payload invalid UTF-8 (above U+10FFFF)",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"\xf4\x90\x80\x80\"}"),
          .expect = FRAME_MALFORMED },
        { .name = "payload invalid UTF-8 (Latin-1)",
          .payload = PL(",\"\xe9t\xe9\":1"),
          .expect = FRAME_MALFORMED },
        { .name = "payload invalid UTF-8 (0xfe)", .payload = PL("") "\xfe", .expect = FRAME_MALFORMED },
        { .name = "NUL escape in ack err (no JSON_ALLOW_NUL)",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"a\\u0000b\"}"),
          .expect = FRAME_MALFORMED },
        { .name = "lone surrogate escape in ack err",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"\\ud800\"}"),
          .expect = FRAME_MALFORMED },
        { .name = "deep nesting inside state",
          .payload = PL_STATE("{\"on\":true,\"x\":[[[[[[[[[[]]]]]]]]]]}"),
          .expect = FRAME_MALFORMED },
        { .name = "nesting one level too deep",
          .payload = PL_STATE("{\"on\":true,\"xy\":[[0],0]}"),
          .expect = FRAME_MALFORMED },
        { .name = "brackets inside strings do not count as nesting",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"[[[[{{{{\\\"[[[[\"}"),
          .expect = FRAME_OK },
        { .name = "seq 0", .payload = PL_SEQ("0"), .expect = FRAME_MALFORMED },
        { .name = "seq -1", .payload = PL_SEQ("-1"), .expect = FRAME_MALFORMED },
        { .name = "seq 1", .payload = PL_SEQ("1"), .expect = FRAME_OK },
        { .name = "seq 2^53-1", .payload = PL_SEQ("9007199254740991"), .expect = FRAME_OK },
        { .name = "seq 2^53", .payload = PL_SEQ("9007199254740992"), .expect = FRAME_MALFORMED },
        { .name = "seq 2^63-1", .payload = PL_SEQ("9223372036854775807"), .expect = FRAME_MALFORMED },
        { .name = "seq 2^63 (too big for jansson)",
          .payload = PL_SEQ("9223372036854775808"),
          .expect = FRAME_MALFORMED },
        { .name = "seq huge integer",
          .payload = PL_SEQ("99999999999999999999999"),
          .expect = FRAME_MALFORMED },
        { .name = "seq 1e400 (real overflow)", .payload = PL_SEQ("1e400"), .expect = FRAME_MALFORMED },
        { .name = "seq as real 1.0", .payload = PL_SEQ("1.0"), .expect = FRAME_MALFORMED },
        { .name = "seq as real 1e3", .payload = PL_SEQ("1e3"), .expect = FRAME_MALFORMED },
        { .name = "seq as string", .payload = PL_SEQ("\"42\""), .expect = FRAME_MALFORMED },
        { .name = "seq true", .payload = PL_SEQ("true"), .expect = FRAME_MALFORMED },
        { .name = "seq null", .payload = PL_SEQ("null"), .expect = FRAME_MALFORMED },
        { .name = "seq with a leading zero", .payload = PL_SEQ("042"), .expect = FRAME_MALFORMED },
        { .name = "seq with a plus sign", .payload = PL_SEQ("+42"), .expect = FRAME_MALFORMED },
        { .name = "seq hexadecimal", .payload = PL_SEQ("0x2a"), .expect = FRAME_MALFORMED },
        { .name = "iat negative", .payload = PL_IAT("-1"), .expect = FRAME_MALFORMED },
        { .name = "iat 0", .payload = PL_IAT("0"), .expect = FRAME_OK },
        { .name = "iat 2^53-1", .payload = PL_IAT("9007199254740991"), .expect = FRAME_OK },
        { .name = "iat 2^53", .payload = PL_IAT("9007199254740992"), .expect = FRAME_MALFORMED },
        { .name = "iat as real", .payload = PL_IAT("1700000000.5"), .expect = FRAME_MALFORMED },
        { .name = "iat 1e400", .payload = PL_IAT("1e400"), .expect = FRAME_MALFORMED },
        { .name = "iat NaN", .payload = PL_IAT("NaN"), .expect = FRAME_MALFORMED },
        { .name = "state not an object", .payload = PL_STATE("true"), .expect = FRAME_MALFORMED },
        { .name = "state empty", .payload = PL_STATE("{}"), .expect = FRAME_MALFORMED },
        { .name = "state on missing", .payload = PL_STATE("{\"bri\":3}"), .expect = FRAME_MALFORMED },
        { .name = "state on as string",
          .payload = PL_STATE("{\"on\":\"true\"}"),
          .expect = FRAME_MALFORMED },
        { .name = "state on as number", .payload = PL_STATE("{\"on\":1}"), .expect = FRAME_MALFORMED },
        { .name = "state on null", .payload = PL_STATE("{\"on\":null}"), .expect = FRAME_MALFORMED },
        { .name = "bri 254", .payload = PL_STATE("{\"on\":true,\"bri\":254}"), .expect = FRAME_OK },
        { .name = "bri 255", .payload = PL_STATE("{\"on\":true,\"bri\":255}"), .expect = FRAME_MALFORMED },
        { .name = "bri -1", .payload = PL_STATE("{\"on\":true,\"bri\":-1}"), .expect = FRAME_MALFORMED },
        { .name = "bri real", .payload = PL_STATE("{\"on\":true,\"bri\":1.0}"), .expect = FRAME_MALFORMED },
        { .name = "bri huge",
          .payload = PL_STATE("{\"on\":true,\"bri\":4294967297}"),
          .expect = FRAME_MALFORMED },
        { .name = "bri null", .payload = PL_STATE("{\"on\":true,\"bri\":null}"), .expect = FRAME_MALFORMED },
        { .name = "ct 152", .payload = PL_STATE("{\"on\":true,\"ct\":152}"), .expect = FRAME_MALFORMED },
        { .name = "ct 153", .payload = PL_STATE("{\"on\":true,\"ct\":153}"), .expect = FRAME_OK },
        { .name = "ct 500", .payload = PL_STATE("{\"on\":true,\"ct\":500}"), .expect = FRAME_OK },
        { .name = "ct 501", .payload = PL_STATE("{\"on\":true,\"ct\":501}"), .expect = FRAME_MALFORMED },
        { .name = "ct as string",
          .payload = PL_STATE("{\"on\":true,\"ct\":\"300\"}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy of one",
          .payload = PL_STATE("{\"on\":true,\"xy\":[0.5]}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy of three",
          .payload = PL_STATE("{\"on\":true,\"xy\":[0.1,0.2,0.3]}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy empty", .payload = PL_STATE("{\"on\":true,\"xy\":[]}"), .expect = FRAME_MALFORMED },
        { .name = "xy 1.5",
          .payload = PL_STATE("{\"on\":true,\"xy\":[1.5,0.5]}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy 1.0000001",
          .payload = PL_STATE("{\"on\":true,\"xy\":[0.5,1.0000001]}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy negative",
          .payload = PL_STATE("{\"on\":true,\"xy\":[-0.1,0.5]}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy integer 2",
          .payload = PL_STATE("{\"on\":true,\"xy\":[2,0]}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy 1e400",
          .payload = PL_STATE("{\"on\":true,\"xy\":[1e400,0]}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy string",
          .payload = PL_STATE("{\"on\":true,\"xy\":[\"0.5\",0.5]}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy null",
          .payload = PL_STATE("{\"on\":true,\"xy\":[null,0.5]}"),
          .expect = FRAME_MALFORMED },
        { .name = "xy object",
          .payload = PL_STATE("{\"on\":true,\"xy\":{\"x\":0.5,\"y\":0.5}}"),
          .expect = FRAME_MALFORMED },
        { .name = "unknown state member",
          .payload = PL_STATE("{\"on\":true,\"hue\":3}"),
          .expect = FRAME_MALFORMED },
        { .name = "unknown state member with all known",
          .payload = PL_STATE("{\"on\":true,\"bri\":1,\"ct\":200,\"xy\":[0,0],\"sat\":1}"),
          .expect = FRAME_MALFORMED },
        { .name = "ack not an object", .payload = PL_ACK("[\"a\",true]"), .expect = FRAME_MALFORMED },
        { .name = "ack empty", .payload = PL_ACK("{}"), .expect = FRAME_MALFORMED },
        { .name = "ack id missing", .payload = PL_ACK("{\"ok\":true}"), .expect = FRAME_MALFORMED },
        { .name = "ack ok missing", .payload = PL_ACK("{\"id\":\"a\"}"), .expect = FRAME_MALFORMED },
        { .name = "ack ok as string",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":\"yes\"}"),
          .expect = FRAME_MALFORMED },
        { .name = "ack id empty",
          .payload = PL_ACK("{\"id\":\"\",\"ok\":true}"),
          .expect = FRAME_MALFORMED },
        { .name = "ack id of 65 characters",
          .payload = PL_ACK("{\"id\":\"" S64 "5\",\"ok\":true}"),
          .expect = FRAME_MALFORMED },
        { .name = "ack id with a slash",
          .payload = PL_ACK("{\"id\":\"a/b\",\"ok\":true}"),
          .expect = FRAME_MALFORMED },
        { .name = "ack id a lone dot", .payload = PL_ACK("{\"id\":\".\",\"ok\":true}"), .expect = FRAME_OK },
        { .name = "ack id with a second dot-led part",
          .payload = PL_ACK("{\"id\":\"..\",\"ok\":true}"),
          .expect = FRAME_OK },
        { .name = "ack id not a string",
          .payload = PL_ACK("{\"id\":5,\"ok\":true}"),
          .expect = FRAME_MALFORMED },
        { .name = "ack err of 129 bytes",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"" S128 "x\"}"),
          .expect = FRAME_MALFORMED },
        { .name = "ack err of 129 UTF-8 bytes",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":\"" E64 S64 "x\"}"),
          .expect = FRAME_MALFORMED },
        { .name = "ack err not a string",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"err\":404}"),
          .expect = FRAME_MALFORMED },
        { .name = "unknown ack member",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"code\":1}"),
          .expect = FRAME_MALFORMED },
        { .name = "duplicate ack member",
          .payload = PL_ACK("{\"id\":\"a\",\"ok\":false,\"ok\":true}"),
          .expect = FRAME_MALFORMED },

        /* ---- the shapes frame_parse()'s fast paths take, and their near misses (each must give
         * what frame_parse_reference() gives: test_frame_cases compares the two) ---- */
        { .name = "fast: bri and ct", .payload = PL_STATE("{\"on\":false,\"bri\":254,\"ct\":153}"), .expect = FRAME_OK },
        { .name = "fast: ct only", .payload = PL_STATE("{\"on\":true,\"ct\":500}"), .expect = FRAME_OK },
        { .name = "fast: ct before bri", .payload = PL_STATE("{\"on\":true,\"ct\":500,\"bri\":1}"), .expect = FRAME_OK },
        { .name = "fast: bri 0 and iat 0", .payload = "{\"dev\":\"bulb-1\",\"seq\":1,\"iat\":0,\"state\":{\"on\":true,\"bri\":0}}", .expect = FRAME_OK },
        { .name = "fast: seq at the limit", .payload = PL_SEQ("9007199254740991"), .expect = FRAME_OK },
        { .name = "fast: seq one above the limit", .payload = PL_SEQ("9007199254740992"), .expect = FRAME_MALFORMED },
        { .name = "fast: seq of 17 digits", .payload = PL_SEQ("10000000000000000"), .expect = FRAME_MALFORMED },
        { .name = "fast: seq 0", .payload = PL_SEQ("0"), .expect = FRAME_MALFORMED },
        { .name = "fast: seq with a leading zero", .payload = PL_SEQ("042"), .expect = FRAME_MALFORMED },
        { .name = "fast: seq negative", .payload = PL_SEQ("-1"), .expect = FRAME_MALFORMED },
        { .name = "fast: seq as a real", .payload = PL_SEQ("42.0"), .expect = FRAME_MALFORMED },
        { .name = "fast: seq with an exponent", .payload = PL_SEQ("4e1"), .expect = FRAME_MALFORMED },
        { .name = "fast: iat with a leading zero", .payload = PL_IAT("01"), .expect = FRAME_MALFORMED },
        { .name = "fast: iat negative zero (jansson: the integer 0)", .payload = PL_IAT("-0"), .expect = FRAME_OK },
        { .name = "fast: bri 255", .payload = PL_STATE("{\"on\":true,\"bri\":255}"), .expect = FRAME_MALFORMED },
        { .name = "fast: ct 152", .payload = PL_STATE("{\"on\":true,\"ct\":152}"), .expect = FRAME_MALFORMED },
        { .name = "fast: bri twice", .payload = PL_STATE("{\"on\":true,\"bri\":1,\"bri\":2}"), .expect = FRAME_MALFORMED },
        { .name = "fast: on not a boolean", .payload = PL_STATE("{\"on\":1}"), .expect = FRAME_MALFORMED },
        { .name = "fast: on as null", .payload = PL_STATE("{\"on\":null}"), .expect = FRAME_MALFORMED },
        { .name = "fast: truex", .payload = PL_STATE("{\"on\":truex}"), .expect = FRAME_MALFORMED },
        { .name = "fast: dev of another bulb", .payload = "{\"dev\":\"bulb-2\",\"seq\":1,\"iat\":1,\"state\":{\"on\":true}}", .expect = FRAME_TOPIC_MISMATCH },
        { .name = "fast: dev a prefix of kid", .payload = "{\"dev\":\"bulb-\",\"seq\":1,\"iat\":1,\"state\":{\"on\":true}}", .expect = FRAME_TOPIC_MISMATCH },
        { .name = "fast: dev with an escape", .payload = "{\"dev\":\"bulb\\u002d1\",\"seq\":1,\"iat\":1,\"state\":{\"on\":true}}", .expect = FRAME_OK },
        { .name = "fast: dev empty", .payload = "{\"dev\":\"\",\"seq\":1,\"iat\":1,\"state\":{\"on\":true}}", .expect = FRAME_MALFORMED },
        { .name = "fast: dev unterminated", .payload = "{\"dev\":\"bulb-1", .expect = FRAME_MALFORMED },
        { .name = "fast: trailing space", .payload = PL("") " ", .expect = FRAME_OK },
        { .name = "fast: trailing brace", .payload = PL("") "}", .expect = FRAME_MALFORMED },
        { .name = "fast: cut before the last brace", .payload = "{\"dev\":\"bulb-1\",\"seq\":42,\"iat\":1700000000,\"state\":{\"on\":true}", .expect = FRAME_MALFORMED },
        { .name = "fast: a member after state", .payload = PL(",\"x\":1"), .expect = FRAME_MALFORMED },
        { .name = "fast: embedded NUL after the payload", .payload = PL("") "\0", .payload_len = sizeof(PL("")), .expect = FRAME_MALFORMED },
        { .name = "fast: header kid escaped", .header = "{\"alg\":\"ES256\",\"kid\":\"bulb\\u002d1\",\"typ\":\"iothub-status\"}", .expect = FRAME_OK },
        { .name = "fast: header with a space", .header = "{\"alg\":\"ES256\", \"kid\":\"bulb-1\",\"typ\":\"iothub-status\"}", .expect = FRAME_OK },
        { .name = "fast: header of another bulb", .header = HDR_KID("bulb-2"), .expect = FRAME_TOPIC_MISMATCH },
        { .name = "fast: header alg ES384", .header = HDR_ALG("ES384"), .expect = FRAME_MALFORMED },
        { .name = "fast: header alg es256", .header = HDR_ALG("es256"), .expect = FRAME_MALFORMED },
        { .name = "fast: header typ other", .header = "{\"alg\":\"ES256\",\"kid\":\"bulb-1\",\"typ\":\"iothub-statuz\"}", .expect = FRAME_MALFORMED },
        { .name = "fast: topic id that is no device id", .topic = "bulb\"1", .header = "{\"alg\":\"ES256\",\"kid\":\"bulb\"1\",\"typ\":\"iothub-status\"}", .payload = "{\"dev\":\"bulb\"1\",\"seq\":1,\"iat\":1,\"state\":{\"on\":true}}", .expect = FRAME_MALFORMED },
        { .name = "fast: usual shape, long signature", .sig_len = FRAME_SIG_MAX + 1, .expect = FRAME_MALFORMED },

        /* ---- signature ---- */
        { .name = "signature of FRAME_SIG_MAX+1 bytes",
          .sig_len = FRAME_SIG_MAX + 1,
          .expect = FRAME_MALFORMED },
        { .name = "signature of 256 bytes (RS256 size)", .sig_len = 256, .expect = FRAME_MALFORMED },
};

/* frame_parse() and frame_parse_reference() (no fast paths) agree on a frame: the same reason,
 * and on success the same fields. */
static void assert_same_as_reference(const uint8_t *buf, size_t len, const char *topic, enum frame_reason r,
                                     const struct frame *f) {
        struct frame g;
        enum frame_reason r2 = frame_parse_reference(buf, len, topic, MAX_BYTES, &g);

        assert_int_equal(r, r2);
        if (r != FRAME_OK)
                return;
        assert_string_equal(f->dev, g.dev);
        assert_int_equal(f->alg, g.alg);
        assert_ptr_equal(f->signing_input, g.signing_input);
        assert_int_equal(f->signing_input_len, g.signing_input_len);
        assert_int_equal(f->sig_len, g.sig_len);
        assert_memory_equal(f->sig, g.sig, f->sig_len);
        assert_int_equal(f->seq, g.seq);
        assert_int_equal(f->iat, g.iat);
        assert_int_equal(f->state.on, g.state.on);
        assert_int_equal(f->state.has_bri, g.state.has_bri);
        assert_int_equal(f->state.has_ct, g.state.has_ct);
        assert_int_equal(f->state.has_xy, g.state.has_xy);
        if (f->state.has_bri)
                assert_int_equal(f->state.bri, g.state.bri);
        if (f->state.has_ct)
                assert_int_equal(f->state.ct, g.state.ct);
        if (f->state.has_xy)
                assert_memory_equal(f->state.xy, g.state.xy, sizeof f->state.xy);
        assert_int_equal(f->has_ack, g.has_ack);
        if (f->has_ack) {
                assert_string_equal(f->ack.id, g.ack.id);
                assert_int_equal(f->ack.ok, g.ack.ok);
                assert_int_equal(f->ack.has_err, g.ack.has_err);
                if (f->ack.has_err)
                        assert_string_equal(f->ack.err, g.ack.err);
        }
}

/* Every case, exactly the expected reason; on success the fields that identify the frame. */
static void test_frame_cases(void **state) {
        unsigned failures = 0;

        for (size_t i = 0; i < ELEMENTSOF(frame_cases); i++) {
                const struct frame_case *c = &frame_cases[i];
                _cleanup_free_ uint8_t *buf = NULL;
                struct frame f;
                enum frame_reason r;
                size_t len;

                buf = build_frame(c, &len);
                r = frame_parse(buf, len, c->topic ?: TOPIC_DEV, MAX_BYTES, &f);
                assert_same_as_reference(buf, len, c->topic ?: TOPIC_DEV, r, &f);
                /* Report every failing case, not just the first. */
                if (r != c->expect) {
                        print_error("case \"%s\": got %s, expected %s\n", c->name,
                                    frame_reason_to_string(r) ?: "ok",
                                    frame_reason_to_string(c->expect) ?: "ok");
                        failures++;
                        continue;
                }
                if (r != FRAME_OK)
                        continue;

                assert_string_equal(f.dev, c->topic ?: TOPIC_DEV);
                assert_ptr_equal(f.signing_input, buf);
                assert_true(f.signing_input_len < len);
                assert_int_equal(buf[f.signing_input_len], '.');
                assert_int_equal(f.sig_len, c->sig_len ?: DEFAULT_SIG_LEN);
                assert_true(f.seq >= 1 && f.seq <= FRAME_SEQ_MAX);
        }
        assert_int_equal(failures, 0);
}

/* All fields of two complete frames, one per algorithm. */
static void test_frame_fields(void **state) {
        static const struct frame_case es = {
                .payload = "{\"dev\":\"bulb-1\",\"seq\":9007199254740991,\"iat\":1700000123,"
                           "\"state\":{\"on\":false,\"bri\":254,\"ct\":153,\"xy\":[0.3127,1]},"
                           "\"ack\":{\"id\":\".cmd-7\",\"ok\":false,\"err\":\"busy \\u00e9\"}}",
        };
        static const struct frame_case ed = { .header = HDR_EDDSA };
        _cleanup_free_ uint8_t *b1 = NULL, *b2 = NULL;
        uint8_t sig[DEFAULT_SIG_LEN];
        struct frame f;
        size_t len;
        const uint8_t *dot;

        fill_sig(sig, sizeof(sig));

        b1 = build_frame(&es, &len);
        assert_int_equal(frame_parse(b1, len, "bulb-1", MAX_BYTES, &f), FRAME_OK);
        assert_string_equal(f.dev, "bulb-1");
        assert_int_equal(f.alg, FRAME_ALG_ES256);
        dot = memchr(b1, '.', len);
        assert_non_null(dot);
        dot = memchr(dot + 1, '.', len - (size_t) (dot + 1 - b1));
        assert_non_null(dot);
        assert_ptr_equal(f.signing_input, b1);
        assert_int_equal(f.signing_input_len, dot - b1);
        assert_int_equal(f.sig_len, DEFAULT_SIG_LEN);
        assert_memory_equal(f.sig, sig, DEFAULT_SIG_LEN);
        assert_int_equal(f.seq, FRAME_SEQ_MAX);
        assert_int_equal(f.iat, 1700000123);
        assert_false(f.state.on);
        assert_true(f.state.has_bri);
        assert_int_equal(f.state.bri, 254);
        assert_true(f.state.has_ct);
        assert_int_equal(f.state.ct, 153);
        assert_true(f.state.has_xy);
        assert_true(f.state.xy[0] == 0.3127);
        assert_true(f.state.xy[1] == 1.0);
        assert_true(f.has_ack);
        assert_string_equal(f.ack.id, ".cmd-7");
        assert_false(f.ack.ok);
        assert_true(f.ack.has_err);
        assert_string_equal(f.ack.err, "busy \xc3\xa9");

        b2 = build_frame(&ed, &len);
        assert_int_equal(frame_parse(b2, len, "bulb-1", MAX_BYTES, &f), FRAME_OK);
        assert_int_equal(f.alg, FRAME_ALG_EDDSA);
        assert_string_equal(f.dev, "bulb-1");
        assert_int_equal(f.seq, 42);
        assert_int_equal(f.iat, 1700000000);
        assert_true(f.state.on);
        assert_false(f.state.has_bri);
        assert_false(f.state.has_ct);
        assert_false(f.state.has_xy);
        assert_false(f.has_ack);
        assert_memory_equal(f.sig, sig, DEFAULT_SIG_LEN);
}

/* STYLE.md: results are left untouched on failure. */
static void test_frame_ret_untouched(void **state) {
        static const struct frame_case bad = { .payload = PL_STATE("{\"on\":true,\"bri\":255}") };
        _cleanup_free_ uint8_t *buf = NULL;
        struct frame f, before;
        size_t len;

        buf = build_frame(&bad, &len);
        memset(&f, 0xa5, sizeof(f));
        before = f;
        assert_int_equal(frame_parse(buf, len, TOPIC_DEV, MAX_BYTES, &f), FRAME_MALFORMED);
        assert_memory_equal(&f, &before, sizeof(f));
}

/* [frames] max_bytes: a frame of exactly max_bytes passes, one byte more does not, and the size is
 * judged before anything else, so that junk of any size costs nothing. */
static void test_frame_size(void **state) {
        static const struct frame_case ok = { .name = "ok" };
        _cleanup_free_ uint8_t *buf = NULL, *junk = NULL, *big = NULL;
        struct frame f;
        size_t len;

        buf = build_frame(&ok, &len);
        assert_int_equal(frame_parse(buf, len, TOPIC_DEV, len, &f), FRAME_OK);
        assert_int_equal(frame_parse(buf, len, TOPIC_DEV, len - 1, &f), FRAME_TOO_LARGE);
        assert_int_equal(frame_parse(buf, len, TOPIC_DEV, 0, &f), FRAME_TOO_LARGE);

        /* Junk: too large at max_bytes + 1, merely malformed at max_bytes. */
        junk = malloc(MAX_BYTES + 1);
        assert_non_null(junk);
        memset(junk, '.', MAX_BYTES + 1);
        assert_int_equal(frame_parse(junk, MAX_BYTES + 1, TOPIC_DEV, MAX_BYTES, &f), FRAME_TOO_LARGE);
        assert_int_equal(frame_parse(junk, MAX_BYTES, TOPIC_DEV, MAX_BYTES, &f), FRAME_MALFORMED);

        /* Empty input. */
        assert_int_equal(frame_parse(junk, 0, TOPIC_DEV, MAX_BYTES, &f), FRAME_MALFORMED);
        assert_int_equal(frame_parse(NULL, 0, TOPIC_DEV, MAX_BYTES, &f), FRAME_MALFORMED);

        /* max_bytes above FRAME_MAX_BYTES_LIMIT is capped at the limit. */
        big = malloc(FRAME_MAX_BYTES_LIMIT + 1);
        assert_non_null(big);
        memset(big, 'A', FRAME_MAX_BYTES_LIMIT + 1);
        assert_int_equal(frame_parse(big, FRAME_MAX_BYTES_LIMIT + 1, TOPIC_DEV, SIZE_MAX, &f),
                         FRAME_TOO_LARGE);
        assert_int_equal(frame_parse(big, FRAME_MAX_BYTES_LIMIT, TOPIC_DEV, SIZE_MAX, &f), FRAME_MALFORMED);
}

/* A valid frame much larger than the stack scratch buffer (JSON whitespace is allowed), at the
 * size limit, so that the heap path is taken; and the same frame fails under a small limit. */
static void test_frame_large(void **state) {
        _cleanup_free_ char *payload = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        struct frame_case c = { .name = "large" };
        static const char head[] = "{\"dev\":\"bulb-1\",\"seq\":7,\"iat\":1,\"state\":{\"on\":true}";
        size_t len, target, plen;
        struct frame f;

        /* Header and signature text take about 160 bytes; the payload fills up the rest. */
        target = (FRAME_MAX_BYTES_LIMIT - 200) / 4 * 3;
        payload = malloc(target + 1);
        assert_non_null(payload);
        memcpy(payload, head, sizeof(head) - 1);
        memset(payload + sizeof(head) - 1, ' ', target - sizeof(head));
        payload[target - 1] = '}';
        payload[target] = '\0';
        plen = strlen(payload);
        assert_int_equal(plen, target);
        c.payload = payload;

        buf = build_frame(&c, &len);
        assert_true(len <= FRAME_MAX_BYTES_LIMIT);
        assert_true(len > 16384);
        assert_int_equal(frame_parse(buf, len, TOPIC_DEV, FRAME_MAX_BYTES_LIMIT, &f), FRAME_OK);
        assert_int_equal(f.seq, 7);
        assert_int_equal(frame_parse(buf, len, TOPIC_DEV, MAX_BYTES, &f), FRAME_TOO_LARGE);
}

/* Nesting far beyond jansson's own limit is stopped by the pre-scan. */
static void test_frame_deep_nesting(void **state) {
        _cleanup_free_ char *payload = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        struct frame_case c = { .name = "deep" };
        static const char head[] = "{\"dev\":\"bulb-1\",\"seq\":7,\"iat\":1,\"state\":{\"on\":true},\"x\":";
        const size_t depth = 5000;
        struct frame f;
        size_t len;
        char *p;

        payload = malloc(sizeof(head) + 2 * depth + 2);
        assert_non_null(payload);
        p = stpcpy(payload, head);
        memset(p, '[', depth);
        memset(p + depth, ']', depth);
        strcpy(p + 2 * depth, "}");
        c.payload = payload;

        buf = build_frame(&c, &len);
        assert_int_equal(frame_parse(buf, len, TOPIC_DEV, FRAME_MAX_BYTES_LIMIT, &f), FRAME_MALFORMED);
}

/* A NUL byte anywhere in the compact serialization is not in the alphabet. */
static void test_frame_embedded_nul(void **state) {
        static const struct frame_case ok = { .name = "ok" };
        _cleanup_free_ uint8_t *buf = NULL;
        struct frame f;
        size_t len;

        buf = build_frame(&ok, &len);
        for (size_t i = 0; i < len; i += 7) {
                uint8_t saved = buf[i];

                buf[i] = '\0';
                assert_int_equal(frame_parse(buf, len, TOPIC_DEV, MAX_BYTES, &f), FRAME_MALFORMED);
                buf[i] = saved;
        }
        assert_int_equal(frame_parse(buf, len, TOPIC_DEV, MAX_BYTES, &f), FRAME_OK);
        /* And the frame followed by a NUL, as a C string passed with strlen() + 1 would be. */
        assert_int_equal(frame_parse(buf, len + 1, TOPIC_DEV, MAX_BYTES, &f), FRAME_MALFORMED);
}

/* The pre-scan keeps what it rejects away from jansson altogether. Its verdicts are mostly the same
 * as jansson's or the schema's (its point is to be cheap and to bound nesting before jansson recurses
 * and allocates), so the test looks at the cost: counted through jansson's allocator hooks, a
 * payload the pre-scan rejects costs no more than one that fails on its first byte. */
static size_t json_allocs;

static void *counting_malloc(size_t n) {
        json_allocs++;
        return malloc(n);
}

static size_t json_allocs_of(const char *payload) {
        struct frame_case c = { .name = "prescan", .payload = payload };
        _cleanup_free_ uint8_t *buf = NULL;
        struct frame f;
        size_t len;

        buf = build_frame(&c, &len);
        json_allocs = 0;
        assert_int_equal(frame_parse(buf, len, TOPIC_DEV, MAX_BYTES, &f), FRAME_MALFORMED);
        return json_allocs;
}

static void test_frame_prescan(void **state) {
        static const char *const rejected[] = {
                "{\"dev\":\"bulb-1\",\"x\":[[[0]]]}", /* FRAME_MAX_DEPTH + 1 */
                "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
                "{\"dev\":\"bulb\x01\"}", /* control characters in a string */
                "{\"dev\":\"bulb\t\"}",
                "{\"dev\":\"bulb\x1f\"}",
                "{\"dev\":\"bulb-1\",\x0c\"seq\":1}", /* and outside */
                "{\"dev\":\"bulb-1\",\x7f}",
                "{\"dev\":\"bulb-1\"\xc2\xa0}", /* non-ASCII outside strings */
                "{\"dev\":\"\xff\"}",           /* RFC 3629 4 */
                "{\"dev\":\"\x80\"}",
                "{\"dev\":\"\xc0\xaf\"}",
                "{\"dev\":\"\xc1\xbf\"}",
                "{\"dev\":\"\xe0\x80\xaf\"}",
                "{\"dev\":\"\xe0\x9f\xbf\"}",
                "{\"dev\":\"\xed\xa0\x80\"}",
                "{\"dev\":\"\xed\xbf\xbf\"}",
                "{\"dev\":\"\xf0\x80\x80\xaf\"}",
                "{\"dev\":\"\xf0\x8f\xbf\xbf\"}",
                "{\"dev\":\"\xf4\x90\x80\x80\"}",
                "{\"dev\":\"\xf5\x80\x80\x80\"}",
                "{\"dev\":\"\xe2\x82\"}",
                "{\"dev\":\"\xe2\x82\xc3\"}",
                "{\"dev\":\"\xf0\x9f\x92\xc3\"}",
                "][[[[",                                    /* an unbalanced closer does not wrap */
                "{\"dev\":\"\\\xc3\xa9\",\"x\":[[[[0]]]]}", /* "\" escapes one character only */
                "{\"dev\":\"\xf0\x9f\x92\"}",
                "{\"dev\":\"\xf0\x9f\x92\x41\"}",
                "{\"dev\":\"\xe2\x82\xac\xe2\"}",
                "{\"dev\":\"x\"}\xe2\x82",
        };
        static const char *const parsed[] = {
                "{\"dev\":\"bulb-1\",\"x\":[[0]]}", /* FRAME_MAX_DEPTH */
                "{\"dev\":\"[[[[[[[[\"}",           /* brackets in strings do not nest */
                "{\"dev\":\"\\\"[[[[[[[[\"}",       /* nor after an escaped quote */
                "{\"dev\":\"\\\\\",\"x\":[[0]]}",   /* an escaped backslash ends nothing */
                " \t\r\n{}",
                "{\"dev\":\"\xc2\x80\xdf\xbf\"}",
                "{\"dev\":\"\xe0\xa0\x80\xed\x9f\xbf\xee\x80\x80\xef\xbf\xbf\"}",
                "{\"dev\":\"\xf0\x90\x80\x80\xf4\x8f\xbf\xbf\"}",
        };
        json_malloc_t saved_malloc;
        json_free_t saved_free;
        size_t baseline;

        json_get_alloc_funcs(&saved_malloc, &saved_free);
        json_set_alloc_funcs(counting_malloc, free);

        baseline = json_allocs_of("\x01");
        assert_true(baseline > 0); /* the header */
        for (size_t i = 0; i < ELEMENTSOF(rejected); i++)
                if (json_allocs_of(rejected[i]) != baseline)
                        fail_msg("rejected[%zu] reached jansson", i);
        for (size_t i = 0; i < ELEMENTSOF(parsed); i++)
                if (json_allocs_of(parsed[i]) <= baseline)
                        fail_msg("parsed[%zu] did not reach jansson", i);

        json_set_alloc_funcs(saved_malloc, saved_free);
}

static void test_reason_to_string(void **state) {
        static const struct {
                enum frame_reason r;
                const char *s;
        } table[] = {
                { FRAME_TOO_LARGE, "too_large" },
                { FRAME_MALFORMED, "malformed" },
                { FRAME_UNKNOWN_DEVICE, "unknown_device" },
                { FRAME_REVOKED, "revoked" },
                { FRAME_BAD_SIGNATURE, "bad_signature" },
                { FRAME_REPLAY, "replay" },
                { FRAME_STALE, "stale" },
                { FRAME_RATE_LIMITED, "rate_limited" },
                { FRAME_TOPIC_MISMATCH, "topic_mismatch" },
        };

        assert_int_equal(ELEMENTSOF(table), _FRAME_REASON_MAX - 1);
        for (size_t i = 0; i < ELEMENTSOF(table); i++)
                assert_string_equal(frame_reason_to_string(table[i].r), table[i].s);
        assert_null(frame_reason_to_string(FRAME_OK));
        assert_null(frame_reason_to_string(_FRAME_REASON_MAX));
        assert_null(frame_reason_to_string((enum frame_reason) - 1));
        assert_null(frame_reason_to_string((enum frame_reason) 1000));
}

static void test_alg_to_string(void **state) {
        assert_string_equal(frame_alg_to_string(FRAME_ALG_ES256), "ES256");
        assert_string_equal(frame_alg_to_string(FRAME_ALG_EDDSA), "EdDSA");
        assert_null(frame_alg_to_string((enum frame_alg) 2));
        assert_null(frame_alg_to_string((enum frame_alg) - 1));
}

/* RFC 4648 10 test vectors, in the URL alphabet without padding, plus both URL-only characters. */
static void test_b64url_vectors(void **state) {
        static const struct {
                const char *raw;
                size_t raw_len;
                const char *enc;
        } table[] = {
                { "", 0, "" },
                { "f", 1, "Zg" },
                { "fo", 2, "Zm8" },
                { "foo", 3, "Zm9v" },
                { "foob", 4, "Zm9vYg" },
                { "fooba", 5, "Zm9vYmE" },
                { "foobar", 6, "Zm9vYmFy" },
                { "\xfb\xff", 2, "-_8" },
                { "\xff\xff\xff", 3, "____" },
                { "\0\0\0\0", 4, "AAAAAA" },
                { "{\"alg\":\"ES256\",", 15, "eyJhbGciOiJFUzI1NiIs" },
        };

        for (size_t i = 0; i < ELEMENTSOF(table); i++) {
                char enc[64];
                uint8_t dec[64];
                ssize_t n;

                assert_int_equal(b64url_encode((const uint8_t *) table[i].raw, table[i].raw_len, enc),
                                 strlen(table[i].enc));
                assert_string_equal(enc, table[i].enc);
                n = b64url_decode(table[i].enc, strlen(table[i].enc), dec, sizeof(dec));
                assert_int_equal(n, table[i].raw_len);
                assert_memory_equal(dec, table[i].raw, table[i].raw_len);
        }
}

/* Every length from 0 to 300 and every byte value, both ways, with the exact capacity. */
static void test_b64url_round_trip(void **state) {
        uint8_t in[300], out[300];
        char enc[4 * 100 + 1];

        for (size_t i = 0; i < sizeof(in); i++)
                in[i] = (uint8_t) (i * 131 + 17);
        for (size_t len = 0; len <= sizeof(in); len++) {
                size_t n = b64url_encode(in, len, enc);

                assert_int_equal(n, (len * 4 + 2) / 3);
                assert_int_equal(strlen(enc), n);
                assert_int_equal(b64url_decode(enc, n, out, len), len);
                assert_memory_equal(out, in, len);
                if (len > 0)
                        assert_int_equal(b64url_decode(enc, n, out, len - 1), -ENOBUFS);
        }
}

static void test_b64url_reject(void **state) {
        static const struct {
                const char *in;
                size_t cap;
                int expect;
        } table[] = {
                { "Zg==", 16, -EINVAL }, /* padding */
                { "Zg=", 16, -EINVAL },
                { "Zm8=", 16, -EINVAL },
                { "====", 16, -EINVAL },
                { "Zm9v+mFy", 16, -EINVAL }, /* base64, not base64url */
                { "Zm9v/mFy", 16, -EINVAL },
                { "Zm9v YmFy", 16, -EINVAL },
                { "Zm9vYmFy\n", 16, -EINVAL },
                { " Zm9v", 16, -EINVAL },
                { "Zm9v.", 16, -EINVAL },
                { "Z", 16, -EINVAL }, /* 4n+1 characters */
                { "Zm9vY", 16, -EINVAL },
                { "Zh", 16, -EINVAL }, /* non-zero trailing bits (RFC 4648 3.5) */
                { "Zm9", 16, -EINVAL },
                { "Zm9vYmF_", 16, 6 },
                { "Zm9vYmFy", 6, 6 },
                { "Zm9vYmFy", 5, -ENOBUFS }, /* too long for the buffer */
                { "Zm9vYmE", 4, -ENOBUFS },
                { "Zm9vYmE", 5, 5 },
                { "Zm9v+mFy", 1, -EINVAL }, /* invalid beats too long */
        };

        for (size_t i = 0; i < ELEMENTSOF(table); i++) {
                uint8_t out[16], sentinel[16];

                memset(out, 0x5a, sizeof(out));
                memset(sentinel, 0x5a, sizeof(sentinel));
                if (b64url_decode(table[i].in, strlen(table[i].in), out, table[i].cap) != table[i].expect)
                        fail_msg("\"%s\" cap %zu: expected %d", table[i].in, table[i].cap, table[i].expect);
                if (table[i].expect < 0)
                        assert_memory_equal(out, sentinel, sizeof(out)); /* untouched on failure */
        }

        /* Embedded NUL and 8-bit bytes. */
        assert_int_equal(b64url_decode("Zm\0v", 4, NULL, 0), -EINVAL);
        assert_int_equal(b64url_decode("Zm\xc3\xa9", 4, NULL, 0), -EINVAL);
        assert_int_equal(b64url_decode(NULL, 0, NULL, 0), 0);
        assert_int_equal(b64url_decode(NULL, 4, NULL, 0), -EINVAL);
        assert_int_equal(b64url_decode("Zm9v", 4, NULL, 16), -EINVAL); /* no buffer for 3 bytes */
        /* 4n+1 characters, even when the byte after them would complete a pair. */
        assert_int_equal(b64url_decode("AAAAAA", 5, (uint8_t[8]){ 0 }, 8), -EINVAL);
        assert_int_equal(b64url_decode("AAAAAA", 6, (uint8_t[8]){ 0 }, 8), 4);
        /* Every byte that is not in the alphabet, in every position of a quantum and a tail. */
        for (unsigned c = 0; c < 256; c++) {
                bool alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                             c == '-' || c == '_';
                uint8_t out[8];

                for (size_t pos = 0; pos < 7; pos++) {
                        char in[8] = "AAAAAAA";

                        in[pos] = (char) c;
                        if (pos == 6 && alpha && c != 'A' && c != 'Q' && c != 'g' && c != 'w')
                                continue; /* trailing bits, covered above */
                        assert_int_equal(b64url_decode(in, 7, out, sizeof(out)), alpha ? 5 : -EINVAL);
                }
        }
}

static void test_topic_device(void **state) {
        static const struct {
                const char *topic, *prefix, *suffix;
                const char *expect; /* NULL: -EINVAL */
        } table[] = {
                { "iothub/v1/bulbs/bulb-1/status", "iothub/v1/bulbs", "status", "bulb-1" },
                { "iothub/v1/bulbs/A.b_c-9/status", "iothub/v1/bulbs", "status", "A.b_c-9" },
                { "iothub/v1/bulbs/" S64 "/status", "iothub/v1/bulbs", "status", S64 },
                { "p/x/cmd", "p", "cmd", "x" },
                { "iothub/v1/bulbs/" S64 "5/status", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/.bulb/status", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs//status", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/bulb-1/status/", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/bulb-1/status/x", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/bulb-1/statu", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/bulb-1/cmd", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/bulb-1", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/a/b/status", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbsX/bulb-1/status", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulb/bulb-1/status", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs", "iothub/v1/bulbs", "status", NULL },
                { "", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/bulb 1/status", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/bulb+/status", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/#/status", "iothub/v1/bulbs", "status", NULL },
                { "iothub/v1/bulbs/bulb-\xc3\xa9/status", "iothub/v1/bulbs", "status", NULL },
        };

        for (size_t i = 0; i < ELEMENTSOF(table); i++) {
                char dev[DEVICE_ID_MAX + 1] = "untouched";
                int r = frame_topic_device(table[i].topic, table[i].prefix, table[i].suffix, dev);

                if (table[i].expect) {
                        if (r != 0)
                                fail_msg("\"%s\": %d", table[i].topic, r);
                        assert_string_equal(dev, table[i].expect);
                } else {
                        if (r != -EINVAL)
                                fail_msg("\"%s\": %d, expected -EINVAL", table[i].topic, r);
                        assert_string_equal(dev, "untouched");
                }
        }
        assert_int_equal(frame_topic_device(NULL, "p", "status", (char[DEVICE_ID_MAX + 1]){ 0 }), -EINVAL);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_frame_cases),         cmocka_unit_test(test_frame_fields),
                cmocka_unit_test(test_frame_ret_untouched), cmocka_unit_test(test_frame_size),
                cmocka_unit_test(test_frame_large),         cmocka_unit_test(test_frame_deep_nesting),
                cmocka_unit_test(test_frame_embedded_nul),  cmocka_unit_test(test_frame_prescan),
                cmocka_unit_test(test_reason_to_string),    cmocka_unit_test(test_alg_to_string),
                cmocka_unit_test(test_b64url_vectors),      cmocka_unit_test(test_b64url_round_trip),
                cmocka_unit_test(test_b64url_reject),       cmocka_unit_test(test_topic_device),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
