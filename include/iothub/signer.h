/* SPDX-License-Identifier: MIT */
/* The daemon's side of iothub-signer (iothub-signer(8), issue 14): the hub key and the sealed
 * tokens live in a separate process, reached over a unix stream socket ([signer] socket) with the
 * fixed-format messages of signer-proto.h. iothubd never opens the TPM or the token files.
 *
 * The rules, the same as hubkey_sign_async() had (ARCHITECTURE.md, "one owner, cancel by
 * freeing"):
 *   - Every call queues a request and hands its caller a struct signer_op. done() runs exactly
 *     once, from the loop, never from inside the call that queued it, unless signer_op_free()
 *     cancelled it first; after signer_op_free() it never runs. done() may free its op (it
 *     should: the reply's strings live in it until then).
 *   - The connection is made lazily (the daemon's READY=1 never waits for it) and made again,
 *     with backoff, when the signer goes away (killed, restarted by systemd); the requests that
 *     were out are sent again on the new connection (every op is safe to repeat: the signer
 *     builds a fresh signature each time). An -EBUSY answer (the signer's rate limit) is retried
 *     after a short backoff. Neither is seen by the caller.
 *   - A request waits at most SIGNER_OP_TIMEOUT_USEC (queued, retried or out); then done() gets
 *     -ETIMEDOUT. At most SIGNER_QUEUE_MAX requests wait: beyond that the call fails with
 *     -EBUSY (done() is not called).
 *   - A request that is out when it ends so (its timeout, signer_op_free()) is cancelled at the
 *     signer too (CANCEL, chan-client.h): a signature still queued there for the TPM is never
 *     made, and the signer's answer, which still comes, is dropped.
 *   - Command signatures are sent first, then high-priority requests (someone waits: the command
 *     poll and results, the token endpoint's DPoP proofs, registration), then low ones (status
 *     uploads and their DPoP proofs); at most SIGNER_INFLIGHT_MAX are out at once, the rest wait
 *     in the client, so that the priority still means something while the TPM is slow. The
 *     signer keeps the same order across its connections (hubkey.h).
 *   - signer_free() cancels everything (no done() runs) and closes the connection. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/util.h"

#define SIGNER_QUEUE_MAX 256
#define SIGNER_INFLIGHT_MAX 32
#define SIGNER_OP_TIMEOUT_USEC (60 * UINT64_C(1000000))
#define SIGNER_RECONNECT_MIN_MS 100u
#define SIGNER_RECONNECT_MAX_MS 5000u
#define SIGNER_BUSY_MIN_MS 50u
#define SIGNER_BUSY_MAX_MS 2000u
#define SIGNER_KEY_ID_LEN 43

struct signer;
struct signer_op;

enum signer_prio {
        SIGNER_PRIO_HIGH = 0, /* someone waits: the command poll and results, the token endpoint, registration */
        SIGNER_PRIO_LOW = 1,  /* status uploads and their DPoP proofs */
        _SIGNER_PRIO_MAX,
};

/* What an answer carried, NUL-terminated copies valid until the op is freed; members an op does
 * not answer stay NULL / 0. */
struct signer_reply {
        /* KEY_INFO */
        const char *key_id; /* 43 characters, base64url */
        const char *jwk;    /* the public JWK, JSON text */
        const char *backend; /* "tpm" | "file" */
        /* SIGN_HTTP: whole header lines ("Signature: hub=:...:"), as the signer builds them */
        const char *content_digest; /* NULL without a body */
        const char *signature_input;
        const char *signature;
        /* SIGN_DPOP */
        const char *proof;
        /* SIGN_COMMAND */
        const char *jws;
        /* TOKENS_GET */
        const char *access_token, *refresh_token, *token_type, *scope;
        uint64_t expires_at;
        /* ATTEST_BEGIN / ATTEST_ANSWER */
        const char *evidence, *answer;
        /* STATUS */
        json_t *status; /* the counters as an object (borrowed) */
};

/* r: 0 and reply set, or a negative errno (reply NULL): the signer's answer (-EPERM out of
 * policy, -ENOENT no key / no tokens, -EHOSTDOWN the TPM unreachable, ...), -ETIMEDOUT, or a
 * local failure. */
typedef void (*signer_done_t)(void *userdata, int r, const struct signer_reply *reply);

struct signer_events {
        /* Connected or lost the signer, or its counters changed (STATUS=, status). May be NULL. */
        void (*status_changed)(void *userdata);
        /* A KEY_INFO answer named another key than the last one did (or the first one): the
         * signer was pointed at another TPM or key, or a key was made. May be NULL. */
        void (*key_changed)(void *userdata);
        void *userdata;
};

/* e and c are the caller's and must outlive it; ev is copied. Does not connect yet. */
int signer_new(sd_event *e, const struct iothub_conf *c, const struct signer_events *ev, struct signer **ret);
/* Cancels every op (no done()), closes the connection. NULL accepted. Returns NULL. */
struct signer *signer_free(struct signer *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct signer *, signer_free);

/* Cancels (if not done yet) and frees; NULL accepted. Returns NULL. */
struct signer_op *signer_op_free(struct signer_op *op);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct signer_op *, signer_op_free);

/* Each queues one request (iothub-signer(8) "OPERATIONS") and returns 0 with the op in *ret, or
 * a negative errno (-EINVAL for a field over its limit, -EBUSY with a full queue); then done()
 * is never called. Strings are copied. */
int signer_key_info(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret);
/* authorization: the full Authorization header value, required (PROTOCOL.md 3; NULL: -EINVAL);
 * body NULL for none. */
int signer_sign_http(struct signer *s, enum signer_prio prio, const char *method, const char *target_uri,
                     const char *authorization, const void *body, size_t body_len, signer_done_t done,
                     void *userdata, struct signer_op **ret);
/* ath (43 characters, RFC 9449 4.2) and nonce may be NULL. */
int signer_sign_dpop(struct signer *s, enum signer_prio prio, const char *method, const char *url, const char *ath,
                     const char *nonce, signer_done_t done, void *userdata, struct signer_op **ret);
/* set_json: the "set" object as JSON text; cloud_jws: the vendor's JWS or NULL. */
int signer_sign_command(struct signer *s, const char *dev, const char *cmd_id, uint64_t iat, uint64_t exp,
                        const char *set_json, const char *cloud_jws, signer_done_t done, void *userdata,
                        struct signer_op **ret);
int signer_tokens_get(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret);
/* refresh_token and scope may be NULL. */
int signer_tokens_put(struct signer *s, const char *access_token, const char *refresh_token,
                      const char *token_type, const char *scope, uint64_t expires_at, signer_done_t done,
                      void *userdata, struct signer_op **ret);
int signer_tokens_erase(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret);
/* The attestation state is the connection's (iothub-signer(8)), and the client has one connection:
 * both steps reach the same state as long as it stays up. A reconnect between the two answers
 * ATTEST_ANSWER with an error (the registration fails, the operator tries again); one
 * registration at a time (cloud.c) keeps two of them from overwriting each other's state. */
int signer_attest_begin(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret);
int signer_attest_answer(struct signer *s, const char *challenge, size_t len, signer_done_t done, void *userdata,
                         struct signer_op **ret);
int signer_status(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret);

/* The reply of a finished op (also inside done()), NULL before. No call here blocks: there is no
 * synchronous round trip to the signer (issue 13). */
const struct signer_reply *signer_op_reply(const struct signer_op *op);

/* The hub key of the last KEY_INFO answer: its id, its public JWK (a new
 * reference in *ret; -ENOKEY before any answer) and its backend ("tpm" | "file"), NULL before. */
const char *signer_key_id(const struct signer *s);
int signer_key_jwk(const struct signer *s, json_t **ret);
const char *signer_key_backend(const struct signer *s);

/* Signatures this daemon got (SIGN_HTTP, SIGN_DPOP, SIGN_COMMAND answered 0). */
uint64_t signer_signatures(const struct signer *s);
/* The last error of a signing request, one line, no secret ("signer: <text>"); NULL once one
 * succeeded. */
const char *signer_last_error(const struct signer *s);
/* Adds the "signer" object of iothubctl status: connected, socket, reconnects, pending, busy
 * retries, timeouts, cancelled (CANCELs sent), signatures, last_error, and the signer's own
 * counters (its STATUS answer, asked at each connection and by signer_refresh_status()). */
int signer_status_json(const struct signer *s, json_t *o);
/* Asks the signer for its counters (STATUS), kept for signer_status_json(). */
void signer_refresh_status(struct signer *s);
bool signer_is_connected(const struct signer *s);
