/* SPDX-License-Identifier: MIT */
/* The hub's own identity key: ECC P-256, behind one interface with two backends.
 *   tpm:  created in the TPM under a storage primary key, persistent at [key] handle,
 *         fixedTPM|fixedParent|sensitiveDataOrigin, sign only; reached with tpm2-tss ESYS
 *         through the TCTI loader ([key] tcti). The private key never leaves the TPM.
 *   file: a PEM private key read with OpenSSL ([key] file), a development aid only. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "iothub/conf.h"

#define HUBKEY_ID_LEN 43 /* base64url of a SHA-256 thumbprint, no padding */
#define HUBKEY_SIG_LEN 64 /* raw r||s */

struct hubkey;

/* Opens the existing key of the configured backend. -ENOENT when there is none yet (run
 * 'iothubctl key init'), other negative errno on failure; ret_error, when not NULL, gets a
 * malloc'ed one-line reason (TPM errors decoded with Tss2_RC_Decode). */
int hubkey_open(const struct iothub_conf *c, struct hubkey **ret, char **ret_error);

/* Creates the key if there is none (tpm: primary + child + EvictControl to [key] handle;
 * file: generates a P-256 key into [key] file, mode 0600, when the file does not exist).
 * Never replaces an existing key: if the handle holds a key that is not a P-256 signing key
 * it fails with -EEXIST. *ret_created tells whether a key was made. */
int hubkey_init(const struct iothub_conf *c, bool *ret_created, char **ret_error);

/* Signs a SHA-256 digest; writes 64 bytes r||s (each zero-padded to 32). Returns 0 or a
 * negative errno. Counts the signature. */
int hubkey_sign_digest(struct hubkey *k, const uint8_t digest[32], uint8_t ret_sig[HUBKEY_SIG_LEN]);
/* SHA-256 of msg, then hubkey_sign_digest(). */
int hubkey_sign(struct hubkey *k, const void *msg, size_t len, uint8_t ret_sig[HUBKEY_SIG_LEN]);

/* Public key as SubjectPublicKeyInfo PEM (malloc'ed) and as a JWK {"kty":"EC","crv":"P-256",
 * "x":..,"y":..}; key id = RFC 7638 JWK SHA-256 thumbprint, base64url, NUL-terminated. */
int hubkey_public_pem(const struct hubkey *k, char **ret);
int hubkey_public_jwk(const struct hubkey *k, json_t **ret);
const char *hubkey_id(const struct hubkey *k);
/* Why the last signature failed (the TPM unreachable, or the key not in the TPM that answers),
 * NULL once one succeeded. A TPM key whose connection died is connected again by the next
 * signature, and refused (-ENOKEY) unless the key at its handle is the one first opened. */
const char *hubkey_last_error(const struct hubkey *k);

uint64_t hubkey_signatures(const struct hubkey *k);

/* Seals a small secret (at most 128 bytes) to this TPM: a keyedHash sealed-data object under
 * the storage primary key (fixedTPM, fixedParent, userWithAuth, no sign/decrypt), returned
 * as one opaque blob (TPM2B_PUBLIC and TPM2B_PRIVATE, marshalled). It can only be unsealed by
 * the same TPM. With the file backend the "blob" is the secret itself (no protection beyond
 * the file mode; the caller warns). Both malloc'ed; the caller wipes the secret.
 * seal: -EINVAL for an empty secret, -EMSGSIZE for one longer than HUBKEY_SEAL_MAX.
 * unseal: -EBADMSG when the blob is malformed (magic, sizes, trailing bytes, not a sealed-data
 * object as hubkey_seal() makes them); -ENOKEY when the TPM refuses it (sealed by another TPM,
 * or by this one before a TPM clear, or altered); other negative errno when the TPM fails. */
#define HUBKEY_SEAL_MAX 128
int hubkey_seal(struct hubkey *k, const uint8_t *secret, size_t len, uint8_t **ret_blob, size_t *ret_blob_len);
int hubkey_unseal(struct hubkey *k, const uint8_t *blob, size_t blob_len, uint8_t **ret_secret, size_t *ret_len);
enum key_backend hubkey_backend(const struct hubkey *k);

/* tpm backend: the ESYS context and the ESYS_TR of the persistent key, borrowed (valid while k
 * lives), for attest.c, whose TPM commands must share the one connection (swtpm takes a single
 * client). -EOPNOTSUPP for a file key. */
struct ESYS_CONTEXT;
int hubkey_tpm_context(struct hubkey *k, struct ESYS_CONTEXT **ret_esys, uint32_t *ret_key);
/* The TSS2_RC translation of this file (one per library, STYLE.md) for attest.c: a negative errno,
 * and when ret_error is not NULL "TPM: <decoded> (0x..) while <what>". */
int hubkey_tpm_error(uint32_t rc, char **ret_error, const char *what);

void hubkey_free(struct hubkey *k);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct hubkey *, hubkey_free);
