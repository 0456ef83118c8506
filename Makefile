# Every target creates .venv when needed and installs what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format browser bench clean

$(PY):
	@echo "creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: it is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	@echo "installing torch 2.13.0 (CPU build), then embedpipe with its test extra into $(VENV) (a few minutes)"
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/embedpipe demo

# The HTML report is checked in headless Chromium (Debian's package). Installed when this runs as root with
# apt-get (CI, the development machines); elsewhere that one test is skipped and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (Debian) for the HTML report test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "could not install chromium: the HTML report's browser test will be skipped"; \
	else echo "no chromium: the HTML report's browser test will be skipped"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline jobs tests bench tools
	$(VENV)/bin/ruff format --check pipeline jobs tests bench tools

format: $(STAMP)
	$(VENV)/bin/ruff format pipeline jobs tests bench tools
	$(VENV)/bin/ruff check --fix pipeline jobs tests bench tools

test: lint browser
	$(PY) -m pytest -q --durations=15

bench: $(STAMP)
	$(PY) bench/encode.py

clean:
	rm -rf $(VENV) .pytest_cache
