"""A study file: TOML read, checked and expanded (grid points), and the
questions every later stage asks of it (a run's flags, folder, base arm).

A study is the dict `load_study` returns: the file's keys with defaults
filled in (`title`, `common`, `contrasts`, `metric`, `select`), `path`, and
`arms` expanded so that each grid point is an arm of its own carrying `_base`
(the label of the arm it came from) and `_point` (its grid values).
"""

from __future__ import annotations

import itertools
import os
import re
import tomllib

from tf_codistill import config, selection, stats
from tf_codistill.study import decision

__all__ = ["load_study", "train_settings", "flags", "effective", "reported_arms", "run_dir"]

# Set by the runner for every run: a study gives `seeds` and `--out` instead.
RUNNER_FLAGS = ("seed", "workdir", "verbose")
STUDY_KEYS = (
    "name",
    "title",
    "expect",
    "seeds",
    "common",
    "arms",
    "baseline",
    "contrasts",
    "target_accuracy",
    "select",
    "metric",
    "decision",
    "walltime",
    "planned",
    "plot_bytes",
)
ARM_KEYS = ("label", "compare_to", "expected", "grid")  # study keys in [[arms]], not train.py flags
SELECT = ("test_accuracy", "train_loss", *selection.SELECT)
# What a study compares: test accuracy (classifiers), or validation NLL in nats
# per token (language models: chosen and compared on validation, test beside it).
METRICS = ("accuracy", "nll")


def check_settings(path: str, where: str, settings: dict) -> None:
    """Each key must be a train.py setting the study may set, with a value that
    setting accepts (tf_codistill/config.py checks both)."""
    for key, value in settings.items():
        if key in ARM_KEYS and where != "[common]":
            continue
        if key in RUNNER_FLAGS:
            raise ValueError(
                f"{path}: {where} sets `{key}`, which the study runner sets for every run; "
                "use `seeds` (and --out) instead."
            )
        if key not in config.SETTINGS:
            raise ValueError(f"{path}: {where} has `{key}`, which is not a train.py flag.")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{path}: {where} `{key}` must be a single value, got {value!r}.")
        try:
            config.check_setting(key, value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {where}: {err}") from None


def value_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _expand_grid(path: str, arm: dict) -> list[dict]:
    """One arm per combination of its `grid` values (or the arm itself)."""
    grid = arm.get("grid")
    base = {k: v for k, v in arm.items() if k != "grid"}
    if grid is None:
        return [{**base, "_base": arm["label"], "_point": {}}]
    where = f"arm {arm['label']!r} grid"
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{path}: {where} must be a table of train.py flags to lists of values.")
    for key, values in grid.items():
        if not isinstance(values, list) or not values or len(set(map(repr, values))) != len(values):
            raise ValueError(f"{path}: {where} `{key}` must be a non-empty list of distinct values.")
        if key in base:
            raise ValueError(f"{path}: {where} `{key}` is also set on the arm; set it in one place.")
        for value in values:
            check_settings(path, where, {key: value})
    arms = []
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        label = arm["label"] + "".join(f"-{k}{value_text(v)}" for k, v in point.items())
        arms.append({**base, **point, "label": label, "_base": arm["label"], "_point": point})
    return arms


def _label_list(path: str, where: str, value, labels) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: {where} must be a non-empty list of arm labels.")
    for label in value:
        if label not in labels:
            raise ValueError(f"{path}: {where} names {label!r}, which is not an arm ({sorted(labels)}).")
    return value


def _check_expected(path: str, where: str, value) -> None:
    if value is not None and value not in stats.EXPECTATIONS:
        raise ValueError(
            f"{path}: {where} `expected` must be one of {list(stats.EXPECTATIONS)}; got {value!r}."
        )


def _arm_labels(path: str, arms) -> list[str]:
    """The arms' labels, each a unique folder name."""
    if not isinstance(arms, list) or not arms or not all(isinstance(arm, dict) for arm in arms):
        raise ValueError(f"{path}: `arms` must be a non-empty array of tables ([[arms]] sections).")
    labels = [arm.get("label") for arm in arms]
    if None in labels or len(set(labels)) != len(labels):
        raise ValueError(f"{path}: every arm needs a unique `label`; got {labels}.")
    if not all(isinstance(label, str) and re.fullmatch(r"[\w.-]+", label) for label in labels):
        raise ValueError(f"{path}: arm labels must be folder names (letters, digits, _ . -); got {labels}.")
    return labels


def _check_arms(path: str, arms: list[dict], labels: list[str], baseline) -> None:
    """Each arm's flags, and what it is compared with."""
    if baseline is not None and baseline not in labels:
        raise ValueError(f"{path}: `baseline` = {baseline!r} is not an arm ({labels}).")
    for arm in arms:
        where = f"arm {arm['label']!r}"
        check_settings(path, where, arm)
        _check_expected(path, where, arm.get("expected"))
        if "compare_to" in arm and arm["compare_to"] not in labels:
            raise ValueError(
                f"{path}: {where} `compare_to` = {arm['compare_to']!r} is not an arm ({labels})."
            )
        if arm.get("compare_to") == arm["label"]:
            raise ValueError(f"{path}: {where} is compared with itself.")
        if "expected" in arm and arm.get("compare_to", baseline) in (None, arm["label"]):
            raise ValueError(f"{path}: {where} has `expected` but no arm to compare with (`compare_to`).")


def _check_contrasts(path: str, contrasts, labels: list[str]) -> None:
    if not isinstance(contrasts, list) or not all(isinstance(c, dict) for c in contrasts):
        raise ValueError(f"{path}: `contrasts` must be an array of tables ([[contrasts]]).")
    for i, item in enumerate(contrasts):
        where = f"contrast {item.get('name', i)!r}"
        if set(item) - {"name", "plus", "minus", "expected"} or not isinstance(item.get("name"), str):
            raise ValueError(f"{path}: {where} takes `name`, `plus`, `minus` and `expected` (name required).")
        _label_list(path, f"{where} `plus`", item.get("plus"), labels)
        _label_list(path, f"{where} `minus`", item.get("minus"), labels)
        _check_expected(path, where, item.get("expected"))


def comparison_names(study: dict) -> list[str]:
    """What `planned` may name: each arm compared with another (its label), then each contrast's name."""
    names = [
        arm["label"]
        for arm in study["arms"]
        if arm.get("compare_to", study.get("baseline")) not in (None, arm["label"])
    ]
    return names + [item["name"] for item in study["contrasts"]]


def _check_planned(path: str, study: dict) -> None:
    """`planned`: the comparisons declared confirmatory before the runs."""
    planned = study.setdefault("planned", [])
    if not isinstance(planned, list) or not all(isinstance(p, str) for p in planned):
        raise ValueError(
            f"{path}: `planned` must be a list of comparison names (arm labels or contrast names)."
        )
    names = comparison_names(study)
    for name in planned:
        if name not in names:
            raise ValueError(
                f"{path}: `planned` names {name!r}, which is no comparison of this study; it can name an "
                f"arm compared with another (`compare_to` or `baseline`) or a contrast: {names}."
            )
    if len(set(planned)) != len(planned):
        raise ValueError(f"{path}: `planned` names a comparison twice: {planned}.")


def load_study(path: str) -> dict:
    """Reads and checks one study file. Raises ValueError naming the problem."""
    with open(path, "rb") as f:
        try:
            study = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from err
    unknown = sorted(set(study) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; a study has {list(STUDY_KEYS)}.")
    for key in ("name", "seeds", "arms"):
        if key not in study:
            raise ValueError(f"{path}: missing `{key}`.")
    name = study["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"{path}: `name` must be a folder name (letters, digits, _ . -); got {name!r}.")
    for key in ("title", "expect"):
        if key in study and not isinstance(study[key], str):
            raise ValueError(f"{path}: `{key}` must be a string.")
    arms = study["arms"]
    labels = _arm_labels(path, arms)
    seeds = study["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"{path}: `seeds` must be a non-empty list of distinct integers >= 0.")
    study.setdefault("title", study["name"])
    study.setdefault("common", {})
    if not isinstance(study["common"], dict):
        raise ValueError(f"{path}: `common` must be a table ([common] section) of train.py flags.")
    check_settings(path, "[common]", study["common"])
    _check_arms(path, arms, labels, study.get("baseline"))
    _check_contrasts(path, study.setdefault("contrasts", []), labels)
    _check_planned(path, study)
    target = study.get("target_accuracy")
    if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"{path}: `target_accuracy` must be a number in (0, 1]; got {target!r}.")
    if not isinstance(study.setdefault("plot_bytes", False), bool):
        raise ValueError(f"{path}: `plot_bytes` must be true or false; got {study['plot_bytes']!r}.")
    study.setdefault("metric", "accuracy")
    if study["metric"] not in METRICS:
        raise ValueError(f"{path}: `metric` must be one of {list(METRICS)}; got {study['metric']!r}.")
    if study["metric"] == "nll" and (target is not None or any("grid" in arm for arm in arms)):
        raise ValueError(f'{path}: metric = "nll" takes no `target_accuracy` and no `[arms.grid]`.')
    decision.check(path, study)
    selection.check(path, study)  # a validation criterion where the dataset has one, else test_accuracy
    if study["select"] not in SELECT:
        raise ValueError(f"{path}: `select` must be one of {list(SELECT)}; got {study['select']!r}.")
    study["arms"] = [expanded for arm in arms for expanded in _expand_grid(path, arm)]
    study["path"] = path
    return study


def train_settings(arm: dict) -> dict:
    """An arm's train.py settings (its study keys and grid bookkeeping left out)."""
    return {k: v for k, v in arm.items() if k not in ARM_KEYS and not k.startswith("_")}


def flags(settings: dict) -> list[str]:
    """train.py's command-line flags for `settings` (an arm, or [common])."""
    return [f"--{key}={value_text(value)}" for key, value in train_settings(settings).items()]


def effective(study: dict, arm: dict, key: str):
    """The value train.py runs `arm` with for setting `key` (its default if unset)."""
    settings = {**study["common"], **train_settings(arm)}
    return settings.get(key, config.SETTINGS[key].default)


def reported_arms(study: dict) -> list[str]:
    """Base labels in file order (a grid arm counts once)."""
    return list(dict.fromkeys(arm["_base"] for arm in study["arms"]))


def arm_flags(arm: dict) -> str:
    return " ".join(flags(arm))


def run_dir(study: dict, arm: dict, seed: int, out: str) -> str:
    """Where one (arm, seed) run of `study` writes, under the study runner's `--out`."""
    return os.path.join(out, study["name"], arm["label"], f"seed{seed}")
