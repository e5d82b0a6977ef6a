# numareuse: `make demo` and `make test` do all set-up on a fresh Debian bookworm
# machine (root): Debian packages, kernel headers for bcc, a venv, the package.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages: bcc and its Python binding, headers for bcc's compile,
# nginx/haproxy/wrk/iproute2 for end-to-end tests, python3-yaml to lint packaging/daemonset.yaml,
# qemu/busybox for the VM runner.
APT_PKGS := python3-bpfcc libbpfcc bpfcc-tools linux-headers-amd64 bpftool \
            nginx-light haproxy wrk iproute2 numactl procps python3-yaml
# Debian's kernel headers of its other architectures: tests check numareuse's syscall numbers against them.
CROSS_PKGS := $(foreach a,arm64 armel armhf i386 mips64el mipsel ppc64el s390x,linux-libc-dev-$(a)-cross)
VM_PKGS := qemu-system-x86 linux-image-amd64 busybox-static cpio
PYTEST_ARGS ?=

.PHONY: setup apt venv test lint demo bench soak vm-test vm-bench vm-topology-test clean

# Install the Debian packages of $(1) that are missing (apt-get update only then);
# apt's output goes to .build/apt.log and its tail is shown when it fails.
define apt_install
@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
if [ -n "$$missing" ]; then \
  echo "setup: installing Debian packages:" $$missing; mkdir -p .build; \
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; } >.build/apt.log 2>&1 \
    || { tail -20 .build/apt.log; echo "setup: apt-get failed (log: .build/apt.log)"; exit 1; }; \
fi
endef

setup: apt venv

apt:
	$(call apt_install,$(APT_PKGS) $(CROSS_PKGS))

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@echo "setup: installing numareuse into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

test: setup
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
	$(VENV)/bin/ruff check numareuse cli tests bench
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check numareuse cli tests bench
	$(VENV)/bin/ruff format --check numareuse cli tests bench

clean:
	rm -rf $(VENV) .build

# The tests/vm suite inside a qemu guest with 2 NUMA nodes (node 0: CPUs 0-1,
# node 1: CPUs 2-3) booting Debian's kernel on this machine's own root.
# vm/run.sh exits with the guest's pytest status (make shows it as "Error N").
# VM_* settings: see vm/run.sh.
vm-test: setup
	$(call apt_install,$(VM_PKGS))
	vm/run.sh $(VENV)/bin/pytest tests/vm $(PYTEST_ARGS)

# Benchmarks (issues 5, 12, 13): numareuse against baselines measured in the same
# run: locality, connection rate, per-selection cost and its scaling, and, against
# the previous release (layout 1, from git history), register/attach/Selector()
# time and memory; pre-fork recycling errors (in a network namespace of its own),
# the domain-change window, `numareuse watch`. About 6 min; writes
# bench/results.json, prints a markdown table. BENCH_ARGS=--quick: a 1.5-min smoke
# run; BENCH_ARGS="--only select_ns,controller": some phases. CLI state goes to a
# private bpffs; kernel.bpf_stats_enabled is restored.
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

# Soak (issue 14): Debian's nginx (reuseport, workers pinned) under wrk -t2 -c16
# 'Connection: close' in a network namespace of its own, through phases of
# numareuse attach/detach cycles, domain-spec swaps, nginx reloads, worker kill -9
# (with and without numareuse) and watcher restarts (where `numareuse watch` exists).
# Every phase without kills must lose no request. Prints a markdown table, writes
# bench/soak-results.json (not committed); 60 s of load, about 1.5 min.
# SOAK_ARGS="--duration 120 --cycles 40" to change durations and counts (--help);
# tests/test_soak.py runs the short form (--short) inside `make test`.
# Then the fuzz tests with SOAK_FUZZ_EXAMPLES examples each (`make test` runs 100; about 2 min here).
SOAK_FUZZ_EXAMPLES ?= 1000
soak: setup
	$(PY) -m bench.soak $(SOAK_ARGS)
	NUMAREUSE_FUZZ_EXAMPLES=$(SOAK_FUZZ_EXAMPLES) $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_fuzz.py tests/test_fuzz_meta.py

# Demo (issue 5): the bundled pre-fork server on loopback, one worker per CPU,
# under client load pinned per CPU: first the kernel's default balancing, then
# numareuse; prints a before/after table. Under a minute; stops all it started,
# even on Ctrl-C. DEMO_ARGS="--duration 8" for longer runs.
demo: setup
	$(PY) -m numareuse.demo $(DEMO_ARGS)

# Locality on real NUMA nodes (issue 7): qemu guests with 2 nodes x 2 CPUs and
# 4 nodes x 2 CPUs; one and two workers per node (and two, the first of each
# node exited) under the kernel's hash, SO_INCOMING_CPU, the selftest-style
# program and numareuse. Prints a markdown table of locality shares and
# ratios (emulated CPUs: no times) and writes bench/vm-results.json (not
# committed, like bench/results.json). About 1.5 min here.
# VM_BENCH_ARGS="--per-cpu 100 --layouts 2x2" for a shorter run.
vm-bench: setup
	$(call apt_install,$(VM_PKGS))
	$(PY) -m bench.vm_run $(VM_BENCH_ARGS)

# tests/vm on NUMA layouts other than vm-test's (issue 7), one guest each:
# interleaved CPU numbers, a node with memory only, two last-level caches in
# one node (CPU offline/online runs in every guest). About 2 min here. Every
# guest runs; the status is the first failing guest's.
vm-topology-test: setup
	$(call apt_install,$(VM_PKGS))
	@rc=0; \
	guest() { \
	  echo "vm-topology-test: $$1: VM_NODES='$$2' VM_SMP='$$3'"; \
	  VM_NODES="$$2" VM_SMP="$$3" NUMAREUSE_VM_LLC="$$4" vm/run.sh $(VENV)/bin/pytest tests/vm $(PYTEST_ARGS) \
	    || { s=$$?; echo "vm-topology-test: $$1 FAILED (status $$s)"; [ $$rc != 0 ] || rc=$$s; }; \
	}; \
	guest interleaved '0,2;1,3' '' ''; \
	guest memory-only '0-1;;2-3' '' ''; \
	guest llc '0-3;4-5' 'sockets=3,cores=2' '0-1;2-3;4-5'; \
	exit $$rc
