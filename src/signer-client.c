/* SPDX-License-Identifier: MIT */
/* iothubd's client of iothub-signer (signer.h has the contract): the requests and answers of
 * signer-proto.h over the channel client of chan-client.c (one connection on the loop, the
 * queue, the resend after a lost connection, the -EBUSY backoff, the timeouts). Nothing in
 * iothubd waits for the signer outside the loop (issue 13), and the attestation pair reaches the
 * attestation state the signer keeps for this one connection. The signer builds every answer
 * afresh (a new nonce, a new signature), so a repeated request is harmless. */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iothub/chan-client.h"
#include "iothub/log.h"
#include "iothub/signer.h"
#include "iothub/signer-proto.h"

struct signer_op {
        struct chan_op base; /* the request, kept for a resend */
        signer_done_t done;
        void *userdata;
        /* The answer: the reply's strings point into these. */
        char *strs[_SIGNER_TAG_MAX];
        struct signer_reply reply;
};
_Static_assert(offsetof(struct signer_op, base) == 0, "an op is its chan_op");

struct signer {
        const struct iothub_conf *conf;
        struct signer_events ev;
        struct chan_client *chan;
        int connect_errno;  /* the last failure to connect, logged once per kind */
        struct signer_op *status_op; /* the client's own STATUS request */
        json_t *remote_status;      /* the signer's last STATUS answer */
        uint64_t signatures;
        char last_error[256];
        char key_id[SIGNER_KEY_ID_LEN + 1];
        json_t *key_jwk;
        char key_backend[8];
        bool key_failed; /* the last KEY_INFO was refused */
};

/* ---- ops ---- */

static void op_reply_clear(struct signer_op *op) {
        for (size_t i = 0; i < ELEMENTSOF(op->strs); i++)
                if (op->strs[i]) {
                        erase_and_freep_str(&op->strs[i]);
                }
        json_decref(op->reply.status);
        op->reply = (struct signer_reply){};
}

struct signer_op *signer_op_free(struct signer_op *op) {
        if (!op)
                return NULL;
        chan_op_cancel(&op->base); /* wipes the request: it may carry a token */
        op_reply_clear(op);
        free(op);
        return NULL;
}

static_assert(SIGNER_PRIO_HIGH == SIGNER_WIRE_PRIO_HIGH && SIGNER_PRIO_LOW == SIGNER_WIRE_PRIO_LOW,
              "enum signer_prio is SIGNER_TAG_PRIO's value");

/* Starts an op: the message header is written; the caller adds fields and submits. In the
 * client's queue a command signature goes first (a bulb waits for it now), then prio's order
 * (signer.h); the signer keeps the same order among all its connections (hubkey.h). */
static int op_new(struct signer *s, unsigned code, enum signer_prio prio, struct signer_op **ret) {
        unsigned order = code == SIGNER_OP_SIGN_COMMAND ? 0 : 1 + (unsigned) prio;
        struct signer_op *op;
        int r;

        if ((unsigned) prio >= _SIGNER_PRIO_MAX)
                return -EINVAL;
        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        r = chan_op_begin(s->chan, &op->base, code, order);
        if (r < 0) {
                free(op);
                return r;
        }
        *ret = op;
        return 0;
}

/* Ends the message (the codec checks it against every rule the signer applies) and queues it. */
static int op_submit(struct signer *s, struct signer_op *op, signer_done_t done, void *userdata,
                     struct signer_op **ret) {
        int r;

        op->done = done;
        op->userdata = userdata;
        r = chan_op_submit(s->chan, &op->base, SIGNER_OP_TIMEOUT_USEC);
        if (r < 0) {
                signer_op_free(op);
                return r;
        }
        *ret = op;
        return 0;
}

static bool op_is_signature(unsigned code) {
        return code == SIGNER_OP_SIGN_HTTP || code == SIGNER_OP_SIGN_DPOP || code == SIGNER_OP_SIGN_COMMAND;
}

static void set_last_error(struct signer *s, const char *fmt, ...) _printf_(2, 3);
static void set_last_error(struct signer *s, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(s->last_error, sizeof s->last_error, fmt, ap);
        va_end(ap);
}

/* The op ended (chan-client.c unlinked it first, so that done() may free it, queue others or
 * cancel others). */
static void on_finish(void *userdata, struct chan_op *base, int r) {
        struct signer *s = userdata;
        struct signer_op *op = (struct signer_op *) base; /* its first member */
        unsigned code = base->code;

        if (code == SIGNER_OP_KEY_INFO)
                s->key_failed = r < 0;
        if (code == SIGNER_OP_KEY_INFO && r < 0) {
                /* Nothing of ours to add: the signer's own words come with its STATUS answer. */
                s->last_error[0] = '\0';
                signer_refresh_status(s);
        } else if (op_is_signature(code) || code == SIGNER_OP_KEY_INFO || code == SIGNER_OP_ATTEST_BEGIN ||
                   code == SIGNER_OP_ATTEST_ANSWER) {
                if (r >= 0) {
                        if (op_is_signature(code))
                                s->signatures++;
                        s->last_error[0] = '\0';
                } else if (r != -ECANCELED) {
                        set_last_error(s, "signer: %s", strerror(-r));
                        /* Its own last_error says more (a TPM error decoded): ask for it. */
                        signer_refresh_status(s);
                }
        }
        if (op->done)
                op->done(op->userdata, r, r >= 0 ? &op->reply : NULL);
}

static int reply_str(struct signer_op *op, const struct signer_msg *m, unsigned tag, const char **ret) {
        int r;

        if (!signer_msg_has(m, tag))
                return 0;
        r = signer_msg_strdup(m, tag, &op->strs[tag]);
        if (r < 0)
                return r;
        *ret = op->strs[tag];
        return 0;
}

static int status_json(const struct signer_msg *m, json_t **ret) {
        static const struct {
                unsigned tag;
                const char *name;
        } counters[] = {
                { SIGNER_TAG_SIGNATURES, "signatures" },       { SIGNER_TAG_REFUSED_POLICY, "refused_policy" },
                { SIGNER_TAG_REFUSED_RATE, "refused_rate" },   { SIGNER_TAG_REFUSED_PEER, "refused_peer" },
                { SIGNER_TAG_MALFORMED, "malformed" },         { SIGNER_TAG_TPM_ERRORS, "tpm_errors" },
                { SIGNER_TAG_CANCELLED, "cancelled" },
        };
        _cleanup_free_ char *last = NULL;
        json_t *o = json_object();

        if (!o)
                return -ENOMEM;
        for (size_t i = 0; i < ELEMENTSOF(counters); i++) {
                uint64_t v;
                if (signer_msg_u64(m, counters[i].tag, &v) >= 0)
                        (void) json_object_set_new(o, counters[i].name, json_integer((json_int_t) v));
        }
        if (signer_msg_strdup(m, SIGNER_TAG_LAST_ERROR, &last) >= 0)
                (void) json_object_set_new(o, "last_error", json_string(last));
        *ret = o;
        return 0;
}

/* Copies what the answer carries into op->reply. */
static int reply_fill(struct signer_op *op, const struct signer_msg *m) {
        struct signer_reply *p = &op->reply;
        int r = 0;

        if ((r = reply_str(op, m, SIGNER_TAG_KEY_ID, &p->key_id)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_JWK, &p->jwk)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_BACKEND, &p->backend)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_CONTENT_DIGEST, &p->content_digest)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_SIGNATURE_INPUT, &p->signature_input)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_SIGNATURE, &p->signature)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_PROOF, &p->proof)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_JWS, &p->jws)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_ACCESS_TOKEN, &p->access_token)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_REFRESH_TOKEN, &p->refresh_token)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_TOKEN_TYPE, &p->token_type)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_SCOPE, &p->scope)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_EVIDENCE, &p->evidence)) < 0 ||
            (r = reply_str(op, m, SIGNER_TAG_ANSWER, &p->answer)) < 0)
                return r;
        (void) signer_msg_u64(m, SIGNER_TAG_EXPIRES_AT, &p->expires_at);
        if (op->base.code == SIGNER_OP_STATUS)
                return status_json(m, &p->status);
        return 0;
}

static int key_cache(struct signer *s, const struct signer_reply *p);

/* chan-client.c's answer hook: a successful answer to base. */
static int on_answer(void *userdata, struct chan_op *base, const struct tlv_msg *m) {
        struct signer_op *op = (struct signer_op *) base;
        int r = reply_fill(op, m);

        if (r >= 0 && base->code == SIGNER_OP_KEY_INFO)
                r = key_cache(userdata, &op->reply);
        return r;
}

/* Keeps the key of a KEY_INFO answer; says so when it is another than the last one. */
static int key_cache(struct signer *s, const struct signer_reply *p) {
        json_t *jwk;
        bool had = s->key_id[0], changed;

        if (!p->key_id || strlen(p->key_id) != SIGNER_KEY_ID_LEN || !p->jwk || !p->backend)
                return -EBADMSG;
        jwk = json_loads(p->jwk, JSON_REJECT_DUPLICATES, NULL);
        if (!json_is_object(jwk)) {
                json_decref(jwk);
                return -EBADMSG;
        }
        changed = !streq(p->key_id, s->key_id);
        json_decref(s->key_jwk);
        s->key_jwk = jwk;
        (void) snprintf(s->key_id, sizeof s->key_id, "%s", p->key_id);
        (void) snprintf(s->key_backend, sizeof s->key_backend, "%s", p->backend);
        if (had && changed && s->ev.key_changed)
                s->ev.key_changed(s->ev.userdata);
        return 0;
}

const char *signer_key_id(const struct signer *s) {
        return s && s->key_id[0] ? s->key_id : NULL;
}

int signer_key_jwk(const struct signer *s, json_t **ret) {
        if (!s || !s->key_jwk)
                return -ENOKEY;
        *ret = json_deep_copy(s->key_jwk);
        return *ret ? 0 : -ENOMEM;
}

const char *signer_key_backend(const struct signer *s) {
        return s && s->key_backend[0] ? s->key_backend : NULL;
}

/* ---- the connection ---- */

static void on_connected(void *userdata) {
        struct signer *s = userdata;
        struct chan_client_counters n;

        chan_client_counters(s->chan, &n);
        s->last_error[0] = '\0';
        if (s->connect_errno || n.reconnects > 0)
                log_info("Connected to the signer at %s", s->conf->signer.socket);
        s->connect_errno = 0;
        /* Its counters, for status: asked at every connection. */
        signer_refresh_status(s);
        if (s->ev.status_changed)
                s->ev.status_changed(s->ev.userdata);
}

static void on_disconnected(void *userdata, int error, bool was) {
        struct signer *s = userdata;
        struct chan_client_counters n;

        chan_client_counters(s->chan, &n);
        if (was) {
                log_event(LOG_WARNING, error, IOTHUB_MID_KEY_UNAVAILABLE, NULL, "signer_lost",
                          "Lost the connection to the signer (%s), %u requests wait for it", strerror(-error),
                          n.pending);
                if (s->ev.status_changed)
                        s->ev.status_changed(s->ev.userdata);
        } else if (error != s->connect_errno) {
                log_event(LOG_WARNING, error, IOTHUB_MID_KEY_UNAVAILABLE, NULL, "signer_unreachable",
                          "Cannot reach the signer at %s: %s; trying again", s->conf->signer.socket,
                          strerror(-error));
        }
        s->connect_errno = error;
        set_last_error(s, "signer unreachable at %s: %s", s->conf->signer.socket, strerror(-error));
}

/* ---- the calls ---- */

int signer_new(sd_event *e, const struct iothub_conf *c, const struct signer_events *ev, struct signer **ret) {
        struct signer *s = calloc(1, sizeof *s);
        int r;

        if (!s)
                return -ENOMEM;
        s->conf = c;
        if (ev)
                s->ev = *ev;
        r = chan_client_new(e,
                            &(struct chan_client_params){ .proto = &signer_proto,
                                                          .socket = c->signer.socket,
                                                          .queue_max = SIGNER_QUEUE_MAX,
                                                          .inflight_max = SIGNER_INFLIGHT_MAX,
                                                          .retry_busy = true,
                                                          .cancel_op = SIGNER_OP_CANCEL,
                                                          .reconnect_min_ms = SIGNER_RECONNECT_MIN_MS,
                                                          .reconnect_max_ms = SIGNER_RECONNECT_MAX_MS,
                                                          .busy_min_ms = SIGNER_BUSY_MIN_MS,
                                                          .busy_max_ms = SIGNER_BUSY_MAX_MS },
                            &(struct chan_client_events){ .answer = on_answer,
                                                          .finish = on_finish,
                                                          .connected = on_connected,
                                                          .disconnected = on_disconnected,
                                                          .userdata = s },
                            &s->chan);
        if (r < 0) {
                free(s);
                return r;
        }
        *ret = s;
        return 0;
}

struct signer *signer_free(struct signer *s) {
        if (!s)
                return NULL;
        s->status_op = signer_op_free(s->status_op);
        /* Cancelled: their owners still free them, and no done() runs. */
        chan_client_free(s->chan);
        json_decref(s->remote_status);
        json_decref(s->key_jwk);
        free(s);
        return NULL;
}

int signer_key_info(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_KEY_INFO, SIGNER_PRIO_HIGH, &op);

        return r < 0 ? r : op_submit(s, op, done, userdata, ret);
}

static int add_opt_str(struct signer_buf *b, unsigned tag, const char *v) {
        return v ? signer_msg_add_str(b, tag, v) : 0;
}

int signer_sign_http(struct signer *s, enum signer_prio prio, const char *method, const char *target_uri,
                     const char *authorization, const void *body, size_t body_len, signer_done_t done,
                     void *userdata, struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_SIGN_HTTP, prio, &op);

        if (r < 0)
                return r;
        (void) signer_msg_add_str(&op->base.req, SIGNER_TAG_METHOD, method);
        (void) signer_msg_add_str(&op->base.req, SIGNER_TAG_TARGET_URI, target_uri);
        (void) add_opt_str(&op->base.req, SIGNER_TAG_AUTHORIZATION, authorization);
        if (body)
                (void) signer_msg_add(&op->base.req, SIGNER_TAG_BODY, body, body_len);
        (void) signer_msg_add_u8(&op->base.req, SIGNER_TAG_PRIO, (uint8_t) prio);
        /* A failed add is reported by signer_msg_end() in op_submit(). */
        return op_submit(s, op, done, userdata, ret);
}

static int build_dpop(struct signer *s, enum signer_prio prio, const char *method, const char *url, const char *ath,
                      const char *nonce, struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_SIGN_DPOP, prio, &op);

        if (r < 0)
                return r;
        /* Absent means high (signer-proto.h): only a low one is said. */
        if (prio != SIGNER_PRIO_HIGH)
                (void) signer_msg_add_u8(&op->base.req, SIGNER_TAG_PRIO, (uint8_t) prio);
        (void) signer_msg_add_str(&op->base.req, SIGNER_TAG_METHOD, method);
        (void) signer_msg_add_str(&op->base.req, SIGNER_TAG_URL, url);
        (void) add_opt_str(&op->base.req, SIGNER_TAG_ATH, ath);
        (void) add_opt_str(&op->base.req, SIGNER_TAG_NONCE, nonce && nonce[0] ? nonce : NULL);
        *ret = op;
        return 0;
}

int signer_sign_dpop(struct signer *s, enum signer_prio prio, const char *method, const char *url, const char *ath,
                     const char *nonce, signer_done_t done, void *userdata, struct signer_op **ret) {
        struct signer_op *op;
        int r = build_dpop(s, prio, method, url, ath, nonce, &op);

        return r < 0 ? r : op_submit(s, op, done, userdata, ret);
}

int signer_sign_command(struct signer *s, const char *dev, const char *cmd_id, uint64_t iat, uint64_t exp,
                        const char *set_json, const char *cloud_jws, signer_done_t done, void *userdata,
                        struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_SIGN_COMMAND, SIGNER_PRIO_HIGH, &op);

        if (r < 0)
                return r;
        (void) signer_msg_add_str(&op->base.req, SIGNER_TAG_DEV, dev);
        (void) signer_msg_add_str(&op->base.req, SIGNER_TAG_CMD_ID, cmd_id);
        (void) signer_msg_add_u64(&op->base.req, SIGNER_TAG_IAT, iat);
        (void) signer_msg_add_u64(&op->base.req, SIGNER_TAG_EXP, exp);
        (void) signer_msg_add_str(&op->base.req, SIGNER_TAG_SET, set_json);
        (void) add_opt_str(&op->base.req, SIGNER_TAG_CLOUD_JWS, cloud_jws);
        return op_submit(s, op, done, userdata, ret);
}

int signer_tokens_get(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_TOKENS_GET, SIGNER_PRIO_HIGH, &op);

        if (r < 0)
                return r;
        return op_submit(s, op, done, userdata, ret);
}

int signer_tokens_put(struct signer *s, const char *access_token, const char *refresh_token,
                      const char *token_type, const char *scope, uint64_t expires_at, signer_done_t done,
                      void *userdata, struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_TOKENS_PUT, SIGNER_PRIO_HIGH, &op);

        if (r < 0)
                return r;
        (void) signer_msg_add_str(&op->base.req, SIGNER_TAG_ACCESS_TOKEN, access_token);
        (void) add_opt_str(&op->base.req, SIGNER_TAG_REFRESH_TOKEN, refresh_token);
        (void) signer_msg_add_str(&op->base.req, SIGNER_TAG_TOKEN_TYPE, token_type);
        (void) add_opt_str(&op->base.req, SIGNER_TAG_SCOPE, scope);
        (void) signer_msg_add_u64(&op->base.req, SIGNER_TAG_EXPIRES_AT, expires_at);
        return op_submit(s, op, done, userdata, ret);
}

int signer_tokens_erase(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_TOKENS_ERASE, SIGNER_PRIO_HIGH, &op);

        return r < 0 ? r : op_submit(s, op, done, userdata, ret);
}

int signer_attest_begin(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_ATTEST_BEGIN, SIGNER_PRIO_HIGH, &op);

        return r < 0 ? r : op_submit(s, op, done, userdata, ret);
}

int signer_attest_answer(struct signer *s, const char *challenge, size_t len, signer_done_t done, void *userdata,
                         struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_ATTEST_ANSWER, SIGNER_PRIO_HIGH, &op);

        if (r < 0)
                return r;
        (void) signer_msg_add(&op->base.req, SIGNER_TAG_CHALLENGE, challenge, len);
        return op_submit(s, op, done, userdata, ret);
}

int signer_status(struct signer *s, signer_done_t done, void *userdata, struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_STATUS, SIGNER_PRIO_LOW, &op);

        return r < 0 ? r : op_submit(s, op, done, userdata, ret);
}

static void on_status(void *userdata, int r, const struct signer_reply *reply) {
        struct signer *s = userdata;
        const char *last;

        json_t *st = r >= 0 ? json_incref(reply->status) : NULL;

        s->status_op = signer_op_free(s->status_op); /* reply lives in it: taken above */
        if (!st)
                return;
        json_decref(s->remote_status);
        s->remote_status = st;
        /* The signer's own words for the last failure (a TPM error decoded), no secret. */
        last = json_string_value(json_object_get(s->remote_status, "last_error"));
        if (last && last[0] && (s->last_error[0] || s->key_failed))
                set_last_error(s, "signer: %s", last);
        if (s->ev.status_changed)
                s->ev.status_changed(s->ev.userdata);
}

void signer_refresh_status(struct signer *s) {
        if (!s || s->status_op)
                return;
        (void) signer_status(s, on_status, s, &s->status_op);
}

const struct signer_reply *signer_op_reply(const struct signer_op *op) {
        return op && op->base.state == CHAN_OP_DONE ? &op->reply : NULL;
}

/* ---- status ---- */

uint64_t signer_signatures(const struct signer *s) {
        return s ? s->signatures : 0;
}

const char *signer_last_error(const struct signer *s) {
        return s && s->last_error[0] ? s->last_error : NULL;
}

bool signer_is_connected(const struct signer *s) {
        return s && chan_client_is_connected(s->chan);
}

int signer_status_json(const struct signer *s, json_t *o) {
        struct chan_client_counters n;
        json_t *j;

        if (!s)
                return 0;
        chan_client_counters(s->chan, &n);
        j = json_pack("{s:b,s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:s*,s:O*}", "connected",
                      chan_client_is_connected(s->chan), "socket", s->conf->signer.socket, "reconnects",
                      (json_int_t) n.reconnects, "pending", (json_int_t) n.pending, "resent", (json_int_t) n.resent,
                      "busy_retries", (json_int_t) n.busy_retries, "timeouts", (json_int_t) n.timeouts, "cancelled",
                      (json_int_t) n.cancels_sent, "signatures", (json_int_t) s->signatures, "last_error",
                      s->last_error[0] ? s->last_error : NULL, "remote", s->remote_status);
        if (!j)
                return -ENOMEM;
        return json_object_set_new(o, "signer", j) < 0 ? -ENOMEM : 0;
}
