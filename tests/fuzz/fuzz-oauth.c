/* SPDX-License-Identifier: MIT */
/* libFuzzer target for the parsers of what an authorization server sends (src/oauth.c,
 * oauth-internal.h, PROTOCOL.md 4): discovery metadata (RFC 8414), the device authorization
 * answer (RFC 8628 3.2), the token answer (RFC 6749 5.1), the error answer (RFC 6749 5.2) and
 * the WWW-Authenticate challenge of a resource server (RFC 9449 7.1). The first byte chooses the
 * parser (modulo 5), the rest is the body or header value as received. What a parser accepts
 * must satisfy the invariants the rest of oauth.c relies on. */
#include <stdio.h>
#include <stdlib.h>

#include "../../src/oauth-internal.h"
#include "iothub/util.h"
#include "check.h"

#define FUZZ_ISSUER "https://127.0.0.1:8443"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static bool printable(const char *s, size_t max) {
        size_t n = strlen(s);

        if (n == 0 || n > max)
                return false;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char) s[i] < 0x20 || (unsigned char) s[i] > 0x7e)
                        return false;
        return true;
}

static bool https(const char *s) {
        return strncmp(s, "https://", 8) == 0 && !strpbrk(s, " \t\r\n");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const uint8_t *buf = data + 1;
        size_t len;
        int r;

        if (size < 1)
                return 0;
        len = size - 1;
        switch (data[0] % 5) {
        case 0: {
                struct oauth_metadata m = {};
                r = oauth_parse_metadata(buf, len, FUZZ_ISSUER, &m);
                if (r < 0) {
                        CHECK(!m.token_endpoint && !m.device_endpoint && !m.revocation_endpoint);
                        break;
                }
                CHECK(len <= OAUTH_RESPONSE_MAX);
                CHECK(printable(m.token_endpoint, OAUTH_URI_MAX) && https(m.token_endpoint));
                CHECK(printable(m.device_endpoint, OAUTH_URI_MAX) && https(m.device_endpoint));
                CHECK(!m.revocation_endpoint ||
                      (printable(m.revocation_endpoint, OAUTH_URI_MAX) && https(m.revocation_endpoint)));
                oauth_metadata_done(&m);
                break;
        }
        case 1: {
                struct oauth_device_answer d = {};
                r = oauth_parse_device_answer(buf, len, &d);
                if (r < 0) {
                        CHECK(!d.device_code);
                        break;
                }
                CHECK(printable(d.device_code, OAUTH_TOKEN_MAX));
                CHECK(printable(d.user_code, OAUTH_USER_CODE_MAX));
                CHECK(printable(d.verification_uri, OAUTH_URI_MAX));
                CHECK(!d.verification_uri_complete || printable(d.verification_uri_complete, OAUTH_URI_MAX));
                CHECK(d.expires_in >= 1 && d.expires_in <= OAUTH_DEVICE_EXPIRES_MAX_S);
                CHECK(d.interval_s >= 1 && d.interval_s <= OAUTH_INTERVAL_MAX_S);
                oauth_device_answer_done(&d);
                break;
        }
        case 2: {
                struct oauth_token_answer t = {};
                const char *why = NULL;
                r = oauth_parse_token_answer(buf, len, &t, &why);
                if (r < 0) {
                        CHECK(!t.access_token);
                        CHECK(r != -EBADMSG || why); /* every refusal says why */
                        break;
                }
                CHECK(b64token_is_valid(t.access_token, strlen(t.access_token)));
                CHECK(strlen(t.access_token) <= OAUTH_TOKEN_MAX);
                CHECK(!strpbrk(t.access_token, " \t\r\n\"\\,;"));
                CHECK(streq(t.token_type, "Bearer") || streq(t.token_type, "DPoP"));
                CHECK(!t.refresh_token || printable(t.refresh_token, OAUTH_TOKEN_MAX));
                CHECK(!t.scope || printable(t.scope, OAUTH_SCOPE_MAX));
                CHECK(t.expires_in == 0 ||
                      (t.expires_in >= OAUTH_EXPIRES_IN_MIN_S && t.expires_in <= OAUTH_EXPIRES_IN_MAX_S));
                oauth_token_answer_done(&t);
                break;
        }
        case 3: {
                char e[OAUTH_ERROR_CODE_MAX + 1];
                memset(e, 'X', sizeof e);
                r = oauth_parse_error(buf, len, e, sizeof e);
                if (r >= 0)
                        CHECK(printable(e, OAUTH_ERROR_CODE_MAX) && !strpbrk(e, "\"\\"));
                break;
        }
        case 4: {
                char e[OAUTH_ERROR_CODE_MAX + 1];
                _cleanup_free_ char *value = malloc(len + 1);
                if (!value)
                        break;
                /* A header value as http.c hands it over: NUL-terminated, no NUL inside. */
                memcpy(value, buf, len);
                value[len] = '\0';
                r = oauth_parse_www_authenticate(value, strlen(value), e, sizeof e);
                if (r >= 0)
                        CHECK(printable(e, OAUTH_ERROR_CODE_MAX) && !strpbrk(e, "\"\\"));
                break;
        }
        }
        return 0;
}
