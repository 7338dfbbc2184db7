"""Collects one row per fault case and prints the table at the end of the
session; the same table goes to runs/faults/report.md."""

from __future__ import annotations

import dataclasses
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(REPO, "runs", "faults", "report.md")


@dataclasses.dataclass
class Row:
    case: str
    outcome: str
    detection_s: float | None
    data_lost: str
    note: str = ""


ROWS: list[Row] = []


@pytest.fixture
def fault_report():
    """`record(case, outcome, detection_s, data_lost, note="")` adds a row to the report."""

    def record(case, outcome, detection_s, data_lost, note=""):
        ROWS.append(Row(case, outcome, detection_s, data_lost, note))

    return record


def _table() -> list[str]:
    lines = [
        "| case | what the job did | detection (s) | data lost | note |",
        "|---|---|---|---|---|",
    ]
    for r in ROWS:
        seconds = "-" if r.detection_s is None else f"{r.detection_s:.1f}"
        lines.append(f"| {r.case} | {r.outcome} | {seconds} | {r.data_lost} | {r.note} |")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS:
        return
    lines = _table()
    terminalreporter.section("fault-injection report")
    for line in lines:
        terminalreporter.write_line(line)
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT, "w") as f:
        f.write("# Fault-injection report\n\nExpected outcomes: tests/faults/EXPECTED.md\n\n")
        f.write("\n".join(lines) + "\n")
    terminalreporter.write_line(f"written to {os.path.relpath(REPORT, REPO)}")
