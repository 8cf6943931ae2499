"""Bar charts of the benchmark tables of ``docs/benchmarks.md``, drawn from the tables themselves.

Each table is written by a bench script between two markers (``<!-- zoo -->``...);
the script's ``write_section`` (``bench/fastvit_latency.py``, used by all of
them) calls :func:`redraw` after writing, so a fresh table comes with a fresh
chart.  By hand::

    python docs/benchmarks_pictures.py              # redraw every chart into docs/img/benchmarks/
    python docs/benchmarks_pictures.py --png --out /tmp/charts

A chart plots one or two columns of its table (chosen by position; the header
names are checked) and stores the plotted numbers in the SVG's description, so
``tests/test_docs_benchmarks_plots.py`` checks each committed chart against the
table the page shows now.  Each picture is linked right after its section's
closing marker, outside the part the bench scripts rewrite.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # plotted_numbers.py, whether this runs as a script or is loaded by path
from plotted_numbers import save, svg_numbers  # noqa: E402  (svg_numbers: for the tests)
PAGE = HERE / "benchmarks.md"
IMG = "img/benchmarks"


class Chart(NamedTuple):
    mark: str  # the section's marker in the page
    name: str  # file stem under img/benchmarks/
    columns: tuple[tuple[int, str, str], ...]  # (column index, header it must have, legend label)
    axis: str  # value axis label
    title: str
    reference: float | None = None  # a line at this value (ratio charts: 1)


CHARTS = (
    Chart("<!-- fastvit_latency -->", "fastvit_latency",
          ((3, "train-time ms", "train-time model"), (4, "fused ms", "fused (repalgebra.fuse)")),
          "ms per image, eager PyTorch (lower is better)", "FastViT on CPU: latency before and after fusing"),
    Chart("<!-- onnx_latency -->", "onnx_latency",
          ((2, "1 thread: ours ms", "repalgebra.export_onnx"), (3, "fused ms", "torch.onnx.export, same fused module"),
           (4, "train-time ms", "torch.onnx.export, train-time model")),
          "ms per image, onnxruntime, 1 thread (lower is better)", "FastViT in onnxruntime: our export vs torch.onnx.export"),
    Chart("<!-- onnx_zoo -->", "onnx_zoo",
          ((6, "ratio", "torch.onnx time / ours"),),
          "torch.onnx.export's time / ours (above 1: ours is faster)", "Zoo in onnxruntime: our export vs torch.onnx.export", 1.0),
    Chart("<!-- zoo -->", "zoo",
          ((11, "fused/train", "fused / train-time latency"),),
          "fused latency / train-time latency, eager (below 1: fused is faster)", "Zoo: eager latency after fusing", 1.0),
)


def section(page_text: str, mark: str) -> str:
    """The text between a section's two markers ('' when the page has no such section)."""
    parts = page_text.split(mark)
    return parts[1] if len(parts) >= 3 else ""


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _number(cell: str) -> float | None:
    m = re.match(r"^([-+]?\d+(?:\.\d+)?)x?$", cell.strip())
    return float(m[1]) if m else None


def table(page_text: str, chart: Chart) -> dict:
    """The numbers a chart plots: ``{"labels": [...], "series": [[...], ...]}`` (``None`` where a cell has none).

    Raises ``ValueError`` if the section has no table or its header does not name the columns the chart expects.
    """
    lines = [line for line in section(page_text, chart.mark).splitlines() if line.strip().startswith("|")]
    if len(lines) < 3:
        raise ValueError(f"{chart.mark}: no table in the section")
    header = _cells(lines[0])
    for index, name, _ in chart.columns:
        if index >= len(header) or header[index] != name:
            raise ValueError(f"{chart.mark}: column {index} is {header[index:index + 1]}, the chart expects {name!r}")
    rows = [_cells(line) for line in lines[2:]]
    return {
        "labels": [r[0] for r in rows],
        "series": [[_number(r[index]) if index < len(r) else None for r in rows] for index, _, _ in chart.columns],
    }


def draw(chart: Chart, data: dict, path: Path) -> None:
    """Draw one chart to ``path`` (.svg with ``data`` in its description, or .png).

    Two or three columns: grouped vertical bars per row.  One column (a ratio per zoo
    model): one row per model, a dot at its value joined to the reference line
    (1: as fast), so what stands out is how far each model is from it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"svg.fonttype": "none", "svg.hashsalt": "repalgebra", "font.size": 9, "font.family": "DejaVu Sans"}
    colors = ("#4c72b0", "#dd8452", "#8c8c8c")
    labels = data["labels"]
    with plt.rc_context(style):
        if len(chart.columns) > 1:
            fig, ax = plt.subplots(figsize=(8.0, 3.4), layout="constrained")
            width = 0.76 / len(chart.columns)
            for k, ((_, _, legend), values) in enumerate(zip(chart.columns, data["series"])):
                xs = [i + (k - (len(chart.columns) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
                ax.bar(xs, [v for v in values if v is not None], width, label=legend, color=colors[k])
            ax.set_xticks(range(len(labels)), labels)
            ax.set_ylabel(chart.axis)
            ax.legend(frameon=False)
        else:
            values = data["series"][0]
            fig, ax = plt.subplots(figsize=(8.0, 0.8 + 0.17 * len(labels)), layout="constrained")
            ys = list(range(len(labels)))[::-1]
            shown = [(y, v) for y, v in zip(ys, values) if v is not None]
            ref = chart.reference if chart.reference is not None else 0.0
            ax.hlines([y for y, _ in shown], ref, [v for _, v in shown], color=colors[0], linewidth=1.5)
            ax.plot([v for _, v in shown], [y for y, _ in shown], "o", color=colors[0], markersize=4)
            for y, v in zip(ys, values):
                if v is None:
                    ax.text(ref, y, " no measurement", va="center", fontsize=7, color="#888888")
            ax.set_yticks(ys, labels, fontsize=7)
            ax.set_ylim(-0.7, len(labels) - 0.3)
            ax.set_xlabel(chart.axis)
            if chart.reference is not None:
                ax.axvline(chart.reference, color="#444444", linewidth=0.8, linestyle=":")
            ax.grid(axis="x", color="#dddddd", linewidth=0.6)
            ax.set_axisbelow(True)
        ax.set_title(chart.title)
        ax.spines[["top", "right"]].set_visible(False)
        save(fig, path, data, dpi=110)


def redraw(page: Path = PAGE, mark: str | None = None, out: Path | None = None, png: bool = False) -> list[Path]:
    """Redraw the charts of ``page`` (only the one of section ``mark`` if given) into ``out`` (default: next to the page)."""
    out = out or page.parent / IMG
    out.mkdir(parents=True, exist_ok=True)
    text = page.read_text()
    written = []
    for chart in CHARTS:
        if (mark is not None and chart.mark != mark) or not section(text, chart.mark):
            continue
        data = table(text, chart)
        for suffix in (".svg", ".png") if png else (".svg",):
            draw(chart, data, out / f"{chart.name}{suffix}")
            written.append(out / f"{chart.name}{suffix}")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--page", type=Path, default=PAGE)
    ap.add_argument("--out", type=Path, help=f"output folder (default: {IMG} next to the page)")
    ap.add_argument("--png", action="store_true", help="also write PNGs")
    args = ap.parse_args(argv)
    for p in redraw(args.page, out=args.out, png=args.png):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
