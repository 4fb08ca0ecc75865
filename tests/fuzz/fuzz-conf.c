/* SPDX-License-Identifier: MIT */
/* libFuzzer target for the configuration file (src/conf.c via libinih, iothub.conf(5)). The input
 * is the file's bytes, read through fmemopen() by conf_load_stream(): the same reader, limits,
 * key table and checks as conf_load(). What is accepted must be in every documented range (the
 * daemon uses the values without checking them again); what is refused must come with one line
 * that names the file and carries no control character (it goes to a terminal and the journal). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <unistd.h>

#include "../../src/conf-internal.h"
#include "check.h"

#define FUZZ_PATH "/etc/iothub-fuzz.conf"
#define FUZZ_MACHINE_ID "0123456789abcdef0123456789abcdef"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

extern const char *conf_machine_id_path;
static char machine_id_path[64];

static void remove_machine_id(void) {
        (void) unlink(machine_id_path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        const char *tmp = getenv("TMPDIR");
        int fd;

        /* A machine id of our own, so that the result does not depend on the host's. */
        (void) snprintf(machine_id_path, sizeof machine_id_path, "%s/fuzz-conf-XXXXXX",
                        tmp && strlen(tmp) < 32 ? tmp : "/tmp");
        fd = mkstemp(machine_id_path);
        CHECK(fd >= 0);
        CHECK(write(fd, FUZZ_MACHINE_ID "\n", 33) == 33);
        CHECK(close(fd) == 0);
        atexit(remove_machine_id);
        conf_machine_id_path = machine_id_path;
        unsetenv("STATE_DIRECTORY");
        unsetenv("RUNTIME_DIRECTORY");
        return 0;
}

static bool no_control(const char *s) {
        for (; *s; s++)
                if ((unsigned char) *s < 0x20 || *s == 0x7f)
                        return false;
        return true;
}

/* A string value as the daemon gets it: NULL (unset) or 1..max bytes without control characters. */
static bool string_ok(const char *s, size_t max) {
        return !s || (strlen(s) >= 1 && strlen(s) <= max && no_control(s));
}

static bool path_ok(const char *s) {
        return !s || (s[0] == '/' && string_ok(s, 4096));
}

static bool https_url_ok(const char *s) {
        return !s || (string_ok(s, 2048) && strncmp(s, "https://", 8) == 0 && !strchr(s, ' ') &&
                      s[8] != '\0' && !strchr("/?#", s[8]));
}

static bool scope_ok(const char *s) {
        if (!string_ok(s, 1024))
                return false;
        /* RFC 6749 3.3: NQCHAR tokens separated by single spaces. */
        for (const char *p = s; p && *p; p++) {
                bool nqchar = *p >= 0x21 && *p <= 0x7e && *p != '"' && *p != '\\';

                if (*p == ' ' ? (p == s || p[-1] == ' ' || p[1] == '\0') : !nqchar)
                        return false;
        }
        return true;
}

static void check_accepted(const struct iothub_conf *c) {
        CHECK(c->path && strcmp(c->path, FUZZ_PATH) == 0);
        CHECK(c->hub.id && device_id_is_valid(c->hub.id, strlen(c->hub.id)));
        CHECK(fuzz_id_chars_valid(c->hub.id, DEVICE_ID_MAX) && c->hub.id[0] != '.');
        CHECK(c->hub.state_dir && path_ok(c->hub.state_dir));
        CHECK(c->hub.runtime_dir && path_ok(c->hub.runtime_dir));

        CHECK(c->mqtt.host && string_ok(c->mqtt.host, 253) && !strchr(c->mqtt.host, ' '));
        CHECK(c->mqtt.port >= 1);
        CHECK(c->mqtt.topic_prefix && string_ok(c->mqtt.topic_prefix, 128));
        CHECK(!strpbrk(c->mqtt.topic_prefix, "+#") && !strstr(c->mqtt.topic_prefix, "//"));
        CHECK(c->mqtt.topic_prefix[0] != '/' && c->mqtt.topic_prefix[strlen(c->mqtt.topic_prefix) - 1] != '/');
        CHECK(c->mqtt.client_id && fuzz_id_chars_valid(c->mqtt.client_id, 64));
        CHECK(string_ok(c->mqtt.username, 256));
        CHECK(path_ok(c->mqtt.password_file) && path_ok(c->mqtt.ca_file));
        CHECK(c->mqtt.keepalive_s >= 5 && c->mqtt.keepalive_s <= 3600);

        CHECK(c->key.backend == KEY_BACKEND_TPM || c->key.backend == KEY_BACKEND_FILE);
        CHECK(key_backend_to_string(c->key.backend));
        CHECK((c->key.backend == KEY_BACKEND_FILE) == !!c->key.file);
        CHECK(path_ok(c->key.file));
        CHECK(c->key.tcti && string_ok(c->key.tcti, 256));
        CHECK(c->key.handle >= 0x81000000 && c->key.handle <= 0x81FFFFFF);

        CHECK(https_url_ok(c->cloud.url) && path_ok(c->cloud.ca_file) && path_ok(c->cloud.bearer_token_file));
        CHECK(c->cloud.batch_max_frames >= 1 && c->cloud.batch_max_frames <= 4096);
        CHECK(c->cloud.batch_max_delay_ms >= 10 && c->cloud.batch_max_delay_ms <= 600000);
        CHECK(c->cloud.timeout_s >= 1 && c->cloud.timeout_s <= 300);

        CHECK(https_url_ok(c->oauth.issuer) && path_ok(c->oauth.ca_file));
        CHECK(string_ok(c->oauth.client_id, 256));
        for (const char *p = c->oauth.client_id; p && *p; p++)
                CHECK(*p >= 0x20 && *p <= 0x7e);
        CHECK(c->oauth.scope && scope_ok(c->oauth.scope));
        CHECK(dpop_mode_to_string(c->oauth.dpop));

        CHECK(c->frames.max_bytes >= 256 && c->frames.max_bytes <= 65536);
        CHECK(c->frames.max_clock_skew_s >= 1 && c->frames.max_clock_skew_s <= 86400);
        CHECK(isfinite(c->frames.rate_per_device) && c->frames.rate_per_device >= 0.01 &&
              c->frames.rate_per_device <= 1000);
        CHECK(path_ok(c->bulbs.ca_file));
        CHECK(c->spool.max_bytes >= 64 * UINT64_C(1024) && c->spool.max_bytes <= 64 * UINT64_C(1024 * 1024 * 1024));
}

static void check_refused(int r, const char *message) {
        CHECK(r == -EINVAL || r == -EFBIG || r == -ENOMEM);
        CHECK(message);
        CHECK(strncmp(message, FUZZ_PATH ":", strlen(FUZZ_PATH ":")) == 0);
        CHECK(no_control(message)); /* one line, nothing for a terminal to interpret */
        CHECK(strlen(message) < 1024);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct iothub_conf *c = (struct iothub_conf *) 0x1;
        char *message = NULL;
        FILE *f;
        int r;

        /* fmemopen() refuses a zero-sized buffer; an empty file is the same as a file of blanks. */
        f = fmemopen(size ? (void *) data : (void *) "\n", size ? size : 1, "r");
        CHECK(f);
        r = conf_load_stream(f, FUZZ_PATH, &c, &message);
        CHECK(fclose(f) == 0);
        if (r < 0) {
                CHECK(c == (struct iothub_conf *) 0x1);
                check_refused(r, message);
                free(message);
                return 0;
        }
        CHECK(r == 0 && !message);
        check_accepted(c);
        conf_free(c);
        return 0;
}
