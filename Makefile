# berth: `make up` runs the stack, `make test` runs every test, `make bench` measures.
CARGO ?= cargo
# Extra flags for `berth up`, e.g. make up BERTH_ARGS="--docker-config /etc/docker/daemon.json"
BERTH_ARGS ?=
# Parallel test processes (integration tests mostly wait on processes and the kernel).
TEST_THREADS ?= 4

.PHONY: all deps pyvenv build release up test unit lint fmt bench bench-cri critest clean

all: build

deps:
	./deploy/install-deps.sh

# docker-py and the Kubernetes Python client (PyPI) in target/pyvenv for the integration tests
# that drive berth with them.
pyvenv:
	./deploy/pyvenv.sh target/pyvenv

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

up: deps release
	./target/release/berth up $(BERTH_ARGS)

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every test, unit and integration. Integration tests run the binaries `build` produced.
test: deps pyvenv build lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast --test-threads $(TEST_THREADS); \
	else \
		$(CARGO) test --workspace --no-fail-fast -- --test-threads $(TEST_THREADS); \
	fi

unit:
	$(CARGO) test --workspace --lib --bins

fmt:
	$(CARGO) fmt --all

# Benchmarks (docs/bench.md). BENCH_DOCKERD=1 also installs Debian's docker.io and runs every
# scenario against a dockerd on its own socket, data root and bridge, printing berth/dockerd
# ratios. Knobs: DENSITY (200), RUNS (30), BREAKDOWN (1), PULL (1), VM (1 when QEMU, virtiofsd,
# vhost-device-vsock and the guest kernel are installed: berth-vm beside runc), VM_RUNS (10), ...
bench: deps release
	BERTH_BIN_DIR=$(CURDIR)/target/release ./bench/run.sh

# The CRI bench (docs/bench.md): berth's CRI vs Debian's containerd 1.6 CRI plugin, same images,
# CNI config and client. Knobs: RUNS (30), ROUNDS (3), PODS (20).
bench-cri: deps release
	BERTH_BIN_DIR=$(CURDIR)/target/release ./bench/cri.sh

# CRI conformance (docs/cri.md "Conformance: critest"): critest v1.32 against this tree's berth,
# offline. Needs a critest binary (CRITEST, default /var/tmp/critest-bin/critest);
# CRITEST_ARGS passes flags, e.g. CRITEST_ARGS="--ginkgo.focus=Image"; RUNTIME=containerd runs
# the same suite against Debian's containerd 1.6.
CRITEST_ARGS ?=
critest: deps build
	./deploy/critest.sh $(CRITEST_ARGS)

clean:
	$(CARGO) clean
