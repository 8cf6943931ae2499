"""The rewrite engine: apply fusion rules to a fixpoint.

A rule is a plain function ``(graph, node) -> Rewrite | Refusal | None``,
registered with :func:`rule` for the ops it is tried on.  ``None`` means "no
match"; a :class:`Refusal` means "the pattern matched but a precondition does
not hold" and carries the reason, which ``fuse`` reports for the nodes it had
to leave alone; a :class:`Rewrite` says "value ``old`` equals value ``new``,
computed by the new ``nodes``".  The registry (those names and ``RULES``)
lives in :mod:`repalgebra.rules.registry`, which the rules import; this module
imports the rules package (registering the built-in rules) and re-exports the
registry's names, so imports run one way: engine -> rules -> registry.

The engine (:func:`rewrite`) works on its own copy of the graph with every
parameter promoted to float64, applies rules until none fires, removes dead
nodes after each rewrite, and casts the parameters back to the dtype of the
values they act on once, at the end.  Rules build new tensors; they never
write into parameters they were given.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

import repalgebra.rules  # noqa: F401  (registers the built-in rules)
from repalgebra.gc_pause import frozen_gc
from repalgebra.ir import Graph, Node
from repalgebra.match import branch_input
from repalgebra.ops import TRANSPOSED_CONVS
from repalgebra.rules.registry import RULES, Refusal, Rewrite, Rule, RuleFn, rule  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Firing:
    """One application of a rule."""

    rule: str
    source: str
    op: str


@dataclass(frozen=True)
class LeftAlone:
    """A node that fusion would like to remove but could not, and why."""

    source: str
    op: str
    reason: str


@dataclass
class RewriteReport:
    """What the engine did: rules fired, nodes left alone, op counts before/after."""

    fired: list[Firing] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def rule_counts(self) -> dict[str, int]:
        """How often each rule fired."""
        counts: dict[str, int] = {}
        for f in self.fired:
            counts[f.rule] = counts.get(f.rule, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def __str__(self) -> str:
        lines = [f"rewrite: {len(self.fired)} rewrites in {self.seconds:.3f}s"]
        ops = sorted(set(self.before) | set(self.after))
        if ops:
            w = max(len(o) for o in ops)
            lines.append(f"  {'op':<{w}}  before  after")
            for o in ops:
                lines.append(f"  {o:<{w}}  {self.before.get(o, 0):>6}  {self.after.get(o, 0):>5}")
        if self.fired:
            lines.append("  rules fired:")
            for name, n in self.rule_counts().items():
                lines.append(f"    {name:<20} x{n}")
        if self.left_alone:
            lines.append("  left alone:")
            for la in self.left_alone:
                lines.append(f"    {la.op} at {la.source or '<graph>'}: {la.reason}")
        return "\n".join(lines)


# Ops that a fully fused linear region no longer contains: if one survives, say why.
# Also reported: sums of branches of one value that did not fold, and nodes a
# rule refused with an explicit ``about`` (an exactness precondition failed).
REMOVABLE_OPS = ("batch_norm", "scale", "identity", "pad", "avg_pool2d")


def rewrite(
    graph: Graph,
    rules: Iterable[Rule] | None = None,
    *,
    fold_dtype: torch.dtype = torch.float64,
    max_rewrites: int = 1_000_000,
    progress: bool = False,
    cast_back: bool = True,
) -> tuple[Graph, RewriteReport]:
    """Apply ``rules`` (default: all registered) to a fixpoint; returns a new graph and a report.

    The input graph is not modified.  Parameters are promoted to ``fold_dtype``
    for the whole rewrite and cast back once at the end (with
    ``cast_back=False`` they stay in ``fold_dtype``: :func:`cast_params` casts
    them later, so a caller can check the exact folded graph first).
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"rewrite takes a Graph, got {type(graph).__name__}"
                        + (": trace it first (repalgebra.trace(model, example)), or fuse the module (repalgebra.fuse)"
                           if isinstance(graph, torch.nn.Module) else ""))
    with frozen_gc(len(graph.nodes)):  # the collector would revisit the whole graph again and again: quadratic time
        return _rewrite(graph, rules, fold_dtype, max_rewrites, progress, cast_back)


def _rewrite(
    graph: Graph, rules: Iterable[Rule] | None, fold_dtype: torch.dtype, max_rewrites: int, progress: bool, cast_back: bool
) -> tuple[Graph, RewriteReport]:
    start = time.perf_counter()
    rules = list(RULES.values()) if rules is None else list(rules)
    by_op: dict[str, list[Rule]] = {}
    for r in rules:
        for o in r.ops:
            by_op.setdefault(o, []).append(r)

    g = graph.map_params(lambda p, n: p.to(fold_dtype) if p.is_floating_point() else p)
    report = RewriteReport(before=g.op_counts())
    refusals: dict[int, tuple[Node, str]] = {}  # id -> (node, reason): the node is kept so its id is never reused
    changed = True
    while changed:
        changed = False
        for node in list(g.nodes):
            if not g.contains(node):
                continue
            for r in by_op.get(node.op, ()):
                result = r.fn(g, node)
                if result is None:
                    continue
                if isinstance(result, Refusal) or (unfit := _unfit(result)) is not None:
                    if not isinstance(result, Refusal):  # a NaN/Inf weight (a statistic of inf), or one the dtype cannot hold
                        result = Refusal(unfit, node)
                    about = result.about or node
                    refusals[id(about)] = (about, f"{r.name}: {result.reason}", result.about is not None)
                    continue
                _apply(g, result, whole_graph=not report.fired)
                report.fired.append(Firing(r.name, node.source, node.op))
                changed = True
                if progress and len(report.fired) % 200 == 0:
                    print(f"  ... {len(report.fired)} rewrites", file=sys.stderr)
                if len(report.fired) >= max_rewrites:
                    raise RuntimeError(f"rewrite did not reach a fixpoint after {max_rewrites} rewrites")
                break
    for n in g.nodes:
        about, reason, explicit = refusals.get(id(n), (None, None, False))
        if about is not n:  # an id reused by a new node after the refused one died
            reason, explicit = None, False
        if n.op in REMOVABLE_OPS or explicit or _unfolded_join(n):
            report.left_alone.append(LeftAlone(n.source, n.op, reason or _no_rule_reason(g, n)))
    if cast_back:
        g = cast_params(g)
    report.after = g.op_counts()
    report.seconds = time.perf_counter() - start
    return g, report


def _unfit(rw: Rewrite) -> str | None:
    """Why a parameter the rewrite computes cannot stand for what it folds, or None: it is not finite, or cast to
    the dtype its node computes in it overflows, or an output channel's kernel is so small there (below the
    smallest normal number) that rounding it loses more than that dtype's epsilon of the channel's weights and
    bias together (for inputs of order one): a float16 conv's weights times a BN scale of 1e-5 all round to 0,
    where the model scales the conv's output and stays representable.  A channel whose bias dominates (network
    slimming's near-zero BN scales) loses nothing that shows."""
    for n in rw.nodes:
        dtype = n.out.dtype
        for key, p in n.params.items():
            if not p.is_floating_point() or not p.numel():
                continue
            size = p.abs()
            largest = float(size.max())  # (NaN if any is: max propagates it)
            if not math.isfinite(largest):
                return "a weight it would fold is not finite (NaN or Inf)"
            if dtype is None or not dtype.is_floating_point or dtype == p.dtype:
                continue
            info, name = torch.finfo(dtype), str(dtype).replace("torch.", "")
            if largest > info.max / 2 and not bool(torch.isfinite(p.to(dtype)).all()):
                return f"a weight it would fold overflows {name}"
            if key != "weight" or p.dim() < 2 or not bool(((size < info.tiny) & (size > 0)).any()):
                continue
            bias = n.params.get("bias")
            held = _per_output(n, size) + (0 if bias is None else bias.abs())
            lost = _per_output(n, (p.to(dtype).to(p.dtype) - p).abs())
            if bool((lost > info.eps * held).any()):
                return f"a weight it would fold is below {name}'s smallest normal number, where rounding loses its digits"
    return None


def _per_output(n: Node, t: torch.Tensor) -> torch.Tensor:
    """``t`` (of ``n``'s weight's shape) summed per output channel: rows of a conv's or Linear's weight; a transposed
    conv's weight ``(C_in, C_out / groups, k...)`` holds its output channels along axis 1, group by group."""
    if n.op in TRANSPOSED_CONVS:
        g = n.attrs["groups"]
        return t.reshape(g, t.shape[0] // g, t.shape[1], -1).sum((1, 3)).reshape(-1)
    return t.reshape(t.shape[0], -1).sum(1)


def cast_params(g: Graph) -> Graph:
    """``g`` with every floating-point parameter cast to the dtype of the value its node makes."""
    return g.map_params(lambda p, n: p.to(n.out.dtype) if p.is_floating_point() and n.out.dtype else p)


def _apply(g: Graph, rw: Rewrite, whole_graph: bool = False) -> None:
    """Insert ``rw.nodes`` before the node that produced ``rw.old``, reroute its uses, drop dead nodes.

    The first rewrite sweeps the whole graph for dead nodes (the input may have
    some); later ones only look where the rewrite removed reads.
    """
    pairs = ((rw.old, rw.new), *rw.also)
    for old, new in pairs:
        if old.shape != new.shape:
            raise AssertionError(f"rewrite changes shape {old.shape} -> {new.shape} at {old.producer}")
    if rw.nodes:
        g.insert_before(rw.old.producer, rw.nodes)
    for old, new in pairs:
        g.replace_uses(old, new)
    if whole_graph:
        g.eliminate_dead()
    else:
        g.eliminate_dead_from([*(old.producer for old, _ in pairs if old.producer is not None), *rw.nodes])


def _unfolded_join(n: Node) -> bool:
    """An add/sub of two branches of one value: fusion would have summed them."""
    return n.op in ("add", "sub") and branch_input(n.inputs[0]) is branch_input(n.inputs[1])


def _no_rule_reason(g: Graph, n: Node) -> str:
    users = ", ".join(sorted({_SPOKEN.get(u.op, u.op) for u in g.users(n.out)})) or "graph output"
    return f"no rule applies (input from {_producer(n)}, used by {users})"


# Ops of the IR that the model's code does not name, by what it wrote (a reshape reading a size at run time is
# ``reshape_dyn``; ``x * 0.5`` is ``scale``).
_SPOKEN = {"reshape_dyn": "reshape", "expand_dyn": "expand", "broadcast_add": "add", "broadcast_sub": "sub", "add_const": "add",
           "scale": "mul", "pad_nd": "pad", "opaque": "a call"}


def _producer(n: Node) -> str:
    """What computes ``n``'s input: an op, the graph input, or the call an opaque node makes (``opaque Conv1d 'c1'``)."""
    p = n.x.producer
    if p is None:
        return "graph input"
    if p.op != "opaque":
        return _SPOKEN.get(p.op, p.op)
    fn = p.attrs.get("fn")
    what = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"opaque {what}" + (f" {p.source!r}" if p.source else "")
