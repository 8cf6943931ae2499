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
