/* SPDX-License-Identifier: MIT */
/* The user's sign-in (PROTOCOL.md 4): discovery, the Device Authorization Grant (RFC 8628)
 * run by the daemon on behalf of iothubctl, tokens kept sealed by the TPM (tokenstore),
 * refreshed ahead of expiry with rotation, revoked on logout (RFC 7009), and DPoP (RFC 9449)
 * proofs signed by the hub key. The daemon runs the flow, so that the TPM, the tokens and
 * the state directory stay with it; the password never touches the hub. */
#pragma once

#include <stdbool.h>

#include <jansson.h>

#include "iothub/hub.h"

#define OAUTH_REFRESH_MARGIN_S 60 /* refresh this long before expiry at least */

enum oauth_state {
        OAUTH_NOT_CONFIGURED,
        OAUTH_LOGIN_REQUIRED,
        OAUTH_OK,
        OAUTH_REFRESHING,
};
const char *oauth_state_to_string(enum oauth_state s);

struct oauth;

/* Sets up sign-in when [oauth] issuer is set (else *ret = NULL, 0). Loads stored tokens. */
int oauth_new(struct hub *h, struct oauth **ret);
void oauth_free(struct oauth *o);

enum oauth_state oauth_get_state(const struct oauth *o);

/* Authorization for one resource request: ret_authorization gets the header value
 * ("Bearer <t>" or "DPoP <t>"), ret_dpop the value of a DPoP proof header for method and url
 * (NULL without DPoP). Both malloc'ed secrets: wipe them. -ENOKEY without a usable token. */
int oauth_authorize(struct oauth *o, const char *method, const char *url, char **ret_authorization,
                    char **ret_dpop);

/* A resource server answered 401: refresh the access token (at most one refresh at a time;
 * callers waiting together are all called back). dpop_nonce: the server's DPoP-Nonce, or
 * NULL. done(userdata, r): r = 0 with a fresh token, negative errno otherwise. */
int oauth_refresh(struct oauth *o, const char *resource_dpop_nonce, void (*done)(void *userdata, int r),
                  void *userdata);

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

/* Builds a DPoP proof JWT (RFC 9449 4.2) signed by the hub key: header typ dpop+jwt, alg
 * ES256, jwk; claims jti, htm, htu, iat, and ath and nonce when given. Exposed for tests. */
int oauth_dpop_proof(struct hubkey *k, const char *method, const char *url, const char *access_token,
                     const char *nonce, int64_t now, char **ret);
