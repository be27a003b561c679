"""Figures of the reliability suite: every test adds a row (cases tried, faults injected,
load held, errors, memory, losses) and the session writes them to one JSON file.

    RLHF_RELIABILITY_JSON=reliability.json python -m pytest --run-slow tests/reliability
    python tests/reliability/render_table.py reliability.json     # the table of docs/reliability.md

Without RLHF_RELIABILITY_JSON the file goes to the pytest base temp dir; the summary
prints its path and the table.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from reliability_common import ROWS  # noqa: E402
from render_table import render  # noqa: E402


def _out_path(config) -> pathlib.Path:
    if os.environ.get("RLHF_RELIABILITY_JSON"):
        return pathlib.Path(os.environ["RLHF_RELIABILITY_JSON"])
    return pathlib.Path(str(config._tmp_path_factory.getbasetemp())) / "reliability.json"


def pytest_sessionfinish(session, exitstatus):
    if ROWS:
        path = _out_path(session.config)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ROWS, indent=2))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if ROWS:
        terminalreporter.section("reliability figures")
        terminalreporter.write_line(f"written to {_out_path(config)}")
        terminalreporter.write_line(render(ROWS))


@pytest.fixture(scope="session")
def reliability_logs(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("reliability-logs")
