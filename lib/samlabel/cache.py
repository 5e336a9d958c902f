"""A thread-safe LRU mapping bounded by a total cost: images (bytes), embeddings, interactions."""

import threading
from collections import OrderedDict
from typing import Callable, Hashable


class LRUCache:
    """Thread-safe LRU mapping bounded by a total cost (bytes, or 1 per item)."""

    def __init__(self, capacity: float, cost: Callable[[object], float] = lambda value: 1):
        self.capacity, self.cost = capacity, cost
        self._items: "OrderedDict[Hashable, object]" = OrderedDict()
        self._total = 0.0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                self.misses += 1
                return default
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        with self._lock:
            if key in self._items:
                self._total -= self.cost(self._items.pop(key))
            self._items[key] = value
            self._total += self.cost(value)
            while self._total > self.capacity and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                self._total -= self.cost(evicted)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    @property
    def total(self) -> float:
        """The summed cost: at most the capacity, unless one item alone exceeds it."""
        return self._total

    def __len__(self) -> int:
        return len(self._items)
