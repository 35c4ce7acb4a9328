"""The books as every process of a deployment sees them.

One process keeps its aggregates in memory, read back from the ledger at start and added to
call by call. When several processes write one ledger (`server.workers` above 1), each one's
memory holds only its own calls: `/stats`, the WhatsApp text, the snapshot and the alerts then
read the epoch's sums and the week's cost from the ledger's rollups, at most every
`server.stats_cache_s`, as of a place in this process's write queue (`LedgerStore.snapshot`), with
the calls booked after it added on top. So every worker answers with the same figures, and a
reset made through any of them (a new epoch in the ledger) is the epoch of all.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .accounting import DAY, Accounting, Aggregates, CostTrend
from .ledger import CallRecord, LedgerError, LedgerStore

log = logging.getLogger("tollgate")

# How long a read waits for this process's rows to be committed before keeping its own figures.
_SNAPSHOT_WAIT_S = 5.0


class Books:
    def __init__(self, ledger: LedgerStore, acc: Accounting, shared: bool, max_age_s: float) -> None:
        self.ledger, self.acc = ledger, acc
        self.shared = shared
        self.max_age_s = max_age_s
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()
        self._unreadable = False

    async def refresh(self) -> None:
        """Bring the aggregates up to the ledger's, where other processes write it too."""
        if not self.shared or time.monotonic() - self._read_at < self.max_age_s:
            return
        async with self._lock:  # one read at a time; whoever waited for it uses it
            if time.monotonic() - self._read_at < self.max_age_s:
                return
            began = time.monotonic()
            since = self.acc.clock() - (CostTrend.WEEK_DAYS + 1) * DAY
            # The ledger's sums hold this process's calls booked before the snapshot's place in
            # the write queue; those booked while it is read are added back on top.
            later: list[CallRecord] = []
            self.acc.listeners.append(later.append)
            try:
                snapshot = await self.ledger.snapshot(since, _SNAPSHOT_WAIT_S)
            except LedgerError as exc:
                # The shared ledger cannot be read (a database away, a disk failing): this
                # process's own figures stand meanwhile.
                if not self._unreadable:
                    log.warning("%s; /stats shows this process's figures until it can be read", exc)
                self._unreadable = True
                self._read_at = began
                return
            finally:
                self.acc.listeners.remove(later.append)
            self._unreadable = False
            self.acc.load(Aggregates.from_summary(snapshot.started, snapshot.summary))
            self.acc.trend.seed(snapshot.days, snapshot.first)
            for rec in later:
                self.acc.current.add(rec)
                self.acc.trend.add(rec.ts, rec.cost_usd)
            self._read_at = began

    def forget(self) -> None:
        """The next refresh reads the ledger whatever its age (after a reset)."""
        self._read_at = -float("inf")
