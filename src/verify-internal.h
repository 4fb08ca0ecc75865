/* SPDX-License-Identifier: MIT */
/* Private to verify.c and its tests (tests/fuzz/fuzz-pem.c): the parsing steps of
 * verify_key_from_cert() that come before and after path validation, so that they can be fuzzed
 * without a certificate that chains to a CA. */
#pragma once

#include <openssl/x509.h>

#include "iothub/util.h"

/* Named limits on operator-provided input (keys and certificates, never frames). */
#define VERIFY_PEM_MAX   (64 * 1024)
#define VERIFY_CHAIN_MAX 8 /* intermediates that may follow a device certificate */

/* The PEM input of 'bulb add': one or more CERTIFICATE blocks (RFC 7468 5), white space around
 * them and nothing else, at most VERIFY_CHAIN_MAX after the first. *ret_leaf is the first,
 * *ret_chain the others. Returns 0, -EINVAL, -E2BIG (too many) or -ENOMEM. */
int certs_from_pem(const char *pem, size_t len, X509 **ret_leaf, STACK_OF(X509) **ret_chain);
/* The subject's only commonName, which must be a device id, into ret_id (DEVICE_ID_MAX+1 bytes).
 * Returns 0 or -EINVAL. */
int cert_device_id(X509 *cert, char *ret_id);
