/* SPDX-License-Identifier: MIT */
/* The relay to the vendor's web service (PROTOCOL.md 3).
 *
 * Requests go through http.c: libcurl's multi interface on the daemon's sd-event loop,
 * whose connection cache lets consecutive requests reuse one TLS connection.
 *
 * Uploads: at most one status batch in flight. A batch goes when [cloud] batch_max_frames
 * are waiting or the oldest waiting frame is [cloud] batch_max_delay_ms old. It is the
 * oldest frames of the spool, sent byte for byte, and they leave the spool only when the
 * cloud answered 200. Each request costs exactly one hub key signature (RFC 9421). The
 * list of enrolled bulbs is PUT before any batch that follows a change of it, so that the
 * cloud can check every frame against the key the hub checked it with. */
#include <inttypes.h>
#include <stdio.h>
#include <sys/epoll.h>

#include <curl/curl.h>
#include <openssl/crypto.h>

#include "iothub/cloud.h"
#include "iothub/http.h"
#include "iothub/log.h"
#include "iothub/oauth.h"
#include "iothub/registry.h"
#include "iothub/signer.h"
#include "iothub/spool.h"

/* A status batch carries at most batch_max_frames frames (PROTOCOL.md 3, the cloud relies on it)
 * and at most this many bytes. While a batch is signed (a TPM chip takes about 70 ms) and sent,
 * frames pile up in the spool and the next batch takes them, up to batch_max_frames: so the rate
 * the relay reaches with a slow TPM is about batch_max_frames per signature and upload (256 per
 * ~0.1 s: ~2,500 frames/s), and a hub that must relay more raises batch_max_frames (iothub.conf(5)).
 * 512 KiB: at ~260 bytes a frame that is ~2,000 frames, more than the largest batch_max_frames of
 * typical frames; frames of the largest size (4 KiB, the reference cloud's per-frame limit) still
 * fit 127 to a batch. The cap is memory: the body is built here and libcurl copies it (1 MiB cost
 * ~2-3 MiB more private memory at peak in the bench; DESIGN.md: 4 MiB in all). The buffer starts
 * at 16 KiB and doubles, so it never passes the cap (a power of two times 16 KiB). */
#define CLOUD_BATCH_MAX_BYTES (512 * 1024)

#define META_DEVICES_DIRTY "devices_dirty"
#define META_REGISTERED "registered"

enum req_kind { REQ_STATUS, REQ_DEVICES, REQ_REGISTER, REQ_OTHER };

struct cloud_req {
        struct cloud *cloud;
        enum req_kind kind;
        struct http_req *http; /* NULL once answered */
        bool retried_401;
        uint64_t token_gen; /* oauth_token_gen() when it was authorized */
        /* REQ_STATUS: the spool rows in this batch. */
        int64_t first_id, last_id;
        unsigned n_frames;
        /* REQ_REGISTER */
        void (*register_done)(void *userdata, long status, const char *message);
        void *register_userdata;
        /* The caller's handle of a registration: a retry after a 401 replaces the request, and
         * the caller's handle with it, so that cancelling it always reaches the live request. */
        struct cloud_call **register_slot;
        /* The challenge request of an attested registration (iothub-protocol(7) "Attestation"):
         * the signer holds the EK certificate and AK it was asked for (iothub-signer(8)). */
        bool attest;
        /* REQ_DEVICES: the generation of the list it carried. */
        uint64_t devices_gen;
        /* REQ_OTHER (cloud_request) */
        void (*call_done)(void *userdata, int r, long status, const char *body, size_t len);
        void *call_userdata;
        struct cloud_req *next; /* in cloud->others */
        /* While the signer makes its RFC 9421 signature and, for a DPoP-bound token, its DPoP
         * proof (both at once): the request as it will go. */
        struct signer_op *sign_op, *dpop_op;
        bool signed_ok, dpop_ok;
        /* REQ_REGISTER before its request is made: it waits for the hub key (wait_key: hub.c asked
         * the signer, cloud_key_ready() or cloud_key_failed() follows), or for the signer's
         * ATTEST_BEGIN or ATTEST_ANSWER (attest_op). All on the loop: nothing waits for the signer
         * outside it (issue 13). */
        bool wait_key;
        struct signer_op *attest_op;
        const char *method; /* a literal */
        char *url, *body, *auth_header, *dpop_header;
        size_t body_len;
        long timeout_s;
};

struct cloud {
        sd_event *event;
        const struct iothub_conf *conf;
        struct db *db;
        struct registry *registry;
        struct http *http;
        struct oauth *oauth;        /* NULL without [oauth]: the fixed token of bearer_token_file */
        struct signer *signer;      /* NULL until hub.c announces the hub key (cloud_key_ready) */
        struct spool_counts *spool; /* hub.c's; lowered as frames leave the spool */
        struct cloud_events ev;
        char *base_url; /* without a trailing '/' */
        sd_event_source *batch_timer;
        struct cloud_req *status_req, *devices_req;
        struct cloud_req *others; /* register requests */
        bool refreshing;          /* a status batch waits for a refresh (cloud_on_401) */
        bool registered;          /* iothubctl register succeeded (persisted) */
        bool devices_dirty;
        bool devices_401_retried; /* the list went again at once after a 401 */
        uint64_t devices_gen; /* bumped at every change of the bulb list */
        unsigned failures, devices_failures;
        uint64_t devices_backoff_until;
        char *token;
        struct cloud_counters counters;
        json_t *rejected_reasons; /* reason -> count of per-frame rejections by the cloud */
};

uint64_t cloud_backoff_ms(unsigned failures, uint32_t rnd) {
        return backoff_ms(failures, CLOUD_BACKOFF_MIN_MS, CLOUD_BACKOFF_MAX_MS, rnd);
}

int cloud_parse_retry_after(const char *value, int64_t now_s, int64_t *ret_seconds) {
        int64_t s = 0;
        const char *p = value;

        if (!value)
                return -EINVAL;
        while (*p == ' ' || *p == '\t')
                p++;
        if (*p >= '0' && *p <= '9') {
                for (; *p >= '0' && *p <= '9'; p++) {
                        s = s * 10 + (*p - '0');
                        if (s > CLOUD_RETRY_AFTER_MAX_S)
                                s = CLOUD_RETRY_AFTER_MAX_S + 1;
                }
                while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
                        p++;
                if (*p)
                        return -EINVAL;
        } else {
                time_t t = curl_getdate(p, NULL);
                if (t == -1)
                        return -EINVAL;
                s = (int64_t) t - now_s;
        }
        if (s < 0)
                s = 0;
        if (s > CLOUD_RETRY_AFTER_MAX_S)
                s = CLOUD_RETRY_AFTER_MAX_S;
        *ret_seconds = s;
        return 0;
}

static void set_last_error(struct cloud *c, const char *fmt, ...) _printf_(2, 3);
static void set_last_error(struct cloud *c, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(c->counters.last_error, sizeof c->counters.last_error, fmt, ap);
        va_end(ap);
}

/* ---- requests ---- */

static void on_http_done(void *userdata, const struct http_response *resp);

static void req_prepared_done(struct cloud_req *q) {
        q->attest_op = signer_op_free(q->attest_op);
        q->sign_op = signer_op_free(q->sign_op);
        q->dpop_op = signer_op_free(q->dpop_op);
        erase_and_freep_str(&q->auth_header);
        erase_and_freep_str(&q->dpop_header);
        free(q->url);
        free(q->body);
        q->url = q->body = NULL;
}

static void req_free(struct cloud_req *q) {
        if (!q)
                return;
        http_cancel(q->http);
        req_prepared_done(q);
        free(q);
}

static bool token_is_valid(const char *t) {
        size_t n = strlen(t);

        return n <= CLOUD_TOKEN_MAX && b64token_is_valid(t, n);
}

/* (Re)reads the access token. For now from [cloud] bearer_token_file; the OAuth module takes
 * this place once a user signed in. */
static int cloud_load_token(struct cloud *c) {
        const char *path = c->conf->cloud.bearer_token_file;
        _cleanup_erase_str_ char *t = NULL;
        size_t len = 0;
        int r;

        if (!path) {
                /* Sign-in is the user's way; bearer_token_file is a development aid, not a hint. */
                if (c->conf->oauth.issuer)
                        set_last_error(c, "not signed in: [oauth] client_id is not set");
                else
                        set_last_error(c, "not signed in: configure [oauth] (see iothub.conf(5)), then run "
                                          "'iothubctl login'");
                return -ENOKEY;
        }
        {
                /* Re-read on every 401: a FIFO here would stall the loop, a symlink or a
                 * file others can write would hand them the hub's uploads (util.h). */
                _cleanup_free_ char *why = NULL;
                r = read_trusted_file(path, TRUSTED_SECRET, CLOUD_TOKEN_MAX + 2, &t, &len, &why);
                if (r < 0) {
                        set_last_error(c, "cannot use [cloud] bearer_token_file: %s", why ? why : strerror(-r));
                        return r;
                }
        }
        while (len > 0 && (t[len - 1] == '\n' || t[len - 1] == '\r' || t[len - 1] == ' '))
                t[--len] = '\0';
        if (!token_is_valid(t)) {
                set_last_error(c, "[cloud] bearer_token_file %s does not hold a valid token", path);
                return -EINVAL;
        }
        erase_and_freep_str(&c->token);
        c->token = TAKE_PTR(t);
        return 0;
}

/* With [oauth], the signed-in user's token (and a DPoP proof when it is bound); else the
 * fixed token of [cloud] bearer_token_file. */
static bool cloud_have_token(struct cloud *c) {
        struct oauth *o = c->oauth;

        if (o)
                return oauth_get_state(o) == OAUTH_OK || oauth_get_state(o) == OAUTH_REFRESHING;
        return c->token != NULL;
}

static bool cloud_uses_oauth(struct cloud *c) {
        return c->conf->oauth.issuer && c->conf->oauth.client_id;
}

/* The Authorization value, and for a DPoP-bound token what its proof needs (ath, the resource
 * server's nonce; ret_dpop_ath NULL for a Bearer token). */
static int cloud_authorization(struct cloud *c, char **ret_auth, char **ret_dpop_ath, char **ret_dpop_nonce) {
        if (c->oauth)
                return oauth_authorize(c->oauth, ret_auth, ret_dpop_ath, ret_dpop_nonce);
        if (!c->token)
                return -ENOKEY;
        *ret_dpop_ath = *ret_dpop_nonce = NULL;
        *ret_auth = strdup_printf("Bearer %s", c->token);
        return *ret_auth ? 0 : -ENOMEM;
}

/* Hands the signed request to http.c; the prepared parts are freed (http.c copied them). */
static int req_launch(struct cloud_req *q) {
        const struct signer_reply *sig = signer_op_reply(q->sign_op);
        struct cloud *c = q->cloud;
        const char *lines[8];
        size_t n = 0;
        int r;

        if (!sig || !sig->signature_input || !sig->signature)
                return -EBADMSG;
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
        r = http_start(c->http,
                       &(struct http_request){ .method = q->method,
                                               .url = q->url,
                                               .ca_file = c->conf->cloud.ca_file,
                                               .timeout_s = q->timeout_s > 0 ? q->timeout_s
                                                                             : (long) c->conf->cloud.timeout_s,
                                               .headers = lines,
                                               .n_headers = n,
                                               .body = q->body,
                                               .body_len = q->body_len },
                       on_http_done, NULL /* q owns the request, not the reverse */, q, &q->http);
        if (r >= 0)
                req_prepared_done(q);
        return r;
}

/* The signer answered one of the request's two (its signature, its DPoP proof) or failed: once
 * both are there the request goes; a failure ends it as a request that got no answer would
 * (on_http_done with a transport error: each kind backs off or reports in its own way). */
static void req_signed(struct cloud_req *q, int r) {
        const char *kerr = r < 0 ? signer_last_error(q->cloud->signer) : NULL;
        char text[320];

        if (r >= 0 && (!q->signed_ok || (q->dpop_op && !q->dpop_ok)))
                return; /* the other one is still out */
        if (r >= 0 && q->dpop_op) {
                const struct signer_reply *d = signer_op_reply(q->dpop_op);
                q->dpop_header = d && d->proof ? strdup_printf("DPoP: %s", d->proof) : NULL;
                if (!q->dpop_header)
                        r = -ENOMEM;
        }
        if (r >= 0)
                r = req_launch(q);
        if (r >= 0)
                return;
        req_prepared_done(q);
        /* The key could not sign (the signer unreachable, its TPM gone, or another TPM in its
         * place): said with the key's MESSAGE_ID, once per try (the request backs off like any
         * failed one). */
        log_event(LOG_ERR, r, IOTHUB_MID_KEY_UNAVAILABLE, NULL,
                  r == -ENOKEY ? "key_not_in_tpm" : r == -EPERM ? "signer_refused" : "tpm_unreachable",
                  "Cannot sign %s with the hub key, %s: %s", q->kind == REQ_STATUS ? "uploads" : "a request to the cloud",
                  q->kind == REQ_STATUS ? "frames stay spooled" : "it is tried again later", kerr ? kerr : strerror(-r));
        (void) snprintf(text, sizeof text, "cannot sign the request: %s", kerr ? kerr : strerror(-r));
        on_http_done(q, &(struct http_response){ .error = r, .error_text = text, .body = "", .retry_after = "",
                                                 .dpop_nonce = "", .www_authenticate = "" });
}

static void on_req_signed(void *userdata, int r, const struct signer_reply *reply) {
        struct cloud_req *q = userdata;

        if (r >= 0)
                q->signed_ok = true;
        req_signed(q, r);
}

static void on_req_dpop(void *userdata, int r, const struct signer_reply *reply) {
        struct cloud_req *q = userdata;

        if (r >= 0)
                q->dpop_ok = true;
        req_signed(q, r);
}

/* Starts a request: authorized, signed (RFC 9421) and handed to http.c. The signer makes the
 * signature (and the DPoP proof of a DPoP-bound token, both asked at once) asynchronously: *ret
 * is returned at once and the request goes when both are there; status batches at low priority,
 * the rest (the list of bulbs, registration, command polls and results) before them, since
 * someone waits for those. Takes body in every case. */
static int req_new(struct cloud *c, enum req_kind kind, long timeout_s, struct cloud_req **ret) {
        struct cloud_req *q = calloc(1, sizeof *q);

        if (!q)
                return -ENOMEM;
        q->cloud = c;
        q->kind = kind;
        q->timeout_s = timeout_s;
        *ret = q;
        return 0;
}

/* Authorizes q as method path with body (taken in every case) and asks the signer for what it
 * needs; on failure q is left to the caller. */
static int req_sign(struct cloud_req *q, const char *method, const char *path, char *body, size_t body_len) {
        _cleanup_erase_str_ char *auth = NULL;
        _cleanup_free_ char *ath = NULL, *nonce = NULL;
        struct cloud *c = q->cloud;
        int r;

        q->method = method;
        free(q->body);
        q->body = body;
        q->body_len = body_len;
        free(q->url);
        q->url = strdup_printf("%s%s", c->base_url, path);
        if (!q->url)
                return -ENOMEM;
        if (!c->signer)
                return -ENOKEY;
        r = cloud_authorization(c, &auth, &ath, &nonce);
        if (r < 0)
                return r;
        q->token_gen = oauth_token_gen(c->oauth);
        q->auth_header = strdup_printf("Authorization: %s", auth);
        if (!q->auth_header)
                return -ENOMEM;
        r = signer_sign_http(c->signer, q->kind == REQ_STATUS ? SIGNER_PRIO_LOW : SIGNER_PRIO_HIGH, method, q->url,
                             auth, body, body ? body_len : 0, on_req_signed, q, &q->sign_op);
        if (r >= 0 && ath)
                /* RFC 9449 7.1: a DPoP-bound token goes with a proof for this request. */
                r = signer_sign_dpop(c->signer, method, q->url, ath, nonce, on_req_dpop, q, &q->dpop_op);
        return r;
}

/* Starts a request: authorized, signed (RFC 9421) and handed to http.c. The signer makes the
 * signature (and the DPoP proof of a DPoP-bound token, both asked at once) asynchronously: *ret
 * is returned at once and the request goes when both are there; status batches at low priority,
 * the rest (the list of bulbs, registration, command polls and results) before them, since
 * someone waits for those. Takes body in every case. */
static int req_start(struct cloud *c, enum req_kind kind, const char *method, const char *path, char *body,
                     size_t body_len, long timeout_s, struct cloud_req **ret) {
        struct cloud_req *q;
        int r;

        r = req_new(c, kind, timeout_s, &q);
        if (r < 0) {
                free(body);
                return r;
        }
        r = req_sign(q, method, path, body, body_len);
        if (r < 0) {
                req_free(q);
                return r;
        }
        *ret = q;
        return 0;
}

/* Ends q before its request went, as a request that got no answer would: its owner hears of it
 * through on_http_done() like of any transport failure. */
static void req_fail(struct cloud_req *q, int r, const char *text) {
        req_prepared_done(q);
        on_http_done(q, &(struct http_response){ .error = r, .error_text = text, .body = "", .retry_after = "",
                                                 .dpop_nonce = "", .www_authenticate = "" });
}

/* ---- status batches ---- */

static void cloud_maybe_send(struct cloud *c);

static void arm_batch_timer(struct cloud *c, uint64_t at_usec) {
        int r;

        if (!c->batch_timer)
                return;
        r = sd_event_source_set_time(c->batch_timer, at_usec);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->batch_timer, SD_EVENT_ONESHOT);
        if (r < 0)
                log_error_errno(r, "Failed to arm the batch timer: %m");
}

static void cloud_backoff(struct cloud *c, const char *retry_after) {
        uint32_t rnd = 0;
        uint64_t delay_ms;
        int64_t ra;

        c->failures++;
        (void) random_bytes(&rnd, sizeof rnd);
        delay_ms = cloud_backoff_ms(c->failures, rnd);
        /* RFC 9110 10.2.3: the server says how long; we wait at least that. */
        if (retry_after && retry_after[0] &&
            cloud_parse_retry_after(retry_after, (int64_t) (now_realtime_usec() / 1000000), &ra) >= 0 &&
            (uint64_t) ra * 1000 > delay_ms)
                delay_ms = (uint64_t) ra * 1000;
        c->counters.backoff_until = now_monotonic_usec() + delay_ms * 1000;
        arm_batch_timer(c, c->counters.backoff_until);
        log_debug("Cloud upload backing off for %" PRIu64 " ms", delay_ms);
}

struct batch_builder {
        char *buf;
        size_t len, cap;
        int64_t first_id, last_id;
        unsigned n;
};

static int batch_add(const struct spool_entry *e, void *userdata) {
        struct batch_builder *b = userdata;
        size_t need = b->len + e->len + 4;

        /* Full: -ENOBUFS ends the walk (cloud_send_batch sends what it has). */
        if (b->n > 0 && need + 3 > CLOUD_BATCH_MAX_BYTES)
                return -ENOBUFS;
        /* The frames passed the parser: base64url and dots only. Checked again, since they go
         * into JSON strings unescaped. */
        for (size_t i = 0; i < e->len; i++) {
                char ch = (char) e->jws[i];
                if (!(ch == '.' || b64url_char_is_valid(ch)))
                        return -EUCLEAN;
        }
        if (need + 3 > b->cap) {
                size_t cap = b->cap ? b->cap * 2 : 16384;
                while (cap < need + 3)
                        cap *= 2;
                char *t = realloc(b->buf, cap);
                if (!t)
                        return -ENOMEM;
                b->buf = t;
                b->cap = cap;
        }
        if (b->n > 0)
                b->buf[b->len++] = ',';
        b->buf[b->len++] = '"';
        memcpy(b->buf + b->len, e->jws, e->len);
        b->len += e->len;
        b->buf[b->len++] = '"';
        if (b->n == 0)
                b->first_id = e->id;
        b->last_id = e->id;
        b->n++;
        return 0;
}

static int cloud_send_batch(struct cloud *c) {
        struct batch_builder b = {};
        _cleanup_free_ char *path = NULL;
        char *body;
        int r;

        b.cap = 16384;
        b.buf = malloc(b.cap);
        if (!b.buf)
                return -ENOMEM;
        memcpy(b.buf, "{\"frames\":[", 11);
        b.len = 11;
        r = spool_read_batch(c->db, c->conf->cloud.batch_max_frames,
                             batch_add, &b);
        if (r == -ENOBUFS && b.n > 0)
                r = (int) b.n;
        if (r <= 0) {
                free(b.buf);
                return r;
        }
        memcpy(b.buf + b.len, "]}", 3);
        b.len += 2;
        body = b.buf;
        path = strdup_printf("/v1/hubs/%s/status", c->conf->hub.id);
        if (!path) {
                free(body);
                return -ENOMEM;
        }
        r = req_start(c, REQ_STATUS, "POST", path, body, b.len, 0, &c->status_req);
        if (r < 0)
                return r;
        c->status_req->first_id = b.first_id;
        c->status_req->last_id = b.last_id;
        c->status_req->n_frames = b.n;
        log_debug("Uploading %u frames (%zu bytes)", b.n, b.len);
        return 0;
}

static void cloud_maybe_send(struct cloud *c) {
        uint64_t now = now_monotonic_usec();
        int64_t oldest_usec = 0;
        int r;

        if (!c->signer)
                return;
        if (!cloud_have_token(c)) {
                if (c->oauth && oauth_get_state(c->oauth) == OAUTH_LOGIN_REQUIRED)
                        set_last_error(c, "not signed in: run 'iothubctl login'");
                return;
        }
        /* Nothing goes up before the hub is registered: the cloud could not check it. */
        if (!c->registered) {
                set_last_error(c, "not registered yet: run 'iothubctl register'");
                return;
        }
        if (c->devices_dirty && !c->devices_req && now >= c->devices_backoff_until) {
                /* The devices list goes first (see the top of this file). */
                extern void cloud_send_devices(struct cloud *);
                cloud_send_devices(c);
        }
        if (c->status_req || c->devices_dirty || c->refreshing)
                return;
        if (c->counters.backoff_until > now)
                return;
        c->counters.backoff_until = 0;
        if (c->spool->pending == 0)
                return;
        if (c->spool->pending < c->conf->cloud.batch_max_frames) {
                /* Runs after every commit: while the timer for the oldest frame is armed, a
                 * newer frame cannot make the batch due sooner, so skip the query. */
                if (sd_event_source_get_enabled(c->batch_timer, NULL) > 0)
                        return;
                r = spool_oldest(c->db, NULL, &oldest_usec);
                if (r < 0)
                        return;
                /* received_at is a date (it survives restarts), so the age is taken on the real-time
                 * clock. A clock stepped back since (NTP correcting a clock that ran ahead) makes it
                 * negative: the batch is due now, not after the step's size on top of the delay. */
                int64_t age_usec = (int64_t) now_realtime_usec() - oldest_usec;
                int64_t delay_usec = (int64_t) c->conf->cloud.batch_max_delay_ms * 1000;
                if (age_usec >= 0 && age_usec < delay_usec) {
                        arm_batch_timer(c, now + (uint64_t) (delay_usec - age_usec));
                        return;
                }
        }
        r = cloud_send_batch(c);
        if (r < 0) {
                const char *kerr = signer_last_error(c->signer);

                /* The key could not sign (TPM gone, or another TPM in its place): said with the
                 * key's MESSAGE_ID, once per backoff step; the next try connects again. */
                if (kerr) {
                        set_last_error(c, "cannot sign with the hub key: %s", kerr);
                        log_event(LOG_ERR, r, IOTHUB_MID_KEY_UNAVAILABLE, NULL,
                                  r == -ENOKEY ? "key_not_in_tpm" : "tpm_unreachable",
                                  "Cannot sign uploads with the hub key, frames stay spooled: %s", kerr);
                } else {
                        set_last_error(c, "cannot prepare a batch: %s", strerror(-r));
                        log_error_errno(r, "Failed to prepare an upload batch: %m");
                }
                cloud_backoff(c, NULL);
        }
}

void cloud_kick(struct cloud *c) {
        if (c)
                cloud_maybe_send(c);
}

static int on_batch_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        cloud_maybe_send(userdata);
        return 0;
}

int cloud_parse_status_answer(const char *body, size_t len, json_t **ret_rejected) {
        json_error_t jerr;
        json_t *resp = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
        json_t *acc = json_object_get(resp, "accepted"), *rej = json_object_get(resp, "rejected");

        if (!json_is_integer(acc) || (rej && !json_is_array(rej))) {
                json_decref(resp);
                return -EBADMSG;
        }
        *ret_rejected = json_incref(rej);
        json_decref(resp);
        return 0;
}

void cloud_rejection_key(const json_t *rejection, char ret_key[static CLOUD_REJECTION_KEY_MAX]) {
        const char *reason = json_string_value(json_object_get(rejection, "reason"));

        if (!reason || reason[0] == '\0' || strlen(reason) >= CLOUD_REJECTION_KEY_MAX)
                reason = "other"; /* an empty reason would name no counter */
        /* Reasons come from the network: keep only a safe token as a counter name. */
        (void) snprintf(ret_key, CLOUD_REJECTION_KEY_MAX, "%s", reason);
        for (char *p = ret_key; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_'))
                        *p = '_';
}

void cloud_refusal_reason(long status, const char *body, size_t len, char *ret, size_t size) {
        json_error_t jerr;
        json_t *resp = json_loadb(body, len, 0, &jerr);
        const char *e = json_string_value(json_object_get(resp, "error"));

        (void) snprintf(ret, size, "HTTP %ld%s%.64s", status, e ? ": " : "", e ? e : "");
        json_decref(resp);
        for (char *p = ret; *p; p++)
                if ((unsigned char) *p < 0x20 || (unsigned char) *p >= 0x7f)
                        *p = '?';
}

static void count_rejections(struct cloud *c, json_t *rejected, unsigned n_frames) {
        size_t i;
        json_t *v;

        json_array_foreach(rejected, i, v) {
                char key[CLOUD_REJECTION_KEY_MAX];

                cloud_rejection_key(v, key);
                json_int_t old = json_integer_value(json_object_get(c->rejected_reasons, key));
                if (json_object_size(c->rejected_reasons) < 32 || json_object_get(c->rejected_reasons, key))
                        (void) json_object_set_new(c->rejected_reasons, key, json_integer(old + 1));
        }
}

static int cloud_on_401(struct cloud *c, struct cloud_req *q, const struct http_response *resp);

/* The answer to a status batch, 401 included (cloud_on_401() decides, this reacts). */
static void on_status_done(struct cloud *c, struct cloud_req *q, const struct http_response *resp_) {
        long status = resp_->status;
        int r = resp_->error;
        uint64_t count = 0, bytes = 0;

        if (r == 0 && status == 200) {
                json_t *rej = NULL;
                if (cloud_parse_status_answer(resp_->body, resp_->body_len, &rej) < 0) {
                        set_last_error(c, "the cloud answered 200 with an unexpected body");
                        log_warning("Cloud answered 200 with an unexpected body; the batch will be sent again");
                        cloud_backoff(c, NULL);
                        return;
                }
                size_t n_rej = rej ? json_array_size(rej) : 0;
                if (n_rej > q->n_frames)
                        n_rej = q->n_frames;
                count_rejections(c, rej, q->n_frames);
                json_decref(rej);
                /* Accepted and rejected frames both leave: rejected ones are never retried. */
                r = spool_delete(c->db, q->first_id, q->last_id, &count, &bytes);
                if (r < 0) {
                        log_error_errno(r, "Failed to remove an uploaded batch from the spool: %m (%s)",
                                        db_errmsg(c->db));
                        cloud_backoff(c, NULL);
                        return;
                }
                c->spool->pending -= count <= c->spool->pending ? count : c->spool->pending;
                c->spool->bytes -= bytes <= c->spool->bytes ? bytes : c->spool->bytes;
                c->counters.uploaded += q->n_frames - n_rej;
                c->counters.rejected += n_rej;
                c->counters.batches++;
                c->counters.last_success = (int64_t) (now_realtime_usec() / 1000000);
                c->counters.last_error[0] = '\0';
                c->failures = 0;
                if (n_rej > 0)
                        log_notice("The cloud rejected %zu of %u frames (dropped, see cloud.rejected)", n_rej,
                                   q->n_frames);
                return;
        }
        if (r == 0 && status == 401) {
                int k = q->retried_401 ? -EKEYREJECTED : cloud_on_401(c, q, resp_);
                /* Once at once (a new nonce, a newer token): the same frames, a new signature;
                 * a second 401 in a row backs off. */
                if (k > 0 && cloud_send_batch(c) >= 0 && c->status_req)
                        c->status_req->retried_401 = true;
                else if (k < 0 || (k > 0 && !c->status_req)) {
                        if (k < 0 && q->retried_401)
                                set_last_error(c, "upload answered HTTP 401 twice in a row");
                        cloud_backoff(c, resp_->retry_after);
                }
                return;
        }
        if (r < 0 || status == 408 || status == 429 || status >= 500 || status < 200 ||
            (status >= 300 && status < 400) || (status > 200 && status < 300)) {
                if (r < 0)
                        set_last_error(c, "upload failed: %s", resp_->error_text);
                else
                        set_last_error(c, "upload answered HTTP %ld", status);
                log_warning("Upload of %u frames failed (%s), retrying later", q->n_frames, c->counters.last_error);
                cloud_backoff(c, resp_->retry_after);
                return;
        }
        /* Any other 4xx: the cloud will never take this batch. Keep it aside, do not loop. */
        char reason[CLOUD_REFUSAL_REASON_MAX];
        cloud_refusal_reason(status, resp_->body, resp_->body_len, reason, sizeof reason);
        r = spool_move_aside(c->db, q->first_id, q->last_id, status, reason, &count, &bytes);
        if (r < 0) {
                log_error_errno(r, "Failed to move a refused batch aside: %m (%s)", db_errmsg(c->db));
                cloud_backoff(c, NULL);
                return;
        }
        c->spool->pending -= count <= c->spool->pending ? count : c->spool->pending;
        c->spool->bytes -= bytes <= c->spool->bytes ? bytes : c->spool->bytes;
        c->counters.moved_aside += count;
        set_last_error(c, "a batch was refused (%s) and moved aside", reason);
        log_event(LOG_ERR, 0, IOTHUB_MID_BATCH_MOVED_ASIDE, NULL, NULL,
                  "The cloud refused a batch of %" PRIu64 " frames (%s); moved aside, not retried", count, reason);
}

/* ---- the device list ---- */

static int build_devices_body(struct cloud *c, char **ret, size_t *ret_len) {
        json_t *arr = json_array(), *o;
        char *s;

        if (!arr)
                return -ENOMEM;
        for (size_t i = 0; i < registry_count(c->registry); i++) {
                struct bulb *b = registry_get(c->registry, i);
                json_t *jwk = NULL;
                int r = verify_key_to_jwk(b->key, &jwk);
                if (r < 0) {
                        json_decref(arr);
                        return r;
                }
                (void) json_array_append_new(arr, json_pack("{s:s,s:o,s:b}", "id", b->id, "jwk", jwk, "revoked",
                                                            b->revoked));
        }
        o = json_pack("{s:o}", "devices", arr);
        s = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (!s)
                return -ENOMEM;
        *ret = s;
        *ret_len = strlen(s);
        return 0;
}

void cloud_send_devices(struct cloud *c);
void cloud_send_devices(struct cloud *c) {
        _cleanup_free_ char *path = NULL;
        char *body = NULL;
        size_t len = 0;
        int r;

        r = build_devices_body(c, &body, &len);
        if (r >= 0) {
                path = strdup_printf("/v1/hubs/%s/devices", c->conf->hub.id);
                if (!path) {
                        free(body);
                        r = -ENOMEM;
                }
        }
        if (r >= 0)
                r = req_start(c, REQ_DEVICES, "PUT", path, body, len, 0, &c->devices_req);
        if (r >= 0)
                c->devices_req->devices_gen = c->devices_gen;
        if (r < 0)
                log_error_errno(r, "Failed to send the list of bulbs: %m");
}

static void on_refreshed_kick(void *userdata, int r) {
        if (r >= 0)
                cloud_maybe_send(userdata);
}

static void on_devices_done(struct cloud *c, struct cloud_req *q, const struct http_response *resp) {
        long status = resp->status;
        int r = resp->error;
        uint32_t rnd = 0;

        if (r == 0 && status >= 200 && status < 300) {
                c->devices_401_retried = false;
                if (q->devices_gen != c->devices_gen) {
                        /* The list changed while this one was on its way: send the new one. */
                        c->devices_failures = 0;
                        c->devices_backoff_until = 0;
                        return;
                }
                c->devices_dirty = false;
                c->devices_failures = 0;
                c->devices_backoff_until = 0;
                /* The timer may still be armed for the list's backoff: the batch schedule is
                 * worked out afresh (cloud_maybe_send keeps an armed timer). */
                (void) sd_event_source_set_enabled(c->batch_timer, SD_EVENT_OFF);
                r = db_meta_set(c->db, META_DEVICES_DIRTY, "0");
                if (r < 0)
                        log_warning_errno(r, "Failed to record the bulb list as sent: %m");
                log_info("Sent the list of bulbs to the cloud (%zu now)", registry_count(c->registry));
                return;
        }
        /* Again at once (the list is still dirty), but only once in a row. */
        if (r == 0 && status == 401 && cloud_on_401(c, q, resp) > 0 && !c->devices_401_retried) {
                c->devices_401_retried = true;
                return;
        }
        if (r < 0)
                set_last_error(c, "sending the bulb list failed: %s", resp->error_text);
        else
                set_last_error(c, "sending the bulb list answered HTTP %ld", status);
        log_warning("%s; retrying later", c->counters.last_error);
        c->devices_failures++;
        (void) random_bytes(&rnd, sizeof rnd);
        c->devices_backoff_until = now_monotonic_usec() + cloud_backoff_ms(c->devices_failures, rnd) * 1000;
        arm_batch_timer(c, c->devices_backoff_until);
}

void cloud_devices_changed(struct cloud *c) {
        int r;

        if (!c)
                return;
        c->devices_dirty = true;
        c->devices_gen++;
        if (c->counters.backoff_until <= now_monotonic_usec())
                (void) sd_event_source_set_enabled(c->batch_timer, SD_EVENT_OFF);
        /* Persisted: a restart before the PUT still sends it. */
        r = db_meta_set(c->db, META_DEVICES_DIRTY, "1");
        if (r < 0)
                log_warning_errno(r, "Failed to record a change of the bulb list: %m");
        c->devices_backoff_until = 0;
        cloud_maybe_send(c);
}

/* ---- register ---- */

/* A registration request (the challenge or the registration itself) is the caller's: its handle
 * goes to *ret, and a retry after a 401 writes the new one there (register_slot). */
static void register_req_own(struct cloud *c, struct cloud_req *q,
                             void (*done)(void *userdata, long status, const char *message), void *userdata,
                             struct cloud_call **ret) {
        q->register_done = done;
        q->register_userdata = userdata;
        q->register_slot = ret;
        q->next = c->others;
        c->others = q;
        *ret = (struct cloud_call *) q;
}

/* q becomes POST /v1/hubs/<id> with the hub's JWK, and the "attestation" object when there is one
 * (stolen in every case). Returns 0 or a negative errno (q is the caller's then). */
static int register_go(struct cloud *c, struct cloud_req *q, json_t *attestation) {
        _cleanup_free_ char *path = NULL;
        json_t *jwk = NULL, *o;
        char *body;
        int r;

        r = signer_key_jwk(c->signer, &jwk);
        if (r < 0) {
                json_decref(attestation);
                return r;
        }
        o = attestation ? json_pack("{s:o, s:o}", "jwk", jwk, "attestation", attestation)
                        : json_pack("{s:o}", "jwk", jwk);
        body = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        path = strdup_printf("/v1/hubs/%s", c->conf->hub.id);
        if (!body || !path) {
                free(body);
                return -ENOMEM;
        }
        q->attest = false;
        return req_sign(q, "POST", path, body, strlen(body));
}

/* The registration without evidence, as a new request for the caller of q (its handle follows). */
static int register_send(struct cloud *c, json_t *attestation,
                         void (*done)(void *userdata, long status, const char *message), void *userdata,
                         struct cloud_call **ret) {
        struct cloud_req *q = NULL;
        int r;

        r = req_new(c, REQ_REGISTER, 0, &q);
        if (r < 0) {
                json_decref(attestation);
                return r;
        }
        r = register_go(c, q, attestation);
        if (r < 0) {
                req_free(q);
                return r;
        }
        register_req_own(c, q, done, userdata, ret);
        return 0;
}

/* The signer answered ATTEST_BEGIN for q: the challenge request goes (iothub-protocol(7)
 * "Attestation": POST /v1/hubs/<id>/attest/challenge {"jwk","ek_cert","ak_public"});
 * on_http_done() has the signer answer the challenge, then the registration goes. */
static void on_attest_begun(void *userdata, int r, const struct signer_reply *p) {
        struct cloud_req *q = userdata;
        struct cloud *c = q->cloud;
        _cleanup_free_ char *path = NULL;
        json_t *evidence = NULL, *jwk = NULL, *o = NULL;
        char *body = NULL;
        char text[320];

        if (r >= 0)
                evidence = p->evidence ? json_loads(p->evidence, JSON_REJECT_DUPLICATES, NULL) : NULL;
        q->attest_op = signer_op_free(q->attest_op); /* p lives in it: parsed above */
        if (r == -ENOENT && c->conf->cloud.attestation == ATTEST_AUTO) {
                log_info("Registering without attestation: the TPM holds no EK certificate");
                r = register_go(c, q, NULL);
                if (r < 0) {
                        (void) snprintf(text, sizeof text, "cannot register: %s", strerror(-r));
                        req_fail(q, r, text);
                }
                return;
        }
        if (r < 0) {
                const char *why = signer_last_error(c->signer);
                set_last_error(c, "attestation: %s", why ? why : strerror(-r));
                log_error_errno(r, "Failed to prepare the attestation: %s", why ? why : strerror(-r));
                (void) snprintf(text, sizeof text, "%s", c->counters.last_error);
                req_fail(q, r, text);
                return;
        }
        if (!json_is_object(evidence)) {
                json_decref(evidence);
                set_last_error(c, "attestation: the signer's evidence is not a JSON object");
                (void) snprintf(text, sizeof text, "%s", c->counters.last_error);
                req_fail(q, -EBADMSG, text);
                return;
        }
        r = signer_key_jwk(c->signer, &jwk);
        if (r >= 0) {
                o = json_pack("{s:o}", "jwk", jwk);
                if (!o || json_object_update(o, evidence) < 0)
                        r = -ENOMEM;
        }
        json_decref(evidence);
        body = r >= 0 ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        path = strdup_printf("/v1/hubs/%s/attest/challenge", c->conf->hub.id);
        if (r >= 0 && (!body || !path))
                r = -ENOMEM;
        if (r >= 0) {
                size_t len = strlen(body);
                r = req_sign(q, "POST", path, TAKE_PTR(body), len);
        }
        if (r < 0) {
                free(body);
                (void) snprintf(text, sizeof text, "cannot register: %s", strerror(-r));
                req_fail(q, r, text);
        }
}

/* The key is known: q's first request is asked for. With a TPM key the signer's ATTEST_BEGIN
 * first (7 TPM commands, about 0.5 s at a chip's pace), on the client's one connection, which the
 * answer will use too (the signer keeps the attestation state per connection). Returns 0 or a
 * negative errno (q is the caller's then). */
static int register_begin(struct cloud *c, struct cloud_req *q) {
        enum attest_mode mode = c->conf->cloud.attestation;

        q->wait_key = false;
        if (mode != ATTEST_OFF && streq_ptr(signer_key_backend(c->signer), "tpm")) {
                q->attest = true;
                return signer_attest_begin(c->signer, on_attest_begun, q, &q->attest_op);
        }
        if (mode == ATTEST_ON) {
                set_last_error(c, "[cloud] attestation = on needs a TPM key ([key] backend = tpm)");
                return log_error_errno(-EOPNOTSUPP, "%s", c->counters.last_error);
        }
        return register_go(c, q, NULL); /* a file key has no evidence to give */
}

int cloud_register(struct cloud *c, void (*done)(void *userdata, long status, const char *message),
                   void *userdata, struct cloud_call **ret) {
        struct cloud_req *q = NULL;
        bool wait_key = false;
        int r;

        /* One registration at a time: an attested one holds the attestation state of the signer's
         * connection from its ATTEST_BEGIN to its ATTEST_ANSWER, which a second one would replace. */
        for (q = c->others; q; q = q->next)
                if (q->kind == REQ_REGISTER)
                        return -EBUSY;
        /* The user may just have run 'iothubctl key init': hub.c asks the signer now rather than at
         * its next retry, asynchronously (-EINPROGRESS: cloud_key_ready() or cloud_key_failed()
         * follows). */
        r = c->ev.need_key ? c->ev.need_key(c->ev.userdata) : -ENOKEY;
        if (r == -EINPROGRESS)
                wait_key = true;
        else if (r < 0)
                return r;
        else if (!c->signer)
                return -ENOKEY;
        if (!cloud_have_token(c) && (cloud_uses_oauth(c) || cloud_load_token(c) < 0))
                return -ENOKEY;
        r = req_new(c, REQ_REGISTER, 0, &q);
        if (r < 0)
                return r;
        q->wait_key = wait_key;
        if (!wait_key) {
                r = register_begin(c, q);
                if (r < 0) {
                        req_free(q);
                        return r;
                }
        }
        register_req_own(c, q, done, userdata, ret);
        return 0;
}

/* The signer answered the cloud's challenge for q (ATTEST_ANSWER): the registration goes, with
 * the attestation. */
static void on_attest_answered(void *userdata, int r, const struct signer_reply *a) {
        struct cloud_req *q = userdata;
        struct cloud *c = q->cloud;
        json_t *attestation = NULL;
        char message[320];

        if (r >= 0)
                attestation = a->answer ? json_loads(a->answer, JSON_REJECT_DUPLICATES, NULL) : NULL;
        q->attest_op = signer_op_free(q->attest_op); /* a lives in it: parsed above */
        if (r >= 0 && !json_is_object(attestation))
                r = -EBADMSG;
        if (r >= 0) {
                r = register_go(c, q, TAKE_PTR(attestation));
                if (r >= 0)
                        return;
                (void) snprintf(message, sizeof message, "cannot register: %s", strerror(-r));
                req_fail(q, r, message);
                return;
        }
        json_decref(attestation);
        (void) snprintf(message, sizeof message, "attestation failed: %s",
                        r == -EBADMSG                  ? "the cloud's attestation challenge is malformed"
                        : signer_last_error(c->signer) ? signer_last_error(c->signer)
                                                       : strerror(-r));
        set_last_error(c, "%s", message);
        log_error_errno(r, "Registration: %s", message);
        req_fail(q, r, message);
}

/* The cloud answered the challenge request q: the signer activates and certifies (asynchronously,
 * a new request in q's place: the caller's handle follows, as after a 401), then the registration
 * goes. Returns 0 when that is under way, else a negative errno and a message for the waiter. */
static int register_answer(struct cloud *c, struct cloud_req *q, const struct http_response *resp,
                           char *message, size_t size) {
        struct cloud_req *n = NULL;
        int r;

        if (resp->error == 0 && resp->status == 404 && c->conf->cloud.attestation == ATTEST_AUTO) {
                /* A cloud of contract 1.0, without attestation: register as before. */
                log_info("The cloud has no attestation endpoint; registering without attestation");
                r = register_send(c, NULL, q->register_done, q->register_userdata, q->register_slot);
                if (r < 0)
                        (void) snprintf(message, size, "cannot register: %s", strerror(-r));
                return r;
        }
        if (resp->error < 0) {
                (void) snprintf(message, size, "%s", resp->error_text);
                return resp->error;
        }
        if (resp->status != 200) {
                char reason[CLOUD_REFUSAL_REASON_MAX];

                cloud_refusal_reason(resp->status, resp->body, resp->body_len, reason, sizeof reason);
                (void) snprintf(message, size, "the cloud refused the attestation challenge: %s", reason);
                return -EPROTO;
        }
        /* The signer parses the challenge (its limits: ATTEST_ANSWER_MAX, attest.h) and answers
         * it with the TPM, on the connection of the ATTEST_BEGIN. */
        r = resp->body_len > 0 ? req_new(c, REQ_REGISTER, 0, &n) : -EBADMSG;
        if (r >= 0)
                r = signer_attest_answer(c->signer, resp->body, resp->body_len, on_attest_answered, n, &n->attest_op);
        if (r < 0) {
                req_free(n);
                (void) snprintf(message, size, "attestation failed: %s",
                                r == -EBADMSG || r == -EINVAL ? "the cloud's attestation challenge is malformed"
                                                              : strerror(-r));
                set_last_error(c, "%s", message);
                log_error_errno(r, "Registration: %s", message);
                return r;
        }
        register_req_own(c, n, q->register_done, q->register_userdata, q->register_slot);
        return 0;
}

/* Registrations that waited for the hub key (hub.c asked the signer for it): with it they go on,
 * without it they end. Each pass starts over: an ending one leaves c->others. */
static void register_key_news(struct cloud *c, int error, const char *why) {
        char text[320];
        bool again = true;

        while (again) {
                again = false;
                for (struct cloud_req *q = c->others; q; q = q->next) {
                        int r;

                        if (q->kind != REQ_REGISTER || !q->wait_key)
                                continue;
                        r = error < 0 ? error : register_begin(c, q);
                        if (r >= 0)
                                continue;
                        if (error < 0)
                                (void) snprintf(text, sizeof text, "no hub key: %s", why ? why : strerror(-r));
                        else
                                (void) snprintf(text, sizeof text, "cannot register: %s", strerror(-r));
                        req_fail(q, r, text);
                        again = true;
                        break;
                }
        }
}

void cloud_key_failed(struct cloud *c, int error, const char *why) {
        if (c)
                register_key_news(c, error < 0 ? error : -ENOKEY, why);
}

/* ---- requests for other modules ---- */

bool cloud_ready(struct cloud *c) {
        /* Registered too: before that the cloud cannot check a request (and would answer
         * 401, which would send the sign-in refreshing for nothing). */
        return c && c->signer && cloud_have_token(c) && c->registered;
}

int cloud_request(struct cloud *c, const char *method, const char *path, const char *body, long timeout_s,
                  void (*done)(void *userdata, int r, long status, const char *body, size_t len),
                  void *userdata, struct cloud_call **ret) {
        struct cloud_req *q = NULL;
        char *copy = NULL;
        int r;

        if (!c || !done)
                return -EINVAL;
        if (!cloud_ready(c))
                return -ENOKEY;
        if (body && !(copy = strdup(body)))
                return -ENOMEM;
        r = req_start(c, REQ_OTHER, method, path, copy, body ? strlen(body) : 0, timeout_s, &q);
        if (r < 0)
                return r;
        q->call_done = done;
        q->call_userdata = userdata;
        q->next = c->others;
        c->others = q;
        if (ret)
                *ret = (struct cloud_call *) q;
        return 0;
}

void cloud_request_cancel(struct cloud_call *call) {
        struct cloud_req *q = (struct cloud_req *) call;

        if (!q)
                return;
        for (struct cloud_req **p = &q->cloud->others; *p; p = &(*p)->next)
                if (*p == q) {
                        *p = q->next;
                        break;
                }
        req_free(q);
}

/* ---- completion ---- */

/* After a 401 to a status batch, the token was refreshed (r = 0) or could not be. */
static void on_refreshed(void *userdata, int r) {
        struct cloud *c = userdata;

        c->refreshing = false;
        if (r < 0) {
                set_last_error(c, "upload answered HTTP 401 and the token could not be refreshed");
                cloud_backoff(c, NULL);
                return;
        }
        if (!c->status_req && cloud_send_batch(c) >= 0 && c->status_req)
                c->status_req->retried_401 = true;
}

/* The one place for a 401, whatever the request (PROTOCOL.md 3: refresh once, retry). With
 * OAuth, oauth_unauthorized() decides (a resource-server DPoP nonce, one refresh per token,
 * else back off); with the fixed token of [cloud] bearer_token_file, the file is read again.
 * Returns > 0 when the request may go again at once, 0 when it goes again after a refresh
 * (status batches: on_refreshed; the list of bulbs and other requests: at their next turn), a
 * negative errno when it must back off. */
static int cloud_on_401(struct cloud *c, struct cloud_req *q, const struct http_response *resp) {
        int r;

        if (!cloud_uses_oauth(c)) {
                r = cloud_load_token(c);
                return r < 0 ? r : 1;
        }
        if (!c->oauth)
                return -ENOKEY;
        if (q->kind == REQ_STATUS) {
                r = oauth_unauthorized(c->oauth, q->token_gen, resp->www_authenticate, resp->dpop_nonce,
                                       on_refreshed, c);
                if (r == 0)
                        c->refreshing = true;
        } else
                r = oauth_unauthorized(c->oauth, q->token_gen, resp->www_authenticate, resp->dpop_nonce,
                                       on_refreshed_kick, c);
        if (r < 0)
                set_last_error(c, "the cloud answers HTTP 401: %s", oauth_last_error(c->oauth));
        return r;
}

static void on_http_done(void *userdata, const struct http_response *resp) {
        struct cloud_req *q = userdata;
        struct cloud *c = q->cloud;

        q->http = NULL; /* http frees it after this call */
        if (resp->error == 0 && resp->status >= 200 && resp->status < 300)
                oauth_resource_ok(c->oauth);
        switch (q->kind) {
        case REQ_STATUS:
                c->status_req = NULL;
                on_status_done(c, q, resp);
                break;
        case REQ_DEVICES:
                c->devices_req = NULL;
                on_devices_done(c, q, resp);
                break;
        case REQ_OTHER:
                for (struct cloud_req **p = &c->others; *p; p = &(*p)->next)
                        if (*p == q) {
                                *p = q->next;
                                break;
                        }
                /* A 401 is about the token, whoever asked: the next try gets what it needs (the
                 * caller backs off by its own schedule meanwhile). */
                if (resp->error == 0 && resp->status == 401)
                        (void) cloud_on_401(c, q, resp);
                q->call_done(q->call_userdata, 0, resp->error < 0 ? 0 : resp->status, resp->body, resp->body_len);
                break;
        case REQ_REGISTER: {
                char message[256];
                for (struct cloud_req **p = &c->others; *p; p = &(*p)->next)
                        if (*p == q) {
                                *p = q->next;
                                break;
                        }
                /* A 401 that a new DPoP nonce or a newer token answers: once more, at once, for
                 * the same caller (the new request is at the head of c->others). */
                if (resp->error == 0 && resp->status == 401 && !q->retried_401 && cloud_on_401(c, q, resp) > 0 &&
                    cloud_register(c, q->register_done, q->register_userdata, q->register_slot) >= 0) {
                        c->others->retried_401 = true;
                        break;
                }
                if (q->attest && !(resp->error == 0 && resp->status == 401)) {
                        int k = register_answer(c, q, resp, message, sizeof message);
                        if (k >= 0) {
                                c->others->retried_401 = q->retried_401;
                                break;
                        }
                        if (q->register_done)
                                q->register_done(q->register_userdata, k, message);
                        break;
                }
                if (resp->error < 0)
                        (void) snprintf(message, sizeof message, "%s", resp->error_text);
                else if (resp->status == 200 || resp->status == 201) {
                        (void) snprintf(message, sizeof message, "registered");
                        c->registered = true;
                        if (c->ev.registered)
                                c->ev.registered(c->ev.userdata);
                        if (db_meta_set(c->db, META_REGISTERED, "1") < 0)
                                log_warning("Failed to record the registration; run 'iothubctl register' again after a restart");
                        c->counters.last_error[0] = '\0';
                }
                else if (resp->status == 409)
                        (void) snprintf(message, sizeof message, "this hub is registered to another account");
                else {
                        /* The cloud's "error" (e.g. attestation_required, attest_replay) says why. */
                        char reason[CLOUD_REFUSAL_REASON_MAX];

                        cloud_refusal_reason(resp->status, resp->body, resp->body_len, reason, sizeof reason);
                        (void) snprintf(message, sizeof message, "the cloud answered %s", reason);
                }
                if (q->register_done)
                        q->register_done(q->register_userdata, resp->error < 0 ? resp->error : resp->status,
                                         message);
                break;
        }
        }
        free(q);
        cloud_maybe_send(c);
}

/* hub.c learnt the hub key from the signer (it is the one place that asks): what waited for it
 * goes. */
void cloud_key_ready(struct cloud *c, struct signer *s) {
        if (!c)
                return;
        c->signer = s;
        if (strncmp(c->counters.last_error, "no hub key", strlen("no hub key")) == 0)
                c->counters.last_error[0] = '\0';
        register_key_news(c, 0, NULL);
        cloud_maybe_send(c);
}

int cloud_new(sd_event *e, const struct iothub_conf *conf, struct db *db, struct registry *registry,
              struct http *http, struct oauth *oauth, struct spool_counts *spool, const struct cloud_events *ev,
              struct cloud **ret) {
        _cleanup_free_ char *dirty = NULL;
        struct cloud *c;
        size_t n;
        int r;

        if (!conf->cloud.url) {
                *ret = NULL;
                return 0;
        }
        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->event = e;
        c->conf = conf;
        c->db = db;
        c->registry = registry;
        c->http = http;
        c->oauth = oauth;
        c->spool = spool;
        if (ev)
                c->ev = *ev;
        c->rejected_reasons = json_object();
        c->base_url = strdup(conf->cloud.url);
        if (!c->rejected_reasons || !c->base_url) {
                r = -ENOMEM;
                goto fail;
        }
        n = strlen(c->base_url);
        while (n > 0 && c->base_url[n - 1] == '/')
                c->base_url[--n] = '\0';
        /* Accuracy 1 us: sd-event's default (0 = 250 ms) would add up to a quarter second to
         * every batch that waits for batch_max_delay_ms, and between batches when draining. */
        r = sd_event_add_time(e, &c->batch_timer, CLOCK_MONOTONIC, UINT64_MAX, 1, on_batch_timer, c);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->batch_timer, SD_EVENT_OFF);
        if (r < 0)
                goto fail;

        {
                _cleanup_free_ char *reg = NULL;
                c->registered = db_meta_get(db, META_REGISTERED, &reg) >= 0 && streq(reg, "1");
        }
        /* The bulb list is dirty after a change not yet sent, and on the very first start. */
        r = db_meta_get(db, META_DEVICES_DIRTY, &dirty);
        c->devices_dirty = r == -ENOENT ? true : (r >= 0 && streq(dirty, "1"));

        if (cloud_uses_oauth(c)) {
                if (conf->cloud.bearer_token_file)
                        log_warning("[cloud] bearer_token_file is ignored: [oauth] signs the hub in");
        } else {
                if (conf->cloud.bearer_token_file)
                        log_warning("Using the fixed access token of [cloud] bearer_token_file, for tests and "
                                    "development only");
                r = cloud_load_token(c);
                if (r < 0)
                        log_error("Cloud uploads wait: %s", c->counters.last_error);
        }
        if (!c->signer && !c->counters.last_error[0])
                set_last_error(c, "no hub key yet");
        *ret = c;
        return 0;
fail:
        cloud_free(c);
        return r;
}

void cloud_free(struct cloud *c) {
        if (!c)
                return;
        /* Its waits for a refresh: the answer must not reach a freed relay. */
        oauth_unauthorized_cancel(c->oauth, c);
        req_free(c->status_req);
        req_free(c->devices_req);
        while (c->others) {
                struct cloud_req *q = c->others;
                c->others = q->next;
                if (q->kind == REQ_REGISTER && q->register_done)
                        q->register_done(q->register_userdata, -ECANCELED, "the daemon is stopping");
                req_free(q);
        }
        sd_event_source_disable_unref(c->batch_timer);
        erase_and_freep_str(&c->token);
        json_decref(c->rejected_reasons);
        free(c->base_url);
        free(c);
}

int cloud_status_json(struct cloud *c, json_t *o) {
        uint64_t now = now_monotonic_usec();
        json_t *cl;

        if (!c) {
                (void) json_object_set_new(o, "cloud", json_pack("{s:b}", "configured", 0));
                return 0;
        }
        cl = json_pack("{s:b,s:I,s:I,s:I,s:O,s:I,s:s*,s:I}", "configured", 1, "uploaded",
                       (json_int_t) c->counters.uploaded, "batches", (json_int_t) c->counters.batches,
                       "rejected", (json_int_t) c->counters.rejected, "rejected_reasons", c->rejected_reasons,
                       "last_success", (json_int_t) c->counters.last_success, "last_error",
                       c->counters.last_error[0] ? c->counters.last_error : NULL, "backoff_s",
                       (json_int_t) (c->counters.backoff_until > now
                                             ? (c->counters.backoff_until - now + 999999) / 1000000
                                             : 0));
        if (!cl)
                return -ENOMEM;
        (void) json_object_set_new(cl, "devices_synced", json_boolean(!c->devices_dirty));
        (void) json_object_set_new(cl, "registered", json_boolean(c->registered));
        (void) json_object_set_new(o, "cloud", cl);
        return 0;
}

void cloud_status_line(struct cloud *c, char *buf, size_t len) {
        uint64_t now = now_monotonic_usec();

        if (!c)
                (void) snprintf(buf, len, "cloud not configured");
        else if (c->counters.backoff_until > now)
                (void) snprintf(buf, len, "cloud retry in %" PRIu64 " s (%s)",
                                (c->counters.backoff_until - now) / 1000000, c->counters.last_error);
        else if (c->counters.last_error[0])
                (void) snprintf(buf, len, "cloud: %s", c->counters.last_error);
        else if (c->counters.last_success)
                (void) snprintf(buf, len, "last upload at %" PRId64, c->counters.last_success);
        else
                (void) snprintf(buf, len, "no upload yet");
}
