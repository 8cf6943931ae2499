"""Mutation testing: seeded bugs in every stage of the pipeline, and proof that the test suite catches every one.

    python -m repalgebra.mutants              # all mutants, 2 workers; exit 1 if any survives
    python -m repalgebra.mutants --rule bn_fold --jobs 1
    python -m repalgebra.mutants --rule onnx_backend   # one stage: frontend, engine, torch_backend, onnx_backend
    python -m repalgebra.mutants --list       # the mutants, without running them

The rule mutants are :data:`MUTANTS` below; the front-end, engine and back-end
mutants are in :mod:`repalgebra.mutants_stages` (its docstring lists what
they cover), each running its stage's tests (``tests/test_stage_*.py``).  The
run prints a score per stage (``front end``, ``engine``, ``rules``, ``torch
back end``, ``onnx back end``) and the total, and fails on any survivor that
``mutants_stages.EQUIVALENT`` does not list, with its argument, as equivalent.

A *mutant* is a faulty copy of a rule: the bugs real fusion code has shipped
(a conv bias not multiplied by the BN scale, ``groups`` dropped, a
depthwise-then-1x1 merge computed wrongly, a 1x1-then-kxk merge wrong at
zero-padded borders, BN folded before a padded conv, folding in float16) and
the classic slips (eps outside the square root, a transposed kernel, a layer
scale broadcast on the wrong axis, a dilation ignored, a sign flip in ``sub``,
a bias dropped, the wrong padding kept, ...).  Every rule in
:data:`repalgebra.RULES` has at least three.

How a mutant is made.  :class:`Mutant` names a function (``module:function``)
and a snippet of its source to replace.  The mutated source is compiled in the
function's own module namespace, and then either

* its code object is swapped into the function (``fn.__code__``), so every
  reference to the function (the rule registry, ``from ... import`` names in
  other modules and tests) runs the faulty code; or, with ``scope``,
* a faulty copy of a shared helper (``repalgebra.kernels.bn_affine``, ...) is
  bound in one rule module only, so only that rule sees the bug.

:func:`applied` does either as a context manager that always restores the
original, and the snippet must occur exactly once (else :class:`MutantError`).

How a mutant is judged.  In a worker process, ``pytest.main`` runs the rule's
property tests (``tests/rules/test_<rule>.py``, plus the mutant's extra
tests) in-process with the mutant applied, with ``-x`` and the Hypothesis
profile ``mutants`` (``tests/conftest.py``: the ``ci`` example counts,
derandomized so a verdict is reproducible, no example database, no
shrinking).  Failing tests (pytest exit code 1) kill the mutant; passing
tests mean it survived; any other outcome (a collection error, ...) is an
error.  Before the mutants, every test some mutant runs is run once unmutated
(all of them together, split over the workers) and must pass, so a kill is
never a test that fails anyway.  Two worker processes at
most (``--jobs``), torch single-threaded in each.  The run prints a table and
``mutants killed: N/N`` and exits 1 if any mutant survived (and is not listed
as equivalent) or errored (or, for a full run, a rule has fewer than three).
The full run of 223 mutants takes about 370 CPU-seconds, so about 3 minutes on
two idle cores (8.5 minutes when other work shares them).

A surviving mutant is either a weak test (strengthen the test in
``tests/rules``) or an equivalent mutant (the "bug" does not change what the
rule computes: replace it by a meaningful one).
"""

from __future__ import annotations

import __future__
import argparse
import contextlib
import importlib
import inspect
import io
import os
import sys
import textwrap
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["Mutant", "MutantError", "MUTANTS", "Result", "MutationReport", "applied", "run", "main", "tests_for"]

ROOT = Path(__file__).resolve().parents[1]
MAX_JOBS = 2
MUTANT_TIMEOUT = 120  # seconds per mutant's test run


class MutantError(Exception):
    """A mutant that cannot be applied (its snippet is not in the source exactly once, or does not compile)."""


@dataclass(frozen=True)
class Mutant:
    """A seeded bug: replace ``old`` by ``new`` in the source of ``target`` (``"module:function"``).

    Without ``scope`` the function's code is swapped everywhere; with ``scope``
    (a module name) a faulty copy of the helper ``target`` is bound in that
    module only (a helper shared by several rules, faulty for one of them).
    ``tests`` are run in addition to ``tests/rules/test_<rule>.py``.
    """

    rule: str
    name: str
    bug: str
    target: str
    old: str
    new: str
    scope: str | None = None
    tests: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.rule}/{self.name}"


_3D = ("tests/rules/test_conv3d_branches.py",)  # the 3-D cases of the branch rules


def _m(rule: str, name: str, bug: str, old: str, new: str, *, target: str | None = None, scope: str | None = None, tests: tuple[str, ...] = ()) -> Mutant:
    """A mutant of rule ``rule``'s own function unless ``target`` names another function."""
    return Mutant(rule, name, bug, target or f"repalgebra.rules.{rule}:{rule}", old, new, scope, tests)


def _helper(rule: str, name: str, bug: str, helper: str, old: str, new: str) -> Mutant:
    """A faulty copy of ``helper`` (``"module:function"``) seen by rule ``rule`` only."""
    return Mutant(rule, name, bug, helper, old, new, scope=f"repalgebra.rules.{rule}")


_EPS_OUTSIDE = ('torch.sqrt(p["var"] + bn.attrs["eps"])', '(torch.sqrt(p["var"]) + bn.attrs["eps"])')
_AFFINE = "repalgebra.rules.bn_to_conv:channel_affine"
_BN_AFFINE = "repalgebra.kernels:bn_affine"
_TRANSPOSED_SCALED = 'w * per_input_channel(s, w.shape[:2], conv.attrs["groups"]).reshape(*w.shape[:2], *[1] * (w.dim() - 2))'
_NORM_AFFINE = "repalgebra.kernels:norm_affine"
_QSF = "repalgebra.rules.query_scale_fold:_fold"
_NORM_GAMMA_DROPPED = ("if gamma is None else gamma), beta", "if gamma is None else torch.ones_like(gamma)), beta")
_BN_FOLDED = "repalgebra.rules.bn_fold:_folded"
_BN_SHUFFLE = "repalgebra.rules.bn_fold:_through_shuffle"
_BN_PIECE = "repalgebra.rules.bn_fold:_through_piece"
_LAF_FOLDED, _LAF_SUM = "repalgebra.rules.linear_affine_fold:_folded", "repalgebra.rules.linear_affine_fold:_through_sum"
_IDENTITY_KERNEL = "repalgebra.kernels:identity_kernel"
_PER_INPUT = "repalgebra.kernels:per_input_channel"
_GROUPS_DROPPED = ("v.reshape(groups, 1, in_per_group)", "v[:in_per_group].reshape(1, 1, in_per_group).expand(groups, 1, in_per_group)")
_REGROUP = "repalgebra.kernels:regroup"
_COST_CHECK, _COST_UNCHECKED = "        if why := merge_refusal(graph, join, [c for _, c in group]):", "        if why := None:"
_MERGE_REFUSAL = "repalgebra.match:merge_refusal"
_BESIDE_CHECK = "        if why := merge_refusal_beside(graph, join, sib, conv):"
_WHOLE_SUM_IGNORED = ("        if whole <= sum(", "        if False and whole <= sum(")

#: Every mutant, grouped by rule.  ``python -m repalgebra.mutants --list`` prints them.
MUTANTS: list[Mutant] = [
    # ---------------------------------------------------------------- identity_elim
    _m("identity_elim", "never-fires", "the identity is never removed", "return Rewrite(node.out, node.x)", "return None"),
    _m("identity_elim", "skips-producer", "the identity is replaced by its producer's input (skips one op too many)",
       "return Rewrite(node.out, node.x)", "return Rewrite(node.out, node.x.producer.x if node.x.producer is not None else node.x)"),
    _m("identity_elim", "graph-input", "the identity is replaced by the graph's first input",
       "return Rewrite(node.out, node.x)", "return Rewrite(node.out, graph.inputs[0])"),
    # ---------------------------------------------------------------- bn_fold
    _m("bn_fold", "bias-unscaled", "the conv bias is not multiplied by the BN scale",
       "bias=conv_bias(conv) * s + t", "bias=conv_bias(conv) + t", target=_BN_FOLDED),
    _m("bn_fold", "shift-dropped", "the BN shift t = beta - mean * s is dropped",
       "bias=conv_bias(conv) * s + t", "bias=conv_bias(conv) * s", target=_BN_FOLDED),
    _m("bn_fold", "groups-dropped", "the fused conv loses its groups",
       "weight=w, bias=conv_bias(conv) * s + t)", "weight=w, bias=conv_bias(conv) * s + t, groups=1)", target=_BN_FOLDED),
    _helper("bn_fold", "eps-outside-sqrt", "eps outside the square root: gamma / (sqrt(var) + eps)", _BN_AFFINE, *_EPS_OUTSIDE),
    _helper("bn_fold", "var-as-std", "the running variance used as the standard deviation (no square root)", _BN_AFFINE,
            'torch.sqrt(p["var"] + bn.attrs["eps"])', '(p["var"] + bn.attrs["eps"])'),
    _m("bn_fold", "transposed-as-conv", "a transposed conv's weight scaled along its first (input-channel) axis",
       f"w = {_TRANSPOSED_SCALED}", f"w = w * s.reshape(-1, *[1] * (w.dim() - 1)) if w.shape[0] == s.shape[0] else {_TRANSPOSED_SCALED}",
       target=_BN_FOLDED),
    _m("bn_fold", "transposed3d-unscaled", "only a 4-D transposed weight is scaled: a ConvTranspose3d keeps its weight (its bias folds)",
       f"w = {_TRANSPOSED_SCALED}", f"w = {_TRANSPOSED_SCALED} if w.dim() == 4 else w", target=_BN_FOLDED),
    _m("bn_fold", "conv3d-weight-unscaled", "only a 4-D weight is scaled: a 3-D conv keeps its weight (its bias folds)",
       "w = w * s.reshape(-1, *[1] * (w.dim() - 1))", "w = w * s.reshape(-1, 1, 1, 1) if w.dim() == 4 else w", target=_BN_FOLDED),
    _m("bn_fold", "concat-slices-from-start", "every conv of a concat folds the BN's first channels",
       "new.append(_folded(c, s[start:end], t[start:end], bn))", "new.append(_folded(c, s[:end - start], t[:end - start], bn))",
       target="repalgebra.rules.bn_fold:_through_concat"),
    _m("bn_fold", "sum-shift-everywhere", "every conv of a sum folds the BN's shift, not only the first",
       "shift.pop() if shift else torch.zeros_like(t)", "t", target="repalgebra.rules.bn_fold:_through_sum"),
    _m("bn_fold", "sum-later-unscaled", "only the first conv of a sum folds the BN; the others are summed as they are",
       "nodes.append(_folded(n, s, sign * shift.pop() if shift else torch.zeros_like(t), bn))",
       "nodes.append(_folded(n, s, sign * shift.pop(), bn) if shift else n)", target="repalgebra.rules.bn_fold:_through_sum"),
    _m("bn_fold", "sum-shift-sign-dropped", "a conv the sum subtracts takes the BN's shift as if added",
       "sign * shift.pop() if shift", "shift.pop() if shift", target="repalgebra.rules.bn_fold:_through_sum"),
    _m("bn_fold", "sum-term-unscaled", "a per-channel term of the sum (a time embedding) added as it is, not scaled by the BN",
       '{"scale": s.to(value.dtype or s.dtype)}', '{"scale": torch.ones_like(s).to(value.dtype or s.dtype)}',
       target="repalgebra.rules.bn_fold:_through_sum"),
    _m("bn_fold", "sum-term-any-map", "a term that varies over the map scaled as if it held one value per channel",
       "and all(d == 1 for d in shape[2:])", "and True", target="repalgebra.rules.bn_fold:_per_channel_term"),
    _m("bn_fold", "sum-term-own-shape", "a term of the sum's own shape (a 1 x 1 map's conv) scaled: the convs of the sum no longer merge",
       "len(shape) == len(full) > 2 and shape != full", "len(shape) == len(full) > 2", target="repalgebra.rules.bn_fold:_per_channel_term"),
    _m("bn_fold", "sum-term-one-channel", "a term of one channel for all scaled as if it held one value per channel",
       "and shape[1] == full[1]", "and shape[1] in (1, full[1])", target="repalgebra.rules.bn_fold:_per_channel_term"),
    _m("bn_fold", "sum-shared", "a BN after a sum folds even where a conv of the sum is read elsewhere (computed twice)",
       "    if shared:\n", "    if False:\n", target="repalgebra.rules.bn_fold:_through_sum"),
    _m("bn_fold", "shuffle-tiled", "a BN after a pixel shuffle tiled over the conv's channels (o mod C) instead of repeated per channel",
       "s.repeat_interleave(block), t.repeat_interleave(block)", "s.repeat(block), t.repeat(block)", target=_BN_SHUFFLE),
    _m("bn_fold", "shuffle-shared", "a BN after a pixel shuffle folds even where the conv or the shuffle is read elsewhere (computed twice)",
       "if not sole_use(graph, bn.x) or not sole_use(graph, conv.out):", "if False:", target=_BN_SHUFFLE),
    _m("bn_fold", "shuffle-any-rank", "a BN after a pixel shuffle of a 3-D conv (which shuffles the depth axis) taken for the channel pattern",
       "if shuffle is None or len(bn.x.shape) != 4:", "if shuffle is None:", target=_BN_SHUFFLE),
    _m("bn_fold", "piece-rows-from-start", "a BN on a channel piece folds into the conv's first rows, not the rows the piece reads",
       "scale[mine], shift[mine] = s, t", "scale[:len(mine)], shift[:len(mine)] = s, t", target=_BN_PIECE),
    _m("bn_fold", "piece-overlap", "a BN on a channel piece folds where another piece reads some of its channels (unnormalized there)",
       "if any(set(r) & set(mine) for n, r in zip(readers, rows) if n is not part):", "if False:", target=_BN_PIECE),
    _m("bn_fold", "piece-conv-output", "a BN on a channel piece folds where the conv is also a graph output (which then returns the folded rows)",
       "if graph.num_uses(conv.out) != len(readers) or None in rows", "if None in rows", target=_BN_PIECE),
    _m("bn_fold", "piece-any-axis", "a piece along the height taken for a piece of the channels",
       'or node.attrs["axis"] % rank != 1:', ":", target="repalgebra.rules.bn_fold:_channels_read"),
    # ---------------------------------------------------------------- scale_fold
    _m("scale_fold", "bias-unscaled", "the conv bias is not multiplied by the layer scale",
       "bias=None if bias is None else bias * gamma", "bias=bias"),
    _m("scale_fold", "wrong-axis", "the layer scale is broadcast on the kernel's input-channel axis",
       "gamma.reshape(-1, *[1] * (conv.params[\"weight\"].dim() - 1))", "gamma.reshape(1, -1, *[1] * (conv.params[\"weight\"].dim() - 2))"),
    _m("scale_fold", "any-axis", "a scale on the height axis is folded as if it were per channel",
       'node.attrs["axis"] % len(conv.out.shape) != 1', 'node.attrs["axis"] % len(conv.out.shape) not in (1, 2)'),
    _m("scale_fold", "kernel-of-2d", "the scale shaped for a 2-D kernel whatever the conv (a 3-D one's scale lands on its depth)",
       "gamma.reshape(-1, *[1] * (conv.params[\"weight\"].dim() - 1))", "gamma.reshape(-1, 1, 1)", tests=_3D),
    # ---------------------------------------------------------------- bias_fold
    _m("bias_fold", "bias-unsigned", "``c - conv(x)``: the conv's own bias keeps its sign",
       "sign * b + c", "b + c"),
    _m("bias_fold", "weight-unsigned", "``c - conv(x)``: the weights keep their sign",
       '"weight": sign * w', '"weight": w'),
    _m("bias_fold", "conv3d-features-last", "a conv3d's features taken on its last axis, as a Linear's",
       'features = len(p.out.shape) - 1 if p.op == "linear" else 1', 'features = 1 if p.op == "conv2d" else len(p.out.shape) - 1', tests=_3D),
    _m("bias_fold", "chain-unfollowed", "the features are taken to stay on P's own axis whatever the layout ops do",
       "follow_chain(chain, features)", "features"),
    _m("bias_fold", "any-constant", "a constant that changes along other axes too (a positional embedding) is folded as its largest value per feature",
       "if axis is None or any(size != 1 for size in others):",
       "if axis is not None:\n        return const.reshape(full).amax(tuple(k for k in range(len(full)) if k != axis)).reshape(-1)\n    if True:",
       target="repalgebra.rules.bias_fold:per_feature"),
    # ---------------------------------------------------------------- border_fill
    _m("border_fill", "any-values", "the border is taken for the bias whatever values fill it",
       "if bias is None or not _same(v, bias):", "if bias is None:"),
    _m("border_fill", "some-sides", "a pad with a side left at zero is taken for a filled one",
       "if set(fills) != {k for k, q in enumerate(pad.attrs[\"pads\"]) if q > 0}:", "if not fills:"),
    _m("border_fill", "any-width", "a fill narrower than the pad is taken for the whole border",
       "if any(_side(c)[1] != pad.attrs[\"pads\"][_side(c)[0]] for c in chain):", "if False:"),
    _m("border_fill", "bn-eps-dropped", "bn(0) computed without eps in the square root",
       'torch.sqrt(p["var"] + inner.attrs["eps"])', 'torch.sqrt(p["var"])'),
    _m("border_fill", "any-kernel", "the conv before the pad is taken for a 1x1 whatever its kernel",
       'if inner.params["weight"].shape[2:] != (1, 1) or a["stride"] != (1, 1):', 'if a["stride"] != (1, 1):'),
    # ---------------------------------------------------------------- bn_to_conv
    _m("bn_to_conv", "scale-broadcast-wrong", "a channel scale branch's kernel takes the first channel's scale for every channel",
       '(bn.params["scale"].reshape(-1).expand(channels), None)', '(bn.params["scale"].reshape(-1)[:1].expand(channels), None)',
       target=_AFFINE),
    _m("bn_to_conv", "affine-sign-dropped", "an affine branch written c - y (sign -1) taken for y + c",
       "s, t = sign * s, (c if t is None else sign * t + c)", "s, t = s, (c if t is None else t + c)", target=_AFFINE),
    _m("bn_to_conv", "affine-inner-shift-dropped", "a BN plus a constant per channel loses the BN's own shift",
       "(c if t is None else sign * t + c)", "c", target=_AFFINE),
    _m("bn_to_conv", "affine-any-constant", "a constant that varies along the width taken as a shift per channel",
       "    c = None if shift is None else per_feature(shift.params[\"const\"], shift.x.shape, 1)",
       "    c = None if shift is None else shift.params[\"const\"].reshape(-1)[:1]", target=_AFFINE),
    _m("bn_to_conv", "shift-dropped", "the BN branch's conv has no bias (the shift t is dropped)",
       '{"weight": w, "bias": t}', '{"weight": w}'),
    _m("bn_to_conv", "unscaled", "the identity kernel is not multiplied by the BN scale",
       "w = w * s.reshape(-1, *(1,) * (w.dim() - 1))", "w = w"),
    _m("bn_to_conv", "volume-as-image", "a BatchNorm3d branch becomes a conv2d (a 2-D kernel for a 5-D value)",
       "conv = Node.make(op, [x]", 'conv = Node.make("conv2d", [x]', tests=_3D),
    _m("bn_to_conv", "conv3d-in-concat", "a BatchNorm3d in a channel concat becomes a 1x1x1 conv3d that nothing merges",
       '5: "conv3d" if join.op != "concat" else None', '5: "conv3d"', target="repalgebra.rules.bn_to_conv:pointwise_op", tests=_3D),
    _helper("bn_to_conv", "eps-outside-sqrt", "eps outside the square root: gamma / (sqrt(var) + eps)", _BN_AFFINE, *_EPS_OUTSIDE),
    _helper("bn_to_conv", "identity-tap", "the grouped identity kernel reads the first channel of each group",
            _IDENTITY_KERNEL, "w[c, c % per_group] = 1", "w[c, 0] = 1"),
    _m("bn_to_conv", "cost-unchecked", "a BN beside a conv becomes a conv even where the two would not merge at no cost",
       _BESIDE_CHECK, "        if why := None:"),
    _helper("bn_to_conv", "bn-sibling-unpriced", "a BN sibling is not priced as the depthwise 1x1 it becomes: two BNs concatenated become convs",
            "repalgebra.rules.bn_to_conv:merge_refusal_beside", '    if sib.op == "batch_norm":', '    if sib.op == "batch_norm" and False:'),
    # ---------------------------------------------------------------- identity_to_conv
    _m("identity_to_conv", "cost-unchecked", "a skip beside a conv becomes a conv even where the two would not merge at no cost",
       _BESIDE_CHECK, "        if why := None:"),
    _m("identity_to_conv", "groups-dropped", "the identity conv is built with groups=1 (its kernel is the grouped one)",
       '{"groups": groups}, {"weight": w}', '{"groups": 1}, {"weight": w}'),
    _m("identity_to_conv", "channels-reversed", "the identity kernel maps each channel to its mirror image within its group",
       'w = identity_kernel(value.shape[1], groups, next(iter(sib.params.values())).dtype, len(value.shape) - 2)',
       'w = identity_kernel(value.shape[1], groups, next(iter(sib.params.values())).dtype, len(value.shape) - 2).flip(1)'),
    _m("identity_to_conv", "volume-as-image", "a 3-D skip's identity conv is built as a conv2d (a 2-D kernel for a 5-D value)",
       "conv = Node.make(op, [value]", 'conv = Node.make("conv2d", [value]', tests=_3D),
    _helper("identity_to_conv", "identity-tap", "the grouped identity kernel reads the first channel of each group",
            _IDENTITY_KERNEL, "w[c, c % per_group] = 1", "w[c, 0] = 1"),
    # ---------------------------------------------------------------- dilation_to_dense
    _m("dilation_to_dense", "dilation-ignored", "the dilation is dropped and the kernel is not spread",
       "new = conv_with(conv, weight=w, dilation=(1, 1))", "new = conv_with(conv, dilation=(1, 1))"),
    _helper("dilation_to_dense", "axes-swapped", "the taps are spread with the height and width dilations swapped",
            "repalgebra.kernels:densify", "dense[:, :, ::dh, ::dw] = weight", "dense[:, :, ::dw, ::dh] = weight"),
    _helper("dilation_to_dense", "extent-off-by-one", "the dense kernel is one dilation step too large (k * d instead of (k - 1) * d + 1)",
            "repalgebra.kernels:densify", "(kh - 1) * dh + 1, (kw - 1) * dw + 1", "kh * dh, kw * dw"),
    _m("dilation_to_dense", "cost-unchecked", "any off-lattice sum is densified, however wide the dense kernel (ASPP: 49 x 49)",
       _COST_CHECK, _COST_UNCHECKED),
    _helper("dilation_to_dense", "whole-sum-ignored", "a merge dearer than its branches is refused even where a large kernel of the sum absorbs it",
            _MERGE_REFUSAL, *_WHOLE_SUM_IGNORED),
    _helper("dilation_to_dense", "shared-kernel-absorbs", "a large kernel of the sum that another node also reads counts as absorbing the merge",
            _MERGE_REFUSAL, "                if sole_use(graph, v):  # a conv read elsewhere", "                if True:  # a conv read elsewhere"),
    # ---------------------------------------------------------------- kernel_pad
    _m("kernel_pad", "wrong-side", "the kernel is padded on the opposite sides (a 1x1 lands off centre)",
       'pad_kernel_axes(conv.params["weight"], before, after)', 'pad_kernel_axes(conv.params["weight"], after, before)'),
    _m("kernel_pad", "undilated-padding", "the conv padding grows by the new taps, not by taps times dilation",
       "padding = (pt + before[0] * dh, pb + after[0] * dh, pl + before[1] * dw, pr + after[1] * dw)",
       "padding = (pt + before[0], pb + after[0], pl + before[1], pr + after[1])"),
    _m("kernel_pad", "transposed-kernel", "the kernel is transposed (kh x kw read as kw x kh) while padding it",
       'pad_kernel_axes(conv.params["weight"], before', 'pad_kernel_axes(conv.params["weight"].transpose(2, 3), before'),
    _m("kernel_pad", "padding-off-by-one", "off by one: the bottom/right padding grows one row/column too few",
       "pb + after[0] * dh, pl + before[1] * dw, pr + after[1] * dw", "pb + after[0] * dh - 1, pl + before[1] * dw, pr + after[1] * dw - 1"),
    _m("kernel_pad", "reach-mismatch-unreported", "convs of one input and stride left apart for their reaches without a word in the report",
       "if len({key[:2] for key in groups}) < len(groups):", "if False:", tests=_3D),
    _m("kernel_pad", "conv3d-undilated-padding", "a conv3d's padding grows by the new taps, not by taps times dilation",
       "padding = tuple(p + b * d for p, b, d in zip", "padding = tuple(p + b for p, b, d in zip", tests=_3D),
    _m("kernel_pad", "cost-unchecked", "windows are padded to their union even where the merged conv has more weights than the convs",
       _COST_CHECK, _COST_UNCHECKED),
    _helper("kernel_pad", "concat-keeps-groups", "a concat's merged conv is priced with the gcd of its convs' groups, as a sum's",
            _MERGE_REFUSAL, "groups = 1 if dense else gcd(", "groups = 1 if False else gcd("),
    _m("kernel_pad", "regroup-drops-other", "``(a + b) + c`` regrouped as ``(a + c) + a``: the branch left out is read twice",
       "regrouped = outer.replace(inputs=(inner.out, other.out))", "regrouped = outer.replace(inputs=(inner.out, keep.out))",
       target="repalgebra.rules.kernel_pad:_regroup"),
    _m("kernel_pad", "regroup-outer-sub", "``(a + b) - c`` regrouped as ``(a + c) + b``: the outer subtraction read as an add",
       'if len(readers) != 1 or readers[0].op != "add"', 'if len(readers) != 1 or readers[0].op not in ("add", "sub")',
       target="repalgebra.rules.kernel_pad:_regroup"),
    # ---------------------------------------------------------------- branch_sum
    _m("branch_sum", "linear-sub-added", "``Linear_a(x) - Linear_b(x)``: the weights are added",
       'params = {"weight": a.params["weight"] + sign * b.params["weight"]}', 'params = {"weight": a.params["weight"] + b.params["weight"]}',
       target="repalgebra.rules.branch_sum:_linears"),
    _m("branch_sum", "sub-sign", "sign flip: a sub is summed as an add", 'sign = 1.0 if join.op == "add" else -1.0', "sign = 1.0"),
    _m("branch_sum", "sub-bias-sign", "a sub subtracts the weights but adds the biases",
       "bias = conv_bias(a) + sign * conv_bias(b)", "bias = conv_bias(a) + conv_bias(b)"),
    _m("branch_sum", "bias-dropped", "the bias is dropped unless both convs have one",
       'if "bias" in a.params or "bias" in b.params:', 'if "bias" in a.params and "bias" in b.params:'),
    _m("branch_sum", "groups-dropped", "the summed conv keeps the first conv's groups instead of gcd(g_a, g_b)",
       "weight=w, bias=bias, groups=g)", "weight=w, bias=bias, groups=ga)"),
    _m("branch_sum", "groups-cost-unchecked", "groups whose gcd makes a denser kernel than both are summed anyway",
       "    if g < min(ga, gb) and (why := merge_refusal(graph, join, [a, b])):", "    if False:"),
    _m("branch_sum", "broadcast", "convs of different output shapes are summed (the add broadcasts)",
       "if reach(a) != reach(b):", "if a.out.shape != b.out.shape:"),
    _m("branch_sum", "end-padding-unchecked", "convs with equal windows and different trailing padding are summed",
       "if reach(a) != reach(b):", "if False:"),
    # ---------------------------------------------------------------- sum_regroup
    _m("sum_regroup", "skip-first", "a group is added in the order written, a skip first (x + x meets no conv and nothing merges)",
       "    return [group[k], *group[:k], *group[k + 1:]]", "    return group", target="repalgebra.rules.sum_regroup:_conv_first"),
    _m("sum_regroup", "costly-conv-first", "a depthwise or dilated conv stays where the model added it, and its refused merge stops the cheap ones",
       "    group = [t for t in group if not any(t is c for c in costly)] + costly", "    group = list(group)",
       target="repalgebra.rules.sum_regroup:_conv_first"),
    _m("sum_regroup", "free-partner-costly", "a depthwise conv that merges with a dense one at no cost is summed last, and kernel_pad pairs them back: no fixpoint",
       "\n              and not any(merges_free(root, n, c) for u in group if (c := _conv(u)) is not None and c is not n)]", "]",
       target="repalgebra.rules.sum_regroup:_conv_first"),
    _m("sum_regroup", "others-dropped", "the terms outside every group are left out of the regrouped sum",
       "if key not in merging or groups[key][0] == k]", "if key in merging and groups[key][0] == k]"),
    _m("sum_regroup", "shared-inner-flattened", "an inner add read elsewhere too is taken apart into its terms",
       "    if n is None or (not root and not sole_use(graph, value)):\n        return [value]",
       "    if n is None:\n        return [value]", target="repalgebra.rules.sum_regroup:_terms"),
    # ---------------------------------------------------------------- concat_merge
    _m("concat_merge", "bias-order", "the biases are concatenated in reverse order",
       "torch.cat([conv_bias(c) for c in convs])", "torch.cat([conv_bias(c) for c in reversed(convs)])"),
    _m("concat_merge", "bias-dropped", "the bias is dropped unless every conv has one",
       'if any("bias" in c.params for c in convs):', 'if all("bias" in c.params for c in convs):'),
    _m("concat_merge", "groups-dropped", "grouped kernels are concatenated as they are (groups dropped, not regrouped)",
       'regroup(c.params["weight"], c.attrs["groups"], g)', 'c.params["weight"]'),
    _m("concat_merge", "window-ignored", "convs are merged when their kernels have the same size, whatever their padding or dilation",
       "window(c) != window(first)", 'c.params["weight"].shape[2:] != first.params["weight"].shape[2:]'),
    _m("concat_merge", "end-padding-unchecked", "convs with equal windows and different trailing padding are concatenated into one",
       "if any(reach(c) != reach(first) for c in convs):", "if False:"),
    # ---------------------------------------------------------------- pad_absorb
    _m("pad_absorb", "pad-order", "the pad amounts are read in F.pad order (left, right, top, bottom)",
       'zip(conv.attrs["padding"], pad.attrs["pads"])', 'zip(conv.attrs["padding"], (lambda t, b, l, r: (l, r, t, b))(*pad.attrs["pads"]))'),
    _m("pad_absorb", "value-ignored", "a pad with a non-zero value is absorbed as zero padding", 'if pad.attrs["value"] != 0:', "if False:"),
    _m("pad_absorb", "own-padding-dropped", "the conv's own padding is replaced by the pad's instead of added to it",
       "tuple(p + q for p, q in", "tuple(q for p, q in"),
    _m("pad_absorb", "biased-1x1-then-pad", "a zero pad after a biased 1x1 conv becomes its padding (the border is the bias, not 0)",
       "if has_bias(conv):", "if False:"),
    _helper("pad_absorb", "strided-1x1-then-pad", "a zero pad after a strided 1x1 conv becomes its padding (the stride skips into the pad)",
            "repalgebra.rules.pad_absorb:pixelwise", ' and conv.attrs["stride"] == (1, 1)', ""),
    _m("pad_absorb", "shared-1x1-then-pad", "a pad after a 1x1 conv whose output is also read elsewhere is absorbed (the conv is computed twice)",
       "if conv is None or not sole_use(graph, conv.out) or not pixelwise(conv):", "if conv is None or not pixelwise(conv):"),
    _m("pad_absorb", "empty-pad-kept", "a pad by (0, 0, 0, 0) is kept instead of removed as the identity",
       'if not any(node.attrs["pads"]):', "if False:"),
    _helper("pad_absorb", "pool-uneven-pad", "an uneven pad before an avg pool becomes its (even) padding, by the top and left amounts",
            "repalgebra.rules.pad_absorb:_into_pool", "if t != b or l != r:", "if False:"),
    _helper("pad_absorb", "pool-count-ignored", "a pad before a pool that does not count its own padding is absorbed",
            "repalgebra.rules.pad_absorb:_into_pool", 'if (ph or pw) and not a["count_include_pad"]:', "if False:"),
    _helper("pad_absorb", "pool-not-counted", "the pool that took the pad keeps count_include_pad=False (border windows divide by fewer)",
            "repalgebra.rules.pad_absorb:_into_pool", '"count_include_pad": True}', '"count_include_pad": a["count_include_pad"]}'),
    _helper("pad_absorb", "pool-axes-swapped", "the pad's left/right amount goes to the pool's rows and top/bottom to its columns",
            "repalgebra.rules.pad_absorb:_into_pool", "(ph + t, pw + l)", "(ph + l, pw + t)"),
    # ---------------------------------------------------------------- pad_share
    _helper("pad_share", "pad-order", "the pad amounts are read as (top, bottom, left, right), not F.pad's (left, right, top, bottom)",
            "repalgebra.rules.pad_share:copied_from", "l, r, t, b, *rest = pads", "t, b, l, r, *rest = pads"),
    _helper("pad_share", "crop-taken", "a pad that crops a side (a negative amount) is taken for a copy",
            "repalgebra.rules.pad_share:copied_from", "if any(rest) or min(pads) < 0:", "if any(rest):"),
    _m("pad_share", "wrong-side", "the kernel is padded on the opposite sides (the moved taps read off by the pad's asymmetry)",
       "pad_kernel(conv.params[\"weight\"], t // sh, b // sh, l // sw, r // sw)", "pad_kernel(conv.params[\"weight\"], b // sh, t // sh, r // sw, l // sw)",
       target="repalgebra.rules.pad_share:moved"),
    _m("pad_share", "own-padding-moved", "a conv with zero padding of its own is moved (its padded taps read the copy's border)",
       'if shared is None or conv.x is not shared[0] or conv.attrs["padding"] != (0, 0, 0, 0):', "if shared is None or conv.x is not shared[0]:",
       target="repalgebra.rules.pad_share:moved"),
    _m("pad_share", "dilation-undivided", "a dilation that does not divide the pad is padded by whole taps anyway",
       "if before % step or after % step:", "if False:", target="repalgebra.rules.pad_share:moved"),
    _m("pad_share", "any-pad-sibling", "a BN beside a conv of a padded copy of its input becomes a 1x1 even where that 1x1 would not move",
       'takes_1x1(sib, x)', '(sib.x.producer is not None and sib.x.producer.op == "pad_nd" and sib.x.producer.x is x)',
       target="repalgebra.rules.bn_to_conv:sibling"),
    _m("pad_share", "priced-grown", "the sum is priced with the moved conv's grown kernel, not the conv as the model has it",
       "merge_refusal(graph, join, [onto, new], before=[onto, conv])", "merge_refusal(graph, join, [onto, new])"),
    # ---------------------------------------------------------------- avg_pool_to_conv
    _m("avg_pool_to_conv", "count-include-pad", "a pool with count_include_pad=False and padding becomes a conv",
       'if a["ceil_mode"] or (pads and not a["count_include_pad"]):', 'if a["ceil_mode"]:'),
    _m("avg_pool_to_conv", "square-weights", "the weights are 1/kh^2 instead of 1/(kh kw)", "1.0 / (kh * kw)", "1.0 / (kh * kh)"),
    _m("avg_pool_to_conv", "padding-swapped", "the pool's (h, w) padding is kept with its axes swapped",
       '"padding": (ph, ph, pw, pw)', '"padding": (pw, pw, ph, ph)'),
    _m("avg_pool_to_conv", "biased-conv-padded-pool", "a zero-padding pool merges with the biased 1x1 conv before it (border sees 0, not the bias)",
       "if merges and not joins and pads and bool(conv_bias(before).abs().max() > 0):", "if False:"),
    _m("avg_pool_to_conv", "stride-is-kernel", "the conv's stride is the pool's kernel, not its stride",
       '_pair(a["stride"] or a["kernel"])', '_pair(a["kernel"])'),
    # ---------------------------------------------------------------- bn_before_conv
    _m("bn_before_conv", "added-sign-ignored", "``c - x`` before the conv: the subtracted input keeps its sign",
       'float(bn.attrs["sign"])', '1.0', target="repalgebra.rules.bn_before_conv:_affine"),
    _m("bn_before_conv", "padded-conv", "BN folded before a zero-padding conv (the border sees 0, not BN(0))",
       'if any(any(c.attrs["padding"]) for c in readers):', "if False:"),
    _m("bn_before_conv", "first-reader-padding-only", "a BN read by several convs is folded when only the first of them is unpadded",
       'if any(any(c.attrs["padding"]) for c in readers):', 'if any(readers[0].attrs["padding"]):'),
    _helper("bn_before_conv", "groups-dropped", "every group of the conv reads the BN scale of the first group's channels",
            _PER_INPUT, *_GROUPS_DROPPED),
    _m("bn_before_conv", "shift-one-tap", "the BN shift is carried through the kernel's mean tap, not every tap",
       "(w * per_o(t)[:, :, None, None]).sum((1, 2, 3))", "(w * per_o(t)[:, :, None, None]).sum(1).mean((1, 2))",
       target="repalgebra.rules.bn_before_conv:_folded"),
    _m("bn_before_conv", "bias-dropped", "the conv's own bias is dropped", "new_b = conv_bias(conv) + (", "new_b = 0 * conv_bias(conv) + (",
       target="repalgebra.rules.bn_before_conv:_folded"),
    _helper("bn_before_conv", "eps-outside-sqrt", "eps outside the square root: gamma / (sqrt(var) + eps)", _BN_AFFINE, *_EPS_OUTSIDE),
    _m("bn_before_conv", "constant-pad-crossed", "a constant (zero) pad between BN and conv is crossed as if it copied pixels",
       'pad.attrs["mode"] not in _COPYING', 'pad.attrs["mode"] not in (*_COPYING, "constant")', target="repalgebra.rules.bn_before_conv:_copying_pad"),
    _m("bn_before_conv", "concat-shift-padded", "a shift on a concat's part folds into a conv that zero-pads",
       "if any(conv.attrs[\"padding\"]) and bool(t.abs().max() > 0):", "if False:", target="repalgebra.rules.bn_before_conv:_through_concat"),
    _m("bn_before_conv", "concat-slices-from-start", "every part's map is folded into the kernel's first input channels",
       "scales.append(affine[0])", "scales.insert(0, affine[0])", target="repalgebra.rules.bn_before_conv:_through_concat"),
    _m("bn_before_conv", "concat-shared-part", "a part read elsewhere too is folded (its other reader gets the unmapped value)",
       "affine = None if part is None or not sole_use(graph, v) else _affine(part, dtype)",
       "affine = None if part is None else _affine(part, dtype)", target="repalgebra.rules.bn_before_conv:_through_concat"),
    # ---------------------------------------------------------------- scale_into_conv
    _m("scale_into_conv", "bias-scaled", "the conv's bias is scaled too (by the mean scale its row sees), as if the scale came after it",
       "weight=w * s[:, :, None, None])", "weight=w * s[:, :, None, None], bias=None if 'bias' not in conv.params else conv.params['bias'] * s.mean(1))"),
    _m("scale_into_conv", "any-axis", "a scale along the height is folded as if it were per channel",
       'sc.attrs["axis"] % len(sc.x.shape) != 1', "False"),
    _m("scale_into_conv", "shared-unchecked", "folded although another reader sees the scaled values",
       "or not sole_use(graph, sc.out)", ""),
    _helper("scale_into_conv", "groups-dropped", "every group of the conv reads the scale of the first group's channels",
            _PER_INPUT, *_GROUPS_DROPPED),
    _m("bn_before_conv", "group-norm-input-read", "a GroupNorm's affine folded and the conv reading the norm's input, not its normalization",
       'bare = (bn.replace(params={}),) if bn.op == "group_norm" else ()', "bare = ()"),
    _m("bn_before_conv", "group-norm-beta-dropped", "a GroupNorm's beta dropped as its affine folds",
       "torch.zeros(channels, dtype=dtype) if beta is None else beta.to(dtype)", "torch.zeros(channels, dtype=dtype)",
       target="repalgebra.rules.bn_before_conv:_affine"),
    _helper("bn_before_conv", "group-norm-gamma-dropped", "a GroupNorm's gamma dropped as its affine folds", _NORM_AFFINE, *_NORM_GAMMA_DROPPED),
    # ---------------------------------------------------------------- bn_into_linear
    _m("bn_into_linear", "select-of-the-channels", "a select of the channel axis taken to keep the channels (one channel's features read as all)",
       "return None if axis == picked else axis - (axis > picked)", "return axis - (axis > picked)", target="repalgebra.layout:follow_axis"),
    _m("bn_into_linear", "mean-over-channels", "a mean is followed like a layout op even over the channel axis, which it then keeps",
       "return None if axis in dims else", "return axis if axis in dims else", target="repalgebra.layout:follow_axis"),
    _m("bn_into_linear", "shift-dropped", "the BN shift is dropped when the Linear has a bias",
       'params["bias"] = (0 if b is None else b) + (0 if t is None else w @ t)', 'params["bias"] = (0 if b is None else b) + (0 if t is None or b is not None else w @ t)',
       target="repalgebra.rules.bn_into_linear:_folded"),
    _m("bn_into_linear", "wrong-axis", "the BN scale multiplies the Linear's output rows instead of its input columns",
       '"weight": w * s}', '"weight": w * s[:, None] if w.shape[0] == w.shape[1] else w * s}', target="repalgebra.rules.bn_into_linear:_folded"),
    _m("bn_into_linear", "axis-unchecked", "a BN whose channels do not arrive on the Linear's input axis is folded",
       "if not one and follow_chain(chain, axis) != len(lin.x.shape) - 1:", "if not one and follow_chain(chain, axis) is None:"),
    _m("bn_into_linear", "concat-on-the-batch-axis", "a BN of one operand of a concat on the batch axis folded into the Linear's columns",
       '    if cat.attrs["axis"] % rank != rank - 1:\n        return None', "    if False:\n        return None",
       target="repalgebra.rules.bn_into_linear:_through_concat"),
    _m("bn_into_linear", "concat-operand-axis-unchecked", "a BN1d of (N, C, L) tokens concatenated on L folded as if its channels were the features",
       "if affine is not None and (affine[3] or affine[2] == len(bn.x.shape) - 1):", "if affine is not None:",
       target="repalgebra.rules.bn_into_linear:_through_concat"),
    _m("bn_into_linear", "concat-shift-dropped", "the shift of a BN folded through a concat dropped",
       "t[start : start + width], shifted = affine[1], True", "shifted = True", target="repalgebra.rules.bn_into_linear:_through_concat"),
    _m("bn_into_linear", "shared-axis-unchecked", "a BN or scale read by several Linears is folded although it is not on their features",
       "if not one and axis != len(bn.x.shape) - 1:", "if False:", target="repalgebra.rules.bn_into_linear:_into_every_linear"),
    _helper("bn_into_linear", "eps-outside-sqrt", "eps outside the square root: gamma / (sqrt(var) + eps)", _BN_AFFINE, *_EPS_OUTSIDE),
    _m("bn_into_linear", "head-features-interleaved", "a classifier head's scale repeated channel-minor (tiled, not repeated per channel)",
       "s, t = s.repeat_interleave(repeat), None if t is None else t.repeat_interleave(repeat)", "s, t = s.repeat(repeat), None if t is None else t.repeat(repeat)"),
    _m("bn_into_linear", "scale-taken-as-one-number", "a per-channel scale folded as if its first factor were every channel's",
       "one = s.numel() > 0 and bool((s == s.flatten()[0]).all()) and", "one = s.numel() > 0 and", target="repalgebra.rules.bn_into_linear:_affine"),
    _m("bn_into_linear", "shift-sign-dropped", "``Linear(c - x)`` folded as ``Linear(x + c)``: the sign of x dropped",
       'float(add.attrs["sign"])', "1.0", target="repalgebra.rules.bn_into_linear:_shift_into"),
    _m("bn_into_linear", "shift-broadcast", "a constant that broadcasts x to a larger shape is folded (the Linear gets x's fewer rows)",
       "if c is None or x.shape != add.out.shape or", "if c is None or", target="repalgebra.rules.bn_into_linear:_shift_into"),
    _m("bn_into_linear", "shift-per-token", "a constant that changes along the tokens is folded as its last row",
       "c = per_feature(add.params[\"const\"], add.out.shape, len(add.out.shape) - 1)",
       "c = add.params[\"const\"].flatten()[-features:]", target="repalgebra.rules.bn_into_linear:_shift_into"),
    _helper("bn_into_linear", "norm-gamma-dropped", "a LayerNorm's gamma dropped as its affine is folded (only beta moves into the Linear)",
            _NORM_AFFINE, *_NORM_GAMMA_DROPPED),
    _helper("bn_into_linear", "norm-beta-dropped", "a LayerNorm's beta dropped as its affine is folded", _NORM_AFFINE,
            "if gamma is None else gamma), beta", "if gamma is None else gamma), None"),
    _m("bn_into_linear", "norm-axes-unchecked", "a norm over the last two axes folded as if its gamma were one per feature",
       'if len(norm.attrs["normalized_shape"]) == 1 else None', "", target="repalgebra.rules.bn_into_linear:_norm_affine"),
    _m("bn_into_linear", "norm-readers-unchecked", "a norm's affine folded into its first Linear although a ReLU reads it too",
       'readers = [graph.users(norm.out)[0]] if sole_use(graph, norm.out) else', 'readers = [graph.users(norm.out)[0]] if True else',
       target="repalgebra.rules.bn_into_linear:_norm_affine_into"),
    _m("bn_into_linear", "norm-chain-axis-unchecked", "a norm's affine folded through a transpose that leaves the tokens last",
       "if affine is None or follow_chain(chain, len(norm.out.shape) - 1) != len(lin.x.shape) - 1:", "if affine is None:",
       target="repalgebra.rules.bn_into_linear:_norm_through"),
    _m("bn_into_linear", "norm-chain-on-affine", "the layout chain replayed on the norm's output with its affine, which the Linear then applies again",
       "moved = replay(chain, bare.out)", "moved = replay(chain, norm.out)", target="repalgebra.rules.bn_into_linear:_norm_through"),
    _m("bn_into_linear", "reshape-flatten-unchecked", "any reshape of a BN output into a Linear's features taken for flatten(1)",
       "if n.op in (\"reshape\", \"reshape_dyn\") and tuple(n.out.shape) == (shape[0], shape[1] * repeat):",
       "if n.op in (\"reshape\", \"reshape_dyn\"):", target="repalgebra.rules.bn_into_linear:_flattened_features"),
    _m("bn_into_linear", "replay-reads-old-sizes", "a replayed view(x.size(0), -1) reads its sizes from the old chain, keeping the BN",
       "new = n.replace(inputs=(v, *(copies.get(id(r), r) for r in n.inputs[1:])))", "new = n.replace(inputs=(v, *n.inputs[1:]))",
       target="repalgebra.layout:replay"),
    # ---------------------------------------------------------------- linear_affine_fold
    _m("linear_affine_fold", "bias-unscaled", "the Linear's bias is not multiplied by the scale", "bias = b * s if b is not None else None", "bias = b",
       target=_LAF_FOLDED),
    _m("linear_affine_fold", "wrong-axis", "the scale multiplies the Linear's input columns instead of its output rows",
       '"weight": w * s[:, None]', '"weight": w * s if w.shape[0] == w.shape[1] else w * s[:, None]', target=_LAF_FOLDED),
    _m("linear_affine_fold", "shift-dropped", "the BN shift is dropped when the Linear has a bias",
       "bias = t if bias is None else bias + t", "bias = t if bias is None else bias", target=_LAF_FOLDED),
    _m("linear_affine_fold", "axis-unchecked", "a scale or BN on another axis than the Linear's features is folded",
       "follow_chain(chain, len(top.out.shape) - 1) != axis", "follow_chain(chain, len(top.out.shape) - 1) is None"),
    _helper("linear_affine_fold", "eps-outside-sqrt", "eps outside the square root: gamma / (sqrt(var) + eps)", _BN_AFFINE, *_EPS_OUTSIDE),
    _m("linear_affine_fold", "map-rows-interleaved", "a generator input layer's scale tiled over the rows instead of repeated per channel",
       "s = s.repeat_interleave(repeat)", "s = s.repeat(repeat)"),
    _m("linear_affine_fold", "sum-shift-everywhere", "every Linear of a sum folds the BN's shift, not only the first",
       "shift.pop() if shift else None", "t", target=_LAF_SUM),
    _m("linear_affine_fold", "sum-later-unscaled", "only the first Linear of a sum folds the affine; the others are summed as they are",
       "nodes.append(_folded(n, s, shift.pop() if shift else None, node))",
       "nodes.append(_folded(n, s, shift.pop() if shift else None, node) if not nodes else n)", target=_LAF_SUM),
    _m("linear_affine_fold", "sum-shared", "an affine after a sum folds even where a Linear of the sum is read elsewhere (computed twice)",
       "    if shared:\n", "    if False:\n", target=_LAF_SUM),
    _m("linear_affine_fold", "sum-term-twice", "a term read twice by the sum (y + y) folded twice: its Linear computed twice",
       "if id(value) in seen:", "if False:", target=_LAF_SUM),
    _m("linear_affine_fold", "sum-term-kept", "a term of the sum that is no Linear (a residual, a relu) added as it is, not scaled",
       "        else:\n            return None\n", "        else:\n            return value\n", target=_LAF_SUM),
    # ---------------------------------------------------------------- linear_seq_merge
    _m("linear_seq_merge", "weights-reversed", "the merged weight composed the wrong way round (W1 W2 where it fits)",
       '"weight": w2 @ inner.params["weight"]}', '"weight": inner.params["weight"] @ w2 if w2.shape[0] == w2.shape[1] == inner.params["weight"].shape[1] else w2 @ inner.params["weight"]}'),
    _m("linear_seq_merge", "inner-bias-unmapped", "the inner bias added as it is, not through the outer weight",
       '(w2 @ inner.params["bias"] if', '(inner.params["bias"] if'),
    _m("linear_seq_merge", "outer-bias-dropped", "the outer Linear's bias dropped when the inner has one",
       'params["bias"] = outer.params.get("bias", 0) + (', 'params["bias"] = 0 + ('),
    _m("linear_seq_merge", "cost-unchecked", "a pair merged where the one Linear is more work than the two (and no sum absorbs it)",
       "if o * i > m * i + o * m and not _absorbed(graph, outer, inner):", "if False:"),
    # ---------------------------------------------------------------- query_scale_fold
    _m("query_scale_fold", "all-rows-scaled", "the query scale multiplies every row of the qkv Linear (k and v too)",
       "torch.where(seen, lo, torch.ones(features, dtype=torch.float64))", "torch.where(seen, lo, lo[seen].max().expand(features))", target=_QSF),
    _m("query_scale_fold", "overlap-unchecked", "folded although another reader sees the scaled rows unscaled",
       "if v is not scaled and bool(seen[idx.reshape(-1)].any()):", "if False:", target=_QSF),
    _m("query_scale_fold", "factors-unchecked", "folded although one feature meets different factors (a scale along the tokens)",
       "if not bool((lo[seen] == hi[seen]).all()):", "if False:", target=_QSF),
    _m("query_scale_fold", "bias-unscaled", "the q rows of the bias are not multiplied by the scale",
       'params["bias"] = b * f.to(b.dtype)', 'params["bias"] = b', target=_QSF),
    _m("query_scale_fold", "conv-features-last-axis", "a conv's features taken along its last axis (as a Linear's), not its channels",
       "axis = lin.out, _FEATURE_AXIS[lin.op] % len(lin.out.shape)", "axis = lin.out, len(lin.out.shape) - 1",
       target="repalgebra.rules.query_scale_fold:_leaves"),
    _m("query_scale_fold", "conv-factor-on-kernel-width", "a conv's factors multiply its kernel's last axis, not its rows",
       "w * f.to(w.dtype).reshape(-1, *[1] * (w.dim() - 1))", "w * f.to(w.dtype).reshape(*[1] * (w.dim() - 1), -1)", target=_QSF),
    _m("query_scale_fold", "first-rows", "the scaled part is taken to be the first rows of the Linear (q) whichever part it is",
       "seen[mine.reshape(-1)] = True", "seen[: len(set(mine.reshape(-1).tolist()))] = True", target=_QSF),
    _m("query_scale_fold", "scores-factors-unchecked", "a scale on the scores with a factor per key column moved onto q as its first factor",
       "if not (c.numel() and bool((c == c[0]).all())):", "if not c.numel():"),
    _m("query_scale_fold", "scores-shared-unchecked", "the scores' number moved onto q although q is read by another product too",
       "if not (sole_use(graph, node.x) and sole_use(graph, operand)):", "if not sole_use(graph, node.x):"),
    _m("query_scale_fold", "scores-k-untried", "the number stays where q is read again, though k could take it",
       "            continue  # the other operand may take it", "            return refusal"),
    _m("query_scale_fold", "scores-half-overflow-unchecked", "a number above 1 moved onto q of float16 scores (100 q overflows)",
       "if abs(float(c[0])) > 1 and node.out.dtype in", "if False and node.out.dtype in"),
    _m("query_scale_fold", "scores-same-operand", "the number of q @ q^T-like scores (one Linear view on both sides) moved onto it once, squared",
       "if lin is None or sum(i is operand for i in mm.inputs) > 1:", "if lin is None:"),
    # ---------------------------------------------------------------- space_to_depth
    _m("space_to_depth", "phase-axes-swapped", "a phase's row offset put on the kernel's columns and its column offset on the rows",
       "dense[:, :, a::r, b::r] = w[:, g * c : (g + 1) * c]", "dense[:, :, b::r, a::r] = w[:, g * c : (g + 1) * c]"),
    _m("space_to_depth", "stride-not-scaled", "the one conv keeps the small grid's stride",
       "stride = tuple(r * s for s in conv.attrs[\"stride\"])", "stride = tuple(r for s in conv.attrs[\"stride\"])"),
    _m("space_to_depth", "padding-not-scaled", "the one conv keeps the small grid's padding",
       "padding = tuple(r * q for q in conv.attrs[\"padding\"])", "padding = tuple(conv.attrs[\"padding\"])"),
    _m("space_to_depth", "groups-unchecked", "a grouped conv of the phases taken as an ungrouped one",
       'if conv.attrs["groups"] != 1:', "if False:"),
    # ---------------------------------------------------------------- crop_into_conv
    _m("crop_into_conv", "stride-ignored", "the crop taken off the padding in output rows, not input pixels (wrong at stride 2)",
       "p - k * s for p, k, s in zip", "p - k for p, k, s in zip"),
    _m("crop_into_conv", "negative-padding-unchecked", "a crop beyond the conv's padding gives a negative padding",
       "if min(padding) < 0:", "if False:"),
    _m("crop_into_conv", "fixed-end-taken", "a slice ending at a fixed index taken for one counted from the end",
       "if end is not None and end >= 0:", "if end is not None and end >= 0 and False:", target="repalgebra.rules.crop_into_conv:cropped"),
    _m("crop_into_conv", "sides-swapped", "a crop at the start of an axis taken off the padding at its end",
       "removed = (start, -end if end is not None else 0)", "removed = (-end if end is not None else 0, start)",
       target="repalgebra.rules.crop_into_conv:cropped"),
    _m("crop_into_conv", "other-readers-ignored", "the conv read elsewhere too is cropped (its other reader is left the uncropped conv)",
       "if conv is None or not sole_use(graph, conv.out):", "if conv is None:"),
    # ---------------------------------------------------------------- crop_before_conv
    _m("crop_before_conv", "padded-side-taken", "a crop of a side the conv pads taken as zero taps (the pad's zeros become values)",
       "        if k and p:\n", "        if False:\n", target="repalgebra.rules.crop_before_conv:grown_taps"),
    _m("crop_before_conv", "dilation-ignored", "a crop of dilated taps grows the kernel by as many taps as pixels",
       "taps.append(k // d)", "taps.append(k)", target="repalgebra.rules.crop_before_conv:grown_taps"),
    _m("crop_before_conv", "sides-swapped", "the zero taps for the top and left put at the bottom and right",
       "pad_kernel_axes(conv.params[\"weight\"], (t, l), (b, r))", "pad_kernel_axes(conv.params[\"weight\"], (b, r), (t, l))"),
    _m("crop_before_conv", "alone-grown", "a kernel grown with no conv to merge with (its zero taps only add work)",
       "    if not merges_with_a_sibling(graph, conv, crop, (kh + t + b, kw + l + r)):", "    if False:"),
    _m("crop_before_conv", "sibling-any-stride", "a conv of another stride taken to merge with",
       'for k in ("stride", "groups")', 'for k in ("groups",)', target="repalgebra.rules.crop_before_conv:merges_with_a_sibling"),
    _m("crop_before_conv", "sibling-any-reach", "a conv padded otherwise taken to merge with (it has more outputs: nothing merges, the kernel only grows)",
       "if reach(n) == reach_grown and lattice_step", "if lattice_step", target="repalgebra.rules.crop_before_conv:merges_with_a_sibling"),
    # ---------------------------------------------------------------- attention_form
    _m("attention_form", "softmax-axis-unchecked", "a softmax over the queries (axis -2) is taken for attention's (over the keys)",
       'if sm.attrs["axis"] % rank != rank - 1:', "if False:"),
    _m("attention_form", "any-permute", "any permute of k is taken for k with its last two axes swapped",
       "return [d % rank for d in node.attrs[\"dims\"]] == [*range(rank - 2), rank - 1, rank - 2]", "return True",
       target="repalgebra.rules.attention_form:_swaps_last_two"),
    _m("attention_form", "default-scale", "the scale left to SDPA's default 1/sqrt(E) instead of the graph's factor",
       'attrs={"scale": c, "causal": False}', 'attrs={"scale": None, "causal": False}'),
    _m("attention_form", "scale-factors-unchecked", "a scale with different factors is taken as its first factor",
       "return float(s[0]) if s.numel() and bool((s == s[0]).all()) else None", "return float(s[0])",
       target="repalgebra.rules.attention_form:_uniform"),
    _m("attention_form", "scores-read-elsewhere", "fired although the scores are also read elsewhere (they stay computed)",
       "if mm is None or not sole_use(graph, scores):", "if mm is None:"),
    # ---------------------------------------------------------------- seq_merge
    _helper("seq_merge", "resolution-ignored", "the inner conv's work is counted at the outer conv's resolution: a 1x1 before a strided conv looks cheap",
            "repalgebra.rules.seq_merge:_pixels_per_output", "    return max(1, (hi * wi) // max(1, ho * wo))", "    return 1"),
    _m("seq_merge", "biased-1x1-padded-kxk", "1x1-then-kxk merge with a biased 1x1 before a zero-padding kxk (wrong at the border)",
       'if has_bias(inner) and any(outer.attrs["padding"]):\n            return Refusal("the 1x1 conv has a bias',
       'if False:\n            return Refusal("the 1x1 conv has a bias'),
    _helper("seq_merge", "depthwise-1x1", "depthwise-then-1x1 merge computed wrongly: regrouping puts every group's kernel at input 0",
            _REGROUP, "local = (j % (groups // new_groups)) * in_per_group", "local = 0"),
    _m("seq_merge", "bias-one-tap", "the inner bias goes through the kxk kernel's first tap only, not all of its taps",
       'torch.einsum("omhw,m->o", w_out, conv_bias(inner))', 'torch.einsum("om,m->o", w_out[:, :, 0, 0], conv_bias(inner))'),
    _m("seq_merge", "wrong-geometry", "kxk-then-1x1 takes its stride/padding/dilation from the 1x1",
       'geometry, padding, pad_after = inner, inner.attrs["padding"], pads', 'geometry, padding, pad_after = outer, outer.attrs["padding"], pads'),
    _m("seq_merge", "groups-dropped", "the merged conv keeps the inner conv's groups instead of gcd(g1, g2)",
       "weight=w, bias=bias, groups=g,", "weight=w, bias=bias, groups=gi,"),
    _helper("seq_merge", "biased-padded-1x1", "a zero-padding 1x1 with a bias is merged as a pad after a pointwise conv (its border is the bias, not 0)",
            "repalgebra.rules.pad_absorb:pad_after_pointwise", ' or (any(conv.attrs["padding"]) and has_bias(conv))', ""),
    _m("seq_merge", "inner-padding-dropped", "1x1-then-kxk drops the zero padding of a bias-free 1x1 instead of adding it to the kxk's",
       'geometry, padding = outer, tuple(p + q for p, q in zip(outer.attrs["padding"], pads))', 'geometry, padding = outer, outer.attrs["padding"]'),
    _m("seq_merge", "outer-padding-inside", "kxk-then-padded-1x1 adds the 1x1's padding to the kxk's instead of padding the merged output",
       'geometry, padding, pad_after = inner, inner.attrs["padding"], pads',
       'geometry, padding, pad_after = inner, tuple(p + q for p, q in zip(inner.attrs["padding"], pads)), (0, 0, 0, 0)'),
    _m("seq_merge", "biased-padded-1x1-padding-dropped", "a padded, biased 1x1 before an unpadded kxk merges without its padding",
       'geometry, padding = outer, inner.attrs["padding"]', 'geometry, padding = outer, outer.attrs["padding"]'),
    _m("seq_merge", "biased-padded-1x1-padded-kxk", "a padded, biased 1x1 merges before a kxk that pads too (its border would see 0, not the bias)",
       'elif pixelwise(inner) and not any(outer.attrs["padding"]):', "elif pixelwise(inner):"),
    _m("seq_merge", "separate-bias-padded", "a 1xk with a bias before a kx1 that zero-pads is merged (its border sees 0, not the bias)",
       'if has_bias(inner) and any(outer.attrs["padding"]):\n            return Refusal("the first conv has a bias',
       'if False:\n            return Refusal("the first conv has a bias'),
    _helper("seq_merge", "separate-same-axis", "two convs that act on the same axis are composed tap by tap as if on different ones",
            "repalgebra.rules.seq_merge:_acting_axes", "if any(x and y for x, y in zip(a, b)) or", "if"),
    _helper("seq_merge", "separate-axes-swapped", "the merged conv takes the height's geometry from the conv that acts on the width",
            "repalgebra.rules.seq_merge:_per_axis", "ph, pw = (inner if on else outer for on in inner_axes)",
            "pw, ph = (inner if on else outer for on in inner_axes)"),
    # ---------------------------------------------------------------- engine
    Mutant("engine", "fold-in-own-dtype", "fp16 folding: parameters are folded in the model's own dtype, not float64",
           "repalgebra.rewrite:rewrite", "p.to(fold_dtype) if p.is_floating_point() else p", "p",
           tests=("tests/test_precision.py", "tests/test_rewrite.py::test_folding_happens_in_float64_and_params_are_cast_back_once")),
]


def all_mutants() -> list[Mutant]:
    """The rule mutants (:data:`MUTANTS`) and the stage mutants (:mod:`repalgebra.mutants_stages`): the full run."""
    from dataclasses import replace

    from repalgebra.mutants_stages import engine_loop, stage_mutants

    loop = engine_loop()  # the engine's loop may live in a helper that rewrite() wraps
    rules = [replace(m, target=loop) if m.target == "repalgebra.rewrite:rewrite" else m for m in MUTANTS]
    return [*rules, *stage_mutants()]


def tests_for(m: Mutant) -> list[str]:
    """The tests run against mutant ``m``: its rule's property tests, then its extra tests."""
    own = f"tests/rules/test_{m.rule}.py"
    return ([own] if (ROOT / own).is_file() else []) + list(m.tests)


# --------------------------------------------------------------------------- applying a mutant


def _resolve(target: str):
    module_name, fn_name = target.split(":")
    module = importlib.import_module(module_name)
    fn = inspect.unwrap(getattr(module, fn_name))  # a context manager's generator function, which its wrapper calls
    if not isinstance(fn, types.FunctionType):
        raise MutantError(f"{target} is not a function")
    return module, fn


def mutated_code(m: Mutant) -> types.CodeType:
    """The code object of ``m.target`` with ``m.old`` replaced by ``m.new``, compiled in its own module's globals."""
    _, fn = _resolve(m.target)
    lines, first = inspect.getsourcelines(fn)
    src = textwrap.dedent("".join(lines))
    if src.count(m.old) != 1:
        raise MutantError(f"{m.id}: the snippet {m.old!r} occurs {src.count(m.old)} times in {m.target}, not once")
    src = src.replace(m.old, m.new)
    body = src.splitlines(keepends=True)
    skip = 0
    while body[skip].lstrip().startswith("@"):  # decorators (rule registration) are not re-run
        skip += 1
    padded = "\n" * (first - 1 + skip) + "".join(body[skip:])  # tracebacks keep the file's line numbers
    namespace = dict(fn.__globals__)
    try:
        code = compile(padded, inspect.getsourcefile(fn) or "<mutant>", "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
        exec(code, namespace)
    except Exception as e:
        raise MutantError(f"{m.id}: the mutated {m.target} does not compile: {e}") from e
    new = namespace[fn.__name__].__code__
    if new.co_freevars != fn.__code__.co_freevars:
        raise MutantError(f"{m.id}: the mutated {m.target} has other free variables")
    return new


@contextlib.contextmanager
def applied(m: Mutant) -> Iterator[None]:
    """Apply mutant ``m`` for the duration of the ``with`` block; the original is always restored."""
    _, fn = _resolve(m.target)
    code = mutated_code(m)
    if m.scope is None:
        original = fn.__code__
        fn.__code__ = code
        try:
            yield
        finally:
            fn.__code__ = original
        return
    scope = importlib.import_module(m.scope)
    bound = getattr(scope, fn.__name__, None)
    if bound is not fn:
        raise MutantError(f"{m.id}: {m.scope} does not use {m.target} under the name {fn.__name__}")
    faulty = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    faulty.__kwdefaults__ = fn.__kwdefaults__
    setattr(scope, fn.__name__, faulty)
    try:
        yield
    finally:
        setattr(scope, fn.__name__, fn)


# --------------------------------------------------------------------------- running the tests


@dataclass
class Result:
    """The outcome of one run: ``killed``, ``survived``, ``error`` (for a mutant) or ``passed``/``failed`` (baseline)."""

    mutant: str  # Mutant.id, or "baseline: <tests>"
    status: str
    seconds: float
    detail: str = ""  # the first failing test, or the error


@dataclass
class MutationReport:
    """All results of :func:`run`, with the wall time."""

    mutants: list[Mutant]
    results: dict[str, Result]
    baselines: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    jobs: int = 1

    @property
    def killed(self) -> int:
        return sum(r.status == "killed" for r in self.results.values())

    @property
    def total(self) -> int:
        return len(self.mutants)

    @property
    def ok(self) -> bool:
        return not self.unexplained() and all(b.status == "passed" for b in self.baselines)

    def unexplained(self) -> list[str]:
        """Ids of mutants neither killed nor listed as equivalent (with the argument) in ``mutants_stages.EQUIVALENT``."""
        from repalgebra.mutants_stages import EQUIVALENT

        return [m.id for m in self.mutants if self.results[m.id].status != "killed" and not (self.results[m.id].status == "survived" and m.id in EQUIVALENT)]

    def per_stage(self) -> dict[str, tuple[int, int]]:
        """Per stage (``front end``, ``engine``, ``rules``, ``torch back end``, ``onnx back end``): (killed, total)."""
        from repalgebra.mutants_stages import stage_of

        out: dict[str, tuple[int, int]] = {}
        for m in self.mutants:
            k, t = out.get(stage_of(m.rule), (0, 0))
            out[stage_of(m.rule)] = (k + (self.results[m.id].status == "killed"), t + 1)
        order = ["front end", "engine", "rules", "torch back end", "onnx back end"]
        return {s: out[s] for s in order if s in out}

    def per_rule(self) -> dict[str, tuple[int, int]]:
        """Per rule: (killed, total)."""
        out: dict[str, tuple[int, int]] = {}
        for m in self.mutants:
            k, t = out.get(m.rule, (0, 0))
            out[m.rule] = (k + (self.results[m.id].status == "killed"), t + 1)
        return out

    def table(self) -> str:
        rows = [("rule", "mutant", "result", "time", "killed by / bug")]
        for m in self.mutants:
            r = self.results[m.id]
            rows.append((m.rule, m.name, r.status.upper() if r.status != "killed" else "killed", f"{r.seconds:.1f}s", r.detail if r.status == "killed" else f"{m.bug}: {r.detail}"))
        widths = [max(len(row[k]) for row in rows) for k in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        for b in self.baselines:
            if b.status != "passed":
                lines.append(f"BASELINE FAILED ({b.mutant}): {b.detail}")
        from repalgebra.mutants_stages import EQUIVALENT, STAGES

        for m in self.mutants:
            if self.results[m.id].status == "survived" and m.id in EQUIVALENT:
                lines.append(f"equivalent ({m.id}): {EQUIVALENT[m.id]}")
        for stage, (k, t) in self.per_stage().items():
            lines.append(f"  {stage + ':':<16} {k}/{t} killed")
        rules = {r: t for r, (_, t) in self.per_rule().items() if r not in STAGES}
        lines.append(
            f"mutants killed: {self.killed}/{self.total} ({len(rules)} rules, at least {min(rules.values(), default=0)} each, "
            f"plus {self.total - sum(rules.values())} in the front end, engine and back ends) in {self.seconds:.0f}s with {self.jobs} workers"
        )
        return "\n".join(lines)


class _FirstFailure:
    """A pytest plugin remembering the first failing test."""

    def __init__(self) -> None:
        self.failed: str = ""
        self.message: str = ""

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and not self.failed:
            self.failed = report.nodeid
            text = str(report.longrepr) if report.longrepr else ""
            last = [ln for ln in text.splitlines() if ln.startswith("E ")]
            self.message = (last[0][1:].strip() if last else text.strip().splitlines()[-1] if text.strip() else "")[:160]

    def pytest_collectreport(self, report) -> None:
        if report.failed and not self.failed:
            self.failed = f"collecting {report.nodeid}"


def _pytest(tests: Sequence[str], *, first_failure_stops: bool = True) -> tuple[int, _FirstFailure, str]:
    import pytest

    plugin = _FirstFailure()
    args = [*tests, *(["-x"] if first_failure_stops else []), "-q", "-p", "no:cacheprovider", "--no-header", "--tb=short", "-o", "addopts=", "--rootdir", str(ROOT)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = pytest.main(args, plugins=[plugin])
    return int(code), plugin, out.getvalue()


def _init_worker(profile: str = "mutants") -> None:
    os.environ["HYPOTHESIS_PROFILE"] = profile
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(1)


def _run_baseline(tests: tuple[str, ...], profile: str = "mutants") -> Result:
    _init_worker(profile)
    start = time.perf_counter()
    code, plugin, out = _pytest(tests, first_failure_stops=False)
    status = "passed" if code == 0 else "failed"
    detail = "" if code == 0 else (plugin.failed or f"pytest exit code {code}: {out.strip().splitlines()[-1:] }")
    return Result(f"baseline: {len(tests)} test files and tests", status, time.perf_counter() - start, detail)


def baseline_chunks(mutants: Sequence[Mutant], jobs: int) -> list[tuple[str, ...]]:
    """Every test the mutants run, each once, in ``jobs`` chunks of about equal size.

    Running the union once instead of each mutant's selection separately saves
    the tests the selections share (a rule's file is in every one of its
    mutants' selections).  A test inside a file that is run whole is dropped.
    """
    tests = list(dict.fromkeys(t for m in mutants for t in tests_for(m)))
    whole = {t for t in tests if "::" not in t}
    tests = [t for t in tests if "::" not in t or t.split("::")[0] not in whole]
    by_file: dict[str, list[str]] = {}
    for t in tests:
        by_file.setdefault(t.split("::")[0], []).append(t)
    chunks: list[list[str]] = [[] for _ in range(jobs)]
    for k, in_file in enumerate(by_file.values()):  # whole files together: a module's fixtures and imports are paid once
        chunks[k % jobs].extend(in_file)
    return [tuple(c) for c in chunks if c]


class MutantTimeout(BaseException):
    """Raised in a worker when a mutant's tests run past :data:`MUTANT_TIMEOUT`."""


def _alarm(signum, frame):
    raise MutantTimeout(f"tests still running after {MUTANT_TIMEOUT}s")


def _run_mutant(m: Mutant, profile: str = "mutants") -> Result:
    import signal

    _init_worker(profile)
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(MUTANT_TIMEOUT)
    try:
        with applied(m):
            code, plugin, out = _pytest(tests_for(m))
    except MutantError as e:
        return Result(m.id, "error", time.perf_counter() - start, str(e))
    except MutantTimeout as e:
        return Result(m.id, "killed", time.perf_counter() - start, f"timeout: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    if code == 1:
        name = plugin.failed.split("::")[-1] if plugin.failed else "?"
        return Result(m.id, "killed", seconds, f"{name}: {plugin.message}" if plugin.message else name)
    if code == 0:
        return Result(m.id, "survived", seconds, "all tests passed")
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    return Result(m.id, "error", seconds, f"pytest exit code {code}: {plugin.failed or tail}")


def select(rules: Sequence[str] | None = None, names: Sequence[str] | None = None) -> list[Mutant]:
    """The mutants of the given rules (all when ``None``), optionally only those with the given ids or names."""
    out = [m for m in all_mutants() if rules is None or m.rule in rules]
    if names:
        out = [m for m in out if m.id in names or m.name in names]
    return out


def run(mutants: Sequence[Mutant] | None = None, *, jobs: int = MAX_JOBS, profile: str = "mutants", progress=None) -> MutationReport:
    """Run each mutant's tests with the mutant applied; returns a :class:`MutationReport`.

    Every test the mutants run first runs once unmutated (it must pass).  With
    ``jobs`` > 1 (at most 2) the runs are spread over that many worker
    processes (spawned, so each imports torch and pytest once).  ``profile``
    is the Hypothesis profile of the tests (``mutants``: derandomized;
    ``mutants-random`` draws new examples on every run, to check that kills
    do not hang on particular examples).  A mutant whose tests run longer
    than ``MUTANT_TIMEOUT`` seconds (fusion looping, say) is stopped and
    counted killed: a suite that hangs fails.  ``progress`` is called with each :class:`Result`.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    mutants = list(all_mutants() if mutants is None else mutants)
    for m in mutants:  # fail fast on a mutant that does not apply
        mutated_code(m)
    jobs = max(1, min(MAX_JOBS, jobs))
    start = time.perf_counter()
    selections = baseline_chunks(mutants, jobs)
    report = MutationReport(mutants, {}, jobs=jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in pool.map(_run_baseline, selections, [profile] * len(selections)):
            report.baselines.append(r)
            if progress:
                progress(r)
        # Slowest first (survivors and mutants of rules with many tests run longest) would balance better;
        # the list order interleaves rules well enough.
        for r in pool.map(_run_mutant, mutants, [profile] * len(mutants)):
            report.results[r.mutant] = r
            if progress:
                progress(r)
    report.seconds = time.perf_counter() - start
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repalgebra.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rule", action="append", help="only this rule's mutants (repeatable)")
    parser.add_argument("--mutant", action="append", help="only this mutant (rule/name or name; repeatable)")
    parser.add_argument("--jobs", "-j", type=int, default=MAX_JOBS, help=f"worker processes (at most {MAX_JOBS})")
    parser.add_argument("--profile", default="mutants",
                        help="Hypothesis profile of the tests: mutants (default, derandomized) or mutants-random (new examples each run)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    mutants = select(args.rule, args.mutant)
    if not mutants:
        print("no mutants selected", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id:<45} {m.bug}")
        print(f"{len(mutants)} mutants")
        return 0

    def progress(r: Result) -> None:
        if not args.quiet:
            print(f"  {r.status:<8} {r.seconds:5.1f}s  {r.mutant}", file=sys.stderr, flush=True)

    report = run(mutants, jobs=args.jobs, profile=args.profile, progress=progress)
    print(report.table())
    if not (args.rule or args.mutant):  # the whole run: every rule must have its three mutants
        from repalgebra import RULES

        few = {r: sum(m.rule == r for m in mutants) for r in RULES if sum(m.rule == r for m in mutants) < 3}
        if few:
            print(f"rules with fewer than 3 mutants: {few}")
            return 1
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
