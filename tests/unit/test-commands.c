/* SPDX-License-Identifier: MIT */
/* The pure parts of commands.c (src/commands-internal.h), table-driven: the command checks,
 * the JWS payload bytes, the JWS itself (signed by a file-backed hub key and verified by
 * OpenSSL through verify.c), the result body and the answer parser; and the search of the spool
 * for acks a power cut took from the database (commands_acks_from_spool(), real segment files). */
#include <dirent.h>
#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../src/commands-internal.h"
#include "iothub/conf.h"
#include "iothub/db.h"
#include "iothub/frame.h"
#include "iothub/hubkey.h"
#include "iothub/jws.h"
#include "iothub/spool.h"
#include "iothub/verify.h"

#define NOW 1700000000

static void test_id(void **state) {
        static const struct {
                const char *id;
                bool ok;
        } t[] = {
                { "a", true },
                { "cmd-1", true },
                { "A.b_c-9", true },
                { ".hidden", true }, /* a leading dot is allowed for command ids */
                { "...", true },
                { "0123456789012345678901234567890123456789012345678901234567890123", true }, /* 64 */
                { "01234567890123456789012345678901234567890123456789012345678901234", false }, /* 65 */
                { "", false },
                { ".", false },
                { "..", false },
                { "a/b", false },
                { "a b", false },
                { "a%2e", false },
                { "caf\xc3\xa9", false },
                { "a\n", false },
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++)
                if (command_id_is_valid(t[i].id, strlen(t[i].id)) != t[i].ok)
                        fail_msg("id \"%s\": expected %s", t[i].id, t[i].ok ? "valid" : "invalid");
        assert_false(command_id_is_valid(NULL, 0));
        assert_false(command_id_is_valid("a\0b", 3));
}

static void test_check(void **state) {
        /* NOW is 1700000000. */
        static const struct {
                const char *json;
                enum command_reason want;
                const char *id, *dev;
        } t[] = {
                { "{\"id\":\"c1\",\"dev\":\"bulb-1\",\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_OK, "c1", "bulb-1" },
                { "{\"exp\":1700000009,\"set\":{\"bri\":0,\"ct\":153,\"xy\":[0,1],\"on\":false},\"dev\":\"b\",\"id\":\"c\"}",
                  COMMAND_OK, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"bri\":254,\"ct\":500,\"xy\":[0.3127,0.329]},\"exp\":1700000009}",
                  COMMAND_OK, "c", "b" },
                /* bad ids: nothing else is looked at */
                { "{\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_BAD_ID, "", "" },
                { "{\"id\":7,\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_BAD_ID, "", "" },
                { "{\"id\":\"a/b\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_BAD_ID, "", "" },
                { "{\"id\":\"..\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_BAD_ID, "", "" },
                { "[1,2]", COMMAND_BAD_ID, "", "" },
                { "\"c1\"", COMMAND_BAD_ID, "", "" },
                { "null", COMMAND_BAD_ID, "", "" },
                /* "sig" is the caller's (command_cloud_sig_check()): allowed when a string */
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":1700000009,\"sig\":\"x\"}", COMMAND_OK, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":1700000009,\"sig\":1}", COMMAND_MALFORMED, "c", "b" },
                /* malformed */
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":1700000009,\"x\":1}", COMMAND_MALFORMED, "c", "b" },
                { "{\"id\":\"c\",\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_MALFORMED, "c", "" },
                { "{\"id\":\"c\",\"dev\":5,\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_MALFORMED, "c", "" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":[],\"exp\":1700000009}", COMMAND_MALFORMED, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true}}", COMMAND_MALFORMED, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":1700000009.5}", COMMAND_MALFORMED, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":\"1700000009\"}", COMMAND_MALFORMED, "c", "b" },
                /* bad set */
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"bri\":999},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"bri\":-1},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"bri\":128.0},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"ct\":152},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"ct\":501},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":1},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true,\"color\":\"red\"},\"exp\":1700000009}", COMMAND_BAD_SET,
                  "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"xy\":[0.5]},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"xy\":[0.5,0.5,0.5]},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"xy\":[0.5,1.0001]},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"xy\":[-0.1,0.5]},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"xy\":[\"0.1\",0.5]},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"xy\":{\"x\":0.1}},\"exp\":1700000009}", COMMAND_BAD_SET, "c", "b" },
                /* exp: NOW itself has passed (RFC 7519 4.1.4: "on or after") */
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":1700000000}", COMMAND_EXPIRED, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":0}", COMMAND_EXPIRED, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":-5}", COMMAND_EXPIRED, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"on\":true},\"exp\":9999999999999}", COMMAND_BAD_EXP, "c", "b" },
                /* the set is checked before exp, exp before dev */
                { "{\"id\":\"c\",\"dev\":\"b\",\"set\":{},\"exp\":0}", COMMAND_BAD_SET, "c", "b" },
                { "{\"id\":\"c\",\"dev\":\"no/such\",\"set\":{\"on\":true},\"exp\":0}", COMMAND_EXPIRED, "c", "" },
                /* dev not a device id */
                { "{\"id\":\"c\",\"dev\":\"no/such\",\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_UNKNOWN_DEVICE, "c", "" },
                { "{\"id\":\"c\",\"dev\":\".b\",\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_UNKNOWN_DEVICE, "c", "" },
                { "{\"id\":\"c\",\"dev\":\"\",\"set\":{\"on\":true},\"exp\":1700000009}", COMMAND_UNKNOWN_DEVICE, "c", "" },
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                const char *text = t[i].json;
                struct command_fields f;
                const char *why = NULL;
                json_error_t jerr;
                json_t *o;
                enum command_reason got;

                o = json_loads(text, JSON_DECODE_ANY, &jerr);
                if (!o)
                        fail_msg("case %zu: test JSON does not parse: %s", i, jerr.text);
                got = command_check(o, NOW, &f, &why);
                if (got != t[i].want)
                        fail_msg("case %zu %s: got %s, want %s (%s)", i, text,
                                 got ? command_reason_to_string(got) : "ok",
                                 t[i].want ? command_reason_to_string(t[i].want) : "ok", why ? why : "");
                assert_string_equal(f.id, t[i].id);
                assert_string_equal(f.dev, t[i].dev);
                if (got != COMMAND_OK)
                        assert_non_null(why);
                json_decref(o);
        }
}

static void test_check_fields(void **state) {
        struct command_fields f;
        json_t *o = json_loads("{\"id\":\"c\",\"dev\":\"b\",\"set\":{\"xy\":[-0.0,1],\"bri\":7,\"on\":false},"
                               "\"exp\":1700000100}",
                               0, NULL);

        assert_non_null(o);
        assert_int_equal(command_check(o, NOW, &f, NULL), COMMAND_OK);
        assert_int_equal(f.exp, 1700000100);
        assert_true(f.set.has_on && !f.set.on);
        assert_true(f.set.has_bri && f.set.bri == 7);
        assert_false(f.set.has_ct);
        assert_true(f.set.has_xy);
        assert_false(signbit(f.set.xy[0])); /* -0 becomes 0 */
        assert_true(f.set.xy[1] == 1.0);
        json_decref(o);
        assert_null(command_reason_to_string(COMMAND_OK));
        assert_string_equal(command_reason_to_string(COMMAND_BAD_SET), "bad_set");
        assert_null(command_reason_to_string(_COMMAND_REASON_MAX));
}

static void test_payload(void **state) {
        static const struct {
                struct command_set set;
                const char *want_set;
        } t[] = {
                { { .has_on = true, .on = true }, "{\"on\":true}" },
                { { .has_on = true, .on = false }, "{\"on\":false}" },
                { { .has_bri = true, .bri = 0 }, "{\"bri\":0}" },
                { { .has_ct = true, .ct = 500, .has_bri = true, .bri = 254 }, "{\"bri\":254,\"ct\":500}" },
                { { .has_xy = true, .xy = { 0.3, 0.4 } }, "{\"xy\":[0.3,0.4]}" },
                { { .has_xy = true, .xy = { 0, 1 } }, "{\"xy\":[0,1]}" },
                { { .has_xy = true, .xy = { 0.3127, 1e-7 } }, "{\"xy\":[0.3127,1e-07]}" },
                { { .has_xy = true, .xy = { 0.1 + 0.2, 0.5 } }, "{\"xy\":[0.30000000000000004,0.5]}" },
                { { .has_on = true, .on = true, .has_bri = true, .bri = 128, .has_ct = true, .ct = 153, .has_xy = true,
                    .xy = { 0.5, 0.25 } },
                  "{\"on\":true,\"bri\":128,\"ct\":153,\"xy\":[0.5,0.25]}" },
        };
        char buf[COMMAND_PAYLOAD_MAX], want[COMMAND_PAYLOAD_MAX];

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                int n = command_payload("hub-1", "bulb-1", "cmd.7", 1700000000, 1700000060, &t[i].set, buf, sizeof buf);
                (void) snprintf(want, sizeof want,
                                "{\"hub\":\"hub-1\",\"dev\":\"bulb-1\",\"id\":\"cmd.7\",\"iat\":1700000000,\"exp\":"
                                "1700000060,\"set\":%s}",
                                t[i].want_set);
                assert_int_equal(n, (int) strlen(want));
                assert_string_equal(buf, want);
                /* What the bulb reads back is the same set. */
                json_t *o = json_loads(buf, JSON_REJECT_DUPLICATES, NULL);
                struct command_fields f;
                json_t *cmd = json_pack("{s:s,s:s,s:O,s:I}", "id", "x", "dev", "y", "set", json_object_get(o, "set"),
                                        "exp", (json_int_t) 1700000060);
                assert_int_equal(command_check(cmd, NOW, &f, NULL), COMMAND_OK);
                assert_true(f.set.has_on == t[i].set.has_on && f.set.on == t[i].set.on);
                assert_true(f.set.has_bri == t[i].set.has_bri && f.set.bri == t[i].set.bri);
                assert_true(f.set.has_ct == t[i].set.has_ct && f.set.ct == t[i].set.ct);
                assert_true(f.set.has_xy == t[i].set.has_xy);
                assert_true(f.set.xy[0] == t[i].set.xy[0] && f.set.xy[1] == t[i].set.xy[1]);
                json_decref(cmd);
                json_decref(o);
        }

        static const struct command_set ok = { .has_on = true, .on = true };
        static const struct command_set empty = {};
        static const struct command_set bad_bri = { .has_bri = true, .bri = 255 };
        static const struct command_set bad_xy = { .has_xy = true, .xy = { 0.5, 2 } };
        assert_int_equal(command_payload("hub-1", "bulb-1", "c", 1, 2, &empty, buf, sizeof buf), -EINVAL);
        assert_int_equal(command_payload("hub-1", "bulb-1", "c", 1, 2, &bad_bri, buf, sizeof buf), -EINVAL);
        assert_int_equal(command_payload("hub-1", "bulb-1", "c", 1, 2, &bad_xy, buf, sizeof buf), -EINVAL);
        assert_int_equal(command_payload("hub\"", "bulb-1", "c", 1, 2, &ok, buf, sizeof buf), -EINVAL);
        assert_int_equal(command_payload("hub-1", "bu\"lb", "c", 1, 2, &ok, buf, sizeof buf), -EINVAL);
        assert_int_equal(command_payload("hub-1", "bulb-1", "..", 1, 2, &ok, buf, sizeof buf), -EINVAL);
        assert_int_equal(command_payload("hub-1", "bulb-1", "c", 1, 2, &ok, buf, 40), -ENOBUFS);
}

/* ---- the JWS, signed by a file-backed hub key ---- */

static char keydir[64];
static struct hubkey *key;

static int key_setup(void **state) {
        char path[128];
        struct iothub_conf c = {};

        strcpy(keydir, "/tmp/test-commands-XXXXXX");
        assert_non_null(mkdtemp(keydir));
        (void) snprintf(path, sizeof path, "%s/hub.key", keydir);
        c.key.backend = KEY_BACKEND_FILE;
        c.key.file = path;
        assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
        assert_int_equal(hubkey_open(&c, &key, NULL), 0);
        (void) unlink(path);
        (void) rmdir(keydir);
        return 0;
}

static int key_teardown(void **state) {
        hubkey_free(key);
        return 0;
}

static int sign_hubkey(void *userdata, const void *msg, size_t len, uint8_t ret_sig[HUBKEY_SIG_LEN]) {
        return hubkey_sign(userdata, msg, len, ret_sig);
}

static char *b64_decode_part(const char *s, size_t len) {
        char *out = malloc(len + 1);
        ssize_t n;

        assert_non_null(out);
        n = b64url_decode(s, len, (uint8_t *) out, len);
        assert_true(n >= 0);
        out[n] = '\0';
        return out;
}

static void test_jws(void **state) {
        static const struct command_set set = { .has_on = true, .on = true, .has_bri = true, .bri = 42 };
        char payload[COMMAND_PAYLOAD_MAX], want_header[128];
        _cleanup_free_ char *jws = NULL, *pem = NULL, *h = NULL, *p = NULL;
        _cleanup_(verify_key_freep) struct verify_key *vk = NULL;
        enum frame_alg alg;
        uint8_t sig[128], ksig[HUBKEY_SIG_LEN];
        const char *dot1, *dot2;
        ssize_t sig_len;
        size_t at = 0;
        int n;

        n = command_payload("hub-1", "bulb-1", "c-1", 1700000000, 1700000030, &set, payload, sizeof payload);
        assert_true(n > 0);
        /* The signer's path (op_sign_command(), on_jws_signed()): prepare, sign, finish. */
        assert_int_equal(command_jws_prepare(hubkey_id(key), payload, (size_t) n, &jws, &at), 0);
        assert_int_equal(hubkey_sign(key, jws, at, ksig), 0);
        jws_compact_finish(jws, at, ksig);
        assert_int_equal(hubkey_signatures(key), 1); /* one signature per command */

        /* Three parts, base64url without padding. */
        dot1 = strchr(jws, '.');
        assert_non_null(dot1);
        dot2 = strchr(dot1 + 1, '.');
        assert_non_null(dot2);
        assert_null(strchr(dot2 + 1, '.'));
        assert_null(strchr(jws, '='));
        h = b64_decode_part(jws, (size_t) (dot1 - jws));
        p = b64_decode_part(dot1 + 1, (size_t) (dot2 - dot1 - 1));
        (void) snprintf(want_header, sizeof want_header, "{\"alg\":\"ES256\",\"kid\":\"%s\",\"typ\":\"iothub-cmd\"}",
                        hubkey_id(key));
        assert_string_equal(h, want_header);
        assert_string_equal(p, payload);

        /* ES256: 64 bytes r||s over "<header>.<payload>", verified by OpenSSL with the public key. */
        sig_len = b64url_decode(dot2 + 1, strlen(dot2 + 1), sig, sizeof sig);
        assert_int_equal(sig_len, 64);
        assert_int_equal(hubkey_public_pem(key, &pem), 0);
        assert_int_equal(verify_key_from_pem(pem, strlen(pem), &vk, &alg), 0);
        assert_int_equal(alg, FRAME_ALG_ES256);
        assert_int_equal(verify_signature(vk, FRAME_ALG_ES256, (const uint8_t *) jws, (size_t) (dot2 - jws), sig,
                                          (size_t) sig_len),
                         0);
        /* One bit of the payload changed: no longer verifies. */
        jws[dot1 - jws + 5] ^= 1;
        assert_int_equal(verify_signature(vk, FRAME_ALG_ES256, (const uint8_t *) jws, (size_t) (dot2 - jws), sig,
                                          (size_t) sig_len),
                         -EBADMSG);

        /* Failures leave *ret and *ret_len alone. */
        char *untouched = (char *) "x";
        size_t len_untouched = 7;
        assert_int_equal(command_jws_prepare("kid\"", payload, (size_t) n, &untouched, &len_untouched), -EINVAL);
        assert_int_equal(command_jws_prepare(hubkey_id(key), payload, 0, &untouched, &len_untouched), -EINVAL);
        assert_int_equal(command_jws_prepare(hubkey_id(key), payload, COMMAND_PAYLOAD_MAX + 1, &untouched,
                                             &len_untouched),
                         -EINVAL);
        assert_string_equal(untouched, "x");
        assert_int_equal(len_untouched, 7);
}

static void test_result_body(void **state) {
        static const struct {
                const char *status;
                int64_t at;
                const char *detail, *want;
        } t[] = {
                { "delivered", 1700000000, NULL, "{\"status\":\"delivered\",\"at\":1700000000}" },
                { "acked", 1, "", "{\"status\":\"acked\",\"at\":1}" },
                { "rejected", 5, "bad_set", "{\"status\":\"rejected\",\"at\":5,\"detail\":\"bad_set\"}" },
                { "failed", 5, "lamp \"overheated\"\n", "{\"status\":\"failed\",\"at\":5,\"detail\":\"lamp \\\"overheated\\\"\\n\"}" },
                { "failed", 5, "caf\xc3\xa9", "{\"status\":\"failed\",\"at\":5,\"detail\":\"caf\xc3\xa9\"}" },
                { "failed", 5, "bad \xff utf-8", "{\"status\":\"failed\",\"at\":5}" }, /* left out, not held back */
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                _cleanup_free_ char *s = NULL;
                assert_int_equal(command_result_body(t[i].status, t[i].at, t[i].detail, &s), 0);
                assert_string_equal(s, t[i].want);
        }
}

static void test_parse_answer(void **state) {
        static const struct {
                const char *body;
                int want;
                size_t n;
        } t[] = {
                { "{\"commands\":[]}", 0, 0 },
                { "{\"commands\":[{\"id\":\"a\"},1,\"x\"]}", 0, 3 },
                { " {\"commands\" : [ ] } ", 0, 0 },
                { "{\"commands\":[],\"more\":1}", -EBADMSG, 0 },
                { "{\"commands\":[],\"commands\":[]}", -EBADMSG, 0 },
                { "{\"commands\":{}}", -EBADMSG, 0 },
                { "{\"commands\":[]} x", -EBADMSG, 0 },
                { "[]", -EBADMSG, 0 },
                { "", -EBADMSG, 0 },
                { "{\"commands\":[", -EBADMSG, 0 },
                { "{\"commands\":[1e400]}", -EBADMSG, 0 },
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                json_t *a = NULL;
                int r = commands_parse_answer(t[i].body, strlen(t[i].body), &a);
                if (r != t[i].want)
                        fail_msg("case %zu \"%s\": got %d, want %d", i, t[i].body, r, t[i].want);
                if (r == 0) {
                        assert_true(json_is_array(a));
                        assert_int_equal(json_array_size(a), t[i].n);
                        json_decref(a);
                } else
                        assert_null(a);
        }

        /* Larger than COMMANDS_ANSWER_MAX: not even parsed. */
        size_t big = COMMANDS_ANSWER_MAX + 1;
        char *s = malloc(big + 1);
        json_t *a = NULL;
        assert_non_null(s);
        memset(s, ' ', big);
        memcpy(s, "{\"commands\":[]}", 15);
        s[big] = '\0';
        assert_int_equal(commands_parse_answer(s, big, &a), -EFBIG);
        assert_null(a);
        assert_int_equal(commands_parse_answer(s, big - 1, &a), 0); /* trailing blanks are JSON whitespace */
        json_decref(a);
        free(s);
}

/* ---- the vendor's signature (PROTOCOL.md 5), by a second file-backed key ---- */

static struct hubkey *vendor, *other;

static struct hubkey *file_key(void) {
        char dir[] = "/tmp/test-commands-vendor-XXXXXX", path[128];
        struct iothub_conf c = {};
        struct hubkey *k = NULL;

        assert_non_null(mkdtemp(dir));
        (void) snprintf(path, sizeof path, "%s/vendor.key", dir);
        c.key.backend = KEY_BACKEND_FILE;
        c.key.file = path;
        assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        (void) unlink(path);
        (void) rmdir(dir);
        return k;
}

/* A JWS Compact over exactly these header and payload strings; sig_key NULL: an empty signature. */
static char *cloud_jws(const char *header, const char *payload, struct hubkey *sig_key) {
        char *jws = NULL;

        if (sig_key) {
                assert_int_equal(jws_compact_sign(header, strlen(header), payload, strlen(payload), sign_hubkey, sig_key,
                                                  &jws),
                                 0);
                return jws;
        }
        char *h = malloc(B64URL_BUF(strlen(header))), *p = malloc(B64URL_BUF(strlen(payload)));
        assert_non_null(h);
        assert_non_null(p);
        b64url_encode((const uint8_t *) header, strlen(header), h);
        b64url_encode((const uint8_t *) payload, strlen(payload), p);
        assert_true(asprintf(&jws, "%s.%s.", h, p) > 0);
        free(h);
        free(p);
        return jws;
}

static void test_cloud_sig(void **state) {
        static const char cmd_json[] = "{\"id\":\"c1\",\"dev\":\"bulb-1\",\"set\":{\"on\":true,\"bri\":3,\"xy\":[0.3,1]},"
                                       "\"exp\":1700000009}";
        static const char good_payload[] = "{\"hub\":\"hub-1\",\"id\":\"c1\",\"dev\":\"bulb-1\",\"exp\":1700000009,"
                                           "\"set\":{\"on\":true,\"bri\":3,\"xy\":[0.3,1]}}";
        _cleanup_(verify_key_freep) struct verify_key *vk = NULL;
        _cleanup_free_ char *pem = NULL, *path = NULL, *err = NULL;
        char kid[HUBKEY_ID_LEN + 1], good_header[160], header_hs[160], header_none[160], header_crit[200];
        FILE *f;

        vendor = file_key();
        other = file_key();
        /* command_key_load(): a trusted PEM file; its kid is the RFC 7638 thumbprint, the same as
         * hubkey.c computes for the same key. */
        assert_int_equal(hubkey_public_pem(vendor, &pem), 0);
        assert_true(asprintf(&path, "/tmp/test-commands-vendor-%d.pem", (int) getpid()) > 0);
        f = fopen(path, "w");
        assert_non_null(f);
        assert_int_equal(fputs(pem, f) >= 0, 1);
        assert_int_equal(fclose(f), 0);
        assert_int_equal(chmod(path, 0644), 0);
        assert_int_equal(command_key_load(path, &vk, kid, &err), 0);
        assert_string_equal(kid, hubkey_id(vendor));
        assert_int_equal(chmod(path, 0666), 0); /* writable by others: anyone could swap the key */
        {
                struct verify_key *untouched = NULL;
                char kid2[HUBKEY_ID_LEN + 1] = "x";
                assert_true(command_key_load(path, &untouched, kid2, &err) < 0);
                assert_null(untouched);
                assert_string_equal(kid2, "x");
                assert_non_null(err);
        }
        (void) unlink(path);

        (void) snprintf(good_header, sizeof good_header, "{\"alg\":\"ES256\",\"typ\":\"iothub-cloud-cmd\",\"kid\":\"%s\"}", kid);
        (void) snprintf(header_hs, sizeof header_hs, "{\"alg\":\"HS256\",\"typ\":\"iothub-cloud-cmd\",\"kid\":\"%s\"}", kid);
        (void) snprintf(header_none, sizeof header_none, "{\"alg\":\"none\",\"typ\":\"iothub-cloud-cmd\",\"kid\":\"%s\"}", kid);
        (void) snprintf(header_crit, sizeof header_crit,
                        "{\"alg\":\"ES256\",\"typ\":\"iothub-cloud-cmd\",\"kid\":\"%s\",\"crit\":[\"exp\"]}", kid);

        const struct {
                const char *what, *header, *payload;
                struct hubkey *key; /* NULL: no signature */
                const char *raw;    /* instead of a JWS: this sig value (JSON), or "" for no sig member */
                bool ok;
        } t[] = {
                { "valid", good_header, good_payload, vendor, NULL, true },
                { "members in another order", "{\"kid\":\"KID\",\"typ\":\"iothub-cloud-cmd\",\"alg\":\"ES256\"}",
                  "{\"set\":{\"xy\":[0.3,1],\"bri\":3,\"on\":true},\"exp\":1700000009,\"dev\":\"bulb-1\",\"id\":\"c1\","
                  "\"hub\":\"hub-1\"}",
                  vendor, NULL, true },
                { "no sig", NULL, NULL, NULL, "", false },
                { "sig not a string", NULL, NULL, NULL, "{\"a\":1}", false },
                { "sig by another key", good_header, good_payload, NULL, NULL, false }, /* key set below */
                { "over another set", good_header,
                  "{\"hub\":\"hub-1\",\"id\":\"c1\",\"dev\":\"bulb-1\",\"exp\":1700000009,\"set\":{\"on\":true,\"bri\":4,"
                  "\"xy\":[0.3,1]}}",
                  vendor, NULL, false },
                { "over a set with a member less", good_header,
                  "{\"hub\":\"hub-1\",\"id\":\"c1\",\"dev\":\"bulb-1\",\"exp\":1700000009,\"set\":{\"on\":true,\"bri\":3}}",
                  vendor, NULL, false },
                { "over another dev", good_header,
                  "{\"hub\":\"hub-1\",\"id\":\"c1\",\"dev\":\"bulb-2\",\"exp\":1700000009,\"set\":{\"on\":true,\"bri\":3,"
                  "\"xy\":[0.3,1]}}",
                  vendor, NULL, false },
                { "over another exp", good_header,
                  "{\"hub\":\"hub-1\",\"id\":\"c1\",\"dev\":\"bulb-1\",\"exp\":1700000099,\"set\":{\"on\":true,\"bri\":3,"
                  "\"xy\":[0.3,1]}}",
                  vendor, NULL, false },
                { "exp as a real", good_header,
                  "{\"hub\":\"hub-1\",\"id\":\"c1\",\"dev\":\"bulb-1\",\"exp\":1700000009.0,\"set\":{\"on\":true,\"bri\":3,"
                  "\"xy\":[0.3,1]}}",
                  vendor, NULL, false },
                { "over another id", good_header,
                  "{\"hub\":\"hub-1\",\"id\":\"c2\",\"dev\":\"bulb-1\",\"exp\":1700000009,\"set\":{\"on\":true,\"bri\":3,"
                  "\"xy\":[0.3,1]}}",
                  vendor, NULL, false },
                { "for another hub", good_header,
                  "{\"hub\":\"hub-2\",\"id\":\"c1\",\"dev\":\"bulb-1\",\"exp\":1700000009,\"set\":{\"on\":true,\"bri\":3,"
                  "\"xy\":[0.3,1]}}",
                  vendor, NULL, false },
                { "no hub", good_header,
                  "{\"id\":\"c1\",\"dev\":\"bulb-1\",\"exp\":1700000009,\"set\":{\"on\":true,\"bri\":3,\"xy\":[0.3,1]}}",
                  vendor, NULL, false },
                { "an extra member", good_header,
                  "{\"hub\":\"hub-1\",\"id\":\"c1\",\"dev\":\"bulb-1\",\"exp\":1700000009,\"set\":{\"on\":true,\"bri\":3,"
                  "\"xy\":[0.3,1]},\"x\":1}",
                  vendor, NULL, false },
                { "duplicate member", good_header,
                  "{\"hub\":\"hub-1\",\"id\":\"c1\",\"id\":\"c1\",\"dev\":\"bulb-1\",\"exp\":1700000009,\"set\":{\"on\":true,"
                  "\"bri\":3,\"xy\":[0.3,1]}}",
                  vendor, NULL, false },
                { "payload not an object", good_header, "[1]", vendor, NULL, false },
                { "alg none", header_none, good_payload, NULL, NULL, false },
                { "alg HS256", header_hs, good_payload, vendor, NULL, false },
                { "crit", header_crit, good_payload, vendor, NULL, false },
                { "another kid", "{\"alg\":\"ES256\",\"typ\":\"iothub-cloud-cmd\",\"kid\":\"k\"}", good_payload, vendor, NULL,
                  false },
                { "another typ", "{\"alg\":\"ES256\",\"typ\":\"iothub-cmd\",\"kid\":\"KID\"}", good_payload, vendor, NULL,
                  false },
                { "no kid", "{\"alg\":\"ES256\",\"typ\":\"iothub-cloud-cmd\"}", good_payload, vendor, NULL, false },
                { "four parts", NULL, NULL, NULL, "\"a.b.c.d\"", false },
                { "two parts", NULL, NULL, NULL, "\"a.b\"", false },
                { "padding", NULL, NULL, NULL, "\"YQ==.YQ.YQ\"", false },
                { "too long", NULL, NULL, NULL, "LONG", false },
        };

        for (size_t i = 0; i < ELEMENTSOF(t); i++) {
                _cleanup_free_ char *jws = NULL, *header = NULL, *text = NULL;
                json_t *cmd = json_loads(cmd_json, 0, NULL);
                const char *why = NULL;
                int r;

                assert_non_null(cmd);
                if (t[i].header) {
                        /* KID in a header stands for the vendor key's id. */
                        const char *k = strstr(t[i].header, "KID");
                        if (k)
                                assert_true(asprintf(&header, "%.*s%s%s", (int) (k - t[i].header), t[i].header, kid,
                                                     k + 3) > 0);
                        else
                                header = strdup(t[i].header);
                        jws = cloud_jws(header, t[i].payload,
                                        streq(t[i].what, "sig by another key") ? other : t[i].key);
                        assert_int_equal(json_object_set_new(cmd, "sig", json_string(jws)), 0);
                } else if (streq(t[i].raw, "LONG")) {
                        char *big = malloc(COMMAND_CLOUD_SIG_MAX + 2);
                        assert_non_null(big);
                        memset(big, 'A', COMMAND_CLOUD_SIG_MAX + 1);
                        big[10] = big[20] = '.';
                        big[COMMAND_CLOUD_SIG_MAX + 1] = '\0';
                        assert_int_equal(json_object_set_new(cmd, "sig", json_string(big)), 0);
                        free(big);
                } else if (t[i].raw[0]) {
                        json_t *v = json_loads(t[i].raw, JSON_DECODE_ANY, NULL);
                        assert_non_null(v);
                        assert_int_equal(json_object_set_new(cmd, "sig", v), 0);
                }
                r = command_cloud_sig_check(cmd, "hub-1", vk, kid, &why);
                if ((r == 0) != t[i].ok)
                        fail_msg("case \"%s\": r=%d (%s), want %s", t[i].what, r, why ? why : "", t[i].ok ? "valid" : "refused");
                if (!t[i].ok)
                        assert_non_null(why);
                /* One bit of the signature of a valid one changed: refused. */
                if (t[i].ok) {
                        size_t n = strlen(jws);
                        jws[n - 3] = jws[n - 3] == 'A' ? 'B' : 'A';
                        assert_int_equal(json_object_set_new(cmd, "sig", json_string(jws)), 0);
                        assert_int_equal(command_cloud_sig_check(cmd, "hub-1", vk, kid, NULL), -EBADMSG);
                }
                json_decref(cmd);
        }
        hubkey_free(vendor);
        hubkey_free(other);
}

static void test_payload_add_cloud(void **state) {
        char buf[64] = "{\"a\":1}";
        int n = command_payload_add_cloud(buf, strlen(buf), sizeof buf, "h.p.s-_");

        assert_int_equal(n, (int) strlen("{\"a\":1,\"cloud\":\"h.p.s-_\"}"));
        assert_string_equal(buf, "{\"a\":1,\"cloud\":\"h.p.s-_\"}");
        strcpy(buf, "{\"a\":1}");
        assert_int_equal(command_payload_add_cloud(buf, strlen(buf), sizeof buf, "a\"b"), -EINVAL);
        assert_int_equal(command_payload_add_cloud(buf, strlen(buf), 12, "abcdefghijkl"), -ENOBUFS);
        assert_string_equal(buf, "{\"a\":1}");
        assert_int_equal(command_payload_add_cloud(buf, 0, sizeof buf, "a"), -EINVAL);
}

/* ---- commands_acks_from_spool() ---- */

/* A status frame as a bulb sends it; the signature is 64 bytes of nothing (the search does not
 * verify: the frame was verified before it was spooled). */
static char *status_frame(const char *dev, int64_t seq, const char *ack_id, bool ok, const char *err) {
        char header[128], payload[512], *out;
        char hb[B64URL_BUF(sizeof header)], pb[B64URL_BUF(sizeof payload)], sb[B64URL_BUF(64)];
        uint8_t sig[64] = { 0 };
        int n;

        (void) snprintf(header, sizeof header, "{\"alg\":\"ES256\",\"kid\":\"%s\",\"typ\":\"iothub-status\"}", dev);
        n = snprintf(payload, sizeof payload, "{\"dev\":\"%s\",\"seq\":%" PRId64 ",\"iat\":%d,\"state\":{\"on\":true}",
                     dev, seq, NOW);
        if (ack_id && err)
                n += snprintf(payload + n, sizeof payload - (size_t) n,
                              ",\"ack\":{\"id\":\"%s\",\"ok\":%s,\"err\":\"%s\"}", ack_id, ok ? "true" : "false", err);
        else if (ack_id)
                n += snprintf(payload + n, sizeof payload - (size_t) n, ",\"ack\":{\"id\":\"%s\",\"ok\":%s}", ack_id,
                              ok ? "true" : "false");
        (void) snprintf(payload + n, sizeof payload - (size_t) n, "}");
        (void) b64url_encode((const uint8_t *) header, strlen(header), hb);
        (void) b64url_encode((const uint8_t *) payload, strlen(payload), pb);
        (void) b64url_encode(sig, sizeof sig, sb);
        assert_true(asprintf(&out, "%s.%s.%s", hb, pb, sb) > 0);
        return out;
}

static char spooldir[64];
static struct db *spooldb;

static void spool_add(const char *dev, int64_t seq, const char *ack_id, bool ok, const char *err, int64_t at) {
        char *jws = status_frame(dev, seq, ack_id, ok, err);
        struct frame f;

        /* What the live path would have accepted. */
        assert_int_equal(frame_parse((const uint8_t *) jws, strlen(jws), dev, 4096, &f), FRAME_OK);
        assert_int_equal(spool_append(spooldb, dev, seq, (const uint8_t *) jws, strlen(jws), at), 0);
        free(jws);
}

static int spool_setup(void **state) {
        char *err = NULL;

        strcpy(spooldir, "/tmp/test-commands-spool-XXXXXX");
        assert_non_null(mkdtemp(spooldir));
        assert_int_equal(db_open(spooldir, &spooldb, &err), 0);
        assert_int_equal(spool_open(spooldb, &err), 0);
        /* The smallest segments (16 KiB), so that a few hundred frames make several. */
        spool_set_max_bytes(spooldb, 64 * 1024);
        return 0;
}

/* The state directory and its spool/, file by file (no shell). */
static int spool_teardown(void **state) {
        DIR *d;
        char path[256];

        db_close(spooldb);
        spooldb = NULL;
        (void) snprintf(path, sizeof path, "%s/spool", spooldir);
        if ((d = opendir(path))) {
                for (struct dirent *de; (de = readdir(d));)
                        if (de->d_name[0] != '.') {
                                char f[512];
                                (void) snprintf(f, sizeof f, "%s/%s", path, de->d_name);
                                (void) unlink(f);
                        }
                (void) closedir(d);
        }
        (void) rmdir(path);
        if ((d = opendir(spooldir))) {
                for (struct dirent *de; (de = readdir(d));)
                        if (de->d_name[0] != '.') {
                                char f[512];
                                (void) snprintf(f, sizeof f, "%s/%s", spooldir, de->d_name);
                                (void) unlink(f);
                        }
                (void) closedir(d);
        }
        (void) rmdir(spooldir);
        return 0;
}

#define T0 (INT64_C(1700000000) * 1000000)
#define SEC INT64_C(1000000)

static void test_acks_from_spool(void **state) {
        struct command_ack_wait w[4];
        struct command_ack_scan scan;
        int64_t seq_a = 0, seq_b = 0;

        /* An old segment or more of bulb A's frames, from before any of the commands came,
         * one of them with an ack of an id that "c3" reuses (it cannot be c3's). */
        for (int i = 0; i < 120; i++)
                spool_add("bulb-a", ++seq_a, i == 7 ? "c3" : NULL, true, NULL, T0 + i * SEC);
        /* The commands came at T0 + 1000 s. Then: bulb B acks c1 (c1 is bulb A's: ignored), A
         * acks an id no command has, A's frames without acks, A acks c1 (failed, with a reason),
         * A acks c1 again (the first found wins), B acks c2. */
        spool_add("bulb-b", ++seq_b, "c1", true, NULL, T0 + 1001 * SEC);
        spool_add("bulb-a", ++seq_a, "c9", true, NULL, T0 + 1002 * SEC);
        for (int i = 0; i < 60; i++)
                spool_add("bulb-a", ++seq_a, NULL, true, NULL, T0 + (1003 + i) * SEC);
        spool_add("bulb-a", ++seq_a, "c1", false, "jammed", T0 + 1100 * SEC);
        int64_t c1_seq = seq_a;
        spool_add("bulb-a", ++seq_a, "c1", true, NULL, T0 + 1101 * SEC);
        spool_add("bulb-b", ++seq_b, "c2", true, NULL, T0 + 1102 * SEC);
        int64_t c2_seq = seq_b;

        w[0] = (struct command_ack_wait){ .id = "c1", .dev = "bulb-a", .since_usec = T0 + 1000 * SEC };
        w[1] = (struct command_ack_wait){ .id = "c2", .dev = "bulb-b", .since_usec = T0 + 1000 * SEC };
        w[2] = (struct command_ack_wait){ .id = "c3", .dev = "bulb-a", .since_usec = T0 + 1000 * SEC };
        w[3] = (struct command_ack_wait){ .id = "c9", .dev = "bulb-c", .since_usec = T0 + 1000 * SEC };
        assert_int_equal(commands_acks_from_spool(spooldb, w, 4, &scan), 0);
        assert_true(w[0].found);
        assert_false(w[0].ok);
        assert_string_equal(w[0].err, "jammed");
        assert_int_equal(w[0].seq, c1_seq);
        assert_true(w[1].found);
        assert_true(w[1].ok);
        assert_string_equal(w[1].err, "");
        assert_int_equal(w[1].seq, c2_seq);
        assert_false(w[2].found); /* its id in a frame from before it came */
        assert_false(w[3].found); /* its id acked by another bulb */
        assert_int_equal(scan.found, 2);
        /* Only the recent frames of A and B were parsed, none of the 120 old ones (B's ack of
         * c1 not even that, when c2's ack in a newer segment was found first). */
        assert_in_range(scan.parsed, 64, 65);
        /* And the walk stopped in the old frames' segments: not all 185 were read. */
        assert_true(scan.frames < 185);

        /* Looked for since the spool's start, c3's id in the old frame counts (the time bound
         * is what keeps it out above). */
        struct command_ack_wait c3 = { .id = "c3", .dev = "bulb-a", .since_usec = 0 };
        assert_int_equal(commands_acks_from_spool(spooldb, &c3, 1, &scan), 0);
        assert_true(c3.found);
        assert_int_equal(c3.seq, 8);

        /* Every frame uploaded (the cursor past them): what is still in the segments counts
         * (a segment retires only after a later commit is on disk). */
        uint64_t count = 0;
        assert_int_equal(spool_delete(spooldb, 1, 1000, &count, NULL), 0);
        assert_int_equal(count, 185);
        w[0].found = w[1].found = false;
        assert_int_equal(commands_acks_from_spool(spooldb, w, 2, &scan), 0);
        assert_true(w[0].found);
        assert_true(w[1].found);

        /* The old segments retired with the upload (no sync thread here: at once), and what was
         * in them is not looked at any more. */
        assert_int_equal(commands_acks_from_spool(spooldb, &c3, 1, &scan), 0);
        assert_false(c3.found);

        /* Nothing waits: nothing read. */
        assert_int_equal(commands_acks_from_spool(spooldb, NULL, 0, &scan), 0);
        assert_int_equal(scan.frames, 0);
        assert_int_equal(commands_acks_from_spool(NULL, w, 1, &scan), -EINVAL);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_id),          cmocka_unit_test(test_check),
                cmocka_unit_test(test_check_fields), cmocka_unit_test(test_payload),
                cmocka_unit_test(test_jws),         cmocka_unit_test(test_result_body),
                cmocka_unit_test(test_parse_answer), cmocka_unit_test(test_cloud_sig),
                cmocka_unit_test(test_payload_add_cloud),
        };

        const struct CMUnitTest spool_tests[] = {
                cmocka_unit_test_setup_teardown(test_acks_from_spool, spool_setup, spool_teardown),
        };
        int failed = cmocka_run_group_tests(tests, key_setup, key_teardown);

        return failed + cmocka_run_group_tests(spool_tests, NULL, NULL);
}
