/* SPDX-License-Identifier: MIT */
/* The control socket. One request line of JSON in (at most CONTROL_REQUEST_MAX bytes), one
 * response line of JSON out, then the daemon closes. Peers are checked with SO_PEERCRED and
 * SO_PEERGROUPS before a byte is read. At most CONTROL_MAX_CLIENTS at once, each with a
 * deadline (for its request, then for reading its answer), so that a stuck client cannot hold
 * the daemon. */
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "iothub/cloud.h"
#include "iothub/control.h"
#include "iothub/dynsec.h"
#include "iothub/enrol.h"
#include "iothub/pair.h"
#include "iothub/log.h"
#include "iothub/registry.h"
#include "iothub/uplink-client.h"
#include "iothub/verify.h"

#define CONTROL_MAX_GROUPS 256
#define CONTROL_PEM_MAX 16384
#define CONTROL_REQUEST_FIRST 1024 /* the input buffer doubles from this up to CONTROL_REQUEST_MAX */
/* At most one "control socket full" line of each kind per window: the peers cause them. */
#define CONTROL_FULL_LOG_WINDOW_USEC (10 * UINT64_C(1000000))
/* Refused peers logged per window: enough to name each of a few, not a line per connection. */
#define CONTROL_REFUSED_LOG_BURST 5
#define CONTROL_LISTEN_BACKLOG 128
#define CONTROL_UPLINK_STATUS_MS 500
/* A durable answer waits for the database's sync (conn_send_when_durable()) at most this many
 * connection deadlines: 30 s by default. A sync takes milliseconds; one that has not come in
 * 30 s is a storage that hangs (a failing SD card), and every such request would otherwise hold
 * its client, and one of the CONTROL_MAX_CLIENTS slots (a pending connection is not evicted),
 * for as long as it hangs: 16 of them and the operator could no longer even ask `status`. */
#define CONTROL_DURABLE_DEADLINES 6

struct control {
        sd_event *event;
        const struct iothub_conf *conf;
        struct registry *registry;
        struct cloud *cloud; /* NULL without [cloud] url */
        struct uplink_client *uplink; /* NULL without [cloud] url: sign-in is iothub-uplink's */
        struct dynsec *dynsec; /* NULL without [broker] dynsec */
        struct pair *pair;
        struct control_events ev;
        int fd;
        char *path;
        sd_event_source *listen;
        unsigned n_clients;
        struct conn *conns; /* every open connection, so that control_free() ends them */
        /* Sign-in (iothub-uplink's LOGIN_START and LOGIN_WAIT): the connection waiting for the
         * code and its call, the one waiting for the outcome and the call that waits for it
         * (kept when its connection goes, for the next waiter), and the outcome if it came while
         * nobody waited. */
        struct conn *login_conn, *wait_conn;
        struct uplink_call *login_call, *wait_call;
        bool login_finished;
        int login_r;
        char login_message[256];
        uint64_t evicted; /* idle connections closed to make room (evict_idle()) */
        uint64_t timeout_usec; /* each connection's deadline: CONTROL_TIMEOUT_USEC */
        struct ratelimit evict_log, full_log, refused_log;
};

struct conn {
        struct control *ctl;
        int fd;
        sd_event_source *io, *timer;
        char *in;
        size_t in_len, in_cap;
        char *out;
        size_t out_len, out_off;
        bool pending; /* waiting for the cloud (register); the answer comes later */
        /* What the connection waits for, owned by it: freeing the connection (the client hung
         * up, as Ctrl-C on iothubctl does) cancels them, so their callbacks never run after. */
        struct cloud_call *register_call;
        struct uplink_call *logout_call;
        struct uplink_call *status_call; /* the uplink's STATUS, for status */
        /* bulb add / remove waiting for the broker's dynamic security plugin: the request, the
         * answer it completes, and a new bulb's broker password until it is shown (once). */
        struct dynsec_op *dynsec_op;
        json_t *dynsec_reply;
        char broker_password[DYNSEC_PASSWORD_LEN + 1];
        /* bulb pair: the window this connection holds open, and lines streamed to the client
         * (one JSON object per line) before the final answer. */
        struct pair_window *pair_window;
        bool stream;
        bool draining; /* answered an over-long request: reading the rest before closing */
        /* A request that changes security state: its answer, once made, waits in out for the
         * sync of the database's commits (conn_send_when_durable()), owned here like the rest. */
        bool durable;
        bool syncing; /* the answer waits for that sync, at most CONTROL_DURABLE_DEADLINES */
        struct db_sync_wait *sync_wait;
        struct conn *next, *prev;
};

/* A handler's answer when the reply comes later, or has already been set. */
static json_t pending_reply, answered_reply;
#define CONTROL_PENDING (&pending_reply)
#define CONTROL_ANSWERED (&answered_reply)

#define _cleanup_json_ _cleanup_(json_decrefp)

bool control_peer_allowed(uid_t peer_uid, gid_t peer_gid, const gid_t *peer_groups, size_t n_groups,
                          uid_t our_uid, gid_t our_gid) {
        if (peer_uid == 0 || peer_uid == our_uid || peer_gid == our_gid)
                return true;
        for (size_t i = 0; i < n_groups; i++)
                if (peer_groups[i] == our_gid)
                        return true;
        return false;
}

static void conn_free(struct conn *c) {
        if (!c)
                return;
        if (c->next)
                c->next->prev = c->prev;
        if (c->prev)
                c->prev->next = c->next;
        else
                c->ctl->conns = c->next;
        cloud_register_cancel(TAKE_PTR(c->register_call));
        uplink_call_cancel(TAKE_PTR(c->logout_call));
        uplink_call_cancel(TAKE_PTR(c->status_call));
        dynsec_op_cancel(TAKE_PTR(c->dynsec_op));
        db_sync_wait_cancel(TAKE_PTR(c->sync_wait));
        /* The client hung up (Ctrl-C on iothubctl bulb pair): the window closes with it. */
        pair_window_close(TAKE_PTR(c->pair_window));
        json_decref(c->dynsec_reply);
        explicit_bzero(c->broker_password, sizeof c->broker_password);
        c->io = sd_event_source_disable_unref(c->io);
        c->timer = sd_event_source_disable_unref(c->timer);
        if (c->fd >= 0)
                (void) close(c->fd);
        c->ctl->n_clients--;
        if (c->ctl->login_conn == c) {
                /* The uplink's sign-in goes on: the user may still approve it (login-wait). */
                uplink_call_cancel(TAKE_PTR(c->ctl->login_call));
                c->ctl->login_conn = NULL;
        }
        if (c->ctl->wait_conn == c)
                c->ctl->wait_conn = NULL;
        free(c->in);
        if (c->out) /* may hold a broker password */
                explicit_bzero(c->out, c->out_len);
        free(c->out);
        free(c);
}

static json_t *error_reply(const char *fmt, ...) _printf_(1, 2);
static json_t *error_reply(const char *fmt, ...) {
        char msg[512];
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        return json_pack("{s:b,s:s}", "ok", 0, "error", msg);
}

static json_t *bulb_to_json(const struct bulb *b) {
        json_t *o, *jwk = NULL;

        if (verify_raw_to_jwk(&b->pub, &jwk) < 0)
                jwk = json_null();
        o = json_pack("{s:s,s:s,s:b,s:I,s:I,s:o}", "id", b->id, "alg", frame_alg_to_string(b->alg), "revoked",
                      b->revoked, "last_seq", (json_int_t) b->last_seq, "enrolled_at",
                      (json_int_t) b->enrolled_at, "jwk", jwk);
        return o;
}

/* The list of enrolled bulbs changed: whoever listens (the cloud relay) hears it. */
static void devices_changed(struct control *ctl) {
        if (ctl->ev.devices_changed)
                ctl->ev.devices_changed(ctl->ev.userdata);
}

static void conn_answer(struct conn *c, json_t *reply);

static json_t *status_reply(struct control *ctl) {
        json_t *st = NULL;
        int r;

        r = ctl->ev.status_json ? ctl->ev.status_json(ctl->ev.userdata, &st) : -EOPNOTSUPP;
        if (r < 0)
                return error_reply("cannot build status: %s", strerror(-r));
        (void) json_object_set_new(st, "ok", json_true());
        return st;
}

static void on_uplink_status(void *userdata) {
        struct conn *c = userdata;

        c->status_call = NULL; /* the uplink client frees it after this call */
        conn_answer(c, status_reply(c->ctl));
}

static json_t *handle_status(struct control *ctl, struct conn *conn, json_t *req) {
        /* The uplink's part (sign-in, its signatures) as it is now, not as of its last news:
         * asked first, for at most CONTROL_UPLINK_STATUS_MS (a stuck uplink must not hold the
         * status, which is how the operator finds out). Not connected: its last answer. */
        if (ctl->uplink &&
            uplink_status_fresh(ctl->uplink, CONTROL_UPLINK_STATUS_MS, on_uplink_status, conn, &conn->status_call) >= 0)
                return CONTROL_PENDING;
        return status_reply(ctl);
}

static json_t *handle_bulb_list(struct control *ctl, struct conn *conn, json_t *req) {
        json_t *arr = json_array();
        size_t n = registry_count(ctl->registry);

        if (!arr)
                return NULL;
        for (size_t i = 0; i < n; i++)
                (void) json_array_append_new(arr, bulb_to_json(registry_get(ctl->registry, i)));
        return json_pack("{s:b,s:o}", "ok", 1, "bulbs", arr);
}

const char *control_request_string(const json_t *req, const char *key, size_t max) {
        json_t *v = json_object_get(req, key);

        if (!json_is_string(v) || json_string_length(v) > max || json_string_length(v) == 0)
                return NULL;
        return json_string_value(v);
}

static const char *req_string(json_t *req, const char *key, size_t max) {
        return control_request_string(req, key, max);
}

static int conn_set_reply(struct conn *c, json_t *reply);

/* The answer to a request that waited (pending): it goes now, or the connection ends when it
 * cannot be made (no memory). */
static void conn_answer(struct conn *c, json_t *reply) {
        c->pending = false;
        if (conn_set_reply(c, reply) < 0)
                conn_free(c);
}

/* The plugin's answer for a bulb add or remove: completes the reply kept in the connection. */
static void on_dynsec_done(void *userdata, int r, const char *error) {
        struct conn *c = userdata;
        json_t *reply = TAKE_PTR(c->dynsec_reply), *broker;

        c->dynsec_op = NULL; /* freed by dynsec after this call */
        broker = r < 0 ? json_pack("{s:b,s:s}", "ok", 0, "error", error ? error : strerror(-r))
                       : json_pack("{s:b}", "ok", 1);
        if (reply && broker)
                (void) json_object_set_new(reply, "broker", broker);
        else
                json_decref(broker);
        if (reply && r >= 0 && c->broker_password[0])
                (void) json_object_set_new(reply, "broker_password", json_string(c->broker_password));
        explicit_bzero(c->broker_password, sizeof c->broker_password);
        conn_answer(c, reply);
}

/* Hands the reply to the broker step of a bulb add or remove: PENDING while the plugin works,
 * the reply with the reason when the request could not even be sent. */
static json_t *dynsec_reply_later(struct conn *conn, json_t *reply, int r) {
        if (r >= 0) {
                conn->dynsec_reply = reply;
                return CONTROL_PENDING;
        }
        explicit_bzero(conn->broker_password, sizeof conn->broker_password);
        if (reply)
                (void) json_object_set_new(
                        reply, "broker",
                        json_pack("{s:b,s:s}", "ok", 0, "error",
                                  r == -ENOTCONN ? "not connected to the broker: repaired at the next connection"
                                                 : strerror(-r)));
        return reply;
}

static json_t *handle_bulb_add(struct control *ctl, struct conn *conn, json_t *req) {
        const struct iothub_conf *conf = ctl->conf;
        const char *id = req_string(req, "id", DEVICE_ID_MAX);
        const char *pem = req_string(req, "key", CONTROL_PEM_MAX);
        const char *cert = req_string(req, "cert", CONTROL_PEM_MAX);
        bool want_password = json_is_true(json_object_get(req, "broker_password"));
        _cleanup_free_ char *err = NULL;
        struct bulb *b;
        int r;

        if (want_password && !ctl->dynsec)
                return error_reply("[broker] dynsec is off in %s: the hub keeps no broker clients", conf->path);
        /* Checked before enrolling: a password that cannot be set now could never be shown. */
        if (want_password && !dynsec_ready(ctl->dynsec))
                return error_reply("not connected to the broker: cannot create the bulb's broker password now");
        r = enrol_bulb(conf, ctl->registry, id, pem, cert, &b, &err);
        if (r < 0)
                return error_reply("%s", err ? err : strerror(-r));
        if (ctl->ev.bulb_enrolled)
                ctl->ev.bulb_enrolled(ctl->ev.userdata, b->id);
        json_t *reply = json_pack("{s:b,s:o}", "ok", 1, "bulb", bulb_to_json(b));
        if (!ctl->dynsec)
                return reply;
        if (want_password && (r = dynsec_password_new(conn->broker_password)) < 0)
                return dynsec_reply_later(conn, reply, r);
        r = dynsec_bulb_create(ctl->dynsec, b->id, want_password ? conn->broker_password : NULL, on_dynsec_done,
                               conn, &conn->dynsec_op);
        return dynsec_reply_later(conn, reply, r);
}

/* Appends one line for the client of a streaming request (bulb pair) and lets the loop send it.
 * A line that cannot be queued is dropped: the final answer still comes. */
static void conn_stream_line(struct conn *c, json_t *line) {
        _cleanup_free_ char *s = line ? json_dumps(line, JSON_COMPACT) : NULL;
        size_t len;
        char *t;

        json_decref(line);
        if (!s)
                return;
        len = strlen(s);
        if (c->out_len - c->out_off + len + 1 > CONTROL_STREAM_BUFFER_MAX)
                return; /* a client that does not read: bounded, the rest is dropped */
        t = realloc(c->out, c->out_len + len + 1);
        if (!t)
                return;
        c->out = t;
        memcpy(c->out + c->out_len, s, len);
        c->out[c->out_len + len] = '\n';
        c->out_len += len + 1;
        (void) sd_event_source_set_io_events(c->io, EPOLLIN | EPOLLOUT);
}

static void on_pair_event(void *userdata, json_t *event) {
        conn_stream_line(userdata, event);
}

static void on_pair_closed(void *userdata, json_t *summary) {
        struct conn *c = userdata;

        c->pair_window = NULL; /* freed by pair.c after this call */
        c->stream = false;
        if (summary)
                (void) json_object_set_new(summary, "ok", json_true());
        conn_answer(c, summary);
}

static json_t *handle_bulb_pair(struct control *ctl, struct conn *conn, json_t *req) {
        json_t *v = json_object_get(req, "for");
        json_int_t seconds = PAIR_WINDOW_DEFAULT_S;
        int r;

        if (v && !json_is_integer(v))
                return error_reply("\"for\" is not a number of seconds");
        if (v)
                seconds = json_integer_value(v);
        if (seconds < 1 || seconds > PAIR_WINDOW_MAX_S)
                return error_reply("a pairing window lasts 1 to %d seconds", PAIR_WINDOW_MAX_S);
        if (!ctl->conf->bulbs.ca_file)
                return error_reply("[bulbs] ca_file is not set in %s: pairing checks certificates against it",
                                   ctl->conf->path);
        conn->stream = true; /* the "open" line comes from inside pair_open() */
        r = pair_open(ctl->pair, (unsigned) seconds,
                      &(struct pair_window_cb){ .event = on_pair_event, .closed = on_pair_closed }, conn,
                      &conn->pair_window);
        if (r < 0) {
                conn->stream = false;
                free(conn->out);
                conn->out = NULL;
                conn->out_len = conn->out_off = 0;
                if (r == -EBUSY)
                        return error_reply("a pairing window is open already");
                return error_reply("cannot open a pairing window: %s", strerror(-r));
        }
        return CONTROL_PENDING;
}

static json_t *handle_bulb_remove(struct control *ctl, struct conn *conn, json_t *req) {
        const char *id = req_string(req, "id", DEVICE_ID_MAX);
        int r;

        if (!id)
                return error_reply("missing device id");
        r = registry_revoke(ctl->registry, id);
        if (r == -ENOENT)
                return error_reply("no bulb %s is enrolled", id);
        if (r < 0)
                return error_reply("cannot revoke %s: %s", id, strerror(-r));
        log_event(LOG_NOTICE, 0, IOTHUB_MID_BULB_REVOKED, id, NULL, "Revoked bulb %s", id);
        if (ctl->ev.bulb_revoked)
                ctl->ev.bulb_revoked(ctl->ev.userdata, id);
        if (r > 0 || r == 0)
                devices_changed(ctl);
        if (!ctl->dynsec)
                return json_pack("{s:b}", "ok", 1);
        /* The plugin disconnects the bulb when its client goes. */
        r = dynsec_bulb_delete(ctl->dynsec, id, on_dynsec_done, conn, &conn->dynsec_op);
        return dynsec_reply_later(conn, json_pack("{s:b}", "ok", 1), r);
}

/* The cloud's answer to a register request. The connection waits for it (its own deadline
 * does not apply while it waits): the cloud's request timeout always ends in this call. */
static void on_register_done(void *userdata, long status, const char *message) {
        struct conn *c = userdata;
        json_t *reply;

        const char *key_error = NULL;
        struct control *ctl = c->ctl;

        if (status == 200 || status == 201)
                reply = json_pack("{s:b,s:s}", "ok", 1, "message", message);
        else if (status < 0 && ctl->ev.key_missing && ctl->ev.key_missing(ctl->ev.userdata, &key_error))
                reply = error_reply("no hub key: %s", key_error ? key_error : message);
        else if (status == -ENOKEY || status == -EACCES)
                /* The uplink has no token (its -ENOKEY is a missing token or key: the key is
                 * there, above). */
                reply = error_reply(ctl->conf->oauth.issuer
                                            ? "not signed in: run 'iothubctl login' first"
                                            : "not signed in: configure [oauth] (see iothub.conf(5)), then run "
                                              "'iothubctl login'");
        else
                reply = error_reply("register failed: %s", message);
        c->register_call = NULL; /* the cloud frees it after this call */
        conn_answer(c, reply);
}

static json_t *handle_register(struct control *ctl, struct conn *conn, json_t *req) {
        int r;

        if (!ctl->cloud)
                return error_reply("[cloud] url is not set in %s", ctl->conf->path);
        /* Whether there is a key and a token, the uplink says (on_register_done()). */
        r = cloud_register(ctl->cloud, on_register_done, conn, &conn->register_call);
        if (r < 0)
                return error_reply("cannot register: %s", strerror(-r));
        return CONTROL_PENDING;
}

/* How a sign-in ended, in words: the uplink's error answers carry no field (its log has the
 * details), its errno says which end it was (oauth.c's login_finish()). */
static const char *login_error(int r) {
        switch (r) {
        case -EACCES:
                return "the sign-in was denied";
        case -ETIMEDOUT:
                return "the code expired before it was approved; run 'iothubctl login' again";
        case -ECANCELED:
                return "another sign-in started";
        case -ENOENT:
                return "no sign-in is under way: run 'iothubctl login'";
        case -EAGAIN:
                return "the authorization server has not been reached yet; try again shortly";
        case -ENOKEY:
                return "no hub key: run 'iothubctl key init' first";
        case -EOPNOTSUPP:
                return "sign-in is not configured in iothub-uplink's configuration";
        case -EPROTO:
                return "the authorization server refused the sign-in (iothub-uplink's log says why)";
        case -EBADMSG:
                return "the token endpoint answered without usable tokens";
        default:
                return NULL;
        }
}

static void on_login_started(void *userdata, int r, json_t *info) {
        struct control *ctl = userdata;
        struct conn *c = ctl->login_conn;
        json_t *reply;

        ctl->login_call = NULL;
        ctl->login_conn = NULL;
        if (!c)
                return;
        if (r < 0)
                reply = error_reply("sign-in could not start: %s", login_error(r) ?: strerror(-r));
        else {
                reply = json_deep_copy(info);
                if (reply)
                        (void) json_object_set_new(reply, "ok", json_true());
        }
        conn_answer(c, reply);
}

static json_t *login_reply(int r, const char *message) {
        if (r < 0)
                return login_error(r) ? error_reply("%s", login_error(r)) : error_reply("sign-in failed: %s", strerror(-r));
        return json_pack("{s:b,s:s}", "ok", 1, "message", message);
}

static void on_login_finished(void *userdata, int r, const char *message) {
        struct control *ctl = userdata;
        struct conn *c = ctl->wait_conn;

        ctl->wait_call = NULL;
        ctl->wait_conn = NULL;
        if (!c) {
                ctl->login_finished = true;
                ctl->login_r = r;
                (void) snprintf(ctl->login_message, sizeof ctl->login_message, "%s", message ?: "");
                return;
        }
        conn_answer(c, login_reply(r, message));
}

static bool signin_configured(struct control *ctl) {
        return ctl->uplink && ctl->conf->oauth.issuer;
}

static json_t *handle_login(struct control *ctl, struct conn *conn, json_t *req) {
        int r;

        if (!signin_configured(ctl))
                return error_reply("sign-in is not configured: set [oauth] issuer and client_id in %s",
                                   ctl->conf->path);
        ctl->login_finished = false;
        /* The uplink ends the old flow, and answers its LOGIN_WAIT so; the waiter here hears it
         * at once. */
        uplink_call_cancel(TAKE_PTR(ctl->wait_call));
        if (ctl->wait_conn) {
                conn_answer(TAKE_PTR(ctl->wait_conn), error_reply("another sign-in started"));
        }
        if (ctl->login_conn) {
                /* A sign-in still waiting for its start (its device authorization, or the DPoP
                 * proof for it) ends here: its client hears so rather than waiting for ever. */
                uplink_call_cancel(TAKE_PTR(ctl->login_call));
                conn_answer(TAKE_PTR(ctl->login_conn), error_reply("sign-in could not start: another sign-in started"));
        }
        r = uplink_login_start(ctl->uplink, on_login_started, ctl, &ctl->login_call);
        if (r < 0)
                return error_reply("cannot start sign-in: %s", strerror(-r));
        ctl->login_conn = conn;
        return CONTROL_PENDING;
}

static json_t *handle_login_wait(struct control *ctl, struct conn *conn, json_t *req) {
        int r;

        if (!signin_configured(ctl))
                return error_reply("sign-in is not configured");
        if (ctl->login_finished) {
                ctl->login_finished = false;
                return login_reply(ctl->login_r, ctl->login_message);
        }
        if (ctl->wait_conn)
                return error_reply("someone else is already waiting for this sign-in");
        /* The uplink keeps the outcome for its next LOGIN_WAIT; one stays out here at a time
         * (the uplink takes one), kept for the next waiter when its client goes. */
        if (!ctl->wait_call) {
                r = uplink_login_wait(ctl->uplink, on_login_finished, ctl, &ctl->wait_call);
                if (r < 0)
                        return error_reply("cannot wait for the sign-in: %s", strerror(-r));
        }
        ctl->wait_conn = conn;
        return CONTROL_PENDING;
}

static void on_logout_done(void *userdata, int r) {
        struct conn *c = userdata;

        c->logout_call = NULL; /* the uplink client frees it after this call */
        conn_answer(c, r < 0 ? error_reply(r == -EBUSY ? "a sign-out is already under way" : "cannot sign out: %s",
                                           strerror(-r))
                             : json_pack("{s:b,s:s}", "ok", 1, "message", "signed out"));
}

static json_t *handle_logout(struct control *ctl, struct conn *conn, json_t *req) {
        int r;

        if (!signin_configured(ctl))
                return error_reply("sign-in is not configured");
        r = uplink_logout(ctl->uplink, on_logout_done, conn, &conn->logout_call);
        if (r < 0)
                return error_reply("cannot sign out: %s", strerror(-r));
        return CONTROL_PENDING;
}

/* durable: the request changes what the database holds about who may talk to the hub (an
 * enrolment, a revocation) or to the cloud (registered); its answer says it is done only once
 * that is on disk, so that a power cut never undoes a revocation the user was told succeeded.
 * Sign-in state lives in iothub-signer's files, not in this database. */
static const struct {
        const char *cmd;
        json_t *(*handler)(struct control *ctl, struct conn *conn, json_t *req);
        bool durable;
} handlers[] = {
        { "status", handle_status, false },
        { "bulb-list", handle_bulb_list, false },
        { "bulb-add", handle_bulb_add, true },
        { "bulb-remove", handle_bulb_remove, true },
        { "bulb-pair", handle_bulb_pair, true },
        { "register", handle_register, true },
        { "login", handle_login, false },
        { "login-wait", handle_login_wait, false },
        { "logout", handle_logout, false },
};

int control_parse_request(const char *line, size_t len, json_t **ret_req, const char **ret_cmd,
                          const char **ret_error) {
        json_error_t jerr;
        json_t *req;
        const char *cmd;

        req = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
        if (!json_is_object(req)) {
                json_decref(req);
                *ret_error = "request is not a JSON object";
                return -EBADMSG;
        }
        cmd = req_string(req, "cmd", CONTROL_CMD_MAX);
        if (!cmd) {
                json_decref(req);
                *ret_error = "request has no \"cmd\"";
                return -EBADMSG;
        }
        *ret_req = req;
        *ret_cmd = cmd;
        return 0;
}

static json_t *dispatch(struct control *ctl, struct conn *conn, const char *line, size_t len) {
        _cleanup_json_ json_t *req = NULL;
        const char *cmd, *error;

        if (control_parse_request(line, len, &req, &cmd, &error) < 0)
                return error_reply("%s", error);
        for (size_t i = 0; i < ELEMENTSOF(handlers); i++)
                if (streq(cmd, handlers[i].cmd)) {
                        conn->durable = handlers[i].durable;
                        return handlers[i].handler(ctl, conn, req);
                }
        return error_reply("unknown command '%.64s'", cmd);
}

/* The connection's deadline starts again: CONTROL_TIMEOUT_USEC from now. Called when an answer is
 * made, so that the answer has that long to go out, whatever was left of the deadline set at
 * accept. Otherwise an answer made in the same turn of the loop as the deadline (a sign-in that
 * finished 5 s after iothubctl's login-wait connected; a sync that came late) lost the race: the
 * timer, pending before the connection's EPOLLOUT, ran first and closed the connection with the
 * answer unsent, and iothubctl said "Connection reset by peer". A client that does not read its
 * answer is still closed, a deadline later. Also re-enables the one-shot timer, which has run
 * (and done nothing) when the request waited past it. */
static int conn_deadline_restart(struct conn *c) {
        int r;

        r = sd_event_source_set_time_relative(c->timer, c->ctl->timeout_usec);
        if (r < 0)
                return r;
        return sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);
}

/* The sync that conn_send_when_durable() waited for: the answer goes, or, when the fdatasync
 * failed, an error in its place (the change was made and committed, but may not survive a power
 * cut; the daemon refuses frames from now on, see ingest.c). */
static void on_durable(void *userdata, int error) {
        struct conn *c = userdata;
        int r;

        c->sync_wait = NULL; /* freed by db after this call */
        c->pending = false;
        c->syncing = false;
        if (error < 0) {
                explicit_bzero(c->out, c->out_len); /* may hold a broker password */
                free(c->out);
                c->out = NULL;
                c->out_len = c->out_off = 0;
                c->stream = false;
                if (error == -ETIMEDOUT)
                        r = conn_set_reply(c, error_reply("done, but not known to be on disk: the database's fdatasync "
                                                          "has not returned in %" PRIu64 " s (is the storage failing?); "
                                                          "see journalctl -u iothubd",
                                                          c->ctl->timeout_usec * CONTROL_DURABLE_DEADLINES / 1000000));
                else
                        r = conn_set_reply(c, error_reply("done, but may not be on disk: the database's fdatasync "
                                                          "failed (%s); restart the daemon and check",
                                                          strerror(-error)));
        } else {
                r = conn_deadline_restart(c);
                if (r >= 0)
                        r = sd_event_source_set_io_events(c->io, EPOLLOUT);
        }
        /* -ESTALE: the loop has finished; this is the last sync of hub_done(), and
         * control_free() sends what is ready. */
        if (r < 0 && r != -ESTALE)
                conn_free(c);
}

/* The answer is in out: it goes now, with a deadline of its own (conn_deadline_restart()), or,
 * for a request that changed security state, once every commit so far is on disk (the change
 * committed before its answer was made; the deadline restarts then). Meanwhile the
 * connection is pending: no eviction, no I/O (a hang-up event would send out early; a client
 * that hung up is seen at the send), and a longer deadline, CONTROL_DURABLE_DEADLINES, after
 * which the answer says that the change was made but is not known to be on disk. */
static int conn_send_when_durable(struct conn *c) {
        int r;

        if (c->durable && c->ctl->ev.durable_wait) {
                c->durable = false;
                r = c->ctl->ev.durable_wait(c->ctl->ev.userdata, on_durable, c, &c->sync_wait);
                if (r > 0) {
                        c->pending = true;
                        c->syncing = true;
                        r = sd_event_source_set_time_relative(c->timer,
                                                              c->ctl->timeout_usec * CONTROL_DURABLE_DEADLINES);
                        if (r >= 0)
                                r = sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);
                        if (r < 0)
                                return r;
                        return sd_event_source_set_io_events(c->io, 0);
                }
                if (r < 0) {
                        on_durable(c, r); /* may free c: the caller's error path must not run */
                        return 0;
                }
        }
        r = conn_deadline_restart(c);
        if (r < 0)
                return r;
        return sd_event_source_set_io_events(c->io, EPOLLOUT);
}

static int conn_set_reply(struct conn *c, json_t *reply) {
        char *s;

        if (reply == CONTROL_ANSWERED)
                return 0;
        if (reply == CONTROL_PENDING) {
                c->pending = true;
                /* Stop reading; the answer comes from conn_reply_later(). A stream watches for
                 * the client hanging up, and sends what is queued. */
                if (c->stream)
                        return sd_event_source_set_io_events(c->io, EPOLLIN | (c->out ? EPOLLOUT : 0));
                return sd_event_source_set_io_events(c->io, 0);
        }
        if (!reply)
                reply = error_reply("out of memory");
        s = json_dumps(reply, JSON_COMPACT);
        json_decref(reply);
        if (!s)
                return -ENOMEM;
        if (c->out) {
                /* After streamed lines not all sent yet: the answer is the last line. */
                size_t len = strlen(s);
                char *t = realloc(c->out, c->out_len + len + 1);
                if (!t) {
                        free(s);
                        return -ENOMEM;
                }
                c->out = t;
                memcpy(c->out + c->out_len, s, len);
                c->out[c->out_len + len] = '\n';
                c->out_len += len + 1;
                free(s);
                return conn_send_when_durable(c);
        }
        /* json_dumps() allocated strlen+1 bytes: the NUL becomes the line's newline. */
        c->out_len = strlen(s) + 1;
        c->out = s;
        c->out[c->out_len - 1] = '\n';
        c->out_off = 0;
        return conn_send_when_durable(c);
}

static int on_conn_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct conn *c = userdata;
        ssize_t n;

        if (c->draining && (revents & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                /* Closing a socket with unread input resets the connection (TCP: RFC 1122
                 * 4.2.2.13; Linux AF_UNIX hands the peer ECONNRESET), and the client loses
                 * the answer: read and drop what it still sends, up to the deadline. */
                char sink[4096];
                n = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
                if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        return 0;
                if (n < 0 || (n == 0 && !c->out)) {
                        conn_free(c);
                        return 0;
                }
                if (n == 0) {
                        /* All read: the answer still goes out, then the close is clean. */
                        c->draining = false;
                        if (sd_event_source_set_io_events(c->io, EPOLLOUT) < 0)
                                conn_free(c);
                        return 0;
                }
        }
        if (c->stream && !c->out && (revents & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                /* A streaming client sends nothing more: EOF or an error is its hang-up. */
                char sink[256];
                n = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
                if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
                        conn_free(c);
                return 0;
        }
        /* On a hang-up the send fails and the connection is freed. */
        if (c->out && (revents & (EPOLLOUT | EPOLLHUP | EPOLLERR))) {
                n = send(fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        return 0;
                if (n < 0) {
                        conn_free(c);
                        return 0;
                }
                c->out_off += (size_t) n;
                if (c->out_off >= c->out_len && c->stream) {
                        /* Streamed lines sent; more come, and then the answer. */
                        free(c->out);
                        c->out = NULL;
                        c->out_len = c->out_off = 0;
                        if (sd_event_source_set_io_events(c->io, EPOLLIN) < 0)
                                conn_free(c);
                        return 0;
                }
                if (c->out_off >= c->out_len) {
                        if (!c->draining) {
                                conn_free(c);
                                return 0;
                        }
                        /* Answer sent: no more writing; we close once the client has
                         * sent everything (EOF) or the deadline passes. */
                        free(c->out);
                        c->out = NULL;
                        (void) shutdown(fd, SHUT_WR);
                        if (sd_event_source_set_io_events(c->io, EPOLLIN) < 0)
                                conn_free(c);
                }
                return 0;
        }
        if (c->out || c->draining)
                return 0;
        if (c->in_len == c->in_cap) {
                /* Requests are a line of some hundred bytes: the buffer starts small and
                 * doubles up to the limit, rather than 64 KiB per client. */
                size_t cap = c->in_cap ? c->in_cap * 2 : CONTROL_REQUEST_FIRST;
                if (cap > CONTROL_REQUEST_MAX)
                        cap = CONTROL_REQUEST_MAX;
                char *in = realloc(c->in, cap);
                if (!in) {
                        conn_free(c);
                        return 0;
                }
                c->in = in;
                c->in_cap = cap;
        }
        n = recv(fd, c->in + c->in_len, c->in_cap - c->in_len, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (n <= 0) {
                conn_free(c);
                return 0;
        }
        c->in_len += (size_t) n;
        char *nl = memchr(c->in, '\n', c->in_len);
        if (!nl) {
                if (c->in_len >= CONTROL_REQUEST_MAX) {
                        /* The documented error, then the rest of the request is drained. */
                        c->draining = true;
                        free(c->in);
                        c->in = NULL;
                        c->in_cap = 0;
                        if (conn_set_reply(c, error_reply("request longer than %d bytes", CONTROL_REQUEST_MAX)) < 0 ||
                            sd_event_source_set_io_events(c->io, EPOLLIN | EPOLLOUT) < 0)
                                conn_free(c);
                }
                return 0;
        }
        if (conn_set_reply(c, dispatch(c->ctl, c, c->in, (size_t) (nl - c->in))) < 0)
                conn_free(c);
        return 0;
}

static int peer_check(int fd, struct ucred *ret_cred) {
        struct ucred cred;
        socklen_t len = sizeof cred;
        gid_t groups[CONTROL_MAX_GROUPS];
        socklen_t glen = sizeof groups;
        size_t n_groups = 0;

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
                return -errno;
        *ret_cred = cred;
        /* Supplementary groups of the peer (Linux >= 4.13); without them only the primary
         * group counts, which is the safe direction. */
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &glen) >= 0)
                n_groups = glen / sizeof(gid_t);
        return control_peer_allowed(cred.uid, cred.gid, groups, n_groups, geteuid(), getegid()) ? 0 : -EPERM;
}

/* Whether a whole request line from c waits in the socket, not yet read by on_conn_io(). */
static bool conn_request_waiting(struct conn *c, char *peek) {
        ssize_t n;

        if (c->draining || c->in_len >= CONTROL_REQUEST_MAX)
                return false; /* answered already, or over-long: reading it only to drop it */
        n = recv(c->fd, peek, CONTROL_REQUEST_MAX - c->in_len, MSG_PEEK | MSG_DONTWAIT);

        return n > 0 && memchr(peek, '\n', (size_t) n);
}

/* The deadline: a client that has not sent its whole request, or has not read its answer, in
 * CONTROL_TIMEOUT_USEC is closed. */
static int on_conn_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        _cleanup_free_ char *peek = NULL;
        struct conn *c = userdata;

        /* A request waiting for the cloud ends with the cloud's own timeout, which always
         * answers the client; freeing would be safe (the connection owns what it waits for)
         * but would leave the client without an answer. */
        if (c->syncing) {
                /* The change is committed; its sync hangs. Stop waiting for it (the sync thread
                 * goes on; a later sync covers this commit) and say so. */
                log_warning("A control request's answer waited %" PRIu64 " s for the database's fdatasync, "
                            "which has not returned; answered that the change is not known to be on disk",
                            c->ctl->timeout_usec * CONTROL_DURABLE_DEADLINES / 1000000);
                db_sync_wait_cancel(TAKE_PTR(c->sync_wait));
                on_durable(c, -ETIMEDOUT); /* may free c */
                return 0;
        }
        if (c->pending)
                return 0;
        /* A whole request line waiting unread: the client was in time, the loop came late to it
         * (a turn that took long; or the timer ran first in the turn that saw both, since sd-event
         * does not order sources of one priority that became pending together). Closing would
         * reset the connection with the request unread. It is read and answered now, and the
         * answer gets its own deadline (conn_send_when_durable()). */
        if (!c->out && !c->draining) {
                peek = malloc(CONTROL_REQUEST_MAX);
                if (peek && conn_request_waiting(c, peek))
                        return on_conn_io(c->io, c->fd, EPOLLIN, c); /* may free c */
        }
        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees peek */
        conn_free(c);
        return 0;
}

/* At CONTROL_MAX_CLIENTS, a new client takes the place of the oldest one that has not yet sent
 * a whole request: a peer that connects and sends nothing, or a byte a second (a slow loris),
 * would otherwise hold a slot until its deadline, and 16 of them would lock every operator out.
 * An honest client sends its one line at once, so it is never the one evicted: not while it is
 * the newest, nor once slow clients that reconnect at every eviction have made it the oldest
 * before the loop read its line (seen on a loaded machine: iothubctl got EOF for its answer),
 * because a whole line waiting in its socket counts as a request. Connections with a request
 * being answered or waited on are kept. Returns whether a slot was freed. */
static bool evict_idle(struct control *ctl) {
        _cleanup_free_ char *peek = NULL;
        struct conn *oldest = NULL;
        uint64_t suppressed;

        peek = malloc(CONTROL_REQUEST_MAX);
        if (!peek)
                return false;
        /* New connections go to the head of the list: the last reading one is the oldest. */
        for (struct conn *c = ctl->conns; c; c = c->next)
                if (!c->pending && !c->out && c != ctl->login_conn && c != ctl->wait_conn &&
                    !conn_request_waiting(c, peek))
                        oldest = c;
        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees peek */
        if (!oldest)
                return false;
        ctl->evicted++;
        if (ratelimit_allow(&ctl->evict_log, now_monotonic_usec(), CONTROL_FULL_LOG_WINDOW_USEC, 1, &suppressed))
                log_warning("Control socket full: closed the oldest connection that sent no request "
                            "(%" PRIu64 " so far)", ctl->evicted);
        conn_free(oldest);
        return true;
}

/* A peer that fails the SO_PEERCRED check is answered and closed here, at accept: it never
 * holds one of the CONTROL_MAX_CLIENTS slots, never makes room by closing another connection and
 * is never waited for, so that a local user outside group iothub cannot crowd operators out
 * (16 slow clients of its own, reconnecting at every eviction) the way a member could.
 * What it has already sent is read first: closing a socket with unread data makes the peer's
 * next read fail with ECONNRESET, which could come before it reads the answer. Whatever it sends
 * after this goes nowhere (EPIPE on its side), and the answer is still there for it to read. */
static void refuse_peer(struct control *ctl, int fd, const struct ucred *cred, int r) {
        static const char answer[] = "{\"ok\":false,\"error\":\"permission denied\"}\n";
        char sink[4096];
        uint64_t suppressed;

        if (ctl->ev.peer_refused)
                ctl->ev.peer_refused(ctl->ev.userdata);
        /* Every refused connection is counted (peer_refused); the log says it at most
         * CONTROL_REFUSED_LOG_BURST times a window, since the peer decides how often. */
        if (ratelimit_allow(&ctl->refused_log, now_monotonic_usec(), CONTROL_FULL_LOG_WINDOW_USEC,
                            CONTROL_REFUSED_LOG_BURST, &suppressed)) {
                if (suppressed > 0)
                        log_event(LOG_WARNING, 0, IOTHUB_MID_CONTROL_DENIED, NULL, NULL,
                                  "Suppressed %" PRIu64 " more refused control connections", suppressed);
                log_event(LOG_WARNING, r, IOTHUB_MID_CONTROL_DENIED, NULL, NULL,
                          "Refused control connection from pid %d uid %u gid %u: %m", (int) cred->pid,
                          (unsigned) cred->uid, (unsigned) cred->gid);
        }
        /* Bounded: at most one request's worth, and only what is already there. */
        for (size_t got = 0; got < CONTROL_REQUEST_MAX;) {
                ssize_t n = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
                if (n <= 0)
                        break;
                got += (size_t) n;
        }
        /* A fresh socket's buffer holds this one short line: it is sent whole or not at all. */
        (void) send(fd, answer, sizeof answer - 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

static int on_accept(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct control *ctl = userdata;
        struct ucred cred = { 0 };
        _cleanup_close_ int cfd = -1;
        uint64_t suppressed;
        struct conn *c;
        int r;

        cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (cfd < 0)
                return 0;
        r = peer_check(cfd, &cred);
        if (r < 0) {
                refuse_peer(ctl, cfd, &cred, r);
                return 0;
        }
        if (ctl->n_clients >= CONTROL_MAX_CLIENTS && !evict_idle(ctl)) {
                if (ratelimit_allow(&ctl->full_log, now_monotonic_usec(), CONTROL_FULL_LOG_WINDOW_USEC, 1, &suppressed))
                        log_warning("Too many control connections waiting for answers, refusing one");
                return 0;
        }
        c = calloc(1, sizeof *c);
        if (!c)
                return 0;
        c->ctl = ctl;
        c->fd = TAKE_FD(cfd);
        ctl->n_clients++;
        c->next = ctl->conns;
        if (c->next)
                c->next->prev = c;
        ctl->conns = c;
        r = sd_event_add_io(ctl->event, &c->io, c->fd, EPOLLIN, on_conn_io, c);
        if (r >= 0)
                r = sd_event_add_time_relative(ctl->event, &c->timer, CLOCK_MONOTONIC, ctl->timeout_usec,
                                               0, on_conn_timeout, c);
        if (r < 0)
                conn_free(c);
        return 0;
}

int control_new(sd_event *e, const struct iothub_conf *conf, struct registry *registry, struct cloud *cloud,
                struct uplink_client *uplink, struct dynsec *dynsec, struct pair *pair,
                const struct control_events *ev, struct control **ret) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        struct control *ctl;
        int r;

        if ((size_t) snprintf(sa.sun_path, sizeof sa.sun_path, "%s/%s", conf->hub.runtime_dir,
                              CONTROL_SOCKET_NAME) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        if (mkdir(conf->hub.runtime_dir, 0750) < 0 && errno != EEXIST)
                return -errno;
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -errno;
        (void) unlink(sa.sun_path);
        if (bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0)
                return -errno;
        /* The file mode is a first gate (owner and group); SO_PEERCRED is the real check. */
        /* The backlog is larger than CONTROL_MAX_CLIENTS: refused peers are closed at accept, and
         * a burst of them (24 connecting at once in abuse.test) must not fill the queue so that
         * an operator's non-blocking connect fails with EAGAIN. */
        if (chmod(sa.sun_path, 0660) < 0 || listen(fd, CONTROL_LISTEN_BACKLOG) < 0)
                return -errno;
        ctl = calloc(1, sizeof *ctl);
        if (!ctl)
                return -ENOMEM;
        ctl->event = e;
        ctl->conf = conf;
        ctl->registry = registry;
        ctl->cloud = cloud;
        ctl->uplink = uplink;
        ctl->dynsec = dynsec;
        ctl->pair = pair;
        ctl->timeout_usec = CONTROL_TIMEOUT_USEC;
        if (ev)
                ctl->ev = *ev;
        ctl->path = strdup(sa.sun_path);
        ctl->fd = TAKE_FD(fd);
        r = ctl->path ? sd_event_add_io(e, &ctl->listen, ctl->fd, EPOLLIN, on_accept, ctl) : -ENOMEM;
        if (r < 0) {
                control_free(ctl);
                return r;
        }
        *ret = ctl;
        return 0;
}

void control_set_timeout(struct control *ctl, uint64_t usec) {
        ctl->timeout_usec = usec;
}

void control_free(struct control *ctl) {
        if (!ctl)
                return;
        /* A sign-in in flight reports to ctl (on_login_started/finished): it goes on in the
         * uplink, but must not call back into a freed control socket. */
        uplink_call_cancel(TAKE_PTR(ctl->login_call));
        uplink_call_cancel(TAKE_PTR(ctl->wait_call));
        /* At shutdown, an answer that is ready goes now if the socket takes it (one try, never
         * blocking), not dropped with its connection: a durable one whose sync the last sync of
         * hub_done() completed, or one whose EPOLLOUT had not come yet. The change was made and
         * is on disk; the user is told so. */
        for (struct conn *c = ctl->conns; c; c = c->next)
                if (c->fd >= 0 && c->out && !c->pending && c->out_off < c->out_len)
                        (void) send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (ctl->conns)
                /* conn_free() unlinks it from c->ctl->conns, and c->ctl is ctl:
                 * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
                conn_free(ctl->conns);
        ctl->listen = sd_event_source_disable_unref(ctl->listen);
        if (ctl->fd >= 0)
                (void) close(ctl->fd);
        if (ctl->path)
                (void) unlink(ctl->path);
        free(ctl->path);
        free(ctl);
}

int control_call(const char *path, json_t *request, json_t **ret) {
        return control_call_stream(path, request, NULL, NULL, ret);
}

/* Hands complete "event" lines at the start of buf to on_line and drops them from buf. */
static void stream_lines(char *buf, size_t *len, void (*on_line)(void *userdata, json_t *line), void *userdata) {
        char *nl;

        while ((nl = memchr(buf, '\n', *len))) {
                size_t n = (size_t) (nl - buf) + 1;
                json_t *line = NULL;

                if (control_parse_reply(buf, n - 1, &line) < 0 || !json_object_get(line, "event")) {
                        /* Not an event: the answer, read to the end. */
                        json_decref(line);
                        return;
                }
                on_line(userdata, line);
                json_decref(line);
                memmove(buf, buf + n, *len - n);
                *len -= n;
        }
}

int control_call_stream(const char *path, json_t *request, void (*on_line)(void *userdata, json_t *line),
                        void *userdata, json_t **ret) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        _cleanup_free_ char *req = NULL, *buf = NULL;
        size_t len = 0, cap = 0;

        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path)); /* the NUL is sa's: {} zeroed it, the length left room */
        /* The line is made before connecting, so that it follows the connect at once: at
         * CONTROL_MAX_CLIENTS the daemon makes room by closing the oldest connection that has not
         * sent a whole line, and a client that dawdles after connecting can be that one. */
        req = json_dumps(request, JSON_COMPACT);
        if (!req)
                return -ENOMEM;
        size_t rlen = strlen(req);
        req[rlen] = '\n'; /* json_dumps leaves room for the NUL, which becomes the newline */
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0)
                return -errno;
        for (size_t off = 0; off < rlen + 1;) {
                ssize_t n = send(fd, req + off, rlen + 1 - off, MSG_NOSIGNAL);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        /* The daemon may answer and close before reading (a refused peer):
                         * its answer is still there to read. */
                        if (errno == EPIPE || errno == ECONNRESET)
                                break;
                        return -errno;
                }
                off += (size_t) n;
        }
        for (;;) {
                ssize_t n;
                if (len == cap) {
                        if (cap >= CONTROL_RESPONSE_MAX)
                                return -EFBIG;
                        cap = cap ? cap * 2 : 4096;
                        char *t = realloc(buf, cap);
                        if (!t)
                                return -ENOMEM;
                        buf = t;
                }
                n = recv(fd, buf + len, cap - len, 0);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        /* A refused peer's answer, then the reset of a daemon that closed with
                         * part of the request unread (refuse_peer()): the answer counts. */
                        if (errno == ECONNRESET && len > 0)
                                break;
                        return -errno;
                }
                if (n == 0)
                        break;
                len += (size_t) n;
                if (on_line)
                        stream_lines(buf, &len, on_line, userdata);
        }
        /* Closed without an answer: refused, or closed to make room; not a malformed answer. */
        if (len == 0)
                return -ECONNRESET;
        return control_parse_reply(buf, len, ret);
}

int control_parse_reply(const char *buf, size_t len, json_t **ret) {
        json_error_t jerr;
        json_t *resp;

        resp = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
        if (!json_is_object(resp)) {
                json_decref(resp);
                return -EBADMSG;
        }
        *ret = resp;
        return 0;
}
