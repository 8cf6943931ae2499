"""``docs/train_fold_ship.md`` and its picture stay in step.

The page's Python blocks and output blocks are checked by
``tests/test_docs_examples.py`` (the printed weight-range table is what the
code prints now).  Here: the committed picture
``docs/img/train_fold_ship/weight_ranges.svg`` plots exactly the numbers of
that table (they are stored in the SVG's description), and drawing the table
again gives the same picture text.  No training: the numbers are read from
the page.  Redraw with ``python docs/train_fold_ship_pictures.py``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "train_fold_ship.md"
SVG = ROOT / "docs" / "img" / "train_fold_ship" / "weight_ranges.svg"
FIX = "run `python docs/train_fold_ship_pictures.py` and commit docs/img/train_fold_ship/"


def _load_script():
    return load_script("docs_train_fold_ship_pictures", ROOT / "docs" / "train_fold_ship_pictures.py")


_ROW = re.compile(
    r"^(?P<block>features\.\d+)\s+(?P<max>(?:(?:[\d.]+|-)\s+){3}[\d.]+)\s+"
    r"(?P<t0>[\d.]+) -> (?P<t1>[\d.]+)\s+(?P<c0>[\d.]+) -> (?P<c1>[\d.]+)\s*$"
)


def table_rows(text: str) -> list[dict]:
    """The weight-range table the page prints, as the rows ``weight_ranges`` holds."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            rows.append({
                "block": m["block"],
                "max_abs": [float(v) for v in m["max"].split() if v != "-"],
                "per_tensor": [float(m["t0"]), float(m["t1"])],
                "per_channel": [float(m["c0"]), float(m["c1"])],
            })
    return rows


def svg_texts(svg: str) -> list[str]:
    return sorted(html.unescape(t) for t in re.findall(r"<text\b[^>]*>(.*?)</text>", svg, flags=re.S))


def test_table_parser():
    rows = table_rows(
        "block      max|w|: 3x3    1x1     id folded   int8 error: per tensor        per channel\n"
        "features.0       2.413  2.759      -  4.016         0.0048 -> 0.0078   0.0029 -> 0.0038\n"
        "features.1       0.437  0.837  2.463  2.033         0.0066 -> 0.0246   0.0043 -> 0.0162\n"
    )
    assert rows == [
        {"block": "features.0", "max_abs": [2.413, 2.759, 4.016], "per_tensor": [0.0048, 0.0078], "per_channel": [0.0029, 0.0038]},
        {"block": "features.1", "max_abs": [0.437, 0.837, 2.463, 2.033], "per_tensor": [0.0066, 0.0246], "per_channel": [0.0043, 0.0162]},
    ]


def test_page_shows_the_picture():
    assert "](img/train_fold_ship/weight_ranges.svg)" in PAGE.read_text()
    assert SVG.is_file(), FIX


def test_picture_plots_the_page_table():
    script = _load_script()
    rows = table_rows(PAGE.read_text())
    assert len(rows) == 4, f"expected the 4-block weight-range table on the page, found {rows}"
    assert script.svg_numbers(SVG.read_text()) == rows, f"the picture plots other numbers than the page prints ({FIX})"


def test_drawing_the_table_gives_the_committed_picture(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the docs extra: pip install -e '.[dev]'")
    script = _load_script()
    rows = table_rows(PAGE.read_text())
    script.draw(rows, tmp_path / "w.svg")
    drawn = (tmp_path / "w.svg").read_text()
    assert script.svg_numbers(drawn) == rows
    assert svg_texts(drawn) == svg_texts(SVG.read_text()), f"the committed picture is out of date ({FIX})"
