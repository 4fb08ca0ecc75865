/* SPDX-License-Identifier: MIT */
/* iothub-signer(8): the one process that opens the TPM (the hub key) and the sealed OAuth tokens,
 * and signs for iothubd over a unix socket only what its policy allows (issue 14). It parses
 * nothing but the fixed format of signer-proto.h; it builds what it signs from the request's
 * fields (httpsig.c, dpop.c, command.c) and never signs bytes it was handed.
 *
 * One sd-event loop: the listening socket (from systemd, iothub-signer.socket, or --listen),
 * at most SIGNER_CONN_MAX connections, each checked with SO_PEERCRED against [signer]
 * client_user, each with an input buffer (one message at a time, at most SIGNER_MSG_MAX) and an
 * output buffer (answers, at most SIGNER_OUT_MAX queued before reading stops), at most
 * SIGNER_INFLIGHT_MAX requests in flight (reading stops too). Signatures go through hubkey's
 * queue (hubkey_sign_async(): one TPM operation at a time, by priority), so a slow TPM never
 * blocks the loop where hubkey avoids it; token and attestation ops are synchronous TPM calls
 * (a few a day). A malformed message is answered -EBADMSG and the connection closed once the
 * answer is out. */
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <malloc.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#include <openssl/crypto.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>

#include "commands-internal.h"
#include "iothub/attest.h"
#include "iothub/conf.h"
#include "iothub/dpop.h"
#include "iothub/httpsig.h"
#include "iothub/hubkey.h"
#include "iothub/jws.h"
#include "iothub/log.h"
#include "iothub/signer-policy.h"
#include "iothub/signer-proto.h"
#include "iothub/tokenstore.h"

#define EXIT_USAGE 64
#define EXIT_CONFIG 78

#define SIGNER_CONN_MAX 8
#define SIGNER_INFLIGHT_MAX 64          /* requests of one connection waiting for the TPM */
#define SIGNER_OUT_MAX (1024 * 1024)    /* answers queued on one connection before reading stops */
#define SIGNER_IN_KEEP (64 * 1024)      /* an input buffer larger than this is freed when empty */
#define SIGNER_LISTEN_BACKLOG 16
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

struct conn {
        struct signer *s;
        struct conn *next;
        int fd;
        sd_event_source *io;
        uid_t uid;
        uint8_t *in;
        size_t in_len, in_cap;
        struct signer_buf out;
        struct req *reqs;
        unsigned inflight;
        bool closing; /* a malformed message: answer, then close */
        bool eof;     /* the client shut down its sending side: answer what it asked, then close */
        struct attest *attest; /* ATTEST_BEGIN done, ATTEST_ANSWER awaited */
};

struct signer {
        sd_event *event;
        struct iothub_conf *conf;
        struct signer_policy policy;
        int listen_fd;
        bool listen_owned;       /* ours to unlink at exit (--listen), not systemd's */
        char *listen_path;
        sd_event_source *listen_io;
        uid_t client_uid;
        struct conn *conns;
        unsigned n_conns;
        struct hubkey *key;
        int key_errno;           /* of the last hubkey_open(), 0 when open */
        uint64_t key_tried_usec;
        struct signer_bucket bucket;
        struct ratelimit log_peer, log_rate, log_policy, log_malformed;
        struct {
                uint64_t signatures, refused_policy, refused_rate, refused_peer, malformed, tpm_errors;
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

static bool log_allowed(struct ratelimit *rl) {
        uint64_t suppressed = 0;
        bool ok = ratelimit_allow(rl, now_monotonic_usec(), SIGNER_LOG_WINDOW_USEC, SIGNER_LOG_BURST, &suppressed);

        if (suppressed > 0)
                log_notice("Suppressed %" PRIu64 " similar messages", suppressed);
        return ok;
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

static void conn_update_events(struct conn *c);
static void conn_free(struct conn *c);
static void conn_resume(struct conn *c);

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
        c->inflight--;
}

/* An error answer, or the start of a successful one (the caller adds its fields and ends it). */
static int answer_begin(struct conn *c, uint32_t id, unsigned op, int status) {
        if (status < INT16_MIN)
                status = -EIO;
        return signer_msg_begin(&c->out, id, op, true, status);
}

static void answer_error(struct conn *c, uint32_t id, unsigned op, int status) {
        if (answer_begin(c, id, op, status) >= 0)
                (void) signer_msg_end(&c->out);
        conn_update_events(c);
}

/* Ends a successful answer; if it cannot be built (out of memory, a value over its limit), the
 * client gets the error instead. */
static void answer_end(struct conn *c, uint32_t id, unsigned op) {
        int r = signer_msg_end(&c->out);

        if (r < 0) {
                set_last_error(c->s, "%s answer could not be built: %s", signer_op_to_string(op), strerror(-r));
                answer_error(c, id, op, r == -EINVAL ? -EIO : r);
                return;
        }
        conn_update_events(c);
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
                answer_error(c, q->id, q->op, r);
        } else {
                c->s->n.signatures++;
                if (answer_begin(c, q->id, q->op, 0) >= 0) {
                        if (h.content_digest)
                                (void) signer_msg_add_str(&c->out, SIGNER_TAG_CONTENT_DIGEST, h.content_digest);
                        (void) signer_msg_add_str(&c->out, SIGNER_TAG_SIGNATURE_INPUT, h.signature_input);
                        (void) signer_msg_add_str(&c->out, SIGNER_TAG_SIGNATURE, h.signature);
                        answer_end(c, q->id, q->op);
                }
        }
        httpsig_headers_done(&h);
        req_free(q);
        conn_resume(c);
}

/* SIGN_DPOP and SIGN_COMMAND: q->input is a JWS signing input with room for the signature. */
static void on_jws_signed(void *userdata, int r, const uint8_t *sig) {
        struct req *q = userdata;
        struct conn *c = q->conn;

        req_detach(q);
        if (r < 0) {
                tpm_failed(c->s, r, signer_op_to_string(q->op));
                answer_error(c, q->id, q->op, r);
        } else {
                jws_compact_finish(q->input, q->input_len, sig);
                c->s->n.signatures++;
                if (answer_begin(c, q->id, q->op, 0) >= 0) {
                        (void) signer_msg_add_str(&c->out,
                                                  q->op == SIGNER_OP_SIGN_DPOP ? SIGNER_TAG_PROOF : SIGNER_TAG_JWS,
                                                  q->input);
                        answer_end(c, q->id, q->op);
                }
        }
        req_free(q);
        conn_resume(c);
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
        q->conn->inflight++;
}

static int policy_refused(struct conn *c, const struct signer_msg *m, const char *why) {
        c->s->n.refused_policy++;
        set_last_error(c->s, "%s refused: %s", signer_op_to_string(m->op), why);
        if (log_allowed(&c->s->log_policy))
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
        if (log_allowed(&s->log_rate))
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

static int op_sign_http(struct conn *c, const struct signer_msg *m) {
        _cleanup_free_ char *method = NULL, *uri = NULL;
        _cleanup_erase_str_ char *auth = NULL;
        const char *why = NULL;
        struct hubkey *k;
        struct req *q;
        uint8_t prio = 0;
        int r;

        if ((r = field_str(m, SIGNER_TAG_METHOD, &method)) < 0 || (r = field_str(m, SIGNER_TAG_TARGET_URI, &uri)) < 0 ||
            (r = field_str(m, SIGNER_TAG_AUTHORIZATION, &auth)) < 0 ||
            (r = signer_msg_u8(m, SIGNER_TAG_PRIO, &prio)) < 0)
                return r;
        if (prio >= _HUBKEY_PRIO_MAX)
                return -EINVAL;
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
                r = hubkey_sign_async(k, (enum hubkey_prio) prio, q->hp.base, q->hp.base_len, on_http_signed, q,
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
        struct hubkey *k;
        json_t *jwk = NULL;
        struct req *q;
        int r;

        if ((r = field_str(m, SIGNER_TAG_METHOD, &method)) < 0 || (r = field_str(m, SIGNER_TAG_URL, &url)) < 0 ||
            (r = field_str(m, SIGNER_TAG_ATH, &ath)) < 0 || (r = field_str(m, SIGNER_TAG_NONCE, &nonce)) < 0)
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
                r = hubkey_sign_async(k, HUBKEY_PRIO_HIGH, q->input, q->input_len, on_jws_signed, q, &q->kop);
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
                                  strlen(set), cloud, &cs, &why) < 0)
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
                r = hubkey_sign_async(k, HUBKEY_PRIO_HIGH, q->input, q->input_len, on_jws_signed, q, &q->kop);
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
        r = answer_begin(c, m->id, m->op, 0);
        if (r < 0)
                return r;
        (void) signer_msg_add_str(&c->out, SIGNER_TAG_KEY_ID, hubkey_id(k));
        (void) signer_msg_add_str(&c->out, SIGNER_TAG_JWK, jwk_s);
        (void) signer_msg_add_str(&c->out, SIGNER_TAG_BACKEND, key_backend_to_string(hubkey_backend(k)));
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
                answer_error(c, m->id, m->op, 0);
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
                answer_error(c, m->id, m->op, 0);
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
        r = answer_begin(c, m->id, m->op, 0);
        if (r < 0)
                goto out;
        (void) signer_msg_add_str(&c->out, SIGNER_TAG_ACCESS_TOKEN, t.access_token);
        if (t.refresh_token)
                (void) signer_msg_add_str(&c->out, SIGNER_TAG_REFRESH_TOKEN, t.refresh_token);
        (void) signer_msg_add_str(&c->out, SIGNER_TAG_TOKEN_TYPE, t.token_type);
        if (t.scope)
                (void) signer_msg_add_str(&c->out, SIGNER_TAG_SCOPE, t.scope);
        (void) signer_msg_add_u64(&c->out, SIGNER_TAG_EXPIRES_AT, t.expires_at > 0 ? (uint64_t) t.expires_at : 0);
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
        r = answer_begin(c, m->id, m->op, 0);
        if (r < 0)
                return r;
        (void) signer_msg_add_str(&c->out, m->op == SIGNER_OP_ATTEST_BEGIN ? SIGNER_TAG_EVIDENCE : SIGNER_TAG_ANSWER,
                                  text);
        answer_end(c, m->id, m->op);
        return 1;
}

static int op_status(struct conn *c, const struct signer_msg *m) {
        struct signer *s = c->s;
        int r;

        r = answer_begin(c, m->id, m->op, 0);
        if (r < 0)
                return r;
        (void) signer_msg_add_u64(&c->out, SIGNER_TAG_SIGNATURES, s->n.signatures);
        (void) signer_msg_add_u64(&c->out, SIGNER_TAG_REFUSED_POLICY, s->n.refused_policy);
        (void) signer_msg_add_u64(&c->out, SIGNER_TAG_REFUSED_RATE, s->n.refused_rate);
        (void) signer_msg_add_u64(&c->out, SIGNER_TAG_REFUSED_PEER, s->n.refused_peer);
        (void) signer_msg_add_u64(&c->out, SIGNER_TAG_MALFORMED, s->n.malformed);
        (void) signer_msg_add_u64(&c->out, SIGNER_TAG_TPM_ERRORS, s->n.tpm_errors);
        if (s->last_error[0])
                (void) signer_msg_add_str(&c->out, SIGNER_TAG_LAST_ERROR, s->last_error);
        answer_end(c, m->id, m->op);
        return 1;
}

/* Runs one request: 1 when it answered or will answer, else the negative errno to answer. */
static int dispatch(struct conn *c, const struct signer_msg *m) {
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
        }
        return -EOPNOTSUPP;
}

static void conn_malformed(struct conn *c, uint32_t id, unsigned op, const char *why) {
        struct signer *s = c->s;

        s->n.malformed++;
        if (log_allowed(&s->log_malformed))
                log_event(LOG_WARNING, 0, IOTHUB_MID_SIGNER_MALFORMED, NULL, why,
                          "Malformed request from uid %u (%s): answered -EBADMSG, connection closed",
                          (unsigned) c->uid, why);
        /* iothub-signer(8) WIRE FORMAT: the answer echoes the op as sent (an unknown one too,
         * without the answer bit), or 0 when the header could not be read. */
        answer_error(c, id, op & ~SIGNER_ANSWER, -EBADMSG);
        c->closing = true;
        conn_update_events(c);
}

/* Decodes and runs the complete messages in the input buffer. */
static void conn_process(struct conn *c) {
        size_t at = 0;

        while (!c->closing && c->inflight < SIGNER_INFLIGHT_MAX && c->out.len < SIGNER_OUT_MAX) {
                struct signer_msg m;
                size_t need = 0;
                uint32_t id = 0;
                int r;

                r = signer_msg_frame(c->in + at, c->in_len - at, &need);
                if (r == 0)
                        break;
                if (r < 0) {
                        conn_malformed(c, 0, 0, "length out of range");
                        break;
                }
                if (signer_msg_decode(c->in + at, need, &m) < 0) {
                        unsigned op = 0;
                        (void) signer_msg_peek_id(c->in + at, need, &id);
                        if (need >= SIGNER_HEADER_LEN)
                                op = (unsigned) (c->in[at + 8] << 8 | c->in[at + 9]) & ~SIGNER_ANSWER;
                        conn_malformed(c, id, op, "does not decode");
                        break;
                }
                at += need;
                if (m.answer) {
                        conn_malformed(c, m.id, m.op, "an answer sent to the signer");
                        break;
                }
                r = dispatch(c, &m);
                if (r < 0)
                        answer_error(c, m.id, m.op, r);
        }
        if (at > 0) {
                /* The consumed requests may hold tokens or an Authorization value. */
                OPENSSL_cleanse(c->in, at);
                memmove(c->in, c->in + at, c->in_len - at);
                c->in_len -= at;
        }
        if (c->in_len == 0 && c->in_cap > SIGNER_IN_KEEP) {
                OPENSSL_cleanse(c->in, c->in_cap);
                free(c->in);
                c->in = NULL;
                c->in_cap = 0;
        }
        conn_update_events(c);
}

/* Requests already read but held back (SIGNER_INFLIGHT_MAX in flight, or SIGNER_OUT_MAX of
 * answers queued) go on once there is room again: the client may be waiting for an answer and
 * send nothing more. */
static void conn_resume(struct conn *c) {
        if (!c->closing && c->in_len > 0 && c->inflight < SIGNER_INFLIGHT_MAX && c->out.len < SIGNER_OUT_MAX)
                conn_process(c);
}

static int conn_read(struct conn *c) {
        size_t need = 0, want;
        ssize_t n;

        /* Room for the message being read (its size is known once its prefix is in), at most
         * one message: what a peer can make us hold is bounded by SIGNER_MSG_MAX. */
        if (signer_msg_frame(c->in, c->in_len, &need) < 0)
                return -EBADMSG;
        want = need > c->in_len ? need : c->in_len + SIGNER_PREFIX_LEN;
        if (want < 4096)
                want = 4096;
        if (want > SIGNER_PREFIX_LEN + SIGNER_MSG_MAX)
                want = SIGNER_PREFIX_LEN + SIGNER_MSG_MAX;
        if (c->in_cap < want) {
                uint8_t *p = malloc(want);
                if (!p)
                        return -ENOMEM;
                if (c->in) {
                        memcpy(p, c->in, c->in_len);
                        OPENSSL_cleanse(c->in, c->in_cap);
                        free(c->in);
                }
                c->in = p;
                c->in_cap = want;
        }
        if (c->in_len == c->in_cap)
                return 0;
        n = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
        if (n < 0)
                return errno == EAGAIN || errno == EINTR ? 0 : -errno;
        if (n == 0) {
                /* shutdown(SHUT_WR) after the requests is a client saying it has no more: the
                 * requests read are still answered (conn_finished()). A message cut short by it
                 * is dropped with the connection. */
                c->eof = true;
                return 0;
        }
        c->in_len += (size_t) n;
        return 1;
}

static int conn_write(struct conn *c) {
        ssize_t n;

        if (c->out.len == 0)
                return 0;
        n = send(c->fd, c->out.data, c->out.len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0)
                return errno == EAGAIN || errno == EINTR ? 0 : -errno;
        signer_buf_consume(&c->out, (size_t) n);
        return 0;
}

/* Whether the connection has nothing left to do: a malformed message answered, or the client
 * done sending (EOF) and every request it sent answered and its answer written. */
static bool conn_finished(struct conn *c) {
        size_t need = 0;

        if (c->out.len > 0)
                return false;
        if (c->closing)
                return true;
        /* No request waiting for the TPM, none complete still to run (held back by the limits). */
        return c->eof && c->inflight == 0 && signer_msg_frame(c->in, c->in_len, &need) <= 0;
}

static void conn_update_events(struct conn *c) {
        uint32_t ev = 0;

        if (!c->io)
                return;
        /* After EOF the socket stays readable: no EPOLLIN then, or the loop would spin. */
        if (!c->closing && !c->eof && c->inflight < SIGNER_INFLIGHT_MAX && c->out.len < SIGNER_OUT_MAX)
                ev |= EPOLLIN;
        if (c->out.len > 0)
                ev |= EPOLLOUT;
        (void) sd_event_source_set_io_events(c->io, ev);
}

static int on_conn_io(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct conn *c = userdata;
        int r;

        if (revents & EPOLLOUT) {
                r = conn_write(c);
                if (r < 0)
                        goto drop;
                conn_resume(c);
        }
        if (conn_finished(c))
                goto drop;
        /* The peer is gone both ways: nobody to answer. */
        if (revents & (EPOLLHUP | EPOLLERR))
                goto drop;
        if (revents & EPOLLIN) {
                r = c->closing ? 0 : conn_read(c);
                if (r == -EBADMSG) {
                        conn_malformed(c, 0, 0, "length out of range");
                        return 0;
                }
                if (r < 0)
                        goto drop;
                conn_process(c);
                /* Answer at once what could be answered at once. */
                if (c->out.len > 0 && conn_write(c) < 0)
                        goto drop;
                if (conn_finished(c))
                        goto drop;
        }
        conn_update_events(c);
        return 0;
drop:
        conn_free(c);
        return 0;
}

static void conn_free(struct conn *c) {
        struct signer *s;

        if (!c)
                return;
        s = c->s;
        for (struct conn **p = &s->conns; *p; p = &(*p)->next)
                if (*p == c) {
                        *p = c->next;
                        s->n_conns--;
                        break;
                }
        /* Cancels the signatures still queued for this connection (hubkey_op_free()). */
        while (c->reqs) {
                struct req *q = c->reqs;
                c->reqs = q->next;
                req_free(q);
        }
        attest_free(c->attest);
        sd_event_source_disable_unref(c->io);
        if (c->fd >= 0)
                (void) close(c->fd);
        if (c->in) {
                OPENSSL_cleanse(c->in, c->in_cap);
                free(c->in);
        }
        signer_buf_done(&c->out);
        free(c);
}

static int on_accept(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct signer *s = userdata;
        struct ucred cred = {};
        socklen_t len = sizeof cred;
        _cleanup_close_ int cfd = -1;
        struct conn *c;
        int r;

        cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) {
                if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                        log_warning_errno(errno, "accept() failed: %m");
                return 0;
        }
        if (getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || len != sizeof cred) {
                log_warning_errno(errno, "SO_PEERCRED failed: %m");
                return 0;
        }
        /* Only [signer] client_user: the daemon. Root gets no exception (the unit runs the
         * signer as its own user; root can open the TPM itself). */
        if (cred.uid != s->client_uid) {
                s->n.refused_peer++;
                if (log_allowed(&s->log_peer))
                        log_event(LOG_WARNING, 0, IOTHUB_MID_SIGNER_PEER_REFUSED, NULL, NULL,
                                  "Refused a connection from uid %u pid %d: only uid %u ([signer] client_user) is "
                                  "served",
                                  (unsigned) cred.uid, (int) cred.pid, (unsigned) s->client_uid);
                return 0;
        }
        if (s->n_conns >= SIGNER_CONN_MAX) {
                if (log_allowed(&s->log_peer))
                        log_warning("Refused a connection from pid %d: %d connections already", (int) cred.pid,
                                    SIGNER_CONN_MAX);
                return 0;
        }
        c = calloc(1, sizeof(*c));
        if (!c)
                return 0;
        c->s = s;
        c->uid = cred.uid;
        c->fd = -1;
        r = sd_event_add_io(s->event, &c->io, cfd, EPOLLIN, on_conn_io, c);
        if (r < 0) {
                free(c);
                log_warning_errno(r, "Failed to watch a connection: %m");
                return 0;
        }
        (void) sd_event_source_set_description(c->io, "signer-conn");
        c->fd = TAKE_FD(cfd);
        c->next = s->conns;
        s->conns = c;
        s->n_conns++;
        log_debug("Connection from pid %d", (int) cred.pid);
        return 0;
}

/* ---- start-up ---- */

static int on_signal(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata) {
        struct signer *s = userdata;

        (void) sd_notify(false, "STOPPING=1\nSTATUS=Stopping");
        log_event(LOG_INFO, 0, IOTHUB_MID_STOPPING, NULL, NULL, "iothub-signer stopping");
        return sd_event_exit(s->event, 0);
}

/* The configuration is read at start only (the policy is the configuration): a reload would
 * have to agree with iothubd's, which restarts with it. SIGHUP must not end the signer either. */
static int on_sighup(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata) {
        log_notice("SIGHUP: iothub-signer reads its configuration at start only; restart it to apply changes");
        return 0;
}

static void signer_done(struct signer *s) {
        while (s->conns)
                conn_free(s->conns);
        sd_event_source_disable_unref(s->listen_io);
        if (s->listen_fd >= 0)
                (void) close(s->listen_fd);
        if (s->listen_owned && s->listen_path)
                (void) unlink(s->listen_path);
        free(s->listen_path);
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

static int signer_run(const char *config, const char *listen_path, int level) {
        _cleanup_free_ char *err = NULL;
        struct signer s = { .listen_fd = -1 };
        sigset_t mask;
        int n, r;

        r = conf_load(config, &s.conf, &err);
        if (r < 0) {
                log_event(LOG_ERR, r, IOTHUB_MID_CONFIG_ERROR, NULL, NULL, "%s", err ? err : strerror(-r));
                return EXIT_CONFIG;
        }
        if (level >= 0)
                log_set_max_level(level);
        r = user_to_uid(s.conf->signer.client_user, &s.client_uid);
        if (r < 0) {
                log_event(LOG_ERR, r, IOTHUB_MID_CONFIG_ERROR, NULL, NULL, "%s: [signer] client_user: '%s': %s",
                          s.conf->path, s.conf->signer.client_user,
                          r == -ESRCH ? "no such user" : strerror(-r));
                r = EXIT_CONFIG;
                goto out;
        }
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
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        (void) sigprocmask(SIG_BLOCK, &mask, NULL);
        if ((r = sd_event_add_signal(s.event, NULL, SIGTERM, on_signal, &s)) < 0 ||
            (r = sd_event_add_signal(s.event, NULL, SIGINT, on_signal, &s)) < 0 ||
            (r = sd_event_add_signal(s.event, NULL, SIGHUP, on_sighup, &s)) < 0 ||
            (r = sd_event_set_watchdog(s.event, true)) < 0) {
                log_error_errno(r, "Failed to set up signals and the watchdog: %m");
                r = EXIT_FAILURE;
                goto out;
        }

        /* Socket activation (iothub-signer.socket keeps the socket across restarts), else
         * --listen, else [signer] socket. */
        n = listen_path ? 0 : sd_listen_fds(true);
        if (n > 1) {
                log_error("Got %d sockets from systemd, expected one", n);
                r = EXIT_FAILURE;
                goto out;
        }
        if (n == 1) {
                if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0) {
                        log_error("The socket from systemd is not a listening unix stream socket");
                        r = EXIT_FAILURE;
                        goto out;
                }
                s.listen_fd = SD_LISTEN_FDS_START;
                (void) fcntl(s.listen_fd, F_SETFL, fcntl(s.listen_fd, F_GETFL) | O_NONBLOCK);
        } else {
                s.listen_path = strdup(listen_path ?: s.conf->signer.socket);
                if (!s.listen_path) {
                        r = EXIT_FAILURE;
                        goto out;
                }
                r = unix_listen(s.listen_path, SIGNER_LISTEN_BACKLOG, &s.listen_fd);
                if (r < 0) {
                        log_error_errno(r, "Failed to listen on %s: %m", s.listen_path);
                        r = EXIT_FAILURE;
                        goto out;
                }
                s.listen_owned = true;
        }
        r = sd_event_add_io(s.event, &s.listen_io, s.listen_fd, EPOLLIN, on_accept, &s);
        if (r < 0) {
                log_error_errno(r, "Failed to watch the socket: %m");
                r = EXIT_FAILURE;
                goto out;
        }

        /* The key now, so that READY=1 means it is open or known absent; a TPM that is not
         * there yet is looked for again on the next request. */
        {
                struct hubkey *k;
                (void) signer_key(&s, &k);
        }
        (void) sd_notify(false, "READY=1\nSTATUS=Serving");
        log_event(LOG_INFO, 0, IOTHUB_MID_STARTED, NULL, NULL,
                  "iothub-signer %s started on %s, serving uid %u, key %s", IOTHUB_VERSION,
                  s.listen_path ?: "the socket from systemd", (unsigned) s.client_uid,
                  s.key ? hubkey_id(s.key) : s.key_errno == -ENOENT ? "absent" : "unavailable");
        r = sd_event_loop(s.event);
        r = r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
out:
        signer_done(&s);
        return r;
}

static void usage(FILE *f) {
        fprintf(f, "Usage: iothub-signer [--config FILE] [--listen PATH] [--log-level LEVEL] [--version]\n"
                   "  --config FILE      configuration file (default " IOTHUB_DEFAULT_CONFIG ")\n"
                   "  --listen PATH      listen on this unix socket (default: the socket from\n"
                   "                     systemd, else [signer] socket)\n"
                   "  --log-level LEVEL  debug, info, notice, warning, err\n"
                   "  --version          print the version and exit\n");
}

int main(int argc, char *argv[]) {
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "listen", required_argument, NULL, 'L' },
                { "log-level", required_argument, NULL, 'l' },
                { "version", no_argument, NULL, 'V' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        const char *config = IOTHUB_DEFAULT_CONFIG, *listen_path = NULL;
        int level = -1, c;

        (void) mallopt(M_ARENA_MAX, 1);
        /* A fixed threshold: a request's buffer of up to 1 MiB is mmap()ed and goes back to the
         * system when freed. glibc's default threshold rises after the first such free, and the
         * next megabyte stays in the heap for good. */
        (void) mallopt(M_MMAP_THRESHOLD, 128 * 1024);
        log_open("iothub-signer");
        while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0)
                switch (c) {
                case 'c':
                        config = optarg;
                        break;
                case 'L':
                        if (optarg[0] != '/') {
                                fprintf(stderr, "iothub-signer: --listen needs an absolute path\n");
                                return EXIT_USAGE;
                        }
                        listen_path = optarg;
                        break;
                case 'l':
                        if (log_level_from_string(optarg, &level) < 0) {
                                fprintf(stderr, "iothub-signer: unknown log level '%s'\n", optarg);
                                return EXIT_USAGE;
                        }
                        break;
                case 'V':
                        printf("iothub-signer %s\n", IOTHUB_VERSION);
                        return 0;
                case 'h':
                        usage(stdout);
                        return 0;
                default:
                        usage(stderr);
                        return EXIT_USAGE;
                }
        if (optind < argc) {
                fprintf(stderr, "iothub-signer: unexpected argument '%s'\n", argv[optind]);
                return EXIT_USAGE;
        }
        return signer_run(config, listen_path, level);
}
