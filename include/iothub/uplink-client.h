/* SPDX-License-Identifier: MIT */
/* iothubd's client of iothub-uplink (issue 14 stage 2, iothub-uplink(8)): the cloud side holds
 * HTTPS, the sign-in and the tokens; iothubd says WHAT goes up (a kind, its argument and body,
 * uplink-proto.h) and parses the cloud's answers itself. The requests of uplink-proto.h over the
 * channel client of chan-client.c: one connection on the loop, made lazily and again after the
 * uplink restarts, with what was out sent again (every op of the channel is safe to repeat; the
 * cloud deduplicates status frames by (dev, seq), PROTOCOL.md 3).
 *
 * The client keeps one WATCH out whenever it exists (from uplink_client_new() on): the uplink's
 * news (token ready, sign-in changed, key changed, registered) reach the events' table. It asks
 * the uplink's STATUS at every connection and after every piece of news, and keeps the answer for
 * uplink_have_key(), uplink_have_token(), uplink_login_required() and the status merge.
 *
 * Ownership (STYLE.md, asynchronous work): a call is the caller's handle from the start until
 * its done() runs; uplink_call_cancel() ends it without done(). done() runs from the loop, never
 * from inside the call that started it. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <systemd/sd-event.h>

#include "iothub/conf.h"

#define UPLINK_CLIENT_QUEUE_MAX 256
#define UPLINK_CLIENT_INFLIGHT_MAX 64 /* the uplink's limit per connection (uplink-proto.h) */
#define UPLINK_CLIENT_RECONNECT_MIN_MS 100u
#define UPLINK_CLIENT_RECONNECT_MAX_MS 5000u
/* A request waits for its answer its own timeout (the uplink's transfer limit) and this much
 * more: the uplink answers a transfer that timed out itself; this covers an uplink that does
 * not answer at all (stopped, wedged). */
#define UPLINK_CLIENT_MARGIN_S 15
#define UPLINK_CLIENT_OP_TIMEOUT_S 120 /* REGISTER (attestation: several TPM commands), LOGIN_START, LOGOUT */
#define UPLINK_CLIENT_STATUS_TIMEOUT_S 10

struct uplink_client;
struct uplink_call;

/* The final answer to a REQUEST (the uplink handled any 401 it could). */
struct uplink_answer {
        int error;              /* 0, or a negative errno: no HTTP answer (-ETIMEDOUT,
                                 * -ECONNREFUSED, -ENOKEY no hub key, -EACCES no token or sign-in
                                 * required, ..., from the uplink or from this client) */
        const char *error_text; /* one line for error, never a secret; "" when error == 0 */
        long status;            /* the HTTP status when error == 0 */
        const char *body;       /* raw, never NULL; body_len bytes */
        size_t body_len;
        const char *retry_after; /* the Retry-After value, delay-seconds (the uplink converts an
                                  * HTTP-date), "" when absent */
};
typedef void (*uplink_done_t)(void *userdata, const struct uplink_answer *a);

struct uplink_client_events {
        /* A piece of the uplink's news (WATCH): type "token_ready", "signin_changed" (reason:
         * "signed_in", "signed_out", "login_required", ...; NULL otherwise), "key_ready",
         * "key_changed", "registered", "lost" (news were missed). May be NULL. */
        void (*event)(void *userdata, const char *type, const char *reason);
        /* Connected, lost, or its STATUS changed (uplink_have_*()). May be NULL. */
        void (*status_changed)(void *userdata);
        void *userdata;
};

/* Sets it up when [cloud] url is set (otherwise *ret = NULL and 0); connects at once (the WATCH).
 * e and conf are the caller's and must outlive it; ev is copied. */
int uplink_client_new(sd_event *e, const struct iothub_conf *conf, const struct uplink_client_events *ev,
                      struct uplink_client **ret);
/* Ends every call without done(). NULL accepted. Returns NULL. */
struct uplink_client *uplink_client_free(struct uplink_client *u);

/* REQUEST: kind (enum uplink_kind) with arg (NULL when the kind takes none) and body (malloc'ed,
 * taken in every case; NULL for none), body_len bytes. timeout_s 0 means [cloud] timeout_s.
 * -EINVAL for what the channel refuses (uplink-proto.h), -EBUSY with a full queue, -ENOMEM. */
int uplink_request(struct uplink_client *u, unsigned kind, const char *arg, char *body, size_t body_len,
                   long timeout_s, uplink_done_t done, void *userdata, struct uplink_call **ret);
/* REGISTER: done() gets the HTTP status and the uplink's one-line message; -EPROTO and the
 * uplink's message when it failed before a final answer (the attestation); or another negative
 * errno and a line of ours. */
int uplink_register(struct uplink_client *u, void (*done)(void *userdata, long status, const char *message),
                    void *userdata, struct uplink_call **ret);
/* LOGIN_START: done() gets 0 and {user_code, verification_uri, verification_uri_complete?,
 * expires_in} (borrowed, valid during the call), or a negative errno and NULL. */
int uplink_login_start(struct uplink_client *u, void (*done)(void *userdata, int r, json_t *info), void *userdata,
                       struct uplink_call **ret);
/* LOGIN_WAIT: done() gets 0 and how the sign-in ended, or a negative errno and NULL (-ENOENT no
 * sign-in under way, -EBUSY another waiter, -ECANCELED another sign-in started, ...). No timeout. */
int uplink_login_wait(struct uplink_client *u, void (*done)(void *userdata, int r, const char *message),
                      void *userdata, struct uplink_call **ret);
/* LOGOUT: done() gets 0 or a negative errno. */
int uplink_logout(struct uplink_client *u, void (*done)(void *userdata, int r), void *userdata,
                  struct uplink_call **ret);
/* Ends a call early: done() never runs. NULL accepted. */
void uplink_call_cancel(struct uplink_call *call);
/* The call's wait for its answer (its timeout and UPLINK_CLIENT_MARGIN_S) counts afresh from now:
 * for a STATUS REQUEST chained behind another (iothub-uplink(8), REQUEST), whose time on the
 * wire starts only when the one before it was answered 200, which is when its caller learns it.
 * Never shortens the wait. NULL accepted. */
void uplink_call_restart_timeout(struct uplink_call *call);

/* From the uplink's last STATUS: a hub key and a token (requests can be authorized), and
 * whether sign-in is required ([oauth] configured, nobody signed in). False before any STATUS. */
bool uplink_have_key(const struct uplink_client *u);
bool uplink_have_token(const struct uplink_client *u);
bool uplink_login_required(const struct uplink_client *u);
bool uplink_is_connected(const struct uplink_client *u);
/* The uplink's last error (its status' uplink.last_error, or why it cannot be reached), one line,
 * "" when none; *ret_at (may be NULL) the CLOCK_MONOTONIC usec it was learnt. */
const char *uplink_last_error(const struct uplink_client *u, uint64_t *ret_at);
/* The uplink's words for why it cannot sign with the hub key (its signer connection's last
 * error, the signer's decoded TPM error), NULL when none. */
const char *uplink_key_error(const struct uplink_client *u);
/* The hub key signatures the uplink got from the signer since it started (request signatures,
 * DPoP proofs; its last STATUS), 0 before any STATUS. */
uint64_t uplink_signatures(const struct uplink_client *u);
/* Asks the uplink's STATUS for a status answer that must be fresh (iothubctl status): done()
 * runs when it is kept, or after timeout_ms or a failure (the last one stays); the call ends
 * with it. -ENOTCONN while the uplink is not connected (the
 * last one is what there is), -EBUSY, -ENOMEM. */
int uplink_status_fresh(struct uplink_client *u, uint64_t timeout_ms, void (*done)(void *userdata),
                        void *userdata, struct uplink_call **ret);
/* Asks the uplink's STATUS again (at most one out). */
void uplink_refresh_status(struct uplink_client *u);
/* Adds to o the uplink's part of `iothubctl status --json`: "oauth" (the uplink's sign-in
 * state; {"configured": false} without [oauth]) and "uplink" (this connection, and what the
 * uplink says of itself: its counters, its signer connection, its key). NULL u: nothing. */
int uplink_status_json(const struct uplink_client *u, json_t *o);
