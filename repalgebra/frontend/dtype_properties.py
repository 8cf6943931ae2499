"""``self.dtype`` read off the model's parameters, kept following them in the traced graph.

Hugging Face's ``ModuleUtilsMixin.dtype`` and diffusers' ``ModelMixin.dtype`` are properties reading
``next(self.parameters()).dtype``.  torch.fx runs a property on the real module, so ``pixel_values.to(self.dtype)``
was recorded as a cast to the float32 of the trace: the fused graph kept it whatever its parameters became, and
``fuse`` kept the fused model to float32 inputs, refusing a float64 batch the model casts and runs (a probe).
:func:`follow_dtype_properties` traces a second copy with such properties answering another dtype: the dtype
arguments that change with the answer, and nothing else does, come from a property that reads the parameters
(asked again with stand-ins of another dtype in their place); they are read off a parameter
in the graph (``x.to(w.dtype)``, as ``x.to(self.conv.weight.dtype)`` traces), so a cast of the fused model moves
them as a cast of the model moves the property.  Where anything else changes (``torch.finfo(self.dtype).min``
baked in as a number) the graph stays as traced, and ``fuse`` guards its fixed casts as before.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

__all__ = ["follow_dtype_properties", "follow_parameters_dtype"]

_OWN = object()  # a class without a ``dtype`` of its own (the property is inherited)


def dtype_properties(model: nn.Module) -> dict[type, property]:
    """The classes of ``model``'s modules whose ``dtype`` is a property of code outside torch, each with it."""
    found: dict[type, property] = {}
    for cls in {type(m) for m in model.modules()}:
        prop = inspect.getattr_static(cls, "dtype", None)
        if isinstance(prop, property) and not (getattr(prop.fget, "__module__", None) or "torch").startswith("torch"):
            found[cls] = prop
    return found


@contextlib.contextmanager
def answering(classes: Iterable[type], dtype: torch.dtype) -> Iterator[None]:
    """Within the block, the ``dtype`` property of each class answers ``dtype``."""
    saved = {cls: vars(cls).get("dtype", _OWN) for cls in classes}
    try:
        for cls in saved:
            setattr(cls, "dtype", property(lambda self: dtype))
        yield
    finally:
        for cls, own in saved.items():
            if own is _OWN:
                delattr(cls, "dtype")
            else:
                setattr(cls, "dtype", own)


def follow_dtype_properties(model: nn.Module, work: nn.Module, fx_graph: fx.Graph, retrace: Any) -> str | None:
    """Make the dtype arguments of ``fx_graph`` (traced from ``work``, a copy of ``model``) that came from a ``dtype``
    property read off a parameter of ``work``; ``retrace()`` traces a fresh copy and returns its graph.  Returns a
    note for the report, or None where nothing changed."""
    props = dtype_properties(model)
    values = set()
    for m in model.modules():
        if type(m) in props:
            try:
                values.add(props[type(m)].fget(m))
            except Exception:  # noqa: BLE001  (a property that fails outside a call: not one of these)
                return None
    if len(values) != 1 or not isinstance(dtype := values.pop(), torch.dtype) or not dtype.is_floating_point:
        return None
    if not any(a == dtype for n in fx_graph.nodes for a in _leaves(n) if isinstance(a, torch.dtype)):
        return None
    other = torch.float64 if dtype != torch.float64 else torch.float32
    if not all(follows_the_tensors(m, props[type(m)], other) for m in model.modules() if type(m) in props):
        return None  # (a dtype the module was configured with: a cast of it leaves that one)
    try:
        with answering(props, other):
            second = retrace()
    except Exception:  # noqa: BLE001  (it does not trace so: the graph stays as traced)
        return None
    reads = _read_from_the_property(fx_graph, second, dtype, other)
    if (name := _read_off(fx_graph, reads, work, dtype)) is None:
        return None
    return (f"its forward reads a dtype off the model's parameters (a dtype property, Hugging Face's self.dtype) in "
            f"{len(reads)} call{'s' * (len(reads) != 1)}: read off {name!r} in the fused graph, so it follows a cast of it")


def follow_parameters_dtype(model: nn.Module, work: nn.Module, fx_graph: fx.Graph, retrace: Any) -> str | None:
    """Make the dtype arguments of ``fx_graph`` that came from the model's parameters inline
    (``x.to(next(self.parameters()).dtype)``, timm's and Hugging Face's ``dtype = next(self.parameters()).dtype``:
    fx runs ``self.parameters()`` on the real module, so the dtype is a constant of the trace) read off a parameter
    of ``work``; ``retrace(m)`` traces a fresh copy of ``m`` and returns its graph.  Returns a note, or None where
    nothing changed.

    Only where every floating parameter and buffer has one dtype: the model is traced again with stand-ins of
    another dtype in their place, and the dtype arguments that change with them, and nothing else does, read the
    tensors.  The stand-ins are meta tensors: a device argument that is theirs in the second trace where it is the
    model's (one device) in the first (``next(self.parameters()).device``) is read off the parameter too.  Which one they read is not known, so a parameter stands for all: a cast of the whole model
    (``fused.double()``) moves it as it moves them.  A dtype of the code (``torch.float32``, a configured
    ``self._dtype``) does not change, and a number made from one (``torch.finfo(dtype).min``) or a buffer traced
    as a constant differs otherwise: the graph stays as traced."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    if not any(a == dtype for n in fx_graph.nodes for a in _leaves(n) if isinstance(a, torch.dtype)):
        return None
    other = torch.float64 if dtype != torch.float64 else torch.float32
    try:
        with standing_in(model, other):
            second = retrace(model)
    except Exception:  # noqa: BLE001  (it does not trace so: the graph stays as traced)
        return None
    devices = {t.device for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    reads = _read_from_the_property(fx_graph, second, dtype, other, devices.pop() if len(devices) == 1 else None)
    if (name := _read_off(fx_graph, reads, work, dtype)) is None:
        return None
    return (f"its forward reads a dtype off the model's parameters (next(self.parameters()).dtype) in {len(reads)} "
            f"call{'s' * (len(reads) != 1)}: read off {name!r} in the fused graph, so it follows a cast of the model")


def _read_off(fx_graph: fx.Graph, reads: dict[fx.Node, list[tuple[int, str]]], work: nn.Module, dtype: torch.dtype) -> str | None:
    """Make the argument positions ``reads`` names read the attribute named with them (``dtype``, ``device``) of the
    smallest parameter of ``work`` in ``dtype`` (the fused graph holds a copy of it), or of its smallest floating
    buffer in ``dtype`` where it has no such parameter (``x.to(next(self.buffers()).dtype)`` in a module without
    parameters stayed the trace's float32, and ``fused.double()`` refused what the model casts and runs; review R6
    finding 05): a cast of the model casts its buffers as it casts its parameters.  Returns its name, or None
    where there are no reads or no such tensor."""
    held = ([(name, p) for name, p in work.named_parameters() if p.dtype == dtype]
            or [(name, b) for name, b in work.named_buffers() if b.is_floating_point() and b.dtype == dtype])
    if not reads or not held:
        return None
    name = min(held, key=lambda item: item[1].numel())[0]
    first = next(n for n in fx_graph.nodes if n in reads)
    with fx_graph.inserting_before(first):
        weight = fx_graph.get_attr(name)
        read = {attr: fx_graph.call_function(getattr, (weight, attr)) for attr in ("dtype", "device")}
    for node, positions in reads.items():
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        for i, attr in positions:
            leaves[i] = read[attr]
        node.args, node.kwargs = pytree.tree_unflatten(leaves, spec)
    for unread in read.values():
        if not unread.users:
            fx_graph.erase_node(unread)
    return name


def follows_the_tensors(m: nn.Module, prop: property, dtype: torch.dtype) -> bool:
    """Whether ``prop`` of ``m`` answers ``dtype`` where ``m``'s floating parameters and buffers are of ``dtype``
    (:func:`standing_in`): it reads them, as a cast of the model changes it, and not a dtype of its own
    (``return self._dtype``)."""
    try:
        with standing_in(m, dtype):
            return prop.fget(m) == dtype
    except Exception:  # noqa: BLE001  (it reads more than the dtype: not this property)
        return False


@contextlib.contextmanager
def standing_in(m: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, ``m``'s floating parameters and buffers are meta tensors of ``dtype`` (shared ones by one
    stand-in each); the module is as it was after."""
    saved, made = [], {}
    try:
        for sub in m.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in [(k, v) for k, v in table.items() if v is not None and v.is_floating_point()]:
                    saved.append((table, name, t))
                    if id(t) not in made:  # (tied weights stay tied: one tensor under two names)
                        stand_in = torch.empty(t.shape, dtype=dtype, device="meta")
                        made[id(t)] = nn.Parameter(stand_in, requires_grad=False) if isinstance(t, nn.Parameter) else stand_in
                    table[name] = made[id(t)]
        yield
    finally:
        for table, name, t in reversed(saved):
            table[name] = t


def _leaves(n: fx.Node) -> list[Any]:
    return pytree.tree_leaves((n.args, n.kwargs))


def _read_from_the_property(graph: fx.Graph, second: fx.Graph, dtype: torch.dtype, other: torch.dtype,
                            device: torch.device | None = None) -> dict[fx.Node, list[tuple[int, str]]]:
    """Each node of ``graph`` whose arguments are ``other`` in ``second`` (traced with the property answering it) where
    they are ``dtype`` in ``graph``, with their positions among its argument leaves (and ``"dtype"``); with a
    ``device``, also those that are the meta device in ``second`` where they are ``device`` in ``graph`` (and
    ``"device"``: stand-ins on the meta device were read); empty where the two graphs differ otherwise (another op,
    another constant)."""
    nodes, again = list(graph.nodes), list(second.nodes)
    if len(nodes) != len(again):
        return {}
    reads: dict[fx.Node, list[int]] = {}
    for n, m in zip(nodes, again):
        if (n.op, n.target) != (m.op, m.target) and not (n.op == m.op == "call_function" and n.target is m.target):
            return {}
        a, b = pytree.tree_flatten((n.args, n.kwargs)), pytree.tree_flatten((m.args, m.kwargs))
        if a[1] != b[1]:
            return {}
        for i, (x, y) in enumerate(zip(a[0], b[0])):
            if x is dtype and y is other:
                reads.setdefault(n, []).append((i, "dtype"))
            elif device is not None and isinstance(x, torch.device) and x == device and _on_meta(y):
                reads.setdefault(n, []).append((i, "device"))
            elif not _same(x, y):
                return {}
    return reads


def _on_meta(y: Any) -> bool:
    return isinstance(y, torch.device) and y.type == "meta"


def _same(x: Any, y: Any) -> bool:
    """Whether two argument leaves of corresponding nodes are the same: nodes by name, tensors by identity of
    values, the rest by equality."""
    if isinstance(x, fx.Node) or isinstance(y, fx.Node):
        return isinstance(x, fx.Node) and isinstance(y, fx.Node) and x.name == y.name
    if torch.is_tensor(x) or torch.is_tensor(y):
        return torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all())
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:  # noqa: BLE001
        return False
