/* SPDX-License-Identifier: MIT */
/* Commands from the cloud down to the bulbs (PROTOCOL.md 2 and 3): a long poll of
 * GET /v1/hubs/<id>/commands, every command checked, de-duplicated by id (persisted),
 * published to <prefix>/<dev>/cmd as a JWS signed by the hub key, and its outcome reported:
 * delivered (the broker has it), acked/failed (the bulb's status frame says so), expired,
 * rejected. Commands in flight survive a restart. */
#pragma once

#include <stdbool.h>

#include <jansson.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/db.h"
#include "iothub/registry.h"

struct cloud;
struct uplink_client;
struct signer;
struct mqtt;
struct commands;
struct events;

/* Sets up commands when the cloud relay is configured (cloud not NULL), else *ret = NULL and
 * 0. Commands call down only: the cloud relay for the poll and the results, the MQTT client to
 * publish; events (may be NULL) hears of refused commands. e, conf, db, registry, mqtt, cloud and
 * events are the caller's and must outlive it. Returns
 * 0 or a negative errno. */
int commands_new(sd_event *e, const struct iothub_conf *conf, struct db *db, struct registry *registry,
                 struct mqtt *mqtt, struct cloud *cloud, struct uplink_client *req, struct events *events,
                 struct commands **ret);
void commands_free(struct commands *c);

/* hub.c learnt the hub key from the signer s (the caller's, valid until commands_free()):
 * commands can be signed; kicks as commands_kick(). NULL c is a no-op. */
void commands_key_ready(struct commands *c, struct signer *s);

/* Something changed that may let the long poll or pending work go on now (MQTT connected,
 * the cloud got a token or a key). Cheap; NULL accepted. */
void commands_kick(struct commands *c);

/* The broker acknowledged the QoS 1 publish with this mid (mqtt published callback). */
void commands_on_published(struct commands *c, int mid);

/* A status frame about to be committed carries an ack member: called INSIDE the frame's
 * transaction, it writes the command's final state into it (an ack lost to a crash after the
 * frame's commit is never resent by the bulb) and stages the change in memory, which
 * commands_acks_done() applies or drops. Acks a bulb cannot make count (unknown id, another
 * bulb's command, one finished already) write nothing. Returns 0 or a negative errno (then the
 * caller rolls the transaction back and calls commands_acks_done(c, false)). NULL c: 0. */
int commands_ack_store(struct commands *c, const char *dev, const char *id, bool ok, const char *err);
/* The transaction of the staged acks committed (true: memory follows the rows) or was rolled
 * back (false: memory stays as it was). NULL c is a no-op. */
void commands_acks_done(struct commands *c, bool committed);

/* Adds the "commands" object (delivered, acked, failed, expired, rejected, in_flight ...). */
int commands_status_json(struct commands *c, json_t *st);
