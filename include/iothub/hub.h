/* SPDX-License-Identifier: MIT */
/* The daemon: hub.c builds every module, wires their events to their listeners and runs the
 * loop. Its state (struct hub) is private to hub.c; the modules are handed what they need at
 * their _new() and report news up through the event tables hub.c installs (ARCHITECTURE.md). */
#pragma once

/* Runs the daemon until SIGTERM/SIGINT. Returns the process exit status (DESIGN.md):
 * 0 on a clean stop, 78 on a bad configuration, 1 otherwise. */
int hub_run(const char *config_path, int log_level_override);
