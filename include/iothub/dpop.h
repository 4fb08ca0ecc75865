/* SPDX-License-Identifier: MIT */
/* DPoP proofs (RFC 9449 4.2) by the hub key, built in two steps so that the signature can be
 * made asynchronously, by iothub-signer(8); iothubd uses dpop_htu() and dpop_ath(). Pure but
 * for the randomness of jti. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define DPOP_ATH_LEN 43 /* base64url of a SHA-256, no padding */

/* RFC 9449 4.2: htu is the target URI without query and fragment. Returns a malloc'ed copy of
 * url up to the first '?' or '#', or NULL on allocation failure. */
char *dpop_htu(const char *url);

/* The JWS signing input of a proof: header {"typ":"dpop+jwt","alg":"ES256","jwk":jwk} (the
 * public JWK as given, no private member), claims {"jti":<16 random bytes>,"htm":method,
 * "htu":dpop_htu(url),"iat":now[,"ath":ath][,"nonce":nonce]}. ath (NULL: none) is already
 * base64url(SHA-256(access token)), DPOP_ATH_LEN characters; nonce NULL or "" for none. Finish
 * with jws_compact_finish() over the key's r||s. Returns 0 or a negative errno (-EINVAL for
 * a bad ath). */
int dpop_prepare(const json_t *jwk, const char *method, const char *url, const char *ath, const char *nonce,
                 int64_t now, char **ret, size_t *ret_len);
/* Whether nonce is one a proof can carry (RFC 9449 8.1: nonce = 1*NQCHAR, NQCHAR = %x21 / %x23-5B
 * / %x5D-7E), as iothub-signer's policy requires it, and at most max bytes. NULL: false. */
bool dpop_nonce_is_valid(const char *nonce, size_t max);
/* ath for an access token: base64url(SHA-256(the ASCII token)) into ret (NUL-terminated). */
int dpop_ath(const char *access_token, char ret[static DPOP_ATH_LEN + 1]);
