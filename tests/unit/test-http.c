/* SPDX-License-Identifier: MIT */
/* http_header_value() (src/http.c): the header values iothub-uplink keeps from a cloud's or an
 * authorization server's answer (Retry-After, DPoP-Nonce, WWW-Authenticate). A peer's answer is
 * untrusted input: a value is kept whole, without the whitespace around it (RFC 9110 5.5), or not
 * at all. Before, a value longer than its buffer was cut short silently (a DPoP nonce the server
 * never sent), and trailing whitespace was kept as part of it. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "iothub/http.h"

static int value_of(const char *line, const char *name, char *dst, size_t cap) {
        return http_header_value(line, strlen(line), name, dst, cap);
}

static void test_value_trimmed(void **state) {
        char v[16];

        assert_int_equal(value_of("DPoP-Nonce: abc\r\n", "dpop-nonce:", v, sizeof v), 1);
        assert_string_equal(v, "abc");
        assert_int_equal(value_of("dpop-nonce:abc", "dpop-nonce:", v, sizeof v), 1);
        assert_string_equal(v, "abc");
        /* OWS on both sides is not part of the value (RFC 9110 5.5). */
        assert_int_equal(value_of("Retry-After: \t 120 \t \r\n", "retry-after:", v, sizeof v), 1);
        assert_string_equal(v, "120");
        /* Inner whitespace is. */
        assert_int_equal(value_of("WWW-Authenticate: DPoP error=\"x\"\n", "www-authenticate:", v, sizeof v), 1);
        assert_string_equal(v, "DPoP error=\"x\"");
        /* Empty. */
        assert_int_equal(value_of("DPoP-Nonce:   \r\n", "dpop-nonce:", v, sizeof v), 1);
        assert_string_equal(v, "");
}

static void test_other_headers_untouched(void **state) {
        char v[16] = "keep";

        assert_int_equal(value_of("Content-Type: application/json\r\n", "dpop-nonce:", v, sizeof v), 0);
        assert_string_equal(v, "keep");
        /* A longer name that starts alike is another header... */
        assert_int_equal(value_of("DPoP-Nonce-Extra: x\r\n", "dpop-nonce:", v, sizeof v), 0);
        assert_string_equal(v, "keep");
        /* ...and so is a line shorter than the name, or the status line. */
        assert_int_equal(value_of("DPoP", "dpop-nonce:", v, sizeof v), 0);
        assert_int_equal(value_of("HTTP/1.1 401 Unauthorized\r\n", "dpop-nonce:", v, sizeof v), 0);
        assert_string_equal(v, "keep");
}

static void test_too_long_is_not_kept(void **state) {
        char v[8] = "old";

        /* Seven bytes and the NUL fit; eight do not, and nothing of them is kept. */
        assert_int_equal(value_of("DPoP-Nonce: 1234567\r\n", "dpop-nonce:", v, sizeof v), 1);
        assert_string_equal(v, "1234567");
        assert_int_equal(value_of("DPoP-Nonce: 12345678\r\n", "dpop-nonce:", v, sizeof v), -E2BIG);
        assert_string_equal(v, "");
        /* Trailing whitespace does not count against the limit. */
        assert_int_equal(value_of("DPoP-Nonce: 1234567    \r\n", "dpop-nonce:", v, sizeof v), 1);
        assert_string_equal(v, "1234567");
}

static void test_control_characters_refused(void **state) {
        char v[32] = "old";
        static const char nul_line[] = "DPoP-Nonce: ab\0cd\r\n";

        /* A NUL would cut the value short in a C string: refused, not cut. */
        assert_int_equal(http_header_value(nul_line, sizeof nul_line - 1, "dpop-nonce:", v, sizeof v), -EBADMSG);
        assert_string_equal(v, "");
        assert_int_equal(value_of("DPoP-Nonce: ab\x01" "cd\r\n", "dpop-nonce:", v, sizeof v), -EBADMSG);
        assert_int_equal(value_of("DPoP-Nonce: ab\x7f" "cd\r\n", "dpop-nonce:", v, sizeof v), -EBADMSG);
        assert_int_equal(value_of("DPoP-Nonce: ab\rcd\r\n", "dpop-nonce:", v, sizeof v), -EBADMSG);
        /* HTAB inside is field content; obs-text (0x80-0xff) is allowed by RFC 9110 5.5. */
        assert_int_equal(value_of("WWW-Authenticate: a\tb\r\n", "www-authenticate:", v, sizeof v), 1);
        assert_string_equal(v, "a\tb");
        assert_int_equal(value_of("WWW-Authenticate: caf\xc3\xa9\r\n", "www-authenticate:", v, sizeof v), 1);
        assert_string_equal(v, "caf\xc3\xa9");
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_value_trimmed),
                cmocka_unit_test(test_other_headers_untouched),
                cmocka_unit_test(test_too_long_is_not_kept),
                cmocka_unit_test(test_control_characters_refused),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
