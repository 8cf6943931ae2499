"""RepVGG (Ding et al., 2021): a kxk conv+BN, a 1x1 conv+BN, and an identity BN where the shapes allow, summed.

    y = BN_k(conv_kxk(x)) + BN_1(conv_1x1(x)) [+ BN_id(x)]

Folded back by ``bn_fold`` (each conv+BN), ``bn_to_conv`` / ``identity_to_conv``
(the identity BN as a 1x1 conv), ``kernel_pad`` (1x1 to kxk, centered) and
``branch_sum``.

Which convs: odd kernels larger than 1x1 padded by half the kernel (the 1x1
branch reads the kernel's center tap; at stride 2 too), any groups (the 1x1
branch has the same groups; the identity is per group).  The identity branch
needs the same channels in and out and stride 1.
"""

from __future__ import annotations

from repalgebra.recipes.base import ExpandedConv, Recipe, Site, conv_bn, silence

NAME = "repvgg"


def skip(site: Site) -> str | None:
    """Why RepVGG leaves ``site`` alone, or None."""
    if site.kernel == (1, 1):
        return "a 1x1 kernel: RepVGG's 1x1 branch would repeat it"
    if not site.centered:
        return f"padding {site.padding} is not half the kernel {site.kernel} (odd): a 1x1 branch would not sit at its center"
    return None


def build(site: Site, init: str) -> ExpandedConv:
    """The RepVGG block for ``site``: ``kxk`` (main), ``scale`` (1x1), and ``identity`` where it fits."""
    aux = {"scale": conv_bn(site.new_conv((1, 1)), site.new_bn())}
    if site.has_identity:
        aux["identity"] = site.new_bn()
    if init == "preserve":
        aux = {name: silence(b) for name, b in aux.items()}
    return ExpandedConv(NAME, {"kxk": site.main(init), **aux})


RECIPE = Recipe(NAME, skip, build, "kxk+BN, 1x1+BN, identity BN (same channels, stride 1)")
