/* SPDX-License-Identifier: MIT */
/* Hub key attestation (PROTOCOL.md 5, iothub-protocol(7) "Attestation"): evidence that the hub key
 * lives in a TPM and cannot leave it, for the registration. Two steps around one round trip to
 * the cloud:
 *   attest_begin():  reads the TPM's EK certificate (TCG EK Credential Profile NV index) and
 *                    derives the attestation key (AK, a restricted signing primary key in the
 *                    endorsement hierarchy); the cloud gets both with the challenge request.
 *   attest_answer(): TPM2_ActivateCredential of the cloud's TPM2_MakeCredential blob (the AK is
 *                    in the TPM of the EK) and TPM2_Certify of the hub key by the AK with the
 *                    cloud's nonce as qualifying data; gives the "attestation" object.
 * Every transient object is flushed before a call returns (the TPM has few slots, TESTBED.md).
 * The TPM commands run on the hub key's ESYS context (hubkey_tpm_context()). */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "iothub/hubkey.h"

#define ATTEST_NONCE_MIN 16      /* the cloud's nonce, bytes */
#define ATTEST_NONCE_MAX 64
#define ATTEST_EK_CERT_MAX 4096  /* an RSA 2048 EK certificate is about 1 KiB */
#define ATTEST_CREDENTIAL_MAX 256 /* TPMS_ID_OBJECT: 2+32 HMAC, 2+32 encrypted digest */
#define ATTEST_SECRET_MAX 512    /* TPMU_ENCRYPTED_SECRET: 256 for RSA 2048 */
#define ATTEST_ANSWER_MAX 4096   /* bytes of the cloud's challenge answer we read at most */

/* The TCG EK Credential Profile 2.0, 2.2.1.4 "Low Range": NV index of the RSA 2048 EK
 * certificate, and the persistent handle of the EK ("TPM v2.0 Provisioning Guidance" 7.8). */
#define ATTEST_EK_CERT_NV_RSA UINT32_C(0x01c00002)
#define ATTEST_EK_HANDLE_RSA UINT32_C(0x81010001)

struct attest;

/* The cloud's answer to the challenge request, decoded. */
struct attest_challenge {
        uint8_t nonce[ATTEST_NONCE_MAX];
        size_t nonce_len;
        uint8_t credential[ATTEST_CREDENTIAL_MAX]; /* TPM2B_ID_OBJECT.credential */
        size_t credential_len;
        uint8_t secret[ATTEST_SECRET_MAX]; /* TPM2B_ENCRYPTED_SECRET.secret */
        size_t secret_len;
};

/* Reads the EK certificate and creates the AK (then flushes it). -EOPNOTSUPP for a file-backed
 * key; -ENOENT when the TPM holds no RSA EK certificate; other negative errno on TPM failure.
 * ret_error, when not NULL, gets a malloc'ed one-line reason. */
int attest_begin(struct hubkey *k, struct attest **ret, char **ret_error);

/* Adds the challenge request's members "ek_cert" (DER) and "ak_public" (TPM2B_PUBLIC), base64url,
 * to o. Returns 0 or a negative errno. */
int attest_challenge_json(const struct attest *a, json_t *o);

/* Parses the cloud's answer {"nonce":..,"credential":..,"secret":..} (base64url, each within
 * its limit, nothing else, no duplicate members). Returns 0 or -EBADMSG. Pure. */
int attest_parse_challenge(const char *body, size_t len, struct attest_challenge *ret);

/* Activates the credential, certifies the hub key and returns the "attestation" object of the
 * registration (new reference). -ENOKEY when the TPM refuses the credential (it was made for
 * another TPM's EK or another AK); other negative errno on failure. */
int attest_answer(struct attest *a, struct hubkey *k, const struct attest_challenge *ch, json_t **ret,
                  char **ret_error);

void attest_free(struct attest *a);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct attest *, attest_free);

/* The length of the DER element (X.690 8.1) that starts buf: an EK certificate's NV index may be
 * larger than the certificate. Only definite lengths of at most 4 octets. Returns 0 and the
 * length (header included, at most len), or -EBADMSG. Pure. */
int attest_der_len(const uint8_t *buf, size_t len, size_t *ret);
