/* SPDX-License-Identifier: MIT */
/* What iothub-signer(8) agrees to sign (include/iothub/signer-policy.h). Pure. */
#include <ctype.h>
#include <stdio.h>

#include <jansson.h>

#include "commands-internal.h"
#include "iothub/dpop.h"
#include "iothub/signer-policy.h"
#include "iothub/signer-proto.h"
#include "iothub/verify.h"

static bool is_digit(char c) {
        return c >= '0' && c <= '9';
}

int signer_origin_parse(const char *url, size_t len, struct signer_origin *ret) {
        struct signer_origin o = {};
        size_t at, end, host_end;
        unsigned long port = 443;

        if (!url || !ret || len > SIGNER_URL_MAX || len < 9)
                return -EINVAL;
        /* Visible ASCII only: no space, control, DEL or non-ASCII byte that a later reader could
         * strip, fold or split on. '%': no percent-encoded host to decode; '\\': a browser-style
         * parser reads it as '/', ours would not. */
        for (size_t i = 0; i < len; i++)
                if (url[i] < 0x21 || url[i] > 0x7e || url[i] == '%' || url[i] == '\\')
                        return -EINVAL;
        /* RFC 3986 6.2.2.1: the scheme is case-insensitive. https only (PROTOCOL.md 3). */
        if (strncasecmp(url, "https://", 8) != 0)
                return -EINVAL;
        at = 8;
        end = at;
        while (end < len && url[end] != '/' && url[end] != '?' && url[end] != '#')
                end++;
        /* RFC 3986 3.2.1: user info is refused outright ("https://cloud@evil"). */
        if (memchr(url + at, '@', end - at))
                return -EINVAL;
        if (at < end && url[at] == '[') {
                /* RFC 3986 3.2.2 IP-literal, IPv6 only, no zone id (RFC 6874 needs '%'). */
                const char *close = memchr(url + at, ']', end - at);
                if (!close)
                        return -EINVAL;
                host_end = (size_t) (close - url) + 1;
                if (host_end - at < 4 || host_end - at > SIGNER_HOST_MAX)
                        return -EINVAL;
                for (size_t i = at + 1; i < host_end - 1; i++)
                        if (!isxdigit((unsigned char) url[i]) && url[i] != ':' && url[i] != '.')
                                return -EINVAL;
                if (!memchr(url + at, ':', host_end - at))
                        return -EINVAL;
        } else {
                host_end = at;
                while (host_end < end && url[host_end] != ':')
                        host_end++;
                if (host_end == at || host_end - at > SIGNER_HOST_MAX)
                        return -EINVAL;
                for (size_t i = at; i < host_end; i++) {
                        char c = url[i];
                        if (!isalnum((unsigned char) c) && c != '-' && c != '.')
                                return -EINVAL;
                        /* No empty label, no leading or trailing dot: "a..b", ".a", "a." would
                         * name the same host for some resolvers and not for a comparison. */
                        if (c == '.' && (i == at || i + 1 == host_end || url[i + 1] == '.'))
                                return -EINVAL;
                }
        }
        /* RFC 3986 3.2.3 port, and 6.2.3: an absent port is the scheme's default. An empty one
         * (":") is refused, as is anything but 1..5 digits of 1..65535. */
        if (host_end < end) {
                size_t digits = end - host_end - 1;
                if (url[host_end] != ':' || digits < 1 || digits > 5)
                        return -EINVAL;
                port = 0;
                for (size_t i = host_end + 1; i < end; i++) {
                        if (!is_digit(url[i]))
                                return -EINVAL;
                        port = port * 10 + (unsigned long) (url[i] - '0');
                }
                if (port < 1 || port > 65535)
                        return -EINVAL;
        }
        for (size_t i = at; i < host_end; i++)
                o.host[i - at] = (char) tolower((unsigned char) url[i]);
        o.port = (uint16_t) port;
        *ret = o;
        return 0;
}

bool signer_origin_equal(const struct signer_origin *a, const struct signer_origin *b) {
        return a && b && a->port == b->port && streq(a->host, b->host);
}

/* Where a URL's path starts: after "https://" and the authority (signer_origin_parse() took it). */
static size_t path_start(const char *url) {
        return 8 + strcspn(url + 8, "/?#");
}

/* RFC 3986 3.3 segment ".." or "." between s and end (no '/' inside). */
static bool is_dot_segment(const char *s, size_t len) {
        return (len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.');
}

/* [cloud] url's path, which cloud.c puts before every request's own (trailing '/' dropped, as
 * cloud_new() drops it): no query or fragment, no dot segment. */
static int base_path_of(const char *url, const char **ret, size_t *ret_len) {
        const char *path = url + path_start(url);
        size_t len = strlen(path);

        if (strpbrk(path, "?#"))
                return -EINVAL;
        while (len > 0 && path[len - 1] == '/')
                len--;
        for (size_t at = 0; at < len;) {
                size_t n = strcspn(path + at + 1, "/");
                if (at + 1 + n > len)
                        n = len - at - 1;
                if (is_dot_segment(path + at + 1, n))
                        return -EINVAL;
                at += 1 + n;
        }
        *ret = path;
        *ret_len = len;
        return 0;
}

int signer_policy_init(struct signer_policy *p, const struct iothub_conf *c, char **ret_error) {
        struct signer_policy n = {};
        int r;

        if (!p || !c || !c->hub.id)
                return -EINVAL;
        n.hub_id = c->hub.id;
        n.max_clock_skew_s = c->frames.max_clock_skew_s;
        if (c->cloud.url) {
                if (signer_origin_parse(c->cloud.url, strlen(c->cloud.url), &n.cloud) < 0)
                        return set_error_message(ret_error, -EINVAL,
                                                 "[cloud] url: the signer cannot take its origin (see iothub-signer(8), POLICY)");
                n.have_cloud = true;
                r = base_path_of(c->cloud.url, &n.cloud_path, &n.cloud_path_len);
                if (r < 0)
                        return set_error_message(ret_error, r,
                                                 "[cloud] url: the signer takes no query, fragment or dot segment "
                                                 "in it (see iothub-signer(8), POLICY)");
        }
        if (c->oauth.issuer) {
                if (signer_origin_parse(c->oauth.issuer, strlen(c->oauth.issuer), &n.issuer) < 0)
                        return set_error_message(ret_error, -EINVAL,
                                                 "[oauth] issuer: the signer cannot take its origin (see iothub-signer(8), POLICY)");
                n.have_issuer = true;
        }
        if (c->cloud.command_key_file) {
                r = command_key_load(c->cloud.command_key_file, &n.command_key, n.command_kid, ret_error);
                if (r < 0)
                        return r;
        }
        *p = n;
        return 0;
}

void signer_policy_done(struct signer_policy *p) {
        if (!p)
                return;
        verify_key_free(p->command_key);
        *p = (struct signer_policy){};
}

/* The methods of the request table below (cloud_requests) and of the issuer's endpoints (POST):
 * nothing iothubd sends uses another, so nothing else is signed, whatever the table says later. */
bool signer_method_is_allowed(const char *method) {
        return method && (streq(method, "GET") || streq(method, "POST") || streq(method, "PUT"));
}

static int refuse(const char **ret_why, const char *why) {
        if (ret_why)
                *ret_why = why;
        return -EPERM;
}

/* An Authorization value goes into the signature base as one line (RFC 9421 2.1): printable
 * ASCII, single spaces between words, none at either end. */
static bool header_value_is_valid(const char *v) {
        size_t n = strlen(v);

        if (n == 0 || v[0] == ' ' || v[n - 1] == ' ')
                return false;
        for (size_t i = 0; i < n; i++)
                if (v[i] < 0x20 || v[i] > 0x7e || (v[i] == ' ' && v[i + 1] == ' '))
                        return false;
        return true;
}

/* The requests iothubd sends to the cloud, after [cloud] url's own path: method, path and query
 * shape. "{hub}" is [hub] id exactly, "{cmd}" one command id (PROTOCOL.md 2: [A-Za-z0-9._-],
 * not "." or ".."), "{n}" 1..3 digits. Whatever cloud.c, commands.c or events.c does not send is
 * not here: a compromised iothubd gets no signature for any other path of the cloud. */
static const struct cloud_request {
        const char *method;
        const char *path;
        const char *query; /* NULL: the URI has no '?' */
} cloud_requests[] = {
        /* PROTOCOL.md 3 (registration) and 5 (the attested registration sends the same request
         * with its "attestation" object). */
        { "POST", "/v1/hubs/{hub}", NULL },
        /* PROTOCOL.md 5, iothub-protocol(7) "Attestation": the challenge of the round trip. */
        { "POST", "/v1/hubs/{hub}/attest/challenge", NULL },
        /* PROTOCOL.md 3: the list of bulbs. */
        { "PUT", "/v1/hubs/{hub}/devices", NULL },
        /* PROTOCOL.md 3: a status batch. */
        { "POST", "/v1/hubs/{hub}/status", NULL },
        /* PROTOCOL.md 3: the command long poll, its only query. */
        { "GET", "/v1/hubs/{hub}/commands", "wait={n}" },
        /* PROTOCOL.md 3: a command's result. */
        { "POST", "/v1/hubs/{hub}/commands/{cmd}/result", NULL },
        /* PROTOCOL.md 5: security events. */
        { "POST", "/v1/hubs/{hub}/events", NULL },
};

/* Whether s (len bytes) is exactly pat, its placeholders filled as above. */
static bool pattern_match(const char *pat, const char *s, size_t len, const char *hub_id) {
        size_t at = 0;

        while (*pat) {
                if (strncmp(pat, "{hub}", 5) == 0) {
                        size_t n = strlen(hub_id);
                        if (len - at < n || memcmp(s + at, hub_id, n) != 0)
                                return false;
                        at += n;
                        pat += 5;
                } else if (strncmp(pat, "{cmd}", 5) == 0) {
                        size_t n = 0;
                        while (at + n < len && s[at + n] != '/')
                                n++;
                        if (!command_id_is_valid(s + at, n))
                                return false;
                        at += n;
                        pat += 5;
                } else if (strncmp(pat, "{n}", 3) == 0) {
                        size_t n = 0;
                        while (at + n < len && is_digit(s[at + n]))
                                n++;
                        if (n < 1 || n > 3)
                                return false;
                        at += n;
                        pat += 3;
                } else {
                        if (at >= len || s[at] != *pat)
                                return false;
                        at++;
                        pat++;
                }
        }
        return at == len;
}

bool signer_policy_is_cloud_request(const struct signer_policy *p, const char *method, const char *uri) {
        struct signer_origin o;
        const char *path, *query;
        size_t path_len;

        if (!p || !method || !uri || !p->have_cloud || !p->hub_id)
                return false;
        if (signer_origin_parse(uri, strlen(uri), &o) < 0 || !signer_origin_equal(&o, &p->cloud))
                return false;
        /* A request target never has a fragment (RFC 9110 7.1). */
        if (strchr(uri, '#'))
                return false;
        path = uri + path_start(uri);
        query = strchr(path, '?');
        path_len = query ? (size_t) (query - path) : strlen(path);
        if (path_len < p->cloud_path_len || memcmp(path, p->cloud_path, p->cloud_path_len) != 0)
                return false;
        path += p->cloud_path_len;
        path_len -= p->cloud_path_len;
        for (size_t i = 0; i < ELEMENTSOF(cloud_requests); i++) {
                const struct cloud_request *q = &cloud_requests[i];
                if (!streq(method, q->method) || !pattern_match(q->path, path, path_len, p->hub_id))
                        continue;
                if (!q->query && !query)
                        return true;
                if (q->query && query && pattern_match(q->query, query + 1, strlen(query + 1), p->hub_id))
                        return true;
        }
        return false;
}

int signer_policy_http(const struct signer_policy *p, const char *method, const char *target_uri,
                       const char *authorization, const char **ret_why) {
        struct signer_origin o;

        if (!p || !target_uri)
                return refuse(ret_why, "missing input");
        if (!signer_method_is_allowed(method))
                return refuse(ret_why, "method is not GET, POST or PUT");
        if (!p->have_cloud)
                return refuse(ret_why, "no [cloud] url is configured");
        if (signer_origin_parse(target_uri, strlen(target_uri), &o) < 0)
                return refuse(ret_why, "target URI is not a plain absolute https URL");
        if (!signer_origin_equal(&o, &p->cloud))
                return refuse(ret_why, "target URI is not of [cloud] url's origin");
        if (strchr(target_uri, '#'))
                return refuse(ret_why, "target URI has a fragment");
        if (!signer_policy_is_cloud_request(p, method, target_uri))
                return refuse(ret_why, "method and target URI are no request of PROTOCOL.md 3 or 5 for this hub");
        /* PROTOCOL.md 3: every request carries one, and the signature covers it. */
        if (!authorization)
                return refuse(ret_why, "no authorization");
        if (!header_value_is_valid(authorization))
                return refuse(ret_why, "authorization is not one line of printable ASCII");
        return 0;
}

int signer_policy_dpop(const struct signer_policy *p, const char *method, const char *url, const char *ath,
                       const char *nonce, const char **ret_why) {
        struct signer_origin o;

        if (!p || !url)
                return refuse(ret_why, "missing input");
        if (!signer_method_is_allowed(method))
                return refuse(ret_why, "method is not GET, POST or PUT");
        if (signer_origin_parse(url, strlen(url), &o) < 0)
                return refuse(ret_why, "URL is not a plain absolute https URL");
        if (!(p->have_issuer && signer_origin_equal(&o, &p->issuer)) &&
            !(p->have_cloud && signer_origin_equal(&o, &p->cloud)))
                return refuse(ret_why, "URL is of neither [oauth] issuer's nor [cloud] url's origin");
        /* PROTOCOL.md 4: the token, device authorization and revocation endpoints are POSTed to
         * (RFC 6749 3.2, RFC 8628 3.1, RFC 7009 2.1); on the cloud, one of its requests (an origin
         * may be both). */
        if (!(p->have_issuer && signer_origin_equal(&o, &p->issuer) && streq(method, "POST")) &&
            !signer_policy_is_cloud_request(p, method, url))
                return refuse(ret_why, "method and URL are neither a POST to [oauth] issuer's origin nor a "
                                       "request of PROTOCOL.md 3 or 5 for this hub");
        if (ath && (strlen(ath) != HUBKEY_ID_LEN || !b64url_chars_are_valid(ath, strlen(ath))))
                return refuse(ret_why, "ath is not 43 base64url characters");
        /* RFC 9449 8.1 NQCHARs, the rule the uplink keeps a nonce by (dpop.h); the channel's
         * field limit bounds its length. */
        if (nonce && !dpop_nonce_is_valid(nonce, SIZE_MAX))
                return refuse(ret_why, "nonce is not RFC 9449 NQCHARs");
        return 0;
}

int signer_policy_command(const struct signer_policy *p, int64_t now, const char *dev, const char *id,
                          uint64_t iat, uint64_t exp, const char *set, size_t set_len, const char *cloud_jws,
                          struct command_set *ret_set, const char **ret_why) {
        struct command_fields f;
        const char *why = NULL;
        json_t *cmd = NULL, *s = NULL;
        int r;

        if (!p || !dev || !id || !set || !ret_set || now < 0)
                return refuse(ret_why, "missing input");
        if (!p->hub_id)
                return refuse(ret_why, "no hub id");
        /* Far below INT64_MAX, so that the arithmetic below cannot overflow. */
        if (iat > (UINT64_C(1) << 40) || exp > (UINT64_C(1) << 40))
                return refuse(ret_why, "iat or exp out of range");
        if ((int64_t) iat > now + (int64_t) p->max_clock_skew_s || (int64_t) iat < now - (int64_t) p->max_clock_skew_s)
                return refuse(ret_why, "iat is not within [frames] max_clock_skew_s of the signer's clock");
        if (exp <= iat || exp - iat > SIGNER_COMMAND_LIFETIME_MAX_S)
                return refuse(ret_why, "exp is not after iat, or more than 24 h after it");
        if (!device_id_is_valid(dev, strlen(dev)))
                return refuse(ret_why, "dev is not a device id");
        if (!command_id_is_valid(id, strlen(id)))
                return refuse(ret_why, "id is not a command id");
        s = json_loadb(set, set_len, JSON_REJECT_DUPLICATES, NULL);
        if (!json_is_object(s) || json_object_size(s) == 0) {
                json_decref(s);
                return refuse(ret_why, "set is not a non-empty JSON object");
        }
        /* The command as the cloud sent it: command_check() is the daemon's own check of it
         * (set members and ranges, exp in the future and at most a day ahead). */
        cmd = json_pack("{s:s,s:s,s:I,s:o}", "id", id, "dev", dev, "exp", (json_int_t) exp, "set", s);
        if (!cmd)
                return refuse(ret_why, "out of memory");
        if (command_check(cmd, now, &f, &why) != COMMAND_OK) {
                r = refuse(ret_why, why ?: "command refused");
                goto out;
        }
        /* PROTOCOL.md 5: with a command key the hub countersigns only what the cloud signed. */
        if (p->command_key) {
                if (!cloud_jws) {
                        r = refuse(ret_why, "[cloud] command_key_file is set and the command has no cloud JWS");
                        goto out;
                }
                if (json_object_set_new(cmd, "sig", json_string(cloud_jws)) < 0 ||
                    command_cloud_sig_check(cmd, p->hub_id, p->command_key, p->command_kid, &why) < 0) {
                        r = refuse(ret_why, why ?: "cloud JWS refused");
                        goto out;
                }
        }
        *ret_set = f.set;
        r = 0;
out:
        json_decref(cmd);
        return r;
}

bool signer_bucket_take(struct signer_bucket *b, double rate, double burst, uint64_t now_usec) {
        if (!b->started) {
                b->started = true;
                b->tokens = burst;
                b->last_usec = now_usec;
        }
        if (now_usec > b->last_usec) {
                b->tokens += (double) (now_usec - b->last_usec) / 1e6 * rate;
                if (b->tokens > burst)
                        b->tokens = burst;
                b->last_usec = now_usec;
        }
        if (b->tokens < 1.0)
                return false;
        b->tokens -= 1.0;
        return true;
}

unsigned signer_policy_roles(uid_t uid, uid_t client_uid, uid_t command_uid) {
        return (uid == client_uid ? SIGNER_ROLE_CLIENT : 0u) |
               (uid == command_uid ? SIGNER_ROLE_COMMAND : 0u);
}

/* The op sets, by op (spec of stage 2): what the uplink needs to sign the cloud's requests, sign
 * in and register, and what iothubd needs to sign a bulb's command; KEY_INFO and STATUS for both
 * (the key id is in each signature they handle, the counters in iothubctl status), and CANCEL for
 * both: it only ends a request of the same connection, and is never answered (a refusal would be
 * an answer the client's codec refuses). */
static const unsigned op_roles[_SIGNER_OP_MAX] = {
        [SIGNER_OP_KEY_INFO] = SIGNER_ROLE_CLIENT | SIGNER_ROLE_COMMAND,
        [SIGNER_OP_SIGN_HTTP] = SIGNER_ROLE_CLIENT,
        [SIGNER_OP_SIGN_DPOP] = SIGNER_ROLE_CLIENT,
        [SIGNER_OP_SIGN_COMMAND] = SIGNER_ROLE_COMMAND,
        [SIGNER_OP_TOKENS_GET] = SIGNER_ROLE_CLIENT,
        [SIGNER_OP_TOKENS_PUT] = SIGNER_ROLE_CLIENT,
        [SIGNER_OP_TOKENS_ERASE] = SIGNER_ROLE_CLIENT,
        [SIGNER_OP_ATTEST_BEGIN] = SIGNER_ROLE_CLIENT,
        [SIGNER_OP_ATTEST_ANSWER] = SIGNER_ROLE_CLIENT,
        [SIGNER_OP_STATUS] = SIGNER_ROLE_CLIENT | SIGNER_ROLE_COMMAND,
        [SIGNER_OP_CANCEL] = SIGNER_ROLE_CLIENT | SIGNER_ROLE_COMMAND,
};

bool signer_policy_op_allowed(unsigned roles, unsigned op) {
        return op < _SIGNER_OP_MAX && (op_roles[op] & roles) != 0;
}

const char *signer_policy_roles_to_string(unsigned roles) {
        switch (roles & (SIGNER_ROLE_CLIENT | SIGNER_ROLE_COMMAND)) {
        case SIGNER_ROLE_CLIENT:
                return "client_user";
        case SIGNER_ROLE_COMMAND:
                return "command_user";
        case SIGNER_ROLE_CLIENT | SIGNER_ROLE_COMMAND:
                return "client_user and command_user";
        }
        return "no role";
}
