"""``ChannelAffine``: a 1x1 depthwise ``nn.Conv2d`` that runs as ``x * w[c] + b[c]``.

A 1x1 conv with one group per channel is a per-channel affine map.  Fusion
leaves one where a BN and a skip beside it merge (``y + bn(y)``) but cannot
merge further (``y`` is read elsewhere too).  PyTorch runs such a conv through
its general depthwise kernel, 10 to 90 times slower on a CPU than a multiply
and an add (1 x 256 x 14 x 14, one thread: 1.1 ms against 13 us).  The torch
back end writes it as this module: a ``Conv2d`` (same parameters, same state
dict, the same architecture as the conv) whose ``forward`` multiplies and adds.
The fx front end reads it back as that conv (torch.export, tracing its forward,
sees the multiply and the add).
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAffine(nn.Conv2d):
    """A ``Conv2d(C, C, 1, groups=C)`` computed as ``x * weight + bias`` on axis 1 of an N-C-H-W ``x``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dilation: tuple[int, int] = (1, 1)) -> None:
        """The conv of ``weight`` ``(C, 1, 1, 1)`` and ``bias`` ``(C,)`` (or none), both copied as parameters;
        ``dilation`` is the conv's (one tap: it changes nothing but the architecture)."""
        c = weight.shape[0]
        super().__init__(c, c, 1, dilation=dilation, groups=c, bias=bias is not None, device="meta", dtype=weight.dtype)
        self.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The affine map, channel by channel."""
        y = x * self.weight[:, 0]
        return y if self.bias is None else y + self.bias[:, None, None]
