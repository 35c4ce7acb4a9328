"""What one shared admission costs: the Redis script's round trip, against the in-memory limiter.

    python bench/redis_admission.py [--calls 20000]

Starts a throwaway redis-server (no persistence) and times, one call after another, an
admission of a call in three scopes (upstream rpm + tpm, model rpd, user rpm) then its finish:
over a unix socket and over TCP loopback, beside the in-memory limiter doing the same. Prints
p50 and p99 per admission. The limits are high, so every call is admitted (the common case).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import free_port  # noqa: E402
from proxy import config as config_mod  # noqa: E402
from proxy import limits  # noqa: E402
from proxy.limits.redis_windows import RedisWindows, WindowSpec  # noqa: E402

WINDOWS = [WindowSpec("upstream:cloud", "requests", 10**9, span=60),
           WindowSpec("upstream:cloud", "tokens", 10**12, span=60),
           WindowSpec("model:gpt-4o", "requests", 10**9, span=86400),
           WindowSpec("user:ana", "requests", 10**9, span=60)]


def summary(label: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    print(f"{label:28} p50 {statistics.median(samples) * 1000:6.3f} ms   "
          f"p99 {ordered[int(0.99 * len(ordered))] * 1000:6.3f} ms   ({len(samples):,} calls)")


async def redis_admissions(url: str, calls: int) -> list[float]:
    client = aioredis.Redis.from_url(url)
    windows = RedisWindows(client, prefix=f"bench{time.time_ns()}")
    await windows.mark_ready("bench")
    await client.config_resetstat()
    samples = []
    for i in range(calls):
        began = time.perf_counter()
        decision = await windows.admit(f"c{i}", WINDOWS, 100)
        samples.append(time.perf_counter() - began)
        assert decision.admitted
        await windows.finish(f"c{i}", WINDOWS, 100, 90)
    # What Redis itself spent per script (admission and finish alike), beside the round trip.
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    print(f"  (inside Redis: {stats.get('usec_per_call', 0):.1f} us per script, admission or finish)")
    await client.aclose()
    return samples


def memory_admissions(calls: int) -> list[float]:
    raw = {"upstreams": {"cloud": {"kind": "openai", "base_url": "http://127.0.0.1:9", "models": ["*"],
                                   "limits": {"rpm": 10**9, "tpm": 10**12}}},
           "limits": {"models": {"gpt-4o": {"rpd": 10**9}}, "per_user": {"rpm": 10**9}}}
    store = limits.Limiter(config_mod.parse(raw), time.time)
    samples = []
    for _ in range(calls):
        began = time.perf_counter()
        scopes = store.scopes("cloud", "gpt-4o", "ana")
        ticket = store.admit_now(scopes, 100)
        samples.append(time.perf_counter() - began)
        assert not isinstance(ticket, limits.Denial)
        store.finish(ticket, 90)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                   "--unixsocket", f"{tmp}/r.sock", "--save", "", "--appendonly", "no",
                                   "--dir", tmp], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        for line in server.stdout:
            if "ready to accept connections" in line.lower():
                break
        try:
            summary("in memory (this process)", memory_admissions(args.calls))
            summary("redis, unix socket", await redis_admissions(f"unix://{tmp}/r.sock", args.calls))
            summary("redis, TCP loopback", await redis_admissions(f"redis://127.0.0.1:{port}", args.calls))
        finally:
            server.terminate()
            server.wait()
            server.stdout.close()


if __name__ == "__main__":
    asyncio.run(main())
