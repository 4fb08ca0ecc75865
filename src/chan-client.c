/* SPDX-License-Identifier: MIT */
/* The client of a binary channel (chan-client.h has the contract): the connection, the queue,
 * the resend, the timeouts. One non-blocking SOCK_STREAM connection on the loop, framed with
 * the codec of tlv.c and the channel's table: nothing waits for the peer outside the loop
 * (issue 13).
 *
 * Every request is kept encoded in its op until answered, so that a connection lost with
 * requests out (the peer killed, restarted by systemd; the socket stays with socket
 * activation) costs nothing but a resend. Answers are matched by request id; an answer to an op
 * that ended meanwhile finds no op and is dropped.
 *
 * An op that ends while its request is out (a timeout, chan_op_cancel()) abandons the request:
 * the peer is told with the channel's cancel op, when it has one, so that what it does for the
 * request ends (the uplink's curl transfer, a chained upload behind it), and the request keeps
 * its place in inflight until the peer's answer to it comes (c->abandoned): the peer counts it
 * until then, and reads nothing past its own limit. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "iothub/chan-client.h"
#include "iothub/util.h"

#define CHAN_READ_CHUNK (64 * 1024)
/* Buffers larger than these are freed once empty: an upload's body grows the output buffer to
 * 128 KiB and more, which would otherwise stay touched (private memory, DESIGN.md Targets). */
#define CHAN_OUT_KEEP (16 * 1024)
#define CHAN_IN_KEEP_CLIENT CHAN_READ_CHUNK

struct chan_client {
        sd_event *event;
        struct chan_client_params p;
        struct chan_client_events ev;
        int fd;
        bool connected;
        sd_event_source *io, *reconnect_timer, *tick_timer;
        uint8_t *in;
        size_t in_len, in_cap;
        uint8_t *out;
        size_t out_len, out_off, out_cap;
        struct chan_op *head, *tail; /* oldest first */
        unsigned n_ops, inflight;
        unsigned abandoned; /* of inflight: requests out whose op ended first, answer awaited */
        uint32_t next_id;
        unsigned connect_failures;
        struct chan_client_counters n;
};

static void chan_disconnect(struct chan_client *c, int error);
static void chan_pump(struct chan_client *c);
static void arm_tick(struct chan_client *c);
static int chan_connect(struct chan_client *c);
static int out_append(struct chan_client *c, const uint8_t *data, size_t len);
static void update_events(struct chan_client *c);

/* ---- ops ---- */

static void op_unlink(struct chan_op *op) {
        struct chan_client *c = op->client;

        if (!c)
                return;
        if (op->state == CHAN_OP_SENT && c->inflight > 0)
                c->inflight--;
        if (op->prev)
                op->prev->next = op->next;
        else
                c->head = op->next;
        if (op->next)
                op->next->prev = op->prev;
        else
                c->tail = op->prev;
        op->prev = op->next = NULL;
        c->n_ops--;
        op->client = NULL;
}

/* op ends while its request is out on the connection: the peer hears so (the channel's cancel
 * op), and the request stays in inflight until the peer answers it. */
static void op_abandon(struct chan_client *c, struct chan_op *op) {
        struct tlv_buf b = {};

        if (op->state != CHAN_OP_SENT)
                return;
        op->state = CHAN_OP_DONE; /* op_unlink() leaves inflight alone */
        c->abandoned++;
        if (!c->p.cancel_op)
                return;
        /* A failure (out of memory) leaves the peer at its work: it answers in its own time. */
        if (tlv_msg_begin(&b, c->p.proto, op->id, c->p.cancel_op, false, 0) >= 0 && tlv_msg_end(&b) >= 0 &&
            out_append(c, b.data, b.len) >= 0) {
                c->n.cancels_sent++;
                update_events(c);
        }
        tlv_buf_done(&b);
}

void chan_op_cancel(struct chan_op *op) {
        if (!op)
                return;
        if (op->client)
                op_abandon(op->client, op);
        op_unlink(op);
        /* tlv_buf_done() wipes: a request may carry a token or an Authorization value. */
        tlv_buf_done(&op->req);
}

static uint32_t new_id(struct chan_client *c) {
        if (++c->next_id == 0)
                c->next_id = 1;
        return c->next_id;
}

int chan_op_begin(struct chan_client *c, struct chan_op *op, unsigned code, unsigned prio) {
        int r;

        if (c->n_ops >= c->p.queue_max)
                return -EBUSY;
        op->code = code;
        op->prio = prio;
        op->id = new_id(c);
        op->state = CHAN_OP_IDLE;
        r = tlv_msg_begin(&op->req, c->p.proto, op->id, code, false, 0);
        if (r < 0)
                tlv_buf_done(&op->req);
        return r;
}

int chan_op_submit(struct chan_client *c, struct chan_op *op, uint64_t timeout_usec) {
        int r = tlv_msg_end(&op->req);

        if (r < 0) {
                tlv_buf_done(&op->req);
                return r;
        }
        op->client = c;
        op->state = CHAN_OP_QUEUED;
        op->deadline = timeout_usec ? now_monotonic_usec() + timeout_usec : UINT64_MAX;
        op->prev = c->tail;
        if (c->tail)
                c->tail->next = op;
        else
                c->head = op;
        c->tail = op;
        c->n_ops++;
        if (c->fd < 0 && !c->reconnect_timer)
                (void) chan_connect(c); /* a failure arms the reconnect timer */
        chan_pump(c);
        arm_tick(c);
        return 0;
}

void chan_op_restart_timeout(struct chan_op *op, uint64_t timeout_usec) {
        uint64_t deadline;

        if (!op || !op->client)
                return;
        deadline = timeout_usec ? now_monotonic_usec() + timeout_usec : UINT64_MAX;
        if (deadline <= op->deadline)
                return;
        op->deadline = deadline;
        arm_tick(op->client);
}

/* Ends op with r: unlinked first, so that finish() may free it, queue others or cancel others. */
static void op_finish(struct chan_client *c, struct chan_op *op, int r) {
        op_unlink(op);
        op->state = CHAN_OP_DONE;
        tlv_buf_done(&op->req);
        c->ev.finish(c->ev.userdata, op, r);
}

/* ---- the connection ---- */

static int out_append(struct chan_client *c, const uint8_t *data, size_t len) {
        void *buf;
        int r;

        if (c->out_off > 0 && c->out_off == c->out_len)
                c->out_off = c->out_len = 0;
        if (len > SIZE_MAX - c->out_len)
                return -ENOMEM;
        /* What goes out may be a token (the uplink's channel): erase_grow() wipes the old copy. */
        buf = c->out;
        r = erase_grow(&buf, &c->out_cap, c->out_len, c->out_len + len, SIZE_MAX);
        if (r < 0)
                return r;
        c->out = buf;
        memcpy(c->out + c->out_len, data, len);
        c->out_len += len;
        return 0;
}

static void buffers_drop(struct chan_client *c) {
        if (c->out)
                erase_and_free(c->out, c->out_cap);
        if (c->in)
                erase_and_free(c->in, c->in_cap);
        c->out = c->in = NULL;
        c->out_len = c->out_off = c->out_cap = c->in_len = c->in_cap = 0;
}

static void update_events(struct chan_client *c) {
        uint32_t events = EPOLLIN;

        if (!c->io)
                return;
        if (!c->connected || c->out_off < c->out_len)
                events |= EPOLLOUT; /* EPOLLOUT while connecting: the connect's end */
        (void) sd_event_source_set_io_events(c->io, events);
}

/* The next op to send: high priority first, then the oldest; one whose -EBUSY backoff runs is
 * skipped. */
static struct chan_op *next_to_send(struct chan_client *c, uint64_t now) {
        struct chan_op *best = NULL;

        for (struct chan_op *op = c->head; op; op = op->next)
                if (op->state == CHAN_OP_QUEUED && op->not_before <= now && (!best || op->prio < best->prio))
                        best = op;
        return best;
}

static void chan_pump(struct chan_client *c) {
        uint64_t now = now_monotonic_usec();
        struct chan_op *op;

        if (!c->connected)
                return;
        while (c->inflight < c->p.inflight_max && (op = next_to_send(c, now))) {
                int r = out_append(c, op->req.data, op->req.len);
                if (r < 0) {
                        op_finish(c, op, r);
                        continue;
                }
                op->state = CHAN_OP_SENT;
                c->inflight++;
        }
        update_events(c);
}

static void on_connected(struct chan_client *c) {
        c->connected = true;
        if (c->ev.connected)
                c->ev.connected(c->ev.userdata);
        chan_pump(c);
}

static int on_reconnect_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        struct chan_client *c = userdata;

        c->reconnect_timer = sd_event_source_disable_unref(c->reconnect_timer);
        (void) chan_connect(c);
        return 0;
}

static void schedule_reconnect(struct chan_client *c) {
        uint32_t rnd = 0;
        uint64_t ms;

        if (c->reconnect_timer || !c->event)
                return;
        (void) random_bytes(&rnd, sizeof rnd);
        ms = backoff_ms(c->connect_failures++, c->p.reconnect_min_ms, c->p.reconnect_max_ms, rnd);
        /* A failure leaves the ops for the next request's connect. */
        (void) sd_event_add_time_relative(c->event, &c->reconnect_timer, CLOCK_MONOTONIC, ms * 1000, 0,
                                          on_reconnect_timer, c);
}

/* One complete answer (need bytes at c->in): its op ends, or waits out an -EBUSY backoff. */
static int take_answer(struct chan_client *c, size_t need) {
        struct tlv_msg m;
        struct chan_op *op;
        int r;

        r = tlv_msg_decode(c->p.proto, c->in, need, &m);
        if (r < 0 || !m.answer)
                return -EBADMSG;
        for (op = c->head; op; op = op->next)
                if (op->state == CHAN_OP_SENT && op->id == m.id)
                        break;
        if (op && op->code != m.op)
                return -EBADMSG;
        /* Answered: the connection works, the next loss starts the backoff over. */
        c->connect_failures = 0;
        if (op && m.status == -EBUSY && c->p.retry_busy) {
                uint32_t rnd = 0;

                (void) random_bytes(&rnd, sizeof rnd);
                op->state = CHAN_OP_QUEUED;
                c->inflight--;
                op->not_before = now_monotonic_usec() +
                                 backoff_ms(op->busy++, c->p.busy_min_ms, c->p.busy_max_ms, rnd) * 1000;
                c->n.busy_retries++;
                arm_tick(c); /* its retry */
        } else if (op) {
                int k = m.status < 0 ? m.status : c->ev.answer ? c->ev.answer(c->ev.userdata, op, &m) : 0;
                op_finish(c, op, k);
        } else if (c->abandoned > 0) {
                /* The answer to an abandoned request (each request is answered once): its place
                 * in inflight is free again. */
                c->abandoned--;
                c->inflight--;
        }
        return 0;
}

static int read_input(struct chan_client *c) {
        for (;;) {
                size_t need = TLV_PREFIX_LEN;
                int r = tlv_msg_frame(c->p.proto, c->in, c->in_len, &need);
                if (r < 0)
                        return r;
                if (r > 0) {
                        r = take_answer(c, need);
                        if (r < 0)
                                return r;
                        /* finish() may queue and cancel ops, never close the connection or
                         * free the client (chan-client.h). */
                        memmove(c->in, c->in + need, c->in_len - need);
                        c->in_len -= need;
                        continue;
                }
                if (need > c->in_cap) {
                        size_t cap = need < CHAN_READ_CHUNK ? CHAN_READ_CHUNK : need;
                        uint8_t *n = malloc(cap);

                        if (!n)
                                return -ENOMEM;
                        if (c->in) {
                                memcpy(n, c->in, c->in_len);
                                erase_and_free(c->in, c->in_cap);
                        }
                        c->in = n;
                        c->in_cap = cap;
                }
                ssize_t k = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
                if (k < 0)
                        return errno == EAGAIN || errno == EINTR ? 0 : -errno;
                if (k == 0)
                        return -ECONNRESET;
                c->in_len += (size_t) k;
        }
}

static int on_io(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        struct chan_client *c = userdata;
        int r;

        if (!c->connected) {
                int err = 0;
                socklen_t len = sizeof err;

                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                        err = errno;
                if (err) {
                        chan_disconnect(c, -err);
                        return 0;
                }
                on_connected(c);
                if (c->fd < 0)
                        return 0;
        }
        if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                r = read_input(c);
                if (r < 0) {
                        chan_disconnect(c, r);
                        return 0;
                }
                if (c->fd < 0)
                        return 0;
        }
        while (c->out_off < c->out_len) {
                ssize_t k = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (k < 0) {
                        if (errno == EAGAIN || errno == EINTR)
                                break;
                        chan_disconnect(c, -errno);
                        return 0;
                }
                c->out_off += (size_t) k;
        }
        if (c->out_off == c->out_len && c->out_cap > CHAN_OUT_KEEP) {
                erase_and_free(c->out, c->out_cap);
                c->out = NULL;
                c->out_len = c->out_off = c->out_cap = 0;
        }
        if (c->in_len == 0 && c->in_cap > CHAN_IN_KEEP_CLIENT) {
                erase_and_free(c->in, c->in_cap);
                c->in = NULL;
                c->in_cap = 0;
        }
        chan_pump(c);
        return 0;
}

static int chan_connect(struct chan_client *c) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        const char *path = c->p.socket;
        int fd, r;

        if (c->fd >= 0)
                return 0;
        if (!path || strlen(path) >= sizeof sa.sun_path)
                return -EINVAL;
        memcpy(sa.sun_path, path, strlen(path));
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        c->fd = fd;
        r = connect(fd, (struct sockaddr *) &sa, sizeof sa);
        if (r < 0 && errno != EINPROGRESS && errno != EAGAIN) {
                r = -errno;
                goto fail;
        }
        r = sd_event_add_io(c->event, &c->io, fd, EPOLLIN | EPOLLOUT, on_io, c);
        if (r < 0)
                goto fail;
        /* Connected at once or not: on_io() sees EPOLLOUT and checks SO_ERROR. */
        return 0;
fail:
        chan_disconnect(c, r);
        return r;
}

/* The connection ended (or never came): what was out is sent again on the next one. */
static void chan_disconnect(struct chan_client *c, int error) {
        bool was = c->connected;

        c->io = sd_event_source_disable_unref(c->io);
        if (c->fd >= 0)
                (void) close(c->fd);
        c->fd = -1;
        c->connected = false;
        buffers_drop(c);
        for (struct chan_op *op = c->head; op; op = op->next)
                if (op->state == CHAN_OP_SENT) {
                        op->state = CHAN_OP_QUEUED;
                        c->n.resent++;
                }
        c->inflight = c->abandoned = 0;
        if (was)
                c->n.reconnects++;
        if (c->ev.disconnected)
                c->ev.disconnected(c->ev.userdata, error, was);
        /* Lazily: only while someone waits; else the next request connects. */
        if (c->n_ops > 0)
                schedule_reconnect(c);
}

/* ---- timeouts and -EBUSY backoff ---- */

static int on_tick(sd_event_source *es, uint64_t usec, void *userdata) {
        struct chan_client *c = userdata;
        uint64_t now = now_monotonic_usec();
        struct chan_op *op, *next;

        for (op = c->head; op; op = next) {
                next = op->next;
                if (op->deadline <= now) {
                        c->n.timeouts++;
                        op_abandon(c, op);
                        op_finish(c, op, -ETIMEDOUT);
                        /* finish() may have freed others: start over. */
                        next = c->head;
                        now = now_monotonic_usec();
                }
        }
        chan_pump(c);
        arm_tick(c);
        return 0;
}

static void arm_tick(struct chan_client *c) {
        uint64_t next = UINT64_MAX;

        for (struct chan_op *op = c->head; op; op = op->next) {
                if (op->deadline < next)
                        next = op->deadline;
                if (op->state == CHAN_OP_QUEUED && op->not_before > 0 && op->not_before < next)
                        next = op->not_before;
        }
        if (!c->tick_timer) {
                if (next == UINT64_MAX || !c->event)
                        return;
                (void) sd_event_add_time(c->event, &c->tick_timer, CLOCK_MONOTONIC, next, 0, on_tick, c);
                return;
        }
        if (next == UINT64_MAX) {
                (void) sd_event_source_set_enabled(c->tick_timer, SD_EVENT_OFF);
                return;
        }
        (void) sd_event_source_set_time(c->tick_timer, next);
        (void) sd_event_source_set_enabled(c->tick_timer, SD_EVENT_ONESHOT);
}

/* ---- the client ---- */

int chan_client_new(sd_event *e, const struct chan_client_params *p, const struct chan_client_events *ev,
                    struct chan_client **ret) {
        struct chan_client *c;

        if (!p || !p->proto || !ev || !ev->finish || p->queue_max == 0 || p->inflight_max == 0)
                return -EINVAL;
        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->event = e ? sd_event_ref(e) : NULL;
        c->p = *p;
        c->ev = *ev;
        c->fd = -1;
        *ret = c;
        return 0;
}

struct chan_client *chan_client_free(struct chan_client *c) {
        if (!c)
                return NULL;
        /* Ended: their owners still free them, and no finish() runs. */
        while (c->head)
                op_unlink(c->head);
        c->connected = false;
        c->io = sd_event_source_disable_unref(c->io);
        if (c->fd >= 0)
                (void) close(c->fd);
        buffers_drop(c);
        c->reconnect_timer = sd_event_source_disable_unref(c->reconnect_timer);
        c->tick_timer = sd_event_source_disable_unref(c->tick_timer);
        sd_event_unref(c->event);
        free(c);
        return NULL;
}

bool chan_client_is_connected(const struct chan_client *c) {
        return c && c->connected;
}

void chan_client_counters(const struct chan_client *c, struct chan_client_counters *ret) {
        *ret = c->n;
        ret->pending = c->n_ops;
}
