/* SPDX-License-Identifier: MIT */
/* Helpers for the unit tests that need a software TPM (test-hubkey, test-tokenstore, test-srk), and read
 * the files they leave. The TPM: swtpm in socket mode as a child process, on loopback ports it
 * picked, with a fresh state directory of its own, killed with the test if the test dies
 * (PR_SET_PDEATHSIG). The helpers fail the running cmocka test (fail_msg) rather than return
 * errors: they are test code. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "iothub/util.h"

struct swtpm {
        pid_t pid; /* -1 when not running */
        uint16_t port; /* the TPM command port; port + 1 is the control port */
        char dir[64]; /* the state directory, removed by swtpm_stop() */
        char tcti[64]; /* "swtpm:host=127.0.0.1,port=N", for Tss2_TctiLdr_Initialize and [key] tcti */
};

/* Starts swtpm (s->pid must be -1) with its state in /tmp/test-<tag>-swtpm-XXXXXX and returns
 * once it accepts connections; retries on other ports when a port was taken meanwhile. */
void swtpm_start(struct swtpm *s, const char *tag);
/* Stops it (SIGTERM, waits) and removes its state; does nothing for a stopped one. */
void swtpm_stop(struct swtpm *s);

/* CLOCK_MONOTONIC in microseconds. */
uint64_t now_usec(void);
/* Two consecutive free loopback ports: returns the first. */
uint16_t pick_port_pair(void);
/* rm -rf dir, without a shell. */
void rm_rf(const char *dir);
/* A whole file, malloc'ed (one spare byte at the end); its length in *ret_len. */
uint8_t *read_bytes(const char *path, size_t *ret_len);
