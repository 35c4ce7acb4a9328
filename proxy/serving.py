"""How `tollgate serve` listens: a bounded number of connections, idle and slow ones cut, a
graceful stop on SIGTERM and SIGINT.

aiohttp's own sites accept every connection the kernel offers, so 2 x 11,000 idle sockets ran
the process out of file descriptors. Here the accept loop takes a connection only while fewer
than `server.max_connections` are open; past that, new ones wait in the kernel's listen backlog
and cost the process nothing. A connection that sends no request, or whose request headers
have not all arrived, within `server.idle_timeout_s` of opening (or of its last response) is
closed by aiohttp's keep-alive timer; a body that has not arrived within `body_timeout_s` is a 408.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import instance
from .config import Config

log = logging.getLogger("tollgate")


class BoundedSite(web.BaseSite):
    """A TCP site whose accept loop holds at most `limit` connections open at once."""

    __slots__ = ("_host", "_port", "_limit", "_sock", "_task", "_slots", "_reuse_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limit: int, backlog: int = 1024,
                 reuse_port: bool = False) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._limit = host, port, limit
        self._reuse_port = reuse_port  # a worker: the kernel shares the port's connections out
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(limit)

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port bound (the one the kernel chose, for port 0)."""
        return self._port

    async def start(self) -> None:
        await super().start()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._sock = socket.create_server((self._host, self._port), family=family, backlog=self._backlog,
                                          reuse_port=self._reuse_port)
        self._sock.setblocking(False)
        self._port = self._sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None and self._sock is not None
        # aiohttp tells its server of every connection that ends: that frees a place.
        lost = server.connection_lost

        def connection_lost(handler: RequestHandler, exc: BaseException | None) -> None:
            self._slots.release()
            lost(handler, exc)

        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]
        while True:
            await self._slots.acquire()
            try:
                conn, _ = await loop.sock_accept(self._sock)
                await loop.connect_accepted_socket(server, conn)
            except OSError as exc:
                # Out of descriptors, or a connection reset before it was set up: this one only.
                self._slots.release()
                log.warning("could not accept a connection (%s)", exc.strerror or exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._sock is not None:
            self._sock.close()
        await super().stop()


async def serve(app: web.Application, config: Config, ready: Callable[[str], None], worker: bool = False) -> None:
    """Run `app` until SIGTERM or SIGINT, then let calls in flight finish (drain_timeout_s). A
    worker shares its port with its siblings, and its supervisor records where they listen."""
    server = config.server
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           keepalive_timeout=server.idle_timeout_s, shutdown_timeout=server.drain_timeout_s)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = BoundedSite(runner, server.host, server.port, server.max_connections, reuse_port=worker)
        await site.start()
        if not worker:
            instance.record(server.data_dir, server.host, site.port)
        ready(site.name)
        await stop.wait()
    finally:
        if not worker:
            instance.forget(server.data_dir)
        await runner.cleanup()
