/* SPDX-License-Identifier: MIT */
/* libFuzzer target for iothub-signer's side of its channel (src/signer-proto.c and
 * src/signer-policy.c): the input is the byte stream a client writes on one connection. It is
 * framed and decoded message by message as the signer does (stopping at the first that does not
 * decode, where the signer closes the connection), and every request that decodes goes through
 * the policy the signer applies to its op. Invariants:
 *   - a decoded message has its op's required fields, only its op's fields, each within its
 *     limits, no NUL in a text, and encodes back (with the encoder) to a message that decodes to
 *     the same fields;
 *   - what the policy lets through for SIGN_HTTP is of the configured cloud origin (and OpenSSL's
 *     own URL parser, OSSL_parse_url(), where it reads the URL, reads the same host and port),
 *     with Authorization, its path under [cloud] url's, naming this hub, without '%', dot
 *     segment or fragment, and a query only on the command poll (checked here without the
 *     policy's table); for SIGN_DPOP a POST to the issuer's origin or such a cloud request; and
 *     for SIGN_COMMAND within the time rules, with a payload that
 *     command_payload() builds; with a vendor key configured, a command is let through only with
 *     a vendor JWS (never here: the key's private half is not known);
 *   - every request's op is in the op set of the peers that may ask it and no other
 *     (signer_policy_op_allowed(): iothubd's KEY_INFO, SIGN_COMMAND, STATUS and CANCEL; the
 *     uplink's every op but SIGN_COMMAND);
 *   - CANCEL is never an answer (the codec refuses one, with or without an error). */
#include <errno.h>
#include <inttypes.h>
#include <strings.h>

#include <openssl/http.h>

#include "../../src/commands-internal.h"
#include "check.h"
#include "iothub/signer-policy.h"
#include "iothub/signer-proto.h"
#include "iothub/verify.h"

#define FUZZ_NOW INT64_C(1764633600)
#define FUZZ_CLOUD "https://cloud.example:8443/api"
#define FUZZ_HUB_PATH "/api/v1/hubs/hub-1" /* every signed request's path starts so */
#define FUZZ_ISSUER "https://Login.Example/realms/x"

/* A P-256 public key whose private half was thrown away. */
static const char vendor_pem[] = "-----BEGIN PUBLIC KEY-----\n"
                                 "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE7w8opxLqQ9sRvreAv1HFl9pQ0x+2\n"
                                 "KguwvKF7iQMLaDwabUaQlr92XhfflYgG0EALCS2W7yKVMbJc45tTYcRPVw==\n"
                                 "-----END PUBLIC KEY-----\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct signer_policy policy, policy_key;
static struct iothub_conf conf;

static void setup(void) {
        static bool done;
        enum frame_alg alg;

        if (done)
                return;
        done = true;
        conf.hub.id = (char *) "hub-1";
        conf.cloud.url = (char *) FUZZ_CLOUD;
        conf.oauth.issuer = (char *) FUZZ_ISSUER;
        conf.frames.max_clock_skew_s = 300;
        CHECK(signer_policy_init(&policy, &conf, NULL) == 0);
        CHECK(signer_policy_init(&policy_key, &conf, NULL) == 0);
        CHECK(verify_key_from_pem(vendor_pem, strlen(vendor_pem), &policy_key.command_key, &alg) == 0);
        memcpy(policy_key.command_kid, "0123456789012345678901234567890123456789012", HUBKEY_ID_LEN + 1);
}

static char *text(const struct signer_msg *m, unsigned tag) {
        char *s = NULL;
        int r = signer_msg_strdup(m, tag, &s);
        CHECK(r == 0 || r == -ENOENT);
        if (s)
                CHECK(strlen(s) == m->f[tag].len); /* no NUL inside */
        return s;
}

static void check_fields(const struct signer_msg *m) {
        struct signer_buf b = {};
        struct signer_msg again;

        for (unsigned t = 1; t < _SIGNER_TAG_MAX; t++) {
                enum signer_kind kind;
                uint32_t lo, hi;
                int rule = signer_tag_rule(m->op, m->answer, t);

                CHECK(signer_tag_limits(t, &kind, &lo, &hi) == 0);
                if (rule == 2 && m->status == 0)
                        CHECK(m->f[t].present);
                if (!m->f[t].present)
                        continue;
                CHECK(rule > 0 && m->status == 0);
                CHECK(m->f[t].len >= lo && m->f[t].len <= hi);
                if (kind == SIGNER_KIND_TEXT)
                        CHECK(!memchr(m->f[t].data, 0, m->f[t].len));
        }
        /* Encoded again (fields in tag order), it decodes to the same. */
        CHECK(signer_msg_begin(&b, m->id, m->op, m->answer, m->status) == 0);
        for (unsigned t = 1; t < _SIGNER_TAG_MAX; t++)
                if (m->f[t].present)
                        CHECK(signer_msg_add(&b, t, m->f[t].data, m->f[t].len) == 0);
        CHECK(signer_msg_end(&b) == 0);
        CHECK(signer_msg_decode(b.data, b.len, &again) == 0);
        CHECK(again.id == m->id && again.op == m->op && again.answer == m->answer && again.status == m->status);
        for (unsigned t = 1; t < _SIGNER_TAG_MAX; t++) {
                CHECK(again.f[t].present == m->f[t].present && again.f[t].len == m->f[t].len);
                if (m->f[t].present && m->f[t].len)
                        CHECK(memcmp(again.f[t].data, m->f[t].data, m->f[t].len) == 0);
        }
        signer_buf_done(&b);
}

/* What OpenSSL's URL parser reads as host and port agrees with the origin we let through. */
static void check_origin_openssl(const char *url, const struct signer_origin *o) {
        char *scheme = NULL, *user = NULL, *host = NULL, *port = NULL, *path = NULL, *query = NULL, *frag = NULL;
        int port_num = 0;
        size_t n;

        /* OpenSSL 3.0 refuses some valid paths ("/a/://b": it looks for "://" anywhere), and
         * takes a ':' in the path or query for the port ("https://a.b/x?y=:1" is host "a.b/x?y="
         * port 1 to it; both found by this target): where it reads a plain host, it must read
         * the same origin as we do. */
        if (OSSL_parse_url(url, &scheme, &user, &host, &port, &port_num, &path, &query, &frag) != 1)
                return;
        if (strpbrk(host, "/?#"))
                goto out;
        CHECK(strcasecmp(scheme, "https") == 0);
        CHECK(user == NULL || user[0] == '\0');
        /* OpenSSL 3.0 says 0 (and "0") when the URL has no port: the scheme's default, 443. */
        CHECK(port_num == o->port || (port_num == 0 && o->port == 443));
        /* An IPv6 literal with or without its brackets (they differ between OpenSSL versions). */
        n = strlen(host);
        if (o->host[0] == '[' && host[0] != '[')
                CHECK(n + 2 == strlen(o->host) && strncasecmp(host, o->host + 1, n) == 0);
        else
                CHECK(strcasecmp(host, o->host) == 0);
out:
        OPENSSL_free(scheme);
        OPENSSL_free(user);
        OPENSSL_free(host);
        OPENSSL_free(port);
        OPENSSL_free(path);
        OPENSSL_free(query);
        OPENSSL_free(frag);
}

/* A cloud request the policy let through, checked against PROTOCOL.md 3 by other means than its
 * table: the path under FUZZ_HUB_PATH, no '%', no dot or empty segment, no fragment, a query only
 * on GET .../commands, the method one the protocol uses. */
static void check_cloud_request(const char *method, const char *uri) {
        const char *path = uri + 8 + strcspn(uri + 8, "/?#");
        const char *q = strchr(path, '?');
        size_t len = q ? (size_t) (q - path) : strlen(path);

        CHECK(streq(method, "GET") || streq(method, "POST") || streq(method, "PUT"));
        CHECK(!strchr(uri, '%') && !strchr(uri, '#'));
        CHECK(strncmp(path, FUZZ_HUB_PATH, strlen(FUZZ_HUB_PATH)) == 0);
        CHECK(len == strlen(FUZZ_HUB_PATH) || path[strlen(FUZZ_HUB_PATH)] == '/');
        for (size_t at = 0; at < len;) {
                size_t n = strcspn(path + at + 1, "/?");
                CHECK(path[at] == '/');
                CHECK(n > 0 && !(n == 1 && path[at + 1] == '.') &&
                      !(n == 2 && path[at + 1] == '.' && path[at + 2] == '.'));
                at += 1 + n;
        }
        if (q) {
                CHECK(streq(method, "GET") && len > 9 && memcmp(q - 9, "/commands", 9) == 0);
                CHECK(strncmp(q, "?wait=", 6) == 0 && strlen(q + 6) >= 1 && strlen(q + 6) <= 3);
        }
        if (streq(method, "GET"))
                CHECK(q != NULL);
}

/* Who may ask it (signer_policy_op_allowed()): iothubd's user only KEY_INFO, SIGN_COMMAND, STATUS
 * and CANCEL; the uplink's every op but SIGN_COMMAND; one user in both roles every op; no role,
 * nothing. */
static void check_roles(const struct signer_msg *m) {
        bool command = m->op == SIGNER_OP_KEY_INFO || m->op == SIGNER_OP_SIGN_COMMAND ||
                       m->op == SIGNER_OP_STATUS || m->op == SIGNER_OP_CANCEL;

        CHECK(signer_policy_op_allowed(SIGNER_ROLE_COMMAND, m->op) == command);
        CHECK(signer_policy_op_allowed(SIGNER_ROLE_CLIENT, m->op) == (m->op != SIGNER_OP_SIGN_COMMAND));
        CHECK(signer_policy_op_allowed(SIGNER_ROLE_CLIENT | SIGNER_ROLE_COMMAND, m->op));
        CHECK(!signer_policy_op_allowed(0, m->op));
}

static void check_policy(const struct signer_msg *m) {
        const struct signer_policy *p = (m->id & 1) ? &policy_key : &policy;
        _cleanup_free_ char *method = text(m, SIGNER_TAG_METHOD);
        const char *why = NULL;
        struct signer_origin o;

        switch (m->op) {
        case SIGNER_OP_SIGN_HTTP: {
                _cleanup_free_ char *uri = text(m, SIGNER_TAG_TARGET_URI), *auth = text(m, SIGNER_TAG_AUTHORIZATION);
                if (signer_policy_http(p, method, uri, auth, &why) < 0) {
                        CHECK(why != NULL);
                        return;
                }
                CHECK(signer_method_is_allowed(method));
                CHECK(signer_origin_parse(uri, strlen(uri), &o) == 0 && signer_origin_equal(&o, &p->cloud));
                CHECK(!strchr(uri, '#'));
                CHECK(auth && fuzz_is_printable_ascii(auth));
                check_cloud_request(method, uri);
                check_origin_openssl(uri, &o);
                return;
        }
        case SIGNER_OP_SIGN_DPOP: {
                _cleanup_free_ char *url = text(m, SIGNER_TAG_URL), *ath = text(m, SIGNER_TAG_ATH),
                                    *nonce = text(m, SIGNER_TAG_NONCE);
                if (signer_policy_dpop(p, method, url, ath, nonce, &why) < 0) {
                        CHECK(why != NULL);
                        return;
                }
                CHECK(signer_origin_parse(url, strlen(url), &o) == 0);
                CHECK(signer_origin_equal(&o, &p->cloud) || signer_origin_equal(&o, &p->issuer));
                if (!(signer_origin_equal(&o, &p->issuer) && streq(method, "POST")))
                        check_cloud_request(method, url);
                CHECK(!nonce || fuzz_is_printable_ascii(nonce));
                check_origin_openssl(url, &o);
                return;
        }
        case SIGNER_OP_SIGN_COMMAND: {
                _cleanup_free_ char *dev = text(m, SIGNER_TAG_DEV), *id = text(m, SIGNER_TAG_CMD_ID),
                                    *set = text(m, SIGNER_TAG_SET), *cloud = text(m, SIGNER_TAG_CLOUD_JWS);
                struct command_set cs = {};
                char payload[COMMAND_PAYLOAD_MAX];
                uint64_t iat = 0, exp = 0;
                int n;

                CHECK(signer_msg_u64(m, SIGNER_TAG_IAT, &iat) == 0 && signer_msg_u64(m, SIGNER_TAG_EXP, &exp) == 0);
                if (signer_policy_command(p, FUZZ_NOW, dev, id, iat, exp, set, strlen(set), cloud, &cs, &why) < 0) {
                        CHECK(why != NULL);
                        return;
                }
                CHECK(!p->command_key); /* no vendor JWS can verify: its key is unknown */
                CHECK((int64_t) iat >= FUZZ_NOW - 300 && (int64_t) iat <= FUZZ_NOW + 300);
                CHECK(exp > iat && exp - iat <= SIGNER_COMMAND_LIFETIME_MAX_S && (int64_t) exp > FUZZ_NOW);
                CHECK(fuzz_id_chars_valid(dev, DEVICE_ID_MAX) && fuzz_id_chars_valid(id, COMMAND_ID_MAX));
                n = command_payload(p->hub_id, dev, id, (int64_t) iat, (int64_t) exp, &cs, payload, sizeof payload);
                CHECK(n > 0 && (size_t) n < sizeof payload);
                return;
        }
        default:
                return;
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        size_t at = 0;

        setup();
        /* As the signer reads a connection: message after message, until one does not decode. */
        while (at < size) {
                struct signer_msg m;
                size_t need = 0;
                int r = signer_msg_frame(data + at, size - at, &need);

                if (r <= 0)
                        break;
                CHECK(need >= SIGNER_HEADER_LEN && need <= size - at && need <= SIGNER_PREFIX_LEN + SIGNER_MSG_MAX);
                if (signer_msg_decode(data + at, need, &m) < 0)
                        break;
                check_fields(&m);
                CHECK(!(m.answer && m.op == SIGNER_OP_CANCEL));
                if (!m.answer) {
                        check_roles(&m);
                        check_policy(&m);
                }
                at += need;
        }
        return 0;
}
