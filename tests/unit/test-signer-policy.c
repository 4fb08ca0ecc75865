/* SPDX-License-Identifier: MIT */
/* iothub-signer's policy (src/signer-policy.c): the strict origin parser on a table of URLs that
 * other parsers read differently, the rules of SIGN_HTTP, SIGN_DPOP and SIGN_COMMAND, and the
 * token bucket. The vendor's command JWS is made here with OpenSSL, not with the code under test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
#include <string.h>

#include <cmocka.h>

#include <openssl/bn.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "../../src/commands-internal.h"
#include "iothub/frame.h"
#include "iothub/signer-policy.h"
#include "iothub/signer-proto.h"
#include "iothub/util.h"

static void test_origin_table(void **state) {
        static const struct {
                const char *url;
                const char *host; /* NULL: refused */
                unsigned port;
        } cases[] = {
                { "https://cloud.example", "cloud.example", 443 },
                { "https://cloud.example/", "cloud.example", 443 },
                { "https://Cloud.EXAMPLE:443/v1?x#y", "cloud.example", 443 },
                { "HTTPS://cloud.example:8443/a", "cloud.example", 8443 },
                { "https://127.0.0.1:18443", "127.0.0.1", 18443 },
                { "https://cloud.example?q", "cloud.example", 443 },
                { "https://cloud.example#f", "cloud.example", 443 },
                { "https://[::1]:8443/x", "[::1]", 8443 },
                { "https://[2001:DB8::1]/", "[2001:db8::1]", 443 },
                { "https://a-b.c/", "a-b.c", 443 },
                { "https://cloud.example:00443/", "cloud.example", 443 },
                { "https://cloud.example:65535/", "cloud.example", 65535 },
                /* refused */
                { "http://cloud.example/", NULL, 0 },
                { "https:/cloud.example/", NULL, 0 },
                { "https:///cloud.example/", NULL, 0 },
                { "https://", NULL, 0 },
                { "https://:443/", NULL, 0 },
                { "https://user@cloud.example/", NULL, 0 },
                { "https://cloud.example@evil.example/", NULL, 0 },
                { "https://cloud.example:443@evil.example/", NULL, 0 },
                { "https://cloud.example:/", NULL, 0 },
                { "https://cloud.example:0/", NULL, 0 },
                { "https://cloud.example:65536/", NULL, 0 },
                { "https://cloud.example:123456/", NULL, 0 },
                { "https://cloud.example:+443/", NULL, 0 },
                { "https://cloud.example:44a/", NULL, 0 },
                { "https://cloud.example:443:443/", NULL, 0 },
                { "https://cloud%2eexample/", NULL, 0 },
                { "https://cloud.example\\@evil.example/", NULL, 0 },
                { "https://cloud.example./", NULL, 0 },
                { "https://.cloud.example/", NULL, 0 },
                { "https://cloud..example/", NULL, 0 },
                { "https://cloud_example/", NULL, 0 },
                { "https://cloud.example /", NULL, 0 },
                { "https://cloud.example\t/", NULL, 0 },
                { "https://cloud.ex\xc3\xa4mple/", NULL, 0 },
                { "https://[::1/", NULL, 0 },
                { "https://[::1]x/", NULL, 0 },
                { "https://[fe80::1%25eth0]/", NULL, 0 },
                { "https://[1.2.3.4]/", NULL, 0 },
                { "https://[]/", NULL, 0 },
                { " https://cloud.example/", NULL, 0 },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct signer_origin o = { .port = 7 };
                int r = signer_origin_parse(cases[i].url, strlen(cases[i].url), &o);
                if (!cases[i].host) {
                        if (r != -EINVAL)
                                fail_msg("%s: accepted as %s:%u", cases[i].url, o.host, o.port);
                        assert_int_equal(o.port, 7); /* untouched */
                        continue;
                }
                if (r < 0)
                        fail_msg("%s: refused", cases[i].url);
                assert_string_equal(o.host, cases[i].host);
                assert_int_equal(o.port, cases[i].port);
        }
        /* Over SIGNER_URL_MAX; a length shorter than the string is what is parsed. */
        {
                char big[SIGNER_URL_MAX + 2];
                struct signer_origin o;
                memset(big, 'a', sizeof big - 1);
                memcpy(big, "https://a/", 10);
                big[sizeof big - 1] = '\0';
                assert_int_equal(signer_origin_parse(big, strlen(big), &o), -EINVAL);
                assert_int_equal(signer_origin_parse(big, SIGNER_URL_MAX, &o), 0);
                assert_int_equal(signer_origin_parse("https://a.b:1", 11, &o), 0);
                assert_string_equal(o.host, "a.b");
                assert_int_equal(o.port, 443);
        }
}

static struct iothub_conf *conf_new(const char *cloud, const char *issuer) {
        struct iothub_conf *c = NULL;
        assert_int_equal(conf_defaults(&c), 0);
        assert_int_equal(free_and_strdup(&c->hub.id, "hub-1"), 0);
        if (cloud)
                assert_int_equal(free_and_strdup(&c->cloud.url, cloud), 0);
        if (issuer)
                assert_int_equal(free_and_strdup(&c->oauth.issuer, issuer), 0);
        c->frames.max_clock_skew_s = 300;
        return c;
}

/* Each request iothubd sends (PROTOCOL.md 3 and 5, as cloud.c, commands.c and events.c build
 * them: [cloud] url, then the path) passes; each near miss is refused. */
static const struct {
        const char *method, *uri;
} allowed_requests[] = {
        { "POST", "https://cloud.example/api/v1/hubs/hub-1" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/attest/challenge" },
        { "PUT", "https://cloud.example/api/v1/hubs/hub-1/devices" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/status" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/commands?wait=25" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/commands?wait=0" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/commands/cmd-1/result" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/commands/a.b_C-9/result" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/events" },
        /* The origin compares as RFC 3986 6.2.2.1 and 6.2.3 say. */
        { "POST", "HTTPS://CLOUD.example:443/api/v1/hubs/hub-1/status" },
};

static const struct {
        const char *method, *uri, *what;
} refused_requests[] = {
        { "POST", "https://cloud.example/api/v1/hubs/hub-2/status", "another hub id" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-10/status", "a hub id that starts with ours" },
        { "POST", "https://cloud.example/api/v1/hubs/hub/status", "a hub id that ours starts with" },
        { "POST", "https://cloud.example/api/v1/hubs/HUB-1/status", "the hub id in another case" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/status/x", "an extra path segment" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/status/", "a trailing slash" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1//status", "an empty segment" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/x/../status", "a dot-dot segment" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/./status", "a dot segment" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/commands/../result", "a command id of .." },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/commands/./result", "a command id of ." },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/commands//result", "an empty command id" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/commands/a/b/result", "a command id with a slash" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/commands/a~b/result", "a command id with a ~" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1%2Fstatus", "a percent-encoded slash" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/%73tatus", "a percent-encoded letter" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/status?x=1", "a query where none is" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/status?", "an empty query where none is" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/commands", "the poll without its query" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/commands?", "the poll with an empty query" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/commands?wait=", "wait without digits" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/commands?wait=1000", "wait of 4 digits" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/commands?wait=25&x=1", "a second query parameter" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/commands?x=1", "another query" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/commands?wait=25#f", "a fragment" },
        { "GET", "https://cloud.example/api/v1/hubs/hub-1/status", "the wrong method (GET status)" },
        { "PUT", "https://cloud.example/api/v1/hubs/hub-1/status", "the wrong method (PUT status)" },
        { "DELETE", "https://cloud.example/api/v1/hubs/hub-1", "the wrong method (DELETE the hub)" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/devices", "the wrong method (POST devices)" },
        { "POST", "https://cloud.example/api/v1/hubs/hub-1/commands?wait=25", "the wrong method (POST poll)" },
        { "PATCH", "https://cloud.example/api/v1/hubs/hub-1/status", "a method never signed" },
        { "post", "https://cloud.example/api/v1/hubs/hub-1/status", "a method in lower case" },
        { "POST", "https://cloud.example/v1/hubs/hub-1/status", "outside [cloud] url's path" },
        { "POST", "https://cloud.example/apix/v1/hubs/hub-1/status", "a path that starts like [cloud] url's" },
        { "POST", "https://cloud.example/API/v1/hubs/hub-1/status", "[cloud] url's path in another case" },
        { "POST", "https://cloud.example/api/v2/hubs/hub-1/status", "another version" },
        { "POST", "https://cloud.example/api/", "[cloud] url itself" },
        { "POST", "https://cloud.example:444/api/v1/hubs/hub-1/status", "another port" },
        { "POST", "https://login.example:8443/api/v1/hubs/hub-1/status", "the issuer's origin" },
};

static void test_http_table(void **state) {
        _cleanup_conf_ struct iothub_conf *c = conf_new("https://cloud.example/api/",
                                                        "https://login.example:8443/realms/x");
        struct signer_policy p;
        const char *why;

        assert_int_equal(signer_policy_init(&p, c, NULL), 0);
        for (size_t i = 0; i < ELEMENTSOF(allowed_requests); i++) {
                why = NULL;
                if (signer_policy_http(&p, allowed_requests[i].method, allowed_requests[i].uri, "Bearer a", &why) < 0)
                        fail_msg("%s %s: refused (%s)", allowed_requests[i].method, allowed_requests[i].uri, why);
                /* The same request's DPoP proof, with a DPoP-bound token (RFC 9449 7.1). */
                if (signer_policy_dpop(&p, allowed_requests[i].method, allowed_requests[i].uri, NULL, NULL, &why) < 0)
                        fail_msg("DPoP %s %s: refused (%s)", allowed_requests[i].method, allowed_requests[i].uri, why);
        }
        for (size_t i = 0; i < ELEMENTSOF(refused_requests); i++) {
                why = NULL;
                if (signer_policy_http(&p, refused_requests[i].method, refused_requests[i].uri, "Bearer a",
                                       &why) != -EPERM)
                        fail_msg("%s: %s %s signed", refused_requests[i].what, refused_requests[i].method,
                                 refused_requests[i].uri);
                assert_non_null(why);
                if (streq(refused_requests[i].uri, "https://login.example:8443/api/v1/hubs/hub-1/status") &&
                    streq(refused_requests[i].method, "POST"))
                        continue; /* a POST to the issuer's origin is a DPoP proof it may have */
                if (signer_policy_dpop(&p, refused_requests[i].method, refused_requests[i].uri, NULL, NULL,
                                       &why) != -EPERM)
                        fail_msg("DPoP %s: %s %s signed", refused_requests[i].what, refused_requests[i].method,
                                 refused_requests[i].uri);
        }
        signer_policy_done(&p);

        /* [cloud] url without a path: the requests start at the root. */
        {
                _cleanup_conf_ struct iothub_conf *root = conf_new("https://127.0.0.1:18443", NULL);
                static const char ok[] = "https://127.0.0.1:18443/v1/hubs/hub-1/status";
                static const char under[] = "https://127.0.0.1:18443/api/v1/hubs/hub-1/status";
                static const char empty[] = "https://127.0.0.1:18443//v1/hubs/hub-1/status";

                assert_int_equal(signer_policy_init(&p, root, NULL), 0);
                assert_int_equal(signer_policy_http(&p, "POST", ok, "Bearer a", &why), 0);
                assert_int_equal(signer_policy_http(&p, "POST", under, "Bearer a", &why), -EPERM);
                assert_int_equal(signer_policy_http(&p, "POST", empty, "Bearer a", &why), -EPERM);
                signer_policy_done(&p);
        }
        /* A [cloud] url no request could be built on: the signer does not start. */
        {
                static const char *const bad[] = { "https://cloud.example/api?x=1", "https://cloud.example/api#f",
                                                   "https://cloud.example/a/../api", "https://cloud.example/./api",
                                                   "https://cloud.example/api/.." };
                for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                        _cleanup_conf_ struct iothub_conf *b = conf_new(bad[i], NULL);
                        _cleanup_free_ char *err = NULL;
                        p.have_cloud = true; /* untouched on failure */
                        if (signer_policy_init(&p, b, &err) != -EINVAL)
                                fail_msg("%s: taken", bad[i]);
                        assert_non_null(err);
                        assert_true(p.have_cloud);
                }
        }
}

/* Only the methods iothubd sends are signed: DELETE (once listed, never sent) and PATCH are
 * refused for what they are, before the request table is consulted, even on the issuer's
 * origin, where any POST may have a DPoP proof. */
static void test_methods(void **state) {
        _cleanup_conf_ struct iothub_conf *c = conf_new("https://cloud.example/api/",
                                                        "https://login.example:8443/realms/x");
        static const char *const refused[] = { "DELETE", "PATCH", "HEAD", "OPTIONS", "delete", "" };
        static const char hub[] = "https://cloud.example/api/v1/hubs/hub-1";
        static const char token[] = "https://login.example:8443/realms/x/token";
        struct signer_policy p;
        const char *why;

        assert_true(signer_method_is_allowed("GET"));
        assert_true(signer_method_is_allowed("POST"));
        assert_true(signer_method_is_allowed("PUT"));
        assert_false(signer_method_is_allowed(NULL));
        assert_int_equal(signer_policy_init(&p, c, NULL), 0);
        for (size_t i = 0; i < ELEMENTSOF(refused); i++) {
                assert_false(signer_method_is_allowed(refused[i]));
                why = NULL;
                assert_int_equal(signer_policy_http(&p, refused[i], hub, "Bearer a", &why), -EPERM);
                assert_string_equal(why, "method is not GET, POST or PUT");
                why = NULL;
                assert_int_equal(signer_policy_dpop(&p, refused[i], hub, NULL, NULL, &why), -EPERM);
                assert_string_equal(why, "method is not GET, POST or PUT");
                why = NULL;
                assert_int_equal(signer_policy_dpop(&p, refused[i], token, NULL, NULL, &why), -EPERM);
                assert_string_equal(why, "method is not GET, POST or PUT");
        }
        signer_policy_done(&p);
}

static void test_http_dpop(void **state) {
        _cleanup_conf_ struct iothub_conf *c = conf_new("https://cloud.example/api", "https://login.example:8443/realms/x");
        struct signer_policy p;
        const char *why = NULL;
        static const char ath[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJK-_0123";
        static const char status[] = "https://cloud.example/api/v1/hubs/hub-1/status";

        assert_int_equal(signer_policy_init(&p, c, NULL), 0);
        assert_int_equal(signer_policy_http(&p, "POST", status, "Bearer a", &why), 0);
        assert_int_equal(signer_policy_http(&p, "POST", status, "DPoP a.b-c_d~e+f/g=", &why), 0);
        assert_int_equal(signer_policy_http(&p, "POST", "https://cloud.example:444/api/v1/hubs/hub-1/status",
                                            "Bearer a", &why),
                         -EPERM);
        assert_non_null(why);
        /* PROTOCOL.md 3: every request carries Authorization, and the signature covers it. */
        assert_int_equal(signer_policy_http(&p, "POST", status, NULL, &why), -EPERM);
        assert_int_equal(signer_policy_http(&p, "POST", status, "Bearer a\nb", &why), -EPERM);
        assert_int_equal(signer_policy_http(&p, "POST", status, "Bearer  a", &why), -EPERM);
        assert_int_equal(signer_policy_http(&p, "POST", status, " Bearer", &why), -EPERM);
        assert_int_equal(signer_policy_http(&p, "POST", status, "Bearer ", &why), -EPERM);
        assert_int_equal(signer_policy_http(&p, NULL, status, "Bearer a", &why), -EPERM);
        assert_int_equal(signer_policy_http(&p, "POST", NULL, "Bearer a", &why), -EPERM);

        /* The issuer's endpoints: POST only (token, device authorization, revocation). */
        assert_int_equal(signer_policy_dpop(&p, "POST", "https://login.example:8443/realms/x/token", ath, "n", &why), 0);
        assert_int_equal(signer_policy_dpop(&p, "POST", "https://login.example:8443/realms/x/device?x=1#f", NULL, NULL, &why), 0);
        assert_int_equal(signer_policy_dpop(&p, "GET", "https://login.example:8443/realms/x/token", NULL, NULL, &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "PUT", "https://login.example:8443/realms/x/token", NULL, NULL, &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "DELETE", "https://login.example:8443/realms/x/token", NULL, NULL, &why), -EPERM);
        /* A token endpoint on another origin than the issuer's (its metadata may name one). */
        assert_int_equal(signer_policy_dpop(&p, "POST", "https://login.example/realms/x/token", NULL, NULL, &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", "https://token.login.example:8443/token", NULL, NULL, &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", "https://evil.example/", NULL, NULL, &why), -EPERM);
        /* The cloud's: only its requests (and not a POST to any path of it). */
        assert_int_equal(signer_policy_dpop(&p, "GET", "https://cloud.example/api/v1/hubs/hub-1/commands?wait=25", ath, NULL, &why), 0);
        assert_int_equal(signer_policy_dpop(&p, "POST", "https://cloud.example/token", NULL, NULL, &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "GET", "https://cloud.example/api/v1/c", NULL, NULL, &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", status, "short", NULL, &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", status, NULL, "a b", &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", status, NULL, "a\\b", &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", status, NULL, "", &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", status, NULL, "a\"b", &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", status, NULL, "a\x7f", &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", status, NULL, "\xc3\xa9", &why), -EPERM);
        assert_int_equal(signer_policy_dpop(&p, "POST", status, NULL, "!#[]~", &why), 0);
        assert_int_equal(signer_policy_dpop(&p, "POST", status, ath, "n-1", &why), 0);
        signer_policy_done(&p);

        /* The issuer and the cloud on one origin: the issuer's POSTs and the cloud's requests. */
        {
                _cleanup_conf_ struct iothub_conf *one = conf_new("https://hub.example/cloud", "https://hub.example/auth");
                assert_int_equal(signer_policy_init(&p, one, NULL), 0);
                assert_int_equal(signer_policy_dpop(&p, "POST", "https://hub.example/auth/token", NULL, NULL, &why), 0);
                assert_int_equal(signer_policy_dpop(&p, "PUT", "https://hub.example/cloud/v1/hubs/hub-1/devices", NULL, NULL, &why), 0);
                assert_int_equal(signer_policy_dpop(&p, "GET", "https://hub.example/auth/token", NULL, NULL, &why), -EPERM);
                assert_int_equal(signer_policy_http(&p, "POST", "https://hub.example/auth/token", "Bearer a", &why), -EPERM);
                signer_policy_done(&p);
        }

        /* Nothing configured: nothing signed. */
        {
                _cleanup_conf_ struct iothub_conf *none = conf_new(NULL, NULL);
                assert_int_equal(signer_policy_init(&p, none, NULL), 0);
                assert_int_equal(signer_policy_http(&p, "POST", status, "Bearer a", &why), -EPERM);
                assert_int_equal(signer_policy_dpop(&p, "POST", status, NULL, NULL, &why), -EPERM);
                signer_policy_done(&p);
        }
}

/* ---- commands, with and without the vendor's key ---- */

static EVP_PKEY *vendor;
static char vendor_pem_path[64];
static char vendor_kid[HUBKEY_ID_LEN + 1];

static void b64url(const void *in, size_t len, char **ret) {
        char *s = malloc(B64URL_BUF(len));
        assert_non_null(s);
        (void) b64url_encode(in, len, s);
        *ret = s;
}

/* ES256 JWS Compact by the vendor's key over payload, made with OpenSSL here. */
static char *vendor_jws(EVP_PKEY *key, const char *kid, const char *payload) {
        _cleanup_free_ char *h = NULL, *p = NULL, *input = NULL, *sig64 = NULL, *header = NULL;
        unsigned char der[128], raw[64];
        size_t der_len = sizeof der;
        const unsigned char *q = der;
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        ECDSA_SIG *sig;
        char *out;

        assert_true(asprintf(&header, "{\"alg\":\"ES256\",\"typ\":\"iothub-cloud-cmd\",\"kid\":\"%s\"}", kid) > 0);
        b64url(header, strlen(header), &h);
        b64url(payload, strlen(payload), &p);
        assert_true(asprintf(&input, "%s.%s", h, p) > 0);
        assert_int_equal(EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, key), 1);
        assert_int_equal(EVP_DigestSign(md, der, &der_len, (unsigned char *) input, strlen(input)), 1);
        EVP_MD_CTX_free(md);
        sig = d2i_ECDSA_SIG(NULL, &q, (long) der_len);
        assert_non_null(sig);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_r(sig), raw, 32), 32);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_s(sig), raw + 32, 32), 32);
        ECDSA_SIG_free(sig);
        b64url(raw, sizeof raw, &sig64);
        assert_true(asprintf(&out, "%s.%s", input, sig64) > 0);
        return out;
}

static int group_setup(void **state) {
        FILE *f;
        int fd;

        vendor = EVP_EC_gen("P-256");
        if (!vendor)
                return -1;
        strcpy(vendor_pem_path, "/tmp/test-signer-policy-XXXXXX");
        fd = mkstemp(vendor_pem_path);
        if (fd < 0)
                return -1;
        (void) fchmod(fd, 0644);
        f = fdopen(fd, "w");
        if (!f || PEM_write_PUBKEY(f, vendor) != 1)
                return -1;
        fclose(f);
        return 0;
}

static int group_teardown(void **state) {
        (void) unlink(vendor_pem_path);
        EVP_PKEY_free(vendor);
        return 0;
}

static void test_command(void **state) {
        _cleanup_conf_ struct iothub_conf *c = conf_new("https://cloud.example/", NULL);
        struct signer_policy p;
        struct command_set set = {};
        const char *why = NULL;
        int64_t now = 1800000000;
        char payload[512];
        _cleanup_free_ char *good = NULL, *other_set = NULL, *other_hub = NULL, *by_stranger = NULL;
        EVP_PKEY *stranger = EVP_EC_gen("P-256");

        /* Without a command key: time and shape rules only. */
        assert_int_equal(signer_policy_init(&p, c, NULL), 0);
        assert_null(p.command_key);
        assert_int_equal(signer_policy_command(&p, now, "lamp-1", "c1", (uint64_t) now, (uint64_t) now + 60,
                                               "{\"on\":true,\"bri\":7}", 19, NULL, &set, &why), 0);
        assert_true(set.has_on && set.on && set.has_bri && set.bri == 7 && !set.has_ct);
        /* iat at the edges of the skew, and past them */
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now - 300, (uint64_t) now + 60, "{\"on\":true}", 11, NULL, &set, &why), 0);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now + 300, (uint64_t) now + 360, "{\"on\":true}", 11, NULL, &set, &why), 0);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now - 301, (uint64_t) now + 60, "{\"on\":true}", 11, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now + 301, (uint64_t) now + 360, "{\"on\":true}", 11, NULL, &set, &why), -EPERM);
        /* exp: after iat, at most a day after it, in the future */
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now, (uint64_t) now, "{\"on\":true}", 11, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now, (uint64_t) now + 86400, "{\"on\":true}", 11, NULL, &set, &why), 0);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now - 10, (uint64_t) now + 86391, "{\"on\":true}", 11, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now - 100, (uint64_t) now - 1, "{\"on\":true}", 11, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", UINT64_MAX, UINT64_MAX, "{\"on\":true}", 11, NULL, &set, &why), -EPERM);
        /* set */
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now, (uint64_t) now + 60, "{}", 2, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now, (uint64_t) now + 60, "[1]", 3, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now, (uint64_t) now + 60, "{\"on\":1}", 8, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now, (uint64_t) now + 60, "{\"on\":true,\"on\":false}", 23, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l", "c", (uint64_t) now, (uint64_t) now + 60, "{\"on\":true} x", 13, NULL, &set, &why), -EPERM);
        /* ids */
        assert_int_equal(signer_policy_command(&p, now, ".l", "c", (uint64_t) now, (uint64_t) now + 60, "{\"on\":true}", 11, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l/x", "c", (uint64_t) now, (uint64_t) now + 60, "{\"on\":true}", 11, NULL, &set, &why), -EPERM);
        assert_int_equal(signer_policy_command(&p, now, "l", "..", (uint64_t) now, (uint64_t) now + 60, "{\"on\":true}", 11, NULL, &set, &why), -EPERM);
        signer_policy_done(&p);

        /* With the vendor's key: only what the vendor signed for this hub. */
        assert_int_equal(free_and_strdup(&c->cloud.command_key_file, vendor_pem_path), 0);
        assert_int_equal(signer_policy_init(&p, c, NULL), 0);
        assert_non_null(p.command_key);
        strcpy(vendor_kid, p.command_kid);
        snprintf(payload, sizeof payload, "{\"hub\":\"hub-1\",\"id\":\"c1\",\"dev\":\"lamp-1\",\"exp\":%" PRId64 ",\"set\":{\"on\":true}}",
                 now + 60);
        good = vendor_jws(vendor, vendor_kid, payload);
        by_stranger = vendor_jws(stranger, vendor_kid, payload);
        snprintf(payload, sizeof payload, "{\"hub\":\"hub-1\",\"id\":\"c1\",\"dev\":\"lamp-1\",\"exp\":%" PRId64 ",\"set\":{\"on\":false}}",
                 now + 60);
        other_set = vendor_jws(vendor, vendor_kid, payload);
        snprintf(payload, sizeof payload, "{\"hub\":\"hub-2\",\"id\":\"c1\",\"dev\":\"lamp-1\",\"exp\":%" PRId64 ",\"set\":{\"on\":true}}",
                 now + 60);
        other_hub = vendor_jws(vendor, vendor_kid, payload);
#define CMD(dev, id, exp, cloud) \
        signer_policy_command(&p, now, dev, id, (uint64_t) now, (uint64_t) (exp), "{\"on\":true}", 11, cloud, &set, &why)
        assert_int_equal(CMD("lamp-1", "c1", now + 60, good), 0);
        assert_int_equal(CMD("lamp-1", "c1", now + 60, NULL), -EPERM);
        assert_int_equal(CMD("lamp-1", "c1", now + 60, by_stranger), -EPERM);
        assert_int_equal(CMD("lamp-1", "c1", now + 60, other_set), -EPERM);
        assert_int_equal(CMD("lamp-1", "c1", now + 60, other_hub), -EPERM);
        assert_int_equal(CMD("lamp-2", "c1", now + 60, good), -EPERM);
        assert_int_equal(CMD("lamp-1", "c2", now + 60, good), -EPERM);
        assert_int_equal(CMD("lamp-1", "c1", now + 61, good), -EPERM);
        assert_int_equal(CMD("lamp-1", "c1", now + 60, "not.a.jws"), -EPERM);
#undef CMD
        signer_policy_done(&p);
        EVP_PKEY_free(stranger);
}

static void test_bucket(void **state) {
        struct signer_bucket b = {};
        unsigned ok = 0;

        /* Starts full: burst at once, then nothing until time passes. */
        for (int i = 0; i < 10; i++)
                ok += signer_bucket_take(&b, 2, 5, 1000000);
        assert_int_equal(ok, 5);
        assert_false(signer_bucket_take(&b, 2, 5, 1000000));
        assert_false(signer_bucket_take(&b, 2, 5, 1400000)); /* 0.8 token */
        assert_true(signer_bucket_take(&b, 2, 5, 1500000));  /* 1.0 */
        assert_false(signer_bucket_take(&b, 2, 5, 1500000));
        /* A long pause refills to burst, not beyond. */
        ok = 0;
        for (int i = 0; i < 10; i++)
                ok += signer_bucket_take(&b, 2, 5, 1000000000);
        assert_int_equal(ok, 5);
        /* A clock that goes back (it does not: monotonic) takes nothing away. */
        assert_false(signer_bucket_take(&b, 2, 5, 1));
        assert_true(signer_bucket_take(&b, 2, 5, 1000500000));
}

/* The op sets of the two peers (issue 14 stage 2): the spec's table, written out here again
 * rather than read from signer-policy.c, so that a change to either is seen. */
static void test_roles(void **state) {
        static const struct {
                unsigned op;
                bool client, command; /* the uplink's, iothubd's */
        } table[] = {
                { SIGNER_OP_KEY_INFO, true, true },        { SIGNER_OP_SIGN_HTTP, true, false },
                { SIGNER_OP_SIGN_DPOP, true, false },      { SIGNER_OP_SIGN_COMMAND, false, true },
                { SIGNER_OP_TOKENS_GET, true, false },     { SIGNER_OP_TOKENS_PUT, true, false },
                { SIGNER_OP_TOKENS_ERASE, true, false },   { SIGNER_OP_ATTEST_BEGIN, true, false },
                { SIGNER_OP_ATTEST_ANSWER, true, false },  { SIGNER_OP_STATUS, true, true },
                { SIGNER_OP_CANCEL, true, true },
        };
        const unsigned both = SIGNER_ROLE_CLIENT | SIGNER_ROLE_COMMAND;

        assert_int_equal(ELEMENTSOF(table), _SIGNER_OP_MAX - 1); /* every op has its row */
        for (size_t i = 0; i < ELEMENTSOF(table); i++) {
                assert_int_equal(signer_policy_op_allowed(SIGNER_ROLE_CLIENT, table[i].op), table[i].client);
                assert_int_equal(signer_policy_op_allowed(SIGNER_ROLE_COMMAND, table[i].op), table[i].command);
                /* One user named twice: the union. */
                assert_true(signer_policy_op_allowed(both, table[i].op));
                /* No role, no op. */
                assert_false(signer_policy_op_allowed(0, table[i].op));
        }
        /* Op 0 and ops past the table: nobody (the codec refuses them first anyway). */
        for (unsigned op = 0; op < 0x10000; op += op < 64 ? 1 : 977)
                if (op == 0 || op >= _SIGNER_OP_MAX)
                        assert_false(signer_policy_op_allowed(both, op));

        /* Roles from uids: 990 the uplink (client_user), 991 iothubd (command_user). */
        assert_int_equal(signer_policy_roles(990, 990, 991), SIGNER_ROLE_CLIENT);
        assert_int_equal(signer_policy_roles(991, 990, 991), SIGNER_ROLE_COMMAND);
        assert_int_equal(signer_policy_roles(0, 990, 991), 0);   /* root: no exception */
        assert_int_equal(signer_policy_roles(992, 990, 991), 0); /* a third uid */
        assert_int_equal(signer_policy_roles(1000, 1000, 1000), both);
        assert_string_equal(signer_policy_roles_to_string(SIGNER_ROLE_CLIENT), "client_user");
        assert_string_equal(signer_policy_roles_to_string(SIGNER_ROLE_COMMAND), "command_user");
        assert_string_equal(signer_policy_roles_to_string(both), "client_user and command_user");
        assert_string_equal(signer_policy_roles_to_string(0), "no role");
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_origin_table),
                cmocka_unit_test(test_http_table),
                cmocka_unit_test(test_methods),
                cmocka_unit_test(test_http_dpop),
                cmocka_unit_test(test_command),
                cmocka_unit_test(test_bucket),
                cmocka_unit_test(test_roles),
        };
        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
