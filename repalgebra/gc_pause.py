"""Keep Python's cyclic garbage collector off the objects that already exist while a big graph is rewritten.

A graph is thousands of nodes and values in reference cycles (a value knows
its producer, the producer its output), plus their tensors and indexes.  Each
full collection of the cyclic collector visits every one of them, and a
rewrite of N nodes triggers a number of collections that grows with N: the
time of the rewrite grew quadratically (3200 RepVGG blocks: about 40% of the
rewrite was collector time).  :func:`frozen_gc` does two things for the block:

- It moves every object alive on entry to the collector's permanent
  generation (``gc.freeze``) and back on exit (``gc.unfreeze``), so
  collections visit only what the block creates.
- It spaces full collections in proportion to ``size``.  The collector runs
  one every ``t0 * t1 * t2`` container allocations (70,000 by default) once
  the objects promoted since the last one outnumber a quarter of its
  survivors.  With the old objects frozen, the survivors are only the
  block's own, so that condition always held.  A block that makes O(size)
  objects and allocates O(size) times then paid O(size) full collections
  of O(size) objects each: quadratic again (fusing 1600 RepVGG blocks, 13
  full collections, 1.8 of 10.5 CPU s, against 2 at 400 blocks).  With the
  third threshold scaled so that a full collection comes once per about
  ``ALLOCATIONS_PER_ITEM * size`` allocations, their number stays about
  constant and their cost linear.  Young collections are unchanged, so
  short-lived cycles are still freed at once.

Garbage among the frozen objects is collected after the block, as usual.
Where the process has frozen objects already (a server that froze its
start-up state, or an enclosing ``frozen_gc``), it changes nothing.  Below
:data:`FREEZE_FROM` nodes (or modules) it does nothing either: asking the
collector whether anything is frozen walks every object alive (about 10 ms
with torch imported), more than the collections it would save on a small
graph.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


FREEZE_FROM = 1000  # graph nodes (or modules) from which freezing pays
ALLOCATIONS_PER_ITEM = 100  # container allocations between full collections, per node (or module) of the block


@contextlib.contextmanager
def frozen_gc(size: int = FREEZE_FROM) -> Iterator[None]:
    """Freeze the objects alive now for the collector during the block, for a graph of ``size`` nodes or modules,
    and space its full collections in proportion to ``size``; both are undone on exit.

    Nothing happens for a small graph (``size < FREEZE_FROM``) or where something else froze objects.
    """
    mine = size >= FREEZE_FROM and gc.isenabled() and gc.get_freeze_count() == 0
    if mine:
        thresholds = gc.get_threshold()
        t0, t1, t2 = thresholds
        gc.set_threshold(t0, t1, max(t2, ALLOCATIONS_PER_ITEM * size // max(t0 * t1, 1)))
        gc.freeze()
    try:
        yield
    finally:
        if mine:
            gc.unfreeze()
            gc.set_threshold(*thresholds)
