/* SPDX-License-Identifier: MIT */
/* The configuration file /etc/iothub.conf (DESIGN.md "Configuration"), parsed with libinih. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "iothub/util.h"

#define IOTHUB_DEFAULT_CONFIG "/etc/iothub.conf"

enum key_backend { KEY_BACKEND_TPM, KEY_BACKEND_FILE };
enum dpop_mode { DPOP_AUTO, DPOP_ON, DPOP_OFF };
/* [cloud] attestation: auto = with a TPM key that has an EK certificate; on = always (refuses a
 * file key); off = never. */
enum attest_mode { ATTEST_AUTO, ATTEST_ON, ATTEST_OFF };

struct iothub_conf {
        char *path; /* the file it was read from */
        struct {
                char *id;          /* from the file, else /etc/machine-id */
                char *state_dir;   /* else $STATE_DIRECTORY, else /var/lib/iothub */
                char *runtime_dir; /* else $RUNTIME_DIRECTORY, else /run/iothub */
        } hub;
        struct {
                char *host;
                uint16_t port;
                char *topic_prefix;
                char *client_id; /* default "iothubd-<hub id>" */
                char *username;
                char *password_file;
                char *ca_file;
                unsigned keepalive_s;
        } mqtt;
        struct {
                enum key_backend backend;
                char *tcti;
                uint32_t handle;
                char *file;
        } key;
        struct {
                char *url;
                char *ca_file;
                unsigned batch_max_frames;
                unsigned batch_max_delay_ms;
                unsigned timeout_s;
                char *bearer_token_file;
                enum attest_mode attestation;
                char *command_key_file;      /* the vendor's command key, PEM P-256 (PROTOCOL.md 5) */
                unsigned events_interval_s;  /* security events: one POST per interval at most */
        } cloud;
        struct {
                char *issuer;
                char *client_id;
                char *scope;
                enum dpop_mode dpop;
                char *ca_file;
        } oauth;
        struct {
                unsigned max_bytes;
                unsigned max_clock_skew_s;
                unsigned commit_delay_ms; /* hold accepted frames up to this long for one commit */
                double rate_per_device; /* frames per second, token bucket */
        } frames;
        struct {
                char *ca_file;
        } bulbs;
        struct {
                bool dynsec;        /* keep per-bulb broker clients through the dynamic security plugin */
                unsigned timeout_s; /* bound of one request to the plugin */
        } broker;
        struct {
                uint64_t max_bytes;
        } spool;
        /* iothub-signer(8): the program that alone opens the TPM and the sealed tokens. */
        struct {
                char *socket;        /* where iothubd connects, where the signer listens without systemd */
                /* The two peers (SO_PEERCRED) the signer serves, each a user name or uid with its op
                 * set (signer-policy.h): iothub-uplink's and iothubd's. */
                char *client_user;   /* KEY_INFO, SIGN_HTTP, SIGN_DPOP, TOKENS_*, ATTEST_*, STATUS */
                char *command_user;  /* KEY_INFO, SIGN_COMMAND, STATUS */
                char *state_dir;     /* the signer's sealed token files */
                bool state_dir_set;  /* by the file; if not, the signer takes $STATE_DIRECTORY first */
                unsigned rate_per_s; /* token bucket over all signing ops */
                unsigned burst;
        } signer;
        /* iothub-uplink(8) (issue 14 stage 2): the cloud-facing program, HTTPS and OAuth. */
        struct {
                char *socket;      /* where iothubd connects, where the uplink listens without systemd */
                char *client_user; /* the only peer (SO_PEERCRED) the uplink serves: a user name or uid */
        } uplink;
};

/* Fill every key with its default (for the hub id and directories: the environment and
 * /etc/machine-id). Returns 0 or a negative errno. */
int conf_defaults(struct iothub_conf **ret);

/* Read and validate 'path'. On failure returns a negative errno (-EINVAL for a bad file,
 * -ENOENT etc. when it cannot be read) and, if ret_error is not NULL, a malloc'ed one-line
 * message naming the file, the line and the reason ("/etc/iothub.conf:12: [mqtt] port: 70000 is
 * out of range 1..65535"). Never prints. */
int conf_load(const char *path, struct iothub_conf **ret, char **ret_error);

void conf_free(struct iothub_conf *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct iothub_conf *, conf_free);
#define _cleanup_conf_ _cleanup_(conf_freep)

const char *key_backend_to_string(enum key_backend b);
const char *dpop_mode_to_string(enum dpop_mode m);
const char *attest_mode_to_string(enum attest_mode m);
