/* SPDX-License-Identifier: MIT */
/* libFuzzer target for the PEM input of 'iothubctl bulb add' (src/verify.c): the input is what
 * the user (or a script fed by a manufacturer's file) passes as the bulb's key or certificate.
 * Every input goes through
 *   - verify_key_from_pem(): one PUBLIC KEY block, P-256 or Ed25519, nothing else;
 *   - verify_raw_from_pem(), the registry's start-up reading of the same text (the database's
 *     copy of what enrolment accepted): it must agree with verify_key_from_pem() once
 *     verify_key_from_raw() has run the checks it leaves out;
 *   - certs_from_pem() and cert_device_id(): the certificate blocks and the subject's CN, checked
 *     directly so that certificates which do not chain to our CA are parsed all the same;
 *   - verify_key_from_cert() against a CA of our own (written to a temporary file at start): the
 *     seeds hold real device certificates it issued, valid for a century.
 * What is accepted must be a key that exports and re-imports to itself, a device id of the right
 * charset and length, and a signature check that says no to what is not a signature. */
#include <errno.h>
#include <unistd.h>

#include <openssl/x509.h>

#include "../../src/verify-internal.h"
#include "check.h"
#include "iothub/verify.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* The CA of the seed certificates (corpus/pem/cert-*), P-256, self-signed, valid until 2126. Its
 * key is not kept: new seeds come with a new CA (see tests/fuzz/README.md). */
static const char fuzz_ca[] =
        "-----BEGIN CERTIFICATE-----\n"
        "MIIBozCCAUmgAwIBAgIUBxO0p/nvh8Jz3i1ykm6FjkaU2D8wCgYIKoZIzj0EAwIw\n"
        "HjEcMBoGA1UEAwwTaW90aHViIGZ1enogYnVsYiBDQTAgFw0yNjEyMDIwNjA2Mzda\n"
        "GA8yMTI2MTEwODA2MDYzN1owHjEcMBoGA1UEAwwTaW90aHViIGZ1enogYnVsYiBD\n"
        "QTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMHdnqawZ/JBuDbxSwcliexOKeiy\n"
        "ift4JNyiMqh6NOk+oxSKifCpApDPvG7mb6+W1te4KofVzcbb+SasOCct0/yjYzBh\n"
        "MB0GA1UdDgQWBBQr5qsDKiLPYD52y6a2OqDF/dTaXjAfBgNVHSMEGDAWgBQr5qsD\n"
        "KiLPYD52y6a2OqDF/dTaXjAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIB\n"
        "BjAKBggqhkjOPQQDAgNIADBFAiADrIhOfHfx1O43Huxi3/lojVrhWq7rbyXW5nsI\n"
        "JnRrHAIhANRuueR+qLhnc/0WleVJi++c5/Z1VynSOiWeUi/RDUBA\n"
        "-----END CERTIFICATE-----\n";

DEFINE_TRIVIAL_CLEANUP_FUNC(X509 *, X509_free);

static char ca_path[64];

static void remove_ca(void) {
        (void) unlink(ca_path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        const char *tmp = getenv("TMPDIR");
        int fd;

        (void) snprintf(ca_path, sizeof ca_path, "%s/fuzz-pem-ca-XXXXXX",
                        tmp && strlen(tmp) < 32 ? tmp : "/tmp");
        fd = mkstemp(ca_path);
        CHECK(fd >= 0);
        CHECK(write(fd, fuzz_ca, strlen(fuzz_ca)) == (ssize_t) strlen(fuzz_ca));
        CHECK(close(fd) == 0);
        atexit(remove_ca);
        return 0;
}

static bool b64url_len_ok(const json_t *v, size_t len) {
        const char *s = json_string_value(v);

        return s && strlen(s) == len && strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") == len;
}

/* What the registry and the cloud's device list rely on for an accepted key. */
static void check_key(struct verify_key *k, enum frame_alg alg) {
        _cleanup_free_ char *pem = NULL, *pem2 = NULL;
        _cleanup_(verify_key_freep) struct verify_key *k2 = NULL;
        static const uint8_t msg[] = "eyJhbGciOiJFUzI1NiJ9.e30";
        uint8_t sig[64] = { 1 };
        enum frame_alg alg2;
        json_t *jwk = NULL;

        CHECK(alg == FRAME_ALG_ES256 || alg == FRAME_ALG_EDDSA);

        /* The SubjectPublicKeyInfo we store reads back as the same key, in the same text. */
        CHECK(verify_key_to_pem(k, &pem) == 0);
        CHECK(verify_key_from_pem(pem, strlen(pem), &k2, &alg2) == 0 && alg2 == alg);
        CHECK(verify_key_to_pem(k2, &pem2) == 0 && strcmp(pem, pem2) == 0);

        /* The JWK of the cloud's device list (RFC 7518 6.2.1, RFC 8037 2). */
        CHECK(verify_key_to_jwk(k, &jwk) == 0);
        if (alg == FRAME_ALG_ES256) {
                CHECK(json_object_size(jwk) == 4);
                CHECK(strcmp(json_string_value(json_object_get(jwk, "kty")), "EC") == 0);
                CHECK(strcmp(json_string_value(json_object_get(jwk, "crv")), "P-256") == 0);
                CHECK(b64url_len_ok(json_object_get(jwk, "x"), 43) && b64url_len_ok(json_object_get(jwk, "y"), 43));
        } else {
                CHECK(json_object_size(jwk) == 3);
                CHECK(strcmp(json_string_value(json_object_get(jwk, "kty")), "OKP") == 0);
                CHECK(strcmp(json_string_value(json_object_get(jwk, "crv")), "Ed25519") == 0);
                CHECK(b64url_len_ok(json_object_get(jwk, "x"), 43));
        }
        json_decref(jwk);

        /* Not a signature, a signature of the wrong length, the other algorithm: all refused. */
        CHECK(verify_signature(k, alg, msg, sizeof msg - 1, sig, sizeof sig) == -EBADMSG);
        CHECK(verify_signature(k, alg, msg, sizeof msg - 1, sig, sizeof sig - 1) == -EBADMSG);
        CHECK(verify_signature(k, alg == FRAME_ALG_ES256 ? FRAME_ALG_EDDSA : FRAME_ALG_ES256, msg, sizeof msg - 1,
                               sig, sizeof sig) == -EBADMSG);
}

static void check_public_key(const char *pem, size_t size) {
        struct verify_key *k = (struct verify_key *) 0x1;
        enum frame_alg alg = (enum frame_alg) 42;
        int r;

        r = verify_key_from_pem(pem, size, &k, &alg);
        CHECK(r == 0 || r == -EINVAL || r == -EOPNOTSUPP);
        if (size == 0 || size > VERIFY_PEM_MAX || memchr(pem, '\0', size))
                CHECK(r == -EINVAL);
        if (r < 0) {
                CHECK(k == (struct verify_key *) 0x1 && alg == (enum frame_alg) 42);
                return;
        }
        check_key(k, alg);
        verify_key_free(k);
}

/* The compact form agrees with the full load: accepted by both (then the same key), or refused
 * by the full load and then by verify_raw_from_pem() or verify_key_from_raw(). */
static void check_raw(const char *pem, size_t size) {
        struct verify_key *k = NULL, *kr = (struct verify_key *) 0x1;
        struct verify_raw raw, raw2, untouched;
        json_t *j1 = NULL, *j2 = NULL;
        int r_full, r, r_key;

        memset(&untouched, 0x5a, sizeof untouched);
        raw = untouched;
        r_full = verify_key_from_pem(pem, size, &k, NULL);
        r = verify_raw_from_pem(pem, size, &raw);
        CHECK(r == 0 || r == -EINVAL || r == -EOPNOTSUPP);
        if (r < 0) {
                CHECK(memcmp(&raw, &untouched, sizeof raw) == 0);
                CHECK(r_full == r);
                return;
        }
        CHECK((raw.alg == FRAME_ALG_ES256 && raw.len == 65 && raw.bytes[0] == 0x04) ||
              (raw.alg == FRAME_ALG_EDDSA && raw.len == 32));
        CHECK(verify_raw_to_jwk(&raw, &j1) == 0);
        r_key = verify_key_from_raw(&raw, &kr);
        CHECK(r_key == 0 || r_key == -EINVAL);
        CHECK((r_full == 0) == (r_key == 0));
        if (r_key == 0) {
                CHECK(verify_key_to_raw(k, &raw2) == 0);
                CHECK(raw2.alg == raw.alg && raw2.len == raw.len && memcmp(raw2.bytes, raw.bytes, raw.len) == 0);
                CHECK(verify_key_to_jwk(k, &j2) == 0 && json_equal(j1, j2));
                verify_key_free(kr);
        } else
                CHECK(kr == (struct verify_key *) 0x1);
        json_decref(j1);
        json_decref(j2);
        verify_key_free(k);
}

static void check_certificate(const char *pem, size_t size) {
        _cleanup_(X509_freep) X509 *leaf = NULL;
        STACK_OF(X509) *chain = NULL;
        struct verify_key *k = (struct verify_key *) 0x1;
        enum frame_alg alg = (enum frame_alg) 42;
        char id[DEVICE_ID_MAX + 1] = "untouched", leaf_id[DEVICE_ID_MAX + 1] = "";
        char *error = NULL;
        int r, r_id = -1;

        r = certs_from_pem(pem, size, &leaf, &chain);
        CHECK(r == 0 || r == -EINVAL || r == -E2BIG);
        if (r == 0) {
                CHECK(leaf && chain);
                CHECK(sk_X509_num(chain) >= 0 && sk_X509_num(chain) <= VERIFY_CHAIN_MAX);
                r_id = cert_device_id(leaf, leaf_id);
                CHECK(r_id == 0 || r_id == -EINVAL);
                if (r_id == 0)
                        CHECK(device_id_is_valid(leaf_id, strlen(leaf_id)) &&
                              fuzz_id_chars_valid(leaf_id, DEVICE_ID_MAX));
                sk_X509_pop_free(chain, X509_free);
        }

        r = verify_key_from_cert(pem, size, ca_path, &k, &alg, id, &error);
        CHECK(r == 0 || r == -EINVAL || r == -EPERM || r == -EOPNOTSUPP);
        if (r < 0) {
                CHECK(k == (struct verify_key *) 0x1 && strcmp(id, "untouched") == 0);
                CHECK(error && error[0] && fuzz_is_printable_ascii(error));
                free(error);
                return;
        }
        /* Accepted: the certificates parsed, and the id is the leaf's only CN. */
        CHECK(!error);
        CHECK(r_id == 0 && strcmp(id, leaf_id) == 0);
        check_key(k, alg);
        verify_key_free(k);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        check_public_key((const char *) data, size);
        check_raw((const char *) data, size);
        check_certificate((const char *) data, size);
        return 0;
}
