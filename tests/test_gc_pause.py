"""repalgebra.gc_pause.frozen_gc: objects alive on entry are frozen for the block, and only when nothing else froze any."""

from __future__ import annotations

import gc
import weakref

from repalgebra.gc_pause import ALLOCATIONS_PER_ITEM, FREEZE_FROM, frozen_gc


def test_freezes_for_the_block_and_unfreezes_after():
    assert gc.get_freeze_count() == 0
    with frozen_gc():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_unfreezes_after_an_error():
    try:
        with frozen_gc():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.get_freeze_count() == 0


def test_leaves_a_process_that_froze_objects_itself_alone():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with frozen_gc():
            pass
        assert gc.get_freeze_count() == frozen  # its frozen objects are still frozen
    finally:
        gc.unfreeze()


def test_garbage_made_in_the_block_is_still_collected():
    class Cycle:
        pass

    with frozen_gc():
        a = Cycle()
        a.me = a
        ref = weakref.ref(a)
        del a
        gc.collect()
        assert ref() is None


def test_a_small_graph_is_not_frozen():
    """Below FREEZE_FROM nodes it does nothing (not even ask the collector, which walks every object)."""
    with frozen_gc(FREEZE_FROM - 1):
        assert gc.get_freeze_count() == 0


def test_full_collections_are_spaced_with_the_size_and_the_thresholds_restored():
    """With the old objects frozen, the collector's survivor rule no longer spaces full collections: the block
    scales the third threshold with ``size`` (one full collection per ~ALLOCATIONS_PER_ITEM * size allocations)."""
    before = gc.get_threshold()
    size = 100 * FREEZE_FROM
    with frozen_gc(size):
        t0, t1, t2 = gc.get_threshold()
        assert (t0, t1) == before[:2]
        assert t0 * t1 * t2 >= ALLOCATIONS_PER_ITEM * size - t0 * t1
    assert gc.get_threshold() == before
    with frozen_gc(FREEZE_FROM - 1):
        assert gc.get_threshold() == before
