"""The interpreter: run a graph on tensors with the op table's reference semantics."""

from __future__ import annotations

import torch

from repalgebra.ir import Graph
from repalgebra.ops import op_def


def run_graph(graph: Graph, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Evaluate ``graph`` on ``inputs`` (any float dtype; parameters are cast to it).

    Returns the single output, or a tuple when the graph has several.
    """
    if len(inputs) != len(graph.inputs):
        raise TypeError(f"graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env: dict[int, torch.Tensor] = {id(v): t for v, t in zip(graph.inputs, inputs)}
    for n in graph.nodes:
        try:
            args = [env[id(i)] for i in n.inputs]
        except KeyError:
            raise ValueError(f"{n.op} at {n.source or '<graph>'} reads a value computed later; graph not sorted") from None
        env[id(n.out)] = op_def(n.op)(args, n.attrs, n.params)
    outs = tuple(env[id(o)] for o in graph.outputs)
    return outs[0] if len(outs) == 1 else outs
