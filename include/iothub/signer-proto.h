/* SPDX-License-Identifier: MIT */
/* The channel between iothubd and iothub-signer (issue 14; iothub-signer(8) "WIRE FORMAT"): a
 * fixed binary format over a SOCK_STREAM unix socket, encoded and decoded here for both sides.
 * This header is the normative list of ops, tags and limits. Pure: no I/O, no state.
 *
 * Every message, all integers big-endian:
 *     u32 length of the rest (at most SIGNER_MSG_MAX, at least SIGNER_HEADER_LEN - 4)
 *     u32 request id (the client's; echoed in the answer)
 *     u16 op (request) or op | SIGNER_ANSWER (answer)
 *     i16 status (requests: 0; answers: 0 or a negative errno)
 *     fields: u16 tag, u32 length, bytes
 * Each tag at most once; each op has its required and optional tags (one set for the request,
 * one for a successful answer; an answer with a status < 0 has no fields), each tag its own
 * minimum and maximum length and its kind. An unknown op or tag, a duplicate, a missing required
 * or a tag the op does not take, a length out of range, a NUL inside a text value, a status on a
 * request or a positive status, or trailing bytes: -EBADMSG. Text values are not NUL-terminated
 * on the wire. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "iothub/util.h"

#define SIGNER_MSG_MAX (1024u * 1024u + 64u * 1024u) /* the u32 length prefix, at most */
#define SIGNER_PREFIX_LEN 4                          /* the length prefix itself */
#define SIGNER_HEADER_LEN 12                         /* prefix, id, op, status */
#define SIGNER_FIELD_HEADER_LEN 6                    /* tag, length */
#define SIGNER_ANSWER 0x8000u                        /* op | SIGNER_ANSWER: the answer to op */

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
        SIGNER_TAG_PRIO = 8,             /* U8 0 high, 1 low (hubkey.h enum hubkey_prio) */
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
        _SIGNER_TAG_MAX,
};

enum signer_kind { SIGNER_KIND_TEXT, SIGNER_KIND_BYTES, SIGNER_KIND_U8, SIGNER_KIND_U64 };

/* The name of an op or tag ("SIGN_HTTP", "TARGET_URI"), NULL when unknown. */
const char *signer_op_to_string(unsigned op);
const char *signer_tag_to_string(unsigned tag);
/* A tag's kind and length range; -EINVAL for an unknown tag. */
int signer_tag_limits(unsigned tag, enum signer_kind *ret_kind, uint32_t *ret_min, uint32_t *ret_max);
/* Whether a tag may or must appear in a request of op (answer false) or its successful answer
 * (answer true): 0 no, 1 optional, 2 required. */
int signer_tag_rule(unsigned op, bool answer, unsigned tag);

/* ---- framing a stream ----
 * Looks at the start of buf (len bytes received so far). Returns 1 and *ret_need = the size of
 * the complete first message (prefix included) when it is all in buf; 0 when more bytes are
 * needed (*ret_need: how many in total are known to be needed, SIGNER_PREFIX_LEN while the
 * prefix is incomplete); -EBADMSG when the prefix is out of range (the stream cannot be framed
 * any more: close it). */
int signer_msg_frame(const uint8_t *buf, size_t len, size_t *ret_need);
/* The request id of a message whose header is in buf (len >= SIGNER_HEADER_LEN), for the
 * -EBADMSG answer to a message that did not decode. 0 or -EBADMSG. */
int signer_msg_peek_id(const uint8_t *buf, size_t len, uint32_t *ret_id);

/* ---- decoding ---- */
struct signer_field {
        const uint8_t *data; /* into the decoded buffer; NULL when absent */
        uint32_t len;
        bool present;
};
struct signer_msg {
        uint32_t id;
        uint16_t op; /* without SIGNER_ANSWER */
        bool answer;
        int16_t status;
        struct signer_field f[_SIGNER_TAG_MAX]; /* by tag; f[0] unused */
};
/* Decodes exactly one complete message (prefix included, len bytes, as signer_msg_frame() cut
 * it) against every rule above. Returns 0 and *ret (pointing into buf: valid while buf is), or
 * -EBADMSG. */
int signer_msg_decode(const uint8_t *buf, size_t len, struct signer_msg *ret);
bool signer_msg_has(const struct signer_msg *m, unsigned tag);
/* A text field as a malloc'ed NUL-terminated copy. -ENOENT absent, -ENOMEM. */
int signer_msg_strdup(const struct signer_msg *m, unsigned tag, char **ret);
/* A U64 or U8 field. -ENOENT absent. */
int signer_msg_u64(const struct signer_msg *m, unsigned tag, uint64_t *ret);
int signer_msg_u8(const struct signer_msg *m, unsigned tag, uint8_t *ret);

/* ---- encoding ----
 * A growing buffer of whole messages (several may be queued on one connection): begin() starts
 * one at the end, add*() append fields, end() writes its length and checks the message with
 * signer_msg_decode() (so nothing the other side would refuse is ever sent: on failure the
 * message is dropped and -EINVAL returned). After a failed add*() the message is dropped by
 * end() too, which returns that first error. signer_buf_consume() removes bytes sent from the
 * front; signer_buf_done() wipes (answers carry tokens) and frees. */
struct signer_buf {
        uint8_t *data;
        size_t len, cap;
        size_t start; /* of the message being built */
        bool open;
        int error;    /* first error since begin() */
};
int signer_msg_begin(struct signer_buf *b, uint32_t id, unsigned op, bool answer, int status);
int signer_msg_add(struct signer_buf *b, unsigned tag, const void *data, size_t len);
int signer_msg_add_str(struct signer_buf *b, unsigned tag, const char *s);
int signer_msg_add_u64(struct signer_buf *b, unsigned tag, uint64_t v);
int signer_msg_add_u8(struct signer_buf *b, unsigned tag, uint8_t v);
int signer_msg_end(struct signer_buf *b);
void signer_buf_consume(struct signer_buf *b, size_t n);
void signer_buf_done(struct signer_buf *b);
