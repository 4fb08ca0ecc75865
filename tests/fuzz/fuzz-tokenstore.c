/* SPDX-License-Identifier: MIT */
/* libFuzzer target for the sealed-token file tokens.enc (src/tokenstore.c): the bytes on disk, and
 * the JSON inside once AES-256-GCM has opened it. The TPM unseal of the data key is not fuzzed: a
 * fixed test data key stands in for it at tokenstore_decode(). Every input is taken
 *   - as a whole tokens.enc, which must authenticate or be refused (the seeds include real files
 *     sealed under the test key);
 *   - as the plaintext, sealed here with an independent AES-GCM (OpenSSL EVP directly, in the
 *     documented layout "IOTHTOK1" || nonce || ciphertext || tag, AAD = magic || hub id), so that
 *     the strict JSON parser is reached with any bytes.
 * Tokens that come out must be what oauth.c relies on (access_token and token_type present, C
 * strings, expires_at >= 0); flipping any byte of a good file, or another hub id, must make it
 * fail to authenticate. */
#include <errno.h>

#include <openssl/evp.h>

#include "../../src/tokenstore-internal.h"
#include "check.h"

#define FUZZ_HUB_ID "hub-1"
#define FUZZ_PLAIN_MAX TOKENSTORE_MAX

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint8_t fuzz_key[DATA_KEY_LEN] = {
        0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
        0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
};

/* The file format of tokenstore.c, written independently. Returns the file's length. */
static size_t seal(const uint8_t *plain, size_t len, const char *hub_id, uint8_t *out) {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        uint8_t *nonce = out + MAGIC_LEN, *ct = nonce + NONCE_LEN;
        int n;

        CHECK(ctx);
        memcpy(out, "IOTHTOK1", MAGIC_LEN);
        for (size_t i = 0; i < NONCE_LEN; i++)
                nonce[i] = (uint8_t) (0xa0 + i);
        CHECK(EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, fuzz_key, nonce) == 1);
        CHECK(EVP_EncryptUpdate(ctx, NULL, &n, (const uint8_t *) "IOTHTOK1", MAGIC_LEN) == 1);
        CHECK(EVP_EncryptUpdate(ctx, NULL, &n, (const uint8_t *) hub_id, (int) strlen(hub_id)) == 1);
        CHECK(EVP_EncryptUpdate(ctx, ct, &n, plain, (int) len) == 1 && (size_t) n == len);
        CHECK(EVP_EncryptFinal_ex(ctx, ct + len, &n) == 1 && n == 0);
        CHECK(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, ct + len) == 1);
        EVP_CIPHER_CTX_free(ctx);
        return ENC_OVERHEAD + len;
}

static bool string_ok(const char *s) {
        json_t *j;

        if (!s)
                return false;
        j = json_string(s); /* NULL unless valid UTF-8 */
        json_decref(j);
        return j != NULL;
}

static void check_tokens(const struct oauth_tokens *t) {
        CHECK(string_ok(t->access_token) && string_ok(t->token_type));
        CHECK(b64token_is_valid(t->access_token, strlen(t->access_token)));
        CHECK(!t->refresh_token || string_ok(t->refresh_token));
        CHECK(!t->scope || string_ok(t->scope));
        CHECK(t->expires_at >= 0);
}

/* A file that decodes: any changed byte, or another hub id, and it no longer does. */
static void check_tamper(const uint8_t *file, size_t len, size_t where) {
        static uint8_t copy[ENC_OVERHEAD + FUZZ_PLAIN_MAX];
        struct oauth_tokens t = { .access_token = (char *) 0x1 };
        size_t i = where % len;
        int r;

        memcpy(copy, file, len);
        copy[i] ^= 0x01;
        r = tokenstore_decode(fuzz_key, FUZZ_HUB_ID, copy, len, &t);
        CHECK(i < MAGIC_LEN ? r == -ENOMSG : r == -EBADMSG);
        CHECK(tokenstore_decode(fuzz_key, "hub-2", file, len, &t) == -EBADMSG);
        CHECK(t.access_token == (char *) 0x1); /* untouched on failure */
}

static void check_file(const uint8_t *data, size_t size) {
        struct oauth_tokens t = { .access_token = (char *) 0x1 };
        int r;

        r = tokenstore_decode(fuzz_key, FUZZ_HUB_ID, data, size, &t);
        CHECK(r == 0 || r == -ENOMSG || r == -EBADMSG || r == -EUCLEAN);
        CHECK(tokenstore_is_file(data, size) == (r != -ENOMSG));
        if (r < 0) {
                CHECK(t.access_token == (char *) 0x1);
                return;
        }
        check_tokens(&t);
        oauth_tokens_done(&t);
        check_tamper(data, size, size * 7 + 3);
}

static void check_plaintext(const uint8_t *data, size_t size) {
        static uint8_t file[ENC_OVERHEAD + FUZZ_PLAIN_MAX];
        struct oauth_tokens t = { .access_token = (char *) 0x1 };
        size_t len;
        json_t *o;
        int r;

        if (size > FUZZ_PLAIN_MAX)
                return;
        len = seal(data, size, FUZZ_HUB_ID, file);
        r = tokenstore_decode(fuzz_key, FUZZ_HUB_ID, file, len, &t);
        CHECK(r == 0 || r == -EUCLEAN || (r == -ENOMSG && size < 2));
        if (r < 0) {
                CHECK(t.access_token == (char *) 0x1);
                return;
        }
        check_tokens(&t);
        /* Strict: exactly the known members, so the plaintext is an object of 3..5 of them. */
        o = json_loadb((const char *) data, size, JSON_REJECT_DUPLICATES, NULL);
        CHECK(json_is_object(o) && json_object_size(o) >= 3 && json_object_size(o) <= 5);
        CHECK(strcmp(json_string_value(json_object_get(o, "access_token")), t.access_token) == 0);
        CHECK(strcmp(json_string_value(json_object_get(o, "token_type")), t.token_type) == 0);
        CHECK(json_integer_value(json_object_get(o, "expires_at")) == t.expires_at);
        CHECK(strlen(t.access_token) == json_string_length(json_object_get(o, "access_token")));
        json_decref(o);
        oauth_tokens_done(&t);
        check_tamper(file, len, size);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        check_file(data, size);
        check_plaintext(data, size);
        return 0;
}
