/* SPDX-License-Identifier: MIT */
/* The broker as the first wall: one broker client and one role per enrolled bulb, kept through
 * mosquitto's dynamic security plugin over the hub's own MQTT connection.
 *
 * The plugin takes {"commands":[...]} on $CONTROL/dynamic-security/v1 and answers every command
 * of one message in one message on .../response, {"responses":[...]}, each answer carrying the
 * command's correlationData back. An operation is one request message: its commands are tagged
 * "iothub-<op id>-<index>", it owns a timer, and it completes when every command is answered,
 * when the timer fires, or when the connection drops. Answers that name no operation of ours
 * (another administrator's, one we gave up on) are ignored. */
#include <inttypes.h>
#include <stdio.h>

#include "iothub/dynsec.h"
#include "iothub/frame.h"
#include "iothub/log.h"
#include "iothub/mqtt.h"
#include "iothub/registry.h"

#define DYNSEC_TAG "iothub-"
#define DYNSEC_ERROR_MAX 256
/* Commands per request: a bound on one message (a bulb's creation is ~400 bytes). */
#define DYNSEC_CMDS_MAX 1024
/* Repairs go in requests of this many commands, one request at a time: the plugin rewrites its
 * JSON file for every change, which takes the single-threaded broker longer the more clients it
 * has (measured: 1,024 commands with 1,000 clients stalled it past a 5 s keepalive), and between
 * two small requests it serves its other clients. */
#define DYNSEC_REPAIR_CMDS 64

enum op_kind {
        OP_USER,      /* bulb add / remove: the caller's callback */
        OP_RECONCILE, /* the hub's role and listClients */
        OP_REPAIR,    /* creations and deletions found by OP_RECONCILE */
};

struct dynsec_op {
        struct dynsec *d;
        struct dynsec_op *next, *prev;
        uint64_t id;
        enum op_kind kind;
        json_t *cmds; /* until sent */
        /* Per command: an error that means "done already", and whether it was answered. */
        struct op_cmd {
                const char *tolerate;
                bool answered;
        } *cmd;
        unsigned n_cmds, cap_cmds, n_answered;
        sd_event_source *timer;
        dynsec_done_fn done;
        void *userdata;
        int r;
        char error[DYNSEC_ERROR_MAX];
        json_t *list; /* OP_RECONCILE: the listClients data */
        unsigned creates, deletes; /* OP_REPAIR: what it asked for */
};

struct dynsec {
        sd_event *event;
        /* Copies: a reload replaces the configuration (and these two keys need a restart). */
        char *prefix, *hub_user;
        unsigned timeout_s;
        struct mqtt *mqtt;
        struct registry *registry;
        struct dynsec_op *ops;
        unsigned n_ops;
        uint64_t next_id;
        /* Tags are "iothub-<run>-<op>-<index>": an answer queued for the persistent session by an
         * earlier run of the daemon never matches an operation of this one. */
        uint32_t run;
        bool connected;
        bool pairing; /* a pairing window is open: anonymous clients may publish hellos */
        /* The last reconciliation, for status. */
        bool reconciled, in_sync;
        uint64_t created, deleted; /* since start */
        uint64_t repairs_pending;  /* repair requests not answered yet */
        struct dynsec_op *repair_queue, *repair_tail; /* not sent yet, linked by next */
        bool repair_in_flight;
        int64_t last_reconcile;    /* Unix seconds */
        char last_error[DYNSEC_ERROR_MAX];
};

bool dynsec_is_response_topic(const char *topic) {
        return topic && streq(topic, DYNSEC_RESPONSE_TOPIC);
}

bool dynsec_ready(const struct dynsec *d) {
        return d && d->connected;
}

int dynsec_password_new(char ret[static DYNSEC_PASSWORD_LEN + 1]) {
        uint8_t raw[DYNSEC_PASSWORD_BYTES];
        char buf[B64URL_BUF(DYNSEC_PASSWORD_BYTES)];
        int r;

        r = random_bytes(raw, sizeof raw);
        if (r < 0)
                return r;
        size_t n = b64url_encode(raw, sizeof raw, buf);
        explicit_bzero(raw, sizeof raw);
        if (n != DYNSEC_PASSWORD_LEN) {
                explicit_bzero(buf, sizeof buf);
                return -EINVAL;
        }
        memcpy(ret, buf, DYNSEC_PASSWORD_LEN + 1);
        explicit_bzero(buf, sizeof buf);
        return 0;
}

/* The plugin's error texts (mosquitto 2.0 plugins/dynamic-security) as errnos. */
static int error_to_errno(const char *e) {
        if (strstr(e, "already exists"))
                return -EEXIST;
        if (strstr(e, "not found"))
                return -ENOENT;
        if (strstr(e, "Invalid") || strstr(e, "invalid"))
                return -EINVAL;
        return -EIO;
}

static void op_unlink(struct dynsec_op *op) {
        struct dynsec *d = op->d;

        if (!d)
                return;
        if (op->next)
                op->next->prev = op->prev;
        if (op->prev)
                op->prev->next = op->next;
        else
                d->ops = op->next;
        op->next = op->prev = NULL;
        d->n_ops--;
        op->d = NULL;
}

static void op_free(struct dynsec_op *op) {
        if (!op)
                return;
        op_unlink(op);
        op->timer = sd_event_source_disable_unref(op->timer);
        json_decref(op->cmds);
        json_decref(op->list);
        free(op->cmd);
        free(op);
}

void dynsec_op_cancel(struct dynsec_op *op) {
        op_free(op);
}

static int on_op_timeout(sd_event_source *s, uint64_t usec, void *userdata);

static struct dynsec_op *op_new(struct dynsec *d, enum op_kind kind) {
        struct dynsec_op *op = calloc(1, sizeof *op);

        if (!op)
                return NULL;
        op->kind = kind;
        op->cmds = json_array();
        if (!op->cmds) {
                free(op);
                return NULL;
        }
        op->id = ++d->next_id;
        return op;
}

/* Appends one command (the reference is taken); tolerate names the plugin's error that means the
 * command's aim holds already ("Role already exists" for a create that is retried). */
static int op_add(struct dynsec_op *op, json_t *cmd, const char *tolerate) {
        if (!cmd)
                return -ENOMEM;
        if (op->n_cmds >= DYNSEC_CMDS_MAX) {
                json_decref(cmd);
                return -E2BIG;
        }
        if (op->n_cmds == op->cap_cmds) {
                unsigned cap = op->cap_cmds ? op->cap_cmds * 2 : 4;
                struct op_cmd *t = reallocarray(op->cmd, cap, sizeof *t);
                if (!t) {
                        json_decref(cmd);
                        return -ENOMEM;
                }
                op->cmd = t;
                op->cap_cmds = cap;
        }
        if (json_array_append_new(op->cmds, cmd) < 0)
                return -ENOMEM;
        op->cmd[op->n_cmds++] = (struct op_cmd){ .tolerate = tolerate };
        return 0;
}

/* Wipes the password members of the commands before they are freed (jansson does not). */
static void cmds_wipe_passwords(json_t *cmds) {
        size_t i;
        json_t *c;

        json_array_foreach(cmds, i, c) {
                json_t *pw = json_object_get(c, "password");
                if (json_is_string(pw))
                        explicit_bzero((char *) json_string_value(pw), json_string_length(pw));
        }
}

/* Sends the operation and links it in; on failure the operation is freed. */
static int op_send(struct dynsec *d, struct dynsec_op *op) {
        _cleanup_free_ char *msg = NULL;
        json_t *req = NULL, *c;
        size_t i, len;
        int r;

        if (!d->connected) {
                r = -ENOTCONN;
                goto fail;
        }
        if (d->n_ops >= DYNSEC_OPS_MAX) {
                r = -EBUSY;
                goto fail;
        }
        json_array_foreach(op->cmds, i, c) {
                char tag[64];
                (void) snprintf(tag, sizeof tag, DYNSEC_TAG "%08" PRIx32 "-%" PRIu64 "-%zu", d->run, op->id, i);
                if (json_object_set_new(c, "correlationData", json_string(tag)) < 0) {
                        r = -ENOMEM;
                        goto fail;
                }
        }
        req = json_pack("{s:O}", "commands", op->cmds);
        if (!req) {
                r = -ENOMEM;
                goto fail;
        }
        msg = json_dumps(req, JSON_COMPACT);
        json_decref(req);
        if (!msg) {
                r = -ENOMEM;
                goto fail;
        }
        len = strlen(msg);
        r = mqtt_publish(d->mqtt, DYNSEC_TOPIC, msg, len, 1, NULL);
        /* A bulb's password was in the message: gone from our memory once handed over. */
        explicit_bzero(msg, len);
        cmds_wipe_passwords(op->cmds);
        if (r < 0)
                goto fail;
        json_decref(op->cmds);
        op->cmds = NULL;
        r = sd_event_add_time_relative(d->event, &op->timer, CLOCK_MONOTONIC,
                                       d->timeout_s * UINT64_C(1000000), 0, on_op_timeout, op);
        if (r < 0)
                goto fail;
        op->d = d;
        op->next = d->ops;
        if (op->next)
                op->next->prev = op;
        d->ops = op;
        d->n_ops++;
        return 0;
fail:
        cmds_wipe_passwords(op->cmds);
        op_free(op);
        return r;
}

static void reconcile_answered(struct dynsec *d, struct dynsec_op *op);
static void repair_answered(struct dynsec *d, struct dynsec_op *op);

/* Ends an operation: its outcome goes where its kind says, then it is freed. */
static void op_complete(struct dynsec_op *op, int r, const char *error) {
        struct dynsec *d = op->d;

        op_unlink(op);
        op->timer = sd_event_source_disable_unref(op->timer);
        if (r < 0 && op->r == 0) {
                op->r = r;
                (void) snprintf(op->error, sizeof op->error, "%s", error ? error : strerror(-r));
        }
        switch (op->kind) {
        case OP_USER:
                if (op->done)
                        op->done(op->userdata, op->r, op->r < 0 ? op->error : NULL);
                break;
        case OP_RECONCILE:
                reconcile_answered(d, op);
                break;
        case OP_REPAIR:
                repair_answered(d, op);
                break;
        }
        op_free(op);
}

static int on_op_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        struct dynsec_op *op = userdata;
        char e[DYNSEC_ERROR_MAX];

        (void) snprintf(e, sizeof e, "the broker did not answer within %u s (is the dynamic security plugin loaded?)",
                        op->d->timeout_s);
        op_complete(op, -ETIMEDOUT, e);
        return 0;
}

static struct dynsec_op *op_find(struct dynsec *d, uint64_t id) {
        for (struct dynsec_op *op = d->ops; op; op = op->next)
                if (op->id == id)
                        return op;
        return NULL;
}

/* "iothub-<run>-<id>-<index>" of this run -> id, index. */
static bool parse_tag(const struct dynsec *d, const char *s, uint64_t *ret_id, unsigned *ret_index) {
        unsigned long long id;
        unsigned run, idx;
        int n = 0;

        if (!s || strncmp(s, DYNSEC_TAG, strlen(DYNSEC_TAG)) != 0)
                return false;
        s += strlen(DYNSEC_TAG);
        if (strlen(s) > 64 || sscanf(s, "%8x-%llu-%u%n", &run, &id, &idx, &n) != 3 || s[n] || run != d->run)
                return false;
        *ret_id = id;
        *ret_index = idx;
        return true;
}

void dynsec_on_message(struct dynsec *d, const uint8_t *payload, size_t len) {
        json_t *root, *responses, *resp;
        json_error_t jerr;
        size_t i;

        if (!d || len > DYNSEC_RESPONSE_MAX)
                return;
        root = json_loadb((const char *) payload, len, JSON_REJECT_DUPLICATES, &jerr);
        responses = json_object_get(root, "responses");
        json_array_foreach(responses, i, resp) {
                const char *error = json_string_value(json_object_get(resp, "error"));
                struct dynsec_op *op;
                uint64_t id;
                unsigned idx;

                if (!parse_tag(d, json_string_value(json_object_get(resp, "correlationData")), &id, &idx))
                        continue;
                op = op_find(d, id);
                if (!op || idx >= op->n_cmds || op->cmd[idx].answered)
                        continue;
                op->cmd[idx].answered = true;
                op->n_answered++;
                if (error && !(op->cmd[idx].tolerate && streq(error, op->cmd[idx].tolerate)) && op->r == 0) {
                        op->r = error_to_errno(error);
                        (void) snprintf(op->error, sizeof op->error, "%s: %s",
                                        json_string_value(json_object_get(resp, "command")) ?: "?", error);
                }
                if (op->kind == OP_RECONCILE && !error &&
                    streq_ptr(json_string_value(json_object_get(resp, "command")), "listClients")) {
                        json_decref(op->list);
                        op->list = json_incref(json_object_get(resp, "data"));
                }
        }
        json_decref(root);
        /* Complete what is fully answered; a callback may start or cancel others: rescan. */
        for (struct dynsec_op *op = d->ops; op;) {
                if (op->n_answered < op->n_cmds) {
                        op = op->next;
                        continue;
                }
                op_complete(op, 0, NULL);
                op = d->ops;
        }
}

static char *topic_of(const struct dynsec *d, const char *id, const char *leaf) {
        return strdup_printf("%s/%s/%s", d->prefix, id, leaf);
}

static json_t *acl(const char *type, char *topic) {
        json_t *o = topic ? json_pack("{s:s,s:s,s:b}", "acltype", type, "topic", topic, "allow", 1) : NULL;
        free(topic);
        return o;
}

/* The role of one bulb (PROTOCOL.md 1 and 2): it publishes its status and its hello, and
 * subscribes to its commands and its acks, by literal topic (no wildcard of its own). With the
 * plugin's default ACL access (publishClientSend and subscribe denied) that is all it may do. */
static json_t *bulb_role_cmd(const struct dynsec *d, const char *id) {
        char rolename[sizeof DYNSEC_BULB_ROLE_PREFIX + DEVICE_ID_MAX];
        json_t *acls;

        (void) snprintf(rolename, sizeof rolename, DYNSEC_BULB_ROLE_PREFIX "%s", id);
        acls = json_pack("[o,o,o,o]", acl("publishClientSend", topic_of(d, id, "status")),
                         acl("publishClientSend", topic_of(d, id, "hello")),
                         acl("subscribeLiteral", topic_of(d, id, "cmd")),
                         acl("subscribeLiteral", topic_of(d, id, "ack")));
        if (!acls)
                return NULL;
        return json_pack("{s:s,s:s,s:s,s:o}", "command", "createRole", "rolename", rolename, "textname",
                         DYNSEC_BULB_TEXTNAME, "acls", acls);
}

static int op_add_bulb_create(struct dynsec *d, struct dynsec_op *op, const char *id, const char *password,
                              bool repair) {
        char rolename[sizeof DYNSEC_BULB_ROLE_PREFIX + DEVICE_ID_MAX];
        json_t *client;
        int r;

        (void) snprintf(rolename, sizeof rolename, DYNSEC_BULB_ROLE_PREFIX "%s", id);
        /* A role left by an earlier run is the same role: reuse it. */
        r = op_add(op, bulb_role_cmd(d, id), "Role already exists");
        if (r < 0)
                return r;
        client = json_pack("{s:s,s:s,s:s,s:[{s:s}]}", "command", "createClient", "username", id, "textname",
                           DYNSEC_BULB_TEXTNAME, "roles", "rolename", rolename);
        if (client && password && json_object_set_new(client, "password", json_string(password)) < 0) {
                json_decref(client);
                client = NULL;
        }
        /* A repair races with a 'bulb add' that created the client meanwhile: that is success. */
        return op_add(op, client, repair ? "Client already exists" : NULL);
}

static int op_add_bulb_delete(struct dynsec_op *op, const char *id) {
        char rolename[sizeof DYNSEC_BULB_ROLE_PREFIX + DEVICE_ID_MAX];
        int r;

        (void) snprintf(rolename, sizeof rolename, DYNSEC_BULB_ROLE_PREFIX "%s", id);
        /* deleteClient disconnects the bulb at once (the plugin kicks the user name). */
        r = op_add(op, json_pack("{s:s,s:s}", "command", "deleteClient", "username", id), "Client not found");
        if (r >= 0)
                r = op_add(op, json_pack("{s:s,s:s}", "command", "deleteRole", "rolename", rolename), "Role not found");
        return r;
}

static int user_op(struct dynsec *d, struct dynsec_op *op, dynsec_done_fn done, void *userdata,
                   struct dynsec_op **ret) {
        int r;

        op->done = done;
        op->userdata = userdata;
        r = op_send(d, op);
        if (r < 0)
                return r;
        *ret = op;
        return 0;
}

int dynsec_bulb_create(struct dynsec *d, const char *id, const char *password, dynsec_done_fn done,
                       void *userdata, struct dynsec_op **ret) {
        struct dynsec_op *op;
        int r;

        if (!d)
                return -EOPNOTSUPP;
        if (!device_id_is_valid(id, strlen(id)))
                return -EINVAL;
        if (password && (strlen(password) != DYNSEC_PASSWORD_LEN || !b64url_chars_are_valid(password, strlen(password))))
                return -EINVAL;
        if (!d->connected)
                return -ENOTCONN;
        op = op_new(d, OP_USER);
        if (!op)
                return -ENOMEM;
        r = op_add_bulb_create(d, op, id, password, false);
        if (r < 0) {
                cmds_wipe_passwords(op->cmds);
                op_free(op);
                return r;
        }
        return user_op(d, op, done, userdata, ret);
}

int dynsec_bulb_delete(struct dynsec *d, const char *id, dynsec_done_fn done, void *userdata,
                       struct dynsec_op **ret) {
        struct dynsec_op *op;
        int r;

        if (!d)
                return -EOPNOTSUPP;
        if (!device_id_is_valid(id, strlen(id)))
                return -EINVAL;
        if (!d->connected)
                return -ENOTCONN;
        op = op_new(d, OP_USER);
        if (!op)
                return -ENOMEM;
        r = op_add_bulb_delete(op, id);
        if (r < 0) {
                op_free(op);
                return r;
        }
        return user_op(d, op, done, userdata, ret);
}

static void set_last_error(struct dynsec *d, const char *fmt, ...) _printf_(2, 3);
static void set_last_error(struct dynsec *d, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(d->last_error, sizeof d->last_error, fmt, ap);
        va_end(ap);
}

/* Pairing (PROTOCOL.md 1): a bulb that is not enrolled has no broker identity, so its hello comes
 * from an anonymous client. The plugin's anonymous group gets a role that may publish only
 * <prefix>/+/hello, and only while a window is open; otherwise anonymous clients may do nothing
 * (the plugin's default ACL access denies publishing and subscribing). */
static json_t *pairing_group_role_cmd(bool open) {
        return json_pack("{s:s,s:s,s:s}", "command", open ? "addGroupRole" : "removeGroupRole", "groupname",
                         DYNSEC_PAIRING_NAME, "rolename", DYNSEC_PAIRING_NAME);
}

static int op_add_pairing_setup(struct dynsec *d, struct dynsec_op *op) {
        _cleanup_free_ char *hello = strdup_printf("%s/+/hello", d->prefix);
        int r;

        if (!hello)
                return -ENOMEM;
        r = op_add(op, json_pack("{s:s,s:s}", "command", "createGroup", "groupname", DYNSEC_PAIRING_NAME),
                   "Group already exists");
        if (r >= 0)
                r = op_add(op, json_pack("{s:s,s:s,s:[{s:s,s:s,s:b}]}", "command", "createRole", "rolename",
                                         DYNSEC_PAIRING_NAME, "acls", "acltype", "publishClientSend", "topic", hello,
                                         "allow", 1),
                           "Role already exists");
        if (r >= 0)
                r = op_add(op, json_pack("{s:s,s:s}", "command", "setAnonymousGroup", "groupname", DYNSEC_PAIRING_NAME),
                           NULL);
        /* As the hub last left it: closed unless a window is open (a crash mid-window, say). */
        if (r >= 0)
                r = op_add(op, pairing_group_role_cmd(d->pairing), "Group is already in this role");
        return r;
}

int dynsec_pairing(struct dynsec *d, bool open, dynsec_done_fn done, void *userdata, struct dynsec_op **ret) {
        struct dynsec_op *op;
        int r;

        if (!d)
                return -EOPNOTSUPP;
        d->pairing = open; /* also what the next reconciliation restores */
        if (!d->connected)
                return -ENOTCONN;
        op = op_new(d, OP_USER);
        if (!op)
                return -ENOMEM;
        r = op_add(op, pairing_group_role_cmd(open), "Group is already in this role");
        if (r < 0) {
                op_free(op);
                return r;
        }
        op->done = done;
        op->userdata = userdata;
        r = op_send(d, op);
        if (r < 0)
                return r;
        if (ret)
                *ret = op;
        return 0;
}

/* The start of a reconciliation: the hub's own role (commands and acks to every bulb; reading
 * every status topic the administrator's role gives already), then the list of clients. */
static int reconcile_start(struct dynsec *d) {
        _cleanup_free_ char *cmd = NULL, *ack = NULL;
        struct dynsec_op *op;
        json_t *role;
        int r;

        op = op_new(d, OP_RECONCILE);
        if (!op)
                return -ENOMEM;
        cmd = strdup_printf("%s/+/cmd", d->prefix);
        ack = strdup_printf("%s/+/ack", d->prefix);
        role = cmd && ack ? json_pack("{s:s,s:s,s:s,s:[{s:s,s:s,s:b},{s:s,s:s,s:b}]}", "command", "createRole",
                                      "rolename", DYNSEC_HUB_ROLE, "textname", "iothub hub", "acls", "acltype",
                                      "publishClientSend", "topic", cmd, "allow", 1, "acltype",
                                      "publishClientSend", "topic", ack, "allow", 1)
                          : NULL;
        r = op_add(op, role, "Role already exists");
        if (r >= 0)
                r = op_add_pairing_setup(d, op);
        if (r >= 0)
                r = op_add(op, json_pack("{s:s,s:b,s:i,s:i}", "command", "listClients", "verbose", 1, "count", -1,
                                         "offset", 0),
                           NULL);
        if (r < 0) {
                op_free(op);
                return r;
        }
        return op_send(d, op);
}

static bool client_has_role(json_t *client, const char *rolename) {
        size_t i;
        json_t *role;

        json_array_foreach(json_object_get(client, "roles"), i, role)
                if (streq_ptr(json_string_value(json_object_get(role, "rolename")), rolename))
                        return true;
        return false;
}

static int cmp_str(const void *a, const void *b) {
        return strcmp(*(const char *const *) a, *(const char *const *) b);
}

static void repair_queue_free(struct dynsec *d) {
        while (d->repair_queue) {
                struct dynsec_op *op = d->repair_queue;
                d->repair_queue = op->next;
                op->next = NULL;
                op_free(op);
        }
        d->repair_tail = NULL;
        d->repair_in_flight = false;
        d->repairs_pending = 0;
}

/* Sends the next queued repair when none is in flight. */
static void repair_pump(struct dynsec *d) {
        while (!d->repair_in_flight && d->repair_queue) {
                struct dynsec_op *op = d->repair_queue;
                int r;

                d->repair_queue = op->next;
                if (!d->repair_queue)
                        d->repair_tail = NULL;
                op->next = NULL;
                r = op_send(d, op);
                if (r < 0) {
                        d->repairs_pending--;
                        d->in_sync = false;
                        set_last_error(d, "repair: cannot send: %s", strerror(-r));
                        continue;
                }
                d->repair_in_flight = true;
        }
}

static int repair_send(struct dynsec *d, struct dynsec_op **op) {
        struct dynsec_op *o = TAKE_PTR(*op);

        if (!o)
                return 0;
        if (o->n_cmds == 0) {
                op_free(o);
                return 0;
        }
        if (d->repair_tail)
                d->repair_tail->next = o;
        else
                d->repair_queue = o;
        d->repair_tail = o;
        d->repairs_pending++;
        repair_pump(d);
        return 0;
}

/* The broker's clients against the registry: an enrolled bulb without a client gets one (no
 * password: a bulb with a certificate connects again at once; one with a password needs a new
 * one), a client marked DYNSEC_BULB_TEXTNAME without an enrolled bulb goes. Nothing else on
 * the broker is touched. */
static void reconcile_answered(struct dynsec *d, struct dynsec_op *done) {
        struct dynsec_op *op = NULL;
        bool hub_needs_role = false;
        size_t i, n_reg;
        json_t *clients, *c;
        int r = 0;

        d->last_reconcile = (int64_t) time(NULL);
        if (done->r < 0) {
                d->in_sync = false;
                set_last_error(d, "reconciliation: %s", done->error);
                return;
        }
        clients = json_object_get(done->list, "clients");
        if (!json_is_array(clients)) {
                d->in_sync = false;
                set_last_error(d, "reconciliation: listClients gave no client list");
                return;
        }
        d->reconciled = true;
        d->last_error[0] = '\0';
        unsigned creates = 0, deletes = 0;
        /* Extra: ours by mark, no enrolled (unrevoked) bulb of that id. */
        json_array_foreach(clients, i, c) {
                const char *user = json_string_value(json_object_get(c, "username"));
                const char *text = json_string_value(json_object_get(c, "textname"));
                struct bulb *b;

                if (!user)
                        continue;
                if (d->hub_user && streq(user, d->hub_user))
                        hub_needs_role = !client_has_role(c, DYNSEC_HUB_ROLE);
                if (!streq_ptr(text, DYNSEC_BULB_TEXTNAME) || !device_id_is_valid(user, strlen(user)))
                        continue;
                b = registry_find(d->registry, user);
                if (b && !b->revoked)
                        continue;
                if (!op && !(op = op_new(d, OP_REPAIR))) {
                        r = -ENOMEM;
                        break;
                }
                r = op_add_bulb_delete(op, user);
                if (r >= 0) {
                        op->deletes++;
                        deletes++;
                }
                if (r >= 0 && op->n_cmds + 2 > DYNSEC_REPAIR_CMDS)
                        r = repair_send(d, &op);
                if (r < 0)
                        break;
        }
        /* Missing: an enrolled bulb whose user name the broker does not know (sorted names and a
         * binary search: 5,000 bulbs against 5,000 clients stay cheap). */
        size_t n_names = 0;
        _cleanup_free_ const char **names = calloc(json_array_size(clients) + 1, sizeof *names);
        if (!names)
                r = -ENOMEM;
        json_array_foreach(clients, i, c) {
                const char *user = json_string_value(json_object_get(c, "username"));
                if (user && names)
                        names[n_names++] = user;
        }
        if (names)
                qsort(names, n_names, sizeof *names, cmp_str);
        n_reg = registry_count(d->registry);
        for (size_t k = 0; r >= 0 && k < n_reg; k++) {
                struct bulb *b = registry_get(d->registry, k);
                const char *key = b->id;

                if (b->revoked || bsearch(&key, names, n_names, sizeof *names, cmp_str))
                        continue;
                if (!op && !(op = op_new(d, OP_REPAIR))) {
                        r = -ENOMEM;
                        break;
                }
                r = op_add_bulb_create(d, op, b->id, NULL, true);
                if (r >= 0) {
                        op->creates++;
                        creates++;
                }
                if (r >= 0 && op->n_cmds + 2 > DYNSEC_REPAIR_CMDS)
                        r = repair_send(d, &op);
        }
        /* Last: adding a role to a client makes the plugin disconnect it to apply the change, and
         * this one is the hub's own connection; the next connection finds the role in place. */
        if (r >= 0 && hub_needs_role) {
                if (!op && !(op = op_new(d, OP_REPAIR)))
                        r = -ENOMEM;
                else
                        r = op_add(op, json_pack("{s:s,s:s,s:s}", "command", "addClientRole", "username",
                                                 d->hub_user, "rolename", DYNSEC_HUB_ROLE),
                                   NULL);
        }
        if (r >= 0)
                r = repair_send(d, &op);
        op_free(op);
        if (r < 0) {
                d->in_sync = false;
                set_last_error(d, "reconciliation: cannot send the repairs: %s", strerror(-r));
                return;
        }
        d->in_sync = d->repairs_pending == 0;
        if (creates || deletes)
                log_info("Broker clients: %u enrolled bulbs had none, created; %u of removed bulbs, deleted",
                         creates, deletes);
}

static void repair_answered(struct dynsec *d, struct dynsec_op *op) {
        d->repair_in_flight = false;
        if (d->repairs_pending > 0)
                d->repairs_pending--;
        if (op->r < 0) {
                d->in_sync = false;
                set_last_error(d, "repair: %s", op->error);
        } else {
                d->created += op->creates;
                d->deleted += op->deletes;
                if (d->repairs_pending == 0 && !d->last_error[0])
                        d->in_sync = true;
        }
        repair_pump(d);
}

void dynsec_connected(struct dynsec *d, bool connected) {
        int r;

        if (!d)
                return;
        d->connected = connected;
        if (!connected) {
                repair_queue_free(d);
                while (d->ops)
                        /* op_complete() unlinks it from op->d->ops, and op->d is d:
                         * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
                        op_complete(d->ops, -ENOTCONN, "the connection to the broker was lost");
                return;
        }
        r = reconcile_start(d);
        if (r < 0) {
                d->in_sync = false;
                set_last_error(d, "reconciliation: cannot ask the broker: %s", strerror(-r));
        }
}

int dynsec_new(sd_event *e, const struct iothub_conf *conf, struct mqtt *m, struct registry *registry,
               struct dynsec **ret) {
        struct dynsec *d = calloc(1, sizeof *d);

        if (!d)
                return -ENOMEM;
        d->event = sd_event_ref(e);
        int r = random_bytes(&d->run, sizeof d->run);
        if (r < 0) {
                dynsec_free(d);
                return r;
        }
        d->timeout_s = conf->broker.timeout_s;
        d->prefix = strdup(conf->mqtt.topic_prefix);
        d->hub_user = conf->mqtt.username ? strdup(conf->mqtt.username) : NULL;
        if (!d->prefix || (conf->mqtt.username && !d->hub_user)) {
                dynsec_free(d);
                return -ENOMEM;
        }
        d->mqtt = m;
        d->registry = registry;
        *ret = d;
        return 0;
}

void dynsec_free(struct dynsec *d) {
        if (!d)
                return;
        repair_queue_free(d);
        while (d->ops)
                /* op_free() unlinks it from op->d->ops, and op->d is d:
                 * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
                op_free(d->ops);
        sd_event_unref(d->event);
        free(d->prefix);
        free(d->hub_user);
        free(d);
}

int dynsec_status_json(const struct dynsec *d, json_t *status) {
        json_t *o;

        if (!d)
                o = json_pack("{s:b}", "enabled", 0);
        else
                o = json_pack("{s:b,s:b,s:b,s:I,s:I,s:s?,s:I}", "enabled", 1, "connected", d->connected, "in_sync",
                              d->reconciled && d->in_sync, "created", (json_int_t) d->created, "deleted",
                              (json_int_t) d->deleted, "last_error", d->last_error[0] ? d->last_error : NULL,
                              "last_reconcile", (json_int_t) d->last_reconcile);
        if (!o || json_object_set_new(status, "broker", o) < 0)
                return -ENOMEM;
        return 0;
}
