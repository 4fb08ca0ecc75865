/* SPDX-License-Identifier: MIT */
/* Authorized, signed requests to the vendor's cloud (include/iothub/cloudreq.h): moved out of
 * cloud.c (issue 14 stage 2), where they were struct cloud_req, so that iothub-uplink serves its
 * REQUEST and REGISTER ops with this module and iothubd keeps only what decides what goes up.
 *
 * One call is one logical request: its attempts (after a 401, and a registration's challenge)
 * reuse the call, so the caller's handle never changes. Each attempt is authorized afresh,
 * signed by the signer (RFC 9421 signature and, for a DPoP-bound token, the DPoP proof, both
 * asked at once, on the loop: nothing waits for the signer outside it, issue 13) and handed to
 * http.c.
 *
 * Chained status uploads: a status call made with a predecessor (cloudreq_request()'s after, the
 * same connection's unfinished status call, uplink.c) is authorized and signed at once, so that
 * the signer (~70 ms with a TPM chip) works while the predecessor is on the wire, but its HTTP
 * request starts only once the predecessor finished with HTTP 200; any other end of the
 * predecessor (an error, another status, cancelled) ends it unsent with -ECANCELED. So batches
 * reach the cloud in order with one on the wire at a time, whatever iothubd does meanwhile. A
 * held signature older than CLOUDREQ_HELD_MAX_USEC, or made with a token or a resource-server
 * DPoP nonce that changed since (a 401 and a refresh; a new nonce in the predecessor's answer,
 * RFC 9449 8.2 and 9), is made again before it goes (chained_stale(); checked too when the
 * predecessor got its 200 while the call was still being signed). Both ends are worked out on the loop (a
 * defer source), never inside the predecessor's end, so that a caller's done() never runs from
 * inside another call's done() or cancel. */
#include <inttypes.h>
#include <stdio.h>

#include <jansson.h>

#include "iothub/cloudreq.h"
#include "iothub/http.h"
#include "iothub/log.h"
#include "iothub/oauth.h"
#include "iothub/signer.h"
#include "iothub/uplink-proto.h"

/* A signature held for a chained call goes as it is when younger than this; else it is made
 * again: a third of the signature's validity (expires = created + 60 s, PROTOCOL.md 3; the
 * signer's httpsig.h, which this layer does not include), room for the cloud's clock skew and
 * the request's own time on the wire. */
#define CLOUDREQ_HELD_MAX_USEC (UINT64_C(20) * 1000 * 1000)
/* A second attempt (after a 401) goes only with at least this much of the call's time left:
 * below it, not even an answer already on its way would make it. */
#define CLOUDREQ_ATTEMPT_MIN_MS 100

enum chain_verdict {
        CHAIN_NONE,
        CHAIN_GO,   /* the predecessor ended with HTTP 200: the request goes */
        CHAIN_STOP, /* it ended otherwise: the call ends unsent */
};

struct cloudreq_call {
        struct cloudreq *cr;
        struct cloudreq_call *next; /* in cr->calls */
        /* The chain (see the top): pred is the unfinished predecessor the request waits for
         * (NULL: none, or it ended and verdict says how), succ the call waiting for this one.
         * Both are cleared by call_unlink(), the one place a call leaves. */
        struct cloudreq_call *pred, *succ;
        enum chain_verdict verdict;
        bool chained;       /* made with a predecessor (cloudreq_request()'s after) */
        bool held;          /* signed, and the request waits for pred */
        uint64_t signed_at; /* CLOCK_MONOTONIC usec when held */
        bool answered_200;  /* its final answer is HTTP 200 (its successor goes) */
        bool is_register;
        unsigned kind;        /* enum uplink_kind; 0 for a registration */
        char *arg;
        long timeout_s;
        /* CLOCK_MONOTONIC usec by which a request call ends (0: its first attempt has not gone
         * yet): its first attempt's start + its timeout; attempt_timeout_ms(). */
        uint64_t deadline;
        /* The request as it goes, kept for a second attempt after a 401. */
        const char *method; /* a literal */
        char *url, *body;
        size_t body_len;
        /* The attempt under way. */
        struct http_req *http;
        struct signer_op *sign_op, *dpop_op;
        bool signed_ok, dpop_ok;
        char *auth_header, *dpop_header;
        uint64_t token_gen;   /* oauth_token_gen() when it was authorized */
        uint64_t nonce_gen;   /* oauth_dpop_nonce_gen() then: the nonce its DPoP proof carries */
        bool retried_401;     /* one more attempt after a 401, no more */
        bool refreshing;      /* waits for oauth's refresh (on_refreshed) */
        /* A registration before its request is made: it waits for the hub key (wait_key), or for
         * the signer's ATTEST_BEGIN or ATTEST_ANSWER (attest_op). attest: the attempt is the
         * challenge request (iothub-protocol(7) "Attestation"). */
        bool wait_key, attest;
        struct signer_op *attest_op;
        cloudreq_done_t done;
        void (*register_done)(void *userdata, long status, const char *message);
        void *userdata;
};

struct cloudreq {
        sd_event *event;
        const struct iothub_conf *conf;
        struct http *http;
        struct oauth *oauth;   /* NULL without [oauth]: the fixed token of bearer_token_file */
        struct signer *signer; /* NULL until the hub key is announced (cloudreq_key_ready) */
        struct cloudreq_events ev;
        char *base_url; /* without a trailing '/' */
        char *token;    /* [cloud] bearer_token_file's */
        struct cloudreq_call *calls;
        sd_event_source *chain_defer; /* chained calls whose predecessor ended (chain_run) */
        uint64_t file_token_gen;      /* bumped when bearer_token_file's token changes */
        char last_error[256];
        uint64_t last_error_at;
};

static void set_last_error(struct cloudreq *cr, const char *fmt, ...) _printf_(2, 3);
static void set_last_error(struct cloudreq *cr, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(cr->last_error, sizeof cr->last_error, fmt, ap);
        va_end(ap);
        cr->last_error_at = now_monotonic_usec();
}

const char *cloudreq_last_error(const struct cloudreq *cr, uint64_t *ret_at) {
        if (ret_at)
                *ret_at = cr ? cr->last_error_at : 0;
        return cr ? cr->last_error : "";
}

const char *cloudreq_key_error(const struct cloudreq *cr) {
        return cr && cr->signer ? signer_last_error(cr->signer) : NULL;
}

/* ---- the token ---- */

static bool token_is_valid(const char *t) {
        size_t n = strlen(t);

        return n <= CLOUDREQ_TOKEN_MAX && b64token_is_valid(t, n);
}

/* (Re)reads the access token of [cloud] bearer_token_file (without [oauth]). */
static int load_token(struct cloudreq *cr) {
        const char *path = cr->conf->cloud.bearer_token_file;
        _cleanup_erase_str_ char *t = NULL;
        size_t len = 0;
        int r;

        if (!path) {
                /* Sign-in is the user's way; bearer_token_file is a development aid, not a hint. */
                if (cr->conf->oauth.issuer)
                        set_last_error(cr, "not signed in: [oauth] client_id is not set");
                else
                        set_last_error(cr, "not signed in: configure [oauth] (see iothub.conf(5)), then run "
                                           "'iothubctl login'");
                return -ENOKEY;
        }
        {
                /* Re-read on every 401: a FIFO here would stall the loop, a symlink or a
                 * file others can write would hand them the hub's uploads (util.h). */
                _cleanup_free_ char *why = NULL;
                r = read_trusted_file(path, TRUSTED_SECRET, CLOUDREQ_TOKEN_MAX + 2, &t, &len, &why);
                if (r < 0) {
                        set_last_error(cr, "cannot use [cloud] bearer_token_file: %s", why ? why : strerror(-r));
                        return r;
                }
        }
        while (len > 0 && (t[len - 1] == '\n' || t[len - 1] == '\r' || t[len - 1] == ' '))
                t[--len] = '\0';
        if (!token_is_valid(t)) {
                set_last_error(cr, "[cloud] bearer_token_file %s does not hold a valid token", path);
                return -EINVAL;
        }
        if (!streq_ptr(cr->token, t))
                cr->file_token_gen++;
        erase_and_freep_str(&cr->token);
        cr->token = TAKE_PTR(t);
        return 0;
}

static bool uses_oauth(const struct cloudreq *cr) {
        return cr->conf->oauth.issuer && cr->conf->oauth.client_id;
}

/* With [oauth], the signed-in user's token (and a DPoP proof when it is bound); else the
 * fixed token of [cloud] bearer_token_file. */
bool cloudreq_have_token(const struct cloudreq *cr) {
        if (!cr)
                return false;
        if (cr->oauth)
                return oauth_get_state(cr->oauth) == OAUTH_OK || oauth_get_state(cr->oauth) == OAUTH_REFRESHING;
        return cr->token != NULL;
}

bool cloudreq_login_required(const struct cloudreq *cr) {
        return cr && cr->oauth && oauth_get_state(cr->oauth) == OAUTH_LOGIN_REQUIRED;
}

bool cloudreq_have_key(const struct cloudreq *cr) {
        return cr && cr->signer;
}

/* The Authorization value, and for a DPoP-bound token what its proof needs (ath, the resource
 * server's nonce; ret_dpop_ath NULL for a Bearer token). */
static int authorization(struct cloudreq *cr, char **ret_auth, char **ret_dpop_ath, char **ret_dpop_nonce) {
        if (cr->oauth)
                return oauth_authorize(cr->oauth, ret_auth, ret_dpop_ath, ret_dpop_nonce);
        if (!cr->token)
                return -ENOKEY;
        *ret_dpop_ath = *ret_dpop_nonce = NULL;
        *ret_auth = strdup_printf("Bearer %s", cr->token);
        return *ret_auth ? 0 : -ENOMEM;
}

/* The generation of the token requests are authorized with now. */
static uint64_t token_gen(const struct cloudreq *cr) {
        return cr->oauth ? oauth_token_gen(cr->oauth) : cr->file_token_gen;
}

/* The generation of the resource server's DPoP nonce the proofs carry now (RFC 9449 9). */
static uint64_t nonce_gen(const struct cloudreq *cr) {
        return cr->oauth ? oauth_dpop_nonce_gen(cr->oauth) : 0;
}

/* Why a chained call signed before its predecessor's 200 must be signed again before it goes,
 * or NULL: the token changed (a 401 and a refresh: the signature covers Authorization), the
 * resource server gave a new DPoP nonce (in the predecessor's answer, typically: the proof with
 * the old one would cost a 401 use_dpop_nonce and a second attempt), or, when it was held,
 * the signature is older than CLOUDREQ_HELD_MAX_USEC. */
static const char *chained_stale(const struct cloudreq_call *q) {
        if (q->token_gen != token_gen(q->cr))
                return "a new token";
        if (q->dpop_header && q->nonce_gen != nonce_gen(q->cr))
                return "a new DPoP nonce";
        if (q->held && now_monotonic_usec() - q->signed_at > CLOUDREQ_HELD_MAX_USEC)
                return "an old signature";
        return NULL;
}

/* ---- calls ---- */

static void on_http_done(void *userdata, const struct http_response *resp);
static void on_refreshed(void *userdata, int r);
static int register_begin(struct cloudreq_call *q);
static int attempt_start(struct cloudreq_call *q);

/* What one attempt holds, the request itself (method, URL, body) kept. */
static void attempt_done(struct cloudreq_call *q) {
        http_cancel(q->http);
        q->http = NULL;
        q->attest_op = signer_op_free(q->attest_op);
        q->sign_op = signer_op_free(q->sign_op);
        q->dpop_op = signer_op_free(q->dpop_op);
        q->signed_ok = q->dpop_ok = false;
        q->held = false;
        erase_and_freep_str(&q->auth_header);
        erase_and_freep_str(&q->dpop_header);
}

static void call_unlink(struct cloudreq_call *q) {
        struct cloudreq *cr = q->cr;

        for (struct cloudreq_call **p = &cr->calls; *p; p = &(*p)->next)
                if (*p == q) {
                        *p = q->next;
                        break;
                }
        q->next = NULL;
        /* Its place in a chain: the one waiting for it hears how it ended, from the loop. */
        if (q->pred)
                q->pred->succ = NULL;
        q->pred = NULL;
        if (q->succ) {
                q->succ->pred = NULL;
                q->succ->verdict = q->answered_200 ? CHAIN_GO : CHAIN_STOP;
                q->succ = NULL;
                if (cr->chain_defer)
                        (void) sd_event_source_set_enabled(cr->chain_defer, SD_EVENT_ONESHOT);
        }
}

static void call_free(struct cloudreq_call *q) {
        if (!q)
                return;
        call_unlink(q);
        if (q->refreshing)
                oauth_unauthorized_cancel(q->cr->oauth, q);
        attempt_done(q);
        free(q->url);
        free(q->arg);
        if (q->body)
                erase_and_free(q->body, q->body_len); /* a body may name bulbs and commands: wiped */
        free(q);
}

void cloudreq_cancel(struct cloudreq_call *call) {
        call_free(call);
}

/* The final answer: the caller hears of it, the call ends. */
static void call_finish(struct cloudreq_call *q, const struct cloudreq_answer *a) {
        q->answered_200 = !q->is_register && a->error == 0 && a->status == 200;
        call_unlink(q);
        if (q->is_register) {
                /* Only failures reach here: a registration's HTTP answers are read in
                 * register_http_done(). */
                if (q->register_done)
                        q->register_done(q->userdata, a->error < 0 ? a->error : a->status,
                                         a->error_text[0] ? a->error_text : "no answer");
        } else
                q->done(q->userdata, a);
        call_free(q);
}

/* Ends q without an HTTP answer: error and one line for it. */
static void call_fail(struct cloudreq_call *q, int error, const char *text) {
        call_finish(q, &(struct cloudreq_answer){ .error = error, .error_text = text, .body = "", .retry_after = "" });
}

/* The HTTP timeout of q's next attempt, in milliseconds, or -ETIMEDOUT when too little is left
 * for one. A request call has one deadline for all its attempts: its timeout counted from its
 * first attempt's start (for a chained upload, when its predecessor's 200 let it go, the moment
 * iothubd starts its own wait over too). So a 401, the refresh and the second attempt fit in the
 * time the caller waits (timeout_s and uplink-client.c's margin for the signer), where each
 * attempt with the whole timeout could run past that wait: the caller then gave up on a call
 * that was still going. A registration's steps (the challenge, then the registration) each have
 * the whole timeout: iothubd's wait for REGISTER covers them (uplink-client.c). */
static long attempt_timeout_ms(struct cloudreq_call *q, bool starting) {
        long t = q->timeout_s > 0 ? q->timeout_s : (long) q->cr->conf->cloud.timeout_s;
        uint64_t now = now_monotonic_usec(), left;

        if (q->is_register)
                return t * 1000L;
        if (!q->deadline) {
                if (starting)
                        q->deadline = now + (uint64_t) t * UINT64_C(1000000);
                return t * 1000L;
        }
        left = q->deadline > now ? (q->deadline - now) / 1000 : 0;
        return left >= CLOUDREQ_ATTEMPT_MIN_MS ? (long) left : -ETIMEDOUT;
}

/* Ends q, whose second attempt has no time left (attempt_timeout_ms()). */
static void call_out_of_time(struct cloudreq_call *q) {
        long t = q->timeout_s > 0 ? q->timeout_s : (long) q->cr->conf->cloud.timeout_s;
        char text[160];

        (void) snprintf(text, sizeof text,
                        "answered HTTP 401, and less than %d ms of the request's %ld s was left to send it again",
                        CLOUDREQ_ATTEMPT_MIN_MS, t);
        /* The error goes to the caller as ETIMEDOUT alone: the why is here. */
        log_warning("The cloud %s: it ends as timed out", text);
        set_last_error(q->cr, "the cloud %s", text);
        call_fail(q, -ETIMEDOUT, text);
}

/* Hands the signed request to http.c; what the attempt prepared is freed (http.c copied it). */
static int attempt_launch(struct cloudreq_call *q) {
        const struct signer_reply *sig = signer_op_reply(q->sign_op);
        struct cloudreq *cr = q->cr;
        const char *lines[8];
        long timeout_ms = attempt_timeout_ms(q, true);
        size_t n = 0;
        int r;

        if (!sig || !sig->signature_input || !sig->signature)
                return -EBADMSG;
        if (timeout_ms < 0)
                return (int) timeout_ms;
        lines[n++] = q->auth_header;
        if (q->dpop_header)
                lines[n++] = q->dpop_header;
        if (sig->content_digest)
                lines[n++] = sig->content_digest;
        lines[n++] = sig->signature_input;
        lines[n++] = sig->signature;
        if (q->body)
                lines[n++] = "Content-Type: application/json";
        lines[n++] = "Accept: application/json";
        lines[n++] = "Expect:"; /* no 100-continue round trip */
        r = http_start(cr->http,
                       &(struct http_request){ .method = q->method,
                                               .url = q->url,
                                               .ca_file = cr->conf->cloud.ca_file,
                                               .timeout_ms = timeout_ms,
                                               .headers = lines,
                                               .n_headers = n,
                                               .body = q->body,
                                               .body_len = q->body_len },
                       on_http_done, NULL /* q owns the request, not the reverse */, q, &q->http);
        if (r < 0)
                return r;
        q->sign_op = signer_op_free(q->sign_op);
        q->dpop_op = signer_op_free(q->dpop_op);
        erase_and_freep_str(&q->auth_header);
        erase_and_freep_str(&q->dpop_header);
        return 0;
}

/* The signer answered one of the attempt's two (its signature, its DPoP proof) or failed: once
 * both are there the request goes; a failure ends the call as a request that got no answer. */
static void attempt_signed(struct cloudreq_call *q, int r) {
        const char *kerr = r < 0 ? signer_last_error(q->cr->signer) : NULL;
        bool uploads = q->kind == UPLINK_KIND_STATUS;
        char text[320];

        if (r >= 0 && (!q->signed_ok || (q->dpop_op && !q->dpop_ok)))
                return; /* the other one is still out */
        if (r >= 0 && q->dpop_op) {
                const struct signer_reply *d = signer_op_reply(q->dpop_op);
                q->dpop_header = d && d->proof ? strdup_printf("DPoP: %s", d->proof) : NULL;
                if (!q->dpop_header)
                        r = -ENOMEM;
        }
        if (r >= 0 && q->pred) {
                /* Chained: the request waits for its predecessor's end (chain_run). */
                q->held = true;
                q->signed_at = now_monotonic_usec();
                return;
        }
        if (r >= 0 && q->chained && chained_stale(q)) {
                /* Its predecessor got its 200 while this one was being signed, and changed what
                 * the signatures cover (chain_run() does the same for a held one). */
                log_debug("Signing a chained status upload again (%s)", chained_stale(q));
                r = attempt_start(q);
                if (r >= 0)
                        return;
                (void) snprintf(text, sizeof text, "cannot send a chained request: %s", strerror(-r));
                call_fail(q, r, text);
                return;
        }
        if (r >= 0) {
                r = attempt_launch(q);
                if (r == -ETIMEDOUT) {
                        /* Signed too late for the call's deadline (attempt_timeout_ms()); the
                         * signer's own -ETIMEDOUT (it did not answer) is the key's, below. */
                        call_out_of_time(q);
                        return;
                }
                if (r >= 0)
                        return;
        }
        /* The key could not sign (the signer unreachable, its TPM gone, or another TPM in its
         * place): said with the key's MESSAGE_ID, once per try (the caller backs off like after
         * any failed request). */
        log_event(LOG_ERR, r, IOTHUB_MID_KEY_UNAVAILABLE, NULL,
                  r == -ENOKEY ? "key_not_in_tpm" : r == -EPERM ? "signer_refused" : "tpm_unreachable",
                  "Cannot sign %s with the hub key, %s: %s", uploads ? "uploads" : "a request to the cloud",
                  uploads ? "frames stay spooled" : "it is tried again later", kerr ? kerr : strerror(-r));
        (void) snprintf(text, sizeof text, "cannot sign the request: %s", kerr ? kerr : strerror(-r));
        call_fail(q, r, text);
}

static void on_signed(void *userdata, int r, const struct signer_reply *reply) {
        struct cloudreq_call *q = userdata;

        if (r >= 0)
                q->signed_ok = true;
        attempt_signed(q, r);
}

static void on_dpop(void *userdata, int r, const struct signer_reply *reply) {
        struct cloudreq_call *q = userdata;

        if (r >= 0)
                q->dpop_ok = true;
        attempt_signed(q, r);
}

/* One attempt of q as it stands (method, url, body): authorized now, and the signer asked for
 * what it needs. Returns 0 or a negative errno (nothing is out then). */
static int attempt_start(struct cloudreq_call *q) {
        _cleanup_erase_str_ char *auth = NULL;
        _cleanup_free_ char *ath = NULL, *nonce = NULL;
        struct cloudreq *cr = q->cr;
        enum signer_prio prio;
        int r;

        attempt_done(q);
        if (!cr->signer)
                return -ENOKEY;
        r = authorization(cr, &auth, &ath, &nonce);
        if (r < 0)
                return r;
        q->token_gen = token_gen(cr);
        q->nonce_gen = nonce_gen(cr);
        q->auth_header = strdup_printf("Authorization: %s", auth);
        if (!q->auth_header)
                return -ENOMEM;
        /* A status upload's two signatures wait behind everything someone waits for: a proof at high
         * priority would put each upload ahead of the command poll and results (issue 13). */
        prio = q->kind == UPLINK_KIND_STATUS ? SIGNER_PRIO_LOW : SIGNER_PRIO_HIGH;
        r = signer_sign_http(cr->signer, prio, q->method, q->url, auth, q->body, q->body ? q->body_len : 0, on_signed,
                             q, &q->sign_op);
        if (r >= 0 && ath)
                /* RFC 9449 7.1: a DPoP-bound token goes with a proof for this request. */
                r = signer_sign_dpop(cr->signer, prio, q->method, q->url, ath, nonce, on_dpop, q, &q->dpop_op);
        if (r < 0)
                attempt_done(q);
        return r;
}

/* Sets what q sends next: method (a literal), url (taken), body (taken, may be NULL). */
static void call_set(struct cloudreq_call *q, const char *method, char *url, char *body, size_t body_len) {
        q->method = method;
        free(q->url);
        q->url = url;
        if (q->body)
                erase_and_free(q->body, q->body_len);
        q->body = body;
        q->body_len = body ? body_len : 0;
}

static int call_new(struct cloudreq *cr, struct cloudreq_call **ret) {
        struct cloudreq_call *q = calloc(1, sizeof *q);

        if (!q)
                return -ENOMEM;
        q->cr = cr;
        q->next = cr->calls;
        cr->calls = q;
        *ret = q;
        return 0;
}

/* Chained calls whose predecessor ended (call_unlink() set their verdict): after a 200 the
 * request goes (signed again first when chained_stale() says why), else the
 * call ends unsent. Each pass starts over: an ending call leaves cr->calls and may end the chain
 * behind it. */
static int chain_run(sd_event_source *s, void *userdata) {
        struct cloudreq *cr = userdata;
        bool again = true;

        while (again) {
                again = false;
                for (struct cloudreq_call *q = cr->calls; q; q = q->next) {
                        char text[320];
                        int r = 0;

                        if (q->verdict == CHAIN_NONE)
                                continue;
                        if (q->verdict == CHAIN_STOP) {
                                q->verdict = CHAIN_NONE;
                                log_debug("A chained status upload is not sent: the one before it failed");
                                call_fail(q, -ECANCELED, "not sent: an earlier batch failed");
                                again = true;
                                break;
                        }
                        q->verdict = CHAIN_NONE;
                        if (!q->held)
                                continue; /* still signing: attempt_signed() sends it */
                        if (chained_stale(q)) {
                                log_debug("Signing a chained status upload again (%s)", chained_stale(q));
                                r = attempt_start(q);
                        } else {
                                q->held = false;
                                r = attempt_launch(q);
                        }
                        if (r >= 0)
                                continue;
                        (void) snprintf(text, sizeof text, "cannot send a chained request: %s", strerror(-r));
                        call_fail(q, r, text);
                        again = true;
                        break;
                }
        }
        return 0;
}

int cloudreq_request(struct cloudreq *cr, unsigned kind, const char *arg, char *body, size_t body_len,
                     long timeout_s, struct cloudreq_call *after, cloudreq_done_t done, void *userdata,
                     struct cloudreq_call **ret) {
        struct cloudreq_call *q = NULL;
        const char *method = NULL;
        char *url = NULL;
        int r;

        if (!cr || !done || (after && (after->cr != cr || after->succ || after->is_register))) {
                free(body);
                return -EINVAL;
        }
        if (after && !cr->chain_defer) {
                r = sd_event_add_defer(cr->event, &cr->chain_defer, chain_run, cr);
                if (r >= 0)
                        r = sd_event_source_set_enabled(cr->chain_defer, SD_EVENT_OFF);
                if (r < 0) {
                        cr->chain_defer = sd_event_source_disable_unref(cr->chain_defer);
                        free(body);
                        return r;
                }
        }
        r = uplink_request_target(kind, arg, cr->conf->cloud.url, cr->conf->hub.id, &method, &url);
        if (r >= 0 && (!cr->signer || !cloudreq_have_token(cr)))
                r = -ENOKEY;
        if (r >= 0)
                r = call_new(cr, &q);
        if (r >= 0 && arg && !(q->arg = strdup(arg)))
                r = -ENOMEM;
        if (r < 0) {
                free(url);
                free(body);
                call_free(q);
                return r;
        }
        q->kind = kind;
        q->timeout_s = timeout_s;
        q->done = done;
        q->userdata = userdata;
        call_set(q, method, url, body, body_len);
        if (after) {
                /* Before it is signed: a signature that is ready at once must wait too. */
                q->chained = true;
                q->pred = after;
                after->succ = q;
        }
        r = attempt_start(q);
        if (r < 0) {
                call_free(q);
                return r;
        }
        if (ret)
                *ret = q;
        return 0;
}

/* ---- a 401 ---- */

/* The one place for a 401, whatever the request (PROTOCOL.md 3: refresh once, retry). With
 * OAuth, oauth_unauthorized() decides (a resource-server DPoP nonce, one refresh per token,
 * else give up); with the fixed token of [cloud] bearer_token_file, the file is read again.
 * Returns > 0 when q may go again at once, 0 when it goes again after a refresh
 * (on_refreshed), a negative errno when the 401 is the final answer. */
static int on_401(struct cloudreq_call *q, const struct http_response *resp) {
        struct cloudreq *cr = q->cr;
        int r;

        if (!uses_oauth(cr)) {
                r = load_token(cr);
                return r < 0 ? r : 1;
        }
        if (!cr->oauth)
                return -ENOKEY;
        r = oauth_unauthorized(cr->oauth, q->token_gen, q->nonce_gen, resp->www_authenticate, resp->dpop_nonce,
                               on_refreshed, q);
        if (r == 0)
                q->refreshing = true;
        if (r < 0)
                set_last_error(cr, "the cloud answers HTTP 401: %s", oauth_last_error(cr->oauth));
        return r;
}

/* Once more, after a 401 that a new nonce, a newer token or a refresh answered: -ETIMEDOUT when
 * too little of the call's time is left (attempt_timeout_ms()), and nothing is signed then. */
static int call_again(struct cloudreq_call *q) {
        if (attempt_timeout_ms(q, false) < 0)
                return -ETIMEDOUT;
        q->retried_401 = true;
        /* A registration starts over (a fresh attestation: the cloud's challenge is single-use). */
        return q->is_register ? register_begin(q) : attempt_start(q);
}

static void on_refreshed(void *userdata, int r) {
        struct cloudreq_call *q = userdata;
        char text[320];

        q->refreshing = false;
        if (r >= 0) {
                r = call_again(q);
                if (r == -ETIMEDOUT) {
                        call_out_of_time(q);
                        return;
                }
        }
        if (r >= 0)
                return;
        (void) snprintf(text, sizeof text, "answered HTTP 401 and the token could not be refreshed%s%s",
                        q->cr->oauth ? ": " : "", q->cr->oauth ? oauth_last_error(q->cr->oauth) : "");
        call_fail(q, -EACCES, text);
}

/* ---- registration ---- */

static char *registration_url(struct cloudreq *cr, const char *rest) {
        return strdup_printf("%s/v1/hubs/%s%s", cr->base_url, cr->conf->hub.id, rest);
}

/* q's next attempt is POST /v1/hubs/<id> with the hub's JWK, and the "attestation" object when
 * there is one (stolen in every case). Returns 0 or a negative errno. */
static int register_go(struct cloudreq_call *q, json_t *attestation) {
        struct cloudreq *cr = q->cr;
        json_t *jwk = NULL, *o;
        char *body, *url;
        int r;

        r = signer_key_jwk(cr->signer, &jwk);
        if (r < 0) {
                json_decref(attestation);
                return r;
        }
        o = attestation ? json_pack("{s:o, s:o}", "jwk", jwk, "attestation", attestation)
                        : json_pack("{s:o}", "jwk", jwk);
        body = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        url = registration_url(cr, "");
        if (!body || !url) {
                free(body);
                free(url);
                return -ENOMEM;
        }
        q->attest = false;
        call_set(q, "POST", url, body, strlen(body));
        return attempt_start(q);
}

/* The signer answered ATTEST_BEGIN for q: the challenge request goes (iothub-protocol(7)
 * "Attestation": POST /v1/hubs/<id>/attest/challenge {"jwk","ek_cert","ak_public"});
 * register_http_done() has the signer answer the challenge, then the registration goes. */
static void on_attest_begun(void *userdata, int r, const struct signer_reply *p) {
        struct cloudreq_call *q = userdata;
        struct cloudreq *cr = q->cr;
        json_t *evidence = NULL, *jwk = NULL, *o = NULL;
        char *body = NULL, *url = NULL;
        char text[320];

        if (r >= 0)
                evidence = p->evidence ? json_loads(p->evidence, JSON_REJECT_DUPLICATES, NULL) : NULL;
        q->attest_op = signer_op_free(q->attest_op); /* p lives in it: parsed above */
        if (r == -ENOENT && cr->conf->cloud.attestation == ATTEST_AUTO) {
                log_info("Registering without attestation: the TPM holds no EK certificate");
                r = register_go(q, NULL);
                if (r < 0) {
                        (void) snprintf(text, sizeof text, "cannot register: %s", strerror(-r));
                        call_fail(q, r, text);
                }
                return;
        }
        if (r < 0) {
                const char *why = signer_last_error(cr->signer);
                set_last_error(cr, "attestation: %s", why ? why : strerror(-r));
                log_error_errno(r, "Failed to prepare the attestation: %s", why ? why : strerror(-r));
                call_fail(q, r, cr->last_error);
                return;
        }
        if (!json_is_object(evidence)) {
                json_decref(evidence);
                set_last_error(cr, "attestation: the signer's evidence is not a JSON object");
                call_fail(q, -EBADMSG, cr->last_error);
                return;
        }
        r = signer_key_jwk(cr->signer, &jwk);
        if (r >= 0) {
                o = json_pack("{s:o}", "jwk", jwk);
                if (!o || json_object_update(o, evidence) < 0)
                        r = -ENOMEM;
        }
        json_decref(evidence);
        body = r >= 0 ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        url = registration_url(cr, "/attest/challenge");
        if (r >= 0 && (!body || !url))
                r = -ENOMEM;
        if (r >= 0) {
                q->attest = true;
                call_set(q, "POST", TAKE_PTR(url), body, strlen(body));
                body = NULL;
                r = attempt_start(q);
        }
        if (r < 0) {
                free(body);
                free(url);
                (void) snprintf(text, sizeof text, "cannot register: %s", strerror(-r));
                call_fail(q, r, text);
        }
}

/* The key is known: q's first request is asked for. With a TPM key the signer's ATTEST_BEGIN
 * first (7 TPM commands, about 0.5 s at a chip's pace), on the client's one connection, which the
 * answer will use too (the signer keeps the attestation state per connection). Returns 0 or a
 * negative errno. */
static int register_begin(struct cloudreq_call *q) {
        struct cloudreq *cr = q->cr;
        enum attest_mode mode = cr->conf->cloud.attestation;

        attempt_done(q);
        q->wait_key = false;
        q->attest = false;
        if (mode != ATTEST_OFF && streq_ptr(signer_key_backend(cr->signer), "tpm"))
                return signer_attest_begin(cr->signer, on_attest_begun, q, &q->attest_op);
        if (mode == ATTEST_ON) {
                set_last_error(cr, "[cloud] attestation = on needs a TPM key ([key] backend = tpm)");
                return log_error_errno(-EOPNOTSUPP, "%s", cr->last_error);
        }
        return register_go(q, NULL); /* a file key has no evidence to give */
}

int cloudreq_register(struct cloudreq *cr, void (*done)(void *userdata, long status, const char *message),
                      void *userdata, struct cloudreq_call **ret) {
        struct cloudreq_call *q = NULL;
        bool wait_key = false;
        int r;

        if (!cr || !done)
                return -EINVAL;
        /* One registration at a time: an attested one holds the attestation state of the signer's
         * connection from its ATTEST_BEGIN to its ATTEST_ANSWER, which a second one would replace. */
        for (q = cr->calls; q; q = q->next)
                if (q->is_register)
                        return -EBUSY;
        /* The user may just have run 'iothubctl key init': the owner asks the signer now rather
         * than at its next retry, asynchronously (-EINPROGRESS: cloudreq_key_ready() or
         * cloudreq_key_failed() follows). */
        r = cr->ev.need_key ? cr->ev.need_key(cr->ev.userdata) : -ENOKEY;
        if (r == -EINPROGRESS)
                wait_key = true;
        else if (r < 0)
                return r;
        else if (!cr->signer)
                return -ENOKEY;
        if (!cloudreq_have_token(cr) && (uses_oauth(cr) || load_token(cr) < 0))
                return -ENOKEY;
        r = call_new(cr, &q);
        if (r < 0)
                return r;
        q->is_register = true;
        q->register_done = done;
        q->userdata = userdata;
        q->wait_key = wait_key;
        if (!wait_key) {
                r = register_begin(q);
                if (r < 0) {
                        call_free(q);
                        return r;
                }
        }
        *ret = q;
        return 0;
}

/* The signer answered the cloud's challenge for q (ATTEST_ANSWER): the registration goes, with
 * the attestation. */
static void on_attest_answered(void *userdata, int r, const struct signer_reply *a) {
        struct cloudreq_call *q = userdata;
        struct cloudreq *cr = q->cr;
        json_t *attestation = NULL;
        char message[320];

        if (r >= 0)
                attestation = a->answer ? json_loads(a->answer, JSON_REJECT_DUPLICATES, NULL) : NULL;
        q->attest_op = signer_op_free(q->attest_op); /* a lives in it: parsed above */
        if (r >= 0 && !json_is_object(attestation))
                r = -EBADMSG;
        if (r >= 0) {
                r = register_go(q, TAKE_PTR(attestation));
                if (r >= 0)
                        return;
                (void) snprintf(message, sizeof message, "cannot register: %s", strerror(-r));
                call_fail(q, r, message);
                return;
        }
        json_decref(attestation);
        (void) snprintf(message, sizeof message, "attestation failed: %s",
                        r == -EBADMSG                   ? "the cloud's attestation challenge is malformed"
                        : signer_last_error(cr->signer) ? signer_last_error(cr->signer)
                                                        : strerror(-r));
        set_last_error(cr, "%s", message);
        log_error_errno(r, "Registration: %s", message);
        call_fail(q, r, message);
}

/* The cloud answered the challenge request q: the signer activates and certifies
 * (asynchronously), then the registration goes. Returns 0 when that is under way, else a
 * negative errno and a message for the waiter. */
static int register_answer(struct cloudreq_call *q, const struct http_response *resp, char *message, size_t size) {
        struct cloudreq *cr = q->cr;
        int r;

        if (resp->error == 0 && resp->status == 404 && cr->conf->cloud.attestation == ATTEST_AUTO) {
                /* A cloud of contract 1.0, without attestation: register as before. */
                log_info("The cloud has no attestation endpoint; registering without attestation");
                r = register_go(q, NULL);
                if (r < 0)
                        (void) snprintf(message, size, "cannot register: %s", strerror(-r));
                return r;
        }
        if (resp->error < 0) {
                (void) snprintf(message, size, "%s", resp->error_text);
                return resp->error;
        }
        if (resp->status != 200) {
                char reason[CLOUDREQ_REFUSAL_REASON_MAX];

                uplink_refusal_reason(resp->status, resp->body, resp->body_len, reason, sizeof reason);
                (void) snprintf(message, size, "the cloud refused the attestation challenge: %s", reason);
                return -EPROTO;
        }
        /* The signer parses the challenge (its limits: ATTEST_ANSWER_MAX, attest.h) and answers
         * it with the TPM, on the connection of the ATTEST_BEGIN. */
        r = resp->body_len > 0 ? signer_attest_answer(cr->signer, resp->body, resp->body_len, on_attest_answered, q,
                                                      &q->attest_op)
                               : -EBADMSG;
        if (r < 0) {
                (void) snprintf(message, size, "attestation failed: %s",
                                r == -EBADMSG || r == -EINVAL ? "the cloud's attestation challenge is malformed"
                                                              : strerror(-r));
                set_last_error(cr, "%s", message);
                log_error_errno(r, "Registration: %s", message);
                return r;
        }
        return 0;
}

/* An HTTP answer to a registration's attempt (not a 401 that is tried again). */
static void register_http_done(struct cloudreq_call *q, const struct http_response *resp) {
        char message[320];
        long status;

        if (q->attest && !(resp->error == 0 && resp->status == 401)) {
                int k = register_answer(q, resp, message, sizeof message);
                if (k >= 0)
                        return;
                call_fail(q, k, message);
                return;
        }
        status = resp->error < 0 ? resp->error : resp->status;
        if (resp->error < 0)
                (void) snprintf(message, sizeof message, "%s", resp->error_text);
        else if (resp->status == 200 || resp->status == 201)
                (void) snprintf(message, sizeof message, "registered");
        else if (resp->status == 409)
                (void) snprintf(message, sizeof message, "this hub is registered to another account");
        else {
                /* The cloud's "error" (e.g. attestation_required, attest_replay) says why. */
                char reason[CLOUDREQ_REFUSAL_REASON_MAX];

                uplink_refusal_reason(resp->status, resp->body, resp->body_len, reason, sizeof reason);
                (void) snprintf(message, sizeof message, "the cloud answered %s", reason);
        }
        call_unlink(q);
        q->register_done(q->userdata, status, message);
        call_free(q);
}

/* The registrations that waited for the hub key hear of it: with it they go on, without it
 * they end. Each pass starts over: an ending one leaves cr->calls. */
static void register_key_news(struct cloudreq *cr, int error, const char *why) {
        char text[320];
        bool again = true;

        while (again) {
                again = false;
                for (struct cloudreq_call *q = cr->calls; q; q = q->next) {
                        int r;

                        /* call_fail() unlinks q from q->cr->calls, and q->cr is cr:
                         * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
                        if (!q->is_register || !q->wait_key)
                                continue;
                        r = error < 0 ? error : register_begin(q);
                        if (r >= 0)
                                continue;
                        if (error < 0)
                                (void) snprintf(text, sizeof text, "no hub key: %s", why ? why : strerror(-r));
                        else
                                (void) snprintf(text, sizeof text, "cannot register: %s", strerror(-r));
                        call_fail(q, r, text);
                        again = true;
                        break;
                }
        }
}

void cloudreq_key_ready(struct cloudreq *cr, struct signer *s) {
        if (!cr)
                return;
        cr->signer = s;
        register_key_news(cr, 0, NULL);
}

void cloudreq_key_failed(struct cloudreq *cr, int error, const char *why) {
        if (cr)
                register_key_news(cr, error < 0 ? error : -ENOKEY, why);
}

/* ---- answers ---- */

static void on_http_done(void *userdata, const struct http_response *resp) {
        struct cloudreq_call *q = userdata;
        struct cloudreq *cr = q->cr;

        q->http = NULL; /* http frees it after this call */
        if (resp->error == 0 && resp->status >= 200 && resp->status < 300) {
                oauth_resource_ok(cr->oauth);
                cr->last_error[0] = '\0';
        }
        /* RFC 9449 8.2, 9: the cloud may give its next nonce in any answer (a 401 that is tried
         * again hands it to oauth_unauthorized() instead): before this call ends, so that a
         * chained call behind it sees it (chained_stale()). */
        if (resp->error == 0 && (resp->status != 401 || q->retried_401))
                oauth_resource_nonce(cr->oauth, resp->dpop_nonce);
        if (resp->error == 0 && resp->status == 401 && !q->retried_401) {
                int k = on_401(q, resp);
                if (k == 0)
                        return; /* on_refreshed() goes on */
                if (k > 0) {
                        k = call_again(q);
                        if (k >= 0)
                                return;
                        if (k == -ETIMEDOUT) {
                                call_out_of_time(q);
                                return;
                        }
                        char text[320];
                        (void) snprintf(text, sizeof text, "cannot send again after HTTP 401: %s", strerror(-k));
                        call_fail(q, k, text);
                        return;
                }
                /* k < 0: the 401 is the answer. */
        }
        if (q->is_register) {
                register_http_done(q, resp);
                return;
        }
        call_finish(q, &(struct cloudreq_answer){ .error = resp->error,
                                                  .error_text = resp->error < 0 ? resp->error_text : "",
                                                  .status = resp->status,
                                                  .body = resp->body,
                                                  .body_len = resp->body_len,
                                                  .retry_after = resp->retry_after });
}

/* ---- setup ---- */

int cloudreq_new(sd_event *e, const struct iothub_conf *conf, struct http *http, struct oauth *oauth,
                 const struct cloudreq_events *ev, struct cloudreq **ret) {
        struct cloudreq *cr;
        size_t n;
        int r;

        if (!conf->cloud.url) {
                *ret = NULL;
                return 0;
        }
        cr = calloc(1, sizeof *cr);
        if (!cr)
                return -ENOMEM;
        cr->event = e;
        cr->conf = conf;
        cr->http = http;
        cr->oauth = oauth;
        if (ev)
                cr->ev = *ev;
        cr->base_url = strdup(conf->cloud.url);
        if (!cr->base_url) {
                free(cr);
                return -ENOMEM;
        }
        n = strlen(cr->base_url);
        while (n > 0 && cr->base_url[n - 1] == '/')
                cr->base_url[--n] = '\0';
        if (uses_oauth(cr)) {
                if (conf->cloud.bearer_token_file)
                        log_warning("[cloud] bearer_token_file is ignored: [oauth] signs the hub in");
        } else {
                if (conf->cloud.bearer_token_file)
                        log_warning("Using the fixed access token of [cloud] bearer_token_file, for tests and "
                                    "development only");
                r = load_token(cr);
                if (r < 0)
                        log_error("Cloud uploads wait: %s", cr->last_error);
        }
        *ret = cr;
        return 0;
}

void cloudreq_free(struct cloudreq *cr) {
        if (!cr)
                return;
        while (cr->calls)
                /* call_free() unlinks it from q->cr->calls, and q->cr is cr:
                 * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
                call_free(cr->calls);
        sd_event_source_disable_unref(cr->chain_defer);
        erase_and_freep_str(&cr->token);
        free(cr->base_url);
        free(cr);
}
