"""Shared fixtures: the fake upstream on a loopback port and the real proxy app in front of it."""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy import config as config_mod
from proxy.accounting import Accounting
from proxy.app import create_app
from proxy.config import Config
from proxy.keys import ACCOUNTING, LEDGER, METRICS
from proxy.ledger import CallRecord, LedgerStore

from .fake_upstream import Behavior, FakeUpstream
from .servers import RedisServer

CLOUD_KEY = "ghp_fakeCloudKey_0123456789abcdef"


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, start: float = 1_705_329_138.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def base_config(fake_url: str, data_dir: Path) -> dict[str, Any]:
    return {
        # Port 0: a `tollgate serve` child binds a free port and says which (see Serve).
        "server": {"data_dir": str(data_dir), "port": 0, "max_body_bytes": 64 * 1024, "snapshot_interval_s": 3600},
        "stats": {"title": "Raymundo", "plan": "GitHub Models Free + Ollama Local",
                  "timezone": "UTC", "limits_upstream": "gpt4o_cloud", "limits_label": "GitHub Models Free"},
        "upstreams": {
            "gpt4o_cloud": {
                "kind": "openai", "base_url": fake_url, "api_key_env": "TOLLGATE_TEST_CLOUD_KEY",
                "label": "GPT-4o (cloud)", "short_name": "gpt4o",
                "models": ["gpt-4o", "gpt-4o-mini", "openai/*"],
                "aliases": {"gpt-4o": "openai/gpt-4o"},
                "read_timeout_s": 5,
                "limits": {"rpm": 10000, "rpd": 150, "tpm": 150000},
            },
            "ollama_local": {
                "kind": "ollama", "base_url": fake_url, "label": "Ollama (local)", "short_name": "ollama",
                "models": ["llama*", "qwen*"], "read_timeout_s": 5,
            },
        },
        "prices": {"gpt-4o": {"input": 0.03, "output": 0.06, "cached_input": 0.015}},
        "types": {"chat": {"label": "Chat"}, "presentacion": {"label": "Presentaciones"},
                  "documento": {"label": "Documentos"}, "vision": {"label": "Visión/Imágenes"}},
        "tagging": {"rules": [{"type": "presentacion", "on": "last_user", "pattern": "(?i)presentaci[oó]n"},
                              {"type": "documento", "on": "system", "pattern": "(?i)documentos"}]},
    }


class Proxy:
    """The real app on a real loopback port, restartable over the same data directory."""

    def __init__(self, raw: dict[str, Any], clock: Callable[[], float] | None = None) -> None:
        self.raw = raw
        self.clock = clock
        self.server: TestServer | None = None

    @property
    def config(self) -> Config:
        return config_mod.parse(copy.deepcopy(self.raw))

    async def start(self) -> None:
        app = create_app(self.config, self.clock) if self.clock else create_app(self.config)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    @property
    def accounting(self) -> Accounting:
        assert self.server is not None
        return self.server.app[ACCOUNTING]

    @property
    def ledger(self) -> LedgerStore:
        assert self.server is not None
        return self.server.app[LEDGER]

    def records(self) -> Recorded:
        """Every call the proxy records from now on, with a way to await a count of them."""
        recorded = Recorded()
        self.accounting.listeners.append(recorded)
        return recorded

    async def settled(self, timeout: float = 10.0) -> None:
        """Wait until no metered call is in flight. A client has its whole answer a moment
        before the proxy books the call (the books are written after the last byte went out),
        so a test that reads /stats right after its calls waits here first."""
        assert self.server is not None
        registry = self.server.app[METRICS].registry
        recorded = self.records()
        try:
            async with asyncio.timeout(timeout):
                # A call leaves the in-flight gauge and is booked in one step, so each wake-up
                # here is a call booked; none can slip between the check and the wait.
                while registry.get_sample_value("tollgate_in_flight_calls"):
                    await recorded.wait_for(len(recorded.rows) + 1)
        finally:
            self.accounting.listeners.remove(recorded)


class Recorded:
    """An accounting listener: the records it has seen, and an await for the n-th."""

    def __init__(self) -> None:
        self.rows: list[CallRecord] = []
        self._changed = asyncio.Event()

    def __call__(self, rec: CallRecord) -> None:
        self.rows.append(rec)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[CallRecord]:
        async with asyncio.timeout(timeout):
            while len(self.rows) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.rows


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    server = TestServer(upstream.app, host="127.0.0.1")
    await server.start_server()
    upstream.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield upstream
    upstream.stall.set()
    await server.close()


@pytest.fixture
def cloud_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TOLLGATE_TEST_CLOUD_KEY", CLOUD_KEY)
    return CLOUD_KEY


@pytest.fixture
def raw_config(fake: FakeUpstream, tmp_path: Path, cloud_key: str) -> dict[str, Any]:
    return base_config(fake.url, tmp_path / "data")  # type: ignore[attr-defined]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound but never listening,
    so no other process can start listening on it meanwhile (a port closed and handed on can)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def timed(raw_config: dict[str, Any], clock: Clock) -> AsyncIterator[Proxy]:
    """The proxy on a clock the test moves by hand."""
    p = Proxy(raw_config, clock)
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def proxy(raw_config: dict[str, Any]) -> AsyncIterator[Proxy]:
    p = Proxy(raw_config)
    await p.start()
    yield p
    await p.stop()


class Serve:
    """`tollgate serve` as a child process, ready when it says so, on the port it says (the
    configs given it name port 0, so the kernel picks a free one and nothing races for it)."""

    def __init__(self, config: Path, *args: str) -> None:
        self.config, self.port, self.args = config, 0, args
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []  # what it wrote to stderr, line by line
        self._logged = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "-c", str(self.config), "serve", *self.args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        while True:
            line = await asyncio.wait_for(self.proc.stderr.readline(), 60)
            assert line, "tollgate serve exited before it was ready"
            self.log.append(line.decode(errors="replace"))
            if ready := re.search(rb"tollgate ready on http://[^ ]+:(\d+)", line):
                self.port = int(ready.group(1))
                break
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))
            self._logged.set()

    async def logged(self, text: str, timeout: float = 30.0, times: int = 1) -> None:
        """Wait until `times` lines containing `text` have been written to its log."""
        async with asyncio.timeout(timeout):
            while sum(text in line for line in self.log) < times:
                self._logged.clear()
                await self._logged.wait()

    async def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 60)

    async def __aenter__(self) -> Serve:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        """A server the test has not stopped is killed: none outlives its test."""
        if self.proc is not None and self.proc.returncode is None:
            await self.signal(signal.SIGKILL)


def write_config(raw: dict[str, Any], directory: Path) -> Path:
    """`raw` as the config.toml a `tollgate` child reads."""
    path = directory / "config.toml"
    path.write_text(to_toml(raw))
    return path


async def settled(proxy: Proxy) -> dict[str, Any]:
    """/stats once every call the test made is in the books."""
    await proxy.settled()
    return await stats_now(proxy)


async def stats_now(proxy: Proxy) -> dict[str, Any]:
    """/stats as it is now, calls in flight and all."""
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/stats") as r:
            assert r.status == 200
            body: dict[str, Any] = await r.json()
            return body


async def chat(url: str, model: str, headers: dict[str, str] | None = None, **extra: Any) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hola"}], **extra}
    path = "/api/chat" if model.startswith("llama") else "/v1/chat/completions"
    if path == "/api/chat":
        body["stream"] = False
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body, headers=headers or {}) as r:
            await r.read()
            return r.status


async def workload(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(prompt_tokens=100, chunks=5, completion_per_chunk=10)
    assert await chat(proxy.url, "gpt-4o") == 200
    assert await chat(proxy.url, "gpt-4o", {"X-Tollgate-Type": "presentacion"}) == 200
    assert await chat(proxy.url, "llama3.2") == 200
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", data=b"{bad",
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400


def logged(logger: str, text: str) -> asyncio.Future[str]:
    """The first message containing `text` that `logger` emits from now on: a log line is what
    an operator sees, so tests wait on it rather than on a hook inside the proxy."""
    loop = asyncio.get_running_loop()
    found: asyncio.Future[str] = loop.create_future()
    target = logging.getLogger(logger)

    def settle(message: str) -> None:
        if not found.done():
            found.set_result(message)

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if text in message:
                target.removeHandler(self)
                loop.call_soon_threadsafe(settle, message)

    target.addHandler(Catch())
    return found


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough of a TOML writer for the test configs (tables, scalars, lists, inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + "}"
        raise TypeError(v)

    scalars = [f'"{k}" = {value(v)}' for k, v in data.items() if not isinstance(v, dict) or not v
               or not all(isinstance(x, dict) for x in v.values())]
    lines = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for k, v in data.items():
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            lines.append(to_toml(v, f'{prefix}."{k}"' if prefix else f'"{k}"'))
    return "\n".join(lines) + "\n"


CHROMIUM = "/usr/bin/chromium"


def _missing(what: str) -> NoReturn:
    """A component the suite needs is not on this machine: skipped here, a failure in CI."""
    import os

    message = f"{what} is missing (.ci/run installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the session; yields its URL."""
    import shutil

    if shutil.which("redis-server") is None:
        _missing("redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL for the session (initdb and pg_ctl in a fresh directory, on a free port);
    yields its DSN."""
    from .servers import PostgresServer, postgres_bin

    binaries = postgres_bin()
    if binaries is None:
        _missing("PostgreSQL (Debian's postgresql)")
    server = PostgresServer(binaries)
    server.start()
    yield server.dsn
    server.remove()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, which .ci/run installs. Without it the browser test is skipped here,
    and fails under CI=true: CI must never pass by skipping what users run."""
    import os

    if not os.path.exists(CHROMIUM):
        _missing(f"{CHROMIUM} (Debian's chromium)")
    return CHROMIUM
