# mailshift — top-level build.
#
#   make            build everything (warnings are errors)
#   make check      install missing build/test packages, build, run every test
#   make demo       two local Dovecots, a demo mailbox moved while you watch
#   make bench      the mover benchmark against mbsync and doveadm (not a test)

CC      ?= cc
PKGS    := libuv openssl sqlite3 jansson libcap-ng
CFLAGS  ?= -O2 -g
CFLAGS  += -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -Wno-format-truncation -MMD -MP \
	   -D_GNU_SOURCE -Idaemon $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS  += $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -luv -lssl -lcrypto -lsqlite3 -ljansson -lcap-ng)
PYTHON  ?= /usr/bin/python3

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
	$(Q)$(CC) $(CFLAGS) -c -o $@ $<

tools/mailshiftctl: $(TOOL_OBJ) daemon/libms.a
	@echo "  LD      $@"
	$(Q)$(CC) $(LDFLAGS) -o $@ $(TOOL_OBJ) daemon/libms.a $(LDLIBS)

tests/unit/test_%: tests/unit/test_%.c daemon/libms.a
	@echo "  CC      $@"
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< daemon/libms.a $(LDLIBS) -lcmocka

deps:
	$(Q)./tests/install-deps.sh

unit: $(UNIT_BIN)
	$(Q)set -e; for t in $(UNIT_BIN); do echo "  UNIT    $$t"; ./$$t; done

integration: all
	$(Q)$(PYTHON) -m pytest -q tests/integration

check: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(MAKE) --no-print-directory unit
	$(Q)$(MAKE) --no-print-directory integration

demo: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(PYTHON) tools/demo.py

bench: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(PYTHON) bench/mover_bench.py

bench-gateway: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(PYTHON) bench/gateway_bench.py

clean:
	rm -f daemon/*.o daemon/*.d daemon/libms.a tools/*.o tools/*.d \
		tools/mailshiftctl daemon/mailshiftd $(UNIT_BIN) tests/unit/*.d

.PHONY: all deps unit integration check demo bench bench-gateway clean
.SECONDARY:
-include $(LIB_OBJ:.o=.d) $(TOOL_OBJ:.o=.d) daemon/mailshiftd.d
