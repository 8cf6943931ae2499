"""``docs/fastvit.md`` stays in step with the code.

* ``docs/fastvit_pictures.py`` runs, draws exactly the pictures the page shows,
  and the committed SVGs under ``docs/img/fastvit/`` show what it draws now
  (compared by their text: every label of every box; positions are Graphviz's
  business and may differ between its versions);
* the variant table of the page is ``fastvit_models.FASTVIT_CONFIGS``.

The page's Python blocks and its output blocks are checked by
``tests/test_docs_examples.py``.  Redraw the pictures with
``python docs/fastvit_pictures.py``.
"""

from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import fastvit_models

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "fastvit.md"
IMG = ROOT / "docs" / "img" / "fastvit"
FIX = "run `python docs/fastvit_pictures.py` and commit docs/img/fastvit/"


def _load_script():
    return load_script("docs_fastvit_pictures", ROOT / "docs" / "fastvit_pictures.py")


def referenced_pictures() -> set[str]:
    return set(re.findall(r"\]\(img/fastvit/([\w.-]+\.svg)\)", PAGE.read_text()))


def svg_texts(svg: str) -> list[str]:
    """The text of every ``<text>`` element (box labels, title), sorted."""
    return sorted(html.unescape(t) for t in re.findall(r"<text\b[^>]*>(.*?)</text>", svg, flags=re.S))


def test_page_shows_every_committed_picture_and_nothing_else():
    shown = referenced_pictures()
    committed = {p.name for p in IMG.glob("*.svg")}
    assert shown, "docs/fastvit.md shows no picture from img/fastvit/"
    assert not shown - committed, f"pictures shown but not committed ({FIX}): {sorted(shown - committed)}"
    assert not committed - shown, f"committed pictures the page does not show: {sorted(committed - shown)}"


def test_pictures_script_draws_what_is_committed(tmp_path, capsys):
    if shutil.which("dot") is None:
        if os.environ.get("CI"):
            pytest.fail("graphviz `dot` is not installed (CI installs it: apt-get install -y graphviz)")
        pytest.skip("graphviz `dot` is not installed")
    script = _load_script()
    assert script.main(["--out", str(tmp_path)]) == 0
    drawn = {p.name for p in tmp_path.glob("*.svg")}
    assert drawn == referenced_pictures(), "the script draws other pictures than the page shows"
    assert len(capsys.readouterr().out.splitlines()) == len(script.PICTURES)
    stale = [name for name in sorted(drawn) if svg_texts((tmp_path / name).read_text()) != svg_texts((IMG / name).read_text())]
    assert not stale, f"committed pictures out of date ({FIX}): {stale}"


def test_pictures_are_fused_where_the_page_says():
    """The folded pictures show no BatchNorm, and RepMixer and RepCPE are one conv each."""
    script = _load_script()
    built = script.models()
    for pic in script.PICTURES:
        train, fused = script.graphs(pic, built)
        assert "batch_norm" in train.op_counts() or pic.name == "repcpe"
        assert "batch_norm" not in fused.op_counts(), pic.name
        if pic.name in ("repmixer", "repcpe"):
            assert fused.op_counts() == {"conv2d": 1}, pic.name


def _table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in PAGE.read_text().splitlines():
        m = re.match(r"\| `(fastvit_\w+)` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def _ints(cell: str) -> tuple[int, ...]:
    return tuple(int(s) for s in cell.split(","))


def test_variant_table_is_the_config_table():
    rows = _table_rows()
    assert list(rows) == list(fastvit_models.FASTVIT_CONFIGS)
    for name, cfg in fastvit_models.FASTVIT_CONFIGS.items():
        blocks, widths, mlp, mixers, pos, ls = rows[name]
        assert _ints(blocks) == cfg.layers, name
        assert _ints(widths) == cfg.embed_dims, name
        assert float(mlp) == cfg.mlp_ratio, name
        n_rep = cfg.token_mixers.count("repmixer")
        want = f"RepMixer ×{n_rep}" + (", attention" if cfg.token_mixers[-1] == "attention" else "")
        assert cfg.token_mixers == ("repmixer",) * n_rep + ("attention",) * (4 - n_rep), name
        assert mixers == want, name
        want_pos = "none" if cfg.pos_embs == (None,) * 4 else f"RepCPE {cfg.pos_embs[3]}×{cfg.pos_embs[3]} before stage 4"
        assert cfg.pos_embs[:3] == (None,) * 3, name
        assert pos == want_pos, name
        assert float(ls) == cfg.layer_scale_init, name
