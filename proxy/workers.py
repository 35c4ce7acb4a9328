"""`tollgate serve --workers N`: N processes serving one port, under one supervisor.

The supervisor opens the ledger once (its migrations and back-fill run before any worker
starts), reserves the port (a socket bound with SO_REUSEPORT that never listens, so port 0
resolves to one port and nobody else takes it), then starts N `tollgate serve --worker I`
processes that bind the same port with SO_REUSEPORT: the kernel shares the connections out.
Each worker is the whole app; they share the limits (Redis), the ledger (its file in
`data_dir`) and Prometheus' multiprocess directory, so any of them answers `/stats` and
`/metrics` for all. A worker that dies is started again (at most `MAX_RESTARTS` a minute);
SIGTERM or SIGINT is passed to every worker, which drains its calls, and the supervisor waits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from prometheus_client import multiprocess

from . import instance
from .ledger import ledger_for
from .config import Config

log = logging.getLogger("tollgate")

MAX_RESTARTS = 5          # in any minute; past that a worker that keeps dying stops the server
READY_TIMEOUT_S = 60.0


def die_with_supervisor() -> None:
    """A worker must not outlive its supervisor (killed with SIGKILL, it cannot pass on a
    signal): on Linux the kernel sends this process SIGTERM when its parent dies, and it drains
    and stops as on any SIGTERM. The parent may have died already, before this was asked."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(os.environ.get("TOLLGATE_SUPERVISOR", "0")):
        os.kill(os.getpid(), signal.SIGTERM)


def metrics_dir(data_dir: Path) -> Path:
    return data_dir / "metrics"


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.server = config.server
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self.failed: str | None = None
        self.restarts: list[float] = []
        self.port = self.server.port

    def _command(self, index: int) -> list[str]:
        return [sys.executable, "-m", "proxy", "-c", str(self.config.source), "serve",
                "--host", self.server.host, "--port", str(self.port),
                "--workers", str(self.server.workers), "--worker", str(index)]

    async def _start(self, index: int) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir(self.server.data_dir)),
               "TOLLGATE_SUPERVISOR": str(os.getpid())}
        proc = await asyncio.create_subprocess_exec(*self._command(index), env=env, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        self.procs[index] = proc
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            raise RuntimeError(f"worker {index} did not start (exit code {proc.returncode})")

    async def _watch(self, index: int) -> None:
        """Start a worker again if it dies while the server is not stopping."""
        while True:
            proc = self.procs[index]
            code = await proc.wait()
            # Its gauges leave the sums (prometheus_client has no type hints for this one).
            multiprocess.mark_process_dead(proc.pid, str(metrics_dir(self.server.data_dir)))  # type: ignore[no-untyped-call]
            if self.stopping:
                return
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < 60] + [now]
            if len(self.restarts) > MAX_RESTARTS:
                self.failed = f"workers died {len(self.restarts)} times in a minute (the last, {index}, with {code})"
                self._stop.set()
                return
            log.warning("worker %d (pid %d) exited with %s; starting it again", index, proc.pid, code)
            try:
                await self._start(index)
            except RuntimeError as exc:
                self.failed = str(exc)
                self._stop.set()
                return

    async def run(self) -> int:
        server = self.server
        loop = asyncio.get_running_loop()
        # Migrations and the rollups' back-fill, once, before any worker opens the ledger.
        ledger = ledger_for(self.config)
        await loop.run_in_executor(None, ledger.open, time.time())
        await loop.run_in_executor(None, ledger.close, 1.0)
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        reserved = socket.socket(family, socket.SOCK_STREAM)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((server.host, server.port))
        self.port = reserved.getsockname()[1]
        shutil.rmtree(metrics_dir(server.data_dir), ignore_errors=True)  # counters start at this start
        metrics_dir(server.data_dir).mkdir(mode=0o700)
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        watchers: list[asyncio.Task[None]] = []
        try:
            await asyncio.gather(*(self._start(i) for i in range(1, server.workers + 1)))
            watchers = [loop.create_task(self._watch(i)) for i in self.procs]
            instance.record(server.data_dir, server.host, self.port)
            shown = f"[{server.host}]" if ":" in server.host else server.host
            log.info("tollgate ready on http://%s:%d (%d workers)", shown, self.port, server.workers)
            await self._stop.wait()
        except RuntimeError as exc:
            self.failed = str(exc)
        finally:
            self.stopping = True
            await self._stop_all()
            for task in watchers:
                task.cancel()
            instance.forget(server.data_dir)
            reserved.close()
        if self.failed:
            print(f"tollgate: {self.failed}", file=sys.stderr)
            return 1
        return 0

    async def _stop_all(self) -> None:
        """SIGTERM to every worker (each drains its calls), then wait; a worker still running
        well past its drain time is killed."""
        live = [p for p in self.procs.values() if p.returncode is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.server.drain_timeout_s + 10):
                await asyncio.gather(*(p.wait() for p in live))
        except TimeoutError:
            stuck = [p for p in live if p.returncode is None]
            for proc in stuck:
                proc.kill()
            await asyncio.gather(*(p.wait() for p in live))
            self.failed = (f"{len(stuck)} worker(s) had not stopped {self.server.drain_timeout_s + 10:g} s after "
                           f"SIGTERM and were killed (pids {', '.join(str(p.pid) for p in stuck)})")
