/* SPDX-License-Identifier: MIT */
/* The signer channel's table (include/iothub/signer-proto.h) for the channels' codec
 * (src/tlv.c), and its names for the codec's functions. Pure. */
#include <errno.h>

#include "iothub/signer-proto.h"

#define KIB 1024u
#define MIB (1024u * KIB)

#define T(n, lo, hi) { #n, TLV_KIND_TEXT, lo, hi }
static const struct tlv_tag tags[_SIGNER_TAG_MAX] = {
        [SIGNER_TAG_KEY_ID] = T(KEY_ID, 43, 43),
        [SIGNER_TAG_JWK] = T(JWK, 1, 1024),
        [SIGNER_TAG_BACKEND] = T(BACKEND, 1, 8),
        [SIGNER_TAG_METHOD] = T(METHOD, 1, 8),
        [SIGNER_TAG_TARGET_URI] = T(TARGET_URI, 1, 2048),
        [SIGNER_TAG_AUTHORIZATION] = T(AUTHORIZATION, 1, 8 * KIB),
        [SIGNER_TAG_BODY] = { "BODY", TLV_KIND_BYTES, 0, MIB },
        [SIGNER_TAG_PRIO] = { "PRIO", TLV_KIND_U8, 1, 1 },
        [SIGNER_TAG_CONTENT_DIGEST] = T(CONTENT_DIGEST, 1, 256),
        [SIGNER_TAG_SIGNATURE_INPUT] = T(SIGNATURE_INPUT, 1, 1024),
        [SIGNER_TAG_SIGNATURE] = T(SIGNATURE, 1, 256),
        [SIGNER_TAG_URL] = T(URL, 1, 2048),
        [SIGNER_TAG_ATH] = T(ATH, 43, 43),
        [SIGNER_TAG_NONCE] = T(NONCE, 1, 512),
        [SIGNER_TAG_PROOF] = T(PROOF, 1, 8 * KIB),
        [SIGNER_TAG_DEV] = T(DEV, 1, 64),
        [SIGNER_TAG_CMD_ID] = T(CMD_ID, 1, 64),
        [SIGNER_TAG_IAT] = { "IAT", TLV_KIND_U64, 8, 8 },
        [SIGNER_TAG_EXP] = { "EXP", TLV_KIND_U64, 8, 8 },
        [SIGNER_TAG_SET] = T(SET, 2, 4 * KIB),
        [SIGNER_TAG_CLOUD_JWS] = T(CLOUD_JWS, 1, 8 * KIB),
        [SIGNER_TAG_JWS] = T(JWS, 1, 24 * KIB),
        [SIGNER_TAG_ACCESS_TOKEN] = T(ACCESS_TOKEN, 1, 4 * KIB),
        [SIGNER_TAG_REFRESH_TOKEN] = T(REFRESH_TOKEN, 1, 4 * KIB),
        [SIGNER_TAG_TOKEN_TYPE] = T(TOKEN_TYPE, 1, 16),
        [SIGNER_TAG_SCOPE] = T(SCOPE, 1, 1024),
        [SIGNER_TAG_EXPIRES_AT] = { "EXPIRES_AT", TLV_KIND_U64, 8, 8 },
        [SIGNER_TAG_EVIDENCE] = T(EVIDENCE, 2, 16 * KIB),
        [SIGNER_TAG_CHALLENGE] = T(CHALLENGE, 1, 16 * KIB),
        [SIGNER_TAG_ANSWER] = T(ANSWER, 2, 16 * KIB),
        [SIGNER_TAG_SIGNATURES] = { "SIGNATURES", TLV_KIND_U64, 8, 8 },
        [SIGNER_TAG_REFUSED_POLICY] = { "REFUSED_POLICY", TLV_KIND_U64, 8, 8 },
        [SIGNER_TAG_REFUSED_RATE] = { "REFUSED_RATE", TLV_KIND_U64, 8, 8 },
        [SIGNER_TAG_REFUSED_PEER] = { "REFUSED_PEER", TLV_KIND_U64, 8, 8 },
        [SIGNER_TAG_MALFORMED] = { "MALFORMED", TLV_KIND_U64, 8, 8 },
        [SIGNER_TAG_TPM_ERRORS] = { "TPM_ERRORS", TLV_KIND_U64, 8, 8 },
        [SIGNER_TAG_LAST_ERROR] = T(LAST_ERROR, 1, 256),
        [SIGNER_TAG_CANCELLED] = { "CANCELLED", TLV_KIND_U64, 8, 8 },
};
#undef T

/* Per op: the request's and the answer's tags, R required, O optional. */
#define R(t) { SIGNER_TAG_##t, TLV_REQUIRED }
#define O(t) { SIGNER_TAG_##t, TLV_OPTIONAL }
static const struct tlv_op ops[_SIGNER_OP_MAX] = {
        [SIGNER_OP_KEY_INFO] = { "KEY_INFO", {}, { R(KEY_ID), R(JWK), R(BACKEND) } },
        [SIGNER_OP_SIGN_HTTP] = { "SIGN_HTTP",
                                  { R(METHOD), R(TARGET_URI), R(AUTHORIZATION), O(BODY), R(PRIO) },
                                  { O(CONTENT_DIGEST), R(SIGNATURE_INPUT), R(SIGNATURE) } },
        [SIGNER_OP_SIGN_DPOP] = { "SIGN_DPOP", { R(METHOD), R(URL), O(ATH), O(NONCE), O(PRIO) }, { R(PROOF) } },
        [SIGNER_OP_SIGN_COMMAND] = { "SIGN_COMMAND",
                                     { R(DEV), R(CMD_ID), R(IAT), R(EXP), R(SET), O(CLOUD_JWS) },
                                     { R(JWS) } },
        [SIGNER_OP_TOKENS_GET] = { "TOKENS_GET",
                                   {},
                                   { R(ACCESS_TOKEN), O(REFRESH_TOKEN), R(TOKEN_TYPE), O(SCOPE), R(EXPIRES_AT) } },
        [SIGNER_OP_TOKENS_PUT] = { "TOKENS_PUT",
                                   { R(ACCESS_TOKEN), O(REFRESH_TOKEN), R(TOKEN_TYPE), O(SCOPE), R(EXPIRES_AT) },
                                   {} },
        [SIGNER_OP_TOKENS_ERASE] = { "TOKENS_ERASE", {}, {} },
        [SIGNER_OP_ATTEST_BEGIN] = { "ATTEST_BEGIN", {}, { R(EVIDENCE) } },
        [SIGNER_OP_ATTEST_ANSWER] = { "ATTEST_ANSWER", { R(CHALLENGE) }, { R(ANSWER) } },
        [SIGNER_OP_STATUS] = { "STATUS",
                               {},
                               { R(SIGNATURES), R(REFUSED_POLICY), R(REFUSED_RATE), R(REFUSED_PEER), R(MALFORMED),
                                 R(TPM_ERRORS), O(LAST_ERROR), O(CANCELLED) } },
        [SIGNER_OP_CANCEL] = { "CANCEL", {}, {} },
};
#undef R
#undef O

/* The rules on values (tlv_proto.check): CANCEL is never answered, not even with an error. */
static int check(const struct tlv_msg *m) {
        if (m->answer && m->op == SIGNER_OP_CANCEL)
                return -EBADMSG;
        return 0;
}

const struct tlv_proto signer_proto = {
        .tags = tags,
        .n_tags = _SIGNER_TAG_MAX,
        .ops = ops,
        .n_ops = _SIGNER_OP_MAX,
        .msg_max = SIGNER_MSG_MAX,
        .check = check,
};

const char *signer_op_to_string(unsigned op) {
        return tlv_op_to_string(&signer_proto, op);
}

const char *signer_tag_to_string(unsigned tag) {
        return tlv_tag_to_string(&signer_proto, tag);
}

int signer_tag_limits(unsigned tag, enum signer_kind *ret_kind, uint32_t *ret_min, uint32_t *ret_max) {
        enum tlv_kind kind;
        int r;

        r = tlv_tag_limits(&signer_proto, tag, &kind, ret_min, ret_max);
        if (r < 0)
                return r;
        if (ret_kind)
                *ret_kind = (enum signer_kind) kind;
        return 0;
}

int signer_tag_rule(unsigned op, bool answer, unsigned tag) {
        return tlv_tag_rule(&signer_proto, op, answer, tag);
}

int signer_msg_frame(const uint8_t *buf, size_t len, size_t *ret_need) {
        return tlv_msg_frame(&signer_proto, buf, len, ret_need);
}

int signer_msg_decode(const uint8_t *buf, size_t len, struct signer_msg *ret) {
        return tlv_msg_decode(&signer_proto, buf, len, ret);
}

int signer_msg_begin(struct signer_buf *b, uint32_t id, unsigned op, bool answer, int status) {
        return tlv_msg_begin(b, &signer_proto, id, op, answer, status);
}
