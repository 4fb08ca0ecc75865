/* SPDX-License-Identifier: MIT */
/* verify.c: keys, JWKs, ES256 and EdDSA signatures, device certificates. Every key and
 * certificate is made here with OpenSSL, in-process; signatures come from OpenSSL's signer,
 * so that verify.c never agrees only with itself. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <cmocka.h>

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "iothub/verify.h"

static const char msg_text[] =
        "eyJhbGciOiJFUzI1NiIsImtpZCI6ImJ1bGItNyIsInR5cCI6ImlvdGh1Yi1zdGF0dXMifQ."
        "eyJkZXYiOiJidWxiLTciLCJzZXEiOjEsImlhdCI6MTcwMDAwMDAwMCwic3RhdGUiOnsib24iOnRydWV9fQ";
#define MSG     ((const uint8_t *) msg_text)
#define MSG_LEN (sizeof msg_text - 1)

static struct {
        EVP_PKEY *p256, *p256_other, *ed25519, *ed25519_other, *rsa, *p384, *x25519;
        char tmpdir[64];
} T;

static EVP_PKEY *keygen(const char *type) {
        EVP_PKEY *k;

        if (streq(type, "P-256"))
                k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
        else if (streq(type, "P-384"))
                k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
        else if (streq(type, "RSA"))
                k = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t) 2048);
        else
                k = EVP_PKEY_Q_keygen(NULL, NULL, type);
        assert_non_null(k);
        return k;
}

static char *pem_of(EVP_PKEY *k) {
        BIO *b = BIO_new(BIO_s_mem());
        char *data, *s;
        long n;

        assert_non_null(b);
        assert_int_equal(PEM_write_bio_PUBKEY(b, k), 1);
        n = BIO_get_mem_data(b, &data);
        s = strndup(data, (size_t) n);
        assert_non_null(s);
        BIO_free(b);
        return s;
}

static struct verify_key *load(EVP_PKEY *k, enum frame_alg *ret_alg) {
        _cleanup_free_ char *pem = pem_of(k);
        struct verify_key *vk = NULL;

        assert_int_equal(verify_key_from_pem(pem, strlen(pem), &vk, ret_alg), 0);
        assert_non_null(vk);
        return vk;
}

/* A JWS signature as a bulb sends it: ES256 as R || S (RFC 7518 3.4), EdDSA as is. */
static size_t sign(EVP_PKEY *k, const uint8_t *msg, size_t len, uint8_t out[static 72], uint8_t *der,
                   size_t *der_len) {
        EVP_MD_CTX *c = EVP_MD_CTX_new();
        uint8_t buf[128];
        size_t n = sizeof buf;
        bool ec = EVP_PKEY_is_a(k, "EC");

        assert_non_null(c);
        assert_int_equal(EVP_DigestSignInit_ex(c, NULL, ec ? "SHA256" : NULL, NULL, NULL, k, NULL), 1);
        assert_int_equal(EVP_DigestSign(c, buf, &n, msg, len), 1);
        EVP_MD_CTX_free(c);
        if (der) {
                memcpy(der, buf, n);
                *der_len = n;
        }
        if (!ec) {
                assert_int_equal(n, 64);
                memcpy(out, buf, n);
                return n;
        }
        const uint8_t *p = buf;
        ECDSA_SIG *s = d2i_ECDSA_SIG(NULL, &p, (long) n);
        assert_non_null(s);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_r(s), out, 32), 32);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_s(s), out + 32, 32), 32);
        ECDSA_SIG_free(s);
        return 64;
}

static int setup(void **state) {
        T.p256 = keygen("P-256");
        T.p256_other = keygen("P-256");
        T.ed25519 = keygen("ED25519");
        T.ed25519_other = keygen("ED25519");
        T.rsa = keygen("RSA");
        T.p384 = keygen("P-384");
        T.x25519 = keygen("X25519");
        strcpy(T.tmpdir, "/tmp/test-verify-XXXXXX");
        assert_non_null(mkdtemp(T.tmpdir));
        return 0;
}

static int teardown(void **state) {
        char path[128];

        EVP_PKEY_free(T.p256);
        EVP_PKEY_free(T.p256_other);
        EVP_PKEY_free(T.ed25519);
        EVP_PKEY_free(T.ed25519_other);
        EVP_PKEY_free(T.rsa);
        EVP_PKEY_free(T.p384);
        EVP_PKEY_free(T.x25519);
        (void) snprintf(path, sizeof path, "%s/ca.pem", T.tmpdir);
        (void) unlink(path);
        (void) snprintf(path, sizeof path, "%s/empty.pem", T.tmpdir);
        (void) unlink(path);
        (void) snprintf(path, sizeof path, "%s/inter.pem", T.tmpdir);
        (void) unlink(path);
        (void) rmdir(T.tmpdir);
        return 0;
}

static void test_key_types(void **state) {
        static const struct {
                const char *name;
                size_t key_offset;
                int want;
                enum frame_alg alg;
        } cases[] = {
                { "P-256", offsetof(__typeof__(T), p256), 0, FRAME_ALG_ES256 },
                { "Ed25519", offsetof(__typeof__(T), ed25519), 0, FRAME_ALG_EDDSA },
                { "RSA-2048", offsetof(__typeof__(T), rsa), -EOPNOTSUPP, 0 },
                { "P-384", offsetof(__typeof__(T), p384), -EOPNOTSUPP, 0 },
                { "X25519", offsetof(__typeof__(T), x25519), -EOPNOTSUPP, 0 },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                EVP_PKEY *k = *(EVP_PKEY **) ((char *) &T + cases[i].key_offset);
                _cleanup_free_ char *pem = pem_of(k);
                struct verify_key *vk = NULL;
                enum frame_alg alg = (enum frame_alg) 99;
                int r;

                r = verify_key_from_pem(pem, strlen(pem), &vk, &alg);
                if (r != cases[i].want)
                        fail_msg("%s: got %d, want %d", cases[i].name, r, cases[i].want);
                if (r == 0) {
                        assert_non_null(vk);
                        assert_int_equal(alg, cases[i].alg);
                } else {
                        assert_null(vk); /* untouched on failure */
                        assert_int_equal(alg, 99);
                }
                verify_key_free(vk);
        }
}

/* P-256 with explicit curve parameters (RFC 5480 2.1.1: not allowed in PKIX). */
static void test_explicit_params(void **state) {
        EVP_PKEY *k = EVP_PKEY_dup(T.p256);
        struct verify_key *vk = NULL;
        char *pem;

        assert_non_null(k);
        assert_int_equal(EVP_PKEY_set_utf8_string_param(k, OSSL_PKEY_PARAM_EC_ENCODING, "explicit"), 1);
        pem = pem_of(k);
        assert_int_equal(verify_key_from_pem(pem, strlen(pem), &vk, NULL), -EOPNOTSUPP);
        assert_null(vk);
        free(pem);
        EVP_PKEY_free(k);
}

static void test_pem_garbage(void **state) {
        _cleanup_free_ char *good = pem_of(T.p256), *ed = pem_of(T.ed25519);
        char *body = strstr(good, "\n") + 1; /* the base64 lines and the END line */
        char buf[4096];
        struct {
                const char *name;
                char text[2048];
                int want;
        } cases[] = {
                { "as written", "", 0 },
                { "white space around", "", 0 },
                { "empty", "", -EINVAL },
                { "only spaces", "  \n\n", -EINVAL },
                { "garbage", "hello world", -EINVAL },
                { "text before", "", -EINVAL },
                { "trailing garbage", "", -EINVAL },
                { "two blocks", "", -EINVAL },
                { "other label", "", -EINVAL },
                { "private key label", "", -EINVAL },
                { "bad base64", "", -EINVAL },
                { "truncated", "", -EINVAL },
                { "header lines", "", -EINVAL },
        };

        (void) snprintf(cases[0].text, sizeof cases[0].text, "%s", good);
        (void) snprintf(cases[1].text, sizeof cases[1].text, " \r\n\t%s\n\n  ", good);
        (void) snprintf(cases[5].text, sizeof cases[5].text, "my key:\n%s", good);
        (void) snprintf(cases[6].text, sizeof cases[6].text, "%sx\n", good);
        (void) snprintf(cases[7].text, sizeof cases[7].text, "%s%s", good, ed);
        (void) snprintf(cases[8].text, sizeof cases[8].text,
                        "-----BEGIN EC PUBLIC KEY-----\n%.*s"
                        "-----END EC PUBLIC KEY-----\n",
                        (int) (strstr(body, "-----END") - body), body);
        (void) snprintf(cases[9].text, sizeof cases[9].text,
                        "-----BEGIN PRIVATE KEY-----\n%.*s"
                        "-----END PRIVATE KEY-----\n%s",
                        (int) (strstr(body, "-----END") - body), body, good);
        (void) snprintf(cases[10].text, sizeof cases[10].text, "%s", good);
        cases[10].text[40] = '*';
        (void) snprintf(cases[11].text, sizeof cases[11].text,
                        "-----BEGIN PUBLIC KEY-----\n%.20s\n"
                        "-----END PUBLIC KEY-----\n",
                        body);
        (void) snprintf(cases[12].text, sizeof cases[12].text,
                        "-----BEGIN PUBLIC KEY-----\nProc-Type: 4,ENCRYPTED\n\n%s", body);

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct verify_key *vk = NULL;
                int r = verify_key_from_pem(cases[i].text, strlen(cases[i].text), &vk, NULL);

                if (r != cases[i].want)
                        fail_msg("%s: got %d, want %d", cases[i].name, r, cases[i].want);
                assert_true((r == 0) == (vk != NULL));
                verify_key_free(vk);
        }

        /* An embedded NUL, and input that is not NUL-terminated at len. */
        struct verify_key *vk = NULL;
        memcpy(buf, good, strlen(good));
        buf[10] = '\0';
        assert_int_equal(verify_key_from_pem(buf, strlen(good), &vk, NULL), -EINVAL);
        memcpy(buf, good, strlen(good));
        memset(buf + strlen(good), 'A', 64);
        assert_int_equal(verify_key_from_pem(buf, strlen(good), &vk, NULL), 0);
        verify_key_free(vk);
}

/* An off-curve point in the canonical P-256 encoding (the fast path) is refused. */
static void test_off_curve(void **state) {
        unsigned char *der = NULL;
        int n = i2d_PUBKEY(T.p256, &der);
        struct verify_key *vk = NULL;
        BIO *b = BIO_new(BIO_s_mem());
        char *data;
        long len;

        assert_int_equal(n, 91);
        der[90] ^= 0x01; /* y changes: the point leaves the curve */
        assert_true(PEM_write_bio(b, "PUBLIC KEY", "", der, n) > 0);
        len = BIO_get_mem_data(b, &data);
        assert_int_equal(verify_key_from_pem(data, (size_t) len, &vk, NULL), -EINVAL);
        assert_null(vk);
        OPENSSL_free(der);
        BIO_free(b);
}

static void test_signatures(void **state) {
        static const struct {
                const char *name;
                const char *signer;   /* which key signs */
                const char *verifier; /* which key is enrolled */
                enum frame_alg alg;   /* the header's alg */
                enum { AS_IS, FLIP_SIG, FLIP_MSG, DER, LEN_63, LEN_65, EMPTY } mangle;
                int want;
        } cases[] = {
                { "ES256 valid", "p256", "p256", FRAME_ALG_ES256, AS_IS, 0 },
                { "ES256 flipped signature bit", "p256", "p256", FRAME_ALG_ES256, FLIP_SIG, -EBADMSG },
                { "ES256 flipped message bit", "p256", "p256", FRAME_ALG_ES256, FLIP_MSG, -EBADMSG },
                { "ES256 wrong key", "p256_other", "p256", FRAME_ALG_ES256, AS_IS, -EBADMSG },
                { "ES256 DER signature", "p256", "p256", FRAME_ALG_ES256, DER, -EBADMSG },
                { "ES256 63 bytes", "p256", "p256", FRAME_ALG_ES256, LEN_63, -EBADMSG },
                { "ES256 65 bytes", "p256", "p256", FRAME_ALG_ES256, LEN_65, -EBADMSG },
                { "ES256 empty", "p256", "p256", FRAME_ALG_ES256, EMPTY, -EBADMSG },
                { "ES256 header on Ed25519 key", "p256", "ed25519", FRAME_ALG_ES256, AS_IS, -EBADMSG },
                { "EdDSA valid", "ed25519", "ed25519", FRAME_ALG_EDDSA, AS_IS, 0 },
                { "EdDSA flipped signature bit", "ed25519", "ed25519", FRAME_ALG_EDDSA, FLIP_SIG, -EBADMSG },
                { "EdDSA flipped message bit", "ed25519", "ed25519", FRAME_ALG_EDDSA, FLIP_MSG, -EBADMSG },
                { "EdDSA wrong key", "ed25519_other", "ed25519", FRAME_ALG_EDDSA, AS_IS, -EBADMSG },
                { "EdDSA 63 bytes", "ed25519", "ed25519", FRAME_ALG_EDDSA, LEN_63, -EBADMSG },
                { "EdDSA 65 bytes", "ed25519", "ed25519", FRAME_ALG_EDDSA, LEN_65, -EBADMSG },
                { "EdDSA empty", "ed25519", "ed25519", FRAME_ALG_EDDSA, EMPTY, -EBADMSG },
                { "EdDSA header on P-256 key", "ed25519", "p256", FRAME_ALG_EDDSA, AS_IS, -EBADMSG },
                { "EdDSA header, ES256 signature, P-256 key", "p256", "p256", FRAME_ALG_EDDSA, AS_IS,
                  -EBADMSG },
        };
        struct {
                const char *name;
                EVP_PKEY *k;
        } keys[] = {
                { "p256", T.p256 },
                { "p256_other", T.p256_other },
                { "ed25519", T.ed25519 },
                { "ed25519_other", T.ed25519_other },
        };
        struct verify_key *vks[ELEMENTSOF(keys)];

        for (size_t i = 0; i < ELEMENTSOF(keys); i++)
                vks[i] = load(keys[i].k, NULL);

        /* Twice over: the per-key contexts are reused, whatever came before. */
        for (int round = 0; round < 2; round++)
                for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                        EVP_PKEY *signer = NULL;
                        struct verify_key *vk = NULL;
                        uint8_t sig[80], der[80], msg[sizeof msg_text];
                        size_t sig_len, der_len;
                        int r;

                        for (size_t j = 0; j < ELEMENTSOF(keys); j++) {
                                if (streq(keys[j].name, cases[i].signer))
                                        signer = keys[j].k;
                                if (streq(keys[j].name, cases[i].verifier))
                                        vk = vks[j];
                        }
                        memcpy(msg, msg_text, sizeof msg);
                        sig_len = sign(signer, msg, MSG_LEN, sig, der, &der_len);
                        switch (cases[i].mangle) {
                        case AS_IS:
                                break;
                        case FLIP_SIG:
                                sig[17] ^= 0x04;
                                break;
                        case FLIP_MSG:
                                msg[MSG_LEN - 3] ^= 0x01;
                                break;
                        case DER:
                                memcpy(sig, der, der_len);
                                sig_len = der_len;
                                break;
                        case LEN_63:
                                sig_len = 63;
                                break;
                        case LEN_65:
                                sig[64] = 0;
                                sig_len = 65;
                                break;
                        case EMPTY:
                                sig_len = 0;
                                break;
                        }
                        r = verify_signature(vk, cases[i].alg, msg, MSG_LEN, sig, sig_len);
                        if (r != cases[i].want)
                                fail_msg("%s: got %d, want %d", cases[i].name, r, cases[i].want);
                }

        for (size_t i = 0; i < ELEMENTSOF(keys); i++)
                verify_key_free(vks[i]);
}

/* R and S values that exercise the DER conversion: zero, the group order, all ones. */
static void test_es256_out_of_range(void **state) {
        static const uint8_t order[32] = {
                0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0xff, 0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17,
                0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
        };
        struct verify_key *vk = load(T.p256, NULL);
        uint8_t good[72], sig[64];

        (void) sign(T.p256, MSG, MSG_LEN, good, NULL, NULL);
        for (int c = 0; c < 6; c++) {
                memcpy(sig, good, 64);
                switch (c) {
                case 0: /* r = 0 */
                        memset(sig, 0, 32);
                        break;
                case 1: /* s = 0 */
                        memset(sig + 32, 0, 32);
                        break;
                case 2: /* both 0 */
                        memset(sig, 0, 64);
                        break;
                case 3: /* r = n */
                        memcpy(sig, order, 32);
                        break;
                case 4: /* s = n */
                        memcpy(sig + 32, order, 32);
                        break;
                case 5: /* above n */
                        memset(sig, 0xff, 64);
                        break;
                }
                assert_int_equal(verify_signature(vk, FRAME_ALG_ES256, MSG, MSG_LEN, sig, 64), -EBADMSG);
        }
        assert_int_equal(verify_signature(vk, FRAME_ALG_ES256, MSG, MSG_LEN, good, 64), 0);
        verify_key_free(vk);
}

/* Real signatures whose R or S start with a zero octet or with the top bit set, until every
 * case of the DER integer encoding has been seen (a zero octet: 1 in 256 per value). */
static void test_es256_der_shapes(void **state) {
        struct verify_key *vk = load(T.p256, NULL);
        bool seen[4] = { false }; /* r leading zero, s leading zero, r top bit, s top bit */
        int i;

        for (i = 0; i < 20000 && !(seen[0] && seen[1] && seen[2] && seen[3]); i++) {
                uint8_t msg[16], sig[72];

                memcpy(msg, &i, sizeof i);
                memset(msg + sizeof i, 'm', sizeof msg - sizeof i);
                (void) sign(T.p256, msg, sizeof msg, sig, NULL, NULL);
                seen[0] |= sig[0] == 0;
                seen[1] |= sig[32] == 0;
                seen[2] |= (sig[0] & 0x80) != 0;
                seen[3] |= (sig[32] & 0x80) != 0;
                if (verify_signature(vk, FRAME_ALG_ES256, msg, sizeof msg, sig, 64) != 0)
                        fail_msg("signature %d (r[0]=%02x s[0]=%02x) refused", i, sig[0], sig[32]);
                sig[63] ^= 1;
                assert_int_equal(verify_signature(vk, FRAME_ALG_ES256, msg, sizeof msg, sig, 64), -EBADMSG);
        }
        assert_true(seen[0] && seen[1] && seen[2] && seen[3]);
        verify_key_free(vk);
}

static void check_b64url(json_t *v, const uint8_t *want, size_t want_len) {
        uint8_t buf[64];
        ssize_t n;

        assert_true(json_is_string(v));
        n = b64url_decode(json_string_value(v), json_string_length(v), buf, sizeof buf);
        assert_int_equal(n, (ssize_t) want_len);
        assert_memory_equal(buf, want, want_len);
}

static void test_jwk(void **state) {
        /* A P-256 key whose x starts with a zero octet: still 32 octets (RFC 7518 6.2.1.2). */
        EVP_PKEY *zero_x = NULL;
        for (int i = 0; i < 10000 && !zero_x; i++) {
                EVP_PKEY *k = keygen("P-256");
                uint8_t pt[65];
                size_t n;

                assert_int_equal(EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, pt,
                                                                 sizeof pt, &n),
                                 1);
                if (pt[1] == 0)
                        zero_x = k;
                else
                        EVP_PKEY_free(k);
        }
        assert_non_null(zero_x);

        EVP_PKEY *ec_keys[] = { T.p256, T.p256_other, zero_x };
        for (size_t i = 0; i < ELEMENTSOF(ec_keys); i++) {
                struct verify_key *vk = load(ec_keys[i], NULL);
                json_t *jwk = NULL;
                uint8_t pt[65];
                size_t n;

                assert_int_equal(verify_key_to_jwk(vk, &jwk), 0);
                assert_int_equal(json_object_size(jwk), 4);
                assert_string_equal(json_string_value(json_object_get(jwk, "kty")), "EC");
                assert_string_equal(json_string_value(json_object_get(jwk, "crv")), "P-256");
                assert_int_equal(EVP_PKEY_get_octet_string_param(
                                         ec_keys[i], OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, pt, sizeof pt, &n),
                                 1);
                assert_int_equal(n, 65);
                assert_int_equal(pt[0], 0x04);
                check_b64url(json_object_get(jwk, "x"), pt + 1, 32);
                check_b64url(json_object_get(jwk, "y"), pt + 33, 32);
                assert_int_equal(json_string_length(json_object_get(jwk, "x")), 43);
                json_decref(jwk);
                verify_key_free(vk);
        }
        EVP_PKEY_free(zero_x);

        struct verify_key *vk = load(T.ed25519, NULL);
        json_t *jwk = NULL;
        uint8_t raw[32];
        size_t n = sizeof raw;

        assert_int_equal(verify_key_to_jwk(vk, &jwk), 0);
        assert_int_equal(json_object_size(jwk), 3);
        assert_string_equal(json_string_value(json_object_get(jwk, "kty")), "OKP");
        assert_string_equal(json_string_value(json_object_get(jwk, "crv")), "Ed25519");
        assert_int_equal(EVP_PKEY_get_raw_public_key(T.ed25519, raw, &n), 1);
        check_b64url(json_object_get(jwk, "x"), raw, 32);
        json_decref(jwk);
        verify_key_free(vk);
}

static void test_pem_round_trip(void **state) {
        EVP_PKEY *keys[] = { T.p256, T.ed25519 };

        for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
                _cleanup_free_ char *orig = pem_of(keys[i]), *out = NULL, *out2 = NULL;
                struct verify_key *a = load(keys[i], NULL), *b = NULL;
                enum frame_alg alg;

                assert_int_equal(verify_key_to_pem(a, &out), 0);
                assert_string_equal(out, orig);
                assert_int_equal(verify_key_from_pem(out, strlen(out), &b, &alg), 0);
                assert_int_equal(verify_key_to_pem(b, &out2), 0);
                assert_string_equal(out2, orig);
                verify_key_free(a);
                verify_key_free(b);
        }

        /* A compressed point (RFC 5480 2.2) takes the generic path and is the same key. */
        EVP_PKEY *c = EVP_PKEY_dup(T.p256);
        json_t *j1 = NULL, *j2 = NULL;
        uint8_t sig[72];

        assert_int_equal(
                EVP_PKEY_set_utf8_string_param(c, OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, "compressed"),
                1);
        struct verify_key *vc = load(c, NULL), *vu = load(T.p256, NULL);
        assert_int_equal(verify_key_to_jwk(vc, &j1), 0);
        assert_int_equal(verify_key_to_jwk(vu, &j2), 0);
        assert_true(json_equal(j1, j2));
        (void) sign(T.p256, MSG, MSG_LEN, sig, NULL, NULL);
        assert_int_equal(verify_signature(vc, FRAME_ALG_ES256, MSG, MSG_LEN, sig, 64), 0);
        json_decref(j1);
        json_decref(j2);
        verify_key_free(vc);
        verify_key_free(vu);
        EVP_PKEY_free(c);
}

/* The compact form the registry keeps (struct verify_raw): read from the PEM without building a
 * key, built into a key with every check, and the same JWK either way. */
static void check_raw_of(EVP_PKEY *pk, EVP_PKEY *signer, enum frame_alg want_alg) {
        _cleanup_free_ char *pem = pem_of(pk);
        struct verify_raw raw, raw2;
        struct verify_key *vk = NULL, *full = NULL;
        json_t *j1 = NULL, *j2 = NULL;
        uint8_t want[65], sig[72];
        size_t n = sizeof want;

        memset(&raw, 0xa5, sizeof raw);
        assert_int_equal(verify_raw_from_pem(pem, strlen(pem), &raw), 0);
        assert_int_equal(raw.alg, want_alg);
        if (want_alg == FRAME_ALG_ES256) {
                /* Always the uncompressed point, whatever the PEM carried. */
                assert_int_equal(EVP_PKEY_get_octet_string_param(signer, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
                                                                 want, sizeof want, &n),
                                 1);
                assert_int_equal(n, 65);
        } else
                assert_int_equal(EVP_PKEY_get_raw_public_key(signer, want, &n), 1);
        assert_int_equal(raw.len, n);
        assert_memory_equal(raw.bytes, want, n);

        assert_int_equal(verify_key_from_raw(&raw, &vk), 0);
        (void) sign(signer, MSG, MSG_LEN, sig, NULL, NULL);
        assert_int_equal(verify_signature(vk, want_alg, MSG, MSG_LEN, sig, 64), 0);
        sig[5] ^= 1;
        assert_int_equal(verify_signature(vk, want_alg, MSG, MSG_LEN, sig, 64), -EBADMSG);
        assert_int_equal(verify_key_to_raw(vk, &raw2), 0);
        assert_int_equal(raw2.alg, raw.alg);
        assert_int_equal(raw2.len, raw.len);
        assert_memory_equal(raw2.bytes, raw.bytes, raw.len);

        full = load(pk, NULL);
        assert_int_equal(verify_raw_to_jwk(&raw, &j1), 0);
        assert_int_equal(verify_key_to_jwk(full, &j2), 0);
        assert_true(json_equal(j1, j2));
        json_decref(j1);
        json_decref(j2);
        verify_key_free(full);
        verify_key_free(vk);
}

static char *pem_of_der(const uint8_t *der, size_t n) {
        BIO *b = BIO_new(BIO_s_mem());
        char *data, *s;
        long len;

        assert_true(PEM_write_bio(b, "PUBLIC KEY", "", der, (long) n) > 0);
        len = BIO_get_mem_data(b, &data);
        s = strndup(data, (size_t) len);
        assert_non_null(s);
        BIO_free(b);
        return s;
}

static void test_raw(void **state) {
        EVP_PKEY *c = EVP_PKEY_dup(T.p256);
        struct verify_raw raw, bad;
        struct verify_key *vk = NULL;
        json_t *j = NULL;

        check_raw_of(T.p256, T.p256, FRAME_ALG_ES256);
        check_raw_of(T.ed25519, T.ed25519, FRAME_ALG_EDDSA);
        /* A compressed point takes the full load and gives the same compact form. */
        assert_int_equal(
                EVP_PKEY_set_utf8_string_param(c, OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, "compressed"),
                1);
        check_raw_of(c, T.p256, FRAME_ALG_ES256);
        EVP_PKEY_free(c);

        /* The text OpenSSL writes is decoded without a BIO; any other layout of the same key
         * (white space, CRLF, one long line, no final LF) takes pem_next() to the same bytes. */
        _cleanup_free_ char *canon = pem_of(T.p256);
        struct verify_raw want;
        assert_int_equal(verify_raw_from_pem(canon, strlen(canon), &want), 0);
        const char *body = canon + strlen("-----BEGIN PUBLIC KEY-----\n");
        const char *nl = strchr(body, '\n');
        const char *end = strstr(canon, "-----END");
        char variants[6][400];
        (void) snprintf(variants[0], 400, "  \n%s\n\n", canon);
        (void) snprintf(variants[1], 400, "%.*s", (int) (strlen(canon) - 1), canon);
        (void) snprintf(variants[2], 400, "-----BEGIN PUBLIC KEY-----\r\n%.*s\r\n%.*s\r\n-----END PUBLIC KEY-----\r\n",
                        (int) (nl - body), body, (int) (end - nl - 2), nl + 1);
        (void) snprintf(variants[3], 400, "-----BEGIN PUBLIC KEY-----\n%.*s%.*s\n-----END PUBLIC KEY-----\n",
                        (int) (nl - body), body, (int) (end - nl - 2), nl + 1);
        (void) snprintf(variants[4], 400, "%s", canon);
        variants[4][40] = '*'; /* not base64: refused by both paths */
        (void) snprintf(variants[5], 400, "%s", canon);
        variants[5][strlen(canon) - 3] = 'x'; /* the END line damaged: refused */
        for (size_t i = 0; i < 4; i++) {
                memset(&raw, 0, sizeof raw);
                assert_int_equal(verify_raw_from_pem(variants[i], strlen(variants[i]), &raw), 0);
                assert_int_equal(raw.alg, want.alg);
                assert_int_equal(raw.len, want.len);
                assert_memory_equal(raw.bytes, want.bytes, want.len);
        }
        assert_int_equal(verify_raw_from_pem(variants[4], strlen(variants[4]), &raw), -EINVAL);
        assert_int_equal(verify_raw_from_pem(variants[5], strlen(variants[5]), &raw), -EINVAL);

        /* What the encoding alone cannot tell is found when the key is built. A point off the
         * curve: */
        unsigned char *der = NULL;
        int n = i2d_PUBKEY(T.p256, &der);
        assert_int_equal(n, 91);
        der[90] ^= 0x01;
        _cleanup_free_ char *off = pem_of_der(der, (size_t) n);
        OPENSSL_free(der);
        assert_int_equal(verify_raw_from_pem(off, strlen(off), &raw), 0);
        assert_int_equal(verify_key_from_raw(&raw, &vk), -EINVAL);
        assert_null(vk);
        /* An Ed25519 key of small order (the identity): */
        static const uint8_t ed_identity[] = { 0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03,
                                               0x21, 0x00, 0x01, [43] = 0 };
        _cleanup_free_ char *small = pem_of_der(ed_identity, sizeof ed_identity);
        assert_int_equal(verify_raw_from_pem(small, strlen(small), &raw), 0);
        assert_int_equal(raw.alg, FRAME_ALG_EDDSA);
        assert_int_equal(verify_key_from_raw(&raw, &vk), -EINVAL);
        assert_null(vk);

        /* Refused outright, *ret untouched. */
        _cleanup_free_ char *rsa = pem_of(T.rsa), *p384 = pem_of(T.p384);
        memset(&bad, 0x5a, sizeof bad);
        raw = bad;
        assert_int_equal(verify_raw_from_pem(rsa, strlen(rsa), &raw), -EOPNOTSUPP);
        assert_int_equal(verify_raw_from_pem(p384, strlen(p384), &raw), -EOPNOTSUPP);
        assert_int_equal(verify_raw_from_pem("junk", 4, &raw), -EINVAL);
        assert_memory_equal(&raw, &bad, sizeof raw);
        /* A compact form that is not one. */
        raw = (struct verify_raw) { .alg = FRAME_ALG_ES256, .len = 32 };
        assert_int_equal(verify_key_from_raw(&raw, &vk), -EINVAL);
        assert_int_equal(verify_raw_to_jwk(&raw, &j), -EINVAL);
        raw = (struct verify_raw) { .alg = FRAME_ALG_EDDSA, .len = 65 };
        assert_int_equal(verify_key_from_raw(&raw, &vk), -EINVAL);
        assert_int_equal(verify_raw_to_jwk(&raw, &j), -EINVAL);
        raw = (struct verify_raw) { .alg = FRAME_ALG_ES256, .len = 65, .bytes = { 0x02 } };
        assert_int_equal(verify_key_from_raw(&raw, &vk), -EINVAL);
        assert_null(vk);
        assert_null(j);
}

/* Certificates. */

static X509 *make_cert(EVP_PKEY *key, const char *cn, X509 *issuer, EVP_PKEY *issuer_key, long from_days,
                       long to_days, const char *basic, const char *usage) {
        static long serial = 1;
        X509 *x = X509_new();
        X509V3_CTX ctx;
        X509_NAME *name;

        assert_non_null(x);
        assert_int_equal(X509_set_version(x, X509_VERSION_3), 1);
        assert_int_equal(ASN1_INTEGER_set(X509_get_serialNumber(x), serial++), 1);
        assert_non_null(X509_gmtime_adj(X509_getm_notBefore(x), from_days * 86400));
        assert_non_null(X509_gmtime_adj(X509_getm_notAfter(x), to_days * 86400));
        assert_int_equal(X509_set_pubkey(x, key), 1);
        name = X509_get_subject_name(x);
        assert_int_equal(X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                                                    (const unsigned char *) "Bulbs Inc", -1, -1, 0),
                         1);
        /* A plain UTF8String, so that OpenSSL does not enforce ub-common-name (64) for us. */
        assert_int_equal(X509_NAME_add_entry_by_txt(name, "CN", V_ASN1_UTF8STRING,
                                                    (const unsigned char *) cn, -1, -1, 0),
                         1);
        assert_int_equal(X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : name), 1);
        X509V3_set_ctx(&ctx, issuer ? issuer : x, x, NULL, NULL, 0);
        const char *exts[][2] = {
                { "basicConstraints", basic },
                { "keyUsage", usage },
                { "subjectKeyIdentifier", "hash" },
                { "authorityKeyIdentifier", issuer ? "keyid" : NULL },
        };
        for (size_t i = 0; i < ELEMENTSOF(exts); i++) {
                X509_EXTENSION *e;

                if (!exts[i][1])
                        continue;
                e = X509V3_EXT_conf(NULL, &ctx, exts[i][0], exts[i][1]);
                assert_non_null(e);
                assert_int_equal(X509_add_ext(x, e, -1), 1);
                X509_EXTENSION_free(e);
        }
        assert_true(X509_sign(x, issuer_key ? issuer_key : key,
                              EVP_PKEY_is_a(issuer_key ? issuer_key : key, "EC") ? EVP_sha256() : NULL) > 0);
        return x;
}

static char *cert_pem(X509 *const *certs, size_t n) {
        BIO *b = BIO_new(BIO_s_mem());
        char *data, *s;
        long len;

        for (size_t i = 0; i < n; i++)
                assert_int_equal(PEM_write_bio_X509(b, certs[i]), 1);
        len = BIO_get_mem_data(b, &data);
        s = strndup(data, (size_t) len);
        BIO_free(b);
        return s;
}

static void test_certs(void **state) {
        EVP_PKEY *ca_key = keygen("P-256"), *int_key = keygen("P-256"), *imp_key = keygen("P-256");
        X509 *ca = make_cert(ca_key, "Bulbs Inc Root CA", NULL, NULL, -1, 3650, "critical,CA:TRUE",
                             "critical,keyCertSign,cRLSign");
        X509 *inter = make_cert(int_key, "Bulbs Inc Issuing CA", ca, ca_key, -1, 3650,
                                "critical,CA:TRUE,pathlen:0", "critical,keyCertSign");
        X509 *imp_ca = make_cert(imp_key, "Bulbs Inc Root CA", NULL, NULL, -1, 3650, "critical,CA:TRUE",
                                 "critical,keyCertSign");
        const char *leaf_usage = "critical,digitalSignature";
        char ca_path[128], inter_path[128], empty_path[128], missing_path[128];
        FILE *f;
        struct {
                const char *name;
                X509 *certs[3];
                const char *ca_file;
                int want;
                enum frame_alg alg;
        } cases[] = {
                { "P-256 device",
                  { make_cert(T.p256, "bulb-7", ca, ca_key, -1, 365, "CA:FALSE", leaf_usage) },
                  ca_path,
                  0,
                  FRAME_ALG_ES256 },
                { "Ed25519 device",
                  { make_cert(T.ed25519, "bulb-7", ca, ca_key, -1, 365, "CA:FALSE", leaf_usage) },
                  ca_path,
                  0,
                  FRAME_ALG_EDDSA },
                { "without extensions",
                  { make_cert(T.p256, "bulb-7", ca, ca_key, -1, 365, NULL, NULL) },
                  ca_path,
                  0,
                  FRAME_ALG_ES256 },
                { "via an intermediate",
                  { make_cert(T.p256, "bulb-7", inter, int_key, -1, 365, "CA:FALSE", leaf_usage), inter },
                  ca_path,
                  0,
                  FRAME_ALG_ES256 },
                { "issuing CA as the trust anchor",
                  { make_cert(T.p256, "bulb-7", inter, int_key, -1, 365, "CA:FALSE", leaf_usage) },
                  inter_path,
                  0,
                  FRAME_ALG_ES256 },
                { "intermediate missing",
                  { make_cert(T.p256, "bulb-7", inter, int_key, -1, 365, "CA:FALSE", leaf_usage) },
                  ca_path,
                  -EPERM,
                  0 },
                { "self-signed impostor",
                  { make_cert(T.p256, "bulb-7", NULL, NULL, -1, 365, NULL, NULL) },
                  ca_path,
                  -EPERM,
                  0 },
                { "impostor CA of the same name",
                  { make_cert(T.p256, "bulb-7", imp_ca, imp_key, -1, 365, "CA:FALSE", leaf_usage) },
                  ca_path,
                  -EPERM,
                  0 },
                { "expired",
                  { make_cert(T.p256, "bulb-7", ca, ca_key, -30, -1, "CA:FALSE", leaf_usage) },
                  ca_path,
                  -EPERM,
                  0 },
                { "not yet valid",
                  { make_cert(T.p256, "bulb-7", ca, ca_key, 2, 30, "CA:FALSE", leaf_usage) },
                  ca_path,
                  -EPERM,
                  0 },
                { "key usage without digitalSignature",
                  { make_cert(T.p256, "bulb-7", ca, ca_key, -1, 365, "CA:FALSE", "critical,keyAgreement") },
                  ca_path,
                  -EPERM,
                  0 },
                { "signed by a leaf",
                  { make_cert(T.p256_other, "bulb-8", NULL, NULL, 0, 0, NULL, NULL) }, /* replaced below */
                  ca_path,
                  -EPERM,
                  0 },
                { "invalid CN",
                  { make_cert(T.p256, "bulb 7!", ca, ca_key, -1, 365, "CA:FALSE", leaf_usage) },
                  ca_path,
                  -EINVAL,
                  0 },
                { "CN starting with a dot",
                  { make_cert(T.p256, ".bulb", ca, ca_key, -1, 365, "CA:FALSE", leaf_usage) },
                  ca_path,
                  -EINVAL,
                  0 },
                { "CN too long",
                  { make_cert(T.p256, "b1234567890123456789012345678901234567890123456789012345678901234",
                              ca, ca_key, -1, 365, "CA:FALSE", leaf_usage) },
                  ca_path,
                  -EINVAL,
                  0 },
                { "RSA device",
                  { make_cert(T.rsa, "bulb-7", ca, ca_key, -1, 365, "CA:FALSE", leaf_usage) },
                  ca_path,
                  -EOPNOTSUPP,
                  0 },
                { "P-384 device",
                  { make_cert(T.p384, "bulb-7", ca, ca_key, -1, 365, "CA:FALSE", leaf_usage) },
                  ca_path,
                  -EOPNOTSUPP,
                  0 },
                { "CA file without certificates",
                  { make_cert(T.p256, "bulb-7", ca, ca_key, -1, 365, "CA:FALSE", leaf_usage) },
                  empty_path,
                  -EINVAL,
                  0 },
                { "CA file missing",
                  { make_cert(T.p256, "bulb-7", ca, ca_key, -1, 365, "CA:FALSE", leaf_usage) },
                  missing_path,
                  -ENOENT,
                  0 },
        };

        /* A device certificate that signs another: it is no CA (basicConstraints CA:FALSE). */
        {
                X509 *leaf = make_cert(T.p256, "bulb-7", ca, ca_key, -1, 365, "CA:FALSE", leaf_usage);
                X509_free(cases[10].certs[0]);
                cases[10].certs[0] =
                        make_cert(T.p256_other, "bulb-8", leaf, T.p256, -1, 365, "CA:FALSE", leaf_usage);
                cases[10].certs[1] = leaf;
        }

        (void) snprintf(ca_path, sizeof ca_path, "%s/ca.pem", T.tmpdir);
        (void) snprintf(inter_path, sizeof inter_path, "%s/inter.pem", T.tmpdir);
        (void) snprintf(empty_path, sizeof empty_path, "%s/empty.pem", T.tmpdir);
        (void) snprintf(missing_path, sizeof missing_path, "%s/missing.pem", T.tmpdir);
        f = fopen(ca_path, "w");
        assert_non_null(f);
        assert_int_equal(PEM_write_X509(f, ca), 1);
        assert_int_equal(fclose(f), 0);
        f = fopen(inter_path, "w");
        assert_non_null(f);
        assert_int_equal(PEM_write_X509(f, inter), 1);
        assert_int_equal(fclose(f), 0);
        f = fopen(empty_path, "w");
        assert_non_null(f);
        assert_int_equal(fputs("nothing here\n", f) >= 0, 1);
        assert_int_equal(fclose(f), 0);

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                size_t n = 0;
                while (n < ELEMENTSOF(cases[i].certs) && cases[i].certs[n])
                        n++;
                _cleanup_free_ char *pem = cert_pem(cases[i].certs, n);
                _cleanup_free_ char *err = NULL;
                struct verify_key *vk = NULL;
                enum frame_alg alg = (enum frame_alg) 99;
                char id[DEVICE_ID_MAX + 1] = "untouched";
                int r;

                r = verify_key_from_cert(pem, strlen(pem), cases[i].ca_file, &vk, &alg, id, &err);
                if (r != cases[i].want)
                        fail_msg("%s: got %d (%s), want %d", cases[i].name, r, err ? err : "-",
                                 cases[i].want);
                if (r == 0) {
                        assert_string_equal(id, "bulb-7");
                        assert_int_equal(alg, cases[i].alg);
                        assert_null(err);
                        /* The key is the device's: its signatures verify. */
                        uint8_t sig[72];
                        (void) sign(alg == FRAME_ALG_ES256 ? T.p256 : T.ed25519, MSG, MSG_LEN, sig, NULL,
                                    NULL);
                        assert_int_equal(verify_signature(vk, alg, MSG, MSG_LEN, sig, 64), 0);
                } else {
                        assert_null(vk);
                        assert_string_equal(id, "untouched");
                        assert_int_equal(alg, 99);
                        assert_non_null(err);
                        assert_null(strchr(err, '\n'));
                }
                /* Chain and validity failures quote OpenSSL's verify error. */
                if (cases[i].want == -EPERM && !strstr(cases[i].name, "key usage") &&
                    !strstr(err, "certificate verify failed: "))
                        fail_msg("%s: unexpected message '%s'", cases[i].name, err);
                verify_key_free(vk);
                for (size_t j = 0; j < n; j++)
                        if (cases[i].certs[j] != inter)
                                X509_free(cases[i].certs[j]);
        }

        /* Garbage and a public key where a certificate belongs. */
        _cleanup_free_ char *pub = pem_of(T.p256);
        struct verify_key *vk = NULL;
        char id[DEVICE_ID_MAX + 1];
        char *err = NULL;
        assert_int_equal(verify_key_from_cert("junk", 4, ca_path, &vk, NULL, id, &err), -EINVAL);
        assert_non_null(err);
        free(err);
        assert_int_equal(verify_key_from_cert(pub, strlen(pub), ca_path, &vk, NULL, id, NULL), -EINVAL);
        assert_null(vk);

        X509_free(ca);
        X509_free(inter);
        X509_free(imp_ca);
        EVP_PKEY_free(ca_key);
        EVP_PKEY_free(int_key);
        EVP_PKEY_free(imp_key);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_key_types),        cmocka_unit_test(test_explicit_params),
                cmocka_unit_test(test_pem_garbage),      cmocka_unit_test(test_off_curve),
                cmocka_unit_test(test_signatures),       cmocka_unit_test(test_es256_out_of_range),
                cmocka_unit_test(test_es256_der_shapes), cmocka_unit_test(test_jwk),
                cmocka_unit_test(test_pem_round_trip),   cmocka_unit_test(test_certs),
                cmocka_unit_test(test_raw),
        };

        return cmocka_run_group_tests(tests, setup, teardown);
}
