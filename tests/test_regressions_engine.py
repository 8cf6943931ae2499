"""Regressions found by fusing real models: each model here once failed to fuse or to run once fused.

Every test fuses in float64 and checks the fused module against the original
to 1e-12, at the traced input size and at another one (sizes read from shapes
are read again at run time).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra

D = torch.float64


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64, eval mode, with random weights and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=g))
    return model.to(D).eval()


def fused_equal(model: nn.Module, *shapes: tuple[int, ...], again: bool = True) -> nn.Module:
    """Fuse at the first shape; the fused module (and, with ``again``, it fused again) equals the model to 1e-12 at every shape."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=g, dtype=D) for s in shapes]
    fused = repalgebra.fuse(model, xs[0])
    modules = [fused, repalgebra.fuse(fused, xs[0])] if again else [fused]
    with torch.no_grad():
        for x in xs:
            want = model(x)
            for m in modules:
                assert (m(x) - want).abs().max().item() <= 1e-12
    return fused


# --------------------------------------------------------------------------- 1: no lowering may need a contiguous input


class TokensAndBack(nn.Module):
    """Image to tokens (``flatten(2).transpose(1, 2)``), a Linear, tokens back to an image with ``reshape``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.mix = nn.Linear(c, c)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        y = self.bn(self.conv(x))
        t = self.mix(y.flatten(2).transpose(1, 2))
        z = t.transpose(1, 2).reshape(B, -1, H, W)  # non-contiguous input: reshape copies
        return self.conv2(z) + y


class ViewAfterContiguous(nn.Module):
    """``t.transpose(1, 2).contiguous().view(...)``: the front end maps ``contiguous`` to the identity.

    ``how`` picks how the sizes are written: read from shapes (the IR's
    ``reshape_dyn``), ``view_as``, or an expression the IR does not model
    (``//``: the call is carried through as it is).
    """

    def __init__(self, how: str, c: int = 8) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.mix = nn.Linear(c, c)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        t = self.mix(y.flatten(2).transpose(1, 2))
        B, N, C = t.shape
        u = t.transpose(1, 2).contiguous()
        if self.how == "shape":
            flat = u.view(B, C * N)
        elif self.how == "view_as":
            flat = u.view_as(y).flatten(1)
        else:
            flat = u.view(B, (C * N) // 1)
        return flat.sum(1, keepdim=True) + self.conv2(y).flatten(1)


def test_tokens_back_to_image_by_reshape_runs():
    fused = fused_equal(randomized(TokensAndBack()), (2, 3, 6, 6), (1, 3, 4, 5))
    assert fused.fuse_report.ops_after.get("batch_norm") is None


@pytest.mark.parametrize("how", ["shape", "view_as", "floordiv"])
def test_view_after_contiguous_runs(how):
    fused_equal(randomized(ViewAfterContiguous(how)), (2, 3, 6, 6), (1, 3, 4, 5))


def test_view_as_a_bit_cast_stays_a_view():
    class BitCast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).view(torch.int64).view(torch.float64) * 2

    fused_equal(randomized(BitCast()), (2, 3, 4, 4))


@pytest.mark.parametrize("kind,target", [("call_method", "view"), ("call_function", torch.ops.aten.view.default)])
def test_a_carried_through_view_of_a_transposed_value_runs(kind, target):
    """An opaque ``view`` (from the fx or the torch.export front end) of a value the IR transposed."""
    from repalgebra.backend.torch import to_module
    from repalgebra.builder import GraphBuilder
    from repalgebra.frontend.calls import FnCall, In

    b = GraphBuilder()
    x = b.input("x", (2, 3, 4), D)
    t = b.transpose(x, dim0=1, dim1=2)
    call = FnCall(kind, target, (In(0), [2, 12]), {}, {})
    graph = b.build(b.opaque(t, fn=call, out_shape=(2, 12), out_dtype=D))
    xt = torch.randn(2, 3, 4, dtype=D)
    assert torch.equal(to_module(graph)(xt), xt.transpose(1, 2).reshape(2, 12))
    assert call.target == target  # the graph's own callable is untouched; the module has a copy


# --------------------------------------------------------------------------- 2: a node of the shape-read pass removed under it


class Mlp(nn.Module):
    """A pre-norm transformer MLP block on tokens ``(B, N, C)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Pooling(nn.Module):
    """PiT's pooling: a strided depthwise conv on the image, a Linear on the class token."""

    def __init__(self, c: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c2, 3, stride=2, padding=1, groups=c)
        self.bn = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c, c2)

    def forward(self, x, cls_token):
        return self.bn(self.conv(x)), self.fc(cls_token)


class Stage(nn.Module):
    """timm's PiT ``Transformer``: image and class token in, image and class token out.

    ``sizes`` picks how the tokens go back to an image: ``shape`` (``B, C, H, W =
    x.shape``), ``size`` (``x.size(k)`` calls) or ``reshape_as`` (the pooled image).
    """

    def __init__(self, c: int, pool: nn.Module | None, sizes: str) -> None:
        super().__init__()
        self.pool, self.sizes = pool, sizes
        self.blocks = nn.Sequential(Mlp(c), Mlp(c))
        self.norm = nn.Identity()

    def forward(self, x):
        x, cls_tokens = x
        token_length = cls_tokens.shape[1]
        if self.pool is not None:
            x, cls_tokens = self.pool(x, cls_tokens)
        image = x
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = self.blocks(self.norm(torch.cat((cls_tokens, x), dim=1)))
        cls_tokens, x = x[:, :token_length], x[:, token_length:]
        if self.sizes == "shape":
            x = x.transpose(1, 2).reshape(B, C, H, W)
        elif self.sizes == "size":
            x = x.transpose(1, 2).reshape(image.size(0), image.size(1), image.size(2), image.size(3))
        else:
            x = x.transpose(1, 2).reshape_as(image)
        return x, cls_tokens


class PiT(nn.Module):
    """A small PiT: conv stem, three stages with pooling between, a head on the class token only.

    The last stage's image is never read: its tokens-to-image reshape is dead
    in the traced graph (what the shape-read pass tripped over).
    """

    def __init__(self, sizes: str = "shape") -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, 2)
        self.bn = nn.BatchNorm2d(8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.stages = nn.Sequential(Stage(8, None, sizes), Stage(16, Pooling(8, 16), sizes), Stage(32, Pooling(16, 32), sizes))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.bn(self.embed(x))
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x, cls_tokens = self.stages((x, cls_tokens))
        return self.head(self.norm(cls_tokens[:, 0]))


class SqrtPiT(PiT):
    """Sizes computed in Python from the token count (``int(N ** 0.5)``): not ``torch.fx``-traceable."""

    def forward(self, x):
        x = self.bn(self.embed(x))
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        for stage in self.stages:
            if stage.pool is not None:
                B, N, C = x.shape
                side = int(N ** 0.5)
                x, cls_tokens = stage.pool(x.transpose(1, 2).reshape(B, C, side, side), cls_tokens)
                x = x.flatten(2).transpose(1, 2)
            else:
                x = x.flatten(2).transpose(1, 2)
            t = stage.blocks(torch.cat((cls_tokens, x), dim=1))
            cls_tokens, x = t[:, :1], t[:, 1:]
        return self.head(self.norm(cls_tokens[:, 0]))


class LeViTStage(nn.Module):
    """LeViT-style: Linear + BatchNorm1d over ``flatten(0, 1)`` and back by ``reshape_as``, a strided subsample between."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.down_bn = nn.BatchNorm2d(16)
        self.fc2 = nn.Linear(16, 16)
        self.bn2 = nn.BatchNorm1d(16)

    def linear_bn(self, x, fc, bn):
        y = fc(x)
        return bn(y.flatten(0, 1)).reshape_as(y)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.linear_bn(t, self.fc, self.bn)
        x = t.transpose(1, 2).reshape(B, C, H, W)
        x = self.down_bn(self.down(x))
        t = x.flatten(2).transpose(1, 2)
        t = self.linear_bn(t, self.fc2, self.bn2)
        unused = t.transpose(1, 2).reshape(B, 16, x.size(2), x.size(3))  # noqa: F841  (dead, as in PiT's last stage)
        return t.mean(1)


@pytest.mark.parametrize("sizes", ["shape", "size", "reshape_as"])
def test_pit_with_pooling_between_stages_fuses(sizes):
    # (Fusing the fused PiT again falls back to a capture at fixed shapes: its carried-through
    # ``cls_token.expand(x.shape[0], -1, -1)`` does not trace; not checked here.)
    fused = fused_equal(randomized(PiT(sizes)), (2, 3, 16, 16), (1, 3, 8, 8), again=False)
    report = fused.fuse_report
    assert report.capture == "fx"  # sizes read at run time, not fixed by a fallback capture
    assert "batch_norm" not in report.ops_after  # the stem's BN and the pooling convs' BNs folded


def test_pit_with_sizes_computed_in_python_fuses_at_its_shape():
    fused_equal(randomized(SqrtPiT()), (2, 3, 16, 16), again=False)


def test_levit_linear_bn_across_flatten_and_reshape_as_with_a_dead_reshape():
    fused = fused_equal(randomized(LeViTStage()), (2, 3, 12, 12), (1, 3, 8, 16))
    assert fused.fuse_report.capture == "fx"
    assert "batch_norm" not in fused.fuse_report.ops_after


class VANStage(nn.Module):
    """VAN's and PVT's overlapping patch embedding: ``x = self.proj(x); _, _, H, W = x.shape; x = self.norm(x)``
    (a strided conv, its size read between it and its BN), tokens and back with ``reshape(B, C, H, W)``, and an
    FPN-style ``F.interpolate(top, size=lateral.shape[-2:])`` sized by a conv's output before its BN; a size read
    from a conv's output before a pool, which keeps the read where it is."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.norm = nn.Conv2d(3, 8, 7, 4, 3), nn.BatchNorm2d(8)
        self.mix = nn.Linear(8, 8)
        self.lat, self.lat_bn = nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        y = self.proj(x)
        _, _, H, W = y.shape
        y = self.norm(y)
        B, C = y.shape[:2]
        t = self.mix(y.flatten(2).transpose(1, 2))
        y = t.transpose(1, 2).reshape(B, C, H, W)
        lat = self.lat(x)
        size = lat.shape[-2:]
        d = self.down(y)
        size_d = d.shape[-2:]  # read before a pool that halves it: the pool's output has another size
        d = F.interpolate(F.max_pool2d(d, 2), size=size_d, mode="bilinear")
        return self.lat_bn(lat) + F.interpolate(y + F.interpolate(d, size=y.shape[-2:]), size=size, mode="nearest")


def test_a_size_read_between_a_strided_conv_and_its_bn_leaves_the_fold():
    fused = fused_equal(randomized(VANStage()), (2, 3, 32, 32), (1, 3, 48, 40))
    assert fused.fuse_report.capture == "fx"
    assert "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)


class StarSizes(nn.Module):
    """Tokens back to an image with ``reshape(*y.size())`` (unpacked into the call: fx's Proxy refuses to iterate),
    and a loop over ``y.shape[2:]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.mix = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        t = self.mix(y.flatten(2).transpose(1, 2))
        area = 1
        for s in y.shape[2:]:
            area = area * s
        return t.transpose(1, 2).reshape(*y.size()) / area


class DeadSizeRead(nn.Module):
    """A patch embedding whose size read also feeds a call nobody uses (``unused = F.interpolate(x, size=(H, W))``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.norm, self.head = nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.proj(x)
        B, C, H, W = y.shape
        tokens = self.norm(y).reshape(B, C, H * W).transpose(1, 2)
        unused = F.interpolate(x, size=(H, W))  # noqa: F841  (after the reshape whose move removes it)
        return self.head(tokens)


def test_a_size_read_by_a_dead_call_does_not_stop_the_trace():
    """Moving size reads removed the dead call before the pass reached it, and the trace failed on it: torch.export
    then fixed every size."""
    fused = fused_equal(randomized(DeadSizeRead()), (2, 3, 16, 16), (3, 3, 12, 20))
    assert fused.fuse_report.capture == "fx" and "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)


def test_a_shape_unpacked_into_a_call_traces_with_free_sizes():
    fused = fused_equal(randomized(StarSizes()), (2, 3, 8, 8), (1, 3, 5, 7), (3, 3, 6, 4))
    assert fused.fuse_report.capture == "fx", str(fused.fuse_report)
    assert "batch_norm" not in fused.fuse_report.ops_after


def test_shape_read_pass_skips_nodes_it_removed():
    """Rerouting the first reshape's size reads removes the dead second one, which the pass has yet to visit."""
    from repalgebra.builder import GraphBuilder
    from repalgebra.frontend.shapes import reroute_shape_reads

    b = GraphBuilder()
    x = b.input("x", (2, 4, 3, 3), D)
    w = torch.randn(4, 4, 1, 1, dtype=D)
    y = b.conv2d(x, weight=w, source="conv")  # y's sizes can be read from x and w
    t = b.transpose(b.flatten(y, start=2), dim0=1, dim1=2)
    back = b.reshape_dyn(t, y, shape=(((0, 0),), ((0, 2),), ((0, 3),), ((0, 1),)), source="back")
    b.reshape_dyn(t, y, shape=(((0, 0),), ((0, 1),), -1), source="dead")  # nobody reads it
    graph = b.build(back)
    reroute_shape_reads(graph)
    assert [n.source for n in graph.nodes if n.op == "reshape_dyn"] == ["back"]
    graph.toposort()
    assert {i.name for n in graph.nodes for i in n.inputs} <= {v.name for v in graph.inputs} | {n.out.name for n in graph.nodes}
