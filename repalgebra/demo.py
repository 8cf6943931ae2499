"""``repalgebra demo``: the main job on a small scale, end to end."""

from __future__ import annotations

import torch

from repalgebra.builder import GraphBuilder
from repalgebra.interpret import run_graph
from repalgebra.rewrite import rewrite


def repmixer_graph(channels: int = 8, size: int = 16, seed: int = 0):
    """A FastViT RepMixer block, ``x + ls * (BN(dwconv(x)) + BN(x) - BN(x))``, with random weights."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731

    def bn(b, x, src):
        return b.batch_norm(x, mean=0.1 * r(channels), var=torch.rand(channels, generator=g) + 0.5, weight=r(channels), bias=r(channels), source=src)

    b = GraphBuilder()
    x = b.input("x", (1, channels, size, size))
    conv = b.conv2d(x, weight=r(channels, 1, 3, 3), padding=(1, 1, 1, 1), groups=channels, source="mixer.conv.conv")
    mixer = b.add(bn(b, conv, "mixer.conv.bn"), bn(b, x, "mixer.skip"), source="mixer")
    y = b.add(x, b.scale(b.sub(mixer, bn(b, x, "norm"), source="mixer"), scale=r(channels), source="layer_scale"), source="")
    return b.build(y)


def run_demo() -> int:
    graph = repmixer_graph()
    print("train-time graph:")
    print(graph)
    fused, report = rewrite(graph)
    print("\nfused graph:")
    print(fused)
    print()
    print(report)
    x = torch.randn(*graph.inputs[0].shape, dtype=torch.float64)
    ref = run_graph(graph.map_params(lambda p, n: p.double()), x)
    err = ((run_graph(fused.map_params(lambda p, n: p.double()), x) - ref).abs().max() / ref.abs().max()).item()
    ok = err <= 1e-6 and fused.op_counts() == {"conv2d": 1}
    print(f"\nmax relative error (float32 weights, float64 run): {err:.2e}  -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1
