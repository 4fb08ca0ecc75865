/* SPDX-License-Identifier: MIT */
/* Test helper: binds an AF_UNIX datagram socket at argv[1] (a NOTIFY_SOCKET for the daemon
 * under test) and prints every sd_notify message as one line on stdout, newlines inside a
 * message turned into '|'. Node has no datagram Unix sockets, hence this tool. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char *argv[]) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char buf[4097];
        int fd;

        if (argc != 2 || strlen(argv[1]) >= sizeof sa.sun_path) {
                fprintf(stderr, "usage: notify-listen PATH\n");
                return 64;
        }
        strcpy(sa.sun_path, argv[1]);
        fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
                fprintf(stderr, "notify-listen: %s: %s\n", argv[1], strerror(errno));
                return 1;
        }
        printf("LISTENING\n");
        fflush(stdout);
        for (;;) {
                ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return 1;
                }
                for (ssize_t i = 0; i < n; i++)
                        if (buf[i] == '\n')
                                buf[i] = '|';
                buf[n] = '\0';
                printf("%s\n", buf);
                fflush(stdout);
        }
}
