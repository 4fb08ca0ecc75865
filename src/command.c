/* SPDX-License-Identifier: MIT */
/* One command of PROTOCOL.md 2, 3 and 5 (commands-internal.h), pure: its checks, the vendor's
 * signature over it, the payload and the JWS the hub key signs. Moved out of commands.c so that
 * iothub-signer(8), which builds the JWS itself from the fields it is given, links it without
 * the daemon's command loop (MQTT, SQLite, libcurl). */
#include <inttypes.h>
#include <stdio.h>

#include <openssl/evp.h>

#include "commands-internal.h"
#include "iothub/frame.h"
#include "iothub/jws.h"
#include "iothub/verify.h"

static const char *const reason_names[_COMMAND_REASON_MAX] = {
        [COMMAND_BAD_ID] = "bad_id",
        [COMMAND_BAD_SIGNATURE] = "bad_signature",
        [COMMAND_MALFORMED] = "malformed",
        [COMMAND_BAD_SET] = "bad_set",
        [COMMAND_EXPIRED] = "expired",
        [COMMAND_BAD_EXP] = "bad_exp",
        [COMMAND_UNKNOWN_DEVICE] = "unknown_device",
        [COMMAND_REVOKED] = "revoked",
};

const char *command_reason_to_string(enum command_reason r) {
        if (r <= COMMAND_OK || r >= _COMMAND_REASON_MAX)
                return NULL;
        return reason_names[r];
}

bool command_id_is_valid(const char *s, size_t len) {
        if (!s || len < 1 || len > COMMAND_ID_MAX)
                return false;
        if ((len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.'))
                return false;
        return id_chars_are_valid(s, len);
}

static bool json_is_unit_number(const json_t *v, double *ret) {
        double d;

        if (json_is_integer(v))
                d = (double) json_integer_value(v);
        else if (json_is_real(v))
                d = json_real_value(v);
        else
                return false;
        if (!(d >= 0.0 && d <= 1.0)) /* also refuses NaN */
                return false;
        *ret = d == 0.0 ? 0.0 : d; /* no -0 */
        return true;
}

static enum command_reason check_set(const json_t *set, struct command_set *s, const char **why) {
        const char *key;
        json_t *v;

        *s = (struct command_set){};
        if (json_object_size(set) == 0) {
                *why = "set is empty";
                return COMMAND_BAD_SET;
        }
        /* At most 4 members can pass: the loop ends at the first unknown one. */
        json_object_foreach((json_t *) set, key, v) {
                if (streq(key, "on")) {
                        if (!json_is_boolean(v)) {
                                *why = "set.on is not a boolean";
                                return COMMAND_BAD_SET;
                        }
                        s->has_on = true;
                        s->on = json_is_true(v);
                } else if (streq(key, "bri")) {
                        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 254) {
                                *why = "set.bri is not an integer in 0..254";
                                return COMMAND_BAD_SET;
                        }
                        s->has_bri = true;
                        s->bri = (int) json_integer_value(v);
                } else if (streq(key, "ct")) {
                        if (!json_is_integer(v) || json_integer_value(v) < 153 || json_integer_value(v) > 500) {
                                *why = "set.ct is not an integer in 153..500";
                                return COMMAND_BAD_SET;
                        }
                        s->has_ct = true;
                        s->ct = (int) json_integer_value(v);
                } else if (streq(key, "xy")) {
                        if (!json_is_array(v) || json_array_size(v) != 2 ||
                            !json_is_unit_number(json_array_get(v, 0), &s->xy[0]) ||
                            !json_is_unit_number(json_array_get(v, 1), &s->xy[1])) {
                                *why = "set.xy is not two numbers in [0,1]";
                                return COMMAND_BAD_SET;
                        }
                        s->has_xy = true;
                } else {
                        *why = "set has a member other than on, bri, ct, xy";
                        return COMMAND_BAD_SET;
                }
        }
        return COMMAND_OK;
}

enum command_reason command_check(const json_t *cmd, int64_t now_s, struct command_fields *ret,
                                  const char **ret_why) {
        const char *why_dummy = NULL, **why = ret_why ? ret_why : &why_dummy;
        const json_t *id, *dev, *set, *exp;
        const char *key;
        json_t *v;
        enum command_reason r;

        *ret = (struct command_fields){};
        *why = NULL;
        id = json_object_get(cmd, "id"); /* NULL when cmd is no object */
        if (!json_is_string(id) || !command_id_is_valid(json_string_value(id), json_string_length(id))) {
                *why = "id is not 1..64 of [A-Za-z0-9._-]";
                return COMMAND_BAD_ID;
        }
        memcpy(ret->id, json_string_value(id), json_string_length(id) + 1);

        dev = json_object_get(cmd, "dev");
        set = json_object_get(cmd, "set");
        exp = json_object_get(cmd, "exp");
        if (json_is_string(dev) && device_id_is_valid(json_string_value(dev), json_string_length(dev)))
                memcpy(ret->dev, json_string_value(dev), json_string_length(dev) + 1);
        if (json_is_integer(exp))
                ret->exp = json_integer_value(exp);
        json_object_foreach((json_t *) cmd, key, v)
                if (!streq(key, "id") && !streq(key, "dev") && !streq(key, "set") && !streq(key, "exp") &&
                    !(streq(key, "sig") && json_is_string(v))) {
                        *why = "a member other than id, dev, set, exp, sig (a string)";
                        return COMMAND_MALFORMED;
                }
        if (!json_is_string(dev) || !json_is_object(set) || !json_is_integer(exp)) {
                *why = "dev, set or exp missing or of the wrong type";
                return COMMAND_MALFORMED;
        }
        r = check_set(set, &ret->set, why);
        if (r != COMMAND_OK)
                return r;
        /* RFC 7519 4.1.4: on or after exp the command must not be acted on. */
        if (ret->exp <= now_s) {
                *why = "exp has passed";
                return COMMAND_EXPIRED;
        }
        if (ret->exp - now_s > COMMAND_EXP_AHEAD_MAX_S) {
                *why = "exp is more than a day ahead";
                return COMMAND_BAD_EXP;
        }
        if (!ret->dev[0]) {
                *why = "dev is not a device id";
                return COMMAND_UNKNOWN_DEVICE;
        }
        return COMMAND_OK;
}

/* The shortest "%.<p>g" of v that reads back as v: 0.3 stays "0.3", not "0.29999999999999999". */
static int format_unit_number(double v, char *buf, size_t size) {
        for (int p = 1; p <= 17; p++) {
                int n = snprintf(buf, size, "%.*g", p, v);
                if (n < 0 || (size_t) n >= size)
                        return -ENOBUFS;
                if (strtod(buf, NULL) == v)
                        return n;
        }
        return -EINVAL;
}

int command_payload(const char *hub, const char *dev, const char *id, int64_t iat, int64_t exp,
                    const struct command_set *set, char *buf, size_t size) {
        char x[32], y[32];
        size_t len;
        int n;

        if (!hub || !dev || !id || !set || !buf || !device_id_is_valid(hub, strlen(hub)) ||
            !device_id_is_valid(dev, strlen(dev)) || !command_id_is_valid(id, strlen(id)))
                return -EINVAL;
        if (!set->has_on && !set->has_bri && !set->has_ct && !set->has_xy)
                return -EINVAL;
        n = snprintf(buf, size, "{\"hub\":\"%s\",\"dev\":\"%s\",\"id\":\"%s\",\"iat\":%" PRId64 ",\"exp\":%" PRId64
                     ",\"set\":{", hub, dev, id, iat, exp);
        if (n < 0 || (size_t) n >= size)
                return -ENOBUFS;
        len = (size_t) n;
#define APPEND(...)                                                                                        \
        do {                                                                                               \
                n = snprintf(buf + len, size - len, __VA_ARGS__);                                          \
                if (n < 0 || (size_t) n >= size - len)                                                     \
                        return -ENOBUFS;                                                                   \
                len += (size_t) n;                                                                         \
        } while (0)
        const char *sep = "";
        if (set->has_on) {
                APPEND("\"on\":%s", set->on ? "true" : "false");
                sep = ",";
        }
        if (set->has_bri) {
                if (set->bri < 0 || set->bri > 254)
                        return -EINVAL;
                APPEND("%s\"bri\":%d", sep, set->bri);
                sep = ",";
        }
        if (set->has_ct) {
                if (set->ct < 153 || set->ct > 500)
                        return -EINVAL;
                APPEND("%s\"ct\":%d", sep, set->ct);
                sep = ",";
        }
        if (set->has_xy) {
                for (int i = 0; i < 2; i++)
                        if (!(set->xy[i] >= 0.0 && set->xy[i] <= 1.0))
                                return -EINVAL;
                if (format_unit_number(set->xy[0] == 0.0 ? 0.0 : set->xy[0], x, sizeof x) < 0 ||
                    format_unit_number(set->xy[1] == 0.0 ? 0.0 : set->xy[1], y, sizeof y) < 0)
                        return -EINVAL;
                APPEND("%s\"xy\":[%s,%s]", sep, x, y);
        }
        APPEND("}}");
#undef APPEND
        return (int) len;
}

/* ---- the vendor's signature (PROTOCOL.md 5) ---- */

/* Decodes one base64url part of a JWS into a NUL-terminated buffer of at most max bytes. */
static int jws_part(const char *s, size_t len, size_t max, uint8_t **ret, size_t *ret_len) {
        _cleanup_free_ uint8_t *buf = NULL;
        ssize_t n;

        if (len == 0 || len > B64URL_LEN(max))
                return -EBADMSG;
        buf = malloc(B64URL_DECODED_MAX(len) + 1);
        if (!buf)
                return -ENOMEM;
        n = b64url_decode(s, len, buf, B64URL_DECODED_MAX(len));
        if (n < 0 || (size_t) n > max)
                return -EBADMSG;
        buf[n] = 0;
        *ret_len = (size_t) n;
        *ret = TAKE_PTR(buf);
        return 0;
}

static json_t *json_object_strict(const uint8_t *buf, size_t len) {
        json_t *o = json_loadb((const char *) buf, len, JSON_REJECT_DUPLICATES, NULL);

        if (o && !json_is_object(o)) {
                json_decref(o);
                return NULL;
        }
        return o;
}

static bool json_string_is(const json_t *v, const char *s) {
        return json_is_string(v) && json_string_length(v) == strlen(s) && streq(json_string_value(v), s);
}

int command_cloud_sig_check(const json_t *cmd, const char *hub_id, struct verify_key *key, const char *kid,
                            const char **ret_why) {
        static const char *const members[] = { "id", "dev", "exp", "set" };
        const char *why_dummy = NULL, **why = ret_why ? ret_why : &why_dummy;
        _cleanup_free_ uint8_t *header = NULL, *payload = NULL, *sig = NULL;
        size_t header_len = 0, payload_len = 0, sig_len = 0;
        const json_t *v = json_object_get(cmd, "sig");
        const char *jws, *dot1, *dot2;
        json_t *h = NULL, *p = NULL;
        size_t len;
        int r = -EBADMSG;

        *why = NULL;
        if (!hub_id || !key || !kid)
                return -EINVAL;
        if (!v) {
                *why = "no sig";
                return -EBADMSG;
        }
        if (!json_is_string(v) || json_string_length(v) > COMMAND_CLOUD_SIG_MAX) {
                *why = "sig is not a string of at most 2048 bytes";
                return -EBADMSG;
        }
        /* RFC 7515 7.1: BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature). */
        jws = json_string_value(v);
        len = json_string_length(v);
        dot1 = memchr(jws, '.', len);
        dot2 = dot1 ? memchr(dot1 + 1, '.', len - (size_t) (dot1 + 1 - jws)) : NULL;
        if (!dot2 || memchr(dot2 + 1, '.', len - (size_t) (dot2 + 1 - jws)) ||
            jws_part(jws, (size_t) (dot1 - jws), COMMAND_CLOUD_PART_MAX, &header, &header_len) < 0 ||
            jws_part(dot1 + 1, (size_t) (dot2 - dot1 - 1), COMMAND_CLOUD_PART_MAX, &payload, &payload_len) < 0 ||
            jws_part(dot2 + 1, len - (size_t) (dot2 + 1 - jws), 64, &sig, &sig_len) < 0) {
                *why = "sig is not a JWS Compact";
                return -EBADMSG;
        }
        /* The header exactly: an "alg" other than ES256 ("none", "HS256": the key decides the
         * algorithm, never the token, RFC 8725 3.1), or any other member ("crit" included), is
         * refused. */
        h = json_object_strict(header, header_len);
        if (!h || json_object_size(h) != 3 || !json_string_is(json_object_get(h, "alg"), "ES256") ||
            !json_string_is(json_object_get(h, "typ"), COMMAND_CLOUD_TYP) ||
            !json_string_is(json_object_get(h, "kid"), kid)) {
                *why = "sig's header is not exactly alg ES256, typ iothub-cloud-cmd and the command key's kid";
                goto out;
        }
        /* RFC 7518 3.4: the signature is over the ASCII of the first two parts as sent. */
        r = verify_signature(key, FRAME_ALG_ES256, (const uint8_t *) jws, (size_t) (dot2 - jws), sig, sig_len);
        if (r < 0) {
                *why = r == -EBADMSG ? "sig does not verify with the command key" : "sig could not be checked";
                goto out;
        }
        r = -EBADMSG;
        p = json_object_strict(payload, payload_len);
        if (!p || json_object_size(p) != 1 + ELEMENTSOF(members) ||
            !json_string_is(json_object_get(p, "hub"), hub_id)) {
                *why = "sig's payload is not exactly hub (this hub), id, dev, exp, set";
                goto out;
        }
        for (size_t i = 0; i < ELEMENTSOF(members); i++) {
                const json_t *a = json_object_get(p, members[i]), *b = json_object_get(cmd, members[i]);
                if (!a || !b || !json_equal((json_t *) a, (json_t *) b)) {
                        *why = "sig is over another command (id, dev, exp or set differ)";
                        goto out;
                }
        }
        r = 0;
out:
        json_decref(h);
        json_decref(p);
        return r;
}

/* RFC 7638 3.3: the thumbprint of an EC key hashes {"crv","kty","x","y"} in this order, no
 * white space. */
static int key_thumbprint(struct verify_key *k, char ret[static HUBKEY_ID_LEN + 1]) {
        _cleanup_free_ char *canon = NULL;
        unsigned char md[32];
        unsigned md_len = 0;
        json_t *jwk = NULL;
        int r;

        r = verify_key_to_jwk(k, &jwk);
        if (r < 0)
                return r;
        if (!json_string_is(json_object_get(jwk, "kty"), "EC") || !json_is_string(json_object_get(jwk, "x")) ||
            !json_is_string(json_object_get(jwk, "y"))) {
                json_decref(jwk);
                return -EOPNOTSUPP;
        }
        canon = strdup_printf("{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}",
                              json_string_value(json_object_get(jwk, "x")), json_string_value(json_object_get(jwk, "y")));
        json_decref(jwk);
        if (!canon)
                return -ENOMEM;
        if (EVP_Digest(canon, strlen(canon), md, &md_len, EVP_sha256(), NULL) != 1 || md_len != sizeof md)
                return -EIO;
        if (b64url_encode(md, sizeof md, ret) != HUBKEY_ID_LEN)
                return -EIO;
        return 0;
}

int command_key_load(const char *path, struct verify_key **ret, char ret_kid[static HUBKEY_ID_LEN + 1],
                     char **ret_error) {
        _cleanup_(verify_key_freep) struct verify_key *k = NULL;
        _cleanup_free_ char *pem = NULL, *err = NULL;
        char kid[HUBKEY_ID_LEN + 1];
        enum frame_alg alg;
        size_t len = 0;
        int r;

        r = read_trusted_file(path, 0, 64 * 1024, &pem, &len, &err);
        if (r < 0) {
                if (ret_error)
                        *ret_error = err ? TAKE_PTR(err) : strdup_printf("cannot read %s: %s", path, strerror(-r));
                return r;
        }
        r = verify_key_from_pem(pem, len, &k, &alg);
        if (r >= 0 && alg != FRAME_ALG_ES256)
                r = -EOPNOTSUPP;
        if (r >= 0)
                r = key_thumbprint(k, kid);
        if (r < 0) {
                if (ret_error)
                        *ret_error = strdup_printf("%s is not a PEM P-256 public key (ES256)", path);
                return r;
        }
        memcpy(ret_kid, kid, sizeof kid);
        *ret = TAKE_PTR(k);
        return 0;
}

int command_payload_add_cloud(char *buf, size_t len, size_t size, const char *jws) {
        size_t jlen;
        int n;

        if (!buf || !jws || len < 2 || len >= size || buf[len - 1] != '}')
                return -EINVAL;
        jlen = strlen(jws);
        for (size_t i = 0; i < jlen; i++)
                if (!b64url_char_is_valid(jws[i]) && jws[i] != '.')
                        return -EINVAL;
        n = snprintf(buf + len - 1, size - (len - 1), ",\"cloud\":\"%s\"}", jws);
        if (n < 0 || (size_t) n >= size - (len - 1)) {
                buf[len - 1] = '}';
                buf[len] = '\0';
                return -ENOBUFS;
        }
        return (int) (len - 1 + (size_t) n);
}

int command_jws_prepare(const char *kid, const char *payload, size_t len, char **ret, size_t *ret_len) {
        char header[128];
        int n;

        if (!kid || !payload || !ret || !ret_len || len == 0 || len > COMMAND_PAYLOAD_MAX)
                return -EINVAL;
        /* The hub key id is base64url (RFC 7638 thumbprint): nothing to escape. */
        if (!b64url_chars_are_valid(kid, strlen(kid)))
                return -EINVAL;
        n = snprintf(header, sizeof header, "{\"alg\":\"ES256\",\"kid\":\"%s\",\"typ\":\"iothub-cmd\"}", kid);
        if (n < 0 || (size_t) n >= sizeof header)
                return -EINVAL;
        /* The whole JWS: the signing input, '.', 86 characters of signature. */
        if (B64URL_LEN((size_t) n) + 1 + B64URL_LEN(len) + 1 + B64URL_LEN(HUBKEY_SIG_LEN) > COMMAND_JWS_MAX)
                return -EINVAL;
        return jws_compact_prepare(header, (size_t) n, payload, len, ret, ret_len);
}
