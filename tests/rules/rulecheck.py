"""Shared helpers for the per-rule property tests (imported as a plain module from ``tests/rules``)."""

from __future__ import annotations

import math

import torch

from repalgebra import RULES, rewrite
from repalgebra.ir import Graph, Node
from repalgebra.rewrite import Refusal, RewriteReport
from repalgebra.testing import assert_params_unchanged, snapshot_params

#: The rules a branchy region needs to end as one conv (no BN, pad or pool handling).
SUM_RULES = ("dilation_to_dense", "kernel_pad", "branch_sum", "concat_merge")


def run_rules(graph: Graph, *names: str) -> tuple[Graph, RewriteReport]:
    """Rewrite ``graph`` with only the named rules (all rules when none named).

    Also checks what every rewrite must guarantee: the input graph is untouched
    (same text, same nodes, parameters bit for bit), and the result's parameters
    have the dtype of the values their nodes compute.
    """
    snap = snapshot_params(graph)
    text = str(graph)
    fused, report = rewrite(graph, [RULES[n] for n in names] if names else None)
    assert_params_unchanged(graph, snap)
    assert str(graph) == text, "rewrite changed its input graph"
    for n in fused.nodes:
        for k, p in n.params.items():
            assert p.dtype == n.out.dtype, f"{n.op}.{k} is {p.dtype}, its node computes {n.out.dtype}"
    assert report.after == fused.op_counts()
    return fused, report


def fired(report: RewriteReport, name: str) -> int:
    """How often rule ``name`` fired."""
    return report.rule_counts().get(name, 0)


def reasons(report: RewriteReport, op: str) -> list[str]:
    """The left-alone reasons the report gives for nodes of ``op``."""
    return [la.reason for la in report.left_alone if la.op == op]


def only(graph: Graph, op: str) -> Node:
    """The single node of ``op`` in ``graph``."""
    nodes = [n for n in graph.nodes if n.op == op]
    assert len(nodes) == 1, f"expected one {op}, got {graph.op_counts()}"
    return nodes[0]


def try_rule(graph: Graph, name: str, node: Node):
    """Call rule ``name``'s function directly on ``node`` of ``graph``."""
    return RULES[name].fn(graph, node)


def refusal_reason(graph: Graph, name: str, node: Node) -> str:
    """The rule's refusal reason for ``node``; fails if it does not refuse."""
    result = try_rule(graph, name, node)
    assert isinstance(result, Refusal), f"{name} on {node}: expected a Refusal, got {result!r}"
    return result.reason


def find(graph: Graph, source: str) -> Node:
    """The node whose source is ``source``."""
    return next(n for n in graph.nodes if n.source == source)


def merge_weights(convs: list[Node], join_op: str) -> tuple[int, int]:
    """When merging branches pays, as a spec written apart from the rules: the multiply-adds per output pixel
    of the one conv that ``convs`` (summed, or with ``concat`` stacked) become, and of the convs themselves.

    Per axis the merged kernel spans every tap of every conv (input offsets ``-pad + i * d``).  It keeps a
    dilation where every conv with more than one tap on that axis has it and every conv's first tap lies a
    multiple of it from the others' (a one-tap axis has no dilation to speak of); otherwise it is dense (on
    both axes).  A sum keeps the output channels and writes groups as their gcd; a concat stacks the output
    channels and is dense in groups."""
    starts = [(-n.attrs["padding"][0], -n.attrs["padding"][2]) for n in convs]
    sizes = [tuple(n.params["weight"].shape[2:]) for n in convs]
    steps = []
    for a in (0, 1):
        ds = {n.attrs["dilation"][a] for n, k in zip(convs, sizes) if k[a] > 1} or {1}
        steps.append(ds.pop() if len(ds) == 1 else None)
    shared = None not in steps and all((s[a] - starts[0][a]) % steps[a] == 0 for s in starts for a in (0, 1))
    taps = 1
    for a in (0, 1):
        step = steps[a] if shared else 1
        lasts = [s[a] + (k[a] - 1) * n.attrs["dilation"][a] for s, k, n in zip(starts, sizes, convs)]
        taps *= (max(lasts) - min(s[a] for s in starts)) // step + 1
    cin = convs[0].params["weight"].shape[1] * convs[0].attrs["groups"]
    outs = [n.params["weight"].shape[0] for n in convs]
    if join_op == "concat":
        merged = sum(outs) * cin * taps
    else:
        merged = max(outs) * cin // math.gcd(*(n.attrs["groups"] for n in convs)) * taps
    return merged, sum(n.params["weight"].numel() for n in convs)


def merges_if_it_pays(before: Graph, fused: Graph, report: RewriteReport, join_op: str) -> bool:
    """Assert that the convs of ``before`` (branches of one join) became one conv in ``fused`` exactly where that
    adds no weights (:func:`merge_weights`), and were otherwise left, with the reason; returns whether they merged."""
    convs = [n for n in before.nodes if n.op == "conv2d"]
    merged, apart = merge_weights(convs, join_op)
    if merged <= apart:
        assert fused.op_counts() == {"conv2d": 1}, (merged, apart, fused.op_counts())
        return True
    assert fused.op_counts().get("conv2d") == len(convs), (merged, apart, fused.op_counts())
    why = f"would become has {merged} multiply-adds per output pixel, more than the {len(convs)} convs together ({apart})"
    assert any(why in la.reason for la in report.left_alone), (why, [la.reason for la in report.left_alone])
    return False


def converts_if_it_pays(graph: Graph, fused: Graph, report: RewriteReport, join_op: str) -> bool:
    """For a branch (skip, BN or channel scale) beside a conv or BN of ``graph``'s input: whether the 1x1 conv it
    would become (the conv's groups, its tap at offset 0; beside a BN, depthwise like the BN's) merges with that
    sibling at no extra cost (:func:`merge_weights`).
    Where it would not, assert that the rule left the graph as it was and said why in the report."""
    sib = next(n for n in graph.nodes if n.op in ("conv2d", "batch_norm") and n.x is graph.inputs[0])
    c = sib.x.shape[1]
    g = sib.attrs["groups"] if sib.op == "conv2d" else c
    one = Node.make("conv2d", [sib.x], {"groups": g}, {"weight": torch.zeros(c, c // g, 1, 1)})
    if sib.op == "batch_norm":  # it becomes that depthwise 1x1 too
        sib = one
    merged, apart = merge_weights([sib, one], join_op)
    if merged <= apart:
        return True
    assert report.fired == [] and fused.op_counts() == graph.op_counts(), report
    why = f"would become has {merged} multiply-adds per output pixel, more than the 2 convs together ({apart})"
    assert any(why in r for r in reasons(report, join_op)), (why, reasons(report, join_op))
    return False


def linear_params(c_in: int, c_out: int, bias: bool, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Linear's parameters, ``c_in -> c_out``: a weight of unit row norm on average and, with ``bias``, a bias."""
    gen = torch.Generator().manual_seed(seed)
    p = {"weight": (torch.randn(c_out, c_in, generator=gen, dtype=torch.float64) / c_in**0.5).to(dtype)}
    if bias:
        p["bias"] = torch.randn(c_out, generator=gen, dtype=torch.float64).to(dtype)
    return p
