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

venv: $(VENV)/torch

build: venv
	cargo build --release --bins

# Builds the client and signs it with a development release key (target/dev-release.key).
release: build
	@test -f target/dev-release.key || target/release/quorum-aggregator release keygen --out target/dev-release.key
	target/release/quorum-aggregator release sign --binary target/release/quorum-client \
		--version $$(target/release/quorum-client --version | awk '{print $$2}') \
		--commit $$(git rev-parse --short HEAD 2>/dev/null || echo unknown) --key target/dev-release.key

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
