/* SPDX-License-Identifier: MIT */
/* iothub-uplink(8) (issue 14 stage 2): the cloud-facing process. It alone talks HTTPS (http.c),
 * signs in (oauth.c) and holds the access and refresh tokens in memory; iothubd asks it, over a
 * unix socket in the fixed format of uplink-proto.h, for the requests it decides (REQUEST: a
 * kind, its argument and body), and gets the cloud's answers raw, to parse them itself: the
 * process that holds the tokens parses as little of the cloud's bytes as it can. Requests are
 * made by cloudreq.c (the URL of each kind, the token, the signer's RFC 9421 signature and DPoP
 * proof, a 401 handled inside).
 *
 * One sd-event loop, the channels' server that iothub-signer uses too (chanserver.h): the
 * listening socket (from systemd, iothub-uplink.socket, or --listen, else [uplink] socket), at
 * most UPLINK_CONN_MAX connections, each checked with SO_PEERCRED against [uplink] client_user,
 * reading stopped while more than UPLINK_OUT_MAX of answers wait or UPLINK_INFLIGHT_MAX requests
 * are in flight. A connection that closes cancels its requests (cloudreq_cancel(): curl's
 * transfer ends). A STATUS request that comes while another of the same connection is unanswered
 * is chained behind it (cloudreq.c): signed at once, sent after its 200, else not at all. */
#include <inttypes.h>
#include <stdio.h>

#include <curl/curl.h>
#include <jansson.h>
#include <systemd/sd-event.h>

#include "iothub/chanserver.h"
#include "iothub/cloudreq.h"
#include "iothub/conf.h"
#include "iothub/http.h"
#include "iothub/log.h"
#include "iothub/oauth.h"
#include "iothub/signer.h"
#include "iothub/uplink-proto.h"

#define EXIT_CONFIG 78

#define UPLINK_CONN_MAX 4
#define UPLINK_INFLIGHT_MAX 64                     /* requests of one connection not yet answered */
#define UPLINK_OUT_MAX (TLV_PREFIX_LEN + UPLINK_MSG_MAX) /* answers queued before reading stops */
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

/* The uplink's state of one connection (chanserver.h has the rest). */
struct conn {
        struct uplink *u;
        struct chan_conn *cc;
        struct tlv_buf *out; /* chan_conn_out(cc): the answers */
        struct req *reqs;
        struct req *watch; /* the one WATCH waiting (parked: it does not hold the connection), or NULL */
        /* The newest STATUS request not yet answered: the next one is chained behind it
         * (cloudreq_request()'s after: signed at once, sent after its 200). Per connection: a
         * new connection (iothubd restarted) starts a fresh chain. */
        struct req *status_last;
};

struct event_entry {
        uint64_t gen;
        char *json; /* one object */
};

struct uplink {
        sd_event *event;
        struct iothub_conf *conf;
        struct chan_server *server;
        uid_t client_uid;
        char peer_rule[96]; /* for the refusal line */
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
        struct {
                uint64_t requests, cancelled;
        } n;
};

/* ---- answers ---- */


/* Ends a successful answer; if it cannot be built (out of memory, a value over its limit), the
 * client gets the error instead. */
static void answer_end(struct conn *c, uint32_t id, unsigned op) {
        int r = chan_answer_end(c->cc, id, op);

        if (r < 0)
                log_warning_errno(r, "The %s answer could not be built: %m", tlv_op_to_string(&uplink_proto, op));
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
        if (c->watch == q) {
                c->watch = NULL;
                chan_conn_set_parked(c->cc, 0);
        }
        if (c->status_last == q)
                c->status_last = NULL;
        /* A sign-in goes on without the waiter that went away. */
        if (c->u->login_start == q)
                c->u->login_start = NULL;
        if (c->u->login_wait == q)
                c->u->login_wait = NULL;
        chan_conn_release(c->cc);
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
        chan_conn_hold(c->cc);
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
                chan_answer_error(c->cc, q->id, q->op, a->error);
        else if (chan_answer_begin(c->cc, q->id, q->op, 0) >= 0) {
                (void) tlv_msg_add_u64(c->out, UPLINK_TAG_HTTP_STATUS, (uint64_t) a->status);
                (void) tlv_msg_add(c->out, UPLINK_TAG_BODY, a->body, a->body_len);
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
                        (void) tlv_msg_add_str(c->out, UPLINK_TAG_RETRY_AFTER, ra);
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
                             kind == UPLINK_KIND_STATUS && c->status_last ? c->status_last->call : NULL,
                             on_request_done, q, &q->call);
        if (r < 0) {
                req_done(q);
                return r;
        }
        if (kind == UPLINK_KIND_STATUS)
                c->status_last = q;
        return 1;
}

/* ---- REGISTER ---- */

static void event_add(struct uplink *u, const char *type, const char *reason);

static void on_register_done(void *userdata, long status, const char *message) {
        struct req *q = userdata;
        struct conn *c = q->conn;

        q->call = NULL;
        if (chan_answer_begin(c->cc, q->id, q->op, 0) >= 0) {
                /* Failed before a final answer: no HTTP_STATUS, the reason for the operator
                 * (one line, no secret; uplink-proto.h). */
                if (status < 0)
                        log_warning("Registration failed: %s", message);
                else
                        (void) tlv_msg_add_u64(c->out, UPLINK_TAG_HTTP_STATUS, (uint64_t) status);
                (void) tlv_msg_add_str(c->out, UPLINK_TAG_MESSAGE, message && message[0] ? message : "-");
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
                chan_answer_error(c->cc, q->id, q->op, r);
        } else if (chan_answer_begin(c->cc, q->id, q->op, 0) >= 0)
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
                /* An error answer carries no field: oauth.c logged the reason. */
                chan_answer_error(c->cc, q->id, q->op, r);
        } else if (chan_answer_begin(c->cc, q->id, q->op, 0) >= 0) {
                const char *complete = json_string_value(json_object_get(info, "verification_uri_complete"));
                (void) tlv_msg_add_str(c->out, UPLINK_TAG_USER_CODE,
                                       json_string_value(json_object_get(info, "user_code")));
                (void) tlv_msg_add_str(c->out, UPLINK_TAG_VERIFICATION_URI,
                                       json_string_value(json_object_get(info, "verification_uri")));
                if (complete)
                        (void) tlv_msg_add_str(c->out, UPLINK_TAG_VERIFICATION_URI_COMPLETE, complete);
                (void) tlv_msg_add_u64(c->out, UPLINK_TAG_EXPIRES_IN,
                                       (uint64_t) json_integer_value(json_object_get(info, "expires_in")));
                answer_end(c, q->id, q->op);
        }
        req_done(q);
}

/* How a sign-in ended, to its waiter: RESULT when the user signed in, else an error answer
 * (the channel's error answers carry no field; oauth.c logged the reason when it ended). */
static void login_wait_answer(struct req *q, int r, const char *message) {
        struct conn *c = q->conn;

        if (r < 0) {
                chan_answer_error(c->cc, q->id, q->op, r);
        } else if (chan_answer_begin(c->cc, q->id, q->op, 0) >= 0) {
                (void) tlv_msg_add_str(c->out, UPLINK_TAG_RESULT, message && message[0] ? message : "signed in");
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
                chan_answer_error(w->conn->cc, w->id, w->op, -ECANCELED);
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
        up = json_pack("{s:b,s:b,s:I,s:I,s:I,s:I,s:s*}", "have_key", cloudreq_have_key(u->req), "have_token",
                       cloudreq_have_token(u->req), "requests", (json_int_t) u->n.requests, "cancelled",
                       (json_int_t) u->n.cancelled, "refused_peer",
                       (json_int_t) chan_server_refused_peer(u->server), "malformed",
                       (json_int_t) chan_server_malformed(u->server), "last_error",
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
        r = chan_answer_begin(c->cc, m->id, m->op, 0);
        if (r < 0)
                return r;
        (void) tlv_msg_add_str(c->out, UPLINK_TAG_STATUS_JSON, s);
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
                chan_answer_error(c->cc, q->id, q->op, r);
        else if (chan_answer_begin(c->cc, q->id, q->op, 0) >= 0) {
                (void) tlv_msg_add_u64(c->out, UPLINK_TAG_GEN, c->u->gen);
                (void) tlv_msg_add_str(c->out, UPLINK_TAG_EVENTS, events);
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
        for (struct chan_conn *cc = chan_server_first(u->server); cc; cc = chan_conn_next(cc)) {
                struct conn *c = chan_conn_data(cc);
                if (c->watch)
                        watch_answer(c->watch);
        }
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
        chan_conn_set_parked(c->cc, 1);
        return 1;
}

/* ---- CANCEL ---- */

/* iothubd gave up on its request of this id (uplink-proto.h): what is done for it ends
 * (req_free(): curl's transfer, the signer's ops, a chained upload behind it unsent, a
 * sign-out's or a sign-in's waiter) and it is answered -ECANCELED, which iothubd drops but
 * counts: its place among the connection's requests in flight is free again at both ends. A
 * REGISTER is not ended: a registration once begun finishes (its attestation round trip with
 * the cloud too), is answered then, and iothubd records it from the registered news. The
 * CANCEL itself is never answered; an id with nothing out (answered meanwhile) is ignored. */
static int op_cancel(struct conn *c, const struct tlv_msg *m) {
        for (struct req *q = c->reqs; q; q = q->next)
                if (q->id == m->id && q->op != UPLINK_OP_REGISTER) {
                        c->u->n.cancelled++;
                        log_debug("Request %" PRIu32 " (%s) cancelled by iothubd", q->id,
                                  tlv_op_to_string(&uplink_proto, q->op));
                        chan_answer_error(c->cc, q->id, q->op, -ECANCELED);
                        req_detach(q);
                        req_free(q);
                        break;
                }
        return 1;
}

/* ---- dispatch ---- */

static int dispatch(void *userdata, struct chan_conn *cc, const struct tlv_msg *m) {
        struct conn *c = chan_conn_data(cc);

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
        case UPLINK_OP_CANCEL:
                return op_cancel(c, m);
        }
        return -EOPNOTSUPP;
}

/* ---- connections (chanserver.h) ---- */

static int conn_new(void *userdata, struct chan_conn *cc, const struct ucred *cred, void **ret_data) {
        struct uplink *u = userdata;
        struct conn *c;

        /* Only [uplink] client_user (iothubd). Root gets no exception. */
        if (cred->uid != u->client_uid)
                return -EPERM;
        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->u = u;
        c->cc = cc;
        c->out = chan_conn_out(cc);
        *ret_data = c;
        return 0;
}

static void conn_free(void *userdata, struct chan_conn *cc, void *data) {
        struct conn *c = data;

        if (!c)
                return;
        /* Cancels what the client still waited for: curl's transfers end, the signer's ops are
         * dropped, a sign-out goes on without its waiter. The sign-in's waiters are forgotten
         * (req_detach()'s part of it, without the server's accounting, which goes with cc). */
        while (c->reqs) {
                struct req *q = c->reqs;
                c->reqs = q->next;
                if (c->u->login_start == q)
                        c->u->login_start = NULL;
                if (c->u->login_wait == q)
                        c->u->login_wait = NULL;
                req_free(q);
        }
        free(c);
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

static void uplink_done(struct uplink *u) {
        /* A sign-in in flight must not report to what is freed below (oauth outlives the
         * connections for a moment). */
        oauth_login_detach(u->oauth, u);
        chan_server_free(u->server);
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
        static const struct chan_server_config server_config = {
                .name = "iothub-uplink",
                .conn_description = "uplink-conn",
                .proto = &uplink_proto,
                .conn_max = UPLINK_CONN_MAX,
                .inflight_max = UPLINK_INFLIGHT_MAX,
                .out_max = UPLINK_OUT_MAX,
                .conn_new = conn_new,
                .conn_free = conn_free,
                .dispatch = dispatch,
        };
        struct chan_server_config cfg = server_config;
        struct uplink u = {};
        int r;

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
        (void) snprintf(u.peer_rule, sizeof u.peer_rule, "only uid %u ([uplink] client_user) is served",
                        (unsigned) u.client_uid);
        cfg.peer_rule = u.peer_rule;
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
        /* Socket activation (iothub-uplink.socket keeps the socket across restarts), else
         * --listen, else [uplink] socket. */
        r = chan_server_new(u.event, &cfg, &u, listen_path, u.conf->uplink.socket, &u.server, &err);
        if (r < 0) {
                log_error_errno(r, "%s", err ? err : strerror(-r));
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

        log_event(LOG_INFO, 0, IOTHUB_MID_STARTED, NULL, NULL, "iothub-uplink %s started on %s, serving uid %u",
                  IOTHUB_VERSION, chan_server_path(u.server) ?: "the socket from systemd", (unsigned) u.client_uid);
        r = chan_server_run(u.server);
        r = r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
out:
        uplink_done(&u);
        return r;
}

int main(int argc, char *argv[]) {
        return chan_server_main(argc, argv, "iothub-uplink", "[uplink] socket", uplink_run);
}
