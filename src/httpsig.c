/* SPDX-License-Identifier: MIT */
/* HTTP Message Signatures (RFC 9421) by the hub key over every hub -> cloud request, and the
 * Content-Digest (RFC 9530) of its body, exactly as PROTOCOL.md section 3 lays them out:
 *   Content-Digest: sha-256=:<b64>:
 *   Signature-Input: hub=("@method" "@target-uri" "content-digest" "authorization");created=..;
 *                    expires=..;nonce="..";keyid="..";alg="ecdsa-p256-sha256"
 *   Signature: hub=:<b64 r||s>:
 * No I/O apart from the random nonce and the one hub key signature per request.
 *
 * Every component value ends up both in the signature base and, through the caller, on the wire,
 * so anything that could split a header line (CR, LF; NUL cannot get past a C string) or that
 * the US-ASCII signature base cannot carry is refused rather than escaped or folded. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>

#include "iothub/frame.h"
#include "iothub/httpsig.h"
#include "iothub/util.h"

#define HTTPSIG_ALG "ecdsa-p256-sha256" /* RFC 9421 3.3.4 */
#define SHA256_LEN 32
#define NONCE_B64_MAX B64URL_BUF(HTTPSIG_NONCE_BYTES) /* what b64url_encode() needs */

/* Named limits. A component value longer than this is refused with -E2BIG: the longest one is the
 * access token in Authorization, which comes from the authorization server. */
#define HTTPSIG_VALUE_MAX 16384
/* RFC 8941 3.3.1: an sf-integer has at most 15 digits, and created/expires are sf-integers
 * (RFC 9421 2.3). */
#define SF_INTEGER_MAX INT64_C(999999999999999)

/* The covered components, in the one order this profile uses (RFC 9421 2.3: once an order is
 * chosen it does not change), serialized as an Inner List (RFC 8941 4.1.1.1). */
#define COMPONENTS_BODY "(\"@method\" \"@target-uri\" \"content-digest\" \"authorization\")"
#define COMPONENTS_NO_BODY "(\"@method\" \"@target-uri\" \"authorization\")"

#define CONTENT_DIGEST_PREFIX "sha-256=:" /* RFC 9530 2, a Dictionary with one Byte Sequence */
#define SIGNATURE_PREFIX "Signature: " HTTPSIG_LABEL "=:"

static bool is_vchar(char c) {
        return c >= 0x21 && c <= 0x7e;
}

/* RFC 9110 5.6.2: tchar, what a method name is made of (RFC 9110 9.1). */
static bool is_tchar(char c) {
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
                return true;
        return c != '\0' && strchr("!#$%&'*+-.^_`|~", c);
}

static bool is_ows(char c) {
        return c == ' ' || c == '\t';
}

/* RFC 9421 2.2.1: the method, verbatim (method names are case-sensitive, RFC 9110 9.1). */
static int check_method(const char *s) {
        size_t n;

        if (!s)
                return -EINVAL;
        for (n = 0; s[n]; n++) {
                if (!is_tchar(s[n]))
                        return -EINVAL;
                if (n >= HTTPSIG_VALUE_MAX)
                        return -E2BIG;
        }
        return n > 0 ? 0 : -EINVAL;
}

/* RFC 9421 2.2.2: the full target URI, verbatim. A URI (RFC 3986 2) is visible ASCII only, so
 * SP, controls and 8-bit bytes are refused. */
static int check_uri(const char *s) {
        size_t n;

        if (!s)
                return -EINVAL;
        for (n = 0; s[n]; n++) {
                if (!is_vchar(s[n]))
                        return -EINVAL;
                if (n >= HTTPSIG_VALUE_MAX)
                        return -E2BIG;
        }
        return n > 0 ? 0 : -EINVAL;
}

/* RFC 9421 2.1: an HTTP field value with leading and trailing whitespace stripped. What is left
 * must be field-content (RFC 9110 5.5) without obs-text, since the signature base is US-ASCII
 * (RFC 9421 2.5), and without obs-fold, which would take a CR LF. Empty is refused: both fields
 * this profile covers always have a value. Returns the start and length of the stripped value. */
static int check_field(const char *s, const char **ret, size_t *ret_len) {
        size_t n, start, end;

        if (!s)
                return -EINVAL;
        for (n = 0; s[n]; n++) {
                if (!is_vchar(s[n]) && !is_ows(s[n]))
                        return -EINVAL;
                if (n >= HTTPSIG_VALUE_MAX)
                        return -E2BIG;
        }
        for (start = 0; start < n && is_ows(s[start]); start++)
                ;
        for (end = n; end > start && is_ows(s[end - 1]); end--)
                ;
        if (end == start)
                return -EINVAL;
        *ret = s + start;
        *ret_len = end - start;
        return 0;
}

/* RFC 9421 2.3: the @signature-params value must list exactly the components of this base, in
 * this order, followed by nothing or by parameters. */
static int check_params(const char *s, bool has_digest) {
        const char *list = has_digest ? COMPONENTS_BODY : COMPONENTS_NO_BODY;
        size_t n, l = strlen(list);

        if (!s)
                return -EINVAL;
        for (n = 0; s[n]; n++) {
                if (!is_vchar(s[n]) && s[n] != ' ')
                        return -EINVAL;
                if (n >= HTTPSIG_VALUE_MAX)
                        return -E2BIG;
        }
        if (strncmp(s, list, l) != 0 || (s[l] != '\0' && s[l] != ';'))
                return -EINVAL;
        return 0;
}

int httpsig_signature_base(const char *method, const char *target_uri, const char *authorization,
                           const char *content_digest_value, const char *signature_params, char **ret) {
        const char *auth, *digest = NULL;
        size_t auth_len, digest_len = 0;
        char *s;
        int r;

        if (!ret)
                return -EINVAL;
        r = check_method(method);
        if (r < 0)
                return r;
        r = check_uri(target_uri);
        if (r < 0)
                return r;
        r = check_field(authorization, &auth, &auth_len);
        if (r < 0)
                return r;
        if (content_digest_value) {
                r = check_field(content_digest_value, &digest, &digest_len);
                if (r < 0)
                        return r;
        }
        r = check_params(signature_params, content_digest_value != NULL);
        if (r < 0)
                return r;

        /* RFC 9421 2.5: one "<component identifier>: <value>" line per covered component, in the
         * order of the list, each ended by LF; then the "@signature-params" line, not ended. The
         * lengths are bounded by HTTPSIG_VALUE_MAX, so they fit an int. */
        if (digest)
                s = strdup_printf("\"@method\": %s\n"
                                  "\"@target-uri\": %s\n"
                                  "\"content-digest\": %.*s\n"
                                  "\"authorization\": %.*s\n"
                                  "\"@signature-params\": %s",
                                  method, target_uri, (int) digest_len, digest, (int) auth_len, auth,
                                  signature_params);
        else
                s = strdup_printf("\"@method\": %s\n"
                                  "\"@target-uri\": %s\n"
                                  "\"authorization\": %.*s\n"
                                  "\"@signature-params\": %s",
                                  method, target_uri, (int) auth_len, auth, signature_params);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

/* RFC 9530 2 and 5: the Content-Digest value "sha-256=:<standard base64 of SHA-256(body)>:".
 * out needs sizeof(CONTENT_DIGEST_PREFIX) + BASE64_LEN(SHA256_LEN) + 1 bytes. */
static int content_digest_value(const uint8_t *body, size_t len, char *out) {
        uint8_t md[SHA256_LEN];
        size_t p = strlen(CONTENT_DIGEST_PREFIX);

        if (EVP_Digest(body, len, md, NULL, EVP_sha256(), NULL) != 1) {
                /* Nothing in the queue says more than "it failed"; do not leave it for later. */
                ERR_clear_error();
                return -EIO;
        }
        memcpy(out, CONTENT_DIGEST_PREFIX, p);
        p += (size_t) EVP_EncodeBlock((unsigned char *) out + p, md, SHA256_LEN);
        out[p++] = ':';
        out[p] = '\0';
        return 0;
}

/* RFC 9421 2.3: keyid is an sf-string, so it is checked to be what PROTOCOL.md 3 says it is, a
 * base64url SHA-256 thumbprint, before it goes between quotes. */
static bool keyid_is_valid(const char *id) {
        return id && strlen(id) == HUBKEY_ID_LEN && b64url_chars_are_valid(id, HUBKEY_ID_LEN);
}

int httpsig_prepare(struct hubkey *k, const char *method, const char *target_uri, const char *authorization,
                    const uint8_t *body, size_t body_len, int64_t created, struct httpsig_pending *ret) {
        char digest[sizeof(CONTENT_DIGEST_PREFIX) + BASE64_LEN(SHA256_LEN) + 1];
        char nonce_b64[NONCE_B64_MAX];
        uint8_t nonce[HTTPSIG_NONCE_BYTES];
        _cleanup_free_ char *params = NULL, *content_digest = NULL, *signature_input = NULL;
        _cleanup_erase_str_ char *base = NULL; /* carries the access token */
        const char *keyid;
        int r;

        if (!k || !ret)
                return -EINVAL;
        if (!body && body_len > 0)
                return -EINVAL;
        if (created < 0 || created > SF_INTEGER_MAX - HTTPSIG_VALIDITY_S)
                return -ERANGE;
        keyid = hubkey_id(k);
        if (!keyid_is_valid(keyid))
                return -EINVAL;

        /* RFC 9421 2.3: nonce, a fresh random value per signature; base64url keeps it a valid
         * sf-string. */
        r = random_bytes(nonce, sizeof nonce);
        if (r < 0)
                return r;
        b64url_encode(nonce, sizeof nonce, nonce_b64);

        /* RFC 9530 2: with a body, even an empty one, the digest is sent and covered. */
        if (body) {
                r = content_digest_value(body, body_len, digest);
                if (r < 0)
                        return r;
        }

        /* RFC 9421 2.3: the signature parameters, in the order PROTOCOL.md 3 fixes. */
        params = strdup_printf("%s;created=%" PRId64 ";expires=%" PRId64
                               ";nonce=\"%s\";keyid=\"%s\";alg=\"" HTTPSIG_ALG "\"",
                               body ? COMPONENTS_BODY : COMPONENTS_NO_BODY, created,
                               created + HTTPSIG_VALIDITY_S, nonce_b64, keyid);
        if (!params)
                return -ENOMEM;

        /* Checks every component value, before anything is signed. */
        r = httpsig_signature_base(method, target_uri, authorization, body ? digest : NULL, params, &base);
        if (r < 0)
                return r;

        /* Everything that can fail for want of memory is done before the key signs, so that a
         * signature (a TPM operation, counted) is never made for nothing. */
        if (body) {
                content_digest = strdup_printf("Content-Digest: %s", digest);
                if (!content_digest)
                        return -ENOMEM;
        }
        /* RFC 9421 4.1: a Dictionary member, label = the signature parameters. */
        signature_input = strdup_printf("Signature-Input: " HTTPSIG_LABEL "=%s", params);
        if (!signature_input)
                return -ENOMEM;

        size_t base_len = strlen(base);
        *ret = (struct httpsig_pending) {
                .base_len = base_len,
                .base = TAKE_PTR(base),
                .content_digest = TAKE_PTR(content_digest),
                .signature_input = TAKE_PTR(signature_input),
        };
        return 0;
}

int httpsig_complete(struct httpsig_pending *p, const uint8_t sig[HUBKEY_SIG_LEN], struct httpsig_headers *ret) {
        char *signature;
        size_t n;

        if (!p || !p->signature_input || !sig || !ret)
                return -EINVAL;
        signature = malloc(strlen(SIGNATURE_PREFIX) + BASE64_LEN(HUBKEY_SIG_LEN) + 2);
        if (!signature)
                return -ENOMEM;
        /* RFC 9421 4.2: a Dictionary member whose value is a Byte Sequence (RFC 8941 3.3.5),
         * standard base64 between colons. */
        n = strlen(SIGNATURE_PREFIX);
        memcpy(signature, SIGNATURE_PREFIX, n);
        n += (size_t) EVP_EncodeBlock((unsigned char *) signature + n, sig, HUBKEY_SIG_LEN);
        signature[n++] = ':';
        signature[n] = '\0';

        /* Field by field: cppcheck 2.10 cannot parse TAKE_PTR(p->...) inside a compound literal. */
        *ret = (struct httpsig_headers){ .signature = signature };
        ret->content_digest = TAKE_PTR(p->content_digest);
        ret->signature_input = TAKE_PTR(p->signature_input);
        httpsig_pending_done(p);
        return 0;
}

void httpsig_pending_done(struct httpsig_pending *p) {
        if (!p)
                return;
        erase_and_freep_str(&p->base);
        free(p->content_digest);
        free(p->signature_input);
        *p = (struct httpsig_pending) {};
}

int httpsig_sign(struct hubkey *k, const char *method, const char *target_uri, const char *authorization,
                 const uint8_t *body, size_t body_len, int64_t created, struct httpsig_headers *ret) {
        struct httpsig_pending p = {};
        uint8_t sig[HUBKEY_SIG_LEN];
        int r;

        if (!ret)
                return -EINVAL;
        r = httpsig_prepare(k, method, target_uri, authorization, body, body_len, created, &p);
        if (r < 0)
                return r;
        /* RFC 9421 3.3.4: ecdsa-p256-sha256 is ECDSA P-256 over SHA-256 of the signature base,
         * the output r||s, 32 bytes each; hubkey_sign() hashes and signs exactly that way. */
        r = hubkey_sign(k, p.base, p.base_len, sig);
        if (r >= 0)
                r = httpsig_complete(&p, sig, ret);
        httpsig_pending_done(&p);
        return r;
}

void httpsig_headers_done(struct httpsig_headers *h) {
        if (!h)
                return;
        free(h->content_digest);
        free(h->signature_input);
        free(h->signature);
        h->content_digest = h->signature_input = h->signature = NULL;
}
