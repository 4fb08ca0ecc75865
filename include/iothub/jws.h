/* SPDX-License-Identifier: MIT */
/* JWS Compact Serialization (RFC 7515 7.1) signed with ES256 (RFC 7518 3.4), the one builder of
 * the command JWS (PROTOCOL.md 3) and the DPoP proof (RFC 9449 4.2). Pure but for the signer. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "iothub/hubkey.h"

/* Signs msg (the JWS signing input) and writes the raw r||s (RFC 7518 3.4) to ret_sig.
 * Returns 0 or a negative errno. */
typedef int (*jws_sign_t)(void *userdata, const void *msg, size_t len, uint8_t ret_sig[HUBKEY_SIG_LEN]);

/* BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature over the first two),
 * malloc'ed into *ret. header and payload are taken as given (the caller serialises them).
 * Returns 0, -EINVAL for an empty part, -ENOMEM, or the signer's error; *ret untouched then. */
int jws_compact_sign(const char *header, size_t header_len, const char *payload, size_t payload_len,
                     jws_sign_t sign, void *userdata, char **ret);

/* The same in two steps, for a signature made asynchronously (hubkey_sign_async()):
 * jws_compact_prepare() gives the JWS signing input BASE64URL(header) "." BASE64URL(payload)
 * (RFC 7515 5.1; *ret_len bytes, not NUL-terminated) in a malloc'ed buffer with room for the
 * rest; the key signs those *ret_len bytes; jws_compact_finish() appends "." BASE64URL(sig) in
 * place and NUL-terminates: the buffer is then the JWS Compact. 0, -EINVAL or -ENOMEM. */
int jws_compact_prepare(const char *header, size_t header_len, const char *payload, size_t payload_len, char **ret,
                        size_t *ret_len);
void jws_compact_finish(char *input, size_t len, const uint8_t sig[HUBKEY_SIG_LEN]);
