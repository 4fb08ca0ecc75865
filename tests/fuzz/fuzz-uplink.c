/* SPDX-License-Identifier: MIT */
/* libFuzzer target for iothub-uplink's side of its channel (src/uplink-proto.c on src/tlv.c): the
 * input is the byte stream iothubd writes on one connection (and, for iothubd's side, the answers:
 * both decode with the same table). It is framed and decoded message by message as the uplink
 * will (stopping at the first that does not decode, where the uplink closes the connection).
 * Invariants:
 *   - a decoded message has its op's required fields, only its op's fields, each within its
 *     kind's and its table's limits, no NUL in a text;
 *   - encoded again with the encoder, its fields in the opposite order, it decodes to the same
 *     header and fields (field order carries no meaning);
 *   - a REQUEST names a kind, an ARG only where the kind takes one and as it takes it, a BODY
 *     exactly when the kind is not the poll, a TIMEOUT within UPLINK_TIMEOUT_MAX_S; and the
 *     request that the uplink builds from it (uplink_request_target()) under a fixed [cloud] url
 *     and [hub] id is one that the signer's policy signs (signer_policy_http(), and its DPoP
 *     proof, signer_policy_dpop()), with the method
 *     of the kind, under [cloud] url's path: no request that decodes leads the uplink to ask
 *     for a signature the signer refuses, or to any other URL of the cloud;
 *   - an answer of REQUEST, and one of REGISTER that has one, carries an HTTP status of 100..599. */
#include <errno.h>

#include "check.h"
#include "iothub/signer-policy.h"
#include "iothub/uplink-proto.h"

#define FUZZ_CLOUD "https://Cloud.Example:8443/api/"
#define FUZZ_BASE "https://Cloud.Example:8443/api/v1/hubs/hub-1/" /* every URL starts so */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct signer_policy policy;

static void setup(void) {
        static struct iothub_conf conf;
        static bool done;

        if (done)
                return;
        done = true;
        conf.hub.id = (char *) "hub-1";
        conf.cloud.url = (char *) FUZZ_CLOUD;
        CHECK(signer_policy_init(&policy, &conf, NULL) == 0);
}

static void check_fields(const struct tlv_msg *m) {
        struct tlv_buf b = {};
        struct tlv_msg again;

        CHECK(tlv_op_to_string(&uplink_proto, m->op) != NULL);
        CHECK(m->status <= 0 && (m->answer || m->status == 0));
        for (unsigned t = 0; t < TLV_TAG_MAX; t++) {
                int rule = tlv_tag_rule(&uplink_proto, m->op, m->answer, t);
                enum tlv_kind kind;
                uint32_t lo, hi;

                if (t == 0 || t >= _UPLINK_TAG_MAX) {
                        CHECK(!m->f[t].present && rule == 0);
                        continue;
                }
                CHECK(tlv_tag_limits(&uplink_proto, t, &kind, &lo, &hi) == 0);
                CHECK(!(rule == TLV_REQUIRED && m->status == 0) || m->f[t].present);
                if (!m->f[t].present)
                        continue;
                CHECK(rule != 0 && m->status == 0);
                CHECK(m->f[t].len >= lo && m->f[t].len <= hi);
                CHECK(kind != TLV_KIND_TEXT || !memchr(m->f[t].data, '\0', m->f[t].len));
                CHECK(kind != TLV_KIND_U64 || m->f[t].len == 8);
                CHECK(kind != TLV_KIND_U8 || m->f[t].len == 1);
        }
        /* Field order carries no meaning: backwards, it decodes to the same. */
        CHECK(uplink_msg_begin(&b, m->id, m->op, m->answer, m->status) == 0);
        for (unsigned t = _UPLINK_TAG_MAX - 1; t > 0; t--)
                if (m->f[t].present)
                        CHECK(tlv_msg_add(&b, t, m->f[t].data, m->f[t].len) == 0);
        CHECK(tlv_msg_end(&b) == 0);
        CHECK(uplink_msg_decode(b.data, b.len, &again) == 0);
        CHECK(again.id == m->id && again.op == m->op && again.answer == m->answer && again.status == m->status);
        for (unsigned t = 1; t < _UPLINK_TAG_MAX; t++) {
                CHECK(again.f[t].present == m->f[t].present && again.f[t].len == m->f[t].len);
                CHECK(!m->f[t].present || m->f[t].len == 0 || memcmp(again.f[t].data, m->f[t].data, m->f[t].len) == 0);
        }
        tlv_buf_done(&b);
}

static void check_request(const struct tlv_msg *m) {
        static const char *const methods[_UPLINK_KIND_MAX] = {
                [UPLINK_KIND_STATUS] = "POST",         [UPLINK_KIND_DEVICES] = "PUT", [UPLINK_KIND_EVENTS] = "POST",
                [UPLINK_KIND_COMMANDS_POLL] = "GET",   [UPLINK_KIND_COMMAND_RESULT] = "POST",
        };
        _cleanup_free_ char *arg = NULL, *url = NULL;
        const char *method = NULL, *why = NULL;
        uint64_t timeout = 0;
        uint8_t kind = 0;
        int r;

        CHECK(tlv_msg_u8(m, UPLINK_TAG_KIND, &kind) == 0);
        CHECK(kind > 0 && kind < _UPLINK_KIND_MAX && uplink_kind_to_string(kind));
        r = tlv_msg_strdup(m, UPLINK_TAG_ARG, &arg);
        CHECK(r == 0 || r == -ENOENT);
        CHECK(!arg || strlen(arg) == m->f[UPLINK_TAG_ARG].len);
        switch (kind) {
        case UPLINK_KIND_COMMANDS_POLL:
                CHECK(arg && strlen(arg) <= 3 && strspn(arg, "0123456789") == strlen(arg));
                CHECK(!tlv_msg_has(m, UPLINK_TAG_BODY));
                break;
        case UPLINK_KIND_COMMAND_RESULT:
                CHECK(arg && fuzz_id_chars_valid(arg, 64) && !streq(arg, ".") && !streq(arg, ".."));
                CHECK(tlv_msg_has(m, UPLINK_TAG_BODY));
                break;
        default:
                CHECK(!arg && tlv_msg_has(m, UPLINK_TAG_BODY));
        }
        CHECK(tlv_msg_u64(m, UPLINK_TAG_TIMEOUT, &timeout) == 0 && timeout <= UPLINK_TIMEOUT_MAX_S);

        /* The request the uplink makes of it is signed, and is the kind's. */
        CHECK(uplink_request_target(kind, arg, FUZZ_CLOUD, "hub-1", &method, &url) == 0);
        CHECK(streq(method, methods[kind]));
        CHECK(strncmp(url, FUZZ_BASE, strlen(FUZZ_BASE)) == 0);
        r = signer_policy_http(&policy, method, url, "DPoP x", &why);
        if (r < 0)
                fprintf(stderr, "refused %s %s: %s\n", method, url, why);
        CHECK(r == 0);
        /* Its DPoP proof too (RFC 9449 7.1). */
        CHECK(signer_policy_dpop(&policy, method, url, NULL, NULL, &why) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        size_t at = 0;

        setup();
        while (at < size) {
                struct tlv_msg m;
                size_t need = 0;
                uint64_t status;
                int r = uplink_msg_frame(data + at, size - at, &need);

                if (r <= 0)
                        break;
                CHECK(need >= TLV_HEADER_LEN && need <= size - at && need <= TLV_PREFIX_LEN + UPLINK_MSG_MAX);
                if (uplink_msg_decode(data + at, need, &m) < 0)
                        break;
                check_fields(&m);
                if (!m.answer && m.op == UPLINK_OP_REQUEST)
                        check_request(&m);
                if (m.answer && m.status == 0 &&
                    (m.op == UPLINK_OP_REQUEST || (m.op == UPLINK_OP_REGISTER && tlv_msg_has(&m, UPLINK_TAG_HTTP_STATUS))))
                        CHECK(tlv_msg_u64(&m, UPLINK_TAG_HTTP_STATUS, &status) == 0 && status >= 100 && status <= 599);
                at += need;
        }
        return 0;
}
