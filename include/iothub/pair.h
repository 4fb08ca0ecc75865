/* SPDX-License-Identifier: MIT */
/* Pairing (PROTOCOL.md 1): while a window is open, a bulb's manufacturer certificate chain (PEM)
 * published on <prefix>/<device-id>/hello enrols it exactly as `bulb add --cert` (enrol.c), and
 * creates its broker identity in the same step (dynsec.c, when [broker] dynsec is on). Outside a
 * window, hello messages are counted and ignored. One window at a time, owned by the control
 * connection of `iothubctl bulb pair`, which it tells what happens as it happens. */
#pragma once

#include <stdbool.h>

#include <jansson.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/registry.h"

#define PAIR_WINDOW_MAX_S 300      /* PROTOCOL.md 1: at most 300 s */
#define PAIR_WINDOW_DEFAULT_S 60
#define PAIR_HELLO_MAX_BYTES 16384 /* a leaf and a few intermediates in PEM */
#define PAIR_HELLOS_MAX 32         /* hellos handled per window; further ones are counted, dropped */

struct pair;
struct pair_window;

struct pair_window_cb {
        /* One thing that happened, as an object {"event": "open" | "enrolled" | "broker" |
         * "refused" | "dropped", "id": .., "message": ..}; the callee takes the reference. */
        void (*event)(void *userdata, json_t *event);
        /* The window closed (its time ran out, and the broker answered for every enrolment): the
         * summary {"enrolled": [ids], "refused": N, "hellos": N, "dropped": N} (the callee's
         * reference). The window is freed right after this call returns. */
        void (*closed)(void *userdata, json_t *summary);
};

struct dynsec;

/* News from pairing, installed by hub.c. */
struct pair_events {
        /* A bulb was enrolled from its hello (the cloud's device list changed). May be NULL. */
        void (*enrolled)(void *userdata, const char *id);
        void *userdata;
};

/* e, conf, registry and dynsec (NULL without [broker] dynsec) are the caller's and must outlive
 * it; ev is copied. Returns 0 or -ENOMEM. */
int pair_new(sd_event *e, const struct iothub_conf *conf, struct registry *registry, struct dynsec *dynsec,
             const struct pair_events *ev, struct pair **ret);
/* Closes an open window without its callbacks; NULL accepted. */
void pair_free(struct pair *p);

/* Opens a window of seconds (1..PAIR_WINDOW_MAX_S). Returns 0 and the window in *ret (the caller
 * owns it: pair_window_close() ends it early, without callbacks), -EBUSY when one is open, -ERANGE
 * for a bad duration, other negative errno. The "open" event comes from inside this call. */
int pair_open(struct pair *p, unsigned seconds, const struct pair_window_cb *cb, void *userdata,
              struct pair_window **ret);
void pair_window_close(struct pair_window *w);

/* Whether the topic is a hello topic, <prefix>/+/hello. */
bool pair_is_hello_topic(const struct pair *p, const char *topic);
/* One message on a hello topic. */
void pair_on_hello(struct pair *p, const char *topic, const uint8_t *payload, size_t len);

/* Adds the "pair" object to a status object. */
int pair_status_json(const struct pair *p, json_t *status);
