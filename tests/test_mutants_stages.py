"""The stage mutants (``repalgebra/mutants_stages.py``): the front end, the engine and both back ends.

Fast checks of the mutants themselves (the full run is ``python -m repalgebra.mutants``, see
``tests/test_mutants.py``): each applies (its snippet occurs once), changes the code and is undone;
the five bugs of issue 15 are among them; every handler or lowering that carries attributes has at
least three; every stage reports a score; an equivalent mutant names an existing mutant and says why.
"""

from __future__ import annotations

import importlib
import inspect
from collections import Counter
from pathlib import Path

import pytest

from repalgebra import mutants as M
from repalgebra.mutants_stages import EQUIVALENT, STAGES, stage_mutants, stage_of

ROOT = Path(__file__).resolve().parents[1]
STAGE = stage_mutants()

ISSUE_15 = (
    "frontend/bn-module-eps-default",
    "frontend/ln-module-eps-default",
    "torch_backend/conv-zeropad-order",
    "onnx_backend/conv-pads-order",
    "onnx_backend/avg-pool-count-always",
)

# Handlers and lowerings with fewer than three mutants, and why that is enough.
FEW = {
    "repalgebra.frontend.height_one:_per_channel_op": "one decision a test reaches alone: a BatchNorm1d counts as per channel",
    "repalgebra.frontend.height_one:_moves_with_lift": "two decisions: per channel (its own function's) or along the length, "
    "each reached alone",
    "repalgebra.frontend.outside_reads:_passes_through": "two decisions a test reaches alone: the arguments read once each, "
    "in the call of the attribute holding what it wraps (its pattern)",
    "repalgebra.frontend.height_one:_lifted": "one decision: the lift moves up through what runs on it (its rank test is implied)",
    "repalgebra.frontend.structured:_rebound": "one decision: a hook holding the model is made to hold the view",
    "repalgebra.frontend.autocast_off:autocast_left_off": "one decision: a call under autocast on the device is refused",
    "repalgebra.frontend.autocast_off:autocast_turned_off": "one decision a test reaches alone: custom_fwd's question (an autocast block turned on is refused by the builder too)",
    "repalgebra.backend.torch:_holds_tensors": "one decision a test reaches alone: the tensors a carried call holds",
    "repalgebra.frontend.state_keys:_array_key": "two decisions: an array of objects by its items, a large one summed only where numeric",
    "repalgebra.backend.onnx:_heads_repeated": "one line a mistake would reach: the axis the heads are tiled along",
    "repalgebra.backend.torch:_attention": "one attribute: enable_gqa (the mask, causal and scale are the op's own, tested by value)",
    "repalgebra.frontend.handlers_functions:_f_attention": "one attribute added: enable_gqa",
    "repalgebra.frontend.aten_handlers:_attention": "one attribute added: enable_gqa",
    "repalgebra.frontend.state_keys:_checksum": "one line: the storage and sum of a large buffer",
    "repalgebra.frontend.state_keys:_slots": "one loop: the slots a class declares",
    "repalgebra.frontend.builder:traced_constant": "one line: a tensor fx computed while tracing",
    "repalgebra.frontend.aten_builder:constant_output": "one decision: a copy per call of a constant output computed from weights",
    "repalgebra.frontend.layout_reads:layouts_to_match": "two decisions, both mutated: the outputs matched by position only "
    "where the structures agree, and the formats the model's are dense in (the format named is dense_outputs' to write)",
    "repalgebra.frontend.mode_flags:_attribute": "one decision, mutated: a flag a module holds as a value refused on the read",
    "repalgebra.frontend.outside_reads:_function_of": "one decision, mutated: a wrapper of the model's code is read, "
    "torch's and the standard library's looked through (a wrapper object of the model's is _opaque, every module below)",
    "repalgebra.frontend.outside_reads:_holds": "two decisions, both mutated: an attribute or a child is held (a class "
    "that answers unknown names itself holds any)",
    "repalgebra.frontend.outside_reads:_may_reach_a_module": "one decision mutated: a child named counts (the other "
    "steps that count are those reached_through follows, mutated there)",
    "repalgebra.verify:named_tensor_leaves": "one decision, mutated: a plain tuple keeps output0, output1 ... (the names "
    "of keyed leaves are the keys joined, read by the test of _name_outputs)",
    "repalgebra.frontend.outside_reads:reached_through": "one decision added, mutated: the methods of its own an instance "
    "holds are read beside its class's (the rest is _read_from's, mutated there)",
    "repalgebra.module_copy:not_the_models": "one decision added, mutated: a standard module's name is the library's only "
    "where it was loaded from the standard library",
    "repalgebra.backend.onnx_fallback:batch_input": "one line, mutated: the first input with axes holds the batch",
    "repalgebra.frontend.shapes:_kept_by_const": "one decision mutated: an add_const passes a read on.  That it does so "
    "only along an axis where its constant has size 1 is defence in depth: where the constant is wider, the model runs "
    "at that size and 1 only, so fuse fixes the axis and refuses other sizes (test_frontend's per-column case)",
    "repalgebra.frontend.outside_reads:_layers": "two decisions, both mutated: a cached property's getter is a function "
    "of the class, and so is what a wrapper or caching descriptor wraps",
    "repalgebra.frontend.outside_reads:_from_first": "two decisions, both mutated: args[0] is self, another argument "
    "reaches nothing (the rest, every module below, is the safe default)",
    "repalgebra.frontend.outside_reads:_mapping_of": "one decision, mutated: a getter under a wrapper of the model's own "
    "is read as code, not as the dict it returns",
    "repalgebra.backend.onnx:_binary": "one decision added to it, mutated: a bool add or mul is ONNX's Or or And",
    "repalgebra.cli:_relative_error": "one decision, mutated: masks and indices compared for equality",
    "repalgebra.backend.onnx:_example_inputs": "one decision added to it, mutated: sizes below 1 refused (its shapes' "
    "types are test_a_model_of_two_inputs_exports_with_a_shape_for_each's)",
    "repalgebra.frontend.outside_reads:_in_super": "two decisions, both mutated: the definition above the class whose "
    "code calls super(), and the parameter that receives the argument",
    "repalgebra.backend.onnx_fallback:_scaled": "one decision, mutated: each factor moved to torch's own output size "
    "(whether it must move at all is _interpolate's mutant's)",
    "repalgebra.frontend.layout_reads:_without_gaps": "one decision, mutated: the elements fill the storage they span",
    "repalgebra.frontend.mode_flags:_asks_a_capture": "one decision, mutated: the names a helper's code loads",
    "repalgebra.frontend.mode_flags:_flags": "one table: the flags of torch._dynamo beside the others (refused, mutated)",
    "repalgebra.frontend.mode_flags:_routes": "one table: the way to torch._dynamo from the stand-in for torch (mutated)",
    "repalgebra.frontend.outside_reads:_own_method": "two decisions, both mutated: a static or class method is no method "
    "given the module, and a decorator's wrapper other than torch's is not read through",
    "repalgebra.frontend.outside_reads:_through_mappings": "two decisions a test reaches: a key goes on from its value's "
    "chain, a loop over the values from each (the dict alone reaching nothing is the spread's, mutated there)",
    "repalgebra.frontend.returned_mapping:_values": "one decision: only chains from self, constants and the dict call are values",
    "repalgebra.frontend.outside_reads:_delegated": "one decision a test reaches alone: a class with a __getattr__ of its own",
    "repalgebra.backend.onnx_fallback:_interpolate": "one decision added to it: nearest interpolation picked by torch",
    "repalgebra.backend.onnx_fallback:_nearest": "two lines a mistake would reach: each axis's picks and the axis gathered",
    "repalgebra.frontend.handlers_functions:_f_same_values": "one attribute: the memory format of a contiguous op",
    "repalgebra.frontend.aten_handlers:_identity": "one decision added to it: a clone to a memory format is a contiguous op",
    "repalgebra.backend.torch:_contiguous": "one line: the contiguous call written",
    "repalgebra.frontend.outside_reads:_called_above": "one decision a test reaches alone: super() reaches the definitions "
    "above the class holding the function (a function without super() reaches none: the old path)",
    "repalgebra.frontend.outside_reads:_helpers": "one decision: a module-level function of the model's code that the read "
    "code names is read too (torch's own and the standard library's are not the model asking)",
    "repalgebra.frontend.outside_reads:_asks_classes": "one decision added to it: a class pattern (MATCH_CLASS) is a class "
    "test (the names of the tests are tests_classes' mutant's)",
    "repalgebra.frontend.outside_reads:_steps_to": "two decisions added to it: an index a name holds goes on to the steps "
    "after it, and an assignment expression is passed through (the older branches predate the stage's mutants)",
    "repalgebra.frontend.inplace:_held_storages": "one decision: the storages of what the called module holds are collected",
    "repalgebra.frontend.state:cache_regions": "two decisions a test reaches: the module holding a cached attribute (its "
    "owner, with the code filling it) is the part kept whole, not the model nor a module around it (a generator or a "
    "module wired in at run time keeps the model captured as called once, as before)",
    "repalgebra.frontend.fx_trace:mutable": "two decisions a test reaches: a module kept whole is handed the lists in "
    "its arguments as plain lists (a dict in them, the same conversion, is rebuilt alike)",
    "repalgebra.fuse:_fixed_sizes": "one decision, two ways to get it wrong, both killed: a part captured by torch.export "
    "tells a capture at the example's sizes",
    "repalgebra.fuse:_not_around": "two decisions: the model itself kept whole is no capture around its cached parts "
    "(killed); a part captured by torch.export cannot arise there, as parts kept whole rule torch.export out",
    "repalgebra.frontend.fx_trace:carried_function": "one decision a test reaches: the innermost function of the model's "
    "code in a failed trace is carried (its other conditions, not a method, a lambda or torch's own code, are functions "
    "fx could not patch by name, whose carrying would fail the same way)",
    "repalgebra.frontend.torch:_traced_once": "one decision: a trace whose carried function is handed a module is refused",
    "repalgebra.frontend.fx_trace:reading_function": "two decisions a test reaches: the innermost function of the model's "
    "code found is returned, and the walk goes out past the tracer's own frames (its stop at fx's Tracer.trace keeps it "
    "off the code that called fuse: functions the trace never calls, whose carrying would change nothing)",
    "repalgebra.frontend.torch:trace_model": "one decision added to it: a refused test of sizes goes to _size_reads_carried "
    "(whose loop, trace and reasons are mutated there)",
    "repalgebra.frontend.fx_trace:rebuilt_from_fields": "two decisions a test reaches: a dict dataclass is built from its "
    "fields, and only those not None are its keys (a key set after it was made is refused by fuse's check as well)",
    "repalgebra.backend.onnx:_object_made": "one decision a test reaches alone: a fused model's record, traced again, is "
    "seen through its returned calls (the others make a plain dataclass the refusal it was)",
    "repalgebra.backend.onnx:records_opened": "one step besides record_fields' (mutated there): the call that built the "
    "record is dropped from the graph",
    "repalgebra.frontend.wrappers:unwrap": "one decision added to it a test reaches alone: a forward compiled on the "
    "instance is taken off (its loop over the wrappers is older than the stage's mutants)",
    "repalgebra.frontend.dtype_properties:follow_dtype_properties": "two decisions a test reaches: the dtype arguments a "
    "dtype property reading the parameters gave are read off a parameter (the other conditions leave the graph as "
    "traced, the old path)",
    "repalgebra.frontend.dtype_properties:_read_off": "one decision a test reaches alone: a buffer stands for the "
    "tensors where there is no parameter in the dtype (its rewiring of the reads is mutated through its callers)",
    "repalgebra.frontend.dtype_properties:follow_parameters_dtype": "two decisions a test reaches: the dtype arguments "
    "that follow stand-ins of another dtype are read off a parameter (the other conditions leave the graph as traced)",
    "repalgebra.frontend.dtype_properties:_read_from_the_property": "two decisions a test reaches alone: any other "
    "difference between the two traces (a number baked in) leaves the graph as traced, and a device the stand-ins "
    "changed is read off a parameter",
    "repalgebra.hooked:movable_hooks": "one decision a test reaches: a block with hooks of its own is fused inside them (the "
    "other conditions keep the old path, where the fused form's check would refuse it anyway)",
    "repalgebra.hooked:without_hooks": "one decision: the hooks are taken off the copy that is captured (a flag left "
    "behind for a hook no longer there is never read)",
    "repalgebra.hooked:carry_hooks": "one decision a test reaches alone: the hooks' flags travel with them (ids and order "
    "are the registry's own)",
    "repalgebra.fuse:_axes_fit": "one decision a test reaches: a fixed axis of another size is refused (the others pass "
    "in the same test)",
    "repalgebra.fuse:_refuses_what_runs": "one decision added to it a test reaches alone: a test of sizes makes a dispatcher "
    "(fixed shapes made one before, tested through the dispatchers' tests)",
    "repalgebra.fuse:_refuse_another_form": "one decision: a call forward does not bind is refused by name",
    "repalgebra.fuse:_binds": "one decision: whether forward binds the call's positional arguments",
    "repalgebra.frontend.handlers_functions:_part": "two decisions added to it a test reaches alone: the last part is "
    "counted, a part from the end of an unbind is the same at every size (the rest is older than the stage's mutants)",
    "repalgebra.frontend.handlers_functions:_piece_of": "two decisions with their own ops: an unbind's part not counted is "
    "a select, a split's first part a slice (a chunk's is the chunk op, whose own mutants are older)",
    "repalgebra.backend.onnx:_pieces_along_the_batch": "one decision a test reaches alone: no run at a larger batch fixes "
    "the batch (a split's axis whose size differs there, the file's own check at that batch finds too)",
    "repalgebra.fuse:_assert_sizes": "one decision a test reaches: the fixed sizes are asserted (a free batch is not: the "
    "export at any batch in the same test)",
    "repalgebra.fuse:_install": "two decisions added to it a test reaches alone: a shallow copy's guards, and the refusal of "
    "torch.jit.script (the others are older than the mutants of the stage)",
    "repalgebra.fuse:_copy_with_guards": "one decision a test reaches: the guards go onto the copy (its report a test reads too)",
    "repalgebra.backend.onnx:_leaky_relu": "one choice, the float64 form (its slope is the vocabulary's cases')",
    "repalgebra.backend.onnx:_hardsigmoid": "no parameters: one choice, the float64 form",
    "repalgebra.backend.onnx:_hardswish": "no parameters: one choice, the float64 form (the opset's, the vocabulary's cases')",
    "repalgebra.backend.onnx:_relu6_over_6": "one formula of fixed numbers: its shift is the one a test tells from a rounding",
    "repalgebra.frontend.structured:_view": "two decisions, how forward is called (its arguments unpacked, its keywords "
    "passed); the rest copies the model's class, hooks and state, which every capture of the view then runs (a wrong copy fails the check)",
    "repalgebra.frontend.capture:setting_attributes": "two decisions: a write from outside a part's call counts, its own "
    "do not (the rest is bookkeeping of the calls under way)",
    "repalgebra.fuse:_takes_other_calls": "two decisions: more parameters than the call's arguments, or *args and **kwargs",
    "repalgebra.frontend.state:restore_in_place": "two decisions a test reaches: tensors copied back in place, other "
    "attributes copied onto the part restored (an attribute a run adds and no call reads is harmless left)",
    "repalgebra.frontend.inplace:functionalize": "two decisions added to it a test reaches alone: a value made after a write "
    "shares nothing through inputs that share nothing with what was written, and an earlier in-place node is checked as "
    "any value (the rest is older than the stage's mutants)",
    "repalgebra.frontend.inplace:_for_its_effects": "two decisions: a result nothing reads, and a call of the model's own code",
    "repalgebra.frontend.inplace:_setattr": "one decision: an assignment to a tensor attribute that replaces values is refused",
    "repalgebra.frontend.inplace:alias_bases": "one line: a value's bases are itself and its alias inputs' bases",
    "repalgebra.frontend.fx_trace:_script_functions": "one decision: the scripted functions of the model's code are wrapped",
    "repalgebra.fuse:_uninstall": "one decision a test reaches alone: the copies made later get no guard back (taking it off the module is a dict's)",
    "repalgebra.fuse:_not_alone": "one decision: more signatures than are fused is said as such (else the first odd argument, older wording)",
    "repalgebra.backend.value_reads:_writes": "one decision a test reaches alone: a write by __setitem__, which returns "
    "nothing (the other writes return the tensor written, and a call's outputs are followed as such)",
    "repalgebra.backend.value_reads:_in_handler": "one decision: an instruction under a handler of its code or not",
    "repalgebra.backend.onnx_fallback:_shapes_differ": "two decisions: output shapes compared, values not (those are steered_by_values')",
    "repalgebra.call_dispatch:_fingerprint": "two decisions: every module's plain attributes, numbers by value",
    "repalgebra.call_dispatch:_equal": "two decisions: constants of another type are not the signature's, floats compared by their bits",
    "repalgebra.call_dispatch:_flatten": "one decision: only plain tuples, lists and dicts are opened (a PackedSequence is a leaf)",
    "repalgebra.frontend.shapes:_onto_same_shape": "one loop: a node still in the graph has its size reads moved",
    "repalgebra.frontend.handlers_functions:_size_of": "two ways a size is written that it reads: a slice of a shape, and a pair of its items",
    "repalgebra.backend.onnx:_runs_there": "two decisions: a file onnxruntime cannot run (its dtype) goes to the reference evaluator, either way",
    "repalgebra.backend.onnx_fallback:reference_differs": "one decision a test reaches: only a difference is one (a batch "
    "taken for another axis fails to run there rather than give other values)",
    "repalgebra.frontend.fx_trace:_runs_base_code": "two decisions: a method replaced on the instance, or by a class of the user's",
    "repalgebra.frontend.fx_trace:_sets": "one choice: the attribute a pruning hook sets",
    "repalgebra.fuse:_refuse_more_tensors": "one decision: more tensors than the example's",
    "repalgebra.fuse:_other_layout": "two choices: the layout the check runs in, for images and for other ranks",
    "repalgebra.module_copy:_uncopyable": "one search: the first attribute that does not copy",
    "repalgebra.frontend.builder:promoted_from": "one comparison of two dtypes",
    "repalgebra.draws:held_generator_state": "one state per kind of generator; the mutants drop Python's and numpy's",
    "repalgebra.frontend.fx_trace:_chunked": "one match: a chunk call's input and axis",
    "repalgebra.backend.onnx:_checks_read_the_batch": "one answer: a check refuses another batch, or none does",
    "repalgebra.frontend.size_tests:taken_as_traced": "one comparison of the call's answer with the example's",
    "repalgebra.frontend.builder:size_test_at_inputs": "one decision: checked on the inputs, nothing to check, or refused",
    "repalgebra.frontend.builder:read_at_inputs": "one walk (the sizes producers fix are size_at_inputs' mutants)",
    "repalgebra.frontend.builder:_broadcast_size_at_inputs": "two decisions a test tells apart: a size an input's producers "
    "fix wins, several sizes read from the inputs are broadcast per call (a rank-aligned read is the same at equal ranks)",
    "repalgebra.frontend.builder:broadcast_size": "one line: the size that is not 1",
    "repalgebra.frontend.torch:_traced": "two decisions: traced again where the example is known, then with every "
    "x.dtype as at the example (the rest is the first trace, as before)",
    "repalgebra.frontend.builder:_windowed": "one decision: a size read from the inputs goes through the window's "
    "arithmetic (a number is computed at once, an unknown stays unknown)",
    "repalgebra.frontend.shapes:window_axis": "two windows a test tells apart: a conv's stride and a pool's window",
    "repalgebra.frontend.shapes:window_size": "two roundings of torch's formula: ceil_mode rounding up, and its last "
    "window dropped where it would start in the right padding",
    "repalgebra.frontend.builder:reads_inside": "one answer a test tells apart: a test reads a value computed inside "
    "(the walk through containers is read_at_inputs' too)",
    "repalgebra.fuse:_batch_fixed": "one check: a part held at one batch size",
    "repalgebra.frontend.inplace:of_sizes": "two spellings a test reaches (x.size() and arithmetic of it); a tensor's "
    "item is no size, which any after_call test of a tensor given to a call checks",
    "repalgebra.frontend.builder:size_read": "one match of three spellings of a size read",
    "repalgebra.frontend.aten_handlers:_to_dtype": "a cast or a call; the casts' lowerings and the dtype tests check the rest",
    "repalgebra.backend.onnx:_refuse_state": "one decision added to it a test reaches: a write into an input is refused "
    "(inputs_written's mutants check what counts as one; the state refusals are older than the mutants of the stage)",
    "repalgebra.backend.onnx:_valid": "one check of the written file",
    "repalgebra.backend.onnx:_expand": "one Expand; its other forms are checked by every export that expands (the zoo's)",
    "repalgebra.frontend.fx_trace:holds_nothing_uninstalled": "two answers: weights of its own, or a child that is neither",
    "repalgebra.frontend.state:_own": "one filter of a module's attributes; the mutant keeps our own",
    "repalgebra.frontend.inplace:_make_out_of_place": "one table lookup per kind of in-place call; the mutants drop the dtype "
    "mark and mistake which in-place torch functions run as a method on a copy",
    "repalgebra.draws:generator_states": "one table of generators; the mutant drops the one Python draws from",
    "repalgebra.frontend.outside_reads:read_outside": "one answer: the paths read from outside (the hooks' bookkeeping is "
    "the other mutants' and the tests' own), and the modes it runs in (the mutant runs it without gradients only)",
    "repalgebra.frontend.outside_reads:_self_and_ancestors": "one list: a path and its ancestors",
    "repalgebra.fuse:_put": "one assignment; the mutant is the setattr it replaced",
    "repalgebra.backend.onnx:_refuse_unfaithful_copy": "one decision (copy_difference's mutants check what differs)",
    "repalgebra.frontend.outside_reads:_read_chains": "two decisions: the code a call runs, not __init__, and the "
    "helpers it calls (the chains themselves are _chains_in's and _steps', whose mutants are reached_through's)",
    "repalgebra.module_copy:in_eval": "one call, its result not used",
    "repalgebra.module_copy:_viewed": "one decision a test reaches alone, a view within its weight (the others, one "
    "tensor per storage, its dtype, dense, each turn a test's case to a copy that fails or reads other elements)",
    "repalgebra.draws:seeded_for_checks": "three seeds of one kind; the mutant drops torch's, the one a test draws from",
    "repalgebra.fuse:_stays_in_eval": "one hook on the fused model and on each module its graphs hold (the first is _fuse's mutant)",
    "repalgebra.frontend.handlers_functions:_f_detached": "one form: the same values",
    "repalgebra.frontend.args:concat_made": "two decisions tests reach: a (0,)-shaped operand skipped, where it is "
    "made from no input (one operand left is the identity either way, and the tests concat along axis 0, which every "
    "rank counts alike)",
    "repalgebra.untouched:_containers": "one walk: containers (a plain object's attributes too), and those they hold",
    "repalgebra.untouched:attributes_kept": "one restore a test reaches alone: a container's items (its attributes' "
    "restore is the same loop's)",
    "repalgebra.frontend.fx_trace:_tensor_of_sizes": "two decisions: a call fx records, or the sizes in the data as numbers",
    "repalgebra.frontend.shapes:_swapped": "one swap",
    "repalgebra.frontend.capture:capture_fx": "older than the stage's mutants but for one step: a graph of aten ops "
    "left to the torch.export capture",
    "repalgebra.backend.onnx_fallback:_fed": "one decision: inputs by their names where the file names them all in{k}",
    "repalgebra.backend.onnx_fallback:splice": "older than the stage's mutants but for one step: a region file's inputs wired by name",
    "repalgebra.frontend.handlers_functions:_f_values": "two attributes read: .values (older than the stage's mutants) "
    "and .data, the one with a mutant",
    "repalgebra.frontend.inplace:_fresh_tuple": "two decisions a test reaches: which calls, and max along a dim (the "
    "rest, a call that is no tuple, is the alias check's conservative default)",
    "repalgebra.frontend.fx_trace:_without_proxies": "one decision: an attribute put back, or one the trace added removed",
    "repalgebra.frontend.builder:_made_in_its_dtype": "one walk to a call, a constant or a written cast",
    "repalgebra.frontend.builder:a_factory": "one decision a test reaches alone: a dtype read from a value (which "
    "factories it knows is a table)",
    "repalgebra.frontend.builder:_kept_narrower": "one decision a test reaches alone: a value written that follows the "
    "model (the target's kind is _made_in_its_dtype's)",
    "repalgebra.module_copy:_non_leaves": "one walk: a tensor (not a leaf, or a view of a weight), or a container to look into",
    "repalgebra.verify:verify": "the public check, older than the stage's mutants but for one step: its inputs drawn "
    "in the example's structure",
    "repalgebra.fuse:_fuse": "the last steps of fuse, each older than the stage's mutants but one: its parts kept in eval mode",
    "repalgebra.draws:generators_kept": "one record: where a run left the generators (their restore is untouched's mutants')",
    "repalgebra.fuse:_drawn_elsewhere": "one comparison: the generators a run left elsewhere than the model's run",
    "repalgebra.frontend.state:_sites": "one search; the mutant drops the own draws of a module whose child draws",
    "repalgebra.backend.onnx:_refuse_state": "one refusal per kind of state; the mutant refuses draws as state",
    "repalgebra.module_copy:_held": "two cases that matter: a model's object in a cell, and a bound method of one",
    "repalgebra.module_copy:_made_again": "two choices that matter: the cells shared, the keyword defaults rebound",
    "repalgebra.module_copy:_handle_of_copy": "one decision a test reaches alone: the copy's hook dict (a write to the user's "
    "dict of hooks that take keywords is put back by untouched.hooks_kept before any test can see it)",
    "repalgebra.module_copy:_own_deepcopy": "one decision: a class's own __deepcopy__, not torch's",
    "repalgebra.untouched:rng_kept": "one choice: torch's generators forked around fuse or not",
    "repalgebra.frontend.calls:_held": "one choice: a complex constant held as its real view or as it is",
    "repalgebra.backend.onnx_fallback:drawn_at_random": "one decision: an input's values drawn at random or the example's",
    "repalgebra.frontend.inputs:_batched": "one decision: which inputs hold a row per sample",
    "repalgebra.backend.onnx:_threshold": "one comparison and one choice; the mutant is the form that differs only at NaN",
    "repalgebra.backend.onnx_fallback:steered_by_values": "one comparison of the outcomes: the mutants say never and always",
    "repalgebra.backend.onnx_fallback:_refuse_sizes_from_values": "one decision: a region whose file differs at other values is refused (the message is the test's match)",
    "repalgebra.backend.torch:held_dtype": "one decision: a tensor held in a floating dtype other than the model's",
    "repalgebra.frontend.height_one:_uniform": "one decision: one number, or factors that differ",
    "repalgebra.frontend.height_one:_per_channel": "one choice: a number's factors once per channel",
    "repalgebra.backend.onnx_fallback:_cut": "one computation: the second half of an axis zeroed (a mask's cut by &)",
    "repalgebra.frontend.shapes:_root": "one walk; the mutant of size_source drops the comparison of the roots",
    "repalgebra.fuse:_autocast_on": "one decision: autocast on for an input's device",
    "repalgebra.frontend.fx_trace:record_run": "one choice: the real run on copies of the example or on the caller's own",
    "repalgebra.backend.onnx_fallback:differs_at_other_values": "two decisions: the values are varied, and compared only where the "
    "module's Python reads what it reads at the check's own (which floats vary is _values_varied's, with its mutant)",
    "repalgebra.backend.onnx_fallback:_values_varied": "one choice: which inputs vary (ids and masks by _varied's mutants, "
    "halved floats by its own)",
    "repalgebra.backend.onnx:_elu": "the native ops' choice is checked by onnxruntime's own kernels; the mutant drops CELU's input scale",
    "repalgebra.backend.torch:_elu": "one choice: F.elu, or ATen's elu with a scale and an input scale",
    "repalgebra.backend.torch:_add_const": "one choice besides the sign: how the constant is held (parameter or buffer)",
    "repalgebra.frontend.calls:held_value": "one choice: a held constant viewed as complex or as it is held",
    "repalgebra.fuse:computes_narrower": "two decisions a test reaches: whether the model cast to float64 computes in a "
    "narrower dtype (one that fails to run in float64 counts as one), and its complex buffers cast to complex128",
    "repalgebra.verify:_prepared": "one decision a test reaches: a copy cast for verify keeps its complex buffers complex",
    "repalgebra.frontend.aten_handlers:_one_number": "one decision and one number: a tensor of one number made, and which number",
    "repalgebra.frontend.handlers_functions:_f_mul": "one decision added to it a test reaches alone: a constant expanded to "
    "what it multiplies taken for the constant (the rest is older than the stage's mutants)",
    "repalgebra.frontend.handlers_functions:_f_expand": "one decision added to it a test reaches alone: expand_as of a "
    "constant made an op (the rest is older than the stage's mutants)",
    "repalgebra.backend.onnx_fallback:_floor_divide": "one formula: the quotient floored",
    "repalgebra.backend.onnx_fallback:_floor_divide_reflected": "one formula: the number divided by the tensor, floored",
    "repalgebra.backend.onnx_fallback:_noted": "one decision: which regions are run again on varied inputs (their "
    "comparison is steered_by_values')",
    "repalgebra.backend.onnx:_free_at_batch_one": "one decision: an output axis declared free where batch 1 changes it",
    "repalgebra.frontend.handlers_functions:_unexpanded": "two decisions: the expand reads its sizes from what it multiplies, axis by axis",
    "repalgebra.backend.onnx_fallback:_fake_quantize": "one formula: its slips that fit every shape are the division and the dtype",
    "repalgebra.fuse:_batch_norms": "one list: the BatchNorm modules left",
    "repalgebra.module_copy:eval_copy": "one decision: eval() called on the copy or not",
    "repalgebra.frontend.calls:op_named": "two choices: an op overload or an op packet pickled by name (anything else as it is)",
    "repalgebra.untouched:_hooks_may_write": "one decision a test reaches: a hook of the user's may write the model",
    "repalgebra.fuse:_run": "one choice: the mode its copies are made and the call runs in",
    "repalgebra.frontend.shapes:_same_shape_reader": "one decision changes what runs (the reader keeps the size); the others "
    "only choose where a read sits, which a fold then follows or not",
    "repalgebra.frontend.shapes:_reads_shape_only": "one list of ops whose inputs after the first are read for their sizes",
    "repalgebra.frontend.handlers_modules:_m_linear": "no attributes: the bias is its one choice",
    "repalgebra.backend.torch:_linear": "no attributes: the bias is its one choice",
    "repalgebra.backend.onnx:_linear": "no attributes: the bias is its one choice",
    "repalgebra.backend.torch:_gelu": "one attribute, approximate, both ways",
    "repalgebra.frontend.handlers_functions:_f_transpose": "two axes: one mutant each",
    "repalgebra.frontend.handlers_functions:_f_permute": "one attribute, the permutation",
    "repalgebra.frontend.handlers_functions:_f_flatten": "the start axis (the end is -1 in every model)",
    "repalgebra.frontend.aten_handlers:_permute": "one attribute, the permutation",
    "repalgebra.frontend.aten_handlers:_transpose": "two axes, the mutant drops one",
    "repalgebra.backend.torch:_permute": "one attribute, the permutation",
    "repalgebra.backend.torch:_transpose": "two axes, the mutant drops one",
    "repalgebra.backend.torch:_flatten": "the start axis (the end is -1 in every model)",
    "repalgebra.backend.torch:_same_module": "one check, the configuration (the weights are _equal's; a conv's or linear's bias is a parameter or none)",
    "repalgebra.backend.torch:_equal": "one comparison of tensors, by value (their dtypes and shapes differ only where the configuration does)",
    "repalgebra.backend.onnx:_permute": "one attribute, the permutation",
    "repalgebra.backend.onnx:_transpose": "two axes, the mutant drops one",
    "repalgebra.frontend.height_one:_sinks": "one decision whose other conditions are conservative: a lift is exact "
    "wherever it is made, and broadcasting commutes with one (the mutant keeps a BN beside the convs in 1-D)",
    "repalgebra.frontend.height_one:_height_one": "one property, height one by how a value was made; the mutant makes it "
    "the example's shape, the bug that matters",
    "repalgebra.frontend.structured:restructured": "two choices, which argument and which item each tensor is read from",
    "repalgebra.frontend.structured:_flat_graph": "one choice, which tensor each item becomes (a graph read otherwise is refused)",
    "repalgebra.frontend.structured:structure_mismatch": "one comparison, the call's structure with the example's, its "
    "leaves tensors",
    "repalgebra.frontend.structured:structure_text": "two decisions a test reaches: a leaf named by its kind, and a container "
    "of tensors told from one holding others (the rest is wording)",
    "repalgebra.frontend.structured:_access": "one choice per kind of step: an item, or a named tuple's field",
    "repalgebra.frontend.builder:_computed_dtype": "one decision, whose dtype counts as a constant: a computed value's, not an input's",
    "repalgebra.fuse:_guard_pinned": "one decision, which dtypes a tensor a cast leaves lets the part run in",
    "repalgebra.backend.torch:_share_key": "one decision, whether two calls' paths agree (their weights are _same_module's)",
    "repalgebra.backend.torch:_hint": "one decision, whether a hint keeps the paths a fold merged",
    "repalgebra.match:merged_source": "the common prefix (reports' wording) and one decision, which paths a fold keeps",
    "repalgebra.fuse:_refuse_none_for_a_tensor": "two decisions, whether a call passes None where the example gave a "
    "tensor, and whether it looks inside containers",
    "repalgebra.fuse:_follow_requires_grad": "one decision, whether a module folded from others requires gradients",
    "repalgebra.frontend.handlers_functions:_holds": "two bounds, the dtype's largest number and its smallest normal one",
    "repalgebra.fuse:_promoted_after_a_cast": "one decision, whether a cast to half precision gives the outputs other dtypes",
    "repalgebra.frontend.builder:pinned_tensor": "one decision, which tensors a cast is tried on (_promoted_after_a_cast decides; its filters of buffers and 0-d tensors only save that run)",
    "repalgebra.backend.onnx_fallback:capture_for_export": "one decision, what a failure other than the front end's own does (the model exported whole)",
    "repalgebra.backend.onnx_fallback:_outputs_differ": "the comparison itself (verify's first_difference has its own mutants); two decisions added, how many integer entries may flip and whether dtypes agree",
    "repalgebra.fuse:_other_values": "one decision, values other than the example's (their draw is a seeded normal)",
    "repalgebra.fuse:_own_hooks": "one decision, whether a hook is the user's (a guard of a model fused before is not)",
    "repalgebra.fuse:_calls_difference": "a comparison (verify's first_difference has its own mutants); one decision added, a copy that fails differs",
    "repalgebra.frontend.builder:constant_attrs": "two decisions, whether the constant is marked plain and whether it is the model's own",
    "repalgebra.frontend.builder:_compile": "one decision, whether a constant a call reads is held as the model holds it",
    "repalgebra.backend.torch:_constant": "one decision, a buffer or a plain attribute",
    "repalgebra.frontend.calls:constant_call": "one decision, a buffer or a plain attribute",
    "repalgebra.backend.onnx:_concat": "one decision, the inputs cast to the output's dtype (the axis is the ONNX lowerings' test's)",
    "repalgebra.backend.onnx:_window_reduce": "the windows are adaptive_windows' (three mutants of its own); one decision, the axis reduced",
    "repalgebra.backend.onnx_fallback:_col2im": "the gather of fold_sources' places (three mutants of its own) and their sum",
    "repalgebra.backend.onnx_fallback:_called_by_torch": "one decision, whose code a bool() of a tensor is in: torch's or the model's",
    "repalgebra.backend.onnx:_grown_at": "two choices, which inputs run grown and how far to look; the third, what is declared of them, is graph_to_onnx's",
    "repalgebra.backend.onnx:_batch_axes": "two decisions, both mutated: the batch input is the first whose size an "
    "output follows, an output's axis 0 first",
    "repalgebra.frontend.inplace:_alias_inputs": "a table lookup per call kind; mutated where a view was taken for a new tensor (einsum, +y)",
    "repalgebra.frontend.aten:_returned_input": "two table rows, eval dropout (its tests predate this target) and a one-operand einsum",
    "repalgebra.frontend.state_keys:equal_values": "one decision, whether NaN equals NaN (torch.equal does the rest)",
    "repalgebra.frontend.outside_reads:tests_classes": "one reading of a class's code, whether it asks classes (the "
    "walk over its functions is _chains')",
    "repalgebra.fuse:_classes_asked": "one walk up the path, each module asked with tests_classes",
    "repalgebra.frontend.args:same_pads": "one arithmetic of torch's padding='same', which side takes the odd row",
    "repalgebra.backend.onnx_fallback:_adaptive_pool": "the windows are adaptive_windows' (three mutants of its own); two decisions, the axes pooled and the sizes asked",
    "repalgebra.backend.onnx_fallback:_window_mean": "one reduction",
    "repalgebra.backend.onnx_fallback:_window_max": "one reduction",
    "repalgebra.frontend.outside_reads:_chains": "a cache of _read_chains (mutated there), and one decision: a view read as its class",
    "repalgebra.verify:_wide": "one decision, a complex tensor as its two parts",
    "repalgebra.verify:_kinds": "one comparison of two kinds (_kind's branches are torch's own tests)",
    "repalgebra.frontend.fx_trace:size_key": "two decisions, whether the value is a number of sizes and whether it is read",
    "repalgebra.frontend.fx_trace:forward_of_its_own": "one decision, whether the instance's forward runs",
    "repalgebra.backend.onnx:_check_graph_shapes": "one comparison, the shapes asked for against those traced",
    "repalgebra.module_copy:_reference_to_copy": "one decision, the referent's copy or the reference as it is",
    "repalgebra.frontend.state_keys:same_key": "one comparison of two snapshots' entries, tensors through _Tensor.same",
    "repalgebra.frontend.state_keys:attribute_key": "two ways into what an attribute holds, containers and plain objects, one mutant each",
    "repalgebra.frontend.handlers_functions:_f_to_dtype_of": "one decision, whether the value's dtype may be the caller's (the written cast has mutants of its own)",
    "repalgebra.backend.onnx:_interpolate": "the nearest modes' one decision (the Resize of the others is not mutated, as the module says)",
    "repalgebra.backend.onnx:_nearest": "two choices, the dtype of the picks and how the axes' picks combine; the gather itself is checked bit for bit",
    "repalgebra.backend.onnx:_scale_for": "one loop: whether it moves the scale, and which products it asks to agree",
    "repalgebra.backend.torch:_unaliased": "one decision, to copy an output whose sources meet an input or an earlier output's",
    "repalgebra.backend.torch:_viewed": "two ways a value may be a view: through the view ops, and through a call kept whole",
    "repalgebra.backend.onnx:_unfold": "two choices besides torch's own picks: the padding and the map the picks are taken on",
    "repalgebra.fuse:_ranks_fit": "one comparison, each input's number of axes with the example's",
    "repalgebra.frontend.calls:_of_rank": "one comparison, the squeeze's number of axes with the example's",
    "repalgebra.frontend.handlers_functions:_f_squeeze": "one decision beside its reshape, what a squeeze of an axis not 1 is",
    "repalgebra.frontend.builder:_squeezed": "one decision, which carried calls are squeezes whose rank is checked",
    "repalgebra.frontend.ranks:shape_length": "one choice beside the rank itself, how many axes a slice of a shape keeps "
    "(a wrong rank read elsewhere takes another branch than the model, which the check against it at the example catches)",
    "repalgebra.fuse:_batches_fit": "one comparison beside the sizes, the batch with the smallest one the capture holds at",
    "repalgebra.backend.onnx:_holds_at_batch_one": "one check, the graph against the model at batch 1",
    "repalgebra.backend.onnx_fallback:export_regions": "one decision added to it, which runs an export traced at another batch is checked at",
    "repalgebra.frontend.mode_flags:code_namespaces": "two decisions, whose code is watched: the globals of the model's "
    "classes' functions, and torch's layers (the mutants take sys.modules[cls.__module__], and drop the layers)",
    "repalgebra.fuse:follows_default_dtype": "one comparison, of runs under two default dtypes: the mutants skip it, "
    "and make both runs under the same default",
    "repalgebra.fuse:_identical": "one equality of outputs (its tensors' dtypes, shapes and elements); the mutant finds "
    "none equal",
    "repalgebra.frontend.mode_flags:_bound_on_classes": "one filter of the classes' attributes: the mutants drop it, and "
    "leave a staticmethod's function unwrapped",
    "repalgebra.frontend.mode_flags:mode_flags_refused": "one decision added to it, a refusal the model's code swallowed "
    "raised again (its refusal itself is killed through _stand_in's mutants)",
    "repalgebra.fuse:_fixed_casts": "one list, the casts to a floating dtype in a capture (the guard's own mutants cover what follows)",
    "repalgebra.fuse:_named_tensors": "two decisions: every module's tensors (a tied one under each module holding it), each module once",
    "repalgebra.backend.torch:to_module": "the lowering's driver: its lowerings have mutants of their own; one decision, how an output "
    "structure fx cannot write is rebuilt",
    "repalgebra.frontend.fx_trace:runs_torch_code": "one decision, which modules run on meta tensors to answer what the trace reads",
    "repalgebra.fuse:_writes_into": "one comparison, the arguments before and after a run",
    "repalgebra.backend.onnx_fallback:find_regions": "one decision added to it, which values a region gives out "
    "(the regions themselves are covered by the fallback's tests)",
    "repalgebra.frontend.pure:is_pure": "a table lookup per kind of call; one decision added to it, the attributes that "
    "are functions of a tensor",
    "repalgebra.fuse:_made_kernels": "one decision, whether a capture made kernels once and holds nothing taken as at the example",
    "repalgebra.frontend.fx_trace:_of_a_dtype": "one decision, whether a number is read from a dtype",
    "repalgebra.frontend.fx_trace:_weight_hooks_only": "one decision added to it, a BatchNorm's pruning hooks",
    "repalgebra.frontend.aten_handlers:_repeat": "one decision added to it, a count of the batch on axes of size 1",
    "repalgebra.frontend.builder:_nonempty_from": "one walk, over the ops that keep a value full; its use has its own mutant",
    "repalgebra.frontend.builder:_deciding": "one decision, whether 0-dim inputs decide a dtype",
    "repalgebra.frontend.builder:_data_inputs": "one decision that counts, which calls keep their tensor's dtype; the rest "
    "refuse to answer (a call taken to follow the model), covered through _made_in_its_dtype",
    "repalgebra.fuse:_written_dtype": "one reading, the dtype a cast or a factory writes",
    "repalgebra.frontend.mode_flags:_refusing": "one decision added to it, noting a flag read in place of refusing it "
    "(its refusal is killed through _stand_in's mutants)",
    "repalgebra.backend.onnx:_log_sigmoid": "one formula, -Softplus(-x); the mutant writes the one that overflows",
    "repalgebra.rewrite:cast_params": "one job (the dtype), covered with rewrite's own mutants",
    "repalgebra.rewrite:_rewrite": "the engine's loop when rewrite wraps it: counted with the engine",
    "repalgebra.backend.onnx:_attention": "two decisions added to it, which keys are hidden (bool and float masks); the "
    "rest of its lowering is the vocabulary test's",
    "repalgebra.backend.onnx:graph_to_onnx": "one decision added to it, an output whose batch axes are none",
    "repalgebra.backend.onnx:export_onnx": "two decisions added to it, a graph traced at batch 1 run at another batch, "
    "and the model's globals its runs wrote put back",
    "repalgebra.frontend.outside_reads:_checkpointing": "two decisions: a local of that name is no global, and the name "
    "resolved in the code's globals must be torch's or timm's function",
    "repalgebra.frontend.outside_reads:_dotted": "one decision: attributes loaded as methods are named too (the name "
    "is resolved, or matched with self, by its callers)",
    "repalgebra.frontend.outside_reads:_in_method": "two decisions a test reaches: the parameter receiving the module "
    "(after self), and plain functions only (a static method takes no self); its check that the object is the module "
    "itself keeps a local's method of the same name handed on",
    "repalgebra.module_copy:keep_registries": "one decision: the registries the replaced child alone held are held by "
    "its replacement (those the replacement holds itself need nothing)",
    "repalgebra.module_copy:_registries_of": "one decision: every registry of hooks counts, its flag registries too",
    "repalgebra.frontend.module_globals:_written": "two decisions: a name rebound counts, and data whose value changed",
    "repalgebra.frontend.module_globals:_snapshot": "one decision added to the namespaces: the attributes of the classes "
    "the model's code defines are watched too",
    "repalgebra.frontend.module_globals:_bindings": "one decision: dunder names are no data (a warning's __warningregistry__)",
    "repalgebra.frontend.outside_reads:_first_only": "one decision a test reaches: only a metadata read of the first "
    "tensor counts as reading no values (the call shape of next(X.parameters()) is matched as the bytecode is)",
    "repalgebra.frontend.module_globals:_is_data": "two decisions: containers are the model's data, and of objects only "
    "those of classes its code defines (a logger's cache of its levels is no write)",
    "repalgebra.frontend.fx_trace:trace_fx": "one decision added to it: the trace is made with the model's globals watched",
    "repalgebra.frontend.aten:_export": "one decision added to it: the capture is made with the model's globals watched "
    "(its other steps predate the stage's mutants, and are covered by the capture's tests)",
    "repalgebra.fuse:fuse": "one decision added to it: what its runs of the model wrote into the model's globals is put "
    "back (the rest is _fuse's)",
    "repalgebra.backend.onnx:_clamp": "two choices, Max for a lower bound alone and Min for an upper one (the mutants write "
    "Clip, and Min for a lower bound)",
    "repalgebra.backend.onnx:_number": "one job, a number in float64 before its cast to the file's dtype",
    "repalgebra.frontend.wrappers:without_compiled_forward": "one step, a shallow copy of the model; the decisions it "
    "took are _compiled_method's and _run_plain's, shared with the parts",
    "repalgebra.frontend.wrappers:_compiled_method": "one decision, a forward set on the instance by torch.compile",
    "repalgebra.frontend.wrappers:_run_plain": "one decision, the class's forward or another method bound to the copy",
    "repalgebra.frontend.wrappers:wrapped": "one decision added to it, a wrapper with hooks of its own is no wrapper",
    "repalgebra.frontend.wrappers:_plain": "one comparison, the subclass's forward and __call__ with the wrapper's",
    "repalgebra.frontend.inputs:_loses_hooks": "one comparison, a copy's hooks with the module's",
    "repalgebra.frontend.shapes:_rerouted": "two decisions added to it, a value read for its data by Linears only lets its "
    "shape reads move (which only changes what is read, not what is computed, elsewhere), and a size divided keeps its "
    "divisor where its read moves",
    "repalgebra.frontend.shapes:size_base": "a walk whose one number, a conv's padding less its reach, has a mutant of "
    "its sign (its kernel's axis is _conv_axis's), and a 1-D lift's axis",
    "repalgebra.frontend.shapes:_conv_axis": "two numbers a test tells apart: the kernel's size along the axis, and "
    "a 3-D conv's padding on both sides",
    "repalgebra.frontend.shapes:size_source": "two decisions added to it, norms keep their input's shape, and a reshape's "
    "axis of one size read is that read",
    "repalgebra.backend.onnx_fallback:_copy_into": "one job, the write as a slice assignment: the mutants leave it to "
    "the exporter, and trace it as a new tensor",
    "repalgebra.frontend.handlers_functions:_f_addmm": "one decision added to it, beta=0 goes to _product_at_beta_0 "
    "(GPT-2's Conv1D as a Linear is older than the mutants of the stage)",
    "repalgebra.frontend.handlers_functions:_f_addbmm": "one decision, only beta=0 is mapped; the product is "
    "_product_at_beta_0's",
    "repalgebra.frontend.aten_builder:_uninitialised": "one decision, which results hold values no one wrote: the "
    "mutants fold every empty, and a buffer's new_empty",
    "repalgebra.frontend.aten_builder:_refuse_empty": "one job, the refusal; the mutant lets the read through",
    "repalgebra.frontend.aten_builder:_unread": "one decision, which argument a call overwrites without reading: the "
    "mutants read fill's self, and a self passed by position (beta=0 is _add_product's, which reads no input there)",
    "repalgebra.frontend.ranks:answered_on_meta": "one decision, which reads of a tensor its meta value answers as the "
    "example does: the mutants let every read, or a layout and a pointer read, through",
    "repalgebra.fuse:_at_offset": "one job, a copy one element into its storage: the mutant leaves it at offset 0",
    "repalgebra.fuse:_needing_grad": "one job, a copy computed from a leaf that requires gradients: the mutant gives the "
    "leaf itself (no grad_fn)",
    "repalgebra.frontend.outside_reads:names_reached": "one walk along a chain to the child it names; the mutants "
    "record the name on the module whose code reads it, or on itself only",
    "repalgebra.frontend.outside_reads:named_by_attributes": "one walk over plain attributes and their containers; the "
    "mutants leave containers unopened, or record the module itself",
    "repalgebra.frontend.state:same_paths": "one walk pairing modules by path; the mutant pairs the root alone",
    "repalgebra.frontend.handlers_functions:_indices_read": "one walk over a split's readers; the mutant takes every "
    "index read for the first",
    "repalgebra.frontend.ranks:input_read": "one job, an input's device (or how it was made) read on the example: the mutant reads it on the "
    "meta tensor (a computed value's device is not read at all)",
    "repalgebra.frontend.aten_handlers:_times": "one job, a product scaled by a number; the mutant leaves it unscaled",
    "repalgebra.frontend.handlers_functions:_from_a_written_cast": "one walk along first inputs to a written cast: the "
    "mutants stop it at once and end it one step early",
    "repalgebra.module_copy:in_packages": "one test, a module name that is a package or inside it: the mutant takes a "
    "name that only begins so (torch_geometric for torch); its callers' mutants pass everything or nothing",
    "repalgebra.frontend.inplace:_own_code": "one decision split off _for_its_effects: the model's own code, not a "
    "library's (its mutant kills through the calls made for their effects)",
    "repalgebra.frontend.inplace:reads_after_calls": "two decisions: reads after the call rerouted, and the values "
    "sharing the given tensors' storage among them",
    "repalgebra.frontend.state:_other_integers": "one decision added to halving: integers that halve to themselves "
    "(zeros) are one up (its mutant leaves them as they are); the halving itself is killed through _filled_from_input's "
    "state-integers-never-other-values",
    "repalgebra.frontend.inplace:_state_given": "two decisions: a parameter given to the call read by another node "
    "refused, and one given through a view among them",
    "repalgebra.frontend.inplace:_only_to": "one decision: the call itself (and views only it reads) is no other reader",
    "repalgebra.backend.onnx:_after_call": "one decision: the tensor read after the call is the tensor, not the "
    "call's result",
    "repalgebra.backend.onnx_fallback:probing": "two decisions: what a probe run prints is held, and written through "
    "where the run returns",
    "repalgebra.backend.onnx:_computes": "one decision added to it a test reaches alone: the model's probe run holds "
    "what it prints (the comparison itself is older than the stage's mutants)",
    "repalgebra.frontend.outside_reads:_items": "two halves, each mutated: a container method dropped (items, values) "
    "and the item step added",
    "repalgebra.frontend.outside_reads:_stored_in": "one decision left since loops went to _loop_targets (review R5): "
    "a plain store (STORE_FAST or STORE_DEREF) of a chain",
    "repalgebra.frontend.inplace:is_inplace": "one decision added to it: a __setitem__ method call (on a constant fx "
    "holds) is a write (the older branches predate the stage's mutants)",
    "repalgebra.frontend.inplace:_check_constants_read": "one decision: a constant's version moved after a read refuses",
    "repalgebra.frontend.outside_reads:_in_helper": "two decisions: whether the helper is read, and which parameter "
    "receives the module",
    "repalgebra.frontend.inplace:_made_in_forward": "one decision a test reaches alone: a constant the trace did not see "
    "made (a module-level tensor, a slice of a buffer) is not one forward made",
    "repalgebra.frontend.inplace:_model_storages": "two decisions: a buffer counts among the model's tensors, the constants "
    "fx set on the model do not",
    "repalgebra.frontend.inplace:_one_node_per_constant": "one decision: the get_attr nodes of a written constant after its "
    "first are merged into it",
    "repalgebra.frontend.fx_trace:_weights_only_value": "two decisions added to it: a constant's traced item assignments "
    "are applied before a branch on the weights reads it, outside the refusal of calls at once on written tensors (the "
    "older branches predate the stage's mutants)",
    "repalgebra.frontend.fx_trace:_writes_real_tensor": "one decision a test reaches alone: an item assignment into a "
    "tensor (not a traced value) is a write",
    "repalgebra.frontend.fx_trace:_metadata": "one decision: a read of metadata (a property's getter or a method) is not "
    "a computation with the values",
    "repalgebra.frontend.fx_trace:_tensors_in": "one decision: the tensors among a call's arguments",
}


def test_stage_mutants_are_grouped_by_stage_and_unique():
    assert {m.rule for m in STAGE} == set(STAGES)
    ids = [m.id for m in M.all_mutants()]
    assert len(ids) == len(set(ids)), "mutant ids must be unique"
    assert {stage_of(m.rule) for m in M.all_mutants()} == {"front end", "engine", "rules", "torch back end", "onnx back end"}


def test_the_five_bugs_of_issue_15_are_mutants():
    ids = {m.id for m in STAGE}
    assert set(ISSUE_15) <= ids


def test_every_handler_and_lowering_has_three_mutants_or_a_reason():
    counts = Counter(m.target for m in STAGE if m.rule != "engine")
    few = {t: n for t, n in counts.items() if n < 3 and t not in FEW}
    assert not few, few
    assert set(FEW) <= set(counts) | {"repalgebra.rewrite:cast_params", "repalgebra.rewrite:_rewrite"}


def test_equivalent_mutants_exist_and_say_why():
    ids = {m.id for m in M.all_mutants()}
    for mid, why in EQUIVALENT.items():
        assert mid in ids and len(why) > 40, (mid, why)


@pytest.mark.parametrize("m", STAGE, ids=lambda m: m.id)
def test_stage_mutant_applies_changes_the_code_and_is_undone(m):
    module_name, fn_name = m.target.split(":")
    fn = inspect.unwrap(getattr(importlib.import_module(module_name), fn_name))
    before = fn.__code__
    code = M.mutated_code(m)
    assert (code.co_code, code.co_consts, code.co_names) != (before.co_code, before.co_consts, before.co_names), \
        "the mutant changes nothing"  # (the names too: x.mean(...) as x.sum(...) differs in co_names only)
    with M.applied(m):
        assert fn.__code__ is not before
    assert fn.__code__ is before
    assert M.tests_for(m) and all((ROOT / t.split("::")[0]).is_file() for t in M.tests_for(m))


def test_report_prints_a_score_per_stage():
    ms = [M.select(names=[i])[0] for i in ("bn_fold/bias-unscaled", *ISSUE_15)]
    results = {m.id: M.Result(m.id, "killed", 0.1, "t") for m in ms}
    results[ISSUE_15[0]] = M.Result(ISSUE_15[0], "survived", 0.1, "all tests passed")
    report = M.MutationReport(ms, results, [M.Result("baseline: x", "passed", 0.1)], 1.0, 2)
    text = report.table()
    for line in ("front end:       1/2 killed", "rules:           1/1 killed", "torch back end:  1/1 killed", "onnx back end:   2/2 killed"):
        assert line in text, text
    assert report.unexplained() == [ISSUE_15[0]] and not report.ok
