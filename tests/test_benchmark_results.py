"""The benchmarks' append-only result tables keep earlier rows exactly as they were written."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
_results = pytest.importorskip("_results")


def test_earlier_rows_keep_their_text_and_decimals_are_rounded(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_results, "RESULTS", tmp_path)
    # a short hash that reads as a number in scientific notation, and one that reads as an integer
    _results.append_row("t", {"commit": "40761e5", "ips": 95.14601, "images": 678, "note": ""}, "T")
    _results.append_row("t", {"commit": "1234567", "ips": 3.0, "images": 400, "note": "x"}, "T")
    table = _results.append_row("t", {"commit": "abc1234", "ips": 0.5, "images": 1, "note": ""}, "T")
    assert list(table["commit"]) == ["40761e5", "1234567", "abc1234"]
    markdown = (tmp_path / "t.md").read_text().splitlines()
    assert markdown[0] == "# T"
    assert markdown[4] == "| 40761e5 | 95.1460 | 678 |  |"
    assert markdown[5] == "| 1234567 | 3.0000 | 400 | x |"
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "40761e5,95.1460,678,"
