# Every target creates .venv when needed and installs what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: it is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/embedpipe demo

test: $(STAMP)
	$(VENV)/bin/ruff check pipeline jobs tests bench
	$(PY) -m pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline jobs tests bench

bench: $(STAMP)
	$(PY) bench/encode.py

clean:
	rm -rf $(VENV) .pytest_cache
