/* SPDX-License-Identifier: MIT */
/* A software TPM for the unit tests that need one (test-hubkey, test-tokenstore): see
 * swtpm-helper.h. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "swtpm-helper.h"

#define SWTPM_START_TIMEOUT_USEC (10 * 1000 * 1000)

uint64_t now_usec(void) {
        struct timespec ts;

        assert_int_equal(clock_gettime(CLOCK_MONOTONIC, &ts), 0);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

static int bind_loopback(uint16_t port, uint16_t *ret_port) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
        socklen_t len = sizeof sa;
        int fd;

        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(fd >= 0);
        if (bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
                close(fd);
                return -1;
        }
        if (ret_port) {
                assert_int_equal(getsockname(fd, (struct sockaddr *) &sa, &len), 0);
                *ret_port = ntohs(sa.sin_port);
        }
        return fd;
}

/* Two consecutive free loopback ports (swtpm's server and control ports). */
uint16_t pick_port_pair(void) {
        for (int attempt = 0; attempt < 100; attempt++) {
                uint16_t p = 0;
                int a = bind_loopback(0, &p), b;

                if (a < 0)
                        continue;
                if (p == UINT16_MAX) {
                        close(a);
                        continue;
                }
                b = bind_loopback((uint16_t) (p + 1), NULL);
                close(a);
                if (b < 0)
                        continue;
                close(b);
                return p;
        }
        fail_msg("no two consecutive free loopback ports");
        return 0;
}

static bool port_accepts(uint16_t port) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        bool ok;

        assert_true(fd >= 0);
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        ok = connect(fd, (struct sockaddr *) &sa, sizeof sa) == 0;
        close(fd);
        return ok;
}

static int rm_one(const char *path, _unused_ const struct stat *st, _unused_ int type,
                  _unused_ struct FTW *ftw) {
        return remove(path);
}

void rm_rf(const char *dir) {
        (void) nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

void swtpm_stop(struct swtpm *s) {
        if (s->pid > 0) {
                (void) kill(s->pid, SIGTERM);
                (void) waitpid(s->pid, NULL, 0);
        }
        s->pid = -1;
        if (s->dir[0])
                rm_rf(s->dir);
        s->dir[0] = '\0';
}

/* Starts swtpm in the foreground as a child, on fresh state, and waits until it accepts. A port
 * taken between picking and binding makes swtpm exit: then it starts again on other ports. */
void swtpm_start(struct swtpm *s, const char *tag) {
        assert_int_equal(s->pid, -1);
        assert_true(strlen(tag) <= 32);
        snprintf(s->dir, sizeof s->dir, "/tmp/test-%s-swtpm-XXXXXX", tag);
        assert_non_null(mkdtemp(s->dir));

        for (int attempt = 0; attempt < 5; attempt++) {
                char server[96], ctrl[96], state[96];
                uint64_t deadline;
                pid_t parent = getpid(), pid;
                int status = 0;

                s->port = pick_port_pair();
                snprintf(server, sizeof server, "type=tcp,port=%u,bindaddr=127.0.0.1", s->port);
                snprintf(ctrl, sizeof ctrl, "type=tcp,port=%u,bindaddr=127.0.0.1", s->port + 1u);
                snprintf(state, sizeof state, "dir=%s", s->dir);
                pid = fork();
                assert_true(pid >= 0);
                if (pid == 0) {
                        char *argv[] = {
                                "swtpm", "socket", "--tpm2", "--server", server, "--ctrl", ctrl,
                                "--tpmstate", state, "--flags", "not-need-init,startup-clear", NULL,
                        };
                        int null = open("/dev/null", O_WRONLY | O_CLOEXEC);

                        /* Never outlive the test, even when it crashes. */
                        (void) prctl(PR_SET_PDEATHSIG, SIGKILL);
                        if (getppid() != parent)
                                _exit(1);
                        if (null >= 0)
                                (void) dup2(null, STDOUT_FILENO);
                        execvp(argv[0], argv);
                        fprintf(stderr, "cannot run swtpm: %m\n");
                        _exit(127);
                }
                deadline = now_usec() + SWTPM_START_TIMEOUT_USEC;
                while (now_usec() < deadline) {
                        if (waitpid(pid, &status, WNOHANG) == pid) {
                                pid = -1;
                                break;
                        }
                        if (port_accepts(s->port)) {
                                s->pid = pid;
                                snprintf(s->tcti, sizeof s->tcti, "swtpm:host=127.0.0.1,port=%u", s->port);
                                return;
                        }
                        (void) usleep(10000);
                }
                if (pid > 0) {
                        (void) kill(pid, SIGKILL);
                        (void) waitpid(pid, NULL, 0);
                        swtpm_stop(s);
                        fail_msg("swtpm did not accept connections on port %u", s->port);
                }
                if (WIFEXITED(status) && WEXITSTATUS(status) == 127) {
                        swtpm_stop(s);
                        fail_msg("swtpm is not installed (apt-get install swtpm swtpm-tools)");
                }
        }
        swtpm_stop(s);
        fail_msg("swtpm exited at every start");
}

uint8_t *read_bytes(const char *path, size_t *ret_len) {
        struct stat st;
        uint8_t *buf;
        int fd = open(path, O_RDONLY | O_CLOEXEC);

        assert_true(fd >= 0);
        assert_int_equal(fstat(fd, &st), 0);
        buf = malloc((size_t) st.st_size + 1);
        assert_non_null(buf);
        assert_int_equal(read(fd, buf, (size_t) st.st_size), st.st_size);
        close(fd);
        *ret_len = (size_t) st.st_size;
        return buf;
}
