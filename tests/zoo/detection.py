"""Detection necks and heads: FPN + PAFPN (mmdetection), a YOLOv8-style model (C2f, SPPF, DFL head), PP-YOLOE's backbone.

Patterns reproduced (read in open-mmlab/mmdetection ``mmdet/models/necks/fpn.py``, ``mmdet/models/necks/pafpn.py``
and ultralytics/ultralytics ``ultralytics/nn/modules/conv.py``, ``block.py``, ``head.py``, ``ultralytics/nn/tasks.py``,
``ultralytics/utils/tal.py``): FPN's top-down path written **in place**, ``laterals[i - 1] += F.interpolate(
laterals[i], size=prev_shape, mode='nearest')`` on a conv+BN output that is read again afterwards (sizes 15 <- 8,
not a factor of 2), PAFPN's ``inter_outs[i + 1] += self.downsample_convs[i](inter_outs[i])``, the extra level
``F.max_pool2d(outs[-1], 1, stride=2)`` and a tuple of outputs; YOLO's ``Conv`` whose activation is a class
attribute ``default_act = nn.SiLU()`` (one module instance shared by every conv), ``autopad``, C2f's
``y = list(self.cv1(x).chunk(2, 1)); y.extend(m(y[-1]) for m in self.m)``, SPPF's repeated max pool, the
``Sequential`` of layers carrying ``.f``/``.i`` attributes walked by a loop that saves outputs and gathers
``[x if j == -1 else y[j] for j in m.f]``, ``nn.Upsample(None, 2, 'nearest')``, and the DFL head: a frozen 1x1 conv
with ``arange`` weights over ``x.view(b, 4, c1, a).transpose(2, 1).softmax(1)``, anchors from ``torch.meshgrid``
of the feature sizes, ``dist2bbox`` with ``chunk(2, dim)``.  PP-YOLOE's CSPResNet (PaddlePaddle/PaddleDetection
``ppdet/modeling/backbones/cspresnet.py``, ported to PyTorch in lyuwenyu/RT-DETR): a RepVGG block whose 1x1 branch is
scaled by a learned one-element ``alpha`` and chosen by ``if self.alpha:``, a branch on the truth value of a parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


# ---------------------------------------------------------------- FPN / PAFPN
class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, act: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        if self.activate is not None:
            x = self.activate(x)
        return x


class PAFPN(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], out_channels: int, num_outs: int) -> None:
        super().__init__()
        self.num_ins = len(in_channels)
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.downsample_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, stride=2, padding=1)
                                              for _ in range(self.num_ins - 1))
        self.pafpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1) for _ in range(self.num_ins - 1))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        assert len(inputs) == len(self.lateral_convs)
        laterals = [lateral_conv(inputs[i]) for i, lateral_conv in enumerate(self.lateral_convs)]
        used_backbone_levels = len(laterals)
        for i in range(used_backbone_levels - 1, 0, -1):
            prev_shape = laterals[i - 1].shape[2:]
            laterals[i - 1] += F.interpolate(laterals[i], size=prev_shape, mode="nearest")
        inter_outs = [self.fpn_convs[i](laterals[i]) for i in range(used_backbone_levels)]
        for i in range(0, used_backbone_levels - 1):
            inter_outs[i + 1] += self.downsample_convs[i](inter_outs[i])
        outs = [inter_outs[0]]
        outs.extend([self.pafpn_convs[i - 1](inter_outs[i]) for i in range(1, used_backbone_levels)])
        for i in range(self.num_outs - used_backbone_levels):
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)


class FPNDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvModule(3, 8, 3, stride=2, padding=1, act=True)
        self.stages = nn.ModuleList([
            nn.Sequential(ConvModule(8, 12, 3, 2, 1, act=True), ConvModule(12, 12, 3, 1, 1, act=True)),
            nn.Sequential(ConvModule(12, 16, 3, 2, 1, act=True), ConvModule(16, 16, 3, 1, 1, act=True)),
            nn.Sequential(ConvModule(16, 24, 3, 2, 1, act=True), ConvModule(24, 24, 3, 1, 1, act=True))])
        self.neck = PAFPN((12, 16, 24), 16, num_outs=4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return self.neck(tuple(feats))


# ---------------------------------------------------------------- YOLOv8
def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    if d > 1:
        k = d * (k - 1) + 1
    if p is None:
        p = k // 2
    return p


class Conv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, d: int = 1,
                 act: bool | nn.Module = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=0.001, momentum=0.03)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 1.0) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 3, 1)
        self.cv2 = Conv(c_, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, e=1.0) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class DFL(nn.Module):
    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        x = torch.arange(c1, dtype=torch.float)
        self.conv.weight.data[:] = nn.Parameter(x.view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats: list[torch.Tensor], strides: torch.Tensor, grid_cell_offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    anchor_points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for i, stride in enumerate(strides):
        h, w = feats[i].shape[2:]
        sx = torch.arange(end=w, device=device, dtype=dtype) + grid_cell_offset
        sy = torch.arange(end=h, device=device, dtype=dtype) + grid_cell_offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), stride, dtype=dtype, device=device))
    return torch.cat(anchor_points), torch.cat(stride_tensor)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, xywh: bool = True, dim: int = -1) -> torch.Tensor:
    lt, rb = distance.chunk(2, dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    if xywh:
        c_xy = (x1y1 + x2y2) / 2
        wh = x2y2 - x1y1
        return torch.cat((c_xy, wh), dim)
    return torch.cat((x1y1, x2y2), dim)


class Detect(nn.Module):
    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[float, ...]) -> None:
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = 8
        self.no = nc + self.reg_max * 4
        self.register_buffer("stride", torch.tensor(strides))
        c2, c3 = max(16, ch[0] // 4, self.reg_max * 4), max(ch[0], min(self.nc, 32))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, self.nc, 1)) for x in ch)
        self.dfl = DFL(self.reg_max)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        anchors, strides = (t.transpose(0, 1) for t in make_anchors(x, self.stride, 0.5))
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(self.dfl(box), anchors.unsqueeze(0), xywh=True, dim=1) * strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class YOLO(nn.Module):
    # (from, module): a slice of yolov8n.yaml at small width
    def __init__(self, nc: int = 3) -> None:
        super().__init__()
        layers = [
            (-1, Conv(3, 8, 3, 2)), (-1, Conv(8, 16, 3, 2)), (-1, C2f(16, 16, 1, True)),  # 0-2  P2/4
            (-1, Conv(16, 24, 3, 2)), (-1, C2f(24, 24, 1, True)),  # 3-4  P3/8
            (-1, Conv(24, 32, 3, 2)), (-1, C2f(32, 32, 1, True)), (-1, SPPF(32, 32, 5)),  # 5-7  P4/16
            (-1, nn.Upsample(None, 2, "nearest")), ([-1, 4], Concat(1)), (-1, C2f(56, 24, 1)),  # 8-10
            (-1, Conv(24, 24, 3, 2)), ([-1, 7], Concat(1)), (-1, C2f(56, 32, 1)),  # 11-13
            ([10, 13], Detect(nc, (24, 32), (8.0, 16.0))),  # 14
        ]
        for i, (f, m) in enumerate(layers):
            m.i, m.f = i, f
        self.save = sorted({x % i for i, (f, _) in enumerate(layers) for x in ([f] if isinstance(f, int) else f) if x != -1})
        self.model = nn.Sequential(*[m for _, m in layers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


# ---------------------------------------------------------------- PP-YOLOE CSPResNet
class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class RepVggAlpha(nn.Module):
    """3x3 conv-BN plus a learned scalar times 1x1 conv-BN; the deployed form (``self.conv``) is tested by hasattr."""

    def __init__(self, c: int, alpha: bool = True) -> None:
        super().__init__()
        self.conv1, self.conv2 = ConvBNAct(c, c, 3, act=False), ConvBNAct(c, c, 1, act=False)
        self.act = nn.SiLU()
        self.alpha = nn.Parameter(torch.tensor([0.63])) if alpha else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            y = self.conv(x)
        elif self.alpha:  # the truth value of a one-element Parameter: a branch on the weights
            y = self.conv1(x) + self.alpha * self.conv2(x)
        else:
            y = self.conv1(x) + self.conv2(x)
        return self.act(y)


class CSPResStage(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int) -> None:
        super().__init__()
        mid = (cin + cout) // 2
        self.conv_down = ConvBNAct(cin, mid, 3, stride=2)
        self.conv1, self.conv2 = ConvBNAct(mid, mid // 2), ConvBNAct(mid, mid // 2)
        self.blocks = nn.Sequential(*(nn.Sequential(ConvBNAct(mid // 2, mid // 2, 3), RepVggAlpha(mid // 2)) for _ in range(blocks)))
        self.attn = nn.Conv2d(mid, mid, 1)  # EffectiveSE: x * hardsigmoid(fc(mean(x)))
        self.conv3 = ConvBNAct(mid, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_down(x)
        y2 = self.conv2(x)
        for block in self.blocks:
            y2 = torch.add(y2, block(y2))
        y = torch.concat([self.conv1(x), y2], dim=1)
        y = y * F.hardsigmoid(self.attn(y.mean((2, 3), keepdim=True)))
        return self.conv3(y)


class CSPResNet(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (16, 32, 48), blocks: tuple[int, ...] = (1, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, channels[0] // 2, 3, 2), ConvBNAct(channels[0] // 2, channels[0], 3))
        self.stages = nn.ModuleList(CSPResStage(channels[i], channels[i + 1], n) for i, n in enumerate(blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, outs = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


ENTRIES = (
    ZooModel("fpn", "FPN + PAFPN neck (mmdetection), in-place top-down", seeded(FPNDetector, 901), (2, 3, 57, 57),
             "HAZARD: laterals[i - 1] += F.interpolate(laterals[i], size=prev_shape) in place on conv+BN outputs read again; inter_outs[i + 1] += downsample; F.max_pool2d(1, stride=2) extra level; tuple output"),
    ZooModel("yolov8", "YOLOv8 (C2f, SPPF, DFL head)", seeded(YOLO, 902), (2, 3, 64, 64),
             "shared class-attribute nn.SiLU(); chunk(2, 1) + extend; SPPF repeated maxpool; Sequential walked with m.f/m.i and saved outputs; Upsample; x[i] = cat(...) in Detect; DFL softmax + frozen arange conv; meshgrid anchors"),
    ZooModel("ppyoloe", "PP-YOLOE CSPResNet (RepVGG block with a learned alpha, EffectiveSE)", seeded(CSPResNet, 903), (2, 3, 48, 48),
             "if self.alpha: on a one-element nn.Parameter (a branch on the weights); hasattr(self, 'conv') deploy test; alpha * conv-BN branch; torch.concat; torch.add residual; EffectiveSE mean + hardsigmoid gate; list of stage outputs"),
)
