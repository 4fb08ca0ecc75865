/* SPDX-License-Identifier: MIT */
/* iothub-uplink(8) (issue 14 stage 2): the cloud-facing process. It alone talks HTTPS (http.c),
 * signs in (oauth.c) and holds the access and refresh tokens in memory; iothubd asks it, over a
 * unix socket in the fixed format of uplink-proto.h, for the requests it decides (REQUEST: a
 * kind, its argument and body), and gets the cloud's answers raw, to parse them itself: the
 * process that holds the tokens parses as little of the cloud's bytes as it can. Requests are
 * made by cloudreq.c (the URL of each kind, the token, the signer's RFC 9421 signature and DPoP
 * proof, a 401 handled inside).
 *
 * One sd-event loop: the listening socket (from systemd, iothub-uplink.socket, or --listen, else
 * [uplink] socket), at most UPLINK_CONN_MAX connections, each checked with SO_PEERCRED against
 * [uplink] client_user, each with an input buffer (one message at a time, at most
 * UPLINK_MSG_MAX) and an output buffer (reading stops while more than UPLINK_OUT_MAX of answers
 * wait), at most UPLINK_INFLIGHT_MAX requests in flight (reading stops too). A malformed message
 * is answered -EBADMSG and the connection closed once the answer is out; a connection that
 * closes cancels its requests (cloudreq_cancel(): curl's transfer ends). The shape is
 * iothub-signer's (src/signer.c). */
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <curl/curl.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>

#include "iothub/cloudreq.h"
#include "iothub/conf.h"
#include "iothub/http.h"
#include "iothub/log.h"
#include "iothub/oauth.h"
#include "iothub/signer.h"
#include "iothub/uplink-proto.h"

#define EXIT_USAGE 64
#define EXIT_CONFIG 78

#define UPLINK_CONN_MAX 4
#define UPLINK_INFLIGHT_MAX 64                     /* requests of one connection not yet answered */
#define UPLINK_OUT_MAX (TLV_PREFIX_LEN + UPLINK_MSG_MAX) /* answers queued before reading stops */
#define UPLINK_IN_KEEP (64 * 1024)                 /* an input buffer larger than this is freed when empty */
#define UPLINK_LISTEN_BACKLOG 16
#define UPLINK_KEY_RETRY_USEC (5 * 1000 * 1000)     /* the hub key asked for again after a failure */
#define UPLINK_EVENTS_KEPT 32                      /* WATCH: the newest events kept */
#define UPLINK_RETRY_AFTER_MAX 64                  /* RETRY_AFTER's limit (uplink-proto.h) */
#define UPLINK_LOG_WINDOW_USEC (10 * 1000 * 1000)
#define UPLINK_LOG_BURST 5

struct uplink;
struct conn;

struct req {
        struct conn *conn;
        struct req *next;
        uint32_t id;
        unsigned op;
        struct cloudreq_call *call;      /* REQUEST, REGISTER */
        struct oauth_logout_op *logout;  /* LOGOUT */
        uint64_t since;                  /* WATCH */
};

struct conn {
        struct uplink *u;
        struct conn *next;
        int fd;
        sd_event_source *io;
        uid_t uid;
        uint8_t *in;
        size_t in_len, in_cap;
        struct tlv_buf out;
        struct req *reqs;
        unsigned inflight;
        struct req *watch; /* the one WATCH waiting, or NULL */
        bool closing;      /* a malformed message: answer, then close */
        bool eof;          /* the client shut down its sending side: answer what it asked, then close */
};

struct event_entry {
        uint64_t gen;
        char *json; /* one object */
};

struct uplink {
        sd_event *event;
        struct iothub_conf *conf;
        int listen_fd;
        bool listen_owned; /* ours to unlink at exit, not systemd's */
        char *listen_path;
        sd_event_source *listen_io;
        uid_t client_uid;
        struct conn *conns;
        unsigned n_conns;
        struct signer *signer;
        struct signer_op *key_op;
        sd_event_source *key_timer;
        bool key_ready;
        struct http *http;
        struct oauth *oauth;
        struct cloudreq *req;
        /* WATCH: the event generation, and the newest UPLINK_EVENTS_KEPT events. */
        uint64_t gen;
        struct event_entry events[UPLINK_EVENTS_KEPT];
        /* Sign-in (RFC 8628): the LOGIN_START waiting for the device authorization, the
         * LOGIN_WAIT waiting for the end, and an end nobody waited for yet (the next LOGIN_WAIT
         * gets it). */
        struct req *login_start, *login_wait;
        bool login_active, login_done;
        int login_r;
        char login_message[256];
        struct ratelimit log_peer, log_malformed;
        struct {
                uint64_t requests, refused_peer, malformed;
        } n;
};

static bool log_allowed(struct ratelimit *rl) {
        uint64_t suppressed = 0;
        bool ok = ratelimit_allow(rl, now_monotonic_usec(), UPLINK_LOG_WINDOW_USEC, UPLINK_LOG_BURST, &suppressed);

        if (suppressed > 0)
                log_notice("Suppressed %" PRIu64 " similar messages", suppressed);
        return ok;
}

/* ---- answers ---- */

static void conn_update_events(struct conn *c);

static int answer_begin(struct conn *c, uint32_t id, unsigned op, int status) {
        if (status < INT16_MIN)
                status = -EIO;
        return uplink_msg_begin(&c->out, id, op, true, status);
}

static void answer_error(struct conn *c, uint32_t id, unsigned op, int status) {
        if (answer_begin(c, id, op, status) >= 0)
                (void) tlv_msg_end(&c->out);
        conn_update_events(c);
}

/* Ends a successful answer; if it cannot be built (out of memory, a value over its limit), the
 * client gets the error instead. */
static void answer_end(struct conn *c, uint32_t id, unsigned op) {
        int r = tlv_msg_end(&c->out);

        if (r < 0) {
                log_warning_errno(r, "The %s answer could not be built: %m", tlv_op_to_string(&uplink_proto, op));
                answer_error(c, id, op, r == -EINVAL ? -EIO : r);
                return;
        }
        conn_update_events(c);
}

/* ---- requests ---- */

static struct req *req_free(struct req *q) {
        if (!q)
                return NULL;
        cloudreq_cancel(q->call);
        oauth_logout_cancel(q->logout);
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
        if (c->watch == q)
                c->watch = NULL;
        /* A sign-in goes on without the waiter that went away. */
        if (c->u->login_start == q)
                c->u->login_start = NULL;
        if (c->u->login_wait == q)
                c->u->login_wait = NULL;
        c->inflight--;
}

static int req_new(struct conn *c, const struct tlv_msg *m, struct req **ret) {
        struct req *q = calloc(1, sizeof *q);

        if (!q)
                return -ENOMEM;
        q->conn = c;
        q->id = m->id;
        q->op = m->op;
        q->next = c->reqs;
        c->reqs = q;
        c->inflight++;
        *ret = q;
        return 0;
}

/* The request answered (or failed at once): it leaves its connection. */
static void req_done(struct req *q) {
        req_detach(q);
        q->call = NULL; /* ended: cloudreq freed it */
        q->logout = NULL;
        req_free(q);
}

/* ---- REQUEST ---- */

static void on_request_done(void *userdata, const struct cloudreq_answer *a) {
        struct req *q = userdata;
        struct conn *c = q->conn;

        q->call = NULL;
        if (a->error < 0)
                answer_error(c, q->id, q->op, a->error);
        else if (answer_begin(c, q->id, q->op, 0) >= 0) {
                (void) tlv_msg_add_u64(&c->out, UPLINK_TAG_HTTP_STATUS, (uint64_t) a->status);
                (void) tlv_msg_add(&c->out, UPLINK_TAG_BODY, a->body, a->body_len);
                /* A value over the channel's limit is left out: iothubd backs off on its own.
                 * An HTTP-date (RFC 9110 10.2.3, 5.6.7) goes down as delay-seconds: the date
                 * parser is libcurl's, which iothubd does not link. */
                char delay[24];
                const char *ra = a->retry_after;
                size_t n = strlen(ra);
                if (n > 0 && (ra[0] < '0' || ra[0] > '9')) {
                        time_t t = curl_getdate(ra, NULL), now = time(NULL);
                        (void) snprintf(delay, sizeof delay, "%lld", t == -1 ? 0LL : t > now ? (long long) (t - now) : 0LL);
                        ra = t == -1 ? "" : delay;
                        n = strlen(ra);
                }
                if (n > 0 && n <= UPLINK_RETRY_AFTER_MAX)
                        (void) tlv_msg_add_str(&c->out, UPLINK_TAG_RETRY_AFTER, ra);
                answer_end(c, q->id, q->op);
        }
        req_done(q);
}

static int op_request(struct conn *c, const struct tlv_msg *m) {
        struct uplink *u = c->u;
        _cleanup_free_ char *arg = NULL;
        char *body = NULL;
        uint64_t timeout = 0;
        uint8_t kind = 0;
        struct req *q;
        int r;

        /* The decoder checked KIND, ARG, BODY and TIMEOUT against the kind (uplink-proto.h). */
        (void) tlv_msg_u8(m, UPLINK_TAG_KIND, &kind);
        (void) tlv_msg_u64(m, UPLINK_TAG_TIMEOUT, &timeout);
        if (tlv_msg_has(m, UPLINK_TAG_ARG) && (r = tlv_msg_strdup(m, UPLINK_TAG_ARG, &arg)) < 0)
                return r;
        /* uplink-proto.h: -ENOKEY without the hub key, -EACCES without a token (sign in). */
        if (!cloudreq_have_key(u->req))
                return -ENOKEY;
        if (!cloudreq_have_token(u->req))
                return -EACCES;
        if (tlv_msg_has(m, UPLINK_TAG_BODY)) {
                const struct tlv_field *f = &m->f[UPLINK_TAG_BODY];
                body = malloc(f->len + 1);
                if (!body)
                        return -ENOMEM;
                memcpy(body, f->data, f->len);
                body[f->len] = '\0';
        }
        r = req_new(c, m, &q);
        if (r < 0) {
                free(body);
                return r;
        }
        u->n.requests++;
        r = cloudreq_request(u->req, kind, arg, body, body ? m->f[UPLINK_TAG_BODY].len : 0, (long) timeout,
                             on_request_done, q, &q->call);
        if (r < 0) {
                req_done(q);
                return r;
        }
        return 1;
}

/* ---- REGISTER ---- */

static void event_add(struct uplink *u, const char *type, const char *reason);

static void on_register_done(void *userdata, long status, const char *message) {
        struct req *q = userdata;
        struct conn *c = q->conn;

        q->call = NULL;
        if (answer_begin(c, q->id, q->op, 0) >= 0) {
                /* Failed before a final answer: no HTTP_STATUS, the reason for the operator
                 * (one line, no secret; uplink-proto.h). */
                if (status < 0)
                        log_warning("Registration failed: %s", message);
                else
                        (void) tlv_msg_add_u64(&c->out, UPLINK_TAG_HTTP_STATUS, (uint64_t) status);
                (void) tlv_msg_add_str(&c->out, UPLINK_TAG_MESSAGE, message && message[0] ? message : "-");
                answer_end(c, q->id, q->op);
        }
        if (status == 200 || status == 201)
                event_add(c->u, "registered", NULL);
        req_done(q);
}

static int op_register(struct conn *c, const struct tlv_msg *m) {
        struct req *q;
        int r;

        r = req_new(c, m, &q);
        if (r < 0)
                return r;
        r = cloudreq_register(c->u->req, on_register_done, q, &q->call);
        if (r < 0) {
                req_done(q);
                return r;
        }
        return 1;
}

/* ---- LOGOUT ---- */

static void on_logout_done(void *userdata, int r, const char *message) {
        struct req *q = userdata;
        struct conn *c = q->conn;

        q->logout = NULL;
        if (r < 0) {
                log_warning("Sign-out: %s", message ? message : strerror(-r));
                answer_error(c, q->id, q->op, r);
        } else if (answer_begin(c, q->id, q->op, 0) >= 0)
                answer_end(c, q->id, q->op);
        req_done(q);
}

static int op_logout(struct conn *c, const struct tlv_msg *m) {
        struct oauth_logout_op *op = NULL;
        struct req *q;
        int r;

        if (!c->u->oauth)
                return -EOPNOTSUPP;
        r = req_new(c, m, &q);
        if (r < 0)
                return r;
        /* done() may run before this returns (the answer known at once): q is gone then. */
        r = oauth_logout(c->u->oauth, on_logout_done, q, &op);
        if (r < 0) {
                req_done(q);
                return r;
        }
        if (op)
                q->logout = op;
        return 1;
}

/* ---- LOGIN_START, LOGIN_WAIT ---- */

static void on_login_started(void *userdata, int r, const char *message, json_t *info) {
        struct uplink *u = userdata;
        struct req *q = u->login_start;
        struct conn *c;

        u->login_start = NULL;
        if (r < 0)
                u->login_active = false;
        if (!q)
                return;
        c = q->conn;
        if (r < 0) {
                /* An error answer carries no field: the reason is logged. */
                log_warning("Sign-in could not start: %s", message ? message : strerror(-r));
                answer_error(c, q->id, q->op, r);
        } else if (answer_begin(c, q->id, q->op, 0) >= 0) {
                const char *complete = json_string_value(json_object_get(info, "verification_uri_complete"));
                (void) tlv_msg_add_str(&c->out, UPLINK_TAG_USER_CODE,
                                       json_string_value(json_object_get(info, "user_code")));
                (void) tlv_msg_add_str(&c->out, UPLINK_TAG_VERIFICATION_URI,
                                       json_string_value(json_object_get(info, "verification_uri")));
                if (complete)
                        (void) tlv_msg_add_str(&c->out, UPLINK_TAG_VERIFICATION_URI_COMPLETE, complete);
                (void) tlv_msg_add_u64(&c->out, UPLINK_TAG_EXPIRES_IN,
                                       (uint64_t) json_integer_value(json_object_get(info, "expires_in")));
                answer_end(c, q->id, q->op);
        }
        req_done(q);
}

/* How a sign-in ended, to its waiter: RESULT when the user signed in, else an error answer
 * (the channel's error answers carry no field; the reason is logged). */
static void login_wait_answer(struct req *q, int r, const char *message) {
        struct conn *c = q->conn;

        if (r < 0) {
                log_notice("Sign-in ended: %s", message);
                answer_error(c, q->id, q->op, r);
        } else if (answer_begin(c, q->id, q->op, 0) >= 0) {
                (void) tlv_msg_add_str(&c->out, UPLINK_TAG_RESULT, message && message[0] ? message : "signed in");
                answer_end(c, q->id, q->op);
        }
        req_done(q);
}

static void on_login_finished(void *userdata, int r, const char *message) {
        struct uplink *u = userdata;
        struct req *q = u->login_wait;

        u->login_active = false;
        u->login_wait = NULL;
        if (q) {
                login_wait_answer(q, r, message);
                return;
        }
        u->login_done = true;
        u->login_r = r;
        (void) snprintf(u->login_message, sizeof u->login_message, "%s", message ? message : "");
}

static int op_login_start(struct conn *c, const struct tlv_msg *m) {
        struct uplink *u = c->u;
        struct req *q;
        int r;

        if (!u->oauth)
                return -EOPNOTSUPP;
        /* A new flow ends the old one (oauth_login): whoever waited for it hears so. */
        if (u->login_wait) {
                struct req *w = u->login_wait;
                u->login_wait = NULL;
                login_wait_answer(w, -ECANCELED, "another sign-in started");
        }
        if (u->login_start) {
                struct req *w = u->login_start;
                u->login_start = NULL;
                answer_error(w->conn, w->id, w->op, -ECANCELED);
                req_done(w);
        }
        r = req_new(c, m, &q);
        if (r < 0)
                return r;
        u->login_start = q;
        r = oauth_login(u->oauth, &(struct oauth_login_cb){ .started = on_login_started,
                                                                 .finished = on_login_finished,
                                                                 .userdata = u });
        if (r < 0) {
                /* -EAGAIN: the authorization server not reached yet; -ENOKEY: no hub key. */
                req_done(q);
                return r;
        }
        /* Starting this flow ended the previous one, whose outcome was kept for nobody. */
        u->login_done = false;
        u->login_active = true;
        return 1;
}

static int op_login_wait(struct conn *c, const struct tlv_msg *m) {
        struct uplink *u = c->u;
        struct req *q;
        int r;

        if (!u->oauth)
                return -EOPNOTSUPP;
        if (u->login_wait)
                return -EBUSY;
        if (!u->login_done && !u->login_active)
                return -ENOENT; /* no sign-in to wait for */
        r = req_new(c, m, &q);
        if (r < 0)
                return r;
        if (u->login_done) {
                u->login_done = false;
                login_wait_answer(q, u->login_r, u->login_message);
                return 1;
        }
        u->login_wait = q;
        return 1;
}

/* ---- STATUS ---- */

static int status_json(struct uplink *u, char **ret) {
        json_t *o = json_object(), *up;
        uint64_t at = 0;
        const char *e = cloudreq_last_error(u->req, &at);
        char *s;
        int r;

        if (!o)
                return -ENOMEM;
        r = oauth_status_json(u->oauth, o);
        if (r >= 0)
                r = signer_status_json(u->signer, o);
        if (r >= 0 && u->key_ready)
                r = json_object_set_new(o, "key", json_pack("{s:s,s:s*}", "id", signer_key_id(u->signer),
                                                            "backend", signer_key_backend(u->signer)));
        up = json_pack("{s:b,s:b,s:I,s:I,s:I,s:s*}", "have_key", cloudreq_have_key(u->req), "have_token",
                       cloudreq_have_token(u->req), "requests", (json_int_t) u->n.requests, "refused_peer",
                       (json_int_t) u->n.refused_peer, "malformed", (json_int_t) u->n.malformed, "last_error",
                       e[0] ? e : NULL);
        if (r >= 0 && (!up || json_object_set_new(o, "uplink", up) < 0))
                r = -ENOMEM;
        s = r >= 0 ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (!s)
                return r < 0 ? r : -ENOMEM;
        *ret = s;
        return 0;
}

static int op_status(struct conn *c, const struct tlv_msg *m) {
        _cleanup_free_ char *s = NULL;
        int r;

        r = status_json(c->u, &s);
        if (r < 0)
                return r;
        r = answer_begin(c, m->id, m->op, 0);
        if (r < 0)
                return r;
        (void) tlv_msg_add_str(&c->out, UPLINK_TAG_STATUS_JSON, s);
        answer_end(c, m->id, m->op);
        return 1;
}

/* ---- WATCH ---- */

/* The events after since, as a JSON array (the oldest first); a gap (events no longer kept)
 * shows as {"type":"lost"}, so that iothubd asks STATUS again. */
static int watch_events_since(struct uplink *u, uint64_t since, char **ret) {
        json_t *arr = json_array();
        uint64_t oldest = u->gen >= UPLINK_EVENTS_KEPT ? u->gen - UPLINK_EVENTS_KEPT + 1 : 1;
        char *s;

        if (!arr)
                return -ENOMEM;
        if (since + 1 < oldest)
                (void) json_array_append_new(arr, json_pack("{s:s}", "type", "lost"));
        for (uint64_t g = since + 1 > oldest ? since + 1 : oldest; g <= u->gen; g++) {
                const struct event_entry *e = &u->events[g % UPLINK_EVENTS_KEPT];
                json_t *j = e->gen == g ? json_loads(e->json, 0, NULL) : NULL;
                if (j)
                        (void) json_array_append_new(arr, j);
        }
        s = json_dumps(arr, JSON_COMPACT);
        json_decref(arr);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

static void watch_answer(struct req *q) {
        struct conn *c = q->conn;
        _cleanup_free_ char *events = NULL;
        int r;

        r = watch_events_since(c->u, q->since, &events);
        if (r < 0)
                answer_error(c, q->id, q->op, r);
        else if (answer_begin(c, q->id, q->op, 0) >= 0) {
                (void) tlv_msg_add_u64(&c->out, UPLINK_TAG_GEN, c->u->gen);
                (void) tlv_msg_add_str(&c->out, UPLINK_TAG_EVENTS, events);
                answer_end(c, q->id, q->op);
        }
        req_done(q);
}

/* A new event: the waiting WATCHes are answered. */
static void event_add(struct uplink *u, const char *type, const char *reason) {
        struct event_entry *e;
        char *json;

        json = strdup_printf(reason ? "{\"gen\":%" PRIu64 ",\"type\":\"%s\",\"reason\":\"%s\"}"
                                    : "{\"gen\":%" PRIu64 ",\"type\":\"%s\"}",
                             u->gen + 1, type, reason ?: "");
        if (!json) {
                log_error("Out of memory: a %s event is lost", type);
                return;
        }
        u->gen++;
        e = &u->events[u->gen % UPLINK_EVENTS_KEPT];
        free(e->json);
        e->json = json;
        e->gen = u->gen;
        for (struct conn *c = u->conns; c; c = c->next)
                if (c->watch)
                        watch_answer(c->watch);
}

static int op_watch(struct conn *c, const struct tlv_msg *m) {
        struct req *q;
        uint64_t since = 0;
        int r;

        /* At most one per connection (uplink-proto.h): iothubd keeps one out. */
        if (c->watch)
                return -EBUSY;
        (void) tlv_msg_u64(m, UPLINK_TAG_SINCE, &since);
        r = req_new(c, m, &q);
        if (r < 0)
                return r;
        q->since = since;
        if (c->u->gen > since) {
                watch_answer(q);
                return 1;
        }
        c->watch = q;
        return 1;
}

/* ---- dispatch ---- */

static int dispatch(struct conn *c, const struct tlv_msg *m) {
        switch (m->op) {
        case UPLINK_OP_REQUEST:
                return op_request(c, m);
        case UPLINK_OP_REGISTER:
                return op_register(c, m);
        case UPLINK_OP_LOGOUT:
                return op_logout(c, m);
        case UPLINK_OP_STATUS:
                return op_status(c, m);
        case UPLINK_OP_WATCH:
                return op_watch(c, m);
        case UPLINK_OP_LOGIN_START:
                return op_login_start(c, m);
        case UPLINK_OP_LOGIN_WAIT:
                return op_login_wait(c, m);
        }
        return -EOPNOTSUPP;
}

/* ---- connections ---- */

static void conn_free(struct conn *c);

static void conn_malformed(struct conn *c, uint32_t id, unsigned op, const char *why) {
        struct uplink *u = c->u;

        u->n.malformed++;
        if (log_allowed(&u->log_malformed))
                log_warning("Malformed request from uid %u (%s): answered -EBADMSG, connection closed",
                            (unsigned) c->uid, why);
        /* iothub-uplink(8) WIRE FORMAT: the answer echoes the op as sent (an unknown one too,
         * without the answer bit), or 0 when the header could not be read. */
        answer_error(c, id, op & ~TLV_ANSWER, -EBADMSG);
        c->closing = true;
        conn_update_events(c);
}

static bool conn_may_read(const struct conn *c) {
        return !c->closing && c->inflight < UPLINK_INFLIGHT_MAX && c->out.len < UPLINK_OUT_MAX;
}

/* Decodes and runs the complete messages in the input buffer. */
static void conn_process(struct conn *c) {
        size_t at = 0;

        while (conn_may_read(c)) {
                struct tlv_msg m;
                size_t need = 0;
                uint32_t id = 0;
                int r;

                r = uplink_msg_frame(c->in + at, c->in_len - at, &need);
                if (r == 0)
                        break;
                if (r < 0) {
                        conn_malformed(c, 0, 0, "length out of range");
                        break;
                }
                if (uplink_msg_decode(c->in + at, need, &m) < 0) {
                        unsigned op = 0;
                        (void) tlv_msg_peek_id(c->in + at, need, &id);
                        if (need >= TLV_HEADER_LEN)
                                op = (unsigned) (c->in[at + 8] << 8 | c->in[at + 9]) & ~TLV_ANSWER;
                        conn_malformed(c, id, op, "does not decode");
                        break;
                }
                at += need;
                if (m.answer) {
                        conn_malformed(c, m.id, m.op, "an answer sent to the uplink");
                        break;
                }
                r = dispatch(c, &m);
                if (r < 0)
                        answer_error(c, m.id, m.op, r);
        }
        if (at > 0) {
                /* The consumed requests may hold bodies the cloud alone should see. */
                OPENSSL_cleanse(c->in, at);
                memmove(c->in, c->in + at, c->in_len - at);
                c->in_len -= at;
        }
        if (c->in_len == 0 && c->in_cap > UPLINK_IN_KEEP) {
                OPENSSL_cleanse(c->in, c->in_cap);
                free(c->in);
                c->in = NULL;
                c->in_cap = 0;
        }
        conn_update_events(c);
}

static int conn_read(struct conn *c) {
        size_t need = 0, want;
        ssize_t n;

        /* Room for the message being read, at most one: what a peer can make us hold is bounded
         * by UPLINK_MSG_MAX. */
        if (uplink_msg_frame(c->in, c->in_len, &need) < 0)
                return -EBADMSG;
        want = need > c->in_len ? need : c->in_len + TLV_PREFIX_LEN;
        if (want < 4096)
                want = 4096;
        if (want > TLV_PREFIX_LEN + UPLINK_MSG_MAX)
                want = TLV_PREFIX_LEN + UPLINK_MSG_MAX;
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
        tlv_buf_consume(&c->out, (size_t) n);
        return 0;
}

/* Nothing left to do: a malformed message answered, or the client done sending (EOF) and every
 * request it sent answered (a WATCH left waiting does not hold the connection open). */
static bool conn_finished(struct conn *c) {
        size_t need = 0;

        if (c->out.len > 0)
                return false;
        if (c->closing)
                return true;
        return c->eof && c->inflight == (c->watch ? 1u : 0u) && uplink_msg_frame(c->in, c->in_len, &need) <= 0;
}

static void conn_update_events(struct conn *c) {
        uint32_t ev = 0;

        if (!c->io)
                return;
        if (!c->eof && conn_may_read(c))
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
                /* Requests held back by the limits go on once there is room. */
                if (c->in_len > 0 && conn_may_read(c))
                        conn_process(c);
        }
        if (conn_finished(c))
                goto drop;
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
        struct uplink *u;

        if (!c)
                return;
        u = c->u;
        for (struct conn **p = &u->conns; *p; p = &(*p)->next)
                if (*p == c) {
                        *p = c->next;
                        u->n_conns--;
                        break;
                }
        /* Cancels what the client still waited for: curl's transfers end, the signer's ops are
         * dropped, a sign-out goes on without its waiter. */
        while (c->reqs) {
                struct req *q = c->reqs;
                c->reqs = q->next;
                req_free(q);
        }
        sd_event_source_disable_unref(c->io);
        if (c->fd >= 0)
                (void) close(c->fd);
        if (c->in) {
                OPENSSL_cleanse(c->in, c->in_cap);
                free(c->in);
        }
        tlv_buf_done(&c->out);
        free(c);
}

static int on_accept(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct uplink *u = userdata;
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
        /* Only [uplink] client_user (iothubd). Root gets no exception. */
        if (cred.uid != u->client_uid) {
                u->n.refused_peer++;
                if (log_allowed(&u->log_peer))
                        log_warning("Refused a connection from uid %u pid %d: only uid %u ([uplink] client_user) is "
                                    "served",
                                    (unsigned) cred.uid, (int) cred.pid, (unsigned) u->client_uid);
                return 0;
        }
        if (u->n_conns >= UPLINK_CONN_MAX) {
                if (log_allowed(&u->log_peer))
                        log_warning("Refused a connection from pid %d: %d connections already", (int) cred.pid,
                                    UPLINK_CONN_MAX);
                return 0;
        }
        c = calloc(1, sizeof *c);
        if (!c)
                return 0;
        c->u = u;
        c->uid = cred.uid;
        c->fd = -1;
        r = sd_event_add_io(u->event, &c->io, cfd, EPOLLIN, on_conn_io, c);
        if (r < 0) {
                free(c);
                log_warning_errno(r, "Failed to watch a connection: %m");
                return 0;
        }
        (void) sd_event_source_set_description(c->io, "uplink-conn");
        c->fd = TAKE_FD(cfd);
        c->next = u->conns;
        u->conns = c;
        u->n_conns++;
        log_debug("Connection from pid %d", (int) cred.pid);
        return 0;
}

/* ---- the hub key (the signer's) ---- */

static int ask_key(struct uplink *u);

static int on_key_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct uplink *u = userdata;

        u->key_timer = sd_event_source_disable_unref(u->key_timer);
        (void) ask_key(u);
        return 0;
}

static void on_key_info(void *userdata, int r, const struct signer_reply *p) {
        struct uplink *u = userdata;

        u->key_op = signer_op_free(u->key_op); /* the signer client keeps the key it named */
        if (r < 0) {
                const char *why = signer_last_error(u->signer);
                log_warning_errno(r, "No hub key from iothub-signer: %s", why ? why : strerror(-r));
                cloudreq_key_failed(u->req, r, why);
                if (!u->key_timer)
                        (void) sd_event_add_time_relative(u->event, &u->key_timer, CLOCK_MONOTONIC,
                                                          UPLINK_KEY_RETRY_USEC, 0, on_key_timer, u);
                return;
        }
        u->key_ready = true;
        log_info("Hub key %s (%s), held by iothub-signer", signer_key_id(u->signer), signer_key_backend(u->signer));
        /* The sealed tokens can be read now, requests signed. */
        oauth_key_ready(u->oauth, u->signer);
        cloudreq_key_ready(u->req, u->signer);
        event_add(u, "key_ready", NULL);
}

static int ask_key(struct uplink *u) {
        if (u->key_ready || u->key_op)
                return 0;
        return signer_key_info(u->signer, on_key_info, u, &u->key_op);
}

/* cloudreq's need_key (a registration): asked now, asynchronously. */
static int on_need_key(void *userdata) {
        struct uplink *u = userdata;
        int r;

        if (u->key_ready)
                return 0;
        r = ask_key(u);
        return r < 0 ? r : -EINPROGRESS;
}

static void on_signer_key_changed(void *userdata) {
        struct uplink *u = userdata;

        log_warning("iothub-signer now holds another hub key, %s: the hub must be registered again",
                    signer_key_id(u->signer));
        event_add(u, "key_changed", NULL);
}

/* ---- sign-in news ---- */

static void on_token_ready(void *userdata) {
        event_add(userdata, "token_ready", NULL);
}

static void on_signin_changed(void *userdata, const char *reason) {
        event_add(userdata, "signin_changed", reason);
}

/* ---- start-up ---- */

static int on_signal(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata) {
        struct uplink *u = userdata;

        (void) sd_notify(false, "STOPPING=1\nSTATUS=Stopping");
        log_event(LOG_INFO, 0, IOTHUB_MID_STOPPING, NULL, NULL, "iothub-uplink stopping");
        return sd_event_exit(u->event, 0);
}

/* The configuration is read at start only, like the signer's. SIGHUP must not end it. */
static int on_sighup(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata) {
        log_notice("SIGHUP: iothub-uplink reads its configuration at start only; restart it to apply changes");
        return 0;
}

static void uplink_done(struct uplink *u) {
        /* A sign-in in flight must not report to what is freed below (oauth outlives the
         * connections for a moment). */
        oauth_login_detach(u->oauth, u);
        while (u->conns)
                conn_free(u->conns);
        sd_event_source_disable_unref(u->listen_io);
        if (u->listen_fd >= 0)
                (void) close(u->listen_fd);
        if (u->listen_owned && u->listen_path)
                (void) unlink(u->listen_path);
        free(u->listen_path);
        /* Top down: each before what it calls (cloudreq's waits for a refresh before oauth). */
        cloudreq_free(u->req);
        oauth_free(u->oauth);
        http_free(u->http);
        u->key_op = signer_op_free(u->key_op);
        sd_event_source_disable_unref(u->key_timer);
        signer_free(u->signer);
        for (size_t i = 0; i < UPLINK_EVENTS_KEPT; i++)
                free(u->events[i].json);
        conf_free(u->conf);
        sd_event_unref(u->event);
}

static int uplink_run(const char *config, const char *listen_path, int level) {
        _cleanup_free_ char *err = NULL;
        struct uplink u = { .listen_fd = -1 };
        sigset_t mask;
        int n, r;

        r = conf_load(config, &u.conf, &err);
        if (r < 0) {
                log_event(LOG_ERR, r, IOTHUB_MID_CONFIG_ERROR, NULL, NULL, "%s", err ? err : strerror(-r));
                return EXIT_CONFIG;
        }
        if (level >= 0)
                log_set_max_level(level);
        r = user_to_uid(u.conf->uplink.client_user, &u.client_uid);
        if (r < 0) {
                log_event(LOG_ERR, r, IOTHUB_MID_CONFIG_ERROR, NULL, NULL, "%s: [uplink] client_user: '%s': %s",
                          u.conf->path, u.conf->uplink.client_user, r == -ESRCH ? "no such user" : strerror(-r));
                r = EXIT_CONFIG;
                goto out;
        }
        if (!u.conf->cloud.url) {
                log_event(LOG_ERR, -EINVAL, IOTHUB_MID_CONFIG_ERROR, NULL, NULL,
                          "%s: [cloud] url is not set: iothub-uplink has nothing to do", u.conf->path);
                r = EXIT_CONFIG;
                goto out;
        }

        r = sd_event_default(&u.event);
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
        if ((r = sd_event_add_signal(u.event, NULL, SIGTERM, on_signal, &u)) < 0 ||
            (r = sd_event_add_signal(u.event, NULL, SIGINT, on_signal, &u)) < 0 ||
            (r = sd_event_add_signal(u.event, NULL, SIGHUP, on_sighup, &u)) < 0 ||
            (r = sd_event_set_watchdog(u.event, true)) < 0) {
                log_error_errno(r, "Failed to set up signals and the watchdog: %m");
                r = EXIT_FAILURE;
                goto out;
        }

        /* Socket activation (iothub-uplink.socket keeps the socket across restarts), else
         * --listen, else [uplink] socket. */
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
                u.listen_fd = SD_LISTEN_FDS_START;
                (void) fcntl(u.listen_fd, F_SETFL, fcntl(u.listen_fd, F_GETFL) | O_NONBLOCK);
        } else {
                u.listen_path = strdup(listen_path ?: u.conf->uplink.socket);
                if (!u.listen_path) {
                        r = EXIT_FAILURE;
                        goto out;
                }
                r = unix_listen(u.listen_path, UPLINK_LISTEN_BACKLOG, &u.listen_fd);
                if (r < 0) {
                        log_error_errno(r, "Failed to listen on %s: %m", u.listen_path);
                        r = EXIT_FAILURE;
                        goto out;
                }
                u.listen_owned = true;
        }
        r = sd_event_add_io(u.event, &u.listen_io, u.listen_fd, EPOLLIN, on_accept, &u);
        if (r < 0) {
                log_error_errno(r, "Failed to watch the socket: %m");
                r = EXIT_FAILURE;
                goto out;
        }

        r = signer_new(u.event, u.conf,
                       &(struct signer_events){ .key_changed = on_signer_key_changed, .userdata = &u }, &u.signer);
        if (r >= 0)
                r = http_new(u.event, &u.http);
        if (r >= 0)
                r = oauth_new(u.event, u.conf, u.http,
                              &(struct oauth_events){ .token_ready = on_token_ready,
                                                      .signin_changed = on_signin_changed,
                                                      .userdata = &u },
                              &u.oauth);
        if (r >= 0)
                r = cloudreq_new(u.event, u.conf, u.http, u.oauth,
                                 &(struct cloudreq_events){ .need_key = on_need_key, .userdata = &u }, &u.req);
        if (r < 0) {
                log_error_errno(r, "Failed to set up the signer's client, HTTPS or sign-in: %m");
                r = EXIT_FAILURE;
                goto out;
        }
        /* Asked now, answered on the loop: READY=1 never waits for the signer (issue 13). */
        r = ask_key(&u);
        if (r < 0)
                log_warning_errno(r, "Failed to ask iothub-signer for the hub key: %m");

        (void) sd_notify(false, "READY=1\nSTATUS=Serving");
        log_event(LOG_INFO, 0, IOTHUB_MID_STARTED, NULL, NULL, "iothub-uplink %s started on %s, serving uid %u",
                  IOTHUB_VERSION, u.listen_path ?: "the socket from systemd", (unsigned) u.client_uid);
        r = sd_event_loop(u.event);
        r = r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
out:
        uplink_done(&u);
        return r;
}

static void usage(FILE *f) {
        fprintf(f, "Usage: iothub-uplink [--config FILE] [--listen PATH] [--log-level LEVEL] [--version]\n"
                   "  --config FILE      configuration file (default " IOTHUB_DEFAULT_CONFIG ")\n"
                   "  --listen PATH      listen on this unix socket (default: the socket from\n"
                   "                     systemd, else [uplink] socket)\n"
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
        /* As the signer: a buffer of up to 1 MiB (a body) is mmap()ed and returned when freed. */
        (void) mallopt(M_MMAP_THRESHOLD, 128 * 1024);
        log_open("iothub-uplink");
        while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0)
                switch (c) {
                case 'c':
                        config = optarg;
                        break;
                case 'L':
                        if (optarg[0] != '/') {
                                fprintf(stderr, "iothub-uplink: --listen needs an absolute path\n");
                                return EXIT_USAGE;
                        }
                        listen_path = optarg;
                        break;
                case 'l':
                        if (log_level_from_string(optarg, &level) < 0) {
                                fprintf(stderr, "iothub-uplink: unknown log level '%s'\n", optarg);
                                return EXIT_USAGE;
                        }
                        break;
                case 'V':
                        printf("iothub-uplink %s\n", IOTHUB_VERSION);
                        return 0;
                case 'h':
                        usage(stdout);
                        return 0;
                default:
                        usage(stderr);
                        return EXIT_USAGE;
                }
        if (optind < argc) {
                fprintf(stderr, "iothub-uplink: unexpected argument '%s'\n", argv[optind]);
                return EXIT_USAGE;
        }
        return uplink_run(config, listen_path, level);
}
