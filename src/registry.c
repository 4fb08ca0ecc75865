/* SPDX-License-Identifier: MIT */
/* Enrolled bulbs. The database is the truth; memory holds a copy sorted by id for the frame
 * path (binary search, no SQL per lookup). Every change is persisted first and applied to
 * memory only once the database took it, with everything memory needs allocated beforehand,
 * so that the two never disagree.
 *
 * Each struct bulb is allocated on its own and the sorted array holds pointers: a pointer
 * returned by registry_find() or registry_get() stays valid until registry_free(), across
 * registry_add() (which may move the array, not the bulbs) and re-enrolment (which updates the
 * bulb in place).
 *
 * Keys: every bulb keeps its enrolled key in the compact form of verify.h (struct verify_raw,
 * about 70 bytes), read at start-up without curve arithmetic, so that registry_open() costs
 * microseconds per bulb and not the 35 us of an OpenSSL key. The OpenSSL key and its
 * initialised verify context (2.8 KB for P-256) exist only for the key_cache_max bulbs heard
 * from last, in an LRU list threaded through the bulbs: a hit is a few pointer moves before
 * the verify, exactly the hot path of a bulb with its own context. */
#include <math.h>
#include <time.h>

#include "db-internal.h"
#include "iothub/registry.h"

struct registry {
        struct db *db;
        struct bulb **bulbs; /* sorted by id, strcmp() order, which is SQLite's BINARY collation */
        size_t n, allocated;
        /* The LRU of verify contexts: the bulbs whose ->key is set, most recently used first. */
        struct bulb *lru_head, *lru_tail;
        size_t key_cache_max;
        struct registry_key_stats stats;
};

static void bulb_free(struct bulb *b) {
        if (!b)
                return;
        verify_key_free(b->key);
        free(b);
}
DEFINE_TRIVIAL_CLEANUP_FUNC(struct bulb *, bulb_free);

void registry_free(struct registry *r) {
        if (!r)
                return;
        for (size_t i = 0; i < r->n; i++)
                bulb_free(r->bulbs[i]);
        free(r->bulbs);
        free(r);
}

static bool id_is_valid(const char *id) {
        return id && device_id_is_valid(id, strnlen(id, DEVICE_ID_MAX + 1));
}

/* The index of id, or where it would go; *found tells which. */
static size_t registry_index(const struct registry *r, const char *id, bool *found) {
        size_t lo = 0, hi = r->n;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                int c = strcmp(id, r->bulbs[mid]->id);

                if (c == 0) {
                        *found = true;
                        return mid;
                }
                if (c < 0)
                        hi = mid;
                else
                        lo = mid + 1;
        }
        *found = false;
        return lo;
}

static int registry_reserve(struct registry *r, size_t n) {
        struct bulb **a;
        size_t m;

        if (n <= r->allocated)
                return 0;
        m = r->allocated ? r->allocated * 2 : 16;
        if (m < n)
                m = n;
        a = reallocarray(r->bulbs, m, sizeof *a);
        if (!a)
                return -ENOMEM;
        r->bulbs = a;
        r->allocated = m;
        return 0;
}

static int alg_from_string(const char *s, enum frame_alg *ret) {
        static const enum frame_alg algs[] = { FRAME_ALG_ES256, FRAME_ALG_EDDSA };

        for (size_t i = 0; i < ELEMENTSOF(algs); i++)
                if (s && streq_ptr(s, frame_alg_to_string(algs[i]))) {
                        *ret = algs[i];
                        return 0;
                }
        return -EINVAL;
}

/* One row of bulbs. The rows were written by registry_add(), which checked all of it: a row
 * that does not pass again was damaged or tampered with, and is -EUCLEAN. */
static int bulb_from_row(sqlite3_stmt *s, struct bulb **ret) {
        _cleanup_(bulb_freep) struct bulb *b = NULL;
        const char *id = (const char *) sqlite3_column_text(s, 0);
        const char *alg = (const char *) sqlite3_column_text(s, 1);
        const char *pem = (const char *) sqlite3_column_text(s, 2);
        size_t id_len = (size_t) sqlite3_column_bytes(s, 0), pem_len = (size_t) sqlite3_column_bytes(s, 2);
        int64_t revoked = sqlite3_column_int64(s, 3), last_seq = sqlite3_column_int64(s, 4);
        enum frame_alg col_alg = FRAME_ALG_ES256;

        if (!id || !pem || !device_id_is_valid(id, id_len) || alg_from_string(alg, &col_alg) < 0 ||
            (revoked != 0 && revoked != 1) || last_seq < 0 || last_seq > FRAME_SEQ_MAX)
                return -EUCLEAN;
        b = calloc(1, sizeof *b);
        if (!b)
                return -ENOMEM;
        memcpy(b->id, id, id_len);
        b->id[id_len] = '\0';
        /* Only the encoding is checked here (no curve arithmetic: registry_open() runs before
         * READY=1); the key itself is checked when its first frame builds it. */
        switch (verify_raw_from_pem(pem, pem_len, &b->pub)) {
        case 0:
                break;
        case -ENOMEM:
                return -ENOMEM;
        default:
                return -EUCLEAN;
        }
        if (b->pub.alg != col_alg)
                return -EUCLEAN;
        b->alg = b->pub.alg;
        b->revoked = revoked;
        b->last_seq = last_seq;
        b->enrolled_at = sqlite3_column_int64(s, 5);
        *ret = TAKE_PTR(b);
        return 0;
}

int registry_open(struct db *db, struct registry **ret) {
        _cleanup_(registry_freep) struct registry *r = NULL;
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        int rc, k;

        if (!db || !ret)
                return -EINVAL;
        r = calloc(1, sizeof *r);
        if (!r)
                return -ENOMEM;
        r->db = db;
        r->key_cache_max = REGISTRY_KEY_CACHE_DEFAULT;

        rc = sqlite3_prepare_v2(
                db_handle(db),
                "SELECT b.id, b.alg, b.pubkey_pem, b.revoked, COALESCE(q.last_seq, 0), b.enrolled_at "
                "FROM bulbs b LEFT JOIN bulb_seqs q ON q.id = b.id ORDER BY b.id",
                -1, &s, NULL);
        if (rc != SQLITE_OK)
                /* cppcheck-suppress memleak ; freed by _cleanup_(registry_freep) */
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees r */
                return db_errno(rc);
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
                struct bulb *b = NULL;

                k = registry_reserve(r, r->n + 1);
                if (k < 0)
                        return k;
                k = bulb_from_row(s, &b);
                if (k < 0)
                        return k;
                r->bulbs[r->n++] = b;
                /* ORDER BY id is memcmp() order; check rather than trust it. */
                if (r->n > 1 && strcmp(r->bulbs[r->n - 2]->id, b->id) >= 0)
                        return -EUCLEAN;
        }
        if (rc != SQLITE_DONE)
                return db_errno(rc);

        *ret = TAKE_PTR(r);
        return 0;
}

struct bulb *registry_find(struct registry *r, const char *id) {
        bool found;
        size_t i;

        if (!r || !id)
                return NULL;
        i = registry_index(r, id, &found);
        return found ? r->bulbs[i] : NULL;
}

size_t registry_count(const struct registry *r) {
        return r ? r->n : 0;
}

struct bulb *registry_get(struct registry *r, size_t i) {
        if (!r || i >= r->n)
                return NULL;
        return r->bulbs[i];
}

static void lru_unlink(struct registry *r, struct bulb *b) {
        if (b->lru_prev)
                b->lru_prev->lru_next = b->lru_next;
        else
                r->lru_head = b->lru_next;
        if (b->lru_next)
                b->lru_next->lru_prev = b->lru_prev;
        else
                r->lru_tail = b->lru_prev;
        b->lru_prev = b->lru_next = NULL;
}

static void lru_push_front(struct registry *r, struct bulb *b) {
        b->lru_prev = NULL;
        b->lru_next = r->lru_head;
        if (r->lru_head)
                r->lru_head->lru_prev = b;
        else
                r->lru_tail = b;
        r->lru_head = b;
}

/* Frees the bulb's verify context, if it has one. */
static void key_drop(struct registry *r, struct bulb *b) {
        if (!b->key)
                return;
        lru_unlink(r, b);
        verify_key_free(b->key);
        b->key = NULL;
        r->stats.cached--;
}

static void key_cache_trim(struct registry *r, size_t max) {
        while (r->stats.cached > max && r->lru_tail) {
                key_drop(r, r->lru_tail);
                r->stats.evictions++;
        }
}

void registry_set_key_cache_max(struct registry *r, size_t n) {
        if (!r)
                return;
        r->key_cache_max = n;
        key_cache_trim(r, n);
}

void registry_key_stats(const struct registry *r, struct registry_key_stats *ret) {
        if (!r || !ret)
                return;
        *ret = r->stats;
        ret->max = r->key_cache_max;
}

int registry_verify(struct registry *r, struct bulb *b, enum frame_alg alg, const uint8_t *msg, size_t msg_len,
                    const uint8_t *sig, size_t sig_len) {
        _cleanup_(verify_key_freep) struct verify_key *k = NULL;
        int e;

        if (!r || !b)
                return -EINVAL;
        /* Checked here too, not only by the caller: a revoked key must never verify again. */
        if (b->revoked)
                return -EKEYREVOKED;
        if (b->key_damaged)
                return -EUCLEAN;
        if (b->key) {
                r->stats.hits++;
                if (r->lru_head != b) {
                        lru_unlink(r, b);
                        lru_push_front(r, b);
                }
                return verify_signature(b->key, alg, msg, msg_len, sig, sig_len);
        }

        e = verify_key_from_raw(&b->pub, &k);
        if (e == -ENOMEM)
                return e;
        if (e < 0) {
                /* Enrolment checked this key fully, so the row changed since: it stays refused
                 * (and is not rebuilt for every frame) until the bulb is re-enrolled. */
                b->key_damaged = true;
                r->stats.damaged++;
                return -EUCLEAN;
        }
        r->stats.misses++;
        if (r->key_cache_max == 0)
                return verify_signature(k, alg, msg, msg_len, sig, sig_len); /* k freed on return */
        key_cache_trim(r, r->key_cache_max - 1);
        b->key = TAKE_PTR(k);
        lru_push_front(r, b);
        r->stats.cached++;
        return verify_signature(b->key, alg, msg, msg_len, sig, sig_len);
}

static int bind_text(sqlite3_stmt *s, int i, const char *t) {
        return sqlite3_bind_text(s, i, t, -1, SQLITE_STATIC);
}

int registry_add(struct registry *r, const char *id, const char *pem, size_t pem_len) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        _cleanup_(verify_key_freep) struct verify_key *key = NULL;
        _cleanup_(bulb_freep) struct bulb *fresh = NULL;
        _cleanup_free_ char *spki = NULL;
        struct verify_raw pub;
        struct bulb *b = NULL;
        enum frame_alg alg = FRAME_ALG_ES256;
        int64_t now = (int64_t) time(NULL);
        bool found;
        size_t idx;
        int k, rc;

        if (!r || !id_is_valid(id) || !pem)
                return -EINVAL;
        k = verify_key_from_pem(pem, pem_len, &key, &alg);
        if (k < 0)
                return k;
        /* Stored as OpenSSL writes it: one canonical form, whatever white space came in. */
        k = verify_key_to_pem(key, &spki);
        if (k < 0)
                return k;
        k = verify_key_to_raw(key, &pub);
        if (k < 0)
                return k;

        idx = registry_index(r, id, &found);
        if (found) {
                b = r->bulbs[idx];
                if (!b->revoked)
                        return -EEXIST;
                /* Re-enrolment with a new key. last_seq stays: the bulb's counter must go on
                 * from where it was, or its old frames could be replayed (PROTOCOL.md 1). */
                rc = sqlite3_prepare_v2(
                        db_handle(r->db),
                        "UPDATE bulbs SET alg = ?1, pubkey_pem = ?2, enrolled_at = ?3, revoked = 0, "
                        "revoked_at = NULL WHERE id = ?4 AND revoked = 1",
                        -1, &s, NULL);
        } else {
                k = registry_reserve(r, r->n + 1);
                if (k < 0)
                        return k;
                fresh = calloc(1, sizeof *fresh);
                if (!fresh)
                        return -ENOMEM;
                rc = sqlite3_prepare_v2(
                        db_handle(r->db),
                        "INSERT INTO bulbs (alg, pubkey_pem, enrolled_at, id) VALUES (?1, ?2, ?3, ?4)", -1,
                        &s, NULL);
        }
        if (rc != SQLITE_OK)
                /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees fresh */
                return db_errno(rc);
        if ((rc = bind_text(s, 1, frame_alg_to_string(alg))) != SQLITE_OK ||
            (rc = bind_text(s, 2, spki)) != SQLITE_OK || (rc = sqlite3_bind_int64(s, 3, now)) != SQLITE_OK ||
            (rc = bind_text(s, 4, id)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        if (rc != SQLITE_DONE)
                return db_errno(rc);
        if (sqlite3_changes(db_handle(r->db)) != 1)
                return -EIO; /* the database disagrees with memory: nothing changed there */

        /* The bulb's row of bulb_seqs (db.c, migration 5), made now so that its frames update
         * a row in place rather than insert one. Best effort: the frame path's upsert makes the
         * row if it is missing, so a failure here changes nothing but the first frame's cost.
         * A re-enrolled bulb has its row, with its last_seq, which stays (see above). */
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *q = NULL;
        if (sqlite3_prepare_v2(db_handle(r->db),
                               "INSERT INTO bulb_seqs (id, last_seq) VALUES (?1, 0) ON CONFLICT (id) DO NOTHING", -1,
                               &q, NULL) == SQLITE_OK &&
            bind_text(q, 1, id) == SQLITE_OK)
                (void) sqlite3_step(q);

        /* Persisted. From here on nothing can fail. */
        if (!b) {
                b = TAKE_PTR(fresh);
                memcpy(b->id, id, strlen(id) + 1);
                /* last_seq 0, token bucket unused: it starts full (bulb_rate_take()). */
                memmove(r->bulbs + idx + 1, r->bulbs + idx, (r->n - idx) * sizeof *r->bulbs);
                r->bulbs[idx] = b;
                r->n++;
        }
        /* The old key's context goes (a re-enrolled bulb verifies with the new key only); the
         * new one is built by the first frame. */
        key_drop(r, b);
        b->pub = pub;
        b->key_damaged = false;
        b->alg = alg;
        b->revoked = false;
        b->enrolled_at = now;
        return 0;
}

int registry_revoke(struct registry *r, const char *id) {
        _cleanup_(sqlite3_finalizep) sqlite3_stmt *s = NULL;
        struct bulb *b;
        int rc;

        if (!r || !id)
                return -EINVAL;
        b = registry_find(r, id);
        if (!b)
                return -ENOENT;
        if (b->revoked)
                return 0;
        rc = sqlite3_prepare_v2(
                db_handle(r->db),
                "UPDATE bulbs SET revoked = 1, revoked_at = ?1 WHERE id = ?2 AND revoked = 0", -1, &s, NULL);
        if (rc != SQLITE_OK)
                return db_errno(rc);
        if ((rc = sqlite3_bind_int64(s, 1, (int64_t) time(NULL))) != SQLITE_OK ||
            (rc = bind_text(s, 2, id)) != SQLITE_OK)
                return db_errno(rc);
        rc = sqlite3_step(s);
        if (rc != SQLITE_DONE)
                return db_errno(rc);
        if (sqlite3_changes(db_handle(r->db)) != 1)
                return -EIO;
        b->revoked = true;
        key_drop(r, b);
        return 0;
}

void registry_seq_committed(struct bulb *b, int64_t seq) {
        if (b && seq > b->last_seq)
                b->last_seq = seq;
}

/* A token bucket: capacity max(1, 2*rate), refilled at 'rate' tokens per second, starting
 * full. The bucket of a bulb that never took a token (bucket_usec == 0, as calloc() and a
 * zeroed struct leave it) is full, whatever the current rate; afterwards bucket_usec is never 0
 * (time 0 counts as 1 us). A rate that is not positive (or NaN) refills nothing: one frame,
 * then silence; an infinite rate never refuses. Time that goes backwards refills nothing and
 * the bucket keeps its later time, so that no interval is ever counted twice; pass
 * CLOCK_MONOTONIC. */
bool bulb_rate_take(struct bulb *b, double rate, uint64_t now_usec) {
        double capacity, tokens;

        if (!(rate > 0)) /* also NaN */
                rate = 0;
        capacity = fmax(1.0, 2.0 * rate);

        if (b->bucket_usec == 0)
                tokens = capacity;
        else if (now_usec > b->bucket_usec)
                tokens = b->tokens + (double) (now_usec - b->bucket_usec) / 1e6 * rate;
        else
                tokens = b->tokens;
        if (now_usec > b->bucket_usec)
                b->bucket_usec = now_usec;
        if (b->bucket_usec == 0)
                b->bucket_usec = 1;
        if (tokens > capacity) /* also when the rate was lowered by a reload */
                tokens = capacity;

        /* A hair of slack, so that refills summed in floating point (e.g. ten times 0.1) still
         * make a whole token. */
        if (tokens < 1.0 - 1e-9) {
                b->tokens = tokens;
                return false;
        }
        b->tokens = tokens - 1.0;
        return true;
}
