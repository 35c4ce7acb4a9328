"""The ledger never stops silently: a full disk or a lock held by another process is survived,
shown, bounded, and every row is written once the fault clears.

The full disk is real: the data directory sits on a tmpfs a few megabytes large, filled to the
last byte. The lock is real: another process holds `BEGIN EXCLUSIVE` on the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Proxy, Serve, to_toml
from .disks import fill, tmpfs
from .fake_upstream import FakeUpstream

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk") as mount:
        yield mount


def rows_in(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        count, tokens = conn.execute("SELECT COUNT(*), COALESCE(SUM(prompt_tokens + completion_tokens), 0) "
                                     "FROM calls").fetchone()
        return int(count), int(tokens)
    finally:
        conn.close()


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as r:
        for family in text_string_to_metric_families(await r.text()):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
    raise AssertionError(f"{name} not exposed")


async def _until_refused(proxy: Proxy, session: aiohttp.ClientSession, most: int) -> tuple[int, dict[str, Any]]:
    """Calls one at a time until the proxy refuses one (or `most` were served)."""
    for served in range(most):
        async with session.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            if r.status != 200:
                assert r.status == 503
                return served, await r.json()
    return most, {}


@pytest.mark.parametrize("policy", ["refuse", "serve"])
async def test_a_full_disk_is_survived_and_nothing_is_lost(raw_config: dict[str, Any], fake: FakeUpstream,
                                                          tiny_disk: Path, policy: str) -> None:
    raw_config["server"].update(data_dir=str(tiny_disk / "data"), ledger_max_backlog=40, on_ledger_full=policy)
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpd": 10_000, "tpm": 1_000_000}
    proxy = Proxy(raw_config)
    await proxy.start()
    db = tiny_disk / "data" / "ledger.sqlite3"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200
            assert await proxy.ledger.flush(timeout=10)
            filler = fill(tiny_disk)
            served, refusal = await _until_refused(proxy, s, 400)
            # The backlog can fill before the writer's first try on the full disk has failed (a
            # few rows a call, paced transactions): what it holds cannot be committed, and once
            # that is known /healthz says why.
            assert not await proxy.ledger.flush(timeout=2)
            async with s.get(proxy.url + "/healthz") as r:
                assert r.status == 503
                health = await r.json()
            assert health["status"] == "degraded" and "full" in health["ledger"]["failing"]
            assert await metric(s, proxy.url, "tollgate_ledger_unwritten_rows") > 0
            assert await metric(s, proxy.url, "tollgate_ledger_failing") == 1
            if policy == "refuse":
                # Refused at the door, in the dialect's shape, before any upstream call.
                assert served < 400 and refusal["error"]["code"] == "ledger_unavailable"
                assert "cannot record" in refusal["error"]["message"]
                assert fake.requests == 3 + served
                dropped = 0
            else:
                assert served == 400 and fake.requests == 403
                async with s.get(proxy.url + "/stats") as r:
                    dropped = (await r.json())["detail"]["ledger"]["dropped_rows"]
                assert dropped > 0
                assert await metric(s, proxy.url, "tollgate_ledger_dropped_rows_total") == dropped
            # The fault clears: every row held in memory is written, in one go.
            filler.unlink()
            (tiny_disk / "filler2").unlink()
            assert await proxy.ledger.flush(timeout=30)
            async with s.get(proxy.url + "/healthz") as r:
                assert r.status == 200
            async with s.get(proxy.url + "/stats/history?bucket=day") as r:
                assert r.status == 200 and "unwritten_rows" not in await r.json()
    finally:
        await proxy.stop()
    count, tokens = rows_in(db)
    assert count + dropped == fake.requests == fake.reported.calls
    if policy == "refuse":
        assert tokens == fake.reported.total


async def _hold_lock(db: Path) -> asyncio.subprocess.Process:
    """Another process that takes the ledger's write lock and keeps it until its stdin closes."""
    script = ("import sqlite3, sys\n"
              "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "c.execute('BEGIN EXCLUSIVE')\n"
              "print('locked', flush=True)\n"
              "sys.stdin.read()\n"
              "c.execute('COMMIT')\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(db),
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"locked\n"
    return proc


async def _release(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_a_lock_held_past_the_busy_timeout_is_waited_out(raw_config: dict[str, Any], fake: FakeUpstream,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    raw_config["server"].update(ledger_busy_timeout_s=0.05, ledger_max_backlog=10_000)
    raw_config["alerts"] = {"rules": [{"name": "Ledger", "metric": "ledger_unwritten_rows", "above": 20,
                                       "webhooks": []}]}
    caplog.set_level(logging.WARNING)
    proxy = Proxy(raw_config)
    await proxy.start()
    db = Path(raw_config["server"]["data_dir"]) / "ledger.sqlite3"
    locker = await _hold_lock(db)
    try:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(60):
                async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
                    statuses.append(r.status)
            assert statuses == [200] * 60
            assert not await proxy.ledger.flush(timeout=0.5)
            async with s.get(proxy.url + "/healthz") as r:
                assert r.status == 503 and "locked" in (await r.json())["ledger"]["failing"]
            # Reports do not hang on it: they answer, saying what they could not include yet.
            async with s.get(proxy.url + "/stats/history?bucket=hour") as r:
                assert r.status == 200 and (await r.json())["unwritten_rows"] > 0
            await _release(locker)
            assert await proxy.ledger.flush(timeout=30)
            async with s.get(proxy.url + "/healthz") as r:
                assert r.status == 200
    finally:
        if locker.returncode is None:
            locker.kill()
        await proxy.stop()
    assert rows_in(db) == (60, fake.reported.total) and fake.reported.calls == 60
    # The alert rule fired once; the fault was logged once when it began and once when it ended.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("ALERTA" in m and "Ledger" in m for m in messages) == 1
    assert sum("cannot write to" in m for m in messages) == 1
    assert sum("writing again" in m for m in messages) == 1


@pytest.mark.parametrize("fault", ["locked", "full"])
async def test_sigterm_ends_in_time_while_the_ledger_fails(raw_config: dict[str, Any], fake: FakeUpstream,
                                                           tmp_path: Path, fault: str) -> None:
    with contextlib.ExitStack() as stack:
        if fault == "full":
            raw_config["server"]["data_dir"] = str(stack.enter_context(tmpfs(tmp_path / "disk")) / "data")
        raw_config["server"].update(drain_timeout_s=2, ledger_busy_timeout_s=0.05)
        path = tmp_path / "config.toml"
        path.write_text(to_toml(raw_config))
        serve = Serve(path)
        await serve.start()
        db = Path(raw_config["server"]["data_dir"]) / "ledger.sqlite3"
        locker = None
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(serve.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200
                if fault == "locked":
                    locker = await _hold_lock(db)
                else:
                    fill(tmp_path / "disk")
                for _ in range(40):
                    async with s.post(serve.url + "/v1/chat/completions", json=CHAT) as r:
                        assert r.status == 200
                await serve.logged("cannot write to")
                async with s.get(serve.url + "/healthz") as r:
                    assert r.status == 503
            # drain_timeout_s is 2: the process must be gone within a few seconds more.
            assert await asyncio.wait_for(serve.signal(signal.SIGTERM), 2 + 8) == 0
        finally:
            if locker is not None:
                await _release(locker)
            if serve.proc is not None and serve.proc.returncode is None:
                await serve.signal(signal.SIGKILL)
    # It said what it could not write, once, and never with a traceback.
    log = "".join(serve.log)
    assert "rows unwritten" in log and log.count("cannot write to") == 1 and "Traceback" not in log
