/* SPDX-License-Identifier: MIT */
/* dynsec.c without a broker: broker passwords, the response topic, answers that name nothing of
 * ours (junk, other administrators', other runs'), status. The broker side is tested against a
 * real mosquitto in tests/integration/broker.test.mjs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "iothub/conf.h"
#include "iothub/dynsec.h"

static void test_password(void **state) {
        char seen[64][DYNSEC_PASSWORD_LEN + 1];

        for (size_t i = 0; i < ELEMENTSOF(seen); i++) {
                char pw[DYNSEC_PASSWORD_LEN + 1];
                assert_int_equal(dynsec_password_new(pw), 0);
                assert_int_equal(strlen(pw), DYNSEC_PASSWORD_LEN);
                assert_true(b64url_chars_are_valid(pw, strlen(pw)));
                for (size_t j = 0; j < i; j++)
                        assert_string_not_equal(pw, seen[j]);
                memcpy(seen[i], pw, sizeof pw);
        }
}

static void test_topic(void **state) {
        assert_true(dynsec_is_response_topic("$CONTROL/dynamic-security/v1/response"));
        assert_false(dynsec_is_response_topic("$CONTROL/dynamic-security/v1"));
        assert_false(dynsec_is_response_topic("iothub/v1/bulbs/x/status"));
        assert_false(dynsec_is_response_topic(NULL));
}

static void test_answers_not_ours(void **state) {
        static const char *const junk[] = {
                "",
                "null",
                "{",
                "[]",
                "{\"responses\":7}",
                "{\"responses\":[1,null,\"x\",{}]}",
                "{\"responses\":[{\"command\":\"listClients\",\"correlationData\":\"iothub-00000000-1-0\"}]}",
                "{\"responses\":[{\"command\":\"createClient\",\"error\":\"x\",\"correlationData\":\"other-1\"}]}",
                "{\"responses\":[{\"correlationData\":\"iothub-zz-1-0\"},{\"correlationData\":\"iothub-1-1-99999999999\"}]}",
                "{\"responses\":[{\"correlationData\":\"iothub-00000001-18446744073709551615-4294967295\"}]}",
        };
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_(dynsec_freep) struct dynsec *d = NULL;
        sd_event *e = NULL;
        json_t *st;

        assert_int_equal(conf_defaults(&c), 0);
        assert_int_equal(sd_event_new(&e), 0);
        assert_int_equal(dynsec_new(e, c, NULL, NULL, &d), 0);
        for (size_t i = 0; i < ELEMENTSOF(junk); i++)
                dynsec_on_message(d, (const uint8_t *) junk[i], strlen(junk[i]));
        dynsec_on_message(NULL, (const uint8_t *) "{}", 2);
        /* Not connected: nothing is sent, and the caller hears why. */
        struct dynsec_op *op = NULL;
        assert_false(dynsec_ready(d));
        assert_int_equal(dynsec_bulb_create(d, "bulb-1", NULL, NULL, NULL, &op), -ENOTCONN);
        assert_int_equal(dynsec_bulb_delete(d, "bulb-1", NULL, NULL, &op), -ENOTCONN);
        assert_int_equal(dynsec_bulb_create(d, ".bad", NULL, NULL, NULL, &op), -EINVAL);
        assert_int_equal(dynsec_bulb_create(d, "bulb-1", "short", NULL, NULL, &op), -EINVAL);
        assert_null(op);
        st = json_object();
        assert_int_equal(dynsec_status_json(d, st), 0);
        assert_true(json_is_true(json_object_get(json_object_get(st, "broker"), "enabled")));
        assert_true(json_is_false(json_object_get(json_object_get(st, "broker"), "in_sync")));
        json_decref(st);
        st = json_object();
        assert_int_equal(dynsec_status_json(NULL, st), 0);
        assert_true(json_is_false(json_object_get(json_object_get(st, "broker"), "enabled")));
        json_decref(st);
        dynsec_free(TAKE_PTR(d));
        sd_event_unref(e);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_password),
                cmocka_unit_test(test_topic),
                cmocka_unit_test(test_answers_not_ours),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
