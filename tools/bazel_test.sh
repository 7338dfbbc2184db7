#!/bin/sh
# Runs the test suite under Bazel, offline (see WORKSPACE and .bazelrc).
#   tools/bazel_test.sh                   # every test: bazel test //...
#   tools/bazel_test.sh //:test_losses    # some targets
#   tools/bazel_test.sh --test_output=errors //:test_model   # extra bazel flags
# Needs Debian's Bazel 4.2.3 and rules_java, and the virtualenv (make test creates it).
set -eu

cd "$(dirname "$0")/.."

if ! command -v bazel >/dev/null 2>&1; then
    echo "error: bazel not found; install it with: apt-get install bazel-bootstrap bazel-rules-java" >&2
    exit 1
fi
if [ ! -d /usr/share/bazel/rules/java ]; then
    echo "error: /usr/share/bazel/rules/java not found; install it with: apt-get install bazel-rules-java" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "error: .venv/bin/python not found; create the virtualenv first (make test, or see README)" >&2
    exit 1
fi

# No target among the arguments (only flags, or nothing): test everything.
has_target=no
for arg in "$@"; do
    case "$arg" in -*) ;; *) has_target=yes ;; esac
done
[ "$has_target" = yes ] || set -- "$@" //...

# The tests run the virtualenv's python and pytest (.bazelrc passes PATH through).
# One test at a time: the multi-process tests start real processes on real ports.
PATH="$PWD/.venv/bin:$PATH" exec bazel test --test_timeout=900 --local_test_jobs=1 "$@"
