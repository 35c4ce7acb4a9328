"""Latency distributions in log-spaced buckets, shared by live aggregates and the ledger's rollups.

The bucket of a value is computed by one function, here, wherever it is counted: in memory as
calls finish, in the SQLite writer's hourly and daily rollups and its one-time back-fill, so
percentiles read from rollups equal those counted live. (PostgreSQL's rollups compute the same
formula in SQL, from _BASE and _FLOOR.)
"""

from __future__ import annotations

import math

_BASE = 1.02
_LOG_BASE = math.log(_BASE)
_FLOOR = 1e-6  # one microsecond: anything below is counted as that


def bucket_index(value: float) -> int:
    return math.floor(math.log(max(value, _FLOOR)) / _LOG_BASE)


class Histogram:
    """Latency distribution in log-spaced buckets: bounded memory, about 1% relative error.

    Percentiles since the epoch would otherwise need every latency kept; at 2% bucket width a
    day or a year of traffic costs the same few hundred integers.
    """

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0

    def add(self, value: float) -> None:
        index = bucket_index(value)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        self.sum += value

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def quantile(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                # the bucket's geometric middle
                return float(_BASE ** (index + 0.5))
        return 0.0  # unreachable: the buckets add up to count

    def summary(self) -> dict[str, float]:
        return {"avg": round(self.mean, 4), "p50": round(self.quantile(0.50), 4),
                "p95": round(self.quantile(0.95), 4), "p99": round(self.quantile(0.99), 4),
                "count": self.count}
