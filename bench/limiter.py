"""The limiter's cost: admissions per second alone, and the proxy's latency with limits on vs off.

    python bench/limiter.py [--quick]

1. The pure limiter: admit + finish for calls spread over 10,000 users, each user with its
   own per-minute and per-day windows, plus the upstream's RPM/RPD/TPM/concurrency scope.
   Reports admissions per second and the memory the per-user windows hold (tracemalloc).
2. Two `tollgate serve` processes in front of the same fake upstream, one with limits on
   (every scope, high enough never to refuse) and one with none: latency at 500 requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import CHAT, open_loop, pct, start_proxy, start_upstream, stop  # noqa: E402
from proxy import config as config_mod  # noqa: E402
from proxy.limits import Limiter, Ticket  # noqa: E402

BIG = 10**9


def pure(total: int) -> None:
    raw = {"upstreams": {"cloud": {"kind": "openai", "base_url": "http://127.0.0.1:1", "models": ["*"],
                                   "limits": {"rpm": BIG, "rpd": BIG, "tpm": BIG, "concurrency": BIG}}},
           "limits": {"per_user": {"rpm": 1000, "rpd": 10000}}}
    now = [1_700_000_000.0]
    limiter = Limiter(config_mod.parse(raw), lambda: now[0])
    users = [f"user{i}" for i in range(10_000)]
    tracemalloc.start()
    start_t = time.perf_counter()
    for i in range(total):
        now[0] += 0.002  # 500 calls per second of simulated time
        ticket = limiter.admit_now(limiter.scopes("cloud", "gpt-4o", users[i % len(users)]), 120)
        assert isinstance(ticket, Ticket)
        limiter.finish(ticket, 100)
    elapsed = time.perf_counter() - start_t
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"pure limiter: {total / elapsed:,.0f} admissions/s ({total:,} calls over "
          f"{len(users):,} users); tracked users {limiter.tracked_users:,}; "
          f"memory held {current / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB)")


async def proxied(quick: bool) -> None:
    upstream, up_port = await start_upstream()
    procs = [upstream]
    urls = {}
    try:
        for name, limits in (("off", ""), ("on", f"""
[upstreams.cloud.limits]
rpm = {BIG}
rpd = {BIG}
tpm = {BIG}
concurrency = {BIG}
max_input_tokens = 8000
max_output_tokens = 4000
[limits.per_user]
rpm = {BIG}
""")):
            proxy, port, _ = await start_proxy(f"""
[upstreams.cloud]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}"
models = ["*"]
{limits}""")
            procs.append(proxy)
            urls[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = orjson.dumps({**CHAT, "user": "ana"})
        rounds, seconds = (1, 2) if quick else (3, 5)
        results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        for _ in range(rounds):
            for name in ("off", "on"):
                lat = await open_loop(urls[name], body, 500, seconds)
                results[name].append((pct(lat, .5), pct(lat, .99)))
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
        print(f"proxy at 500 req/s, limits off: p50 {med['off'][0] * 1e3:.2f} ms p99 {med['off'][1] * 1e3:.2f} ms | "
              f"limits on: p50 {med['on'][0] * 1e3:.2f} ms p99 {med['on'][1] * 1e3:.2f} ms | "
              f"added p50 {(med['on'][0] - med['off'][0]) * 1e3:+.2f} ms p99 {(med['on'][1] - med['off'][1]) * 1e3:+.2f} ms")
    finally:
        await stop(*procs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    pure(50_000 if args.quick else 300_000)
    asyncio.run(proxied(args.quick))
