"""Build graphs by hand: ``b.conv2d(x, weight=w, padding=(1, 1, 1, 1))`` for any op in the table.

    b = GraphBuilder()
    x = b.input("x", (1, 8, 16, 16))
    y = b.add(b.conv2d(x, weight=w3, padding=(1, 1, 1, 1)), b.batch_norm(x, mean=m, var=v, weight=g, bias=beta))
    graph = b.build(y)

Keyword arguments are split into the op's parameters (tensors) and attributes
by the op table; ``source=`` sets the node's source path.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from repalgebra.ir import Graph, Node, Value
from repalgebra.ops import op_def


class GraphBuilder:
    """Accumulates nodes in order; each op of the table is a method."""

    def __init__(self) -> None:
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []

    def input(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Value:
        """Add a graph input."""
        v = Graph.input(name, shape, dtype)
        self.inputs.append(v)
        return v

    def node(self, op: str, *inputs: Value, source: str = "", **kwargs: Any) -> Value:
        """Add a node of ``op`` and return its output value."""
        d = op_def(op)
        names = set(d.params) | set(d.optional_params)
        params = {k: v for k, v in kwargs.items() if k in names and v is not None}
        attrs = {k: v for k, v in kwargs.items() if k not in names}
        n = Node.make(op, inputs, attrs, params, source)
        self.nodes.append(n)
        return n.out

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)
        op_def(op)  # unknown op -> KeyError listing the known ones
        return lambda *inputs, **kwargs: self.node(op, *inputs, **kwargs)

    def build(self, *outputs: Value) -> Graph:
        """The graph computing ``outputs``."""
        return Graph(self.inputs, self.nodes, outputs)
