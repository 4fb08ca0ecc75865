/* SPDX-License-Identifier: MIT */
/* iothubd's client of iothub-uplink (src/uplink-client.c, on chan-client.c) against a peer on a
 * real unix socket, driven step by step by the test on the client's own loop: what the client
 * sends is decoded with the channel's codec, every answer is built with it. What the integration
 * tests (relay.test.mjs with the real uplink) cannot stage at will: the exact resend after a
 * lost connection, the news of a restarted uplink, a cancelled call, a REGISTER that failed
 * before a final answer. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "iothub/chan-client.h"
#include "iothub/conf.h"
#include "iothub/uplink-client.h"
#include "iothub/uplink-proto.h"

struct fx {
        sd_event *e;
        struct iothub_conf conf;
        char dir[64], sock[108];
        int lfd, cfd;      /* the peer's listening socket and its one connection */
        uint8_t in[1 << 20];
        size_t in_len, taken; /* the request read last is in[0..taken) */
        struct uplink_client *u;
        /* What reached the events' table. */
        unsigned news, status_changes;
        char last_news[64], last_reason[64];
};

static void on_news(void *userdata, const char *type, const char *reason) {
        struct fx *f = userdata;

        f->news++;
        (void) snprintf(f->last_news, sizeof f->last_news, "%s", type);
        (void) snprintf(f->last_reason, sizeof f->last_reason, "%s", reason ?: "");
}

static void on_status_changed(void *userdata) {
        ((struct fx *) userdata)->status_changes++;
}

static int setup(void **state) {
        struct fx *f = calloc(1, sizeof *f);

        assert_non_null(f);
        (void) snprintf(f->dir, sizeof f->dir, "/tmp/test-uplink-client-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        (void) snprintf(f->sock, sizeof f->sock, "%s/uplink.sock", f->dir);
        assert_int_equal(unix_listen(f->sock, 4, &f->lfd), 0);
        f->cfd = -1;
        assert_int_equal(sd_event_new(&f->e), 0);
        f->conf.cloud.url = (char *) "https://cloud.example";
        f->conf.cloud.timeout_s = 5;
        f->conf.uplink.socket = f->sock;
        assert_int_equal(uplink_client_new(f->e,
                                           &f->conf,
                                           &(struct uplink_client_events){ .event = on_news,
                                                                           .status_changed = on_status_changed,
                                                                           .userdata = f },
                                           &f->u),
                         0);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        struct fx *f = *state;

        uplink_client_free(f->u);
        if (f->cfd >= 0)
                close(f->cfd);
        close(f->lfd);
        (void) unlink(f->sock);
        (void) rmdir(f->dir);
        sd_event_unref(f->e);
        free(f);
        return 0;
}

/* The client's loop turns until the peer has a connection (a new one when drop is set). */
static void peer_accept(struct fx *f) {
        uint64_t end = now_monotonic_usec() + 5000000;

        if (f->cfd >= 0)
                close(f->cfd);
        f->cfd = -1;
        f->in_len = f->taken = 0;
        while (now_monotonic_usec() < end) {
                f->cfd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (f->cfd >= 0)
                        return;
                assert_true(sd_event_run(f->e, 20000) >= 0);
        }
        fail_msg("the client never connected");
}

/* The client's loop turns until a whole request is in, or the deadline; it is decoded into m
 * (pointing into f->in until the next call). Returns whether one came. */
static bool peer_try_read(struct fx *f, struct tlv_msg *m, uint64_t deadline) {
        memmove(f->in, f->in + f->taken, f->in_len - f->taken);
        f->in_len -= f->taken;
        f->taken = 0;
        while (now_monotonic_usec() < deadline) {
                size_t need = TLV_PREFIX_LEN;
                if (uplink_msg_frame(f->in, f->in_len, &need) == 1) {
                        assert_int_equal(uplink_msg_decode(f->in, need, m), 0);
                        assert_false(m->answer);
                        f->taken = need;
                        return true;
                }
                ssize_t k = read(f->cfd, f->in + f->in_len, sizeof f->in - f->in_len);
                if (k > 0)
                        f->in_len += (size_t) k;
                else
                        assert_true(sd_event_run(f->e, 5000) >= 0);
        }
        return false;
}

static void peer_read(struct fx *f, struct tlv_msg *m) {
        if (!peer_try_read(f, m, now_monotonic_usec() + 5000000))
                fail_msg("no request from the client");
}

static void peer_send(struct fx *f, struct tlv_buf *b) {
        assert_int_equal(tlv_msg_end(b), 0);
        assert_int_equal(send(f->cfd, b->data, b->len, MSG_NOSIGNAL), (ssize_t) b->len);
        tlv_buf_done(b);
}

static void peer_answer_status(struct fx *f, const struct tlv_msg *m) {
        struct tlv_buf b = {};

        assert_int_equal(uplink_msg_begin(&b, m->id, m->op, true, 0), 0);
        assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_STATUS_JSON,
                                         "{\"uplink\":{\"have_key\":true,\"have_token\":true},"
                                         "\"oauth\":{\"state\":\"ok\"}}"),
                         0);
        peer_send(f, &b);
}

/* Reads requests until one of op, answering STATUS on the way (the client asks it at each
 * connection). */
static void peer_expect(struct fx *f, unsigned op, struct tlv_msg *m) {
        for (;;) {
                peer_read(f, m);
                if (m->op == op)
                        return;
                if (m->op == UPLINK_OP_STATUS)
                        peer_answer_status(f, m);
        }
}

static void run_until(struct fx *f, const unsigned *n, unsigned want) {
        uint64_t end = now_monotonic_usec() + 5000000;

        while (*n < want && now_monotonic_usec() < end)
                assert_true(sd_event_run(f->e, 20000) >= 0);
        assert_true(*n >= want);
}

struct answer {
        unsigned calls;
        int error;
        long status;
        char body[64], retry_after[16];
};

static void on_answer(void *userdata, const struct uplink_answer *a) {
        struct answer *x = userdata;

        x->calls++;
        x->error = a->error;
        x->status = a->status;
        (void) snprintf(x->body, sizeof x->body, "%.*s", (int) a->body_len, a->body);
        (void) snprintf(x->retry_after, sizeof x->retry_after, "%s", a->retry_after);
}

static void answer_request(struct fx *f, const struct tlv_msg *m) {
        struct tlv_buf b = {};

        assert_int_equal(uplink_msg_begin(&b, m->id, m->op, true, 0), 0);
        assert_int_equal(tlv_msg_add_u64(&b, UPLINK_TAG_HTTP_STATUS, 503), 0);
        assert_int_equal(tlv_msg_add(&b, UPLINK_TAG_BODY, "{\"e\":1}", 7), 0);
        assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_RETRY_AFTER, "30"), 0);
        peer_send(f, &b);
}

static struct uplink_call *request(struct fx *f, struct answer *x) {
        struct uplink_call *call = NULL;
        char *body = strdup("{\"frames\":[]}");

        assert_non_null(body);
        assert_int_equal(uplink_request(f->u, UPLINK_KIND_STATUS, NULL, body, strlen(body), 0, on_answer, x, &call), 0);
        assert_non_null(call);
        return call;
}

/* A WATCH is out from the start; a REQUEST carries what the kind takes (the body, [cloud]
 * timeout_s), and its answer arrives whole. */
static void test_request_round_trip(void **state) {
        struct fx *f = *state;
        struct answer x = {};
        struct tlv_msg m;
        uint64_t v = 99;
        uint8_t kind = 0;

        peer_accept(f);
        peer_expect(f, UPLINK_OP_WATCH, &m);
        assert_int_equal(tlv_msg_u64(&m, UPLINK_TAG_SINCE, &v), 0);
        assert_int_equal(v, 0);
        (void) request(f, &x);
        peer_expect(f, UPLINK_OP_REQUEST, &m);
        assert_int_equal(tlv_msg_u8(&m, UPLINK_TAG_KIND, &kind), 0);
        assert_int_equal(kind, UPLINK_KIND_STATUS);
        assert_int_equal(tlv_msg_u64(&m, UPLINK_TAG_TIMEOUT, &v), 0);
        assert_int_equal(v, 5);
        assert_int_equal(m.f[UPLINK_TAG_BODY].len, strlen("{\"frames\":[]}"));
        assert_false(tlv_msg_has(&m, UPLINK_TAG_ARG));
        answer_request(f, &m);
        run_until(f, &x.calls, 1);
        assert_int_equal(x.error, 0);
        assert_int_equal(x.status, 503);
        assert_string_equal(x.body, "{\"e\":1}");
        assert_string_equal(x.retry_after, "30");
}

/* The uplink dies with a REQUEST out: the client connects again and sends the same request
 * (same id, same bytes); the answer reaches done() once. The WATCH is asked again from 0 (a
 * restarted uplink counts from 0). */
static void test_resent_after_restart(void **state) {
        struct fx *f = *state;
        struct answer x = {};
        struct tlv_msg m;
        uint32_t id;
        uint64_t since = 99;
        size_t len;
        uint8_t first[256];

        peer_accept(f);
        peer_expect(f, UPLINK_OP_WATCH, &m);
        /* News, so that the next WATCH asks from a generation above 0. */
        {
                struct tlv_buf b = {};
                assert_int_equal(uplink_msg_begin(&b, m.id, m.op, true, 0), 0);
                assert_int_equal(tlv_msg_add_u64(&b, UPLINK_TAG_GEN, 3), 0);
                assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_EVENTS, "[{\"gen\":3,\"type\":\"key_ready\"}]"), 0);
                peer_send(f, &b);
        }
        run_until(f, &f->news, 1);
        assert_string_equal(f->last_news, "key_ready");
        peer_expect(f, UPLINK_OP_WATCH, &m);
        assert_int_equal(tlv_msg_u64(&m, UPLINK_TAG_SINCE, &since), 0);
        assert_int_equal(since, 3);
        (void) request(f, &x);
        peer_expect(f, UPLINK_OP_REQUEST, &m);
        id = m.id;
        len = f->taken;
        assert_true(len <= sizeof first);
        memcpy(first, f->in, len);

        peer_accept(f); /* the old connection closed: the uplink was killed */
        peer_expect(f, UPLINK_OP_REQUEST, &m);
        assert_int_equal(m.id, id);
        assert_int_equal(f->taken, len);
        assert_memory_equal(f->in, first, len);
        answer_request(f, &m);
        run_until(f, &x.calls, 1);
        assert_int_equal(x.status, 503);
        /* The WATCH of the new connection: from 0; the restarted uplink's news (GEN 1 < 3) are
         * all new. */
        peer_expect(f, UPLINK_OP_WATCH, &m);
        assert_int_equal(tlv_msg_u64(&m, UPLINK_TAG_SINCE, &since), 0);
        assert_int_equal(since, 0);
        {
                struct tlv_buf b = {};
                assert_int_equal(uplink_msg_begin(&b, m.id, m.op, true, 0), 0);
                assert_int_equal(tlv_msg_add_u64(&b, UPLINK_TAG_GEN, 1), 0);
                assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_EVENTS,
                                                 "[{\"gen\":1,\"type\":\"signin_changed\",\"reason\":\"signed_in\"}]"),
                                 0);
                peer_send(f, &b);
        }
        run_until(f, &f->news, 2);
        assert_string_equal(f->last_news, "signin_changed");
        assert_string_equal(f->last_reason, "signed_in");
        for (int i = 0; i < 10; i++)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_int_equal(x.calls, 1);
}

/* The STATUS asked at the connection says what the relay may do. */
static void test_status_kept(void **state) {
        struct fx *f = *state;
        struct tlv_msg m;

        assert_false(uplink_have_key(f->u));
        peer_accept(f);
        peer_expect(f, UPLINK_OP_WATCH, &m);
        peer_expect(f, UPLINK_OP_STATUS, &m);
        peer_answer_status(f, &m);
        run_until(f, &f->status_changes, 2);
        assert_true(uplink_have_key(f->u));
        assert_true(uplink_have_token(f->u));
        assert_false(uplink_login_required(f->u));
        assert_true(uplink_is_connected(f->u));
}

/* A cancelled call never reaches its done(), even when its answer comes. */
/* A call cancelled while its request is out: the uplink is told (CANCEL, the request's id, so
 * that its transfer ends too), and the answer that comes anyway never reaches the caller. */
static void test_cancelled_call(void **state) {
        struct fx *f = *state;
        struct answer x = {};
        struct tlv_msg m, req;
        struct uplink_call *call;

        peer_accept(f);
        call = request(f, &x);
        peer_expect(f, UPLINK_OP_REQUEST, &m);
        req = m;
        uplink_call_cancel(call);
        peer_expect(f, UPLINK_OP_CANCEL, &m);
        assert_int_equal(m.id, req.id);
        for (unsigned t = 1; t < _UPLINK_TAG_MAX; t++)
                assert_false(tlv_msg_has(&m, t));
        answer_request(f, &req);
        for (int i = 0; i < 10; i++)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_int_equal(x.calls, 0);
}

struct reg {
        unsigned calls;
        long status;
        char message[128];
};

static void on_registered(void *userdata, long status, const char *message) {
        struct reg *x = userdata;

        x->calls++;
        x->status = status;
        (void) snprintf(x->message, sizeof x->message, "%s", message);
}

/* A registration that failed before a final answer: no HTTP status, the uplink's reason. */
static void test_register_failed_before_answer(void **state) {
        struct fx *f = *state;
        struct reg x = {};
        struct tlv_msg m;
        struct uplink_call *call = NULL;
        struct tlv_buf b = {};

        peer_accept(f);
        assert_int_equal(uplink_register(f->u, on_registered, &x, &call), 0);
        peer_expect(f, UPLINK_OP_REGISTER, &m);
        assert_int_equal(uplink_msg_begin(&b, m.id, m.op, true, 0), 0);
        assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_MESSAGE, "attestation failed: no EK certificate"), 0);
        peer_send(f, &b);
        run_until(f, &x.calls, 1);
        assert_int_equal(x.status, -EPROTO);
        assert_string_equal(x.message, "attestation failed: no EK certificate");
}

/* An uplink that answers every WATCH with an error is asked again after a backoff that grows
 * (100 ms doubling, with jitter), not at once: in 600 ms a handful of WATCHes, not thousands.
 * A WATCH answered is asked again at once (the backoff starts over). */
static void test_watch_error_backoff(void **state) {
        struct fx *f = *state;
        struct tlv_msg m;
        struct tlv_buf b = {};
        unsigned watches = 0;
        uint64_t end;

        peer_accept(f);
        peer_expect(f, UPLINK_OP_WATCH, &m);
        watches++;
        assert_int_equal(uplink_msg_begin(&b, m.id, m.op, true, -EIO), 0);
        peer_send(f, &b);
        end = now_monotonic_usec() + 600000;
        while (peer_try_read(f, &m, end)) {
                if (m.op == UPLINK_OP_STATUS) {
                        peer_answer_status(f, &m);
                        continue;
                }
                assert_int_equal(m.op, UPLINK_OP_WATCH);
                watches++;
                b = (struct tlv_buf){};
                assert_int_equal(uplink_msg_begin(&b, m.id, m.op, true, -EIO), 0);
                peer_send(f, &b);
        }
        assert_in_range(watches, 3, 7);
        /* The WATCH of the last backoff comes; answered, the next one follows at once. */
        peer_expect(f, UPLINK_OP_WATCH, &m);
        b = (struct tlv_buf){};
        assert_int_equal(uplink_msg_begin(&b, m.id, m.op, true, 0), 0);
        assert_int_equal(tlv_msg_add_u64(&b, UPLINK_TAG_GEN, 1), 0);
        assert_int_equal(tlv_msg_add_str(&b, UPLINK_TAG_EVENTS, "[{\"gen\":1,\"type\":\"key_ready\"}]"), 0);
        peer_send(f, &b);
        run_until(f, &f->news, 1);
        end = now_monotonic_usec() + 40000;
        do
                assert_true(peer_try_read(f, &m, end));
        while (m.op != UPLINK_OP_WATCH);
}

struct ended {
        struct chan_op *op[2];
        int r[2];
        unsigned calls[2];
};

static void on_op_finish(void *userdata, struct chan_op *op, int r) {
        struct ended *x = userdata;

        for (unsigned i = 0; i < 2; i++)
                if (x->op[i] == op) {
                        x->calls[i]++;
                        x->r[i] = r;
                }
}

/* chan_op_restart_timeout() (the follower of cloud.c, uplink_call_restart_timeout()): the wait
 * counts afresh from the restart, and a restart never brings a deadline closer. On chan-client.c
 * itself, with a peer that reads and never answers (the fixture's socket, never accepted). */
static void test_op_restart_timeout(void **state) {
        struct fx *f = *state;
        struct chan_client *c = NULL;
        struct chan_op a = {}, b = {};
        struct ended x = { .op = { &a, &b } };
        uint64_t t0;

        assert_int_equal(chan_client_new(f->e,
                                         &(struct chan_client_params){ .proto = &uplink_proto,
                                                                       .socket = f->sock,
                                                                       .queue_max = 4,
                                                                       .inflight_max = 4,
                                                                       .reconnect_min_ms = 100,
                                                                       .reconnect_max_ms = 100 },
                                         &(struct chan_client_events){ .finish = on_op_finish, .userdata = &x }, &c),
                         0);
        assert_int_equal(chan_op_begin(c, &a, UPLINK_OP_STATUS, 0), 0);
        assert_int_equal(chan_op_submit(c, &a, 400000), 0);
        assert_int_equal(chan_op_begin(c, &b, UPLINK_OP_STATUS, 0), 0);
        assert_int_equal(chan_op_submit(c, &b, 400000), 0);
        t0 = now_monotonic_usec();
        chan_op_restart_timeout(&b, 100000); /* closer: kept at 400 ms */
        while (now_monotonic_usec() < t0 + 250000)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_int_equal(x.calls[1], 0);
        chan_op_restart_timeout(&a, 400000); /* from now: ~650 ms */
        while (x.calls[1] == 0 && now_monotonic_usec() < t0 + 2000000)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_int_equal(x.calls[1], 1);
        assert_int_equal(x.r[1], -ETIMEDOUT);
        assert_true(now_monotonic_usec() >= t0 + 390000);
        if (now_monotonic_usec() < t0 + 600000)
                assert_int_equal(x.calls[0], 0); /* the old deadline (400 ms) passed */
        while (x.calls[0] == 0 && now_monotonic_usec() < t0 + 3000000)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_int_equal(x.calls[0], 1);
        assert_int_equal(x.r[0], -ETIMEDOUT);
        assert_true(now_monotonic_usec() >= t0 + 640000);
        chan_op_restart_timeout(&a, 400000); /* ended: nothing */
        chan_op_restart_timeout(NULL, 1);
        chan_client_free(c);
}

/* An op that ends while its request is out (its timeout, chan_op_cancel()) abandons the request:
 * the peer gets the channel's cancel op with the request's id, and the request keeps its place
 * in flight until the peer answers it (the peer counts it until then): with inflight_max 1 the
 * next request waits for that answer. An op that ends before it was sent costs no CANCEL. On
 * chan-client.c itself, with its own socket. */
static void test_abandoned_request(void **state) {
        struct fx *f = *state;
        struct chan_client *c = NULL;
        struct chan_client_counters n;
        struct chan_op a = {}, b = {}, q = {};
        struct ended x = { .op = { &a, &b } };
        struct tlv_msg m, first;
        struct tlv_buf ans = {};
        char path[108];
        uint64_t end;
        int lfd;

        (void) snprintf(path, sizeof path, "%s/chan.sock", f->dir);
        assert_int_equal(unix_listen(path, 4, &lfd), 0);
        assert_int_equal(chan_client_new(f->e,
                                         &(struct chan_client_params){ .proto = &uplink_proto,
                                                                       .socket = path,
                                                                       .queue_max = 4,
                                                                       .inflight_max = 1,
                                                                       .cancel_op = UPLINK_OP_CANCEL,
                                                                       .reconnect_min_ms = 100,
                                                                       .reconnect_max_ms = 100 },
                                         &(struct chan_client_events){ .finish = on_op_finish, .userdata = &x }, &c),
                         0);
        assert_int_equal(chan_op_begin(c, &a, UPLINK_OP_STATUS, 0), 0);
        assert_int_equal(chan_op_submit(c, &a, 100000), 0);
        end = now_monotonic_usec() + 5000000;
        while ((f->cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)) < 0 && now_monotonic_usec() < end)
                assert_true(sd_event_run(f->e, 20000) >= 0);
        assert_true(f->cfd >= 0);
        peer_read(f, &m);
        assert_int_equal(m.op, UPLINK_OP_STATUS);
        first = m;
        assert_int_equal(chan_op_begin(c, &b, UPLINK_OP_STATUS, 0), 0);
        assert_int_equal(chan_op_submit(c, &b, 0), 0);

        /* a's timeout: its finish(), then the CANCEL; b still waits for a's place. */
        peer_read(f, &m);
        assert_int_equal(x.calls[0], 1);
        assert_int_equal(x.r[0], -ETIMEDOUT);
        assert_int_equal(m.op, UPLINK_OP_CANCEL);
        assert_int_equal(m.id, first.id);
        assert_false(peer_try_read(f, &m, now_monotonic_usec() + 200000));
        chan_client_counters(c, &n);
        assert_int_equal(n.cancels_sent, 1);
        assert_int_equal(n.timeouts, 1);

        /* The peer answers the abandoned request: dropped, and b goes. */
        assert_int_equal(uplink_msg_begin(&ans, first.id, UPLINK_OP_STATUS, true, -ECANCELED), 0);
        peer_send(f, &ans);
        peer_read(f, &m);
        assert_int_equal(m.op, UPLINK_OP_STATUS);
        assert_int_not_equal(m.id, first.id);
        first = m;

        /* A queued op cancelled before it went: nothing on the wire for it. */
        assert_int_equal(chan_op_begin(c, &q, UPLINK_OP_STATUS, 0), 0);
        assert_int_equal(chan_op_submit(c, &q, 0), 0);
        chan_op_cancel(&q);
        /* b cancelled while out: CANCEL with its id, and no finish(). */
        chan_op_cancel(&b);
        peer_read(f, &m);
        assert_int_equal(m.op, UPLINK_OP_CANCEL);
        assert_int_equal(m.id, first.id);
        assert_false(peer_try_read(f, &m, now_monotonic_usec() + 100000));
        assert_int_equal(x.calls[1], 0);
        chan_client_counters(c, &n);
        assert_int_equal(n.cancels_sent, 2);
        assert_int_equal(n.pending, 0);
        chan_client_free(c);
        close(lfd);
        (void) unlink(path);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_request_round_trip, setup, teardown),
                cmocka_unit_test_setup_teardown(test_resent_after_restart, setup, teardown),
                cmocka_unit_test_setup_teardown(test_status_kept, setup, teardown),
                cmocka_unit_test_setup_teardown(test_cancelled_call, setup, teardown),
                cmocka_unit_test_setup_teardown(test_register_failed_before_answer, setup, teardown),
                cmocka_unit_test_setup_teardown(test_watch_error_backoff, setup, teardown),
                cmocka_unit_test_setup_teardown(test_op_restart_timeout, setup, teardown),
                cmocka_unit_test_setup_teardown(test_abandoned_request, setup, teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
