# dprdm: `make test` and `make demo` are the only two commands a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.installed-dev-stamp
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# Where the default index serves a CUDA build, CPU-only users pick the wheel source, e.g.
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_SOURCE := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

.PHONY: test demo install install-dev clean

install: $(STAMP)
install-dev: $(DEV_STAMP)

# `make demo` needs the runtime only; `make test` adds the dev extras (pytest, playwright, ...).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_SOURCE)
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

# The service's browser test drives Debian's chromium (playwright never downloads a browser).
# Where chromium is absent and apt-get cannot install it, that one test is skipped with the reason.
test: $(DEV_STAMP)
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
	    echo "note: chromium is not installed and apt-get could not install it: the browser test is skipped"
	@command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends postgresql >/dev/null) || \
	    echo "note: PostgreSQL is not installed and apt-get could not install it: the PostgreSQL ledger tests are skipped"
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/python -m dprdm.demo

clean:
	rm -rf $(VENV) .pytest_cache
