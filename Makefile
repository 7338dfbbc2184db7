# Two commands from a fresh clone:  make demo  |  make test
# Every target sets itself up (virtualenv, pinned packages, datasets).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: demo test faults horovod lint format bench study bazel-test clean help

help:
	@echo "make demo   - train sync and codistillation on MNIST-1D side by side ($(WORKDIR))"
	@echo "make test   - run the whole test suite (the slow fault-injection cases excepted)"
	@echo "make faults - the fault-injection suite, slow cases included -> runs/faults/report.md"
	@echo "make bench  - benchmarks (not part of the tests)"
	@echo "make study  - every study in experiments/ (3 seeds each) -> docs/results/REPORT.md"
	@echo "make horovod - build (once, then cached) and install Horovod 0.28.1 with Gloo"
	@echo "make lint   - ruff"
	@echo "make bazel-test - the tests under Bazel 4.2.3, offline (apt-get install bazel-bootstrap bazel-rules-java)"

$(STAMP): requirements.txt requirements-dev.txt setup.py pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py --workdir=$(WORKDIR)

horovod: $(STAMP)
	tools/build_horovod.sh $(PY)

test: $(STAMP) horovod
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests -m "not slow"

# Kill, stop, fill the disk, corrupt checkpoints (tests/faults/EXPECTED.md); mounting a tmpfs needs root.
faults: $(STAMP) horovod
	$(PY) -m pytest -q tests/faults

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP) horovod
	$(PY) bench/bench_step_overhead.py
	$(PY) bench/bench_multiworker.py
	$(PY) bench/bench_weights_exchange.py
	$(PY) bench/bench_slow_network.py

study: $(STAMP)
	$(PY) -m tf_codistill.study --config=experiments --out=docs/results

bazel-test: $(STAMP) horovod
	tools/bazel_test.sh

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
