/* SPDX-License-Identifier: MIT */
/* The frame path: every check of PROTOCOL.md 1 in order, then the spool, group-committed. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

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
 * runs after a successful commit, never inside the transaction. */
struct ingest_events {
        /* Frames were committed to the spool (the relay may have a batch due). */
        void (*committed)(void *userdata);
        /* An accepted frame carried the ack member of a command (PROTOCOL.md 2). NULL: acks are
         * not collected (no commands without the cloud). err is NULL when the bulb gave none. */
        void (*command_ack)(void *userdata, const char *dev, const char *id, bool ok, const char *err);
        /* A frame was rejected (counted already); dev is a checked id or "?". May be NULL. */
        void (*rejected)(void *userdata, const char *dev, enum frame_reason reason);
        /* Storing frames began or stopped failing (ingest_storage() tells which). May be NULL. */
        void (*storage_changed)(void *userdata);
        void *userdata;
};

/* Sets up the frame path. conf, db, registry, ack and spool are the caller's and must outlive
 * it; spool is the in-memory size of the spool, which ingest keeps up to date as it appends and
 * drops. ev is copied. Returns 0 or -ENOMEM. */
int ingest_new(const struct iothub_conf *conf, struct db *db, struct registry *registry, struct ack *ack,
               struct spool_counts *spool, const struct ingest_events *ev, struct ingest **ret);
/* Frees; a transaction still open is left to db_close() (which rolls it back): call
 * ingest_commit() first, while the listeners of the events still exist. NULL is a no-op. */
void ingest_free(struct ingest *in);

/* Handles one MQTT message on a status topic. Appends accepted frames to the spool inside a
 * transaction that ingest_commit() closes. Never fails: rejections are counted and logged. */
void ingest_message(struct ingest *in, const char *topic, const uint8_t *payload, size_t len);

/* Commits the frames appended since the last call (called after each MQTT read). A frame
 * counts as accepted only once this commit succeeded; then the events run. Returns 0 or a
 * negative errno. */
int ingest_commit(struct ingest *in);

/* The counters for status; valid as long as in. */
const struct ingest_counters *ingest_counters(const struct ingest *in);

/* The reason name of a failure to store frames (disk_full, read_only, corrupt, locked,
 * io_error), or NULL for 0. */
const char *ingest_store_reason(int r);

/* 0 while storing frames works, else the negative errno of the failure, with the frames
 * refused since it began in *ret_refused (may be NULL). */
int ingest_storage(const struct ingest *in, uint64_t *ret_refused);
