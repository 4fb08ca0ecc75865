/* SPDX-License-Identifier: MIT */
/* Pairing windows (PROTOCOL.md 1, "Pairing"). A hello is a bulb's manufacturer certificate chain in
 * PEM; it proves nothing about who sent it, but what it enrols is only a public key that chains to
 * [bulbs] ca_file under the device's own id, and only frames signed by the matching private key
 * are ever accepted. The window bounds the exposure: its length (at most 300 s), the size of a
 * hello and how many are handled. */
#include <stdio.h>

#include "iothub/dynsec.h"
#include "iothub/enrol.h"
#include "iothub/log.h"
#include "iothub/pair.h"

#define PAIR_LOG_WINDOW_USEC (10 * UINT64_C(1000000))
#define PAIR_LOG_BURST 5

struct pair_enrolment {
        struct pair_window *w;
        struct dynsec_op *op;
        char id[DEVICE_ID_MAX + 1];
};

struct pair_window {
        struct pair *p;
        sd_event_source *timer;
        struct pair_window_cb cb;
        void *userdata;
        bool expired;
        struct dynsec_op *open_op; /* the broker letting anonymous hellos in */
        unsigned hellos, refused, dropped;
        json_t *enrolled; /* ids */
        struct pair_enrolment pending[PAIR_HELLOS_MAX];
        unsigned n_pending;
};

struct pair {
        sd_event *event;
        const struct iothub_conf *conf;
        struct registry *registry;
        struct dynsec *dynsec; /* NULL without [broker] dynsec */
        struct pair_events ev;
        struct pair_window *window;
        uint64_t hellos_outside, hellos_in, enrolled, refused, dropped;
        struct ratelimit log_rl;
};

int pair_new(sd_event *e, const struct iothub_conf *conf, struct registry *registry, struct dynsec *dynsec,
             const struct pair_events *ev, struct pair **ret) {
        struct pair *p = calloc(1, sizeof *p);

        if (!p)
                return -ENOMEM;
        p->event = e;
        p->conf = conf;
        p->registry = registry;
        p->dynsec = dynsec;
        if (ev)
                p->ev = *ev;
        *ret = p;
        return 0;
}

void pair_window_close(struct pair_window *w) {
        if (!w)
                return;
        dynsec_op_cancel(w->open_op);
        /* Closed on the broker too; not waited for (a lost connection closes it at the next one). */
        if (w->p && w->p->dynsec)
                (void) dynsec_pairing(w->p->dynsec, false, NULL, NULL, NULL);
        for (unsigned i = 0; i < PAIR_HELLOS_MAX; i++)
                dynsec_op_cancel(w->pending[i].op);
        w->timer = sd_event_source_disable_unref(w->timer);
        if (w->p)
                w->p->window = NULL;
        json_decref(w->enrolled);
        free(w);
}

void pair_free(struct pair *p) {
        if (!p)
                return;
        pair_window_close(p->window);
        free(p);
}

static void emit(struct pair_window *w, const char *event, const char *id, const char *fmt, ...) _printf_(4, 5);
static void emit(struct pair_window *w, const char *event, const char *id, const char *fmt, ...) {
        char msg[512];
        va_list ap;
        json_t *o;

        va_start(ap, fmt);
        (void) vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        o = json_pack("{s:s,s:s?,s:s}", "event", event, "id", id, "message", msg);
        if (o && w->cb.event)
                w->cb.event(w->userdata, o);
        else
                json_decref(o);
}

/* Closes the window once its time is up and the broker answered for every enrolment. */
static void window_maybe_finish(struct pair_window *w) {
        json_t *summary;

        if (!w->expired || w->n_pending > 0)
                return;
        summary = json_pack("{s:O,s:I,s:I,s:I}", "enrolled", w->enrolled, "refused", (json_int_t) w->refused,
                            "hellos", (json_int_t) w->hellos, "dropped", (json_int_t) w->dropped);
        log_info("Pairing window closed: %zu enrolled, %u refused, %u hellos", json_array_size(w->enrolled),
                 w->refused, w->hellos);
        if (w->cb.closed)
                w->cb.closed(w->userdata, summary);
        else
                json_decref(summary);
        pair_window_close(w);
}

static int on_window_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct pair_window *w = userdata;

        w->expired = true;
        window_maybe_finish(w);
        return 0;
}

static void on_broker_open(void *userdata, int r, const char *error) {
        struct pair_window *w = userdata;

        w->open_op = NULL;
        if (r < 0)
                emit(w, "broker", NULL, "the broker does not let unenrolled bulbs in: %s", error ? error : strerror(-r));
        else
                emit(w, "broker", NULL, "the broker lets bulbs without a broker identity publish a hello now");
}

int pair_open(struct pair *p, unsigned seconds, const struct pair_window_cb *cb, void *userdata,
              struct pair_window **ret) {
        struct pair_window *w;
        int r;

        if (seconds < 1 || seconds > PAIR_WINDOW_MAX_S)
                return -ERANGE;
        if (p->window)
                return -EBUSY;
        w = calloc(1, sizeof *w);
        if (!w)
                return -ENOMEM;
        w->cb = *cb;
        w->userdata = userdata;
        w->enrolled = json_array();
        r = w->enrolled ? sd_event_add_time_relative(p->event, &w->timer, CLOCK_MONOTONIC,
                                                     seconds * UINT64_C(1000000), 0, on_window_timer, w)
                        : -ENOMEM;
        if (r < 0) {
                pair_window_close(w);
                return r;
        }
        w->p = p;
        p->window = w;
        *ret = w;
        if (p->dynsec) {
                r = dynsec_pairing(p->dynsec, true, on_broker_open, w, &w->open_op);
                if (r < 0)
                        emit(w, "broker", NULL, "the broker does not let unenrolled bulbs in: %s",
                             r == -ENOTCONN ? "not connected to the broker" : strerror(-r));
        }
        log_info("Pairing window open for %u s", seconds);
        emit(w, "open", NULL,
             "pairing window open for %u s: a bulb may now publish its certificate chain (PEM) on %s/<device-id>/hello",
             seconds, p->conf->mqtt.topic_prefix);
        return 0;
}

bool pair_is_hello_topic(const struct pair *p, const char *topic) {
        char id[DEVICE_ID_MAX + 1];

        return p && frame_topic_device(topic, p->conf->mqtt.topic_prefix, "hello", id) == 0;
}

static void on_broker_done(void *userdata, int r, const char *error) {
        struct pair_enrolment *e = userdata;
        struct pair_window *w = e->w;

        e->op = NULL; /* dynsec frees it after this call */
        w->n_pending--;
        if (r < 0)
                emit(w, "broker", e->id, "%s: broker client not created: %s (repaired at the next connection)", e->id,
                     error ? error : strerror(-r));
        else
                emit(w, "broker", e->id, "%s: broker client created (user name %s, its certificate)", e->id, e->id);
        window_maybe_finish(w);
}

static void refuse(struct pair *p, struct pair_window *w, const char *id, const char *fmt, ...) _printf_(4, 5);
static void refuse(struct pair *p, struct pair_window *w, const char *id, const char *fmt, ...) {
        char msg[512];
        uint64_t suppressed = 0;
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        w->refused++;
        p->refused++;
        if (ratelimit_allow(&p->log_rl, now_monotonic_usec(), PAIR_LOG_WINDOW_USEC, PAIR_LOG_BURST, &suppressed))
                log_warning("Pairing: hello of %s refused: %s", id, msg);
        emit(w, "refused", id, "%s: refused: %s", id, msg);
}

void pair_on_hello(struct pair *p, const char *topic, const uint8_t *payload, size_t len) {
        struct pair_window *w;
        _cleanup_free_ char *pem = NULL, *err = NULL;
        char id[DEVICE_ID_MAX + 1];
        struct bulb *b;
        int r;

        if (!p || frame_topic_device(topic, p->conf->mqtt.topic_prefix, "hello", id) < 0)
                return;
        w = p->window;
        if (!w || w->expired) {
                p->hellos_outside++;
                return;
        }
        p->hellos_in++;
        if (w->hellos >= PAIR_HELLOS_MAX) {
                if (w->dropped++ == 0)
                        emit(w, "dropped", NULL, "more than %d hellos in this window: further ones are ignored",
                             PAIR_HELLOS_MAX);
                p->dropped++;
                return;
        }
        w->hellos++;
        if (len > PAIR_HELLO_MAX_BYTES) {
                refuse(p, w, id, "hello of %zu bytes, larger than %d", len, PAIR_HELLO_MAX_BYTES);
                return;
        }
        if (memchr(payload, '\0', len)) {
                refuse(p, w, id, "hello is not PEM text");
                return;
        }
        pem = strndup((const char *) payload, len);
        if (!pem) {
                refuse(p, w, id, "out of memory");
                return;
        }
        /* The topic's id must be the certificate's CN: enrol_bulb() checks it like bulb add ID --cert. */
        /* NOLINTNEXTLINE(clang-analyzer-unix.Malloc): _cleanup_ frees pem */
        r = enrol_bulb(p->conf, p->registry, id, NULL, pem, &b, &err);
        if (r == -EEXIST) {
                refuse(p, w, id, "already enrolled");
                return;
        }
        if (r < 0) {
                refuse(p, w, id, "%s", err ? err : strerror(-r));
                return;
        }
        p->enrolled++;
        if (p->ev.enrolled)
                p->ev.enrolled(p->ev.userdata, b->id);
        (void) json_array_append_new(w->enrolled, json_string(b->id));
        emit(w, "enrolled", b->id, "%s: enrolled (%s), from its certificate", b->id, frame_alg_to_string(b->alg));
        if (!p->dynsec)
                return;
        /* The broker identity in the same step: a certificate bulb's user name is its CN. */
        /* One slot per hello: their addresses stay put while the broker answers. */
        struct pair_enrolment *e = &w->pending[w->hellos - 1];
        e->w = w;
        memcpy(e->id, b->id, sizeof e->id);
        r = dynsec_bulb_create(p->dynsec, b->id, NULL, on_broker_done, e, &e->op);
        if (r < 0) {
                emit(w, "broker", b->id, "%s: broker client not created: %s (repaired at the next connection)",
                     b->id, r == -ENOTCONN ? "not connected to the broker" : strerror(-r));
                return;
        }
        w->n_pending++;
}

int pair_status_json(const struct pair *p, json_t *status) {
        json_t *o;

        if (!p)
                return 0;
        o = json_pack("{s:b,s:I,s:I,s:I,s:I,s:I}", "window_open", p->window && !p->window->expired,
                      "hellos_outside_window", (json_int_t) p->hellos_outside, "hellos_in_window",
                      (json_int_t) p->hellos_in, "enrolled", (json_int_t) p->enrolled, "refused",
                      (json_int_t) p->refused, "dropped", (json_int_t) p->dropped);
        if (!o || json_object_set_new(status, "pair", o) < 0)
                return -ENOMEM;
        return 0;
}
