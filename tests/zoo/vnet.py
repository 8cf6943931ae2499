"""V-Net (volumetric segmentation), on ``(N, 1, D, H, W)`` volumes.

Patterns reproduced (read in mattmacy/vnet.pytorch ``vnet.py`` and the forks that swap its norm layer): a
``passthrough(x, **kwargs)`` function stored as a module attribute where dropout is off; ``ELUCons`` choosing
``nn.ELU(inplace=True)`` or ``nn.PReLU(nchan)``; an input transition adding ``torch.cat((x,) * 16, 1)`` (the
one-channel volume repeated) to its conv's output; down transitions of a strided 2x2x2 Conv3d + norm + ELU, then
``nConvs`` 5x5x5 ``LUConv`` blocks and ``torch.add(out, down)``; up transitions of a 2x2x2 ``ConvTranspose3d`` +
norm + ELU, ``torch.cat((out, skipxdo), 1)`` with the skip (through ``Dropout3d``), ``LUConv`` blocks and
``torch.add(out, xcat)``; an output transition of a 5x5x5 conv + norm + ELU, a 1x1x1 conv, then
``out.permute(0, 2, 3, 4, 1).contiguous()``, ``out.view(out.numel() // 2, 2)`` and a softmax per voxel.
``ContBatchNorm3d`` is the original's norm: a ``_BatchNorm`` whose ``forward`` normalizes with the batch's own
statistics even in eval mode (``F.batch_norm(..., True, ...)``), so nothing may fold into it; the zoo entry uses
``nn.BatchNorm3d``, as the forks do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


def passthrough(x: torch.Tensor, **kwargs) -> torch.Tensor:
    return x


def ELUCons(elu: bool, nchan: int) -> nn.Module:
    return nn.ELU(inplace=True) if elu else nn.PReLU(nchan)


class ContBatchNorm3d(nn.modules.batchnorm._BatchNorm):
    """The batch's statistics in every mode (and the running ones updated): not a fixed affine map."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps)


class LUConv(nn.Module):
    def __init__(self, nchan: int, elu: bool, norm: type) -> None:
        super().__init__()
        self.relu1 = ELUCons(elu, nchan)
        self.conv1 = nn.Conv3d(nchan, nchan, kernel_size=5, padding=2)
        self.bn1 = norm(nchan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu1(self.bn1(self.conv1(x)))


def _make_nConv(nchan: int, depth: int, elu: bool, norm: type) -> nn.Sequential:
    return nn.Sequential(*[LUConv(nchan, elu, norm) for _ in range(depth)])


class InputTransition(nn.Module):
    def __init__(self, outChans: int, elu: bool, norm: type) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, outChans, kernel_size=5, padding=2)
        self.bn1 = norm(outChans)
        self.relu1 = ELUCons(elu, outChans)
        self.repeats = outChans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        x16 = torch.cat((x,) * self.repeats, 1)
        return self.relu1(torch.add(out, x16))


class DownTransition(nn.Module):
    def __init__(self, inChans: int, nConvs: int, elu: bool, norm: type, dropout: bool = False) -> None:
        super().__init__()
        outChans = 2 * inChans
        self.down_conv = nn.Conv3d(inChans, outChans, kernel_size=2, stride=2)
        self.bn1 = norm(outChans)
        self.do1 = nn.Dropout3d() if dropout else passthrough
        self.relu1 = ELUCons(elu, outChans)
        self.relu2 = ELUCons(elu, outChans)
        self.ops = _make_nConv(outChans, nConvs, elu, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.relu1(self.bn1(self.down_conv(x)))
        out = self.do1(down)
        out = self.ops(out)
        return self.relu2(torch.add(out, down))


class UpTransition(nn.Module):
    def __init__(self, inChans: int, outChans: int, nConvs: int, elu: bool, norm: type, dropout: bool = False) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(inChans, outChans // 2, kernel_size=2, stride=2)
        self.bn1 = norm(outChans // 2)
        self.do1 = nn.Dropout3d() if dropout else passthrough
        self.do2 = nn.Dropout3d()
        self.relu1 = ELUCons(elu, outChans // 2)
        self.relu2 = ELUCons(elu, outChans)
        self.ops = _make_nConv(outChans, nConvs, elu, norm)

    def forward(self, x: torch.Tensor, skipx: torch.Tensor) -> torch.Tensor:
        out = self.do1(x)
        skipxdo = self.do2(skipx)
        out = self.relu1(self.bn1(self.up_conv(out)))
        xcat = torch.cat((out, skipxdo), 1)
        out = self.ops(xcat)
        return self.relu2(torch.add(out, xcat))


class OutputTransition(nn.Module):
    def __init__(self, inChans: int, elu: bool, norm: type) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inChans, 2, kernel_size=5, padding=2)
        self.bn1 = norm(2)
        self.conv2 = nn.Conv3d(2, 2, kernel_size=1)
        self.relu1 = ELUCons(elu, 2)
        self.softmax = F.softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out = out.permute(0, 2, 3, 4, 1).contiguous()
        out = out.view(out.numel() // 2, 2)
        return self.softmax(out, dim=1)


class VNet(nn.Module):
    """Two levels down and up (the original has four), width 4 (the original 16)."""

    def __init__(self, width: int = 4, elu: bool = True, norm: type = nn.BatchNorm3d) -> None:
        super().__init__()
        self.in_tr = InputTransition(width, elu, norm)
        self.down_tr32 = DownTransition(width, 1, elu, norm)
        self.down_tr64 = DownTransition(2 * width, 2, elu, norm, dropout=True)
        self.up_tr64 = UpTransition(4 * width, 4 * width, 2, elu, norm, dropout=True)
        self.up_tr32 = UpTransition(4 * width, 2 * width, 1, elu, norm)
        self.out_tr = OutputTransition(2 * width, elu, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out16 = self.in_tr(x)
        out32 = self.down_tr32(out16)
        out64 = self.down_tr64(out32)
        out = self.up_tr64(out64, out32)
        out = self.up_tr32(out, out16)
        return self.out_tr(out)


ENTRIES = (
    ZooModel("vnet", "V-Net (volumetric segmentation, vnet.pytorch with BatchNorm3d)", seeded(VNet, 2401), (2, 1, 8, 8, 8),
             "passthrough(x, **kwargs) as a module attribute; torch.cat((x,) * 16, 1) added to the input conv; strided 2x2x2 Conv3d and 2x2x2 ConvTranspose3d, each + BatchNorm3d + ELU(inplace=True); torch.cat((out, skip), 1) then 5x5x5 LUConvs and torch.add(out, xcat); permute(0, 2, 3, 4, 1).contiguous().view(numel // 2, 2) and F.softmax stored as an attribute"),
)
