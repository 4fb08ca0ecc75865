/* SPDX-License-Identifier: MIT */
/* The relay to the vendor's web service (PROTOCOL.md 3): requests through iothub-uplink
 * (uplink-client.h), which signs each with RFC 9421 by the hub key. Frames leave the spool in batches, one hub key signature per batch, and only after the cloud took them. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/db.h"
#include "iothub/registry.h"
#include "iothub/spool.h"

#define CLOUD_RESPONSE_MAX (1024 * 1024) /* bytes of a response body we read at most */
#define CLOUD_BACKOFF_MIN_MS 1000u
#define CLOUD_BACKOFF_MAX_MS 300000u
#define CLOUD_RETRY_AFTER_MAX_S 3600
#define CLOUD_REJECTION_KEY_MAX 64  /* a counter name in cloud.rejected_reasons, NUL included */
#define CLOUD_REFUSAL_REASON_MAX 128 /* the reason kept with a batch moved aside, NUL included */

struct cloud;
struct uplink_client;

struct cloud_counters {
        uint64_t uploaded;      /* frames the cloud accepted */
        uint64_t rejected;      /* frames the cloud rejected one by one (dropped, not retried) */
        uint64_t batches;       /* batches answered 200 */
        uint64_t moved_aside;   /* frames moved aside since start (the table keeps them all) */
        int64_t last_success;   /* Unix seconds of the last 200, 0 for never */
        char last_error[256];   /* one line, never a secret */
        uint64_t backoff_until; /* CLOCK_MONOTONIC usec, 0 when not backing off */
};

/* News from the relay, installed by hub.c (the one place that knows who listens). */
struct cloud_events {
        /* iothubctl register succeeded: requests for other modules (cloud_ready()) may go. */
        void (*registered)(void *userdata);
        /* An upload emptied the spool: a burst is over (hub.c gives the heap's free pages back
         * then, rather than up to its status timer later). May be NULL. */
        void (*drained)(void *userdata);
        void *userdata;
};

/* Sets up the relay when [cloud] url is set (otherwise *ret = NULL and 0: frames only spool).
 * e, conf, db, registry, req (uplink-client.h: iothub-uplink authorizes, signs and sends; not
 * NULL with [cloud] url) and spool are the caller's and must outlive it; the relay lowers spool's
 * counts as frames leave. ev is copied. Until the uplink has the hub key and a token (its news reach
 * cloud_key_ready() through hub.c) the relay waits and says so in status. Returns 0 or a negative errno. */
int cloud_new(sd_event *e, const struct iothub_conf *conf, struct db *db, struct registry *registry,
              struct uplink_client *req, struct spool_counts *spool, const struct cloud_events *ev, struct cloud **ret);
void cloud_free(struct cloud *c);

/* New frames were committed to the spool, or a token came: start a batch if one is due, or arm
 * its timer. NULL is a no-op. */
void cloud_kick(struct cloud *c);
/* The uplink has the hub key or a token now: uploads waiting for them may go. NULL c is a no-op. */
void cloud_key_ready(struct cloud *c);
/* The list of enrolled bulbs changed: PUT /devices before the next status batch. */
void cloud_devices_changed(struct cloud *c);

/* iothubctl register (uplink_register(): the attestation, the request, a 401), recorded here
 * on success (persisted; the registered event). done() is called with the HTTP status (or a
 * negative errno) and a one-line message, exactly once unless the handle is cancelled first
 * (cloud_register_cancel(): the waiter went away; done() never runs after), or with
 * -ECANCELED when the relay is freed. -EBUSY while another one runs. */
struct cloud_call;
int cloud_register(struct cloud *c, void (*done)(void *userdata, long status, const char *message),
                   void *userdata, struct cloud_call **ret);
void cloud_register_cancel(struct cloud_call *call);
/* The uplink registered the hub (its news): recorded as a successful cloud_register() is, also
 * when the waiter of that one went away before the answer (the channel has no cancel: the
 * uplink finishes what it began). NULL c is a no-op. */
void cloud_registered(struct cloud *c);
/* Whether other modules' requests (uplink_request()) can go now: a key, a token, and the hub
 * registered. */
bool cloud_ready(struct cloud *c);

/* Adds the "cloud" and "key" objects of the status to o. */
int cloud_status_json(struct cloud *c, json_t *o);
/* One-line summary for STATUS=. */
void cloud_status_line(struct cloud *c, char *buf, size_t len);

/* Parses a Retry-After value (RFC 9110 10.2.3: delay-seconds; the uplink turns an HTTP-date
 * into delay-seconds, uplink-client.h) into seconds, clamped to CLOUD_RETRY_AFTER_MAX_S.
 * Returns -EINVAL if unparseable (an HTTP-date too). Pure. */
int cloud_parse_retry_after(const char *value, int64_t *ret_seconds);

/* The 200 answer to a status batch (PROTOCOL.md 3): an object with an integer "accepted" and, if
 * present, an array "rejected", no duplicate member names. *ret_rejected is that array (a new
 * reference) or NULL when absent. Returns 0 or -EBADMSG. Pure. */
int cloud_parse_status_answer(const char *body, size_t len, json_t **ret_rejected);
/* The counter name for one element of "rejected": its "reason" if it is a string shorter than
 * CLOUD_REJECTION_KEY_MAX and not empty, else "other", with every byte outside [a-z0-9_] replaced by '_'. Pure. */
void cloud_rejection_key(const json_t *rejection, char ret_key[static CLOUD_REJECTION_KEY_MAX]);

/* The next backoff delay in ms after 'failures' consecutive failures: exponential from
 * CLOUD_BACKOFF_MIN_MS to CLOUD_BACKOFF_MAX_MS, with full jitter from rnd. Pure. */
uint64_t cloud_backoff_ms(unsigned failures, uint32_t rnd);
