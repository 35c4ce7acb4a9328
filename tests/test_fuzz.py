"""Random and hostile requests to every endpoint: never a 500, never a traceback, never down.

The proxy and the fake upstream run on their own event loop in a background thread, so
hypothesis can drive them with raw `http.client` requests: any method, path, header and body
bytes, including invalid UTF-8 and content types that lie.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import config as config_mod
from proxy.app import create_app
from proxy.errors import OUTCOMES

from .conftest import base_config
from .fake_upstream import FakeUpstream

ENDPOINTS = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"), ("GET", "/v1/models"), ("GET", "/v1/echo/x"), ("POST", "/api/chat"),
    ("POST", "/api/generate"), ("POST", "/api/embed"), ("POST", "/api/embeddings"), ("GET", "/api/tags"),
    ("POST", "/api/show"), ("GET", "/stats"), ("GET", "/stats?format=text&lang=xx"), ("GET", "/stats/history"),
    ("GET", "/stats/export.csv"), ("GET", "/stats/snapshot.csv"), ("GET", "/metrics"), ("POST", "/metrics/reset"),
    ("GET", "/dashboard"), ("POST", "/dashboard/login"), ("GET", "/healthz"), ("POST", "/t/chat/v1/chat/completions"),
    ("POST", "/t/%FF/api/chat"), ("DELETE", "/v1/chat/completions"), ("PUT", "/api/chat"), ("GET", "/nowhere"),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30)
chat_like = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["gpt-4o", "llama3.2", "qwen2.5", "", "nope"]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({}, optional={"role": json_values | st.sampled_from(["user", "system"]),
                                                           "content": json_values, "images": json_values}),
                         max_size=4) | json_values,
    "stream": st.booleans() | json_values, "stream_options": json_values, "user": json_values,
    "max_tokens": st.integers(min_value=-5, max_value=2**63 - 1) | json_values, "prompt": json_values,
    "input": json_values, "options": json_values,
})
bodies = st.one_of(
    # The standard library writes what orjson refuses to: integers past 64 bits, Infinity.
    chat_like.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.just(b"{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}"),
    st.just(b"{\"model\": \"gpt-4o\", \"max_tokens\": 1e999999}"),
    st.just(b"x" * (70 * 1024)),
    st.just(b""),
)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x",
                                     "application/x-www-form-urlencoded", "", "garbage/;;"]),
    "X-Tollgate-Type": header_values, "X-Tollgate-User": header_values, "Authorization": header_values,
    "Accept-Encoding": st.sampled_from(["gzip", "br", "identity", "*"]),
})
suffixes = st.sampled_from(["", "?since=yesterday", "?bucket=week", "?group_by=ip", "?since=0&until=-1",
                            "?format=text", "?token=x", "/../x", "%00", "?x=%FF"])


class Background:
    """The proxy app and the fake upstream on one event loop in a thread."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.tmp = tmp
        self.runners: list[web.AppRunner] = []

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _serve(self, app: web.Application) -> int:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock)
        await site.start()
        self.runners.append(runner)
        return int(sock.getsockname()[1])

    def start(self) -> None:
        self.thread.start()
        self.fake = FakeUpstream.__new__(FakeUpstream)
        self.run(self._make_fake())
        fake_port = self.run(self._serve(self.fake.app))
        raw = base_config(f"http://127.0.0.1:{fake_port}", self.tmp / "data")
        raw["server"]["body_timeout_s"] = 2
        self.config = config_mod.parse(raw)
        self.port = self.run(self._serve(create_app(self.config)))

    async def _make_fake(self) -> None:
        FakeUpstream.__init__(self.fake)  # its asyncio.Events belong to this loop

    def stop(self) -> None:
        for runner in reversed(self.runners):
            self.run(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        status, reply, _ = self.exchange(method, path, body, headers)
        return status, reply

    def exchange(self, method: str, path: str, body: bytes,
                 headers: dict[str, str]) -> tuple[int, bytes, http.client.HTTPMessage]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(), response.headers
        finally:
            conn.close()


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    bg = Background(tmp_path_factory.mktemp("fuzz"))
    bg.start()
    yield bg
    bg.stop()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), suffix=suffixes, body=bodies, headers=headers)
def test_hostile_requests_never_break_the_proxy(background: Background, endpoint: tuple[str, str], suffix: str,
                                                body: bytes, headers: dict[str, str]) -> None:
    method, path = endpoint
    status, reply, reply_headers = background.exchange(method, path + suffix, body, headers)
    # A 5xx is allowed only when it is an upstream's own, relayed (and marked as such).
    assert status < 500 or "X-Tollgate-Upstream" in reply_headers, (status, reply[:300])
    assert b"Traceback" not in reply and b'File "' not in reply
    if status >= 400 and reply.startswith(b"{"):
        error = orjson.loads(reply)["error"]  # the dialect's error shape, with a message
        assert isinstance(error, str) or isinstance(error.get("message"), str)


def test_after_the_storm_it_serves_and_its_books_agree(background: Background) -> None:
    status, _ = background.request("GET", "/healthz", b"", {})
    assert status == 200
    status, reply = background.request("POST", "/v1/chat/completions",
                                       orjson.dumps({"model": "gpt-4o", "messages": []}),
                                       {"Content-Type": "application/json"})
    assert status == 200 and orjson.loads(reply)["choices"]
    background.run(_flush(background))
    _, reply = background.request("GET", "/stats", b"", {})
    stats = orjson.loads(reply)
    conn = sqlite3.connect(background.config.db_path)
    try:
        count, tokens = conn.execute("SELECT COUNT(*), COALESCE(SUM(prompt_tokens + completion_tokens), 0) "
                                     "FROM calls WHERE id > (SELECT after_call FROM epochs ORDER BY id DESC LIMIT 1)"
                                     ).fetchone()
        outcomes = {o for (o,) in conn.execute("SELECT DISTINCT outcome FROM calls")}
    finally:
        conn.close()
    assert stats["total_requests"] == count and stats["tokens"]["total"] == tokens
    assert outcomes <= set(OUTCOMES)


async def _flush(bg: Background) -> None:
    from proxy.keys import LEDGER

    for runner in bg.runners:
        if LEDGER in runner.app:
            await runner.app[LEDGER].flush()


def test_a_body_that_never_arrives_gets_408(background: Background) -> None:
    with socket.create_connection(("127.0.0.1", background.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in reply
