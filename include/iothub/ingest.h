/* SPDX-License-Identifier: MIT */
/* The frame path: every check of PROTOCOL.md 1 in order, then the spool, group-committed. */
#pragma once

#include "iothub/hub.h"

/* Handles one MQTT message on a status topic. Appends accepted frames to the spool inside a
 * transaction that ingest_commit() closes. Never fails: rejections are counted and logged. */
void ingest_message(struct hub *h, const char *topic, const uint8_t *payload, size_t len);

/* Commits the frames appended since the last call (called after each MQTT read). A frame
 * counts as accepted only once this commit succeeded. Returns 0 or a negative errno. */
int ingest_commit(struct hub *h);

/* The reason name of a failure to store frames (disk_full, read_only, corrupt, locked,
 * io_error), or NULL for 0. */
const char *ingest_store_reason(int r);
