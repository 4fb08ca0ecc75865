/* SPDX-License-Identifier: MIT */
/* libcurl's multi socket interface on sd-event: curl says which sockets to watch and when
 * to call it back (CURLMOPT_SOCKETFUNCTION, CURLMOPT_TIMERFUNCTION); the loop watches them
 * and calls curl_multi_socket_action() when they are ready. */
#include <limits.h>
#include <stdio.h>
#include <strings.h>
#include <sys/epoll.h>

#include <curl/curl.h>
#include <openssl/crypto.h>

#include "iothub/http.h"

struct http_req {
        struct http *http;
        CURL *easy;
        struct curl_slist *headers;
        char *body;
        char *resp;
        size_t resp_len, resp_cap;
        char retry_after[64];
        char dpop_nonce[256];
        char www_authenticate[512];
        char errbuf[CURL_ERROR_SIZE];
        bool too_large;
        http_done_t done;
        http_destroy_t destroy;
        void *userdata;
        struct http_req *next, *prev;
};

struct http {
        sd_event *event;
        CURLM *multi;
        sd_event_source *timer;
        struct http_req *reqs;
};

int http_curl_errno(int code) {
        switch ((CURLcode) code) {
        case CURLE_OK:
                return 0;
        case CURLE_OUT_OF_MEMORY:
                return -ENOMEM;
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
                return -EHOSTUNREACH;
        case CURLE_COULDNT_CONNECT:
                return -ECONNREFUSED;
        case CURLE_OPERATION_TIMEDOUT:
                return -ETIMEDOUT;
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_SSL_CACERT_BADFILE:
                return -EPROTO;
        case CURLE_GOT_NOTHING:
        case CURLE_SEND_ERROR:
        case CURLE_RECV_ERROR:
                return -ECONNRESET;
        case CURLE_UNSUPPORTED_PROTOCOL:
                return -EPROTONOSUPPORT;
        default:
                return -EIO;
        }
}

static void req_unlink_free(struct http_req *q) {
        if (!q)
                return;
        if (q->next)
                q->next->prev = q->prev;
        if (q->prev)
                q->prev->next = q->next;
        else if (q->http->reqs == q)
                q->http->reqs = q->next;
        if (q->easy) {
                (void) curl_multi_remove_handle(q->http->multi, q->easy);
                curl_easy_cleanup(q->easy);
        }
        /* Header lines carry access tokens and proofs, bodies may carry refresh tokens. */
        for (struct curl_slist *l = q->headers; l; l = l->next)
                OPENSSL_cleanse(l->data, strlen(l->data));
        curl_slist_free_all(q->headers);
        if (q->body)
                erase_and_free(q->body, strlen(q->body));
        if (q->resp)
                erase_and_free(q->resp, q->resp_cap);
        free(q);
}

/* The request ends without its answer: done() will never run, so the userdata it would have
 * consumed goes to destroy() (which wipes what it holds, e.g. a device code in a form). */
static void req_abandon(struct http_req *q) {
        http_destroy_t destroy = q->destroy;
        void *userdata = q->userdata;

        req_unlink_free(q);
        if (destroy)
                destroy(userdata);
}

void http_cancel(struct http_req *q) {
        if (q)
                req_abandon(q);
}

static void http_check_done(struct http *h) {
        CURLMsg *msg;
        int left;

        while ((msg = curl_multi_info_read(h->multi, &left))) {
                struct http_req *q = NULL;
                struct http_response resp = { .body = "", .retry_after = "", .dpop_nonce = "", .www_authenticate = "" };

                if (msg->msg != CURLMSG_DONE)
                        continue;
                (void) curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &q);
                if (!q)
                        continue;
                resp.error = http_curl_errno(msg->data.result);
                resp.error_text = q->errbuf[0] ? q->errbuf : curl_easy_strerror(msg->data.result);
                if (q->too_large) {
                        resp.error = -EFBIG;
                        resp.error_text = "response body over the size limit (HTTP_RESPONSE_MAX), transfer aborted";
                }
                if (resp.error == 0)
                        (void) curl_easy_getinfo(q->easy, CURLINFO_RESPONSE_CODE, &resp.status);
                if (q->resp) {
                        resp.body = q->resp;
                        resp.body_len = q->resp_len;
                }
                resp.retry_after = q->retry_after;
                resp.dpop_nonce = q->dpop_nonce;
                resp.www_authenticate = q->www_authenticate;
                /* Take the request out of the loop first: the callback may start new ones. */
                (void) curl_multi_remove_handle(h->multi, q->easy);
                curl_easy_cleanup(q->easy);
                q->easy = NULL;
                /* From here on the userdata belongs to done(): destroy() is not called. */
                q->destroy = NULL;
                q->done(q->userdata, &resp);
                req_unlink_free(q);
        }
}

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct http *h = userdata;
        int action = 0, running;

        if (revents & EPOLLIN)
                action |= CURL_CSELECT_IN;
        if (revents & EPOLLOUT)
                action |= CURL_CSELECT_OUT;
        if (revents & (EPOLLERR | EPOLLHUP))
                action |= CURL_CSELECT_ERR;
        (void) curl_multi_socket_action(h->multi, fd, action, &running);
        http_check_done(h);
        return 0;
}

static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
        struct http *h = userp;
        sd_event_source *io = socketp;
        uint32_t events = 0;
        int r;

        if (what == CURL_POLL_REMOVE) {
                if (io) {
                        (void) curl_multi_assign(h->multi, fd, NULL);
                        sd_event_source_disable_unref(io);
                }
                return 0;
        }
        if (what & CURL_POLL_IN)
                events |= EPOLLIN;
        if (what & CURL_POLL_OUT)
                events |= EPOLLOUT;
        if (io) {
                r = sd_event_source_set_io_events(io, events);
                if (r >= 0)
                        r = sd_event_source_set_enabled(io, SD_EVENT_ON);
        } else {
                r = sd_event_add_io(h->event, &io, fd, events, on_io, h);
                if (r >= 0) {
                        (void) sd_event_source_set_description(io, "curl-io");
                        (void) curl_multi_assign(h->multi, fd, io);
                }
        }
        return r < 0 ? -1 : 0;
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct http *h = userdata;
        int running;

        (void) curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        http_check_done(h);
        return 0;
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
        struct http *h = userp;
        uint64_t now;
        int r;

        if (timeout_ms < 0)
                return sd_event_source_set_enabled(h->timer, SD_EVENT_OFF) < 0 ? -1 : 0;
        (void) sd_event_now(h->event, CLOCK_MONOTONIC, &now);
        r = sd_event_source_set_time(h->timer, now + (uint64_t) timeout_ms * 1000);
        if (r >= 0)
                r = sd_event_source_set_enabled(h->timer, SD_EVENT_ONESHOT);
        return r < 0 ? -1 : 0;
}

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *userdata) {
        struct http_req *q = userdata;
        size_t n = size * nmemb;
        void *buf;

        /* A bounded read of the answer: past the limit the transfer is aborted (returning
         * less than n makes curl fail it with CURLE_WRITE_ERROR), so that an endless body
         * costs neither memory nor CPU until the timeout. */
        if (n > HTTP_RESPONSE_MAX - q->resp_len) {
                q->too_large = true;
                return 0;
        }
        /* The old copy may hold tokens: erase_grow() wipes it, not just frees it. */
        buf = q->resp;
        if (erase_grow(&buf, &q->resp_cap, q->resp_len, q->resp_len + n + 1, HTTP_RESPONSE_MAX + 1) < 0)
                return 0;
        q->resp = buf;
        memcpy(q->resp + q->resp_len, ptr, n);
        q->resp_len += n;
        q->resp[q->resp_len] = '\0';
        return n;
}

int http_header_value(const char *line, size_t n, const char *name, char *dst, size_t cap) {
        size_t name_len, i, end;

        if (!line || !name || !dst || cap == 0)
                return -EINVAL;
        name_len = strlen(name);
        if (n < name_len || strncasecmp(line, name, name_len) != 0)
                return 0;
        dst[0] = '\0';
        i = name_len;
        end = n;
        /* The line ends in CRLF (or LF); the value is what is between the OWS on either side. */
        if (end > i && line[end - 1] == '\n')
                end--;
        if (end > i && line[end - 1] == '\r')
                end--;
        while (i < end && (line[i] == ' ' || line[i] == '\t'))
                i++;
        while (end > i && (line[end - 1] == ' ' || line[end - 1] == '\t'))
                end--;
        for (size_t k = i; k < end; k++)
                if (((unsigned char) line[k] < 0x20 && line[k] != '\t') || line[k] == 0x7f)
                        return -EBADMSG;
        if (end - i >= cap)
                return -E2BIG;
        memcpy(dst, line + i, end - i);
        dst[end - i] = '\0';
        return 1;
}

static size_t on_header(char *buf, size_t size, size_t nitems, void *userdata) {
        struct http_req *q = userdata;
        size_t n = size * nitems;
        static const char ra[] = "retry-after:", dn[] = "dpop-nonce:", wa[] = "www-authenticate:";

        /* Every header block starts with a status line: interim 1xx answers (RFC 9110 15.2)
         * come before the final one, and only the final response's headers count. */
        if (n >= 5 && strncmp(buf, "HTTP/", 5) == 0) {
                q->retry_after[0] = '\0';
                q->dpop_nonce[0] = '\0';
                q->www_authenticate[0] = '\0';
                return n;
        }
        /* A value too long for its buffer, or with a control character, is not kept at all (the
         * answer is then read as if the server had not sent it). */
        if (http_header_value(buf, n, ra, q->retry_after, sizeof q->retry_after) == 0 &&
            http_header_value(buf, n, dn, q->dpop_nonce, sizeof q->dpop_nonce) == 0)
                (void) http_header_value(buf, n, wa, q->www_authenticate, sizeof q->www_authenticate);
        return n;
}

int http_start(struct http *h, const struct http_request *r, http_done_t done, http_destroy_t destroy,
               void *userdata, struct http_req **ret) {
        struct http_req *q;
        CURLMcode mrc;
        long timeout_ms;
        int rc = -EINVAL;

        if (!h || !r || !r->method || !r->url || !done || r->timeout_s < 0 || r->timeout_s > LONG_MAX / 1000)
                return -EINVAL;
        timeout_ms = r->timeout_ms > 0 ? r->timeout_ms : r->timeout_s * 1000L;
        q = calloc(1, sizeof *q);
        if (!q)
                return -ENOMEM;
        q->http = h;
        q->done = done;
        q->destroy = destroy;
        q->userdata = userdata;
        q->next = h->reqs;
        if (q->next)
                q->next->prev = q;
        h->reqs = q;
        for (size_t i = 0; i < r->n_headers; i++) {
                struct curl_slist *l = curl_slist_append(q->headers, r->headers[i]);
                if (!l) {
                        rc = -ENOMEM;
                        goto fail;
                }
                q->headers = l;
        }
        if (r->body) {
                /* Copied with a NUL so that it can be wiped like a string. */
                q->body = malloc(r->body_len + 1);
                if (!q->body) {
                        rc = -ENOMEM;
                        goto fail;
                }
                memcpy(q->body, r->body, r->body_len);
                q->body[r->body_len] = '\0';
        }
        q->easy = curl_easy_init();
        if (!q->easy) {
                rc = -ENOMEM;
                goto fail;
        }
        /* HTTPS only, certificate and host name verified (curl's defaults, set explicitly),
         * no redirects: a signed request goes exactly where it was signed for. */
        if (curl_easy_setopt(q->easy, CURLOPT_URL, r->url) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_PROTOCOLS_STR, "https") != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_FOLLOWLOCATION, 0L) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_SSL_VERIFYPEER, 1L) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_SSL_VERIFYHOST, 2L) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_NOSIGNAL, 1L) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_TIMEOUT_MS, timeout_ms) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms < 10000 ? timeout_ms : 10000L) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_HTTPHEADER, q->headers) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_CUSTOMREQUEST, r->method) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_USERAGENT, "iothubd/" IOTHUB_VERSION) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_WRITEFUNCTION, on_write) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_WRITEDATA, q) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_HEADERFUNCTION, on_header) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_HEADERDATA, q) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_ERRORBUFFER, q->errbuf) != CURLE_OK ||
            curl_easy_setopt(q->easy, CURLOPT_PRIVATE, q) != CURLE_OK)
                goto fail;
        if (r->ca_file && curl_easy_setopt(q->easy, CURLOPT_CAINFO, r->ca_file) != CURLE_OK)
                goto fail;
        if (q->body && (curl_easy_setopt(q->easy, CURLOPT_POSTFIELDS, q->body) != CURLE_OK ||
                        curl_easy_setopt(q->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) r->body_len) != CURLE_OK))
                goto fail;
        mrc = curl_multi_add_handle(h->multi, q->easy);
        if (mrc != CURLM_OK) {
                rc = mrc == CURLM_OUT_OF_MEMORY ? -ENOMEM : -EIO;
                goto fail;
        }
        if (ret)
                *ret = q;
        return 0;
fail:
        /* The caller keeps its userdata when the start fails. */
        req_unlink_free(q);
        return rc;
}

int http_new(sd_event *e, struct http **ret) {
        struct http *h;
        int r;

        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
                return -EIO;
        h = calloc(1, sizeof *h);
        if (!h)
                return -ENOMEM;
        h->event = sd_event_ref(e);
        h->multi = curl_multi_init();
        if (!h->multi) {
                http_free(h);
                return -ENOMEM;
        }
        (void) curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
        (void) curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
        (void) curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
        (void) curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
        /* Accuracy 1 us: curl's timeouts drive its state machine (connects, retries); the
         * default slack of 250 ms would stall every request that waits on one. */
        r = sd_event_add_time(e, &h->timer, CLOCK_MONOTONIC, UINT64_MAX, 1, on_timer, h);
        if (r >= 0)
                r = sd_event_source_set_enabled(h->timer, SD_EVENT_OFF);
        if (r < 0) {
                http_free(h);
                return r;
        }
        *ret = h;
        return 0;
}

void http_free(struct http *h) {
        if (!h)
                return;
        while (h->reqs)
                /* req_abandon() unlinks it from q->http->reqs, and q->http is h:
                 * NOLINTNEXTLINE(clang-analyzer-unix.Malloc) */
                req_abandon(h->reqs);
        if (h->multi)
                (void) curl_multi_cleanup(h->multi);
        sd_event_source_disable_unref(h->timer);
        sd_event_unref(h->event);
        free(h);
}
