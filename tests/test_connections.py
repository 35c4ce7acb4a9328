"""Connections are bounded: at most max_connections open, idle and slow ones cut in time."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Serve, write_config
from .fake_upstream import FakeUpstream


@pytest.fixture
async def serve(raw_config: dict[str, Any], tmp_path: Path, fake: FakeUpstream) -> AsyncIterator[Serve]:
    raw_config["server"].update(max_connections=20, idle_timeout_s=1)
    async with Serve(write_config(raw_config, tmp_path)) as server:
        yield server


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def closed_by_server(reader: asyncio.StreamReader, within: float = 15.0) -> bytes:
    """Everything the server sent until it closed the connection (bounded in time)."""
    async with asyncio.timeout(within):
        return await reader.read()


async def test_beyond_max_connections_costs_no_descriptor(serve: Serve) -> None:
    assert serve.proc is not None
    before = fds(serve.proc.pid)
    conns = [await asyncio.open_connection("127.0.0.1", serve.port) for _ in range(60)]
    # The first 20 are the proxy's; the other 40 wait in the kernel's backlog, costing it nothing.
    assert fds(serve.proc.pid) - before <= 20 + 2
    # Idle, they are closed after idle_timeout_s; the waiting ones are taken in turn and closed too.
    replies = await asyncio.gather(*(closed_by_server(reader) for reader, _ in conns))
    assert replies == [b""] * 60
    for _, writer in conns:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", serve.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_slow_headers_are_cut(serve: Serve) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", serve.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never the rest
    await writer.drain()
    assert await closed_by_server(reader) == b""
    writer.close()
