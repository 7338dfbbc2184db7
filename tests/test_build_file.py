"""BUILD covers the project: every module, test and benchmark is in a Bazel target.

BUILD is Starlark, which for what it uses here (rule calls, `glob`, a list comprehension, a dict)
is also Python: it is evaluated with each rule replaced by a recorder and `glob` expanded with
Python's glob from the repository root. No Bazel needed.
"""

from __future__ import annotations

import glob as pyglob
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "BUILD"

# Files that must be in the srcs of some py_library / py_binary / py_test.
REQUIRED = [
    "tf_codistill/**/*.py",
    "models/**/*.py",
    "train.py",
    "tests/conftest.py",
    "tests/test_*.py",
    "bench/*.py",
    "examples/*.py",
]
PY_RULES = ("py_library", "py_binary", "py_test")
RULES = PY_RULES + ("genrule", "filegroup", "sh_binary", "sh_test", "exports_files")


def _expand(patterns: list[str]) -> list[str]:
    found = set()
    for pattern in patterns:
        for path in pyglob.glob(pattern, root_dir=REPO, recursive=True):
            if (REPO / path).is_file():
                found.add(path.replace(os.sep, "/"))
    return sorted(found)


def _glob(include, exclude=(), exclude_directories=1, allow_empty=True):
    return sorted(set(_expand(list(include))) - set(_expand(list(exclude))))


def evaluate_build(text: str) -> list[dict]:
    """The targets BUILD declares, each a dict of its attributes plus `rule`."""
    targets: list[dict] = []

    def recorder(rule):
        def record(*args, **attrs):
            targets.append({"rule": rule, "args": args, **attrs})

        return record

    scope = {
        "__builtins__": {"len": len, "sorted": sorted},
        "glob": _glob,
        "package": lambda **_: None,
        "load": lambda *_: None,
    }
    scope.update({rule: recorder(rule) for rule in RULES})
    exec(compile(text, str(BUILD), "exec"), scope)  # noqa: S102 - our own BUILD file
    return targets


@pytest.fixture(scope="module")
def targets() -> list[dict]:
    return evaluate_build(BUILD.read_text())


def _outs(targets) -> set[str]:
    return {out for t in targets for out in t.get("outs", [])}


def _path(label: str) -> str:
    """`//:a/b.py`, `:a/b.py` or `a/b.py` -> `a/b.py`."""
    return label.removeprefix("//").removeprefix(":")


def _covered(targets) -> set[str]:
    return {_path(src) for t in targets if t["rule"] in PY_RULES for src in t.get("srcs", [])}


def test_every_module_is_in_a_target(targets):
    required = _expand(REQUIRED)
    assert "train.py" in required and "tf_codistill/__init__.py" in required  # the globs see the tree
    missing = sorted(set(required) - _covered(targets))
    assert not missing, f"not in any py_library/py_binary/py_test srcs in BUILD: {missing}"


def test_srcs_exist(targets):
    generated = _outs(targets)
    stale = sorted(p for p in _covered(targets) if p not in generated and not (REPO / p).is_file())
    assert not stale, f"BUILD lists files that do not exist: {stale}"


def test_target_names_unique_and_deps_defined(targets):
    names = [t["name"] for t in targets if "name" in t]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    undefined = {
        dep for t in targets for dep in t.get("deps", []) if dep.startswith(":") and dep[1:] not in names
    }
    assert not undefined, f"deps on targets BUILD does not define: {sorted(undefined)}"


def test_each_test_file_runs_under_pytest(targets):
    """One py_test per tests/test_*.py, whose main runs pytest on it (a pytest module run as a
    script only imports, so the target would pass without running a test)."""
    runners = {out for t in targets if t["rule"] == "genrule" for out in t.get("outs", [])}
    tests = [t for t in targets if t["rule"] == "py_test"]
    by_file = {}
    for t in tests:
        own = [_path(s) for s in t["srcs"] if _path(s).startswith("tests/test_")]
        assert len(own) == 1, f"py_test {t['name']}: srcs {t['srcs']}"
        assert own[0] not in by_file, f"{own[0]} is in two py_tests"
        by_file[own[0]] = t
        assert _path(t.get("main", "")) in runners, (
            f"py_test {t['name']}: main must be the pytest entry point"
        )
        assert own[0] in t.get("args", []), f"py_test {t['name']}: args must name {own[0]}"
    assert sorted(by_file) == _expand(["tests/test_*.py"])


def test_evaluator_sees_globs_and_comprehensions():
    text = 'py_library(name = "a", srcs = glob(["models/*.py"]))\n[py_test(name = s) for s in ["x", "y"]]\n'
    found = evaluate_build(text)
    assert [t["name"] for t in found] == ["a", "x", "y"]
    assert "models/__init__.py" in found[0]["srcs"]
