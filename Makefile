# Two commands on a fresh machine (each creates its own virtualenv in .venv):
#   make quickstart   set up, then run `pushpool quickstart`
#   make test         set up, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: quickstart test bench reliability postgres clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed-local: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[local]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-local

quickstart: $(VENV)/.installed-local
	$(BIN)/pushpool quickstart

# checkov, which tests/unit/test_terraform.py runs on terraform/, pins boto3,
# packaging and networkx below this project's versions: it gets its own
# virtualenv. Never fatal: without checkov that test skips and says why.
$(VENV)/tools-checkov/.installed: | $(VENV)/.installed-dev
	$(BIN)/python -m tests.unit.test_terraform install-checkov
	mkdir -p $(@D) && touch $@

# PostgreSQL server binaries for the reliability suite (a no-op when present;
# installs Debian's postgresql when missing, as root; never fatal).
postgres:
	sh tests/support/install_postgres.sh

test: $(VENV)/.installed-dev $(VENV)/tools-checkov/.installed postgres
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The reliability suite at full size (`make test` runs it reduced).
reliability: $(VENV)/.installed-dev postgres
	PUSHPOOL_RELIABILITY=full $(BIN)/python -m pytest tests/reliability $(PYTEST_ARGS)

# Every benchmark at full size (the ECS worker they compare with gets its own
# virtualenv, .venv/bench-worker), then bench/results.png.
bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
