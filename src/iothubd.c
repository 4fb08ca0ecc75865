/* SPDX-License-Identifier: MIT */
/* iothubd: parse the command line, then hand over to hub_run(). */
#include <getopt.h>
#include <malloc.h>
#include <stdio.h>

#include "iothub/conf.h"
#include "iothub/hub.h"
#include "iothub/log.h"

#define EXIT_USAGE 64
#define EXIT_CONFIG 78

static void usage(FILE *f) {
        fprintf(f, "Usage: iothubd [--config FILE] [--check-config] [--log-level LEVEL] [--version]\n"
                   "  --config FILE      configuration file (default " IOTHUB_DEFAULT_CONFIG ")\n"
                   "  --check-config     validate the configuration and exit\n"
                   "  --log-level LEVEL  debug, info, notice, warning, err\n"
                   "  --version          print the version and exit\n");
}

int main(int argc, char *argv[]) {
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "check-config", no_argument, NULL, 'C' },
                { "log-level", required_argument, NULL, 'l' },
                { "version", no_argument, NULL, 'V' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        const char *config = IOTHUB_DEFAULT_CONFIG;
        bool check = false;
        int level = -1, c;

        /* One malloc arena (issue 13, "Memory"). The daemon runs the loop and one other thread,
         * the database's sync thread (db.c), which allocates next to nothing; glibc would give it
         * an arena of its own (up to 8 per core) whose heap stays mapped and partly touched. Its
         * few allocations share the loop's arena: the lock is never contended in practice.
         * (libcurl and its resolver threads live in iothub-uplink since issue 14.) */
        (void) mallopt(M_ARENA_MAX, 1);
        /* A fixed threshold, as iothub-signer and iothub-uplink have (chanserver.c): a buffer
         * above 128 KiB (the cloud's list of 5,000 bulbs is about 1 MiB of JSON, a big batch as
         * much) is mmap()ed and goes back to the system when freed. glibc's default threshold
         * rises after the first such free, and the next ones then stay in the heap for good
         * (issue 13, "Memory"; hub.c trims what small allocations leave behind). */
        (void) mallopt(M_MMAP_THRESHOLD, 128 * 1024);
        log_open("iothubd");
        while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0)
                switch (c) {
                case 'c':
                        config = optarg;
                        break;
                case 'C':
                        check = true;
                        break;
                case 'l':
                        if (log_level_from_string(optarg, &level) < 0) {
                                fprintf(stderr, "iothubd: unknown log level '%s'\n", optarg);
                                return EXIT_USAGE;
                        }
                        break;
                case 'V':
                        printf("iothubd %s\n", IOTHUB_VERSION);
                        return 0;
                case 'h':
                        usage(stdout);
                        return 0;
                default:
                        usage(stderr);
                        return EXIT_USAGE;
                }
        if (optind < argc) {
                fprintf(stderr, "iothubd: unexpected argument '%s'\n", argv[optind]);
                return EXIT_USAGE;
        }
        if (level >= 0)
                log_set_max_level(level);

        if (check) {
                _cleanup_conf_ struct iothub_conf *conf = NULL;
                _cleanup_free_ char *err = NULL;
                int r = conf_load(config, &conf, &err);
                if (r < 0) {
                        fprintf(stderr, "iothubd: %s\n", err ? err : strerror(-r));
                        return EXIT_CONFIG;
                }
                printf("%s: configuration is valid\n", config);
                return 0;
        }
        return hub_run(config, level);
}
