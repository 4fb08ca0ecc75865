/* SPDX-License-Identifier: MIT */
/* The shared policies of util.c and jws.c: backoff, rate-limited logging, id characters,
 * base64 sizes, JWS Compact building (checked with OpenSSL, not with our own code). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include <openssl/bn.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>

#include "iothub/frame.h"
#include "iothub/jws.h"
#include "iothub/util.h"

static void test_backoff_bounds(void **state) {
        /* Step doubles from min to max; the delay is in [step/2, step] whatever rnd is. */
        uint64_t step = 500;

        for (unsigned f = 1; f <= 40; f++) {
                assert_int_equal(backoff_ms(f, 500, 30000, 0), step / 2);
                assert_int_equal(backoff_ms(f, 500, 30000, (uint32_t) (step / 2)), step);
                assert_int_equal(backoff_ms(f, 500, 30000, UINT32_MAX), step / 2 + UINT32_MAX % (step / 2 + 1));
                assert_true(backoff_ms(f, 500, 30000, 12345) >= step / 2);
                assert_true(backoff_ms(f, 500, 30000, 12345) <= step);
                step = step * 2 > 30000 ? 30000 : step * 2;
        }
        /* failures 0 (never passed today) behaves as the first failure; a huge count stays capped. */
        assert_int_equal(backoff_ms(0, 1000, 300000, 0), 500);
        assert_int_equal(backoff_ms(UINT32_MAX, 1000, 300000, 0), 150000);
}

static void test_backoff_mqtt_sequence(void **state) {
        /* The reconnect delays mqtt.c drew before it called backoff_ms(): a doubling step kept in
         * the struct, 500 ms .. 30 s, delay = step/2 + rnd % (step/2 + 1). */
        unsigned old_step = 500;

        for (unsigned f = 1; f <= 20; f++) {
                for (uint32_t rnd = 0; rnd < 70000; rnd += 977)
                        assert_int_equal(backoff_ms(f, 500, 30000, rnd), old_step / 2 + rnd % (old_step / 2 + 1));
                old_step = old_step * 2 > 30000 ? 30000 : old_step * 2;
        }
}

static void test_ratelimit(void **state) {
        struct ratelimit rl = {};
        uint64_t suppressed = 99, now = 100000000; /* past the first window: it begins here */

        for (int i = 0; i < 5; i++) {
                assert_true(ratelimit_allow(&rl, now, 10000000, 5, &suppressed));
                assert_int_equal(suppressed, 0);
        }
        for (int i = 0; i < 7; i++) {
                assert_false(ratelimit_allow(&rl, now + 9999999, 10000000, 5, &suppressed));
                assert_int_equal(suppressed, 0);
        }
        /* The next window: the held-back count is handed out once, and the burst is back. */
        assert_true(ratelimit_allow(&rl, now + 10000000, 10000000, 5, &suppressed));
        assert_int_equal(suppressed, 7);
        assert_true(ratelimit_allow(&rl, now + 10000001, 10000000, 5, &suppressed));
        assert_int_equal(suppressed, 0);
        /* A zeroed limit at monotonic time 0 lets the first message through. */
        memset(&rl, 0, sizeof rl);
        assert_true(ratelimit_allow(&rl, 0, 10000000, 1, &suppressed));
        assert_false(ratelimit_allow(&rl, 1, 10000000, 1, &suppressed));
}

static void test_ids(void **state) {
        char long_id[DEVICE_ID_MAX + 2];

        assert_true(id_chars_are_valid("aZ09._-", 7));
        assert_true(id_chars_are_valid("", 0));
        assert_false(id_chars_are_valid("a/b", 3));
        assert_false(id_chars_are_valid("a b", 3));
        assert_false(id_chars_are_valid("a\0b", 3));
        assert_false(id_chars_are_valid("\xc3\xa9", 2));
        assert_true(b64url_chars_are_valid("AZaz09-_", 8));
        assert_false(b64url_chars_are_valid("ab.c", 4)); /* '.' separates JWS parts, it is no digit */
        assert_false(b64url_chars_are_valid("ab+/", 4)); /* standard base64, not base64url */
        assert_false(b64url_chars_are_valid("ab=", 3));
        assert_true(device_id_is_valid("bulb-1.kitchen_2", 16));
        assert_false(device_id_is_valid(".hidden", 7));
        assert_false(device_id_is_valid("", 0));
        assert_false(device_id_is_valid(NULL, 3));
        memset(long_id, 'a', sizeof long_id);
        assert_true(device_id_is_valid(long_id, DEVICE_ID_MAX));
        assert_false(device_id_is_valid(long_id, DEVICE_ID_MAX + 1));
}

/* RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=" */
static void test_b64token(void **state) {
        static const struct {
                const char *s;
                bool ok;
        } table[] = {
                { "abc", true },         { "A-._~+/9", true }, { "abc==", true },    { "a=", true },
                { "", false },           { "=", false },       { "a=b", false },     { "a b", false },
                { "abc\r\n", false },    { "abc\n", false },   { "ab\"c", false },   { "ab,c", false },
                { "ab:c", false },       { "\xc3\xa9", false },
        };

        for (size_t i = 0; i < ELEMENTSOF(table); i++)
                assert_int_equal(b64token_is_valid(table[i].s, strlen(table[i].s)), table[i].ok);
        assert_false(b64token_is_valid(NULL, 0));
        /* The length is what counts, not a NUL: a token cut at a NUL is not the token. */
        assert_false(b64token_is_valid("ab\0c", 4));
}

static void test_b64_sizes(void **state) {
        uint8_t in[200];
        char out[300];

        memset(in, 0xA5, sizeof in);
        for (size_t n = 0; n < sizeof in; n++) {
                size_t len = b64url_encode(in, n, out);
                uint8_t back[200];

                assert_int_equal(len, B64URL_LEN(n));
                assert_int_equal(strlen(out) + 1, B64URL_BUF(n));
                assert_true(BASE64_LEN(n) >= len && BASE64_LEN(n) % 4 == 0 && BASE64_LEN(n) - len < 4);
                assert_true(B64URL_DECODED_MAX(len) >= n);
                assert_int_equal(b64url_decode(out, len, back, sizeof back), (ssize_t) n);
        }
        assert_int_equal(BASE64_LEN(32), 44); /* SHA-256 in Content-Digest */
        assert_int_equal(B64URL_LEN(32), 43); /* a JWK thumbprint */
        assert_int_equal(B64URL_LEN(64), 86); /* an ES256 signature */
}

static int sign_p256(void *userdata, const void *msg, size_t len, uint8_t ret_sig[HUBKEY_SIG_LEN]) {
        EVP_PKEY *k = userdata;
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        uint8_t der[80];
        const uint8_t *p = der;
        size_t dl = sizeof der;
        ECDSA_SIG *s;
        int ok;

        ok = ctx && EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, k) == 1 &&
             EVP_DigestSign(ctx, der, &dl, msg, len) == 1;
        EVP_MD_CTX_free(ctx);
        if (!ok)
                return -EIO;
        s = d2i_ECDSA_SIG(NULL, &p, (long) dl);
        if (!s)
                return -EIO;
        ok = BN_bn2binpad(ECDSA_SIG_get0_r(s), ret_sig, 32) == 32 && BN_bn2binpad(ECDSA_SIG_get0_s(s), ret_sig + 32, 32) == 32;
        ECDSA_SIG_free(s);
        return ok ? 0 : -EIO;
}

static int sign_fails(void *userdata, const void *msg, size_t len, uint8_t ret_sig[HUBKEY_SIG_LEN]) {
        return -EIO;
}

static void test_jws_compact(void **state) {
        EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
        const char *h = "{\"alg\":\"ES256\"}", *pl = "{\"x\":1}";
        char *jws = NULL, *untouched = (char *) "x", *d1, *d2;
        uint8_t raw[HUBKEY_SIG_LEN], der[80], *dp = der;
        char hb[64], pb[64];
        ECDSA_SIG *s = ECDSA_SIG_new();
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        int dl;

        assert_non_null(k);
        assert_int_equal(jws_compact_sign(h, strlen(h), pl, strlen(pl), sign_p256, k, &jws), 0);
        (void) b64url_encode((const uint8_t *) h, strlen(h), hb);
        (void) b64url_encode((const uint8_t *) pl, strlen(pl), pb);
        d1 = strchr(jws, '.');
        assert_non_null(d1);
        d2 = strchr(d1 + 1, '.');
        assert_non_null(d2);
        assert_null(strchr(d2 + 1, '.'));
        assert_int_equal(d1 - jws, (ptrdiff_t) strlen(hb));
        assert_memory_equal(jws, hb, strlen(hb));
        assert_memory_equal(d1 + 1, pb, strlen(pb));
        assert_int_equal(strlen(d2 + 1), B64URL_LEN(HUBKEY_SIG_LEN));
        /* The signature verifies with OpenSSL over "<header>.<payload>" (RFC 7515 5.2). */
        assert_int_equal(b64url_decode(d2 + 1, strlen(d2 + 1), raw, sizeof raw), HUBKEY_SIG_LEN);
        assert_int_equal(ECDSA_SIG_set0(s, BN_bin2bn(raw, 32, NULL), BN_bin2bn(raw + 32, 32, NULL)), 1);
        dl = i2d_ECDSA_SIG(s, &dp);
        assert_true(dl > 0);
        assert_int_equal(EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, k), 1);
        assert_int_equal(EVP_DigestVerify(ctx, der, (size_t) dl, (const uint8_t *) jws, (size_t) (d2 - jws)), 1);
        /* Errors leave *ret alone. */
        assert_int_equal(jws_compact_sign(h, strlen(h), pl, strlen(pl), sign_fails, NULL, &untouched), -EIO);
        assert_int_equal(jws_compact_sign(h, 0, pl, strlen(pl), sign_p256, k, &untouched), -EINVAL);
        assert_int_equal(jws_compact_sign(h, strlen(h), pl, 0, sign_p256, k, &untouched), -EINVAL);
        assert_string_equal(untouched, "x");
        free(jws);
        ECDSA_SIG_free(s);
        EVP_MD_CTX_free(ctx);
        EVP_PKEY_free(k);
}

/* erase_grow(): 4096 doubled, at most max, the used bytes kept, nothing changed on failure. */
static void test_erase_grow(void **state) {
        void *buf = NULL;
        size_t cap = 0;

        assert_int_equal(erase_grow(&buf, &cap, 0, 10, 1 << 20), 0);
        assert_non_null(buf);
        assert_int_equal(cap, 4096);
        memcpy(buf, "secret", 6);
        assert_int_equal(erase_grow(&buf, &cap, 6, 4096, 1 << 20), 0); /* fits: unchanged */
        assert_int_equal(cap, 4096);
        assert_int_equal(erase_grow(&buf, &cap, 6, 4097, 1 << 20), 0);
        assert_int_equal(cap, 8192);
        assert_memory_equal(buf, "secret", 6);
        assert_int_equal(erase_grow(&buf, &cap, 6, 20000, 20001), 0); /* capped at max */
        assert_int_equal(cap, 20001);
        assert_memory_equal(buf, "secret", 6);
        void *keep = buf;
        assert_int_equal(erase_grow(&buf, &cap, 6, 20002, 20001), -EFBIG);
        assert_ptr_equal(buf, keep);
        assert_int_equal(cap, 20001);
        assert_int_equal(erase_grow(&buf, &cap, 7, 6, 20001), -EINVAL); /* used > need */
        assert_ptr_equal(buf, keep);
        free(buf);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_backoff_bounds), cmocka_unit_test(test_backoff_mqtt_sequence),
                cmocka_unit_test(test_ratelimit), cmocka_unit_test(test_erase_grow),      cmocka_unit_test(test_ids),
                cmocka_unit_test(test_b64_sizes),      cmocka_unit_test(test_b64token),      cmocka_unit_test(test_jws_compact),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
