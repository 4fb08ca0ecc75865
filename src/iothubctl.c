/* SPDX-License-Identifier: MIT */
/* iothubctl: the operator's tool. Parses the command line, reads the configuration to find
 * the daemon, and asks it over the control socket; it never writes the state itself. */
#include <fcntl.h>
#include <pwd.h>
#include <stdio.h>
#include <sys/stat.h>

#include <qrencode.h>

#include <jansson.h>

#include "iothub/conf.h"
#include "iothub/control.h"
#include "iothub/doctor.h"
#include "iothub/hubkey.h"

#define EXIT_USAGE 64
#define EXIT_UNAVAILABLE 69
#define PEM_FILE_MAX 16384

struct ctl {
        const char *config;
        bool json;
        struct iothub_conf *conf;
};

static int usage(void) {
        fprintf(stderr, "Usage: iothubctl [--config FILE] [--json] COMMAND\n"
                        "  status                            the daemon's state and counters\n"
                        "  doctor                            check the set-up, name the first thing to fix\n"
                        "  bulb add ID --key PUBKEY.pem      enrol a bulb (P-256 or Ed25519 key)\n"
                        "  bulb add [ID] --cert CERT.pem     enrol from a device certificate\n"
                        "    [--broker-password]             also a broker password for the bulb, shown once\n"
                        "  bulb list                         enrolled bulbs\n"
                        "  bulb remove ID                    revoke a bulb at once\n"
                        "  bulb pair [--for SECONDS]         let bulbs enrol with their certificates (max 300 s)\n"
                        "  key init                          create the hub key (never replaces one)\n"
                        "  key show [--pem | --jwk]          the hub's public key and key id\n"
                        "  register                          register the hub key with the cloud account\n"
                        "  login                             sign in with the OAuth device grant\n"
                        "  logout                            revoke and erase the stored tokens\n");
        return EXIT_USAGE;
}

static int fail(const char *fmt, ...) _printf_(1, 2);
static int fail(const char *fmt, ...) {
        va_list ap;

        fputs("iothubctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        return 1;
}

/* Sends a request and hands back the response; prints the error and returns an exit status
 * when it failed. */
static int call(struct ctl *ctl, json_t *req, json_t **ret) {
        _cleanup_free_ char *path = NULL;
        json_t *resp = NULL;
        int r;

        if (!req)
                return fail("out of memory");
        if (asprintf(&path, "%s/%s", ctl->conf->hub.runtime_dir, CONTROL_SOCKET_NAME) < 0) {
                json_decref(req);
                return fail("out of memory");
        }
        r = control_call(path, req, &resp);
        json_decref(req);
        if (r == -ENOENT || r == -ECONNREFUSED) {
                fprintf(stderr, "iothubctl: the daemon is not running (no socket at %s)\n", path);
                return EXIT_UNAVAILABLE;
        }
        if (r == -EACCES || r == -EPERM)
                return fail("%s: permission denied (root or group iothub only)", path), EXIT_UNAVAILABLE;
        if (r < 0)
                return fail("%s: %s", path, strerror(-r));
        if (!json_is_true(json_object_get(resp, "ok"))) {
                const char *e = json_string_value(json_object_get(resp, "error"));
                fail("%s", e ? e : "the daemon refused the request");
                json_decref(resp);
                return 1;
        }
        *ret = resp;
        return 0;
}

static void print_json(json_t *o) {
        (void) json_object_del(o, "ok");
        json_dumpf(o, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        fputc('\n', stdout);
}

static json_int_t geti(json_t *o, const char *path1, const char *path2) {
        json_t *v = json_object_get(o, path1);
        if (path2)
                v = json_object_get(v, path2);
        return json_integer_value(v);
}

static int cmd_status(struct ctl *ctl, int argc, char **argv) {
        json_t *st = NULL, *rej;
        const char *k;
        json_t *v;
        int r;

        if (argc != 0)
                return usage();
        r = call(ctl, json_pack("{s:s}", "cmd", "status"), &st);
        if (r != 0)
                return r;
        if (ctl->json) {
                print_json(st);
                json_decref(st);
                return 0;
        }
        printf("Hub:       %s\n", json_string_value(json_object_get(st, "hub_id")));
        printf("Version:   %s\n", json_string_value(json_object_get(st, "version")));
        printf("Uptime:    %lld s\n", (long long) geti(st, "uptime_s", NULL));
        printf("Config:    %s\n", json_string_value(json_object_get(st, "config")));
        printf("MQTT:      %s\n",
               json_is_true(json_object_get(json_object_get(st, "mqtt"), "connected")) ? "connected"
                                                                                       : "disconnected");
        printf("Frames:    %lld received, %lld accepted\n", (long long) geti(st, "frames", "received"),
               (long long) geti(st, "frames", "accepted"));
        printf("Rejected: ");
        rej = json_object_get(json_object_get(st, "frames"), "rejected");
        json_object_foreach(rej, k, v) printf(" %s %lld", k, (long long) json_integer_value(v));
        printf("\nSpool:     %lld frames, %lld bytes\n", (long long) geti(st, "spool", "pending"),
               (long long) geti(st, "spool", "bytes"));
        {
                json_int_t damaged = json_integer_value(
                        json_object_get(json_object_get(json_object_get(st, "bulbs"), "key_cache"), "damaged"));
                printf("Bulbs:     %lld enrolled, %lld revoked", (long long) geti(st, "bulbs", "enrolled"),
                       (long long) geti(st, "bulbs", "revoked"));
                if (damaged > 0)
                        printf("; %lld stored keys DAMAGED (their frames are refused: enrol those bulbs again, "
                               "see the log)", (long long) damaged);
                putchar('\n');
        }
        {
                json_t *b = json_object_get(st, "broker");
                const char *e = json_string_value(json_object_get(b, "last_error"));
                if (json_is_true(json_object_get(b, "enabled")))
                        printf("Broker:    bulb clients %s; %lld created, %lld deleted by repairs%s%s\n",
                               json_is_true(json_object_get(b, "in_sync")) ? "in sync" : "NOT in sync",
                               (long long) geti(st, "broker", "created"), (long long) geti(st, "broker", "deleted"),
                               e ? "; " : "", e ? e : "");
                json_t *p = json_object_get(st, "pair");
                if (p)
                        printf("Pairing:   window %s; %lld enrolled, %lld refused; %lld hellos outside a window\n",
                               json_is_true(json_object_get(p, "window_open")) ? "open" : "closed",
                               (long long) geti(st, "pair", "enrolled"), (long long) geti(st, "pair", "refused"),
                               (long long) geti(st, "pair", "hellos_outside_window"));
        }
        if (json_is_true(json_object_get(json_object_get(st, "cloud"), "configured"))) {
                json_t *cl = json_object_get(st, "cloud"), *key = json_object_get(st, "key");
                const char *e = json_string_value(json_object_get(cl, "last_error"));
                printf("Cloud:     %lld frames uploaded in %lld batches, %lld rejected; last success %lld%s%s\n",
                       (long long) geti(st, "cloud", "uploaded"), (long long) geti(st, "cloud", "batches"),
                       (long long) geti(st, "cloud", "rejected"), (long long) geti(st, "cloud", "last_success"),
                       e ? "; " : "", e ? e : "");
                printf("Key:       %s (%s), %lld signatures\n",
                       json_string_value(json_object_get(key, "id")) ?: "none yet",
                       json_string_value(json_object_get(key, "backend")), (long long) geti(st, "key", "signatures"));
        }
        {
                json_t *o = json_object_get(st, "oauth");
                const char *state = json_string_value(json_object_get(o, "state"));
                if (state && !streq(state, "not_configured"))
                        printf("Sign-in:   %s%s, token valid until %lld\n", state,
                               json_is_true(json_object_get(o, "dpop")) ? " (DPoP)" : "",
                               (long long) geti(st, "oauth", "expires_at"));
        }
        {
                json_t *cm = json_object_get(st, "commands");
                if (cm)
                        printf("Commands:  %lld delivered, %lld acked, %lld expired\n",
                               (long long) geti(st, "commands", "delivered"), (long long) geti(st, "commands", "acked"),
                               (long long) geti(st, "commands", "expired"));
        }
        json_decref(st);
        return 0;
}

static int read_pem(const char *path, char **ret) {
        int r = read_file_limited(path, PEM_FILE_MAX, ret, NULL);
        if (r == -EFBIG)
                return fail("%s: larger than %d bytes, not a PEM file", path, PEM_FILE_MAX);
        if (r < 0)
                return fail("%s: %s", path, strerror(-r));
        return 0;
}

static int cmd_bulb_add(struct ctl *ctl, int argc, char **argv) {
        const char *id = NULL, *key = NULL, *cert = NULL;
        _cleanup_free_ char *pem = NULL;
        json_t *resp = NULL, *req, *broker;
        bool broker_password = false;
        int r;

        for (int i = 0; i < argc; i++) {
                if (streq(argv[i], "--broker-password"))
                        broker_password = true;
                else if (streq(argv[i], "--key") && i + 1 < argc)
                        key = argv[++i];
                else if (streq(argv[i], "--cert") && i + 1 < argc)
                        cert = argv[++i];
                else if (argv[i][0] != '-' && !id)
                        id = argv[i];
                else
                        return usage();
        }
        if (!!key == !!cert || (key && !id))
                return usage();
        if (id && !device_id_is_valid(id, strlen(id)))
                return fail("invalid device id '%s': 1 to 64 of [A-Za-z0-9._-], not starting with '.'", id);
        r = read_pem(key ? key : cert, &pem);
        if (r != 0)
                return r;
        req = json_pack("{s:s,s:s}", "cmd", "bulb-add", key ? "key" : "cert", pem);
        if (req && id)
                (void) json_object_set_new(req, "id", json_string(id));
        if (req && broker_password)
                (void) json_object_set_new(req, "broker_password", json_true());
        r = call(ctl, req, &resp);
        if (r != 0)
                return r;
        broker = json_object_get(resp, "broker");
        if (ctl->json)
                print_json(resp);
        else {
                const char *bid = json_string_value(json_object_get(json_object_get(resp, "bulb"), "id"));
                const char *pw = json_string_value(json_object_get(resp, "broker_password"));
                printf("Enrolled %s\n", bid);
                if (json_is_true(json_object_get(broker, "ok")))
                        printf("Broker client %s created\n", bid);
                /* Shown here once: the hub keeps no copy, the broker only a salted hash. */
                if (pw)
                        printf("Broker user name: %s\nBroker password:  %s\n(shown once: give it to the bulb now)\n",
                               bid, pw);
        }
        /* The password must not linger in this process either. */
        json_t *pwv = json_object_get(resp, "broker_password");
        if (json_is_string(pwv))
                explicit_bzero((char *) json_string_value(pwv), json_string_length(pwv));
        if (broker && !json_is_true(json_object_get(broker, "ok")))
                r = fail("enrolled, but the broker client was not created: %s",
                         json_string_value(json_object_get(broker, "error")) ?: "unknown error");
        json_decref(resp);
        return r;
}

static int cmd_bulb_list(struct ctl *ctl, int argc, char **argv) {
        json_t *resp = NULL, *b;
        size_t i;
        int r;

        if (argc != 0)
                return usage();
        r = call(ctl, json_pack("{s:s}", "cmd", "bulb-list"), &resp);
        if (r != 0)
                return r;
        if (ctl->json) {
                print_json(resp);
                json_decref(resp);
                return 0;
        }
        printf("%-32s %-6s %-8s %s\n", "ID", "ALG", "STATE", "LAST SEQ");
        json_array_foreach(json_object_get(resp, "bulbs"), i, b)
                printf("%-32s %-6s %-8s %lld\n", json_string_value(json_object_get(b, "id")),
                       json_string_value(json_object_get(b, "alg")),
                       json_is_true(json_object_get(b, "revoked")) ? "revoked" : "active",
                       (long long) json_integer_value(json_object_get(b, "last_seq")));
        json_decref(resp);
        return 0;
}

static int cmd_bulb_remove(struct ctl *ctl, int argc, char **argv) {
        json_t *resp = NULL;
        int r;

        if (argc != 1)
                return usage();
        r = call(ctl, json_pack("{s:s,s:s}", "cmd", "bulb-remove", "id", argv[0]), &resp);
        if (r != 0)
                return r;
        json_t *broker = json_incref(json_object_get(resp, "broker"));
        if (ctl->json)
                print_json(resp);
        else
                printf("Revoked %s%s\n", argv[0],
                       json_is_true(json_object_get(broker, "ok")) ? "; its broker client is deleted" : "");
        json_decref(resp);
        if (broker && !json_is_true(json_object_get(broker, "ok"))) {
                r = fail("revoked, but the broker client was not deleted: %s",
                         json_string_value(json_object_get(broker, "error")) ?: "unknown error");
                json_decref(broker);
                return r;
        }
        json_decref(broker);
        return 0;
}

static void on_pair_line(void *userdata, json_t *line) {
        struct ctl *ctl = userdata;

        if (ctl->json) {
                json_dumpf(line, stdout, JSON_COMPACT);
                fputc('\n', stdout);
        } else
                printf("%s\n", json_string_value(json_object_get(line, "message")) ?: "?");
        /* As it happens: a pipe to another program sees each line at once. */
        fflush(stdout);
}

static int cmd_bulb_pair(struct ctl *ctl, int argc, char **argv) {
        _cleanup_free_ char *path = NULL;
        json_int_t seconds = 60;
        json_t *req, *resp = NULL;
        int r;

        for (int i = 0; i < argc; i++) {
                if (streq(argv[i], "--for") && i + 1 < argc) {
                        char *end;
                        errno = 0;
                        long v = strtol(argv[++i], &end, 10);
                        if (errno || *end || end == argv[i] || v < 1 || v > 300)
                                return fail("--for: '%s' is not a number of seconds from 1 to 300", argv[i]);
                        seconds = v;
                } else
                        return usage();
        }
        if (asprintf(&path, "%s/%s", ctl->conf->hub.runtime_dir, CONTROL_SOCKET_NAME) < 0)
                return fail("out of memory");
        req = json_pack("{s:s,s:I}", "cmd", "bulb-pair", "for", seconds);
        if (!req)
                return fail("out of memory");
        r = control_call_stream(path, req, on_pair_line, ctl, &resp);
        json_decref(req);
        if (r == -ENOENT || r == -ECONNREFUSED) {
                fprintf(stderr, "iothubctl: the daemon is not running (no socket at %s)\n", path);
                return EXIT_UNAVAILABLE;
        }
        if (r < 0)
                return fail("%s: %s", path, strerror(-r));
        if (!json_is_true(json_object_get(resp, "ok"))) {
                const char *e = json_string_value(json_object_get(resp, "error"));
                fail("%s", e ? e : "the daemon refused the request");
                json_decref(resp);
                return 1;
        }
        if (ctl->json)
                print_json(resp);
        else
                printf("Pairing window closed: %zu enrolled, %lld refused\n",
                       json_array_size(json_object_get(resp, "enrolled")), (long long) geti(resp, "refused", NULL));
        json_decref(resp);
        return 0;
}

/* The user the daemon runs as: the owner of the state directory (systemd's StateDirectory=
 * makes it the unit's User=), else the 'iothub' user of the package, else nobody in particular
 * (-ENOENT: a development set-up where everything runs as one user). */
static int daemon_user(const struct iothub_conf *c, uid_t *ret_uid, gid_t *ret_gid) {
        struct passwd *pw;
        struct stat st;

        if (stat(c->hub.state_dir, &st) == 0) {
                *ret_uid = st.st_uid;
                *ret_gid = st.st_gid;
                return 0;
        }
        pw = getpwnam("iothub");
        if (!pw)
                return -ENOENT;
        *ret_uid = pw->pw_uid;
        *ret_gid = pw->pw_gid;
        return 0;
}

static const char *user_name(uid_t uid, char *buf, size_t len) {
        struct passwd *pw = getpwuid(uid);

        if (pw)
                return pw->pw_name;
        (void) snprintf(buf, len, "%u", (unsigned) uid);
        return buf;
}

/* With [key] backend = file the daemon reads the key file itself, and it is 0600: made by root
 * (as the documentation says to run key init) it would lock the daemon out. Gives it to the
 * daemon's user, through a descriptor opened without following links. */
static int key_file_give(const char *path, uid_t uid, gid_t gid) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
        struct stat st;

        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -EBADF;
        if (st.st_uid == uid && st.st_gid == gid)
                return 0;
        if (fchown(fd, uid, gid) < 0)
                return -errno;
        return 1;
}

static int cmd_key_init(struct ctl *ctl, int argc, char **argv) {
        _cleanup_free_ char *err = NULL;
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;
        bool created = false, file = ctl->conf->key.backend == KEY_BACKEND_FILE && ctl->conf->key.file;
        uid_t uid = 0;
        gid_t gid = 0;
        char ub[32];
        int r, given = 0;

        if (argc != 0)
                return usage();
        if (file && daemon_user(ctl->conf, &uid, &gid) >= 0 && geteuid() != 0 && geteuid() != uid)
                return fail("key init: the key file %s must belong to the daemon's user %s (the owner of %s): "
                            "run this as root%s%s",
                            ctl->conf->key.file, user_name(uid, ub, sizeof ub), ctl->conf->hub.state_dir,
                            uid != 0 ? " or as " : "", uid != 0 ? user_name(uid, ub, sizeof ub) : "");
        r = hubkey_init(ctl->conf, &created, &err);
        if (r < 0)
                return fail("key init: %s", err ? err : strerror(-r));
        if (file && geteuid() == 0 && daemon_user(ctl->conf, &uid, &gid) >= 0) {
                given = key_file_give(ctl->conf->key.file, uid, gid);
                if (given < 0)
                        return fail("key init: cannot give %s to the daemon's user %s: %s", ctl->conf->key.file,
                                    user_name(uid, ub, sizeof ub), strerror(-given));
        }
        r = hubkey_open(ctl->conf, &k, &err);
        if (r < 0)
                return fail("key init: %s", err ? err : strerror(-r));
        if (ctl->json) {
                json_t *o = json_pack("{s:b,s:s,s:s}", "created", created, "id", hubkey_id(k), "backend",
                                      key_backend_to_string(hubkey_backend(k)));
                print_json(o);
                json_decref(o);
        } else {
                printf("%s hub key %s (%s)\n", created ? "Created" : "Kept the existing", hubkey_id(k),
                       key_backend_to_string(hubkey_backend(k)));
                if (given > 0)
                        printf("Key file %s now belongs to %s, the daemon's user\n", ctl->conf->key.file,
                               user_name(uid, ub, sizeof ub));
        }
        return 0;
}

static int cmd_key_show(struct ctl *ctl, int argc, char **argv) {
        _cleanup_free_ char *err = NULL, *pem = NULL;
        _cleanup_(hubkey_freep) struct hubkey *k = NULL;
        bool want_pem = false, want_jwk = false;
        json_t *jwk = NULL;
        int r;

        for (int i = 0; i < argc; i++) {
                if (streq(argv[i], "--pem"))
                        want_pem = true;
                else if (streq(argv[i], "--jwk"))
                        want_jwk = true;
                else
                        return usage();
        }
        if (want_pem && want_jwk)
                return usage();
        r = hubkey_open(ctl->conf, &k, &err);
        if (r < 0)
                return fail("key show: %s", err ? err : strerror(-r));
        if (want_pem || !want_jwk) {
                r = hubkey_public_pem(k, &pem);
                if (r < 0)
                        return fail("key show: %s", strerror(-r));
        }
        if (want_jwk || ctl->json || !want_pem) {
                r = hubkey_public_jwk(k, &jwk);
                if (r < 0)
                        return fail("key show: %s", strerror(-r));
        }
        if (want_pem)
                fputs(pem, stdout);
        else if (want_jwk) {
                (void) json_object_set_new(jwk, "kid", json_string(hubkey_id(k)));
                json_dumpf(jwk, stdout, JSON_COMPACT);
                fputc('\n', stdout);
        } else if (ctl->json) {
                json_t *o = json_pack("{s:s,s:s,s:O,s:s}", "id", hubkey_id(k), "backend",
                                      key_backend_to_string(hubkey_backend(k)), "jwk", jwk, "pem", pem);
                print_json(o);
                json_decref(o);
        } else
                printf("Key id:  %s\nBackend: %s\n%s", hubkey_id(k), key_backend_to_string(hubkey_backend(k)), pem);
        json_decref(jwk);
        return 0;
}

static int cmd_register(struct ctl *ctl, int argc, char **argv) {
        json_t *resp = NULL;
        int r;

        if (argc != 0)
                return usage();
        r = call(ctl, json_pack("{s:s}", "cmd", "register"), &resp);
        if (r != 0)
                return r;
        if (ctl->json)
                print_json(resp);
        else
                printf("Registered hub %s with the cloud account\n", ctl->conf->hub.id);
        json_decref(resp);
        return 0;
}

/* A QR code of the URL on a terminal that shows one: two modules per character with the
 * half blocks, dark on light, with the quiet zone of four modules (ISO/IEC 18004). */
static void print_qr(const char *text) {
        QRcode *q = QRcode_encodeString(text, 0, QR_ECLEVEL_L, QR_MODE_8, 1);
        const int quiet = 4;

        if (!q)
                return;
        int w = q->width;
        for (int y = -quiet; y < w + quiet; y += 2) {
                for (int x = -quiet; x < w + quiet; x++) {
                        bool top = y >= 0 && y < w && x >= 0 && x < w && (q->data[y * w + x] & 1);
                        bool bottom = y + 1 >= 0 && y + 1 < w && x >= 0 && x < w && (q->data[(y + 1) * w + x] & 1);
                        /* Light is the block, dark is the gap: readable on dark and light terminals. */
                        fputs(top && bottom ? " " : top ? "\u2584" : bottom ? "\u2580" : "\u2588", stdout);
                }
                fputc('\n', stdout);
        }
        QRcode_free(q);
}

static int cmd_login(struct ctl *ctl, int argc, char **argv) {
        json_t *resp = NULL, *done = NULL;
        const char *uri, *complete, *code;
        int r;

        if (argc != 0)
                return usage();
        r = call(ctl, json_pack("{s:s}", "cmd", "login"), &resp);
        if (r != 0)
                return r;
        uri = json_string_value(json_object_get(resp, "verification_uri"));
        complete = json_string_value(json_object_get(resp, "verification_uri_complete"));
        code = json_string_value(json_object_get(resp, "user_code"));
        if (!uri || !code) {
                json_decref(resp);
                return fail("the daemon's answer has no verification URI or user code");
        }
        if (ctl->json) {
                (void) json_object_del(resp, "ok");
                json_dumpf(resp, stdout, JSON_COMPACT);
                fputc('\n', stdout);
        } else {
                printf("To sign this hub in, open\n\n    %s\n\nand enter the code\n\n    %s\n\n", uri, code);
                if (complete && isatty(STDOUT_FILENO)) {
                        printf("or scan this code with a phone (it opens %s):\n\n", complete);
                        print_qr(complete);
                }
                printf("Waiting (the code is valid for %lld seconds)...\n",
                       (long long) json_integer_value(json_object_get(resp, "expires_in")));
        }
        fflush(stdout);
        json_decref(resp);
        r = call(ctl, json_pack("{s:s}", "cmd", "login-wait"), &done);
        if (r != 0)
                return r;
        if (ctl->json)
                print_json(done);
        else
                printf("Signed in.\n");
        json_decref(done);
        return 0;
}

static int cmd_logout(struct ctl *ctl, int argc, char **argv) {
        json_t *resp = NULL;
        int r;

        if (argc != 0)
                return usage();
        r = call(ctl, json_pack("{s:s}", "cmd", "logout"), &resp);
        if (r != 0)
                return r;
        if (ctl->json)
                print_json(resp);
        else
                printf("Signed out: %s\n", json_string_value(json_object_get(resp, "message")));
        json_decref(resp);
        return 0;
}

/* Runs before the configuration is loaded: a broken configuration is its first finding. */
static int cmd_doctor(struct ctl *ctl, int argc, char **argv) {
        json_t *rep = NULL, *chk;
        const char *first;
        size_t i;
        int r;

        if (argc != 0)
                return usage();
        r = doctor_run(ctl->config, &rep);
        if (r < 0)
                return fail("doctor: %s", strerror(-r));
        first = json_string_value(json_object_get(rep, "first_failure"));
        if (ctl->json)
                print_json(rep);
        else {
                json_array_foreach(json_object_get(rep, "checks"), i, chk) {
                        const char *res = json_string_value(json_object_get(chk, "result"));
                        printf("%-8s %-11s %s\n", streq_ptr(res, "fail") ? "FAIL" : res,
                               json_string_value(json_object_get(chk, "check")),
                               json_string_value(json_object_get(chk, "message")));
                }
                if (first)
                        printf("\nFix first: %s: %s\n", first,
                               json_string_value(json_object_get(rep, "first_failure_message")));
                else
                        printf("\nNo problem found.\n");
        }
        json_decref(rep);
        return first ? 1 : 0;
}

int main(int argc, char *argv[]) {
        struct ctl ctl = { .config = IOTHUB_DEFAULT_CONFIG };
        _cleanup_free_ char *err = NULL;
        char *args[64];
        int n = 0, r;

        for (int i = 1; i < argc; i++) {
                if (streq(argv[i], "--config")) {
                        if (++i >= argc)
                                return usage();
                        ctl.config = argv[i];
                } else if (streq(argv[i], "--json"))
                        ctl.json = true;
                else if (streq(argv[i], "--help") || streq(argv[i], "-h")) {
                        usage();
                        return 0;
                } else if (n < (int) ELEMENTSOF(args))
                        args[n++] = argv[i];
                else
                        return usage();
        }
        if (n == 0)
                return usage();
        /* tpm2-tss would print its own lines; our one-line errors carry the decoded TPM error. */
        (void) setenv("TSS2_LOG", "all+none", 0);
        if (streq(args[0], "doctor"))
                return cmd_doctor(&ctl, n - 1, args + 1);
        r = conf_load(ctl.config, &ctl.conf, &err);
        if (r < 0) {
                fprintf(stderr, "iothubctl: %s\n", err ? err : strerror(-r));
                return 78;
        }
        if (streq(args[0], "status"))
                r = cmd_status(&ctl, n - 1, args + 1);
        else if (streq(args[0], "bulb") && n >= 2 && streq(args[1], "add"))
                r = cmd_bulb_add(&ctl, n - 2, args + 2);
        else if (streq(args[0], "bulb") && n >= 2 && streq(args[1], "list"))
                r = cmd_bulb_list(&ctl, n - 2, args + 2);
        else if (streq(args[0], "bulb") && n >= 2 && streq(args[1], "pair"))
                r = cmd_bulb_pair(&ctl, n - 2, args + 2);
        else if (streq(args[0], "bulb") && n >= 2 && streq(args[1], "remove"))
                r = cmd_bulb_remove(&ctl, n - 2, args + 2);
        else if (streq(args[0], "key") && n >= 2 && streq(args[1], "init"))
                r = cmd_key_init(&ctl, n - 2, args + 2);
        else if (streq(args[0], "key") && n >= 2 && streq(args[1], "show"))
                r = cmd_key_show(&ctl, n - 2, args + 2);
        else if (streq(args[0], "login"))
                r = cmd_login(&ctl, n - 1, args + 1);
        else if (streq(args[0], "logout"))
                r = cmd_logout(&ctl, n - 1, args + 1);
        else if (streq(args[0], "register"))
                r = cmd_register(&ctl, n - 1, args + 1);
        else
                r = usage();
        conf_free(ctl.conf);
        return r;
}
