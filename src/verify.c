/* SPDX-License-Identifier: MIT */
/* Bulb signature verification with OpenSSL 3: ES256 (RFC 7518 3.4) and EdDSA with Ed25519
 * (RFC 8037 3.1). This is the per-frame hot path of the daemon, so everything that can be
 * reused across frames lives in struct verify_key and is built once per key, on its first
 * frame (bulbs that never speak, and iothubctl, pay nothing for it):
 *   ES256: a fetched SHA-256 and an EVP_PKEY_CTX that went through EVP_PKEY_verify_init()
 *          once; per frame only the hash, a stack-built DER signature and EVP_PKEY_verify().
 *   EdDSA: an EVP_MD_CTX that is re-initialised per frame (Ed25519 is a one-shot
 *          signature, RFC 8032 5.1.7, and OpenSSL 3.2+ refuse a second EVP_DigestVerify()
 *          on the same initialisation).
 * A verify_key is not safe for concurrent use by several threads (the daemon has one).
 * A P-256 verify_key with its context costs about 2.8 KB (an OpenSSL EC key carries its own copy
 * of the group), so the daemon does not keep one per bulb: the registry keeps every bulb's key
 * in its compact form (struct verify_raw, from verify_raw_from_pem() at start-up, no curve
 * arithmetic) and the verify_keys of the bulbs heard from last in a bounded LRU (registry.c). */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "iothub/util.h"
#include "iothub/verify.h"
#include "verify-internal.h"

#define P256_COORD_LEN   32                                 /* RFC 7518 6.2.1.2: x and y, 32 octets each */
#define ES256_SIG_LEN    (2 * P256_COORD_LEN)               /* RFC 7518 3.4: R || S */
#define ES256_DER_MAX    (2 + 2 * (2 + 1 + P256_COORD_LEN)) /* SEQUENCE { INTEGER r, INTEGER s } */
#define ED25519_KEY_LEN  32                                 /* RFC 8032 5.1.5 */
#define ED25519_SIG_LEN  64                                 /* RFC 8032 5.1.6 */

struct verify_key {
        enum frame_alg alg;
        EVP_PKEY *pkey;
        /* ES256, made on first use: SHA-256 fetched once and a context verify_init'ed once. */
        EVP_MD *sha256;
        EVP_PKEY_CTX *pctx;
        /* EdDSA, made on first use: one context, re-initialised per frame, always with pkey. */
        EVP_MD_CTX *mdctx;
};

static void openssl_freep(void *p) {
        OPENSSL_free(*(void **) p);
}
static void x509_stack_freep(STACK_OF(X509) **p) {
        if (*p)
                sk_X509_pop_free(*p, X509_free);
}
DEFINE_TRIVIAL_CLEANUP_FUNC(EVP_PKEY *, EVP_PKEY_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(EVP_PKEY_CTX *, EVP_PKEY_CTX_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(BIO *, BIO_free_all);
DEFINE_TRIVIAL_CLEANUP_FUNC(BIGNUM *, BN_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(X509 *, X509_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(X509_STORE *, X509_STORE_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(X509_STORE_CTX *, X509_STORE_CTX_free);

void verify_key_free(struct verify_key *k) {
        if (!k)
                return;
        EVP_MD_CTX_free(k->mdctx);
        EVP_PKEY_CTX_free(k->pctx);
        EVP_MD_free(k->sha256);
        EVP_PKEY_free(k->pkey);
        free(k);
}

/* Only P-256 as a named curve (RFC 5480 2.1.1: specifiedCurve "MUST NOT be used in PKIX", so a
 * key with explicit parameters is refused even when they spell P-256) and Ed25519 (RFC 8410 3). */
static int pkey_classify(EVP_PKEY *pkey, enum frame_alg *ret) {
        char group[64], encoding[32];

        if (EVP_PKEY_is_a(pkey, "ED25519")) {
                *ret = FRAME_ALG_EDDSA;
                return 0;
        }
        if (!EVP_PKEY_is_a(pkey, "EC") || EVP_PKEY_get_group_name(pkey, group, sizeof group, NULL) != 1 ||
            OBJ_txt2nid(group) != NID_X9_62_prime256v1 ||
            EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_EC_ENCODING, encoding, sizeof encoding,
                                           NULL) != 1 ||
            !streq(encoding, OSSL_PKEY_EC_ENCODING_GROUP))
                return openssl_errno(-EOPNOTSUPP);
        *ret = FRAME_ALG_ES256;
        return 0;
}

/* Whether a raw Ed25519 public key encodes a point of small order (1, 2, 4 or 8), canonically or
 * not, with either sign of x (the list and the masking are libsodium's). RFC 8032 5.1.7 verifies
 * [S]B = R + [k]A: with such an A, [k]A takes at most 8 values whatever the message, so a
 * signature (R, S) made without any private key verifies for many messages (for the identity,
 * R = identity and S = 0 verify for all). Such a key is refused. */
static bool ed25519_has_small_order(const uint8_t key[ED25519_KEY_LEN]) {
        static const uint8_t blocklist[][ED25519_KEY_LEN] = {
                /* 0 (order 4) */
                { 0 },
                /* 1 (order 1) */
                { 0x01 },
                /* order 8 */
                { 0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98, 0xf0,
                  0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53, 0xfc, 0x05 },
                /* order 8 */
                { 0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67, 0x0f,
                  0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac, 0x03, 0x7a },
                /* p-1 (order 2), p (= 0, order 4), p+1 (= 1, order 1): y not reduced mod p */
                { 0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f },
                { 0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f },
                { 0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f },
        };

        for (size_t i = 0; i < ELEMENTSOF(blocklist); i++)
                if (memcmp(key, blocklist[i], ED25519_KEY_LEN - 1) == 0 &&
                    (key[ED25519_KEY_LEN - 1] & 0x7f) == blocklist[i][ED25519_KEY_LEN - 1])
                        return true;
        return false;
}

/* Takes over pkey. 'check' runs the public key check of SP 800-56A 5.6.2.3 for EC keys that
 * did not come through the fast path below (which only builds keys from a full point, already
 * checked to be on the curve by OpenSSL). */
static int verify_key_new(EVP_PKEY *pkey, bool check, struct verify_key **ret, enum frame_alg *ret_alg) {
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *owned = pkey;
        enum frame_alg alg = FRAME_ALG_ES256;
        struct verify_key *k;
        int r;

        r = pkey_classify(owned, &alg);
        if (r < 0)
                return r;
        if (alg == FRAME_ALG_EDDSA) {
                uint8_t raw[ED25519_KEY_LEN];
                size_t raw_len = sizeof raw;

                if (EVP_PKEY_get_raw_public_key(owned, raw, &raw_len) != 1 || raw_len != sizeof raw)
                        return openssl_errno(-EINVAL);
                if (ed25519_has_small_order(raw))
                        return -EINVAL;
        }
        if (check && alg == FRAME_ALG_ES256) {
                _cleanup_(EVP_PKEY_CTX_freep) EVP_PKEY_CTX *c =
                        EVP_PKEY_CTX_new_from_pkey(NULL, owned, NULL);

                if (!c)
                        return openssl_errno(-ENOMEM);
                if (EVP_PKEY_public_check(c) != 1)
                        return openssl_errno(-EINVAL);
        }
        k = calloc(1, sizeof *k);
        if (!k)
                return -ENOMEM;
        k->alg = alg;
        k->pkey = TAKE_PTR(owned);
        *ret = k;
        if (ret_alg)
                *ret_alg = alg;
        return 0;
}

/* OpenSSL 3's generic SubjectPublicKeyInfo decoder costs 100 to 300 us per key, which at
 * start-up with thousands of bulbs is the whole READY=1 budget. The two encodings that
 * matter have one canonical DER form each, so they are recognised byte for byte and built
 * from the raw key (about 15 us for P-256, with the on-curve check, and 2 us for Ed25519);
 * everything else (compressed points, other key types) takes the generic path. */
static const uint8_t spki_p256_prefix[] = {
        /* RFC 5480 2: SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING 0x04 x y } */
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
        0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
};
static const uint8_t spki_ed25519_prefix[] = {
        /* RFC 8410 4: SEQUENCE { SEQUENCE { id-Ed25519 }, BIT STRING key } */
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
};

/* The compact form of the two canonical encodings, recognised byte for byte; false for anything
 * else. Only the encoding is checked here, not the key. */
static bool raw_from_canonical_spki(const uint8_t *der, size_t len, struct verify_raw *ret) {
        if (len == sizeof spki_p256_prefix + 1 + 2 * P256_COORD_LEN &&
            memcmp(der, spki_p256_prefix, sizeof spki_p256_prefix) == 0 &&
            der[sizeof spki_p256_prefix] == 0x04) {
                *ret = (struct verify_raw) { .alg = FRAME_ALG_ES256, .len = 1 + 2 * P256_COORD_LEN };
                memcpy(ret->bytes, der + sizeof spki_p256_prefix, ret->len);
                return true;
        }
        if (len == sizeof spki_ed25519_prefix + ED25519_KEY_LEN &&
            memcmp(der, spki_ed25519_prefix, sizeof spki_ed25519_prefix) == 0) {
                *ret = (struct verify_raw) { .alg = FRAME_ALG_EDDSA, .len = ED25519_KEY_LEN };
                memcpy(ret->bytes, der + sizeof spki_ed25519_prefix, ED25519_KEY_LEN);
                return true;
        }
        return false;
}

int verify_key_from_raw(const struct verify_raw *raw, struct verify_key **ret) {
        EVP_PKEY *pkey = NULL;

        if (!raw || !ret)
                return -EINVAL;
        switch (raw->alg) {
        case FRAME_ALG_ES256: {
                _cleanup_(EVP_PKEY_CTX_freep) EVP_PKEY_CTX *c = NULL;
                OSSL_PARAM params[] = {
                        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *) SN_X9_62_prime256v1, 0),
                        OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *) raw->bytes,
                                                1 + 2 * P256_COORD_LEN),
                        OSSL_PARAM_END,
                };

                if (raw->len != 1 + 2 * P256_COORD_LEN || raw->bytes[0] != 0x04)
                        return -EINVAL;
                c = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
                if (!c || EVP_PKEY_fromdata_init(c) != 1)
                        return openssl_errno(-ENOMEM);
                if (EVP_PKEY_fromdata(c, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1)
                        return openssl_errno(-EINVAL); /* not a point on the curve */
                break;
        }
        case FRAME_ALG_EDDSA:
                if (raw->len != ED25519_KEY_LEN)
                        return -EINVAL;
                pkey = EVP_PKEY_new_raw_public_key_ex(NULL, "ED25519", NULL, raw->bytes, ED25519_KEY_LEN);
                if (!pkey)
                        return openssl_errno(-EINVAL);
                break;
        default:
                return -EINVAL;
        }
        /* The small-order check of Ed25519 keys is in verify_key_new(). */
        return verify_key_new(pkey, false, ret, NULL);
}

static int key_from_spki(const uint8_t *der, size_t len, struct verify_key **ret, enum frame_alg *ret_alg) {
        EVP_PKEY *pkey = NULL;
        const uint8_t *p = der;
        struct verify_raw raw;
        int r;

        if (raw_from_canonical_spki(der, len, &raw)) {
                r = verify_key_from_raw(&raw, ret);
                if (r >= 0 && ret_alg)
                        *ret_alg = raw.alg;
                return r;
        }

        if (len > LONG_MAX)
                return -EINVAL;
        pkey = d2i_PUBKEY(NULL, &p, (long) len);
        if (!pkey)
                return openssl_errno(-EINVAL);
        if ((size_t) (p - der) != len) { /* trailing data after the SubjectPublicKeyInfo */
                EVP_PKEY_free(pkey);
                return -EINVAL;
        }
        return verify_key_new(pkey, true, ret, ret_alg);
}

static size_t skip_space(const char *s, size_t len, size_t pos) {
        while (pos < len && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\r' || s[pos] == '\n'))
                pos++;
        return pos;
}

/* Reads the PEM block (RFC 7468 2) that starts at *pos after optional white space, which must
 * be labelled 'label' and carry no headers. Returns 0 and the decoded DER, -ENODATA when only
 * white space is left, -EINVAL for anything else. */
static int pem_next(const char *buf, size_t len, size_t *pos, const char *label, unsigned char **ret_der,
                    size_t *ret_der_len) {
        _cleanup_(BIO_free_allp) BIO *bio = NULL;
        _cleanup_(openssl_freep) char *name = NULL, *header = NULL;
        _cleanup_(openssl_freep) unsigned char *data = NULL;
        char begin[64];
        size_t p, n;
        long data_len;

        p = skip_space(buf, len, *pos);
        if (p == len)
                return -ENODATA;
        n = (size_t) snprintf(begin, sizeof begin, "-----BEGIN %s-----", label);
        if (len - p < n || memcmp(buf + p, begin, n) != 0)
                return -EINVAL; /* text before the block, or another kind of block */

        bio = BIO_new_mem_buf(buf + p, (int) (len - p));
        if (!bio)
                return openssl_errno(-ENOMEM);
        if (PEM_read_bio(bio, &name, &header, &data, &data_len) != 1)
                return openssl_errno(-EINVAL);
        if (!streq(name, label) || header[0] != '\0' || data_len <= 0)
                return -EINVAL;

        *pos = len - (size_t) BIO_pending(bio);
        *ret_der = TAKE_PTR(data);
        *ret_der_len = (size_t) data_len;
        return 0;
}

static int pem_check_input(const char *pem, size_t len) {
        if (!pem || len == 0 || len > VERIFY_PEM_MAX || memchr(pem, '\0', len))
                return -EINVAL;
        return 0;
}

/* Exactly one PUBLIC KEY block (RFC 7468 13), white space around it and nothing else. */
static int public_key_der(const char *pem, size_t len, unsigned char **ret_der, size_t *ret_der_len) {
        size_t pos = 0;
        int r;

        r = pem_check_input(pem, len);
        if (r < 0)
                return r;
        r = pem_next(pem, len, &pos, "PUBLIC KEY", ret_der, ret_der_len);
        if (r < 0)
                return r == -ENODATA ? -EINVAL : r;
        if (skip_space(pem, len, pos) != len) {
                OPENSSL_free(*ret_der);
                *ret_der = NULL;
                return -EINVAL;
        }
        return 0;
}

int verify_key_from_pem(const char *pem, size_t len, struct verify_key **ret, enum frame_alg *ret_alg) {
        _cleanup_(openssl_freep) unsigned char *der = NULL;
        size_t der_len = 0;
        int r;

        if (!ret)
                return -EINVAL;
        r = public_key_der(pem, len, &der, &der_len);
        if (r < 0)
                return r;
        return key_from_spki(der, der_len, ret, ret_alg);
}

/* RFC 4648 4, strict: the alphabet only; -1 for anything else. */
static int b64_value(char c) {
        if (c >= 'A' && c <= 'Z')
                return c - 'A';
        if (c >= 'a' && c <= 'z')
                return c - 'a' + 26;
        if (c >= '0' && c <= '9')
                return c - '0' + 52;
        if (c == '+')
                return 62;
        if (c == '/')
                return 63;
        return -1;
}

/* The text OpenSSL writes for a SubjectPublicKeyInfo (PEM_write_bio_PUBKEY(), what registry_add()
 * stores), exactly: the BEGIN line, base64 in lines of 64 characters (the last one shorter or
 * not), padded, each line ended by one LF, the END line and one LF. Decoded here without a BIO
 * (PEM_read_bio() is 2 us a key, half of registry_open()'s time per bulb); any other layout
 * returns false and takes pem_next(), which decodes it to the same bytes. */
#define PEM_PUBKEY_BEGIN "-----BEGIN PUBLIC KEY-----\n"
#define PEM_PUBKEY_END   "-----END PUBLIC KEY-----\n"
#define PEM_CANONICAL_DER_MAX 96 /* above the 91 octets of a P-256 SubjectPublicKeyInfo */
static bool der_from_canonical_pem(const char *pem, size_t len, uint8_t der[static PEM_CANONICAL_DER_MAX],
                                   size_t *ret_len) {
        const size_t nb = sizeof PEM_PUBKEY_BEGIN - 1, ne = sizeof PEM_PUBKEY_END - 1;
        char b64[PEM_CANONICAL_DER_MAX / 3 * 4];
        size_t n = 0, out = 0, pad = 0;

        if (len < nb + ne + 1 || memcmp(pem, PEM_PUBKEY_BEGIN, nb) != 0 ||
            memcmp(pem + len - ne, PEM_PUBKEY_END, ne) != 0)
                return false;
        /* The body: lines of 64 characters and a LF, the last one 1 to 64 characters. */
        for (size_t i = nb, col = 0; i < len - ne; i++) {
                if (pem[i] == '\n') {
                        if (col == 0 || (col != 64 && i + 1 != len - ne))
                                return false;
                        col = 0;
                        continue;
                }
                if (col == 64 || n == sizeof b64)
                        return false;
                b64[n++] = pem[i];
                col++;
        }
        if (pem[len - ne - 1] != '\n' || n == 0 || n % 4 != 0)
                return false;
        if (b64[n - 1] == '=')
                pad = b64[n - 2] == '=' ? 2 : 1;
        for (size_t i = 0; i < n; i += 4) {
                int v[4];
                uint32_t w = 0;

                for (size_t j = 0; j < 4; j++) {
                        /* '=' only as the padding at the very end (RFC 4648 3.2). */
                        v[j] = i + j >= n - pad ? 0 : b64_value(b64[i + j]);
                        if (v[j] < 0)
                                return false;
                        w = (w << 6) | (uint32_t) v[j];
                }
                der[out++] = (uint8_t) (w >> 16);
                if (i + 4 < n || pad < 2)
                        der[out++] = (uint8_t) (w >> 8);
                if (i + 4 < n || pad < 1)
                        der[out++] = (uint8_t) w;
        }
        *ret_len = out;
        return true;
}

int verify_raw_from_pem(const char *pem, size_t len, struct verify_raw *ret) {
        _cleanup_(openssl_freep) unsigned char *der = NULL;
        _cleanup_(verify_key_freep) struct verify_key *k = NULL;
        struct verify_raw raw;
        uint8_t fast[PEM_CANONICAL_DER_MAX];
        size_t der_len = 0;
        int r;

        if (!ret)
                return -EINVAL;
        if (pem && der_from_canonical_pem(pem, len, fast, &der_len) &&
            raw_from_canonical_spki(fast, der_len, &raw)) {
                *ret = raw;
                return 0;
        }
        r = public_key_der(pem, len, &der, &der_len);
        if (r < 0)
                return r;
        if (raw_from_canonical_spki(der, der_len, &raw)) {
                *ret = raw;
                return 0;
        }
        /* Another encoding of a supported key (a compressed point): rare, so the full load. */
        r = key_from_spki(der, der_len, &k, NULL);
        if (r < 0)
                return r;
        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees k */
        return verify_key_to_raw(k, ret);
}

static int x509_from_der(const unsigned char *der, size_t len, X509 **ret) {
        const unsigned char *p = der;
        X509 *x;

        if (len > LONG_MAX)
                return -EINVAL;
        x = d2i_X509(NULL, &p, (long) len);
        if (!x)
                return openssl_errno(-EINVAL);
        if ((size_t) (p - der) != len) {
                X509_free(x);
                return -EINVAL;
        }
        *ret = x;
        return 0;
}

/* The device certificate, optionally followed by the intermediates that lead to ca_file. */
int certs_from_pem(const char *pem, size_t len, X509 **ret_leaf, STACK_OF(X509) **ret_chain) {
        _cleanup_(X509_freep) X509 *leaf = NULL;
        _cleanup_(x509_stack_freep) STACK_OF(X509) *chain = NULL;
        size_t pos = 0;
        int r;

        r = pem_check_input(pem, len);
        if (r < 0)
                return r;
        chain = sk_X509_new_null();
        if (!chain)
                return -ENOMEM;
        for (size_t i = 0;; i++) {
                _cleanup_(openssl_freep) unsigned char *der = NULL;
                _cleanup_(X509_freep) X509 *x = NULL;
                size_t der_len = 0;

                r = pem_next(pem, len, &pos, "CERTIFICATE", &der, &der_len);
                if (r == -ENODATA && i > 0)
                        break;
                if (r < 0)
                        return r == -ENODATA ? -EINVAL : r;
                if (i > VERIFY_CHAIN_MAX)
                        return -E2BIG;
                r = x509_from_der(der, der_len, &x);
                if (r < 0)
                        return r;
                if (i == 0)
                        leaf = TAKE_PTR(x);
                else {
                        if (sk_X509_push(chain, x) <= 0)
                                return openssl_errno(-ENOMEM);
                        x = NULL; /* owned by the stack now */
                }
        }
        *ret_leaf = TAKE_PTR(leaf);
        *ret_chain = TAKE_PTR(chain);
        return 0;
}

/* The subject's commonName (RFC 5280 4.1.2.6, X.520), exactly one, which must be a device id. */
int cert_device_id(X509 *cert, char *ret_id) {
        _cleanup_(openssl_freep) unsigned char *utf8 = NULL;
        const X509_NAME *subject = X509_get_subject_name(cert);
        int i, n;

        i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
        if (i < 0 || X509_NAME_get_index_by_NID(subject, NID_commonName, i) >= 0)
                return -EINVAL;
        n = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i)));
        if (n < 0)
                return openssl_errno(-EINVAL);
        /* device_id_is_valid() refuses NUL and anything outside [A-Za-z0-9._-]. */
        if (!device_id_is_valid((const char *) utf8, (size_t) n))
                return -EINVAL;
        memcpy(ret_id, utf8, (size_t) n);
        ret_id[n] = '\0';
        return 0;
}

int verify_key_from_cert(const char *cert_pem, size_t len, const char *ca_file, struct verify_key **ret,
                         enum frame_alg *ret_alg, char *ret_id, char **ret_error) {
        _cleanup_(X509_freep) X509 *leaf = NULL;
        _cleanup_(x509_stack_freep) STACK_OF(X509) *chain = NULL;
        _cleanup_(X509_STORE_freep) X509_STORE *store = NULL;
        _cleanup_(X509_STORE_CTX_freep) X509_STORE_CTX *ctx = NULL;
        _cleanup_(verify_key_freep) struct verify_key *k = NULL;
        char id[DEVICE_ID_MAX + 1];
        enum frame_alg alg = FRAME_ALG_ES256;
        EVP_PKEY *pkey;
        uint32_t usage;
        int r;

        if (!ca_file || !ret || !ret_id)
                return set_error_message(ret_error, -EINVAL, "no CA file given");

        r = certs_from_pem(cert_pem, len, &leaf, &chain);
        if (r == -E2BIG)
                return set_error_message(ret_error, -EINVAL, "more than %d intermediate certificates",
                                 VERIFY_CHAIN_MAX);
        if (r < 0)
                return set_error_message(ret_error, r, "not a PEM certificate: %s", strerror(-r));

        store = X509_STORE_new();
        if (!store)
                return set_error_message(ret_error, openssl_errno(-ENOMEM), "out of memory");
        if (X509_STORE_load_file(store, ca_file) != 1) {
                r = openssl_errno(-EINVAL);
                return set_error_message(ret_error, r, "cannot load CA file %s: %s", ca_file,
                                 r == -EINVAL ? "no certificate in it" : strerror(-r));
        }
        /* Every certificate in ca_file is a trust anchor, a root or not (RFC 5280 6.1.1 (d)):
         * the operator decides what to trust, and manufacturers often hand out an issuing CA. */
        if (X509_VERIFY_PARAM_set_flags(X509_STORE_get0_param(store), X509_V_FLAG_PARTIAL_CHAIN) != 1)
                return set_error_message(ret_error, openssl_errno(-ENOMEM), "out of memory");

        ctx = X509_STORE_CTX_new();
        if (!ctx || X509_STORE_CTX_init(ctx, store, leaf, chain) != 1)
                return set_error_message(ret_error, openssl_errno(-ENOMEM), "out of memory");
        /* Path validation (RFC 5280 6.1) at the current time. */
        if (X509_verify_cert(ctx) != 1) {
                int e = X509_STORE_CTX_get_error(ctx);

                if (e == X509_V_OK) /* an internal failure, not a verdict on the certificate */
                        return set_error_message(ret_error, openssl_errno(-EIO), "certificate check failed");
                ERR_clear_error();
                return set_error_message(ret_error, -EPERM, "certificate verify failed: %s (depth %d)",
                                 X509_verify_cert_error_string(e), X509_STORE_CTX_get_error_depth(ctx));
        }
        /* RFC 5280 4.2.1.3: when keyUsage is present, frames need digitalSignature. */
        usage = X509_get_key_usage(leaf);
        if (usage != UINT32_MAX && !(usage & X509v3_KU_DIGITAL_SIGNATURE))
                return set_error_message(ret_error, -EPERM, "certificate key usage does not allow signatures");

        r = cert_device_id(leaf, id);
        if (r < 0)
                return set_error_message(ret_error, r,
                                 "certificate subject needs exactly one CN that is a device id "
                                 "(1 to 64 of [A-Za-z0-9._-], not starting with '.')");

        pkey = X509_get0_pubkey(leaf);
        if (!pkey || EVP_PKEY_up_ref(pkey) != 1)
                return set_error_message(ret_error, openssl_errno(-EINVAL), "certificate has no usable public key");
        r = verify_key_new(pkey, true, &k, &alg); /* takes over the reference */
        if (r == -EOPNOTSUPP)
                return set_error_message(ret_error, r, "unsupported key type: only P-256 and Ed25519 keys");
        if (r < 0)
                return set_error_message(ret_error, r, "bad public key in certificate: %s", strerror(-r));

        memcpy(ret_id, id, strlen(id) + 1);
        *ret = TAKE_PTR(k);
        if (ret_alg)
                *ret_alg = alg;
        return 0;
}

int verify_key_to_pem(const struct verify_key *k, char **ret) {
        if (!k || !ret)
                return -EINVAL;
        /* SubjectPublicKeyInfo (RFC 5280 4.1, RFC 5480 2) only, whatever the key holds. */
        return pkey_public_pem(k->pkey, ret);
}

static int b64url_json(const uint8_t *buf, size_t len, json_t **ret) {
        char s[B64URL_BUF(ED25519_KEY_LEN)];
        json_t *j;

        _Static_assert(ED25519_KEY_LEN >= P256_COORD_LEN, "buffer too small");
        if (len > ED25519_KEY_LEN)
                return -EINVAL;
        (void) b64url_encode(buf, len, s);
        j = json_string(s);
        if (!j)
                return -ENOMEM;
        *ret = j;
        return 0;
}

int verify_key_to_raw(const struct verify_key *k, struct verify_raw *ret) {
        struct verify_raw raw = { .alg = FRAME_ALG_ES256 };

        if (!k || !ret)
                return -EINVAL;
        switch (k->alg) {
        case FRAME_ALG_ES256: {
                _cleanup_(BN_freep) BIGNUM *bx = NULL, *by = NULL;

                /* SEC 1 2.3.3: 0x04 || x || y, each coordinate the full 32 octets. */
                if (EVP_PKEY_get_bn_param(k->pkey, OSSL_PKEY_PARAM_EC_PUB_X, &bx) != 1 ||
                    EVP_PKEY_get_bn_param(k->pkey, OSSL_PKEY_PARAM_EC_PUB_Y, &by) != 1)
                        return openssl_errno(-EIO);
                raw.bytes[0] = 0x04;
                if (BN_bn2binpad(bx, raw.bytes + 1, P256_COORD_LEN) != P256_COORD_LEN ||
                    BN_bn2binpad(by, raw.bytes + 1 + P256_COORD_LEN, P256_COORD_LEN) != P256_COORD_LEN)
                        return openssl_errno(-EIO);
                raw.len = 1 + 2 * P256_COORD_LEN;
                break;
        }
        case FRAME_ALG_EDDSA: {
                size_t n = ED25519_KEY_LEN;

                if (EVP_PKEY_get_raw_public_key(k->pkey, raw.bytes, &n) != 1 || n != ED25519_KEY_LEN)
                        return openssl_errno(-EIO);
                raw.alg = FRAME_ALG_EDDSA;
                raw.len = ED25519_KEY_LEN;
                break;
        }
        default:
                return -EINVAL;
        }
        *ret = raw;
        return 0;
}

int verify_raw_to_jwk(const struct verify_raw *raw, json_t **ret) {
        _cleanup_(json_decrefp) json_t *jwk = NULL, *x = NULL, *y = NULL;
        int r;

        if (!raw || !ret)
                return -EINVAL;
        switch (raw->alg) {
        case FRAME_ALG_ES256:
                /* RFC 7518 6.2.1.2/6.2.1.3: x and y, each the full 32 octets, leading zeros kept. */
                if (raw->len != 1 + 2 * P256_COORD_LEN || raw->bytes[0] != 0x04)
                        return -EINVAL;
                r = b64url_json(raw->bytes + 1, P256_COORD_LEN, &x);
                if (r < 0)
                        return r;
                r = b64url_json(raw->bytes + 1 + P256_COORD_LEN, P256_COORD_LEN, &y);
                if (r < 0)
                        return r;
                jwk = json_pack("{s:s,s:s,s:O,s:O}", "kty", "EC", "crv", "P-256", "x", x, "y", y);
                break;
        case FRAME_ALG_EDDSA:
                /* RFC 8037 2: kty OKP, crv Ed25519, x the 32-octet public key. */
                if (raw->len != ED25519_KEY_LEN)
                        return -EINVAL;
                r = b64url_json(raw->bytes, ED25519_KEY_LEN, &x);
                if (r < 0)
                        return r;
                jwk = json_pack("{s:s,s:s,s:O}", "kty", "OKP", "crv", "Ed25519", "x", x);
                break;
        default:
                return -EINVAL;
        }
        if (!jwk)
                return -ENOMEM;
        *ret = TAKE_PTR(jwk);
        return 0;
}

int verify_key_to_jwk(const struct verify_key *k, json_t **ret) {
        struct verify_raw raw;
        int r;

        if (!k || !ret)
                return -EINVAL;
        r = verify_key_to_raw(k, &raw);
        if (r < 0)
                return r;
        return verify_raw_to_jwk(&raw, ret);
}

/* RFC 7518 3.4 carries R and S as 32 big-endian octets each; OpenSSL verifies the DER
 * ECDSA-Sig-Value of RFC 3279 2.2.3, SEQUENCE { INTEGER r, INTEGER s }. DER integers are
 * minimal two's complement (X.690 8.3.2, 10.1): leading zero octets dropped, and a single
 * 0x00 put back when the top bit is set. Built on the stack: no allocation per frame. */
static size_t der_put_uint(uint8_t *out, const uint8_t *be, size_t n) {
        size_t i = 0, len;
        bool pad;

        while (i + 1 < n && be[i] == 0)
                i++;
        len = n - i;
        pad = be[i] & 0x80;
        out[0] = 0x02; /* INTEGER */
        out[1] = (uint8_t) (len + pad);
        if (pad)
                out[2] = 0x00;
        memcpy(out + 2 + pad, be + i, len);
        return 2 + pad + len;
}

static size_t es256_sig_to_der(const uint8_t *sig, uint8_t *der) {
        size_t n = 2;

        n += der_put_uint(der + n, sig, P256_COORD_LEN);
        n += der_put_uint(der + n, sig + P256_COORD_LEN, P256_COORD_LEN);
        der[0] = 0x30; /* SEQUENCE; at most 70 content octets: short-form length (X.690 8.1.3.4) */
        der[1] = (uint8_t) (n - 2);
        return n;
}

static int es256_prepare(struct verify_key *k) {
        _cleanup_(EVP_PKEY_CTX_freep) EVP_PKEY_CTX *c = NULL;

        if (!k->sha256) {
                k->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
                if (!k->sha256)
                        return openssl_errno(-ENOMEM);
        }
        c = EVP_PKEY_CTX_new_from_pkey(NULL, k->pkey, NULL);
        if (!c)
                return openssl_errno(-ENOMEM);
        /* With the digest set, OpenSSL also insists on a 32-octet input (RFC 7518 3.4: SHA-256). */
        if (EVP_PKEY_verify_init(c) != 1 || EVP_PKEY_CTX_set_signature_md(c, k->sha256) != 1)
                return openssl_errno(-EIO);
        k->pctx = TAKE_PTR(c);
        return 0;
}

static int verify_es256(struct verify_key *k, const uint8_t *msg, size_t msg_len, const uint8_t *sig,
                        size_t sig_len) {
        uint8_t der[ES256_DER_MAX], digest[SHA256_DIGEST_LENGTH];
        size_t der_len;
        int r;

        /* RFC 7518 3.4: exactly 64 octets; a DER signature or any other length is invalid. */
        if (sig_len != ES256_SIG_LEN)
                return -EBADMSG;
        if (!k->pctx) {
                r = es256_prepare(k);
                if (r < 0)
                        return r;
        }
        if (EVP_Digest(msg, msg_len, digest, NULL, k->sha256, NULL) != 1)
                return openssl_errno(-EIO);
        der_len = es256_sig_to_der(sig, der);
        r = EVP_PKEY_verify(k->pctx, der, der_len, digest, sizeof digest);
        if (r == 1)
                return 0;
        if (r == 0) { /* a verdict: the signature is wrong (r or s out of range included) */
                ERR_clear_error();
                return -EBADMSG;
        }
        return openssl_errno(-EIO);
}

static int verify_eddsa(struct verify_key *k, const uint8_t *msg, size_t msg_len, const uint8_t *sig,
                        size_t sig_len) {
        int r;

        /* RFC 8037 3.1, RFC 8032 5.1.6: the signature is 64 octets. */
        if (sig_len != ED25519_SIG_LEN)
                return -EBADMSG;
        if (!k->mdctx) {
                k->mdctx = EVP_MD_CTX_new();
                if (!k->mdctx)
                        return openssl_errno(-ENOMEM);
        }
        /* Always the same key on this context: re-initialising a context that held another key
         * does not reliably switch keys in OpenSSL 3.0, so contexts are never shared. */
        if (EVP_DigestVerifyInit_ex(k->mdctx, NULL, NULL, NULL, NULL, k->pkey, NULL) != 1)
                return openssl_errno(-EIO);
        r = EVP_DigestVerify(k->mdctx, sig, sig_len, msg, msg_len);
        if (r == 1)
                return 0;
        if (r == 0) {
                ERR_clear_error();
                return -EBADMSG;
        }
        return openssl_errno(-EIO);
}

int verify_signature(struct verify_key *k, enum frame_alg alg, const uint8_t *msg, size_t msg_len,
                     const uint8_t *sig, size_t sig_len) {
        if (!k || (!msg && msg_len > 0) || (!sig && sig_len > 0))
                return -EINVAL;
        /* RFC 7515 10.7, PROTOCOL.md 1: the header's alg must be the one of the enrolled key. */
        if (alg != k->alg)
                return -EBADMSG;
        switch (alg) {
        case FRAME_ALG_ES256:
                return verify_es256(k, msg, msg_len, sig, sig_len);
        case FRAME_ALG_EDDSA:
                return verify_eddsa(k, msg, msg_len, sig, sig_len);
        }
        return -EBADMSG;
}
