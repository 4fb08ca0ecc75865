/* SPDX-License-Identifier: MIT */
/* libmosquitto driven from the sd-event loop (no mosquitto thread): connect, subscribe to
 * <prefix>/+/status with QoS 1 on a persistent session, reconnect with backoff and jitter. */
#pragma once

#include <stdbool.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"

struct mqtt;

struct mqtt_callbacks {
        /* One message on a subscribed topic. */
        void (*message)(void *userdata, const char *topic, const uint8_t *payload, size_t len);
        /* After each read of the socket, once the messages of that read were handed over. */
        void (*read_done)(void *userdata);
        /* Connection state changed. */
        void (*connected)(void *userdata, bool connected);
        /* The broker acknowledged (PUBACK) the QoS 1 message with this mid. */
        void (*published)(void *userdata, int mid);
};

/* Creates the client and starts connecting. Returns 0 or a negative errno; on failure,
 * if ret_error is not NULL, a malloc'ed one-line reason. */
int mqtt_new(sd_event *e, const struct iothub_conf *conf, const struct mqtt_callbacks *cb, void *userdata,
             struct mqtt **ret, char **ret_error);
bool mqtt_is_connected(const struct mqtt *m);
/* Adds a topic (QoS 1) to the subscriptions made at every connection, and subscribes now when
 * connected. At most 4 such topics. Returns 0 or a negative errno. */
int mqtt_subscribe(struct mqtt *m, const char *topic);

/* Publishes one message, not retained. Returns 0 and the message id in *ret_mid (for the
 * published() callback), -ENOTCONN when not connected, other negative errno. */
int mqtt_publish(struct mqtt *m, const char *topic, const void *payload, size_t len, int qos, int *ret_mid);
/* Messages published and still in libmosquitto's hands (no PUBACK yet at QoS 1): its queue,
 * which it does not bound; a publisher that can wait checks this first. 0 for NULL. */
uint64_t mqtt_unacked(const struct mqtt *m);
/* Sends DISCONNECT and frees; NULL accepted. */
void mqtt_free(struct mqtt *m);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct mqtt *, mqtt_free);

/* Translates a MOSQ_ERR_* code into a negative errno (the one place for libmosquitto codes). */
int mqtt_errno(int mosq_rc);
