"""The bar charts of ``docs/benchmarks.md`` show the tables the page shows.

Each benchmark section (between markers written by the bench scripts) has a
chart under ``docs/img/benchmarks/``, drawn by ``docs/benchmarks_pictures.py``
from the section's table; the bench scripts redraw it when they write the
table (``bench/fastvit_latency.py: write_section``).  Here, without running a
benchmark: every chart is linked from the page, plots exactly the numbers of
its table now (stored in the SVG's description), and is what the script draws
of that table; the table parser and the bench hook are checked on small inputs.
Redraw with ``python docs/benchmarks_pictures.py``.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

import pytest

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img" / "benchmarks"
FIX = "run `python docs/benchmarks_pictures.py` and commit docs/img/benchmarks/"


def _load(name: str, path: Path):
    return load_script(name, path)


@pytest.fixture(scope="module")
def charts():
    return _load("docs_benchmarks_pictures", ROOT / "docs" / "benchmarks_pictures.py")


def svg_texts(svg: str) -> list[str]:
    return sorted(html.unescape(t) for t in re.findall(r"<text\b[^>]*>(.*?)</text>", svg, flags=re.S))


def test_every_section_has_its_chart_linked_after_it(charts):
    text = PAGE.read_text()
    for chart in charts.CHARTS:
        assert charts.section(text, chart.mark), f"docs/benchmarks.md has no {chart.mark} section"
        after = text.split(chart.mark)[2]
        assert f"](img/benchmarks/{chart.name}.svg)" in after.split("<!--")[0], f"{chart.name} chart not linked after {chart.mark}"
        assert (IMG / f"{chart.name}.svg").is_file(), FIX
    assert {p.stem for p in IMG.glob("*.svg")} == {c.name for c in charts.CHARTS}, "charts committed that no section has"


def test_charts_plot_the_tables_of_the_page(charts):
    text = PAGE.read_text()
    stale = []
    for chart in charts.CHARTS:
        data = charts.table(text, chart)
        assert len(data["labels"]) >= 5 and any(v is not None for v in data["series"][0]), chart.name
        if charts.svg_numbers((IMG / f"{chart.name}.svg").read_text()) != data:
            stale.append(chart.name)
    assert not stale, f"charts showing other numbers than their tables ({FIX}): {stale}"


def test_drawing_the_tables_gives_the_committed_charts(charts, tmp_path: Path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the docs extra: pip install -e '.[dev]'")
    text = PAGE.read_text()
    for chart in charts.CHARTS:
        charts.draw(chart, charts.table(text, chart), tmp_path / f"{chart.name}.svg")
        drawn, committed = (tmp_path / f"{chart.name}.svg").read_text(), (IMG / f"{chart.name}.svg").read_text()
        assert svg_texts(drawn) == svg_texts(committed), f"{chart.name}: committed chart out of date ({FIX})"


def test_table_parser_and_header_check(charts):
    zoo = next(c for c in charts.CHARTS if c.name == "zoo")
    header = "| model | family | fused | capture | exact | BN | fx BN | convs | fuse s | check s | train ms | fused/train |"
    page = f"x\n<!-- zoo -->\n{header}\n|---|\n| a | f | yes | fx | 1e-16 | 1 → 0 | 0 | 2 → 2 | 0.1 | 0.0 | 1.0 | 0.85 |\n" \
           "| b | f | no | - | - | - | - | - | - | - | - | - |\n<!-- zoo -->\n"
    assert charts.table(page, zoo) == {"labels": ["a", "b"], "series": [[0.85, None]]}
    with pytest.raises(ValueError, match="fused/train"):
        charts.table(page.replace("fused/train", "ratio"), zoo)


def test_bench_write_section_redraws_the_chart(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is in the docs extra: pip install -e '.[dev]'")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        bench = _load("bench_fastvit_latency_for_charts", ROOT / "bench" / "fastvit_latency.py")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE.read_text())
    mark = "<!-- fastvit_latency -->"
    lines = PAGE.read_text().split(mark)[1].strip("\n").splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| fastvit_"))
    cells = lines[first].split("|")
    cells[4] = " 99.9 "  # the train-time ms column of the first variant
    lines[first] = "|".join(cells)
    body = "\n".join(lines)
    bench.write_section(page, mark, body)
    svg = tmp_path / "img" / "benchmarks" / "fastvit_latency.svg"
    assert svg.is_file() and "chart:" in capsys.readouterr().out
    charts = _load("docs_benchmarks_pictures_2", ROOT / "docs" / "benchmarks_pictures.py")
    assert 99.9 in charts.svg_numbers(svg.read_text())["series"][0]
