"""The semantic cache's index: questions by meaning, to find an earlier one close to a new one.

Questions are kept as unit vectors (their embeddings, normalised), one matrix per context (the
hash of everything but the last user message), so a lookup compares only questions that share
the system prompt, earlier turns, model and parameters: one matrix-vector product in numpy's
BLAS, over that context's rows alone. The index holds at most `max_entries` questions; the
oldest go first, each leaving its place to its context's last row (so a matrix never has holes).

A large context is searched on a worker thread (numpy's BLAS lets the GIL go), so a lookup over
100,000 questions (16 ms here, bench/cache.py) never stalls the event loop; the winner is checked
again on the loop, since rows may have moved meanwhile.

It lives in this process's memory and starts empty: a hit it points to is still looked up in
the store, so an entry the store has let go is a miss here too (and leaves the index).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


def unit(values: Sequence[float]) -> Vector | None:
    """An embedding as a unit vector; None for one that is empty, zero or not finite."""
    vector = np.asarray(values, dtype=np.float32)
    norm = float(np.linalg.norm(vector)) if vector.ndim == 1 and vector.size else 0.0
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return vector / norm


@dataclass
class _Context:
    vectors: Vector
    keys: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)   # key: its row

    @property
    def count(self) -> int:
        return len(self.keys)


class SemanticIndex:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._contexts: dict[str, _Context] = {}
        self._order: OrderedDict[str, str] = OrderedDict()   # entry key: its context, oldest first
        self.dimensions: int | None = None

    def __len__(self) -> int:
        return len(self._order)

    def add(self, context: str, key: str, vector: Vector) -> None:
        if self.dimensions is None:
            self.dimensions = vector.shape[0]
        if vector.shape[0] != self.dimensions:
            return   # another embedding model's vector: not comparable with the rest
        if key in self._order:
            self.remove(key)
        while len(self._order) >= self.max_entries:
            self.remove(next(iter(self._order)))
        found = self._contexts.get(context)
        if found is None:
            found = self._contexts[context] = _Context(np.empty((8, self.dimensions), dtype=np.float32))
        if found.count == found.vectors.shape[0]:
            grown = np.empty((found.count * 2, self.dimensions), dtype=np.float32)
            grown[:found.count] = found.vectors
            found.vectors = grown
        found.vectors[found.count] = vector
        found.rows[key] = found.count
        found.keys.append(key)
        self._order[key] = context

    def nearest(self, context: str, vector: Vector, threshold: float) -> tuple[str, float] | None:
        """The key of the closest question in `context` with a cosine similarity of at least
        `threshold`, and that similarity; None if none is that close."""
        found = self._contexts.get(context)
        if found is None or not found.count or vector.shape[0] != self.dimensions:
            return None
        similarities = found.vectors[:found.count] @ vector
        best = int(np.argmax(similarities))
        score = float(similarities[best])
        return (found.keys[best], score) if score >= threshold else None

    def rows(self, context: str) -> int:
        found = self._contexts.get(context)
        return found.count if found is not None else 0

    def score(self, context: str, key: str, vector: Vector) -> float | None:
        """The cosine similarity of `key`'s question to `vector`, if the index still holds it."""
        found = self._contexts.get(context)
        row = found.rows.get(key) if found is not None else None
        if found is None or row is None:
            return None
        return float(found.vectors[row] @ vector)

    def remove(self, key: str) -> None:
        context = self._order.pop(key, None)
        if context is None:
            return
        found = self._contexts[context]
        row, last = found.rows.pop(key), found.count - 1
        if row != last:   # the last row takes its place
            found.vectors[row] = found.vectors[last]
            found.keys[row] = found.keys[last]
            found.rows[found.keys[row]] = row
        found.keys.pop()
        if not found.keys:
            del self._contexts[context]

    def clear(self) -> None:
        self._contexts.clear()
        self._order.clear()

    @property
    def bytes(self) -> int:
        return sum(c.vectors.nbytes for c in self._contexts.values())
