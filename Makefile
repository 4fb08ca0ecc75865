# iothub: a plain Makefile with pkg-config. See README.md.
#   make            build iothubd and iothubctl (in build/)
#   make check      unit tests (cmocka) and integration tests (real mosquitto, node)
#   make asan       the same tests built with ASan and UBSan (in build-asan/)
#   make fuzz       libFuzzer targets with clang for FUZZ_SECONDS each
#   make lint       clang-tidy and cppcheck
#   make install    DESTDIR, PREFIX honoured
#   make deps       Debian packages (as root) and the Node test packages
#   make cross ARCH=arm64|armhf   Raspberry Pi .deb, lintian, unit tests under qemu-user

PREFIX  ?= /usr
# Where Debian keeps the target's libraries (mosquitto's dynamic security plugin among them).
MULTIARCH ?= $(shell $(CC) -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
DESTDIR ?=
BUILD   ?= build
CC      ?= gcc
PKG_CONFIG ?= pkg-config
VERSION := $(shell cat VERSION 2>/dev/null || echo 0.0.0)

# iothubd links only what it uses (issue 13, "Memory"); libqrencode is iothubctl's alone (the
# QR code of `iothubctl login`). --as-needed below drops an unused library too, but the daemon's
# line should not depend on it.
# The TPM is iothub-signer's (and iothubctl's): iothubd asks the signer (issue 14) and links no
# tpm2-tss library.
TPM_PKGS := tss2-esys tss2-tctildr tss2-rc tss2-mu
DAEMON_PKGS := openssl libmosquitto libsystemd jansson inih sqlite3
PKGS := libcurl $(DAEMON_PKGS) $(TPM_PKGS) libqrencode
# iothub-signer (iothub-signer(8)): the TPM, OpenSSL, the loop and the config parser; never libcurl,
# libmosquitto or SQLite (a parser of network bytes in the process that holds the key). A pulled-in
# object that needs one of them fails the link; tests/integration/signer.test.mjs checks ldd too.
SIGNER_PKGS := openssl tss2-esys tss2-tctildr tss2-rc tss2-mu libsystemd jansson inih
# iothub-uplink (issue 14 stage 2): HTTPS, sign-in and the tokens in memory; never libmosquitto,
# SQLite or the TPM libraries (it reaches the TPM through the signer). Linked like the signer:
# a pulled-in object that needs one of them fails the link; uplink.test.mjs checks ldd too.
UPLINK_PKGS := libcurl openssl libsystemd jansson inih

WARN := -Wall -Wextra -Wshadow -Wformat=2 -Wformat-security -Wmissing-prototypes -Wstrict-prototypes \
	-Wno-unused-parameter -Wvla -Wpointer-arith -Wundef
ifeq ($(WERROR),1)
WARN += -Werror
endif
# Hardening: each flag is kept only if the target compiler takes it. -fcf-protection is x86 only
# (gcc for arm64 and armhf stops with "not supported for this target"), and a cross build must
# not lose the others for it. -Werror: a flag the compiler takes with a warning is dropped too.
HARDEN_WANT := -D_FORTIFY_SOURCE=3 -fstack-protector-strong -fstack-clash-protection -fcf-protection \
	-ftrivial-auto-var-init=zero -fPIE
OPT ?= -O2 -g

ifeq ($(SAN),1)
# ASan+UBSan: UBSan must abort, or the run exits 0 on a finding (TESTBED.md).
SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
HARDEN_WANT := -fstack-protector-strong -fPIE
OPT := -O1 -g
endif

# Computed on first use and then kept (the $(eval) turns each into a simple variable), so that
# the probes and pkg-config run once per make, and not at all for targets that compile nothing:
# `make deps` on a fresh machine must not ask pkg-config about packages it is about to install.
cc_accepts = $(shell $(CC) -Werror $(1) -x c -c /dev/null -o /dev/null >/dev/null 2>&1 && echo '$(1)')
HARDEN   = $(eval HARDEN := $(foreach f,$(HARDEN_WANT),$(call cc_accepts,$(f))))$(HARDEN)
# pkg-config has said on stderr which package it lacks; stop there rather than compile without.
pkg_config = $(shell $(PKG_CONFIG) $(1))$(if $(filter 0,$(.SHELLSTATUS)),,$(error $(PKG_CONFIG) \
	$(1) failed: install the -dev packages (make deps; for a cross build, packaging/README)))
PKG_CPPFLAGS = $(eval PKG_CPPFLAGS := $(call pkg_config,--cflags $(PKGS)))$(PKG_CPPFLAGS)
PKG_LIBS = $(eval PKG_LIBS := $(call pkg_config,--libs $(PKGS)))$(PKG_LIBS)
SIGNER_PKG_LIBS = $(eval SIGNER_PKG_LIBS := $(call pkg_config,--libs $(SIGNER_PKGS)))$(SIGNER_PKG_LIBS)
UPLINK_PKG_LIBS = $(eval UPLINK_PKG_LIBS := $(call pkg_config,--libs $(UPLINK_PKGS)))$(UPLINK_PKG_LIBS)
DAEMON_PKG_LIBS = $(eval DAEMON_PKG_LIBS := $(call pkg_config,--libs $(DAEMON_PKGS)))$(DAEMON_PKG_LIBS)
CMOCKA_LIBS = $(eval CMOCKA_LIBS := $(call pkg_config,--libs cmocka))$(CMOCKA_LIBS)

# _FILE_OFFSET_BITS=64: 64-bit off_t and ino_t on 32-bit targets (armhf), where stat() and
# readdir() otherwise fail with EOVERFLOW on a large file or inode number (seen under qemu-arm on
# an amd64 host's file system). A no-op on 64-bit targets. (Not _TIME_BITS=64: bookworm's armhf
# libraries are built with a 32-bit time_t, and the two must agree.)
CPPFLAGS += -Iinclude -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -DIOTHUB_VERSION='"$(VERSION)"'
CFLAGS   ?=
CFLAGS   += -std=c11 $(OPT) $(WARN) $(SANFLAGS)
LDFLAGS  += -pie -Wl,-z,relro,-z,now -Wl,--as-needed $(SANFLAGS)
LIBS      = $(PKG_LIBS) -lm
DAEMON_LIBS = $(DAEMON_PKG_LIBS) -lm
# The probed parts stay out of CPPFLAGS and CFLAGS: those can come from the environment
# (dpkg-buildflags exports them), and make expands an exported variable for every recipe it
# runs, `make deps` included.
ALL_CPPFLAGS = $(CPPFLAGS) $(PKG_CPPFLAGS)
ALL_CFLAGS   = $(CFLAGS) $(HARDEN)

# Runs the unit test and fuzz replay binaries: empty natively, "qemu-aarch64-static -L /" for an
# arm64 build on amd64 (packaging/cross.sh).
TEST_RUNNER ?=

MAINS    := src/iothubd.c src/iothubctl.c src/signer.c src/uplink.c
LIB_SRCS := $(filter-out $(MAINS),$(wildcard src/*.c))
LIB_OBJS := $(LIB_SRCS:src/%.c=$(BUILD)/obj/%.o)
HEADERS  := $(wildcard include/iothub/*.h) $(wildcard src/*.h)

UNIT_SRCS  := $(wildcard tests/unit/test-*.c)
UNIT_BINS  := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)
FUZZ_SRCS  := $(wildcard tests/fuzz/fuzz-*.c)
FUZZ_BINS  := $(FUZZ_SRCS:tests/fuzz/%.c=$(BUILD)/fuzz/%)
TOOL_SRCS  := $(wildcard tests/tools/*.c)
TOOL_BINS  := $(TOOL_SRCS:tests/tools/%.c=$(BUILD)/tools/%)
# Libraries the tests preload (LD_PRELOAD) into the daemons: never instrumented (SAN=1 leaves them
# plain, as a preloaded sanitizer runtime would have to come first).
PRELOAD_SRCS := $(wildcard tests/tools/preload/*.c)
PRELOAD_LIBS := $(PRELOAD_SRCS:tests/tools/preload/%.c=$(BUILD)/tools/%.so)
# Drafts of pages whose program is not there yet: built (scdoc checks them) into $(BUILD)/man-draft,
# never installed nor packaged. None at the moment (iothub-uplink(8) is installed since stage 2).
MAN_DRAFTS :=
MANS       := $(patsubst man/%.scd,$(BUILD)/man/%,$(filter-out $(MAN_DRAFTS),$(wildcard man/*.scd)))
MAN_DRAFT_PAGES := $(MAN_DRAFTS:man/%.scd=$(BUILD)/man-draft/%)

.PHONY: valgrind all check unit integration asan fuzz fuzz-build fuzz-smoke lint install deps clean bench demo man tools cross soak

all: $(BUILD)/iothubd $(BUILD)/iothubctl $(BUILD)/iothub-signer $(BUILD)/iothub-uplink man

$(BUILD)/obj/%.o: src/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) -c -o $@ $<

$(BUILD)/libiothub.a: $(LIB_OBJS)
	rm -f $@
	ar rcs $@ $^

# iothubd's own archive leaves out the code that touches the TPM or the sealed token files (the
# signer's: hubkey, tokenstore, attest, and what signs with the hub key: httpsig, doctor, the
# signer's own files): a call into one of them from the daemon fails to link
# (signerlink.test.mjs checks the binary too).
DAEMON_NOT := hubkey tokenstore attest httpsig doctor signer-policy
DAEMON_OBJS := $(filter-out $(DAEMON_NOT:%=$(BUILD)/obj/%.o),$(LIB_OBJS))
$(BUILD)/libiothubd.a: $(DAEMON_OBJS)
	rm -f $@
	ar rcs $@ $^

$(BUILD)/iothubd: $(BUILD)/obj/iothubd.o $(BUILD)/libiothubd.a
	$(CC) $(LDFLAGS) -o $@ $^ $(DAEMON_LIBS)

$(BUILD)/iothub-signer: $(BUILD)/obj/signer.o $(BUILD)/libiothub.a
	$(CC) $(LDFLAGS) -o $@ $^ $(SIGNER_PKG_LIBS) -lm

# The daemon's archive (no TPM code): what the uplink pulls from it must link with UPLINK_PKGS.
$(BUILD)/iothub-uplink: $(BUILD)/obj/uplink.o $(BUILD)/libiothubd.a
	$(CC) $(LDFLAGS) -o $@ $^ $(UPLINK_PKG_LIBS) -lm

$(BUILD)/iothubctl: $(BUILD)/obj/iothubctl.o $(BUILD)/libiothub.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

# Unit tests: tests/unit/test-<module>.c, cmocka, linked against the library.
$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libiothub.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< $(filter tests/unit/swtpm-helper.c,$^) $(BUILD)/libiothub.a $(LIBS) $(CMOCKA_LIBS)

# The unit tests that start their own software TPM share its helper.
$(BUILD)/tests/test-hubkey $(BUILD)/tests/test-tokenstore $(BUILD)/tests/test-srk $(BUILD)/tests/test-tpmq: tests/unit/swtpm-helper.c tests/unit/swtpm-helper.h

# Test helpers in C (load generator, frame maker for benchmarks).
$(BUILD)/tools/%: tests/tools/%.c $(BUILD)/libiothub.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libiothub.a $(LIBS)

# Fuzz targets built with gcc and the plain driver (replays files): make check runs the corpus.
$(BUILD)/fuzz/%: tests/fuzz/%.c tests/fuzz/driver.c $(BUILD)/libiothub.a $(HEADERS) $(wildcard tests/fuzz/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $< tests/fuzz/driver.c $(BUILD)/libiothub.a $(LIBS)

$(BUILD)/tools/%.so: tests/tools/preload/%.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ $< -ldl

tools: $(TOOL_BINS) $(PRELOAD_LIBS)

$(BUILD)/man/%: man/%.scd
	@mkdir -p $(dir $@)
	scdoc < $< > $@

$(BUILD)/man-draft/%: man/%.scd
	@mkdir -p $(dir $@)
	scdoc < $< > $@

man: $(MANS) $(MAN_DRAFT_PAGES)

unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; CMOCKA_MESSAGE_OUTPUT=stdout $(TEST_RUNNER) $$t; done

fuzz-corpus: $(FUZZ_BINS)
	@set -e; for f in $(FUZZ_BINS); do n=$${f##*/fuzz-}; echo "== $$f tests/fuzz/corpus/$$n"; $(TEST_RUNNER) $$f tests/fuzz/corpus/$$n; done

# One file at a time. --test-force-exit ends a file's process with process.exit() once its tests
# are done: node 20's natural exit (FreeEnvironment -> CleanupHandles) sometimes spins at 100 % CPU
# forever after every test passed (seen with netfaults.test.mjs: gdb shows uv_run() called again
# and again from Environment::CleanupHandles()), and process.exit() does not go that way. A file
# that has not ended TEST_FILE_TIMEOUT_MS after it began fails (node's runner times out the file's
# own test, then kills it), so whatever else hangs fails the run instead of holding CI until its
# limit. The longest file (faults.test.mjs) takes about 2.5 min, under ASan about 4.
TEST_FILE_TIMEOUT_MS ?= 900000
NODE_TEST := node --test --test-concurrency=1 --test-force-exit --test-timeout=$(TEST_FILE_TIMEOUT_MS)

integration: all tools
	cd tests && IOTHUB_BUILD=$(abspath $(BUILD)) $(NODE_TEST) integration/ cloud/ oauth/

check: all unit fuzz-corpus integration

asan:
	$(MAKE) BUILD=build-asan SAN=1 check

# libFuzzer with clang. The library is compiled once with coverage (not once per target), then each
# target of FUZZ_TARGETS (names without "fuzz-", all by default) runs FUZZ_SECONDS over a copy of its
# seed corpus with its dictionary; a crash, leak, UBSan report or broken invariant fails the run.
# CI: FUZZ_SECONDS=30 with -j2 (about 4 minutes for every target with the build). Findings land in
# build-fuzz/artifacts-NAME/; the grown corpus in build-fuzz/corpus-NAME/ (merge good ones by hand).
FUZZ_SECONDS ?= 30
FUZZ_CC ?= clang
FUZZ_MAX_LEN ?= 8192
FUZZ_BUILD := build-fuzz
FUZZ_TARGETS ?= $(FUZZ_SRCS:tests/fuzz/fuzz-%.c=%)
FUZZ_CFLAGS := -std=c11 -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
	-fno-sanitize-recover=undefined
FUZZ_LIB_OBJS := $(LIB_SRCS:src/%.c=$(FUZZ_BUILD)/obj/%.o)

$(FUZZ_BUILD)/obj/%.o: src/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link $(ALL_CPPFLAGS) -c -o $@ $<

$(FUZZ_BUILD)/fuzz-%: tests/fuzz/fuzz-%.c $(FUZZ_LIB_OBJS) $(HEADERS) $(wildcard tests/fuzz/*.h)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $(ALL_CPPFLAGS) -o $@ $< $(FUZZ_LIB_OBJS) $(LIBS)

# Kept between runs: make would delete them as intermediates.
.SECONDARY: $(FUZZ_LIB_OBJS)

fuzz-build: $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz-%)

# One target per fuzzer, so that `make -j2 fuzz` runs two at a time (CI does: 12 targets x 30 s
# take 3 minutes, not 6). Each writes its log to $(FUZZ_BUILD)/fuzz-NAME.log; its last lines (the
# final stats) are shown when it ends, the whole log when it fails.
FUZZ_RUNS := $(FUZZ_TARGETS:%=fuzz-run-%)
.PHONY: $(FUZZ_RUNS)

fuzz: $(FUZZ_RUNS)

$(FUZZ_RUNS): fuzz-run-%: $(FUZZ_BUILD)/fuzz-%
	@set -e; n=$*; c=$(FUZZ_BUILD)/corpus-$$n; a=$(FUZZ_BUILD)/artifacts-$$n/; l=$(FUZZ_BUILD)/fuzz-$$n.log; \
	  rm -rf $$c; mkdir -p $$c $$a; cp tests/fuzz/corpus/$$n/* $$c/; \
	  d=""; [ -f tests/fuzz/$$n.dict ] && d="-dict=tests/fuzz/$$n.dict"; \
	  echo "== fuzz-$$n for $(FUZZ_SECONDS)s (log: $$l)"; \
	  if $(FUZZ_BUILD)/fuzz-$$n $$d -max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN) \
	       -artifact_prefix=$$a -print_final_stats=1 $$c >$$l 2>&1; then \
	    echo "== fuzz-$$n passed:"; grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' $$l || tail -n 3 $$l; \
	  else echo "== fuzz-$$n FAILED:"; cat $$l; exit 1; fi

# The integration suite (or the part of it listed here) with every daemon under valgrind's
# memcheck: zero errors and no definite leak, checked in the logs each daemon leaves (a daemon
# killed with SIGKILL by a test leaves no summary and is skipped, and said so).
VALGRIND_TESTS ?= integration/hostile.test.mjs integration/frames.test.mjs integration/daemon.test.mjs \
  integration/relay.test.mjs integration/resilience.test.mjs
valgrind: all tools
	rm -rf $(BUILD)/valgrind && mkdir -p $(BUILD)/valgrind
	cd tests && IOTHUB_VALGRIND=1 IOTHUB_VALGRIND_DIR=$(abspath $(BUILD))/valgrind IOTHUB_BUILD=$(abspath $(BUILD)) \
	  node --test --test-concurrency=1 $(VALGRIND_TESTS)
	@set -e; cd $(BUILD)/valgrind; n=0; bad=0; skipped=0; \
	for f in iothubd-*.log; do \
	  [ -e "$$f" ] || { echo "valgrind: no daemon ran"; exit 1; }; \
	  if ! grep -q "ERROR SUMMARY:" $$f; then skipped=$$((skipped+1)); continue; fi; \
	  n=$$((n+1)); \
	  if ! grep -q "ERROR SUMMARY: 0 errors" $$f || grep -q "definitely lost: [1-9]" $$f; then \
	    bad=$$((bad+1)); echo "== $(BUILD)/valgrind/$$f"; cat $$f; fi; \
	done; \
	echo "valgrind: $$n daemon runs checked, $$bad with errors or definite leaks, $$skipped without a summary (killed)"; \
	[ $$bad -eq 0 ]

# clang-tidy per file (.clang-tidy says which checks, every finding an error), so that
# `make -j2 lint` runs two at once and a second run checks only what changed since (a stamp per
# file in $(BUILD)/lint); then cppcheck over src/ (~6 s). tests/lint/jansson.cfg tells cppcheck
# jansson's foreach macros, as it reads no system header.
CLANG_TIDY ?= clang-tidy
CPPCHECK   ?= cppcheck
LINT_TIDY  := $(patsubst src/%.c,$(BUILD)/lint/%.tidy,$(wildcard src/*.c))

lint: $(LINT_TIDY) $(BUILD)/lint/cppcheck

$(BUILD)/lint/%.tidy: src/%.c $(HEADERS) .clang-tidy
	@mkdir -p $(dir $@)
	$(CLANG_TIDY) --quiet $< -- $(ALL_CPPFLAGS) -std=c11
	@touch $@

$(BUILD)/lint/cppcheck: $(wildcard src/*.c) $(HEADERS) tests/lint/jansson.cfg
	@mkdir -p $(dir $@)
	$(CPPCHECK) --error-exitcode=1 --enable=warning,portability --inline-suppr --quiet \
	  --library=tests/lint/jansson.cfg -Iinclude --suppress=missingIncludeSystem src/
	@touch $@

bench: all tools
	cd tests && IOTHUB_BUILD=$(abspath $(BUILD)) node bench/bench.mjs

demo: all tools
	cd tests && IOTHUB_BUILD=$(abspath $(BUILD)) node demo/demo.mjs

# One hour at a steady load with a TPM at a chip's pace, sampled every minute; fails if the
# curves are not flat (tests/bench/soak.mjs says how that is defined). SOAK_SECONDS shortens it.
soak: all tools
	cd tests && IOTHUB_BUILD=$(abspath $(BUILD)) node bench/soak.mjs

install: all
	install -Dm0755 $(BUILD)/iothubd $(DESTDIR)$(PREFIX)/sbin/iothubd
	install -Dm0755 $(BUILD)/iothubctl $(DESTDIR)$(PREFIX)/bin/iothubctl
	install -Dm0755 $(BUILD)/iothub-signer $(DESTDIR)$(PREFIX)/libexec/iothub/iothub-signer
	install -Dm0755 $(BUILD)/iothub-uplink $(DESTDIR)$(PREFIX)/libexec/iothub/iothub-uplink
	install -Dm0644 systemd/iothub.service $(DESTDIR)$(PREFIX)/lib/systemd/system/iothub.service
	install -Dm0644 systemd/iothub-signer.service $(DESTDIR)$(PREFIX)/lib/systemd/system/iothub-signer.service
	install -Dm0644 systemd/iothub-signer.socket $(DESTDIR)$(PREFIX)/lib/systemd/system/iothub-signer.socket
	install -Dm0644 systemd/iothub-uplink.service $(DESTDIR)$(PREFIX)/lib/systemd/system/iothub-uplink.service
	install -Dm0644 systemd/iothub-uplink.socket $(DESTDIR)$(PREFIX)/lib/systemd/system/iothub-uplink.socket
	install -Dm0644 systemd/iothub.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/iothub.conf
	install -Dm0644 systemd/iothub.catalog $(DESTDIR)$(PREFIX)/lib/systemd/catalog/iothub.catalog
	install -Dm0640 etc/iothub.conf $(DESTDIR)/etc/iothub.conf
	# The mosquitto drop-in, inactive until copied to /etc/mosquitto/conf.d (iothubd(8), THE BROKER);
	# the plugin lives in the target's multiarch directory.
	install -d $(DESTDIR)$(PREFIX)/share/iothub/mosquitto
	sed 's|@MULTIARCH@|$(MULTIARCH)|g' packaging/mosquitto/iothub.conf > $(DESTDIR)$(PREFIX)/share/iothub/mosquitto/iothub.conf
	chmod 0644 $(DESTDIR)$(PREFIX)/share/iothub/mosquitto/iothub.conf
	for m in $(MANS); do s=$${m##*.}; install -Dm0644 $$m $(DESTDIR)$(PREFIX)/share/man/man$$s/$${m##*/}; done

DEB_PKGS := build-essential pkg-config libcurl4-openssl-dev libssl-dev libtss2-dev libmosquitto-dev \
	libsystemd-dev libjansson-dev libinih-dev libsqlite3-dev libcmocka-dev libqrencode-dev scdoc \
	swtpm swtpm-tools tpm2-tools mosquitto mosquitto-clients clang clang-tidy cppcheck \
	systemd openssl faketime sqlite3 e2fsprogs util-linux
deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEB_PKGS); \
	else \
	  echo "Run as root: apt-get install -y --no-install-recommends $(DEB_PKGS)"; \
	fi
	cd tests && npm ci --no-audit --no-fund

# Raspberry Pi: the .deb cross-built, lintian, the unit tests and fuzz replay of the cross build
# under qemu-user (packaging/cross.sh; as root it installs what it needs).
cross:
	packaging/cross.sh $(ARCH)

clean:
	rm -rf build build-asan build-fuzz

# The installed-system test (tests/system/): the freshly built .deb installed with apt in a booted
# bookworm under systemd-nspawn, then under QEMU with a real /dev/tpmrm0 (swtpm). As root; needs
# debootstrap, systemd-container, qemu-system-x86 and swtpm. The guest root file systems are cached
# in $(BUILD)/system-test. SYSTEM_TEST_ONLY=nspawn or qemu runs one of the two.
SYSTEM_TEST_ONLY ?=
.PHONY: system-test
system-test:
	DEB_BUILD_OPTIONS=nocheck OUT_DIR=$(abspath $(BUILD))/deb packaging/build-deb.sh
	cd tests && node system/run.mjs --deb $(abspath $(BUILD))/deb/iothub_$(VERSION)_$(shell dpkg --print-architecture).deb \
	  --cache $(abspath $(BUILD))/system-test $(if $(SYSTEM_TEST_ONLY),--only $(SYSTEM_TEST_ONLY))
