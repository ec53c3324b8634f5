# The README's two commands are `make demo` and `make test`; everything else is optional.
#
#   make demo                                   # synthetic default, no data needed
#   make demo DATASET=smd DATA_DIR=../shared/data/smd ENTITIES=machine-1-1,machine-2-1
#   make test                                   # the whole suite (what CI runs)

PYTHON   ?= $(shell command -v python3.11 || command -v python3)
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DATASET  ?= synthetic
DATA_DIR ?=
ENTITIES ?=
DEMO_ARGS = --dataset $(DATASET) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
            $(if $(ENTITIES),--entities $(ENTITIES)) --out reports/demo-$(DATASET)

.PHONY: install demo test lint bench backtest dev-broker serve clean

# Creates the virtual environment and installs the package with its test/dev tools.
# torch is pinned (pyproject.toml) to the CPU build; see README "Installing".
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

## demo: broker + train + evaluate + serve + replay + report, on the synthetic default
demo: $(STAMP)
	$(BIN)/stream-detector demo $(DEMO_ARGS)

## test: the whole suite, including the integration tests against the embedded broker
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check stream_detector tests
	$(BIN)/mypy stream_detector

bench: $(STAMP)
	$(BIN)/stream-detector bench

## backtest: train, evaluate and replay every dataset in ../shared/data (about an hour)
backtest: $(STAMP)
	scripts/full_backtest.sh $(or $(DATA_ROOT),../shared/data)

dev-broker: $(STAMP)
	$(BIN)/stream-detector dev-broker

clean:
	rm -rf reports artifacts .pytest_cache
