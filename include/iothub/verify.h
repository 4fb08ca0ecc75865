/* SPDX-License-Identifier: MIT */
/* Bulb signature verification with OpenSSL: ES256 (raw r||s, RFC 7518 3.4) and EdDSA
 * (Ed25519, RFC 8037). Keys come from PEM public keys or device certificates. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "iothub/frame.h"

struct verify_key; /* opaque: the public key and a context reused across frames */

/* A public key in its compact form, what the registry keeps for every bulb (about 70 bytes,
 * against 2.2 KB for an OpenSSL P-256 key and 0.6 KB more for its verify context): the
 * uncompressed point 0x04 || x || y of P-256 (SEC 1 2.3.3) or the 32 octets of an Ed25519 key
 * (RFC 8032 5.1.5). Made from a PEM by verify_raw_from_pem(), which only checks the encoding
 * (cheap: no curve arithmetic); verify_key_from_raw() runs the full checks. */
#define VERIFY_RAW_MAX 65
struct verify_raw {
        enum frame_alg alg;
        uint8_t len; /* 65 (ES256) or 32 (EdDSA) */
        uint8_t bytes[VERIFY_RAW_MAX];
};

/* Loads a PEM SubjectPublicKeyInfo. P-256 gives FRAME_ALG_ES256, Ed25519 FRAME_ALG_EDDSA;
 * any other key type or curve is -EOPNOTSUPP, unparseable input -EINVAL. */
int verify_key_from_pem(const char *pem, size_t len, struct verify_key **ret, enum frame_alg *ret_alg);

/* Loads the public key of a PEM device certificate after checking that it chains to the CA
 * bundle in ca_file and is valid now. The certificate's subject CN must be a valid device id:
 * it is returned in ret_id (DEVICE_ID_MAX+1 bytes). Returns 0, -EPERM when the chain or
 * validity check fails, -EINVAL for bad input, -EOPNOTSUPP for an unsupported key. On
 * failure, if ret_error is not NULL, a malloc'ed one-line reason (OpenSSL's verify error). */
int verify_key_from_cert(const char *cert_pem, size_t len, const char *ca_file, struct verify_key **ret,
                         enum frame_alg *ret_alg, char *ret_id, char **ret_error);

/* The compact form of a PEM SubjectPublicKeyInfo, for keys that a full load accepted before
 * (the registry's database). The canonical encodings of P-256 and Ed25519 are recognised byte
 * for byte without building a key (about 1-2 us); any other encoding goes through a full load.
 * A point that is not on the curve, or an Ed25519 key of small order, is NOT found here but by
 * verify_key_from_raw(). Returns 0, -EINVAL, -EOPNOTSUPP or -ENOMEM. */
int verify_raw_from_pem(const char *pem, size_t len, struct verify_raw *ret);
/* Builds a key from its compact form with every check of verify_key_from_pem() (the point is on
 * the curve, no small-order Ed25519 key). Returns 0, -EINVAL for a key that fails them, or
 * -ENOMEM. */
int verify_key_from_raw(const struct verify_raw *raw, struct verify_key **ret);
/* The compact form of a key. Returns 0 or a negative errno. */
int verify_key_to_raw(const struct verify_key *k, struct verify_raw *ret);
/* The public JWK of a compact key (as verify_key_to_jwk(), without building the key). */
int verify_raw_to_jwk(const struct verify_raw *raw, json_t **ret);

/* The SubjectPublicKeyInfo PEM (malloc'ed, NUL-terminated). Returns 0 or a negative errno. */
int verify_key_to_pem(const struct verify_key *k, char **ret);
/* The public JWK (RFC 7517/7518/8037: kty EC crv P-256 x y, or kty OKP crv Ed25519 x). */
int verify_key_to_jwk(const struct verify_key *k, json_t **ret);

/* Checks sig over msg. Returns 0 when valid, -EBADMSG when the signature does not verify
 * (including a wrong length for the algorithm, or an algorithm that does not match the key),
 * another negative errno on internal failure. */
int verify_signature(struct verify_key *k, enum frame_alg alg, const uint8_t *msg, size_t msg_len,
                     const uint8_t *sig, size_t sig_len);

void verify_key_free(struct verify_key *k);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct verify_key *, verify_key_free);
