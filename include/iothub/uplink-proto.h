/* SPDX-License-Identifier: MIT */
/* The channel between iothubd and iothub-uplink (issue 14, stage 2; iothub-uplink(8) "WIRE
 * FORMAT"): the channels' binary format (include/iothub/tlv.h: framing, fields, and every rule of
 * decoding) with this channel's table, on /run/iothub-uplink/uplink.sock. This header is the
 * normative list of its ops, tags and limits. iothubd says WHAT goes up (a kind of request and
 * its body); the uplink alone builds the method and URL (uplink_request_target()), authorizes
 * and signs: iothubd never sends a URL, a method or a header. Pure: no I/O, no state.
 *
 * Decoding also refuses (-EBADMSG), beyond tlv.h's rules: a KIND outside enum uplink_kind; an
 * ARG on a kind that takes none, or none on one that needs it (COMMANDS_POLL: 1..3 digits,
 * the wait in seconds; COMMAND_RESULT: a command id as command_id_is_valid() takes it); a BODY
 * on COMMANDS_POLL (a GET) or none on the other kinds; a TIMEOUT above UPLINK_TIMEOUT_MAX_S; an
 * HTTP_STATUS outside 100..599. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "iothub/tlv.h"

#define UPLINK_MSG_MAX (1024u * 1024u + 64u * 1024u) /* the u32 length prefix, at most: a body and its fields */
#define UPLINK_BODY_MAX (1024u * 1024u)               /* a request's or an answer's BODY */
#define UPLINK_TIMEOUT_MAX_S 3600                     /* REQUEST's TIMEOUT, at most */
#define UPLINK_POLL_WAIT_DIGITS 3                     /* COMMANDS_POLL's ARG: 1..3 digits */
#define UPLINK_URL_MAX 2048                           /* a request's URL, at most (the signer's SIGNER_URL_MAX) */

enum uplink_opcode {
        UPLINK_OP_REQUEST = 1,     /* one of the cloud requests of PROTOCOL.md 3 and 5 */
        UPLINK_OP_REGISTER = 2,    /* POST /v1/hubs/{id}, with attestation first when configured */
        UPLINK_OP_LOGIN_START = 3, /* OAuth device authorization (RFC 8628 3.1, 3.2) */
        UPLINK_OP_LOGIN_WAIT = 4,  /* answered when the login ends; cancelled with the connection */
        UPLINK_OP_LOGOUT = 5,
        UPLINK_OP_STATUS = 6,      /* the uplink's part of `iothubctl status --json` */
        UPLINK_OP_WATCH = 7,       /* long poll: answered when the event generation passes SINCE */
        /* iothubd no longer waits for its request of the same id (its timeout passed, or its owner
         * cancelled it): what the uplink does for it ends (curl's transfer, the signer's ops, a
         * sign-out's or a sign-in's waiter; a chained upload behind it goes unsent) and that
         * request is answered -ECANCELED, which iothubd drops. A REGISTER runs on to its end. No
         * fields; never answered itself; an id with no request out (answered meanwhile) is
         * ignored. */
        UPLINK_OP_CANCEL = 8,
        _UPLINK_OP_MAX,
};

/* REQUEST's KIND: the cloud requests that iothubd decides, by the row of signer-policy.c's table
 * each maps to (the other two rows, registration and its attestation challenge, are REGISTER's). */
enum uplink_kind {
        UPLINK_KIND_STATUS = 1,         /* POST {url}/v1/hubs/{id}/status, BODY a status batch */
        UPLINK_KIND_DEVICES = 2,        /* PUT {url}/v1/hubs/{id}/devices, BODY the list of bulbs */
        UPLINK_KIND_EVENTS = 3,         /* POST {url}/v1/hubs/{id}/events, BODY security events */
        UPLINK_KIND_COMMANDS_POLL = 4,  /* GET {url}/v1/hubs/{id}/commands?wait={ARG}, no BODY */
        UPLINK_KIND_COMMAND_RESULT = 5, /* POST {url}/v1/hubs/{id}/commands/{ARG}/result, BODY the result */
        _UPLINK_KIND_MAX,
};

/* One tag space for requests and answers. Kinds: T text (no NUL), B bytes, U8 one byte, U64 8
 * bytes big-endian. [min..max] bytes. */
enum uplink_tag {
        UPLINK_TAG_KIND = 1,                      /* U8 enum uplink_kind */
        UPLINK_TAG_ARG = 2,                       /* T [1..64] see the kinds */
        UPLINK_TAG_BODY = 3,                      /* B [0..1 MiB] request body; the answer's, raw */
        UPLINK_TAG_TIMEOUT = 4,                   /* U64 seconds, 0 the uplink's default; at most UPLINK_TIMEOUT_MAX_S */
        UPLINK_TAG_HTTP_STATUS = 5,               /* U64 100..599, the final response's; REGISTER: absent when it failed before one */
        UPLINK_TAG_RETRY_AFTER = 6,               /* T [1..64] the Retry-After header's value, when there was one */
        UPLINK_TAG_MESSAGE = 7,                   /* T [1..1024] REGISTER's outcome, one line, no secret */
        UPLINK_TAG_USER_CODE = 8,                 /* T [1..64] RFC 8628 3.2 user_code */
        UPLINK_TAG_VERIFICATION_URI = 9,          /* T [1..2048] */
        UPLINK_TAG_VERIFICATION_URI_COMPLETE = 10, /* T [1..2048] */
        UPLINK_TAG_EXPIRES_IN = 11,               /* U64 seconds */
        UPLINK_TAG_RESULT = 12,                   /* T [1..1024] how the login ended, one line */
        UPLINK_TAG_STATUS_JSON = 13,              /* T [2..64 KiB] a JSON object: key, oauth, signer, cloud */
        UPLINK_TAG_SINCE = 14,                    /* U64 the last event generation iothubd saw, 0 none */
        UPLINK_TAG_GEN = 15,                      /* U64 the uplink's event generation now */
        UPLINK_TAG_EVENTS = 16,                   /* T [2..16 KiB] a JSON array of the events since SINCE */
        _UPLINK_TAG_MAX,
};
_Static_assert(_UPLINK_TAG_MAX <= TLV_TAG_MAX, "the uplink's tags fit struct tlv_msg");

/* The table (src/uplink-proto.c). A decoded message of this channel is a struct tlv_msg whose f[]
 * is indexed by enum uplink_tag; its fields are read with tlv_msg_has(), _strdup(), _u64(),
 * _u8(), and messages are built with tlv_msg_add*() after uplink_msg_begin(). */
extern const struct tlv_proto uplink_proto;

/* The codec's functions with this table (include/iothub/tlv.h says what each does). */
int uplink_msg_frame(const uint8_t *buf, size_t len, size_t *ret_need);
int uplink_msg_decode(const uint8_t *buf, size_t len, struct tlv_msg *ret);
int uplink_msg_begin(struct tlv_buf *b, uint32_t id, unsigned op, bool answer, int status);

/* "STATUS", "COMMANDS_POLL"; NULL when unknown. */
const char *uplink_kind_to_string(unsigned kind);
/* Whether arg (NULL: none; len bytes) is what kind takes, as decoding checks it. */
bool uplink_kind_arg_is_valid(unsigned kind, const char *arg, size_t len);

/* The one request a kind is (PROTOCOL.md 3 and 5), built exactly as iothubd built it before
 * stage 2 and as the signer's policy accepts it (signer_policy_is_cloud_request()): cloud_url
 * ([cloud] url) with any trailing '/' dropped, then "/v1/hubs/" hub_id ([hub] id) and the kind's
 * own path and query, arg put in where the kind has it. *ret_method is a static string, *ret_url
 * malloc'ed. -EINVAL when kind or arg is not one decoding accepts, hub_id is not a device id
 * (device_id_is_valid(), as conf.c takes [hub] id), or cloud_url is not "https://" with no
 * '?', '#', '%', '\\' or byte outside 0x21..0x7e, or longer than UPLINK_URL_MAX (the signer
 * refuses the rest, and a URL that grows past UPLINK_URL_MAX with the path); -ENOMEM. */
int uplink_request_target(unsigned kind, const char *arg, const char *cloud_url, const char *hub_id,
                          const char **ret_method, char **ret_url);

/* The one-line reason for an answer the cloud refused with a 4xx, as both sides of the channel
 * show it (iothubd parses the answers it gets raw; the uplink its registration's): "HTTP
 * <status>", then ": " and at most 64 bytes of the body's "error" string when there is one;
 * bytes outside printable ASCII become '?'. Always NUL-terminated within size (> 0). Pure. */
void uplink_refusal_reason(long status, const char *body, size_t len, char *ret, size_t size);
