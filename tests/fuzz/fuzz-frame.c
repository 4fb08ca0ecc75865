/* SPDX-License-Identifier: MIT */
/* libFuzzer target for the status-frame parser (src/frame.c, PROTOCOL.md 1). The input is what a
 * bulb, or anyone on the broker, publishes: raw JWS Compact bytes. frame_parse() runs on every
 * input; what it accepts must satisfy the invariants the verifier and the spool rely on.
 *
 * The JSON inside is base64url-encoded and jansson is not instrumented, so byte mutations of the
 * raw input rarely produce new JSON. A custom mutator therefore also decodes the header, payload
 * or signature, mutates the decoded bytes (where the JSON tokens of frame.dict apply) and encodes
 * them again. The corpus stays raw JWS, so the plain driver (driver.c) replays it as is. */
#include <stdio.h>
#include <stdlib.h>

#include "iothub/frame.h"
#include "check.h"

#define FUZZ_TOPIC_DEV "bulb-1"
#define FUZZ_MAX_BYTES 4096 /* the default [frames] max_bytes */
#define FUZZ_TOPIC_PREFIX "iothub/v1/bulbs"
#define FUZZ_TOPIC_MAX 256
#define FUZZ_MUTATE_MAX 65536 /* larger inputs are mutated as raw bytes only */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed);
/* Provided by libFuzzer; weak so that the gcc build with driver.c links (and never calls it). */
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size) __attribute__((weak));


static bool id_chars_valid(const char *s) {
        size_t n = strlen(s);

        if (n < 1 || n > DEVICE_ID_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-", s[i]))
                        return false;
        return true;
}

static void check_accepted(const uint8_t *data, size_t size, size_t max_bytes, const struct frame *f) {
        static char sig_text[4 * FRAME_SIG_MAX / 3 + 4];
        const uint8_t *dot1;
        size_t n;
        struct frame again;

        CHECK(size <= max_bytes);

        /* The signing input is the first two parts of the caller's buffer, as received. */
        CHECK(f->signing_input == data);
        CHECK(f->signing_input_len > 2 && f->signing_input_len < size - 1);
        CHECK(data[f->signing_input_len] == '.');
        dot1 = memchr(data, '.', f->signing_input_len);
        CHECK(dot1 && dot1 > data);
        CHECK(!memchr(dot1 + 1, '.', f->signing_input_len - (size_t) (dot1 + 1 - data)));

        /* The signature is the third part, decoded canonically: encoding it gives the text back. */
        CHECK(f->sig_len >= 1 && f->sig_len <= FRAME_SIG_MAX);
        n = b64url_encode(f->sig, f->sig_len, sig_text);
        CHECK(n == size - f->signing_input_len - 1);
        CHECK(memcmp(sig_text, data + f->signing_input_len + 1, n) == 0);

        CHECK(frame_alg_to_string(f->alg));
        CHECK(streq(f->dev, FUZZ_TOPIC_DEV));
        CHECK(f->seq >= 1 && f->seq <= FRAME_SEQ_MAX);
        CHECK(f->iat >= 0 && f->iat <= FRAME_SEQ_MAX);
        CHECK(!f->state.has_bri || (f->state.bri >= 0 && f->state.bri <= 254));
        CHECK(!f->state.has_ct || (f->state.ct >= 153 && f->state.ct <= 500));
        for (size_t i = 0; f->state.has_xy && i < 2; i++)
                CHECK(f->state.xy[i] >= 0.0 && f->state.xy[i] <= 1.0);
        if (f->has_ack) {
                CHECK(id_chars_valid(f->ack.id));
                CHECK(!f->ack.has_err || strlen(f->ack.err) <= FRAME_ACK_ERR_MAX);
        }

        /* The same bytes, one byte smaller a limit or on another device's topic, are rejected for
         * exactly that reason: size comes first, and kid is bound to the topic. */
        CHECK(frame_parse(data, size, FUZZ_TOPIC_DEV, size - 1, &again) == FRAME_TOO_LARGE);
        CHECK(frame_parse(data, size, "bulb-2", max_bytes, &again) == FRAME_TOPIC_MISMATCH);
        CHECK(frame_parse(data, size, FUZZ_TOPIC_DEV, max_bytes, &again) == FRAME_OK);
        CHECK(again.seq == f->seq && again.sig_len == f->sig_len);
}

/* frame_parse()'s fast paths for the usual header and payload texts decide nothing of their own:
 * the parser without them (frame_parse_reference(), jansson for every frame) gives the same
 * reason, and on success the same frame. */
static void check_reference(const uint8_t *data, size_t size, size_t max_bytes, enum frame_reason r,
                            const struct frame *f) {
        struct frame g;

        CHECK(frame_parse_reference(data, size, FUZZ_TOPIC_DEV, max_bytes, &g) == r);
        if (r != FRAME_OK)
                return;
        CHECK(streq(f->dev, g.dev) && f->alg == g.alg && f->signing_input == g.signing_input &&
              f->signing_input_len == g.signing_input_len && f->sig_len == g.sig_len &&
              memcmp(f->sig, g.sig, f->sig_len) == 0 && f->seq == g.seq && f->iat == g.iat);
        CHECK(f->state.on == g.state.on && f->state.has_bri == g.state.has_bri &&
              f->state.has_ct == g.state.has_ct && f->state.has_xy == g.state.has_xy);
        CHECK(!f->state.has_bri || f->state.bri == g.state.bri);
        CHECK(!f->state.has_ct || f->state.ct == g.state.ct);
        CHECK(!f->state.has_xy || memcmp(f->state.xy, g.state.xy, sizeof f->state.xy) == 0);
        CHECK(f->has_ack == g.has_ack);
        CHECK(!f->has_ack || (streq(f->ack.id, g.ack.id) && f->ack.ok == g.ack.ok &&
                              f->ack.has_err == g.ack.has_err && (!f->ack.has_err || streq(f->ack.err, g.ack.err))));
}

/* Strict base64url has exactly one text per byte string: whatever decodes, re-encodes to itself. */
static void check_b64url(const uint8_t *data, size_t size) {
        static uint8_t dec[FUZZ_MAX_BYTES];
        static char enc[FUZZ_MAX_BYTES * 4 / 3 + 4];
        ssize_t n;

        if (size > FUZZ_MAX_BYTES)
                return;
        n = b64url_decode((const char *) data, size, dec, sizeof(dec));
        CHECK(n >= 0 || n == -EINVAL); /* never -ENOBUFS: dec holds 3/4 of any input */
        if (n < 0)
                return;
        CHECK((size_t) n == size / 4 * 3 + (size % 4 ? size % 4 - 1 : 0));
        CHECK(b64url_encode(dec, (size_t) n, enc) == size);
        CHECK(memcmp(enc, data, size) == 0);
        if (n > 0)
                CHECK(b64url_decode((const char *) data, size, dec, (size_t) n - 1) == -ENOBUFS);
}

/* The same input as an MQTT topic: what frame_topic_device() accepts rebuilds the topic. */
static void check_topic(const uint8_t *data, size_t size) {
        char topic[FUZZ_TOPIC_MAX + 1], dev[DEVICE_ID_MAX + 1], rebuilt[FUZZ_TOPIC_MAX + 1];

        if (size > FUZZ_TOPIC_MAX || memchr(data, '\0', size))
                return;
        memcpy(topic, data, size);
        topic[size] = '\0';
        if (frame_topic_device(topic, FUZZ_TOPIC_PREFIX, "status", dev) < 0)
                return;
        CHECK(device_id_is_valid(dev, strlen(dev)));
        CHECK(snprintf(rebuilt, sizeof(rebuilt), "%s/%s/status", FUZZ_TOPIC_PREFIX, dev) == (int) size);
        CHECK(streq(rebuilt, topic));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct frame f;
        enum frame_reason r;

        r = frame_parse(data, size, FUZZ_TOPIC_DEV, FUZZ_MAX_BYTES, &f);
        CHECK(r == FRAME_OK || r == FRAME_TOO_LARGE || r == FRAME_MALFORMED || r == FRAME_TOPIC_MISMATCH);
        CHECK((r == FRAME_TOO_LARGE) == (size > FUZZ_MAX_BYTES));
        CHECK(r == FRAME_OK || frame_reason_to_string(r));
        check_reference(data, size, FUZZ_MAX_BYTES, r, &f);
        if (r == FRAME_OK)
                check_accepted(data, size, FUZZ_MAX_BYTES, &f);

        /* Above the default limit, parse again under the highest one: frames that large take the
         * heap path for their decoded parts instead of the stack buffer. */
        if (r == FRAME_TOO_LARGE) {
                r = frame_parse(data, size, FUZZ_TOPIC_DEV, FRAME_MAX_BYTES_LIMIT, &f);
                CHECK(r != FRAME_TOO_LARGE || size > FRAME_MAX_BYTES_LIMIT);
                if (r == FRAME_OK)
                        check_accepted(data, size, FRAME_MAX_BYTES_LIMIT, &f);
        }

        check_b64url(data, size);
        check_topic(data, size);
        return 0;
}

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
        static uint8_t dec[FUZZ_MUTATE_MAX];
        static char out[FUZZ_MUTATE_MAX + 4];
        const uint8_t *dot1, *dot2, *part;
        size_t part_len, before, after, room, n;
        ssize_t d;
        char *p;

        /* One time in four, or whenever the input is not three dot-separated parts, mutate the raw
         * bytes: that is where structure bugs (dots, padding, alphabet) live. */
        if (seed % 4 == 0 || size == 0 || max_size > FUZZ_MUTATE_MAX)
                return LLVMFuzzerMutate(data, size, max_size);
        dot1 = memchr(data, '.', size);
        dot2 = dot1 ? memchr(dot1 + 1, '.', size - (size_t) (dot1 + 1 - data)) : NULL;
        if (!dot2)
                return LLVMFuzzerMutate(data, size, max_size);

        /* Mostly the payload, which has the most schema; then the header; rarely the signature. */
        switch ((seed / 4) % 8) {
        case 0:
        case 1:
        case 2:
                part = data;
                part_len = (size_t) (dot1 - data);
                break;
        case 7:
                part = dot2 + 1;
                part_len = size - (size_t) (part - data);
                break;
        default:
                part = dot1 + 1;
                part_len = (size_t) (dot2 - part);
        }
        d = b64url_decode((const char *) part, part_len, dec, sizeof(dec));
        if (d < 0)
                return LLVMFuzzerMutate(data, size, max_size);

        /* Room for the encoded part once the rest of the frame is in place. */
        before = (size_t) (part - data);
        after = size - before - part_len;
        if (max_size < before + after + 4)
                return LLVMFuzzerMutate(data, size, max_size);
        room = (max_size - before - after) / 4 * 3;
        if (room > sizeof(dec))
                room = sizeof(dec);
        n = LLVMFuzzerMutate(dec, (size_t) d, room);

        p = out;
        memcpy(p, data, before);
        p += before;
        p += b64url_encode(dec, n, p);
        memcpy(p, part + part_len, after);
        p += after;
        if ((size_t) (p - out) > max_size)
                return LLVMFuzzerMutate(data, size, max_size);
        memcpy(data, out, (size_t) (p - out));
        return (size_t) (p - out);
}
