/* SPDX-License-Identifier: MIT */
/* iothubd's client of iothub-signer (signer.h has the contract). One non-blocking SOCK_STREAM
 * connection on the loop, framed with the codec of signer-proto.c, carries every request: nothing
 * in iothubd waits for the signer outside the loop (issue 13), and the attestation pair reaches the
 * attestation state the signer keeps for this one connection.
 *
 * Every request is kept encoded in its op until answered, so that a connection lost with
 * requests out (the signer killed, restarted by systemd; the socket stays with socket
 * activation) costs nothing but a resend: the signer builds every answer afresh (a new nonce,
 * a new signature), so a repeated request is harmless. Answers are matched by request id; an
 * answer to an op that was cancelled meanwhile finds no op and is dropped. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "iothub/log.h"
#include "iothub/signer.h"
#include "iothub/signer-proto.h"

#define SIGNER_READ_CHUNK (64 * 1024)

enum op_state { OP_QUEUED, OP_SENT, OP_DONE };

struct signer_op {
        struct signer *signer; /* NULL once answered, timed out or cancelled by signer_free() */
        struct signer_op *prev, *next;
        uint32_t id;
        unsigned code;
        enum signer_prio prio;
        enum op_state state;
        struct signer_buf req; /* the encoded request, kept for a resend */
        uint64_t deadline;    /* CLOCK_MONOTONIC usec: -ETIMEDOUT after */
        uint64_t not_before;  /* after an -EBUSY answer */
        unsigned busy;        /* -EBUSY answers in a row */
        signer_done_t done;
        void *userdata;
        /* The answer: the reply's strings point into these. */
        char *strs[_SIGNER_TAG_MAX];
        struct signer_reply reply;
};

struct signer {
        sd_event *event;
        const struct iothub_conf *conf;
        struct signer_events ev;
        int fd;
        bool connected;
        sd_event_source *io, *reconnect_timer, *tick_timer;
        uint8_t *in;
        size_t in_len, in_cap;
        uint8_t *out;
        size_t out_len, out_off, out_cap;
        struct signer_op *head, *tail; /* oldest first */
        unsigned n_ops, inflight;
        uint32_t next_id;
        unsigned connect_failures;
        int connect_errno;  /* the last failure to connect, logged once per kind */
        struct signer_op *status_op; /* the client's own STATUS request */
        json_t *remote_status;      /* the signer's last STATUS answer */
        uint64_t signatures, reconnects, busy_retries, timeouts, resent;
        char last_error[256];
        char key_id[SIGNER_KEY_ID_LEN + 1];
        json_t *key_jwk;
        char key_backend[8];
        bool key_failed; /* the last KEY_INFO was refused */
};

static void signer_disconnect(struct signer *s, int error);
static void signer_pump(struct signer *s);
static void arm_tick(struct signer *s);
static int signer_connect(struct signer *s);

/* ---- ops ---- */

static void op_unlink(struct signer_op *op) {
        struct signer *s = op->signer;

        if (!s)
                return;
        if (op->state == OP_SENT && s->inflight > 0)
                s->inflight--;
        if (op->prev)
                op->prev->next = op->next;
        else
                s->head = op->next;
        if (op->next)
                op->next->prev = op->prev;
        else
                s->tail = op->prev;
        op->prev = op->next = NULL;
        s->n_ops--;
        op->signer = NULL;
}

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
        op_unlink(op);
        op_reply_clear(op);
        /* signer_buf_done() wipes: a request may carry a token or an Authorization value. */
        signer_buf_done(&op->req);
        free(op);
        return NULL;
}

static uint32_t new_id(struct signer *s) {
        if (++s->next_id == 0)
                s->next_id = 1;
        return s->next_id;
}

/* Starts an op: the message header is written; the caller adds fields and submits. */
static int op_new(struct signer *s, unsigned code, enum signer_prio prio, struct signer_op **ret) {
        struct signer_op *op;
        int r;

        if (s->n_ops >= SIGNER_QUEUE_MAX)
                return -EBUSY;
        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        op->code = code;
        op->prio = prio;
        op->id = new_id(s);
        r = signer_msg_begin(&op->req, op->id, code, false, 0);
        if (r < 0) {
                signer_op_free(op);
                return r;
        }
        *ret = op;
        return 0;
}

/* Ends the message (the codec checks it against every rule the signer applies) and queues it. */
static int op_submit(struct signer *s, struct signer_op *op, signer_done_t done, void *userdata,
                     struct signer_op **ret) {
        int r = signer_msg_end(&op->req);

        if (r < 0) {
                signer_op_free(op);
                return r;
        }
        op->signer = s;
        op->done = done;
        op->userdata = userdata;
        op->state = OP_QUEUED;
        op->deadline = now_monotonic_usec() + SIGNER_OP_TIMEOUT_USEC;
        op->prev = s->tail;
        if (s->tail)
                s->tail->next = op;
        else
                s->head = op;
        s->tail = op;
        s->n_ops++;
        *ret = op;
        if (s->fd < 0 && !s->reconnect_timer)
                (void) signer_connect(s); /* a failure arms the reconnect timer */
        signer_pump(s);
        arm_tick(s);
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

/* Ends op with r: unlinked first, so that done() may free it, queue others or cancel others. */
static void op_finish(struct signer_op *op, int r) {
        struct signer *s = op->signer;
        signer_done_t done = op->done;

        if (op->code == SIGNER_OP_KEY_INFO)
                s->key_failed = r < 0;
        if (op->code == SIGNER_OP_KEY_INFO && r < 0) {
                /* Nothing of ours to add: the signer's own words come with its STATUS answer. */
                s->last_error[0] = '\0';
                signer_refresh_status(s);
        } else if (op_is_signature(op->code) || op->code == SIGNER_OP_KEY_INFO ||
                   op->code == SIGNER_OP_ATTEST_BEGIN || op->code == SIGNER_OP_ATTEST_ANSWER) {
                if (r >= 0) {
                        if (op_is_signature(op->code))
                                s->signatures++;
                        s->last_error[0] = '\0';
                } else if (r != -ECANCELED) {
                        set_last_error(s, "signer: %s", strerror(-r));
                        /* Its own last_error says more (a TPM error decoded): ask for it. */
                        signer_refresh_status(s);
                }
        }
        op_unlink(op);
        op->state = OP_DONE;
        signer_buf_done(&op->req);
        if (done)
                done(op->userdata, r, r >= 0 ? &op->reply : NULL);
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
        if (op->code == SIGNER_OP_STATUS)
                return status_json(m, &p->status);
        return 0;
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

static int out_append(struct signer *s, const uint8_t *data, size_t len) {
        if (s->out_off > 0 && s->out_off == s->out_len)
                s->out_off = s->out_len = 0;
        if (s->out_len + len > s->out_cap) {
                size_t cap = s->out_cap ? s->out_cap : 4096;
                uint8_t *n;

                while (cap < s->out_len + len)
                        cap *= 2;
                n = malloc(cap);
                if (!n)
                        return -ENOMEM;
                if (s->out) {
                        memcpy(n, s->out, s->out_len);
                        erase_and_free(s->out, s->out_cap);
                }
                s->out = n;
                s->out_cap = cap;
        }
        memcpy(s->out + s->out_len, data, len);
        s->out_len += len;
        return 0;
}

static void buffers_drop(struct signer *s) {
        if (s->out)
                erase_and_free(s->out, s->out_cap);
        if (s->in)
                erase_and_free(s->in, s->in_cap);
        s->out = s->in = NULL;
        s->out_len = s->out_off = s->out_cap = s->in_len = s->in_cap = 0;
}

static void update_events(struct signer *s) {
        uint32_t events = EPOLLIN;

        if (!s->io)
                return;
        if (!s->connected || s->out_off < s->out_len)
                events |= EPOLLOUT; /* EPOLLOUT while connecting: the connect's end */
        (void) sd_event_source_set_io_events(s->io, events);
}

/* The next op to send: high priority first, then the oldest; one whose -EBUSY backoff runs is
 * skipped. */
static struct signer_op *next_to_send(struct signer *s, uint64_t now) {
        struct signer_op *best = NULL;

        for (struct signer_op *op = s->head; op; op = op->next)
                if (op->state == OP_QUEUED && op->not_before <= now && (!best || op->prio < best->prio))
                        best = op;
        return best;
}

static void signer_pump(struct signer *s) {
        uint64_t now = now_monotonic_usec();
        struct signer_op *op;

        if (!s->connected)
                return;
        while (s->inflight < SIGNER_INFLIGHT_MAX && (op = next_to_send(s, now))) {
                int r = out_append(s, op->req.data, op->req.len);
                if (r < 0) {
                        op_finish(op, r);
                        continue;
                }
                op->state = OP_SENT;
                s->inflight++;
        }
        update_events(s);
}

static void connected_changed(struct signer *s) {
        if (s->ev.status_changed)
                s->ev.status_changed(s->ev.userdata);
}

static void on_connected(struct signer *s) {
        s->connected = true;
        s->last_error[0] = '\0';
        if (s->connect_errno || s->reconnects > 0)
                log_info("Connected to the signer at %s", s->conf->signer.socket);
        s->connect_errno = 0;
        /* Its counters, for status: asked at every connection. */
        signer_refresh_status(s);
        signer_pump(s);
        connected_changed(s);
}

static int on_reconnect_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        struct signer *s = userdata;

        s->reconnect_timer = sd_event_source_disable_unref(s->reconnect_timer);
        (void) signer_connect(s);
        return 0;
}

static void schedule_reconnect(struct signer *s) {
        uint32_t rnd = 0;
        uint64_t ms;

        if (s->reconnect_timer || !s->event)
                return;
        (void) random_bytes(&rnd, sizeof rnd);
        ms = backoff_ms(s->connect_failures++, SIGNER_RECONNECT_MIN_MS, SIGNER_RECONNECT_MAX_MS, rnd);
        if (sd_event_add_time_relative(s->event, &s->reconnect_timer, CLOCK_MONOTONIC, ms * 1000, 0,
                                       on_reconnect_timer, s) < 0)
                log_error("Failed to arm the signer's reconnect timer: ops wait for the next request");
}

static int read_input(struct signer *s) {
        for (;;) {
                size_t need = SIGNER_PREFIX_LEN;
                int r = signer_msg_frame(s->in, s->in_len, &need);
                if (r < 0)
                        return r;
                if (r > 0) {
                        struct signer_msg m;
                        struct signer_op *op;

                        r = signer_msg_decode(s->in, need, &m);
                        if (r < 0 || !m.answer)
                                return -EBADMSG;
                        for (op = s->head; op; op = op->next)
                                if (op->state == OP_SENT && op->id == m.id)
                                        break;
                        if (op && op->code != m.op)
                                return -EBADMSG;
                        /* Answered: the connection works, the next loss starts the backoff over. */
                        s->connect_failures = 0;
                        if (op && m.status == -EBUSY) {
                                uint32_t rnd = 0;

                                (void) random_bytes(&rnd, sizeof rnd);
                                op->state = OP_QUEUED;
                                s->inflight--;
                                op->not_before = now_monotonic_usec() +
                                                 backoff_ms(op->busy++, SIGNER_BUSY_MIN_MS, SIGNER_BUSY_MAX_MS, rnd) * 1000;
                                s->busy_retries++;
                                arm_tick(s); /* its retry */
                        } else if (op) {
                                int k = m.status < 0 ? m.status : reply_fill(op, &m);
                                if (op->code == SIGNER_OP_KEY_INFO && k >= 0)
                                        k = key_cache(s, &op->reply);
                                op_finish(op, k);
                        }
                        /* done() may have closed the connection (signer_free() is not allowed
                         * there, a disconnect is): stop reading. */
                        if (s->fd < 0)
                                return 0;
                        memmove(s->in, s->in + need, s->in_len - need);
                        s->in_len -= need;
                        continue;
                }
                if (need > s->in_cap) {
                        size_t cap = need < SIGNER_READ_CHUNK ? SIGNER_READ_CHUNK : need;
                        uint8_t *n = malloc(cap);

                        if (!n)
                                return -ENOMEM;
                        if (s->in) {
                                memcpy(n, s->in, s->in_len);
                                erase_and_free(s->in, s->in_cap);
                        }
                        s->in = n;
                        s->in_cap = cap;
                }
                ssize_t k = read(s->fd, s->in + s->in_len, s->in_cap - s->in_len);
                if (k < 0)
                        return errno == EAGAIN || errno == EINTR ? 0 : -errno;
                if (k == 0)
                        return -ECONNRESET;
                s->in_len += (size_t) k;
        }
}

static int on_io(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        struct signer *s = userdata;
        int r;

        if (!s->connected) {
                int err = 0;
                socklen_t len = sizeof err;

                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                        err = errno;
                if (err) {
                        signer_disconnect(s, -err);
                        return 0;
                }
                on_connected(s);
                if (s->fd < 0)
                        return 0;
        }
        if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                r = read_input(s);
                if (r < 0) {
                        signer_disconnect(s, r);
                        return 0;
                }
                if (s->fd < 0)
                        return 0;
        }
        while (s->out_off < s->out_len) {
                ssize_t k = send(s->fd, s->out + s->out_off, s->out_len - s->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (k < 0) {
                        if (errno == EAGAIN || errno == EINTR)
                                break;
                        signer_disconnect(s, -errno);
                        return 0;
                }
                s->out_off += (size_t) k;
        }
        signer_pump(s);
        return 0;
}

static int signer_connect(struct signer *s) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        const char *path = s->conf->signer.socket;
        int fd, r;

        if (s->fd >= 0)
                return 0;
        if (!path || strlen(path) >= sizeof sa.sun_path)
                return -EINVAL;
        memcpy(sa.sun_path, path, strlen(path));
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        s->fd = fd;
        r = connect(fd, (struct sockaddr *) &sa, sizeof sa);
        if (r < 0 && errno != EINPROGRESS && errno != EAGAIN) {
                r = -errno;
                goto fail;
        }
        r = sd_event_add_io(s->event, &s->io, fd, EPOLLIN | EPOLLOUT, on_io, s);
        if (r < 0)
                goto fail;
        /* Connected at once or not: on_io() sees EPOLLOUT and checks SO_ERROR. */
        return 0;
fail:
        signer_disconnect(s, r);
        return r;
}

/* The connection ended (or never came): what was out is sent again on the next one. */
static void signer_disconnect(struct signer *s, int error) {
        bool was = s->connected;

        s->io = sd_event_source_disable_unref(s->io);
        if (s->fd >= 0)
                (void) close(s->fd);
        s->fd = -1;
        s->connected = false;
        buffers_drop(s);
        for (struct signer_op *op = s->head; op; op = op->next)
                if (op->state == OP_SENT) {
                        op->state = OP_QUEUED;
                        s->resent++;
                }
        s->inflight = 0;
        if (was) {
                s->reconnects++;
                log_event(LOG_WARNING, error, IOTHUB_MID_KEY_UNAVAILABLE, NULL, "signer_lost",
                          "Lost the connection to the signer (%s), %u requests wait for it", strerror(-error),
                          s->n_ops);
                connected_changed(s);
        } else if (error != s->connect_errno) {
                log_event(LOG_WARNING, error, IOTHUB_MID_KEY_UNAVAILABLE, NULL, "signer_unreachable",
                          "Cannot reach the signer at %s: %s; trying again", s->conf->signer.socket,
                          strerror(-error));
        }
        s->connect_errno = error;
        set_last_error(s, "signer unreachable at %s: %s", s->conf->signer.socket, strerror(-error));
        /* Lazily: only while someone waits; else the next request connects. */
        if (s->n_ops > 0)
                schedule_reconnect(s);
}

/* ---- timeouts and -EBUSY backoff ---- */

static int on_tick(sd_event_source *es, uint64_t usec, void *userdata) {
        struct signer *s = userdata;
        uint64_t now = now_monotonic_usec();
        struct signer_op *op, *next;

        for (op = s->head; op; op = next) {
                next = op->next;
                if (op->deadline <= now) {
                        s->timeouts++;
                        op_finish(op, -ETIMEDOUT);
                        /* done() may have freed others: start over. */
                        next = s->head;
                        now = now_monotonic_usec();
                }
        }
        signer_pump(s);
        arm_tick(s);
        return 0;
}

static void arm_tick(struct signer *s) {
        uint64_t next = UINT64_MAX;
        int r;

        for (struct signer_op *op = s->head; op; op = op->next) {
                if (op->deadline < next)
                        next = op->deadline;
                if (op->state == OP_QUEUED && op->not_before > 0 && op->not_before < next)
                        next = op->not_before;
        }
        if (!s->tick_timer) {
                if (next == UINT64_MAX || !s->event)
                        return;
                r = sd_event_add_time(s->event, &s->tick_timer, CLOCK_MONOTONIC, next, 0, on_tick, s);
                if (r < 0)
                        log_error_errno(r, "Failed to arm the signer's timer: %m");
                return;
        }
        if (next == UINT64_MAX) {
                (void) sd_event_source_set_enabled(s->tick_timer, SD_EVENT_OFF);
                return;
        }
        (void) sd_event_source_set_time(s->tick_timer, next);
        (void) sd_event_source_set_enabled(s->tick_timer, SD_EVENT_ONESHOT);
}

/* ---- the calls ---- */

int signer_new(sd_event *e, const struct iothub_conf *c, const struct signer_events *ev, struct signer **ret) {
        struct signer *s = calloc(1, sizeof *s);

        if (!s)
                return -ENOMEM;
        s->event = sd_event_ref(e);
        s->conf = c;
        if (ev)
                s->ev = *ev;
        s->fd = -1;
        *ret = s;
        return 0;
}

struct signer *signer_free(struct signer *s) {
        if (!s)
                return NULL;
        s->status_op = signer_op_free(s->status_op);
        /* Cancelled: their owners still free them, and no done() runs. */
        while (s->head)
                op_unlink(s->head);
        s->connected = false;
        s->io = sd_event_source_disable_unref(s->io);
        if (s->fd >= 0)
                (void) close(s->fd);
        buffers_drop(s);
        s->reconnect_timer = sd_event_source_disable_unref(s->reconnect_timer);
        s->tick_timer = sd_event_source_disable_unref(s->tick_timer);
        json_decref(s->remote_status);
        json_decref(s->key_jwk);
        sd_event_unref(s->event);
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
        (void) signer_msg_add_str(&op->req, SIGNER_TAG_METHOD, method);
        (void) signer_msg_add_str(&op->req, SIGNER_TAG_TARGET_URI, target_uri);
        (void) add_opt_str(&op->req, SIGNER_TAG_AUTHORIZATION, authorization);
        if (body)
                (void) signer_msg_add(&op->req, SIGNER_TAG_BODY, body, body_len);
        (void) signer_msg_add_u8(&op->req, SIGNER_TAG_PRIO, (uint8_t) prio);
        /* A failed add is reported by signer_msg_end() in op_submit(). */
        return op_submit(s, op, done, userdata, ret);
}

static int build_dpop(struct signer *s, const char *method, const char *url, const char *ath, const char *nonce,
                      struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_SIGN_DPOP, SIGNER_PRIO_HIGH, &op);

        if (r < 0)
                return r;
        (void) signer_msg_add_str(&op->req, SIGNER_TAG_METHOD, method);
        (void) signer_msg_add_str(&op->req, SIGNER_TAG_URL, url);
        (void) add_opt_str(&op->req, SIGNER_TAG_ATH, ath);
        (void) add_opt_str(&op->req, SIGNER_TAG_NONCE, nonce && nonce[0] ? nonce : NULL);
        *ret = op;
        return 0;
}

int signer_sign_dpop(struct signer *s, const char *method, const char *url, const char *ath, const char *nonce,
                     signer_done_t done, void *userdata, struct signer_op **ret) {
        struct signer_op *op;
        int r = build_dpop(s, method, url, ath, nonce, &op);

        return r < 0 ? r : op_submit(s, op, done, userdata, ret);
}

int signer_sign_command(struct signer *s, const char *dev, const char *cmd_id, uint64_t iat, uint64_t exp,
                        const char *set_json, const char *cloud_jws, signer_done_t done, void *userdata,
                        struct signer_op **ret) {
        struct signer_op *op;
        int r = op_new(s, SIGNER_OP_SIGN_COMMAND, SIGNER_PRIO_HIGH, &op);

        if (r < 0)
                return r;
        (void) signer_msg_add_str(&op->req, SIGNER_TAG_DEV, dev);
        (void) signer_msg_add_str(&op->req, SIGNER_TAG_CMD_ID, cmd_id);
        (void) signer_msg_add_u64(&op->req, SIGNER_TAG_IAT, iat);
        (void) signer_msg_add_u64(&op->req, SIGNER_TAG_EXP, exp);
        (void) signer_msg_add_str(&op->req, SIGNER_TAG_SET, set_json);
        (void) add_opt_str(&op->req, SIGNER_TAG_CLOUD_JWS, cloud_jws);
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
        (void) signer_msg_add_str(&op->req, SIGNER_TAG_ACCESS_TOKEN, access_token);
        (void) add_opt_str(&op->req, SIGNER_TAG_REFRESH_TOKEN, refresh_token);
        (void) signer_msg_add_str(&op->req, SIGNER_TAG_TOKEN_TYPE, token_type);
        (void) add_opt_str(&op->req, SIGNER_TAG_SCOPE, scope);
        (void) signer_msg_add_u64(&op->req, SIGNER_TAG_EXPIRES_AT, expires_at);
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
        (void) signer_msg_add(&op->req, SIGNER_TAG_CHALLENGE, challenge, len);
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
        return op && op->state == OP_DONE ? &op->reply : NULL;
}

/* ---- status ---- */

uint64_t signer_signatures(const struct signer *s) {
        return s ? s->signatures : 0;
}

const char *signer_last_error(const struct signer *s) {
        return s && s->last_error[0] ? s->last_error : NULL;
}

bool signer_is_connected(const struct signer *s) {
        return s && s->connected;
}

int signer_status_json(const struct signer *s, json_t *o) {
        json_t *j;

        if (!s)
                return 0;
        j = json_pack("{s:b,s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:s*,s:O*}", "connected", s->connected, "socket",
                      s->conf->signer.socket, "reconnects", (json_int_t) s->reconnects, "pending",
                      (json_int_t) s->n_ops, "resent", (json_int_t) s->resent, "busy_retries",
                      (json_int_t) s->busy_retries, "timeouts", (json_int_t) s->timeouts, "signatures",
                      (json_int_t) s->signatures, "last_error", s->last_error[0] ? s->last_error : NULL, "remote",
                      s->remote_status);
        if (!j)
                return -ENOMEM;
        return json_object_set_new(o, "signer", j) < 0 ? -ENOMEM : 0;
}
