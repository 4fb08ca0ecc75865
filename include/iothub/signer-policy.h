/* SPDX-License-Identifier: MIT */
/* What iothub-signer(8) agrees to sign (issue 14, iothub-signer(8) "POLICY"), as pure functions of
 * the request's fields, the configuration and the time, so that they can be unit-tested
 * (tests/unit/test-signer-policy.c) and fuzzed (tests/fuzz/fuzz-signer.c). Each check returns 0
 * or -EPERM with a static one-line reason (no request bytes in it) in *ret_why.
 *
 * Origins are compared with a small strict parser of our own, not libcurl's CURLU: the signer
 * must not link libcurl (a network library in the one process that holds the TPM), and
 * OpenSSL's OSSL_parse_url() is an HTTP client helper that takes what we refuse (user info,
 * percent-encoded hosts) and, in OpenSSL 3.0, reads a ':' in the path or query as the port
 * ("https://a.b/x?y=:1" is host "a.b/x?y=", port 1; found by tests/fuzz/fuzz-signer.c). Ours takes only what the configured https:// URLs of
 * the hub look like, and refuses everything else rather than guessing how another parser would
 * read it. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "iothub/conf.h"
#include "iothub/hubkey.h"

#define SIGNER_URL_MAX 2048
#define SIGNER_HOST_MAX 253
#define SIGNER_COMMAND_LIFETIME_MAX_S 86400 /* exp - iat of a command, at most */

/* scheme://host[:port] of an absolute https URL (RFC 3986 3.1, 3.2, 6.2.2.1, 6.2.3): scheme and
 * host lower-cased, the port 443 when absent. Accepted: "https://" (any case), then a host of
 * [A-Za-z0-9.-] (non-empty labels, no trailing dot) or an IPv6 literal "[" hex digits, ':' and
 * '.' "]" (no zone), then optionally ':' and 1..5 digits of 1..65535, then the end, '/', '?'
 * or '#'. Refused: user info ('@'), '%' or '\\' anywhere, a byte outside 0x21..0x7e, more than
 * SIGNER_URL_MAX bytes. Returns 0 or -EINVAL. */
struct signer_origin {
        char host[SIGNER_HOST_MAX + 1];
        uint16_t port;
};
int signer_origin_parse(const char *url, size_t len, struct signer_origin *ret);
bool signer_origin_equal(const struct signer_origin *a, const struct signer_origin *b);

struct verify_key;
struct signer_policy {
        bool have_cloud, have_issuer;
        struct signer_origin cloud;  /* [cloud] url */
        struct signer_origin issuer; /* [oauth] issuer */
        const char *cloud_path;      /* [cloud] url's path, borrowed, without trailing '/' */
        size_t cloud_path_len;       /* 0: the URL has none ("https://cloud.example") */
        const char *hub_id;          /* [hub] id, borrowed from the configuration */
        unsigned max_clock_skew_s;   /* [frames] max_clock_skew_s */
        struct verify_key *command_key; /* [cloud] command_key_file, NULL when not set */
        char command_kid[HUBKEY_ID_LEN + 1];
};
/* From the configuration (borrowed: c must outlive p); reads [cloud] command_key_file. A [cloud]
 * url with a query, a fragment or a dot segment in its path is refused (no request built on it
 * could pass signer_policy_http()). 0 or a negative errno with a malloc'ed reason in *ret_error
 * when not NULL. */
int signer_policy_init(struct signer_policy *p, const struct iothub_conf *c, char **ret_error);
void signer_policy_done(struct signer_policy *p);

/* GET, POST or PUT: the methods of the requests iothubd sends; nothing else is signed. */
bool signer_method_is_allowed(const char *method);

/* One of the requests iothubd sends to the cloud (PROTOCOL.md 3 and 5), as signer-policy.c's
 * table lists them: method and target_uri are [cloud] url's origin and path, then
 * "/v1/hubs/<[hub] id>" and the rest of one row's path, a command id where the row has one (not
 * "." or ".."), the query "wait=<1..3 digits>" on the command poll and no query elsewhere, no
 * fragment. '%' anywhere refuses the URI (signer_origin_parse()), so no percent-encoded '/' or
 * dot segment can hide in it. */
bool signer_policy_is_cloud_request(const struct signer_policy *p, const char *method, const char *uri);

/* SIGN_HTTP: signer_policy_is_cloud_request(); authorization (required: the signature covers it,
 * PROTOCOL.md 3) is printable ASCII with single spaces. */
int signer_policy_http(const struct signer_policy *p, const char *method, const char *target_uri,
                       const char *authorization, const char **ret_why);
/* SIGN_DPOP: url is of [oauth] issuer's origin with method POST (the token, device authorization
 * and revocation endpoints, PROTOCOL.md 4), or a request signer_policy_is_cloud_request() takes
 * (a DPoP-bound token on the cloud's requests, RFC 9449 7.1); ath (NULL: none) is 43 base64url
 * characters; nonce (NULL: none) is RFC 9449 8.1 NQCHARs. An endpoint of the issuer's metadata on
 * another origin than the issuer's is refused. */
int signer_policy_dpop(const struct signer_policy *p, const char *method, const char *url, const char *ath,
                       const char *nonce, const char **ret_why);

/* SIGN_COMMAND at now (Unix seconds): iat within max_clock_skew_s of now, iat < exp, exp - iat at
 * most SIGNER_COMMAND_LIFETIME_MAX_S, exp in the future; dev a device id, id a command id; set a
 * JSON object the command path takes (commands-internal.h: on, bri, ct, xy); with a command key,
 * cloud_jws (NULL: none) the vendor's valid JWS over this hub, id, dev, exp and set (PROTOCOL.md
 * 5). On success *ret_set holds the parsed set. */
struct command_set;
int signer_policy_command(const struct signer_policy *p, int64_t now, const char *dev, const char *id,
                          uint64_t iat, uint64_t exp, const char *set, size_t set_len, const char *cloud_jws,
                          struct command_set *ret_set, const char **ret_why);

/* A token bucket over all signing operations: rate a second, burst at most, starting full.
 * True when one token was taken at now_usec (monotonic). Zero-initialised is a fresh bucket. */
struct signer_bucket {
        bool started;
        double tokens;
        uint64_t last_usec;
};
bool signer_bucket_take(struct signer_bucket *b, double rate, double burst, uint64_t now_usec);

/* Who may ask what (issue 14 stage 2; iothub.conf(5) [signer]). The signer serves two users,
 * each with its op set: [signer] client_user (iothub-uplink: the cloud's requests and sign-in)
 * and [signer] command_user (iothubd: the bulbs' commands). A peer that is both (one user named
 * twice, as in a test bed) has the union. */
enum signer_role {
        SIGNER_ROLE_CLIENT = 1u << 0,  /* KEY_INFO, SIGN_HTTP, SIGN_DPOP, TOKENS_*, ATTEST_*, STATUS,
                                        * CANCEL */
        SIGNER_ROLE_COMMAND = 1u << 1, /* KEY_INFO, SIGN_COMMAND, STATUS, CANCEL */
};
/* The roles of a peer of uid (0: none, refused at accept). */
unsigned signer_policy_roles(uid_t uid, uid_t client_uid, uid_t command_uid);
/* Whether a peer of roles (a mask of enum signer_role) may ask op; false for an unknown op. */
bool signer_policy_op_allowed(unsigned roles, unsigned op);
/* "client_user" or "command_user" (or both, "client_user and command_user"): the roles a
 * refusal names; "no role" for 0. */
const char *signer_policy_roles_to_string(unsigned roles);
