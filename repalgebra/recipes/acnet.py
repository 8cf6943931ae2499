"""ACNet (Ding et al., 2019): a kxk conv+BN with a 1xk and a kx1 conv+BN beside it, summed.

    y = BN_k(conv_kxk(x)) + BN_h(conv_1xk(x)) + BN_v(conv_kx1(x))

The 1xk branch is padded (0, k//2), the kx1 branch (k//2, 0), so each reads the
kxk kernel's center row or column.  Folded back by ``bn_fold``, ``kernel_pad``
(1xk and kx1 to kxk, centered) and ``branch_sum``.

Which convs: odd kernels at least 3 on both axes (``(kh, kw)`` gets ``(1, kw)``
and ``(kh, 1)`` branches), padded by half the kernel; any stride and groups.
"""

from __future__ import annotations

from repalgebra.recipes.base import ExpandedConv, Recipe, Site, conv_bn, silence

NAME = "acnet"


def skip(site: Site) -> str | None:
    """Why ACNet leaves ``site`` alone, or None."""
    if min(site.kernel) < 2:
        return f"kernel {site.kernel}: ACNet adds 1xk and kx1 branches to a kernel at least 3 on both axes"
    if not site.centered:
        return f"padding {site.padding} is not half the kernel {site.kernel} (odd): 1xk and kx1 branches would not sit at its center"
    return None


def build(site: Site, init: str) -> ExpandedConv:
    """The ACNet block for ``site``: ``kxk`` (main), ``horizontal`` (1xk), ``vertical`` (kx1)."""
    (kh, kw), (ph, pw) = site.kernel, site.padding
    aux = {
        "horizontal": conv_bn(site.new_conv((1, kw), padding=(0, pw)), site.new_bn()),
        "vertical": conv_bn(site.new_conv((kh, 1), padding=(ph, 0)), site.new_bn()),
    }
    if init == "preserve":
        aux = {name: silence(b) for name, b in aux.items()}
    return ExpandedConv(NAME, {"kxk": site.main(init), **aux})


RECIPE = Recipe(NAME, skip, build, "kxk+BN, 1xk+BN, kx1+BN")
