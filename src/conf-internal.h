/* SPDX-License-Identifier: MIT */
/* Private to conf.c and its tests (tests/fuzz/fuzz-conf.c): the configuration parser on bytes
 * that are not a file, e.g. fmemopen(), so that it can be fuzzed without touching the disk. */
#pragma once

#include <stdio.h>

#include "iothub/conf.h"

/* conf_load() on an open stream, read to its end and left open; 'path' names it in messages
 * (NULL: the default path). Same checks, limits, defaults and errors as conf_load(). */
int conf_load_stream(FILE *f, const char *path, struct iothub_conf **ret, char **ret_error);
