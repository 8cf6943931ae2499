"""The torch front end (``repalgebra.trace``) and back end (``to_module``): ops, sources, params, shapes, errors."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra
from repalgebra import rewrite, run_graph, trace
from repalgebra.backend.torch import OpCall, lowered_ops, to_module
from repalgebra.frontend.calls import FnCall
from repalgebra.frontend.pure import is_pure
from repalgebra.frontend.torch import trace_model
from repalgebra.ops import OPS, op_def


def ops_of(graph) -> list[str]:
    return [n.op for n in graph.nodes]


def node(graph, op: str, k: int = 0):
    return [n for n in graph.nodes if n.op == op][k]


def same(model: nn.Module, x, **kw) -> repalgebra.Graph:
    """Trace, then check the interpreter and the back end both compute the model."""
    model.eval()
    g = trace(model, x, **kw)
    xs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        ref = model(*xs)
        torch.testing.assert_close(run_graph(g, *xs), ref)
        torch.testing.assert_close(to_module(g)(*xs), ref)
    return g


# --------------------------------------------------------------------------- modules


def test_recognised_modules_become_ops_with_sources():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Identity(),
        nn.AvgPool2d(3, 1, 1),
        nn.GELU(approximate="tanh"),
        nn.Sigmoid(),
        nn.ZeroPad2d((1, 0, 2, 0)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.LayerNorm(6),
        nn.Softmax(-1),
    )
    g = same(model, torch.randn(2, 3, 6, 6))
    assert ops_of(g) == [
        "conv2d", "batch_norm", "relu", "identity", "identity", "avg_pool2d", "gelu", "sigmoid", "pad",
        "mean", "flatten", "linear", "batch_norm", "layer_norm", "softmax",
    ]
    assert [n.source for n in g.nodes] == [str(k) for k in range(15)]
    assert node(g, "gelu").attrs["approximate"] == "tanh"
    assert node(g, "pad").attrs["pads"] == (2, 0, 1, 0)
    assert node(g, "mean").attrs == {"dims": (2, 3), "keepdim": True}


def test_nested_paths_and_params_cloned():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.layer_scale = nn.Parameter(torch.rand(4, 1, 1))

        def forward(self, x):
            return x + self.layer_scale * self.conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Sequential(Inner(), Inner())])

        def forward(self, x):
            return self.stages[0](x)

    model = Net()
    g = trace(model, torch.randn(1, 4, 5, 5))
    assert [(n.op, n.source) for n in g.nodes] == [
        ("conv2d", "stages.0.0.conv"), ("scale", "stages.0.0.layer_scale"), ("add", "stages.0.0"),
        ("conv2d", "stages.0.1.conv"), ("scale", "stages.0.1.layer_scale"), ("add", "stages.0.1"),
    ]
    conv, scale = g.nodes[0], g.nodes[1]
    src = model.stages[0][0]
    assert torch.equal(conv.params["weight"], src.conv.weight) and not conv.params["weight"].requires_grad
    assert conv.params["weight"].data_ptr() != src.conv.weight.data_ptr()
    assert scale.params["scale"].data_ptr() != src.layer_scale.data_ptr()
    assert scale.attrs["axis"] == 1 and scale.params["scale"].shape == (4,)


def test_conv_padding_forms():
    for conv, pads in [
        (nn.Conv2d(2, 2, 3, padding="same"), (1, 1, 1, 1)),
        (nn.Conv2d(2, 2, 4, padding="same"), (1, 2, 1, 2)),
        (nn.Conv2d(2, 2, (2, 3), padding="same", dilation=2), (1, 1, 2, 2)),
        (nn.Conv2d(2, 2, 3, padding="valid"), (0, 0, 0, 0)),
        (nn.Conv2d(2, 2, 3, padding=(2, 1)), (2, 2, 1, 1)),
    ]:
        g = same(conv, torch.randn(1, 2, 7, 8))
        assert node(g, "conv2d").attrs["padding"] == pads, conv
    g = same(nn.Conv2d(2, 2, 4, padding="same"), torch.randn(1, 2, 7, 8))
    assert any(isinstance(m, nn.ZeroPad2d) for m in to_module(g).modules())


def test_conv_without_bias_and_bn_affine_false():
    g = same(nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3, affine=False)), torch.randn(1, 2, 3, 3))
    assert set(g.nodes[0].params) == {"weight"}
    bn = g.nodes[1]
    assert torch.equal(bn.params["weight"], torch.ones(3)) and torch.equal(bn.params["bias"], torch.zeros(3))


def test_unknown_modules_are_opaque_deep_copies():
    pool = nn.LPPool2d(2, 2)
    shrink = nn.Softshrink(0.25)  # (nn.Softplus is an op now)
    model = nn.Sequential(nn.Conv2d(2, 2, 1), pool, shrink, nn.Softsign())
    g = same(model, torch.randn(1, 2, 6, 6))
    assert ops_of(g) == ["conv2d", "opaque", "opaque", "opaque"]
    fns = [n.attrs["fn"] for n in g.nodes[1:]]
    assert isinstance(fns[0], nn.LPPool2d) and fns[0] is not pool and fns[1] is not shrink
    assert node(g, "opaque", 2).out.shape == (1, 2, 3, 3)


class UpsampleTo(nn.Module):
    """A transposed conv called with ``output_size`` (its output's size chosen per call): kept opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)

    def forward(self, x, skip):
        return self.up(x, output_size=skip.shape[-2:]) + skip


def test_transposed_convs_are_an_op_with_pytorch_s_arguments():
    for conv in [
        nn.ConvTranspose2d(2, 4, 3, padding=1),
        nn.ConvTranspose2d(4, 6, (4, 3), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=2, bias=False),
        nn.ConvTranspose2d(2, 2, 3, stride=2, dilation=2, output_padding=1),
    ]:
        g = same(conv, torch.randn(2, conv.in_channels, 5, 6))
        n = node(g, "conv_transpose2d")
        assert n.attrs == {"stride": conv.stride, "padding": conv.padding, "output_padding": conv.output_padding,
                           "dilation": conv.dilation, "groups": conv.groups}, conv
        assert set(n.params) == ({"weight"} if conv.bias is None else {"weight", "bias"})
        assert torch.equal(n.params["weight"], conv.weight.detach())
    g = same(UpsampleTo(), (torch.randn(1, 2, 4, 4), torch.randn(1, 3, 8, 8)))
    assert "conv_transpose2d" not in ops_of(g)


def test_subclass_with_its_own_forward_is_not_mistaken_for_its_base():
    class WSConv(nn.Conv2d):  # weight standardisation: not a plain conv
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    conv = WSConv(2, 3, 3, padding=1)
    g = same(conv, torch.randn(1, 2, 5, 5))
    # Its own forward runs: a conv with the standardized weight (computed once from the parameter), not the raw one.
    w = node(g, "conv2d").params["weight"]
    assert not torch.equal(w, conv.weight.detach())
    torch.testing.assert_close(w.mean((1, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)  # float32 rounding of the mean


class GainedConv(nn.Module):
    """NF-ResNet's scaled weight: ``weight * gain`` from two parameters, in every forward."""

    def __init__(self, noise: bool = False) -> None:
        super().__init__()
        self.conv, self.gain, self.noise = nn.Conv2d(2, 3, 3, padding=1), nn.Parameter(torch.rand(3, 1, 1, 1) + 0.5), noise

    def forward(self, x):
        w = self.conv.weight * self.gain
        if self.noise:  # random: must be drawn on every call, never once at capture
            w = w + 0.0 * torch.randn_like(w)
        return F.conv2d(x, w, self.conv.bias, padding=1)


def test_pure_calls_on_parameters_are_made_once_at_capture():
    model = GainedConv()
    g = same(model, torch.randn(1, 2, 5, 5))
    assert ops_of(g) == ["conv2d"]
    assert torch.equal(node(g, "conv2d").params["weight"], (model.conv.weight * model.gain).detach())  # the same ops, bits
    g = trace(GainedConv(noise=True), torch.randn(1, 2, 5, 5))
    assert "opaque" in ops_of(g)  # randn_like is not pure: it stays a call


def test_bifpn_fusion_weights_are_made_once_and_fold():
    """EfficientDet's fast normalized fusion, ``w = relu(self.w); w = w / (w.sum() + eps)``: computed once from the
    parameter, so each ``w[i] * branch`` is a scale by a number that folds into the branch's conv."""

    class WeightedSum(nn.Module):
        def __init__(self, module: bool) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.7, -0.2, 1.3]))
            self.convs = nn.ModuleList(nn.Conv2d(2, 3, 3, padding=1) for _ in range(3))
            self.w_relu = nn.ReLU() if module else F.relu  # the official EfficientDet writes an nn.ReLU module

        def forward(self, x):
            w = self.w_relu(self.w)
            w = w / (torch.sum(w, dim=0) + 1e-4)
            return sum(w[i] * conv(x) for i, conv in enumerate(self.convs))

    for module in (False, True):
        g = rewrite(same(WeightedSum(module), torch.randn(1, 2, 5, 5)))[0]
        assert g.op_counts() == {"conv2d": 1}, g.op_counts()  # the scales folded, then the three convs summed
    assert not is_pure("call_function", F.relu, (torch.zeros(2),), {"inplace": True})  # writes its argument
    assert not is_pure("call_function", F.relu, (torch.zeros(2), True), {})
    assert not is_pure("call_module", nn.ReLU(inplace=True), (torch.zeros(2),), {})
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda m, a, out: None)
    assert not is_pure("call_module", hooked, (torch.zeros(2),), {})  # its hook runs on every call


# --------------------------------------------------------------------------- functions


def test_functions_and_methods():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 2, 3, 3))
            self.b = nn.Parameter(torch.randn(4))
            self.lw = nn.Parameter(torch.randn(5, 4))
            self.register_buffer("rm", torch.randn(4))
            self.register_buffer("rv", torch.rand(4) + 0.5)

        def forward(self, x):
            y = F.conv2d(F.pad(x, (1, 1, 2, 0)), self.w, self.b, padding=(0, 0))
            y = F.batch_norm(y, self.rm, self.rv, eps=1e-3)
            y = F.relu(y) + torch.relu(y) - F.gelu(y)
            y = torch.cat([y, x.mean((2, 3), keepdim=True).expand(-1, -1, y.shape[2], y.shape[3])], dim=1)
            z = y[:, :4].permute(0, 2, 3, 1).contiguous()
            z = F.linear(z, self.lw)
            z = z.transpose(1, 2).flatten(2) * 2.0
            a = z @ z.transpose(-1, -2)
            return torch.softmax(a, dim=-1), z.view(-1, 5)

    g = same(M().double(), torch.randn(2, 2, 5, 6, dtype=torch.float64))
    ops = ops_of(g)
    for op in ("pad", "conv2d", "batch_norm", "relu", "gelu", "add", "sub", "concat", "mean", "permute",
               "linear", "transpose", "flatten", "scale", "matmul", "softmax", "reshape"):
        assert op in ops, op
    assert "contiguous" not in ops and "identity" not in ops  # a layout only the linear reads: none kept
    assert node(g, "concat").attrs["axis"] == 1
    assert node(g, "pad").attrs["pads"] == (2, 0, 1, 1)
    assert node(g, "batch_norm").attrs["eps"] == 1e-3
    assert node(g, "reshape").attrs["shape"] == (-1, 5)


def test_clones_and_contiguous_copies_are_the_same_values():
    """FasterNet's partial conv, ``x = x.clone(); x[:, :d] = conv(x[:, :d])``, and ``torch.clone``/``contiguous``
    with a memory format: no call is carried (they were opaque calls).  The clones are identities; of the two
    layouts, the one the output keeps is kept (the other is the identity: dropped)."""

    class PartialConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)

        def forward(self, x):
            x = x.clone()
            x[:, :2, :, :] = self.conv(x[:, :2, :, :])
            return torch.clone(x, memory_format=torch.contiguous_format).contiguous(memory_format=torch.channels_last)

    g = same(PartialConv().double(), torch.randn(2, 4, 5, 6, dtype=torch.float64))
    assert "opaque" not in ops_of(g) and ops_of(g).count("identity") == 1, ops_of(g)
    assert [n.attrs["memory_format"] for n in g.nodes if n.op == "contiguous"] == [torch.channels_last]


def test_mul_by_constants_and_activations():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.g1 = nn.Parameter(torch.rand(3, 1, 1))
            self.g2 = nn.Parameter(torch.rand(1, 3, 1, 1))
            self.register_buffer("g3", torch.rand(5))
            self.register_buffer("full", torch.rand(3, 4, 5))

        def forward(self, x):
            a = self.g1 * x
            b = x * self.g2
            c = 3 * x * self.g3  # along the last axis
            d = x * self.full  # not per channel: a constant node times x
            return a * b + c * d

    g = same(M(), torch.randn(2, 3, 4, 5))
    scales = [n for n in g.nodes if n.op == "scale"]
    assert [s.attrs["axis"] for s in scales] == [1, 1, 1, 3]
    assert [s.source for s in scales] == ["g1", "g2", "", "g3"]
    assert ops_of(g).count("mul") == 3 and ops_of(g).count("constant") == 1 and "opaque" not in ops_of(g)


def test_dynamic_sizes_are_read_at_run_time():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            B, C, H, W = x.shape
            t = self.proj(x.flatten(2).transpose(1, 2))
            return t.transpose(1, 2).reshape(B, C, H, W) + x.view(x.size(0), -1).reshape_as(x)

    model = Tokens()
    g = same(model, torch.randn(1, 4, 3, 5))
    assert ops_of(g).count("reshape_dyn") == 3
    fused = repalgebra.fuse(model, torch.randn(1, 4, 3, 5))
    x = torch.randn(3, 4, 6, 2)  # another batch and resolution
    torch.testing.assert_close(fused(x), model(x))


def test_shape_reads_move_off_foldable_values():
    """``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``: the shape is read from x and the weight."""

    class LinearNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            x = self.c(x)
            return self.bn(x.flatten(0, 1)).reshape_as(x)

    g = same(LinearNorm(), torch.randn(2, 3, 4))
    rs = node(g, "reshape_dyn")
    assert rs.inputs[1] is g.inputs[0] and rs.attrs["shape"] == (((0, 0),), ((0, 1),), 6)


@pytest.mark.parametrize("conv", ["transposed", "3d"])
def test_a_shape_read_does_not_land_on_a_conv_its_bn_folds_into(conv):
    """``bn(conv(x)).unsqueeze(2)`` reads the BN output's sizes; moved onto the conv's output, the read kept the conv
    a second reader, and the BN did not fold ("the conv before it is also read elsewhere", probe).  A transposed
    conv and a 3-D conv fold their BN as a conv2d does."""
    if conv == "transposed":
        model = nn.Sequential(nn.ConvTranspose2d(8, 8, 3, 2, 2, output_padding=1, groups=4, dilation=2), nn.BatchNorm2d(8))
        x, wrap = torch.randn(2, 8, 6, 6), lambda m: (lambda x: m(x).unsqueeze(2))
    else:
        model = nn.Sequential(nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(8))
        x, wrap = torch.randn(2, 8, 6, 6), lambda m: (lambda x: m(x.unsqueeze(2)).squeeze(2))

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x):
            return wrap(self.m)(x)

    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    fused = repalgebra.fuse(Wrapped().eval(), x)
    assert "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    assert repalgebra.verify(Wrapped().eval(), fused, x, dtype=torch.float64)


@pytest.mark.parametrize("const", ["per-channel", "per-column"])
def test_a_shape_read_moves_through_an_added_constant_of_size_one_along_the_axis(const):
    """YOLOv7's head: ``x = im(m(ia(x))); bs, _, ny, nx = x.shape; x.view(bs, na, no, ny, nx)``, where ``ia`` adds a
    ``(1, C, 1, 1)`` parameter (ImplicitA) before the 1x1 conv ``m``.  The read moved off the conv onto the add and
    stopped there: the add then had two readers, and did not fold into the conv (review R16a).  Along an axis where
    the constant has size 1 the sum has its input's size at every size; along one where it does not (``x +
    pos[..., :W]`` of shape ``(1, 1, 1, W)``: an input of width 1 takes its width) the read stays."""
    shape = (1, 4, 1, 1) if const == "per-channel" else (1, 1, 1, 8)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.implicit, self.m, self.bn = nn.Parameter(torch.randn(shape)), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)

        def forward(self, x):
            y = self.bn(self.m(self.implicit + x))
            bs, _, ny, nx = y.shape
            return y.view(bs, 2, 3, ny, nx).permute(0, 1, 3, 4, 2).contiguous()

    model, x = Head().eval(), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    fused = repalgebra.fuse(model, x)
    ops = fused.fuse_report.ops_after
    assert "batch_norm" not in ops and ("add_const" in ops) == (const == "per-column"), str(fused.fuse_report)
    for t in (x, torch.randn(1, 4, 5, 8)):
        torch.testing.assert_close(fused(t), model(t), rtol=1e-5, atol=1e-6)  # float32, folded in float64
    if const == "per-column":  # (the model runs at width 8 and 1 only: fuse fixed the width, and refuses width 1)
        with pytest.raises(ValueError, match="fixed at"):
            fused(torch.randn(1, 4, 5, 1))


def test_getitem_and_other_calls_are_fncalls():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 6, 4, 4))

        def forward(self, x):
            q, k = x.sort(dim=1)
            return (q + self.pos[:, :, : x.shape[2]]).cumsum(1), k.float().expm1()

    g = same(M(), (torch.randn(2, 6, 4, 4),))
    fns = [n.attrs["fn"] for n in g.nodes if n.op == "opaque"]
    assert all(isinstance(f, FnCall) for f in fns)
    assert {f.name for f in fns} >= {"sort", "getitem", "cumsum", "expm1"} and "cast" in ops_of(g)  # k.float(): an op
    sort = next(n for n in g.nodes if n.op == "opaque" and n.attrs["fn"].name == "sort")
    assert sort.out.shape is None  # a tuple of tensors
    assert "broadcast_add" in ops_of(g)  # q + a slice of the table read at the input's size


# --------------------------------------------------------------------------- inputs, errors, leaves


def test_inferred_inputs():
    assert trace(nn.Conv2d(5, 2, 1)).inputs[0].shape == (1, 5, 64, 64)
    assert trace(nn.Sequential(nn.Linear(7, 2), nn.ReLU())).inputs[0].shape == (1, 7)
    assert trace(nn.BatchNorm2d(3).eval()).inputs[0].shape == (1, 3, 64, 64)
    r = trace_model(nn.Conv2d(5, 2, 1).double())
    assert r.inferred_input.startswith("1x5x64x64 float64 from Conv2d")
    with pytest.raises(ValueError, match="cannot infer"):
        trace(nn.ReLU())
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x):  # expects (B, 12, N): the guess (1, 12) does not fit
            return self.fc(x.permute(0, 2, 1))

    with pytest.raises(ValueError, match="does not run on the inferred input"):
        trace(Transposed())


def test_untraceable_names_path_and_leaf_fix():
    class Picky(nn.Module):
        def forward(self, x):
            return x if x.max() > 1 else x * 2

    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Sequential(nn.ReLU(), Picky()))
    with pytest.raises(TypeError, match=r"(?s)'1\.1' \(Picky\).*leaf_modules=\(Picky,\)"):
        trace(model, torch.randn(1, 2, 3, 3))
    g = same(model, torch.randn(1, 2, 3, 3), leaf_modules=["1.1"])
    assert ops_of(g) == ["conv2d", "relu", "opaque"] and node(g, "opaque").source == "1.1"
    with pytest.raises(ValueError, match="not a submodule"):
        trace(model, torch.randn(1, 2, 3, 3), leaf_modules=[Picky()])
    with pytest.raises(TypeError, match="leaf_modules entries"):
        trace(model, torch.randn(1, 2, 3, 3), leaf_modules=[3])


def test_training_model_traced_in_eval_mode_and_left_untouched():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = trace_model(model, torch.randn(4, 2, 3, 3))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ops_of(r.graph) == ["conv2d", "batch_norm", "identity"] and r.was_training


def test_meta_fallback_to_a_real_run():
    class NeedsValues(nn.Module):
        def forward(self, x):
            return x * x.abs().max().item()  # .item() cannot run on meta tensors

    g = same(nn.Sequential(nn.Conv2d(2, 2, 1), NeedsValues()), torch.randn(1, 2, 3, 3), leaf_modules=[NeedsValues])
    assert ops_of(g) == ["conv2d", "opaque"]


# --------------------------------------------------------------------------- back end


def test_every_op_has_a_torch_lowering():
    assert set(lowered_ops()) == set(OPS)


def test_backend_names_and_eval_mode():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))])

        def forward(self, x):
            return self.stages[0](x) + x

    fused = repalgebra.fuse(Net(), torch.randn(1, 2, 4, 4))
    names = dict(fused.named_modules())
    assert isinstance(names["stages_0"], nn.Conv2d)  # named after the common path of what it fused
    assert not fused.training


def test_op_without_torch_lowering_runs_by_reference(monkeypatch):
    g = trace(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)).eval(), torch.randn(1, 2, 3, 3))
    monkeypatch.delitem(op_def("batch_norm").lowerings, "torch")
    m = to_module(g)
    assert any(isinstance(x, OpCall) for x in m.modules())
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(m(x), run_graph(g, x))


class SizeReadLayerNorm(nn.Module):
    """``F.layer_norm(y, (y.shape[-1],), w, b)`` on channels-last tokens (the normalized shape read from the input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.ln = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        return F.layer_norm(y, (y.shape[-1],), self.ln.weight, self.ln.bias, 1e-6)


def test_a_normalized_shape_read_from_sizes_is_the_weight_s_shape():
    # It was an opaque call, which kept export_onnx from declaring a dynamic batch.
    model = SizeReadLayerNorm().eval()
    g = same(model, torch.randn(2, 3, 5, 6))
    assert node(g, "layer_norm").attrs["normalized_shape"] == (8,) and "opaque" not in ops_of(g)
    x = torch.randn(3, 3, 7, 4)
    torch.testing.assert_close(to_module(g)(x), model(x))


def test_the_long_names_of_arithmetic_are_the_short_ones():
    """``torch.multiply`` (PaddleClas ports' SE modules), ``subtract`` and ``divide``, as functions and methods,
    are ``mul``, ``sub`` and ``div``: no call is carried through, and the SE scale still reads its conv."""

    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            s = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
            z = torch.multiply(y, s).multiply(2.0)
            return torch.divide(torch.subtract(z, y), 3.0).subtract(y).divide(s + 1)

    model = SE().eval()
    x = torch.randn(2, 4, 5, 5)
    graph = trace(model, x)
    assert "opaque" not in graph.op_counts(), graph.op_counts()
    torch.testing.assert_close(run_graph(graph, x), model(x))


def test_compiled_call_templates_resolve_as_the_template_does():
    """``compile_template`` (an FnCall's arguments, built once per module) gives what ``resolve`` gives, per call:
    inputs by position, buffers, a dtype's limit, size expressions with keyword arguments, slices with computed
    bounds; lists are built anew on each call (a callee may change them), constant tuples are shared."""
    from repalgebra.frontend.calls import Buf, DtypeLimit, In, SymExpr, compile_template, resolve

    owner = nn.Module()
    owner.register_buffer("c0", torch.arange(3.0))
    shape = SymExpr("call_function", getattr, (In(1), "shape"), {})
    half = SymExpr("call_function", operator.floordiv, (SymExpr("call_method", "size", (In(0),), {"dim": 1}), 2), {})
    templates = [
        (In(1), In(0)),
        (Buf("c0"), [In(0), 2.5], {"k": DtypeLimit(0, "min")}),
        (In(0), (slice(None), slice(half, None, 2), slice(1, SymExpr("call_function", operator.getitem, (shape, -1), {})))),
        ((1, (2, None), slice(None, -1)), "mode"),
    ]
    for dtype in (torch.float32, torch.float64):
        inputs = (torch.randn(2, 6, 5, dtype=dtype), torch.randn(3, 4, 7, dtype=dtype))
        for t in templates:
            run = compile_template(t)
            got, want = run(inputs, owner), resolve(t, inputs, owner)
            assert repr(got) == repr(want), t
            for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                assert g is w or g == w
    lists = compile_template(([In(0), 1],))
    first, second = lists((torch.ones(1),), owner), lists((torch.ones(1),), owner)
    assert first == second and first[0] is not second[0]
    assert compile_template(templates[3])((), owner) is templates[3]


def test_a_cast_to_the_dtype_of_a_weight_or_a_computed_value_is_the_identity():
    """``h.to(w.dtype)`` and ``y.to(z.dtype)`` (PEFT's LoRA layer) of values the model computes change nothing as long
    as the model is cast as a whole, so they are identities; a dtype written in the code is a ``cast`` to it, and
    one read from the input, or a cast of the input itself to a weight's dtype (the caller's dtype may be another),
    stays a call."""

    class Casts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x.to(self.fc.weight.dtype))
            return y.to(self.fc.weight.dtype) + 1, x.to(torch.float64), y.to(x.dtype), y.to(y.dtype)

    g = same(Casts(), (torch.randn(2, 4),))
    assert sorted(f.name for f in (n.attrs["fn"] for n in g.nodes if n.op == "opaque")) == ["to", "to"]
    assert ops_of(g).count("identity") == 2 and ops_of(g).count("cast") == 1


def test_a_float_times_one_is_the_identity():
    """Conformer's residual ``module(x) * module_factor + x * input_factor`` with factors 1.0 (and ``x / 1.0``): no
    scale op is left."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * 1.0 + x * 1 + x * 0.5 + x / 1.0

    g = same(Residual(), (torch.randn(2, 4),))
    assert ops_of(g).count("identity") == 3 and ops_of(g).count("scale") == 1, ops_of(g)
