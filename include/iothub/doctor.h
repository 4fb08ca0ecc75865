/* SPDX-License-Identifier: MIT */
/* iothubctl doctor: the checks a user runs when something is wrong, in the order a fix has to
 * be made (config, daemon, broker, TPM and key, sign-in, registration, cloud, clock, spool). */
#pragma once

#include <jansson.h>

enum doctor_result { DOCTOR_OK, DOCTOR_WARNING, DOCTOR_FAIL, DOCTOR_SKIPPED };

/* Runs every check and returns the report:
 *   {"checks":[{"check":NAME,"result":"ok|warning|fail|skipped","message":TEXT}, ...],
 *    "first_failure":NAME|null, "first_failure_message":TEXT|null}
 * The message of a failure says what to do. Uses the running daemon's status over the control
 * socket where it can; tests the configuration, the TPM (only while the daemon is not
 * running), the cloud's certificate and the clock itself, without a shell. Returns 0 (the
 * report may hold failures) or a negative errno (out of memory). */
int doctor_run(const char *config_path, json_t **ret);

const char *doctor_result_to_string(enum doctor_result r);
