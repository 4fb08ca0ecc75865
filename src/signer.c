/* SPDX-License-Identifier: MIT */
/* iothub-signer(8): the one process that opens the TPM (the hub key) and the sealed OAuth tokens,
 * and signs for iothubd over a unix socket only what its policy allows (issue 14). It parses
 * nothing but the fixed format of signer-proto.h; it builds what it signs from the request's
 * fields (httpsig.c, dpop.c, command.c) and never signs bytes it was handed.
 *
 * One sd-event loop, the channels' server (chanserver.h): the listening socket (from systemd,
 * iothub-signer.socket, or --listen), at most SIGNER_CONN_MAX connections, each checked with
 * SO_PEERCRED against [signer] client_user and command_user, each of which has its op set
 * (signer_policy_op_allowed(): another op is answered -EPERM and never run), at most
 * SIGNER_OUT_MAX of answers queued and SIGNER_INFLIGHT_MAX requests in flight before reading
 * stops. Signatures go through hubkey's queue (hubkey_sign_async(): one TPM operation at a time,
 * by priority), so a slow TPM never blocks the loop where hubkey avoids it; token and
 * attestation ops are synchronous TPM calls (a few a day). A client's CANCEL takes a signature
 * it gave up on out of that queue before its turn (op_cancel()). */
#include <inttypes.h>
#include <pwd.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/crypto.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>

#include "commands-internal.h"
#include "iothub/attest.h"
#include "iothub/chanserver.h"
#include "iothub/conf.h"
#include "iothub/dpop.h"
#include "iothub/httpsig.h"
#include "iothub/hubkey.h"
#include "iothub/jws.h"
#include "iothub/log.h"
#include "iothub/signer-policy.h"
#include "iothub/signer-proto.h"
#include "iothub/tokenstore.h"

#define EXIT_CONFIG 78

#define SIGNER_CONN_MAX 8
#define SIGNER_INFLIGHT_MAX 64          /* requests of one connection waiting for the TPM */
#define SIGNER_OUT_MAX (1024 * 1024)    /* answers queued on one connection before reading stops */
#define SIGNER_KEY_RETRY_USEC (1000 * 1000) /* a missing key is looked for again at most this often */
#define SIGNER_LOG_WINDOW_USEC (10 * 1000 * 1000)
#define SIGNER_LOG_BURST 5

struct signer;
struct conn;

struct req {
        struct conn *conn;
        struct req *next;
        uint32_t id;
        unsigned op;
        struct hubkey_op *kop;
        struct httpsig_pending hp; /* SIGN_HTTP */
        char *input;               /* SIGN_DPOP, SIGN_COMMAND: the JWS signing input, then the JWS */
        size_t input_len;
};

/* The signer's state of one connection (chanserver.h has the rest). */
struct conn {
        struct signer *s;
        struct chan_conn *cc;
        struct tlv_buf *out; /* chan_conn_out(cc): the answers */
        unsigned roles;        /* enum signer_role: the peer's op set */
        struct req *reqs;
        struct attest *attest; /* ATTEST_BEGIN done, ATTEST_ANSWER awaited */
};

struct signer {
        sd_event *event;
        struct iothub_conf *conf;
        struct signer_policy policy;
        struct chan_server *server;
        uid_t client_uid, command_uid;
        char peer_rule[128];     /* for the refusal line */
        struct hubkey *key;
        int key_errno;           /* of the last hubkey_open(), 0 when open */
        uint64_t key_tried_usec;
        struct signer_bucket bucket;
        struct ratelimit log_rate, log_policy, log_role;
        struct {
                uint64_t signatures, refused_policy, refused_rate, tpm_errors;
                uint64_t cancelled; /* signatures taken out of the queue by CANCEL */
        } n;
        char last_error[256];
};

static void set_last_error(struct signer *s, const char *fmt, ...) _printf_(2, 3);
static void set_last_error(struct signer *s, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(s->last_error, sizeof s->last_error, fmt, ap);
        va_end(ap);
}

/* ---- the key ---- */

static int signer_key(struct signer *s, struct hubkey **ret) {
        _cleanup_free_ char *err = NULL;
        uint64_t now = now_monotonic_usec();
        int r;

        if (s->key) {
                *ret = s->key;
                return 0;
        }
        /* Looked for again (iothubctl key init, a TPM back) at most once a second. */
        if (s->key_errno < 0 && now - s->key_tried_usec < SIGNER_KEY_RETRY_USEC)
                return s->key_errno;
        s->key_tried_usec = now;
        r = hubkey_open(s->conf, &s->key, &err);
        if (r < 0) {
                if (r != s->key_errno)
                        log_event(r == -ENOENT ? LOG_NOTICE : LOG_ERR, r, IOTHUB_MID_KEY_UNAVAILABLE, NULL, NULL,
                                  "No hub key: %s", err ? err : strerror(-r));
                if (r != -ENOENT) {
                        s->n.tpm_errors++;
                        set_last_error(s, "hub key: %s", err ? err : strerror(-r));
                }
                s->key_errno = r;
                return r;
        }
        r = hubkey_attach_event(s->key, s->event);
        if (r < 0) {
                hubkey_free(s->key);
                s->key = NULL;
                return r;
        }
        s->key_errno = 0;
        log_event(LOG_INFO, 0, IOTHUB_MID_KEY_OPENED, NULL, NULL, "Hub key %s opened (%s)", hubkey_id(s->key),
                  key_backend_to_string(hubkey_backend(s->key)));
        *ret = s->key;
        return 0;
}

/* ---- connections ---- */


static struct req *req_free(struct req *q) {
        if (!q)
                return NULL;
        hubkey_op_free(q->kop);
        httpsig_pending_done(&q->hp);
        if (q->input) {
                OPENSSL_cleanse(q->input, q->input_len);
                free(q->input);
        }
        free(q);
        return NULL;
}

static void req_detach(struct req *q) {
        struct conn *c = q->conn;

        for (struct req **p = &c->reqs; *p; p = &(*p)->next)
                if (*p == q) {
                        *p = q->next;
                        break;
                }
        chan_conn_release(c->cc);
}

/* An error answer, or the start of a successful one (the caller adds its fields and ends it). */

/* Ends a successful answer; if it cannot be built (out of memory, a value over its limit), the
 * client gets the error instead. */
static void answer_end(struct conn *c, uint32_t id, unsigned op) {
        int r = chan_answer_end(c->cc, id, op);

        if (r < 0)
                set_last_error(c->s, "%s answer could not be built: %s", signer_op_to_string(op), strerror(-r));
}

static void tpm_failed(struct signer *s, int r, const char *what) {
        const char *kerr = s->key ? hubkey_last_error(s->key) : NULL;

        s->n.tpm_errors++;
        set_last_error(s, "%s: %s", what, kerr ?: strerror(-r));
        log_warning_errno(r, "%s failed: %s", what, kerr ?: strerror(-r));
}

static void on_http_signed(void *userdata, int r, const uint8_t *sig) {
        struct req *q = userdata;
        struct conn *c = q->conn;
        struct httpsig_headers h = {};

        /* sig lives in q->kop, freed with q at the end (done() may free its op). */
        req_detach(q);
        if (r >= 0)
                r = httpsig_complete(&q->hp, sig, &h);
        if (r < 0) {
                tpm_failed(c->s, r, "SIGN_HTTP");
                chan_answer_error(c->cc, q->id, q->op, r);
        } else {
                c->s->n.signatures++;
                if (chan_answer_begin(c->cc, q->id, q->op, 0) >= 0) {
                        if (h.content_digest)
                                (void) signer_msg_add_str(c->out, SIGNER_TAG_CONTENT_DIGEST, h.content_digest);
                        (void) signer_msg_add_str(c->out, SIGNER_TAG_SIGNATURE_INPUT, h.signature_input);
                        (void) signer_msg_add_str(c->out, SIGNER_TAG_SIGNATURE, h.signature);
                        answer_end(c, q->id, q->op);
                }
        }
        httpsig_headers_done(&h);
        req_free(q);
}

/* SIGN_DPOP and SIGN_COMMAND: q->input is a JWS signing input with room for the signature. */
static void on_jws_signed(void *userdata, int r, const uint8_t *sig) {
        struct req *q = userdata;
        struct conn *c = q->conn;

        req_detach(q);
        if (r < 0) {
                tpm_failed(c->s, r, signer_op_to_string(q->op));
                chan_answer_error(c->cc, q->id, q->op, r);
        } else {
                jws_compact_finish(q->input, q->input_len, sig);
                c->s->n.signatures++;
                if (chan_answer_begin(c->cc, q->id, q->op, 0) >= 0) {
                        (void) signer_msg_add_str(c->out,
                                                  q->op == SIGNER_OP_SIGN_DPOP ? SIGNER_TAG_PROOF : SIGNER_TAG_JWS,
                                                  q->input);
                        answer_end(c, q->id, q->op);
                }
        }
        req_free(q);
}

static int req_new(struct conn *c, const struct signer_msg *m, struct req **ret) {
        struct req *q = calloc(1, sizeof(*q));

        if (!q)
                return -ENOMEM;
        q->conn = c;
        q->id = m->id;
        q->op = m->op;
        *ret = q;
        return 0;
}

static void req_attach(struct req *q) {
        q->next = q->conn->reqs;
        q->conn->reqs = q;
        chan_conn_hold(q->conn->cc);
}

static int policy_refused(struct conn *c, const struct signer_msg *m, const char *why) {
        c->s->n.refused_policy++;
        set_last_error(c->s, "%s refused: %s", signer_op_to_string(m->op), why);
        if (chan_log_allowed(&c->s->log_policy))
                log_event(LOG_WARNING, 0, IOTHUB_MID_SIGNER_POLICY_REFUSED, NULL, why, "Refused %s: %s",
                          signer_op_to_string(m->op), why);
        return -EPERM;
}

/* The bucket covers every operation that uses the TPM. */
static int rate_take(struct conn *c, const struct signer_msg *m) {
        struct signer *s = c->s;

        if (signer_bucket_take(&s->bucket, s->conf->signer.rate_per_s, s->conf->signer.burst, now_monotonic_usec()))
                return 0;
        s->n.refused_rate++;
        if (chan_log_allowed(&s->log_rate))
                log_event(LOG_WARNING, 0, IOTHUB_MID_SIGNER_RATE_LIMITED, NULL, NULL,
                          "Over [signer] rate_per_s = %u, burst = %u: %s answered busy (%" PRIu64 " so far)",
                          s->conf->signer.rate_per_s, s->conf->signer.burst, signer_op_to_string(m->op),
                          s->n.refused_rate);
        return -EBUSY;
}

/* A text field as a C string (the codec has checked it has no NUL), or NULL when absent. */
static int field_str(const struct signer_msg *m, unsigned tag, char **ret) {
        int r = signer_msg_strdup(m, tag, ret);
        if (r == -ENOENT) {
                *ret = NULL;
                return 0;
        }
        return r;
}

/* The wire's PRIO (signer-proto.h: 0 high, absent high, 1 low) as the key's queue order; a
 * command signature's own order (HUBKEY_PRIO_COMMAND) is never asked for, it is SIGN_COMMAND's. */
static int field_prio(const struct signer_msg *m, enum hubkey_prio *ret) {
        uint8_t prio = SIGNER_WIRE_PRIO_HIGH;
        int r = signer_msg_u8(m, SIGNER_TAG_PRIO, &prio);

        if (r < 0 && r != -ENOENT)
                return r;
        if (prio != SIGNER_WIRE_PRIO_HIGH && prio != SIGNER_WIRE_PRIO_LOW)
                return -EINVAL;
        *ret = prio == SIGNER_WIRE_PRIO_LOW ? HUBKEY_PRIO_LOW : HUBKEY_PRIO_HIGH;
        return 0;
}

static int op_sign_http(struct conn *c, const struct signer_msg *m) {
        _cleanup_free_ char *method = NULL, *uri = NULL;
        _cleanup_erase_str_ char *auth = NULL;
        const char *why = NULL;
        struct hubkey *k;
        struct req *q;
        enum hubkey_prio prio;
        int r;

        if ((r = field_str(m, SIGNER_TAG_METHOD, &method)) < 0 || (r = field_str(m, SIGNER_TAG_TARGET_URI, &uri)) < 0 ||
            (r = field_str(m, SIGNER_TAG_AUTHORIZATION, &auth)) < 0 || (r = field_prio(m, &prio)) < 0)
                return r;
        if (signer_policy_http(&c->s->policy, method, uri, auth, &why) < 0)
                return policy_refused(c, m, why);
        r = rate_take(c, m);
        if (r < 0)
                return r;
        r = signer_key(c->s, &k);
        if (r < 0)
                return r;
        r = req_new(c, m, &q);
        if (r < 0)
                return r;
        /* The signer computes the body's digest itself (RFC 9530), from the body it is shown. */
        r = httpsig_prepare(k, method, uri, auth, m->f[SIGNER_TAG_BODY].present ? m->f[SIGNER_TAG_BODY].data : NULL,
                            m->f[SIGNER_TAG_BODY].len, (int64_t) (now_realtime_usec() / 1000000), &q->hp);
        if (r >= 0)
                r = hubkey_sign_async(k, prio, q->hp.base, q->hp.base_len, on_http_signed, q,
                                      &q->kop);
        if (r < 0) {
                req_free(q);
                return r;
        }
        req_attach(q);
        return 1;
}

static int op_sign_dpop(struct conn *c, const struct signer_msg *m) {
        _cleanup_free_ char *method = NULL, *url = NULL, *ath = NULL, *nonce = NULL;
        const char *why = NULL;
        enum hubkey_prio prio;
        struct hubkey *k;
        json_t *jwk = NULL;
        struct req *q;
        int r;

        if ((r = field_str(m, SIGNER_TAG_METHOD, &method)) < 0 || (r = field_str(m, SIGNER_TAG_URL, &url)) < 0 ||
            (r = field_str(m, SIGNER_TAG_ATH, &ath)) < 0 || (r = field_str(m, SIGNER_TAG_NONCE, &nonce)) < 0 ||
            (r = field_prio(m, &prio)) < 0)
                return r;
        if (signer_policy_dpop(&c->s->policy, method, url, ath, nonce, &why) < 0)
                return policy_refused(c, m, why);
        r = rate_take(c, m);
        if (r < 0)
                return r;
        r = signer_key(c->s, &k);
        if (r < 0)
                return r;
        r = hubkey_public_jwk(k, &jwk);
        if (r < 0)
                return r;
        r = req_new(c, m, &q);
        if (r < 0) {
                json_decref(jwk);
                return r;
        }
        r = dpop_prepare(jwk, method, url, ath, nonce, (int64_t) (now_realtime_usec() / 1000000), &q->input,
                         &q->input_len);
        json_decref(jwk);
        if (r >= 0)
                r = hubkey_sign_async(k, prio, q->input, q->input_len, on_jws_signed, q, &q->kop);
        if (r < 0) {
                req_free(q);
                return r;
        }
        req_attach(q);
        return 1;
}

static int op_sign_command(struct conn *c, const struct signer_msg *m) {
        _cleanup_free_ char *dev = NULL, *id = NULL, *set = NULL, *cloud = NULL;
        struct signer *s = c->s;
        struct command_set cs = {};
        char payload[COMMAND_PAYLOAD_MAX];
        const char *why = NULL;
        uint64_t iat = 0, exp = 0;
        struct hubkey *k;
        struct req *q;
        int n, r;

        if ((r = field_str(m, SIGNER_TAG_DEV, &dev)) < 0 || (r = field_str(m, SIGNER_TAG_CMD_ID, &id)) < 0 ||
            (r = field_str(m, SIGNER_TAG_SET, &set)) < 0 || (r = field_str(m, SIGNER_TAG_CLOUD_JWS, &cloud)) < 0 ||
            (r = signer_msg_u64(m, SIGNER_TAG_IAT, &iat)) < 0 || (r = signer_msg_u64(m, SIGNER_TAG_EXP, &exp)) < 0)
                return r;
        if (signer_policy_command(&s->policy, (int64_t) (now_realtime_usec() / 1000000), dev, id, iat, exp, set,
                                  set ? strlen(set) : 0, cloud, &cs, &why) < 0)
                return policy_refused(c, m, why);
        r = rate_take(c, m);
        if (r < 0)
                return r;
        r = signer_key(s, &k);
        if (r < 0)
                return r;
        /* The payload of PROTOCOL.md 2, rebuilt from the parsed set; the vendor's JWS goes in only
         * when the policy verified it (a command key is configured), never bytes unchecked. */
        n = command_payload(s->conf->hub.id, dev, id, (int64_t) iat, (int64_t) exp, &cs, payload, sizeof payload);
        if (n >= 0 && s->policy.command_key && cloud)
                n = command_payload_add_cloud(payload, (size_t) n, sizeof payload, cloud);
        if (n < 0)
                return policy_refused(c, m, "the command does not fit the payload of PROTOCOL.md 2");
        r = req_new(c, m, &q);
        if (r < 0)
                return r;
        r = command_jws_prepare(hubkey_id(k), payload, (size_t) n, &q->input, &q->input_len);
        if (r >= 0)
                r = hubkey_sign_async(k, HUBKEY_PRIO_COMMAND, q->input, q->input_len, on_jws_signed, q, &q->kop);
        if (r < 0) {
                req_free(q);
                return r;
        }
        req_attach(q);
        return 1;
}

static int op_key_info(struct conn *c, const struct signer_msg *m) {
        _cleanup_free_ char *jwk_s = NULL;
        struct hubkey *k;
        json_t *jwk = NULL;
        int r;

        r = signer_key(c->s, &k);
        if (r < 0)
                return r;
        r = hubkey_public_jwk(k, &jwk);
        if (r < 0)
                return r;
        jwk_s = json_dumps(jwk, JSON_COMPACT);
        json_decref(jwk);
        if (!jwk_s)
                return -ENOMEM;
        r = chan_answer_begin(c->cc, m->id, m->op, 0);
        if (r < 0)
                return r;
        (void) signer_msg_add_str(c->out, SIGNER_TAG_KEY_ID, hubkey_id(k));
        (void) signer_msg_add_str(c->out, SIGNER_TAG_JWK, jwk_s);
        (void) signer_msg_add_str(c->out, SIGNER_TAG_BACKEND, key_backend_to_string(hubkey_backend(k)));
        answer_end(c, m->id, m->op);
        return 1;
}

static int op_tokens(struct conn *c, const struct signer_msg *m) {
        struct signer *s = c->s;
        _cleanup_free_ char *err = NULL;
        struct oauth_tokens t = {};
        struct hubkey *k;
        uint64_t exp = 0;
        int r;

        r = rate_take(c, m);
        if (r < 0)
                return r;
        if (m->op == SIGNER_OP_TOKENS_ERASE) {
                r = tokenstore_erase(s->conf);
                if (r < 0)
                        return r;
                log_info("Tokens erased");
                chan_answer_error(c->cc, m->id, m->op, 0);
                return 1;
        }
        r = signer_key(s, &k);
        if (r < 0)
                return r;
        if (m->op == SIGNER_OP_TOKENS_PUT) {
                if ((r = field_str(m, SIGNER_TAG_ACCESS_TOKEN, &t.access_token)) < 0 ||
                    (r = field_str(m, SIGNER_TAG_REFRESH_TOKEN, &t.refresh_token)) < 0 ||
                    (r = field_str(m, SIGNER_TAG_TOKEN_TYPE, &t.token_type)) < 0 ||
                    (r = field_str(m, SIGNER_TAG_SCOPE, &t.scope)) < 0 ||
                    (r = signer_msg_u64(m, SIGNER_TAG_EXPIRES_AT, &exp)) < 0)
                        goto out;
                if (exp > INT64_MAX) {
                        r = -EINVAL;
                        goto out;
                }
                t.expires_at = (int64_t) exp;
                r = tokenstore_save(s->conf, k, &t, &err);
                if (r < 0) {
                        set_last_error(s, "TOKENS_PUT: %s", err ?: strerror(-r));
                        log_warning_errno(r, "Failed to store the tokens: %s", err ?: strerror(-r));
                        goto out;
                }
                chan_answer_error(c->cc, m->id, m->op, 0);
                r = 1;
                goto out;
        }
        r = tokenstore_load(s->conf, k, &t, &err);
        if (r < 0) {
                if (r != -ENOENT) {
                        set_last_error(s, "TOKENS_GET: %s", err ?: strerror(-r));
                        log_warning_errno(r, "Failed to load the tokens: %s", err ?: strerror(-r));
                }
                goto out;
        }
        r = chan_answer_begin(c->cc, m->id, m->op, 0);
        if (r < 0)
                goto out;
        (void) signer_msg_add_str(c->out, SIGNER_TAG_ACCESS_TOKEN, t.access_token);
        if (t.refresh_token)
                (void) signer_msg_add_str(c->out, SIGNER_TAG_REFRESH_TOKEN, t.refresh_token);
        (void) signer_msg_add_str(c->out, SIGNER_TAG_TOKEN_TYPE, t.token_type);
        if (t.scope)
                (void) signer_msg_add_str(c->out, SIGNER_TAG_SCOPE, t.scope);
        (void) signer_msg_add_u64(c->out, SIGNER_TAG_EXPIRES_AT, t.expires_at > 0 ? (uint64_t) t.expires_at : 0);
        answer_end(c, m->id, m->op);
        r = 1;
out:
        oauth_tokens_done(&t);
        return r;
}

static int op_attest(struct conn *c, const struct signer_msg *m) {
        struct signer *s = c->s;
        _cleanup_free_ char *err = NULL, *text = NULL;
        struct attest_challenge ch;
        struct hubkey *k;
        json_t *o = NULL;
        int r;

        /* The op sequence: ATTEST_ANSWER only after this connection's ATTEST_BEGIN, once. */
        if (m->op == SIGNER_OP_ATTEST_ANSWER && !c->attest)
                return -EPROTO;
        r = rate_take(c, m);
        if (r < 0)
                return r;
        r = signer_key(s, &k);
        if (r < 0)
                return r;
        if (m->op == SIGNER_OP_ATTEST_BEGIN) {
                attest_free(c->attest);
                c->attest = NULL;
                r = attest_begin(k, &c->attest, &err);
                if (r < 0) {
                        if (r != -EOPNOTSUPP && r != -ENOENT)
                                tpm_failed(s, r, "ATTEST_BEGIN");
                        return r;
                }
                o = json_object();
                if (!o)
                        return -ENOMEM;
                r = attest_challenge_json(c->attest, o);
        } else {
                r = attest_parse_challenge((const char *) m->f[SIGNER_TAG_CHALLENGE].data,
                                           m->f[SIGNER_TAG_CHALLENGE].len, &ch);
                if (r < 0)
                        return -EINVAL; /* the cloud's bytes, relayed: no reason to close */
                r = attest_answer(c->attest, k, &ch, &o, &err);
                attest_free(c->attest);
                c->attest = NULL;
                if (r < 0) {
                        if (r != -ENOKEY)
                                tpm_failed(s, r, "ATTEST_ANSWER");
                        return r;
                }
        }
        if (r >= 0) {
                text = json_dumps(o, JSON_COMPACT);
                r = text ? 0 : -ENOMEM;
        }
        json_decref(o);
        if (r < 0)
                return r;
        r = chan_answer_begin(c->cc, m->id, m->op, 0);
        if (r < 0)
                return r;
        (void) signer_msg_add_str(c->out, m->op == SIGNER_OP_ATTEST_BEGIN ? SIGNER_TAG_EVIDENCE : SIGNER_TAG_ANSWER,
                                  text);
        answer_end(c, m->id, m->op);
        return 1;
}

static int op_status(struct conn *c, const struct signer_msg *m) {
        struct signer *s = c->s;
        int r;

        r = chan_answer_begin(c->cc, m->id, m->op, 0);
        if (r < 0)
                return r;
        (void) signer_msg_add_u64(c->out, SIGNER_TAG_SIGNATURES, s->n.signatures);
        (void) signer_msg_add_u64(c->out, SIGNER_TAG_REFUSED_POLICY, s->n.refused_policy);
        (void) signer_msg_add_u64(c->out, SIGNER_TAG_REFUSED_RATE, s->n.refused_rate);
        (void) signer_msg_add_u64(c->out, SIGNER_TAG_REFUSED_PEER, chan_server_refused_peer(s->server));
        (void) signer_msg_add_u64(c->out, SIGNER_TAG_MALFORMED, chan_server_malformed(s->server));
        (void) signer_msg_add_u64(c->out, SIGNER_TAG_TPM_ERRORS, s->n.tpm_errors);
        if (s->last_error[0])
                (void) signer_msg_add_str(c->out, SIGNER_TAG_LAST_ERROR, s->last_error);
        (void) signer_msg_add_u64(c->out, SIGNER_TAG_CANCELLED, s->n.cancelled);
        answer_end(c, m->id, m->op);
        return 1;
}

/* ---- CANCEL ---- */

/* Which requests a CANCEL may end, op by op (signer-proto.h, iothub-signer(8) CANCEL).
 *   - The signatures: they write nothing and leave nothing half-done, and one nobody waits for
 *     is only TPM time (about 70 ms on a chip) taken from the requests queued behind it. They
 *     end while they wait in hubkey's queue; once at the TPM they finish (one TPM operation in
 *     flight, and an ESYS command under way cannot be aborted safely).
 *   - TOKENS_PUT and TOKENS_ERASE write the sealed state: a PUT may carry the only copy of a
 *     new refresh token (RFC 6749 6: the server may issue one, and the old one is then
 *     discarded); an ERASE is a sign-out, never half-done. They run to their end.
 *   - ATTEST_BEGIN and ATTEST_ANSWER: a registration runs to its end, as the uplink's REGISTER
 *     does, and the pair's state is this connection's.
 *   - KEY_INFO, TOKENS_GET, STATUS read only; like the four above they are answered within the
 *     dispatch that read them (synchronous), so no CANCEL ever finds one out. Listed so that an
 *     op made asynchronous one day keeps this rule and a new op has to be decided here. */
static bool op_is_cancellable(unsigned op) {
        switch ((enum signer_opcode) op) {
        case SIGNER_OP_SIGN_HTTP:
        case SIGNER_OP_SIGN_DPOP:
        case SIGNER_OP_SIGN_COMMAND:
                return true;
        case SIGNER_OP_TOKENS_PUT:
        case SIGNER_OP_TOKENS_ERASE:
        case SIGNER_OP_ATTEST_BEGIN:
        case SIGNER_OP_ATTEST_ANSWER:
        case SIGNER_OP_KEY_INFO:
        case SIGNER_OP_TOKENS_GET:
        case SIGNER_OP_STATUS:
        case SIGNER_OP_CANCEL:
        case _SIGNER_OP_MAX:
                break;
        }
        return false;
}

/* The client gave up on its request of this id (its timeout passed, or its owner cancelled it).
 * A signature still in hubkey's queue leaves it: req_free() frees its hubkey op (never signed,
 * done() never runs), the prepared input and the headers, and the request is answered -ECANCELED
 * and released (req_detach()), which the client counts and drops. Anything else of that id (a
 * signature at the TPM, an op that runs to its end) is answered as usual, the client drops that
 * answer too. CANCEL itself is never answered (a refusal would be an answer too: it is in both
 * op sets); an id with nothing out (answered meanwhile, never sent) is ignored. */
static int op_cancel(struct conn *c, const struct signer_msg *m) {
        for (struct req *q = c->reqs; q; q = q->next) {
                if (q->id != m->id || !op_is_cancellable(q->op))
                        continue;
                if (!hubkey_op_is_queued(q->kop)) {
                        log_debug("Request %" PRIu32 " (%s) cancelled by the client at the TPM: it finishes",
                                  q->id, signer_op_to_string(q->op));
                        continue;
                }
                c->s->n.cancelled++;
                log_debug("Request %" PRIu32 " (%s) cancelled by the client before its turn at the TPM",
                          q->id, signer_op_to_string(q->op));
                chan_answer_error(c->cc, q->id, q->op, -ECANCELED);
                req_detach(q);
                req_free(q);
                break;
        }
        return 1;
}

/* An op outside the peer's set (signer_policy_op_allowed()): never run, counted with the
 * policy's refusals, logged rate-limited on its own (a confused or hostile peer must not hide
 * the other refusals). */
static int role_refused(struct conn *c, const struct signer_msg *m) {
        struct signer *s = c->s;

        s->n.refused_policy++;
        set_last_error(s, "%s refused: not served to uid %u ([signer] %s)", signer_op_to_string(m->op),
                       (unsigned) chan_conn_uid(c->cc), signer_policy_roles_to_string(c->roles));
        if (chan_log_allowed(&s->log_role))
                log_event(LOG_WARNING, 0, IOTHUB_MID_SIGNER_POLICY_REFUSED, NULL, "not an op of this peer",
                          "Refused %s from uid %u: not an op of [signer] %s", signer_op_to_string(m->op),
                          (unsigned) chan_conn_uid(c->cc), signer_policy_roles_to_string(c->roles));
        return -EPERM;
}

/* Runs one request: 1 when it answered or will answer, else the negative errno to answer. */
static int dispatch(void *userdata, struct chan_conn *cc, const struct signer_msg *m) {
        struct conn *c = chan_conn_data(cc);

        if (!signer_policy_op_allowed(c->roles, m->op))
                return role_refused(c, m);
        switch (m->op) {
        case SIGNER_OP_KEY_INFO:
                return op_key_info(c, m);
        case SIGNER_OP_SIGN_HTTP:
                return op_sign_http(c, m);
        case SIGNER_OP_SIGN_DPOP:
                return op_sign_dpop(c, m);
        case SIGNER_OP_SIGN_COMMAND:
                return op_sign_command(c, m);
        case SIGNER_OP_TOKENS_GET:
        case SIGNER_OP_TOKENS_PUT:
        case SIGNER_OP_TOKENS_ERASE:
                return op_tokens(c, m);
        case SIGNER_OP_ATTEST_BEGIN:
        case SIGNER_OP_ATTEST_ANSWER:
                return op_attest(c, m);
        case SIGNER_OP_STATUS:
                return op_status(c, m);
        case SIGNER_OP_CANCEL:
                return op_cancel(c, m);
        }
        return -EOPNOTSUPP;
}

/* ---- connections (chanserver.h) ---- */

static int conn_new(void *userdata, struct chan_conn *cc, const struct ucred *cred, void **ret_data) {
        struct signer *s = userdata;
        unsigned roles = signer_policy_roles(cred->uid, s->client_uid, s->command_uid);
        struct conn *c;

        /* Only [signer] client_user and command_user. Root gets no exception (the units run the
         * programs as their own users; root can open the TPM itself). */
        if (roles == 0)
                return -EPERM;
        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->s = s;
        c->cc = cc;
        c->out = chan_conn_out(cc);
        c->roles = roles;
        *ret_data = c;
        return 0;
}

static void conn_free(void *userdata, struct chan_conn *cc, void *data) {
        struct conn *c = data;

        if (!c)
                return;
        /* Cancels the signatures still queued for this connection (hubkey_op_free()). */
        while (c->reqs) {
                struct req *q = c->reqs;
                c->reqs = q->next;
                req_free(q);
        }
        attest_free(c->attest);
        free(c);
}

/* ---- start-up ---- */

static void signer_done(struct signer *s) {
        chan_server_free(s->server);
        hubkey_free(s->key);
        signer_policy_done(&s->policy);
        conf_free(s->conf);
        sd_event_unref(s->event);
}

/* [signer] state_dir, else $STATE_DIRECTORY (the first of a list), else the default; the
 * token store (tokenstore.c) keeps its files in [hub] state_dir, which is the signer's here. */
static int signer_state_dir(struct iothub_conf *c, char **ret_error) {
        const char *e = secure_getenv("STATE_DIRECTORY");
        char *dir;
        int r;

        if (!c->signer.state_dir_set && e && e[0] == '/') {
                dir = strndup(e, strcspn(e, ":"));
                if (!dir)
                        return -ENOMEM;
                free(c->signer.state_dir);
                c->signer.state_dir = dir;
        }
        if (mkdir(c->signer.state_dir, 0700) < 0 && errno != EEXIST)
                return set_error_message(ret_error, -errno, "Cannot create %s: %m", c->signer.state_dir);
        /* Anyone who could write it could replace the sealed token files. */
        r = check_trusted_dir(c->signer.state_dir, ret_error);
        if (r < 0)
                return r;
        return free_and_strdup(&c->hub.state_dir, c->signer.state_dir);
}

static int peer_uid(const struct iothub_conf *c, const char *key, const char *name, uid_t *ret) {
        int r = user_to_uid(name, ret);

        if (r < 0)
                log_event(LOG_ERR, r, IOTHUB_MID_CONFIG_ERROR, NULL, NULL, "%s: [signer] %s: '%s': %s", c->path,
                          key, name, r == -ESRCH ? "no such user" : strerror(-r));
        return r;
}

/* The signer's peers and their op sets: [signer] client_user and command_user. */
static int signer_peers(struct signer *s) {
        int r;

        if ((r = peer_uid(s->conf, "client_user", s->conf->signer.client_user, &s->client_uid)) < 0 ||
            (r = peer_uid(s->conf, "command_user", s->conf->signer.command_user, &s->command_uid)) < 0)
                return r;
        if (s->client_uid == s->command_uid) {
                (void) snprintf(s->peer_rule, sizeof s->peer_rule,
                                "only uid %u ([signer] client_user and command_user) is served",
                                (unsigned) s->client_uid);
                /* A test bed, or a system that runs iothubd and iothub-uplink as one user: it
                 * works, with every op for that user, and says so once. */
                log_notice("[signer] client_user and command_user are both uid %u: that peer may ask every op, "
                           "there is no separation between the uplink's and iothubd's roles",
                           (unsigned) s->client_uid);
        } else
                (void) snprintf(s->peer_rule, sizeof s->peer_rule,
                                "only uid %u ([signer] client_user) and uid %u ([signer] command_user) are served",
                                (unsigned) s->client_uid, (unsigned) s->command_uid);
        return 0;
}

static int signer_run(const char *config, const char *listen_path, int level) {
        static const struct chan_server_config server_config = {
                .name = "iothub-signer",
                .conn_description = "signer-conn",
                .proto = &signer_proto,
                .conn_max = SIGNER_CONN_MAX,
                .inflight_max = SIGNER_INFLIGHT_MAX,
                .out_max = SIGNER_OUT_MAX,
                .mid_peer_refused = IOTHUB_MID_SIGNER_PEER_REFUSED,
                .mid_malformed = IOTHUB_MID_SIGNER_MALFORMED,
                .conn_new = conn_new,
                .conn_free = conn_free,
                .dispatch = dispatch,
        };
        struct chan_server_config cfg = server_config;
        _cleanup_free_ char *err = NULL;
        struct signer s = {};
        int r;

        r = conf_load(config, &s.conf, &err);
        if (r < 0) {
                log_event(LOG_ERR, r, IOTHUB_MID_CONFIG_ERROR, NULL, NULL, "%s", err ? err : strerror(-r));
                return EXIT_CONFIG;
        }
        if (level >= 0)
                log_set_max_level(level);
        r = signer_peers(&s);
        if (r < 0) {
                r = EXIT_CONFIG;
                goto out;
        }
        cfg.peer_rule = s.peer_rule;
        r = signer_policy_init(&s.policy, s.conf, &err);
        if (r < 0) {
                log_event(LOG_ERR, r, IOTHUB_MID_CONFIG_ERROR, NULL, NULL, "%s: %s", s.conf->path,
                          err ? err : strerror(-r));
                r = EXIT_CONFIG;
                goto out;
        }
        free(err);
        err = NULL;
        r = signer_state_dir(s.conf, &err);
        if (r < 0) {
                log_error_errno(r, "Refusing the state directory: %s", err ? err : strerror(-r));
                r = EXIT_FAILURE;
                goto out;
        }

        r = sd_event_default(&s.event);
        if (r < 0) {
                log_error_errno(r, "Failed to create the event loop: %m");
                r = EXIT_FAILURE;
                goto out;
        }
        /* Socket activation (iothub-signer.socket keeps the socket across restarts), else
         * --listen, else [signer] socket. */
        free(err);
        err = NULL;
        r = chan_server_new(s.event, &cfg, &s, listen_path, s.conf->signer.socket, &s.server, &err);
        if (r < 0) {
                log_error_errno(r, "%s", err ? err : strerror(-r));
                r = EXIT_FAILURE;
                goto out;
        }

        /* The key now, so that READY=1 means it is open or known absent; a TPM that is not
         * there yet is looked for again on the next request. */
        {
                struct hubkey *k;
                (void) signer_key(&s, &k);
        }
        {
                char command[64] = "";
                if (s.command_uid != s.client_uid)
                        (void) snprintf(command, sizeof command, " and uid %u (command_user)",
                                        (unsigned) s.command_uid);
                log_event(LOG_INFO, 0, IOTHUB_MID_STARTED, NULL, NULL,
                          "iothub-signer %s started on %s, serving uid %u%s, key %s", IOTHUB_VERSION,
                          chan_server_path(s.server) ?: "the socket from systemd", (unsigned) s.client_uid,
                          command, s.key ? hubkey_id(s.key) : s.key_errno == -ENOENT ? "absent" : "unavailable");
        }
        r = chan_server_run(s.server);
        r = r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
out:
        signer_done(&s);
        return r;
}

int main(int argc, char *argv[]) {
        return chan_server_main(argc, argv, "iothub-signer", "[signer] socket", signer_run);
}
