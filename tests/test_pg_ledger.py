"""The ledger in a real PostgreSQL: the same answers as the SQLite ledger for the same calls, an
outbox that loses nothing and writes nothing twice while the database is away, migrations run
once whoever starts first, months dropped by retention, a bounded pool, and two proxies on two
data directories (two machines) showing one /stats."""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from dataclasses import replace
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from proxy.ledger import Admission, CallRecord, Filters
from proxy.ledger import postgresql_rollups as pg_rollups
from proxy.ledger.outbox import Outbox
from proxy.ledger.postgresql import PgLedger
from proxy.ledger.sqlite import Ledger

from .conftest import Proxy
from .fake_upstream import FakeUpstream
from .servers import PostgresServer, postgres_bin

JAN_30 = 1_769_731_200.0   # 2026-01-30 00:00 UTC: the calls below cross into February


@pytest.fixture
def pg_dsn(postgres_server: str) -> Iterator[str]:
    """A database of this test's own on the session's server."""
    name = f"t{uuid.uuid4().hex}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def calls(n: int, start: float, seed: int = 7) -> list[CallRecord | Admission]:
    """A mixed workload over three days: several upstreams, models, users (some unnamed),
    failures, estimates, streams, fallbacks, attempts that are not final, admissions."""
    rng = random.Random(seed)
    out: list[CallRecord | Admission] = []
    for i in range(n):
        ts = start + i * (3 * 86_400 / n) + rng.random()
        upstream = rng.choice(["gpt4o_cloud", "ollama_local"])
        key = f"adm-{seed}-{i}" if upstream == "gpt4o_cloud" else None
        if key is not None:
            out.append(Admission(key, ts - 0.5, upstream, "gpt-4o", None, None, 40))
        stream = rng.random() < 0.4
        out.append(CallRecord(
            ts=ts, upstream=upstream, model=rng.choice(["gpt-4o", "llama3.2"]), dialect="openai",
            endpoint=rng.choice(["chat", "embedding"]), type=rng.choice(["chat", "documento"]),
            user=rng.choice([None, "ana", "beto", "carla", "dani"]), stream=stream, status=200,
            outcome=rng.choice(["ok"] * 8 + ["timeout", "upstream_status"]), prompt_tokens=rng.randint(5, 500),
            completion_tokens=rng.randint(0, 300), cached_tokens=rng.randint(0, 5), estimated=rng.random() < 0.2,
            latency_s=rng.random() * 3, ttft_s=rng.random() if stream else None, cost_usd=rng.random() / 100,
            fallback_from=rng.choice([None, None, "gpt4o_cloud"]), key_id=rng.choice([None, "bot"]),
            admission=key, final=rng.random() < 0.95))
        if rng.random() < 0.1:  # a cache hit: nothing spent, its live call's figures saved
            rec = out[-1]
            assert isinstance(rec, CallRecord)
            out[-1] = replace(rec, outcome="cache_hit", prompt_tokens=0, completion_tokens=0, cost_usd=0.0,
                              saved_tokens=rng.randint(10, 800), saved_usd=rng.random() / 100, final=True)
    return out


def feed(ledger: Ledger, items: list[CallRecord | Admission], epoch_at: int | None = None) -> None:
    for i, item in enumerate(items):
        if i == epoch_at:
            ledger.new_epoch(item.ts)
        if isinstance(item, Admission):
            ledger.admit(item)
        else:
            ledger.append(item)


async def settle(*ledgers: Ledger) -> None:
    for ledger in ledgers:
        assert await ledger.flush(timeout=60)


def close_enough(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close_enough(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(close_enough(x, y) for x, y in zip(a, b))
    return bool(a == b)


def same(a: list[Any], b: list[Any]) -> None:
    key = lambda row: tuple("" if v is None else str(v) if not isinstance(v, float) else f"{v:.6f}" for v in row)  # noqa: E731
    left, right = sorted(a, key=key), sorted(b, key=key)
    assert len(left) == len(right)
    for x, y in zip(left, right):
        assert close_enough(tuple(x), tuple(y)), (x, y)


async def test_postgresql_answers_as_sqlite_does(pg_dsn: str, tmp_path: Path) -> None:
    lite = Ledger(tmp_path / "ledger.sqlite3")
    pg = PgLedger(pg_dsn, tmp_path / "outbox.sqlite3", pool_size=3)
    for ledger in (lite, pg):
        ledger.open(JAN_30)
        feed(ledger, calls(1500, JAN_30), epoch_at=900)
    await settle(lite, pg)
    try:
        for epoch in (1, 2):
            (started_l, lite_sum), (started_p, pg_sum) = lite.epoch_summary(epoch), pg.epoch_summary(epoch)
            same(lite_sum.calls, pg_sum.calls)
            same(lite_sum.users, pg_sum.users)
            same(lite_sum.latency, pg_sum.latency)   # the histogram buckets, computed in each database
        assert close_enough(lite.cost_by_day(JAN_30), pg.cost_by_day(JAN_30))
        since, until = JAN_30 + 5_000.5, JAN_30 + 2 * 86_400 + 777.25
        for group in (None, "upstream", "model", "type", "user"):
            for filters in (Filters(since, until), Filters(since, until, (("upstream", "gpt4o_cloud"),)),
                            Filters(None, None, (("user", "ana"),))):
                same(lite.history_pieces(filters, group, True, 3), pg.history_pieces(filters, group, True, 3))
                same(lite.history_pieces(filters, group, False), pg.history_pieces(filters, group, False))
        same([r for b in lite.export_rows(Filters(since, until)) for r in b],
             [r for b in pg.export_rows(Filters(since, until)) for r in b])
        assert [tuple(a.__dict__.values()) if hasattr(a, "__dict__") else a for a in lite.replay_admissions(JAN_30)] \
            == list(pg.replay_admissions(JAN_30))
        assert lite.count() == pg.count() == sum(isinstance(i, CallRecord) for i in calls(1500, JAN_30))
        # What budgets start from, the dashboard's latency per hour and its table of recent calls.
        same(lite.spend(since), pg.spend(since))
        hours = (int(JAN_30 // 3600), int(JAN_30 // 3600) + 72)
        same(lite.latency_hours(*hours), pg.latency_hours(*hours))
        for outcome in (None, "timeout"):
            recent = Filters(None, until, (("user", "ana"),))
            assert [r.ts for r in lite.recent(recent, outcome, 40)] == [r.ts for r in pg.recent(recent, outcome, 40)]
            assert len(lite.recent(recent, outcome, 40)) > 0
        assert lite.raw_since() == pg.raw_since()
        with psycopg.connect(pg_dsn) as conn:
            parts = {r[0] for r in conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c "
                                                "ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
                                                "WHERE p.relname = 'calls'")}
        assert {"calls_2026_01", "calls_2026_02"} <= parts   # rows went to their month's partition
    finally:
        lite.close()
        pg.close()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL is missing")  # the session fixture already fails under CI=true
    server = PostgresServer(binaries)
    server.start()
    yield server
    server.remove()


async def test_an_unreachable_database_loses_nothing_and_writes_nothing_twice(
        own_postgres: PostgresServer, tmp_path: Path, postgres_server: str) -> None:
    items = calls(600, JAN_30, seed=3)
    outbox = tmp_path / "outbox.sqlite3"
    pg = PgLedger(own_postgres.dsn, outbox, pool_size=2)
    pg.open(JAN_30)
    try:
        feed(pg, items[:200])
        await settle(pg)
        own_postgres.stop()
        feed(pg, items[200:450], epoch_at=100)   # an epoch while the database is away
        await settle(pg)                          # kept: in the outbox, in order
        health = pg.health()
        assert pg.outbox.size > 0 and health.failing is not None and "outbox" in health.failing
        assert own_postgres.dsn.split("@")[0] not in health.failing   # no connection string
        own_postgres.start()
        feed(pg, items[450:])
        for _ in range(100):  # the writer retries within a second; bounded
            await settle(pg)
            if not pg.outbox.size:
                break
        assert pg.outbox.size == 0 and pg.health().failing is None
    finally:
        pg.close()
    # Everything once, the epoch where it was asked: compared with SQLite fed the same way.
    lite = Ledger(tmp_path / "ledger.sqlite3")
    lite.open(JAN_30)
    feed(lite, items[:200])
    feed(lite, items[200:450], epoch_at=100)
    feed(lite, items[450:])
    await settle(lite)
    again = PgLedger(own_postgres.dsn, tmp_path / "outbox2.sqlite3")
    again.open(JAN_30)
    try:
        assert again.count() == lite.count()
        for epoch in (1, 2):
            same(lite.epoch_summary(epoch)[1].calls, again.epoch_summary(epoch)[1].calls)
        # A batch replayed twice (a crash between the database's commit and the outbox's
        # delete) is written once: the same rows put back in an outbox are found and skipped.
        copy = Outbox(tmp_path / "outbox3.sqlite3")
        replayed = again._items(items[:50])   # the same ids as an earlier run would have given
        copy.put(replayed)
        copy.put(replayed)
        copy.close()
        twice = PgLedger(own_postgres.dsn, tmp_path / "outbox3.sqlite3")
        twice.open(JAN_30)
        await settle(twice)
        before = twice.count()
        twice.close()
        copy = Outbox(tmp_path / "outbox3.sqlite3")
        copy.put(replayed)
        copy.close()
        thrice = PgLedger(own_postgres.dsn, tmp_path / "outbox3.sqlite3")
        thrice.open(JAN_30)
        await settle(thrice)
        assert thrice.count() == before and thrice.outbox.size == 0
        thrice.close()
    finally:
        again.close()
        lite.close()


def test_migrations_run_once_whoever_starts_first(pg_dsn: str, tmp_path: Path) -> None:
    ledgers = [PgLedger(pg_dsn, tmp_path / f"o{n}.sqlite3") for n in range(4)]
    errors: list[BaseException] = []
    go = threading.Barrier(4)

    def start(ledger: PgLedger) -> None:
        go.wait()
        try:
            ledger.open(JAN_30)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(ledger,)) for ledger in ledgers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for ledger in ledgers:
        ledger.close()
    assert not errors
    with psycopg.connect(pg_dsn) as conn:
        # Every step once, in order, whoever ran it.
        assert conn.execute("SELECT version FROM tollgate_schema ORDER BY version").fetchall() == [
            (v,) for v in range(1, len(pg_rollups.MIGRATIONS) + 1)]
        assert conn.execute("SELECT COUNT(*) FROM epochs").fetchone() == (1,)


async def test_retention_drops_whole_months_and_the_sums_stay(pg_dsn: str, tmp_path: Path) -> None:
    pg = PgLedger(pg_dsn, tmp_path / "outbox.sqlite3", pool_size=2)
    pg.open(JAN_30)
    try:
        feed(pg, calls(300, JAN_30 - 40 * 86_400) + calls(300, JAN_30 + 40 * 86_400, seed=9))
        await settle(pg)
        before = pg.epoch_summary()[1]
        pg.prune(JAN_30 + 40 * 86_400 - 1, JAN_30)   # December and January's rows are past keeping
        await settle(pg)
        await settle(pg)
        with psycopg.connect(pg_dsn) as conn:
            parts = {r[0] for r in conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c "
                                                "ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
                                                "WHERE p.relname = 'calls'")}
        assert "calls_2025_12" not in parts and "calls_2026_03" in parts
        assert pg.count() == sum(isinstance(i, CallRecord) for i in calls(300, JAN_30 + 40 * 86_400, seed=9))
        same(before.calls, pg.epoch_summary()[1].calls)   # /stats still counts every call
    finally:
        pg.close()


def test_a_process_holds_at_most_its_pool(pg_dsn: str, tmp_path: Path) -> None:
    pg = PgLedger(pg_dsn, tmp_path / "outbox.sqlite3", pool_size=3)
    pg.open(JAN_30)
    try:
        threads = [threading.Thread(target=lambda: [pg.epoch_summary() for _ in range(20)]) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with psycopg.connect(pg_dsn) as conn:
            held = conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'tollgate' "
                                "AND datname = current_database()").fetchone()
        assert held is not None and 1 <= held[0] <= 3
    finally:
        pg.close()


@pytest.fixture
def machines(raw_config: dict[str, Any], pg_dsn: str, redis_server: str, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> list[Proxy]:
    """Two proxies on two data directories (two machines), one database, one Redis; not started."""
    monkeypatch.setenv("TOLLGATE_TEST_DSN", pg_dsn)
    monkeypatch.setenv("TOLLGATE_TEST_REDIS", redis_server)
    raw_config["ledger"] = {"backend": "postgresql", "dsn_env": "TOLLGATE_TEST_DSN", "pool_size": 3}
    raw_config["limits"] = {"backend": "redis"}
    raw_config["redis"] = {"url_env": "TOLLGATE_TEST_REDIS", "prefix": f"t{uuid.uuid4().hex}"}
    raw_config["server"]["stats_cache_s"] = 0
    return [Proxy({**raw_config, "server": {**raw_config["server"], "data_dir": str(tmp_path / f"machine{n}")}})
            for n in range(2)]


@pytest.fixture
async def two_machines(machines: list[Proxy]) -> AsyncIterator[list[Proxy]]:
    for proxy in machines:
        await proxy.start()
    yield machines
    for proxy in machines:
        await proxy.stop()


async def test_two_machines_on_one_database_show_one_stats(two_machines: list[Proxy], fake: FakeUpstream) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}], "user": "ana"}
    async with aiohttp.ClientSession() as session:
        for n, proxy in enumerate(two_machines):
            for _ in range(3 + n):
                async with session.post(proxy.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
        for proxy in two_machines:   # each machine's calls booked and committed
            await proxy.settled()
            assert await proxy.ledger.flush(timeout=30)
        seen = []
        for proxy in two_machines:
            async with session.get(proxy.url + "/stats") as r:
                seen.append(await r.json())
        assert [s["total_requests"] for s in seen] == [7, 7]
        assert seen[0]["tokens"] == seen[1]["tokens"] and seen[0]["tokens"]["total"] == fake.reported.total
        # A reset on one machine is the new epoch of both.
        async with session.post(two_machines[0].url + "/metrics/reset") as r:
            assert r.status == 200
        async with session.get(two_machines[1].url + "/stats") as r:
            assert (await r.json())["total_requests"] == 0
        # History and export read the shared database too.
        async with session.get(two_machines[1].url + "/stats/export.csv") as r:
            assert len((await r.text()).splitlines()) == 1 + 7


async def test_a_flushed_redis_is_loaded_from_every_machines_calls(machines: list[Proxy], fake: FakeUpstream,
                                                                   redis_server: str) -> None:
    import redis.asyncio as aioredis

    for proxy in machines:
        proxy.raw["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 3}
        await proxy.start()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}
    client = aioredis.Redis.from_url(redis_server)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):   # two of the minute's three places, taken on the first machine
                async with session.post(machines[0].url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
            await machines[0].settled()
            assert await machines[0].ledger.flush(timeout=30)   # its writer has committed them
            await client.flushall()
            # The second machine finds Redis empty and loads it from the shared ledger, where
            # the first machine's admissions are: one place is left, not three.
            statuses = []
            for _ in range(3):
                async with session.post(machines[1].url + "/v1/chat/completions", json=body) as r:
                    statuses.append(r.status)
        assert statuses == [200, 429, 429] and fake.requests == 3
    finally:
        await client.aclose()
        for proxy in machines:
            await proxy.stop()


async def test_a_budget_holds_across_machines(machines: list[Proxy], fake: FakeUpstream, tmp_path: Path) -> None:
    """Each machine spends under the ceiling alone; together they pass it: after each reads the
    deployment's spend back (every 5 s; here the same reload, called at once), both refuse, and
    the crossing is announced by one of them only."""
    from proxy.keys import ALERTS, BUDGETS, LEDGER

    from .fake_upstream import Behavior
    from .servers import MailServer

    mail = MailServer(tmp_path)
    await mail.start()
    for proxy in machines:
        proxy.raw["budgets"] = {"nube": {"usd": 0.01, "period": "day", "upstream": "gpt4o_cloud",
                                         "alert_at": [1.0], "emails": ["ops"]}}
        proxy.raw["alerts"] = {"email": {"ops": {"host": "127.0.0.1", "port": mail.port, "security": "none",
                                                 "sender": "t@example.com", "to": ["ops@example.com"]}}}
        await proxy.start()
    fake.behavior = Behavior(prompt_tokens=100, chunks=5, completion_per_chunk=10)   # $0.006 a call
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}
    try:
        async with aiohttp.ClientSession() as session:
            for proxy in machines:
                async with session.post(proxy.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
            for proxy in machines:    # both machines' calls committed, then each reads them back
                await proxy.settled()
                assert await proxy.ledger.flush(timeout=30)
            for proxy in machines:
                assert proxy.server is not None
                await proxy.server.app[BUDGETS].reload(proxy.server.app[LEDGER], starting=False)
            for proxy in machines:
                async with session.post(proxy.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 429 and (await r.json())["error"]["code"] == "budget_exceeded"
        for proxy in machines:   # each announced the crossing: one sent it, the other found it claimed
            assert proxy.server is not None
            await asyncio.wait_for(proxy.server.app[ALERTS].delivered.wait(), 10)
        assert len(mail.messages) == 1 and "budget nube 100%" in mail.messages[0]["Subject"]
        assert fake.requests == 2
    finally:
        for proxy in machines:
            await proxy.stop()
        await mail.stop()
