# Two commands from a fresh clone:  make demo  |  make test
# Every target sets itself up (virtualenv, pinned packages, datasets).

# Python: 3.11, 3.12 and 3.13 (docs/python_versions.md). By default the newest of them found, looking
# on PATH (python3.13, python3.12, python3.11, python3) and in pyenv's installed versions; each candidate
# is run, so a pyenv shim that refuses is skipped. Override with PYTHON=3.12 (that version, searched the
# same way) or PYTHON=/path/to/python. An existing $(VENV) keeps the Python it was made with; a PYTHON of
# another version is refused (make clean, or VENV=.venv-3.12 for a second one) rather than mixed.
SUPPORTED_PYTHONS := 3.13 3.12 3.11
PYTHON  ?=
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
WORKDIR ?= runs/demo
DEMO_ARGS ?=

.PHONY: demo test faults horovod lint format bench study study-large study-shakespeare study-scale-out study-report bazel-test clean help venv pythons

# The one place that knows which interpreters exist and which can work (bash; run by `venv`/`pythons`).
define SELECT_PYTHON
set -u
why_not() {  # one line: why Python $1 cannot run this project
    case "$1" in
        2.*|3.[0-9]|3.10) echo "TensorFlow 2.21.0 publishes wheels for CPython 3.11-3.13 only (2.20 was the last for 3.10), and tf_codistill.study needs tomllib (3.11+)" ;;
        *) echo "TensorFlow 2.21.0 publishes wheels for CPython 3.11-3.13 only (none for $1 yet)" ;;
    esac
}
supported() { case " $SUPPORTED " in *" $1 "*) return 0 ;; esac; return 1; }
probe() {  # prints "X.Y /abs/interpreter" if $1 runs
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2], sys.executable)' 2>/dev/null | tail -n 1
}
candidates() {
    for v in $SUPPORTED; do echo "python$v"; done
    echo python3
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root 2>/dev/null)" || root=
        if [ -n "$root" ]; then
            for v in $SUPPORTED; do ls -d "$root"/versions/$v.*/bin/python$v 2>/dev/null | sort -V -r; done
        fi
    fi
}
find_python() {  # $1: a version, or empty for the newest supported. Prints "X.Y /abs/python".
    best=; bestv=; seen=
    for c in $(candidates); do
        out="$(probe "$c")" || continue
        v="${out%% *}"; p="${out#* }"
        [ -n "$v" ] && [ -n "$p" ] || continue
        supported "$v" || { seen="$seen $c=$v"; continue; }
        [ -z "$1" ] || [ "$v" = "$1" ] || continue
        if [ -z "$best" ] || [ "${v#3.}" -gt "${bestv#3.}" ]; then best="$p"; bestv="$v"; fi
    done
    [ -n "$best" ] && { echo "$bestv $best"; return 0; }
    if [ -n "$1" ]; then
        echo "error: no Python $1 found (looked for python$1 on PATH and in pyenv's versions); install it or pass PYTHON=/path/to/python$1" >&2
    else
        echo "error: no Python 3.11, 3.12 or 3.13 found on PATH or in pyenv's versions${seen:+ (found:$seen; $(why_not "${seen##*=}"))}; install one or pass PYTHON=/path/to/python3.X" >&2
    fi
    return 1
}
resolve_python() {  # PYTHON as given -> "X.Y /abs/python", or a one-line error
    case "$PYTHON" in
        "") find_python "" ;;
        [0-9].[0-9]|[0-9].[0-9][0-9])
            supported "$PYTHON" || { echo "error: Python $PYTHON is not supported: $(why_not "$PYTHON"); use 3.11, 3.12 or 3.13" >&2; return 1; }
            find_python "$PYTHON" ;;
        *)
            out="$(probe "$PYTHON")"
            [ -n "$out" ] || { echo "error: PYTHON=$PYTHON does not run (not found, or a pyenv shim for a version not selected); pass a working interpreter" >&2; return 1; }
            v="${out%% *}"
            supported "$v" || { echo "error: PYTHON=$PYTHON is Python $v, which is not supported: $(why_not "$v"); use 3.11, 3.12 or 3.13" >&2; return 1; }
            echo "$out" ;;
    esac
}
case "$MODE" in
    list)
        for c in $(candidates); do
            out="$(probe "$c")"
            if [ -z "$out" ]; then echo "  $c: does not run"; continue; fi
            v="${out%% *}"
            if supported "$v"; then echo "  $c: Python $v (${out#* })"; else echo "  $c: Python $v, not supported: $(why_not "$v")"; fi
        done
        out="$(resolve_python)" && echo "make would use: Python ${out%% *} (${out#* })" ;;
    venv)
        if [ -x "$VENV/bin/python" ]; then
            out="$(probe "$VENV/bin/python")"
            [ -n "$out" ] || { echo "error: $VENV exists but $VENV/bin/python does not run (its interpreter was removed?); make clean (or rm -rf $VENV) and rerun" >&2; exit 1; }
            vv="${out%% *}"
            supported "$vv" || { echo "error: $VENV was made with Python $vv, which is not supported: $(why_not "$vv"); make clean and rerun" >&2; exit 1; }
            if [ -n "$PYTHON" ]; then
                want="$(resolve_python)" || exit 1
                [ "${want%% *}" = "$vv" ] || { echo "error: $VENV was made with Python $vv but PYTHON=$PYTHON is Python ${want%% *}; not mixing them: make clean (or pass VENV=.venv-${want%% *}) and rerun" >&2; exit 1; }
            fi
            exit 0
        fi
        out="$(resolve_python)" || exit 1
        echo "creating $VENV with Python ${out%% *} (${out#* })"
        "${out#* }" -m venv "$VENV" ;;
esac
endef
SELECT_PYTHON_SH := $(value SELECT_PYTHON)
export SELECT_PYTHON_SH
RUN_SELECT = MODE=$(1) PYTHON='$(PYTHON)' VENV='$(VENV)' SUPPORTED='$(SUPPORTED_PYTHONS)' bash -c "$$SELECT_PYTHON_SH"

help:
	@echo "make demo   - train sync and codistillation on MNIST-1D side by side ($(WORKDIR))"
	@echo "make test   - run the whole test suite (the slow fault-injection cases excepted)"
	@echo "make faults - the fault-injection suite, slow cases included -> runs/faults/report.md"
	@echo "make bench  - benchmarks (not part of the tests)"
	@echo "make study  - every study in experiments/ (5 seeds, converged lengths, ~1.5-2.3 h on 2 cores) -> docs/results/REPORT.md"
	@echo "make study-large - the large-batch study (experiments/large) -> docs/results/large/REPORT.md"
	@echo "make study-shakespeare - the Transformer study on tiny_shakespeare (experiments/shakespeare) -> docs/results/shakespeare/REPORT.md"
	@echo "make study-scale-out - the scale-out decision on fresh MNIST-1D: sync's critical batch, then add a group or double the batch (experiments/scale_out) -> docs/results/scale_out/"
	@echo "make study-report - rebuild every REPORT.md and plot from the committed CSVs, large batch included (no training)"
	@echo "make horovod - build (once, then cached) and install Horovod 0.28.1 with Gloo"
	@echo "make lint   - ruff"
	@echo "make pythons - the Python interpreters found, and the one a new $(VENV) gets"
	@echo "  variables: PYTHON=3.12 or /path/to/python (default: newest of $(SUPPORTED_PYTHONS) found),"
	@echo "             VENV=.venv-3.12 (default .venv), DEMO_ARGS='--steps=50' (extra train.py flags for demo)"
	@echo "make bazel-test - the tests under Bazel 4.2.3, offline (apt-get install bazel-bootstrap bazel-rules-java)"

# Runs on every target that uses $(VENV) (order-only: it does not force a reinstall): creates the venv
# with the chosen Python, or checks that an existing one matches PYTHON.
venv:
	@$(call RUN_SELECT,venv)

pythons:
	@$(call RUN_SELECT,list)

$(STAMP): requirements.txt requirements-dev.txt setup.py pyproject.toml | venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py --workdir=$(WORKDIR) $(DEMO_ARGS)

horovod: $(STAMP)
	tools/build_horovod.sh $(PY)

# Two pytest-xdist workers, one test file each at a time (--dist loadfile keeps a file's tests, and any
# state they share, in one worker): on 2 cores the suite took 24.6 min serially and 18.8 min this way.
TEST_WORKERS ?= 2
test: $(STAMP) horovod
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=20

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
	$(PY) -m tf_codistill.study --config=experiments --out=docs/results --parallel=2

study-large: $(STAMP)
	$(PY) -m tf_codistill.study --config=experiments/large --out=docs/results/large --parallel=2

study-shakespeare: $(STAMP)
	$(PY) -m tf_codistill.study --config=experiments/shakespeare --out=docs/results/shakespeare --parallel=2

# The scale-out decision on fresh MNIST-1D: stage 1 (sync's critical batch), then stage 2a (the
# burn-in) and 2b (the decision), whose batches and rates are stage 1's choices; file-name order.
study-scale-out: $(STAMP)
	$(PY) -m tf_codistill.study --config=experiments/scale_out --out=docs/results/scale_out --parallel=2

study-report: $(STAMP)
	$(PY) -m tf_codistill.study --config=experiments --out=docs/results --report_only
	$(PY) -m tf_codistill.study --config=experiments/large --out=docs/results/large --report_only
	$(PY) -m tf_codistill.study --config=experiments/scale_out/probe --out=docs/results/scale_out/probe --report_only
	$(PY) -m tf_codistill.study --config=experiments/scale_out --out=docs/results/scale_out --report_only
	$(PY) -m tf_codistill.study --config=experiments/shakespeare --out=docs/results/shakespeare --report_only

bazel-test: $(STAMP) horovod
	tools/bazel_test.sh

clean:
	rm -rf $(VENV) .venv-ci-* runs build *.egg-info .pytest_cache
