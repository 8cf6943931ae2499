"""The worked examples of the rule pages in ``docs/rules/``: listings, numbers and pictures.

Every rule page shows a tiny graph before and after its rule, a worked numeric
example and, where the rule refuses some cases, a counterexample.  All of it is
computed here, never typed by hand::

    python docs/rules/examples.py            # print every generated block
    python docs/rules/examples.py bn_fold    # only one page's blocks
    python docs/rules/examples.py --write    # rewrite the blocks in the pages (+ SVGs if `dot` exists)
    python docs/rules/examples.py --check    # exit 1 if a page is out of date

A page holds each generated block between marker comments::

    <!-- listing:bn_fold:before -->
    ...generated...
    <!-- /listing -->

``tests/test_docs_rules.py`` checks that the pages hold exactly what this
script generates now, so the docs cannot silently go stale.

Conventions of the examples: one image, float64, small integer inputs and
weights, and BatchNorm ``eps = 0`` so that the BN scale ``gamma / sqrt(var)``
is an exact small fraction (the rules use whatever ``eps`` a node carries).
Values are printed as integers or fractions when they are exactly so.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch

from repalgebra import RULES, Graph, Refusal, rewrite, run_graph
from repalgebra.builder import GraphBuilder
from repalgebra.ir import Value

HERE = Path(__file__).resolve().parent
IMG = HERE / "img"
DT = torch.float64

# The rule pages, in reading order: the primitive rules, then the two composites.
PRIMITIVES = [
    "bn_fold",
    "bn_to_conv",
    "identity_to_conv",
    "identity_elim",
    "kernel_pad",
    "dilation_to_dense",
    "pad_absorb",
    "crop_into_conv",
    "crop_before_conv",
    "pad_share",
    "branch_sum",
    "sum_regroup",
    "scale_fold",
    "bias_fold",
    "seq_merge",
    "border_fill",
    "avg_pool_to_conv",
    "space_to_depth",
    "concat_merge",
    "bn_before_conv",
    "scale_into_conv",
    "bn_into_linear",
    "linear_affine_fold",
    "linear_seq_merge",
    "query_scale_fold",
    "attention_form",
]
COMPOSITES = ["repmixer", "cpe"]
PAGES = PRIMITIVES + COMPOSITES


# --------------------------------------------------------------------------- small tensors


def t(*rows) -> torch.Tensor:
    """A float64 tensor from nested lists."""
    return torch.tensor(rows if len(rows) != 1 else rows[0], dtype=DT)


def k(*rows) -> torch.Tensor:
    """A 1x1-channel kernel ``(1, 1, kh, kw)`` from its rows."""
    return t(list(rows)).reshape(1, 1, len(rows), len(rows[0]))


def image(*channels) -> torch.Tensor:
    """A batch-1 image ``(1, C, H, W)`` from per-channel row lists."""
    return t(list(channels)).unsqueeze(0)


X = image([[1, 2, 0], [0, 1, 3], [2, 0, 1]])  # the 1-channel 3x3 input of most examples
X2 = image([[1, 2, 0], [0, 1, 3], [2, 0, 1]], [[0, 1, 1], [2, 0, 1], [1, 1, 0]])  # 2 channels
W3 = k([1, 0, -1], [2, 1, 0], [0, 1, 1])  # a 3x3 kernel with no symmetry, so orientation shows
ONES3 = k([1, 1, 1], [1, 1, 1], [1, 1, 1])  # counterexamples: every padded tap counts once
P1 = (1, 1, 1, 1)


def bn_params(mean, var, gamma, beta) -> dict:
    """BatchNorm parameters (eps = 0, see the module docstring) from per-channel lists."""
    return dict(mean=t(mean), var=t(var), weight=t(gamma), bias=t(beta), eps=0.0)


def bn_st(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as the affine map ``s * x + t``."""
    s = p["weight"] / torch.sqrt(p["var"] + p["eps"])
    return s, p["bias"] - p["mean"] * s


def bn_text(p: dict, label: str = "BN") -> list[str]:
    """Two lines: a BN's parameters, and its s and t."""
    s, tt = bn_st(p)
    return [
        f"{label}: mean = {vec(p['mean'])}, var = {vec(p['var'])}, gamma = {vec(p['weight'])}, beta = {vec(p['bias'])}, eps = {fmt(p['eps'])}",
        f"    s = gamma / sqrt(var + eps) = {vec(s)},   t = beta - mean * s = {vec(tt)}",
    ]


# --------------------------------------------------------------------------- printing numbers


def fmt(v: float) -> str:
    """An integer or small fraction when ``v`` is exactly one, else 4 significant digits."""
    r = round(v)
    if abs(v - r) < 1e-9:
        return str(int(r))
    f = Fraction(v).limit_denominator(1000)
    if abs(float(f) - v) < 1e-9:
        return f"{f.numerator}/{f.denominator}"
    return f"{v:.4g}"


def grid(m: torch.Tensor) -> list[str]:
    """A 2-D tensor as right-aligned columns."""
    cells = [[fmt(float(v)) for v in row] for row in m]
    w = max(len(c) for row in cells for c in row)
    return ["  ".join(c.rjust(w) for c in row) for row in cells]


def side(*items: tuple[str, torch.Tensor]) -> list[str]:
    """Several labelled 2-D grids next to each other."""
    blocks = [[label] + grid(m) for label, m in items]
    widths = [max(len(s) for s in b) for b in blocks]
    height = max(len(b) for b in blocks)
    lines = []
    for r in range(height):
        parts = [(b[r] if r < len(b) else "").ljust(w) for b, w in zip(blocks, widths)]
        lines.append("    ".join(parts).rstrip())
    return lines


def vec(v: torch.Tensor) -> str:
    """A 1-D tensor as ``[a, b]`` (a single number for one element)."""
    v = v.reshape(-1)
    return fmt(float(v[0])) if v.numel() == 1 else "[" + ", ".join(fmt(float(a)) for a in v) + "]"


def maps(label: str, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The channels of an image ``(1, C, H, W)`` as labelled grids."""
    if x.shape[1] == 1:
        return [(label, x[0, 0])]
    return [(f"{label}[c={c}]", x[0, c]) for c in range(x.shape[1])]


def kernels(label: str, w: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The 2-D slices of a kernel ``(O, I, kh, kw)`` as labelled grids."""
    if w.shape[0] * w.shape[1] == 1:
        return [(label, w[0, 0])]
    return [(f"{label}[{o},{i}]", w[o, i]) for o in range(w.shape[0]) for i in range(w.shape[1])]


class Text:
    """Accumulates the lines of a numbers block."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, s: str = "") -> "Text":
        self.lines.append(s)
        return self

    def grids(self, *items: tuple[str, torch.Tensor]) -> "Text":
        if self.lines and self.lines[-1] != "":
            self.lines.append("")
        self.lines.extend(side(*items))
        return self

    def __str__(self) -> str:
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        return "\n".join(self.lines)


# --------------------------------------------------------------------------- graphs


def canonical(graph: Graph) -> Graph:
    """Name every node's value ``<op><position>``, so listings do not depend on global counters."""
    for i, n in enumerate(graph.nodes):
        n.out.name = f"{n.op}{i}"
    return graph


def value_of(graph: Graph, value: Value, *inputs: torch.Tensor) -> torch.Tensor:
    """Run ``graph`` and return ``value`` (any intermediate value)."""
    return run_graph(Graph(graph.inputs, graph.nodes, [value]), *inputs)


def conv_of(x: torch.Tensor, **conv: torch.Tensor | tuple) -> torch.Tensor:
    """One conv2d node (weights and attributes as keywords) run on ``x``: what a fold would compute."""
    b = GraphBuilder()
    v = b.input("x", x.shape, DT)
    return run_graph(b.build(b.conv2d(v, **conv)), x)


def node(graph: Graph, op: str, index: int = 0):
    """The ``index``-th node of ``graph`` whose op is ``op``."""
    return [n for n in graph.nodes if n.op == op][index]


def no_match(graph: Graph, name: str) -> str:
    """Check that the rule ``name`` neither fires nor refuses anywhere in ``graph``; a line saying so."""
    r = RULES[name]
    for n in graph.nodes:
        if n.op in r.ops and r.fn(graph, n) is not None:
            raise AssertionError(f"{name} matches this graph")
    return f"{name} does not match: the graph is left as it is"


def tokens(label: str, y: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A ``(1, N, C)`` token tensor as an N x C grid (a row per token)."""
    return (label, y[0])


def refusal(graph: Graph, name: str) -> str:
    """The reason the rule ``name`` gives for refusing somewhere in ``graph`` (it must refuse)."""
    r = RULES[name]
    for n in graph.nodes:
        if n.op in r.ops:
            result = r.fn(graph, n)
            if isinstance(result, Refusal):
                return result.reason
    raise AssertionError(f"{name} does not refuse this graph")


def equal_line(before: torch.Tensor, after: torch.Tensor) -> str:
    if not torch.allclose(before, after, atol=1e-9, rtol=0):
        raise AssertionError(f"the rewritten graph differs: {(before - after).abs().max():.3g}")
    return "before == after: yes (every element, to within 1e-9)"


def differ_line(truth: torch.Tensor, candidate: torch.Tensor, why: str = "they differ exactly where the window reaches the padding") -> str:
    if torch.allclose(truth, candidate, atol=1e-9, rtol=0):
        raise AssertionError("the counterexample does not differ")
    return why


@dataclass
class Example:
    """A page's example: the graph before and after, and its generated text blocks."""

    name: str
    before: Graph
    after: Graph
    blocks: dict[str, str] = field(default_factory=dict)
    pictures: dict[str, Graph] = field(default_factory=dict)  # more graphs to draw, as img/{name}_{key}.svg

    def all_blocks(self) -> dict[str, str]:
        return {"before": str(self.before), "after": str(self.after), **self.blocks}


def apply(name: str, graph: Graph, *rules: str) -> tuple[Graph, list[str]]:
    """Rewrite ``graph`` with the named rules only (all rules when none given); both graphs get canonical names."""
    chosen = [RULES[r] for r in rules] if rules else None
    after, report = rewrite(graph, chosen)
    fired = [f.rule for f in report.fired]
    if rules and not fired:
        raise AssertionError(f"{name}: {rules} did not fire")
    canonical(graph)
    canonical(after)
    return after, [f"{f.rule:<18} at {f.source or '<graph>'}" for f in report.fired]


# --------------------------------------------------------------------------- the examples

EXAMPLES: dict[str, Callable[[], Example]] = {}


def example(fn: Callable[[], Example]) -> Callable[[], Example]:
    EXAMPLES[fn.__name__] = fn
    return fn


@example
def bn_fold() -> Example:
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    c = b.conv2d(x, weight=W3, padding=P1, source="block.conv")
    bn = bn_params([2], [4], [3], [1])
    y = b.batch_norm(c, **bn, source="block.bn")
    g = b.build(y)
    after, _ = apply("bn_fold", g, "bn_fold")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X), run_graph(after, X)
    txt = Text()
    for line in bn_text(bn):
        txt.line(line)
    txt.grids(*maps("x", X), ("W", W3[0, 0]), ("W' = s W", fused.params["weight"][0, 0]))
    txt.line(f"b' = s * b + t = s * 0 + t = {vec(fused.params['bias'])}")
    txt.grids(("BN(conv(x; W))", before_y[0, 0]), ("conv(x; W', b')", after_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))

    shared = GraphBuilder()
    x = shared.input("x", X.shape, DT)
    c = shared.conv2d(x, weight=W3, padding=P1, source="block.conv")
    sg = shared.build(shared.add(c, shared.batch_norm(c, **bn, source="block.bn"), source="block"))
    ref = Text().line(f"in y = z + BN(z) with z = conv(x), bn_fold refuses: {refusal(sg, 'bn_fold')}")
    shuffle_before, shuffle_after, shuffle_txt = _bn_fold_shuffle()
    piece_before, piece_after, piece_txt = _bn_fold_piece()
    return Example("bn_fold", g, after, {"numbers": str(txt), "refused": str(ref), "shuffle": str(shuffle_txt),
                                         "shuffle_before": str(shuffle_before), "shuffle_after": str(shuffle_after),
                                         "piece": str(piece_txt), "piece_before": str(piece_before), "piece_after": str(piece_after)},
                   {"shuffle_before": shuffle_before, "shuffle_after": shuffle_after,
                    "piece_before": piece_before, "piece_after": piece_after})


def _bn_fold_shuffle() -> tuple[Graph, Graph, Text]:
    """EDSR's upsampler with ``bn=True`` at the smallest size: a 1x1 conv to C r^2 = 2 * 4 channels of a 1 x 1 map,
    ``PixelShuffle(2)`` to 2 channels of 2 x 2, a BN over those 2 channels."""
    xs = t([[[[1.0]], [[2.0]]]])  # (1, 2, 1, 1)
    w = t([[1, 0], [0, 1], [1, 1], [2, 0], [0, 2], [1, -1], [-1, 0], [0, 0]]).reshape(8, 2, 1, 1)
    bn = bn_params([1, 2], [4, 1], [1, 3], [0, 1])
    b = GraphBuilder()
    x = b.input("x", xs.shape, DT)
    y = b.pixel_shuffle(b.conv2d(x, weight=w, source="upsample.0"), factor=2, source="upsample.1")
    g = b.build(b.batch_norm(y, **bn, source="upsample.2"))
    after, _ = apply("bn_fold", g, "bn_fold")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, xs), run_graph(after, xs)
    txt = Text()
    txt.line("x: 2 channels of a 1 x 1 map, [1, 2]; a 1x1 conv to 8 = 2 * 2^2 channels, no bias;")
    txt.line("PixelShuffle(2) to 2 channels of 2 x 2; a BN over those 2 channels")
    for line in bn_text(bn):
        txt.line(line)
    txt.line(f"conv(x) = {vec(value_of(g, y.producer.x, xs))}: channels 0-3 become channel 0 of the shuffle, 4-7 channel 1")
    txt.line(f"s repeated 4 times each = {vec(bn_st(bn)[0].repeat_interleave(4))}")
    txt.grids(("W (one row per channel)", w[:, :, 0, 0]), ("W' = s[o // 4] W[o]", fused.params["weight"][:, :, 0, 0]))
    txt.line(f"b' = t[o // 4] = {vec(fused.params['bias'])}")
    txt.grids(*maps("BN(shuffle(conv(x; W)))", before_y))
    txt.grids(*maps("shuffle(conv(x; W', b'))", after_y))
    txt.line().line(equal_line(before_y, after_y))
    return g, after, txt


def _bn_fold_piece() -> tuple[Graph, Graph, Text]:
    """IBN-Net's norm at the smallest size: a 1x1 conv to 4 channels of a 1 x 1 map, split in halves; a ReLU (in
    place of the instance norm) on the first half, a BN on the second, then the concat."""
    xs = t([[[[1.0]], [[2.0]]]])  # (1, 2, 1, 1)
    w = t([[1, 0], [0, 1], [1, 1], [2, -1]]).reshape(4, 2, 1, 1)
    bn = bn_params([1, 2], [4, 1], [1, 3], [0, 1])
    b = GraphBuilder()
    x = b.input("x", xs.shape, DT)
    conv = b.conv2d(x, weight=w, source="conv1")
    first, second = (b.piece(conv, how="split", size=2, index=i, axis=1, count=2, source="bn1") for i in (0, 1))
    g = b.build(b.concat(b.relu(first, source="bn1.IN"), b.batch_norm(second, **bn, source="bn1.BN"), axis=1, source="bn1"))
    after, _ = apply("bn_fold", g, "bn_fold")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, xs), run_graph(after, xs)
    txt = Text()
    txt.line("x: 2 channels of a 1 x 1 map, [1, 2]; a 1x1 conv to 4 channels, no bias;")
    txt.line("split in halves: a ReLU on channels 0-1 (the instance norm's place), a BN on channels 2-3")
    for line in bn_text(bn):
        txt.line(line)
    txt.line(f"conv(x) = {vec(value_of(g, conv, xs))}")
    txt.grids(("W (one row per channel)", w[:, :, 0, 0]), ("W': rows 2-3 scaled by s", fused.params["weight"][:, :, 0, 0]))
    txt.line(f"b' = [0, 0, t] = {vec(fused.params['bias'])}")
    txt.line(f"before: cat(relu(conv(x)[0:2]), BN(conv(x)[2:4])) = {vec(before_y)}")
    txt.line(f"after:  cat(relu(conv'(x)[0:2]), conv'(x)[2:4])    = {vec(after_y)}")
    txt.line().line(equal_line(before_y, after_y))
    return g, after, txt


@example
def bn_to_conv() -> Example:
    wide = t([[1, 2], [0, 1]]).reshape(2, 2, 1, 1)
    b = GraphBuilder()
    x = b.input("x", X2.shape, DT)
    conv = b.conv2d(x, weight=wide, source="block.conv")
    bnp = bn_params([2, 1], [4, 1], [1, 2], [3, 0])
    bn = b.batch_norm(x, **bnp, source="block.skip")
    g = b.build(b.add(conv, bn, source="block"))
    bn_node = bn.producer
    branch = value_of(g, bn, X2)
    after, _ = apply("bn_to_conv", g, "bn_to_conv")
    new = [n for n in after.nodes if n.op == "conv2d" and n.source == "block.skip"][0]
    conv_branch = value_of(after, new.out, X2)
    txt = Text()
    for line in bn_text(bnp, "BN over 2 channels"):
        txt.line(line)
    txt.line(f"the sibling conv is dense (groups {conv.producer.attrs['groups']}), so K = diag(s) as a 2x2 matrix of 1x1 taps:")
    txt.grids(("K[:, :, 0, 0]", new.params["weight"][:, :, 0, 0]))
    txt.line(f"bias = t = {vec(new.params['bias'])}")
    txt.grids(*maps("x", X2))
    txt.grids(*maps("BN(x)", branch))
    txt.grids(*maps("conv(x; K, t)", conv_branch))
    txt.line().line(equal_line(branch, conv_branch))
    txt.line(equal_line(run_graph(g, X2), run_graph(after, X2)).replace("before == after", "whole graph before == after"))
    assert bn_node.op == "batch_norm"
    return Example("bn_to_conv", g, after, {"numbers": str(txt)})


@example
def identity_to_conv() -> Example:
    w = torch.arange(-4, 32, dtype=DT).reshape(2, 2, 3, 3) % 5 - 2
    b = GraphBuilder()
    x = b.input("x", X2.shape, DT)
    conv = b.conv2d(x, weight=w, padding=P1, source="block.conv")
    g = b.build(b.add(x, conv, source="block"))
    after, _ = apply("identity_to_conv", g, "identity_to_conv")
    new = [n for n in after.nodes if n.op == "conv2d" and n.params["weight"].shape[2:] == (1, 1)][0]
    branch = value_of(after, new.out, X2)
    txt = Text()
    txt.line(f"the sibling conv is dense (groups {conv.producer.attrs['groups']}): the identity is the 2x2 identity matrix of 1x1 taps")
    txt.grids(("I[:, :, 0, 0]", new.params["weight"][:, :, 0, 0]))
    txt.line(f"bias: {'none' if 'bias' not in new.params else vec(new.params['bias'])}")
    txt.grids(*maps("x", X2))
    txt.grids(*maps("conv(x; I)", branch))
    txt.line().line(equal_line(X2, branch))
    txt.line(equal_line(run_graph(g, X2), run_graph(after, X2)).replace("before == after", "whole graph before == after"))
    return Example("identity_to_conv", g, after, {"numbers": str(txt)})


@example
def identity_elim() -> Example:
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    i = b.identity(x, source="block.drop")
    g = b.build(b.conv2d(i, weight=W3, padding=P1, source="block.conv"))
    after, _ = apply("identity_elim", g, "identity_elim")
    before_y, after_y = run_graph(g, X), run_graph(after, X)
    txt = Text()
    txt.grids(*maps("x", X), *maps("identity(x)", value_of(g, i, X)), ("W", W3[0, 0]))
    txt.grids(("conv(identity(x); W)", before_y[0, 0]), ("conv(x; W)", after_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))
    return Example("identity_elim", g, after, {"numbers": str(txt)})


@example
def kernel_pad() -> Example:
    w1 = k([2])
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    big = b.conv2d(x, weight=W3, padding=P1, source="block.conv3x3")
    small = b.conv2d(x, weight=w1, source="block.conv1x1")
    g = b.build(b.add(big, small, source="block"))
    small_y = value_of(g, small, X)
    after, _ = apply("kernel_pad", g, "kernel_pad")
    grown = [n for n in after.nodes if n.source == "block.conv1x1"][0]
    grown_y = value_of(after, grown.out, X)
    txt = Text()
    txt.line(f"the 1x1 branch grows to 3x3: one zero row/column on each side (a = b = c = e = 1),")
    txt.line(f"and its padding grows by the same amounts: {small.producer.attrs['padding']} -> {grown.attrs['padding']}")
    txt.grids(*maps("x", X), ("W (1x1)", w1[0, 0]), ("pad(W) (3x3)", grown.params["weight"][0, 0]))
    txt.grids(("conv(x; W, padding 0)", small_y[0, 0]), ("conv(x; pad(W), padding 1)", grown_y[0, 0]))
    txt.line().line(equal_line(small_y, grown_y))
    txt.line(equal_line(run_graph(g, X), run_graph(after, X)).replace("before == after", "whole graph before == after"))
    return Example("kernel_pad", g, after, {"numbers": str(txt)})


@example
def dilation_to_dense() -> Example:
    wd = k([1, 0, 2], [0, 1, 0], [1, 0, 1])
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    w5 = k([1, 0, 0, 0, -1], [0, 2, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 2, 0], [-1, 0, 0, 0, 1])
    near = b.conv2d(x, weight=w5, padding=(2, 2, 2, 2), source="block.conv5x5")  # spans the dilated one's 5x5: merging costs nothing
    far = b.conv2d(x, weight=wd, padding=(2, 2, 2, 2), dilation=(2, 2), source="block.dilated")
    g = b.build(b.add(near, far, source="block"))
    far_y = value_of(g, far, X)
    after, _ = apply("dilation_to_dense", g, "dilation_to_dense")
    dense = [n for n in after.nodes if n.source == "block.dilated"][0]
    dense_y = value_of(after, dense.out, X)
    txt = Text()
    txt.line("a 3x3 kernel with dilation 2 spans 5x5; its dense form puts the taps 2 apart, zeros between")
    txt.grids(*maps("x", X), ("W (dilation 2)", wd[0, 0]), ("D_2(W) (dilation 1)", dense.params["weight"][0, 0]))
    txt.grids(("conv(x; W, dilation 2, padding 2)", far_y[0, 0]), ("conv(x; D_2(W), padding 2)", dense_y[0, 0]))
    txt.line().line(equal_line(far_y, dense_y))
    txt.line(equal_line(run_graph(g, X), run_graph(after, X)).replace("before == after", "whole graph before == after"))
    return Example("dilation_to_dense", g, after, {"numbers": str(txt)})


@example
def pad_absorb() -> Example:
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    p = b.pad(x, pads=P1, source="block.pad")
    g = b.build(b.conv2d(p, weight=W3, source="block.conv"))
    after, _ = apply("pad_absorb", g, "pad_absorb")
    before_y, after_y = run_graph(g, X), run_graph(after, X)
    txt = Text()
    txt.grids(*maps("x", X), *maps("pad(x, 1)", value_of(g, p, X)), ("W", W3[0, 0]))
    txt.grids(("conv(pad(x); W, padding 0)", before_y[0, 0]), ("conv(x; W, padding 1)", after_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))

    # Refused: a pad with value 1 is not the conv's zero padding.
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    p = b.pad(x, pads=P1, value=1.0, source="block.pad")
    bad = b.build(b.conv2d(p, weight=ONES3, source="block.conv"))
    truth = run_graph(bad, X)
    candidate = conv_of(X, weight=ONES3, padding=P1)
    ref = Text()
    ref.line(f"pad_absorb refuses: {refusal(bad, 'pad_absorb')}")
    ref.grids(*maps("pad(x, 1, value=1)", value_of(bad, p, X)), ("W (all ones)", ONES3[0, 0]))
    ref.grids(("conv(pad(x, value=1); W)", truth[0, 0]), ("conv(x; W, padding 1)", candidate[0, 0]), ("difference", (truth - candidate)[0, 0]))
    ref.line().line(differ_line(truth, candidate) + ": one per padded tap in the window")

    # After a bias-free 1x1 conv: the pad becomes the 1x1's padding; with a bias it stays.
    w1 = t([[2, -1]]).reshape(1, 2, 1, 1)
    b = GraphBuilder()
    x = b.input("x", X2.shape, DT)
    pw = b.conv2d(x, weight=w1, source="block.conv1x1")
    pg = b.build(b.pad(pw, pads=P1, source="block.pad"))
    pafter, _ = apply("pad_absorb", pg, "pad_absorb")
    pad_y, padding_y = run_graph(pg, X2), run_graph(pafter, X2)
    pt = Text()
    pt.line(f"a 1x1 conv without bias, W = {vec(w1)} (2 channels to 1), then a zero pad by 1:")
    pt.line(f"it becomes the 1x1 conv with padding {node(pafter, 'conv2d').attrs['padding']}")
    pt.grids(*maps("x", X2))
    pt.grids(("pad(conv1x1(x; W), 1)", pad_y[0, 0]), ("conv1x1(x; W, padding 1)", padding_y[0, 0]))
    pt.line().line(equal_line(pad_y, padding_y))
    b = GraphBuilder()
    x = b.input("x", X2.shape, DT)
    biased = b.build(b.pad(b.conv2d(x, weight=w1, bias=t([3]), source="block.conv1x1"), pads=P1, source="block.pad"))
    truth = run_graph(biased, X2)
    candidate = conv_of(X2, weight=w1, bias=t([3]), padding=P1)
    pt.line().line(f"with a bias b = 3, pad_absorb refuses: {refusal(biased, 'pad_absorb')}")
    pt.grids(("pad(conv1x1(x; W, b), 1)", truth[0, 0]), ("conv1x1(x; W, b, padding 1)", candidate[0, 0]))
    pt.line().line(differ_line(truth, candidate, "they differ on the border: 0 from the pad, b = 3 from the conv's padding"))

    # Before an average pool: the pad becomes the pool's padding, counted.
    pools = []
    for pool_pad, cip in ((0, False), (1, False)):
        b = GraphBuilder()
        x = b.input("x", X.shape, DT)
        p = b.pad(x, pads=P1, source="block.pad")
        pools.append(b.build(b.avg_pool2d(p, kernel=(3, 3), stride=(1, 1), padding=(pool_pad, pool_pad), count_include_pad=cip, source="block.pool")))
    qafter, _ = apply("pad_absorb", pools[0], "pad_absorb")
    pool = node(qafter, "avg_pool2d")
    pool_y, padded_y = run_graph(pools[0], X), run_graph(qafter, X)
    qt = Text()
    qt.line(f"avg_pool(pad(x, 1); 3x3, stride 1) becomes avg_pool(x; 3x3, stride 1, padding {pool.attrs['padding']}, count_include_pad={pool.attrs['count_include_pad']})")
    qt.grids(("avg_pool(pad(x, 1))", pool_y[0, 0]), ("avg_pool(x, padding 1)", padded_y[0, 0]))
    qt.line().line(equal_line(pool_y, padded_y))
    qt.line().line(f"a pool with padding 1 that does not count it, after the pad: pad_absorb refuses: {refusal(pools[1], 'pad_absorb')}")
    return Example("pad_absorb", g, after, {"numbers": str(txt), "refused": str(ref), "pointwise": str(pt), "pool": str(qt)})


@example
def crop_into_conv() -> Example:
    x = t([[1, 2, 0, 3, 1]]).reshape(1, 1, 1, 5)  # a sequence of 5 steps, as a conv of height one sees it
    w = t([[1, -1, 2]]).reshape(1, 1, 1, 3)
    b = GraphBuilder()
    v = b.input("x", x.shape, DT)
    y = b.conv2d(v, weight=w, padding=(0, 0, 2, 2), source="tcn.conv")
    g = b.build(b.slice(y, axis=3, start=0, end=-2, step=1, source="tcn.chomp"))
    after, _ = apply("crop_into_conv", g, "crop_into_conv")
    txt = Text()
    txt.line(f"a causal conv as a TCN writes it: kernel {vec(w)}, padding 2 on both sides, then y[..., :-2]")
    txt.grids(("x", x[0, 0]), ("conv(x; padding (2, 2))", value_of(g, y, x)[0, 0]))
    txt.line().line("the chomp drops the last 2 outputs: the conv with 2 less padding on the right, padding (2, 0)")
    txt.grids(("conv(x; padding (2, 2))[..., :-2]", run_graph(g, x)[0, 0]), ("conv(x; padding (2, 0))", run_graph(after, x)[0, 0]))
    txt.line().line(equal_line(run_graph(g, x), run_graph(after, x)))

    b = GraphBuilder()
    v = b.input("x", x.shape, DT)
    bad = b.build(b.slice(b.conv2d(v, weight=w, padding=(0, 0, 2, 2), source="tcn.conv"), axis=3, start=0, end=4, step=1, source="tcn.chomp"))
    ref = Text()
    ref.line("y[..., :4] keeps 4 outputs at every length; a padding keeps a number that grows with the length")
    ref.line("crop_into_conv refuses: " + refusal(bad, "crop_into_conv").replace(": how", ":\n    how"))
    return Example("crop_into_conv", g, after, {"numbers": str(txt), "refused": str(ref)})


@example
def crop_before_conv() -> Example:
    x = image([[1, 2, 0, 3], [0, 1, 3, 1], [2, 0, 1, 2]])
    ver = k([1], [2], [-1])
    b = GraphBuilder()
    v = b.input("x", x.shape, DT)
    cut = b.slice(v, axis=3, start=1, end=-1, step=1, source="acb.crop")
    g = b.build(b.add(b.conv2d(v, weight=W3, source="acb.square_conv"), b.conv2d(cut, weight=ver, source="acb.ver_conv"), source="acb"))
    after, _ = apply("crop_before_conv", g, "crop_before_conv")
    grown = next(n for n in after.nodes if n.op == "conv2d" and n.x is after.inputs[0] and n.params["weight"][0, 0, 0, 0] == 0)
    txt = Text()
    txt.line(f"ACNet at padding 0: the 3x1 branch, kernel {vec(ver)}, reads x[..., 1:-1]; the 3x3 reads x")
    txt.grids(("x", x[0, 0]), ("x[..., 1:-1]", x[0, 0, :, 1:-1]))
    txt.line().line("a column cropped on each side the 3x1 conv does not pad: a zero column of its kernel")
    txt.grids(("3x1 kernel", ver[0, 0]), ("grown kernel", grown.params["weight"][0, 0]))
    ver_y = conv_of(x[..., 1:-1], weight=ver)
    grown_y = conv_of(x, weight=grown.params["weight"])
    txt.grids(("conv(x[..., 1:-1]; 3x1)", ver_y[0, 0]), ("conv(x; grown)", grown_y[0, 0]))
    txt.line().line(equal_line(run_graph(g, x), run_graph(after, x)))

    b = GraphBuilder()
    v = b.input("x", x.shape, DT)
    cut = b.slice(v, axis=3, start=1, end=-1, step=1, source="acb.crop")
    bad = b.build(b.add(b.conv2d(v, weight=W3, padding=(0, 0, 1, 1), source="acb.square_conv"),
                        b.conv2d(cut, weight=ver, padding=(0, 0, 1, 1), source="acb.ver_conv"), source="acb"))
    ref = Text()
    ref.line("the same crop before a 3x1 conv padded 1 left and right: its first output reads a padded zero,")
    ref.line("where a grown kernel would read x's first column")
    ref.line("crop_before_conv refuses: " + refusal(bad, "crop_before_conv").replace(": it", ":\n    it"))
    return Example("crop_before_conv", g, after, {"numbers": str(txt), "refused": str(ref)})


@example
def pad_share() -> Example:
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    copy = b.node("pad_nd", x, pads=P1, mode="reflect", value=0.0, source="block.pad")
    y3 = b.conv2d(copy, weight=W3, source="block.conv3x3")
    y1 = b.conv2d(x, weight=k([2]), source="block.conv1x1")
    g = b.build(b.add(y3, y1, source="block"))
    moved, _ = apply("pad_share", g, "pad_share")
    after, _ = apply("pad_share", g)
    reflected = value_of(g, copy, X)
    one = [n for n in moved.nodes if n.source == "block.conv1x1"][0]
    txt = Text()
    txt.line("RepVGG with padding_mode='reflect': the 3x3 reads the reflected copy,")
    txt.line("the 1x1 (W1 = 2) reads x")
    txt.grids(*maps("x", X), *maps("pad_reflect(x, 1)", reflected), ("W3", W3[0, 0]))
    txt.line().line("the 1x1, padded to 3x3 by zeros, reads the copy's interior, which is x:")
    txt.grids(("pad_0(W1, 1)", one.params["weight"][0, 0]), ("conv1x1(x; W1)", value_of(g, y1, X)[0, 0]),
              ("conv(pad_reflect(x); pad_0(W1))", value_of(moved, one.out, X)[0, 0]))
    txt.line().line("so the two sum to one conv of the copy, W3 + pad_0(W1) (kernel_pad, branch_sum):")
    txt.line(f"{dict(after.op_counts())}")
    fused = [n for n in after.nodes if n.op == "conv2d"][0]
    txt.grids(("W3 + pad_0(W1)", fused.params["weight"][0, 0]), ("before", run_graph(g, X)[0, 0]), ("after", run_graph(after, X)[0, 0]))
    txt.line().line(equal_line(run_graph(g, X), run_graph(after, X)))

    # Not moved: a 3x3 with zero padding of its own reads 0 where the copy holds reflected pixels.
    truth = conv_of(X, weight=ONES3, padding=P1)
    candidate = run_graph(_moved_padded(), X)
    ref = Text()
    ref.line("a 3x3 of x with zero padding 1 (all-ones kernel W), computed on the reflected")
    ref.line("copy instead (its kernel padded by 1 more):")
    ref.grids(("conv(x; W, padding 1)", truth[0, 0]), ("conv(pad_reflect(x); pad_0(W), padding 1)", candidate[0, 0]),
              ("difference", (truth - candidate)[0, 0]))
    ref.line().line(differ_line(truth, candidate, "they differ where the window reaches past x: the copy holds pixels there, not 0"))
    return Example("pad_share", g, after, {"numbers": str(txt), "refused": str(ref)})


@example
def sum_regroup() -> Example:
    w1 = k([2])
    bnp = bn_params([0], [4], [1], [1])
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    gate = b.relu(b.conv2d(x, weight=W3, padding=P1, source="block.gate"), source="block.act")
    pw = b.conv2d(x, weight=w1, source="block.conv1x1")
    idt = b.batch_norm(x, **bnp, source="block.bn")
    g = b.build(b.add(b.add(gate, pw, source="block"), idt, source="block"))
    regrouped, _ = apply("sum_regroup", g, "sum_regroup")
    after, fired = apply("sum_regroup", g)
    txt = Text()
    txt.line("gate(x) + conv1x1(x) + BN(x), parsed (gate + conv1x1) + BN:")
    txt.line("no two neighbours read the same input. Regrouped gate + (conv1x1 + BN),")
    txt.line("bn_to_conv and branch_sum make the pair one 1x1 conv:")
    for f in fired:
        txt.line("    " + f)
    txt.line(f"ops before: {dict(g.op_counts())}").line(f"ops after:  {dict(after.op_counts())}")
    txt.line().line(equal_line(run_graph(g, X), run_graph(after, X)))
    return Example("sum_regroup", g, after, {"numbers": str(txt)})


def _moved_padded() -> Graph:
    """conv(pad_reflect(x; 1); pad_0(ONES3; 1), padding 1): what moving a conv with padding of its own would compute."""
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    copy = b.node("pad_nd", x, pads=P1, mode="reflect", value=0.0, source="block.pad")
    return b.build(b.conv2d(copy, weight=torch.nn.functional.pad(ONES3, P1), padding=P1, source="block.conv"))


@example
def branch_sum() -> Example:
    wb = k([0, 1, 0], [1, -1, 1], [0, 1, 0])
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    ya = b.conv2d(x, weight=W3, bias=t([1]), padding=P1, source="block.a")
    yb = b.conv2d(x, weight=wb, bias=t([2]), padding=P1, source="block.b")
    g = b.build(b.add(ya, yb, source="block"))
    after, _ = apply("branch_sum", g, "branch_sum")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X), run_graph(after, X)
    txt = Text()
    txt.grids(*maps("x", X), ("W_a (b_a = 1)", W3[0, 0]), ("W_b (b_b = 2)", wb[0, 0]), ("W_a + W_b", fused.params["weight"][0, 0]))
    txt.line(f"b_a + b_b = {vec(fused.params['bias'])}")
    txt.grids(("conv(x; W_a, b_a)", value_of(g, ya, X)[0, 0]), ("conv(x; W_b, b_b)", value_of(g, yb, X)[0, 0]), ("their sum", before_y[0, 0]), ("conv(x; W_a + W_b, b_a + b_b)", after_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))
    return Example("branch_sum", g, after, {"numbers": str(txt)})


@example
def scale_fold() -> Example:
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    c = b.conv2d(x, weight=W3, bias=t([1]), padding=P1, source="block.conv")
    g = b.build(b.scale(c, scale=t([0.5]), source="block.layer_scale"))
    after, _ = apply("scale_fold", g, "scale_fold")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X), run_graph(after, X)
    txt = Text()
    txt.line("layer scale gamma = 1/2; the conv has bias b = 1")
    txt.grids(*maps("x", X), ("W", W3[0, 0]), ("W' = gamma W", fused.params["weight"][0, 0]))
    txt.line(f"b' = gamma b = {vec(fused.params['bias'])}")
    txt.grids(("gamma * conv(x; W, b)", before_y[0, 0]), ("conv(x; W', b')", after_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))

    shared = GraphBuilder()
    x = shared.input("x", X.shape, DT)
    c = shared.conv2d(x, weight=W3, padding=P1, source="block.conv")
    sg = shared.build(shared.add(c, shared.scale(c, scale=t([0.5]), source="block.layer_scale"), source="block"))
    ref = Text().line(f"in y = c + gamma * c with c = conv(x), scale_fold refuses: {refusal(sg, 'scale_fold')}")
    return Example("scale_fold", g, after, {"numbers": str(txt), "refused": str(ref)})


@example
def bias_fold() -> Example:
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    c = b.conv2d(x, weight=W3, bias=t([1]), padding=P1, source="block.conv")
    g = b.build(b.add_const(c, const=t([2]).reshape(1, 1, 1, 1), sign=-1.0, source="block.shift"))
    after, _ = apply("bias_fold", g, "bias_fold")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X), run_graph(after, X)
    txt = Text()
    txt.line("y = c - conv(x; W, b) with the constant c = 2 (one per channel) and bias b = 1: sign = -1")
    txt.grids(*maps("x", X), ("W", W3[0, 0]), ("W' = sign W", fused.params["weight"][0, 0]))
    txt.line(f"b' = sign b + c = {vec(fused.params['bias'])}")
    txt.grids(("c - conv(x; W, b)", before_y[0, 0]), ("conv(x; W', b')", after_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))

    pos = GraphBuilder()
    x = pos.input("x", X.shape, DT)
    c = pos.conv2d(x, weight=W3, padding=P1, source="block.conv")
    bad = pos.build(pos.add_const(c, const=X.clone(), source="block.pos_embed"))
    ref = Text().line("a positional embedding (one value per position, 1x1x3x3) added after the conv:")
    ref.line(no_match(bad, "bias_fold")).line("(a bias adds one value per channel, the same at every position)")
    return Example("bias_fold", g, after, {"numbers": str(txt), "unmatched": str(ref)})


@example
def scale_into_conv() -> Example:
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    sc = b.scale(x, scale=t([0.5]), source="block.gamma")
    g = b.build(b.conv2d(sc, weight=W3, bias=t([1]), padding=P1, source="block.conv"))
    after, _ = apply("scale_into_conv", g, "scale_into_conv")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X), run_graph(after, X)
    txt = Text()
    txt.line("a scale s = 1/2 on the one input channel, then a zero-padded 3x3 conv with bias b = 1")
    txt.grids(*maps("x", X), ("s x", 0.5 * X[0, 0]), ("W", W3[0, 0]), ("W' = s W", fused.params["weight"][0, 0]))
    txt.line(f"b' = b = {vec(fused.params['bias'])} (the scale comes before the bias)")
    txt.grids(("conv(s x; W, b)", before_y[0, 0]), ("conv(x; W', b)", after_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))
    txt.line("the border too: the conv pads s x with 0 = s * 0")

    shared = GraphBuilder()
    x = shared.input("x", X.shape, DT)
    sx = shared.scale(x, scale=t([0.5]), source="block.gamma")
    bad = shared.build(shared.add(shared.conv2d(sx, weight=W3, padding=P1, source="block.conv"), sx, source="block"))
    ref = Text().line("y = conv(s x) + s x: the scaled value is read twice")
    ref.line(no_match(bad, "scale_into_conv")).line("(the other reader still needs s x)")
    return Example("scale_into_conv", g, after, {"numbers": str(txt), "unmatched": str(ref)})


@example
def seq_merge() -> Example:
    w1 = torch.cat([W3, k([0, 1, 0], [1, 1, 1], [0, 1, 0])])  # (2, 1, 3, 3)
    w2 = t([[2, -1]]).reshape(1, 2, 1, 1)
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    mid = b.conv2d(x, weight=w1, bias=t([1, 0]), padding=P1, source="block.conv3x3")
    g = b.build(b.conv2d(mid, weight=w2, bias=t([3]), source="block.conv1x1"))
    after, _ = apply("seq_merge", g, "seq_merge")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X), run_graph(after, X)
    txt = Text()
    txt.line(f"kxk then 1x1: a 3x3 conv to 2 channels (bias b1 = {vec(mid.producer.params['bias'])}),")
    txt.line(f"then a 1x1 conv back to 1 channel (W2 = {vec(w2)}, b2 = 3)")
    txt.grids(*maps("x", X), *kernels("W1", w1))
    txt.grids(("W = W2[0] W1[0] + W2[1] W1[1]", fused.params["weight"][0, 0]))
    txt.line(f"b = W2 b1 + b2 = {vec(fused.params['bias'])}")
    txt.grids(("conv1x1(conv3x3(x))", before_y[0, 0]), ("conv(x; W, b)", after_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))

    # Refused: a biased 1x1 before a zero-padded 3x3.
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    inner = b.conv2d(x, weight=k([2]), bias=t([1]), source="block.conv1x1")
    bad = b.build(b.conv2d(inner, weight=ONES3, padding=P1, source="block.conv3x3"))
    truth = run_graph(bad, X)
    # The formula anyway: W = W2 * 2, b = b2 + sum_taps W2 * b1 = 0 + 9 * 1.
    candidate = conv_of(X, weight=2 * ONES3, bias=t([9]), padding=P1)
    ref = Text()
    ref.line(f"seq_merge refuses: {refusal(bad, 'seq_merge')}")
    ref.line("1x1 conv: w1 = 2, b1 = 1; then a 3x3 conv of all ones with padding 1, no bias.")
    ref.line("The formula would give W = 2 * ones(3x3), b = 9 * b1 = 9.")
    ref.grids(*maps("x", X), *maps("2x + 1", value_of(bad, inner, X)))
    ref.grids(("conv3x3(conv1x1(x))", truth[0, 0]), ("conv(x; W, b = 9)", candidate[0, 0]), ("difference", (truth - candidate)[0, 0]))
    ref.line().line(differ_line(truth, candidate) + ": b1 = 1 for every tap that reads padding")

    # Refused: merging would cost more than the two convs (FastViT's ConvFFN shape: depthwise kxk, then a wide 1x1).
    b = GraphBuilder()
    x = b.input("x", X2.shape, DT)
    dw = b.conv2d(x, weight=torch.ones(2, 1, 3, 3, dtype=DT), padding=P1, groups=2, source="ffn.conv")
    wide = b.build(b.conv2d(dw, weight=torch.ones(4, 2, 1, 1, dtype=DT), source="ffn.fc1"))
    ref.line().line("a depthwise 3x3 on 2 channels (18 weights), then a 1x1 from 2 to 4 channels (8 weights):")
    ref.line(f"seq_merge refuses: {refusal(wide, 'seq_merge')}")

    # One normal form: a zero pad before or after a bias-free 1x1 conv, then an unpadded 3x3.
    pw_w = t([[1], [-1]]).reshape(2, 1, 1, 1)
    k2 = torch.cat([W3, ONES3], 1)  # (1, 2, 3, 3)
    pads = Text()
    merged = []
    for spelled in ("conv3x3(conv1x1(pad(x)))", "conv3x3(pad(conv1x1(x)))"):
        b = GraphBuilder()
        x = b.input("x", X.shape, DT)
        if spelled.startswith("conv3x3(conv1x1"):
            y = b.conv2d(b.pad(x, pads=P1, source="block.pad"), weight=pw_w, source="block.conv1x1")
        else:
            y = b.pad(b.conv2d(x, weight=pw_w, source="block.conv1x1"), pads=P1, source="block.pad")
        sg = b.build(b.conv2d(y, weight=k2, source="block.conv3x3"))
        sa, chain = apply("seq_merge", sg)
        conv = node(sa, "conv2d")
        merged.append((spelled, sg, sa, conv))
        pads.line(f"{spelled}: {', '.join(r.split()[0] for r in chain)} -> {len(sa.nodes)} node: conv, padding {conv.attrs['padding']}")
    pads.line(f"1x1: W1 = {vec(pw_w)} (1 channel to 2), no bias; 3x3: W2[0, 0] = W, W2[0, 1] = all ones")
    pads.grids(*[(f"merged kernel, {s_}", c.params["weight"][0, 0]) for s_, _, _, c in merged])
    same = all(torch.equal(merged[0][3].params["weight"], c.params["weight"]) for *_, c in merged)
    pads.line().line(f"the same conv from both spellings: {'yes' if same else 'no'}")
    for s_, sg, sa, _ in merged:
        pads.line(equal_line(run_graph(sg, X), run_graph(sa, X)).replace("before == after", f"{s_} before == after"))
    return Example("seq_merge", g, after, {"numbers": str(txt), "refused": str(ref), "padded": str(pads)})


def _filled(b: GraphBuilder, y: Value, fill: torch.Tensor, sides=((2, 0, 1), (2, -1, None), (3, 0, 1), (3, -1, None))) -> Value:
    """``y`` (a padded map) with its first/last row and column overwritten by ``fill[c]`` in channel ``c``:
    ``y[:, :, :1] = v`` and so on, as ``torch.export`` records it (``slice_scatter`` of an expanded constant)."""
    for axis, start, end in sides:
        shape = list(y.shape)
        shape[axis] = 1
        v = b.constant(value=fill.reshape(1, -1, 1, 1), dtype=DT, source="block.fill")
        y = b.slice_scatter(y, b.expand(v, shape=tuple(shape), source="block.fill"), axis=axis, start=start, end=end, source="block.fill")
    return y


@example
def border_fill() -> Example:
    w1 = t([[1], [-1]]).reshape(2, 1, 1, 1)
    b1 = t([3, -1])
    w2 = torch.cat([W3, ONES3], 1)  # (1, 2, 3, 3)

    def block(fill: torch.Tensor, sides=None) -> tuple[Graph, Value]:
        b = GraphBuilder()
        x = b.input("x", X.shape, DT)
        padded = b.pad(b.conv2d(x, weight=w1, bias=b1, source="block.conv1x1"), pads=P1, source="block.pad")
        y = _filled(b, padded, fill) if sides is None else _filled(b, padded, fill, sides)
        return b.build(b.conv2d(y, weight=w2, source="block.conv3x3")), y

    g, filled = block(b1)
    after, _ = apply("border_fill", g, "border_fill")
    pw = node(after, "conv2d")
    merged, chain = apply("border_fill", g, "border_fill", "seq_merge")
    fused = node(merged, "conv2d")
    before_y, after_y, merged_y = run_graph(g, X), run_graph(after, X), run_graph(merged, X)
    txt = Text()
    txt.line(f"a 1x1 conv from 1 channel to 2 (W1 = {vec(w1)}, bias b = {vec(b1)}), a zero pad by 1,")
    txt.line("then the first/last row and column filled with b, and a 3x3 conv that does not pad")
    txt.grids(*maps("x", X))
    txt.grids(*maps("fill(pad(conv1x1(x; W1, b)), b)", value_of(g, filled, X)))
    txt.grids(*maps(f"conv1x1(x; W1, b, padding {pw.attrs['padding'][0]})", value_of(after, pw.out, X)))
    txt.line().line(equal_line(value_of(g, filled, X), value_of(after, pw.out, X)).replace("before == after", "the border: fill == padding"))
    txt.line("(a padded position of the 1x1 conv is 0 * W1 + b = b; inside the border nothing changes)")
    txt.line().line("then seq_merge composes the 1x1 and the 3x3 (W2[0, 0] = W, W2[0, 1] = all ones):")
    txt.grids(("merged kernel", fused.params["weight"][0, 0]))
    txt.line(f"merged bias = W2 b summed over the taps (the 3x3 has none of its own) = {vec(fused.params['bias'])}, padding {fused.attrs['padding']}")
    txt.grids(("conv3x3(fill(pad(conv1x1(x))))", before_y[0, 0]), ("after border_fill", after_y[0, 0]), ("after seq_merge", merged_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))
    txt.line(equal_line(before_y, merged_y).replace("before == after", "before == merged"))

    merge = Text().line(" -> ".join(r.split()[0] for r in chain) + ": one conv")
    merge.line(str(merged))

    bad, bad_filled = block(t([1, 1]))
    truth, candidate = run_graph(bad, X), after_y
    ref = Text()
    ref.line("the border filled with 1 in both channels, not with the bias b = [3, -1]:")
    ref.line(f"border_fill refuses: {refusal(bad, 'border_fill')}")
    ref.grids(("conv3x3(fill(pad(conv1x1(x)), 1))", truth[0, 0]), ("conv3x3(conv1x1(x; padding 1))", candidate[0, 0]), ("difference", (truth - candidate)[0, 0]))
    ref.line().line(differ_line(truth, candidate, "they differ wherever the 3x3 window reaches the border"))
    three, _ = block(b1, ((2, 0, 1), (2, -1, None), (3, 0, 1)))
    ref.line().line("the bias written into three borders only, the last column left at 0:")
    ref.line(no_match(three, "border_fill")).line("(the 1x1's padding would give b in that column too)")

    bnp = bn_params([2, 1], [4, 1], [1, 2], [3, 0])
    _, at_zero = bn_st(bnp)
    b = GraphBuilder()
    x = b.input("x", X2.shape, DT)
    y = _filled(b, b.pad(b.batch_norm(x, **bnp, source="block.bn"), pads=P1, source="block.pad"), at_zero)
    bg = b.build(b.conv2d(y, weight=w2, source="block.conv3x3"))
    bafter, _ = apply("border_fill", bg, "border_fill")
    ball, bchain = apply("border_fill", bg)
    bn = Text()
    for line in bn_text(bnp):
        bn.line(line)
    bn.line(f"BN(0) = t = {vec(at_zero)}: the border filled with it is BN(pad(x)), the BN moved after the pad")
    bn.line(str(bafter))
    bn.line(equal_line(run_graph(bg, X2), run_graph(bafter, X2)).replace("before == after", "before == after border_fill"))
    bn.line().line("with all the rules: " + ", ".join(r.split()[0] for r in bchain) + f" -> {len(ball.nodes)} node: conv, padding {node(ball, 'conv2d').attrs['padding']}")
    bn.line(equal_line(run_graph(bg, X2), run_graph(ball, X2)).replace("before == after", "before == the one conv"))
    return Example("border_fill", g, after, {"numbers": str(txt), "merged": str(merge), "refused": str(ref), "bn": str(bn)})


@example
def avg_pool_to_conv() -> Example:
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    conv = b.conv2d(x, weight=W3, padding=P1, source="block.conv")
    pool = b.avg_pool2d(x, kernel=(3, 3), stride=(1, 1), padding=(1, 1), source="block.pool")
    g = b.build(b.add(conv, pool, source="block"))
    pool_y = value_of(g, pool, X)
    after, _ = apply("avg_pool_to_conv", g, "avg_pool_to_conv")
    new = [n for n in after.nodes if n.source == "block.pool"][0]
    new_y = value_of(after, new.out, X)
    txt = Text()
    txt.grids(*maps("x", X), ("K = ones / 9", new.params["weight"][0, 0]))
    txt.grids(("avg_pool(x; 3, stride 1, padding 1)", pool_y[0, 0]), ("conv(x; K, padding 1)", new_y[0, 0]))
    txt.line().line(equal_line(pool_y, new_y))
    txt.line(equal_line(run_graph(g, X), run_graph(after, X)).replace("before == after", "whole graph before == after"))

    ref = Text()
    # Refused 1: count_include_pad=False.
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    conv = b.conv2d(x, weight=W3, padding=P1, source="block.conv")
    pool = b.avg_pool2d(x, kernel=(3, 3), stride=(1, 1), padding=(1, 1), count_include_pad=False, source="block.pool")
    bad = b.build(b.add(conv, pool, source="block"))
    truth = value_of(bad, pool, X)
    candidate = torch.nn.functional.conv2d(X, torch.full((1, 1, 3, 3), 1 / 9, dtype=DT), padding=1)
    ref.line("(1) count_include_pad=False")
    ref.line(f"avg_pool_to_conv refuses: {refusal(bad, 'avg_pool_to_conv')}")
    ref.grids(("avg_pool(x; count_include_pad=False)", truth[0, 0]), ("conv(x; ones/9, padding 1)", candidate[0, 0]))
    ref.line().line(differ_line(truth, candidate) + ": a corner divides by 4, an edge by 6")
    # Refused 2: biased 1x1 before a padded pool.
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    inner = b.conv2d(x, weight=k([1]), bias=t([1]), source="block.conv1x1")
    pool = b.avg_pool2d(inner, kernel=(3, 3), stride=(1, 1), padding=(1, 1), source="block.pool")
    bad = b.build(pool)
    truth = run_graph(bad, X)
    candidate = torch.nn.functional.conv2d(X, torch.full((1, 1, 3, 3), 1 / 9, dtype=DT), t([1]), padding=1)
    ref.line().line("(2) a 1x1 conv with bias b = 1 (weight 1) before the padded pool")
    ref.line(f"avg_pool_to_conv refuses: {refusal(bad, 'avg_pool_to_conv')}")
    ref.grids(("avg_pool(x + 1)", truth[0, 0]), ("conv(x; ones/9, bias 1, padding 1)", candidate[0, 0]), ("difference", (truth - candidate)[0, 0]))
    ref.line().line(differ_line(truth, candidate) + ": -b/9 for every tap that reads padding")
    return Example("avg_pool_to_conv", g, after, {"numbers": str(txt), "refused": str(ref)})


@example
def space_to_depth() -> Example:
    x = image([[1, 2, 0, 1], [0, 1, 3, 2], [2, 0, 1, 1], [1, 3, 0, 2]])
    order = [(0, 0), (1, 0), (0, 1), (1, 1)]  # YOLOv5's Focus: x[..., ::2, ::2], x[..., 1::2, ::2], ...
    w = t([[[[1]], [[2]], [[-1]], [[3]]]])  # a 1x1 conv of the four phases: one weight per phase
    b = GraphBuilder()
    v = b.input("x", x.shape, DT)
    parts = [b.slice(b.slice(v, axis=2, start=a, step=2, source="focus"), axis=3, start=c, step=2, source="focus") for a, c in order]
    g = b.build(b.conv2d(b.concat(*parts, axis=1, source="focus"), weight=w, source="focus.conv"))
    after, _ = apply("space_to_depth", g, "space_to_depth")
    new = node(after, "conv2d")
    txt = Text()
    txt.grids(*maps("x", x), *[(f"x[{a}::2, {c}::2]", x[0, 0, a::2, c::2]) for a, c in order])
    txt.line().line("a 1x1 conv of the four phases, weights " + vec(w) + " (one per phase, in that order)")
    txt.line("W'[a, b] = the weight of phase (a, b)")
    txt.grids(("W' (2x2, stride 2)", new.params["weight"][0, 0]),
              ("conv of the phases", run_graph(g, x)[0, 0]), ("conv(x; W', stride 2)", run_graph(after, x)[0, 0]))
    txt.line().line(equal_line(run_graph(g, x), run_graph(after, x)))

    ref = Text()
    b = GraphBuilder()
    v = b.input("x", (1, 2, 4, 4), DT)
    parts = [b.slice(b.slice(v, axis=2, start=a, step=2, source="focus"), axis=3, start=c, step=2, source="focus") for a, c in order]
    bad = b.build(b.conv2d(b.concat(*parts, axis=1, source="focus"), weight=torch.ones(2, 4, 1, 1, dtype=DT), groups=2, source="focus.conv"))
    ref.line("a conv of the phases in 2 groups (each output channel reads half of them)")
    why = refusal(bad, "space_to_depth")
    ref.line("space_to_depth refuses: " + why.replace(": as one", ":\n    as one"))
    return Example("space_to_depth", g, after, {"numbers": str(txt), "refused": str(ref)})


@example
def concat_merge() -> Example:
    wb = k([0, 1, 0], [1, -1, 1], [0, 1, 0])
    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    ya = b.conv2d(x, weight=W3, bias=t([1]), padding=P1, source="block.a")
    yb = b.conv2d(x, weight=wb, padding=P1, source="block.b")
    g = b.build(b.concat(ya, yb, source="block"))
    after, _ = apply("concat_merge", g, "concat_merge")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X), run_graph(after, X)
    txt = Text()
    txt.grids(*maps("x", X), ("W_a (b_a = 1)", W3[0, 0]), ("W_b (no bias)", wb[0, 0]))
    txt.grids(*kernels("W", fused.params["weight"]))
    txt.line(f"b = [b_a; 0] = {vec(fused.params['bias'])}")
    txt.grids(*maps("cat(conv_a(x), conv_b(x))", before_y))
    txt.grids(*maps("conv(x; W, b)", after_y))
    txt.line().line(equal_line(before_y, after_y))
    return Example("concat_merge", g, after, {"numbers": str(txt)})


@example
def bn_before_conv() -> Example:
    w = t([[1, 2]]).reshape(1, 2, 1, 1)
    b = GraphBuilder()
    x = b.input("x", X2.shape, DT)
    bnp = bn_params([2, 0], [4, 1], [1, 2], [3, 1])
    bn = b.batch_norm(x, **bnp, source="block.bn")
    g = b.build(b.conv2d(bn, weight=w, source="block.conv"))
    after, _ = apply("bn_before_conv", g, "bn_before_conv")
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X2), run_graph(after, X2)
    txt = Text()
    for line in bn_text(bnp, "BN over 2 input channels"):
        txt.line(line)
    txt.line(f"1x1 conv from 2 channels to 1: W = {vec(w)}, no bias")
    txt.grids(*maps("x", X2))
    txt.line().line(f"W' = W * s (per input channel) = {vec(fused.params['weight'])}")
    txt.line(f"b' = sum_i W[i] t[i] = {vec(fused.params['bias'])}")
    txt.grids(("conv(BN(x); W)", before_y[0, 0]), ("conv(x; W', b')", after_y[0, 0]))
    txt.line().line(equal_line(before_y, after_y))

    b = GraphBuilder()
    x = b.input("x", X.shape, DT)
    bnp = bn_params([2], [4], [1], [3])
    bn = b.batch_norm(x, **bnp, source="block.bn")
    bad = b.build(b.conv2d(bn, weight=ONES3, padding=P1, source="block.conv"))
    truth = run_graph(bad, X)
    s, tt = bn_st(bnp)
    # The formula anyway: W' = W * s, b' = (sum of W's taps) * t.
    candidate = torch.nn.functional.conv2d(X, ONES3 * s, ONES3.sum() * tt, padding=1)
    ref = Text()
    ref.line(f"bn_before_conv refuses: {refusal(bad, 'bn_before_conv')}")
    for line in bn_text(bnp):
        ref.line(line)
    ref.line("then a 3x3 conv of all ones with padding 1, no bias.")
    ref.line(f"The formula would give W' = ones * s = ones * {vec(s)}, b' = 9 t = {vec(ONES3.sum() * tt)}.")
    ref.grids(*maps("x", X), *maps(f"BN(x) = {vec(s)} x + {vec(tt)}", value_of(bad, bn, X)))
    ref.grids(("conv(BN(x); W, padding 1)", truth[0, 0]), ("conv(x; W', b', padding 1)", candidate[0, 0]), ("difference", (truth - candidate)[0, 0]))
    ref.line().line(differ_line(truth, candidate) + f": -t = {vec(-tt)} for every tap that reads padding")
    return Example("bn_before_conv", g, after, {"numbers": str(txt), "refused": str(ref)})


@example
def bn_into_linear() -> Example:
    w = t([[1, 2], [0, -1]])
    xs = image([[1, 2], [0, 3]], [[2, 0], [1, 1]])  # (1, 2, 2, 2): 2 channels, 4 pixels
    b = GraphBuilder()
    x = b.input("x", xs.shape, DT)
    bnp = bn_params([2, 0], [4, 1], [1, 2], [3, 1])
    bn = b.batch_norm(x, **bnp, source="attn.norm")
    seq = b.transpose(b.flatten(bn, start=2, source="attn"), dim0=-2, dim1=-1, source="attn")
    g = b.build(b.linear(seq, weight=w, bias=t([1, 0]), source="attn.qkv"))
    after, _ = apply("bn_into_linear", g, "bn_into_linear")
    fused = node(after, "linear")
    before_y, after_y = run_graph(g, xs), run_graph(after, xs)
    txt = Text()
    for line in bn_text(bnp, "BN over 2 channels"):
        txt.line(line)
    txt.line("the 2x2 image becomes 4 tokens of 2 features (flatten, then transpose); the Linear maps 2 -> 2")
    txt.grids(*maps("x", xs))
    txt.grids(tokens("tokens L(x)", value_of(after, fused.x, xs)), ("W", w), ("W' = W * s (per column)", fused.params["weight"]))
    txt.line("b = [1, 0]")
    txt.line(f"b' = b + W t = {vec(fused.params['bias'])}")
    txt.grids(tokens("Linear(L(BN(x)); W, b)", before_y), tokens("Linear(L(x); W', b')", after_y))
    txt.line().line(equal_line(before_y, after_y))

    # Not a match: flatten without the transpose, so the Linear's features are pixels, not channels.
    xr = image([[1, 2]], [[0, 3]])  # (1, 2, 1, 2): C = 2 channels, H * W = 2 pixels
    b = GraphBuilder()
    x = b.input("x", xr.shape, DT)
    bnr = bn_params([2, 0], [4, 1], [1, 2], [3, 1])
    flat = b.flatten(b.batch_norm(x, **bnr, source="attn.norm"), start=2, source="attn")
    bad = b.build(b.linear(flat, weight=w, source="attn.qkv"))
    truth = run_graph(bad, xr)
    s_, t_ = bn_st(bnr)
    candidate = torch.nn.functional.linear(xr.flatten(2), w * s_, w @ t_)
    ref = Text()
    ref.line("x has shape 1x2x1x2 (2 channels, 2 pixels); flatten(2) without transpose gives 1x2x2:")
    ref.line("a row per channel, a column per pixel, and the Linear reads the pixels as its features.")
    ref.line(no_match(bad, "bn_into_linear"))
    ref.grids(tokens("rows of L(x)", xr.flatten(2)), tokens("Linear(L(BN(x)); W)", truth), tokens("the fold anyway", candidate), ("difference", (truth - candidate)[0]))
    ref.line().line(differ_line(truth, candidate, "they differ: the fold scales column p by s[p], but the element in row c came from channel c and met s[c]"))
    return Example("bn_into_linear", g, after, {"numbers": str(txt), "refused": str(ref)})


@example
def linear_affine_fold() -> Example:
    w = t([[1, 2], [0, -1]])
    xs = t([[[1, 2], [0, 1], [3, 0], [2, 2]]])  # (1, 4, 2): 4 tokens of 2 features
    ls = t([0.5, 2])
    b = GraphBuilder()
    x = b.input("x", xs.shape, DT)
    y = b.linear(x, weight=w, bias=t([1, -1]), source="attn.proj")
    img = b.reshape(b.transpose(y, dim0=-2, dim1=-1, source="attn"), shape=(1, 2, 2, 2), source="attn")
    g = b.build(b.scale(img, scale=ls, source="layer_scale_1"))
    after, _ = apply("linear_affine_fold", g, "linear_affine_fold")
    fused = node(after, "linear")
    before_y, after_y = run_graph(g, xs), run_graph(after, xs)
    txt = Text()
    txt.line(f"4 tokens of 2 features; the Linear maps 2 -> 2 (b = [1, -1]); layer scale s = {vec(ls)} on the image's channels")
    txt.grids(tokens("x (tokens)", xs), ("W", w), ("W' = s[o] W[o, :] (per row)", fused.params["weight"]))
    txt.line(f"b' = s * b = {vec(fused.params['bias'])}")
    txt.grids(*maps("s * L(Linear(x; W, b))", before_y))
    txt.grids(*maps("L(Linear(x; W', b'))", after_y))
    txt.line().line(equal_line(before_y, after_y))

    # Not a match: reshape (B, C, N) instead of transpose mixes tokens and features.
    b = GraphBuilder()
    x = b.input("x", xs.shape, DT)
    y = b.linear(x, weight=w, source="attn.proj")
    bad = b.build(b.scale(b.reshape(y, shape=(1, 2, 4), source="attn"), scale=ls, source="layer_scale_1"))
    truth = run_graph(bad, xs)
    candidate = torch.nn.functional.linear(xs, w * ls[:, None]).reshape(1, 2, 4)
    ref = Text()
    ref.line("the classic slip: y.reshape(1, C, N) instead of y.transpose(1, 2); each row of the result")
    ref.line("holds 2 whole tokens (both features of each), and the layer scale multiplies the row by one s[c]")
    ref.line(no_match(bad, "linear_affine_fold"))
    ref.grids(tokens("Linear(x; W)", value_of(bad, y, xs)), tokens("s * reshape(...)", truth), tokens("the fold anyway", candidate), ("difference", (truth - candidate)[0]))
    ref.line().line(differ_line(truth, candidate, "they differ wherever a feature lands in a row whose channel is not that feature"))
    sum_before, sum_after, sum_txt = _linear_affine_fold_sum()
    return Example("linear_affine_fold", g, after, {"numbers": str(txt), "refused": str(ref), "sum_before": str(sum_before),
                                                    "sum_after": str(sum_after), "sum": str(sum_txt)},
                   {"sum_before": sum_before, "sum_after": sum_after})


def _linear_affine_fold_sum() -> tuple[Graph, Graph, Text]:
    """PyG's SAGEConv then a BatchNorm1d: ``bn(lin_l(aggr) + lin_r(x))`` on 3 nodes of 2 features."""
    aggr, xs = t([[1, 0], [2, 1], [0, 2]]), t([[1, 1], [0, 2], [2, 0]])
    wl, bl, wr = t([[1, 2], [0, 1]]), t([1, -1]), t([[2, 0], [1, -1]])
    bn = bn_params([4, 1], [4, 1], [1, 2], [1, 0])
    b = GraphBuilder()
    a, x = b.input("aggr", aggr.shape, DT), b.input("x", xs.shape, DT)
    total = b.add(b.linear(a, weight=wl, bias=bl, source="conv.lin_l"), b.linear(x, weight=wr, source="conv.lin_r"), source="conv")
    g = b.build(b.batch_norm(total, **bn, source="bn"))
    after, _ = apply("linear_affine_fold", g, "linear_affine_fold")
    lin_l, lin_r = node(after, "linear"), node(after, "linear", 1)
    before_y, after_y = run_graph(g, aggr, xs), run_graph(after, aggr, xs)
    txt = Text()
    txt.line("3 nodes of 2 features; lin_l has a bias [1, -1], lin_r none; a BatchNorm1d on the 2 output features")
    for line in bn_text(bn):
        txt.line(line)
    txt.grids(("W_l", wl), ("W_l' = s[o] W_l[o, :]", lin_l.params["weight"]), ("W_r", wr), ("W_r' = s[o] W_r[o, :]", lin_r.params["weight"]))
    txt.line(f"b_l' = s * b_l + t = {vec(lin_l.params['bias'])}   (the shift goes in once, here; lin_r' stays without a bias)")
    txt.grids(("BN(lin_l(aggr) + lin_r(x))", before_y), ("lin_l'(aggr) + lin_r'(x)", after_y))
    txt.line().line(equal_line(before_y, after_y))
    return g, after, txt


@example
def linear_seq_merge() -> Example:
    xs = t([[[1, 0, 2], [0, 1, -1]]])  # (1, 2, 3): 2 tokens of 3 features
    w, bias = t([[1, 0, 1], [0, 2, 0], [1, 1, 0]]), t([0, 1, 0])
    wa, wb, s = t([[1, -1, 0]]), t([[1], [0], [2]]), 2.0  # rank 1; s = lora_alpha / r
    b = GraphBuilder()
    x = b.input("x", xs.shape, DT)
    base = b.linear(x, weight=w, bias=bias, source="q.base_layer")
    low = b.linear(b.linear(x, weight=wa, source="q.lora_A"), weight=wb, source="q.lora_B")
    g = b.build(b.add(base, b.scale(low, scale=t([s] * 3), axis=-1, source="q"), source="q"))
    after, fired = apply("linear_seq_merge", g, "linear_affine_fold", "linear_seq_merge", "branch_sum")
    fused = node(after, "linear")
    before_y, after_y = run_graph(g, xs), run_graph(after, xs)
    txt = Text()
    txt.line(f"2 tokens of 3 features; the base Linear maps 3 -> 3 (b = {vec(bias)});")
    txt.line(f"a rank-1 adapter: A maps 3 -> 1, B maps 1 -> 3, scale s = {fmt(s)}")
    txt.grids(tokens("x", xs), ("W", w), ("A", wa), ("B", wb))
    txt.grids(("s B A (3 x 3, rank 1)", s * wb @ wa), ("W' = W + s B A", fused.params["weight"]))
    txt.line(f"b' = b = {vec(fused.params['bias'])}")
    txt.grids(tokens("base(x) + s B(A(x))", before_y), tokens("Linear(x; W', b')", after_y))
    txt.line().line(equal_line(before_y, after_y)).line()
    txt.line("rules fired, in order:")
    for f in fired:
        txt.line("  " + f)

    # Refused: the same pair of Linears on its own, 3 -> 1 -> 3: the one Linear is 9 multiply-adds a token, the two 6.
    b = GraphBuilder()
    x = b.input("x", xs.shape, DT)
    bad = b.build(b.linear(b.linear(x, weight=wa, source="head.fc1"), weight=wb, source="head.fc2"))
    ref = Text()
    ref.line("a bottleneck alone, 3 -> 1 -> 3 features, with nothing to absorb it:")
    ref.line(refusal(bad, "linear_seq_merge"))
    return Example("linear_seq_merge", g, after, {"numbers": str(txt), "refused": str(ref)})


def _qkv_graph(w: torch.Tensor, factors: torch.Tensor, axis: int) -> tuple[Graph, Value, Value]:
    """Two tokens, a qkv Linear to 2 heads of 1 feature, FastViT's split, a scale on q; outputs q and k."""
    b = GraphBuilder()
    x = b.input("x", (1, 2, 2), DT)
    y = b.linear(x, weight=w, source="attn.qkv")
    parts = b.permute(b.reshape(y, shape=(1, 2, 3, 2, 1), source="attn"), dims=(2, 0, 3, 1, 4), source="attn")
    q, k = (b.select(parts, axis=0, index=i, source="attn") for i in range(2))
    return b.build(b.scale(q, scale=factors, axis=axis, source="attn"), k), y, q


@example
def query_scale_fold() -> Example:
    w = t([[1, 2], [0, -1], [2, 1], [1, 1], [3, 0], [0, 2]])  # rows q0 q1 k0 k1 v0 v1 (feature = part * 2 + head)
    xs = t([[[1, 2], [2, 0]]])  # (1, 2, 2): 2 tokens of 2 features
    half = t([0.5, 0.5])  # the query scale head_dim ** -0.5, here 1/2 on both heads
    g, _, _ = _qkv_graph(w, half, axis=1)
    after, _ = apply("query_scale_fold", g, "query_scale_fold")
    fused = node(after, "linear")
    (q_before, k_before), (q_after, k_after) = run_graph(g, xs), run_graph(after, xs)
    txt = Text()
    txt.line("2 tokens of 2 features; qkv maps 2 -> 6 = 3 parts x 2 heads x 1 feature; q is scaled by s = 1/2")
    txt.line("rows of W: q head 0, q head 1, k head 0, k head 1, v head 0, v head 1")
    txt.grids(tokens("x (tokens)", xs), ("W", w), ("W' (q rows times 1/2)", fused.params["weight"]))
    txt.grids(("s * q (heads x tokens)", q_before[0, :, :, 0]), ("q from W'", q_after[0, :, :, 0]),
              ("k before", k_before[0, :, :, 0]), ("k from W'", k_after[0, :, :, 0]))
    txt.line().line(equal_line(torch.cat([q_before, k_before]), torch.cat([q_after, k_after])))

    # Refused: a factor per token (axis 2 of q): one row of W would need two factors.
    per_token = t([1, 2])
    bad, y, q = _qkv_graph(w, per_token, axis=2)
    truth = run_graph(bad, xs)[0]
    candidate = value_of(bad, q, xs)  # the fold anyway, with token 0's factor (1) on the q rows
    ref = Text()
    ref.line("a factor per token instead (s = [1, 2] along the tokens): feature q0 of token 0 meets 1, of token 1 meets 2,")
    ref.line("and one row of W can carry only one of them")
    ref.line(f"query_scale_fold refuses: {refusal(bad, 'query_scale_fold')}")
    ref.grids(("s * q (heads x tokens)", truth[0, :, :, 0]), ("the fold anyway (factor 1)", candidate[0, :, :, 0]),
              ("difference", (truth - candidate)[0, :, :, 0]))
    ref.line().line(differ_line(truth, candidate, "they differ on token 1, whose factor the rows cannot carry"))
    return Example("query_scale_fold", g, after, {"numbers": str(txt), "refused": str(ref)})


def _attention_graph(softmax_axis: int = -1) -> Graph:
    """One head: q (2 queries), k and v (2 keys), 1 feature each; softmax(q k^T) v written out."""
    b = GraphBuilder()
    q, k, v = (b.input(name, (1, 2, 1), DT) for name in "qkv")
    scores = b.matmul(q, b.transpose(k, dim0=-2, dim1=-1, source="attn"), source="attn")
    return b.build(b.matmul(b.softmax(scores, axis=softmax_axis, source="attn"), v, source="attn"))


@example
def attention_form() -> Example:
    qs, ks, vs = t([[[1], [0]]]), t([[[1], [-1]]]), t([[[2], [4]]])
    g = _attention_graph()
    after, _ = apply("attention_form", g, "attention_form")
    before_y, after_y = run_graph(g, qs, ks, vs), run_graph(after, qs, ks, vs)
    scores = qs[0] @ ks[0].T
    txt = Text()
    txt.line("one head, 2 queries, 2 keys, 1 feature: q = [1, 0], k = [1, -1], v = [2, 4]")
    txt.grids(("q k^T", scores), ("softmax over the keys", scores.softmax(-1)), ("written out", before_y[0]), ("attention op", after_y[0]))
    txt.line().line(equal_line(before_y, after_y))

    bad = _attention_graph(softmax_axis=-2)
    truth = run_graph(bad, qs, ks, vs)
    candidate = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=1.0)
    ref = Text()
    ref.line("the softmax over the queries (axis -2) normalises each column of the scores, not each row")
    ref.line(no_match(bad, "attention_form"))
    ref.grids(("softmax over the queries", scores.softmax(-2)), ("written out", truth[0]), ("attention op anyway", candidate[0]), ("difference", (truth - candidate)[0]))
    ref.line().line(differ_line(truth, candidate, "they differ: attention normalises over the keys"))
    return Example("attention_form", g, after, {"numbers": str(txt), "refused": str(ref)})


@example
def repmixer() -> Example:
    wdw = torch.cat([W3, k([0, 1, 0], [1, -1, 1], [0, 1, 0])])  # (2, 1, 3, 3) depthwise
    b = GraphBuilder()
    x = b.input("x", X2.shape, DT)
    conv = b.conv2d(x, weight=wdw, padding=P1, groups=2, source="mixer.conv.conv")
    pa, pb, pc = bn_params([0, 1], [4, 1], [2, 1], [1, 0]), bn_params([1, 0], [4, 1], [1, 2], [1, 0]), bn_params([2, 1], [1, 4], [1, 2], [0, 1])
    ls = t([0.5, 2])
    bn_a = b.batch_norm(conv, **pa, source="mixer.conv.bn")
    bn_b = b.batch_norm(x, **pb, source="mixer.skip")
    mixer = b.add(bn_a, bn_b, source="mixer")
    bn_c = b.batch_norm(x, **pc, source="norm")
    diff = b.sub(mixer, bn_c, source="mixer")
    y = b.add(x, b.scale(diff, scale=ls, source="layer_scale"))
    g = b.build(y)
    after, fired = apply("repmixer", g)
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X2), run_graph(after, X2)
    txt = Text()
    txt.line("C = 2 channels, depthwise (groups 2); eps = 0 in all three BNs, which as s x + t are")
    for label, p in (("BN_a (after the conv)", pa), ("BN_b (mixer.skip)", pb), ("BN_c (norm)", pc)):
        s, tt = bn_st(p)
        txt.line(f"    {label:<22} s = {vec(s):<9} t = {vec(tt)}")
    txt.line(f"    {'layer scale':<22} ls = {vec(ls)}")
    txt.grids(*maps("x", X2))
    txt.grids(*kernels("W", wdw))
    txt.grids(*kernels("W*", fused.params["weight"]))
    txt.line(f"b* = ls * (t_a + t_b - t_c) = {vec(fused.params['bias'])}")
    txt.grids(*maps("block(x)", before_y))
    txt.grids(*maps("conv(x; W*, b*)", after_y))
    txt.line().line(equal_line(before_y, after_y))
    return Example("repmixer", g, after, {"numbers": str(txt), "fired": "\n".join(fired)})


@example
def cpe() -> Example:
    wdw = torch.cat([W3, k([0, 1, 0], [1, -1, 1], [0, 1, 0])])
    b = GraphBuilder()
    x = b.input("x", X2.shape, DT)
    pe = b.conv2d(x, weight=wdw, bias=t([1, -1]), padding=P1, groups=2, source="pos_emb.pe")
    g = b.build(b.add(pe, x, source="pos_emb"))
    after, fired = apply("cpe", g)
    fused = node(after, "conv2d")
    before_y, after_y = run_graph(g, X2), run_graph(after, X2)
    txt = Text()
    txt.line("C = 2 channels, depthwise 3x3 with bias b = [1, -1]")
    txt.grids(*maps("x", X2))
    txt.grids(*kernels("W", wdw))
    txt.line().line("W* = W + delta (a 1 added at the centre tap of every channel's kernel)")
    txt.grids(*kernels("W*", fused.params["weight"]))
    txt.line(f"b* = b = {vec(fused.params['bias'])}")
    txt.grids(*maps("conv(x; W, b) + x", before_y))
    txt.grids(*maps("conv(x; W*, b*)", after_y))
    txt.line().line(equal_line(before_y, after_y))
    return Example("cpe", g, after, {"numbers": str(txt), "fired": "\n".join(fired)})


# --------------------------------------------------------------------------- pages


def build(name: str) -> Example:
    """Run the example of page ``name``."""
    return EXAMPLES[name]()


def blocks(names=None) -> dict[tuple[str, str], str]:
    """Every generated block, keyed by (page, kind), as the page holds it (a fenced text block)."""
    out = {}
    for name in names or PAGES:
        for kind, text in build(name).all_blocks().items():
            out[(name, kind)] = fenced(text)
    return out


def fenced(text: str) -> str:
    return "```text\n" + text.rstrip("\n") + "\n```"


MARKER = re.compile(r"(<!-- listing:(\w+):(\w+) -->\n)(.*?)(<!-- /listing -->)", re.S)


def page_blocks(text: str) -> dict[tuple[str, str], str]:
    """The generated blocks a page currently holds, keyed by (page, kind)."""
    return {(m.group(2), m.group(3)): m.group(4).rstrip("\n") for m in MARKER.finditer(text)}


def page_path(name: str) -> Path:
    return HERE / f"{name}.md"


def update_page(name: str, generated: dict[tuple[str, str], str]) -> tuple[str, list[str]]:
    """The page text with its blocks replaced, and the generated kinds it has no marker for."""
    text = page_path(name).read_text()
    seen = set()

    def sub(m: re.Match) -> str:
        key = (m.group(2), m.group(3))
        if key not in generated:
            raise KeyError(f"{name}.md: marker {key} matches no generated block")
        seen.add(key)
        return m.group(1) + generated[key] + "\n" + m.group(5)

    new = MARKER.sub(sub, text)
    missing = [kind for (page, kind) in generated if page == name and (page, kind) not in seen]
    return new, missing


def write_svgs(name: str, ex: Example) -> None:
    IMG.mkdir(exist_ok=True)
    for when, graph in (("before", ex.before), ("after", ex.after), *ex.pictures.items()):
        dot = graph.to_dot(title=f"{name}: {when.replace('_', ' ')}")
        svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
        (IMG / f"{name}_{when}.svg").write_text(svg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pages", nargs="*", help=f"subset of: {' '.join(PAGES)}")
    ap.add_argument("--write", action="store_true", help="rewrite the blocks in the pages, and the SVGs if `dot` exists")
    ap.add_argument("--check", action="store_true", help="exit 1 if a page's blocks differ from what this script generates")
    args = ap.parse_args(argv)
    names = args.pages or PAGES
    bad = [n for n in names if n not in EXAMPLES]
    if bad:
        ap.error(f"unknown page(s): {', '.join(bad)}")
    if not (args.write or args.check):
        for (name, kind), text in blocks(names).items():
            print(f"<!-- listing:{name}:{kind} -->\n{text}\n<!-- /listing -->\n")
        return 0
    status = 0
    have_dot = shutil.which("dot") is not None
    for name in names:
        ex = build(name)
        generated = {(name, kind): fenced(text) for kind, text in ex.all_blocks().items()}
        new, missing = update_page(name, generated)
        old = page_path(name).read_text()
        if missing:
            print(f"{name}.md: no marker for {', '.join(missing)}", file=sys.stderr)
            status = 1
        if args.write:
            if new != old:
                page_path(name).write_text(new)
                print(f"{name}.md: updated")
            if have_dot:
                write_svgs(name, ex)
        elif new != old:
            print(f"{name}.md: out of date (run python docs/rules/examples.py --write)", file=sys.stderr)
            status = 1
    if args.write and not have_dot:
        print("`dot` not found: SVGs left as they are", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
