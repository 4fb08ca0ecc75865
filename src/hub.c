/* SPDX-License-Identifier: MIT */
/* The daemon's run: load the configuration, open the state, build the loop, notify systemd,
 * run. Every source lives on one sd-event loop (systemd-timesyncd's shape). */
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>

#include <jansson.h>
#include <systemd/sd-daemon.h>

#include "iothub/cloud.h"
#include "iothub/commands.h"
#include "iothub/control.h"
#include "iothub/http.h"
#include "iothub/hubkey.h"
#include "iothub/hub.h"
#include "iothub/ingest.h"
#include "iothub/log.h"
#include "iothub/mqtt.h"
#include "iothub/oauth.h"
#include "iothub/spool.h"

#define EXIT_CONFIG 78
#define STATUS_INTERVAL_USEC (5 * UINT64_C(1000000))

static void on_mqtt_message(void *userdata, const char *topic, const uint8_t *payload, size_t len) {
        ingest_message(userdata, topic, payload, len);
}

static void on_mqtt_read_done(void *userdata) {
        (void) ingest_commit(userdata);
}

static void on_mqtt_connected(void *userdata, bool connected) {
        struct hub *h = userdata;

        hub_notify_status(h);
        if (connected)
                commands_kick(h->commands);
}

static void on_mqtt_published(void *userdata, int mid) {
        struct hub *h = userdata;

        commands_on_published(h->commands, mid);
}

int hub_status_json(struct hub *h, json_t **ret) {
        uint64_t enrolled = 0, revoked = 0, moved_aside = 0;
        json_t *rejected, *o;
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
        rejected = json_object();
        if (!rejected)
                return -ENOMEM;
        for (int i = FRAME_OK + 1; i < _FRAME_REASON_MAX; i++)
                (void) json_object_set_new(rejected, frame_reason_to_string(i),
                                           json_integer((json_int_t) h->counters.frames_rejected[i]));
        o = json_pack("{s:s,s:s,s:I,s:s,s:{s:b},s:{s:I,s:I,s:I,s:o},s:{s:I,s:I,s:I,s:I},s:{s:I,s:I}}", "hub_id",
                      h->conf->hub.id, "version", IOTHUB_VERSION, "uptime_s",
                      (json_int_t) ((now_monotonic_usec() - h->start_monotonic_usec) / UINT64_C(1000000)),
                      "config", h->conf->path, "mqtt", "connected", mqtt_is_connected(h->mqtt), "frames",
                      "received", (json_int_t) h->counters.frames_received, "accepted",
                      (json_int_t) h->counters.frames_accepted, "store_failed",
                      (json_int_t) h->counters.frames_store_failed, "rejected", rejected, "spool", "pending",
                      (json_int_t) h->spool_pending, "bytes", (json_int_t) h->spool_bytes, "dropped",
                      (json_int_t) h->spool_dropped, "moved_aside", (json_int_t) moved_aside, "bulbs", "enrolled",
                      (json_int_t) enrolled, "revoked", (json_int_t) revoked);
        if (!o)
                return -ENOMEM;
        r = cloud_status_json(h->cloud, o);
        if (r >= 0)
                r = oauth_status_json(h->oauth, o);
        if (r >= 0)
                r = commands_status_json(h->commands, o);
        if (r < 0) {
                json_decref(o);
                return r;
        }
        *ret = o;
        return 0;
}

void hub_notify_status(struct hub *h) {
        uint64_t rejected = 0;
        char cloud[320];

        for (int i = 0; i < _FRAME_REASON_MAX; i++)
                rejected += h->counters.frames_rejected[i];
        cloud_status_line(h->cloud, cloud, sizeof cloud);
        if (oauth_get_state(h->oauth) == OAUTH_LOGIN_REQUIRED)
                (void) snprintf(cloud, sizeof cloud, "sign-in required (iothubctl login)");
        (void) sd_notifyf(false,
                          "STATUS=MQTT %s; %" PRIu64 " frames accepted, %" PRIu64 " rejected; spool %" PRIu64
                          " frames; %s",
                          mqtt_is_connected(h->mqtt) ? "connected" : "disconnected", h->counters.frames_accepted,
                          rejected, h->spool_pending, cloud);
}

static int on_status_timer(sd_event_source *s, uint64_t usec, void *userdata) {
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
        keep_string("cloud", "url", &n->cloud.url, &o->cloud.url);
        keep_string("cloud", "ca_file", &n->cloud.ca_file, &o->cloud.ca_file);
        /* Everything else ([frames], [bulbs], [cloud] batching, [spool]) applies at once. */
        h->conf = TAKE_PTR(n);
        n = o;
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
        (void) ingest_commit(h);
        mqtt_free(h->mqtt);
        commands_free(h->commands);
        oauth_free(h->oauth);
        cloud_free(h->cloud);
        http_free(h->http);
        hubkey_free(h->hubkey);
        control_free(h->control);
        sd_event_source_disable_unref(h->sigterm);
        sd_event_source_disable_unref(h->sigint);
        sd_event_source_disable_unref(h->sighup);
        sd_event_source_disable_unref(h->watchdog);
        registry_free(h->registry);
        free(h->batch.acks);
        free(h->batch.undo);
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
        /* tpm2-tss would print its own error lines on stderr; our messages carry the decoded
         * TPM error already. An explicit TSS2_LOG from the environment still wins. */
        (void) setenv("TSS2_LOG", "all+none", 0);

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
        if (r < 0) {
                log_error_errno(r, "Failed to open the state database in %s: %s", h.conf->hub.state_dir,
                                err ? err : strerror(-r));
                goto out;
        }
        r = registry_open(h.db, &h.registry);
        if (r < 0) {
                log_error_errno(r, "Failed to load enrolled bulbs: %m (%s)", db_errmsg(h.db));
                goto out;
        }
        r = spool_stats(h.db, &h.spool_pending, &h.spool_bytes);
        if (r < 0) {
                log_error_errno(r, "Failed to read the spool: %m (%s)", db_errmsg(h.db));
                goto out;
        }
        r = http_new(h.event, &h.http);
        if (r < 0) {
                log_error_errno(r, "Failed to set up HTTPS: %m");
                goto out;
        }
        r = cloud_new(&h, &h.cloud);
        if (r < 0) {
                log_error_errno(r, "Failed to set up the cloud relay: %m");
                goto out;
        }
        r = oauth_new(&h, &h.oauth);
        if (r < 0) {
                log_error_errno(r, "Failed to set up sign-in: %m");
                goto out;
        }
        r = commands_new(&h, &h.commands);
        if (r < 0) {
                log_error_errno(r, "Failed to set up commands: %m");
                goto out;
        }
        r = control_new(&h, &h.control);
        if (r < 0) {
                log_error_errno(r, "Failed to create control socket in %s: %m", h.conf->hub.runtime_dir);
                goto out;
        }
        free(err);
        err = NULL;
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
out:
        hub_done(&h);
        return exit_status;
}
