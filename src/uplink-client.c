/* SPDX-License-Identifier: MIT */
/* iothubd's client of iothub-uplink (uplink-client.h has the contract): the ops of
 * uplink-proto.h over chan-client.c's connection, queue and resend, the WATCH kept out, and the
 * uplink's STATUS kept for the relay and for `iothubctl status`. The uplink's answers are
 * checked by the codec (every field against the table) before anything here reads them; the
 * STATUS JSON and the news are parsed here, in the process that holds no secret. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iothub/chan-client.h"
#include "iothub/log.h"
#include "iothub/uplink-client.h"
#include "iothub/uplink-proto.h"

enum call_type { CALL_REQUEST, CALL_REGISTER, CALL_LOGIN_START, CALL_LOGIN_WAIT, CALL_LOGOUT, CALL_STATUS, CALL_WATCH };

struct uplink_call {
        struct chan_op base; /* first: a call is its op */
        struct uplink_client *u;
        enum call_type type;
        union call_done {
                uplink_done_t request;
                void (*reg)(void *userdata, long status, const char *message);
                void (*login_start)(void *userdata, int r, json_t *info);
                void (*message)(void *userdata, int r, const char *message);
                void (*logout)(void *userdata, int r);
                void (*status)(void *userdata);
        } done;
        void *userdata;
        uint64_t timeout_usec; /* its wait for the answer, 0: none (uplink_call_restart_timeout()) */
        /* The answer, kept from answer() to finish(). */
        long status;
        char *body;
        size_t body_len;
        char *text; /* RETRY_AFTER, MESSAGE, RESULT, STATUS_JSON or EVENTS */
        json_t *info;
        uint64_t gen;
};
_Static_assert(offsetof(struct uplink_call, base) == 0, "a call is its chan_op");

struct uplink_client {
        const struct iothub_conf *conf;
        struct uplink_client_events ev;
        struct chan_client *chan;
        struct uplink_call *watch, *status_call;
        /* A WATCH that ended in an error is asked again after a backoff (not at once: an uplink
         * that answers every WATCH with an error would otherwise be a tight loop). */
        sd_event *event;
        sd_event_source *watch_retry;
        unsigned watch_failures;
        uint64_t since;      /* the newest event generation handled */
        bool ask_from_zero;  /* reconnected: the uplink may have restarted */
        json_t *status;      /* the uplink's last STATUS, NULL before */
        bool have_key, have_token, login_required;
        int connect_errno;
        char last_error[256];
        uint64_t last_error_at;
};

static void watch_start(struct uplink_client *u);
static void watch_retry_later(struct uplink_client *u);

static void set_last_error(struct uplink_client *u, const char *fmt, ...) _printf_(2, 3);
static void set_last_error(struct uplink_client *u, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(u->last_error, sizeof u->last_error, fmt, ap);
        va_end(ap);
        u->last_error_at = now_monotonic_usec();
}

static void status_changed(struct uplink_client *u) {
        if (u->ev.status_changed)
                u->ev.status_changed(u->ev.userdata);
}

/* ---- calls ---- */

static void call_clear(struct uplink_call *q) {
        free(q->body);
        q->body = NULL;
        free(q->text);
        q->text = NULL;
        json_decref(q->info);
        q->info = NULL;
}

void uplink_call_cancel(struct uplink_call *q) {
        if (!q)
                return;
        chan_op_cancel(&q->base);
        call_clear(q);
        free(q);
}

void uplink_call_restart_timeout(struct uplink_call *q) {
        if (q)
                chan_op_restart_timeout(&q->base, q->timeout_usec);
}

static int call_new(struct uplink_client *u, unsigned code, enum call_type type, void *userdata,
                    struct uplink_call **ret) {
        struct uplink_call *q;
        int r;

        if (!u)
                return -EINVAL;
        q = calloc(1, sizeof *q);
        if (!q)
                return -ENOMEM;
        r = chan_op_begin(u->chan, &q->base, code, type == CALL_STATUS || type == CALL_WATCH ? 1 : 0);
        if (r < 0) {
                free(q);
                return r;
        }
        q->u = u;
        q->type = type;
        q->userdata = userdata;
        *ret = q;
        return 0;
}

static int call_submit(struct uplink_client *u, struct uplink_call *q, uint64_t timeout_s, struct uplink_call **ret) {
        int r;

        q->timeout_usec = timeout_s * UINT64_C(1000000);
        r = chan_op_submit(u->chan, &q->base, q->timeout_usec);
        if (r < 0) {
                uplink_call_cancel(q);
                return r;
        }
        *ret = q;
        return 0;
}

static int dup_text(const struct tlv_msg *m, unsigned tag, char **ret) {
        return tlv_msg_has(m, tag) ? tlv_msg_strdup(m, tag, ret) : 0;
}

/* chan-client.c's answer hook: what the answer carries, kept in the call until finish(). */
static int on_answer(void *userdata, struct chan_op *base, const struct tlv_msg *m) {
        struct uplink_call *q = (struct uplink_call *) base;
        uint64_t v = 0;
        int r = 0;

        switch (q->type) {
        case CALL_REQUEST:
                (void) tlv_msg_u64(m, UPLINK_TAG_HTTP_STATUS, &v);
                q->status = (long) v;
                if (tlv_msg_has(m, UPLINK_TAG_BODY)) {
                        const struct tlv_field *f = &m->f[UPLINK_TAG_BODY];
                        q->body = malloc(f->len + 1);
                        if (!q->body)
                                return -ENOMEM;
                        if (f->len > 0)
                                memcpy(q->body, f->data, f->len);
                        q->body[f->len] = '\0';
                        q->body_len = f->len;
                }
                return dup_text(m, UPLINK_TAG_RETRY_AFTER, &q->text);
        case CALL_REGISTER:
                /* No HTTP status: it failed before a final answer, MESSAGE says why. */
                q->status = tlv_msg_u64(m, UPLINK_TAG_HTTP_STATUS, &v) >= 0 ? (long) v : -EPROTO;
                return dup_text(m, UPLINK_TAG_MESSAGE, &q->text);
        case CALL_LOGIN_START: {
                _cleanup_free_ char *code = NULL, *uri = NULL, *complete = NULL;

                if ((r = dup_text(m, UPLINK_TAG_USER_CODE, &code)) < 0 ||
                    (r = dup_text(m, UPLINK_TAG_VERIFICATION_URI, &uri)) < 0 ||
                    (r = dup_text(m, UPLINK_TAG_VERIFICATION_URI_COMPLETE, &complete)) < 0)
                        return r;
                (void) tlv_msg_u64(m, UPLINK_TAG_EXPIRES_IN, &v);
                if (!code || !uri)
                        return -EBADMSG;
                q->info = json_pack("{s:s,s:s,s:s*,s:I}", "user_code", code, "verification_uri", uri,
                                    "verification_uri_complete", complete, "expires_in",
                                    (json_int_t) (v > INT32_MAX ? INT32_MAX : v));
                return q->info ? 0 : -ENOMEM;
        }
        case CALL_LOGIN_WAIT:
                return dup_text(m, UPLINK_TAG_RESULT, &q->text);
        case CALL_STATUS:
                return dup_text(m, UPLINK_TAG_STATUS_JSON, &q->text);
        case CALL_WATCH:
                (void) tlv_msg_u64(m, UPLINK_TAG_GEN, &q->gen);
                return dup_text(m, UPLINK_TAG_EVENTS, &q->text);
        case CALL_LOGOUT:
                return 0;
        }
        return 0;
}

/* The channel's error answers carry no field: the uplink's errno says which failure it was
 * (http.c maps curl's codes so), in words for status and the log; curl's own words are in
 * iothub-uplink's log. */
static const char *error_text(int r, char *buf, size_t size) {
        switch (r) {
        case -ENOKEY:
                return "the uplink cannot sign with the hub key (signer: Required key not available)";
        case -EACCES:
                return "the uplink has no token: sign in (iothubctl login)";
        case -ETIMEDOUT:
                return "timed out";
        case -EHOSTUNREACH:
                return "could not resolve the cloud's host name";
        case -ECONNREFUSED:
                return "could not connect to the cloud";
        case -EPROTO:
                return "TLS failed: the cloud's certificate or host name did not verify against [cloud] ca_file";
        case -ECONNRESET:
                return "the connection to the cloud was cut";
        case -EFBIG:
                return "the cloud's answer is over the size limit";
        case -EHOSTDOWN:
                return "the uplink cannot sign: the TPM is unreachable";
        default:
                (void) snprintf(buf, size, "%s", strerror(-r));
                return buf;
        }
}

static void status_answered(struct uplink_client *u, int r, const char *text);
static void watch_answered(struct uplink_client *u, int r, uint64_t gen, const char *events);

/* chan-client.c's finish hook: the call ended (out of the queue already). */
static void on_finish(void *userdata, struct chan_op *base, int r) {
        struct uplink_client *u = userdata;
        struct uplink_call *q = (struct uplink_call *) base;
        char buf[128];

        switch (q->type) {
        case CALL_REQUEST: {
                struct uplink_answer a = {
                        .error = r < 0 ? r : 0,
                        .error_text = r < 0 ? error_text(r, buf, sizeof buf) : "",
                        .status = r < 0 ? 0 : q->status,
                        .body = q->body ? q->body : "",
                        .body_len = q->body_len,
                        .retry_after = q->text ? q->text : "",
                };
                /* The uplink lost its key or its token (an uplink restarted, a sign-out): what
                 * it says next comes with its news; until then the relay waits. */
                if ((r == -ENOKEY && u->have_key) || (r == -EACCES && u->have_token)) {
                        if (r == -ENOKEY)
                                u->have_key = false;
                        else
                                u->have_token = false;
                        uplink_refresh_status(u);
                }
                q->done.request(q->userdata, &a);
                break;
        }
        case CALL_REGISTER:
                if (r < 0) {
                        const char *t = r == -EBUSY ? "busy: another registration is under way"
                                                    : error_text(r, buf, sizeof buf);
                        q->done.reg(q->userdata, r, t);
                } else
                        q->done.reg(q->userdata, q->status, q->text ? q->text : "");
                break;
        case CALL_LOGIN_START:
                q->done.login_start(q->userdata, r, r < 0 ? NULL : q->info);
                break;
        case CALL_LOGIN_WAIT:
                q->done.message(q->userdata, r, r < 0 ? NULL : q->text ? q->text : "signed in");
                break;
        case CALL_LOGOUT:
                q->done.logout(q->userdata, r);
                break;
        case CALL_STATUS:
                if (u->status_call == q)
                        u->status_call = NULL;
                status_answered(u, r, q->text);
                if (q->done.status)
                        q->done.status(q->userdata);
                break;
        case CALL_WATCH:
                u->watch = NULL;
                watch_answered(u, r, q->gen, q->text);
                break;
        }
        /* Ended: the call was its caller's until done() returned (uplink-client.h). */
        uplink_call_cancel(q);
}

/* ---- the ops ---- */

int uplink_request(struct uplink_client *u, unsigned kind, const char *arg, char *body, size_t body_len,
                   long timeout_s, uplink_done_t done, void *userdata, struct uplink_call **ret) {
        _cleanup_free_ char *b = body;
        struct uplink_call *q;
        uint64_t t;
        int r;

        if (!done || timeout_s < 0)
                return -EINVAL;
        t = timeout_s > 0 ? (uint64_t) timeout_s : (uint64_t) u->conf->cloud.timeout_s;
        if (t > UPLINK_TIMEOUT_MAX_S)
                t = UPLINK_TIMEOUT_MAX_S;
        r = call_new(u, UPLINK_OP_REQUEST, CALL_REQUEST, userdata, &q);
        if (r < 0)
                return r;
        q->done.request = done;
        (void) tlv_msg_add_u8(&q->base.req, UPLINK_TAG_KIND, (uint8_t) kind);
        if (arg)
                (void) tlv_msg_add_str(&q->base.req, UPLINK_TAG_ARG, arg);
        if (kind != UPLINK_KIND_COMMANDS_POLL)
                (void) tlv_msg_add(&q->base.req, UPLINK_TAG_BODY, b ? b : "", b ? body_len : 0);
        (void) tlv_msg_add_u64(&q->base.req, UPLINK_TAG_TIMEOUT, t);
        /* A failed add is reported by tlv_msg_end() in call_submit(). The body is in the
         * request now (kept for a resend): ours is freed on return. */
        return call_submit(u, q, t + UPLINK_CLIENT_MARGIN_S, ret);
}

/* An op without fields: queued with its done(). */
static int plain_call(struct uplink_client *u, unsigned code, enum call_type type, union call_done done,
                      void *userdata, uint64_t timeout_s, struct uplink_call **ret) {
        struct uplink_call *q;
        int r = call_new(u, code, type, userdata, &q);

        if (r < 0)
                return r;
        q->done = done;
        return call_submit(u, q, timeout_s, ret);
}

int uplink_register(struct uplink_client *u, void (*done)(void *userdata, long status, const char *message),
                    void *userdata, struct uplink_call **ret) {
        return done ? plain_call(u, UPLINK_OP_REGISTER, CALL_REGISTER, (union call_done){ .reg = done }, userdata,
                                 UPLINK_CLIENT_OP_TIMEOUT_S, ret)
                    : -EINVAL;
}

int uplink_login_start(struct uplink_client *u, void (*done)(void *userdata, int r, json_t *info), void *userdata,
                       struct uplink_call **ret) {
        return done ? plain_call(u, UPLINK_OP_LOGIN_START, CALL_LOGIN_START, (union call_done){ .login_start = done },
                                 userdata, UPLINK_CLIENT_OP_TIMEOUT_S, ret)
                    : -EINVAL;
}

int uplink_login_wait(struct uplink_client *u, void (*done)(void *userdata, int r, const char *message),
                      void *userdata, struct uplink_call **ret) {
        /* No timeout: as long as the sign-in lasts (RFC 8628 expires_in, the uplink's). */
        return done ? plain_call(u, UPLINK_OP_LOGIN_WAIT, CALL_LOGIN_WAIT, (union call_done){ .message = done },
                                 userdata, 0, ret)
                    : -EINVAL;
}

int uplink_logout(struct uplink_client *u, void (*done)(void *userdata, int r), void *userdata,
                  struct uplink_call **ret) {
        return done ? plain_call(u, UPLINK_OP_LOGOUT, CALL_LOGOUT, (union call_done){ .logout = done }, userdata,
                                 UPLINK_CLIENT_OP_TIMEOUT_S, ret)
                    : -EINVAL;
}

/* ---- STATUS ---- */

static void status_answered(struct uplink_client *u, int r, const char *text) {
        json_t *st, *up;
        bool key, token, login;

        /* A STATUS that failed or timed out (a busy uplink, a lost connection: said by
         * on_disconnected()) leaves the last one. */
        if (r < 0)
                return;
        st = json_loads(text ? text : "", JSON_REJECT_DUPLICATES, NULL);
        if (!json_is_object(st)) {
                json_decref(st);
                set_last_error(u, "the uplink's status is not a JSON object");
                return;
        }
        up = json_object_get(st, "uplink");
        key = json_is_true(json_object_get(up, "have_key"));
        token = json_is_true(json_object_get(up, "have_token"));
        login = streq_ptr(json_string_value(json_object_get(json_object_get(st, "oauth"), "state")),
                          "login_required");
        json_decref(u->status);
        u->status = st;
        u->have_key = key;
        u->have_token = token;
        u->login_required = login;
        status_changed(u);
}

void uplink_refresh_status(struct uplink_client *u) {
        struct uplink_call *q;

        if (!u || u->status_call)
                return;
        if (call_new(u, UPLINK_OP_STATUS, CALL_STATUS, NULL, &q) < 0)
                return;
        (void) call_submit(u, q, UPLINK_CLIENT_STATUS_TIMEOUT_S, &u->status_call);
}

int uplink_status_fresh(struct uplink_client *u, uint64_t timeout_ms, void (*done)(void *userdata),
                        void *userdata, struct uplink_call **ret) {
        struct uplink_call *q;
        int r;

        if (!done)
                return -EINVAL;
        if (!chan_client_is_connected(u->chan))
                return -ENOTCONN;
        r = call_new(u, UPLINK_OP_STATUS, CALL_STATUS, userdata, &q);
        if (r < 0)
                return r;
        q->done.status = done;
        q->timeout_usec = timeout_ms * 1000;
        r = chan_op_submit(u->chan, &q->base, q->timeout_usec);
        if (r < 0) {
                uplink_call_cancel(q);
                return r;
        }
        *ret = q;
        return 0;
}

/* ---- WATCH ---- */

/* The news since the last WATCH: each reaches the events' table once. An uplink that restarted
 * counts its generations from 0 again: an answer whose GEN is below what was seen says so, and
 * its news are all new. */
static void watch_answered(struct uplink_client *u, int r, uint64_t gen, const char *events) {
        json_t *arr = NULL, *e;
        uint64_t seen = u->since;
        size_t i;

        if (r < 0) {
                /* -ETIMEDOUT cannot happen (no deadline). A lost connection does not end it
                 * (chan-client.c resends it on the next one); an error answer does: ask again
                 * after a backoff, UPLINK_CLIENT_RECONNECT_MIN_MS doubling up to _MAX_MS. */
                if (r != -ECANCELED) {
                        log_debug("WATCH ended: %s", strerror(-r));
                        watch_retry_later(u);
                } else
                        watch_start(u);
                return;
        }
        u->watch_failures = 0;
        if (gen < seen)
                seen = 0; /* a restarted uplink */
        u->ask_from_zero = false;
        arr = json_loads(events ? events : "[]", JSON_REJECT_DUPLICATES, NULL);
        u->since = gen;
        json_array_foreach(arr, i, e) {
                const char *type = json_string_value(json_object_get(e, "type"));
                json_t *g = json_object_get(e, "gen");

                if (!type || (json_is_integer(g) && (uint64_t) json_integer_value(g) <= seen))
                        continue;
                if (u->ev.event)
                        u->ev.event(u->ev.userdata, type, json_string_value(json_object_get(e, "reason")));
        }
        json_decref(arr);
        /* Every piece of news may change what STATUS says (a token, a key). */
        uplink_refresh_status(u);
        watch_start(u);
}

static int on_watch_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        struct uplink_client *u = userdata;

        u->watch_retry = sd_event_source_disable_unref(u->watch_retry);
        watch_start(u);
        return 0;
}

static void watch_retry_later(struct uplink_client *u) {
        uint32_t rnd = 0;
        uint64_t ms;
        int r;

        if (u->watch_retry)
                return;
        (void) random_bytes(&rnd, sizeof rnd);
        ms = backoff_ms(u->watch_failures, UPLINK_CLIENT_RECONNECT_MIN_MS, UPLINK_CLIENT_RECONNECT_MAX_MS, rnd);
        if (u->watch_failures < UINT_MAX)
                u->watch_failures++;
        r = sd_event_add_time_relative(u->event, &u->watch_retry, CLOCK_MONOTONIC, ms * 1000, 0, on_watch_retry, u);
        if (r < 0) {
                /* No timer: the news would stop for good; ask now rather than never. */
                log_error_errno(r, "Cannot schedule the next WATCH: %m");
                watch_start(u);
        }
}

static void watch_start(struct uplink_client *u) {
        struct uplink_call *q;
        int r;

        if (u->watch || u->watch_retry)
                return;
        r = call_new(u, UPLINK_OP_WATCH, CALL_WATCH, NULL, &q);
        if (r >= 0) {
                (void) tlv_msg_add_u64(&q->base.req, UPLINK_TAG_SINCE, u->ask_from_zero ? 0 : u->since);
                r = call_submit(u, q, 0, &u->watch);
        }
        if (r < 0)
                log_error_errno(r, "Cannot ask the uplink for its news: %m");
}

/* ---- the connection ---- */

static void on_connected(void *userdata) {
        struct uplink_client *u = userdata;

        if (u->connect_errno)
                log_info("Connected to the uplink at %s", u->conf->uplink.socket);
        u->connect_errno = 0;
        u->last_error[0] = '\0';
        /* A WATCH resent to a restarted uplink would wait for generations it has not reached:
         * ask from 0, and let the GEN of the answer tell a restart (watch_answered()). */
        if (u->watch && u->since > 0) {
                struct uplink_call *w = u->watch;
                u->watch = NULL;
                uplink_call_cancel(w);
                u->ask_from_zero = true;
        }
        watch_start(u);
        uplink_refresh_status(u);
        status_changed(u);
}

static void on_disconnected(void *userdata, int error, bool was) {
        struct uplink_client *u = userdata;

        if (was)
                log_warning("Lost the connection to the uplink (%s); requests wait for it", strerror(-error));
        else if (error != u->connect_errno)
                log_warning("Cannot reach the uplink at %s: %s; trying again", u->conf->uplink.socket,
                            strerror(-error));
        u->connect_errno = error;
        set_last_error(u, "uplink unreachable at %s: %s", u->conf->uplink.socket, strerror(-error));
        if (was)
                status_changed(u);
}

int uplink_client_new(sd_event *e, const struct iothub_conf *conf, const struct uplink_client_events *ev,
                      struct uplink_client **ret) {
        struct uplink_client *u;
        int r;

        if (!conf->cloud.url) {
                *ret = NULL;
                return 0;
        }
        u = calloc(1, sizeof *u);
        if (!u)
                return -ENOMEM;
        u->conf = conf;
        u->event = e;
        if (ev)
                u->ev = *ev;
        r = chan_client_new(e,
                            &(struct chan_client_params){ .proto = &uplink_proto,
                                                          .socket = conf->uplink.socket,
                                                          .queue_max = UPLINK_CLIENT_QUEUE_MAX,
                                                          .inflight_max = UPLINK_CLIENT_INFLIGHT_MAX,
                                                          .cancel_op = UPLINK_OP_CANCEL,
                                                          .reconnect_min_ms = UPLINK_CLIENT_RECONNECT_MIN_MS,
                                                          .reconnect_max_ms = UPLINK_CLIENT_RECONNECT_MAX_MS },
                            &(struct chan_client_events){ .answer = on_answer,
                                                          .finish = on_finish,
                                                          .connected = on_connected,
                                                          .disconnected = on_disconnected,
                                                          .userdata = u },
                            &u->chan);
        if (r < 0) {
                free(u);
                return r;
        }
        watch_start(u);
        *ret = u;
        return 0;
}

struct uplink_client *uplink_client_free(struct uplink_client *u) {
        if (!u)
                return NULL;
        uplink_call_cancel(u->watch);
        uplink_call_cancel(u->status_call);
        u->watch_retry = sd_event_source_disable_unref(u->watch_retry);
        /* The callers' calls end without done(): their owners free them. */
        chan_client_free(u->chan);
        json_decref(u->status);
        free(u);
        return NULL;
}

/* ---- state ---- */

bool uplink_have_key(const struct uplink_client *u) {
        return u && u->have_key;
}

bool uplink_have_token(const struct uplink_client *u) {
        return u && u->have_token;
}

bool uplink_login_required(const struct uplink_client *u) {
        return u && u->login_required;
}

bool uplink_is_connected(const struct uplink_client *u) {
        return u && chan_client_is_connected(u->chan);
}

const char *uplink_last_error(const struct uplink_client *u, uint64_t *ret_at) {
        const char *e;

        if (!u)
                return "";
        if (u->last_error[0]) {
                if (ret_at)
                        *ret_at = u->last_error_at;
                return u->last_error;
        }
        e = json_string_value(json_object_get(json_object_get(u->status, "uplink"), "last_error"));
        if (ret_at)
                *ret_at = 0;
        return e ? e : "";
}

const char *uplink_key_error(const struct uplink_client *u) {
        const char *e = u ? json_string_value(json_object_get(json_object_get(u->status, "signer"), "last_error")) : NULL;

        return e && e[0] ? e : NULL;
}

uint64_t uplink_signatures(const struct uplink_client *u) {
        json_int_t n = u ? json_integer_value(json_object_get(json_object_get(u->status, "signer"), "signatures")) : 0;

        return n > 0 ? (uint64_t) n : 0;
}

int uplink_status_json(const struct uplink_client *u, json_t *o) {
        struct chan_client_counters n;
        json_t *oauth, *up;

        if (!u)
                return 0;
        chan_client_counters(u->chan, &n);
        oauth = json_object_get(u->status, "oauth");
        if (json_object_set_new(o, "oauth", oauth ? json_deep_copy(oauth) : json_pack("{s:s}", "state", "unknown")) < 0)
                return -ENOMEM;
        up = json_pack("{s:b,s:s,s:I,s:I,s:I,s:I,s:I,s:s*,s:O*}", "connected", chan_client_is_connected(u->chan),
                       "socket", u->conf->uplink.socket, "reconnects", (json_int_t) n.reconnects, "pending",
                       (json_int_t) n.pending, "resent", (json_int_t) n.resent, "timeouts",
                       (json_int_t) n.timeouts, "cancelled", (json_int_t) n.cancels_sent, "last_error",
                       u->last_error[0] ? u->last_error : NULL, "remote", u->status);
        if (!up)
                return -ENOMEM;
        return json_object_set_new(o, "uplink", up) < 0 ? -ENOMEM : 0;
}
