"""``repalgebra.verify(reference, candidate)``: compare two models on random inputs and report the numbers.

    report = repalgebra.verify(model, repalgebra.fuse(model), dtype=torch.float64)
    print(report)        # a small table: max abs / relative error per output, tolerance, pass/fail
    assert report        # bool(report) is pass/fail

Errors are measured per output over all ``n`` inputs: the absolute error is
``max |ref - cand|`` and the relative error is that divided by ``max |ref|``
(the output's magnitude, so values near zero do not blow it up).  The
tolerance on the relative error follows the dtype the comparison runs in
(:data:`TOLERANCES`): float64 ``1e-9``, float32 ``1e-5``, float16 ``1e-2``,
bfloat16 ``3e-2`` (8 bits of mantissa); when the models' parameters are of a
coarser dtype than the run, theirs applies.  Outputs of different shapes, or with
NaN/Inf, fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from repalgebra.frontend.capture import first_line
from repalgebra.frontend.inputs import shapes_and_dtypes
from repalgebra.frontend.torch import infer_example_inputs, model_dtype
from repalgebra.module_copy import cast_floats, eval_copy

__all__ = ["verify", "VerifyReport", "OutputError", "TOLERANCES", "first_difference", "tensor_leaves"]

TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}
"""Relative tolerance per dtype the comparison runs in (bfloat16: 8 bits of mantissa)."""


@dataclass
class OutputError:
    """The errors of one output (one leaf of the output structure), maxima over all inputs."""

    index: int
    shape: tuple[int, ...]
    max_abs: float = 0.0
    max_rel: float = 0.0
    problem: str = ""  # shape mismatch, NaN, ...

    def passed(self, tolerance: float) -> bool:
        """Whether this output is within ``tolerance`` (relative) and has no problem."""
        return not self.problem and self.max_rel <= tolerance


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`; ``bool(report)`` is pass/fail and ``str(report)`` a small table."""

    outputs: list[OutputError] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    tolerance: float = 1e-5
    n: int = 0
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    problem: str = ""  # a mismatch of the output structure

    @property
    def passed(self) -> bool:
        """Every output within tolerance and the output structures equal."""
        return not self.problem and bool(self.outputs) and all(o.passed(self.tolerance) for o in self.outputs)

    @property
    def max_rel(self) -> float:
        """The largest relative error over all outputs."""
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def max_abs(self) -> float:
        """The largest absolute error over all outputs."""
        return max((o.max_abs for o in self.outputs), default=0.0)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        dtype = str(self.dtype).replace("torch.", "")
        lines = [
            f"verify: {'PASS' if self.passed else 'FAIL'} ({self.n} random inputs {shapes}, {dtype}, "
            f"tolerance {self.tolerance:.0e} relative)"
        ]
        if self.problem:
            lines.append(f"  {self.problem}")
        rows = [("output", "shape", "max abs err", "max rel err", "ok")]
        for o in self.outputs:
            ok = "yes" if o.passed(self.tolerance) else f"NO {o.problem}".rstrip()
            rows.append((str(o.index), "x".join(map(str, o.shape)) or "scalar", f"{o.max_abs:.2e}", f"{o.max_rel:.2e}", ok))
        widths = [max(len(r[k]) for r in rows) for k in range(5)]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return "\n".join(lines)


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
    *,
    n: int = 3,
    dtype: torch.dtype | None = None,
    tolerance: float | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Run ``reference`` and ``candidate`` on ``n`` random inputs and report their differences.

    Args:
        reference: the model to compare against (usually the unfused one).
        candidate: the model under test (usually ``fuse(reference)``).
        example_inputs: a tensor, or a tuple of the arguments, each a tensor
            or a list, tuple or dict of tensors (as :func:`~repalgebra.fuse`
            takes them), giving the input shapes and dtypes (the values of
            floating-point ones are not used; bool and integer ones, a mask or
            token ids, are used as given); a shape (a tuple of ints) stands for
            one input of that shape in the reference's dtype; inferred from the
            reference's first Conv2d/Linear/BatchNorm as in
            :func:`repalgebra.trace` when ``None``.
        n: how many random (standard normal) inputs to try.
        dtype: run both models in this dtype (e.g. ``torch.float64`` to see
            the fusion's own error without float32 rounding).  Deep copies are
            cast; the caller's modules are never changed.
        tolerance: the relative-error bound; by default :data:`TOLERANCES`
            of the dtype the comparison runs in or of the models' own
            parameters, whichever is coarser (a float32 model fused in float64
            has its folded weights rounded to float32, so comparing it in
            float64 measures float32 rounding: tolerance 1e-5).
        seed: seed of the random inputs.

    Both models are evaluated in eval mode under ``torch.no_grad()``, each as a
    deep copy (switched to eval where it trains): a model that keeps state
    between calls is never changed.

    Raises:
        TypeError: a model that is not an ``nn.Module``, a ``dtype`` that is not a
            floating-point ``torch.dtype``.
        ValueError: ``n`` below 1 or a ``tolerance`` that is not positive; a
            model that fails on an input (which one, on which shapes, and why).
    """
    for name, m in (("reference", reference), ("candidate", candidate)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"verify: the {name} must be an nn.Module, got {type(m).__name__}"
                            + (" (a path: load the model first)" if isinstance(m, str) else ""))
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"verify: dtype must be a floating-point torch.dtype (torch.float64, ...), got {dtype!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"verify: n is the number of random inputs to try, 1 or more; got {n!r}")
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"verify: tolerance must be a positive relative error bound, got {tolerance!r}")
    if example_inputs is None:
        example, _ = infer_example_inputs(reference)
    elif isinstance(example_inputs, (tuple, list)) and example_inputs and all(type(d) is int for d in example_inputs):
        example = (torch.zeros(tuple(example_inputs), dtype=model_dtype(reference)),)  # a shape, as export_onnx takes one
    else:
        example = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    leaves = [t for t in pytree.tree_leaves(example) if torch.is_tensor(t)]  # (an argument may be a list or dict of them)
    run_dtype = dtype or next((t.dtype for t in leaves if t.is_floating_point()), None) or model_dtype(reference)
    if not run_dtype.is_floating_point:
        raise TypeError(f"verify compares floating-point models; got dtype {run_dtype}")
    if tolerance is None:  # the coarser of the run's dtype and the models' own
        tolerance = max(TOLERANCES.get(d, 1e-5) for d in {run_dtype, *_param_dtypes(reference), *_param_dtypes(candidate)})
    ref, cand = (_prepared(m, dtype) for m in (reference, candidate))
    report = VerifyReport(
        dtype=run_dtype,
        tolerance=tolerance,
        n=n,
        input_shapes=[tuple(t.shape) for t in leaves],
    )
    gen = torch.Generator().manual_seed(seed)

    def drawn(t: Any) -> Any:  # a mask or token ids: the example's own
        if not (torch.is_tensor(t) and t.is_floating_point()):
            return t
        return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype or t.dtype)

    for _ in range(n):
        xs = list(pytree.tree_map(drawn, example))
        ya, spec_a = pytree.tree_flatten(_fields(_called("reference", ref, xs)))
        yb, spec_b = pytree.tree_flatten(_fields(_called("candidate", cand, xs)))
        if spec_a != spec_b or len(ya) != len(yb):
            report.problem = f"output structures differ: {spec_a} vs {spec_b}"
            return report
        if not report.outputs:
            report.outputs = [OutputError(k, tuple(a.shape) if torch.is_tensor(a) else ()) for k, a in enumerate(ya)]
        for o, a, b in zip(report.outputs, ya, yb):
            _compare(o, a, b)
    return report


def _called(name: str, model: nn.Module, xs: list) -> Any:
    """``model(*xs)`` without gradients; a failure says which model failed, and on what."""
    try:
        with torch.no_grad():
            return model(*xs)
    except Exception as e:  # noqa: BLE001  (the model's own error, said with where it happened)
        shown = shapes_and_dtypes([t for t in pytree.tree_leaves(xs) if torch.is_tensor(t)])
        raise ValueError(f"verify: the {name} ({type(model).__name__}) fails on inputs {shown}: "
                         f"{first_line(e)}") from e


def _param_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}


def _prepared(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """An eval-mode (and ``dtype``-cast) deep copy of ``model``.  Always a copy: a model that keeps state between
    calls (a streaming block's previous frame, a call counter) came back from ``verify`` holding what its random
    inputs left, and the caller's next call computed with it (review R10)."""
    copied = eval_copy(model)
    return cast_floats(copied, dtype) if dtype is not None else copied


def _compare(o: OutputError, a: Any, b: Any) -> None:
    if isinstance(a, _Number) and isinstance(b, _Number):
        a, b = a.value, b.value
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        if a != b:
            o.problem = f"values differ: {a!r} vs {b!r}"
        return
    if a.shape != b.shape:
        o.problem = f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
        return
    if (kinds := _kinds(a, b)) is not None:
        o.problem = kinds
        return
    a64, b64 = _wide(a), _wide(b)
    if not (bool(torch.isfinite(a64).all()) and bool(torch.isfinite(b64).all())):
        o.problem = "NaN or Inf in an output"
        return
    if a.numel() == 0:
        return
    err, rel = _errors(a64, b64)
    o.max_abs = max(o.max_abs, err)
    o.max_rel = max(o.max_rel, rel)


def _kinds(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """What differs in kind between two outputs' dtypes (complex, floating point, integer or bool), else None: a
    precision is no kind (a part computing in float32 inside a float64 model)."""
    if _kind(a) == _kind(b):
        return None
    return f"dtypes differ: {_kind(b)} ({_dtype_name(b)}) where the original's is {_kind(a)} ({_dtype_name(a)})"


def _kind(t: torch.Tensor) -> str:
    return "complex" if t.is_complex() else "floating-point" if t.is_floating_point() else "bool" if t.dtype == torch.bool else "integer"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 to compare, a complex tensor as its real and imaginary parts (``.double()`` drops the
    imaginary part: a conjugate passed, 24 off; review R9)."""
    return torch.view_as_real(t.detach().to(torch.complex128).resolve_conj()) if t.is_complex() else t.detach().double()


def _errors(a64: torch.Tensor, b64: torch.Tensor) -> tuple[float, float]:
    """``max |a - b|`` and that relative to ``max |a|`` (the output's magnitude), for non-empty tensors."""
    err = (a64 - b64).abs().max().item()
    scale = a64.abs().max().item()
    return err, err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def _fields(out: Any, path: frozenset[int] = frozenset()) -> Any:
    """``out`` with every dataclass instance in it (a model's output record) as a dict of its fields, every dict
    of a class pytree does not know (``class Out(OrderedDict)``) as a dict of its items, their types kept, a
    ``torch.distributions`` object (an actor-critic's ``Categorical(logits=...)``) as a dict of what defines it,
    a Python float as a float64 tensor of one number (compared within the tolerance, as a tensor is), and an object
    whose class compares by identity (Hugging Face's ``DynamicCache``) as a dict of its attributes: equal outputs of
    two runs are two objects, which ``!=`` always told apart (a probe found every child of a part kept whole swapped
    back for it).  ``path``: the objects being opened around this one; one met again (a cache layer holding its
    cache) is its type's name, not opened again (a review found the recursion unbounded through a dataclass), and
    objects :data:`_DEPTH` deep are not opened (a chain of 400, ``hyp.prev``, ran out of Python's stack)."""

    def opened(x: Any, items: Any) -> Any:
        if id(x) in path:
            return f"<{type(x).__qualname__} holding itself>"
        if len(path) >= _DEPTH:  # (a beam search's chain of hypotheses: compared by identity below this depth)
            return x
        inner = path | {id(x)}
        return {"<type>": type(x).__qualname__, **{k: _fields(v, inner) for k, v in items}}

    def as_dict(x: Any) -> Any:
        if _compared_by_identity(x):  # (a distribution too: its parameters, and the lazy ones it has computed)
            return opened(x, sorted(vars(x).items()))
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return opened(x, [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)])
        if type(x) is float:
            return _Number(torch.tensor(x, dtype=torch.float64))
        if isinstance(x, dict) and type(x) not in pytree.SUPPORTED_NODES:
            return opened(x, x.items())
        return x

    return pytree.tree_map(as_dict, out)


_DEPTH = 32  # how deep output objects are opened


def _compared_by_identity(x: Any) -> bool:
    """Whether ``x`` is a plain Python object that ``==`` compares by identity: its class keeps object's ``__eq__``
    and it holds its attributes in a ``__dict__`` (not a module, class, function or other builtin)."""
    return (type(x).__eq__ is object.__eq__ and hasattr(x, "__dict__") and not isinstance(x, (type, nn.Module))
            and not callable(x) and type(x).__module__ != "builtins")


@dataclass(frozen=True)
class _Number:
    """A Python float of an output, as a tensor to compare (apart from a tensor output: a float is no tensor)."""

    value: torch.Tensor


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output in order: in tuples, lists and dicts, and in output records by their fields
    (a dataclass, an HF-style ``ModelOutput`` that pytree does not know)."""
    return [t for t in pytree.tree_leaves(_fields(out)) if torch.is_tensor(t)]


def named_tensor_leaves(out: Any) -> list[tuple[str, torch.Tensor]]:
    """:func:`tensor_leaves` with each one's place in the output as a name: the keys and fields that lead to it, joined
    by dots (``{"boxes": b, "aux": [a]}``: ``boxes``, ``aux.0``); a tensor alone is ``output``, and an item of a plain
    tuple or list ``output0``, ``output1`` ... (as ``export_onnx`` names its outputs)."""
    leaves = [(path, t) for path, t in pytree.tree_flatten_with_path(_fields(out))[0] if torch.is_tensor(t)]
    keyed = any(not isinstance(k, pytree.SequenceKey) for path, _ in leaves for k in path)
    if not keyed:
        return [("output" if len(leaves) == 1 else f"output{k}", t) for k, (_, t) in enumerate(leaves)]

    def step(k: Any) -> str:
        return str(k.key if isinstance(k, pytree.MappingKey) else k.idx if isinstance(k, pytree.SequenceKey) else k.name)

    return [(".".join(map(step, path)), t) for path, t in leaves]


def _structure(out: Any) -> str:
    """An output's structure in one line: ``Out(last_hidden_state, pooler_output)``, ``tuple of 2``, ``tensor``."""
    if torch.is_tensor(out):
        return "tensor"
    if isinstance(out, dict):
        return f"{type(out).__name__}({', '.join(map(str, out))})"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of {len(out)}"
    return type(out).__name__


def first_difference(reference: Any, candidate: Any, tolerance: float) -> str | None:
    """None when two model outputs agree within ``tolerance`` (relative), else a sentence naming the first that differs.

    Outputs are compared leaf by leaf (tuples, lists, dicts); NaN and Inf must
    sit at the same places with the same values (a model whose BN has an
    infinite statistic still gives the same output when fused); the error of
    the finite entries is measured as in :func:`verify`.
    """
    ya, spec_a = pytree.tree_flatten(_fields(reference))
    yb, spec_b = pytree.tree_flatten(_fields(candidate))
    if spec_a != spec_b:
        return f"the output structures differ: {_structure(reference)} vs {_structure(candidate)}"
    for k, (a, b) in enumerate(zip(ya, yb)):
        if isinstance(a, _Number) and isinstance(b, _Number):
            a, b = a.value, b.value
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            try:
                differs = bool(a != b)
            except Exception:  # noqa: BLE001  (an object holding tensors, whose == is elementwise)
                return f"output {k} ({type(a).__name__}) cannot be compared"
            if differs:
                return f"output {k} differs: {a!r} vs {b!r}"
            continue
        if a.is_nested or b.is_nested:  # nn.TransformerEncoder's fast path: ragged sequences
            if a.is_nested != b.is_nested:
                return f"output {k} is {'not ' * a.is_nested}a nested tensor, the original's is{' not' * b.is_nested}"
            a, b = torch.nested.to_padded_tensor(a, 0.0), torch.nested.to_padded_tensor(b, 0.0)
        if a.shape != b.shape:
            return f"output {k} has shape {tuple(b.shape)}, the original {tuple(a.shape)}"
        if (kinds := _kinds(a, b)) is not None:
            return f"output {k}'s {kinds}"
        a64, b64 = _wide(a), _wide(b)
        fa, fb = torch.isfinite(a64), torch.isfinite(b64)
        nan_a, inf_a = torch.isnan(a64), torch.isinf(a64)
        if not (bool((fa == fb).all()) and torch.equal(nan_a, torch.isnan(b64)) and torch.equal(a64[inf_a], b64[inf_a])):
            return f"output {k} has NaN or Inf at other places than the original's"
        if not bool(fa.any()):
            continue
        err, rel = _errors(a64[fa], b64[fa])
        if rel > tolerance:
            shape = "x".join(map(str, a.shape)) or "scalar"
            return f"output {k} ({shape}) differs by {err:.3g} (relative {rel:.3g} > {tolerance:.0e})"
    return None
