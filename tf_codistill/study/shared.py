"""Runs and comparisons that several studies report: the runner copies a run
whose flags and seed equal a finished run of another study (execute), so two
studies' arms can be the very same runs. Each set of runs is reported once, by
the first study (in the order the studies run: file name) that has it; the
others refer to it, and a comparison of the same run sets in a later study is
a repeat of the first, not a new finding. Pure: study files and CSV rows."""

from __future__ import annotations

from tf_codistill.study.execute import run_key
from tf_codistill.study.spec import train_settings

__all__ = ["Shared", "run_set"]


def run_set(study: dict, arm: dict) -> tuple[str, ...]:
    """What makes two arms the same runs: each seed's `execute.run_key`."""
    settings = {**study["common"], **train_settings(arm)}
    return tuple(run_key({**settings, "seed": seed}) for seed in study["seeds"])


class Shared:
    """The first study/arm of every set of runs, and the first study of every
    comparison of the same run sets, over `studies` in their run order."""

    def __init__(self, studies: list[dict]):
        self.first_runs: dict[tuple, str] = {}
        for study in studies:
            for arm in study["arms"]:
                self.first_runs.setdefault(run_set(study, arm), f"{study['name']}/{arm['label']}")
        self.first_comparison: dict[tuple, str] = {}

    def _arm(self, study: dict, label: str) -> dict:
        return next(arm for arm in study["arms"] if arm["label"] == label)

    def canonical(self, study: dict, label: str) -> str:
        """The first study/arm with the same runs as `label` (itself if none)."""
        return self.first_runs.get(run_set(study, self._arm(study, label)), f"{study['name']}/{label}")

    def same_runs(self, study: dict, label: str) -> str | None:
        """The earlier study/arm whose runs these are, or None."""
        first = self.canonical(study, label)
        return None if first == f"{study['name']}/{label}" else first

    def identity(self, study: dict, item) -> tuple:
        """A comparison up to its sign: its outcome and (arm runs, coefficient) terms."""
        terms = sorted((self.canonical(study, label), c) for label, c in zip(item.labels, item.coefficients))
        flipped = sorted((name, -c) for name, c in terms)
        return (item.key, tuple(min(terms, flipped)))

    def add(self, study: dict, items) -> None:
        """Registers `study`'s comparisons (call in run order)."""
        for item in items:
            self.first_comparison.setdefault(self.identity(study, item), f"{study['name']}: {item.name}")

    def repeat_of(self, study: dict, item) -> str | None:
        """The first comparison of the same run sets in another study (or earlier in this one), or None."""
        first = self.first_comparison.get(self.identity(study, item))
        return None if first in (None, f"{study['name']}: {item.name}") else first
