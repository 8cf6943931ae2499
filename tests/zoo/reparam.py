"""Train-time re-parameterizable blocks: RepVGG, MobileOne, ACNet (asymmetric convolution), DBB (diverse branch).

Patterns reproduced (read in DingXiaoH/RepVGG ``repvgg.py``, apple/ml-fastvit ``models/modules/mobileone.py``
(MobileOne's block as FastViT ships it), DingXiaoH/ACNet ``acnet/acb.py`` and DingXiaoH/DiverseBranchBlock
``diversebranchblock.py``): ``conv_bn`` built as ``nn.Sequential()`` + ``add_module('conv'|'bn')``, ``id_out = 0``
when there is no identity BN and a three-way sum; an SE with ``F.avg_pool2d(inputs, kernel_size=inputs.size(3))``
and ``x.view(-1, C, 1, 1)``; MobileOne's ``identity_out = 0``, ``scale_out = 0``, ``out = scale_out + identity_out``
(an int when both are absent), ``out += self.rbr_conv[ix](x)`` over ``num_conv_branches``; ACNet's square + (k,1) +
(1,k) conv-BN branches and the input crop (``input[:, :, :, self.crop:-self.crop]``) used when ``padding < k // 2``;
DBB's ``BNAndPadLayer`` (BN, then ``F.pad`` and four slice assignments ``output[:, :, 0:p, :] = pad_values`` with
values computed from the BN statistics), the 1x1 -> BN-and-pad -> avg-pool branch, the identity-based 1x1 whose
kernel is ``self.weight + self.id_tensor`` computed in forward (``id_tensor`` a plain attribute, not a buffer), and
``out += branch(inputs)`` accumulation.  RepNeXt (suous/RepNeXt ``repnext.py``): ``ConvNorm`` as a ``Sequential``
of conv and norm, a token mixer that ``torch.chunk`` s the channels in four (an identity quarter, a small, a medium
and a large depthwise mixer) and ``torch.cat`` s them back; the small and medium mixers sum a kxk, a (k,1) and a
(1,k) depthwise conv, a dilated 2x2, and *serial* ``conv_k_h(conv_k_w(x))`` pairs; the large one is a 1x11 then
an 11x1; the downsampling ``CopyConv`` runs both mixers at stride 2 on the whole input and ``torch.cat`` s them, then
a BN after the concat; ``NormLinear`` heads (BatchNorm1d, Linear) averaged with a distillation head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


def conv_bn(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int, padding: int | tuple[int, int],
            groups: int = 1) -> nn.Sequential:
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


class SEBlock(nn.Module):
    def __init__(self, input_channels: int, internal_neurons: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(input_channels, internal_neurons, kernel_size=1, stride=1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, kernel_size=1, stride=1, bias=True)
        self.input_channels = input_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = self.down(x)
        x = F.relu(x)
        x = self.up(x)
        x = torch.sigmoid(x)
        x = x.view(-1, self.input_channels, 1, 1)
        return inputs * x


# ---------------------------------------------------------------- RepVGG
class RepVGGBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, use_se: bool = False) -> None:
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = SEBlock(out_channels, out_channels // 4) if use_se else nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(in_channels) if out_channels == in_channels and stride == 1 else None
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class RepVGG(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.stage0 = RepVGGBlock(3, widths[0], stride=2)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [RepVGGBlock(cin, w, stride=2), RepVGGBlock(w, w, groups=2 if i == 1 else 1, use_se=i == 2)]
            cin = w
        self.stages = nn.Sequential(*blocks)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stage0(x))
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)


# ---------------------------------------------------------------- MobileOne
class MobileOneSE(nn.Module):
    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, max(1, int(in_channels * rd_ratio)), 1, bias=True)
        self.expand = nn.Conv2d(max(1, int(in_channels * rd_ratio)), in_channels, 1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, c, h, w = inputs.size()
        x = F.avg_pool2d(inputs, kernel_size=[h, w])
        x = F.relu(self.reduce(x))
        x = torch.sigmoid(self.expand(x))
        x = x.view(-1, c, 1, 1)
        return inputs * x


class MobileOneBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, use_se: bool = False, num_conv_branches: int = 2, use_act: bool = True,
                 use_scale_branch: bool = True, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.groups = groups
        self.stride = stride
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches
        self.se = MobileOneSE(out_channels) if use_se else nn.Identity()
        self.activation = (nn.ReLU() if activation is None else activation) if use_act else nn.Identity()
        self.rbr_skip = nn.BatchNorm2d(num_features=in_channels) if out_channels == in_channels and stride == 1 else None
        if num_conv_branches > 0:
            self.rbr_conv = nn.ModuleList([self._conv_bn(kernel_size, padding) for _ in range(self.num_conv_branches)])
        else:
            self.rbr_conv = None
        self.rbr_scale = None
        if kernel_size > 1 and use_scale_branch:
            self.rbr_scale = self._conv_bn(kernel_size=1, padding=0)

    def _conv_bn(self, kernel_size: int, padding: int) -> nn.Sequential:
        return conv_bn(self.in_channels, self.out_channels, kernel_size, self.stride, padding, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        if self.rbr_conv is not None:
            for ix in range(self.num_conv_branches):
                out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))


class MobileOne(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 24, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.stage0 = MobileOneBlock(3, 16, kernel_size=3, stride=2, padding=1)
        blocks, cin = [], 16
        for i, w in enumerate(widths):
            for j, s in enumerate((2, 1)):
                c_in = cin if j == 0 else w
                blocks.append(MobileOneBlock(c_in, c_in, 3, stride=s, padding=1, groups=c_in, num_conv_branches=3))
                blocks.append(MobileOneBlock(c_in, w, 1, stride=1, padding=0, use_se=i == 2, num_conv_branches=3))
            cin = w
        self.stages = nn.Sequential(*blocks)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stage0(x))
        x = self.gap(x)
        return self.linear(x.view(x.size(0), -1))


# ---------------------------------------------------------------- ACNet
class ACBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride, padding, bias=False)
        self.square_bn = nn.BatchNorm2d(num_features=out_channels)
        if padding - kernel_size // 2 >= 0:
            self.crop = 0
            hor_padding = [padding - kernel_size // 2, padding]
            ver_padding = [padding, padding - kernel_size // 2]
        else:
            # a "negative padding": nn.Conv2d cannot express it, so the input is cropped in forward
            self.crop = kernel_size // 2 - padding
            hor_padding = [0, padding]
            ver_padding = [padding, 0]
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride, padding=ver_padding, bias=False)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride, padding=hor_padding, bias=False)
        self.ver_bn = nn.BatchNorm2d(num_features=out_channels)
        self.hor_bn = nn.BatchNorm2d(num_features=out_channels)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        square_outputs = self.square_conv(input)
        square_outputs = self.square_bn(square_outputs)
        if self.crop > 0:
            ver_input = input[:, :, :, self.crop:-self.crop]
            hor_input = input[:, :, self.crop:-self.crop, :]
        else:
            ver_input = input
            hor_input = input
        vertical_outputs = self.ver_conv(ver_input)
        vertical_outputs = self.ver_bn(vertical_outputs)
        horizontal_outputs = self.hor_conv(hor_input)
        horizontal_outputs = self.hor_bn(horizontal_outputs)
        result = square_outputs + vertical_outputs + horizontal_outputs
        return result


class ACNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ACBlock(3, 16, 3, stride=2, padding=1)
        self.body = nn.Sequential(
            nn.ReLU(), ACBlock(16, 16, 3, padding=1), nn.ReLU(),
            ACBlock(16, 24, 3, stride=1, padding=0), nn.ReLU(),  # valid conv: the (3,1)/(1,3) branches crop
            ACBlock(24, 32, 5, stride=2, padding=2), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------- DBB
class IdentityBasedConv1x1(nn.Conv2d):
    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        assert channels % groups == 0
        input_dim = channels // groups
        id_value = torch.zeros(channels, input_dim, 1, 1)
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = id_value.type_as(self.weight)
        nn.init.normal_(self.weight, std=0.1)  # the reference zero-initializes; a trained model has moved away from 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


class BNAndPadLayer(nn.Module):
    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps)
        self.pad_pixels = pad_pixels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self.bn(input)
        if self.pad_pixels > 0:
            pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


class DiverseBranchBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.nonlinear = nn.ReLU()
        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        internal_channels_1x1_3x3 = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal_channels_1x1_3x3 == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(channels=in_channels, groups=groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal_channels_1x1_3x3, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=internal_channels_1x1_3x3))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal_channels_1x1_3x3, out_channels, kernel_size, stride, 0,
                                                       groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class DBBNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            DiverseBranchBlock(3, 16, 3, stride=2, padding=1),
            DiverseBranchBlock(16, 16, 3, stride=1, padding=1),
            DiverseBranchBlock(16, 16, 3, stride=2, padding=1, groups=16),  # depthwise: the avg branch is pool + BN only
            DiverseBranchBlock(16, 32, 3, stride=2, padding=1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvNorm(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int = 1, stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module("norm", nn.BatchNorm2d(cout))


class RepDWConvS(nn.Module):
    """RepNeXt's small mixer: a 3x3, a 3x1, a 1x3 and a dilated 2x2, all depthwise; at stride 2 the 1x3 and 3x1 in
    series, each striding its own axis."""

    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        dw = dict(in_channels=c, out_channels=c, groups=c)
        self.conv_3_3 = nn.Conv2d(kernel_size=3, stride=stride, padding=1, **dw)
        self.conv_3_w = nn.Conv2d(kernel_size=(1, 3), stride=(1, stride), padding=(0, 1), bias=stride == 1, **dw)
        self.conv_3_h = nn.Conv2d(kernel_size=(3, 1), stride=(stride, 1), padding=(1, 0), bias=stride == 1, **dw)
        self.conv_2_2 = nn.Conv2d(kernel_size=2, stride=stride, dilation=2, padding=1, **dw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return self.conv_3_3(x) + self.conv_3_h(x) + self.conv_3_w(x) + self.conv_2_2(x)
        return self.conv_3_3(x) + self.conv_3_h(self.conv_3_w(x)) + self.conv_2_2(x)


class RepDWConvM(nn.Module):
    """RepNeXt's medium mixer: a 7x7, a 5x3, a 3x5, and two serial pairs (1x7 then 7x1, 1x5 then 5x1), depthwise."""

    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        dw = dict(in_channels=c, out_channels=c, groups=c)
        self.conv_7_7 = nn.Conv2d(kernel_size=7, stride=stride, padding=3, **dw)
        self.conv_5_3 = nn.Conv2d(kernel_size=(5, 3), stride=stride, padding=(2, 1), **dw)
        self.conv_3_5 = nn.Conv2d(kernel_size=(3, 5), stride=stride, padding=(1, 2), **dw)
        self.conv_7_w = nn.Conv2d(kernel_size=(1, 7), stride=(1, stride), padding=(0, 3), bias=False, **dw)
        self.conv_7_h = nn.Conv2d(kernel_size=(7, 1), stride=(stride, 1), padding=(3, 0), bias=False, **dw)
        self.conv_5_w = nn.Conv2d(kernel_size=(1, 5), stride=(1, stride), padding=(0, 2), bias=False, **dw)
        self.conv_5_h = nn.Conv2d(kernel_size=(5, 1), stride=(stride, 1), padding=(2, 0), bias=False, **dw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_7_7(x) + self.conv_5_3(x) + self.conv_3_5(x) + self.conv_7_h(self.conv_7_w(x)) + self.conv_5_h(self.conv_5_w(x))


class ChunkConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        q = c // 4
        self.conv_s, self.conv_m = RepDWConvS(q), RepDWConvM(q)
        self.conv_l = nn.Sequential(nn.Conv2d(q, q, (1, 11), padding=(0, 5), groups=q), nn.Conv2d(q, q, (11, 1), padding=(5, 0), groups=q))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i, s, m, l = torch.chunk(x, 4, dim=1)
        return torch.cat((i, self.conv_s(s), self.conv_m(m), self.conv_l(l)), dim=1)


class CopyConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_s, self.conv_m = RepDWConvS(c, stride=2), RepDWConvM(c, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.conv_s(x), self.conv_m(x)), dim=1)


def repnext_mlp(c: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(ConvNorm(c, hidden), nn.GELU(), ConvNorm(hidden, c))


class MetaNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.token_mixer, self.norm, self.channel_mixer = ChunkConv(c), nn.BatchNorm2d(c), repnext_mlp(c, 2 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channel_mixer(self.norm(self.token_mixer(x)))


class RepNeXtDownsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.token_mixer, self.norm, self.channel_mixer = CopyConv(c), nn.BatchNorm2d(2 * c), repnext_mlp(2 * c, 4 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.token_mixer(x))
        return x + self.channel_mixer(x)


class NormLinear(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm1d(cin))
        self.add_module("linear", nn.Linear(cin, cout))


class RepNeXt(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, 8, 3, 2, 1), nn.GELU(), ConvNorm(8, 16, 3, 2, 1))
        self.stages = nn.Sequential(MetaNeXtBlock(16), RepNeXtDownsample(16), MetaNeXtBlock(32))
        self.head, self.head_dist = NormLinear(32, num_classes), NormLinear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x)).mean((2, 3), keepdim=False)
        return (self.head(x) + self.head_dist(x)) / 2


ENTRIES = (
    ZooModel("repvgg", "RepVGG (3x3 + 1x1 + identity BN)", seeded(RepVGG, 501), (2, 3, 48, 48),
             "conv_bn via Sequential.add_module; id_out = 0 when no identity; three-way sum; grouped layer; SE with F.avg_pool2d(kernel_size=inputs.size(3)) + view(-1, C, 1, 1)"),
    ZooModel("mobileone", "MobileOne (over-parameterized dw/pw branches)", seeded(MobileOne, 502), (2, 3, 48, 48),
             "identity_out = 0; scale_out = 0; out = scale_out + identity_out (int when both absent); out += rbr_conv[ix](x); SE avg_pool2d(kernel_size=[h, w])"),
    ZooModel("acnet", "ACNet asymmetric convolution block", seeded(ACNet, 503), (2, 3, 40, 40),
             "square kxk + (k,1) + (1,k) conv-BN branches summed; asymmetric [p - k//2, p] paddings; input sliced input[:, :, :, crop:-crop] when padding < k//2; 5x5 ACB"),
    ZooModel("dbb", "Diverse Branch Block", seeded(DBBNet, 504), (2, 3, 40, 40),
             "BNAndPadLayer: F.pad + four slice assignments of BN-derived pad values; 1x1->BN-pad->AvgPool branch; kernel = weight + id_tensor in forward; out += branch"),
    ZooModel("repnext", "RepNeXt (multi-scale depthwise, serial and parallel branches)", seeded(RepNeXt, 505), (2, 3, 32, 32),
             "torch.chunk in 4 / torch.cat; kxk + (k,1) + (1,k) + dilated 2x2 sums; serial conv_k_h(conv_k_w(x)) pairs; BN after a concat of stride-2 mixers; NormLinear heads"),
)
