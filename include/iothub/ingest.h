/* SPDX-License-Identifier: MIT */
/* The frame path: every check of PROTOCOL.md 1 in order, then the spool, group-committed. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/db.h"
#include "iothub/frame.h"
#include "iothub/registry.h"
#include "iothub/spool.h"

struct ack;
struct ingest;

struct ingest_counters {
        uint64_t frames_received;
        uint64_t frames_accepted;
        uint64_t frames_rejected[_FRAME_REASON_MAX];
        uint64_t frames_store_failed; /* passed every check, but the database refused them */
};

/* News from the frame path, installed by hub.c (the one place that knows who listens). Each
 * runs after a successful commit, never inside the transaction, except command_ack. */
struct ingest_events {
        /* Frames were committed to the spool (the relay may have a batch due). */
        void (*committed)(void *userdata);
        /* A frame about to be committed carries the ack member of a command (PROTOCOL.md 2).
         * Runs INSIDE the frames' transaction, so that the ack is recorded with its frame or not
         * at all (a SIGKILL after the commit must not lose it: the bulb, told its frame is
         * stored, never resends it); memory changes only in command_acks_done(). A negative
         * errno aborts the whole transaction. NULL: acks are not collected (no commands without
         * the cloud). err is NULL when the bulb gave none. */
        int (*command_ack)(void *userdata, const char *dev, const char *id, bool ok, const char *err);
        /* The transaction that recorded command acks committed (true) or was rolled back
         * (false). Called after every transaction in which command_ack ran. */
        void (*command_acks_done)(void *userdata, bool committed);
        /* A frame was rejected (counted already); dev is a checked id or "?". May be NULL. */
        void (*rejected)(void *userdata, const char *dev, enum frame_reason reason);
        /* Storing frames began or stopped failing (ingest_storage() tells which). May be NULL. */
        void (*storage_changed)(void *userdata);
        void *userdata;
};

/* Sets up the frame path. e, conf, db, registry, ack and spool are the caller's and must
 * outlive it; spool is the in-memory size of the spool, which ingest keeps up to date as it
 * appends and drops. ev is copied. Moves each bulb's last seq in the registry up to its newest
 * frame in the spool (the spool records seqs until frames leave it, see spool_delete()).
 * Returns 0, -EUCLEAN for a damaged spool, or a negative errno. */
int ingest_new(sd_event *e, const struct iothub_conf *conf, struct db *db, struct registry *registry, struct ack *ack,
               struct spool_counts *spool, const struct ingest_events *ev, struct ingest **ret);
/* Frees; frames still held are dropped unacknowledged (their bulbs resend them): call
 * ingest_commit() first, while the listeners of the events still exist. NULL is a no-op. */
void ingest_free(struct ingest *in);

/* Handles one MQTT message on a status topic. Holds accepted frames for the next commit (which
 * happens here when the hold is full). Never fails: rejections are counted and logged. */
void ingest_message(struct ingest *in, const char *topic, const uint8_t *payload, size_t len);

/* An MQTT read ended: commits the held frames now if [frames] commit_delay_ms is 0 or the hold
 * is full, else arms the timer that commits them commit_delay_ms after the first. */
void ingest_read_done(struct ingest *in);

/* Commits the held frames now, in one transaction with their bulbs' seqs and the command acks
 * they carry. A frame counts as accepted only once this commit succeeded; then the events run.
 * Returns 0 or a negative errno (nothing of the batch is kept: memory goes back to the
 * database's state, and the bulbs resend the frames). */
int ingest_commit(struct ingest *in);

/* At exit, after the last ingest_commit() and while the acks' MQTT client still exists: waits
 * for the fdatasync of every commit so far (blocking), acks what it covers, and stops the sync
 * thread (later commits are durable on return). NULL is a no-op. */
void ingest_sync(struct ingest *in);

/* The counters for status; valid as long as in. */
const struct ingest_counters *ingest_counters(const struct ingest *in);

/* The reason name of a failure to store frames (disk_full, read_only, corrupt, locked,
 * io_error), or NULL for 0. */
const char *ingest_store_reason(int r);

/* 0 while storing frames works, else the negative errno of the failure, with the frames
 * refused since it began in *ret_refused (may be NULL). */
int ingest_storage(const struct ingest *in, uint64_t *ret_refused);
