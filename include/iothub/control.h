/* SPDX-License-Identifier: MIT */
/* The control socket, <runtime_dir>/control: a Unix stream socket speaking one JSON request
 * line and one JSON response line per connection (see iothub-protocol(7), "Control socket").
 * Peers are admitted by SO_PEERCRED: root, the daemon's user, or members of its group. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <jansson.h>

#include <systemd/sd-event.h>

#include "iothub/conf.h"
#include "iothub/db.h"
#include "iothub/registry.h"

#define CONTROL_SOCKET_NAME "control"
#define CONTROL_REQUEST_MAX (64 * 1024)       /* one request line, newline included */
#define CONTROL_RESPONSE_MAX (16 * 1024 * 1024) /* client side bound on a response */
#define CONTROL_MAX_CLIENTS 16
#define CONTROL_CMD_MAX 64                     /* bytes of a request's "cmd" */
#define CONTROL_TIMEOUT_USEC (5 * UINT64_C(1000000))
#define CONTROL_STREAM_BUFFER_MAX (256 * 1024)   /* streamed lines queued for a slow client */

struct cloud;
struct control;
struct uplink_client;
struct dynsec;
struct pair;

/* What the control socket asks of the rest of the daemon, installed by hub.c (the one place
 * that knows who answers). Requests that belong to one module (register, login, logout) call
 * that module directly: control is the user's front door, above them. */
struct control_events {
        /* The status object of DESIGN.md "iothubctl status --json" (the caller's reference).
         * Returns 0 or a negative errno. */
        int (*status_json)(void *userdata, json_t **ret);
        /* A bulb was revoked (the cloud's device list changed). */
        void (*devices_changed)(void *userdata);
        /* A bulb was enrolled by `bulb add` (the device list changed too). May be NULL. */
        void (*bulb_enrolled)(void *userdata, const char *id);
        /* A bulb was revoked, for the security events. May be NULL. */
        void (*bulb_revoked)(void *userdata, const char *id);
        /* A peer was refused by the SO_PEERCRED check. May be NULL. */
        void (*peer_refused)(void *userdata);
        /* Whether the hub key is still not open, with *ret_error its one-line reason (may be
         * NULL) when so. */
        bool (*key_missing)(void *userdata, const char **ret_error);
        /* db_sync_wait() on the daemon's database: the answer to a request that changes
         * security state (bulb add, remove, pair; register) goes only once every commit so far is
         * on disk (issue 13: commits do not sync by themselves). May be NULL: answers go at once. */
        int (*durable_wait)(void *userdata, db_sync_wait_t cb, void *cb_userdata, struct db_sync_wait **ret);
        void *userdata;
};

/* Binds the socket (replacing a stale one) and adds it to the loop e. conf, registry, cloud
 * (NULL without [cloud] url), uplink (iothub-uplink's client: sign-in; NULL without [cloud] url),
 * dynsec (NULL without [broker] dynsec)
 * and pair are the caller's and must outlive
 * it; ev is copied. Returns 0 or a negative errno. */
int control_new(sd_event *e, const struct iothub_conf *conf, struct registry *registry, struct cloud *cloud,
                struct uplink_client *uplink, struct dynsec *dynsec, struct pair *pair,
                const struct control_events *ev, struct control **ret);
void control_free(struct control *c);
/* Sets the deadline of each connection from now on (CONTROL_TIMEOUT_USEC unless set): for tests,
 * which stage a loop that comes late to a deadline without waiting seconds. */
void control_set_timeout(struct control *c, uint64_t usec);

/* Whether a peer with these credentials may use the socket (root, our uid, our gid, or a
 * member of our gid). Pure, for tests. */
bool control_peer_allowed(uid_t peer_uid, gid_t peer_gid, const gid_t *peer_groups, size_t n_groups,
                          uid_t our_uid, gid_t our_gid);

/* One request line as received, without its newline: a JSON object, no duplicate member names,
 * with a "cmd" string of 1..CONTROL_CMD_MAX bytes. *ret_req is the object (the caller's
 * reference), *ret_cmd points into it. Returns 0, or -EBADMSG with a static one-line reason in
 * *ret_error for the answer. Pure. */
int control_parse_request(const char *line, size_t len, json_t **ret_req, const char **ret_cmd,
                          const char **ret_error);
/* The member 'key' of a request if it is a string of 1..max bytes, else NULL. Pure. */
const char *control_request_string(const json_t *req, const char *key, size_t max);
/* The daemon's reply as iothubctl received it (up to the daemon closing): one JSON object, no
 * duplicate member names. Returns 0 or -EBADMSG. Pure. */
int control_parse_reply(const char *buf, size_t len, json_t **ret);

/* Client side, for iothubctl: sends 'request' to the socket at path and returns the parsed
 * response. Returns 0, -ECONNREFUSED/-ENOENT when no daemon listens, other negative errno. */
int control_call(const char *path, json_t *request, json_t **ret);
/* The same for a streaming request (bulb-pair): every line before the answer is an object with an
 * "event" member, handed to on_line as it arrives (the callee does not keep the reference); the
 * answer, the last line, in *ret. */
int control_call_stream(const char *path, json_t *request, void (*on_line)(void *userdata, json_t *line),
                        void *userdata, json_t **ret);
