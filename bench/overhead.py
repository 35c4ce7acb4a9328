"""What the proxy adds: through-proxy vs direct calls to the same fake upstream, in one run.

    python bench/overhead.py [--quick]

Starts the fake upstream (tests/fake_upstream.py) and the real `tollgate serve` as separate
processes on loopback, then from this process measures, alternating direct and proxied runs:

1. throughput: a closed loop of N concurrent clients, requests/s (non-streaming and streaming chat);
2. latency at a fixed 500 requests/s (open loop): p50 and p99, and what the proxy adds;
3. memory: the proxy's RSS and peak RSS while relaying non-streamed replies of growing size.

Figures are medians over repeated rounds; the machine is shared, so compare ratios within
one run rather than absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
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
    fake.seen = _Discard()  # type: ignore[assignment]  # keep the upstream's memory flat too
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
    import socket

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


async def open_loop(url: str, body: bytes, rate: float, seconds: float) -> list[float]:
    """Latencies of requests sent at a fixed rate, whatever the replies do (no coordinated omission)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(20):
            await one(session, url, body)
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, url, body)))
        return list(await asyncio.gather(*tasks))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(quick: bool) -> None:
    rounds = 1 if quick else 3
    up_port, proxy_port = free_port(), free_port()
    upstream = await start([sys.executable, __file__, "--serve-upstream", str(up_port)], b"upstream ready")
    tmp = tempfile.mkdtemp(prefix="tollgate-bench-")
    config = Path(tmp) / "config.toml"
    config.write_text(f"""
[server]
port = {proxy_port}
data_dir = "{tmp}/data"
max_body_bytes = 1048576
[upstreams.cloud]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}"
models = ["*"]
[prices."gpt-4o"]
input = 0.03
output = 0.06
""")
    proxy = await start([sys.executable, "-m", "proxy", "-c", str(config), "serve"], b"tollgate ready",
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
    direct = f"http://127.0.0.1:{up_port}/chat/completions"
    through = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
    plain = orjson.dumps(CHAT)
    streamed = orjson.dumps({**CHAT, "stream": True})
    try:
        print(f"# tollgate overhead benchmark, {os.cpu_count()} cores, {rounds} round(s) per figure")
        print("\n## throughput (closed loop, 32 clients)")
        total = 1000 if quick else 3000
        for name, body in (("non-streaming", plain), ("streaming", streamed)):
            d = [await closed_loop(direct, body, total, 32) for _ in range(rounds)]
            p = [await closed_loop(through, body, total, 32) for _ in range(rounds)]
            dm, pm = statistics.median(d), statistics.median(p)
            print(f"{name:14} direct {dm:7.0f} req/s   proxy {pm:7.0f} req/s   ratio {pm / dm:5.1%}")

        print("\n## latency at 500 requests/s (open loop)")
        seconds = 2 if quick else 5
        for name, body in (("non-streaming", plain), ("streaming", streamed)):
            rows = []
            for _ in range(rounds):
                d = await open_loop(direct, body, 500, seconds)
                p = await open_loop(through, body, 500, seconds)
                rows.append((pct(d, .5), pct(d, .99), pct(p, .5), pct(p, .99)))
            d50, d99, p50, p99 = (statistics.median(r[i] for r in rows) for i in range(4))
            print(f"{name:14} direct p50 {d50 * 1e3:6.2f} ms p99 {d99 * 1e3:6.2f} ms | proxy p50 {p50 * 1e3:6.2f} ms "
                  f"p99 {p99 * 1e3:6.2f} ms | added p50 {(p50 - d50) * 1e3:+.2f} ms p99 {(p99 - d99) * 1e3:+.2f} ms")

        print("\n## proxy memory as the reply grows (8 concurrent non-streamed replies)")
        assert proxy.pid is not None
        async with aiohttp.ClientSession() as session:
            for size in (1 << 10, 1 << 17, 1 << 20, 1 << 23, 1 << 25):
                reset_peak(proxy.pid)
                body = orjson.dumps({**CHAT, "model": f"big-{size}"})
                await asyncio.gather(*(one(session, through, body) for _ in range(8)))
                rss, peak = rss_kib(proxy.pid)
                print(f"reply {size / 1024:8.0f} KiB   proxy RSS {rss / 1024:6.1f} MiB   peak {peak / 1024:6.1f} MiB")
    finally:
        for proc in (proxy, upstream):
            proc.terminate()
            await proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round per figure")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
    else:
        asyncio.run(main(args.quick))
