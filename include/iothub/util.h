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

/* Device id of PROTOCOL.md 1: 1..64 of [A-Za-z0-9._-], not starting with '.'. */
#define DEVICE_ID_MAX 64
bool device_id_is_valid(const char *s, size_t len);

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
