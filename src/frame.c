/* SPDX-License-Identifier: MIT */
/* Status frames of PROTOCOL.md 1: a JWS in Compact Serialization (RFC 7515 3.1, 7.1) whose
 * protected header and payload are small JSON objects with a fixed schema.
 *
 * frame_parse() runs the stateless checks cheapest first and returns the first failing reason:
 *   1. size (before any byte is looked at);
 *   2. structure: three non-empty strict base64url parts, nothing else (all three decoded here,
 *      so that every byte of the frame is scanned once on the hot, valid path);
 *   3. protected header: pre-scan, jansson, exact member set, kid against the topic;
 *   4. payload: pre-scan, jansson, schema, dev against kid;
 *   5. signature length.
 * Pure: no I/O, no logging, no global state (jansson seeds its hash function from
 * /dev/urandom the first time any JSON object is created, see the report to the caller). */
#include <assert.h>
#include <jansson.h>
#include <limits.h>

#include "iothub/frame.h"

/* jansson >= 2.11 ships the cleanup helper itself: json_decrefp(), accepting NULL. */

/* Decoded header and payload share one scratch buffer. This much of it lives on the stack: it
 * holds both parts of any frame up to 4096 bytes, the default [frames] max_bytes (base64url
 * carries 3 bytes in 4 characters). Larger frames, allowed up to FRAME_MAX_BYTES_LIMIT, use
 * a heap buffer of at most 3/4 of that. */
#define FRAME_SCRATCH_STACK 3072

/* Longest base64url text that can decode to FRAME_SIG_MAX bytes: ceil(132 * 4 / 3). */
#define FRAME_SIG_B64_MAX B64URL_LEN(FRAME_SIG_MAX)

/* iat is Unix seconds; the same I-JSON safe range as seq (RFC 7493 2.2). */
#define FRAME_IAT_MAX FRAME_SEQ_MAX

#define FRAME_BRI_MIN 0
#define FRAME_BRI_MAX 254
#define FRAME_CT_MIN 153 /* mireds, about 6500 K */
#define FRAME_CT_MAX 500 /* mireds, 2000 K */

static const char *const frame_reason_table[_FRAME_REASON_MAX] = {
        [FRAME_TOO_LARGE] = "too_large",
        [FRAME_MALFORMED] = "malformed",
        [FRAME_UNKNOWN_DEVICE] = "unknown_device",
        [FRAME_REVOKED] = "revoked",
        [FRAME_BAD_SIGNATURE] = "bad_signature",
        [FRAME_REPLAY] = "replay",
        [FRAME_STALE] = "stale",
        [FRAME_RATE_LIMITED] = "rate_limited",
        [FRAME_TOPIC_MISMATCH] = "topic_mismatch",
};

const char *frame_reason_to_string(enum frame_reason r) {
        /* Through unsigned, so that a negative value read from anywhere is out of range too. */
        if ((unsigned) r >= (unsigned) _FRAME_REASON_MAX)
                return NULL;
        return frame_reason_table[r]; /* NULL for FRAME_OK */
}

const char *frame_alg_to_string(enum frame_alg a) {
        /* The "alg" names of RFC 7518 3.1 and RFC 8037 3.1, exactly as they appear on the wire. */
        switch (a) {
        case FRAME_ALG_ES256:
                return "ES256";
        case FRAME_ALG_EDDSA:
                return "EdDSA";
        }
        return NULL;
}

/* ---- base64url (RFC 4648 5) without padding (RFC 7515 2) ---- */

static const char b64url_alphabet[65] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* Each alphabet character maps to its value plus one; every other byte to 0. Subtracting one as
 * unsigned turns the latter into a huge value, so that a whole quantum is checked with one OR. */
static const uint8_t b64url_value1[256] = {
        ['A'] = 1,  ['B'] = 2,  ['C'] = 3,  ['D'] = 4,  ['E'] = 5,  ['F'] = 6,  ['G'] = 7,  ['H'] = 8,
        ['I'] = 9,  ['J'] = 10, ['K'] = 11, ['L'] = 12, ['M'] = 13, ['N'] = 14, ['O'] = 15, ['P'] = 16,
        ['Q'] = 17, ['R'] = 18, ['S'] = 19, ['T'] = 20, ['U'] = 21, ['V'] = 22, ['W'] = 23, ['X'] = 24,
        ['Y'] = 25, ['Z'] = 26, ['a'] = 27, ['b'] = 28, ['c'] = 29, ['d'] = 30, ['e'] = 31, ['f'] = 32,
        ['g'] = 33, ['h'] = 34, ['i'] = 35, ['j'] = 36, ['k'] = 37, ['l'] = 38, ['m'] = 39, ['n'] = 40,
        ['o'] = 41, ['p'] = 42, ['q'] = 43, ['r'] = 44, ['s'] = 45, ['t'] = 46, ['u'] = 47, ['v'] = 48,
        ['w'] = 49, ['x'] = 50, ['y'] = 51, ['z'] = 52, ['0'] = 53, ['1'] = 54, ['2'] = 55, ['3'] = 56,
        ['4'] = 57, ['5'] = 58, ['6'] = 59, ['7'] = 60, ['8'] = 61, ['9'] = 62, ['-'] = 63, ['_'] = 64,
};

static inline uint32_t b64url_digit(uint8_t c) {
        return (uint32_t) b64url_value1[c] - 1u;
}

/* Strict decoder shared by b64url_decode() and frame_parse(). With out == NULL it only validates.
 * Returns 0 and the decoded length in *ret_len, or -EINVAL; out may be partly written on failure. */
static int b64url_decode_raw(const uint8_t *in, size_t len, uint8_t *out, size_t *ret_len) {
        size_t full = len / 4, rest = len % 4, o = 0;
        uint32_t v;

        /* A lone character carries 6 bits, less than a byte: no encoder produces it (RFC 4648 5). */
        if (rest == 1)
                return -EINVAL;

        for (size_t i = 0; i < full; i++, in += 4) {
                uint32_t a = b64url_digit(in[0]), b = b64url_digit(in[1]), c = b64url_digit(in[2]),
                         d = b64url_digit(in[3]);

                if ((a | b | c | d) > 63)
                        return -EINVAL;
                v = a << 18 | b << 12 | c << 6 | d;
                if (out) {
                        out[o] = (uint8_t) (v >> 16);
                        out[o + 1] = (uint8_t) (v >> 8);
                        out[o + 2] = (uint8_t) v;
                }
                o += 3;
        }

        if (rest > 0) {
                uint32_t a = b64url_digit(in[0]), b = b64url_digit(in[1]),
                         c = rest == 3 ? b64url_digit(in[2]) : 0;

                if ((a | b | c) > 63)
                        return -EINVAL;
                v = a << 18 | b << 12 | c << 6;
                /* The unused low bits of the last character must be zero, otherwise several texts
                 * decode to the same bytes (RFC 4648 3.5); a signature must have exactly one. */
                if (rest == 2 ? (v & 0xffffu) != 0 : (v & 0xffu) != 0)
                        return -EINVAL;
                if (out) {
                        out[o] = (uint8_t) (v >> 16);
                        if (rest == 3)
                                out[o + 1] = (uint8_t) (v >> 8);
                }
                o += rest - 1;
        }

        *ret_len = o;
        return 0;
}

ssize_t b64url_decode(const char *in, size_t len, uint8_t *out, size_t cap) {
        size_t n;
        int r;

        if (!in && len > 0)
                return -EINVAL;

        /* Validate first, so that out is untouched on every failure. */
        r = b64url_decode_raw((const uint8_t *) in, len, NULL, &n);
        if (r < 0)
                return r;
        if (n > cap || n > (size_t) SSIZE_MAX)
                return -ENOBUFS;
        if (n == 0)
                return 0;
        if (!out)
                return -EINVAL;

        r = b64url_decode_raw((const uint8_t *) in, len, out, &n);
        if (r < 0)
                return r;
        return (ssize_t) n;
}

size_t b64url_encode(const uint8_t *in, size_t len, char *out) {
        size_t o = 0, i = 0;

        for (; len - i >= 3; i += 3) {
                uint32_t v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8 | in[i + 2];

                out[o++] = b64url_alphabet[v >> 18];
                out[o++] = b64url_alphabet[(v >> 12) & 63];
                out[o++] = b64url_alphabet[(v >> 6) & 63];
                out[o++] = b64url_alphabet[v & 63];
        }
        if (len - i > 0) {
                uint32_t v = (uint32_t) in[i] << 16;

                if (len - i == 2)
                        v |= (uint32_t) in[i + 1] << 8;
                out[o++] = b64url_alphabet[v >> 18];
                out[o++] = b64url_alphabet[(v >> 12) & 63];
                if (len - i == 2)
                        out[o++] = b64url_alphabet[(v >> 6) & 63];
        }
        out[o] = '\0';
        return o;
}

/* ---- topic ---- */

int frame_topic_device(const char *topic, const char *prefix, const char *suffix, char *ret_dev) {
        const char *id, *end;
        size_t plen, n;

        if (!topic || !prefix || !suffix || !ret_dev)
                return -EINVAL;

        plen = strlen(prefix);
        if (strncmp(topic, prefix, plen) != 0 || topic[plen] != '/')
                return -EINVAL;

        /* A device id cannot contain '/', so the first one after the prefix ends it. */
        id = topic + plen + 1;
        end = strchr(id, '/');
        if (!end)
                return -EINVAL;
        n = (size_t) (end - id);
        if (!device_id_is_valid(id, n) || !streq(end + 1, suffix))
                return -EINVAL;

        memcpy(ret_dev, id, n);
        ret_dev[n] = '\0';
        return 0;
}

/* ---- JSON pre-scan ---- */

/* Length of the well-formed UTF-8 sequence at p (RFC 3629 4: no overlong forms, no surrogates,
 * nothing above U+10FFFF), or 0. p[0] is known to be >= 0x80. */
static size_t utf8_sequence_len(const uint8_t *p, size_t left) {
        uint8_t c = p[0], lo = 0x80, hi = 0xbf;
        size_t n;

        if (c >= 0xc2 && c <= 0xdf)
                n = 2;
        else if (c >= 0xe0 && c <= 0xef) {
                n = 3;
                if (c == 0xe0)
                        lo = 0xa0; /* overlong */
                else if (c == 0xed)
                        hi = 0x9f; /* UTF-16 surrogates */
        } else if (c >= 0xf0 && c <= 0xf4) {
                n = 4;
                if (c == 0xf0)
                        lo = 0x90; /* overlong */
                else if (c == 0xf4)
                        hi = 0x8f; /* above U+10FFFF */
        } else
                return 0; /* continuation byte, overlong C0/C1, F5..FF */

        if (left < n || p[1] < lo || p[1] > hi)
                return 0;
        for (size_t i = 2; i < n; i++)
                if (p[i] < 0x80 || p[i] > 0xbf)
                        return 0;
        return n;
}

/* A linear pass before jansson sees the text: nesting at most FRAME_MAX_DEPTH (bounds jansson's
 * recursion and allocations), strict UTF-8 (RFC 8259 8.1), no raw control characters (inside
 * strings RFC 8259 7 requires them escaped; outside, only the whitespace of RFC 8259 2), and
 * non-ASCII only inside strings. It does not validate JSON: jansson does. As long as the text
 * is a valid JSON prefix, string boundaries are tracked exactly as jansson does, so jansson never
 * nests deeper than counted here before it fails. */
static bool json_prescan(const uint8_t *p, size_t len) {
        bool in_string = false, escaped = false;
        unsigned depth = 0;
        size_t i = 0;

        while (i < len) {
                uint8_t c = p[i];

                if (c >= 0x80) {
                        size_t n;

                        if (!in_string)
                                return false;
                        n = utf8_sequence_len(p + i, len - i);
                        if (n == 0)
                                return false;
                        i += n;
                        escaped = false; /* "\" before non-ASCII is invalid; jansson says so */
                        continue;
                }
                i++;

                if (in_string) {
                        if (c < 0x20)
                                return false;
                        if (escaped)
                                escaped = false;
                        else if (c == '\\')
                                escaped = true;
                        else if (c == '"')
                                in_string = false;
                        continue;
                }

                switch (c) {
                case '"':
                        in_string = true;
                        break;
                case '{':
                case '[':
                        if (++depth > FRAME_MAX_DEPTH)
                                return false;
                        break;
                case '}':
                case ']':
                        /* Unbalanced closers are jansson's to reject; only never wrap around. */
                        if (depth > 0)
                                depth--;
                        break;
                case ' ':
                case '\t':
                case '\n':
                case '\r':
                        break;
                default:
                        if (c < 0x20 || c == 0x7f)
                                return false;
                }
        }
        return true;
}

static json_t *json_parse_strict(const uint8_t *p, size_t len) {
        if (!json_prescan(p, len))
                return NULL;
        /* RFC 7515 4 and RFC 8259 4: member names should be unique; a JOSE parser must either
         * reject duplicates or use the last one. Rejecting them is the only safe choice when the
         * cloud's library may pick a different one. The EOF check (on by default) rejects
         * anything after the value; without JSON_ALLOW_NUL, "\u0000" is rejected too. */
        return json_loadb((const char *) p, len, JSON_REJECT_DUPLICATES, NULL);
}

/* ---- schema helpers ---- */

static bool json_string_is(const json_t *s, const char *lit) {
        size_t n = strlen(lit);

        return json_is_string(s) && json_string_length(s) == n && memcmp(json_string_value(s), lit, n) == 0;
}

/* Device ids (and ack ids) as jansson strings: length-checked, so NUL is never an issue. */
static bool json_device_id(const json_t *s) {
        return json_is_string(s) && device_id_is_valid(json_string_value(s), json_string_length(s));
}

/* Command ids of PROTOCOL.md 1 "ack": 1..64 of [A-Za-z0-9._-]. Unlike device ids, a leading '.'
 * is allowed: the contract does not forbid it, and the ids come from the cloud, not the bulb. */
static bool json_ack_id(const json_t *s) {
        const char *v;
        size_t n;

        if (!json_is_string(s))
                return false;
        v = json_string_value(s);
        n = json_string_length(s);
        return n > 0 && n <= DEVICE_ID_MAX && id_chars_are_valid(v, n);
}

/* A JSON integer (not a real: 1.0 and 1e3 are reals to jansson) within [min, max]. Numbers
 * too big for jansson never get here: json_loadb() already failed on them. */
static bool json_integer_in(const json_t *v, json_int_t min, json_int_t max, json_int_t *ret) {
        json_int_t i;

        if (!json_is_integer(v))
                return false;
        i = json_integer_value(v);
        if (i < min || i > max)
                return false;
        *ret = i;
        return true;
}

static bool frame_parse_state(const json_t *o, struct frame_state *s) {
        const json_t *on, *bri, *ct, *xy;
        size_t members = 1;
        json_int_t i;

        if (!json_is_object(o))
                return false;

        on = json_object_get(o, "on");
        if (!json_is_boolean(on))
                return false;
        s->on = json_is_true(on);

        bri = json_object_get(o, "bri");
        if (bri) {
                if (!json_integer_in(bri, FRAME_BRI_MIN, FRAME_BRI_MAX, &i))
                        return false;
                s->bri = (int) i;
                s->has_bri = true;
                members++;
        }

        ct = json_object_get(o, "ct");
        if (ct) {
                if (!json_integer_in(ct, FRAME_CT_MIN, FRAME_CT_MAX, &i))
                        return false;
                s->ct = (int) i;
                s->has_ct = true;
                members++;
        }

        xy = json_object_get(o, "xy");
        if (xy) {
                /* CIE 1931 chromaticity: two numbers, integer or real, each in [0,1]. */
                if (!json_is_array(xy) || json_array_size(xy) != 2)
                        return false;
                for (size_t k = 0; k < 2; k++) {
                        const json_t *c = json_array_get(xy, k);
                        double d;

                        if (!json_is_number(c))
                                return false;
                        d = json_number_value(c);
                        if (!(d >= 0.0 && d <= 1.0))
                                return false;
                        s->xy[k] = d;
                }
                s->has_xy = true;
                members++;
        }

        /* Anything beyond the members found is unknown. */
        return json_object_size(o) == members;
}

static bool frame_parse_ack(const json_t *o, struct frame *f) {
        const json_t *id, *ok, *err;
        size_t members = 2;

        if (!json_is_object(o))
                return false;

        id = json_object_get(o, "id");
        if (!json_ack_id(id))
                return false;
        ok = json_object_get(o, "ok");
        if (!json_is_boolean(ok))
                return false;

        err = json_object_get(o, "err");
        if (err) {
                size_t n;

                /* UTF-8 was checked by the pre-scan and jansson; NUL cannot occur (no
                 * JSON_ALLOW_NUL), so the copy is a proper C string. */
                if (!json_is_string(err))
                        return false;
                n = json_string_length(err);
                if (n > FRAME_ACK_ERR_MAX)
                        return false;
                memcpy(f->ack.err, json_string_value(err), n);
                f->ack.err[n] = '\0';
                f->ack.has_err = true;
                members++;
        }

        if (json_object_size(o) != members)
                return false;

        memcpy(f->ack.id, json_string_value(id), json_string_length(id) + 1);
        f->ack.ok = json_is_true(ok);
        f->has_ack = true;
        return true;
}

/* ---- the frame ---- */

enum frame_reason frame_parse(const uint8_t *buf, size_t len, const char *topic_dev, size_t max_bytes,
                              struct frame *ret) {
        uint8_t scratch_stack[FRAME_SCRATCH_STACK];
        _cleanup_free_ uint8_t *scratch_heap = NULL;
        _cleanup_(json_decrefp) json_t *header = NULL, *payload = NULL;
        const uint8_t *dot1, *dot2, *h, *p, *s;
        size_t h_len, p_len, s_len, hdec_len, pdec_len, scratch_len;
        const json_t *alg, *kid, *typ, *dev, *v;
        uint8_t *scratch;
        bool sig_too_long;
        struct frame f = { 0 };
        size_t members;
        json_int_t i;

        assert(topic_dev);
        assert(ret);

        /* 1. Size, before anything else is looked at. */
        if (max_bytes > FRAME_MAX_BYTES_LIMIT)
                max_bytes = FRAME_MAX_BYTES_LIMIT;
        if (len > max_bytes)
                return FRAME_TOO_LARGE;
        if (!buf || len == 0)
                return FRAME_MALFORMED;

        /* 2. Structure (RFC 7515 7.1): BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(sig).
         * The alphabet has no '.', whitespace or '=', so strict decoding of each part also rejects
         * a third dot, padding, line breaks and trailing bytes. */
        dot1 = memchr(buf, '.', len);
        if (!dot1)
                return FRAME_MALFORMED;
        dot2 = memchr(dot1 + 1, '.', len - (size_t) (dot1 + 1 - buf));
        if (!dot2)
                return FRAME_MALFORMED;
        h = buf;
        h_len = (size_t) (dot1 - buf);
        p = dot1 + 1;
        p_len = (size_t) (dot2 - p);
        s = dot2 + 1;
        s_len = len - (size_t) (s - buf);
        /* Empty parts: no header, no payload, or an unsigned JWS (RFC 7515 A.5). */
        if (h_len == 0 || p_len == 0 || s_len == 0)
                return FRAME_MALFORMED;

        scratch_len = B64URL_DECODED_MAX(h_len) + B64URL_DECODED_MAX(p_len);
        if (scratch_len <= sizeof(scratch_stack))
                scratch = scratch_stack;
        else {
                /* Bounded: len <= FRAME_MAX_BYTES_LIMIT. Out of memory fails closed. */
                scratch_heap = malloc(scratch_len);
                if (!scratch_heap)
                        return FRAME_MALFORMED;
                scratch = scratch_heap;
        }
        if (b64url_decode_raw(h, h_len, scratch, &hdec_len) < 0 ||
            b64url_decode_raw(p, p_len, scratch + hdec_len, &pdec_len) < 0)
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees scratch_heap */
                return FRAME_MALFORMED;

        /* The signature is decoded now too (each byte read once); its length is judged last. */
        sig_too_long = s_len > FRAME_SIG_B64_MAX;
        if (b64url_decode_raw(s, s_len, sig_too_long ? NULL : f.sig, &f.sig_len) < 0)
                return FRAME_MALFORMED;

        /* 3. Protected header: exactly alg, kid, typ (PROTOCOL.md 1). Any other member, crit
         * included (RFC 7515 4.1.11), is rejected, so no extension can change the meaning. */
        header = json_parse_strict(scratch, hdec_len);
        if (!json_is_object(header) || json_object_size(header) != 3)
                return FRAME_MALFORMED;
        alg = json_object_get(header, "alg");
        kid = json_object_get(header, "kid");
        typ = json_object_get(header, "typ");
        /* Compared exactly: the contract fixes the spelling (the media-type leniency of RFC 7515
         * 4.1.9 is not extended to it). */
        if (!json_string_is(typ, "iothub-status"))
                return FRAME_MALFORMED;
        /* Allow-list of algorithms (RFC 8725 3.1): never "none", never HMAC, nothing else. */
        if (json_string_is(alg, "ES256"))
                f.alg = FRAME_ALG_ES256;
        else if (json_string_is(alg, "EdDSA"))
                f.alg = FRAME_ALG_EDDSA;
        else
                return FRAME_MALFORMED;
        if (!json_device_id(kid))
                return FRAME_MALFORMED;
        if (!streq(json_string_value(kid), topic_dev))
                return FRAME_TOPIC_MISMATCH;

        /* 4. Payload. */
        payload = json_parse_strict(scratch + hdec_len, pdec_len);
        if (!json_is_object(payload))
                return FRAME_MALFORMED;

        dev = json_object_get(payload, "dev");
        if (!json_device_id(dev))
                return FRAME_MALFORMED;
        if (!json_equal(dev, kid))
                return FRAME_TOPIC_MISMATCH;
        memcpy(f.dev, json_string_value(dev), json_string_length(dev) + 1);

        if (!json_integer_in(json_object_get(payload, "seq"), 1, FRAME_SEQ_MAX, &i))
                return FRAME_MALFORMED;
        f.seq = i;
        if (!json_integer_in(json_object_get(payload, "iat"), 0, FRAME_IAT_MAX, &i))
                return FRAME_MALFORMED;
        f.iat = i;
        if (!frame_parse_state(json_object_get(payload, "state"), &f.state))
                return FRAME_MALFORMED;
        members = 4;

        v = json_object_get(payload, "ack");
        if (v) {
                if (!frame_parse_ack(v, &f))
                        return FRAME_MALFORMED;
                members++;
        }
        if (json_object_size(payload) != members)
                return FRAME_MALFORMED;

        /* 5. Signature: only its size here, the verifier matches it with the algorithm. */
        if (sig_too_long)
                return FRAME_MALFORMED;

        /* RFC 7515 5.2 step 8: the signing input is the encoded text as received, not a re-encoding. */
        f.signing_input = buf;
        f.signing_input_len = (size_t) (dot2 - buf);

        *ret = f;
        return FRAME_OK;
}
