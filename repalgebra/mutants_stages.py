"""Seeded bugs outside the rules: the front end, the engine, the torch back end and the ONNX back end.

:mod:`repalgebra.mutants` runs these with the rule mutants (``python -m repalgebra.mutants``) and prints
a score per stage.  Each mutant is a one-line slip in the code that reads or writes an attribute, the
kind a reviewer would not see: an eps read as PyTorch's default, a padding written in another order,
an axis pair swapped, a flag dropped.  Five of them are the bugs issue 15 found the suite blind to:
``frontend/bn-module-eps-default``, ``frontend/ln-module-eps-default``,
``torch_backend/conv-zeropad-order``, ``onnx_backend/conv-pads-order`` and
``onnx_backend/avg-pool-count-always``.

Coverage (at least three mutants per handler or lowering that carries attributes):

* front end, ``torch.fx`` module handlers: ``nn.Conv2d`` (stride, dilation, ``'same'`` with dilation,
  bias, a padding mode's pads and mode), BatchNorm (eps, statistics, affine, batch statistics), ``nn.LayerNorm`` (eps, bias,
  normalized shape), ``nn.AvgPool2d`` (ceil_mode, count_include_pad, divisor_override),
  ``nn.MaxPool2d`` (dilation, ceil_mode, padding), ``nn.ConstantPad2d``/``ZeroPad2d`` (order, sides,
  value), ``nn.Linear`` (bias); the shared argument readers (``conv_padding``: ``'same'``, pairs,
  ``'valid'``; ``avg_pool``, ``max_pool``, ``bn_params``);
* front end, function handlers: ``F.conv2d``, ``F.batch_norm``, ``F.layer_norm``, ``F.avg_pool2d``,
  ``F.max_pool2d``, ``F.pad``, and the channel axes of ``transpose``, ``permute``, ``flatten``;
* front end, transposed convs: ``nn.ConvTranspose2d``, ``F.conv_transpose2d`` and ``aten.conv_transpose2d``
  (bias, padding against output padding, dilation, groups, the functional argument order);
* front end, ``F.conv1d`` (bias, dilation, the argument order); the height-one pass that keeps 1-D regions in 2-D
  (one lift per value, a BatchNorm1d beside the convs, height one by construction, not by the example's shape);
* front end, 3-D convs: ``nn.Conv3d``, ``F.conv3d`` and ``aten.conv3d`` (bias, stride, dilation, padding, groups,
  the functional argument order);
* front end, ATen handlers (``torch.export``): convolution (``'same'``, pairs, stride, dilation),
  batch norm, layer norm, avg pool, max pool, constant pad, permute, transpose (``torch.export``
  decomposes ``flatten`` into a view: its handler is not reached);
* engine: float64 promotion, the one cast back (skipped, or to the wrong dtype), dead-node removal
  (the first rewrite's sweep of the whole graph), rewrite ordering (a fixpoint; a sweep skips the nodes
  it removed, which :data:`EQUIVALENT` argues changes nothing computed);
* torch back end: transposed conv (padding against output padding, stride, dilation); 3-D conv (stride,
  padding, dilation); conv (the ``ZeroPad2d`` of an asymmetric padding, symmetric padding axes, stride,
  dilation, the symmetry test), batch norm, layer norm, avg pool, max pool, pad, linear, GELU,
  permute, transpose, flatten;
* ONNX back end: Conv (pads, strides, dilations, group), ConvTranspose (begin and end pads, the end padding that stands for output padding, group), Conv of a 3-D conv (end pads, strides, group), BatchNormalization, LayerNormalization,
  AveragePool (count_include_pad, ceil mode, pads, the end padding and the explicit Pad of a ceil-mode
  pool that drops a window), MaxPool, Pad, Linear, GELU (``Gelu`` at opset 20, the erf and tanh forms
  below), Transpose of permute and transpose.

Not mutated: the GELU ``approximate`` flag in the front end (its handlers are closures made when the
tables are built, and a code swap reaches only the function itself); ops no model of the stage tests
reaches (interpolate, attention, einsum, ...), tested in ``tests/test_ops_vocabulary.py`` but not mutated.

:data:`EQUIVALENT` lists surviving mutants that cannot change what is computed, each with the
argument; a survivor not listed there fails the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from repalgebra.mutants import Mutant

__all__ = ["STAGES", "STAGE_TESTS", "EQUIVALENT", "stage_of", "stage_mutants", "engine_loop"]

#: Mutant group (``Mutant.rule``) -> the stage it belongs to; every other group is a rule (stage ``rules``).
STAGES = {"frontend": "front end", "engine": "engine", "torch_backend": "torch back end", "onnx_backend": "onnx back end"}

_FE = "tests/test_stage_frontend.py"
_FX = (f"{_FE}::test_fx_capture_reads_every_attribute", f"{_FE}::test_fx_capture_of_layer_stacks")
_FN = (f"{_FE}::test_function_handlers_read_every_attribute", f"{_FE}::test_function_handlers_on_layer_stacks")
_C1 = ("tests/test_fuse_conv1d.py::test_conv1d_bn_folds_exactly_at_any_batch_and_length",)
_TSM = ("tests/test_frontend_export.py::test_in_place_temporal_shift_is_slices_scattered_and_zeros",)
_PM = ("tests/test_fuse_conv1d.py::test_a_conv_that_pads_by_reflection_folds_its_batch_norm",)
_ST = ("tests/test_fuse_structured_inputs.py",)
_CD = ("tests/test_fuse_capture.py::test_constants_cast_to_the_dtype_of_a_computed_value_fold",
       "tests/test_fuse_capture.py::test_a_constant_cast_to_an_inputs_dtype_stays_a_call")
_STM = "repalgebra.frontend.structured"
_RK = ("tests/test_fuse_ranks.py",)
_ROWS = ("tests/test_onnx_export.py::test_a_loop_over_the_rows_unrolled_at_a_smaller_batch_fixes_the_batch",
         "tests/test_onnx_export.py::test_output_axes_that_grow_with_the_batch_are_named_by_how")
_VOCAB_LOG_SIGMOID = ("tests/test_ops_vocabulary.py::test_onnx_lowering_runs_in_onnxruntime[log_sigmoid-20]",)
_VOCAB_RMS = tuple(f"tests/test_ops_vocabulary.py::test_onnx_lowering_runs_in_onnxruntime[rms_norm-{o}]" for o in (13, 17, 20))
_MODES = ("tests/test_fuse_call_modes.py",)
_FITS = ("tests/test_fuse_capture.py::test_a_fold_whose_weights_do_not_fit_the_models_dtype_is_not_made",)
_OE = "tests/test_onnx_export.py"
_MASKED = (f"{_OE}::test_attention_gives_zeros_to_a_query_whose_keys_are_all_masked",)
_AXES = (f"{_OE}::test_outputs_that_do_not_follow_the_batch_declare_no_batch_axis",
         f"{_OE}::test_a_squeeze_of_the_batch_traced_at_batch_one_fixes_the_batch",
         f"{_OE}::test_an_input_without_a_batch_is_declared_without_one")
_CLAMP = (f"{_OE}::test_a_clamp_keeps_infinities_where_torch_does",)
_VIEWS = ("tests/test_inplace.py::test_a_write_through_an_einsum_or_plus_view_reaches_what_it_views",)
_UNFOLD = (f"{_OE}::test_unfold_copies_windows_inf_and_nan_included",)
_ALIASED = ("tests/test_fuse.py::test_copies_the_model_returns_stay_copies",)
_DTYPES = (f"{_OE}::test_a_models_dtype_and_its_parts_own_dtypes_reach_the_file",)
_NEAREST = (f"{_OE}::test_nearest_interpolation_picks_the_pixels_torch_picks",)
_STATE_INSIDE = ("tests/test_fuse_state.py::test_the_part_that_holds_state_runs_as_written",
                 "tests/test_fuse_state.py::test_a_nan_in_a_weight_is_not_taken_for_a_change")
_NUMBERS = (f"{_OE}::test_a_float64_files_constants_are_float64_numbers",)
_CROP = ("tests/test_fuse_conv1d.py::test_a_crop_to_the_convs_own_input_length_folds_as_a_chomp",
         "tests/test_fuse_conv1d.py::test_a_crop_to_a_length_the_conv_does_not_fix_stays_a_read")
_SOFTMAX = ("tests/test_fuse_text_models.py::test_a_softmax_computed_in_a_dtype_of_its_own_is_a_cast_and_a_softmax",)
_NORM_READ = ("tests/test_fuse_text_models.py::test_a_norms_weight_folds_into_q_k_v_when_its_output_shape_is_read",)
_CAST_BACK = ("tests/test_fuse_text_models.py::test_a_cast_back_from_a_dtype_the_code_writes_follows_the_model",)
_WRAP = ("tests/test_fuse_capture.py::test_a_data_parallel_that_adds_hooks_or_a_forward_is_not_the_module_it_runs",
         "tests/test_fuse_capture.py::test_a_compiled_module_with_hooks_of_its_own_is_refused_by_name")
_H1 = ("tests/test_fuse_conv1d.py::test_a_1d_repvgg_stack_folds_to_one_conv_per_block",
       "tests/test_fuse_conv1d.py::test_a_sequence_flattened_from_an_image_of_height_one_is_not_taken_for_a_1d_one",
       "tests/test_fuse_conv1d.py::test_causal_convs_fold_their_pad_or_chomp_and_their_batch_norm",
       "tests/test_fuse_conv1d.py::test_a_causal_or_reflect_padded_1d_repvgg_block_folds_to_one_conv",
       "tests/test_fuse_conv1d.py::test_a_pad_of_a_1d_values_channels_is_not_taken_for_one_of_its_length")


def _aten(*cases: str) -> tuple[str, ...]:
    """The ``torch.export`` cases of one layer family, then the property test: each capture takes a second or so."""
    return (*(f"{_FE}::test_export_capture_reads_every_attribute[{c}]" for c in cases), f"{_FE}::test_export_capture_of_layer_stacks")


_A_CONV = _aten("conv-same-even", "conv-stride-dilation", "bn-alone", "conv-tf-same")
_A_BN = _aten("bn-alone", "bn-eps", "bn-no-affine")
_A_LN = _aten("ln-eps-channels-last", "ln-spatial", "ln-eps-tokens", "ln-no-affine")
_A_POOL = _aten("avg-pool-ceil", "avg-pool-ceil-exclude", "avg-pool-exclude-pad", "avg-pool-divisor", "max-pool")
_A_PAD = _aten("conv-tf-same", "pad-value")
_A_CONVT = _aten("conv-transpose", "conv-transpose-dilated")
_A_CONV3D = _aten("conv3d", "conv3d-same")
_TORCH = ("tests/test_stage_torch_backend.py",)
_ONNX = ("tests/test_stage_onnx_backend.py",)
_ENGINE = (
    "tests/test_stage_engine.py",
    "tests/test_rewrite.py::test_fixpoint_a_second_rewrite_changes_nothing",
    "tests/test_rewrite.py::test_dead_nodes_are_removed",
    "tests/test_rewrite.py::test_nodes_made_dead_by_rewrites_are_removed",
    "tests/test_rewrite.py::test_folding_happens_in_float64_and_params_are_cast_back_once",
    "tests/test_precision.py",
)

#: The tests each stage's mutants run (a mutant may run a narrower selection of its stage's file).
STAGE_TESTS = {"frontend": (_FE,), "engine": _ENGINE, "torch_backend": _TORCH, "onnx_backend": _ONNX}

#: Surviving mutants that compute the same thing as the original, with the argument why.
EQUIVALENT: dict[str, str] = {
    "engine/dead-nodes-visited": (
        "a node removed earlier in the sweep has no users left, so a rewrite a rule returns for it reroutes no use; "
        "the nodes it inserts are read by nothing and go in the dead-node sweep of the same _apply; the graph, and so "
        "what the fused model computes, is unchanged (only the report may list a firing that changed nothing)"
    ),
}


def stage_of(group: str) -> str:
    """The stage of a mutant group: ``front end``, ``engine``, ``torch back end``, ``onnx back end``, else ``rules``."""
    return STAGES.get(group, "rules")


_HM = "repalgebra.frontend.handlers_modules"
_HF = "repalgebra.frontend.handlers_functions"
_ARGS = "repalgebra.frontend.args"
_H1M = "repalgebra.frontend.height_one"
_AH = "repalgebra.frontend.aten_handlers"
_TB = "repalgebra.backend.torch"
_OB = "repalgebra.backend.onnx"
_RW = "repalgebra.rewrite"

# (group, name, bug, "module:function", old, new, tests)
_SPECS: list[tuple[str, str, str, str, str, str, tuple[str, ...]]] = [
    # ================================================================ front end: module handlers (torch.fx)
    ("frontend", "conv-module-stride-swapped", "nn.Conv2d's stride read with its axes swapped", f"{_HM}:_conv",
     '"stride": tuple(stride)', '"stride": tuple(stride)[::-1]', _FX),
    ("frontend", "conv-module-dilation-swapped", "nn.Conv2d's dilation read with its axes swapped", f"{_HM}:_conv",
     '"dilation": tuple(dilation)', '"dilation": tuple(dilation)[::-1]', _FX),
    ("frontend", "conv-module-same-undilated", "padding='same' computed as if the conv were not dilated", f"{_HM}:_conv",
     "conv_padding(padding, kernel, dilation)", "conv_padding(padding, kernel, (1, 1))", _FX),
    ("frontend", "conv-module-bias-dropped", "nn.Conv2d's bias is not read", f"{_HM}:_conv",
     "if m.bias is None else", "if True else", _FX),
    ("frontend", "conv1d-padding-on-height", "a Conv1d's padding put on the height of its height-1 conv2d", f"{_HM}:_conv",
     "else (0, *padding)", "else (*padding, 0)", _C1),
    ("frontend", "conv1d-stride-on-height", "a Conv1d's stride put on the height of its height-1 conv2d", f"{_HM}:_conv",
     "stride, dilation, kernel = (1, *stride)", "stride, dilation, kernel = (*stride, 1)", _C1),
    ("frontend", "conv-padding-mode-zeros", "a conv's reflect/replicate/circular padding read as zero padding", f"{_HM}:_conv",
     '"mode": m.padding_mode', '"mode": "constant"', _PM),
    ("frontend", "conv-padding-mode-order", "a padding mode's pads given in the conv's (height, width) order, not F.pad's", f"{_HM}:_conv",
     "list(m._reversed_padding_repeated_twice)", "[p for p in m.padding for _ in (0, 1)]", _PM),
    ("frontend", "conv1d-pad-after-lift", "a Conv1d's reflect pad applied to the lifted 4-D input (F.pad needs one pad per axis there)", f"{_HM}:_m_conv1d",
     "unsqueezed(_padded(b, n, x, pre), 2)", "unsqueezed(x, 2)", _PM),
    ("frontend", "conv1d-flattens-channels", "a Conv1d's height-1 conv2d flattened over channels and height", f"{_HM}:_m_conv1d",
     '{"start": 2, "end": 3}, {}, ""', '{"start": 1, "end": 2}, {}, ""', _C1),
    ("frontend", "conv1d-unsqueezed-last", "a Conv1d's input lifted to (N, C, L, 1) instead of (N, C, 1, L)", f"{_HM}:_m_conv1d",
     "unsqueezed(_padded(b, n, x, pre), 2)", "unsqueezed(_padded(b, n, x, pre), 3)", _C1),
    ("frontend", "conv1d-unlifted-input", "a Conv1d's height-1 conv2d applied to the 3-D input itself", f"{_HM}:_m_conv1d",
     'b.add("conv2d", [x4]', 'b.add("conv2d", [x]', _C1),
    ("frontend", "height-one-lift-per-use", "every conv of a 1-D value lifts it on its own (the branches read different values)",
     f"{_H1M}:lift_height_one", "if id(x) not in lifts:", "if True:", _H1),
    ("frontend", "height-one-lift-kept", "a lift of a height-one flatten is made again, not taken to be the value it flattened",
     f"{_H1M}:lift_height_one", "if (y := _flattened(x, known)) is not None:", "if (y := _flattened(x, known)) is not None and False:", _H1),
    ("frontend", "height-one-sum-unflattened", "an op moved onto the lifts gives its 2-D value where the 1-D one was read",
     f"{_H1M}:lift_height_one", "env[id(n.out)] = flat(y, n.source)", "env[id(n.out)] = y", _H1),
    ("frontend", "height-one-bn-stays-1d", "a BatchNorm1d beside the convs of its input stays on the 3-D value",
     f"{_H1M}:_sinks", "(any(flats) or per_channel)", "any(flats)", _H1),
    ("frontend", "shape-slice-start-ignored", "an item of a slice of a shape read as that item of the whole shape (``W, = x.shape[-1:]`` as the batch)",
     f"{_HF}:_size_factors", "return [(v, axes[a[1]])]", "return [(v, a[1])]", ("tests/test_fuse_other_sizes.py::test_sizes_unpacked_from_a_slice_of_the_shape_are_shape_reads",)),
    ("frontend", "shape-item-as-batch", "any size read from a shape (``B, C, H, W = y.shape``) taken as its batch",
     f"{_HF}:_size_factors", "if (v := _shape_of(inner)) is not None:\n            return [(v, a[1])]",
     "if (v := _shape_of(inner)) is not None:\n            return [(v, 0)]", ("tests/test_fuse_other_sizes.py",)),
    ("frontend", "shape-product-first-factor", "a product of sizes (``H * W``) read as its first factor",
     f"{_HF}:_size_factors", "return None if left is None or right is None else left + right",
     "return None if left is None or right is None else left",
     ("tests/test_fuse_other_sizes.py::test_sizes_unpacked_from_a_slice_of_the_shape_are_shape_reads",)),
    ("frontend", "computed-dtype-of-input", "a constant cast to an input's dtype made at capture (the caller's dtype fixed to the example's)",
     "repalgebra.frontend.builder:_computed_dtype", "and a.args[0].producer is not None ", "", _CD),
    ("frontend", "computed-dtype-unread", "a constant cast to a computed value's dtype stays a call (a frozen BN after a conv does not fold)",
     "repalgebra.frontend.builder:_computed_dtype", "        return a.args[0].dtype\n", "        return a\n", _CD),
    ("frontend", "structured-leaves-reversed", "a model's feature maps read out of its list in reverse order",
     f"{_STM}:restructured", "zip(pytree.tree_flatten_with_path(args)[0], old)", "zip(pytree.tree_flatten_with_path(args)[0], old[::-1])", _ST),
    ("frontend", "structured-first-argument", "every tensor read out of the first argument (a *args head's levels all from the first)",
     f"{_STM}:restructured", "value = tops[path[0].idx]", "value = tops[0]", _ST),
    ("frontend", "structured-view-unpacked", "the flat view calls forward with the structure as one argument",
     f"{_STM}:flat_view", 'f"    return _inner(self, *args)\\n"', 'f"    return _inner(self, args)\\n"', _ST),
    ("frontend", "structured-refused-graph-first-map", "a fused graph read one tensor at a time gives every item the first tensor",
     f"{_STM}:_flat_graph", "env[node] = xs[leaf]", "env[node] = xs[0]", _ST),
    ("frontend", "structured-guard-passes", "the fused model's structure guard lets a call of another structure through",
     f"{_STM}:structure_mismatch", "if spec != want:", "if False:", _ST),
    ("frontend", "rank-guard-any-rank", "a fused graph's guard takes inputs with any number of axes (a concat along dim=-1 lands on another axis)",
     "repalgebra.fuse:_ranks_fit", "return len(got) == len(shapes) and all(len(g) == len(s) for g, s in zip(got, shapes))",
     "return len(got) == len(shapes)", _RK),
    ("frontend", "squeeze-rank-unchecked", "a carried squeeze that drops another number of axes than at the example runs on",
     "repalgebra.frontend.calls:_of_rank", "if y.dim() != rank:", "if False:", _RK),
    ("frontend", "squeeze-not-one-no-op", "x.squeeze(dim) of an axis not 1 at the example taken for no op (at a batch of one it drops it)",
     "repalgebra.frontend.handlers_functions:_f_squeeze", "    if x.shape[axis] != 1:\n        return None",
     '    if x.shape[axis] != 1:\n        return "identity", [x], {}, {}, ""', _RK),
    ("frontend", "squeeze-all-carried-as-written", "x.squeeze() carried as written, its rank unchecked",
     "repalgebra.frontend.builder:_squeezed", "    return x, args[1] if len(args) == 2 else kwargs.get(\"dim\")", "    return None", _RK),
    ("frontend", "shape-slice-length-whole", "len(x.shape[2:]) read as the number of axes of x",
     "repalgebra.frontend.ranks:shape_length", "return None if r is None else len(range(r)[cut])", "return r", _RK),
    ("frontend", "symbolic-batch-takes-one", "a capture with torch.export's symbolic batch (which holds from 2 up) taken at batch 1 too",
     "repalgebra.fuse:_batches_fit", "and (not got or got[0][0] >= min_batch)", "and True", _RK),
    ("onnx_backend", "dynamic-batch-unchecked-at-one", "an ONNX file given a dynamic batch although the graph differs from the model at batch 1",
     "repalgebra.backend.onnx:_holds_at_batch_one", "return bool(_computes(graph, module, batch_of_one(example)))", "return True", _RK),
    ("onnx_backend", "fallback-unchecked-at-one", "an ONNX region traced at another batch is not checked at batch 1 (a branch on len(x) == 1 baked in)",
     "repalgebra.backend.onnx_fallback:export_regions", "for b in {1, 2 * other + 1} - {batch}", "for b in {2 * other + 1} - {batch}", _RK),
    ("onnx_backend", "fallback-unchecked-above", "an ONNX region traced at another batch is not checked above it (a loop over the rows the trace unrolled stops short)",
     "repalgebra.backend.onnx_fallback:export_regions", "for b in {1, 2 * other + 1} - {batch}", "for b in {1} - {batch}", _ROWS),
    ("onnx_backend", "output-axis-all-batch", "every output axis that grows with the batch is named batch (B x 16 token rows too)",
     "repalgebra.backend.onnx:_batch_dim", 'return "batch" if per == 1 else f"batch*{per}"', 'return "batch"', _ROWS),
    ("onnx_backend", "output-axis-own-name", "an output axis that is the batch gets a name of its own, not the input's batch",
     "repalgebra.backend.onnx:_batch_dim", "if size == per * batch and size_after == per * (batch + 1):", "if False:", _ROWS),
    ("onnx_backend", "output-axis-rows-per-sample", "rows per sample counted from the batch one larger",
     "repalgebra.backend.onnx:_batch_dim", "per = size // batch", "per = size // (batch + 1)", _ROWS),
    ("onnx_backend", "log-sigmoid-as-log-of-sigmoid", "log(sigmoid(x)) written as Log of Sigmoid: -inf where the sigmoid rounds to 0",
     "repalgebra.backend.onnx:_log_sigmoid", 'return ctx.emit("Neg", [ctx.emit("Softplus", [ctx.emit("Neg", [x])])])',
     'return ctx.emit("Log", [ctx.emit("Sigmoid", [x])])', _VOCAB_LOG_SIGMOID),
    ("onnx_backend", "rms-norm-weight-dropped", "an RMS norm's weight left out below opset 23",
     "repalgebra.backend.onnx:_rms_norm", 'return y if w is None else ctx.emit("Mul", [y, ctx.const("weight", w)])', "return y", _VOCAB_RMS),
    ("onnx_backend", "rms-norm-mean-not-of-squares", "an RMS norm divides by the root of the mean of x, not of x squared",
     "repalgebra.backend.onnx:_rms_norm", 'square = ctx.emit("Mul", [x, x])', "square = x", _VOCAB_RMS),
    ("onnx_backend", "rms-norm-dtype-eps-of-float64", "an RMS norm's dtype epsilon taken as float64's in a float32 file",
     "repalgebra.backend.onnx:_rms_norm", "torch.finfo(n.out.dtype or ctx.dtype).eps", "torch.finfo(torch.float64).eps", _VOCAB_RMS),
    ("engine", "fold-underflow-unchecked", "a fold whose float16 kernel rounds to 0 is made (the fused model returns zeros)",
     "repalgebra.rewrite:_unfit", "if bool((lost > info.eps * held).any()):", "if False:", _FITS),
    ("engine", "fold-overflow-unchecked", "a fold whose kernel overflows float16 is made (Inf weights)",
     "repalgebra.rewrite:_unfit", "if largest > info.max / 2 and", "if False and", _FITS),
    ("engine", "fold-underflow-bias-ignored", "what rounding loses measured against a channel's weights alone, not with its bias (slimmed BNs refused)",
     "repalgebra.rewrite:_unfit", "held = _per_output(n, size) + (0 if bias is None else bias.abs())", "held = _per_output(n, size)", _FITS),
    ("engine", "fold-underflow-all-channels", "what rounding loses measured against the whole kernel, not per output channel",
     "repalgebra.rewrite:_per_output", "return t.reshape(t.shape[0], -1).sum(1)", "return t.sum().expand(t.shape[0])", _FITS),
    ("engine", "fold-underflow-transposed-rows", "a transposed conv's output channels taken from its weight's axis 0 (its input channels)",
     "repalgebra.rewrite:_per_output", 'if n.op == "conv_transpose2d":', "if False:", _FITS),
    ("onnx_backend", "attention-masked-rows-nan", "a query whose keys the mask hides all gets the softmax of nothing but -inf (NaN), not zeros",
     "repalgebra.backend.onnx:_attention", "    if mask:\n        hidden", "    if False:\n        hidden", _MASKED),
    ("onnx_backend", "attention-float-mask-hidden-as-positive", "a float mask's hidden keys found by +inf, not -inf",
     "repalgebra.backend.onnx:_attention", '_number(ctx, "hidden", -math.inf)', '_number(ctx, "hidden", math.inf)', _MASKED),
    ("onnx_backend", "output-batch-axes-empty-as-unknown", "an output with no axis following the batch declared batch on axis 0",
     "repalgebra.backend.onnx:graph_to_onnx", '({0: "batch"} if batch_axes is None else batch_axes)', '(batch_axes or {0: "batch"})', _AXES),
    ("frontend", "einsum-one-operand-fresh", "a one-operand einsum (a view of its operand) taken for a new tensor by the fx path",
     "repalgebra.frontend.inplace:_alias_inputs", "return tensors[:1] if len(tensors) == 1 else []", "return []", _VIEWS),
    ("frontend", "plus-fresh", "+y (y itself) taken for a new tensor by the fx path",
     "repalgebra.frontend.inplace:_alias_inputs", "return tensors[:1] if n.target in _VIEW_FUNCTIONS else tensors",
     "return tensors[:1] if n.target in _VIEW_FUNCTIONS and n.target is not operator.pos else [] if n.target is operator.pos else tensors", _VIEWS),
    ("frontend", "einsum-write-lost-by-export", "a write through a one-operand einsum let through to torch.export's decomposition, which loses it",
     "repalgebra.frontend.aten:_returned_input", "if n.target is aten.einsum.default and len(n.args[1]) == 1:", "if False:", _VIEWS),
    ("frontend", "state-container-length-only", "a snapshot sees a dict or list by its type and length only (a count in a dict entry is baked)",
     "repalgebra.frontend.state:_key", "if not deeper or len(value) > _ITEMS:", "if True:", _STATE_INSIDE),
    ("frontend", "state-object-identity-only", "a snapshot sees a plain object by its identity only (a schedule's step is baked)",
     "repalgebra.frontend.state:_key", "if deeper and _plain(value):", "if False:", _STATE_INSIDE),
    ("frontend", "state-nan-changed", "a weight holding a NaN taken for one a call changed (the model kept whole, strict refuses)",
     "repalgebra.frontend.state:_equal", "return a.shape == b.shape and (a.is_floating_point()", "return False and (a.is_floating_point()", _STATE_INSIDE),
    ("frontend", "to-dtype-of-layout-of-input", "x.permute(...).to(w.dtype) of an input taken for the identity (the input's own cast only kept)",
     "repalgebra.frontend.handlers_functions:_f_to_dtype_of", "(_of_an_input_dtype(x) or _from_a_written_cast(x))",
     "(x.producer is None or _from_a_written_cast(x))", ("tests/test_fuse_call_modes.py::test_a_layout_of_the_input_cast_to_a_weights_dtype_stays_a_cast",)),
    ("onnx_backend", "nearest-as-resize", "nearest interpolation lowered to Resize (it picks by dst / scale, torch by dst * in / out)",
     "repalgebra.backend.onnx:_interpolate", '    if a["mode"] in ("nearest", "nearest-exact"):', "    if False:", _NEAREST),
    ("onnx_backend", "nearest-picks-in-float32-always", "a float64 file's nearest picks computed on float32 indices",
     "repalgebra.backend.onnx:_nearest", "dtype=torch.float64 if ctx.dtype == torch.float64 else torch.float32", "dtype=torch.float32", _NEAREST),
    ("onnx_backend", "nearest-picks-transposed", "the picks computed on a map of the input's sizes reversed",
     "repalgebra.backend.onnx:_nearest", "picks.reshape(1, 1, *spatial)", "picks.reshape(1, 1, *spatial[::-1])", _NEAREST),
    ("onnx_backend", "constants-in-graph-dtype", "a node's constants made in the graph's dtype, not the one it computes in (a float32 part of a float16 model)",
     "repalgebra.backend.onnx:graph_to_onnx", "ctx.dtype = _node_dtype(n, dtype)", "ctx.dtype = dtype", _DTYPES),
    ("onnx_backend", "resize-scale-as-written", "a Resize's scale written as the float32 of the factor (10 x 0.7 rows: 6, where torch makes 7)",
     "repalgebra.backend.onnx:_scale_for", "        if sizes == (out, out):", "        if True:", (f"{_OE}::test_a_scale_factor_gives_torchs_output_size",)),
    ("onnx_backend", "resize-scale-float32-size-only", "a Resize's scale checked by the float32 product alone (onnx's shape inference multiplies in double)",
     "repalgebra.backend.onnx:_scale_for", "int(np.floor(size * float(scale)))", "int(np.floor(np.float32(size) * scale))",
     (f"{_OE}::test_a_scale_factor_gives_torchs_output_size",)),
    ("onnx_backend", "another-batch-unchecked-unfused", "a graph exported with fuse=False declared a dynamic batch without a run at another",
     "repalgebra.backend.onnx:export_onnx", "        if batch and module is not None and (fired or", "        if fuse and batch and module is not None and (fired or",
     (f"{_OE}::test_a_model_that_runs_at_its_examples_batch_only_gets_a_fixed_batch",)),
    ("torch_backend", "outputs-aliased", "a copy the model returns (x.clone(), y.clone()) returned as the input or an earlier output itself",
     "repalgebra.backend.torch:_unaliased", 'ctx.graph.call_method("clone", (node,)) if id(v) in inputs or id(v) in seen else node', "node", _ALIASED),
    ("torch_backend", "outputs-aliased-through-views", "a view of a copy of the input (x.clone().flatten(1)) returned as a view of the input",
     "repalgebra.backend.torch:_unaliased", "while v.producer is not None and v.producer.op in _VIEWING:", "while False:", _ALIASED),
    ("onnx_backend", "file-unchecked-at-another-batch", "a file with a dynamic batch written without a run of it at another batch",
     "repalgebra.backend.onnx:graph_to_onnx", "if another is not None and another.axes is not None and (why :=",
     "if False and another is not None and another.axes is not None and (why :=", (f"{_OE}::test_a_batch_moved_off_axis_0_before_a_flatten_fixes_the_batch",)),
    ("onnx_backend", "unfold-picks-unpadded", "unfold's picks taken on the map without its padding (the window places shift)",
     "repalgebra.backend.onnx:_unfold", "reshape(1, 1, h + 2 * ph, w + 2 * pw)", "reshape(1, 1, h + 2 * ph, w + 2 * pw)[..., ph:, pw:]", _UNFOLD),
    ("onnx_backend", "unfold-pad-order", "unfold's zero padding written as the rows' on both axes",
     "repalgebra.backend.onnx:_unfold", 'ctx.ints("pads", [0, 0, ph, pw, 0, 0, ph, pw])', 'ctx.ints("pads", [0, 0, ph, ph, 0, 0, ph, ph])', _UNFOLD),
    ("onnx_backend", "input-batch-all-or-none", "inputs grown all together or not at all (a shared mask makes every input axis 0 batch)",
     "repalgebra.backend.onnx:_batch_axes", "for n in range(len(others), -1, -1) if", "for n in range(len(others), len(others) - 1, -1) if", _AXES),
    ("onnx_backend", "input-batch-grown-regardless", "the inputs left out of a run at another batch grown anyway",
     "repalgebra.backend.onnx:_batch_axes", "rows = batch + 1 if grow else", "rows = batch + 1 if True else", _AXES),
    ("onnx_backend", "input-batch-declared-regardless", "every input declared batch on axis 0, whether it grew with the batch or not",
     "repalgebra.backend.onnx:graph_to_onnx", '{0: "batch"} if batched[k] else {}', '{0: "batch"}', _AXES),
    ("onnx_backend", "batch-one-unchecked", "a graph traced at batch 1 declared a dynamic batch without a run at another",
     "repalgebra.backend.onnx:export_onnx", "(fired or _batch_of_one(example))", "fired", _AXES),
    ("onnx_backend", "clamp-one-bound-clip", "a clamp with one bound lowered to Clip, which onnxruntime bounds by the dtype's largest number",
     "repalgebra.backend.onnx:_clamp", "    if lo is None or hi is None:", "    if False:", _CLAMP),
    ("onnx_backend", "clamp-lower-bound-min", "a clamp from below lowered to Min",
     "repalgebra.backend.onnx:_clamp", 'return ctx.emit("Max", [x, bound("min", lo)])', 'return ctx.emit("Min", [x, bound("min", lo)])', _CLAMP),
    ("onnx_backend", "numbers-in-float32", "a float64 file's numbers made in float32 first (1/3 as 0.3333333432674408)",
     "repalgebra.backend.onnx:_number", "torch.tensor(float(value), dtype=torch.float64)", "torch.tensor(float(value))", _NUMBERS),
    ("frontend", "size-base-dilation-sign", "a stride-1 conv's output taken as its input's length plus padding plus dilation * (k - 1)",
     "repalgebra.frontend.shapes:size_base", "- d * (k - 1)", "+ d * (k - 1)", _CROP),
    ("frontend", "size-base-kernel-of-height", "a conv's kernel size read along the height, not the axis cropped",
     "repalgebra.frontend.shapes:size_base", 'n.params["weight"].shape[axis]', 'n.params["weight"].shape[2]', _CROP),
    ("frontend", "size-base-lift-axis", "a 1-D conv's flattened length read from its height-one lift's height",
     "repalgebra.frontend.shapes:size_base", "                axis = 3\n", "                axis = 2\n", _CROP),
    ("frontend", "sized-stop-any-value", "a slice ending at any value's size taken for the conv's input length",
     "repalgebra.frontend.handlers_functions:_sized_stops", "if u is not None and u is w and a == b:", "if u is not None:", _CROP),
    ("frontend", "sized-stop-no-crop-empty", "a crop of nothing written as the slice :-0, which keeps nothing",
     "repalgebra.frontend.handlers_functions:_sized_stops", "-(c - d) if c > d else None", "-(c - d)", _CROP),
    ("frontend", "sized-stop-ellipsis-axis", "the axis after an Ellipsis counted from the rank, not from the items after it",
     "repalgebra.frontend.handlers_functions:_sized_stops", "axis = len(x.shape) - sum(", "axis = len(x.shape) + 0 * sum(", _CROP),
    ("frontend", "softmax-dtype-dropped", "a softmax computed in a dtype of its own taken in its input's dtype",
     "repalgebra.frontend.handlers_functions:_f_softmax", 'x = a["input"] if a["dtype"] is None else', 'x = a["input"] if True else', _SOFTMAX),
    ("frontend", "softmax-stacklevel-as-dtype", "F.softmax's third argument (_stacklevel) read as its dtype",
     "repalgebra.frontend.handlers_functions:_f_softmax", "functional = target in (F.softmax, F.log_softmax)", "functional = False", _SOFTMAX),
    ("frontend", "log-softmax-as-softmax", "a log-softmax with a dtype made a softmax",
     "repalgebra.frontend.handlers_functions:_f_softmax", 'op = "log_softmax" if target in', 'op = "softmax" if target in', _SOFTMAX),
    ("frontend", "shape-reads-stay-on-linears-input", "a norm's output read by q, k, v and for its shape keeps the shape read",
     "repalgebra.frontend.shapes:_rerouted", "if _data_reads(graph, r) <= 1 or _linears_only(graph, r)}", "if _data_reads(graph, r) <= 1}", _NORM_READ),
    ("frontend", "norms-change-shape", "a norm's output shape not taken for its input's",
     "repalgebra.frontend.shapes:size_source", "if n.op in _SAME_SHAPE or", 'if (n.op in _SAME_SHAPE and n.op not in ("layer_norm", "rms_norm")) or', _NORM_READ),
    ("frontend", "written-cast-unseen", "a cast back from a dtype the code writes taken for the identity",
     "repalgebra.frontend.handlers_functions:_from_a_written_cast", 'if p.op == "cast":', "if False:", _CAST_BACK),
    ("frontend", "written-cast-one-step", "only the value's own producer looked at for a written cast (a softmax of a cast is missed)",
     "repalgebra.frontend.handlers_functions:_from_a_written_cast", "        v = p.inputs[0]\n", "        return False\n", _CAST_BACK),
    ("frontend", "wrapper-hooks-ignored", "a DataParallel with hooks of its own taken for the module it runs (its hooks dropped)",
     "repalgebra.frontend.wrappers:wrapped", "if m._forward_pre_hooks or m._forward_hooks:", "if False:", _WRAP),
    ("frontend", "wrapper-subclass-forward-ignored", "a DataParallel subclass with a forward of its own taken for the module it runs",
     "repalgebra.frontend.wrappers:_plain", "isinstance(m, cls) and kind.forward is cls.forward and", "isinstance(m, cls) and", _WRAP),
    ("frontend", "copy-loses-hooks-unchecked", "a compiled module whose copies lose its hooks is fused (the copies run without them)",
     "repalgebra.frontend.inputs:_loses_hooks", "c = copy_module(m)", "c = m", _WRAP),
    ("frontend", "written-read-as-constant", "a tensor a part kept whole sets on every call, read around it, becomes a constant of one call",
     "repalgebra.frontend.state:mark_written", "m.__dict__.setdefault(WRITTEN_TAG, set()).add(leaf)", "pass", _MODES),
    ("frontend", "written-owner-of-the-model", "what calls set is marked on the model, not on the module that owns it",
     "repalgebra.frontend.state:mark_written", "m = model.get_submodule(owner)", "m = model", _MODES),
    ("frontend", "written-name-with-path", "what calls set is marked with its full path, which no read of the module's own names matches",
     "repalgebra.frontend.state:mark_written", ".add(leaf)", ".add(name)", _MODES),
    ("frontend", "generators-not-restarted", "a model's own generator left where fuse's checks advanced it",
     "repalgebra.fuse:_restart_generators", "g.set_state(mine.get_state())", "pass", _MODES),
    ("frontend", "mode-flags-torch-layers-unwatched", "torch's own layers (nn.TransformerEncoder) read mode flags unwatched",
     "repalgebra.frontend.mode_flags:_namespaces", 'or base.__module__.startswith("torch.nn.modules.")', "or False", _MODES),
    ("frontend", "mode-flags-modules-unwatched", "``torch.`` in the model's code left as torch, its flag functions unwatched",
     "repalgebra.frontend.mode_flags:_stand_in", "return watched.setdefault(id(value), _Watched(value))", "return None", _MODES),
    ("frontend", "mode-flags-by-name-unwatched", "a flag function the model's module imported by name (from torch import is_grad_enabled) left as it is",
     "repalgebra.frontend.mode_flags:_stand_in", "if value is getattr(owner, name, None):", "if False:", _MODES),
    ("frontend", "mode-flags-by-name-answer", "a flag function imported by name answers instead of refusing",
     "repalgebra.frontend.mode_flags:_stand_in", 'return _refusing(value, f"{owner.__name__}.{name}()")', "return value", _MODES),
    ("frontend", "height-one-pad-of-channels", "a pad of a 1-D value's channels (the first pair of a pad of its last two axes) moved onto the lift, where it pads the height",
     f"{_H1M}:_along", 'return dict(a) if a["pads"][0] == a["pads"][1] == 0 else None', "return dict(a)", _H1),
    ("frontend", "height-one-reflect-pad-short", "a reflect pad of the length moved onto the 4-D lift with its 2 amounts, which torch reads as no 2-D pad",
     f"{_H1M}:_along", '"pads": pads[:2] + (0, 0)', '"pads": pads[:2]', _H1),
    ("frontend", "height-one-slice-of-height", "a slice of the length moved onto the lift along its height",
     f"{_H1M}:_along", '{**a, "axis": 3}', '{**a, "axis": 2}', _H1),
    ("frontend", "height-one-pad-stays-1d", "a pad a conv reads stays on the 3-D value, so the conv's lift reads it past its branches",
     f"{_H1M}:_sinks", "if along and id(n.out) in lifted:", "if False:", _H1),
    ("frontend", "height-one-by-shape", "a value taken for height one because it has height 1 at the example",
     f"{_H1M}:_height_one", "or n is None or not _keeps_height(n):\n            known[id(u)] = False",
     "or n is None or not _keeps_height(n) or True:\n            known[id(u)] = u.shape is not None and len(u.shape) == 4 and u.shape[2] == 1",
     _H1),
    ("frontend", "bn-module-eps-default", "a BatchNorm module's eps read as the default 1e-5 (issue 15)", f"{_HM}:_m_batch_norm",
     '{"eps": float(m.eps)}', '{"eps": 1e-5}', _FX),
    ("frontend", "bn-module-stats-swapped", "a BatchNorm module's running mean and variance swapped", f"{_HM}:_m_batch_norm",
     "bn_params(m.running_mean, m.running_var, m.weight, m.bias)", "bn_params(m.running_var, m.running_mean, m.weight, m.bias)", _FX),
    ("frontend", "bn-module-bias-dropped", "a BatchNorm module's bias (beta) is not read", f"{_HM}:_m_batch_norm",
     "m.running_var, m.weight, m.bias)", "m.running_var, m.weight, None)", _FX),
    ("frontend", "bn-module-batch-stats", "a BatchNorm with track_running_stats=False is folded as if it had statistics",
     f"{_HM}:_m_batch_norm", "if m.running_mean is None or m.running_var is None:", "if False:", _FX),
    ("frontend", "ln-module-eps-default", "a LayerNorm module's eps read as the default 1e-5 (issue 15)", f"{_HM}:_m_layer_norm",
     '"eps": float(m.eps)}', '"eps": 1e-5}', _FX),
    ("frontend", "ln-module-bias-dropped", "a LayerNorm module's bias is not read", f"{_HM}:_m_layer_norm",
     'for k in ("weight", "bias")', 'for k in ("weight",)', _FX),
    ("frontend", "ln-module-last-axis", "a LayerNorm module normalizes the last axis only", f"{_HM}:_m_layer_norm",
     '"normalized_shape": tuple(m.normalized_shape)', '"normalized_shape": tuple(m.normalized_shape)[-1:]', _FX),
    ("frontend", "avg-pool-module-ceil-dropped", "nn.AvgPool2d's ceil_mode is not read", f"{_HM}:_m_avg_pool",
     "m.padding, m.ceil_mode, m.count_include_pad", "m.padding, False, m.count_include_pad", _FX),
    ("frontend", "avg-pool-module-count-dropped", "nn.AvgPool2d's count_include_pad is read as True", f"{_HM}:_m_avg_pool",
     "m.ceil_mode, m.count_include_pad, divisor", "m.ceil_mode, True, divisor", _FX),
    ("frontend", "avg-pool-module-divisor-dropped", "nn.AvgPool2d's divisor_override is not read", f"{_HM}:_m_avg_pool",
     "m.count_include_pad, divisor, spatial)", "m.count_include_pad, None, spatial)", _FX),
    ("frontend", "max-pool-module-dilation-dropped", "nn.MaxPool2d's dilation is not read", f"{_HM}:_m_max_pool",
     "m.padding, m.dilation, m.ceil_mode", "m.padding, 1, m.ceil_mode", _FX),
    ("frontend", "max-pool-module-ceil-dropped", "nn.MaxPool2d's ceil_mode is not read", f"{_HM}:_m_max_pool",
     "m.dilation, m.ceil_mode, m.return_indices", "m.dilation, False, m.return_indices", _FX),
    ("frontend", "max-pool-module-padding-dropped", "nn.MaxPool2d's padding is not read", f"{_HM}:_m_max_pool",
     "m.stride, m.padding, m.dilation", "m.stride, 0, m.dilation", _FX),
    ("frontend", "pad-module-order", "nn.ConstantPad2d's amounts kept in torch order (left, right, top, bottom)", f"{_HM}:_m_pad",
     '{"pads": (top, bottom, left, right)', '{"pads": (left, right, top, bottom)', _FX),
    ("frontend", "pad-module-sides", "nn.ConstantPad2d's amounts read with each pair's sides swapped", f"{_HM}:_m_pad",
     "left, right, top, bottom = pads", "right, left, bottom, top = pads", _FX),
    ("frontend", "pad-module-value", "nn.ConstantPad2d's value read as 0", f"{_HM}:_m_pad",
     '"value": float(m.value)', '"value": 0.0', _FX),
    ("frontend", "linear-module-bias-dropped", "nn.Linear's bias is not read", f"{_HM}:_m_linear",
     "if m.bias is not None:", "if False:", _FX),
    # ---------------------------------------------------------------- front end: argument readers both handler families use
    ("frontend", "same-extra-first", "padding='same' puts the odd extra row/column at the top/left", f"{_ARGS}:conv_padding",
     "out += [total // 2, total - total // 2]", "out += [total - total // 2, total // 2]", _FX),
    ("frontend", "padding-pair-swapped", "a conv padding pair (h, w) read as (w, h)", f"{_ARGS}:conv_padding",
     "(p[0], p[0], p[1], p[1])", "(p[1], p[1], p[0], p[0])", _FX),
    ("frontend", "valid-padded", "padding='valid' read as one row and column at the end", f"{_ARGS}:conv_padding",
     'return (0, 0, 0, 0)', 'return (0, 1, 0, 1)', _FX),
    ("frontend", "avg-pool-stride-is-kernel", "an average pool's stride read as its kernel", f"{_ARGS}:avg_pool",
     "stride = kernel if stride is None or stride == [] or stride == () else ints(stride, spatial)", "stride = kernel", _FX),
    ("frontend", "avg-pool-padding-swapped", "an average pool's padding pair read as (w, h)", f"{_ARGS}:avg_pool",
     "padding = ints(padding, spatial)", "padding = ints(padding, spatial)[::-1]", _FX),
    ("frontend", "avg-pool-count-forced", "an average pool always counts its padding", f"{_ARGS}:avg_pool",
     '"count_include_pad": bool(count_include_pad)}', '"count_include_pad": True}', _FX),
    ("frontend", "avg-pool-divisor-ignored", "an average pool with divisor_override becomes a plain avg_pool2d", f"{_ARGS}:avg_pool",
     " or divisor is not None:", ":", _FX),
    ("frontend", "max-pool-dilation-ignored", "a max pool's dilation read as 1", f"{_ARGS}:max_pool",
     "padding, dilation = ints(padding, 2), ints(dilation, 2)", "padding, dilation = ints(padding, 2), (1, 1)", _FX),
    ("frontend", "max-pool-ceil-ignored", "a max pool's ceil_mode read as False", f"{_ARGS}:max_pool",
     '"ceil_mode": bool(ceil_mode)}', '"ceil_mode": False}', _FX),
    ("frontend", "max-pool-stride-is-kernel", "a max pool's stride read as its kernel", f"{_ARGS}:max_pool",
     "stride = kernel if stride is None or stride == [] or stride == () else ints(stride, 2)", "stride = kernel", _FX),
    ("frontend", "bn-params-weight-ignored", "a BN's weight (gamma) read as ones even when affine", f"{_ARGS}:bn_params",
     '"weight": torch.ones_like(mean) if weight is None else weight.detach().clone(),', '"weight": torch.ones_like(mean),', _FX),
    ("frontend", "bn-params-bias-ignored", "a BN's bias (beta) read as zeros even when affine", f"{_ARGS}:bn_params",
     '"bias": torch.zeros_like(mean) if bias is None else bias.detach().clone(),', '"bias": torch.zeros_like(mean),', _FX),
    ("frontend", "bn-params-mean-ignored", "a BN's running mean read as zeros", f"{_ARGS}:bn_params",
     '"mean": mean.detach().clone(),', '"mean": torch.zeros_like(mean),', _FX),
    # ---------------------------------------------------------------- front end: function handlers (torch.fx)
    ("frontend", "conv-fn-stride-swapped", "F.conv2d's stride read with its axes swapped", f"{_HF}:_f_conv2d",
     'stride, dilation = ints(a["stride"], 2), ints(a["dilation"], 2)', 'stride, dilation = ints(a["stride"], 2)[::-1], ints(a["dilation"], 2)', _FN),
    ("frontend", "conv-fn-dilation-swapped", "F.conv2d's dilation read with its axes swapped", f"{_HF}:_f_conv2d",
     'stride, dilation = ints(a["stride"], 2), ints(a["dilation"], 2)', 'stride, dilation = ints(a["stride"], 2), ints(a["dilation"], 2)[::-1]', _FN),
    ("frontend", "conv-fn-groups-one", "F.conv2d's groups read as 1", f"{_HF}:_f_conv2d",
     '"groups": a["groups"]}', '"groups": 1}', _FN),
    ("frontend", "bn-fn-eps-default", "F.batch_norm's eps read as the default 1e-5", f"{_HF}:_f_batch_norm",
     '{"eps": float(a["eps"])}', '{"eps": 1e-5}', _FN),
    ("frontend", "bn-fn-affine-ignored", "F.batch_norm's weight and bias not read", f"{_HF}:_f_batch_norm",
     'bn_params(mean, var, _const(a["weight"]), _const(a["bias"]))', "bn_params(mean, var, None, None)", _FN),
    ("frontend", "bn-fn-stats-swapped", "F.batch_norm's running mean and variance swapped", f"{_HF}:_f_batch_norm",
     "bn_params(mean, var,", "bn_params(var, mean,", _FN),
    ("frontend", "ln-fn-eps-default", "F.layer_norm's eps read as the default 1e-5", f"{_HF}:_f_layer_norm",
     '"eps": float(a["eps"])}', '"eps": 1e-5}', _FN),
    ("frontend", "ln-fn-bias-dropped", "F.layer_norm's bias not read", f"{_HF}:_f_layer_norm",
     'for k in ("weight", "bias") if a[k] is not None}', 'for k in ("weight",) if a[k] is not None}', _FN),
    ("frontend", "ln-fn-last-axis", "F.layer_norm normalizes the last axis only", f"{_HF}:_f_layer_norm",
     '{"normalized_shape": shape,', '{"normalized_shape": shape[-1:],', _FN),
    ("frontend", "avg-pool-fn-ceil-dropped", "F.avg_pool2d's ceil_mode not read", f"{_HF}:_f_avg_pool",
     'a["padding"], a["ceil_mode"], a["count_include_pad"]', 'a["padding"], False, a["count_include_pad"]', _FN),
    ("frontend", "avg-pool-fn-count-dropped", "F.avg_pool2d's count_include_pad read as True", f"{_HF}:_f_avg_pool",
     'a["ceil_mode"], a["count_include_pad"], divisor, spatial)', 'a["ceil_mode"], True, divisor, spatial)', _FN),
    ("frontend", "avg-pool-fn-divisor-dropped", "F.avg_pool2d's divisor_override not read", f"{_HF}:_f_avg_pool",
     'a["count_include_pad"], divisor, spatial)', 'a["count_include_pad"], None, spatial)', _FN),
    ("frontend", "max-pool-fn-dilation-dropped", "F.max_pool2d's dilation not read", f"{_HF}:_f_max_pool",
     'a["padding"], a["dilation"], a["ceil_mode"]', 'a["padding"], 1, a["ceil_mode"]', _FN),
    ("frontend", "max-pool-fn-ceil-dropped", "F.max_pool2d's ceil_mode not read", f"{_HF}:_f_max_pool",
     'a["dilation"], a["ceil_mode"], a["return_indices"]', 'a["dilation"], False, a["return_indices"]', _FN),
    ("frontend", "max-pool-fn-padding-dropped", "F.max_pool2d's padding not read", f"{_HF}:_f_max_pool",
     'a["stride"], a["padding"], a["dilation"]', 'a["stride"], 0, a["dilation"]', _FN),
    ("frontend", "pad-fn-order", "F.pad's amounts kept in torch order (left, right, top, bottom)", f"{_HF}:_f_pad",
     '{"pads": (top, bottom, left, right)', '{"pads": (left, right, top, bottom)', _FN),
    ("frontend", "pad-fn-sides", "F.pad's amounts read with each pair's sides swapped", f"{_HF}:_f_pad",
     "left, right, top, bottom = (*pad, 0, 0)[:4]", "right, left, bottom, top = (*pad, 0, 0)[:4]", _FN),
    ("frontend", "pad-fn-value", "F.pad's value read as 0", f"{_HF}:_f_pad",
     '"value": float(value)}', '"value": 0.0}', _FN),
    ("frontend", "transpose-fn-same-axis", "x.transpose(a, b) read as a transpose of a with itself", f"{_HF}:_f_transpose",
     '{"dim0": a["dim0"], "dim1": a["dim1"]}', '{"dim0": a["dim0"], "dim1": a["dim0"]}', _FN),
    ("frontend", "transpose-fn-batch-axis", "x.transpose(a, b) read as a transpose with the batch axis", f"{_HF}:_f_transpose",
     '{"dim0": a["dim0"], "dim1": a["dim1"]}', '{"dim0": 0, "dim1": a["dim1"]}', _FN),
    ("frontend", "permute-fn-sorted", "x.permute(dims) read as the identity permutation", f"{_HF}:_f_permute",
     '("permute", [x], {"dims": dims}', '("permute", [x], {"dims": tuple(sorted(dims))}', _FX),
    ("frontend", "flatten-fn-start", "torch.flatten(x, start) read from axis 1", f"{_HF}:_f_flatten",
     '{"start": a["start_dim"], "end": a["end_dim"]}', '{"start": 1, "end": a["end_dim"]}', _FN),
    # ---------------------------------------------------------------- front end: ATen handlers (torch.export)
    ("frontend", "aten-conv-same-extra-first", "aten conv padding='same' puts the odd extra row/column at the top/left", f"{_AH}:_conv",
     "pads = (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)",
     "pads = (total[0] - total[0] // 2, total[0] // 2, total[1] - total[1] // 2, total[1] // 2)", _A_CONV),
    ("frontend", "aten-conv-padding-swapped", "aten conv padding pair read as (w, h)", f"{_AH}:_conv",
     "pads = (p[0], p[0], p[1], p[1])", "pads = (p[1], p[1], p[0], p[0])", _A_CONV),
    ("frontend", "aten-conv-stride-swapped", "aten conv stride read with its axes swapped", f"{_AH}:_conv",
     'stride, dilation, groups = _pair(a["stride"]), _pair(a["dilation"]), a["groups"]',
     'stride, dilation, groups = _pair(a["stride"])[::-1], _pair(a["dilation"]), a["groups"]', _A_CONV),
    ("frontend", "aten-conv-dilation-swapped", "aten conv dilation read with its axes swapped", f"{_AH}:_conv",
     'stride, dilation, groups = _pair(a["stride"]), _pair(a["dilation"]), a["groups"]',
     'stride, dilation, groups = _pair(a["stride"]), _pair(a["dilation"])[::-1], a["groups"]', _A_CONV),
    ("frontend", "aten-bn-eps-default", "aten batch norm's eps read as the default 1e-5", f"{_AH}:_bn",
     '{"eps": float(eps)}', '{"eps": 1e-5}', _A_BN),
    ("frontend", "aten-bn-weight-ignored", "aten batch norm's weight read as ones", f"{_AH}:_bn",
     '"weight": torch.ones_like(m) if weight is None else _c(weight),', '"weight": torch.ones_like(m),', _A_BN),
    ("frontend", "aten-bn-mean-is-var", "aten batch norm's running variance read as its mean", f"{_AH}:_bn",
     '"mean": m,', '"mean": v,', _A_BN),
    ("frontend", "aten-ln-eps-default", "aten layer norm's eps read as the default 1e-5", f"{_AH}:_ln",
     '"eps": float(eps)}', '"eps": 1e-5}', _A_LN),
    ("frontend", "aten-ln-bias-dropped", "aten layer norm's bias not read", f"{_AH}:_ln",
     '(("weight", weight), ("bias", bias))', '(("weight", weight),)', _A_LN),
    ("frontend", "aten-ln-last-axis", "aten layer norm normalizes the last axis only", f"{_AH}:_ln",
     '{"normalized_shape": shape,', '{"normalized_shape": shape[-1:],', _A_LN),
    ("frontend", "aten-avg-pool-ceil-dropped", "aten avg pool's ceil_mode read as False", f"{_AH}:_avg_pool",
     '"ceil_mode": bool(a["ceil_mode"])', '"ceil_mode": False', _A_POOL),
    ("frontend", "aten-avg-pool-count-forced", "aten avg pool always counts its padding", f"{_AH}:_avg_pool",
     '"count_include_pad": bool(a["count_include_pad"])}', '"count_include_pad": True}', _A_POOL),
    ("frontend", "aten-avg-pool-divisor-ignored", "aten avg pool with divisor_override becomes a plain avg_pool2d", f"{_AH}:_avg_pool",
     ' or a["divisor_override"] is not None:', ":", _A_POOL),
    ("frontend", "aten-avg-pool-padding-swapped", "aten avg pool's padding pair read as (w, h)", f"{_AH}:_avg_pool",
     '_pair(a["padding"])', '_pair(a["padding"])[::-1]', _A_POOL),
    ("frontend", "aten-max-pool-dilation-ignored", "aten max pool's dilation read as 1", f"{_AH}:_max_pool",
     '_pair(a["padding"]), _pair(a["dilation"])', '_pair(a["padding"]), (1, 1)', _A_POOL),
    ("frontend", "aten-max-pool-ceil-ignored", "aten max pool's ceil_mode read as False", f"{_AH}:_max_pool",
     '"ceil_mode": bool(a["ceil_mode"])}', '"ceil_mode": False}', _A_POOL),
    ("frontend", "aten-max-pool-padding-swapped", "aten max pool's padding pair read as (w, h)", f"{_AH}:_max_pool",
     '_pair(a["kernel_size"]), _pair(a["padding"])', '_pair(a["kernel_size"]), _pair(a["padding"])[::-1]', _A_POOL),
    ("frontend", "aten-pad-order", "aten constant pad amounts kept in torch order", f"{_AH}:_pad_op",
     '{"pads": (top, bottom, left, right)', '{"pads": (left, right, top, bottom)', _A_PAD),
    ("frontend", "aten-pad-sides", "aten constant pad amounts read with each pair's sides swapped", f"{_AH}:_pad_op",
     "left, right, top, bottom = (*pad, 0, 0)[:4]", "right, left, bottom, top = (*pad, 0, 0)[:4]", _A_PAD),
    ("frontend", "aten-pad-value", "aten constant pad value read as 0", f"{_AH}:_pad_op",
     '"value": float(value)}', '"value": 0.0}', _A_PAD),
    ("frontend", "aten-permute-sorted", "aten permute read as the identity permutation", f"{_AH}:_permute",
     '("permute", [x], {"dims": dims}', '("permute", [x], {"dims": tuple(sorted(dims))}', _A_LN),
    ("frontend", "aten-transpose-same-axis", "aten transpose read as a transpose of an axis with itself", f"{_AH}:_transpose",
     '{"dim0": a["dim0"], "dim1": a["dim1"]}', '{"dim0": a["dim0"], "dim1": a["dim0"]}', _A_LN),
    ("frontend", "convT-module-bias-dropped", "nn.ConvTranspose2d's bias is not read", f"{_HM}:_m_conv_transpose2d",
     "({} if m.bias is None else", "({} if True else", _FX),
    ("frontend", "convT-module-output-padding", "nn.ConvTranspose2d's output padding read as its padding", f"{_HM}:_m_conv_transpose2d",
     "m.padding, m.output_padding,", "m.padding, m.padding,", _FX),
    ("frontend", "convT-module-dilation-swapped", "nn.ConvTranspose2d's dilation read with its axes swapped", f"{_HM}:_m_conv_transpose2d",
     "m.dilation, m.groups)", "m.dilation[::-1], m.groups)", _FX),
    ("frontend", "convT-function-conv2d-order", "F.conv_transpose2d's arguments bound in F.conv2d's order (dilation before groups)",
     f"{_HF}:_f_conv_transpose2d", '("groups", 1), ("dilation", 1)]', '("dilation", 1), ("groups", 1)]', _FN),
    ("frontend", "convT-function-bias-dropped", "F.conv_transpose2d's bias is not read", f"{_HF}:_f_conv_transpose2d",
     'params = {"weight": w} if a["bias"] is None else', 'params = {"weight": w} if True else', _FN),
    ("frontend", "convT-function-output-padding-dropped", "F.conv_transpose2d's output padding is not read", f"{_HF}:_f_conv_transpose2d",
     'a["padding"], a["output_padding"],', 'a["padding"], 0,', _FN),
    ("frontend", "convT-aten-padding-order", "aten.conv_transpose2d's padding and output padding read swapped", f"{_AH}:_conv_transpose",
     '("stride", "padding", "output_padding", "dilation")', '("stride", "output_padding", "padding", "dilation")', _A_CONVT),
    ("frontend", "convT-aten-bias-dropped", "aten.conv_transpose2d's bias is not read", f"{_AH}:_conv_transpose",
     'params = {"weight": w} if bias is None else', 'params = {"weight": w} if True else', _A_CONVT),
    ("frontend", "convT-aten-groups-dropped", "aten.conv_transpose2d's groups are not read", f"{_AH}:_conv_transpose",
     '"dilation")), a["groups"])', '"dilation")), 1)', _A_CONVT),
    ("frontend", "conv3d-module-bias-dropped", "nn.Conv3d's bias is not read", f"{_HM}:_m_conv3d",
     "({} if m.bias is None else", "({} if True else", _FX),
    ("frontend", "conv3d-module-stride-reversed", "nn.Conv3d's stride read as (w, h, d)", f"{_HM}:_m_conv3d",
     "m.kernel_size, m.stride,", "m.kernel_size, m.stride[::-1],", _FX),
    ("frontend", "conv3d-module-dilation-dropped", "nn.Conv3d's dilation is not read", f"{_HM}:_m_conv3d",
     "m.dilation, m.groups)", "1, m.groups)", _FX),
    ("frontend", "conv3d-function-order", "F.conv3d's arguments bound with groups before dilation",
     f"{_HF}:_f_conv3d", '("dilation", 1), ("groups", 1)]', '("groups", 1), ("dilation", 1)]', _FN),
    ("frontend", "conv3d-function-bias-dropped", "F.conv3d's bias is not read", f"{_HF}:_f_conv3d",
     'params = {"weight": w} if a["bias"] is None else', 'params = {"weight": w} if True else', _FN),
    ("frontend", "conv3d-function-stride-as-dilation", "F.conv3d's stride read from its dilation argument", f"{_HF}:_f_conv3d",
     'a["stride"], a["padding"], a["dilation"]', 'a["dilation"], a["padding"], a["dilation"]', _FN),
    ("frontend", "conv1d-function-order", "F.conv1d's arguments bound with groups before dilation",
     f"{_HF}:_f_conv1d", '("dilation", 1), ("groups", 1)]', '("groups", 1), ("dilation", 1)]', _FN),
    ("frontend", "conv1d-function-bias-dropped", "F.conv1d's bias is not read", f"{_HF}:_f_conv1d",
     '({} if a["bias"] is None else', '({} if True else', _FN),
    ("frontend", "conv1d-function-dilation-dropped", "F.conv1d's dilation is not read", f"{_HF}:_f_conv1d",
     '"dilation": (1, *dilation)', '"dilation": (1, 1)', _FN),
    ("frontend", "conv3d-aten-bias-dropped", "aten.conv3d's bias is not read", f"{_AH}:_conv3d",
     'params = {"weight": w} if bias is None else', 'params = {"weight": w} if True else', _A_CONV3D),
    ("frontend", "conv3d-aten-groups-dropped", "aten.conv3d's groups are not read", f"{_AH}:_conv3d",
     'a["dilation"], a["groups"])', 'a["dilation"], 1)', _A_CONV3D),
    ("frontend", "conv3d-aten-padding-as-dilation", "aten.conv3d's padding read from its dilation argument", f"{_AH}:_conv3d",
     'a["padding"], a["dilation"]', 'a["dilation"], a["dilation"]', _A_CONV3D),
    # ================================================================ engine
    ("engine", "cast-back-skipped", "the folded parameters stay in float64 (no cast back)", f"{_RW}:rewrite",
     "    if cast_back:\n        g = cast_params(g)", "    if False:\n        g = cast_params(g)", _ENGINE),
    ("engine", "cast-to-float32", "parameters are cast back to float32 whatever the dtype of their values", f"{_RW}:cast_params",
     "p.to(n.out.dtype) if", "p.to(torch.float32) if", _ENGINE),
    ("engine", "first-sweep-skipped", "the first rewrite does not sweep the whole graph for dead nodes", f"{_RW}:rewrite",
     "whole_graph=not report.fired", "whole_graph=False", _ENGINE),
    ("engine", "no-fixpoint", "the engine stops after one sweep over the nodes (not a fixpoint)", f"{_RW}:rewrite",
     "                changed = True\n", "                changed = False\n", _ENGINE),
    ("engine", "dead-nodes-visited", "the sweep tries the rules on nodes an earlier rewrite of the sweep removed", f"{_RW}:rewrite",
     "            if not g.contains(node):\n                continue", "            if False:\n                continue", _ENGINE),
    ("frontend", "select-scatter-index-negative", "y[:, -1] = v scattered at start -1 (an empty slice)", f"{_AH}:_select_scatter",
     "start = index % x.shape[axis]", "start = index", _TSM),
    ("frontend", "select-scatter-first", "y[:, k] = v scattered into the first slice of the axis", f"{_AH}:_select_scatter",
     '{"axis": axis, "start": start, "end": start + 1', '{"axis": axis, "start": 0, "end": 1', _TSM),
    ("frontend", "select-scatter-unsqueeze-axis-0", "the scattered value unsqueezed on the first axis", f"{_AH}:_select_scatter",
     "unsqueezed(src, axis)", "unsqueezed(src, 0)", _TSM),
    # ================================================================ torch back end
    ("torch_backend", "conv-zeropad-order", "nn.ZeroPad2d((top, bottom, left, right)) for an asymmetric conv padding (issue 15)",
     f"{_TB}:_conv2d", "nn.ZeroPad2d((left, right, top, bottom))", "nn.ZeroPad2d((top, bottom, left, right))", _TORCH),
    ("torch_backend", "conv-symmetric-axes", "a symmetric conv padding written (w, h)", f"{_TB}:_conv2d",
     "(top, left) if symmetric else 0", "(left, top) if symmetric else 0", _TORCH),
    ("torch_backend", "conv-symmetric-test", "a padding symmetric in height only is taken as symmetric", f"{_TB}:_conv2d",
     "symmetric = top == bottom and left == right", "symmetric = top == bottom", _TORCH),
    ("torch_backend", "conv-stride-swapped", "the conv's stride written with its axes swapped", f"{_TB}:_conv2d",
     'tuple(w.shape[2:]), a["stride"],', 'tuple(w.shape[2:]), tuple(a["stride"])[::-1],', _TORCH),
    ("torch_backend", "conv-dilation-swapped", "the conv's dilation written with its axes swapped", f"{_TB}:_conv2d",
     '0, a["dilation"], a["groups"]', '0, tuple(a["dilation"])[::-1], a["groups"]', _TORCH),
    ("torch_backend", "bn-eps-default", "nn.BatchNorm built with the default eps", f"{_TB}:_batch_norm",
     'eps=node.attrs["eps"], ', "", _TORCH),
    ("torch_backend", "bn-stats-swapped", "nn.BatchNorm's running mean set to the variance", f"{_TB}:_batch_norm",
     'bn.running_mean.copy_(p["mean"])', 'bn.running_mean.copy_(p["var"])', _TORCH),
    ("torch_backend", "bn-bias-dropped", "nn.BatchNorm's bias left at zero", f"{_TB}:_batch_norm",
     'bn.bias.copy_(p["bias"])', "bn.bias.zero_()", _TORCH),
    ("torch_backend", "ln-eps-default", "nn.LayerNorm built with the default eps", f"{_TB}:_layer_norm",
     'eps=node.attrs["eps"], ', "", _TORCH),
    ("torch_backend", "ln-bias-dropped", "nn.LayerNorm's bias left at zero", f"{_TB}:_layer_norm",
     'ln.weight, ln.bias = _param(p["weight"]), _param(p["bias"])', 'ln.weight = _param(p["weight"])', _TORCH),
    ("torch_backend", "ln-last-axis", "nn.LayerNorm built over the last axis only", f"{_TB}:_layer_norm",
     'shape = tuple(node.attrs["normalized_shape"])', 'shape = tuple(node.attrs["normalized_shape"])[-1:]', _TORCH),
    ("torch_backend", "avg-pool-count-dropped", "nn.AvgPool2d built without count_include_pad (it counts the padding)",
     f"{_TB}:_avg_pool2d", 'a["ceil_mode"], a["count_include_pad"])', 'a["ceil_mode"])', _TORCH),
    ("torch_backend", "avg-pool-ceil-dropped", "nn.AvgPool2d built without ceil_mode", f"{_TB}:_avg_pool2d",
     'a["padding"], a["ceil_mode"], a["count_include_pad"])', 'a["padding"], False, a["count_include_pad"])', _TORCH),
    ("torch_backend", "avg-pool-padding-swapped", "nn.AvgPool2d's padding pair written (w, h)", f"{_TB}:_avg_pool2d",
     'a["stride"], a["padding"], a["ceil_mode"]', 'a["stride"], tuple(a["padding"])[::-1], a["ceil_mode"]', _TORCH),
    ("torch_backend", "max-pool-dilation-dropped", "nn.MaxPool2d built without its dilation", f"{_TB}:_max_pool2d",
     'a["padding"], a["dilation"], ceil_mode', 'a["padding"], 1, ceil_mode', _TORCH),
    ("torch_backend", "max-pool-ceil-dropped", "nn.MaxPool2d built without ceil_mode", f"{_TB}:_max_pool2d",
     'ceil_mode=a["ceil_mode"]', "ceil_mode=False", _TORCH),
    ("torch_backend", "max-pool-stride-is-kernel", "nn.MaxPool2d built with its kernel as stride", f"{_TB}:_max_pool2d",
     'nn.MaxPool2d(a["kernel"], a["stride"],', 'nn.MaxPool2d(a["kernel"], a["kernel"],', _TORCH),
    ("torch_backend", "pad-order", "nn.ConstantPad2d((top, bottom, left, right))", f"{_TB}:_pad",
     "nn.ConstantPad2d((left, right, top, bottom), value)", "nn.ConstantPad2d((top, bottom, left, right), value)", _TORCH),
    ("torch_backend", "pad-value", "nn.ConstantPad2d built with value 0", f"{_TB}:_pad",
     "nn.ConstantPad2d((left, right, top, bottom), value)", "nn.ConstantPad2d((left, right, top, bottom), 0.0)", _TORCH),
    ("torch_backend", "pad-zero-test", "a non-zero pad value is written as an nn.ZeroPad2d", f"{_TB}:_pad",
     "if value == 0 else", "if value != 0 else", _TORCH),
    ("torch_backend", "linear-bias-zero", "nn.Linear's bias left at zero", f"{_TB}:_linear",
     "lin.bias = _param(b)", "lin.bias = _param(torch.zeros_like(b))", _TORCH),
    ("torch_backend", "gelu-exact", "GELU always the exact (erf) form", f"{_TB}:_gelu",
     'approximate=node.attrs["approximate"]', 'approximate="none"', _TORCH),
    ("torch_backend", "gelu-tanh", "GELU always the tanh approximation", f"{_TB}:_gelu",
     'approximate=node.attrs["approximate"]', 'approximate="tanh"', _TORCH),
    ("torch_backend", "permute-sorted", "permute written as the identity permutation", f"{_TB}:_permute",
     'tuple(node.attrs["dims"])', 'tuple(sorted(node.attrs["dims"]))', _TORCH),
    ("torch_backend", "transpose-same-axis", "transpose written with one axis twice", f"{_TB}:_transpose",
     'node.attrs["dim0"], node.attrs["dim1"]', 'node.attrs["dim0"], node.attrs["dim0"]', _TORCH),
    ("torch_backend", "flatten-start", "flatten written from axis 1", f"{_TB}:_flatten",
     'node.attrs["start"], node.attrs["end"]', '1, node.attrs["end"]', _TORCH),
    ("torch_backend", "convT-padding-output-padding", "nn.ConvTranspose2d built with padding and output padding swapped",
     f"{_TB}:_conv_transpose2d", 'a["padding"], a["output_padding"],', 'a["output_padding"], a["padding"],', _TORCH),
    ("torch_backend", "convT-stride-swapped", "nn.ConvTranspose2d built with its stride axes swapped", f"{_TB}:_conv_transpose2d",
     'a["stride"], a["padding"]', 'a["stride"][::-1], a["padding"]', _TORCH),
    ("torch_backend", "convT-dilation-swapped", "nn.ConvTranspose2d built with its dilation axes swapped", f"{_TB}:_conv_transpose2d",
     'dilation=a["dilation"]', 'dilation=a["dilation"][::-1]', _TORCH),
    ("torch_backend", "conv3d-stride-reversed", "nn.Conv3d built with its stride as (w, h, d)", f"{_TB}:_conv3d",
     'a["stride"], a["padding"], a["dilation"], a["groups"],', 'a["stride"][::-1], a["padding"], a["dilation"], a["groups"],', _TORCH),
    ("torch_backend", "conv3d-padding-reversed", "nn.Conv3d built with its padding as (w, h, d)", f"{_TB}:_conv3d",
     'a["stride"], a["padding"], a["dilation"], a["groups"],', 'a["stride"], a["padding"][::-1], a["dilation"], a["groups"],', _TORCH),
    ("torch_backend", "conv3d-dilation-dropped", "nn.Conv3d built without its dilation", f"{_TB}:_conv3d",
     'a["stride"], a["padding"], a["dilation"], a["groups"],', 'a["stride"], a["padding"], 1, a["groups"],', _TORCH),
    ("torch_backend", "inline-first-input", "a carried call written with its first input in every input's place",
     f"{_TB}:_inline_call", "return xs[t.index]", "return xs[0]", _TORCH),
    ("torch_backend", "inline-size-kwargs-dropped", "a size expression's keyword arguments dropped (x.size(dim=1))",
     f"{_TB}:_inline_call", "emit(t.args), emit(t.kwargs))", "emit(t.args), {})", _TORCH),
    ("torch_backend", "inline-slice-step-dropped", "a carried slice written without its step", f"{_TB}:_inline_call",
     "slice(emit(t.start), emit(t.stop), emit(t.step))", "slice(emit(t.start), emit(t.stop))", _TORCH),
    ("torch_backend", "inline-view-kept", "a carried x.view(...) written as a view, not a reshape", f"{_TB}:_inline_call",
     "    target = _stride_free_target(fn)\n", "    target = fn.target\n", _TORCH),
    ("torch_backend", "shared-weights-unchecked", "calls of one source share a module whatever their weights",
     f"{_TB}:_same_module", "and torch.equal(sa[k], sb[k]) for k in sa)", "for k in sa)", _TORCH),
    ("torch_backend", "shared-config-unchecked", "calls of one source share a module whatever their padding or stride",
     f"{_TB}:_same_module", "or a.extra_repr() != b.extra_repr() or", "or", _TORCH),
    # ================================================================ ONNX back end
    ("onnx_backend", "bool-in-torch-counted", "torch's own size checks (InstanceNorm's) reported as the model's control flow on values",
     "repalgebra.backend.onnx_fallback:_called_by_torch", "return f is not None and f.f_code.co_filename.startswith(_TORCH_DIR)", "return False",
     ("tests/test_onnx_fallback.py::test_torch_s_own_size_checks_are_not_reported_as_control_flow",)),
    ("onnx_backend", "bool-in-model-unreported", "the model's own branch on a value exported without the note that one branch is fixed",
     "repalgebra.backend.onnx_fallback:_called_by_torch", "return f is not None and f.f_code.co_filename.startswith(_TORCH_DIR)", "return True",
     ("tests/test_onnx_fallback.py::test_model_fx_cannot_trace_at_all_is_exported_whole",)),
    ("onnx_backend", "conv-pads-order", "ONNX Conv pads written [top, left, right, bottom] (issue 15)", f"{_OB}:_conv",
     "pads=[top, left, bottom, right]", "pads=[top, left, right, bottom]", _ONNX),
    ("onnx_backend", "conv-pads-torch-order", "ONNX Conv pads written in torch order [left, right, top, bottom]", f"{_OB}:_conv",
     "pads=[top, left, bottom, right]", "pads=[left, right, top, bottom]", _ONNX),
    ("onnx_backend", "conv-strides-swapped", "ONNX Conv strides written with the axes swapped", f"{_OB}:_conv",
     'strides=list(a["stride"])', 'strides=list(a["stride"])[::-1]', _ONNX),
    ("onnx_backend", "conv-dilations-swapped", "ONNX Conv dilations written with the axes swapped", f"{_OB}:_conv",
     'dilations=list(a["dilation"])', 'dilations=list(a["dilation"])[::-1]', _ONNX),
    ("onnx_backend", "conv-group-one", "ONNX Conv group written as 1", f"{_OB}:_conv",
     'group=a["groups"]', "group=1", _ONNX),
    ("onnx_backend", "bn-epsilon-default", "ONNX BatchNormalization without its epsilon (the default 1e-5)", f"{_OB}:_bn",
     ', epsilon=float(n.attrs["eps"])', "", _ONNX),
    ("onnx_backend", "bn-stats-order", "ONNX BatchNormalization inputs with mean and var swapped", f"{_OB}:_bn",
     '("weight", "bias", "mean", "var")', '("weight", "bias", "var", "mean")', _ONNX),
    ("onnx_backend", "bn-scale-bias-order", "ONNX BatchNormalization inputs with scale and bias swapped", f"{_OB}:_bn",
     '("weight", "bias", "mean", "var")', '("bias", "weight", "mean", "var")', _ONNX),
    ("onnx_backend", "ln-epsilon-default", "ONNX LayerNormalization without its epsilon (the default 1e-5)", f"{_OB}:_layer_norm",
     ', epsilon=float(n.attrs["eps"])', "", _ONNX),
    ("onnx_backend", "ln-last-axis", "ONNX LayerNormalization over the last axis only", f"{_OB}:_layer_norm",
     "axis=-len(shape)", "axis=-1", _ONNX),
    ("onnx_backend", "ln-bias-dropped", "ONNX LayerNormalization with a zero bias", f"{_OB}:_layer_norm",
     'b = n.params.get("bias", torch.zeros(shape))', "b = torch.zeros(shape)", _ONNX),
    ("onnx_backend", "avg-pool-count-always", "ONNX AveragePool always count_include_pad=1 (issue 15)", f"{_OB}:_avg_pool",
     'count_include_pad=int(a["count_include_pad"]), ceil_mode=int(a["ceil_mode"])', 'count_include_pad=1, ceil_mode=int(a["ceil_mode"])', _ONNX),
    ("onnx_backend", "avg-pool-ceil-dropped", "ONNX AveragePool without ceil_mode", f"{_OB}:_avg_pool",
     'count_include_pad=int(a["count_include_pad"]), ceil_mode=int(a["ceil_mode"])', 'count_include_pad=int(a["count_include_pad"]), ceil_mode=0', _ONNX),
    ("onnx_backend", "avg-pool-pads-order", "ONNX AveragePool pads written [h, h, w, w]", f"{_OB}:_avg_pool",
     "pads=pads + pads", "pads=[p for p in pads for _ in (0, 1)]", _ONNX),
    ("onnx_backend", "avg-pool-ceil-end-padding", "a ceil-mode pool that drops a window keeps its own end padding (one window short)",
     f"{_OB}:_avg_pool", "max(p, (o - 1) * s + k - i - p)", "p", _ONNX),
    ("onnx_backend", "avg-pool-ceil-pad-value", "the explicit Pad of a counted ceil-mode pool pads with ones", f"{_OB}:_avg_pool",
     '_number(ctx, "zero", 0.0)', '_number(ctx, "zero", 1.0)', _ONNX),
    ("onnx_backend", "max-pool-dilations-dropped", "ONNX MaxPool without its dilations", f"{_OB}:_max_pool",
     'dilations=list(a["dilation"])', "dilations=[1, 1]", _ONNX),
    ("onnx_backend", "max-pool-end-pads", "ONNX MaxPool end pads equal to the begin pads (ceil mode lost)", f"{_OB}:_max_pool",
     "pads=begins + ends", "pads=begins + begins", _ONNX),
    ("onnx_backend", "max-pool-strides-kernel", "ONNX MaxPool strides written as the kernel", f"{_OB}:_max_pool",
     'strides=list(a["stride"])', 'strides=list(a["kernel"])', _ONNX),
    ("onnx_backend", "pad-order", "ONNX Pad amounts written [top, bottom, left, right]", f"{_OB}:_pad",
     "lead + [top, left] + lead + [bottom, right]", "lead + [top, bottom] + lead + [left, right]", _ONNX),
    ("onnx_backend", "pad-ends-begins", "ONNX Pad amounts with begins and ends swapped", f"{_OB}:_pad",
     "lead + [top, left] + lead + [bottom, right]", "lead + [bottom, right] + lead + [top, left]", _ONNX),
    ("onnx_backend", "pad-value", "ONNX Pad value written as 0", f"{_OB}:_pad",
     '_number(ctx, "value", n.attrs["value"])', '_number(ctx, "value", 0.0)', _ONNX),
    ("onnx_backend", "linear-bias-dropped", "the Linear's bias is not added", f"{_OB}:_linear",
     'if "bias" in n.params else y', "if False else y", _ONNX),
    ("onnx_backend", "gelu-20-exact", "opset 20's Gelu always the exact form", f"{_OB}:_gelu",
     'return ctx.emit("Gelu", [x], approximate=approximate)', 'return ctx.emit("Gelu", [x])', _ONNX),
    ("onnx_backend", "gelu-erf-scale", "the erf form of GELU divides by 2 instead of sqrt 2", f"{_OB}:_gelu",
     '_number(ctx, "sqrt2", math.sqrt(2))', '_number(ctx, "sqrt2", 2.0)', _ONNX),
    ("onnx_backend", "gelu-tanh-as-erf", "below opset 20 the tanh approximation is written in the erf form", f"{_OB}:_gelu",
     'if approximate == "tanh":', "if False:", _ONNX),
    ("onnx_backend", "gelu-tanh-constant", "the tanh form of GELU scales by sqrt(2 / 3.14)", f"{_OB}:_gelu",
     "math.sqrt(2 / math.pi)", "math.sqrt(2 / 3.14)", _ONNX),
    ("onnx_backend", "permute-sorted", "Transpose of a permute written as the identity permutation", f"{_OB}:_permute",
     'perm=[d % rank for d in n.attrs["dims"]]', 'perm=sorted(d % rank for d in n.attrs["dims"])', _ONNX),
    ("onnx_backend", "transpose-not-swapped", "Transpose of a transpose written as the identity permutation", f"{_OB}:_transpose",
     "perm[d0], perm[d1] = perm[d1], perm[d0]", "perm[d0], perm[d1] = perm[d0], perm[d1]", _ONNX),
    ("onnx_backend", "conv3d-end-pads-dropped", "ONNX Conv of a 3-D conv padded at the beginning of each axis only",
     f"{_OB}:_conv3d", 'pads=list(a["padding"]) * 2', 'pads=list(a["padding"]) + [0, 0, 0]', _ONNX),
    ("onnx_backend", "conv3d-strides-reversed", "ONNX Conv of a 3-D conv with its strides as (w, h, d)", f"{_OB}:_conv3d",
     'strides=list(a["stride"])', 'strides=list(a["stride"])[::-1]', _ONNX),
    ("onnx_backend", "conv3d-group-dropped", "ONNX Conv of a 3-D conv without its group", f"{_OB}:_conv3d",
     'group=a["groups"]', "group=1", _ONNX),
    ("onnx_backend", "convT-end-pads-full", "ONNX ConvTranspose end padded as much as the beginning (output padding lost)",
     f"{_OB}:_conv_transpose", "end = [p - o for p, o in", "end = [p - 0 * o for p, o in", _ONNX),
    ("onnx_backend", "convT-pads-order", "ONNX ConvTranspose pads written [begin_h, end_h, begin_w, end_w]", f"{_OB}:_conv_transpose",
     "pads=begin + [max(0, e) for e in end]", "pads=[begin[0], max(0, end[0]), begin[1], max(0, end[1])]", _ONNX),
    ("onnx_backend", "convT-group-dropped", "ONNX ConvTranspose without its group", f"{_OB}:_conv_transpose",
     'group=a["groups"]', "group=1", _ONNX),
]


def engine_loop() -> str:
    """The function holding the engine's loop: ``rewrite``, or ``_rewrite`` where ``rewrite`` wraps it."""
    import importlib

    engine = importlib.import_module(_RW)  # not ``import repalgebra.rewrite``: the package's ``rewrite`` is the function
    return f"{_RW}:_rewrite" if hasattr(engine, "_rewrite") else f"{_RW}:rewrite"


def stage_mutants() -> list["Mutant"]:
    """The front-end, engine and back-end mutants (each a :class:`~repalgebra.mutants.Mutant`)."""
    from repalgebra.mutants import Mutant

    loop = engine_loop()
    return [
        Mutant(group, name, bug, loop if target == f"{_RW}:rewrite" else target, old, new, tests=tests)
        for group, name, bug, target, old, new, tests in _SPECS
    ]
