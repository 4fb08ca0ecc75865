/* SPDX-License-Identifier: MIT */
/* Per-bulb broker identities kept through mosquitto's dynamic security plugin, administered over
 * the hub's own MQTT connection: JSON commands on $CONTROL/dynamic-security/v1, answers on
 * .../response matched by correlationData. Each request is an owned, cancellable operation with
 * a timeout; cancelling (or dynsec_free) means its callback never runs. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>
#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/util.h"

#define DYNSEC_TOPIC "$CONTROL/dynamic-security/v1"
#define DYNSEC_RESPONSE_TOPIC "$CONTROL/dynamic-security/v1/response"
/* A listClients answer with every bulb (5,000 bulbs are ~0.5 MB); anything larger is refused. */
#define DYNSEC_RESPONSE_MAX (4 * 1024 * 1024)
#define DYNSEC_OPS_MAX 64          /* requests in flight at once */
#define DYNSEC_PASSWORD_BYTES 18   /* random bytes of a bulb's broker password */
#define DYNSEC_PASSWORD_LEN 24     /* their base64url, the password itself */
#define DYNSEC_BULB_TEXTNAME "iothub bulb" /* marks the broker clients that the hub owns */
#define DYNSEC_BULB_ROLE_PREFIX "iothub-bulb-"
#define DYNSEC_HUB_ROLE "iothub-hub"
#define DYNSEC_PAIRING_NAME "iothub-pairing" /* the anonymous group, and its role during a window */

struct dynsec;
struct dynsec_op;
struct mqtt;
struct registry;

/* The outcome of an operation: r = 0, or a negative errno and a one-line reason (the plugin's
 * own error text where it gave one). Never called after dynsec_op_cancel() or dynsec_free(). */
typedef void (*dynsec_done_fn)(void *userdata, int r, const char *error);

/* mqtt and registry must outlive the object; [broker] timeout_s bounds every request. */
int dynsec_new(sd_event *e, const struct iothub_conf *conf, struct mqtt *m, struct registry *registry,
               struct dynsec **ret);
/* Cancels every operation in flight (no callback runs); NULL accepted. */
void dynsec_free(struct dynsec *d);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct dynsec *, dynsec_free);

/* Whether a message on this topic is for dynsec_on_message(). Pure. */
bool dynsec_is_response_topic(const char *topic);
/* One message on DYNSEC_RESPONSE_TOPIC: answers the operations it names, ignores the rest
 * (another administrator's answers, stale ones). NULL d accepted. */
void dynsec_on_message(struct dynsec *d, const uint8_t *payload, size_t len);
/* The MQTT connection came up (starts the reconciliation: the hub's own role, then the bulb
 * clients against the registry) or went down (every operation in flight fails, -ENOTCONN).
 * NULL d accepted. */
void dynsec_connected(struct dynsec *d, bool connected);
/* True when requests can be sent now (connected). */
bool dynsec_ready(const struct dynsec *d);

/* Creates the bulb's role (publish only <prefix>/<id>/status and /hello, subscribe only /cmd
 * and /ack) and its client (user name = id), with password when not NULL (then exactly
 * DYNSEC_PASSWORD_LEN base64url characters; wiped from the request once sent). Returns 0 and
 * the operation in *ret (the caller's to cancel until done runs), -ENOTCONN when the broker is
 * not connected, -EBUSY at DYNSEC_OPS_MAX, other negative errno. */
int dynsec_bulb_create(struct dynsec *d, const char *id, const char *password, dynsec_done_fn done,
                       void *userdata, struct dynsec_op **ret);
/* Deletes the bulb's client (the plugin disconnects it at once) and its role. A client that
 * does not exist is not an error. Same returns as dynsec_bulb_create(). */
int dynsec_bulb_delete(struct dynsec *d, const char *id, dynsec_done_fn done, void *userdata,
                       struct dynsec_op **ret);
/* Opens or closes the broker for pairing: while open, anonymous clients (bulbs not enrolled yet)
 * may publish on <prefix>/+/hello and nothing else. Remembered for the next reconciliation. done
 * may be NULL (then ret may be NULL too, and the operation ends on its own). Same returns as
 * dynsec_bulb_create(). */
int dynsec_pairing(struct dynsec *d, bool open, dynsec_done_fn done, void *userdata, struct dynsec_op **ret);
/* Ends an operation without calling its callback; NULL accepted. */
void dynsec_op_cancel(struct dynsec_op *op);

/* A new broker password: DYNSEC_PASSWORD_BYTES from getrandom(), base64url, NUL-terminated in
 * ret. Returns 0 or a negative errno. */
int dynsec_password_new(char ret[static DYNSEC_PASSWORD_LEN + 1]);

/* Adds the "broker" object to a status object: enabled, in_sync, created, deleted, last_error,
 * last_reconcile. NULL d gives {"enabled": false}. */
int dynsec_status_json(const struct dynsec *d, json_t *status);
