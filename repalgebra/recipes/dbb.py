"""Diverse Branch Block (Ding et al., 2021): four branches of different shapes, six BNs, summed.

    y = BN_k(conv_kxk(x))                                   main
      + BN_1(conv_1x1(x))                                   scale
      + BN_b(conv_kxk'(BN_a(conv_1x1'(x, padding p))))      1x1 -> kxk, the kxk unpadded
      + BN_d(avg_pool_kxk(BN_c(conv_1x1''(x, padding p))))  1x1 -> average, the pool unpadded

Where the padding goes matters.  A BN between a 1x1 conv and a zero-padded kxk
conv (or pool) makes the kxk see 0 at the border where the unfused path would
see ``BN(0)``, which no single conv computes.  So the *1x1* conv pads, by the
kxk conv's padding ``p``, and the kxk conv and the pool do not: the padded
border then is ``BN_a(0)``, the same constant the BN adds everywhere, and the
branch is one conv again (this is the paper's "BN and pad" layer, written with
plain modules).  Folded back by ``bn_fold``, ``avg_pool_to_conv`` (the pool as a
depthwise conv), ``seq_merge`` (1x1 then kxk, the 1x1 padded and biased, the kxk
unpadded), ``kernel_pad`` and ``branch_sum``.

Which convs: odd kernels larger than 1x1 padded by half the kernel (for the 1x1
branch), any stride and groups (every branch has the conv's groups; the inner
1x1 convs keep the input's channels).
"""

from __future__ import annotations

from torch import nn

from repalgebra.recipes.base import ExpandedConv, Recipe, Site, conv_bn, silence

NAME = "dbb"


def skip(site: Site) -> str | None:
    """Why DBB leaves ``site`` alone, or None."""
    if site.kernel == (1, 1):
        return "a 1x1 kernel: DBB's branches would all be 1x1 convs"
    if not site.centered:
        return f"padding {site.padding} is not half the kernel {site.kernel} (odd): a 1x1 branch would not sit at its center"
    return None


def build(site: Site, init: str) -> ExpandedConv:
    """The DBB for ``site``: ``kxk`` (main), ``scale`` (1x1), ``one_kxk`` (1x1 -> kxk), ``one_avg`` (1x1 -> average)."""
    c = site.in_channels
    one_kxk = nn.Sequential()
    one_kxk.add_module("conv1", site.new_conv((1, 1), stride=(1, 1), padding=site.padding, out_channels=c))
    one_kxk.add_module("bn1", site.new_bn(c))
    one_kxk.add_module("conv2", site.new_conv(padding=(0, 0)))
    one_kxk.add_module("bn2", site.new_bn())
    one_avg = nn.Sequential()
    one_avg.add_module("conv", site.new_conv((1, 1), stride=(1, 1), padding=site.padding))
    one_avg.add_module("bn", site.new_bn())
    one_avg.add_module("avg", nn.AvgPool2d(site.kernel, site.stride, padding=0))
    one_avg.add_module("avgbn", site.new_bn())
    aux = {"scale": conv_bn(site.new_conv((1, 1)), site.new_bn()), "one_kxk": one_kxk, "one_avg": one_avg}
    if init == "preserve":
        aux = {name: silence(b) for name, b in aux.items()}
    return ExpandedConv(NAME, {"kxk": site.main(init), **aux})


RECIPE = Recipe(NAME, skip, build, "kxk+BN, 1x1+BN, 1x1+BN->kxk+BN, 1x1+BN->avg+BN (the 1x1 convs pad)")
