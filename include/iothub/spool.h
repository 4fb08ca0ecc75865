/* SPDX-License-Identifier: MIT */
/* The spool: accepted frames not yet acknowledged by the cloud, byte for byte, in the
 * database. A frame counts as accepted once the transaction that appended it committed. */
#pragma once

#include <stdint.h>

#include "iothub/db.h"

/* Appends a frame inside the caller's transaction. Returns 0 or a negative errno. */
int spool_append(struct db *db, const char *dev, int64_t seq, const uint8_t *jws, size_t len,
                 int64_t received_at_usec);

/* Frames waiting and their total size in bytes. Returns 0 or a negative errno. */
int spool_stats(struct db *db, uint64_t *ret_pending, uint64_t *ret_bytes);
