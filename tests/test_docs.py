"""The documentation against the code: a doc that drifts from what the code does fails here.

Checked without training: every `--flag` the docs name exists (and every flag after `train.py` in a
command is one of its flags, with a value it parses); docs/train_flags.md lists every setting with its
real default and its real choices; the reference tables of `runtime.init`, `Runtime` and
`CodistillModel` match their signatures; every relative link and anchor resolves; every file, test,
module and make target named exists; every error text quoted in docs/operations.md is one the code
prints; the exit statuses are the code's; the README's demo table has the rows `train.py` prints;
numbers quoted from docs/results are in their reports (and projection.md is what its script writes
from the committed cost model); the manifests prepare the data they train on. Two subprocesses run
code: `import tf_codistill; import keras; keras.models.load_model(...)` in a fresh process, and the
data step of the CIFAR-10 manifests (`tools/prepare_data.py`) on a TFDS dataset built offline.
"""

from __future__ import annotations

import ast
import inspect
import re
import shlex
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
import yaml
from conftest import python_env

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
K8S_README = REPO / "deploy" / "k8s" / "README.md"
# The pages a user reads (generated reports are checked by tests/test_study.py and below).
PAGES = [README, *DOCS, K8S_README]
_SKIP_DIRS = {".git", ".venv", "runs", "build", ".pytest_cache", ".ruff_cache", "node_modules"}


def _all_markdown() -> list[Path]:
    found = []
    for path in REPO.rglob("*.md"):
        rel = path.relative_to(REPO)
        if not (set(rel.parts[:-1]) & _SKIP_DIRS or rel.parts[0].startswith((".venv", "bazel-"))):
            found.append(path)
    return sorted(found)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _code_spans(text: str, languages: tuple[str, ...] | None = None) -> list[str]:
    """Inline `code` spans and the lines of fenced blocks (only blocks of `languages` if given)."""
    spans, fenced, keep = [], False, True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            keep = languages is None or line.strip()[3:] in languages
            continue
        if fenced:
            if keep:
                spans.append(line)
        else:
            spans += re.findall(r"`([^`]+)`", line)
    return spans


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows (cells stripped) of every Markdown table whose first header cell is `first_header`."""
    rows, inside = [], False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            inside = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not inside:
            if cells and cells[0] == first_header and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
                inside = True
            continue
        if set(line) <= set("|-: "):
            continue
        rows.append(cells)
    return rows


def _ticks(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# ------------------------------------------------------------------------------------- flags
@pytest.fixture(scope="module")
def train_flags():
    from absl import flags

    import train  # noqa: F401  (defines the flags on absl's global FLAGS)

    return flags.FLAGS


def _argparse_flags(*paths: Path) -> set[str]:
    names = set()
    for path in paths:
        names |= set(re.findall(r'add_argument\(\s*"--([\w-]+)"', path.read_text()))
    return names


# Flags of programs that are not this project's, as the docs use them.
EXTERNAL_FLAGS = {
    "gloo",  # horovodrun
    "hostfile",
    "no-deps",  # pip
    "no-build-isolation",
    "no-binary",
    "python-version",
    "upgrade",
    "quiet",
    "force-reinstall",
    "logdir",  # tensorboard
    "build-arg",  # docker build
    "help",  # absl's, handled before train.py's flags
    "helpfull",
    "helpshort",
    "flag",  # "every `--flag`", in prose
}


def test_every_flag_named_in_the_docs_exists(train_flags):
    """Every `--name` on a page is a flag of train.py, the launcher, the study runner, a bench or
    tools script, or one of the external tools the docs show (horovodrun, pip, tensorboard)."""
    ours = set(train_flags) | _argparse_flags(
        REPO / "tf_codistill" / "launch.py",
        REPO / "tf_codistill" / "study" / "__main__.py",
        *(REPO / "bench").glob("*.py"),
        *(REPO / "tools").glob("*.py"),
        *(REPO / "examples").glob("*.py"),
    )
    problems = []
    for page in PAGES:
        for name in re.findall(r"(?<![\w/-])--([a-z][\w-]*)", page.read_text()):
            if name not in ours and name not in EXTERNAL_FLAGS:
                problems.append(f"{_rel(page)}: --{name}")
    assert not problems, "flags no program of the project has:\n" + "\n".join(sorted(set(problems)))


def _train_commands(text: str) -> list[list[str]]:
    """The arguments after `train.py` in every command of a page (code spans and blocks)."""
    found = []
    for span in _code_spans(text):
        span = span.split(" # ")[0]
        if "train.py " not in span:
            continue
        after = span.split("train.py ", 1)[1]
        try:
            tokens = shlex.split(after)
        except ValueError:
            tokens = after.split()
        args = []
        for token in tokens:
            if token in ("&&", "||", ";", "|", "&", "\\") or not token.startswith("--"):
                break
            args.append(token)
        found.append(args)
    return found


def test_train_py_commands_use_its_flags_with_values_it_accepts(train_flags):
    problems, seen = [], 0
    for page in PAGES:
        for args in _train_commands(page.read_text()):
            for arg in args:
                seen += 1
                name, has_value, value = arg[2:].partition("=")
                if name not in train_flags and name not in ("help", "helpfull", "helpshort"):
                    problems.append(f"{_rel(page)}: train.py {arg}: no such flag")
                    continue
                if name not in train_flags or not has_value or re.search(r"[<>$]|\.\.\.|^[A-Z]+$", value):
                    continue  # a placeholder
                try:
                    train_flags[name].parser.parse(value)
                except ValueError as err:
                    problems.append(f"{_rel(page)}: train.py {arg}: {err}")
    assert seen > 20, f"found only {seen} train.py arguments in the docs: is the parser broken?"
    assert not problems, "\n".join(problems)


def _flag_table() -> dict[str, tuple[str, str]]:
    """docs/train_flags.md's flag table: flag -> (default cell, meaning cell)."""
    table = {}
    for cells in _table_rows((REPO / "docs" / "train_flags.md").read_text(), "flag"):
        flags_cell, default_cell, meaning = cells[:3]
        names = re.findall(r"`--(\w+)`", flags_cell)
        defaults = [d.strip() for d in default_cell.split(" / ")]
        if len(defaults) == 1:
            defaults *= len(names)
        assert len(defaults) == len(names), f"train_flags.md: {flags_cell} has defaults {default_cell}"
        for name, default in zip(names, defaults):
            table[name] = (default, meaning)
    return table


def test_train_flags_md_lists_every_flag_with_its_default(train_flags):
    from tf_codistill.config import SETTINGS

    table = _flag_table()
    real = {name: spec.default for name, spec in SETTINGS.items()}
    real["workdir"] = train_flags["workdir"].default
    assert set(table) == set(real), (
        f"train.py flags missing from the table: {sorted(set(real) - set(table))}; "
        f"in the table but not train.py's: {sorted(set(table) - set(real))}"
    )
    problems = []
    for name, (cell, _) in table.items():
        want = real[name]
        text = cell.strip("`")
        if cell == "-" or cell.startswith(("same", "TFDS default")):
            ok = want is None
        elif isinstance(want, bool) or not isinstance(want, (int, float)):
            ok = text == str(want)
        else:
            try:
                ok = float(text) == float(want)
            except ValueError:
                ok = False
        if not ok:
            problems.append(f"--{name}: the table says {cell}, the default is {want!r}")
    assert not problems, "\n".join(problems)


def test_train_flags_md_quotes_every_choice_list_as_config_declares_it():
    """For a setting with choices, the values the table names in backticks (with its default) are
    exactly `config.py`'s choices."""
    from tf_codistill.config import SETTINGS

    table = _flag_table()
    problems = []
    for name, spec in SETTINGS.items():
        if spec.choices is None:
            continue
        default, meaning = table[name]
        quoted = {t for t in _ticks(meaning) if not t.startswith("--")}
        if spec.default is not None:
            quoted.add(default.strip("`"))
        if quoted != {str(c) for c in spec.choices}:
            problems.append(f"--{name}: the docs name {sorted(quoted)}, config.py {list(spec.choices)}")
    assert not problems, "\n".join(problems)


def test_the_distances_the_readme_names_are_the_library_s():
    from tf_codistill.losses import DISTANCES

    line = next(line for line in README.read_text().splitlines() if "The distance D:" in line)
    assert set(re.findall(r'"(\w+)"', line)) == set(DISTANCES)


# ------------------------------------------------------------------- API reference tables
def _reference(page: str, first_header: str) -> dict[str, str]:
    rows = _table_rows((REPO / "docs" / page).read_text(), first_header)
    out = {}
    for cells in rows:
        for name in _ticks(cells[0]):
            out[name] = cells[1]
    return out


def _default_text(value) -> str:
    return "(required)" if value is inspect.Parameter.empty else f"`{value!r}`".replace("'", '"')


def test_runtime_init_reference_matches_its_signature():
    from tf_codistill import runtime

    documented = _reference("runtime.md", "argument")
    params = inspect.signature(runtime.init).parameters
    assert set(documented) == set(params), (
        f"undocumented: {sorted(set(params) - set(documented))}; "
        f"not arguments of init: {sorted(set(documented) - set(params))}"
    )
    wrong = {n: (documented[n], _default_text(p.default)) for n, p in params.items()}
    wrong = {n: pair for n, pair in wrong.items() if pair[0] != pair[1]}
    assert not wrong, f"defaults (docs, code): {wrong}"


def test_runtime_reference_names_every_public_attribute():
    from tf_codistill.runtime import Runtime

    text = (REPO / "docs" / "runtime.md").read_text()
    section = text[text.index("## `Runtime`") :]
    named = set()
    for cells in _table_rows(section, "attribute") + _table_rows(section, "property"):
        named |= {t.split("(")[0] for t in _ticks(cells[0])}
    for cells in _table_rows(section, "method"):
        named |= {t.split("(")[0] for t in _ticks(cells[0])}
    public = {n for n in dir(Runtime) if not n.startswith("_")} | {
        f.name for f in Runtime.__dataclass_fields__.values()
    }
    assert public == named, (
        f"undocumented: {sorted(public - named)}; not on Runtime: {sorted(named - public)}"
    )


def test_codistill_model_reference_matches_its_signature():
    from tf_codistill.model import CodistillModel

    documented = _reference("library.md", "argument")
    params = {
        n: p
        for n, p in inspect.signature(CodistillModel.__init__).parameters.items()
        if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    assert set(documented) == set(params), (
        f"undocumented: {sorted(set(params) - set(documented))}; "
        f"not arguments: {sorted(set(documented) - set(params))}"
    )
    wrong = {n: (documented[n], _default_text(p.default)) for n, p in params.items()}
    wrong = {n: pair for n, pair in wrong.items() if pair[0] != pair[1]}
    assert not wrong, f"defaults (docs, code): {wrong}"


def test_the_data_mode_the_runtime_gives_is_as_documented():
    """docs/runtime.md and the README: in one process, predictions give shared batches, weights
    and data_mode="independent" give each group its own order (no TensorFlow op runs here)."""
    from tf_codistill import runtime

    assert runtime.init(2, "predictions").data_mode == "shared"
    assert runtime.init(2, "predictions", data_mode="independent").data_mode == "independent"
    assert runtime.init(2, "weights").data_mode == "independent"
    assert runtime.init(1, "predictions").data_mode == "shared"


def test_the_readme_stays_short():
    """References live in docs/; the README is the door."""
    assert len(README.read_text().splitlines()) < 300


# --------------------------------------------------------------------- links, paths, names
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text, fenced, found = path.read_text(), False, set()
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(_slug(line.lstrip("#")))
    return found


def test_every_relative_link_and_anchor_resolves():
    problems = []
    for page in _all_markdown():
        if "fixtures" in page.parts:
            continue  # test inputs (reports rebuilt without their plots)
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                problems.append(f"{_rel(page)}: {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{_rel(page)}: {target}: no heading #{anchor}")
    assert not problems, "\n".join(problems)


# Repository paths named in backticks; runs/ and other outputs are made at run time.
_PATH = re.compile(
    r"^(?:tf_codistill|models|tests|docs|deploy|tools|bench|examples|experiments)/[\w./-]*$|^[\w-]+\.py$"
)


def test_every_file_test_and_module_named_exists():
    import tf_codistill

    problems = []
    for page in PAGES:
        for span in _code_spans(page.read_text()):
            for token in re.findall(r"[\w./:-]+", span):
                token = token.rstrip(".,:")
                path, _, test = token.partition("::")
                if _PATH.match(path) and "<" not in path:
                    if not (REPO / path).exists() and not (REPO / "tf_codistill" / path).exists():
                        if "/" in path or not list(REPO.glob(f"**/{path}")):
                            problems.append(f"{_rel(page)}: {path}: no such file")
                            continue
                    if test and (REPO / path).is_file():
                        if not re.search(
                            rf"def {re.escape(test.split('[')[0])}\b", (REPO / path).read_text()
                        ):
                            problems.append(f"{_rel(page)}: {token}: no such test")
                module = re.fullmatch(r"tf_codistill(?:\.\w+)+", token)
                if module and token.split(".")[1] not in tf_codistill.__all__:
                    parts = token.split(".")
                    for n in range(len(parts), 1, -1):  # a module, or a name in one
                        base = REPO.joinpath(*parts[:n])
                        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
                            break
                    else:
                        problems.append(f"{_rel(page)}: {token}: no such module")
    assert not problems, "\n".join(sorted(set(problems)))


def test_every_make_target_named_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    problems = []
    for page in PAGES:
        for span in _code_spans(page.read_text(), languages=("bash", "sh", "console")):
            for target in re.findall(r"(?:^|[;&|]\s*|\$ )make ([a-z][\w-]*)", span.split(" # ")[0].strip()):
                if target not in targets:
                    problems.append(f"{_rel(page)}: make {target}")
    assert not problems, "\n".join(problems)


def test_make_study_report_rebuilds_every_committed_report():
    """`make study-report` says "every REPORT.md": it runs the runner once per folder of results."""
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\nstudy-report:", 1)[1].split("\n\n", 1)[0]
    outs = set(re.findall(r"--out=(\S+)", recipe))
    assert all("--report_only" in line for line in recipe.splitlines()[1:] if "tf_codistill.study" in line)
    committed = {_rel(p.parent.parent) for p in (REPO / "docs" / "results").rglob("runs.csv")}
    assert committed <= outs, f"make study-report does not rebuild {sorted(committed - outs)}"


# ------------------------------------------------------------------------ errors and statuses
def _template_tokens(node) -> list | None:
    """A string expression as literal pieces and None (any value), or None if it is not one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        parts = re.split(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfgx]", node.value)
        out = []
        for i, part in enumerate(parts):
            out += ([None] if i else []) + ([part] if part else [])
        return out
    if isinstance(node, ast.JoinedStr):
        out = []
        for value in node.values:
            out += _template_tokens(value) or [None] if isinstance(value, ast.Constant) else [None]
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template_tokens(node.left), _template_tokens(node.right)
        if left is not None or right is not None:
            return (left or [None]) + (right or [None])
    return None


class _Template:
    """What a string expression can print; `contains(text)`: can some output contain `text`?"""

    def __init__(self, tokens: list):
        self.pattern = []  # one entry per character; None: a wildcard
        for token in tokens:
            self.pattern += [None] if token is None else list(token)
        self.literal = "".join(t for t in tokens if t)
        self.masks: dict[str, int] = {}
        self.wild = 0
        for i, c in enumerate(self.pattern):
            if c is None:
                self.wild |= 1 << i
            else:
                self.masks[c] = self.masks.get(c, 0) | (1 << i)

    def _close(self, state: int) -> int:
        while True:
            more = state | ((state & self.wild) << 1)
            if more == state:
                return state
            state = more

    def contains(self, text: str) -> bool:
        state = self._close((1 << (len(self.pattern) + 1)) - 1)  # start anywhere
        for c in text:
            # A value never holds "-": so "--a and --b must be" is not "--{name} must be".
            stay = state & self.wild if c != "-" else 0
            state = self._close(((state & self.masks.get(c, 0)) << 1) | stay)
            if not state:
                return False
        return True  # end anywhere


def _templates() -> list[_Template]:
    sources = [*(REPO / "tf_codistill").rglob("*.py"), REPO / "train.py", *(REPO / "models").rglob("*.py")]
    found = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            tokens = _template_tokens(node)
            if tokens and any(tokens):
                found.append(_Template(tokens))
    return found


# Quoted lines printed by other programs.
_NOT_OURS = {"Process name: 1 Exit code: ...": "horovodrun's own line"}
_PREFIXES = ("train.py: error: ", "train.py: warning: ", "warning: ", "WARNING: ", "launch: error: ")


def test_every_error_text_quoted_in_operations_md_is_printed_by_the_code():
    """The "you see" column of docs/operations.md: each quoted text (split at "...") can be printed
    by some string in the code, values (formatted fields) matching anything."""
    templates = _templates()
    text = (REPO / "docs" / "operations.md").read_text()
    quotes = [
        quote
        for header in ("you see", "you see (`train.py: error: ...`)")
        for cells in _table_rows(text, header)
        for quote in _ticks(cells[0])
    ]
    assert len(quotes) > 40, quotes
    missing = []
    for quote in quotes:
        if quote in _NOT_OURS:
            continue
        body = quote
        for prefix in _PREFIXES:
            body = body.removeprefix(prefix)
        for fragment in (f.strip() for f in body.split("...")):
            words = re.findall(r"[A-Za-z]{4,}", fragment)
            likely = [t for t in templates if any(w in t.literal for w in words)]  # faster first
            if fragment and not any(t.contains(fragment) for t in likely + templates):
                missing.append(f"{quote!r}: {fragment!r}")
    assert not missing, "quoted in docs/operations.md, printed nowhere:\n" + "\n".join(missing)


def _setting_errors(name: str) -> list[str]:
    """What train.py says for bad values of setting `name` (wrong choice, out of range, not finite,
    wrong type)."""
    from tf_codistill.config import SETTINGS, TrainConfig

    spec = SETTINGS[name]
    bad = [-1, 10**9]
    if spec.choices is not None:
        bad.append(99 if spec.kind == "int" else "not-a-choice")
    if spec.minimum is not None:
        bad += [spec.minimum - 1, spec.minimum]
    if spec.maximum is not None:
        bad.append(spec.maximum + 1)
    if spec.kind == "float":
        bad.append(float("nan"))
    bad.append("2" if spec.kind != "str" else 2)
    messages = []
    for value in bad:
        if spec.kind == "int" and isinstance(value, float) and value == int(value):
            value = int(value)
        if value == spec.default:
            continue
        try:
            TrainConfig(**{name: value}).validate()
        except (ValueError, TypeError) as err:
            messages.append(str(err))
    return messages


def test_setting_errors_quoted_in_operations_md_are_the_messages_train_py_prints():
    """The quotes that begin `--NAME must be`, for a setting NAME, are the start (or, split at
    "...", pieces) of what train.py prints for a bad value of NAME."""
    from tf_codistill.config import SETTINGS

    text = (REPO / "docs" / "operations.md").read_text()
    problems, checked = [], 0
    for quote in re.findall(r"`(--(\w+) must be[^`]*)`", text):
        body, name = quote
        if name not in SETTINGS:
            continue
        checked += 1
        messages = _setting_errors(name)
        for fragment in (f.strip() for f in body.split("...")):
            if fragment and not any(fragment in m for m in messages):
                problems.append(f"{body!r}; train.py says e.g. {messages[:2]}")
    assert checked >= 10
    assert not problems, "\n".join(problems)


def test_exit_statuses_in_operations_md_are_the_code_s():
    from tf_codistill import launch
    from tf_codistill.config import ExitStatus

    text = (REPO / "docs" / "operations.md").read_text()
    train = {int(cells[0]) for cells in _table_rows(text, "status")}
    assert train == {int(s) for s in ExitStatus} | {1}, "train.py's table"
    launcher = {cells[0] for cells in _table_rows(text, "launcher status")}
    assert {str(launch.EXIT_USAGE), str(launch.EXIT_TIMEOUT), "0", "128 + N"} <= launcher


def test_the_readme_demo_table_has_the_rows_train_py_prints():
    from tf_codistill.report import format_table
    from tf_codistill.results import RunResult

    run = {
        "arm": "sync",
        "num_groups": 1,
        "batch_size_per_group": 128,
        "steps": 1,
        "groups": [{"group": 0, "test_accuracy": 0.5, "test_loss": 1.0, "train_loss": 1.0}],
        "ensemble_test_accuracy": None,
        "bytes_equivalent_per_step": 1,
        "examples_per_second": 1,
        "wall_seconds": 1.0,
    }
    printed = [line.split("  ")[0] for line in format_table([RunResult.from_dict(run)]).splitlines()[2:]]
    block = README.read_text().split("prints a table like this one", 1)[1].split("```")[1]
    quoted = [line.split("  ")[0] for line in block.strip().splitlines()[2:]]
    assert quoted == printed


# ------------------------------------------------------------------ numbers from docs/results
def _reported_numbers() -> str:
    return "\n".join(p.read_text() for p in (REPO / "docs" / "results").rglob("REPORT.md"))


def _rounded(value: str, like: str) -> Decimal:
    """`value` rounded half up to as many decimals as `like` has."""
    return Decimal(value).quantize(Decimal(like), rounding=ROUND_HALF_UP)


def test_means_and_intervals_quoted_from_the_studies_are_in_their_reports():
    """Every "mean ± error" and "[low, high]" interval on the README and docs/choosing.md appears in
    a committed REPORT.md (rounded as quoted)."""
    reports = _reported_numbers()
    problems = []
    for page in (README, REPO / "docs" / "choosing.md"):
        text = page.read_text()
        for mean, err in re.findall(r"(\d+\.\d+) ± (\d+\.\d+)", text):
            found = any(
                _rounded(m, mean) == Decimal(mean) and _rounded(e, err) == Decimal(err)
                for m, e in re.findall(r"(\d+\.\d+) ± (\d+\.\d+)", reports)
            )
            if not found:
                problems.append(f"{_rel(page)}: {mean} ± {err}")
        for low, high in re.findall(r"\[([-+]\d+\.\d+), ([-+]\d+\.\d+)\]", text):
            if f"[{low}, {high}]" not in reports:
                problems.append(f"{_rel(page)}: [{low}, {high}]")
    assert not problems, "quoted but in no REPORT.md:\n" + "\n".join(problems)


def test_network_results_page_quotes_the_sweep_s_parameter_counts():
    import csv

    folder = REPO / "docs" / "results" / "network"
    with open(folder / "sweep.csv") as f:
        params = {row["model"]: int(row["params"]) for row in csv.DictReader(f)}
    text = (folder / "README.md").read_text()
    for model, count in params.items():
        assert f"`{model}`\n({count:,}" in text or f"`{model}` ({count:,}" in text, (model, count)
    assert "check/" not in text.replace("bench/check", ""), "cites check/ files that are not committed"


def test_projection_md_is_what_its_script_writes_from_the_committed_cost_model(tmp_path):
    import shutil

    folder = REPO / "docs" / "results" / "network"
    shutil.copy(folder / "costmodel.json", tmp_path / "costmodel.json")
    out = tmp_path / "projection.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "project_resnet50.py"), f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=python_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text() == (folder / "projection.md").read_text()


def test_the_scale_out_table_is_what_the_decision_report_says():
    """README's scale-out rows: each number is the committed decision report's (rebuilt from its CSVs
    by make study-report), the verdict included."""
    report = (REPO / "docs" / "results" / "scale_out" / "scale_out_decision" / "REPORT.md").read_text()
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and re.fullmatch(r"[\d,]+", cells[0]) and "reached" in cells[1]:
            rows[cells[0]] = cells
    assert set(rows) == {"64", "256", "1,024"}
    readme = README.read_text()
    for b, (_, sync, sync2, codistill, alpha0, ensemble, ci, verdict, _) in rows.items():
        mean = [c.split(" ± ")[0] for c in (sync, sync2, codistill, alpha0, ensemble)]
        line = f"| {b} | {mean[0]} | {mean[1]} | {mean[2]} | {mean[3]} ({mean[4]}) | {ci} | {verdict.strip('*')} |"
        assert line in readme, line


_README_PRELUDE = """
import keras, numpy as np, tensorflow as tf

rng = np.random.default_rng(0)
x = rng.normal(size=(512, 8)).astype("float32")
y = (x[:, 0] > 0).astype("int64")

def build(g):
    keras.utils.set_random_seed(g)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)], name=f"m{g}")

def train_fn(seed):
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(512, seed=seed).repeat().batch(32)

def eval_fn(context):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
"""


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_and_library_code_blocks_run(tmp_path):
    """The README's pattern (with a `build`, `train_fn` and `eval_fn` as it describes them) and
    docs/library.md's first block run as written (fewer steps), in one fresh process."""
    readme = _python_blocks(README)[0]
    library = _python_blocks(REPO / "docs" / "library.md")[0]
    assert "steps_per_epoch=300" in readme and "epochs=30," in library and "steps_per_epoch=62" in library
    readme = readme.replace("steps_per_epoch=300", "steps_per_epoch=20")  # seconds, not a minute
    library = library.replace("epochs=30,", "epochs=1,").replace("steps_per_epoch=62", "steps_per_epoch=5")
    script = "\n".join(
        [
            _README_PRELUDE,
            readme,
            "assert len(everyone) == 1 and len(everyone[0]) == 2, everyone",
            library,
            "import os; assert os.path.exists('member0.keras')",
        ]
    )
    env = python_env()
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------- manifests
def _manifest_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((REPO / "deploy" / "k8s").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _pods(doc: dict) -> dict[str, dict]:
    specs = doc.get("spec", {}).get("tfReplicaSpecs") or doc.get("spec", {}).get("mpiReplicaSpecs") or {}
    return {role: spec for role, spec in specs.items()}


def _train_args(container: dict) -> dict[str, str] | None:
    argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
    if "train.py" not in argv:
        return None
    return dict(a[2:].partition("=")[::2] for a in argv[argv.index("train.py") + 1 :] if a.startswith("--"))


def test_manifests_prepare_every_dataset_that_is_not_built_in():
    """A dataset train.py cannot generate offline is prepared, before train.py starts, in the
    --data_dir of every pod that runs train.py (an MPIJob's workers for its launcher)."""
    builtin = ("mnist1d", "digits")  # tf_codistill.data.BUILTIN_DATASETS (no TensorFlow here)
    checked = 0
    for name, doc in _manifest_docs():
        pods = _pods(doc)
        for role, spec in pods.items():
            for container in spec["template"]["spec"]["containers"]:
                args = _train_args(container)
                if args is None or args.get("dataset", "mnist1d").split("/")[0] in builtin:
                    continue
                checked += 1
                data_dir = args["data_dir"]
                runners = [pods["Worker"]] if doc["kind"] == "MPIJob" else [spec]
                for pod in (r["template"]["spec"] for r in runners):
                    prepare = [
                        c
                        for c in pod.get("initContainers", [])
                        if c["command"][:2] == ["python", "tools/prepare_data.py"]
                    ]
                    assert prepare, f"{name} {role}: no init container prepares {args['dataset']}"
                    argv = prepare[0]["command"]
                    assert argv[2] == args["dataset"] and f"--data_dir={data_dir}" in argv, (name, argv)
                    volume = {m["mountPath"]: m["name"] for m in prepare[0]["volumeMounts"]}
                    trains = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
                    assert volume.get(data_dir) == trains.get(data_dir) is not None, f"{name}: another volume"
                    assert prepare[0]["image"] == pod["containers"][0]["image"], name
    assert checked >= 2, "the GPU manifests train on CIFAR-10"


def test_multi_worker_tfjobs_wait_for_slow_pods():
    """deploy/k8s/README.md: every multi-worker manifest raises --collective_timeout."""
    for name, doc in _manifest_docs():
        for spec in _pods(doc).values():
            for container in spec["template"]["spec"]["containers"]:
                args = _train_args(container)
                if args is not None and (doc["kind"] == "MPIJob" or spec.get("replicas", 1) > 1):
                    assert float(args.get("collective_timeout", 120)) >= 300, name


def test_the_readme_sed_repoints_every_image():
    text = K8S_README.read_text()
    (pattern, replacement) = re.search(r"sed -i 's#([^#]+)#([^#]+)#' deploy/k8s/\*\.yaml", text).groups()
    for name, doc in _manifest_docs():
        for spec in _pods(doc).values():
            pod = spec["template"]["spec"]
            for container in pod["containers"] + pod.get("initContainers", []):
                image = re.sub(pattern, replacement, container["image"])
                assert "REGISTRY" not in image, f"{name}: {container['image']} stays {image}"


def _register_tiny_dataset() -> None:
    """A TFDS dataset registered like any other (so train.py refuses it until it is prepared),
    generated without a network."""
    import numpy as np
    import tensorflow_datasets as tfds

    if "docs_tiny" in tfds.list_builders():
        return

    class DocsTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "x": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                "y": tfds.features.ClassLabel(num_classes=2),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features), supervised_keys=("x", "y")
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40), "test": self._generate_examples(10)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"x": np.full(3, i, np.float32), "y": i % 2}


def test_prepare_data_prepares_a_dataset_train_py_then_reads(tmp_path, capsys):
    """The manifests' data step: a TFDS dataset that train.py refuses unprepared is prepared by
    tools/prepare_data.py, and then read as train.py reads it."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import prepare_data
    finally:
        sys.path.remove(str(REPO / "tools"))
    from tf_codistill import data

    _register_tiny_dataset()
    data_dir = str(tmp_path / "data")
    with pytest.raises(ValueError, match="is not prepared"):
        data.load_spec("docs_tiny", data_dir)
    assert prepare_data.main(["docs_tiny", f"--data_dir={data_dir}"]) == 0
    assert "prepared docs_tiny in" in capsys.readouterr().out
    spec = data.load_spec("docs_tiny", data_dir)
    assert (spec.num_train, spec.num_test, spec.num_classes) == (40, 10, 2)
    assert prepare_data.main(["no_such_dataset", f"--data_dir={data_dir}"]) == 2
    assert "prepare_data: error: Unknown dataset 'no_such_dataset'" in capsys.readouterr().err


# ----------------------------------------------------------------- import tf_codistill, then Keras
_LOAD = """
import sys
{imports}
model = keras.models.load_model(sys.argv[1])
print(type(model).__name__, model.alpha_schedule.alpha)
"""


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    import keras

    from tf_codistill import CodistillModel

    members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name=f"m{i}") for i in range(2)]
    model = CodistillModel(members, alpha=0.5)
    model.compile(optimizer="sgd")
    path = tmp_path_factory.mktemp("docs") / "saved.keras"
    model.save(path)
    return path


@pytest.mark.parametrize(
    "imports",
    ["import tf_codistill\nimport keras", "from tf_codistill import config\nimport tensorflow\nimport keras"],
    ids=["package-then-keras", "submodule-then-tensorflow"],
)
def test_load_model_needs_only_import_tf_codistill(saved_model, imports):
    """README: `keras.models.load_model` works after `import tf_codistill`, also when Keras comes
    later (directly, or inside TensorFlow's own import), in a fresh process. (Keras first:
    tests/test_keras_native.py.)"""
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD.format(imports=imports), str(saved_model)],
        capture_output=True,
        text=True,
        timeout=180,
        env=python_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["CodistillModel", "0.5"]
