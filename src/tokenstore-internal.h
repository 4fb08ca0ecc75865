/* SPDX-License-Identifier: MIT */
/* Private to tokenstore.c and its tests (tests/fuzz/fuzz-tokenstore.c): the format of tokens.enc
 * (see tokenstore.c) and its decoding once the data key is known, without files or a TPM. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "iothub/tokenstore.h"

#define MAGIC "IOTHTOK1"
#define MAGIC_LEN 8
#define NONCE_LEN 12 /* NIST SP 800-38D 5.2.1.1: 96 bits, the recommended IV length */
#define TAG_LEN 16
#define DATA_KEY_LEN 32 /* AES-256 */
#define ENC_OVERHEAD (MAGIC_LEN + NONCE_LEN + TAG_LEN)

/* Whether buf can be a tokens.enc: the magic, and room for the nonce, the tag and "{}". Pure. */
bool tokenstore_is_file(const uint8_t *buf, size_t len);
/* Decrypts and parses the bytes of tokens.enc under the data key, with the hub id as additional
 * data. Returns 0 and *ret (free with oauth_tokens_done()); -ENOMSG when buf is no tokens file
 * (tokenstore_is_file); -EBADMSG when it does not authenticate; -EUCLEAN when it authenticates but
 * its plaintext is not the strict token JSON; -ENOMEM, -EIO. Pure (no file, no TPM). */
int tokenstore_decode(const uint8_t key[DATA_KEY_LEN], const char *hub_id, const uint8_t *buf, size_t len,
                      struct oauth_tokens *ret);
