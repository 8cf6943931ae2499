"""A helper function of ours that a fused module's generated code calls, recorded as one fx call when traced again.

The torch back end writes a few of our own functions into a fused module's code (``chunk_piece``, the front end's
``setitem_copy``).  Traced again by any fx tracer (``export_onnx``, ``fuse`` of a fused model, unpickling a
GraphModule, which retraces its code with torch's own tracer), their Python bodies would run on Proxies and fail
(``len`` of a Proxy) or record something else.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import fx
from torch.utils import _pytree as pytree

__all__ = ["traced_as_one_call", "sized_call", "SIZED_FACTORIES"]

# The torch functions that take sizes (or a dtype) but no tensor: recorded as calls where the trace gives them a
# traced value (frontend/fx_trace.py), and called through sized_call in a fused module's code (backend/torch.py).
SIZED_FACTORIES = ("zeros", "ones", "empty", "full", "finfo", "iinfo")


def traced_as_one_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, recorded as one fx call where an argument is a Proxy, instead of running its body on Proxies.

    For the front end's own helpers (``setitem_copy``) that the torch back end writes into a fused module's
    code: tracing that module again (``export_onnx``, ``fuse`` of a fused model, unpickling a GraphModule) then
    records the helper as the original trace did, as torch functions record themselves."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        for a in pytree.tree_leaves((args, kwargs)):  # a size among a shape's: torch.zeros((B, n))
            if isinstance(a, fx.Proxy):
                return a.tracer.create_proxy("call_function", call, args, kwargs)
        return fn(*args, **kwargs)

    call.traced_as_one_call = True  # type: ignore[attr-defined]
    return call


@traced_as_one_call
def sized_call(name: str, *args: Any, **kwargs: Any) -> Any:
    """``torch.<name>(*args, **kwargs)``: a torch factory given sizes read at run time (``torch.zeros(B, n, n)``),
    or ``torch.finfo(x.dtype)``, as a fused module's code writes it.  Traced again by torch's own tracer (unpickling
    a GraphModule), ``torch.zeros`` would fail on the Proxies among its sizes; this records itself as one call."""
    return getattr(torch, name)(*args, **kwargs)
