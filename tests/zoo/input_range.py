"""An image model's stem that takes images in 0..255 as well as 0..1, as image wrappers write it.

Shared by the tests of ``export_onnx``'s branches on values.  Its own module, not a test file: pytest rewrites the
``assert`` statements of test files into ``if`` statements, and the export tells an ``assert`` from an ``if``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RangeNormalized(nn.Module):
    """A stem that takes images in 0..255 as well as 0..1 (``if x.max() > 1: x = x / 255``), as image wrappers do;
    ``how="written"`` decides it on a copy made with ``new_zeros`` and written into, ``how="weight"`` on a weight
    (a layer scale switched off at zero), ``how="asserted"`` asserts the range instead, and ``how="caught"``
    catches that assertion's failure to take the other branch."""

    def __init__(self, how: str = "max", c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.head, self.gamma, self.how = nn.Conv2d(c, 4, 1), nn.Parameter(torch.ones(c)), how

    def forward(self, x):
        if self.how == "max" and x.max() > 1.0:
            x = x / 255.0
        if self.how == "written":
            peak = x.new_zeros(1)
            peak[0] = x.max()
            if peak.sum() > 1.0:
                x = x / 255.0
        if self.how == "asserted":
            assert torch.isfinite(x).all(), "images hold no NaN"
        if self.how == "caught":
            try:
                assert x.max() <= 1.0
            except AssertionError:
                x = x / 255.0
        y = F.relu(self.stem(x))
        if self.gamma.abs().sum() > 0:
            y = y * self.gamma.view(1, -1, 1, 1)
        return self.head(y)


class ValueReaders(nn.Module):
    """Small forwards that read their input's values: an ``assert a and b`` of the range, a write into the input
    itself (``x.mul_(2)``), and one that refuses every input."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "both_asserted":
            assert (x > -1e9).all() and (x < 1e9).all(), "values in range"
        elif self.how == "in_place":
            x.mul_(2)
        elif self.how == "raises":
            raise ValueError("refuses every input")
        return x
