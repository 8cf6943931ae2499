"""``docs/precision.md``'s error plot shows the page's error table.

The page's table is kept equal to what its code prints by
``tests/test_docs_examples.py``; here the committed
``docs/img/precision/errors.svg`` must plot exactly that table (stored in the
SVG's description) and be what ``docs/precision_pictures.py`` draws of it now.
Redraw with ``python docs/precision_pictures.py``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "precision.md"
SVG = ROOT / "docs" / "img" / "precision" / "errors.svg"
FIX = "run `python docs/precision_pictures.py` and commit docs/img/precision/"


def _script():
    return load_script("docs_precision_pictures", ROOT / "docs" / "precision_pictures.py")


def svg_texts(svg: str) -> list[str]:
    return sorted(html.unescape(t) for t in re.findall(r"<text\b[^>]*>(.*?)</text>", svg, flags=re.S))


def test_table_parser():
    rows = _script().table_rows("dtype  a b\nfloat16        1.9e-04        4.5e-04      4.4e-04        5.4e-04     6.5e-04\n")
    assert rows == {"float16": [1.9e-4, 4.5e-4, 4.4e-4, 5.4e-4, 6.5e-4]}


def test_page_shows_the_plot_of_its_table():
    script = _script()
    rows = script.table_rows(PAGE.read_text())
    assert set(rows) == {"float16", "bfloat16"}, f"the error table of docs/precision.md not found: {rows}"
    assert "](img/precision/errors.svg)" in PAGE.read_text()
    assert script.svg_numbers(SVG.read_text()) == rows, f"the plot shows other numbers than the page's table ({FIX})"


def test_drawing_the_table_gives_the_committed_plot(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the docs extra: pip install -e '.[dev]'")
    script = _script()
    rows = script.table_rows(PAGE.read_text())
    script.draw(rows, tmp_path / "e.svg")
    assert svg_texts((tmp_path / "e.svg").read_text()) == svg_texts(SVG.read_text()), f"the committed plot is out of date ({FIX})"
    rows["float16"][0] *= 3  # a different table draws a different picture (the comparison can fail)
    script.draw(rows, tmp_path / "f.svg")
    assert script.svg_numbers((tmp_path / "f.svg").read_text()) != script.svg_numbers(SVG.read_text())
