/* SPDX-License-Identifier: MIT */
/* The server side of the hub's binary channels (include/iothub/tlv.h), one loop for
 * iothub-signer(8) and iothub-uplink(8) (issue 14): the listening socket (from systemd, or bound),
 * accept with a SO_PEERCRED check (the program decides which uids it serves; a refusal is counted
 * and logged rate-limited), per connection an input buffer of one message at a time (at most the
 * table's msg_max) and an output buffer (reading stops while more than out_max of answers wait),
 * at most inflight_max requests in flight (reading stops too), a malformed message answered
 * -EBADMSG and the connection closed once the answer is out, a client that shut down its sending
 * side answered before the close, at most conn_max connections, and sd_notify READY, WATCHDOG and
 * STOPPING. Each program keeps its op handlers (dispatch) and its own state of a connection.
 *
 * This is the programs' main loop, shared: like their main()s it logs what it refuses (a peer, a
 * malformed message), with the program's MESSAGE_IDs. Nothing here is called after the
 * connection it concerns went (conn_free is the last call for it). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <systemd/sd-event.h>

#include "iothub/tlv.h"

#define CHAN_IN_KEEP (64 * 1024)     /* an input buffer larger than this is freed when empty */
#define CHAN_LISTEN_BACKLOG 16
#define CHAN_LOG_WINDOW_USEC (10 * 1000 * 1000)
#define CHAN_LOG_BURST 5
#define CHAN_EXIT_USAGE 64

struct chan_server;
struct chan_conn;

struct chan_server_config {
        const char *name;             /* "iothub-signer": the log lines */
        const char *conn_description; /* of each connection's event source */
        const struct tlv_proto *proto;
        unsigned conn_max;
        unsigned inflight_max;        /* requests of one connection not yet answered */
        size_t out_max;               /* answers queued on one connection before reading stops */
        const char *mid_peer_refused; /* MESSAGE_IDs of the refusal lines, NULL: none */
        const char *mid_malformed;
        /* Who is served, for the refusal line ("only uid 990 ([uplink] client_user) is served");
         * borrowed, it must outlive the server. */
        const char *peer_rule;
        /* A connection from cred->uid: 0 and *ret_data (the program's state of it, may be NULL),
         * -EPERM to refuse the peer (counted, logged rate-limited), another negative errno to
         * drop it. */
        int (*conn_new)(void *userdata, struct chan_conn *c, const struct ucred *cred, void **ret_data);
        /* The connection goes: what it asked is cancelled (its callbacks never run after). */
        void (*conn_free)(void *userdata, struct chan_conn *c, void *data);
        /* One decoded request: 1 when it was answered or will be (chan_conn_hold() while it is
         * out), else the negative errno to answer. */
        int (*dispatch)(void *userdata, struct chan_conn *c, const struct tlv_msg *m);
};

/* Watches SIGTERM and SIGINT (STOPPING=1, the loop ends), SIGHUP (a notice: the configuration is
 * read at start only) and the watchdog on e, and listens: on the socket from systemd when there
 * is one and listen_path is NULL, else on listen_path, else on fallback_path (removed at
 * free). cfg and userdata are borrowed. 0 or a negative errno with a malloc'ed reason in
 * *ret_error when not NULL. */
int chan_server_new(sd_event *e, const struct chan_server_config *cfg, void *userdata,
                    const char *listen_path, const char *fallback_path, struct chan_server **ret,
                    char **ret_error);
/* Closes every connection (conn_free for each), then the socket. NULL is fine. */
void chan_server_free(struct chan_server *s);
/* The path listened on, or NULL for the socket from systemd. */
const char *chan_server_path(const struct chan_server *s);
/* READY=1, then the loop until a signal ends it. 0 or a negative errno. */
int chan_server_run(struct chan_server *s);
/* Counters for the program's STATUS. */
uint64_t chan_server_refused_peer(const struct chan_server *s);
uint64_t chan_server_malformed(const struct chan_server *s);
/* The connections, in no order (chan_conn_next() NULL at the end). */
struct chan_conn *chan_server_first(struct chan_server *s);
struct chan_conn *chan_conn_next(struct chan_conn *c);

void *chan_conn_data(const struct chan_conn *c);
uid_t chan_conn_uid(const struct chan_conn *c);
/* A request is out (dispatch answered 1 and answers later) / it was answered: reading stops
 * at inflight_max held, and goes on, after the loop's current event, below it. */
void chan_conn_hold(struct chan_conn *c);
void chan_conn_release(struct chan_conn *c);
/* A held request that does not keep a connection open after the client's EOF (a long poll):
 * the number of such, at most the number held. */
void chan_conn_set_parked(struct chan_conn *c, unsigned n);

/* Answers. begin() starts one (status 0: the caller adds fields to chan_conn_out() and calls
 * end(); status < 0: an error answer, ended by answer_error()). end() returns 0, or when the
 * answer could not be built (out of memory, a value over its limit) the negative errno after
 * answering the error instead. */
int chan_answer_begin(struct chan_conn *c, uint32_t id, unsigned op, int status);
/* The connection's output buffer, the same for its lifetime. */
struct tlv_buf *chan_conn_out(struct chan_conn *c);
int chan_answer_end(struct chan_conn *c, uint32_t id, unsigned op);
void chan_answer_error(struct chan_conn *c, uint32_t id, unsigned op, int status);

/* The programs' main(): malloc tuned for 1 MiB buffers, the log opened as name, the options
 * --config FILE, --listen PATH (absolute), --log-level LEVEL, --version, --help parsed, then
 * run() (config defaults to IOTHUB_DEFAULT_CONFIG, listen_path to NULL, level to -1: as
 * configured). Returns run()'s exit status, or CHAN_EXIT_USAGE for bad options. socket_key
 * names the fallback socket in the help ("[signer] socket"). */
int chan_server_main(int argc, char *argv[], const char *name, const char *socket_key,
                     int (*run)(const char *config, const char *listen_path, int level));
/* Rate-limited logging, for the lines a peer can cause (CHAN_LOG_BURST each CHAN_LOG_WINDOW_USEC,
 * then one "Suppressed N" line): true when this one may be logged. */
struct ratelimit;
bool chan_log_allowed(struct ratelimit *rl);
