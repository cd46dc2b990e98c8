# mailshift — top-level build.
#
#   make            build everything (warnings are errors)
#   make check      install missing build/test packages, build, run every test:
#                   unit, integration, the integration suite again under
#                   AddressSanitizer + UBSan (check-asan), each fuzz target
#                   for FUZZ_SECONDS (check-fuzz)
#   make asan       mailshiftd and mailshiftctl with ASan + UBSan, in build/asan/
#   make hooks      mailshiftd and mailshiftctl with the tests' crash points
#                   (-DMS_TEST_HOOKS, daemon/testhook.h), in build/hooks/
#   make check-asan the unit and integration tests against the build/asan/ binaries
#   make fuzz-build the libFuzzer targets (tests/fuzz/fuzz_*.c), in build/fuzz/
#   make fuzz       run them longer: make fuzz FUZZ_SECONDS=600 [FUZZ=fuzz_sasl]
#   make demo       two local Dovecots, a demo mailbox moved while you watch;
#                   then demo-router
#   make demo-router router mode in network namespaces (root): the client keeps
#                   the old server's address, steer show before and after
#   make bench      the mover benchmark against mbsync and doveadm (not a test)
#   make bench-restart  what clients see while mailshiftd restarts (not a test)
#   make bench-stall    what the gateway adds to a command written in pieces
#   make kmod       the kernel module, kmod/mailshift.ko (KDIR= a kernel
#                   build tree; default the installed Debian cloud headers)
#   make kmod-check the module under the kernel's checkpatch.pl --strict
#   make install    the programs, man pages, example config and systemd units, under
#                   DESTDIR and PREFIX (default /usr/local)
#
# CFLAGS is the caller's (optimisation, debugging: `make CFLAGS=-O0`); what
# the code needs to build at all is in MS_CFLAGS and always added.

CC      ?= cc
PKGS    := libuv openssl sqlite3 libpq jansson libcap-ng libnftables libnl-route-3.0 \
	   libnl-genl-3.0 libnetfilter_queue
CFLAGS  ?= -O2 -g
MS_CFLAGS := -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -MMD -MP \
	     -D_GNU_SOURCE -Idaemon $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
# gcc warns about snprintf truncation we do on purpose; clang has no such
# warning and, with -Werror, refuses to be told not to give it.
cc_is_clang = $(findstring clang,$(shell $(1) --version 2>/dev/null))
gcc_only    = $(if $(call cc_is_clang,$(1)),,-Wno-format-truncation)
CC_WARN := $(call gcc_only,$(CC))
LDLIBS  += $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -luv -lssl -lcrypto -lsqlite3 -lpq -ljansson -lcap-ng -lnftables -lnl-route-3 -lnl-genl-3 -lnl-3 -lnetfilter_queue -lnfnetlink)
PYTHON  ?= /usr/bin/python3
PREFIX  ?= /usr/local
BINDIR  ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
MANDIR  ?= $(PREFIX)/share/man
DOCDIR  ?= $(PREFIX)/share/doc/mailshift
UNITDIR ?= $(PREFIX)/lib/systemd/system
INSTALL ?= install

ifeq ($(V),1)
Q :=
else
Q := @
endif

# Every daemon/*.c except program entry points goes into one static library
# that the daemon, the CLI and the unit tests link against.
MAINS     := daemon/mailshiftd.c
LIB_SRC   := $(filter-out $(MAINS),$(wildcard daemon/*.c))
LIB_OBJ   := $(LIB_SRC:.c=.o)
TOOL_SRC  := $(wildcard tools/*.c)
TOOL_OBJ  := $(TOOL_SRC:.c=.o)
UNIT_SRC  := $(wildcard tests/unit/test_*.c)
UNIT_BIN  := $(UNIT_SRC:.c=)

all: tools/mailshiftctl daemon/mailshiftd

daemon/mailshiftd: daemon/mailshiftd.o daemon/libms.a
	@echo "  LD      $@"
	$(Q)$(CC) $(LDFLAGS) -o $@ $< daemon/libms.a $(LDLIBS)

daemon/libms.a: $(LIB_OBJ)
	@echo "  AR      $@"
	$(Q)rm -f $@ && ar rcs $@ $^

%.o: %.c
	@echo "  CC      $@"
	$(Q)$(CC) $(MS_CFLAGS) $(CC_WARN) $(CFLAGS) -c -o $@ $<

tools/mailshiftctl: $(TOOL_OBJ) daemon/libms.a
	@echo "  LD      $@"
	$(Q)$(CC) $(LDFLAGS) -o $@ $(TOOL_OBJ) daemon/libms.a $(LDLIBS)

tests/unit/test_%: tests/unit/test_%.c daemon/libms.a
	@echo "  CC      $@"
	$(Q)$(CC) $(MS_CFLAGS) $(CC_WARN) $(CFLAGS) $(LDFLAGS) -o $@ $< daemon/libms.a $(LDLIBS) -lcmocka

# ---- AddressSanitizer + UndefinedBehaviorSanitizer build ----
#
# Its own objects under build/asan/obj/, so it never mixes with the normal
# build. Any UB is fatal (-fno-sanitize-recover), like a memory error. With
# the tests' crash points (-DMS_TEST_HOOKS), so that check-asan runs the
# crash tests too: inert unless MAILSHIFT_CRASH_AT is set.

ASAN_CC      ?= clang
ASAN_CFLAGS  ?= -O1 -g
SAN_FLAGS    := -fsanitize=address,undefined -fno-sanitize-recover=undefined \
		-fno-omit-frame-pointer
ASAN_DIR     := build/asan
ASAN_LIB_OBJ := $(LIB_SRC:%.c=$(ASAN_DIR)/obj/%.o)
ASAN_TOOL_OBJ := $(TOOL_SRC:%.c=$(ASAN_DIR)/obj/%.o)
ASAN_UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(ASAN_DIR)/unit/%)
ASAN_BIN     := $(ASAN_DIR)/mailshiftd $(ASAN_DIR)/mailshiftctl
ASAN_WARN    := $(call gcc_only,$(ASAN_CC))

asan: $(ASAN_BIN)

$(ASAN_DIR)/obj/%.o: %.c
	@echo "  CC      $@"
	@mkdir -p $(@D)
	$(Q)$(ASAN_CC) $(MS_CFLAGS) $(ASAN_WARN) $(ASAN_CFLAGS) $(SAN_FLAGS) \
		-DMS_TEST_HOOKS -c -o $@ $<

$(ASAN_DIR)/libms.a: $(ASAN_LIB_OBJ)
	@echo "  AR      $@"
	$(Q)rm -f $@ && ar rcs $@ $^

$(ASAN_DIR)/mailshiftd: $(ASAN_DIR)/obj/daemon/mailshiftd.o $(ASAN_DIR)/libms.a
	@echo "  LD      $@"
	$(Q)$(ASAN_CC) $(SAN_FLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(ASAN_DIR)/mailshiftctl: $(ASAN_TOOL_OBJ) $(ASAN_DIR)/libms.a
	@echo "  LD      $@"
	$(Q)$(ASAN_CC) $(SAN_FLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(ASAN_DIR)/unit/test_%: tests/unit/test_%.c $(ASAN_DIR)/libms.a
	@echo "  CC      $@"
	@mkdir -p $(@D)
	$(Q)$(ASAN_CC) $(MS_CFLAGS) $(ASAN_WARN) $(ASAN_CFLAGS) $(SAN_FLAGS) $(LDFLAGS) \
		-MF $@.d -o $@ $< $(ASAN_DIR)/libms.a $(LDLIBS) -lcmocka

# ---- test-hook build: the crash points of daemon/testhook.h ----
#
# The same code with MS_CRASH_POINT() compiled in: the integration tests
# that kill a process at a chosen instant use these binaries
# (tests/lib/gateway.py: MAILSHIFTD_HOOKS, MAILSHIFTCTL_HOOKS). The ASan
# build has the crash points too, so that check-asan runs those tests
# against it.

HOOKS_DIR      := build/hooks
HOOKS_LIB_OBJ  := $(LIB_SRC:%.c=$(HOOKS_DIR)/obj/%.o)
HOOKS_TOOL_OBJ := $(TOOL_SRC:%.c=$(HOOKS_DIR)/obj/%.o)
HOOKS_BIN      := $(HOOKS_DIR)/mailshiftd $(HOOKS_DIR)/mailshiftctl

hooks: $(HOOKS_BIN)

$(HOOKS_DIR)/obj/%.o: %.c
	@echo "  CC      $@"
	@mkdir -p $(@D)
	$(Q)$(CC) $(MS_CFLAGS) $(CC_WARN) $(CFLAGS) -DMS_TEST_HOOKS -c -o $@ $<

$(HOOKS_DIR)/libms.a: $(HOOKS_LIB_OBJ)
	@echo "  AR      $@"
	$(Q)rm -f $@ && ar rcs $@ $^

$(HOOKS_DIR)/mailshiftd: $(HOOKS_DIR)/obj/daemon/mailshiftd.o $(HOOKS_DIR)/libms.a
	@echo "  LD      $@"
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(HOOKS_DIR)/mailshiftctl: $(HOOKS_TOOL_OBJ) $(HOOKS_DIR)/libms.a
	@echo "  LD      $@"
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# ---- libFuzzer targets ----
#
# Each tests/fuzz/fuzz_NAME.c is one target, linked against the library
# built again with the fuzzer's coverage instrumentation and the
# sanitizers. Seeds: tests/fuzz/corpus/NAME/ (read, never written).

FUZZ_CC      ?= clang
FUZZ_CFLAGS  ?= -O1 -g
FUZZ_DIR     := build/fuzz
FUZZ_SRC     := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_NAMES   := $(notdir $(FUZZ_SRC:.c=))
FUZZ_BIN     := $(addprefix $(FUZZ_DIR)/,$(FUZZ_NAMES))
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(FUZZ_DIR)/obj/%.o)
FUZZ_WARN    := $(call gcc_only,$(FUZZ_CC))
FUZZ_SECONDS ?= 15
FUZZ         ?= $(FUZZ_NAMES)

fuzz-build: $(FUZZ_BIN)

$(FUZZ_DIR)/obj/%.o: %.c
	@echo "  CC      $@"
	@mkdir -p $(@D)
	$(Q)$(FUZZ_CC) $(MS_CFLAGS) $(FUZZ_WARN) $(FUZZ_CFLAGS) $(SAN_FLAGS) \
		-fsanitize=fuzzer-no-link -c -o $@ $<

$(FUZZ_DIR)/libms.a: $(FUZZ_LIB_OBJ)
	@echo "  AR      $@"
	$(Q)rm -f $@ && ar rcs $@ $^

$(FUZZ_DIR)/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_DIR)/libms.a
	@echo "  CC      $@"
	@mkdir -p $(@D)
	$(Q)$(FUZZ_CC) $(MS_CFLAGS) $(FUZZ_WARN) $(FUZZ_CFLAGS) $(SAN_FLAGS) \
		-fsanitize=fuzzer $(LDFLAGS) -MF $@.d -o $@ $< $(FUZZ_DIR)/libms.a \
		$(LDLIBS)

# ---- running the tests ----

deps:
	$(Q)./tests/install-deps.sh

unit: $(UNIT_BIN)
	$(Q)set -e; for t in $(UNIT_BIN); do echo "  UNIT    $$t"; ./$$t; done

# The store's unit tests again, against a PostgreSQL server the harness
# starts for them (tests/lib/postgres.py) and removes after.
unit-pg: tests/unit/test_store
	@echo "  UNIT    tests/unit/test_store (PostgreSQL)"
	$(Q)$(PYTHON) tests/lib/postgres.py ./tests/unit/test_store

# INTEGRATION_SKIP: pytest options that leave a part out (make check's
# first lane leaves the kernel VM test to the sanitizer lane).
# MS_TEST_STORE=postgresql in the environment: every store on PostgreSQL.
# PYTEST_JOBS: pytest-xdist workers, each taking whole test files (most of
# a test's time is spent waiting on servers and timers); 1: no workers.
PYTEST_JOBS ?= 2
pytest_jobs = $(if $(filter-out 0 1,$(PYTEST_JOBS)),-n $(PYTEST_JOBS) --dist loadfile)
integration: all hooks
	$(Q)$(PYTHON) -m pytest -q -rs --durations=25 $(pytest_jobs) \
		$(INTEGRATION_SKIP) tests/integration

# The unit tests and the whole integration suite against the ASan binaries;
# any sanitizer report (the daemon's, the CLI's, even from a process a test
# killed or that exited 0) fails it: tests/asan-check. PYTEST_ARGS narrows
# the pytest part (default: the whole of tests/integration).
check-asan: $(ASAN_BIN) $(ASAN_UNIT_BIN)
	$(Q)PYTHON="$(PYTHON)" PYTEST_ARGS="$(PYTEST_ARGS)" \
		PYTEST_JOBS="$(pytest_jobs)" ./tests/asan-check $(ASAN_DIR) $(ASAN_UNIT_BIN)

# Each target for FUZZ_SECONDS from its seeds (a scratch corpus in
# build/fuzz/run/); a crash fails and names the reproducer.
check-fuzz: $(FUZZ_BIN)
	$(Q)./tests/fuzz/run --fresh $(FUZZ_DIR) $(FUZZ_SECONDS) $(FUZZ)

# Longer runs, keeping what they find in build/fuzz/corpus/NAME/.
fuzz: $(FUZZ_BIN)
	$(Q)./tests/fuzz/run $(FUZZ_DIR) $(FUZZ_SECONDS) $(FUZZ)

# Everything is built first; then two lanes side by side (tests/run-parallel:
# both mostly wait on servers and timers): the integration suite on
# PostgreSQL then the fuzzers, and the suite's run under the sanitizers on
# SQLite. The kernel VM test
# (test_kmod.py) runs once, in the sanitizer lane, with the sanitizer builds
# of mailshiftctl and mailshiftd in the VM: the same checks and what the
# sanitizers add, without a second boot waiting for the first. Every stage
# runs even when an earlier one failed: one run shows every report. The
# build uses every core (CHECK_JOBS).
CHECK_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

check: deps
	$(Q)./tests/check-tree
	$(Q)$(MAKE) --no-print-directory kmod-check
	$(Q)$(MAKE) --no-print-directory -j$(CHECK_JOBS) all hooks $(UNIT_BIN) \
		$(ASAN_BIN) $(ASAN_UNIT_BIN) $(FUZZ_BIN)
	$(Q)$(MAKE) --no-print-directory unit
	$(Q)$(MAKE) --no-print-directory unit-pg
	$(Q)./tests/run-parallel check-lane check-asan

# make check's first lane: the integration suite on PostgreSQL (every
# store a test names is a database on a server the harness starts:
# tests/lib/storemode.py), the sanitizer lane's on SQLite, so the whole
# suite passes on both engines.
check-lane:
	$(Q)status=0; \
	MS_TEST_STORE=postgresql $(MAKE) --no-print-directory integration \
		INTEGRATION_SKIP=--ignore=tests/integration/test_kmod.py || \
		status=1; \
	$(MAKE) --no-print-directory check-fuzz || status=1; \
	exit $$status

demo: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(PYTHON) tools/demo.py
	$(Q)$(PYTHON) tools/demo_router.py

demo-router: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(PYTHON) tools/demo_router.py

bench: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(PYTHON) bench/mover_bench.py

bench-gateway: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(PYTHON) bench/gateway_bench.py

bench-restart: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(PYTHON) bench/restart_bench.py

bench-stall: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(PYTHON) bench/stall_bench.py

# ---- the kernel module (kmod/, docs/kmod.md) ----
#
# Built out of tree through the top-level Kbuild. KDIR: a kernel's build
# tree; by default the newest installed Debian cloud kernel headers.
# BTF is left out: the headers carry no vmlinux to take it from.
KDIR ?= $(shell ls -d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | \
		sort -V | tail -n 1)
KMOD_SRC := $(filter-out %.mod.c,$(wildcard kmod/*.c kmod/*.h kmod/uapi/*.h))
CHECKPATCH_DIR := build/checkpatch

kmod: $(KMOD_SRC) kmod/Kbuild Kbuild
	$(Q)test -n "$(KDIR)" -a -d "$(KDIR)" || { echo "kmod: no kernel" \
		"headers (KDIR=$(KDIR)); tests/install-deps.sh installs" \
		"them" >&2; exit 1; }
	$(Q)$(MAKE) -C $(KDIR) M=$(CURDIR) CONFIG_DEBUG_INFO_BTF_MODULES= \
		modules

# The kernel's own style checker, from Debian's kernel source package (no
# package ships checkpatch.pl alone); its word lists sit beside it.
$(CHECKPATCH_DIR)/checkpatch.pl:
	$(Q)mkdir -p $(CHECKPATCH_DIR)
	$(Q)tar -xJf /usr/src/linux-source-6.1.tar.xz -C $(CHECKPATCH_DIR) \
		--strip-components=2 --wildcards \
		'*/scripts/checkpatch.pl' '*/scripts/spelling.txt' \
		'*/scripts/const_structs.checkpatch'

kmod-check: $(CHECKPATCH_DIR)/checkpatch.pl
	$(Q)perl $(CHECKPATCH_DIR)/checkpatch.pl --strict --no-tree --terse \
		--show-types -f $(KMOD_SRC) kmod/Kbuild Kbuild && \
		echo "  CHECK   kmod: checkpatch.pl --strict finds nothing"

kmod-clean:
	$(Q)test -z "$(KDIR)" || $(MAKE) -C $(KDIR) M=$(CURDIR) clean

# What a package holds: mailshiftd is the administrator's daemon (sbin),
# mailshiftctl the operator's tool; the example config goes with the docs
# (a package decides whether to put one in /etc).
install: all
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SBINDIR) \
		$(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(DOCDIR)
	$(INSTALL) -m 755 tools/mailshiftctl $(DESTDIR)$(BINDIR)/mailshiftctl
	$(INSTALL) -m 755 daemon/mailshiftd $(DESTDIR)$(SBINDIR)/mailshiftd
	$(INSTALL) -m 644 docs/mailshift.conf.5 $(DESTDIR)$(MANDIR)/man5/
	$(INSTALL) -m 644 docs/mailshiftd.8 docs/mailshiftctl.8 \
		$(DESTDIR)$(MANDIR)/man8/
	$(INSTALL) -m 644 etc/mailshift.conf \
		$(DESTDIR)$(DOCDIR)/mailshift.conf.example
	$(INSTALL) -d $(DESTDIR)$(UNITDIR)
	$(INSTALL) -m 644 etc/systemd/mailshiftd.socket $(DESTDIR)$(UNITDIR)/
	sed 's|@SBINDIR@|$(SBINDIR)|g' etc/systemd/mailshiftd.service.in \
		> $(DESTDIR)$(UNITDIR)/mailshiftd.service
	chmod 644 $(DESTDIR)$(UNITDIR)/mailshiftd.service

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/mailshiftctl $(DESTDIR)$(SBINDIR)/mailshiftd \
		$(DESTDIR)$(MANDIR)/man5/mailshift.conf.5 \
		$(DESTDIR)$(MANDIR)/man8/mailshiftd.8 \
		$(DESTDIR)$(MANDIR)/man8/mailshiftctl.8 \
		$(DESTDIR)$(DOCDIR)/mailshift.conf.example \
		$(DESTDIR)$(UNITDIR)/mailshiftd.socket \
		$(DESTDIR)$(UNITDIR)/mailshiftd.service
	-rmdir $(DESTDIR)$(DOCDIR)

clean:
	rm -f daemon/*.o daemon/*.d daemon/libms.a tools/*.o tools/*.d \
		tools/mailshiftctl daemon/mailshiftd $(UNIT_BIN) tests/unit/*.d
	rm -f kmod/*.o kmod/*.ko kmod/*.mod kmod/*.mod.c kmod/.*.cmd \
		kmod/modules.order Module.symvers modules.order \
		.Module.symvers.cmd .modules.order.cmd
	rm -rf build

# What a program built on daemon/libms.a links with (the kernel test's
# helpers use it rather than keep a list of their own).
print-libs:
	@echo $(shell pkg-config --cflags $(PKGS) 2>/dev/null) $(LDLIBS)

.PHONY: print-libs all asan hooks fuzz-build deps unit integration check-asan check-fuzz fuzz \
	check-lane \
	kmod kmod-check kmod-clean check demo demo-router bench bench-gateway bench-restart \
	bench-stall install uninstall clean
.SECONDARY:
-include $(LIB_OBJ:.o=.d) $(TOOL_OBJ:.o=.d) daemon/mailshiftd.d
-include $(wildcard $(ASAN_DIR)/obj/*/*.d $(ASAN_DIR)/unit/*.d)
-include $(wildcard $(HOOKS_DIR)/obj/*/*.d)
-include $(wildcard $(FUZZ_DIR)/obj/*/*.d $(FUZZ_DIR)/*.d)
