/* SPDX-License-Identifier: MIT */
/* The control socket's deadline against a loop that comes late to it (src/control.c). A client's
 * request that arrived, and an answer that was made, must not be dropped because the turn of the
 * loop that saw them also saw the deadline pass. The test holds the loop (a sleep between two
 * turns) past a short deadline (control_set_timeout()), then lets a source of higher priority run
 * first in the next turn, as the daemon's other sources do: the database's sync (the answer of a
 * durable request goes after it), the uplink's answer to a sign-in. sd-event does not order
 * sources of one priority that became pending in the same turn, so before the fix the
 * connection's timer could run first and close the connection: iothubctl then read nothing
 * ("Connection reset by peer"), as the clock sign-in test in faults.test.mjs saw now and then.
 * Both cases fail on the code before the fix (the commit message says how). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "iothub/control.h"
#include "iothub/util.h"

#define DEADLINE_USEC (200 * UINT64_C(1000))
#define LATE_USEC (350 * UINT64_C(1000)) /* how long the loop is held: past the deadline */
/* Bounds on waiting for what should come at once (slow machines, valgrind, qemu-user), and for
 * the deadline, which sd-event may run up to 250 ms late (its default accuracy). */
#define WAIT_MAX_USEC (3 * UINT64_C(1000000))

struct fixture {
        char dir[64];
        char *sock;
        struct iothub_conf conf;
        sd_event *e;
        struct control *ctl;
        int efd;                     /* "another source": ready in the turn after the hold */
        sd_event_source *efd_source; /* at SD_EVENT_PRIORITY_IMPORTANT: runs first in that turn */
        db_sync_wait_t sync_cb;      /* a durable request's answer waits for this "sync" */
        void *sync_userdata;
        unsigned sync_waits;
        bool complete_sync; /* the other source's callback completes the sync */
};

static int fake_status(void *userdata, json_t **ret) {
        *ret = json_pack("{s:s}", "hub_id", "test-hub");
        return *ret ? 0 : -ENOMEM;
}

static int fake_durable_wait(void *userdata, db_sync_wait_t cb, void *cb_userdata, struct db_sync_wait **ret) {
        struct fixture *f = userdata;

        f->sync_cb = cb;
        f->sync_userdata = cb_userdata;
        f->sync_waits++;
        *ret = NULL; /* db_sync_wait_cancel(NULL) does nothing */
        return 1;
}

static int on_other(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct fixture *f = userdata;
        uint64_t v;

        assert_int_equal(read(fd, &v, sizeof v), (ssize_t) sizeof v);
        if (f->complete_sync && f->sync_cb) {
                db_sync_wait_t cb = f->sync_cb;
                f->sync_cb = NULL;
                cb(f->sync_userdata, 0);
        }
        return 0;
}

static int setup(void **state) {
        struct fixture *f = calloc(1, sizeof *f);
        struct control_events ev = { .status_json = fake_status, .durable_wait = fake_durable_wait };

        assert_non_null(f);
        strcpy(f->dir, "/tmp/test-control-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        f->conf.path = (char *) "/etc/iothub/iothub.conf";
        f->conf.hub.runtime_dir = f->dir;
        assert_true(asprintf(&f->sock, "%s/%s", f->dir, CONTROL_SOCKET_NAME) > 0);
        assert_int_equal(sd_event_new(&f->e), 0);
        ev.userdata = f;
        assert_int_equal(control_new(f->e, &f->conf, NULL, NULL, NULL, NULL, NULL, &ev, &f->ctl), 0);
        control_set_timeout(f->ctl, DEADLINE_USEC);
        f->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        assert_true(f->efd >= 0);
        assert_int_equal(sd_event_add_io(f->e, &f->efd_source, f->efd, EPOLLIN, on_other, f), 0);
        assert_int_equal(sd_event_source_set_priority(f->efd_source, SD_EVENT_PRIORITY_IMPORTANT), 0);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        struct fixture *f = *state;

        control_free(f->ctl);
        sd_event_source_disable_unref(f->efd_source);
        close(f->efd);
        sd_event_unref(f->e);
        rmdir(f->dir);
        free(f->sock);
        free(f);
        return 0;
}

static int client_connect(struct fixture *f) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);

        assert_true(fd >= 0);
        assert_true(strlen(f->sock) < sizeof sa.sun_path);
        strcpy(sa.sun_path, f->sock);
        assert_int_equal(connect(fd, (struct sockaddr *) &sa, sizeof sa), 0);
        return fd;
}

static void client_send(int fd, const char *line) {
        assert_int_equal(send(fd, line, strlen(line), MSG_NOSIGNAL), (ssize_t) strlen(line));
}

/* Turns of the loop for up to 'usec', stopping early once done(f) holds. */
static void run_until(struct fixture *f, uint64_t usec, bool (*done)(struct fixture *f)) {
        uint64_t end = now_monotonic_usec() + usec;

        while (now_monotonic_usec() < end && !(done && done(f)))
                assert_true(sd_event_run(f->e, 10000) >= 0);
}

static void hold_loop(uint64_t usec) {
        struct timespec ts = { .tv_sec = (time_t) (usec / 1000000), .tv_nsec = (long) (usec % 1000000) * 1000 };

        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

/* Turns of the loop until the client's connection ends; returns what the client read (its
 * answer), or NULL when the daemon closed it with nothing, or reset it. */
static char *client_answer(struct fixture *f, int fd) {
        char buf[4096];
        size_t len = 0;
        uint64_t end = now_monotonic_usec() + WAIT_MAX_USEC;

        while (now_monotonic_usec() < end) {
                assert_true(sd_event_run(f->e, 10000) >= 0);
                ssize_t n = recv(fd, buf + len, sizeof buf - 1 - len, MSG_DONTWAIT);
                if (n < 0 && errno == EAGAIN)
                        continue;
                if (n <= 0)
                        break; /* EOF, or ECONNRESET: the request was closed unread */
                len += (size_t) n;
        }
        buf[len] = '\0';
        return len > 0 ? strdup(buf) : NULL;
}

static bool sync_asked(struct fixture *f) {
        return f->sync_waits > 0;
}

/* A durable request (bulb-remove; its answer here is an error, which waits for the sync all the
 * same) whose sync comes in the turn that sees the deadline pass: the answer still goes. In the
 * daemon: the sign-in's outcome reaching login-wait 5 s after iothubctl connected. */
static void test_answer_made_at_the_deadline_goes(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *answer = NULL;
        int fd = client_connect(f);

        client_send(fd, "{\"cmd\":\"bulb-remove\"}\n");
        run_until(f, WAIT_MAX_USEC, sync_asked);
        assert_int_equal(f->sync_waits, 1);
        hold_loop(LATE_USEC);
        f->complete_sync = true;
        assert_int_equal(eventfd_write(f->efd, 1), 0);
        answer = client_answer(f, fd);
        assert_non_null(answer);
        assert_string_equal(answer, "{\"ok\":false,\"error\":\"missing device id\"}\n");
        close(fd);
}

/* A request sent before the deadline, read by the loop only after it (the loop was held), in a
 * turn where another source runs first: it is answered, not reset unread. */
static void test_request_sent_in_time_is_answered(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *answer = NULL;
        int fd = client_connect(f);

        run_until(f, DEADLINE_USEC / 4, NULL); /* accepted: the deadline runs */
        client_send(fd, "{\"cmd\":\"status\"}\n");
        hold_loop(LATE_USEC);
        assert_int_equal(eventfd_write(f->efd, 1), 0);
        answer = client_answer(f, fd);
        assert_non_null(answer);
        assert_string_equal(answer, "{\"hub_id\":\"test-hub\",\"ok\":true}\n");
        close(fd);
}

/* The deadline still holds: a client that sends nothing, or half a line, is closed after it
 * (and not before). */
static void test_deadline_still_closes(void **state) {
        struct fixture *f = *state;
        char buf[256];
        int quiet = client_connect(f), half = client_connect(f);

        client_send(half, "{\"cmd\":\"sta");
        run_until(f, DEADLINE_USEC / 2, NULL);
        assert_int_equal(recv(quiet, buf, sizeof buf, MSG_DONTWAIT), -1);
        assert_int_equal(errno, EAGAIN);
        assert_int_equal(recv(half, buf, sizeof buf, MSG_DONTWAIT), -1);
        assert_int_equal(errno, EAGAIN);
        /* Closed: EOF (the half line was read, so no reset). */
        assert_null(client_answer(f, quiet));
        assert_null(client_answer(f, half));
        assert_int_equal(recv(quiet, buf, sizeof buf, MSG_DONTWAIT), 0);
        assert_int_equal(recv(half, buf, sizeof buf, MSG_DONTWAIT), 0);
        close(quiet);
        close(half);
}

/* A durable request whose sync never comes (a storage that hangs): the client is not held for
 * ever, and neither is its slot. Its answer waits CONTROL_DURABLE_DEADLINES (6) deadlines, then
 * says the change was made but is not known to be on disk. Before, it waited as long as the
 * sync did. */
static void test_durable_answer_has_a_deadline(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *answer = NULL;
        char buf[256];
        int fd = client_connect(f);
        uint64_t t0 = now_monotonic_usec();

        client_send(fd, "{\"cmd\":\"bulb-remove\"}\n");
        run_until(f, WAIT_MAX_USEC, sync_asked);
        assert_int_equal(f->sync_waits, 1);
        /* Past the ordinary deadline, still waiting for the sync. */
        run_until(f, 3 * DEADLINE_USEC, NULL);
        assert_int_equal(recv(fd, buf, sizeof buf, MSG_DONTWAIT), -1);
        assert_int_equal(errno, EAGAIN);
        answer = client_answer(f, fd);
        assert_non_null(answer);
        assert_true(now_monotonic_usec() - t0 >= 6 * DEADLINE_USEC);
        assert_non_null(strstr(answer, "\"ok\":false"));
        assert_non_null(strstr(answer, "not known to be on disk"));
        close(fd);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_answer_made_at_the_deadline_goes, setup, teardown),
                cmocka_unit_test_setup_teardown(test_request_sent_in_time_is_answered, setup, teardown),
                cmocka_unit_test_setup_teardown(test_deadline_still_closes, setup, teardown),
                cmocka_unit_test_setup_teardown(test_durable_answer_has_a_deadline, setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
