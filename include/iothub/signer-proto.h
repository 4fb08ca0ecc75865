/* SPDX-License-Identifier: MIT */
/* The channel between iothubd (or iothub-uplink) and iothub-signer (issue 14; iothub-signer(8)
 * "WIRE FORMAT"): the channels' binary format (include/iothub/tlv.h: framing, fields, and every
 * rule of decoding) with this channel's table. This header is the normative list of its ops, tags
 * and limits, and names the codec's types and functions for the signer's callers. Pure: no I/O,
 * no state. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "iothub/tlv.h"

#define SIGNER_MSG_MAX (1024u * 1024u + 64u * 1024u) /* the u32 length prefix, at most */
#define SIGNER_PREFIX_LEN TLV_PREFIX_LEN
#define SIGNER_HEADER_LEN TLV_HEADER_LEN
#define SIGNER_FIELD_HEADER_LEN TLV_FIELD_HEADER_LEN
#define SIGNER_ANSWER TLV_ANSWER

enum signer_opcode {
        SIGNER_OP_KEY_INFO = 1,
        SIGNER_OP_SIGN_HTTP = 2,
        SIGNER_OP_SIGN_DPOP = 3,
        SIGNER_OP_SIGN_COMMAND = 4,
        SIGNER_OP_TOKENS_GET = 5,
        SIGNER_OP_TOKENS_PUT = 6,
        SIGNER_OP_TOKENS_ERASE = 7,
        SIGNER_OP_ATTEST_BEGIN = 8,
        SIGNER_OP_ATTEST_ANSWER = 9,
        SIGNER_OP_STATUS = 10,
        /* The client no longer waits for its request of the same id (its timeout passed, or its
         * owner cancelled it). A signature still queued for the TPM leaves the queue unsigned and
         * that request is answered -ECANCELED, which the client drops; one already at the TPM
         * finishes and is answered as usual. The other ops are never ended by it (iothub-signer(8),
         * CANCEL). No fields; never answered itself; an id with no request out is ignored. */
        SIGNER_OP_CANCEL = 11,
        _SIGNER_OP_MAX,
};

/* One tag space for requests and answers. Kinds: T text (no NUL), B bytes, U8 one byte, U64 8
 * bytes big-endian. [min..max] bytes. */
enum signer_tag {
        SIGNER_TAG_KEY_ID = 1,           /* T [43..43] RFC 7638 thumbprint, base64url */
        SIGNER_TAG_JWK = 2,              /* T [1..1024] the public JWK, JSON */
        SIGNER_TAG_BACKEND = 3,          /* T [1..8] "tpm" or "file" */
        SIGNER_TAG_METHOD = 4,           /* T [1..8] GET, POST or PUT (the policy checks which) */
        SIGNER_TAG_TARGET_URI = 5,       /* T [1..2048] */
        SIGNER_TAG_AUTHORIZATION = 6,    /* T [1..8192] the whole header value, "Bearer x"; required in SIGN_HTTP
                                          * (PROTOCOL.md 3: every request has one, signed) */
        SIGNER_TAG_BODY = 7,             /* B [0..1 MiB] */
        SIGNER_TAG_PRIO = 8,             /* U8 0 high, 1 low (enum signer_prio); SIGN_HTTP's required,
                                          * SIGN_DPOP's optional (absent: high). SIGN_COMMAND has none:
                                          * it goes before both (hubkey.h HUBKEY_PRIO_COMMAND). */
        /* SIGN_HTTP's answer: whole header lines as httpsig.c makes them (struct httpsig_headers),
         * name included, ready for curl_slist_append(). */
        SIGNER_TAG_CONTENT_DIGEST = 9,   /* T [1..256] "Content-Digest: sha-256=:...:" */
        SIGNER_TAG_SIGNATURE_INPUT = 10, /* T [1..1024] "Signature-Input: hub=(...);..." */
        SIGNER_TAG_SIGNATURE = 11,       /* T [1..256] "Signature: hub=:...:" */
        SIGNER_TAG_URL = 12,             /* T [1..2048] */
        SIGNER_TAG_ATH = 13,             /* T [43..43] base64url SHA-256 of the access token */
        SIGNER_TAG_NONCE = 14,           /* T [1..512] the server's DPoP-Nonce */
        SIGNER_TAG_PROOF = 15,           /* T [1..8192] the DPoP JWT */
        SIGNER_TAG_DEV = 16,             /* T [1..64] */
        SIGNER_TAG_CMD_ID = 17,          /* T [1..64] */
        SIGNER_TAG_IAT = 18,             /* U64 Unix seconds */
        SIGNER_TAG_EXP = 19,             /* U64 Unix seconds */
        SIGNER_TAG_SET = 20,             /* T [2..4096] a JSON object */
        SIGNER_TAG_CLOUD_JWS = 21,       /* T [1..8192] the vendor's JWS of the command */
        SIGNER_TAG_JWS = 22,             /* T [1..24576] the command JWS */
        SIGNER_TAG_ACCESS_TOKEN = 23,    /* T [1..4096] */
        SIGNER_TAG_REFRESH_TOKEN = 24,   /* T [1..4096] */
        SIGNER_TAG_TOKEN_TYPE = 25,      /* T [1..16] */
        SIGNER_TAG_SCOPE = 26,           /* T [1..1024] */
        SIGNER_TAG_EXPIRES_AT = 27,      /* U64 Unix seconds, 0 unknown */
        SIGNER_TAG_EVIDENCE = 28,        /* T [2..16384] JSON object */
        SIGNER_TAG_CHALLENGE = 29,       /* T [1..16384] the cloud's challenge body */
        SIGNER_TAG_ANSWER = 30,          /* T [2..16384] JSON object */
        SIGNER_TAG_SIGNATURES = 31,      /* U64 STATUS counters from here */
        SIGNER_TAG_REFUSED_POLICY = 32,  /* U64 */
        SIGNER_TAG_REFUSED_RATE = 33,    /* U64 */
        SIGNER_TAG_REFUSED_PEER = 34,    /* U64 */
        SIGNER_TAG_MALFORMED = 35,       /* U64 */
        SIGNER_TAG_TPM_ERRORS = 36,      /* U64 */
        SIGNER_TAG_LAST_ERROR = 37,      /* T [1..256] no secret */
        SIGNER_TAG_CANCELLED = 38,       /* U64 queued signatures ended by CANCEL; optional in STATUS's
                                          * answer, so that a client reads an older signer's */
        _SIGNER_TAG_MAX,
};

enum signer_kind {
        SIGNER_KIND_TEXT = TLV_KIND_TEXT,
        SIGNER_KIND_BYTES = TLV_KIND_BYTES,
        SIGNER_KIND_U8 = TLV_KIND_U8,
        SIGNER_KIND_U64 = TLV_KIND_U64,
};
_Static_assert(_SIGNER_TAG_MAX <= TLV_TAG_MAX, "the signer's tags fit struct tlv_msg");

/* The table (src/signer-proto.c). */
extern const struct tlv_proto signer_proto;

/* The name of an op or tag ("SIGN_HTTP", "TARGET_URI"), NULL when unknown. */
const char *signer_op_to_string(unsigned op);
const char *signer_tag_to_string(unsigned tag);
/* A tag's kind and length range; -EINVAL for an unknown tag. */
int signer_tag_limits(unsigned tag, enum signer_kind *ret_kind, uint32_t *ret_min, uint32_t *ret_max);
/* Whether a tag may or must appear in a request of op (answer false) or its successful answer
 * (answer true): 0 no, 1 optional, 2 required. */
int signer_tag_rule(unsigned op, bool answer, unsigned tag);

/* SIGNER_TAG_PRIO's values (signer.h's enum signer_prio has the same). */
#define SIGNER_WIRE_PRIO_HIGH 0
#define SIGNER_WIRE_PRIO_LOW 1

/* The codec's functions with this table (include/iothub/tlv.h says what each does). */
int signer_msg_frame(const uint8_t *buf, size_t len, size_t *ret_need);
static inline int signer_msg_peek_id(const uint8_t *buf, size_t len, uint32_t *ret_id) {
        return tlv_msg_peek_id(buf, len, ret_id);
}

/* The codec's types under the names the signer's callers use: a decoded message of this channel
 * (its f[] indexed by enum signer_tag) and a buffer of encoded ones. */
#define signer_field tlv_field
#define signer_msg tlv_msg
#define signer_buf tlv_buf

int signer_msg_decode(const uint8_t *buf, size_t len, struct signer_msg *ret);
static inline bool signer_msg_has(const struct signer_msg *m, unsigned tag) {
        return tlv_msg_has(m, tag);
}
static inline int signer_msg_strdup(const struct signer_msg *m, unsigned tag, char **ret) {
        return tlv_msg_strdup(m, tag, ret);
}
static inline int signer_msg_u64(const struct signer_msg *m, unsigned tag, uint64_t *ret) {
        return tlv_msg_u64(m, tag, ret);
}
static inline int signer_msg_u8(const struct signer_msg *m, unsigned tag, uint8_t *ret) {
        return tlv_msg_u8(m, tag, ret);
}

int signer_msg_begin(struct signer_buf *b, uint32_t id, unsigned op, bool answer, int status);
static inline int signer_msg_add(struct signer_buf *b, unsigned tag, const void *data, size_t len) {
        return tlv_msg_add(b, tag, data, len);
}
static inline int signer_msg_add_str(struct signer_buf *b, unsigned tag, const char *s) {
        return tlv_msg_add_str(b, tag, s);
}
static inline int signer_msg_add_u64(struct signer_buf *b, unsigned tag, uint64_t v) {
        return tlv_msg_add_u64(b, tag, v);
}
static inline int signer_msg_add_u8(struct signer_buf *b, unsigned tag, uint8_t v) {
        return tlv_msg_add_u8(b, tag, v);
}
static inline int signer_msg_end(struct signer_buf *b) {
        return tlv_msg_end(b);
}
static inline void signer_buf_consume(struct signer_buf *b, size_t n) {
        tlv_buf_consume(b, n);
}
static inline void signer_buf_done(struct signer_buf *b) {
        tlv_buf_done(b);
}
