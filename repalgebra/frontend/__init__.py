"""Front ends: models to :class:`~repalgebra.ir.Graph`."""

from repalgebra.frontend.torch import TraceResult, UntraceableError, trace, trace_model

__all__ = ["trace", "trace_model", "TraceResult", "UntraceableError"]
