/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <pwd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>

#include "iothub/util.h"

void erase_and_free(void *p, size_t len) {
        if (!p)
                return;
        OPENSSL_cleanse(p, len);
        free(p);
}

void erase_and_freep_str(char **s) {
        if (*s)
                erase_and_free(*s, strlen(*s));
        *s = NULL;
}

int erase_grow(void **buf, size_t *cap, size_t used, size_t need, size_t max) {
        size_t c;
        void *n;

        if (!buf || !cap || used > *cap || used > need)
                return -EINVAL;
        if (need <= *cap)
                return 0;
        if (need > max)
                return -EFBIG;
        /* Geometric growth: each byte is copied O(1) times on average. */
        c = *cap ? *cap : 4096;
        while (c < need && c <= max / 2)
                c *= 2;
        if (c < need || c > max)
                c = max;
        n = malloc(c);
        if (!n)
                return -ENOMEM;
        if (*buf) {
                memcpy(n, *buf, used);
                erase_and_free(*buf, *cap);
        }
        *buf = n;
        *cap = c;
        return 0;
}

int free_and_strdup(char **p, const char *s) {
        char *t = NULL;

        if (s) {
                t = strdup(s);
                if (!t)
                        return -ENOMEM;
        }
        free(*p);
        *p = t;
        return 0;
}

static uint64_t now_usec(clockid_t clock) {
        struct timespec ts;

        (void) clock_gettime(clock, &ts);
        return (uint64_t) ts.tv_sec * UINT64_C(1000000) + (uint64_t) ts.tv_nsec / 1000;
}

uint64_t now_monotonic_usec(void) {
        return now_usec(CLOCK_MONOTONIC);
}

uint64_t now_realtime_usec(void) {
        return now_usec(CLOCK_REALTIME);
}

static int read_fd_limited(int fd, size_t max, char **ret, size_t *ret_len) {
        _cleanup_free_ char *buf = NULL;
        size_t len = 0;

        buf = malloc(max + 1);
        if (!buf)
                return -ENOMEM;
        for (;;) {
                ssize_t n;

                if (len > max)
                        break;
                n = read(fd, buf + len, max + 1 - len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        break;
                len += (size_t) n;
        }
        if (len > max) {
                OPENSSL_cleanse(buf, max + 1);
                return -EFBIG;
        }
        buf[len] = '\0';
        *ret = TAKE_PTR(buf);
        if (ret_len)
                *ret_len = len;
        return 0;
}

int read_file_limited(const char *path, size_t max, char **ret, size_t *ret_len) {
        _cleanup_close_ int fd = -1;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        return read_fd_limited(fd, max, ret, ret_len);
}

static int check_owner_mode(const char *what, const char *path, const struct stat *st, mode_t forbidden,
                            char **ret_error) {
        if (st->st_uid != 0 && st->st_uid != geteuid())
                return set_error_message(ret_error, -EPERM,
                                         "%s %s is owned by uid %u, neither root nor us (uid %u): refused", what,
                                         path, (unsigned) st->st_uid, (unsigned) geteuid());
        if (st->st_mode & forbidden)
                return set_error_message(ret_error, -EPERM, "%s %s has mode %04o, %s: refused (chmod %s)", what,
                                         path, (unsigned) (st->st_mode & 07777),
                                         (st->st_mode & forbidden & 022) ? "writable by group or others"
                                                                         : "readable by others",
                                         (forbidden & 004) ? "o-rwx,g-w" : "go-w");
        return 0;
}

int open_trusted_file(const char *path, unsigned flags, int *ret_fd, char **ret_error) {
        _cleanup_close_ int fd = -1;
        struct stat st;
        int r;

        /* O_NONBLOCK: opening a FIFO for reading would block until a writer comes. */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW | O_NONBLOCK);
        if (fd < 0) {
                r = -errno;
                if (r == -ELOOP)
                        return set_error_message(ret_error, r, "%s is a symbolic link: refused", path);
                return set_error_message(ret_error, r, "cannot open %s: %s", path, strerror(-r));
        }
        if (fstat(fd, &st) < 0)
                return set_error_message(ret_error, -errno, "cannot stat %s: %m", path);
        if (S_ISDIR(st.st_mode))
                return set_error_message(ret_error, -EISDIR, "%s is a directory", path);
        if (!S_ISREG(st.st_mode))
                return set_error_message(ret_error, -EBADFD, "%s is not a regular file: refused", path);
        r = check_owner_mode("file", path, &st, (flags & TRUSTED_SECRET) ? 026 : 022, ret_error);
        if (r < 0)
                return r;
        /* A regular file never blocks, but reads should not see EAGAIN either. */
        if (fcntl(fd, F_SETFL, 0) < 0)
                return set_error_message(ret_error, -errno, "cannot use %s: %m", path);
        *ret_fd = TAKE_FD(fd);
        return 0;
}

int read_trusted_file(const char *path, unsigned flags, size_t max, char **ret, size_t *ret_len, char **ret_error) {
        _cleanup_close_ int fd = -1;
        int r;

        r = open_trusted_file(path, flags, &fd, ret_error);
        if (r < 0)
                return r;
        r = read_fd_limited(fd, max, ret, ret_len);
        if (r == -EFBIG)
                return set_error_message(ret_error, r, "%s is larger than %zu bytes", path, max);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot read %s: %s", path, strerror(-r));
        return 0;
}

int check_trusted_dir(const char *path, char **ret_error) {
        struct stat st;

        /* Followed: a state directory moved to another disk may be a symlink; what counts is
         * who can change the directory itself. */
        if (stat(path, &st) < 0)
                return set_error_message(ret_error, -errno, "cannot stat directory %s: %m", path);
        if (!S_ISDIR(st.st_mode))
                return set_error_message(ret_error, -ENOTDIR, "%s is not a directory", path);
        return check_owner_mode("directory", path, &st, 022, ret_error);
}

int random_bytes(void *buf, size_t len) {
        uint8_t *p = buf;

        while (len > 0) {
                ssize_t n = getrandom(p, len, 0);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += n;
                len -= (size_t) n;
        }
        return 0;
}

bool id_chars_are_valid(const char *s, size_t len) {
        for (size_t i = 0; i < len; i++) {
                char c = s[i];
                if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                      c == '_' || c == '-'))
                        return false;
        }
        return true;
}

bool b64url_chars_are_valid(const char *s, size_t len) {
        for (size_t i = 0; i < len; i++)
                if (!b64url_char_is_valid(s[i]))
                        return false;
        return true;
}

bool b64token_is_valid(const char *s, size_t len) {
        size_t i = 0;

        if (!s)
                return false;
        for (; i < len; i++) {
                char ch = s[i];
                if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                      ch == '-' || ch == '.' || ch == '_' || ch == '~' || ch == '+' || ch == '/'))
                        break;
        }
        if (i == 0)
                return false;
        for (; i < len; i++)
                if (s[i] != '=')
                        return false;
        return true;
}

bool device_id_is_valid(const char *s, size_t len) {
        if (!s || len < 1 || len > DEVICE_ID_MAX || s[0] == '.')
                return false;
        return id_chars_are_valid(s, len);
}

uint64_t backoff_ms(unsigned failures, uint64_t min_ms, uint64_t max_ms, uint32_t rnd) {
        uint64_t cap = min_ms;

        for (unsigned i = 1; i < failures && cap < max_ms; i++)
                cap *= 2;
        if (cap > max_ms)
                cap = max_ms;
        return cap / 2 + rnd % (cap / 2 + 1);
}

bool ratelimit_allow(struct ratelimit *rl, uint64_t now, uint64_t window_usec, unsigned burst,
                     uint64_t *ret_suppressed) {
        *ret_suppressed = 0;
        if (now - rl->begin_usec >= window_usec) {
                *ret_suppressed = rl->suppressed;
                rl->begin_usec = now;
                rl->count = 0;
                rl->suppressed = 0;
        }
        if (rl->count >= burst) {
                rl->suppressed++;
                return false;
        }
        rl->count++;
        return true;
}

int write_file_atomic(const char *path, const void *data, size_t len, mode_t mode) {
        _cleanup_free_ char *tmp = NULL, *dircopy = NULL;
        _cleanup_close_ int fd = -1, dfd = -1;
        const uint8_t *p = data;
        int r;

        if (asprintf(&tmp, "%s.tmp.XXXXXX", path) < 0)
                return -ENOMEM;
        fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0)
                return -errno;
        if (fchmod(fd, mode) < 0) {
                r = -errno;
                goto fail;
        }
        while (len > 0) {
                ssize_t n = write(fd, p, len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        r = -errno;
                        goto fail;
                }
                p += n;
                len -= (size_t) n;
        }
        if (fsync(fd) < 0 || rename(tmp, path) < 0) {
                r = -errno;
                goto fail;
        }
        dircopy = strdup(path);
        if (!dircopy)
                return -ENOMEM;
        /* fsync the directory so that the rename itself survives a power cut. */
        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees dircopy */
        dfd = open(dirname(dircopy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0)
                (void) fsync(dfd);
        return 0;
fail:
        (void) unlink(tmp);
        return r;
}

char *strdup_printf(const char *fmt, ...) {
        va_list ap;
        char *s;
        int r;

        va_start(ap, fmt);
        r = vasprintf(&s, fmt, ap);
        va_end(ap);
        return r < 0 ? NULL : s;
}

int set_error_message(char **ret_error, int r, const char *format, ...) {
        va_list ap;
        char *s;

        if (!ret_error)
                return r;
        va_start(ap, format);
        if (vasprintf(&s, format, ap) >= 0)
                *ret_error = s;
        va_end(ap);
        return r;
}

int openssl_errno(int fallback) {
        unsigned long e;
        int sys = 0;
        bool nomem = false;

        while ((e = ERR_get_error()) != 0) {
                if (ERR_SYSTEM_ERROR(e)) {
                        if (sys == 0 && ERR_GET_REASON(e) > 0)
                                sys = ERR_GET_REASON(e);
                } else if (ERR_GET_REASON(e) == ERR_R_MALLOC_FAILURE)
                        nomem = true;
        }
        if (nomem)
                return -ENOMEM;
        if (sys > 0)
                return -sys;
        return fallback;
}

int pkey_public_pem(EVP_PKEY *pkey, char **ret) {
        BIO *bio;
        char *data, *s = NULL;
        long n;
        int r = 0;

        bio = BIO_new(BIO_s_mem());
        if (!bio)
                return openssl_errno(-ENOMEM);
        if (PEM_write_bio_PUBKEY(bio, pkey) != 1)
                r = openssl_errno(-EIO);
        else if ((n = BIO_get_mem_data(bio, &data)) <= 0)
                r = openssl_errno(-EIO);
        else if (!(s = strndup(data, (size_t) n)))
                r = -ENOMEM;
        BIO_free_all(bio);
        if (r < 0)
                return r;
        *ret = s;
        return 0;
}

/* ---- the channels' servers (iothub-signer, iothub-uplink) ---- */

int user_to_uid(const char *name, uid_t *ret) {
        struct passwd pw, *res = NULL;
        char buf[4096];
        int r;

        if (name[0] && strspn(name, "0123456789") == strlen(name)) {
                unsigned long u;
                errno = 0;
                u = strtoul(name, NULL, 10);
                if (errno != 0 || u >= (uid_t) -1)
                        return -ERANGE;
                *ret = (uid_t) u;
                return 0;
        }
        r = getpwnam_r(name, &pw, buf, sizeof buf, &res);
        if (r != 0)
                return -r;
        if (!res)
                return -ESRCH;
        *ret = pw.pw_uid;
        return 0;
}

int unix_listen(const char *path, int backlog, int *ret_fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        struct stat st;
        mode_t old;
        int r;

        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path));
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        /* A stale socket of an earlier run, and nothing else, is replaced. */
        if (lstat(path, &st) == 0) {
                if (!S_ISSOCK(st.st_mode))
                        return -EEXIST;
                if (unlink(path) < 0)
                        return -errno;
        }
        /* 0660 from the start: no moment when others could connect. */
        old = umask(0117);
        r = bind(fd, (struct sockaddr *) &sa, sizeof sa);
        umask(old);
        if (r < 0)
                return -errno;
        if (listen(fd, backlog) < 0)
                return -errno;
        *ret_fd = TAKE_FD(fd);
        return 0;
}
