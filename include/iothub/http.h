/* SPDX-License-Identifier: MIT */
/* HTTPS requests on the daemon's sd-event loop, with libcurl's multi socket interface (the
 * shape of systemd's src/import/curl-util.c). One struct http per daemon: its multi handle
 * keeps the connection cache, so consecutive requests to one server reuse a connection.
 *
 * Ownership (STYLE.md, asynchronous work): a request is an object with exactly one owner,
 * the struct http_req handle returned by http_start(). Its userdata belongs to the request
 * until done() runs; from then on to done(). Ending the request early (http_cancel(), or
 * http_free() for all of them) never calls done() and hands the userdata to destroy()
 * instead, so nothing leaks and nothing is called back after its owner went away. Whoever
 * waits for an answer (a control client waiting on register or logout) owns a handle to the
 * request in the same way and cancels it when it goes away. */
#pragma once

#include <stddef.h>

#include <systemd/sd-event.h>

#include "iothub/util.h"

#define HTTP_RESPONSE_MAX (1024 * 1024) /* bytes of a response body read at most */

struct http;
struct http_req;

struct http_response {
        int error;              /* 0, or a negative errno for a transport failure (-EFBIG: a
                                 * body over HTTP_RESPONSE_MAX, the transfer was aborted) */
        const char *error_text; /* curl's message for it, never NULL */
        long status;            /* the HTTP status when error == 0 */
        const char *body;       /* NUL-terminated, never NULL */
        size_t body_len;
        /* Taken from the final response's header block only, never from an interim 1xx. */
        const char *retry_after; /* the Retry-After header's value, "" when absent */
        const char *dpop_nonce;  /* the DPoP-Nonce header's value (RFC 9449 8), "" when absent */
        const char *www_authenticate; /* the WWW-Authenticate header's value (RFC 9110 11.6.1), "" when absent */
};

typedef void (*http_done_t)(void *userdata, const struct http_response *resp);
/* Frees a request's userdata when the request ends without done() (cancelled, or the struct
 * http freed). Must wipe the secrets it holds. */
typedef void (*http_destroy_t)(void *userdata);

int http_new(sd_event *e, struct http **ret);
/* Ends every request in flight without calling back (destroy() gets each userdata). */
void http_free(struct http *h);

struct http_request {
        const char *method;         /* "GET", "POST", "PUT" */
        const char *url;            /* https:// only */
        const char *ca_file;        /* NULL: the system's CAs */
        long timeout_s;
        long timeout_ms; /* > 0: the bound instead of timeout_s (a retry gets what is left of a call) */
        const char *const *headers; /* "Name: value" lines, n_headers of them; copied, and wiped when done */
        size_t n_headers;
        const void *body; /* NULL for none; copied */
        size_t body_len;
};

/* Starts a request; done() is called exactly once, from the loop, unless the request is
 * cancelled or the struct http freed first, in which case destroy(userdata) is called
 * instead (destroy may be NULL when the userdata is not the request's to free, e.g. it owns
 * the handle itself). The handle in *ret is valid until done() returns or http_cancel().
 * Returns 0 or a negative errno; on failure the caller keeps userdata. */
int http_start(struct http *h, const struct http_request *r, http_done_t done, http_destroy_t destroy,
               void *userdata, struct http_req **ret);
/* Ends a request without calling back and frees its userdata through destroy(); NULL
 * accepted. */
void http_cancel(struct http_req *q);

/* One header line as libcurl hands it to the header callback ("Name: value\r\n", not
 * NUL-terminated, n bytes): when its name is `name` (given with its colon, e.g. "dpop-nonce:",
 * compared without case), stores the value without the whitespace around it (RFC 9110 5.5) in
 * dst, NUL-terminated. Returns 1 when stored; 0 when the line is another header (dst untouched);
 * -E2BIG when the value does not fit in cap bytes with its NUL, and -EBADMSG when it holds a
 * control character other than HTAB (RFC 9110 5.5: no CTLs, and a NUL would cut it): dst is then
 * empty. A value cut short would be another value (a DPoP nonce the server never sent), so none
 * is kept rather than part of one. Pure. */
int http_header_value(const char *line, size_t n, const char *name, char *dst, size_t cap);

/* libcurl's CURLcode as a negative errno: the one place for them. */
int http_curl_errno(int curl_code);
