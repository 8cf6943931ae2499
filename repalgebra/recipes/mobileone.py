"""MobileOne (Vasu et al., 2023): k parallel kxk conv+BN branches, a 1x1 conv+BN and an identity BN, summed.

    y = sum_j BN_j(conv_kxk_j(x)) + BN_1(conv_1x1(x)) [+ BN_id(x)]

The 1x1 ("scale") branch only beside a kernel larger than 1x1; the identity
where the channels and stride allow.  Folded back by ``bn_fold``,
``bn_to_conv`` / ``identity_to_conv``, ``kernel_pad`` and ``branch_sum``.

Which convs: any odd kernel padded by half the kernel, 1x1 (pointwise) convs
included, any stride and groups (depthwise too, as MobileOne uses it).
"""

from __future__ import annotations

from functools import partial

from repalgebra.recipes.base import ExpandedConv, Recipe, Site, conv_bn, silence

NAME = "mobileone"


def skip(site: Site) -> str | None:
    """Why MobileOne leaves ``site`` alone, or None."""
    if not site.centered:
        return f"padding {site.padding} is not half the kernel {site.kernel} (odd): a 1x1 or identity branch would not sit at its center"
    return None


def build(site: Site, init: str, k: int = 3) -> ExpandedConv:
    """The MobileOne block for ``site``: ``kxk`` (main) and ``kxk_1`` .. ``kxk_{k-1}``, ``scale`` (1x1), ``identity``."""
    aux = {f"kxk_{j}": conv_bn(site.new_conv(padding=site.padding), site.new_bn()) for j in range(1, k)}
    if site.kernel != (1, 1):
        aux["scale"] = conv_bn(site.new_conv((1, 1)), site.new_bn())
    if site.has_identity:
        aux["identity"] = site.new_bn()
    if init == "preserve":
        aux = {name: silence(b) for name, b in aux.items()}
    return ExpandedConv(NAME, {"kxk": site.main(init), **aux})


def recipe(k: int = 3) -> Recipe:
    """MobileOne with ``k`` parallel kxk branches (the paper's k: 1 to 5 by model size)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"mobileone: k (the number of kxk branches) must be a positive integer, got {k!r}")
    name = NAME if k == 3 else f"{NAME}(k={k})"
    return Recipe(name, skip, partial(build, k=k), f"{k} x (kxk+BN), 1x1+BN, identity BN (same channels, stride 1)")


RECIPE = recipe()
