/* SPDX-License-Identifier: MIT */
/* The configuration file (DESIGN.md "Configuration"). libinih reads the INI syntax; this file knows the
 * keys, their types, ranges and defaults, and turns the first problem into one line that names the file,
 * the line, the section and the key. Library code: it never prints. */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <strings.h>

#include <ini.h>

#include "conf-internal.h"
#include "iothub/conf.h"
#include "iothub/verify.h"

#define CONF_PATH_MAX 4096
/* Characters on one line, newline excluded: a 4096-character path and its key fit. */
#define CONF_LINE_MAX 8192
/* The whole file; a real one is a few KiB. Bounds what a wrong --config (a device, a log) costs. */
#define CONF_FILE_MAX (1024 * 1024)
/* Values are quoted in messages, but a 4 KiB path would drown the message. */
#define ECHO_MAX 64
#define ECHO(v) ECHO_MAX, (v), strlen(v) > ECHO_MAX ? "..." : ""

#define MACHINE_ID_LEN 32
#define CLIENT_ID_MAX 64
#define CLIENT_ID_PREFIX "iothubd-"

/* Not in conf.h on purpose: only the unit tests point it elsewhere, to cover both default paths. */
extern const char *conf_machine_id_path;
const char *conf_machine_id_path = "/etc/machine-id";

struct conf_key;

struct parse_ctx {
        const char *path;
        FILE *f;
        struct iothub_conf *conf;
        unsigned lineno; /* lines handed to inih so far, i.e. the line inih is working on */
        unsigned section_line; /* line of the last "[section]" header */
        uint64_t bytes;
        unsigned *key_line; /* per entry of conf_keys[]: line where it was set, 0 if not set */
        int error; /* first error, a negative errno, 0 if none yet */
        unsigned error_line;
        char *message;
};

typedef int (*conf_parse_t)(struct parse_ctx *ctx, const struct conf_key *k, const char *v);
typedef int (*conf_check_t)(struct parse_ctx *ctx, const struct conf_key *k, const char *v);

struct conf_key {
        const char *section;
        const char *name;
        conf_parse_t parse;
        size_t offset; /* of the member in struct iothub_conf */
        size_t size; /* of the member, for integers */
        uint64_t min; /* numbers: the range; strings: the length */
        uint64_t max;
        conf_check_t check; /* strings: more than the length */
};

static inline void fclosep(FILE **f) {
        if (*f)
                (void) fclose(*f);
}

static void *field(struct iothub_conf *c, const struct conf_key *k) {
        return (uint8_t *) c + k->offset;
}

/* Records the first error only: later ones are often consequences of it. Returns the recorded error. */
_printf_(4, 5) static int ctx_error(struct parse_ctx *ctx, int error, unsigned line, const char *format,
                                    ...) {
        _cleanup_free_ char *reason = NULL;
        va_list ap;
        int n;

        if (ctx->error < 0)
                return ctx->error;
        va_start(ap, format);
        n = vasprintf(&reason, format, ap);
        va_end(ap);
        ctx->error = error;
        ctx->error_line = line;
        if (n < 0) {
                reason = NULL;
                return ctx->error = -ENOMEM;
        }
        if (line > 0)
                n = asprintf(&ctx->message, "%s:%u: %s", ctx->path, line, reason);
        else
                n = asprintf(&ctx->message, "%s: %s", ctx->path, reason);
        if (n < 0) {
                ctx->message = NULL;
                return ctx->error = -ENOMEM;
        }
        return error;
}

_printf_(3, 4) static int key_error(struct parse_ctx *ctx, const struct conf_key *k, const char *format,
                                    ...) {
        _cleanup_free_ char *reason = NULL;
        va_list ap;
        int n;

        va_start(ap, format);
        n = vasprintf(&reason, format, ap);
        va_end(ap);
        if (n < 0)
                return ctx_error(ctx, -ENOMEM, ctx->lineno, "out of memory");
        return ctx_error(ctx, -EINVAL, ctx->lineno, "[%s] %s: %s", k->section, k->name, reason);
}

/* Strict decimal: digits only, so "+1", " 1", "1 ", "0x1" and "" are not numbers. 0, -EINVAL or
 * -ERANGE on overflow. */
static int parse_decimal(const char *v, uint64_t *ret) {
        unsigned long long u;
        char *end;

        if (v[0] < '0' || v[0] > '9')
                return -EINVAL;
        errno = 0;
        u = strtoull(v, &end, 10);
        if (errno == ERANGE)
                return -ERANGE;
        if (errno != 0 || *end != '\0')
                return -EINVAL;
        *ret = u;
        return 0;
}

static bool is_negative_decimal(const char *v) {
        return v[0] == '-' && v[1] != '\0' && strspn(v + 1, "0123456789") == strlen(v + 1);
}

static int store_uint(struct parse_ctx *ctx, const struct conf_key *k, uint64_t u) {
        switch (k->size) {
        case sizeof(uint16_t):
                *(uint16_t *) field(ctx->conf, k) = (uint16_t) u;
                return 0;
        case sizeof(uint32_t):
                *(uint32_t *) field(ctx->conf, k) = (uint32_t) u;
                return 0;
        case sizeof(uint64_t):
                *(uint64_t *) field(ctx->conf, k) = u;
                return 0;
        }
        return ctx_error(ctx, -EINVAL, ctx->lineno, "internal error: [%s] %s has no integer size",
                         k->section, k->name);
}

static int parse_uint(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        uint64_t u = 0;
        int r;

        r = parse_decimal(v, &u);
        /* "-1" is a number, just a negative one: say what is wrong with it. */
        if (r == -ERANGE || (r == 0 && (u < k->min || u > k->max)) ||
            (r == -EINVAL && is_negative_decimal(v)))
                return key_error(ctx, k, "'%.*s%s' is out of range %" PRIu64 "..%" PRIu64, ECHO(v), k->min,
                                 k->max);
        if (r < 0)
                return key_error(ctx, k, "'%.*s%s' is not a decimal number", ECHO(v));
        return store_uint(ctx, k, u);
}

/* A TPM persistent handle: written in hex by everyone (tpm2_evictcontrol prints 0x81010001), so "0x" is
 * accepted here, and only here. */
static int parse_handle(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        unsigned long long u = 0;
        bool hex = (v[0] == '0' && (v[1] == 'x' || v[1] == 'X'));
        const char *digits = hex ? v + 2 : v;
        char *end;

        /* strtoull() would also skip blanks, take a sign and, in base 16, a second "0x". */
        if (digits[0] == '\0' ||
            strspn(digits, hex ? "0123456789abcdefABCDEF" : "0123456789") != strlen(digits))
                goto bad;
        errno = 0;
        u = strtoull(digits, &end, hex ? 16 : 10);
        if (errno == ERANGE)
                goto range;
        if (errno != 0 || *end != '\0')
                goto bad;
        if (u < k->min || u > k->max || !tpm_owner_persistent_handle_is_valid(u))
                goto range;
        return store_uint(ctx, k, u);
bad:
        if (is_negative_decimal(v))
                goto range;
        return key_error(ctx, k, "'%.*s%s' is not a number (decimal, or hexadecimal with 0x)", ECHO(v));
range:
        return key_error(ctx, k, "'%.*s%s' is out of range 0x%08" PRIx64 "..0x%08" PRIx64, ECHO(v), k->min,
                         k->max);
}

/* frames.rate_per_device: a plain decimal fraction ("5", "0.5", "1e2"). strtod alone would also take
 * "nan", "inf", "0x1p3", " 5" and "+5", and would follow the locale's decimal point. */
static int parse_rate(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        static const double min = 0.01, max = 1000;
        bool digit = false, exponent = false, negative = (v[0] == '-');
        const char *start = negative ? v + 1 : v;
        locale_t c_locale;
        char *end;
        double d;
        int saved_errno;

        for (const char *p = start; *p; p++) {
                if (isdigit((unsigned char) *p))
                        digit = true;
                else if ((*p == 'e' || *p == 'E') && digit && !exponent)
                        exponent = true;
                else if ((*p == '+' || *p == '-') && p > start && (p[-1] == 'e' || p[-1] == 'E'))
                        continue;
                else if (*p == '.' && !exponent)
                        continue;
                else
                        goto bad;
        }
        if (!digit)
                goto bad;

        c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t) 0);
        if (c_locale == (locale_t) 0)
                return ctx_error(ctx, -ENOMEM, ctx->lineno, "out of memory");
        errno = 0;
        d = strtod_l(v, &end, c_locale);
        saved_errno = errno;
        freelocale(c_locale);
        if (*end != '\0' || end == v)
                goto bad;
        /* ERANGE: "1e999" overflows, "1e-999" underflows; both are outside the range anyway. */
        if (negative || saved_errno == ERANGE || !isfinite(d) || d < min || d > max)
                return key_error(ctx, k, "'%.*s%s' is out of range 0.01..1000", ECHO(v));
        *(double *) field(ctx->conf, k) = d;
        return 0;
bad:
        return key_error(ctx, k, "'%.*s%s' is not a decimal number", ECHO(v));
}

/* Sizes are printed as they are written in the file: with the largest suffix that divides them. */
static const char *size_suffix(uint64_t *u) {
        static const char *const suffixes[] = { "G", "M", "K" };

        for (size_t i = 0; i < ELEMENTSOF(suffixes); i++) {
                uint64_t unit = UINT64_C(1) << (10 * (ELEMENTSOF(suffixes) - i));
                if (*u >= unit && *u % unit == 0) {
                        *u /= unit;
                        return suffixes[i];
                }
        }
        return "";
}

/* Bytes, with an optional K, M or G suffix for KiB, MiB, GiB. */
static int parse_size(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        bool negative = v[0] == '-'; /* a size all the same, just out of range */
        const char *digits = negative ? v + 1 : v, *min_suffix, *max_suffix;
        size_t n = strspn(digits, "0123456789");
        uint64_t unit = 1, min = k->min, max = k->max;
        unsigned long long u;
        char *end;

        if (n == 0)
                goto bad;
        if (digits[n] != '\0') {
                const char *s = strchr("KMG", digits[n]);
                if (!s || digits[n + 1] != '\0')
                        goto bad;
                unit = UINT64_C(1) << (10 * (s - "KMG" + 1));
        }
        errno = 0;
        u = strtoull(digits, &end, 10);
        if (end != digits + n || (errno != 0 && errno != ERANGE))
                goto bad;
        if (negative || errno == ERANGE || u > UINT64_MAX / unit || u * unit < k->min || u * unit > k->max)
                goto range;
        return store_uint(ctx, k, u * unit);
bad:
        return key_error(ctx, k, "'%.*s%s' is not a size (a number with an optional K, M or G suffix)",
                         ECHO(v));
range:
        min_suffix = size_suffix(&min);
        max_suffix = size_suffix(&max);
        return key_error(ctx, k, "'%.*s%s' is out of range %" PRIu64 "%s..%" PRIu64 "%s", ECHO(v), min,
                         min_suffix, max, max_suffix);
}

static int parse_string(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        size_t len = strlen(v);
        int r;

        if (len < k->min || len > k->max)
                return key_error(ctx, k, "value is too long (%zu characters, at most %" PRIu64 ")", len,
                                 k->max);
        if (k->check) {
                r = k->check(ctx, k, v);
                if (r < 0)
                        return r;
        }
        if (free_and_strdup(field(ctx->conf, k), v) < 0)
                return ctx_error(ctx, -ENOMEM, ctx->lineno, "out of memory");
        return 0;
}

static int parse_path(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        size_t len = strlen(v);

        if (v[0] != '/')
                return key_error(ctx, k, "'%.*s%s' is not an absolute path", ECHO(v));
        if (len > CONF_PATH_MAX)
                return key_error(ctx, k, "path is too long (%zu characters, at most %d)", len,
                                 CONF_PATH_MAX);
        if (free_and_strdup(field(ctx->conf, k), v) < 0)
                return ctx_error(ctx, -ENOMEM, ctx->lineno, "out of memory");
        return 0;
}

static int parse_backend(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        enum key_backend b;

        if (streq(v, "tpm"))
                b = KEY_BACKEND_TPM;
        else if (streq(v, "file"))
                b = KEY_BACKEND_FILE;
        else
                return key_error(ctx, k, "'%.*s%s' is not one of tpm, file", ECHO(v));
        *(enum key_backend *) field(ctx->conf, k) = b;
        return 0;
}

static int parse_onoff(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        bool b;

        if (streq(v, "on"))
                b = true;
        else if (streq(v, "off"))
                b = false;
        else
                return key_error(ctx, k, "'%.*s%s' is not one of on, off", ECHO(v));
        *(bool *) field(ctx->conf, k) = b;
        return 0;
}

static int parse_dpop(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        enum dpop_mode m;

        if (streq(v, "auto"))
                m = DPOP_AUTO;
        else if (streq(v, "on"))
                m = DPOP_ON;
        else if (streq(v, "off"))
                m = DPOP_OFF;
        else
                return key_error(ctx, k, "'%.*s%s' is not one of auto, on, off", ECHO(v));
        *(enum dpop_mode *) field(ctx->conf, k) = m;
        return 0;
}

static int check_hub_id(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        if (!device_id_is_valid(v, strlen(v)))
                return key_error(
                        ctx, k,
                        "'%.*s%s' is not a valid id (1..64 of A-Z a-z 0-9 . _ -, not starting with '.')",
                        ECHO(v));
        return 0;
}

static int check_no_space(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        if (strchr(v, ' '))
                return key_error(ctx, k, "'%.*s%s' contains a space", ECHO(v));
        return 0;
}

/* The prefix is joined with "/<device-id>/status" into a topic that bulbs publish to and the hub
 * subscribes to (PROTOCOL.md 1), so it must be a plain topic name: MQTT 3.1.1 4.7 reserves + and #. */
static int check_topic_prefix(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        size_t len = strlen(v);

        if (strpbrk(v, "+#"))
                return key_error(ctx, k, "'%.*s%s' contains an MQTT wildcard ('+' or '#')", ECHO(v));
        if (v[0] == '/' || v[len - 1] == '/')
                return key_error(ctx, k, "'%.*s%s' starts or ends with '/'", ECHO(v));
        if (strstr(v, "//"))
                return key_error(ctx, k, "'%.*s%s' has an empty level ('//')", ECHO(v));
        return 0;
}

static int check_client_id(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        static const char allowed[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";

        if (strspn(v, allowed) != strlen(v))
                return key_error(ctx, k, "'%.*s%s' may only contain A-Z a-z 0-9 . _ -", ECHO(v));
        return 0;
}

/* PROTOCOL.md 3: HTTPS only. The scheme is compared as written, lower case, because the OAuth issuer is
 * compared byte for byte with the server's metadata (RFC 8414 3.3). */
static int check_https_url(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        if (strncasecmp(v, "http://", 7) == 0)
                return key_error(ctx, k, "plain http is not allowed, use https://");
        if (strncmp(v, "https://", 8) != 0)
                return key_error(ctx, k, "'%.*s%s' does not start with https://", ECHO(v));
        if (strchr(v, ' '))
                return key_error(ctx, k, "'%.*s%s' contains whitespace", ECHO(v));
        if (strchr("/?#", v[8]))
                return key_error(ctx, k, "'%.*s%s' has no host", ECHO(v));
        return 0;
}

/* A user name as useradd(8) takes them (and a uid, all digits): resolved by the signer. */
static int check_user_name(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        static const char allowed[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";

        if (strspn(v, allowed) != strlen(v) || v[0] == '-' || v[0] == '.')
                return key_error(ctx, k, "'%.*s%s' is not a user name (A-Z a-z 0-9 . _ -, not starting with - or .)",
                                 ECHO(v));
        return 0;
}

/* RFC 6749 A.1: client-id = *VSCHAR, printable ASCII. */
static int check_oauth_client_id(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        for (const char *p = v; *p; p++)
                if (*p < 0x20 || *p > 0x7e)
                        return key_error(ctx, k, "'%.*s%s' contains a character that is not printable ASCII",
                                         ECHO(v));
        return 0;
}

/* RFC 6749 3.3: scope tokens of %x21 / %x23-5B / %x5D-7E, separated by single spaces. */
static int check_scope(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        for (const char *p = v; *p; p++) {
                bool nqchar = *p >= 0x21 && *p <= 0x7e && *p != '"' && *p != '\\';
                if (!nqchar && !(*p == ' ' && p > v && p[-1] != ' ' && p[1] != '\0'))
                        return key_error(
                                ctx, k,
                                "'%.*s%s' is not a list of scope tokens (RFC 6749 3.3) separated by "
                                "single spaces",
                                ECHO(v));
        }
        return 0;
}

#define MEMBER_SIZE(m) sizeof(((struct iothub_conf *) 0)->m)
#define KEY_STRING(s, n, m, lo, hi, chk)                                                                    \
        { s, n, parse_string, offsetof(struct iothub_conf, m), 0, lo, hi, chk }
#define KEY_PATH(s, n, m)                                                                                   \
        { s, n, parse_path, offsetof(struct iothub_conf, m), 0, 1, CONF_PATH_MAX, NULL }
#define KEY_UINT(s, n, m, lo, hi)                                                                           \
        { s, n, parse_uint, offsetof(struct iothub_conf, m), MEMBER_SIZE(m), lo, hi, NULL }
#define KEY_OTHER(s, n, m, p, lo, hi)                                                                       \
        { s, n, p, offsetof(struct iothub_conf, m), MEMBER_SIZE(m), lo, hi, NULL }

#define KIB UINT64_C(1024)
#define MIB (1024 * KIB)
#define GIB (1024 * MIB)

/* Every key of DESIGN.md "Configuration". etc/iothub.conf and man/iothub.conf.5.scd list the same. */
static int parse_attestation(struct parse_ctx *ctx, const struct conf_key *k, const char *v) {
        enum attest_mode m;

        if (streq(v, "auto"))
                m = ATTEST_AUTO;
        else if (streq(v, "on"))
                m = ATTEST_ON;
        else if (streq(v, "off"))
                m = ATTEST_OFF;
        else
                return key_error(ctx, k, "'%.*s%s' is not one of auto, on, off", ECHO(v));
        *(enum attest_mode *) field(ctx->conf, k) = m;
        return 0;
}

static const struct conf_key conf_keys[] = {
        KEY_STRING("hub", "id", hub.id, 1, DEVICE_ID_MAX, check_hub_id),
        KEY_PATH("hub", "state_dir", hub.state_dir),
        KEY_PATH("hub", "runtime_dir", hub.runtime_dir),

        KEY_STRING("mqtt", "host", mqtt.host, 1, 253, check_no_space),
        KEY_UINT("mqtt", "port", mqtt.port, 1, 65535),
        KEY_STRING("mqtt", "topic_prefix", mqtt.topic_prefix, 1, 128, check_topic_prefix),
        KEY_STRING("mqtt", "client_id", mqtt.client_id, 1, CLIENT_ID_MAX, check_client_id),
        KEY_STRING("mqtt", "username", mqtt.username, 1, 256, NULL),
        KEY_PATH("mqtt", "password_file", mqtt.password_file),
        KEY_PATH("mqtt", "ca_file", mqtt.ca_file),
        KEY_UINT("mqtt", "keepalive_s", mqtt.keepalive_s, 5, 3600),

        KEY_OTHER("key", "backend", key.backend, parse_backend, 0, 0),
        KEY_STRING("key", "tcti", key.tcti, 1, 256, NULL),
        KEY_OTHER("key", "handle", key.handle, parse_handle, TPM_OWNER_PERSISTENT_FIRST, TPM_OWNER_PERSISTENT_LAST),
        KEY_PATH("key", "file", key.file),

        KEY_STRING("cloud", "url", cloud.url, 1, 2048, check_https_url),
        KEY_PATH("cloud", "ca_file", cloud.ca_file),
        KEY_UINT("cloud", "batch_max_frames", cloud.batch_max_frames, 1, 4096),
        KEY_UINT("cloud", "batch_max_delay_ms", cloud.batch_max_delay_ms, 10, 600000),
        KEY_UINT("cloud", "timeout_s", cloud.timeout_s, 1, 300),
        KEY_PATH("cloud", "bearer_token_file", cloud.bearer_token_file),
        KEY_OTHER("cloud", "attestation", cloud.attestation, parse_attestation, 0, 0),
        KEY_PATH("cloud", "command_key_file", cloud.command_key_file),
        KEY_UINT("cloud", "events_interval_s", cloud.events_interval_s, 1, 3600),

        KEY_STRING("oauth", "issuer", oauth.issuer, 1, 2048, check_https_url),
        KEY_STRING("oauth", "client_id", oauth.client_id, 1, 256, check_oauth_client_id),
        KEY_STRING("oauth", "scope", oauth.scope, 1, 1024, check_scope),
        KEY_OTHER("oauth", "dpop", oauth.dpop, parse_dpop, 0, 0),
        KEY_PATH("oauth", "ca_file", oauth.ca_file),

        KEY_UINT("frames", "max_bytes", frames.max_bytes, 256, 65536),
        KEY_UINT("frames", "max_clock_skew_s", frames.max_clock_skew_s, 1, 86400),
        KEY_UINT("frames", "commit_delay_ms", frames.commit_delay_ms, 0, 1000),
        KEY_OTHER("frames", "rate_per_device", frames.rate_per_device, parse_rate, 0, 0),

        KEY_PATH("bulbs", "ca_file", bulbs.ca_file),

        KEY_OTHER("broker", "dynsec", broker.dynsec, parse_onoff, 0, 0),
        KEY_UINT("broker", "timeout_s", broker.timeout_s, 1, 60),

        KEY_OTHER("spool", "max_bytes", spool.max_bytes, parse_size, 64 * KIB, 64 * GIB),

        KEY_PATH("signer", "socket", signer.socket),
        KEY_STRING("signer", "client_user", signer.client_user, 1, 32, check_user_name),
        KEY_STRING("signer", "command_user", signer.command_user, 1, 32, check_user_name),
        KEY_PATH("signer", "state_dir", signer.state_dir),
        KEY_UINT("signer", "rate_per_s", signer.rate_per_s, 1, 10000),
        KEY_UINT("signer", "burst", signer.burst, 1, 100000),
        KEY_PATH("uplink", "socket", uplink.socket),
        KEY_STRING("uplink", "client_user", uplink.client_user, 1, 32, check_user_name),
};

static const struct conf_key *conf_key_find(const char *section, const char *name) {
        for (size_t i = 0; i < ELEMENTSOF(conf_keys); i++)
                if (streq(conf_keys[i].section, section) && streq(conf_keys[i].name, name))
                        return &conf_keys[i];
        return NULL;
}

static bool conf_section_is_known(const char *section) {
        for (size_t i = 0; i < ELEMENTSOF(conf_keys); i++)
                if (streq(conf_keys[i].section, section))
                        return true;
        return false;
}

static unsigned *conf_key_line(struct parse_ctx *ctx, const char *section, const char *name) {
        const struct conf_key *k = conf_key_find(section, name);

        return k ? &ctx->key_line[k - conf_keys] : NULL;
}

/* Names and values are echoed in messages that end up on a terminal: no escape sequences. */
static bool has_control(const char *s) {
        for (; *s; s++)
                if ((unsigned char) *s < 0x20 || *s == 0x7f)
                        return true;
        return false;
}

static int conf_handler(void *userdata, const char *section, const char *name, const char *value) {
        struct parse_ctx *ctx = userdata;
        const struct conf_key *k;
        unsigned *line;

        /* Only the first error is reported; inih remembers its line for us. */
        if (ctx->error < 0)
                return 1;
        if (!value) /* only with INI_ALLOW_NO_VALUE, which conf_load() switches off */
                value = "";
        if (has_control(section) || has_control(name)) {
                (void) ctx_error(ctx, -EINVAL, ctx->lineno,
                                 "section or key name contains a control character");
                return 0;
        }
        if (section[0] == '\0') {
                (void) ctx_error(ctx, -EINVAL, ctx->lineno, "key '%.*s%s' is outside of any section",
                                 ECHO(name));
                return 0;
        }
        if (!conf_section_is_known(section)) {
                (void) ctx_error(ctx, -EINVAL, ctx->section_line ?: ctx->lineno, "unknown section [%.*s%s]",
                                 ECHO(section));
                return 0;
        }
        k = conf_key_find(section, name);
        if (!k) {
                (void) ctx_error(ctx, -EINVAL, ctx->lineno, "unknown key '%.*s%s' in [%s]", ECHO(name),
                                 section);
                return 0;
        }
        line = &ctx->key_line[k - conf_keys];
        if (*line > 0) {
                (void) key_error(ctx, k, "set twice (first on line %u)", *line);
                return 0;
        }
        *line = ctx->lineno;

        if (value[0] == '\0') {
                (void) key_error(ctx, k, "empty value");
                return 0;
        }
        if (has_control(value)) {
                (void) key_error(ctx, k, "value contains a control character");
                return 0;
        }
        if (k->parse(ctx, k, value) < 0) {
                /* inih keeps quotes; a quoted value is the likeliest reason a good-looking value fails. */
                if ((value[0] == '"' || value[0] == '\'') && ctx->message && ctx->error == -EINVAL) {
                        char *m = NULL;
                        if (asprintf(&m, "%s (quotes are part of the value)", ctx->message) >= 0) {
                                free(ctx->message);
                                ctx->message = m;
                        }
                }
                return 0;
        }
        return 1;
}

/* Only to put "unknown section" on the header's line rather than on its first key, as inih calls no
 * handler for headers. With continuation lines off, a line whose first non-blank is '[' is a header (or
 * a syntax error that inih reports itself). */
static bool line_is_section_header(const char *line, unsigned lineno) {
        if (lineno == 1 && strncmp(line, "\xEF\xBB\xBF", 3) == 0) /* inih skips a UTF-8 BOM */
                line += 3;
        while (isspace((unsigned char) *line))
                line++;
        return *line == '[';
}

/* inih's fgets-like reader. It counts lines, so that the handler knows the line of each key (Debian's
 * libinih passes none), and it refuses what inih would silently mangle: a line longer than the buffer
 * (inih parses the rest as a line of its own) and a NUL byte (which cuts a value short). */
static char *conf_reader(char *buf, int size, void *stream) {
        struct parse_ctx *ctx = stream;
        size_t n = 0;
        int c = EOF;

        if (ctx->error < 0 || size < 2)
                return NULL;
        while ((c = getc(ctx->f)) != EOF) {
                if (++ctx->bytes > CONF_FILE_MAX) {
                        (void) ctx_error(ctx, -EFBIG, 0, "file is larger than %d bytes", CONF_FILE_MAX);
                        return NULL;
                }
                if (c == '\0') {
                        (void) ctx_error(ctx, -EINVAL, ctx->lineno + 1, "line contains a NUL byte");
                        return NULL;
                }
                if (c == '\n') {
                        buf[n++] = '\n';
                        break;
                }
                if (n >= (size_t) size - 2) {
                        (void) ctx_error(ctx, -EINVAL, ctx->lineno + 1, "line is longer than %d characters",
                                         size - 2);
                        return NULL;
                }
                buf[n++] = (char) c;
        }
        if (c == EOF && ferror(ctx->f)) {
                int r = errno > 0 ? -errno : -EIO;
                (void) ctx_error(ctx, r, 0, "%s", strerror(-r));
                return NULL;
        }
        if (n == 0)
                return NULL;
        buf[n] = '\0';
        ctx->lineno++;
        if (line_is_section_header(buf, ctx->lineno))
                ctx->section_line = ctx->lineno;
        return buf;
}

/* libinih's behaviour is set by process-wide variables in Debian's build. Pin the ones that matter and
 * put them back afterwards (the daemon is single-threaded; nothing else parses INI meanwhile). */
struct ini_settings {
        bool allow_multiline;
        bool allow_inline_comments;
        bool allow_no_value;
        bool use_stack;
        bool stop_on_first_error;
        int max_line;
};

static void ini_settings_save(struct ini_settings *s) {
        *s = (struct ini_settings){
                .allow_multiline = ini_allow_multiline,
                .allow_inline_comments = ini_allow_inline_comments,
                .allow_no_value = ini_allow_no_value,
                .use_stack = ini_use_stack,
                .stop_on_first_error = ini_stop_on_first_error,
                .max_line = ini_max_line,
        };
}

static void ini_settings_restore(const struct ini_settings *s) {
        ini_allow_multiline = s->allow_multiline;
        ini_allow_inline_comments = s->allow_inline_comments;
        ini_allow_no_value = s->allow_no_value;
        ini_use_stack = s->use_stack;
        ini_stop_on_first_error = s->stop_on_first_error;
        ini_max_line = s->max_line;
}

static void ini_settings_pin(void) {
        /* Continuation lines would turn an indented "key = value" into more text for the key above. */
        ini_allow_multiline = false;
        /* "key = value ; comment", as documented in iothub.conf(5). */
        ini_allow_inline_comments = true;
        ini_allow_no_value = false;
        /* The line buffer is then a stack array of ini_max_line bytes: room for the line, '\n', NUL. */
        ini_use_stack = true;
        ini_stop_on_first_error = false;
        ini_max_line = CONF_LINE_MAX + 2;
}

/* /etc/machine-id: 32 hex digits and a newline (machine-id(5)); blanks around them do no harm. Anything
 * else ("uninitialized" on a first boot, an empty file in a fresh image) is no id. Returns 0, -ENOMEM,
 * -EBADMSG or the error of reading it. */
static int read_machine_id(const char *path, char **ret) {
        _cleanup_free_ char *s = NULL;
        const char *start;
        char *id;
        size_t len = 0;
        int r;

        r = read_file_limited(path, 128, &s, &len);
        if (r < 0)
                return r == -EFBIG ? -EBADMSG : r;
        while (len > 0 && isspace((unsigned char) s[len - 1]))
                s[--len] = '\0';
        start = s + strspn(s, " \t\n\r\f\v");
        len -= (size_t) (start - s);
        if (len != MACHINE_ID_LEN || strspn(start, "0123456789abcdefABCDEF") != len)
                return -EBADMSG;
        id = strdup(start);
        if (!id)
                return -ENOMEM;
        *ret = id;
        return 0;
}

/* $STATE_DIRECTORY and $RUNTIME_DIRECTORY, set by systemd for StateDirectory= and RuntimeDirectory=:
 * colon-separated when the unit names several; ours is the first. */
static int dir_from_env(const char *name, const char *fallback, char **ret, char **ret_error) {
        const char *e = secure_getenv(name);
        char *s;
        size_t len;

        if (!e || e[0] == '\0') {
                s = strdup(fallback);
                if (!s)
                        return -ENOMEM;
                *ret = s;
                return 0;
        }
        len = strcspn(e, ":");
        if (e[0] != '/' || len > CONF_PATH_MAX) {
                if (ret_error &&
                    asprintf(ret_error, "$%s: '%.*s%s' is not an absolute path of at most %d characters",
                             name, ECHO(e), CONF_PATH_MAX) < 0)
                        *ret_error = NULL;
                return -EINVAL;
        }
        s = strndup(e, len);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

/* "iothubd-<hub id>", cut to the client id limit: only one hub talks to a home broker, so a shortened id
 * cannot collide there. */
static int client_id_from_hub_id(const char *id, char **ret) {
        char *s;

        if (asprintf(&s, CLIENT_ID_PREFIX "%s", id) < 0)
                return -ENOMEM;
        if (strlen(s) > CLIENT_ID_MAX)
                s[CLIENT_ID_MAX] = '\0';
        *ret = s;
        return 0;
}

static int conf_new_defaults(struct iothub_conf **ret, int *ret_machine_id_error, char **ret_error) {
        _cleanup_conf_ struct iothub_conf *c = NULL;
        int r, machine_id_error;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;

        machine_id_error = read_machine_id(conf_machine_id_path, &c->hub.id);
        if (machine_id_error == -ENOMEM)
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees c */
                return -ENOMEM;
        r = dir_from_env("STATE_DIRECTORY", "/var/lib/iothub", &c->hub.state_dir, ret_error);
        if (r < 0)
                return r;
        r = dir_from_env("RUNTIME_DIRECTORY", "/run/iothub", &c->hub.runtime_dir, ret_error);
        if (r < 0)
                return r;

        c->mqtt.port = 1883;
        c->mqtt.keepalive_s = 60;
        c->key.backend = KEY_BACKEND_TPM;
        c->key.handle = 0x81000101;
        c->cloud.batch_max_frames = 256;
        c->cloud.batch_max_delay_ms = 2000;
        c->cloud.timeout_s = 30;
        c->cloud.events_interval_s = 60;
        c->oauth.dpop = DPOP_AUTO;
        c->cloud.attestation = ATTEST_AUTO;
        c->frames.max_bytes = 4096;
        c->frames.max_clock_skew_s = 300;
        c->frames.commit_delay_ms = 50; /* ingest.c and iothub.conf(5) say why */
        c->frames.rate_per_device = 5;
        c->spool.max_bytes = 256 * MIB;
        c->broker.timeout_s = 5;
        c->signer.rate_per_s = 50;
        c->signer.burst = 100;

        c->mqtt.host = strdup("127.0.0.1");
        c->mqtt.topic_prefix = strdup("iothub/v1/bulbs");
        c->key.tcti = strdup("device:/dev/tpmrm0");
        c->oauth.scope = strdup("offline_access");
        /* [signer] state_dir: not $STATE_DIRECTORY here, that is the directory of whichever unit
         * reads the file (iothubd's too); the signer prefers it when the file does not set one. */
        c->signer.socket = strdup("/run/iothub-signer/signer.sock");
        /* The installed system's users (issue 14 stage 2): the uplink signs the cloud's requests,
         * iothubd the bulbs' commands. */
        c->signer.client_user = strdup("iothub-uplink");
        c->signer.command_user = strdup("iothub");
        c->signer.state_dir = strdup("/var/lib/iothub-signer");
        c->uplink.socket = strdup("/run/iothub-uplink/uplink.sock");
        c->uplink.client_user = strdup("iothub");
        if (!c->mqtt.host || !c->mqtt.topic_prefix || !c->key.tcti || !c->oauth.scope || !c->signer.socket ||
            !c->signer.client_user || !c->signer.command_user || !c->signer.state_dir || !c->uplink.socket ||
            !c->uplink.client_user)
                return -ENOMEM;
        if (c->hub.id && client_id_from_hub_id(c->hub.id, &c->mqtt.client_id) < 0)
                return -ENOMEM;

        *ret = TAKE_PTR(c);
        if (ret_machine_id_error)
                *ret_machine_id_error = machine_id_error;
        return 0;
}

int conf_defaults(struct iothub_conf **ret) {
        return conf_new_defaults(ret, NULL, NULL);
}

/* The vendor's command key (PROTOCOL.md 5): whoever can replace it can command every bulb, so it
 * is read like the configuration itself (a trusted file), and it must be a P-256 public key, the
 * key of ES256. On failure *ret_why is a malloc'ed reason naming the file. */
static int check_command_key(const char *path, char **ret_why) {
        _cleanup_(verify_key_freep) struct verify_key *k = NULL;
        _cleanup_free_ char *pem = NULL, *why = NULL;
        enum frame_alg alg;
        size_t len = 0;
        int r;

        r = read_trusted_file(path, 0, 64 * 1024, &pem, &len, &why);
        if (r < 0) {
                if (!why && asprintf(&why, "%s: %s", path, strerror(-r)) < 0)
                        why = NULL;
                *ret_why = TAKE_PTR(why);
                return r;
        }
        r = verify_key_from_pem(pem, len, &k, &alg);
        if (r >= 0 && alg != FRAME_ALG_ES256)
                r = -EOPNOTSUPP;
        if (r < 0) {
                if (asprintf(&why, "%s is not a PEM P-256 public key (ES256)", path) < 0)
                        why = NULL;
                *ret_why = TAKE_PTR(why);
                return r == -ENOMEM ? r : -EINVAL;
        }
        return 0;
}

/* What no single key can check, once the whole file is read. */
static int conf_check(struct parse_ctx *ctx, int machine_id_error) {
        struct iothub_conf *c = ctx->conf;
        _cleanup_free_ char *why = NULL;
        int r;
        unsigned *file_line = conf_key_line(ctx, "key", "file");
        unsigned *backend_line = conf_key_line(ctx, "key", "backend");
        unsigned *client_id_line = conf_key_line(ctx, "mqtt", "client_id");

        if (c->key.backend != KEY_BACKEND_FILE && c->key.file)
                return ctx_error(ctx, -EINVAL, *file_line,
                                 "[key] file: set, but [key] backend is not 'file'");
        if (c->key.backend == KEY_BACKEND_FILE && !c->key.file)
                return ctx_error(ctx, -EINVAL, *backend_line,
                                 "[key] backend: 'file' needs [key] file, the PEM private key");

        if (c->cloud.command_key_file) {
                unsigned *line = conf_key_line(ctx, "cloud", "command_key_file");
                r = check_command_key(c->cloud.command_key_file, &why);
                if (r < 0)
                        return ctx_error(ctx, r == -ENOMEM ? -ENOMEM : -EINVAL, *line, "[cloud] command_key_file: %s",
                                         why ? why : strerror(-r));
        }

        if (!c->hub.id) {
                if (machine_id_error == -EBADMSG)
                        return ctx_error(ctx, -EINVAL, 0, "[hub] id: not set, and %s holds no machine id",
                                         conf_machine_id_path);
                return ctx_error(ctx, -EINVAL, 0, "[hub] id: not set, and %s cannot be read: %s",
                                 conf_machine_id_path, strerror(-machine_id_error));
        }
        c->signer.state_dir_set = *conf_key_line(ctx, "signer", "state_dir") > 0;
        /* The default client id follows the hub id, which the file may have set. */
        if (*client_id_line == 0) {
                char *s = NULL;
                if (client_id_from_hub_id(c->hub.id, &s) < 0)
                        return ctx_error(ctx, -ENOMEM, 0, "out of memory");
                free(c->mqtt.client_id);
                c->mqtt.client_id = s;
        }
        return 0;
}

/* conf_load() on an open stream (f not NULL, left open) or on the file at path (f NULL). */
static int conf_load_internal(const char *path, FILE *stream, struct iothub_conf **ret, char **ret_error) {
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_(fclosep) FILE *f = NULL;
        unsigned key_line[ELEMENTSOF(conf_keys)] = {};
        struct ini_settings saved;
        struct parse_ctx ctx = {
                .path = path ?: IOTHUB_DEFAULT_CONFIG,
                .key_line = key_line,
        };
        int r, machine_id_error = 0;

        r = conf_new_defaults(&c, &machine_id_error, &ctx.message);
        if (r < 0) {
                /* The environment's error has no file to name. */
                if (ctx.message) {
                        char *m = NULL;
                        if (asprintf(&m, "%s: %s", ctx.path, ctx.message) < 0)
                                m = NULL;
                        free(ctx.message);
                        ctx.message = m;
                }
                goto fail;
        }
        c->path = strdup(ctx.path);
        if (!c->path) {
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees c */
                r = -ENOMEM;
                goto fail;
        }
        ctx.conf = c;

        if (stream)
                ctx.f = stream;
        else {
                /* No symlink, no FIFO, not writable by others (util.h, "trusted"): the config
                 * names the keys, the CA and the state directory. */
                _cleanup_free_ char *why = NULL;
                int fd = -1;
                r = open_trusted_file(ctx.path, 0, &fd, &why);
                if (r < 0) {
                        bool policy = r == -ELOOP || r == -EBADFD || r == -EPERM;
                        r = ctx_error(&ctx, r, 0, "%s", policy && why ? why : strerror(-r));
                        goto fail;
                }
                f = fdopen(fd, "r");
                if (!f) {
                        r = -errno;
                        (void) close(fd);
                        r = ctx_error(&ctx, r, 0, "%s", strerror(-r));
                        goto fail;
                }
                ctx.f = f;
        }

        ini_settings_save(&saved);
        ini_settings_pin();
        r = ini_parse_stream(conf_reader, &ctx, conf_handler, &ctx);
        ini_settings_restore(&saved);

        /* inih reports syntax errors ('[' without ']', a line without '=') only by line number; the
         * first problem in the file wins, whoever found it. */
        if (r > 0 && (ctx.error == 0 || (unsigned) r < ctx.error_line)) {
                free(ctx.message);
                ctx.message = NULL;
                ctx.error = 0;
                r = ctx_error(&ctx, -EINVAL, (unsigned) r,
                              "syntax error, expected [section] or key = value");
                goto fail;
        }
        if (r == -2)
                (void) ctx_error(&ctx, -ENOMEM, 0, "out of memory");
        else if (r < 0)
                (void) ctx_error(&ctx, -EIO, 0, "cannot be parsed");
        if (ctx.error < 0) {
                r = ctx.error;
                goto fail;
        }

        r = conf_check(&ctx, machine_id_error);
        if (r < 0)
                goto fail;

        *ret = TAKE_PTR(c);
        return 0;
fail:
        if (ret_error && ctx.message)
                *ret_error = TAKE_PTR(ctx.message);
        free(ctx.message);
        return r;
}

int conf_load(const char *path, struct iothub_conf **ret, char **ret_error) {
        return conf_load_internal(path, NULL, ret, ret_error);
}

int conf_load_stream(FILE *f, const char *path, struct iothub_conf **ret, char **ret_error) {
        if (!f)
                return -EINVAL;
        return conf_load_internal(path, f, ret, ret_error);
}

void conf_free(struct iothub_conf *c) {
        if (!c)
                return;
        free(c->path);
        free(c->hub.id);
        free(c->hub.state_dir);
        free(c->hub.runtime_dir);
        free(c->mqtt.host);
        free(c->mqtt.topic_prefix);
        free(c->mqtt.client_id);
        free(c->mqtt.username);
        free(c->mqtt.password_file);
        free(c->mqtt.ca_file);
        free(c->key.tcti);
        free(c->key.file);
        free(c->cloud.url);
        free(c->cloud.ca_file);
        free(c->cloud.bearer_token_file);
        free(c->cloud.command_key_file);
        free(c->oauth.issuer);
        free(c->oauth.client_id);
        free(c->oauth.scope);
        free(c->oauth.ca_file);
        free(c->bulbs.ca_file);
        free(c->signer.socket);
        free(c->signer.client_user);
        free(c->signer.command_user);
        free(c->signer.state_dir);
        free(c->uplink.socket);
        free(c->uplink.client_user);
        free(c);
}

const char *key_backend_to_string(enum key_backend b) {
        switch (b) {
        case KEY_BACKEND_TPM:
                return "tpm";
        case KEY_BACKEND_FILE:
                return "file";
        }
        return NULL;
}

const char *attest_mode_to_string(enum attest_mode m) {
        switch (m) {
        case ATTEST_AUTO:
                return "auto";
        case ATTEST_ON:
                return "on";
        case ATTEST_OFF:
                return "off";
        }
        return NULL;
}

const char *dpop_mode_to_string(enum dpop_mode m) {
        switch (m) {
        case DPOP_AUTO:
                return "auto";
        case DPOP_ON:
                return "on";
        case DPOP_OFF:
                return "off";
        }
        return NULL;
}
