# Two commands for a new user: `make demo` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dynavit-installed
TORCH_VERSION ?= 2.13.0
ASSETS ?= $(abspath ../shared/assets)
# Test files run in this many processes (one file's tests stay together, sharing its fixtures).
TEST_WORKERS ?= 2

.PHONY: demo test browser lint bench clean

# torch first, pinned, so resolving the rest never pulls a different (multi-GB CUDA) build;
# where 2.13.0 has no wheel for this platform, take whatever torch pip finds.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "dynavit needs Python >= 3.11"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	DYNAVIT_ASSETS=$${DYNAVIT_ASSETS:-$(ASSETS)} $(VENV)/bin/dynavit demo --out out

# The report test renders the HTML in headless Chromium. Under CI (as root, with Debian's
# packages reachable) a missing Chromium is installed; elsewhere the test says what to install.
browser:
	@command -v chromium >/dev/null || [ -z "$${CI:-}" ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  { echo "installing chromium for the report test"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 DYNAVIT_ASSETS=$${DYNAVIT_ASSETS:-$(ASSETS)} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	DYNAVIT_ASSETS=$${DYNAVIT_ASSETS:-$(ASSETS)} $(PY) benchmarks/profile_classes.py

clean:
	rm -rf $(VENV) out .pytest_cache
