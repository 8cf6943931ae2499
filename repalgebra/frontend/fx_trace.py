"""Symbolic tracing with ``torch.fx``: an eval-mode copy of the model to an fx graph, and one real run of it.

:func:`copy_for_tracing` deep-copies the model in eval mode (wrapping it in
:class:`Root` when the model is itself a module the tracer keeps whole) and
builds the :class:`Tracer`: it keeps the recognised modules (those the handler
tables map to an op, see :func:`recognised`) and the user's ``leaf_modules``
whole, and records the module path of every node.  :func:`trace_fx` traces the
copy; when it fails, :func:`untraceable` names the module and the
``leaf_modules`` fix.  :func:`record_run` runs the traced copy once, for the
calls whose shapes cannot be learned on meta tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import inspect
import operator
import threading
import traceback
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import fx, nn

from torch.nn.modules import module as _torch_module  # its global hook registries
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils import _pytree as pytree

from repalgebra.channel_affine import ChannelAffine
from repalgebra.frontend.autocast_off import autocast_left_off, autocast_turned_off, device_type_of
from repalgebra.frontend.calls import FnCall
from repalgebra.frontend.capture import cloned
from repalgebra.frontend.inplace import MADE_CONSTANT, MADE_IN_TRACE, READ_AT_VERSION, InplaceProxy, constant_writes, hidden_writes, versions
from repalgebra.frontend.mode_flags import mode_flags_refused
from repalgebra.frontend.module_globals import globals_kept
from repalgebra.frontend.ranks import MADE_READS, Ranks, shape_length
from repalgebra.frontend.size_tests import taken_as_traced
from repalgebra.frontend.wrappers import is_wrapper, wrapped
from repalgebra.module_copy import eval_copy, not_the_models
from repalgebra.one_call import SIZED_FACTORIES

LeafSpec = "type[nn.Module] | nn.Module | str"


class UntraceableError(TypeError):
    """``torch.fx`` cannot trace (part of) the model; the message names the module path and the fix.

    ``path`` is that module's path in the model (``""``: its own ``forward``).
    """

    path: str = ""


class DtypeReadOutside(UntraceableError):
    """Python used a traced ``x.dtype`` outside the graph (``x.dtype is torch.float16``, ``str(x.dtype)``, a read
    left unused): :func:`~repalgebra.frontend.torch.trace_with_details` traces again with every dtype as at the
    example (:attr:`Tracer.dtypes_as_traced`)."""


def copy_for_tracing(model: nn.Module, leaf_modules: Iterable[Any],
                     carried: tuple[Carried, ...] = ()) -> tuple[nn.Module, Tracer, str]:
    """An eval-mode deep copy of ``model`` to trace, the tracer for it, and the copy's prefix.

    The prefix is the child name of ``model`` in the copy: ``"m"`` when the
    model is itself kept whole and so is wrapped in a :class:`Root`, else ``""``.
    ``carried``: functions the tracer records as calls (:func:`carried_function`).
    """
    leaf_types, leaf_paths = leaf_specs(model, leaf_modules)
    work = eval_copy(model)  # TypeError naming what does not copy (a lock, a generator)
    # fx never asks whether the root is a leaf, calls its forward without its hooks or its class's own ``__call__``
    # (one that rescales 0..255 images around ``super().__call__``: a probe), and traces its class's forward (not
    # one ``__init__`` set on the instance: ``self.forward = self.forward_layer_scale``): give it a parent
    wrapped = (recognised(work) is not None or isinstance(work, leaf_types) or "" in leaf_paths or _runs_hooks(work)
               or "forward" in vars(work) or _calls_its_own_way(work))
    if wrapped:
        work = Root(work)
        leaf_paths = {"m." + p if p else "m" for p in leaf_paths}
    return work, Tracer(leaf_types, leaf_paths, carried), "m" if wrapped else ""


def _calls_its_own_way(module: nn.Module) -> bool:
    """Whether ``module``'s class has a ``__call__`` of its own (a GraphModule's, set by ``recompile``, only reports
    errors in its generated code)."""
    return type(module).__call__ is not nn.Module.__call__ and not isinstance(module, fx.GraphModule)


def trace_fx(work: nn.Module, tracer: Tracer, n_given: int | None) -> tuple[fx.Graph, list[fx.Node]]:
    """The fx graph of ``work`` and its tensor input placeholders (``n_given`` inputs, or None: all without defaults).

    Defaults of the ``forward`` arguments after the given inputs are baked in.
    """
    concrete = concrete_args(work, n_given)
    try:
        with globals_kept(work), _no_autocast(work, tracer), _proxies_are_tensors(), _calls_sized_by_traced_values() as mode, \
                mode_flags_refused(work) as answered:
            tracer.made = mode.made
            fx_graph = tracer.trace(work, concrete_args=concrete or None)
    except Exception as e:
        raise untraceable(work, tracer.path_stack, e) from e
    tracer.answered += answered
    if tracer.dtype_read_outside():
        raise DtypeReadOutside(f"cannot trace the forward() of {type(work).__name__}: it looks at x.dtype where torch.fx "
                               "cannot record it (x.dtype is torch.float64, str(x.dtype)), so the branch it took is not known")
    all_placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    star = [n for n in all_placeholders if str(n.target).startswith("*") and not str(n.target).startswith("**")]
    if star:  # ``xs[0]`` of that Proxy would be read as a tensor's first row
        raise UntraceableError(f"cannot trace the forward() of {type(work).__name__} itself: it takes {star[0].target}, "
                               "which torch.fx makes one symbolic tuple of unknown length")
    named = [n for n in all_placeholders if not str(n.target).startswith("**")]  # **kwargs: none given, baked in as {}
    return fx_graph, named[: len(named) - len(concrete)]


@contextlib.contextmanager
def _no_autocast(model: nn.Module, tracer: "Tracer") -> Iterator[None]:
    """Make entering ``torch.autocast`` fail while tracing: fx records the ops of a ``with torch.autocast(...):``
    block but not the block, and the graph would compute in the model's dtype what the model computes in half.

    One that turns autocast off on another device than the model's (mmdet's ``torch.cuda.amp.autocast(enabled=False)``
    around a pool, in a model on the CPU) changes nothing the model computes there: it is entered, and noted as a
    flag taken as the fused model runs (on the model's device), as ``x.is_cuda`` is.  One that turns it off on the
    model's device (Hugging Face's rotary embeddings, in every LLaMA-like decoder; ``@torch.amp.custom_fwd(
    cast_inputs=torch.float32)``, review R19b) changes nothing either where the caller has autocast off: it is
    entered, and recorded as a check the fused model makes on every call (:func:`autocast_left_off`: a call under
    autocast is refused)."""
    device = device_type_of(model)

    def left_off(on: str) -> None:
        if on != device:
            tracer.flags.append(f"torch.autocast({on!r}, enabled=False) taken as doing nothing on {device}")
        else:
            tracer.autocast_left_off(on)

    def turned_on(autocast: Any) -> None:
        raise TypeError(f"forward() enters torch.autocast({autocast.device!r}, dtype={autocast.fast_dtype}): "
                        "torch.fx does not record it")

    with autocast_turned_off(left_off, turned_on):
        yield


@contextlib.contextmanager
def _proxies_are_tensors() -> Iterator[None]:
    """Make ``torch.is_tensor`` true of a traced value, as of the tensor it stands for, while tracing.

    A Proxy is not a Tensor: fx would record the other branch of ``if torch.is_tensor(mask) and mask.any():``
    without a word, where the model takes this one (and then fails, as it must, on the value test)."""
    original = torch.is_tensor

    def is_tensor(obj: Any) -> bool:
        return isinstance(obj, fx.Proxy) or original(obj)

    torch.is_tensor = is_tensor
    try:
        yield
    finally:
        torch.is_tensor = original


@contextlib.contextmanager
def _calls_sized_by_traced_values() -> Iterator["_IndexedBySizes"]:
    """Record calls that take a traced size, or dtype, where they take no tensor to dispatch on, while tracing.

    fx hands out buffers as the tensors they are, and torch's factories take sizes only: such a call runs at
    once and fails on the Proxy among its arguments (``expand() takes 1 positional argument but 3 were given``),
    and the model fell back to a capture at fixed sizes.  Recorded as calls, they read the size, or the dtype,
    on every call: BERT's ``self.position_ids[:, :seq_length]``, LLaMA's rotary
    ``self.inv_freq[None, :, None].expand(B, -1, 1)``, CLIP's ``torch.empty(bsz, L, L)`` causal mask, EdgeNeXt's
    ``torch.zeros(B, H, W)``, HF's ``torch.finfo(scores.dtype).min``."""
    # torch._dynamo builds its tables of constant types (torch.finfo among them) when first imported: imported here
    # under the patch, by a capture of a part inside a trace, it held these stand-ins, and torch.compile failed in
    # that process from then on (found by the test suite, run in another order).
    import torch._dynamo.utils  # noqa: F401

    patched: list[tuple[Any, str, Any]] = []  # (owner, name, its own attribute before, or None: inherited)

    def record(owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name)
        target = name if kind == "call_method" else original

        def call(*args: Any, **kwargs: Any) -> Any:
            if kind == "call_method" and isinstance(args[0], fx.Proxy):
                return original(*args, **kwargs)
            proxy = _proxy_in((args, kwargs))
            if proxy is None:
                return original(*args, **kwargs)
            return proxy.tracer.create_proxy(kind, target, args, kwargs)

        patched.append((owner, name, vars(owner).get(name)))
        setattr(owner, name, call)

    for name in _SIZED_METHODS:
        record(torch.Tensor, name, "call_method")
    for name in SIZED_FACTORIES:
        record(torch, name, "call_function")
    try:
        with _IndexedBySizes() as mode:
            yield mode
    finally:
        for owner, name, own in reversed(patched):
            if own is None:  # torch.Tensor inherits its methods from the C TensorBase: a copy on it would not be
                delattr(owner, name)  # the C slot, and torch would dispatch indexing through Python from then on
            else:
                setattr(owner, name, own)


# Tensor methods and torch functions recorded where a traced value is among their arguments (see above).  Not
# ``__getitem__``: set on torch.Tensor, a dunder changes the type's C slots for good (a tensor would then pass
# for a Python sequence, and ``torch.tensor(t)`` of a 0-d one fail); indexing goes through a mode instead.
_SIZED_METHODS = ("expand", "view", "reshape", "repeat", "new_zeros", "new_ones", "new_empty", "new_full")


class _IndexedBySizes(TorchFunctionMode):
    """``buffer[:, :n]`` with ``n`` traced: recorded as a call (torch reads a slice's bounds as ints, and fails).

    Also refuses, while tracing, a call that computes at once (no traced value among its arguments) with a tensor
    written before with a traced value (``k = torch.zeros(...); k[i, i] = tmp[i]``, ECBSR's kernels): the trace
    records the write, which never runs on the tensor, so such a call would compute from the values before it
    (``k.abs().sum()`` of a kernel of zeros) and the graph hold that result as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[int, torch.Tensor] = {}  # where such tensors live -> the tensor (kept: its memory not reused)
        self.made: set[int] = set()  # where the tensors made while tracing live, in storage of their own (see MADE_IN_TRACE)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and not isinstance(args[0], fx.Proxy) and (proxy := _proxy_in(args[1:])) is not None:
            return proxy.tracer.create_proxy("call_function", operator.getitem, args, kwargs)
        if _writes_real_tensor(func, args) and _proxy_in((args[1:], kwargs)) is not None:
            self.written[args[0].untyped_storage().data_ptr()] = args[0]
        elif self.written and not _APPLYING and not _metadata(func) and _proxy_in((args, kwargs)) is None and any(
                t.untyped_storage().data_ptr() in self.written for t in _tensors_in((args, kwargs))):
            raise TypeError(f"{getattr(func, '__name__', func)} computes at once, while tracing, with a tensor the code made and "
                            "wrote a traced value into (k[i] = v): it would compute from the values before the write")
        out = func(*args, **kwargs)
        if type(out) is torch.Tensor and out.untyped_storage().nbytes() and (
                (ptr := out.untyped_storage().data_ptr()) not in {t.untyped_storage().data_ptr() for t in _tensors_in((args, kwargs))}):
            self.made.add(ptr)  # (not a view of what it was given: made here; a module-level tensor never is)
        return out


def _writes_real_tensor(func: Any, args: tuple) -> bool:
    """Whether ``func`` writes into ``args[0]``, a tensor (not a traced value): an item assignment or an in-place method."""
    name = getattr(func, "__name__", "")
    return (bool(args) and torch.is_tensor(args[0]) and not isinstance(args[0], fx.Proxy)
            and (name == "__setitem__" or (name.endswith("_") and not name.startswith("_"))))


# What reads a tensor's metadata, never its values: ``k.shape``, ``k.size(0)``, ``k.dtype`` (a property's getter is
# ``__get__`` of a descriptor that names it)
_METADATA = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse", "is_leaf", "grad_fn",
             "names", "size", "dim", "ndimension", "numel", "nelement", "stride", "get_device", "is_floating_point",
             "is_complex", "is_contiguous", "element_size", "storage_offset", "_version", "__hash__", "untyped_storage", "data_ptr"}


def _metadata(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return (getattr(getattr(func, "__self__", None), "__name__", "") if name == "__get__" else name) in _METADATA


def _tensors_in(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()]


def _proxy_in(tree: Any) -> fx.Proxy | None:
    """The first traced value among ``tree``'s leaves, slices' bounds included."""
    return next((a for a in pytree.tree_leaves(_slices_opened(tree)) if isinstance(a, fx.Proxy)), None)


def _slices_opened(index: Any) -> Any:
    """``index`` with each slice as the tuple of its bounds (pytree does not look into a slice)."""
    if isinstance(index, slice):
        return (index.start, index.stop, index.step)
    if isinstance(index, (tuple, list)):
        return [_slices_opened(i) for i in index]
    if isinstance(index, dict):
        return {k: _slices_opened(v) for k, v in index.items()}
    return index


# --------------------------------------------------------------------------- which modules stay whole


DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Recognised module classes and the forward each must still use (a subclass with its own forward is not recognised).
_RECOGNISED: tuple[type, ...] = (
    nn.Conv2d,
    nn.Conv1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose1d,
    nn.ConvTranspose3d,
    ChannelAffine,  # the torch back end's 1x1 depthwise conv
    nn.Conv3d,
    nn.SyncBatchNorm,  # its own forward, which in eval mode is _BatchNorm's (a synchronised batch is for training)
    _BatchNorm,
    _InstanceNorm,  # with running statistics, in eval mode, a BatchNorm (see handlers_modules._m_instance_norm)
    nn.Linear,
    nn.Identity,
    *DROPOUTS,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.ReLU,
    nn.GELU,
    nn.Sigmoid,
    nn.ConstantPad2d,
    nn.Flatten,
    nn.Softmax,
    nn.LogSoftmax,
    nn.GLU,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool2d,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.Softplus,
    nn.LogSigmoid,
    nn.PReLU,
    nn.Hardtanh,  # and nn.ReLU6
    nn.Threshold,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GroupNorm,
    nn.Upsample,  # and nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Unfold,
    nn.Fold,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)


def rebuilt_from_fields(a: Any) -> dict[str, Any] | None:
    """The fields of ``a``, a dataclass that is also a dict (``ModelOutput``: its ``__post_init__`` puts the fields
    that are not None in the dict, in their order), where calling its class on them gives ``a`` again: every field
    taken by ``__init__``, and the items those that are not None, in that order, each the field itself; else None
    (a key set after it was made would be lost)."""
    if not (dataclasses.is_dataclass(a) and isinstance(a, dict)) or isinstance(a, type):
        return None
    fields = dataclasses.fields(a)
    if not all(f.init for f in fields):
        return None
    values = {f.name: getattr(a, f.name) for f in fields}
    given = [k for k, v in values.items() if v is not None]
    if list(a.keys()) != given or any(dict.__getitem__(a, k) is not values[k] for k in given):
        return None
    return values


class Root(nn.Module):
    """A parent for a model that is itself a leaf (a lone ``Conv2d``), which fx would trace into.

    Its ``forward`` takes the model's inputs by name (fx reads them from the code object: a fused model of two
    inputs, kept a leaf for its shape guard, is called with both)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def __new__(cls, m: nn.Module | None = None) -> "Root":  # without ``m``: a copy being made of one
        if cls is Root and m is not None:
            cls = type("Root", (Root,), {"forward": _forward_calling_m(m.forward), "__doc__": Root.__doc__})
        return super().__new__(cls)


def _forward_calling_m(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``def forward(self, a, b): return self.m(a, b)`` for the parameters of ``fn`` that have no default (the others
    keep their defaults, as in a call with the inputs only)."""
    params = inspect.signature(fn).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = ", ".join(p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty) or "x"
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.m({names})\n", namespace)  # noqa: S102
    return namespace["forward"]


def runs_own_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks or pre-hooks of its own, other than the weight-norm ones its handler reads
    (:func:`recognised`) and checks that change nothing (``checks_only``: the shape guard of a fused part)."""
    hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
    return any(not getattr(h, "checks_only", False) for h in hooks) and recognised(m) is None


def _runs_hooks(m: nn.Module) -> bool:
    """Whether calls of ``m`` run forward hooks or pre-hooks (its own, or ones registered for every module), other than
    checks that change nothing it computes (a fused model's guard, its eval-mode hook: a trace may step past them)."""
    hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
    return any(not getattr(h, "checks_only", False) for h in hooks) or bool(_torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks)


# Forward pre-hooks that only set ``weight`` from other parameters and buffers before each call (the old hook-based
# ``torch.nn.utils.weight_norm`` and ``spectral_norm``, ``torch.nn.utils.prune``'s ``weight_orig * weight_mask``):
# the module computes what it would with that weight.  Recognised on the layers whose handlers read the weight
# with :func:`module_weight`.
WEIGHT_HOOKS = (WeightNorm, SpectralNorm, BasePruningMethod)


def _sets(hook: Any) -> str | None:
    """The attribute a weight hook sets (``weight``, or ``bias`` for a pruned bias), else None."""
    return hook._tensor_name if isinstance(hook, BasePruningMethod) else getattr(hook, "name", None)


def _weight_hooks_only(m: nn.Module) -> bool:
    """Whether ``m``'s pre-hooks only set its weight (a conv's, a Linear's; pruning, its bias too) or, pruning, a
    BatchNorm's weight or bias (network slimming prunes BN scales; a global pruning loop over every ``weight`` takes the BNs too, and no
    BatchNorm of the model folded, found by a probe): its handler reads what they set."""
    hooks = [h for h in m._forward_pre_hooks.values() if not getattr(h, "checks_only", False)]
    if isinstance(m, _BatchNorm):
        sets = all(isinstance(h, BasePruningMethod) and _sets(h) in ("weight", "bias") for h in hooks)
    else:
        sets = isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and all(
            isinstance(h, WEIGHT_HOOKS) and (_sets(h) == "weight" or isinstance(h, BasePruningMethod) and _sets(h) == "bias")
            for h in hooks)  # (PyTorch's pruning tutorial prunes a conv's bias too: its BN fold was lost; review R19a)
    return (bool(hooks) and sets
            and not (m._forward_hooks or _torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks))


def module_weight(m: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The weight (or, pruned, the bias: ``name``) a call of ``m`` uses (a copy): ``m.weight``, or what its
    weight-norm hooks compute before the call (spectral norm in eval mode: with its stored vectors, no power
    iteration), which ``m.weight`` may not yet be."""
    weight = getattr(m, name)
    with torch.no_grad():
        for h in m._forward_pre_hooks.values():
            if _sets(h) != name:
                continue
            if isinstance(h, WeightNorm):
                weight = h.compute_weight(m)
            elif isinstance(h, SpectralNorm):
                weight = h.compute_weight(m, do_power_iteration=False)
            elif isinstance(h, BasePruningMethod):
                weight = h.apply_mask(m)
    return None if weight is None else weight.detach().clone()


def recognised(m: nn.Module) -> type | None:
    """The recognised base class of ``m`` whose code it runs unchanged, else None.

    A ``forward`` set on the instance (``conv.forward = lambda x: ...``) replaces the class's, and forward hooks
    change what a call computes: neither is recognised (the call stays a call of the module, hooks and all),
    except pre-hooks that only set the weight (:data:`WEIGHT_HOOKS`; handlers read it with :func:`module_weight`)
    on a module in eval mode (spectral norm's power iteration runs in training mode).  Nor is a module that keeps
    the base's ``forward`` but replaces a method it calls (:func:`_runs_base_code`)."""
    if "forward" in vars(m) or (_runs_hooks(m) and not (_weight_hooks_only(m) and not m.training)):
        return None
    for base in _RECOGNISED:
        if isinstance(m, base) and type(m).forward is base.forward:
            return base if _runs_base_code(m, base) else None
    return None


def forward_of_its_own(m: nn.Module) -> bool:
    """Whether ``m`` runs a ``forward`` set on the instance, without hooks: traced into, not a call of a layer of
    torch's (mmcv's ``self.conv.forward = partial(fold_bn, self.bn, self.conv)`` for one call recorded a plain conv,
    and the model came back unfused; review R9)."""
    return "forward" in vars(m) and not _runs_hooks(m)


def runs_torch_code(m: nn.Module) -> bool:
    """Whether a call of ``m`` runs torch's code alone, which meta tensors run as the real ones: a recognised layer,
    or one of torch's own classes (an ``nn.Embedding``, an ``nn.LSTM``) with no forward of the instance's nor
    hooks.  What the trace reads after it (a dtype test, a size) is then known at the example: after an embedding
    of token ids it was not, and T5's, BLOOM's and LLaMA's tests sent the model to torch.export at a fixed
    length (found by a probe)."""
    return recognised(m) is not None or (type(m).__module__.startswith("torch.nn.modules.") and "forward" not in vars(m)
                                         and not _runs_hooks(m))


# Methods of torch's layers that no forward calls to compute (construction, loading, printing, an input check).
_OFF_THE_CALL = frozenset({"__init__", "__setstate__", "__repr__", "extra_repr", "reset_parameters", "reset_running_stats",
                           "_load_from_state_dict", "_check_input_dim"})


def _runs_base_code(m: nn.Module, base: type) -> bool:
    """Whether every method of ``base`` that its ``forward`` may call is torch's in ``m`` (``base``'s, or that of
    torch's own layer between them: ``InstanceNorm2d._get_no_batch_dim``): not defined by a class of the user's
    nor set on ``m``.  A subclass's ``_conv_forward`` that pads "same" for the input's size or clamps, a
    ``_output_padding`` chosen by the input's parity, an ``_apply_instance_norm`` of its own, or a
    ``conv._conv_forward = patched`` (the "seamless tiling" patch of diffusion UIs) keep the base's ``forward``
    and compute something else; read as the base layer, they would fold to what the example alone agrees with."""
    for cls in base.__mro__:
        if cls in (nn.Module, object):
            continue
        for name, value in vars(cls).items():
            if name in _OFF_THE_CALL or not inspect.isfunction(value):
                continue
            owner = next(c for c in type(m).__mro__ if name in vars(c))
            if name in vars(m) or not (owner in base.__mro__ or owner.__module__.startswith("torch.nn.modules.")):
                return False
    return True


def leaf_specs(model: nn.Module, leaf_modules: Iterable[Any]) -> tuple[tuple[type, ...], set[str]]:
    """Split ``leaf_modules`` into classes and module paths (instances are looked up by identity)."""
    types, paths = [], set()
    where = None
    for spec in leaf_modules:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        elif isinstance(spec, str):
            paths.add(spec)
        elif isinstance(spec, nn.Module):
            if where is None:
                where = {id(m): p for p, m in model.named_modules()}
            if id(spec) not in where:
                raise ValueError(f"leaf module {type(spec).__name__} is not a submodule of the model")
            paths.add(where[id(spec)])
        else:
            raise TypeError(f"leaf_modules entries are module classes, module instances or paths; got {spec!r}")
    return tuple(types), paths


def check_leaf_modules(model: nn.Module, leaf_modules: Any) -> None:
    """Refuse ``leaf_modules`` that would silently keep nothing whole: a bare string or class (not a collection of
    them), or a path no submodule of ``model`` has (``TypeError``, ``ValueError``)."""
    if isinstance(leaf_modules, (str, type, nn.Module)):
        raise TypeError(f"leaf_modules is a collection of module classes, instances or paths; got one {type(leaf_modules).__name__} "
                        f"{leaf_modules!r}: write leaf_modules=[{leaf_modules!r}]" if isinstance(leaf_modules, str) else
                        f"leaf_modules is a collection of module classes, instances or paths; got one {leaf_modules!r}: put it in a list")
    _, paths = leaf_specs(model, leaf_modules)
    names = {p for p, _ in model.named_modules()}
    if missing := sorted(paths - names):
        raise ValueError(f"leaf_modules names {', '.join(map(repr, missing))}, which the model has no submodule at "
                         f"(its children: {', '.join(repr(n) for n, _ in model.named_children()) or 'none'})")


def leaf_paths(model: nn.Module, leaf_modules: Iterable[Any]) -> list[str]:
    """``leaf_modules`` as the paths of the outermost matching submodules of ``model``."""
    types, paths = leaf_specs(model, leaf_modules)
    found: list[str] = []
    for path, m in model.named_modules():
        if any(path == f or path.startswith(f + ".") for f in found):
            continue  # inside a leaf already
        if path in paths or (types and isinstance(m, types)):
            found.append(path)
    return found


# --------------------------------------------------------------------------- the trace


def _weights_only_value(node: fx.Node, root: nn.Module) -> Any:
    """The value of ``node`` where it reads only the model's parameters, buffers and constants (no input), else None."""
    values: dict[fx.Node, Any] = {}

    def value(n: fx.Node) -> Any:
        if n not in values:
            if n.op == "get_attr":
                values[n] = functools.reduce(_own_attr, str(n.target).split("."), root)
                if writes := constant_writes(n, root):  # (fx holds the tensor as before them: ECBSR's kernels)
                    values[n] = values[n].clone()
                    for w in writes:
                        index, v = fx.node.map_arg(w.args[1:], value)
                        values[n][index] = v
            elif n.op in ("call_function", "call_method") and not _writes_in_place(n):
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), value)
                values[n] = n.target(*args, **kwargs) if n.op == "call_function" else getattr(args[0], n.target)(*args[1:], **kwargs)
            else:  # an input (or a module call, which would be traced): the branch may depend on the input
                raise LookupError(n.name)
        return values[n]

    try:
        with torch.no_grad(), _writes_applied():
            out = value(node)
    except Exception:  # noqa: BLE001  (an input, or something that does not run on its own)
        return None
    return out if torch.is_tensor(out) or isinstance(out, (bool, int, float)) else None


_APPLYING: list[bool] = []  # set while _weights_only_value runs: it applies the traced writes itself


@contextlib.contextmanager
def _writes_applied() -> Iterator[None]:
    _APPLYING.append(True)
    try:
        yield
    finally:
        _APPLYING.pop()


def input_free(node: fx.Node, free: set[fx.Node]) -> bool:
    """Whether ``node`` computes from the model's tensors and literals alone, ``free`` the nodes before it that do:
    a read of a parameter or buffer, or a call (not of a module, not in place) on such nodes."""
    return node.op == "get_attr" or (node.op in ("call_function", "call_method") and all(a in free for a in node.all_input_nodes)
                                     and not _writes_in_place(node))


def _writes_in_place(n: fx.Node) -> bool:
    """Whether the call is an in-place one (``add_``, ``torch.relu_``): run on the weights, it would change them."""
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _own_attr(obj: Any, name: str) -> Any:
    """``getattr(obj, name)`` past the tracer's patched ``Module.__getattr__`` (which hands out Proxies for parameters)."""
    if isinstance(obj, nn.Module):
        for table in (obj._parameters, obj._buffers, obj._modules):
            if name in table:
                return table[name]
    return getattr(obj, name)


# torch.fx replaces nn.Module.__call__ and __getattr__ process-wide while it traces: a module called in another
# thread meanwhile goes through the tracer's (NameError), and two traces restore each other's replacements, which
# can leave the process broken.  fuse and export_onnx, which trace and run models, hold this lock throughout.
TRACING = threading.RLock()


def one_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` holding :data:`TRACING` while it runs."""

    @functools.wraps(fn)
    def held(*args: Any, **kwargs: Any) -> Any:
        with TRACING:
            return fn(*args, **kwargs)

    return held


def holds_nothing_uninstalled(tracer: fx.Tracer, m: nn.Module) -> bool:
    """Whether ``m`` holds no parameter or buffer of its own and each of its children is installed in the tracer's
    root, or is such a module itself."""
    if any(t is not None for t in (*m._parameters.values(), *m._buffers.values())):
        return False
    for child in m.children():
        try:
            tracer.path_of_module(child)
        except NameError:
            if not holds_nothing_uninstalled(tracer, child):
                return False
    return True


def _holds_proxy(v: Any) -> bool:
    """Whether ``v`` is a proxy, or a tuple, list or dict with one among its items."""
    if isinstance(v, fx.Proxy):
        return True
    return isinstance(v, (tuple, list, dict)) and any(isinstance(x, fx.Proxy) for x in pytree.tree_leaves(v))


def _tensor_of_sizes(made: Callable[..., torch.Tensor], data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``torch.tensor(data, ...)`` while a trace runs: a size in ``data`` (``torch.sqrt(torch.tensor(d_k))`` of a
    ``d_k = q.size(-1)``, as attention tutorials write the scale) as at the example, checked per call (see
    :meth:`_Proxy._number`); torch itself cannot read a proxy, and the model went to torch.export with every size
    fixed (found by a probe).  Where another argument is a proxy (``dtype=x.dtype``, ``device=x.device``), fx
    records the call, its sizes read per call."""
    if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
        return made(data, *args, **kwargs)
    if isinstance(data, fx.Proxy) and _of_a_dtype(data.node):  # DistilBERT's torch.tensor(torch.finfo(s.dtype).min)
        return data.tracer.create_proxy("call_function", made, (data, *args), kwargs)
    number = lambda v: v._number("torch.tensor") if isinstance(v, _Proxy) else v  # noqa: E731
    if isinstance(data, (list, tuple)):
        data = type(data)(number(v) for v in data)
    return made(number(data), *args, **kwargs)


def _of_a_dtype(node: fx.Node) -> bool:
    """Whether ``node`` is a number read from a dtype (``torch.finfo(x.dtype).min``), which follows a cast of the
    model per call: recorded as a call of ``torch.tensor``, not taken as at the example (a size is), where the model
    went to torch.export with every size fixed (found by a probe)."""
    if node.op == "call_function" and node.target in _ARITHMETIC:  # ``finfo.min / 2``: of numbers and that one
        nodes = [a for a in node.args if isinstance(a, fx.Node)]
        return len(nodes) == 1 and all(isinstance(a, (fx.Node, int, float)) for a in node.args) and _of_a_dtype(nodes[0])
    return node.op == "call_function" and node.target is getattr and isinstance(node.args[0], fx.Node) and (
        node.args[0].op == "call_function" and node.args[0].target in _DTYPE_INFO)


_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg)


_DTYPE_INFO = (torch.finfo, torch.iinfo)  # (as imported: a trace patches torch's names)


def _without_proxies(modules: list[nn.Module], before: list[dict[str, Any]]) -> None:
    """Each module's attributes that a trace set to proxies, or to tuples, lists or dicts holding one
    (``self.size = (H, W)``), back as they were (``before``: each one's ``vars``)."""
    for m, attrs in zip(modules, before):
        for name in [k for k, v in vars(m).items() if _holds_proxy(v)]:
            if name in attrs:
                vars(m)[name] = attrs[name]
            else:
                del vars(m)[name]


def _script_functions(modules: list[nn.Module]) -> list[torch.jit.ScriptFunction]:
    """The ``@torch.jit.script`` functions in the global namespaces of ``modules``' code (DAC's ``snake``): compiled,
    they take no Proxy, so the trace records each call of one as a call (fx's autowrap) instead of stopping."""
    seen: dict[int, dict] = {}
    for m in modules:
        for cls in type(m).__mro__:
            module = sys.modules.get(cls.__module__)
            if module is not None and not cls.__module__.startswith("torch."):
                seen.setdefault(id(module), vars(module))
    return [v for namespace in seen.values() for v in namespace.values() if isinstance(v, torch.jit.ScriptFunction)]


@dataclass(frozen=True)
class Carried:
    """A function of the model's code a trace records as one call (a graph break), and why: fx failed inside it, or
    (``what``) a read of sizes in it could not be checked on the inputs."""

    fn: Callable[..., Any]
    why: str
    what: str = "torch.fx cannot trace it"

    @property
    def name(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__name__}"


# An fx node's meta key: the function of the model's code a test of sizes was taken in (reading_function).
READ_IN = "repalgebra_read_in"



def carried_function(e: BaseException) -> Callable[..., Any] | None:
    """The innermost plain module-level function of the model's code that the failed trace ``e`` was running (PyG's
    ``global_add_pool``, whose ``int(batch.max()) + 1`` fx cannot trace), else None.

    Traced again with it autowrapped (fx's ``wrap``), its calls on traced values become calls of it, run as written
    on every call: exact whatever it does with its inputs' data.  Only a function fx can patch by name qualifies:
    one its module's namespace holds under its own name, neither a method nor a nested function nor a lambda (their
    calls fx cannot intercept), nor a decorated one (the name holds the wrapper)."""
    frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
    for frame in reversed(frames):  # innermost first: the function that met what fx cannot trace
        if (fn := _plain_function(frame)) is not None:
            return fn
    return None


def reading_function() -> Callable[..., Any] | None:
    """The innermost plain module-level function of the model's code (as :func:`carried_function` takes it) that the
    trace is running now, else None: the one making a read of sizes (mmseg's ``resize``, whose ``int(x) for x in
    input.shape[2:]`` only decides whether to warn).  The walk stops at fx's ``Tracer.trace``: past it is the code
    that called ``fuse``, not the model's."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_code is not fx.Tracer.trace.__code__:
        if (fn := _plain_function(frame)) is not None:
            return fn
        frame = frame.f_back
    return None


def _plain_function(frame: types.FrameType) -> Callable[..., Any] | None:
    """The function ``frame`` runs where fx can patch it by name (:func:`carried_function`), else None."""
    code = frame.f_code
    fn = frame.f_globals.get(code.co_name)
    if (isinstance(fn, types.FunctionType) and fn.__code__ is code and fn.__qualname__ == fn.__name__
            and not not_the_models(fn.__module__)):
        return fn
    return None


def carried_modules(graph: fx.Graph, root: nn.Module, carried: tuple[Carried, ...]) -> list[str]:
    """The nodes of ``graph`` calling a carried function with a module among its arguments: the call would read the
    module's state (its buffers, or its children, whose fused forms it would never see) where the checks cannot.
    The model itself (``helper(self, x)``) is read as ``get_attr`` of the empty path."""
    fns = {id(c.fn) for c in carried}
    bad = []
    for n in graph.nodes:
        if n.op == "call_function" and id(n.target) in fns:
            reads = [a for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node) and a.op == "get_attr"]
            if any(isinstance(functools.reduce(_own_attr, str(a.target).split("."), root) if a.target else root, nn.Module)
                   for a in reads):
                bad.append(f"{n.target.__name__}() is called with a module among its arguments")
    return bad


class Tracer(fx.Tracer):
    """fx tracer with our leaves, remembering the module path of every node and of a failure."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_paths: set[str], carried: tuple[Carried, ...] = ()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths
        self.carried = carried  # functions recorded as calls (see carried_function)
        self.path_stack: list[str] = []
        self.output_structure: pytree.TreeSpec | None = None  # of what forward returned, Proxies as leaves
        self.weight_branches: list[str] = []  # where a branch on the weights alone was taken (see to_bool)
        self.input_free: set[fx.Node] = set()  # nodes computed from the model's tensors and literals alone
        self.unwrapped: list[str] = []  # wrappers (torch.compile, DataParallel) traced through (see wrappers.py)
        self.answered: list[str] = []  # TorchScript flags the code read, answered as an eager call (see mode_flags.py)
        self.made: set[int] = set()  # where the tensors made while tracing live (set per trace: see _IndexedBySizes)
        self.flags: list[str] = []  # tests of x.requires_grad / x.is_cuda taken as the fused model runs (see to_bool)
        self.dtype_tests: list[str] = []  # where a test of a dtype was taken as at the example (see _dtype_test)
        self.dtype_reads: list[fx.proxy.Attribute] = []  # every x.dtype read (see dtype_tested)
        self.dtypes_as_traced = False  # x.dtype answered as at the example (a second trace: see DtypeReadOutside)
        self.dtypes_taken: list[str] = []  # where x.dtype was answered so (see example_dtype)
        self.size_tests: list[str] = []  # where a test of sizes or a size read as a number was taken (see size_answer)
        self.device_tests: list[str] = []  # where a test of an input's device was taken (see size_answer)
        self.made_tests: list[str] = []  # where a test of how an input was made (x.requires_grad) was taken (see size_answer)
        self.grad_taken = False  # a computed value's requires_grad taken as False (see _fixed_flag)
        self.autocast_offs: list[str] = []  # where autocast turned off on the model's device was taken (see _no_autocast)
        self.ranks = Ranks(None, lambda path: functools.reduce(_own_attr, path.split("."), self.root), runs_torch_code)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """``fx.Tracer.trace``, one at a time in the process (:data:`TRACING`).

        A forward that sets an attribute from what it computes (``self.grid = self.grid.to(x.device)``,
        torchdiffeq's ``self.integration_time = self.integration_time.type_as(x)``) leaves a proxy of this trace on
        the module: the graph recomputes it per call, and the module gets its value back (a later trace or run read
        the stale proxy and failed, and the model lost fx)."""
        modules = list(root.modules()) if isinstance(root, nn.Module) else []
        before = [dict(vars(m)) for m in modules]
        self._autowrap_function_ids.update(id(f) for f in _script_functions(modules))
        self._autowrap_function_ids.update(id(c.fn) for c in self.carried)
        # (fx patches the namespaces of the forwards it calls; a carried function called from its own module's other
        # functions is patched there too)
        self._autowrap_search += [sys.modules[c.fn.__module__] for c in self.carried if c.fn.__module__ in sys.modules]
        with TRACING:
            made = torch.tensor
            torch.tensor = functools.partial(_tensor_of_sizes, made)  # (the lock holds: one trace patches it at a time)
            try:
                return super().trace(root, concrete_args)
            finally:
                torch.tensor = made
                _without_proxies(modules, before)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if is_wrapper(m):  # torch.nn's DataParallel would be a leaf: traced through instead (call_module), or kept whole
            return False  # with its module fused inside where it adds hooks
        if recognised(m) is not None or (isinstance(m, FnCall) and m.reads_input_dtype):
            return True
        if isinstance(m, torch.jit.ScriptModule):  # compiled code, no Python forward to trace: a call of itself
            return True
        if forward_of_its_own(m):
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:
            if not holds_nothing_uninstalled(self, m):
                raise
            # A module made in forward of the model's own modules (``self.features[:k](x)``, guided diffusion's
            # ``self.out_layers[1:]``: a new Sequential of installed layers) or holding none (``nn.ReLU()(x)``):
            # traced into, its layers are the installed ones.
            return forward(*args, **kwargs)
        # Popped only on success: after an exception the stack names where tracing failed.
        self.path_stack.append(path)
        if runs_own_hooks(m) and not self.is_leaf_module(m, path):
            # Traced into, its hooks would run once, on symbolic values: what they return is recorded, what they do
            # (a feature collector appending to a list) is lost.  The module stays a call of itself (fuse keeps it
            # whole and fuses its children); torch.export would lose them the same way.
            raise TypeError("it has forward hooks, which must run on every call of it: kept a call of itself")
        if (w := wrapped(m)) is not None and not self.is_leaf_module(m, path):
            self.unwrapped.append(f"{path!r} is {w[1]}: traced the module it runs, {path}.{w[0]} (the same function)")
            out = getattr(m, w[0])(*args, **kwargs)  # fx refuses a dynamo-optimized forward
        else:
            out = super().call_module(m, forward, args, kwargs)
        self.path_stack.pop()
        return out

    def create_arg(self, a: Any) -> Any:
        """``a`` as fx writes it into the graph; a dataclass that is also a dict (transformers' ``ModelOutput``, in
        the copies not registered with torch's pytree) as a call of its class on its fields, as fx writes a plain
        dataclass: fx took it for a dict and the graph returned an ``immutable_dict`` (the model was kept whole)."""
        fields = rebuilt_from_fields(a)
        if fields is not None:
            return self.create_node("call_function", type(a), (), {k: self.create_arg(v) for k, v in fields.items()})
        out = super().create_arg(a)
        if torch.is_tensor(a) and isinstance(out, fx.Node) and str(out.target).startswith(MADE_CONSTANT):
            # fx reads a tensor constant by reference: a write run at once (``k[0] = 1.0``) after this read would show
            # in it too; functionalize compares (see READ_AT_VERSION)
            out.meta[READ_AT_VERSION] = a._version
            out.meta[MADE_IN_TRACE] = a.untyped_storage().nbytes() > 0 and a.untyped_storage().data_ptr() in self.made
        return out

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None) -> tuple[Callable[..., Any], list]:
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)

        @functools.wraps(fn)
        def recorded(*a: Any) -> Any:
            # ``forward(self, x, **kwargs)`` is called with the inputs only: its ``kwargs`` is an empty dict, not a
            # symbolic one (``kwargs.get("mask")`` and ``"mask" in kwargs`` then trace as Python does them).
            a = tuple({} if isinstance(v, fx.Proxy) and str(v.node.target).startswith("**") else v for v in a)
            out = fn(*a)
            self.output_structure = pytree.tree_structure(out)  # the graph turns an OrderedDict into a dict: keep its type
            return out

        return recorded, args

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        """The pieces of a split whose call states how many there are, for ``list(x.chunk(2, 1))`` and
        ``for part in x.split([a, b], 1)`` (YOLOv8's C2f); fx itself only unpacks ``a, b = x.chunk(2)``.

        ``x.chunk(n)`` gives fewer than ``n`` pieces where the axis is too short for them (5 in 4 chunks is 3
        pieces): then the trace fails at the example, or the captured graph's ``chunk`` op raises at that size,
        rather than compute something else.  A shape read (``x.view(*y.size())``, ``for s in y.shape[2:]``) gives
        one size per axis of its value at the example, as ``len`` does (the graph's ranks are guarded).  Other
        iterations (``x.unbind(0)``, ``x.split(2)``, a loop over a tensor) depend on sizes the trace does not
        know, and stay an error."""
        n = _stated_pieces(obj.node)
        if n is None:  # a shape read, of as many sizes as its value has axes at the example: ``x.view(*y.size())``
            n = shape_length(obj.node, self.rank)
        return iter([obj[i] for i in range(n)]) if n is not None else super().iter(obj)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on the model's weights alone, taken as they decide: PaddleDetection's ``if self.alpha:`` on a
        learned scale (PP-YOLOE's RepVggBlock).  Every input takes that branch, so the graph is the model's
        function for these weights.  A test of a dtype (``if h.dtype == torch.float16:``) is taken as at the
        example (:meth:`_dtype_test`).  A branch on anything else computed from an input stays an error."""
        fixed = self._fixed_flag(obj.node)
        if fixed is None:
            fixed = self._dtype_test(obj.node)
        if fixed is None:
            fixed = shape_against_no_shape(obj.node, self.ranks.value)
        if fixed is not None:
            return fixed
        value = _weights_only_value(obj.node, self.root)
        if value is None:
            answer = self.size_answer(obj, "a Python test of sizes")
            return answer if isinstance(answer, bool) else super().to_bool(obj)
        self.weight_branches.append(self.path_stack[-1] if self.path_stack else "")
        return bool(value)

    def size_answer(self, obj: fx.Proxy, what: str) -> Any:
        """``obj``'s Python value at the example inputs where it is computed from sizes, dtypes and inputs' devices
        alone (a test, a number; :meth:`~repalgebra.frontend.ranks.Ranks.answer`), recorded in the graph to be checked
        on every call (:mod:`~repalgebra.frontend.size_tests`), with the function of the model's code it was taken in
        (:func:`reading_function`, in the node's ``meta[READ_IN]``); else None."""
        value = self.ranks.answer(obj.node)
        if type(value) not in (bool, int, float):
            return None  # (a test of values, of strides or storage, or computed from a value not known)
        where = self.path_stack[-1] if self.path_stack else ""
        if self.ranks.reads_device(obj.node):  # (HF's ``if query.device.type == "cuda":`` of an input)
            what = what.replace("sizes", "an input's device").replace("a size read", "a device read")
            self.device_tests.append(where)
        elif self.ranks.reads_any(obj.node, MADE_READS):  # (``if x.requires_grad:`` of an input)
            what = what.replace("sizes", "how an input was made").replace("a size read", "a read of how an input was made")
            self.made_tests.append(where)
        else:
            if self.ranks.reads_dtype(obj.node):  # (``if not x.is_floating_point(): x = x.float() / 255``; review R16a)
                what = what.replace("sizes", "sizes or dtypes").replace("a size read", "a size or dtype read")
            self.size_tests.append(where)
        taken = self.create_proxy("call_function", taken_as_traced, (obj, value, where, what), {})
        taken.node.meta[READ_IN] = reading_function()  # (carried where the builder cannot check the read per call)
        return value

    def autocast_left_off(self, device: str) -> None:
        """Record a ``with torch.autocast(device, enabled=False):`` on the model's device, taken as doing nothing,
        as a call of :func:`autocast_left_off` in the graph: the builder makes it a check of every call."""
        where = self.path_stack[-1] if self.path_stack else ""
        self.create_proxy("call_function", autocast_left_off, (device, where), {})
        self.autocast_offs.append(where)

    def _dtype_test(self, node: fx.Node) -> bool | None:
        """``x.dtype == torch.float16`` (``!=``, ``in (...)``), or ``x.dtype == w.dtype`` (peft's
        ``_cast_input_dtype`` before every LoRA layer), as at the example inputs, else None.

        Whisper's and T5's layers clamp in float16 only.  The graph then holds in the example's dtype only: the
        test is recorded (:attr:`dtype_tests`) and ``fuse`` makes the fused model refuse another dtype."""
        if not (node.op == "call_function" and node.target in (operator.eq, operator.ne) and len(node.args) == 2):
            return None
        dtypes = [self._dtype_at_example(a) for a in node.args]
        if any(d is None for d in dtypes):
            return None
        self.dtype_tests.append(self.path_stack[-1] if self.path_stack else "")
        return (dtypes[0] == dtypes[1]) == (node.target is operator.eq)

    def _dtype_at_example(self, a: Any) -> torch.dtype | None:
        """``a`` where it is a dtype, the dtype at the example inputs where ``a`` is a traced ``x.dtype`` read of a
        value whose example is known, else None."""
        if isinstance(a, torch.dtype):
            return a
        if not (isinstance(a, fx.Node) and a.op == "call_function" and a.target is getattr and a.args[1:] == ("dtype",)
                and isinstance(a.args[0], fx.Node)):
            return None
        value = self.ranks.value(a.args[0])
        return value.dtype if isinstance(value, torch.Tensor) else None

    def _fixed_flag(self, node: fx.Node) -> bool | None:
        """``if x.requires_grad:`` (detectron2's FrozenBatchNorm2d) of a value computed inside and ``if x.is_cuda:``
        (PointNet), taken as the fused model runs them: without gradients (fuse's inference semantics, as under
        ``torch.no_grad``), on the model's device.  None for any other test.  Taken so, ``requires_grad`` is
        recorded (:attr:`grad_taken`): ``fuse`` checks the capture with gradients on too, where the model's own
        parameters make the value require them.  An input's ``requires_grad`` is the caller's to choose: answered
        on the example and checked per call (:meth:`size_answer`; an input requiring gradients took the other branch
        and the fused graph computed the example's, found by a review)."""
        if not (node.op == "call_function" and node.target is getattr and len(node.args) == 2):
            return None
        name = node.args[1]
        if name == "requires_grad" and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder":
            return None
        if name == "requires_grad":
            value, self.grad_taken = False, True
        elif name in _DEVICE_FLAGS:
            device = next((t.device for t in [*self.root.parameters(), *self.root.buffers()]), torch.device("cpu"))
            value = device.type == _DEVICE_FLAGS[name]
        else:
            return None
        where = self.path_stack[-1] if self.path_stack else ""
        self.flags.append(f"x.{name} taken as {value} in {where!r}" if where else f"x.{name} taken as {value} in forward")
        return value

    @property
    def dtype_tested(self) -> bool:
        """Whether the trace took a test of a dtype as at the example (:meth:`_dtype_test`): the graph then holds in
        the example's dtypes only."""
        return bool(self.dtype_tests or self.dtypes_taken)

    def example_dtype(self, node: fx.Node) -> torch.dtype | None:
        """With :attr:`dtypes_as_traced`, the dtype of ``node``'s value at the example inputs, recorded as taken
        (:attr:`dtypes_taken`: ``fuse`` makes the fused model refuse other dtypes, as for a test of a dtype); else, or
        where that value is not known, None (``x.dtype`` stays a traced read)."""
        value = self.ranks.value(node) if self.dtypes_as_traced else None
        if not isinstance(value, torch.Tensor):
            return None
        self.dtypes_taken.append(self.path_stack[-1] if self.path_stack else "")
        return value.dtype

    def dtype_read_outside(self) -> bool:
        """Whether Python used a traced ``x.dtype`` outside the graph (``x.dtype is torch.float64``, always false of
        a traced value; ``str(x.dtype)``): which branch it took then is not known."""
        return any(a._node is None or not a._node.users for a in self.dtype_reads)

    def rank(self, node: fx.Node) -> int | None:
        """How many axes ``node``'s value has at the example inputs (``x.ndim``; :mod:`~repalgebra.frontend.ranks`)."""
        return self.ranks.rank(node, self.path_stack[-1] if self.path_stack else "")

    @property
    def notes(self) -> list[str]:
        """What the trace decided that the report should say: wrappers traced through, the branches taken on the
        weights' values."""
        notes = list(dict.fromkeys(self.unwrapped))
        for c in self.carried:
            notes.append(f"{c.name}() carried as a call, run as written on every call (a graph break): {c.what} ({c.why})")
        if self.answered:
            notes.append(f"its code reads {', '.join(dict.fromkeys(self.answered))}: captured with the answer of an eager "
                         "call, so torch.jit.trace or torch.jit.script of the fused model takes the branch an eager call "
                         "takes, where the model's own code may take another")
        if self.flags:
            flags = list(dict.fromkeys(self.flags))
            shown = "; ".join(flags[:4]) + (f"; ... ({len(flags) - 4} more)" if len(flags) > 4 else "")
            notes.append(f"{shown}: as the fused model runs (without gradients, on the model's device)")
        if self.ranks.read:
            notes.append(f"numbers of axes (x.ndim, x.dim(), len(x.shape)) read in {_places(self.ranks.read)}: taken as "
                         "at the example (a fused graph refuses inputs with other numbers of axes)")
        if self.dtype_tests:
            notes.append(f"tests of a dtype (x.dtype == torch.float16) in {_places(self.dtype_tests)} taken as at the "
                         "example's dtype: the fused model runs in that dtype only")
        if self.dtypes_taken:
            notes.append("forward looks at a dtype outside what torch.fx records (x.dtype is torch.float16, str(x.dtype), a "
                         f"read left unused): x.dtype in {_places(self.dtypes_taken)} taken as at the example, and the fused "
                         "model runs in the example's dtypes only")
        if self.autocast_offs:
            notes.append(f"torch.autocast(enabled=False) on the model's device in {_places(self.autocast_offs)} taken as "
                         "doing nothing: the fused model refuses calls under torch.autocast on that device")
        if self.size_tests:
            notes.append(f"Python tests of sizes or sizes read as numbers (if D > 3:, int(c)) in {_places(self.size_tests)} "
                         "taken as at the example: the fused model refuses inputs whose sizes answer otherwise")
        if self.device_tests:
            notes.append(f"Python tests of an input's device (x.device.type == 'cuda') in {_places(self.device_tests)} taken as "
                         "at the example: the fused model refuses inputs on another device")
        if self.made_tests:
            notes.append(f"Python tests of how an input was made (x.requires_grad, x.is_leaf, x.storage_offset()) in "
                         f"{_places(self.made_tests)} taken as at the example: the fused model refuses inputs that answer "
                         "otherwise")
        if self.weight_branches:
            shown = _places(self.weight_branches)
            notes.append(f"{len(self.weight_branches)} branch{'es' * (len(self.weight_branches) > 1)} on the weights' values "
                         f"taken as the weights decide (a test such as `if self.alpha:`), in {shown}")
        return notes

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["repalgebra_source"] = self.path_stack[-1] if self.path_stack else ""
        if input_free(node, self.input_free):
            self.input_free.add(node)
        return node

    def weights_size(self, node: fx.Node, k: str) -> Any:
        """``w.shape`` / ``w.size`` of a value computed from the model's tensors alone, as the real tensor's (None
        for any other): no input changes it, so Python may compute with it (OREPA's ``t, ig = w.size()``, then
        ``w.view(g, int(t / g), ig)``) and the graph holds for every input."""
        if node not in self.input_free:
            return None
        value = _weights_only_value(node, self.root)
        return getattr(value, k) if torch.is_tensor(value) else None


_DEVICE_FLAGS = {"is_cuda": "cuda", "is_cpu": "cpu", "is_mps": "mps", "is_xpu": "xpu"}

# A tensor's attributes that are None or an object, which Python tests with ``is None``: a Proxy is never None, so
# ``if x.grad_fn is not None or x.storage_offset() == 0:`` took its first branch at every input (found by a probe).
_NEVER_NONE = frozenset({"grad_fn", "grad", "_base"})


class _Proxy(InplaceProxy):
    """Records ``y += 1`` as an in-place call (which ``fx.Proxy`` would drop), knows the length of a split that
    states its count (``list(x.chunk(2, 1))`` asks for it before iterating; see :meth:`Tracer.iter`), and the
    number of axes of its value (``x.ndim``, ``x.dim()``, ``len(x.shape)``: :mod:`~repalgebra.frontend.ranks`)."""

    def __len__(self) -> int:
        n = _stated_pieces(self.node)
        if n is not None and _chunked(self.node) is not None:
            return self._chunks(n)
        if n is None:
            n = shape_length(self.node, self.tracer.rank)
        return n if n is not None else super().__len__()

    def __getattr__(self, k: str) -> Any:
        if k in ("ndim", "dim", "ndimension") and (r := self.tracer.rank(self.node)) is not None:
            return r if k == "ndim" else functools.partial(int, r)
        if k == "dtype" and (dtype := self.tracer.example_dtype(self.node)) is not None:
            return dtype
        if k == "dtype":  # watched: Python that looks at it outside the graph (``is``, ``str()``) branches on it
            self.tracer.dtype_reads.append(attr := fx.proxy.Attribute(self, k))
            return attr
        if k in ("shape", "size") and (real := self.tracer.weights_size(self.node, k)) is not None:
            return real
        if k in _NEVER_NONE:  # (a Proxy is never None: ``x.grad_fn is not None or ...`` took a branch unseen)
            raise fx.proxy.TraceError(f"x.{k} of a traced value is tested with `is`, which torch.fx cannot record")
        return _Shape(self, k) if k == "shape" else super().__getattr__(k)

    def _chunks(self, n: int) -> int:
        """``len(y.chunk(n, dim))``: the pieces torch makes, ``ceil(L / ceil(L / n))`` of a length ``L`` (3 of 6 in 4
        chunks), as at the example and checked per call (:meth:`Tracer.size_answer`; found by a review)."""
        x, dim = _chunked(self.node)
        length = self.tracer.proxy(x).size(dim)
        per = (length + (n - 1)) // n
        count = self.tracer.size_answer((length + per - 1) // per, f"the number of pieces of a chunk into {n}")
        if type(count) is not int:
            raise TypeError(f"len() of a chunk into {n} of a length torch.fx only knows symbolically, not '_Proxy'")
        return count

    def __int__(self) -> int:
        return int(self._number("int"))

    # A size as a key (``self.gain.get(x.shape[-1], 1.0)``, ``tuple(x.shape[-2:]) in self.sizes``, a ParameterDict's
    # ``str(x.shape[-1])``): see :func:`size_key` and :class:`_SizeName`.
    def __hash__(self) -> int:
        key = size_key(self, "hash")
        return object.__hash__(self) if key is None else hash(key)

    def __str__(self) -> str:
        return _SizeName(super().__str__(), self) if size_key(self, None) is not None else super().__str__()

    # (No __index__: torch's argument parser would take a Proxy for an int where it is a list of sizes, and fail.)

    def __float__(self) -> float:
        return float(self._number("float"))

    def _number(self, how: str) -> int | float:
        """A size read as a Python number (the Stable Diffusion VAE's ``int(c) ** -0.5``), as at the example."""
        value = self.tracer.size_answer(self, f"a size read as a Python number ({how}())")
        if type(value) not in (int, float):  # (Python's own words, which the report translates)
            raise TypeError(f"{how}() argument must be a real number computed from sizes, not '_Proxy'")
        return value


class _SizeName(str):
    """``str()`` of a size: the name of its node, as fx formats it (timm's assertion messages name sizes, which the
    fused model names per call), that as a key (``self.scales.get(str(W))``, a ParameterDict by resolution) is the
    size's own digits, read as at the example with a check (:func:`size_key`)."""

    proxy: fx.Proxy

    def __new__(cls, name: str, proxy: fx.Proxy) -> "_SizeName":
        named = super().__new__(cls, name)
        named.proxy = proxy
        return named

    def __hash__(self) -> int:
        return hash(str(size_key(self.proxy, "str")))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str) and other is not self:
            return str(size_key(self.proxy, "str")) == other
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other


def size_key(proxy: fx.Proxy, how: str | None) -> int | float | bool | None:
    """A number computed from sizes that ``how`` (``hash``, ``str``) makes a key of, read as at the example and
    checked on every call, as ``int()`` is; None for any other value (hashed by identity).  With ``how`` None,
    the number, nothing read.  Hashed by identity, ``self.gain.get(x.shape[-1], 1.0)`` matched no key, and the
    graph held the miss at every size, where the model looks up a gain at others (review R9, 5.0 off)."""
    if type(value := proxy.tracer.ranks.answer(proxy.node)) not in (bool, int, float):
        return None
    return value if how is None else proxy.tracer.size_answer(proxy, f"a size read as a Python number ({how}(): a key)")


class _Shape(fx.proxy.Attribute):
    """``x.shape``, whose ``len`` is the number of axes of ``x`` at the example inputs (where known)."""

    def __len__(self) -> int:
        r = self.tracer.rank(self.root.node)
        return r if r is not None else super().__len__()


def shape_against_no_shape(node: fx.Node, value: Callable[[fx.Node], Any]) -> bool | None:
    """``x.shape != None`` (or ``==``, against a number) as every input answers it, else None.  A shape is a
    tuple, which equals no ``None`` or number whatever its sizes: no check per call is needed.  Ultralytics'
    ``Detect`` compares the shape it cached with the input's (``if self.dynamic or self.shape != shape:``), and
    its cache is ``None`` before a first call: recorded as a test of sizes, it stopped the trace."""
    if not (node.op == "call_function" and node.target in (operator.eq, operator.ne) and len(node.args) == 2):
        return None
    read, other = node.args if isinstance(node.args[0], fx.Node) else node.args[::-1]
    if not isinstance(read, fx.Node) or not (other is None or type(other) in (bool, int, float)):
        return None
    return node.target is operator.ne if isinstance(value(read), tuple) else None  # (a torch.Size, read as a tuple)


def _places(paths: list[str]) -> str:
    """``'a', 'b', forward, ... (n more)``: the distinct module paths of a report note, at most four of them."""
    where = sorted({repr(p) if p else "forward" for p in paths})
    return ", ".join(where[:4]) + (f", ... ({len(where) - 4} more)" if len(where) > 4 else "")


def _chunked(node: fx.Node) -> tuple[fx.Node, Any] | None:
    """``(x, dim)`` of a ``chunk`` call (``x.chunk(n, dim)``, ``torch.chunk(x, n, dim=dim)``), else None."""
    if not ((node.op == "call_method" and node.target == "chunk") or (node.op == "call_function" and node.target is torch.chunk)):
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return (node.args[0], dim) if isinstance(node.args[0], fx.Node) else None


def _stated_pieces(node: fx.Node) -> int | None:
    """How many pieces ``node`` splits into, where its call says (``chunk(n)``, ``split([a, b])``), else None."""
    if node.op == "call_method" and node.target in ("chunk", "split", "split_with_sizes"):
        kind, args = node.target, node.args[1:]
    elif node.op == "call_function" and node.target in (torch.chunk, torch.split):
        kind, args = ("chunk" if node.target is torch.chunk else "split"), node.args[1:]
    else:
        return None
    names = ("chunks",) if kind == "chunk" else ("split_size", "split_size_or_sections", "split_sizes")
    count = args[0] if args else next((node.kwargs[k] for k in names if k in node.kwargs), None)
    if kind == "chunk":
        return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None
    if isinstance(count, (list, tuple)) and count and all(isinstance(c, int) and not isinstance(c, bool) for c in count):
        return len(count)
    return None


def untraceable(work: nn.Module, stack: list[str], e: Exception) -> UntraceableError:
    """The error for a failed trace, naming the innermost module being traced and how to keep it whole."""
    path = stack[-1] if stack else ""
    cls = type(work.get_submodule(path)).__name__ if path else type(work).__name__
    why = (
        "torch.fx traces forward() with symbolic tensors, so Python control flow that depends on tensor "
        "values (such as `if x.sum() > 0:`) cannot be recorded"
    )
    if path:
        err = UntraceableError(
            f"cannot trace module {path!r} ({cls}): {e}\n{why}. Keep that module whole (carried through "
            f"unfused) by marking it as a leaf: repalgebra.fuse(model, leaf_modules=({cls},)) "
            f"or leaf_modules=({path!r},)"
        )
        err.path = path
        return err
    return UntraceableError(
        f"cannot trace the forward() of {cls} itself: {e}\n{why}. Move the data-dependent part into a "
        f"submodule and mark it as a leaf, e.g. repalgebra.fuse(model, leaf_modules=(MySubmodule,))"
    )


def concrete_args(model: nn.Module, n_given: int | None) -> dict[str, Any]:
    """Defaults of the ``forward`` arguments after the given inputs, and of its keyword-only ones, to be baked in
    by the trace (a call of the fused model passing them is a ``TypeError``, never ignored)."""
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if n_given is None:
        n_given = sum(p.default is p.empty for p in positional)
    keyword_only = [p for p in params if p.kind == p.KEYWORD_ONLY and p.default is not p.empty]
    return {p.name: p.default for p in [*positional[n_given:], *keyword_only] if p.default is not p.empty}


# --------------------------------------------------------------------------- one real run


@dataclass(frozen=True)
class TensorInfo:
    """What a call returned, when it is one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def summarize(r: Any) -> Any:
    """A call's result as the front end keeps it: :class:`TensorInfo`, ``"tensors"`` for a container, else the value."""
    if torch.is_tensor(r):
        return TensorInfo(tuple(r.shape), r.dtype)
    if any(torch.is_tensor(t) for t in pytree.tree_leaves(r)):
        return "tensors"  # a container of tensors: carried as one opaque value
    return r


class _Recorder(fx.Interpreter):
    """Runs the traced copy once and keeps, per node, a tensor's shape/dtype or a non-tensor's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.meta: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        before = versions(n, self.env)
        try:
            result = super().run_node(n)
        except Exception as e:
            where = n.meta.get("repalgebra_source") or "the model"
            e.add_note(f"repalgebra: while running {n.format_node()} in {where!r}")
            raise
        hidden_writes(n, before, self.env, self.module)
        self.meta[n] = summarize(result)
        return result

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        """A module kept whole gets the lists and dicts it is given as the model's code builds them, fresh and
        mutable: fx's are immutable, and Ultralytics' ``Detect`` writes into the list of feature maps it is given
        (``x[i] = torch.cat(...)``)."""
        return super().call_module(target, *mutable((args, kwargs)))


def mutable(value: Any) -> Any:
    """``value`` with each of fx's immutable lists and dicts in it (a node's arguments) a plain one, as the model's
    code passes them; any other container (a ``torch.Size``, a named tuple) as it is."""
    if type(value) in (list, tuple, immutable_list):
        items = [mutable(v) for v in value]
        return tuple(items) if type(value) is tuple else items
    if type(value) in (dict, immutable_dict):
        return {k: mutable(v) for k, v in value.items()}
    return value


def record_run(gm: fx.GraphModule, inputs: tuple, inferred: str | None) -> dict[fx.Node, Any]:
    """Run ``gm`` once on copies of ``inputs`` (:func:`~repalgebra.frontend.capture.cloned`: a forward that
    writes into a cache it is given advanced the caller's example twice; a probe): per fx node, :func:`summarize`
    of its result."""
    rec = _Recorder(gm)
    try:
        with torch.no_grad():
            rec.run(*cloned(tuple(inputs)))
    except Exception as e:
        if inferred:
            raise ValueError(f"the model does not run on the inferred input ({inferred}): {e}; pass example_inputs") from e
        raise
    return rec.meta
