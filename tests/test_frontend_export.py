"""The export front end (``repalgebra.frontend.aten``): modules torch.fx cannot trace, captured at fixed shapes.

Each module is written the way public model code writes it (in-place ops,
padding computed from the input size, ``int(N ** 0.5)``, asserts and loops on
sizes, SDPA attention).  For each: the captured graph computes the module in
float64, and after rewriting, every conv + BN pair is folded and the result
still computes the module.  Each capture costs ~0.3 s (the first ~2 s).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import repalgebra
from repalgebra.frontend.aten import CaptureFailed, capture_export
from repalgebra.frontend.calls import Buf, In
from repalgebra.interpret import run_graph
from repalgebra.ir import Graph
from repalgebra.rewrite import rewrite

aten = torch.ops.aten


# --------------------------------------------------------------------------- helpers


def randomize_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so a wrong fold cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def conv_bn_pairs(graph: Graph) -> int:
    return sum(n.op == "batch_norm" and n.x.producer is not None and n.x.producer.op == "conv2d" for n in graph.nodes)


def capture_checked(model: nn.Module, *xs: torch.Tensor, pairs: int | None = None) -> Graph:
    """Capture in float64; check the graph and its rewrite against the module; returns the captured graph.

    ``pairs``: how many conv + BN pairs the capture must hold (all of them fold).
    """
    model = randomize_bns(model).double().eval()
    xs = tuple(x.double() for x in xs)
    cap = capture_export(copy.deepcopy(model), xs)
    with torch.no_grad():
        refs = pytree.tree_leaves(model(*xs))
    outs = as_tuple(run_graph(cap.graph, *xs))
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) <= 1e-12
    if pairs is not None:
        assert conv_bn_pairs(cap.graph) == pairs
    fused, _ = rewrite(cap.graph)
    assert conv_bn_pairs(fused) == 0
    if pairs:
        assert fused.op_counts().get("batch_norm", 0) < cap.graph.op_counts()["batch_norm"]
    for out, ref in zip(as_tuple(run_graph(fused, *xs)), refs):
        assert rel_err(out, ref) <= 1e-9
    return cap.graph


def ops_of(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def opaque_targets(graph: Graph) -> list:
    return [n.attrs["fn"].target for n in graph.nodes if n.op == "opaque"]


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


# --------------------------------------------------------------------------- in-place forms


class ReluAfterRead(nn.Module):
    """The scaled branch reads ``y`` before ``y.relu_()`` overwrites it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = y * 2
        y.relu_()
        return z + y


def test_inplace_relu_after_a_read_reads_the_value_before_it():
    g = capture_checked(ReluAfterRead(), torch.randn(2, 3, 6, 6), pairs=1)
    assert ops_of(g) == ["conv2d", "batch_norm", "scale", "relu", "add"]
    bn, scale, relu, add = g.nodes[1:]
    assert scale.x is bn.out and relu.x is bn.out and add.inputs == (scale.out, relu.out)
    assert scale.params["scale"].tolist() == [2.0] * 8
    assert [n.source for n in g.nodes[:2]] == ["conv", "bn"]


class ResidualInPlace(nn.Module):
    """An in-place ReLU on a value the residual reads again, ``add_`` after a read, a slice assignment."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.act = nn.ReLU(inplace=True)
        self.proj = ConvBN(8, 8, 1)

    def forward(self, x):
        s = self.stem(x)
        r = self.act(s)  # also rewrites s: the sum below is 2 * relu(s)
        y = self.proj(r + s)
        a = y * 3
        y.add_(1)
        y[:, :4] = 0
        return a + y


def test_inplace_module_add_and_slice_assignment():
    g = capture_checked(ResidualInPlace(), torch.randn(1, 3, 5, 5), pairs=2)
    relu = next(n for n in g.nodes if n.op == "relu")
    join = next(n for n in g.nodes if n.op == "add")
    assert join.inputs == (relu.out, relu.out)  # s + r after the in-place ReLU
    assert relu.source == "act"
    assert {"add_const", "slice_scatter", "constant"} <= set(ops_of(g))  # y.add_(1); y[:, :4] = 0
    assert opaque_targets(g) == []  # the zeros written (aten.fill) are a constant


def temporal_shift_in_place(x: torch.Tensor, segments: int = 4, fold_div: int = 8) -> torch.Tensor:
    """TSM's in-place shift (mit-han-lab/temporal-shift-module): a fold of the channels moves one frame back, the
    next fold one frame forward, written into a view of the block's input (the residual reads it shifted too)."""
    nt, c, h, w = x.size()
    x = x.view(nt // segments, segments, c, h, w)
    fold = c // fold_div
    out = x
    tmp = x[:, 1:, :fold].clone()
    out[:, :-1, :fold] = tmp
    out[:, -1, :fold] = 0
    tmp = x[:, :-1, fold : 2 * fold].clone()
    out[:, 1:, fold : 2 * fold] = tmp
    out[:, 0, fold : 2 * fold] = 0
    return out.view(nt, c, h, w)


class ShiftedResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.down = ConvBN(3, 16), ConvBN(16, 16, 1), ConvBN(16, 16, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.conv(temporal_shift_in_place(x)) + self.down(x)


def test_in_place_temporal_shift_is_slices_scattered_and_zeros():
    """``out[:, -1, :fold] = 0`` is ``select_scatter`` of ``fill``: a one-wide ``slice_scatter`` of a constant (the
    last frame, index -1 counted from the end); nothing is left for the fallback."""
    g = capture_checked(ShiftedResidual(), torch.randn(8, 3, 5, 5), pairs=3)
    assert opaque_targets(g) == [] and ops_of(g).count("constant") == 2, ops_of(g)  # the two folds of zeros


# --------------------------------------------------------------------------- shape-dependent Python


def pad_same(x: torch.Tensor, k: int, s: int, d: int = 1) -> torch.Tensor:
    """TF 'SAME' padding, computed from the input's size (the odd extra row/column goes bottom/right)."""
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / s) - 1) * s + (k - 1) * d + 1 - ih, 0)
    pad_w = max((math.ceil(iw / s) - 1) * s + (k - 1) * d + 1 - iw, 0)
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


class Conv2dSame(nn.Conv2d):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(cin, cout, k, stride, padding=0, bias=False)

    def forward(self, x):
        x = pad_same(x, self.kernel_size[0], self.stride[0], self.dilation[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameStem(nn.Module):
    """Stride-2 'SAME' conv + BN + ReLU blocks, applied while the feature map is larger than 3."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(Conv2dSame(c, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU()) for c in (3, 8, 8))

    def forward(self, x):
        i = 0
        while x.shape[-1] > 3:
            x = self.blocks[i](x)
            i += 1
        return x


def test_same_padding_and_a_loop_over_sizes():
    model = SameStem()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    g = capture_checked(model, torch.randn(1, 3, 7, 13), pairs=3)  # widths 13 -> 7 -> 4 -> 2
    pads = [n.attrs["pads"] for n in g.nodes if n.op == "pad"]
    # (top, bottom, left, right): heights 7, 4, 2 and widths 13, 7, 4 at stride 2
    assert pads == [(1, 1, 1, 1), (0, 1, 1, 1), (0, 1, 0, 1)]
    assert [n.source for n in g.nodes if n.op == "conv2d"] == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]


class TokenConv(nn.Module):
    """Tokens to a square grid (``int(N ** 0.5)``, asserted), a depthwise conv + BN with a residual, back to tokens."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv = ConvBN(dim, dim, 3, groups=dim)

    def forward(self, x):
        B, N, C = x.shape
        H = W = int(N ** 0.5)
        assert H * W == N, "tokens must form a square grid"
        y = x.transpose(1, 2).reshape(B, C, H, W)
        y = self.conv(y) + y
        return y.flatten(2).transpose(1, 2)


def test_square_token_grid_from_sqrt_and_assert():
    g = capture_checked(TokenConv(), torch.randn(2, 9, 16), pairs=1)
    assert ops_of(g) == ["transpose", "reshape_dyn", "conv2d", "batch_norm", "add", "reshape_dyn", "transpose"]
    assert g.nodes[1].attrs["shape"] == (((0, 0),), 16, 3, 3)  # the batch read from the input at run time


class WindowAttention(nn.Module):
    """Swin-style: attention inside ``window x window`` windows, padding the map when the window does not divide it."""

    def __init__(self, dim: int = 8, heads: int = 2, window: int = 4) -> None:
        super().__init__()
        self.window, self.heads = window, heads
        self.embed = ConvBN(3, dim, 3, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def partition(self, x):
        B, H, W, C = x.shape
        ws = self.window
        x = x.view(B, H // ws, ws, W // ws, ws, C)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)

    def reverse(self, w, H: int, W: int):
        ws, C = self.window, w.shape[-1]
        x = w.view(-1, H // ws, W // ws, ws, ws, C)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        shortcut = x
        x = self.norm(x)
        pad_b = (self.window - H % self.window) % self.window
        pad_r = (self.window - W % self.window) % self.window
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        w = self.partition(x)
        n = w.shape[1]
        qkv = self.qkv(w).reshape(-1, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)
        w = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, n, C)
        x = self.reverse(self.proj(w), Hp, Wp)[:, :H, :W, :].contiguous()
        return (shortcut + x).permute(0, 3, 1, 2)


def test_window_attention_that_pads_when_the_window_does_not_divide():
    g = capture_checked(WindowAttention(), torch.randn(1, 3, 11, 9), pairs=1)  # 6 x 5 map, windows of 4
    assert {"pad_nd", "slice"} <= set(ops_of(g)) and not opaque_targets(g)  # channels-last pad, crop
    assert [n.attrs["index"] for n in g.nodes if n.op == "select"] == [0, 1, 2]
    assert {"layer_norm", "linear", "matmul", "softmax", "scale"} <= set(ops_of(g))


class ViTBlock(nn.Module):
    """Patch embedding (conv + BN, patch size asserted) and a pre-norm attention block using SDPA."""

    def __init__(self, dim: int = 16, heads: int = 2, patch: int = 4) -> None:
        super().__init__()
        self.patch, self.heads = patch, heads
        self.embed = ConvBN(3, dim, patch, stride=patch)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attn(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

    def forward(self, x):
        B, C, H, W = x.shape
        assert H % self.patch == 0 and W % self.patch == 0, f"input {H}x{W} not divisible by the patch size"
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def test_vit_block_with_sdpa():
    # embed's conv is 4 x 4 with padding 2 (k // 2): the map is 3 x 3 for a 8 x 8 input
    g = capture_checked(ViTBlock(), torch.randn(2, 3, 8, 8), pairs=1)
    sdpa = [n for n in g.nodes if n.op == "attention"]
    assert len(sdpa) == 1 and not opaque_targets(g) and sdpa[0].attrs == {"scale": None, "causal": False, "gqa": False}
    q, k, v = (i.producer for i in sdpa[0].inputs)  # qkv.unbind(0): three selects of one permuted value
    assert [(n.op, n.attrs["index"]) for n in (q, k, v)] == [("select", 0), ("select", 1), ("select", 2)]
    assert q.x is k.x is v.x and q.x.producer.op == "permute"
    assert [n.source for n in g.nodes if n.op == "linear"] == ["qkv", "proj", "mlp.0", "mlp.2"]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt-like (with a BN after the depthwise conv): channels-last MLP, layer scale, residual."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.bn = nn.BatchNorm2d(dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim))

    def forward(self, x):
        shortcut = x
        x = self.bn(self.dwconv(x)).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        return shortcut + x.permute(0, 3, 1, 2)


def test_convnext_block():
    g = capture_checked(ConvNeXtBlock(), torch.randn(1, 8, 6, 6), pairs=1)
    assert ops_of(g) == ["conv2d", "batch_norm", "permute", "layer_norm", "linear", "gelu", "linear", "scale", "permute", "add"]
    scale = g.nodes[7]
    assert scale.attrs["axis"] == 3 and scale.params["scale"].shape == (8,)


# --------------------------------------------------------------------------- op mapping details


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding="same", bias=False)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.mean, self.var, None, None, False, 0.1, 1e-3)
        a = F.avg_pool2d(F.pad(x, (1, 0, 2, 0)), 3, 1, count_include_pad=False)
        b = torch.sigmoid(F.gelu(x[:, :, :, 1:], approximate="tanh"))
        c = torch.cat([a, b], dim=1)
        p = F.adaptive_avg_pool2d(c, 1) + c.mean((2, 3), keepdim=True)
        return p.flatten(1).softmax(-1)[0]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = Head()

    def forward(self, x):
        return self.head(x)


def test_mapped_ops_attributes_and_sources():
    g = capture_checked(Net(), torch.randn(2, 4, 5, 6), pairs=1)
    assert ops_of(g) == [
        "conv2d", "batch_norm", "pad", "avg_pool2d", "identity", "slice", "gelu", "sigmoid",
        "concat", "mean", "mean", "add", "reshape_dyn", "softmax", "select",
    ]  # fmt: skip (over the symbolic batch, x[:, :, :, 1:] records its [:] on axis 0 too, and flatten is a view that reads B)
    conv, bn, pad = g.nodes[:3]
    assert conv.attrs["padding"] == (1, 1, 1, 1) and "bias" not in conv.params
    assert bn.attrs["eps"] == 1e-3 and bn.params["weight"].tolist() == [1.0] * 4 and bn.source == "head"
    assert pad.attrs["pads"] == (2, 0, 1, 0)  # torch's (left, right, top, bottom) = (1, 0, 2, 0)
    assert g.nodes[3].attrs == {"kernel": (3, 3), "stride": (1, 1), "padding": (0, 0), "count_include_pad": False, "ceil_mode": False}
    assert [n.attrs["dims"] for n in g.nodes if n.op == "mean"] == [(2, 3), (2, 3)]
    assert {n.source for n in g.nodes} == {"head.conv", "head"}
    assert g.nodes[5].attrs == {"axis": 3, "start": 1, "end": None, "step": 1}  # x[:, :, :, 1:]


class Outputs(nn.Module):
    """Several outputs in a dict: tuple-valued calls, constants read and returned, a dtype a scale cannot give."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.register_buffer("pos", torch.randn(1, 4, 3, 3))
        self.register_buffer("k", torch.tensor([2.0], dtype=torch.float64))
        self.table = nn.Parameter(torch.randn(3))

    def forward(self, x):
        a, b = torch.maximum(x, self.pos).chunk(2, dim=1)
        low = x.min(dim=1)  # values and indices: no op in the table (``max``'s values are an ``amax``)
        return {"y": self.conv(a) + b, "low": low.values, "table": self.table, "k": x * self.k}


def test_outputs_constants_and_tuple_valued_calls():
    model = Outputs().eval()
    x = torch.randn(1, 4, 3, 3)
    cap = capture_export(copy.deepcopy(model), (x,))
    with torch.no_grad():
        ref = model(x)
    got = pytree.tree_unflatten(list(run_graph(cap.graph, x)), cap.output_spec)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key].dtype == ref[key].dtype
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
    g = cap.graph
    big = next(n for n in g.nodes if n.op == "opaque" and n.attrs["fn"].target is aten.maximum.default)
    assert big.attrs["fn"].args_template == (In(0), Buf("c0"))  # the buffer travels with the call
    low = next(n for n in g.nodes if n.op == "opaque" and n.attrs["fn"].target is aten.min.dim)
    assert low.out.shape is None and all(u.attrs["fn"].name == "getitem" for u in g.users(low.out))
    assert [n.attrs["start"] for n in g.nodes if n.op == "slice"] == [0, 2]  # chunk(2, dim=1): aten.split
    assert any("the scale op gives" in note and "float64" in note for note in cap.notes)
    fused, _ = rewrite(g)
    for out, r in zip(run_graph(fused, x), pytree.tree_leaves(ref)):
        torch.testing.assert_close(out, r)


def test_graph_shares_no_storage_with_the_model():
    model = randomize_bns(ConvNeXtBlock()).eval()
    x = torch.randn(1, 8, 5, 5)
    cap = capture_export(model, (x,))  # not even a copy: the capture itself must clone
    with torch.no_grad():
        before = model(x)
        for t in [*model.parameters(), *model.buffers()]:
            t.add_(1)
    model_ptrs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    graph_ptrs = {p.untyped_storage().data_ptr() for n in cap.graph.nodes for p in n.params.values()}
    assert not model_ptrs & graph_ptrs
    torch.testing.assert_close(run_graph(cap.graph, x), before, rtol=0, atol=0)


# --------------------------------------------------------------------------- refusals


class CountingConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


class ScalesItsInput(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x + 1


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x.relu()
        return -x


class CondBranch(nn.Module):
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: t.sin(), lambda t: t.cos(), (x,))


@pytest.mark.parametrize(
    "model, reason",
    [
        (CountingConv(), "writes into buffer(s) calls"),
        (ScalesItsInput(), "writes into its input(s) x"),
        (Branchy(), "data-dependent"),
        (CondBranch(), "cond"),
    ],
    ids=["buffer", "input", "data-dependent", "cond"],
)
def test_refusals_say_why_in_one_line(model, reason):
    with pytest.raises(CaptureFailed) as info:
        capture_export(model.eval(), (torch.randn(1, 3, 4, 4),))
    msg = str(info.value)
    assert reason in msg and "\n" not in msg


def test_stack_is_a_concat_of_unsqueezed_operands():
    """``aten.stack`` (SKNet's branches on a new axis, at a negative ``dim`` too) in our ops, not a call."""

    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = ConvBN(4, 4), ConvBN(4, 4, k=1)

        def forward(self, x):
            return torch.stack([self.a(x), self.b(x)], 1).sum(1) + torch.stack([x, x * 2], -1).amax(-1)

    graph = capture_checked(Stacked(), torch.randn(2, 4, 6, 5), pairs=2)
    assert "opaque" not in ops_of(graph) and ops_of(graph).count("concat") == 2


def test_the_values_of_a_max_over_an_axis_are_an_amax():
    """``aten.max.dim``'s values (PointNet's pooling over points); its indices stay a call."""

    class Pool(nn.Module):
        def forward(self, x):
            values, indices = torch.max(x, 2, keepdim=True)
            return values * 2, torch.max(x, -1)[0], indices

    graph = capture_checked(Pool(), torch.randn(2, 4, 6))
    assert ops_of(graph).count("amax") == 2 and ops_of(graph).count("opaque") == 2  # the call, and its indices read


class EndOfText(nn.Module):
    """HF CLIP's text pooling: the hidden state at each sequence's highest token id, read with the ids cast to int on
    the hidden state's device; a sequence-length check sends it to torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm, self.proj = nn.Embedding(50, 16), nn.LayerNorm(16), nn.Linear(16, 8, bias=False)

    def forward(self, ids):
        if ids.shape[-1] > 16:
            raise ValueError("Sequence length must be less than max_position_embeddings")
        h = self.norm(self.embed(ids))
        return self.proj(h[torch.arange(h.shape[0], device=h.device), ids.to(dtype=torch.int, device=h.device).argmax(dim=-1)])


def test_a_cast_to_the_tensors_own_device_is_a_cast():
    """``aten._to_copy`` with a ``device=`` was kept a call whatever the device, and export_onnx refused the Stable
    Diffusion text encoder's pooling ("no ONNX lowering for _to_copy.default"; found by a probe).  A device that is
    the tensor's own moves nothing: a ``cast``."""
    import onnxruntime as ort

    from repalgebra import export_onnx

    torch.manual_seed(0)
    model = EndOfText().eval()
    ids = torch.randint(0, 50, (2, 7))
    graph = capture_export(model, (ids,)).graph
    assert "cast" in [n.op for n in graph.nodes]
    proto = export_onnx(model, None, ids)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]),
                                   model(other), rtol=1e-5, atol=1e-5)  # (float32)


class QueriesRepeated(nn.Module):
    """DETR: learned queries ``query_embed.weight.unsqueeze(1).repeat(1, bs, 1)``, and aux outputs made by a loop
    over a tensor (which sends the model to torch.export)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.query_embed, self.layer, self.cls = nn.Embedding(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        src = self.proj(x)
        bs = src.shape[0]
        memory = src.flatten(2).permute(2, 0, 1)
        query = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        hs = torch.stack([self.layer(query + memory.mean(0, keepdim=True)), query]).transpose(1, 2)
        logits = self.cls(hs)
        return {"pred_logits": logits[-1], "aux_outputs": [{"pred_logits": a} for a in logits[:-1]]}


def test_a_repeat_along_the_batch_of_axes_of_size_one_keeps_the_batch_free():
    """The repeat read the batch as a number, so the torch.export capture fixed it: the fused model refused
    batches 1 and 3 (found by a probe).  Repeating axes of size 1 is an expand: the batch stays free."""
    import repalgebra

    torch.manual_seed(0)
    model = QueriesRepeated().double().eval()
    with torch.no_grad():
        model.proj[1].running_mean.uniform_(-1, 1)
        model.proj[1].running_var.uniform_(0.5, 2)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert fused.fuse_report.capture == "specialized" and fused.fuse_report.fired, str(fused.fuse_report)
    with torch.no_grad():
        for b in (1, 3, 5):
            x = torch.randn(b, 3, 8, 8, dtype=torch.float64)
            want, got = pytree.tree_leaves(model(x)), pytree.tree_leaves(fused(x))
            assert len(want) == len(got)
            for w, g in zip(want, got):
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- uninitialised torch.empty


def held_shapes(graph: Graph) -> list[tuple[int, ...]]:
    """The shapes of the tensors the graph holds: node params and the buffers of opaque calls."""
    shapes = [tuple(t.shape) for n in graph.nodes for t in n.params.values()]
    fns = [n.attrs["fn"] for n in graph.nodes if n.op == "opaque" and isinstance(n.attrs.get("fn"), nn.Module)]
    return shapes + [tuple(t.shape) for fn in fns for t in fn.buffers()]


class ScoresIntoEmpty(nn.Module):
    """diffusers' attention scores, ``torch.baddbmm(torch.empty(B, L, L), q, k^T, beta, alpha)``, and the same with
    ``addbmm`` and ``addmm``; ``beta`` 0 ignores the uninitialised input, another beta adds ``1 + x`` along the keys."""

    def __init__(self, call: str, beta: float = 0.0, c: int = 4) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(c, c), nn.Linear(c, c)
        self.call, self.beta = call, beta

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        B, L = q.shape[:2]
        if self.call == "baddbmm":
            start = torch.empty(B, L, L, dtype=q.dtype) if self.beta == 0 else torch.ones(B, L, L, dtype=q.dtype) + x[..., :1].transpose(1, 2)
            return torch.baddbmm(start, q, k.transpose(-1, -2), beta=self.beta, alpha=0.5).softmax(-1) @ x
        if self.call == "addbmm":
            return torch.addbmm(torch.empty(L, L, dtype=q.dtype), q, k.transpose(-1, -2), beta=0, alpha=0.5).softmax(-1) @ x[0]
        return torch.addmm(torch.empty(L, L, dtype=q.dtype), q[0], k[0].transpose(0, 1), beta=0, alpha=0.5).softmax(-1) @ x[0]


@pytest.mark.parametrize("call, beta", [("baddbmm", 0.0), ("baddbmm", 0.25), ("addbmm", 0.0), ("addmm", 0.0)])
def test_a_product_added_to_an_uninitialised_empty_reads_none_of_it(call, beta):
    """``aten.baddbmm`` (and ``addbmm``, ``addmm``) had no handler: the call was carried through whole and the
    ``torch.empty`` it is given at ``beta=0``, computed once like any call of constants, held as its buffer: an
    (2, 5, 5) tensor of whatever memory held (up to 3e37, NaN at times), another in every capture.  Now it is
    ``alpha (b1 @ b2)`` (summed over the batch for ``addbmm``) plus ``beta input`` where beta is not 0; the empty
    is read by nothing and no tensor of its shape is held."""
    model = ScoresIntoEmpty(call, beta).double().eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cap = capture_export(copy.deepcopy(model), (x,))
    assert not opaque_targets(cap.graph)
    assert (5, 5) not in held_shapes(cap.graph) and (2, 5, 5) not in held_shapes(cap.graph)
    with torch.no_grad():
        assert rel_err(run_graph(cap.graph, x), model(x)) <= 1e-12  # float64, one product summed in another order


class WrittenIntoEmpty(nn.Module):
    """``torch.empty`` (or a buffer's ``new_empty``) written in part (``out[..., :2] = x``) and read where written:
    its other values are read by the ``slice_scatter`` the write becomes, not by the output.  A conv and BatchNorm
    to fold before it, and a size test that sends the model to ``torch.export``."""

    def __init__(self, maker: str) -> None:
        super().__init__()
        self.maker = maker
        self.register_buffer("table", torch.ones(3, dtype=torch.float64))
        self.conv = ConvBN(4, 4, 1)
        bn = self.conv.bn
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.normal_()

    def forward(self, x):
        x = self.conv(x)
        if x.shape[2] % 2:
            x = x[:, :, :-1]
        x = x.flatten(2)
        size = (x.shape[0], x.shape[1], 3)
        out = torch.empty(size, dtype=x.dtype) if self.maker == "empty" else self.table.new_empty(size)
        out[..., :2] = x[..., :2].relu()
        return out[..., :2] * 2


@pytest.mark.parametrize("maker", ["empty", "new_empty"])
def test_an_uninitialised_empty_whose_values_are_read_keeps_the_part_whole(maker):
    """The ``torch.empty`` was computed once and held as a constant of garbage (a (2, 4, 3) tensor, another in every
    capture) for the ``slice_scatter`` to read.  A call that reads its values now refuses the capture, naming the
    call and where; ``fuse`` keeps the module whole and fuses its children: no tensor of that shape is held, the
    conv and BatchNorm fold, and the output is the model's."""
    model = WrittenIntoEmpty(maker).double().eval()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(CaptureFailed, match=r"empty.* at '' makes a tensor whose values a later call reads"):
        capture_export(copy.deepcopy(model), (x,))
    fused = repalgebra.fuse(model, x)
    assert not [name for name, t in fused.named_buffers() if tuple(t.shape) == (2, 4, 3)]
    assert "bn_fold" in str(fused.fuse_report)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-10  # float64: a BatchNorm folded into the conv


class FilledMask(nn.Module):
    """CLIP's causal mask at fixed shapes: ``torch.empty(L, L).fill_(min).triu_(1)``, added to scores."""

    def forward(self, x):
        mask = torch.empty(x.shape[1], x.shape[1], dtype=x.dtype)
        mask.fill_(-1e4)
        mask.triu_(1)
        return (x @ x.transpose(1, 2) + mask).softmax(-1)


def test_an_empty_overwritten_by_a_fill_is_still_a_constant():
    """``fill_`` reads no value of the ``torch.empty`` it overwrites: the mask is computed once, a constant, as
    before the empties read were made per call (where a fill took the empty for read, the ``triu`` of the filled
    mask became a call carried through)."""
    model = FilledMask().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    cap = capture_export(copy.deepcopy(model), (x,))
    assert not opaque_targets(cap.graph)
    with torch.no_grad():
        torch.testing.assert_close(run_graph(cap.graph, x), model(x), rtol=1e-12, atol=0)  # float64, same ops


class Upsampled(nn.Module):
    """A 1-d or 3-d nearest interpolation, captured by ``torch.export`` (an audio decoder's, a 3-D U-Net's)."""

    def __init__(self, rank: int, how: dict) -> None:
        super().__init__()
        self.how = how
        self.conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[rank](3, 4, 1)

    def forward(self, x):
        return F.interpolate(self.conv(x), **self.how)


@pytest.mark.parametrize("shape, how", [((2, 3, 9), dict(scale_factor=2, mode="nearest")),
                                        ((2, 3, 9), dict(size=13, mode="nearest-exact")),
                                        ((1, 3, 3, 4, 5), dict(scale_factor=(2, 1, 3), mode="nearest")),
                                        ((1, 3, 3, 4, 5), dict(size=(5, 7, 6), mode="nearest-exact")),
                                        ((2, 3, 5, 6), dict(size=(7, 9), mode="bilinear", align_corners=True))])
def test_a_1d_or_3d_nearest_upsampling_is_an_interpolate(shape, how):
    """``upsample_nearest1d``/``3d`` (and nearest-exact) were opaque calls of the export path, which ONNX export left
    to torch.onnx.export's rewrite (a ``Gather`` per axis); they are the IR's ``interpolate`` now, exact in float64
    (as a 2-D bilinear one with ``align_corners=True`` is)."""
    graph = capture_checked(Upsampled(len(shape), how), torch.randn(shape))
    assert "interpolate" in ops_of(graph) and not opaque_targets(graph), ops_of(graph)
