"""What plans keep between calls: :class:`PlanCache`, a bounded least-recently-used cache, and the caches' sizes.

:data:`plan_cache` holds the plans of each structure (exact plans, and sampled plans drawn from an int seed);
each plan and each :class:`~ospo_fast.aggregation.PlanBatch` keeps what it derives once in its own ``cache``.
Inspect them with ``len()``, ``hits`` and ``misses``; empty them with ``clear()``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

from .._checks import check_int

#: Plans kept by :data:`plan_cache` (exact and int-seeded sampled plans, least recently used evicted first).
PLAN_CACHE_SIZE = 4096

#: Entries each plan keeps in its own cache: two host arrays, then a batch and a prepared kernel call per
#: values shape, device and dtype it is aggregated with (a training run sees a few).
PER_PLAN_CACHE_SIZE = 32

#: Device copies each :class:`~ospo_fast.aggregation.PlanBatch` keeps (one per device and dtype).
PER_BATCH_CACHE_SIZE = 8

_V = TypeVar("_V")
_MISSING = object()


class PlanCache:
    """A bounded cache that evicts the least recently used entry: the state plans keep between calls.

    ``get_or_build(key, build)`` returns the value kept under ``key`` (the same object on every hit), or calls
    ``build()``, keeps its result and, past ``maxsize`` entries, drops the entry used longest ago (never all at
    once). ``hits`` and ``misses`` count lookups since creation or the last :meth:`clear` (exactly, from one
    thread). Safe to share between threads: two threads that miss the same key may both build, and both get
    the value kept first.

    Args:
        maxsize: the most entries kept, a positive int.
    """

    __slots__ = ("maxsize", "hits", "misses", "_entries", "_lock")

    def __init__(self, maxsize: int):
        self.maxsize = check_int(maxsize, "maxsize", 1)
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, default=None):
        """The value kept under ``key`` (now the most recently used), or ``default``."""
        # No lock: this is on every aggregation's path, and each OrderedDict call is atomic under the GIL.
        try:
            value = self._entries[key]
            self._entries.move_to_end(key)
        except KeyError:  # absent, or evicted by another thread in between
            self.misses += 1
            return default
        self.hits += 1
        return value

    def put(self, key: Hashable, value: _V) -> _V:
        """Keep ``value`` under ``key`` (replacing any), evicting the least recently used entry past ``maxsize``;
        returns ``value``."""
        with self._lock:
            self._entries[key] = value
            self._mark_used(key)
        return value

    def get_or_build(self, key: Hashable, build: Callable[[], _V]) -> _V:
        """The value kept under ``key``; on a miss, ``build()``'s result, kept."""
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        value = build()  # outside the lock: building a plan can take long, and may use other caches
        with self._lock:
            kept = self._entries.setdefault(key, value)
            self._mark_used(key)
        return kept

    def _mark_used(self, key: Hashable) -> None:
        # The lock is held. Most recently used last; past maxsize the first (used longest ago) goes.
        self._entries.move_to_end(key)
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry and reset ``hits`` and ``misses``."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return f"PlanCache(maxsize={self.maxsize}, size={len(self)}, hits={self.hits}, misses={self.misses})"

    def __reduce__(self):
        # Copied or pickled (with its plan) empty: entries are derived, and hold device tensors and closures.
        return PlanCache, (self.maxsize,)


#: The plans of each structure: :func:`~ospo_fast.plans.exact_plan` keys them by structure,
#: :func:`~ospo_fast.plans.sampled_plan` (int seed, no ``rng``) by (structure, orders, seed, antithetic).
#: ``plan_cache.clear()`` frees them all. The factories look it up here at each call.
plan_cache = PlanCache(PLAN_CACHE_SIZE)
