/* SPDX-License-Identifier: MIT */
/* The user's sign-in (PROTOCOL.md 4). All requests go through http.c on the daemon's loop.
 *
 * - Discovery: <issuer>/.well-known/openid-configuration, falling back to RFC 8414's
 *   <issuer>/.well-known/oauth-authorization-server; the metadata's issuer must be ours
 *   (RFC 8414 3.3), every endpoint https.
 * - Sign-in: the Device Authorization Grant (RFC 8628) for a public client; the token
 *   endpoint is polled at the server's interval, 5 s more on slow_down, twice as long after a
 *   transport failure or a 5xx (3.5), stopping on expired_token, access_denied and on any
 *   answer that cannot get better (a 200 without usable tokens, a body over the limit, a 3xx
 *   or another 4xx).
 * - Tokens live sealed by the TPM (tokenstore.c), are refreshed ahead of expiry, and a new
 *   refresh token from a rotation replaces the old one at once (saved atomically).
 *   invalid_grant means the user must sign in again: uploads wait, frames keep spooling.
 * - DPoP (RFC 9449) with the hub key, on token requests and on every resource request,
 *   with the servers' nonces (section 8 and 9). */
#include <inttypes.h>
#include <stdio.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "iothub/dpop.h"
#include "iothub/frame.h"
#include "iothub/http.h"
#include "iothub/jws.h"
#include "iothub/log.h"
#include "iothub/oauth.h"
#include "iothub/signer.h"
#include "iothub/tokenstore.h"

#include "oauth-internal.h"

#define OAUTH_TIMEOUT_S 30
#define OAUTH_WAITERS_MAX 8
#define OAUTH_REFRESH_REFUSALS_MAX 3 /* 4xx answers to refreshes before login_required */

enum req_kind { R_DISCOVERY, R_DISCOVERY_FALLBACK, R_DEVICE, R_POLL, R_REFRESH, R_REVOKE };

/* One request to the authorization server, owned by its slot in struct oauth (call_slot()): first
 * the signer makes its DPoP proof (proof_op, on the loop: behind a queue of status signatures at a
 * chip's 70 ms each that can take seconds, and the bulb side must not wait for it), then http.c
 * sends it (http). Cancelling it (call_cancel()) ends whichever phase runs; neither calls back. */
struct oauth_call {
        struct oauth *oauth;
        enum req_kind kind;
        const char *method; /* a literal */
        char *url;  /* the endpoint: a resend goes to the same one */
        char *form; /* kept for a resend with a new DPoP nonce; wiped */
        bool nonce_retried;
        bool sent_nonce; /* the proof carried the authorization server's nonce */
        struct signer_op *proof_op;
        struct http_req *http;
};

struct oauth_logout_op {
        struct oauth *oauth;
        void (*done)(void *userdata, int r, const char *message);
        void *userdata;
};

struct waiter {
        void (*done)(void *userdata, int r);
        void *userdata;
};

/* one per process; fields grouped by meaning, not size:
 * NOLINTNEXTLINE(clang-analyzer-optin.performance.Padding) */
struct oauth {
        sd_event *event;
        const struct iothub_conf *conf;
        struct http *http;
        struct signer *signer; /* NULL until hub.c announces the hub key (oauth_key_ready) */
        /* The sealed tokens live with the signer (iothub-signer(8)): the one read at start, and
         * one write (save or erase) at a time, the next one wanted after it. */
        struct signer_op *load_op, *store_op;
        enum { STORE_NONE, STORE_SAVE, STORE_ERASE } store_next;
        struct oauth_events ev;
        enum oauth_state state;
        char last_error[256];

        /* Discovery. */
        bool discovered;
        char *token_endpoint, *device_endpoint, *revocation_endpoint;
        bool use_dpop;
        unsigned failures;
        sd_event_source *timer; /* discovery retry, refresh, refresh retry */

        /* Tokens. */
        struct oauth_tokens tokens;
        bool have_tokens;
        char *as_nonce, *rs_nonce; /* DPoP-Nonce of the authorization and resource servers */
        uint64_t rs_nonce_gen;     /* bumped by every new rs_nonce (set_rs_nonce()) */
        uint64_t dpop_proofs;

        /* Refresh. */
        struct oauth_call *refresh_req;
        bool refresh_for_401;     /* the refresh in flight was asked for by a 401 */
        bool token_from_401;      /* the current access token came from such a refresh */
        unsigned refresh_refusals; /* 4xx answers to refreshes in a row */
        uint64_t token_gen;        /* bumped by every new access token */

        /* The resource server's 401s (oauth_unauthorized). */
        uint64_t resource_401s;
        bool unauthorized_reported; /* logged once until a request succeeds */
        char unauthorized_error[256]; /* shown in the status meanwhile */
        struct waiter waiters[OAUTH_WAITERS_MAX];
        unsigned n_waiters;

        /* Device flow. */
        struct oauth_login_cb login;
        bool login_active;
        char *device_code;
        unsigned interval_s;
        /* CLOCK_MONOTONIC: expires_in is a duration (RFC 8628 3.2), so a step of the wall clock
         * (NTP's first sync, a jump of an hour) must neither end nor stretch it. */
        uint64_t login_deadline_usec;
        struct oauth_call *login_req;
        sd_event_source *poll_timer;

        /* Logout: the revocation runs on even if whoever waits for it goes away. */
        struct oauth_call *revoke_req;
        struct oauth_logout_op *logout_op; /* owned by the waiter; NULL once it went away */

        struct oauth_call *disc_req;
};

const char *oauth_state_to_string(enum oauth_state s) {
        static const char *const names[] = {
                [OAUTH_NOT_CONFIGURED] = "not_configured",
                [OAUTH_LOGIN_REQUIRED] = "login_required",
                [OAUTH_OK] = "ok",
                [OAUTH_REFRESHING] = "refreshing",
        };
        return (unsigned) s < ELEMENTSOF(names) ? names[s] : "?";
}

const char *oauth_last_error(const struct oauth *o) {
        return o && o->last_error[0] ? o->last_error : "no reason given";
}

enum oauth_state oauth_get_state(const struct oauth *o) {
        return o ? o->state : OAUTH_NOT_CONFIGURED;
}

static void set_error(struct oauth *o, const char *fmt, ...) _printf_(2, 3);
static void set_error(struct oauth *o, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(o->last_error, sizeof o->last_error, fmt, ap);
        va_end(ap);
        /* Network text may carry anything: keep one printable line. */
        for (char *p = o->last_error; *p; p++)
                if ((unsigned char) *p < 0x20 || (unsigned char) *p >= 0x7f)
                        *p = '?';
}

static int64_t now_s(void) {
        return (int64_t) (now_realtime_usec() / 1000000);
}

/* RFC 3986 2.3 unreserved characters pass, everything else is %XX (for form bodies). */
static int form_append(char **form, const char *name, const char *value) {
        size_t old = *form ? strlen(*form) : 0, n = strlen(name), v = strlen(value);
        char *t = malloc(old + 1 + n + 1 + 3 * v + 1), *p;

        if (!t)
                return -ENOMEM;
        p = t;
        if (old) {
                memcpy(p, *form, old);
                p += old;
                *p++ = '&';
        }
        memcpy(p, name, n);
        p += n;
        *p++ = '=';
        for (size_t i = 0; i < v; i++) {
                unsigned char ch = (unsigned char) value[i];
                if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                    strchr("-._~", ch))
                        *p++ = (char) ch;
                else {
                        static const char hex[] = "0123456789ABCDEF";
                        *p++ = '%';
                        *p++ = hex[ch >> 4];
                        *p++ = hex[ch & 15];
                }
        }
        *p = '\0';
        if (*form)
                erase_and_free(*form, old);
        *form = t;
        return 0;
}

/* ---- parsers of the authorization server's answers (pure; oauth-internal.h) ---- */

static json_t *load_object(const uint8_t *buf, size_t len) {
        json_error_t jerr;
        json_t *j;

        if (!buf || len == 0 || len > OAUTH_RESPONSE_MAX)
                return NULL;
        j = json_loadb((const char *) buf, len, JSON_REJECT_DUPLICATES, &jerr);
        if (j && !json_is_object(j)) {
                json_decref(j);
                return NULL;
        }
        return j;
}

/* A whole number of seconds (RFC 6749 5.1, RFC 8628 3.2 say "seconds" and JSON has one number
 * type): an integer, or a number written with a zero fraction or an exponent that is exactly one
 * (3600.0, 3.6e3: some servers serialise floats). A fraction (3600.5), a string ("3600") or a
 * number past 2^53, where doubles stop being exact (1e300), is not. */
static bool json_whole_seconds(const json_t *v, json_int_t *ret) {
        if (json_is_integer(v)) {
                *ret = json_integer_value(v);
                return true;
        }
        if (json_is_real(v)) {
                double d = json_real_value(v);
                /* NaN fails both comparisons; jansson never produces one, but the cast would be UB. */
                if (d >= -9007199254740992.0 && d <= 9007199254740992.0 && (double) (json_int_t) d == d) {
                        *ret = (json_int_t) d;
                        return true;
                }
        }
        return false;
}

/* A string member made of printable ASCII (VSCHAR, RFC 6749 A), 1..max bytes; NULL otherwise. */
static const char *get_vschar(json_t *o, const char *name, size_t max) {
        json_t *v = json_object_get(o, name);
        const char *s = json_string_value(v);
        size_t n = json_string_length(v);

        if (!s || n == 0 || n > max || strlen(s) != n)
                return NULL;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char) s[i] < 0x20 || (unsigned char) s[i] > 0x7e)
                        return NULL;
        return s;
}

static bool is_https(const char *s) {
        return s && strncmp(s, "https://", 8) == 0 && !strpbrk(s, " \t\r\n");
}

char *oauth_dpop_htu(const char *url) {
        return dpop_htu(url);
}

void oauth_metadata_done(struct oauth_metadata *m) {
        free(m->token_endpoint);
        free(m->device_endpoint);
        free(m->revocation_endpoint);
        *m = (struct oauth_metadata){};
}

int oauth_parse_metadata(const uint8_t *buf, size_t len, const char *issuer, struct oauth_metadata *ret) {
        _cleanup_(json_decrefp) json_t *j = load_object(buf, len);
        struct oauth_metadata m = {};
        const char *te, *de, *re;
        json_t *algs, *v;
        size_t i;

        if (!j)
                return -EBADMSG;
        te = get_vschar(j, "token_endpoint", OAUTH_URI_MAX);
        de = get_vschar(j, "device_authorization_endpoint", OAUTH_URI_MAX);
        re = get_vschar(j, "revocation_endpoint", OAUTH_URI_MAX);
        /* RFC 8414 3.3: the issuer in the metadata is exactly the one we asked. */
        if (!streq_ptr(json_string_value(json_object_get(j, "issuer")), issuer) || !is_https(te) ||
            !is_https(de))
                return -EBADMSG;
        /* A revocation endpoint we cannot use is no revocation endpoint, not an error. */
        if (json_object_get(j, "revocation_endpoint") && !is_https(re))
                return -EBADMSG;
        algs = json_object_get(j, "dpop_signing_alg_values_supported");
        if (algs && !json_is_array(algs))
                return -EBADMSG;
        json_array_foreach(algs, i, v) if (streq_ptr(json_string_value(v), "ES256")) m.dpop_es256 = true;
        m.token_endpoint = strdup(te);
        m.device_endpoint = strdup(de);
        m.revocation_endpoint = re ? strdup(re) : NULL;
        if (!m.token_endpoint || !m.device_endpoint || (re && !m.revocation_endpoint)) {
                oauth_metadata_done(&m);
                return -ENOMEM;
        }
        *ret = m;
        return 0;
}

void oauth_device_answer_done(struct oauth_device_answer *d) {
        if (d->device_code)
                erase_and_free(d->device_code, strlen(d->device_code));
        free(d->user_code);
        free(d->verification_uri);
        free(d->verification_uri_complete);
        *d = (struct oauth_device_answer){};
}

int oauth_parse_device_answer(const uint8_t *buf, size_t len, struct oauth_device_answer *ret) {
        _cleanup_(json_decrefp) json_t *j = load_object(buf, len);
        struct oauth_device_answer d = {};
        const char *dc, *uc, *vu, *vc;
        json_t *ei, *iv;
        json_int_t e, n;

        if (!j)
                return -EBADMSG;
        dc = get_vschar(j, "device_code", OAUTH_TOKEN_MAX);
        uc = get_vschar(j, "user_code", OAUTH_USER_CODE_MAX);
        vu = get_vschar(j, "verification_uri", OAUTH_URI_MAX);
        vc = get_vschar(j, "verification_uri_complete", OAUTH_URI_MAX);
        ei = json_object_get(j, "expires_in");
        iv = json_object_get(j, "interval");
        n = OAUTH_INTERVAL_DEFAULT_S;
        if (!dc || !uc || !vu || (json_object_get(j, "verification_uri_complete") && !vc) ||
            !json_whole_seconds(ei, &e) || (iv && !json_whole_seconds(iv, &n)))
                return -EBADMSG;
        /* RFC 8628 3.2: expires_in is the lifetime of the codes; a code that is already dead is
         * an error, one that lives longer than we wait for a user is cut short. */
        if (e <= 0)
                return -EBADMSG;
        d.expires_in = e > OAUTH_DEVICE_EXPIRES_MAX_S ? OAUTH_DEVICE_EXPIRES_MAX_S : e;
        d.interval_s = n < 1 ? 1 : n > OAUTH_INTERVAL_MAX_S ? OAUTH_INTERVAL_MAX_S : (unsigned) n;
        d.device_code = strdup(dc);
        d.user_code = strdup(uc);
        d.verification_uri = strdup(vu);
        d.verification_uri_complete = vc ? strdup(vc) : NULL;
        if (!d.device_code || !d.user_code || !d.verification_uri || (vc && !d.verification_uri_complete)) {
                oauth_device_answer_done(&d);
                return -ENOMEM;
        }
        *ret = d;
        return 0;
}

void oauth_token_answer_done(struct oauth_token_answer *t) {
        if (t->access_token)
                erase_and_free(t->access_token, strlen(t->access_token));
        if (t->refresh_token)
                erase_and_free(t->refresh_token, strlen(t->refresh_token));
        free(t->token_type);
        free(t->scope);
        *t = (struct oauth_token_answer){};
}

/* oauth_parse_token_answer()'s refusal: why, never quoting the answer. */
static int token_answer_refused(const char **ret_why, const char *why) {
        if (ret_why)
                *ret_why = why;
        return -EBADMSG;
}

int oauth_parse_token_answer(const uint8_t *buf, size_t len, struct oauth_token_answer *ret, const char **ret_why) {
        _cleanup_(json_decrefp) json_t *j = load_object(buf, len);
        struct oauth_token_answer t = {};
        const char *at, *tt, *rt, *scope;
        json_t *ei;

        if (!j)
                return token_answer_refused(ret_why, "not a JSON object of at most 64 KiB (or nested too deep)");
        at = get_vschar(j, "access_token", OAUTH_TOKEN_MAX);
        tt = json_string_value(json_object_get(j, "token_type"));
        rt = get_vschar(j, "refresh_token", OAUTH_TOKEN_MAX);
        scope = get_vschar(j, "scope", OAUTH_SCOPE_MAX);
        ei = json_object_get(j, "expires_in");
        /* RFC 6750 2.1: the token goes into "Authorization: Bearer <b64token>" (and DPoP's
         * header alike, RFC 9449 7.1): anything else, CR and LF above all, is refused here
         * rather than failing every request after it was stored. */
        if (!at || !b64token_is_valid(at, strlen(at)))
                return token_answer_refused(ret_why, "access_token missing, over 4096 bytes or not an RFC 6750 b64token");
        /* RFC 6749 5.1: token_type is case insensitive. */
        if (!tt || (strcasecmp(tt, "Bearer") != 0 && strcasecmp(tt, "DPoP") != 0))
                return token_answer_refused(ret_why, "token_type neither Bearer nor DPoP");
        if ((json_object_get(j, "refresh_token") && !rt) || (json_object_get(j, "scope") && !scope))
                return token_answer_refused(ret_why, "refresh_token or scope not printable ASCII of bounded length");
        /* RFC 6749 5.1: a number of seconds (json_whole_seconds()); a whole one out of range is
         * clamped below. */
        json_int_t e = 0;
        if (ei && !json_whole_seconds(ei, &e))
                return token_answer_refused(ret_why, "expires_in not a whole number of seconds");
        if (ei) {
                t.expires_in = e < OAUTH_EXPIRES_IN_MIN_S   ? OAUTH_EXPIRES_IN_MIN_S
                               : e > OAUTH_EXPIRES_IN_MAX_S ? OAUTH_EXPIRES_IN_MAX_S
                                                            : (int64_t) e;
        }
        t.access_token = strdup(at);
        t.token_type = strdup(strcasecmp(tt, "DPoP") == 0 ? "DPoP" : "Bearer");
        t.refresh_token = rt ? strdup(rt) : NULL;
        t.scope = scope ? strdup(scope) : NULL;
        if (!t.access_token || !t.token_type || (rt && !t.refresh_token) || (scope && !t.scope)) {
                oauth_token_answer_done(&t);
                return -ENOMEM;
        }
        *ret = t;
        return 0;
}

/* RFC 6749 5.2: error = 1*( %x20-21 / %x23-5B / %x5D-7E ) */
static bool is_error_code(const char *s, size_t n) {
        if (n == 0)
                return false;
        for (size_t i = 0; i < n; i++) {
                unsigned char ch = (unsigned char) s[i];
                if (ch < 0x20 || ch > 0x7e || ch == '"' || ch == '\\')
                        return false;
        }
        return true;
}

int oauth_parse_error(const uint8_t *buf, size_t len, char *ret, size_t cap) {
        _cleanup_(json_decrefp) json_t *j = load_object(buf, len);
        json_t *v = json_object_get(j, "error");
        const char *e = json_string_value(v);
        size_t n = json_string_length(v);

        if (!e)
                return -ENOENT;
        if (n > OAUTH_ERROR_CODE_MAX || n + 1 > cap || strlen(e) != n || !is_error_code(e, n))
                return -EBADMSG;
        memcpy(ret, e, n + 1);
        return 0;
}

/* RFC 9110 11.6.1 challenges: auth-scheme [ 1*SP ( token68 / #auth-param ) ], comma-separated;
 * auth-param = token BWS "=" BWS ( token / quoted-string ). Good enough to find the error
 * parameter of a DPoP or Bearer challenge among others, and bounded by len. */
static bool is_tchar(char ch) {
        return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
               (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

int oauth_parse_www_authenticate(const char *value, size_t len, char *ret, size_t cap) {
        size_t i = 0;
        bool in_ours = false;

        if (!value || cap < 2)
                return -ENOENT;
        while (i < len) {
                size_t ts, te;

                while (i < len && (value[i] == ' ' || value[i] == '\t' || value[i] == ','))
                        i++;
                ts = i;
                while (i < len && is_tchar(value[i]))
                        i++;
                te = i;
                if (te == ts)
                        return -ENOENT; /* not a token where one must be: give up, bounded */
                while (i < len && (value[i] == ' ' || value[i] == '\t'))
                        i++;
                if (i < len && value[i] == '=') {
                        /* auth-param (or token68 padding, skipped the same way) */
                        size_t vs, vn = 0;
                        char v[OAUTH_ERROR_CODE_MAX + 1];
                        bool quoted, too_long = false;

                        i++;
                        while (i < len && value[i] == '=')
                                i++;
                        while (i < len && (value[i] == ' ' || value[i] == '\t'))
                                i++;
                        quoted = i < len && value[i] == '"';
                        if (quoted) {
                                i++;
                                for (;; i++) {
                                        if (i >= len)
                                                return -ENOENT;
                                        if (value[i] == '"')
                                                break;
                                        if (value[i] == '\\' && ++i >= len)
                                                return -ENOENT;
                                        if (vn < OAUTH_ERROR_CODE_MAX)
                                                v[vn++] = value[i];
                                        else
                                                too_long = true;
                                }
                                i++;
                        } else {
                                vs = i;
                                while (i < len && is_tchar(value[i]))
                                        i++;
                                vn = i - vs;
                                if (vn > OAUTH_ERROR_CODE_MAX) {
                                        too_long = true;
                                        vn = 0;
                                } else
                                        memcpy(v, value + vs, vn);
                        }
                        v[vn] = '\0';
                        if (in_ours && te - ts == 5 && strncasecmp(value + ts, "error", 5) == 0) {
                                if (too_long || vn == 0 || vn + 1 > cap || !is_error_code(v, vn))
                                        return -EBADMSG;
                                memcpy(ret, v, vn + 1);
                                return 0;
                        }
                } else {
                        /* A new challenge: its scheme. */
                        in_ours = (te - ts == 4 && strncasecmp(value + ts, "DPoP", 4) == 0) ||
                                  (te - ts == 6 && strncasecmp(value + ts, "Bearer", 6) == 0);
                }
        }
        return -ENOENT;
}

/* ---- requests ---- */

static void on_done(void *userdata, const struct http_response *resp);

static void call_free(struct oauth_call *call) {
        if (!call)
                return;
        call->proof_op = signer_op_free(call->proof_op);
        http_cancel(call->http);
        if (call->form)
                erase_and_free(call->form, strlen(call->form));
        free(call->url);
        free(call);
}

/* Ends a call in whichever phase it is (its proof asked, or its request out) without calling
 * back; NULL accepted. */
static void call_cancel(struct oauth_call *call) {
        call_free(call);
}

/* Each kind of request has its own slot: a resend stays in it (and goes to the same endpoint). */
static struct oauth_call **call_slot(struct oauth *o, enum req_kind kind) {
        switch (kind) {
        case R_DISCOVERY:
        case R_DISCOVERY_FALLBACK:
                return &o->disc_req;
        case R_DEVICE:
        case R_POLL:
                return &o->login_req;
        case R_REFRESH:
                return &o->refresh_req;
        case R_REVOKE:
        default:
                return &o->revoke_req;
        }
}

/* Hands the call to http.c, with its proof header when it has one. */
static int call_launch(struct oauth_call *call, const char *dpop_header) {
        struct oauth *o = call->oauth;
        const char *lines[4];
        size_t n = 0;

        lines[n++] = "Accept: application/json";
        if (call->form)
                lines[n++] = "Content-Type: application/x-www-form-urlencoded";
        if (dpop_header)
                lines[n++] = dpop_header;
        return http_start(o->http,
                          &(struct http_request){ .method = call->method,
                                                  .url = call->url,
                                                  .ca_file = o->conf->oauth.ca_file,
                                                  .timeout_s = OAUTH_TIMEOUT_S,
                                                  .headers = lines,
                                                  .n_headers = n,
                                                  .body = call->form,
                                                  .body_len = call->form ? strlen(call->form) : 0 },
                          on_done, NULL /* the call owns the request, not the reverse */, call, &call->http);
}

/* The signer made the call's DPoP proof (or could not): the request goes now. A failure ends the
 * call as a request that got no answer would (each kind backs off or reports in its own way). */
static void on_proof(void *userdata, int r, const struct signer_reply *p) {
        struct oauth_call *call = userdata;
        _cleanup_erase_str_ char *dpop_header = NULL;
        const char *why;
        char text[320];

        if (r >= 0 && !(p && p->proof))
                r = -EBADMSG;
        if (r >= 0) {
                dpop_header = strdup_printf("DPoP: %s", p->proof);
                if (!dpop_header)
                        r = -ENOMEM;
        }
        call->proof_op = signer_op_free(call->proof_op); /* p lives in it: copied above */
        if (r >= 0) {
                call->oauth->dpop_proofs++;
                r = call_launch(call, dpop_header);
                if (r >= 0)
                        return;
        }
        why = call->oauth->signer ? signer_last_error(call->oauth->signer) : NULL;
        (void) snprintf(text, sizeof text, "no DPoP proof from the signer: %s", why ? why : strerror(-r));
        on_done(call, &(struct http_response){ .error = r, .error_text = text, .body = "", .retry_after = "",
                                               .dpop_nonce = "", .www_authenticate = "" });
}

/* Starts a request of kind (takes form in every case): 0 and the call in *ret (its slot), or a
 * negative errno. With DPoP the proof is asked first, asynchronously; on_done() runs in either
 * case, never from inside this call. */
static int oauth_send(struct oauth *o, enum req_kind kind, const char *method, const char *url, char *form,
                      bool nonce_retried, struct oauth_call **ret) {
        struct oauth_call *call;
        int r;

        call = calloc(1, sizeof *call);
        if (!call) {
                if (form)
                        erase_and_free(form, strlen(form));
                return -ENOMEM;
        }
        call->oauth = o;
        call->kind = kind;
        call->method = method;
        call->form = form;
        call->nonce_retried = nonce_retried;
        call->url = strdup(url);
        if (!call->url) {
                r = -ENOMEM;
                goto fail;
        }
        /* DPoP on the token requests (RFC 9449 5), not on discovery; on revocation only when the
         * server asked for a proof with its nonce (RFC 9449 8). */
        if (o->use_dpop && o->signer &&
            (kind == R_DEVICE || kind == R_POLL || kind == R_REFRESH || (kind == R_REVOKE && nonce_retried))) {
                r = signer_sign_dpop(o->signer, SIGNER_PRIO_HIGH, method, url, NULL, o->as_nonce, on_proof, call, &call->proof_op);
                if (r < 0)
                        goto fail;
                call->sent_nonce = o->as_nonce != NULL;
        } else {
                r = call_launch(call, NULL);
                if (r < 0)
                        goto fail;
        }
        *ret = call;
        return 0;
fail:
        call_free(call);
        return r;
}

/* ---- news for hub.c ---- */

/* The sign-in state or its error changed: STATUS= says so. */
static void status_changed(struct oauth *o) {
        if (o->ev.status_changed)
                o->ev.status_changed(o->ev.userdata);
}

/* Signed in, signed out, sign-in required: reason is a static name. */
static void signin_changed(struct oauth *o, const char *reason) {
        if (o->ev.signin_changed)
                o->ev.signin_changed(o->ev.userdata, reason);
}

/* A new access token: what waited for one (uploads, the command poll) may go. */
static void token_ready(struct oauth *o) {
        if (o->ev.token_ready)
                o->ev.token_ready(o->ev.userdata);
}

/* ---- timers ---- */

static void arm(struct oauth *o, sd_event_source **s, uint64_t delay_usec,
                int (*cb)(sd_event_source *, uint64_t, void *)) {
        int r;

        if (!*s) {
                r = sd_event_add_time_relative(o->event, s, CLOCK_MONOTONIC, delay_usec, 0, cb, o);
        } else {
                uint64_t now;
                (void) sd_event_now(o->event, CLOCK_MONOTONIC, &now);
                r = sd_event_source_set_time(*s, now + delay_usec);
                if (r >= 0)
                        r = sd_event_source_set_enabled(*s, SD_EVENT_ONESHOT);
        }
        if (r < 0)
                log_error_errno(r, "Failed to arm an OAuth timer: %m");
}

/* The project's one exponential backoff with jitter (backoff_ms, util.h), from 2 s (the first
 * failure counts as the second step) to CLOUD_BACKOFF_MAX_MS. */
static uint64_t retry_delay_usec(struct oauth *o) {
        uint32_t rnd = 0;

        (void) random_bytes(&rnd, sizeof rnd);
        return backoff_ms(o->failures + 1, OAUTH_BACKOFF_MIN_MS, OAUTH_BACKOFF_MAX_MS, rnd) * 1000;
}

static int start_discovery(struct oauth *o, bool fallback);
static int start_refresh(struct oauth *o);

static void schedule_refresh(struct oauth *o);

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct oauth *o = userdata;

        if (!o->discovered)
                (void) start_discovery(o, false);
        else if (o->have_tokens && o->tokens.refresh_token && !o->refresh_req)
                (void) start_refresh(o);
        return 0;
}

static void schedule_refresh(struct oauth *o) {
        int64_t lifetime, at, delay;

        if (!o->have_tokens || !o->tokens.refresh_token || o->tokens.expires_at <= 0)
                return;
        /* Ahead of expiry: a tenth of the remaining lifetime, at least the margin, but never
         * more than half of it (short-lived tokens would otherwise be refreshed at once). */
        lifetime = o->tokens.expires_at - now_s();
        int64_t margin = OAUTH_REFRESH_MARGIN_S < lifetime / 2 ? OAUTH_REFRESH_MARGIN_S : lifetime / 2;
        if (lifetime / 10 > margin)
                margin = lifetime / 10;
        at = o->tokens.expires_at - margin;
        delay = at - now_s();
        if (delay < 1)
                delay = 1;
        arm(o, &o->timer, (uint64_t) delay * 1000000, on_timer);
}

/* ---- token responses ---- */

static void notify_waiters(struct oauth *o, int r) {
        struct waiter w[OAUTH_WAITERS_MAX];
        unsigned n = o->n_waiters;

        memcpy(w, o->waiters, sizeof w);
        o->n_waiters = 0;
        for (unsigned i = 0; i < n; i++)
                w[i].done(w[i].userdata, r);
}

static void become_login_required(struct oauth *o, const char *why) {
        bool was = o->state == OAUTH_LOGIN_REQUIRED;

        o->state = OAUTH_LOGIN_REQUIRED;
        if (o->have_tokens) {
                oauth_tokens_done(&o->tokens);
                o->have_tokens = false;
        }
        set_error(o, "sign-in required: %s", why);
        if (!was)
                signin_changed(o, "login_required");
        if (!was)
                log_event(LOG_WARNING, 0, IOTHUB_MID_LOGIN_REQUIRED, NULL, NULL,
                          "Sign-in required (%s): run 'iothubctl login'; frames keep spooling meanwhile", why);
        status_changed(o);
}

static void tokens_store(struct oauth *o, int what);

/* Takes a 200 token response (RFC 6749 5.1), checked by oauth_parse_token_answer(); on
 * -EBADMSG *ret_why says what was wrong with it (never quoting it). */
static int accept_tokens(struct oauth *o, const struct http_response *resp, const char **ret_why) {
        struct oauth_token_answer a = {};
        struct oauth_tokens t = {};
        int r;

        r = oauth_parse_token_answer((const uint8_t *) resp->body, resp->body_len, &a, ret_why);
        if (r < 0)
                return r;
        t.access_token = TAKE_PTR(a.access_token);
        t.token_type = TAKE_PTR(a.token_type);
        t.scope = TAKE_PTR(a.scope);
        /* Rotation: a new refresh token replaces the old; without one the old stays valid. */
        t.refresh_token = a.refresh_token                ? TAKE_PTR(a.refresh_token)
                          : o->tokens.refresh_token ? strdup(o->tokens.refresh_token)
                                                    : NULL;
        /* expires_in is clamped by the parser: no overflow, no refresh every second. */
        t.expires_at = a.expires_in > 0 ? now_s() + a.expires_in : 0;
        oauth_token_answer_done(&a);
        if (o->tokens.refresh_token && !t.refresh_token) {
                oauth_tokens_done(&t);
                return -ENOMEM;
        }
        if (o->have_tokens)
                oauth_tokens_done(&o->tokens);
        o->tokens = t;
        o->have_tokens = true;
        /* Sealed and written by the signer; kept in memory whatever happens there. */
        tokens_store(o, STORE_SAVE);
        o->state = OAUTH_OK;
        o->failures = 0;
        o->refresh_refusals = 0;
        o->token_gen++;
        o->last_error[0] = '\0';
        schedule_refresh(o);
        return 0;
}


/* ---- discovery ---- */

static int start_discovery(struct oauth *o, bool fallback) {
        _cleanup_free_ char *url = NULL;
        const char *issuer = o->conf->oauth.issuer;
        size_t n = strlen(issuer);

        if (o->disc_req)
                return 0;
        /* RFC 8414 3: the well-known path goes after the host, before an issuer path. For the
         * common issuers without a path both forms are the same. */
        while (n > 0 && issuer[n - 1] == '/')
                n--;
        url = strdup_printf("%.*s/.well-known/%s", (int) n, issuer,
                            fallback ? "oauth-authorization-server" : "openid-configuration");
        if (!url)
                return -ENOMEM;
        return oauth_send(o, fallback ? R_DISCOVERY_FALLBACK : R_DISCOVERY, "GET", url, NULL, false, &o->disc_req);
}

static void on_discovery(struct oauth *o, const struct http_response *resp, bool fallback) {
        const char *issuer = o->conf->oauth.issuer;
        struct oauth_metadata m = {};
        int r = -EBADMSG;

        if (resp->error == 0 && resp->status == 404 && !fallback) {
                (void) start_discovery(o, true);
                return;
        }
        if (resp->error == 0 && resp->status == 200)
                r = oauth_parse_metadata((const uint8_t *) resp->body, resp->body_len, issuer, &m);
        if (r < 0) {
                if (resp->error < 0)
                        set_error(o, "discovery at %s failed: %s", issuer, resp->error_text);
                else
                        set_error(o, "discovery at %s: unusable metadata (HTTP %ld)", issuer, resp->status);
                log_warning("OAuth %s; retrying", o->last_error);
                o->failures++;
                arm(o, &o->timer, retry_delay_usec(o), on_timer);
                return;
        }
        free(o->token_endpoint);
        free(o->device_endpoint);
        free(o->revocation_endpoint);
        o->token_endpoint = TAKE_PTR(m.token_endpoint);
        o->device_endpoint = TAKE_PTR(m.device_endpoint);
        o->revocation_endpoint = TAKE_PTR(m.revocation_endpoint);
        o->use_dpop = m.dpop_es256;
        if (o->conf->oauth.dpop == DPOP_ON)
                o->use_dpop = true;
        else if (o->conf->oauth.dpop == DPOP_OFF)
                o->use_dpop = false;
        o->discovered = true;
        o->failures = 0;
        if (o->state != OAUTH_LOGIN_REQUIRED)
                o->last_error[0] = '\0';
        log_info("OAuth server %s: device grant%s%s", issuer, o->use_dpop ? ", DPoP" : "",
                 o->revocation_endpoint ? ", revocation" : "");
        /* Tokens that expired while we were away are refreshed now. */
        if (o->have_tokens && o->tokens.refresh_token &&
            (o->tokens.expires_at == 0 || o->tokens.expires_at - now_s() < OAUTH_REFRESH_MARGIN_S))
                (void) start_refresh(o);
        else
                schedule_refresh(o);
}

/* ---- refresh ---- */

static int start_refresh(struct oauth *o) {
        char *form = NULL;
        int r;

        if (o->refresh_req)
                return 0;
        /* A sign-out is under way: its revocation ends these tokens. */
        if (o->revoke_req)
                return -ESHUTDOWN;
        if (!o->discovered || !o->have_tokens || !o->tokens.refresh_token)
                return -ENOKEY;
        if ((r = form_append(&form, "grant_type", "refresh_token")) < 0 ||
            (r = form_append(&form, "refresh_token", o->tokens.refresh_token)) < 0 ||
            (r = form_append(&form, "client_id", o->conf->oauth.client_id)) < 0) {
                if (form)
                        erase_and_free(form, strlen(form));
                return r;
        }
        o->state = OAUTH_REFRESHING;
        r = oauth_send(o, R_REFRESH, "POST", o->token_endpoint, form, false, &o->refresh_req);
        if (r < 0)
                o->state = OAUTH_OK;
        return r;
}

uint64_t oauth_token_gen(const struct oauth *o) {
        return o ? o->token_gen : 0;
}

uint64_t oauth_dpop_nonce_gen(const struct oauth *o) {
        return o ? o->rs_nonce_gen : 0;
}

/* The resource server's nonce (RFC 9449 9), kept apart from the authorization server's: a new
 * one (at most OAUTH_URI_MAX bytes of NQCHARs, as the signer's policy takes it in a proof)
 * replaces the old and bumps the generation. Returns 1 when it was new, 0 when it was not kept,
 * or -ENOMEM. */
static int set_rs_nonce(struct oauth *o, const char *nonce) {
        int r;

        if (!dpop_nonce_is_valid(nonce, OAUTH_URI_MAX) || streq_ptr(nonce, o->rs_nonce))
                return 0;
        r = free_and_strdup(&o->rs_nonce, nonce);
        if (r < 0)
                return r;
        o->rs_nonce_gen++;
        return 1;
}

void oauth_resource_nonce(struct oauth *o, const char *dpop_nonce) {
        if (!o || !o->have_tokens || !streq_ptr(o->tokens.token_type, "DPoP") || !dpop_nonce || !dpop_nonce[0])
                return;
        if (set_rs_nonce(o, dpop_nonce) > 0)
                log_debug("The cloud gave a new DPoP nonce; the next proofs carry it");
}

void oauth_resource_ok(struct oauth *o) {
        if (!o || !o->unauthorized_reported)
                return;
        o->unauthorized_reported = false;
        if (o->state == OAUTH_OK)
                o->last_error[0] = '\0';
        log_info("The cloud accepts the access token again");
        status_changed(o);
}

/* Reported once (until a resource request succeeds): a status line, STATUS= and a log line. */
static void report_unauthorized(struct oauth *o, const char *what) {
        set_error(o, "the cloud refuses %s; backing off", what);
        (void) snprintf(o->unauthorized_error, sizeof o->unauthorized_error, "%s", o->last_error);
        if (o->unauthorized_reported)
                return;
        o->unauthorized_reported = true;
        log_event(LOG_WARNING, 0, IOTHUB_MID_CLOUD_UNAUTHORIZED, NULL, NULL,
                  "The cloud answers HTTP 401: it refuses %s; backing off, no further refresh for this token",
                  what);
        status_changed(o);
}

int oauth_unauthorized(struct oauth *o, uint64_t gen, uint64_t nonce_gen, const char *www_authenticate,
                       const char *dpop_nonce, void (*done)(void *userdata, int r), void *userdata) {
        char e[OAUTH_ERROR_CODE_MAX + 1] = "";
        bool dpop, new_nonce;
        int r;

        o->resource_401s++;
        if (!o->have_tokens)
                return -ENOKEY;
        dpop = streq_ptr(o->tokens.token_type, "DPoP");
        if (oauth_parse_www_authenticate(www_authenticate, www_authenticate ? strlen(www_authenticate) : 0, e,
                                         sizeof e) < 0)
                e[0] = '\0';
        new_nonce = dpop && dpop_nonce && dpop_nonce[0] && !streq_ptr(dpop_nonce, o->rs_nonce) &&
                    dpop_nonce_is_valid(dpop_nonce, OAUTH_URI_MAX);
        /* RFC 9449 9: the resource server wants a proof with its own nonce, kept apart from the
         * authorization server's. Again at once, only with a nonce we have not used: a server
         * that keeps sending the same one is refusing, not asking. */
        if (new_nonce && (streq(e, "use_dpop_nonce") || streq(e, "invalid_dpop_proof") || !e[0])) {
                r = set_rs_nonce(o, dpop_nonce);
                return r < 0 ? r : 1;
        }
        /* The proof carried an older nonce than the one kept now (a newer one came in another
         * answer meanwhile, oauth_resource_nonce()): again at once, with it. */
        if (dpop && nonce_gen != o->rs_nonce_gen &&
            (streq(e, "use_dpop_nonce") || streq(e, "invalid_dpop_proof") || !e[0]))
                return 1;
        if (streq(e, "use_dpop_nonce")) {
                report_unauthorized(o, "our DPoP proofs (use_dpop_nonce without a new nonce)");
                return -EPROTO;
        }
        /* RFC 9449 7.1: the proof, not the token, is at fault: a new token would not help. */
        if (streq(e, "invalid_dpop_proof")) {
                report_unauthorized(o, "our DPoP proofs (invalid_dpop_proof)");
                return -EPROTO;
        }
        /* A token newer than the one the request carried is there already: use it. */
        if (gen != o->token_gen)
                return 1;
        if (o->refresh_req) {
                if (o->n_waiters >= OAUTH_WAITERS_MAX)
                        return -EBUSY;
                o->waiters[o->n_waiters++] = (struct waiter){ done, userdata };
                return 0;
        }
        /* RFC 6750 3.1 invalid_token, or no reason: one refresh per access token at most. A token
         * that came from such a refresh and is refused too is not the token's fault (a dropped
         * registration, a clock far off, a proof the server dislikes): refreshing again would
         * only turn the hub into a refresh storm against the authorization server. */
        if (o->token_from_401) {
                report_unauthorized(o, "a freshly refreshed access token");
                return -EKEYREJECTED;
        }
        if (o->n_waiters >= OAUTH_WAITERS_MAX)
                return -EBUSY;
        r = start_refresh(o);
        if (r < 0)
                return r;
        o->refresh_for_401 = true;
        o->waiters[o->n_waiters++] = (struct waiter){ done, userdata };
        return 0;
}

void oauth_unauthorized_cancel(struct oauth *o, void *userdata) {
        unsigned n = 0;

        if (!o)
                return;
        for (unsigned i = 0; i < o->n_waiters; i++)
                if (o->waiters[i].userdata != userdata)
                        o->waiters[n++] = o->waiters[i];
        o->n_waiters = n;
}

static void on_refresh(struct oauth *o, const struct http_response *resp, const char *e) {
        bool for_401 = o->refresh_for_401;
        const char *why = NULL;
        bool refused;
        int r;

        o->refresh_for_401 = false;
        if (resp->error == 0 && resp->status == 200) {
                r = accept_tokens(o, resp, &why);
                if (r >= 0) {
                        o->token_from_401 = for_401;
                        log_info("Access token refreshed, valid until %" PRId64, o->tokens.expires_at);
                        notify_waiters(o, 0);
                        token_ready(o);
                        return;
                }
                /* The old tokens stay; nothing of this answer is kept or used. */
                set_error(o, "the token endpoint answered the refresh with HTTP 200 without usable tokens: %s",
                          r == -EBADMSG && why ? why : strerror(-r));
        } else if (resp->error == 0 && resp->status >= 400 && resp->status < 500 &&
                   (streq(e, "invalid_grant") || streq(e, "invalid_client") || streq(e, "unauthorized_client"))) {
                /* The refresh token is dead (revoked, expired, reused): only the user can help. */
                become_login_required(o, e);
                notify_waiters(o, -EKEYREVOKED);
                return;
        } else if (resp->error < 0)
                set_error(o, "refreshing the access token failed: %s", resp->error_text);
        else
                set_error(o, "refreshing the access token answered HTTP %ld%s%s", resp->status, e[0] ? " " : "", e);
        /* An answer that cannot get better by itself is a refusal: a 4xx that names no error we
         * know (a bare 400 is how some servers answer a revoked refresh token), a 3xx (never
         * followed: the token goes only to the token endpoint), a 200 without usable tokens, a
         * body over HTTP_RESPONSE_MAX. Counted, and after OAUTH_REFRESH_REFUSALS_MAX in a row
         * the user must sign in again. Transport failures, 408, 429 and 5xx are the network's or
         * the server's trouble: retried without end, with backoff. */
        if (resp->error < 0)
                refused = resp->error == -EFBIG;
        else
                refused = resp->status < 500 && resp->status != 408 && resp->status != 429;
        if (refused && ++o->refresh_refusals >= OAUTH_REFRESH_REFUSALS_MAX) {
                char why_all[160];
                if (resp->error < 0)
                        (void) snprintf(why_all, sizeof why_all,
                                        "the token endpoint refused the refresh %u times, last an answer over %u bytes",
                                        o->refresh_refusals, (unsigned) HTTP_RESPONSE_MAX);
                else
                        (void) snprintf(why_all, sizeof why_all,
                                        "the token endpoint refused the refresh %u times, last HTTP %ld%s%.*s",
                                        o->refresh_refusals, resp->status, e[0] ? " " : "", OAUTH_ERROR_CODE_MAX, e);
                become_login_required(o, why_all);
                notify_waiters(o, -EKEYREVOKED);
                return;
        }
        /* Keep the tokens, try again later. */
        o->state = o->have_tokens ? OAUTH_OK : OAUTH_LOGIN_REQUIRED;
        o->failures++;
        log_warning("%s; retrying", o->last_error);
        arm(o, &o->timer, retry_delay_usec(o), on_timer);
        notify_waiters(o, -EAGAIN);
}

/* ---- device flow ---- */

static void login_finish(struct oauth *o, int r, const char *message) {
        struct oauth_login_cb cb = o->login;

        o->login_active = false;
        o->login = (struct oauth_login_cb){};
        if (o->device_code) {
                erase_and_free(o->device_code, strlen(o->device_code));
                o->device_code = NULL;
        }
        o->poll_timer = sd_event_source_disable_unref(o->poll_timer);
        /* Every ending but a sign-in (LOGIN_OK, logged by on_poll()) is logged here, once, whether
         * a client still waits or went away: its answer carries only an errno, and control.c
         * tells the user that this log says why. The answer's flaws are warnings; the user's
         * no, the code's expiry and a new sign-in are not. */
        if (r < 0)
                log_full_errno(r == -EACCES || r == -ETIMEDOUT || r == -ECANCELED ? LOG_NOTICE : LOG_WARNING, 0,
                               "Sign-in ended: %s", message);
        if (cb.finished)
                cb.finished(cb.userdata, r, message);
}

static int on_poll_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct oauth *o = userdata;
        char *form = NULL;
        int r;

        if (!o->login_active || o->login_req)
                return 0;
        if (now_monotonic_usec() > o->login_deadline_usec) {
                login_finish(o, -ETIMEDOUT, "the code expired before it was approved; run 'iothubctl login' again");
                return 0;
        }
        if ((r = form_append(&form, "grant_type", "urn:ietf:params:oauth:grant-type:device_code")) < 0 ||
            (r = form_append(&form, "device_code", o->device_code)) < 0 ||
            (r = form_append(&form, "client_id", o->conf->oauth.client_id)) < 0 ||
            (r = oauth_send(o, R_POLL, "POST", o->token_endpoint, TAKE_PTR(form), false, &o->login_req)) < 0) {
                if (form)
                        erase_and_free(form, strlen(form));
                login_finish(o, r, "cannot poll the token endpoint");
        }
        return 0;
}

static void on_poll(struct oauth *o, const struct http_response *resp, const char *e) {
        const char *why = NULL;
        int r;

        if (!o->login_active)
                return;
        if (resp->error == 0 && resp->status == 200) {
                r = accept_tokens(o, resp, &why);
                if (r < 0) {
                        char m[200];
                        /* The device code is spent (the server issued what it calls tokens):
                         * polling on cannot help, the user starts again. */
                        (void) snprintf(m, sizeof m, "the token endpoint answered the sign-in with HTTP 200 without usable tokens: %s",
                                        r == -EBADMSG && why ? why : strerror(-r));
                        login_finish(o, r, m);
                        return;
                }
                o->token_from_401 = false;
                log_event(LOG_NOTICE, 0, IOTHUB_MID_LOGIN_OK, NULL, NULL, "Signed in (%s token)", o->tokens.token_type);
                signin_changed(o, "signed_in");
                status_changed(o);
                login_finish(o, 0, "signed in");
                token_ready(o);
                return;
        }
        /* RFC 8628 3.5. */
        if (streq(e, "authorization_pending")) {
        } else if (streq(e, "slow_down")) {
                if (o->interval_s + 5 <= OAUTH_INTERVAL_MAX_S)
                        o->interval_s += 5;
        } else if (streq(e, "access_denied")) {
                login_finish(o, -EACCES, "the sign-in was denied");
                return;
        } else if (streq(e, "expired_token")) {
                login_finish(o, -ETIMEDOUT, "the code expired before it was approved; run 'iothubctl login' again");
                return;
        } else if (resp->error == -EFBIG) {
                /* An answer, not a network failure: asking again would fetch HTTP_RESPONSE_MAX
                 * bytes every interval until the code expires. */
                char m[100];
                (void) snprintf(m, sizeof m, "the token endpoint answered the sign-in with a body over %u bytes",
                                (unsigned) HTTP_RESPONSE_MAX);
                login_finish(o, -EBADMSG, m);
                return;
        } else if (resp->error < 0 || resp->status >= 500) {
                /* Transient: keep polling until the code expires, less often each time (RFC 8628
                 * 3.5: "clients MUST unilaterally reduce their polling frequency" on a
                 * connection timeout; the same for a server in trouble). */
                o->interval_s = o->interval_s * 2 <= OAUTH_INTERVAL_MAX_S ? o->interval_s * 2 : OAUTH_INTERVAL_MAX_S;
        } else {
                char m[160];
                /* 3xx (never followed) and other 4xx: the flow cannot go on. */
                (void) snprintf(m, sizeof m, "the token endpoint refused: HTTP %ld %.60s", resp->status, e);
                login_finish(o, -EPROTO, m);
                return;
        }
        arm(o, &o->poll_timer, (uint64_t) o->interval_s * 1000000, on_poll_timer);
}

static void on_device(struct oauth *o, const struct http_response *resp, const char *e) {
        struct oauth_device_answer d = {};
        struct oauth_login_cb cb = o->login;
        json_t *info;
        int r = -EPROTO;

        if (!o->login_active)
                return;
        if (resp->error == 0 && resp->status == 200)
                r = oauth_parse_device_answer((const uint8_t *) resp->body, resp->body_len, &d);
        if (r < 0) {
                char m[200];
                if (resp->error < 0)
                        (void) snprintf(m, sizeof m, "device authorization failed: %s", resp->error_text);
                else if (resp->status == 200)
                        (void) snprintf(m, sizeof m, "device authorization answered without a usable code");
                else
                        (void) snprintf(m, sizeof m, "device authorization answered HTTP %ld %s", resp->status, e);
                o->login_active = false;
                o->login = (struct oauth_login_cb){};
                /* Logged here, whether or not the client that started it still waits. */
                log_warning("Sign-in could not start: %s", m);
                if (cb.started)
                        cb.started(cb.userdata, -EPROTO, m, NULL);
                return;
        }
        /* Clamped by the parser (RFC 8628 3.2 and 3.5): interval 1..OAUTH_INTERVAL_MAX_S, the code's
         * lifetime at most OAUTH_DEVICE_EXPIRES_MAX_S. */
        o->device_code = TAKE_PTR(d.device_code);
        o->interval_s = d.interval_s;
        o->login_deadline_usec = now_monotonic_usec() + (uint64_t) d.expires_in * UINT64_C(1000000);
        info = json_pack("{s:s,s:s,s:I,s:I}", "user_code", d.user_code, "verification_uri", d.verification_uri,
                         "expires_in", (json_int_t) d.expires_in, "interval", (json_int_t) o->interval_s);
        if (info && d.verification_uri_complete)
                (void) json_object_set_new(info, "verification_uri_complete", json_string(d.verification_uri_complete));
        oauth_device_answer_done(&d);
        if (!info) {
                login_finish(o, -ENOMEM, "out of memory");
                return;
        }
        if (cb.started)
                cb.started(cb.userdata, 0, "started", info);
        json_decref(info);
        arm(o, &o->poll_timer, (uint64_t) o->interval_s * 1000000, on_poll_timer);
}

int oauth_login(struct oauth *o, const struct oauth_login_cb *cb) {
        char *form = NULL;
        int r;

        if (!o->discovered)
                return -EAGAIN;
        if (!o->signer)
                return -ENOKEY;
        if (o->login_active)
                login_finish(o, -ECANCELED, "another sign-in started");
        call_cancel(TAKE_PTR(o->login_req));
        if ((r = form_append(&form, "client_id", o->conf->oauth.client_id)) < 0 ||
            (r = form_append(&form, "scope", o->conf->oauth.scope)) < 0) {
                if (form)
                        erase_and_free(form, strlen(form));
                return r;
        }
        o->login = *cb;
        o->login_active = true;
        r = oauth_send(o, R_DEVICE, "POST", o->device_endpoint, form, false, &o->login_req);
        if (r < 0) {
                o->login_active = false;
                o->login = (struct oauth_login_cb){};
        }
        return r;
}

void oauth_login_detach(struct oauth *o, void *userdata) {
        if (o && o->login.userdata == userdata)
                o->login = (struct oauth_login_cb){};
}

/* ---- logout ---- */

static void logout_finish(struct oauth *o, int r, const char *message) {
        tokens_store(o, STORE_ERASE);
        if (o->have_tokens) {
                oauth_tokens_done(&o->tokens);
                o->have_tokens = false;
        }
        o->state = OAUTH_LOGIN_REQUIRED;
        set_error(o, "signed out");
        log_event(LOG_NOTICE, 0, IOTHUB_MID_LOGIN_REQUIRED, NULL, NULL, "Signed out: %s", message);
        signin_changed(o, "signed_out");
        status_changed(o);
        if (o->logout_op) {
                struct oauth_logout_op *op = TAKE_PTR(o->logout_op);
                op->done(op->userdata, r, message);
                free(op);
        }
}

void oauth_logout_cancel(struct oauth_logout_op *op) {
        if (!op)
                return;
        if (op->oauth->logout_op == op)
                op->oauth->logout_op = NULL;
        free(op);
}

int oauth_logout(struct oauth *o, void (*done)(void *userdata, int r, const char *message), void *userdata,
                 struct oauth_logout_op **ret) {
        struct oauth_logout_op *op;
        char *form = NULL;
        int r;

        if (o->logout_op || o->revoke_req)
                return -EBUSY;
        /* A refresh still out (its proof asked, or its request sent) would bring tokens back after
         * the sign-out: it ends here, and whoever waited for it hears that the tokens are gone. */
        if (o->refresh_req) {
                call_cancel(TAKE_PTR(o->refresh_req));
                o->refresh_for_401 = false;
                if (o->state == OAUTH_REFRESHING)
                        o->state = OAUTH_OK;
                notify_waiters(o, -EKEYREVOKED);
        }
        if (!o->have_tokens || !o->tokens.refresh_token || !o->revocation_endpoint || !o->discovered) {
                const char *m = o->revocation_endpoint ? "tokens erased"
                                                       : "tokens erased (the server has no revocation endpoint)";
                *ret = NULL; /* before done(), which may free whatever holds *ret */
                logout_finish(o, 0, m);
                done(userdata, 0, m);
                return 0;
        }
        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        *op = (struct oauth_logout_op){ .oauth = o, .done = done, .userdata = userdata };
        /* RFC 7009 2.1: revoking the refresh token revokes its access tokens too, where the
         * server links them. */
        if ((r = form_append(&form, "token", o->tokens.refresh_token)) < 0 ||
            (r = form_append(&form, "token_type_hint", "refresh_token")) < 0 ||
            (r = form_append(&form, "client_id", o->conf->oauth.client_id)) < 0) {
                if (form)
                        erase_and_free(form, strlen(form));
                free(op);
                return r;
        }
        r = oauth_send(o, R_REVOKE, "POST", o->revocation_endpoint, form, false, &o->revoke_req);
        if (r < 0) {
                free(op);
                return r;
        }
        o->logout_op = op;
        *ret = op;
        return 0;
}

static void on_revoke(struct oauth *o, const struct http_response *resp) {
        if (resp->error == 0 && resp->status == 200)
                logout_finish(o, 0, "refresh token revoked, tokens erased");
        else {
                char m[160];
                (void) snprintf(m, sizeof m, "tokens erased, but revocation failed (%s)",
                                resp->error < 0 ? resp->error_text : "the server refused");
                logout_finish(o, 0, m);
        }
}

/* ---- dispatch ---- */

static void on_done(void *userdata, const struct http_response *resp) {
        struct oauth_call *call = userdata;
        struct oauth *o = call->oauth;
        struct oauth_call **slot = call_slot(o, call->kind);
        char e[OAUTH_ERROR_CODE_MAX + 1] = "";

        *slot = NULL;
        call->http = NULL; /* http.c frees it after this call */
        if (resp->error == 0 && resp->status >= 400 &&
            oauth_parse_error((const uint8_t *) resp->body, resp->body_len, e, sizeof e) < 0)
                e[0] = '\0';
        /* The authorization server's nonce, kept apart from the resource server's (RFC 9449 8, 9). */
        if (resp->dpop_nonce[0] && call->kind != R_DISCOVERY && call->kind != R_DISCOVERY_FALLBACK)
                (void) free_and_strdup(&o->as_nonce, resp->dpop_nonce);
        /* RFC 9449 8: the server wants its nonce in the proof: once more, with it, to the same
         * endpoint, in the same slot (a revocation stays a revocation). */
        if (resp->error == 0 && resp->status == 400 && streq(e, "use_dpop_nonce") && !call->nonce_retried &&
            call->form && resp->dpop_nonce[0] && o->use_dpop) {
                if (oauth_send(o, call->kind, "POST", call->url, TAKE_PTR(call->form), true, slot) >= 0) {
                        call_free(call);
                        return;
                }
        }
        /* A proof refused for a nonce this server did not give, or no longer takes, with no new
         * one offered (RFC 9449 8 would have said use_dpop_nonce): once more without it. */
        if (resp->error == 0 && resp->status == 400 && streq(e, "invalid_dpop_proof") && call->sent_nonce &&
            !call->nonce_retried && call->form && !resp->dpop_nonce[0]) {
                free(o->as_nonce);
                o->as_nonce = NULL;
                if (oauth_send(o, call->kind, "POST", call->url, TAKE_PTR(call->form), true, slot) >= 0) {
                        call_free(call);
                        return;
                }
        }
        switch (call->kind) {
        case R_DISCOVERY:
        case R_DISCOVERY_FALLBACK:
                on_discovery(o, resp, call->kind == R_DISCOVERY_FALLBACK);
                break;
        case R_DEVICE:
                on_device(o, resp, e);
                break;
        case R_POLL:
                on_poll(o, resp, e);
                break;
        case R_REFRESH:
                on_refresh(o, resp, e);
                break;
        case R_REVOKE:
                on_revoke(o, resp);
                break;
        }
        call_free(call);
}

/* ---- the resource side ---- */

int oauth_authorize(struct oauth *o, char **ret_authorization, char **ret_dpop_ath, char **ret_dpop_nonce) {
        _cleanup_erase_str_ char *auth = NULL;
        _cleanup_free_ char *ath = NULL, *nonce = NULL;
        bool dpop;

        if (!o->have_tokens || (o->state != OAUTH_OK && o->state != OAUTH_REFRESHING))
                return -ENOKEY;
        dpop = streq(o->tokens.token_type, "DPoP");
        auth = strdup_printf("%s %s", dpop ? "DPoP" : "Bearer", o->tokens.access_token);
        if (!auth)
                return -ENOMEM;
        if (dpop) {
                /* ath (RFC 9449 4.2) binds the proof to the token; the signer makes the proof and
                 * is never handed the token. */
                int r;

                ath = malloc(DPOP_ATH_LEN + 1);
                if (!ath)
                        return -ENOMEM;
                r = dpop_ath(o->tokens.access_token, ath);
                if (r < 0)
                        return r;
                if (o->rs_nonce && !(nonce = strdup(o->rs_nonce)))
                        return -ENOMEM;
                o->dpop_proofs++;
        }
        *ret_authorization = TAKE_PTR(auth);
        *ret_dpop_ath = TAKE_PTR(ath);
        *ret_dpop_nonce = TAKE_PTR(nonce);
        return 0;
}

int oauth_status_json(struct oauth *o, json_t *st) {
        json_t *j;

        if (!o)
                j = json_pack("{s:s}", "state", "not_configured");
        else
                j = json_pack("{s:s,s:I,s:b,s:I,s:I,s:s*}", "state", oauth_state_to_string(o->state), "expires_at",
                              (json_int_t) (o->have_tokens ? o->tokens.expires_at : 0), "dpop",
                              o->have_tokens && streq_ptr(o->tokens.token_type, "DPoP"), "dpop_proofs",
                              (json_int_t) o->dpop_proofs, "resource_401", (json_int_t) o->resource_401s, "last_error",
                              o->last_error[0]             ? o->last_error
                              : o->unauthorized_reported ? o->unauthorized_error
                                                         : NULL);
        if (!j)
                return -ENOMEM;
        return json_object_set_new(st, "oauth", j) < 0 ? -ENOMEM : 0;
}

/* The signer read the sealed tokens (or has none). Only while nothing else gave us tokens (a
 * login in the meantime wins). */
static void on_tokens_got(void *userdata, int r, const struct signer_reply *p) {
        struct oauth *o = userdata;
        struct oauth_tokens t = {};

        if (o->have_tokens) {
                o->load_op = signer_op_free(o->load_op);
                return;
        }
        if (r >= 0 && (!p->access_token || !p->token_type))
                r = -EBADMSG;
        if (r >= 0) {
                t.access_token = strdup(p->access_token);
                t.token_type = strdup(p->token_type);
                t.refresh_token = p->refresh_token ? strdup(p->refresh_token) : NULL;
                t.scope = p->scope ? strdup(p->scope) : NULL;
                t.expires_at = p->expires_at > INT64_MAX ? INT64_MAX : (int64_t) p->expires_at;
                if (!t.access_token || !t.token_type || (p->refresh_token && !t.refresh_token) ||
                    (p->scope && !t.scope)) {
                        oauth_tokens_done(&t);
                        r = -ENOMEM;
                }
        }
        o->load_op = signer_op_free(o->load_op); /* p lives in it: copied above */
        if (r >= 0) {
                o->tokens = t;
                o->have_tokens = true;
                o->state = OAUTH_OK;
                o->last_error[0] = '\0';
                o->token_gen++;
                log_info("Loaded the stored sign-in tokens");
                /* Before discovery finished, on_discovered() does this. */
                if (o->discovered && o->tokens.refresh_token &&
                    (o->tokens.expires_at == 0 || o->tokens.expires_at - now_s() < OAUTH_REFRESH_MARGIN_S))
                        (void) start_refresh(o);
                else if (o->discovered)
                        schedule_refresh(o);
                if (o->ev.token_ready)
                        o->ev.token_ready(o->ev.userdata);
        } else if (r == -ENOENT)
                set_error(o, "not signed in: run 'iothubctl login'");
        else {
                set_error(o, "stored tokens unusable: %s", strerror(-r));
                log_error("Sign-in: %s", o->last_error);
        }
        status_changed(o);
}

static void load_sealed_tokens(struct oauth *o) {
        int r;

        if (!o || !o->signer || o->have_tokens || o->load_op)
                return;
        r = signer_tokens_get(o->signer, on_tokens_got, o, &o->load_op);
        if (r < 0)
                set_error(o, "cannot ask the signer for the stored tokens: %s", strerror(-r));
}

static void on_tokens_stored(void *userdata, int r, const struct signer_reply *p) {
        struct oauth *o = userdata;

        o->store_op = signer_op_free(o->store_op);
        /* Kept in memory whatever happens there: losing a rotated refresh token is worse. */
        if (r < 0 && r != -ENOENT)
                log_error_errno(r, "Failed to update the stored tokens (iothub-signer): %m");
        if (o->store_next != STORE_NONE) {
                int next = o->store_next;
                o->store_next = STORE_NONE;
                tokens_store(o, next);
        }
}

/* Saves the tokens in memory (or erases them) through the signer; while one write is out, the
 * last wish waits for it, so that writes never overtake each other. */
static void tokens_store(struct oauth *o, int what) {
        int r;

        if (!o->signer) {
                if (what == STORE_SAVE)
                        log_warning("No hub key yet: the new tokens are kept in memory only until it is there");
                o->store_next = what == STORE_SAVE ? STORE_SAVE : STORE_ERASE;
                return;
        }
        if (o->store_op) {
                o->store_next = what;
                return;
        }
        if (what == STORE_ERASE)
                r = signer_tokens_erase(o->signer, on_tokens_stored, o, &o->store_op);
        else if (o->have_tokens)
                r = signer_tokens_put(o->signer, o->tokens.access_token, o->tokens.refresh_token, o->tokens.token_type,
                                      o->tokens.scope, o->tokens.expires_at > 0 ? (uint64_t) o->tokens.expires_at : 0,
                                      on_tokens_stored, o, &o->store_op);
        else
                return;
        if (r < 0)
                log_error_errno(r, "Failed to %s the stored tokens: %m", what == STORE_ERASE ? "erase" : "save");
}

void oauth_key_ready(struct oauth *o, struct signer *s) {
        if (!o)
                return;
        o->signer = s;
        /* Tokens that came before the key (a sign-in cannot, but keep the rule simple). */
        if (o->store_next != STORE_NONE && !o->store_op) {
                int next = o->store_next;
                o->store_next = STORE_NONE;
                tokens_store(o, next);
        }
        load_sealed_tokens(o);
}

int oauth_new(sd_event *e, const struct iothub_conf *conf, struct http *http, const struct oauth_events *ev,
              struct oauth **ret) {
        struct oauth *o;
        int r;

        if (!conf->oauth.issuer) {
                *ret = NULL;
                return 0;
        }
        if (!conf->oauth.client_id) {
                log_error("[oauth] issuer is set but [oauth] client_id is not: sign-in disabled");
                *ret = NULL;
                return 0;
        }
        o = calloc(1, sizeof *o);
        if (!o)
                return -ENOMEM;
        o->event = e;
        o->conf = conf;
        o->http = http;
        if (ev)
                o->ev = *ev;
        o->state = OAUTH_LOGIN_REQUIRED;
        set_error(o, "no hub key yet: see 'iothubctl doctor'");
        load_sealed_tokens(o);
        if (conf->key.backend == KEY_BACKEND_FILE)
                log_event(LOG_WARNING, 0, IOTHUB_MID_DEV_KEY_WARNING, NULL, NULL,
                          "With [key] backend = file the token data key is a plain file in %s, not sealed by a TPM",
                          conf->hub.state_dir);
        r = start_discovery(o, false);
        if (r < 0) {
                oauth_free(o);
                return r;
        }
        *ret = o;
        return 0;
}

void oauth_free(struct oauth *o) {
        if (!o)
                return;
        if (o->login_active)
                login_finish(o, -ECANCELED, "the daemon is stopping");
        if (o->logout_op) {
                struct oauth_logout_op *op = TAKE_PTR(o->logout_op);
                op->done(op->userdata, -ECANCELED, "the daemon is stopping");
                free(op);
        }
        notify_waiters(o, -ECANCELED);
        /* Each call in whichever phase (its DPoP proof asked, or its request out): no callback
         * runs after this, the forms are wiped. */
        call_cancel(o->disc_req);
        call_cancel(o->login_req);
        call_cancel(o->refresh_req);
        call_cancel(o->revoke_req);
        /* A write still out goes on in the signer; only its answer is dropped. */
        signer_op_free(o->load_op);
        signer_op_free(o->store_op);
        sd_event_source_disable_unref(o->timer);
        sd_event_source_disable_unref(o->poll_timer);
        if (o->have_tokens)
                oauth_tokens_done(&o->tokens);
        free(o->token_endpoint);
        free(o->device_endpoint);
        free(o->revocation_endpoint);
        free(o->as_nonce);
        free(o->rs_nonce);
        free(o);
}
