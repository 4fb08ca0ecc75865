/* SPDX-License-Identifier: MIT */
/* libFuzzer target for the commands long poll (src/commands.c, PROTOCOL.md 2 and 3). The input
 * is the body of a 200 to GET /v1/hubs/<id>/commands: commands_parse_answer() takes it apart and
 * command_check() judges every element, as on_poll_done does. What passes must satisfy what the
 * rest of the path relies on: ids of the right charset and length, exp in the next day, a set in
 * range, and a JWS payload that command_payload() can always build (in the caller's 1 KiB buffer)
 * and that reads back as the same command. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>

#include "../../src/commands-internal.h"
#include "check.h"

#define FUZZ_NOW INT64_C(1764633600)
/* The longest hub id: the payload must fit whatever the configuration says. */
#define FUZZ_HUB "hub-012345678901234567890123456789012345678901234567890123456789" /* 64 bytes */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_payload(const struct command_fields *f) {
        char buf[COMMAND_PAYLOAD_MAX]; /* the caller's buffer (commands.c) */
        json_error_t jerr;
        json_t *o, *set;
        int n;

        n = command_payload(FUZZ_HUB, f->dev, f->id, FUZZ_NOW, f->exp, &f->set, buf, sizeof buf);
        CHECK(n > 0 && (size_t) n < sizeof buf && (size_t) n == strlen(buf));

        o = json_loadb(buf, (size_t) n, JSON_REJECT_DUPLICATES, &jerr);
        CHECK(json_is_object(o));
        CHECK(strcmp(json_string_value(json_object_get(o, "hub")), FUZZ_HUB) == 0);
        CHECK(strcmp(json_string_value(json_object_get(o, "dev")), f->dev) == 0);
        CHECK(strcmp(json_string_value(json_object_get(o, "id")), f->id) == 0);
        CHECK(json_integer_value(json_object_get(o, "iat")) == FUZZ_NOW);
        CHECK(json_integer_value(json_object_get(o, "exp")) == f->exp);
        set = json_object_get(o, "set");
        CHECK(json_object_size(set) ==
              (size_t) f->set.has_on + f->set.has_bri + f->set.has_ct + f->set.has_xy);
        if (f->set.has_on)
                CHECK(json_is_boolean(json_object_get(set, "on")) &&
                      json_is_true(json_object_get(set, "on")) == f->set.on);
        if (f->set.has_bri)
                CHECK(json_integer_value(json_object_get(set, "bri")) == f->set.bri);
        if (f->set.has_ct)
                CHECK(json_integer_value(json_object_get(set, "ct")) == f->set.ct);
        if (f->set.has_xy)
                for (size_t i = 0; i < 2; i++) {
                        json_t *v = json_array_get(json_object_get(set, "xy"), i);
                        /* The bulb reads back the same double (jansson may say integer for 0 and 1). */
                        CHECK(json_number_value(v) == f->set.xy[i]);
                }
        json_decref(o);
}

static void check_command(const json_t *cmd) {
        struct command_fields f, again;
        const char *why = "unset";
        enum command_reason r;

        r = command_check(cmd, FUZZ_NOW, &f, &why);
        CHECK(r >= COMMAND_OK && r < _COMMAND_REASON_MAX && r != COMMAND_REVOKED);
        CHECK(r == COMMAND_OK || command_reason_to_string(r));
        CHECK(r == COMMAND_OK ? why == NULL : why != NULL && why[0] != '\0');
        CHECK(strnlen(f.id, sizeof f.id) < sizeof f.id && strnlen(f.dev, sizeof f.dev) < sizeof f.dev);
        if (r == COMMAND_BAD_ID) {
                CHECK(f.id[0] == '\0');
                return;
        }
        /* Every other reason is reported to the cloud under this id: it must name a result URL. */
        CHECK(command_id_is_valid(f.id, strlen(f.id)));
        CHECK(fuzz_id_chars_valid(f.id, COMMAND_ID_MAX));
        CHECK(strcmp(f.id, ".") != 0 && strcmp(f.id, "..") != 0);
        CHECK(strcmp(f.id, json_string_value(json_object_get(cmd, "id"))) == 0);
        CHECK(f.dev[0] == '\0' || device_id_is_valid(f.dev, strlen(f.dev)));
        if (r != COMMAND_OK)
                return;

        CHECK(device_id_is_valid(f.dev, strlen(f.dev)) && fuzz_id_chars_valid(f.dev, DEVICE_ID_MAX));
        CHECK(f.exp > FUZZ_NOW && f.exp - FUZZ_NOW <= COMMAND_EXP_AHEAD_MAX_S);
        CHECK(f.set.has_on || f.set.has_bri || f.set.has_ct || f.set.has_xy);
        CHECK(!f.set.has_bri || (f.set.bri >= 0 && f.set.bri <= 254));
        CHECK(!f.set.has_ct || (f.set.ct >= 153 && f.set.ct <= 500));
        for (size_t i = 0; f.set.has_xy && i < 2; i++)
                CHECK(f.set.xy[i] >= 0.0 && f.set.xy[i] <= 1.0 && !signbit(f.set.xy[i]));
        check_payload(&f);

        /* The same command at exp is expired (RFC 7519 4.1.4), and one second before it is not. */
        CHECK(command_check(cmd, f.exp, &again, NULL) == COMMAND_EXPIRED);
        CHECK(command_check(cmd, f.exp - 1, &again, NULL) == COMMAND_OK);
        CHECK(again.set.has_on == f.set.has_on && again.set.on == f.set.on && again.set.bri == f.set.bri &&
              again.set.ct == f.set.ct && again.set.xy[0] == f.set.xy[0] && again.set.xy[1] == f.set.xy[1]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        json_t *cmds = (json_t *) 0x1;
        int r;

        r = commands_parse_answer((const char *) data, size, &cmds);
        CHECK(r == 0 || r == -EBADMSG || r == -EFBIG);
        CHECK(r != -EFBIG || size > COMMANDS_ANSWER_MAX);
        if (r < 0) {
                CHECK(cmds == (json_t *) 0x1);
                return 0;
        }
        CHECK(size <= COMMANDS_ANSWER_MAX);
        CHECK(json_is_array(cmds));
        for (size_t i = 0; i < json_array_size(cmds); i++)
                check_command(json_array_get(cmds, i));
        json_decref(cmds);
        return 0;
}
