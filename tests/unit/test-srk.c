/* SPDX-License-Identifier: MIT */
/* The standard SRK (issue 13): src/hubkey.c uses the persistent storage root key at 0x81000001
 * (TCG "TPM v2.0 Provisioning Guidance", 7.5.1; what tpm2-tools and systemd provision) when the
 * TPM has one made from the standard ECC P-256 template, and creates the primary key as before
 * when it has none or something else there. Against a real swtpm this test starts itself; the
 * SRK is provisioned with tpm2-tools (tpm2_createprimary + tpm2_evictcontrol), code that is not
 * the module's. The TPM commands are counted from tpm2-tss's own TCTI log (TSS2_LOG=tcti+debug
 * into TSS2_LOGFILE: one "Sending command with TPM_CC" line per command).
 * The swtpm helpers are those of test-hubkey.c (kept apart so that both can move to a shared
 * file). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "iothub/hubkey.h"
#include "swtpm-helper.h"

#define HANDLE 0x81000101u
#define SRK_HANDLE "0x81000001"
#define CC_CREATE_PRIMARY 0x131u

extern char **environ;

static struct swtpm tpm = { .pid = -1 };
static char logfile[] = "/tmp/test-srk-tss2log-XXXXXX";

static struct iothub_conf tpm_conf(const char *tcti, uint32_t handle) {
        return (struct iothub_conf) {
                .key = { .backend = KEY_BACKEND_TPM, .tcti = (char *) tcti, .handle = handle },
        };
}

/* Runs a tpm2-tools command against the test's TPM; returns its exit status. */
static int tpm2_tool(char *const argv[]) {
        char tcti[96];
        pid_t pid;
        int status;

        snprintf(tcti, sizeof tcti, "TPM2TOOLS_TCTI=%s", tpm.tcti);
        (void) setenv("TPM2TOOLS_TCTI", tpm.tcti, 1);
        assert_int_equal(posix_spawnp(&pid, argv[0], NULL, NULL, argv, environ), 0);
        assert_int_equal(waitpid(pid, &status, 0), pid);
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Makes 'attrs' (a tpm2-tools attribute list) an ECC P-256 AES-128-CFB primary of the owner
 * hierarchy, persistent at 0x81000001. */
static void provision_srk(const char *attrs) {
        char ctx[128];

        snprintf(ctx, sizeof ctx, "%s/srk.ctx", tpm.dir);
        assert_int_equal(tpm2_tool((char *const[]) { "tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc256:aes128cfb",
                                                     "-a", (char *) attrs, "-c", ctx, NULL }),
                         0);
        assert_int_equal(tpm2_tool((char *const[]) { "tpm2_evictcontrol", "-Q", "-C", "o", "-c", ctx, SRK_HANDLE, NULL }),
                         0);
        assert_int_equal(tpm2_tool((char *const[]) { "tpm2_flushcontext", "-t", NULL }), 0);
}

static void evict_srk(void) {
        assert_int_equal(tpm2_tool((char *const[]) { "tpm2_evictcontrol", "-Q", "-C", "o", "-c", SRK_HANDLE, NULL }), 0);
}

/* The TPM commands sent since the log was last emptied: all, and those with command code 'cc'. */
static unsigned commands_sent(unsigned cc, unsigned *ret_cc) {
        FILE *f = fopen(logfile, "re");
        char line[512], want[64];
        unsigned n = 0, m = 0;

        assert_non_null(f);
        snprintf(want, sizeof want, "with TPM_CC 0x%x ", cc);
        while (fgets(line, sizeof line, f))
                if (strstr(line, "Sending command with TPM_CC")) {
                        n++;
                        if (strstr(line, want))
                                m++;
                }
        fclose(f);
        *ret_cc = m;
        return n;
}

static void log_reset(void) {
        assert_int_equal(truncate(logfile, 0), 0);
}

/* One hub start's worth of TPM work: open the key, sign, unseal the token store's data key; and a
 * new seal. Checks the secret round trips, and that a blob sealed earlier ('old') still opens. */
static void open_sign_unseal(const uint8_t *old, size_t old_len, uint8_t **ret_blob, size_t *ret_len,
                             unsigned *ret_commands, unsigned *ret_create_primary) {
        struct iothub_conf c = tpm_conf(tpm.tcti, HANDLE);
        static const uint8_t secret[32] = "0123456789abcdef0123456789abcde";
        uint8_t sig[HUBKEY_SIG_LEN], *out = NULL, *blob = NULL;
        struct hubkey *k = NULL;
        size_t out_len = 0, blob_len = 0;
        char *err = NULL;

        log_reset();
        assert_int_equal(hubkey_open(&c, &k, &err), 0);
        assert_int_equal(hubkey_sign(k, "frames", 6, sig), 0);
        if (old) {
                assert_int_equal(hubkey_unseal(k, old, old_len, &out, &out_len), 0);
                assert_int_equal(out_len, sizeof secret);
                assert_memory_equal(out, secret, sizeof secret);
                free(out);
        }
        assert_int_equal(hubkey_seal(k, secret, sizeof secret, &blob, &blob_len), 0);
        assert_int_equal(hubkey_unseal(k, blob, blob_len, &out, &out_len), 0);
        assert_int_equal(out_len, sizeof secret);
        assert_memory_equal(out, secret, sizeof secret);
        free(out);
        hubkey_free(k);
        *ret_commands = commands_sent(CC_CREATE_PRIMARY, ret_create_primary);
        *ret_blob = blob;
        *ret_len = blob_len;
}

/* The standard SRK template, as tpm2-tools spells it (hubkey.c's srk_template). */
#define SRK_ATTRS "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda"

static void test_srk_absent_present_other(_unused_ void **state) {
        struct iothub_conf c = tpm_conf(tpm.tcti, HANDLE);
        uint8_t *blob0 = NULL, *blob1 = NULL, *blob2 = NULL;
        size_t len0 = 0, len1 = 0, len2 = 0;
        unsigned n0, p0, n1, p1, n2, p2;
        bool created = false;
        char *err = NULL;

        assert_int_equal(hubkey_init(&c, &created, &err), 0);
        assert_true(created);

        /* No SRK: the primary is created for each seal and unseal (and flushed). */
        open_sign_unseal(NULL, 0, &blob0, &len0, &n0, &p0);
        assert_int_equal(p0, 2);

        /* The standard SRK, provisioned by tpm2-tools: no CreatePrimary at all, and the blob sealed
         * under the created primary opens under it (the same template gives the same key). */
        provision_srk(SRK_ATTRS);
        open_sign_unseal(NULL, 0, &blob1, &len1, &n1, &p1);
        assert_int_equal(p1, 0);
        free(blob1);
        open_sign_unseal(blob0, len0, &blob1, &len1, &n2, &p2);
        assert_int_equal(p2, 0);

        /* Another object at 0x81000001 (tpm2-tools' default attributes: no noDA, so another key):
         * not used; the primary is created as before, and both blobs still open. */
        evict_srk();
        provision_srk("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt");
        open_sign_unseal(blob1, len1, &blob2, &len2, &n2, &p2);
        assert_int_equal(p2, 3);
        free(blob2);
        open_sign_unseal(blob0, len0, &blob2, &len2, &n2, &p2);
        assert_int_equal(p2, 3);
        evict_srk();

        /* For the record (tests/bench/README.md): TPM commands of open + sign + seal + unseal. */
        print_message("TPM commands, open+sign+seal+unseal: no SRK %u (%u CreatePrimary); standard SRK at "
                      SRK_HANDLE " %u (%u); another object there %u (%u; this one with the unseal of an old blob too)\n",
                      n0, p0, n1, p1, n2, p2);
        free(blob0);
        free(blob1);
        free(blob2);
}

/* A key created while the standard SRK is there is its child: it works, and no primary is made. */
static void test_key_init_under_srk(_unused_ void **state) {
        struct iothub_conf c = tpm_conf(tpm.tcti, HANDLE + 1);
        struct hubkey *k = NULL;
        uint8_t sig[HUBKEY_SIG_LEN];
        bool created = false;
        unsigned p;
        char *err = NULL;

        provision_srk(SRK_ATTRS);
        log_reset();
        assert_int_equal(hubkey_init(&c, &created, &err), 0);
        assert_true(created);
        (void) commands_sent(CC_CREATE_PRIMARY, &p);
        assert_int_equal(p, 0);
        assert_int_equal(hubkey_open(&c, &k, &err), 0);
        assert_int_equal(hubkey_sign(k, "x", 1, sig), 0);
        hubkey_free(k);
        evict_srk();
}

static int setup(_unused_ void **state) {
        swtpm_start(&tpm, "srk");
        return 0;
}

static int teardown(_unused_ void **state) {
        swtpm_stop(&tpm);
        return 0;
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_srk_absent_present_other),
                cmocka_unit_test(test_key_init_under_srk),
        };
        int fd = mkstemp(logfile), r;

        if (fd < 0)
                return 1;
        close(fd);
        /* Read by tpm2-tss at its first log call: every TCTI command, into the file (not stderr). */
        (void) setenv("TSS2_LOG", "tcti+debug", 1);
        (void) setenv("TSS2_LOGFILE", logfile, 1);
        r = cmocka_run_group_tests(tests, setup, teardown);
        (void) unlink(logfile);
        return r;
}
