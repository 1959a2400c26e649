# Two commands on a fresh machine with nothing but Python:
#   make demo   -- create .venv, install torch and lesde, run the demo
#   make test   -- same install, then the whole test suite (slow tests included, at small sizes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: an unpinned torch may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.lesde-installed
# CIFAR-10 for the tests that need it: the shared zip beside the checkout, unless set.
LESDE_CIFAR10 ?= $(wildcard $(CURDIR)/../shared/data/cifar10/cifar10-jpeg.zip)
export LESDE_CIFAR10

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip on some machines warns about every unreadable local index entry; keep the log readable
QUIET := 2>&1 | { grep -v "^WARNING: Location" || true; }

.PHONY: install demo test test-fast bench clean

$(STAMP): setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(QUIET)
	$(BIN)/python -m pip install -q -e ".[test]" $(QUIET)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/lesde demo

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2

test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
