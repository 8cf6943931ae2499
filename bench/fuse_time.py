"""Time ``repalgebra.fuse`` on a 100-block RepVGG-style network, and the fused/unfused forward latency.

    python bench/fuse_time.py [--blocks 100] [--channels 32] [--size 32] [--batch 1]
    python bench/fuse_time.py --scale [--runs 3]     # 100..1600 blocks, width 8, 8x8: is fuse linear?
    python bench/fuse_time.py --fastvit fastvit_sa12 [--runs 3]   # one variant at 256x256, 1 thread

Each block is ``ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))`` (700 traced
nodes for 100 blocks).  The fuse time is the median of a few runs after one
warm-up fuse (the very first fuse in a process also pays one-time imports
inside torch, printed separately).  Latencies are medians of interleaved runs
(``bench/timing.py``).  Target: fusing 100 blocks in under 1 s on 2 cores.

``--scale``: fuse 100, 200, 400, 800 and 1600 blocks (width 8, 8x8 input) and
print each stage's seconds (capture, rewrite, build, check; the total includes
the private copy of the model the check compares against), the median of
``--runs`` fuses per size after one warm-up, with the growth per doubling.
Target: each doubling at most 2.3x, 1600 blocks at most 4x the time of 400.

``--fastvit NAME``: the fuse of one FastViT variant at 256x256 with one torch thread, the least wall-clock and
CPU seconds of ``--runs`` fuses after a warm-up, and the check's share: run it in two checkouts back to back to
compare builds (a shared machine moves one run by a third).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians, machine  # noqa: E402

import repalgebra  # noqa: E402


def conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    """Conv (no bias) + BN, as RepVGG writes its branches."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN + BN identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        """Create the block."""
        super().__init__()
        self.dense = conv_bn(channels, channels, 3)
        self.pointwise = conv_bn(channels, channels, 1)
        self.identity = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the three branches and apply ReLU."""
        return self.act(self.dense(x) + self.pointwise(x) + self.identity(x))


def network(blocks: int, channels: int) -> nn.Sequential:
    """``blocks`` RepVGG blocks in a row, with random BN statistics, in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(*(RepVGGBlock(channels) for _ in range(blocks)))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    # Branch gains below 1 keep the activations of order 1 through 1600 blocks; with the gains above
    # alone they overflow float32 after about 650 blocks, and the check would compare inf and NaN.
    with torch.no_grad():
        for block in net:
            block.dense[1].weight.mul_(0.25)
            block.pointwise[1].weight.mul_(0.25)
            block.identity.weight.mul_(0.7)
    return net.eval()


SCALE_BLOCKS = (100, 200, 400, 800, 1600)
STAGES = ("capture", "rewrite", "build", "check")


def scale_table(runs: int, blocks: tuple[int, ...] = SCALE_BLOCKS, channels: int = 8, size: int = 8) -> str:
    """Fuse ``blocks`` RepVGG blocks at each size; a table of stage seconds (medians) and growth per doubling."""
    x = torch.randn(1, channels, size, size)
    repalgebra.fuse(network(2, channels), x)  # warm-up: one-time imports inside torch
    rows = []
    for n in blocks:
        model = network(n, channels)
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            fused = repalgebra.fuse(model, x)
            total = time.perf_counter() - t
            samples.append({**{k: fused.fuse_report.stage_seconds.get(k, 0.0) for k in STAGES}, "total": total})
        rows.append((n, {k: statistics.median(s[k] for s in samples) for k in (*STAGES, "total")}))
        print(f"  {n} blocks: total {rows[-1][1]['total']:.2f} s", file=sys.stderr, flush=True)
    cols = (*STAGES, "total")
    lines = ["| blocks | " + " | ".join(f"{c} s" for c in cols) + " | total / previous |", "|---:|" + "---:|" * (len(cols) + 1)]
    for k, (n, med) in enumerate(rows):
        growth = f"{med['total'] / rows[k - 1][1]['total']:.2f}x" if k else "-"
        lines.append(f"| {n} | " + " | ".join(f"{med[c]:.2f}" for c in cols) + f" | {growth} |")
    by = dict(rows)
    if 400 in by and 1600 in by:
        lines.append(f"\n1600 / 400 blocks: {by[1600]['total'] / by[400]['total']:.2f}x (target <= 4x)")
    return "\n".join(lines)


def fastvit_time(name: str, runs: int) -> str:
    """The least wall-clock and CPU seconds of ``runs`` fuses of FastViT ``name`` at 256x256 (one torch thread,
    after a warm-up), with the check's seconds in that fuse."""
    import fastvit_models

    model, x = fastvit_models.create_model(name).eval(), torch.randn(1, 3, 256, 256)
    repalgebra.fuse(model, x)
    best = None
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        fused = repalgebra.fuse(model, x)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or cpu < best[1]:
            best = (wall, cpu, fused.fuse_report.stage_seconds["check"])
    return f"{name}: fuse {best[0]:.2f} s ({best[1]:.2f} s CPU), check {best[2]:.2f} s; least of {runs}"


def main(argv: list[str] | None = None) -> int:
    """Print fuse time and latency ratio; exit 1 if the fused model disagrees with the original."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=100)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--scale", action="store_true", help="stage times for 100..1600 blocks (width 8, 8x8)")
    p.add_argument("--fastvit", help="fuse time of this FastViT variant at 256x256, 1 thread")
    args = p.parse_args(argv)
    if args.fastvit:
        torch.set_num_threads(1)
        print(machine())
        print(fastvit_time(args.fastvit, args.runs))
        return 0
    if args.scale:
        print(machine())
        print(f"fuse of N RepVGG blocks, 8 channels, input 1x8x8x8; medians of {args.runs} fuses per size")
        print(scale_table(args.runs))
        return 0

    print(machine())
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    t = time.perf_counter()
    repalgebra.fuse(network(2, args.channels), x)  # warm-up: one-time imports inside torch
    first = time.perf_counter() - t

    model = network(args.blocks, args.channels)
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        fused = repalgebra.fuse(model, x)
        times.append(time.perf_counter() - t)
    fuse_s = statistics.median(times)
    report = fused.fuse_report
    print(f"network: {args.blocks} RepVGG blocks, {args.channels} channels, input {tuple(x.shape)}")
    print(f"ops: {report.ops_before} -> {report.ops_after}")
    print(f"fuse time: {fuse_s:.3f} s (median of {args.runs}; first fuse in the process {first:.2f} s incl. imports)")
    print("  stages: " + ", ".join(f"{k} {v:.3f} s" for k, v in report.stage_seconds.items()))

    with torch.no_grad():
        unfused_s, fused_s = interleaved_medians([lambda: model(x), lambda: fused(x)], rounds=15)
    print(f"forward latency: unfused {unfused_s * 1e3:.2f} ms, fused {fused_s * 1e3:.2f} ms, "
          f"ratio fused/unfused {fused_s / unfused_s:.3f}")
    check = repalgebra.verify(model, fused, x, n=1)
    print(f"check: max relative error {check.max_rel:.1e} (float32) -> {'ok' if check else 'FAIL'}")
    return 0 if check else 1


if __name__ == "__main__":
    sys.exit(main())
