"""Reparameterizable blocks written the way users write them, fused by ``repalgebra.fuse``.

Every block is an ordinary ``nn.Module`` with a ``forward``, built in float64
with random weights and realistic random BN statistics.  Fusing must leave one
conv per block (one Linear for LeViT), no BN and no other linear op, and the
fused model must equal the original to 1e-9 relative (``verify`` in float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra

D = torch.float64


# --------------------------------------------------------------------------- helpers


def conv_bn(cin: int, cout: int, k, stride: int = 1, padding=None, groups: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias) then BN, the branch every reparameterizable block is made of."""
    if padding is None:
        padding = dilation * (k - 1) // 2 if isinstance(k, int) else tuple(dilation * (q - 1) // 2 for q in k)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and realistic BN statistics (running_var in [0.5, 2]); float64, eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = model.to(D)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=D) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=D))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g, dtype=D))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g, dtype=D))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=D))
                    m.bias.copy_(0.2 * torch.randn(c, generator=g, dtype=D))
        for name, p in model.named_parameters():
            if "scale" in name:  # layer scales
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=D))
    return model.eval()


FOLDED_AWAY = ("batch_norm", "scale", "identity", "pad", "avg_pool2d", "add", "sub", "concat")


def check(model: nn.Module, x: torch.Tensor, *, convs: int = 0, linears: int = 0, **other_ops: int) -> nn.Module:
    """Fuse ``model``: exactly ``convs`` convs / ``linears`` linears, nothing foldable left, equal in float64."""
    fused = repalgebra.fuse(model, x)
    after = fused.fuse_report.ops_after
    assert after.get("conv2d", 0) == convs, str(fused.fuse_report)
    assert after.get("linear", 0) == linears, str(fused.fuse_report)
    for op in FOLDED_AWAY:
        assert after.get(op, 0) == other_ops.get(op, 0), (op, str(fused.fuse_report))
    for op, n in other_ops.items():
        assert after.get(op, 0) == n, (op, str(fused.fuse_report))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == convs
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == linears
    report = repalgebra.verify(model, fused, x, n=2, dtype=D)
    assert report and report.tolerance == 1e-9, report
    return fused


def x4(c: int = 8, size: int = 12, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, c, size, size, dtype=D)


# --------------------------------------------------------------------------- RepVGG


class RepVGGBlock(nn.Module):
    """RepVGG: 3x3 conv-BN + 1x1 conv-BN + BN identity (when shapes allow), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)


@pytest.mark.parametrize("cin,cout,stride,groups", [(8, 8, 1, 1), (8, 16, 2, 1), (8, 8, 1, 2), (8, 8, 2, 4), (8, 16, 1, 1)])
def test_repvgg(cin, cout, stride, groups):
    check(randomize(RepVGGBlock(cin, cout, stride, groups)), x4(cin), convs=1, relu=1)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("cin,cout,stride,groups", [(8, 8, 1, 1), (8, 16, 2, 1), (8, 8, 1, 8)])
def test_repvgg_with_a_padding_mode(mode, cin, cout, stride, groups):
    """``padding_mode`` other than zeros: the 3x3 reads a padded copy of x, the 1x1 and the identity move onto it
    (``pad_share``); the copy's pad stays, the one conv's input."""
    block = RepVGGBlock(cin, cout, stride, groups)
    block.rbr_dense[0].padding_mode = mode
    check(randomize(block), x4(cin), convs=1, relu=1, pad_nd=1)


class RepDWConvM(nn.Module):
    """RepNeXt's multi-scale depthwise mixer: a kxk beside a 1xk then a kx1 (each depthwise, the pair bias-free),
    then a BN; with stride 2 the 1xk strides the width and the kx1 the height."""

    def __init__(self, c: int, k: int = 7, stride: int = 1) -> None:
        super().__init__()
        self.conv_k_k = nn.Conv2d(c, c, k, stride, k // 2, groups=c)
        self.conv_k_w = nn.Conv2d(c, c, (1, k), (1, stride), (0, k // 2), groups=c, bias=False)
        self.conv_k_h = nn.Conv2d(c, c, (k, 1), (stride, 1), (k // 2, 0), groups=c, bias=False)
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv_k_k(x) + self.conv_k_h(self.conv_k_w(x)))


@pytest.mark.parametrize("k,stride", [(7, 1), (5, 2), (3, 1)])
def test_repnext_serial_pair_beside_a_kxk(k, stride):
    """The 1xk and kx1 compose into a kxk (seq_merge), summed into the kxk beside them; the BN after the sum folds."""
    check(randomize(RepDWConvM(8, k, stride)), x4(8, 13), convs=1)


def test_repvgg_network():
    net = nn.Sequential(RepVGGBlock(4, 8, 2), RepVGGBlock(8, 8), RepVGGBlock(8, 8, groups=2), RepVGGBlock(8, 16, 2), RepVGGBlock(16, 16))
    check(randomize(net), x4(4, 16), convs=5, relu=5)


# --------------------------------------------------------------------------- MobileOne


class MobileOneBlock(nn.Module):
    """MobileOne: k over-parameterized conv-BN branches, a 1x1 conv-BN scale branch, a BN skip; then ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, branches: int = 3) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(branches))
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        if self.rbr_skip is not None:
            out = self.rbr_skip(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.activation(out)


class MobileOneUnit(nn.Module):
    """A MobileOne unit: a depthwise block then a pointwise block (two reparameterizable blocks)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, branches: int = 3) -> None:
        super().__init__()
        self.dw = MobileOneBlock(cin, cin, 3, stride, groups=cin, branches=branches)
        self.pw = MobileOneBlock(cin, cout, 1, branches=branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


@pytest.mark.parametrize("cin,cout,stride,branches", [(8, 8, 1, 3), (8, 16, 2, 2), (8, 8, 1, 1)])
def test_mobileone(cin, cout, stride, branches):
    check(randomize(MobileOneUnit(cin, cout, stride, branches)), x4(cin), convs=2, relu=2)


# --------------------------------------------------------------------------- ACNet


class ACBlock(nn.Module):
    """ACNet asymmetric convolution block: kxk + 1xk + kx1, each with BN."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.square = conv_bn(cin, cout, k, stride, k // 2)
        self.hor = conv_bn(cin, cout, (1, k), stride, (0, k // 2))
        self.ver = conv_bn(cin, cout, (k, 1), stride, (k // 2, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)


@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2)])
def test_acnet(k, stride):
    check(randomize(ACBlock(8, 8, k, stride)), x4(8), convs=1)


# --------------------------------------------------------------------------- YOLOv5's Focus stem


class Focus(nn.Module):
    """YOLOv5 (before 6.0): the four 2x2 phases of the image stacked as channels, then conv + BN + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c1 * 4, c2, k, 1, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


@pytest.mark.parametrize("k", [1, 3])
def test_focus_is_one_strided_conv(k):
    """The 2k x 2k stride-2 conv YOLOv5 6.0 replaced it with (``space_to_depth``, then ``bn_fold``)."""
    fused = check(randomize(Focus(3, 8, k)), x4(3, 16), convs=1, silu=1)
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (2 * k, 2 * k) and conv.stride == (2, 2)


# --------------------------------------------------------------------------- DiverseBranchBlock


class DiverseBranchBlock(nn.Module):
    """DBB written exactly: 1x1; kxk; 1x1 -> kxk (the 1x1 without bias, the kxk unpadded after an
    explicit zero pad); 1x1 (without bias) -> avg pool.  Each branch ends in a BN."""

    def __init__(self, c: int, k: int = 3, internal: int | None = None) -> None:
        super().__init__()
        self.k = k
        internal = internal or c
        self.dbb_origin = conv_bn(c, c, k, 1, k // 2)
        self.dbb_1x1 = conv_bn(c, c, 1, 1, 0)
        self.dbb_1x1_kxk_idconv1 = nn.Conv2d(c, internal, 1, bias=False)
        self.dbb_1x1_kxk_conv2 = nn.Conv2d(internal, c, k, padding=0, bias=False)
        self.dbb_1x1_kxk_bn2 = nn.BatchNorm2d(c)
        self.dbb_avg_conv = nn.Conv2d(c, c, 1, bias=False)
        self.dbb_avg_pool = nn.AvgPool2d(k, 1, k // 2)
        self.dbb_avg_bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(x) + self.dbb_1x1(x)
        p = self.k // 2
        y = F.pad(self.dbb_1x1_kxk_idconv1(x), (p, p, p, p))
        out = out + self.dbb_1x1_kxk_bn2(self.dbb_1x1_kxk_conv2(y))
        out = out + self.dbb_avg_bn(self.dbb_avg_pool(self.dbb_avg_conv(x)))
        return out


@pytest.mark.parametrize("k,internal", [(3, None), (5, 4)])
def test_diverse_branch_block(k, internal):
    check(randomize(DiverseBranchBlock(8, k, internal)), x4(8), convs=1)


# --------------------------------------------------------------------------- RepLKNet / UniRepLKNet


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet: a large depthwise kernel plus smaller and dilated ones, each with BN (RepLKNet without the dilated ones)."""

    def __init__(self, c: int, k: int = 9, dilated: bool = True) -> None:
        super().__init__()
        self.lk_origin = conv_bn(c, c, k, groups=c)
        branches = [(5, 1), (3, 2), (3, 3), (3, 4)] if dilated else [(5, 1)]
        self.kernel_sizes = [kk for kk, _ in branches]
        self.dilates = [d for _, d in branches]
        for kk, d in branches:
            self.add_module(f"dil_conv_k{kk}_{d}", conv_bn(c, c, kk, groups=c, dilation=d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lk_origin(x)
        for kk, d in zip(self.kernel_sizes, self.dilates):
            out = out + getattr(self, f"dil_conv_k{kk}_{d}")(x)
        return out


@pytest.mark.parametrize("dilated", [False, True])
def test_large_kernel(dilated):
    check(randomize(DilatedReparamBlock(8, 9, dilated)), x4(8, 14), convs=1)


def test_replknet_stride2_dense():
    """RepLKNet's stem-like use: a dense 7x7 stride-2 conv-BN plus a 3x3 one."""

    class LK(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.large = conv_bn(4, 8, 7, 2)
            self.small = conv_bn(4, 8, 3, 2)

        def forward(self, x):
            return self.large(x) + self.small(x)

    check(randomize(LK()), x4(4, 15), convs=1)


# --------------------------------------------------------------------------- FastViT RepMixer / RepCPE


class RepMixer(nn.Module):
    """FastViT RepMixer: ``x + layer_scale * (mixer(x) - norm(x))``; mixer = dw conv-BN + dw 1x1 conv-BN + BN skip."""

    def __init__(self, dim: int, k: int = 3) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.mixer_conv = conv_bn(dim, dim, k, groups=dim)
        self.mixer_scale = conv_bn(dim, dim, 1, groups=dim)
        self.mixer_skip = nn.BatchNorm2d(dim)
        self.layer_scale = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixer = self.mixer_skip(x) + self.mixer_scale(x) + self.mixer_conv(x)
        return x + self.layer_scale * (mixer - self.norm(x))


class RepCPE(nn.Module):
    """FastViT conditional positional encoding: ``pe(x) + x`` with a depthwise conv with bias."""

    def __init__(self, dim: int, k: int = 7) -> None:
        super().__init__()
        self.pe = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pe(x) + x


def test_repmixer():
    check(randomize(RepMixer(8)), x4(8), convs=1)


def test_repcpe():
    check(randomize(RepCPE(8)), x4(8), convs=1)


def test_repmixer_layer_scale_buffer_shape_1c11():
    """A layer scale of shape (1, C, 1, 1), registered as a buffer."""

    class Mixer(RepMixer):
        def __init__(self, dim):
            super().__init__(dim)
            del self.layer_scale
            self.register_buffer("layer_scale", 0.5 + torch.rand(1, dim, 1, 1))

    check(randomize(Mixer(8)), x4(8), convs=1)


# --------------------------------------------------------------------------- RepGhost, RepViT


class RepGhostBottleneckCore(nn.Module):
    """RepGhost: a depthwise conv-BN plus a BN'd identity shortcut (``fusion_bn``), then ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cheap_operation = conv_bn(c, c, 3, groups=c)
        self.fusion_bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.cheap_operation(x) + self.fusion_bn(x))


class RepViTDW(nn.Module):
    """RepViT's RepVGGDW: ``BN(conv_bn(x) + dw1x1(x) + x)``, a BN after the branch sum."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = conv_bn(c, c, 3, groups=c)
        self.conv1 = nn.Conv2d(c, c, 1, 1, 0, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn((self.conv(x) + self.conv1(x)) + x)


def test_repghost():
    check(randomize(RepGhostBottleneckCore(8)), x4(8), convs=1, relu=1)


def test_repvit():
    check(randomize(RepViTDW(8)), x4(8), convs=1)


# --------------------------------------------------------------------------- LeViT


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d applied across tokens: ``bn(linear(x).flatten(0, 1)).reshape_as(...)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LinearNormReshape(LinearNorm):
    """The same with sizes read from the input: ``bn(linear(x).reshape(B * N, C)).reshape(B, N, -1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return self.bn(self.c(x).reshape(B * N, -1)).reshape(B, N, -1)


class NormLinear(nn.Module):
    """LeViT's classifier head: BatchNorm1d then Linear."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))


def test_levit_linear_norm():
    check(randomize(LinearNorm(8, 16)), torch.randn(2, 5, 8, dtype=D), linears=1)


def test_levit_linear_norm_reshape():
    check(randomize(LinearNormReshape(8, 16)), torch.randn(2, 5, 8, dtype=D), linears=1)


def test_levit_network():
    """Conv-BN stem, tokens, LinearNorm MLP blocks with residuals, mean pooling, BN + Linear head."""

    class Residual(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            return x + self.m(x)

    class LeViTish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, 8, 3, 2, 1), nn.GELU(), conv_bn(8, 16, 3, 2, 1))
            self.mlp = nn.Sequential(
                Residual(nn.Sequential(LinearNorm(16, 32), nn.GELU(), LinearNorm(32, 16))),
                Residual(nn.Sequential(LinearNormReshape(16, 32), nn.GELU(), LinearNormReshape(32, 16))),
            )
            self.head = NormLinear(16, 10)

        def forward(self, x):
            x = self.stem(x).flatten(2).transpose(1, 2)
            x = self.mlp(x)
            return self.head(x.mean(1))

    fused = check(randomize(LeViTish()), x4(3, 16), convs=2, linears=5, add=2, gelu=3)
    # sizes are read at run time: the fused model runs at another batch size and resolution
    model = fused  # noqa: F841
    x = torch.randn(3, 3, 24, 24, dtype=D)
    assert fused(x).shape == (3, 10)


# --------------------------------------------------------------------------- whole small networks


# --------------------------------------------------------------------------- VanillaNet


class VanillaActivation(nn.ReLU):
    """VanillaNet's activation: a ReLU, then a learned depthwise conv of ``2 act_num + 1`` taps with its BN."""

    def __init__(self, dim: int, act_num: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, 1, 2 * act_num + 1, 2 * act_num + 1) * 0.02)
        self.bias = None
        self.bn = nn.BatchNorm2d(dim, eps=1e-6)
        self.dim, self.act_num = dim, act_num

    def forward(self, x):
        return self.bn(F.conv2d(super().forward(x), self.weight, self.bias, padding=(self.act_num * 2 + 1) // 2, groups=self.dim))


class VanillaBlock(nn.Module):
    """VanillaNet's block in training form: 1x1 conv-BN, ``F.leaky_relu(x, self.act_learn)`` (the slope is annealed
    from 0 to 1 during training), 1x1 conv-BN, the activation.  At ``act_learn = 1`` the leaky ReLU is the identity
    and the two 1x1 convs are one (VanillaNet's own deploy form)."""

    def __init__(self, dim: int, dim_out: int, act_learn: float) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim, eps=1e-6))
        self.conv2 = nn.Sequential(nn.Conv2d(dim, dim_out, 1), nn.BatchNorm2d(dim_out, eps=1e-6))
        self.pool = nn.Identity()
        self.act = VanillaActivation(dim_out)
        self.act_learn = act_learn

    def forward(self, x):
        x = self.conv1(x)
        x = F.leaky_relu(x, self.act_learn)
        x = self.conv2(x)
        return self.act(self.pool(x))


@pytest.mark.parametrize("act_learn", [1, 0.3])
def test_vanillanet_block(act_learn):
    fused = check(randomize(VanillaBlock(8, 16, act_learn)), x4(8), convs=2 if act_learn == 1 else 3, relu=1)
    assert fused.fuse_report.ops_after.get("leaky_relu", 0) == (act_learn != 1)


def test_mixed_network_with_gelu():
    """RepVGG, ACNet, DBB, MobileOne, RepMixer, RepCPE, RepGhost and RepViT blocks in one network, GELU between."""
    net = nn.Sequential(
        RepVGGBlock(4, 8, 2),
        nn.GELU(),
        ACBlock(8, 8),
        nn.GELU(),
        DiverseBranchBlock(8),
        nn.GELU(),
        MobileOneUnit(8, 8),
        RepMixer(8),
        RepCPE(8),
        RepGhostBottleneckCore(8),
        RepViTDW(8),
        DilatedReparamBlock(8, 9),
        nn.GELU(),
    )
    check(randomize(net), x4(4, 16), convs=10, relu=4, gelu=4)
