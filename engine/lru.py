"""A bounded, thread-safe cache that drops the least recently used entries.

Bounded by entries and, given a size function, by bytes: an entry larger than the whole byte
budget is not kept (the caller decides whether that is an error, see `fits`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What a cache holds and its bounds (max_bytes 0: bounded by entries only)."""

    entries: int
    bytes: int
    max_entries: int
    max_bytes: int


class LRU(Generic[K, V]):
    def __init__(
        self,
        capacity: int,
        max_bytes: int | None = None,
        size: Callable[[V], int] | None = None,
    ) -> None:
        if capacity < 1 or (max_bytes is not None and max_bytes < 1):
            raise ValueError(f"a cache needs room for an entry, got {capacity} / {max_bytes} bytes")
        if (max_bytes is None) != (size is None):
            raise ValueError("a byte budget and a size function go together")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._size = size
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._items), self._bytes, self.capacity, self.max_bytes or 0)

    def size_of(self, value: V) -> int:
        return self._size(value) if self._size is not None else 0

    def fits(self, value: V) -> bool:
        """Whether `value` alone is within the byte budget (otherwise `put` does not keep it)."""
        return self.max_bytes is None or self.size_of(value) <= self.max_bytes

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def peek(self, key: K) -> V | None:
        """The value under `key` without making it the most recently used, and without the
        lock (one read of the dict, atomic)."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: K, value: V) -> V:
        """Keep `value` under `key`; returns the value held (one already there wins)."""
        size = self.size_of(value)  # outside the lock: sizing may walk the value
        with self._lock:
            held = self._items.get(key)
            if held is not None:
                self._items.move_to_end(key)
                return held[0]
            if self.max_bytes is not None and size > self.max_bytes:
                return value  # larger than the whole budget: handed back, never kept
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self.capacity or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
            return value

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The value under `key`, made (outside the lock: making may be slow) if missing."""
        value = self.get(key)
        return self.put(key, make()) if value is None else value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
