/* SPDX-License-Identifier: MIT */
/* Preloaded before libfaketime in the clock tests (tests/integration/lib/faults.mjs): timerfds on
 * CLOCK_MONOTONIC and CLOCK_BOOTTIME are set and read by the kernel's own clock, untouched.
 *
 * libfaketime 0.9.10 (Debian 12) wraps timerfd_settime() and timerfd_gettime() as if every timerfd
 * ran on CLOCK_REALTIME: an absolute deadline is shifted by the fake offset even with
 * DONT_FAKE_MONOTONIC=1, because those calls do not say the timer's clock
 * (https://github.com/wolfcw/libfaketime/issues/378, open). sd-event arms CLOCK_MONOTONIC timerfds
 * with absolute deadlines, so under a clock stepped forward by more than the machine's uptime the
 * deadline became negative, timerfd_settime() failed with EINVAL and the daemon's loop ended
 * ("Event loop failed: Invalid argument"); with a longer uptime every monotonic timer fired up
 * to the offset early instead. A real clock step moves neither. This library remembers each
 * timerfd's clock at timerfd_create() (which libfaketime does not wrap) and sends the monotonic
 * ones straight to the kernel; CLOCK_REALTIME timerfds go on to libfaketime. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define FD_MAX 65536

/* 1: the timerfd with this number runs on a clock libfaketime must not touch. The daemons are
 * single-threaded where they make timerfds; a stale mark is reset by the next timerfd_create(). */
static unsigned char kernel_clock[FD_MAX];

static int is_kernel(int fd) {
        return fd >= 0 && fd < FD_MAX && kernel_clock[fd];
}

int timerfd_create(int clockid, int flags) {
        int fd = (int) syscall(SYS_timerfd_create, clockid, flags);

        if (fd >= 0 && fd < FD_MAX)
                kernel_clock[fd] = clockid != CLOCK_REALTIME && clockid != CLOCK_REALTIME_ALARM;
        return fd;
}

int timerfd_settime(int fd, int flags, const struct itimerspec *new_value, struct itimerspec *old_value) {
        static int (*next)(int, int, const struct itimerspec *, struct itimerspec *);

        if (is_kernel(fd))
                return (int) syscall(SYS_timerfd_settime, fd, flags, new_value, old_value);
        if (!next)
                next = (int (*)(int, int, const struct itimerspec *, struct itimerspec *)) dlsym(RTLD_NEXT,
                                                                                                   "timerfd_settime");
        if (!next) {
                errno = ENOSYS;
                return -1;
        }
        return next(fd, flags, new_value, old_value);
}

int timerfd_gettime(int fd, struct itimerspec *curr_value) {
        static int (*next)(int, struct itimerspec *);

        if (is_kernel(fd))
                return (int) syscall(SYS_timerfd_gettime, fd, curr_value);
        if (!next)
                next = (int (*)(int, struct itimerspec *)) dlsym(RTLD_NEXT, "timerfd_gettime");
        if (!next) {
                errno = ENOSYS;
                return -1;
        }
        return next(fd, curr_value);
}
