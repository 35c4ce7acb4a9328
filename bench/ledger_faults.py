"""The ledger under faults: calls served while it cannot write, rows written once it can, the time
it takes to catch up, and what was refused or dropped.

    python bench/ledger_faults.py [--calls 5000] [--policy refuse|serve] [--backlog N]   (root: mounts a tmpfs)

Two faults, each against a fresh `tollgate serve` in front of the fake upstream:

1. full disk: the data directory is on a 4 MiB tmpfs, filled to the last byte once the proxy is
   up; `--calls` calls go through; then the filler is deleted.
2. lock: another process holds `BEGIN EXCLUSIVE` on the ledger (past ledger_busy_timeout_s)
   while the calls go through; then it commits.

For each: calls sent, served (200), refused (503), the ledger's rows after a clean stop, the
upstream's own count of calls it answered, dropped rows, and the time from clearing the fault to
/healthz answering 200 again (every unwritten row on disk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import CHAT, free_port, start, start_upstream, stop  # noqa: E402


@contextlib.contextmanager
def tmpfs(mount: Path) -> Iterator[Path]:
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> list[Path]:
    made = []
    for name, size in (("filler", 65536), ("filler2", 512)):
        path = disk / name
        made.append(path)
        with open(path, "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return made


async def load(url: str, calls: int, concurrency: int = 16) -> dict[int, int]:
    statuses: dict[int, int] = {}
    body = orjson.dumps(CHAT)
    remaining = calls
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with session.post(url + "/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def healthy_after(url: str) -> float:
    """Seconds until /healthz says 200 (polled every 10 ms: a benchmark may poll)."""
    start_at = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(url + "/healthz") as r:
                if r.status == 200:
                    return time.perf_counter() - start_at
            await asyncio.sleep(0.01)


async def tally(up_port: int) -> dict[str, int]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{up_port}/_tally") as r:
            return await r.json()  # type: ignore[no-any-return]


async def scenario(fault: str, calls: int, policy: str, backlog: int) -> None:
    upstream, up_port = await start_upstream()
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    with contextlib.ExitStack() as stack:
        data = (stack.enter_context(tmpfs(tmp / "disk")) if fault == "full disk" else tmp) / "data"
        port = free_port()
        (tmp / "config.toml").write_text(f"""
[server]
port = {port}
data_dir = "{data}"
ledger_busy_timeout_s = 0.05
on_ledger_full = "{policy}"
ledger_max_backlog = {backlog}
drain_timeout_s = 5
[upstreams.cloud]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}"
models = ["*"]
[upstreams.cloud.limits]
rpd = 1000000
""")
        proxy = await start([sys.executable, "-m", "proxy", "-c", str(tmp / "config.toml"), "serve"],
                            b"tollgate ready", env={**os.environ, "PYTHONPATH": str(ROOT)})
        url = f"http://127.0.0.1:{port}"
        await load(url, 10)
        locker = None
        if fault == "full disk":
            fillers = fill(tmp / "disk")
        else:
            locker = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1],isolation_level=None)\n"
                "c.execute('BEGIN EXCLUSIVE')\nprint('locked',flush=True)\nsys.stdin.read()\nc.execute('COMMIT')\n",
                str(data / "ledger.sqlite3"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            assert locker.stdout is not None
            await locker.stdout.readline()
        began = time.perf_counter()
        statuses = await load(url, calls)
        during = time.perf_counter() - began
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/healthz") as r:
                health = await r.json()
        if locker is not None:
            assert locker.stdin is not None
            locker.stdin.close()
            await locker.wait()
        else:
            for path in fillers:
                path.unlink()
        catch_up = await healthy_after(url)
        proxy.send_signal(signal.SIGTERM)
        await proxy.wait()
        conn = sqlite3.connect(data / "ledger.sqlite3")
        rows = conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        conn.close()
        answered = (await tally(up_port))["calls"]
    await stop(upstream)
    unwritten = health.get("ledger", {}).get("unwritten_rows", 0)
    dropped = health.get("ledger", {}).get("dropped_rows", 0)
    print(f"{fault} ({policy}): {calls} calls in {during:.1f} s -> {statuses.get(200, 0)} served, "
          f"{statuses.get(503, 0)} refused (503); {unwritten} rows waiting and {dropped} dropped at the end "
          f"of the fault; ledger rows after stop {rows} (10 before the fault) = upstream answered {answered}; "
          f"caught up {catch_up * 1000:.0f} ms after the fault cleared")


async def main(calls: int, policy: str, backlog: int) -> None:
    for fault in ("full disk", "lock"):
        await scenario(fault, calls, policy, backlog)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--policy", choices=("refuse", "serve"), default="refuse")
    parser.add_argument("--backlog", type=int, default=100_000, help="ledger_max_backlog")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.policy, args.backlog))
