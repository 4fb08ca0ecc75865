/* SPDX-License-Identifier: MIT */
/* Small helpers shared by every module: cleanup attributes, hand-over, sizes. */
#pragma once

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/types.h>

#define ELEMENTSOF(x) (sizeof(x) / sizeof((x)[0]))
#define _unused_ __attribute__((unused))
#define _printf_(a, b) __attribute__((format(printf, a, b)))
#define _cleanup_(f) __attribute__((cleanup(f)))
#define _warn_unused_ __attribute__((warn_unused_result))

/* Hand a pointer over to a new owner: returns it and leaves NULL behind. */
#define TAKE_PTR(p)                                                                                        \
        ({                                                                                                 \
                __typeof__(p) _p_ = (p);                                                                   \
                (p) = NULL;                                                                                \
                _p_;                                                                                       \
        })
#define TAKE_FD(fd)                                                                                        \
        ({                                                                                                 \
                int _fd_ = (fd);                                                                           \
                (fd) = -1;                                                                                 \
                _fd_;                                                                                      \
        })

/* Define cleanup function for a type whose destructor accepts NULL. */
#define DEFINE_TRIVIAL_CLEANUP_FUNC(type, func)                                                            \
        static inline void func##p(type *p) {                                                              \
                if (*p)                                                                                    \
                        func(*p);                                                                          \
        }

static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)

static inline void closep(int *fd) {
        if (*fd >= 0) {
                int saved = errno;
                (void) close(*fd);
                errno = saved;
        }
}
#define _cleanup_close_ _cleanup_(closep)

/* Wipe then free a secret string or buffer of known length. */
void erase_and_free(void *p, size_t len);
/* Wipe then free a NUL-terminated secret string. */
void erase_and_freep_str(char **s);
#define _cleanup_erase_str_ _cleanup_(erase_and_freep_str)
/* Makes room for need bytes in a buffer that may hold secrets: when *cap is smaller, a new
 * buffer of 4096 doubled until it holds need (at most max) takes the first used bytes, and the
 * old one is wiped and freed (realloc() would free it unwiped). Returns 0, -EFBIG (need > max)
 * or -ENOMEM; *buf and *cap are unchanged on failure. */
int erase_grow(void **buf, size_t *cap, size_t used, size_t need, size_t max);

static inline bool streq(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}
static inline bool streq_ptr(const char *a, const char *b) {
        if (!a || !b)
                return a == b;
        return strcmp(a, b) == 0;
}

/* Free *p and replace it with a copy of s (NULL allowed). Returns 0 or -ENOMEM. */
int free_and_strdup(char **p, const char *s);

/* Monotonic and real-time clocks, in microseconds. */
uint64_t now_monotonic_usec(void);
uint64_t now_realtime_usec(void);

/* Read a whole small file (at most max bytes) into a NUL-terminated buffer.
 * Returns 0 or a negative errno (-EFBIG when larger than max). */
int read_file_limited(const char *path, size_t max, char **ret, size_t *ret_len);

/* Files and directories the daemon trusts (the config, credential files, the state
 * directory), checked as sshd's StrictModes checks its own: the last component is no symlink
 * (O_NOFOLLOW), a file is a regular file (opened non-blocking, so that a FIFO put there
 * cannot stall the loop), owned by root or by us, and not writable by group or others; a
 * secret is not readable by others either. */
#define TRUSTED_SECRET 0x1u
/* Opens path for reading after those checks. Returns 0 and the fd (O_CLOEXEC, blocking), or
 * a negative errno (-ELOOP symlink, -EBADFD not a regular file, -EPERM owner or mode) with a
 * malloc'ed one-line reason naming the file in *ret_error when not NULL. */
int open_trusted_file(const char *path, unsigned flags, int *ret_fd, char **ret_error);
/* open_trusted_file() and read_file_limited() in one. */
int read_trusted_file(const char *path, unsigned flags, size_t max, char **ret, size_t *ret_len, char **ret_error);
/* A directory (symlinks followed): owned by root or by us, not writable by group or others (anyone
 * could otherwise replace what is in it). Returns 0 or a negative errno, with a reason. */
int check_trusted_dir(const char *path, char **ret_error);

/* Random bytes from getrandom(). Returns 0 or a negative errno. */
int random_bytes(void *buf, size_t len);

/* The characters of ids in PROTOCOL.md 1 (device ids, command ids): [A-Za-z0-9._-]. True when
 * all len bytes of s are of them (also for len 0: the callers check the length). */
bool id_chars_are_valid(const char *s, size_t len);

/* Device id of PROTOCOL.md 1: 1..64 of [A-Za-z0-9._-], not starting with '.'. */
#define DEVICE_ID_MAX 64
bool device_id_is_valid(const char *s, size_t len);

/* The base64url alphabet (RFC 4648 5): [A-Za-z0-9_-], no padding. */
static inline bool b64url_char_is_valid(char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}
/* True when all len bytes of s are of the base64url alphabet. */
bool b64url_chars_are_valid(const char *s, size_t len);

/* RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=".
 * An access token goes into an Authorization header line: nothing else may pass (CR, LF). */
bool b64token_is_valid(const char *s, size_t len);

/* base64 sizes (RFC 4648 4 and 5), the project's one set. For n input bytes:
 *   BASE64_LEN(n)        standard base64 with padding, without the NUL;
 *   B64URL_LEN(n)        base64url without padding (RFC 7515 2), without the NUL: ceil(4n/3);
 *   B64URL_BUF(n)        what b64url_encode() writes for n bytes, NUL included;
 * and for n characters of base64url, B64URL_DECODED_MAX(n) bounds the decoded length. */
#define BASE64_LEN(n) (4 * (((n) + 2) / 3))
#define B64URL_LEN(n) (((n) * 4 + 2) / 3)
#define B64URL_BUF(n) (B64URL_LEN(n) + 1)
#define B64URL_DECODED_MAX(n) ((n) / 4 * 3 + 2)

/* Exponential backoff with "full jitter" in the upper half, the project's one retry policy:
 * after 'failures' failures in a row (1 for the first) the step is min_ms doubled
 * failures-1 times, capped at max_ms, and the delay is drawn from [step/2, step] with rnd, so a
 * retry never comes at once and hubs that failed together do not come back in step. Pure. */
uint64_t backoff_ms(unsigned failures, uint64_t min_ms, uint64_t max_ms, uint32_t rnd);

/* Rate-limited logging: at most 'burst' messages per window of window_usec; the caller counts
 * everything else itself. Zero-initialised is a fresh limit. */
struct ratelimit {
        uint64_t begin_usec; /* start of the current window (monotonic) */
        unsigned count;      /* messages let through in it */
        uint64_t suppressed; /* messages held back in it */
};
/* True when one more message may be logged at 'now'. When a new window begins and the last one
 * held messages back, *ret_suppressed is set to their number (for one "Suppressed N" line),
 * otherwise to 0. */
bool ratelimit_allow(struct ratelimit *rl, uint64_t now, uint64_t window_usec, unsigned burst,
                     uint64_t *ret_suppressed);

/* Write data to path atomically (temp file, fsync, rename, fsync dir), with mode. */
int write_file_atomic(const char *path, const void *data, size_t len, mode_t mode);

/* The owner hierarchy's persistent handle range (TCG "Registry of Reserved TPM 2.0 Handles
 * and Localities" 2.3.1: 0x81000000 - 0x817FFFFF; 0x81800000 - 0x81FFFFFF is the platform's,
 * which the owner cannot use). Spelt out: tpm2-tss 3.2's TPM2_PERSISTENT_FIRST shifts a
 * signed int into its sign bit, which UBSan rejects. The one check, for the config parser
 * and the TPM backend alike. */
#define TPM_OWNER_PERSISTENT_FIRST UINT32_C(0x81000000)
#define TPM_OWNER_PERSISTENT_LAST UINT32_C(0x817FFFFF)
static inline bool tpm_owner_persistent_handle_is_valid(uint64_t handle) {
        return handle >= TPM_OWNER_PERSISTENT_FIRST && handle <= TPM_OWNER_PERSISTENT_LAST;
}

/* asprintf() that returns the string, or NULL when out of memory. */
char *strdup_printf(const char *fmt, ...) _printf_(1, 2);

/* For functions that return a negative errno and, when ret_error is not NULL, a malloc'ed
 * one-line reason: sets *ret_error (if it can) and returns r. */
int set_error_message(char **ret_error, int r, const char *format, ...) _printf_(3, 4);

/* OpenSSL's error queue as a negative errno, the one place for OpenSSL codes. Empties the
 * queue, so that a stale entry never explains a later failure: allocation failures give
 * -ENOMEM, system errors (a file that cannot be opened) their errno, anything else
 * 'fallback'. */
int openssl_errno(int fallback);

/* The public key of pkey as SubjectPublicKeyInfo PEM (malloc'ed, NUL-terminated). Returns 0
 * or a negative errno. */
int pkey_public_pem(EVP_PKEY *pkey, char **ret);

/* A user name (getpwnam_r) or a uid in digits, as [signer] and [uplink] client_user take it.
 * -ESRCH no such user, -ERANGE a uid out of range. */
int user_to_uid(const char *name, uid_t *ret);
/* A listening unix stream socket at path (non-blocking, close-on-exec), mode 0660 from its
 * bind on; a stale socket there is replaced, anything else is -EEXIST. */
int unix_listen(const char *path, int backlog, int *ret_fd);
