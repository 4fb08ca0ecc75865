/* SPDX-License-Identifier: MIT */
/* src/conf.c: every key with good and bad values, the exact message (file, line, section, key) of each
 * error, the defaults from the environment and /etc/machine-id, and the shipped etc/iothub.conf. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>

#include <ini.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "iothub/conf.h"

/* src/conf.c: where the default hub id comes from; pointed at files of the test's own. */
extern const char *conf_machine_id_path;

#define MACHINE_ID "0123456789abcdef0123456789abcdef"
#define SHIPPED_CONF "etc/iothub.conf"

static char tmpdir[] = "/tmp/test-conf-XXXXXX";
static char machine_id_path[sizeof(tmpdir) + 32];

/* "{c*N}" in a test string stands for N times c, for values at and over the length limits. */
static char *expand(const char *s) {
        size_t len = 0;
        char *out, *o;

        for (const char *p = s; *p;) {
                char c;
                unsigned n;
                int used;
                if (sscanf(p, "{%c*%u}%n", &c, &n, &used) == 2) {
                        len += n;
                        p += used;
                } else {
                        len++;
                        p++;
                }
        }
        out = o = malloc(len + 1);
        assert_non_null(out);
        for (const char *p = s; *p;) {
                char c;
                unsigned n;
                int used;
                if (sscanf(p, "{%c*%u}%n", &c, &n, &used) == 2) {
                        memset(o, c, n);
                        o += n;
                        p += used;
                } else
                        *o++ = *p++;
        }
        *o = '\0';
        return out;
}

/* The expected messages name files the test only knows at run time: each "%s" in tmpl is replaced by the
 * next of a, b (a format string that is not a literal would defeat -Wformat=2). */
static char *subst(const char *tmpl, const char *a, const char *b) {
        const char *args[] = { a, b };
        size_t next = 0;
        char *out = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&out, &len);

        assert_non_null(f);
        for (const char *p = tmpl; *p; p++) {
                if (p[0] == '%' && p[1] == 's' && next < ELEMENTSOF(args)) {
                        fputs(args[next++], f);
                        p++;
                } else
                        fputc(*p, f);
        }
        assert_int_equal(fclose(f), 0);
        return out;
}

static void write_all(const char *path, const void *data, size_t len) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, data, len), (ssize_t) len);
        assert_int_equal(close(fd), 0);
}

static char *write_tmp(const void *data, size_t len) {
        char *path = NULL;
        int fd;

        assert_true(asprintf(&path, "%s/conf-XXXXXX", tmpdir) > 0);
        fd = mkstemp(path);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, data, len), (ssize_t) len);
        assert_int_equal(close(fd), 0);
        return path;
}

/* Writes text (len bytes, or strlen when len is 0) to a file, loads it, removes it. *ret_path keeps its
 * name for the expected messages. */
static int load_len(const char *text, size_t len, struct iothub_conf **ret, char **ret_error,
                    char **ret_path) {
        char *path = write_tmp(text, len ?: strlen(text));
        int r = conf_load(path, ret, ret_error);

        (void) unlink(path);
        if (ret_path)
                *ret_path = path;
        else
                free(path);
        return r;
}

static int load(const char *text, struct iothub_conf **ret, char **ret_error, char **ret_path) {
        return load_len(text, 0, ret, ret_error, ret_path);
}

/* The test's own list of the keys, written from DESIGN.md and the brief, not from conf.c's table. */
enum kind { STR, U16, UINT, HANDLE, RATE, SIZE, BACKEND, DPOP, ATTEST, BOOL };
struct key_info {
        const char *section;
        const char *name;
        enum kind kind;
        size_t offset;
};
#define K(s, n, m, kind)                                                                                    \
        { s, n, kind, offsetof(struct iothub_conf, m) }
static const struct key_info keys[] = {
        K("hub", "id", hub.id, STR),
        K("hub", "state_dir", hub.state_dir, STR),
        K("hub", "runtime_dir", hub.runtime_dir, STR),
        K("mqtt", "host", mqtt.host, STR),
        K("mqtt", "port", mqtt.port, U16),
        K("mqtt", "topic_prefix", mqtt.topic_prefix, STR),
        K("mqtt", "client_id", mqtt.client_id, STR),
        K("mqtt", "username", mqtt.username, STR),
        K("mqtt", "password_file", mqtt.password_file, STR),
        K("mqtt", "ca_file", mqtt.ca_file, STR),
        K("mqtt", "keepalive_s", mqtt.keepalive_s, UINT),
        K("key", "backend", key.backend, BACKEND),
        K("key", "tcti", key.tcti, STR),
        K("key", "handle", key.handle, HANDLE),
        K("key", "file", key.file, STR),
        K("cloud", "url", cloud.url, STR),
        K("cloud", "ca_file", cloud.ca_file, STR),
        K("cloud", "batch_max_frames", cloud.batch_max_frames, UINT),
        K("cloud", "batch_max_delay_ms", cloud.batch_max_delay_ms, UINT),
        K("cloud", "timeout_s", cloud.timeout_s, UINT),
        K("cloud", "bearer_token_file", cloud.bearer_token_file, STR),
        K("cloud", "attestation", cloud.attestation, ATTEST),
        K("cloud", "command_key_file", cloud.command_key_file, STR),
        K("cloud", "events_interval_s", cloud.events_interval_s, UINT),
        K("oauth", "issuer", oauth.issuer, STR),
        K("oauth", "client_id", oauth.client_id, STR),
        K("oauth", "scope", oauth.scope, STR),
        K("oauth", "dpop", oauth.dpop, DPOP),
        K("oauth", "ca_file", oauth.ca_file, STR),
        K("frames", "max_bytes", frames.max_bytes, UINT),
        K("frames", "max_clock_skew_s", frames.max_clock_skew_s, UINT),
        K("frames", "commit_delay_ms", frames.commit_delay_ms, UINT),
        K("frames", "rate_per_device", frames.rate_per_device, RATE),
        K("bulbs", "ca_file", bulbs.ca_file, STR),
        K("spool", "max_bytes", spool.max_bytes, SIZE),
        K("broker", "dynsec", broker.dynsec, BOOL),
        K("broker", "timeout_s", broker.timeout_s, UINT),
        K("signer", "socket", signer.socket, STR),
        K("signer", "client_user", signer.client_user, STR),
        K("signer", "command_user", signer.command_user, STR),
        K("signer", "state_dir", signer.state_dir, STR),
        K("signer", "rate_per_s", signer.rate_per_s, UINT),
        K("signer", "burst", signer.burst, UINT),
        K("uplink", "socket", uplink.socket, STR),
        K("uplink", "client_user", uplink.client_user, STR),
};

static const struct key_info *key_info_find(const char *section, const char *name) {
        for (size_t i = 0; i < ELEMENTSOF(keys); i++)
                if (streq(keys[i].section, section) && streq(keys[i].name, name))
                        return &keys[i];
        fail_msg("no key [%s] %s", section, name);
        return NULL;
}

static char *value_str(const struct iothub_conf *c, const struct key_info *k) {
        const void *p = (const uint8_t *) c + k->offset;
        char *s = NULL;
        int n = -1;

        switch (k->kind) {
        case STR:
                n = asprintf(&s, "%s", *(char *const *) p ?: "(unset)");
                break;
        case U16:
                n = asprintf(&s, "%u", (unsigned) *(const uint16_t *) p);
                break;
        case UINT:
                n = asprintf(&s, "%u", *(const unsigned *) p);
                break;
        case HANDLE:
                n = asprintf(&s, "0x%08" PRIx32, *(const uint32_t *) p);
                break;
        case RATE:
                n = asprintf(&s, "%.17g", *(const double *) p);
                break;
        case SIZE:
                n = asprintf(&s, "%" PRIu64, *(const uint64_t *) p);
                break;
        case BACKEND:
                n = asprintf(&s, "%s", key_backend_to_string(*(const enum key_backend *) p));
                break;
        case DPOP:
                n = asprintf(&s, "%s", dpop_mode_to_string(*(const enum dpop_mode *) p));
                break;
        case ATTEST:
                n = asprintf(&s, "%s", attest_mode_to_string(*(const enum attest_mode *) p));
                break;
        case BOOL:
                n = asprintf(&s, "%s", *(const bool *) p ? "on" : "off");
                break;
        }
        assert_true(n >= 0);
        return s;
}

/* Every key as "[section] key = value" lines, to compare whole configurations. */
static char *dump(const struct iothub_conf *c) {
        char *out = strdup("");

        assert_non_null(out);
        for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
                char *v = value_str(c, &keys[i]), *n = NULL;
                assert_true(asprintf(&n, "%s[%s] %s = %s\n", out, keys[i].section, keys[i].name, v) > 0);
                free(v);
                free(out);
                out = n;
        }
        return out;
}

static int setup_group(void **state) {
        if (!mkdtemp(tmpdir))
                return -1;
        (void) snprintf(machine_id_path, sizeof(machine_id_path), "%s/machine-id", tmpdir);
        return 0;
}

static int teardown_group(void **state) {
        (void) unlink(machine_id_path);
        (void) rmdir(tmpdir);
        return 0;
}

/* Every test starts from a known environment: a valid machine id, no systemd directories. */
static int setup(void **state) {
        write_all(machine_id_path, MACHINE_ID "\n", strlen(MACHINE_ID) + 1);
        conf_machine_id_path = machine_id_path;
        unsetenv("STATE_DIRECTORY");
        unsetenv("RUNTIME_DIRECTORY");
        return 0;
}

#define DEFAULTS_DUMP                                                                                       \
        "[hub] id = " MACHINE_ID "\n"                                                                       \
        "[hub] state_dir = /var/lib/iothub\n"                                                               \
        "[hub] runtime_dir = /run/iothub\n"                                                                 \
        "[mqtt] host = 127.0.0.1\n"                                                                         \
        "[mqtt] port = 1883\n"                                                                              \
        "[mqtt] topic_prefix = iothub/v1/bulbs\n"                                                           \
        "[mqtt] client_id = iothubd-" MACHINE_ID "\n"                                                       \
        "[mqtt] username = (unset)\n"                                                                       \
        "[mqtt] password_file = (unset)\n"                                                                  \
        "[mqtt] ca_file = (unset)\n"                                                                        \
        "[mqtt] keepalive_s = 60\n"                                                                         \
        "[key] backend = tpm\n"                                                                             \
        "[key] tcti = device:/dev/tpmrm0\n"                                                                 \
        "[key] handle = 0x81000101\n"                                                                       \
        "[key] file = (unset)\n"                                                                            \
        "[cloud] url = (unset)\n"                                                                           \
        "[cloud] ca_file = (unset)\n"                                                                       \
        "[cloud] batch_max_frames = 256\n"                                                                  \
        "[cloud] batch_max_delay_ms = 2000\n"                                                               \
        "[cloud] timeout_s = 30\n"                                                                          \
        "[cloud] bearer_token_file = (unset)\n"                                                             \
        "[cloud] attestation = auto\n"                                                                      \
        "[cloud] command_key_file = (unset)\n"                                                              \
        "[cloud] events_interval_s = 60\n"                                                                  \
        "[oauth] issuer = (unset)\n"                                                                        \
        "[oauth] client_id = (unset)\n"                                                                     \
        "[oauth] scope = offline_access\n"                                                                  \
        "[oauth] dpop = auto\n"                                                                             \
        "[oauth] ca_file = (unset)\n"                                                                       \
        "[frames] max_bytes = 4096\n"                                                                       \
        "[frames] max_clock_skew_s = 300\n"                                                                 \
        "[frames] commit_delay_ms = 50\n"                                                                   \
        "[frames] rate_per_device = 5\n"                                                                    \
        "[bulbs] ca_file = (unset)\n"                                                                       \
        "[spool] max_bytes = 268435456\n"                                                                   \
        "[broker] dynsec = off\n"                                                                            \
        "[broker] timeout_s = 5\n"                                                                         \
        "[signer] socket = /run/iothub-signer/signer.sock\n"                                                \
        "[signer] client_user = iothub-uplink\n"                                                            \
        "[signer] command_user = iothub\n"                                                                  \
        "[signer] state_dir = /var/lib/iothub-signer\n"                                                     \
        "[signer] rate_per_s = 50\n"                                                                        \
        "[signer] burst = 100\n"                                                                           \
        "[uplink] socket = /run/iothub-uplink/uplink.sock\n"                                                \
        "[uplink] client_user = iothub\n"

static void test_defaults(void **state) {
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_free_ char *d = NULL;

        assert_int_equal(conf_defaults(&c), 0);
        assert_null(c->path);
        d = dump(c);
        assert_string_equal(d, DEFAULTS_DUMP);
}

static void test_defaults_empty_file(void **state) {
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_free_ char *d = NULL, *path = NULL, *err = NULL;

        assert_int_equal(load("", &c, &err, &path), 0);
        assert_null(err);
        assert_string_equal(c->path, path);
        d = dump(c);
        assert_string_equal(d, DEFAULTS_DUMP);
}

/* Comments, blank lines and empty known sections only. */
static void test_defaults_comments_only(void **state) {
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_free_ char *d = NULL;

        assert_int_equal(load("# comment\n; comment\n\n[hub]\n   \n[mqtt]\n[spool]\n", &c, NULL, NULL), 0);
        d = dump(c);
        assert_string_equal(d, DEFAULTS_DUMP);
}

static void test_full_file(void **state) {
        static const char text[] = "# every key, none at its default\n"
                                   "[hub]\n"
                                   "id = living-room.hub_1\n"
                                   "state_dir = /srv/iothub/state\n"
                                   "runtime_dir = /srv/iothub/run\n"
                                   "\n"
                                   "[mqtt]\n"
                                   "host = broker.example.net\n"
                                   "port = 8883\n"
                                   "topic_prefix = home/lights\n"
                                   "client_id = hub-7\n"
                                   "username = hub\n"
                                   "password_file = /etc/iothub/mqtt.pass\n"
                                   "ca_file = /etc/iothub/mqtt-ca.pem\n"
                                   "keepalive_s = 30\n"
                                   "\n"
                                   "[key]\n"
                                   "backend = file\n"
                                   "tcti = swtpm:host=127.0.0.1,port=2321\n"
                                   "handle = 0x81000002\n"
                                   "file = /etc/iothub/hub-key.pem\n"
                                   "\n"
                                   "[cloud]\n"
                                   "url = https://cloud.example.com/api\n"
                                   "ca_file = /etc/iothub/cloud-ca.pem\n"
                                   "batch_max_frames = 100\n"
                                   "batch_max_delay_ms = 500\n"
                                   "timeout_s = 10\n"
                                   "bearer_token_file = /etc/iothub/token\n"
                                   "attestation = off\n"
                                   "events_interval_s = 30\n"
                                   "\n"
                                   "[oauth]\n"
                                   "issuer = https://login.example.com\n"
                                   "client_id = iothub-hub\n"
                                   "scope = openid offline_access\n"
                                   "dpop = on\n"
                                   "ca_file = /etc/iothub/oauth-ca.pem\n"
                                   "\n"
                                   "[frames]\n"
                                   "max_bytes = 8192\n"
                                   "max_clock_skew_s = 60\n"
                                   "commit_delay_ms = 20\n"
                                   "rate_per_device = 0.5\n"
                                   "\n"
                                   "[bulbs]\n"
                                   "ca_file = /etc/iothub/bulb-ca.pem\n"
                                   "\n"
                                   "[spool]\n"
                                   "max_bytes = 1G\n"
                                   "\n"
                                   "[broker]\n"
                                   "dynsec = on\n"
                                   "timeout_s = 10\n"
                                   "\n"
                                   "[signer]\n"
                                   "socket = /srv/signer.sock\n"
                                   "client_user = hub_1\n"
                                   "command_user = 1001\n"
                                   "state_dir = /srv/signer\n"
                                   "rate_per_s = 10000\n"
                                   "burst = 1\n"
                                   "\n"
                                   "[uplink]\n"
                                   "socket = /srv/uplink.sock\n"
                                   "client_user = hub_1\n";
        static const char expected[] = "[hub] id = living-room.hub_1\n"
                                       "[hub] state_dir = /srv/iothub/state\n"
                                       "[hub] runtime_dir = /srv/iothub/run\n"
                                       "[mqtt] host = broker.example.net\n"
                                       "[mqtt] port = 8883\n"
                                       "[mqtt] topic_prefix = home/lights\n"
                                       "[mqtt] client_id = hub-7\n"
                                       "[mqtt] username = hub\n"
                                       "[mqtt] password_file = /etc/iothub/mqtt.pass\n"
                                       "[mqtt] ca_file = /etc/iothub/mqtt-ca.pem\n"
                                       "[mqtt] keepalive_s = 30\n"
                                       "[key] backend = file\n"
                                       "[key] tcti = swtpm:host=127.0.0.1,port=2321\n"
                                       "[key] handle = 0x81000002\n"
                                       "[key] file = /etc/iothub/hub-key.pem\n"
                                       "[cloud] url = https://cloud.example.com/api\n"
                                       "[cloud] ca_file = /etc/iothub/cloud-ca.pem\n"
                                       "[cloud] batch_max_frames = 100\n"
                                       "[cloud] batch_max_delay_ms = 500\n"
                                       "[cloud] timeout_s = 10\n"
                                       "[cloud] bearer_token_file = /etc/iothub/token\n"
                                       "[cloud] attestation = off\n"
                                       "[cloud] command_key_file = (unset)\n"
                                       "[cloud] events_interval_s = 30\n"
                                       "[oauth] issuer = https://login.example.com\n"
                                       "[oauth] client_id = iothub-hub\n"
                                       "[oauth] scope = openid offline_access\n"
                                       "[oauth] dpop = on\n"
                                       "[oauth] ca_file = /etc/iothub/oauth-ca.pem\n"
                                       "[frames] max_bytes = 8192\n"
                                       "[frames] max_clock_skew_s = 60\n"
                                       "[frames] commit_delay_ms = 20\n"
                                       "[frames] rate_per_device = 0.5\n"
                                       "[bulbs] ca_file = /etc/iothub/bulb-ca.pem\n"
                                       "[spool] max_bytes = 1073741824\n"
                                       "[broker] dynsec = on\n"
                                       "[broker] timeout_s = 10\n"
                                       "[signer] socket = /srv/signer.sock\n"
                                       "[signer] client_user = hub_1\n"
                                       "[signer] command_user = 1001\n"
                                       "[signer] state_dir = /srv/signer\n"
                                       "[signer] rate_per_s = 10000\n"
                                       "[signer] burst = 1\n"
                                       "[uplink] socket = /srv/uplink.sock\n"
                                       "[uplink] client_user = hub_1\n";
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_free_ char *d = NULL, *err = NULL;

        /* The machine id must not matter when the file sets one. */
        conf_machine_id_path = "/nonexistent/machine-id";
        assert_int_equal(load(text, &c, &err, NULL), 0);
        assert_null(err);
        d = dump(c);
        assert_string_equal(d, expected);
}

/* Values that are accepted: the edges of every range and the notations of numbers. */
static void test_good_values(void **state) {
        static const struct {
                const char *section, *lines, *key, *expected;
        } cases[] = {
                { "hub", "id = {a*64}", "id", "{a*64}" },
                { "hub", "id = A-Z_a.z", "id", "A-Z_a.z" },
                { "hub", "state_dir = /{s*4095}", "state_dir", "/{s*4095}" },
                { "hub", "runtime_dir = /", "runtime_dir", "/" },
                { "mqtt", "host = {h*253}", "host", "{h*253}" },
                { "mqtt", "host = ::1", "host", "::1" },
                { "mqtt", "port = 1", "port", "1" },
                { "mqtt", "port = 65535", "port", "65535" },
                { "mqtt", "port = 0001883", "port", "1883" }, /* leading zeros are still decimal */
                { "mqtt", "port = 1884   ", "port", "1884" }, /* inih strips blanks around values */
                { "mqtt", "port = 1884 ; a comment", "port", "1884" },
                { "mqtt", "  port = 1884", "port", "1884" }, /* indented: a key, not a continuation */
                { "mqtt", "port=1884", "port", "1884" },
                { "mqtt", "topic_prefix = a", "topic_prefix", "a" },
                { "mqtt", "topic_prefix = home/a.b/c-d e", "topic_prefix", "home/a.b/c-d e" },
                { "mqtt", "topic_prefix = {t*128}", "topic_prefix", "{t*128}" },
                { "mqtt", "client_id = {c*64}", "client_id", "{c*64}" },
                { "mqtt", "client_id = .a_b-C9", "client_id", ".a_b-C9" },
                { "mqtt", "username = j\xc3\xbcrgen", "username", "j\xc3\xbcrgen" },
                { "mqtt", "username = a;b", "username",
                  "a;b" }, /* ';' starts a comment only after a blank */
                { "mqtt", "username = {u*256}", "username", "{u*256}" },
                { "mqtt", "keepalive_s = 5", "keepalive_s", "5" },
                { "mqtt", "keepalive_s = 3600", "keepalive_s", "3600" },
                { "key", "backend = file\nfile = /k.pem", "backend", "file" },
                { "key", "backend = tpm", "backend", "tpm" },
                { "key", "tcti = {t*256}", "tcti", "{t*256}" },
                { "key", "handle = 0x81000000", "handle", "0x81000000" },
                { "key", "handle = 0X817FFFFF", "handle", "0x817fffff" },
                { "key", "handle = 0x817fffff", "handle", "0x817fffff" },
                { "key", "handle = 2164260864", "handle", "0x81000000" },
                { "key", "handle = 0x0081010002", "handle", "0x81010002" },
                { "cloud", "url = https://h", "url", "https://h" },
                { "cloud", "url = https://cloud.example.com:8443/api?x=1", "url",
                  "https://cloud.example.com:8443/api?x=1" },
                { "cloud", "url = https://{u*2040}", "url", "https://{u*2040}" },
                { "cloud", "batch_max_frames = 1", "batch_max_frames", "1" },
                { "cloud", "batch_max_frames = 4096", "batch_max_frames", "4096" },
                { "cloud", "batch_max_delay_ms = 10", "batch_max_delay_ms", "10" },
                { "cloud", "batch_max_delay_ms = 600000", "batch_max_delay_ms", "600000" },
                { "cloud", "timeout_s = 1", "timeout_s", "1" },
                { "cloud", "timeout_s = 300", "timeout_s", "300" },
                { "cloud", "events_interval_s = 1", "events_interval_s", "1" },
                { "cloud", "events_interval_s = 3600", "events_interval_s", "3600" },
                { "oauth", "issuer = https://login.example.com/realms/x", "issuer",
                  "https://login.example.com/realms/x" },
                { "oauth", "client_id = a b~!", "client_id", "a b~!" },
                { "oauth", "client_id = {c*256}", "client_id", "{c*256}" },
                { "oauth", "scope = openid offline_access x:y", "scope", "openid offline_access x:y" },
                { "oauth", "scope = {s*1024}", "scope", "{s*1024}" },
                { "oauth", "dpop = auto", "dpop", "auto" },
                { "oauth", "dpop = on", "dpop", "on" },
                { "oauth", "dpop = off", "dpop", "off" },
                { "cloud", "attestation = auto", "attestation", "auto" },
                { "cloud", "attestation = on", "attestation", "on" },
                { "cloud", "attestation = off", "attestation", "off" },
                { "frames", "max_bytes = 256", "max_bytes", "256" },
                { "frames", "max_bytes = 65536", "max_bytes", "65536" },
                { "frames", "max_clock_skew_s = 1", "max_clock_skew_s", "1" },
                { "frames", "max_clock_skew_s = 86400", "max_clock_skew_s", "86400" },
                { "frames", "commit_delay_ms = 0", "commit_delay_ms", "0" },
                { "frames", "commit_delay_ms = 1000", "commit_delay_ms", "1000" },
                { "frames", "rate_per_device = 0.01", "rate_per_device", "0.01" },
                { "frames", "rate_per_device = 1000", "rate_per_device", "1000" },
                { "frames", "rate_per_device = 1e2", "rate_per_device", "100" },
                { "frames", "rate_per_device = 2.5E+1", "rate_per_device", "25" },
                { "frames", "rate_per_device = 1e-2", "rate_per_device", "0.01" },
                { "frames", "rate_per_device = .5", "rate_per_device", "0.5" },
                { "frames", "rate_per_device = 5.", "rate_per_device", "5" },
                { "frames", "rate_per_device = 007.50", "rate_per_device", "7.5" },
                { "spool", "max_bytes = 64K", "max_bytes", "65536" },
                { "spool", "max_bytes = 65536", "max_bytes", "65536" },
                { "spool", "max_bytes = 1M", "max_bytes", "1048576" },
                { "spool", "max_bytes = 256M", "max_bytes", "268435456" },
                { "spool", "max_bytes = 64G", "max_bytes", "68719476736" },
                { "spool", "max_bytes = 65536K", "max_bytes", "67108864" },
                { "spool", "max_bytes = 68719476736", "max_bytes", "68719476736" },
                { "broker", "dynsec = on", "dynsec", "on" },
                { "broker", "dynsec = off", "dynsec", "off" },
                { "broker", "timeout_s = 1", "timeout_s", "1" },
                { "broker", "timeout_s = 60", "timeout_s", "60" },
                { "signer", "socket = /run/s.sock", "socket", "/run/s.sock" },
                { "signer", "client_user = 0", "client_user", "0" },
                { "signer", "client_user = {u*32}", "client_user", "{u*32}" },
                { "signer", "client_user = a.b_c-d", "client_user", "a.b_c-d" },
                { "signer", "state_dir = /x", "state_dir", "/x" },
                { "signer", "rate_per_s = 1", "rate_per_s", "1" },
                { "signer", "rate_per_s = 10000", "rate_per_s", "10000" },
                { "signer", "burst = 1", "burst", "1" },
                { "signer", "burst = 100000", "burst", "100000" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_conf_ struct iothub_conf *c = NULL;
                _cleanup_free_ char *text = NULL, *lines = expand(cases[i].lines), *v = NULL, *err = NULL,
                                    *expected = expand(cases[i].expected);
                int r;

                assert_true(asprintf(&text, "[%s]\n%s\n", cases[i].section, lines) > 0);
                r = load(text, &c, &err, NULL);
                if (r < 0)
                        fail_msg("case %zu [%s] %s: %s", i, cases[i].section, cases[i].lines, err);
                v = value_str(c, key_info_find(cases[i].section, cases[i].key));
                if (!streq(v, expected))
                        fail_msg("case %zu [%s] %s: got '%s'", i, cases[i].section, cases[i].lines, v);
        }
}

/* Every key with values of the wrong kind, below and above its range, and empty. The file puts each on
 * a different line; the message must name the file, that line, the section and the key. */
static void test_bad_values(void **state) {
        static const struct {
                const char *section, *line, *message;
        } cases[] = {
                { "hub", "id =", "[hub] id: empty value" },
                { "hub", "id = .hub",
                  "[hub] id: '.hub' is not a valid id (1..64 of A-Z a-z 0-9 . _ -, not starting with '.')" },
                { "hub", "id = a/b",
                  "[hub] id: 'a/b' is not a valid id (1..64 of A-Z a-z 0-9 . _ -, not starting with '.')" },
                { "hub", "id = a b",
                  "[hub] id: 'a b' is not a valid id (1..64 of A-Z a-z 0-9 . _ -, not starting with '.')" },
                { "hub", "id = {a*65}", "[hub] id: value is too long (65 characters, at most 64)" },
                { "hub", "state_dir =", "[hub] state_dir: empty value" },
                { "hub", "state_dir = var/lib/iothub",
                  "[hub] state_dir: 'var/lib/iothub' is not an absolute path" },
                { "hub", "state_dir = /{a*4096}",
                  "[hub] state_dir: path is too long (4097 characters, at most 4096)" },
                { "hub", "state_dir = \"/var/lib/iothub\"",
                  "[hub] state_dir: '\"/var/lib/iothub\"' is not an absolute path (quotes are part of the "
                  "value)" },
                { "hub", "state_dir = {r*100}", "[hub] state_dir: '{r*64}...' is not an absolute path" },
                { "hub", "runtime_dir =", "[hub] runtime_dir: empty value" },
                { "hub", "runtime_dir = run", "[hub] runtime_dir: 'run' is not an absolute path" },
                { "hub", "runtime_dir = ~/run", "[hub] runtime_dir: '~/run' is not an absolute path" },

                { "mqtt", "host =", "[mqtt] host: empty value" },
                { "mqtt", "host = {h*254}", "[mqtt] host: value is too long (254 characters, at most 253)" },
                { "mqtt", "host = local host", "[mqtt] host: 'local host' contains a space" },
                { "mqtt", "host = a\tb", "[mqtt] host: value contains a control character" },
                { "mqtt", "port =", "[mqtt] port: empty value" },
                { "mqtt", "port = 0", "[mqtt] port: '0' is out of range 1..65535" },
                { "mqtt", "port = 65536", "[mqtt] port: '65536' is out of range 1..65535" },
                { "mqtt", "port = 70000", "[mqtt] port: '70000' is out of range 1..65535" },
                { "mqtt", "port = -1", "[mqtt] port: '-1' is out of range 1..65535" },
                { "mqtt", "port = 99999999999999999999",
                  "[mqtt] port: '99999999999999999999' is out of range 1..65535" },
                { "mqtt", "port = 18446744073709551617",
                  "[mqtt] port: '18446744073709551617' is out of range 1..65535" },
                { "mqtt", "port = +1883", "[mqtt] port: '+1883' is not a decimal number" },
                { "mqtt", "port = 0x75b", "[mqtt] port: '0x75b' is not a decimal number" },
                { "mqtt", "port = mqtt", "[mqtt] port: 'mqtt' is not a decimal number" },
                { "mqtt", "port = 1883x", "[mqtt] port: '1883x' is not a decimal number" },
                { "mqtt", "port = 1 883", "[mqtt] port: '1 883' is not a decimal number" },
                { "mqtt", "port = 1883.0", "[mqtt] port: '1883.0' is not a decimal number" },
                { "mqtt", "port = --1", "[mqtt] port: '--1' is not a decimal number" },
                { "mqtt", "port = \"1883\"",
                  "[mqtt] port: '\"1883\"' is not a decimal number (quotes are part of the value)" },
                { "mqtt", "topic_prefix =", "[mqtt] topic_prefix: empty value" },
                { "mqtt", "topic_prefix = {t*129}",
                  "[mqtt] topic_prefix: value is too long (129 characters, at most 128)" },
                { "mqtt", "topic_prefix = a/+/b",
                  "[mqtt] topic_prefix: 'a/+/b' contains an MQTT wildcard ('+' or '#')" },
                { "mqtt", "topic_prefix = a/#",
                  "[mqtt] topic_prefix: 'a/#' contains an MQTT wildcard ('+' or '#')" },
                { "mqtt", "topic_prefix = /iothub",
                  "[mqtt] topic_prefix: '/iothub' starts or ends with '/'" },
                { "mqtt", "topic_prefix = iothub/",
                  "[mqtt] topic_prefix: 'iothub/' starts or ends with '/'" },
                { "mqtt", "topic_prefix = /", "[mqtt] topic_prefix: '/' starts or ends with '/'" },
                { "mqtt", "topic_prefix = a//b", "[mqtt] topic_prefix: 'a//b' has an empty level ('//')" },
                { "mqtt", "client_id =", "[mqtt] client_id: empty value" },
                { "mqtt", "client_id = {c*65}",
                  "[mqtt] client_id: value is too long (65 characters, at most 64)" },
                { "mqtt", "client_id = hub 1",
                  "[mqtt] client_id: 'hub 1' may only contain A-Z a-z 0-9 . _ -" },
                { "mqtt", "client_id = hub/1",
                  "[mqtt] client_id: 'hub/1' may only contain A-Z a-z 0-9 . _ -" },
                { "mqtt", "username =", "[mqtt] username: empty value" },
                { "mqtt", "username = {u*257}",
                  "[mqtt] username: value is too long (257 characters, at most 256)" },
                { "mqtt", "username = a\x7f", "[mqtt] username: value contains a control character" },
                { "mqtt", "password_file =", "[mqtt] password_file: empty value" },
                { "mqtt", "password_file = mqtt.pass",
                  "[mqtt] password_file: 'mqtt.pass' is not an absolute path" },
                { "mqtt", "ca_file =", "[mqtt] ca_file: empty value" },
                { "mqtt", "ca_file = ./ca.pem", "[mqtt] ca_file: './ca.pem' is not an absolute path" },
                { "mqtt", "keepalive_s =", "[mqtt] keepalive_s: empty value" },
                { "mqtt", "keepalive_s = 4", "[mqtt] keepalive_s: '4' is out of range 5..3600" },
                { "mqtt", "keepalive_s = 3601", "[mqtt] keepalive_s: '3601' is out of range 5..3600" },
                { "mqtt", "keepalive_s = 60s", "[mqtt] keepalive_s: '60s' is not a decimal number" },

                { "key", "backend =", "[key] backend: empty value" },
                { "key", "backend = TPM", "[key] backend: 'TPM' is not one of tpm, file" },
                { "key", "backend = pkcs11", "[key] backend: 'pkcs11' is not one of tpm, file" },
                { "key", "tcti =", "[key] tcti: empty value" },
                { "key", "tcti = {t*257}", "[key] tcti: value is too long (257 characters, at most 256)" },
                { "key", "handle =", "[key] handle: empty value" },
                { "key", "handle = 0x80ffffff",
                  "[key] handle: '0x80ffffff' is out of range 0x81000000..0x817fffff" },
                /* The platform's persistent range: refused here as the TPM backend refuses it. */
                { "key", "handle = 0x81800000",
                  "[key] handle: '0x81800000' is out of range 0x81000000..0x817fffff" },
                { "key", "handle = 0x81ffffff",
                  "[key] handle: '0x81ffffff' is out of range 0x81000000..0x817fffff" },
                { "key", "handle = 0x82000000",
                  "[key] handle: '0x82000000' is out of range 0x81000000..0x817fffff" },
                { "key", "handle = 81010001",
                  "[key] handle: '81010001' is out of range 0x81000000..0x817fffff" },
                { "key", "handle = -1", "[key] handle: '-1' is out of range 0x81000000..0x817fffff" },
                { "key", "handle = 0x1ffffffffffffffff",
                  "[key] handle: '0x1ffffffffffffffff' is out of range 0x81000000..0x817fffff" },
                { "key", "handle = 0x",
                  "[key] handle: '0x' is not a number (decimal, or hexadecimal with 0x)" },
                { "key", "handle = 0x0x81010001",
                  "[key] handle: '0x0x81010001' is not a number (decimal, or hexadecimal with 0x)" },
                { "key", "handle = +0x81010001",
                  "[key] handle: '+0x81010001' is not a number (decimal, or hexadecimal with 0x)" },
                { "key", "handle = 0x8101000g",
                  "[key] handle: '0x8101000g' is not a number (decimal, or hexadecimal with 0x)" },
                { "key", "handle = 81010001h",
                  "[key] handle: '81010001h' is not a number (decimal, or hexadecimal with 0x)" },
                { "key", "file =", "[key] file: empty value" },
                { "key", "file = key.pem", "[key] file: 'key.pem' is not an absolute path" },

                { "cloud", "url =", "[cloud] url: empty value" },
                { "cloud", "url = http://cloud.example.com",
                  "[cloud] url: plain http is not allowed, use https://" },
                { "cloud", "url = HTTP://cloud.example.com",
                  "[cloud] url: plain http is not allowed, use https://" },
                { "cloud", "url = ftp://cloud.example.com",
                  "[cloud] url: 'ftp://cloud.example.com' does not start with https://" },
                { "cloud", "url = cloud.example.com",
                  "[cloud] url: 'cloud.example.com' does not start with https://" },
                { "cloud", "url = https://", "[cloud] url: 'https://' has no host" },
                { "cloud", "url = https:///v1", "[cloud] url: 'https:///v1' has no host" },
                { "cloud", "url = https://a b", "[cloud] url: 'https://a b' contains whitespace" },
                { "cloud", "url = https://a\tb", "[cloud] url: value contains a control character" },
                { "cloud", "url = https://{u*2041}",
                  "[cloud] url: value is too long (2049 characters, at most 2048)" },
                { "cloud", "ca_file =", "[cloud] ca_file: empty value" },
                { "cloud", "ca_file = ca.pem", "[cloud] ca_file: 'ca.pem' is not an absolute path" },
                { "cloud", "batch_max_frames =", "[cloud] batch_max_frames: empty value" },
                { "cloud", "batch_max_frames = 0", "[cloud] batch_max_frames: '0' is out of range 1..4096" },
                { "cloud", "batch_max_frames = 4097",
                  "[cloud] batch_max_frames: '4097' is out of range 1..4096" },
                { "cloud", "batch_max_frames = 1e3",
                  "[cloud] batch_max_frames: '1e3' is not a decimal number" },
                { "cloud", "batch_max_delay_ms =", "[cloud] batch_max_delay_ms: empty value" },
                { "cloud", "batch_max_delay_ms = 9",
                  "[cloud] batch_max_delay_ms: '9' is out of range 10..600000" },
                { "cloud", "batch_max_delay_ms = 600001",
                  "[cloud] batch_max_delay_ms: '600001' is out of range 10..600000" },
                { "cloud", "batch_max_delay_ms = 2s",
                  "[cloud] batch_max_delay_ms: '2s' is not a decimal number" },
                { "cloud", "timeout_s =", "[cloud] timeout_s: empty value" },
                { "cloud", "timeout_s = 0", "[cloud] timeout_s: '0' is out of range 1..300" },
                { "cloud", "timeout_s = 301", "[cloud] timeout_s: '301' is out of range 1..300" },
                { "cloud", "timeout_s = -5", "[cloud] timeout_s: '-5' is out of range 1..300" },
                { "cloud", "timeout_s = thirty", "[cloud] timeout_s: 'thirty' is not a decimal number" },
                { "cloud", "bearer_token_file =", "[cloud] bearer_token_file: empty value" },
                { "cloud", "events_interval_s = 0", "[cloud] events_interval_s: '0' is out of range 1..3600" },
                { "cloud", "events_interval_s = 3601",
                  "[cloud] events_interval_s: '3601' is out of range 1..3600" },
                { "cloud", "events_interval_s = 1m", "[cloud] events_interval_s: '1m' is not a decimal number" },
                { "cloud", "command_key_file =", "[cloud] command_key_file: empty value" },
                { "cloud", "command_key_file = vendor.pem",
                  "[cloud] command_key_file: 'vendor.pem' is not an absolute path" },
                { "cloud", "bearer_token_file = token",
                  "[cloud] bearer_token_file: 'token' is not an absolute path" },

                { "oauth", "issuer =", "[oauth] issuer: empty value" },
                { "oauth", "issuer = http://login.example.com",
                  "[oauth] issuer: plain http is not allowed, use https://" },
                { "oauth", "issuer = login.example.com",
                  "[oauth] issuer: 'login.example.com' does not start with https://" },
                { "oauth", "issuer = https://", "[oauth] issuer: 'https://' has no host" },
                { "oauth", "issuer = https://{u*2041}",
                  "[oauth] issuer: value is too long (2049 characters, at most 2048)" },
                { "oauth", "client_id =", "[oauth] client_id: empty value" },
                { "oauth", "client_id = {c*257}",
                  "[oauth] client_id: value is too long (257 characters, at most 256)" },
                { "oauth", "client_id = caf\xc3\xa9",
                  "[oauth] client_id: 'caf\xc3\xa9' contains a character that is not printable ASCII" },
                { "oauth", "scope =", "[oauth] scope: empty value" },
                { "oauth", "scope = {s*1025}",
                  "[oauth] scope: value is too long (1025 characters, at most 1024)" },
                { "oauth", "scope = a  b",
                  "[oauth] scope: 'a  b' is not a list of scope tokens (RFC 6749 3.3) separated by single "
                  "spaces" },
                { "oauth", "scope = a\"b",
                  "[oauth] scope: 'a\"b' is not a list of scope tokens (RFC 6749 3.3) separated by single "
                  "spaces" },
                { "oauth", "scope = a\\b",
                  "[oauth] scope: 'a\\b' is not a list of scope tokens (RFC 6749 3.3) separated by single "
                  "spaces" },
                { "oauth", "scope = caf\xc3\xa9",
                  "[oauth] scope: 'caf\xc3\xa9' is not a list of scope tokens (RFC 6749 3.3) separated by "
                  "single spaces" },
                { "oauth", "dpop =", "[oauth] dpop: empty value" },
                { "oauth", "dpop = yes", "[oauth] dpop: 'yes' is not one of auto, on, off" },
                { "cloud", "attestation = yes", "[cloud] attestation: 'yes' is not one of auto, on, off" },
                { "oauth", "dpop = ON", "[oauth] dpop: 'ON' is not one of auto, on, off" },
                { "oauth", "dpop = 1", "[oauth] dpop: '1' is not one of auto, on, off" },
                { "oauth", "ca_file =", "[oauth] ca_file: empty value" },
                { "oauth", "ca_file = oauth.pem", "[oauth] ca_file: 'oauth.pem' is not an absolute path" },

                { "frames", "max_bytes =", "[frames] max_bytes: empty value" },
                { "frames", "max_bytes = 255", "[frames] max_bytes: '255' is out of range 256..65536" },
                { "frames", "max_bytes = 65537", "[frames] max_bytes: '65537' is out of range 256..65536" },
                { "frames", "max_bytes = 4K", "[frames] max_bytes: '4K' is not a decimal number" },
                { "frames", "max_clock_skew_s =", "[frames] max_clock_skew_s: empty value" },
                { "frames", "max_clock_skew_s = 0",
                  "[frames] max_clock_skew_s: '0' is out of range 1..86400" },
                { "frames", "max_clock_skew_s = 86401",
                  "[frames] max_clock_skew_s: '86401' is out of range 1..86400" },
                { "frames", "max_clock_skew_s = 5m",
                  "[frames] max_clock_skew_s: '5m' is not a decimal number" },
                { "frames", "commit_delay_ms = 1001",
                  "[frames] commit_delay_ms: '1001' is out of range 0..1000" },
                { "frames", "commit_delay_ms = -1",
                  "[frames] commit_delay_ms: '-1' is out of range 0..1000" },
                { "frames", "rate_per_device =", "[frames] rate_per_device: empty value" },
                { "frames", "rate_per_device = 0.009",
                  "[frames] rate_per_device: '0.009' is out of range 0.01..1000" },
                { "frames", "rate_per_device = 0",
                  "[frames] rate_per_device: '0' is out of range 0.01..1000" },
                { "frames", "rate_per_device = 1000.001",
                  "[frames] rate_per_device: '1000.001' is out of range 0.01..1000" },
                { "frames", "rate_per_device = -1",
                  "[frames] rate_per_device: '-1' is out of range 0.01..1000" },
                { "frames", "rate_per_device = 1e999",
                  "[frames] rate_per_device: '1e999' is out of range 0.01..1000" },
                { "frames", "rate_per_device = 1e-999",
                  "[frames] rate_per_device: '1e-999' is out of range 0.01..1000" },
                { "frames", "rate_per_device = nan",
                  "[frames] rate_per_device: 'nan' is not a decimal number" },
                { "frames", "rate_per_device = inf",
                  "[frames] rate_per_device: 'inf' is not a decimal number" },
                { "frames", "rate_per_device = INFINITY",
                  "[frames] rate_per_device: 'INFINITY' is not a decimal number" },
                { "frames", "rate_per_device = 0x10",
                  "[frames] rate_per_device: '0x10' is not a decimal number" },
                { "frames", "rate_per_device = 0x1p3",
                  "[frames] rate_per_device: '0x1p3' is not a decimal number" },
                { "frames", "rate_per_device = +5",
                  "[frames] rate_per_device: '+5' is not a decimal number" },
                { "frames", "rate_per_device = 5/s",
                  "[frames] rate_per_device: '5/s' is not a decimal number" },
                { "frames", "rate_per_device = 1,5",
                  "[frames] rate_per_device: '1,5' is not a decimal number" },
                { "frames", "rate_per_device = .", "[frames] rate_per_device: '.' is not a decimal number" },
                { "frames", "rate_per_device = 1.2.3",
                  "[frames] rate_per_device: '1.2.3' is not a decimal number" },
                { "frames", "rate_per_device = 1e",
                  "[frames] rate_per_device: '1e' is not a decimal number" },
                { "frames", "rate_per_device = e5",
                  "[frames] rate_per_device: 'e5' is not a decimal number" },
                { "frames", "rate_per_device = 1e5e",
                  "[frames] rate_per_device: '1e5e' is not a decimal number" },
                { "frames", "rate_per_device = 1e2.5",
                  "[frames] rate_per_device: '1e2.5' is not a decimal number" },

                { "bulbs", "ca_file =", "[bulbs] ca_file: empty value" },
                { "bulbs", "ca_file = bulbs.pem", "[bulbs] ca_file: 'bulbs.pem' is not an absolute path" },

                { "spool", "max_bytes =", "[spool] max_bytes: empty value" },
                { "spool", "max_bytes = 65535", "[spool] max_bytes: '65535' is out of range 64K..64G" },
                { "spool", "max_bytes = 63K", "[spool] max_bytes: '63K' is out of range 64K..64G" },
                { "spool", "max_bytes = 0", "[spool] max_bytes: '0' is out of range 64K..64G" },
                { "spool", "max_bytes = 65G", "[spool] max_bytes: '65G' is out of range 64K..64G" },
                { "spool", "max_bytes = 68719476737",
                  "[spool] max_bytes: '68719476737' is out of range 64K..64G" },
                { "spool", "max_bytes = -1", "[spool] max_bytes: '-1' is out of range 64K..64G" },
                { "spool", "max_bytes = -1M", "[spool] max_bytes: '-1M' is out of range 64K..64G" },
                { "spool", "max_bytes = -1Mx",
                  "[spool] max_bytes: '-1Mx' is not a size (a number with an optional K, M or G suffix)" },
                { "spool", "max_bytes = -",
                  "[spool] max_bytes: '-' is not a size (a number with an optional K, M or G suffix)" },
                { "spool", "max_bytes = 99999999999999999999",
                  "[spool] max_bytes: '99999999999999999999' is out of range 64K..64G" },
                { "spool", "max_bytes = 18014398509481984K",
                  "[spool] max_bytes: '18014398509481984K' is out of range 64K..64G" },
                { "spool", "max_bytes = 17179869184G",
                  "[spool] max_bytes: '17179869184G' is out of range 64K..64G" },
                { "spool", "max_bytes = 64T",
                  "[spool] max_bytes: '64T' is not a size (a number with an optional K, M or G suffix)" },
                { "spool", "max_bytes = 256m",
                  "[spool] max_bytes: '256m' is not a size (a number with an optional K, M or G suffix)" },
                { "spool", "max_bytes = 1KB",
                  "[spool] max_bytes: '1KB' is not a size (a number with an optional K, M or G suffix)" },
                { "spool", "max_bytes = 256 M",
                  "[spool] max_bytes: '256 M' is not a size (a number with an optional K, M or G suffix)" },
                { "spool", "max_bytes = M",
                  "[spool] max_bytes: 'M' is not a size (a number with an optional K, M or G suffix)" },
                { "spool", "max_bytes = +1M",
                  "[spool] max_bytes: '+1M' is not a size (a number with an optional K, M or G suffix)" },
                { "spool", "max_bytes = 0x100000",
                  "[spool] max_bytes: '0x100000' is not a size (a number with an optional K, M or G "
                  "suffix)" },
                { "spool", "max_bytes = 1.5G",
                  "[spool] max_bytes: '1.5G' is not a size (a number with an optional K, M or G suffix)" },
                { "signer", "socket = run/s.sock", "[signer] socket: 'run/s.sock' is not an absolute path" },
                { "signer", "client_user = -x",
                  "[signer] client_user: '-x' is not a user name (A-Z a-z 0-9 . _ -, not starting with - or .)" },
                { "signer", "client_user = a b",
                  "[signer] client_user: 'a b' is not a user name (A-Z a-z 0-9 . _ -, not starting with - or .)" },
                { "signer", "client_user = {u*33}",
                  "[signer] client_user: value is too long (33 characters, at most 32)" },
                { "signer", "rate_per_s = 0", "[signer] rate_per_s: '0' is out of range 1..10000" },
                { "signer", "burst = 100001", "[signer] burst: '100001' is out of range 1..100000" },
        };
        static const char *const fillers[] = { "", "# a comment\n", "\n; another\n   \n" };
        static const unsigned filler_lines[] = { 0, 1, 3 };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_conf_ struct iothub_conf *c = NULL;
                _cleanup_free_ char *text = NULL, *line = expand(cases[i].line), *err = NULL, *path = NULL,
                                    *message = expand(cases[i].message), *expected = NULL;
                /* A comment, a valid key of another section, the section, fillers, the bad line. */
                const char *other = streq(cases[i].section, "bulbs") ? "[spool]\nmax_bytes = 1M"
                                                                     : "[bulbs]\nca_file = /ca.pem";
                unsigned lineno = 5 + filler_lines[i % 3];
                int r;

                assert_true(asprintf(&text, "# bad value %zu\n%s\n[%s]\n%s%s\n[mqtt]\n", i, other,
                                     cases[i].section, fillers[i % 3], line) > 0);
                r = load(text, &c, &err, &path);
                assert_true(asprintf(&expected, "%s:%u: %s", path, lineno, message) > 0);
                if (r != -EINVAL || !streq_ptr(err, expected))
                        fail_msg("case %zu [%s] %s: r=%d\n got: %s\nwant: %s", i, cases[i].section,
                                 cases[i].line, r, err, expected);
                assert_null(c);
        }
}

/* Errors about the structure of the file rather than one value. "%s" is the file's name. */
static void test_structure_errors(void **state) {
        static const struct {
                const char *text;
                const char *message;
                int error;
        } cases[] = {
                { "[foo]\nx = 1\n", "%s:1: unknown section [foo]", -EINVAL },
                { "[hub]\n\n# c\n[foo]\n; c\nx = 1\n", "%s:4: unknown section [foo]", -EINVAL },
                { "[ mqtt ]\nport = 1\n", "%s:1: unknown section [ mqtt ]", -EINVAL },
                { "[MQTT]\nport = 1\n", "%s:1: unknown section [MQTT]", -EINVAL },
                { "\xEF\xBB\xBF[foo]\nx = 1\n", "%s:1: unknown section [foo]", -EINVAL },
                { "[foo]\ngarbage\nx = 1\n", "%s:1: unknown section [foo]", -EINVAL },
                { "[mqtt]\nbar = 1\n", "%s:2: unknown key 'bar' in [mqtt]", -EINVAL },
                { "[mqtt]\n{k*70} = 1\n", "%s:2: unknown key '{k*64}...' in [mqtt]", -EINVAL },
                { "[mqtt]\nb\x1b[2Jar = 1\n", "%s:2: section or key name contains a control character",
                  -EINVAL },
                { "[mq\x1btt]\nport = 1\n", "%s:2: section or key name contains a control character",
                  -EINVAL },
                { "[mqtt]\nPort = 1\n", "%s:2: unknown key 'Port' in [mqtt]", -EINVAL },
                { "[hub]\nport = 1\n", "%s:2: unknown key 'port' in [hub]", -EINVAL },
                { "[mqtt]\nport = 1\n\n[hub]\n[mqtt]\nport = 2\n",
                  "%s:6: [mqtt] port: set twice (first on line 2)", -EINVAL },
                { "[mqtt]\nport = 1\nport = 1\n", "%s:3: [mqtt] port: set twice (first on line 2)",
                  -EINVAL },
                { "[mqtt]\nport =\nport = 1\n", "%s:2: [mqtt] port: empty value", -EINVAL },
                { "x = 1\n[mqtt]\n", "%s:1: key 'x' is outside of any section", -EINVAL },
                { "# c\n\nx = 1\n", "%s:3: key 'x' is outside of any section", -EINVAL },
                { "[mqtt\nport = 1\n", "%s:1: syntax error, expected [section] or key = value", -EINVAL },
                { "[mqtt]\nport\n", "%s:2: syntax error, expected [section] or key = value", -EINVAL },
                { "[mqtt]\nport 1883\n", "%s:2: syntax error, expected [section] or key = value", -EINVAL },
                /* Whoever finds it, the first problem in the file is the one reported. */
                { "[mqtt]\nport = 0\nfoo\n", "%s:2: [mqtt] port: '0' is out of range 1..65535", -EINVAL },
                { "[mqtt]\nfoo\nport = 0\n", "%s:2: syntax error, expected [section] or key = value",
                  -EINVAL },
                { "garbage\n[foo]\nx = 1\n", "%s:1: syntax error, expected [section] or key = value",
                  -EINVAL },
                { "[mqtt]\nport = 0\n[foo]\nx = 1\n", "%s:2: [mqtt] port: '0' is out of range 1..65535",
                  -EINVAL },
                { "[mqtt]\nport = 0\n# {x*9000}\n", "%s:2: [mqtt] port: '0' is out of range 1..65535",
                  -EINVAL },
                { "[mqtt]\nfoo\n# {x*9000}\n", "%s:2: syntax error, expected [section] or key = value",
                  -EINVAL },
                /* inih would cut these lines in pieces and parse the rest as lines of their own. */
                { "[mqtt]\n#{x*8192}\n", "%s:2: line is longer than 8192 characters", -EINVAL },
                { "[hub]\nstate_dir = /{x*8200}\n", "%s:2: line is longer than 8192 characters", -EINVAL },
                { "[key]\nbackend = file\nfile = /k.pem\n[mqtt]\nport = 1\n\n[cloud]\nurl = "
                  "https://{x*8192}",
                  "%s:8: line is longer than 8192 characters", -EINVAL },
                /* Cross-key checks, with the line of the key at fault. */
                { "[key]\nfile = /etc/iothub/key.pem\n",
                  "%s:2: [key] file: set, but [key] backend is not 'file'", -EINVAL },
                { "[key]\nbackend = tpm\n\nfile = /k.pem\n",
                  "%s:4: [key] file: set, but [key] backend is not 'file'", -EINVAL },
                { "[key]\nfile = /k.pem\nbackend = tpm\n",
                  "%s:2: [key] file: set, but [key] backend is not 'file'", -EINVAL },
                { "[mqtt]\nport = 1\n[key]\nbackend = file\n",
                  "%s:4: [key] backend: 'file' needs [key] file, the PEM private key", -EINVAL },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_conf_ struct iothub_conf *c = NULL;
                _cleanup_free_ char *text = expand(cases[i].text), *message = expand(cases[i].message),
                                    *err = NULL, *path = NULL, *expected = NULL;
                int r;

                r = load(text, &c, &err, &path);
                expected = subst(message, path, NULL);
                if (r != cases[i].error || !streq_ptr(err, expected))
                        fail_msg("case %zu: r=%d\n got: %s\nwant: %s", i, r, err, expected);
                assert_null(c);
        }
}

/* Files that are fine, and read the way iothub.conf(5) says. */
static void test_structure_good(void **state) {
        static const struct {
                const char *text;
                const char *section, *key, *expected;
        } cases[] = {
                /* An indented key is a key: inih's continuation lines are off. */
                { "[mqtt]\nport = 1884\n    keepalive_s = 30\n", "mqtt", "keepalive_s", "30" },
                { "[mqtt]\nport = 1884\n    keepalive_s = 30\n", "mqtt", "port", "1884" },
                { "[mqtt]\r\nport = 1884\r\n", "mqtt", "port", "1884" },
                { "\xEF\xBB\xBF[mqtt]\nport = 1884\n", "mqtt", "port", "1884" },
                { "[mqtt]\nport = 1884", "mqtt", "port", "1884" }, /* no newline at the end */
                { "[mqtt]\nport = 1884 ; comment\n", "mqtt", "port", "1884" },
                { "[mqtt]\nhost = a\n[hub]\n[mqtt]\nport = 1884\n", "mqtt", "host", "a" },
                { "[mqtt]\n#{x*8191}\nport = 1884\n", "mqtt", "port", "1884" }, /* the longest line */
                { "[key]\nbackend = file\nfile = /k.pem\n", "key", "file", "/k.pem" },
                { "[key]\nfile = /k.pem\nbackend = file\n", "key", "backend", "file" },
                { "[key]\nbackend = tpm\n", "key", "file", "(unset)" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_conf_ struct iothub_conf *c = NULL;
                _cleanup_free_ char *text = expand(cases[i].text), *err = NULL, *v = NULL;
                int r;

                r = load(text, &c, &err, NULL);
                if (r < 0)
                        fail_msg("case %zu: %s", i, err);
                v = value_str(c, key_info_find(cases[i].section, cases[i].key));
                if (!streq(v, cases[i].expected))
                        fail_msg("case %zu: got '%s'", i, v);
        }
}

static void test_nul_byte(void **state) {
        static const char text[] = "[mqtt]\nhost = a\0b\n";
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_free_ char *err = NULL, *path = NULL, *expected = NULL;

        assert_int_equal(load_len(text, sizeof(text) - 1, &c, &err, &path), -EINVAL);
        assert_true(asprintf(&expected, "%s:2: line contains a NUL byte", path) > 0);
        assert_string_equal(err, expected);
        assert_null(c);
}

static void test_file_too_large(void **state) {
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_free_ char *text = NULL, *err = NULL, *path = NULL, *expected = NULL;
        size_t len = 1024 * 1024 + 1;

        text = malloc(len);
        assert_non_null(text);
        for (size_t i = 0; i < len; i += 64) {
                size_t n = len - i < 64 ? len - i : 64;
                memset(text + i, '#', n);
                text[i + n - 1] = '\n';
        }
        assert_int_equal(load_len(text, len, &c, &err, &path), -EFBIG);
        assert_true(asprintf(&expected, "%s: file is larger than 1048576 bytes", path) > 0);
        assert_string_equal(err, expected);
        assert_null(c);
}

/* StrictModes (util.h, "trusted"): a symlink, a FIFO (which must not block), a file others
 * can write, or one owned by another user is refused with a message naming it. */
static void test_untrusted_file(void **state) {
        _cleanup_free_ char *good = NULL, *link = NULL, *fifo = NULL;
        _cleanup_conf_ struct iothub_conf *c = NULL;
        char *err = NULL;
        FILE *f;

        assert_true(asprintf(&good, "%s/trusted.conf", tmpdir) > 0);
        assert_true(asprintf(&link, "%s/link.conf", tmpdir) > 0);
        assert_true(asprintf(&fifo, "%s/fifo.conf", tmpdir) > 0);
        f = fopen(good, "w");
        assert_non_null(f);
        fputs("[mqtt]\nport = 1883\n", f);
        fclose(f);
        assert_int_equal(chmod(good, 0644), 0);
        assert_int_equal(conf_load(good, &c, &err), 0);
        conf_free(c);
        c = NULL;

        assert_int_equal(symlink(good, link), 0);
        assert_int_equal(conf_load(link, &c, &err), -ELOOP);
        assert_non_null(strstr(err, "is a symbolic link"));
        assert_non_null(strstr(err, link));
        free(err);

        assert_int_equal(mkfifo(fifo, 0600), 0);
        assert_int_equal(conf_load(fifo, &c, &err), -EBADFD);
        assert_non_null(strstr(err, "not a regular file"));
        free(err);

        assert_int_equal(chmod(good, 0666), 0);
        assert_int_equal(conf_load(good, &c, &err), -EPERM);
        assert_non_null(strstr(err, "mode 0666, writable by group or others"));
        assert_non_null(strstr(err, good));
        free(err);
        assert_int_equal(chmod(good, 0620), 0);
        assert_int_equal(conf_load(good, &c, &err), -EPERM);
        free(err);

        if (geteuid() == 0) {
                assert_int_equal(chmod(good, 0644), 0);
                assert_int_equal(chown(good, 65534, 65534), 0);
                assert_int_equal(conf_load(good, &c, &err), -EPERM);
                assert_non_null(strstr(err, "is owned by uid 65534"));
                free(err);
        }
        assert_null(c);
        (void) unlink(good);
        (void) unlink(link);
        (void) unlink(fifo);
}

static void test_cannot_read(void **state) {
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_free_ char *err = NULL, *expected = NULL;

        assert_int_equal(conf_load("/nonexistent/iothub.conf", &c, &err), -ENOENT);
        assert_string_equal(err, "/nonexistent/iothub.conf: No such file or directory");
        assert_null(c);
        free(err);
        err = NULL;

        assert_int_equal(conf_load(tmpdir, &c, &err), -EISDIR);
        assert_true(asprintf(&expected, "%s: Is a directory", tmpdir) > 0);
        assert_string_equal(err, expected);
        assert_null(c);

        /* The message is optional. */
        assert_int_equal(conf_load("/nonexistent/iothub.conf", &c, NULL), -ENOENT);
        assert_int_equal(load("[mqtt]\nport = 0\n", &c, NULL, NULL), -EINVAL);
        assert_null(c);
}

/* NULL means the default file. Whether this machine has one is not ours to know. */
static void test_default_path(void **state) {
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_free_ char *err = NULL;

        if (conf_load(NULL, &c, &err) < 0)
                assert_true(strncmp(err, IOTHUB_DEFAULT_CONFIG ":", strlen(IOTHUB_DEFAULT_CONFIG ":")) == 0);
        else
                assert_string_equal(c->path, IOTHUB_DEFAULT_CONFIG);
}

static void test_machine_id(void **state) {
        static const struct {
                const char *content; /* of the machine-id file; NULL: no file */
                const char *mid; /* what conf_defaults() makes of it: NULL for nothing */
                const char *file_id; /* [hub] id in the file, or NULL */
                const char *id, *client_id, *message;
        } cases[] = {
                { MACHINE_ID "\n", MACHINE_ID, NULL, MACHINE_ID, "iothubd-" MACHINE_ID, NULL },
                { MACHINE_ID, MACHINE_ID, NULL, MACHINE_ID, "iothubd-" MACHINE_ID, NULL },
                { MACHINE_ID "  \n\n", MACHINE_ID, NULL, MACHINE_ID, "iothubd-" MACHINE_ID, NULL },
                { "0123456789ABCDEF0123456789ABCDEF\n", "0123456789ABCDEF0123456789ABCDEF", NULL,
                  "0123456789ABCDEF0123456789ABCDEF", "iothubd-0123456789ABCDEF0123456789ABCDEF", NULL },
                { "  " MACHINE_ID "\n", MACHINE_ID, NULL, MACHINE_ID, "iothubd-" MACHINE_ID, NULL },
                { "uninitialized\n", NULL, NULL, NULL, NULL,
                  "%s: [hub] id: not set, and %s holds no machine id" },
                { "", NULL, NULL, NULL, NULL, "%s: [hub] id: not set, and %s holds no machine id" },
                { MACHINE_ID "0\n", NULL, NULL, NULL, NULL,
                  "%s: [hub] id: not set, and %s holds no machine id" },
                { "0123456789abcdef0123456789abcdeg\n", NULL, NULL, NULL, NULL,
                  "%s: [hub] id: not set, and %s holds no machine id" },
                { "{0*200}\n", NULL, NULL, NULL, NULL, "%s: [hub] id: not set, and %s holds no machine id" },
                { NULL, NULL, NULL, NULL, NULL,
                  "%s: [hub] id: not set, and %s cannot be read: No such file or directory" },
                /* The file's id wins, and the default client id follows it. */
                { NULL, NULL, "hub-1", "hub-1", "iothubd-hub-1", NULL },
                { "uninitialized\n", NULL, "hub-1", "hub-1", "iothubd-hub-1", NULL },
                { MACHINE_ID "\n", MACHINE_ID, "hub-1", "hub-1", "iothubd-hub-1", NULL },
                /* Cut to the 64 characters of a client id. */
                { NULL, NULL, "{h*64}", "{h*64}", "iothubd-{h*56}", NULL },
                { NULL, NULL, "{h*56}", "{h*56}", "iothubd-{h*56}", NULL },
                { NULL, NULL, "{h*55}", "{h*55}", "iothubd-{h*55}", NULL },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_conf_ struct iothub_conf *c = NULL, *d = NULL;
                _cleanup_free_ char *text = NULL, *err = NULL, *path = NULL, *expected = NULL,
                                    *mid_client_id = NULL,
                                    *content = cases[i].content ? expand(cases[i].content) : NULL,
                                    *file_id = cases[i].file_id ? expand(cases[i].file_id) : NULL,
                                    *id = cases[i].id ? expand(cases[i].id) : NULL,
                                    *client_id = cases[i].client_id ? expand(cases[i].client_id) : NULL;
                int r;

                (void) unlink(machine_id_path);
                if (content)
                        write_all(machine_id_path, content, strlen(content));

                /* conf_defaults() never fails for the machine id: it leaves the id and client id unset. */
                assert_int_equal(conf_defaults(&d), 0);
                if (cases[i].mid) {
                        assert_true(asprintf(&mid_client_id, "iothubd-%s", cases[i].mid) > 0);
                        assert_string_equal(d->hub.id, cases[i].mid);
                        assert_string_equal(d->mqtt.client_id, mid_client_id);
                } else {
                        assert_null(d->hub.id);
                        assert_null(d->mqtt.client_id);
                }

                if (file_id)
                        assert_true(asprintf(&text, "[hub]\nid = %s\n", file_id) > 0);
                r = load(text ?: "", &c, &err, &path);
                if (cases[i].message) {
                        expected = subst(cases[i].message, path, machine_id_path);
                        assert_int_equal(r, -EINVAL);
                        assert_string_equal(err, expected);
                        assert_null(c);
                } else {
                        if (r < 0)
                                fail_msg("case %zu: %s", i, err);
                        assert_string_equal(c->hub.id, id);
                        assert_string_equal(c->mqtt.client_id, client_id);
                }
        }
}

/* The real /etc/machine-id, whatever this machine has: the id when it holds one, else nothing. */
static void test_machine_id_real(void **state) {
        _cleanup_conf_ struct iothub_conf *d = NULL;
        _cleanup_free_ char *content = NULL;
        char id[33] = "";

        conf_machine_id_path = "/etc/machine-id";
        assert_int_equal(conf_defaults(&d), 0);
        if (read_file_limited("/etc/machine-id", 128, &content, NULL) >= 0) {
                const char *s = content + strspn(content, " \t\n");
                size_t len = strlen(s);

                while (len > 0 && strchr(" \t\n", s[len - 1]))
                        len--;
                if (len == 32 && strspn(s, "0123456789abcdefABCDEF") >= 32)
                        memcpy(id, s, 32);
        }
        if (id[0] != '\0')
                assert_string_equal(d->hub.id, id);
        else
                assert_null(d->hub.id);
}

static void test_machine_id_file_wins(void **state) {
        _cleanup_conf_ struct iothub_conf *c = NULL;

        assert_int_equal(load("[hub]\nid = hub-1\n", &c, NULL, NULL), 0);
        assert_string_equal(c->hub.id, "hub-1");
        assert_string_equal(c->mqtt.client_id, "iothubd-hub-1");
        conf_free(c);
        c = NULL;

        /* An explicit client id is kept, whatever the hub id. */
        assert_int_equal(load("[mqtt]\nclient_id = mine\n[hub]\nid = hub-1\n", &c, NULL, NULL), 0);
        assert_string_equal(c->mqtt.client_id, "mine");
}

static void test_env_dirs(void **state) {
        static const struct {
                const char *state_env, *runtime_env; /* NULL: unset */
                const char *file;
                const char *state_dir, *runtime_dir;
        } cases[] = {
                { NULL, NULL, "", "/var/lib/iothub", "/run/iothub" },
                { "/srv/state", "/srv/run", "", "/srv/state", "/srv/run" },
                { "/srv/state:/srv/other", "/srv/run:/x:/y", "", "/srv/state", "/srv/run" },
                { "", "", "", "/var/lib/iothub", "/run/iothub" },
                { "/srv/state", NULL, "", "/srv/state", "/run/iothub" },
                { NULL, "/srv/run", "", "/var/lib/iothub", "/srv/run" },
                /* The file wins over the environment. */
                { "/srv/state", "/srv/run", "[hub]\nstate_dir = /a\nruntime_dir = /b\n", "/a", "/b" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_conf_ struct iothub_conf *c = NULL, *d = NULL;
                _cleanup_free_ char *err = NULL;

                unsetenv("STATE_DIRECTORY");
                unsetenv("RUNTIME_DIRECTORY");
                if (cases[i].state_env)
                        assert_int_equal(setenv("STATE_DIRECTORY", cases[i].state_env, 1), 0);
                if (cases[i].runtime_env)
                        assert_int_equal(setenv("RUNTIME_DIRECTORY", cases[i].runtime_env, 1), 0);

                if (cases[i].file[0] == '\0') {
                        assert_int_equal(conf_defaults(&d), 0);
                        assert_string_equal(d->hub.state_dir, cases[i].state_dir);
                        assert_string_equal(d->hub.runtime_dir, cases[i].runtime_dir);
                }
                if (load(cases[i].file, &c, &err, NULL) < 0)
                        fail_msg("case %zu: %s", i, err);
                assert_string_equal(c->hub.state_dir, cases[i].state_dir);
                assert_string_equal(c->hub.runtime_dir, cases[i].runtime_dir);
        }
}

static void test_env_dirs_bad(void **state) {
        static const struct {
                const char *name, *value, *message;
        } cases[] = {
                { "STATE_DIRECTORY", "var/lib/iothub",
                  "%s: $STATE_DIRECTORY: 'var/lib/iothub' is not an absolute path of at most 4096 "
                  "characters" },
                { "RUNTIME_DIRECTORY", "run:/run/iothub",
                  "%s: $RUNTIME_DIRECTORY: 'run:/run/iothub' is not an absolute path of at most 4096 "
                  "characters" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_conf_ struct iothub_conf *c = NULL, *d = NULL;
                _cleanup_free_ char *err = NULL, *path = NULL, *expected = NULL;

                unsetenv("STATE_DIRECTORY");
                unsetenv("RUNTIME_DIRECTORY");
                assert_int_equal(setenv(cases[i].name, cases[i].value, 1), 0);
                assert_int_equal(conf_defaults(&d), -EINVAL);
                assert_null(d);
                assert_int_equal(load("", &c, &err, &path), -EINVAL);
                expected = subst(cases[i].message, path, NULL);
                assert_string_equal(err, expected);
                assert_null(c);
        }
}

/* conf_load() changes libinih's process-wide settings only while it parses. */
/* [cloud] command_key_file: a trusted file holding a PEM P-256 public key (PROTOCOL.md 5). */
static char *pubkey_pem(const char *type) {
        EVP_PKEY *k = streq(type, "P-256") ? EVP_EC_gen("P-256") : EVP_PKEY_Q_keygen(NULL, NULL, type);
        BIO *b = BIO_new(BIO_s_mem());
        char *data = NULL, *out;
        long n;

        assert_non_null(k);
        assert_non_null(b);
        assert_int_equal(PEM_write_bio_PUBKEY(b, k), 1);
        n = BIO_get_mem_data(b, &data);
        assert_true(n > 0);
        out = strndup(data, (size_t) n);
        assert_non_null(out);
        BIO_free(b);
        EVP_PKEY_free(k);
        return out;
}

static void test_command_key(void **state) {
        _cleanup_free_ char *p256 = pubkey_pem("P-256"), *ed = pubkey_pem("ED25519");
        static const char junk[] = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        const struct {
                const char *content; /* NULL: no file */
                mode_t mode;
                const char *message; /* NULL: accepted; else after "<conf>:3: " */
        } cases[] = {
                { p256, 0644, NULL },
                { p256, 0600, NULL },
                { ed, 0644, "[cloud] command_key_file: %s is not a PEM P-256 public key (ES256)" },
                { junk, 0644, "[cloud] command_key_file: %s is not a PEM P-256 public key (ES256)" },
                { "", 0644, "[cloud] command_key_file: %s is not a PEM P-256 public key (ES256)" },
                { p256, 0666, "[cloud] command_key_file: " }, /* writable by others: refused */
                { NULL, 0, "[cloud] command_key_file: " },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_conf_ struct iothub_conf *c = NULL;
                _cleanup_free_ char *key = NULL, *text = NULL, *err = NULL, *path = NULL, *want = NULL;
                int r;

                assert_true(asprintf(&key, "%s/vendor-%zu.pem", tmpdir, i) > 0);
                if (cases[i].content) {
                        write_all(key, cases[i].content, strlen(cases[i].content));
                        assert_int_equal(chmod(key, cases[i].mode), 0);
                }
                assert_true(asprintf(&text, "[cloud]\nurl = https://cloud.example.com\ncommand_key_file = %s\n",
                                     key) > 0);
                r = load(text, &c, &err, &path);
                (void) unlink(key);
                if (!cases[i].message) {
                        if (r != 0)
                                fail_msg("case %zu: %s", i, err);
                        assert_string_equal(c->cloud.command_key_file, key);
                        continue;
                }
                assert_int_equal(r, -EINVAL);
                want = subst(cases[i].message, key, NULL);
                if (!err || strncmp(err, path, strlen(path)) != 0 || !strstr(err, ":3: ") ||
                    !strstr(err, want) || !strstr(err, key))
                        fail_msg("case %zu: got '%s', want '%s:3: %s...' naming %s", i, err, path, want, key);
        }
}

static void test_inih_settings_restored(void **state) {
        _cleanup_conf_ struct iothub_conf *c = NULL;
        bool multiline = ini_allow_multiline;
        int max_line = ini_max_line;

        assert_int_equal(load("[mqtt]\nport = 1884\n", &c, NULL, NULL), 0);
        assert_int_equal(ini_allow_multiline, multiline);
        assert_int_equal(ini_max_line, max_line);
}

static void test_to_string(void **state) {
        assert_string_equal(key_backend_to_string(KEY_BACKEND_TPM), "tpm");
        assert_string_equal(key_backend_to_string(KEY_BACKEND_FILE), "file");
        assert_null(key_backend_to_string((enum key_backend) 99));
        assert_string_equal(dpop_mode_to_string(DPOP_AUTO), "auto");
        assert_string_equal(dpop_mode_to_string(DPOP_ON), "on");
        assert_string_equal(dpop_mode_to_string(DPOP_OFF), "off");
        assert_string_equal(attest_mode_to_string(ATTEST_AUTO), "auto");
        assert_string_equal(attest_mode_to_string(ATTEST_ON), "on");
        assert_string_equal(attest_mode_to_string(ATTEST_OFF), "off");
        assert_null(dpop_mode_to_string((enum dpop_mode) 99));
        conf_free(NULL);
}

/* The shipped etc/iothub.conf: it loads to the defaults, lists every key in its section as "#key = ...",
 * and uncommenting every key that shows a value still gives the defaults. Run from the top directory, as
 * make unit does. */
static void test_shipped_file(void **state) {
        _cleanup_conf_ struct iothub_conf *c = NULL, *u = NULL;
        _cleanup_free_ char *text = NULL, *uncommented = NULL, *err = NULL, *d = NULL, *path = NULL;
        size_t len = 0, ulen = 0;
        bool seen[ELEMENTSOF(keys)] = {};
        char section[32] = "";
        FILE *f;

        if (access(SHIPPED_CONF, R_OK) < 0)
                skip();

        assert_int_equal(conf_load(SHIPPED_CONF, &c, &err), 0);
        d = dump(c);
        assert_string_equal(d, DEFAULTS_DUMP);
        free(d);
        d = NULL;

        assert_int_equal(read_file_limited(SHIPPED_CONF, 1024 * 1024, &text, &len), 0);
        f = open_memstream(&uncommented, &ulen);
        assert_non_null(f);
        for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
                char name[64], value[256] = "";

                if (sscanf(line, "[%31[^]]]", section) == 1) {
                        fprintf(f, "%s\n", line);
                        continue;
                }
                /* A key line: "#name = value" or "#name =", without a blank after '#'. */
                if (sscanf(line, "#%63[a-z_] = %255[^\n]", name, value) >= 1 && strstr(line, " =")) {
                        const struct key_info *k = key_info_find(section, name);
                        if (seen[k - keys])
                                fail_msg("[%s] %s is listed twice", section, name);
                        seen[k - keys] = true;
                        if (value[0] != '\0') {
                                fprintf(f, "%s = %s\n", name, value);
                                continue;
                        }
                }
                fprintf(f, "%s\n", line);
        }
        assert_int_equal(fclose(f), 0);
        for (size_t i = 0; i < ELEMENTSOF(keys); i++)
                if (!seen[i])
                        fail_msg("[%s] %s is missing from " SHIPPED_CONF, keys[i].section, keys[i].name);

        free(err);
        err = NULL;
        if (load(uncommented, &u, &err, &path) < 0)
                fail_msg("%s with every key uncommented: %s", SHIPPED_CONF, err);
        d = dump(u);
        assert_string_equal(d, DEFAULTS_DUMP);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup(test_defaults, setup),
                cmocka_unit_test_setup(test_defaults_empty_file, setup),
                cmocka_unit_test_setup(test_defaults_comments_only, setup),
                cmocka_unit_test_setup(test_full_file, setup),
                cmocka_unit_test_setup(test_good_values, setup),
                cmocka_unit_test_setup(test_bad_values, setup),
                cmocka_unit_test_setup(test_structure_errors, setup),
                cmocka_unit_test_setup(test_structure_good, setup),
                cmocka_unit_test_setup(test_nul_byte, setup),
                cmocka_unit_test_setup(test_file_too_large, setup),
                cmocka_unit_test_setup(test_cannot_read, setup),
                cmocka_unit_test_setup(test_untrusted_file, setup),
                cmocka_unit_test_setup(test_default_path, setup),
                cmocka_unit_test_setup(test_machine_id, setup),
                cmocka_unit_test_setup(test_machine_id_real, setup),
                cmocka_unit_test_setup(test_machine_id_file_wins, setup),
                cmocka_unit_test_setup(test_env_dirs, setup),
                cmocka_unit_test_setup(test_env_dirs_bad, setup),
                cmocka_unit_test_setup(test_command_key, setup),
                cmocka_unit_test_setup(test_inih_settings_restored, setup),
                cmocka_unit_test_setup(test_to_string, setup),
                cmocka_unit_test_setup(test_shipped_file, setup),
        };

        return cmocka_run_group_tests(tests, setup_group, teardown_group);
}
