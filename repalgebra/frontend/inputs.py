"""The model and its example inputs: what fusion accepts, and a plausible input when none is given.

:func:`check_model` rejects models fusion cannot handle, :func:`check_example_inputs`
inputs that do not fit ``forward``; :func:`infer_example_inputs` guesses one
input from the first Conv/Linear/BatchNorm the model calls.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import fx, nn

from repalgebra.frontend.fx_trace import Root, Tracer

DEFAULT_SIZE = 64  # spatial size of an inferred image input


def check_model(model: nn.Module) -> None:
    """Reject models fusion cannot handle: non-float parameters (``TypeError``), NaN/Inf values (``ValueError``).

    Integer buffers (``num_batches_tracked``) are allowed; floating-point
    buffers (BN statistics) must be finite like parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}: only floating-point models can be fused")
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"parameter {name!r} contains NaN or Inf")
    for name, b in model.named_buffers():
        if b.is_complex():
            raise TypeError(f"buffer {name!r} has dtype {b.dtype}: only floating-point models can be fused")
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise ValueError(f"buffer {name!r} contains NaN or Inf")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 when it has none)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def as_tuple(example_inputs: Any) -> tuple:
    """``example_inputs`` (a tensor, or a tuple or list of them) as a tuple."""
    if torch.is_tensor(example_inputs):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def check_example_inputs(model: nn.Module, given: tuple, n_inputs: int) -> None:
    """Raise ``TypeError`` unless ``given`` are ``n_inputs`` floating-point tensors."""
    for k, t in enumerate(given):
        if not torch.is_tensor(t):
            raise TypeError(f"example input {k} is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise TypeError(f"example input {k} has dtype {t.dtype}: inputs must be floating point")
    if len(given) != n_inputs:
        raise TypeError(f"{type(model).__name__}.forward takes {n_inputs} tensor inputs, got {len(given)} example inputs")


def infer_example_inputs(
    model: nn.Module, fx_graph: fx.Graph | None = None, n_inputs: int = 1
) -> tuple[tuple[torch.Tensor, ...], str]:
    """A plausible single random input for ``model`` and a sentence saying how it was chosen.

    The model itself if it is a Conv/Linear/BatchNorm, else the first such
    module the traced model calls (in module order when it cannot be traced)
    decides: ``1 x in_channels x 64 x 64`` for a Conv2d, ``1 x in_features``
    for a Linear, ``1 x C x 64 x 64`` for a BatchNorm2d, and so on.  Raises
    ``ValueError`` when there is none or the model takes several inputs.
    """
    if n_inputs != 1:
        raise ValueError(f"{type(model).__name__}.forward takes {n_inputs} inputs: pass example_inputs")
    root = model.m if isinstance(model, Root) else model
    candidates: Iterable[tuple[str, nn.Module]] = [("", root)]
    if fx_graph is None:
        try:
            fx_graph = Tracer((), set()).trace(copy.deepcopy(root).eval())
        except Exception:
            candidates = [*candidates, *root.named_modules()]
    if fx_graph is not None:
        calls = [n.target for n in fx_graph.nodes if n.op == "call_module"]
        candidates = [*candidates, *((p, model.get_submodule(p)) for p in calls)]
    dtype = model_dtype(model)
    for path, m in candidates:
        shape = _input_shape_for(m)
        if shape is not None:
            path = path.removeprefix("m.") if isinstance(model, Root) else path
            where = f" {path!r}" if path else ""
            how = f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} from {type(m).__name__}{where}"
            return (torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype),), how
    raise ValueError(
        f"cannot infer an input shape for {type(root).__name__}: it calls no Conv2d, Linear or BatchNorm; pass example_inputs"
    )


def _input_shape_for(m: nn.Module) -> tuple[int, ...] | None:
    s = DEFAULT_SIZE
    if isinstance(m, nn.Conv2d):
        return (1, m.in_channels, s, s)
    if isinstance(m, nn.Conv1d):
        return (1, m.in_channels, s)
    if isinstance(m, nn.Conv3d):
        return (1, m.in_channels, 16, 16, 16)
    if isinstance(m, nn.Linear):
        return (1, m.in_features)
    if isinstance(m, nn.BatchNorm2d):
        return (1, m.num_features, s, s)
    if isinstance(m, nn.BatchNorm1d):
        return (1, m.num_features)
    return None
