/* SPDX-License-Identifier: MIT */
/* loadgen: the load generator and the bare-OpenSSL reference verifier of `make bench`.
 * Independent of the daemon on purpose: its own key generation, JWS signing, base64url and
 * verification code, straight on OpenSSL and libmosquitto (tests/bench/README.md).
 *
 *   loadgen keys    --dir D --bulbs N --alg ES256|EdDSA|mixed [--id-prefix P]
 *   loadgen frames  --dir D --frames M --out F [--bulbs N] [--seq-start S] [--iat T]
 *                   [--topic-prefix P] [--id-prefix P]
 *   loadgen publish --host 127.0.0.1 --port P --file F [--rate R] [--window W] [--timeout S]
 *   loadgen verify  --dir D --file F [--bulbs N] [--reuse] [--id-prefix P]
 *
 * Files: D/<id>.key.pem (PKCS#8 private key), D/<id>.pub.pem (SubjectPublicKeyInfo), with
 * <id> = <id-prefix><i> ("bulb-0", "bulb-1", ...). A frames file holds one frame a line:
 * "<topic> <JWS compact>\n". Every loop is bounded in count, and the network waits in time. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#define MAX_BULBS 100000
#define MAX_FRAMES 10000000
#define MAX_LINE 8192
#define ID_MAX 64

static const char *prog = "loadgen";

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) {
        va_list ap;

        fprintf(stderr, "%s: ", prog);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        ERR_print_errors_fp(stderr);
        exit(1);
}

static bool streq_arg(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}

static double now_mono(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
        struct rusage ru;

        if (getrusage(RUSAGE_SELF, &ru) < 0)
                die("getrusage: %s", strerror(errno));
        return (double) ru.ru_utime.tv_sec + (double) ru.ru_utime.tv_usec / 1e6 + (double) ru.ru_stime.tv_sec +
               (double) ru.ru_stime.tv_usec / 1e6;
}

static long parse_long(const char *name, const char *v, long min, long max) {
        char *end;
        long n;

        errno = 0;
        n = strtol(v, &end, 10);
        if (errno || end == v || *end || n < min || n > max)
                die("%s: '%s' is not an integer in %ld..%ld", name, v, min, max);
        return n;
}

/* ---- base64url (RFC 4648 5, no padding) ---- */

static const char b64u_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static size_t b64u_encode(const uint8_t *in, size_t len, char *out) {
        size_t o = 0, i = 0;

        for (; i + 3 <= len; i += 3) {
                uint32_t v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8 | in[i + 2];
                out[o++] = b64u_alphabet[v >> 18 & 63];
                out[o++] = b64u_alphabet[v >> 12 & 63];
                out[o++] = b64u_alphabet[v >> 6 & 63];
                out[o++] = b64u_alphabet[v & 63];
        }
        if (len - i == 1) {
                uint32_t v = (uint32_t) in[i] << 16;
                out[o++] = b64u_alphabet[v >> 18 & 63];
                out[o++] = b64u_alphabet[v >> 12 & 63];
        } else if (len - i == 2) {
                uint32_t v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8;
                out[o++] = b64u_alphabet[v >> 18 & 63];
                out[o++] = b64u_alphabet[v >> 12 & 63];
                out[o++] = b64u_alphabet[v >> 6 & 63];
        }
        out[o] = '\0';
        return o;
}

static int8_t b64u_table[256];

static void b64u_init(void) {
        memset(b64u_table, -1, sizeof b64u_table);
        for (int i = 0; i < 64; i++)
                b64u_table[(unsigned char) b64u_alphabet[i]] = (int8_t) i;
}

/* Returns the decoded length, or -1 on a character outside the alphabet, a length of 1 mod 4,
 * or more than 'max' output bytes. */
static long b64u_decode(const char *in, size_t len, uint8_t *out, size_t max) {
        size_t o = 0, i = 0;
        uint32_t v = 0;
        int bits = 0;

        if (len % 4 == 1)
                return -1;
        for (; i < len; i++) {
                int8_t d = b64u_table[(unsigned char) in[i]];
                if (d < 0)
                        return -1;
                v = v << 6 | (uint32_t) d;
                bits += 6;
                if (bits >= 8) {
                        bits -= 8;
                        if (o >= max)
                                return -1;
                        out[o++] = (uint8_t) (v >> bits);
                }
        }
        return (long) o;
}

/* ---- keys ---- */

enum alg { ALG_ES256, ALG_EDDSA };

struct bulb {
        char id[ID_MAX + 1];
        enum alg alg;
        EVP_PKEY *pkey;
        /* verify --reuse only: contexts set up once per key. */
        EVP_PKEY_CTX *pctx;
        EVP_MD_CTX *mdctx;
};

static const char *id_prefix = "bulb-";

static void bulb_id(char *buf, long i) {
        if (snprintf(buf, ID_MAX + 1, "%s%ld", id_prefix, i) > ID_MAX)
                die("device id too long");
}

static enum alg pkey_alg(EVP_PKEY *k, const char *path) {
        if (EVP_PKEY_is_a(k, "ED25519"))
                return ALG_EDDSA;
        if (EVP_PKEY_is_a(k, "EC"))
                return ALG_ES256;
        die("%s: neither a P-256 nor an Ed25519 key", path);
}

static EVP_PKEY *read_key(const char *dir, const char *id, bool private) {
        char path[PATH_MAX];
        EVP_PKEY *k;
        FILE *f;

        snprintf(path, sizeof path, "%s/%s.%s.pem", dir, id, private ? "key" : "pub");
        f = fopen(path, "re");
        if (!f)
                return NULL;
        k = private ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : PEM_read_PUBKEY(f, NULL, NULL, NULL);
        fclose(f);
        if (!k)
                die("%s: not a PEM key", path);
        return k;
}

/* Loads bulbs 0..n-1, or, with n == 0, every bulb until the first missing file. */
static struct bulb *load_bulbs(const char *dir, long *n, bool private) {
        long cap = *n > 0 ? *n : MAX_BULBS, i;
        struct bulb *b = calloc((size_t) cap, sizeof *b);

        if (!b)
                die("out of memory");
        for (i = 0; i < cap; i++) {
                char path[PATH_MAX];

                bulb_id(b[i].id, i);
                b[i].pkey = read_key(dir, b[i].id, private);
                if (!b[i].pkey) {
                        if (*n > 0)
                                die("%s/%s.%s.pem: %s", dir, b[i].id, private ? "key" : "pub", strerror(errno));
                        break;
                }
                snprintf(path, sizeof path, "%s/%s", dir, b[i].id);
                b[i].alg = pkey_alg(b[i].pkey, path);
        }
        if (i == 0)
                die("no keys in %s", dir);
        *n = i;
        return b;
}

static void free_bulbs(struct bulb *b, long n) {
        for (long i = 0; i < n; i++) {
                EVP_PKEY_free(b[i].pkey);
                EVP_PKEY_CTX_free(b[i].pctx);
                EVP_MD_CTX_free(b[i].mdctx);
        }
        free(b);
}

static void write_pem(const char *dir, const char *id, EVP_PKEY *k, bool private) {
        char path[PATH_MAX];
        FILE *f;
        int ok;

        snprintf(path, sizeof path, "%s/%s.%s.pem", dir, id, private ? "key" : "pub");
        f = fopen(path, "we");
        if (!f)
                die("%s: %s", path, strerror(errno));
        if (private)
                (void) fchmod(fileno(f), 0600);
        ok = private ? PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL) : PEM_write_PUBKEY(f, k);
        if (!ok || fclose(f) != 0)
                die("%s: cannot write", path);
}

static int cmd_keys(int argc, char **argv) {
        const char *dir = NULL, *alg = NULL;
        long n = 0;

        for (int i = 0; i < argc; i++) {
                if (streq_arg(argv[i], "--dir") && i + 1 < argc)
                        dir = argv[++i];
                else if (streq_arg(argv[i], "--bulbs") && i + 1 < argc)
                        n = parse_long("--bulbs", argv[++i], 1, MAX_BULBS);
                else if (streq_arg(argv[i], "--alg") && i + 1 < argc)
                        alg = argv[++i];
                else if (streq_arg(argv[i], "--id-prefix") && i + 1 < argc)
                        id_prefix = argv[++i];
                else
                        die("keys: unknown argument '%s'", argv[i]);
        }
        if (!dir || n == 0 || !alg)
                die("usage: loadgen keys --dir D --bulbs N --alg ES256|EdDSA|mixed");
        if (strcmp(alg, "ES256") && strcmp(alg, "EdDSA") && strcmp(alg, "mixed"))
                die("--alg: ES256, EdDSA or mixed");
        if (mkdir(dir, 0700) < 0 && errno != EEXIST)
                die("%s: %s", dir, strerror(errno));
        for (long i = 0; i < n; i++) {
                bool ed = !strcmp(alg, "EdDSA") || (!strcmp(alg, "mixed") && i % 2 == 1);
                char id[ID_MAX + 1];
                EVP_PKEY *k = ed ? EVP_PKEY_Q_keygen(NULL, NULL, "ED25519")
                                 : EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");

                if (!k)
                        die("key generation failed");
                bulb_id(id, i);
                write_pem(dir, id, k, true);
                write_pem(dir, id, k, false);
                EVP_PKEY_free(k);
        }
        printf("{\"bulbs\":%ld,\"alg\":\"%s\",\"dir\":\"%s\"}\n", n, alg, dir);
        return 0;
}

/* ---- frames: JWS Compact (RFC 7515 7.1), PROTOCOL.md 1 ---- */

static size_t sign_es256(EVP_PKEY *k, const uint8_t *msg, size_t len, uint8_t *out) {
        uint8_t der[80];
        const uint8_t *p = der;
        size_t der_len = sizeof der;
        const BIGNUM *r, *s;
        EVP_MD_CTX *c = EVP_MD_CTX_new();
        ECDSA_SIG *sig;

        if (!c || EVP_DigestSignInit_ex(c, NULL, "SHA256", NULL, NULL, k, NULL) != 1 ||
            EVP_DigestSign(c, der, &der_len, msg, len) != 1)
                die("ES256 signing failed");
        EVP_MD_CTX_free(c);
        /* RFC 7518 3.4: the JWS signature is R || S, 32 octets each, not the DER of OpenSSL. */
        sig = d2i_ECDSA_SIG(NULL, &p, (long) der_len);
        if (!sig)
                die("ES256: bad DER from OpenSSL");
        ECDSA_SIG_get0(sig, &r, &s);
        if (BN_bn2binpad(r, out, 32) != 32 || BN_bn2binpad(s, out + 32, 32) != 32)
                die("ES256: r or s too long");
        ECDSA_SIG_free(sig);
        return 64;
}

static size_t sign_eddsa(EVP_PKEY *k, const uint8_t *msg, size_t len, uint8_t *out) {
        size_t sig_len = 64;
        EVP_MD_CTX *c = EVP_MD_CTX_new();

        if (!c || EVP_DigestSignInit_ex(c, NULL, NULL, NULL, NULL, k, NULL) != 1 ||
            EVP_DigestSign(c, out, &sig_len, msg, len) != 1 || sig_len != 64)
                die("EdDSA signing failed");
        EVP_MD_CTX_free(c);
        return sig_len;
}

static int cmd_frames(int argc, char **argv) {
        const char *dir = NULL, *out = NULL, *topic_prefix = "iothub/v1/bulbs";
        long n = 0, frames = 0, seq_start = 1;
        long long iat = (long long) time(NULL);
        struct bulb *b;
        size_t total = 0;
        FILE *f;

        for (int i = 0; i < argc; i++) {
                if (streq_arg(argv[i], "--dir") && i + 1 < argc)
                        dir = argv[++i];
                else if (streq_arg(argv[i], "--frames") && i + 1 < argc)
                        frames = parse_long("--frames", argv[++i], 1, MAX_FRAMES);
                else if (streq_arg(argv[i], "--bulbs") && i + 1 < argc)
                        n = parse_long("--bulbs", argv[++i], 1, MAX_BULBS);
                else if (streq_arg(argv[i], "--seq-start") && i + 1 < argc)
                        seq_start = parse_long("--seq-start", argv[++i], 1, LONG_MAX / 2);
                else if (streq_arg(argv[i], "--iat") && i + 1 < argc)
                        iat = parse_long("--iat", argv[++i], 0, LONG_MAX);
                else if (streq_arg(argv[i], "--out") && i + 1 < argc)
                        out = argv[++i];
                else if (streq_arg(argv[i], "--topic-prefix") && i + 1 < argc)
                        topic_prefix = argv[++i];
                else if (streq_arg(argv[i], "--id-prefix") && i + 1 < argc)
                        id_prefix = argv[++i];
                else
                        die("frames: unknown argument '%s'", argv[i]);
        }
        if (!dir || !frames || !out)
                die("usage: loadgen frames --dir D --frames M --out F [--bulbs N] [--seq-start S] [--iat T]");
        b = load_bulbs(dir, &n, true);
        f = fopen(out, "we");
        if (!f)
                die("%s: %s", out, strerror(errno));
        for (long k = 0; k < frames; k++) {
                struct bulb *x = &b[k % n];
                long long seq = seq_start + k / n;
                char header[160], payload[256], h64[256], p64[384], input[700], s64[100];
                uint8_t sig[64];
                int hl, pl;
                size_t il, sl;

                /* Exactly the three members of PROTOCOL.md 1, in a fixed order. */
                hl = snprintf(header, sizeof header, "{\"alg\":\"%s\",\"kid\":\"%s\",\"typ\":\"iothub-status\"}",
                              x->alg == ALG_ES256 ? "ES256" : "EdDSA", x->id);
                pl = snprintf(payload, sizeof payload,
                              "{\"dev\":\"%s\",\"seq\":%lld,\"iat\":%lld,\"state\":{\"on\":true,\"bri\":%ld}}", x->id,
                              seq, iat, k % 255);
                if (hl <= 0 || (size_t) hl >= sizeof header || pl <= 0 || (size_t) pl >= sizeof payload)
                        die("frame too long");
                b64u_encode((const uint8_t *) header, (size_t) hl, h64);
                b64u_encode((const uint8_t *) payload, (size_t) pl, p64);
                il = (size_t) snprintf(input, sizeof input, "%s.%s", h64, p64);
                sl = x->alg == ALG_ES256 ? sign_es256(x->pkey, (const uint8_t *) input, il, sig)
                                         : sign_eddsa(x->pkey, (const uint8_t *) input, il, sig);
                b64u_encode(sig, sl, s64);
                if (fprintf(f, "%s/%s/status %s.%s\n", topic_prefix, x->id, input, s64) < 0)
                        die("%s: write failed", out);
                total += il + 1 + strlen(s64);
        }
        if (fclose(f) != 0)
                die("%s: %s", out, strerror(errno));
        printf("{\"frames\":%ld,\"bulbs\":%ld,\"avg_bytes\":%.1f,\"file\":\"%s\"}\n", frames, n,
               (double) total / (double) frames, out);
        free_bulbs(b, n); /* LeakSanitizer, when the tools are built with SAN=1 */
        return 0;
}

/* ---- reading a frames file ---- */

struct frame {
        char *topic, *jws;
        size_t jws_len;
};

static struct frame *read_frames(const char *path, long *ret_n, char **ret_buf) {
        struct frame *fr;
        long n = 0, cap = 1024;
        struct stat st;
        char *buf, *p, *end;
        FILE *f = fopen(path, "re");

        if (!f || fstat(fileno(f), &st) < 0)
                die("%s: %s", path, strerror(errno));
        if (st.st_size <= 0 || st.st_size > (off_t) MAX_FRAMES * MAX_LINE)
                die("%s: empty or too large", path);
        buf = malloc((size_t) st.st_size + 1);
        fr = malloc((size_t) cap * sizeof *fr);
        if (!buf || !fr)
                die("out of memory");
        if (fread(buf, 1, (size_t) st.st_size, f) != (size_t) st.st_size)
                die("%s: short read", path);
        fclose(f);
        buf[st.st_size] = '\0';
        end = buf + st.st_size;
        for (p = buf; p < end && n < MAX_FRAMES;) {
                char *nl = memchr(p, '\n', (size_t) (end - p)), *sp;

                if (!nl)
                        nl = end;
                *nl = '\0';
                sp = memchr(p, ' ', (size_t) (nl - p));
                if (!sp)
                        die("%s: line %ld: no topic", path, n + 1);
                *sp = '\0';
                if (n == cap) {
                        cap *= 2;
                        fr = realloc(fr, (size_t) cap * sizeof *fr);
                        if (!fr)
                                die("out of memory");
                }
                fr[n].topic = p;
                fr[n].jws = sp + 1;
                fr[n].jws_len = (size_t) (nl - sp - 1);
                n++;
                p = nl + 1;
        }
        *ret_n = n;
        *ret_buf = buf;
        return fr;
}

/* ---- publish: QoS 1, bounded window, waits for every PUBACK ---- */

struct pub {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        bool connected, gone;
        int connack;
        long acked;
};

static void on_connect(struct mosquitto *m, void *ud, int rc) {
        struct pub *p = ud;

        pthread_mutex_lock(&p->lock);
        p->connack = rc;
        if (rc == 0)
                p->connected = true;
        else
                p->gone = true;
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->lock);
}

static void on_disconnect(struct mosquitto *m, void *ud, int rc) {
        struct pub *p = ud;

        pthread_mutex_lock(&p->lock);
        p->gone = true;
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->lock);
}

static void on_publish(struct mosquitto *m, void *ud, int mid) {
        struct pub *p = ud;

        pthread_mutex_lock(&p->lock);
        p->acked++;
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->lock);
}

static void deadline_ts(struct timespec *ts, double abs_mono) {
        ts->tv_sec = (time_t) abs_mono;
        ts->tv_nsec = (long) ((abs_mono - (double) ts->tv_sec) * 1e9);
        if (ts->tv_nsec >= 1000000000L) {
                ts->tv_sec++;
                ts->tv_nsec -= 1000000000L;
        }
}

static int cmd_publish(int argc, char **argv) {
        const char *host = "127.0.0.1", *file = NULL;
        long port = 0, window = 1000, timeout_s = 300, n = 0, sent = 0;
        double rate = 0, t0, t1, deadline;
        struct pub p = { .connack = -1 };
        pthread_condattr_t ca;
        struct mosquitto *m;
        struct frame *fr;
        char id[64], *buf;
        int rc;

        for (int i = 0; i < argc; i++) {
                if (streq_arg(argv[i], "--host") && i + 1 < argc)
                        host = argv[++i];
                else if (streq_arg(argv[i], "--port") && i + 1 < argc)
                        port = parse_long("--port", argv[++i], 1, 65535);
                else if (streq_arg(argv[i], "--file") && i + 1 < argc)
                        file = argv[++i];
                else if (streq_arg(argv[i], "--rate") && i + 1 < argc)
                        rate = (double) parse_long("--rate", argv[++i], 1, 10000000);
                else if (streq_arg(argv[i], "--window") && i + 1 < argc)
                        window = parse_long("--window", argv[++i], 1, 65535);
                else if (streq_arg(argv[i], "--timeout") && i + 1 < argc)
                        timeout_s = parse_long("--timeout", argv[++i], 1, 3600);
                else
                        die("publish: unknown argument '%s'", argv[i]);
        }
        if (!port || !file)
                die("usage: loadgen publish --host 127.0.0.1 --port P --file F [--rate R] [--window W]");
        if (strcmp(host, "127.0.0.1") && strcmp(host, "localhost") && strcmp(host, "::1"))
                die("--host: loopback only");
        fr = read_frames(file, &n, &buf);

        pthread_mutex_init(&p.lock, NULL);
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&p.cond, &ca);
        mosquitto_lib_init();
        snprintf(id, sizeof id, "loadgen-%ld", (long) getpid());
        m = mosquitto_new(id, true, &p);
        if (!m)
                die("mosquitto_new: %s", strerror(errno));
        (void) mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
        /* The library's own window equals ours, so it never queues behind our back. */
        (void) mosquitto_max_inflight_messages_set(m, (unsigned) window);
        mosquitto_connect_callback_set(m, on_connect);
        mosquitto_disconnect_callback_set(m, on_disconnect);
        mosquitto_publish_callback_set(m, on_publish);
        rc = mosquitto_connect(m, host, (int) port, 30);
        if (rc != MOSQ_ERR_SUCCESS)
                die("connect %s:%ld: %s", host, port, mosquitto_strerror(rc));
        rc = mosquitto_loop_start(m);
        if (rc != MOSQ_ERR_SUCCESS)
                die("loop_start: %s", mosquitto_strerror(rc));

        deadline = now_mono() + 10;
        pthread_mutex_lock(&p.lock);
        while (!p.connected && !p.gone && now_mono() < deadline) {
                struct timespec ts;
                deadline_ts(&ts, deadline);
                (void) pthread_cond_timedwait(&p.cond, &p.lock, &ts);
        }
        pthread_mutex_unlock(&p.lock);
        if (!p.connected)
                die("no CONNACK from %s:%ld (%d)", host, port, p.connack);

        t0 = now_mono();
        deadline = t0 + (double) timeout_s;
        for (long i = 0; i < n; i++) {
                bool stop = false;

                pthread_mutex_lock(&p.lock);
                while (sent - p.acked >= window && !p.gone && now_mono() < deadline) {
                        struct timespec ts;
                        deadline_ts(&ts, deadline);
                        (void) pthread_cond_timedwait(&p.cond, &p.lock, &ts);
                }
                stop = p.gone || now_mono() >= deadline;
                pthread_mutex_unlock(&p.lock);
                if (stop)
                        break;
                if (rate > 0) {
                        double due = t0 + (double) i / rate, now = now_mono();
                        if (due > now) {
                                struct timespec ts = { .tv_sec = (time_t) (due - now),
                                                       .tv_nsec = (long) ((due - now - (double) (time_t) (due - now)) * 1e9) };
                                (void) nanosleep(&ts, NULL);
                        }
                }
                rc = mosquitto_publish(m, NULL, fr[i].topic, (int) fr[i].jws_len, fr[i].jws, 1, false);
                if (rc != MOSQ_ERR_SUCCESS) {
                        fprintf(stderr, "%s: publish %ld: %s\n", prog, i, mosquitto_strerror(rc));
                        break;
                }
                sent++;
        }
        pthread_mutex_lock(&p.lock);
        while (p.acked < sent && !p.gone && now_mono() < deadline) {
                struct timespec ts;
                deadline_ts(&ts, deadline);
                (void) pthread_cond_timedwait(&p.cond, &p.lock, &ts);
        }
        t1 = now_mono();
        long acked = p.acked;
        pthread_mutex_unlock(&p.lock);

        (void) mosquitto_disconnect(m);
        (void) mosquitto_loop_stop(m, false);
        mosquitto_destroy(m);
        mosquitto_lib_cleanup();
        /* The process's CPU, the frames file's reading and all (a bench counts the test bed's
         * load beside the hub's, tests/bench/relay.mjs). */
        printf("{\"sent\":%ld,\"acked\":%ld,\"seconds\":%.4f,\"per_second\":%.1f,\"cpu_us\":%.0f}\n", sent, acked,
               t1 - t0, (double) acked / (t1 - t0), cpu_seconds() * 1e6);
        free(fr);
        free(buf);
        return acked == n ? 0 : 1;
}

/* ---- verify: what a minimal verifier does per frame, with plain OpenSSL ---- */

static int bulb_cmp(const void *a, const void *b) {
        return strcmp(((const struct bulb *) a)->id, ((const struct bulb *) b)->id);
}

/* The string value of "name" in a flat JSON object: enough for a header we parse only to
 * find the key (a minimal verifier trusts the signature, not the header, for the rest). */
static bool json_str(const char *json, size_t len, const char *name, char *out, size_t max) {
        char pat[16];
        const char *p, *q;
        int pl = snprintf(pat, sizeof pat, "\"%s\":\"", name);

        p = memmem(json, len, pat, (size_t) pl);
        if (!p)
                return false;
        p += pl;
        q = memchr(p, '"', (size_t) (json + len - p));
        if (!q || (size_t) (q - p) >= max)
                return false;
        memcpy(out, p, (size_t) (q - p));
        out[q - p] = '\0';
        return true;
}

/* r || s (RFC 7518 3.4) to the DER ECDSA-Sig-Value OpenSSL verifies, via OpenSSL's own types. */
static int es256_der(const uint8_t *sig, uint8_t *der, size_t max) {
        ECDSA_SIG *s = ECDSA_SIG_new();
        BIGNUM *r = BN_bin2bn(sig, 32, NULL), *ss = BN_bin2bn(sig + 32, 32, NULL);
        uint8_t *p = der;
        int n;

        if (!s || !r || !ss || ECDSA_SIG_set0(s, r, ss) != 1)
                die("out of memory");
        n = i2d_ECDSA_SIG(s, NULL);
        if (n <= 0 || (size_t) n > max)
                die("i2d_ECDSA_SIG");
        n = i2d_ECDSA_SIG(s, &p);
        ECDSA_SIG_free(s);
        return n;
}

static bool verify_one(struct bulb *bulbs, long nb, const char *jws, size_t len, bool reuse) {
        uint8_t header[512], payload[2048], sig[128], der[80];
        char alg[16], kid[ID_MAX + 1];
        const char *d1, *d2;
        long hl, pl, sl;
        struct bulb key, *b;
        const uint8_t *s;
        size_t slen;
        int ok;

        d1 = memchr(jws, '.', len);
        d2 = d1 ? memchr(d1 + 1, '.', (size_t) (jws + len - d1 - 1)) : NULL;
        if (!d2)
                return false;
        hl = b64u_decode(jws, (size_t) (d1 - jws), header, sizeof header);
        pl = b64u_decode(d1 + 1, (size_t) (d2 - d1 - 1), payload, sizeof payload);
        sl = b64u_decode(d2 + 1, (size_t) (jws + len - d2 - 1), sig, sizeof sig);
        if (hl < 0 || pl < 0 || sl < 0)
                return false;
        if (!json_str((const char *) header, (size_t) hl, "alg", alg, sizeof alg) ||
            !json_str((const char *) header, (size_t) hl, "kid", kid, sizeof kid))
                return false;
        memcpy(key.id, kid, sizeof kid);
        b = bsearch(&key, bulbs, (size_t) nb, sizeof *bulbs, bulb_cmp);
        if (!b)
                return false;
        if (b->alg == ALG_ES256) {
                if (strcmp(alg, "ES256") || sl != 64)
                        return false;
                slen = (size_t) es256_der(sig, der, sizeof der);
                s = der;
        } else {
                if (strcmp(alg, "EdDSA") || sl != 64)
                        return false;
                slen = 64;
                s = sig;
        }
        if (!reuse) {
                /* A freshly set-up context per frame: the textbook EVP_DigestVerify. */
                EVP_MD_CTX *c = EVP_MD_CTX_new();

                if (!c || EVP_DigestVerifyInit(c, NULL, b->alg == ALG_ES256 ? EVP_sha256() : NULL, NULL,
                                               b->pkey) != 1)
                        die("EVP_DigestVerifyInit");
                ok = EVP_DigestVerify(c, s, slen, (const uint8_t *) jws, (size_t) (d2 - jws));
                EVP_MD_CTX_free(c);
        } else if (b->alg == ALG_ES256) {
                /* Context made once per key: hash, then the bare ECDSA verify. */
                uint8_t digest[32];

                if (!b->pctx) {
                        b->pctx = EVP_PKEY_CTX_new_from_pkey(NULL, b->pkey, NULL);
                        if (!b->pctx || EVP_PKEY_verify_init(b->pctx) != 1 ||
                            EVP_PKEY_CTX_set_signature_md(b->pctx, EVP_sha256()) != 1)
                                die("EVP_PKEY_verify_init");
                }
                if (EVP_Digest(jws, (size_t) (d2 - jws), digest, NULL, EVP_sha256(), NULL) != 1)
                        die("EVP_Digest");
                ok = EVP_PKEY_verify(b->pctx, s, slen, digest, sizeof digest);
        } else {
                if (!b->mdctx && !(b->mdctx = EVP_MD_CTX_new()))
                        die("out of memory");
                if (EVP_DigestVerifyInit_ex(b->mdctx, NULL, NULL, NULL, NULL, b->pkey, NULL) != 1)
                        die("EVP_DigestVerifyInit_ex");
                ok = EVP_DigestVerify(b->mdctx, s, slen, (const uint8_t *) jws, (size_t) (d2 - jws));
        }
        if (ok != 1)
                ERR_clear_error();
        return ok == 1;
}

static int cmd_verify(int argc, char **argv) {
        const char *dir = NULL, *file = NULL;
        long nb = 0, n = 0, good = 0;
        bool reuse = false;
        double c0, c1, t0, t1;
        struct bulb *bulbs;
        struct frame *fr;
        char *buf;

        for (int i = 0; i < argc; i++) {
                if (streq_arg(argv[i], "--dir") && i + 1 < argc)
                        dir = argv[++i];
                else if (streq_arg(argv[i], "--file") && i + 1 < argc)
                        file = argv[++i];
                else if (streq_arg(argv[i], "--bulbs") && i + 1 < argc)
                        nb = parse_long("--bulbs", argv[++i], 1, MAX_BULBS);
                else if (streq_arg(argv[i], "--reuse"))
                        reuse = true;
                else if (streq_arg(argv[i], "--id-prefix") && i + 1 < argc)
                        id_prefix = argv[++i];
                else
                        die("verify: unknown argument '%s'", argv[i]);
        }
        if (!dir || !file)
                die("usage: loadgen verify --dir D --file F [--reuse]");
        bulbs = load_bulbs(dir, &nb, false);
        qsort(bulbs, (size_t) nb, sizeof *bulbs, bulb_cmp);
        fr = read_frames(file, &n, &buf);

        /* Only the loop is measured: keys and the file are loaded above. */
        c0 = cpu_seconds();
        t0 = now_mono();
        for (long i = 0; i < n; i++)
                good += verify_one(bulbs, nb, fr[i].jws, fr[i].jws_len, reuse);
        t1 = now_mono();
        c1 = cpu_seconds();

        printf("{\"frames\":%ld,\"verified\":%ld,\"mode\":\"%s\",\"cpu_seconds\":%.4f,\"wall_seconds\":%.4f,"
               "\"per_frame_us\":%.3f}\n",
               n, good, reuse ? "reuse" : "fresh", c1 - c0, t1 - t0, (c1 - c0) * 1e6 / (double) n);
        for (long i = 0; i < nb; i++) {
                EVP_PKEY_CTX_free(bulbs[i].pctx);
                EVP_MD_CTX_free(bulbs[i].mdctx);
                EVP_PKEY_free(bulbs[i].pkey);
        }
        free(bulbs);
        free(fr);
        free(buf);
        return good == n ? 0 : 1;
}

int main(int argc, char **argv) {
        b64u_init();
        if (argc < 2)
                goto usage;
        if (!strcmp(argv[1], "keys"))
                return cmd_keys(argc - 2, argv + 2);
        if (!strcmp(argv[1], "frames"))
                return cmd_frames(argc - 2, argv + 2);
        if (!strcmp(argv[1], "publish"))
                return cmd_publish(argc - 2, argv + 2);
        if (!strcmp(argv[1], "verify"))
                return cmd_verify(argc - 2, argv + 2);
usage:
        fprintf(stderr, "usage: loadgen keys|frames|publish|verify ... (see tests/bench/README.md)\n");
        return 64;
}
