"""``repalgebra.fuse(model)``: trace, rewrite to a fixpoint, build a new module.

    fused = repalgebra.fuse(model)      # new nn.Module in eval mode; model untouched
    print(fused.fuse_report)            # what folded where, what was left alone and why

Fusion folds *eval-mode* semantics (BatchNorm with its running statistics,
dropout as the identity) whatever mode the model is in; the model itself is
never changed (parameters, buffers and ``training`` flags stay bit for bit).
All folding arithmetic runs in float64 on the CPU; a float16/bfloat16 model's
folded weights are cast back to its dtype once, at the end, and the fused
module is moved to the model's device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from repalgebra.backend.torch import to_module
from repalgebra.frontend.torch import trace_model
from repalgebra.rewrite import Firing, LeftAlone, RewriteReport, rewrite

__all__ = ["fuse", "FuseReport"]


@dataclass
class FuseReport:
    """What :func:`fuse` did: rules fired where, what was left alone and why, counts before and after."""

    fired: list[Firing] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0  # parameter elements of the model (nn.Module.parameters)
    params_after: int = 0
    buffers_before: int = 0  # buffer elements (BN statistics, layer-scale constants)
    buffers_after: int = 0
    opaque: list[str] = field(default_factory=list)  # sources of nodes carried through unchanged
    notes: list[str] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # trace / rewrite / build

    def rule_counts(self) -> dict[str, int]:
        """How often each rule fired, most frequent first."""
        return RewriteReport(fired=self.fired).rule_counts()

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        lines = [f"fuse: {len(self.fired)} rewrites in {self.seconds:.3f}s (traced at {shapes}; eval-mode semantics)"]
        lines += [f"  note: {n}" for n in self.notes]
        ops = sorted(set(self.ops_before) | set(self.ops_after))
        w = max([len(o) for o in ops] + [len("parameters")])
        lines.append(f"  {'':<{w}}  {'before':>9}  {'after':>9}")
        for o in ops:
            lines.append(f"  {o:<{w}}  {self.ops_before.get(o, 0):>9}  {self.ops_after.get(o, 0):>9}")
        lines.append(f"  {'parameters':<{w}}  {self.params_before:>9}  {self.params_after:>9}")
        lines.append(f"  {'buffers':<{w}}  {self.buffers_before:>9}  {self.buffers_after:>9}")
        if self.fired:
            lines.append("  rules fired:")
            for name, n in self.rule_counts().items():
                where = sorted({f.source or "<graph>" for f in self.fired if f.rule == name})
                shown = ", ".join(where[:4]) + (f", ... ({len(where) - 4} more)" if len(where) > 4 else "")
                lines.append(f"    {name:<20} x{n:<4} at {shown}")
        if self.left_alone:
            lines.append("  left alone:")
            for la in self.left_alone:
                lines.append(f"    {la.op} at {la.source or '<graph>'}: {la.reason}")
        if self.opaque:
            shown = ", ".join(self.opaque[:6]) + (f", ... ({len(self.opaque) - 6} more)" if len(self.opaque) > 6 else "")
            lines.append(f"  carried through unchanged ({len(self.opaque)}): {shown}")
        return "\n".join(lines)


def fuse(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[Any] = (),
) -> nn.Module:
    """Fold every foldable region of ``model`` and return a new module in eval mode.

    Args:
        model: any ``torch.fx``-traceable module, in train or eval mode; it is
            not modified.  Fusion uses eval-mode semantics (BN running
            statistics, no dropout).
        example_inputs: a tensor or tuple of tensors used once to learn shapes;
            inferred from the first Conv2d/Linear/BatchNorm when ``None`` (see
            :func:`repalgebra.trace`).
        leaf_modules: module classes, instances or dotted paths to carry
            through whole, e.g. ``leaf_modules=(MyBlock,)`` for a block whose
            ``forward`` has data-dependent control flow.

    Returns:
        A ``torch.fx.GraphModule`` in eval mode whose fused regions are plain
        ``nn.Conv2d``/``nn.Linear`` modules named after their source paths;
        its ``fuse_report`` attribute is a :class:`FuseReport`.  Fusing it
        again changes nothing.

    Raises:
        ValueError: NaN or Inf in a parameter or buffer (named).
        TypeError: non-floating-point parameters or inputs, or a module
            ``torch.fx`` cannot trace (named, with the ``leaf_modules`` fix).
    """
    start = time.perf_counter()
    traced = trace_model(model, example_inputs, leaf_modules=leaf_modules)
    t_trace = time.perf_counter()
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    graph = traced.graph
    if device.type != "cpu":  # fold on the CPU (the rules build their constants there), move back at the end
        graph = graph.map_params(lambda p, n: p.cpu())
    graph, rw = rewrite(graph)
    t_rewrite = time.perf_counter()
    fused = to_module(graph, output_spec=traced.output_spec, class_name=f"Fused{type(model).__name__}").to(device)
    report = FuseReport(
        fired=list(rw.fired),
        left_alone=[*traced.left_alone, *rw.left_alone],
        ops_before=rw.before,
        ops_after=rw.after,
        params_before=_numel(model.parameters()),
        params_after=_numel(fused.parameters()),
        buffers_before=_numel(b for b in model.buffers() if b.is_floating_point()),
        buffers_after=_numel(b for b in fused.buffers() if b.is_floating_point()),
        opaque=[n.source or "<graph>" for n in graph.nodes if n.op == "opaque"],
        notes=traced.notes,
        input_shapes=[tuple(t.shape) for t in traced.example_inputs],
    )
    end = time.perf_counter()
    report.seconds = end - start
    report.stage_seconds = {"trace": t_trace - start, "rewrite": t_rewrite - t_trace, "build": end - t_rewrite}
    fused.fuse_report = report
    return fused.eval()


def _numel(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)
