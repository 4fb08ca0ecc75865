/* SPDX-License-Identifier: MIT */
/* The frame parser's cost per frame, with and without its fast paths (src/frame.c): a file of
 * `loadgen frames` lines ("<topic> <JWS>") parsed PASSES times by frame_parse() and by
 * frame_parse_reference(), CPU time per frame of each. Not part of `make bench` (see
 * tests/bench/README.md, "The frame parser alone"); build and run by hand:
 *   cc -O2 -Iinclude -o build/frame-cost tests/bench/frame-cost.c build/libiothub.a \
 *      $(pkg-config --libs jansson libcrypto) && build/frame-cost FILE [PASSES]
 * Under `valgrind --tool=callgrind` the instruction counts are the same whatever the machine's
 * load. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "iothub/frame.h"

#define MAX_FRAMES 200000

struct line {
        char dev[DEVICE_ID_MAX + 1];
        const uint8_t *jws;
        size_t len;
};

static double cpu_seconds(void) {
        struct timespec ts;

        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

typedef enum frame_reason (*parse_fn)(const uint8_t *, size_t, const char *, size_t, struct frame *);

static double run(parse_fn fn, const struct line *lines, size_t n, unsigned passes) {
        double t0 = cpu_seconds();

        for (unsigned p = 0; p < passes; p++)
                for (size_t i = 0; i < n; i++) {
                        struct frame f;
                        if (fn(lines[i].jws, lines[i].len, lines[i].dev, 4096, &f) != FRAME_OK) {
                                fprintf(stderr, "frame %zu rejected\n", i);
                                exit(1);
                        }
                }
        return (cpu_seconds() - t0) / ((double) n * passes) * 1e9;
}

int main(int argc, char **argv) {
        static struct line lines[MAX_FRAMES];
        unsigned passes = argc > 2 ? (unsigned) atoi(argv[2]) : 5;
        char *buf = NULL;
        size_t cap = 0, n = 0;
        ssize_t len;
        FILE *fp;

        if (argc < 2 || !(fp = fopen(argv[1], "r"))) {
                fprintf(stderr, "usage: frame-cost FILE [PASSES]\n");
                return 2;
        }
        while (n < MAX_FRAMES && (len = getline(&buf, &cap, fp)) > 0) {
                char *sp = strchr(buf, ' ');
                if (!sp)
                        continue;
                *sp = '\0';
                while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
                        buf[--len] = '\0';
                if (frame_topic_device(buf, "iothub/v1/bulbs", "status", lines[n].dev) < 0)
                        continue;
                lines[n].jws = (const uint8_t *) strdup(sp + 1);
                lines[n].len = strlen(sp + 1);
                n++;
        }
        fclose(fp);
        free(buf);
        if (n == 0)
                return 2;
        /* Alternated, so that the machine's load falls on both alike. */
        double fast = 0, ref = 0;
        for (int k = 0; k < 3; k++) {
                fast += run(frame_parse, lines, n, passes);
                ref += run(frame_parse_reference, lines, n, passes);
        }
        printf("{\"frames\":%zu,\"passes\":%u,\"frame_parse_ns\":%.0f,\"reference_ns\":%.0f}\n", n, 3 * passes, fast / 3,
               ref / 3);
        return 0;
}
