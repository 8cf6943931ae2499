"""Pattern helpers the rules share: who produces a value, who reads it, conv geometry."""

from __future__ import annotations

from dataclasses import dataclass

from repalgebra.ir import Graph, Node, Value


def producer(value: Value, *ops: str) -> Node | None:
    """The node computing ``value`` if its op is one of ``ops`` (any op when none given)."""
    n = value.producer
    if n is None or (ops and n.op not in ops):
        return None
    return n


def sole_use(graph: Graph, value: Value) -> bool:
    """Whether exactly one node reads ``value`` and it is not a graph output."""
    return graph.num_uses(value) == 1


@dataclass(frozen=True)
class Window:
    """Where a conv's taps land in input coordinates, per axis: ``first`` offset, tap ``step``, tap ``count``."""

    stride: tuple[int, int]
    first: tuple[int, int]  # -padding_top, -padding_left
    step: tuple[int, int]  # dilation
    count: tuple[int, int]  # kernel size

    def last(self, axis: int) -> int:
        return self.first[axis] + (self.count[axis] - 1) * self.step[axis]


def window(conv: Node) -> Window:
    """The conv's tap window."""
    top, _, left, _ = conv.attrs["padding"]
    return Window(conv.attrs["stride"], (-top, -left), conv.attrs["dilation"], tuple(conv.params["weight"].shape[2:]))


def is_1x1_pointwise(conv: Node) -> bool:
    """A 1x1 conv with stride 1 and no padding: a per-pixel channel mix."""
    a = conv.attrs
    return conv.params["weight"].shape[2:] == (1, 1) and a["stride"] == (1, 1) and a["padding"] == (0, 0, 0, 0)


def branch_input(value: Value) -> Value:
    """The value a branch starts from: the input of a conv or BN, else the value itself (identity)."""
    n = producer(value, "conv2d", "batch_norm")
    return n.x if n is not None else value


JOINS = ("add", "sub", "concat")


def merged_source(*nodes: Node) -> str:
    """The source path for a node that replaces ``nodes``: their longest common dotted prefix.

    Without a common prefix it is the first node's source (the one the others fold into).
    """
    paths = [n.source.split(".") for n in nodes if n.source]
    if not paths:
        return ""
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or ".".join(paths[0])


def conv_with(conv: Node, *, sources: tuple[Node, ...] = (), inputs: tuple[Value, ...] | None = None, **changes) -> Node:
    """A new conv2d like ``conv`` with params/attrs (and maybe inputs) changed, its source merged with ``sources``."""
    params = dict(conv.params)
    for key in ("weight", "bias"):
        if key in changes:
            params[key] = changes.pop(key)
    if params.get("bias") is None:
        params.pop("bias", None)
    attrs = {**conv.attrs, **changes}
    return conv.replace(
        params=params, attrs=attrs, inputs=inputs or conv.inputs, source=merged_source(conv, *sources)
    )


def with_operands(join: Node, replaced: dict[int, Value]) -> Node:
    """A copy of ``join`` whose operands at the given positions are replaced."""
    inputs = tuple(replaced.get(k, v) for k, v in enumerate(join.inputs))
    return join.replace(inputs=inputs)


def conv_operands(join: Node) -> dict[tuple, list[tuple[int, Node]]]:
    """The conv2d operands of ``join`` grouped by (input value, stride): the ones that may be summed."""
    groups: dict[tuple, list[tuple[int, Node]]] = {}
    for k, v in enumerate(join.inputs):
        conv = producer(v, "conv2d")
        if conv is not None:
            groups.setdefault((id(conv.x), conv.attrs["stride"]), []).append((k, conv))
    return groups


def on_lattice(windows: list[Window]) -> bool:
    """Whether windows with one common tap step have their taps on one shared lattice."""
    step = windows[0].step
    return all(w.step == step for w in windows) and all(
        (w.first[a] - windows[0].first[a]) % step[a] == 0 for w in windows for a in (0, 1)
    )
