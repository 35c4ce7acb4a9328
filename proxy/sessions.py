"""Admin sessions for the dashboard: random ids held here, each with an expiry, ended by logout.

The cookie carries only an id that means nothing once the session ends (logout, expiry, a
restart); the admin token itself never reaches the browser's storage.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable

# Sessions kept at most; past it the oldest ends. An operator has a few browsers, not thousands.
MAX_SESSIONS = 1024


class Sessions:
    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def create(self) -> str:
        session = secrets.token_urlsafe(32)
        self._expiry[session] = self.clock() + self.ttl_s
        while len(self._expiry) > MAX_SESSIONS:
            self._expiry.popitem(last=False)
        return session

    def valid(self, session: str) -> bool:
        expiry = self._expiry.get(session)
        if expiry is None:
            return False
        if expiry <= self.clock():
            del self._expiry[session]
            return False
        return True

    def end(self, session: str) -> None:
        self._expiry.pop(session, None)
