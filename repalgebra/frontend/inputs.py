"""The model and its example inputs: what fusion accepts, and a plausible input when none is given.

:func:`check_model` rejects models fusion cannot handle, :func:`check_example_inputs`
inputs that do not fit ``forward``; :func:`infer_example_inputs` guesses one
input from the first Conv/Linear/BatchNorm the model calls.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import fx, nn

from repalgebra.frontend.capture import first_line
from repalgebra.frontend.fx_trace import Root, Tracer
from repalgebra.frontend.module_globals import globals_kept
from repalgebra.module_copy import copy_module, in_eval

DEFAULT_SIZE = 64  # spatial size of an inferred image input


def shapes_and_dtypes(xs: Iterable[Any]) -> str:
    """``1x3x8x8 float32, 2x12 int64``: the shapes and dtypes of the tensors (or IR values) among ``xs``."""
    return ", ".join(f"{'x'.join(map(str, t.shape))} {str(t.dtype).removeprefix('torch.')}" for t in xs
                     if hasattr(t, "shape") and hasattr(t, "dtype"))


def batch_plus_one(inputs: tuple, batch: int | None = None) -> tuple:
    """``inputs`` at the batch one larger: each tensor with its first row appended (other values as they are).
    With ``batch``, only the tensors whose first size it is (an ONNX file's batch is its first input's axis 0: an
    ``(L, L)`` attention mask beside ``(B, L, C)`` tokens is shared by the batch and stays as it is)."""
    return tuple(torch.cat([t, t[:1]]) if _batched(t, batch) else t for t in inputs)


def batch_of_one(inputs: tuple, batch: int | None = None) -> tuple:
    """``inputs`` at batch 1: each tensor's first row (other values as they are; ``batch``: see :func:`batch_plus_one`)."""
    return tuple(t[:1] if _batched(t, batch) else t for t in inputs)


def _batched(t: Any, batch: int | None) -> bool:
    """Whether ``t`` holds a row per sample: a tensor with a first axis (of size ``batch``, where given)."""
    return torch.is_tensor(t) and t.dim() > 0 and (batch is None or t.shape[0] == batch)


def check_model(model: nn.Module) -> None:
    """Reject models fusion cannot handle: not a module, a TorchScript module, tensors on the 'meta' device, lazy
    modules that have not made their parameters, non-float parameters or complex buffers (``TypeError``).

    Integer buffers (``num_batches_tracked``) are allowed.  NaN and Inf are
    allowed too (a clamp bound of ``-inf``, say): the rewrite engine only
    refuses to fold a weight that is not finite, and reports it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"the model is a TorchScript module ({type(model).__name__}): its Python code is compiled away, "
                        "so it cannot be captured; fuse the nn.Module first, then script or trace the fused module")
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise TypeError(f"{repr(path) if path else 'the model'} ({type(m).__name__}) has not made its parameters yet: its first call "
                            "makes them, at random, so a model fused before that call would hold other weights than the "
                            "model after it; call the model once (or load its weights), then fuse it")
        if (m._forward_pre_hooks or m._forward_hooks) and _copies_itself(type(m)) and _loses_hooks(m):
            raise TypeError(f"{repr(path) if path else 'the model'} ({type(m).__name__}) has hooks of its own that a copy of it loses (its class "
                            "copies itself without them, as torch.compile's OptimizedModule does), and fuse runs copies: "
                            "register them on a module it calls, or fuse first and add them to the fused module")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise TypeError(f"{name!r} is on the 'meta' device, which holds no values: load the weights first "
                            "(model.load_state_dict(state, assign=True), or model.to_empty(device=...) and then load)")
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}: only floating-point models can be fused")
    # (A complex buffer, a RoPE ``freqs_cis``, is a constant like any other: the fused model holds it as its real view.)


_EXPORT_HOOKS = "torch.export._unlift"  # where the hooks of ExportedProgram.module() are defined


def _copies_itself(cls: type) -> bool:
    """Whether ``cls`` changes how ``copy.deepcopy`` copies a module (its own ``__reduce__``, ``__setstate__``, ...)."""
    names = ("__reduce__", "__reduce_ex__", "__getstate__", "__setstate__", "__deepcopy__", "__copy__")
    return any(getattr(cls, name, None) is not getattr(nn.Module, name, None) for name in names)


def _loses_hooks(m: nn.Module) -> bool:
    """Whether a deep copy of ``m`` drops forward hooks or pre-hooks ``m`` has, other than torch.export's own on the
    module ``ExportedProgram.module()`` gives: a check of its inputs' sizes, and a switch for graph inputs that are
    modules, which compute nothing (fuse refused the standard PyTorch 2 artifact, asking for hooks to be moved that
    the user never registered; found by a probe)."""
    c = copy_module(m)  # (a fused module's guards are installed again on its copy, under new handles: compare kinds)
    kinds = lambda hooks: sorted(type(h).__qualname__ for h in hooks.values() if getattr(h, "__module__", None) != _EXPORT_HOOKS)  # noqa: E731
    return kinds(c._forward_pre_hooks) != kinds(m._forward_pre_hooks) or kinds(c._forward_hooks) != kinds(m._forward_hooks)


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
    """Raise ``TypeError`` unless ``given`` are ``n_inputs`` real tensors.

    Floating-point inputs carry the data; bool and integer ones (a padding mask, token ids, class labels) are
    passed as they are, never cast or replaced by random values."""
    for k, t in enumerate(given):
        if not torch.is_tensor(t):
            raise TypeError(f"example input {k} is a {type(t).__name__}, not a tensor")
        if t.is_complex():
            raise TypeError(f"example input {k} has dtype {t.dtype}: complex inputs are not supported")
    if len(given) != n_inputs:
        raise TypeError(f"{type(model).__name__}.forward takes {n_inputs} tensor inputs, got {len(given)} example inputs")


def infer_example_inputs(
    model: nn.Module, fx_graph: fx.Graph | None = None, n_inputs: int = 1, size: int = DEFAULT_SIZE
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
            work = in_eval(copy_module(root))
            with globals_kept(work, refuse=False):  # (only its calls are read: a store it made is put back)
                fx_graph = Tracer((), set()).trace(work)
        except Exception:
            candidates = [*candidates, *root.named_modules()]
    if fx_graph is not None:
        calls = [n.target for n in fx_graph.nodes if n.op == "call_module"]
        candidates = [*candidates, *((p, model.get_submodule(p)) for p in calls)]
    dtype = model_dtype(model)
    for path, m in candidates:
        shape = _input_shape_for(m, size)
        if shape is not None:
            path = path.removeprefix("m.") if isinstance(model, Root) else path
            where = f" {path!r}" if path else ""
            how = f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} from {type(m).__name__}{where}"
            return (torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype),), how
    raise ValueError(
        f"cannot infer an input shape for {type(root).__name__}: it calls no Conv2d, Linear or BatchNorm; pass example_inputs (the CLI's --input-shape and --input-dtype)"
    )


def _input_shape_for(m: nn.Module, s: int = DEFAULT_SIZE) -> tuple[int, ...] | None:
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


def configured_input(model: nn.Module) -> tuple[tuple[torch.Tensor, ...], str] | None:
    """The input size a model-zoo model carries (``pretrained_cfg`` or ``default_cfg`` ``input_size``), batch 1."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) and s > 0 for s in size):
            shape = (1, *size)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(model_dtype(model))
            return (x,), f"{'x'.join(map(str, shape))} from model.{attr}['input_size']"
    return None


def example_inputs_for(model: nn.Module, example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], str | None]:
    """The example inputs to capture ``model`` (an eval-mode private copy) at, and how they were chosen.

    Given inputs are checked (floating-point tensors) and used as they are.
    Otherwise: the size the model carries (:func:`configured_input`), else a
    guess from its first Conv2d/Linear/BatchNorm at 64x64, then at 224x224;
    the first the model runs on wins.  ``ValueError`` when none runs, saying
    what was tried and how to pass an input.
    """
    if example_inputs is not None:
        given = as_tuple(example_inputs)
        check_example_inputs(model, given, len(given))
        return given, None
    configured = configured_input(model)
    tried: list[str] = []
    candidates = [configured] if configured else []
    for size in (DEFAULT_SIZE, 224):
        try:
            candidates.append(infer_example_inputs(model, size=size))
        except ValueError as e:
            if not candidates:
                raise
            tried.append(str(e))
            break
    for inputs, how in candidates:
        try:
            with torch.no_grad():
                model(*[t.clone() for t in inputs])
            return inputs, how
        except Exception as e:  # noqa: BLE001  (any failure means: not this size)
            tried.append(f"{how}: {first_line(e)}")
    raise ValueError(
        f"cannot find an input {type(model).__name__} runs on (tried {'; '.join(tried)}); pass one, "
        f"e.g. repalgebra.fuse(model, torch.randn(1, 3, 224, 224))  # example_inputs: the shape you run it at "
        "(token ids for a language model; the CLI's --input-shape and --input-dtype)"
    )
