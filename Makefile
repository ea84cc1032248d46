# The two quick-start commands (see README): `make demo` and `make test`. Both set everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint blas clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Delta jars fetched with Maven once (Ivy cannot resolve Spark's transitive jars on some networks).
.jars/.done: $(STAMP)
	$(BIN)/python -m pipelines.core.jars .jars
	touch .jars/.done

# Native BLAS for MLlib ALS (about 5x faster iterations); best effort: needs root on Debian/Ubuntu.
blas:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libopenblas; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread liblapack3 >/dev/null) \
	  || echo "note: could not install native BLAS; MLlib will use its pure-JVM BLAS"; fi

setup: $(STAMP) .jars/.done blas

demo: setup
	$(BIN)/shelf run --conf conf/local.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check pipelines udfs tests

clean:
	rm -rf .data spark-warehouse
