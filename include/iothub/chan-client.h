/* SPDX-License-Identifier: MIT */
/* The client side of the hub's binary channels (issue 14): one non-blocking SOCK_STREAM
 * connection on the loop to a unix socket, carrying requests of one channel's table
 * (include/iothub/tlv.h) and matching their answers by request id. Both of iothubd's peers use
 * it: iothub-signer (src/signer-client.c) and iothub-uplink (src/uplink-client.c); each is a
 * thin layer that builds its requests and reads its answers.
 *
 * The rules (ARCHITECTURE.md, "one owner, cancel by ending"):
 *   - An op is the caller's memory (struct chan_op inside its own struct). chan_op_begin()
 *     starts its request, the caller adds fields (tlv_msg_add*() on op->req), chan_op_submit()
 *     queues it. The events' finish() runs exactly once, from the loop, never from inside
 *     chan_op_submit(), unless chan_op_cancel() or chan_client_free() ended it first.
 *   - The connection is made lazily and made again, with backoff, when the peer goes away
 *     (killed, restarted by systemd); the requests that were out are sent again on the new
 *     connection: every op of both channels is safe to repeat (iothub-signer(8),
 *     iothub-uplink(8)). With retry_busy, an -EBUSY answer (the signer's rate limit) is retried
 *     after a short backoff. Neither is seen by the caller.
 *   - A request waits at most its timeout (queued, retried or out; 0: no limit, a long poll);
 *     then finish() gets -ETIMEDOUT. At most queue_max requests wait: beyond that
 *     chan_op_begin() fails with -EBUSY.
 *   - A request that is out when its op ends without its answer (a timeout, chan_op_cancel())
 *     is abandoned: on a channel with a cancel op the peer is told (a message of that op with
 *     the request's id, never answered), so that its work ends too; either way the request
 *     counts towards inflight_max until the peer answers it, as it counts at the peer, and
 *     that answer is dropped.
 *   - High-priority requests are sent before low ones; at most inflight_max are out at once.
 *   - Requests are kept encoded until answered (for the resend) and wiped when they end: they
 *     may carry a token or an Authorization value. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <systemd/sd-event.h>

#include "iothub/tlv.h"

struct chan_client;

enum chan_op_state { CHAN_OP_IDLE, CHAN_OP_QUEUED, CHAN_OP_SENT, CHAN_OP_DONE };

/* Embedded in the caller's op; its members are the client's, but req, which the caller fills
 * between chan_op_begin() and chan_op_submit(). */
struct chan_op {
        struct chan_client *client; /* NULL once ended */
        struct chan_op *prev, *next;
        uint32_t id;
        unsigned code;
        unsigned prio; /* 0 first */
        enum chan_op_state state;
        struct tlv_buf req;
        uint64_t deadline;   /* CLOCK_MONOTONIC usec, UINT64_MAX: none */
        uint64_t not_before; /* after an -EBUSY answer */
        unsigned busy;       /* -EBUSY answers in a row */
};

struct chan_client_params {
        const struct tlv_proto *proto;
        const char *socket; /* the caller's, outlives the client */
        unsigned queue_max, inflight_max;
        bool retry_busy;
        unsigned cancel_op; /* the channel's op that tells the peer a request is abandoned; 0: none */
        unsigned reconnect_min_ms, reconnect_max_ms, busy_min_ms, busy_max_ms;
};

struct chan_client_events {
        /* A successful answer to op (status 0): the caller copies what it needs from m (valid
         * during the call only) and returns 0, or a negative errno for an answer it cannot use,
         * which finish() then gets. May be NULL. */
        int (*answer)(void *userdata, struct chan_op *op, const struct tlv_msg *m);
        /* op ended with r (0 after answer(), the peer's error status, -ETIMEDOUT, or a local
         * failure): it is out of the queue already, so that the caller may free it, queue others or
         * cancel others from here. */
        void (*finish)(void *userdata, struct chan_op *op, int r);
        /* The connection came up. May be NULL. */
        void (*connected)(void *userdata);
        /* The connection ended (was_connected) or could not be made (error: why). The waiting ops
         * stay queued for the next one. May be NULL. */
        void (*disconnected)(void *userdata, int error, bool was_connected);
        void *userdata;
};

struct chan_client_counters {
        uint64_t reconnects, resent, busy_retries, timeouts;
        uint64_t cancels_sent; /* cancel_op messages: requests abandoned while out */
        unsigned pending; /* ops queued or out */
};

/* e is referenced; p->socket and p->proto must outlive the client; p and ev are copied. Does
 * not connect yet. */
int chan_client_new(sd_event *e, const struct chan_client_params *p, const struct chan_client_events *ev,
                    struct chan_client **ret);
/* Ends every op (no finish()), closes the connection. NULL accepted. Returns NULL. */
struct chan_client *chan_client_free(struct chan_client *c);

/* Starts op's request (code, prio): -EBUSY with a full queue, or the codec's error. */
int chan_op_begin(struct chan_client *c, struct chan_op *op, unsigned code, unsigned prio);
/* Ends the message (the codec checks it against every rule the peer applies: -EINVAL, op not
 * queued) and queues it; timeout_usec 0: no limit. Connects when needed. */
int chan_op_submit(struct chan_client *c, struct chan_op *op, uint64_t timeout_usec);
/* Ends op without finish() if it has not ended; wipes its request. NULL accepted. The caller
 * frees its memory. */
void chan_op_cancel(struct chan_op *op);
/* op's timeout counts afresh from now (timeout_usec 0: no limit), for an op whose time at the
 * peer starts later than its submission (a chained status upload, uplink-client.h). Only ever
 * later: a deadline already further out is kept. An op that ended: nothing. NULL accepted. */
void chan_op_restart_timeout(struct chan_op *op, uint64_t timeout_usec);

bool chan_client_is_connected(const struct chan_client *c);
void chan_client_counters(const struct chan_client *c, struct chan_client_counters *ret);
