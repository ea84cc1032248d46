# The two quick-start commands (see README): `make demo` and `make test`. Both set everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint blas clean airflow s3a kafka

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[spark,dev]"
	touch $(STAMP)

# Delta jars fetched with Maven once (Ivy cannot resolve Spark's transitive jars on some networks).
.jars/.done: $(STAMP)
	$(BIN)/python -m pipelines.core.jars .jars
	touch .jars/.done

# The S3A connector (hadoop-aws + AWS SDK bundle, ~650 MB once) for s3a:// roots; the tests use it against moto.
.jars/.s3a: .jars/.done
	$(BIN)/python -m pipelines.core.jars .jars --s3a
	touch .jars/.s3a

s3a: .jars/.s3a

# Spark's Kafka source (stream.source: kafka) and an Apache Kafka broker for the tests (~45 MB once).
.jars/.kafka: .jars/.done
	$(BIN)/python -m pipelines.core.jars .jars --kafka --kafka-broker
	touch .jars/.kafka

kafka: .jars/.kafka

# Native BLAS for MLlib ALS (about 5x faster iterations); best effort: needs root on Debian/Ubuntu.
blas:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libopenblas; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread liblapack3 >/dev/null) \
	  || echo "note: could not install native BLAS; MLlib will use its pure-JVM BLAS"; fi

setup: $(STAMP) .jars/.done blas

# Airflow 3 in its own venv: its Spark provider pulls in pyspark-client, which would replace .venv's real pyspark.
# Its SparkSubmitOperator runs .venv's spark-submit (see README, "Airflow").
AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
$(AIRFLOW_STAMP):
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install -q "apache-airflow==3.3.2" "apache-airflow-providers-apache-spark==6.3.4"
	touch $(AIRFLOW_STAMP)

airflow: $(AIRFLOW_STAMP)

demo: setup
	$(BIN)/shelf run --conf conf/local.yaml

# Two pytest workers, one test file each at a time (--dist loadfile: a file's session fixtures are built once):
# Spark tests on small data wait on the driver more than they compute, so two use 2 cores better than one.
# --no-loadscope-reorder keeps tests/conftest.py's order: the slowest files first.
test: setup airflow s3a kafka
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The inner loop: unit tests, kernels, config, the layer and size rules, small Spark checks (no whole steps, no
# end-to-end runs, no servers, no Airflow or S3A set-up). docs/DEVELOPMENT.md has the measured time.
test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow and not servers and not steps"

lint: setup
	$(BIN)/ruff check pipelines udfs tests

clean:
	rm -rf .data spark-warehouse
