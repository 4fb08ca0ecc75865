/* SPDX-License-Identifier: MIT */
/* db.c, registry.c and spool.c on a real SQLite file in a fresh temporary directory. */
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>
#include <unistd.h>

#include <systemd/sd-event.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <sqlite3.h>

#include "iothub/db.h"
#include "iothub/registry.h"
#include "iothub/spool.h"
#include "../../src/db-internal.h"

/* The schema version the migrations end at (src/db.c), counted here rather than taken from db.c. */
#define SCHEMA_VERSION 7


/* A bulb's stored last seq moved forward, as spool.c's seqs_forward() does when a segment's
 * summary is written (DB_STMT_BULB_SET_SEQ, an upsert that only moves forward, for an enrolled
 * bulb only). Returns the rows changed: 1, or 0 when the database already holds this seq or a
 * later one, or the bulb has no row; a negative errno on an SQLite error. */
static int store_seq(struct db *db, const char *id, int64_t seq) {
        sqlite3_stmt *s = db_stmt(db, DB_STMT_BULB_SET_SEQ);
        int rc;

        if ((rc = sqlite3_bind_int64(s, 1, seq)) != SQLITE_OK ||
            (rc = sqlite3_bind_text(s, 2, id, -1, SQLITE_STATIC)) != SQLITE_OK) {
                sqlite3_reset(s);
                return db_errno(rc);
        }
        rc = sqlite3_step(s);
        sqlite3_reset(s);
        if (rc != SQLITE_DONE)
                return db_errno(rc);
        return sqlite3_changes(db_handle(db));
}

static struct {
        char dir[64];
        char path[128];
        char *pem_p256, *pem_p256_b, *pem_ed25519, *pem_rsa;
} T;

static char *pem_of_new_key(const char *type) {
        EVP_PKEY *k = streq(type, "RSA")     ? EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t) 2048)
                      : streq(type, "P-256") ? EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256")
                                             : EVP_PKEY_Q_keygen(NULL, NULL, type);
        BIO *b = BIO_new(BIO_s_mem());
        char *data, *s;
        long n;

        assert_non_null(k);
        assert_int_equal(PEM_write_bio_PUBKEY(b, k), 1);
        n = BIO_get_mem_data(b, &data);
        s = strndup(data, (size_t) n);
        assert_non_null(s);
        BIO_free(b);
        EVP_PKEY_free(k);
        return s;
}

static void clean_dir(void) {
        char sp[96];
        DIR *d;
        struct dirent *de;

        /* The spool's segment directory first (spool.c). */
        (void) snprintf(sp, sizeof sp, "%s/spool", T.dir);
        d = opendir(sp);
        if (d) {
                while ((de = readdir(d)))
                        if (!streq(de->d_name, ".") && !streq(de->d_name, ".."))
                                (void) unlinkat(dirfd(d), de->d_name, 0);
                closedir(d);
                (void) rmdir(sp);
        }
        d = opendir(T.dir);
        if (!d)
                return;
        while ((de = readdir(d)))
                if (!streq(de->d_name, ".") && !streq(de->d_name, ".."))
                        (void) unlinkat(dirfd(d), de->d_name, 0);
        closedir(d);
}

static int group_setup(void **state) {
        T.pem_p256 = pem_of_new_key("P-256");
        T.pem_p256_b = pem_of_new_key("P-256");
        T.pem_ed25519 = pem_of_new_key("ED25519");
        T.pem_rsa = pem_of_new_key("RSA");
        return 0;
}

static int group_teardown(void **state) {
        free(T.pem_p256);
        free(T.pem_p256_b);
        free(T.pem_ed25519);
        free(T.pem_rsa);
        return 0;
}

/* Every test gets an empty state directory. */
static int setup(void **state) {
        strcpy(T.dir, "/tmp/test-registry-XXXXXX");
        assert_non_null(mkdtemp(T.dir));
        (void) snprintf(T.path, sizeof T.path, "%s/%s", T.dir, DB_FILE_NAME);
        return 0;
}

static int teardown(void **state) {
        clean_dir();
        (void) rmdir(T.dir);
        return 0;
}

static struct db *open_db(void) {
        struct db *db = NULL;
        char *err = NULL;
        int r = db_open(T.dir, &db, &err);

        if (r < 0)
                fail_msg("db_open: %d %s", r, err ? err : "-");
        assert_null(err);
        r = spool_open(db, &err);
        if (r < 0)
                fail_msg("spool_open: %d %s", r, err ? err : "-");
        assert_int_equal(spool_open(db, &err), -EALREADY);
        return db;
}

static int64_t query_int(struct db *db, const char *sql) {
        sqlite3_stmt *s = NULL;
        int64_t v;

        assert_int_equal(sqlite3_prepare_v2(db_handle(db), sql, -1, &s, NULL), SQLITE_OK);
        assert_int_equal(sqlite3_step(s), SQLITE_ROW);
        v = sqlite3_column_int64(s, 0);
        sqlite3_finalize(s);
        return v;
}

/* The bulb's key as PEM (memory keeps the compact key, not its text: issue 13, "Memory"). */
static void assert_key_pem(const struct bulb *b, const char *want) {
        char *pem = NULL;

        struct verify_key *k = NULL;

        assert_non_null(b);
        assert_int_equal(verify_key_from_raw(&b->pub, &k), 0);
        assert_int_equal(verify_key_to_pem(k, &pem), 0);
        assert_string_equal(pem, want);
        free(pem);
        verify_key_free(k);
}

static uint64_t pending_of(struct db *db) {
        uint64_t n = 99;

        assert_int_equal(spool_stats(db, &n, NULL), 0);
        return n;
}

static mode_t mode_of(const char *path) {
        struct stat st;

        assert_int_equal(stat(path, &st), 0);
        return st.st_mode & 07777;
}

static void test_open_creates_private_wal_db(void **state) {
        mode_t old = umask(0); /* even a permissive umask gives 0600 */
        struct db *db = open_db();
        char p[160];
        sqlite3_stmt *s = NULL;

        (void) umask(old);
        assert_int_equal(mode_of(T.path), 0600);
        assert_int_equal(sqlite3_prepare_v2(db_handle(db), "PRAGMA journal_mode", -1, &s, NULL), SQLITE_OK);
        assert_int_equal(sqlite3_step(s), SQLITE_ROW);
        assert_string_equal((const char *) sqlite3_column_text(s, 0), "wal");
        sqlite3_finalize(s);
        assert_int_equal(query_int(db, "PRAGMA synchronous"), 2); /* FULL */
        assert_int_equal(query_int(db, "PRAGMA foreign_keys"), 1);
        assert_int_equal(query_int(db, "PRAGMA secure_delete"), 2); /* FAST (issue 13) */
        assert_int_equal(query_int(db, "PRAGMA wal_autocheckpoint"), 4096);
        assert_int_equal(query_int(db, "PRAGMA journal_size_limit"), 16777216);
        assert_int_equal(query_int(db, "PRAGMA cache_size"), -256); /* KiB */
        assert_int_equal(query_int(db, "PRAGMA user_version"), SCHEMA_VERSION);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND "
                                       "name IN ('bulbs', 'bulb_seqs', 'spool', 'meta', 'moved_aside', 'commands', 'events')"),
                         7);
        /* Migration 5: nothing but the rowid orders the spool (no index to rewrite per frame). */
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM sqlite_schema WHERE tbl_name = 'spool' AND type = 'index'"),
                         0);

        /* The WAL and its index take the database's mode; the spool's segments are private
         * too. */
        assert_int_equal(db_meta_set(db, "k", "v"), 0);
        assert_int_equal(spool_append(db, "bulb-1", 1, (const uint8_t *) "x.y.z", 5, 1), 0);
        (void) snprintf(p, sizeof p, "%s/spool", T.dir);
        assert_int_equal(mode_of(p), 0700);
        (void) snprintf(p, sizeof p, "%s/spool/seg-%016x.log", T.dir, 1);
        assert_int_equal(mode_of(p), 0600);
        (void) snprintf(p, sizeof p, "%s-wal", T.path);
        assert_int_equal(mode_of(p), 0600);
        (void) snprintf(p, sizeof p, "%s-shm", T.path);
        assert_int_equal(mode_of(p), 0600);
        db_close(db);

        /* Opening again migrates nothing and keeps the data. */
        db = open_db();
        assert_int_equal(query_int(db, "PRAGMA user_version"), SCHEMA_VERSION);
        assert_int_equal(pending_of(db), 1);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM spool"), 0); /* the old table stays empty */
        db_close(db);
}

static void test_open_tightens_mode(void **state) {
        int fd = open(T.path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);

        assert_true(fd >= 0);
        assert_int_equal(fchmod(fd, 0644), 0);
        close(fd);
        db_close(open_db());
        assert_int_equal(mode_of(T.path), 0600);
}

static void test_open_refuses(void **state) {
        struct db *db = NULL;
        char *err = NULL;
        sqlite3 *raw = NULL;
        int fd;

        /* A schema newer than this code: refused, and left as it was. */
        db_close(open_db());
        assert_int_equal(sqlite3_open(T.path, &raw), SQLITE_OK);
        assert_int_equal(sqlite3_exec(raw, "PRAGMA user_version = 99", NULL, NULL, NULL), SQLITE_OK);
        sqlite3_close(raw);
        assert_int_equal(db_open(T.dir, &db, &err), -EPROTO);
        assert_null(db);
        assert_non_null(err);
        assert_non_null(strstr(err, "newer"));
        free(err);
        err = NULL;
        assert_int_equal(sqlite3_open(T.path, &raw), SQLITE_OK);
        sqlite3_stmt *s = NULL;
        assert_int_equal(sqlite3_prepare_v2(raw, "PRAGMA user_version", -1, &s, NULL), SQLITE_OK);
        assert_int_equal(sqlite3_step(s), SQLITE_ROW);
        assert_int_equal(sqlite3_column_int(s, 0), 99);
        sqlite3_finalize(s);
        sqlite3_close(raw);
        clean_dir();

        /* A file that is no database. */
        fd = open(T.path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        for (int i = 0; i < 64; i++)
                assert_int_equal(write(fd, "this is not an SQLite database, not at all.\n", 44), 44);
        close(fd);
        assert_int_equal(db_open(T.dir, &db, &err), -EUCLEAN);
        assert_null(db);
        assert_non_null(err);
        free(err);
        err = NULL;
        clean_dir();

        /* A symbolic link in its place: not followed, and its target left alone. */
        char target[160];
        (void) snprintf(target, sizeof target, "%s/target", T.dir);
        fd = open(target, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
        assert_true(fd >= 0);
        assert_int_equal(fchmod(fd, 0644), 0);
        close(fd);
        assert_int_equal(symlink(target, T.path), 0);
        assert_int_equal(db_open(T.dir, &db, &err), -ELOOP);
        assert_null(db);
        assert_non_null(err);
        assert_int_equal(mode_of(target), 0644);
        free(err);
        err = NULL;
        clean_dir();

        /* A directory that does not exist. */
        char missing[128];
        (void) snprintf(missing, sizeof missing, "%s/nope", T.dir);
        assert_int_equal(db_open(missing, &db, NULL), -ENOENT);
        assert_null(db);
}

static void test_db_errno(void **state) {
        static const struct {
                int rc, want;
        } cases[] = {
                { SQLITE_OK, 0 },
                { SQLITE_DONE, 0 },
                { SQLITE_BUSY, -EBUSY },
                { SQLITE_BUSY_SNAPSHOT, -EBUSY },
                { SQLITE_LOCKED, -EBUSY },
                { SQLITE_NOMEM, -ENOMEM },
                { SQLITE_IOERR_NOMEM, -ENOMEM },
                { SQLITE_FULL, -ENOSPC },
                { SQLITE_CONSTRAINT, -EEXIST },
                { SQLITE_CONSTRAINT_UNIQUE, -EEXIST },
                { SQLITE_CONSTRAINT_PRIMARYKEY, -EEXIST },
                { SQLITE_CONSTRAINT_NOTNULL, -EINVAL },
                { SQLITE_READONLY, -EACCES },
                { SQLITE_READONLY_DBMOVED, -EACCES },
                { SQLITE_PERM, -EACCES },
                { SQLITE_AUTH, -EACCES },
                { SQLITE_CORRUPT, -EUCLEAN },
                { SQLITE_NOTADB, -EUCLEAN },
                { SQLITE_CANTOPEN, -ENOENT },
                { SQLITE_TOOBIG, -EFBIG },
                { SQLITE_IOERR, -EIO },
                { SQLITE_IOERR_FSYNC, -EIO },
                { SQLITE_ERROR, -EIO },
                { SQLITE_MISUSE, -EIO },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++)
                if (db_errno(cases[i].rc) != cases[i].want)
                        fail_msg("rc %d: got %d, want %d", cases[i].rc, db_errno(cases[i].rc),
                                 cases[i].want);
}

static void test_registry(void **state) {
        struct db *db = open_db();
        struct registry *r = NULL;
        struct bulb *b7 = NULL, *b;
        _cleanup_free_ char *spaced = NULL;

        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(registry_count(r), 0);
        assert_null(registry_find(r, "bulb-7"));
        assert_null(registry_get(r, 0));

        static const struct {
                const char *id;
                int key; /* 0 P-256, 1 Ed25519, 2 RSA, 3 garbage, 4 the first P-256 key again */
                int want;
        } adds[] = {
                { "bulb-7", 0, 0 },
                { "a-first", 1, 0 },
                { "zz.last", 4, 0 }, /* one key on two bulbs is allowed */
                { "Mid_1", 1, 0 },
                { "bulb-7", 1, -EEXIST },
                { "bulb-8", 2, -EOPNOTSUPP },
                { "bulb-9", 3, -EINVAL },
                { ".hidden", 0, -EINVAL },
                { "", 0, -EINVAL },
                { "has space", 0, -EINVAL },
                { "b1234567890123456789012345678901234567890123456789012345678901234", 0, -EINVAL },
        };
        for (size_t i = 0; i < ELEMENTSOF(adds); i++) {
                const char *pem = (const char *[]){ T.pem_p256, T.pem_ed25519, T.pem_rsa, "garbage",
                                                    T.pem_p256 }[adds[i].key];
                int k = registry_add(r, adds[i].id, pem, strlen(pem));

                if (k != adds[i].want)
                        fail_msg("add %s: got %d, want %d", adds[i].id, k, adds[i].want);
                if (i == 0) {
                        b7 = registry_find(r, "bulb-7");
                        assert_non_null(b7);
                }
        }

        /* Sorted by id (strcmp order: upper case first), and pointers survived the adds. */
        static const char *const order[] = { "Mid_1", "a-first", "bulb-7", "zz.last" };
        assert_int_equal(registry_count(r), ELEMENTSOF(order));
        for (size_t i = 0; i < ELEMENTSOF(order); i++)
                assert_string_equal(registry_get(r, i)->id, order[i]);
        assert_ptr_equal(registry_find(r, "bulb-7"), b7);
        assert_int_equal(b7->alg, FRAME_ALG_ES256);
        assert_int_equal(registry_find(r, "a-first")->alg, FRAME_ALG_EDDSA);
        assert_key_pem(b7, T.pem_p256);
        assert_false(b7->revoked);
        assert_int_equal(b7->last_seq, 0);
        assert_true(b7->enrolled_at > 1700000000);
        assert_null(registry_find(r, "bulb-77"));
        assert_null(registry_find(r, "bulb-"));

        /* White space around the PEM is fine; what is stored is canonical. */
        assert_true(asprintf(&spaced, "\n  %s\n\n", T.pem_ed25519) > 0);
        assert_int_equal(registry_add(r, "spaced", spaced, strlen(spaced)), 0);
        assert_key_pem(registry_find(r, "spaced"), T.pem_ed25519);

        /* Revocation: persisted, idempotent, unknown ids refused. */
        assert_int_equal(registry_revoke(r, "bulb-7"), 0);
        assert_true(b7->revoked);
        assert_int_equal(registry_revoke(r, "bulb-7"), 0);
        assert_int_equal(registry_revoke(r, "nobody"), -ENOENT);
        assert_int_equal(query_int(db, "SELECT revoked FROM bulbs WHERE id = 'bulb-7'"), 1);
        assert_true(query_int(db, "SELECT revoked_at FROM bulbs WHERE id = 'bulb-7'") > 0);

        /* Re-enrolment of a revoked bulb: new key, same last_seq, same struct. */
        assert_int_equal(db_begin(db), 0);
        assert_int_equal(store_seq(db, "bulb-7", 41), 1);
        assert_int_equal(db_commit(db), 0);
        registry_seq_committed(b7, 41);
        assert_int_equal(registry_add(r, "bulb-7", T.pem_ed25519, strlen(T.pem_ed25519)), 0);
        b = registry_find(r, "bulb-7");
        assert_ptr_equal(b, b7);
        assert_false(b->revoked);
        assert_int_equal(b->alg, FRAME_ALG_EDDSA);
        assert_int_equal(b->last_seq, 41);
        assert_key_pem(b, T.pem_ed25519);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'bulb-7'"), 41);
        assert_int_equal(query_int(db, "SELECT revoked_at IS NULL FROM bulbs WHERE id = 'bulb-7'"), 1);
        assert_int_equal(registry_add(r, "bulb-7", T.pem_p256_b, strlen(T.pem_p256_b)), -EEXIST);

        /* Reopened from the file: the same bulbs, in the same order, with the same state. */
        registry_free(r);
        db_close(db);
        db = open_db();
        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(registry_count(r), 5);
        b = registry_find(r, "bulb-7");
        assert_non_null(b);
        assert_int_equal(b->alg, FRAME_ALG_EDDSA);
        assert_int_equal(b->last_seq, 41);
        assert_false(b->revoked);
        assert_key_pem(b, T.pem_ed25519);
        assert_null(b->key); /* built by the first frame, not before READY=1 */
        assert_string_equal(registry_get(r, 0)->id, "Mid_1");
        assert_string_equal(registry_get(r, 4)->id, "zz.last");
        assert_int_equal(registry_revoke(r, "zz.last"), 0);
        registry_free(r);
        db_close(db);
        db = open_db();
        assert_int_equal(registry_open(db, &r), 0);
        assert_true(registry_find(r, "zz.last")->revoked);
        registry_free(r);
        db_close(db);
}

/* The LRU of verify contexts (registry_verify()). Bulbs sign with private keys of their own, as a
 * bulb does (ES256 as R || S, RFC 7518 3.4). */
#define CACHE_BULBS 6
static struct {
        EVP_PKEY *key;
        char *pem;
        char id[16];
} CB[CACHE_BULBS];

static const uint8_t cache_msg[] = "eyJhbGciOiJFUzI1NiJ9.eyJzZXEiOjF9";

static size_t sign_frame(EVP_PKEY *k, uint8_t out[static 64]) {
        EVP_MD_CTX *c = EVP_MD_CTX_new();
        uint8_t buf[128];
        size_t n = sizeof buf;
        bool ec = EVP_PKEY_is_a(k, "EC");

        assert_non_null(c);
        assert_int_equal(EVP_DigestSignInit_ex(c, NULL, ec ? "SHA256" : NULL, NULL, NULL, k, NULL), 1);
        assert_int_equal(EVP_DigestSign(c, buf, &n, cache_msg, sizeof cache_msg - 1), 1);
        EVP_MD_CTX_free(c);
        if (!ec) {
                assert_int_equal(n, 64);
                memcpy(out, buf, 64);
                return 64;
        }
        const uint8_t *p = buf;
        ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long) n);
        assert_non_null(sig);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_r(sig), out, 32), 32);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_s(sig), out + 32, 32), 32);
        ECDSA_SIG_free(sig);
        return 64;
}

static char *pem_of_pkey(EVP_PKEY *k) {
        BIO *b = BIO_new(BIO_s_mem());
        char *data, *s;
        long n;

        assert_int_equal(PEM_write_bio_PUBKEY(b, k), 1);
        n = BIO_get_mem_data(b, &data);
        s = strndup(data, (size_t) n);
        assert_non_null(s);
        BIO_free(b);
        return s;
}

static void cache_keys_make(void) {
        for (size_t i = 0; i < CACHE_BULBS; i++) {
                /* Both algorithms in one LRU. */
                CB[i].key = i % 3 == 2 ? EVP_PKEY_Q_keygen(NULL, NULL, "ED25519")
                                       : EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
                assert_non_null(CB[i].key);
                CB[i].pem = pem_of_pkey(CB[i].key);
                (void) snprintf(CB[i].id, sizeof CB[i].id, "bulb-%zu", i);
        }
}

static void cache_keys_free(void) {
        for (size_t i = 0; i < CACHE_BULBS; i++) {
                EVP_PKEY_free(CB[i].key);
                free(CB[i].pem);
        }
}

/* The frame of bulb i signed by key j, verified by the registry. */
static int frame_of(struct registry *r, size_t i, size_t j) {
        struct bulb *b = registry_find(r, CB[i].id);
        uint8_t sig[64];

        assert_non_null(b);
        (void) sign_frame(CB[j].key, sig);
        return registry_verify(r, b, EVP_PKEY_is_a(CB[j].key, "EC") ? FRAME_ALG_ES256 : FRAME_ALG_EDDSA,
                               cache_msg, sizeof cache_msg - 1, sig, 64);
}

/* Which bulbs hold a context, most recently used first, as a string of indexes ("310"); checks
 * the list both ways and the count. */
static void assert_lru(struct registry *r, const char *want) {
        struct registry_key_stats st;
        char got[CACHE_BULBS + 1] = "";
        size_t n = 0;

        for (size_t i = 0; i < CACHE_BULBS; i++) {
                struct bulb *b = registry_find(r, CB[i].id);
                bool listed = strchr(want, (char) ('0' + i)) != NULL;

                if (listed != (b->key != NULL))
                        fail_msg("bulb %zu: context %s, want %s", i, b->key ? "cached" : "absent", want);
        }
        /* Walk from the most recent: the first bulb with no predecessor that holds a context. */
        struct bulb *head = NULL, *tail = NULL;
        for (size_t i = 0; i < CACHE_BULBS; i++) {
                struct bulb *b = registry_find(r, CB[i].id);
                if (b->key && !b->lru_prev)
                        head = b;
                if (b->key && !b->lru_next)
                        tail = b;
        }
        for (struct bulb *b = head; b; b = b->lru_next) {
                assert_true(n < CACHE_BULBS);
                assert_true(b->lru_next == NULL || b->lru_next->lru_prev == b);
                got[n++] = (char) ('0' + (b->id[5] - '0'));
                if (!b->lru_next)
                        assert_ptr_equal(b, tail);
        }
        got[n] = '\0';
        assert_string_equal(got, want);
        registry_key_stats(r, &st);
        assert_int_equal(st.cached, strlen(want));
        assert_true(st.cached <= st.max);
}

static void test_key_cache(void **state) {
        struct db *db = open_db();
        struct registry *r = NULL;
        struct registry_key_stats st;

        cache_keys_make();
        assert_int_equal(registry_open(db, &r), 0);
        registry_key_stats(r, &st);
        assert_int_equal(st.max, REGISTRY_KEY_CACHE_DEFAULT);
        for (size_t i = 0; i < CACHE_BULBS; i++)
                assert_int_equal(registry_add(r, CB[i].id, CB[i].pem, strlen(CB[i].pem)), 0);
        registry_set_key_cache_max(r, 3);
        assert_lru(r, ""); /* enrolment builds no context */

        /* Misses build, hits reuse; a wrong signature or another bulb's is refused either way. */
        assert_int_equal(frame_of(r, 0, 0), 0);
        assert_int_equal(frame_of(r, 1, 1), 0);
        assert_int_equal(frame_of(r, 2, 2), 0);
        assert_lru(r, "210");
        registry_key_stats(r, &st);
        assert_int_equal(st.misses, 3);
        assert_int_equal(st.hits, 0);
        assert_int_equal(frame_of(r, 0, 0), 0);
        assert_int_equal(frame_of(r, 0, 3), -EBADMSG); /* bulb 3's key (same alg) */
        assert_int_equal(frame_of(r, 2, 5), -EBADMSG);
        assert_int_equal(frame_of(r, 2, 0), -EBADMSG); /* an ES256 frame for an Ed25519 key */
        registry_key_stats(r, &st);
        assert_int_equal(st.misses, 3);
        assert_int_equal(st.hits, 4);
        assert_lru(r, "201");

        /* Full: the least recently used goes, whatever the order of enrolment or ids. */
        assert_int_equal(frame_of(r, 3, 3), 0);
        assert_lru(r, "320");
        assert_int_equal(frame_of(r, 1, 1), 0); /* evicted earlier: built again, still right */
        assert_lru(r, "132");
        assert_int_equal(frame_of(r, 4, 1), -EBADMSG); /* a miss with a wrong signature: cached too */
        assert_lru(r, "413");
        registry_key_stats(r, &st);
        assert_int_equal(st.misses, 6);
        assert_int_equal(st.evictions, 3);

        /* The bound holds through a long mixed run. */
        for (size_t k = 0; k < 200; k++) {
                size_t i = (k * 7 + k / 5) % CACHE_BULBS;
                assert_int_equal(frame_of(r, i, i), 0);
                registry_key_stats(r, &st);
                assert_true(st.cached <= 3);
                assert_non_null(registry_find(r, CB[i].id)->key);
        }
        /* Shrinking evicts from the cold end; 0 caches nothing but still verifies. */
        assert_int_equal(frame_of(r, 5, 5), 0);
        assert_int_equal(frame_of(r, 0, 0), 0);
        registry_set_key_cache_max(r, 1);
        assert_lru(r, "0");
        registry_set_key_cache_max(r, 0);
        assert_lru(r, "");
        assert_int_equal(frame_of(r, 4, 4), 0);
        assert_int_equal(frame_of(r, 4, 0), -EBADMSG);
        assert_lru(r, "");
        registry_set_key_cache_max(r, 3);

        /* Revocation drops the context at once, and a revoked key never verifies again, cached
         * or not (bulb remove). */
        assert_int_equal(frame_of(r, 1, 1), 0);
        assert_int_equal(frame_of(r, 0, 0), 0);
        assert_lru(r, "01");
        assert_int_equal(registry_revoke(r, CB[1].id), 0);
        assert_lru(r, "0");
        assert_int_equal(frame_of(r, 1, 1), -EKEYREVOKED);
        assert_lru(r, "0");
        assert_int_equal(registry_revoke(r, CB[3].id), 0); /* not cached: nothing to drop */
        assert_int_equal(frame_of(r, 3, 3), -EKEYREVOKED);

        /* Re-enrolment: the new key verifies, the old one no longer does. Bulb 0 is cached with
         * its old key when it is revoked and enrolled again with bulb 4's key. */
        assert_int_equal(registry_revoke(r, CB[0].id), 0);
        assert_int_equal(registry_add(r, CB[0].id, CB[4].pem, strlen(CB[4].pem)), 0);
        assert_lru(r, "");
        assert_int_equal(frame_of(r, 0, 0), -EBADMSG);
        assert_int_equal(frame_of(r, 0, 4), 0);
        assert_lru(r, "0");
        /* And across algorithms: bulb 1 (P-256) comes back with bulb 2's Ed25519 key. */
        assert_int_equal(registry_add(r, CB[1].id, CB[2].pem, strlen(CB[2].pem)), 0);
        assert_int_equal(frame_of(r, 1, 1), -EBADMSG);
        assert_int_equal(frame_of(r, 1, 2), 0);
        assert_lru(r, "10");

        /* Freed with cached contexts (ASan finds a leak or a double free). */
        registry_free(r);
        db_close(db);
        cache_keys_free();
}

/* A key in the database that passes the encoding check at start-up but does not load (the row
 * was changed behind the daemon's back): its frames are refused with -EUCLEAN, it is not
 * rebuilt for every frame, the other bulbs go on, and enrolling it again mends it. */
static void test_key_damaged(void **state) {
        struct db *db = open_db();
        struct registry *r = NULL;
        struct registry_key_stats st;
        sqlite3_stmt *s = NULL;
        unsigned char *der = NULL;
        int n;

        cache_keys_make();
        assert_int_equal(registry_open(db, &r), 0);
        for (size_t i = 0; i < 3; i++)
                assert_int_equal(registry_add(r, CB[i].id, CB[i].pem, strlen(CB[i].pem)), 0);
        registry_free(r);

        /* Bulb 0's point leaves the curve (y changes); bulb 2 (Ed25519) gets the identity, a
         * small-order key. */
        n = i2d_PUBKEY(CB[0].key, &der);
        assert_int_equal(n, 91);
        der[90] ^= 0x01;
        BIO *bio = BIO_new(BIO_s_mem());
        char *data;
        assert_true(PEM_write_bio(bio, "PUBLIC KEY", "", der, n) > 0);
        long len = BIO_get_mem_data(bio, &data);
        OPENSSL_free(der);
        static const uint8_t ed_identity[44] = { 0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70,
                                                 0x03, 0x21, 0x00, 0x01 };
        BIO *bio2 = BIO_new(BIO_s_mem());
        char *data2;
        assert_true(PEM_write_bio(bio2, "PUBLIC KEY", "", ed_identity, sizeof ed_identity) > 0);
        long len2 = BIO_get_mem_data(bio2, &data2);

        assert_int_equal(sqlite3_prepare_v2(db_handle(db), "UPDATE bulbs SET pubkey_pem = ?1 WHERE id = ?2", -1,
                                            &s, NULL),
                         SQLITE_OK);
        assert_int_equal(sqlite3_bind_text(s, 1, data, (int) len, SQLITE_STATIC), SQLITE_OK);
        assert_int_equal(sqlite3_bind_text(s, 2, CB[0].id, -1, SQLITE_STATIC), SQLITE_OK);
        assert_int_equal(sqlite3_step(s), SQLITE_DONE);
        assert_int_equal(sqlite3_reset(s), SQLITE_OK);
        assert_int_equal(sqlite3_bind_text(s, 1, data2, (int) len2, SQLITE_STATIC), SQLITE_OK);
        assert_int_equal(sqlite3_bind_text(s, 2, CB[2].id, -1, SQLITE_STATIC), SQLITE_OK);
        assert_int_equal(sqlite3_step(s), SQLITE_DONE);
        sqlite3_finalize(s);
        BIO_free(bio);
        BIO_free(bio2);

        /* The start does not find it (no curve arithmetic before READY=1)... */
        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(registry_count(r), 3);
        /* ... the first frame does, with the right signature too. */
        assert_int_equal(frame_of(r, 0, 0), -EUCLEAN);
        assert_int_equal(frame_of(r, 0, 0), -EUCLEAN);
        assert_int_equal(frame_of(r, 2, 2), -EUCLEAN);
        assert_true(registry_find(r, CB[0].id)->key_damaged);
        assert_int_equal(frame_of(r, 1, 1), 0);
        registry_key_stats(r, &st);
        assert_int_equal(st.damaged, 2); /* once per bulb, not per frame */
        assert_int_equal(st.misses, 1);
        assert_int_equal(st.cached, 1);
        assert_null(registry_find(r, CB[0].id)->key);

        /* Revoked and enrolled again: mended. */
        assert_int_equal(registry_revoke(r, CB[0].id), 0);
        assert_int_equal(frame_of(r, 0, 0), -EKEYREVOKED);
        assert_int_equal(registry_add(r, CB[0].id, CB[0].pem, strlen(CB[0].pem)), 0);
        assert_false(registry_find(r, CB[0].id)->key_damaged);
        assert_int_equal(frame_of(r, 0, 0), 0);
        registry_free(r);

        /* And after a restart it loads as enrolled. */
        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(frame_of(r, 0, 0), 0);
        assert_int_equal(frame_of(r, 2, 2), -EUCLEAN);
        registry_free(r);
        db_close(db);
        cache_keys_free();
}

static void test_seq(void **state) {
        struct db *db = open_db();
        struct registry *r = NULL;
        struct bulb *b;

        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(registry_add(r, "bulb-7", T.pem_p256, strlen(T.pem_p256)), 0);
        b = registry_find(r, "bulb-7");

        /* Stored in a transaction that is rolled back: not persisted. */
        assert_int_equal(db_begin(db), 0);
        assert_int_equal(store_seq(db, "bulb-7", 5), 1);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs"), 5); /* visible inside */
        assert_int_equal(db_rollback(db), 0);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs"), 0); /* made at enrolment */
        assert_int_equal(db_rollback(db), 0); /* no transaction: a no-op */

        /* Several frames in one transaction (group commit), then committed. */
        assert_int_equal(db_begin(db), 0);
        assert_int_equal(store_seq(db, "bulb-7", 3), 1);
        registry_seq_committed(b, 3);
        assert_int_equal(store_seq(db, "bulb-7", 9), 1);
        registry_seq_committed(b, 9);
        assert_int_equal(store_seq(db, "bulb-7", 9), 0); /* never sideways */
        assert_int_equal(store_seq(db, "bulb-7", 4), 0); /* nor back */
        assert_int_equal(db_commit(db), 0);
        assert_int_equal(b->last_seq, 9);
        registry_seq_committed(b, 2); /* memory does not go back either */
        assert_int_equal(b->last_seq, 9);

        assert_int_equal(db_begin(db), 0);
        assert_int_equal(store_seq(db, "bulb-7", FRAME_SEQ_MAX), 1);
        assert_int_equal(db_rollback(db), 0);

        /* A bulb without its bulb_seqs row (made at enrolment since migration 5; a database
         * where that failed): the upsert makes it. */
        assert_int_equal(db_begin(db), 0);
        assert_int_equal(sqlite3_exec(db_handle(db), "DELETE FROM bulb_seqs", NULL, NULL, NULL), SQLITE_OK);
        assert_int_equal(store_seq(db, "bulb-7", 11), 1);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'bulb-7'"), 11);
        assert_int_equal(db_rollback(db), 0);

        /* A bulb whose row is gone. */
        assert_int_equal(store_seq(db, "ghost", 1), 0);
        assert_int_equal(query_int(db, "SELECT count(*) FROM bulb_seqs WHERE id = 'ghost'"), 0);

        /* A transaction inside a transaction is an error, and leaves the outer one alone. */
        assert_int_equal(db_begin(db), 0);
        assert_true(db_begin(db) < 0);
        assert_int_equal(db_commit(db), 0);

        registry_free(r);
        db_close(db);

        db = open_db();
        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(registry_find(r, "bulb-7")->last_seq, 9);
        registry_free(r);
        db_close(db);
}

static void test_registry_damaged_rows(void **state) {
        static const char *const rows[] = {
                "INSERT INTO bulbs (id, alg, pubkey_pem, enrolled_at) VALUES ('b', 'ES256', 'junk', 1)",
                "INSERT INTO bulbs (id, alg, pubkey_pem, enrolled_at) VALUES ('bad id', 'ES256', ?1, 1)",
                "INSERT INTO bulbs (id, alg, pubkey_pem, enrolled_at) VALUES ('b', 'EdDSA', ?1, 1)",
                "INSERT INTO bulbs (id, alg, pubkey_pem, enrolled_at) VALUES ('b', 'none', ?1, 1)",
                "INSERT INTO bulbs (id, alg, pubkey_pem, enrolled_at, revoked) VALUES ('b', 'ES256', ?1, 1, "
                "7)",
                "INSERT INTO bulbs (id, alg, pubkey_pem, enrolled_at) VALUES ('b', 'ES256', ?1, 1);"
                "INSERT INTO bulb_seqs (id, last_seq) VALUES ('b', -3)",
        };

        for (size_t i = 0; i < ELEMENTSOF(rows); i++) {
                struct db *db = open_db();
                struct registry *r = NULL;
                sqlite3_stmt *s = NULL;

                for (const char *sql = rows[i]; sql && *sql;) {
                        const char *tail = NULL;

                        assert_int_equal(sqlite3_prepare_v2(db_handle(db), sql, -1, &s, &tail), SQLITE_OK);
                        if (sqlite3_bind_parameter_count(s) > 0)
                                assert_int_equal(sqlite3_bind_text(s, 1, T.pem_p256, -1, SQLITE_STATIC), SQLITE_OK);
                        assert_int_equal(sqlite3_step(s), SQLITE_DONE);
                        sqlite3_finalize(s);
                        sql = tail;
                }
                if (registry_open(db, &r) != -EUCLEAN)
                        fail_msg("row %zu was not refused", i);
                assert_null(r);
                db_close(db);
                clean_dir();
        }
}

/* The file deleted under an open connection: db_check_file() says so, db_restore_file() puts a
 * private, complete copy back under the name (committed rows of the open WAL included) and the
 * same struct db goes on with it; another file in its place is -ESTALE and left alone. */
static void test_restore_deleted(void **state) {
        struct db *db = open_db();
        char *err = NULL, p[160];
        uint8_t blob[64] = { 1, 2, 3 };
        struct stat st;
        ino_t ino;

        assert_int_equal(db_check_file(db), 0);
        assert_int_equal(stat(T.path, &st), 0);
        ino = st.st_ino;
        assert_int_equal(db_meta_set(db, "k", "1"), 0);
        assert_int_equal(spool_append(db, "bulb-1", 1, blob, sizeof blob, 1000), 0);
        assert_int_equal(spool_append(db, "bulb-1", 2, blob, sizeof blob, 2000), 0);

        assert_int_equal(unlink(T.path), 0);
        (void) snprintf(p, sizeof p, "%s-wal", T.path);
        assert_int_equal(unlink(p), 0);
        assert_int_equal(db_check_file(db), -ENOENT);
        assert_int_equal(db_restore_file(db, &err), 0);
        assert_null(err);
        assert_int_equal(db_check_file(db), 0);
        assert_int_equal(stat(T.path, &st), 0);
        assert_int_not_equal(st.st_ino, ino);
        assert_int_equal(mode_of(T.path), 0600);
        (void) snprintf(p, sizeof p, "%s.restore", T.path);
        assert_int_equal(access(p, F_OK), -1); /* no copy left behind */
        /* The same handle works on the restored file (the spool's segments, beside it, go on as
         * they were), and a new connection sees everything. */
        assert_int_equal(query_int(db, "SELECT value FROM meta WHERE key = 'k'"), 1);
        assert_int_equal(pending_of(db), 2);
        assert_int_equal(spool_append(db, "bulb-1", 3, blob, sizeof blob, 3000), 0);
        assert_int_equal(pending_of(db), 3);
        db_close(db);
        db = open_db();
        assert_int_equal(pending_of(db), 3);
        assert_int_equal(query_int(db, "PRAGMA user_version"), SCHEMA_VERSION);

        /* Another file under the name: reported, not undone. */
        assert_int_equal(rename(T.path, p), 0);
        assert_int_equal(link(p, T.path), 0);
        assert_int_equal(db_check_file(db), 0); /* a hard link is the same file */
        assert_int_equal(unlink(T.path), 0);
        int fd = open(T.path, O_WRONLY | O_CREAT | O_EXCL, 0600);
        assert_true(fd >= 0);
        close(fd);
        assert_int_equal(db_check_file(db), -ESTALE);
        db_close(db);
        (void) unlink(p);
}

struct first_frame {
        uint8_t jws[512];
        size_t len;
};

static int take_first(const struct spool_entry *e, void *userdata) {
        struct first_frame *f = userdata;

        assert_true(e->len <= sizeof f->jws);
        memcpy(f->jws, e->jws, e->len);
        f->len = e->len;
        return 0;
}

static void test_spool(void **state) {
        struct db *db = open_db();
        uint64_t pending = 7, bytes = 7;
        uint8_t blob[300];

        assert_int_equal(spool_stats(db, &pending, &bytes), 0);
        assert_int_equal(pending, 0);
        assert_int_equal(bytes, 0);

        for (size_t i = 0; i < sizeof blob; i++) /* NULs, high bytes: stored as they came */
                blob[i] = (uint8_t) (i * 37);
        struct spool_frame f[] = {
                { .dev = "bulb-7", .seq = 1, .jws = blob, .len = sizeof blob, .received_at_usec = 1000 },
                { .dev = "bulb-7", .seq = 2, .jws = blob, .len = 100, .received_at_usec = 2000 },
                { .dev = "bulb-8", .seq = 1, .jws = blob, .len = 10, .received_at_usec = 3000 },
        };
        assert_int_equal(spool_append_frames(db, f, ELEMENTSOF(f)), 0);
        assert_int_equal(db_sync_request(db), 0);

        assert_int_equal(spool_stats(db, &pending, &bytes), 0);
        assert_int_equal(pending, 3);
        assert_int_equal(bytes, sizeof blob + 100 + 10);
        struct first_frame ff = {};
        assert_int_equal(spool_read_batch(db, 1, take_first, &ff), 1);
        assert_int_equal(ff.len, sizeof blob);
        assert_memory_equal(ff.jws, blob, sizeof blob);
        int64_t at = 0;
        assert_int_equal(spool_oldest(db, NULL, &at), 0);
        assert_int_equal(at, 1000);

        /* Taken back (the rest of its commit failed): gone, as if never received. */
        f[0].dev = "bulb-9";
        assert_int_equal(spool_append_frames(db, f, 1), 0);
        assert_int_equal(spool_undo_append(db), 0);
        assert_int_equal(spool_stats(db, &pending, &bytes), 0);
        assert_int_equal(pending, 3);
        /* One bad frame: none of the batch goes in. */
        f[1].seq = 0;
        assert_int_equal(spool_append_frames(db, f, 2), -ERANGE);
        assert_int_equal(pending_of(db), 3);

        static const struct {
                const char *dev;
                int64_t seq;
                size_t len;
                int want;
        } bad[] = {
                { "bulb-7", 3, 0, -EINVAL },
                { "bad dev", 3, 5, -EINVAL },
                { NULL, 3, 5, -EINVAL },
                { "bulb-7", 0, 5, -ERANGE },
                { "bulb-7", FRAME_SEQ_MAX + 1, 5, -ERANGE },
                { "bulb-7", 3, FRAME_MAX_BYTES_LIMIT + 1, -EFBIG },
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                if (spool_append(db, bad[i].dev, bad[i].seq, blob, bad[i].len, 1) != bad[i].want)
                        fail_msg("bad append %zu accepted", i);

        db_close(db);
}

struct step {
        uint64_t now_usec;
        unsigned takes;   /* how many to try */
        unsigned granted; /* how many must succeed */
};

static void test_rate(void **state) {
        static const struct {
                const char *name;
                double rate;
                struct step steps[6];
        } cases[] = {
                { "burst of capacity 20, then refusals; refill after time",
                  10.0,
                  { { 5000000, 25, 20 },
                    { 5050000, 3, 0 },
                    { 5100000, 3, 1 },
                    { 5600000, 10, 5 },
                    { 0, 0, 0 } } },
                { "rate 0.5: capacity 1, one frame per 2 s",
                  0.5,
                  { { 1000000, 3, 1 },
                    { 2000000, 1, 0 },
                    { 3000000, 2, 1 },
                    { 4999999, 1, 0 },
                    { 5000000, 1, 1 } } },
                { "long idle fills to capacity only",
                  2.0,
                  { { 1000000, 10, 4 }, { 1000000000, 10, 4 }, { 0, 0, 0 } } },
                { "clock going backwards refills nothing, and counts no interval twice",
                  1.0,
                  { { 10000000, 3, 2 }, { 5000000, 2, 0 }, { 10500000, 1, 0 }, { 11000000, 2, 1 } } },
                { "starts full at time 0",
                  3.0,
                  { { 0, 7, 6 }, { 0, 1, 0 }, { 1, 1, 0 }, { 333335, 1, 1 } } }, /* time 0 counts as 1 us */
                { "rate 0: one frame, then never", 0.0, { { 1000000, 2, 1 }, { 100000000000, 2, 0 } } },
                { "rate NaN is rate 0", NAN, { { 1000000, 2, 1 }, { 100000000000, 2, 0 } } },
                { "rate 10, refills of 0.1 s add up to whole tokens",
                  10.0,
                  { { 1000000, 20, 20 }, { 1100000, 1, 1 }, { 1200000, 1, 1 }, { 1300000, 1, 1 } } },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct bulb b = { .id = "b" };

                for (size_t j = 0; j < ELEMENTSOF(cases[i].steps) && cases[i].steps[j].takes > 0; j++) {
                        const struct step *st = &cases[i].steps[j];
                        unsigned granted = 0;

                        for (unsigned t = 0; t < st->takes; t++)
                                granted += bulb_rate_take(&b, cases[i].rate, st->now_usec);
                        if (granted != st->granted)
                                fail_msg("%s: step %zu at %" PRIu64 " us: %u granted, want %u",
                                         cases[i].name, j, st->now_usec, granted, st->granted);
                }
        }

        /* Bulbs from the registry start full too. */
        struct db *db = open_db();
        struct registry *r = NULL;
        unsigned granted = 0;

        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(registry_add(r, "bulb-7", T.pem_p256, strlen(T.pem_p256)), 0);
        for (int t = 0; t < 10; t++)
                granted += bulb_rate_take(registry_find(r, "bulb-7"), 2.5, 42);
        assert_int_equal(granted, 5);
        registry_free(r);
        db_close(db);
}

static int collect(const struct spool_entry *e, void *userdata) {
        int64_t *ids = userdata;

        for (int i = 0; i < 8; i++)
                if (ids[i] == 0) {
                        ids[i] = e->id;
                        return e->len == 5 && memcmp(e->jws, "a.b.c", 5) == 0 ? 0 : -EBADMSG;
                }
        return -ENOBUFS;
}

/* The spool records a bulb's seq while its frames are in it (the frame path does not write
 * bulb_seqs at each commit, ingest.c); every way out of the spool moves bulb_seqs forward, in
 * the same transaction, so that a restart never lowers a bulb's last seq. */
struct max_seqs {
        char dev[3][16];
        int64_t seq[3];
        int n;
};

static int collect_max(const char *dev, int64_t seq, void *userdata) {
        struct max_seqs *m = userdata;

        if (m->n == 3)
                return -ENOBUFS;
        (void) snprintf(m->dev[m->n], sizeof m->dev[m->n], "%s", dev);
        m->seq[m->n++] = seq;
        return 0;
}

static int count_segments(void) {
        char p[96];
        DIR *d;
        struct dirent *de;
        int n = 0;

        (void) snprintf(p, sizeof p, "%s/spool", T.dir);
        d = opendir(p);
        assert_non_null(d);
        while ((de = readdir(d)))
                n += strncmp(de->d_name, "seg-", 4) == 0;
        closedir(d);
        return n;
}

static int take_seq(const char *dev, int64_t seq, void *userdata) {
        registry_seq_committed(registry_find(userdata, dev), seq);
        return 0;
}

static int take_last_id(const struct spool_entry *e, void *userdata) {
        *(int64_t *) userdata = e->id;
        return 0;
}

static void test_spool_seqs(void **state) {
        struct db *db = open_db();
        struct registry *r = NULL;
        struct max_seqs m = { 0 };
        uint64_t count = 0, bytes = 0;
        int64_t first = 0, at = 0;

        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(registry_add(r, "a", T.pem_p256, strlen(T.pem_p256)), 0);
        assert_int_equal(registry_add(r, "b", T.pem_ed25519, strlen(T.pem_ed25519)), 0);
        /* a: 1, 2, 3; b: 10, 11 (interleaved, as bulbs send). */
        assert_int_equal(spool_append(db, "a", 1, (const uint8_t *) "a.b.c", 5, 1), 0);
        assert_int_equal(spool_append(db, "b", 10, (const uint8_t *) "a.b.c", 5, 2), 0);
        assert_int_equal(spool_append(db, "a", 2, (const uint8_t *) "a.b.c", 5, 3), 0);
        assert_int_equal(spool_append(db, "b", 11, (const uint8_t *) "a.b.c", 5, 4), 0);
        assert_int_equal(spool_append(db, "a", 3, (const uint8_t *) "a.b.c", 5, 5), 0);
        assert_int_equal(query_int(db, "SELECT max(last_seq) FROM bulb_seqs"), 0);

        /* At start: the newest of each bulb in the segments. */
        assert_int_equal(spool_max_seqs(db, collect_max, &m), 0);
        assert_int_equal(m.n, 2);
        for (int i = 0; i < 2; i++)
                assert_int_equal(m.seq[i], streq(m.dev[i], "a") ? 3 : 11);

        /* Uploaded: the two oldest leave; their segment is still being written, so it stays, and
         * it is still the record of their seqs. */
        assert_int_equal(spool_oldest(db, &first, &at), 0);
        assert_int_equal(spool_delete(db, first, first + 1, &count, &bytes), 0);
        assert_int_equal(count, 2);
        assert_false(db_in_transaction(db));
        assert_int_equal(query_int(db, "SELECT max(last_seq) FROM bulb_seqs"), 0);
        m.n = 0;
        assert_int_equal(spool_max_seqs(db, collect_max, &m), 0);
        assert_int_equal(m.n, 2);

        /* Dropped at the cap: the segment is closed and its frames leave; it is unlinked once
         * its bulbs' seqs are in bulb_seqs (at once here: no sync thread). */
        assert_int_equal(spool_drop_oldest(db, 1, &count, &bytes), 0);
        assert_int_equal(count, 3);
        assert_int_equal(pending_of(db), 0);
        assert_int_equal(count_segments(), 0);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'a'"), 3);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'b'"), 11);
        m.n = 0;
        assert_int_equal(spool_max_seqs(db, collect_max, &m), 0);
        assert_int_equal(m.n, 0);

        /* Moved aside: kept in moved_aside, gone from the spool. */
        assert_int_equal(spool_append(db, "a", 4, (const uint8_t *) "a.b.c", 5, 6), 0);
        assert_int_equal(spool_append(db, "b", 12, (const uint8_t *) "a.b.c", 5, 7), 0);
        assert_int_equal(spool_oldest(db, &first, &at), 0);
        assert_int_equal(spool_move_aside(db, first, first + 1, 400, "HTTP 400", &count, &bytes), 0);
        assert_int_equal(count, 2);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM moved_aside WHERE jws = CAST('a.b.c' AS BLOB)"), 2);
        assert_int_equal(query_int(db, "SELECT seq FROM moved_aside WHERE dev = 'b'"), 12);
        assert_int_equal(pending_of(db), 0);

        /* The frame path never writes bulb_seqs (a power cut could keep it and lose the
         * segment): after these, only the segment has them. */
        assert_int_equal(spool_append(db, "a", 5, (const uint8_t *) "a.b.c", 5, 8), 0);
        assert_int_equal(spool_append(db, "b", 13, (const uint8_t *) "a.b.c", 5, 9), 0);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'a'"), 3);
        m.n = 0;
        assert_int_equal(spool_max_seqs(db, collect_max, &m), 0);
        assert_int_equal(m.n, 2); /* the segment with 4, 12 (moved aside), 5, 13 */
        for (int i = 0; i < 2; i++)
                assert_int_equal(m.seq[i], streq(m.dev[i], "a") ? 5 : 13);
        registry_free(r);
        db_close(db);

        /* A restart: 5 and 13 are only in a segment, 3 and 11 only in bulb_seqs (their segment
         * retired): each bulb's last seq is the newest, so that an old seq is a replay
         * (ingest.c). */
        db = open_db();
        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(spool_max_seqs(db, take_seq, r), 0);
        assert_int_equal(registry_find(r, "a")->last_seq, 5);
        assert_int_equal(registry_find(r, "b")->last_seq, 13);
        /* All uploaded and the segment retired (closed by the cap's drop of nothing): bulb_seqs
         * has them, and after another restart they hold. */
        int64_t last = 0;
        assert_int_equal(spool_read_batch(db, 10, take_last_id, &last), 2);
        assert_int_equal(spool_delete(db, 1, last, &count, &bytes), 0);
        assert_int_equal(spool_drop_oldest(db, 1, &count, &bytes), 0);
        assert_int_equal(count, 0);
        assert_int_equal(count_segments(), 0);
        registry_free(r);
        db_close(db);
        db = open_db();
        assert_int_equal(registry_open(db, &r), 0);
        m.n = 0;
        assert_int_equal(spool_max_seqs(db, collect_max, &m), 0);
        assert_int_equal(m.n, 0);
        assert_int_equal(registry_find(r, "a")->last_seq, 5);
        assert_int_equal(registry_find(r, "b")->last_seq, 13);
        registry_free(r);
        db_close(db);
}

static int64_t newest_id(struct db *db) {
        int64_t id = 0;

        assert_true(spool_read_batch(db, 1000, take_last_id, &id) >= 0);
        return id;
}

static void test_spool_relay(void **state) {
        struct db *db = open_db();
        uint64_t count = 0, bytes = 0, n = 0;
        int64_t ids[8] = { 0 }, oldest = 0, at = 0;
        char *v = NULL;

        assert_int_equal(spool_oldest(db, &oldest, &at), -ENOENT);
        for (int i = 1; i <= 6; i++)
                assert_int_equal(spool_append(db, "bulb-1", i, (const uint8_t *) "a.b.c", 5, 100 * i), 0);

        /* Oldest first, bounded by max. */
        assert_int_equal(spool_read_batch(db, 4, collect, ids), 4);
        assert_true(ids[0] < ids[1] && ids[1] < ids[2] && ids[2] < ids[3]);
        assert_int_equal(ids[4], 0);
        assert_int_equal(spool_oldest(db, &oldest, &at), 0);
        assert_int_equal(oldest, ids[0]);
        assert_int_equal(at, 100);

        /* Acknowledged: the range goes; a second delete of it finds nothing. */
        assert_int_equal(spool_delete(db, ids[0], ids[1], &count, &bytes), 0);
        assert_int_equal(count, 2);
        assert_int_equal(bytes, 10);
        assert_int_equal(spool_delete(db, ids[0], ids[1], &count, &bytes), 0);
        assert_int_equal(count, 0);

        /* Refused for good: kept aside, not in the spool. */
        assert_int_equal(spool_move_aside(db, ids[2], ids[2], 400, "HTTP 400: bad", &count, &bytes), 0);
        assert_int_equal(count, 1);
        assert_int_equal(spool_moved_aside_count(db, &n), 0);
        assert_int_equal(n, 1);
        assert_int_equal(query_int(db, "SELECT http_status FROM moved_aside"), 400);
        assert_int_equal(spool_oldest(db, &oldest, &at), 0);
        assert_int_equal(oldest, ids[3]);

        /* At the cap: the oldest segment goes (here the only one: closed first), and a batch
         * still in flight with it; an id never comes back, so that the cloud's late answer for
         * ids[0..3] cannot remove a newer frame. */
        int64_t last = newest_id(db);
        assert_int_equal(spool_drop_oldest(db, 1, &count, &bytes), 0);
        assert_int_equal(count, 3);
        assert_int_equal(spool_stats(db, &n, &bytes), 0);
        assert_int_equal(n, 0);
        assert_int_equal(spool_drop_oldest(db, 1, &count, &bytes), 0);
        assert_int_equal(count, 0);
        assert_int_equal(spool_append(db, "bulb-1", 7, (const uint8_t *) "a.b.c", 5, 700), 0);
        assert_true(newest_id(db) > last);
        assert_int_equal(spool_delete(db, ids[0], ids[3], &count, &bytes), 0);
        assert_int_equal(count, 0);
        /* Taken back ids leave a gap; after a restart ids go on from the largest one kept. */
        last = newest_id(db);
        struct spool_frame f = { .dev = "bulb-1", .seq = 8, .jws = (const uint8_t *) "a.b.c", .len = 5, .received_at_usec = 800 };
        assert_int_equal(spool_append_frames(db, &f, 1), 0);
        assert_int_equal(spool_undo_append(db), 0);
        assert_int_equal(spool_append(db, "bulb-1", 8, (const uint8_t *) "a.b.c", 5, 800), 0);
        assert_true(newest_id(db) > last + 1);
        last = newest_id(db);
        db_close(db);
        db = open_db();
        assert_int_equal(pending_of(db), 2);
        assert_int_equal(spool_append(db, "bulb-1", 9, (const uint8_t *) "a.b.c", 5, 900), 0);
        assert_int_equal(newest_id(db), last + 1);

        assert_int_equal(db_meta_get(db, "k", &v), -ENOENT);
        assert_int_equal(db_meta_set(db, "k", "1"), 0);
        assert_int_equal(db_meta_set(db, "k", "0"), 0);
        assert_int_equal(db_meta_get(db, "k", &v), 0);
        assert_string_equal(v, "0");
        free(v);
        db_close(db);
}

/* A database written by schema version 1 is brought to the current version and keeps its frames. */
/* spool_drop_oldest(db, n): whole segments leave until at least n frames have. */
static void test_drop_oldest_n(void **state) {
        struct db *db = open_db();
        struct spool_frame f[50];
        uint64_t count = 0, bytes = 0, one, pending;
        int64_t seq = 0;

        spool_set_max_bytes(db, 64 * 1024); /* 16 KiB segments */
        while (count_segments() < 4) {
                for (size_t i = 0; i < ELEMENTSOF(f); i++)
                        f[i] = (struct spool_frame){ .dev = "bulb-1", .seq = ++seq,
                                                     .jws = (const uint8_t *) "a.b.c", .len = 5,
                                                     .received_at_usec = seq };
                assert_int_equal(spool_append_frames(db, f, ELEMENTSOF(f)), 0);
        }
        assert_int_equal(spool_drop_oldest(db, 1, &one, &bytes), 0);
        assert_true(one > 1);
        assert_int_equal(bytes, 5 * one);
        pending = pending_of(db);
        assert_true(pending > 2 * one);
        /* More than one segment holds: two or more go. */
        assert_int_equal(spool_drop_oldest(db, (unsigned) one + 1, &count, &bytes), 0);
        assert_true(count >= one + 1);
        assert_int_equal(bytes, 5 * count);
        assert_int_equal(pending_of(db), pending - count);
        /* More than wait: all go, the segment being written closed first. */
        pending = pending_of(db);
        assert_int_equal(spool_drop_oldest(db, UINT32_MAX, &count, &bytes), 0);
        assert_int_equal(count, pending);
        assert_int_equal(pending_of(db), 0);
        assert_int_equal(spool_drop_oldest(db, 1, &count, &bytes), 0);
        assert_int_equal(count, 0);
        db_close(db);
}

/* The one segment file of the spool (its name), for a test to save and put back. */
static void only_segment(char *out, size_t cap) {
        char path[160];
        struct dirent *de;
        DIR *d;
        int n = 0;

        (void) snprintf(path, sizeof path, "%s/spool", T.dir);
        d = opendir(path);
        assert_non_null(d);
        while ((de = readdir(d)))
                if (strncmp(de->d_name, "seg-", 4) == 0) {
                        (void) snprintf(out, cap, "%s/%s", path, de->d_name);
                        n++;
                }
        (void) closedir(d);
        assert_int_equal(n, 1);
}

static size_t read_whole(const char *path, uint8_t *buf, size_t cap) {
        int fd = open(path, O_RDONLY);
        ssize_t k;

        assert_true(fd >= 0);
        k = read(fd, buf, cap);
        assert_true(k > 0 && (size_t) k < cap);
        (void) close(fd);
        return (size_t) k;
}

/* A crash after moved_aside's commit and before the frames' cursor record reached the disk: the
 * next start finds them waiting, the cloud refuses them again, and they are copied again. Each
 * must be in moved_aside once (db.c, migration 6). */
static void test_move_aside_twice(void **state) {
        struct db *db = open_db();
        uint64_t count = 0, bytes = 0, n = 0;
        int64_t first = 0, at = 0;
        static uint8_t saved[65536];
        char seg[512];
        size_t len;
        int fd;

        for (int i = 1; i <= 3; i++)
                assert_int_equal(spool_append(db, "bulb-1", i, (const uint8_t *) "a.b.c", 5, 100 * i), 0);
        only_segment(seg, sizeof seg);
        len = read_whole(seg, saved, sizeof saved);
        assert_int_equal(spool_oldest(db, &first, &at), 0);
        assert_int_equal(spool_move_aside(db, first, first + 1, 400, "HTTP 400", &count, &bytes), 0);
        assert_int_equal(count, 2);
        db_close(db);

        /* The segment as it was before the cursor record: the two frames wait again. */
        fd = open(seg, O_WRONLY | O_TRUNC);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, saved, len), (ssize_t) len);
        (void) close(fd);
        db = open_db();
        assert_int_equal(pending_of(db), 3);
        assert_int_equal(spool_oldest(db, &at, NULL), 0);
        assert_int_equal(at, first);
        assert_int_equal(spool_move_aside(db, first, first + 1, 400, "HTTP 400", &count, &bytes), 0);
        assert_int_equal(count, 2);
        assert_int_equal(pending_of(db), 1);
        assert_int_equal(spool_moved_aside_count(db, &n), 0);
        assert_int_equal(n, 2);
        assert_int_equal(query_int(db, "SELECT COUNT(DISTINCT seq) FROM moved_aside"), 2);
        db_close(db);

        /* A database of schema 5 with the copies such a crash made: the upgrade keeps one of
         * each, the first. */
        sqlite3 *raw = NULL;
        assert_int_equal(sqlite3_open(T.path, &raw), SQLITE_OK);
        assert_int_equal(sqlite3_exec(raw,
                                      "DROP INDEX moved_aside_frame; DROP TABLE spool_segments;"
                                      "INSERT INTO moved_aside (dev, seq, received_at_usec, jws, moved_at, "
                                      "http_status, reason) SELECT dev, seq, received_at_usec, jws, "
                                      "moved_at + 1, 409, 'again' FROM moved_aside;"
                                      "PRAGMA user_version = 5;",
                                      NULL, NULL, NULL),
                         SQLITE_OK);
        sqlite3_close(raw);
        db = open_db();
        assert_int_equal(query_int(db, "PRAGMA user_version"), SCHEMA_VERSION);
        assert_int_equal(spool_moved_aside_count(db, &n), 0);
        assert_int_equal(n, 2);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM moved_aside WHERE http_status = 400"), 2);
        db_close(db);
}

static void test_migrate_v1(void **state) {
        sqlite3 *raw = NULL;
        struct db *db;

        assert_int_equal(sqlite3_open(T.path, &raw), SQLITE_OK);
        assert_int_equal(sqlite3_exec(raw,
                                      "CREATE TABLE bulbs (id TEXT PRIMARY KEY, alg TEXT NOT NULL, pubkey_pem TEXT "
                                      "NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, last_seq INTEGER NOT NULL "
                                      "DEFAULT 0, enrolled_at INTEGER NOT NULL, revoked_at INTEGER) STRICT;"
                                      "CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, dev TEXT NOT NULL, "
                                      "seq INTEGER NOT NULL, received_at_usec INTEGER NOT NULL, jws BLOB NOT NULL, "
                                      "UNIQUE (dev, seq)) STRICT;"
                                      "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT) STRICT;"
                                      "INSERT INTO spool (dev, seq, received_at_usec, jws) VALUES ('b', 1, 1, x'41');"
                                      "INSERT INTO spool (dev, seq, received_at_usec, jws) VALUES ('b', 2, 2, x'42');"
                                      "DELETE FROM spool WHERE seq = 2;"
                                      "INSERT INTO bulbs (id, alg, pubkey_pem, last_seq, enrolled_at) VALUES "
                                      "('b', 'ES256', 'k', 7, 1), ('c', 'ES256', 'k', 0, 1);"
                                      "PRAGMA user_version = 1;",
                                      NULL, NULL, NULL),
                         SQLITE_OK);
        sqlite3_close(raw);
        assert_int_equal(chmod(T.path, 0600), 0);
        db = open_db();
        assert_int_equal(query_int(db, "PRAGMA user_version"), SCHEMA_VERSION);
        /* The frame moved into the segment log (issue 13), with its id. */
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM spool"), 0);
        assert_int_equal(pending_of(db), 1);
        struct first_frame ff = {};
        int64_t id = 0, at = 0;
        assert_int_equal(spool_read_batch(db, 10, take_first, &ff), 1);
        assert_int_equal(ff.len, 1);
        assert_int_equal(ff.jws[0], 'A');
        assert_int_equal(spool_oldest(db, &id, &at), 0);
        assert_int_equal(id, 1);
        assert_int_equal(at, 1);
        struct max_seqs m = { 0 };
        assert_int_equal(spool_max_seqs(db, collect_max, &m), 0);
        assert_int_equal(m.n, 1);
        assert_int_equal(m.seq[0], 1);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM moved_aside"), 0);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM commands"), 0);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM events"), 0);
        /* Migration 5: the seqs moved to bulb_seqs, the frames kept their ids. */
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'b'"), 7);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'c'"), 0);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM pragma_table_info('bulbs') WHERE name = 'last_seq'"), 0);
        /* A stop between the move and the table's DELETE: the frame is in both; only what the
         * log lacks is moved again. */
        assert_int_equal(sqlite3_exec(db_handle(db),
                                      "INSERT INTO spool (id, dev, seq, received_at_usec, jws) VALUES (1, 'b', 1, 1, x'41'),"
                                      " (2, 'b', 3, 3, x'43')",
                                      NULL, NULL, NULL),
                         SQLITE_OK);
        db_close(db);
        db = open_db();
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM spool"), 0);
        assert_int_equal(pending_of(db), 2);
        assert_int_equal(spool_oldest(db, &id, NULL), 0);
        assert_int_equal(id, 1);
        db_close(db);
}


/* The sync thread (db_sync_start()): what its callback reports. */
struct synced {
        uint64_t gen;
        int error;
        unsigned calls;
};

static void on_synced(void *userdata, uint64_t gen, int error) {
        struct synced *y = userdata;

        y->calls++;
        y->error = error;
        if (error == 0) {
                assert_true(gen >= y->gen); /* never goes back */
                y->gen = gen;
        }
}

/* Runs the loop until the callback reported gen (5 s at most). */
static void wait_synced(sd_event *e, struct synced *y, uint64_t gen) {
        for (int i = 0; i < 500 && y->gen < gen; i++)
                assert_true(sd_event_run(e, 10000) >= 0);
        assert_int_equal(y->error, 0);
        assert_true(y->gen >= gen);
}

/* db_sync_wait()'s callback: how often, and with what. */
struct waited {
        int calls, error;
        uint64_t gen_at_call; /* the syncer's reported generation when it ran */
        struct synced *y;
};

static void on_waited(void *userdata, int error) {
        struct waited *w = userdata;

        w->calls++;
        w->error = error;
        w->gen_at_call = w->y ? w->y->gen : 0;
}

/* How many of this process's descriptors name a deleted file ending in suffix. */
static int deleted_fds(const char *suffix) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;
        char p[300], t[300];
        int n = 0;

        assert_non_null(d);
        while ((de = readdir(d))) {
                ssize_t k;

                (void) snprintf(p, sizeof p, "/proc/self/fd/%s", de->d_name);
                k = readlink(p, t, sizeof t - 1);
                if (k <= 0)
                        continue;
                t[k] = '\0';
                if (strstr(t, suffix) && strstr(t, "(deleted)"))
                        n++;
        }
        closedir(d);
        return n;
}

static void test_sync_thread(void **state) {
        struct db *db = open_db();
        struct synced y = { 0 };
        sd_event *e = NULL;
        char *big, *err = NULL, p[160];
        uint64_t gen;
        struct stat st;

        assert_int_equal(sd_event_new(&e), 0);
        assert_int_equal(query_int(db, "PRAGMA synchronous"), 2); /* FULL without the thread */
        assert_int_equal(db_sync_start(db, e, on_synced, &y), 0);
        assert_int_equal(db_sync_start(db, e, on_synced, &y), -EINVAL); /* one thread */
        assert_int_equal(query_int(db, "PRAGMA synchronous"), 1); /* NORMAL: no fsync in COMMIT */

        /* Every commit counts, autocommit ones too, and is reported once a sync covered it. */
        gen = db_commit_gen(db);
        assert_int_equal(db_begin(db), 0);
        assert_int_equal(db_meta_set(db, "a", "1"), 0);
        assert_int_equal(db_commit(db), 0);
        assert_int_equal(db_commit_gen(db), gen + 1);
        assert_int_equal(db_meta_set(db, "b", "2"), 0);
        assert_int_equal(db_commit_gen(db), gen + 2);
        wait_synced(e, &y, gen + 2);
        assert_true(y.gen <= db_commit_gen(db));

        /* db_sync_wait(): nothing to wait for once synced; after a commit, the callback runs on
         * the loop once a sync covered it (the syncer's report comes first), never before; a
         * cancelled wait never calls back. */
        struct waited w1 = { .y = &y }, w2 = { .y = &y };
        struct db_sync_wait *sw1 = NULL, *sw2 = NULL;
        assert_int_equal(db_sync_wait(db, on_waited, &w1, &sw1), 0);
        assert_null(sw1);
        /* The syncer may cover a commit before the next line runs (seen under qemu-user, where
         * this thread is emulated and the syncer's fdatasync is a native call): 0 is the right
         * answer then, and the pair is tried again after a new commit. */
        int r1 = 0, r2 = 0;
        for (int i = 0; i < 1000; i++) {
                assert_int_equal(db_meta_set(db, "w", i % 2 ? "1" : "2"), 0);
                gen = db_commit_gen(db);
                r1 = db_sync_wait(db, on_waited, &w1, &sw1);
                assert_true(r1 == 0 || r1 == 1);
                if (r1 == 0)
                        continue;
                r2 = db_sync_wait(db, on_waited, &w2, &sw2);
                assert_true(r2 == 0 || r2 == 1);
                if (r2 == 1)
                        break;
                db_sync_wait_cancel(TAKE_PTR(sw1));
        }
        assert_int_equal(r1, 1);
        assert_int_equal(r2, 1);
        assert_non_null(sw1);
        assert_int_equal(w1.calls, 0);
        db_sync_wait_cancel(TAKE_PTR(sw2));
        wait_synced(e, &y, gen);
        for (int i = 0; i < 50 && w1.calls == 0; i++)
                assert_true(sd_event_run(e, 10000) >= 0);
        assert_int_equal(w1.calls, 1);
        assert_int_equal(w1.error, 0);
        assert_true(w1.gen_at_call >= gen);
        assert_int_equal(w2.calls, 0);
        db_sync_wait_cancel(NULL);

        /* No checkpoint on the loop's connection: 20 MiB of commits leave the database file
         * small until the thread checkpoints (at 4096 WAL pages, db.c), which it does in the
         * round that syncs the commit that crossed the mark. */
        big = malloc(1024 * 1024 + 1);
        assert_non_null(big);
        memset(big, 'x', 1024 * 1024);
        big[1024 * 1024] = '\0';
        for (int i = 0; i < 20; i++) {
                char key[16];

                (void) snprintf(key, sizeof key, "big%d", i);
                assert_int_equal(db_meta_set(db, key, big), 0);
        }
        free(big);
        wait_synced(e, &y, db_commit_gen(db));
        assert_int_equal(stat(T.path, &st), 0);
        assert_true(st.st_size > 8 * 1024 * 1024);

        /* db_restore_file() keeps the thread and the count, on the new file's WAL. */
        gen = db_commit_gen(db);
        assert_int_equal(unlink(T.path), 0);
        (void) snprintf(p, sizeof p, "%s-wal", T.path);
        assert_int_equal(unlink(p), 0);
        assert_int_equal(db_restore_file(db, &err), 0);
        assert_null(err);
        assert_int_equal(deleted_fds("-wal (deleted)"), 0);
        assert_int_equal(query_int(db, "PRAGMA synchronous"), 1);
        assert_int_equal(db_meta_set(db, "c", "3"), 0);
        assert_int_equal(db_commit_gen(db), gen + 1);
        wait_synced(e, &y, gen + 1);

        /* Stopping syncs what is left and says so before it returns, without the loop, to the
         * waits too; then commits are durable when they return, and nothing waits. */
        struct waited w3 = { .y = &y };
        struct db_sync_wait *sw3 = NULL;
        r1 = 0;
        for (int i = 0; i < 1000 && r1 == 0; i++) { /* as above: the syncer may be first */
                assert_int_equal(db_meta_set(db, "d", i % 2 ? "4" : "5"), 0);
                r1 = db_sync_wait(db, on_waited, &w3, &sw3);
                assert_true(r1 == 0 || r1 == 1);
        }
        assert_int_equal(r1, 1);
        db_sync_stop(db);
        assert_int_equal(w3.calls, 1);
        assert_int_equal(w3.error, 0);
        assert_int_equal(db_meta_set(db, "d2", "4"), 0);
        assert_int_equal(db_sync_wait(db, on_waited, &w3, &sw3), 0);
        assert_int_equal(y.gen, db_commit_gen(db)); /* (without the thread, SQLite's autocheckpoint holds the WAL hook) */
        assert_int_equal(y.error, 0);
        assert_int_equal(query_int(db, "PRAGMA synchronous"), 2);
        db_sync_stop(db); /* a no-op now */

        /* And a thread still running when the database closes is joined (ASan: no leak). */
        assert_int_equal(db_sync_start(db, e, on_synced, &y), 0);
        assert_int_equal(db_meta_set(db, "e", "5"), 0);
        db_close(db);
        sd_event_unref(e);
}

/* The spool's segments with the sync thread: an append counts once the thread reported its
 * commit generation (the segment's fsync with the WAL's), and a segment nothing waits in is
 * unlinked only after the commit of its bulbs' seqs was reported synced. */
static void test_sync_thread_spool(void **state) {
        struct db *db = open_db();
        struct registry *r = NULL;
        struct synced y = { 0 };
        sd_event *e = NULL;
        uint64_t gen, count = 0, bytes = 0;
        struct spool_frame f = { .dev = "a", .seq = 1, .jws = (const uint8_t *) "a.b.c", .len = 5, .received_at_usec = 1 };

        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(registry_add(r, "a", T.pem_p256, strlen(T.pem_p256)), 0);
        assert_int_equal(sd_event_new(&e), 0);
        assert_int_equal(db_sync_start(db, e, on_synced, &y), 0);
        gen = db_commit_gen(db);
        assert_int_equal(spool_append_frames(db, &f, 1), 0);
        assert_int_equal(db_sync_request(db), 0);
        assert_int_equal(db_commit_gen(db), gen + 1);
        wait_synced(e, &y, gen + 1);
        f.seq = 2;
        assert_int_equal(spool_append_frames(db, &f, 1), 0);
        assert_int_equal(db_sync_request(db), 0);
        wait_synced(e, &y, db_commit_gen(db));

        /* Dropped at the cap: the seqs are committed at once, the file goes after their sync. */
        assert_int_equal(spool_drop_oldest(db, 1, &count, &bytes), 0);
        assert_int_equal(count, 2);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'a'"), 2);
        for (int i = 0; i < 500 && count_segments() > 0; i++)
                assert_true(sd_event_run(e, 10000) >= 0);
        assert_int_equal(count_segments(), 0);
        /* The next append opens a new segment (and its directory entry is synced with it). */
        f.seq = 3;
        assert_int_equal(spool_append_frames(db, &f, 1), 0);
        assert_int_equal(db_sync_request(db), 0);
        wait_synced(e, &y, db_commit_gen(db));
        assert_int_equal(count_segments(), 1);
        assert_int_equal(pending_of(db), 1);
        /* Stopping syncs what is left; the log goes on durable-on-return. */
        f.seq = 4;
        assert_int_equal(spool_append_frames(db, &f, 1), 0);
        assert_int_equal(db_sync_request(db), 0);
        db_sync_stop(db);
        assert_int_equal(y.gen, db_commit_gen(db));
        assert_int_equal(spool_append(db, "a", 5, (const uint8_t *) "a.b.c", 5, 5), 0);
        registry_free(r);
        db_close(db);
        sd_event_unref(e);

        db = open_db();
        assert_int_equal(pending_of(db), 3);
        db_close(db);
}

/* Closed segments get a summary (spool_segments) with their bulbs' seqs in bulb_seqs once their
 * sync completed; the next start takes them from it (spool_found(): summarized), gives the same
 * counts, and reports through spool_max_seqs() only the seqs of what it read; together with
 * bulb_seqs every bulb's newest seq. Retiring a segment deletes its summary; a summary of a
 * file that is gone is deleted at open. */
static void test_spool_summaries(void **state) {
        struct db *db = open_db();
        struct registry *r = NULL;
        struct synced y = { 0 };
        struct seglog_found f;
        struct max_seqs m = { 0 };
        static uint8_t jws[2000];
        sd_event *e = NULL;
        uint64_t count = 0, bytes = 0, pending = 0, pbytes = 0;
        int64_t first = 0, rows, last, seq_a = 0, seq_b = 0;
        const int frames = 60;
        int segments;

        memset(jws, 'x', sizeof jws);
        assert_int_equal(registry_open(db, &r), 0);
        assert_int_equal(registry_add(r, "a", T.pem_p256, strlen(T.pem_p256)), 0);
        assert_int_equal(registry_add(r, "b", T.pem_ed25519, strlen(T.pem_ed25519)), 0);
        assert_int_equal(sd_event_new(&e), 0);
        assert_int_equal(db_sync_start(db, e, on_synced, &y), 0);
        spool_set_max_bytes(db, 256 * 1024); /* 16 KiB segments: 8 frames each */
        /* Frame k (id k): bulb a for odd k, b for even, seq k. */
        for (int k = 1; k <= frames; k++) {
                struct spool_frame fr = { .dev = k % 2 ? "a" : "b", .seq = k, .jws = jws, .len = sizeof jws,
                                          .received_at_usec = k };
                assert_int_equal(spool_append_frames(db, &fr, 1), 0);
                assert_int_equal(db_sync_request(db), 0);
                wait_synced(e, &y, db_commit_gen(db));
        }
        rows = query_int(db, "SELECT COUNT(*) FROM spool_segments");
        last = query_int(db, "SELECT MAX(last_id) FROM spool_segments");
        /* About 8 segments; the newest is written; the summary of the one closed last may wait
         * for the next append. */
        segments = count_segments();
        assert_true(segments >= 6);
        assert_true(rows >= segments - 2 && rows <= segments - 1);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM spool_segments WHERE frames > 1 AND id = first_id AND "
                                       "last_id = first_id + frames - 1 AND bytes = frames * 2000 AND cursor = 0"),
                         rows);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM spool_segments a JOIN spool_segments b "
                                       "ON b.first_id = a.last_id + 1"),
                         rows - 1);
        /* The seqs of every summarized segment are in bulb_seqs (the frame path writes none). */
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'a'"), last % 2 ? last : last - 1);
        assert_int_equal(query_int(db, "SELECT last_seq FROM bulb_seqs WHERE id = 'b'"), last % 2 ? last - 1 : last);
        db_sync_stop(db);
        registry_free(r);
        db_close(db);
        sd_event_unref(e);

        db = open_db();
        spool_found(db, &f);
        assert_int_equal(f.segments, (uint64_t) segments);
        assert_int_equal(f.summarized, (uint64_t) rows);
        assert_int_equal(spool_stats(db, &pending, &pbytes), 0);
        assert_int_equal(pending, frames);
        assert_int_equal(pbytes, frames * sizeof jws);
        /* Only the frames after the summarized segments are read for their seqs... */
        assert_int_equal(spool_max_seqs(db, collect_max, &m), 0);
        assert_int_equal(m.n, 2);
        for (int i = 0; i < m.n; i++) {
                assert_true(m.seq[i] > last);
                *(streq(m.dev[i], "a") ? &seq_a : &seq_b) = m.seq[i];
        }
        /* ...and with bulb_seqs they are every bulb's newest. */
        assert_int_equal(seq_a, frames - 1);
        assert_int_equal(seq_b, frames);
        assert_int_equal(spool_oldest(db, &first, NULL), 0);
        assert_int_equal(first, 1);

        /* Uploaded: the segments retire (at once: no sync thread) and their summaries go. */
        assert_int_equal(spool_delete(db, 1, frames, &count, &bytes), 0);
        assert_int_equal(count, frames);
        assert_int_equal(count_segments(), 1);
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM spool_segments"), 0);
        /* A summary of a file that is not there goes at the next open. */
        assert_int_equal(sqlite3_exec(db_handle(db),
                                      "INSERT INTO spool_segments VALUES (9999, 9999, 9999, 1, 5, 100, 0)", NULL,
                                      NULL, NULL),
                         SQLITE_OK);
        db_close(db);
        db = open_db();
        assert_int_equal(query_int(db, "SELECT COUNT(*) FROM spool_segments"), 0);
        assert_int_equal(pending_of(db), 0);
        db_close(db);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_open_creates_private_wal_db, setup, teardown),
                cmocka_unit_test_setup_teardown(test_open_tightens_mode, setup, teardown),
                cmocka_unit_test_setup_teardown(test_open_refuses, setup, teardown),
                cmocka_unit_test(test_db_errno),
                cmocka_unit_test_setup_teardown(test_registry, setup, teardown),
                cmocka_unit_test_setup_teardown(test_seq, setup, teardown),
                cmocka_unit_test_setup_teardown(test_key_cache, setup, teardown),
                cmocka_unit_test_setup_teardown(test_key_damaged, setup, teardown),
                cmocka_unit_test_setup_teardown(test_registry_damaged_rows, setup, teardown),
                cmocka_unit_test_setup_teardown(test_spool, setup, teardown),
                cmocka_unit_test_setup_teardown(test_restore_deleted, setup, teardown),
                cmocka_unit_test_setup_teardown(test_sync_thread, setup, teardown),
                cmocka_unit_test_setup_teardown(test_sync_thread_spool, setup, teardown),
                cmocka_unit_test_setup_teardown(test_spool_summaries, setup, teardown),
                cmocka_unit_test_setup_teardown(test_spool_relay, setup, teardown),
                cmocka_unit_test_setup_teardown(test_move_aside_twice, setup, teardown),
                cmocka_unit_test_setup_teardown(test_drop_oldest_n, setup, teardown),
                cmocka_unit_test_setup_teardown(test_spool_seqs, setup, teardown),
                cmocka_unit_test_setup_teardown(test_migrate_v1, setup, teardown),
                cmocka_unit_test_setup_teardown(test_rate, setup, teardown),
        };

        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
