"""The torch back end: :class:`~repalgebra.ir.Graph` to a new ``nn.Module`` (a ``torch.fx.GraphModule``).

Each op lowers through its entry in the op table, ``op_def(op).lowerings["torch"]``,
registered here with :func:`lowers`.  Ops with weights become ordinary
modules (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``, ``nn.AvgPool2d``,
...) named after their source path (``stages.0.blocks.1.token_mixer`` becomes
``stages_0_blocks_1_token_mixer``); weightless ops become calls
(``operator.add``, ``torch.cat``, ``F.gelu``, ``x.reshape``); a layer scale is
a buffer and a multiply; an ``opaque`` node is the carried call written into the generated code
with its size arithmetic (:func:`_inline_call`), or else calls a deep copy of its module.
A conv with asymmetric padding is an ``nn.ZeroPad2d`` followed by the conv.

An op without a torch lowering still works: it runs its reference semantics
from the op table (:class:`OpCall`), so adding an op is adding one entry.

The IR has values, not memory layouts: the front end keeps ``x.contiguous()``
only right before an output or a carried call whose layout it made
(:mod:`~repalgebra.frontend.layout_reads`), and takes it for the identity
between ops the graph knows.  So no lowering may need a contiguous input:
reshapes lower to ``reshape`` (a view where one exists, a copy where not),
never ``view``, and a carried-through ``x.view(...)`` or ``x.view_as(y)`` call
runs as ``reshape``/``reshape_as`` (:func:`_stride_free`).

The generated module is itself ``torch.fx``-traceable and the front end maps
every lowering back to the same op, so fusing a fused model changes nothing.
"""

from __future__ import annotations

import copy
import keyword
import operator
import re
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from repalgebra.channel_affine import ChannelAffine
from repalgebra.frontend.calls import CallFn, FnCall, In, SymExpr, constant_call, returned
from repalgebra.ir import Graph, Node, Value, upstream
from repalgebra.match import Source, is_1x1_pointwise, origins
from repalgebra.module_copy import copy_module
from repalgebra.one_call import SIZED_FACTORIES, sized_call
from repalgebra.ops import OPS, chunk_piece, op_def, split_piece

__all__ = ["to_module", "lowers", "Lowering", "OpCall"]

LoweringFn = Callable[["Lowering", Node, list[fx.Node]], fx.Node]


def lowers(*ops: str) -> Callable[[LoweringFn], LoweringFn]:
    """Register ``fn(ctx, node, inputs) -> fx.Node`` as the torch lowering of ``ops`` (in the op table)."""

    def register(fn: LoweringFn) -> LoweringFn:
        for name in ops:
            op_def(name).lowerings["torch"] = fn
        return fn

    return register


class OpCall(nn.Module):
    """Fallback lowering: an op of the table run by its reference semantics, parameters as buffers."""

    def __init__(self, op: str, attrs: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
        """Hold ``op``'s attributes and (cloned) parameters."""
        super().__init__()
        self.op = op
        self.attrs = dict(attrs)
        self.param_names = tuple(params)
        for k, p in params.items():
            self.register_buffer(k, p.detach().clone())

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """Run the op."""
        return op_def(self.op)(xs, self.attrs, {k: getattr(self, k) for k in self.param_names})

    def extra_repr(self) -> str:
        """Show the op name."""
        return self.op


class Lowering:
    """The module and fx graph being built; lowerings add submodules, buffers and calls through it."""

    def __init__(self, own_dtype: torch.dtype | None = None) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.own_dtype = own_dtype  # the model's dtype: a tensor or module of another floating dtype stays in it
        self._taken: set[str] = set(dir(nn.Module()))
        self._copies: dict[int, str] = {}  # id of an opaque module -> its name here
        self._memo: dict[int, Any] = {}  # the copies of the opaque modules' objects (copy_module's memo)
        self._by_hint: dict[tuple[str, frozenset[str]], list[str]] = {}  # (source, origins) -> modules built for it
        self._params_by_hint: dict[tuple[str, frozenset[str]], list[str]] = {}  # and parameters registered for it

    def name(self, hint: str) -> str:
        """A fresh attribute name derived from ``hint`` (a source path or op name)."""
        base = re.sub(r"\W+", "_", hint).strip("_") or "m"
        if base[0].isdigit() or keyword.iskeyword(base):
            base = "m_" + base
        name, k = base, 1
        while name in self._taken:
            name, k = f"{base}_{k}", k + 1
        self._taken.add(name)
        return name

    def add_module(self, hint: str, module: nn.Module) -> str:
        """Register ``module`` under a fresh name; returns the name.

        A module with weights equal to one registered from the same source (its path, and the paths a fold merged
        into it: :func:`~repalgebra.match.origins`) is that one: a module the model calls twice (CBAM's shared MLP,
        ALBERT's shared layers) stays one module, not a copy per call.  Calls a rule changed have other weights and
        get their own; two folds of other modules get their own whatever their weights."""
        key = _share_key(hint)
        same = next((n for n in self._by_hint.get(key, ()) if _same_module(self.root.get_submodule(n), module)), None)
        if same is not None:
            return same
        name = self.name(hint)
        self.root.add_module(name, module)
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            self._by_hint.setdefault(key, []).append(name)
        return name

    def add_buffer(self, hint: str, tensor: torch.Tensor) -> fx.Node:
        """Register a constant tensor (cloned) and return the node reading it."""
        if held_dtype(self.own_dtype, [tensor]) is not None:
            return self.module(hint, HeldTensor(tensor, trainable=False))
        name = self.name(hint)
        self.root.register_buffer(name, tensor.detach().clone())
        return self.graph.get_attr(name)

    def add_parameter(self, hint: str, tensor: torch.Tensor) -> fx.Node:
        """Register a parameter holding ``tensor`` (cloned) and return the node reading it.  One equal to a parameter
        registered from the same source is that one: a position embedding added in two places stays one."""
        if held_dtype(self.own_dtype, [tensor]) is not None:
            return self.module(hint, HeldTensor(tensor, trainable=True))
        key = _share_key(hint)
        name = next((n for n in self._params_by_hint.get(key, ()) if _equal(getattr(self.root, n), tensor.detach())), None)
        if name is None:
            name = self.name(hint)
            self.root.register_parameter(name, _param(tensor))
            self._params_by_hint.setdefault(key, []).append(name)
        return self.graph.get_attr(name)

    def opaque_module(self, fn: nn.Module, hint: str) -> str:
        """The name of this back end's deep copy of ``fn`` (one copy per distinct module)."""
        if id(fn) not in self._copies:
            # (one memo for all: a tensor two carried parts hold stays one; review R6 finding 06)
            self._copies[id(fn)] = self.add_module(hint, _stride_free(copy_module(fn, self._memo)))
        return self._copies[id(fn)]

    def module(self, hint: str, module: nn.Module, *args: Any, **kwargs: Any) -> fx.Node:
        """Register ``module`` and call it (held in its dtype where that is not the model's: :class:`HeldInDtype`)."""
        if (dtype := held_dtype(self.own_dtype, [*module.parameters(), *module.buffers()])) is not None:
            module = HeldInDtype(module, dtype)
        return self.graph.call_module(self.add_module(hint, module), args, kwargs)

    def function(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        """Call ``fn``."""
        return self.graph.call_function(fn, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        """Call method ``name`` of ``args[0]``."""
        return self.graph.call_method(name, args, kwargs)


class HeldTensor(nn.Module):
    """A tensor a part reads, held as a module's output (a buffer, or a parameter where the model trains it), so
    that a :class:`HeldInDtype` keeps its dtype: a constant the model makes in another dtype on purpose (Mamba's
    ``-torch.exp(self.A_log.float())`` in a float64 model) was cast by ``.double()`` of the fused module, and the
    part ran in float64 (7e-7 off) or a kernel refused the mixed dtypes (a probe).  (A cast of its read in the
    generated code did not survive ``torch.save``: the code is traced again when loaded; a review.)"""

    def __init__(self, tensor: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        if trainable:
            self.value = _param(tensor)
        else:
            self.register_buffer("value", tensor.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.value


def held_dtype(own: torch.dtype | None, tensors: list[torch.Tensor]) -> torch.dtype | None:
    """The one floating dtype of ``tensors`` where it is not ``own``, the model's (None where ``own`` is None, or
    they hold no floating tensor, or several dtypes): a dtype a part is computed in on purpose, which casts of the
    fused model leave."""
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    return next(iter(dtypes)) if own is not None and len(dtypes) == 1 and dtypes != {own} else None


class HeldInDtype(nn.Module):
    """A module built for a part the model computes in a floating dtype of its own (a float64 model's
    ``F.group_norm(y.float(), 1, w.float())``): casts of the fused model (``.double()``, ``.to(torch.float64)``)
    leave its tensors in that dtype, as they leave what the model's ``w.float()`` makes; moves to a device move
    them.  Cast with the rest, its float32 weights met float32 inputs as float64 and the kernel refused the mixed
    dtypes (a probe)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.held_dtype = module, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # (``fused.group_norm.num_groups``: the module's)
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None:
                raise
            return getattr(module, name)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "HeldInDtype":
        super()._apply(fn, recurse)
        return super()._apply(lambda t: t.to(self.held_dtype) if t.is_floating_point() else t, recurse)


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` compute the same: one type and configuration (its public attributes: a conv's
    stride, a carried call's arguments, which its ``extra_repr`` does not show), equal parameters and buffers."""
    if type(a) is not type(b) or a.training != b.training:
        return False
    sa, sb = [dict(m.named_parameters()) | dict(m.named_buffers()) | _config(m) for m in (a, b)]
    return sa.keys() == sb.keys() and all(_equal(sa[k], sb[k]) for k in sa)


def _config(m: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}


def _equal(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (a value without a plain equality: taken for different)
        return False


# Ops whose torch lowering may return their input itself or a view of it (``x.to(x.dtype)`` is ``x``).
_VIEWING = frozenset({"identity", "after_call", "contiguous", "reshape", "reshape_dyn", "flatten", "permute", "transpose", "select", "slice", "chunk",
                      "piece", "expand", "expand_dyn", "cast"})


def _unaliased(ctx: Lowering, graph: Graph, outs: list[fx.Node]) -> list[fx.Node]:
    """``outs`` with a ``clone`` of each output that would share storage with an input or an earlier output.

    ``return y, y.clone(), x.clone()``: the copies are no ops in the graph (``identity``), so the fused module would
    return ``y`` twice and the caller's own ``x``, and a caller that post-processes one in place (``out.clamp_()``)
    would change the other, or its input, where the model's copies kept them apart.  So is an output that views a
    constant the model computes anew on each call (open_clip's ``self.logit_scale.exp()``, a head's ``self.anchors *
    stride``): folded, the fused module held it, and a caller's ``scale.mul_(2)`` changed every later call (review
    R10).  A parameter or buffer the model returns as it is stays the fused module's own, as the model's is.  So is
    an output of a call carried through that holds tensors of its own (``self.post(self.anchors * 8)``: the folded
    product is its buffer, and it may return it or a view: 770 off after a caller's ``mul_``; review R11)."""
    inputs, seen, out = {id(v) for v in graph.inputs}, set(), []
    made = {id(n.out) for n in graph.nodes if (n.op == "constant" and not n.attrs.get("_own")) or (n.op == "opaque" and _holds_tensors(n.attrs["fn"]))}
    for v, node in zip(graph.outputs, outs):
        roots = _viewed(v)
        out.append(ctx.graph.call_function(_copied, (node,)) if roots & (inputs | seen | made) else node)
        seen |= roots
    return out


def _copied(value: Any) -> Any:
    """A copy of a tensor; anything else (a size a call kept whole returns) as it is."""
    return value.clone() if torch.is_tensor(value) else value


def _holds_tensors(fn: Any) -> bool:
    """Whether a carried call holds tensors it may return (not a constant output's call, :func:`constant_call`,
    whose copy per call its ``own`` decides)."""
    if not isinstance(fn, FnCall) or fn.target in (returned, torch.clone):
        return False
    return bool(fn._buffers or fn._parameters or any(torch.is_tensor(v) for v in vars(fn).values()))


def _viewed(v: Value) -> set[int]:
    """The values ``v`` may be a view of, itself included: through the view ops, and through a call the graph keeps
    whole into each of its inputs (``x.unfold(...)``, ``x.diagonal()``: it may return a view of any)."""
    return {id(u) for u in upstream(v, lambda n: n.inputs[:1] if n.op in _VIEWING else n.inputs if n.op == "opaque" else ())}


def to_module(
    graph: Graph,
    *,
    output_spec: pytree.TreeSpec | None = None,
    class_name: str = "FusedModule",
    keep_param_dtype: bool = False,
    own_dtype: torch.dtype | None = None,
) -> fx.GraphModule:
    """A new module (eval mode) computing ``graph``; shares no storage with the graph.

    Args:
        graph: the graph to lower.
        output_spec: the structure of the model's outputs (from the front end);
            without it one output is returned as is and several as a tuple.
        class_name: the generated module's class name.
        keep_param_dtype: keep parameters in their own dtype instead of the
            dtype of the values they act on (``fuse`` builds its float64
            check module this way, from the graph before the cast back).
        own_dtype: the model's dtype: tensors and modules in another floating dtype (a part the model computes in
            float32 on purpose) are held in :class:`HeldInDtype`, so a cast of the module leaves what it computes.
    """
    ctx = Lowering(own_dtype)
    env: dict[int, fx.Node] = {}
    for v in graph.inputs:
        env[id(v)] = ctx.graph.placeholder(ctx.name(v.name))
    for n in graph.nodes:
        lower = op_def(n.op).lowerings.get("torch", _lower_by_reference)
        env[id(n.out)] = lower(ctx, n if keep_param_dtype else _params_in_value_dtype(n), [env[id(i)] for i in n.inputs])
    outs = [env[id(o)] for o in graph.outputs]
    outs = _unaliased(ctx, graph, outs)
    if output_spec is not None and not _plain(output_spec):
        # fx writes containers out as tuple, list and dict literals: an OrderedDict or a named tuple would come
        # back as a plain dict or tuple.  A module holding the structure rebuilds it.
        ctx.graph.output(ctx.module("output_structure", OutputStructure(output_spec), outs))
    elif output_spec is not None:
        ctx.graph.output(pytree.tree_unflatten(outs, output_spec))
    else:
        ctx.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
    gm = fx.GraphModule(ctx.root, ctx.graph, class_name)
    copies = set(ctx._copies.values())
    gm.meta[ORIGINS] = {name: paths for (_, paths), names in ctx._by_hint.items() for name in names if name not in copies}
    return gm.eval()


# Key of ``GraphModule.meta``: per submodule built from nodes, the source paths (module paths of the graph's model) of
# the nodes folded into it (:func:`~repalgebra.match.origins`).
ORIGINS = "repalgebra.origins"


def _plain(spec: pytree.TreeSpec) -> bool:
    """Whether fx's generated code returns this structure as it is: leaves in tuples, lists and plain dicts."""
    return spec.is_leaf() or (spec.type in (tuple, list, dict) and all(_plain(c) for c in spec.children()))


class OutputStructure(nn.Module):
    """Puts the fused outputs back in the model's structure (an ``OrderedDict``, a named tuple).

    It holds the structure as the model's containers with a 0 for each tensor: a module of the fused model, it is
    deep-copied and pickled with it.  A closure holding pytree's spec (which warns when deep-copied) could not be
    pickled: ``torch.save`` of every fused segmentation model (torchvision's ``OrderedDict`` outputs) failed."""

    def __init__(self, spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.skeleton = pytree.tree_unflatten([0] * spec.num_leaves, spec)

    def forward(self, flat: list) -> Any:
        return pytree.tree_unflatten(list(flat), pytree.tree_structure(self.skeleton))


def _params_in_value_dtype(node: Node) -> Node:
    """``node`` with its floating-point parameters in the dtype of the value it computes (as the op table runs it)."""
    dtype = node.out.dtype
    if dtype is None or not dtype.is_floating_point or all(p.dtype == dtype or not p.is_floating_point() for p in node.params.values()):
        return node
    cast = copy.copy(node)
    cast.params = {k: p.to(dtype) if p.is_floating_point() else p for k, p in node.params.items()}
    return cast


def _share_key(hint: str) -> tuple[str, frozenset[str]]:
    """What two calls' modules must agree on, besides their weights, to be one module: the source path, and the
    paths a fold merged into it (:func:`~repalgebra.match.origins`)."""
    return str(hint), origins(hint)


def _hint(node: Node, suffix: str = "") -> str:
    """The name hint of ``node``'s module: its source path (and the paths a fold merged into it) or its op."""
    text = (node.source or node.op) + suffix
    return Source(text, node.source.origins) if isinstance(node.source, Source) else text


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone())


def _lower_by_reference(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.module(_hint(node, "_" + node.op), OpCall(node.op, dict(node.attrs), dict(node.params)), *xs)


# --------------------------------------------------------------------------- lowerings


@lowers("conv2d")
def _conv2d(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    w, b = node.params["weight"], node.params.get("bias")
    a = node.attrs
    if is_1x1_pointwise(node) and a["groups"] == w.shape[0] == node.x.shape[1] and w.shape[1] == 1:
        return ctx.module(_hint(node), ChannelAffine(w, b, a["dilation"]), xs[0])  # a per-channel affine map: multiply and add
    top, bottom, left, right = a["padding"]
    symmetric = top == bottom and left == right
    conv = nn.Conv2d(
        w.shape[1] * a["groups"], w.shape[0], tuple(w.shape[2:]), a["stride"],
        (top, left) if symmetric else 0, a["dilation"], a["groups"], bias=b is not None, device="meta", dtype=w.dtype,
    )
    conv.weight = _param(w)
    if b is not None:
        conv.bias = _param(b)
    x = xs[0]
    if not symmetric:
        x = ctx.module(_hint(node, "_pad"), nn.ZeroPad2d((left, right, top, bottom)), x)
    return ctx.module(_hint(node), conv, x)


@lowers("conv_transpose2d", "conv_transpose3d")
def _conv_transpose(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    w, b = node.params["weight"], node.params.get("bias")
    a = node.attrs
    conv = (nn.ConvTranspose2d if w.dim() == 4 else nn.ConvTranspose3d)(
        w.shape[0], w.shape[1] * a["groups"], tuple(w.shape[2:]), a["stride"], a["padding"], a["output_padding"],
        a["groups"], bias=b is not None, dilation=a["dilation"], device="meta", dtype=w.dtype,
    )
    conv.weight = _param(w)
    if b is not None:
        conv.bias = _param(b)
    return ctx.module(_hint(node), conv, xs[0])


@lowers("conv3d")
def _conv3d(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    w, b = node.params["weight"], node.params.get("bias")
    a = node.attrs
    conv = nn.Conv3d(
        w.shape[1] * a["groups"], w.shape[0], tuple(w.shape[2:]), a["stride"], a["padding"], a["dilation"], a["groups"],
        bias=b is not None, device="meta", dtype=w.dtype,
    )
    conv.weight = _param(w)
    if b is not None:
        conv.bias = _param(b)
    return ctx.module(_hint(node), conv, xs[0])


_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@lowers("batch_norm")
def _batch_norm(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    rank = len(node.x.shape or ())
    if rank not in _BN:
        return _lower_by_reference(ctx, node, xs)
    p = node.params
    bn = _BN[rank](p["mean"].shape[0], eps=node.attrs["eps"], device=p["mean"].device, dtype=p["mean"].dtype)
    with torch.no_grad():
        bn.running_mean.copy_(p["mean"])
        bn.running_var.copy_(p["var"])
        bn.weight.copy_(p["weight"])
        bn.bias.copy_(p["bias"])
    return ctx.module(_hint(node), bn.eval(), xs[0])


@lowers("linear")
def _linear(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    w, b = node.params["weight"], node.params.get("bias")
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    lin.weight = _param(w)
    if b is not None:
        lin.bias = _param(b)
    return ctx.module(_hint(node), lin, xs[0])


@lowers("identity")
def _identity(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return xs[0]


@lowers("after_call")
def _after_call(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    """The tensor itself, read where the graph reads it: after the call kept whole (its input ``xs[1]`` comes first)."""
    return xs[0]


for _op, _fn in {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "matmul": torch.matmul}.items():
    lowers(_op)(lambda ctx, node, xs, fn=_fn: ctx.function(fn, *xs))


@lowers("scale")
def _scale(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    s = node.params["scale"]
    if s.numel() and bool((s == s.flatten()[0]).all()):  # one number (``x * 0.5``): no buffer needed
        return ctx.function(operator.mul, xs[0], float(s.flatten()[0]))
    rank = len(node.x.shape)
    axis = node.attrs["axis"] % rank
    view = s.reshape((-1,) + (1,) * (rank - 1 - axis))
    return ctx.function(operator.mul, xs[0], ctx.add_buffer(_hint(node, "_scale"), view))


@lowers("pad")
def _pad(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    top, bottom, left, right = node.attrs["pads"]
    value = node.attrs["value"]
    mod = nn.ZeroPad2d((left, right, top, bottom)) if value == 0 else nn.ConstantPad2d((left, right, top, bottom), value)
    return ctx.module(_hint(node, "_pad"), mod, xs[0])


@lowers("avg_pool2d")
def _avg_pool2d(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    pool = nn.AvgPool2d(a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])
    return ctx.module(_hint(node, "_pool"), pool, xs[0])


@lowers("avg_pool_nd")
def _avg_pool_nd(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    cls = {1: nn.AvgPool1d, 3: nn.AvgPool3d}[len(a["kernel"])]
    pool = cls(a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])
    return ctx.module(_hint(node, "_pool"), pool, xs[0])


@lowers("concat")
def _concat(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(torch.cat, list(xs), dim=node.attrs["axis"])


@lowers("reshape")
def _reshape(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("reshape", xs[0], tuple(node.attrs["shape"]))


@lowers("reshape_dyn")
def _reshape_dyn(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("reshape", xs[0], *_dyn_sizes(ctx, node.attrs["shape"], xs[1:]))


@lowers("expand_dyn")
def _expand_dyn(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("expand", xs[0], tuple(_dyn_sizes(ctx, node.attrs["shape"], xs[1:])))  # one tuple: fx traces a buffer's expand so


def _dyn_sizes(ctx: Lowering, entries: tuple, refs: list[fx.Node]) -> list[Any]:
    """``reshape_dyn``/``expand_dyn`` sizes: ints, or products of ints and ``refs[r].shape[axis]`` (``// d``) read
    at run time."""
    shapes: dict[int, fx.Node] = {}

    def size(entry: Any) -> Any:
        if isinstance(entry, int):
            return entry
        out = None
        for f in entry:
            if not isinstance(f, int):
                r, axis, *divisor = f
                if r not in shapes:
                    shapes[r] = ctx.function(getattr, refs[r], "shape")
                f = ctx.function(operator.getitem, shapes[r], axis)
                if divisor:
                    f = ctx.function(operator.floordiv, f, divisor[0])
            out = f if out is None else ctx.function(operator.mul, out, f)
        return out

    return [size(e) for e in entries]


@lowers("flatten")
def _flatten(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(torch.flatten, xs[0], node.attrs["start"], node.attrs["end"])


@lowers("permute")
def _permute(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("permute", xs[0], tuple(node.attrs["dims"]))


@lowers("contiguous")
def _contiguous(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    if node.attrs["memory_format"] == torch.preserve_format:  # (contiguous() takes no preserve_format; see the op)
        return ctx.method("clone", xs[0], memory_format=torch.preserve_format)
    return ctx.method("contiguous", xs[0], memory_format=node.attrs["memory_format"])


@lowers("transpose")
def _transpose(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("transpose", xs[0], node.attrs["dim0"], node.attrs["dim1"])


@lowers("select")
def _select(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("select", xs[0], node.attrs["axis"], node.attrs["index"])


@lowers("relu")
def _relu(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.relu, xs[0])


@lowers("gelu")
def _gelu(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.gelu, xs[0], approximate=node.attrs["approximate"])


@lowers("sigmoid")
def _sigmoid(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(torch.sigmoid, xs[0])


@lowers("softmax")
def _softmax(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.softmax, xs[0], dim=node.attrs["axis"])


@lowers("log_softmax")
def _log_softmax(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.log_softmax, xs[0], dim=node.attrs["axis"])


@lowers("glu")
def _glu(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.glu, xs[0], dim=node.attrs["axis"])


@lowers("mean")
def _mean(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("mean", xs[0], tuple(node.attrs["dims"]), node.attrs["keepdim"])


@lowers("rms_norm")
def _rms_norm(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    shape = tuple(node.attrs["normalized_shape"])
    norm = nn.RMSNorm(shape, eps=node.attrs["eps"], elementwise_affine="weight" in node.params, device="meta")
    if "weight" in node.params:
        norm.weight = _param(node.params["weight"])
    return ctx.module(_hint(node), norm, xs[0])


@lowers("layer_norm")
def _layer_norm(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    p = node.params
    if ("weight" in p) != ("bias" in p):
        return _lower_by_reference(ctx, node, xs)
    shape = tuple(node.attrs["normalized_shape"])
    ln = nn.LayerNorm(shape, eps=node.attrs["eps"], elementwise_affine="weight" in p, device="meta")
    if "weight" in p:
        ln.weight, ln.bias = _param(p["weight"]), _param(p["bias"])
    return ctx.module(_hint(node), ln, xs[0])


# --------------------------------------------------------------------------- the common vision vocabulary


for _op, _fn in {
    "silu": F.silu, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "tanh": torch.tanh, "sqrt": torch.sqrt,
    "exp": torch.exp, "log": torch.log, "rsqrt": torch.rsqrt, "div": operator.truediv, "broadcast_add": operator.add, "broadcast_sub": operator.sub,
}.items():
    lowers(_op)(lambda ctx, node, xs, fn=_fn: ctx.function(fn, *xs))


@lowers("clamp")
def _clamp(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(torch.clamp, xs[0], min=node.attrs["min"], max=node.attrs["max"])


@lowers("leaky_relu")
def _leaky_relu(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.leaky_relu, xs[0], node.attrs["negative_slope"])


@lowers("elu")
def _elu(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    if a["scale"] == 1 and a["input_scale"] == 1:
        return ctx.function(F.elu, xs[0], a["alpha"])
    return ctx.function(torch.ops.aten.elu, xs[0], a["alpha"], a["scale"], a["input_scale"])  # SELU, CELU: as ATen runs them


@lowers("threshold")
def _threshold(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.threshold, xs[0], node.attrs["threshold"], node.attrs["value"])


@lowers("softplus")
def _softplus(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.softplus, xs[0], node.attrs["beta"], node.attrs["threshold"])


@lowers("log_sigmoid")
def _log_sigmoid(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.logsigmoid, xs[0])


@lowers("prelu")
def _prelu(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    w = node.params["weight"]
    prelu = nn.PReLU(w.numel(), device="meta", dtype=w.dtype)  # a module: its slopes learn, or stay frozen, as the model's
    prelu.weight = _param(w.reshape(-1))
    return ctx.module(_hint(node), prelu, xs[0])


@lowers("pow")
def _pow(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(torch.pow, xs[0], node.attrs["exponent"])


@lowers("add_const")
def _add_const(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    c = node.params["const"]
    hold = ctx.add_parameter if node.attrs.get("_trainable") else ctx.add_buffer  # as the model holds it (pos_embed: learned)
    const = float(c) if c.dim() == 0 else hold(_hint(node, "_const"), c)  # a number needs no buffer
    return ctx.function(operator.add, xs[0], const) if node.attrs["sign"] == 1 else ctx.function(operator.sub, const, xs[0])


@lowers("sum")
def _sum(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("sum", xs[0], tuple(node.attrs["dims"]), node.attrs["keepdim"])


@lowers("amax")
def _amax(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(torch.amax, xs[0], tuple(node.attrs["dims"]), node.attrs["keepdim"])


@lowers("norm")
def _norm(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    return ctx.function(torch.linalg.vector_norm, xs[0], a["p"], tuple(a["dims"]), a["keepdim"])


@lowers("cast")
def _cast(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("to", xs[0], node.attrs["dtype"])


@lowers("abs")
def _abs(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(torch.abs, xs[0])


@lowers("max_pool2d")
def _max_pool2d(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    pool = nn.MaxPool2d(a["kernel"], a["stride"], a["padding"], a["dilation"], ceil_mode=a["ceil_mode"])
    return ctx.module(_hint(node, "_pool"), pool, xs[0])


@lowers("adaptive_avg_pool2d", "adaptive_max_pool2d")
def _adaptive_pool(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    cls = nn.AdaptiveAvgPool2d if node.op == "adaptive_avg_pool2d" else nn.AdaptiveMaxPool2d
    return ctx.module(_hint(node, "_pool"), cls(node.attrs["output_size"]), xs[0])


@lowers("group_norm")
def _group_norm(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    p = node.params
    if ("weight" in p) != ("bias" in p) or len(node.x.shape or ()) < 2:
        return _lower_by_reference(ctx, node, xs)
    gn = nn.GroupNorm(node.attrs["num_groups"], node.x.shape[1], eps=node.attrs["eps"], affine="weight" in p, device="meta")
    if "weight" in p:
        gn.weight, gn.bias = _param(p["weight"]), _param(p["bias"])
    return ctx.module(_hint(node), gn, xs[0])


@lowers("interpolate")
def _interpolate(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    size = a["size"]
    if len(xs) == 2:  # the size of the second input's last two axes, read at run time
        shape = ctx.function(getattr, xs[1], "shape")
        size = ctx.function(operator.getitem, shape, slice(-2, None))
    return ctx.function(F.interpolate, xs[0], size=size, scale_factor=a["scale"], mode=a["mode"], align_corners=a["align_corners"])


@lowers("attention")
def _attention(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    mask = xs[3] if len(xs) == 4 else None
    gqa = {"enable_gqa": True} if node.attrs["gqa"] else {}
    return ctx.function(F.scaled_dot_product_attention, *xs[:3], attn_mask=mask, is_causal=node.attrs["causal"], scale=node.attrs["scale"], **gqa)


@lowers("einsum")
def _einsum(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(torch.einsum, node.attrs["equation"], *xs)


@lowers("slice")
def _slice(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    index = (slice(None),) * (a["axis"] % len(node.x.shape)) + (slice(a["start"], a["end"], a["step"]),)
    return ctx.function(operator.getitem, xs[0], index)


@lowers("chunk")
def _chunk(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(chunk_piece, xs[0], node.attrs["chunks"], node.attrs["axis"], node.attrs["index"])


@lowers("piece")
def _piece(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    return ctx.function(split_piece, xs[0], a["how"], a["size"], a["axis"], a["index"], a["count"])


@lowers("slice_scatter")
def _slice_scatter(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    return ctx.function(torch.slice_scatter, xs[0], xs[1], a["axis"], a["start"], a["end"], a["step"])


@lowers("roll")
def _roll(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(torch.roll, xs[0], tuple(node.attrs["shifts"]), tuple(node.attrs["dims"]))


@lowers("unfold")
def _unfold(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    return ctx.function(F.unfold, xs[0], a["kernel"], a["dilation"], a["padding"], a["stride"])


@lowers("fold")
def _fold(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    return ctx.function(F.fold, xs[0], a["output_size"], a["kernel"], a["dilation"], a["padding"], a["stride"])


@lowers("pixel_shuffle")
def _pixel_shuffle(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.pixel_shuffle, xs[0], node.attrs["factor"])


@lowers("pixel_unshuffle")
def _pixel_unshuffle(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.function(F.pixel_unshuffle, xs[0], node.attrs["factor"])


@lowers("pad_nd")
def _pad_nd(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    a = node.attrs
    if a["mode"] == "constant":
        return ctx.function(F.pad, xs[0], tuple(a["pads"]), mode="constant", value=a["value"])
    return ctx.function(F.pad, xs[0], tuple(a["pads"]), mode=a["mode"])


@lowers("constant")
def _constant(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    value = node.params["value"].to(node.attrs["dtype"])
    if node.attrs["_plain"]:  # as the model holds it: a module's plain attribute, which casts leave
        return ctx.module(_hint(node, "_const"), constant_call(value, plain=True))
    if value.is_complex():  # held as its real view, which casts follow (see calls._held)
        return ctx.module(_hint(node, "_const"), constant_call(value))
    if node.attrs.get("_trainable"):  # a parameter the model trains (a class token): one a fine-tune trains here too
        return ctx.add_parameter(_hint(node, "_const"), value)
    return ctx.add_buffer(_hint(node, "_const"), value)


@lowers("repeat")
def _repeat(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    return ctx.method("repeat", xs[0], *node.attrs["repeats"])


@lowers("expand")
def _expand(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    if len(xs) == 2:
        return ctx.method("expand_as", xs[0], xs[1])
    return ctx.method("expand", xs[0], *node.attrs["shape"])


@lowers("opaque")
def _opaque(ctx: Lowering, node: Node, xs: list[fx.Node]) -> fx.Node:
    fn = node.attrs["fn"]
    if isinstance(fn, FnCall) and not node.attrs["kwargs"]:
        inlined = _inline_call(ctx, node, fn, xs)
        if inlined is not None:
            return inlined
    if not isinstance(fn, nn.Module):
        fn = CallFn(fn)
    hint = _hint(node, "_" + fn.name) if isinstance(fn, FnCall) else (node.source or type(fn).__name__)
    name = ctx.opaque_module(fn, hint)
    return ctx.graph.call_module(name, tuple(xs), dict(node.attrs["kwargs"]))


# Template leaves fx writes into generated code as they are (anything else stays in its FnCall module).
_LITERALS = (type(None), bool, int, float, str, type(Ellipsis), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _inline_call(ctx: Lowering, node: Node, fn: FnCall, xs: list[fx.Node]) -> fx.Node | None:
    """A carried call written into the graph the way the traced model wrote it, or None to keep its module.

    Its size arithmetic (``C // 4`` from ``x.shape``) becomes nodes reading the inputs' shapes at run time, once
    per expression.  An :class:`FnCall` module would rebuild the arguments in Python on every call (a ShiftViT
    shift slice: 13 µs against 3 µs).  Kept as a module: a call of a module; a call reading a constant tensor (a
    buffer is no Proxy when ``export_onnx`` traces the fused module again, so ``F.interpolate(buffer, size=...)``
    would trace into its body, where the FnCall records one call); a dtype limit read per call
    (:attr:`FnCall.reads_input_dtype`, or ``torch.finfo(x.dtype)`` in its arguments: unpickling traces the code
    again, and ``torch.finfo`` of a traced dtype fails); leaves or targets that generated code cannot spell.
    """
    if fn.kind == "call_module" or fn.reads_input_dtype or not _spellable(fn.target, fn.kind):
        return None
    template = (fn.args_template, fn.kwargs_template)
    leaves = _template_leaves(template)
    if not all(isinstance(leaf, (In, SymExpr, *_LITERALS)) for leaf in leaves):
        return None
    if not all(_spellable(e.target, e.kind) for e in leaves if isinstance(e, SymExpr)):
        return None  # size arithmetic through a function torch.fx.wrap kept whole (timm's get_same_padding)
    if any(isinstance(e, SymExpr) and e.target in (torch.finfo, torch.iinfo) for e in leaves):
        return None  # a dtype's limits (``torch.finfo(x.dtype).min``): torch.load traces the code again, with a Proxy dtype
    emitted: dict[int, fx.Node] = {}  # one node per expression: an expression may be shared within a call

    def emit(t: Any) -> Any:
        if isinstance(t, In):
            return xs[t.index]
        if isinstance(t, SymExpr):
            if id(t) not in emitted:
                emitted[id(t)] = ctx.graph.create_node(t.kind, t.target, emit(t.args), emit(t.kwargs))
            return emitted[id(t)]
        if isinstance(t, (tuple, list)):
            return type(t)(emit(a) for a in t) if type(t) in (tuple, list) else tuple(emit(a) for a in t)
        if isinstance(t, dict):
            return {k: emit(v) for k, v in t.items()}
        if isinstance(t, slice):
            return slice(emit(t.start), emit(t.stop), emit(t.step))
        return t

    args, kwargs = emit(template)
    target = _stride_free_target(fn)
    if fn.kind == "call_function" and target in _SIZED_FACTORIES:  # sized at run time: see sized_call
        return ctx.graph.create_node("call_function", sized_call, (target.__name__, *args), kwargs)
    return ctx.graph.create_node(fn.kind, target, args, kwargs)


# Torch functions taking sizes (or a dtype) but no tensor: in a fused module's code, called through sized_call.
_SIZED_FACTORIES = frozenset(getattr(torch, name) for name in SIZED_FACTORIES)


def _template_leaves(t: Any) -> list[Any]:
    """The leaves of a call template, SymExprs included, looking through SymExpr arguments and slices."""
    if isinstance(t, SymExpr):
        return [t, *_template_leaves((t.args, t.kwargs))]
    if isinstance(t, (tuple, list)):
        return [leaf for a in t for leaf in _template_leaves(a)]
    if isinstance(t, dict):
        return [leaf for k, v in t.items() for leaf in (_template_leaves(v) if isinstance(k, str) else [k])]
    if isinstance(t, slice):
        return _template_leaves((t.start, t.stop, t.step))
    return [t]


def _spellable(target: Any, kind: str) -> bool:
    """Whether the generated code can call ``target`` so that a trace of the fused module records it as one call.

    A method name; a torch function or operator (they record themselves on Proxies); ``operator``, builtins and
    ``math`` (recorded by fx); a front-end helper marked :func:`traced_as_one_call`.  Not a user function that
    ``torch.fx.wrap`` made a leaf of the original trace: traced again from our code, it would run its body."""
    if kind == "call_method":
        return isinstance(target, str)
    if getattr(target, "traced_as_one_call", False) or isinstance(target, torch._ops.OpOverload):
        return True
    module = getattr(target, "__module__", None) or ""
    return callable(target) and (module in ("_operator", "operator", "builtins", "math") or module.split(".")[0] == "torch")


# ``x.view(...)`` needs strides that allow it; ``x.reshape(...)`` gives the same values on any tensor.
_VIEW_AS_RESHAPE = {
    ("call_method", "view"): "reshape",
    ("call_method", "view_as"): "reshape_as",
    ("call_function", torch.ops.aten.view.default): torch.ops.aten.reshape.default,
    ("call_function", torch.ops.aten._unsafe_view.default): torch.ops.aten.reshape.default,
}


def _stride_free(fn: nn.Module) -> nn.Module:
    """``fn`` (a copy, changed in place) with a carried-through ``x.view(sizes)``/``x.view_as(y)`` made a reshape.

    The model may have made ``x`` contiguous first (``x.transpose(1, 2).contiguous().view(B, -1)``);
    in the IR that ``contiguous`` is the identity and is gone.  ``x.view(dtype)`` is a bit cast and stays.
    """
    if isinstance(fn, FnCall) and fn.kind != "call_module":
        fn.target = _stride_free_target(fn)
    return fn


def _stride_free_target(fn: FnCall) -> Any:
    """The target of a carried call, a ``view`` made a ``reshape`` (see :func:`_stride_free`)."""
    try:
        swap = _VIEW_AS_RESHAPE.get((fn.kind, fn.target))
    except TypeError:  # an unhashable target
        return fn.target
    if swap is not None and not any(isinstance(a, torch.dtype) for a in pytree.tree_leaves((fn.args_template, fn.kwargs_template))):
        return swap
    return fn.target


def lowered_ops() -> Sequence[str]:
    """The ops of the table that have a torch lowering (the rest run by reference semantics)."""
    return [name for name, d in OPS.items() if "torch" in d.lowerings]
