/* SPDX-License-Identifier: MIT */
/* Hub key attestation (PROTOCOL.md 5; the exchange is defined in iothub-protocol(7) "Attestation").
 *
 * The evidence is the Keylime / Azure DPS flow with standard TPM 2.0 commands:
 *   - the EK certificate from its NV index (TCG EK Credential Profile 2.0, 2.2.1.4), which the
 *     cloud chains to the TPM vendor's CA;
 *   - an attestation key (AK): a restricted ECC P-256 signing key, created as a primary key of the
 *     endorsement hierarchy (deterministic: the same template gives the same key until the
 *     endorsement seed changes, so it is never stored, only recreated and flushed);
 *   - TPM2_ActivateCredential (Part 3, 12.5) of the cloud's TPM2_MakeCredential blob: only the TPM
 *     holding the EK's private key can recover the secret, and only for an AK with the name the
 *     cloud bound it to (Part 1, 24 "Credential Protection");
 *   - TPM2_Certify (Part 3, 18.2) of the hub key by the AK, the cloud's nonce as qualifying data: a
 *     TPMS_ATTEST that names the hub key's public area, signed inside the TPM (a restricted key
 *     signs only TPM-made structures, Part 1, "Restricted Signing Key").
 * All commands run on the hub key's ESYS context; every transient object and session is flushed
 * before a function returns (the TPM has few object slots, TESTBED.md). */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include <openssl/crypto.h>

#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>

#include "iothub/attest.h"
#include "iothub/frame.h"
#include "iothub/util.h"

#define NV_CHUNK 512 /* TPM2_NV_Read size per command: at most MAX_NV_BUFFER_SIZE, which is >= 512 on PC TPMs */
#define PUBLIC_MAX sizeof(TPM2B_PUBLIC)

struct attest {
        uint8_t *ek_cert;
        size_t ek_cert_len;
        uint8_t ak_public[PUBLIC_MAX]; /* TPM2B_PUBLIC, marshalled */
        size_t ak_public_len;
        TPM2B_NAME ak_name; /* to check that attest_answer() recreated the same AK */
};

static void esys_freep(void *p) {
        Esys_Free(*(void **) p);
}
#define _cleanup_esys_ _cleanup_(esys_freep)

static void tpm_flush(ESYS_CONTEXT *esys, ESYS_TR *tr) {
        if (*tr != ESYS_TR_NONE)
                (void) Esys_FlushContext(esys, *tr);
        *tr = ESYS_TR_NONE;
}

static void tpm_close(ESYS_CONTEXT *esys, ESYS_TR *tr) {
        if (*tr != ESYS_TR_NONE)
                (void) Esys_TR_Close(esys, tr);
        *tr = ESYS_TR_NONE;
}

void attest_free(struct attest *a) {
        if (!a)
                return;
        free(a->ek_cert);
        free(a);
}

/* ---- pure parts ---- */

int attest_der_len(const uint8_t *buf, size_t len, size_t *ret) {
        size_t hdr, body = 0;

        /* X.690 8.1.2/8.1.3: one identifier octet (low tag numbers only, as a certificate's
         * SEQUENCE), then a short-form length or 0x8N followed by N length octets. */
        if (!buf || len < 2 || (buf[0] & 0x1f) == 0x1f)
                return -EBADMSG;
        if (buf[1] < 0x80) {
                hdr = 2;
                body = buf[1];
        } else {
                size_t n = buf[1] & 0x7f;

                if (n == 0 || n > 4 || len < 2 + n)
                        return -EBADMSG; /* 0x80: indefinite length, not DER */
                for (size_t i = 0; i < n; i++)
                        body = body << 8 | buf[2 + i];
                hdr = 2 + n;
        }
        if (body > len - hdr)
                return -EBADMSG;
        *ret = hdr + body;
        return 0;
}

static int b64url_member(json_t *o, const char *name, uint8_t *out, size_t min, size_t cap, size_t *ret_len) {
        json_t *v = json_object_get(o, name);
        const char *s;
        ssize_t n;

        if (!json_is_string(v))
                return -EBADMSG;
        s = json_string_value(v);
        if (json_string_length(v) > B64URL_LEN(cap))
                return -EBADMSG;
        n = b64url_decode(s, json_string_length(v), out, cap);
        if (n < 0 || (size_t) n < min)
                return -EBADMSG;
        *ret_len = (size_t) n;
        return 0;
}

int attest_parse_challenge(const char *body, size_t len, struct attest_challenge *ret) {
        struct attest_challenge ch = {};
        json_error_t jerr;
        json_t *o;
        int r = -EBADMSG;

        if (!body || !ret || len == 0 || len > ATTEST_ANSWER_MAX)
                return -EBADMSG;
        o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
        if (!json_is_object(o) || json_object_size(o) != 3)
                goto out;
        /* Sizes: the nonce as the cloud chose it (16..64); a credential of at least the HMAC's
         * TPM2B and a one-octet encrypted TPM2B; an encrypted seed of at least one octet. The TPM
         * checks the rest (Part 3, 12.5.1). */
        if (b64url_member(o, "nonce", ch.nonce, ATTEST_NONCE_MIN, sizeof ch.nonce, &ch.nonce_len) < 0 ||
            b64url_member(o, "credential", ch.credential, 5, sizeof ch.credential, &ch.credential_len) < 0 ||
            b64url_member(o, "secret", ch.secret, 1, sizeof ch.secret, &ch.secret_len) < 0)
                goto out;
        *ret = ch;
        r = 0;
out:
        json_decref(o);
        return r;
}

static int json_set_b64url(json_t *o, const char *name, const uint8_t *data, size_t len) {
        _cleanup_free_ char *s = malloc(B64URL_BUF(len));

        if (!s)
                return -ENOMEM;
        (void) b64url_encode(data, len, s);
        return json_object_set_new(o, name, json_string(s)) < 0 ? -ENOMEM : 0;
}

int attest_challenge_json(const struct attest *a, json_t *o) {
        int r;

        if (!a || !o)
                return -EINVAL;
        r = json_set_b64url(o, "ek_cert", a->ek_cert, a->ek_cert_len);
        if (r < 0)
                return r;
        return json_set_b64url(o, "ak_public", a->ak_public, a->ak_public_len);
}

/* ---- templates ---- */

/* TCG EK Credential Profile 2.0, B.3.3 "Template L-1": the default RSA 2048 EK. Its policy is
 * PolicySecret(TPM_RH_ENDORSEMENT) (B.3.3 note, the digest below), so using it needs a policy
 * session (attest_answer). unique: 256 zero octets (B.3.3). */
static const TPM2B_PUBLIC ek_rsa_template = {
        .publicArea = {
                .type = TPM2_ALG_RSA,
                .nameAlg = TPM2_ALG_SHA256,
                .objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                    TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_ADMINWITHPOLICY |
                                    TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT,
                .authPolicy = {
                        .size = 32,
                        .buffer = { 0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xB3, 0xF8, 0x1A, 0x90, 0xCC,
                                    0x8D, 0x46, 0xA5, 0xD7, 0x24, 0xFD, 0x52, 0xD7, 0x6E, 0x06, 0x52,
                                    0x0B, 0x64, 0xF2, 0xA1, 0xDA, 0x1B, 0x33, 0x14, 0x69, 0xAA },
                },
                .parameters.rsaDetail = {
                        .symmetric = {
                                .algorithm = TPM2_ALG_AES,
                                .keyBits.aes = 128,
                                .mode.aes = TPM2_ALG_CFB,
                        },
                        .scheme.scheme = TPM2_ALG_NULL,
                        .keyBits = 2048,
                        .exponent = 0,
                },
                .unique.rsa.size = 256,
        },
};

/* The AK: restricted, sign-only ECC P-256 with ECDSA/SHA-256, generated in and bound to this TPM.
 * Restricted: it signs only digests the TPM computed itself over structures that begin with
 * TPM_GENERATED_VALUE, so that nobody can make it sign a forged TPMS_ATTEST (Part 1, 25.3 and
 * Part 3, 20.2). Its empty authValue guards nothing against a dictionary attack: noDA, as the
 * hub key. */
static const TPM2B_PUBLIC ak_template = {
        .publicArea = {
                .type = TPM2_ALG_ECC,
                .nameAlg = TPM2_ALG_SHA256,
                .objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                    TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                                    TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_NODA,
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

/* ---- TPM steps ---- */

/* Reads the EK certificate (DER) from its NV index, trimmed to the certificate's own length. The
 * index is readable with its empty authValue (TCG EK Credential Profile 2.0, 2.2.1.5: AUTHREAD,
 * no password). */
static int read_ek_cert(ESYS_CONTEXT *esys, uint8_t **ret, size_t *ret_len, char **ret_error) {
        _cleanup_esys_ TPM2B_NV_PUBLIC *nvpub = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        ESYS_TR nv = ESYS_TR_NONE;
        size_t size, len;
        TSS2_RC rc;
        int r;

        r = hubkey_tpm_handle_exists(esys, ATTEST_EK_CERT_NV_RSA, ret_error);
        if (r < 0)
                return r;
        if (r == 0)
                return set_error_message(ret_error, -ENOENT,
                                         "the TPM has no EK certificate (NV index 0x%08" PRIx32 ")",
                                         ATTEST_EK_CERT_NV_RSA);
        rc = Esys_TR_FromTPMPublic(esys, ATTEST_EK_CERT_NV_RSA, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &nv);
        if (rc != TSS2_RC_SUCCESS)
                return hubkey_tpm_error(rc, ret_error, "opening the EK certificate's NV index");
        rc = Esys_NV_ReadPublic(esys, nv, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &nvpub, NULL);
        if (rc != TSS2_RC_SUCCESS) {
                r = hubkey_tpm_error(rc, ret_error, "reading the EK certificate's NV index");
                goto out;
        }
        size = nvpub->nvPublic.dataSize;
        if (size == 0 || size > ATTEST_EK_CERT_MAX) {
                r = set_error_message(ret_error, -EBADMSG, "the EK certificate's NV index has %zu bytes", size);
                goto out;
        }
        buf = malloc(size);
        if (!buf) {
                r = -ENOMEM;
                goto out;
        }
        for (size_t off = 0; off < size;) {
                _cleanup_esys_ TPM2B_MAX_NV_BUFFER *data = NULL;
                uint16_t n = (uint16_t) (size - off < NV_CHUNK ? size - off : NV_CHUNK);

                rc = Esys_NV_Read(esys, nv, nv, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, n, (uint16_t) off,
                                  &data);
                if (rc != TSS2_RC_SUCCESS) {
                        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees buf */
                        r = hubkey_tpm_error(rc, ret_error, "reading the EK certificate");
                        goto out;
                }
                if (data->size != n) {
                        r = set_error_message(ret_error, -EBADMSG, "the TPM returned a short NV read");
                        goto out;
                }
                memcpy(buf + off, data->buffer, n);
                off += n;
        }
        r = attest_der_len(buf, size, &len);
        if (r < 0) {
                r = set_error_message(ret_error, r, "the EK certificate's NV index holds no DER certificate");
                goto out;
        }
        *ret = TAKE_PTR(buf);
        *ret_len = len;
        r = 0;
out:
        tpm_close(esys, &nv);
        return r;
}

/* Whether a public area is an EK from ek_rsa_template (the unique field aside, which only the TPM
 * can reproduce). */
static bool ek_public_matches(const TPMT_PUBLIC *p) {
        const TPMT_PUBLIC *t = &ek_rsa_template.publicArea;
        const TPMS_RSA_PARMS *e = &p->parameters.rsaDetail, *te = &t->parameters.rsaDetail;

        return p->type == t->type && p->nameAlg == t->nameAlg && p->objectAttributes == t->objectAttributes &&
               p->authPolicy.size == t->authPolicy.size &&
               memcmp(p->authPolicy.buffer, t->authPolicy.buffer, t->authPolicy.size) == 0 &&
               e->symmetric.algorithm == te->symmetric.algorithm &&
               e->symmetric.keyBits.aes == te->symmetric.keyBits.aes &&
               e->symmetric.mode.aes == te->symmetric.mode.aes && e->scheme.scheme == te->scheme.scheme &&
               e->keyBits == te->keyBits && (e->exponent == 0 || e->exponent == 65537);
}

/* The EK: the persistent one that provisioning left at ATTEST_EK_HANDLE_RSA (no CreatePrimary, which
 * takes a chip seconds for RSA), else the same key created from the template. *ret_flush: the
 * caller flushes it (else closes the ESYS_TR). */
static int ek_open(ESYS_CONTEXT *esys, ESYS_TR *ret, bool *ret_flush, char **ret_error) {
        const TPM2B_SENSITIVE_CREATE no_auth = {};
        const TPM2B_DATA no_outside_info = {};
        const TPML_PCR_SELECTION no_pcrs = {};
        ESYS_TR tr = ESYS_TR_NONE;
        TSS2_RC rc;
        int r;

        r = hubkey_tpm_handle_exists(esys, ATTEST_EK_HANDLE_RSA, ret_error);
        if (r < 0)
                return r;
        if (r > 0) {
                _cleanup_esys_ TPM2B_PUBLIC *pub = NULL;

                rc = Esys_TR_FromTPMPublic(esys, ATTEST_EK_HANDLE_RSA, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                           &tr);
                if (rc != TSS2_RC_SUCCESS)
                        return hubkey_tpm_error(rc, ret_error, "opening the persistent EK");
                rc = Esys_ReadPublic(esys, tr, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub, NULL, NULL);
                if (rc == TSS2_RC_SUCCESS && ek_public_matches(&pub->publicArea)) {
                        *ret = tr;
                        *ret_flush = false;
                        return 0;
                }
                tpm_close(esys, &tr); /* another kind of key there: derive the EK instead */
        }
        /* Endorsement authorization: empty, as TPMs are shipped. */
        rc = Esys_CreatePrimary(esys, ESYS_TR_RH_ENDORSEMENT, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                                &no_auth, &ek_rsa_template, &no_outside_info, &no_pcrs, &tr, NULL, NULL, NULL,
                                NULL);
        if (rc != TSS2_RC_SUCCESS)
                return hubkey_tpm_error(rc, ret_error, "creating the endorsement key");
        *ret = tr;
        *ret_flush = true;
        return 0;
}

/* Creates the AK (the caller flushes it) and returns its public area, marshalled, and its name. */
static int ak_create(ESYS_CONTEXT *esys, ESYS_TR *ret, uint8_t ret_public[PUBLIC_MAX], size_t *ret_public_len,
                     TPM2B_NAME *ret_name, char **ret_error) {
        _cleanup_esys_ TPM2B_PUBLIC *pub = NULL;
        _cleanup_esys_ TPM2B_NAME *name = NULL;
        const TPM2B_SENSITIVE_CREATE no_auth = {};
        const TPM2B_DATA no_outside_info = {};
        const TPML_PCR_SELECTION no_pcrs = {};
        ESYS_TR tr = ESYS_TR_NONE;
        size_t off = 0;
        TSS2_RC rc;
        int r;

        rc = Esys_CreatePrimary(esys, ESYS_TR_RH_ENDORSEMENT, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                                &no_auth, &ak_template, &no_outside_info, &no_pcrs, &tr, &pub, NULL, NULL, NULL);
        if (rc != TSS2_RC_SUCCESS)
                return hubkey_tpm_error(rc, ret_error, "creating the attestation key");
        rc = Esys_TR_GetName(esys, tr, &name);
        if (rc == TSS2_RC_SUCCESS)
                rc = Tss2_MU_TPM2B_PUBLIC_Marshal(pub, ret_public, PUBLIC_MAX, &off);
        if (rc != TSS2_RC_SUCCESS) {
                r = hubkey_tpm_error(rc, ret_error, "reading the attestation key");
                tpm_flush(esys, &tr);
                return r;
        }
        *ret = tr;
        *ret_public_len = off;
        *ret_name = *name;
        return 0;
}

int attest_begin(struct hubkey *k, struct attest **ret, char **ret_error) {
        _cleanup_(attest_freep) struct attest *a = NULL;
        ESYS_CONTEXT *esys;
        ESYS_TR ak = ESYS_TR_NONE;
        uint32_t key;
        int r;

        if (!k || !ret)
                return -EINVAL;
        r = hubkey_tpm_context(k, &esys, &key);
        if (r < 0)
                return set_error_message(ret_error, r, "the hub key is not in a TPM ([key] backend = file)");
        a = calloc(1, sizeof *a);
        if (!a)
                return -ENOMEM;
        r = read_ek_cert(esys, &a->ek_cert, &a->ek_cert_len, ret_error);
        if (r < 0)
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees a */
                return r;
        r = ak_create(esys, &ak, a->ak_public, &a->ak_public_len, &a->ak_name, ret_error);
        if (r < 0)
                return r;
        tpm_flush(esys, &ak); /* recreated, the same key, by attest_answer() */
        *ret = TAKE_PTR(a);
        return 0;
}

/* A policy session satisfying the EK's policy, PolicySecret(TPM_RH_ENDORSEMENT) (Part 3, 23.4), with
 * the endorsement hierarchy's empty authValue. */
static int ek_policy_session(ESYS_CONTEXT *esys, ESYS_TR *ret, char **ret_error) {
        const TPMT_SYM_DEF no_sym = { .algorithm = TPM2_ALG_NULL };
        const TPM2B_NONCE no_nonce = {}, no_ref = {};
        const TPM2B_DIGEST no_cphash = {};
        ESYS_TR s = ESYS_TR_NONE;
        TSS2_RC rc;
        int r;

        rc = Esys_StartAuthSession(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, NULL,
                                   TPM2_SE_POLICY, &no_sym, TPM2_ALG_SHA256, &s);
        if (rc != TSS2_RC_SUCCESS)
                return hubkey_tpm_error(rc, ret_error, "starting a policy session for the EK");
        rc = Esys_PolicySecret(esys, ESYS_TR_RH_ENDORSEMENT, s, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                               &no_nonce, &no_cphash, &no_ref, 0, NULL, NULL);
        if (rc != TSS2_RC_SUCCESS) {
                r = hubkey_tpm_error(rc, ret_error, "satisfying the EK's policy (PolicySecret, endorsement)");
                tpm_flush(esys, &s);
                return r;
        }
        *ret = s;
        return 0;
}

static int json_set_marshalled_public(json_t *o, const char *name, const TPM2B_PUBLIC *pub) {
        uint8_t buf[PUBLIC_MAX];
        size_t off = 0;

        if (Tss2_MU_TPM2B_PUBLIC_Marshal(pub, buf, sizeof buf, &off) != TSS2_RC_SUCCESS)
                return -EINVAL;
        return json_set_b64url(o, name, buf, off);
}

int attest_answer(struct attest *a, struct hubkey *k, const struct attest_challenge *ch, json_t **ret,
                  char **ret_error) {
        _cleanup_esys_ TPM2B_DIGEST *secret = NULL;
        _cleanup_esys_ TPM2B_ATTEST *info = NULL;
        _cleanup_esys_ TPMT_SIGNATURE *sig = NULL;
        _cleanup_esys_ TPM2B_PUBLIC *key_pub = NULL;
        ESYS_TR ek = ESYS_TR_NONE, ak = ESYS_TR_NONE, session = ESYS_TR_NONE;
        const TPMT_SIG_SCHEME ak_scheme = { .scheme = TPM2_ALG_NULL }; /* the AK's own: ECDSA/SHA-256 */
        uint8_t ak_public[PUBLIC_MAX], sigbuf[sizeof(TPMT_SIGNATURE)];
        TPM2B_ENCRYPTED_SECRET enc = {};
        TPM2B_ID_OBJECT blob = {};
        TPM2B_DATA nonce = {};
        size_t ak_public_len = 0, sig_len = 0;
        TPM2B_NAME ak_name = {};
        bool flush_ek = false;
        ESYS_CONTEXT *esys;
        uint32_t key;
        json_t *o = NULL;
        TSS2_RC rc;
        int r;

        if (!a || !k || !ch || !ret)
                return -EINVAL;
        if (ch->credential_len > sizeof blob.credential || ch->secret_len > sizeof enc.secret ||
            ch->nonce_len > sizeof nonce.buffer)
                return -EBADMSG;
        r = hubkey_tpm_context(k, &esys, &key);
        if (r < 0)
                return set_error_message(ret_error, r, "the hub key is not in a TPM");
        blob.size = (uint16_t) ch->credential_len;
        memcpy(blob.credential, ch->credential, ch->credential_len);
        enc.size = (uint16_t) ch->secret_len;
        memcpy(enc.secret, ch->secret, ch->secret_len);
        nonce.size = (uint16_t) ch->nonce_len;
        memcpy(nonce.buffer, ch->nonce, ch->nonce_len);

        r = ak_create(esys, &ak, ak_public, &ak_public_len, &ak_name, ret_error);
        if (r < 0)
                goto out;
        /* The credential is bound to the AK's name: a changed endorsement seed (TPM2_Clear of the
         * endorsement hierarchy) between the two steps would make another AK. */
        if (ak_name.size != a->ak_name.size || memcmp(ak_name.name, a->ak_name.name, ak_name.size) != 0) {
                r = set_error_message(ret_error, -ESTALE, "the attestation key changed during the registration");
                goto out;
        }
        r = ek_open(esys, &ek, &flush_ek, ret_error);
        if (r < 0)
                goto out;
        r = ek_policy_session(esys, &session, ret_error);
        if (r < 0)
                goto out;
        /* Part 3, 12.5: the AK (ADMIN role, its authValue) and the EK (USER role, the policy). */
        rc = Esys_ActivateCredential(esys, ak, ek, ESYS_TR_PASSWORD, session, ESYS_TR_NONE, &blob, &enc, &secret);
        tpm_flush(esys, &session);
        if (rc != TSS2_RC_SUCCESS) {
                r = hubkey_tpm_error(rc, ret_error, "activating the cloud's credential");
                /* TPM_RC_INTEGRITY, _VALUE, _SIZE, _FAILURE on the blob or seed: the credential was made
                 * for another EK or another AK (Part 3, 12.5.1), not a fault of this TPM. */
                if (r == -EIO || r == -ENOKEY || r == -EINVAL)
                        r = -ENOKEY;
                goto out;
        }
        /* Part 3, 18.2: the hub key (objectHandle, its authValue) certified by the AK. */
        rc = Esys_Certify(esys, key, ak, ESYS_TR_PASSWORD, ESYS_TR_PASSWORD, ESYS_TR_NONE, &nonce, &ak_scheme,
                          &info, &sig);
        if (rc != TSS2_RC_SUCCESS) {
                r = hubkey_tpm_error(rc, ret_error, "certifying the hub key with the attestation key");
                goto out;
        }
        rc = Esys_ReadPublic(esys, key, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &key_pub, NULL, NULL);
        if (rc == TSS2_RC_SUCCESS)
                rc = Tss2_MU_TPMT_SIGNATURE_Marshal(sig, sigbuf, sizeof sigbuf, &sig_len);
        if (rc != TSS2_RC_SUCCESS) {
                r = hubkey_tpm_error(rc, ret_error, "reading the hub key's public area");
                goto out;
        }

        o = json_object();
        if (!o) {
                r = -ENOMEM;
                goto out;
        }
        if ((r = json_set_b64url(o, "nonce", ch->nonce, ch->nonce_len)) < 0 ||
            (r = json_set_b64url(o, "ek_cert", a->ek_cert, a->ek_cert_len)) < 0 ||
            (r = json_set_b64url(o, "ak_public", ak_public, ak_public_len)) < 0 ||
            (r = json_set_b64url(o, "secret", secret->buffer, secret->size)) < 0 ||
            (r = json_set_b64url(o, "certify_info", info->attestationData, info->size)) < 0 ||
            (r = json_set_b64url(o, "certify_sig", sigbuf, sig_len)) < 0 ||
            (r = json_set_marshalled_public(o, "key_public", key_pub)) < 0)
                goto out;
        *ret = TAKE_PTR(o);
        r = 0;
out:
        json_decref(o);
        if (secret)
                OPENSSL_cleanse(secret, sizeof *secret);
        tpm_flush(esys, &session);
        tpm_flush(esys, &ak);
        if (flush_ek)
                tpm_flush(esys, &ek);
        else
                tpm_close(esys, &ek);
        return r;
}
