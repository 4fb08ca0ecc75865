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
        struct verify_raw pub; /* the enrolled public key, compact (verify.h) */
        /* The key ready to verify, or NULL: an entry of the registry's LRU of verify contexts
         * (not persisted; registry_verify() makes it, eviction, revocation and re-enrolment
         * free it). Read only through registry_verify(). */
        struct verify_key *key;
        struct bulb *lru_prev, *lru_next; /* towards the most / least recently used */
        bool key_damaged; /* pub failed verify_key_from_raw(): -EUCLEAN until re-enrolled */
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

/* How many bulbs keep a verify context (OpenSSL key and initialised context, about 2.8 KB for
 * P-256 and 1 KB for Ed25519) between their frames. 256: the 200 bulbs of a typical home all
 * stay in it, so that their frames never rebuild a key, and 5,000 bulbs cost 0.7 MB of
 * contexts instead of 14 MB (issue 13: 8 MiB private memory with 5,000 bulbs). A miss costs
 * about 35 us for P-256 (the point decoded and checked on the curve) on a PC. */
#define REGISTRY_KEY_CACHE_DEFAULT 256

struct registry_key_stats {
        uint64_t hits, misses, evictions, damaged;
        size_t cached, max;
};

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

/* Verifies a frame's signature with the bulb's enrolled key (verify_signature()), taking the
 * verify context from the LRU or building it from b->pub (and evicting the least recently used
 * context when the LRU is full). Returns 0 when valid, -EBADMSG when the signature does not
 * verify, -EKEYREVOKED for a revoked bulb (never verified), -EUCLEAN when the stored key does
 * not load (not a point on the curve, a small-order Ed25519 key: the database was damaged; the
 * bulb stays refused until re-enrolled), -ENOMEM. */
int registry_verify(struct registry *r, struct bulb *b, enum frame_alg alg, const uint8_t *msg, size_t msg_len,
                    const uint8_t *sig, size_t sig_len);
/* Bounds the LRU of verify contexts (REGISTRY_KEY_CACHE_DEFAULT after registry_open()), evicting
 * the least recently used down to n. 0 keeps none: every frame builds its key. */
void registry_set_key_cache_max(struct registry *r, size_t n);
void registry_key_stats(const struct registry *r, struct registry_key_stats *ret);

/* Enrols a bulb with a PEM public key (already checked by the caller or not: it is parsed
 * again here). A new id is added; an id that exists and is revoked is re-enrolled with the
 * new key, keeping its last_seq so that no replay window opens; an id that exists and is
 * not revoked gives -EEXIST. Persists first, then updates memory. Returns 0 or a negative
 * errno (-EINVAL bad id or key, -EOPNOTSUPP unsupported key). */
int registry_add(struct registry *r, const char *id, const char *pem, size_t pem_len);

/* Revokes a bulb at once (persisted, then in memory). -ENOENT when unknown, 0 when it was
 * already revoked. */
int registry_revoke(struct registry *r, const char *id);

/* Moves a bulb's last accepted seq ahead in memory (never back; ingest.c's undo of a commit that
 * failed sets it directly): ingest.c at each accepted frame,
 * so that a second frame of the same commit with that seq is a replay, and at start from the
 * spool's segments (the stored one, bulb_seqs, is written by spool.c from the segments
 * themselves once they are synced). */
void registry_seq_committed(struct bulb *b, int64_t seq);

/* Token bucket of [frames] rate_per_device: capacity max(1, 2*rate) tokens, refilled at
 * rate per second. Returns true and takes a token when one is available. Pure. */
bool bulb_rate_take(struct bulb *b, double rate, uint64_t now_usec);
