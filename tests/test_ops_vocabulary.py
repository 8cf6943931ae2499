"""The common vision vocabulary (``repalgebra/ops.py``): the ops public models use between their foldable regions.

One small module per op (or family of ops), written the way model code writes it, after a conv + BN stem.  For each:

* both front ends map it: ``torch.fx`` (``trace``) and ``torch.export`` (``capture_export``) give a graph with the
  op and without opaque nodes, and the exported graph computes the module (float64, relative 1e-12);
* ``repalgebra.fuse`` folds the stem's BN and equals the module in float64 (relative 1e-12), at the example input
  and at a second one of that shape;
* the op's ONNX lowering (no fallback) runs in onnxruntime and equals the float32 module (relative 1e-5) at
  opsets 13, 17 and 20, at batch 1 and 3, and emits the ONNX ops it should.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra
from repalgebra.backend.onnx import export_onnx
from repalgebra.frontend.aten import capture_export
from repalgebra.frontend.torch import trace
from repalgebra.interpret import run_graph
from repalgebra.ops import OPS

D = torch.float64
OPSETS = (13, 17, 20)


class Stem(nn.Sequential):
    """conv + BN (the BN must fold into the conv whatever follows)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))


class Lambda(nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def stem(op: nn.Module | Callable, cin: int = 3, c: int = 4) -> nn.Module:
    return nn.Sequential(Stem(cin, c), op if isinstance(op, nn.Module) else Lambda(op))


# --------------------------------------------------------------------------- modules written as model code writes them


class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's ``LayerNorm(data_format="channels_first")``: mean, ``pow``, ``sqrt``, ``/``, weight and bias by indexing."""

    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Slopes(nn.Module):
    """``nn.PReLU`` with a slope per channel, then one for all, then ``F.prelu`` with a slope per channel
    (MobileFaceNet, ESPNet), on the feature map or on ``(N, C, HW)`` tokens."""

    def __init__(self, c: int, tokens: bool = False) -> None:
        super().__init__()
        self.per_channel, self.shared, self.tokens = nn.PReLU(c), nn.PReLU(), tokens
        self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, c))
        with torch.no_grad():
            self.per_channel.weight.copy_(torch.linspace(0.1, 0.9, c))

    def forward(self, x):
        y = self.shared(self.per_channel(x - 0.25))
        return F.prelu(y.flatten(2) if self.tokens else y, self.weight)


class DepthwiseUp(nn.Module):
    """A learned 2x upsampling written with ``F.conv_transpose2d`` (one 2x2 kernel per channel)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.groups = nn.Parameter(torch.rand(c, 1, 2, 2)), c

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, stride=2, groups=self.groups)


class TemporalConv(nn.Module):
    """A video model's temporal depthwise conv written with ``F.conv3d`` (R(2+1)D, X3D): ``'same'`` in time only."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.groups = nn.Parameter(torch.randn(c, 1, 3, 1, 1) / 3**0.5), c

    def forward(self, x):
        return F.conv3d(x, self.weight, None, 1, "same", 1, self.groups)


class Transposed3d(nn.Module):
    """A volume decoder's learned upsampling written with ``F.conv_transpose3d``: 2x in height and width with an
    output padding past the scatter (a bias-free row and column), a cropped 3-tap kernel in depth, grouped."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, 1, 3, 2, 2) / 3)

    def forward(self, x):
        return F.conv_transpose3d(x, self.weight, stride=(1, 2, 2), padding=(1, 0, 0), output_padding=(0, 1, 1),
                                  groups=self.weight.shape[0])


class RsqrtNorm(nn.Module):
    """``x * torch.rsqrt(var + eps)``, ``/ 6.``, ``1 - x``, a positional embedding added, an SE gate."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, c, 1, 6))
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        var = (x * x).mean((2, 3), keepdim=True)
        y = x * torch.rsqrt(var + 1e-5) + self.pos
        gate = self.fc(y.mean((2, 3), keepdim=True)).sigmoid()
        return (1 - y) * gate / 6.0 + (x - 0.5).sum(1, keepdim=True)


class FPNTopDown(nn.Module):
    """FPN's ``F.interpolate(top, size=lateral.shape[-2:])`` (and ``h, w = lateral.shape[-2:]``, ``size=(h, w)``) and
    YOLO's ``nn.Upsample(scale_factor=2)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        top = self.down(x)
        h, w = x.shape[-2:]
        return x + F.interpolate(top, size=x.shape[-2:], mode="nearest") - F.interpolate(top, size=(h, w)), self.up(top)


class Bilinear(nn.Module):
    def forward(self, x):
        a = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        b = F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True)
        c = F.interpolate(x, size=(7, 11), mode="nearest-exact")
        return a, b, c


class Slicing(nn.Module):
    """DPN's ``x[:, :c]``/``x[:, c:]``, ACNet's crop ``x[:, :, 1:-1, :]``, ``x[..., ::2]``, ``x[:, 0]``, ``x[:, None]``."""

    def forward(self, x):
        a, b = x[:, :2], x[:, 2:]
        crop = x[:, :, 1:-1, :]
        return a * b, crop[..., ::2], x[:, 0][:, None] + x[:, 1:3]


class Splits(nn.Module):
    """``a, b = x.chunk(2, dim=1)`` (CoAtNet), ``x.split([1, 3], 1)`` (LeViT, EfficientFormer), ``torch.split(x, 3, 1)``, ``unbind``."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        c, d = x.split([1, 3], 1)
        e, f = torch.split(x, 3, dim=1)
        g, h, i, j = x.unbind(1)
        return a * b, torch.cat([d, c], 1) + torch.cat([f, e], 1), g * h - i + j


class Shifts(nn.Module):
    """Swin's cyclic shift, ``torch.roll(x, shifts=(-s, -s), dims=(1, 2))`` on a channels-last map, and back."""

    def forward(self, x):
        y = torch.roll(x.permute(0, 2, 3, 1), shifts=(-2, -1), dims=(1, 2))
        return torch.roll(y * 2, shifts=(2, 1), dims=(1, 2)).permute(0, 3, 1, 2) + x.roll(1, 3)


class Shuffles(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.up = nn.PixelShuffle(2)
        self.conv = nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return F.pixel_unshuffle(self.conv(self.up(x)), 2)


class Products(nn.Module):
    """``torch.einsum`` that is a batched matrix product, one that is not, and ``torch.bmm``."""

    def forward(self, x):
        t = x.flatten(2)
        gram = torch.einsum("bchw,bdhw->bcd", x, x)
        swapped = torch.einsum("bchw->bhwc", x)
        return gram + torch.bmm(t, t.transpose(1, 2)), swapped


class Attention(nn.Module):
    """ViT attention with ``F.scaled_dot_product_attention``: plain, with an additive bias (CoAtNet), causal with a scale."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(heads, 1, 1))

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        B, N, _ = t.shape
        q, k, v = self.qkv(t).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        mask = (q @ k.transpose(-2, -1)) * self.bias
        a = F.scaled_dot_product_attention(q, k, v)
        b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        c = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
        return a + b + c


class GroupedQueryAttention(nn.Module):
    """Llama's grouped-query attention as torchtitan and transformers' SDPA path write it: 4 query heads over 2 key
    and value heads, ``enable_gqa=True`` (it went to torch.onnx.export, which cannot write it; review R10); and 4
    query heads over 2 key heads and 1 value head, which torch takes too (review R11)."""

    def __init__(self, dim: int = 8, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * kv_heads * (dim // heads))
        self.v1 = nn.Linear(dim, dim // heads)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        B, N, C = t.shape
        q = self.q(t).reshape(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(t).reshape(B, N, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        b = F.scaled_dot_product_attention(q, k, self.v1(t)[:, None], enable_gqa=True)  # one value head
        return (a + b).transpose(1, 2).reshape(B, N, C)


class Pads(nn.Module):
    """Swin's ``F.pad(x, (0, 0, 0, pad_r, 0, pad_b))`` on a channels-last map, reflection and replication pads."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.ReflectionPad2d(1)
        self.replicate = nn.ReplicationPad2d((1, 0, 2, 1))

    def forward(self, x):
        cl = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, 2, 0, 1)).permute(0, 3, 1, 2)
        return cl, self.reflect(x), self.replicate(x)


class SliceAssign(nn.Module):
    """GhostNet's ``out[:, :c] = ...`` after ``torch.cat``, written functionally: ``torch.slice_scatter``."""

    def forward(self, x):
        return torch.slice_scatter(x, x[:, 1:3].sigmoid(), dim=1, start=0, end=2)


class TableBias(nn.Module):
    """Swin/CoAtNet's ``table[index].view(...).permute(2, 0, 1).unsqueeze(0)`` as an SDPA mask, and ViTDet/MViTv2's
    ``torch.einsum("bhwc,hkc->bhwk", r_q, Rh)`` with a relative-position table: constants the ops read as values."""

    def __init__(self, c: int = 4, h: int = 3, w: int = 4) -> None:
        super().__init__()
        n = h * w
        self.table = nn.Parameter(torch.randn(2 * n, 1))
        self.register_buffer("index", torch.randint(0, 2 * n, (n * n,)))
        self.rel = nn.Parameter(torch.randn(h, 5, c))
        self.n = n

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C)
        bias = self.table[self.index].view(self.n, self.n, 1).permute(2, 0, 1).unsqueeze(0)
        a = F.scaled_dot_product_attention(t, t, t, attn_mask=bias)
        r = torch.einsum("bhwc,hkc->bhwk", x.permute(0, 2, 3, 1), self.rel)
        return a, r


class ConformerConv(nn.Module):
    """Conformer's convolution module on the stem's map read as a sequence (pointwise Conv1d, ``nn.GLU`` over the
    channels, depthwise Conv1d, BatchNorm1d, SiLU), an upsampling ConvTranspose1d + BatchNorm1d (a TasNet decoder),
    a ``F.glu`` over the time axis and ``log_softmax`` heads (CTC), as function, method and module."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.pointwise, self.glu = nn.Conv1d(c, 2 * c, 1), nn.GLU(dim=1)
        self.depthwise, self.norm = nn.Conv1d(c, c, 3, padding=1, groups=c), nn.BatchNorm1d(c)
        self.up, self.up_norm = nn.ConvTranspose1d(c, c, 4, stride=2, padding=1, output_padding=1, groups=2), nn.BatchNorm1d(c)
        self.head = nn.LogSoftmax(dim=1)

    def forward(self, x):
        y = F.silu(self.norm(self.depthwise(self.glu(self.pointwise(x.flatten(2))))))
        z = self.up_norm(self.up(y))
        return self.head(z), F.log_softmax(F.glu(y, -1), dim=-1), z.log_softmax(1)


class AnchorGrid(nn.Module):
    """YOLOv7's IDetect decode: ``(y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]``, a constant that changes along more
    than one axis (anchors and box coordinates), here times the map itself and times its 5-D view."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("grid", torch.rand(1, 4, 5, 6) + 0.5)
        self.register_buffer("anchor_grid", torch.rand(1, 2, 1, 1, 6) * 4)

    def forward(self, x):
        b, c, h, w = x.shape
        return x * self.grid, x.sigmoid().view(b, 2, 2, h, w) * self.anchor_grid


class Norms(nn.Module):
    """Cosine attention and normalized heads (SwinV2, CLIP, ArcFace): ``F.normalize``, ``x.norm(dim=-1,
    keepdim=True)``, ``torch.linalg.vector_norm`` of other orders, ``x.abs().amax(...)`` (a max-abs scale)."""

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        q = F.normalize(t, dim=-1)
        k = t / t.norm(dim=-1, keepdim=True)
        return (q @ k.transpose(-2, -1), torch.norm(t, p=1, dim=1), torch.linalg.vector_norm(t, ord=3, dim=(1, 2)),
                torch.linalg.vector_norm(x, float("inf"), dim=1), x / x.abs().amax(dim=(2, 3), keepdim=True), abs(x).amax())


class Expands(nn.Module):
    def forward(self, x):
        g = x.mean((2, 3), keepdim=True)
        return g.expand_as(x) * x + g.expand(-1, -1, 5, 5)


# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    ops: set[str]  # ops both front ends must make
    onnx: Callable[[int], set[str]] = lambda opset: set()  # ONNX op types the export must contain at an opset
    fx_ops: set[str] = field(default_factory=set)  # only the fx front end makes these
    export_ops: set[str] = field(default_factory=set)  # only the export front end makes these


def _weighted(norm: nn.Module) -> nn.Module:
    """``norm`` with a weight that is not all ones (a weight left out must show)."""
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.numel()).reshape(norm.weight.shape))
    return norm


def _onnx(*types: str) -> Callable[[int], set[str]]:
    return lambda opset: set(types)


CASES: dict[str, Case] = {
    "max_pool": Case(lambda: stem(nn.MaxPool2d(3, 2, 1)), (1, 3, 9, 9), {"max_pool2d"}, _onnx("MaxPool")),
    "max_pool_ceil_dilated": Case(
        lambda: stem(lambda x: F.max_pool2d(x, (3, 2), (2, 3), 1, dilation=(2, 1), ceil_mode=True)), (1, 3, 10, 11), {"max_pool2d"}, _onnx("MaxPool")
    ),
    "adaptive_avg_pool": Case(lambda: stem(nn.AdaptiveAvgPool2d((3, 3))), (1, 3, 6, 9), {"adaptive_avg_pool2d"}, _onnx("AveragePool")),
    "adaptive_avg_pool_uneven": Case(lambda: stem(nn.AdaptiveAvgPool2d((4, 7))), (1, 3, 6, 9), {"adaptive_avg_pool2d"}, _onnx("ReduceMean")),
    "adaptive_max_pool": Case(lambda: stem(lambda x: F.adaptive_max_pool2d(x, (2, 3))), (1, 3, 6, 9), {"adaptive_max_pool2d"}, _onnx("MaxPool")),
    "adaptive_max_pool_uneven": Case(lambda: stem(nn.AdaptiveMaxPool2d((4, 7))), (1, 3, 6, 9), {"adaptive_max_pool2d"}, _onnx("ReduceMax")),
    "global_max_pool": Case(lambda: stem(nn.AdaptiveMaxPool2d(1)), (1, 3, 6, 9), {"adaptive_max_pool2d"}, _onnx("GlobalMaxPool")),
    # Video and audio pools (pytorchvideo's AvgPool3d head, a discriminator's AvgPool1d): the 4 x 8 map read as 4
    # frames, or as a sequence of 35 (a ceil-mode window that PyTorch drops: it would start in the end padding).
    "avg_pool_3d": Case(
        lambda: stem(nn.Sequential(Lambda(lambda x: x.unsqueeze(1)), nn.AvgPool3d((2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))),
        (1, 3, 5, 7), {"avg_pool_nd"}, _onnx("AveragePool"),
    ),
    "avg_pool_3d_ceil": Case(
        lambda: stem(lambda x: F.avg_pool3d(x.unsqueeze(1), 2, (1, 2, 3), 1, ceil_mode=True, count_include_pad=False)), (1, 3, 5, 7),
        {"avg_pool_nd"}, _onnx("AveragePool"),
    ),
    "avg_pool_1d": Case(
        lambda: stem(nn.Sequential(nn.Flatten(2), nn.AvgPool1d(3, 3, 1, ceil_mode=True), Lambda(lambda x: F.avg_pool1d(x, 2)))),
        (1, 3, 5, 7), {"avg_pool_nd"}, _onnx("AveragePool", "Pad", "Slice"),
    ),
    # MobileViT v2's ``F.unfold(x, kernel_size=(2, 2), stride=(2, 2))`` ... ``F.fold(...)`` (windows that tile the
    # map), and im2col windows that overlap, are padded, dilated (nn.Unfold / nn.Fold modules).
    "unfold_fold_tiled": Case(
        lambda: stem(lambda x: F.fold(F.unfold(x, kernel_size=(2, 2), stride=(2, 2)).sigmoid(), output_size=(6, 8), kernel_size=(2, 2), stride=(2, 2))),
        (1, 3, 6, 8), {"unfold", "fold"}, _onnx("Transpose"),
    ),
    "unfold_fold_overlapping": Case(
        lambda: stem(nn.Sequential(nn.Unfold((3, 2), dilation=(1, 2), padding=1, stride=(2, 1)), nn.Sigmoid(),
                                   nn.Fold((6, 8), (3, 2), dilation=(1, 2), padding=1, stride=(2, 1)))),
        (1, 3, 6, 8), {"unfold", "fold"}, _onnx("Gather", "ReduceSum"),
    ),
    "conformer_conv": Case(lambda: stem(ConformerConv()), (1, 3, 5, 6), {"glu", "log_softmax", "conv_transpose2d"},
                           _onnx("LogSoftmax", "Sigmoid", "ConvTranspose")),
    "constant_map_product": Case(lambda: stem(AnchorGrid()), (1, 3, 5, 6), {"mul", "constant"}, _onnx("Mul")),
    "norms": Case(lambda: stem(Norms()), (1, 3, 5, 6), {"norm", "abs", "amax"}, _onnx("ReduceL2", "ReduceL1", "ReduceMax", "Abs", "Div")),
    # Restormer's LayerNorm (``x.var(-1, unbiased=False)``), torch.var with correction=0, a variance over all axes:
    # the mean of the squared deviations; a sample variance (correction=1) stays a call.
    "population_variance": Case(
        lambda: stem(lambda x: ((x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5),
                                torch.var(x, dim=(2, 3), correction=0), x.var(unbiased=False))),
        (1, 3, 5, 6), {"mean", "broadcast_sub", "pow"}, _onnx("ReduceMean", "Sub", "Pow"),
    ),
    # SKNet's branches stacked on a new axis (a negative dim too), PointNet's max over points (values, and .values).
    "stack_and_max_values": Case(
        lambda: stem(lambda x: (torch.stack([x, x.sigmoid()], 1).sum(1), torch.stack([x, 2 * x], -1),
                                torch.max(x, 2, keepdim=True)[0], x.max(dim=1).values)),
        (1, 3, 5, 6), {"concat", "amax"}, _onnx("Concat", "ReduceMax"),
    ),
    # Casts written in the code: a float64 copy of the features taken back to float32 (``x.double()...float()``),
    # ``x.to(dtype=...)``, ``x.type(...)``; the model is float64 in the fuse checks, so each is a real cast there.
    "cast": Case(
        lambda: stem(lambda x: (x.float().sigmoid().to(dtype=torch.float64), x.type(torch.float32) * 2, x.half().float())),
        (1, 3, 5, 6), {"cast"}, _onnx("Cast"),
    ),
    "repeat": Case(  # tiled maps, a batch repeated (its size follows the batch), a leading axis added
        lambda: stem(lambda x: (x.repeat(1, 2, 1, 3), x.repeat((2, 1, 1, 1)).sigmoid(), x.mean(1).repeat(3, 1, 1, 2))), (1, 3, 4, 5),
        {"repeat"}, _onnx("Tile", "Unsqueeze"),
    ),
    "global_mean_1d_3d": Case(  # to size 1: a mean over the pooled axes, at any size
        lambda: stem(nn.Sequential(Lambda(lambda x: x.unsqueeze(1)), nn.AdaptiveAvgPool3d(1), nn.Flatten(2), Lambda(lambda x: x.expand(-1, -1, 3)),
                                   nn.AdaptiveAvgPool1d(1), Lambda(lambda x: x + F.adaptive_avg_pool3d(x.unsqueeze(-1).unsqueeze(-1), (1, 1, 1)).flatten(2)))),
        (1, 3, 5, 7), {"mean"}, _onnx("ReduceMean"),
    ),
    "silu": Case(lambda: stem(nn.Sequential(nn.SiLU(), Lambda(F.silu))), (1, 3, 5, 5), {"silu"}, _onnx("Sigmoid", "Mul")),
    "leaky_relu": Case(
        lambda: stem(nn.Sequential(nn.LeakyReLU(0.1), Lambda(lambda x: F.leaky_relu(x - 0.5, 0.2)))), (1, 3, 5, 5), {"leaky_relu"}, _onnx("LeakyRelu")
    ),
    "prelu": Case(lambda: stem(Slopes(4)), (1, 3, 5, 5), {"prelu"}, _onnx("PRelu")),
    "rms_norm": Case(  # nn.RMSNorm over the channels of tokens (LLaMA-style code), F.rms_norm over (H, W); values
        # small enough that the default epsilon, the dtype's, weighs in
        lambda: stem(nn.Sequential(Lambda(lambda x: 1e-4 * x.permute(0, 2, 3, 1)), _weighted(nn.RMSNorm(4)),
                                   _weighted(nn.RMSNorm(4, eps=1e-6)),
                                   Lambda(lambda x: F.rms_norm(x.permute(0, 3, 1, 2), (5, 5), eps=1e-5)))),
        (1, 3, 5, 5), {"rms_norm"}, lambda opset: {"RMSNormalization"} if opset >= 23 else {"ReduceMean", "Sqrt"},
    ),
    "log_sigmoid": Case(  # nn.LogSigmoid and F.logsigmoid; inputs scaled far below -88, where log(sigmoid(x)) is -inf
        lambda: stem(nn.Sequential(Lambda(lambda x: 200.0 * x), nn.LogSigmoid(), Lambda(lambda x: F.logsigmoid(x - 1.0)))),
        (1, 3, 5, 5), {"log_sigmoid"}, _onnx("Softplus", "Neg"),
    ),
    "elu_selu_celu": Case(  # V-Net's nn.ELU(inplace=True), F.elu with an alpha, nn.SELU, F.selu, nn.CELU
        lambda: stem(nn.Sequential(nn.ELU(inplace=True), Lambda(lambda x: F.elu(x - 1.0, 0.5)), nn.SELU(),
                                   Lambda(lambda x: F.selu(x - 0.5)), nn.CELU(0.7))),
        (1, 3, 5, 5), {"elu"}, _onnx("Elu", "Selu", "Exp"),
    ),
    "threshold": Case(  # nn.Threshold (inplace too) and F.threshold: torch.onnx.export has no export of it
        lambda: stem(nn.Sequential(nn.Threshold(0.1, 20.0), Lambda(lambda x: F.threshold(x - 3.0, -1.0, -2.5)),
                                   nn.Threshold(-2.0, 0.5, inplace=True))),
        (1, 3, 5, 5), {"threshold"}, _onnx("LessOrEqual", "Where"),
    ),
    "softplus_mish": Case(  # YOLOv4's Mish, nn.Softplus with a beta, and a low threshold that the stem's values cross
        lambda: stem(nn.Sequential(Lambda(lambda x: x * torch.tanh(F.softplus(x))), nn.Softplus(beta=2.0, threshold=0.5))),
        (1, 3, 5, 5), {"softplus"}, _onnx("Softplus", "Where"),
    ),
    "prelu_tokens": Case(lambda: stem(Slopes(4, tokens=True)), (1, 3, 5, 5), {"prelu"}, _onnx("PRelu")),
    "hardswish": Case(
        lambda: stem(nn.Hardswish()), (1, 3, 5, 5), {"hardswish"}, lambda opset: {"HardSwish"} if opset >= 14 else {"HardSigmoid", "Mul"}
    ),
    "hardsigmoid": Case(lambda: stem(lambda x: F.hardsigmoid(x) * x), (1, 3, 5, 5), {"hardsigmoid", "mul"}, _onnx("HardSigmoid")),
    "relu6_clamp": Case(
        lambda: stem(nn.Sequential(nn.ReLU6(), Lambda(lambda x: F.relu6(x) + x.clamp(min=-0.5) + torch.clamp(x, max=0.25) + F.hardtanh(x)))),
        (1, 3, 5, 5), {"clamp"}, _onnx("Clip"),
    ),
    "tanh": Case(lambda: stem(lambda x: torch.tanh(x) + x.tanh()), (1, 3, 5, 5), {"tanh"}, _onnx("Tanh")),
    "softmax_written_out": Case(  # a softmax over channels as older code writes it, and a log of a clamped value
        lambda: stem(lambda x: (e := (x - x.amax(1, keepdim=True)).exp()) / e.sum(1, keepdim=True) + torch.log(x.clamp(min=0.1))),
        (1, 3, 5, 5), {"exp", "log", "amax", "sum", "div"}, _onnx("Exp", "Log"),
    ),
    "gelu_tanh": Case(
        lambda: stem(nn.GELU(approximate="tanh")), (1, 3, 5, 5), {"gelu"}, lambda opset: {"Gelu"} if opset >= 20 else {"Tanh"}
    ),
    "gelu_erf": Case(lambda: stem(nn.GELU()), (1, 3, 5, 5), {"gelu"}, lambda opset: {"Gelu"} if opset >= 20 else {"Erf"}),
    "sigmoid_gate": Case(lambda: stem(lambda x: x * torch.sigmoid(x) + x * x.sigmoid()), (1, 3, 5, 5), {"sigmoid", "mul"}, _onnx("Sigmoid")),
    "channels_first_layer_norm": Case(
        lambda: stem(ChannelsFirstLayerNorm(4)), (1, 3, 5, 5), {"broadcast_sub", "pow", "sqrt", "div", "add_const", "scale"},
        _onnx("Sub", "Pow", "Sqrt", "Div", "Add"),
    ),
    "rsqrt_const_arithmetic": Case(
        lambda: stem(RsqrtNorm(4)), (1, 3, 5, 6), {"rsqrt", "add_const", "scale", "sum", "sigmoid"}, _onnx("Sqrt", "Reciprocal", "ReduceSum")
    ),
    "group_norm": Case(lambda: stem(lambda x: F.group_norm(x, 1)), (1, 3, 5, 5), {"group_norm"}, _onnx("InstanceNormalization")),
    "group_norm_module": Case(lambda: stem(nn.GroupNorm(2, 4)), (1, 3, 5, 5), {"group_norm"}, _onnx("InstanceNormalization")),
    "conv_transpose": Case(  # a decoder's upsampling: ConvTranspose2d + BN (folded) and F.conv_transpose2d
        lambda: stem(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, 2, 1, output_padding=1, groups=2), nn.BatchNorm2d(6),
                                   DepthwiseUp(6))),
        (1, 3, 5, 4), {"conv_transpose2d"}, _onnx("ConvTranspose"),
    ),
    "conv_transpose3d": Case(  # a volume decoder's upsampling (V-Net): ConvTranspose3d + BatchNorm3d (folded), F.conv_transpose3d
        lambda: nn.Sequential(nn.ConvTranspose3d(3, 4, (1, 2, 2), (1, 2, 2)), nn.BatchNorm3d(4), nn.ReLU(), Transposed3d(4)),
        (1, 3, 2, 3, 4), {"conv_transpose3d"}, _onnx("ConvTranspose"),
    ),
    "conv3d": Case(  # a (2+1)D video block: spatial Conv3d + BatchNorm3d, then a temporal F.conv3d + BatchNorm3d (folded)
        lambda: nn.Sequential(nn.Conv3d(3, 4, (1, 3, 3), (1, 2, 1), (0, 1, 1)), nn.BatchNorm3d(4), nn.ReLU(), TemporalConv(4),
                              nn.BatchNorm3d(4)),
        (1, 3, 4, 5, 6), {"conv3d"}, _onnx("Conv"),
    ),
    "interpolate_nearest": Case(lambda: stem(FPNTopDown(4)), (1, 3, 8, 6), {"interpolate"}, _onnx("Resize")),
    "interpolate_bilinear": Case(lambda: stem(Bilinear()), (1, 3, 5, 5), {"interpolate"}, _onnx("Resize")),
    "slicing": Case(lambda: stem(Slicing()), (1, 3, 5, 6), {"slice", "select"}, _onnx("Slice", "Gather")),
    "split_chunk_unbind": Case(
        lambda: stem(Splits()), (1, 3, 5, 5), {"slice", "select"}, _onnx("Slice", "Gather"), fx_ops={"chunk", "piece"}
    ),
    "roll": Case(lambda: stem(Shifts()), (1, 3, 5, 6), {"roll"}, _onnx("Slice", "Concat")),
    "pixel_shuffle": Case(lambda: stem(Shuffles(8), c=8), (1, 3, 6, 4), {"pixel_shuffle", "pixel_unshuffle"}, _onnx("DepthToSpace", "Transpose")),
    "einsum_bmm": Case(lambda: stem(Products()), (1, 3, 5, 5), {"matmul"}, _onnx("MatMul", "Einsum"), fx_ops={"einsum"}),
    "attention": Case(lambda: stem(Attention(), c=8), (1, 3, 3, 4), {"attention"}, _onnx("Softmax", "MatMul")),
    "attention_gqa": Case(lambda: stem(GroupedQueryAttention(), c=8), (1, 3, 3, 4), {"attention"}, _onnx("Tile", "Softmax")),
    "pad_nd": Case(lambda: stem(Pads()), (1, 3, 5, 5), {"pad_nd"}, _onnx("Pad")),
    "slice_scatter": Case(lambda: stem(SliceAssign()), (1, 3, 5, 5), {"slice_scatter", "slice"}, _onnx("Concat")),
    "constant_operands": Case(lambda: stem(TableBias()), (1, 3, 3, 4), {"constant", "attention", "einsum"}, _onnx("Einsum", "Softmax")),
    "expand": Case(  # torch.export records the expanded batch as symbolic: it is read at run time
        lambda: stem(Expands()), (1, 3, 5, 5), set(), _onnx("Expand"), fx_ops={"expand"}, export_ops={"expand_dyn"}
    ),
}
NAMES = sorted(CASES)


def model_of(name: str, dtype: torch.dtype = D) -> nn.Module:
    torch.manual_seed(0)
    model = CASES[name].build().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.to(dtype)


def inputs(name: str, dtype: torch.dtype = D, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    shape = CASES[name].shape
    shape = shape if batch is None else (batch, *shape[1:])
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def flat(y) -> list[torch.Tensor]:
    return [y] if torch.is_tensor(y) else [t for item in y for t in flat(item)]


def rel_err(out, ref) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(flat(out), flat(ref), strict=True))


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", NAMES)
def test_fx_front_end_maps_it(name):
    case = CASES[name]
    g = trace(model_of(name), (inputs(name),))
    ops = g.op_counts()
    assert "opaque" not in ops, ops
    assert case.ops - case.export_ops | case.fx_ops <= set(ops), ops


@pytest.mark.parametrize("name", NAMES)
def test_export_front_end_maps_it(name):
    case = CASES[name]
    model, x = model_of(name), inputs(name)
    g = capture_export(copy.deepcopy(model), (x,)).graph
    ops = g.op_counts()
    assert "opaque" not in ops, ops
    assert case.ops - case.fx_ops | case.export_ops <= set(ops), ops
    with torch.no_grad():
        assert rel_err(run_graph(g, x), model(x)) <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_fuse_is_exact_and_still_folds(name):
    model = model_of(name)
    fused = repalgebra.fuse(model, inputs(name))
    report = fused.fuse_report
    assert report.ops_after.get("batch_norm", 0) == 0 and "opaque" not in report.ops_after, str(report)
    assert not report.kept_whole, str(report)  # a capture that computed something else was thrown away
    with torch.no_grad():
        for seed in (0, 1):
            x = inputs(name, seed=seed)
            assert rel_err(fused(x), model(x)) <= 1e-12


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", NAMES)
def test_onnx_lowering_runs_in_onnxruntime(name, opset):
    model = model_of(name, torch.float32)
    fused = repalgebra.fuse(model, inputs(name, torch.float32))
    proto = export_onnx(fused, None, CASES[name].shape, fuse=False, opset=opset)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta.get("repalgebra.fallback", "none") == "none"  # our lowerings, not torch.onnx.export's
    types = {n.op_type for n in proto.graph.node}
    assert CASES[name].onnx(opset) <= types, types
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = inputs(name, torch.float32, seed=batch, batch=batch)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            ref = flat(model(x))
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert float(np.abs(a - b.numpy()).max() / np.abs(b.numpy()).max()) <= 1e-5


def test_every_new_op_has_both_lowerings_and_a_case():
    """Each op of the vocabulary has a torch and an ONNX lowering, and one of the cases above makes it."""
    made = set().union(*(c.ops | c.fx_ops | c.export_ops for c in CASES.values()))
    vocabulary = {
        "silu", "leaky_relu", "prelu", "softplus", "threshold", "elu", "log_sigmoid", "rms_norm", "hardswish", "hardsigmoid", "clamp", "tanh", "sqrt", "exp", "log", "rsqrt", "pow", "div", "broadcast_add", "broadcast_sub",
        "add_const", "sum", "max_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "group_norm", "interpolate",
        "attention", "einsum", "slice", "chunk", "piece", "slice_scatter", "roll", "pixel_shuffle", "pixel_unshuffle", "pad_nd",
        "constant", "expand", "expand_dyn", "avg_pool_nd", "unfold", "fold", "norm", "abs", "amax", "repeat", "cast",
    }
    for op in vocabulary:
        assert {"torch", "onnx"} <= set(OPS[op].lowerings), op
        assert OPS[op].kind in ("nonlinear", "layout"), op
    assert vocabulary - made <= {"broadcast_add"}  # (broadcast_add: see test_broadcasting_arithmetic)


def test_broadcasting_arithmetic():
    """``a + b`` of different shapes is ``broadcast_add``; of one shape it stays ``add`` (the op rules sum)."""
    m = stem(lambda x: x + x.mean(1, keepdim=True) + x)
    g = trace(m.double().eval(), (torch.randn(1, 3, 4, 4, dtype=D),))
    assert g.op_counts()["broadcast_add"] == 1 and g.op_counts()["add"] == 1


def test_fusing_twice_changes_nothing():
    """The torch back end's lowerings map back to the same ops."""
    for name in ("slicing", "split_chunk_unbind", "rsqrt_const_arithmetic", "interpolate_nearest", "attention"):
        model, x = model_of(name), inputs(name)
        once = repalgebra.fuse(model, x)
        twice = repalgebra.fuse(once, x)
        assert twice.fuse_report.ops_after == once.fuse_report.ops_after, name


def test_interpolate_to_another_values_size_follows_it():
    """FPN's ``F.interpolate(top, size=lateral.shape[-2:])`` reads the size at run time: the fused model runs at other sizes."""
    model = model_of("interpolate_nearest")
    fused = repalgebra.fuse(model, inputs("interpolate_nearest"))
    x = torch.randn(2, 3, 12, 10, dtype=D)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-12


def test_max_pool_ceil_mode_drops_a_window_starting_in_the_padding():
    """PyTorch's ceil mode drops a last window that would start in the right padding (ONNX's ceil mode does not)."""
    x = torch.randn(1, 2, 10, 11)
    y = F.max_pool2d(x, (3, 2), (2, 3), 1, dilation=(2, 1), ceil_mode=True)
    assert y.shape[-1] == 4 and math.ceil((11 + 2 - 2) / 3) + 1 == 5


class ClassToken(nn.Module):
    """ViT's ``torch.cat((cls_token.expand(B, -1, -1), x), dim=1)``, ShiftViT's ``out = torch.zeros_like(x)`` then
    slice assignments, DBB's ``output[:, :, 0:p, :] = pad_values``: at the example's shapes (torch.export) the class
    token, the zeros and the values written are constants."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, c))
        self.edge = nn.Parameter(torch.randn(c))
        self.stem = Stem(3, c)

    def forward(self, x):
        x = self.stem(x)
        t = x.flatten(2).transpose(1, 2)
        t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        out = torch.zeros_like(x)
        out[:, :2, :, 1:] = x[:, :2, :, :-1]
        out[:, 2:] = x[:, 2:]
        out[:, :, :1, :] = self.edge.view(1, -1, 1, 1)
        return t, out


def test_class_token_and_zeros_like_at_fixed_shapes():
    model = ClassToken().double().eval()
    x = torch.randn(2, 3, 4, 5, dtype=D)
    g = capture_export(copy.deepcopy(model), (x,)).graph
    ops = g.op_counts()
    assert "opaque" not in ops and ops["constant"] == 3 and "slice_scatter" in ops, ops
    with torch.no_grad():
        ref = model(x)
        assert rel_err(run_graph(g, x), ref) <= 1e-12
        fused = repalgebra.fuse(model, x)
        assert rel_err(fused(x), ref) <= 1e-12
    assert fused.fuse_report.ops_after.get("batch_norm", 0) == 0
    proto = export_onnx(repalgebra.fuse(model.float(), x.float()), None, tuple(x.shape), fuse=False)
    assert {p.key: p.value for p in proto.metadata_props}.get("repalgebra.fallback", "none") == "none"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.float().numpy()})
    with torch.no_grad():
        for a, b in zip(got, flat(model.float()(x.float())), strict=True):
            assert float(np.abs(a - b.numpy()).max() / np.abs(b.numpy()).max()) <= 1e-5


def test_average_pool_over_the_inputs_own_size_is_a_mean():
    """MobileOne's squeeze-excite ``b, c, h, w = x.size(); F.avg_pool2d(x, kernel_size=[h, w])``: a mean at any size;
    ``F.avg_pool2d(x, x.size(3))`` (a square window) is one only for square maps and stays a call."""

    class SE(nn.Module):
        def forward(self, x):
            b, c, h, w = x.size()
            return x * F.avg_pool2d(x, kernel_size=[h, w]).sigmoid() + F.avg_pool2d(x, x.size(3)).sum()

    model = stem(SE()).double().eval()
    g = trace(model, (torch.randn(1, 3, 5, 5, dtype=D),))
    assert g.op_counts()["mean"] == 1 and g.op_counts()["opaque"] == 1
    fused = repalgebra.fuse(model, torch.randn(1, 3, 5, 5, dtype=D))
    x = torch.randn(2, 3, 6, 6, dtype=D)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-12
