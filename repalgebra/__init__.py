"""repalgebra: structural reparameterization as an algebra of proven rewrite rules."""

from repalgebra.interpret import run_graph
from repalgebra.ir import Graph, Node, Value
from repalgebra.ops import OPS, op_def
from repalgebra.rewrite import RULES, Refusal, Rewrite, RewriteReport, rewrite, rule

import repalgebra.rules  # noqa: F401,E402  (registers the built-in rules)
from repalgebra.frontend.torch import UntraceableError, trace  # noqa: E402
from repalgebra.fuse import FuseError, FuseReport, fuse  # noqa: E402
from repalgebra.verify import VerifyReport, verify  # noqa: E402
from repalgebra.expand import ExpandError, ExpandReport, expand  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Graph", "Node", "Value", "OPS", "op_def", "RULES", "Refusal", "Rewrite", "RewriteReport", "rewrite", "rule", "run_graph",
    "trace", "fuse", "verify", "export_onnx", "FuseReport", "FuseError", "VerifyReport", "UntraceableError",
    "expand", "ExpandReport", "ExpandError", "ExportReport",
]


def __getattr__(name: str):
    # ``export_onnx`` imports onnx, which most users of fuse never need: load it on first use.
    if name == "export_onnx":
        from repalgebra.backend.onnx import export_onnx

        return export_onnx
    if name == "ExportReport":
        from repalgebra.backend.onnx_fallback import ExportReport

        return ExportReport
    raise AttributeError(f"module 'repalgebra' has no attribute {name!r}")
