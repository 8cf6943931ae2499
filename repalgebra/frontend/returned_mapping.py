"""The dict of its own attributes that a property of a module returns, read off its code.

Ultralytics' detection heads name the branches their ``forward_head`` runs in a property (``one2many`` returns
``dict(box_head=self.cv2, cls_head=self.cv3)``) and hand it on as keywords (``self.forward_head(x,
**self.one2many)``).  The reader of kept code (:mod:`~repalgebra.frontend.outside_reads`) follows a module handed to a
method of its own class by position; a dict of them is what it cannot follow, and it took every module below
``cv2`` and ``cv3`` for reached: a head kept whole for its anchor cache kept all its Conv+BN pairs unfolded
(review R10a 03).  :func:`mapping_returned` reads a property whose code is just that ``return`` (a ``dict(...)``
call or a dict display with constant keys, each value a chain of attributes of ``self`` or None), so the reader can
bind each key to the parameter of that name.
"""

from __future__ import annotations

import builtins
import dis
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Any

__all__ = ["mapping_returned", "method_loaded"]

# Instructions that carry no value of the expression (3.11 and 3.12)
_NOTHING = frozenset({"RESUME", "NOP", "CACHE", "PRECALL", "PUSH_NULL", "EXTENDED_ARG"})


def mapping_returned(function: types.FunctionType) -> dict[str, tuple[str, ...] | None] | None:
    """``{key: chain}`` where ``function`` (a getter taking only ``self``) is ``return dict(key=self.a.b, ...)`` or
    ``return {"key": self.a.b, ...}``: each chain the attribute names from ``self`` (``("a", "b")``), None for a value
    ``None``.  None for any other code (a test, a local, a call, a value that is not such a chain): the reader then
    reads the getter as any other code."""
    code = function.__code__
    if code.co_argcount != 1 or code.co_kwonlyargcount or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return None
    ops = [op for op in dis.get_instructions(code) if op.opname not in _NOTHING]
    if len(ops) < 2 or ops[-1].opname != "RETURN_VALUE":
        return None
    ops, build = ops[:-2], ops[-2]
    values = _values(ops, code.co_varnames[0])
    if values is None:
        return None
    if build.opname == "CALL" and values[:1] == [_DICT] and ops[-1].opname == "KW_NAMES":
        if function.__globals__.get("dict", builtins.dict) is not dict:
            return None  # (a ``dict`` of the model's own)
        keys, values = code.co_consts[ops[-1].arg], values[1:-1]
    elif build.opname == "BUILD_CONST_KEY_MAP" and values and isinstance(values[-1], _Const):
        keys, values = values[-1].value, values[:-1]
    elif build.opname == "BUILD_MAP":  # (one key: {"box_head": self.cv2})
        keys, values = tuple(getattr(k, "value", None) for k in values[::2]), values[1::2]
    else:
        return None
    if not isinstance(keys, tuple) or len(keys) != len(values) or not all(isinstance(k, str) for k in keys):
        return None
    if not all(isinstance(v, tuple) or v == _Const(None) for v in values):
        return None
    return {k: v if isinstance(v, tuple) else None for k, v in zip(keys, values)}


@dataclass(frozen=True)
class _Const:
    """A constant the code loads (a key, a tuple of keys, a value None)."""

    value: Any


_DICT = "<dict>"  # the global ``dict`` loaded to be called


def _values(ops: list[dis.Instruction], self_name: str) -> list[Any] | None:
    """The values ``ops`` push, in order: a chain of attributes from ``self_name`` (a tuple of their names), a
    :class:`_Const`, ``_DICT``, the names of a call's keywords (the ``KW_NAMES``); None where any is something else
    (``self`` itself, a local, a call)."""
    values: list[Any] = []
    for op in ops:
        if op.opname == "LOAD_FAST" and op.argval == self_name:
            values.append(())
        elif op.opname == "LOAD_ATTR" and values and isinstance(values[-1], tuple) and not method_loaded(op):
            values[-1] = (*values[-1], op.argval)
        elif op.opname == "LOAD_CONST":
            values.append(_Const(op.argval))
        elif op.opname == "LOAD_GLOBAL" and op.argval == "dict" and not values:
            values.append(_DICT)
        elif op.opname == "KW_NAMES" and op is ops[-1]:
            values.append(op.opname)
        else:
            return None
    return None if () in values else values


def method_loaded(op: dis.Instruction) -> bool:
    """Whether ``op`` loads a method to call (``self.conv(x)``: ``LOAD_METHOD``, or ``LOAD_ATTR`` flagged so from 3.12)."""
    return op.opname == "LOAD_METHOD" or (op.opname == "LOAD_ATTR" and sys.version_info >= (3, 12) and bool((op.arg or 0) & 1))
