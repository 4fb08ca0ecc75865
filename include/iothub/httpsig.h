/* SPDX-License-Identifier: MIT */
/* HTTP Message Signatures (RFC 9421) with ecdsa-p256-sha256 by the hub key, and
 * Content-Digest (RFC 9530), exactly as PROTOCOL.md section 3 lays them out. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "iothub/hubkey.h"

#define HTTPSIG_LABEL "hub"
#define HTTPSIG_VALIDITY_S 60
#define HTTPSIG_NONCE_BYTES 16

/* The headers to add to one request, each a full "Name: value" line (malloc'ed). */
struct httpsig_headers {
        char *content_digest;  /* "Content-Digest: sha-256=:<b64>:"; NULL without a body */
        char *signature_input; /* "Signature-Input: hub=(...);created=..;expires=..;nonce=..;keyid=..;alg=.." */
        char *signature;       /* "Signature: hub=:<b64 r||s>:" */
};

/* Signs one request. method e.g. "POST"; target_uri the full request URI (the @target-uri
 * derived component, RFC 9421 2.2.2); authorization the full value of the Authorization
 * header (e.g. "Bearer abc"), covered as the "authorization" component; body may be NULL
 * (then "content-digest" is left out of the covered components). created is Unix seconds
 * (expires = created + HTTPSIG_VALIDITY_S); the nonce is fresh random bytes each call.
 * One hub key signature per call. Returns 0 or a negative errno. */
int httpsig_sign(struct hubkey *k, const char *method, const char *target_uri, const char *authorization,
                 const uint8_t *body, size_t body_len, int64_t created, struct httpsig_headers *ret);

/* The same in two steps, for a signature made asynchronously (hubkey_sign_async()):
 * httpsig_prepare() checks the inputs and builds everything but the signature (the nonce is drawn
 * here); the key then signs base (base_len bytes; ECDSA P-256 over its SHA-256, RFC 9421
 * 3.3.4); httpsig_complete() takes the 64-byte r||s and hands over the three headers, leaving
 * *p empty. httpsig_pending_done() wipes the base (it holds the Authorization value) and frees
 * the rest; NULL and emptied ones accepted. */
struct httpsig_pending {
        char *base; /* the RFC 9421 2.5 signature base: what the key signs */
        size_t base_len;
        char *content_digest;  /* as in struct httpsig_headers */
        char *signature_input;
};
int httpsig_prepare(struct hubkey *k, const char *method, const char *target_uri, const char *authorization,
                    const uint8_t *body, size_t body_len, int64_t created, struct httpsig_pending *ret);
int httpsig_complete(struct httpsig_pending *p, const uint8_t sig[HUBKEY_SIG_LEN], struct httpsig_headers *ret);
void httpsig_pending_done(struct httpsig_pending *p);

/* Builds the RFC 9421 2.5 signature base for the same inputs and a given nonce and key id
 * (exposed for tests). Returns 0 or a negative errno; *ret malloc'ed. */
int httpsig_signature_base(const char *method, const char *target_uri, const char *authorization,
                           const char *content_digest_value, const char *signature_params, char **ret);

void httpsig_headers_done(struct httpsig_headers *h);
