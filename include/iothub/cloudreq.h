/* SPDX-License-Identifier: MIT */
/* Authorized, signed requests to the vendor's cloud (PROTOCOL.md 3 and 5): the part of the relay
 * that holds the token and talks HTTPS, shaped like iothub-uplink's REQUEST and REGISTER ops
 * (include/iothub/uplink-proto.h, issue 14 stage 2), so that it can move into iothub-uplink
 * as it is. A caller says WHAT goes up (a kind, its argument and body); this module builds the
 * method and URL (uplink_request_target()), authorizes (oauth.c, or the fixed token of
 * [cloud] bearer_token_file), has the signer make the RFC 9421 signature and the DPoP proof,
 * sends (http.c), handles a 401 itself (a new DPoP nonce or a newer token: once more at once;
 * a refresh: once more after it; PROTOCOL.md 3) and answers with the final response. It parses
 * no body of the protocol's answers except the attestation challenge's status (registration);
 * its callers parse the rest.
 *
 * Ownership (STYLE.md, asynchronous work): a call is the caller's handle from the start until
 * done() runs; cloudreq_cancel() ends it without done(). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"

#define CLOUDREQ_TOKEN_MAX 8192         /* [cloud] bearer_token_file's token, at most */
#define CLOUDREQ_REFUSAL_REASON_MAX 128 /* uplink_refusal_reason()'s line, NUL included */

struct cloudreq;
struct cloudreq_call;
struct http;
struct oauth;
struct signer;

struct cloudreq_events {
        /* The hub key is needed now (a registration): ask for it if it can be, never waiting
         * (issue 13). Returns 0 when it is known (announced through cloudreq_key_ready()
         * already), -EINPROGRESS when it was asked for (cloudreq_key_ready() or
         * cloudreq_key_failed() follows), or another negative errno. NULL: -ENOKEY. */
        int (*need_key)(void *userdata);
        void *userdata;
};

/* The final answer to a request (after any 401 handled here). */
struct cloudreq_answer {
        int error;              /* 0, or a negative errno: no HTTP answer (a transport failure,
                                 * the signer could not sign, -EACCES the token could not be
                                 * refreshed after a 401, -ECANCELED a chained call not sent
                                 * since the one before it failed) */
        const char *error_text; /* one line for error, never a secret; "" when error == 0 */
        long status;            /* the HTTP status when error == 0 */
        const char *body;       /* raw, never NULL; body_len bytes */
        size_t body_len;
        const char *retry_after; /* the Retry-After header's value, "" when absent */
};
typedef void (*cloudreq_done_t)(void *userdata, const struct cloudreq_answer *a);

/* Sets it up when [cloud] url is set (otherwise *ret = NULL and 0). e, conf, http and oauth
 * (NULL without [oauth]: the fixed token of [cloud] bearer_token_file, read here and again at
 * each 401) are the caller's and must outlive it; ev is copied. */
int cloudreq_new(sd_event *e, const struct iothub_conf *conf, struct http *http, struct oauth *oauth,
                 const struct cloudreq_events *ev, struct cloudreq **ret);
/* Ends every call without done() (a registration's waiter is the caller's to tell). */
void cloudreq_free(struct cloudreq *cr);

/* The hub key is known (s is the caller's, valid until cloudreq_free()), or could not be had
 * (error, why: one line, no secret, may be NULL): registrations that waited for it go on, or end
 * with "no hub key: <why>". NULL cr is a no-op. */
void cloudreq_key_ready(struct cloudreq *cr, struct signer *s);
void cloudreq_key_failed(struct cloudreq *cr, int error, const char *why);

/* Whether requests can be authorized and signed now: a hub key and a token. */
bool cloudreq_have_key(const struct cloudreq *cr);
bool cloudreq_have_token(const struct cloudreq *cr);
/* With [oauth]: nobody is signed in (iothubctl login is the way). */
bool cloudreq_login_required(const struct cloudreq *cr);
/* The last problem with the token, the key or a registration, one line, "" when none; *ret_at
 * (may be NULL) the CLOCK_MONOTONIC usec it was set, so that the relay's status shows whichever
 * of its own and this one is newer. A 2xx answer clears it. */
const char *cloudreq_last_error(const struct cloudreq *cr, uint64_t *ret_at);
/* The signer's last error for the key, or NULL. */
const char *cloudreq_key_error(const struct cloudreq *cr);

/* Request kind (enum uplink_kind) with arg (NULL when the kind takes none) and body
 * (malloc'ed, taken in every case; NULL for none), body_len bytes. timeout_s 0 means [cloud]
 * timeout_s: it bounds all the call's attempts together (a 401's second attempt gets what is
 * left, or the call ends -ETIMEDOUT), counted from its first attempt's start. Status batches are signed at low priority, the rest first (someone waits for
 * those). done() gets the final answer, exactly once, from the loop, unless the call is
 * cancelled first. -EINVAL for a kind or arg uplink_request_target() refuses, -ENOKEY without
 * a key or a token (the caller asks cloudreq_have_key/token first), -ENOMEM, or the signer's
 * error when the request could not even be asked for. */
/*
 * after (NULL: none): an unfinished call this one is chained behind (the top of cloudreq.c): it is
 * signed at once but sent only once after ended with HTTP 200; if after ends in any other way
 * (cancelled included), done() gets -ECANCELED ("not sent: an earlier batch failed") and nothing
 * was sent. A call has at most one call chained behind it (-EINVAL otherwise). */
int cloudreq_request(struct cloudreq *cr, unsigned kind, const char *arg, char *body, size_t body_len,
                     long timeout_s, struct cloudreq_call *after, cloudreq_done_t done, void *userdata,
                     struct cloudreq_call **ret);

/* POST /v1/hubs/<id> with the hub's JWK, and with a TPM key the attestation challenge first
 * ([cloud] attestation, iothub-protocol(7) "Attestation": the signer's TPM commands, asked
 * asynchronously). One at a time (-EBUSY while another one runs); -ENOKEY without a token or a
 * key. done() gets the HTTP status (or a negative errno) and a one-line message, never a
 * secret, exactly once unless cancelled first. The handle stays the same through the
 * challenge and a retry after a 401. */
int cloudreq_register(struct cloudreq *cr, void (*done)(void *userdata, long status, const char *message),
                      void *userdata, struct cloudreq_call **ret);

/* Ends a call early: done() never runs. NULL accepted. */
void cloudreq_cancel(struct cloudreq_call *call);
