/* SPDX-License-Identifier: MIT */
/* Unit tests of the HTTP Message Signatures (RFC 9421) and Content-Digest (RFC 9530) of hub -> cloud
 * requests (src/httpsig.c, PROTOCOL.md 3). The hub key is the real one with the 'file' backend: a
 * P-256 key generated here, written 0600 into a temporary directory. Everything httpsig.c produces
 * is checked against values made independently: hand-written signature bases, digests computed
 * once with `openssl dgst -sha256 -binary | base64`, and signatures verified with plain OpenSSL
 * (r||s turned into DER) over a base rebuilt here.
 *
 * With HTTPSIG_TEST_EXPORT=<file> set, one signed request (base, headers, public key PEM) is
 * written there as JSON, for a cross-check with another implementation (node:crypto). */
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <cmocka.h>
#include <jansson.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "iothub/conf.h"
#include "iothub/frame.h"
#include "iothub/httpsig.h"
#include "iothub/hubkey.h"
#include "iothub/util.h"

/* ---- fixtures: a P-256 hub key in a PEM file, opened through hubkey_open() ---- */

struct fixture {
        char dir[PATH_MAX];
        char key_path[PATH_MAX];
        EVP_PKEY *pkey; /* the same key, kept here to verify with */
        struct iothub_conf *conf;
        struct hubkey *k;
};

static struct fixture F;

static int group_setup(void **state) {
        const char *tmp = getenv("TMPDIR") ?: "/tmp";
        _cleanup_free_ char *error = NULL;
        FILE *f;
        int fd, r;

        if ((size_t) snprintf(F.dir, sizeof F.dir, "%s/test-httpsig-XXXXXX", tmp) >= sizeof F.dir ||
            !mkdtemp(F.dir))
                return -1;
        if ((size_t) snprintf(F.key_path, sizeof F.key_path, "%s/hub.pem", F.dir) >= sizeof F.key_path)
                return -1;

        F.pkey = EVP_EC_gen("P-256");
        if (!F.pkey)
                return -1;
        fd = open(F.key_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0)
                return -1;
        f = fdopen(fd, "w");
        if (!f) {
                close(fd);
                return -1;
        }
        r = PEM_write_PrivateKey(f, F.pkey, NULL, NULL, 0, NULL, NULL);
        if (fclose(f) != 0 || r != 1)
                return -1;

        if (conf_defaults(&F.conf) < 0)
                return -1;
        F.conf->key.backend = KEY_BACKEND_FILE;
        if (free_and_strdup(&F.conf->key.file, F.key_path) < 0)
                return -1;
        r = hubkey_open(F.conf, &F.k, &error);
        if (r < 0) {
                print_error("hubkey_open(%s): %s: %s\n", F.key_path, strerror(-r), error ?: "");
                return -1;
        }
        return 0;
}

static int group_teardown(void **state) {
        hubkey_free(F.k);
        conf_free(F.conf);
        EVP_PKEY_free(F.pkey);
        (void) unlink(F.key_path);
        (void) rmdir(F.dir);
        return 0;
}

/* ---- independent helpers ---- */

#define SIG_B64_LEN 88 /* 64 bytes, standard base64 with padding */
#define NONCE_B64_LEN 22 /* 16 bytes, base64url without padding */

/* Verifies a raw r||s ECDSA P-256 SHA-256 signature over msg with plain OpenSSL: 1 good, 0 bad. */
static int verify_rs(EVP_PKEY *pkey, const char *msg, const uint8_t sig[HUBKEY_SIG_LEN]) {
        ECDSA_SIG *es = ECDSA_SIG_new();
        BIGNUM *r = BN_bin2bn(sig, 32, NULL), *s = BN_bin2bn(sig + 32, 32, NULL);
        unsigned char *der = NULL;
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        int der_len, ok;

        assert_non_null(es);
        assert_non_null(r);
        assert_non_null(s);
        assert_non_null(ctx);
        assert_int_equal(ECDSA_SIG_set0(es, r, s), 1);
        der_len = i2d_ECDSA_SIG(es, &der);
        assert_true(der_len > 0);
        assert_int_equal(EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, pkey), 1);
        ok = EVP_DigestVerify(ctx, der, (size_t) der_len, (const unsigned char *) msg, strlen(msg));
        assert_true(ok == 0 || ok == 1);
        EVP_MD_CTX_free(ctx);
        OPENSSL_free(der);
        ECDSA_SIG_free(es);
        return ok;
}

/* "Signature: hub=:<88 characters of base64>:" -> the 64 bytes. */
static void decode_signature(const char *hdr, uint8_t ret[HUBKEY_SIG_LEN]) {
        static const char prefix[] = "Signature: hub=:";
        const char *b64 = hdr + strlen(prefix);
        uint8_t buf[SIG_B64_LEN / 4 * 3];

        assert_non_null(hdr);
        assert_memory_equal(hdr, prefix, strlen(prefix));
        assert_int_equal(strlen(b64), SIG_B64_LEN + 1);
        assert_int_equal(b64[SIG_B64_LEN], ':');
        /* 64 bytes leave one byte over in the last group: two '=' of padding (RFC 4648 4). */
        assert_memory_equal(b64 + SIG_B64_LEN - 2, "==", 2);
        assert_int_equal(EVP_DecodeBlock(buf, (const unsigned char *) b64, SIG_B64_LEN), (int) sizeof buf);
        memcpy(ret, buf, HUBKEY_SIG_LEN);
}

/* Checks "Signature-Input: hub=<params>" field by field against PROTOCOL.md 3 and returns a
 * pointer to <params> and the nonce (NUL-terminated, NONCE_B64_LEN characters). */
static const char *check_signature_input(const char *hdr, bool has_body, int64_t created,
                                         char ret_nonce[NONCE_B64_LEN + 1]) {
        static const char label[] = "Signature-Input: hub=";
        _cleanup_free_ char *head = NULL, *tail = NULL;
        uint8_t nonce[HTTPSIG_NONCE_BYTES + 1];
        const char *p;

        head = strdup_printf("%s%s;created=%" PRId64 ";expires=%" PRId64 ";nonce=\"", label,
                             has_body ? "(\"@method\" \"@target-uri\" \"content-digest\" \"authorization\")"
                                      : "(\"@method\" \"@target-uri\" \"authorization\")",
                             created, created + 60);
        tail = strdup_printf("\";keyid=\"%s\";alg=\"ecdsa-p256-sha256\"", hubkey_id(F.k));
        assert_non_null(head);
        assert_non_null(tail);

        assert_non_null(hdr);
        assert_true(strlen(hdr) > strlen(head) + NONCE_B64_LEN);
        assert_memory_equal(hdr, head, strlen(head));
        p = hdr + strlen(head);
        memcpy(ret_nonce, p, NONCE_B64_LEN);
        ret_nonce[NONCE_B64_LEN] = '\0';
        assert_string_equal(p + NONCE_B64_LEN, tail);
        /* RFC 9421 2.3 nonce: 16 random bytes, base64url without padding. */
        assert_int_equal(b64url_decode(ret_nonce, NONCE_B64_LEN, nonce, sizeof nonce), HTTPSIG_NONCE_BYTES);
        return hdr + strlen(label);
}

/* RFC 9421 2.5, rebuilt here from the pieces, with values already trimmed. */
static char *rebuild_base(const char *method, const char *uri, const char *auth, const char *digest,
                          const char *params) {
        _cleanup_free_ char *digest_line = NULL;
        char *s;

        digest_line = digest ? strdup_printf("\"content-digest\": %s\n", digest) : strdup("");
        assert_non_null(digest_line);
        s = strdup_printf("\"@method\": %s\n\"@target-uri\": %s\n%s\"authorization\": %s\n"
                          "\"@signature-params\": %s",
                          method, uri, digest_line, auth, params);
        assert_non_null(s);
        return s;
}

/* ---- httpsig_signature_base(): hand-written expected bases, byte for byte ---- */

/* The request of the RFC 9421 2.5 example (POST /foo?param=Value&Pet=dog to example.com, body
 * {"hello": "world"}, created 1618884473), with this profile's components and parameters; the
 * key id is the RFC 7638 3.1 example thumbprint and the nonce the bytes 00 01 .. 0f. */
#define URI "https://example.com/foo?param=Value&Pet=dog"
#define AUTH "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2ln"
#define CD_HELLO "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
#define PARAMS_TAIL                                                                                        \
        ";created=1618884473;expires=1618884533;nonce=\"AAECAwQFBgcICQoLDA0ODw\""                           \
        ";keyid=\"NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs\";alg=\"ecdsa-p256-sha256\""
#define PARAMS_BODY "(\"@method\" \"@target-uri\" \"content-digest\" \"authorization\")" PARAMS_TAIL
#define PARAMS_NO_BODY "(\"@method\" \"@target-uri\" \"authorization\")" PARAMS_TAIL

static const char base_body[] =
        "\"@method\": POST\n"
        "\"@target-uri\": https://example.com/foo?param=Value&Pet=dog\n"
        "\"content-digest\": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:\n"
        "\"authorization\": Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2ln\n"
        "\"@signature-params\": (\"@method\" \"@target-uri\" \"content-digest\" \"authorization\")"
        ";created=1618884473;expires=1618884533;nonce=\"AAECAwQFBgcICQoLDA0ODw\""
        ";keyid=\"NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs\";alg=\"ecdsa-p256-sha256\"";

static const char base_no_body[] =
        "\"@method\": GET\n"
        "\"@target-uri\": https://example.com/foo?param=Value&Pet=dog\n"
        "\"authorization\": Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2ln\n"
        "\"@signature-params\": (\"@method\" \"@target-uri\" \"authorization\")"
        ";created=1618884473;expires=1618884533;nonce=\"AAECAwQFBgcICQoLDA0ODw\""
        ";keyid=\"NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs\";alg=\"ecdsa-p256-sha256\"";

static const char base_tab[] =
        "\"@method\": POST\n"
        "\"@target-uri\": https://example.com/foo?param=Value&Pet=dog\n"
        "\"content-digest\": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:\n"
        "\"authorization\": DPoP\tabc\n"
        "\"@signature-params\": (\"@method\" \"@target-uri\" \"content-digest\" \"authorization\")"
        ";created=1618884473;expires=1618884533;nonce=\"AAECAwQFBgcICQoLDA0ODw\""
        ";keyid=\"NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs\";alg=\"ecdsa-p256-sha256\"";

struct base_case {
        const char *name;
        const char *method, *uri, *auth, *digest, *params;
        const char *expect; /* NULL: fails with err */
        int err;
};

static const struct base_case base_cases[] = {
        { "with body", "POST", URI, AUTH, CD_HELLO, PARAMS_BODY, base_body, 0 },
        { "without body", "GET", URI, AUTH, NULL, PARAMS_NO_BODY, base_no_body, 0 },
        /* RFC 9421 2.1: leading and trailing whitespace of field values is stripped. */
        { "fields trimmed", "POST", URI, " \t" AUTH "\t ", "  " CD_HELLO " ", PARAMS_BODY, base_body, 0 },
        { "inner tab kept", "POST", URI, "DPoP\tabc", CD_HELLO, PARAMS_BODY, base_tab, 0 },

        /* Header injection and anything the US-ASCII base (RFC 9421 2.5) cannot carry. */
        { "CR in authorization", "POST", URI, "Bearer abc\rX: 1", CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "LF in authorization", "POST", URI, "Bearer abc\nX: 1", CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "CRLF ending authorization", "POST", URI, "Bearer abc\r\n", CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "LF in target-uri", "POST", URI "\nX-Evil: 1", AUTH, CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "CR in target-uri", "POST", "https://example.com/\r", AUTH, CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "SP in target-uri", "POST", "https://example.com/a b", AUTH, CD_HELLO, PARAMS_BODY, NULL,
          -EINVAL },
        { "8-bit in target-uri", "POST", "https://example.com/\xc3\xa9", AUTH, CD_HELLO, PARAMS_BODY, NULL,
          -EINVAL },
        { "LF in method", "POST\n", URI, AUTH, CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "SP in method", "PO ST", URI, AUTH, CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "LF in content-digest", "POST", URI, AUTH, CD_HELLO "\nX: 1", PARAMS_BODY, NULL, -EINVAL },
        { "LF in params", "POST", URI, AUTH, CD_HELLO, PARAMS_BODY "\nX: 1", NULL, -EINVAL },
        { "8-bit in authorization", "POST", URI, "Bearer \xc3\xa9", CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "DEL in authorization", "POST", URI, "Bearer \x7f", CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "VT in authorization", "POST", URI, "Bearer \v", CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "empty method", "", URI, AUTH, CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "empty target-uri", "POST", "", AUTH, CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "empty authorization", "POST", URI, "", CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "blank authorization", "POST", URI, " \t ", CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "NULL method", NULL, URI, AUTH, CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "NULL target-uri", "POST", NULL, AUTH, CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "NULL authorization", "POST", URI, NULL, CD_HELLO, PARAMS_BODY, NULL, -EINVAL },
        { "NULL params", "POST", URI, AUTH, CD_HELLO, NULL, NULL, -EINVAL },
        /* RFC 9421 2.3: the params must list exactly the lines of the base. */
        { "params list digest, none given", "POST", URI, AUTH, NULL, PARAMS_BODY, NULL, -EINVAL },
        { "digest given, params omit it", "POST", URI, AUTH, CD_HELLO, PARAMS_NO_BODY, NULL, -EINVAL },
        { "params with other list", "POST", URI, AUTH, CD_HELLO, "(\"@method\");created=1", NULL, -EINVAL },
        { "params list then junk", "GET", URI, AUTH, NULL,
          "(\"@method\" \"@target-uri\" \"authorization\")x", NULL, -EINVAL },
};

static void test_signature_base_cases(void **state) {
        static char sentinel[] = "untouched";
        unsigned failures = 0;

        for (size_t i = 0; i < ELEMENTSOF(base_cases); i++) {
                const struct base_case *c = &base_cases[i];
                char *s = sentinel;
                int r;

                r = httpsig_signature_base(c->method, c->uri, c->auth, c->digest, c->params, &s);
                if (!c->expect) {
                        if (r != c->err || s != sentinel) {
                                print_error("case \"%s\": got %d, expected %d (ret %s)\n", c->name, r,
                                            c->err, s == sentinel ? "untouched" : "changed");
                                failures++;
                        }
                        if (r >= 0 && s != sentinel)
                                free(s);
                        continue;
                }
                if (r < 0) {
                        print_error("case \"%s\": failed with %d\n", c->name, r);
                        failures++;
                        continue;
                }
                if (!streq(s, c->expect)) {
                        print_error("case \"%s\":\n--- got\n%s\n--- expected\n%s\n", c->name, s, c->expect);
                        failures++;
                }
                free(s);
        }
        assert_int_equal(failures, 0);
}

static void test_signature_base_limits(void **state) {
        _cleanup_free_ char *auth = NULL, *s = NULL;
        size_t n = 16384;

        /* ret NULL */
        assert_int_equal(httpsig_signature_base("GET", URI, AUTH, NULL, PARAMS_NO_BODY, NULL), -EINVAL);

        /* An authorization value of exactly the limit is taken, one more byte is refused. */
        auth = malloc(n + 2);
        assert_non_null(auth);
        memcpy(auth, "Bearer ", 7);
        memset(auth + 7, 'a', n - 7);
        auth[n] = '\0';
        assert_int_equal(httpsig_signature_base("GET", URI, auth, NULL, PARAMS_NO_BODY, &s), 0);
        assert_non_null(strstr(s, auth));
        auth[n] = 'a';
        auth[n + 1] = '\0';
        assert_int_equal(httpsig_signature_base("GET", URI, auth, NULL, PARAMS_NO_BODY, &s), -E2BIG);
}

/* ---- httpsig_sign(): digests, parameters, base and signature of real requests ---- */

#define CREATED INT64_C(1618884473)

struct sign_case {
        const char *name;
        const char *method, *uri, *auth;
        const char *auth_sent; /* after RFC 9421 2.1 trimming; NULL: auth */
        const char *body;      /* NULL: no body */
        size_t body_len;
        /* The expected header; digests computed once with `openssl dgst -sha256 -binary | base64`. */
        const char *content_digest;
};

static const struct sign_case sign_cases[] = {
        /* The body of the RFC 9530 and RFC 9421 examples. */
        { "json body", "POST", URI, AUTH, NULL, "{\"hello\": \"world\"}", 18,
          "Content-Digest: sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:" },
        /* A body that is there but empty still has a digest: SHA-256 of nothing. */
        { "empty body", "POST", "https://cloud.example:8443/v1/hubs/hub-1/commands/c-1/result", AUTH, NULL,
          "", 0, "Content-Digest: sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:" },
        /* Bytes in the body are only hashed: NUL, CR and LF there are fine. */
        { "binary body", "PUT", "https://cloud.example:8443/v1/hubs/hub-1/devices", AUTH, NULL, "a\0b\r\n",
          5, "Content-Digest: sha-256=:7uTTqDM1tKte8yrdskzi9pZiTXxsZOijxNHq9IsNxd4=:" },
        { "no body", "GET", "https://cloud.example:8443/v1/hubs/hub-1/commands?wait=30", AUTH, NULL, NULL, 0,
          NULL },
        { "dpop, padded", "GET", URI, "  DPoP abc.def.ghi \t", "DPoP abc.def.ghi", NULL, 0, NULL },
};

static void export_case(const char *base, const struct httpsig_headers *h) {
        const char *path = getenv("HTTPSIG_TEST_EXPORT");
        BIO *bio;
        char *pem;
        long pem_len;
        json_t *o;

        if (!path)
                return;
        bio = BIO_new(BIO_s_mem());
        assert_non_null(bio);
        assert_int_equal(PEM_write_bio_PUBKEY(bio, F.pkey), 1);
        pem_len = BIO_get_mem_data(bio, &pem);
        o = json_pack("{s:s, s:s, s:s?, s:s, s:s%}", "base", base, "signature_input", h->signature_input,
                      "content_digest", h->content_digest, "signature", h->signature, "public_key_pem", pem,
                      (size_t) pem_len);
        assert_non_null(o);
        assert_int_equal(json_dump_file(o, path, JSON_INDENT(2)), 0);
        json_decref(o);
        BIO_free(bio);
}

static void test_sign_cases(void **state) {
        for (size_t i = 0; i < ELEMENTSOF(sign_cases); i++) {
                const struct sign_case *c = &sign_cases[i];
                struct httpsig_headers h = {};
                _cleanup_free_ char *expect = NULL, *tampered = NULL, *base = NULL;
                char nonce[NONCE_B64_LEN + 1];
                uint8_t sig[HUBKEY_SIG_LEN];
                const char *params, *digest = NULL;
                uint64_t before = hubkey_signatures(F.k);
                int r;

                print_message("case \"%s\"\n", c->name);
                r = httpsig_sign(F.k, c->method, c->uri, c->auth, (const uint8_t *) c->body, c->body_len,
                                 CREATED, &h);
                assert_int_equal(r, 0);
                /* One hub key signature per call, exactly. */
                assert_int_equal(hubkey_signatures(F.k), before + 1);

                /* RFC 9530 2 */
                if (c->content_digest) {
                        assert_non_null(h.content_digest);
                        assert_string_equal(h.content_digest, c->content_digest);
                        digest = h.content_digest + strlen("Content-Digest: ");
                } else
                        assert_null(h.content_digest);

                /* RFC 9421 2.3, 4.1 */
                params = check_signature_input(h.signature_input, c->body != NULL, CREATED, nonce);

                /* RFC 9421 2.5: the base as rebuilt here equals the library's. */
                expect = rebuild_base(c->method, c->uri, c->auth_sent ?: c->auth, digest, params);
                r = httpsig_signature_base(c->method, c->uri, c->auth, digest, params, &base);
                assert_int_equal(r, 0);
                assert_string_equal(base, expect);

                /* RFC 9421 3.3.4, 4.2: r||s over SHA-256 of the base, by the hub key. */
                decode_signature(h.signature, sig);
                assert_int_equal(verify_rs(F.pkey, expect, sig), 1);
                /* ... and over nothing else. */
                tampered = rebuild_base(c->method, c->uri, "Bearer other", digest, params);
                assert_int_equal(verify_rs(F.pkey, tampered, sig), 0);

                if (i == 0)
                        export_case(expect, &h);
                httpsig_headers_done(&h);
        }
}

/* A fresh nonce, and so a different Signature-Input, on every call with the same inputs. */
#define NONCE_CALLS 16
static void test_sign_nonce_fresh(void **state) {
        char nonces[NONCE_CALLS][NONCE_B64_LEN + 1];
        uint64_t before = hubkey_signatures(F.k);

        for (size_t i = 0; i < NONCE_CALLS; i++) {
                struct httpsig_headers h = {};

                assert_int_equal(httpsig_sign(F.k, "GET", URI, AUTH, NULL, 0, CREATED, &h), 0);
                (void) check_signature_input(h.signature_input, false, CREATED, nonces[i]);
                for (size_t j = 0; j < i; j++)
                        assert_string_not_equal(nonces[i], nonces[j]);
                httpsig_headers_done(&h);
        }
        assert_int_equal(hubkey_signatures(F.k), before + NONCE_CALLS);
}

/* expires = created + 60 at both ends of the range an sf-integer (RFC 8941 3.3.1) allows. */
static void test_sign_created(void **state) {
        static const int64_t ok[] = { 0, CREATED, INT64_C(999999999999999) - 60 };

        for (size_t i = 0; i < ELEMENTSOF(ok); i++) {
                struct httpsig_headers h = {};
                char nonce[NONCE_B64_LEN + 1];

                assert_int_equal(httpsig_sign(F.k, "GET", URI, AUTH, NULL, 0, ok[i], &h), 0);
                (void) check_signature_input(h.signature_input, false, ok[i], nonce);
                httpsig_headers_done(&h);
        }
}

struct sign_error_case {
        const char *name;
        bool no_key, no_ret;
        const char *method, *uri, *auth;
        const char *body;
        size_t body_len;
        int64_t created;
        int err;
};

static const struct sign_error_case sign_error_cases[] = {
        { "CR in authorization", false, false, "POST", URI, "Bearer abc\r", "{}", 2, CREATED, -EINVAL },
        { "LF in authorization", false, false, "POST", URI, "Bearer abc\nX: 1", "{}", 2, CREATED, -EINVAL },
        { "CRLF in authorization", false, false, "GET", URI, "Bearer abc\r\nX-Evil: 1", NULL, 0, CREATED,
          -EINVAL },
        { "LF in target-uri", false, false, "POST", URI "\nX-Evil: 1", AUTH, "{}", 2, CREATED, -EINVAL },
        { "CR in target-uri", false, false, "GET", URI "\r", AUTH, NULL, 0, CREATED, -EINVAL },
        { "LF in method", false, false, "GET\n", URI, AUTH, NULL, 0, CREATED, -EINVAL },
        { "NULL method", false, false, NULL, URI, AUTH, NULL, 0, CREATED, -EINVAL },
        { "NULL target-uri", false, false, "GET", NULL, AUTH, NULL, 0, CREATED, -EINVAL },
        { "NULL authorization", false, false, "GET", URI, NULL, NULL, 0, CREATED, -EINVAL },
        { "NULL key", true, false, "GET", URI, AUTH, NULL, 0, CREATED, -EINVAL },
        { "NULL ret", false, true, "GET", URI, AUTH, NULL, 0, CREATED, -EINVAL },
        { "NULL body with length", false, false, "POST", URI, AUTH, NULL, 2, CREATED, -EINVAL },
        { "created negative", false, false, "GET", URI, AUTH, NULL, 0, -1, -ERANGE },
        { "expires past sf-integer", false, false, "GET", URI, AUTH, NULL, 0, INT64_C(999999999999999) - 59,
          -ERANGE },
        { "created INT64_MAX", false, false, "GET", URI, AUTH, NULL, 0, INT64_MAX, -ERANGE },
};

static void test_sign_errors(void **state) {
        static char sentinel[] = "untouched";
        unsigned failures = 0;

        for (size_t i = 0; i < ELEMENTSOF(sign_error_cases); i++) {
                const struct sign_error_case *c = &sign_error_cases[i];
                struct httpsig_headers h = { sentinel, sentinel, sentinel };
                uint64_t before = hubkey_signatures(F.k);
                int r;

                r = httpsig_sign(c->no_key ? NULL : F.k, c->method, c->uri, c->auth,
                                 (const uint8_t *) c->body, c->body_len, c->created, c->no_ret ? NULL : &h);
                if (r != c->err || h.content_digest != sentinel || h.signature_input != sentinel ||
                    h.signature != sentinel || hubkey_signatures(F.k) != before) {
                        print_error("case \"%s\": got %d, expected %d; ret %s; %" PRIu64
                                    " signatures made\n",
                                    c->name, r, c->err, h.signature != sentinel ? "changed" : "untouched",
                                    hubkey_signatures(F.k) - before);
                        failures++;
                }
                if (r >= 0 && h.signature != sentinel)
                        httpsig_headers_done(&h);
        }
        assert_int_equal(failures, 0);
}

static void test_headers_done(void **state) {
        struct httpsig_headers zero = {}, h = {};

        httpsig_headers_done(NULL);
        httpsig_headers_done(&zero);
        assert_null(zero.signature);

        assert_int_equal(httpsig_sign(F.k, "POST", URI, AUTH, (const uint8_t *) "{}", 2, CREATED, &h), 0);
        assert_non_null(h.content_digest);
        httpsig_headers_done(&h);
        assert_null(h.content_digest);
        assert_null(h.signature_input);
        assert_null(h.signature);
        httpsig_headers_done(&h); /* twice is fine */
}

/* The two-step form (for hubkey_sign_async()): prepare makes no signature; the base it returns is
 * the library's base for its Signature-Input; the key signs it on its own; complete hands over the
 * headers and empties the pending state; a second complete, or one without a signature, fails. */
static void test_prepare_complete(void **state) {
        struct httpsig_pending p = {};
        struct httpsig_headers h = {};
        _cleanup_free_ char *base = NULL;
        uint8_t sig[HUBKEY_SIG_LEN], got[HUBKEY_SIG_LEN];
        char nonce[NONCE_B64_LEN + 1];
        uint64_t before = hubkey_signatures(F.k);
        const char *params;

        assert_int_equal(httpsig_prepare(F.k, "POST", URI, AUTH, (const uint8_t *) "{}", 2, CREATED, &p), 0);
        assert_int_equal(hubkey_signatures(F.k), before);
        assert_non_null(p.content_digest);
        params = check_signature_input(p.signature_input, true, CREATED, nonce);
        assert_int_equal(httpsig_signature_base("POST", URI, AUTH, p.content_digest + strlen("Content-Digest: "),
                                                params, &base),
                         0);
        assert_int_equal(p.base_len, strlen(base));
        assert_string_equal(p.base, base);
        assert_int_equal(hubkey_sign(F.k, p.base, p.base_len, sig), 0);
        assert_int_equal(httpsig_complete(&p, NULL, &h), -EINVAL);
        assert_int_equal(httpsig_complete(&p, sig, &h), 0);
        assert_null(p.base);
        assert_null(p.signature_input);
        assert_int_equal(httpsig_complete(&p, sig, &h), -EINVAL);
        decode_signature(h.signature, got);
        assert_memory_equal(got, sig, sizeof sig);
        assert_int_equal(verify_rs(F.pkey, base, got), 1);
        httpsig_headers_done(&h);
        /* Abandoned before the signature: everything freed (ASan), twice is fine. */
        assert_int_equal(httpsig_prepare(F.k, "GET", URI, AUTH, NULL, 0, CREATED, &p), 0);
        assert_null(p.content_digest);
        httpsig_pending_done(&p);
        httpsig_pending_done(&p);
        httpsig_pending_done(NULL);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_prepare_complete),
                cmocka_unit_test(test_signature_base_cases),
                cmocka_unit_test(test_signature_base_limits),
                cmocka_unit_test(test_sign_cases),
                cmocka_unit_test(test_sign_nonce_fresh),
                cmocka_unit_test(test_sign_created),
                cmocka_unit_test(test_sign_errors),
                cmocka_unit_test(test_headers_done),
        };

        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
