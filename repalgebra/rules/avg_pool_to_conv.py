"""Average pool as conv: a k x k average pool is a depthwise conv with weights 1/(k_h k_w).

    avg_pool(x; k, s, p, count_include_pad=True) = conv(x; 1/(k_h k_w) * ones(C, 1, k_h, k_w), stride s, padding p, groups C)

With ``count_include_pad=False`` and p > 0 the border windows divide by fewer
elements, which no conv does; with p = 0 both settings agree.

Preconditions: the pool is exactly a conv (as above, no ``ceil_mode``) and it
meets a conv: it is summed with a conv of the same input (maybe through a
BatchNorm, which then folds into it), or it reads a
1x1 stride-1 conv (padded or not) that it can merge with (exactly only if that
conv has no bias or the pool does not pad: a biased conv before a zero-padded
pool would see 0 at the border where the pool sees the bias).
"""

import torch

from repalgebra.ir import Node
from repalgebra.match import JOINS, producer, sole_use
from repalgebra.kernels import conv_bias
from repalgebra.rules.pad_absorb import pixelwise
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("avg_pool_to_conv", on="avg_pool2d")
def avg_pool_to_conv(graph, pool):
    a = pool.attrs
    pads = any(_pair(a["padding"]))
    before = producer(pool.x, "conv2d")
    merges = before is not None and sole_use(graph, pool.x) and pixelwise(before)
    readers = graph.users(pool.out)
    if len(readers) == 1 and readers[0].op == "batch_norm" and sole_use(graph, pool.out):
        readers = graph.users(readers[0].out)  # a BN between (DiverseBranchBlock's pool branch) folds once it is a conv
    joins = any(_has_conv_sibling(j, pool) for j in readers if j.op in JOINS)
    if not (merges or joins) or len(pool.x.shape) != 4:
        return None
    if a["ceil_mode"] or (pads and not a["count_include_pad"]):
        return Refusal("count_include_pad=False with padding (or ceil_mode): border windows divide by fewer elements")
    if merges and not joins and pads and bool(conv_bias(before).abs().max() > 0):
        return Refusal("the conv before it has a bias and the pool zero-pads: the border would see 0, not the bias")
    kh, kw = _pair(a["kernel"])
    ph, pw = _pair(a["padding"])
    channels = pool.x.shape[1]
    dtype = next(iter(before.params.values())).dtype if before is not None else torch.float64
    w = torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=dtype)
    attrs = {"stride": _pair(a["stride"] or a["kernel"]), "padding": (ph, ph, pw, pw), "groups": channels}
    conv = Node.make("conv2d", [pool.x], attrs, {"weight": w}, pool.source)
    return Rewrite(pool.out, conv.out, (conv,))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _has_conv_sibling(join: Node, pool: Node) -> bool:
    return any((c := producer(v, "conv2d")) is not None and c.x is pool.x for v in join.inputs)
