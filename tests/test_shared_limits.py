"""One set of limits for many processes: real `tollgate serve` processes and in-process proxies
over a real redis-server, with Redis flushed, stopped and started again under load."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from .conftest import Proxy, Serve, write_config
from .servers import RedisServer
from .fake_upstream import FakeUpstream

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}


def shared(raw: dict[str, Any], url_env: str, **redis: Any) -> dict[str, Any]:
    raw["limits"] = {**raw.get("limits", {}), "backend": "redis"}
    raw["redis"] = {"url_env": url_env, "prefix": f"t{uuid.uuid4().hex}", **redis}
    return raw


@pytest.fixture
def redis_env(redis_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TOLLGATE_TEST_REDIS", redis_server)  # children inherit it
    return "TOLLGATE_TEST_REDIS"


async def post_all(session: aiohttp.ClientSession, urls: list[str], body: dict[str, Any]) -> list[tuple[int, Any]]:
    async def one(url: str) -> tuple[int, Any]:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            return r.status, (await r.json(), r.headers.get("Retry-After"))

    return await asyncio.gather(*(one(u) for u in urls))


async def test_four_servers_with_a_hundred_callers_each_let_exactly_the_limit_through(
        raw_config: dict[str, Any], fake: FakeUpstream, redis_env: str, tmp_path: Path) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 10}
    shared(raw_config, redis_env)
    servers = []
    for n in range(4):
        raw = copy.deepcopy(raw_config)
        raw["server"]["data_dir"] = str(tmp_path / f"data{n}")
        (tmp_path / f"s{n}").mkdir()
        servers.append(Serve(write_config(raw, tmp_path / f"s{n}")))
    try:
        await asyncio.gather(*(s.start() for s in servers))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            results = await post_all(session, [s.url for s in servers for _ in range(100)], CHAT)
            statuses = [status for status, _ in results]
            assert statuses.count(200) == 10 and statuses.count(429) == 390, sorted(set(statuses))
            assert fake.requests == 10
            refusal, retry_after = next(body for status, body in results if status == 429)
            assert refusal["error"]["type"] == "requests_per_minute" and 1 <= int(retry_after) <= 60
            # Whichever server answers, its /stats shows the deployment's window, not its own share.
            for server in servers:
                async with session.get(server.url + "/stats") as r:
                    limits = (await r.json())["detail"]["limits"]
                [rpm] = [row for row in limits if row["limit"] == "requests_per_minute"]
                assert (rpm["used"], rpm["max"]) == (10, 10)
    finally:
        for server in servers:
            await server.__aexit__()


async def test_a_flushed_redis_is_loaded_from_the_ledger_before_anything_more_is_admitted(
        raw_config: dict[str, Any], fake: FakeUpstream, redis_env: str, redis_server: str) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 3, "tpm": 100_000}
    proxy = Proxy(shared(raw_config, redis_env))
    await proxy.start()
    client = aioredis.Redis.from_url(redis_server)
    try:
        async with aiohttp.ClientSession() as session:
            assert [s for s, _ in await post_all(session, [proxy.url] * 2, CHAT)] == [200, 200]
            await client.flushall()   # every window, lease and the ready key gone
            statuses = sorted(s for s, _ in await post_all(session, [proxy.url] * 3, CHAT))
            assert statuses == [200, 429, 429]
            assert fake.requests == 3
            await proxy.settled()   # the third call booked: its real tokens replace its estimate
            async with session.get(proxy.url + "/stats") as r:
                detail = (await r.json())["detail"]
            tpm = next(row for row in detail["limits"] if row["limit"] == "tokens_per_minute")
            assert tpm["used"] == fake.reported.total  # the tokens came back with the requests
            assert detail["limits_store"]["mode"] == "shared"
    finally:
        await client.aclose()
        await proxy.stop()


@pytest.fixture
async def own_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own, which it stops and starts again."""
    server = RedisServer(tmp_path)
    server.start()
    monkeypatch.setenv("TOLLGATE_TEST_OWN_REDIS", server.url)
    yield server
    server.stop()


@pytest.mark.parametrize("policy", ["closed", "local"])
async def test_redis_stopped_and_started_again_under_load(raw_config: dict[str, Any], fake: FakeUpstream,
                                                          own_redis: RedisServer, policy: str) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 100_000}
    # Retried at once after a failure, so the test needs no clock to pass for it.
    proxy = Proxy(shared(raw_config, "TOLLGATE_TEST_OWN_REDIS", unavailable=policy, retry_s=0.001,
                         timeout_ms=2000))
    await proxy.start()
    seen: dict[str, list[int]] = {"before": [], "down": [], "after": []}
    health: dict[str, Any] = {}
    phase = "before"
    bodies: list[dict[str, Any]] = []
    enough, progressed = asyncio.Event(), asyncio.Event()

    async def caller(session: aiohttp.ClientSession) -> None:
        for _ in range(400):  # bounded; the phases below end it long before
            async with session.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
                body = await r.json()
            seen[phase].append(r.status)
            progressed.set()
            if r.status != 200:
                bodies.append(body)
            if phase == "after" and len(seen["after"]) >= 40:
                enough.set()
                return

    async def moved_on(count: int) -> None:
        while len(seen[phase]) < count:
            progressed.clear()
            await progressed.wait()

    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(60):
            callers = [asyncio.create_task(caller(session)) for _ in range(8)]
            await moved_on(20)
            own_redis.stop()
            phase = "down"
            await moved_on(40)
            async with session.get(proxy.url + "/healthz") as r:
                health["down"] = (r.status, await r.json())
            own_redis.start()   # empty: it is loaded from the ledger before anything is admitted
            phase = "after"
            await enough.wait()
            await asyncio.gather(*callers)
            async with session.get(proxy.url + "/stats") as r:
                detail = (await r.json())["detail"]
            async with session.get(proxy.url + "/healthz") as r:
                health["after"] = (r.status, await r.json())
    finally:
        await proxy.stop()
    # While Redis is away, /healthz says so: 503 where calls are refused for it, a warning where
    # each process holds the limits alone.
    status, body = health["down"]
    assert (status, body["status"]) == ((503, "degraded") if policy == "closed" else (200, "ok"))
    assert body["limits"]["reachable"] is False
    assert health["after"][0] == 200 and "limits" not in health["after"][1]
    assert set(seen["before"]) == {200}
    if policy == "closed":
        # Nothing unlimited went through: each call either had Redis's word or was refused 503.
        assert 503 in seen["down"] and set(seen["down"]) <= {200, 503}
        refusal = bodies[0]["error"]
        assert refusal["code"] == "limits_unavailable" and "Redis" in refusal["message"]
        assert detail["refused"]["limits_unavailable"] == seen["down"].count(503) + seen["after"].count(503)
    else:
        assert set(seen["down"]) == {200}
    assert seen["after"][-20:] == [200] * 20   # back without a restart
    assert detail["limits_store"]["reachable"] is True
    served = sum(s.count(200) for s in seen.values())
    assert fake.requests == served
