# The README's commands. Both set-up targets create the virtualenv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint bench apache-kafka clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## run the engine on the embedded broker and play a generated shop
	$(BIN)/audiences demo

test: $(STAMP)  ## lint, type-check and run every test (embedded broker unless one is given)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

apache-kafka: $(STAMP)  ## check Java >= 17 and fetch Apache Kafka's jars with Maven (once; cached)
	$(BIN)/python -m audiences.adapters.kafka.apache

bench: $(STAMP)  ## this engine vs Quix Streams, Faust + Table and a plain loop, same run
	$(BIN)/audiences bench

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis .mypy_cache .ruff_cache
