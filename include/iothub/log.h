/* SPDX-License-Identifier: MIT */
/* Logging: the journal with structured fields under systemd, plain lines on stderr otherwise. */
#pragma once

#include <stdarg.h>
#include <syslog.h>

#include "iothub/util.h"

/* MESSAGE_IDs, one per event kind: random 128-bit ids (systemd-id128 new), never reused for
 * another meaning. Each has an entry in systemd/iothub.catalog (subject, explanation, what to
 * do), which journalctl -x shows; tests/unit/test-catalog checks that both lists agree. */
#define IOTHUB_MID_STARTED "5826066582b147dc9318dd683799aa4f"
#define IOTHUB_MID_STOPPING "6d880881051b46f8a351371c5058ebc6"
#define IOTHUB_MID_RELOADED "86f758c5f0ca47658e9cbd5415f16dd7"
#define IOTHUB_MID_CONFIG_ERROR "4f6abd8e8dfd4566b3a45c9bf6a66cdd"
#define IOTHUB_MID_FRAME_REJECTED "91c6319df554407181ffbfd451cb6dcd"
#define IOTHUB_MID_MQTT_CONNECTED "1eb44cb29eca40ce9e6745559be8db95"
#define IOTHUB_MID_MQTT_DISCONNECTED "9666b70f0b4c41e7a8c0722d524e8e47"
#define IOTHUB_MID_BULB_ENROLLED "ac68ff27e2204d4983d21c7d4017e556"
#define IOTHUB_MID_BULB_REVOKED "b9cb8fcd132148819f9359bc94e778da"
#define IOTHUB_MID_CONTROL_DENIED "d2e80184c7d840d2a5cd2a5c1c35909b"
#define IOTHUB_MID_DEV_KEY_WARNING "af6900fb38fa4ddd942c566138c24dd0"
#define IOTHUB_MID_SPOOL_FULL "115a8487ee72431f87f4cc583d797438"
#define IOTHUB_MID_BATCH_MOVED_ASIDE "f3501379bfd84ded917d13404c9493b5"
#define IOTHUB_MID_LOGIN_REQUIRED "2f875e64adf24be7a613561597fc5bdd"
#define IOTHUB_MID_LOGIN_OK "f4305dd0f8704991b4f5e4e55704fda5"
#define IOTHUB_MID_COMMAND_REJECTED "e6e0e0f409094ccab9189c3ac6e826c6"
#define IOTHUB_MID_COMMAND_EXPIRED "78384bd9be9e420e89723b0c17c098b4"
#define IOTHUB_MID_COMMAND_FAILED "035110f4e3fd436d975f56cbd06e27c9"
#define IOTHUB_MID_COMMAND_RESULT_REFUSED "77215ee122ed4a0ba5bee24b653147c2"
#define IOTHUB_MID_COMMAND_POLL_FAILED "1583385e6fc24720a8c63478116b6dd0"
#define IOTHUB_MID_KEY_UNAVAILABLE "a26202862662450c90afd5450506b07a"
#define IOTHUB_MID_KEY_OPENED "e71c9ca1105a4736890b780c773423be"
#define IOTHUB_MID_CLOUD_UNAUTHORIZED "22a07ecc170f4e5284d6fdc1ca09bda2"
#define IOTHUB_MID_STORE_FAILED "1581279d88d44a08abe8aa80d0b58ebc"
#define IOTHUB_MID_STORE_RECOVERED "eb54a9247d5749eda80aa0d2f0bf8abe"
#define IOTHUB_MID_DB_CORRUPT "17e816c5022c4eee997f5b03a1d01cde"
#define IOTHUB_MID_DB_REPLACED "991139270fef43dd90ed19ecc5138d7c"
#define IOTHUB_MID_SIGNER_PEER_REFUSED "f6c8069c2755472b84e7d95c3fed8c82"
#define IOTHUB_MID_SIGNER_RATE_LIMITED "ea1c0a4e2a344ab697d3dcf536ba9659"
#define IOTHUB_MID_SIGNER_POLICY_REFUSED "c847d6fb9a8149c4b88fda178e05a2f1"
#define IOTHUB_MID_SIGNER_MALFORMED "c2101544b18044fe8f57f8a8581f2a5d"

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
int log_event_internal(int level, int error, const char *file, int line, const char *func, const char *message_id,
                       const char *device, const char *reason, const char *format, ...) _printf_(9, 10);
/* The caller's location goes to the journal as CODE_FILE=, CODE_LINE=, CODE_FUNC=. */
#define log_event(level, error, message_id, device, reason, ...)                                            \
        log_event_internal(level, error, __FILE__, __LINE__, __func__, message_id, device, reason, __VA_ARGS__)

#define log_full_errno(level, error, ...) log_internal(level, error, __FILE__, __LINE__, __func__, __VA_ARGS__)
#define log_debug(...) log_full_errno(LOG_DEBUG, 0, __VA_ARGS__)
#define log_info(...) log_full_errno(LOG_INFO, 0, __VA_ARGS__)
#define log_notice(...) log_full_errno(LOG_NOTICE, 0, __VA_ARGS__)
#define log_warning(...) log_full_errno(LOG_WARNING, 0, __VA_ARGS__)
#define log_error(...) log_full_errno(LOG_ERR, 0, __VA_ARGS__)
#define log_debug_errno(e, ...) log_full_errno(LOG_DEBUG, e, __VA_ARGS__)
#define log_warning_errno(e, ...) log_full_errno(LOG_WARNING, e, __VA_ARGS__)
#define log_error_errno(e, ...) log_full_errno(LOG_ERR, e, __VA_ARGS__)
