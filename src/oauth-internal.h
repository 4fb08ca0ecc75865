/* SPDX-License-Identifier: MIT */
/* The parsers of what an authorization server sends (PROTOCOL.md 4), as pure functions of the
 * received bytes, so that they can be fuzzed (tests/fuzz/fuzz-oauth.c) and unit-tested. Each
 * returns 0 or a negative errno and touches its ret_ argument only on success. The limits are
 * documented in iothub-protocol(7), section LIMITS. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define OAUTH_RESPONSE_MAX (64 * 1024) /* bytes of a JSON answer of the authorization server */
#define OAUTH_TOKEN_MAX 4096           /* bytes of an access, refresh token or device code */
#define OAUTH_URI_MAX 2048             /* bytes of an endpoint or verification URI */
#define OAUTH_USER_CODE_MAX 64         /* bytes of a user code (RFC 8628 6.1: short, typed by hand) */
#define OAUTH_SCOPE_MAX 1024
#define OAUTH_ERROR_CODE_MAX 64 /* bytes of an "error" code (RFC 6749 5.2) we look at */
/* expires_in of a token answer is clamped to this range: below the minimum (0 and negative
 * included) a token would be refreshed every second, above the maximum now + expires_in could
 * overflow and refresh would never happen. */
#define OAUTH_EXPIRES_IN_MIN_S 10
#define OAUTH_EXPIRES_IN_MAX_S (366 * 86400)
/* expires_in of a device authorization answer (RFC 8628 3.2): at most this long a sign-in waits. */
#define OAUTH_DEVICE_EXPIRES_MAX_S 1800
#define OAUTH_INTERVAL_DEFAULT_S 5 /* RFC 8628 3.2: when the server gives none */
#define OAUTH_INTERVAL_MAX_S 60

/* Discovery metadata (RFC 8414 2 and 3.3). */
struct oauth_metadata {
        char *token_endpoint;
        char *device_endpoint;
        char *revocation_endpoint; /* NULL when the server has none */
        bool dpop_es256;           /* ES256 in dpop_signing_alg_values_supported */
};
/* issuer must equal the metadata's issuer (RFC 8414 3.3); every endpoint https. */
int oauth_parse_metadata(const uint8_t *buf, size_t len, const char *issuer, struct oauth_metadata *ret);
void oauth_metadata_done(struct oauth_metadata *m);

/* A device authorization answer (RFC 8628 3.2). */
struct oauth_device_answer {
        char *device_code; /* a secret: wiped by _done */
        char *user_code;
        char *verification_uri;
        char *verification_uri_complete; /* may be NULL */
        int64_t expires_in;              /* 1 .. OAUTH_DEVICE_EXPIRES_MAX_S */
        unsigned interval_s;             /* 1 .. OAUTH_INTERVAL_MAX_S */
};
int oauth_parse_device_answer(const uint8_t *buf, size_t len, struct oauth_device_answer *ret);
void oauth_device_answer_done(struct oauth_device_answer *d);

/* A successful token answer (RFC 6749 5.1). The access token must be an RFC 6750 2.1
 * b64token (it goes into an Authorization header), the refresh token VSCHARs (RFC 6749 A.17). */
struct oauth_token_answer {
        char *access_token;  /* secret */
        char *refresh_token; /* secret, may be NULL */
        char *token_type;    /* "Bearer" or "DPoP", normalised */
        char *scope;         /* may be NULL */
        int64_t expires_in;  /* OAUTH_EXPIRES_IN_MIN_S .. _MAX_S, 0 when absent */
};
/* On -EBADMSG, *ret_why (if ret_why is not NULL) says which check failed, in words that never
 * quote the answer (it may hold tokens). */
int oauth_parse_token_answer(const uint8_t *buf, size_t len, struct oauth_token_answer *ret, const char **ret_why);
void oauth_token_answer_done(struct oauth_token_answer *t);

/* The "error" code of an error answer (RFC 6749 5.2), copied into ret (cap >= 2). -ENOENT when
 * the body is not a JSON object with a string "error", -EBADMSG when the code is not made of the
 * characters 5.2 allows or is longer than OAUTH_ERROR_CODE_MAX. */
int oauth_parse_error(const uint8_t *buf, size_t len, char *ret, size_t cap);

/* The error parameter of the DPoP (or Bearer) challenge of a WWW-Authenticate header value
 * (RFC 9449 7.1, RFC 6750 3): "use_dpop_nonce", "invalid_dpop_proof", "invalid_token", ...
 * copied into ret. -ENOENT when there is no such challenge or parameter. */
int oauth_parse_www_authenticate(const char *value, size_t len, char *ret, size_t cap);


/* RFC 9449 4.2: htu is the target URI without query and fragment. Returns a malloc'ed copy of
 * url up to the first '?' or '#', or NULL on allocation failure. */
char *oauth_dpop_htu(const char *url);
