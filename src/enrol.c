/* SPDX-License-Identifier: MIT */
/* Enrolment of a bulb, from a public key or from a manufacturer certificate: the one code path of
 * `bulb add` and of pairing (PROTOCOL.md 1: a hello enrols "exactly as bulb add --cert would"). */
#include <stdio.h>

#include "iothub/enrol.h"
#include "iothub/log.h"
#include "iothub/verify.h"

static int fail(char **ret_error, int r, const char *fmt, ...) _printf_(3, 4);
static int fail(char **ret_error, int r, const char *fmt, ...) {
        va_list ap;

        if (ret_error) {
                va_start(ap, fmt);
                if (vasprintf(ret_error, fmt, ap) < 0)
                        *ret_error = NULL;
                va_end(ap);
        }
        return r;
}

int enrol_bulb(const struct iothub_conf *conf, struct registry *registry, const char *id, const char *key_pem,
               const char *cert_pem, struct bulb **ret, char **ret_error) {
        _cleanup_(verify_key_freep) struct verify_key *k = NULL;
        _cleanup_free_ char *spki = NULL, *err = NULL;
        const char *pem = key_pem;
        char cn[DEVICE_ID_MAX + 1];
        enum frame_alg alg;
        struct bulb *b;
        int r;

        if (!!key_pem == !!cert_pem)
                return fail(ret_error, -EINVAL, "give exactly one of a public key or a certificate");
        if (cert_pem) {
                if (!conf->bulbs.ca_file)
                        return fail(ret_error, -EINVAL,
                                    "[bulbs] ca_file is not set in %s: cannot check certificates", conf->path);
                r = verify_key_from_cert(cert_pem, strlen(cert_pem), conf->bulbs.ca_file, &k, &alg, cn, &err);
                if (r < 0)
                        return fail(ret_error, r, "certificate refused: %s", err ? err : strerror(-r));
                if (id && !streq(id, cn))
                        return fail(ret_error, -EPERM, "device id '%s' does not match the certificate's '%s'", id,
                                    cn);
                id = cn;
                r = verify_key_to_pem(k, &spki);
                if (r < 0)
                        return fail(ret_error, r, "cannot export key: %s", strerror(-r));
                pem = spki;
        }
        if (!id || !device_id_is_valid(id, strlen(id)))
                return fail(ret_error, -EINVAL,
                            "invalid device id: 1 to 64 of [A-Za-z0-9._-], not starting with '.'");
        r = registry_add(registry, id, pem, strlen(pem));
        if (r == -EEXIST)
                return fail(ret_error, r, "bulb %s is already enrolled (remove it first to change its key)", id);
        if (r == -EOPNOTSUPP)
                return fail(ret_error, r, "unsupported key type: only P-256 (ES256) and Ed25519 (EdDSA) keys");
        if (r == -EINVAL)
                return fail(ret_error, r, "not a valid PEM public key");
        if (r < 0)
                return fail(ret_error, r, "cannot enrol %s: %s", id, strerror(-r));
        b = registry_find(registry, id);
        if (!b)
                return fail(ret_error, -ENOENT, "bulb %s vanished after enrolment", id);
        log_event(LOG_NOTICE, 0, IOTHUB_MID_BULB_ENROLLED, id, NULL, "Enrolled bulb %s (%s)%s", id,
                  frame_alg_to_string(b->alg), cert_pem ? " from its certificate" : "");
        *ret = b;
        return 0;
}
