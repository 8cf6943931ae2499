"""``Conv1d`` + ``BatchNorm1d`` fold: a 1-D convolution is a ``conv2d`` of height 1 in the graph.

The front end writes ``Conv1d(x)`` as ``flatten(conv2d(x.unsqueeze(2)), 2, 3)`` with a ``1 x k``
kernel, and a ``BatchNorm1d`` right after it as a BatchNorm on the 4-D value before the flatten
(per channel, so it commutes with flattening the two spatial axes): ``bn_fold`` then folds it as
it folds a 2-D one.  Exactness is checked in float64 to 1e-9 relative (``verify``'s float64
tolerance) at the example input and at other batch sizes and lengths (the fx capture holds at any
size), and the ONNX export in float32 to 1e-5 relative (``verify``'s float32 tolerance) at batch 1
and 3 on one export.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from repalgebra import export_onnx, fuse
from zoo import count_bn, seeded

D = torch.float64


def assert_exact_at(model: nn.Module, fused: nn.Module, shapes: list[tuple[int, ...]]) -> None:
    g = torch.Generator().manual_seed(2)
    for shape in shapes:
        x = torch.randn(shape, generator=g, dtype=D)
        with torch.no_grad():
            want, got = model(x), fused(x)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()), msg=lambda m: f"at {shape}: {m}")


@st.composite
def conv1d_bn(draw) -> tuple[nn.Module, int, int]:
    """A Conv1d (any groups, kernel, stride, dilation, padding form, bias) + BatchNorm1d + ReLU + a 1x1 Conv1d + BatchNorm1d."""
    groups = draw(st.sampled_from([1, 2, 4]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel, stride, dilation = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, 2, "valid"] + (["same"] if stride == 1 else [])))
    bias = draw(st.booleans())
    length = draw(st.integers(dilation * (kernel - 1) + 1, 24))

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv1d(cin, cout, kernel, stride, padding, dilation, groups, bias),
            nn.BatchNorm1d(cout),
            nn.ReLU(),
            nn.Conv1d(cout, cout, 1),
            nn.BatchNorm1d(cout),
        )

    return seeded(make, 0)().to(D), cin, length


@given(conv1d_bn())
def test_conv1d_bn_folds_exactly_at_any_batch_and_length(case):
    model, channels, length = case
    fused = fuse(model, torch.randn(2, channels, length, dtype=D))
    assert count_bn(fused) == 0, str(fused.fuse_report)
    assert fused.fuse_report.rule_counts().get("bn_fold") == 2, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, channels, length), (3, channels, length + 7), (1, channels, length + 1)])


class SeparableBlock(nn.Module):
    """QuartzNet/Jasper's block as speech toolkits write it: depthwise-separable Conv1d + BN + ReLU, repeated,
    with a 1x1 Conv1d + BN residual, ``padding=dilation * (k - 1) // 2``."""

    def __init__(self, cin: int = 8, cout: int = 16, k: int = 5, repeat: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for r in range(repeat):
            c = cin if r == 0 else cout
            layers += [
                nn.Conv1d(c, c, k, padding=(k - 1) // 2, groups=c, bias=False),
                nn.Conv1d(c, cout, 1, bias=False),
                nn.BatchNorm1d(cout, eps=1e-3),
            ]
            if r < repeat - 1:
                layers += [nn.ReLU(inplace=True), nn.Dropout(0.1)]
        self.conv = nn.Sequential(*layers)
        self.res = nn.Sequential(nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout, eps=1e-3))
        self.out = nn.Sequential(nn.ReLU(inplace=True), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x) + self.res(x))


class PointNetFeatures(nn.Module):
    """PointNet's shared MLP over points as its public code writes it: Conv1d(k=1) + BN1d + ReLU, max over points."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv1d(3, 16, 1), nn.Conv1d(16, 32, 1), nn.Conv1d(32, 64, 1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(16), nn.BatchNorm1d(32), nn.BatchNorm1d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return torch.max(x, 2, keepdim=True)[0].view(-1, 64)


def test_speech_and_point_cloud_blocks_fold_every_batch_norm():
    for make, channels, length in ((SeparableBlock, 8, 40), (PointNetFeatures, 3, 50)):
        model = seeded(make, 0)().to(D)
        fused = fuse(model, torch.randn(2, channels, length, dtype=D))
        assert count_bn(fused) == 0, str(fused.fuse_report)
        assert_exact_at(model, fused, [(2, channels, length), (3, channels, length + 9)])


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2])
def test_a_conv_that_pads_by_reflection_folds_its_batch_norm(mode, dims):
    """``nn.Conv*d(padding_mode=...)`` pads with ``F.pad(x, ..., mode)`` and convolves unpadded: the front end
    writes it so (a ``pad_nd``, then a conv without padding), and the BatchNorm after the conv folds."""
    conv = {1: nn.Conv1d(4, 8, 3, padding=2, dilation=2, padding_mode=mode), 2: nn.Conv2d(4, 8, (3, 5), padding=(1, 2), padding_mode=mode)}[dims]
    bn = {1: nn.BatchNorm1d(8), 2: nn.BatchNorm2d(8)}[dims]
    model = seeded(lambda: nn.Sequential(conv, bn, nn.ReLU()), 0)().to(D)
    shapes = [(2, 4, 16), (3, 4, 11)] if dims == 1 else [(2, 4, 9, 7), (3, 4, 6, 10)]
    fused = fuse(model, torch.randn(shapes[0], dtype=D))
    assert count_bn(fused) == 0 and fused.fuse_report.capture == "fx", str(fused.fuse_report)
    assert_exact_at(model, fused, shapes)


def test_onnx_export_of_a_fused_conv1d_block_runs_in_onnxruntime_at_any_batch():
    model = seeded(SeparableBlock, 0)()
    x = torch.randn(2, 8, 40)
    proto = export_onnx(fuse(model, x), None, tuple(x.shape), fuse=False)
    assert not [n.op_type for n in proto.graph.node if n.op_type == "BatchNormalization"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        xb = torch.randn(batch, 8, 40, generator=torch.Generator().manual_seed(batch))
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0])
        with torch.no_grad():
            want = model(xb)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class CausalConv1d(nn.Conv1d):
    """A causal TCN's conv as pytorch-tcn and WaveNet ports write it: pad on the left, then ``super().forward``
    (which calls ``F.conv1d``), so the module is not a plain ``Conv1d`` and fx traces into it."""

    def __init__(self, cin: int, cout: int, k: int, dilation: int) -> None:
        super().__init__(cin, cout, k, dilation=dilation)
        self.left = (k - 1) * dilation

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (self.left, 0)))


class CausalBlock(nn.Module):
    def __init__(self, c: int, dilation: int) -> None:
        super().__init__()
        self.conv, self.bn = CausalConv1d(c, c, 3, dilation), nn.BatchNorm1d(c)
        self.pw = nn.Conv1d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(c)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return x + self.bn2(nn.functional.conv1d(y, self.pw.weight, None, 1, "same"))


def test_a_conv1d_written_as_f_conv1d_folds_its_batch_norm():
    """``F.conv1d`` (a ``Conv1d`` subclass's ``super().forward``, or called directly) is the same ``conv2d`` of
    height 1 as ``nn.Conv1d``; it was an opaque call, and the BatchNorm1d after it stayed."""
    model = seeded(lambda: nn.Sequential(CausalBlock(8, 1), CausalBlock(8, 2)), 7)().double()
    fused = fuse(model, torch.randn(2, 8, 30, dtype=D))
    assert count_bn(fused) == 0 and "opaque" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, 8, 30), (3, 8, 17), (1, 8, 64)])


class Fp32GroupNorm(nn.GroupNorm):
    """fairseq's GroupNorm that computes in float32 whatever the model's dtype (wav2vec 2.0's first encoder layer)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = nn.functional.group_norm(input.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return output.type_as(input)


def test_a_float32_model_that_casts_to_float32_itself_keeps_any_length():
    """wav2vec 2.0's feature encoder layer (Conv1d, Dropout, Fp32GroupNorm, GELU) then a Conv1d + BatchNorm1d, in float32.

    ``fuse`` checks a capture in float64, where the model's own ``input.float()`` runs the norm in float32 with
    float32 weights while the check module holds them in float64: that run fails, and the fx capture (any length)
    used to be dropped for one at the example's length.  Such a capture is now compared in the model's dtype,
    float32, to ``verify``'s float32 tolerance 1e-5 (relative to the largest output)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 10, 5, bias=False), nn.Dropout(0.1), Fp32GroupNorm(8, 8), nn.GELU(),
                          nn.Conv1d(8, 8, 3, 2, bias=False), nn.BatchNorm1d(8), nn.GELU()).eval()
    model[5].running_mean.normal_(0, 0.2), model[5].running_var.uniform_(0.5, 2.0)
    fused = fuse(model, torch.randn(1, 1, 400))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, fused.fuse_report
    for shape in [(1, 1, 400), (3, 1, 1000), (2, 1, 333)]:
        x = torch.randn(shape)
        with torch.no_grad():
            want, got = model(x), fused(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()), msg=lambda m: f"at {shape}: {m}")
    # Checked in float32 only, it keeps the model's casts as constants: cast to float64 it refuses, by name.
    assert any("fused for float32 only" in n for n in fused.fuse_report.notes), fused.fuse_report.notes
    with pytest.raises(ValueError, match="was fused in float32.*it casts to a dtype of its own.*called in float64"):
        fused.double()(torch.randn(1, 1, 400, dtype=torch.float64))


@given(groups=st.sampled_from([1, 2]), kernel=st.integers(1, 5), stride=st.integers(1, 3), padding=st.integers(0, 2),
       output_padding=st.integers(0, 2), dilation=st.integers(1, 2), bias=st.booleans())
def test_a_conv_transpose1d_folds_its_batch_norm(groups, kernel, stride, padding, output_padding, dilation, bias):
    """``ConvTranspose1d`` + ``BatchNorm1d`` (a TasNet or vocoder decoder's upsampling) is a ``conv_transpose2d`` of
    height 1, its BN folded; it was an opaque call and an ONNX fallback node, and its BN stayed."""
    if output_padding >= max(stride, dilation):
        output_padding = 0  # PyTorch requires it smaller than the stride or the dilation
    model = seeded(lambda: nn.Sequential(
        nn.ConvTranspose1d(4, 2 * groups, kernel, stride, padding, output_padding, groups, bias, dilation),
        nn.BatchNorm1d(2 * groups), nn.ReLU()), 3)().to(D)
    length = 9
    fused = fuse(model, torch.randn(2, 4, length, dtype=D))
    assert count_bn(fused) == 0 and "opaque" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, 4, length), (3, 4, 5), (1, 4, 20)])


class RepBlock1d(nn.Module):
    """A 1-D RepVGG block as train-time code writes it: a kxk Conv1d + BN, a 1x1 Conv1d + BN and (stride 1, equal
    widths) an identity BN, summed in the order given, then ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int, order: tuple[str, ...]) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv1d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm1d(cout))
        self.pw = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, groups=groups, bias=False), nn.BatchNorm1d(cout))
        self.idn = nn.BatchNorm1d(cin) if stride == 1 and cin == cout else None
        self.order = [b for b in order if b != "idn" or self.idn is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        terms = [getattr(self, b)(x) for b in self.order]
        out = terms[0]
        for t in terms[1:]:
            out = out + t
        return torch.relu(out)


@given(
    groups=st.sampled_from([1, 2]),
    widths=st.sampled_from([(4, 4), (4, 8)]),
    k=st.sampled_from([3, 5]),
    stride=st.sampled_from([1, 2]),
    order=st.permutations(["dense", "pw", "idn"]),
)
def test_a_1d_repvgg_stack_folds_to_one_conv_per_block(groups, widths, k, stride, order):
    """The branches of a Conv1d block read one lift of their input and are summed in 2-D (the sum, the identity BN
    and the ReLU run on the height-one values), so ``branch_sum`` meets them: each block is one conv.  Before, every
    Conv1d was a lift, a conv2d and a flatten of its own, and nothing summed."""
    cin, cout = widths

    def make() -> nn.Module:
        return nn.Sequential(RepBlock1d(cin, cout, k, stride, groups, tuple(order)), RepBlock1d(cout, cout, k, 1, groups, tuple(order)))

    model = seeded(make, 0)().to(D)
    fused = fuse(model, torch.randn(2, cin, 19, dtype=D))
    after = fused.fuse_report.ops_after
    assert count_bn(fused) == 0 and after.get("conv2d") == 2 and "add" not in after, str(fused.fuse_report)
    assert after.get("reshape_dyn") == 1 and after.get("flatten") == 1, str(fused.fuse_report)  # one lift in, one flatten out
    assert_exact_at(model, fused, [(2, cin, 19), (3, cin, 26), (1, cin, 7)])


class TallAfterAll(nn.Module):
    """A 2-D conv flattened to a sequence for a Conv1d: at an example of height 1 the flatten looks like a 1-D
    conv's, but the height is the input's; lifting the sequence back must not be read as undoing it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d, self.conv1d, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv1d(self.conv2d(x).flatten(2, 3)))


def test_a_sequence_flattened_from_an_image_of_height_one_is_not_taken_for_a_1d_one():
    model = seeded(TallAfterAll, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 1, 9, dtype=D))
    assert count_bn(fused) == 0, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, 3, 1, 9), (2, 3, 4, 9)])


def test_the_height_one_walk_is_not_recursive():
    """Whether a value has height one is asked up its producers; a chain longer than Python's recursion limit (a deep
    stack of ``1 x k`` convs on a height-1 input) must not raise ``RecursionError``."""
    from repalgebra.builder import GraphBuilder
    from repalgebra.frontend.height_one import lift_height_one

    b = GraphBuilder()
    y = b.input("x", (1, 2, 1, 5), D)
    for _ in range(3000):
        y = b.relu(y)
    flat = b.flatten(y, start=2, end=3)
    lifted = b.reshape_dyn(flat, flat, shape=(((0, 0),), ((0, 1),), 1, ((0, 2),)))
    graph = lift_height_one(b.build(b.relu(lifted)))
    assert "reshape_dyn" in graph.op_counts()  # the input's height is the example's only: the lift stays


class CausalConvModule(nn.Module):
    """A streaming Conformer's convolution module as speech toolkits write it (causal: the depthwise conv reads only
    the past): pointwise conv, GLU, ``F.pad(x, (k - 1, 0))``, unpadded depthwise Conv1d, BatchNorm1d, SiLU,
    pointwise conv."""

    def __init__(self, c: int = 8, k: int = 5) -> None:
        super().__init__()
        self.lorder = k - 1
        self.pointwise_conv1 = nn.Conv1d(c, 2 * c, 1)
        self.depthwise_conv = nn.Conv1d(c, c, k, padding=0, groups=c)
        self.norm = nn.BatchNorm1d(c)
        self.pointwise_conv2 = nn.Conv1d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        x = nn.functional.pad(x, (self.lorder, 0), "constant", 0.0)
        x = nn.functional.silu(self.norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class Chomp1d(nn.Module):
    """A TCN's chomp: the conv pads both sides, the chomp drops the future."""

    def __init__(self, chomp_size: int) -> None:
        super().__init__()
        self.chomp_size = chomp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.chomp_size].contiguous()


class ChompedBlock(nn.Module):
    """A TCN block with BatchNorm: ``Conv1d(padding=(k - 1) d)``, chomp, BatchNorm1d, ReLU, twice, and a 1x1 residual."""

    def __init__(self, c: int = 6, k: int = 3, dilation: int = 2) -> None:
        super().__init__()
        p = (k - 1) * dilation
        self.net = nn.Sequential(
            nn.Conv1d(c, c, k, padding=p, dilation=dilation), Chomp1d(p), nn.BatchNorm1d(c), nn.ReLU(),
            nn.Conv1d(c, c, k, padding=p, dilation=dilation), Chomp1d(p), nn.BatchNorm1d(c), nn.ReLU(),
        )
        self.downsample = nn.Conv1d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net(x) + self.downsample(x))


class CausalRepBlock1d(nn.Module):
    """A causal 1-D RepVGG block: the k-tap branch reads the past (a left pad, or a conv padded both sides and
    chomped), beside a 1x1 and an identity BatchNorm; or every branch beside a ``padding_mode='reflect'`` conv."""

    def __init__(self, how: str, c: int = 4, k: int = 3) -> None:
        super().__init__()
        self.how, self.k = how, k
        padding = {"left pad": 0, "chomp": k - 1, "reflect": k // 2}[how]
        mode = "reflect" if how == "reflect" else "zeros"
        self.dense = nn.Sequential(nn.Conv1d(c, c, k, padding=padding, padding_mode=mode, bias=False), nn.BatchNorm1d(c))
        self.pw = nn.Sequential(nn.Conv1d(c, c, 1, bias=False), nn.BatchNorm1d(c))
        self.idn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "left pad":
            dense = self.dense(nn.functional.pad(x, (self.k - 1, 0)))
        elif self.how == "chomp":
            dense = self.dense[1](self.dense[0](x)[..., : -(self.k - 1)])
        else:
            dense = self.dense(x)
        return torch.relu(dense + self.pw(x) + self.idn(x))


def test_causal_convs_fold_their_pad_or_chomp_and_their_batch_norm():
    """A left pad before a conv is the conv's own padding (``pad_absorb``, once the pad runs on the height-one lift);
    a chomp after a conv padded on both sides is the conv with less padding (``crop_into_conv``); the BatchNorm after
    either folds.  Exact at other batches and lengths (the fx capture runs at any size)."""
    for make, x_shape, other in ((CausalConvModule, (2, 19, 8), (3, 31, 8)), (ChompedBlock, (2, 6, 20), (1, 6, 33))):
        model = seeded(make, 0)().to(D)
        fused = fuse(model, torch.randn(x_shape, dtype=D))
        after = fused.fuse_report.ops_after
        assert count_bn(fused) == 0 and "pad" not in after and "slice" not in after, str(fused.fuse_report)
        assert_exact_at(model, fused, [x_shape, other])


@pytest.mark.parametrize("how", ["left pad", "chomp", "reflect"])
def test_a_causal_or_reflect_padded_1d_repvgg_block_folds_to_one_conv(how):
    model = seeded(lambda: nn.Sequential(CausalRepBlock1d(how), CausalRepBlock1d(how)), 0)().to(D)
    fused = fuse(model, torch.randn(2, 4, 17, dtype=D))
    after = fused.fuse_report.ops_after
    assert count_bn(fused) == 0 and after.get("conv2d") == 2 and "add" not in after, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, 4, 17), (3, 4, 9), (1, 4, 40)])


class PadsChannels(nn.Module):
    """``F.pad`` of the last two axes of a 1-D value: the first pair pads the channels, not a height, so the pad
    must stay where it is when the conv after it runs on the lift."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(6, 4, 3), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(nn.functional.pad(x, (2, 0, 1, 1))))


def test_a_pad_of_a_1d_values_channels_is_not_taken_for_one_of_its_length():
    model = seeded(PadsChannels, 0)().to(D)
    fused = fuse(model, torch.randn(2, 4, 12, dtype=D))
    assert count_bn(fused) == 0 and fused.fuse_report.capture == "fx", str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, 4, 12), (3, 4, 21)])


class CroppedToInput(nn.Module):
    """WaveNet's causal conv (r9y9's wavenet_vocoder): padded on both sides, cropped back to its input's length by a
    size read, ``y[:, :, :residual.size(-1)]``, then a BatchNorm; ``read`` spells the size another way, or reads it
    from a value that is not the conv's input."""

    def __init__(self, read: str, stride: int = 1, two_d: bool = False, padding: int = 4) -> None:
        super().__init__()
        self.read, self.two_d = read, two_d
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if two_d else (nn.Conv1d, nn.BatchNorm1d)
        self.conv, self.bn = conv(4, 6, 3, stride=stride, padding=padding, dilation=2), bn(6)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        size = {"size": lambda: x.size(-1), "shape": lambda: x.shape[-1], "size_all": lambda: x.size()[-1],
                "other": lambda: other.size(-1)}[self.read]()
        return self.bn(y[..., :size])


@pytest.mark.parametrize("read", ["size", "shape", "size_all"])
@pytest.mark.parametrize("two_d", [False, True])
@pytest.mark.parametrize("padding", [4, 2])
def test_a_crop_to_the_convs_own_input_length_folds_as_a_chomp(read, two_d, padding):
    """The crop is ``pad`` from the end at every length (a stride-1 conv's output is its input's length plus its
    padding less ``dilation * (k - 1)``): a chomp, which ``crop_into_conv`` folds; the BatchNorm then folds too.  It
    was a call kept as it was, and the BatchNorm with it.  Padded to keep the length (2), the crop is no crop."""
    model = seeded(lambda: CroppedToInput(read, two_d=two_d, padding=padding), 0)().to(D)
    shape = (2, 4, 5, 20) if two_d else (2, 4, 20)
    fused = fuse(model, (torch.randn(shape, dtype=D), torch.randn(1, 20, dtype=D)))
    after = fused.fuse_report.ops_after
    assert count_bn(fused) == 0 and "slice" not in after and "opaque" not in after, str(fused.fuse_report)
    for length in (20, 9, 33):
        x = torch.randn(*shape[:-1], length, dtype=D)
        other = torch.randn(1, length, dtype=D)
        torch.testing.assert_close(fused(x, other), model(x, other), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["other", "stride"])
def test_a_crop_to_a_length_the_conv_does_not_fix_stays_a_read(case):
    """Another value's length, or a strided conv's input length (its output is not that length plus a constant):
    the crop reads the size on every call, and the fused model agrees at lengths the example did not have.  Nothing
    else folds here, so fuse returns the model as it is (a fold made on the wrong length would show)."""
    model = seeded(lambda: CroppedToInput("other" if case == "other" else "size", stride=2 if case == "stride" else 1), 0)().to(D)
    fused = fuse(model, (torch.randn(2, 4, 20, dtype=D), torch.randn(1, 20, dtype=D)))
    assert isinstance(fused, CroppedToInput) and count_bn(fused) == 1, str(fused.fuse_report)
    for length, cut in ((20, 14), (33, 5), (40, 21)):
        x, other = torch.randn(3, 4, length, dtype=D), torch.randn(1, cut, dtype=D)
        torch.testing.assert_close(fused(x, other), model(x, other), rtol=1e-12, atol=1e-12)


class LoraConv1d(nn.Module):
    """peft's LoRA on a Conv1d: ``base(x) + lora_B(lora_A(x)) * scaling``, then a BatchNorm1d; or a residual scale
    ``conv(x) * 0.5`` before it."""

    def __init__(self, lora: bool) -> None:
        super().__init__()
        self.lora, self.scaling = lora, 2.0
        self.base, self.lora_A = nn.Conv1d(4, 8, 3, padding=1), nn.Conv1d(4, 2, 3, padding=1, bias=False)
        self.lora_B, self.bn = nn.Conv1d(2, 8, 1, bias=False), nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling if self.lora else self.base(x) * 0.5
        return self.bn(y)


@pytest.mark.parametrize("lora", [True, False])
def test_a_conv1d_scaled_by_a_number_folds_its_batch_norm(lora):
    """A number times a Conv1d's output is a scale along the length, its factor repeated, and it stopped the 1-D
    lift: the BatchNorm1d stayed and LoRA's branches did not merge (3 convs; a probe).  A scale by one number runs
    on the lift like a ReLU: one conv, at any batch and length (float64, to 1e-9)."""
    model = seeded(lambda: LoraConv1d(lora), 0)().to(D).eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.running_mean.normal_()
    fused = fuse(model, torch.randn(2, 4, 20, dtype=D))
    assert count_bn(fused) == 0 and fused.fuse_report.ops_after.get("conv2d") == 1, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, 4, 20), (3, 4, 11), (1, 4, 33)])


class ScalesTheLength(nn.Module):
    """A learned factor per position of a fixed length (a 1-D positional gain), after a Conv1d and before its BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 20))

    def forward(self, x):
        return self.bn(self.conv(x) * self.gain)


def test_a_scale_along_the_length_is_not_lifted():
    """Only a scale by one number runs on the lift: factors that differ along the length are no channel scale,
    and the model computes what it did (float64, to 1e-9)."""
    model = seeded(ScalesTheLength, 0)().to(D).eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    fused = fuse(model, torch.randn(2, 4, 20, dtype=D))
    assert fused.fuse_report.capture == "fx", str(fused.fuse_report)  # (taken for a number, the check refused it)
    assert_exact_at(model, fused, [(2, 4, 20), (3, 4, 20)])


class NormalizedInput(nn.Module):
    """A BatchNorm1d on the model's input before a Conv1d (PointNet's and DLRM-style feature normalization), its
    output also added back where ``residual``."""

    def __init__(self, k: int, residual: bool) -> None:
        super().__init__()
        self.bn, self.conv, self.residual = nn.BatchNorm1d(4), nn.Conv1d(4, 4, k, padding=k // 2), residual

    def forward(self, x):
        y = self.bn(x)
        return torch.relu(self.conv(y) + y if self.residual else self.conv(y))


@pytest.mark.parametrize("k, residual, bns", [(1, False, 0), (1, True, 0), (3, False, 1)], ids=["1x1", "read twice", "padded"])
def test_a_batch_norm_on_the_input_before_a_1x1_conv1d_folds_into_it(k, residual, bns):
    """Its output, not its input, was lifted to 2-D, so ``bn_before_conv`` never met it (it stayed; a probe).  The
    lift now moves above a per-channel op (with a residual the identity becomes a conv of it too, and the two
    merge).  A zero-padded conv reads its border's zeros, not the BN's shift, so there the BN stays; every case is
    exact at any batch and length (float64, to 1e-9)."""
    model = seeded(lambda: NormalizedInput(k, residual), 0)().to(D).eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.running_mean.normal_()
    fused = fuse(model, torch.randn(2, 4, 20, dtype=D))
    assert count_bn(fused) == bns, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, 4, 20), (3, 4, 11), (1, 4, 33)])


class PaddedAfterNorm(nn.Module):
    """SpeechBrain's ``Conv1d`` after a BatchNorm1d: it pads "same" with ``F.pad(x, (p, p), mode="reflect")`` before
    its ``nn.Conv1d``, even of 0 (a 1x1 conv: ECAPA-TDNN's ``asp_bn`` then ``fc``, on pooled statistics of length 1)."""

    def __init__(self, k: int, mode: str, pooled: bool) -> None:
        super().__init__()
        self.k, self.mode, self.pooled = k, mode, pooled
        self.bn, self.conv = nn.BatchNorm1d(4), nn.Conv1d(4, 3, k)

    def forward(self, x):
        if self.pooled:  # mean and std over time, as attentive statistics pooling ends
            x = torch.cat([x.mean(-1, keepdim=True), x.std(-1, keepdim=True)], 1)
        p = (self.k - 1) // 2
        return self.conv(torch.nn.functional.pad(self.bn(x), (p, p), mode=self.mode))


@pytest.mark.parametrize("k, mode, pooled", [(1, "reflect", True), (3, "reflect", False), (5, "replicate", False),
                                             (3, "circular", False)])
def test_a_batch_norm_before_a_copying_pad_and_a_conv1d_folds_into_it(k, mode, pooled):
    """The pad ran on the lift (it was read by the conv), the BatchNorm before it on the 3-D value, so
    ``bn_before_conv`` never met the two in 2-D, and ECAPA-TDNN kept every BatchNorm it has (review R19a).  A pad
    that copies pixels commutes with a per-channel map; exact at any batch and length (float64, to 1e-9)."""
    model = seeded(lambda: PaddedAfterNorm(k, mode, pooled), 0)().to(D).eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.running_mean.normal_()
    c_in = 2 if pooled else 4
    fused = fuse(model, torch.randn(2, c_in, 20, dtype=D))
    assert count_bn(fused) == 0, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, c_in, 20), (3, c_in, 11), (1, c_in, 33)])


class GatedSteps(nn.Module):
    """A gated 1-D CNN taking its value and gate channels with ``y.narrow(-2, ...)``, after a per-step loop torch.fx
    cannot trace (captured by torch.export)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.conv_b, self.bn_b = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)

    def forward(self, x):
        y = torch.cat([x[:, :, t:t + 1] for t in range(x.shape[2])], 2)
        return self.bn_a(self.conv_a(y.narrow(-2, 0, 8))) * torch.sigmoid(self.bn_b(self.conv_b(y.narrow(-2, 8, 8))))


def test_a_channel_slice_by_a_negative_axis_runs_on_the_channels_of_the_lift():
    """torch.export writes ``narrow(-2, ...)`` of a 3-D value's channels with the axis as given: on the height-one lift
    axis -2 is the height, and the conv after it got 1 channel (the part was kept whole, its BNs unfolded; review
    R20a).  The slice's axis is 1 on the lift; exact at the example (float64, 1e-9)."""
    model = seeded(GatedSteps, 0)().to(D).eval()
    x = torch.randn(2, 16, 20, dtype=D)
    fused = fuse(model, x)
    assert fused.fuse_report.capture == "specialized" and count_bn(fused) == 0, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, 16, 20)])


class MaskedConv1d(nn.Module):
    """NeMo's masked conv: a Conv1d whose output steps past each sequence's length are zeroed (``lens=None``: no
    mask); ``len(lens)`` is Python fx cannot trace, so fuse keeps it whole.  With ``bn``, a BatchNorm1d inside."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1, bn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, padding=k // 2, groups=groups)
        self.bn = nn.BatchNorm1d(cout) if bn else nn.Identity()

    def forward(self, x, lens=None):
        out = self.bn(self.conv(x))
        if lens is not None:
            mask = torch.arange(out.size(2)).expand(len(lens), out.size(2)) >= lens.unsqueeze(1)
            out = out.masked_fill(mask.unsqueeze(1), 0)
        return out


class JasperBlock(nn.Module):
    """NeMo's JasperBlock habit: the lengths go to the masked convs only, chosen by class.  ``data_branch``: a
    branch on the lengths' values too (the block is kept whole, its layers fused on their own)."""

    def __init__(self, c: int = 8, data_branch: bool = False) -> None:
        super().__init__()
        self.data_branch = data_branch
        self.layers = nn.ModuleList([MaskedConv1d(c, c, 5, groups=c, bn=True), MaskedConv1d(c, c, 1, bn=True),
                                     nn.ReLU(), nn.Conv1d(c, c, 3, padding=1, bias=False), nn.BatchNorm1d(c)])

    def forward(self, x, lens):
        if self.data_branch and bool(lens.max() > 1000):
            x = x.flip(2)
        for layer in self.layers:
            x = layer(x, lens) if isinstance(layer, MaskedConv1d) else layer(x)
        return x


@pytest.mark.parametrize("data_branch", [False, True], ids=["captured-around", "kept-whole"])
def test_a_block_that_dispatches_on_its_layers_classes_keeps_the_class_it_asks(data_branch):
    """The masked convs' fused forms are classes of ours: the block's ``isinstance(layer, MaskedConv1d)`` said no, its
    capture (or its run as written) called them without the lengths, and the fused block stopped masking.  At an
    unpadded example the mask changes nothing, so the checks passed; a padded batch was 26% off (found by a probe).
    Under a parent that asks classes, a part whose fused form is another class stays as written."""
    model = seeded(JasperBlock, 0, data_branch=data_branch)().double()
    example = (torch.randn(2, 8, 40, dtype=D), torch.tensor([40, 40]))
    fused = fuse(model, example)
    for lens in (torch.tensor([40, 12]), torch.tensor([7, 30]), torch.tensor([40, 40])):
        x = torch.randn(2, 8, 40, dtype=D)
        with torch.no_grad():
            torch.testing.assert_close(fused(x, lens), model(x, lens), rtol=1e-9, atol=1e-9)
    assert "not replaced by its fused form: its parent's code asks classes" in str(fused.fuse_report), str(fused.fuse_report)
    if not data_branch:  # (captured around the masked convs: the plain conv's BatchNorm still folds)
        assert count_bn(fused) == count_bn(model) - 1, str(fused.fuse_report)
    assert sum(type(m) is MaskedConv1d for m in fused.modules()) == 2  # (as written)


def _by_class(layers, x, lens):
    """A module-level helper of the model's code that dispatches on the layers' classes (NeMo's helpers do)."""
    for layer in layers:
        x = layer(x, lens) if isinstance(layer, MaskedConv1d) else layer(x)
    return x


def _asks_otherwise(how: str) -> type:
    """A Jasper block (made afresh: a class's code is read once) whose class test is in a module-level helper, a
    ``match`` statement's class pattern, ``_get_name()``, or its base class's ``forward`` reached by ``super()``."""

    class Helper(JasperBlock):
        def forward(self, x, lens):
            if self.data_branch and bool(lens.max() > 1000):
                x = x.flip(2)
            return _by_class(self.layers, x, lens)

    class Match(JasperBlock):
        def forward(self, x, lens):
            if self.data_branch and bool(lens.max() > 1000):
                x = x.flip(2)
            for layer in self.layers:
                match layer:
                    case MaskedConv1d():
                        x = layer(x, lens)
                    case _:
                        x = layer(x)
            return x

    class Named(JasperBlock):
        def forward(self, x, lens):
            if self.data_branch and bool(lens.max() > 1000):
                x = x.flip(2)
            for layer in self.layers:
                x = layer(x, lens) if layer._get_name() == "MaskedConv1d" else layer(x)
            return x

    class Super(JasperBlock):
        def forward(self, x, lens):
            return super().forward(x * 1.5, lens)

    return {"helper": Helper, "match": Match, "get-name": Named, "super": Super}[how]


@pytest.mark.parametrize("data_branch", [False, True], ids=["captured-around", "kept-whole"])
@pytest.mark.parametrize("how", ["helper", "match", "get-name", "super"])
def test_a_class_test_outside_the_blocks_own_forward_keeps_the_class_it_asks(how, data_branch):
    """``tests_classes`` read ``forward`` and the methods it names on ``self`` for ``isinstance``, ``type`` or
    ``__class__``: a module-level helper, a ``case MaskedConv1d():`` pattern, ``_get_name()`` and a base class's
    ``forward`` reached by ``super()`` were not seen, and the fused masked convs were called without their lengths
    (1.40 off where a batch is padded; review R6 findings 01, 03)."""
    model = seeded(_asks_otherwise(how), 0, data_branch=data_branch)().double()
    example = (torch.randn(2, 8, 40, dtype=D), torch.tensor([40, 40]))
    fused = fuse(model, example)
    for lens in (torch.tensor([40, 12]), torch.tensor([7, 30])):
        x = torch.randn(2, 8, 40, dtype=D)
        with torch.no_grad():
            torch.testing.assert_close(fused(x, lens), model(x, lens), rtol=1e-9, atol=1e-9)
    assert sum(type(m) is MaskedConv1d for m in fused.modules()) == 2  # (as written)
