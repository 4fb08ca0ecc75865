/* SPDX-License-Identifier: MIT */
/* The hub's own identity key (DESIGN.md "Programs", PROTOCOL.md 3), ECC P-256, two backends:
 *   tpm:  tpm2-tss ESYS through the TCTI loader. 'key init' derives the storage primary key
 *         (deterministic, so it is recreated and flushed whenever needed), creates a sign-only
 *         P-256 child under it and makes the child persistent at [key] handle. The daemon then
 *         only ever uses the persistent key: one ESYS context for the life of struct hubkey, and
 *         no transient object left behind (without a resource manager the TPM has very few
 *         object slots, TESTBED.md).
 *   file: a PEM private key read with OpenSSL, a development aid: refused when group or others
 *         may access it, and created with mode 0600, never over an existing file.
 * The key id is the RFC 7638 JWK thumbprint (SHA-256) of the public key, base64url.
 * Sealing (hubkey_seal/hubkey_unseal, for the token store's data key): a keyedHash sealed-data object
 * created under the recreated storage primary key, through the same ESYS context, and kept by the
 * caller as a blob; the secret crosses the bus inside a salted session with parameter encryption, and
 * every buffer of ours that held it is wiped. Known limit: tpm2-tss keeps copies in its contexts (ESYS
 * stores the TPM2_Create input, SAPI the decrypted TPM2_Unseal response) until later commands
 * overwrite them; they are out of reach.
 * A struct hubkey is not safe for concurrent use by several threads (the daemon has one). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/pem.h>

#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#include "iothub/frame.h"
#include "iothub/hubkey.h"
#include "iothub/util.h"

#define P256_COORD_LEN 32                       /* RFC 7518 6.2.1.2: x and y, 32 octets each */
#define P256_POINT_LEN (1 + 2 * P256_COORD_LEN) /* SEC 1 2.3.3: 0x04 || x || y */
#define SHA256_LEN 32
#define HUBKEY_FILE_MAX (16 * 1024)             /* a PEM P-256 private key is about 250 bytes */
#define ECDSA_P256_DER_MAX 72                   /* SEQUENCE { INTEGER r, INTEGER s }, 33 bytes each */

/* Whether the TPM has the standard SRK at TPM_SRK_HANDLE, asked once per ESYS context. */
struct srk_cache {
        bool known;
        ESYS_TR tr; /* ESYS_TR_NONE: none usable */
};

struct hubkey {
        enum key_backend backend;
        EVP_PKEY *pkey; /* tpm: the public key only; file: the private key */
        char id[HUBKEY_ID_LEN + 1];
        uint8_t x[P256_COORD_LEN], y[P256_COORD_LEN];
        uint64_t signatures;

        /* tpm */
        TSS2_TCTI_CONTEXT *tcti;
        ESYS_CONTEXT *esys;
        ESYS_TR key; /* the persistent key, ESYS_TR_NONE when not set */
        struct srk_cache srk; /* the persistent SRK, looked up once (tpm_parent_open) */
        char *tcti_conf;      /* what it was opened with, to connect again (tpm_reconnect) */
        uint32_t handle;
        char *error;          /* why the last signature failed, NULL after one succeeded */

        /* file: an EVP_PKEY_sign_init()'ed context, made once and reused for every signature */
        EVP_PKEY_CTX *sign_ctx;

        /* Asynchronous signing (hubkey.h): the loop, the queue by priority, the one op in flight. */
        sd_event *event;
        sd_event_source *kick;   /* defer: start the next op, deliver a finished one */
        sd_event_source *tpm_io; /* the TCTI's poll handle while a Sign is in flight */
        int tpm_io_fd;
        bool tcti_unpollable;    /* this connection's TCTI has no poll handle (tpm_watch) */
        struct hubkey_op *queue[_HUBKEY_PRIO_MAX], **queue_tail[_HUBKEY_PRIO_MAX];
        unsigned n_queued;
        bool busy;                  /* a TPM2_Sign is in flight (ESYS waits for its answer) */
        struct hubkey_op *inflight; /* its op; NULL when the op was freed meanwhile */
        struct hubkey_op *finished; /* answered, done() not called yet */
};

enum op_state { OP_QUEUED, OP_INFLIGHT, OP_FINISHED, OP_OVER };

struct hubkey_op {
        struct hubkey *k; /* NULL once over or cancelled by hubkey_free() */
        enum op_state state;
        enum hubkey_prio prio;
        struct hubkey_op *next; /* in k->queue[prio] */
        uint8_t digest[SHA256_LEN];
        hubkey_sign_done_t done;
        void *userdata;
        int result;
        uint8_t sig[HUBKEY_SIG_LEN];
        bool retried; /* sent again once after connecting to the TPM again */
};

DEFINE_TRIVIAL_CLEANUP_FUNC(EVP_PKEY *, EVP_PKEY_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(EVP_PKEY_CTX *, EVP_PKEY_CTX_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(BIO *, BIO_free_all);
DEFINE_TRIVIAL_CLEANUP_FUNC(BIGNUM *, BN_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(ECDSA_SIG *, ECDSA_SIG_free);

static void esys_freep(void *p) {
        Esys_Free(*(void **) p);
}
#define _cleanup_esys_ _cleanup_(esys_freep)

/* Esys_Finalize() logs a warning when handed NULL, so check first. */
static void esys_finalizep(ESYS_CONTEXT **p) {
        if (*p)
                Esys_Finalize(p);
}
static void tctildr_finalizep(TSS2_TCTI_CONTEXT **p) {
        if (*p)
                Tss2_TctiLdr_Finalize(p);
}

/* The one place where a TSS2_RC becomes an errno, and, when ret_error is not NULL, the message
 * "TPM: <Tss2_RC_Decode()> (0x...) while <what>". Codes from the TPM itself (layer 0, or passed
 * through a resource manager) are compared without their handle/parameter/session number
 * (TPM 2.0 Part 2, 6.6 TPM_RC: format-one codes carry it in bits 6 and 8-11). */
static int tss2_error(TSS2_RC rc, char **ret_error, const char *what, ...) _printf_(3, 4);
static int tss2_error(TSS2_RC rc, char **ret_error, const char *what, ...) {
        TSS2_RC layer = rc & TSS2_RC_LAYER_MASK;
        int r = -EIO;

        if (layer == TSS2_TPM_RC_LAYER || layer == TSS2_RESMGR_TPM_RC_LAYER) {
                TSS2_RC code = rc & 0xFFFF;

                if (code & TPM2_RC_FMT1)
                        code &= TPM2_RC_FMT1 | 0x3F;
                switch (code) {
                case TPM2_RC_HANDLE: /* no object at the handle */
                        r = -ENOENT;
                        break;
                case TPM2_RC_OBJECT_MEMORY: /* 0x902: out of object slots */
                case TPM2_RC_SESSION_MEMORY:
                case TPM2_RC_MEMORY:
                        r = -ENOMEM;
                        break;
                case TPM2_RC_NV_DEFINED: /* the persistent handle is taken */
                        r = -EEXIST;
                        break;
                case TPM2_RC_AUTH_FAIL:
                case TPM2_RC_BAD_AUTH:
                case TPM2_RC_AUTH_UNAVAILABLE:
                case TPM2_RC_LOCKOUT:
                        r = -EACCES;
                        break;
                case TPM2_RC_RETRY:
                case TPM2_RC_YIELDED:
                case TPM2_RC_TESTING:
                case TPM2_RC_NV_RATE:
                case TPM2_RC_NV_UNAVAILABLE:
                        r = -EAGAIN;
                        break;
                case TPM2_RC_INTEGRITY: /* a private area this TPM's parent key did not protect */
                case TPM2_RC_BINDING:
                        r = -ENOKEY;
                        break;
                case TPM2_RC_CURVE:
                case TPM2_RC_SCHEME:
                case TPM2_RC_ASYMMETRIC:
                case TPM2_RC_COMMAND_CODE:
                        r = -EOPNOTSUPP;
                        break;
                }
        } else
                switch (rc & ~TSS2_RC_LAYER_MASK) {
                case TSS2_BASE_RC_IO_ERROR:
                case TSS2_BASE_RC_NO_CONNECTION:
                        r = -ECONNREFUSED;
                        break;
                case TSS2_BASE_RC_MEMORY:
                        r = -ENOMEM;
                        break;
                case TSS2_BASE_RC_TRY_AGAIN:
                        r = -EAGAIN;
                        break;
                case TSS2_BASE_RC_BAD_VALUE:
                case TSS2_BASE_RC_BAD_REFERENCE:
                        r = -EINVAL;
                        break;
                case TSS2_BASE_RC_NOT_IMPLEMENTED:
                case TSS2_BASE_RC_NOT_SUPPORTED:
                        r = -EOPNOTSUPP;
                        break;
                }

        if (ret_error) {
                _cleanup_free_ char *w = NULL;
                va_list ap;
                int n;

                va_start(ap, what);
                n = vasprintf(&w, what, ap);
                va_end(ap);
                if (n >= 0)
                        (void) set_error_message(ret_error, r, "TPM: %s (0x%" PRIx32 ") while %s",
                                         Tss2_RC_Decode(rc), (uint32_t) rc, w);
        }
        return r;
}

static struct hubkey *hubkey_new(enum key_backend backend) {
        struct hubkey *k = calloc(1, sizeof *k);

        if (!k)
                return NULL;
        k->backend = backend;
        k->key = ESYS_TR_NONE;
        k->srk.tr = ESYS_TR_NONE;
        k->tpm_io_fd = -1;
        for (size_t i = 0; i < _HUBKEY_PRIO_MAX; i++)
                k->queue_tail[i] = &k->queue[i];
        return k;
}

static void ops_detach(struct hubkey *k);

void hubkey_free(struct hubkey *k) {
        if (!k)
                return;
        /* Cancels what is left: the owners still hold (and free) their ops. A Sign in flight is
         * abandoned with the ESYS context; the TPM finishes it and nobody reads the answer. */
        ops_detach(k);
        sd_event_source_disable_unref(k->kick);
        sd_event_source_disable_unref(k->tpm_io);
        sd_event_unref(k->event);
        if (k->esys && k->key != ESYS_TR_NONE)
                (void) Esys_TR_Close(k->esys, &k->key); /* forgets the handle; the key stays in the TPM */
        if (k->esys && k->srk.tr != ESYS_TR_NONE)
                (void) Esys_TR_Close(k->esys, &k->srk.tr);
        esys_finalizep(&k->esys);
        tctildr_finalizep(&k->tcti);
        free(k->tcti_conf);
        free(k->error);
        EVP_PKEY_CTX_free(k->sign_ctx);
        EVP_PKEY_free(k->pkey); /* OpenSSL wipes the private scalar (BN_clear_free) */
        free(k);
}

/* ---- public key, JWK and key id ---- */

/* RFC 7638 3.2/3.3: the required members of an EC key (RFC 7518 6.2.1) in lexicographic order,
 * no white space; SHA-256 of that; base64url without padding (RFC 7515 2). */
static int jwk_thumbprint(const uint8_t x[P256_COORD_LEN], const uint8_t y[P256_COORD_LEN],
                          char ret[HUBKEY_ID_LEN + 1]) {
        char bx[B64URL_BUF(P256_COORD_LEN)], by[B64URL_BUF(P256_COORD_LEN)], id[B64URL_BUF(SHA256_LEN)];
        char json[sizeof bx + sizeof by + 64];
        uint8_t md[SHA256_LEN];
        int n;

        (void) b64url_encode(x, P256_COORD_LEN, bx);
        (void) b64url_encode(y, P256_COORD_LEN, by);
        n = snprintf(json, sizeof json, "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}", bx,
                     by);
        if (n < 0 || (size_t) n >= sizeof json)
                return -EINVAL;
        if (EVP_Digest(json, (size_t) n, md, NULL, EVP_sha256(), NULL) != 1)
                return openssl_errno(-EIO);
        if (b64url_encode(md, sizeof md, id) != HUBKEY_ID_LEN)
                return -EINVAL;
        memcpy(ret, id, HUBKEY_ID_LEN + 1);
        return 0;
}

/* Records the public coordinates and derives the key id. */
static int hubkey_set_public(struct hubkey *k, const uint8_t x[P256_COORD_LEN],
                             const uint8_t y[P256_COORD_LEN]) {
        int r;

        r = jwk_thumbprint(x, y, k->id);
        if (r < 0)
                return r;
        memcpy(k->x, x, P256_COORD_LEN);
        memcpy(k->y, y, P256_COORD_LEN);
        return 0;
}

/* A P-256 public key from its affine coordinates (uncompressed point, SEC 1 2.3.3). OpenSSL
 * checks that the point is on the curve, so a malformed TPM answer cannot give a bogus key. */
static int pkey_from_point(const uint8_t x[P256_COORD_LEN], const uint8_t y[P256_COORD_LEN], EVP_PKEY **ret) {
        _cleanup_(EVP_PKEY_CTX_freep) EVP_PKEY_CTX *c = NULL;
        uint8_t point[P256_POINT_LEN] = { POINT_CONVERSION_UNCOMPRESSED };
        char group[] = SN_X9_62_prime256v1;
        OSSL_PARAM params[] = {
                OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
                OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point, sizeof point),
                OSSL_PARAM_END,
        };
        EVP_PKEY *pkey = NULL;

        memcpy(point + 1, x, P256_COORD_LEN);
        memcpy(point + 1 + P256_COORD_LEN, y, P256_COORD_LEN);
        c = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
        if (!c || EVP_PKEY_fromdata_init(c) != 1)
                return openssl_errno(-ENOMEM);
        if (EVP_PKEY_fromdata(c, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1)
                return openssl_errno(-EBADMSG);
        *ret = pkey;
        return 0;
}

/* True for P-256 as a named curve only (RFC 5480 2.1.1: specifiedCurve "MUST NOT be used");
 * otherwise false, and what the key is instead ("ED25519", "RSA", "EC secp384r1") in what_buf. */
static bool pkey_is_p256(EVP_PKEY *pkey, char *what_buf, size_t what_len) {
        char group[64] = "", encoding[32] = "";
        bool p256 = false;

        if (EVP_PKEY_is_a(pkey, "EC") && EVP_PKEY_get_group_name(pkey, group, sizeof group, NULL) == 1)
                p256 = OBJ_txt2nid(group) == NID_X9_62_prime256v1;
        if (p256 &&
            EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_EC_ENCODING, encoding, sizeof encoding,
                                           NULL) == 1 &&
            streq(encoding, OSSL_PKEY_EC_ENCODING_GROUP))
                return true;
        ERR_clear_error();
        if (p256)
                (void) snprintf(what_buf, what_len, "EC P-256 (explicit curve parameters)");
        else if (EVP_PKEY_is_a(pkey, "EC"))
                (void) snprintf(what_buf, what_len, "EC %s", group[0] ? group : "(explicit parameters)");
        else
                (void) snprintf(what_buf, what_len, "%s", EVP_PKEY_get0_type_name(pkey) ?: "unknown");
        return false;
}

int hubkey_public_pem(const struct hubkey *k, char **ret) {
        if (!k || !ret)
                return -EINVAL;
        /* SubjectPublicKeyInfo (RFC 5280 4.1, RFC 5480 2) only, whatever the key holds. */
        return pkey_public_pem(k->pkey, ret);
}

int hubkey_public_jwk(const struct hubkey *k, json_t **ret) {
        char bx[B64URL_BUF(P256_COORD_LEN)], by[B64URL_BUF(P256_COORD_LEN)];
        json_t *j;

        if (!k || !ret)
                return -EINVAL;
        (void) b64url_encode(k->x, P256_COORD_LEN, bx);
        (void) b64url_encode(k->y, P256_COORD_LEN, by);
        /* RFC 7518 6.2.1: exactly the public members, nothing else (no "d", no "kid"). */
        j = json_pack("{s:s, s:s, s:s, s:s}", "kty", "EC", "crv", "P-256", "x", bx, "y", by);
        if (!j)
                return -ENOMEM;
        *ret = j;
        return 0;
}

const char *hubkey_id(const struct hubkey *k) {
        return k->id;
}

uint64_t hubkey_signatures(const struct hubkey *k) {
        return k->signatures;
}

enum key_backend hubkey_backend(const struct hubkey *k) {
        return k->backend;
}

/* ---- tpm backend ---- */

/* The owner's persistent range: tpm_owner_persistent_handle_is_valid() in util.h, shared
 * with the config parser so that --check-config and the run agree. */
static bool tpm_handle_is_valid(uint32_t handle) {
        return tpm_owner_persistent_handle_is_valid(handle);
}

/* The device path of a "device:PATH" TCTI, or NULL for another TCTI (or none: the loader's
 * default tries several). */
static const char *tcti_device_path(const char *tcti_conf) {
        if (tcti_conf && strncmp(tcti_conf, "device:", 7) == 0 && tcti_conf[7])
                return tcti_conf + 7;
        return NULL;
}

static int tpm_device_check(const char *tcti_conf, char **ret_error) {
        const char *dev = tcti_device_path(tcti_conf);
        struct stat st;

        if (!dev)
                return 0;
        if (stat(dev, &st) < 0) {
                if (errno == ENOENT)
                        return set_error_message(
                                ret_error, -ENODEV,
                                "TPM: the TPM device %s does not exist: is the TPM enabled? On a Raspberry Pi with "
                                "a TPM module add 'dtparam=spi=on' and 'dtoverlay=tpm-slb9670' to config.txt and "
                                "reboot; on a PC enable the TPM in the firmware setup ([key] tcti = '%s')",
                                dev, tcti_conf);
                return set_error_message(ret_error, -errno, "TPM: cannot use the TPM device %s: %s", dev,
                                         strerror(errno));
        }
        if (!S_ISCHR(st.st_mode))
                return set_error_message(ret_error, -ENODEV, "TPM: %s is not a character device ([key] tcti = '%s')",
                                         dev, tcti_conf);
        if (faccessat(AT_FDCWD, dev, R_OK | W_OK, AT_EACCESS) < 0) {
                if (errno == EACCES || errno == EPERM)
                        return set_error_message(
                                ret_error, -EACCES,
                                "TPM: permission denied on %s: the process must be in group tss (iothub-signer.service "
                                "gives the signer SupplementaryGroups=tss; run iothubctl as root or add the user "
                                "to tss)",
                                dev);
                return set_error_message(ret_error, -errno, "TPM: cannot use the TPM device %s: %s", dev,
                                         strerror(errno));
        }
        return 0;
}

/* Adds what to do to a TCTI loader failure: the loader says "IO failure" or "bad value" for a
 * TPM simulator that does not answer and for a TCTI string it cannot parse alike. */
static int tcti_hint(int r, const char *tcti_conf, char **ret_error) {
        _cleanup_free_ char *base = NULL;

        if (!ret_error || !*ret_error)
                return r;
        base = TAKE_PTR(*ret_error);
        if (r == -ECONNREFUSED && tcti_conf &&
            (strncmp(tcti_conf, "swtpm", 5) == 0 || strncmp(tcti_conf, "mssim", 5) == 0))
                return set_error_message(ret_error, r,
                                         "%s: nothing answers there; is the TPM simulator running (swtpm with "
                                         "--ctrl on port + 1)?",
                                         base);
        if (r == -EINVAL || r == -EOPNOTSUPP || r == -ENOENT)
                return set_error_message(ret_error, -EINVAL,
                                         "%s: check [key] tcti, e.g. 'device:/dev/tpmrm0' or "
                                         "'swtpm:host=127.0.0.1,port=2321'",
                                         base);
        return set_error_message(ret_error, r, "%s", base);
}

/* A TPM reached over TCP (the mssim TCTI: a simulator, or a TPM proxy) gets each command in
 * two send()s, the simulator's 9-byte header and then the command, and Nagle's algorithm held
 * the second until the peer's delayed ACK of the first: about 40 ms per TPM command (measured,
 * tests/bench/commands.mjs: signing p50 44 ms through the mssim TCTI, 2 ms through the swtpm
 * TCTI, which writes once). TCP_NODELAY sends both at once. /dev/tpmrm0 has no socket, and a
 * TCTI without poll handles (swtpm) says nothing: then there is nothing to do. Asked of the TCTI
 * itself, not through ESYS, which logs an error when a TCTI has no handles. */
static void tcti_nodelay(TSS2_TCTI_CONTEXT *tcti) {
        TSS2_TCTI_POLL_HANDLE h[4];
        size_t n = ELEMENTSOF(h);

        if (Tss2_Tcti_GetPollHandles(tcti, h, &n) != TSS2_RC_SUCCESS)
                return;
        for (size_t i = 0; i < n && i < ELEMENTSOF(h); i++) {
                int proto = 0, one = 1;
                socklen_t len = sizeof proto;

                if (getsockopt(h[i].fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) == 0 && proto == IPPROTO_TCP)
                        (void) setsockopt(h[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
}

static int tpm_connect(const char *tcti_conf, TSS2_TCTI_CONTEXT **ret_tcti, ESYS_CONTEXT **ret_esys,
                       char **ret_error) {
        _cleanup_(tctildr_finalizep) TSS2_TCTI_CONTEXT *tcti = NULL;
        _cleanup_(esys_finalizep) ESYS_CONTEXT *esys = NULL;
        TSS2_RC rc;
        int r;

        /* A TPM character device is checked first, so that the user reads what is wrong
         * (no device, no permission) instead of the TCTI loader's "IO failure". */
        r = tpm_device_check(tcti_conf, ret_error);
        if (r < 0)
                return r;
        rc = Tss2_TctiLdr_Initialize(tcti_conf, &tcti);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, ret_error, "connecting to the TPM with TCTI '%s'", tcti_conf ?: "(default)");
                return tcti_hint(r, tcti_conf, ret_error);
        }
        tcti_nodelay(tcti);
        rc = Esys_Initialize(&esys, tcti, NULL);
        if (rc != TSS2_RC_SUCCESS)
                return tss2_error(rc, ret_error, "initializing ESYS for TCTI '%s'", tcti_conf ?: "(default)");
        /* No TPM2_Startup: the platform (firmware, kernel, or swtpm's startup-clear) did it. */
        *ret_esys = TAKE_PTR(esys);
        *ret_tcti = TAKE_PTR(tcti);
        return 0;
}

/* Asks the TPM whether 'handle' (a persistent object or an NV index) is in use, with
 * TPM2_GetCapability(TPM_CAP_HANDLES) rather than a failing read, which would have ESYS log an
 * error for the normal case of "no key yet". Returns 1, 0, or a negative errno. */
int hubkey_tpm_handle_exists(ESYS_CONTEXT *esys, uint32_t handle, char **ret_error) {
        _cleanup_esys_ TPMS_CAPABILITY_DATA *cap = NULL;
        TPMI_YES_NO more;
        TSS2_RC rc;

        rc = Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_HANDLES, handle, 1,
                                &more, &cap);
        if (rc != TSS2_RC_SUCCESS)
                return tss2_error(rc, ret_error, "listing the persistent handles");
        /* Part 3, 30.2: the list starts at the first handle >= 'handle' that is in use. */
        return cap->data.handles.count > 0 && cap->data.handles.handle[0] == handle;
}

/* Whether a public area is one the hub key can be: an ECC P-256, sign-only, unrestricted key
 * usable for ECDSA with SHA-256, generated inside this TPM (sensitiveDataOrigin) and bound to
 * it (fixedTPM), and usable with its authValue (userWithAuth). Returns NULL when it is, else
 * what it is instead, for the error message. */
static const char *tpm_public_mismatch(const TPMT_PUBLIC *p) {
        const TPMS_ECC_PARMS *ecc = &p->parameters.eccDetail;
        TPMA_OBJECT a = p->objectAttributes;

        switch (p->type) {
        case TPM2_ALG_ECC:
                break;
        case TPM2_ALG_RSA:
                return "an RSA key";
        case TPM2_ALG_KEYEDHASH:
                return "a keyed-hash object";
        case TPM2_ALG_SYMCIPHER:
                return "a symmetric key";
        default:
                return "an object of unknown type";
        }
        if (ecc->curveID != TPM2_ECC_NIST_P256)
                return "an ECC key on another curve than P-256";
        if (a & TPMA_OBJECT_RESTRICTED)
                return "a restricted ECC key (a storage or attestation key)";
        if (!(a & TPMA_OBJECT_SIGN_ENCRYPT) || (a & TPMA_OBJECT_DECRYPT))
                return "an ECC P-256 key that is not sign-only";
        if (!(ecc->scheme.scheme == TPM2_ALG_NULL ||
              (ecc->scheme.scheme == TPM2_ALG_ECDSA && ecc->scheme.details.ecdsa.hashAlg == TPM2_ALG_SHA256)))
                return "an ECC P-256 signing key bound to another scheme than ECDSA with SHA-256";
        if (!(a & TPMA_OBJECT_FIXEDTPM) || !(a & TPMA_OBJECT_SENSITIVEDATAORIGIN))
                return "an ECC P-256 signing key that was not generated in and bound to this TPM";
        if (!(a & TPMA_OBJECT_USERWITHAUTH))
                return "an ECC P-256 signing key that needs a policy session";
        return NULL;
}

/* Reads the public area of the persistent object at 'handle' and checks that it is a hub key.
 * Returns 0 and, when ret_tr is not NULL, the ESYS_TR of the key (caller closes it); -ENOENT when
 * the handle is empty; -EEXIST when it holds something else. */
static int tpm_read_key(ESYS_CONTEXT *esys, uint32_t handle, ESYS_TR *ret_tr, uint8_t ret_x[P256_COORD_LEN],
                        uint8_t ret_y[P256_COORD_LEN], char **ret_error) {
        _cleanup_esys_ TPM2B_PUBLIC *pub = NULL;
        const TPMS_ECC_POINT *pt;
        ESYS_TR tr = ESYS_TR_NONE;
        const char *mismatch;
        TSS2_RC rc;
        int r;

        r = hubkey_tpm_handle_exists(esys, handle, ret_error);
        if (r < 0)
                return r;
        if (r == 0)
                return set_error_message(ret_error, -ENOENT,
                                 "no key at TPM handle 0x%08" PRIx32 " (run 'iothubctl key init' to create it)",
                                 handle);

        rc = Esys_TR_FromTPMPublic(esys, handle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &tr);
        if (rc != TSS2_RC_SUCCESS)
                return tss2_error(rc, ret_error, "opening TPM handle 0x%08" PRIx32, handle);
        rc = Esys_ReadPublic(esys, tr, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub, NULL, NULL);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, ret_error, "reading the public key at TPM handle 0x%08" PRIx32, handle);
                goto fail;
        }
        mismatch = tpm_public_mismatch(&pub->publicArea);
        if (mismatch) {
                r = set_error_message(ret_error, -EEXIST,
                              "TPM handle 0x%08" PRIx32 " holds another kind of object (%s), not a hub key",
                              handle, mismatch);
                goto fail;
        }
        /* A TPM may send a coordinate without its leading zero octets (a TPM2B); pad it back. */
        pt = &pub->publicArea.unique.ecc;
        if (pt->x.size > P256_COORD_LEN || pt->y.size > P256_COORD_LEN) {
                r = set_error_message(ret_error, -EBADMSG,
                              "TPM handle 0x%08" PRIx32 " returned a malformed P-256 point", handle);
                goto fail;
        }
        memset(ret_x, 0, P256_COORD_LEN);
        memset(ret_y, 0, P256_COORD_LEN);
        memcpy(ret_x + P256_COORD_LEN - pt->x.size, pt->x.buffer, pt->x.size);
        memcpy(ret_y + P256_COORD_LEN - pt->y.size, pt->y.buffer, pt->y.size);

        if (ret_tr)
                *ret_tr = tr;
        else
                (void) Esys_TR_Close(esys, &tr);
        return 0;
fail:
        (void) Esys_TR_Close(esys, &tr);
        return r;
}

static int tpm_open(const struct iothub_conf *c, struct hubkey *k, char **ret_error) {
        uint8_t x[P256_COORD_LEN], y[P256_COORD_LEN];
        int r;

        if (!tpm_handle_is_valid(c->key.handle))
                return set_error_message(ret_error, -EINVAL,
                                 "[key] handle 0x%08" PRIx32 " is not a persistent handle of the owner "
                                 "hierarchy (0x81000000-0x817fffff)",
                                 c->key.handle);
        if (c->key.tcti && !(k->tcti_conf = strdup(c->key.tcti)))
                return -ENOMEM;
        k->handle = c->key.handle;
        r = tpm_connect(c->key.tcti, &k->tcti, &k->esys, ret_error);
        if (r < 0)
                return r;
        r = tpm_read_key(k->esys, c->key.handle, &k->key, x, y, ret_error);
        if (r < 0)
                return r;
        r = pkey_from_point(x, y, &k->pkey);
        if (r < 0)
                return set_error_message(ret_error, r, "TPM handle 0x%08" PRIx32 " holds an invalid P-256 public key",
                                 c->key.handle);
        r = hubkey_set_public(k, x, y);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot compute the key id: %s", strerror(-r));
        return 0;
}

/* The ECC storage root key of the TCG "TPM v2.0 Provisioning Guidance" (SRK template): a restricted
 * decryption key, ECC NIST P-256, AES-128-CFB, empty unique, no authValue, noDA. Checked to give
 * the same key (same name) as `tpm2_createprimary -C o -G ecc256:aes128cfb -a
 * 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda'`; tpm2-tools'
 * plain default differs only in leaving out noDA. Deterministic: the same template gives the same
 * key until the owner seed changes, so it is never stored, only recreated and flushed. */
static const TPM2B_PUBLIC srk_template = {
        .publicArea = {
                .type = TPM2_ALG_ECC,
                .nameAlg = TPM2_ALG_SHA256,
                .objectAttributes = TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_FIXEDTPM |
                                    TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN |
                                    TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA,
                .parameters.eccDetail = {
                        .symmetric = {
                                .algorithm = TPM2_ALG_AES,
                                .keyBits.aes = 128,
                                .mode.aes = TPM2_ALG_CFB,
                        },
                        .scheme.scheme = TPM2_ALG_NULL,
                        .curveID = TPM2_ECC_NIST_P256,
                        .kdf.scheme = TPM2_ALG_NULL,
                },
        },
};

/* The hub key: sign-only ECC P-256 bound to ECDSA with SHA-256, generated in the TPM and never
 * duplicable (fixedTPM|fixedParent|sensitiveDataOrigin), used with its empty authValue. noDA: an
 * empty authValue guards nothing against a dictionary attack, while DA protection would let any
 * local process that can reach the TPM lock the hub key out by failing authorizations on it
 * (TPM 2.0 Part 1, "Dictionary Attack Protection": in lockout mode no DA-protected object can
 * be authorized). */
static const TPM2B_PUBLIC hubkey_template = {
        .publicArea = {
                .type = TPM2_ALG_ECC,
                .nameAlg = TPM2_ALG_SHA256,
                .objectAttributes = TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                    TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                                    TPMA_OBJECT_NODA,
                .parameters.eccDetail = {
                        .symmetric.algorithm = TPM2_ALG_NULL,
                        .scheme = {
                                .scheme = TPM2_ALG_ECDSA,
                                .details.ecdsa.hashAlg = TPM2_ALG_SHA256,
                        },
                        .curveID = TPM2_ECC_NIST_P256,
                        .kdf.scheme = TPM2_ALG_NULL,
                },
        },
};

/* (Re)creates the storage primary key from srk_template; the caller flushes it. */
static TSS2_RC tpm_create_primary(ESYS_CONTEXT *esys, ESYS_TR *ret_primary) {
        const TPM2B_SENSITIVE_CREATE no_auth = {};
        const TPM2B_DATA no_outside_info = {};
        const TPML_PCR_SELECTION no_pcrs = {};

        /* Owner authorization: empty, as on a freshly provisioned hub. */
        return Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                                  &no_auth, &srk_template, &no_outside_info, &no_pcrs, ret_primary, NULL, NULL,
                                  NULL, NULL);
}

/* TCG "TPM v2.0 Provisioning Guidance" (1.0, 7.5.1 "Storage Primary Key (SRK) Templates" and
 * 7.8 "Persistent Handles"): a provisioned TPM keeps its ECC P-256 SRK at this persistent handle;
 * tpm2-tools' and systemd's tooling use it. */
#define TPM_SRK_HANDLE UINT32_C(0x81000001)

/* Whether a public area comes from srk_template: same type, name algorithm, attributes, empty
 * policy and parameters. (The unique field is the public point, which only CreatePrimary can
 * reproduce.) Anything else at the handle, an RSA SRK, one without noDA, a signing key, is
 * another key than the one tpm_create_primary() derives: not used. */
static bool srk_public_matches(const TPMT_PUBLIC *p) {
        const TPMT_PUBLIC *t = &srk_template.publicArea;
        const TPMS_ECC_PARMS *e = &p->parameters.eccDetail, *te = &t->parameters.eccDetail;

        return p->type == t->type && p->nameAlg == t->nameAlg && p->objectAttributes == t->objectAttributes &&
               p->authPolicy.size == 0 && e->symmetric.algorithm == te->symmetric.algorithm &&
               e->symmetric.keyBits.aes == te->symmetric.keyBits.aes &&
               e->symmetric.mode.aes == te->symmetric.mode.aes && e->scheme.scheme == te->scheme.scheme &&
               e->curveID == te->curveID && e->kdf.scheme == te->kdf.scheme;
}

/* Looks for the standard SRK at TPM_SRK_HANDLE once per ESYS context (a persistent object costs
 * no slot, so its ESYS_TR is kept until the context goes). Returns 0 with cache->tr set, or
 * ESYS_TR_NONE when the handle is empty or holds something else; a negative errno when the TPM
 * could not be asked. */
static int tpm_srk_lookup(ESYS_CONTEXT *esys, struct srk_cache *cache) {
        _cleanup_esys_ TPM2B_PUBLIC *pub = NULL;
        ESYS_TR tr = ESYS_TR_NONE;
        TSS2_RC rc;
        int r;

        if (cache->known)
                return 0;
        r = hubkey_tpm_handle_exists(esys, TPM_SRK_HANDLE, NULL);
        if (r < 0)
                return r;
        if (r > 0) {
                rc = Esys_TR_FromTPMPublic(esys, TPM_SRK_HANDLE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &tr);
                if (rc != TSS2_RC_SUCCESS)
                        return tss2_error(rc, NULL, "opening the SRK handle");
                rc = Esys_ReadPublic(esys, tr, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub, NULL, NULL);
                if (rc != TSS2_RC_SUCCESS) {
                        (void) Esys_TR_Close(esys, &tr);
                        return tss2_error(rc, NULL, "reading the SRK's public area");
                }
                if (!srk_public_matches(&pub->publicArea))
                        (void) Esys_TR_Close(esys, &tr); /* sets tr to ESYS_TR_NONE */
        }
        cache->tr = tr;
        cache->known = true;
        return 0;
}

/* The storage parent of the hub key and of the sealed data: the persistent standard SRK when the
 * TPM has one (no CreatePrimary, which takes a chip tens of ms, and no flush), else the same key
 * created from srk_template. *ret_flush tells the caller to flush it (tpm_flush); a persistent
 * SRK is never flushed. 'force_create' skips the persistent SRK. A lookup the TPM failed is not
 * remembered and falls through to CreatePrimary, whose error (if the TPM still fails) the caller
 * reports. */
static TSS2_RC tpm_parent_open(ESYS_CONTEXT *esys, struct srk_cache *cache, bool force_create, ESYS_TR *ret_parent,
                               bool *ret_flush) {
        TSS2_RC rc;

        if (!force_create && tpm_srk_lookup(esys, cache) == 0 && cache->tr != ESYS_TR_NONE) {
                *ret_parent = cache->tr;
                *ret_flush = false;
                return TSS2_RC_SUCCESS;
        }
        rc = tpm_create_primary(esys, ret_parent);
        if (rc == TSS2_RC_SUCCESS)
                *ret_flush = true;
        return rc;
}

static int tpm_create(ESYS_CONTEXT *esys, uint32_t handle, char **ret_error) {
        _cleanup_esys_ TPM2B_PRIVATE *priv = NULL;
        _cleanup_esys_ TPM2B_PUBLIC *pub = NULL;
        const TPM2B_SENSITIVE_CREATE no_auth = {};
        const TPM2B_DATA no_outside_info = {};
        const TPML_PCR_SELECTION no_pcrs = {};
        ESYS_TR primary = ESYS_TR_NONE, key = ESYS_TR_NONE, persistent = ESYS_TR_NONE;
        struct srk_cache srk = { .tr = ESYS_TR_NONE };
        bool flush_primary = false;
        TSS2_RC rc;
        int r = 0;

        rc = tpm_parent_open(esys, &srk, false, &primary, &flush_primary);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, ret_error, "creating the storage primary key in the owner hierarchy");
                goto out;
        }
        rc = Esys_Create(esys, primary, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &no_auth,
                         &hubkey_template, &no_outside_info, &no_pcrs, &priv, &pub, NULL, NULL, NULL);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, ret_error, "creating the P-256 signing key");
                goto out;
        }
        rc = Esys_Load(esys, primary, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, priv, pub, &key);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, ret_error, "loading the P-256 signing key");
                goto out;
        }
        /* Part 3, 28.5: the persistent copy lives on independently of its parent. */
        rc = Esys_EvictControl(esys, ESYS_TR_RH_OWNER, key, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                               handle, &persistent);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, ret_error, "making the key persistent at handle 0x%08" PRIx32, handle);
                goto out;
        }
        (void) Esys_TR_Close(esys, &persistent);
out:
        /* Transient objects occupy one of the TPM's few slots until flushed (TESTBED.md). */
        if (key != ESYS_TR_NONE)
                (void) Esys_FlushContext(esys, key);
        if (flush_primary)
                (void) Esys_FlushContext(esys, primary);
        if (srk.tr != ESYS_TR_NONE)
                (void) Esys_TR_Close(esys, &srk.tr);
        return r;
}

static int tpm_init(const struct iothub_conf *c, bool *ret_created, char **ret_error) {
        _cleanup_(tctildr_finalizep) TSS2_TCTI_CONTEXT *tcti = NULL;
        _cleanup_(esys_finalizep) ESYS_CONTEXT *esys = NULL;
        uint8_t x[P256_COORD_LEN], y[P256_COORD_LEN];
        char *error = NULL;
        int r;

        if (!tpm_handle_is_valid(c->key.handle))
                return set_error_message(ret_error, -EINVAL,
                                 "[key] handle 0x%08" PRIx32 " is not a persistent handle of the owner "
                                 "hierarchy (0x81000000-0x817fffff)",
                                 c->key.handle);
        r = tpm_connect(c->key.tcti, &tcti, &esys, ret_error);
        if (r < 0)
                return r;

        r = tpm_read_key(esys, c->key.handle, NULL, x, y, &error);
        if (r == 0) {
                *ret_created = false;
                return 0;
        }
        if (r == -EEXIST) {
                r = set_error_message(ret_error, r, "%s; refusing to replace it", error ?: "the handle is taken");
                free(error);
                return r;
        }
        if (r != -ENOENT) {
                if (ret_error)
                        *ret_error = error;
                else
                        free(error);
                return r;
        }
        free(error);

        r = tpm_create(esys, c->key.handle, ret_error);
        if (r < 0)
                return r;
        *ret_created = true;
        return 0;
}

/* The TPM went away under an open key (swtpm or the resource manager restarted, a module
 * reloaded): the connection is dead for good, so connect again and look for the key at its
 * handle. It must be the very key opened at first (same public point): a TPM that answers at the
 * same address without it, or with another key there (another TPM, or 'key init' run again), is
 * refused, never signed with. Returns 0, or a negative errno with k->error saying why. */
static int tpm_reconnect(struct hubkey *k) {
        _cleanup_(tctildr_finalizep) TSS2_TCTI_CONTEXT *tcti = NULL;
        _cleanup_(esys_finalizep) ESYS_CONTEXT *esys = NULL;
        _cleanup_free_ char *err = NULL;
        uint8_t x[P256_COORD_LEN], y[P256_COORD_LEN];
        ESYS_TR tr = ESYS_TR_NONE;
        int r;

        r = tpm_connect(k->tcti_conf, &tcti, &esys, &err);
        if (r >= 0) {
                r = tpm_read_key(esys, k->handle, &tr, x, y, &err);
                if (r >= 0 && (memcmp(x, k->x, sizeof x) != 0 || memcmp(y, k->y, sizeof y) != 0)) {
                        (void) Esys_TR_Close(esys, &tr);
                        r = -ENOKEY;
                        free(err);
                        err = NULL;
                        if (asprintf(&err, "the TPM at '%s' holds another key at handle 0x%08" PRIx32
                                           ", not the hub key %s: another TPM, or the key was made again",
                                     k->tcti_conf ?: "(default)", k->handle, k->id) < 0)
                                err = NULL;
                } else if (r == -ENOENT) {
                        r = -ENOKEY;
                        free(err);
                        err = NULL;
                        if (asprintf(&err, "the hub key %s is not in the TPM at '%s' (nothing at handle 0x%08" PRIx32
                                           "): another TPM, or it was cleared",
                                     k->id, k->tcti_conf ?: "(default)", k->handle) < 0)
                                err = NULL;
                }
        }
        if (r < 0) {
                free(k->error);
                k->error = err ? TAKE_PTR(err) : strdup(strerror(-r));
                return r;
        }
        /* The old context's handles belong to the dead connection: drop them with it. */
        esys_finalizep(&k->esys);
        tctildr_finalizep(&k->tcti);
        k->srk = (struct srk_cache){ .tr = ESYS_TR_NONE };
        k->esys = TAKE_PTR(esys);
        k->tcti = TAKE_PTR(tcti);
        k->tcti_unpollable = false;
        k->key = tr;
        return 0;
}

/* Part 3, 20.2 TPM2_Sign with the ECDSA/SHA-256 scheme. An unrestricted key needs no proof that the TPM
 * computed the digest; the "NULL ticket" is a HASHCHECK for TPM_RH_NULL with an empty digest. */
static const TPMT_SIG_SCHEME sign_scheme = {
        .scheme = TPM2_ALG_ECDSA,
        .details.ecdsa.hashAlg = TPM2_ALG_SHA256,
};
static const TPMT_TK_HASHCHECK sign_validation = {
        .tag = TPM2_ST_HASHCHECK,
        .hierarchy = TPM2_RH_NULL,
};

static int tpm_sig_to_raw(const TPMT_SIGNATURE *sig, uint8_t ret_sig[HUBKEY_SIG_LEN]) {
        const TPMS_SIGNATURE_ECC *ecc;

        if (sig->sigAlg != TPM2_ALG_ECDSA)
                return -EBADMSG;
        ecc = &sig->signature.ecdsa;
        if (ecc->signatureR.size > P256_COORD_LEN || ecc->signatureS.size > P256_COORD_LEN)
                return -EBADMSG;
        /* RFC 7518 3.4: R and S as 32-octet big-endian integers, left-padded with zeros. */
        memset(ret_sig, 0, HUBKEY_SIG_LEN);
        memcpy(ret_sig + P256_COORD_LEN - ecc->signatureR.size, ecc->signatureR.buffer, ecc->signatureR.size);
        memcpy(ret_sig + HUBKEY_SIG_LEN - ecc->signatureS.size, ecc->signatureS.buffer, ecc->signatureS.size);
        return 0;
}

static void tpm_drain(struct hubkey *k);

static int tpm_sign(struct hubkey *k, const uint8_t digest[SHA256_LEN], uint8_t ret_sig[HUBKEY_SIG_LEN]) {
        _cleanup_esys_ TPMT_SIGNATURE *sig = NULL;
        TPM2B_DIGEST d = { .size = SHA256_LEN };
        TSS2_RC rc;

        tpm_drain(k);
        memcpy(d.buffer, digest, SHA256_LEN);
        rc = Esys_Sign(k->esys, k->key, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &d, &sign_scheme,
                       &sign_validation, &sig);
        /* Anything but the TPM itself answering "busy, again": the connection or the key may be
         * gone (a dead connection fails at the TCTI layer, a vanished key with TPM_RC_HANDLE).
         * Once connected again to the same key, the signature is asked for once more. */
        if (rc != TSS2_RC_SUCCESS && tss2_error(rc, NULL, "signing") != -EAGAIN) {
                int r = tpm_reconnect(k);
                if (r < 0)
                        return r;
                rc = Esys_Sign(k->esys, k->key, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &d, &sign_scheme,
                               &sign_validation, &sig);
        }
        if (rc != TSS2_RC_SUCCESS) {
                free(k->error);
                k->error = strdup("the TPM refused to sign");
                return tss2_error(rc, NULL, "signing");
        }
        free(k->error);
        k->error = NULL;
        return tpm_sig_to_raw(sig, ret_sig);
}

/* ---- sealing to the TPM ---- */

/* A sealed-data object (TPM 2.0 Part 1, "Sealed Data Object"; Part 2, TPMA_OBJECT): a keyedHash object with
 * the NULL scheme whose sensitive data is the caller's secret. Neither sign nor decrypt (it is data, not a
 * key), and not sensitiveDataOrigin since the data is given (Part 3, TPM2_Create refuses both). What
 * protects the secret is fixedTPM|fixedParent: the object can only be loaded under this TPM's storage primary
 * key and never duplicated. userWithAuth with an empty authValue and no policy; noDA as for the hub key. */
static const TPM2B_PUBLIC sealed_template = {
        .publicArea = {
                .type = TPM2_ALG_KEYEDHASH,
                .nameAlg = TPM2_ALG_SHA256,
                .objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_USERWITHAUTH |
                                    TPMA_OBJECT_NODA,
                .parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_NULL,
        },
};

/* The blob: "IHS1" (iothub sealed, format 1) || TPM2B_PUBLIC || TPM2B_PRIVATE, both in the TPM's wire
 * format (big-endian 16-bit sizes). With a 128-byte secret it is 308 bytes on swtpm; anything larger than
 * SEAL_BLOB_MAX is refused unread. */
#define SEAL_MAGIC "IHS1"
#define SEAL_MAGIC_LEN 4
#define SEAL_BLOB_MAX 1024

static void sensitive_data_freep(TPM2B_SENSITIVE_DATA **p) {
        if (!*p)
                return;
        OPENSSL_cleanse(*p, sizeof **p);
        Esys_Free(*p);
}

/* Whether the TPM itself refused a command parameter (TPM 2.0 Part 2, TPM_RC: format one, bit 6 set). */
static bool tpm_rc_is_parameter_error(TSS2_RC rc) {
        TSS2_RC layer = rc & TSS2_RC_LAYER_MASK;

        return (layer == TSS2_TPM_RC_LAYER || layer == TSS2_RESMGR_TPM_RC_LAYER) && (rc & TPM2_RC_FMT1) &&
               (rc & TPM2_RC_P);
}

static void tpm_flush(ESYS_CONTEXT *esys, ESYS_TR *tr) {
        if (*tr != ESYS_TR_NONE)
                (void) Esys_FlushContext(esys, *tr);
        *tr = ESYS_TR_NONE;
}

/* Whether a public area read from a blob is one that tpm_seal() makes. The TPM binds the public area to
 * the private one anyway (the private area's integrity HMAC covers the object's Name: Part 1, "Integrity"
 * under "Protected Storage"), so this refuses early what the TPM would load but the hub never makes: a
 * duplicable object, one with a policy, a key. */
static bool sealed_public_is_valid(const TPMT_PUBLIC *p) {
        const TPMT_PUBLIC *t = &sealed_template.publicArea;

        return p->type == t->type && p->nameAlg == t->nameAlg && p->objectAttributes == t->objectAttributes &&
               p->authPolicy.size == 0 && p->parameters.keyedHashDetail.scheme.scheme == TPM2_ALG_NULL &&
               p->unique.keyedHash.size == SHA256_LEN;
}

/* Reads a blob strictly: the magic, each sized structure unmarshalled within its own size and consuming
 * all of it (tss2-mu's TPM2B_PUBLIC unmarshaller checks neither), nothing after the private area. The
 * sizes are checked here first, so that tss2-mu never logs about a malformed blob. */
static int seal_blob_parse(const uint8_t *blob, size_t len, TPM2B_PUBLIC *ret_pub, TPM2B_PRIVATE *ret_priv) {
        TPM2B_PUBLIC pub = {};
        TPM2B_PRIVATE priv = {};
        size_t offset = SEAL_MAGIC_LEN, inner = 0, size;

        if (len < SEAL_MAGIC_LEN + 2 || len > SEAL_BLOB_MAX || memcmp(blob, SEAL_MAGIC, SEAL_MAGIC_LEN) != 0)
                return -EBADMSG;

        size = (size_t) blob[offset] << 8 | blob[offset + 1];
        offset += 2;
        if (size == 0 || size > len - offset ||
            Tss2_MU_TPMT_PUBLIC_Unmarshal(blob + offset, size, &inner, &pub.publicArea) != TSS2_RC_SUCCESS ||
            inner != size)
                return -EBADMSG;
        pub.size = (uint16_t) size;
        offset += size;

        if (len - offset < 2)
                return -EBADMSG;
        size = (size_t) blob[offset] << 8 | blob[offset + 1];
        if (size == 0 || size > sizeof priv.buffer || size != len - offset - 2 ||
            Tss2_MU_TPM2B_PRIVATE_Unmarshal(blob, len, &offset, &priv) != TSS2_RC_SUCCESS || offset != len)
                return -EBADMSG;

        if (!sealed_public_is_valid(&pub.publicArea))
                return -EBADMSG;
        *ret_pub = pub;
        *ret_priv = priv;
        return 0;
}

/* A salted HMAC session with AES-128-CFB parameter encryption (Part 1, "Salted Session" and "Session-based
 * Encryption"), salted with the storage primary key: the secret then crosses the bus to the
 * TPM (TPM2_Create) and back (TPM2_Unseal) encrypted, since on a hub whose TPM is a separate chip the SPI
 * or I2C lines can be probed. It defeats listening, not an active attacker on the bus who substitutes the
 * primary key's public area (the hub keeps no record of it to compare with). */
static int tpm_start_session(ESYS_CONTEXT *esys, ESYS_TR primary, ESYS_TR *ret_session) {
        const TPMT_SYM_DEF aes_cfb = {
                .algorithm = TPM2_ALG_AES,
                .keyBits.aes = 128,
                .mode.aes = TPM2_ALG_CFB,
        };
        TSS2_RC rc;

        rc = Esys_StartAuthSession(esys, primary, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, NULL,
                                   TPM2_SE_HMAC, &aes_cfb, TPM2_ALG_SHA256, ret_session);
        if (rc != TSS2_RC_SUCCESS)
                return tss2_error(rc, NULL, "starting an encrypted session");
        return 0;
}

/* Which parameter the next command encrypts: TPMA_SESSION_DECRYPT for the command's first one (the TPM
 * decrypts it), TPMA_SESSION_ENCRYPT for the response's first one; only commands whose first parameter is
 * a sized buffer allow either (Part 1, "Session-based Encryption"). The session is kept (continueSession)
 * and flushed at the end. */
static int tpm_session_encrypt(ESYS_CONTEXT *esys, ESYS_TR session, TPMA_SESSION which) {
        TSS2_RC rc;

        rc = Esys_TRSess_SetAttributes(esys, session, which | TPMA_SESSION_CONTINUESESSION, 0xff);
        if (rc != TSS2_RC_SUCCESS)
                return tss2_error(rc, NULL, "setting the session attributes");
        return 0;
}

static int tpm_seal(struct hubkey *k, const uint8_t *secret, size_t len, uint8_t **ret_blob, size_t *ret_len) {
        _cleanup_esys_ TPM2B_PRIVATE *priv = NULL;
        _cleanup_esys_ TPM2B_PUBLIC *pub = NULL;
        TPM2B_SENSITIVE_CREATE sensitive = {};
        const TPM2B_DATA no_outside_info = {};
        const TPML_PCR_SELECTION no_pcrs = {};
        ESYS_TR primary = ESYS_TR_NONE, session = ESYS_TR_NONE;
        uint8_t buf[SEAL_BLOB_MAX], *blob;
        size_t offset = SEAL_MAGIC_LEN;
        bool flush_primary = false;
        TSS2_RC rc;
        int r;

        tpm_drain(k); /* one command at a time on the ESYS context */

        rc = tpm_parent_open(k->esys, &k->srk, false, &primary, &flush_primary);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, NULL, "creating the storage primary key");
                goto out;
        }
        r = tpm_start_session(k->esys, primary, &session);
        if (r < 0)
                goto out;
        r = tpm_session_encrypt(k->esys, session, TPMA_SESSION_DECRYPT);
        if (r < 0)
                goto out;

        /* Part 3, TPM2_Create: the secret as the sensitive data; the session authorizes using the parent. */
        sensitive.sensitive.data.size = (uint16_t) len;
        memcpy(sensitive.sensitive.data.buffer, secret, len);
        rc = Esys_Create(k->esys, primary, session, ESYS_TR_NONE, ESYS_TR_NONE, &sensitive, &sealed_template,
                         &no_outside_info, &no_pcrs, &priv, &pub, NULL, NULL, NULL);
        OPENSSL_cleanse(&sensitive, sizeof sensitive);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, NULL, "creating the sealed-data object");
                goto out;
        }

        memcpy(buf, SEAL_MAGIC, SEAL_MAGIC_LEN);
        rc = Tss2_MU_TPM2B_PUBLIC_Marshal(pub, buf, sizeof buf, &offset);
        if (rc == TSS2_RC_SUCCESS)
                rc = Tss2_MU_TPM2B_PRIVATE_Marshal(priv, buf, sizeof buf, &offset);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, NULL, "marshalling the sealed-data object");
                goto out;
        }
        blob = malloc(offset);
        if (!blob) {
                r = -ENOMEM;
                goto out;
        }
        memcpy(blob, buf, offset);
        *ret_blob = blob;
        *ret_len = offset;
        r = 0;
out:
        /* Both occupy one of the TPM's few slots until flushed (TESTBED.md). */
        tpm_flush(k->esys, &session);
        if (flush_primary)
                tpm_flush(k->esys, &primary);
        return r;
}

static int tpm_unseal_under(struct hubkey *k, bool force_create, const TPM2B_PUBLIC *pub_in,
                            const TPM2B_PRIVATE *priv_in, uint8_t **ret_secret, size_t *ret_len) {
        _cleanup_(sensitive_data_freep) TPM2B_SENSITIVE_DATA *data = NULL;
        ESYS_TR primary = ESYS_TR_NONE, session = ESYS_TR_NONE, object = ESYS_TR_NONE;
        TPM2B_PRIVATE priv = *priv_in;
        TPM2B_PUBLIC pub = *pub_in;
        bool flush_primary = false;
        uint8_t *secret;
        TSS2_RC rc;
        int r;

        rc = tpm_parent_open(k->esys, &k->srk, force_create, &primary, &flush_primary);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, NULL, "creating the storage primary key");
                goto out;
        }
        r = tpm_start_session(k->esys, primary, &session);
        if (r < 0)
                goto out;
        r = tpm_session_encrypt(k->esys, session, 0);
        if (r < 0)
                goto out;
        /* Another TPM, or this one after TPM2_Clear (a new owner seed, hence another primary key), or an
         * altered blob: TPM_RC_INTEGRITY, which tss2_error() makes -ENOKEY. Any other fault the TPM finds
         * with the parameters (a format-one code with the parameter bit, Part 2, TPM_RC) is in the blob's
         * private area, which only the TPM can parse: as malformed as what seal_blob_parse() refuses. */
        rc = Esys_Load(k->esys, primary, session, ESYS_TR_NONE, ESYS_TR_NONE, &priv, &pub, &object);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, NULL, "loading the sealed-data object");
                if (r != -ENOKEY && tpm_rc_is_parameter_error(rc))
                        r = -EBADMSG;
                goto out;
        }
        r = tpm_session_encrypt(k->esys, session, TPMA_SESSION_ENCRYPT);
        if (r < 0)
                goto out;
        rc = Esys_Unseal(k->esys, object, session, ESYS_TR_NONE, ESYS_TR_NONE, &data);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss2_error(rc, NULL, "unsealing");
                goto out;
        }
        if (data->size == 0 || data->size > HUBKEY_SEAL_MAX) {
                r = -EBADMSG;
                goto out;
        }
        secret = malloc(data->size);
        if (!secret) {
                r = -ENOMEM;
                goto out;
        }
        memcpy(secret, data->buffer, data->size);
        *ret_secret = secret;
        *ret_len = data->size;
        r = 0;
out:
        tpm_flush(k->esys, &object);
        tpm_flush(k->esys, &session);
        if (flush_primary)
                tpm_flush(k->esys, &primary);
        return r;
}

static int tpm_unseal(struct hubkey *k, const uint8_t *blob, size_t len, uint8_t **ret_secret,
                      size_t *ret_len) {
        TPM2B_PRIVATE priv;
        TPM2B_PUBLIC pub;
        int r;

        r = seal_blob_parse(blob, len, &pub, &priv);
        if (r < 0)
                return r;
        tpm_drain(k); /* one command at a time on the ESYS context */
        r = tpm_unseal_under(k, false, &pub, &priv, ret_secret, ret_len);
        /* TPM_RC_INTEGRITY under a persistent SRK: a blob sealed before that SRK was provisioned,
         * under the primary this hub created itself, if the persistent one is another key (made
         * with a non-empty unique field, say). Once more under the created primary. */
        if (r == -ENOKEY && k->srk.tr != ESYS_TR_NONE)
                r = tpm_unseal_under(k, true, &pub, &priv, ret_secret, ret_len);
        return r;
}

/* ---- file backend ---- */

/* Never ask for a passphrase on a terminal: an encrypted key file is simply refused. */
static int no_passphrase(_unused_ char *buf, _unused_ int size, _unused_ int rwflag, _unused_ void *userdata) {
        return -1;
}

/* Loads a P-256 private key from 'path'. Returns 0, -ENOENT when the file does not exist, -EPERM
 * when group or others may access it, -EOPNOTSUPP when it holds another kind of key, -EINVAL
 * when it holds no readable PEM private key. */
static int file_load(const char *path, EVP_PKEY **ret, char **ret_error) {
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *pkey = NULL;
        _cleanup_(BIO_free_allp) BIO *bio = NULL;
        _cleanup_close_ int fd = -1;
        char what[80];
        struct stat st;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) {
                if (errno == ENOENT)
                        return set_error_message(ret_error, -ENOENT,
                                         "key file %s does not exist (run 'iothubctl key init' to create it)",
                                         path);
                return set_error_message(ret_error, -errno, "cannot open key file %s: %m", path);
        }
        if (fstat(fd, &st) < 0)
                return set_error_message(ret_error, -errno, "cannot stat key file %s: %m", path);
        if (!S_ISREG(st.st_mode))
                return set_error_message(ret_error, -EINVAL, "key file %s is not a regular file", path);
        /* The file holds the hub's private key: like OpenSSH with "UNPROTECTED PRIVATE KEY FILE",
         * refuse it rather than use a key that others may have read. Checked on the open file. */
        if (st.st_mode & 077)
                return set_error_message(ret_error, -EPERM,
                                 "key file %s is accessible by group or others (mode %04o); it holds a private "
                                 "key, make it mode 0600",
                                 path, (unsigned) (st.st_mode & 07777));
        if (st.st_size > HUBKEY_FILE_MAX)
                return set_error_message(ret_error, -EFBIG, "key file %s is larger than %u bytes", path,
                                 (unsigned) HUBKEY_FILE_MAX);

        bio = BIO_new_fd(fd, BIO_NOCLOSE);
        if (!bio)
                return set_error_message(ret_error, openssl_errno(-ENOMEM), "cannot read key file %s", path);
        pkey = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
        if (!pkey) {
                int r = openssl_errno(-EINVAL);
                return set_error_message(ret_error, r == -ENOMEM ? r : -EINVAL,
                                 "key file %s holds no PEM private key (encrypted keys are not supported)",
                                 path);
        }
        if (!pkey_is_p256(pkey, what, sizeof what))
                return set_error_message(ret_error, -EOPNOTSUPP, "key file %s holds an %s key, not an EC P-256 key",
                                 path, what);
        /* The decoders tried on the way may leave entries behind: never let them explain a later
         * failure elsewhere. */
        ERR_clear_error();
        *ret = TAKE_PTR(pkey);
        return 0;
}

static int file_open(const struct iothub_conf *c, struct hubkey *k, char **ret_error) {
        _cleanup_(BN_freep) BIGNUM *bx = NULL, *by = NULL;
        uint8_t x[P256_COORD_LEN], y[P256_COORD_LEN];
        int r;

        if (!c->key.file)
                return set_error_message(ret_error, -EINVAL, "[key] backend 'file' needs [key] file");
        r = file_load(c->key.file, &k->pkey, ret_error);
        if (r < 0)
                return r;
        if (EVP_PKEY_get_bn_param(k->pkey, OSSL_PKEY_PARAM_EC_PUB_X, &bx) != 1 ||
            EVP_PKEY_get_bn_param(k->pkey, OSSL_PKEY_PARAM_EC_PUB_Y, &by) != 1 ||
            BN_bn2binpad(bx, x, sizeof x) != P256_COORD_LEN || BN_bn2binpad(by, y, sizeof y) != P256_COORD_LEN)
                return set_error_message(ret_error, openssl_errno(-EINVAL),
                                 "key file %s: cannot read the public key", c->key.file);
        r = hubkey_set_public(k, x, y);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot compute the key id: %s", strerror(-r));

        /* Set up signing once: a fetched context reused for every signature. The digest given
         * to EVP_PKEY_sign() must then be exactly SHA-256 sized. */
        k->sign_ctx = EVP_PKEY_CTX_new_from_pkey(NULL, k->pkey, NULL);
        if (!k->sign_ctx || EVP_PKEY_sign_init(k->sign_ctx) != 1 ||
            EVP_PKEY_CTX_set_signature_md(k->sign_ctx, EVP_sha256()) != 1)
                return set_error_message(ret_error, openssl_errno(-EIO), "cannot set up signing with key file %s",
                                 c->key.file);
        return 0;
}

/* Writes a new key to 'path' atomically and without ever replacing a file that appeared there
 * in the meantime: write_file_atomic() to a temporary name beside it, then a rename that fails
 * when the target exists (renameat2 RENAME_NOREPLACE). */
static int file_write_new(const char *path, const void *data, size_t len) {
        _cleanup_free_ char *tmp = NULL, *dir = NULL;
        _cleanup_close_ int dfd = -1;
        uint8_t rnd[8];
        int r;

        r = random_bytes(rnd, sizeof rnd);
        if (r < 0)
                return r;
        tmp = strdup_printf("%s.new-%02x%02x%02x%02x%02x%02x%02x%02x", path, rnd[0], rnd[1], rnd[2], rnd[3],
                            rnd[4], rnd[5], rnd[6], rnd[7]);
        if (!tmp)
                return -ENOMEM;
        r = write_file_atomic(tmp, data, len, 0600);
        if (r < 0)
                return r;
        if (renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE) < 0) {
                r = -errno;
                (void) unlink(tmp);
                return r;
        }
        dir = strdup(path);
        if (!dir)
                return -ENOMEM;
        /* fsync the directory, so that the rename itself survives a power cut. */
        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees dir */
        dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0)
                (void) fsync(dfd);
        return 0;
}

static int file_init(const struct iothub_conf *c, bool *ret_created, char **ret_error) {
        _cleanup_(EVP_PKEY_freep) EVP_PKEY *pkey = NULL;
        _cleanup_(BIO_free_allp) BIO *bio = NULL;
        _cleanup_free_ char *error = NULL;
        char *pem;
        long n;
        int r;

        if (!c->key.file)
                return set_error_message(ret_error, -EINVAL, "[key] backend 'file' needs [key] file");

        r = file_load(c->key.file, &pkey, &error);
        if (r == 0) {
                *ret_created = false;
                return 0;
        }
        if (r == -EOPNOTSUPP || r == -EINVAL)
                return set_error_message(ret_error, -EEXIST, "%s; refusing to replace it",
                                 error ?: "the key file holds no usable key");
        if (r != -ENOENT) {
                if (ret_error)
                        *ret_error = TAKE_PTR(error);
                return r;
        }

        pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", SN_X9_62_prime256v1);
        if (!pkey)
                return set_error_message(ret_error, openssl_errno(-EIO), "cannot generate a P-256 key");
        /* A memory BIO: OpenSSL wipes its buffer when it grows and when it is freed
         * (BUF_MEM_grow_clean, BUF_MEM_free). PKCS#8 (RFC 5958), unencrypted. */
        bio = BIO_new(BIO_s_secmem());
        if (!bio || PEM_write_bio_PrivateKey(bio, pkey, NULL, NULL, 0, NULL, NULL) != 1)
                return set_error_message(ret_error, openssl_errno(-ENOMEM), "cannot encode the new key");
        n = BIO_get_mem_data(bio, &pem);
        if (n <= 0)
                return set_error_message(ret_error, -EIO, "cannot encode the new key");
        r = file_write_new(c->key.file, pem, (size_t) n);
        if (r == -EEXIST)
                return set_error_message(ret_error, r,
                                 "key file %s appeared while the key was made; refusing to replace it",
                                 c->key.file);
        if (r < 0)
                return set_error_message(ret_error, r, "cannot write key file %s: %s", c->key.file, strerror(-r));
        *ret_created = true;
        return 0;
}

static int file_sign(struct hubkey *k, const uint8_t digest[SHA256_LEN], uint8_t ret_sig[HUBKEY_SIG_LEN]) {
        _cleanup_(ECDSA_SIG_freep) ECDSA_SIG *sig = NULL;
        uint8_t der[ECDSA_P256_DER_MAX];
        const unsigned char *p = der;
        const BIGNUM *r, *s;
        size_t len = sizeof der;

        if (EVP_PKEY_sign(k->sign_ctx, der, &len, digest, SHA256_LEN) != 1)
                return openssl_errno(-EIO);
        /* RFC 3279 2.2.3 Ecdsa-Sig-Value to RFC 7518 3.4 R || S. */
        sig = d2i_ECDSA_SIG(NULL, &p, (long) len);
        if (!sig || (size_t) (p - der) != len)
                return openssl_errno(-EBADMSG);
        ECDSA_SIG_get0(sig, &r, &s);
        if (BN_bn2binpad(r, ret_sig, P256_COORD_LEN) != P256_COORD_LEN ||
            BN_bn2binpad(s, ret_sig + P256_COORD_LEN, P256_COORD_LEN) != P256_COORD_LEN)
                return openssl_errno(-EBADMSG);
        return 0;
}

/* ---- asynchronous signing (hubkey.h) ---- */

static void queue_unlink(struct hubkey *k, struct hubkey_op *op) {
        struct hubkey_op **p = &k->queue[op->prio];

        for (; *p; p = &(*p)->next)
                if (*p == op) {
                        *p = op->next;
                        if (!*p)
                                k->queue_tail[op->prio] = p;
                        break;
                }
        op->next = NULL;
        k->n_queued--;
}

static struct hubkey_op *queue_pop(struct hubkey *k) {
        for (size_t i = 0; i < _HUBKEY_PRIO_MAX; i++)
                if (k->queue[i]) {
                        struct hubkey_op *op = k->queue[i];
                        queue_unlink(k, op);
                        return op;
                }
        return NULL;
}

static void ops_detach(struct hubkey *k) {
        struct hubkey_op *op;

        while ((op = queue_pop(k))) {
                op->k = NULL;
                op->state = OP_OVER;
        }
        if (k->inflight) {
                k->inflight->k = NULL;
                k->inflight->state = OP_OVER;
                k->inflight = NULL;
        }
        if (k->finished) {
                k->finished->k = NULL;
                k->finished->state = OP_OVER;
                k->finished = NULL;
        }
}

static void kick(struct hubkey *k) {
        int r;

        if (!k->kick)
                return;
        r = sd_event_source_set_enabled(k->kick, SD_EVENT_ONESHOT);
        /* Only fails for want of memory inside sd-event; the next op queued kicks again. */
        (void) r;
}

static void tpm_sign_start(struct hubkey *k, struct hubkey_op *op);

/* The answer to the Sign in flight is here (or it failed): keep it for delivery by kick. A
 * failure other than the TPM's "busy, again" may be a dead connection or a vanished key (swtpm
 * or the resource manager restarted): connect again (tpm_reconnect() checks that it is the same
 * key, k->error says why not) and send the same Sign once more, as hubkey_sign() does. */
static void tpm_sign_finished(struct hubkey *k, int r, const uint8_t *sig) {
        struct hubkey_op *op = TAKE_PTR(k->inflight);

        k->busy = false;
        if (k->tpm_io)
                (void) sd_event_source_set_enabled(k->tpm_io, SD_EVENT_OFF);
        if (k->backend == KEY_BACKEND_TPM) {
                if (r < 0 && r != -EAGAIN && op && !op->retried) {
                        int q = tpm_reconnect(k);
                        if (q >= 0) {
                                op->retried = true;
                                tpm_sign_start(k, op);
                                return;
                        }
                        r = q;
                } else if (r < 0 && !k->error)
                        k->error = strdup("the TPM refused to sign");
                else if (r >= 0) {
                        free(k->error);
                        k->error = NULL;
                }
        }
        if (r >= 0)
                k->signatures++;
        if (op) {
                op->result = r;
                if (r >= 0)
                        /* sig is NULL only with r < 0 (tss2_error() is variadic: not inlined):
                         * NOLINTNEXTLINE(clang-analyzer-core.NonNullParamChecker) */
                        memcpy(op->sig, sig, HUBKEY_SIG_LEN);
                op->state = OP_FINISHED;
                k->finished = op;
        }
        kick(k);
}

/* Esys_Sign_Finish() with the context's timeout (0: do not wait); returns 1 when it answered (r
 * in *ret_r), 0 when the answer is not there yet. */
static int tpm_sign_collect(struct hubkey *k, int *ret_r, uint8_t ret_sig[HUBKEY_SIG_LEN]) {
        _cleanup_esys_ TPMT_SIGNATURE *sig = NULL;
        TSS2_RC rc;

        rc = Esys_Sign_Finish(k->esys, &sig);
        if (rc == TSS2_ESYS_RC_TRY_AGAIN || rc == TSS2_TCTI_RC_TRY_AGAIN)
                return 0;
        if (rc != TSS2_RC_SUCCESS)
                *ret_r = tss2_error(rc, NULL, "signing");
        else
                *ret_r = tpm_sig_to_raw(sig, ret_sig);
        return 1;
}

/* Before any other command on the context: wait for the Sign in flight (blocking). */
static void tpm_drain(struct hubkey *k) {
        uint8_t sig[HUBKEY_SIG_LEN];
        int r = -EIO;

        /* A loop: a failed Sign may be sent again once on a new connection (tpm_sign_finished). */
        while (k->busy) {
                (void) Esys_SetTimeout(k->esys, TSS2_TCTI_TIMEOUT_BLOCK);
                if (tpm_sign_collect(k, &r, sig) == 0)
                        r = -EIO; /* cannot happen with a blocking timeout */
                tpm_sign_finished(k, r, sig);
        }
}

static int on_tpm_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct hubkey *k = userdata;
        uint8_t sig[HUBKEY_SIG_LEN];
        int r = -EIO;

        if (!k->busy) {
                (void) sd_event_source_set_enabled(s, SD_EVENT_OFF);
                return 0;
        }
        /* Only what is there: the TCTI polls its handle with this timeout (tcti-device,
         * tcti-mssim), so a partial answer returns TRY_AGAIN and the loop waits for the rest. */
        (void) Esys_SetTimeout(k->esys, 0);
        int done = tpm_sign_collect(k, &r, sig);
        (void) Esys_SetTimeout(k->esys, TSS2_TCTI_TIMEOUT_BLOCK);
        if (done)
                tpm_sign_finished(k, r, sig);
        return 0;
}

/* Watches the TCTI's poll handle for the answer. Returns 1 when watched, 0 when the TCTI has no
 * poll handle (the caller then waits in Esys_Sign_Finish), or a negative errno. */
static int tpm_watch(struct hubkey *k) {
        _cleanup_esys_ TSS2_TCTI_POLL_HANDLE *handles = NULL;
        size_t n = 0;
        TSS2_RC rc;
        int r;

        /* Asked once per connection: ESYS logs an ERROR line on stderr (the journal) each time a
         * TCTI says it has none, which was one line per signature with the swtpm TCTI. */
        if (k->tcti_unpollable)
                return 0;
        rc = Esys_GetPollHandles(k->esys, &handles, &n);
        if (rc != TSS2_RC_SUCCESS || n == 0) {
                k->tcti_unpollable = true; /* TSS2_TCTI_RC_NOT_IMPLEMENTED: the swtpm TCTI */
                return 0;
        }
        /* One handle for the TCTIs that have any (the device or the socket); POLLOUT, which they
         * also announce, is always ready and would spin the loop: the answer is POLLIN. */
        if (k->tpm_io && k->tpm_io_fd != handles[0].fd)
                k->tpm_io = sd_event_source_disable_unref(k->tpm_io);
        if (!k->tpm_io) {
                r = sd_event_add_io(k->event, &k->tpm_io, handles[0].fd, EPOLLIN, on_tpm_io, k);
                if (r < 0)
                        return r;
                k->tpm_io_fd = handles[0].fd;
                (void) sd_event_source_set_description(k->tpm_io, "hubkey-tpm");
        }
        r = sd_event_source_set_enabled(k->tpm_io, SD_EVENT_ON);
        return r < 0 ? r : 1;
}

/* Sends the TPM2_Sign of op; the answer comes through on_tpm_io (or at once without a poll
 * handle). */
static void tpm_sign_start(struct hubkey *k, struct hubkey_op *op) {
        TPM2B_DIGEST d = { .size = SHA256_LEN };
        TSS2_RC rc;
        int r = -EIO;

        memcpy(d.buffer, op->digest, SHA256_LEN);
        op->state = OP_INFLIGHT;
        k->inflight = op;
        k->busy = true;
        rc = Esys_Sign_Async(k->esys, k->key, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &d, &sign_scheme,
                             &sign_validation);
        if (rc != TSS2_RC_SUCCESS) {
                tpm_sign_finished(k, tss2_error(rc, NULL, "signing"), NULL);
                return;
        }
        r = tpm_watch(k);
        if (r > 0)
                return;
        /* No poll handle (or no io source): wait here, as hubkey_sign() would. */
        tpm_drain(k);
}

static int on_kick(sd_event_source *s, void *userdata) {
        struct hubkey *k = userdata;
        struct hubkey_op *op;

        /* First the one finished: its done() may queue more, or free ops. */
        op = TAKE_PTR(k->finished);
        if (op) {
                op->state = OP_OVER;
                op->k = NULL;
                kick(k); /* whatever is queued starts at the next iteration */
                op->done(op->userdata, op->result, op->result >= 0 ? op->sig : NULL);
                return 0; /* op may be gone */
        }
        if (k->busy)
                return 0;
        op = queue_pop(k);
        if (!op)
                return 0;
        if (k->backend == KEY_BACKEND_TPM) {
                tpm_sign_start(k, op);
                return 0;
        }
        /* file: OpenSSL signs in about 20 us; delivered like the TPM's answer. */
        {
                uint8_t sig[HUBKEY_SIG_LEN];
                int r;

                op->state = OP_INFLIGHT;
                k->inflight = op;
                k->busy = true;
                r = file_sign(k, op->digest, sig);
                tpm_sign_finished(k, r, sig);
        }
        return 0;
}

int hubkey_attach_event(struct hubkey *k, sd_event *e) {
        int r;

        if (!k || !e)
                return -EINVAL;
        if (k->event)
                return k->event == e ? 0 : -EBUSY;
        r = sd_event_add_defer(e, &k->kick, on_kick, k);
        if (r < 0)
                return r;
        (void) sd_event_source_set_description(k->kick, "hubkey-queue");
        r = sd_event_source_set_enabled(k->kick, SD_EVENT_OFF);
        if (r < 0) {
                k->kick = sd_event_source_disable_unref(k->kick);
                return r;
        }
        k->event = sd_event_ref(e);
        return 0;
}

int hubkey_sign_async(struct hubkey *k, enum hubkey_prio prio, const void *msg, size_t len,
                      hubkey_sign_done_t done, void *userdata, struct hubkey_op **ret) {
        struct hubkey_op *op;

        if (!k || (!msg && len > 0) || !done || !ret || (unsigned) prio >= _HUBKEY_PRIO_MAX)
                return -EINVAL;
        if (!k->event)
                return -ENXIO;
        if (k->n_queued >= HUBKEY_QUEUE_MAX)
                return -EBUSY;
        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        if (EVP_Digest(msg ?: "", len, op->digest, NULL, EVP_sha256(), NULL) != 1) {
                free(op);
                return openssl_errno(-EIO);
        }
        op->k = k;
        op->prio = prio;
        op->done = done;
        op->userdata = userdata;
        op->state = OP_QUEUED;
        *k->queue_tail[prio] = op;
        k->queue_tail[prio] = &op->next;
        k->n_queued++;
        kick(k);
        *ret = op;
        return 0;
}

struct hubkey_op *hubkey_op_free(struct hubkey_op *op) {
        struct hubkey *k;

        if (!op)
                return NULL;
        k = op->k;
        if (k)
                switch (op->state) {
                case OP_QUEUED:
                        queue_unlink(k, op);
                        break;
                case OP_INFLIGHT:
                        k->inflight = NULL; /* the TPM's answer is read and thrown away */
                        break;
                case OP_FINISHED:
                        k->finished = NULL;
                        kick(k); /* the queue may wait behind it */
                        break;
                case OP_OVER:
                        break;
                }
        OPENSSL_cleanse(op, sizeof *op);
        free(op);
        return NULL;
}

bool hubkey_op_is_queued(const struct hubkey_op *op) {
        return op && op->k && op->state == OP_QUEUED;
}

unsigned hubkey_ops_pending(const struct hubkey *k) {
        if (!k)
                return 0;
        return k->n_queued + (k->busy ? 1 : 0) + (k->finished ? 1 : 0);
}

/* ---- the interface ---- */

int hubkey_open(const struct iothub_conf *c, struct hubkey **ret, char **ret_error) {
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;
        int r;

        if (!c || !ret)
                return -EINVAL;
        k = hubkey_new(c->key.backend);
        if (!k)
                return -ENOMEM;
        switch (c->key.backend) {
        case KEY_BACKEND_TPM:
                r = tpm_open(c, k, ret_error);
                break;
        case KEY_BACKEND_FILE:
                r = file_open(c, k, ret_error);
                break;
        default:
                r = set_error_message(ret_error, -EINVAL, "unknown [key] backend");
        }
        if (r < 0)
                return r;
        *ret = TAKE_PTR(k);
        return 0;
}

int hubkey_init(const struct iothub_conf *c, bool *ret_created, char **ret_error) {
        bool created = false;
        int r;

        if (!c)
                return -EINVAL;
        switch (c->key.backend) {
        case KEY_BACKEND_TPM:
                r = tpm_init(c, &created, ret_error);
                break;
        case KEY_BACKEND_FILE:
                r = file_init(c, &created, ret_error);
                break;
        default:
                r = set_error_message(ret_error, -EINVAL, "unknown [key] backend");
        }
        if (r < 0)
                return r;
        if (ret_created)
                *ret_created = created;
        return 0;
}

const char *hubkey_last_error(const struct hubkey *k) {
        return k ? k->error : NULL;
}

int hubkey_sign_digest(struct hubkey *k, const uint8_t digest[32], uint8_t ret_sig[HUBKEY_SIG_LEN]) {
        uint8_t sig[HUBKEY_SIG_LEN];
        int r;

        if (!k || !digest || !ret_sig)
                return -EINVAL;
        if (k->backend == KEY_BACKEND_TPM)
                r = tpm_sign(k, digest, sig);
        else
                r = file_sign(k, digest, sig);
        if (r < 0)
                return r;
        memcpy(ret_sig, sig, sizeof sig);
        k->signatures++;
        return 0;
}

int hubkey_sign(struct hubkey *k, const void *msg, size_t len, uint8_t ret_sig[HUBKEY_SIG_LEN]) {
        uint8_t md[SHA256_LEN];

        if (!k || (!msg && len > 0) || !ret_sig)
                return -EINVAL;
        if (EVP_Digest(msg ?: "", len, md, NULL, EVP_sha256(), NULL) != 1)
                return openssl_errno(-EIO);
        return hubkey_sign_digest(k, md, ret_sig);
}

/* ---- sealing: the interface ---- */

int hubkey_seal(struct hubkey *k, const uint8_t *secret, size_t len, uint8_t **ret_blob, size_t *ret_blob_len) {
        uint8_t *blob;

        if (!k || !secret || len == 0 || !ret_blob || !ret_blob_len)
                return -EINVAL;
        if (len > HUBKEY_SEAL_MAX)
                return -EMSGSIZE;
        if (k->backend == KEY_BACKEND_TPM)
                return tpm_seal(k, secret, len, ret_blob, ret_blob_len);

        /* file: the "blob" is the secret itself, protected by nothing but the file mode. */
        blob = malloc(len);
        if (!blob)
                return -ENOMEM;
        memcpy(blob, secret, len);
        *ret_blob = blob;
        *ret_blob_len = len;
        return 0;
}

int hubkey_unseal(struct hubkey *k, const uint8_t *blob, size_t blob_len, uint8_t **ret_secret,
                  size_t *ret_len) {
        uint8_t *secret;

        if (!k || (!blob && blob_len > 0) || !ret_secret || !ret_len)
                return -EINVAL;
        if (k->backend == KEY_BACKEND_TPM)
                return tpm_unseal(k, blob ?: (const uint8_t *) "", blob_len, ret_secret, ret_len);

        if (blob_len == 0 || blob_len > HUBKEY_SEAL_MAX)
                return -EBADMSG;
        secret = malloc(blob_len);
        if (!secret)
                return -ENOMEM;
        memcpy(secret, blob, blob_len);
        *ret_secret = secret;
        *ret_len = blob_len;
        return 0;
}

/* ---- for attest.c ---- */

int hubkey_tpm_context(struct hubkey *k, ESYS_CONTEXT **ret_esys, uint32_t *ret_key) {
        if (!k || !ret_esys || !ret_key)
                return -EINVAL;
        if (k->backend != KEY_BACKEND_TPM || !k->esys || k->key == ESYS_TR_NONE)
                return -EOPNOTSUPP;
        /* The caller sends commands of its own on the context (attest.c, synchronously, within one
         * callback of the loop): a Sign in flight is collected first, and the queue starts no other
         * before the loop runs again (it is kicked by a deferred source). */
        tpm_drain(k);
        *ret_esys = k->esys;
        *ret_key = k->key;
        return 0;
}

int hubkey_tpm_error(uint32_t rc, char **ret_error, const char *what) {
        return tss2_error(rc, ret_error, "%s", what);
}
