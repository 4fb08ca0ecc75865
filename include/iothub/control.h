/* SPDX-License-Identifier: MIT */
/* The control socket, <runtime_dir>/control: a Unix stream socket speaking one JSON request
 * line and one JSON response line per connection (see iothub-protocol(7), "Control socket").
 * Peers are admitted by SO_PEERCRED: root, the daemon's user, or members of its group. */
#pragma once

#include <stdbool.h>
#include <sys/types.h>

#include <jansson.h>

#include "iothub/hub.h"

#define CONTROL_SOCKET_NAME "control"
#define CONTROL_REQUEST_MAX (64 * 1024)       /* one request line, newline included */
#define CONTROL_RESPONSE_MAX (16 * 1024 * 1024) /* client side bound on a response */
#define CONTROL_MAX_CLIENTS 16
#define CONTROL_TIMEOUT_USEC (5 * UINT64_C(1000000))

struct control;

/* Binds the socket (replacing a stale one) and adds it to the hub's loop. */
int control_new(struct hub *h, struct control **ret);
void control_free(struct control *c);

/* Whether a peer with these credentials may use the socket (root, our uid, our gid, or a
 * member of our gid). Pure, for tests. */
bool control_peer_allowed(uid_t peer_uid, gid_t peer_gid, const gid_t *peer_groups, size_t n_groups,
                          uid_t our_uid, gid_t our_gid);

/* Client side, for iothubctl: sends 'request' to the socket at path and returns the parsed
 * response. Returns 0, -ECONNREFUSED/-ENOENT when no daemon listens, other negative errno. */
int control_call(const char *path, json_t *request, json_t **ret);
