/* SPDX-License-Identifier: MIT */
/* Logging: native journal protocol with structured fields when stderr is connected to the
 * journal (JOURNAL_STREAM matches, as systemd documents), else one plain line on stderr. */
#include <stdio.h>
#include <sys/stat.h>

#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>

#include "iothub/log.h"

static int max_level = LOG_INFO;
static bool use_journal;
static const char *log_ident = "iothub";

static bool stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return false;
        if (fstat(STDERR_FILENO, &st) < 0)
                return false;
        return st.st_dev == (dev_t) dev && st.st_ino == (ino_t) ino;
}

void log_open(const char *ident) {
        if (ident)
                log_ident = ident;
        use_journal = stderr_is_journal();
}

bool log_to_journal(void) {
        return use_journal;
}

void log_set_max_level(int level) {
        max_level = level;
}

int log_get_max_level(void) {
        return max_level;
}

int log_level_from_string(const char *s, int *ret) {
        static const struct {
                const char *name;
                int level;
        } table[] = {
                { "debug", LOG_DEBUG }, { "info", LOG_INFO }, { "notice", LOG_NOTICE },
                { "warning", LOG_WARNING }, { "err", LOG_ERR }, { "error", LOG_ERR }, { "crit", LOG_CRIT },
        };

        for (size_t i = 0; i < ELEMENTSOF(table); i++)
                if (streq(s, table[i].name)) {
                        *ret = table[i].level;
                        return 0;
                }
        return -EINVAL;
}

static int log_dispatch(int level, int error, const char *message_id, const char *device, const char *reason,
                        const char *file, int line, const char *func, const char *format, va_list ap) {
        char msg[2048];

        /* Format with errno set, so that %m prints the error being reported. */
        errno = error < 0 ? -error : error;
        (void) vsnprintf(msg, sizeof msg, format, ap);

        if (use_journal) {
                char prio[16], errbuf[32];

                (void) snprintf(prio, sizeof prio, "PRIORITY=%d", level);
                (void) snprintf(errbuf, sizeof errbuf, "ERRNO=%d", error < 0 ? -error : error);
                struct iovec iov[11];
                size_t n = 0;
                char *fields[10] = { 0 };
                int k = 0;

#define ADD(s)                                                                                     \
        do {                                                                                       \
                const char *_s_ = (s);                                                             \
                iov[n++] = (struct iovec){ .iov_base = (void *) _s_, .iov_len = strlen(_s_) };     \
        } while (0)
                if (asprintf(&fields[k], "MESSAGE=%s", msg) >= 0)
                        ADD(fields[k++]);
                ADD(prio);
                if (asprintf(&fields[k], "SYSLOG_IDENTIFIER=%s", log_ident) >= 0)
                        ADD(fields[k++]);
                if (error != 0)
                        ADD(errbuf);
                if (message_id && asprintf(&fields[k], "MESSAGE_ID=%s", message_id) >= 0)
                        ADD(fields[k++]);
                if (device && asprintf(&fields[k], "IOTHUB_DEVICE=%s", device) >= 0)
                        ADD(fields[k++]);
                if (reason && asprintf(&fields[k], "IOTHUB_REASON=%s", reason) >= 0)
                        ADD(fields[k++]);
                /* Our own location, as sd_journal_send() would add it without
                 * SD_JOURNAL_SUPPRESS_LOCATION: that one would name log.c for every line. */
                if (file && asprintf(&fields[k], "CODE_FILE=%s", file) >= 0)
                        ADD(fields[k++]);
                if (file && asprintf(&fields[k], "CODE_LINE=%d", line) >= 0)
                        ADD(fields[k++]);
                if (func && asprintf(&fields[k], "CODE_FUNC=%s", func) >= 0)
                        ADD(fields[k++]);
#undef ADD
                if (sd_journal_sendv(iov, (int) n) < 0)
                        fprintf(stderr, "%s\n", msg);
                for (int i = 0; i < k; i++)
                        free(fields[i]);
        } else {
                /* Plain stderr: the level as a <N> prefix, which journald also understands. */
                fprintf(stderr, "%s: %s\n", log_ident, msg);
        }
        return error < 0 ? error : -error;
}

int log_internal(int level, int error, const char *file, int line, const char *func, const char *format, ...) {
        va_list ap;
        int saved = errno, r;

        if (level > max_level)
                return error < 0 ? error : -error;
        va_start(ap, format);
        r = log_dispatch(level, error, NULL, NULL, NULL, file, line, func, format, ap);
        va_end(ap);
        errno = saved;
        return r;
}

int log_event_internal(int level, int error, const char *file, int line, const char *func, const char *message_id,
                       const char *device, const char *reason, const char *format, ...) {
        va_list ap;
        int saved = errno, r;

        if (level > max_level)
                return error < 0 ? error : -error;
        va_start(ap, format);
        r = log_dispatch(level, error, message_id, device, reason, file, line, func, format, ap);
        va_end(ap);
        errno = saved;
        return r;
}
