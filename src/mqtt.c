/* SPDX-License-Identifier: MIT */
/* libmosquitto from sd-event: the library never gets a thread of its own. We watch its socket
 * (mosquitto_socket), call mosquitto_loop_read/_write when it is ready, and loop_misc once a
 * second for keepalives. Reconnects back off exponentially with full jitter. */
#include <mosquitto.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>

#include "iothub/log.h"
#include "iothub/mqtt.h"

#define MQTT_BACKOFF_MIN_MS 500u
#define MQTT_BACKOFF_MAX_MS 30000u
#define MQTT_MISC_INTERVAL_USEC (1000 * UINT64_C(1000))
#define MQTT_PASSWORD_MAX 1024
#define MQTT_EXTRA_SUBS_MAX 4    /* topics beyond <prefix>/+/status (dynsec answers, pairing) */
/* Incoming messages handled per wake-up, then the loop runs the others (the control socket, the
 * TPM's answer, HTTP): at most this many, and for at most this long (measured: a wake-up could
 * hold the loop for seconds under 5,000 frames/s, see on_io). 10 ms is ~60 frames on x86, about
 * 15 on a Pi; the group commit of each wake-up stays large enough to keep fsyncs few. */
#define MQTT_READ_BURST_MAX 512
#define MQTT_READ_BUDGET_USEC (10 * UINT64_C(1000))
/* Wake-up coalescing (issue 13, CPU): when the socket was read less than this long ago, the
 * next read waits until this long after it, with EPOLLIN off meanwhile, so that a steady stream
 * is read a few messages at a time instead of one per wake-up. A wake-up (epoll_wait, the
 * scheduler, the broker's write waking us) cost about as much as the rest of a frame's non-crypto
 * work in this VM: at 2,000 frames/s iothubd took 1.6x a bare verify per frame, unpaced 1.2x.
 * It delays nothing that waits on us: frames are held for the group commit anyway ([frames]
 * commit_delay_ms, 50 ms by default, ingest.c), what we publish is written at once, and a quiet
 * socket (no message for this long) goes back to waking us at once. */
#define MQTT_READ_HOLD_USEC (4 * UINT64_C(1000))
#define MQTT_READ_HOLD_ACCURACY_USEC (1 * UINT64_C(1000))
/* QoS 1 messages of ours in flight (published, PUBACK not yet read) before libmosquitto holds
 * the next ones back in its own queue, in order. Its default, 20, throttled everything we
 * publish to 20 per PUBACK round trip, and under load that trip includes the loop's stalls
 * (a commit's fdatasync, a read burst): the end-to-end acks (up to 10/s per bulb) then queued,
 * and a command published behind them waited seconds before its first byte left (issue 13,
 * tests/bench/commands.mjs: published -> at broker p99 570 ms, max 1.7 s beside 2,000 frames/s).
 * Not much more than needed either: libmosquitto 2.0 walks its whole list of messages in
 * flight at every publish and every PUBACK (message__release_to_inflight()), so the window is
 * also a cost per frame. With 4096 the broker, slow under load, let thousands build up, and
 * that walk was 6.8 % of iothubd's CPU in the relay bench (perf, unpaced, 200 bulbs); with 256
 * it is under 1 %, and a command beside 2,000 frames/s reached its bulb no later (p99 128 ms,
 * published -> at broker p99 15 ms; 166 and 15 ms with 4096 in the same sitting).
 * The window only paces, it bounds nothing: a message held back is in memory all the same.
 * Below 65,536 so that packet ids in flight stay unique (MQTT 3.1.1 2.3.1). */
#define MQTT_SEND_MAXIMUM 256

struct mqtt {
        sd_event *event;
        struct mosquitto *mosq;
        sd_event_source *io, *misc, *reconnect;
        sd_event_source *hold; /* the next read of a busy socket (MQTT_READ_HOLD_USEC) */
        bool holding;          /* EPOLLIN is off until hold fires */
        uint64_t last_read;    /* when the socket was last read (monotonic, us) */
        struct mqtt_callbacks cb;
        void *userdata;
        char *host;
        int port, keepalive;
        char *sub_topic;
        char *extra_subs[MQTT_EXTRA_SUBS_MAX];
        size_t n_extra_subs;
        bool connected;
        unsigned reconnect_failures; /* since the last accepted connection */
        /* The read budget of the current wake-up (on_io). */
        bool reading;
        bool budget_spent;
        unsigned burst_messages;
        uint64_t burst_deadline;
        char tls_error[160];         /* libmosquitto's last OpenSSL error line (on_log()) */
        /* Messages handed to libmosquitto whose on_publish has not come yet (QoS 1: no PUBACK
         * yet): its queue, which has no bound of its own (mqtt_unacked()). */
        uint64_t unacked;
};

int mqtt_errno(int rc) {
        switch (rc) {
        case MOSQ_ERR_SUCCESS:
                return 0;
        case MOSQ_ERR_NOMEM:
                return -ENOMEM;
        case MOSQ_ERR_INVAL:
        case MOSQ_ERR_MALFORMED_UTF8:
        case MOSQ_ERR_PAYLOAD_SIZE:
                return -EINVAL;
        case MOSQ_ERR_NO_CONN:
                return -ENOTCONN;
        case MOSQ_ERR_CONN_REFUSED:
                return -ECONNREFUSED;
        case MOSQ_ERR_CONN_LOST:
                return -ECONNRESET;
        case MOSQ_ERR_TLS:
        case MOSQ_ERR_TLS_HANDSHAKE:
                return -EPROTO;
        case MOSQ_ERR_PROTOCOL:
        case MOSQ_ERR_MALFORMED_PACKET:
                return -EBADMSG;
        case MOSQ_ERR_NOT_SUPPORTED:
                return -EOPNOTSUPP;
        case MOSQ_ERR_AUTH:
                return -EACCES;
        case MOSQ_ERR_ERRNO:
                return errno > 0 ? -errno : -EIO;
        case MOSQ_ERR_EAI:
                return -EHOSTUNREACH;
        case MOSQ_ERR_KEEPALIVE:
                return -ETIMEDOUT;
        default:
                return -EIO;
        }
}

static void mqtt_schedule_reconnect(struct mqtt *m);

static void mqtt_set_connected(struct mqtt *m, bool on) {
        if (m->connected == on)
                return;
        m->connected = on;
        if (m->cb.connected)
                m->cb.connected(m->userdata, on);
}

/* libmosquitto says why a TLS handshake failed ("certificate verify failed") only through its
 * log callback, after taking the reason off OpenSSL's error queue: keep the last such line for
 * the "lost" message, which would otherwise only say "A TLS error occurred". The text is
 * OpenSSL's own, not the peer's. */
static void on_log(struct mosquitto *mosq, void *userdata, int level, const char *str) {
        struct mqtt *m = userdata;

        if (level == MOSQ_LOG_ERR && str && strncmp(str, "OpenSSL Error", strlen("OpenSSL Error")) == 0)
                (void) snprintf(m->tls_error, sizeof m->tls_error, "%s", str);
}

/* The connection is gone: stop watching the old socket and try again later. */
static void mqtt_lost(struct mqtt *m, int rc) {
        m->holding = false;
        if (m->hold)
                (void) sd_event_source_set_enabled(m->hold, SD_EVENT_OFF);
        if (m->io) {
                m->io = sd_event_source_disable_unref(m->io);
                if (m->connected || rc != MOSQ_ERR_SUCCESS)
                        log_event(LOG_WARNING, mqtt_errno(rc), IOTHUB_MID_MQTT_DISCONNECTED, NULL, NULL,
                                  "Connection to MQTT broker %s:%d lost: %s%s%s%s", m->host, m->port,
                                  mosquitto_strerror(rc), rc == MOSQ_ERR_TLS && m->tls_error[0] ? " (" : "",
                                  rc == MOSQ_ERR_TLS ? m->tls_error : "",
                                  rc == MOSQ_ERR_TLS && m->tls_error[0] ? ")" : "");
        }
        m->tls_error[0] = '\0';
        mqtt_set_connected(m, false);
        mqtt_schedule_reconnect(m);
}

static void mqtt_update_events(struct mqtt *m) {
        /* While holding, no EPOLLIN; epoll reports EPOLLHUP and EPOLLERR all the same. */
        if (m->io)
                (void) sd_event_source_set_io_events(m->io, (m->holding ? 0 : EPOLLIN) |
                                                                    (mosquitto_want_write(m->mosq) ? EPOLLOUT : 0));
}

/* Reads what the socket holds, within the budget (one wake-up's worth); m->burst_messages says
 * how many messages came. */
static int mqtt_read(struct mqtt *m, int fd) {
        int rc = MOSQ_ERR_SUCCESS;

        /* libmosquitto 2.0's loop_read may return after one packet (or after many, see
         * on_message): drain what the socket holds within the budget, so that one commit covers
         * the whole burst (group commit). */
        m->reading = true;
        m->budget_spent = false;
        m->burst_messages = 0;
        m->last_read = now_monotonic_usec();
        m->burst_deadline = m->last_read + MQTT_READ_BUDGET_USEC;
        for (unsigned i = 0; i < MQTT_READ_BURST_MAX && !m->budget_spent; i++) {
                int avail = 0;

                SSL *ssl;

                rc = mosquitto_loop_read(m->mosq, 1);
                if (rc != MOSQ_ERR_SUCCESS || m->budget_spent)
                        break;
                /* With TLS, records already read from the socket wait inside OpenSSL, where
                 * epoll cannot see them: they must be drained here too. */
                ssl = mosquitto_ssl_get(m->mosq);
                if (ssl && SSL_pending(ssl) > 0)
                        continue;
                if (ioctl(fd, FIONREAD, &avail) < 0 || avail <= 0)
                        break;
        }
        m->reading = false;
        /* Hand over the messages of this read before anything else happens. */
        if (m->cb.read_done)
                m->cb.read_done(m->userdata);
        return rc;
}

/* Whether the socket has anything for mqtt_read(): bytes in the kernel or TLS records inside
 * OpenSSL. */
static bool mqtt_readable(struct mqtt *m, int fd) {
        SSL *ssl = mosquitto_ssl_get(m->mosq);
        int avail = 0;

        if (ssl && SSL_pending(ssl) > 0)
                return true;
        return ioctl(fd, FIONREAD, &avail) < 0 || avail > 0; /* an error: let the read report it */
}

/* Reads the socket again at `when` (CLOCK_MONOTONIC), with EPOLLIN off until then: the socket is
 * busy (MQTT_READ_HOLD_USEC after the last read), or TLS records wait inside OpenSSL after a read
 * cut off at the budget (at once: on the next loop iteration). */
static int on_hold(sd_event_source *s, uint64_t usec, void *userdata);
static void mqtt_hold(struct mqtt *m, uint64_t when) {
        int r;

        if (!m->hold) {
                r = sd_event_add_time(m->event, &m->hold, CLOCK_MONOTONIC, when, MQTT_READ_HOLD_ACCURACY_USEC,
                                      on_hold, m);
                if (r >= 0) {
                        (void) sd_event_source_set_description(m->hold, "mqtt-hold");
                        /* As the socket's: behind the control socket, the TPM and HTTP. */
                        r = sd_event_source_set_priority(m->hold, SD_EVENT_PRIORITY_NORMAL + 10);
                }
        } else {
                r = sd_event_source_set_time(m->hold, when);
                if (r >= 0)
                        r = sd_event_source_set_enabled(m->hold, SD_EVENT_ONESHOT);
        }
        /* Without the timer, read as before: at once. */
        m->holding = r >= 0;
}

static int on_hold(sd_event_source *s, uint64_t usec, void *userdata) {
        struct mqtt *m = userdata;
        int fd, rc;

        m->holding = false;
        if (!m->io)
                return 0;
        fd = mosquitto_socket(m->mosq);
        if (fd < 0 || !mqtt_readable(m, fd)) {
                /* Quiet for MQTT_READ_HOLD_USEC: wake at once on the next message again. */
                mqtt_update_events(m);
                return 0;
        }
        rc = mqtt_read(m, fd);
        if (rc != MOSQ_ERR_SUCCESS) {
                mqtt_lost(m, rc);
                return 0;
        }
        if (m->io) {
                SSL *ssl = mosquitto_ssl_get(m->mosq);

                /* Past the budget, what is left in the kernel is read on the next loop iteration
                 * (EPOLLIN back on); what is left inside OpenSSL, which epoll cannot see, too. */
                if (ssl && SSL_pending(ssl) > 0)
                        mqtt_hold(m, 0);
                else if (!m->budget_spent)
                        mqtt_hold(m, m->last_read + MQTT_READ_HOLD_USEC);
        }
        mqtt_update_events(m);
        return 0;
}

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct mqtt *m = userdata;
        int rc = MOSQ_ERR_SUCCESS;

        if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                bool busy = m->last_read > 0 && now_monotonic_usec() - m->last_read < MQTT_READ_HOLD_USEC;

                rc = mqtt_read(m, fd);
                /* Cut off at the bound with TLS records still inside OpenSSL: epoll will not
                 * report them, so come back on the next loop iteration. */
                SSL *ssl = rc == MOSQ_ERR_SUCCESS && m->io ? mosquitto_ssl_get(m->mosq) : NULL;
                if (ssl && SSL_pending(ssl) > 0)
                        mqtt_hold(m, 0);
                else if (rc == MOSQ_ERR_SUCCESS && busy && !m->budget_spent && !m->holding && m->io)
                        mqtt_hold(m, m->last_read + MQTT_READ_HOLD_USEC);
        }
        if (rc == MOSQ_ERR_SUCCESS && (revents & EPOLLOUT))
                rc = mosquitto_loop_write(m->mosq, 1);
        if (rc != MOSQ_ERR_SUCCESS) {
                mqtt_lost(m, rc);
                return 0;
        }
        mqtt_update_events(m);
        return 0;
}

static int mqtt_watch_socket(struct mqtt *m) {
        int fd = mosquitto_socket(m->mosq), r;

        if (fd < 0)
                return -ENOTCONN;
        m->io = sd_event_source_disable_unref(m->io);
        m->holding = false;
        m->last_read = 0;
        if (m->hold)
                (void) sd_event_source_set_enabled(m->hold, SD_EVENT_OFF);
        r = sd_event_add_io(m->event, &m->io, fd, EPOLLIN | EPOLLOUT, on_io, m);
        if (r < 0)
                return r;
        (void) sd_event_source_set_description(m->io, "mqtt-io");
        /* Bulbs' frames are the bulk of the work and come in bursts: when the control socket, an
         * HTTP transfer or the TPM's answer is ready at the same time, they go first (sd-event
         * dispatches the pending source of the lowest priority value). The budget of on_io bounds
         * what they wait for. */
        r = sd_event_source_set_priority(m->io, SD_EVENT_PRIORITY_NORMAL + 10);
        if (r < 0)
                return r;
        return 0;
}

static int mqtt_connect(struct mqtt *m, bool first) {
        int rc, r;

        rc = first ? mosquitto_connect_async(m->mosq, m->host, m->port, m->keepalive)
                   : mosquitto_reconnect_async(m->mosq);
        if (rc != MOSQ_ERR_SUCCESS)
                return mqtt_errno(rc);
        r = mqtt_watch_socket(m);
        if (r < 0)
                return r;
        return 0;
}

static int on_reconnect(sd_event_source *s, uint64_t usec, void *userdata) {
        struct mqtt *m = userdata;
        int r;

        r = mqtt_connect(m, false);
        if (r < 0) {
                log_debug_errno(r, "Reconnecting to MQTT broker %s:%d failed: %m", m->host, m->port);
                mqtt_schedule_reconnect(m);
        }
        return 0;
}

static void mqtt_schedule_reconnect(struct mqtt *m) {
        uint32_t rnd = 0;
        uint64_t delay_ms;
        int r;

        if (m->reconnect && sd_event_source_get_enabled(m->reconnect, NULL) > 0)
                return;
        /* Full jitter in the upper half: many hubs behind one broker do not reconnect in step. */
        (void) random_bytes(&rnd, sizeof rnd);
        delay_ms = backoff_ms(++m->reconnect_failures, MQTT_BACKOFF_MIN_MS, MQTT_BACKOFF_MAX_MS, rnd);
        if (m->reconnect) {
                uint64_t now;
                (void) sd_event_now(m->event, CLOCK_MONOTONIC, &now);
                (void) sd_event_source_set_time(m->reconnect, now + delay_ms * 1000);
                (void) sd_event_source_set_enabled(m->reconnect, SD_EVENT_ONESHOT);
                return;
        }
        r = sd_event_add_time_relative(m->event, &m->reconnect, CLOCK_MONOTONIC, delay_ms * 1000, 0,
                                       on_reconnect, m);
        if (r < 0)
                log_error_errno(r, "Failed to arm MQTT reconnect timer: %m");
}

static int on_misc(sd_event_source *s, uint64_t usec, void *userdata) {
        struct mqtt *m = userdata;
        int rc;

        if (m->io) {
                rc = mosquitto_loop_misc(m->mosq);
                if (rc != MOSQ_ERR_SUCCESS && rc != MOSQ_ERR_NO_CONN)
                        mqtt_lost(m, rc);
                else
                        mqtt_update_events(m);
        }
        (void) sd_event_source_set_time(s, usec + MQTT_MISC_INTERVAL_USEC);
        return 0;
}

static void on_connect(struct mosquitto *mosq, void *userdata, int rc) {
        struct mqtt *m = userdata;
        int r;

        if (rc != 0) {
                log_event(LOG_WARNING, 0, IOTHUB_MID_MQTT_DISCONNECTED, NULL, NULL,
                          "MQTT broker %s:%d refused the connection: %s", m->host, m->port,
                          mosquitto_connack_string(rc));
                return; /* the library drops the socket; the next read reports it */
        }
        m->reconnect_failures = 0;
        /* QoS 1 on a persistent session: the broker keeps what arrives while we are away. */
        r = mqtt_errno(mosquitto_subscribe(mosq, NULL, m->sub_topic, 1));
        if (r < 0)
                log_error_errno(r, "Failed to subscribe to %s: %m", m->sub_topic);
        for (size_t i = 0; i < m->n_extra_subs; i++) {
                r = mqtt_errno(mosquitto_subscribe(mosq, NULL, m->extra_subs[i], 1));
                if (r < 0)
                        log_error_errno(r, "Failed to subscribe to %s: %m", m->extra_subs[i]);
        }
        log_event(LOG_INFO, 0, IOTHUB_MID_MQTT_CONNECTED, NULL, NULL, "Connected to MQTT broker %s:%d",
                  m->host, m->port);
        mqtt_set_connected(m, true);
}

static void on_disconnect(struct mosquitto *mosq, void *userdata, int rc) {
        struct mqtt *m = userdata;

        /* Called from inside loop_read/loop_misc; the io source is removed by our caller path. */
        mqtt_set_connected(m, false);
}

static void on_publish(struct mosquitto *mosq, void *userdata, int mid) {
        struct mqtt *m = userdata;

        if (m->unacked > 0)
                m->unacked--;

        if (m->cb.published)
                m->cb.published(m->userdata, mid);
}

uint64_t mqtt_unacked(const struct mqtt *m) {
        return m ? m->unacked : 0;
}

int mqtt_publish(struct mqtt *m, const char *topic, const void *payload, size_t len, int qos, int *ret_mid) {
        int mid = 0, r;

        if (!m->connected)
                return -ENOTCONN;
        if (len > INT32_MAX)
                return -EFBIG;
        r = mqtt_errno(mosquitto_publish(m->mosq, &mid, topic, (int) len, payload, qos, false));
        if (r < 0)
                return r;
        /* on_publish() comes for every message libmosquitto took: at QoS 1 with its PUBACK, at
         * QoS 0 once written; it keeps both across reconnects (a persistent session). */
        m->unacked++;
        mqtt_update_events(m); /* the packet waits for the socket to be writable */
        if (ret_mid)
                *ret_mid = mid;
        return 0;
}

static void on_message(struct mosquitto *mosq, void *userdata, const struct mosquitto_message *msg) {
        struct mqtt *m = userdata;

        if (m->cb.message && msg->payloadlen >= 0)
                m->cb.message(m->userdata, msg->topic, msg->payload, (size_t) msg->payloadlen);
        if (!m->reading)
                return;
        if (++m->burst_messages >= MQTT_READ_BURST_MAX || now_monotonic_usec() >= m->burst_deadline) {
                m->budget_spent = true;
                /* libmosquitto 2.0's loop_read handles as many packets as there are messages in
                 * its queues (msgs_out + msgs_in: thousands under load, whatever max_packets says)
                 * and stops early only when a read left errno at EAGAIN (lib/loop.c). Saying so
                 * here ends it after this packet; the rest waits in the socket for the next
                 * wake-up (epoll is level-triggered). */
                errno = EAGAIN;
        }
}

static int mqtt_set_password(struct mqtt *m, const struct iothub_conf *c, char **ret_error) {
        _cleanup_erase_str_ char *pw = NULL;
        size_t len = 0;
        int r;

        if (c->mqtt.password_file) {
                _cleanup_free_ char *why = NULL;
                r = read_trusted_file(c->mqtt.password_file, TRUSTED_SECRET, MQTT_PASSWORD_MAX, &pw, &len, &why);
                if (r < 0) {
                        if (ret_error)
                                *ret_error = strdup_printf("Cannot use [mqtt] password_file: %s",
                                                           why ? why : strerror(-r));
                        return r;
                }
                while (len > 0 && (pw[len - 1] == '\n' || pw[len - 1] == '\r'))
                        pw[--len] = '\0';
        }
        if (!c->mqtt.username && !pw)
                return 0;
        return mqtt_errno(mosquitto_username_pw_set(m->mosq, c->mqtt.username, pw));
}

int mqtt_new(sd_event *e, const struct iothub_conf *c, const struct mqtt_callbacks *cb, void *userdata,
             struct mqtt **ret, char **ret_error) {
        static bool lib_initialised;
        struct mqtt *m;
        int r, rc;

        if (!lib_initialised) {
                mosquitto_lib_init();
                lib_initialised = true;
        }
        m = calloc(1, sizeof *m);
        if (!m)
                return -ENOMEM;
        m->event = sd_event_ref(e);
        m->cb = *cb;
        m->userdata = userdata;
        m->port = c->mqtt.port;
        m->keepalive = (int) c->mqtt.keepalive_s;
        m->host = strdup(c->mqtt.host);
        if (!m->host || asprintf(&m->sub_topic, "%s/+/status", c->mqtt.topic_prefix) < 0) {
                r = -ENOMEM;
                goto fail;
        }
        /* clean_session = false: the broker keeps our subscription and queued QoS 1 messages. */
        m->mosq = mosquitto_new(c->mqtt.client_id, false, m);
        if (!m->mosq) {
                r = -errno;
                goto fail;
        }
        (void) mosquitto_int_option(m->mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
        rc = mosquitto_int_option(m->mosq, MOSQ_OPT_SEND_MAXIMUM, MQTT_SEND_MAXIMUM);
        if (rc != MOSQ_ERR_SUCCESS) {
                r = mqtt_errno(rc);
                goto fail;
        }
        mosquitto_connect_callback_set(m->mosq, on_connect);
        mosquitto_disconnect_callback_set(m->mosq, on_disconnect);
        mosquitto_message_callback_set(m->mosq, on_message);
        mosquitto_publish_callback_set(m->mosq, on_publish);
        mosquitto_log_callback_set(m->mosq, on_log);
        r = mqtt_set_password(m, c, ret_error);
        if (r < 0)
                goto fail;
        if (c->mqtt.ca_file) {
                r = mqtt_errno(mosquitto_tls_set(m->mosq, c->mqtt.ca_file, NULL, NULL, NULL, NULL));
                if (r >= 0)
                        r = mqtt_errno(mosquitto_tls_opts_set(m->mosq, 1 /* SSL_VERIFY_PEER */, "tlsv1.2", NULL));
                if (r >= 0)
                        r = mqtt_errno(mosquitto_tls_insecure_set(m->mosq, false));
                if (r < 0) {
                        if (ret_error)
                                *ret_error = strdup_printf("Cannot set up TLS to the broker with %s: %s",
                                                c->mqtt.ca_file, strerror(-r));
                        goto fail;
                }
        }
        r = sd_event_add_time_relative(e, &m->misc, CLOCK_MONOTONIC, MQTT_MISC_INTERVAL_USEC, 0, on_misc, m);
        if (r < 0)
                goto fail;
        (void) sd_event_source_set_enabled(m->misc, SD_EVENT_ON);
        r = mqtt_connect(m, true);
        if (r < 0) {
                log_warning_errno(r, "Cannot connect to MQTT broker %s:%d yet, will retry: %m", m->host, m->port);
                mqtt_schedule_reconnect(m);
        }
        *ret = m;
        return 0;
fail:
        mqtt_free(m);
        return r;
}

int mqtt_subscribe(struct mqtt *m, const char *topic) {
        char *t;
        int r;

        if (m->n_extra_subs >= MQTT_EXTRA_SUBS_MAX)
                return -E2BIG;
        t = strdup(topic);
        if (!t)
                return -ENOMEM;
        if (m->connected) {
                r = mqtt_errno(mosquitto_subscribe(m->mosq, NULL, t, 1));
                if (r < 0) {
                        free(t);
                        return r;
                }
                mqtt_update_events(m);
        }
        m->extra_subs[m->n_extra_subs++] = t;
        return 0;
}

bool mqtt_is_connected(const struct mqtt *m) {
        return m && m->connected;
}

void mqtt_free(struct mqtt *m) {
        if (!m)
                return;
        m->io = sd_event_source_disable_unref(m->io);
        m->hold = sd_event_source_disable_unref(m->hold);
        m->misc = sd_event_source_disable_unref(m->misc);
        m->reconnect = sd_event_source_disable_unref(m->reconnect);
        if (m->mosq) {
                if (m->connected) {
                        (void) mosquitto_disconnect(m->mosq);
                        (void) mosquitto_loop_write(m->mosq, 1);
                }
                mosquitto_destroy(m->mosq);
        }
        sd_event_unref(m->event);
        free(m->host);
        free(m->sub_topic);
        for (size_t i = 0; i < m->n_extra_subs; i++)
                free(m->extra_subs[i]);
        free(m);
}
