/* SPDX-License-Identifier: MIT */
/* Logging: the journal with structured fields under systemd, plain lines on stderr otherwise. */
#pragma once

#include <stdarg.h>
#include <syslog.h>

#include "iothub/util.h"

/* MESSAGE_IDs, one per event kind (128-bit, as systemd-id128 new prints them). */
#define IOTHUB_MID_STARTED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c01"
#define IOTHUB_MID_STOPPING "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c02"
#define IOTHUB_MID_RELOADED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c03"
#define IOTHUB_MID_CONFIG_ERROR "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c04"
#define IOTHUB_MID_FRAME_REJECTED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c10"
#define IOTHUB_MID_MQTT_CONNECTED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c11"
#define IOTHUB_MID_MQTT_DISCONNECTED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c12"
#define IOTHUB_MID_BULB_ENROLLED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c13"
#define IOTHUB_MID_BULB_REVOKED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c14"
#define IOTHUB_MID_CONTROL_DENIED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c15"
#define IOTHUB_MID_DEV_KEY_WARNING "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c16"
#define IOTHUB_MID_SPOOL_FULL "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c17"
#define IOTHUB_MID_BATCH_MOVED_ASIDE "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c18"
#define IOTHUB_MID_LOGIN_REQUIRED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c19"
#define IOTHUB_MID_LOGIN_OK "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c1a"
#define IOTHUB_MID_CLOUD_UNAUTHORIZED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c1b"
#define IOTHUB_MID_COMMAND_REJECTED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c20"
#define IOTHUB_MID_COMMAND_EXPIRED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c21"
#define IOTHUB_MID_COMMAND_FAILED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c22"
#define IOTHUB_MID_COMMAND_RESULT_REFUSED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c23"
#define IOTHUB_MID_COMMAND_POLL_FAILED "a7f1c3e2b9d84f6a8e0c5b1d2f3a4c24"

/* Pick the target: the journal when JOURNAL_STREAM matches stderr, else stderr. */
void log_open(const char *ident);
void log_set_max_level(int level);
int log_get_max_level(void);
/* Parse "debug", "info", "notice", "warning", "err"/"error", "crit". Returns 0 or -EINVAL. */
int log_level_from_string(const char *s, int *ret);
bool log_to_journal(void);

/* Logs one message. 'error' is a negative or positive errno, or 0; %m prints it.
 * Returns -abs(error), so that callers can 'return log_error_errno(r, ...)'. */
int log_internal(int level, int error, const char *file, int line, const char *func, const char *format,
                 ...) _printf_(6, 7);
/* Like log_internal, with a MESSAGE_ID and optional device and reason fields (NULL to omit). */
int log_event(int level, int error, const char *message_id, const char *device, const char *reason,
              const char *format, ...) _printf_(6, 7);

#define log_full_errno(level, error, ...) log_internal(level, error, __FILE__, __LINE__, __func__, __VA_ARGS__)
#define log_debug(...) log_full_errno(LOG_DEBUG, 0, __VA_ARGS__)
#define log_info(...) log_full_errno(LOG_INFO, 0, __VA_ARGS__)
#define log_notice(...) log_full_errno(LOG_NOTICE, 0, __VA_ARGS__)
#define log_warning(...) log_full_errno(LOG_WARNING, 0, __VA_ARGS__)
#define log_error(...) log_full_errno(LOG_ERR, 0, __VA_ARGS__)
#define log_debug_errno(e, ...) log_full_errno(LOG_DEBUG, e, __VA_ARGS__)
#define log_warning_errno(e, ...) log_full_errno(LOG_WARNING, e, __VA_ARGS__)
#define log_error_errno(e, ...) log_full_errno(LOG_ERR, e, __VA_ARGS__)
