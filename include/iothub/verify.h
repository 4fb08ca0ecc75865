/* SPDX-License-Identifier: MIT */
/* Bulb signature verification with OpenSSL: ES256 (raw r||s, RFC 7518 3.4) and EdDSA
 * (Ed25519, RFC 8037). Keys come from PEM public keys or device certificates. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "iothub/frame.h"

struct verify_key; /* opaque: the public key and a context reused across frames */

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
