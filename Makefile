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

# torch as pinned in pyproject.toml, and where its CPU build comes from: PyPI's Linux wheel is
# the multi-GB CUDA build, so torch is installed first, alone: from a local wheel when pip is
# configured with one (find-links; our CI machines), else from PyTorch's CPU index.
TORCH       := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP          = $(BIN)/python -m pip install --quiet --disable-pip-version-check

# Creates the virtual environment and installs the package with its test/dev tools.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) --no-deps --no-index '$(TORCH)' 2>/dev/null \
	  || $(PIP) --no-deps --index-url $(TORCH_INDEX) '$(TORCH)' \
	  || echo "note: no CPU build of $(TORCH) found; pip installs torch from the default index"
	$(PIP) -e '.[dev]'
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

## backtest: train, evaluate and replay every dataset in ../shared/data (about 5 minutes on 2 cores;
## TRAIN_SET="KEY=VALUE ...", ARTIFACTS=DIR, REPORTS=DIR: training options and output folders)
backtest: $(STAMP)
	scripts/full_backtest.sh $(or $(DATA_ROOT),../shared/data)

## dev-broker: the embedded broker on 127.0.0.1:29092, the address .env gives `make serve`
## (BROKER_PORT=N for another; stop Docker's Kafka first, which uses the same host port)
dev-broker: $(STAMP)
	$(BIN)/stream-detector dev-broker --port $(or $(BROKER_PORT),29092)

## serve: the consumer, settings from ./.env and SD_* variables (e.g. a `make dev-broker` beside it)
serve: $(STAMP)
	$(BIN)/stream-detector serve

clean:
	rm -rf reports artifacts .pytest_cache
