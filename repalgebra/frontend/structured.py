"""Models whose ``forward`` takes lists, tuples or dicts of tensors (an FPN's feature maps), or ``*args``.

``torch.fx`` gives each parameter of ``forward`` one Proxy, which a Python loop cannot iterate: ``for f in feats``
and ``def forward(self, *feats)`` stop it, and ``fuse`` fell back to ``torch.export`` at fixed shapes (or refused
a list as an example input).  Instead, :func:`flat_view` gives the capture a view of the model whose ``forward``
takes the tensors one by one: it puts them back in the example's structure and calls the model's own ``forward``,
whose loops then run over a Python list of Proxies, as long as the example's.  The captured graph has one input
per tensor; :func:`restructured` gives the fused module the model's parameters again (``forward(self, feats)``),
each tensor read out of them as the example holds it, and ``fuse`` installs a guard that refuses a call of
another structure (another number of feature maps, other keys): the fused graph computes that many, no more.
"""

from __future__ import annotations

import collections
import copy
import inspect
import operator
import types
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.nn.modules.module import _WrappedHook
from torch.utils import _pytree as pytree

from repalgebra.call_dispatch import Signature

__all__ = ["needs_flat_view", "flat_leaves", "flat_view", "bound_view", "restructured", "unviewed", "structure_mismatch", "structure_text"]

VIEWED = "_repalgebra_flat_view"  # class attribute marking a view's class: the model's class it views


def needs_flat_view(model: nn.Module, args: tuple) -> bool:
    """Whether ``model`` called with ``args`` needs a flat view to be captured: an argument is a container of
    tensors, or ``forward`` takes ``*args``."""
    if any(not torch.is_tensor(a) for a in args):
        return True
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def flat_leaves(args: tuple) -> tuple[tuple[torch.Tensor, ...], pytree.TreeSpec]:
    """The tensors of ``args`` in order and their structure; ``TypeError`` naming a leaf that is not a tensor."""
    with_paths, spec = pytree.tree_flatten_with_path(args)
    for path, leaf in with_paths:
        if not torch.is_tensor(leaf):
            raise TypeError(f"example input {_where(path)} is a {type(leaf).__name__}, not a tensor (inputs are tensors, "
                            "or tuples, lists and dicts of them)")
    return tuple(leaf for _, leaf in with_paths), spec


def flat_view(model: nn.Module, spec: pytree.TreeSpec) -> nn.Module:
    """A view of ``model`` (its own submodules, parameters and buffers, not copies) whose ``forward`` takes the
    tensors of ``spec``'s structure one by one and calls ``model``'s ``forward`` with them in that structure.

    Its class is a subclass of the model's, of the same name, so the captures name its parts as the model's.  A
    ``forward`` set on the instance (``self.forward = self.forward_fast``) is the one called.  A GraphModule (a
    model fused before: it copies itself as a new class) is a new GraphModule reading its tensors one by one
    (:func:`_flat_graph`); None where its graph reads its arguments otherwise than item by item."""
    if isinstance(model, fx.GraphModule):
        return _flat_graph(model, spec)
    return _view(model, spec.num_leaves, lambda xs: (pytree.tree_unflatten(xs, spec), {}))


def bound_view(model: nn.Module, signature: Signature) -> nn.Module | None:
    """A view of ``model`` whose ``forward`` takes the tensors of a call of ``signature`` one by one and calls the
    model's ``forward`` with them in their places, the signature's constants in theirs (``blk(x, H, W)``: the view
    takes ``x``, and ``H`` and ``W`` are the numbers the example's call gave).  None for a GraphModule."""
    if isinstance(model, fx.GraphModule):
        return None
    return _view(model, len(signature.slots()), signature.bind)


def _view(model: nn.Module, inputs: int, bind: Callable[[list], tuple[tuple, dict]]) -> nn.Module:
    """A view of ``model`` whose ``forward`` takes ``inputs`` tensors and calls the model's ``forward`` with the
    arguments ``bind`` makes of them."""
    base = type(model)
    own = vars(model).get("forward")
    inner = own.__func__ if isinstance(own, types.MethodType) and own.__self__ is model else base.forward
    names = [f"x{k}" for k in range(inputs)]
    namespace: dict[str, Any] = {"_inner": inner, "_bind": bind}
    code = (f"def forward(self, {', '.join(names)}):\n"
            f"    args, kwargs = _bind([{', '.join(names)}])\n"
            f"    return _inner(self, *args, **kwargs)\n")
    exec(code, namespace)  # noqa: S102  (fx reads the inputs' names from the code object)
    cls = type(base.__name__, (base,), {"forward": namespace["forward"], VIEWED: base, "__module__": base.__module__})
    view = copy.copy(model)  # shares the submodule, parameter and buffer dicts: nothing is copied
    view.__dict__.pop("forward", None)
    # A guard of the structure (an earlier fuse's) checks the model's arguments, not the view's tensors.
    view._forward_pre_hooks = OrderedDict((k, h) for k, h in model._forward_pre_hooks.items() if not getattr(h, "structural", False))
    view._forward_pre_hooks_with_kwargs = OrderedDict((k, v) for k, v in model._forward_pre_hooks_with_kwargs.items() if k in view._forward_pre_hooks)
    for name in _STATE_DICT_HOOKS:  # (they hold the model by a weak reference: a copy of the view would lose it)
        setattr(view, name, OrderedDict((k, _rebound(h, model, view)) for k, h in getattr(model, name, {}).items()))
    view.__class__ = cls
    return view


_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _rebound(hook: Any, model: nn.Module, view: nn.Module) -> Any:
    """A state-dict hook of ``model``'s for ``view``: torch wraps one that takes the module
    (``register_load_state_dict_pre_hook``) holding a weak reference to it, which a copy of the view copies as a
    second model held by nothing, and the next copy refused the dead reference (torch's ``checkpoint_wrapper`` on
    a whole model; review R19b)."""
    if isinstance(hook, _WrappedHook) and hook.with_module and hook.module() is model:
        return _WrappedHook(hook.hook, view)
    return hook


def _flat_graph(gm: fx.GraphModule, spec: pytree.TreeSpec) -> fx.GraphModule | None:
    """``gm`` taking the tensors of ``spec``'s structure one by one, where its graph only reads its arguments item
    by item (``feats[0]``, ``maps["p3"]``: what :func:`restructured` writes); else None."""
    args = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    tops = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(tops) != len(args):
        return None
    graph = fx.Graph()
    xs = [graph.placeholder(f"x{k}") for k in range(spec.num_leaves)]
    env: dict[fx.Node, fx.Node] = {}
    for top, arg in zip(tops, args):
        if isinstance(arg, int):
            env[top] = xs[arg]
            continue
        for path, leaf in pytree.tree_flatten_with_path(arg)[0]:
            node = top
            for key in path:
                read, at = _access(key)
                node = next((u for u in node.users if u.op == "call_function" and u.target is read and u.args[1] == at), None)
                if node is None:
                    return None
            env[node] = xs[leaf]
    # The arguments that are containers and the items on the way to their tensors: not copied.  (Not an argument
    # that is a tensor itself: ``x.shape[0]`` of it is a read the graph makes; ultralytics' forward(x, *args)
    # made its export refuse, found by a probe.)
    inside = {top for top, arg in zip(tops, args) if not isinstance(arg, int)}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in env:
            continue
        if n.op == "call_function" and n.target in (operator.getitem, getattr) and n.args[0] in inside:
            inside.add(n)
            continue
        try:
            if n.op == "output":
                graph.output(fx.node.map_arg(n.args[0], lambda a: env[a]))
            else:
                env[n] = graph.node_copy(n, lambda a: env[a])
        except KeyError:
            return None  # an argument read whole (its length, a loop over it), not item by item
    return fx.GraphModule(gm, graph, type(gm).__name__)


def unviewed(module: nn.Module, model: nn.Module) -> nn.Module:
    """``module`` (a copy of a flat view, fused inside or not) as an instance of the model's own class again, its
    ``forward`` the model's (an instance ``forward`` bound to it); any other module as it is."""
    base = getattr(type(module), VIEWED, None)
    if base is None:
        return module
    module.__class__ = base
    own = vars(model).get("forward")
    if isinstance(own, types.MethodType) and own.__self__ is model:
        module.forward = types.MethodType(own.__func__, module)
    return module


def restructured(gm: fx.GraphModule, model: nn.Module, spec: pytree.TreeSpec) -> fx.GraphModule:
    """``gm`` (a fused graph taking the tensors of ``spec`` one by one) taking ``model``'s arguments instead: one
    parameter per argument of the example (named as ``forward`` names them), each tensor read out of it."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    graph = fx.Graph()
    args = pytree.tree_unflatten([object()] * spec.num_leaves, spec)  # the example's structure, leaves aside
    tops, taken = [], set()
    for k in range(len(args)):
        p = params[min(k, len(params) - 1)] if params else None
        name = p.name if p is not None and p.kind is not inspect.Parameter.VAR_POSITIONAL else f"{p.name if p else 'x'}_{k}"
        name = name if name not in taken else f"{name}_{k}"
        taken.add(name)
        tops.append(graph.placeholder(name))
    env: dict[fx.Node, fx.Node] = {}
    for (path, _), placeholder in zip(pytree.tree_flatten_with_path(args)[0], old):
        value = tops[path[0].idx]
        for key in path[1:]:
            read, at = _access(key)
            value = graph.call_function(read, (value, at))
        env[placeholder] = value
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    new = fx.GraphModule(gm, graph, type(gm).__name__)
    for hook in gm._forward_pre_hooks.values():  # a shape guard: also on the copies (its own install)
        hook.install(new) if hasattr(hook, "install") else new.register_forward_pre_hook(hook, with_kwargs=True)
    return new.train(gm.training)


def structure_mismatch(skeleton: Any, args: tuple) -> str | None:
    """Why a call with ``args`` is not of the structure of ``skeleton`` (the example's containers, a 0 per tensor),
    or None where it is (or where a trace calls with Proxies).  A leaf that is no tensor (``(3.0, x)`` for a model
    fused with ``(t, x)``) is another structure: the graph reads a tensor there, and pytree counts a number as a
    leaf as it counts a tensor (such a call passed every check before the graph's own; found by a review)."""
    leaves, spec = pytree.tree_flatten(args)
    if any(isinstance(a, fx.Proxy) for a in leaves):
        return None
    want = pytree.tree_structure(skeleton)
    if spec != want or not all(torch.is_tensor(a) for a in leaves):
        return (f"the model was fused with inputs {structure_text(want)} and computes that many tensors; it was called "
                f"with {structure_text(spec, leaves)}")
    return None


def structure_text(spec: pytree.TreeSpec, leaves: list | None = None) -> str:
    """The structure of a call's arguments, for a message: ``(list of 3 tensors, tensor)``; with the call's
    ``leaves``, each that is no tensor by its type (``(tensor, bool, bool)``, not three tensors)."""
    kinds = [_kind(leaf) for leaf in leaves] if leaves is not None else []
    read = iter(kinds)

    def text(s: pytree.TreeSpec) -> str:
        if s.is_leaf():
            return next(read, "tensor")
        items = [text(c) for c in s.children()]  # (every leaf read in order, under a dict too)
        if isinstance(s.type, type) and issubclass(s.type, dict):
            keys = f"{s.type.__name__} with keys {list(s.context)}"
            return keys if all(k == "tensor" for k in kinds) else f"{keys} [{', '.join(items)}]"
        name = s.context.__name__ if s.type is collections.namedtuple else s.type.__name__  # a named tuple's own class
        if all(c.is_leaf() for c in s.children()) and all(i == "tensor" for i in items):
            return f"{name} of {s.num_children} tensor{'s' * (s.num_children != 1)}"
        return f"{name} [{', '.join(items)}]"

    return "(" + ", ".join(text(c) for c in spec.children()) + ")"


def _kind(leaf: Any) -> str:
    """A leaf of a call's arguments as a message names it: ``tensor``, ``None``, ``float``."""
    return "tensor" if torch.is_tensor(leaf) or isinstance(leaf, fx.Proxy) else "None" if leaf is None else type(leaf).__name__


def _access(key: Any) -> tuple[Any, Any]:
    """How a pytree path step reads its child: ``(operator.getitem, index or key)`` of a sequence or dict,
    ``(getattr, name)`` of a named tuple's field (pytree names those by attribute)."""
    if isinstance(key, pytree.GetAttrKey):
        return getattr, key.name
    return operator.getitem, key.idx if isinstance(key, pytree.SequenceKey) else key.key


def _where(path: tuple) -> str:
    return f"{path[0].idx}" + "".join(f".{k.name}" if isinstance(k, pytree.GetAttrKey) else f"[{_access(k)[1]!r}]" for k in path[1:])
