/* SPDX-License-Identifier: MIT */
/* A plain main() for fuzz targets built without libFuzzer (gcc, make check): runs
 * LLVMFuzzerTestOneInput() once over every file named on the command line and over every regular
 * file in each directory named there (not recursively, dot files skipped, sorted by name). Each
 * input is copied into a buffer of exactly its size, as libFuzzer does, so that ASan sees reads past
 * the end. Exits 1 when a path cannot be read or when no input ran at all, so that a missing corpus
 * cannot pass unnoticed. Arguments starting with '-' (libFuzzer flags) are ignored. */
#include <dirent.h>
#include <stdio.h>
#include <sys/stat.h>

#include "iothub/util.h"

#define DRIVER_INPUT_MAX (1024 * 1024) /* seeds are small; this only bounds a mistake */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static int run_file(const char *path, unsigned *count) {
        _cleanup_free_ char *text = NULL;
        _cleanup_free_ uint8_t *exact = NULL;
        size_t len;
        int r;

        r = read_file_limited(path, DRIVER_INPUT_MAX, &text, &len);
        if (r < 0) {
                fprintf(stderr, "%s: %s\n", path, strerror(-r));
                return r;
        }
        exact = malloc(len ?: 1);
        if (!exact)
                return -ENOMEM;
        memcpy(exact, text, len);
        (void) LLVMFuzzerTestOneInput(exact, len);
        (*count)++;
        return 0;
}

static int skip_dot(const struct dirent *de) {
        return de->d_name[0] != '.';
}

static int run_dir(const char *dir, unsigned *count) {
        struct dirent **list = NULL;
        int n, r = 0;

        n = scandir(dir, &list, skip_dot, alphasort);
        if (n < 0) {
                r = -errno;
                fprintf(stderr, "%s: %s\n", dir, strerror(-r));
                return r;
        }
        for (int i = 0; i < n; i++) {
                _cleanup_free_ char *path = NULL;
                struct stat st;

                if (r == 0) {
                        if (asprintf(&path, "%s/%s", dir, list[i]->d_name) < 0)
                                r = -ENOMEM;
                        else if (stat(path, &st) < 0) {
                                r = -errno;
                                fprintf(stderr, "%s: %s\n", path, strerror(-r));
                        } else if (S_ISREG(st.st_mode))
                                r = run_file(path, count);
                }
                free(list[i]);
        }
        free(list);
        return r;
}

int main(int argc, char *argv[]) {
        unsigned count = 0;

        if (LLVMFuzzerInitialize)
                (void) LLVMFuzzerInitialize(&argc, &argv);

        for (int i = 1; i < argc; i++) {
                struct stat st;
                int r;

                if (argv[i][0] == '-')
                        continue;
                if (stat(argv[i], &st) < 0) {
                        fprintf(stderr, "%s: %m\n", argv[i]);
                        return 1;
                }
                r = S_ISDIR(st.st_mode) ? run_dir(argv[i], &count) : run_file(argv[i], &count);
                if (r < 0)
                        return 1;
        }

        if (count == 0) {
                fprintf(stderr, "%s: no inputs run\n", argv[0]);
                return 1;
        }
        fprintf(stderr, "%s: %u inputs run\n", argv[0], count);
        return 0;
}
