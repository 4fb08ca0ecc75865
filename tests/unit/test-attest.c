/* SPDX-License-Identifier: MIT */
/* The pure parts of attest.c: the DER length of an EK certificate read from its NV index, and the
 * parser of the cloud's challenge answer; and that a file key has no evidence to give. The TPM
 * steps run against swtpm in tests/integration/attest.test.mjs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "iothub/attest.h"
#include "iothub/frame.h"

static void test_der_len(void **state) {
        static const struct {
                const char *name;
                uint8_t buf[8];
                size_t len;
                int r;
                size_t want;
        } cases[] = {
                { "short form", { 0x30, 0x03, 1, 2, 3 }, 5, 0, 5 },
                { "short form, NV padding after it", { 0x30, 0x02, 1, 2, 0xff, 0xff }, 6, 0, 4 },
                { "empty body", { 0x30, 0x00 }, 2, 0, 2 },
                { "long form, one octet", { 0x30, 0x81, 0x03, 1, 2, 3 }, 6, 0, 6 },
                { "body beyond the buffer", { 0x30, 0x04, 1, 2, 3 }, 5, -EBADMSG, 0 },
                { "long form beyond the buffer", { 0x30, 0x82, 0x01, 0x00, 1 }, 5, -EBADMSG, 0 },
                { "indefinite length (BER, not DER)", { 0x30, 0x80, 0, 0 }, 4, -EBADMSG, 0 },
                { "five length octets", { 0x30, 0x85, 0, 0, 0, 0, 1, 0 }, 8, -EBADMSG, 0 },
                { "length octets cut", { 0x30, 0x82, 0x01 }, 3, -EBADMSG, 0 },
                { "high tag number form", { 0x1f, 0x01, 0x00 }, 3, -EBADMSG, 0 },
                { "one octet", { 0x30 }, 1, -EBADMSG, 0 },
                { "nothing", { 0 }, 0, -EBADMSG, 0 },
        };

        for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
                size_t got = 12345;
                int r = attest_der_len(cases[i].buf, cases[i].len, &got);

                if (r != cases[i].r)
                        fail_msg("%s: r = %d, want %d", cases[i].name, r, cases[i].r);
                assert_int_equal(got, r == 0 ? cases[i].want : 12345); /* untouched on failure */
        }

        /* A 1 KiB certificate as an RSA EK's, in an NV index with 100 octets more. */
        uint8_t big[1024 + 4 + 100];
        size_t got = 0;
        memset(big, 0xab, sizeof big);
        big[0] = 0x30;
        big[1] = 0x82;
        big[2] = 0x04;
        big[3] = 0x00;
        assert_int_equal(attest_der_len(big, sizeof big, &got), 0);
        assert_int_equal(got, 1028);
        assert_int_equal(attest_der_len(big, 1027, &got), -EBADMSG);
        assert_int_equal(attest_der_len(NULL, 10, &got), -EBADMSG);
}

static char *b64u(size_t n, uint8_t fill) {
        uint8_t *raw = malloc(n ? n : 1);
        char *s = malloc(B64URL_BUF(n));

        assert_non_null(raw);
        assert_non_null(s);
        memset(raw, fill, n);
        (void) b64url_encode(raw, n, s);
        free(raw);
        return s;
}

/* {"nonce":<n octets>,"credential":<c>,"secret":<s>}, plus 'extra' before the closing brace. */
static char *answer(size_t n, size_t c, size_t s, const char *extra) {
        char *bn = b64u(n, 0x11), *bc = b64u(c, 0x22), *bs = b64u(s, 0x33), *out = NULL;

        assert_true(asprintf(&out, "{\"nonce\":\"%s\",\"credential\":\"%s\",\"secret\":\"%s\"%s}", bn, bc, bs,
                             extra) > 0);
        free(bn);
        free(bc);
        free(bs);
        return out;
}

/* A size_t with every byte 0x5a, as memset() leaves it: 32 bits on armhf, 64 on arm64. */
static size_t untouched_size(void) {
        size_t v;

        memset(&v, 0x5a, sizeof v);
        return v;
}

static void test_parse_challenge(void **state) {
        struct attest_challenge ch;
        char *body;

        /* What the reference cloud sends: 32-octet nonce, 2+32+34-octet credential, 256-octet seed. */
        body = answer(32, 68, 256, "");
        assert_int_equal(attest_parse_challenge(body, strlen(body), &ch), 0);
        assert_int_equal(ch.nonce_len, 32);
        assert_int_equal(ch.credential_len, 68);
        assert_int_equal(ch.secret_len, 256);
        assert_int_equal(ch.nonce[31], 0x11);
        assert_int_equal(ch.credential[0], 0x22);
        assert_int_equal(ch.secret[255], 0x33);
        free(body);

        /* Limits, each on the edge and one past it. */
        static const struct {
                size_t n, c, s;
                int r;
        } sizes[] = {
                { ATTEST_NONCE_MIN, 5, 1, 0 },
                { ATTEST_NONCE_MAX, ATTEST_CREDENTIAL_MAX, ATTEST_SECRET_MAX, 0 },
                { ATTEST_NONCE_MIN - 1, 68, 256, -EBADMSG },
                { ATTEST_NONCE_MAX + 1, 68, 256, -EBADMSG },
                { 32, 4, 256, -EBADMSG },
                { 32, ATTEST_CREDENTIAL_MAX + 1, 256, -EBADMSG },
                { 32, 68, ATTEST_SECRET_MAX + 1, -EBADMSG },
        };
        for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
                body = answer(sizes[i].n, sizes[i].c, sizes[i].s, "");
                memset(&ch, 0x5a, sizeof ch);
                if (attest_parse_challenge(body, strlen(body), &ch) != sizes[i].r)
                        fail_msg("sizes %zu/%zu/%zu: want %d", sizes[i].n, sizes[i].c, sizes[i].s, sizes[i].r);
                if (sizes[i].r < 0)
                        assert_int_equal(ch.nonce_len, untouched_size()); /* untouched */
                free(body);
        }

        /* Shapes the contract does not allow. */
        static const char *bad[] = {
                "",
                "[]",
                "null",
                "{}",
                "{\"nonce\":\"ERERERERERERERERERERERERERERERERERERERERERE\",\"credential\":\"IiIiIiI\"}",
                "{\"nonce\":\"ERERERERERERERERERERERERERERERERERERERERERE\",\"credential\":\"IiIiIiI\",\"secret\":\"MzM=\"}",
                "{\"nonce\":\"ERERERERERERERERERERERERERERERERERERERERERE\",\"credential\":\"IiIiIiI\",\"secret\":5}",
                "{\"nonce\":\"ERERERERERERERERERERERERERERERERERERERERERE\",\"credential\":\"IiIiIiI\",\"secret\":\"M+M\"}",
                "{\"nonce\":\"ERERERERERERERERERERERERERERERERERERERERERE\",\"credential\":\"IiIiIiI\",\"secret\":\"MzM\","
                "\"secret\":\"MzM\"}",
                "{\"nonce\":\"ERERERERERERERERERERERERERERERERERERERERERE\",\"credential\":\"IiIiIiI\",\"secret\":\"MzM\"} x",
        };
        for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
                if (attest_parse_challenge(bad[i], strlen(bad[i]), &ch) != -EBADMSG)
                        fail_msg("accepted: %s", bad[i]);
        body = answer(32, 68, 256, ",\"extra\":1");
        assert_int_equal(attest_parse_challenge(body, strlen(body), &ch), -EBADMSG);
        free(body);

        /* The one well-formed body above, accepted, so that the refusals are for their reason. */
        const char *good = "{\"nonce\":\"ERERERERERERERERERERERERERERERERERERERERERE\",\"credential\":\"IiIiIiI\","
                           "\"secret\":\"MzM\"}";
        assert_int_equal(attest_parse_challenge(good, strlen(good), &ch), 0);
        assert_int_equal(ch.nonce_len, 32);

        /* Larger than ATTEST_ANSWER_MAX: refused unread, whatever it holds. */
        size_t big = ATTEST_ANSWER_MAX + 1;
        char *huge = malloc(big);
        assert_non_null(huge);
        memset(huge, ' ', big);
        memcpy(huge, good, strlen(good));
        assert_int_equal(attest_parse_challenge(huge, big, &ch), -EBADMSG);
        free(huge);
        assert_int_equal(attest_parse_challenge(NULL, 0, &ch), -EBADMSG);
}

static void test_file_key_has_no_evidence(void **state) {
        char dir[] = "/tmp/test-attest-XXXXXX", *path = NULL, *error = NULL;
        struct hubkey *k = NULL;
        struct attest *a = NULL;

        assert_non_null(mkdtemp(dir));
        assert_true(asprintf(&path, "%s/hub.key", dir) > 0);
        struct iothub_conf c = { .key = { .backend = KEY_BACKEND_FILE, .file = path } };
        assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        assert_int_equal(attest_begin(k, &a, &error), -EOPNOTSUPP);
        assert_null(a);
        assert_non_null(error);
        assert_non_null(strstr(error, "not in a TPM"));
        free(error);
        hubkey_free(k);
        assert_int_equal(unlink(path), 0);
        assert_int_equal(rmdir(dir), 0);
        free(path);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_der_len),
                cmocka_unit_test(test_parse_challenge),
                cmocka_unit_test(test_file_key_has_no_evidence),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
