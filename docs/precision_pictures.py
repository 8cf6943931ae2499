"""The error plot of ``docs/precision.md``: the page's error table as a bar chart, in units of the dtype's roundoff.

The page computes, per low-precision dtype, the relative error of a folded
RepVGG block against the truth (fold in float64 or in the model's dtype;
weights only, or run in the dtype; and the unfused model) and prints it as a
table, which ``tests/test_docs_examples.py`` keeps equal to what the code
prints.  This script draws that table, each error divided by the unit
roundoff of its dtype (:data:`UNIT_ROUNDOFF`: float16 2^-11, bfloat16 2^-8) so
both dtypes share one linear axis, where 1 is one rounding of the output::

    python docs/precision_pictures.py              # regenerate docs/img/precision/errors.svg
    python docs/precision_pictures.py --out DIR --png

The numbers are read from the page (they are the printed ones) and stored in
the SVG's description, so ``tests/test_docs_precision_plot.py`` checks the
committed picture against the page without computing anything.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # plotted_numbers.py, whether this runs as a script or is loaded by path
from plotted_numbers import save, svg_numbers  # noqa: E402  (svg_numbers: for the tests)
PAGE = HERE / "precision.md"
OUT = HERE / "img" / "precision"
NAME = "errors.svg"
COLUMNS = (
    ("weights only, fold in float64", "#4c72b0", ""),
    ("weights only, fold in the dtype", "#4c72b0", "//"),
    ("run in the dtype, fold in float64", "#dd8452", ""),
    ("run in the dtype, fold in the dtype", "#dd8452", "//"),
    ("run in the dtype, unfused", "#8c8c8c", ""),
)
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
_ROW = re.compile(r"^(float16|bfloat16)((?:\s+\d\.\de[-+]\d+){5})\s*$")


def table_rows(page_text: str) -> dict[str, list[float]]:
    """The page's error table: dtype -> its five errors, in the order of :data:`COLUMNS`."""
    rows = {}
    for line in page_text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            rows[m[1]] = [float(v) for v in m[2].split()]
    return rows


def draw(rows: dict[str, list[float]], path: Path) -> None:
    """Grouped bars per dtype, in unit roundoffs, to ``path`` (.svg with the page's numbers in its description, or .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"svg.fonttype": "none", "svg.hashsalt": "repalgebra", "font.size": 9, "font.family": "DejaVu Sans"}
    with plt.rc_context(style):
        fig, ax = plt.subplots(figsize=(7.2, 3.4), layout="constrained")
        width = 0.16
        dtypes = list(rows)
        for k, (label, color, hatch) in enumerate(COLUMNS):
            xs = [i + (k - 2) * width for i in range(len(dtypes))]
            ax.bar(xs, [rows[d][k] / UNIT_ROUNDOFF[d] for d in dtypes], width, label=label,
                   color="white" if hatch else color, edgecolor=color, hatch=hatch)
        ax.axhline(1.0, color="#444444", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(dtypes)), [f"{d} (unit roundoff 2^{-11 if d == 'float16' else -8})" for d in dtypes])
        ax.set_ylabel("relative error / unit roundoff")
        ax.set_title("Folded RepVGG block: error per dtype (lower is better)")
        ax.set_xlim(-0.5, len(dtypes) - 0.5 + 1.1)  # room for the legend on the right
        ax.legend(frameon=False, fontsize=8, loc="center right")
        ax.spines[["top", "right"]].set_visible(False)
        save(fig, path, rows, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(HERE.parent)})")
    ap.add_argument("--png", action="store_true", help="also write a PNG next to the SVG")
    args = ap.parse_args(argv)
    rows = table_rows(PAGE.read_text())
    if set(rows) != {"float16", "bfloat16"}:
        print(f"{PAGE.name}: expected the float16 and bfloat16 rows of the error table, found {sorted(rows)}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    draw(rows, args.out / NAME)
    if args.png:
        draw(rows, args.out / NAME.replace(".svg", ".png"))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
