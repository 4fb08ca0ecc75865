/* SPDX-License-Identifier: MIT */
/* src/hubkey.c against a real software TPM: the test starts its own swtpm (socket mode, loopback,
 * ports it picked, a state directory of its own) and checks the key with code that is not the
 * module's: signatures with plain OpenSSL (and with jose under Node.js when tests/node_modules has
 * it), the RFC 7638 thumbprint from a JSON string built here, and the TPM's state with ESYS calls
 * made here. The file backend is checked in a temporary directory.
 * TPM errors that the cases provoke on purpose would have tpm2-tss log to stderr; TSS2_LOG is set
 * to "all+none" unless the environment already sets it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_tctildr.h>

#include "iothub/hubkey.h"
#include "swtpm-helper.h"

#define HANDLE 0x81000101u
#define JOSE_PACKAGE "tests/node_modules/jose/package.json" /* the tests run from the top directory */

/* RFC 7517 A.2, the first key (P-256); its thumbprint as computed by jose 5.10
 * (calculateJwkThumbprint) and by Node's crypto over the RFC 7638 3.3 string. */
static const char rfc7517_key_pem[] = "-----BEGIN PRIVATE KEY-----\n"
                                      "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg870MB6gfuTJ4HtUn\n"
                                      "UvYMyJpr5eUZNP4Bk43bVdj3eAGhRANCAAQwoEJM0hwpRIOKLXXJKzfnbqINnwCJ\n"
                                      "OjtO7oo8Cq/sPuBLZekkVtmIi1Kzeb371R7oae8fD8ZbZllpW2zOCBcj\n"
                                      "-----END PRIVATE KEY-----\n";
#define RFC7517_X "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4"
#define RFC7517_Y "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"
#define RFC7517_THUMBPRINT "cn-I_WNMClehiVp51i_0VpOENW1upEerA8sEam5hn-s"

static struct swtpm tpm = { .pid = -1 };
static struct swtpm other_tpm = { .pid = -1 }; /* a second TPM; a global, so that teardown stops it */
static char filedir[] = "/tmp/test-hubkey-files-XXXXXX";

/* ---- helpers (swtpm, ports, now_usec, rm_rf: swtpm-helper.c) ---- */

static struct iothub_conf tpm_conf(const char *tcti, uint32_t handle) {
        return (struct iothub_conf) {
                .key = { .backend = KEY_BACKEND_TPM, .tcti = (char *) tcti, .handle = handle },
        };
}

static struct iothub_conf file_conf(const char *path) {
        return (struct iothub_conf) {
                .key = { .backend = KEY_BACKEND_FILE, .file = (char *) path },
        };
}

static char *file_path(const char *name) {
        char *p = NULL;

        assert_true(asprintf(&p, "%s/%s", filedir, name) > 0);
        return p;
}

static void write_file_mode(const char *path, const char *data, mode_t mode) {
        int fd;

        (void) unlink(path);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, data, strlen(data)), (ssize_t) strlen(data));
        assert_int_equal(fchmod(fd, mode), 0);
        close(fd);
}

static char *read_whole(const char *path) {
        char *buf = calloc(1, 65536);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t n;

        assert_non_null(buf);
        assert_true(fd >= 0);
        n = read(fd, buf, 65535);
        assert_true(n > 0);
        close(fd);
        return buf;
}

/* ---- helpers: independent crypto ---- */

/* base64url without padding through OpenSSL's plain base64 (not the project's encoder). */
static void b64url(const uint8_t *in, size_t len, char *out) {
        int n = EVP_EncodeBlock((unsigned char *) out, in, (int) len);

        assert_true(n >= 0);
        for (int i = 0; i < n; i++)
                out[i] = out[i] == '+' ? '-' : out[i] == '/' ? '_' : out[i];
        while (n > 0 && out[n - 1] == '=')
                out[--n] = '\0';
}

static EVP_PKEY *pubkey_of(const struct hubkey *k) {
        char *pem = NULL;
        BIO *bio;
        EVP_PKEY *pkey;

        assert_int_equal(hubkey_public_pem(k, &pem), 0);
        assert_non_null(strstr(pem, "-----BEGIN PUBLIC KEY-----\n"));
        bio = BIO_new_mem_buf(pem, -1);
        pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
        assert_non_null(pkey);
        BIO_free(bio);
        free(pem);
        return pkey;
}

/* Checks a raw r||s signature over a SHA-256 digest with OpenSSL against the key's PEM. */
static bool signature_verifies(const struct hubkey *k, const uint8_t digest[32], const uint8_t sig[64]) {
        EVP_PKEY *pkey = pubkey_of(k);
        EVP_PKEY_CTX *c = EVP_PKEY_CTX_new(pkey, NULL);
        ECDSA_SIG *es = ECDSA_SIG_new();
        unsigned char *der = NULL;
        int der_len, ok;

        assert_non_null(c);
        assert_non_null(es);
        assert_int_equal(ECDSA_SIG_set0(es, BN_bin2bn(sig, 32, NULL), BN_bin2bn(sig + 32, 32, NULL)), 1);
        der_len = i2d_ECDSA_SIG(es, &der);
        assert_true(der_len > 0);
        assert_int_equal(EVP_PKEY_verify_init(c), 1);
        assert_int_equal(EVP_PKEY_CTX_set_signature_md(c, EVP_sha256()), 1);
        ok = EVP_PKEY_verify(c, der, (size_t) der_len, digest, 32);
        OPENSSL_free(der);
        ECDSA_SIG_free(es);
        EVP_PKEY_CTX_free(c);
        EVP_PKEY_free(pkey);
        return ok == 1;
}

/* RFC 7638 computed here: coordinates from the PEM, the JSON string by hand, SHA-256. */
static void independent_thumbprint(const struct hubkey *k, char ret[64], char ret_x[64], char ret_y[64]) {
        EVP_PKEY *pkey = pubkey_of(k);
        BIGNUM *x = NULL, *y = NULL;
        uint8_t bx[32], by[32], md[32];
        char json[256];
        int n;

        assert_int_equal(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_EC_PUB_X, &x), 1);
        assert_int_equal(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_EC_PUB_Y, &y), 1);
        assert_int_equal(BN_bn2binpad(x, bx, 32), 32);
        assert_int_equal(BN_bn2binpad(y, by, 32), 32);
        b64url(bx, 32, ret_x);
        b64url(by, 32, ret_y);
        n = snprintf(json, sizeof json, "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}",
                     ret_x, ret_y);
        assert_true(n > 0 && (size_t) n < sizeof json);
        assert_int_equal(EVP_Digest(json, (size_t) n, md, NULL, EVP_sha256(), NULL), 1);
        b64url(md, 32, ret);
        BN_free(x);
        BN_free(y);
        EVP_PKEY_free(pkey);
}

/* Runs node with jose (in tests/node_modules) on the key's JWK and a JWS the key signed: prints
 * the thumbprint and whether jose verified the signature. Returns false when node or jose are
 * not there. */
static bool jose_check(const char *jwk, const char *jws, char *out, size_t cap) {
        static const char script[] =
                "const jose = require('jose');"
                "(async () => {"
                "  const jwk = JSON.parse(process.argv[1]);"
                "  const t = await jose.calculateJwkThumbprint(jwk, 'sha256');"
                "  let v = 'bad';"
                "  try { await jose.compactVerify(process.argv[2], await jose.importJWK(jwk, 'ES256'),"
                "                                 { algorithms: ['ES256'] }); v = 'ok'; } catch (e) {}"
                "  process.stdout.write(t + ' ' + v);"
                "})();";
        int pipefd[2], status;
        size_t len = 0;
        pid_t pid;

        if (access(JOSE_PACKAGE, R_OK) < 0) {
                print_message("note: %s not found, jose cross-check skipped (npm ci in tests/)\n",
                              JOSE_PACKAGE);
                return false;
        }
        assert_int_equal(pipe2(pipefd, O_CLOEXEC), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                (void) dup2(pipefd[1], STDOUT_FILENO);
                if (chdir("tests") < 0)
                        _exit(126);
                execlp("node", "node", "-e", script, jwk, jws, (char *) NULL);
                _exit(127);
        }
        close(pipefd[1]);
        for (;;) {
                ssize_t n = read(pipefd[0], out + len, cap - 1 - len);
                if (n <= 0)
                        break;
                len += (size_t) n;
        }
        out[len] = '\0';
        close(pipefd[0]);
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (WIFEXITED(status) && WEXITSTATUS(status) == 127) {
                print_message("note: node not found, jose cross-check skipped\n");
                return false;
        }
        assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        print_message("jose: thumbprint and signature check: %s\n", out);
        return true;
}

/* The checks every key gets, whichever backend: signatures over several digests verify with
 * OpenSSL, a changed digest does not, the counter counts; JWK members exact; key id equal to an
 * independent computation and, when available, to jose's; jose verifies a JWS it signed. */
static void check_key(struct hubkey *k) {
        static const char *messages[] = { "", "abc", "iothub", "{\"hub\":\"h\",\"dev\":\"bulb-1\"}" };
        char thumb[64], x[64], y[64], *dump;
        uint8_t digest[32], sig[64];
        uint64_t before = hubkey_signatures(k);
        json_t *jwk = NULL;
        unsigned n = 0;

        /* Digests: all zeros, all ones, the SHA-256 of a few strings, random ones. */
        for (unsigned i = 0; i < 2 + ELEMENTSOF(messages) + 8; i++) {
                if (i < 2)
                        memset(digest, i == 0 ? 0x00 : 0xff, sizeof digest);
                else if (i < 2 + ELEMENTSOF(messages))
                        assert_int_equal(EVP_Digest(messages[i - 2], strlen(messages[i - 2]), digest, NULL,
                                                    EVP_sha256(), NULL),
                                         1);
                else
                        assert_int_equal(RAND_bytes(digest, sizeof digest), 1);
                assert_int_equal(hubkey_sign_digest(k, digest, sig), 0);
                n++;
                assert_true(signature_verifies(k, digest, sig));
                digest[7] ^= 0x01;
                assert_false(signature_verifies(k, digest, sig));
        }
        /* hubkey_sign() is SHA-256 then hubkey_sign_digest(). */
        for (unsigned i = 0; i < ELEMENTSOF(messages); i++) {
                assert_int_equal(hubkey_sign(k, messages[i], strlen(messages[i]), sig), 0);
                n++;
                assert_int_equal(EVP_Digest(messages[i], strlen(messages[i]), digest, NULL, EVP_sha256(), NULL),
                                 1);
                assert_true(signature_verifies(k, digest, sig));
        }
        assert_int_equal(hubkey_signatures(k), before + n);

        /* The JWK: exactly kty, crv, x, y, in that order, with the coordinates of the PEM. */
        independent_thumbprint(k, thumb, x, y);
        assert_int_equal(hubkey_public_jwk(k, &jwk), 0);
        dump = json_dumps(jwk, JSON_COMPACT);
        assert_non_null(dump);
        {
                char expected[256];
                snprintf(expected, sizeof expected,
                         "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"%s\",\"y\":\"%s\"}", x, y);
                assert_string_equal(dump, expected);
        }
        assert_int_equal(strlen(hubkey_id(k)), HUBKEY_ID_LEN);
        assert_string_equal(hubkey_id(k), thumb);

        /* jose: the same thumbprint, and a JWS signed by the key verifies (PROTOCOL.md 2). */
        {
                static const char header[] = "{\"alg\":\"ES256\",\"kid\":\"k\",\"typ\":\"iothub-cmd\"}";
                static const char payload[] = "{\"hub\":\"h\",\"dev\":\"bulb-1\",\"id\":\"c1\"}";
                char h[128], p[128], s[128], input[512], jws[640], out[256], expected[128];

                b64url((const uint8_t *) header, strlen(header), h);
                b64url((const uint8_t *) payload, strlen(payload), p);
                snprintf(input, sizeof input, "%s.%s", h, p);
                assert_int_equal(hubkey_sign(k, input, strlen(input), sig), 0);
                b64url(sig, sizeof sig, s);
                snprintf(jws, sizeof jws, "%s.%s", input, s);
                if (jose_check(dump, jws, out, sizeof out)) {
                        snprintf(expected, sizeof expected, "%s ok", hubkey_id(k));
                        assert_string_equal(out, expected);
                }
        }
        free(dump);
        json_decref(jwk);
}

/* ---- helpers: ESYS calls of the test's own ---- */

static ESYS_CONTEXT *esys_connect(const char *tcti_conf, TSS2_TCTI_CONTEXT **ret_tcti) {
        ESYS_CONTEXT *esys = NULL;

        assert_int_equal(Tss2_TctiLdr_Initialize(tcti_conf, ret_tcti), TSS2_RC_SUCCESS);
        assert_int_equal(Esys_Initialize(&esys, *ret_tcti, NULL), TSS2_RC_SUCCESS);
        return esys;
}

static void esys_disconnect(ESYS_CONTEXT *esys, TSS2_TCTI_CONTEXT *tcti) {
        Esys_Finalize(&esys);
        Tss2_TctiLdr_Finalize(&tcti);
}

/* Creates a primary key from 'tmpl' in the owner hierarchy and makes it persistent at 'handle'. */
static void persist_primary(const char *tcti_conf, const TPM2B_PUBLIC *tmpl, uint32_t handle) {
        TSS2_TCTI_CONTEXT *tcti = NULL;
        ESYS_CONTEXT *esys = esys_connect(tcti_conf, &tcti);
        const TPM2B_SENSITIVE_CREATE sens = {};
        const TPM2B_DATA outside = {};
        const TPML_PCR_SELECTION pcrs = {};
        ESYS_TR primary = ESYS_TR_NONE, persistent = ESYS_TR_NONE;

        assert_int_equal(Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                            ESYS_TR_NONE, &sens, tmpl, &outside, &pcrs, &primary, NULL, NULL,
                                            NULL, NULL),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_EvictControl(esys, ESYS_TR_RH_OWNER, primary, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                           ESYS_TR_NONE, handle, &persistent),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_FlushContext(esys, primary), TSS2_RC_SUCCESS);
        assert_int_equal(Esys_TR_Close(esys, &persistent), TSS2_RC_SUCCESS);
        esys_disconnect(esys, tcti);
}

/* The TPM name (nameAlg || H(public area)) of the persistent object at 'handle', which changes
 * when the object does. Returns false when there is none. */
static bool persistent_name(const char *tcti_conf, uint32_t handle, TPM2B_NAME *ret) {
        TSS2_TCTI_CONTEXT *tcti = NULL;
        ESYS_CONTEXT *esys = esys_connect(tcti_conf, &tcti);
        TPMS_CAPABILITY_DATA *cap = NULL;
        TPM2B_NAME *name = NULL;
        TPMI_YES_NO more;
        ESYS_TR tr = ESYS_TR_NONE;
        bool found;

        assert_int_equal(Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_HANDLES,
                                            handle, 1, &more, &cap),
                         TSS2_RC_SUCCESS);
        found = cap->data.handles.count == 1 && cap->data.handles.handle[0] == handle;
        Esys_Free(cap);
        if (found) {
                assert_int_equal(Esys_TR_FromTPMPublic(esys, handle, ESYS_TR_NONE, ESYS_TR_NONE,
                                                       ESYS_TR_NONE, &tr),
                                 TSS2_RC_SUCCESS);
                assert_int_equal(Esys_TR_GetName(esys, tr, &name), TSS2_RC_SUCCESS);
                *ret = *name;
                Esys_Free(name);
                assert_int_equal(Esys_TR_Close(esys, &tr), TSS2_RC_SUCCESS);
        }
        esys_disconnect(esys, tcti);
        return found;
}

static void assert_name_equal(const TPM2B_NAME *a, const TPM2B_NAME *b) {
        assert_true(a->size > 0);
        assert_int_equal(a->size, b->size);
        assert_memory_equal(a->name, b->name, a->size);
}

static void evict(const char *tcti_conf, uint32_t handle) {
        TSS2_TCTI_CONTEXT *tcti = NULL;
        ESYS_CONTEXT *esys = esys_connect(tcti_conf, &tcti);
        ESYS_TR tr = ESYS_TR_NONE, none = ESYS_TR_NONE;

        assert_int_equal(Esys_TR_FromTPMPublic(esys, handle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &tr),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_EvictControl(esys, ESYS_TR_RH_OWNER, tr, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                           ESYS_TR_NONE, handle, &none),
                         TSS2_RC_SUCCESS);
        esys_disconnect(esys, tcti);
}

/* Number of transient objects loaded in the TPM: must stay 0 between calls (TESTBED.md). */
static unsigned transient_objects(const char *tcti_conf) {
        TSS2_TCTI_CONTEXT *tcti = NULL;
        ESYS_CONTEXT *esys = esys_connect(tcti_conf, &tcti);
        TPMS_CAPABILITY_DATA *cap = NULL;
        TPMI_YES_NO more;
        unsigned n;

        assert_int_equal(Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_HANDLES,
                                            UINT32_C(0x80000000) /* transient */, TPM2_MAX_CAP_HANDLES,
                                            &more, &cap),
                         TSS2_RC_SUCCESS);
        n = cap->data.handles.count;
        Esys_Free(cap);
        esys_disconnect(esys, tcti);
        return n;
}

#define ATTRS_FIXED                                                                                         \
        (TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN |                 \
         TPMA_OBJECT_USERWITHAUTH)

static TPM2B_PUBLIC ecc_template(TPMA_OBJECT attrs, TPMI_ECC_CURVE curve, TPMI_ALG_ECC_SCHEME scheme,
                                 TPMI_ALG_HASH hash) {
        TPM2B_PUBLIC t = {
                .publicArea = {
                        .type = TPM2_ALG_ECC,
                        .nameAlg = TPM2_ALG_SHA256,
                        .objectAttributes = attrs,
                        .parameters.eccDetail = {
                                .symmetric.algorithm = TPM2_ALG_NULL,
                                .scheme = { .scheme = scheme, .details.anySig.hashAlg = hash },
                                .curveID = curve,
                                .kdf.scheme = TPM2_ALG_NULL,
                        },
                },
        };
        if (attrs & TPMA_OBJECT_RESTRICTED)
                t.publicArea.parameters.eccDetail.symmetric = (TPMT_SYM_DEF_OBJECT) {
                        .algorithm = TPM2_ALG_AES, .keyBits.aes = 128, .mode.aes = TPM2_ALG_CFB
                };
        return t;
}

/* ---- tpm backend ---- */

static int tpm_setup(_unused_ void **state) {
        swtpm_start(&tpm, "hubkey");
        return 0;
}

static int tpm_teardown(_unused_ void **state) {
        swtpm_stop(&other_tpm);
        swtpm_stop(&tpm);
        return 0;
}

static void test_tpm_init_is_idempotent(_unused_ void **state) {
        struct iothub_conf c = tpm_conf(tpm.tcti, HANDLE);
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;
        char *error = NULL, id[HUBKEY_ID_LEN + 1];
        TPM2B_NAME before, after;
        bool created = false;

        /* No key yet: open says so, and says what to do. */
        assert_int_equal(hubkey_open(&c, &k, &error), -ENOENT);
        assert_null(k);
        assert_string_equal(error,
                            "no key at TPM handle 0x81000101 (run 'iothubctl key init' to create it)");
        free(error);
        error = NULL;

        assert_int_equal(hubkey_init(&c, &created, &error), 0);
        assert_null(error);
        assert_true(created);
        assert_int_equal(transient_objects(tpm.tcti), 0);
        assert_true(persistent_name(tpm.tcti, HANDLE, &before));

        assert_int_equal(hubkey_open(&c, &k, &error), 0);
        assert_null(error);
        assert_int_equal(hubkey_backend(k), KEY_BACKEND_TPM);
        assert_int_equal(hubkey_signatures(k), 0);
        strcpy(id, hubkey_id(k));
        hubkey_free(TAKE_PTR(k));

        /* Again: nothing made, nothing replaced, the same key. */
        created = true;
        assert_int_equal(hubkey_init(&c, &created, &error), 0);
        assert_false(created);
        assert_true(persistent_name(tpm.tcti, HANDLE, &after));
        assert_name_equal(&before, &after);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        assert_string_equal(hubkey_id(k), id);
        assert_int_equal(transient_objects(tpm.tcti), 0);
}

static void test_tpm_sign(_unused_ void **state) {
        struct iothub_conf c = tpm_conf(tpm.tcti, HANDLE);
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;

        assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        check_key(k);
        assert_int_equal(transient_objects(tpm.tcti), 0);
}

/* The key lives in its TPM: another TPM (fresh state) has none, and makes a different one. */
static void test_tpm_key_is_bound_to_its_tpm(_unused_ void **state) {
        struct iothub_conf c = tpm_conf(tpm.tcti, HANDLE);
        _cleanup_(hubkey_freep) struct hubkey *k = NULL, *k2 = NULL;
        char *error = NULL;
        bool created;

        assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);

        swtpm_start(&other_tpm, "hubkey");
        c = tpm_conf(other_tpm.tcti, HANDLE);
        assert_int_equal(hubkey_open(&c, &k2, &error), -ENOENT);
        assert_non_null(strstr(error, "no key at TPM handle 0x81000101"));
        free(error);
        assert_int_equal(hubkey_init(&c, &created, NULL), 0);
        assert_true(created);
        assert_int_equal(hubkey_open(&c, &k2, NULL), 0);
        assert_string_not_equal(hubkey_id(k), hubkey_id(k2));
        hubkey_free(TAKE_PTR(k2));
        swtpm_stop(&other_tpm);
}

/* A handle that holds something else: init refuses with -EEXIST and leaves it as it was, open
 * refuses too. Each case uses a handle of its own, evicted afterwards. */
static void test_tpm_handle_occupied(_unused_ void **state) {
        const TPMA_OBJECT sign = TPMA_OBJECT_SIGN_ENCRYPT | ATTRS_FIXED;
        struct {
                const char *name;
                TPM2B_PUBLIC tmpl;
                const char *expected;
        } cases[] = {
                { "RSA storage key",
                  {
                          .publicArea = {
                                  .type = TPM2_ALG_RSA,
                                  .nameAlg = TPM2_ALG_SHA256,
                                  .objectAttributes = TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT |
                                                      ATTRS_FIXED | TPMA_OBJECT_NODA,
                                  .parameters.rsaDetail = {
                                          .symmetric = { .algorithm = TPM2_ALG_AES, .keyBits.aes = 128,
                                                         .mode.aes = TPM2_ALG_CFB },
                                          .scheme.scheme = TPM2_ALG_NULL,
                                          .keyBits = 2048,
                                  },
                          },
                  },
                  "an RSA key" },
                { "ECC P-256 storage key (an SRK)",
                  ecc_template(TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | ATTRS_FIXED | TPMA_OBJECT_NODA,
                               TPM2_ECC_NIST_P256, TPM2_ALG_NULL, 0),
                  "a restricted ECC key" },
                { "ECC P-384 signing key",
                  ecc_template(sign, TPM2_ECC_NIST_P384, TPM2_ALG_ECDSA, TPM2_ALG_SHA384),
                  "another curve" },
                { "ECC P-256 decryption key",
                  ecc_template(TPMA_OBJECT_DECRYPT | ATTRS_FIXED, TPM2_ECC_NIST_P256, TPM2_ALG_NULL, 0),
                  "not sign-only" },
                { "ECC P-256 ECDSA-SHA384 key",
                  ecc_template(sign, TPM2_ECC_NIST_P256, TPM2_ALG_ECDSA, TPM2_ALG_SHA384), "another scheme" },
                { "ECC P-256 key for a policy only",
                  ecc_template(sign & ~TPMA_OBJECT_USERWITHAUTH, TPM2_ECC_NIST_P256, TPM2_ALG_ECDSA,
                               TPM2_ALG_SHA256),
                  "needs a policy session" },
                { "ECC P-256 duplicable key",
                  ecc_template(TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_SENSITIVEDATAORIGIN |
                                       TPMA_OBJECT_USERWITHAUTH,
                               TPM2_ECC_NIST_P256, TPM2_ALG_ECDSA, TPM2_ALG_SHA256),
                  "not generated in and bound to this TPM" },
                { "HMAC key",
                  {
                          .publicArea = {
                                  .type = TPM2_ALG_KEYEDHASH,
                                  .nameAlg = TPM2_ALG_SHA256,
                                  .objectAttributes = sign,
                                  .parameters.keyedHashDetail.scheme = {
                                          .scheme = TPM2_ALG_HMAC,
                                          .details.hmac.hashAlg = TPM2_ALG_SHA256,
                                  },
                          },
                  },
                  "a keyed-hash object" },
        };

        for (unsigned i = 0; i < ELEMENTSOF(cases); i++) {
                uint32_t handle = 0x81010010u + i;
                struct iothub_conf c = tpm_conf(tpm.tcti, handle);
                _cleanup_(hubkey_freep) struct hubkey *k = NULL;
                char *error = NULL, prefix[64];
                TPM2B_NAME before, after;
                bool created = true;

                print_message("occupied by %s\n", cases[i].name);
                persist_primary(tpm.tcti, &cases[i].tmpl, handle);
                assert_true(persistent_name(tpm.tcti, handle, &before));

                assert_int_equal(hubkey_init(&c, &created, &error), -EEXIST);
                assert_true(created); /* untouched on failure */
                snprintf(prefix, sizeof prefix, "TPM handle 0x%08" PRIx32 " holds another kind of object (",
                         handle);
                assert_memory_equal(error, prefix, strlen(prefix));
                assert_non_null(strstr(error, cases[i].expected));
                assert_non_null(strstr(error, "refusing to replace it"));
                free(error);
                error = NULL;

                assert_true(persistent_name(tpm.tcti, handle, &after));
                assert_name_equal(&before, &after);

                assert_int_equal(hubkey_open(&c, &k, &error), -EEXIST);
                assert_null(k);
                assert_non_null(strstr(error, cases[i].expected));
                free(error);

                evict(tpm.tcti, handle);
                assert_int_equal(transient_objects(tpm.tcti), 0);
        }
}

/* A P-256 signing key made by someone else with a NULL scheme (any scheme allowed at signing
 * time): usable, so init makes nothing and open signs with it. */
static void test_tpm_compatible_foreign_key(_unused_ void **state) {
        const uint32_t handle = 0x81010030u;
        TPM2B_PUBLIC tmpl = ecc_template(TPMA_OBJECT_SIGN_ENCRYPT | ATTRS_FIXED, TPM2_ECC_NIST_P256,
                                         TPM2_ALG_NULL, 0);
        struct iothub_conf c = tpm_conf(tpm.tcti, handle);
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;
        bool created = true;

        persist_primary(tpm.tcti, &tmpl, handle);
        assert_int_equal(hubkey_init(&c, &created, NULL), 0);
        assert_false(created);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        check_key(k);
        hubkey_free(TAKE_PTR(k));
        evict(tpm.tcti, handle);
}

/* Without a resource manager the TPM has three object slots: creating keys more often than that,
 * and opening many times, must leave nothing loaded behind. */
static void test_tpm_no_transient_leaks(_unused_ void **state) {
        for (unsigned i = 0; i < 5; i++) {
                struct iothub_conf c = tpm_conf(tpm.tcti, 0x81010040u + i);
                bool created = false;

                assert_int_equal(hubkey_init(&c, &created, NULL), 0);
                assert_true(created);
        }
        for (unsigned i = 0; i < 20; i++) {
                struct iothub_conf c = tpm_conf(tpm.tcti, 0x81010040u + i % 5);
                _cleanup_(hubkey_freep) struct hubkey *k = NULL;
                uint8_t digest[32] = { (uint8_t) i }, sig[64];

                assert_int_equal(hubkey_open(&c, &k, NULL), 0);
                assert_int_equal(hubkey_sign_digest(k, digest, sig), 0);
        }
        assert_int_equal(transient_objects(tpm.tcti), 0);
        for (unsigned i = 0; i < 5; i++)
                evict(tpm.tcti, 0x81010040u + i);
}

static void test_tpm_bad_handle(_unused_ void **state) {
        static const uint32_t handles[] = { 0, 0x80000001u, 0x81800000u, 0x01000000u };

        for (unsigned i = 0; i < ELEMENTSOF(handles); i++) {
                struct iothub_conf c = tpm_conf(tpm.tcti, handles[i]);
                struct hubkey *k = NULL;
                char *error = NULL;

                assert_int_equal(hubkey_init(&c, NULL, &error), -EINVAL);
                assert_non_null(strstr(error, "is not a persistent handle"));
                free(error);
                assert_int_equal(hubkey_open(&c, &k, NULL), -EINVAL);
                assert_null(k);
        }
}

static void test_tpm_unreachable(_unused_ void **state) {
        uint16_t port = pick_port_pair(); /* nothing listens there */
        char tcti[64], expected[128], *error = NULL;
        struct iothub_conf c;
        struct hubkey *k = NULL;
        bool created = true;

        snprintf(tcti, sizeof tcti, "swtpm:host=127.0.0.1,port=%u", port);
        c = tpm_conf(tcti, HANDLE);
        snprintf(expected, sizeof expected, " while connecting to the TPM with TCTI '%s'", tcti);

        assert_int_equal(hubkey_open(&c, &k, &error), -ECONNREFUSED);
        assert_null(k);
        print_message("%s\n", error);
        assert_memory_equal(error, "TPM: ", 5);
        assert_non_null(strstr(error, expected));
        free(error);
        error = NULL;

        assert_int_equal(hubkey_init(&c, &created, &error), -ECONNREFUSED);
        assert_true(created);
        assert_non_null(strstr(error, expected));
        free(error);
}

/* Not a pass/fail test: how long the TPM operations take on swtpm (DESIGN.md "Inside the daemon":
 * slow TPM operations must not stall the loop for long). */
static void test_tpm_timing(_unused_ void **state) {
        struct iothub_conf c = tpm_conf(tpm.tcti, HANDLE);
        uint64_t t, open_min = UINT64_MAX, open_sum = 0, sign_min = UINT64_MAX, sign_max = 0, sign_sum = 0;
        const unsigned opens = 10, signs = 200;
        uint8_t digest[32] = {}, sig[64];
        bool created;

        {
                struct iothub_conf fresh = tpm_conf(tpm.tcti, 0x81010050u);

                t = now_usec();
                assert_int_equal(hubkey_init(&fresh, &created, NULL), 0);
                assert_true(created);
                print_message("timing: hubkey_init creating a key: %.2f ms\n",
                              (double) (now_usec() - t) / 1000.0);
                evict(tpm.tcti, 0x81010050u);
        }
        t = now_usec();
        assert_int_equal(hubkey_init(&c, &created, NULL), 0);
        assert_false(created);
        print_message("timing: hubkey_init with the key present: %.2f ms\n",
                      (double) (now_usec() - t) / 1000.0);
        for (unsigned i = 0; i < opens; i++) {
                struct hubkey *k = NULL;
                uint64_t d;

                t = now_usec();
                assert_int_equal(hubkey_open(&c, &k, NULL), 0);
                d = now_usec() - t;
                open_sum += d;
                open_min = d < open_min ? d : open_min;
                if (i == opens - 1)
                        for (unsigned j = 0; j < signs; j++) {
                                digest[0] = (uint8_t) j;
                                t = now_usec();
                                assert_int_equal(hubkey_sign_digest(k, digest, sig), 0);
                                d = now_usec() - t;
                                sign_sum += d;
                                sign_min = d < sign_min ? d : sign_min;
                                sign_max = d > sign_max ? d : sign_max;
                        }
                hubkey_free(k);
        }
        print_message("timing: hubkey_open: mean %.2f ms, min %.2f ms (%u runs)\n",
                      (double) open_sum / opens / 1000.0, (double) open_min / 1000.0, opens);
        print_message("timing: hubkey_sign_digest (Esys_Sign): mean %.3f ms, min %.3f ms, max %.3f ms "
                      "(%u runs)\n",
                      (double) sign_sum / signs / 1000.0, (double) sign_min / 1000.0,
                      (double) sign_max / 1000.0, signs);
}

/* ---- sealing (tpm backend) ---- */

/* Number of sessions loaded in the TPM: must stay 0 between calls too. */
static unsigned loaded_sessions(const char *tcti_conf) {
        TSS2_TCTI_CONTEXT *tcti = NULL;
        ESYS_CONTEXT *esys = esys_connect(tcti_conf, &tcti);
        TPMS_CAPABILITY_DATA *cap = NULL;
        TPMI_YES_NO more;
        unsigned n = 0;

        for (unsigned i = 0; i < 2; i++) {
                uint32_t first = i == 0 ? UINT32_C(0x02000000) /* loaded */ : UINT32_C(0x03000000) /* saved */;

                assert_int_equal(Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                                    TPM2_CAP_HANDLES, first, TPM2_MAX_CAP_HANDLES, &more, &cap),
                                 TSS2_RC_SUCCESS);
                n += cap->data.handles.count;
                Esys_Free(cap);
                cap = NULL;
        }
        esys_disconnect(esys, tcti);
        return n;
}

static void assert_tpm_clean(const char *tcti_conf) {
        assert_int_equal(transient_objects(tcti_conf), 0);
        assert_int_equal(loaded_sessions(tcti_conf), 0);
}

static struct hubkey *open_tpm_key(const char *tcti_conf) {
        struct iothub_conf c = tpm_conf(tcti_conf, HANDLE);
        struct hubkey *k = NULL;

        assert_int_equal(hubkey_init(&c, NULL, NULL), 0);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        return k;
}

/* The storage primary key of the TCG provisioning guidance, written out here again, and a sealed-data
 * object made under it by the test's own ESYS calls, as the blob format is documented: "IHS1" ||
 * TPM2B_PUBLIC || TPM2B_PRIVATE. With the module's template the module must unseal it; with another
 * one (that the TPM would load just as well) it must refuse it. Returns the blob's length. */
static size_t independent_blob(const char *tcti_conf, const TPM2B_PUBLIC *tmpl, const uint8_t *data, size_t len,
                               uint8_t *out, size_t cap) {
        const TPM2B_PUBLIC srk = {
                .publicArea = {
                        .type = TPM2_ALG_ECC,
                        .nameAlg = TPM2_ALG_SHA256,
                        .objectAttributes = TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_NODA |
                                            ATTRS_FIXED,
                        .parameters.eccDetail = {
                                .symmetric = { .algorithm = TPM2_ALG_AES, .keyBits.aes = 128,
                                               .mode.aes = TPM2_ALG_CFB },
                                .scheme.scheme = TPM2_ALG_NULL,
                                .curveID = TPM2_ECC_NIST_P256,
                                .kdf.scheme = TPM2_ALG_NULL,
                        },
                },
        };
        TSS2_TCTI_CONTEXT *tcti = NULL;
        ESYS_CONTEXT *esys = esys_connect(tcti_conf, &tcti);
        TPM2B_SENSITIVE_CREATE sens = {};
        const TPM2B_DATA outside = {};
        const TPML_PCR_SELECTION pcrs = {};
        TPM2B_PRIVATE *priv = NULL;
        TPM2B_PUBLIC *pub = NULL;
        ESYS_TR primary = ESYS_TR_NONE;
        size_t offset = 4;

        sens.sensitive.data.size = (uint16_t) len;
        memcpy(sens.sensitive.data.buffer, data, len);
        assert_int_equal(Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                            ESYS_TR_NONE, &(TPM2B_SENSITIVE_CREATE) {}, &srk, &outside, &pcrs,
                                            &primary, NULL, NULL, NULL, NULL),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_Create(esys, primary, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &sens, tmpl,
                                     &outside, &pcrs, &priv, &pub, NULL, NULL, NULL),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_FlushContext(esys, primary), TSS2_RC_SUCCESS);
        memcpy(out, "IHS1", 4);
        assert_int_equal(Tss2_MU_TPM2B_PUBLIC_Marshal(pub, out, cap, &offset), TSS2_RC_SUCCESS);
        assert_int_equal(Tss2_MU_TPM2B_PRIVATE_Marshal(priv, out, cap, &offset), TSS2_RC_SUCCESS);
        Esys_Free(priv);
        Esys_Free(pub);
        esys_disconnect(esys, tcti);
        return offset;
}

static TPM2B_PUBLIC sealed_template(TPMA_OBJECT attrs) {
        return (TPM2B_PUBLIC) {
                .publicArea = {
                        .type = TPM2_ALG_KEYEDHASH,
                        .nameAlg = TPM2_ALG_SHA256,
                        .objectAttributes = attrs,
                        .parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_NULL,
                },
        };
}

#define SEALED_ATTRS                                                                                        \
        (TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA)

/* Unseals and expects failure with one of two errnos, and the results untouched. */
static int unseal_fails(struct hubkey *k, const uint8_t *blob, size_t len) {
        uint8_t *secret = (uint8_t *) "untouched";
        size_t secret_len = 4242;
        int r;

        r = hubkey_unseal(k, blob, len, &secret, &secret_len);
        assert_true(r < 0);
        assert_string_equal((char *) secret, "untouched");
        assert_int_equal(secret_len, 4242);
        return r;
}

static void test_tpm_seal_round_trip(_unused_ void **state) {
        static const size_t sizes[] = { 1, 16, 32, 64, 127, HUBKEY_SEAL_MAX };
        _cleanup_(hubkey_freep) struct hubkey *k = open_tpm_key(tpm.tcti);
        uint8_t secret[HUBKEY_SEAL_MAX + 1];

        for (unsigned i = 0; i < ELEMENTSOF(sizes); i++) {
                uint8_t *blob = NULL, *blob2 = NULL, *out = NULL;
                size_t blob_len = 0, blob2_len = 0, out_len = 0;

                assert_int_equal(RAND_bytes(secret, (int) sizes[i]), 1);
                assert_int_equal(hubkey_seal(k, secret, sizes[i], &blob, &blob_len), 0);
                print_message("sealed %zu bytes: blob of %zu bytes\n", sizes[i], blob_len);
                assert_memory_equal(blob, "IHS1", 4);
                assert_true(blob_len <= 1024);
                /* The secret is nowhere in the blob in clear. */
                if (sizes[i] >= 16)
                        assert_null(memmem(blob, blob_len, secret, sizes[i]));
                assert_int_equal(hubkey_unseal(k, blob, blob_len, &out, &out_len), 0);
                assert_int_equal(out_len, sizes[i]);
                assert_memory_equal(out, secret, sizes[i]);

                /* Sealing again gives another blob (a fresh seed and IV) of the same secret. */
                assert_int_equal(hubkey_seal(k, secret, sizes[i], &blob2, &blob2_len), 0);
                assert_true(blob_len != blob2_len || memcmp(blob, blob2, blob_len) != 0);
                free(out);
                out = NULL;
                assert_int_equal(hubkey_unseal(k, blob2, blob2_len, &out, &out_len), 0);
                assert_memory_equal(out, secret, sizes[i]);
                free(out);
                free(blob);
                free(blob2);
        }

        /* Too long, empty, NULL: refused, results untouched. */
        {
                uint8_t *blob = (uint8_t *) "untouched";
                size_t blob_len = 4242;

                assert_int_equal(hubkey_seal(k, secret, HUBKEY_SEAL_MAX + 1, &blob, &blob_len), -EMSGSIZE);
                assert_int_equal(hubkey_seal(k, secret, 0, &blob, &blob_len), -EINVAL);
                assert_int_equal(hubkey_seal(k, NULL, 8, &blob, &blob_len), -EINVAL);
                assert_int_equal(hubkey_seal(NULL, secret, 8, &blob, &blob_len), -EINVAL);
                assert_string_equal((char *) blob, "untouched");
                assert_int_equal(blob_len, 4242);
        }
        assert_tpm_clean(tpm.tcti);
}

/* The format as documented, made without the module: unsealed. The same with another template (that
 * the TPM would load as well): refused before the TPM sees it. */
static void test_tpm_unseal_independent_blob(_unused_ void **state) {
        _cleanup_(hubkey_freep) struct hubkey *k = open_tpm_key(tpm.tcti);
        static const uint8_t secret[] = "a secret made elsewhere, 32 b..";
        uint8_t blob[2048], *out = NULL;
        size_t len, out_len = 0;
        TPM2B_PUBLIC tmpl = sealed_template(SEALED_ATTRS);
        struct {
                const char *name;
                TPM2B_PUBLIC tmpl;
        } others[] = {
                { "duplicable (no fixedTPM, no fixedParent)",
                  sealed_template(TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA) },
                { "DA-protected", sealed_template(SEALED_ATTRS & ~TPMA_OBJECT_NODA) },
                { "with a policy", sealed_template(SEALED_ATTRS) },
                { "SHA-384 name", sealed_template(SEALED_ATTRS) },
        };

        others[2].tmpl.publicArea.authPolicy.size = 32;
        others[3].tmpl.publicArea.nameAlg = TPM2_ALG_SHA384;

        len = independent_blob(tpm.tcti, &tmpl, secret, sizeof secret, blob, sizeof blob);
        assert_int_equal(hubkey_unseal(k, blob, len, &out, &out_len), 0);
        assert_int_equal(out_len, sizeof secret);
        assert_memory_equal(out, secret, sizeof secret);
        free(out);

        for (unsigned i = 0; i < ELEMENTSOF(others); i++) {
                print_message("sealed-data object %s\n", others[i].name);
                len = independent_blob(tpm.tcti, &others[i].tmpl, secret, sizeof secret, blob, sizeof blob);
                assert_int_equal(unseal_fails(k, blob, len), -EBADMSG);
        }
        assert_tpm_clean(tpm.tcti);
}

/* Malformed blobs: every truncation, trailing bytes, another magic, oversize, and every single-bit
 * change anywhere: -EBADMSG when the module sees it, -ENOKEY when the TPM's integrity check does;
 * never a secret, and nothing left loaded. */
static void test_tpm_unseal_malformed(_unused_ void **state) {
        _cleanup_(hubkey_freep) struct hubkey *k = open_tpm_key(tpm.tcti);
        uint8_t secret[32], *blob = NULL, bad[2048];
        size_t len = 0;
        unsigned badmsg = 0, nokey = 0;

        assert_int_equal(RAND_bytes(secret, sizeof secret), 1);
        assert_int_equal(hubkey_seal(k, secret, sizeof secret, &blob, &len), 0);

        for (size_t n = 0; n < len; n++)
                assert_int_equal(unseal_fails(k, n == 0 ? NULL : blob, n), -EBADMSG);

        memcpy(bad, blob, len);
        for (size_t extra = 1; extra <= 16; extra *= 2) {
                memset(bad + len, extra == 1 ? 0 : 0xa5, extra);
                assert_int_equal(unseal_fails(k, bad, len + extra), -EBADMSG);
        }
        memset(bad + len, 0, sizeof bad - len);
        assert_int_equal(unseal_fails(k, bad, 1025), -EBADMSG); /* larger than any blob, refused unread */
        assert_int_equal(unseal_fails(k, bad, sizeof bad), -EBADMSG);

        for (unsigned i = 0; i < 3; i++) {
                static const char *magics[] = { "IHS2", "ihs1", "\0\0\0\0" };

                memcpy(bad, blob, len);
                memcpy(bad, magics[i], 4);
                assert_int_equal(unseal_fails(k, bad, len), -EBADMSG);
        }

        for (size_t pos = 0; pos < len; pos++) {
                int r;

                memcpy(bad, blob, len);
                bad[pos] ^= (uint8_t) (1u << (pos % 8));
                r = unseal_fails(k, bad, len);
                if (r == -EBADMSG)
                        badmsg++;
                else if (r == -ENOKEY)
                        nokey++;
                else
                        fail_msg("bit flipped at byte %zu: %d (%s)", pos, r, strerror(-r));
        }
        print_message("%zu bit flips: %u refused by the module (-EBADMSG), %u by the TPM (-ENOKEY)\n", len,
                      badmsg, nokey);
        assert_true(badmsg > 0 && nokey > 0);

        /* The original still unseals. */
        {
                uint8_t *out = NULL;
                size_t out_len = 0;

                assert_int_equal(hubkey_unseal(k, blob, len, &out, &out_len), 0);
                assert_memory_equal(out, secret, sizeof secret);
                free(out);
        }
        free(blob);
        assert_tpm_clean(tpm.tcti);
}

/* A blob can only be unsealed by the TPM that sealed it: another TPM (fresh state, its own key init)
 * refuses it with -ENOKEY, both ways. */
static void test_tpm_seal_bound_to_its_tpm(_unused_ void **state) {
        _cleanup_(hubkey_freep) struct hubkey *k = open_tpm_key(tpm.tcti), *k2 = NULL;
        uint8_t secret[32], *blob = NULL, *blob2 = NULL, *out = NULL;
        size_t len = 0, len2 = 0, out_len = 0;

        assert_int_equal(RAND_bytes(secret, sizeof secret), 1);
        assert_int_equal(hubkey_seal(k, secret, sizeof secret, &blob, &len), 0);

        swtpm_start(&other_tpm, "hubkey");
        k2 = open_tpm_key(other_tpm.tcti);
        assert_int_equal(unseal_fails(k2, blob, len), -ENOKEY);
        assert_int_equal(hubkey_seal(k2, secret, sizeof secret, &blob2, &len2), 0);
        assert_int_equal(hubkey_unseal(k2, blob2, len2, &out, &out_len), 0);
        assert_memory_equal(out, secret, sizeof secret);
        free(out);
        assert_int_equal(unseal_fails(k, blob2, len2), -ENOKEY);
        assert_tpm_clean(other_tpm.tcti);
        hubkey_free(TAKE_PTR(k2));
        swtpm_stop(&other_tpm);

        /* Still fine on its own TPM. */
        assert_int_equal(hubkey_unseal(k, blob, len, &out, &out_len), 0);
        assert_memory_equal(out, secret, sizeof secret);
        free(out);
        free(blob);
        free(blob2);
        assert_tpm_clean(tpm.tcti);
}

/* Unseals a blob with the test's own ESYS calls and a plain password authorization: no parameter
 * encryption, so the secret crosses the bus in clear (the control for the test below). */
static void plain_unseal(const char *tcti_conf, const uint8_t *blob, size_t len) {
        const TPM2B_PUBLIC srk = {
                .publicArea = {
                        .type = TPM2_ALG_ECC,
                        .nameAlg = TPM2_ALG_SHA256,
                        .objectAttributes = TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_NODA |
                                            ATTRS_FIXED,
                        .parameters.eccDetail = {
                                .symmetric = { .algorithm = TPM2_ALG_AES, .keyBits.aes = 128,
                                               .mode.aes = TPM2_ALG_CFB },
                                .scheme.scheme = TPM2_ALG_NULL,
                                .curveID = TPM2_ECC_NIST_P256,
                                .kdf.scheme = TPM2_ALG_NULL,
                        },
                },
        };
        TSS2_TCTI_CONTEXT *tcti = NULL;
        ESYS_CONTEXT *esys = esys_connect(tcti_conf, &tcti);
        const TPM2B_DATA outside = {};
        const TPML_PCR_SELECTION pcrs = {};
        TPM2B_SENSITIVE_DATA *data = NULL;
        TPM2B_PUBLIC pub = {};
        TPM2B_PRIVATE priv = {};
        ESYS_TR primary = ESYS_TR_NONE, object = ESYS_TR_NONE;
        size_t offset = 4;

        assert_int_equal(Tss2_MU_TPM2B_PUBLIC_Unmarshal(blob, len, &offset, &pub), TSS2_RC_SUCCESS);
        assert_int_equal(Tss2_MU_TPM2B_PRIVATE_Unmarshal(blob, len, &offset, &priv), TSS2_RC_SUCCESS);
        assert_int_equal(Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                            ESYS_TR_NONE, &(TPM2B_SENSITIVE_CREATE) {}, &srk, &outside, &pcrs,
                                            &primary, NULL, NULL, NULL, NULL),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_Load(esys, primary, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &priv, &pub,
                                   &object),
                         TSS2_RC_SUCCESS);
        assert_int_equal(Esys_Unseal(esys, object, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &data),
                         TSS2_RC_SUCCESS);
        Esys_Free(data);
        assert_int_equal(Esys_FlushContext(esys, object), TSS2_RC_SUCCESS);
        assert_int_equal(Esys_FlushContext(esys, primary), TSS2_RC_SUCCESS);
        esys_disconnect(esys, tcti);
}

/* The secret never crosses the bus in clear: all TPM traffic of a seal and an unseal, recorded with
 * tpm2-tss's pcap TCTI, does not contain it, while it does contain the blob's public area (the capture
 * works), and the secret does show up when the same blob is unsealed without parameter encryption. */
static void test_tpm_seal_bus_is_encrypted(_unused_ void **state) {
        char pcap[] = "/tmp/test-hubkey-pcap-XXXXXX", pcap_tcti[96];
        struct iothub_conf c;
        struct hubkey *k = NULL;
        uint8_t secret[32], *blob = NULL, *out = NULL, *capture;
        size_t len = 0, out_len = 0, capture_len;
        int fd;

        {
                _cleanup_(hubkey_freep) struct hubkey *init = open_tpm_key(tpm.tcti);
        }
        fd = mkstemp(pcap);
        assert_true(fd >= 0);
        close(fd);
        assert_int_equal(setenv("TCTI_PCAP_FILE", pcap, 1), 0);
        snprintf(pcap_tcti, sizeof pcap_tcti, "pcap:%s", tpm.tcti);
        c = tpm_conf(pcap_tcti, HANDLE);

        assert_int_equal(RAND_bytes(secret, sizeof secret), 1);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        assert_int_equal(hubkey_seal(k, secret, sizeof secret, &blob, &len), 0);
        assert_int_equal(hubkey_unseal(k, blob, len, &out, &out_len), 0);
        assert_memory_equal(out, secret, sizeof secret);
        hubkey_free(k);

        capture = read_bytes(pcap, &capture_len);
        print_message("pcap of seal and unseal: %zu bytes\n", capture_len);
        assert_non_null(memmem(capture, capture_len, blob + 6, 32)); /* the public area went over the bus */
        assert_null(memmem(capture, capture_len, secret, sizeof secret));
        free(capture);

        /* Control: without parameter encryption the secret is in the capture. */
        assert_int_equal(truncate(pcap, 0), 0);
        plain_unseal(pcap_tcti, blob, len);
        capture = read_bytes(pcap, &capture_len);
        assert_non_null(memmem(capture, capture_len, secret, sizeof secret));
        free(capture);

        (void) unsetenv("TCTI_PCAP_FILE");
        (void) unlink(pcap);
        free(blob);
        free(out);
        assert_tpm_clean(tpm.tcti);
}

/* Not a pass/fail test: what sealing and unsealing cost on swtpm. */
static void test_tpm_seal_timing(_unused_ void **state) {
        _cleanup_(hubkey_freep) struct hubkey *k = open_tpm_key(tpm.tcti);
        uint64_t t, seal_sum = 0, unseal_sum = 0;
        const unsigned runs = 10;
        uint8_t secret[32] = { 1 };

        for (unsigned i = 0; i < runs; i++) {
                uint8_t *blob = NULL, *out = NULL;
                size_t len = 0, out_len = 0;

                t = now_usec();
                assert_int_equal(hubkey_seal(k, secret, sizeof secret, &blob, &len), 0);
                seal_sum += now_usec() - t;
                t = now_usec();
                assert_int_equal(hubkey_unseal(k, blob, len, &out, &out_len), 0);
                unseal_sum += now_usec() - t;
                free(blob);
                free(out);
        }
        print_message("timing: hubkey_seal: mean %.2f ms, hubkey_unseal: mean %.2f ms (%u runs)\n",
                      (double) seal_sum / runs / 1000.0, (double) unseal_sum / runs / 1000.0, runs);
        assert_tpm_clean(tpm.tcti);
}

/* ---- file backend ---- */

static int file_setup(_unused_ void **state) {
        assert_non_null(mkdtemp(filedir));
        return 0;
}

static int file_teardown(_unused_ void **state) {
        rm_rf(filedir);
        return 0;
}

static void test_file_init_and_sign(_unused_ void **state) {
        _cleanup_free_ char *path = file_path("hub.key"), *first = NULL, *second = NULL;
        struct iothub_conf c = file_conf(path);
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;
        char *error = NULL, id[HUBKEY_ID_LEN + 1];
        bool created = false;
        struct stat st;

        assert_int_equal(hubkey_open(&c, &k, &error), -ENOENT);
        assert_null(k);
        assert_non_null(strstr(error, "does not exist (run 'iothubctl key init' to create it)"));
        free(error);
        error = NULL;

        (void) umask(022); /* the mode must not depend on the umask */
        assert_int_equal(hubkey_init(&c, &created, &error), 0);
        assert_true(created);
        assert_int_equal(stat(path, &st), 0);
        assert_true(S_ISREG(st.st_mode));
        assert_int_equal(st.st_mode & 07777, 0600);
        first = read_whole(path);
        assert_non_null(strstr(first, "-----BEGIN PRIVATE KEY-----\n"));

        assert_int_equal(hubkey_open(&c, &k, &error), 0);
        assert_int_equal(hubkey_backend(k), KEY_BACKEND_FILE);
        strcpy(id, hubkey_id(k));
        check_key(k);
        hubkey_free(TAKE_PTR(k));

        /* Never overwrites: nothing made, same bytes, same key. */
        assert_int_equal(hubkey_init(&c, &created, &error), 0);
        assert_false(created);
        second = read_whole(path);
        assert_string_equal(first, second);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        assert_string_equal(hubkey_id(k), id);

        /* No temporary file left beside it. */
        {
                int n = 0;
                DIR *d = opendir(filedir);
                struct dirent *de;

                assert_non_null(d);
                while ((de = readdir(d)))
                        if (strncmp(de->d_name, "hub.key", 7) == 0)
                                n++;
                closedir(d);
                assert_int_equal(n, 1);
        }
        (void) unlink(path);
}

static void test_file_init_missing_directory(_unused_ void **state) {
        _cleanup_free_ char *path = file_path("missing/hub.key");
        struct iothub_conf c = file_conf(path);
        char *error = NULL;
        bool created = true;

        assert_int_equal(hubkey_init(&c, &created, &error), -ENOENT);
        assert_true(created);
        assert_non_null(strstr(error, "cannot write key file"));
        free(error);
}

/* The key file holds a secret: refused when group or others may access it. */
static void test_file_refuses_open_mode(_unused_ void **state) {
        static const mode_t modes[] = { 0644, 0640, 0604, 0660, 0601, 0610 };
        _cleanup_free_ char *path = file_path("open.key");
        struct iothub_conf c = file_conf(path);

        for (unsigned i = 0; i < ELEMENTSOF(modes); i++) {
                _cleanup_free_ char *before = NULL, *after = NULL;
                struct hubkey *k = NULL;
                char *error = NULL, expected[64];
                bool created = true;

                write_file_mode(path, rfc7517_key_pem, modes[i]);
                before = read_whole(path);
                snprintf(expected, sizeof expected, "(mode %04o)", (unsigned) modes[i]);

                assert_int_equal(hubkey_open(&c, &k, &error), -EPERM);
                assert_null(k);
                assert_non_null(strstr(error, path));
                assert_non_null(strstr(error, "is accessible by group or others"));
                assert_non_null(strstr(error, expected));
                free(error);
                error = NULL;

                assert_int_equal(hubkey_init(&c, &created, &error), -EPERM);
                assert_true(created);
                free(error);
                after = read_whole(path);
                assert_string_equal(before, after);
        }
        /* 0400 and 0600 are fine. */
        write_file_mode(path, rfc7517_key_pem, 0400);
        {
                _cleanup_(hubkey_freep) struct hubkey *k = NULL;
                assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        }
        (void) unlink(path);
}

static char *pem_private(const char *type, const char *param, bool encrypted) {
        EVP_PKEY *pkey;
        BIO *bio = BIO_new(BIO_s_mem());
        char *data, *s;
        long n;

        if (param && streq(type, "RSA"))
                pkey = EVP_PKEY_Q_keygen(NULL, NULL, type, (size_t) 2048);
        else if (param)
                pkey = EVP_PKEY_Q_keygen(NULL, NULL, type, param);
        else
                pkey = EVP_PKEY_Q_keygen(NULL, NULL, type);
        assert_non_null(pkey);
        if (encrypted)
                assert_int_equal(PEM_write_bio_PKCS8PrivateKey(bio, pkey, EVP_aes_256_cbc(), NULL, 0, NULL,
                                                               (void *) "secret"),
                                 1);
        else
                assert_int_equal(PEM_write_bio_PrivateKey(bio, pkey, NULL, NULL, 0, NULL, NULL), 1);
        n = BIO_get_mem_data(bio, &data);
        s = strndup(data, (size_t) n);
        assert_non_null(s);
        BIO_free(bio);
        EVP_PKEY_free(pkey);
        return s;
}

/* A P-256 key whose PEM spells the curve out (specifiedCurve) instead of naming it. */
static char *pem_p256_explicit(void) {
        EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
        char group[] = "P-256", encoding[] = OSSL_PKEY_EC_ENCODING_EXPLICIT;
        OSSL_PARAM params[] = {
                OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
                OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, encoding, 0),
                OSSL_PARAM_END,
        };
        EVP_PKEY *pkey = NULL;
        BIO *bio = BIO_new(BIO_s_mem());
        char *data, *s;
        long n;

        assert_non_null(c);
        assert_int_equal(EVP_PKEY_keygen_init(c), 1);
        assert_int_equal(EVP_PKEY_CTX_set_params(c, params), 1);
        assert_int_equal(EVP_PKEY_keygen(c, &pkey), 1);
        assert_int_equal(PEM_write_bio_PrivateKey(bio, pkey, NULL, NULL, 0, NULL, NULL), 1);
        n = BIO_get_mem_data(bio, &data);
        s = strndup(data, (size_t) n);
        assert_non_null(s);
        BIO_free(bio);
        EVP_PKEY_free(pkey);
        EVP_PKEY_CTX_free(c);
        return s;
}

/* Files that hold no usable P-256 private key: open refuses, init refuses to replace them. */
static void test_file_refuses_other_keys(_unused_ void **state) {
        struct {
                const char *name;
                char *pem;
                int open_error;
                const char *expected;
        } cases[] = {
                { "Ed25519", pem_private("ED25519", NULL, false), -EOPNOTSUPP, "holds an ED25519 key" },
                { "RSA", pem_private("RSA", "2048", false), -EOPNOTSUPP, "holds an RSA key" },
                { "P-384", pem_private("EC", "P-384", false), -EOPNOTSUPP, "holds an EC secp384r1 key" },
                { "P-256 with explicit parameters", pem_p256_explicit(), -EOPNOTSUPP,
                  "holds an EC P-256 (explicit curve parameters) key" },
                { "encrypted P-256", pem_private("EC", "P-256", true), -EINVAL,
                  "holds no PEM private key (encrypted keys are not supported)" },
                { "public key",
                  strdup("-----BEGIN PUBLIC KEY-----\n"
                         "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEMKBCTNIcKUSDii11ySs3526iDZ8A\n"
                         "iTo7Tu6KPAqv7D7gS2XpJFbZiItSs3m9+9Ue6GnvHw/GW2ZZaVtszggXIw==\n"
                         "-----END PUBLIC KEY-----\n"),
                  -EINVAL, "holds no PEM private key" },
                { "garbage", strdup("not a key\n"), -EINVAL, "holds no PEM private key" },
                { "empty", strdup(""), -EINVAL, "holds no PEM private key" },
        };
        _cleanup_free_ char *path = file_path("other.key");
        struct iothub_conf c = file_conf(path);

        for (unsigned i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_free_ char *after = NULL;
                struct hubkey *k = NULL;
                char *error = NULL;
                bool created = true;
                int fd;

                print_message("key file holding %s\n", cases[i].name);
                (void) unlink(path);
                fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
                assert_true(fd >= 0);
                assert_int_equal(write(fd, cases[i].pem, strlen(cases[i].pem)),
                                 (ssize_t) strlen(cases[i].pem));
                close(fd);

                assert_int_equal(hubkey_open(&c, &k, &error), cases[i].open_error);
                assert_null(k);
                assert_non_null(strstr(error, cases[i].expected));
                free(error);
                error = NULL;

                assert_int_equal(hubkey_init(&c, &created, &error), -EEXIST);
                assert_true(created);
                assert_non_null(strstr(error, cases[i].expected));
                assert_non_null(strstr(error, "refusing to replace it"));
                free(error);
                if (cases[i].pem[0]) {
                        after = read_whole(path);
                        assert_string_equal(after, cases[i].pem);
                }
                free(cases[i].pem);
        }
        (void) unlink(path);
}

/* A known key (RFC 7517 A.2) and its thumbprint as jose computed it. */
static void test_file_known_thumbprint(_unused_ void **state) {
        _cleanup_free_ char *path = file_path("rfc7517.key");
        struct iothub_conf c = file_conf(path);
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;
        json_t *jwk = NULL;

        write_file_mode(path, rfc7517_key_pem, 0600);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        assert_string_equal(hubkey_id(k), RFC7517_THUMBPRINT);
        assert_int_equal(hubkey_public_jwk(k, &jwk), 0);
        assert_int_equal(json_object_size(jwk), 4);
        assert_string_equal(json_string_value(json_object_get(jwk, "kty")), "EC");
        assert_string_equal(json_string_value(json_object_get(jwk, "crv")), "P-256");
        assert_string_equal(json_string_value(json_object_get(jwk, "x")), RFC7517_X);
        assert_string_equal(json_string_value(json_object_get(jwk, "y")), RFC7517_Y);
        json_decref(jwk);
        check_key(k);
        (void) unlink(path);
}

/* File backend: the "blob" is a copy of the secret; the same limits. */
static void test_file_seal(_unused_ void **state) {
        _cleanup_free_ char *path = file_path("seal.key");
        struct iothub_conf c = file_conf(path);
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;
        uint8_t secret[HUBKEY_SEAL_MAX + 1], *blob = NULL, *out = NULL;
        size_t len = 0, out_len = 0;

        write_file_mode(path, rfc7517_key_pem, 0600);
        assert_int_equal(hubkey_open(&c, &k, NULL), 0);
        assert_int_equal(RAND_bytes(secret, sizeof secret), 1);

        assert_int_equal(hubkey_seal(k, secret, 32, &blob, &len), 0);
        assert_int_equal(len, 32);
        assert_memory_equal(blob, secret, 32);
        assert_int_equal(hubkey_unseal(k, blob, len, &out, &out_len), 0);
        assert_int_equal(out_len, 32);
        assert_memory_equal(out, secret, 32);
        free(blob);
        free(out);
        blob = out = NULL;

        assert_int_equal(hubkey_seal(k, secret, HUBKEY_SEAL_MAX, &blob, &len), 0);
        assert_int_equal(len, HUBKEY_SEAL_MAX);
        free(blob);
        blob = (uint8_t *) "untouched";
        len = 4242;
        assert_int_equal(hubkey_seal(k, secret, HUBKEY_SEAL_MAX + 1, &blob, &len), -EMSGSIZE);
        assert_int_equal(hubkey_seal(k, secret, 0, &blob, &len), -EINVAL);
        assert_string_equal((char *) blob, "untouched");
        assert_int_equal(len, 4242);

        out = (uint8_t *) "untouched";
        out_len = 4242;
        assert_int_equal(hubkey_unseal(k, secret, 0, &out, &out_len), -EBADMSG);
        assert_int_equal(hubkey_unseal(k, secret, HUBKEY_SEAL_MAX + 1, &out, &out_len), -EBADMSG);
        assert_string_equal((char *) out, "untouched");
        assert_int_equal(out_len, 4242);
        (void) unlink(path);
}

int main(void) {
        const struct CMUnitTest tpm_tests[] = {
                cmocka_unit_test(test_tpm_init_is_idempotent),
                cmocka_unit_test(test_tpm_sign),
                cmocka_unit_test(test_tpm_key_is_bound_to_its_tpm),
                cmocka_unit_test(test_tpm_handle_occupied),
                cmocka_unit_test(test_tpm_compatible_foreign_key),
                cmocka_unit_test(test_tpm_no_transient_leaks),
                cmocka_unit_test(test_tpm_bad_handle),
                cmocka_unit_test(test_tpm_unreachable),
                cmocka_unit_test(test_tpm_timing),
                cmocka_unit_test(test_tpm_seal_round_trip),
                cmocka_unit_test(test_tpm_unseal_independent_blob),
                cmocka_unit_test(test_tpm_unseal_malformed),
                cmocka_unit_test(test_tpm_seal_bound_to_its_tpm),
                cmocka_unit_test(test_tpm_seal_bus_is_encrypted),
                cmocka_unit_test(test_tpm_seal_timing),
        };
        const struct CMUnitTest file_tests[] = {
                cmocka_unit_test(test_file_init_and_sign),
                cmocka_unit_test(test_file_init_missing_directory),
                cmocka_unit_test(test_file_refuses_open_mode),
                cmocka_unit_test(test_file_refuses_other_keys),
                cmocka_unit_test(test_file_known_thumbprint),
                cmocka_unit_test(test_file_seal),
        };
        int failed = 0;

        (void) setenv("TSS2_LOG", "all+none", 0);
        failed += cmocka_run_group_tests_name("hubkey-file", file_tests, file_setup, file_teardown);
        failed += cmocka_run_group_tests_name("hubkey-tpm", tpm_tests, tpm_setup, tpm_teardown);
        return failed;
}
