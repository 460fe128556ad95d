# logwarden — every target installs what it needs. Two commands matter to a new user:
#   make demo    the whole pipeline on real HDFS logs with a local Kafka broker
#   make test    installs everything (venv, Kafka jars, Prometheus), starts the broker, runs pytest
# and, beside a live Hadoop: make lab (a real HDFS cluster, a workload, faults, logwarden watching)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOGWARDEN := $(VENV)/bin/logwarden
STAMP := $(VENV)/.installed
KAFKA_LIBS := .cache/kafka/libs
HADOOP_LIBS := .cache/hadoop/libs
LAB_ARGS ?=
DATA ?= ../shared/datasets
PYTEST_ARGS ?=

.PHONY: install kafka-jars kafka-up kafka-down kafka-status hadoop-jars lab-up lab-down lab prometheus compose-tools deps test test-fast demo bench clean

install: $(STAMP)
$(STAMP): pyproject.toml native/Cargo.toml native/Cargo.lock native/src/lib.rs
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# setuptools' editable install prints an informational box about folders named like the
	@# packages (they are the packages here); errors still show.
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[dev]'
	@# The compiled parse hot path (native/: Rust, PyO3, built with maturin from PyPI and crates
	@# from crates.io). Optional: without cargo the parse stage runs the pure-Python path it is
	@# tested equal to (tests/test_native.py).
	@if command -v cargo >/dev/null; then \
	  echo "install: building the compiled parse hot path (native/)"; \
	  $(PY) -m pip install -q ./native || echo "install: native/ did not build (see above): parse runs on its pure-Python path"; \
	else echo "install: no cargo here: parse runs on its pure-Python path (native/ needs Rust: https://rustup.rs)"; fi
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

# The lab's HDFS (org.apache.hadoop:hadoop-hdfs and its runtime jars, and the web UI's webapps/
# from hadoop-hdfs-<v>-tests.jar) from Maven Central into .cache/hadoop/.
hadoop-jars: $(HADOOP_LIBS)/.complete
$(HADOOP_LIBS)/.complete: hadoop/pom.xml | $(STAMP)
	@command -v mvn >/dev/null || { echo "hadoop-jars: Maven (mvn) is needed to fetch Hadoop from Maven Central: apt-get install maven"; exit 1; }
	@command -v java >/dev/null || { echo "hadoop-jars: Java 17+ is needed to run Hadoop: apt-get install openjdk-17-jre-headless"; exit 1; }
	$(LOGWARDEN) lab fetch

# A NameNode and two DataNodes as separate JVMs on free loopback ports (.run/lab/cluster.json).
lab-up: install hadoop-jars
	$(LOGWARDEN) lab up

lab-down:
	@if [ -x $(LOGWARDEN) ]; then $(LOGWARDEN) lab down; else echo "lab-down: nothing installed"; fi

# The live lab: a fresh cluster, workload, local broker, every stage, faults, a final table.
lab: deps hadoop-jars
	$(LOGWARDEN) lab live $(LAB_ARGS)

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
test: deps hadoop-jars
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Without the slow end-to-end tests.
test-fast: deps
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

demo: deps
	$(PY) -m toolkit.demo --data $(DATA)

bench: deps
	$(PY) -m bench.run --data $(DATA)

clean: kafka-down lab-down
	rm -rf .run build *.egg-info
