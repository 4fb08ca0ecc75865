/* SPDX-License-Identifier: MIT */
/* Security events for the vendor's monitoring (PROTOCOL.md 5, iothub-protocol(7) "Security
 * events"): what the hub saw and refused, aggregated per interval by (type, reason, bulb),
 * spooled in the state database, and sent as POST /v1/hubs/<id>/events through cloud.c's
 * signed request path, on a request slot of its own, after the status uploads. Never the
 * content of a frame or of any other peer's message: only fixed names, device ids and counts. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/db.h"
#include "iothub/spool.h"

/* The event types; their names are the "type" member (iothub-protocol(7) lists them). */
enum event_type {
        EVENT_FRAME_REJECTED,   /* reason: the frame's rejection reason (PROTOCOL.md 1); dev: the bulb */
        EVENT_FLOOD,            /* urgent; reason rate_limited or rejections; dev: the bulb */
        EVENT_BULB_ENROLLED,    /* dev */
        EVENT_BULB_REVOKED,     /* dev */
        EVENT_CONTROL_REFUSED,  /* a control socket peer refused by the SO_PEERCRED check */
        EVENT_CONFIG_RELOADED,  /* reason ok or failed */
        EVENT_SIGNIN_CHANGED,   /* reason signed_in, signed_out or login_required */
        EVENT_KEY_ERROR,        /* urgent; reason: why the hub key cannot be opened or used */
        EVENT_COMMAND_REJECTED, /* reason bad_signature (urgent); dev: the command's bulb */
        EVENT_EVENTS_DROPPED,   /* count: events lost to the spool cap or the aggregation table */
        _EVENT_TYPE_MAX,
};
const char *event_type_to_string(enum event_type t);

struct events;

struct cloud;
struct uplink_client;

/* Sets up the events when the cloud relay exists (cloud NULL: *ret = NULL and 0, and
 * events_note() on NULL is a no-op). e, conf, db, cloud and spool (the status spool's size, read
 * to keep events behind status) are the caller's and must outlive it. Returns 0 or a negative
 * errno. */
int events_new(sd_event *e, const struct iothub_conf *conf, struct db *db, struct cloud *cloud, struct uplink_client *req,
               const struct spool_counts *spool, struct events **ret);
/* Writes what was noted and not yet spooled to the database, cancels a request in flight (its
 * events stay spooled and go again after the next start). */
void events_free(struct events *ev);

/* Notes count occurrences of an event now. reason is a static name ([a-z0-9_], at most 32
 * characters) or NULL; dev a device id or NULL (anything else is dropped, never sent). Cheap:
 * memory only; the interval's timer spools and sends. NULL ev is a no-op. */
void events_note(struct events *ev, enum event_type type, const char *reason, const char *dev, uint64_t count);

/* Adds the "events" object of the status to o. */
int events_status_json(struct events *ev, json_t *o);
