/* SPDX-License-Identifier: MIT */
/* libFuzzer target for what the cloud answers (src/cloud.c, PROTOCOL.md 3). Every input is taken,
 * in turn, as
 *   - the body of a 200 to a status batch: {"accepted":N,"rejected":[{"index":i,"reason":".."}]};
 *     what is accepted must give counter names the status JSON can carry ([a-z0-9_], bounded);
 *   - the body of a 4xx that refuses a batch: the reason kept with the batch moved aside must be
 *     one bounded line of printable ASCII that starts with the status;
 *   - a Retry-After value as http.c keeps it (at most 63 bytes, up to a NUL): 0..3600 seconds,
 *     delay-seconds read exactly, an HTTP-date relative to now;
 *   - a header line as libcurl hands it to http.c (http_header_value()): a value is kept whole
 *     (the bytes of the line between the OWS after the colon and the OWS before the line end),
 *     within its buffer, with no control character but HTAB, or not kept at all.
 * The register and device-list answers are not parsed (only their status is used): nothing to
 * fuzz there. */
#include <errno.h>
#include <inttypes.h>

#include "check.h"
#include "iothub/cloud.h"
#include "iothub/http.h"
#include "iothub/uplink-proto.h"

#define RETRY_AFTER_BUF 64           /* http.c: char retry_after[64] */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool key_chars_valid(const char *k) {
        return strspn(k, "abcdefghijklmnopqrstuvwxyz0123456789_") == strlen(k);
}

static void check_status_answer(const uint8_t *data, size_t size) {
        json_t *rej = (json_t *) 0x1, *again = NULL;
        int r;

        r = cloud_parse_status_answer((const char *) data, size, &rej);
        CHECK(r == 0 || r == -EBADMSG);
        if (r < 0) {
                CHECK(rej == (json_t *) 0x1); /* untouched on failure */
                return;
        }
        CHECK(!rej || json_is_array(rej));

        /* The same bytes give the same answer. */
        CHECK(cloud_parse_status_answer((const char *) data, size, &again) == 0);
        CHECK(!!again == !!rej && json_array_size(again) == json_array_size(rej));
        json_decref(again);

        for (size_t i = 0; i < json_array_size(rej); i++) {
                const json_t *v = json_array_get(rej, i);
                const char *reason = json_string_value(json_object_get(v, "reason"));
                char key[CLOUD_REJECTION_KEY_MAX];

                memset(key, 'X', sizeof key);
                cloud_rejection_key(v, key);
                CHECK(memchr(key, '\0', sizeof key));
                CHECK(key[0] != '\0'); /* a counter needs a name */
                CHECK(key_chars_valid(key));
                if (!reason || strlen(reason) == 0 || strlen(reason) >= CLOUD_REJECTION_KEY_MAX)
                        CHECK(strcmp(key, "other") == 0);
                else
                        CHECK(strlen(key) == strlen(reason));
        }
        json_decref(rej);
}

static void check_refusal(const uint8_t *data, size_t size) {
        static const long statuses[] = { 400, 403, 404, 413, 422, 499 };
        static const size_t sizes[] = { CLOUD_REFUSAL_REASON_MAX, 12, 1 };

        for (size_t i = 0; i < sizeof statuses / sizeof statuses[0]; i++)
                for (size_t j = 0; j < sizeof sizes / sizeof sizes[0]; j++) {
                        char reason[CLOUD_REFUSAL_REASON_MAX + 1], prefix[32];
                        size_t n;

                        memset(reason, 'X', sizeof reason);
                        uplink_refusal_reason(statuses[i], (const char *) data, size, reason, sizes[j]);
                        n = strnlen(reason, sizes[j]);
                        CHECK(n < sizes[j]); /* NUL-terminated inside the buffer */
                        CHECK(reason[sizes[j]] == 'X'); /* and nothing written past it */
                        CHECK(fuzz_is_printable_ascii(reason));
                        (void) snprintf(prefix, sizeof prefix, "HTTP %ld", statuses[i]);
                        CHECK(strncmp(reason, prefix, n < strlen(prefix) ? n : strlen(prefix)) == 0);
                        /* "HTTP 400: " and at most 64 bytes of the error. */
                        CHECK(n <= strlen(prefix) + 2 + 64);
                }
}

/* delay-seconds (RFC 9110 10.2.3): 1*DIGIT; we also take blanks around it. */
static bool delay_seconds(const char *v, int64_t *ret) {
        int64_t s = 0;
        const char *p = v + strspn(v, " \t");
        size_t digits = strspn(p, "0123456789");

        if (digits == 0 || p[digits + strspn(p + digits, " \t\r\n")] != '\0')
                return false;
        for (size_t i = 0; i < digits; i++)
                if (s <= 3600)
                        s = s * 10 + (p[i] - '0');
        *ret = s > 3600 ? 3600 : s;
        return true;
}

static void check_retry_after(const uint8_t *data, size_t size) {
        char value[RETRY_AFTER_BUF];
        int64_t s = -42, expect = 0;
        size_t n = size < sizeof value - 1 ? size : sizeof value - 1;
        int r;

        memcpy(value, data, n);
        value[n] = '\0';
        r = cloud_parse_retry_after(value, &s);
        CHECK(r == 0 || r == -EINVAL);
        if (r < 0) {
                CHECK(s == -42);
                CHECK(!delay_seconds(value, &expect));
                return;
        }
        CHECK(s >= 0 && s <= CLOUD_RETRY_AFTER_MAX_S);
        /* Only delay-seconds parse here (the uplink turns an HTTP-date into them). */
        CHECK(delay_seconds(value, &expect));
        CHECK(s == expect);
}

static void check_header_value(const uint8_t *data, size_t size) {
        static const char name[] = "dpop-nonce:";
        char v[32];
        const char *line = (const char *) data;
        int r;

        memset(v, 'x', sizeof v);
        r = http_header_value(line, size, name, v, sizeof v);
        CHECK(r == 0 || r == 1 || r == -E2BIG || r == -EBADMSG);
        CHECK((r == 0) == (size < sizeof name - 1 || strncasecmp(line, name, sizeof name - 1) != 0));
        if (r == 0) {
                CHECK(v[0] == 'x'); /* untouched */
                return;
        }
        if (r < 0) {
                CHECK(v[0] == '\0');
                return;
        }
        size_t n = strlen(v);
        CHECK(n < sizeof v);
        for (size_t i = 0; i < n; i++)
                CHECK(((unsigned char) v[i] >= 0x20 || v[i] == '\t') && v[i] != 0x7f);
        CHECK(n == 0 || (v[0] != ' ' && v[0] != '\t' && v[n - 1] != ' ' && v[n - 1] != '\t'));
        /* The value is the line's own bytes, after the name and the whitespace that follows it. */
        size_t at = sizeof name - 1;
        while (at < size && (line[at] == ' ' || line[at] == '\t'))
                at++;
        CHECK(at + n <= size && memcmp(line + at, v, n) == 0);
        /* After it: only whitespace, then at most CR LF. */
        for (size_t i = at + n; i < size; i++)
                CHECK(line[i] == ' ' || line[i] == '\t' || (line[i] == '\r' && i + 2 >= size) || (line[i] == '\n' && i + 1 == size));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        check_header_value(data, size);
        check_status_answer(data, size);
        check_refusal(data, size);
        check_retry_after(data, size);
        return 0;
}
