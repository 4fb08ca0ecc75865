/* SPDX-License-Identifier: MIT */
/* Status frames of PROTOCOL.md section 1: a pure parser and checker, no I/O, fuzzed.
 * frame_parse() checks everything that needs no state (size, topic, JWS structure, header,
 * payload schema, kid/dev/topic agreement). The stateful checks (registry, rate, iat, seq,
 * signature) are the caller's, in the order documented in iothub-protocol(7). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "iothub/util.h"

/* Rejection reasons, names used in counters, logs and status (PROTOCOL.md 1). */
enum frame_reason {
        FRAME_OK = 0,
        FRAME_TOO_LARGE,
        FRAME_MALFORMED,
        FRAME_UNKNOWN_DEVICE,
        FRAME_REVOKED,
        FRAME_BAD_SIGNATURE,
        FRAME_REPLAY,
        FRAME_STALE,
        FRAME_RATE_LIMITED,
        FRAME_TOPIC_MISMATCH,
        _FRAME_REASON_MAX,
};
/* "too_large", "malformed", ...; NULL for FRAME_OK or out of range. */
const char *frame_reason_to_string(enum frame_reason r);

enum frame_alg { FRAME_ALG_ES256, FRAME_ALG_EDDSA };
const char *frame_alg_to_string(enum frame_alg a);

/* Named limits. */
#define FRAME_MAX_BYTES_LIMIT 65536 /* the highest [frames] max_bytes accepted */
#define FRAME_SIG_MAX 132           /* longest decoded signature kept; longer is malformed */
#define FRAME_MAX_DEPTH 3           /* JSON nesting: payload -> state -> xy */
#define FRAME_ACK_ERR_MAX 128
#define FRAME_SEQ_MAX 9007199254740991LL /* 2^53-1 */

struct frame_state {
        bool on;
        bool has_bri, has_ct, has_xy;
        int bri;      /* 0..254 */
        int ct;       /* 153..500 */
        double xy[2]; /* each in [0,1] */
};

struct frame {
        char dev[DEVICE_ID_MAX + 1];
        enum frame_alg alg;
        /* The JWS signing input "<b64 header>.<b64 payload>": points into the caller's buffer. */
        const uint8_t *signing_input;
        size_t signing_input_len;
        uint8_t sig[FRAME_SIG_MAX];
        size_t sig_len; /* as decoded; the verifier checks it against the algorithm */
        int64_t seq;    /* 1 .. 2^53-1 */
        int64_t iat;
        struct frame_state state;
        bool has_ack;
        struct {
                char id[DEVICE_ID_MAX + 1];
                bool ok;
                bool has_err;
                char err[FRAME_ACK_ERR_MAX + 1];
        } ack;
};

/* Splits "<prefix>/<device-id>/status" and checks the device id. Returns 0 and copies the
 * id into ret_dev (DEVICE_ID_MAX+1 bytes), or -EINVAL. */
int frame_topic_device(const char *topic, const char *prefix, const char *suffix, char *ret_dev);

/* Parses and checks one frame received on the topic of device 'topic_dev'.
 * Returns FRAME_OK and fills *ret, or the reason it is rejected (FRAME_TOO_LARGE,
 * FRAME_MALFORMED, FRAME_TOPIC_MISMATCH) and leaves *ret unspecified. */
enum frame_reason frame_parse(const uint8_t *buf, size_t len, const char *topic_dev, size_t max_bytes,
                              struct frame *ret);

/* The same checks and result as frame_parse() without its fast paths for the usual header and
 * payload texts (jansson for every frame): what the tests compare frame_parse() with. */
enum frame_reason frame_parse_reference(const uint8_t *buf, size_t len, const char *topic_dev, size_t max_bytes,
                                        struct frame *ret);

/* base64url without padding (RFC 7515 2, RFC 4648 5), strict: rejects padding, characters
 * outside the alphabet and non-zero trailing bits. Returns the decoded length, or -EINVAL,
 * or -ENOBUFS when it would exceed 'cap'. */
ssize_t b64url_decode(const char *in, size_t len, uint8_t *out, size_t cap);
/* Encodes into out (needs B64URL_BUF(len) bytes, util.h), NUL-terminated, no padding. Returns
 * the length. */
size_t b64url_encode(const uint8_t *in, size_t len, char *out);
