"""Requests/s of one and two workers behind one port, against the same fake upstream.

    python bench/workers.py [--seconds 10] [--rounds 3] [--connections 32]

Starts a throwaway redis-server (no persistence), the fake upstream and, in interleaved rounds,
`tollgate serve` three ways: one process with the in-memory limiter, one worker with the Redis
limiter, and `--workers 2` with the Redis limiter; the shipped limits shape (rpm, rpd, tpm on
the cloud upstream) with limits high enough that every call is admitted. Load comes from wrk
(Debian's `wrk`) when it is installed, else from an aiohttp closed loop in this process. Prints
each round and the medians; on a 2-core machine the load generator and the upstream share the
cores with the workers, so read the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import CHAT, ROOT, closed_loop, free_port, start, start_upstream, stop  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

LIMITS = "limits = { rpm = 100000000, rpd = 1000000000, tpm = 1000000000 }"


async def start_tollgate(upstream_port: int, backend: str, workers: int, redis_url: str) -> tuple[asyncio.subprocess.Process, int]:
    port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    (tmp / "config.toml").write_text(f"""
[server]
port = {port}
data_dir = "{tmp / 'data'}"
workers = {workers}
[limits]
backend = "{backend}"
[redis]
url_env = "BENCH_REDIS_URL"
prefix = "bench{port}"
[upstreams.cloud]
kind = "openai"
base_url = "http://127.0.0.1:{upstream_port}"
models = ["*"]
{LIMITS}
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_REDIS_URL": redis_url}
    proc = await start([sys.executable, "-m", "proxy", "-c", str(tmp / "config.toml"), "serve"],
                       b"tollgate ready on", env=env)
    return proc, port


async def load(url: str, seconds: float, connections: int) -> float:
    body = orjson.dumps(CHAT)
    if shutil.which("wrk"):
        script = Path(tempfile.mkdtemp()) / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                          f"wrk.body = '{body.decode()}'\n")
        # Awaited, not run: the proxies' log pipes are drained by this event loop meanwhile.
        proc = await asyncio.create_subprocess_exec("wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "-s",
                                                    str(script), url, stdout=asyncio.subprocess.PIPE)
        out = (await proc.communicate())[0].decode()
        if "Non-2xx" in out:
            raise RuntimeError(f"errors under load:\n{out}")
        found = re.search(r"Requests/sec:\s+([\d.]+)", out)
        assert found, out
        return float(found.group(1))
    return await closed_loop(url, body, int(seconds * 1000), connections)


async def main(seconds: float, rounds: int, connections: int) -> None:
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="tollgate-bench-redis-")))
    redis.start()
    redis_url = redis.url
    upstream, up_port = await start_upstream()
    ways = {"1 process, memory limiter": ("memory", 1), "1 worker, Redis limiter": ("redis", 1),
            "2 workers, Redis limiter": ("redis", 2)}
    results: dict[str, list[float]] = {name: [] for name in ways}
    print(f"load: {'wrk' if shutil.which('wrk') else 'aiohttp closed loop'}, {connections} connections, "
          f"{seconds:g} s a run, {os.cpu_count()} cores")
    try:
        for r in range(rounds):
            for name, (backend, workers) in ways.items():
                proc, port = await start_tollgate(up_port, backend, workers, redis_url)
                try:
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    await load(url, 1, connections)  # warm up
                    rate = await load(url, seconds, connections)
                finally:
                    await stop(proc)
                results[name].append(rate)
                print(f"round {r + 1}: {name:28} {rate:8,.0f} req/s", flush=True)
    finally:
        await stop(upstream)
        redis.stop()
    base = statistics.median(results["1 process, memory limiter"])
    print("\nmedians:")
    for name, rates in results.items():
        print(f"  {name:28} {statistics.median(rates):8,.0f} req/s  ({statistics.median(rates) / base:.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds, args.connections))
