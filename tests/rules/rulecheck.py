"""Shared helpers for the per-rule property tests (imported as a plain module from ``tests/rules``)."""

from __future__ import annotations

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
    """When merging branches pays, as a spec written apart from the rules: the weights of the one conv that ``convs``
    (summed, or with ``concat`` stacked) become, and of the convs themselves.

    Per axis the merged kernel spans every tap of every conv (input offsets ``-pad + i * d``); it keeps the
    dilation where all convs share it and their offsets differ by multiples of it on both axes, and is dense
    (on both axes) otherwise."""
    starts = [(-n.attrs["padding"][0], -n.attrs["padding"][2]) for n in convs]
    d0 = convs[0].attrs["dilation"]
    shared = all(n.attrs["dilation"] == d0 and (s[0] - starts[0][0]) % d0[0] == 0 and (s[1] - starts[0][1]) % d0[1] == 0
                 for s, n in zip(starts, convs))
    taps = 1
    for a in (0, 1):
        step = d0[a] if shared else 1
        lasts = [s[a] + (n.params["weight"].shape[2 + a] - 1) * n.attrs["dilation"][a] for s, n in zip(starts, convs)]
        taps *= (max(lasts) - min(s[a] for s in starts)) // step + 1
    outs = [n.params["weight"].shape[0] for n in convs]
    merged = (sum(outs) if join_op == "concat" else max(outs)) * max(n.params["weight"].shape[1] for n in convs) * taps
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
    why = f"merged kernel would have {merged} weights, more than the {len(convs)} convs together ({apart})"
    assert any(why in la.reason for la in report.left_alone), (why, [la.reason for la in report.left_alone])
    return False
