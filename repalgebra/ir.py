"""The IR: a small dataflow graph of ops over tensors.

A :class:`Graph` holds input :class:`Value` s, a topologically ordered list of
:class:`Node` s and output values.  Every node has exactly one output value
(``node.out``).  A node carries

* ``op``: a name in the op table (:mod:`repalgebra.ops`),
* ``inputs``: the values it reads,
* ``attrs``: hashable attributes (ints, floats, strings, tuples),
* ``params``: named parameter tensors (weights, BN statistics, ...),
* ``source``: the module path it came from, used in messages and reports.

Shapes and dtypes are inferred when a node is made (``Node.make``) from the op
table, so every value knows its shape.  Graphs are small; clarity beats
cleverness.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

_ids = itertools.count()


@dataclass(eq=False)
class Value:
    """A tensor flowing along an edge: a graph input or the output of a node."""

    name: str
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    producer: "Node | None" = None

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclass(eq=False)
class Node:
    """One op application.  Treat as immutable: rewrites build new nodes."""

    op: str
    inputs: tuple[Value, ...]
    attrs: Mapping[str, Any]
    params: Mapping[str, torch.Tensor]
    source: str
    out: Value = field(init=False)

    @staticmethod
    def make(
        op: str,
        inputs: Sequence[Value],
        attrs: Mapping[str, Any] | None = None,
        params: Mapping[str, torch.Tensor] | None = None,
        source: str = "",
        name: str | None = None,
    ) -> "Node":
        """Build a node, filling in attribute defaults and inferring its output shape."""
        from repalgebra.ops import OPS, op_def

        opdef = op_def(op)
        full_attrs = opdef.complete_attrs(dict(attrs or {}), source)
        node = Node(op, tuple(inputs), full_attrs, dict(params or {}), source)
        shape, dtype = opdef.infer(node)
        node.out = Value(name or f"{op}{next(_ids)}", shape, dtype, node)
        assert op in OPS
        return node

    def replace(self, **changes: Any) -> "Node":
        """A new node like this one with some of op/inputs/attrs/params/source changed."""
        fields = dict(op=self.op, inputs=self.inputs, attrs=self.attrs, params=self.params, source=self.source)
        if "attrs" in changes:
            changes["attrs"] = {**self.attrs, **changes["attrs"]}
        fields.update(changes)
        return Node.make(**fields)

    @property
    def x(self) -> Value:
        """The first input (most ops have one)."""
        return self.inputs[0]

    def __repr__(self) -> str:
        return f"Node({self.op} -> {self.out!r}, source={self.source!r})"


class Graph:
    """A dataflow graph: inputs, topologically ordered nodes, outputs."""

    def __init__(self, inputs: Sequence[Value], nodes: Sequence[Node], outputs: Sequence[Value]):
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        # Indexes kept up to date by the mutating methods below (built on first use):
        # readers of each value (id -> {id(node): node}, in order of arrival), the member nodes
        # (id -> node) and an order key per member (id -> float, increasing along ``nodes``),
        # with a lower bound for keys inserted just before it (``_lo``).  Between the
        # engine's edits the keys, not the list, say the order: inserting and removing
        # nodes is O(1), and ``nodes`` is rebuilt from the keys when next read.
        self._users: dict[int, dict[int, Node]] | None = None
        self._members: dict[int, Node] | None = None
        self._key: dict[int, float] = {}
        self._lo: dict[int, float] = {}
        self._nodes: list[Node] = list(nodes)
        self._stale = False  # ``_nodes`` lags behind the keys

    @property
    def nodes(self) -> list[Node]:
        """The nodes in topological order (a list; after changing it in place, call ``_changed``)."""
        if self._stale:
            self._nodes = sorted(self._members.values(), key=lambda n: self._key[id(n)])
            self._stale = False
        return self._nodes

    @nodes.setter
    def nodes(self, nodes: Sequence[Node]) -> None:
        self._nodes = list(nodes)
        self._stale = False
        if self._members is not None:
            self._number()

    # -- construction -------------------------------------------------------------------

    @staticmethod
    def input(name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Value:
        """A new graph-input value."""
        return Value(name, tuple(shape), dtype, None)

    # -- queries ------------------------------------------------------------------------

    def _index(self) -> dict[int, dict[int, Node]]:
        if self._users is None:
            self._users, self._members = {}, {}
            for n in self.nodes:
                self._link(n)
            self._number()
        return self._users

    def _number(self) -> None:
        """Order keys 0, 1, 2, ... along ``nodes``."""
        nodes = self.nodes
        self._key = {id(n): float(k) for k, n in enumerate(nodes)}
        self._lo = {id(n): k - 1.0 for k, n in enumerate(nodes)}

    def _keys_before(self, anchor: Node, count: int) -> list[float] | None:
        """``count`` increasing keys between the keys already before ``anchor`` and its own; None if floats run out."""
        lo, hi = self._lo[id(anchor)], self._key[id(anchor)]
        keys = [lo + (hi - lo) * (k + 1) / (count + 1) for k in range(count)]
        bounds = [lo, *keys, hi]
        return keys if all(a < b for a, b in zip(bounds, bounds[1:])) else None

    def _link(self, n: Node) -> None:
        for i in n.inputs:
            self._users.setdefault(id(i), {})[id(n)] = n
        self._members[id(n)] = n

    def _unlink(self, n: Node) -> None:
        for i in n.inputs:
            readers = self._users.get(id(i))
            if readers is not None:
                readers.pop(id(n), None)
        self._users.pop(id(n.out), None)
        del self._members[id(n)]
        del self._key[id(n)]
        self._lo.pop(id(n), None)
        self._stale = True

    def users(self, value: Value) -> list[Node]:
        """Nodes that read ``value`` (once each)."""
        return list(self._index().get(id(value), {}).values())

    def num_uses(self, value: Value) -> int:
        """How many nodes read ``value``, plus one if it is a graph output."""
        return len(self._index().get(id(value), ())) + sum(o is value for o in self.outputs)

    def contains(self, node: Node) -> bool:
        """Whether ``node`` is (still) part of this graph."""
        self._index()
        return id(node) in self._members

    def _changed(self) -> None:
        """Drop the indexes (after changing ``nodes`` or node inputs from outside these methods)."""
        self.nodes  # noqa: B018  (bring the list up to date first: it is the truth from here on)
        self._users = None
        self._members = None

    def op_counts(self) -> dict[str, int]:
        """How many nodes of each op the graph has."""
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def param_count(self) -> int:
        """Total number of parameter elements (BN statistics included)."""
        return sum(p.numel() for n in self.nodes for p in n.params.values())

    # -- transformation -----------------------------------------------------------------

    def toposort(self) -> None:
        """Reorder nodes topologically, keeping the current order where it is valid."""
        known = {id(v) for v in self.inputs}
        ready: list[Node] = []
        pending = list(self.nodes)
        while pending:
            rest = []
            for n in pending:
                if all(id(i) in known for i in n.inputs):
                    ready.append(n)
                    known.add(id(n.out))
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                missing = {i.name for n in rest for i in n.inputs if id(i) not in known}
                raise ValueError(f"graph has a cycle or dangling inputs: {sorted(missing)}")
            pending = rest
        self.nodes = ready  # same nodes and edges: the indexes stay valid (the order keys are renumbered)

    def insert_before(self, anchor: Node, new_nodes: Sequence[Node]) -> None:
        """Insert ``new_nodes`` just before ``anchor``, re-sorting if they read later values.

        O(len(new_nodes)): the new nodes get order keys between the anchor's and
        the keys inserted before it so far.
        """
        self._index()
        if id(anchor) not in self._members:
            raise ValueError(f"insert_before: {anchor!r} is not in the graph (removed by an earlier change?)")
        new_nodes = list(new_nodes)
        if not new_nodes:
            return
        keys = self._keys_before(anchor, len(new_nodes))
        if keys is None:  # the gap is used up (many inserts at one place): renumber, O(n), rare
            self._number()
            keys = self._keys_before(anchor, len(new_nodes))
        anchor_key = self._key[id(anchor)]
        new_outs: set[int] = set()
        ok = True
        for n in new_nodes:
            for i in n.inputs:
                p = i.producer
                if ok and p is not None and id(i) not in new_outs:
                    # read a value computed before the anchor (or not in the graph at all: re-sort reports it)
                    ok = id(p) in self._members and self._key[id(p)] < anchor_key
            new_outs.add(id(n.out))
        lo = self._lo[id(anchor)]
        for n, k in zip(new_nodes, keys):
            self._link(n)
            self._lo[id(n)], self._key[id(n)] = lo, k
            lo = k
        self._lo[id(anchor)] = lo
        self._stale = True
        if not ok:
            self.toposort()

    def eliminate_dead(self) -> int:
        """Drop nodes whose output nobody reads; returns how many were removed."""
        live = {id(o) for o in self.outputs}
        kept = []
        nodes = self.nodes
        for n in reversed(nodes):
            if id(n.out) in live:
                kept.append(n)
                live.update(id(i) for i in n.inputs)
        removed = len(nodes) - len(kept)
        if removed:
            self.nodes = kept[::-1]
            self._changed()
        return removed

    def eliminate_dead_from(self, candidates: Iterable[Node]) -> int:
        """Drop the ``candidates`` nobody reads, and then the producers that leaves unread.

        After a change that removed reads only from ``candidates`` (a rewrite:
        the replaced value's producer and the new nodes), this removes exactly
        what :meth:`eliminate_dead` would, without a pass over the whole graph.
        """
        self._index()
        stack = list(candidates)
        removed = 0
        while stack:
            n = stack.pop()
            if id(n) not in self._members or self.num_uses(n.out):
                continue
            self._unlink(n)
            removed += 1
            stack.extend(i.producer for i in n.inputs if i.producer is not None)
        return removed

    def replace_uses(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (and the graph outputs) read ``new`` instead.

        The one place where nodes are changed in place: the engine rewires the
        nodes of its own private copy of a graph.
        """
        readers = self._index().pop(id(old), {})
        for n in readers.values():
            n.inputs = tuple(new if i is old else i for i in n.inputs)
            self._users.setdefault(id(new), {})[id(n)] = n
        self.outputs = [new if o is old else o for o in self.outputs]

    def map_params(self, fn: Callable[[torch.Tensor, Node], torch.Tensor]) -> "Graph":
        """A new graph (new nodes and values) whose nodes carry ``fn(tensor, node)`` for every parameter."""
        mapping: dict[int, Value] = {id(v): v for v in self.inputs}
        nodes = []
        for n in self.nodes:
            new = Node.make(
                n.op,
                [mapping[id(i)] for i in n.inputs],
                n.attrs,
                {k: fn(p, n) for k, p in n.params.items()},
                n.source,
                name=n.out.name,
            )
            mapping[id(n.out)] = new.out
            nodes.append(new)
        return Graph(self.inputs, nodes, [mapping[id(o)] for o in self.outputs])

    # -- printing -----------------------------------------------------------------------

    def __str__(self) -> str:
        lines = []
        ins = ", ".join(f"%{v.name}: {_fmt_shape(v)}" for v in self.inputs)
        lines.append(f"graph({ins}):")
        rows = []
        for n in self.nodes:
            args = ", ".join(repr(i) for i in n.inputs)
            attrs = _fmt_attrs(n.attrs)
            params = " ".join(f"{k}{list(p.shape)}" for k, p in n.params.items())
            rows.append((f"%{n.out.name} = {n.op}({args})", attrs, params, _fmt_shape(n.out), n.source))
        if rows:
            w0 = max(len(r[0]) for r in rows)
            w3 = max(len(r[3]) for r in rows)
            for call, attrs, params, shape, source in rows:
                extra = " ".join(x for x in (attrs, params) if x)
                src = f"  # {source}" if source else ""
                lines.append(f"  {call:<{w0}}  : {shape:<{w3}}  {extra}{src}".rstrip())
        outs = ", ".join(repr(o) for o in self.outputs)
        lines.append(f"  return {outs}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Graph {len(self.nodes)} nodes {self.op_counts()}>"

    def show(self) -> None:
        """Print the readable text form."""
        print(self)

    def to_dot(self, title: str | None = None) -> str:
        """The graph in Graphviz DOT: one box per node (op, key attrs, shape, source)."""
        from repalgebra.ops import op_def

        def q(s: str) -> str:
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

        lines = ["digraph G {", '  rankdir=TB; node [fontname="Helvetica", fontsize=10];']
        if title:
            lines.append(f"  label={q(title)}; labelloc=t;")
        for v in self.inputs:
            lines.append(f"  {q(v.name)} [shape=oval, label={q(v.name + chr(10) + _fmt_shape(v))}];")
        for n in self.nodes:
            label = n.op
            key = _fmt_attrs(n.attrs, short=True)
            if key:
                label += "\n" + key
            if "weight" in n.params:
                label += "\nweight " + "x".join(map(str, n.params["weight"].shape))
            label += "\n" + _fmt_shape(n.out)
            if n.source:
                label += "\n" + n.source
            color = _KIND_COLORS[op_def(n.op).kind]
            lines.append(f"  {q(n.out.name)} [shape=box, style=filled, fillcolor={q(color)}, label={q(label)}];")
            for i in n.inputs:
                lines.append(f"  {q(i.name)} -> {q(n.out.name)};")
        for k, o in enumerate(self.outputs):
            lines.append(f"  {q('out' + str(k))} [shape=oval, label=\"output\"];")
            lines.append(f"  {q(o.name)} -> {q('out' + str(k))};")
        lines.append("}")
        return "\n".join(lines)


_KIND_COLORS = {"linear": "#dbe9f6", "layout": "#e8e8e8", "nonlinear": "#f6e3db", "opaque": "#f3f0c8"}


def _fmt_shape(v: Value) -> str:
    if v.shape is None:
        return "?"
    return "x".join(str(s) for s in v.shape)


def _fmt_attrs(attrs: Mapping[str, Any], short: bool = False) -> str:
    parts = []
    for k, v in attrs.items():
        if k.startswith("_"):
            continue
        if callable(v) and not isinstance(v, type):
            v = getattr(v, "__name__", type(v).__name__)
        if short and isinstance(v, tuple) and len(set(v)) == 1 and v:
            v = v[0]
        parts.append(f"{k}={v}")
    return " ".join(parts)


def walk_back(value: Value) -> Iterable[Node]:
    """The producers upstream of ``value`` (depth first, each once)."""
    return (v.producer for v in upstream(value) if v.producer is not None)


def upstream(value: Value, follow: Callable[[Node], Sequence[Value]] = lambda n: n.inputs) -> Iterable[Value]:
    """``value`` and the values upstream of it, each once (depth first): from a value's producer ``n`` into the inputs
    ``follow(n)`` names (all of them by default); a graph input has no producer and ends its path."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        yield v
        if v.producer is not None:
            stack.extend(follow(v.producer))
