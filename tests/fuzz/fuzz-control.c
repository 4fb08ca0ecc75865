/* SPDX-License-Identifier: MIT */
/* libFuzzer target for the control protocol (src/control.c, iothub-protocol(7) "Control socket"),
 * both ends of it:
 *   - the daemon: the input is what a client sent; as on_conn_io does, at most CONTROL_REQUEST_MAX
 *     bytes are looked at and the request is the text before the first newline, parsed by
 *     control_parse_request(), then the members the handlers read (control_request_string());
 *   - iothubctl: the input is everything the daemon sent before it closed, parsed by
 *     control_parse_reply() (control_call()).
 * What a handler gets must be what it thinks it gets: C strings of the stated length (a "\u0000"
 * inside would make "bulb-1\u0000x" act on bulb-1), within the limits. */
#include <errno.h>

#include "check.h"
#include "iothub/control.h"
#include "iothub/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The members handle_bulb_add/remove read, with their limits (control.c). */
static const struct {
        const char *key;
        size_t max;
} members[] = {
        { "id", DEVICE_ID_MAX },
        { "key", 16384 },
        { "cert", 16384 },
};

static void check_string(const json_t *req, const char *key, size_t max) {
        const char *s = control_request_string(req, key, max);
        json_t *v = json_object_get(req, key);

        if (!s) {
                CHECK(!json_is_string(v) || json_string_length(v) == 0 || json_string_length(v) > max ||
                      strlen(json_string_value(v)) != json_string_length(v));
                return;
        }
        CHECK(json_is_string(v) && s == json_string_value(v));
        CHECK(strlen(s) >= 1 && strlen(s) <= max);
        CHECK(strlen(s) == json_string_length(v)); /* no NUL inside */
}

static void check_request(const uint8_t *data, size_t size) {
        const char *line = (const char *) data, *cmd = NULL, *error = NULL;
        size_t n = size < CONTROL_REQUEST_MAX ? size : CONTROL_REQUEST_MAX;
        const uint8_t *nl = memchr(data, '\n', n);
        json_t *req = (json_t *) 0x1;
        int r;

        if (!nl) /* the daemon keeps reading, or answers "request longer than ..." */
                return;
        r = control_parse_request(line, (size_t) (nl - data), &req, &cmd, &error);
        CHECK(r == 0 || r == -EBADMSG);
        if (r < 0) {
                CHECK(req == (json_t *) 0x1 && cmd == NULL);
                CHECK(error && error[0] && fuzz_is_printable_ascii(error));
                return;
        }
        CHECK(error == NULL);
        CHECK(json_is_object(req));
        CHECK(cmd == json_string_value(json_object_get(req, "cmd")));
        CHECK(strlen(cmd) >= 1 && strlen(cmd) <= CONTROL_CMD_MAX);
        CHECK(strlen(cmd) == json_string_length(json_object_get(req, "cmd")));
        for (size_t i = 0; i < sizeof members / sizeof members[0]; i++)
                check_string(req, members[i].key, members[i].max);
        json_decref(req);
}

static void check_reply(const uint8_t *data, size_t size) {
        json_t *resp = (json_t *) 0x1;
        int r;

        r = control_parse_reply((const char *) data, size, &resp);
        CHECK(r == 0 || r == -EBADMSG);
        if (r < 0) {
                CHECK(resp == (json_t *) 0x1);
                return;
        }
        CHECK(json_is_object(resp));
        json_decref(resp);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        check_request(data, size);
        check_reply(data, size);
        return 0;
}
