"""The rule registry: what a rule returns (:class:`Rewrite`, :class:`Refusal`) and how it is registered (:func:`rule`).

A rule is a plain function ``(graph, node) -> Rewrite | Refusal | None``,
registered with :func:`rule` for the ops it is tried on.  ``None`` means "no
match"; a :class:`Refusal` means "the pattern matched but a precondition does
not hold" and carries the reason, which ``fuse`` reports for the nodes it had
to leave alone; a :class:`Rewrite` says "value ``old`` equals value ``new``,
computed by the new ``nodes``".

This module imports neither the rules nor the engine: the rules
(``repalgebra/rules/*.py``) import it to register themselves, and the engine
(:mod:`repalgebra.rewrite`) imports the rules package, so imports run one way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from repalgebra.ir import Graph, Node, Value
from repalgebra.ops import op_def

__all__ = ["Rewrite", "Refusal", "Rule", "RuleFn", "RULES", "rule"]


@dataclass(frozen=True)
class Rewrite:
    """``old`` is replaced everywhere by ``new``, which ``nodes`` (new, in order) compute.

    ``also``: more ``(old, new)`` pairs replaced in the same step, for a rule
    that changes a producer and removes a node further down at once (a query
    scale folded into the qkv Linear: the Linear is replaced, the scale
    bypassed).  Each ``new`` there must already be computed before its ``old``.
    """

    old: Value
    new: Value
    nodes: tuple[Node, ...] = ()
    also: tuple[tuple[Value, Value], ...] = ()


@dataclass(frozen=True)
class Refusal:
    """A rule matched but its precondition failed; ``reason`` says which.

    ``about`` is the node the report names: one that stays because of it, when
    that is not the node the rule was tried on (a BN that cannot fold into the
    conv after it), or the tried node itself where the report would not name
    it otherwise (a concat whose branches do not merge).
    """

    reason: str
    about: Node | None = None


RuleFn = Callable[[Graph, Node], "Rewrite | Refusal | None"]
"""A rule's function: ``(graph, node) -> Rewrite | Refusal | None`` (``None``: no match)."""


@dataclass(frozen=True)
class Rule:
    """A registered rule: its name, the ops it is tried on, the function."""

    name: str
    ops: tuple[str, ...]
    fn: RuleFn

    @property
    def doc(self) -> str:
        """The rule's identity and preconditions: its module docstring (one rule per module)."""
        module = sys.modules.get(self.fn.__module__)
        return ((module.__doc__ if module else None) or self.fn.__doc__ or "").strip()


RULES: dict[str, Rule] = {}
"""Every registered rule by name, in registration order (the order the engine tries them on a node)."""


def rule(name: str, on: str | Sequence[str]):
    """Register a rule function under ``name``, tried on nodes whose op is in ``on``."""
    ops = (on,) if isinstance(on, str) else tuple(on)
    for o in ops:
        op_def(o)  # unknown op -> error at import time

    def register(fn: RuleFn) -> RuleFn:
        if name in RULES:
            raise ValueError(f"rule {name!r} registered twice")
        RULES[name] = Rule(name, ops, fn)
        return fn

    return register
