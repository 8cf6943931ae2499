"""``ChannelAffine``: ``x * w[c] + b[c]`` per channel, the fused module's form of a 1x1 depthwise conv.

A 1x1 conv with one group per channel is a per-channel affine map.  Fusion
leaves one where a BN and a skip beside it merge (``y + bn(y)``) but cannot
merge further (``y`` is read elsewhere too).  PyTorch runs such a conv through
its general depthwise kernel, 10 to 90 times slower on a CPU than a multiply
and an add (1 x 256 x 14 x 14, one thread: 1.1 ms against 13 us).  The torch
back end writes it as this module, which holds the same weights as parameters;
the fx front end reads it back as that conv (torch.export, tracing its forward,
sees the multiply and the add).
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """``x * weight + bias`` on axis 1 of an N-C-H-W ``x``: ``weight`` and ``bias`` have shape ``(C, 1, 1)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Hold the conv's weight ``(C, 1, 1, 1)`` (and bias ``(C,)``) as ``(C, 1, 1)`` parameters."""
        super().__init__()
        c = weight.shape[0]
        self.weight = nn.Parameter(weight.detach().reshape(c, 1, 1).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().reshape(c, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The affine map, channel by channel."""
        return x * self.weight if self.bias is None else x * self.weight + self.bias

    def extra_repr(self) -> str:
        """The channel count, as a conv shows its shape."""
        return f"{self.weight.shape[0]}, bias={self.bias is not None}"
