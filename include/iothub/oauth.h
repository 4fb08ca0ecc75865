/* SPDX-License-Identifier: MIT */
/* The user's sign-in (PROTOCOL.md 4): discovery, the Device Authorization Grant (RFC 8628)
 * run by the daemon on behalf of iothubctl, tokens kept sealed by the TPM (tokenstore),
 * refreshed ahead of expiry with rotation, revoked on logout (RFC 7009), and DPoP (RFC 9449)
 * proofs signed by the hub key. The daemon runs the flow, so that the TPM, the tokens and
 * the state directory stay with it; the password never touches the hub. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"

#define OAUTH_REFRESH_MARGIN_S 60 /* refresh this long before expiry at least */
/* Retries of discovery and refreshes: backoff_ms() (util.h) between these. */
#define OAUTH_BACKOFF_MIN_MS 1000u
#define OAUTH_BACKOFF_MAX_MS 300000u

enum oauth_state {
        OAUTH_NOT_CONFIGURED,
        OAUTH_LOGIN_REQUIRED,
        OAUTH_OK,
        OAUTH_REFRESHING,
};
const char *oauth_state_to_string(enum oauth_state s);

struct http;
struct hubkey;
struct oauth;

/* News from sign-in, installed by hub.c (the one place that knows who listens). Either may be
 * NULL. */
struct oauth_events {
        /* A new access token (signed in, or refreshed): requests that waited for one may go. */
        void (*token_ready)(void *userdata);
        /* The state or its error changed (sign-in required, signed in, refused, accepted again). */
        void (*status_changed)(void *userdata);
        /* Signed in, signed out or sign-in required (reason: "signed_in", "signed_out",
         * "login_required"), for the security events. May be NULL. */
        void (*signin_changed)(void *userdata, const char *reason);
        void *userdata;
};

/* Sets up sign-in when [oauth] issuer is set (else *ret = NULL, 0) and starts discovery. e,
 * conf and http are the caller's and must outlive it; ev is copied. The sealed tokens are read
 * once the hub key is announced (oauth_key_ready). Returns 0 or a negative errno. */
int oauth_new(sd_event *e, const struct iothub_conf *conf, struct http *http, const struct oauth_events *ev,
              struct oauth **ret);
void oauth_free(struct oauth *o);
/* hub.c learnt the hub key from the signer s (the caller's, valid until oauth_free()): DPoP
 * proofs and the sealed tokens go through it (iothub-signer(8)); asks it for the stored tokens
 * if none are in memory yet (also when the key comes up long after the start), and says
 * token_ready once they are there. NULL o is a no-op. */
struct signer;
void oauth_key_ready(struct oauth *o, struct signer *s);

enum oauth_state oauth_get_state(const struct oauth *o);
/* The last error as one printable line, never a secret. */
const char *oauth_last_error(const struct oauth *o);

/* Authorization for one resource request: ret_authorization gets the header value
 * ("Bearer <t>" or "DPoP <t>"); for a DPoP-bound token ret_dpop_ath gets the proof's ath (RFC
 * 9449 4.2) and ret_dpop_nonce the resource server's last DPoP-Nonce (or NULL), else both NULL:
 * the caller asks the signer for the proof. All malloc'ed; the first is a secret: wipe it.
 * -ENOKEY without a usable token. */
int oauth_authorize(struct oauth *o, char **ret_authorization, char **ret_dpop_ath, char **ret_dpop_nonce);

/* The generation of the current access token (bumped by every new one): a request records it
 * when it is authorized, so that a 401 to an older token is told apart. */
uint64_t oauth_token_gen(const struct oauth *o);

/* The generation of the resource server's DPoP nonce that oauth_authorize() hands out (bumped
 * by every new one): a proof made with an older one would be answered 401 use_dpop_nonce, so a
 * request signed before it changed is signed again first (cloudreq.c's chained uploads). */
uint64_t oauth_dpop_nonce_gen(const struct oauth *o);
/* A resource server's answer other than a 401 handed to oauth_unauthorized() carried dpop_nonce
 * (its DPoP-Nonce header, NULL or "" when absent): with a DPoP-bound token, a new valid one
 * (dpop_nonce_is_valid()) is kept for the next proofs (RFC 9449 8.2, 9: a server may give its
 * next nonce in any answer). NULL o is a no-op. */
void oauth_resource_nonce(struct oauth *o, const char *dpop_nonce);

/* A resource server answered 401 to a request authorized with token generation gen and, for a
 * DPoP-bound token, resource-server nonce generation nonce_gen; all 401 handling is here.
 * www_authenticate and dpop_nonce: the answer's headers (NULL or "" when absent). Returns 1
 * when the request may go again at once (a new resource-server DPoP-Nonce, RFC 9449 9, or one
 * newer than the request's proof carried, or a newer token); 0 when a refresh started (or was running) and done(userdata,
 * r) follows, r = 0 with a fresh token; a negative errno when the request must back off: the
 * proof was refused (RFC 9449 7.1 invalid_dpop_proof), or this token already came from a
 * refresh for a 401 (at most one refresh per token for 401s), reported once (status, STATUS=,
 * a log line with IOTHUB_MID_CLOUD_UNAUTHORIZED). */
int oauth_unauthorized(struct oauth *o, uint64_t gen, uint64_t nonce_gen, const char *www_authenticate,
                       const char *dpop_nonce, void (*done)(void *userdata, int r), void *userdata);
/* The owner of userdata goes away: every done(userdata, ...) still waiting for a refresh is
 * dropped and never runs (the refresh itself goes on). NULL o is a no-op. */
void oauth_unauthorized_cancel(struct oauth *o, void *userdata);
/* A resource request succeeded: ends a reported refusal. */
void oauth_resource_ok(struct oauth *o);

/* Starts the device flow. started() gets the verification URI(s) and user code to show (or an
 * error); finished() the outcome once the user approved, denied, or the code expired. Only
 * one flow at a time: a second start cancels the first. */
struct oauth_login_cb {
        void (*started)(void *userdata, int r, const char *message, json_t *info);
        void (*finished)(void *userdata, int r, const char *message);
        void *userdata;
};
int oauth_login(struct oauth *o, const struct oauth_login_cb *cb);
/* Forgets a login callback whose receiver went away. */
void oauth_login_detach(struct oauth *o, void *userdata);

/* Revokes the refresh token where the server can (RFC 7009), then erases the stored tokens.
 * done(userdata, r, message) runs exactly once unless the handle is cancelled first. When
 * the answer is known at once, done() runs before this returns and *ret is NULL; otherwise
 * *ret is a handle owned by the caller until done() runs: oauth_logout_cancel() forgets the
 * caller (the revocation itself runs on) and done() is never called. -EBUSY while a sign-out
 * is under way. */
struct oauth_logout_op;
int oauth_logout(struct oauth *o, void (*done)(void *userdata, int r, const char *message), void *userdata,
                 struct oauth_logout_op **ret);
void oauth_logout_cancel(struct oauth_logout_op *op);

/* Adds "oauth" to the status object. */
int oauth_status_json(struct oauth *o, json_t *st);

