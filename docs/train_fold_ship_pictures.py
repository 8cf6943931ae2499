"""The weight-range picture of ``docs/train_fold_ship.md``, drawn from the page's own numbers.

The page trains a network, folds it and prints, per block, the largest ``|w|``
of each train-time branch and of the folded kernel, and the int8 rounding
error before and after folding (``weight_ranges``).  This script runs the
page's Python blocks up to the one that defines ``weight_ranges`` (about 20 s
on one CPU thread) and draws those numbers with matplotlib::

    python docs/train_fold_ship_pictures.py              # regenerate docs/img/train_fold_ship/weight_ranges.svg
    python docs/train_fold_ship_pictures.py --out DIR    # write it somewhere else
    python docs/train_fold_ship_pictures.py --png        # also write a PNG (for looking at it)

The numbers are rounded as the page prints them and stored in the SVG's
description (JSON), so ``tests/test_docs_train_fold_ship.py`` can check the
committed picture against the page's table without training anything, and
draws it again from that table to check the picture is what :func:`draw`
makes of it.  The SVG keeps its text as ``<text>`` (not paths), has no date
and fixed ids, so redrawing the same numbers gives the same file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # plotted_numbers.py, whether this runs as a script or is loaded by path
from plotted_numbers import save, svg_numbers  # noqa: E402  (svg_numbers: for the tests)
PAGE = HERE / "train_fold_ship.md"
OUT = HERE / "img" / "train_fold_ship"
NAME = "weight_ranges.svg"
BRANCHES = ("3x3 branch", "1x1 branch", "identity (BN)", "folded kernel")


def rounded(weight_ranges: list[dict]) -> list[dict]:
    """The rows as the page prints them: max |w| to 3 decimals, errors to 4."""
    return [
        {
            "block": r["block"],
            # The page prints max |w| for 3x3, 1x1, [identity,] folded.
            "max_abs": [round(v, 3) for v in r["max_abs"]],
            "per_tensor": [round(v, 4) for v in r["per_tensor"]],
            "per_channel": [round(v, 4) for v in r["per_channel"]],
        }
        for r in weight_ranges
    ]


def page_weight_ranges(page: Path = PAGE) -> list[dict]:
    """Run the page's Python blocks, in order, until ``weight_ranges`` is defined; return it."""
    import os
    import tempfile

    import torch

    text = page.read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)
    namespace: dict = {"__name__": "train_fold_ship_page"}
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            torch.manual_seed(0)  # as tests/test_docs_examples.py runs the page
            for code in blocks:
                exec(compile(code, str(page), "exec"), namespace)
                if "weight_ranges" in namespace:
                    return namespace["weight_ranges"]
        finally:
            os.chdir(old)
    raise RuntimeError(f"{page.name}: no Python block defines weight_ranges")


def draw(rows: list[dict], path: Path) -> None:
    """Draw the two panels (largest |w| per branch; int8 error before/after folding) to ``path`` (.svg or .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rounded(rows)
    style = {"svg.fonttype": "none", "svg.hashsalt": "repalgebra", "font.size": 9, "font.family": "DejaVu Sans"}
    with plt.rc_context(style):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), layout="constrained")
        x = list(range(len(rows)))
        labels = [r["block"] for r in rows]
        colors = ("#4c72b0", "#55a868", "#c44e52", "#222222")
        width = 0.2
        for k, (branch, color) in enumerate(zip(BRANCHES, colors)):
            xs, ys = [], []
            for i, r in enumerate(rows):
                values = r["max_abs"] if len(r["max_abs"]) == 4 else r["max_abs"][:2] + [None] + r["max_abs"][2:]
                if values[k] is not None:
                    xs.append(i + (k - 1.5) * width)
                    ys.append(values[k])
            left.bar(xs, ys, width, label=branch, color=color)
        left.set_xticks(x, labels)
        left.set_ylabel("largest |w| (BN folded in)")
        left.set_title("Weight range per branch and after folding")
        left.legend(frameon=False, fontsize=8)

        series = (
            ("per_tensor", 0, "train-time branches, per tensor", "#4c72b0", ""),
            ("per_tensor", 1, "folded kernel, per tensor", "#4c72b0", "//"),
            ("per_channel", 0, "train-time branches, per channel", "#dd8452", ""),
            ("per_channel", 1, "folded kernel, per channel", "#dd8452", "//"),
        )
        for k, (key, when, label, color, hatch) in enumerate(series):
            xs = [i + (k - 1.5) * width for i in x]
            right.bar(xs, [r[key][when] for r in rows], width, label=label, color=color if not hatch else "white",
                      edgecolor=color, hatch=hatch)
        right.set_xticks(x, labels)
        right.set_ylabel("int8 rounding error  ||q(K) - K|| / ||K||")
        right.set_title("int8 error of each block's 3x3 kernel")
        right.legend(frameon=False, fontsize=8)
        for ax in (left, right):
            ax.spines[["top", "right"]].set_visible(False)
        save(fig, path, rows, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(HERE.parent)})")
    ap.add_argument("--png", action="store_true", help="also write a PNG next to the SVG")
    args = ap.parse_args(argv)
    rows = page_weight_ranges()
    args.out.mkdir(parents=True, exist_ok=True)
    draw(rows, args.out / NAME)
    if args.png:
        draw(rows, args.out / NAME.replace(".svg", ".png"))
    for r in rounded(rows):
        print(r["block"], r["max_abs"], r["per_tensor"], r["per_channel"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
