/* SPDX-License-Identifier: MIT */
/* The daemon's run: load the configuration, open the state, build the loop, notify systemd,
 * run. Every source lives on one sd-event loop (systemd-timesyncd's shape). */
#include <inttypes.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>

#include <jansson.h>
#include <systemd/sd-daemon.h>

#include "iothub/ack.h"
#include "iothub/cloud.h"
#include "iothub/commands.h"
#include "iothub/control.h"
#include "iothub/dynsec.h"
#include "iothub/events.h"
#include "iothub/hub.h"
#include "iothub/ingest.h"
#include "iothub/log.h"
#include "iothub/mqtt.h"
#include "iothub/pair.h"
#include "iothub/signer.h"
#include "iothub/spool.h"
#include "iothub/uplink-client.h"

#define EXIT_CONFIG 78
#define STATUS_INTERVAL_USEC (5 * UINT64_C(1000000))
/* A key that could not be opened (no TPM yet, no key yet) is tried again after 1 s, doubling
 * up to every 10 s: a TPM that comes up just after the daemon is picked up at once, a missing
 * one costs a cheap open every 10 s. */
#define KEY_RETRY_FIRST_USEC (1 * UINT64_C(1000000))
#define KEY_RETRY_MAX_USEC (10 * UINT64_C(1000000))

/* The daemon's state: owned by hub_run() (on its stack), seen by nobody else. Every module
 * below is built here, handed what it needs and its event table, and freed in hub_done(). */
struct hub {
        struct iothub_conf *conf;
        sd_event *event;
        struct db *db;
        struct registry *registry;
        struct mqtt *mqtt;
        struct control *control;
        /* iothub-uplink (issue 14 stage 2): HTTPS, sign-in and the tokens are its; NULL without
         * [cloud] url. */
        struct uplink_client *uplink;
        bool uplink_ready;     /* it said it has a key and a token */
        struct cloud *cloud;   /* NULL without [cloud] url */
        uint64_t trimmed_at;   /* CLOCK_MONOTONIC usec of the last hub_trim_heap() */
        struct commands *commands; /* NULL without [cloud] url */
        struct ack *ack;           /* end-to-end acks to the bulbs */
        struct dynsec *dynsec;     /* per-bulb broker identities; NULL without [broker] dynsec */
        struct pair *pair;         /* pairing windows (hello messages) */
        struct events *events;     /* security events for the cloud; NULL without [cloud] url */
        /* The hub key and the sealed tokens live in iothub-signer (issue 14): the daemon asks it. */
        struct signer *signer;
        bool key_ready;             /* the signer named the hub key (KEY_INFO) */
        struct signer_op *key_op;   /* the KEY_INFO out */
        sd_event_source *key_timer; /* asks again while there is no key */
        uint64_t key_retry_usec;    /* the next retry's delay */
        int key_errno;              /* the last failure to open it, logged once per kind */
        bool key_log_pending;       /* logged once the signer said why (its STATUS answer) */
        char *key_error;            /* its one-line reason, for status */
        struct ingest *ingest;     /* the frame path */
        /* The spool, kept in memory so that the frame path never counts rows. */
        struct spool_counts spool;
        sd_event_source *sigterm, *sigint, *sighup, *watchdog;
        uint64_t watchdog_usec;
        uint64_t start_monotonic_usec;
        int db_file_errno; /* the database file's name lost (hub_check_db()), logged once */
};

static int hub_open_key(struct hub *h);
static void hub_notify_status(struct hub *h);
static int hub_status_json(struct hub *h, json_t **ret);

static void on_mqtt_message(void *userdata, const char *topic, const uint8_t *payload, size_t len) {
        struct hub *h = userdata;

        /* The broker's answers to the hub's dynamic security requests are not frames. */
        if (dynsec_is_response_topic(topic)) {
                dynsec_on_message(h->dynsec, payload, len);
                return;
        }
        if (pair_is_hello_topic(h->pair, topic)) {
                pair_on_hello(h->pair, topic, payload, len);
                return;
        }
        ingest_message(h->ingest, topic, payload, len);
}

static void on_mqtt_read_done(void *userdata) {
        struct hub *h = userdata;

        ingest_read_done(h->ingest);
}

/* Frames are in the spool: the relay may have a batch due. */
static void on_ingest_committed(void *userdata) {
        struct hub *h = userdata;

        cloud_kick(h->cloud);
}

/* A frame was rejected: the vendor's monitoring hears of it, aggregated (events.c). */
static void on_ingest_rejected(void *userdata, const char *dev, enum frame_reason reason) {
        struct hub *h = userdata;

        events_note(h->events, EVENT_FRAME_REJECTED, frame_reason_to_string(reason), dev, 1);
}

static void on_ingest_storage_changed(void *userdata) {
        hub_notify_status(userdata);
}

/* Inside the frames' transaction: the ack is recorded with its frame (commands.h). */
static int on_ingest_command_ack(void *userdata, const char *dev, const char *id, bool ok, const char *err) {
        struct hub *h = userdata;

        return commands_ack_store(h->commands, dev, id, ok, err);
}

static void on_ingest_command_acks_done(void *userdata, bool committed) {
        struct hub *h = userdata;

        commands_acks_done(h->commands, committed);
}

/* The uplink's news (its WATCH). */
static void on_uplink_event(void *userdata, const char *type, const char *reason) {
        static const char *const signin_reasons[] = { "signed_in", "signed_out", "login_required" };
        struct hub *h = userdata;

        if (streq(type, "registered"))
                cloud_registered(h->cloud);
        if (streq(type, "signin_changed")) {
                /* A security event; its reason a static name (events.h), one of oauth.c's. */
                for (size_t i = 0; i < ELEMENTSOF(signin_reasons); i++)
                        if (streq_ptr(reason, signin_reasons[i]))
                                events_note(h->events, EVENT_SIGNIN_CHANGED, signin_reasons[i], NULL, 1);
        }
        /* A new access token, the key, a registration: uploads and the command poll that waited
         * go now (the uplink's STATUS, asked after every piece of news, says whether they can). */
        cloud_kick(h->cloud);
        commands_kick(h->commands);
}

/* Connected or lost the uplink, or its STATUS changed. */
static void on_uplink_status_changed(void *userdata) {
        struct hub *h = userdata;
        bool ready = uplink_have_key(h->uplink) && uplink_have_token(h->uplink);

        if (ready && !h->uplink_ready) {
                cloud_key_ready(h->cloud);
                commands_kick(h->commands);
        } else
                cloud_kick(h->cloud); /* what the relay says while it waits */
        h->uplink_ready = ready;
        hub_notify_status(h);
}

/* The hub is registered: the command poll can start. */
static void on_cloud_registered(void *userdata) {
        struct hub *h = userdata;

        commands_kick(h->commands);
}

/* The frame counters, zero before the frame path exists (a status line during start-up). */
static const struct ingest_counters *frame_counters(struct hub *h) {
        static const struct ingest_counters none;

        return h->ingest ? ingest_counters(h->ingest) : &none;
}

static void on_mqtt_connected(void *userdata, bool connected) {
        struct hub *h = userdata;

        hub_notify_status(h);
        ack_connected(h->ack, connected);
        dynsec_connected(h->dynsec, connected);
        if (connected)
                commands_kick(h->commands);
}

static int on_control_status_json(void *userdata, json_t **ret) {
        return hub_status_json(userdata, ret);
}

/* A bulb was enrolled or revoked: the cloud gets the new list before the next batch. */
static void on_control_devices_changed(void *userdata) {
        struct hub *h = userdata;

        cloud_devices_changed(h->cloud);
}

/* A bulb enrolled, by `bulb add` or by pairing (enrol.c did the enrolment and logged it). */
static void on_bulb_enrolled(void *userdata, const char *id) {
        struct hub *h = userdata;

        cloud_devices_changed(h->cloud);
        events_note(h->events, EVENT_BULB_ENROLLED, NULL, id, 1);
}

static void on_bulb_revoked(void *userdata, const char *id) {
        struct hub *h = userdata;

        events_note(h->events, EVENT_BULB_REVOKED, NULL, id, 1);
}

static void on_control_peer_refused(void *userdata) {
        struct hub *h = userdata;

        events_note(h->events, EVENT_CONTROL_REFUSED, NULL, NULL, 1);
}

static int on_control_durable_wait(void *userdata, db_sync_wait_t cb, void *cb_userdata, struct db_sync_wait **ret) {
        struct hub *h = userdata;

        return db_sync_wait(h->db, cb, cb_userdata, ret);
}

static bool on_control_key_missing(void *userdata, const char **ret_error) {
        struct hub *h = userdata;

        if (h->key_ready)
                return false;
        *ret_error = h->key_error;
        return true;
}

static void hub_key_unavailable(struct hub *h);

static void on_signer_status_changed(void *userdata) {
        struct hub *h = userdata;
        const char *why = signer_last_error(h->signer);

        /* While there is no key: the signer's own words for why (a TPM error decoded, with its
         * hint), for status and for the one journal entry of this kind of failure. */
        if (!h->key_ready && h->key_errno && why && !streq_ptr(why, h->key_error)) {
                char *t = strdup(why);
                if (t) {
                        free(h->key_error);
                        h->key_error = t;
                }
        }
        if (!h->key_ready && h->key_log_pending)
                hub_key_unavailable(h);
        hub_notify_status(h);
}

/* The signer named another key than before (pointed at another TPM, a key made anew): what the
 * cloud registered is not this one any more. Said; the modules sign with whatever it holds. */
static void on_signer_key_changed(void *userdata) {
        struct hub *h = userdata;

        log_event(LOG_WARNING, 0, IOTHUB_MID_KEY_UNAVAILABLE, NULL, "key_changed",
                  "iothub-signer now holds another hub key, %s: run 'iothubctl register' again",
                  signer_key_id(h->signer));
}

static void on_mqtt_published(void *userdata, int mid) {
        struct hub *h = userdata;

        commands_on_published(h->commands, mid);
}

/* IOTHUB_REASON= of a key that cannot be opened; the catalog entry explains each. */
static const char *key_error_reason(int r) {
        switch (r) {
        case -ENOENT:
                return "no_key";
        case -ENODEV:
                return "tpm_device_missing";
        case -EACCES:
        case -EPERM:
                return "permission_denied";
        case -ECONNREFUSED:
        case -EHOSTDOWN:
        case -EHOSTUNREACH:
                return "tpm_unreachable";
        case -ETIMEDOUT:
        case -ECONNRESET:
                return "signer_unreachable";
        case -EINVAL:
        case -EOPNOTSUPP:
                return "bad_configuration";
        default:
                return "tpm_error";
        }
}

/* Builds the status object of DESIGN.md "iothubctl status --json" from every module's part. */
static int hub_status_json(struct hub *h, json_t **ret) {
        const struct ingest_counters *counters = frame_counters(h);
        uint64_t enrolled = 0, revoked = 0, moved_aside = 0;
        struct registry_key_stats ks;
        json_t *rejected, *key_cache, *o, *key;
        int r;

        r = spool_moved_aside_count(h->db, &moved_aside);
        if (r < 0)
                return r;
        for (size_t i = 0; i < registry_count(h->registry); i++) {
                if (registry_get(h->registry, i)->revoked)
                        revoked++;
                else
                        enrolled++;
        }
        registry_key_stats(h->registry, &ks);
        key_cache = json_pack("{s:I,s:I,s:I,s:I,s:I,s:I}", "cached", (json_int_t) ks.cached, "max",
                              (json_int_t) ks.max, "hits", (json_int_t) ks.hits, "misses", (json_int_t) ks.misses,
                              "evictions", (json_int_t) ks.evictions, "damaged", (json_int_t) ks.damaged);
        rejected = json_object();
        if (!rejected || !key_cache) {
                json_decref(rejected);
                json_decref(key_cache);
                return -ENOMEM;
        }
        for (int i = FRAME_OK + 1; i < _FRAME_REASON_MAX; i++)
                (void) json_object_set_new(rejected, frame_reason_to_string(i),
                                           json_integer((json_int_t) counters->frames_rejected[i]));
        o = json_pack("{s:s,s:s,s:I,s:s,s:{s:b},s:{s:I,s:I,s:I,s:o},s:{s:I,s:I,s:I,s:I},s:{s:I,s:I,s:o}}", "hub_id",
                      h->conf->hub.id, "version", IOTHUB_VERSION, "uptime_s",
                      (json_int_t) ((now_monotonic_usec() - h->start_monotonic_usec) / UINT64_C(1000000)),
                      "config", h->conf->path, "mqtt", "connected", mqtt_is_connected(h->mqtt), "frames",
                      "received", (json_int_t) counters->frames_received, "accepted",
                      (json_int_t) counters->frames_accepted, "store_failed",
                      (json_int_t) counters->frames_store_failed, "rejected", rejected, "spool", "pending",
                      (json_int_t) h->spool.pending, "bytes", (json_int_t) h->spool.bytes, "dropped",
                      (json_int_t) h->spool.dropped, "moved_aside", (json_int_t) moved_aside, "bulbs", "enrolled",
                      (json_int_t) enrolled, "revoked", (json_int_t) revoked, "key_cache", key_cache);
        if (!o)
                return -ENOMEM;
        /* The key object whatever else is configured: iothubctl(1) and doctor rely on it. */
        /* What the signer said of it (KEY_INFO), and the hub key's signatures: this daemon's
         * (commands) and iothub-uplink's (requests, DPoP proofs; its last STATUS), each counted
         * since its own process started (iothubctl(1)). With a cloud, the key is ready once
         * iothub-uplink, which signs the requests, has it too (its STATUS, asked fresh for
         * this): until then uploads and sign-in wait. */
        json_int_t signatures = (json_int_t) (signer_signatures(h->signer) + uplink_signatures(h->uplink));
        if (h->key_ready && h->uplink && !uplink_have_key(h->uplink))
                key = json_pack("{s:s,s:n,s:I,s:s,s:s}", "backend", signer_key_backend(h->signer), "id",
                                "signatures", signatures, "error",
                                uplink_key_error(h->uplink) ?: "iothub-uplink has not got the hub key from the signer yet",
                                "reason", "uplink_no_key");
        else if (h->key_ready)
                /* The uploads' signatures are the uplink's: its signer's words when they fail. */
                key = json_pack("{s:s,s:s,s:I,s:s*}", "backend", signer_key_backend(h->signer), "id",
                                signer_key_id(h->signer), "signatures", signatures,
                                "error", signer_last_error(h->signer) ?: uplink_key_error(h->uplink));
        else
                key = json_pack("{s:s,s:n,s:I,s:s*,s:s*}", "backend", key_backend_to_string(h->conf->key.backend),
                                "id", "signatures", signatures, "error", h->key_error,
                                "reason", h->key_errno ? key_error_reason(h->key_errno) : NULL);
        if (!key || json_object_set_new(o, "key", key) < 0 || signer_status_json(h->signer, o) < 0) {
                json_decref(o);
                return -ENOMEM;
        }
        /* Whether frames can be stored (ingest.c): the cause while they cannot. */
        uint64_t refused = 0;
        int store_errno = h->ingest ? ingest_storage(h->ingest, &refused) : 0;
        if (json_object_set_new(o, "storage",
                                json_pack("{s:b,s:s*,s:s*,s:I}", "ok", store_errno == 0, "reason",
                                          ingest_store_reason(store_errno), "error",
                                          store_errno ? strerror(-store_errno) : NULL, "refused",
                                          (json_int_t) refused)) < 0) {
                json_decref(o);
                return -ENOMEM;
        }
        r = ack_status_json(h->ack, o);
        if (r >= 0)
                r = cloud_status_json(h->cloud, o);
        if (r >= 0)
                r = uplink_status_json(h->uplink, o);
        if (r >= 0)
                r = commands_status_json(h->commands, o);
        if (r >= 0)
                r = dynsec_status_json(h->dynsec, o);
        if (r >= 0)
                r = pair_status_json(h->pair, o);
        if (r >= 0)
                r = events_status_json(h->events, o);
        if (r < 0) {
                json_decref(o);
                return r;
        }
        *ret = o;
        return 0;
}

/* One-line summary for STATUS= and the log. */
static void hub_notify_status(struct hub *h) {
        const struct ingest_counters *counters = frame_counters(h);
        uint64_t rejected = 0;
        char cloud[320], storage[96] = "";
        int store_errno = h->ingest ? ingest_storage(h->ingest, NULL) : 0;

        for (int i = 0; i < _FRAME_REASON_MAX; i++)
                rejected += counters->frames_rejected[i];
        cloud_status_line(h->cloud, cloud, sizeof cloud);
        if (uplink_login_required(h->uplink))
                (void) snprintf(cloud, sizeof cloud, "sign-in required (iothubctl login)");
        /* First when frames cannot be stored: that needs the operator, and systemctl status
         * shows the beginning of a long line. */
        if (store_errno)
                (void) snprintf(storage, sizeof storage, "CANNOT STORE FRAMES (%s: %s); ",
                                ingest_store_reason(store_errno), strerror(-store_errno));
        (void) sd_notifyf(false,
                          "STATUS=%sMQTT %s; %" PRIu64 " frames accepted, %" PRIu64 " rejected; spool %" PRIu64
                          " frames; %s",
                          storage, mqtt_is_connected(h->mqtt) ? "connected" : "disconnected",
                          counters->frames_accepted, rejected, h->spool.pending, cloud);
}

/* The database deleted under the running daemon (an rm -rf, a cleaner): SQLite goes on with
 * the open file, and the next start would make an empty one, with every enrolment, replay
 * counter and spooled frame gone. Put it back from the open connection at once. Another file
 * put in its place (a backup copied over it) is the operator's doing: said, not undone. */
static void hub_check_db(struct hub *h) {
        _cleanup_free_ char *err = NULL;
        int r;

        if (db_in_transaction(h->db))
                return;
        r = db_check_file(h->db);
        if (r == 0 || r == h->db_file_errno)
                return;
        h->db_file_errno = r;
        if (r != -ENOENT) {
                log_event(LOG_ERR, r, IOTHUB_MID_DB_REPLACED, NULL, "replaced",
                          "%s/iothub.db is not the file this daemon opened (%m): it keeps using the one it "
                          "has open until it stops; the next start uses the new one",
                          h->conf->hub.state_dir);
                return;
        }
        r = db_restore_file(h->db, &err);
        if (r < 0) {
                log_event(LOG_CRIT, r, IOTHUB_MID_DB_REPLACED, NULL, "deleted",
                          "%s/iothub.db was deleted under the running daemon and could not be restored: %s",
                          h->conf->hub.state_dir, err ? err : strerror(-r));
                return;
        }
        h->db_file_errno = 0;
        log_event(LOG_ERR, -ENOENT, IOTHUB_MID_DB_REPLACED, NULL, "deleted",
                  "%s/iothub.db was deleted under the running daemon; restored it from the open database",
                  h->conf->hub.state_dir);
}

/* Gives the heap's free pages back to the system (issue 13, "Memory"). A burst of work (a
 * thousand enrolments, each sending the cloud the list of every bulb; a run of big batches)
 * leaves the heap full of freed small blocks between live ones, which glibc never returns by
 * itself: with 5,000 bulbs enrolled that was 6.7 MiB of a 10.5 MiB heap. malloc_trim(0) returns
 * every free page (MADV_DONTNEED), not only the top of the heap. Only when there is enough free
 * to be worth a walk of the free lists: 64 KiB, since with 200 bulbs under load what a relay
 * leaves free between two timers (batch bodies, MQTT messages) is 150 to 450 KiB, and a trim of a
 * settled heap costs 7 to 50 us every 5 s (256 KiB left 100 to 150 KiB more of private memory at
 * the bench's reading, make bench "relay: memory after the load"). */
#define HEAP_TRIM_MIN_FREE (64 * 1024)
/* The spool drained (the end of a burst) trims at once, at most this often: mallinfo2() walks the
 * free lists (45 us), and at 2,000 frames/s the spool drains after every batch. */
#define HEAP_TRIM_DRAINED_MIN_USEC (1000 * UINT64_C(1000))
static void hub_trim_heap(struct hub *h, const char *why) {
        struct mallinfo2 mi;

        h->trimmed_at = now_monotonic_usec();
        mi = mallinfo2();

        if (mi.fordblks < HEAP_TRIM_MIN_FREE) {
                log_debug("Heap (%s): %zu KiB free in %zu KiB, not trimmed", why, mi.fordblks / 1024, mi.arena / 1024);
                return;
        }
        uint64_t t0 = now_monotonic_usec();
        int released = malloc_trim(0);
        log_debug("Heap (%s): %zu KiB free in %zu KiB, trimmed (%s) in %" PRIu64 " us", why, mi.fordblks / 1024,
                  mi.arena / 1024, released ? "pages returned" : "nothing to return", now_monotonic_usec() - t0);
}

/* A burst is over: what it freed (batch bodies, MQTT messages, the held frames) goes back to the
 * system now, not at the next status timer, up to 5 s later. */
static void on_cloud_drained(void *userdata) {
        struct hub *h = userdata;

        if (now_monotonic_usec() - h->trimmed_at >= HEAP_TRIM_DRAINED_MIN_USEC)
                hub_trim_heap(h, "the spool drained");
}

static int on_status_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct hub *h = userdata;

        hub_trim_heap(h, "status timer");
        hub_check_db(h);
        /* The signer's counters for status (one small request every STATUS_INTERVAL_USEC). */
        if (h->key_ready)
                signer_refresh_status(h->signer);
        uplink_refresh_status(h->uplink);
        hub_notify_status(userdata);
        (void) sd_event_source_set_time(s, usec + STATUS_INTERVAL_USEC);
        return 0;
}

static int on_watchdog(sd_event_source *s, uint64_t usec, void *userdata) {
        struct hub *h = userdata;

        (void) sd_notify(false, "WATCHDOG=1");
        (void) sd_event_source_set_time(s, usec + h->watchdog_usec / 2);
        return 0;
}

static int on_sigterm(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        struct hub *h = userdata;

        (void) sd_notify(false, "STOPPING=1\nSTATUS=Stopping");
        log_event(LOG_INFO, 0, IOTHUB_MID_STOPPING, NULL, NULL, "Received %s, stopping",
                  si->ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
        return sd_event_exit(h->event, 0);
}

static int on_key_timer(sd_event_source *s, uint64_t usec, void *userdata);

/* The one place the hub key is learnt: the signer answered KEY_INFO (r, p). Once it named the
 * key, every module that needs it hears of it (cloud, sign-in, commands) and signs through the
 * signer; until then a timer asks again, so that a TPM that comes up after the signer, a key made
 * later, or a signer that starts after the daemon is picked up without a restart. Each kind of
 * failure is logged once, with a MESSAGE_ID whose catalog entry says what to do, and kept in
 * key_error for status. Returns 0 or r. */
/* The journal entry of a kind of key failure, once: with the signer's reason when it gave one. */
static void hub_key_unavailable(struct hub *h) {
        h->key_log_pending = false;
        log_event(h->cloud ? LOG_ERR : LOG_NOTICE, h->key_errno, IOTHUB_MID_KEY_UNAVAILABLE, NULL,
                  key_error_reason(h->key_errno), "No hub key, %s: %s",
                  h->cloud ? "cloud uploads and sign-in wait" : "needed once [cloud] is configured",
                  h->key_error);
}

static int hub_key_result(struct hub *h, int r) {
        if (h->key_ready)
                return 0;
        if (r < 0) {
                if (h->key_log_pending) /* the signer never said why: as it is */
                        hub_key_unavailable(h);
                if (r != h->key_errno) {
                        events_note(h->events, EVENT_KEY_ERROR, key_error_reason(r), NULL, 1);
                        /* Logged when the signer's STATUS answer says why (on_signer_status_changed),
                         * or at the next try. */
                        h->key_log_pending = true;
                        free(h->key_error);
                        h->key_error = strdup(r == -ENOENT ? "no hub key: run 'iothubctl key init'" : strerror(-r));
                }
                h->key_errno = r;
                signer_refresh_status(h->signer);
                if (!h->key_timer) {
                        h->key_retry_usec = KEY_RETRY_FIRST_USEC;
                        int k = sd_event_add_time_relative(h->event, &h->key_timer, CLOCK_MONOTONIC,
                                                           h->key_retry_usec, 0, on_key_timer, h);
                        if (k < 0)
                                return log_error_errno(k, "Failed to arm the hub key retry timer: %m");
                }
                return r;
        }
        h->key_ready = true;
        h->key_log_pending = false;
        h->key_errno = 0;
        free(h->key_error);
        h->key_error = NULL;
        h->key_timer = sd_event_source_disable_unref(h->key_timer);
        log_event(LOG_INFO, 0, IOTHUB_MID_KEY_OPENED, NULL, NULL, "Hub key %s (%s), held by iothub-signer",
                  signer_key_id(h->signer), signer_key_backend(h->signer));
        /* The announcement: commands can be signed (SIGN_COMMAND; uploads are the uplink's,
         * which asks the signer for the key itself). */
        cloud_key_ready(h->cloud);
        commands_key_ready(h->commands, h->signer);
        hub_notify_status(h);
        return 0;
}

static void on_key_info(void *userdata, int r, const struct signer_reply *p) {
        struct hub *h = userdata;

        h->key_op = signer_op_free(h->key_op); /* the signer client keeps the key it named */
        (void) hub_key_result(h, r);
}

/* Asks the signer (asynchronously: READY=1 and the bulb side never wait for it). */
static int hub_open_key(struct hub *h) {
        if (h->key_ready || h->key_op)
                return 0;
        return signer_key_info(h->signer, on_key_info, h, &h->key_op);
}

static int on_key_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct hub *h = userdata;

        if (!h->key_ready && !h->key_op && hub_open_key(h) < 0) {
                log_error("Cannot ask the signer for the hub key; trying again");
        }
        if (!h->key_ready && h->key_timer) {
                h->key_retry_usec *= 2;
                if (h->key_retry_usec > KEY_RETRY_MAX_USEC)
                        h->key_retry_usec = KEY_RETRY_MAX_USEC;
                /* A relative timer is a one-shot: re-arm it. */
                (void) sd_event_source_set_time(h->key_timer, usec + h->key_retry_usec);
                (void) sd_event_source_set_enabled(h->key_timer, SD_EVENT_ONESHOT);
        }
        return 0;
}

/* Keys that the running daemon cannot change: report each, keep the value it runs with. */
static void keep_string(const char *section, const char *key, char **newv, char **oldv) {
        if (!streq_ptr(*newv, *oldv))
                log_warning("[%s] %s changed; it takes effect after a restart, keeping '%s'", section, key,
                            *oldv ? *oldv : "");
        char *t = *newv;
        *newv = *oldv;
        *oldv = t;
}

#define KEEP_NUMBER(section, key, n, o)                                                                    \
        do {                                                                                               \
                if ((n) != (o))                                                                            \
                        log_warning("[%s] %s changed; it takes effect after a restart", section, key);     \
                (n) = (o);                                                                                 \
        } while (0)

static int hub_reload(struct hub *h) {
        _cleanup_conf_ struct iothub_conf *n = NULL;
        _cleanup_free_ char *err = NULL;
        struct iothub_conf *o = h->conf;
        int r;

        (void) sd_notifyf(false, "RELOADING=1\nMONOTONIC_USEC=%" PRIu64 "\nSTATUS=Reloading configuration",
                          now_monotonic_usec());
        r = conf_load(o->path, &n, &err);
        events_note(h->events, EVENT_CONFIG_RELOADED, r < 0 ? "failed" : "ok", NULL, 1);
        if (r < 0) {
                log_event(LOG_ERR, r, IOTHUB_MID_CONFIG_ERROR, NULL, NULL,
                          "Reload failed, keeping the running configuration: %s", err ? err : strerror(-r));
                goto done;
        }
        keep_string("hub", "id", &n->hub.id, &o->hub.id);
        keep_string("hub", "state_dir", &n->hub.state_dir, &o->hub.state_dir);
        keep_string("hub", "runtime_dir", &n->hub.runtime_dir, &o->hub.runtime_dir);
        keep_string("mqtt", "host", &n->mqtt.host, &o->mqtt.host);
        KEEP_NUMBER("mqtt", "port", n->mqtt.port, o->mqtt.port);
        keep_string("mqtt", "topic_prefix", &n->mqtt.topic_prefix, &o->mqtt.topic_prefix);
        keep_string("mqtt", "client_id", &n->mqtt.client_id, &o->mqtt.client_id);
        keep_string("mqtt", "username", &n->mqtt.username, &o->mqtt.username);
        keep_string("mqtt", "password_file", &n->mqtt.password_file, &o->mqtt.password_file);
        keep_string("mqtt", "ca_file", &n->mqtt.ca_file, &o->mqtt.ca_file);
        KEEP_NUMBER("mqtt", "keepalive_s", n->mqtt.keepalive_s, o->mqtt.keepalive_s);
        KEEP_NUMBER("key", "backend", n->key.backend, o->key.backend);
        keep_string("key", "tcti", &n->key.tcti, &o->key.tcti);
        KEEP_NUMBER("key", "handle", n->key.handle, o->key.handle);
        keep_string("key", "file", &n->key.file, &o->key.file);
        keep_string("signer", "socket", &n->signer.socket, &o->signer.socket);
        keep_string("cloud", "url", &n->cloud.url, &o->cloud.url);
        keep_string("cloud", "ca_file", &n->cloud.ca_file, &o->cloud.ca_file);
        KEEP_NUMBER("broker", "dynsec", n->broker.dynsec, o->broker.dynsec);
        KEEP_NUMBER("broker", "timeout_s", n->broker.timeout_s, o->broker.timeout_s);
        keep_string("cloud", "command_key_file", &n->cloud.command_key_file, &o->cloud.command_key_file);
        /* Everything else ([frames], [bulbs], [cloud] batching, [spool]) applies at once. */
        /* The modules hold this struct since their _new(): the new values go into it in place,
         * and the old ones into n, which is freed on return. */
        struct iothub_conf t = *o;
        *o = *n;
        *n = t;
        /* The modules read the values they use from the struct, but the segment size is derived
         * from [spool] max_bytes once, into the log: derived again, for the segments to come. */
        spool_set_max_bytes(h->db, h->conf->spool.max_bytes);
        log_event(LOG_INFO, 0, IOTHUB_MID_RELOADED, NULL, NULL, "Reloaded %s", h->conf->path);
done:
        (void) sd_notify(false, "READY=1");
        hub_notify_status(h);
        return 0;
}

static int on_sighup(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        return hub_reload(userdata);
}

static void hub_done(struct hub *h) {
        if (h->ingest) {
                (void) ingest_commit(h->ingest);
                ingest_sync(h->ingest); /* its last acks, before the MQTT client goes */
        }
        /* First the control connections: they own requests into the modules below (a pairing
         * window, broker requests), which must be cancelled while those modules still exist. */
        control_free(h->control);
        h->control = NULL;
        pair_free(h->pair); /* cancels its broker requests */
        h->pair = NULL;
        /* Before the connection it talks over; NULL, as mqtt_free() still reports the disconnect. */
        dynsec_free(h->dynsec);
        h->dynsec = NULL;
        mqtt_free(h->mqtt); /* may still report the disconnect to the acks */
        ack_free(h->ack);
        /* Top down: each module before the ones it calls. */
        commands_free(h->commands);
        events_free(h->events);
        cloud_free(h->cloud);
        /* After its callers (each cancelled its calls). */
        h->uplink = uplink_client_free(h->uplink);
        /* After the modules that own requests to it (each freed its own); cancels the rest. */
        h->key_op = signer_op_free(h->key_op);
        signer_free(h->signer);
        sd_event_source_disable_unref(h->key_timer);
        free(h->key_error);
        sd_event_source_disable_unref(h->sigterm);
        sd_event_source_disable_unref(h->sigint);
        sd_event_source_disable_unref(h->sighup);
        sd_event_source_disable_unref(h->watchdog);
        registry_free(h->registry);
        ingest_free(h->ingest);
        db_close(h->db);
        sd_event_unref(h->event);
        conf_free(h->conf);
}

int hub_run(const char *config_path, int log_level_override) {
        struct hub h = { .start_monotonic_usec = now_monotonic_usec() };
        _cleanup_free_ char *err = NULL;
        sigset_t mask;
        int r, exit_status = 1;

        /* No secret (tokens, keys in memory) may end up in a core dump. */
        (void) prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

        r = conf_load(config_path, &h.conf, &err);
        if (r < 0) {
                log_event(LOG_ERR, r, IOTHUB_MID_CONFIG_ERROR, NULL, NULL, "%s", err ? err : strerror(-r));
                return EXIT_CONFIG;
        }
        if (log_level_override >= 0)
                log_set_max_level(log_level_override);

        r = sd_event_default(&h.event);
        if (r < 0) {
                log_error_errno(r, "Failed to create event loop: %m");
                goto out;
        }
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        (void) sigprocmask(SIG_BLOCK, &mask, NULL);
        if ((r = sd_event_add_signal(h.event, &h.sigterm, SIGTERM, on_sigterm, &h)) < 0 ||
            (r = sd_event_add_signal(h.event, &h.sigint, SIGINT, on_sigterm, &h)) < 0 ||
            (r = sd_event_add_signal(h.event, &h.sighup, SIGHUP, on_sighup, &h)) < 0) {
                log_error_errno(r, "Failed to add signal handlers: %m");
                goto out;
        }

        /* Anyone who can write the state directory could replace iothub.db and enrol bulbs. */
        r = check_trusted_dir(h.conf->hub.state_dir, &err);
        if (r < 0 && r != -ENOENT) {
                log_error_errno(r, "Refusing the state directory: %s", err);
                goto out;
        }
        free(err);
        err = NULL;
        r = db_open(h.conf->hub.state_dir, &h.db, &err);
        if (r == -EUCLEAN)
                goto corrupt;
        if (r < 0) {
                log_error_errno(r, "Failed to open the state database in %s: %s", h.conf->hub.state_dir,
                                err ? err : strerror(-r));
                goto out;
        }
        free(err);
        err = NULL;
        uint64_t t_spool = now_monotonic_usec();
        r = spool_open(h.db, &err);
        if (r < 0) {
                /* Its own message, not the database's: the segment files are beside it. */
                log_error_errno(r, "Failed to open the spool in %s/spool: %s", h.conf->hub.state_dir,
                                err ? err : strerror(-r));
                goto out;
        }
        {
                /* The spool's segments as the last run left them (issue 13, spool.c). */
                struct seglog_found f;
                spool_found(h.db, &f);
                /* Before READY=1: only the segments without a summary are read (spool.c). */
                log_debug("Opened the spool in %.1f ms: %" PRIu64 " segments, %" PRIu64 " of them from their summaries",
                          (double) (now_monotonic_usec() - t_spool) / 1000.0, f.segments, f.summarized);
                if (f.damaged > 0)
                        log_error("Spool segments in %s/spool: skipped %" PRIu64 " damaged regions (%" PRIu64
                                  " bytes); the intact frames around them are kept",
                                  h.conf->hub.state_dir, f.damaged, f.damaged_bytes);
                if (f.torn_bytes > 0)
                        log_notice("Spool segments in %s/spool: cut off %" PRIu64 " bytes of an append the last run "
                                   "did not finish (never acknowledged; the bulbs resend those frames)",
                                   h.conf->hub.state_dir, f.torn_bytes);
                /* What a power cut right after a roll leaves: expected, not news (seglog.c). */
                if (f.torn_older > 0)
                        log_debug("Spool segments in %s/spool: ignored the torn ends of %" PRIu64
                                  " older segments (%" PRIu64 " bytes, never acknowledged)",
                                  h.conf->hub.state_dir, f.torn_older, f.torn_older_bytes);
        }
        /* Loading the bulbs and counting the spool read every page of both tables: where a
         * damaged file shows at start. */
        uint64_t t0 = now_monotonic_usec();
        r = registry_open(h.db, &h.registry);
        if (r == -EUCLEAN)
                goto corrupt;
        if (r < 0) {
                log_error_errno(r, "Failed to load enrolled bulbs: %m (%s)", db_errmsg(h.db));
                goto out;
        }
        /* Before READY=1 (issue 13: within 50 ms of exec with 5,000 bulbs). */
        log_debug("Loaded %zu bulbs in %.1f ms", registry_count(h.registry),
                  (double) (now_monotonic_usec() - t0) / 1000.0);
        r = spool_stats(h.db, &h.spool.pending, &h.spool.bytes);
        if (r == -EUCLEAN)
                goto corrupt;
        if (r < 0) {
                log_error_errno(r, "Failed to read the spool: %m (%s)", db_errmsg(h.db));
                goto out;
        }
        r = signer_new(h.event, h.conf,
                       &(struct signer_events){ .status_changed = on_signer_status_changed,
                                                .key_changed = on_signer_key_changed,
                                                .userdata = &h },
                       &h.signer);
        if (r < 0) {
                log_error_errno(r, "Failed to set up the signer's client: %m");
                goto out;
        }
        r = uplink_client_new(h.event, h.conf,
                              &(struct uplink_client_events){ .event = on_uplink_event,
                                                              .status_changed = on_uplink_status_changed,
                                                              .userdata = &h },
                              &h.uplink);
        if (r < 0) {
                log_error_errno(r, "Failed to set up the uplink's client: %m");
                goto out;
        }
        r = cloud_new(h.event, h.conf, h.db, h.registry, h.uplink, &h.spool,
                      &(struct cloud_events){ .registered = on_cloud_registered,
                                              .drained = on_cloud_drained,
                                              .userdata = &h },
                      &h.cloud);
        if (r == -EUCLEAN) /* the tables it loads are damaged, as in registry_open() */
                goto corrupt;
        if (r < 0) {
                log_error_errno(r, "Failed to set up the cloud relay: %m");
                goto out;
        }
        r = events_new(h.event, h.conf, h.db, h.cloud, h.uplink, &h.spool, &h.events);
        if (r == -EUCLEAN) /* the tables it loads are damaged, as in registry_open() */
                goto corrupt;
        if (r < 0) {
                log_error_errno(r, "Failed to set up security events: %m");
                goto out;
        }
        free(err);
        err = NULL;
        /* Its callbacks run from the loop only, once everything below exists. */
        r = mqtt_new(h.event, h.conf,
                     &(struct mqtt_callbacks){ .message = on_mqtt_message,
                                               .read_done = on_mqtt_read_done,
                                               .connected = on_mqtt_connected,
                                               .published = on_mqtt_published },
                     &h, &h.mqtt, &err);
        if (r < 0) {
                log_error_errno(r, "Failed to set up MQTT: %s", err ? err : strerror(-r));
                goto out;
        }
        if (h.conf->broker.dynsec) {
                r = dynsec_new(h.event, h.conf, h.mqtt, h.registry, &h.dynsec);
                if (r >= 0)
                        r = mqtt_subscribe(h.mqtt, DYNSEC_RESPONSE_TOPIC);
                if (r < 0) {
                        log_error_errno(r, "Failed to set up the broker's dynamic security: %m");
                        goto out;
                }
        }
        {
                _cleanup_free_ char *hello = strdup_printf("%s/+/hello", h.conf->mqtt.topic_prefix);
                r = hello ? pair_new(h.event, h.conf, h.registry, h.dynsec,
                                     &(struct pair_events){ .enrolled = on_bulb_enrolled, .userdata = &h }, &h.pair)
                          : -ENOMEM;
                if (r >= 0)
                        r = mqtt_subscribe(h.mqtt, hello);
                if (r < 0) {
                        log_error_errno(r, "Failed to set up pairing: %m");
                        goto out;
                }
        }
        r = commands_new(h.event, h.conf, h.db, h.registry, h.mqtt, h.cloud, h.uplink, h.events, &h.commands);
        if (r == -EUCLEAN) /* the tables it loads are damaged, as in registry_open() */
                goto corrupt;
        if (r < 0) {
                log_error_errno(r, "Failed to set up commands: %m");
                goto out;
        }
        r = ack_new(h.event, h.conf, h.mqtt, &h.ack);
        if (r < 0) {
                log_error_errno(r, "Failed to set up acks to the bulbs: %m");
                goto out;
        }
        r = ingest_new(h.event, h.conf, h.db, h.registry, h.ack, &h.spool,
                       &(struct ingest_events){ .committed = on_ingest_committed,
                                                /* No commands, no acks to collect. */
                                                .command_ack = h.commands ? on_ingest_command_ack : NULL,
                                                .command_acks_done = h.commands ? on_ingest_command_acks_done : NULL,
                                                .rejected = on_ingest_rejected,
                                                .storage_changed = on_ingest_storage_changed,
                                                .userdata = &h },
                       &h.ingest);
        if (r == -EUCLEAN) /* the spool it reads the bulbs' seqs from is damaged, as in registry_open() */
                goto corrupt;
        if (r < 0) {
                log_error_errno(r, "Failed to set up the frame path: %m");
                goto out;
        }
        r = control_new(h.event, h.conf, h.registry, h.cloud, h.uplink, h.dynsec, h.pair,
                        &(struct control_events){ .status_json = on_control_status_json,
                                                  .devices_changed = on_control_devices_changed,
                                                  .bulb_enrolled = on_bulb_enrolled,
                                                  .bulb_revoked = on_bulb_revoked,
                                                  .peer_refused = on_control_peer_refused,
                                                  .key_missing = on_control_key_missing,
                                                  .durable_wait = on_control_durable_wait,
                                                  .userdata = &h },
                        &h.control);
        if (r < 0) {
                log_error_errno(r, "Failed to create control socket in %s: %m", h.conf->hub.runtime_dir);
                goto out;
        }
        if (sd_watchdog_enabled(false, &h.watchdog_usec) > 0 && h.watchdog_usec > 0) {
                r = sd_event_add_time_relative(h.event, &h.watchdog, CLOCK_MONOTONIC, h.watchdog_usec / 2, 0,
                                               on_watchdog, &h);
                if (r >= 0)
                        r = sd_event_source_set_enabled(h.watchdog, SD_EVENT_ON);
                if (r < 0) {
                        log_error_errno(r, "Failed to set up the watchdog: %m");
                        goto out;
                }
        }
        sd_event_source *status_timer = NULL;
        r = sd_event_add_time_relative(h.event, &status_timer, CLOCK_MONOTONIC, STATUS_INTERVAL_USEC, 0,
                                       on_status_timer, &h);
        if (r >= 0)
                r = sd_event_source_set_enabled(status_timer, SD_EVENT_ON);
        if (r >= 0)
                r = sd_event_source_set_floating(status_timer, true);
        sd_event_source_unref(status_timer);
        if (r < 0) {
                log_error_errno(r, "Failed to set up the status timer: %m");
                goto out;
        }

        (void) sd_notify(false, "READY=1");
        hub_notify_status(&h);
        if (h.conf->key.backend == KEY_BACKEND_FILE)
                log_event(LOG_WARNING, 0, IOTHUB_MID_DEV_KEY_WARNING, NULL, NULL,
                          "The hub key is a file (%s), a development aid: use [key] backend = tpm",
                          h.conf->key.file);
        /* After READY (DESIGN.md "Start-up"): the bulb side never waits for the TPM. */
        (void) hub_open_key(&h);
        /* Frames left in the spool by the last run go as soon as they are due. */
        cloud_kick(h.cloud);
        log_event(LOG_INFO, 0, IOTHUB_MID_STARTED, NULL, NULL, "iothubd %s started, hub %s, %zu bulbs enrolled",
                  IOTHUB_VERSION, h.conf->hub.id, registry_count(h.registry));

        r = sd_event_loop(h.event);
        if (r < 0) {
                log_error_errno(r, "Event loop failed: %m");
                goto out;
        }
        exit_status = r == 0 ? 0 : 1;
        goto out;
corrupt:
        /* Never replaced by an empty database: that would forget every bulb's replay counter
         * (and the frames not yet uploaded). The operator salvages it (iothubd(8), RECOVERY). */
        log_event(LOG_CRIT, r, IOTHUB_MID_DB_CORRUPT, NULL, "corrupt",
                  "The state database %s/iothub.db is damaged (%s); not starting, and not replacing it: "
                  "see RECOVERY in iothubd(8)",
                  h.conf->hub.state_dir, err ? err : db_errmsg(h.db));
out:
        hub_done(&h);
        return exit_status;
}
