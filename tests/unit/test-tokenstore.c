/* SPDX-License-Identifier: MIT */
/* src/tokenstore.c with both key backends: a real software TPM (the test starts its own swtpm as
 * test-hubkey.c does: socket mode, loopback, ports it picked, a state directory of its own) and the file
 * backend. Every case runs with both. The files are checked with code that is not the module's: the data
 * key is unsealed from tokens.key and tokens.enc decrypted (and crafted) with plain OpenSSL over the
 * documented format, "IOTHTOK1" || nonce || AES-256-GCM ciphertext || tag, AAD = magic || hub id.
 * TPM errors that the cases provoke on purpose would have tpm2-tss log to stderr; TSS2_LOG is set to
 * "all+none" unless the environment already sets it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <tss2/tss2_esys.h>
#include <tss2/tss2_tctildr.h>

#include "iothub/tokenstore.h"
#include "swtpm-helper.h"

#define HANDLE 0x81000101u
#define HUB_ID "hub-0123456789abcdef"
#define ACCESS_TOKEN "at-Zm9vYmFyLWFjY2Vzcy10b2tlbi0xMjM0NTY3ODkw"
#define REFRESH_TOKEN "rt-cmVmcmVzaC10b2tlbi1zZWNyZXQtOTg3NjU0MzIx"

/* ---- swtpm (swtpm-helper.c) ---- */

static struct swtpm tpm = { .pid = -1 };
static struct swtpm other_tpm = { .pid = -1 }; /* a global, so that teardown stops it */

/* Number of transient objects and sessions loaded in the TPM: must stay 0 between calls (TESTBED.md). */
static unsigned tpm_loaded(const char *tcti_conf) {
        static const uint32_t firsts[] = { UINT32_C(0x80000000), UINT32_C(0x02000000), UINT32_C(0x03000000) };
        TSS2_TCTI_CONTEXT *tcti = NULL;
        ESYS_CONTEXT *esys = NULL;
        unsigned n = 0;

        assert_int_equal(Tss2_TctiLdr_Initialize(tcti_conf, &tcti), TSS2_RC_SUCCESS);
        assert_int_equal(Esys_Initialize(&esys, tcti, NULL), TSS2_RC_SUCCESS);
        for (unsigned i = 0; i < ELEMENTSOF(firsts); i++) {
                TPMS_CAPABILITY_DATA *cap = NULL;
                TPMI_YES_NO more;

                assert_int_equal(Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                                    TPM2_CAP_HANDLES, firsts[i], TPM2_MAX_CAP_HANDLES, &more,
                                                    &cap),
                                 TSS2_RC_SUCCESS);
                n += cap->data.handles.count;
                Esys_Free(cap);
        }
        Esys_Finalize(&esys);
        Tss2_TctiLdr_Finalize(&tcti);
        return n;
}

/* ---- fixtures: one state directory and one open hub key per case, for each backend ---- */

struct fixture {
        enum key_backend backend;
        struct swtpm *tpm;   /* tpm backend */
        char key_file[96];   /* file backend: the hub key */
        char dir[64];        /* the state directory of this case */
        char enc[128], key[128];
        struct iothub_conf conf;
        struct hubkey *k;
};

static struct fixture tpm_fixture = { .backend = KEY_BACKEND_TPM, .tpm = &tpm };
static struct fixture file_fixture = { .backend = KEY_BACKEND_FILE };
static char keydir[] = "/tmp/test-tokenstore-key-XXXXXX";

static struct iothub_conf fixture_conf(const struct fixture *f, const char *dir, const char *tcti) {
        struct iothub_conf c = {
                .hub = { .id = (char *) HUB_ID, .state_dir = (char *) dir },
                .key = { .backend = f->backend, .handle = HANDLE },
        };

        if (f->backend == KEY_BACKEND_TPM)
                c.key.tcti = (char *) tcti;
        else
                c.key.file = (char *) f->key_file;
        return c;
}

static int tpm_group_setup(_unused_ void **state) {
        struct iothub_conf c;

        swtpm_start(&tpm, "tokenstore");
        c = fixture_conf(&tpm_fixture, "/nonexistent", tpm.tcti);
        assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
        return 0;
}

static int tpm_group_teardown(_unused_ void **state) {
        assert_int_equal(tpm_loaded(tpm.tcti), 0);
        swtpm_stop(&other_tpm);
        swtpm_stop(&tpm);
        return 0;
}

static int file_group_setup(_unused_ void **state) {
        struct iothub_conf c;

        assert_non_null(mkdtemp(keydir));
        snprintf(file_fixture.key_file, sizeof file_fixture.key_file, "%s/hub.key", keydir);
        c = fixture_conf(&file_fixture, "/nonexistent", NULL);
        assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
        return 0;
}

static int file_group_teardown(_unused_ void **state) {
        rm_rf(keydir);
        return 0;
}

static int case_setup(void **state) {
        struct fixture *f = *state;

        strcpy(f->dir, "/tmp/test-tokenstore-state-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        snprintf(f->enc, sizeof f->enc, "%s/%s", f->dir, TOKENSTORE_FILE);
        snprintf(f->key, sizeof f->key, "%s/%s", f->dir, TOKENSTORE_KEY_FILE);
        f->conf = fixture_conf(f, f->dir, f->tpm ? f->tpm->tcti : NULL);
        assert_int_equal(hubkey_open(&f->conf, &f->k, NULL), 0);
        return 0;
}

static int case_teardown(void **state) {
        struct fixture *f = *state;

        hubkey_free(f->k);
        f->k = NULL;
        rm_rf(f->dir);
        if (f->tpm)
                assert_int_equal(tpm_loaded(f->tpm->tcti), 0);
        return 0;
}

/* ---- helpers: files and independent crypto ---- */

static void write_bytes(const char *path, const void *data, size_t len, mode_t mode) {
        int fd;

        (void) unlink(path);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, data, len), (ssize_t) len);
        assert_int_equal(fchmod(fd, mode), 0);
        close(fd);
}

static mode_t file_mode(const char *path) {
        struct stat st;

        assert_int_equal(lstat(path, &st), 0);
        assert_true(S_ISREG(st.st_mode));
        return st.st_mode & 07777;
}

static bool exists(const char *path) {
        struct stat st;

        return lstat(path, &st) == 0;
}

/* The data key, unsealed from tokens.key with the hub key (the TPM's, or the file backend's copy). */
static void data_key(struct fixture *f, uint8_t ret[32]) {
        uint8_t *blob, *key = NULL;
        size_t len, key_len = 0;

        blob = read_bytes(f->key, &len);
        if (f->backend == KEY_BACKEND_TPM)
                assert_memory_equal(blob, "IHS1", 4);
        else
                assert_int_equal(len, 32);
        assert_int_equal(hubkey_unseal(f->k, blob, len, &key, &key_len), 0);
        assert_int_equal(key_len, 32);
        memcpy(ret, key, 32);
        free(key);
        free(blob);
}

/* Decrypts tokens.enc with plain OpenSSL as the format is documented; NULL when it does not
 * authenticate. */
static char *independent_decrypt(const uint8_t key[32], const char *hub_id, const uint8_t *in, size_t len) {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        size_t ct_len = len - 8 - 12 - 16;
        char *out = calloc(1, ct_len + 1);
        int n, ok;

        assert_true(len >= 36);
        assert_memory_equal(in, "IOTHTOK1", 8);
        assert_non_null(out);
        assert_int_equal(EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, in + 8), 1);
        assert_int_equal(EVP_DecryptUpdate(ctx, NULL, &n, in, 8), 1);
        assert_int_equal(EVP_DecryptUpdate(ctx, NULL, &n, (const uint8_t *) hub_id, (int) strlen(hub_id)), 1);
        assert_int_equal(EVP_DecryptUpdate(ctx, (uint8_t *) out, &n, in + 20, (int) ct_len), 1);
        assert_int_equal(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, 16, (void *) (in + 20 + ct_len)), 1);
        ok = EVP_DecryptFinal_ex(ctx, (uint8_t *) out + n, &n);
        EVP_CIPHER_CTX_free(ctx);
        if (ok != 1) {
                free(out);
                return NULL;
        }
        return out;
}

/* Writes tokens.enc holding 'plain' (any bytes), encrypted with plain OpenSSL under 'key'. */
static void independent_encrypt(const char *path, const uint8_t key[32], const char *hub_id,
                                const char *plain) {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        size_t len = strlen(plain);
        uint8_t *out = malloc(36 + len);
        int n;

        assert_non_null(out);
        memcpy(out, "IOTHTOK1", 8);
        assert_int_equal(RAND_bytes(out + 8, 12), 1);
        assert_int_equal(EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, out + 8), 1);
        assert_int_equal(EVP_EncryptUpdate(ctx, NULL, &n, out, 8), 1);
        assert_int_equal(EVP_EncryptUpdate(ctx, NULL, &n, (const uint8_t *) hub_id, (int) strlen(hub_id)), 1);
        assert_int_equal(EVP_EncryptUpdate(ctx, out + 20, &n, (const uint8_t *) plain, (int) len), 1);
        assert_int_equal(EVP_EncryptFinal_ex(ctx, out + 20 + n, &n), 1);
        assert_int_equal(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, out + 20 + len), 1);
        EVP_CIPHER_CTX_free(ctx);
        write_bytes(path, out, 36 + len, 0600);
        free(out);
}

static const struct oauth_tokens full_tokens = {
        .access_token = (char *) ACCESS_TOKEN,
        .refresh_token = (char *) REFRESH_TOKEN,
        .token_type = (char *) "DPoP",
        .scope = (char *) "openid offline_access bulbs:write",
        .expires_at = 1767225600,
};

static void assert_tokens_equal(const struct oauth_tokens *a, const struct oauth_tokens *b) {
        assert_true(streq_ptr(a->access_token, b->access_token));
        assert_true(streq_ptr(a->refresh_token, b->refresh_token));
        assert_true(streq_ptr(a->token_type, b->token_type));
        assert_true(streq_ptr(a->scope, b->scope));
        assert_int_equal(a->expires_at, b->expires_at);
}

/* Loads and expects failure with 'expected', the result untouched and a one-line reason. */
static void load_fails(struct fixture *f, int expected, const char *reason) {
        struct oauth_tokens t = { .access_token = (char *) "untouched", .expires_at = 4242 };
        char *error = NULL;

        assert_int_equal(tokenstore_load(&f->conf, f->k, &t, &error), expected);
        assert_string_equal(t.access_token, "untouched");
        assert_null(t.refresh_token);
        assert_int_equal(t.expires_at, 4242);
        assert_non_null(error);
        assert_null(strchr(error, '\n'));
        if (reason && !strstr(error, reason))
                fail_msg("'%s' does not say '%s'", error, reason);
        assert_null(strstr(error, ACCESS_TOKEN));
        free(error);
}

/* ---- cases, each with both backends ---- */

static void test_round_trip(void **state) {
        struct fixture *f = *state;
        const struct oauth_tokens minimal = {
                .access_token = (char *) "only-an-access-token",
                .token_type = (char *) "Bearer",
        };
        struct oauth_tokens t = {};
        char *error = NULL;

        load_fails(f, -ENOENT, "no tokens stored");

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, &error), 0);
        assert_null(error);
        assert_int_equal(tokenstore_load(&f->conf, f->k, &t, &error), 0);
        assert_null(error);
        assert_tokens_equal(&t, &full_tokens);
        oauth_tokens_done(&t);
        assert_null(t.access_token);
        assert_null(t.refresh_token);
        assert_null(t.token_type);
        assert_null(t.scope);
        oauth_tokens_done(&t); /* again: harmless */
        oauth_tokens_done(NULL);

        /* NULL members are left out, and come back NULL. */
        assert_int_equal(tokenstore_save(&f->conf, f->k, &minimal, NULL), 0);
        assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
        assert_tokens_equal(&t, &minimal);
        oauth_tokens_done(&t);
}

/* The format as documented, checked with plain OpenSSL: the exact compact JSON, no token in clear in
 * either file, both mode 0600 whatever the umask. */
static void test_files(void **state) {
        struct fixture *f = *state;
        uint8_t key[32], *enc, *keyfile;
        size_t enc_len, key_len;
        char *plain;
        mode_t old = umask(0);

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        (void) umask(old);
        assert_int_equal(file_mode(f->enc), 0600);
        assert_int_equal(file_mode(f->key), 0600);

        enc = read_bytes(f->enc, &enc_len);
        keyfile = read_bytes(f->key, &key_len);
        assert_memory_equal(enc, "IOTHTOK1", 8);
        for (unsigned i = 0; i < 2; i++) {
                const char *s = i == 0 ? ACCESS_TOKEN : REFRESH_TOKEN;

                assert_null(memmem(enc, enc_len, s, strlen(s)));
                assert_null(memmem(keyfile, key_len, s, strlen(s)));
                assert_null(memmem(enc, enc_len, s + 3, 16)); /* nor a part of one */
        }
        assert_null(memmem(enc, enc_len, "openid", 6));

        data_key(f, key);
        if (f->backend == KEY_BACKEND_TPM)
                assert_null(memmem(keyfile, key_len, key, sizeof key)); /* sealed, not in clear */
        plain = independent_decrypt(key, HUB_ID, enc, enc_len);
        assert_non_null(plain);
        assert_string_equal(plain, "{\"access_token\":\"" ACCESS_TOKEN "\",\"refresh_token\":\"" REFRESH_TOKEN
                                   "\",\"token_type\":\"DPoP\",\"scope\":\"openid offline_access bulbs:write\","
                                   "\"expires_at\":1767225600}");
        assert_int_equal(enc_len, 36 + strlen(plain));
        assert_null(independent_decrypt(key, "another-hub", enc, enc_len));
        free(plain);
        free(enc);
        free(keyfile);

        /* No temporary file left behind. */
        {
                char cmd[160];
                snprintf(cmd, sizeof cmd, "test $(ls -A %s | wc -l) -eq 2", f->dir);
                assert_int_equal(system(cmd), 0);
        }
}

/* Every single-bit change anywhere in tokens.enc (magic, nonce, ciphertext, tag), truncations and a
 * trailing byte: -EBADMSG, never tokens. */
static void test_tampered(void **state) {
        struct fixture *f = *state;
        uint8_t *orig, *bad;
        size_t len;

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        orig = read_bytes(f->enc, &len);
        bad = malloc(len + 1);
        assert_non_null(bad);

        for (size_t pos = 0; pos < len; pos++) {
                const char *reason = pos < 8 ? "is not a tokens file" : "does not authenticate";

                memcpy(bad, orig, len);
                bad[pos] ^= (uint8_t) (1u << (pos % 8));
                write_bytes(f->enc, bad, len, 0600);
                load_fails(f, -EBADMSG, reason);
        }
        print_message("%zu single-bit changes: all refused\n", len);

        {
                static const size_t cuts[] = { 0, 1, 8, 20, 37 };

                for (unsigned i = 0; i < ELEMENTSOF(cuts); i++) {
                        write_bytes(f->enc, orig, cuts[i], 0600);
                        load_fails(f, -EBADMSG, "is not a tokens file");
                }
                write_bytes(f->enc, orig, len - 1, 0600); /* the tag cut short */
                load_fails(f, -EBADMSG, "does not authenticate");
        }
        memcpy(bad, orig, len);
        bad[len] = '\0';
        write_bytes(f->enc, bad, len + 1, 0600);
        load_fails(f, -EBADMSG, "does not authenticate");

        /* Untouched, it still loads. */
        write_bytes(f->enc, orig, len, 0600);
        {
                struct oauth_tokens t = {};

                assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
                assert_tokens_equal(&t, &full_tokens);
                oauth_tokens_done(&t);
        }
        free(bad);
        free(orig);
}

/* The hub id is authenticated: the files under another hub id do not load. */
static void test_other_hub_id(void **state) {
        struct fixture *f = *state;

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        f->conf.hub.id = (char *) "hub-another";
        load_fails(f, -EBADMSG, "does not authenticate");
        f->conf.hub.id = (char *) HUB_ID "x";
        load_fails(f, -EBADMSG, "does not authenticate");
        f->conf.hub.id = (char *) HUB_ID;
}

/* Either file readable or writable by group or others: refused, -EPERM; so is a symbolic link. */
static void test_refuses_open_modes(void **state) {
        static const mode_t modes[] = { 0640, 0604, 0644, 0660, 0606, 0610, 0601 };
        struct fixture *f = *state;
        char link_path[160];

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        for (unsigned i = 0; i < ELEMENTSOF(modes); i++) {
                char expected[32];

                snprintf(expected, sizeof expected, "(mode %04o)", (unsigned) modes[i]);
                assert_int_equal(chmod(f->enc, modes[i]), 0);
                load_fails(f, -EPERM, expected);
                assert_int_equal(chmod(f->enc, 0600), 0);
                assert_int_equal(chmod(f->key, modes[i]), 0);
                load_fails(f, -EPERM, TOKENSTORE_KEY_FILE);
                assert_int_equal(chmod(f->key, 0600), 0);
        }
        assert_int_equal(chmod(f->enc, 0400), 0); /* read-only for its owner is fine */
        {
                struct oauth_tokens t = {};

                assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
                oauth_tokens_done(&t);
        }
        assert_int_equal(chmod(f->enc, 0600), 0);

        snprintf(link_path, sizeof link_path, "%s.real", f->enc);
        assert_int_equal(rename(f->enc, link_path), 0);
        assert_int_equal(symlink(link_path, f->enc), 0);
        load_fails(f, -ELOOP, "symbolic link");
}

/* Saving again keeps the data key (tokens.key unchanged) and replaces the content, with a new nonce. */
static void test_overwrite(void **state) {
        struct fixture *f = *state;
        struct oauth_tokens second = full_tokens, t = {};
        uint8_t *key1, *key2, *enc1, *enc2;
        size_t key1_len, key2_len, enc1_len, enc2_len;

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        key1 = read_bytes(f->key, &key1_len);
        enc1 = read_bytes(f->enc, &enc1_len);

        second.access_token = (char *) "at-the-second-one";
        second.refresh_token = (char *) "rt-the-second-one";
        second.expires_at = 1767229200;
        assert_int_equal(tokenstore_save(&f->conf, f->k, &second, NULL), 0);
        key2 = read_bytes(f->key, &key2_len);
        enc2 = read_bytes(f->enc, &enc2_len);
        assert_int_equal(key1_len, key2_len);
        assert_memory_equal(key1, key2, key1_len);
        assert_memory_not_equal(enc1 + 8, enc2 + 8, 12); /* another nonce */

        assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
        assert_tokens_equal(&t, &second);
        oauth_tokens_done(&t);

        /* The same tokens twice: two different files. */
        assert_int_equal(tokenstore_save(&f->conf, f->k, &second, NULL), 0);
        free(enc1);
        enc1 = read_bytes(f->enc, &enc1_len);
        assert_int_equal(enc1_len, enc2_len);
        assert_memory_not_equal(enc1, enc2, enc1_len);
        free(key1);
        free(key2);
        free(enc1);
        free(enc2);
}

/* tokens.enc without tokens.key: -ENOKEY; tokens.key that is malformed: -EBADMSG. A save then makes a
 * new data key, and the tokens load again. */
static void test_key_missing_or_broken(void **state) {
        struct fixture *f = *state;
        struct oauth_tokens t = {};
        uint8_t *key1, *key2;
        size_t key1_len, key2_len;

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        key1 = read_bytes(f->key, &key1_len);
        assert_int_equal(unlink(f->key), 0);
        load_fails(f, -ENOKEY, TOKENSTORE_KEY_FILE " is missing");

        write_bytes(f->key, "garbage", 7, 0600);
        if (f->backend == KEY_BACKEND_TPM)
                load_fails(f, -EBADMSG, "is malformed");
        else
                load_fails(f, -EBADMSG, "holds a key of 7 bytes");
        write_bytes(f->key, "", 0, 0600);
        load_fails(f, -EBADMSG, NULL);

        /* Another valid key: the ciphertext does not authenticate. */
        {
                uint8_t other[32], *blob = NULL;
                size_t blob_len = 0;

                assert_int_equal(RAND_bytes(other, sizeof other), 1);
                assert_int_equal(hubkey_seal(f->k, other, sizeof other, &blob, &blob_len), 0);
                write_bytes(f->key, blob, blob_len, 0600);
                load_fails(f, -EBADMSG, "does not authenticate");
                free(blob);
        }

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
        assert_tokens_equal(&t, &full_tokens);
        oauth_tokens_done(&t);
        key2 = read_bytes(f->key, &key2_len);
        assert_true(key1_len != key2_len || memcmp(key1, key2, key1_len) != 0);
        free(key1);
        free(key2);

        /* A save with no tokens.key (but tokens.enc there) makes a new key too. */
        assert_int_equal(unlink(f->key), 0);
        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        assert_int_equal(file_mode(f->key), 0600);
        assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
        oauth_tokens_done(&t);
}

/* Erase overwrites both files in place (a hard link taken before shows zeros) and removes them; then
 * load says -ENOENT, and erasing again is fine. */
static void test_erase(void **state) {
        struct fixture *f = *state;
        char enc_link[160], key_link[160];
        uint8_t *after;
        size_t len, enc_len, key_len;

        assert_int_equal(tokenstore_erase(&f->conf), 0); /* nothing there yet */
        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        snprintf(enc_link, sizeof enc_link, "%s/enc-link", f->dir);
        snprintf(key_link, sizeof key_link, "%s/key-link", f->dir);
        assert_int_equal(link(f->enc, enc_link), 0);
        assert_int_equal(link(f->key, key_link), 0);
        free(read_bytes(f->enc, &enc_len));
        free(read_bytes(f->key, &key_len));

        assert_int_equal(tokenstore_erase(&f->conf), 0);
        assert_false(exists(f->enc));
        assert_false(exists(f->key));
        for (unsigned i = 0; i < 2; i++) {
                after = read_bytes(i == 0 ? enc_link : key_link, &len);
                assert_int_equal(len, i == 0 ? enc_len : key_len);
                for (size_t j = 0; j < len; j++)
                        assert_int_equal(after[j], 0);
                free(after);
        }
        load_fails(f, -ENOENT, "no tokens stored");
        assert_int_equal(tokenstore_erase(&f->conf), 0);

        /* Only one of the two there: erased as well. */
        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        assert_int_equal(unlink(f->key), 0);
        assert_int_equal(tokenstore_erase(&f->conf), 0);
        assert_false(exists(f->enc));
}

/* The plaintext is parsed strictly (crafted with the real data key, so that only the parser decides). */
static void test_strict_plaintext(void **state) {
        static const struct {
                const char *json;
                bool ok;
        } cases[] = {
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\",\"expires_at\":0}", true },
                { "{\"expires_at\":5,\"token_type\":\"DPoP\",\"scope\":\"s\",\"access_token\":\"a\"}", true },
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\"}", false }, /* no expires_at */
                { "{\"token_type\":\"Bearer\",\"expires_at\":0}", false },       /* no access_token */
                { "{\"access_token\":\"a\",\"expires_at\":0}", false },          /* no token_type */
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\",\"expires_at\":0,\"x\":1}", false },
                { "{\"access_token\":1,\"token_type\":\"Bearer\",\"expires_at\":0}", false },
                { "{\"access_token\":\"a\",\"token_type\":null,\"expires_at\":0}", false },
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\",\"expires_at\":\"0\"}", false },
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\",\"expires_at\":1.5}", false },
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\",\"expires_at\":-1}", false },
                { "{\"access_token\":\"a\",\"refresh_token\":[],\"token_type\":\"B\",\"expires_at\":0}",
                  false },
                { "{\"access_token\":\"a\",\"access_token\":\"b\",\"token_type\":\"B\",\"expires_at\":0}",
                  false },
                { "{\"access_token\":\"a\\u0000b\",\"token_type\":\"B\",\"expires_at\":0}", false },
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\",\"expires_at\":0} ", true },
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\",\"expires_at\":0}x", false },
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\",\"expires_at\":0}{}", false },
                { "[\"access_token\",\"a\"]", false },
                { "\"access_token\"", false },
                { "{}", false },
                { "{\"access_token\":\"a\",\"token_type\":\"Bearer\",\"expires_at\":0", false },
        };
        struct fixture *f = *state;
        uint8_t key[32];

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        data_key(f, key);
        for (unsigned i = 0; i < ELEMENTSOF(cases); i++) {
                print_message("plaintext %s\n", cases[i].json);
                independent_encrypt(f->enc, key, HUB_ID, cases[i].json);
                if (cases[i].ok) {
                        struct oauth_tokens t = {};

                        assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
                        oauth_tokens_done(&t);
                } else
                        load_fails(f, -EBADMSG, "holds no valid tokens");
        }
}

/* Limits and bad arguments: a plaintext over TOKENSTORE_MAX is not written, a tokens file larger than
 * any valid one is not read, incomplete tokens are refused. */
static void test_limits(void **state) {
        struct fixture *f = *state;
        struct oauth_tokens big = full_tokens, t = {};
        size_t n = TOKENSTORE_MAX;
        char *error = NULL, *s = malloc(n + 1);

        assert_non_null(s);
        memset(s, 'a', n);
        s[n] = '\0';
        big.access_token = s;
        assert_int_equal(tokenstore_save(&f->conf, f->k, &big, &error), -EMSGSIZE);
        assert_non_null(strstr(error, "more than 65536 bytes"));
        free(error);
        error = NULL;
        assert_false(exists(f->enc));
        /* Just under the limit: fine. */
        s[n - 200] = '\0';
        assert_int_equal(tokenstore_save(&f->conf, f->k, &big, NULL), 0);
        assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
        assert_string_equal(t.access_token, s);
        oauth_tokens_done(&t);

        /* Not UTF-8. */
        big.access_token = (char *) "\xff\xfe";
        assert_int_equal(tokenstore_save(&f->conf, f->k, &big, &error), -EINVAL);
        free(error);
        error = NULL;

        /* Incomplete. */
        big = full_tokens;
        big.access_token = NULL;
        assert_int_equal(tokenstore_save(&f->conf, f->k, &big, NULL), -EINVAL);
        big = full_tokens;
        big.token_type = NULL;
        assert_int_equal(tokenstore_save(&f->conf, f->k, &big, NULL), -EINVAL);
        assert_int_equal(tokenstore_save(&f->conf, NULL, &full_tokens, NULL), -EINVAL);

        /* A tokens file larger than any the module writes. */
        {
                size_t len = 36 + TOKENSTORE_MAX + 1;
                uint8_t *huge = calloc(1, len);

                assert_non_null(huge);
                memcpy(huge, "IOTHTOK1", 8);
                write_bytes(f->enc, huge, len, 0600);
                load_fails(f, -EBADMSG, "is larger than");
                free(huge);
        }
        free(s);
}

/* ---- tpm only ---- */

/* Both files copied to another hub with the same hub id but another TPM (fresh state, its own key
 * init): tokens.key cannot be unsealed there. A new sign-in there then replaces the key. */
static void test_tpm_copied_to_another_tpm(void **state) {
        struct fixture *f = *state;
        struct fixture other = { .backend = KEY_BACKEND_TPM, .tpm = &other_tpm };
        struct oauth_tokens t = {};
        uint8_t *enc, *key;
        size_t enc_len, key_len;

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        enc = read_bytes(f->enc, &enc_len);
        key = read_bytes(f->key, &key_len);

        swtpm_start(&other_tpm, "tokenstore");
        {
                struct iothub_conf c = fixture_conf(&other, "/nonexistent", other_tpm.tcti);
                void *s = &other;

                assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
                assert_int_equal(case_setup(&s), 0);
        }
        write_bytes(other.enc, enc, enc_len, 0600);
        write_bytes(other.key, key, key_len, 0600);
        load_fails(&other, -EBADMSG, "was not sealed by this hub's TPM");

        assert_int_equal(tokenstore_save(&other.conf, other.k, &full_tokens, NULL), 0);
        assert_int_equal(tokenstore_load(&other.conf, other.k, &t, NULL), 0);
        assert_tokens_equal(&t, &full_tokens);
        oauth_tokens_done(&t);
        {
                void *s = &other;
                assert_int_equal(case_teardown(&s), 0);
        }
        swtpm_stop(&other_tpm);

        /* Still loads on its own TPM. */
        assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
        assert_tokens_equal(&t, &full_tokens);
        oauth_tokens_done(&t);
        free(enc);
        free(key);
}

/* Not a pass/fail test: what a save and a load cost with the TPM (each unseals the data key). */
static void test_tpm_timing(void **state) {
        struct fixture *f = *state;
        uint64_t t0, save_sum = 0, load_sum = 0;
        const unsigned runs = 10;

        assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
        for (unsigned i = 0; i < runs; i++) {
                struct oauth_tokens t = {};

                t0 = now_usec();
                assert_int_equal(tokenstore_save(&f->conf, f->k, &full_tokens, NULL), 0);
                save_sum += now_usec() - t0;
                t0 = now_usec();
                assert_int_equal(tokenstore_load(&f->conf, f->k, &t, NULL), 0);
                load_sum += now_usec() - t0;
                oauth_tokens_done(&t);
        }
        print_message("timing: tokenstore_save: mean %.2f ms, tokenstore_load: mean %.2f ms (%u runs)\n",
                      (double) save_sum / runs / 1000.0, (double) load_sum / runs / 1000.0, runs);
}

#define CASE(f, fixture) cmocka_unit_test_prestate_setup_teardown(f, case_setup, case_teardown, &(fixture))
#define BOTH_BACKENDS(fixture)                                                                              \
        CASE(test_round_trip, fixture), CASE(test_files, fixture), CASE(test_tampered, fixture),            \
                CASE(test_other_hub_id, fixture), CASE(test_refuses_open_modes, fixture),                   \
                CASE(test_overwrite, fixture), CASE(test_key_missing_or_broken, fixture),                   \
                CASE(test_erase, fixture), CASE(test_strict_plaintext, fixture), CASE(test_limits, fixture)

int main(void) {
        const struct CMUnitTest file_tests[] = {
                BOTH_BACKENDS(file_fixture),
        };
        const struct CMUnitTest tpm_tests[] = {
                BOTH_BACKENDS(tpm_fixture),
                CASE(test_tpm_copied_to_another_tpm, tpm_fixture),
                CASE(test_tpm_timing, tpm_fixture),
        };
        int failed = 0;

        (void) setenv("TSS2_LOG", "all+none", 0);
        failed += cmocka_run_group_tests_name("tokenstore-file", file_tests, file_group_setup,
                                              file_group_teardown);
        failed += cmocka_run_group_tests_name("tokenstore-tpm", tpm_tests, tpm_group_setup,
                                              tpm_group_teardown);
        return failed;
}
