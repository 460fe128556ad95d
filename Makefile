# logwarden — every target installs what it needs. Two commands matter to a new user:
#   make demo    the whole pipeline on real HDFS logs with a local Kafka broker
#   make test    installs everything (venv, Kafka jars, Prometheus), starts the broker, runs pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOGWARDEN := $(VENV)/bin/logwarden
STAMP := $(VENV)/.installed
KAFKA_LIBS := .cache/kafka/libs
DATA ?= ../shared/datasets
PYTEST_ARGS ?=

.PHONY: install kafka-jars kafka-up kafka-down kafka-status prometheus compose-tools deps test test-fast demo bench clean

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import confluent_kafka, torch, drain3, gensim, pydantic, pydantic_settings, prometheus_client, docker, safetensors"
	touch $(STAMP)

# The Kafka broker's jars, from Maven Central (no Docker engine, no Apache download site here).
kafka-jars: $(KAFKA_LIBS)/.complete
$(KAFKA_LIBS)/.complete: kafka/pom.xml
	@command -v mvn >/dev/null || { echo "kafka-jars: Maven (mvn) is needed to fetch the broker from Maven Central: apt-get install maven"; exit 1; }
	@command -v java >/dev/null || { echo "kafka-jars: Java 17+ is needed to run the broker: apt-get install openjdk-17-jre-headless"; exit 1; }
	@# Fetched beside the old jars, then swapped in: a running broker keeps its classpath until the
	@# last moment, and a failed fetch leaves the old jars as they were.
	rm -rf $(KAFKA_LIBS).new
	mvn -q -B -f kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=$(abspath $(KAFKA_LIBS)).new || { \
	  echo "kafka-jars: Maven could not fetch org.apache.kafka:kafka_2.13 from Maven Central (see the error above; network or proxy?)"; exit 1; }
	rm -rf $(KAFKA_LIBS) && mv $(KAFKA_LIBS).new $(KAFKA_LIBS)
	touch $@

kafka-up: install kafka-jars
	$(LOGWARDEN) kafka up

kafka-down:
	@if [ -x $(LOGWARDEN) ]; then $(LOGWARDEN) kafka down; else echo "kafka-down: nothing installed"; fi

kafka-status:
	@$(LOGWARDEN) kafka status

# Prometheus from Debian's package (tests start their own instance on a free loopback port).
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus >/dev/null; }
	@prometheus --version 2>&1 | head -n 1

# docker-compose from Debian's package: tests validate docker-compose.yml with it (no engine needed).
compose-tools:
	@command -v docker-compose >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq docker-compose >/dev/null; }
	@docker-compose version --short

deps: install kafka-jars prometheus compose-tools

# Unit tests, end-to-end tests through the real broker, and the Prometheus tests.
test: deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Without the slow end-to-end tests.
test-fast: deps
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

demo: deps
	$(PY) -m toolkit.demo --data $(DATA)

bench: deps
	$(PY) -m bench.run --data $(DATA)

clean: kafka-down
	rm -rf .run build *.egg-info
