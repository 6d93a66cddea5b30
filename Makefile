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

test: deps lint
	$(PY) -m pytest tests -q -p no:cacheprovider

demo: deps
	$(PY) -m meshctl.lab.demo

bench: deps
	$(PY) -m bench.run

clean:
	-$(PY) -m meshctl.cli lab down --all
	rm -rf build dist *.egg-info
