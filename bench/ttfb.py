"""No slower start for a stream: time to the first byte of a streamed reply, direct and through
Tollgate, at a fixed rate, in one run.

    python bench/ttfb.py [--rate 200] [--seconds 10] [--rounds 3]

Starts the fake upstream, `bench/bare_relay.py` and `tollgate serve` with the shipped config (its
tagging rules, no limits), then sends streaming chat at `--rate` calls per second (open loop:
requests leave on schedule whatever the replies do), in interleaved rounds of the direct call,
the bare relay and Tollgate, and times each call from the moment it is sent to its first body
byte. Prints p50 and p99 of each and what each relay adds (medians of the rounds). The bare
relay's figure is the floor: what a second loopback hop through any aiohttp relay costs on the
day's host, which has moved the same code's figure by half a millisecond between days.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import BODY, shipped  # noqa: E402
from bench.harness import ROOT, free_port, open_loop, pct, start, start_proxy, start_upstream, stop  # noqa: E402


async def first_byte(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    began = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        await r.content.readany()
        took = time.perf_counter() - began
        async for _ in r.content.iter_any():   # the rest of the stream, as a client reads it
            pass
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status} from {url}")
    return took


async def main(rate: float, seconds: float, rounds: int) -> None:
    upstream, up_port = await start_upstream()
    bare_port = free_port()
    bare = await start([sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(bare_port),
                        f"http://127.0.0.1:{up_port}"], b"bare relay ready")
    proxy, port, _ = await start_proxy(shipped(up_port, limits=False))
    body = (BODY % ', "stream": true').encode()
    targets = {"direct": f"http://127.0.0.1:{up_port}/chat/completions",
               "bare relay": f"http://127.0.0.1:{bare_port}/v1/chat/completions",
               "Tollgate": f"http://127.0.0.1:{port}/v1/chat/completions"}
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
    try:
        for _ in range(rounds):
            for name, url in targets.items():
                times = await open_loop(url, body, rate, seconds, first_byte)
                rows[name].append((pct(times, 0.5) * 1000, pct(times, 0.99) * 1000))
    finally:
        await stop(proxy, bare, upstream)
    print(f"# time to first byte of a stream at {rate:g} calls/s, {rounds} interleaved rounds of {seconds:g} s "
          f"(medians, ms)\n| target | p50 | p99 |\n|---|---:|---:|")
    p50 = {name: statistics.median(r[0] for r in rows[name]) for name in targets}
    p99 = {name: statistics.median(r[1] for r in rows[name]) for name in targets}
    for name in targets:
        print(f"| {name} | {p50[name]:.3f} | {p99[name]:.3f} |")
    for name in ("bare relay", "Tollgate"):
        print(f"{name} adds p50 {p50[name] - p50['direct']:+.3f} ms, p99 {p99[name] - p99['direct']:+.3f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.seconds, args.rounds))
