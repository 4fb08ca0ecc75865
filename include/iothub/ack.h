/* SPDX-License-Identifier: MIT */
/* End-to-end acknowledgement (PROTOCOL.md 1): after a commit, {"seq":<highest committed seq>} on
 * <prefix>/<device-id>/ack, QoS 1, not retained, at most one per bulb per 100 ms (coalesced by one
 * timer for all bulbs), kept while the broker is away and sent on reconnect. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/registry.h"

struct ack;
struct mqtt;

/* Creates the ack publisher of the hub. e, conf and mqtt are the caller's and must outlive it.
 * Returns 0 or a negative errno. */
int ack_new(sd_event *e, const struct iothub_conf *conf, struct mqtt *mqtt, struct ack **ret);
/* Drops what is pending (not re-announced after a restart, see iothub-protocol(7)); NULL accepted. */
void ack_free(struct ack *a);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct ack *, ack_free);

/* Notes that seq is the highest seq of bulb b that is committed (committed = true) or that the
 * open transaction will commit (false: held until ack_commit_done()). NULL a: nothing. Never
 * fails: without memory the ack is skipped, and the bulb's resend of the frame gets one. */
void ack_stage(struct ack *a, struct bulb *b, int64_t seq, bool committed);
/* The open transaction ended: committed (ok, as commit generation gen, db_commit_gen()) makes
 * its staged acks wait for a sync that covers gen; a failure drops them. A committed seq (from
 * ack_stage(..., true)) of a bulb whose acks wait for a sync goes with them. */
void ack_commit_done(struct ack *a, bool ok, uint64_t gen);
/* Every commit up to generation gen is on disk: the acks that waited for it are due. */
void ack_synced(struct ack *a, uint64_t gen);
/* A sync failed: what waits for one is dropped, and no ack of a commit goes any more (until the
 * daemon starts again): what is committed may never reach the disk. */
void ack_sync_failed(struct ack *a);
/* The broker connection came (pending acks go now) or went (they wait). */
void ack_connected(struct ack *a, bool connected);
/* Adds frames.acks_published, acks_pending, acks_failed and acks_held_back (times an ack waited
 * an interval because libmosquitto held ACK_UNACKED_MAX unacknowledged messages) to the status
 * object. Returns 0 or -ENOMEM. */
int ack_status_json(struct ack *a, json_t *status);
