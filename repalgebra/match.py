"""Pattern helpers the rules share: who produces a value, who reads it, conv geometry."""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd, prod

from repalgebra.ir import Graph, Node, Value


def producer(value: Value, *ops: str) -> Node | None:
    """The node computing ``value`` if its op is one of ``ops`` (any op when none given)."""
    n = value.producer
    if n is None or (ops and n.op not in ops):
        return None
    return n


def sole_use(graph: Graph, value: Value) -> bool:
    """Whether exactly one node reads ``value`` and it is not a graph output."""
    return graph.num_uses(value) == 1


def every_reader(graph: Graph, value: Value, op: str) -> list[Node] | None:
    """The nodes reading ``value`` when there are several, all ``op`` nodes that read it as their first input only
    (and it is no graph output), in graph order; else None."""
    readers = graph.users(value)
    if len(readers) < 2 or graph.num_uses(value) != len(readers):
        return None
    if any(n.op != op or n.inputs[0] is not value or any(i is value for i in n.inputs[1:]) for n in readers):
        return None
    return readers


CONVS = ("conv2d", "conv3d")  # the convs whose branches kernel_pad and branch_sum merge (a 3-D RepVGG block's too)


@dataclass(frozen=True)
class Window:
    """Where a conv's taps land in input coordinates, per spatial axis (2 of a conv2d, 3 of a conv3d): ``first``
    offset, tap ``step``, tap ``count``."""

    stride: tuple[int, ...]
    first: tuple[int, ...]  # -padding_top, -padding_left (a conv3d: minus its padding on each axis)
    step: tuple[int, ...]  # dilation
    count: tuple[int, ...]  # kernel size

    def last(self, axis: int) -> int:
        return self.first[axis] + (self.count[axis] - 1) * self.step[axis]


def window(conv: Node) -> Window:
    """The conv's tap window."""
    if conv.op == "conv3d":  # pads both sides of an axis alike
        first = tuple(-p for p in conv.attrs["padding"])
    else:
        top, _, left, _ = conv.attrs["padding"]
        first = (-top, -left)
    return Window(conv.attrs["stride"], first, conv.attrs["dilation"], tuple(conv.params["weight"].shape[2:]))


def reach(conv: Node) -> tuple[int, ...]:
    """Per spatial axis, the padding on both sides less the window's span ``d (k - 1)``: a conv of stride ``s`` has
    ``(size - 1 + reach) // s + 1`` outputs.  Convs of one input and stride have outputs of one size at every input
    size exactly when their reaches are equal; at a stride above 1, unequal reaches can agree at the example's size
    and not at others (a 1x1 and a 2x2 stride-2 conv at even sizes only)."""
    if conv.op == "conv3d":  # pads both ends of an axis alike
        pads = [2 * p for p in conv.attrs["padding"]]
    else:
        t, b, l, r = conv.attrs["padding"]
        pads = [t + b, l + r]
    return tuple(p - d * (k - 1) for p, d, k in zip(pads, conv.attrs["dilation"], conv.params["weight"].shape[2:]))


def is_1x1_pointwise(conv: Node) -> bool:
    """A 1x1 conv with stride 1 and no padding: a per-pixel channel mix."""
    a = conv.attrs
    return conv.params["weight"].shape[2:] == (1, 1) and a["stride"] == (1, 1) and a["padding"] == (0, 0, 0, 0)


def branch_input(value: Value) -> Value:
    """The value a branch starts from: the input of a conv or BN, else the value itself (identity)."""
    n = producer(value, "conv2d", "batch_norm")
    return n.x if n is not None else value


JOINS = ("add", "sub", "concat")


class Source(str):
    """The source path of a node that replaced others: it reads as their longest common dotted prefix (reports and
    module names use it) and keeps ``origins``, the paths of every node merged into it.  Two folds under one
    prefix (a block's ``conv1 + bn1`` and ``conv2 + bn2``, both ``layer1``) are then told apart where their weights
    happen to be equal (identity-initialised convs): the torch back end shares a module between two calls only
    where they merged the same modules (ALBERT's block, called three times), and ``fuse`` gives a fused module's
    parameters gradients where the modules it merged had them."""

    origins: frozenset[str]

    def __new__(cls, text: str, origins: frozenset[str]) -> "Source":
        made = super().__new__(cls, text)
        made.origins = origins
        return made

    def __reduce__(self) -> tuple:
        return Source, (str(self), self.origins)


def origins(source: str) -> frozenset[str]:
    """The module paths a node with ``source`` was made from: its own, or those a merge kept (:class:`Source`)."""
    return getattr(source, "origins", None) or (frozenset({str(source)}) if source else frozenset())


def merged_source(*nodes: Node) -> str:
    """The source path for a node that replaces ``nodes``: their longest common dotted prefix.

    Without a common prefix it is the first node's source (the one the others fold into).  It keeps the paths it
    merged (:class:`Source`).
    """
    paths = [n.source.split(".") for n in nodes if n.source]
    if not paths:
        return ""
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return Source(".".join(common) or ".".join(paths[0]), frozenset().union(*(origins(n.source) for n in nodes)))


def conv_with(conv: Node, *, sources: tuple[Node, ...] = (), inputs: tuple[Value, ...] | None = None, **changes) -> Node:
    """A new conv2d like ``conv`` with params/attrs (and maybe inputs) changed, its source merged with ``sources``."""
    params = dict(conv.params)
    for key in ("weight", "bias"):
        if key in changes:
            params[key] = changes.pop(key)
    if params.get("bias") is None:
        params.pop("bias", None)
    attrs = {**conv.attrs, **changes}
    return conv.replace(
        params=params, attrs=attrs, inputs=inputs or conv.inputs, source=merged_source(conv, *sources)
    )


def with_operands(join: Node, replaced: dict[int, Value]) -> Node:
    """A copy of ``join`` whose operands at the given positions are replaced."""
    inputs = tuple(replaced.get(k, v) for k, v in enumerate(join.inputs))
    return join.replace(inputs=inputs)


def conv_operands(join: Node, ops: tuple[str, ...] = CONVS) -> dict[tuple, list[tuple[int, Node]]]:
    """The conv operands of ``join`` (of ``ops``) grouped by (input value, stride, :func:`reach`): the ones that may be
    summed, their outputs of one size at every input size."""
    groups: dict[tuple, list[tuple[int, Node]]] = {}
    for k, v in enumerate(join.inputs):
        conv = producer(v, *ops)
        if conv is not None:
            groups.setdefault((id(conv.x), conv.attrs["stride"], reach(conv)), []).append((k, conv))
    return groups


def union_window(windows: list[Window]) -> Window:
    """The one window spanning ``windows``: on their lattice (:func:`lattice_step`), or dense where they lie on
    different ones."""
    axes = range(len(windows[0].first))
    step = lattice_step(windows) or (1,) * len(axes)
    first = tuple(min(w.first[a] for w in windows) for a in axes)
    count = tuple((max(w.last(a) for w in windows) - first[a]) // step[a] + 1 for a in axes)
    return Window(windows[0].stride, first, step, count)


def union_taps(convs: list[Node]) -> int:
    """Taps of the one kernel spanning the windows of ``convs`` (:func:`union_window`)."""
    return prod(union_window([window(c) for c in convs]).count)


def merge_cost(join: Node, convs: list[Node]) -> tuple[int, int]:
    """Multiply-adds per output pixel of the one conv that ``convs`` (operands of ``join`` reading one input
    with one stride) become, and of the convs as they are.

    The merged kernel spans the union of their windows (:func:`union_taps`); its groups are the gcd of
    theirs (1 for a concat, whose channels interleave the groups), and its output channels are theirs (a
    sum) or all of them stacked (a concat).  DeepLabV2's ASPP sums 3 x 3 convs of rates 6 and 24: one
    49 x 49 kernel, many times their work."""
    in_channels = convs[0].params["weight"].shape[1] * convs[0].attrs["groups"]
    outs = [c.params["weight"].shape[0] for c in convs]
    if join.op == "concat":
        per_tap = sum(outs) * in_channels
    else:
        per_tap = max(outs) * (in_channels // gcd(*(c.attrs["groups"] for c in convs)))
    return per_tap * union_taps(convs), sum(c.params["weight"].numel() for c in convs)


def merge_refusal(graph: Graph, join: Node, convs: list[Node], before: list[Node] | None = None) -> str | None:
    """Why merging ``convs`` (operands of ``join`` reading one input with one stride, some perhaps about to
    be made) would make the model slower, or ``None`` where it does not.  ``before``: the convs as the model
    has them, where ``convs`` are made from them with larger kernels (:mod:`repalgebra.rules.pad_share`),
    priced as they are.

    It pays where the one conv they become has no more multiply-adds than they have together (RepVGG's 1x1
    inside its 3x3, ACNet's 1x3 and 3x1).  It also pays as a step towards merging the whole sum around
    ``join`` (the add/sub tree over values read once, with its channel concats) where that sum's one conv
    has no more multiply-adds than all the sum's convs of this input: small dilated kernels that would be
    dearer merged than apart, inside the window of a large kernel that absorbs them (UniRepLKNet)."""
    merged, apart = merge_cost(join, convs)
    if before is not None:
        convs, apart = before, sum(c.params["weight"].numel() for c in before)
    if merged <= apart:
        return None
    root = join
    while sole_use(graph, root.out) and (ups := graph.users(root.out)) and ups[0].op in ("add", "sub"):
        root = ups[0]
    x, stride, span = convs[0].x, convs[0].attrs["stride"], reach(convs[0])
    leaves, dense = {id(c): c for c in convs}, join.op == "concat"
    stack = [root]
    while stack:
        for v in stack.pop().inputs:
            p = v.producer
            if p is not None and p.op in CONVS and p.x is x and p.attrs["stride"] == stride and reach(p) == span:
                if sole_use(graph, v):  # a conv read elsewhere too stays for that reader: it absorbs nothing
                    leaves.setdefault(id(p), p)
            elif p is not None and (p.op in ("add", "sub") or _channel_concat(p)) and sole_use(graph, v):
                dense |= p.op == "concat"
                stack.append(p)
    if len(leaves) > len(convs):
        groups = 1 if dense else gcd(*(c.attrs["groups"] for c in leaves.values()))
        whole = root.out.shape[1] * (x.shape[1] // groups) * union_taps(list(leaves.values()))
        if whole <= sum(c.params["weight"].numel() for c in leaves.values()):
            return None
    return f"the one conv they would become has {merged} multiply-adds per output pixel, more than the {len(convs)} convs together ({apart})"


def _channel_concat(node: Node) -> bool:
    return node.op == "concat" and node.attrs["axis"] in (1, -3)


def lattice_step(windows: list[Window]) -> tuple[int, int] | None:
    """The tap step that ``windows`` share, per axis, where their taps lie on one lattice; else ``None``.

    A window of one tap on an axis takes any step there (a 1x1 conv's dilation does nothing): only its
    offset must lie on the lattice of the others, as an identity branch does inside a dilated 3x3."""
    step = []
    for a in range(len(windows[0].first)):
        steps = {w.step[a] for w in windows if w.count[a] > 1}
        if len(steps) > 1:
            return None
        d = steps.pop() if steps else 1
        if any((w.first[a] - windows[0].first[a]) % d for w in windows):
            return None
        step.append(d)
    return tuple(step)


def merges_free(join: Node, a: Node, b: Node) -> bool:
    """Whether convs ``a`` and ``b`` (operands of ``join`` reading one input with one stride) merge at no cost: their
    taps lie on one lattice and the one conv they become has no more multiply-adds than the two (a depthwise 5x1
    inside a dense 5x1).  :mod:`~repalgebra.rules.kernel_pad` pairs such convs and
    :mod:`~repalgebra.rules.sum_regroup` keeps them apart from the costly ones: one test, so the two agree (they
    disagreed, and wrote a sum back and forth for ever; review R12)."""
    merged, apart = merge_cost(join, [a, b])
    return lattice_step([window(a), window(b)]) is not None and merged <= apart


def on_lattice(windows: list[Window]) -> bool:
    """Whether the taps of ``windows`` lie on one shared lattice (:func:`lattice_step`)."""
    return lattice_step(windows) is not None
