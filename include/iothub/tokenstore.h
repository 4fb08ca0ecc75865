/* SPDX-License-Identifier: MIT */
/* The user's OAuth tokens at rest: AES-256-GCM under a 256-bit data key that is sealed by the
 * TPM (a keyedHash sealed-data object under the storage primary key), so that a copied SD
 * card yields nothing. Only the sealed blob and the ciphertext are on disk, both mode 0600,
 * in the state directory. With [key] backend = file the data key is a 0600 file instead (a
 * development aid; the caller warns). Secrets are wiped from memory after use. */
#pragma once

#include <stdint.h>

#include "iothub/conf.h"
#include "iothub/hubkey.h"
#include "iothub/util.h"

#define TOKENSTORE_FILE "tokens.enc"      /* ciphertext */
#define TOKENSTORE_KEY_FILE "tokens.key"  /* the sealed data key (or the raw key with backend file) */
#define TOKENSTORE_MAX (64 * 1024)        /* bytes of plaintext at most */

struct oauth_tokens {
        char *access_token;
        char *refresh_token; /* may be NULL */
        char *token_type;    /* "Bearer" or "DPoP" */
        char *scope;         /* may be NULL */
        int64_t expires_at;  /* Unix seconds, 0 when unknown */
};

/* Encrypts and writes the tokens atomically (new data key sealed on first use, through the
 * hub key's TPM connection: hubkey_seal/hubkey_unseal). Returns 0 or
 * a negative errno; ret_error gets a one-line reason (never a secret). */
int tokenstore_save(const struct iothub_conf *c, struct hubkey *k, const struct oauth_tokens *t, char **ret_error);
/* Reads and decrypts. -ENOENT when no tokens are stored; -EBADMSG when the ciphertext does not
 * authenticate (tampered, or another hub's/TPM's file); -ENOKEY when tokens.key is missing;
 * -EPERM when a file is accessible by group or others; other negative errno on failure. */
int tokenstore_load(const struct iothub_conf *c, struct hubkey *k, struct oauth_tokens *ret, char **ret_error);
/* Removes the ciphertext and the sealed key (overwriting both first). 0 when there were none. */
int tokenstore_erase(const struct iothub_conf *c);
/* Wipes and frees the members; the struct itself is the caller's. Inline: iothubd keeps its
 * tokens in memory and clears them, without linking the token files' code (issue 14). */
static inline void oauth_tokens_done(struct oauth_tokens *t) {
        if (!t)
                return;
        erase_and_freep_str(&t->access_token);
        erase_and_freep_str(&t->refresh_token);
        erase_and_freep_str(&t->token_type);
        erase_and_freep_str(&t->scope);
        t->expires_at = 0;
}
