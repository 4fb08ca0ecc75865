/* SPDX-License-Identifier: MIT */
/* The daemon's state: one struct owned by the event loop, passed to every module. */
#pragma once

#include <stdint.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/db.h"
#include "iothub/frame.h"
#include "iothub/registry.h"

struct mqtt;
struct control;
struct cloud;
struct hubkey;
struct http;
struct oauth;
struct commands;
struct ack;

struct hub_counters {
        uint64_t frames_received;
        uint64_t frames_accepted;
        uint64_t frames_rejected[_FRAME_REASON_MAX];
        uint64_t frames_store_failed; /* passed every check, but the database refused them */
};

/* Frames that passed every check in the current read, waiting for their commit. */
struct ingest_ack {
        char dev[DEVICE_ID_MAX + 1];
        char id[DEVICE_ID_MAX + 1];
        bool ok;
        char err[FRAME_ACK_ERR_MAX + 1];
};

struct ingest_seq_undo {
        char dev[DEVICE_ID_MAX + 1];
        int64_t last_seq;
};

struct ingest_batch {
        bool open;      /* a transaction is open */
        unsigned count; /* frames appended in it */
        uint64_t bytes; /* their size */
        /* Command acks of these frames, handed on after the commit. */
        struct ingest_ack *acks;
        size_t n_acks, cap_acks;
        /* The last seq each bulb had before this transaction: restored if the commit fails. */
        struct ingest_seq_undo *undo;
        size_t n_undo, cap_undo;
};

struct hub {
        struct iothub_conf *conf;
        sd_event *event;
        struct db *db;
        struct registry *registry;
        struct mqtt *mqtt;
        struct control *control;
        struct http *http;     /* HTTPS on the loop, shared by cloud and oauth */
        struct cloud *cloud;   /* NULL without [cloud] url */
        struct oauth *oauth;   /* NULL without [oauth] issuer */
        struct commands *commands; /* NULL without [cloud] url */
        struct ack *ack;           /* end-to-end acks to the bulbs */
        struct hubkey *hubkey; /* NULL until the key exists and opened */
        sd_event_source *key_timer; /* retries opening the key while it cannot be */
        uint64_t key_retry_usec;    /* the next retry's delay */
        int key_errno;              /* the last failure to open it, logged once per kind */
        char *key_error;            /* its one-line reason, for status */
        /* The spool, kept in memory so that the frame path never counts rows. */
        uint64_t spool_pending, spool_bytes;
        uint64_t spool_dropped; /* oldest frames dropped at [spool] max_bytes since start */
        sd_event_source *sigterm, *sigint, *sighup, *watchdog;
        uint64_t watchdog_usec;
        uint64_t start_monotonic_usec;
        struct hub_counters counters;
        struct ingest_batch batch;
        /* Unknown devices have no per-bulb log limit: one shared window for them. */
        struct ratelimit unknown_log_rl;
        struct ratelimit reject_log_rl; /* every rejection line together (ingest.c) */
};

/* Runs the daemon until SIGTERM/SIGINT. Returns the process exit status (DESIGN.md):
 * 0 on a clean stop, 78 on a bad configuration, 1 otherwise. */
int hub_run(const char *config_path, int log_level_override);

/* The one place the hub key is opened: on success it is announced to sign-in (which loads the
 * sealed tokens), the cloud relay and commands; on failure it is logged once per kind (with
 * MESSAGE_ID and a hint), kept in key_error, and tried again (1 s, doubling up to 10 s). Returns 0 (also when
 * it was open already) or the negative errno of hubkey_open(). */
int hub_open_key(struct hub *h);

/* One-line summary for STATUS= and the log. */
void hub_notify_status(struct hub *h);
/* Builds the status object of DESIGN.md "iothubctl status --json". */
int hub_status_json(struct hub *h, struct json_t **ret);
