/* SPDX-License-Identifier: MIT */
/* The channels' server loop (include/iothub/chanserver.h), shared by iothub-signer and
 * iothub-uplink. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <systemd/sd-daemon.h>

#include "iothub/chanserver.h"
#include "iothub/conf.h"
#include "iothub/log.h"
#include "iothub/util.h"

struct chan_conn {
        struct chan_server *s;
        struct chan_conn *next;
        void *data; /* the program's */
        int fd;
        sd_event_source *io;
        uid_t uid;
        uint8_t *in;
        size_t in_len, in_cap;
        struct tlv_buf out;
        unsigned inflight, parked;
        bool closing;    /* a malformed message: answer, then close */
        bool eof;        /* the client shut down its sending side: answer what it asked, then close */
        bool resume;     /* requests held back by the limits may go on (on_resume()) */
        bool processing; /* in conn_process(): a dispatch must not run it again */
};

struct chan_server {
        const struct chan_server_config *cfg;
        void *userdata;
        sd_event *event;
        int listen_fd;
        char *listen_path; /* ours to unlink at exit; NULL: systemd's socket */
        sd_event_source *listen_io, *resume_src;
        sd_event_source *sig[3];
        struct chan_conn *conns;
        unsigned n_conns;
        struct ratelimit log_peer, log_malformed;
        uint64_t refused_peer, malformed;
};

bool chan_log_allowed(struct ratelimit *rl) {
        uint64_t suppressed = 0;
        bool ok = ratelimit_allow(rl, now_monotonic_usec(), CHAN_LOG_WINDOW_USEC, CHAN_LOG_BURST,
                                  &suppressed);

        if (suppressed > 0)
                log_notice("Suppressed %" PRIu64 " similar messages", suppressed);
        return ok;
}

/* ---- a connection ---- */

static void conn_free(struct chan_conn *c);

static bool conn_may_read(const struct chan_conn *c) {
        return !c->closing && c->inflight < c->s->cfg->inflight_max && c->out.len < c->s->cfg->out_max;
}

static void conn_update_events(struct chan_conn *c) {
        uint32_t ev = 0;

        if (!c->io)
                return;
        /* After EOF the socket stays readable: no EPOLLIN then, or the loop would spin. */
        if (!c->eof && conn_may_read(c))
                ev |= EPOLLIN;
        if (c->out.len > 0)
                ev |= EPOLLOUT;
        (void) sd_event_source_set_io_events(c->io, ev);
}

int chan_answer_begin(struct chan_conn *c, uint32_t id, unsigned op, int status) {
        if (status < INT16_MIN)
                status = -EIO;
        return tlv_msg_begin(&c->out, c->s->cfg->proto, id, op, true, status);
}

struct tlv_buf *chan_conn_out(struct chan_conn *c) {
        return &c->out;
}

void chan_answer_error(struct chan_conn *c, uint32_t id, unsigned op, int status) {
        if (chan_answer_begin(c, id, op, status) >= 0)
                (void) tlv_msg_end(&c->out);
        conn_update_events(c);
}

int chan_answer_end(struct chan_conn *c, uint32_t id, unsigned op) {
        int r = tlv_msg_end(&c->out);

        if (r < 0) {
                chan_answer_error(c, id, op, r == -EINVAL ? -EIO : r);
                return r;
        }
        conn_update_events(c);
        return 0;
}

void *chan_conn_data(const struct chan_conn *c) {
        return c->data;
}

uid_t chan_conn_uid(const struct chan_conn *c) {
        return c->uid;
}

struct chan_conn *chan_conn_next(struct chan_conn *c) {
        return c->next;
}

void chan_conn_hold(struct chan_conn *c) {
        c->inflight++;
        conn_update_events(c);
}

/* Requests already read but held back (inflight_max in flight, or out_max of answers queued) go
 * on once there is room again: the client may be waiting for an answer and send nothing more.
 * Not from here (the caller is in the middle of its answer, perhaps of a dispatch), but from the
 * loop, next. */
void chan_conn_release(struct chan_conn *c) {
        if (c->inflight > 0)
                c->inflight--;
        if (c->parked > c->inflight)
                c->parked = c->inflight;
        if (c->in_len > 0 && !c->resume) {
                c->resume = true;
                (void) sd_event_source_set_enabled(c->s->resume_src, SD_EVENT_ONESHOT);
        }
        conn_update_events(c);
}

void chan_conn_set_parked(struct chan_conn *c, unsigned n) {
        c->parked = n < c->inflight ? n : c->inflight;
}

static void conn_malformed(struct chan_conn *c, uint32_t id, unsigned op, const char *why) {
        struct chan_server *s = c->s;

        s->malformed++;
        if (chan_log_allowed(&s->log_malformed))
                log_event(LOG_WARNING, 0, s->cfg->mid_malformed, NULL, why,
                          "Malformed request from uid %u (%s): answered -EBADMSG, connection closed",
                          (unsigned) c->uid, why);
        /* The WIRE FORMAT of iothub-signer(8) and iothub-uplink(8): the answer echoes the op as
         * sent (an unknown one too, without the answer bit), or 0 when the header could not be
         * read. */
        chan_answer_error(c, id, op & ~TLV_ANSWER, -EBADMSG);
        c->closing = true;
        conn_update_events(c);
}

/* Decodes and runs the complete messages in the input buffer. */
static void conn_process(struct chan_conn *c) {
        const struct tlv_proto *p = c->s->cfg->proto;
        size_t at = 0;

        if (c->processing)
                return;
        c->processing = true;
        while (conn_may_read(c)) {
                struct tlv_msg m;
                size_t need = 0;
                uint32_t id = 0;
                int r;

                r = tlv_msg_frame(p, c->in + at, c->in_len - at, &need);
                if (r == 0)
                        break;
                if (r < 0) {
                        conn_malformed(c, 0, 0, "length out of range");
                        break;
                }
                if (tlv_msg_decode(p, c->in + at, need, &m) < 0) {
                        unsigned op = 0;
                        (void) tlv_msg_peek_id(c->in + at, need, &id);
                        if (need >= TLV_HEADER_LEN)
                                op = (unsigned) (c->in[at + 8] << 8 | c->in[at + 9]) & ~TLV_ANSWER;
                        conn_malformed(c, id, op, "does not decode");
                        break;
                }
                at += need;
                if (m.answer) {
                        conn_malformed(c, m.id, m.op, "an answer sent to the server");
                        break;
                }
                r = c->s->cfg->dispatch(c->s->userdata, c, &m);
                if (r < 0)
                        chan_answer_error(c, m.id, m.op, r);
        }
        c->processing = false;
        if (at > 0) {
                /* The consumed requests may hold tokens, an Authorization value or bodies. */
                OPENSSL_cleanse(c->in, at);
                memmove(c->in, c->in + at, c->in_len - at);
                c->in_len -= at;
        }
        if (c->in_len == 0 && c->in_cap > CHAN_IN_KEEP) {
                OPENSSL_cleanse(c->in, c->in_cap);
                free(c->in);
                c->in = NULL;
                c->in_cap = 0;
        }
        conn_update_events(c);
}

static int conn_read(struct chan_conn *c) {
        const struct tlv_proto *p = c->s->cfg->proto;
        size_t need = 0, want;
        ssize_t n;

        /* Room for the message being read (its size is known once its prefix is in), at most
         * one message: what a peer can make us hold is bounded by the table's msg_max. */
        if (tlv_msg_frame(p, c->in, c->in_len, &need) < 0)
                return -EBADMSG;
        want = need > c->in_len ? need : c->in_len + TLV_PREFIX_LEN;
        if (want < 4096)
                want = 4096;
        if (want > TLV_PREFIX_LEN + (size_t) p->msg_max)
                want = TLV_PREFIX_LEN + (size_t) p->msg_max;
        if (c->in_cap < want) {
                uint8_t *b = malloc(want);
                if (!b)
                        return -ENOMEM;
                if (c->in) {
                        memcpy(b, c->in, c->in_len);
                        OPENSSL_cleanse(c->in, c->in_cap);
                        free(c->in);
                }
                c->in = b;
                c->in_cap = want;
        }
        if (c->in_len == c->in_cap)
                return 0;
        n = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
        if (n < 0)
                return errno == EAGAIN || errno == EINTR ? 0 : -errno;
        if (n == 0) {
                /* shutdown(SHUT_WR) after the requests is a client saying it has no more: the
                 * requests read are still answered (conn_finished()). A message cut short by it
                 * is dropped with the connection. */
                c->eof = true;
                return 0;
        }
        c->in_len += (size_t) n;
        return 1;
}

static int conn_write(struct chan_conn *c) {
        ssize_t n;

        if (c->out.len == 0)
                return 0;
        n = send(c->fd, c->out.data, c->out.len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0)
                return errno == EAGAIN || errno == EINTR ? 0 : -errno;
        tlv_buf_consume(&c->out, (size_t) n);
        return 0;
}

/* Whether the connection has nothing left to do: a malformed message answered, or the client
 * done sending (EOF) and every request it sent answered (but the parked ones) and its answer
 * written. */
static bool conn_finished(struct chan_conn *c) {
        size_t need = 0;

        if (c->out.len > 0)
                return false;
        if (c->closing)
                return true;
        /* None complete still to run (held back by the limits). */
        return c->eof && c->inflight == c->parked &&
               tlv_msg_frame(c->s->cfg->proto, c->in, c->in_len, &need) <= 0;
}

/* Runs what was held back, writes, and tells whether the connection is done. */
static int conn_resume(struct chan_conn *c) {
        c->resume = false;
        if (c->in_len > 0 && conn_may_read(c))
                conn_process(c);
        if (c->out.len > 0 && conn_write(c) < 0)
                return -EPIPE;
        return conn_finished(c) ? 1 : 0;
}

static int on_conn_io(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct chan_conn *c = userdata;
        int r;

        if (revents & EPOLLOUT) {
                r = conn_write(c);
                if (r < 0)
                        goto drop;
                /* Requests held back by the limits go on once there is room. */
                if (c->in_len > 0 && conn_may_read(c))
                        conn_process(c);
        }
        if (conn_finished(c))
                goto drop;
        /* The peer is gone both ways: nobody to answer. */
        if (revents & (EPOLLHUP | EPOLLERR))
                goto drop;
        if (revents & EPOLLIN) {
                r = c->closing ? 0 : conn_read(c);
                if (r == -EBADMSG) {
                        conn_malformed(c, 0, 0, "length out of range");
                        return 0;
                }
                if (r < 0)
                        goto drop;
                conn_process(c);
                /* Answer at once what could be answered at once. */
                if (c->out.len > 0 && conn_write(c) < 0)
                        goto drop;
                if (conn_finished(c))
                        goto drop;
        }
        conn_update_events(c);
        return 0;
drop:
        conn_free(c);
        return 0;
}

static int on_resume(sd_event_source *src, void *userdata) {
        struct chan_server *s = userdata;
        struct chan_conn *c, *next;

        for (c = s->conns; c; c = next) {
                next = c->next;
                if (c->resume && conn_resume(c) != 0)
                        conn_free(c);
                else
                        conn_update_events(c);
        }
        return 0;
}

static void conn_free(struct chan_conn *c) {
        struct chan_server *s;

        if (!c)
                return;
        s = c->s;
        for (struct chan_conn **p = &s->conns; *p; p = &(*p)->next)
                if (*p == c) {
                        *p = c->next;
                        s->n_conns--;
                        break;
                }
        /* Cancels what the client still waited for (the program's requests). */
        if (s->cfg->conn_free)
                s->cfg->conn_free(s->userdata, c, c->data);
        sd_event_source_disable_unref(c->io);
        if (c->fd >= 0)
                (void) close(c->fd);
        if (c->in) {
                OPENSSL_cleanse(c->in, c->in_cap);
                free(c->in);
        }
        tlv_buf_done(&c->out);
        free(c);
}

static int on_accept(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        struct chan_server *s = userdata;
        struct ucred cred = {};
        socklen_t len = sizeof cred;
        _cleanup_close_ int cfd = -1;
        struct chan_conn *c;
        int r;

        cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) {
                if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                        log_warning_errno(errno, "accept() failed: %m");
                return 0;
        }
        if (getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || len != sizeof cred) {
                log_warning_errno(errno, "SO_PEERCRED failed: %m");
                return 0;
        }
        c = calloc(1, sizeof *c);
        if (!c)
                return 0;
        c->s = s;
        c->uid = cred.uid;
        c->fd = -1;
        /* The program's peers only. Root gets no exception (each unit runs its program as its
         * own user; root can reach what the program guards itself). */
        r = s->cfg->conn_new(s->userdata, c, &cred, &c->data);
        if (r == -EPERM) {
                s->refused_peer++;
                if (chan_log_allowed(&s->log_peer))
                        log_event(LOG_WARNING, 0, s->cfg->mid_peer_refused, NULL, NULL,
                                  "Refused a connection from uid %u pid %d: %s", (unsigned) cred.uid,
                                  (int) cred.pid, s->cfg->peer_rule);
                free(c);
                return 0;
        }
        if (r < 0) {
                log_warning_errno(r, "Failed to take a connection from pid %d: %m", (int) cred.pid);
                free(c);
                return 0;
        }
        if (s->n_conns >= s->cfg->conn_max) {
                if (chan_log_allowed(&s->log_peer))
                        log_warning("Refused a connection from pid %d: %u connections already",
                                    (int) cred.pid, s->cfg->conn_max);
                if (s->cfg->conn_free)
                        s->cfg->conn_free(s->userdata, c, c->data);
                free(c);
                return 0;
        }
        r = sd_event_add_io(s->event, &c->io, cfd, EPOLLIN, on_conn_io, c);
        if (r < 0) {
                log_warning_errno(r, "Failed to watch a connection: %m");
                if (s->cfg->conn_free)
                        s->cfg->conn_free(s->userdata, c, c->data);
                free(c);
                return 0;
        }
        (void) sd_event_source_set_description(c->io, s->cfg->conn_description);
        c->fd = TAKE_FD(cfd);
        c->next = s->conns;
        s->conns = c;
        s->n_conns++;
        log_debug("Connection from pid %d", (int) cred.pid);
        return 0;
}

/* ---- the server ---- */

static int on_signal(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata) {
        struct chan_server *s = userdata;

        (void) sd_notify(false, "STOPPING=1\nSTATUS=Stopping");
        log_event(LOG_INFO, 0, IOTHUB_MID_STOPPING, NULL, NULL, "%s stopping", s->cfg->name);
        return sd_event_exit(s->event, 0);
}

/* The configuration is read at start only (the signer's policy is its configuration, and a
 * reload would have to agree with iothubd's, which restarts with it). SIGHUP must not end the
 * program either. */
static int on_sighup(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata) {
        struct chan_server *s = userdata;

        log_notice("SIGHUP: %s reads its configuration at start only; restart it to apply changes",
                   s->cfg->name);
        return 0;
}

static int server_listen(struct chan_server *s, const char *listen_path, const char *fallback_path,
                         char **ret_error) {
        int n, r;

        /* Socket activation (the .socket unit keeps the socket across restarts), else
         * --listen, else the configured path. */
        n = listen_path ? 0 : sd_listen_fds(true);
        if (n > 1)
                return set_error_message(ret_error, -EINVAL, "Got %d sockets from systemd, expected one", n);
        if (n == 1) {
                if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0)
                        return set_error_message(
                                ret_error, -EINVAL,
                                "The socket from systemd is not a listening unix stream socket");
                s->listen_fd = SD_LISTEN_FDS_START;
                (void) fcntl(s->listen_fd, F_SETFL, fcntl(s->listen_fd, F_GETFL) | O_NONBLOCK);
                return 0;
        }
        s->listen_path = strdup(listen_path ?: fallback_path);
        if (!s->listen_path)
                return -ENOMEM;
        r = unix_listen(s->listen_path, CHAN_LISTEN_BACKLOG, &s->listen_fd);
        if (r < 0) {
                r = set_error_message(ret_error, r, "Failed to listen on %s: %s", s->listen_path,
                                      strerror(-r));
                /* Not ours: nothing to unlink at free. */
                free(s->listen_path);
                s->listen_path = NULL;
                return r;
        }
        return 0;
}

int chan_server_new(sd_event *e, const struct chan_server_config *cfg, void *userdata,
                    const char *listen_path, const char *fallback_path, struct chan_server **ret,
                    char **ret_error) {
        struct chan_server *s;
        sigset_t mask;
        int r;

        s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->cfg = cfg;
        s->userdata = userdata;
        s->event = sd_event_ref(e);
        s->listen_fd = -1;

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        (void) sigprocmask(SIG_BLOCK, &mask, NULL);
        if ((r = sd_event_add_signal(e, &s->sig[0], SIGTERM, on_signal, s)) < 0 ||
            (r = sd_event_add_signal(e, &s->sig[1], SIGINT, on_signal, s)) < 0 ||
            (r = sd_event_add_signal(e, &s->sig[2], SIGHUP, on_sighup, s)) < 0 ||
            (r = sd_event_set_watchdog(e, true)) < 0) {
                r = set_error_message(ret_error, r, "Failed to set up signals and the watchdog: %s",
                                      strerror(-r));
                goto fail;
        }
        r = sd_event_add_defer(e, &s->resume_src, on_resume, s);
        if (r >= 0)
                r = sd_event_source_set_enabled(s->resume_src, SD_EVENT_OFF);
        if (r < 0) {
                r = set_error_message(ret_error, r, "Failed to set up the event loop: %s", strerror(-r));
                goto fail;
        }
        r = server_listen(s, listen_path, fallback_path, ret_error);
        if (r < 0)
                goto fail;
        r = sd_event_add_io(e, &s->listen_io, s->listen_fd, EPOLLIN, on_accept, s);
        if (r < 0) {
                r = set_error_message(ret_error, r, "Failed to watch the socket: %s", strerror(-r));
                goto fail;
        }
        *ret = s;
        return 0;
fail:
        chan_server_free(s);
        return r;
}

void chan_server_free(struct chan_server *s) {
        if (!s)
                return;
        while (s->conns)
                /* conn_free() unlinks it from c->s->conns, and c->s is s:
                 * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
                conn_free(s->conns);
        sd_event_source_disable_unref(s->listen_io);
        sd_event_source_disable_unref(s->resume_src);
        for (size_t i = 0; i < ELEMENTSOF(s->sig); i++)
                sd_event_source_disable_unref(s->sig[i]);
        /* systemd's socket (SD_LISTEN_FDS_START) is closed too: the unit keeps its own copy. */
        if (s->listen_fd >= 0)
                (void) close(s->listen_fd);
        if (s->listen_path)
                (void) unlink(s->listen_path);
        free(s->listen_path);
        sd_event_unref(s->event);
        free(s);
}

const char *chan_server_path(const struct chan_server *s) {
        return s->listen_path;
}

int chan_server_run(struct chan_server *s) {
        (void) sd_notify(false, "READY=1\nSTATUS=Serving");
        return sd_event_loop(s->event);
}

uint64_t chan_server_refused_peer(const struct chan_server *s) {
        return s->refused_peer;
}

uint64_t chan_server_malformed(const struct chan_server *s) {
        return s->malformed;
}

struct chan_conn *chan_server_first(struct chan_server *s) {
        return s->conns;
}

static void usage(FILE *f, const char *name, const char *socket_key) {
        fprintf(f,
                "Usage: %s [--config FILE] [--listen PATH] [--log-level LEVEL] [--version]\n"
                "  --config FILE      configuration file (default " IOTHUB_DEFAULT_CONFIG ")\n"
                "  --listen PATH      listen on this unix socket (default: the socket from\n"
                "                     systemd, else %s)\n"
                "  --log-level LEVEL  debug, info, notice, warning, err\n"
                "  --version          print the version and exit\n",
                name, socket_key);
}

int chan_server_main(int argc, char *argv[], const char *name, const char *socket_key,
                     int (*run)(const char *config, const char *listen_path, int level)) {
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "listen", required_argument, NULL, 'L' },
                { "log-level", required_argument, NULL, 'l' },
                { "version", no_argument, NULL, 'V' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        const char *config = IOTHUB_DEFAULT_CONFIG, *listen_path = NULL;
        int level = -1, c;

        (void) mallopt(M_ARENA_MAX, 1);
        /* A fixed threshold: a request's buffer of up to 1 MiB (a body) is mmap()ed and goes back
         * to the system when freed. glibc's default threshold rises after the first such free,
         * and the next megabyte stays in the heap for good. */
        (void) mallopt(M_MMAP_THRESHOLD, 128 * 1024);
        log_open(name);
        while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0)
                switch (c) {
                case 'c':
                        config = optarg;
                        break;
                case 'L':
                        if (optarg[0] != '/') {
                                fprintf(stderr, "%s: --listen needs an absolute path\n", name);
                                return CHAN_EXIT_USAGE;
                        }
                        listen_path = optarg;
                        break;
                case 'l':
                        if (log_level_from_string(optarg, &level) < 0) {
                                fprintf(stderr, "%s: unknown log level '%s'\n", name, optarg);
                                return CHAN_EXIT_USAGE;
                        }
                        break;
                case 'V':
                        printf("%s %s\n", name, IOTHUB_VERSION);
                        return 0;
                case 'h':
                        usage(stdout, name, socket_key);
                        return 0;
                default:
                        usage(stderr, name, socket_key);
                        return CHAN_EXIT_USAGE;
                }
        if (optind < argc) {
                fprintf(stderr, "%s: unexpected argument '%s'\n", name, argv[optind]);
                return CHAN_EXIT_USAGE;
        }
        return run(config, listen_path, level);
}
