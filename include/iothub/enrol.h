/* SPDX-License-Identifier: MIT */
/* Enrolment of a bulb: the one path of `iothubctl bulb add` (control.c) and of pairing (pair.c). */
#pragma once

#include "iothub/conf.h"
#include "iothub/registry.h"

/* Enrols a bulb from a PEM public key (key_pem, with id) or from a PEM certificate chain
 * (cert_pem) that must chain to [bulbs] ca_file and whose CN is the device id (id, when given,
 * must match it). Persists it (registry) and logs the enrolment; the caller announces it (the
 * cloud's device list, the security events: hub.c's listeners).
 * Returns 0 and the enrolled bulb in *ret, or a negative errno (-EEXIST: enrolled and not revoked;
 * -EPERM: a certificate that does not verify) and a malloc'ed one-line reason in *ret_error. */
int enrol_bulb(const struct iothub_conf *conf, struct registry *registry, const char *id, const char *key_pem,
               const char *cert_pem, struct bulb **ret, char **ret_error);
