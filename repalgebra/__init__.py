"""repalgebra: structural reparameterization as an algebra of proven rewrite rules."""

from repalgebra.interpret import run_graph
from repalgebra.ir import Graph, Node, Value
from repalgebra.ops import OPS, op_def
from repalgebra.rewrite import RULES, Refusal, Rewrite, RewriteReport, rewrite, rule

import repalgebra.rules  # noqa: F401,E402  (registers the built-in rules)
from repalgebra.frontend.torch import UntraceableError, trace  # noqa: E402
from repalgebra.fuse import FuseReport, fuse  # noqa: E402
from repalgebra.verify import VerifyReport, verify  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Graph", "Node", "Value", "OPS", "op_def", "RULES", "Refusal", "Rewrite", "RewriteReport", "rewrite", "rule", "run_graph",
    "trace", "fuse", "verify", "FuseReport", "VerifyReport", "UntraceableError",
]
