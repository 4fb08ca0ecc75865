/* SPDX-License-Identifier: MIT */
/* The installed-system test's probe (tests/system/guest.sh, issue 14): run by systemd in place of
 * iothubd or iothub-signer through a drop-in ExecStart=, so that the unit's own sandbox applies to
 * it, it tries what an attacker holding that process would try and prints one line per attempt:
 *
 *     PROBE <check> ok            the attempt succeeded
 *     PROBE <check> <ERRNO>       it failed with that errno (strerrorname_np: ENOENT, EACCES, ...);
 *                                 a connect that got no answer in 3 s reads EINPROGRESS (SO_SNDTIMEO)
 *
 * Checks (each one argument):
 *     open-rw:PATH     open(PATH, O_RDWR)   (a device node: /dev/tpmrm0)
 *     read:PATH        open(PATH, O_RDONLY) and read a byte
 *     list:DIR         opendir(DIR) and read an entry
 *     unix:PATH        connect a SOCK_STREAM AF_UNIX socket to PATH
 *     tcp:ADDR:PORT    socket(AF_INET or AF_INET6, SOCK_STREAM) and connect (ADDR numeric; v6 in [])
 *     udp:ADDR:PORT    socket(..., SOCK_DGRAM) and send one datagram
 *     inet-socket      socket(AF_INET, SOCK_STREAM) only
 *     inet6-socket     socket(AF_INET6, SOCK_STREAM) only
 *     netlink-socket   socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE) only
 *
 * Then it sends READY=1 (the units are Type=notify) and stays until it is stopped (SIGTERM), at
 * most PROBE_LINGER_S: a probe in place of a socket-activated service (the signer, the uplink)
 * that exited would be started again by systemd as long as a connection waits on the socket it
 * never accepts from, and a client's reconnects would start it again and again. A test tool, not
 * part of the product: plain libc only, built static so that it runs in any guest. Every connect
 * is bounded by a 3 s timeout. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/netlink.h>

#define PROBE_LINGER_S 120

static const char *errname(int e) {
        const char *n = strerrorname_np(e);
        return n ? n : "E?";
}

static void report(const char *check, int r) {
        /* One write per line: the journal's stream keeps each line whole. */
        printf("PROBE %s %s\n", check, r == 0 ? "ok" : errname(-r));
        fflush(stdout);
}

static void set_timeout(int fd) {
        struct timeval tv = { .tv_sec = 3 };
        (void) setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        (void) setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

static int try_open_rw(const char *path) {
        int fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        close(fd);
        return 0;
}

static int try_read(const char *path) {
        char c;
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        ssize_t n = read(fd, &c, 1);
        int r = n < 0 ? -errno : 0;
        close(fd);
        return r;
}

static int try_list(const char *path) {
        DIR *d = opendir(path);
        if (!d)
                return -errno;
        errno = 0;
        int r = readdir(d) || errno == 0 ? 0 : -errno;
        closedir(d);
        return r;
}

static int try_unix(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        set_timeout(fd);
        int r = connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 ? -errno : 0;
        close(fd);
        return r;
}

/* "ADDR:PORT" or "[ADDR6]:PORT" into a socket address; 0 or -EINVAL. */
static int parse_addr(const char *s, struct sockaddr_storage *ret, socklen_t *ret_len) {
        char host[INET6_ADDRSTRLEN + 2];
        const char *colon = strrchr(s, ':');
        if (!colon || (size_t) (colon - s) >= sizeof(host))
                return -EINVAL;
        memcpy(host, s, (size_t) (colon - s));
        host[colon - s] = '\0';
        char *end;
        long port = strtol(colon + 1, &end, 10);
        if (*end || port < 1 || port > 65535)
                return -EINVAL;
        struct sockaddr_storage ss = { 0 };
        size_t hl = strlen(host);
        if (hl > 2 && host[0] == '[' && host[hl - 1] == ']') {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *) &ss;
                host[hl - 1] = '\0';
                a->sin6_family = AF_INET6;
                a->sin6_port = htons((uint16_t) port);
                if (inet_pton(AF_INET6, host + 1, &a->sin6_addr) != 1)
                        return -EINVAL;
                *ret_len = sizeof(*a);
        } else {
                struct sockaddr_in *a = (struct sockaddr_in *) &ss;
                a->sin_family = AF_INET;
                a->sin_port = htons((uint16_t) port);
                if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
                        return -EINVAL;
                *ret_len = sizeof(*a);
        }
        *ret = ss;
        return 0;
}

static int try_ip(const char *spec, int type) {
        struct sockaddr_storage ss;
        socklen_t len;
        int r = parse_addr(spec, &ss, &len);
        if (r < 0)
                return r;
        int fd = socket(ss.ss_family, type | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        set_timeout(fd);
        if (type == SOCK_STREAM)
                r = connect(fd, (struct sockaddr *) &ss, len) < 0 ? -errno : 0;
        else
                r = sendto(fd, "probe", 5, 0, (struct sockaddr *) &ss, len) < 0 ? -errno : 0;
        close(fd);
        return r;
}

static int try_socket(int family, int type, int proto) {
        int fd = socket(family, type | SOCK_CLOEXEC, proto);
        if (fd < 0)
                return -errno;
        close(fd);
        return 0;
}

static int check(const char *c) {
        if (!strncmp(c, "open-rw:", 8))
                return try_open_rw(c + 8);
        if (!strncmp(c, "read:", 5))
                return try_read(c + 5);
        if (!strncmp(c, "list:", 5))
                return try_list(c + 5);
        if (!strncmp(c, "unix:", 5))
                return try_unix(c + 5);
        if (!strncmp(c, "tcp:", 4))
                return try_ip(c + 4, SOCK_STREAM);
        if (!strncmp(c, "udp:", 4))
                return try_ip(c + 4, SOCK_DGRAM);
        if (!strcmp(c, "inet-socket"))
                return try_socket(AF_INET, SOCK_STREAM, 0);
        if (!strcmp(c, "inet6-socket"))
                return try_socket(AF_INET6, SOCK_STREAM, 0);
        if (!strcmp(c, "netlink-socket"))
                return try_socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
        return -EINVAL;
}

/* sd_notify("READY=1") without libsystemd: one datagram to $NOTIFY_SOCKET ('@' = abstract). */
static void notify_ready(void) {
        const char *p = getenv("NOTIFY_SOCKET");
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (!p || !*p || strlen(p) >= sizeof(sa.sun_path))
                return;
        strcpy(sa.sun_path, p);
        if (sa.sun_path[0] == '@')
                sa.sun_path[0] = '\0';
        socklen_t len = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + strlen(p));
        int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return;
        (void) sendto(fd, "READY=1", 7, 0, (struct sockaddr *) &sa, len);
        close(fd);
}

int main(int argc, char **argv) {
        printf("PROBE uid=%u gid=%u\n", (unsigned) getuid(), (unsigned) getgid());
        for (int i = 1; i < argc; i++)
                report(argv[i], check(argv[i]));
        printf("PROBE done\n");
        fflush(stdout);
        notify_ready();
        /* Until stopped (SIGTERM ends it; systemd counts that as a clean stop), at most
         * PROBE_LINGER_S, then a clean exit (READY=1 was read long before). */
        alarm(PROBE_LINGER_S);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGALRM);
        sigprocmask(SIG_BLOCK, &set, NULL);
        int sig;
        (void) sigwait(&set, &sig);
        return 0;
}
