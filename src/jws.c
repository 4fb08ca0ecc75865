/* SPDX-License-Identifier: MIT */
#include "iothub/jws.h"
#include "iothub/frame.h"
#include "iothub/util.h"

int jws_compact_prepare(const char *header, size_t header_len, const char *payload, size_t payload_len, char **ret,
                        size_t *ret_len) {
        _cleanup_free_ char *jws = NULL;
        size_t at;

        if (!header || !payload || !ret || !ret_len || header_len == 0 || payload_len == 0)
                return -EINVAL;
        if (header_len > SIZE_MAX / 2 - 64 || payload_len > SIZE_MAX / 2 - 64)
                return -EINVAL;
        jws = malloc(B64URL_LEN(header_len) + 1 + B64URL_LEN(payload_len) + 1 + B64URL_BUF(HUBKEY_SIG_LEN));
        if (!jws)
                return -ENOMEM;
        at = b64url_encode((const uint8_t *) header, header_len, jws);
        jws[at++] = '.';
        at += b64url_encode((const uint8_t *) payload, payload_len, jws + at);
        *ret_len = at;
        *ret = TAKE_PTR(jws);
        return 0;
}

void jws_compact_finish(char *input, size_t len, const uint8_t sig[HUBKEY_SIG_LEN]) {
        input[len++] = '.';
        (void) b64url_encode(sig, HUBKEY_SIG_LEN, input + len);
}

int jws_compact_sign(const char *header, size_t header_len, const char *payload, size_t payload_len,
                     jws_sign_t sign, void *userdata, char **ret) {
        _cleanup_free_ char *jws = NULL;
        uint8_t sig[HUBKEY_SIG_LEN];
        size_t at = 0;
        int r;

        if (!sign || !ret)
                return -EINVAL;
        r = jws_compact_prepare(header, header_len, payload, payload_len, &jws, &at);
        if (r < 0)
                return r;
        /* RFC 7515 5.1: the signature is over the ASCII of "<header>.<payload>"; for ES256
         * (RFC 7518 3.4) it is the raw r||s, not DER. */
        r = sign(userdata, jws, at, sig);
        if (r < 0)
                return r;
        jws_compact_finish(jws, at, sig);
        *ret = TAKE_PTR(jws);
        return 0;
}
