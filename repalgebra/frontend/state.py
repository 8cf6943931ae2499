"""State a model's forward changes: what a fused copy, built from one recorded call, would not reproduce.

``fuse`` records one call of the model and builds a new module from it.  A
forward that changes the model itself (``self.count += 1``, a running average
updated in eval mode, a buffer rebound to a new tensor, an ``int`` attribute it
counts in) gives the next call a different function, and a capture would bake
in the first call's value.  :func:`watch` notices a change during a call (the
check's run of the original, so no extra forward pass); :func:`find_state` then
runs copies of the model and names each parameter, buffer or attribute that
changed, the module that owns it and the modules whose own code changed it, and
``fuse`` keeps their smallest common ancestor whole (it runs as written, on its
own copy of the state).  What only a first call fills, the same for any input
(a cache), is not state; where the model as called once is captured at the
example's sizes only, ``fuse`` keeps the module holding the cache whole
(:func:`cache_regions`: YOLOv8's ``Detect``, its anchors keyed by shape).
When two calls return different outputs and nothing changed (random numbers
drawn in eval mode, a global read), nothing can be localized and the whole
model is kept whole.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from repalgebra.draws import DRAWS, generator_states, generators_kept, held_generator_state, seeded_for_checks
from repalgebra.module_copy import MODULE_INTERNALS, copy_module, in_packages
from repalgebra.frontend.state_keys import (DEPTH, ITEMS, MISSING, SCALARS, attribute_key, changed_names, equal_values,
                                            plain_object, same_key)
from repalgebra.verify import first_difference

__all__ = ["State", "StateChanged", "STATE_TAG", "WRITTEN_TAG", "cache_regions", "copy_difference", "find_state", "mark_written", "plain_attributes", "restore_in_place", "watch"]

STATE_TAG = "_repalgebra_state"  # fuse marks the parts it keeps for their state with this attribute (their path)
WRITTEN_TAG = "_repalgebra_written"  # and every module with the names of its own tensors that calls set (a set)
_MODULE_INTERNALS = MODULE_INTERNALS | {STATE_TAG, WRITTEN_TAG}
_OURS = "_repalgebra_"  # our own attributes on modules (a carried call's resolver, built on its first call): no state


class StateChanged(Exception):
    """A run of the original model changed its state (``names``): ``fuse`` starts again, keeping that part whole."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


@contextlib.contextmanager
def watch(module: nn.Module) -> Iterator[list[str]]:
    """Within the block, every call of ``module`` appends to the yielded list the state names it changed."""
    changed: list[str] = []
    entry: dict[str, Any] = {}
    pre = module.register_forward_pre_hook(lambda m, args: entry.update(_snapshot(module)))
    post = module.register_forward_hook(
        lambda m, args, out: changed.extend(changed_names(entry, _snapshot(module)))
    )
    try:
        yield changed
    finally:
        pre.remove()
        post.remove()


@dataclass(frozen=True)
class State:
    """What calls of a model change.

    ``regions``: module path -> why it runs as written (the smallest module holding
    each changed tensor and the code that changes it; ``""`` is the model itself).
    ``holders``: the modules that own a changed tensor or whose own code changes
    one (inside the regions; not fused inside).  ``whole``: why nothing can be
    fused at all (calls differ and no tensor shows why).
    """

    regions: dict[str, str] = field(default_factory=dict)
    holders: tuple[str, ...] = ()
    whole: str = ""
    per_call: tuple[str, ...] = ()  # not state: stored from the input on every call, read by none (``self.last = y``)
    changed: tuple[str, ...] = ()  # the names in regions: what a call changes again
    drawn_by: tuple[str, ...] = ()  # the modules whose own code draws from a global generator (in ``changed``)
    first_draws: tuple[str, ...] = ()  # generators a first call draws from and later ones do not (a lazy random init)

    def __bool__(self) -> bool:
        return bool(self.regions or self.whole)


def find_state(model: nn.Module, inputs: tuple[torch.Tensor, ...], tolerance: float) -> State:
    """Run copies of ``model`` on ``inputs`` and name the state their calls change (``model`` is not run).

    State is what a second call changes again (a counter, a running average),
    and what a first call sets from its input (an initialization from the first
    batch).  What only a first call fills, the same for any input (a cache of
    values computed from the weights, a weight a hook recomputes), is not: an
    empty result then means the model is one function of its input once called.
    """
    work = copy_module(model)
    before = _snapshot(work)
    try:
        first = _call(work, inputs)
        after_first = _snapshot(work)
        second = _call(work, inputs)
    except Exception as e:  # noqa: BLE001  (it ran once for the caller: what else changed is unknown)
        return State(whole=f"a repeated call of it fails ({type(e).__name__}: {e})")
    changed = set(changed_names(after_first, _snapshot(work)))
    once = set(changed_names(before, after_first)) - changed
    if drawn := {n for n in changed | once if n in DRAWS}:  # another thread's draws move the generators too
        kept = _draws_itself(model, inputs, drawn)
        changed, once = changed - (drawn - kept), once - (drawn - kept)
    per_call: set[str] = set()
    if once:  # filled by the first call: from the input, or the same whatever it is?
        state, per_call = _filled_from_input(model, inputs, {n: after_first.get(n, MISSING) for n in once}, tolerance)
        changed |= state
    changed = sorted(changed)
    if not changed:
        differs = first_difference(first, second, tolerance)
        if differs is None:
            return State(per_call=tuple(sorted(per_call)), first_draws=tuple(sorted(n for n in once if n in DRAWS)))
        return State(whole=f"two calls with the same input return different outputs ({differs}) and no parameter, "
                     "buffer or attribute changed: its forward reads global state, or draws random numbers")
    sites = _sites(model, inputs, changed)
    regions: dict[str, list[str]] = {}
    holders: set[str] = set()
    for name in changed:
        owner = name.rpartition(".")[0]
        if not _resolves(model, owner):  # reached through a module wired in at run time (``self.r.src = self.w``)
            owner = ""  # where it lives is not known before a call: the model runs as written
        paths = sites.get(name) or [""] if name in DRAWS else [owner, *sites.get(name, [])]  # a generator: its drawers
        holders.update(paths)
        region = _common_ancestor(paths)
        regions.setdefault(region, []).append(name)
    outermost = {r: names for r, names in regions.items() if not any(_inside(r, o) for o in regions if o != r)}
    for r, names in regions.items():
        if r not in outermost:
            outermost[next(o for o in outermost if _inside(r, o))] += names
    drawn_by = {p for n in changed if n in DRAWS for p in sites.get(n) or [""]}
    return State(regions={r: _why(names) for r, names in outermost.items()}, holders=tuple(sorted(holders)),
                 changed=tuple(changed), drawn_by=tuple(sorted(drawn_by)))


def cache_regions(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str]) -> list[str]:
    """The outermost modules that hold each of ``names`` (what a first call fills: a cache) together with the code
    that fills it, as :func:`find_state` finds the regions of state, in a call of a fresh copy of ``model``; ``""``
    where one lives outside any submodule.  Kept whole with the state ``model`` holds, such a module refills its
    cache exactly when the model's own would (Ultralytics' ``Detect`` recomputes its anchors where
    ``self.shape != shape``)."""
    sites = _sites(model, inputs, [n for n in names if n not in DRAWS])
    found = []
    for name in names:
        owner = name.rpartition(".")[0]
        if name in DRAWS or not _resolves(model, owner):  # a generator, or a module wired in at run time
            return [""]
        found.append(_common_ancestor([owner, *sites.get(name, [])]))
    return sorted({r for r in found if not any(_inside(r, o) for o in found if o != r)})


def _draws_itself(module: nn.Module, inputs: tuple, names: set[str]) -> set[str]:
    """The generators among ``names`` that a call of ``module`` moves itself.  Seeded alike, two calls that draw leave
    a generator at one state, another than the seed's; another thread drawing during a call leaves it by chance
    amounts.  Where no two tries agree, all of ``names``."""
    for _ in range(4):
        with generators_kept():
            ends = []
            for call in (False, False, True, True):
                fresh = copy_module(module) if call else None  # (a first call may draw what later ones do not: lazy init)
                seeded_for_checks()
                if call:
                    _call(fresh, inputs)
                ends.append(generator_states())
        seed, again, first, second = ends
        if seed == again and first == second:
            return {n for n in names if first[n] != seed[n]}
    return set(names)


def mark_written(model: nn.Module, names: Iterable[str]) -> None:
    """Tag each module owning one of ``names`` (tensors or attributes a call sets) with the set of its own names.

    A part kept as a call of itself sets them while it runs; a capture of the code around it sees the value one
    earlier call left there, so a read of them there must not become a constant (see the front end's builder)."""
    for name in (n for n in names if n not in DRAWS):  # (a generator is no module's)
        owner, _, leaf = name.rpartition(".")
        try:
            m = model.get_submodule(owner)
        except AttributeError:  # an attribute set on a module wired in at run time: not in the model as built
            continue
        m.__dict__.setdefault(WRITTEN_TAG, set()).add(leaf)


def _filled_from_input(model: nn.Module, inputs: tuple[torch.Tensor, ...], filled: dict[str, Any], tolerance: float) -> tuple[set[str], set[str]]:
    """The names in ``filled`` (set by a first call on ``inputs``) that are state: a call on other values (larger,
    and smaller of the other sign, integers reordered, integers halved and masks inverted), or at twice or four times the spatial size
    (where no such call runs, with each axis after the batch doubled on its own), computes something else after that first call
    than as the first call itself, or a call on ``inputs`` computes something else after it.  And those a first call on other values fills otherwise: stored from the input
    (a side output, ``self.last = y``; state only if a later call reads it).

    An initialization from the first batch, a table built for the first input's resolution (or token count), or one kept for the
    largest seen whose values follow its size (``linspace(-1, 1, w_max)[:w]``), is state; a cache
    of the weights (the same for any input) and an attribute every call rewrites before reading it (Swin's
    ``blk.H, blk.W = H, W``) are not."""
    others = [
        tuple(t * 1.5 + 0.25 if t.is_floating_point() else t for t in inputs),
        tuple(t.repeat(*[1] * (t.dim() - 2), 2, 2) if t.is_floating_point() and t.dim() >= 3 else t for t in inputs),
        # and at four times: a Swin block deeper in the model turns its shift off for good where its window covers
        # its map, at twice the example's size too (found by a probe)
        tuple(t.repeat(*[1] * (t.dim() - 2), 4, 4) if t.is_floating_point() and t.dim() >= 3 else t for t in inputs),
        # Smaller and of the other sign: a running max (or min) that the first call raised is not raised again.
        tuple(t * -0.5 if t.is_floating_point() else t for t in inputs),
    ]
    # Integers in another order (flattened and reversed: the same values, so indices stay valid): a graph's
    # normalization cached from its edge_index by a first call (PyG's GCNConv(cached=True)) follows them (a probe).
    reordered = tuple(t.flatten().flip(0).reshape(t.shape) if not t.is_floating_point() and t.numel() > 1 else t for t in inputs)
    must_run = {0}  # on other values: where it does not run, nothing shows a fill the same for any input
    if any(a is not b for a, b in zip(reordered, inputs)):
        must_run.add(len(others))
        others.append(reordered)
    # Integers of other values: reordered, one id (a class label, a timestep) or equal ones (lengths, an all-True
    # mask) are the same, and an embedding cached from the first call's label was fused as the example's (2.2 off;
    # a review).  Halved ids stay within the example's range (valid indices); a mask is inverted.
    others += [v for v in [tuple(_other_integers(t) for t in inputs)] if any(a is not b for a, b in zip(v, inputs))]
    # Each axis after the batch doubled on its own, where no spatial size above ran: tokens (B, N, C) double C with
    # N, which the Linear refuses, and a table built for the first call's token count was fused as the example's
    # (0.81 off; a review).  Tensors of every dtype are repeated alike (a mask and ids keep their length, and values).
    sized = [tuple(t.repeat(*[2 if j == k else 1 for j in range(t.dim())]) if torch.is_tensor(t) and t.dim() > k and t.shape[k] else t
                   for t in inputs) for k in range(1, max((t.dim() for t in inputs if torch.is_tensor(t)), default=0))]
    state: set[str] = set()
    per_call: set[str] = set()
    sizes_ran, last = False, len(others) - 1  # whether a call at another spatial size (others[1], others[2]) ran
    alone = copy_module(model)
    with generators_kept():
        example = _call(alone, inputs)
    for k, other in enumerate(others):
        if k == last and not sizes_ran:  # (the spatial sizes have been tried: each axis on its own after the rest)
            others += [v for v in sized if any(a is not b for a, b in zip(v, inputs))]
        fresh, primed = copy_module(model), copy_module(model)
        try:
            with generators_kept():  # (a model that draws: the calls below draw alike)
                want = _call(fresh, other)
        except Exception:  # noqa: BLE001
            if k in must_run:  # it does not run on other values: count what the first call set as state
                return set(filled), set()
            continue  # it does not run at that size: nothing learned
        sizes_ran |= k in (1, 2) and any(a is not b for a, b in zip(other, inputs))
        if k == 0:
            theirs = _snapshot(fresh)
            per_call = set(changed_names(filled, {n: theirs.get(n, MISSING) for n in filled}))
        with generators_kept():
            _call(primed, inputs)
        try:
            with generators_kept():
                got = _call(primed, other)
        except Exception:  # noqa: BLE001  (what the first call left makes the next one fail: a table of its size)
            state |= set(filled)
            continue
        if first_difference(want, got, tolerance) is not None:
            state |= _differing(filled, fresh, primed)
        # And the other order: what a call on other values leaves (a table kept for the largest size seen, then
        # sliced) may change what a later call on the example computes (found by a fixer's probe, 4.0 off).
        # ``fresh`` made that call above (its snapshot read first).
        try:
            with generators_kept():
                again = _call(fresh, inputs)
        except Exception:  # noqa: BLE001  (what the other call left makes the example's fail)
            state |= set(filled)
            continue
        if first_difference(example, again, tolerance) is not None:
            state |= _differing(filled, alone, fresh)
    return state, per_call - state


def _other_integers(t: Any) -> Any:
    """``t`` with other values where it is an integer tensor (halved: ids, labels and lengths stay in the example's
    range; one up where halving changes nothing, zeros: an id 1 out of range makes a call that does not run, which
    shows nothing) or a mask (inverted); else ``t`` itself."""
    if not torch.is_tensor(t) or t.is_floating_point() or t.is_complex() or not t.numel():
        return t
    other = ~t if t.dtype is torch.bool else torch.div(t, 2, rounding_mode="floor")
    if torch.equal(other, t) and t.dtype is not torch.bool:
        other = t + 1  # zeros (and -1s) halve to themselves: label 0 was fused as the example's (review R4 finding 03)
    return t if torch.equal(other, t) else other


def _differing(filled: dict[str, Any], one: nn.Module, other: nn.Module) -> set[str]:
    """The names in ``filled`` whose values differ between two copies after their calls (all of them where none
    does: the difference is then in what they hold, not in a name of the snapshot)."""
    theirs, mine = _snapshot(one), _snapshot(other)
    return set(changed_names({n: theirs.get(n, MISSING) for n in filled}, {n: mine.get(n, MISSING) for n in filled})) or set(filled)


def _why(names: list[str]) -> str:
    drawn, names = [n for n in names if n in DRAWS], [n for n in names if n not in DRAWS]
    shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"its forward changes {shown}" * bool(names) + " and " * bool(names and drawn)
            + f"its forward draws random numbers ({', '.join(drawn)})" * bool(drawn)
            + ": it runs as written, on its own copy of that state" * bool(names) + ", drawing them as it does" * bool(drawn and not names))


def _snapshot(module: nn.Module) -> dict[str, Any]:
    """Every parameter, buffer and plain attribute of ``module`` and its descendants by name, as :func:`attribute_key` sees it,
    and the global generators' states (:data:`~repalgebra.draws.DRAWS`: a call that draws changes them)."""
    seen: dict[str, Any] = {n: ("value", s) for n, s in generator_states().items()}
    for path, m in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        seen.update((prefix + leaf, attribute_key(value)) for leaf, value in _own(m).items())
    return seen


def plain_attributes(m: nn.Module) -> dict[str, Any]:
    """``m``'s attributes that are neither nn.Module's bookkeeping nor its parameters, buffers and children."""
    return {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}


def _own(m: nn.Module) -> dict[str, Any]:
    """``m``'s own state by name: its parameters, buffers and plain attributes (not nn.Module's bookkeeping).

    A TorchScript module keeps its attributes in C++: its Python ``vars`` are compiler internals, some rebuilt
    by the first call; its real attributes (parameters, buffers, ``self.n``) are the ones its type declares."""
    if isinstance(m, torch.jit.ScriptModule):
        declared = m._concrete_type.get_attributes()
        return {k: getattr(m, k) for k in declared if k not in _MODULE_INTERNALS}
    own = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS and not k.startswith(_OURS)}
    return {**own, **m._buffers, **m._parameters}


def copy_difference(model: nn.Module, copied: nn.Module) -> str | None:
    """The first parameter, buffer or plain attribute of ``model`` (by path) that its copy ``copied`` does not hold
    the same (:func:`_alike`), in words; None where the copy holds them all.  ``fuse`` captures and checks a copy:
    where ``__getstate__`` drops a run-time setting and ``__setstate__`` restores its default, the fused model
    computed the copy's function, 4x the model's, and its check against the copy passed (found by a probe)."""
    theirs = dict(copied.named_modules())
    for path, m in model.named_modules():
        other = theirs.get(path)
        graphs = isinstance(m, torch.fx.GraphModule) and isinstance(other, torch.fx.GraphModule)
        # (a copy of a torch.jit.trace'd module is a RecursiveScriptModule of the same code: review R9)
        scripted = isinstance(m, torch.jit.ScriptModule) and isinstance(other, torch.jit.ScriptModule)
        if type(other) is not type(m) and not graphs and not scripted:
            return f"its copy holds no {type(m).__name__} at {path!r}"
        # A class of torch's that copies itself its own way (a GraphModule rebuilt from its graph, of a class made for
        # it; an OptimizedModule from the module it compiles) holds torch's bookkeeping (a dispatcher of ours, its
        # fingerprint of identities): its tensors are compared.
        own = not (graphs or _copied_by_torch(m))
        mine, its = (_own(m), _own(other)) if own else ({**m._buffers, **m._parameters}, {**other._buffers, **other._parameters})
        for name in [*mine, *(n for n in its if n not in mine)]:
            if not _alike(mine.get(name, MISSING), its.get(name, MISSING)):
                return f"its copy's {f'{path}.{name}' if path else name!r} differs from its own"
    return None


def _copied_by_torch(m: nn.Module) -> bool:
    """Whether ``m``'s class is torch's (or ours: a fused dispatcher, sealed again with its copy's identities) and
    copies or pickles it otherwise than ``nn.Module`` does."""
    methods = ("__deepcopy__", "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__")
    return any((f := getattr(type(m), name, None)) is not getattr(nn.Module, name, None)
               and in_packages(getattr(f, "__module__", None), ("torch", "repalgebra")) for name in methods)


def _alike(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether a copy's value ``b`` is ``a`` as :func:`attribute_key` sees state: tensors by shape, dtype and values, scalars
    by value, containers and plain objects by what they hold (:data:`~repalgebra.frontend.state_keys.DEPTH` levels, :data:`~repalgebra.frontend.state_keys.ITEMS` items), a
    generator by its state; anything else (a module, a function the copy rebinds, a library object) by its type."""
    if a is b:
        return True
    if torch.is_tensor(a) and torch.is_tensor(b):  # (a ScriptModule's copy gives its parameters as plain tensors)
        return (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device) and (a.is_meta or _equal_or_opaque(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, SCALARS):
        return a == b or (a != a and b != b)
    if held_generator_state(a) is not None:
        return same_key(attribute_key(a), attribute_key(b))
    if isinstance(a, (list, tuple, dict, set, frozenset)):
        if len(a) != len(b):
            return False
        if depth >= DEPTH or len(a) > ITEMS:
            return True
        if isinstance(a, (set, frozenset)):
            return {v for v in a if isinstance(v, SCALARS)} == {v for v in b if isinstance(v, SCALARS)}
        pairs = [*zip(a, b), *zip(a.values(), b.values())] if isinstance(a, dict) else zip(a, b)
        return all(_alike(x, y, depth + 1) for x, y in pairs)
    if plain_object(a) and depth < DEPTH:
        return _alike(vars(a), vars(b), depth + 1)
    return True


def _equal_or_opaque(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values; True for a tensor whose values cannot be compared (a subclass without storage)."""
    try:
        return equal_values(a.detach(), b.detach())
    except (RuntimeError, NotImplementedError, TypeError):
        return True


def restore_in_place(module: nn.Module, initial: nn.Module, deep: bool = True) -> None:
    """Give ``module`` (a copy of ``initial`` that calls have run) ``initial``'s state: each tensor copied into in
    place where its shape and dtype allow, so one it shares with the rest of the model (a parent's buffer that is
    this module's) stays shared; other attributes set to copies, and those the calls added removed.  The copies map
    ``initial``'s modules to ``module``'s: snntorch's ``self.state_function = self._base_sub``, copied
    on its own, was bound to a third neuron whose membrane no call reached (found by a probe).  Not ``deep``:
    ``module``'s own state only (its children are no copies of ``initial``'s: fused forms); its copies still map
    ``initial``'s modules to those at the same paths (:func:`same_paths`)."""
    pairs = list(zip(module.modules(), initial.modules())) if deep else [(module, initial)]
    memo: dict[int, Any] = {id(src): m for m, src in pairs} if deep else same_paths(module, initial)  # (not its tensors: state)
    with torch.no_grad():
        for m, src in pairs:
            theirs, mine = _own(src), _own(m)
            for name in set(mine) - set(theirs):
                delattr(m, name)
            for name, value in theirs.items():
                own = mine.get(name, MISSING)
                if torch.is_tensor(value) and torch.is_tensor(own) and (own.shape, own.dtype) == (value.shape, value.dtype):
                    own.copy_(value)
                else:
                    setattr(m, name, copy.deepcopy(value, memo))


def same_paths(module: nn.Module, initial: nn.Module) -> dict[int, nn.Module]:
    """``initial`` and its descendants (by ``id``) mapped to the modules at the same paths in ``module``, below modules
    of the same class only (a fused form's children are its own, not the original's).  A plain attribute that names a
    child (``self.paths = {"main": self.a}``), copied with the region alone in the memo, held a third copy of the
    child, which ``fused.double()`` did not reach (found by a review)."""
    memo: dict[int, nn.Module] = {id(initial): module}
    todo = [(module, initial)]
    while todo:
        mine, src = todo.pop()
        if type(mine) is not type(src):
            continue
        for name, child in src._modules.items():
            got = mine._modules.get(name)
            if child is not None and got is not None and id(child) not in memo:
                memo[id(child)] = got
                todo.append((got, child))
    return memo


def _resolves(model: nn.Module, path: str) -> bool:
    """Whether ``path`` names a module of ``model`` as built."""
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _call(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    with torch.no_grad():
        return module(*(t.detach().clone() for t in inputs))


def _sites(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str]) -> dict[str, list[str]]:
    """For each tensor in ``names``: the modules whose own code (not a child's) changed it, in a call of a fresh copy.

    For a generator in ``names`` (:data:`~repalgebra.draws.DRAWS`), every module whose own code draws from it: one
    whose child draws may draw too (a VAE's sample around its decoder's noise), so it is a site where the generator
    moved while the module's own code ran, between its entry, its children's calls and its exit."""
    work = copy_module(model)
    paths = {m: p for p, m in work.named_modules(remove_duplicate=False)}
    stack: list[list] = []  # per active call: snapshot at entry, changes by its children, module, generators when it last ran
    sites: dict[str, list[str]] = {}

    owners = {n: (work.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names
              if n not in DRAWS and _resolves(work, n.rpartition(".")[0])}
    drawn = [n for n in names if n in DRAWS]

    def watched() -> dict[str, Any]:
        seen = {}
        for n, (owner, leaf) in owners.items():
            seen[n] = attribute_key(_own(owner).get(leaf, MISSING))
        return seen

    def generators() -> dict[str, Any]:
        return {n: s for n, s in generator_states().items() if n in drawn}

    def drew(call: list, now: dict[str, Any]) -> None:  # the generators ``call``'s own code moved since it last ran
        for n in (n for n in now if now[n] != call[3][n] and paths[call[2]] not in sites.get(n, [])):
            sites.setdefault(n, []).append(paths[call[2]])

    def enter(m: nn.Module, args: Any) -> None:
        now = generators()
        if stack:
            drew(stack[-1], now)
        stack.append([watched(), set(), m, now])

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        entry, by_children, _, _ = call = stack.pop()
        now = generators()
        drew(call, now)
        changed = set(changed_names(entry, watched()))
        for n in changed - by_children:
            sites.setdefault(n, []).append(paths[m])
        if stack:
            stack[-1][1].update(changed)
            stack[-1][3] = now

    hooked = [m for m in paths if not isinstance(m, torch.jit.ScriptModule)]  # TorchScript modules take no hooks
    handles = [h for m in hooked for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        _call(work, inputs)
    except Exception:  # noqa: BLE001  (it ran twice before: a failure now leaves the owners as the regions)
        pass
    finally:
        for h in handles:
            h.remove()
    # A change inside a TorchScript module shows up in the Python module around it, as if that one made it.  It is
    # put on the outermost TorchScript module holding the name instead (a parent writing its scripted child's
    # state is rare, and the two-call check of the result still catches it).
    scripted = [p for m, p in paths.items() if isinstance(m, torch.jit.ScriptModule)]
    for n in names:
        owner = n.rpartition(".")[0]
        around = [s for s in scripted if s == owner or _inside(owner, s)]
        if around:
            sites[n] = [min(around, key=len)]
    return sites


def _common_ancestor(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _inside(path: str, ancestor: str) -> bool:
    return ancestor == "" or path.startswith(ancestor + ".")
