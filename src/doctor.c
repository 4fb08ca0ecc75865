/* SPDX-License-Identifier: MIT */
/* iothubctl doctor. Each check adds one line: ok, warning (works, but look at it) or fail (what
 * to do). The first failure is the thing to fix first: later checks that depend on it are
 * "skipped" rather than piling up consequences of the same cause (like iotedge check). */
#include <stdarg.h>
#include <stdio.h>
#include <sys/timex.h>

#include <curl/curl.h>

#include "iothub/conf.h"
#include "iothub/control.h"
#include "iothub/doctor.h"
#include "iothub/hubkey.h"

#define DOCTOR_CLOUD_TIMEOUT_S 10L
#define DOCTOR_SPOOL_WARN_PERCENT 80

struct report {
        json_t *checks;
        const char *first_failure;
        char first_message[512];
};

const char *doctor_result_to_string(enum doctor_result r) {
        static const char *const names[] = {
                [DOCTOR_OK] = "ok", [DOCTOR_WARNING] = "warning", [DOCTOR_FAIL] = "fail", [DOCTOR_SKIPPED] = "skipped"
        };
        return r >= 0 && r < (int) ELEMENTSOF(names) ? names[r] : "unknown";
}

static void add(struct report *rep, const char *check, enum doctor_result result, const char *fmt, ...)
        _printf_(4, 5);
static void add(struct report *rep, const char *check, enum doctor_result result, const char *fmt, ...) {
        char msg[512];
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        (void) json_array_append_new(rep->checks, json_pack("{s:s,s:s,s:s}", "check", check, "result",
                                                            doctor_result_to_string(result), "message", msg));
        if (result == DOCTOR_FAIL && !rep->first_failure) {
                rep->first_failure = check;
                (void) snprintf(rep->first_message, sizeof rep->first_message, "%s", msg);
        }
}

static json_t *jget(json_t *o, const char *a, const char *b) {
        o = json_object_get(o, a);
        return b ? json_object_get(o, b) : o;
}

static const char *jstr(json_t *o, const char *a, const char *b) {
        return json_string_value(jget(o, a, b));
}

/* The daemon's status, or NULL with the reason in 'why'. */
static json_t *daemon_status(const struct iothub_conf *c, char *why, size_t len) {
        _cleanup_free_ char *path = strdup_printf("%s/%s", c->hub.runtime_dir, CONTROL_SOCKET_NAME);
        json_t *resp = NULL;
        int r;

        if (!path) {
                (void) snprintf(why, len, "out of memory");
                return NULL;
        }
        json_t *req = json_pack("{s:s}", "cmd", "status");
        r = req ? control_call(path, req, &resp) : -ENOMEM;
        json_decref(req);
        if (r == -ENOENT || r == -ECONNREFUSED)
                (void) snprintf(why, len,
                                "the daemon is not running (no socket at %s): start it with 'systemctl start iothub', "
                                "and see 'journalctl -u iothub -b' for why it stopped",
                                path);
        else if (r == -EACCES || r == -EPERM)
                (void) snprintf(why, len,
                                "%s: permission denied: run doctor as root or as a member of group iothub", path);
        else if (r < 0)
                (void) snprintf(why, len, "%s: %s", path, strerror(-r));
        else if (!json_is_true(json_object_get(resp, "ok"))) {
                (void) snprintf(why, len, "the daemon refused the status request: %s",
                                jstr(resp, "error", NULL) ?: "no reason given");
                json_decref(resp);
                return NULL;
        }
        return r < 0 ? NULL : resp;
}

static void check_key(struct report *rep, const struct iothub_conf *c, json_t *st) {
        const char *backend = key_backend_to_string(c->key.backend);

        if (st) {
                const char *id = jstr(st, "key", "id"), *reason = jstr(st, "key", "reason");
                const char *err = jstr(st, "key", "error");

                if (id && c->key.backend == KEY_BACKEND_FILE)
                        add(rep, "key", DOCTOR_WARNING,
                            "hub key %s is a file (%s), a development aid: on a real hub use [key] backend = tpm", id,
                            c->key.file);
                else if (id)
                        add(rep, "key", DOCTOR_OK, "the TPM holds hub key %s", id);
                else if (streq_ptr(reason, "no_key"))
                        add(rep, "key", DOCTOR_FAIL, "no hub key yet: run 'iothubctl key init' (as root), then "
                                                     "'iothubctl register'");
                else
                        add(rep, "key", DOCTOR_FAIL, "the daemon cannot open the hub key (%s): %s", backend,
                            err ?: "no reason given");
                return;
        }
        /* No daemon: ask the TPM (or the file) ourselves; nobody else holds it now. */
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;
        _cleanup_free_ char *err = NULL;
        int r = hubkey_open(c, &k, &err);
        if (r == -ENOENT && c->key.backend == KEY_BACKEND_TPM)
                add(rep, "key", DOCTOR_FAIL, "the TPM works but holds no hub key: run 'iothubctl key init' (as root)");
        else if (r < 0)
                add(rep, "key", DOCTOR_FAIL, "%s%s", err ?: strerror(-r),
                    r == -ENOENT ? ": run 'iothubctl key init' (as root)" : "");
        else if (c->key.backend == KEY_BACKEND_FILE)
                add(rep, "key", DOCTOR_WARNING, "hub key %s is a file (%s), a development aid", hubkey_id(k),
                    c->key.file);
        else
                add(rep, "key", DOCTOR_OK, "the TPM holds hub key %s", hubkey_id(k));
}

/* HTTPS to [cloud] url with the daemon's settings: reachable, and a certificate that verifies
 * against [cloud] ca_file (or the system's CAs) for that host name. Any HTTP status will do. */
static void check_cloud_tls(struct report *rep, const struct iothub_conf *c) {
        char errbuf[CURL_ERROR_SIZE] = "";
        long status = 0;
        CURLcode rc;
        CURL *e;

        e = curl_easy_init();
        if (!e) {
                add(rep, "cloud", DOCTOR_FAIL, "cannot set up HTTPS (out of memory)");
                return;
        }
        (void) curl_easy_setopt(e, CURLOPT_URL, c->cloud.url);
        (void) curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https");
        (void) curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
        (void) curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
        (void) curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
        (void) curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
        (void) curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
        (void) curl_easy_setopt(e, CURLOPT_TIMEOUT, DOCTOR_CLOUD_TIMEOUT_S);
        (void) curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
        (void) curl_easy_setopt(e, CURLOPT_USERAGENT, "iothubctl-doctor/" IOTHUB_VERSION);
        if (c->cloud.ca_file)
                (void) curl_easy_setopt(e, CURLOPT_CAINFO, c->cloud.ca_file);
        rc = curl_easy_perform(e);
        (void) curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_cleanup(e);
        switch (rc) {
        case CURLE_OK:
                add(rep, "cloud", DOCTOR_OK, "%s answers over HTTPS with a valid certificate (HTTP %ld)", c->cloud.url,
                    status);
                break;
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_SSL_CONNECT_ERROR:
                add(rep, "cloud", DOCTOR_FAIL,
                    "the certificate of %s is not valid here (%s): check [cloud] ca_file%s%s and the clock",
                    c->cloud.url, errbuf[0] ? errbuf : curl_easy_strerror(rc), c->cloud.ca_file ? " = " : "",
                    c->cloud.ca_file ?: "");
                break;
        default:
                add(rep, "cloud", DOCTOR_FAIL,
                    "cannot reach %s (%s): check the network, DNS and [cloud] url", c->cloud.url,
                    errbuf[0] ? errbuf : curl_easy_strerror(rc));
        }
}

/* The kernel's NTP state (adjtimex(2)): STA_UNSYNC is set until a time daemon (timesyncd,
 * chrony) has synchronised the clock. A Pi has no battery-backed clock: until then the time
 * may be far off, and tokens, certificates and frame time stamps are judged by it. */
static void check_clock(struct report *rep) {
        struct timex tx = {};
        int state = adjtimex(&tx);

        if (state < 0)
                add(rep, "clock", DOCTOR_WARNING, "cannot read the clock's state: %s", strerror(errno));
        else if (state == TIME_ERROR || (tx.status & STA_UNSYNC))
                add(rep, "clock", DOCTOR_WARNING,
                    "the clock is not synchronised (STA_UNSYNC): enable a time service ('timedatectl "
                    "set-ntp true'); sign-in, certificates and frames depend on the time");
        else
                add(rep, "clock", DOCTOR_OK, "the clock is synchronised (estimated error %ld us)", tx.esterror);
}

static void check_spool(struct report *rep, const struct iothub_conf *c, json_t *st) {
        json_int_t pending = json_integer_value(jget(st, "spool", "pending"));
        json_int_t bytes = json_integer_value(jget(st, "spool", "bytes"));
        json_int_t dropped = json_integer_value(jget(st, "spool", "dropped"));
        json_int_t aside = json_integer_value(jget(st, "spool", "moved_aside"));
        uint64_t max = c->spool.max_bytes;

        if (dropped > 0)
                add(rep, "spool", DOCTOR_WARNING,
                    "%lld frames waiting; %lld of the oldest were dropped at [spool] max_bytes since the start: "
                    "fix the upload first",
                    (long long) pending, (long long) dropped);
        else if (max > 0 && (uint64_t) bytes * 100 >= max * DOCTOR_SPOOL_WARN_PERCENT)
                add(rep, "spool", DOCTOR_WARNING,
                    "%lld frames waiting, %lld bytes: %llu%% of [spool] max_bytes; the oldest go first when it is full",
                    (long long) pending, (long long) bytes, (unsigned long long) ((uint64_t) bytes * 100 / max));
        else if (aside > 0)
                add(rep, "spool", DOCTOR_WARNING,
                    "%lld frames waiting; %lld frames of refused batches were moved aside (see the journal)",
                    (long long) pending, (long long) aside);
        else
                add(rep, "spool", DOCTOR_OK, "%lld frames waiting for the cloud (%lld bytes)", (long long) pending,
                    (long long) bytes);
}

int doctor_run(const char *config_path, json_t **ret) {
        struct report rep = {};
        _cleanup_conf_ struct iothub_conf *c = NULL;
        _cleanup_free_ char *err = NULL;
        json_t *st = NULL, *o;
        char why[512];
        bool cloud;
        int r;

        rep.checks = json_array();
        if (!rep.checks)
                return -ENOMEM;

        r = conf_load(config_path, &c, &err);
        if (r < 0) {
                add(&rep, "config", DOCTOR_FAIL, "%s: correct it (see iothub.conf(5)), then 'systemctl restart iothub'",
                    err ?: strerror(-r));
                goto done;
        }
        add(&rep, "config", DOCTOR_OK, "%s is valid", config_path);

        st = daemon_status(c, why, sizeof why);
        if (st)
                add(&rep, "daemon", DOCTOR_OK, "iothubd %s runs (up %lld s) and answers on its control socket",
                    jstr(st, "version", NULL) ?: "?", (long long) json_integer_value(jget(st, "uptime_s", NULL)));
        else
                add(&rep, "daemon", DOCTOR_FAIL, "%s", why);

        if (!st)
                add(&rep, "broker", DOCTOR_SKIPPED, "the daemon is not running");
        else if (json_is_true(jget(st, "mqtt", "connected")))
                add(&rep, "broker", DOCTOR_OK, "connected to the MQTT broker at %s:%d", c->mqtt.host, c->mqtt.port);
        else
                add(&rep, "broker", DOCTOR_FAIL,
                    "the daemon is not connected to the MQTT broker at %s:%d: is it running ('systemctl status "
                    "mosquitto')? Check [mqtt] host, port, username, password_file and ca_file",
                    c->mqtt.host, c->mqtt.port);

        check_key(&rep, c, st);

        cloud = c->cloud.url != NULL;
        if (!cloud) {
                add(&rep, "signed-in", DOCTOR_WARNING,
                    "no [cloud] url in %s: frames are only spooled; set it (and [oauth]) to relay them", config_path);
        } else if (!st)
                add(&rep, "signed-in", DOCTOR_SKIPPED, "the daemon is not running");
        else {
                const char *state = jstr(st, "oauth", "state");

                if (streq_ptr(state, "ok") || streq_ptr(state, "refreshing"))
                        add(&rep, "signed-in", DOCTOR_OK, "signed in%s",
                            json_is_true(jget(st, "oauth", "dpop")) ? " (DPoP-bound token)" : "");
                else if (streq_ptr(state, "login_required")) {
                        const char *e = jstr(st, "oauth", "last_error");
                        /* The daemon's reason unless it only repeats the hint. */
                        bool more = e && !strstr(e, "iothubctl login");
                        add(&rep, "signed-in", DOCTOR_FAIL, "not signed in: run 'iothubctl login'%s%s%s",
                            more ? " (" : "", more ? e : "", more ? ")" : "");
                } else if (c->cloud.bearer_token_file)
                        add(&rep, "signed-in", DOCTOR_WARNING,
                            "a fixed token from [cloud] bearer_token_file (tests and development only): configure "
                            "[oauth] and run 'iothubctl login'");
                else
                        add(&rep, "signed-in", DOCTOR_FAIL,
                            "sign-in is not configured: set [oauth] issuer and client_id (see iothub.conf(5)), then "
                            "run 'iothubctl login'");
        }

        if (!cloud)
                add(&rep, "registered", DOCTOR_SKIPPED, "no [cloud] url");
        else if (!st)
                add(&rep, "registered", DOCTOR_SKIPPED, "the daemon is not running");
        else if (json_is_true(jget(st, "cloud", "registered")))
                add(&rep, "registered", DOCTOR_OK, "the hub key is registered with the account");
        else
                add(&rep, "registered", DOCTOR_FAIL,
                    "the hub is not registered with the account: run 'iothubctl register' (after 'iothubctl login')");

        if (!cloud)
                add(&rep, "cloud", DOCTOR_SKIPPED, "no [cloud] url");
        else
                check_cloud_tls(&rep, c);

        check_clock(&rep);

        if (st)
                check_spool(&rep, c, st);
        else
                add(&rep, "spool", DOCTOR_SKIPPED, "the daemon is not running");

done:
        /* "first_failure": null when all is well (s* would leave the key out). */
        o = json_pack("{s:o,s:o,s:o}", "checks", rep.checks, "first_failure",
                      rep.first_failure ? json_string(rep.first_failure) : json_null(), "first_failure_message",
                      rep.first_failure ? json_string(rep.first_message) : json_null());
        json_decref(st);
        if (!o)
                return -ENOMEM;
        *ret = o;
        return 0;
}
