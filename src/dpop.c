/* SPDX-License-Identifier: MIT */
/* DPoP proofs (RFC 9449 4.2), moved out of oauth.c so that iothub-signer(8) builds them without
 * the OAuth client (and libcurl). */
#include <openssl/evp.h>

#include "iothub/dpop.h"
#include "iothub/frame.h"
#include "iothub/jws.h"
#include "iothub/util.h"

char *dpop_htu(const char *url) {
        return strndup(url, strcspn(url, "?#"));
}

bool dpop_nonce_is_valid(const char *nonce, size_t max) {
        size_t n = 0;

        if (!nonce || !nonce[0])
                return false;
        for (const char *p = nonce; *p; p++, n++) {
                unsigned char ch = (unsigned char) *p;

                if (n >= max || ch < 0x21 || ch > 0x7e || ch == 0x22 || ch == 0x5c)
                        return false;
        }
        return true;
}

int dpop_ath(const char *access_token, char ret[static DPOP_ATH_LEN + 1]) {
        uint8_t md[32];

        if (!access_token)
                return -EINVAL;
        /* ath: base64url(SHA-256(the ASCII access token)), RFC 9449 4.2. */
        if (!EVP_Digest(access_token, strlen(access_token), md, NULL, EVP_sha256(), NULL))
                return -EIO;
        (void) b64url_encode(md, sizeof md, ret);
        return 0;
}

int dpop_prepare(const json_t *jwk, const char *method, const char *url, const char *ath, const char *nonce,
                 int64_t now, char **ret, size_t *ret_len) {
        json_t *header = NULL, *claims = NULL;
        _cleanup_free_ char *htu = NULL, *hs = NULL, *cs = NULL;
        uint8_t jti[16];
        char jti_b64[32];
        int r;

        if (!jwk || !method || !url || !ret || !ret_len)
                return -EINVAL;
        if (ath && (strlen(ath) != DPOP_ATH_LEN || !b64url_chars_are_valid(ath, DPOP_ATH_LEN)))
                return -EINVAL;
        /* RFC 9449 4.2: htu is the target URI "without query and fragment parts"; a strict
         * resource server compares it to the request's URI with them cut off (4.3, check 9). */
        htu = dpop_htu(url);
        if (!htu)
                return -ENOMEM;
        r = random_bytes(jti, sizeof jti);
        if (r < 0)
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees htu */
                return r;
        (void) b64url_encode(jti, sizeof jti, jti_b64);
        /* RFC 9449 4.2: the public key in the header, no private members. */
        header = json_pack("{s:s,s:s,s:O}", "typ", "dpop+jwt", "alg", "ES256", "jwk", (json_t *) jwk);
        claims = json_pack("{s:s,s:s,s:s,s:I}", "jti", jti_b64, "htm", method, "htu", htu, "iat", (json_int_t) now);
        if (!header || !claims) {
                r = -ENOMEM;
                goto out;
        }
        if (ath && json_object_set_new(claims, "ath", json_string(ath)) < 0) {
                r = -ENOMEM;
                goto out;
        }
        if (nonce && nonce[0] && json_object_set_new(claims, "nonce", json_string(nonce)) < 0) {
                r = -ENOMEM;
                goto out;
        }
        hs = json_dumps(header, JSON_COMPACT);
        cs = json_dumps(claims, JSON_COMPACT);
        if (!hs || !cs) {
                r = -ENOMEM;
                goto out;
        }
        /* JWS ES256 (RFC 7518 3.4) is exactly the hub key's raw r||s over the signing input. */
        r = jws_compact_prepare(hs, strlen(hs), cs, strlen(cs), ret, ret_len);
out:
        json_decref(header);
        json_decref(claims);
        return r;
}
