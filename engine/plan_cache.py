"""The plan cache: values derived from a graph (pass plans, compiled programs, partitions,
costs), kept per graph instance in one process-wide LRU bounded by entries and estimated bytes.

Each layer owns its derived values through a typed `DerivedCache` (its name, its key type, its
value type) over that one budget, so the server bounds them all with one setting. Derived values
hold node positions, which belong to one Graph instance (two graphs with the same fingerprint
may order their nodes differently), so keys name the instance by its serial number, which is
never reused (`RequestKey.graph`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from types import FunctionType, MappingProxyType
from typing import Any, Generic, TypeVar

import numpy as np

from graphgrad.engine.lru import LRU, CacheStats
from graphgrad.engine.ops import Op, TensorType

DEFAULT_ENTRIES = 4096
DEFAULT_BYTES = 256 << 20
_SAMPLE = 16  # large containers are sized from this many evenly spaced elements
_SHARED = (int, str, type(None))  # bool is an int
_SCALARS = (float, bytes)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class PlanKey:
    cache: str  # the DerivedCache's name
    key: Hashable
    # Worked out once: a key is hashed on every lookup of a request's path (a server's Run
    # looks up several); never pickled (a string's hash differs from process to process).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.cache, self.key)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type, tuple[str, Hashable]]:
        return PlanKey, (self.cache, self.key)


@dataclass(frozen=True, slots=True)
class RequestKey:
    """What a request's derived values depend on: the graph instance, the outputs asked for,
    the gradients asked for and the outputs seeded."""

    graph: int  # Graph.serial
    outputs: tuple[str, ...]
    wrt: tuple[str, ...]
    seeded: tuple[str, ...]
    _hash: int = field(init=False, repr=False, compare=False)  # as PlanKey's

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.graph, self.outputs, self.wrt, self.seeded)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(
        self,
    ) -> tuple[type, tuple[int, tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
        return RequestKey, (self.graph, self.outputs, self.wrt, self.seeded)


def approx_bytes(obj: Any) -> int:
    """Estimated memory of `obj` and what it holds. Linear in the value at worst; containers
    of many elements are sized from a sample. Functions, ops and node attributes belong to
    the graph and are not counted."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes + 112
    if isinstance(obj, _SHARED):
        return 0  # node positions and names: the graph's own objects, referenced
    if isinstance(obj, _SCALARS):
        return sys.getsizeof(obj)
    if isinstance(obj, FunctionType | MappingProxyType | type | Op | TensorType):
        return 0  # the graph's own: ops, node attributes, types
    if hasattr(obj, "approx_bytes") and not isinstance(obj, type):
        return int(obj.approx_bytes())  # compiled programs, schedules: they know their size
    if hasattr(obj, "ByteSize"):  # a protobuf message (e.g. a graph's wire form)
        return int(obj.ByteSize()) + 64
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + _items_bytes([*obj.keys()]) + _items_bytes([*obj.values()])
    if isinstance(obj, tuple | list | set | frozenset):
        return sys.getsizeof(obj) + _items_bytes(obj if isinstance(obj, tuple | list) else [*obj])
    slots = [s for t in type(obj).__mro__ for s in getattr(t, "__slots__", ())]
    if not slots:
        return sys.getsizeof(obj)  # counted shallowly
    return sys.getsizeof(obj) + sum(approx_bytes(getattr(obj, s, None)) for s in slots)


def _items_bytes(items: tuple[Any, ...] | list[Any]) -> int:
    n = len(items)
    if n == 0:
        return 0
    if n <= 2 * _SAMPLE:
        return sum(approx_bytes(x) for x in items)
    sample = [items[k * n // _SAMPLE] for k in range(_SAMPLE)]
    return sum(approx_bytes(x) for x in sample) * n // _SAMPLE


class PlanCache:
    """The owner of derived values: one per process (`PLANS`), resized by the server."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES, max_bytes: int = DEFAULT_BYTES):
        self._lru: LRU[PlanKey, Any] = LRU(max_entries, max_bytes, approx_bytes)

    def configure(self, max_entries: int, max_bytes: int) -> None:
        """New bounds (what was cached is dropped)."""
        self._lru = LRU(max_entries, max_bytes, approx_bytes)

    def get_or_make(self, key: PlanKey, make: Callable[[], Any]) -> Any:
        return self._lru.get_or_make(key, make)

    def get(self, key: PlanKey) -> Any:
        """The value held under `key` (now the most recently used), or None."""
        return self._lru.get(key)

    def stats(self) -> CacheStats:
        return self._lru.stats()


PLANS = PlanCache()


class DerivedCache(Generic[K, V]):
    """One layer's derived values, typed, within the plan cache's bounds (`PLANS`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        value: V = PLANS.get_or_make(PlanKey(self.name, key), make)
        return value

    def get(self, key: K) -> V | None:
        value: V | None = PLANS.get(PlanKey(self.name, key))
        return value
