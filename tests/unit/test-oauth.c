/* SPDX-License-Identifier: MIT */
/* Unit tests of the sign-in's parsers and DPoP proofs (src/oauth.c, oauth-internal.h,
 * PROTOCOL.md 4), table-driven. The DPoP proof is made by the real hub key with the 'file'
 * backend (a P-256 key generated here) and its claims are read back with jansson. */
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <cmocka.h>
#include <jansson.h>

#include <openssl/evp.h>
#include <openssl/pem.h>

#include "../../src/oauth-internal.h"
#include "iothub/conf.h"
#include "iothub/dpop.h"
#include "iothub/frame.h"
#include "iothub/hubkey.h"
#include "iothub/jws.h"
#include "iothub/oauth.h"
#include "iothub/util.h"

#define ISSUER "https://as.example"

static const uint8_t *U(const char *s) {
        return (const uint8_t *) s;
}

/* ---- RFC 9449 4.2: htu is the target URI without query and fragment ---- */

static void test_htu(void **state) {
        static const struct {
                const char *url, *htu;
        } cases[] = {
                { "https://c.example/v1/hubs/h/commands?wait=25", "https://c.example/v1/hubs/h/commands" },
                { "https://c.example/v1/hubs/h/status", "https://c.example/v1/hubs/h/status" },
                { "https://c.example/a#frag", "https://c.example/a" },
                { "https://c.example/a?x=1#f", "https://c.example/a" },
                { "https://c.example:8443/?", "https://c.example:8443/" },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_free_ char *h = oauth_dpop_htu(cases[i].url);
                assert_non_null(h);
                assert_string_equal(h, cases[i].htu);
        }
}

/* RFC 9449 8.1: nonce = 1*NQCHAR; what a server hands out is kept only when a proof can carry it
 * (iothub-signer's policy refuses the rest, which would stop every proof after it). */
static void test_nonce_is_valid(void **state) {
        static const struct {
                const char *nonce;
                bool ok;
        } cases[] = {
                { "eyJ7S_zG.eyJH0-Z.HX4w-7v", true }, { "!#[]~", true },   { "a", true },
                { "", false },                        { "a b", false },    { "a\"b", false },
                { "a\\b", false },                   { "a\tb", false },  { "\x7f", false },
                { "caf\xc3\xa9", false },            { "a\r\n", false },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++)
                if (dpop_nonce_is_valid(cases[i].nonce, 64) != cases[i].ok)
                        fail_msg("nonce case %zu: expected %s", i, cases[i].ok ? "valid" : "invalid");
        /* At most max bytes. */
        assert_true(dpop_nonce_is_valid("abcdefgh", 8));
        assert_false(dpop_nonce_is_valid("abcdefghi", 8));
        assert_false(dpop_nonce_is_valid(NULL, 8));
}

/* The proof itself (RFC 9449 4.2), for the long poll's URL with its query. */
/* A proof as iothub-signer makes one (dpop.c's builder, the hub key's r||s): iothubd no longer
 * builds proofs itself (issue 14). */
static int dpop_proof(struct hubkey *k, const char *method, const char *url, const char *access_token,
                      const char *nonce, int64_t now, char **ret) {
        _cleanup_free_ char *jws = NULL;
        char ath[DPOP_ATH_LEN + 1];
        uint8_t sig[HUBKEY_SIG_LEN];
        json_t *jwk = NULL;
        size_t len = 0;
        int r;

        if (access_token && (r = dpop_ath(access_token, ath)) < 0)
                return r;
        r = hubkey_public_jwk(k, &jwk);
        if (r < 0)
                return r;
        r = dpop_prepare(jwk, method, url, access_token ? ath : NULL, nonce, now, &jws, &len);
        json_decref(jwk);
        if (r < 0)
                return r;
        r = hubkey_sign(k, jws, len, sig);
        if (r < 0)
                return r;
        jws_compact_finish(jws, len, sig);
        *ret = TAKE_PTR(jws);
        return 0;
}

static void test_dpop_proof_htu(void **state) {
        const char *tmp = getenv("TMPDIR") ?: "/tmp";
        char dir[PATH_MAX], key[PATH_MAX + 16];
        _cleanup_free_ char *error = NULL, *proof = NULL, *claims_text = NULL;
        struct iothub_conf *conf = NULL;
        struct hubkey *k = NULL;
        EVP_PKEY *pkey = EVP_EC_gen("P-256");
        json_t *claims;
        uint8_t *raw;
        const char *p1, *p2;
        ssize_t n;
        FILE *f;
        int fd;

        assert_non_null(pkey);
        assert_true((size_t) snprintf(dir, sizeof dir, "%s/test-oauth-XXXXXX", tmp) < sizeof dir);
        assert_non_null(mkdtemp(dir));
        (void) snprintf(key, sizeof key, "%s/hub.pem", dir);
        fd = open(key, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        f = fdopen(fd, "w");
        assert_non_null(f);
        assert_int_equal(PEM_write_PrivateKey(f, pkey, NULL, NULL, 0, NULL, NULL), 1);
        assert_int_equal(fclose(f), 0);
        assert_int_equal(conf_defaults(&conf), 0);
        conf->key.backend = KEY_BACKEND_FILE;
        assert_int_equal(free_and_strdup(&conf->key.file, key), 0);
        assert_int_equal(hubkey_open(conf, &k, &error), 0);

        assert_int_equal(dpop_proof(k, "GET", "https://c.example/v1/hubs/h/commands?wait=25#x", "tok", "n-1",
                                          1700000000, &proof),
                         0);
        p1 = strchr(proof, '.');
        assert_non_null(p1);
        p2 = strchr(p1 + 1, '.');
        assert_non_null(p2);
        raw = malloc((size_t) (p2 - p1));
        assert_non_null(raw);
        n = b64url_decode(p1 + 1, (size_t) (p2 - p1 - 1), raw, (size_t) (p2 - p1));
        assert_true(n > 0);
        claims = json_loadb((const char *) raw, (size_t) n, 0, NULL);
        free(raw);
        assert_non_null(claims);
        assert_string_equal(json_string_value(json_object_get(claims, "htu")), "https://c.example/v1/hubs/h/commands");
        assert_string_equal(json_string_value(json_object_get(claims, "htm")), "GET");
        assert_string_equal(json_string_value(json_object_get(claims, "nonce")), "n-1");
        assert_int_equal(json_integer_value(json_object_get(claims, "iat")), 1700000000);
        json_decref(claims);

        hubkey_free(k);
        conf_free(conf);
        EVP_PKEY_free(pkey);
        (void) unlink(key);
        (void) rmdir(dir);
}

/* ---- RFC 6749 5.1 token answers: lifetimes clamped, tokens checked at the door ---- */

static void test_token_answer(void **state) {
        static const struct {
                const char *body;
                int r;
                int64_t expires_in;
        } cases[] = {
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":3600}", 0, 3600 },
                { "{\"access_token\":\"abc\",\"token_type\":\"dpop\"}", 0, 0 },
                /* expires_in <= 0 would refresh every second: clamped to the minimum. */
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":0}", 0, OAUTH_EXPIRES_IN_MIN_S },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":-5}", 0, OAUTH_EXPIRES_IN_MIN_S },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":3}", 0, OAUTH_EXPIRES_IN_MIN_S },
                /* A huge one would overflow now + expires_in: clamped to the maximum. */
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":9223372036854775807}", 0,
                  OAUTH_EXPIRES_IN_MAX_S },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":\"3600\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":1e300}", -EBADMSG, 0 },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":3600.5}", -EBADMSG, 0 },
                /* A whole number written as a float (Python's json.dumps(3600.0)): seconds all the same. */
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":3600.0}", 0, 3600 },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":3.6e3}", 0, 3600 },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":-0.0}", 0, OAUTH_EXPIRES_IN_MIN_S },
                /* 2^53 is the last whole double that is exact; 2^53 + 2 is past it. */
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":9007199254740992.0}", 0,
                  OAUTH_EXPIRES_IN_MAX_S },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"expires_in\":9007199254740994.0}", -EBADMSG, 0 },
                /* RFC 6750 2.1 b64token: CR, LF, space, quote, comma are refused. */
                { "{\"access_token\":\"abc\\r\\nX-Evil: 1\",\"token_type\":\"Bearer\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"abc\\n\",\"token_type\":\"Bearer\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"a b\",\"token_type\":\"Bearer\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"a\\\"b\",\"token_type\":\"Bearer\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"a,b\",\"token_type\":\"Bearer\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"a\\u0000b\",\"token_type\":\"Bearer\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"=abc\",\"token_type\":\"Bearer\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"ab=c\",\"token_type\":\"Bearer\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"\",\"token_type\":\"Bearer\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"mF_9.B5f-4.1JqM/+~==\",\"token_type\":\"Bearer\"}", 0, 0 },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"refresh_token\":\"r\\r\\n\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"abc\",\"token_type\":\"MAC\"}", -EBADMSG, 0 },
                { "{\"access_token\":\"abc\",\"token_type\":\"Bearer\",\"access_token\":\"x\"}", -EBADMSG, 0 },
                { "[]", -EBADMSG, 0 },
                { "", -EBADMSG, 0 },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct oauth_token_answer t = {};
                int r = oauth_parse_token_answer(U(cases[i].body), strlen(cases[i].body), &t, NULL);
                if (r != cases[i].r)
                        fail_msg("case %zu (%s): %d, expected %d", i, cases[i].body, r, cases[i].r);
                if (r == 0) {
                        assert_int_equal(t.expires_in, cases[i].expires_in);
                        assert_true(streq(t.token_type, "Bearer") || streq(t.token_type, "DPoP"));
                        oauth_token_answer_done(&t);
                } else
                        assert_null(t.access_token);
        }
}

/* Each refusal says which check failed, without quoting the answer (it may hold tokens). */
static void test_token_answer_why(void **state) {
        static const struct {
                const char *body;
                const char *why_starts;
        } cases[] = {
                { "{\"access_token\":\"sekret\",\"token_type\":\"Bearer\",\"expires_in\":\"3600\"}", "expires_in" },
                { "{\"access_token\":\"sekret\",\"token_type\":\"Bearer\",\"expires_in\":1e300}", "expires_in" },
                { "{\"access_token\":\"sek\\r\\nret\",\"token_type\":\"Bearer\"}", "access_token" },
                { "{\"access_token\":\"sekret\",\"token_type\":\"MAC\"}", "token_type" },
                { "{\"access_token\":\"sekret\",\"token_type\":\"Bearer\",\"refresh_token\":\"\"}", "refresh_token" },
                { "[[[[[[]]]]]]", "not a JSON object" },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct oauth_token_answer t = {};
                const char *why = NULL;
                assert_int_equal(oauth_parse_token_answer(U(cases[i].body), strlen(cases[i].body), &t, &why), -EBADMSG);
                assert_non_null(why);
                if (strncmp(why, cases[i].why_starts, strlen(cases[i].why_starts)) != 0)
                        fail_msg("case %zu: \"%s\"", i, why);
                assert_null(strstr(why, "sekret"));
        }
}

/* ---- RFC 8628 3.2 device answers: the code's lifetime and the interval bounded ---- */

static void test_device_answer(void **state) {
#define DEV(x) "{\"device_code\":\"dc\",\"user_code\":\"UC\",\"verification_uri\":\"https://as/device\"" x "}"
        static const struct {
                const char *body;
                int r;
                int64_t expires_in;
                unsigned interval;
        } cases[] = {
                { DEV(",\"expires_in\":600,\"interval\":5"), 0, 600, 5 },
                { DEV(",\"expires_in\":600"), 0, 600, OAUTH_INTERVAL_DEFAULT_S },
                { DEV(",\"expires_in\":99999999999999"), 0, OAUTH_DEVICE_EXPIRES_MAX_S, 5 },
                { DEV(",\"expires_in\":9223372036854775807,\"interval\":-1"), 0, OAUTH_DEVICE_EXPIRES_MAX_S, 1 },
                { DEV(",\"expires_in\":600,\"interval\":100000"), 0, 600, OAUTH_INTERVAL_MAX_S },
                { DEV(",\"expires_in\":0"), -EBADMSG, 0, 0 },
                { DEV(",\"expires_in\":-3"), -EBADMSG, 0, 0 },
                { DEV(""), -EBADMSG, 0, 0 },
                { DEV(",\"expires_in\":600,\"interval\":\"5\""), -EBADMSG, 0, 0 },
                { DEV(",\"expires_in\":600.0,\"interval\":5.0"), 0, 600, 5 },
                { DEV(",\"expires_in\":600,\"interval\":5.5"), -EBADMSG, 0, 0 },
                { DEV(",\"expires_in\":1e300"), -EBADMSG, 0, 0 },
                { "{\"device_code\":\"dc\",\"user_code\":\"U\\nC\",\"verification_uri\":\"https://as/d\",\"expires_in\":6}",
                  -EBADMSG, 0, 0 },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct oauth_device_answer d = {};
                int r = oauth_parse_device_answer(U(cases[i].body), strlen(cases[i].body), &d);
                if (r != cases[i].r)
                        fail_msg("case %zu (%s): %d, expected %d", i, cases[i].body, r, cases[i].r);
                if (r == 0) {
                        assert_int_equal(d.expires_in, cases[i].expires_in);
                        assert_int_equal(d.interval_s, cases[i].interval);
                        oauth_device_answer_done(&d);
                }
        }
#undef DEV
}

/* ---- RFC 8414 3.3 metadata ---- */

static void test_metadata(void **state) {
        static const struct {
                const char *body;
                int r;
                bool dpop, revocation;
        } cases[] = {
                { "{\"issuer\":\"" ISSUER "\",\"token_endpoint\":\"https://as/t\",\"device_authorization_endpoint\":"
                  "\"https://as/d\",\"revocation_endpoint\":\"https://as/r\",\"dpop_signing_alg_values_supported\":"
                  "[\"RS256\",\"ES256\"]}",
                  0, true, true },
                { "{\"issuer\":\"" ISSUER "\",\"token_endpoint\":\"https://as/t\",\"device_authorization_endpoint\":"
                  "\"https://as/d\"}",
                  0, false, false },
                { "{\"issuer\":\"https://evil\",\"token_endpoint\":\"https://as/t\",\"device_authorization_endpoint\":"
                  "\"https://as/d\"}",
                  -EBADMSG, false, false },
                { "{\"issuer\":\"" ISSUER "\",\"token_endpoint\":\"http://as/t\",\"device_authorization_endpoint\":"
                  "\"https://as/d\"}",
                  -EBADMSG, false, false },
                { "{\"issuer\":\"" ISSUER "\",\"token_endpoint\":\"https://as/t\",\"device_authorization_endpoint\":"
                  "\"https://as/d\",\"revocation_endpoint\":\"https://as/r\\r\\n\"}",
                  -EBADMSG, false, false },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct oauth_metadata m = {};
                int r = oauth_parse_metadata(U(cases[i].body), strlen(cases[i].body), ISSUER, &m);
                if (r != cases[i].r)
                        fail_msg("case %zu: %d, expected %d", i, r, cases[i].r);
                if (r == 0) {
                        assert_int_equal(m.dpop_es256, cases[i].dpop);
                        assert_int_equal(!!m.revocation_endpoint, cases[i].revocation);
                        oauth_metadata_done(&m);
                }
        }
}

/* ---- RFC 6749 5.2 errors and RFC 9449 7.1 / RFC 6750 3 challenges ---- */

static void test_errors(void **state) {
        static const struct {
                const char *body;
                int r;
                const char *error;
        } cases[] = {
                { "{\"error\":\"use_dpop_nonce\",\"error_description\":\"x\"}", 0, "use_dpop_nonce" },
                { "{\"error\":\"invalid_grant\"}", 0, "invalid_grant" },
                { "", -ENOENT, NULL },
                { "{}", -ENOENT, NULL },
                { "{\"error\":7}", -ENOENT, NULL },
                { "{\"error\":\"a\\\"b\"}", -EBADMSG, NULL },
                { "{\"error\":\"a\\nb\"}", -EBADMSG, NULL },
        };
        static const struct {
                const char *value;
                int r;
                const char *error;
        } www[] = {
                { "DPoP algs=\"ES256\", error=\"use_dpop_nonce\", error_description=\"nonce\"", 0, "use_dpop_nonce" },
                { "DPoP error=\"invalid_dpop_proof\"", 0, "invalid_dpop_proof" },
                { "Bearer realm=\"c\", error=\"invalid_token\"", 0, "invalid_token" },
                { "Basic realm=\"x\", error=\"nope\", DPoP error=invalid_token", 0, "invalid_token" },
                { "Basic error=\"nope\"", -ENOENT, NULL },
                { "Newauth abc==, DPoP error=\"use_dpop_nonce\"", 0, "use_dpop_nonce" },
                { "DPoP error=\"unterminated", -ENOENT, NULL },
                { "", -ENOENT, NULL },
                { "DPoP error=\"a\\\"b\"", -EBADMSG, NULL },
        };
        char e[OAUTH_ERROR_CODE_MAX + 1];

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                int r = oauth_parse_error(U(cases[i].body), strlen(cases[i].body), e, sizeof e);
                if (r != cases[i].r)
                        fail_msg("error case %zu: %d, expected %d", i, r, cases[i].r);
                if (r == 0)
                        assert_string_equal(e, cases[i].error);
        }
        for (size_t i = 0; i < ELEMENTSOF(www); i++) {
                int r = oauth_parse_www_authenticate(www[i].value, strlen(www[i].value), e, sizeof e);
                if (r != www[i].r)
                        fail_msg("WWW-Authenticate case %zu (%s): %d, expected %d", i, www[i].value, r, www[i].r);
                if (r == 0)
                        assert_string_equal(e, www[i].error);
        }
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_htu),          cmocka_unit_test(test_dpop_proof_htu),
                cmocka_unit_test(test_token_answer), cmocka_unit_test(test_token_answer_why),
                cmocka_unit_test(test_device_answer),
                cmocka_unit_test(test_metadata),     cmocka_unit_test(test_errors),
                cmocka_unit_test(test_nonce_is_valid),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
