# Quorum: secure federated pre-training of LLMs.
#   make demo    a whole federation on loopback (PKI, signed release, aggregator, 3 sites)
#   make test    unit, property and end-to-end tests
#   make bench   benchmarks; results in bench-out/ and summarised in the README
# LibTorch comes from the PyPI torch wheel installed into .venv (tch 0.26 needs torch 2.13.0).

SHELL := /bin/bash
VENV := .venv
TORCH_VERSION := 2.13.0
TORCH_MARKER := $(VENV)/.torch-$(TORCH_VERSION)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
# tch cannot switch TF32 on by itself; allow it for CUDA matmuls.
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE := 1

.PHONY: all venv build demo test bench release lint fmt clean-demo fuzz

all: build

$(TORCH_MARKER):
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "error: python3 >= 3.10 is needed (found $$(python3 --version 2>&1))"; exit 1; }
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==$(TORCH_VERSION) numpy cryptography
	touch $@

# .cargo/config.toml points LIBTORCH at .venv/torch, whatever python3's version (and so the
# site-packages path) is.
$(VENV)/torch: $(TORCH_MARKER)
	ln -sfn "$$($(VENV)/bin/python -c 'import os, torch; \
		print(os.path.relpath(os.path.dirname(torch.__file__), os.path.abspath("$(VENV)")))')" $@

# The client links LibTorch's CPU library only, so that a CPU bundle carries no CUDA libraries;
# it loads libtorch_cuda.so when it starts on a GPU (client/src/cuda.rs). The linker sees
# .venv/libtorch-link/lib: libtorch_cpu and c10, with libtorch.so a linker script naming
# libtorch_cpu (the real one would pull in libtorch_cuda).
LINK_LIB := $(VENV)/libtorch-link/lib
$(LINK_LIB)/libtorch.so: $(TORCH_MARKER) | $(VENV)/torch
	mkdir -p $(LINK_LIB)
	for lib in libtorch_cpu.so libc10.so; do ln -sfn ../../torch/lib/$$lib $(LINK_LIB)/$$lib; done
	echo 'INPUT(libtorch_cpu.so)' > $@

venv: $(VENV)/torch $(LINK_LIB)/libtorch.so

build: venv
	cargo build --release --bins

# Release bundles of the client and the aggregator in dist/, signed with a development release
# key (target/dev-release.key; a real release uses the federation's key): bin/, the libraries
# they load in lib/, and a manifest of every file's SHA-256. RELEASE_KEY=... signs with another.
RELEASE_KEY ?= target/dev-release.key
release: build
	@test -f $(RELEASE_KEY) || target/release/quorum-aggregator release keygen --out $(RELEASE_KEY)
	@version=$$(target/release/quorum-client --version | awk '{print $$2}'); \
	commit=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown); \
	for bin in quorum-client quorum-aggregator; do \
		target/release/quorum-aggregator release bundle --binary target/release/$$bin \
			--version $$version --commit $$commit --key $(RELEASE_KEY) --out dist || exit 1; \
		target/release/quorum-aggregator release verify dist/$$bin-$$version-$$(uname -m)-linux.tar.gz \
			--trusted-key $$(cat $(RELEASE_KEY).pub) || exit 1; \
	done

demo: build
	BIN=target/release scripts/demo.sh

test: venv
	cargo build --bins
	cargo test --workspace --no-fail-fast

bench: build
	scripts/bench.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean-demo:
	rm -rf demo-out bench-out

fuzz:
	scripts/fuzz.sh $${FUZZ_SECONDS:-60}
