/* SPDX-License-Identifier: MIT */
/* The end-to-end acks (src/ack.c) against a stand-in for the MQTT client at its seam
 * (mqtt_publish(), mqtt_unacked(), mqtt_is_connected() are defined here, so the library's
 * mqtt.o is not linked): what the integration tests cannot stage at will, a broker that takes
 * our publishes and stops answering them. The acks are then held at ACK_UNACKED_MAX in the
 * client's hands, the rest stay pending (newest seq winning) and go once PUBACKs come. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "iothub/ack.h"
#include "iothub/mqtt.h"

#define N_BULBS 2000

static struct {
        uint64_t unacked;     /* published, not yet "PUBACKed" by the test */
        unsigned published;
        char last_topic[160], last_payload[40];
} fake;

bool mqtt_is_connected(const struct mqtt *m) {
        return true;
}

uint64_t mqtt_unacked(const struct mqtt *m) {
        return fake.unacked;
}

int mqtt_publish(struct mqtt *m, const char *topic, const void *payload, size_t len, int qos, int *ret_mid) {
        assert_int_equal(qos, 1);
        fake.unacked++;
        fake.published++;
        (void) snprintf(fake.last_topic, sizeof fake.last_topic, "%s", topic);
        (void) snprintf(fake.last_payload, sizeof fake.last_payload, "%.*s", (int) len, (const char *) payload);
        if (ret_mid)
                *ret_mid = (int) fake.published;
        return 0;
}

static json_int_t status_field(struct ack *a, const char *name) {
        json_t *st = json_pack("{s:{}}", "frames");
        json_int_t v;

        assert_non_null(st);
        assert_int_equal(ack_status_json(a, st), 0);
        v = json_integer_value(json_object_get(json_object_get(st, "frames"), name));
        json_decref(st);
        return v;
}

static void run_for(sd_event *e, uint64_t usec) {
        uint64_t end = now_monotonic_usec() + usec;

        while (now_monotonic_usec() < end)
                assert_true(sd_event_run(e, 10000) >= 0);
}

static void test_held_back_at_bound(void **state) {
        static struct bulb bulbs[N_BULBS];
        struct iothub_conf conf = { .mqtt.topic_prefix = (char *) "iothub/v1/bulbs" };
        sd_event *e = NULL;
        struct ack *a = NULL;
        unsigned first;

        memset(&fake, 0, sizeof fake);
        memset(bulbs, 0, sizeof bulbs);
        assert_int_equal(sd_event_new(&e), 0);
        assert_int_equal(ack_new(e, &conf, (struct mqtt *) &fake, &a), 0);
        for (unsigned i = 0; i < N_BULBS; i++) {
                (void) snprintf(bulbs[i].id, sizeof bulbs[i].id, "bulb-%04u", i);
                ack_stage(a, &bulbs[i], 1, true);
        }
        /* A broker that answers nothing: the client's hands hold the bound, no more. */
        first = fake.published;
        assert_true(first > 0);
        assert_int_equal(fake.unacked, first);
        assert_int_equal(first, 1024);
        assert_int_equal(status_field(a, "acks_pending"), N_BULBS - first);
        run_for(e, 250000);
        assert_int_equal(fake.published, first);
        assert_true(status_field(a, "acks_held_back") > 0);
        /* A pending bulb moves on: its ack, when it goes, carries the newest seq. */
        ack_stage(a, &bulbs[N_BULBS - 1], 7, true);
        assert_int_equal(status_field(a, "acks_pending"), N_BULBS - first);
        /* The broker answers everything: the rest go, each bulb once, within a few intervals. */
        fake.unacked = 0;
        for (int i = 0; i < 20 && status_field(a, "acks_pending") > 0; i++) {
                run_for(e, 120000);
                fake.unacked = 0;
        }
        assert_int_equal(status_field(a, "acks_pending"), 0);
        assert_int_equal(fake.published, N_BULBS);
        assert_int_equal(status_field(a, "acks_published"), N_BULBS);
        assert_int_equal(status_field(a, "acks_failed"), 0);
        ack_free(a);
        sd_event_unref(e);
}

/* The newest seq of a held-back bulb is what it is acked with. */
static void test_newest_seq_wins(void **state) {
        static struct bulb b;
        struct iothub_conf conf = { .mqtt.topic_prefix = (char *) "p" };
        sd_event *e = NULL;
        struct ack *a = NULL;

        memset(&fake, 0, sizeof fake);
        memset(&b, 0, sizeof b);
        (void) snprintf(b.id, sizeof b.id, "bulb-x");
        fake.unacked = 1024; /* full before the first ack */
        assert_int_equal(sd_event_new(&e), 0);
        assert_int_equal(ack_new(e, &conf, (struct mqtt *) &fake, &a), 0);
        ack_stage(a, &b, 3, true);
        ack_stage(a, &b, 5, true);
        run_for(e, 150000);
        assert_int_equal(fake.published, 0);
        fake.unacked = 1023;
        run_for(e, 250000);
        assert_int_equal(fake.published, 1);
        assert_string_equal(fake.last_topic, "p/bulb-x/ack");
        assert_string_equal(fake.last_payload, "{\"seq\":5}");
        ack_free(a);
        sd_event_unref(e);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_held_back_at_bound),
                cmocka_unit_test(test_newest_seq_wins),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
