"""When merging branches pays: eager latency of sums of convs, as written, as fused, and as one conv.

    python bench/merge_cost.py [--channels 32] [--size 56] [--rounds 15]

Each block sums convs of one input (stride 1, "same" padding, biases, float32, batch 1, one torch thread):

* ``repvgg``: 3x3 + 1x1 + identity; ``acnet``: 3x3 + 1x3 + 3x1: every branch lies inside the 3x3.
* ``unireplk``: UniRepLKNet's dilated reparam block, depthwise 13x13 + 5x5 (rate 2) + 3x3 (rates 3, 4),
  small kernels summed first: alone they would be a dense 9x9, but the 13x13 absorbs them.
* ``dense+dilated``: 3x3 + 3x3 of rate 2: one dense 5x5, 25 multiply-adds a pixel for 18.
* ``aspp``: DeepLabV2's ASPP, 3x3 convs of rates 6, 12, 18, 24: one dense 49x49.

Columns: the block as written (eval mode), ``repalgebra.fuse`` of it (which merges only where the one conv is
no more work: :func:`repalgebra.match.merge_refusal`), and one conv of the union of all windows, which is
what merging every branch would give (random weights: latency depends on the shape only).  Medians of
interleaved rounds (:func:`timing.interleaved_medians`).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from timing import interleaved_medians  # noqa: E402

import repalgebra  # noqa: E402

#: name -> branches as (kernel, dilation, depthwise); "id" is the identity.
BLOCKS: dict[str, list] = {
    "repvgg": [(3, 1, False), (1, 1, False), "id"],
    "acnet": [(3, 1, False), ((1, 3), 1, False), ((3, 1), 1, False)],
    "unireplk": [(5, 2, True), (3, 3, True), (3, 4, True), (13, 1, True)],
    "dense+dilated": [(3, 1, False), (3, 2, False)],
    "aspp": [(3, 6, False), (3, 12, False), (3, 18, False), (3, 24, False)],
}


class Sum(nn.Module):
    """Parallel branches of one input, summed left to right."""

    def __init__(self, c: int, branches: list) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Identity() if b == "id" else _conv(c, *b) for b in branches)

    def forward(self, x):
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        return y


def _conv(c: int, k, d: int, depthwise: bool) -> nn.Conv2d:
    k = (k, k) if isinstance(k, int) else k
    return nn.Conv2d(c, c, k, padding=tuple(d * (a // 2) for a in k), dilation=d, groups=c if depthwise else 1)


def union_conv(c: int, branches: list) -> nn.Conv2d:
    """One conv spanning every branch's window: what merging them all would give."""
    extent = [1, 1]
    for b in branches:
        if b != "id":
            k, d, _ = b
            k = (k, k) if isinstance(k, int) else k
            extent = [max(e, (a - 1) * d + 1) for e, a in zip(extent, k)]
    step = {b[1] for b in branches if b != "id" and max(b[0] if isinstance(b[0], tuple) else (b[0],)) > 1}
    d = step.pop() if len(step) == 1 else 1
    depthwise = all(b != "id" and b[2] for b in branches)
    return _conv(c, tuple((e - 1) // d + 1 for e in extent), d, depthwise)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    c = args.channels
    x = torch.randn(1, c, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"eager latency, ms ({c} channels, {args.size}x{args.size}, batch 1, 1 thread, medians of {args.rounds} rounds)\n")
    print("| block | convs: written / fused / one | multiply-adds a pixel: written / fused / one | written | fused | one conv |")
    print("|---|---|---|---:|---:|---:|")
    for name, branches in BLOCKS.items():
        torch.manual_seed(0)
        block = Sum(c, branches).eval()
        fused = repalgebra.fuse(block, x)
        one = union_conv(c, branches).eval()
        models = (block, fused, one)
        with torch.no_grad():
            ms = interleaved_medians([lambda m=m: m(x) for m in models], rounds=args.rounds)
        convs = [sum(isinstance(m, nn.Conv2d) for m in model.modules()) for model in models]
        macs = [sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d)) for model in models]
        print(f"| {name} | {' / '.join(map(str, convs))} | {' / '.join(map(str, macs))} | "
              + " | ".join(f"{t * 1e3:.2f}" for t in ms) + " |")


if __name__ == "__main__":
    main()
