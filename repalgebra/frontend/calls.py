"""Callable modules for the parts of a model the IR does not model: calls carried through as ``opaque`` nodes.

A traced call such as ``x.reshape(B, N, C)`` (where ``B, N, C`` come from
``x.shape`` at run time), ``x + self.pos_embed`` or ``qkv[0]`` becomes one
:class:`FnCall` module.  Its ``forward`` takes the call's tensor inputs and
rebuilds the original arguments from a *template*: tensor inputs by position,
constant tensors from its own buffers, and shape expressions (:class:`SymExpr`)
that it re-evaluates on every call, so the carried-through code keeps working
at any input size, exactly as the traced model did.  Traced again (``export_onnx``
re-traces a fused model), a call records itself as the one fx node it was.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Collection

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from repalgebra.one_call import traced_as_one_call


@dataclass(frozen=True)
class In:
    """Template leaf: the ``index``-th tensor input of the call."""

    index: int


@dataclass(frozen=True)
class Buf:
    """Template leaf: the constant tensor stored as buffer ``name`` of the :class:`FnCall` (read by :func:`held_value`)."""

    name: str


@dataclass(frozen=True)
class DtypeLimit:
    """Template leaf: ``torch.finfo(dtype).min`` (or ``.max``) of the ``index``-th tensor input's dtype, read per call.

    ``x.masked_fill(mask, torch.finfo(x.dtype).min)`` captured by ``torch.export`` holds the limit of the capture's
    dtype as a number: the call would overflow once the module is cast down (``.float()``, ``.half()``)."""

    index: int
    which: str  # "min" | "max"


@dataclass(frozen=True, eq=False)
class SymExpr:
    """Template node: a non-tensor value (a size, a shape) recomputed from the inputs at run time."""

    kind: str  # "call_function" | "call_method"
    target: Any
    args: tuple
    kwargs: dict


def resolve(template: Any, inputs: tuple, owner: nn.Module) -> Any:
    """The concrete argument that ``template`` stands for, given the call's tensor inputs.

    The plain statement of what a template means; an :class:`FnCall` runs :func:`compile_template`'s resolver, which
    the tests hold to this."""
    if isinstance(template, In):
        return inputs[template.index]
    if isinstance(template, Buf):
        return held_value(owner, template.name)
    if isinstance(template, DtypeLimit):
        return getattr(torch.finfo(inputs[template.index].dtype), template.which)
    if isinstance(template, SymExpr):
        args = resolve(template.args, inputs, owner)
        kwargs = resolve(template.kwargs, inputs, owner)
        return invoke(template.kind, template.target, args, kwargs)
    if isinstance(template, tuple):
        return tuple(resolve(t, inputs, owner) for t in template)
    if isinstance(template, list):
        return [resolve(t, inputs, owner) for t in template]
    if isinstance(template, dict):
        return {k: resolve(v, inputs, owner) for k, v in template.items()}
    if isinstance(template, slice):
        return slice(*(resolve(t, inputs, owner) for t in (template.start, template.stop, template.step)))
    return template


Resolver = Callable[[tuple, nn.Module], Any]


def compile_template(template: Any) -> Resolver:
    """``resolve(template, ·, ·)`` as a function, for a call made on every forward: the template's constant parts
    (slice bounds, dims, dtypes) are walked once here, not on every call.  Lists and dicts are built anew per
    call, as :func:`resolve` builds them, in case the callee changes them."""
    dynamic = _compiled(template)
    return dynamic if dynamic is not None else lambda inputs, owner: template


def _compiled(t: Any) -> Resolver | None:
    """The resolver of ``t``, or None where ``t`` resolves to itself (a constant shared between calls)."""
    if isinstance(t, In):
        index = t.index
        return lambda inputs, owner: inputs[index]
    if isinstance(t, Buf):
        name = t.name
        return lambda inputs, owner: held_value(owner, name)
    if isinstance(t, DtypeLimit):
        index, which = t.index, t.which
        return lambda inputs, owner: getattr(torch.finfo(inputs[index].dtype), which)
    if isinstance(t, SymExpr):
        args, kwargs, kind, target = compile_template(t.args), compile_template(t.kwargs), t.kind, t.target
        return lambda inputs, owner: invoke(kind, target, args(inputs, owner), kwargs(inputs, owner))
    if isinstance(t, (tuple, list)):
        parts = [_compiled(x) for x in t]
        if isinstance(t, tuple) and all(f is None for f in parts):
            return None
        fs = [f if f is not None else _constant(x) for f, x in zip(parts, t)]
        build = tuple if isinstance(t, tuple) else list
        return lambda inputs, owner: build([f(inputs, owner) for f in fs])
    if isinstance(t, dict):
        items = [(k, compile_template(v)) for k, v in t.items()]
        return lambda inputs, owner: {k: f(inputs, owner) for k, f in items}
    if isinstance(t, slice):
        bounds = _compiled((t.start, t.stop, t.step))
        return None if bounds is None else lambda inputs, owner: slice(*bounds(inputs, owner))
    return None


def _constant(value: Any) -> Resolver:
    return lambda inputs, owner: value


def runs_on_meta(kind: str, target: Any) -> bool:
    """Whether a call may be made on meta tensors to learn shapes: torch's own code (a tensor method, a function or
    module of torch, an operator), not the model's (a function ``torch.fx.wrap`` kept whole, the user's leaf module),
    which may keep what it is given (a module-level cache, filled with a meta tensor, breaks the model)."""
    if kind == "call_method":
        return True
    owner = type(target) if kind == "call_module" else target
    name = getattr(owner, "__module__", None) or ""
    return name.split(".")[0] in ("torch", "_operator", "operator", "builtins", "math") or owner in (getattr, len)


def meta_of(v: Any) -> Any:
    """A meta tensor of ``v``'s shape and dtype (``v`` itself where not a tensor)."""
    return torch.empty_like(v, device="meta") if torch.is_tensor(v) else v


def invoke(kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """Call ``target`` the way an fx node of ``kind`` does."""
    if kind == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


@traced_as_one_call
def squeeze_to_rank(x: torch.Tensor, dim: Any, rank: int) -> torch.Tensor:
    """``x.squeeze()`` (``dim=None``) or ``x.squeeze(dim)`` as traced: with ``rank`` axes, else an error.

    Which axes a squeeze drops depends on the sizes (an axis of size 1 at batch 1 only); the graph after it holds
    its axes as counted at the example (``dim=-1`` a fixed axis), so at another rank it would compute something
    else: it refuses instead."""
    return _of_rank(x.squeeze() if dim is None else x.squeeze(dim), rank, f"x.squeeze({'' if dim is None else dim}) of a "
                    f"{'x'.join(map(str, x.shape))} tensor")


def _of_rank(y: torch.Tensor, rank: int, what: str) -> torch.Tensor:
    """``y``, where it has ``rank`` axes; else a ValueError saying that ``what`` made it."""
    if y.dim() != rank:
        raise ValueError(f"{what} has {y.dim()} axes, where the fused model was captured with {rank} (sizes of 1 where "
                         "the example had none, or the reverse): fuse the model again with an example of that kind")
    return y


def target_name(target: Any) -> str:
    """A short readable name for a call target (``reshape``, ``getitem``, ``MyBlock``)."""
    if isinstance(target, str):
        return target
    if isinstance(target, nn.Module):
        return type(target).__name__
    return getattr(target, "__name__", type(target).__name__)


class FnCall(nn.Module):
    """One traced call carried through unchanged: ``target(*template)`` with the tensor inputs filled in.

    ``kind`` is ``"call_function"``, ``"call_method"`` (``target`` a method
    name) or ``"call_module"`` (``target`` a module, registered as ``fn``).
    Constant tensors the call reads are registered as buffers, so ``.to()``
    moves and casts them with the module; those named in ``plain`` the model
    holds as plain attributes, which its casts leave, and so does this module;
    those named in ``trainable`` are parameters of the model that require
    gradients, read as they are, and are parameters here, so a fine-tune
    trains them.
    """

    def __init__(self, kind: str, target: Any, args: tuple, kwargs: dict, consts: dict[str, torch.Tensor],
                 plain: Collection[str] = (), trainable: Collection[str] = ()) -> None:
        """Create the call; ``args``/``kwargs`` are templates (see :func:`resolve`)."""
        super().__init__()
        self.kind = kind
        if kind == "call_module":
            self.fn = target
            self.target = None
        else:
            self.target = target
        self.args_template = args
        self.kwargs_template = kwargs
        self.complex_consts = frozenset(name for name, t in consts.items() if t.is_complex())  # see _held
        for name, t in consts.items():
            t = _held(t)
            if name in plain:
                setattr(self, name, t)
            elif name in trainable:
                self.register_parameter(name, nn.Parameter(t.detach().clone()))
            else:
                self.register_buffer(name, t)

    def forward(self, *inputs: Any) -> Any:
        """Rebuild the arguments from ``inputs`` and make the call."""
        arguments = self.__dict__.get("_repalgebra_resolver")
        if arguments is None:  # built on first use, not pickled (a closure): see __getstate__
            arguments = self.__dict__["_repalgebra_resolver"] = compile_template((self.args_template, self.kwargs_template))
        args, kwargs = arguments(inputs, self)
        if self.kind == "call_module":
            return self.fn(*args, **kwargs)
        tracer = next((t.tracer for t in inputs if isinstance(t, fx.Proxy)), None)
        if tracer is not None:
            # One node, as when first traced: running the call would trace into its Python body, where a constant
            # tensor input (our buffer, not a Proxy) skips torch's dispatch and the body misreads the Proxies it
            # gets (F.interpolate(c, size=x.shape[-2:]) takes the size for one int and passes [size, size]).
            return tracer.create_proxy(self.kind, self.target, args, kwargs)
        return invoke(self.kind, self.target, args, kwargs)

    def __getstate__(self) -> dict:
        """The module's state without the resolver built from its templates (a closure does not pickle), and with an
        aten op as its name (:class:`OpName`)."""
        state = super().__getstate__()
        state.pop("_repalgebra_resolver", None)
        state["target"] = op_named(state["target"])
        return state

    def __setstate__(self, state: dict) -> None:
        """The pickled state, its aten op looked up by name."""
        super().__setstate__({**state, "target": op_of_name(state["target"])})

    @property
    def reads_input_dtype(self) -> bool:
        """Whether an argument is a dtype's limit, computed from an input's dtype on every call (:class:`DtypeLimit`):
        such a call is traced again as a call of this module, since a traced input has no dtype to read."""
        return any(isinstance(t, DtypeLimit) for t in pytree.tree_leaves((self.args_template, self.kwargs_template)))

    @property
    def name(self) -> str:
        """What the call calls, for names and reports."""
        return target_name(self.fn if self.kind == "call_module" else self.target)

    def extra_repr(self) -> str:
        """Show the call target in ``print(module)``."""
        return self.name


@dataclass(frozen=True)
class OpName:
    """An aten op by its name, where a module is pickled: torch's op objects (``torch.ops.aten.fft_rfft2.default``,
    the targets of calls ``torch.export`` captured) do not pickle, and ``torch.save`` of the fused model failed."""

    namespace: str
    name: str
    overload: str | None  # None for a packet (``torch.ops.aten.mul``)


@dataclass(frozen=True)
class GlobalName:
    """A ``@torch.jit.script`` function by the module global that holds it, where a module is pickled: compiled code
    does not pickle (DAC's ``snake``, carried as a call of the fused model)."""

    module: str
    name: str


def _global_name(fn: Any) -> GlobalName | None:
    """Where ``fn`` is a global of an imported module, its name there: a module other than ``__main__`` first (a
    script that imported it by name pickled it as the script's, which another process cannot import; a review)."""
    found = []
    for module_name, module in list(sys.modules.items()):
        try:
            names = [name for name, value in list(vars(module).items()) if value is fn]
        except TypeError:  # (an entry vars() does not take)
            continue
        found += [GlobalName(module_name, name) for name in names]
    return min(found, key=lambda g: g.module in ("__main__", "__mp_main__"), default=None)


def op_named(target: Any) -> Any:
    """``target`` as it pickles: an op as its :class:`OpName`, a scripted function as its :class:`GlobalName`,
    anything else as it is."""
    if isinstance(target, torch.jit.ScriptFunction):
        return _global_name(target) or target
    if isinstance(target, torch._ops.OpOverload):
        return OpName(target.namespace, target._schema.name.split("::")[1], target._overloadname)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return OpName(*target._qualified_op_name.split("::"), None)
    return target


def op_of_name(target: Any) -> Any:
    """The op an :class:`OpName` names, the function a :class:`GlobalName` names; anything else as it is."""
    if isinstance(target, GlobalName):
        return getattr(importlib.import_module(target.module), target.name)
    if not isinstance(target, OpName):
        return target
    packet = getattr(getattr(torch.ops, target.namespace), target.name)
    return packet if target.overload is None else getattr(packet, target.overload)


def _held(t: torch.Tensor) -> torch.Tensor:
    """A constant as a :class:`FnCall` holds it: a complex one (``torch.view_as_complex(self.weight)`` of GFNet's
    global filter, computed ahead by ``torch.export``) as its real view, viewed as complex per call
    (:func:`held_value`): a cast of the module (``.to(torch.float64)``) casts a complex buffer to real, dropping
    its imaginary part, where the model casts the real parameter it views."""
    return torch.view_as_real(t).clone() if t.is_complex() else t


def held_value(owner: nn.Module, name: str) -> Any:
    """The constant ``name`` of ``owner`` (a :class:`FnCall`) as its call reads it: a complex one viewed as complex."""
    held = getattr(owner, name)
    return torch.view_as_complex(held) if name in getattr(owner, "complex_consts", ()) else held


def returned(x: Any) -> Any:
    """What it is given: the target of a call that returns a constant (a model output that is a tensor of the model,
    a literal)."""
    return x


def constant_call(tensor: torch.Tensor, plain: bool = False, copied: bool = False) -> FnCall:
    """A call returning ``tensor``, held as a buffer, or for ``plain`` as a plain attribute (see :class:`FnCall`);
    ``copied``: a copy of it, made per call (a model output the model computes anew each call from its weights)."""
    return FnCall("call_function", torch.clone if copied else returned, (Buf("c0"),), {}, {"c0": tensor}, ("c0",) if plain else ())


class CallFn(nn.Module):
    """A plain callable as a module: ``CallFn(fn)(*xs, **kw) == fn(*xs, **kw)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        """Wrap ``fn``."""
        super().__init__()
        self.fn = fn

    def forward(self, *xs: Any, **kwargs: Any) -> Any:
        """Call the wrapped function."""
        return self.fn(*xs, **kwargs)

    def extra_repr(self) -> str:
        """Show the wrapped function's name."""
        return target_name(self.fn)


__all__ = ["FnCall", "CallFn", "returned", "constant_call", "SymExpr", "In", "Buf", "resolve", "compile_template", "invoke", "target_name", "squeeze_to_rank", "runs_on_meta", "meta_of"]
