# The README's commands. Both set-up targets create the virtualenv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The compiled core (mypyc, see setup.py): built in place next to the sources, rebuilt when
# one of them changes. Its build record says what was compiled (or why not).
CORE_SRC    := $(shell find src/audiences/core -name '*.py') src/audiences/_core_build.py \
               $(addprefix src/audiences/,$(shell sed -n 's/^    "\(adapters\/.*\.py\)",$$/\1/p' src/audiences/_core_build.py))
CORE_RECORD := src/audiences/core/_build.json
# `make test`: 1 = the compiled core must be active; auto = must be when the build found a
# C compiler, Python headers and mypyc (else the run says it is pure and why).
AUDIENCES_EXPECT_COMPILED_CORE ?= auto

.PHONY: demo test lint bench core apache-kafka clean chromium
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1  # Playwright drives the system chromium, never its own

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools
	AUDIENCES_PURE_BUILD=1 $(BIN)/python -m pip install --quiet -e '.[test]'  # `core` compiles, visibly
	touch $(STAMP)

core: $(CORE_RECORD)  ## (re)build the compiled core in place when a core source changed
$(CORE_RECORD): $(CORE_SRC) setup.py | $(STAMP)
	@echo "compiling audiences.core with mypyc when a C compiler is here (a few minutes)"
	$(BIN)/python setup.py --quiet build_ext --inplace
	@touch $(CORE_RECORD)
	@$(BIN)/audiences --version

demo: core  ## run the engine on the embedded broker and play a generated shop
	$(BIN)/audiences demo

# Kafka-level tests whose code paths differ on the embedded broker (Tansu quirks, `make
# demo`'s broker): run there again when the whole suite ran on Apache Kafka.
EMBEDDED_SMOKE := tests/component/test_embedded_broker.py tests/component/test_evaluator_kafka.py \
	tests/component/test_state_protocol_kafka.py tests/component/test_collector.py \
	tests/system/test_worker_crash.py

test: core chromium  ## lint, type-check, every test on the compiled core (Kafka: Apache Kafka when Java 17 and Maven are here), a smoke subset on the embedded broker, the unit tests on the pure core
	$(BIN)/ruff check src tests setup.py
	$(BIN)/mypy
	AUDIENCES_EXPECT_COMPILED_CORE=$(AUDIENCES_EXPECT_COMPILED_CORE) $(BIN)/python -m pytest
	AUDIENCES_TEST_BROKER=embedded AUDIENCES_EXPECT_COMPILED_CORE=$(AUDIENCES_EXPECT_COMPILED_CORE) \
		$(BIN)/python -m pytest $(EMBEDDED_SMOKE)
	AUDIENCES_PURE_CORE=1 AUDIENCES_EXPECT_COMPILED_CORE=0 $(BIN)/python -m pytest tests/unit

chromium:  ## Debian's chromium for the console's browser tests (installed when missing and root; else they skip)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq chromium; } || \
		echo "no chromium (apt-get install chromium): the console's browser tests will be skipped"

lint: $(STAMP)
	$(BIN)/ruff check src tests setup.py
	$(BIN)/ruff format --check src tests setup.py
	$(BIN)/mypy

apache-kafka: $(STAMP)  ## check Java >= 17 and fetch Apache Kafka's jars with Maven (once; cached)
	$(BIN)/python -m audiences.adapters.kafka.apache

bench: core  ## this engine vs Quix Streams, Faust + Table and a plain loop, same run
	$(BIN)/audiences bench

clean:
	rm -rf $(VENV) data build .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find src/audiences/core src/audiences/adapters \( -name '*.so' -o -name '*.pyd' -o -name '_build.json' \) -delete
