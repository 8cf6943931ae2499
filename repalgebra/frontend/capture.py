"""The capture paths, as one interface: a module and its example inputs to a graph, or a named reason why not.

``fuse`` tries them in this order, for the whole model and then for each part
it has to treat on its own:

1. ``fx``: ``torch.fx`` symbolic tracing (:func:`capture_fx`).  Fast, and the
   graph it gives works at any input size: shapes are read at run time.  It
   fails on Python that looks at sizes (``if H % 7:``), on item assignment,
   and on in-place ops whose effect value semantics cannot express (see
   :mod:`repalgebra.frontend.inplace`).
2. ``specialized``: ``torch.export`` with every shape fixed at the example
   input (:func:`capture_specialized`): it records shape-dependent Python
   exactly and functionalizes in-place ops, but the result is valid only at
   those input shapes (``fuse`` guards the fused module accordingly).
3. neither: the caller keeps the module whole and fuses its parts; see
   :func:`record_calls`, which learns each submodule's inputs from one real run.

Every failure is a :class:`CaptureFailed` with a one-line reason and the path
of the innermost module it happened in (relative to the captured module).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from repalgebra.ir import Graph
from repalgebra.module_copy import eval_copy
from repalgebra.rewrite import LeftAlone

__all__ = ["Capture", "CaptureFailed", "capture_fx", "capture_specialized", "record_calls", "Call", "first_line"]


class CaptureFailed(Exception):
    """A capture path cannot capture a module: ``reason`` (one line) and ``path``, where it happened."""

    def __init__(self, reason: str, path: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


@dataclass
class Capture:
    """A captured module: the graph, the structure of its outputs, and how it was captured."""

    graph: Graph
    output_spec: pytree.TreeSpec
    how: str  # "fx" | "specialized"
    notes: list[str] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    batch_free: bool = False  # a specialized capture that holds at any batch size (its other sizes fixed)
    dtype_tested: bool = False  # an fx capture whose forward tests a dtype: it holds in the example's only
    input_checks: list = field(default_factory=list)  # an fx capture's torch._assert calls on its inputs, to make per call
    pinned: list = field(default_factory=list)  # an fx capture's floating tensors a cast of the model leaves: (where, dtype)
    kept: list = field(default_factory=list)  # an fx capture's floating tensors written into in place: (where, dtype)
    # it reads a tensor that is neither a parameter nor a buffer (a plain attribute, a lifted constant), which the
    # graph holds as the value it had at capture: a value a run left there (a hook's stored output) would not hold
    reads_plain: bool = False
    grad_taken: bool = False  # an fx capture that took a computed value's requires_grad as False: checked with gradients on
    precomputed: int = 0  # an fx capture's pure calls on the model's tensors made at capture that compute (kernels)
    autocast_off: tuple[str, ...] = ()  # a specialized capture's devices its forward turns autocast off on


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``: how a failure is named in reasons and errors; torch's messages about
    values the code reads from tensors say so in words (not in torch's symbols: ``Eq(u0, 1)``)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    line = lines[0] if lines else "(no message)"
    for pattern, plain in _PLAIN:
        m = re.match(pattern, line)
        if m:
            line = m.expand(plain)
            break
    return f"{type(e).__name__}: {line}"


# torch's messages whose words say little to a model's author, and what they mean.
_PLAIN = (
    (r"Could not guard on data-dependent expression", "the code branches on a value computed from a tensor's data (data-dependent control flow)"),
    (r"Could not extract specialized integer from data-dependent expression", "the code reads a tensor's data as a Python number"),
    (r"(int|float|bool)\(\) argument must be .*not '_?Proxy'", r"\1() of a value torch.fx only knows symbolically (a tensor, or a size read from one)"),
    (r"Found <class '(?:[\w.]+\.)?(\w+)'> in output, which is not a known type",
     r"its output type \1 is not registered with torch's pytree, which torch.export needs"),
    (r"`?__cuda_array_interface__`? must be a dict", "torch.tensor() of a value torch.fx only knows symbolically (a size read from a tensor)"),
    (r"Proxy object cannot be iterated", "a loop or *unpacking over a value torch.fx only knows symbolically (a tensor, its shape, or a *args argument)"),
    (r"Constraints violated \((\w+)\)!", r"the code tests or computes with the \1 size as a number (a comparison such as "
     r"x.shape[0] >= 64, int(), a Python division), which cannot stay symbolic"),
)


def capture_fx(module: nn.Module, inputs: tuple[torch.Tensor, ...], leaf_paths: Iterable[str] = (),
               check_trace: bool = True) -> Capture:
    """Trace ``module`` with ``torch.fx`` (on a private copy); ``leaf_paths`` are kept whole.  ``check_trace=False``
    skips running the trace against ``forward`` (for a caller that checks the fused result against it anyway)."""
    from repalgebra.frontend.inplace import InplaceHazard
    from repalgebra.frontend.torch import UntraceableError, trace_model

    try:
        traced = trace_model(module, inputs, leaf_modules=tuple(leaf_paths), check_trace=check_trace)
    except InplaceHazard as e:
        raise CaptureFailed(e.reason, e.path) from e
    except UntraceableError as e:
        raise CaptureFailed(first_line(e.__cause__ or e), getattr(e, "path", "")) from e
    except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError, AssertionError, IndexError, KeyError) as e:
        raise CaptureFailed(first_line(e), getattr(e, "path", "")) from e
    if any(_calls_aten(n) for n in traced.graph.nodes):
        # A graph of aten ops (ExportedProgram.module(), make_fx): fx carries each as a call, and nothing folds; the
        # torch.export path reads them.
        raise CaptureFailed("its forward calls aten ops (a graph torch.export or make_fx made): read by the torch.export capture", "")
    return Capture(traced.graph, traced.output_spec, "fx", list(traced.notes), list(traced.left_alone),
                   dtype_tested=traced.dtype_tested, input_checks=list(traced.input_checks), pinned=list(traced.pinned), kept=list(traced.kept),
                   reads_plain=traced.reads_plain, precomputed=traced.precomputed, grad_taken=traced.grad_taken)


def _calls_aten(n: Any) -> bool:
    """Whether an IR node carries a call of an aten op (``torch.ops.aten.conv2d.default``) that fx met as a call."""
    fn = n.attrs.get("fn") if n.op == "opaque" else None
    return isinstance(getattr(fn, "target", None), torch._ops.OpOverload)


def capture_specialized(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Capture:
    """Capture ``module`` with ``torch.export`` at the shapes of ``inputs`` (on a private eval copy)."""
    from repalgebra.frontend.aten import CaptureFailed as ExportFailed
    from repalgebra.frontend.aten import capture_export

    work = eval_copy(module)
    try:
        with _quiet_export():
            cap = capture_export(work, tuple(inputs))
    except ExportFailed as e:
        raise CaptureFailed(str(e)) from e
    except Exception as e:  # noqa: BLE001  (torch.export raises many types; all mean "not this path")
        raise CaptureFailed(first_line(e)) from e
    shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
    fixed = "shapes" if not cap.batch_free else "sizes other than the batch"
    return Capture(cap.graph, cap.output_spec, "specialized", [f"captured with {fixed} fixed at {shapes}", *cap.notes],
                   batch_free=cap.batch_free, reads_plain=cap.reads_plain, autocast_off=cap.autocast_off)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Keep torch.export's warnings and graph dumps off the user's terminal: a failure is reported as a reason."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export", "torch._functorch")
    loggers = [logging.getLogger(name) for name in names]
    drop = _DropAll()
    for lg in loggers:  # a filter, not a level: torch hands some records to its loggers directly
        lg.addFilter(drop)
    try:  # it also prints the failing graph to sys.stderr itself
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@dataclass
class Call:
    """One call of a submodule during a real run: its arguments (tensors cloned)."""

    args: tuple
    kwargs: dict
    autocast: tuple[str, torch.dtype] | None = None  # (device type, dtype) of the torch.autocast it was made under

    @property
    def not_alone(self) -> str:
        """Why the call cannot be captured on its own (see :attr:`tensor_only`), in words; "" where it can."""
        if self.kwargs:
            return f"called with keyword arguments ({', '.join(self.kwargs)})"
        if not self.args:
            return "called without arguments"
        odd = [a for a in self.args if not torch.is_tensor(a)]  # (None among them: no "nothing found")
        if not odd:
            return ""
        what = "None" if odd[0] is None else f"a {type(odd[0]).__name__}"
        return f"called with {what} among its arguments (a part is captured on its own from tensors only)"

    @property
    def tensor_only(self) -> bool:
        """Positional tensors only (a mask or token ids among them too): a call ``fuse`` can capture on its own."""
        return not self.kwargs and bool(self.args) and all(torch.is_tensor(a) for a in self.args)



def record_calls(module: nn.Module, call: Call, paths: Iterable[str],
                 written: dict[str, set[str]] | None = None) -> dict[str, list[Call]]:
    """Run ``module`` once making ``call`` and return every call made to each submodule in ``paths``.

    Forward pre-hooks on those submodules clone what they are given (a later
    in-place op must not change the record); the hooks are removed after the
    run, whatever happens.  ``written`` (where given) gains, for each submodule
    in ``paths``, the attributes code outside its own call sets during the run
    (:func:`setting_attributes`).
    """
    calls: dict[str, list[Call]] = {p: [] for p in paths}
    with setting_attributes(module, list(calls), written if written is not None else {}):
        _record(module, call, calls)
    return calls


@contextlib.contextmanager
def setting_attributes(module: nn.Module, paths: list[str], written: dict[str, set[str]]) -> Iterator[None]:
    """Within the block, ``written[path]`` gains each attribute of the submodule at ``path`` that code outside its
    own call sets: Swin's ``blk.H, blk.W = H, W`` before ``blk(x)``, SkipNet's ``blk.skip = gate < 0.5``.  Such a
    part computes with what its parent set each time, so no capture of it on its own holds; and a part its parent
    calls as a whole module reads the attribute from that module, where a fused form would not.  The part's own
    writes (``self.cache = y`` in its forward, or its children's) are its state, found elsewhere."""
    subs = {id(module.get_submodule(p)): p for p in paths}
    if not subs:
        yield
        return
    running: list[int] = []  # the modules whose call is under way, outermost first

    def enter(m: nn.Module, args: tuple) -> None:
        running.append(id(m))

    def leave(m: nn.Module, args: tuple, out: Any) -> None:  # (a hook's return value would replace the output)
        running.pop()

    handles = []
    for p in paths:
        sub = module.get_submodule(p)
        handles += [sub.register_forward_pre_hook(enter), sub.register_forward_hook(leave, always_call=True)]
    with _SETATTR_PATCH:  # one thread's patch at a time: each puts back what it found
        setattr_ = nn.Module.__setattr__

        def recording(self: nn.Module, name: str, value: Any) -> None:
            p = subs.get(id(self))
            if p is not None and id(self) not in running and not set(running) & _descendant_ids(self, subs):
                written.setdefault(p, set()).add(name)
            setattr_(self, name, value)

        nn.Module.__setattr__ = recording
        try:
            yield
        finally:
            nn.Module.__setattr__ = setattr_
            for h in handles:
                h.remove()


_SETATTR_PATCH = threading.RLock()  # (reentrant: a run inside a run nests its patch, and unwinds it in order)


def _descendant_ids(module: nn.Module, subs: dict[int, str]) -> set[int]:
    return {id(m) for m in module.modules() if id(m) in subs and m is not module}


def cloned(tree: Any) -> Any:
    """``tree`` with each of its tensors a detached clone, one clone per tensor: ``attn(x, x, x)`` is called again
    with one tensor thrice, and a forward that writes into its inputs (a cache) writes into the clones."""
    copies: dict[int, torch.Tensor] = {}

    def clone(t: Any) -> Any:
        if torch.is_tensor(t) and id(t) not in copies:
            copies[id(t)] = t.detach().clone()
        return copies[id(t)] if torch.is_tensor(t) else t

    return pytree.tree_map(clone, tree)


def as_without_autocast(module: nn.Module, call: Call) -> Call:
    """``call``, made under ``torch.autocast``, with the tensors autocast made (of its dtype) cast back to the
    dtype of ``module``'s weights; :attr:`Call.autocast` says which autocast it was.  ``call`` where no autocast is
    on for its tensors' device, or where the weights are of no one floating dtype other than autocast's.

    A parent whose forward runs under autocast (accelerate's ``prepare_model`` with ``mixed_precision="bf16"``)
    hands its children bf16 activations.  Captured and checked on those outside autocast, a child's fp32 conv
    refused its bf16 input, and the child was kept whole (a probe: its conv+BN pairs stayed).  Autocast is a
    policy of each op's precision, not a part of the function: the child is fused on the same values in its
    weights' dtype (bf16 to fp32 is exact), checked in float64 (where autocast casts nothing), and the parent runs
    it under autocast as written, each op of the fused form in bf16 as the model's ops are."""
    device = next((t.device.type for t in pytree.tree_leaves((call.args, call.kwargs)) if torch.is_tensor(t)), None)
    if device is None or not torch.is_autocast_enabled(device):
        return call
    low = torch.get_autocast_dtype(device)
    weights = {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
    if len(weights) != 1 or low in weights:
        return call
    (own,) = weights
    back = lambda t: t.to(own) if torch.is_tensor(t) and t.dtype == low else t  # noqa: E731
    return Call(*pytree.tree_map(back, (call.args, call.kwargs)), autocast=(device, low))


def _record(module: nn.Module, call: Call, calls: dict[str, list[Call]]) -> None:
    handles = []

    def hook_for(path: str):
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[path].append(as_without_autocast(m, Call(*cloned((args, kwargs)))))

        return hook

    try:
        for p in calls:
            sub = module.get_submodule(p)
            if not isinstance(sub, torch.jit.ScriptModule):  # compiled code: it takes no hooks, and is not fused inside
                handles.append(sub.register_forward_pre_hook(hook_for(p), with_kwargs=True))
        with torch.no_grad():
            args, kwargs = cloned((call.args, call.kwargs))
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
