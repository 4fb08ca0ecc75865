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
#include <systemd/sd-event.h>

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

/* ---- asynchronous signing (DESIGN.md "Targets": signing never blocks the loop) ----
 * A TPM chip takes about 70 ms per signature; the daemon's one loop must not wait for it. The
 * rule:
 *   - On the loop (the daemon), sign with hubkey_sign_async(). With the tpm backend the command
 *     goes out with ESYS's Esys_Sign_Async() and the answer is read with Esys_Sign_Finish() when
 *     the TCTI's poll handle (Esys_GetPollHandles()) turns readable, as an sd-event io source.
 *     A TCTI without poll handles (the "swtpm" TCTI, which opens a connection per command)
 *     falls back to a blocking Esys_Sign_Finish() from the loop; /dev/tpmrm0 ("device") and
 *     "mssim" have them. The file backend signs with OpenSSL when its turn comes.
 *   - One TPM operation in flight at a time (a chip works on one command; ESYS keeps one
 *     command state per context); the others wait in a queue owned by the hubkey, by priority
 *     (HUBKEY_PRIO_COMMAND: command signatures, which a bulb and its user wait for now; then
 *     HUBKEY_PRIO_HIGH: the other requests someone waits for, the command poll and results,
 *     the token endpoint's DPoP proofs, registration; then HUBKEY_PRIO_LOW: status uploads and
 *     their DPoP proofs), first come first served within one priority. A command never waits
 *     behind more than the one operation in flight (issue 13: with a 70 ms TPM, a command
 *     queued behind the command poll's re-armed request waited for three).
 *   - The caller owns the struct hubkey_op it gets. done() runs exactly once, from the loop,
 *     never from inside hubkey_sign_async(), unless the op is freed first: hubkey_op_free()
 *     cancels it, and done() never runs after it (a signature already in the TPM completes
 *     and is thrown away). done() may free the op. hubkey_free() cancels every op it still
 *     has (done() is not called); their owners still free them.
 *   - The synchronous calls (hubkey_sign(), hubkey_seal(), hubkey_unseal()) stay for
 *     iothubctl, tests and start-up. Called while a signature is in flight they first wait for
 *     it (blocking); its done() is then deferred to the loop as usual. */
enum hubkey_prio {
        HUBKEY_PRIO_COMMAND = 0, /* command signatures (PROTOCOL.md 2) */
        HUBKEY_PRIO_HIGH = 1,    /* requests someone waits for: the command poll and results, DPoP proofs
                                  * of the token endpoint, registration */
        HUBKEY_PRIO_LOW = 2,     /* status uploads, their DPoP proofs */
        _HUBKEY_PRIO_MAX,
};
#define HUBKEY_QUEUE_MAX 256 /* ops waiting at most (the daemon's own callers; -EBUSY beyond) */

struct hubkey_op;
/* r: 0 and sig set (64 bytes r||s, inside the op: valid until the op is freed), or a negative
 * errno (sig NULL). */
typedef void (*hubkey_sign_done_t)(void *userdata, int r, const uint8_t *sig);

/* Binds the key to the loop that will run its asynchronous operations; again with the same
 * loop is a no-op, another loop -EBUSY. */
int hubkey_attach_event(struct hubkey *k, sd_event *e);
/* Queues the signature of SHA-256(msg) (as hubkey_sign()). Needs hubkey_attach_event().
 * Returns 0 and the op in *ret, or a negative errno (done() is then never called). */
int hubkey_sign_async(struct hubkey *k, enum hubkey_prio prio, const void *msg, size_t len,
                      hubkey_sign_done_t done, void *userdata, struct hubkey_op **ret);
/* Cancels (if not done yet) and frees; NULL accepted. Returns NULL. */
struct hubkey_op *hubkey_op_free(struct hubkey_op *op);
/* Whether op still waits in the queue: nothing of it has gone to the TPM, so hubkey_op_free() now
 * costs the TPM nothing. False once it started (in flight, or answered and done() not called
 * yet: the TPM's work is done), and after hubkey_free(). NULL: false. */
bool hubkey_op_is_queued(const struct hubkey_op *op);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct hubkey_op *, hubkey_op_free);
/* Ops queued or in flight (for the status output and tests). */
unsigned hubkey_ops_pending(const struct hubkey *k);

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

/* tpm backend: the ESYS context and the ESYS_TR of the persistent key, borrowed until the caller
 * returns to the loop (a TPM that restarted is connected to again on the next signature, with a
 * new context), for attest.c, whose TPM commands must share the one connection (swtpm takes a
 * single client). A signature in flight is collected first. -EOPNOTSUPP for a file key. */
struct ESYS_CONTEXT;
int hubkey_tpm_context(struct hubkey *k, struct ESYS_CONTEXT **ret_esys, uint32_t *ret_key);
/* The TSS2_RC translation of this file (one per library, STYLE.md) for attest.c: a negative errno,
 * and when ret_error is not NULL "TPM: <decoded> (0x..) while <what>". */
int hubkey_tpm_error(uint32_t rc, char **ret_error, const char *what);
/* Whether 'handle' (a persistent object or an NV index) is in use on esys, asked with
 * TPM2_GetCapability: 1, 0, or a negative errno with a one-line reason in *ret_error. */
int hubkey_tpm_handle_exists(struct ESYS_CONTEXT *esys, uint32_t handle, char **ret_error);

void hubkey_free(struct hubkey *k);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct hubkey *, hubkey_free);
