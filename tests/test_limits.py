"""The limiter alone: pure logic, an injected clock, no HTTP."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config as config_mod
from proxy.limits import Denial, Limiter, Ticket, format_duration

from .conftest import Clock


def limiter(clock: Clock, limits: dict[str, Any], policy: dict[str, Any] | None = None) -> Limiter:
    raw = {"upstreams": {"cloud": {"kind": "openai", "base_url": "http://127.0.0.1:1", "models": ["*"],
                                   "limits": limits}},
           "limits": policy or {}}
    return Limiter(config_mod.parse(raw), clock)


def admit(lim: Limiter, tokens: int = 0, user: str | None = None) -> Ticket | Denial:
    return lim.admit_now(lim.scopes("cloud", "gpt-4o", user), tokens)


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(min_value=0, max_value=20), min_size=1, max_size=120),
       limit=st.integers(min_value=1, max_value=8))
def test_never_more_admissions_than_the_limit_in_any_window(gaps: list[float], limit: int) -> None:
    clock = Clock(1000.0)
    lim = limiter(clock, {"rpm": limit})
    admitted: list[float] = []
    for gap in gaps:
        clock.advance(gap)
        result = admit(lim)
        if isinstance(result, Ticket):
            admitted.append(clock.now)
            lim.finish(result, 0)
        else:
            # Refused only with the window full, and the wait is exact: until the oldest
            # admission in the window leaves it.
            in_window = [t for t in admitted if t > clock.now - 60]
            assert len(in_window) == limit
            assert result.retry_after == pytest.approx(in_window[0] + 60 - clock.now)
    for start in admitted:
        assert sum(1 for t in admitted if start <= t < start + 60) <= limit


def test_retry_after_is_when_the_oldest_place_frees(clock: Clock) -> None:
    lim = limiter(clock, {"rpm": 2})
    assert isinstance(admit(lim), Ticket)
    clock.advance(10)
    assert isinstance(admit(lim), Ticket)
    clock.advance(10)
    denial = admit(lim)
    assert isinstance(denial, Denial) and denial.limit == "requests_per_minute"
    assert denial.retry_after == pytest.approx(40)
    clock.advance(39.99)
    assert isinstance(admit(lim), Denial)
    clock.advance(0.02)
    assert isinstance(admit(lim), Ticket)


def test_calendar_day_resets_at_local_midnight() -> None:
    tz = ZoneInfo("America/Mexico_City")
    clock = Clock(datetime(2024, 1, 15, 23, 0, tzinfo=tz).timestamp())
    lim = limiter(clock, {"rpd": 2, "day": "calendar", "timezone": "America/Mexico_City"})
    assert isinstance(admit(lim), Ticket) and isinstance(admit(lim), Ticket)
    clock.advance(30 * 60)
    denial = admit(lim)
    assert isinstance(denial, Denial) and denial.retry_after == pytest.approx(30 * 60)
    clock.advance(30 * 60 + 1)
    assert isinstance(admit(lim), Ticket)


def test_rolling_day_is_24_hours(clock: Clock) -> None:
    lim = limiter(clock, {"rpd": 1})
    assert isinstance(admit(lim), Ticket)
    clock.advance(23 * 3600)
    denial = admit(lim)
    assert isinstance(denial, Denial) and denial.retry_after == pytest.approx(3600)


def test_tpm_counts_estimate_then_reconciles_with_real_usage(clock: Clock) -> None:
    lim = limiter(clock, {"tpm": 1000})
    first = admit(lim, 600)
    assert isinstance(first, Ticket)
    assert isinstance(admit(lim, 500), Denial)  # 600 + 500 > 1000 while the estimate stands
    lim.finish(first, 100)                      # the upstream reported 100
    assert isinstance(admit(lim, 800), Ticket)  # 100 + 800 fits
    never = admit(lim, 1200)
    assert isinstance(never, Denial) and never.retry_after is None


def test_concurrency_frees_when_a_call_ends(clock: Clock) -> None:
    lim = limiter(clock, {"concurrency": 2})
    a, b = admit(lim), admit(lim)
    assert isinstance(a, Ticket) and isinstance(b, Ticket)
    denial = admit(lim)
    assert isinstance(denial, Denial) and denial.limit == "concurrency"
    lim.finish(a, 0)
    lim.finish(a, 0)  # finishing twice gives back one place only
    assert isinstance(admit(lim), Ticket)
    assert isinstance(admit(lim), Denial)


def test_ten_thousand_users_with_bounded_memory(clock: Clock) -> None:
    lim = limiter(clock, {}, {"per_user": {"rpm": 2}})
    for i in range(10_000):
        for _ in range(2):
            ticket = admit(lim, user=f"user{i}")
            assert isinstance(ticket, Ticket)
            lim.finish(ticket, 0)
        assert isinstance(admit(lim, user=f"user{i}"), Denial)
    assert lim.tracked_users == 10_000  # each has a full window: none may be forgotten yet
    clock.advance(61)
    for i in range(20_000):  # new traffic sweeps the users whose windows emptied
        ticket = admit(lim, user=f"other{i}")
        assert isinstance(ticket, Ticket)
        lim.finish(ticket, 0)
        clock.advance(0.01)
    # Only users seen within the last minute (6,000) are held, at most doubled before a sweep.
    assert 6_000 <= lim.tracked_users <= 2 * 6_000


def test_upstream_refusal_holds_calls_back(clock: Clock) -> None:
    lim = limiter(clock, {"rpm": 100})
    lim.upstream_refused("cloud", 7.5)
    denial = admit(lim)
    assert isinstance(denial, Denial) and denial.limit == "upstream_rate_limit"
    assert denial.retry_after == pytest.approx(7.5)
    clock.advance(7.5)
    assert isinstance(admit(lim), Ticket)


def test_openai_reset_formats() -> None:
    assert [format_duration(s) for s in (0.02, 1, 59.2, 360, 3723)] == ["20ms", "1s", "1m0s", "6m0s", "1h2m3s"]


def test_headers_and_report(clock: Clock) -> None:
    lim = limiter(clock, {"rpm": 15, "tpm": 150000, "concurrency": 5})
    ticket = admit(lim, 1000)
    assert lim.headers(lim.scopes("cloud", "gpt-4o", None)) == {
        "x-ratelimit-limit-requests": "15", "x-ratelimit-remaining-requests": "14",
        "x-ratelimit-reset-requests": "1m0s", "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149000", "x-ratelimit-reset-tokens": "1m0s"}
    report = {row["limit"]: row for row in lim.report()}
    assert report["requests_per_minute"] == {"scope": "upstream:cloud", "limit": "requests_per_minute",
                                             "used": 1, "max": 15, "pct": 6.7, "reset_s": 60.0}
    assert report["concurrency"]["used"] == 1
    assert isinstance(ticket, Ticket)


def test_headers_describe_the_tightest_scope_of_the_call(clock: Clock) -> None:
    raw = {"upstreams": {"cloud": {"kind": "openai", "base_url": "http://127.0.0.1:1", "models": ["*"],
                                   "limits": {"rpm": 15, "tpm": 150000}}},
           "limits": {"models": {"gpt-4o": {"rpd": 3, "tpm": 8000}}, "per_user": {"rpm": 2}}}
    lim = Limiter(config_mod.parse(raw), clock)
    scopes = lim.scopes("cloud", "gpt-4o", "ana")
    assert isinstance(lim.admit_now(scopes, 1000), Ticket)
    headers = lim.headers(scopes)
    # The user's 2 per minute leaves 1, less than the model's 3 per day (2 left) or the
    # upstream's 15 per minute; the model's 8,000 TPM leaves less than the upstream's 150,000.
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("2", "1")
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == ("8000", "7000")
    assert isinstance(lim.admit_now(scopes, 1000), Ticket)
    assert lim.headers(scopes)["x-ratelimit-remaining-requests"] == "0"
    assert lim.headers(lim.scopes("cloud", "gpt-3.5", None))["x-ratelimit-limit-requests"] == "15"



def test_daily_figures_are_the_limiters_own(clock: Clock) -> None:
    """/stats' requests_dia and the daily-requests alert read the limiter's calendar-day window."""
    from proxy.accounting import Accounting
    from proxy.alerts import Alerts
    from proxy.stats import rate_limits

    tz = ZoneInfo("America/Mexico_City")
    clock.now = datetime(2024, 1, 15, 23, 0, tzinfo=tz).timestamp()
    raw = {"upstreams": {"cloud": {"kind": "openai", "base_url": "http://127.0.0.1:1", "models": ["*"],
                                   "limits": {"rpd": 10, "day": "calendar", "timezone": "America/Mexico_City"}}},
           "alerts": {"rules": [{"name": "day", "metric": "daily_requests_pct", "above": 50}]}}
    config = config_mod.parse(raw)
    lim = Limiter(config, clock)
    for _ in range(2):
        assert isinstance(admit(lim), Ticket)
    alerts = Alerts(config, Accounting(None, clock), lim)
    assert rate_limits(config, lim)["requests_dia"] == "2 / 10 RPD"
    assert alerts.figures() == {"day": 20.0}
    clock.advance(90 * 60)  # 00:30 the next local day: a new calendar day for all three
    assert rate_limits(config, lim)["requests_dia"] == "0 / 10 RPD"
    assert alerts.figures() == {"day": 0.0}
    assert isinstance(admit(lim), Ticket)


async def test_a_caller_cancelled_as_it_gets_the_line_hands_it_on(clock: Clock) -> None:
    """Its hang-up arrives in the same turn as the line reaches it: the line must not stay held
    by a caller that is gone (everyone behind would wait max_wait_s)."""
    import asyncio

    from proxy.admission import Admission, WaitLines
    from proxy.tokens import Estimator

    raw = {"upstreams": {"cloud": {"kind": "openai", "base_url": "http://127.0.0.1:1", "models": ["*"],
                                   "limits": {"concurrency": 1}}}, "limits": {"on_limit": "wait"}}
    config = config_mod.parse(raw)
    admission = Admission(config, Limiter(config, clock), WaitLines(), Estimator())
    line = admission.lines.lock("upstream:cloud")
    await line.acquire()                                    # someone holds the line
    loop = asyncio.get_running_loop()
    joining = asyncio.create_task(admission._join(line, loop.time() + 30))
    async with admission.lines.waiting_changed:
        await admission.lines.waiting_changed.wait_for(lambda: admission.lines.waiting == 1)
    # The waiter gets the line, then stops to count itself out of the queue (held up here by
    # the count's lock), and its caller hangs up right then.
    async with admission.lines.waiting_changed:
        line.release()
        for _ in range(100):                                # a bounded number of loop turns
            if line.locked():
                break
            await asyncio.sleep(0)
        assert line.locked()                                # the waiter holds the line now
        joining.cancel()
    with pytest.raises(asyncio.CancelledError):
        await joining
    assert not line.locked()
