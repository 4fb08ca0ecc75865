/* SPDX-License-Identifier: MIT */
/* The codec of the hub's binary channels (issue 14): framing and TLV fields over a SOCK_STREAM
 * unix socket, one implementation driven by a table per channel. The tables are
 * include/iothub/signer-proto.h (iothubd/iothub-uplink <-> iothub-signer, iothub-signer(8) "WIRE
 * FORMAT") and include/iothub/uplink-proto.h (iothubd <-> iothub-uplink, iothub-uplink(8) "WIRE
 * FORMAT"). Pure: no I/O, no state.
 *
 * Every message, all integers big-endian:
 *     u32 length of the rest (at most the table's msg_max, at least TLV_HEADER_LEN - 4)
 *     u32 request id (the client's; echoed in the answer)
 *     u16 op (request) or op | TLV_ANSWER (answer)
 *     i16 status (requests: 0; answers: 0 or a negative errno)
 *     fields: u16 tag, u32 length, bytes
 * Each tag at most once; each op has its required and optional tags (one set for the request,
 * one for a successful answer; an answer with a status < 0 has no fields), each tag its own
 * minimum and maximum length and its kind; a table may add checks of the values (its check()).
 * An unknown op or tag, a duplicate, a missing required or a tag the op does not take, a length
 * out of range, a NUL inside a text value, a status on a request or a positive status, trailing
 * bytes, or a value the table's check() refuses: -EBADMSG. Text values are not NUL-terminated on
 * the wire. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "iothub/util.h"

#define TLV_PREFIX_LEN 4       /* the length prefix itself */
#define TLV_HEADER_LEN 12      /* prefix, id, op, status */
#define TLV_FIELD_HEADER_LEN 6 /* tag, length */
#define TLV_ANSWER 0x8000u     /* op | TLV_ANSWER: the answer to op */
#define TLV_TAG_MAX 48         /* a table's tags are 1 .. TLV_TAG_MAX - 1 */
#define TLV_OP_TAGS 8          /* tags of one op's request, or of its answer, at most */

/* T text (no NUL), B bytes, U8 one byte, U64 8 bytes big-endian. */
enum tlv_kind { TLV_KIND_TEXT, TLV_KIND_BYTES, TLV_KIND_U8, TLV_KIND_U64 };

struct tlv_field {
        const uint8_t *data; /* into the decoded buffer; NULL when absent */
        uint32_t len;
        bool present;
};
struct tlv_msg {
        uint32_t id;
        uint16_t op; /* without TLV_ANSWER */
        bool answer;
        int16_t status;
        struct tlv_field f[TLV_TAG_MAX]; /* by tag; f[0] unused */
};

/* ---- a channel's table ---- */
struct tlv_tag {
        const char *name; /* NULL: no such tag */
        enum tlv_kind kind;
        uint32_t min, max; /* bytes */
};
#define TLV_OPTIONAL 1
#define TLV_REQUIRED 2
struct tlv_rule {
        unsigned char tag, rule; /* rule: TLV_OPTIONAL or TLV_REQUIRED; tag 0 ends the list */
};
struct tlv_op {
        const char *name; /* NULL: no such op */
        struct tlv_rule req[TLV_OP_TAGS], ans[TLV_OP_TAGS];
};
struct tlv_proto {
        const struct tlv_tag *tags; /* [n_tags], tags[0] unused */
        unsigned n_tags;            /* at most TLV_TAG_MAX */
        const struct tlv_op *ops;   /* [n_ops], ops[0] unused */
        unsigned n_ops;             /* at most TLV_ANSWER */
        uint32_t msg_max;           /* the u32 length prefix, at most */
        /* Rules on the values that kinds and lengths do not say (which values a u8 takes, a field
         * that one value of another requires), run on a message that passed every rule above.
         * 0 or -EBADMSG. NULL: none. */
        int (*check)(const struct tlv_msg *m);
};

/* The name of an op or tag, NULL when unknown. */
const char *tlv_op_to_string(const struct tlv_proto *p, unsigned op);
const char *tlv_tag_to_string(const struct tlv_proto *p, unsigned tag);
/* A tag's kind and length range; -EINVAL for an unknown tag. */
int tlv_tag_limits(const struct tlv_proto *p, unsigned tag, enum tlv_kind *ret_kind, uint32_t *ret_min,
                   uint32_t *ret_max);
/* Whether a tag may or must appear in a request of op (answer false) or its successful answer
 * (answer true): 0 no, TLV_OPTIONAL, TLV_REQUIRED. */
int tlv_tag_rule(const struct tlv_proto *p, unsigned op, bool answer, unsigned tag);

/* ---- framing a stream ----
 * Looks at the start of buf (len bytes received so far). Returns 1 and *ret_need = the size of
 * the complete first message (prefix included) when it is all in buf; 0 when more bytes are
 * needed (*ret_need: how many in total are known to be needed, TLV_PREFIX_LEN while the
 * prefix is incomplete); -EBADMSG when the prefix is out of range (the stream cannot be framed
 * any more: close it). */
int tlv_msg_frame(const struct tlv_proto *p, const uint8_t *buf, size_t len, size_t *ret_need);
/* The request id of a message whose header is in buf (len >= TLV_HEADER_LEN), for the -EBADMSG
 * answer to a message that did not decode. 0 or -EBADMSG. */
int tlv_msg_peek_id(const uint8_t *buf, size_t len, uint32_t *ret_id);

/* ---- decoding ----
 * Decodes exactly one complete message (prefix included, len bytes, as tlv_msg_frame() cut it)
 * against every rule above. Returns 0 and *ret (pointing into buf: valid while buf is), or
 * -EBADMSG. */
int tlv_msg_decode(const struct tlv_proto *p, const uint8_t *buf, size_t len, struct tlv_msg *ret);
bool tlv_msg_has(const struct tlv_msg *m, unsigned tag);
/* A text field as a malloc'ed NUL-terminated copy. -ENOENT absent, -ENOMEM. */
int tlv_msg_strdup(const struct tlv_msg *m, unsigned tag, char **ret);
/* A U64 or U8 field. -ENOENT absent. */
int tlv_msg_u64(const struct tlv_msg *m, unsigned tag, uint64_t *ret);
int tlv_msg_u8(const struct tlv_msg *m, unsigned tag, uint8_t *ret);

/* ---- encoding ----
 * A growing buffer of whole messages of one channel (several may be queued on one connection):
 * begin() starts one at the end, add*() append fields, end() writes its length and checks the
 * message with tlv_msg_decode() (so nothing the other side would refuse is ever sent: on failure
 * the message is dropped and -EINVAL returned). After a failed add*() the message is dropped by
 * end() too, which returns that first error. tlv_buf_consume() removes bytes sent from the
 * front; tlv_buf_done() wipes (messages carry tokens) and frees. begin() takes an op of the
 * table, except for an error answer (status < 0), which may echo any op a peer sent (0 when its
 * header was unreadable) and then carries no field. */
struct tlv_buf {
        uint8_t *data;
        size_t len, cap;
        size_t start; /* of the message being built */
        bool open;
        int error;    /* first error since begin() */
        const struct tlv_proto *proto; /* of the message being built */
};
int tlv_msg_begin(struct tlv_buf *b, const struct tlv_proto *p, uint32_t id, unsigned op, bool answer, int status);
int tlv_msg_add(struct tlv_buf *b, unsigned tag, const void *data, size_t len);
int tlv_msg_add_str(struct tlv_buf *b, unsigned tag, const char *s);
int tlv_msg_add_u64(struct tlv_buf *b, unsigned tag, uint64_t v);
int tlv_msg_add_u8(struct tlv_buf *b, unsigned tag, uint8_t v);
int tlv_msg_end(struct tlv_buf *b);
void tlv_buf_consume(struct tlv_buf *b, size_t n);
void tlv_buf_done(struct tlv_buf *b);
