/* SPDX-License-Identifier: MIT */
/* Commands from the cloud down to the bulbs (PROTOCOL.md 2 and 3).
 *
 * A long poll, GET /v1/hubs/<id>/commands?wait=25, exactly one in flight, re-armed as soon as
 * an answer came; errors back off exponentially with jitter (1 s .. 60 s); while the cloud
 * cannot be asked (no key, no token) the poll idles and looks again on commands_kick() and
 * every 5 s. Every command of an answer is checked before it goes anywhere (command_check(),
 * then de-duplication by id and the registry), rejected ones are recorded and reported
 * "rejected" with the reason as detail. A valid one is signed by the hub key as the JWS of
 * PROTOCOL.md 2, stored, and published to <prefix>/<dev>/cmd with QoS 1. The broker's PUBACK
 * makes it "delivered", the bulb's ack (in its next accepted status frame) "acked" or
 * "failed", its exp passing first "expired"; each outcome is POSTed to
 * /v1/hubs/<id>/commands/<cmd>/result, "delivered" before the final one, retried with backoff
 * until the cloud answers 2xx (a 4xx other than 401, 408, 429 is final).
 *
 * State: one row per command id in the commands table (migration 3). A row is written before a
 * command is published and after every change, in one transaction per pass of the work loop
 * (commands_work()), so that after a restart a published command still waits for its ack, an
 * unpublished one goes out, an unreported outcome is sent, and an id seen before is ignored.
 * Delivery is at least once in both directions: a command may reach a bulb twice (published
 * again after a crash before the PUBACK was recorded), and the cloud may send one twice (the
 * hub ignores an id it knows, and counts it).
 *
 * Sharing the TPM and the connection with the status uploads:
 * - Polls and results are requests of their own (uplink_request()) on the same curl multi handle
 *   as the status batches, not entries of the batch queue: cloud.c has at most one status batch
 *   in flight, and a poll or a result is a separate request that gets its own connection from
 *   the shared pool (HTTP/1.1: one request per connection at a time, connections are reused).
 *   So a command never waits behind a status backlog, and a 25 s long poll never holds up a
 *   batch. At most one poll and COMMANDS_RESULT_CALLS_MAX results are in flight.
 * - Every poll and every result costs one hub key signature (RFC 9421; one more for a DPoP
 *   proof), every command one more for its JWS. All of them, and only the ones this module
 *   causes, are paced by one token bucket (COMMANDS_SIGN_RATE a second, COMMANDS_SIGN_BURST at
 *   once): a real TPM does 14 to 28 ECDSA signatures a second and the status uploads need at
 *   most 2, so commands can never take the TPM away from them, whatever the cloud sends. A
 *   pass of the work loop makes at most COMMANDS_SIGN_PER_PASS signatures and then yields to
 *   the other event sources (MQTT, curl, timers), since a TPM signature blocks the loop.
 * - Bounds: at most COMMANDS_PER_ANSWER commands are taken from one answer (the rest are left
 *   without a result, and the cloud hands them out again), and no poll goes out while
 *   COMMANDS_ACTIVE_MAX - COMMANDS_PER_ANSWER commands are in memory (in flight, or with an
 *   outcome not yet reported), so a burst or a cloud outage cannot grow memory or the table
 *   without bound. An answer is parsed only up to COMMANDS_ANSWER_MAX bytes. An answer that
 *   brought nothing new does not re-arm the poll sooner than COMMANDS_POLL_MIN_INTERVAL_USEC
 *   after the previous one started, so a cloud that ignores "wait" cannot spin the hub. */
#include <inttypes.h>
#include <stdio.h>

#include "commands-internal.h"
#include "db-internal.h"
#include "iothub/cloud.h"
#include "iothub/uplink-client.h"
#include "iothub/commands.h"
#include "iothub/events.h"
#include "iothub/frame.h"
#include "iothub/signer.h"
#include "iothub/spool.h"
#include "iothub/jws.h"
#include "iothub/log.h"
#include "iothub/mqtt.h"
#include "iothub/registry.h"
#include "iothub/uplink-proto.h"
#include "iothub/verify.h"

#include <openssl/evp.h>

#define USEC_PER_SEC UINT64_C(1000000)

#define COMMANDS_POLL_WAIT_S 25
#define COMMANDS_POLL_SLACK_S 10                          /* the request's timeout is wait + this */
#define COMMANDS_POLL_MIN_INTERVAL_USEC (1 * USEC_PER_SEC) /* after an answer that brought nothing new */
#define COMMANDS_IDLE_RECHECK_USEC (5 * USEC_PER_SEC)     /* while !cloud_ready() */
#define COMMANDS_BACKOFF_MIN_MS 1000u
#define COMMANDS_BACKOFF_MAX_MS 60000u
#define COMMANDS_PER_ANSWER 32          /* commands taken from one answer */
#define COMMANDS_ACTIVE_MAX 256         /* commands in memory: in flight or outcome unreported */
#define COMMANDS_RESULT_CALLS_MAX 4     /* result POSTs in flight */
#define COMMANDS_SIGN_RATE 8.0          /* signatures a second caused by commands, sustained */
#define COMMANDS_SIGN_BURST 64.0        /* ... and at once */
#define COMMANDS_SIGN_PER_PASS 4        /* signatures per pass of the work loop */
#define COMMANDS_ACK_GRACE_S 2          /* a published command waits exp + this for its ack */
#define COMMANDS_RETRY_USEC (1 * USEC_PER_SEC) /* after a TPM, database or MQTT error */
#define COMMANDS_KEEP_S (7 * 86400)     /* finished and reported rows kept this long for de-duplication */
#define COMMANDS_KEEP_MAX 4096          /* ... and at most this many of them */
#define COMMANDS_PRUNE_INTERVAL_USEC (3600 * USEC_PER_SEC)
#define COMMANDS_LOG_WINDOW_USEC (10 * USEC_PER_SEC)
#define COMMANDS_LOG_BURST 5            /* rejection lines per window; the counters count all */

/* ---- pure helpers (commands-internal.h; one command's checks, payload and JWS are in command.c) ---- */
int command_result_body(const char *status, int64_t at, const char *detail, char **ret) {
        json_t *o;
        char *s;

        if (!status || !ret)
                return -EINVAL;
        o = json_pack("{s:s,s:I}", "status", status, "at", (json_int_t) at);
        /* A detail that is not UTF-8 (it never is: ack.err passed the frame parser) is left out
         * rather than holding the result back. */
        if (o && detail && detail[0])
                (void) json_object_set_new(o, "detail", json_string(detail));
        s = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

int commands_parse_answer(const char *body, size_t len, json_t **ret_commands) {
        json_error_t jerr;
        json_t *o, *cmds;

        if (!body || !ret_commands)
                return -EINVAL;
        if (len > COMMANDS_ANSWER_MAX)
                return -EFBIG;
        o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
        cmds = json_object_get(o, "commands");
        if (!json_is_array(cmds) || json_object_size(o) != 1) {
                json_decref(o);
                return -EBADMSG;
        }
        *ret_commands = json_incref(cmds);
        json_decref(o);
        return 0;
}

/* ---- the module ---- */

enum command_state {
        CMD_NEW,       /* checked, not yet signed nor stored (memory only) */
        CMD_PENDING,   /* signed and stored, waiting to be published or for the PUBACK */
        CMD_DELIVERED, /* the broker has it (PUBACK) */
        CMD_ACKED,
        CMD_FAILED,
        CMD_EXPIRED,
        CMD_REJECTED,
};

static const char *const state_names[] = {
        [CMD_NEW] = "new",         [CMD_PENDING] = "pending", [CMD_DELIVERED] = "delivered",
        [CMD_ACKED] = "acked",     [CMD_FAILED] = "failed",   [CMD_EXPIRED] = "expired",
        [CMD_REJECTED] = "rejected",
};

static bool state_is_final(enum command_state s) {
        return s >= CMD_ACKED;
}

static int state_from_string(const char *s, enum command_state *ret) {
        for (size_t i = CMD_PENDING; i < ELEMENTSOF(state_names); i++)
                if (s && streq(s, state_names[i])) {
                        *ret = (enum command_state) i;
                        return 0;
                }
        return -EINVAL;
}

/* How far the outcome was reported (the reported column). */
enum { REPORTED_NONE = 0, REPORTED_DELIVERED = 1, REPORTED_FINAL = 2 };

struct commands;

struct command {
        struct commands *owner;
        char id[COMMAND_ID_MAX + 1];
        char dev[DEVICE_ID_MAX + 1]; /* "" when the cloud sent no valid device id */
        enum command_state state;
        struct command_set set; /* CMD_NEW: what to sign */
        char *cloud_sig;        /* CMD_NEW: the vendor's JWS, verified, passed on as "cloud" */
        char *jws;              /* NULL until signed, and for rejected commands */
        int64_t exp, received_at, delivered_at, done_at; /* Unix seconds, 0 for none */
        char detail[COMMAND_DETAIL_MAX + 1];
        unsigned reported;
        bool stored;    /* a committed row exists */
        bool dirty;     /* memory is ahead of the row */
        bool published; /* handed to libmosquitto in this run, PUBACK not yet seen */
        int mid;
        struct uplink_call *result_call;
        unsigned result_level; /* what the call in flight reports */
        struct signer_op *sign_op; /* CMD_NEW while the signer makes its JWS */
};

/* An ack recorded in the frame path's transaction, not yet applied to memory. */
struct staged_ack {
        struct command *cmd; /* nothing runs between the statement and the commit that could free it */
        bool ok;
        bool row_written; /* the command's final row is in the transaction */
        int64_t at;
        char err[COMMAND_DETAIL_MAX + 1];
};

struct commands_counters {
        uint64_t received; /* commands taken from answers, duplicates and bad ids included */
        uint64_t published, delivered, acked, failed, expired, rejected;
        uint64_t rejected_by[_COMMAND_REASON_MAX];
        uint64_t duplicates;   /* ids seen before: ignored, not reported again */
        uint64_t deferred;     /* beyond COMMANDS_PER_ANSWER in one answer: left for the cloud to resend */
        uint64_t acks_ignored; /* acks for unknown ids, another bulb's command, or one already finished */
        uint64_t acks_recovered; /* acks found at start in the spool's frames, their rows lost (recover_acks()) */
        uint64_t signatures;   /* command JWS signed by the hub key */
        uint64_t polls, poll_errors;
        uint64_t results_sent, results_failed, results_refused;
        uint64_t store_errors;
};

struct commands {
        const struct iothub_conf *conf;
        struct db *db;
        struct registry *registry;
        struct mqtt *mqtt;
        struct cloud *cloud;      /* cloud_ready() */
        struct uplink_client *req;     /* polls and results */
        struct events *events; /* security events (rejected commands); NULL without them */
        struct signer *signer; /* NULL until hub.c announces the hub key (commands_key_ready) */
        struct verify_key *cloud_key; /* [cloud] command_key_file, NULL when unset */
        char cloud_kid[HUBKEY_ID_LEN + 1];
        sd_event_source *defer, *timer, *exp_timer;
        struct command *cmds[COMMANDS_ACTIVE_MAX]; /* oldest first */
        size_t n_cmds;

        struct uplink_call *poll_call;
        uint64_t poll_started, poll_at; /* monotonic usec: no poll before poll_at */
        unsigned poll_failures;
        unsigned result_calls, result_failures;
        uint64_t results_at; /* monotonic usec: no result POST before this (backoff) */
        uint64_t sign_at, store_at, publish_at, prune_at;
        unsigned sign_failures, store_failures, publish_failures; /* errors in a row: logged once */

        double tokens; /* the signature bucket */
        uint64_t tokens_usec;

        struct ratelimit log_rl;
        char last_error[256];

        /* Acks written into the frame path's open transaction (commands_ack_store()), applied
         * to memory when it commits (commands_acks_done()). */
        struct staged_ack *staged;
        size_t n_staged, cap_staged;
        uint64_t staged_ignored; /* acks_ignored of the open transaction */

        struct commands_counters counters;
        bool start_checked; /* recover_acks() ran (the first pass of the work loop) */
};

static void commands_schedule(struct commands *c) {
        int r = sd_event_source_set_enabled(c->defer, SD_EVENT_ONESHOT);
        if (r < 0)
                log_error_errno(r, "Failed to schedule command work: %m");
}

static int64_t now_s(void) {
        return (int64_t) (now_realtime_usec() / USEC_PER_SEC);
}

static void set_last_error(struct commands *c, const char *fmt, ...) _printf_(2, 3);
static void set_last_error(struct commands *c, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
        va_end(ap);
}

/* The delay after 'failures' errors in a row (backoff_ms(), util.h): the step doubles from 2 s
 * to 60 s, and the delay is drawn from its upper half, so it is always within
 * COMMANDS_BACKOFF_MIN_MS .. COMMANDS_BACKOFF_MAX_MS and hubs do not come back in step. */
static uint64_t backoff_usec(unsigned failures) {
        uint32_t rnd = 0;

        (void) random_bytes(&rnd, sizeof rnd);
        return backoff_ms(failures, 2 * COMMANDS_BACKOFF_MIN_MS, COMMANDS_BACKOFF_MAX_MS, rnd) * 1000;
}

/* The token bucket of signatures caused by commands (see the top of the file). */
static bool sign_take(struct commands *c, uint64_t now) {
        if (now > c->tokens_usec) {
                c->tokens += (double) (now - c->tokens_usec) / (double) USEC_PER_SEC * COMMANDS_SIGN_RATE;
                if (c->tokens > COMMANDS_SIGN_BURST)
                        c->tokens = COMMANDS_SIGN_BURST;
        }
        c->tokens_usec = now;
        if (c->tokens < 1.0)
                return false;
        c->tokens -= 1.0;
        return true;
}

static uint64_t sign_ready_at(const struct commands *c, uint64_t now) {
        double missing = 1.0 - c->tokens;

        if (missing <= 0)
                return now;
        return now + (uint64_t) (missing / COMMANDS_SIGN_RATE * (double) USEC_PER_SEC) + 1000;
}

/* Where a command's time goes (issue 13): at debug level, one line per stage with the wall clock
 * in microseconds, which tests/bench/commands.mjs lines up with the cloud's and the bulbs' own
 * stamps (one clock on one machine). Nothing is read or formatted above debug level. */
static void stamp(const struct command *cmd, const char *stage) {
        if (log_get_max_level() >= LOG_DEBUG)
                log_debug("Command %s stage %s at %" PRIu64, cmd->id, stage, now_realtime_usec());
}

/* Rejections are logged at most COMMANDS_LOG_BURST times per window; the counters count all. */
static bool log_allowed(struct commands *c) {
        uint64_t suppressed;
        bool ok = ratelimit_allow(&c->log_rl, now_monotonic_usec(), COMMANDS_LOG_WINDOW_USEC, COMMANDS_LOG_BURST,
                                  &suppressed);

        if (suppressed > 0)
                log_event(LOG_NOTICE, 0, IOTHUB_MID_COMMAND_REJECTED, NULL, NULL,
                          "Suppressed %" PRIu64 " more messages about rejected commands", suppressed);
        return ok;
}

static struct command *find_by_id(struct commands *c, const char *id) {
        for (size_t i = 0; i < c->n_cmds; i++)
                if (streq(c->cmds[i]->id, id))
                        return c->cmds[i];
        return NULL;
}

static void command_free(struct command *cmd) {
        if (!cmd)
                return;
        uplink_call_cancel(cmd->result_call);
        signer_op_free(cmd->sign_op);
        free(cmd->jws);
        free(cmd->cloud_sig);
        free(cmd);
}

static struct command *command_add(struct commands *c, const char *id, const char *dev) {
        struct command *cmd;

        if (c->n_cmds >= COMMANDS_ACTIVE_MAX)
                return NULL;
        cmd = calloc(1, sizeof *cmd);
        if (!cmd)
                return NULL;
        cmd->owner = c;
        (void) snprintf(cmd->id, sizeof cmd->id, "%s", id);
        (void) snprintf(cmd->dev, sizeof cmd->dev, "%s", dev ? dev : "");
        c->cmds[c->n_cmds++] = cmd;
        return cmd;
}

static void set_detail(struct command *cmd, const char *detail) {
        size_t n = detail ? strlen(detail) : 0;

        if (n > COMMAND_DETAIL_MAX)
                n = COMMAND_DETAIL_MAX;
        /* Cut at a UTF-8 character boundary: the detail goes into a JSON string. */
        while (n > 0 && detail && n < strlen(detail) && ((unsigned char) detail[n] & 0xc0) == 0x80)
                n--;
        if (n > 0)
                memcpy(cmd->detail, detail, n);
        cmd->detail[n] = '\0';
}

/* Ends a command with its final state; the outcome is reported by the work loop. */
static void command_finish(struct commands *c, struct command *cmd, enum command_state st, int64_t at,
                           const char *detail) {
        cmd->state = st;
        cmd->done_at = at;
        set_detail(cmd, detail);
        cmd->dirty = true;
        switch (st) {
        case CMD_ACKED:
                c->counters.acked++;
                break;
        case CMD_FAILED:
                c->counters.failed++;
                break;
        case CMD_EXPIRED:
                c->counters.expired++;
                break;
        case CMD_REJECTED:
                c->counters.rejected++;
                break;
        default:
                break;
        }
}

static void command_reject(struct commands *c, struct command *cmd, enum command_reason reason, const char *why) {
        c->counters.rejected_by[reason]++;
        if (reason == COMMAND_BAD_SIGNATURE)
                events_note(c->events, EVENT_COMMAND_REJECTED, "bad_signature", cmd->dev, 1);
        command_finish(c, cmd, CMD_REJECTED, now_s(), command_reason_to_string(reason));
        if (log_allowed(c))
                log_event(LOG_WARNING, 0, IOTHUB_MID_COMMAND_REJECTED, cmd->dev[0] ? cmd->dev : NULL,
                          command_reason_to_string(reason), "Rejected command %s for %s: %s (%s)", cmd->id,
                          cmd->dev[0] ? cmd->dev : "?", command_reason_to_string(reason), why ? why : "");
}

/* ---- persistence ---- */

static int bind_int_or_null(sqlite3_stmt *s, int i, int64_t v) {
        return v ? sqlite3_bind_int64(s, i, v) : sqlite3_bind_null(s, i);
}

static int bind_text_or_null(sqlite3_stmt *s, int i, const char *v) {
        return v && v[0] ? sqlite3_bind_text(s, i, v, -1, SQLITE_STATIC) : sqlite3_bind_null(s, i);
}

static int store_insert(struct db *db, const struct command *cmd) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(db, DB_STMT_CMD_INSERT);
        int rc;

        /* SQLITE_STATIC: stepped and reset (bindings cleared) before this returns. */
        if ((rc = sqlite3_bind_text(s, 1, cmd->id, -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = sqlite3_bind_text(s, 2, cmd->dev, -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = sqlite3_bind_text(s, 3, state_names[cmd->state], -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = bind_text_or_null(s, 4, cmd->jws)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 5, cmd->exp)) != SQLITE_OK ||
            (rc = bind_text_or_null(s, 6, cmd->detail)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(s, 7, cmd->received_at)) != SQLITE_OK ||
            (rc = bind_int_or_null(s, 8, cmd->delivered_at)) != SQLITE_OK ||
            (rc = bind_int_or_null(s, 9, cmd->done_at)) != SQLITE_OK ||
            (rc = sqlite3_bind_int(s, 10, (int) cmd->reported)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

static int store_update(struct db *db, const struct command *cmd) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(db, DB_STMT_CMD_UPDATE);
        int rc;

        if ((rc = sqlite3_bind_text(s, 1, cmd->id, -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = sqlite3_bind_text(s, 2, state_names[cmd->state], -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = bind_int_or_null(s, 3, cmd->delivered_at)) != SQLITE_OK ||
            (rc = bind_int_or_null(s, 4, cmd->done_at)) != SQLITE_OK ||
            (rc = bind_text_or_null(s, 5, cmd->detail)) != SQLITE_OK ||
            (rc = sqlite3_bind_int(s, 6, (int) cmd->reported)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

/* Whether a row for this id exists: the ids the hub took before, also in an earlier run. */
static int store_exists(struct db *db, const char *id) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(db, DB_STMT_CMD_EXISTS);
        int rc;

        if ((rc = sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        if (rc == SQLITE_ROW)
                return 1;
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

/* Writes every change in memory in one transaction (one fsync for a whole pass). */
static int store_flush(struct commands *c) {
        struct db *db = c->db;
        bool any = false;
        int r;

        for (size_t i = 0; i < c->n_cmds; i++)
                any = any || (c->cmds[i]->dirty && c->cmds[i]->state != CMD_NEW);
        if (!any)
                return 0;
        /* The frame path groups the frames of one MQTT read in a transaction of its own; it is
         * always committed before the loop runs anything else, but never write into it. */
        if (db_in_transaction(db))
                return -EBUSY;
        for (size_t i = 0; i < c->n_cmds; i++)
                if (c->cmds[i]->dirty && c->cmds[i]->state == CMD_PENDING && !c->cmds[i]->stored)
                        stamp(c->cmds[i], "store_begins");
        r = db_begin(db);
        if (r < 0)
                return r;
        for (size_t i = 0; i < c->n_cmds; i++) {
                struct command *cmd = c->cmds[i];

                if (!cmd->dirty || cmd->state == CMD_NEW)
                        continue;
                r = cmd->stored ? store_update(db, cmd) : store_insert(db, cmd);
                if (r == -EEXIST && !cmd->stored) {
                        /* A row with this id exists after all (one not loaded at start): it is a
                         * duplicate. Only this statement failed; the transaction goes on. */
                        log_warning("Command %s is known already; ignoring it", cmd->id);
                        /* Nothing of ours to write or report, and never published: forgotten at
                         * the end of this pass, whatever the commit does. */
                        cmd->state = CMD_REJECTED;
                        cmd->reported = REPORTED_FINAL;
                        cmd->stored = true;
                        cmd->dirty = false;
                        c->counters.duplicates++;
                        continue;
                }
                if (r < 0) {
                        (void) db_rollback(db);
                        return r;
                }
        }
        r = db_commit(db);
        if (r < 0) {
                (void) db_rollback(db);
                return r;
        }
        for (size_t i = 0; i < c->n_cmds; i++)
                if (c->cmds[i]->dirty && c->cmds[i]->state != CMD_NEW) {
                        if (c->cmds[i]->state == CMD_PENDING && !c->cmds[i]->stored)
                                stamp(c->cmds[i], "stored");
                        c->cmds[i]->dirty = false;
                        c->cmds[i]->stored = true;
                }
        return 0;
}

static int store_prune(struct commands *c) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(c->db, DB_STMT_CMD_PRUNE);
        int rc;

        if ((rc = sqlite3_bind_int64(s, 1, now_s() - COMMANDS_KEEP_S)) != SQLITE_OK ||
            (rc = sqlite3_bind_int(s, 2, COMMANDS_KEEP_MAX)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        return rc == SQLITE_DONE ? 0 : db_errno(rc);
}

static const char *column_text(sqlite3_stmt *s, int i) {
        return (const char *) sqlite3_column_text(s, i);
}

/* Takes up the commands of the last run that are not finished or whose outcome the cloud has
 * not taken yet. Damaged rows are skipped (and stay for the operator). */
static int store_load(struct commands *c) {
        _cleanup_db_stmt_reset_ sqlite3_stmt *s = db_stmt(c->db, DB_STMT_CMD_LOAD);
        unsigned skipped = 0;
        int rc;

        if ((rc = sqlite3_bind_int(s, 1, COMMANDS_ACTIVE_MAX)) != SQLITE_OK)
                return db_errno(rc);
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                const char *id = column_text(s, 0), *dev = column_text(s, 1), *jws = column_text(s, 3),
                           *detail = column_text(s, 5);
                enum command_state st;
                struct command *cmd;
                int64_t reported = sqlite3_column_int64(s, 9);
                bool waiting;

                if (!id || !command_id_is_valid(id, strlen(id)) || !dev ||
                    (dev[0] && !device_id_is_valid(dev, strlen(dev))) ||
                    state_from_string(column_text(s, 2), &st) < 0 || reported < REPORTED_NONE ||
                    reported >= REPORTED_FINAL) {
                        skipped++;
                        continue;
                }
                /* Waiting to go out or for an ack: it needs its JWS and its bulb. */
                waiting = st == CMD_PENDING || st == CMD_DELIVERED;
                if (waiting && (!jws || strlen(jws) > COMMAND_JWS_MAX || !dev[0])) {
                        skipped++;
                        continue;
                }
                cmd = command_add(c, id, dev);
                if (!cmd)
                        return -ENOMEM;
                if (jws && !(cmd->jws = strdup(jws)))
                        return -ENOMEM;
                cmd->state = st;
                cmd->exp = sqlite3_column_int64(s, 4);
                set_detail(cmd, detail);
                cmd->received_at = sqlite3_column_int64(s, 6);
                cmd->delivered_at = sqlite3_column_int64(s, 7);
                cmd->done_at = sqlite3_column_int64(s, 8);
                cmd->reported = (unsigned) reported;
                cmd->stored = true;
        }
        if (rc != SQLITE_DONE)
                return db_errno(rc);
        if (skipped > 0)
                log_warning("Skipped %u damaged rows of the commands table", skipped);
        return 0;
}

/* ---- taking commands from an answer ---- */

/* Without [cloud] command_key_file every command passes (and its "sig", if any, is dropped). */
static bool command_take_cloud_sig(struct commands *c, const json_t *o, const char **ret_why) {
        *ret_why = NULL;
        if (!c->cloud_key)
                return true;
        return command_cloud_sig_check(o, c->conf->hub.id, c->cloud_key, c->cloud_kid, ret_why) == 0;
}

static void take_command(struct commands *c, const json_t *o, int64_t now, unsigned *fresh) {
        struct command_fields f;
        enum command_reason reason;
        const char *why = NULL, *sig_why = NULL;
        bool sig_ok;
        struct command *cmd;
        struct bulb *b;
        int r;

        c->counters.received++;
        /* PROTOCOL.md 5: the vendor's signature before anything else. Only the id is read from
         * a command that fails it: to report it (rejected, bad_signature). */
        sig_ok = command_take_cloud_sig(c, o, &sig_why);
        reason = command_check(o, now, &f, &why);
        if (reason == COMMAND_BAD_ID) {
                /* Without a valid id it cannot be reported (the id is part of the result URL). */
                c->counters.rejected++;
                c->counters.rejected_by[COMMAND_BAD_ID]++;
                if (log_allowed(c))
                        log_event(LOG_WARNING, 0, IOTHUB_MID_COMMAND_REJECTED, NULL, "bad_id",
                                  "Ignored a command from the cloud: %s", why);
                return;
        }
        /* At least once (PROTOCOL.md 3): an id seen before is ignored, not reported again. */
        if (!sig_ok) {
                reason = COMMAND_BAD_SIGNATURE;
                why = sig_why;
        }
        r = find_by_id(c, f.id) ? 1 : store_exists(c->db, f.id);
        if (r != 0) {
                /* A forged copy of a known id must not touch the real command's outcome: not
                 * reported, but counted. */
                if (r > 0 && !sig_ok) {
                        c->counters.rejected++;
                        c->counters.rejected_by[COMMAND_BAD_SIGNATURE]++;
                        events_note(c->events, EVENT_COMMAND_REJECTED, "bad_signature", f.dev, 1);
                }
                if (r < 0)
                        log_error_errno(r, "Failed to look up command %s, ignoring it for now: %m (%s)", f.id,
                                        db_errmsg(c->db));
                else {
                        c->counters.duplicates++;
                        log_debug("Command %s seen before, ignored", f.id);
                }
                return;
        }
        cmd = command_add(c, f.id, f.dev);
        if (!cmd) {
                log_error("Out of memory: command %s is left for the cloud to send again", f.id);
                return;
        }
        cmd->received_at = now;
        cmd->exp = f.exp;
        cmd->dirty = true;
        (*fresh)++;
        if (reason == COMMAND_OK) {
                b = registry_find(c->registry, f.dev);
                if (!b) {
                        reason = COMMAND_UNKNOWN_DEVICE;
                        why = "no bulb with that id is enrolled";
                } else if (b->revoked) {
                        reason = COMMAND_REVOKED;
                        why = "the bulb was removed";
                }
        }
        if (reason != COMMAND_OK) {
                command_reject(c, cmd, reason, why);
                return;
        }
        cmd->state = CMD_NEW;
        cmd->set = f.set;
        if (c->cloud_key && !(cmd->cloud_sig = strdup(json_string_value(json_object_get(o, "sig"))))) {
                /* Never sent on without the vendor's JWS; the cloud sends it again. */
                command_reject(c, cmd, COMMAND_MALFORMED, "out of memory");
                return;
        }
        log_debug("Command %s for %s taken", cmd->id, cmd->dev);
        stamp(cmd, "taken");
}

static int take_answer(struct commands *c, const char *body, size_t len, unsigned *fresh) {
        json_t *cmds = NULL, *o;
        int64_t now = now_s();
        size_t i;
        int r;

        r = commands_parse_answer(body, len, &cmds);
        if (r < 0)
                return r;
        json_array_foreach(cmds, i, o) {
                if (i >= COMMANDS_PER_ANSWER || c->n_cmds >= COMMANDS_ACTIVE_MAX) {
                        /* No result for these: the cloud hands them out again (at least once). */
                        c->counters.deferred += json_array_size(cmds) - i;
                        log_notice("Took %zu of %zu commands of one answer; the cloud will send the rest again", i,
                                   json_array_size(cmds));
                        break;
                }
                take_command(c, o, now, fresh);
        }
        json_decref(cmds);
        return 0;
}

/* ---- the long poll ---- */

static void poll_failed(struct commands *c, const char *what) {
        uint64_t delay = backoff_usec(++c->poll_failures);

        c->counters.poll_errors++;
        c->poll_at = now_monotonic_usec() + delay;
        set_last_error(c, "%s", what);
        if (c->poll_failures == 1)
                log_event(LOG_WARNING, 0, IOTHUB_MID_COMMAND_POLL_FAILED, NULL, NULL,
                          "Polling the cloud for commands failed (%s); retrying with backoff", what);
        else
                log_debug("Polling for commands failed again (%s), next in %" PRIu64 " ms", what, delay / 1000);
}

static void on_poll_done(void *userdata, const struct uplink_answer *a) {
        struct commands *c = userdata;
        /* A transport failure is status 0 below. */
        long status = a->error < 0 ? 0 : a->status;
        const char *body = a->body;
        size_t len = a->body_len;
        int r = 0;
        unsigned fresh = 0;
        char what[96];

        c->poll_call = NULL;
        if (r >= 0 && status == 200) {
                r = take_answer(c, body, len, &fresh);
                if (r < 0) {
                        (void) snprintf(what, sizeof what, "the answer is %s",
                                        r == -EFBIG ? "too large" : "not {\"commands\":[...]}");
                        poll_failed(c, what);
                        goto done;
                }
        } else if (r < 0 || status != 204) {
                if (r < 0)
                        (void) snprintf(what, sizeof what, "%s", strerror(-r));
                else if (status == 0)
                        (void) snprintf(what, sizeof what, "no answer");
                else
                        (void) snprintf(what, sizeof what, "HTTP %ld", status);
                /* A 401 made cloud.c fetch a fresh token; the backoff starts small anyway. */
                poll_failed(c, what);
                goto done;
        }
        if (c->poll_failures > 0)
                log_info("Polling the cloud for commands works again");
        c->poll_failures = 0;
        c->last_error[0] = '\0';
        /* Re-armed at once; but an answer that brought nothing new (204 before the wait was
         * over, or only duplicates) does not start the next poll within a second. */
        c->poll_at = fresh > 0 ? 0 : c->poll_started + COMMANDS_POLL_MIN_INTERVAL_USEC;
done:
        commands_schedule(c);
}

static int poll_start(struct commands *c) {
        char wait[8];

        (void) snprintf(wait, sizeof wait, "%d", COMMANDS_POLL_WAIT_S);
        c->poll_started = now_monotonic_usec();
        c->counters.polls++;
        return uplink_request(c->req, UPLINK_KIND_COMMANDS_POLL, wait, NULL, 0,
                                COMMANDS_POLL_WAIT_S + COMMANDS_POLL_SLACK_S, on_poll_done, c, &c->poll_call);
}

/* ---- results ---- */

/* The result a command owes the cloud next: "delivered" before the final one. */
static unsigned next_result(const struct command *cmd) {
        if (cmd->state == CMD_NEW)
                return REPORTED_NONE;
        if (cmd->reported == REPORTED_NONE && cmd->delivered_at > 0)
                return REPORTED_DELIVERED;
        if (state_is_final(cmd->state) && cmd->reported < REPORTED_FINAL)
                return REPORTED_FINAL;
        return REPORTED_NONE;
}

static void on_result_done(void *userdata, const struct uplink_answer *a) {
        struct command *cmd = userdata;
        /* A transport failure is status 0 below, as "no answer". */
        long status = a->error < 0 ? 0 : a->status;
        int r = 0;
        struct commands *c = cmd->owner;
        const char *what = cmd->result_level == REPORTED_DELIVERED ? "delivered" : state_names[cmd->state];

        cmd->result_call = NULL;
        c->result_calls--;
        if (r >= 0 && status >= 200 && status < 300) {
                c->counters.results_sent++;
                c->result_failures = 0;
                cmd->reported = cmd->result_level;
                cmd->dirty = true;
                log_debug("Reported command %s %s", cmd->id, what);
        } else if (r >= 0 && status >= 400 && status < 500 && status != 401 && status != 408 && status != 429) {
                /* The cloud will never take it: do not loop (PROTOCOL.md 3). */
                c->counters.results_refused++;
                cmd->reported = cmd->result_level;
                cmd->dirty = true;
                log_event(LOG_ERR, 0, IOTHUB_MID_COMMAND_RESULT_REFUSED, cmd->dev[0] ? cmd->dev : NULL, NULL,
                          "The cloud refused the result \"%s\" of command %s with HTTP %ld; not sent again", what,
                          cmd->id, status);
        } else {
                c->counters.results_failed++;
                c->results_at = now_monotonic_usec() + backoff_usec(++c->result_failures);
                if (r < 0 || status == 0)
                        set_last_error(c, "reporting a result failed: %s", r < 0 ? strerror(-r) : "no answer");
                else
                        set_last_error(c, "reporting a result answered HTTP %ld", status);
                if (c->result_failures == 1)
                        log_warning("%s; retrying with backoff", c->last_error);
        }
        commands_schedule(c);
}

static int result_start(struct commands *c, struct command *cmd, unsigned level) {
        _cleanup_free_ char *body = NULL;
        const char *status = level == REPORTED_DELIVERED ? "delivered" : state_names[cmd->state];
        int64_t at = level == REPORTED_DELIVERED ? cmd->delivered_at : cmd->done_at;
        int r;

        r = command_result_body(status, at, level == REPORTED_FINAL ? cmd->detail : NULL, &body);
        if (r < 0)
                return r;
        size_t len = strlen(body);
        r = uplink_request(c->req, UPLINK_KIND_COMMAND_RESULT, cmd->id, TAKE_PTR(body), len, 0, on_result_done,
                             cmd, &cmd->result_call);
        if (r < 0)
                return r;
        cmd->result_level = level;
        c->result_calls++;
        return 0;
}

/* ---- publishing and signing ---- */

/* The signer made the command's JWS (PROTOCOL.md 2), or refused or failed. */
static void on_command_signed(void *userdata, int r, const struct signer_reply *p) {
        struct command *cmd = userdata;
        struct commands *c = cmd->owner;

        if (r >= 0 && !(p->jws && (cmd->jws = strdup(p->jws))))
                r = p->jws ? -ENOMEM : -EBADMSG;
        cmd->sign_op = signer_op_free(cmd->sign_op); /* p lives in it: copied above */
        if (cmd->state != CMD_NEW) {
                /* Finished meanwhile (expired): it does not go out. */
                free(cmd->jws);
                cmd->jws = NULL;
                return;
        }
        if (r < 0) {
                log_full_errno(c->sign_failures++ == 0 ? LOG_ERR : LOG_DEBUG, r,
                               "Failed to sign command %s, trying again: %m", cmd->id);
                set_last_error(c, "signing a command failed: %s", signer_last_error(c->signer) ?: strerror(-r));
                c->sign_at = now_monotonic_usec() + COMMANDS_RETRY_USEC;
                commands_schedule(c);
                return;
        }
        c->sign_failures = 0;
        c->counters.signatures++;
        stamp(cmd, "signed");
        free(cmd->cloud_sig); /* inside the JWS now */
        cmd->cloud_sig = NULL;
        cmd->state = CMD_PENDING;
        cmd->dirty = true;
        commands_schedule(c);
}

/* Asks the signer for the command's JWS: it builds the payload of PROTOCOL.md 2 itself from these
 * fields (and, with [cloud] command_key_file, checks that the vendor's JWS names the same command),
 * so a daemon taken over cannot make the hub key sign a command the cloud never issued. */
static int command_sign(struct commands *c, struct command *cmd, int64_t iat) {
        char payload[COMMAND_PAYLOAD_MAX];
        const char *set;
        int n;

        /* The set as the contract writes it (command_payload(): members in order, numbers in
         * their shortest form): the object after "set":, without the payload's closing brace. */
        n = command_payload(c->conf->hub.id, cmd->dev, cmd->id, iat, cmd->exp, &cmd->set, payload, sizeof payload);
        if (n < 0)
                return n;
        set = strstr(payload, ",\"set\":{");
        if (!set || payload[n - 1] != '}')
                return -EINVAL;
        set += strlen(",\"set\":");
        payload[n - 1] = '\0';
        stamp(cmd, "sign_asked");
        return signer_sign_command(c->signer, cmd->dev, cmd->id, (uint64_t) iat, (uint64_t) cmd->exp, set,
                                   cmd->cloud_sig, on_command_signed, cmd, &cmd->sign_op);
}

static int command_publish(struct commands *c, struct command *cmd) {
        _cleanup_free_ char *topic = NULL;
        int mid = 0, r;

        topic = strdup_printf("%s/%s/cmd", c->conf->mqtt.topic_prefix, cmd->dev);
        if (!topic)
                return -ENOMEM;
        r = mqtt_publish(c->mqtt, topic, cmd->jws, strlen(cmd->jws), 1, &mid);
        if (r < 0)
                return r;
        cmd->published = true;
        cmd->mid = mid;
        c->counters.published++;
        log_debug("Published command %s to %s (mid %d)", cmd->id, topic, mid);
        stamp(cmd, "published");
        return 0;
}

/* When a command stops waiting: one that never went out must not go out late; one that is out
 * there gives the bulb's ack a moment, for a bulb that applied it just before exp. */
static int64_t command_deadline(const struct command *cmd) {
        return cmd->published || cmd->state == CMD_DELIVERED ? cmd->exp + COMMANDS_ACK_GRACE_S : cmd->exp;
}

static void expire_due(struct commands *c, int64_t now) {
        for (size_t i = 0; i < c->n_cmds; i++) {
                struct command *cmd = c->cmds[i];

                if (state_is_final(cmd->state) || command_deadline(cmd) > now)
                        continue;
                command_finish(c, cmd, CMD_EXPIRED, now, cmd->delivered_at ? "not_acked" : "not_delivered");
                log_event(LOG_NOTICE, 0, IOTHUB_MID_COMMAND_EXPIRED, cmd->dev, NULL, "Command %s for %s expired (%s)",
                          cmd->id, cmd->dev, cmd->detail);
        }
}

static void arm_exp_timer(struct commands *c) {
        int64_t next = INT64_MAX;
        int r;

        for (size_t i = 0; i < c->n_cmds; i++)
                if (!state_is_final(c->cmds[i]->state) && command_deadline(c->cmds[i]) < next)
                        next = command_deadline(c->cmds[i]);
        if (next == INT64_MAX) {
                (void) sd_event_source_set_enabled(c->exp_timer, SD_EVENT_OFF);
                return;
        }
        if (next < 0)
                next = 0;
        r = sd_event_source_set_time(c->exp_timer, (uint64_t) next * USEC_PER_SEC);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->exp_timer, SD_EVENT_ONESHOT);
        if (r < 0)
                log_error_errno(r, "Failed to arm the command expiry timer: %m");
}

static void forget_done(struct commands *c) {
        size_t j = 0;

        for (size_t i = 0; i < c->n_cmds; i++) {
                struct command *cmd = c->cmds[i];

                if (state_is_final(cmd->state) && cmd->reported == REPORTED_FINAL && !cmd->dirty && !cmd->result_call)
                        command_free(cmd);
                else
                        c->cmds[j++] = cmd;
        }
        c->n_cmds = j;
}

/* ---- acks a power cut took from the database but not from the spool ---- */

struct recover_ctx {
        struct command_ack_wait *w;
        size_t n, left;
        int64_t since_min;   /* the smallest since_usec of w */
        bool older_seen;     /* the segment being read holds a frame older than since_min */
        struct command_ack_scan scan;
};

static int recover_one(const struct spool_frame *sf, bool segment_start, void *userdata) {
        struct recover_ctx *c = userdata;
        struct frame f;
        bool wanted = false;

        /* Segments from the newest: once one held a frame older than every waiting command,
         * the older segments hold older frames still. */
        if (segment_start && c->older_seen)
                return 1;
        c->scan.frames++;
        if (sf->received_at_usec < c->since_min) {
                c->older_seen = true;
                return 0;
        }
        /* Only the frames of the bulbs concerned, recent enough, are parsed. */
        for (size_t i = 0; i < c->n && !wanted; i++)
                wanted = !c->w[i].found && sf->received_at_usec >= c->w[i].since_usec && streq(c->w[i].dev, sf->dev);
        if (!wanted)
                return 0;
        c->scan.parsed++;
        /* The limit of the live path's parser at its widest: the frame passed [frames]
         * max_bytes when it came, whatever the setting is now. */
        if (frame_parse(sf->jws, sf->len, sf->dev, FRAME_MAX_BYTES_LIMIT, &f) != FRAME_OK || !f.has_ack ||
            f.seq != sf->seq)
                return 0;
        for (size_t i = 0; i < c->n; i++) {
                struct command_ack_wait *x = &c->w[i];

                /* The ack's id is the command's and the frame's device (its kid, its payload's
                 * dev and its record's, which frame_parse() holds equal) is the command's bulb. */
                if (x->found || sf->received_at_usec < x->since_usec || !streq(x->dev, f.dev) ||
                    !streq(x->id, f.ack.id))
                        continue;
                x->found = true;
                x->ok = f.ack.ok;
                (void) snprintf(x->err, sizeof x->err, "%s", f.ack.has_err ? f.ack.err : "");
                x->seq = f.seq;
                c->scan.found++;
                c->left--;
                break;
        }
        return c->left == 0 ? 1 : 0;
}

int commands_acks_from_spool(struct db *db, struct command_ack_wait *w, size_t n, struct command_ack_scan *ret) {
        struct recover_ctx c = { .w = w, .n = n, .since_min = INT64_MAX };
        int r;

        if (!db || (!w && n > 0))
                return -EINVAL;
        for (size_t i = 0; i < n; i++) {
                if (!w[i].id || !w[i].dev)
                        return -EINVAL;
                w[i].found = false;
                if (w[i].since_usec < c.since_min)
                        c.since_min = w[i].since_usec;
        }
        c.left = n;
        if (n > 0) {
                r = spool_frames_newest_first(db, recover_one, &c);
                if (r < 0)
                        return r;
        }
        if (ret)
                *ret = c.scan;
        return 0;
}

/* At start, in the work loop's first pass (after READY=1, so that a large spool never delays
 * it; before that pass expires anything, as a command whose ack is found must not expire for a
 * downtime that outlasted its exp): the commands loaded from the table that wait for their ack
 * get it from the spool if a power cut kept the frame but lost the row (commands-internal.h).
 * Applied as the live path does (commands_ack_store() in a transaction, commands_acks_done()):
 * the same row, the same results to the cloud. It runs in one go on the loop, so no frame is
 * taken meanwhile; a frame taken before it with an ack for the same command made it final
 * (then it is not looked for), and one taken after finds it final (ignored, as any late ack).
 * The bulb's resend of the frame itself is a replay, its seq being in the spool. The work is
 * bounded: nothing without a waiting command, only the frames of its bulb since it came
 * parsed, the walk ending at the first match of each or at a segment older than all of them.
 * A failure is logged and start goes on: the command then expires as it did before. */
static void recover_acks(struct commands *c) {
        _cleanup_free_ struct command_ack_wait *w = NULL;
        struct command_ack_scan scan = {};
        uint64_t t0 = now_monotonic_usec(), recovered = 0;
        size_t n = 0;
        int r;

        for (size_t i = 0; i < c->n_cmds; i++)
                n += !state_is_final(c->cmds[i]->state);
        if (n == 0)
                return;
        w = calloc(n, sizeof *w);
        if (!w) {
                log_warning("Cannot look for lost command acks in the spool: out of memory");
                return;
        }
        n = 0;
        for (size_t i = 0; i < c->n_cmds; i++) {
                const struct command *cmd = c->cmds[i];
                int64_t since = cmd->received_at - COMMAND_ACK_RECOVER_SLACK_S;

                if (state_is_final(cmd->state))
                        continue;
                w[n++] = (struct command_ack_wait){ .id = cmd->id, .dev = cmd->dev,
                                                    .since_usec = since > 0 ? since * (int64_t) USEC_PER_SEC : 0 };
        }
        r = commands_acks_from_spool(c->db, w, n, &scan);
        if (r < 0) {
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees w */
                log_warning_errno(r, "Failed to look for lost command acks in the spool: %m");
                return;
        }
        log_debug("Looked for the acks of %zu commands in the spool: %" PRIu64 " frames read, %" PRIu64
                  " parsed, %" PRIu64 " found, %.1f ms",
                  n, scan.frames, scan.parsed, scan.found, (double) (now_monotonic_usec() - t0) / 1000.0);
        if (scan.found == 0)
                return;
        r = db_begin(c->db);
        for (size_t i = 0; r >= 0 && i < n; i++)
                if (w[i].found)
                        r = commands_ack_store(c, w[i].dev, w[i].id, w[i].ok, w[i].err[0] ? w[i].err : NULL);
        recovered = c->n_staged;
        if (r >= 0)
                r = db_commit(c->db);
        if (r < 0) {
                (void) db_rollback(c->db);
                commands_acks_done(c, false);
                log_warning_errno(r, "Failed to store the command acks found in the spool: %m (%s)", db_errmsg(c->db));
                return;
        }
        commands_acks_done(c, true);
        c->counters.acks_recovered += recovered;
        for (size_t i = 0; i < n; i++)
                if (w[i].found)
                        log_info("Recovered the ack of command %s (%s) from frame %" PRIi64 " of %s in the spool: "
                                 "the last run lost it with its database row",
                                 w[i].id, w[i].ok ? "acked" : "failed", w[i].seq, w[i].dev);
}

/* ---- the work loop ---- */

static void wake_at(uint64_t *wake, uint64_t t) {
        if (t < *wake)
                *wake = t;
}

/* What the phases of one pass share: the clocks read once at its start, the signature budget
 * (each signature is a TPM operation, so a pass does a bounded number), whether the cloud
 * takes requests, and what the pass leaves for later: the earliest time something is due
 * (wake), or another pass at once (again). */
struct pass {
        uint64_t now;     /* CLOCK_MONOTONIC usec */
        int64_t t;        /* Unix seconds, for the commands' own times */
        unsigned budget;  /* signatures left in this pass */
        bool ready;       /* cloud_ready(): polls and results may go */
        uint64_t wake;    /* UINT64_MAX: nothing due later */
        bool again;
};

/* Sign the new commands, a few per pass (each is a TPM signature). */
static void pass_sign(struct commands *c, struct pass *p) {
        int r;

        for (size_t i = 0; i < c->n_cmds && c->signer; i++) {
                struct command *cmd = c->cmds[i];

                if (cmd->state != CMD_NEW || cmd->sign_op)
                        continue;
                if (p->now < c->sign_at) {
                        wake_at(&p->wake, c->sign_at);
                        break;
                }
                if (p->budget == 0) {
                        p->again = true;
                        break;
                }
                if (!sign_take(c, p->now)) {
                        wake_at(&p->wake, sign_ready_at(c, p->now));
                        break;
                }
                p->budget--;
                r = command_sign(c, cmd, p->t);
                if (r < 0) {
                        log_full_errno(c->sign_failures++ == 0 ? LOG_ERR : LOG_DEBUG, r,
                                       "Failed to sign command %s, trying again: %m", cmd->id);
                        set_last_error(c, "signing a command failed: %s", strerror(-r));
                        c->sign_at = p->now + COMMANDS_RETRY_USEC;
                        wake_at(&p->wake, c->sign_at);
                        break;
                }
                /* on_command_signed() moves it on once the signer answered. */
        }
}

/* Store before anything goes out: a restart resumes from the table. */
static void pass_store(struct commands *c, struct pass *p) {
        int r;

        if (p->now >= c->store_at) {
                r = store_flush(c);
                if (r < 0) {
                        c->counters.store_errors++;
                        log_full_errno(c->store_failures++ == 0 ? LOG_ERR : LOG_DEBUG, r,
                                       "Failed to store command states, trying again: %m (%s)", db_errmsg(c->db));
                        c->store_at = p->now + COMMANDS_RETRY_USEC;
                } else
                        c->store_failures = 0;
        }
        if (c->store_at > p->now)
                wake_at(&p->wake, c->store_at);
}

/* Publish what is stored and not out yet. */
static void pass_publish(struct commands *c, struct pass *p) {
        int r;

        for (size_t i = 0; i < c->n_cmds && mqtt_is_connected(c->mqtt) && p->now >= c->publish_at; i++) {
                struct command *cmd = c->cmds[i];
                struct bulb *b;

                if (cmd->state != CMD_PENDING || !cmd->stored || cmd->published || !cmd->jws)
                        continue;
                /* Removed since it was taken: it does not go out. */
                b = registry_find(c->registry, cmd->dev);
                if (!b || b->revoked) {
                        command_reject(c, cmd, b ? COMMAND_REVOKED : COMMAND_UNKNOWN_DEVICE,
                                       "the bulb was removed before the command went out");
                        p->again = true;
                        continue;
                }
                r = command_publish(c, cmd);
                if (r == -ENOTCONN)
                        break;
                if (r < 0) {
                        log_full_errno(c->publish_failures++ == 0 ? LOG_WARNING : LOG_DEBUG, r,
                                       "Failed to publish command %s, trying again: %m", cmd->id);
                        c->publish_at = p->now + COMMANDS_RETRY_USEC;
                        break;
                }
                c->publish_failures = 0;
        }
        if (c->publish_at > p->now)
                wake_at(&p->wake, c->publish_at);
}

/* Report outcomes, "delivered" before the final one, a few calls at a time. */
static void pass_report(struct commands *c, struct pass *p) {
        int r;

        for (size_t i = 0; i < c->n_cmds; i++) {
                struct command *cmd = c->cmds[i];
                unsigned level = next_result(cmd);

                if (level == REPORTED_NONE || cmd->result_call || cmd->dirty)
                        continue;
                if (!p->ready) {
                        wake_at(&p->wake, p->now + COMMANDS_IDLE_RECHECK_USEC);
                        break;
                }
                if (p->now < c->results_at) {
                        wake_at(&p->wake, c->results_at);
                        break;
                }
                if (c->result_calls >= COMMANDS_RESULT_CALLS_MAX)
                        break; /* a call's end schedules the next pass */
                if (p->budget == 0) {
                        p->again = true;
                        break;
                }
                if (!sign_take(c, p->now)) {
                        wake_at(&p->wake, sign_ready_at(c, p->now));
                        break;
                }
                p->budget--;
                r = result_start(c, cmd, level);
                if (r < 0) {
                        set_last_error(c, "cannot report a result: %s", strerror(-r));
                        c->results_at = p->now + backoff_usec(++c->result_failures);
                        wake_at(&p->wake, c->results_at);
                        break;
                }
        }
}

/* The long poll: one in flight, only with room for a full answer. */
static void pass_poll(struct commands *c, struct pass *p) {
        int r;

        if (c->poll_call)
                return;
        if (!p->ready)
                wake_at(&p->wake, p->now + COMMANDS_IDLE_RECHECK_USEC);
        else if (p->now < c->poll_at)
                wake_at(&p->wake, c->poll_at);
        else if (c->n_cmds + COMMANDS_PER_ANSWER > COMMANDS_ACTIVE_MAX)
                ; /* forgetting a command schedules a pass */
        else if (p->budget == 0)
                p->again = true;
        else if (!sign_take(c, p->now))
                wake_at(&p->wake, sign_ready_at(c, p->now));
        else {
                r = poll_start(c);
                if (r < 0) {
                        char what[64];
                        (void) snprintf(what, sizeof what, "cannot make the request: %s", strerror(-r));
                        poll_failed(c, what);
                        wake_at(&p->wake, c->poll_at);
                }
        }
}

/* Outcomes of this pass (rejections at publish time, results answered) are stored by the next
 * one. Pruning of old rows once an hour. Then the timers for what has to wait. */
static void pass_end(struct commands *c, struct pass *p) {
        int r;

        for (size_t i = 0; i < c->n_cmds && !p->again; i++)
                if (c->cmds[i]->dirty && c->cmds[i]->state != CMD_NEW && p->now >= c->store_at)
                        p->again = true;
        if (p->now >= c->prune_at) {
                r = store_prune(c);
                if (r < 0)
                        log_warning_errno(r, "Failed to prune old commands: %m (%s)", db_errmsg(c->db));
                c->prune_at = p->now + COMMANDS_PRUNE_INTERVAL_USEC;
        }
        wake_at(&p->wake, c->prune_at);

        arm_exp_timer(c);
        if (p->again)
                commands_schedule(c);
        if (p->wake == UINT64_MAX)
                r = sd_event_source_set_enabled(c->timer, SD_EVENT_OFF);
        else {
                r = sd_event_source_set_time(c->timer, p->wake);
                if (r >= 0)
                        r = sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);
        }
        if (r < 0)
                log_error_errno(r, "Failed to arm the command timer: %m");
}

/* One pass: expire, sign, store, publish, report, forget, poll, in that order, each bounded;
 * then arm the timers for what has to wait. */
static void commands_work(struct commands *c) {
        struct pass p = {
                .now = now_monotonic_usec(),
                .t = now_s(),
                .budget = COMMANDS_SIGN_PER_PASS,
                .ready = cloud_ready(c->cloud),
                .wake = UINT64_MAX,
        };

        /* The first pass, after READY=1, before anything can expire (see recover_acks()). */
        if (!c->start_checked) {
                c->start_checked = true;
                recover_acks(c);
        }
        expire_due(c, p.t);
        pass_sign(c, &p);
        pass_store(c, &p);
        pass_publish(c, &p);
        pass_report(c, &p);
        forget_done(c);
        pass_poll(c, &p);
        pass_end(c, &p);
}

static int on_defer(sd_event_source *s, void *userdata) {
        commands_work(userdata);
        return 0;
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        commands_work(userdata);
        return 0;
}

/* ---- API ---- */

void commands_kick(struct commands *c) {
        if (!c)
                return;
        /* Something changed (MQTT up, a token, a key, a registration): a poll waiting out a
         * backoff goes now. The failure count stays, so a poll that fails again backs off
         * further. */
        if (c->poll_failures > 0)
                c->poll_at = 0;
        commands_schedule(c);
}

void commands_key_ready(struct commands *c, struct signer *s) {
        if (!c)
                return;
        c->signer = s;
        commands_kick(c);
}

void commands_on_published(struct commands *c, int mid) {
        if (!c)
                return;
        for (size_t i = 0; i < c->n_cmds; i++) {
                struct command *cmd = c->cmds[i];

                if (!cmd->published || cmd->mid != mid)
                        continue;
                cmd->published = false;
                cmd->mid = 0;
                /* Only memory here: this may run inside the frame path's transaction. */
                if (cmd->state == CMD_PENDING) {
                        cmd->state = CMD_DELIVERED;
                        cmd->delivered_at = now_s();
                        cmd->dirty = true;
                        c->counters.delivered++;
                        log_debug("Command %s delivered to the broker", cmd->id);
                        stamp(cmd, "puback");
                }
                commands_schedule(c);
                return;
        }
}

static struct staged_ack *find_staged(struct commands *c, const struct command *cmd) {
        for (size_t i = 0; i < c->n_staged; i++)
                if (c->staged[i].cmd == cmd)
                        return &c->staged[i];
        return NULL;
}

/* The ack's outcome on cmd (memory), as the row in the frame's transaction already has it. */
static void apply_ack(struct commands *c, struct command *cmd, bool ok, const char *err, int64_t t) {
        if (!cmd->delivered_at) {
                /* The ack came before the PUBACK (or the PUBACK was lost to a restart): the
                 * bulb has it, and the cloud hears "delivered" first all the same. */
                cmd->delivered_at = t;
                c->counters.delivered++;
        }
        command_finish(c, cmd, ok ? CMD_ACKED : CMD_FAILED, t, ok ? NULL : err);
        if (ok)
                log_debug("Command %s acknowledged by %s", cmd->id, cmd->dev);
        else {
                char shown[COMMAND_DETAIL_MAX + 1];
                /* From a verified frame, but still the bulb's words: printable ASCII only. */
                (void) snprintf(shown, sizeof shown, "%s", cmd->detail);
                for (char *p = shown; *p; p++)
                        if ((unsigned char) *p < 0x20 || (unsigned char) *p >= 0x7f)
                                *p = '?';
                log_event(LOG_NOTICE, 0, IOTHUB_MID_COMMAND_FAILED, cmd->dev, NULL,
                          "Bulb %s could not apply command %s: %s", cmd->dev, cmd->id,
                          shown[0] ? shown : "(no reason given)");
        }
}

int commands_ack_store(struct commands *c, const char *dev, const char *id, bool ok, const char *err) {
        struct command *cmd;
        struct staged_ack *sa;
        int64_t t;
        int r;

        if (!c || !dev || !id)
                return 0;
        cmd = find_by_id(c, id);
        if (!cmd || !streq(cmd->dev, dev) || state_is_final(cmd->state) || find_staged(c, cmd)) {
                /* Unknown, another bulb's, finished already (or by an earlier frame of this
                 * transaction): a bulb cannot change that. */
                c->staged_ignored++;
                log_debug("Ignored an ack from %s for command %s", dev, id);
                return 0;
        }
        if (c->n_staged == c->cap_staged) {
                size_t cap = c->cap_staged ? c->cap_staged * 2 : 8;
                struct staged_ack *n = reallocarray(c->staged, cap, sizeof *n);
                if (!n)
                        return -ENOMEM;
                c->staged = n;
                c->cap_staged = cap;
        }
        t = now_s();
        sa = &c->staged[c->n_staged];
        *sa = (struct staged_ack){ .cmd = cmd, .ok = ok, .at = t };
        (void) snprintf(sa->err, sizeof sa->err, "%s", err ? err : "");
        if (cmd->stored) {
                /* The row as memory will be once the transaction commits: a copy with the
                 * outcome, so that memory itself changes only after the commit. */
                struct command row = *cmd;

                if (!row.delivered_at)
                        row.delivered_at = t;
                row.state = ok ? CMD_ACKED : CMD_FAILED;
                row.done_at = t;
                set_detail(&row, ok ? NULL : err);
                r = store_update(c->db, &row);
                if (r < 0)
                        return r;
                sa->row_written = true;
        }
        /* Without a row (not stored yet, which a published command always is), memory takes the
         * outcome after the commit and the work loop writes it, as for any other change. */
        c->n_staged++;
        return 0;
}

void commands_acks_done(struct commands *c, bool committed) {
        if (!c)
                return;
        if (committed) {
                c->counters.acks_ignored += c->staged_ignored;
                for (size_t i = 0; i < c->n_staged; i++) {
                        struct staged_ack *sa = &c->staged[i];

                        apply_ack(c, sa->cmd, sa->ok, sa->err[0] ? sa->err : NULL, sa->at);
                        /* The row written in the frame's transaction holds all of memory
                         * (store_update() writes every column that can change on a stored
                         * command), so memory is not ahead of it. */
                        if (sa->row_written)
                                sa->cmd->dirty = false;
                }
                if (c->n_staged > 0)
                        commands_schedule(c);
        }
        c->n_staged = 0;
        c->staged_ignored = 0;
}

int commands_new(sd_event *e, const struct iothub_conf *conf, struct db *db, struct registry *registry,
                 struct mqtt *mqtt, struct cloud *cloud, struct uplink_client *req, struct events *events,
                 struct commands **ret) {
        struct commands *c;
        int r;

        if (!cloud) {
                *ret = NULL;
                return 0;
        }
        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->conf = conf;
        c->db = db;
        c->registry = registry;
        c->mqtt = mqtt;
        c->cloud = cloud;
        c->req = req;
        c->events = events;
        if (conf->cloud.command_key_file) {
                _cleanup_free_ char *err = NULL;
                r = command_key_load(conf->cloud.command_key_file, &c->cloud_key, c->cloud_kid, &err);
                if (r < 0) {
                        log_error_errno(r, "Failed to load [cloud] command_key_file: %s", err ? err : strerror(-r));
                        free(c);
                        return r;
                }
                log_info("Commands must be signed by the vendor's command key %s", c->cloud_kid);
        }
        c->tokens = COMMANDS_SIGN_BURST;
        c->tokens_usec = now_monotonic_usec();
        r = sd_event_add_defer(e, &c->defer, on_defer, c);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->defer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(e, &c->timer, CLOCK_MONOTONIC, UINT64_MAX, 0, on_timer, c);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->timer, SD_EVENT_OFF);
        if (r >= 0)
                r = sd_event_add_time(e, &c->exp_timer, CLOCK_REALTIME, UINT64_MAX, 0, on_timer, c);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->exp_timer, SD_EVENT_OFF);
        if (r < 0)
                goto fail;
        r = store_load(c);
        if (r < 0) {
                log_error_errno(r, "Failed to load the commands in flight: %m (%s)", db_errmsg(db));
                goto fail;
        }
        if (c->n_cmds > 0)
                log_info("Resuming %zu commands of the last run", c->n_cmds);
        commands_schedule(c);
        *ret = c;
        return 0;
fail:
        commands_free(c);
        return r;
}

void commands_free(struct commands *c) {
        int r;

        if (!c)
                return;
        uplink_call_cancel(c->poll_call);
        /* What changed in the last moments (a PUBACK, a result taken) is not lost. */
        r = store_flush(c);
        if (r < 0)
                log_warning_errno(r, "Failed to store command states at exit: %m");
        for (size_t i = 0; i < c->n_cmds; i++)
                command_free(c->cmds[i]);
        sd_event_source_disable_unref(c->defer);
        sd_event_source_disable_unref(c->timer);
        sd_event_source_disable_unref(c->exp_timer);
        free(c->staged);
        verify_key_free(c->cloud_key);
        free(c);
}

int commands_status_json(struct commands *c, json_t *st) {
        uint64_t now = now_monotonic_usec();
        size_t in_flight = 0, unreported = 0;
        json_t *o, *reasons;

        if (!c) {
                o = json_pack("{s:b,s:I,s:I,s:I}", "configured", 0, "delivered", (json_int_t) 0, "acked",
                              (json_int_t) 0, "expired", (json_int_t) 0);
                if (!o)
                        return -ENOMEM;
                return json_object_set_new(st, "commands", o) < 0 ? -ENOMEM : 0;
        }
        for (size_t i = 0; i < c->n_cmds; i++) {
                if (!state_is_final(c->cmds[i]->state))
                        in_flight++;
                else if (c->cmds[i]->reported < REPORTED_FINAL)
                        unreported++;
        }
        reasons = json_object();
        if (!reasons)
                return -ENOMEM;
        for (int i = COMMAND_OK + 1; i < _COMMAND_REASON_MAX; i++)
                (void) json_object_set_new(reasons, command_reason_to_string(i),
                                           json_integer((json_int_t) c->counters.rejected_by[i]));
        o = json_pack("{s:b,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:o,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}",
                      "configured", 1, "received", (json_int_t) c->counters.received, "published",
                      (json_int_t) c->counters.published, "delivered", (json_int_t) c->counters.delivered, "acked",
                      (json_int_t) c->counters.acked, "failed", (json_int_t) c->counters.failed, "expired",
                      (json_int_t) c->counters.expired, "rejected", (json_int_t) c->counters.rejected,
                      "rejected_reasons", reasons, "duplicates", (json_int_t) c->counters.duplicates, "deferred",
                      (json_int_t) c->counters.deferred, "acks_ignored", (json_int_t) c->counters.acks_ignored, "acks_recovered",
                      (json_int_t) c->counters.acks_recovered,
                      "in_flight", (json_int_t) in_flight, "unreported", (json_int_t) unreported, "signatures",
                      (json_int_t) c->counters.signatures, "polls", (json_int_t) c->counters.polls, "poll_errors",
                      (json_int_t) c->counters.poll_errors, "results_sent", (json_int_t) c->counters.results_sent,
                      "results_failed", (json_int_t) c->counters.results_failed, "results_refused",
                      (json_int_t) c->counters.results_refused, "store_errors",
                      (json_int_t) c->counters.store_errors, "backoff_s",
                      (json_int_t) (c->poll_failures > 0 && c->poll_at > now
                                            ? (c->poll_at - now + USEC_PER_SEC - 1) / USEC_PER_SEC
                                            : 0));
        if (!o)
                return -ENOMEM;
        (void) json_object_set_new(o, "last_error", c->last_error[0] ? json_string(c->last_error) : json_null());
        return json_object_set_new(st, "commands", o) < 0 ? -ENOMEM : 0;
}
