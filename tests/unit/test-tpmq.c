/* SPDX-License-Identifier: MIT */
/* The hub key's asynchronous signing queue (hubkey.h, "asynchronous signing") against a real
 * software TPM, through both kinds of TCTI the daemon meets:
 *   - "swtpm": no poll handles (a connection per command), so each signature is collected with a
 *     blocking Esys_Sign_Finish() when its turn comes;
 *   - "mssim": a socket that stays open, with a poll handle, as /dev/tpmrm0 has: the answer is
 *     read from an sd-event io source. swtpm speaks the simulator's framing on its command port;
 *     its control port does not speak the simulator's platform commands, so a thread of this test
 *     relays the command port and answers the platform port's power-on/NV-on with success.
 * And the file backend. Checked: priorities (high before low, FIFO within one), cancel by free
 * (queued, in flight, finished but not delivered: the callback never runs), free from inside the
 * callback, a synchronous call while a signature is in flight, hubkey_free() with ops left, and
 * every signature with plain OpenSSL. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/socket.h>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "iothub/hubkey.h"
#include "swtpm-helper.h"

#define HANDLE 0x81000101u

static struct swtpm tpm = { .pid = -1 };
static char tcti_mssim[96];
static char keyfile[] = "/tmp/test-tpmq-key-XXXXXX";

/* ---- the simulator-protocol relay (a thread; loopback only) ---- */

struct relay {
        pthread_t thread;
        int listen_data, listen_plat, stop_pipe[2];
        uint16_t port, upstream;
};
static struct relay relay = { .listen_data = -1, .listen_plat = -1, .stop_pipe = { -1, -1 } };

static int listen_on(uint16_t port) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;

        assert_true(fd >= 0);
        (void) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0 || listen(fd, 4) < 0) {
                close(fd);
                return -1;
        }
        return fd;
}

static int connect_to(uint16_t port) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;

        if (fd < 0)
                return -1;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
                close(fd);
                return -1;
        }
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        return fd;
}

/* fds: [0] stop, [1] listen data, [2] listen platform, then pairs (client, upstream) for data
 * connections and single platform connections (upstream -1). */
#define RELAY_MAX 16
static void *relay_main(void *arg) {
        int client[RELAY_MAX], up[RELAY_MAX];
        size_t n = 0;

        (void) arg;
        for (;;) {
                struct pollfd p[3 + 2 * RELAY_MAX];
                size_t np = 0;

                p[np++] = (struct pollfd) { .fd = relay.stop_pipe[0], .events = POLLIN };
                p[np++] = (struct pollfd) { .fd = relay.listen_data, .events = POLLIN };
                p[np++] = (struct pollfd) { .fd = relay.listen_plat, .events = POLLIN };
                for (size_t i = 0; i < n; i++) {
                        p[np++] = (struct pollfd) { .fd = client[i], .events = POLLIN };
                        p[np++] = (struct pollfd) { .fd = up[i], .events = POLLIN };
                }
                if (poll(p, np, -1) < 0)
                        continue;
                if (p[0].revents)
                        break;
                for (int l = 1; l <= 2; l++)
                        if (p[l].revents & POLLIN) {
                                int c = accept4(p[l].fd, NULL, NULL, SOCK_CLOEXEC);
                                if (c < 0 || n == RELAY_MAX) {
                                        if (c >= 0)
                                                close(c);
                                        continue;
                                }
                                client[n] = c;
                                up[n] = l == 1 ? connect_to(relay.upstream) : -1;
                                if (l == 1 && up[n] < 0) {
                                        close(c);
                                        continue;
                                }
                                n++;
                        }
                for (size_t i = 0; i < n; i++) {
                        struct pollfd *pc = &p[3 + 2 * i], *pu = &p[4 + 2 * i];
                        uint8_t buf[8192];
                        bool closed = false;
                        ssize_t k;

                        if (i >= (size_t) (np - 3) / 2)
                                break; /* accepted in this round: not polled yet */
                        if (pc->revents) {
                                k = read(client[i], buf, sizeof buf);
                                if (k <= 0)
                                        closed = true;
                                else if (up[i] >= 0)
                                        closed = write(up[i], buf, (size_t) k) != k;
                                else {
                                        /* Platform commands are 4-byte codes (power on, NV on,
                                         * session end); each is acknowledged with a zero UINT32. */
                                        static const uint8_t ack[4];
                                        for (ssize_t j = 0; j + 4 <= k && !closed; j += 4)
                                                closed = write(client[i], ack, sizeof ack) != (ssize_t) sizeof ack;
                                }
                        }
                        if (!closed && up[i] >= 0 && pu->revents) {
                                k = read(up[i], buf, sizeof buf);
                                closed = k <= 0 || write(client[i], buf, (size_t) k) != k;
                        }
                        if (closed) {
                                close(client[i]);
                                if (up[i] >= 0)
                                        close(up[i]);
                                client[i] = client[n - 1];
                                up[i] = up[n - 1];
                                n--;
                                break; /* the pollfd array no longer matches: poll again */
                        }
                }
        }
        for (size_t i = 0; i < n; i++) {
                close(client[i]);
                if (up[i] >= 0)
                        close(up[i]);
        }
        return NULL;
}

static void relay_start(uint16_t upstream) {
        for (int attempt = 0; attempt < 20; attempt++) {
                uint16_t p = pick_port_pair();
                relay.listen_data = listen_on(p);
                relay.listen_plat = listen_on((uint16_t) (p + 1));
                if (relay.listen_data >= 0 && relay.listen_plat >= 0) {
                        relay.port = p;
                        break;
                }
                if (relay.listen_data >= 0)
                        close(relay.listen_data);
                if (relay.listen_plat >= 0)
                        close(relay.listen_plat);
                relay.listen_data = relay.listen_plat = -1;
        }
        assert_true(relay.listen_data >= 0);
        relay.upstream = upstream;
        assert_int_equal(pipe2(relay.stop_pipe, O_CLOEXEC), 0);
        assert_int_equal(pthread_create(&relay.thread, NULL, relay_main, NULL), 0);
        snprintf(tcti_mssim, sizeof tcti_mssim, "mssim:host=127.0.0.1,port=%u", relay.port);
}

static void relay_stop(void) {
        if (relay.stop_pipe[1] < 0)
                return;
        assert_int_equal(write(relay.stop_pipe[1], "x", 1), 1);
        pthread_join(relay.thread, NULL);
        close(relay.listen_data);
        close(relay.listen_plat);
        close(relay.stop_pipe[0]);
        close(relay.stop_pipe[1]);
        relay.stop_pipe[0] = relay.stop_pipe[1] = -1;
}

/* ---- fixtures ---- */

static int setup(void **state) {
        struct iothub_conf c = { .key = { .backend = KEY_BACKEND_TPM, .handle = HANDLE } };
        struct iothub_conf f = { .key = { .backend = KEY_BACKEND_FILE } };
        int fd;

        (void) state;
        (void) setenv("TSS2_LOG", "all+none", 0);
        swtpm_start(&tpm, "tpmq");
        c.key.tcti = tpm.tcti;
        assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
        relay_start(tpm.port);
        fd = mkstemp(keyfile);
        assert_true(fd >= 0);
        close(fd);
        assert_int_equal(unlink(keyfile), 0);
        f.key.file = keyfile;
        assert_int_equal(hubkey_init(&f, NULL, NULL), 0);
        return 0;
}

static int teardown(void **state) {
        (void) state;
        relay_stop();
        swtpm_stop(&tpm);
        (void) unlink(keyfile);
        return 0;
}

enum kind { KIND_SWTPM, KIND_MSSIM, KIND_FILE };

static struct hubkey *open_key(enum kind kind) {
        struct iothub_conf c = { .key = { .backend = KEY_BACKEND_TPM, .handle = HANDLE } };
        struct hubkey *k = NULL;
        char *err = NULL;

        if (kind == KIND_FILE) {
                c.key.backend = KEY_BACKEND_FILE;
                c.key.file = keyfile;
        } else
                c.key.tcti = kind == KIND_SWTPM ? tpm.tcti : tcti_mssim;
        if (hubkey_open(&c, &k, &err) < 0)
                fail_msg("hubkey_open: %s", err ? err : "?");
        return k;
}

/* ---- what the callbacks record ---- */

struct rec {
        struct hubkey *k;
        unsigned order[16];
        unsigned n;
        bool free_in_callback;
};

struct job {
        struct rec *rec;
        unsigned id;
        char msg[32];
        struct hubkey_op *op;
        int r;
        uint8_t sig[HUBKEY_SIG_LEN];
        unsigned calls;
};

static bool sig_verifies(struct hubkey *k, const char *msg, const uint8_t sig[HUBKEY_SIG_LEN]) {
        char *pem = NULL;
        BIO *bio;
        EVP_PKEY *pkey;
        ECDSA_SIG *es = ECDSA_SIG_new();
        uint8_t der[80], *p = der;
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        int len, ok;

        assert_int_equal(hubkey_public_pem(k, &pem), 0);
        bio = BIO_new_mem_buf(pem, -1);
        pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
        assert_non_null(pkey);
        assert_int_equal(ECDSA_SIG_set0(es, BN_bin2bn(sig, 32, NULL), BN_bin2bn(sig + 32, 32, NULL)), 1);
        len = i2d_ECDSA_SIG(es, &p);
        assert_true(len > 0);
        ok = EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, pkey) == 1 &&
             EVP_DigestVerify(ctx, der, (size_t) len, (const uint8_t *) msg, strlen(msg)) == 1;
        EVP_MD_CTX_free(ctx);
        ECDSA_SIG_free(es);
        EVP_PKEY_free(pkey);
        BIO_free(bio);
        free(pem);
        return ok;
}

static void on_done(void *userdata, int r, const uint8_t *sig) {
        struct job *j = userdata;

        j->calls++;
        j->r = r;
        if (r >= 0)
                memcpy(j->sig, sig, HUBKEY_SIG_LEN);
        assert_true(j->rec->n < ELEMENTSOF(j->rec->order));
        j->rec->order[j->rec->n++] = j->id;
        if (j->rec->free_in_callback)
                j->op = hubkey_op_free(j->op);
}

static void queue(struct hubkey *k, struct rec *rec, struct job *j, unsigned id, enum hubkey_prio prio) {
        j->rec = rec;
        j->id = id;
        snprintf(j->msg, sizeof j->msg, "message %u", id);
        assert_int_equal(hubkey_sign_async(k, prio, j->msg, strlen(j->msg), on_done, j, &j->op), 0);
        assert_non_null(j->op);
        assert_int_equal(j->calls, 0); /* never from inside hubkey_sign_async() */
}

static void run_until(sd_event *e, struct rec *rec, unsigned n) {
        uint64_t deadline = now_usec() + 10 * 1000000;

        while (rec->n < n) {
                assert_true(now_usec() < deadline);
                assert_true(sd_event_run(e, 100000) >= 0);
        }
        /* A little longer: nothing else may come. */
        for (int i = 0; i < 5; i++)
                assert_true(sd_event_run(e, 10000) >= 0);
}

/* ---- cases ---- */

static void check_priorities(enum kind kind) {
        sd_event *e = NULL;
        struct hubkey *k = open_key(kind);
        struct rec rec = { .k = k };
        struct job j[9] = {};
        uint64_t before = hubkey_signatures(k);
        /* Queued in this order, mixed; taken command signatures first, then high, then low, each
         * first come first served (hubkey.h). */
        static const enum hubkey_prio prio[9] = { HUBKEY_PRIO_LOW,     HUBKEY_PRIO_HIGH, HUBKEY_PRIO_COMMAND,
                                                  HUBKEY_PRIO_LOW,     HUBKEY_PRIO_COMMAND, HUBKEY_PRIO_HIGH,
                                                  HUBKEY_PRIO_HIGH,    HUBKEY_PRIO_LOW,  HUBKEY_PRIO_COMMAND };
        static const unsigned expected[9] = { 2, 4, 8, 1, 5, 6, 0, 3, 7 };

        assert_int_equal(sd_event_new(&e), 0);
        assert_int_equal(hubkey_sign_async(k, HUBKEY_PRIO_LOW, "x", 1, on_done, &j[0], &j[0].op), -ENXIO);
        assert_int_equal(hubkey_attach_event(k, e), 0);
        assert_int_equal(hubkey_attach_event(k, e), 0);
        assert_int_equal(hubkey_sign_async(k, _HUBKEY_PRIO_MAX, "x", 1, on_done, &j[0], &j[0].op), -EINVAL);
        for (unsigned i = 0; i < 9; i++)
                queue(k, &rec, &j[i], i, prio[i]);
        assert_int_equal(hubkey_ops_pending(k), 9);
        run_until(e, &rec, 9);
        assert_int_equal(rec.n, 9);
        assert_memory_equal(rec.order, expected, sizeof expected);
        for (unsigned i = 0; i < 9; i++) {
                assert_int_equal(j[i].calls, 1);
                assert_int_equal(j[i].r, 0);
                assert_true(sig_verifies(k, j[i].msg, j[i].sig));
                j[i].op = hubkey_op_free(j[i].op);
        }
        assert_int_equal(hubkey_signatures(k), before + 9);
        assert_int_equal(hubkey_ops_pending(k), 0);
        hubkey_free(k);
        sd_event_unref(e);
}

static void check_cancel(enum kind kind) {
        sd_event *e = NULL;
        struct hubkey *k = open_key(kind);
        struct rec rec = { .k = k };
        struct job j[5] = {};
        uint8_t sig[HUBKEY_SIG_LEN];

        assert_int_equal(sd_event_new(&e), 0);
        assert_int_equal(hubkey_attach_event(k, e), 0);
        /* Queued, then freed: never called. */
        queue(k, &rec, &j[0], 0, HUBKEY_PRIO_LOW);
        queue(k, &rec, &j[1], 1, HUBKEY_PRIO_LOW);
        queue(k, &rec, &j[2], 2, HUBKEY_PRIO_LOW);
        assert_false(hubkey_op_is_queued(NULL));
        for (int i = 0; i < 3; i++)
                assert_true(hubkey_op_is_queued(j[i].op));
        j[1].op = hubkey_op_free(j[1].op);
        /* One iteration: j[0] starts (in flight with mssim; finished, not delivered, otherwise):
         * no longer queued (iothub-signer's CANCEL leaves it to finish), j[2] still is. */
        assert_true(sd_event_run(e, 0) >= 0);
        assert_int_equal(rec.n, 0);
        assert_false(hubkey_op_is_queued(j[0].op));
        assert_true(hubkey_op_is_queued(j[2].op));
        /* Freed while in the TPM (or waiting for delivery): never called; j[2] still comes. */
        j[0].op = hubkey_op_free(j[0].op);
        run_until(e, &rec, 1);
        assert_int_equal(rec.n, 1);
        assert_int_equal(rec.order[0], 2);
        assert_int_equal(j[0].calls + j[1].calls, 0);
        assert_true(sig_verifies(k, j[2].msg, j[2].sig));
        assert_false(hubkey_op_is_queued(j[2].op)); /* delivered */
        j[2].op = hubkey_op_free(j[2].op);

        /* A synchronous signature while one is in flight: both right, the async one delivered
         * later from the loop. */
        queue(k, &rec, &j[3], 3, HUBKEY_PRIO_HIGH);
        assert_true(sd_event_run(e, 0) >= 0);
        assert_int_equal(hubkey_sign(k, "sync", 4, sig), 0);
        assert_true(sig_verifies(k, "sync", sig));
        assert_int_equal(j[3].calls, 0);
        rec.free_in_callback = true; /* and the callback frees its own op */
        run_until(e, &rec, 2);
        assert_int_equal(j[3].calls, 1);
        assert_null(j[3].op);
        assert_true(sig_verifies(k, j[3].msg, j[3].sig));
        rec.free_in_callback = false;

        /* The key goes away with ops left: none is called, and their owners free them after. */
        queue(k, &rec, &j[4], 4, HUBKEY_PRIO_LOW);
        queue(k, &rec, &j[0], 5, HUBKEY_PRIO_HIGH);
        assert_true(sd_event_run(e, 0) >= 0);
        assert_true(hubkey_op_is_queued(j[4].op));
        hubkey_free(k);
        assert_false(hubkey_op_is_queued(j[4].op));
        for (int i = 0; i < 5; i++)
                assert_true(sd_event_run(e, 10000) >= 0);
        assert_int_equal(j[4].calls + j[0].calls, 0);
        j[4].op = hubkey_op_free(j[4].op);
        j[0].op = hubkey_op_free(j[0].op);
        assert_int_equal(rec.n, 2);
        sd_event_unref(e);
}

static void test_swtpm_priorities(void **state) {
        (void) state;
        check_priorities(KIND_SWTPM);
}
static void test_mssim_priorities(void **state) {
        (void) state;
        check_priorities(KIND_MSSIM);
}
static void test_file_priorities(void **state) {
        (void) state;
        check_priorities(KIND_FILE);
}
static void test_swtpm_cancel(void **state) {
        (void) state;
        check_cancel(KIND_SWTPM);
}
static void test_mssim_cancel(void **state) {
        (void) state;
        check_cancel(KIND_MSSIM);
}
static void test_file_cancel(void **state) {
        (void) state;
        check_cancel(KIND_FILE);
}

/* With a poll handle the signature really is asynchronous: hubkey_sign_async() and the
 * iteration that sends the command return before the TPM answered (the answer is read by a
 * later iteration, from the io source). */
static void test_mssim_is_async(void **state) {
        sd_event *e = NULL;
        struct hubkey *k = open_key(KIND_MSSIM);
        struct rec rec = { .k = k };
        struct job j = {};
        uint64_t before = hubkey_signatures(k);

        (void) state;
        assert_int_equal(sd_event_new(&e), 0);
        assert_int_equal(hubkey_attach_event(k, e), 0);
        queue(k, &rec, &j, 0, HUBKEY_PRIO_LOW);
        assert_true(sd_event_run(e, 0) >= 0); /* sends TPM2_Sign */
        assert_int_equal(j.calls, 0);
        assert_int_equal(hubkey_ops_pending(k), 1);
        /* Counted when the answer is read: not yet, so the iteration did not wait for it. */
        assert_int_equal(hubkey_signatures(k), before);
        run_until(e, &rec, 1);
        assert_int_equal(j.calls, 1);
        assert_true(sig_verifies(k, j.msg, j.sig));
        j.op = hubkey_op_free(j.op);
        hubkey_free(k);
        sd_event_unref(e);
}

/* The mssim TCTI's socket has TCP_NODELAY (hubkey.c, tcti_nodelay()): that TCTI writes each
 * command's header and body apart, and with Nagle's algorithm the body waited for the relay's
 * delayed ACK, about 40 ms a command. The hub key lives in this process: its socket is the one
 * of ours connected to the relay's command port. */
static void test_mssim_nodelay(void **state) {
        struct hubkey *k = open_key(KIND_MSSIM);
        unsigned found = 0;

        (void) state;
        for (int fd = 3; fd < 1024; fd++) {
                struct sockaddr_in peer;
                socklen_t len = sizeof peer;
                int nodelay = 0;
                socklen_t olen = sizeof nodelay;

                if (getpeername(fd, (struct sockaddr *) &peer, &len) < 0 || peer.sin_family != AF_INET ||
                    ntohs(peer.sin_port) != relay.port)
                        continue;
                assert_int_equal(getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, &olen), 0);
                assert_true(nodelay != 0);
                found++;
        }
        assert_int_equal(found, 1);
        hubkey_free(k);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_swtpm_priorities), cmocka_unit_test(test_mssim_priorities),
                cmocka_unit_test(test_file_priorities),  cmocka_unit_test(test_swtpm_cancel),
                cmocka_unit_test(test_mssim_cancel),     cmocka_unit_test(test_file_cancel),
                cmocka_unit_test(test_mssim_is_async),   cmocka_unit_test(test_mssim_nodelay),
        };
        return cmocka_run_group_tests(tests, setup, teardown);
}
