"""``bench/zoo.py`` runs on two zoo models and writes its section: the columns, one row each, the totals line.

Two small models (one with BatchNorms that fold, one where nothing folds), one fuse run, one latency round:
a few seconds.  The full table is ``python bench/zoo.py --write docs/benchmarks.md``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_zoo(monkeypatch):
    """``bench/zoo.py`` as a module named ``bench_zoo`` (``zoo`` is the package tests/zoo/); sys.path restored after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("bench_zoo", ROOT / "bench" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_zoo", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_zoo_bench_table(bench_zoo, tmp_path, capsys):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nIntro.\n")
    body = bench_zoo.main(["--only", "acnet,convmixer", "--repeats", "1", "--rounds", "1", "--write", str(page)])

    assert body in capsys.readouterr().out
    lines = body.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(bench_zoo.COLUMNS)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines if line.startswith("| ") and line is not header}
    assert set(rows) == {"acnet", "convmixer"}
    col = {name: k for k, name in enumerate(bench_zoo.COLUMNS)}
    for cells in rows.values():
        assert len(cells) == len(bench_zoo.COLUMNS)
        assert cells[col["fused"]] == "yes"
        assert cells[col["capture"]] == "fx"
        assert float(cells[col["exact"]]) <= 1e-9
        assert float(cells[col["fuse s"]]) > 0 and float(cells[col["fused/train"]]) > 0
    assert rows["acnet"][col["BN"]] == "12 → 0"  # asymmetric conv-BN branches fold into one conv each
    assert "**Totals:** 2 models, 2 fused, 2 exact" in body

    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nIntro.\n") and text.count(bench_zoo.MARK) == 2 and body in text
