/* SPDX-License-Identifier: MIT */
/* A slow storage device for fault tests, preloaded into the daemon (LD_PRELOAD): every
 * pwrite()/pwrite64() (SQLite writes its WAL and database with them, and nothing else in the
 * daemon does) waits SLOWWRITE_MS milliseconds before it reaches the kernel. It widens, to
 * something a test can hit, a window that exists between two writes anyway: faults.test.mjs
 * uses it to kill the daemon between a frame's commit and whatever is written after it.
 * Built by the test itself (cc -shared -fPIC slowwrite.c -ldl). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/types.h>
#include <time.h>

static void slow(void) {
        const char *s = getenv("SLOWWRITE_MS");
        long ms = s ? strtol(s, NULL, 10) : 0;
        struct timespec t;

        if (ms <= 0 || ms > 10000)
                return;
        t.tv_sec = ms / 1000;
        t.tv_nsec = (ms % 1000) * 1000000L;
        while (nanosleep(&t, &t) < 0)
                ;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
        static ssize_t (*real)(int, const void *, size_t, off64_t);

        if (!real)
                real = (ssize_t (*)(int, const void *, size_t, off64_t)) dlsym(RTLD_NEXT, "pwrite64");
        slow();
        return real(fd, buf, n, off);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
        static ssize_t (*real)(int, const void *, size_t, off_t);

        if (!real)
                real = (ssize_t (*)(int, const void *, size_t, off_t)) dlsym(RTLD_NEXT, "pwrite");
        slow();
        return real(fd, buf, n, off);
}
