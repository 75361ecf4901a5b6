# rustadam — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Reinstalled when the requirements change; reused otherwise.
DEPS := $(VENV)/.deps-installed
# The extension is rebuilt when a Rust or packaging file changes; the Python sources are
# installed editable, so they need no rebuild.
BUILT := $(VENV)/.rustadam-built
SOURCES := $(shell find crates -type f \( -name '*.rs' -o -name '*.toml' \) 2>/dev/null) Cargo.toml Cargo.lock pyproject.toml

.PHONY: help venv build demo test test-rust test-python lint fmt bench bench-cuda bench-release figures clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

venv: $(DEPS) ## Create or update the virtual environment (.venv) with torch and the dev tools

$(BUILT): $(DEPS) $(SOURCES)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release --quiet
	touch $@

build: $(BUILT) ## Build the extension in release mode into .venv

demo: $(BUILT) ## Train an MLP on scikit-learn's digits with rustadam and torch.optim.Adam side by side
	$(PY) -m rustadam.demo

test: test-rust test-python ## Run every test: cargo test, then pytest

test-rust: ## Rust unit, integration and doc tests (the serde feature included)
	cargo test --workspace --all-features --release

test-python: $(BUILT) ## pytest against the float64 oracle and torch.optim
	$(PY) -m pytest

lint: $(DEPS) ## cargo fmt --check, clippy -D warnings, rustdoc -D warnings, ruff check and format --check
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p rustadam --all-features
	$(VENV)/bin/ruff check python tests examples
	$(VENV)/bin/ruff format --check python tests examples

fmt: $(DEPS) ## Format Rust and Python sources
	cargo fmt --all
	$(VENV)/bin/ruff format python tests examples
	$(VENV)/bin/ruff check --fix python tests examples

bench: $(BUILT) ## Step time of rustadam against torch.optim.Adam (fused, foreach, for-loop)
	$(PY) -m rustadam.bench

bench-cuda: $(BUILT) ## On a CUDA GPU: the Triton and foreach paths against torch fused/foreach/for-loop
	$(PY) -m rustadam.bench --device cuda

bench-release: $(BUILT) ## Peak memory and step time of gradient_release=True against the usual loop
	$(PY) -m rustadam.bench --gradient-release

figures: $(BUILT) ## Regenerate the README's figures in docs/ with the demo and the benchmark
	$(PY) -m rustadam.demo --out docs
	$(PY) -m rustadam.bench --out docs --steps 45

clean: ## Remove build outputs (keeps .venv)
	cargo clean
	rm -f $(BUILT)
