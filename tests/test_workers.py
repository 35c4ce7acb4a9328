"""`tollgate serve --workers N`: one port, one set of limits, one ledger, one /stats and /metrics,
whichever worker answers; a dead worker comes back; SIGTERM drains every worker."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Serve, write_config
from .fake_upstream import Behavior, FakeUpstream
from .test_observe import Receiver, receiver  # noqa: F401  (the webhook receiver fixture)

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}


async def test_more_than_one_worker_needs_shared_limits(raw_config: dict[str, Any], tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "-c", str(write_config(raw_config, tmp_path)), "serve", "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "server.workers = 2: expected 1 unless limits.backend = 'redis'" in err.decode()
    assert "Traceback" not in err.decode()


@pytest.fixture
async def workers(raw_config: dict[str, Any], tmp_path: Path, redis_server: str, receiver: Receiver,
                  monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TOLLGATE_TEST_REDIS", redis_server)
    monkeypatch.setenv("TG_HOOK_JSON", receiver.url("json"))
    raw_config["alerts"] = {"check_interval_s": 0.05, "webhooks": {"json": {"url_env": "TG_HOOK_JSON"}},
                            "rules": [{"name": "Costo", "metric": "cost_usd", "above": 0.0001,
                                       "webhooks": ["json"]}]}
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 10}
    raw_config["limits"] = {"backend": "redis"}
    raw_config["redis"] = {"url_env": "TOLLGATE_TEST_REDIS", "prefix": f"t{uuid.uuid4().hex}"}
    raw_config["server"].update(stats_cache_s=0, drain_timeout_s=30)
    async with Serve(write_config(raw_config, tmp_path), "--workers", "2") as server:
        yield server


async def fresh(url: str, method: str = "GET", **kwargs: Any) -> Any:
    """One request on a new connection: the kernel picks the worker anew each time."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.request(method, url, **kwargs) as r:
            assert r.status == 200, await r.text()
            return await (r.text() if "metrics" in url else r.json())


async def worker_pids(server: Serve, want: int) -> set[int]:
    seen: set[int] = set()
    for _ in range(300):  # bounded: the kernel spreads new connections over the workers
        seen.add((await fresh(server.url + "/healthz"))["worker_pid"])
        if len(seen) >= want:
            break
    return seen


def sample(text: str, name: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


async def test_workers_share_the_port_the_limits_the_books_the_metrics_and_the_alerts(
        workers: Serve, fake: FakeUpstream, receiver: Receiver) -> None:
    assert len(await worker_pids(workers, 2)) == 2
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        async def one() -> int:
            async with session.post(workers.url + "/v1/chat/completions", json=CHAT) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(100)))
    assert statuses.count(200) == 10 and statuses.count(429) == 90
    assert fake.requests == 10
    # Each worker books its own calls; once both have (the in-flight gauge is the sum of both),
    # every /stats and every scrape, whichever worker answers, counts all ten.
    for _ in range(100):
        if sample(await fresh(workers.url + "/metrics"), "tollgate_in_flight_calls") == 0:
            break
    for _ in range(100):  # the other worker's writer commits within moments
        if (await fresh(workers.url + "/stats"))["total_requests"] == 10:
            break
    for _ in range(10):
        body = await fresh(workers.url + "/stats")
        assert body["total_requests"] == 10
        rpm = next(row for row in body["detail"]["limits"] if row["limit"] == "requests_per_minute")
        assert (rpm["used"], rpm["max"]) == (10, 10)
        text = await fresh(workers.url + "/metrics")
        assert sample(text, "tollgate_requests_total") == 10
        assert sample(text, "tollgate_refused_requests_total") == 90
    # One set of alerts: both workers see the cost cross its threshold; one of them sends it.
    await workers.logged("sent by another process")
    assert [name for name, _ in receiver.posts] == ["json"], "".join(line for line in workers.log if "alert" in line.lower())
    # One stats epoch: a reset through one worker is the reset of both.
    await fresh(workers.url + "/metrics/reset", "POST")
    for _ in range(10):
        assert (await fresh(workers.url + "/stats"))["total_requests"] == 0


async def test_a_dead_worker_is_started_again(workers: Serve) -> None:
    before = await worker_pids(workers, 2)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await workers.logged(f"(pid {victim}) exited")
    await workers.logged("starting it again")
    await workers.logged(") ready", times=3)  # two workers at the start, and the new one
    after = await worker_pids(workers, 2)
    assert len(after) == 2 and victim not in after and max(before) in after, "".join(workers.log)


async def test_sigterm_drains_every_worker(workers: Serve, fake: FakeUpstream) -> None:
    fake.by_model["openai/gpt-4o"] = Behavior(stall_before_headers=True)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
    try:
        stalled = [asyncio.create_task(session.post(workers.url + "/v1/chat/completions", json=CHAT))
                   for _ in range(4)]
        while fake.requests < 4:  # every one of them is at the upstream, whichever worker took it
            await fake.arrived.wait()
            fake.arrived.clear()
        assert workers.proc is not None
        workers.proc.send_signal(signal.SIGTERM)
        # Draining: neither worker takes a new connection, but their calls in flight go on.
        for _ in range(200):
            try:
                await fresh(workers.url + "/healthz")
            except aiohttp.ClientConnectionError:
                break
        else:
            pytest.fail("the workers still took connections after SIGTERM")
        fake.stall.set()
        for task in stalled:
            response = await task
            assert response.status == 200 and (await response.json())["choices"]
        assert await asyncio.wait_for(workers.proc.wait(), 60) == 0
    finally:
        await session.close()
