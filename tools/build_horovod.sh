#!/usr/bin/env bash
# Build (or reuse a cached build of) Horovod 0.28.1 for the TensorFlow in a
# virtualenv, with Gloo as the CPU controller (no MPI, no PyTorch, no MXNet).
#
# Usage: tools/build_horovod.sh [PYTHON]
#   PYTHON   interpreter of the target environment (default: .venv/bin/python,
#            relative to the repository root).
#
# Steps (idempotent, safe to rerun):
#   1. Fast path: horovod 0.28.1 already imports, was built against the
#      installed TensorFlow, and hvd.init() works -> exit 0.
#   2. Cached wheel for this Python, TF version and build revision in
#      ${TF_CODISTILL_CACHE:-$HOME/.cache/tf_codistill}/wheels/<cpXY>-tf-<version>-r<N>/
#      (e.g. cp312-tf-2.21.0-r2) -> pip install --no-deps it, verify, exit.
#      BUILD_REVISION names the set of source fixes; raising it makes every
#      cache and every installed build older than it rebuild.
#   3. Otherwise build from the PyPI sdist (about 3-8 min on 2 cores), with the
#      source fixes below ("Source fix"), store the wheel in the cache atomically,
#      install it, verify.
#
# Python 3.11, 3.12 and 3.13 are supported (docs/python_versions.md); the same
# fixes apply to all three.
#
# Environment: TF_CODISTILL_CACHE (cache root), MAKEFLAGS (default -j$(nproc)).
set -euo pipefail

HOROVOD_VERSION=0.28.1
# The source fixes below, as one number. r1: fixes 1-3; r2: + fix 4 (process-set
# Gloo contexts bind to HOROVOD_GLOO_IFACE). Raise it whenever a fix changes.
BUILD_REVISION=2

usage() {
    echo "Usage: $0 [PYTHON]   (build/install horovod ${HOROVOD_VERSION} with Gloo for PYTHON's TensorFlow; default PYTHON: .venv/bin/python)"
}

log() { echo "[build_horovod] $*"; }
die() { echo "[build_horovod] ERROR: $*" >&2; exit 1; }

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; exit 2 ;;
esac
[ $# -le 1 ] || { usage >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Resolve PYTHON to an absolute path *without* following symlinks (a venv's
# python is a symlink to the system interpreter; following it leaves the venv).
# An explicit argument is taken relative to the caller's directory, the default
# relative to the repository root.
if [ $# -eq 1 ]; then
    PY_ARG="$1"
    if [[ "$PY_ARG" != */* ]]; then
        PY_ARG="$(command -v "$PY_ARG")" || die "python '$1' not found on PATH"
    fi
else
    PY_ARG="$ROOT/.venv/bin/python"
fi
[ -x "$PY_ARG" ] || die "python interpreter '$PY_ARG' not found or not executable (create the venv first)"
PY="$(cd "$(dirname "$PY_ARG")" && pwd)/$(basename "$PY_ARG")"
PY_BIN_DIR="$(dirname "$PY")"
cd "$ROOT"

# Quieter TF during our own checks only.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

CACHE_ROOT="${TF_CODISTILL_CACHE:-$HOME/.cache/tf_codistill}"

# ---------------------------------------------------------------------------
# 1. Fast path: already installed and working for the current TensorFlow.
#    horovod/metadata.json records the TF version it was compiled against; a
#    mismatch (TF upgraded since) falls through to the cache/build.
# ---------------------------------------------------------------------------
installed_ok() {
    "$PY" - "$HOROVOD_VERSION" "$BUILD_REVISION" >/dev/null 2>&1 <<'EOF'
import json, os, sys
import horovod
assert horovod.__version__ == sys.argv[1], horovod.__version__
import tensorflow as tf
meta = os.path.join(os.path.dirname(horovod.__file__), "metadata.json")
with open(meta) as f:
    assert json.load(f).get("tensorflow") == tf.__version__
from horovod import tf_codistill_build  # written into the source by this script
assert tf_codistill_build.REVISION == int(sys.argv[2])
import horovod.tensorflow as hvd
hvd.init()
EOF
}

if installed_ok; then
    log "horovod ${HOROVOD_VERSION} (build r$BUILD_REVISION) already installed and working for $PY; nothing to do."
    exit 0
fi

TF_VERSION="$("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)" \
    || die "cannot import tensorflow with $PY; install the project requirements first"
PY_TAG="$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
# One directory per (Python, TF, build revision): a wheel built for cp311 is
# never offered to a cp312 venv, and a TF upgrade or a new source fix means a
# new directory, hence a rebuild. (Directories of older revisions are left alone.)
WHEEL_DIR="$CACHE_ROOT/wheels/$PY_TAG-tf-$TF_VERSION-r$BUILD_REVISION"
mkdir -p "$WHEEL_DIR"
BUILD_LOG="$CACHE_ROOT/build-$(date +%Y%m%d-%H%M%S).log"
LOG_HINT=""   # set once a build has written $BUILD_LOG

# Serialise concurrent runs sharing one cache (builds take minutes).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_ROOT/.build_horovod.lock"
    flock 9
fi

find_cached_wheel() {
    local w
    for w in "$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-"$PY_TAG"-*.whl; do
        [ -f "$w" ] && { echo "$w"; return 0; }
    done
    return 1
}

ensure_py_pkgs() {  # ensure_py_pkgs "import names" pip-name...
    local imports="$1"; shift
    if ! "$PY" -c "import $imports" >/dev/null 2>&1; then
        log "pip installing $*"
        "$PY" -m pip install --quiet "$@" || die "pip install $* failed"
    fi
}

# Horovod's runtime requirements (install_requires, minus py<3.7 dataclasses).
ensure_runtime_deps() {
    ensure_py_pkgs "cloudpickle, psutil, yaml, packaging" cloudpickle psutil pyyaml packaging
}

verify() {
    local out
    log "verifying: import horovod.tensorflow; hvd.init()"
    out="$("$PY" -c 'import horovod.tensorflow as hvd; hvd.init(); print(hvd.size())' 2>&1)" || {
        echo "$out" | tail -20 >&2
        die "'import horovod.tensorflow as hvd; hvd.init()' failed with $PY (wheel dir: $WHEEL_DIR).$LOG_HINT"
    }
    log "hvd.size() = $(echo "$out" | tail -1)"

    local hvdrun="$PY_BIN_DIR/horovodrun"
    [ -x "$hvdrun" ] || die "horovodrun not found at $hvdrun"
    # hvd.allreduce averages by default ([1.] on both ranks), so also print
    # size and a Sum allreduce; expect "2 [1.] [2.]" from each of the 2 ranks.
    log "verifying: horovodrun --gloo -np 2 -H localhost:2 (allreduce)"
    out="$(PATH="$PY_BIN_DIR:$PATH" timeout 300 "$hvdrun" --gloo -np 2 -H localhost:2 "$PY" -c \
        'import horovod.tensorflow as hvd; hvd.init(); import tensorflow as tf; print(hvd.size(), hvd.allreduce(tf.constant([1.0])).numpy(), hvd.allreduce(tf.constant([1.0]), op=hvd.Sum).numpy())' 2>&1)" || {
        echo "$out" | tail -30 >&2
        die "horovodrun 2-process Gloo allreduce failed.$LOG_HINT"
    }
    if [ "$(echo "$out" | grep -c -F '2 [1.] [2.]' || true)" -ne 2 ]; then
        echo "$out" | tail -30 >&2
        die "horovodrun ran but the ranks did not both print '2 [1.] [2.]'.$LOG_HINT"
    fi
    echo "$out" | grep -F '2 [1.] [2.]'
    log "OK: horovod ${HOROVOD_VERSION} (TF $TF_VERSION, Gloo) works."
}

install_wheel() {
    ensure_runtime_deps
    log "installing $1"
    "$PY" -m pip install --quiet --no-deps --force-reinstall "$1" || die "pip install of $1 failed"
}

# ---------------------------------------------------------------------------
# 2. Cached wheel for this TF version (another run may have just built it
#    while we waited on the lock).
# ---------------------------------------------------------------------------
if WHEEL="$(find_cached_wheel)"; then
    exec 9>&-   # the cache is settled for us; others need not wait on our install/verify
    log "using cached wheel $WHEEL"
    install_wheel "$WHEEL"
    verify
    exit 0
fi

# ---------------------------------------------------------------------------
# 3. Build from source.
# ---------------------------------------------------------------------------

LOG_HINT=" Build log: $BUILD_LOG"

# 3a. System header: TF's tsl/platform/fingerprint.h does `#include <farmhash.h>`
#     but the TF wheel does not put it on the include path.
if [ ! -f /usr/include/farmhash.h ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing libfarmhash-dev (needed by TensorFlow's headers)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y libfarmhash-dev >>"$BUILD_LOG" 2>&1 \
            || { apt-get update >>"$BUILD_LOG" 2>&1 && apt-get install -y libfarmhash-dev >>"$BUILD_LOG" 2>&1; } \
            || die "apt-get install libfarmhash-dev failed; see $BUILD_LOG"
    else
        die "/usr/include/farmhash.h is missing. Install it first, e.g. 'sudo apt-get install -y libfarmhash-dev' (Debian/Ubuntu), then rerun."
    fi
fi

# 3b. Build tooling and Horovod's setup_requires (needed because we build with
#     --no-build-isolation, so the build sees the venv's TensorFlow).
ensure_py_pkgs "setuptools, wheel" setuptools wheel
ensure_runtime_deps

CMAKE_BIN="$(PATH="$PY_BIN_DIR:$PATH" command -v cmake || true)"
if [ -z "$CMAKE_BIN" ] || ! "$PY" - "$CMAKE_BIN" >/dev/null 2>&1 <<'EOF'
import re, subprocess, sys
v = re.search(r"version\s*([\d.]+)", subprocess.check_output([sys.argv[1], "--version"], text=True)).group(1)
assert tuple(map(int, v.split(".")[:2])) >= (3, 13)
EOF
then
    log "no cmake >= 3.13 found; pip installing cmake into the venv"
    "$PY" -m pip install --quiet cmake || die "pip install cmake failed"
    CMAKE_BIN="$PY_BIN_DIR/cmake"
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
PARTIAL="$WHEEL_DIR/.horovod-wheel.partial.$$"
# Cleanup on any exit; turn INT/TERM into an exit so the EXIT trap runs.
trap 'rm -rf "$TMP" "$PARTIAL"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "downloading horovod ${HOROVOD_VERSION} sdist"
"$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$TMP/dl" >>"$BUILD_LOG" 2>&1 \
    || die "pip download of the horovod sdist failed; see $BUILD_LOG"
tar -xzf "$TMP/dl/horovod-$HOROVOD_VERSION.tar.gz" -C "$TMP"
SRC="$TMP/horovod-$HOROVOD_VERSION"

# Source fix 1: horovod/tensorflow/xla_mpi_ops.cc (XLA custom-call versions of
# the collectives, only used with HOROVOD_ENABLE_XLA_OPS=1) includes XLA
# headers that moved in newer TF (tensorflow/compiler/xla -> xla/...), so it no
# longer compiles against TF 2.21. The XLA ops are optional; drop the file from
# the build. The regular TF ops in mpi_ops.cc are unaffected.
grep -q 'xla_mpi_ops\.cc' "$SRC/horovod/tensorflow/CMakeLists.txt" \
    || die "unexpected sdist layout: xla_mpi_ops.cc not in horovod/tensorflow/CMakeLists.txt"
sed -i '/xla_mpi_ops\.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
# Source fix 2 is not a source edit: TF's headers include <farmhash.h>, which
# is provided by libfarmhash-dev (step 3a).
# Source fix 3 (Python 3.12+): distutils is gone from the standard library, and
# horovodrun imports horovod.runner.js_run, which does
# `from distutils.spawn import find_executable`. It then works only while
# setuptools' distutils shim happens to be installed in the venv; use the
# standard library's shutil.which (same contract: path or None) instead.
JS_RUN="$SRC/horovod/runner/js_run.py"
grep -q '^from distutils.spawn import find_executable$' "$JS_RUN" \
    || die "unexpected sdist layout: distutils import not found in horovod/runner/js_run.py"
sed -i 's/^from distutils.spawn import find_executable$/from shutil import which as find_executable/' "$JS_RUN"
# Source fix 4: every process set's Gloo context (the global one included) is
# made by GlooContext::InitializeForProcessSet, which creates its Gloo device
# from its own gloo_iface_, never set: HOROVOD_GLOO_IFACE is ignored and Gloo
# falls back to the address the host name resolves to. Where that is loopback
# (a container or VM whose /etc/hosts maps its name to 127.0.0.1), every
# worker advertises 127.0.0.1 and the first collective across hosts fails.
# Take the interface of the global context, which Initialize() set from
# HOROVOD_GLOO_IFACE (tests/test_gloo_iface.py runs such a job).
GLOO_CC="$SRC/horovod/common/gloo/gloo_context.cc"
grep -q '^void GlooContext::InitializeForProcessSet(const GlooContext& global_context,$' "$GLOO_CC" \
    || die "unexpected sdist layout: GlooContext::InitializeForProcessSet not found in $GLOO_CC"
sed -i '/^void GlooContext::InitializeForProcessSet(const GlooContext& global_context,$/,/^  device_attr.iface = gloo_iface_;$/ s/^  device_attr.iface = gloo_iface_;$/  gloo_iface_ = global_context.gloo_iface_;\n  device_attr.iface = gloo_iface_;/' "$GLOO_CC"
[ "$(grep -c '^  gloo_iface_ = global_context.gloo_iface_;$' "$GLOO_CC")" -eq 1 ] \
    || die "source fix 4 did not apply to $GLOO_CC"
# The wheel carries its build revision (a module in the package, so that pip
# installs and removes it with the wheel); the fast path checks it.
printf '"""Written by tf_codistill tools/build_horovod.sh: the set of source fixes in this build."""\nREVISION = %d\n' \
    "$BUILD_REVISION" > "$SRC/horovod/tf_codistill_build.py"

# Parallel compilation unless MAKEFLAGS already asks for a job count. Under
# `make horovod`, make exports MAKEFLAGS with its command-line variables
# (" -- VENV=... PYTHON=...") and no -j: that alone would build serially.
case " ${MAKEFLAGS:-} " in
    *" -j"* | *" j"[0-9]* | *"--jobserver"*) ;;
    *) MAKEFLAGS="-j$(nproc) ${MAKEFLAGS:-}" ;;
esac
log "building wheel (MAKEFLAGS=$MAKEFLAGS; ~2-8 min on 2 cores); log: $BUILD_LOG"
start=$(date +%s)
(
    cd "$SRC"
    export PATH="$PY_BIN_DIR:$PATH"
    export HOROVOD_CMAKE="$CMAKE_BIN"
    export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
           HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO
    export MAKEFLAGS
    "$PY" -m pip wheel --no-build-isolation --no-deps -v -w "$TMP/wheelhouse" .
) >>"$BUILD_LOG" 2>&1 || {
    tail -40 "$BUILD_LOG" >&2
    die "horovod wheel build failed; full build log: $BUILD_LOG"
}
log "build finished in $(( $(date +%s) - start )) s"

BUILT=( "$TMP"/wheelhouse/horovod-"$HOROVOD_VERSION"-*.whl )
[ -f "${BUILT[0]}" ] || die "build produced no wheel; see $BUILD_LOG"
# Atomic publish: copy next to the destination, then rename within that dir.
NAME="$(basename "${BUILT[0]}")"
cp "${BUILT[0]}" "$PARTIAL"
mv -f "$PARTIAL" "$WHEEL_DIR/$NAME"
WHEEL="$WHEEL_DIR/$NAME"
log "cached wheel: $WHEEL"
exec 9>&-   # release the build lock before the (slow) install and verification

install_wheel "$WHEEL"
verify
