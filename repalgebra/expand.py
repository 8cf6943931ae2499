"""``repalgebra.expand(model, recipe)``: the inverse of :func:`repalgebra.fuse`, a plain conv net in over-parameterized form.

    expanded = repalgebra.expand(model, "repvgg")   # new trainable module; model untouched
    print(expanded.expand_report)                    # which convs became which block, which were left and why
    ...train expanded...
    deployed = repalgebra.fuse(expanded, x)         # model's architecture again, with the trained weights

Every eligible ``nn.Conv2d`` of a deep copy of ``model`` is replaced by an
:class:`~repalgebra.recipes.ExpandedConv` of the recipe (``repalgebra.recipes``);
a conv whose output only an ``nn.BatchNorm2d`` reads (found with ``torch.fx``
where the model, or failing that a submodule, traces; else consecutive children
of an ``nn.Sequential``) takes that BN into its main branch, and the BN's place
becomes ``nn.Identity``.  The blocks are built only from modules the fusion
rules fold, so ``fuse`` gives back one conv per block with the original conv's
kernel, stride, padding and groups.

``init="preserve"`` (default): the expanded model computes the same function as
the original in eval mode (main branch: the original kernel and BN; every other
branch ends in a BN with weight and bias 0, so it adds exactly zero); where the
original conv had a BN, in train mode too.  ``init="fresh"``: PyTorch's default
initialization everywhere, for training from scratch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from repalgebra.frontend.module_globals import globals_kept
from repalgebra.module_copy import copy_module
from repalgebra.recipes import INITS, Recipe, Site, recipe_named

__all__ = ["expand", "ExpandReport", "Expanded", "Skipped", "ExpandError", "ConvUses", "conv_uses"]


class ExpandError(RuntimeError):
    """The expanded model does not run on the example inputs, or (``init="preserve"``) computes something else."""


@dataclass(frozen=True)
class Expanded:
    """One conv that became a block: its path, the BN taken into the block (path or ""), the block's branches."""

    path: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    bn: str
    branches: tuple[str, ...]

    def __str__(self) -> str:
        conv = f"{self.kernel[0]}x{self.kernel[1]}" + (f"/s{self.stride[0]}" if self.stride != (1, 1) else "")
        conv += f" g{self.groups}" if self.groups > 1 else ""
        bn = f" + {self.bn}" if self.bn else ""
        return f"{self.path}{bn} ({conv}): {', '.join(self.branches)}"


@dataclass(frozen=True)
class Skipped:
    """One conv left as it is, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class ExpandReport:
    """What :func:`expand` did: the recipe, each conv expanded or skipped (and why), parameter counts, the check."""

    recipe: str
    init: str
    expanded: tuple[Expanded, ...]
    skipped: tuple[Skipped, ...]
    params_before: int
    params_after: int
    notes: tuple[str, ...] = ()
    check: str = ""  # init="preserve" with example inputs: the eval-mode comparison with the original

    def __str__(self) -> str:
        n, m = len(self.expanded), len(self.expanded) + len(self.skipped)
        lines = [f"expand: {n} of {m} convs expanded with {self.recipe} (init={self.init})"]
        ratio = self.params_after / max(self.params_before, 1)
        lines.append(f"  parameters: {self.params_before:,} -> {self.params_after:,} ({ratio:.2f}x)")
        if self.check:
            lines.append(f"  check: {self.check}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.expanded:
            lines.append("  expanded:")
            lines += [f"    {e}" for e in self.expanded]
        if self.skipped:
            lines.append("  left as is:")
            lines += [f"    {s}" for s in self.skipped]
        return "\n".join(lines)


def expand(
    model: nn.Module,
    recipe: str | Recipe = "repvgg",
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    init: str = "preserve",
) -> nn.Module:
    """A new, trainable copy of ``model`` with every eligible conv (and its BN) replaced by a block of ``recipe``.

    Args:
        model: any ``nn.Module``; never changed.
        recipe: ``"repvgg"``, ``"acnet"``, ``"dbb"``, ``"mobileone"`` or a
            :class:`~repalgebra.recipes.Recipe` (``repalgebra.recipes.mobileone.recipe(k)``).
        example_inputs: a tensor or tuple of tensors; if given, the expanded
            model is run on them and (``init="preserve"``) compared in eval mode
            with ``model`` to the dtype's tolerance, and the result is in the report.
        init: ``"preserve"`` (same function as ``model`` in eval mode) or ``"fresh"``.

    Returns:
        The expanded module, in ``model``'s train/eval mode, with ``.expand_report`` (an :class:`ExpandReport`).

    Raises:
        TypeError / ValueError: bad arguments.
        ExpandError: the expanded model fails on ``example_inputs`` (e.g. a
            forward that reads ``self.conv.weight``) or computes something else.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expand takes an nn.Module, got {type(model).__name__}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    recipe = recipe_named(recipe)
    new = copy_module(model)
    uses = conv_uses(new)
    registered = Counter(id(m) for _, m in new.named_modules(remove_duplicate=False))
    expanded, skipped = [], []
    for path, conv in [(p, m) for p, m in new.named_modules() if isinstance(m, nn.Conv2d)]:
        bn_path = uses.pairs.get(path, "")
        bn = new.get_submodule(bn_path) if bn_path else None
        if bn is not None and registered[id(bn)] > 1:
            bn_path, bn = "", None
        site = Site.of(path, conv, bn)
        reason = _why_not(site, registered[id(conv)], path in uses.read_directly) or recipe.skip(site)
        if reason:
            skipped.append(Skipped(path, reason))
            continue
        block = recipe.build(site, init).train(conv.training)
        if not path:  # the model is itself a conv
            new = block
        else:
            _replace(new, path, block)
        if bn_path:
            _replace(new, bn_path, nn.Identity())
        expanded.append(Expanded(path, site.kernel, site.stride, site.groups, bn_path, block.branch_names))
    check = _check(model, new, example_inputs, init) if example_inputs is not None else ""
    new.expand_report = ExpandReport(
        recipe.name, init, tuple(expanded), tuple(skipped), _count(model), _count(new), uses.notes, check
    )
    return new


def _why_not(site: Site, registrations: int, read_directly: bool) -> str | None:
    """What keeps every recipe from expanding ``site``, or None."""
    conv = site.conv
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is a Conv2d subclass: its forward may compute something other than a conv"
    if registrations > 1:
        return "the same conv module is registered at several paths"
    if read_directly:
        return "the model's forward reads the conv's weight or bias itself: a block in its place would break it"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: the branches pad with zeros"
    if site.dilation != (1, 1):
        return f"dilation {site.dilation}: the recipes' small kernels would need the same dilation to line up, left out"
    if site.padding is None:
        return "padding='same' with an even kernel pads unevenly"
    return None


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ConvUses:
    """How a model's forward uses its convs and BNs, as far as ``torch.fx`` can see (:func:`conv_uses`)."""

    pairs: dict[str, str]  # conv path -> path of the BN that alone reads the conv's output
    read_directly: frozenset[str]  # paths of modules whose parameters or buffers the forward reads itself
    notes: tuple[str, ...] = ()


def conv_uses(model: nn.Module) -> ConvUses:
    """Which ``nn.Conv2d`` has its output read only by an ``nn.BatchNorm2d``, and which modules' tensors the forward reads.

    Found in the ``torch.fx`` graph of ``model``, or where it does not trace,
    of its children (recursively); a conv or BN called more than once is not
    paired.  An ``nn.Sequential`` that does not trace is read by its order.  A
    forward that reads ``self.bn.weight`` itself (``read_directly``) would break
    if that module were replaced.
    """
    pairs: dict[str, str] = {}
    read: set[str] = set()
    notes: list[str] = []
    _find_uses(model, "", pairs, read, notes)
    for conv, bn in list(pairs.items()):
        if bn in read:
            del pairs[conv]
    return ConvUses(pairs, frozenset(read), tuple(notes))


def _find_uses(module: nn.Module, prefix: str, pairs: dict[str, str], read: set[str], notes: list[str]) -> None:
    try:
        with globals_kept(module, refuse=False):  # (only its calls are read: a store it made is put back)
            graph = torch.fx.symbolic_trace(module).graph
    except Exception as e:  # noqa: BLE001  (any failure to trace: look inside)
        if type(module) is nn.Sequential:
            _sequential_pairs(module, prefix, pairs)
        elif not prefix:
            notes.append(f"torch.fx could not trace the model ({type(e).__name__}); conv+BN pairs were looked for in its parts")
        for name, child in module.named_children():
            _find_uses(child, f"{prefix}{name}.", pairs, read, notes)
        return
    # A module reading its own tensors is what modules do; a forward reading a child's tensors pins that child.
    read.update(prefix + n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr" and "." in n.target)
    calls = [n for n in graph.nodes if n.op == "call_module"]
    count = Counter(n.target for n in calls)
    for n in calls:
        if not _is(module, n.target, nn.Conv2d) or len(n.users) != 1:
            continue
        (user,) = n.users
        if user.op == "call_module" and _is(module, user.target, nn.BatchNorm2d) and user.args == (n,) and not user.kwargs:
            if count[n.target] == 1 and count[user.target] == 1:
                pairs[prefix + n.target] = prefix + user.target


def _sequential_pairs(seq: nn.Sequential, prefix: str, pairs: dict[str, str]) -> None:
    children = list(seq.named_children())
    for (a, conv), (b, bn) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            pairs.setdefault(prefix + a, prefix + b)


def _is(module: nn.Module, target: str, kind: type) -> bool:
    m = module.get_submodule(target)
    if kind is nn.BatchNorm2d:  # a BN the main branch can take over: affine, with running statistics
        return type(m) is nn.BatchNorm2d and m.affine and m.track_running_stats
    return isinstance(m, kind)


def _check(model: nn.Module, expanded: nn.Module, example_inputs, init: str) -> str:
    """Run ``expanded`` on the example inputs; with ``init="preserve"`` compare it with ``model`` (eval mode)."""
    from repalgebra.verify import verify

    example = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    try:
        report = verify(model, expanded, example, n=1)
    except Exception as e:  # noqa: BLE001
        raise ExpandError(f"the expanded model does not run on the example inputs: {type(e).__name__}: {e}") from e
    if init != "preserve":
        return "runs on the example inputs"
    if not report:
        raise ExpandError(f"init='preserve' but the expanded model differs from the original:\n{report}")
    worst = max((o.max_rel for o in report.outputs), default=0.0)
    dtype = str(report.dtype).removeprefix("torch.")
    return f"same function as the original in eval mode: max rel err {worst:.1e} ({dtype}, tolerance {report.tolerance:.0e})"
