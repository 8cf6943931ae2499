"""Sum regrouping: the branches of one input in a sum are added first, wherever the sum writes them.

    (g + a) + b = g + (a + b)        (a + b) + g = (a + b) + g        (a + g) + b = (a + b) + g

for any terms: addition is associative and commutative.  A block that sums a
nonlinear branch with the linear branches of its input, ``gate(x) + pw(x) +
bn(x)``, is parsed ``(gate(x) + pw(x)) + bn(x)``: no two neighbours read the
same input, so nothing merges.  Regrouped as ``gate(x) + (pw(x) + bn(x))``,
the 1x1 conv and the BN meet and become one conv (:mod:`bn_to_conv`,
:mod:`kernel_pad`, :mod:`branch_sum`).

The rule reads a tree of ``add`` s (each inner one read only by the next) as
its list of terms, groups the terms that are branches of one input (a conv2d
or BatchNorm of ``x``, a channel scale of ``x``, or ``x`` itself; a conv also
by its stride) where a group has a conv or a BN, and writes the sum again:
each group's terms added first, in the order the model wrote them (but a
dilated conv, or a grouped one beside a dense one, last: its merge with a
dense conv costs more than the two and is refused, and would stop the cheap
merges after it; not one that merges with another of the group at no cost, a
depthwise 5x1 beside a dense 5x1, which :mod:`kernel_pad` pairs), the groups
and the other terms then added in the order of their first term.  Only the
order of the float additions changes.

Preconditions: every add of the tree but the root is read only by the next; a
group has two terms or more, one of them a conv2d or a BatchNorm; the sum is
not already written that way.  Only ``add``: a ``sub`` keeps its place.
"""

from __future__ import annotations

from repalgebra.ir import Node, Value
from repalgebra.match import merged_source, merges_free, producer, reach, sole_use
from repalgebra.rules.registry import Rewrite, rule


def _terms(graph, value: Value, root: bool = False) -> list[Value]:
    """The terms of the add tree at ``value``, left to right (inner adds read only by their sum)."""
    n = producer(value, "add")
    if n is None or (not root and not sole_use(graph, value)):
        return [value]
    return [t for v in n.inputs for t in _terms(graph, v)]


def _branch_of(term: Value) -> tuple | None:
    """What ``term`` is a branch of, where it may merge with others of the same: ``(input, stride, reach)`` (a BN,
    a channel scale or the input itself is a 1x1 conv: stride 1, reach 0)."""
    n = term.producer
    if n is not None and n.op == "conv2d":
        return id(n.x), n.attrs["stride"], reach(n)
    if n is not None and (n.op == "batch_norm" or (n.op == "scale" and n.attrs["axis"] in (1, -3))):
        return id(n.x), (1, 1), (0, 0)
    return (id(term), (1, 1), (0, 0)) if term.shape is not None and len(term.shape) == 4 else None


def _merges(group: list[Value]) -> bool:
    return len(group) > 1 and any(t.producer is not None and t.producer.op in ("conv2d", "batch_norm") for t in group)


@rule("sum_regroup", on="add")
def sum_regroup(graph, root):
    readers = graph.users(root.out)
    if len(readers) == 1 and readers[0].op == "add" and sole_use(graph, root.out):
        return None  # an inner add: the tree's root regroups it whole
    terms = _terms(graph, root.out, root=True)
    keys = [_branch_of(t) or ("term", k) for k, t in enumerate(terms)]
    groups: dict[tuple, list[int]] = {}
    for k, key in enumerate(keys):
        groups.setdefault(key, []).append(k)  # positions: one value may be a term twice (x + conv(x) + x)
    merging = {key: _conv_first(root, [terms[k] for k in ks]) for key, ks in groups.items() if _merges([terms[k] for k in ks])}
    units = [merging[key] if key in merging else [terms[k]] for k, key in enumerate(keys)
             if key not in merging or groups[key][0] == k]
    if not merging or _tree(graph, root.out, root=True) == _left_deep([_left_deep([id(t) for t in u]) for u in units]):
        return None  # nothing merges, or the sum is written so already
    nodes: list[Node] = []

    def added(values: list[Value], source: str) -> Value:
        total = values[0]
        for v in values[1:]:
            nodes.append(root.replace(inputs=(total, v), source=source))
            total = nodes[-1].out
        return total

    # A group's adds are named after its branches (a block's convs keep the block's path when a skip connection's
    # add is the root of the tree), the adds of the groups after the root.
    inner = [added(u, merged_source(*(t.producer for t in u if t.producer is not None)) or root.source) for u in units]
    return Rewrite(root.out, added(inner, root.source), tuple(nodes))


def _conv_first(root: Node, group: list[Value]) -> list[Value]:
    """``group`` with its first conv or BN first (a skip or scale added first would meet no conv to become one),
    and the costly convs last: a dilated one, or a grouped one beside a dense one, whose merge with a dense conv
    costs more than the two (and is refused) and would otherwise stop the cheap merges after it
    (``dw(x) + pw(x) + bn(x)`` is summed ``(pw(x) + bn(x)) + dw(x)``: the BN becomes part of the 1x1)."""
    dense = any(_conv(t) is not None and _conv(t).attrs["groups"] == 1 for t in group)
    costly = [t for t in group if (n := _conv(t)) is not None and (n.attrs["dilation"] != (1, 1) or (dense and n.attrs["groups"] > 1))
              and not any(merges_free(root, n, c) for u in group if (c := _conv(u)) is not None and c is not n)]
    group = [t for t in group if not any(t is c for c in costly)] + costly
    k = next(k for k, t in enumerate(group) if t.producer is not None and t.producer.op in ("conv2d", "batch_norm"))
    return [group[k], *group[:k], *group[k + 1:]]


def _conv(term: Value) -> Node | None:
    n = term.producer
    return n if n is not None and n.op == "conv2d" else None


def _tree(graph, value: Value, root: bool = False):
    """The add tree at ``value`` as nested pairs of its terms' ids."""
    n = producer(value, "add")
    if n is None or (not root and not sole_use(graph, value)):
        return id(value)
    return tuple(_tree(graph, v) for v in n.inputs)


def _left_deep(items: list):
    """``((i0, i1), i2), ...``: how ``added`` sums ``items``."""
    total = items[0]
    for item in items[1:]:
        total = (total, item)
    return total
