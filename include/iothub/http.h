/* SPDX-License-Identifier: MIT */
/* HTTPS requests on the daemon's sd-event loop, with libcurl's multi socket interface (the
 * shape of systemd's src/import/curl-util.c). One struct http per daemon: its multi handle
 * keeps the connection cache, so consecutive requests to one server reuse a connection. */
#pragma once

#include <stddef.h>

#include <systemd/sd-event.h>

#include "iothub/util.h"

#define HTTP_RESPONSE_MAX (1024 * 1024) /* bytes of a response body read at most */

struct http;
struct http_req;

struct http_response {
        int error;              /* 0, or a negative errno for a transport failure */
        const char *error_text; /* curl's message for it, never NULL */
        long status;            /* the HTTP status when error == 0 */
        const char *body;       /* NUL-terminated, never NULL */
        size_t body_len;
        const char *retry_after; /* the Retry-After header's value, "" when absent */
        const char *dpop_nonce;  /* the DPoP-Nonce header's value (RFC 9449 8), "" when absent */
        const char *www_authenticate; /* the WWW-Authenticate header's value (RFC 9110 11.6.1), "" when absent */
};

typedef void (*http_done_t)(void *userdata, const struct http_response *resp);

int http_new(sd_event *e, struct http **ret);
/* Ends every request in flight without calling back. */
void http_free(struct http *h);

struct http_request {
        const char *method;         /* "GET", "POST", "PUT" */
        const char *url;            /* https:// only */
        const char *ca_file;        /* NULL: the system's CAs */
        long timeout_s;
        const char *const *headers; /* "Name: value" lines, n_headers of them; copied, and wiped when done */
        size_t n_headers;
        const void *body; /* NULL for none; copied */
        size_t body_len;
};

/* Starts a request; done() is called exactly once, from the loop, unless the request is
 * cancelled or the struct http freed first. Returns 0 or a negative errno. */
int http_start(struct http *h, const struct http_request *r, http_done_t done, void *userdata,
               struct http_req **ret);
/* Ends a request without calling back; NULL accepted. */
void http_cancel(struct http_req *q);

/* libcurl's CURLcode as a negative errno: the one place for them. */
int http_curl_errno(int curl_code);
