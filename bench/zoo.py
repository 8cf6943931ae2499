"""The zoo (``tests/zoo/``): does each model fuse, how was it captured, is it exact, what is left, how fast.

    python bench/zoo.py [--only resnet_basic,swin] [--repeats 3] [--rounds 9] [--threads 1] [--write docs/benchmarks.md]

One row per zoo model (compact models written the way public model libraries
write them; random seeded weights, realistic BatchNorm statistics, eval mode).
How to read the columns:

* **fused**: ``yes``, or ``no:`` and the first line of the error ``repalgebra.fuse`` raised on the
  float32 model (the other columns are then empty); ``yes, but its forward raised`` and the error when
  ``fuse`` returned a model that fails when called again (timed).
* **capture**: how the model itself was captured (``fuse_report.capture``): ``fx`` (``torch.fx``
  symbolic trace), ``specialized`` (``torch.export`` with the shapes fixed at the example input; ``, any
  batch`` where the batch stayed symbolic, ``, batch fixed`` where a part fixes it too) or
  ``kept whole`` (the model's own class, its submodules fused one by one); ``+ N kept whole`` counts the
  submodules kept whole around the capture or inside the model kept whole (``fuse_report.kept_whole``,
  less the model itself): each such part runs its own ``forward`` with its children fused.
* **exact**: the largest relative error of the fused model against the original, both in
  **float64** (the model is ``.double()``-ed and fused with a float64 input, then ``repalgebra.verify``
  compares them on 2 random inputs): a fusion that is algebraically exact shows rounding only, ~1e-16.
  Exact means <= 1e-9 (verify's float64 tolerance); ``fuse raised`` when the float64 fuse failed.
* **BN**: BatchNorm modules before -> after, counted anywhere in the module tree (also inside parts kept
  whole).  **fx BN**: what ``torch.fx.experimental.optimization.fuse`` leaves (it folds a BN into the conv
  right before it, nothing else); ``-`` where ``torch.fx`` cannot trace the model.
* **convs**: ``nn.Conv2d`` and ``nn.Conv3d`` modules (subclasses included) before -> after, anywhere in the tree.
* **fuse s**: seconds for ``repalgebra.fuse`` on the float32 model, the median of ``--repeats`` runs
  (after one warm-up fuse of another model, which pays torch's one-time imports); the runs stop once
  they add up to ``--fuse-budget`` seconds, and the cell then says how many runs it is from.  **check s**:
  the part of it spent checking the captures against the original (``fuse_report.stage_seconds``).
* **train ms**, **fused/train**: eager float32 forward of the train-time model at the entry's input
  shape (batch included), and the fused model's time as a ratio of it: medians of ``--rounds``
  interleaved rounds (``bench/timing.py``), ``--threads`` torch threads.  Below 1 is faster.

Progress goes to stderr, the Markdown section to stdout (and, with ``--write``, between the
``<!-- zoo -->`` markers of that file).  The exit status is 0 even when some models fail: the table is the
result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
# tests/ goes *before* bench/: this file is also called zoo.py, and ``import zoo`` must find the package tests/zoo/.
for _p in (BENCH, TESTS):
    if str(_p) in sys.path:
        sys.path.remove(str(_p))
    sys.path.insert(0, str(_p))

from zoo import ZOO, ZooModel, count_bn, fx_fused_bn_count  # noqa: E402  (first: fastvit_latency puts bench/ first again)

import repalgebra  # noqa: E402
from repalgebra.backend.onnx_fallback import fixed_shape_parts  # noqa: E402
from fastvit_latency import write_section  # noqa: E402
from timing import interleaved_medians, machine  # noqa: E402

MARK = "<!-- zoo -->"
EXACT = 1e-9  # float64 relative error under which a fused model counts as exact
COLUMNS = ("model", "family", "fused", "capture", "exact", "BN", "fx BN", "convs", "fuse s", "check s", "train ms",
           "fused/train")


@dataclass
class Row:
    """The measurements of one zoo model; ``None`` where a measurement could not be made."""

    name: str
    family: str
    error: str = ""  # first line of the float32 fuse's error; empty when it fused
    run_error: str = ""  # first line of the error the fused float32 model raised when timed
    capture: str = ""
    kept_whole: int = 0  # submodules kept whole (not counting the model itself)
    max_rel: float | None = None  # float64 fused vs float64 original
    exact_problem: str = ""  # why there is no max_rel, or what verify found besides it
    bn_before: int = 0
    bn_after: int | None = None
    bn_fx: int | None = None  # None: torch.fx cannot trace the model
    conv_before: int = 0
    conv_after: int | None = None
    fuse_runs: list[float] = field(default_factory=list)
    check_s: float | None = None  # the check stage of the median run
    train_s: float | None = None
    fused_s: float | None = None

    @property
    def fused(self) -> bool:
        return not self.error

    @property
    def exact(self) -> bool:
        return self.max_rel is not None and not self.exact_problem and self.max_rel <= EXACT


def count_conv(model: nn.Module) -> int:
    """``nn.Conv2d`` and ``nn.Conv3d`` modules (subclasses included) anywhere in ``model``."""
    return sum(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in model.modules())


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def example_input(entry: ZooModel, dtype: torch.dtype) -> torch.Tensor:
    """The entry's input, the same values for every run and dtype."""
    return torch.randn(entry.input_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


def warm_up() -> None:
    """Fuse one small model, so the first timed fuse does not pay torch's one-time imports."""
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    repalgebra.fuse(block, torch.randn(1, 3, 16, 16))


def measure(entry: ZooModel, repeats: int, rounds: int, fuse_budget: float) -> Row:
    """One row of the table for ``entry``; any exception lands in the row, never stops the run."""
    model = entry.build()
    row = Row(entry.name, entry.family, bn_before=count_bn(model), conv_before=count_conv(model))
    row.bn_fx = fx_fused_bn_count(model)
    x = example_input(entry, torch.float32)

    fused, stages = None, []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        try:
            fused = repalgebra.fuse(model, x)
        except Exception as e:  # noqa: BLE001 - the table reports any failure
            row.error = first_line(e)
            break
        row.fuse_runs.append(time.perf_counter() - t)
        stages.append(fused.fuse_report.stage_seconds)
        if sum(row.fuse_runs) >= fuse_budget:
            break
    if fused is not None and not row.error:
        report = fused.fuse_report
        row.capture = report.capture
        if any(p.how == "specialized" for p in report.parts):
            row.capture += ", batch fixed" if fixed_shape_parts(fused) else ", any batch"
        row.kept_whole = sum(p.path != "" for p in report.kept_whole)  # the model itself is in ``capture``
        row.bn_after, row.conv_after = count_bn(fused), count_conv(fused)
        row.check_s = stages[row.fuse_runs.index(statistics.median_low(row.fuse_runs))].get("check")
        try:
            with torch.no_grad():
                row.train_s, row.fused_s = interleaved_medians([lambda: model(x), lambda: fused(x)], rounds=rounds)
        except Exception as e:  # noqa: BLE001
            row.run_error = first_line(e)

    model64, x64 = entry.build().double(), example_input(entry, torch.float64)
    try:
        fused64 = repalgebra.fuse(model64, x64)
    except Exception as e:  # noqa: BLE001
        row.exact_problem = "fuse raised" + ("" if row.error else f" ({first_line(e)})")
        return row
    try:
        check = repalgebra.verify(model64, fused64, x64, n=2)
    except Exception as e:  # noqa: BLE001
        row.exact_problem = f"forward raised ({first_line(e)})"
        return row
    row.max_rel = check.max_rel
    row.exact_problem = check.problem or next((o.problem for o in check.outputs if o.problem), "")
    return row


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _exact_cell(r: Row) -> str:
    if r.max_rel is None:
        return r.exact_problem
    rel = "0" if r.max_rel == 0 else f"{r.max_rel:.0e}"
    return f"{rel} ({r.exact_problem})" if r.exact_problem else rel


def _fuse_cell(r: Row, repeats: int) -> str:
    if not r.fuse_runs:
        return ""
    s = f"{statistics.median_low(r.fuse_runs):.2f}"
    return s if len(r.fuse_runs) >= repeats else f"{s} ({len(r.fuse_runs)} run{'s' if len(r.fuse_runs) > 1 else ''})"


def table(rows: list[Row], repeats: int) -> str:
    """The Markdown table, one line per row."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        capture = r.capture + (f" + {r.kept_whole} kept whole" if r.kept_whole else "")
        ratio = f"{r.fused_s / r.train_s:.2f}" if r.fused_s is not None and r.train_s else ""
        cells = [
            r.name,
            r.family,
            ("yes" if not r.run_error else f"yes, but its forward raised {r.run_error}") if r.fused else f"no: {r.error}",
            capture,
            _exact_cell(r),
            f"{r.bn_before} → {r.bn_after}" if r.bn_after is not None else f"{r.bn_before}",
            "-" if r.bn_fx is None else str(r.bn_fx),
            f"{r.conv_before} → {r.conv_after}" if r.conv_after is not None else f"{r.conv_before}",
            _fuse_cell(r, repeats),
            "" if r.check_s is None else f"{r.check_s:.2f}",
            "" if r.train_s is None else f"{r.train_s * 1e3:.1f}",
            ratio,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def totals(rows: list[Row]) -> str:
    """One line: how many fused and how many are exact, BatchNorms left, and torch.fx's fuse where it ran."""
    fused = [r for r in rows if r.fused]
    broken = [r.name for r in fused if r.run_error]
    line = (
        f"**Totals:** {len(rows)} models, {len(fused)} fused"
        + (f" ({len(broken)} of them raise{'s' * (len(broken) == 1)} when called in float32: {', '.join(broken)})"
           if broken else "")
        + f", {sum(r.exact for r in rows)} exact (float64 rel. error "
        f"<= 1e-9); BatchNorms {sum(r.bn_before for r in fused)} → {sum(r.bn_after or 0 for r in fused)} "
        f"over the fused models"
    )
    both = [r for r in fused if r.bn_fx is not None]
    if both:
        line += (
            f"; on the {len(both)} that torch.fx can trace, {sum(r.bn_before for r in both)} → "
            f"{sum(r.bn_after or 0 for r in both)} with repalgebra vs {sum(r.bn_fx or 0 for r in both)} left by "
            f"torch.fx's fuse"
        )
    return line + "."


def section(rows: list[Row], args: argparse.Namespace, seconds: float) -> str:
    """The ``### Zoo`` section: heading, machine, settings, table, totals."""
    return (
        f"### Zoo (`tests/zoo/`, float32 on CPU, exactness in float64)\n\n"
        f"Machine: {machine()}; fuse time the median of {args.repeats} runs (fewer, as marked, once a model's runs "
        f"add up to {args.fuse_budget:g} s); latency medians of {args.rounds} interleaved rounds; the whole run took "
        f"{seconds / 60:.1f} min.\n\n"
        f"{table(rows, args.repeats)}\n\n{totals(rows)}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated zoo model names (default: the whole zoo)")
    p.add_argument("--repeats", type=int, default=3, help="fuse runs per model; the table shows the median")
    p.add_argument("--fuse-budget", type=float, default=3.0,
                   help="stop repeating a model's fuse once its runs took this many seconds")
    p.add_argument("--rounds", type=int, default=9, help="interleaved latency rounds per model")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on shared machines)")
    p.add_argument("--write", type=Path, default=None, help="put the section into this Markdown file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Measure, print the section to stdout (write it with ``--write``) and return it."""
    args = parse_args(argv)
    entries = list(ZOO)
    if args.only:
        by_name = {e.name: e for e in ZOO}
        unknown = [n for n in args.only.split(",") if n not in by_name]
        if unknown:
            raise SystemExit(f"no zoo model {', '.join(unknown)}; known: {', '.join(sorted(by_name))}")
        entries = [by_name[n] for n in args.only.split(",")]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    warm_up()
    rows = []
    for k, entry in enumerate(entries, 1):
        t = time.perf_counter()
        print(f"[{k}/{len(entries)}] {entry.name} ...", end="", file=sys.stderr, flush=True)
        try:
            row = measure(entry, args.repeats, args.rounds, args.fuse_budget)
        except Exception as e:  # noqa: BLE001 - e.g. an entry that does not build: say so, measure the rest
            row = Row(entry.name, entry.family, error=f"(not measured) {first_line(e)}")
        rows.append(row)
        verdict = "fused" if row.fused else f"FAILED: {row.error}"
        verdict += f", FORWARD RAISED: {row.run_error}" if row.run_error else ""
        print(f" {verdict}, exact {_exact_cell(row)}, {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    body = section(rows, args, time.perf_counter() - start)
    print(body, flush=True)
    if args.write:
        write_section(args.write, MARK, body)
    return body


if __name__ == "__main__":
    main()
