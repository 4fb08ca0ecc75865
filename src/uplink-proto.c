/* SPDX-License-Identifier: MIT */
/* The uplink channel's table (include/iothub/uplink-proto.h) for the channels' codec (src/tlv.c),
 * its rules on values, and the request each kind is. Pure. */
#include <errno.h>
#include <string.h>
#include <stdio.h>
#include <strings.h>

#include <jansson.h>

#include "commands-internal.h"
#include "iothub/uplink-proto.h"

#define KIB 1024u

#define T(n, lo, hi) { #n, TLV_KIND_TEXT, lo, hi }
#define U64(n) { #n, TLV_KIND_U64, 8, 8 }
static const struct tlv_tag tags[_UPLINK_TAG_MAX] = {
        [UPLINK_TAG_KIND] = { "KIND", TLV_KIND_U8, 1, 1 },
        [UPLINK_TAG_ARG] = T(ARG, 1, 64),
        [UPLINK_TAG_BODY] = { "BODY", TLV_KIND_BYTES, 0, UPLINK_BODY_MAX },
        [UPLINK_TAG_TIMEOUT] = U64(TIMEOUT),
        [UPLINK_TAG_HTTP_STATUS] = U64(HTTP_STATUS),
        [UPLINK_TAG_RETRY_AFTER] = T(RETRY_AFTER, 1, 64),
        [UPLINK_TAG_MESSAGE] = T(MESSAGE, 1, 1024),
        [UPLINK_TAG_USER_CODE] = T(USER_CODE, 1, 64),
        [UPLINK_TAG_VERIFICATION_URI] = T(VERIFICATION_URI, 1, 2048),
        [UPLINK_TAG_VERIFICATION_URI_COMPLETE] = T(VERIFICATION_URI_COMPLETE, 1, 2048),
        [UPLINK_TAG_EXPIRES_IN] = U64(EXPIRES_IN),
        [UPLINK_TAG_RESULT] = T(RESULT, 1, 1024),
        [UPLINK_TAG_STATUS_JSON] = T(STATUS_JSON, 2, 64 * KIB),
        [UPLINK_TAG_SINCE] = U64(SINCE),
        [UPLINK_TAG_GEN] = U64(GEN),
        [UPLINK_TAG_EVENTS] = T(EVENTS, 2, 16 * KIB),
};
#undef T
#undef U64

/* Per op: the request's and the answer's tags, R required, O optional. */
#define R(t) { UPLINK_TAG_##t, TLV_REQUIRED }
#define O(t) { UPLINK_TAG_##t, TLV_OPTIONAL }
static const struct tlv_op ops[_UPLINK_OP_MAX] = {
        [UPLINK_OP_REQUEST] = { "REQUEST",
                                { R(KIND), O(ARG), O(BODY), R(TIMEOUT) },
                                { R(HTTP_STATUS), R(BODY), O(RETRY_AFTER) } },
        /* No HTTP_STATUS: the registration failed before a final answer (the attestation, the
         * cloud's challenge); MESSAGE says why (iothubd shows it to the operator). */
        [UPLINK_OP_REGISTER] = { "REGISTER", {}, { O(HTTP_STATUS), R(MESSAGE) } },
        [UPLINK_OP_LOGIN_START] = { "LOGIN_START",
                                    {},
                                    { R(USER_CODE), R(VERIFICATION_URI), O(VERIFICATION_URI_COMPLETE), R(EXPIRES_IN) } },
        [UPLINK_OP_LOGIN_WAIT] = { "LOGIN_WAIT", {}, { R(RESULT) } },
        [UPLINK_OP_LOGOUT] = { "LOGOUT", {}, {} },
        [UPLINK_OP_STATUS] = { "STATUS", {}, { R(STATUS_JSON) } },
        [UPLINK_OP_WATCH] = { "WATCH", { R(SINCE) }, { R(GEN), R(EVENTS) } },
        [UPLINK_OP_CANCEL] = { "CANCEL", {}, {} },
};
#undef R
#undef O

/* Each kind's request after "{url}/v1/hubs/{id}": prefix, ARG where the kind has one, suffix. The
 * rows of signer-policy.c's cloud_requests[] that iothubd decides (PROTOCOL.md 3 and 5). */
static const struct kind_info {
        const char *name;
        const char *method;
        const char *prefix, *suffix;
        enum { ARG_NONE, ARG_WAIT, ARG_COMMAND_ID } arg;
} kinds[_UPLINK_KIND_MAX] = {
        [UPLINK_KIND_STATUS] = { "STATUS", "POST", "/status", "", ARG_NONE },
        [UPLINK_KIND_DEVICES] = { "DEVICES", "PUT", "/devices", "", ARG_NONE },
        [UPLINK_KIND_EVENTS] = { "EVENTS", "POST", "/events", "", ARG_NONE },
        [UPLINK_KIND_COMMANDS_POLL] = { "COMMANDS_POLL", "GET", "/commands?wait=", "", ARG_WAIT },
        [UPLINK_KIND_COMMAND_RESULT] = { "COMMAND_RESULT", "POST", "/commands/", "/result", ARG_COMMAND_ID },
};

const char *uplink_kind_to_string(unsigned kind) {
        return kind > 0 && kind < _UPLINK_KIND_MAX ? kinds[kind].name : NULL;
}

bool uplink_kind_arg_is_valid(unsigned kind, const char *arg, size_t len) {
        if (!uplink_kind_to_string(kind))
                return false;
        switch (kinds[kind].arg) {
        case ARG_NONE:
                return !arg;
        case ARG_WAIT:
                /* signer-policy.c's "{n}": 1..3 digits, nothing else. */
                if (!arg || len < 1 || len > UPLINK_POLL_WAIT_DIGITS)
                        return false;
                for (size_t i = 0; i < len; i++)
                        if (arg[i] < '0' || arg[i] > '9')
                                return false;
                return true;
        case ARG_COMMAND_ID:
                /* signer-policy.c's "{cmd}": the same function decides. */
                return arg && command_id_is_valid(arg, len);
        }
        return false;
}

/* The rules on values (tlv_proto.check): see uplink-proto.h. */
static int check(const struct tlv_msg *m) {
        uint64_t v;
        uint8_t kind;

        if (m->answer && m->op == UPLINK_OP_CANCEL)
                return -EBADMSG; /* never answered */
        if (m->status < 0)
                return 0;
        if (!m->answer && m->op == UPLINK_OP_REQUEST) {
                const struct tlv_field *arg = &m->f[UPLINK_TAG_ARG];

                if (tlv_msg_u8(m, UPLINK_TAG_KIND, &kind) < 0 ||
                    !uplink_kind_arg_is_valid(kind, arg->present ? (const char *) arg->data : NULL, arg->len))
                        return -EBADMSG;
                /* A GET has no body (RFC 9110 9.3.1: no defined meaning, and the signer signs
                 * none); every other kind sends one, empty or not. */
                if (tlv_msg_has(m, UPLINK_TAG_BODY) != (kind != UPLINK_KIND_COMMANDS_POLL))
                        return -EBADMSG;
                if (tlv_msg_u64(m, UPLINK_TAG_TIMEOUT, &v) < 0 || v > UPLINK_TIMEOUT_MAX_S)
                        return -EBADMSG;
        }
        if (m->answer && (m->op == UPLINK_OP_REQUEST || tlv_msg_has(m, UPLINK_TAG_HTTP_STATUS)))
                /* RFC 9110 15: a status code is three digits, 1xx..5xx. */
                if (tlv_msg_u64(m, UPLINK_TAG_HTTP_STATUS, &v) < 0 || v < 100 || v > 599)
                        return -EBADMSG;
        return 0;
}

const struct tlv_proto uplink_proto = {
        .tags = tags,
        .n_tags = _UPLINK_TAG_MAX,
        .ops = ops,
        .n_ops = _UPLINK_OP_MAX,
        .msg_max = UPLINK_MSG_MAX,
        .check = check,
};

int uplink_msg_frame(const uint8_t *buf, size_t len, size_t *ret_need) {
        return tlv_msg_frame(&uplink_proto, buf, len, ret_need);
}

int uplink_msg_decode(const uint8_t *buf, size_t len, struct tlv_msg *ret) {
        return tlv_msg_decode(&uplink_proto, buf, len, ret);
}

int uplink_msg_begin(struct tlv_buf *b, uint32_t id, unsigned op, bool answer, int status) {
        return tlv_msg_begin(b, &uplink_proto, id, op, answer, status);
}

int uplink_request_target(unsigned kind, const char *arg, const char *cloud_url, const char *hub_id,
                          const char **ret_method, char **ret_url) {
        const struct kind_info *k;
        size_t n;
        char *url;

        if (!cloud_url || !hub_id || !ret_method || !ret_url ||
            !uplink_kind_arg_is_valid(kind, arg, arg ? strlen(arg) : 0) || !device_id_is_valid(hub_id, strlen(hub_id)))
                return -EINVAL;
        /* What signer_origin_parse() refuses anywhere in a URI, refused here in the base: the
         * request would never be signed. The origin's own rules stay the signer's. */
        n = strlen(cloud_url);
        if (n > UPLINK_URL_MAX || strncasecmp(cloud_url, "https://", 8) != 0)
                return -EINVAL;
        for (const char *c = cloud_url; *c; c++)
                if (*c < 0x21 || *c > 0x7e || strchr("?#%\\", *c))
                        return -EINVAL;
        /* As cloud.c's base_url: the trailing '/' dropped, so that no "//" precedes "v1". */
        while (n > 8 && cloud_url[n - 1] == '/')
                n--;
        k = &kinds[kind];
        url = strdup_printf("%.*s/v1/hubs/%s%s%s%s", (int) n, cloud_url, hub_id, k->prefix, arg ?: "", k->suffix);
        if (!url)
                return -ENOMEM;
        *ret_method = k->method;
        *ret_url = url;
        return 0;
}

void uplink_refusal_reason(long status, const char *body, size_t len, char *ret, size_t size) {
        json_error_t jerr;
        json_t *resp = json_loadb(body, len, 0, &jerr);
        const char *e = json_string_value(json_object_get(resp, "error"));

        (void) snprintf(ret, size, "HTTP %ld%s%.64s", status, e ? ": " : "", e ? e : "");
        json_decref(resp);
        for (char *p = ret; *p; p++)
                if ((unsigned char) *p < 0x20 || (unsigned char) *p >= 0x7f)
                        *p = '?';
}
