/* SPDX-License-Identifier: MIT */
/* Enrolled bulbs: persisted in the database, looked up from memory on the frame path. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "iothub/db.h"
#include "iothub/frame.h"
#include "iothub/verify.h"

struct bulb {
        char id[DEVICE_ID_MAX + 1];
        enum frame_alg alg;
        struct verify_key *key;
        bool revoked;
        int64_t last_seq;    /* last accepted seq, persisted (0: none yet) */
        int64_t enrolled_at; /* Unix seconds */
        /* Token bucket (not persisted). */
        double tokens;
        uint64_t bucket_usec;
        /* Log rate limit of rejections (not persisted). */
        struct ratelimit log_rl;
        struct ack_entry *ack; /* end-to-end ack state, owned by ack.c (not persisted) */
        /* In the open ingest transaction's undo list (ingest.c; not persisted): a flag instead
         * of a search of the list for every frame. */
        bool in_batch;
};

struct registry;
struct ack_entry;

/* Loads every bulb from the database. Returns 0 or a negative errno. */
int registry_open(struct db *db, struct registry **ret);
void registry_free(struct registry *r);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct registry *, registry_free);

/* Lookup by id, O(log n); NULL when unknown. Revoked bulbs are found (and marked). The pointers
 * of registry_find() and registry_get() stay valid until registry_free(): registry_add() never
 * moves a bulb (re-enrolment updates it in place). */
struct bulb *registry_find(struct registry *r, const char *id);
size_t registry_count(const struct registry *r);
/* The i-th bulb in id order, for listing. */
struct bulb *registry_get(struct registry *r, size_t i);

/* Enrols a bulb with a PEM public key (already checked by the caller or not: it is parsed
 * again here). A new id is added; an id that exists and is revoked is re-enrolled with the
 * new key, keeping its last_seq so that no replay window opens; an id that exists and is
 * not revoked gives -EEXIST. Persists first, then updates memory. Returns 0 or a negative
 * errno (-EINVAL bad id or key, -EOPNOTSUPP unsupported key). */
int registry_add(struct registry *r, const char *id, const char *pem, size_t pem_len);

/* Revokes a bulb at once (persisted, then in memory). -ENOENT when unknown, 0 when it was
 * already revoked. */
int registry_revoke(struct registry *r, const char *id);

/* Records the last accepted seq of a bulb, inside the caller's transaction. The caller moves
 * memory ahead at once with registry_seq_committed() (never back), so that a second frame of
 * the same batch with that seq is a replay; if the transaction rolls back, the caller puts the
 * seqs it moved back (ingest.c keeps an undo list), so that frames never committed are accepted
 * when a bulb resends them (PROTOCOL.md 1, end-to-end acknowledgement). Returns 0 or a
 * negative errno. */
int registry_store_seq(struct registry *r, const struct bulb *b, int64_t seq);
void registry_seq_committed(struct bulb *b, int64_t seq);

/* Token bucket of [frames] rate_per_device: capacity max(1, 2*rate) tokens, refilled at
 * rate per second. Returns true and takes a token when one is available. Pure. */
bool bulb_rate_take(struct bulb *b, double rate, uint64_t now_usec);
