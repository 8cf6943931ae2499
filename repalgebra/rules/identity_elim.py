"""Identity elimination: ``identity(x) = x``.

Preconditions: none.  (``nn.Identity`` modules and no-op dropouts trace to this.)
"""

from repalgebra.rules.registry import Rewrite, rule


@rule("identity_elim", on="identity")
def identity_elim(graph, node):
    return Rewrite(node.out, node.x)
