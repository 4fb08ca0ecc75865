/* SPDX-License-Identifier: MIT */
/* Private to commands.c and its unit test (tests/unit/test-commands.c): the pure parts of the
 * command path, no I/O and no state, so that they can be tested table-driven. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "iothub/frame.h"
#include "iothub/hubkey.h"
#include "iothub/util.h"

/* Named limits. The cloud is not trusted either: everything it sends is bounded here. */
#define COMMAND_ID_MAX 64                  /* PROTOCOL.md 1 ack.id: 1..64 of [A-Za-z0-9._-] */
#define COMMAND_DETAIL_MAX 128             /* a result's detail; a bulb's ack.err is at most 128 bytes */
#define COMMAND_EXP_AHEAD_MAX_S 86400      /* an exp further ahead is refused (bad_exp) */
#define COMMAND_CLOUD_SIG_MAX 2048         /* the vendor's JWS in "sig" (a valid one is about 500 bytes) */
#define COMMAND_CLOUD_PART_MAX 1024        /* its decoded header and payload, each */
#define COMMAND_CLOUD_TYP "iothub-cloud-cmd"
/* The JWS payload JSON, far above what a valid one needs, the vendor's JWS ("cloud") included. */
#define COMMAND_PAYLOAD_MAX (1024 + COMMAND_CLOUD_SIG_MAX)
#define COMMAND_JWS_MAX (B64URL_LEN(COMMAND_PAYLOAD_MAX) + 512) /* the whole JWS Compact */
#define COMMANDS_ANSWER_MAX (64 * 1024)    /* bytes of one long poll answer we parse at most */

/* Why a command from the cloud is refused, in the order the checks run. The names are the
 * "detail" of the "rejected" result (PROTOCOL.md 3) and the keys of commands.rejected_reasons. */
enum command_reason {
        COMMAND_OK = 0,
        COMMAND_BAD_ID,         /* id missing, not 1..64 of [A-Za-z0-9._-], or "." / "..": not reported */
        COMMAND_BAD_SIGNATURE,  /* [cloud] command_key_file set, and no valid "sig" by that key */
        COMMAND_MALFORMED,      /* not an object, a member missing or unknown, a value of the wrong type */
        COMMAND_BAD_SET,        /* set empty, an unknown member, or a value out of range */
        COMMAND_EXPIRED,        /* exp already passed when it arrived */
        COMMAND_BAD_EXP,        /* exp more than COMMAND_EXP_AHEAD_MAX_S ahead */
        COMMAND_UNKNOWN_DEVICE, /* dev is no device id, or no bulb with that id is enrolled */
        COMMAND_REVOKED,        /* the bulb was removed */
        _COMMAND_REASON_MAX,
};
const char *command_reason_to_string(enum command_reason r);

/* What a command sets: the members of a status "state" (PROTOCOL.md 1 and 2), each optional,
 * at least one present. */
struct command_set {
        bool has_on, has_bri, has_ct, has_xy;
        bool on;
        int bri;      /* 0..254 */
        int ct;       /* 153..500 */
        double xy[2]; /* each in [0,1] */
};

struct command_fields {
        char id[COMMAND_ID_MAX + 1];  /* set whenever the id is valid, even if a later check fails */
        char dev[DEVICE_ID_MAX + 1];  /* set whenever dev is a valid device id, else "" */
        int64_t exp;                  /* set whenever exp is an integer, else 0 */
        struct command_set set;
};

/* A command id: 1..COMMAND_ID_MAX of [A-Za-z0-9._-], and not "." or ".." (a dot-segment cannot
 * name a command in the result URL, RFC 3986 5.2.4). */
bool command_id_is_valid(const char *s, size_t len);

/* Checks one element of the long poll answer's "commands" array without state (no registry, no
 * de-duplication): shape, set, exp against now_s, the form of dev. Returns COMMAND_OK, or the
 * first reason in enum order that applies (COMMAND_REVOKED never: that needs the registry).
 * ret is filled as far as the checks got; ret_why, when not NULL, gets a static one-line
 * explanation for the log. */
enum command_reason command_check(const json_t *cmd, int64_t now_s, struct command_fields *ret,
                                  const char **ret_why);
/* command_check() never returns COMMAND_BAD_SIGNATURE: the caller runs
 * command_cloud_sig_check() first when a key is configured. A "sig" member is allowed (a
 * string, else COMMAND_MALFORMED) and not looked at. */

/* The vendor's signature of a command (PROTOCOL.md 5, iothub-protocol(7) "Cloud-signed
 * commands"): cmd's "sig" is a JWS Compact with the protected header exactly
 * {"alg":"ES256","typ":"iothub-cloud-cmd","kid":<kid>} (members in any order), a 64-byte r||s
 * signature by key, and as payload a JSON object with exactly the members "hub" (equal to
 * hub_id), "id", "dev", "exp", "set", each equal as a JSON value (json_equal(): same types,
 * same numbers, objects regardless of member order) to the member of cmd. Checks nothing else
 * of cmd (command_check() does). Returns 0 when valid, else -EBADMSG with a static one-line
 * reason in *ret_why when not NULL. Pure. */
struct verify_key;
int command_cloud_sig_check(const json_t *cmd, const char *hub_id, struct verify_key *key, const char *kid,
                            const char **ret_why);
/* Loads the vendor's command key ([cloud] command_key_file): a trusted file (util.h), a PEM P-256
 * public key, and its RFC 7638 thumbprint (base64url SHA-256, the kid of its JWS). Returns 0,
 * or a negative errno with a malloc'ed reason in *ret_error when not NULL. */
int command_key_load(const char *path, struct verify_key **ret, char ret_kid[static HUBKEY_ID_LEN + 1],
                     char **ret_error);
/* Appends ,"cloud":"<jws>" as the last member of the object in buf (len bytes of JSON ending in
 * '}', NUL-terminated, size bytes of room). jws must be JWS Compact ([A-Za-z0-9_-.] only, no
 * escaping needed). Returns the new length, -EINVAL or -ENOBUFS. Pure. */
int command_payload_add_cloud(char *buf, size_t len, size_t size, const char *jws);

/* The JWS payload of PROTOCOL.md 2, compact JSON with the members in the contract's order:
 * {"hub":..,"dev":..,"id":..,"iat":..,"exp":..,"set":{"on":..,"bri":..,"ct":..,"xy":[..]}}
 * (set members in that order, only those present; numbers of xy in the shortest form that reads
 * back as the same double). hub, dev and id must be valid ids (no JSON escaping is needed).
 * Returns the length written to buf (NUL-terminated), -EINVAL for bad input, -ENOBUFS. */
int command_payload(const char *hub, const char *dev, const char *id, int64_t iat, int64_t exp,
                    const struct command_set *set, char *buf, size_t size);

/* The JWS Compact of PROTOCOL.md 2 over payload, in two steps (jws.h, jws_compact_prepare()), as
 * iothub-signer makes it with an asynchronous signature: this gives the signing input with the
 * protected header {"alg":"ES256","kid":"<kid>","typ":"iothub-cmd"}; the key signs it (ES256: the
 * raw 64-byte r||s of RFC 7518 3.4) and jws_compact_finish() completes it. -EINVAL for a kid that
 * is not base64url or when the JWS would be longer than COMMAND_JWS_MAX. */
int command_jws_prepare(const char *kid, const char *payload, size_t len, char **ret, size_t *ret_len);

/* The result body of PROTOCOL.md 3: {"status":..,"at":..[,"detail":..]}, malloc'ed. */
int command_result_body(const char *status, int64_t at, const char *detail, char **ret);

/* Acks that a power cut took from the database but not from the spool (iothub-protocol(7),
 * "Command acks"): a commit appends its frames to a segment and writes their command acks to
 * SQLite, and the kernel may write the segment back before the WAL. At start the frame is then
 * in the spool (its seq is the bulb's, so the bulb's resend is a replay) and the ack nowhere
 * else. One command waiting for its ack (not final: pending or delivered) and what was found. */
struct command_ack_wait {
        const char *id, *dev;
        int64_t since_usec; /* frames received before this cannot carry its ack: the command's arrival
                             * minus COMMAND_ACK_RECOVER_SLACK_S, for a clock stepped back meanwhile */
        bool found;
        bool ok;
        char err[FRAME_ACK_ERR_MAX + 1]; /* "" when the ack has none */
        int64_t seq;                     /* the frame that carried it */
};
#define COMMAND_ACK_RECOVER_SLACK_S 60

struct command_ack_scan {
        uint64_t frames; /* frames the walk passed */
        uint64_t parsed; /* frames of a waiting bulb, recent enough, parsed */
        uint64_t found;
};

/* Looks for the acks of the commands in w among the frames still in the spool's segments
 * (spool_frames_newest_first(): segments from the newest; frames of retired segments need no
 * look, their commits are on disk). Only a frame of w[i].dev received at or after
 * w[i].since_usec is parsed (frame_parse(), the parser of the live path), and its ack counts
 * only with w[i].id; the first such frame of the walk fills w[i]. The walk stops once every
 * command has its ack, or at the start of a segment after one that held a frame older than
 * every since_usec. The segments are trusted as the database is (the hub's own 0600 files in
 * its 0700 directory, a CRC per record, each frame verified before it was appended): signatures
 * are not checked again. Returns 0 or a negative errno; ret, when not NULL, gets the counts. */
struct db;
int commands_acks_from_spool(struct db *db, struct command_ack_wait *w, size_t n, struct command_ack_scan *ret);

/* Parses a long poll answer (200): exactly {"commands":[...]}, at most COMMANDS_ANSWER_MAX bytes,
 * no duplicate member names. *ret_commands is the array (a new reference). Returns 0, -EFBIG,
 * or -EBADMSG. */
int commands_parse_answer(const char *body, size_t len, json_t **ret_commands);
