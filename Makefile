# Every target sets itself up on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/logonet demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q Testing

bench-quick: $(STAMP)
	$(VENV)/bin/logonet bench speed --quick --out out/bench

clean:
	rm -rf $(VENV) out .pytest_cache
