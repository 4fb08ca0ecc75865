/* SPDX-License-Identifier: MIT */
/* The user's OAuth tokens at rest (DESIGN.md "State", PROTOCOL.md 4), two files in [hub] state_dir:
 *   tokens.key  the 256-bit data key as hubkey_seal() returns it: sealed by the TPM, so that only this
 *               TPM can unseal it; with [key] backend = file the raw key (a development aid). Made on the
 *               first save and kept: later saves encrypt under the same key. Replaced on a save only when
 *               it can never be unsealed again (malformed, or another TPM's).
 *   tokens.enc  "IOTHTOK1" || nonce (12 random bytes) || AES-256-GCM ciphertext || tag (16 bytes), with
 *               the magic and the hub id as additional authenticated data, so that a file written for
 *               another hub id does not authenticate. A fresh random 96-bit nonce at each save (NIST SP
 *               800-38D 8.2.2; one save per token refresh stays far below its 2^32 bound for one key).
 * Both mode 0600, written atomically (write_file_atomic), refused on load when group or others may
 * access them, and never followed through a symbolic link.
 * The plaintext is compact JSON {"access_token","refresh_token","token_type","scope","expires_at"}
 * (NULL members left out), at most TOKENSTORE_MAX bytes, parsed strictly: only these members, each of
 * its type, access_token, token_type and expires_at present, no duplicates, nothing after.
 * Errors of tokenstore_load(): -ENOENT no tokens.enc; -ENOKEY tokens.enc without tokens.key; -EBADMSG
 * tokens.enc altered or written for another hub id or data key, or tokens.key malformed or sealed by
 * another TPM (or by this one before a TPM clear); -EPERM a file group or others may access; other
 * negative errno when the TPM or the file system fails (worth a retry, unlike the ones above).
 * Secrets in memory: the data key, the plaintext and the JSON text live in buffers of ours, wiped before
 * they are freed or when a step fails. Known limit: jansson keeps its own copies of the strings (and its
 * parser its own buffers) and frees them without wiping; json_set_alloc_funcs() could wipe them but
 * applies to the whole process. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "iothub/tokenstore.h"
#include "iothub/util.h"
#include "tokenstore-internal.h"

#define ENC_MAX (ENC_OVERHEAD + TOKENSTORE_MAX)
#define KEY_FILE_MAX 4096 /* a sealed 32-byte key is 212 bytes (hubkey.c refuses more than 1024) */
#define JSON_MIN 2        /* "{}" */

/* A secret buffer of ours: wiped when freed. */
struct secret {
        uint8_t *data;
        size_t len;
};

static void secret_done(struct secret *s) {
        erase_and_free(s->data, s->len);
        *s = (struct secret) {};
}
#define _cleanup_secret_ _cleanup_(secret_done)

static void data_key_wipe(uint8_t (*key)[DATA_KEY_LEN]) {
        OPENSSL_cleanse(*key, sizeof *key);
}
#define _cleanup_data_key_ _cleanup_(data_key_wipe)

DEFINE_TRIVIAL_CLEANUP_FUNC(EVP_CIPHER_CTX *, EVP_CIPHER_CTX_free);

static char *state_path(const struct iothub_conf *c, const char *name) {
        return strdup_printf("%s/%s", c->hub.state_dir, name);
}

/* Reads a whole file that holds (or protects) a secret into a buffer that is wiped when freed. Returns
 * 0, -ENOENT when it does not exist, -EPERM when group or others may access it (it should never be),
 * -ELOOP for a symbolic link, -EINVAL when it is not a regular file, -EFBIG when larger than max. */
static int read_private_file(const char *path, size_t max, struct secret *ret, char **ret_error) {
        _cleanup_secret_ struct secret buf = {};
        _cleanup_close_ int fd = -1;
        struct stat st;
        size_t len = 0;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW);
        if (fd < 0) {
                if (errno == ENOENT)
                        return -ENOENT;
                if (errno == ELOOP)
                        return set_error_message(ret_error, -ELOOP, "%s is a symbolic link; refusing it", path);
                return set_error_message(ret_error, -errno, "cannot open %s: %m", path);
        }
        if (fstat(fd, &st) < 0)
                return set_error_message(ret_error, -errno, "cannot stat %s: %m", path);
        if (!S_ISREG(st.st_mode))
                return set_error_message(ret_error, -EINVAL, "%s is not a regular file", path);
        /* Checked on the open file. Like OpenSSH's "UNPROTECTED PRIVATE KEY FILE": the daemon writes these
         * with mode 0600, so anything else means someone changed it; refuse rather than trust it. */
        if (st.st_mode & 077)
                return set_error_message(ret_error, -EPERM,
                                 "%s is accessible by group or others (mode %04o); it must be mode 0600", path,
                                 (unsigned) (st.st_mode & 07777));
        if ((uintmax_t) st.st_size > max)
                return set_error_message(ret_error, -EFBIG, "%s is larger than %zu bytes", path, max);

        buf.len = (size_t) st.st_size + 1; /* one more, to notice a file that grew */
        buf.data = malloc(buf.len);
        if (!buf.data)
                return -ENOMEM;
        for (;;) {
                ssize_t n = read(fd, buf.data + len, buf.len - len);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return set_error_message(ret_error, -errno, "cannot read %s: %m", path);
                }
                if (n == 0)
                        break;
                len += (size_t) n;
                if (len == buf.len)
                        break;
        }
        if (len != (size_t) st.st_size)
                return set_error_message(ret_error, -EIO, "%s changed while it was read", path);
        ret->data = TAKE_PTR(buf.data);
        ret->len = len;
        buf.len = 0;
        return 0;
}

/* Makes a data key, seals it and writes tokens.key (replacing what is there). */
static int data_key_create(const char *path, struct hubkey *k, uint8_t ret_key[DATA_KEY_LEN],
                           char **ret_error) {
        _cleanup_data_key_ uint8_t key[DATA_KEY_LEN];
        _cleanup_secret_ struct secret blob = {};
        int r;

        r = random_bytes(key, sizeof key);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot make a data key: %s", strerror(-r));
        /* With the file backend the "blob" is the key itself: hence a struct secret. */
        r = hubkey_seal(k, key, sizeof key, &blob.data, &blob.len);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot seal the data key: %s", strerror(-r));
        r = write_file_atomic(path, blob.data, blob.len, 0600);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot write %s: %s", path, strerror(-r));
        memcpy(ret_key, key, DATA_KEY_LEN);
        return 0;
}

/* Reads and unseals tokens.key. Returns 0; -ENOENT when there is none; -EBADMSG when it can never be
 * unsealed (malformed, another TPM's); other negative errno. */
static int data_key_read(const char *path, struct hubkey *k, uint8_t ret_key[DATA_KEY_LEN],
                         char **ret_error) {
        _cleanup_secret_ struct secret blob = {}, key = {};
        int r;

        r = read_private_file(path, KEY_FILE_MAX, &blob, ret_error);
        if (r == -EFBIG)
                return -EBADMSG; /* larger than any sealed key; the message is set */
        if (r < 0)
                return r;
        r = hubkey_unseal(k, blob.data, blob.len, &key.data, &key.len);
        if (r == -ENOKEY)
                return set_error_message(ret_error, -EBADMSG,
                                 "%s was not sealed by this hub's TPM (copied from another hub, or the TPM was "
                                 "cleared since)",
                                 path);
        if (r == -EBADMSG)
                return set_error_message(ret_error, r, "%s is malformed", path);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot unseal %s: %s", path, strerror(-r));
        if (key.len != DATA_KEY_LEN)
                return set_error_message(ret_error, -EBADMSG, "%s holds a key of %zu bytes, not %d", path, key.len,
                                 DATA_KEY_LEN);
        memcpy(ret_key, key.data, DATA_KEY_LEN);
        return 0;
}

/* AES-256-GCM (NIST SP 800-38D) over the plaintext, with MAGIC || hub id as additional data. */
static int gcm_seal(const uint8_t key[DATA_KEY_LEN], const char *hub_id, const struct secret *plain,
                    uint8_t **ret, size_t *ret_len) {
        _cleanup_(EVP_CIPHER_CTX_freep) EVP_CIPHER_CTX *ctx = NULL;
        _cleanup_free_ uint8_t *out = NULL;
        size_t len = ENC_OVERHEAD + plain->len;
        uint8_t *nonce, *ct;
        int n, r;

        out = malloc(len);
        if (!out)
                return -ENOMEM;
        memcpy(out, MAGIC, MAGIC_LEN);
        nonce = out + MAGIC_LEN;
        ct = nonce + NONCE_LEN;
        r = random_bytes(nonce, NONCE_LEN);
        if (r < 0)
                return r;

        ctx = EVP_CIPHER_CTX_new();
        if (!ctx || EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) != 1 ||
            EVP_EncryptInit_ex(ctx, NULL, NULL, key, nonce) != 1 ||
            EVP_EncryptUpdate(ctx, NULL, &n, (const uint8_t *) MAGIC, MAGIC_LEN) != 1 ||
            EVP_EncryptUpdate(ctx, NULL, &n, (const uint8_t *) hub_id, (int) strlen(hub_id)) != 1 ||
            EVP_EncryptUpdate(ctx, ct, &n, plain->data, (int) plain->len) != 1 || (size_t) n != plain->len ||
            EVP_EncryptFinal_ex(ctx, ct + n, &n) != 1 || n != 0 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, ct + plain->len) != 1)
                return openssl_errno(-EIO);
        *ret = TAKE_PTR(out);
        *ret_len = len;
        return 0;
}

/* The inverse: -EBADMSG when the tag does not verify. The plaintext that GCM produces before the tag is
 * checked is wiped on failure. */
static int gcm_open(const uint8_t key[DATA_KEY_LEN], const char *hub_id, const uint8_t *in, size_t len,
                    struct secret *ret) {
        _cleanup_(EVP_CIPHER_CTX_freep) EVP_CIPHER_CTX *ctx = NULL;
        _cleanup_secret_ struct secret plain = {};
        const uint8_t *nonce = in + MAGIC_LEN, *ct = nonce + NONCE_LEN;
        size_t ct_len = len - ENC_OVERHEAD;
        int n, m;

        plain.len = ct_len;
        plain.data = malloc(ct_len);
        if (!plain.data)
                return -ENOMEM;
        ctx = EVP_CIPHER_CTX_new();
        if (!ctx || EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) != 1 ||
            EVP_DecryptInit_ex(ctx, NULL, NULL, key, nonce) != 1 ||
            EVP_DecryptUpdate(ctx, NULL, &n, (const uint8_t *) MAGIC, MAGIC_LEN) != 1 ||
            EVP_DecryptUpdate(ctx, NULL, &n, (const uint8_t *) hub_id, (int) strlen(hub_id)) != 1 ||
            EVP_DecryptUpdate(ctx, plain.data, &n, ct, (int) ct_len) != 1 || (size_t) n != ct_len ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN, (void *) (ct + ct_len)) != 1)
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees plain */
                return openssl_errno(-EIO);
        if (EVP_DecryptFinal_ex(ctx, plain.data + n, &m) != 1)
                return openssl_errno(-EBADMSG);
        ret->len = plain.len;
        ret->data = TAKE_PTR(plain.data);
        return 0;
}

/* ---- the plaintext ---- */

static int json_set_string(json_t *o, const char *name, const char *value) {
        json_t *s;

        if (!value)
                return 0;
        s = json_string(value); /* NULL for text that is not UTF-8 */
        if (!s)
                return -EINVAL;
        return json_object_set_new(o, name, s) < 0 ? -ENOMEM : 0;
}

/* Compact JSON into a buffer of ours (json_dumpb, not json_dumps, whose result jansson allocates). */
static int tokens_to_json(const struct oauth_tokens *t, struct secret *ret) {
        _cleanup_(json_decrefp) json_t *o = NULL;
        _cleanup_secret_ struct secret buf = {};
        size_t n;
        int r;

        o = json_object();
        if (!o)
                return -ENOMEM;
        if ((r = json_set_string(o, "access_token", t->access_token)) < 0 ||
            (r = json_set_string(o, "refresh_token", t->refresh_token)) < 0 ||
            (r = json_set_string(o, "token_type", t->token_type)) < 0 ||
            (r = json_set_string(o, "scope", t->scope)) < 0)
                return r;
        if (json_object_set_new(o, "expires_at", json_integer(t->expires_at)) < 0)
                return -ENOMEM;

        n = json_dumpb(o, NULL, 0, JSON_COMPACT);
        if (n == 0)
                return -ENOMEM;
        if (n > TOKENSTORE_MAX)
                return -EMSGSIZE;
        buf.len = n;
        buf.data = malloc(n);
        if (!buf.data)
                return -ENOMEM;
        if (json_dumpb(o, (char *) buf.data, buf.len, JSON_COMPACT) != n)
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees buf */
                return -ENOMEM;
        ret->len = buf.len;
        ret->data = TAKE_PTR(buf.data);
        return 0;
}

/* A string member: a JSON string without NUL (JSON allows "\u0000"; C strings do not). */
static int json_take_string(json_t *v, char **ret) {
        const char *s = json_string_value(v);
        char *copy;

        if (!s || strlen(s) != json_string_length(v))
                return -EBADMSG;
        copy = strdup(s);
        if (!copy)
                return -ENOMEM;
        *ret = copy;
        return 0;
}

static int tokens_from_json(const struct secret *buf, struct oauth_tokens *ret) {
        _cleanup_(json_decrefp) json_t *o = NULL;
        struct oauth_tokens t = {};
        bool have_expires = false;
        const char *name;
        json_t *v;
        int r = 0;

        /* No JSON_DECODE_ANY: an object or an array only; jansson refuses trailing data by default. */
        o = json_loadb((const char *) buf->data, buf->len, JSON_REJECT_DUPLICATES, NULL);
        if (!o || !json_is_object(o))
                return -EBADMSG;
        json_object_foreach(o, name, v) {
                char **member = NULL;

                if (streq(name, "access_token"))
                        member = &t.access_token;
                else if (streq(name, "refresh_token"))
                        member = &t.refresh_token;
                else if (streq(name, "token_type"))
                        member = &t.token_type;
                else if (streq(name, "scope"))
                        member = &t.scope;
                else if (streq(name, "expires_at")) {
                        if (!json_is_integer(v) || json_integer_value(v) < 0) {
                                r = -EBADMSG;
                                break;
                        }
                        t.expires_at = (int64_t) json_integer_value(v);
                        have_expires = true;
                        continue;
                } else {
                        r = -EBADMSG; /* a member this version does not know */
                        break;
                }
                /* JSON_REJECT_DUPLICATES has refused a second one; said again here, so that a
                 * reader (and the analyzer) sees that no string is overwritten unfreed. */
                if (*member) {
                        r = -EBADMSG;
                        break;
                }
                r = json_take_string(v, member);
                if (r < 0)
                        break;
        }
        if (r == 0 && (!t.access_token || !t.token_type || !have_expires))
                r = -EBADMSG;
        /* The same door as a token answer (oauth.c): a stored token that could not go into an
         * Authorization header line (RFC 6750 2.1) is damage, not a token. */
        if (r == 0 && !b64token_is_valid(t.access_token, strlen(t.access_token)))
                r = -EBADMSG;
        if (r < 0) {
                oauth_tokens_done(&t);
                return r;
        }
        *ret = t;
        return 0;
}

bool tokenstore_is_file(const uint8_t *buf, size_t len) {
        return len >= ENC_OVERHEAD + JSON_MIN && len <= ENC_MAX && memcmp(buf, MAGIC, MAGIC_LEN) == 0;
}

int tokenstore_decode(const uint8_t key[DATA_KEY_LEN], const char *hub_id, const uint8_t *buf, size_t len,
                      struct oauth_tokens *ret) {
        _cleanup_secret_ struct secret plain = {};
        int r;

        if (!tokenstore_is_file(buf, len))
                return -ENOMSG;
        r = gcm_open(key, hub_id, buf, len, &plain);
        if (r < 0)
                return r;
        r = tokens_from_json(&plain, ret);
        return r == -EBADMSG ? -EUCLEAN : r;
}

/* ---- the interface ---- */

static int check_conf(const struct iothub_conf *c, char **ret_error) {
        if (!c->hub.state_dir)
                return set_error_message(ret_error, -EINVAL, "no [hub] state_dir");
        if (!c->hub.id || !c->hub.id[0])
                return set_error_message(ret_error, -EINVAL, "no [hub] id");
        return 0;
}

int tokenstore_save(const struct iothub_conf *c, struct hubkey *k, const struct oauth_tokens *t,
                    char **ret_error) {
        _cleanup_free_ char *enc_path = NULL, *key_path = NULL;
        _cleanup_secret_ struct secret json = {};
        _cleanup_data_key_ uint8_t key[DATA_KEY_LEN];
        _cleanup_free_ uint8_t *out = NULL;
        char *error = NULL;
        size_t out_len = 0;
        int r;

        if (!c || !k || !t)
                return -EINVAL;
        r = check_conf(c, ret_error);
        if (r < 0)
                return r;
        if (!t->access_token || !t->token_type || t->expires_at < 0)
                return set_error_message(ret_error, -EINVAL,
                                 "incomplete tokens (access_token, token_type, expires_at)");
        enc_path = state_path(c, TOKENSTORE_FILE);
        key_path = state_path(c, TOKENSTORE_KEY_FILE);
        if (!enc_path || !key_path)
                return -ENOMEM;

        r = tokens_to_json(t, &json);
        if (r == -EMSGSIZE)
                return set_error_message(ret_error, r, "the tokens take more than %d bytes", TOKENSTORE_MAX);
        if (r == -EINVAL)
                return set_error_message(ret_error, r, "a token is not UTF-8 text");
        if (r < 0)
                return set_error_message(ret_error, r, "cannot encode the tokens: %s", strerror(-r));

        /* The data key: the existing one, or a new one when there is none or when the one there can never
         * be unsealed again (what it protected is lost anyway, and is about to be replaced). */
        r = data_key_read(key_path, k, key, &error);
        if (r == -ENOENT || r == -EBADMSG) {
                free(error);
                r = data_key_create(key_path, k, key, ret_error);
                if (r < 0)
                        return r;
        } else if (r < 0) {
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees json */
                if (ret_error)
                        *ret_error = error;
                else
                        free(error);
                return r;
        }

        r = gcm_seal(key, c->hub.id, &json, &out, &out_len);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot encrypt the tokens: %s", strerror(-r));
        r = write_file_atomic(enc_path, out, out_len, 0600);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot write %s: %s", enc_path, strerror(-r));
        return 0;
}

int tokenstore_load(const struct iothub_conf *c, struct hubkey *k, struct oauth_tokens *ret,
                    char **ret_error) {
        _cleanup_free_ char *enc_path = NULL, *key_path = NULL;
        _cleanup_secret_ struct secret enc = {};
        _cleanup_data_key_ uint8_t key[DATA_KEY_LEN];
        struct oauth_tokens t;
        int r;

        if (!c || !k || !ret)
                return -EINVAL;
        r = check_conf(c, ret_error);
        if (r < 0)
                return r;
        enc_path = state_path(c, TOKENSTORE_FILE);
        key_path = state_path(c, TOKENSTORE_KEY_FILE);
        if (!enc_path || !key_path)
                return -ENOMEM;

        r = read_private_file(enc_path, ENC_MAX, &enc, ret_error);
        if (r == -ENOENT)
                return set_error_message(ret_error, r, "no tokens stored (%s does not exist)", enc_path);
        if (r == -EFBIG)
                return -EBADMSG; /* larger than any tokens file; the message is set */
        if (r < 0)
                return r;
        if (!tokenstore_is_file(enc.data, enc.len))
                return set_error_message(ret_error, -EBADMSG, "%s is not a tokens file", enc_path);

        r = data_key_read(key_path, k, key, ret_error);
        if (r == -ENOENT)
                return set_error_message(ret_error, -ENOKEY,
                                 "%s is missing: the tokens in %s cannot be decrypted (sign in again)",
                                 key_path, enc_path);
        if (r < 0)
                return r;

        r = tokenstore_decode(key, c->hub.id, enc.data, enc.len, &t);
        if (r == -EBADMSG)
                return set_error_message(ret_error, r,
                                 "%s does not authenticate (altered, or written for another hub id or "
                                 "data key)",
                                 enc_path);
        if (r == -EUCLEAN)
                return set_error_message(ret_error, -EBADMSG, "%s holds no valid tokens", enc_path);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot decrypt %s: %s", enc_path, strerror(-r));
        *ret = t;
        return 0;
}

/* Overwrites a regular file with zeros in place (and syncs that) before unlinking it. On flash with
 * wear levelling the old blocks may survive: what protects them is that the data key goes too. */
static int wipe_and_unlink(const char *path) {
        static const uint8_t zeros[4096] = {};
        _cleanup_close_ int fd = -1;
        struct stat st;
        int r = 0;

        fd = open(path, O_WRONLY | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW);
        if (fd < 0 && errno == ENOENT)
                return -ENOENT;
        if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
                off_t left = st.st_size;

                while (left > 0 && r == 0) {
                        size_t chunk = left < (off_t) sizeof zeros ? (size_t) left : sizeof zeros;
                        ssize_t n = write(fd, zeros, chunk);

                        if (n < 0 && errno != EINTR)
                                r = -errno;
                        else if (n > 0)
                                left -= n;
                }
                if (r == 0 && fsync(fd) < 0)
                        r = -errno;
        }
        /* A symbolic link or a file that cannot be opened is still removed. */
        if (unlink(path) < 0 && errno != ENOENT && r == 0)
                r = -errno;
        return r;
}

int tokenstore_erase(const struct iothub_conf *c) {
        _cleanup_free_ char *enc_path = NULL, *key_path = NULL;
        _cleanup_close_ int dfd = -1;
        int r, q;

        if (!c || !c->hub.state_dir)
                return -EINVAL;
        enc_path = state_path(c, TOKENSTORE_FILE);
        key_path = state_path(c, TOKENSTORE_KEY_FILE);
        if (!enc_path || !key_path)
                return -ENOMEM;
        r = wipe_and_unlink(enc_path);
        q = wipe_and_unlink(key_path);
        if (r == -ENOENT)
                r = 0;
        if (q == -ENOENT)
                q = 0;
        /* fsync the directory, so that the unlinks survive a power cut. */
        dfd = open(c->hub.state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0)
                (void) fsync(dfd);
        return r < 0 ? r : q;
}
