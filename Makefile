# meshctl — the two front-door commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: deps test unit lint demo bench clean

deps:
	@bash scripts/deps.sh

lint: deps
	$(VENV)/bin/ruff check meshctl tests bench
	$(VENV)/bin/mypy

unit: deps
	$(PY) -m pytest tests/unit -q

# MESHCTL_REQUIRE_ALL=1: a test that cannot run here (not root, a program missing)
# fails instead of being skipped, so the suite cannot pass with parts of it unrun.
test: deps lint
	MESHCTL_REQUIRE_ALL=1 $(PY) -m pytest tests -q -p no:cacheprovider

demo: deps
	$(PY) -m meshctl.lab.demo

bench: deps
	$(PY) -m bench.run

clean:
	-$(PY) -m meshctl.cli lab down --all
	rm -rf build dist *.egg-info
