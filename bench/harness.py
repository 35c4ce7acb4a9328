"""What every benchmark shares: the fake upstream and `tollgate serve` as processes, load
generators, and readings of a process's memory and file descriptors.

    python bench/harness.py --serve-upstream PORT   # the fake upstream, as the benchmarks run it
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola, ¿cómo estás?"}]}


# --- processes ---------------------------------------------------------------------------


def serve_upstream(port: int) -> None:
    """Run the fake upstream; `big-<n>` models answer with a reply of about n bytes."""
    from aiohttp import web

    from tests.fake_upstream import Behavior, FakeUpstream

    fake = FakeUpstream()
    fake.seen = _Discard()  # keep the upstream's memory flat too
    for size in (1 << 10, 1 << 17, 1 << 20, 1 << 23, 1 << 25):
        content = "x" * size
        body = orjson.dumps({"id": "b", "object": "chat.completion", "created": 0, "model": f"big-{size}",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": size // 4,
                                       "total_tokens": 5 + size // 4}})
        fake.by_model[f"big-{size}"] = Behavior(raw_body=body)
    fake.behavior = Behavior(chunks=8, prompt_tokens=20, completion_per_chunk=2)
    # Faults for mixed load (bench/soak.py): the proxy must count them, not be broken by them.
    fake.by_model["fault-500"] = Behavior(status=500)
    fake.by_model["fault-drop"] = Behavior(chunks=8, drop_after_chunks=3)
    fake.by_model["fault-nousage"] = Behavior(chunks=4, honor_include_usage=False)
    web.run_app(fake.app, host="127.0.0.1", port=port, access_log=None,
                print=lambda _: print("upstream ready", flush=True))


class _Discard(list):  # type: ignore[type-arg]
    def append(self, _: object) -> None:
        pass


async def start(args: list[str], ready: bytes, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"{args} exited before it was ready")
        if ready in line:
            break
    # Drain the rest of its output so a full pipe never blocks it.
    asyncio.get_running_loop().create_task(_drain(proc))
    return proc


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


# --- load --------------------------------------------------------------------------------


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    start = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        async for _ in r.content.iter_any():
            pass
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status} from {url}")
    return time.perf_counter() - start


async def closed_loop(url: str, body: bytes, total: int, concurrency: int) -> float:
    """requests/s with `concurrency` clients each sending back to back."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await one(session, url, body)  # warm the pool
        remaining = total

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one(session, url, body)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


async def open_loop(url: str, body: bytes, rate: float, seconds: float,
                    call: Callable[[aiohttp.ClientSession, str, bytes], Coroutine[Any, Any, float]] | None = None
                    ) -> list[float]:
    """Times of requests sent at a fixed rate, whatever the replies do (no coordinated omission):
    each as `call` measures it (the whole call, by default)."""
    measure = call or one
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(20):
            await measure(session, url, body)
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(measure(session, url, body)))
        return list(await asyncio.gather(*tasks))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def start_upstream() -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    proc = await start([sys.executable, str(ROOT / "bench" / "harness.py"), "--serve-upstream", str(port)],
                       b"upstream ready")
    return proc, port


def cloud_config(up_port: int) -> str:
    """The proxy config most benchmarks use: one OpenAI upstream (the fake) for every model, priced."""
    return f"""
[upstreams.cloud]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}"
models = ["*"]
[prices."gpt-4o"]
input = 0.03
output = 0.06
"""


async def start_proxy(config: str, data_dir: Path | None = None) -> tuple[asyncio.subprocess.Process, int, Path]:
    """`tollgate serve` with `config` (TOML; the [server] table is supplied here), its ledger in
    `data_dir` or a fresh directory."""
    port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    data = data_dir or tmp / "data"
    (tmp / "config.toml").write_text(f"[server]\nport = {port}\ndata_dir = \"{data}\"\n{config}")
    proc = await start([sys.executable, "-m", "proxy", "-c", str(tmp / "config.toml"), "serve"],
                       b"tollgate ready", env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, port, tmp


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """`rev` checked out in a temporary git worktree, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tollgate-tree-") as holder:
        tree = Path(holder) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                       check=True, capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


async def serve_from(tree: Path, config: str, wrapper: Sequence[str] = ()) -> tuple[asyncio.subprocess.Process, int]:
    """`tollgate serve` running the code in `tree` (under `wrapper`, such as valgrind, if given),
    its ledger in a fresh directory. `python -P`: the code of `tree`, not of the current directory,
    which `python -m` would otherwise put first."""
    port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="tollgate-serve-"))
    (tmp / "config.toml").write_text(f"[server]\nport = {port}\ndata_dir = \"{tmp / 'data'}\"\n{config}")
    proc = await start([*wrapper, sys.executable, "-P", "-m", "proxy", "-c", str(tmp / "config.toml"), "serve"],
                       b"tollgate ready", env={**os.environ, "PYTHONPATH": str(tree)})
    return proc, port


async def stop(*procs: asyncio.subprocess.Process) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", required=True)
    serve_upstream(parser.parse_args().serve_upstream)
