# adaptserve: `make serve` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export ADAPTSERVE_HOME ?= $(CURDIR)/.adaptserve

.PHONY: serve test lint install model compare clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

model: install
	$(BIN)/adaptserve pretrain

serve: model
	$(BIN)/adaptserve serve

test: install
	@.ci/system-deps || echo "warning: could not install chromium/prometheus: the browser and scrape tests will skip"
	$(BIN)/ruff check models pipelines monitoring service benchmarks tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

compare: model
	$(BIN)/adaptserve compare

clean:
	rm -rf $(VENV) .adaptserve .pytest_cache
