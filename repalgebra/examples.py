"""Small example graphs, built by hand with :class:`~repalgebra.builder.GraphBuilder` (tests and docs use them)."""

from __future__ import annotations

import torch

from repalgebra.builder import GraphBuilder


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
