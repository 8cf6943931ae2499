"""1-D convolutions as 2-D ones of height one, kept in 2-D between them.

Both front ends write a ``Conv1d`` on ``(N, C, L)`` as a ``conv2d`` of height
one between a lift and a flatten: ``flatten(conv2d(lift(x)), 2, 3)``, where
``lift(x)`` is ``x.unsqueeze(2)`` (a ``reshape_dyn``).  Every 2-D rule then
applies to the conv itself, but not across two of them: a 1-D RepVGG block
``relu(dense(x) + pw(x) + bn(x))`` becomes two lifts of ``x``, two flattens
summed, and a BatchNorm1d on the 3-D ``x``, so ``branch_sum`` never sees two
convs of one input.  :func:`lift_height_one` rewrites the graph so that 1-D
regions run in 2-D, exactly:

* one lift per value (every conv of ``x`` reads the same ``lift(x)``);
* ``lift(flatten(y, 2, 3)) = y`` for a ``y`` of height one by construction
  (made from a lift by ops that keep the height: see :func:`_height_one`);
* an elementwise op of flattens of equal shapes is the flatten of the op:
  ``f(flatten(a), flatten(b)) = flatten(f(a, b))``;
* a scale by one number is elementwise too (its factor, repeated along the
  length, becomes one per channel on the lift);
* a per-channel op (BatchNorm1d, a channel scale) or a sum term on a 3-D
  value that is also lifted runs on the lift: ``bn(x) = flatten(bn(lift(x)))``,
  and so does a per-channel op whose own output is lifted (``lift(bn(x)) =
  bn(lift(x))``: a BatchNorm1d on the input before a conv);
* a pad or a slice along the length (a causal conv's ``F.pad(x, (k - 1, 0))``,
  a reflect pad, a TCN's chomp ``y[..., :-(k - 1)]``) or a slice of the
  channels is the flatten of the same on the lift, where the conv it feeds
  reads the lift or its input is a flatten: ``pad(x) = flatten(pad(lift(x)))``
  with the pad on the width, so ``pad_absorb`` and ``pad_share`` meet it.

Flattening axes 2 and 3 of a height-one tensor and lifting back only rename
indices, so each step is exact at every input size; ``fuse`` checks the
result against the model anyway.
"""

from __future__ import annotations

from repalgebra.ir import Graph, Node, Value

__all__ = ["lift_height_one"]

_LIFT = ((((0, 0),), ((0, 1),), 1, ((0, 2),)))  # reshape_dyn's shape for x.unsqueeze(2) of a 3-D x (args.unsqueezed)
_UNARY = ("relu", "gelu", "sigmoid", "silu", "hardswish", "hardsigmoid", "tanh", "leaky_relu", "clamp", "softplus", "threshold", "elu",
          "abs", "sqrt", "exp", "log", "rsqrt", "pow", "identity", "prelu", "batch_norm")  # elementwise, or per channel (axis 1)
_BINARY = ("add", "sub", "mul", "div")  # elementwise where both shapes are equal
_ALONG = ("pad", "pad_nd", "slice")  # along the length (or a slice of the channels): see _along


def _is_lift(n: Node) -> bool:
    return (n.op == "reshape_dyn" and len(n.inputs) == 2 and n.inputs[0] is n.inputs[1] and n.attrs["shape"] == _LIFT
            and n.x.shape is not None and len(n.x.shape) == 3)


def _flattened(v: Value, known: dict[int, bool]) -> Value | None:
    """The height-one 4-D value ``v`` is ``flatten(., 2, 3)`` of, if it is."""
    p = v.producer
    if p is None or p.op != "flatten" or (p.attrs["start"], p.attrs["end"]) != (2, 3):
        return None
    return p.x if _height_one(p.x, known) else None


def _height_one(v: Value, known: dict[int, bool]) -> bool:
    """Whether ``v`` has height one at every input size: a lift, or made from such values by ops that keep it
    (elementwise and per-channel ops, a conv whose kernel, padding and stride leave the height as it is).
    ``known``: the answers so far (the values the pass makes are entered as it makes them).  Iterative: a deep
    chain of ``1 x k`` convs would exceed Python's recursion limit."""
    stack = [v]
    while stack:
        u = stack[-1]
        if id(u) in known:
            stack.pop()
            continue
        n = u.producer
        if u.shape is None or len(u.shape) != 4 or u.shape[2] != 1 or n is None or not _keeps_height(n):
            known[id(u)] = False
        elif _is_lift(n):
            known[id(u)] = True
        else:
            sources = [n.x] if n.op not in _BINARY else list(n.inputs)
            pending = [i for i in sources if id(i) not in known]
            if pending:
                stack.extend(pending)
                continue
            known[id(u)] = all(known[id(i)] for i in sources)
        stack.pop()
    return known[id(v)]


def _keeps_height(n: Node) -> bool:
    """Whether ``n``'s output has height one wherever its inputs have (a lift: always)."""
    if _is_lift(n) or n.op in _UNARY or n.op in _BINARY or n.op == "scale":
        return True
    if n.op in _ALONG:
        return _along(n, 4) is not None
    if n.op in ("conv2d", "conv_transpose2d"):
        a = n.attrs
        return (n.params["weight"].shape[2] == 1 and a["stride"][0] == 1 and a["padding"][0] == a["padding"][1] == 0
                and a.get("output_padding", (0, 0))[0] == 0)
    return False


def _along(n: Node, rank: int) -> dict | None:
    """The attributes of pad/slice ``n`` (of a value of ``rank`` 3 or 4) on the height-one lift of its 1-D
    counterpart, where it keeps the height; else None.  A ``pad`` pads the last two axes, which are the channels
    and the length of a 3-D value: it must not pad the first of them.  A ``pad_nd`` pads the length only (torch's
    reflect/replicate/circular pads of a 4-D value take the last two axes: ``(l, r)`` becomes ``(l, r, 0, 0)``).
    A slice is of the length or of the channels."""
    a = n.attrs
    if n.op == "pad":
        return dict(a) if a["pads"][0] == a["pads"][1] == 0 else None
    if n.op == "pad_nd":
        pads = tuple(a["pads"])
        if len(pads) % 2 or len(pads) > 4 or any(pads[2:]):
            return None
        return {**a, "pads": pads[:2] + (0, 0)}
    axis = a["axis"] % rank
    if axis == 1:  # (as 1: torch.export writes narrow(-2, ...) of a 3-D value's channels as -2, the lift's height)
        return {**a, "axis": 1}
    return {**a, "axis": 3} if axis == rank - 1 else None


def _uniform(n: Node) -> bool:
    """Whether ``n`` scales by one number (``conv1d(x) * 2.0``, peft LoRA's ``* scaling``), which the front ends
    write as a ``scale`` along the length, its factor repeated: elementwise, so it runs on the lift like a ReLU
    (it stopped the lift, and the BatchNorm1d after it stayed; a probe)."""
    if n.op != "scale":
        return False
    s = n.params["scale"]
    return s.numel() > 0 and bool((s == s.reshape(-1)[0]).all())


def _per_channel(n: Node) -> dict:
    """Scale ``n``'s parameters along the channels of its lift: as they are for a channel scale, else its one
    number once per channel (as the front ends write ``x * 2.0`` of a 4-D value)."""
    if n.attrs["axis"] % 3 == 1:
        return n.params
    s = n.params["scale"]
    return {**n.params, "scale": s.reshape(-1)[:1].expand(n.out.shape[1]).clone()}


def lift_height_one(graph: Graph) -> Graph:
    """``graph`` with its 1-D regions in 2-D (see the module docstring); the same graph when it has no lift."""
    if not any(_is_lift(n) for n in graph.nodes):
        return graph
    lifted = _lifted(graph)
    env: dict[int, Value] = {}
    lifts: dict[int, Value] = {}  # id of a 3-D value (new graph) -> its one lift
    known: dict[int, bool] = {}  # see _height_one
    nodes: list[Node] = []

    def add(node: Node, height_one: bool = False) -> Value:
        nodes.append(node)
        if height_one:
            known[id(node.out)] = True
        return node.out

    def lift(x: Value, source: str) -> Value:
        if (y := _flattened(x, known)) is not None:
            return y
        if id(x) not in lifts:
            lifts[id(x)] = add(Node.make("reshape_dyn", [x, x], {"shape": _LIFT}, {}, source), height_one=True)
        return lifts[id(x)]

    def flat(y: Value, source: str) -> Value:
        return add(Node.make("flatten", [y], {"start": 2, "end": 3}, {}, source))

    for n in graph.nodes:
        inputs = [env.get(id(i), i) for i in n.inputs]
        if _is_lift(n):
            env[id(n.out)] = lift(inputs[0], n.source)
            continue
        if n.out.shape is not None and len(n.out.shape) == 3 and _sinks(n, inputs, lifted, known):
            fours = [lift(i, n.source) for i in inputs]
            attrs = {**n.attrs, "axis": 1} if n.op == "scale" else _along(n, 3) if n.op in _ALONG else n.attrs
            params = _per_channel(n) if n.op == "scale" else n.params
            y = add(Node.make(n.op, fours, attrs, params, n.source, name=n.out.name), height_one=True)
            env[id(n.out)] = flat(y, n.source)
            continue
        env[id(n.out)] = add(n if all(a is b for a, b in zip(inputs, n.inputs)) else n.replace(inputs=tuple(inputs)))
    out = Graph(graph.inputs, nodes, [env.get(id(v), v) for v in graph.outputs])
    out.eliminate_dead()  # the flattens the lifts read past
    return out


def _lifted(graph: Graph) -> set[int]:
    """The ids of the 3-D values that are lifted: read by a lift, or by a pad, slice or per-channel op whose own
    output is (which runs on the lift, see :func:`_sinks`, and lifts its input in turn: SpeechBrain's BatchNorm1d,
    then its Conv1d's reflect pad, then the conv, whose BN stayed where the pad came between; review R19a)."""
    lifted = {id(n.x) for n in graph.nodes if _is_lift(n)}
    for n in reversed(graph.nodes):
        if id(n.out) in lifted and n.out.shape is not None and len(n.out.shape) == 3 and _moves_with_lift(n):
            lifted.add(id(n.x))
    return lifted


def _moves_with_lift(n: Node) -> bool:
    """Whether ``n`` runs on the lift of its input wherever its output is lifted: per channel, or along the length."""
    return _per_channel_op(n) or (n.op in _ALONG and _along(n, 3) is not None)


def _per_channel_op(n: Node) -> bool:
    """Whether 3-D ``n`` is a BatchNorm1d or a scale of the channels."""
    return n.op == "batch_norm" or (n.op == "scale" and n.attrs["axis"] % 3 == 1)


def _sinks(n: Node, inputs: list[Value], lifted: set[int], known: dict[int, bool]) -> bool:
    """Whether 3-D ``n`` runs on the lifts of its ``inputs``: each is a height-one flatten or a value that is lifted
    anyway, and (for two) their shapes are equal; at least one is a flatten, or ``n`` is per channel (a BN beside
    the convs of its input: it then meets them), or a pad or slice a conv reads (the conv then reads it in 2-D), or
    a per-channel op a conv reads (a BatchNorm1d on the model's input before a 1x1 Conv1d: ``bn_before_conv``
    then meets it; it stayed, a probe)."""
    per_channel, moves = _per_channel_op(n), _moves_with_lift(n)
    if not moves and n.op not in _UNARY and n.op not in _BINARY and not _uniform(n):
        return False
    if n.op in _BINARY and inputs[0].shape != inputs[1].shape:
        return False
    flats = [_flattened(i, known) is not None for i in inputs]
    if moves and id(n.out) in lifted:
        return True  # lift(pad(x)) = pad(lift(x)), lift(bn(x)) = bn(lift(x)): the lift moves up, whatever reads x
    return (any(flats) or per_channel) and all(f or id(o) in lifted for f, o in zip(flats, n.inputs))
