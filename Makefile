# vublk — a vhost-user-blk back-end.
#   make run    serve a sparse 1 GiB disk.img on ./vublk.sock and print the QEMU command line
#   make test   install what the tests need (make deps), then unit, fuzz-seed and end-to-end tests
#   make bench  vublk against qemu-storage-daemon: load generator, then fio in a guest (bench-guest)

SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
BIN := bin/vublk
SOCKET ?= $(CURDIR)/vublk.sock
DISK ?= $(CURDIR)/disk.img
SIZE ?= 1G
FUZZTIME ?= 60s
FUZZ_PKGS := ./config ./virtio ./vhostuser ./vduse

.PHONY: all build print-ldflags deps run test check unit crash e2e hostile rbd fuzz install clean bench bench-rbd bench-guest

all: build

# vublk is built with RBD support (librbd through cgo, the "rbd" build tag; make deps installs
# librbd-dev). TAGS= builds without it: RBD exports are then refused with one line saying so.
TAGS ?= rbd

# The Go runtime's sysmon thread sleeps deeply while every P is idle, and the first system or cgo
# call after that wakes it, after which it polls every 20 us for a while: an event-driven server
# (a kick, a completion, then idle again) pays a futex wake-up and two or three context switches
# of sysmon per event. Measured on RBD exports (README, "RBD performance"): about a third of
# vublk's own CPU per I/O. Any schedtrace period > 0 keeps sysmon out of that deep sleep (it then
# backs off to one wake-up every 10 ms); the period is the largest one, 24.8 days, so that no
# scheduler trace is printed (at most one SCHED line on stderr per 24.8 days; a fatal error also
# prints the scheduler's state). GODEBUG in
# the environment still overrides it (GODEBUG=schedtrace=0 restores Go's default), and
# `make GODEBUG_DEFAULT=` builds without it. This is the variable //go:debug lines set; go.mod
# has none, so nothing else is overridden.
GODEBUG_DEFAULT ?= schedtrace=2147483647
LDFLAGS := $(if $(GODEBUG_DEFAULT),-X=runtime.godebugDefault=$(GODEBUG_DEFAULT))

build:
	$(GO) build -tags "$(TAGS)" -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/vublk

# The link flags above, for the tests that build vublk themselves (tests/internal/buildvublk), so
# that they run what make build ships.
print-ldflags:
	@echo '$(LDFLAGS)'

# Everything the tests need: Debian packages, the guest kernel, Go modules.
deps:
	bash scripts/deps.sh

run: build
	@echo "Serving $(DISK) ($(SIZE), created sparse if missing) on $(SOCKET). Attach it to QEMU with:"
	@echo
	@echo "  qemu-system-x86_64 -machine q35,accel=kvm:tcg -m 1G \\"
	@echo "    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\"
	@echo "    -chardev socket,id=vublk0,path=$(SOCKET) \\"
	@echo "    -device vhost-user-blk-pci,chardev=vublk0,num-queues=2 \\"
	@echo "    ...your usual boot options..."
	@echo
	@echo "Stop with Ctrl-C: vublk drains, syncs and exits."
	$(BIN) serve --socket-path $(SOCKET) --blk-file $(DISK) --size $(SIZE)

# staticcheck, pinned: `go run` fetches this exact version through the module proxy (the first
# run builds it, later ones come from the build cache); go.mod does not change.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

# Static checks: formatting, vet and staticcheck.
check:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt would change:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags rbd ./...
	$(GO) vet -tags e2e ./tests/...
	$(GO) run $(STATICCHECK) ./...
	$(GO) run $(STATICCHECK) -tags e2e ./tests/...

# Unit and table tests with the race detector; fuzz targets run their seed corpus.
unit:
	$(GO) test -race -tags "$(TAGS)" -count=1 -timeout 10m $$($(GO) list ./... | grep -v /tests/crash)

# The randomized crash checker (prints how many crash points it checked, and that a barrier
# that syncs before draining is caught).
crash:
	$(GO) test -race -count=1 -timeout 10m -v ./tests/crash/ | grep -E '^(=== RUN|---|\s+---|ok|FAIL|PASS)|checked|caught|lost'; exit $${PIPESTATUS[0]}

# The hostile front-end and guest suite alone (make unit runs it too): attacks on the vublk binary
# through its socket, with the bounds they must stay within.
hostile:
	$(GO) test -count=1 -v -timeout 10m ./tests/hostile/ | grep -E '^(=== RUN|---|\s+---|\s+hostile_test|ok|FAIL|PASS)'; exit $${PIPESTATUS[0]}

# End-to-end tests against real QEMU with a Linux guest (needs make deps), on every QEMU of the
# matrix (the host's 7.2 and the Debian 13 root's 10.0; VUBLK_E2E_QEMU=7.2 keeps one). One line
# per test; the daemon's and the guest's logs only for a test that fails.
GOTESTSUM := bin/gotestsum
e2e: $(GOTESTSUM)
	$(GOTESTSUM) --format testname --hide-summary=skipped -- -tags e2e -count=1 -timeout 60m ./tests/e2e/

$(GOTESTSUM):
	GOBIN=$(CURDIR)/bin $(GO) install gotest.tools/gotestsum@v1.13.0

test: deps check unit crash e2e rbd

# The RBD tests against a real single-node Ceph cluster (scripts/ceph-cluster.sh), started for
# them and stopped after, also when they fail: the store's own tests, the crash workload through
# the socket with vublk SIGKILLed, and the real-guest tests on an RBD export (both QEMUs).
rbd: $(GOTESTSUM)
	bash scripts/ceph-cluster.sh run $(GOTESTSUM) --format testname --hide-summary=skipped -- \
	  -tags rbd,e2e -p 1 -count=1 -timeout 40m -run 'RBD|^TestStore|^TestOpen|^TestParseSpec' ./backend/rbd/ ./tests/crash/ ./tests/e2e/

# vublk and qemu-storage-daemon 10.0 (two configurations) side by side on a tmpfs file, driven by
# vublk bench and by libblkio's qemu-img bench, 3 rounds, with fio psync's CPU per I/O as the floor;
# then the in-guest comparison (bench-guest) (runs make deps first; about 20 minutes). ROUNDS,
# RUNTIME, RAMP, BLKIO_SECONDS and SERVERS override scripts/bench.sh's defaults; ROUNDS and
# GUEST_SECONDS bench-guest's.
bench: deps build
	bash scripts/bench.sh
	$(MAKE) --no-print-directory bench-rbd
	$(MAKE) --no-print-directory bench-guest

# The RBD rows: vublk --blk-rbd against qemu-storage-daemon's rbd driver on one image of a
# single-node cluster started for it (scripts/bench-rbd.sh; ROUNDS, RUNTIME, SIZE_MB, CACHE=on,
# PRIO=-10: the servers, the load generator and the OSD at that priority, KEEP=1, SERVERS, JOBS),
# with the OSD's CPU per I/O.
bench-rbd: deps build
	bash scripts/ceph-cluster.sh run bash scripts/bench-rbd.sh

# The in-guest comparison: a TCG guest runs fio jobs against qemu-storage-daemon and vublk, and the
# table shows each server's CPU time per I/O (make deps installs the guest kernel and tools).
# ROUNDS (2) rounds, GUEST_SECONDS (10) per job; every run goes to GUEST_OUT.
GUEST_OUT ?= $(CURDIR)/bin/bench-guest-results.jsonl
bench-guest: deps
	VUBLK_GUEST_BENCH=1 OUT=$(GUEST_OUT) $(GO) test -tags e2e -run TestGuestBench -count=1 -v -timeout 30m ./tests/e2e/

# Run every fuzz target for FUZZTIME each. FUZZMINIMIZETIME bounds the time spent shrinking each new
# interesting input (Go's default, 60s, can take most of a run of FuzzConn, whose inputs are
# slower); its executions are not counted in the fuzzer's execs.
FUZZMINIMIZETIME ?= 5s
fuzz:
	@set -e; for pkg in $(FUZZ_PKGS); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f ($(FUZZTIME))"; \
	    $(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINIMIZETIME) $$pkg; \
	  done; \
	done

# Install the binary, the systemd unit, the example config (not over an existing one) and the
# vhost-user back-end description QEMU and libvirt look for. DESTDIR stages into a directory.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
UNITDIR ?= $(SYSCONFDIR)/systemd/system
VHOSTUSERDIR ?= /usr/share/qemu/vhost-user

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/vublk
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(VHOSTUSERDIR) $(DESTDIR)$(SYSCONFDIR)/vublk
	sed 's|@BINDIR@|$(BINDIR)|g' dist/vublk.service.in > $(DESTDIR)$(UNITDIR)/vublk.service
	sed 's|@BINDIR@|$(BINDIR)|g' dist/50-vublk.json.in > $(DESTDIR)$(VHOSTUSERDIR)/50-vublk.json
	chmod 0644 $(DESTDIR)$(UNITDIR)/vublk.service $(DESTDIR)$(VHOSTUSERDIR)/50-vublk.json
	test -e $(DESTDIR)$(SYSCONFDIR)/vublk/vublk.toml || install -m 0644 examples/vublk.toml $(DESTDIR)$(SYSCONFDIR)/vublk/vublk.toml
	@echo "Installed. Edit $(SYSCONFDIR)/vublk/vublk.toml, then: systemctl daemon-reload && systemctl enable --now vublk"

clean:
	rm -rf bin
