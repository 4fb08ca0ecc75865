/* SPDX-License-Identifier: MIT */
/* iothubd's client of iothub-signer (src/signer-client.c) against a peer on a real unix socket on
 * the same sd-event loop, which answers as the test tells it: the link's rules that the
 * integration tests (signerlink.test.mjs, with the real signer) cannot stage at will. Each
 * answer the peer sends is built with the codec; what the client sent is decoded with it. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>

#include "iothub/conf.h"
#include "iothub/signer.h"
#include "iothub/signer-proto.h"

enum peer_mode {
        PEER_ANSWER,      /* answers every request */
        PEER_BUSY_ONCE,   /* -EBUSY to the first request, then answers */
        PEER_DROP_ONCE,   /* reads the first request and closes the connection unanswered */
        PEER_SILENT,      /* reads and never answers */
};

struct peer {
        sd_event *e;
        char path[108];
        int lfd, cfd;
        sd_event_source *lsrc, *csrc;
        enum peer_mode mode;
        unsigned requests, connections, answered;
        struct signer_msg last;           /* the last request's id and op (no fields) */
        unsigned cancels, cancel_fields;  /* CANCELs read, fields they carried */
        uint32_t cancel_id;               /* the last CANCEL's */
        /* The connection (1, 2, ...) that carried the last request of each op. */
        unsigned conn_of[64];
        uint8_t in[65536];
        size_t in_len;
};

struct result {
        unsigned calls;
        int r;
        char sig[256];
};

static void on_done(void *userdata, int r, const struct signer_reply *reply) {
        struct result *res = userdata;

        res->calls++;
        res->r = r;
        if (r >= 0 && reply->signature)
                (void) snprintf(res->sig, sizeof res->sig, "%s", reply->signature);
}

static void peer_close_conn(struct peer *p) {
        p->csrc = sd_event_source_disable_unref(p->csrc);
        if (p->cfd >= 0)
                close(p->cfd);
        p->cfd = -1;
        p->in_len = 0;
}

static void peer_answer(struct peer *p, const struct signer_msg *m, int status) {
        struct signer_buf b = {};

        assert_int_equal(signer_msg_begin(&b, m->id, m->op, true, status), 0);
        if (status == 0 && m->op == SIGNER_OP_KEY_INFO) {
                assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_KEY_ID, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), 0);
                assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_JWK, "{\"kty\":\"EC\",\"crv\":\"P-256\"}"), 0);
                assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_BACKEND, "tpm"), 0);
        } else if (status == 0 && m->op == SIGNER_OP_SIGN_HTTP) {
                assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_SIGNATURE_INPUT,
                                                    "Signature-Input: hub=(\"@method\");created=1"),
                                 0);
                assert_int_equal(signer_msg_add_str(&b, SIGNER_TAG_SIGNATURE, "Signature: hub=:AAAA:"), 0);
        } else if (status == 0) {
                /* Other ops (the client's own STATUS): each required field, of its kind. */
                for (unsigned t = 1; t < _SIGNER_TAG_MAX; t++) {
                        enum signer_kind kind;
                        uint32_t min, max;
                        static const char text[64] = "0123456789012345678901234567890123456789012345678901234567890";

                        if (signer_tag_rule(m->op, true, t) != 2)
                                continue;
                        assert_int_equal(signer_tag_limits(t, &kind, &min, &max), 0);
                        if (kind == SIGNER_KIND_U64)
                                assert_int_equal(signer_msg_add_u64(&b, t, 1), 0);
                        else if (kind == SIGNER_KIND_U8)
                                assert_int_equal(signer_msg_add_u8(&b, t, 0), 0);
                        else
                                assert_int_equal(signer_msg_add(&b, t, text, min > 0 ? min : 1), 0);
                }
        }
        assert_int_equal(signer_msg_end(&b), 0);
        assert_int_equal(send(p->cfd, b.data, b.len, MSG_NOSIGNAL), (ssize_t) b.len);
        signer_buf_done(&b);
        p->answered++;
}

static int peer_on_conn(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct peer *p = userdata;
        ssize_t k = read(fd, p->in + p->in_len, sizeof p->in - p->in_len);
        size_t need;

        if (k <= 0) {
                peer_close_conn(p);
                return 0;
        }
        p->in_len += (size_t) k;
        while (signer_msg_frame(p->in, p->in_len, &need) == 1) {
                struct signer_msg m;

                assert_int_equal(signer_msg_decode(p->in, need, &m), 0);
                assert_false(m.answer);
                if (m.op < ELEMENTSOF(p->conn_of))
                        p->conn_of[m.op] = p->connections;
                if (m.op == SIGNER_OP_CANCEL) {
                        /* Never answered: counted, and the request it names is answered (or
                         * not) as the test says. */
                        p->cancels++;
                        p->cancel_id = m.id;
                        for (unsigned t = 1; t < _SIGNER_TAG_MAX; t++)
                                p->cancel_fields += signer_msg_has(&m, t);
                        memmove(p->in, p->in + need, p->in_len - need);
                        p->in_len -= need;
                        continue;
                }
                if (m.op == SIGNER_OP_STATUS) {
                        /* The client's own requests (STATUS at each connection): answered. */
                        peer_answer(p, &m, 0);
                        memmove(p->in, p->in + need, p->in_len - need);
                        p->in_len -= need;
                        continue;
                }
                p->requests++;
                p->last = (struct signer_msg){ .id = m.id, .op = m.op };
                switch (p->mode) {
                case PEER_DROP_ONCE:
                        p->mode = PEER_ANSWER;
                        peer_close_conn(p);
                        return 0;
                case PEER_BUSY_ONCE:
                        p->mode = PEER_ANSWER;
                        peer_answer(p, &m, -EBUSY);
                        break;
                case PEER_SILENT:
                        break;
                case PEER_ANSWER:
                        peer_answer(p, &m, 0);
                        break;
                }
                memmove(p->in, p->in + need, p->in_len - need);
                p->in_len -= need;
        }
        return 0;
}

static int peer_on_listen(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct peer *p = userdata;
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

        if (c < 0)
                return 0;
        peer_close_conn(p);
        p->cfd = c;
        p->connections++;
        assert_int_equal(sd_event_add_io(p->e, &p->csrc, c, EPOLLIN, peer_on_conn, p), 0);
        return 0;
}

static void peer_listen(struct peer *p) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };

        (void) unlink(p->path);
        memcpy(sa.sun_path, p->path, strlen(p->path));
        p->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        assert_true(p->lfd >= 0);
        assert_int_equal(bind(p->lfd, (struct sockaddr *) &sa, sizeof sa), 0);
        assert_int_equal(listen(p->lfd, 8), 0);
        assert_int_equal(sd_event_add_io(p->e, &p->lsrc, p->lfd, EPOLLIN, peer_on_listen, p), 0);
}

static void peer_stop(struct peer *p) {
        peer_close_conn(p);
        p->lsrc = sd_event_source_disable_unref(p->lsrc);
        if (p->lfd >= 0)
                close(p->lfd);
        p->lfd = -1;
        (void) unlink(p->path);
}

struct fixture {
        sd_event *e;
        struct iothub_conf conf;
        struct peer peer;
        struct signer *s;
        char dir[64];
};

static int setup(void **state) {
        struct fixture *f = calloc(1, sizeof *f);

        assert_non_null(f);
        (void) snprintf(f->dir, sizeof f->dir, "/tmp/test-signer-client-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        assert_int_equal(sd_event_new(&f->e), 0);
        (void) snprintf(f->peer.path, sizeof f->peer.path, "%s/signer.sock", f->dir);
        f->peer.e = f->e;
        f->peer.lfd = f->peer.cfd = -1;
        f->conf.signer.socket = f->peer.path;
        assert_int_equal(signer_new(f->e, &f->conf, NULL, &f->s), 0);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        struct fixture *f = *state;

        signer_free(f->s);
        peer_stop(&f->peer);
        sd_event_unref(f->e);
        (void) rmdir(f->dir);
        free(f);
        return 0;
}

/* Runs the loop until *calls becomes want, for at most ms. */
static void run_until(struct fixture *f, const unsigned *calls, unsigned want, unsigned ms) {
        uint64_t end = now_monotonic_usec() + (uint64_t) ms * 1000;

        while (*calls < want && now_monotonic_usec() < end)
                assert_true(sd_event_run(f->e, 20000) >= 0);
}

static struct signer_op *sign(struct fixture *f, struct result *res) {
        struct signer_op *op = NULL;

        assert_int_equal(signer_sign_http(f->s, SIGNER_PRIO_LOW, "POST", "https://c.example/v1/hubs/h/status",
                                          "Bearer t", "{}", 2, on_done, res, &op),
                         0);
        assert_non_null(op);
        return op;
}

static void test_round_trip(void **state) {
        struct fixture *f = *state;
        struct result res = {};
        struct signer_op *op;

        peer_listen(&f->peer);
        op = sign(f, &res);
        assert_int_equal(res.calls, 0); /* never from inside the call */
        run_until(f, &res.calls, 1, 3000);
        assert_int_equal(res.calls, 1);
        assert_int_equal(res.r, 0);
        assert_string_equal(res.sig, "Signature: hub=:AAAA:");
        assert_int_equal(signer_signatures(f->s), 1);
        assert_true(signer_is_connected(f->s));
        signer_op_free(op);
}

static void test_busy_is_retried(void **state) {
        struct fixture *f = *state;
        struct result res = {};
        struct signer_op *op;

        f->peer.mode = PEER_BUSY_ONCE;
        peer_listen(&f->peer);
        op = sign(f, &res);
        run_until(f, &res.calls, 1, 5000);
        assert_int_equal(res.calls, 1);
        assert_int_equal(res.r, 0);
        assert_int_equal(f->peer.requests, 2);
        signer_op_free(op);
}

static void test_resent_after_connection_lost(void **state) {
        struct fixture *f = *state;
        struct result res = {};
        struct signer_op *op;

        f->peer.mode = PEER_DROP_ONCE;
        peer_listen(&f->peer);
        op = sign(f, &res);
        run_until(f, &res.calls, 1, 8000);
        assert_int_equal(res.calls, 1);
        assert_int_equal(res.r, 0);
        assert_int_equal(f->peer.requests, 2);
        assert_int_equal(f->peer.connections, 2);
        signer_op_free(op);
}

static void test_signer_comes_later(void **state) {
        struct fixture *f = *state;
        struct result res = {};
        struct signer_op *op;

        op = sign(f, &res); /* nothing listens yet */
        for (int i = 0; i < 10; i++)
                assert_true(sd_event_run(f->e, 20000) >= 0);
        assert_int_equal(res.calls, 0);
        assert_false(signer_is_connected(f->s));
        assert_non_null(signer_last_error(f->s));
        peer_listen(&f->peer);
        run_until(f, &res.calls, 1, 8000);
        assert_int_equal(res.calls, 1);
        assert_int_equal(res.r, 0);
        signer_op_free(op);
}

static void test_cancelled_op_never_called(void **state) {
        struct fixture *f = *state;
        struct result a = {}, b = {};
        struct signer_op *opa, *opb;

        peer_listen(&f->peer);
        opa = sign(f, &a);
        opb = sign(f, &b);
        /* a is out (or about to be) when it is cancelled; its answer finds no op. */
        assert_true(sd_event_run(f->e, 0) >= 0);
        signer_op_free(opa);
        run_until(f, &b.calls, 1, 3000);
        for (int i = 0; i < 5; i++)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_int_equal(a.calls, 0);
        assert_int_equal(b.calls, 1);
        assert_int_equal(b.r, 0);
        signer_op_free(opb);
}

/* A signature freed while its request is out: the signer is told (CANCEL with the request's id,
 * no field), so that it never makes a signature still queued for its TPM; the answer that comes
 * anyway (-ECANCELED) is dropped, and the link goes on. */
static void test_cancel_sent(void **state) {
        struct fixture *f = *state;
        struct result a = {}, b = {};
        struct signer_op *op;
        json_t *o;

        f->peer.mode = PEER_SILENT;
        peer_listen(&f->peer);
        op = sign(f, &a);
        run_until(f, &f->peer.requests, 1, 3000);
        assert_int_equal(f->peer.requests, 1);
        assert_int_equal(f->peer.last.op, SIGNER_OP_SIGN_HTTP);
        signer_op_free(op);
        run_until(f, &f->peer.cancels, 1, 3000);
        assert_int_equal(f->peer.cancels, 1);
        assert_int_equal(f->peer.cancel_id, f->peer.last.id);
        assert_int_equal(f->peer.cancel_fields, 0);
        o = json_object();
        assert_non_null(o);
        assert_int_equal(signer_status_json(f->s, o), 0);
        assert_int_equal(json_integer_value(json_object_get(json_object_get(o, "signer"), "cancelled")), 1);
        json_decref(o);

        /* The signer's answer to the cancelled request: dropped; the next request answered. */
        peer_answer(&f->peer, &f->peer.last, -ECANCELED);
        f->peer.mode = PEER_ANSWER;
        op = sign(f, &b);
        run_until(f, &b.calls, 1, 3000);
        for (int i = 0; i < 5; i++)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_int_equal(b.calls, 1);
        assert_int_equal(b.r, 0);
        assert_int_equal(a.calls, 0);
        assert_int_equal(f->peer.cancels, 1);
        assert_true(signer_is_connected(f->s));
        signer_op_free(op);
}

static void test_free_with_requests_out(void **state) {
        struct fixture *f = *state;
        struct result res = {};
        struct signer_op *ops[8];

        f->peer.mode = PEER_SILENT;
        peer_listen(&f->peer);
        for (size_t i = 0; i < ELEMENTSOF(ops); i++)
                ops[i] = sign(f, &res);
        for (int i = 0; i < 10; i++)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_true(f->peer.requests > 0);
        /* The daemon stops: the client goes first, the ops' owners free them after. */
        f->s = signer_free(f->s);
        for (size_t i = 0; i < ELEMENTSOF(ops); i++)
                signer_op_free(ops[i]);
        assert_int_equal(res.calls, 0);
}

static void test_queue_is_bounded(void **state) {
        struct fixture *f = *state;
        struct result res = {};
        struct signer_op **ops = calloc(SIGNER_QUEUE_MAX, sizeof *ops);
        struct signer_op *extra = NULL;

        assert_non_null(ops);
        for (size_t i = 0; i < SIGNER_QUEUE_MAX; i++)
                ops[i] = sign(f, &res);
        assert_int_equal(signer_sign_http(f->s, SIGNER_PRIO_HIGH, "GET", "https://c.example/x", NULL, NULL, 0,
                                          on_done, &res, &extra),
                         -EBUSY);
        assert_null(extra);
        for (size_t i = 0; i < SIGNER_QUEUE_MAX; i++)
                signer_op_free(ops[i]);
        free(ops);
}

static void test_over_long_field_refused(void **state) {
        struct fixture *f = *state;
        struct result res = {};
        struct signer_op *op = NULL;
        char *uri = malloc(4000);

        assert_non_null(uri);
        memset(uri, 'a', 3999);
        uri[3999] = '\0';
        assert_true(signer_sign_http(f->s, SIGNER_PRIO_HIGH, "GET", uri, NULL, NULL, 0, on_done, &res, &op) < 0);
        assert_null(op);
        free(uri);
}

struct reply_copy {
        unsigned calls;
        int r;
        char text[128]; /* evidence, answer or proof */
};

static void on_reply(void *userdata, int r, const struct signer_reply *reply) {
        struct reply_copy *c = userdata;
        const char *t = NULL;

        c->calls++;
        c->r = r;
        if (r >= 0)
                t = reply->evidence ? reply->evidence : reply->answer ? reply->answer : reply->proof;
        (void) snprintf(c->text, sizeof c->text, "%s", t ? t : "");
}

/* Issue 13: the ops that were blocking round trips (KEY_INFO for register, the DPoP proofs of
 * the token endpoint's requests, ATTEST_BEGIN/ANSWER) return at once, without an answer, even
 * from a signer that never answers; done() comes later from the loop, or never once cancelled. */
static void test_former_sync_ops_never_block(void **state) {
        struct fixture *f = *state;
        struct reply_copy k = {}, d = {}, a = {}, b = {};
        struct signer_op *ok = NULL, *od = NULL, *oa = NULL, *ob = NULL;
        uint64_t t0;

        f->peer.mode = PEER_SILENT;
        peer_listen(&f->peer);
        t0 = now_monotonic_usec();
        assert_int_equal(signer_key_info(f->s, on_reply, &k, &ok), 0);
        assert_int_equal(signer_sign_dpop(f->s, SIGNER_PRIO_HIGH, "POST", "https://as.example/token", NULL, "n0nce", on_reply, &d, &od), 0);
        assert_int_equal(signer_attest_begin(f->s, on_reply, &a, &oa), 0);
        assert_int_equal(signer_attest_answer(f->s, "{\"c\":1}", 7, on_reply, &b, &ob), 0);
        /* Queued only: no socket I/O happened inside the calls (they connect lazily, on the loop). */
        assert_true(now_monotonic_usec() - t0 < 50000);
        for (int i = 0; i < 20; i++)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_int_equal(f->peer.requests, 4); /* all four went out, none answered */
        assert_int_equal(k.calls + d.calls + a.calls + b.calls, 0);
        assert_null(signer_op_reply(oa));
        /* Their owners go away (a control client hung up, the daemon stops): no done() ever. */
        signer_op_free(ok);
        signer_op_free(od);
        signer_op_free(oa);
        signer_op_free(ob);
        for (int i = 0; i < 5; i++)
                assert_true(sd_event_run(f->e, 10000) >= 0);
        assert_int_equal(k.calls + d.calls + a.calls + b.calls, 0);
        assert_int_equal(signer_signatures(f->s), 0);
}

/* KEY_INFO and the DPoP proof answered through the loop; the key is kept for signer_key_jwk(). */
static void test_key_info_and_dpop_async(void **state) {
        struct fixture *f = *state;
        struct reply_copy k = {}, d = {};
        struct signer_op *ok = NULL, *od = NULL;
        json_t *jwk = NULL;

        peer_listen(&f->peer);
        assert_int_equal(signer_key_jwk(f->s, &jwk), -ENOKEY);
        assert_int_equal(signer_key_info(f->s, on_reply, &k, &ok), 0);
        assert_int_equal(signer_sign_dpop(f->s, SIGNER_PRIO_HIGH, "POST", "https://as.example/token", NULL, NULL, on_reply, &d, &od), 0);
        assert_int_equal(k.calls + d.calls, 0); /* never from inside the call */
        run_until(f, &d.calls, 1, 3000);
        run_until(f, &k.calls, 1, 3000);
        assert_int_equal(k.r, 0);
        assert_int_equal(d.r, 0);
        assert_true(strlen(d.text) > 0);
        assert_string_equal(signer_key_id(f->s), "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        assert_string_equal(signer_key_backend(f->s), "tpm");
        assert_int_equal(signer_key_jwk(f->s, &jwk), 0);
        assert_string_equal(json_string_value(json_object_get(jwk, "kty")), "EC");
        json_decref(jwk);
        assert_int_equal(signer_signatures(f->s), 1); /* the proof; KEY_INFO is no signature */
        signer_op_free(ok);
        signer_op_free(od);
}

/* The attestation pair goes over the client's one connection, the one whose attestation state the
 * signer keeps (iothub-signer(8)): there is no second, blocking connection any more. */
static void test_attest_pair_on_one_connection(void **state) {
        struct fixture *f = *state;
        struct reply_copy a = {}, b = {};
        struct signer_op *oa = NULL, *ob = NULL;

        peer_listen(&f->peer);
        assert_int_equal(signer_attest_begin(f->s, on_reply, &a, &oa), 0);
        run_until(f, &a.calls, 1, 3000);
        assert_int_equal(a.r, 0);
        assert_true(strlen(a.text) > 0); /* the evidence */
        assert_non_null(signer_op_reply(oa));
        assert_int_equal(signer_attest_answer(f->s, "{\"c\":1}", 7, on_reply, &b, &ob), 0);
        run_until(f, &b.calls, 1, 3000);
        assert_int_equal(b.r, 0);
        assert_true(strlen(b.text) > 0); /* the answer */
        assert_int_equal(f->peer.connections, 1);
        assert_int_equal(f->peer.conn_of[SIGNER_OP_ATTEST_BEGIN], 1);
        assert_int_equal(f->peer.conn_of[SIGNER_OP_ATTEST_ANSWER], 1);
        signer_op_free(oa);
        signer_op_free(ob);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
                cmocka_unit_test_setup_teardown(test_busy_is_retried, setup, teardown),
                cmocka_unit_test_setup_teardown(test_resent_after_connection_lost, setup, teardown),
                cmocka_unit_test_setup_teardown(test_signer_comes_later, setup, teardown),
                cmocka_unit_test_setup_teardown(test_cancelled_op_never_called, setup, teardown),
                cmocka_unit_test_setup_teardown(test_cancel_sent, setup, teardown),
                cmocka_unit_test_setup_teardown(test_free_with_requests_out, setup, teardown),
                cmocka_unit_test_setup_teardown(test_queue_is_bounded, setup, teardown),
                cmocka_unit_test_setup_teardown(test_over_long_field_refused, setup, teardown),
                cmocka_unit_test_setup_teardown(test_former_sync_ops_never_block, setup, teardown),
                cmocka_unit_test_setup_teardown(test_key_info_and_dpop_async, setup, teardown),
                cmocka_unit_test_setup_teardown(test_attest_pair_on_one_connection, setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
