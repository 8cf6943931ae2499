"""Sequential merge of Linears: a Linear after a Linear is one Linear.

    Linear(Linear(x; W1, b1); W2, b2) = Linear(x; W2 W1, W2 b1 + b2)

A Linear acts on the last axis alone, with no padding or geometry, so the
identity holds as it stands.  A low-rank adapter (LoRA: ``base(x) + s B(A(x))``)
folds with it: ``linear_affine_fold`` puts ``s`` into ``B``, this rule makes
``B A`` one Linear, and ``branch_sum`` adds it to ``base``.  So does a head
written as two Linears with nothing between them.

Preconditions: the inner Linear's output is read only by the outer one; the
merged Linear takes no more multiply-adds per token than the two (``O I <=
M I + O M`` for ``I -> M -> O`` features), or the outer one's output is summed
right after with a Linear of the inner one's input and the merged shape (the
sum absorbs the merge: LoRA's rank-``r`` pair alone is ``O I`` multiply-adds
against ``r (I + O)``, but the sum is ``O I`` either way).
"""

from repalgebra.match import merged_source, producer, sole_use
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("linear_seq_merge", on="linear")
def linear_seq_merge(graph, outer):
    inner = producer(outer.x, "linear")
    if inner is None or not sole_use(graph, inner.out):
        return None
    (o, m), i = outer.params["weight"].shape, inner.params["weight"].shape[1]
    if o * i > m * i + o * m and not _absorbed(graph, outer, inner):
        return Refusal(f"the merged Linear would take {o * i} multiply-adds per token, more than the two ({m * i + o * m})")
    w2 = outer.params["weight"]
    params = {"weight": w2 @ inner.params["weight"]}
    if "bias" in inner.params or "bias" in outer.params:
        params["bias"] = outer.params.get("bias", 0) + (w2 @ inner.params["bias"] if "bias" in inner.params else 0)
    new = outer.replace(inputs=(inner.x,), params=params, source=merged_source(inner, outer))
    return Rewrite(outer.out, new.out, (new,))


def _absorbed(graph, outer, inner) -> bool:
    """Whether ``outer``'s output is added to (or subtracted from) a Linear of ``inner``'s input with the merged shape."""
    shape = (outer.params["weight"].shape[0], inner.params["weight"].shape[1])
    for join in graph.users(outer.out):
        if join.op in ("add", "sub"):
            for v in join.inputs:
                sib = producer(v, "linear")
                if sib is not None and sib is not outer and sib.x is inner.x and tuple(sib.params["weight"].shape) == shape:
                    return True
    return False
