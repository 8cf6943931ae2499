"""The IR: printing, DOT, shape inference, errors, the interpreter, toposort and dead-node elimination."""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from repalgebra.builder import GraphBuilder
from repalgebra.interpret import run_graph
from repalgebra.ir import Graph, Node, walk_back
from repalgebra.ops import OPS, op, op_def
from repalgebra.testing import (RTOL, add_bn, add_conv, bn_stats, conv_params, conv_specs, float_dtypes, input_shapes,
                                magnitude, random_input, seeds)


def small_graph(dtype=torch.float32):
    """x -> conv 3x3 (asymmetric padding) -> BN -> add(., conv 2x2(x)) -> relu, and x."""
    g = torch.Generator().manual_seed(0)
    b = GraphBuilder()
    x = b.input("x", (2, 3, 8, 8), dtype)
    c = b.conv2d(x, weight=torch.randn(4, 3, 3, 3, generator=g), bias=torch.randn(4, generator=g),
                 padding=(1, 0, 0, 1), source="stem.conv")
    n = b.batch_norm(c, mean=torch.zeros(4), var=torch.ones(4), weight=torch.ones(4), bias=torch.zeros(4), source="stem.bn")
    p = b.conv2d(x, weight=torch.randn(4, 3, 2, 2, generator=g), stride=(1, 1), source="stem.proj")
    y = b.relu(b.add(n, p, source="stem"), source="stem.act")
    return b.build(y), x


# --------------------------------------------------------------------------- printing


def test_text_form_has_one_line_per_node_with_op_attrs_shapes_and_source():
    graph, _ = small_graph()
    lines = str(graph).splitlines()
    assert lines[0] == "graph(%x: 2x3x8x8):"
    assert lines[-1] == f"  return %{graph.outputs[0].name}"
    body = lines[1:-1]
    assert len(body) == len(graph.nodes)
    for line, n in zip(body, graph.nodes):
        args = ", ".join(f"%{i.name}" for i in n.inputs)
        assert line.startswith(f"  %{n.out.name} = {n.op}({args})")
        assert f": {'x'.join(map(str, n.out.shape))} " in line + " "
        assert line.endswith(f"# {n.source}")
        for k, p in n.params.items():
            assert f"{k}{list(p.shape)}" in line
    conv = body[0]
    assert "padding=(1, 0, 0, 1)" in conv and "stride=(1, 1)" in conv and "groups=1" in conv
    assert "weight[4, 3, 3, 3] bias[4]" in conv
    assert ": 2x4x7x7 " in conv  # 8 + 1 + 0 - 3 + 1 = 7 rows, 8 + 0 + 1 - 3 + 1 = 7 columns
    # Columns line up: the shape column starts at the same offset on every node line.
    assert len({line.index(" : ") for line in body}) == 1
    assert repr(graph) == "<Graph 5 nodes {'add': 1, 'batch_norm': 1, 'conv2d': 2, 'relu': 1}>"


def test_text_form_of_a_graph_without_sources_or_nodes():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 3, 3))
    graph = b.build(b.relu(x))
    assert str(graph).splitlines()[1].rstrip().endswith(": 1x2x3x3")
    assert "#" not in str(graph)
    empty = Graph([x], [], [x])
    assert str(empty) == "graph(%x: 1x2x3x3):\n  return %x"


def test_show_prints_the_text_form(capsys):
    graph, _ = small_graph()
    graph.show()
    assert capsys.readouterr().out == str(graph) + "\n"


def test_dot_names_every_node_and_edge():
    graph, x = small_graph()
    dot = graph.to_dot(title='stem "demo"')
    assert dot.startswith("digraph G {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    assert 'label="stem \\"demo\\""' in dot
    for n in graph.nodes:
        assert re.search(rf'^  "{n.out.name}" \[shape=box, .*label="{n.op}\\n', dot, re.M), n
        assert n.source in dot
        for i in n.inputs:
            assert f'  "{i.name}" -> "{n.out.name}";' in dot
    assert f'"{x.name}" [shape=oval' in dot
    assert f'"{graph.outputs[0].name}" -> "out0";' in dot
    edges = sum(len(n.inputs) for n in graph.nodes) + len(graph.outputs)
    assert dot.count(" -> ") == edges
    # Every statement line is complete: quotes balance once escaped quotes are removed.
    for line in dot.splitlines():
        assert line.replace('\\"', "").count('"') % 2 == 0, line


def test_dot_escapes_quotes_and_backslashes_in_sources():
    b = GraphBuilder()
    x = b.input("x", (1, 1, 2, 2))
    graph = b.build(b.relu(x, source='a"b\\c'))
    dot = graph.to_dot()
    assert 'a\\"b\\\\c' in dot


# --------------------------------------------------------------------------- shape inference


@given(spec=conv_specs(), batch=st.integers(1, 3), seed=seeds())
def test_conv_shape_inference_matches_execution(spec, batch, seed):
    """Asymmetric paddings, strides, dilations and groups: the inferred shape is the computed one."""
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(batch))
    y = b.conv2d(x, **conv_params(spec, torch.float32, seed), **spec.attrs)
    assert y.shape == spec.output_shape(batch)
    assert y.dtype == torch.float32
    out = run_graph(b.build(y), random_input(spec.input_shape(batch), torch.float32, seed))
    assert tuple(out.shape) == y.shape
    # And the op pads asymmetrically exactly like an explicit F.pad.
    t, bo, l, r = spec.padding
    xt = random_input(spec.input_shape(batch), torch.float64, seed)
    p = {k: v.to(torch.float64) for k, v in y.producer.params.items()}
    ref = F.conv2d(F.pad(xt, (l, r, t, bo)), p["weight"], p.get("bias"), spec.stride, 0, spec.dilation, spec.groups)
    assert torch.allclose(run_graph(b.build(y), xt), ref, rtol=0, atol=1e-12)


@given(
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    hw=st.tuples(st.integers(5, 12), st.integers(5, 12)),
    ceil_mode=st.booleans(),
    count_include_pad=st.booleans(),
    data=st.data(),
)
def test_avg_pool_shape_inference(k, s, hw, ceil_mode, count_include_pad, data):
    p = (data.draw(st.integers(0, k[0] // 2)), data.draw(st.integers(0, k[1] // 2)))
    b = GraphBuilder()
    x = b.input("x", (2, 3, *hw))
    y = b.avg_pool2d(x, kernel=k, stride=s, padding=p, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    expected = F.avg_pool2d(torch.zeros(2, 3, *hw), k, s, p, ceil_mode, count_include_pad).shape
    assert y.shape == tuple(expected)
    if not ceil_mode:
        assert y.shape[2:] == tuple((n + 2 * pp - kk) // ss + 1 for n, pp, kk, ss in zip(hw, p, k, s))


def test_concat_pad_and_layout_shapes():
    b = GraphBuilder()
    x = b.input("x", (2, 3, 5, 6))
    z = b.input("z", (2, 4, 5, 6))
    assert b.concat(x, z, axis=1).shape == (2, 7, 5, 6)
    assert b.concat(x, x, x, axis=1).shape == (2, 9, 5, 6)
    assert b.concat(x, x, axis=3).shape == (2, 3, 5, 12)
    assert b.pad(x, pads=(1, 2, 0, 3)).shape == (2, 3, 8, 9)
    assert b.pad(x, pads=(-1, 0, 0, -2)).shape == (2, 3, 4, 4)  # negative pads crop
    assert b.flatten(x, start=2).shape == (2, 3, 30)
    assert b.permute(x, dims=(0, 2, 3, 1)).shape == (2, 5, 6, 3)
    assert b.mean(x, dims=(2, 3), keepdim=True).shape == (2, 3, 1, 1)
    assert b.scale(x, scale=torch.ones(3)).shape == (2, 3, 5, 6)


def test_attribute_defaults_are_filled_and_lists_become_tuples():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 4))
    y = b.conv2d(x, weight=torch.ones(2, 2, 1, 1), padding=[0, 0, 0, 0])
    n = y.producer
    assert n.attrs == {"stride": (1, 1), "padding": (0, 0, 0, 0), "dilation": (1, 1), "groups": 1}
    assert "bias" not in n.params  # bias=None is dropped


def test_dtype_inference_follows_the_input():
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        b = GraphBuilder()
        x = b.input("x", (1, 2, 4, 4), dtype)
        y = b.batch_norm(b.conv2d(x, weight=torch.ones(2, 2, 3, 3)), mean=torch.zeros(2), var=torch.ones(2),
                         weight=torch.ones(2), bias=torch.zeros(2))
        assert y.dtype == dtype


# --------------------------------------------------------------------------- errors


def test_unknown_op_is_a_clear_error():
    b = GraphBuilder()
    x = b.input("x", (1, 1, 2, 2))
    with pytest.raises(KeyError, match=r"unknown op 'convolution'; known ops: .*conv2d"):
        b.convolution(x)
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        Node.make("nope", [x])
    with pytest.raises(KeyError, match="unknown op"):
        op_def("nope")
    with pytest.raises(AttributeError):
        b._private  # noqa: B018


def test_unknown_and_missing_attributes_name_the_node():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 4))
    with pytest.raises(TypeError, match=r"conv2d at blk\.conv: unknown attributes \['kernel_size', 'strides'\]"):
        b.conv2d(x, weight=torch.ones(2, 2, 1, 1), strides=(1, 1), kernel_size=1, source="blk.conv")
    with pytest.raises(TypeError, match=r"pad at <graph>: missing attribute 'pads'"):
        b.pad(x)
    with pytest.raises(TypeError, match="missing attribute 'kernel'"):
        b.avg_pool2d(x, stride=1)


def test_bad_shapes_name_the_node_and_the_input_shapes():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"conv2d at blk\.conv: cannot apply to input shapes \[\(1, 2, 4, 4\)\]"):
        b.conv2d(x, weight=torch.ones(3, 5, 3, 3), source="blk.conv")
    with pytest.raises(ValueError, match="conv2d at <graph>: cannot apply"):
        b.conv2d(x, weight=torch.ones(3, 2, 7, 7))  # kernel larger than the padded input
    z = b.input("z", (1, 3, 4, 4))
    with pytest.raises(ValueError, match="add at <graph>: cannot apply to input shapes"):
        b.add(x, z)
    with pytest.raises(ValueError, match="concat"):
        b.concat(x, b.input("w", (1, 2, 5, 4)), axis=1)


def test_registering_an_op_twice_is_an_error():
    assert "relu" in OPS
    with pytest.raises(ValueError, match="registered twice"):
        @op("relu", kind="nonlinear")
        def relu_again(x):
            return x
    with pytest.raises(AssertionError):
        op("whatever", kind="strange")


# --------------------------------------------------------------------------- the interpreter


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_interpreter_runs_in_the_input_dtype(dtype):
    """float32 parameters are cast to the input's dtype; the result is within that dtype's tolerance."""
    graph, _ = small_graph()
    x = random_input((2, 3, 8, 8), torch.float64, 3)
    out = run_graph(graph, x.to(dtype))
    assert out.dtype == dtype and out.shape == (2, 4, 7, 7)
    ref = run_graph(graph, x.to(dtype).to(torch.float64))  # same input values, float64 arithmetic
    err = (out.to(torch.float64) - ref).abs()
    assert bool((err <= RTOL[dtype] * magnitude(graph, x.to(dtype).to(torch.float64))).all())
    if dtype != torch.float64:
        assert bool((err > 0).any())  # really computed in the low precision


@given(shape=input_shapes(), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float64]), seed=seeds(), data=st.data())
def test_interpreter_on_any_shape_and_dtype(shape, dtype, seed, data):
    """BN -> layer scale -> pad -> avg pool -> concat with the input, run in ``dtype`` vs float64."""
    c = shape[1]
    b = GraphBuilder()
    x = b.input("x", shape, torch.float32)
    y = b.scale(add_bn(b, x, data.draw(bn_stats(c)), torch.float32), scale=random_input((c,), torch.float32, seed))
    y = b.avg_pool2d(b.pad(y, pads=(1, 0, 2, 1)), kernel=(2, 2), stride=(1, 1))
    graph = b.build(b.concat(y, b.pad(x, pads=(0, 0, 1, 1)), axis=1))
    xt = random_input(shape, dtype, seed)
    out = run_graph(graph, xt)
    assert out.dtype == dtype and tuple(out.shape) == graph.outputs[0].shape == (shape[0], 2 * c, shape[2], shape[3] + 2)
    ref = run_graph(graph, xt.to(torch.float64))
    # Relative to the magnitude, plus half a step of the dtype's subnormals per rounding (a BN of gamma 0.005 takes
    # float16 values to 1e-6, where its steps are 6e-8 apart whatever the magnitude): 5 ops round here.
    subnormal = 5 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2
    assert bool(((out.to(torch.float64) - ref).abs() <= RTOL[dtype] * magnitude(graph, xt.to(torch.float64)) + subnormal).all())


def test_interpreter_multiple_outputs_and_input_count():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 3, 3))
    z = b.input("z", (1, 2, 3, 3))
    graph = b.build(b.add(x, z), b.sub(x, z))
    xt, zt = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    s, d = run_graph(graph, xt, zt)
    assert torch.equal(s, xt + zt) and torch.equal(d, xt - zt)
    with pytest.raises(TypeError, match="graph takes 2 inputs, got 1"):
        run_graph(graph, xt)


def test_interpreter_rejects_an_unsorted_graph():
    graph, x = small_graph()
    graph.nodes.reverse()
    graph._changed()
    with pytest.raises(ValueError, match="reads a value computed later; graph not sorted"):
        run_graph(graph, torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------- structure


def test_users_uses_counts_and_walk_back():
    graph, x = small_graph()
    conv, bn, proj, add, relu = graph.nodes
    assert {id(n) for n in graph.users(x)} == {id(conv), id(proj)}
    assert graph.num_uses(x) == 2 and graph.num_uses(relu.out) == 1  # the graph output counts once
    assert graph.num_uses(conv.out) == 1
    assert graph.contains(bn) and not graph.contains(Node.make("relu", [x]))
    assert graph.op_counts() == {"add": 1, "batch_norm": 1, "conv2d": 2, "relu": 1}
    assert graph.param_count() == 4 * 3 * 9 + 4 + 4 * 4 + 4 * 3 * 4
    assert {n.op for n in walk_back(relu.out)} == {"relu", "add", "batch_norm", "conv2d"}
    assert len(list(walk_back(relu.out))) == 5 and list(walk_back(x)) == []


@given(seed=st.integers(0, 10_000))
def test_toposort_restores_a_valid_order(seed):
    graph, x = small_graph()
    xt = torch.randn(2, 3, 8, 8)
    expected = run_graph(graph, xt)
    order = list(graph.nodes)
    random.Random(seed).shuffle(graph.nodes)
    graph._changed()
    graph.toposort()
    assert sorted(map(id, graph.nodes)) == sorted(map(id, order))
    known = {id(x)}
    for n in graph.nodes:
        assert all(id(i) in known for i in n.inputs)
        known.add(id(n.out))
    assert torch.equal(run_graph(graph, xt), expected)


def test_toposort_keeps_a_valid_order_unchanged():
    graph, _ = small_graph()
    order = list(graph.nodes)
    graph.toposort()
    assert graph.nodes == order


def test_toposort_reports_cycles_and_dangling_inputs():
    b = GraphBuilder()
    x = b.input("x", (1, 1, 2, 2))
    a = b.relu(x)
    c = b.relu(a)
    graph = b.build(c)
    a.producer.inputs = (c,)  # a cycle: a reads c reads a
    graph._changed()
    with pytest.raises(ValueError, match="cycle or dangling inputs"):
        graph.toposort()
    stray = Graph.input("stray", (1, 1, 2, 2))
    n = Node.make("relu", [stray])
    with pytest.raises(ValueError, match=r"dangling inputs: \['stray'\]"):
        Graph([x], [n], [n.out]).toposort()


def test_eliminate_dead_drops_unread_chains_only():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 4))
    live = b.relu(x)
    dead = b.sigmoid(b.relu(b.add(x, live)))  # three dead nodes, one reading a live value
    graph = b.build(live)
    assert graph.eliminate_dead() == 3
    assert graph.op_counts() == {"relu": 1} and graph.outputs == [live]
    assert graph.eliminate_dead() == 0
    assert dead.producer not in graph.nodes


def test_eliminate_dead_from_removes_what_a_rewrite_left_unread():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 4))
    a = b.relu(x)
    c = b.sigmoid(a)
    other = b.gelu(x)
    graph = b.build(c)
    assert graph.eliminate_dead_from([other.producer]) == 1
    graph.replace_uses(c, x)  # the output now reads x directly
    assert graph.eliminate_dead_from([c.producer]) == 2  # sigmoid, then the relu it read
    assert graph.nodes == [] and graph.outputs == [x]


def test_replace_uses_and_insert_before_keep_the_indexes_right():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 4))
    a = b.relu(x)
    c = b.add(a, a)
    graph = b.build(c)
    assert graph.num_uses(a) == 1  # one reader, even if it reads twice
    new = Node.make("sigmoid", [x])
    graph.insert_before(a.producer, [new])
    assert graph.nodes[0] is new and graph.contains(new)
    graph.replace_uses(a, new.out)
    assert c.producer.inputs == (new.out, new.out)
    assert graph.num_uses(a) == 0 and graph.users(new.out) == [c.producer]
    assert graph.eliminate_dead_from([a.producer]) == 1
    xt = torch.randn(1, 2, 4, 4)
    assert torch.equal(run_graph(graph, xt), 2 * torch.sigmoid(xt))
    # A new node reading a value computed after the anchor triggers a re-sort.
    late = Node.make("relu", [c])
    graph.insert_before(new, [late])
    assert graph.nodes.index(late) > graph.nodes.index(c.producer)


def test_insert_before_a_removed_node_names_it():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 4))
    dead = b.relu(x)
    graph = b.build(b.sigmoid(x))
    graph.eliminate_dead()
    with pytest.raises(ValueError, match=r"insert_before: Node\(relu -> .*\) is not in the graph"):
        graph.insert_before(dead.producer, [Node.make("gelu", [x])])
    assert [n.op for n in graph.nodes] == ["sigmoid"]


@given(ops=st.lists(st.tuples(st.sampled_from(["insert", "remove", "read"]), st.integers(0, 10_000), st.integers(1, 3)), max_size=300))
def test_inserts_and_removals_keep_the_order_a_list_would(ops):
    """``insert_before``/``eliminate_dead_from`` (O(1) with order keys) give the order of list.insert/list.remove.

    Many inserts at one place use up the gap between two keys and renumber.
    """
    b = GraphBuilder()
    x = b.input("x", (1, 1, 2, 2))
    chain = [b.relu(x)]
    for _ in range(5):
        chain.append(b.relu(chain[-1]))
    graph = b.build(chain[-1])
    model = list(graph.nodes)
    for kind, pick, count in ops:
        if kind == "insert":  # nodes reading only x: dead until read, so they can go anywhere
            anchor = model[pick % len(model)]
            new = [Node.make("sigmoid", [x]) for _ in range(count)]
            graph.insert_before(anchor, new)
            k = model.index(anchor)
            model[k:k] = new
        elif kind == "remove":
            dead = [n for n in model if n.op == "sigmoid"]
            if dead:
                n = dead[pick % len(dead)]
                assert graph.eliminate_dead_from([n]) == 1
                model.remove(n)
        else:
            assert graph.nodes == model
    assert graph.nodes == model
    many = [Node.make("gelu", [x]) for _ in range(120)]
    for n in many:  # always just before the same node: each gap halves
        graph.insert_before(chain[3].producer, [n])
    k = model.index(chain[3].producer)
    assert graph.nodes == model[:k] + many + model[k:]


def test_map_params_builds_new_nodes_and_keeps_inputs():
    graph, x = small_graph()
    doubled = graph.map_params(lambda p, n: p.to(torch.float64))
    assert doubled.inputs == graph.inputs
    assert all(a is not b for a, b in zip(doubled.nodes, graph.nodes))
    assert [n.out.name for n in doubled.nodes] == [n.out.name for n in graph.nodes]
    assert all(p.dtype == torch.float64 for n in doubled.nodes for p in n.params.values())
    assert all(p.dtype == torch.float32 for n in graph.nodes for p in n.params.values())


def test_node_replace_merges_attrs_and_reinfers_the_shape():
    graph, x = small_graph()
    conv = graph.nodes[0]
    wider = conv.replace(attrs={"padding": (1, 1, 1, 1)})
    assert wider.attrs["stride"] == (1, 1) and wider.out.shape == (2, 4, 8, 8)
    assert wider.params is not conv.params or wider.params == conv.params
    assert conv.out.shape == (2, 4, 7, 7)  # the original is untouched


@given(dtype=float_dtypes(), channels=st.integers(1, 8), data=st.data())
def test_magnitude_bounds_the_output(dtype, channels, data):
    """The magnitude graph used for tolerances bounds |output| elementwise (sub and BN included)."""
    spec = data.draw(conv_specs(in_channels=channels, out_channels=channels, padding="none", stride=1, dilation=1, kernel=1))
    b = GraphBuilder()
    x = b.input("x", (1, channels, 4, 4), dtype)
    y = add_bn(b, add_conv(b, x, spec, dtype, 0), data.draw(bn_stats(channels)), dtype)
    graph = b.build(b.sub(b.pad(y, pads=(1, 0, 0, 1), value=-2.0), b.pad(x, pads=(1, 0, 0, 1))))
    xt = random_input((1, channels, 4, 4), torch.float64, 1)
    assert bool((run_graph(graph, xt).abs() <= magnitude(graph, xt) * (1 + 1e-12)).all())
    with pytest.raises(NotImplementedError, match="sigmoid"):
        magnitude(b.build(b.sigmoid(x)), xt)
