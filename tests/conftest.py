"""pytest setup: the repo root on sys.path, and `common` imported before any kernel is defined
(without a GPU that switches Triton to its CPU interpreter)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402,F401


def pytest_report_header(config):
    return common.banner()
