/* SPDX-License-Identifier: MIT */
/* Shared by the fuzz targets: invariant checks that stay in builds with NDEBUG (not assert()),
 * and the charset of ids. */
#pragma once

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(x)                                                                                            \
        do {                                                                                                \
                if (!(x)) {                                                                                 \
                        fprintf(stderr, "%s:%d: invariant violated: %s\n", __FILE__, __LINE__, #x);         \
                        abort();                                                                            \
                }                                                                                           \
        } while (0)

/* 1..max of [A-Za-z0-9._-], the charset of device ids (PROTOCOL.md 1) and command ids. */
static inline bool fuzz_id_chars_valid(const char *s, size_t max) {
        size_t n = strlen(s);

        if (n < 1 || n > max)
                return false;
        return strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == n;
}

/* Every byte printable ASCII (no control character, no DEL, no byte >= 0x80). */
static inline bool fuzz_is_printable_ascii(const char *s) {
        for (; *s; s++)
                if ((unsigned char) *s < 0x20 || (unsigned char) *s >= 0x7f)
                        return false;
        return true;
}
