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
#define MQTT_READ_BURST_MAX 512 /* packets handled per wake-up, then the loop runs others */

struct mqtt {
        sd_event *event;
        struct mosquitto *mosq;
        sd_event_source *io, *misc, *reconnect;
        struct mqtt_callbacks cb;
        void *userdata;
        char *host;
        int port, keepalive;
        char *sub_topic;
        bool connected;
        unsigned reconnect_failures; /* since the last accepted connection */
        unsigned burst_messages;     /* messages handed over in this wake-up (on_io) */
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

/* The connection is gone: stop watching the old socket and try again later. */
static void mqtt_lost(struct mqtt *m, int rc) {
        if (m->io) {
                m->io = sd_event_source_disable_unref(m->io);
                if (m->connected || rc != MOSQ_ERR_SUCCESS)
                        log_event(LOG_WARNING, mqtt_errno(rc), IOTHUB_MID_MQTT_DISCONNECTED, NULL, NULL,
                                  "Connection to MQTT broker %s:%d lost: %s", m->host, m->port,
                                  mosquitto_strerror(rc));
        }
        mqtt_set_connected(m, false);
        mqtt_schedule_reconnect(m);
}

static void mqtt_update_events(struct mqtt *m) {
        if (m->io)
                (void) sd_event_source_set_io_events(m->io,
                                                     EPOLLIN | (mosquitto_want_write(m->mosq) ? EPOLLOUT : 0));
}

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata);

static int on_pending(sd_event_source *s, void *userdata) {
        struct mqtt *m = userdata;

        if (m->io)
                return on_io(m->io, mosquitto_socket(m->mosq), EPOLLIN, m);
        return 0;
}

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct mqtt *m = userdata;
        int rc = MOSQ_ERR_SUCCESS;

        if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                /* Drain what the socket holds, bounded, so that one commit covers the burst
                 * (group commit). The bound counts messages, not loop_read calls: one
                 * loop_read of libmosquitto 2.0 handles as many packets as it has QoS > 0
                 * messages queued both ways (the hub's acks in flight count), and 512 calls
                 * were measured to take 19,450 frames in one wake-up under load: one
                 * transaction, nothing acked, uploaded or answered for seconds (issue 13). */
                m->burst_messages = 0;
                for (unsigned i = 0; i < MQTT_READ_BURST_MAX && m->burst_messages < MQTT_READ_BURST_MAX; i++) {
                        int avail = 0;

                        SSL *ssl;

                        rc = mosquitto_loop_read(m->mosq, 1);
                        if (rc != MOSQ_ERR_SUCCESS)
                                break;
                        /* With TLS, records already read from the socket wait inside OpenSSL,
                         * where epoll cannot see them: they must be drained here too. */
                        ssl = mosquitto_ssl_get(m->mosq);
                        if (ssl && SSL_pending(ssl) > 0)
                                continue;
                        if (ioctl(fd, FIONREAD, &avail) < 0 || avail <= 0)
                                break;
                }
                /* Hand over the messages of this read before anything else happens. */
                if (m->cb.read_done)
                        m->cb.read_done(m->userdata);
                /* Cut off at the bound with TLS records still inside OpenSSL: epoll will not
                 * report them, so come back on the next loop iteration. */
                SSL *ssl = rc == MOSQ_ERR_SUCCESS ? mosquitto_ssl_get(m->mosq) : NULL;
                if (ssl && SSL_pending(ssl) > 0)
                        (void) sd_event_add_defer(m->event, NULL, on_pending, m);
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
        r = sd_event_add_io(m->event, &m->io, fd, EPOLLIN | EPOLLOUT, on_io, m);
        if (r < 0)
                return r;
        (void) sd_event_source_set_description(m->io, "mqtt-io");
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

        if (m->cb.published)
                m->cb.published(m->userdata, mid);
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
        mqtt_update_events(m); /* the packet waits for the socket to be writable */
        if (ret_mid)
                *ret_mid = mid;
        return 0;
}

static void on_message(struct mosquitto *mosq, void *userdata, const struct mosquitto_message *msg) {
        struct mqtt *m = userdata;

        m->burst_messages++;
        if (m->cb.message && msg->payloadlen >= 0)
                m->cb.message(m->userdata, msg->topic, msg->payload, (size_t) msg->payloadlen);
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
        int r;

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
        mosquitto_connect_callback_set(m->mosq, on_connect);
        mosquitto_disconnect_callback_set(m->mosq, on_disconnect);
        mosquitto_message_callback_set(m->mosq, on_message);
        mosquitto_publish_callback_set(m->mosq, on_publish);
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

bool mqtt_is_connected(const struct mqtt *m) {
        return m && m->connected;
}

void mqtt_free(struct mqtt *m) {
        if (!m)
                return;
        m->io = sd_event_source_disable_unref(m->io);
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
        free(m);
}
