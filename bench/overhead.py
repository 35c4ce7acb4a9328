"""What the proxy adds: through-proxy vs direct calls to the same fake upstream, in one run.

    python bench/overhead.py [--quick]

Starts the fake upstream (tests/fake_upstream.py) and the real `tollgate serve` as separate
processes on loopback, then from this process measures, alternating direct and proxied runs:

1. throughput: a closed loop of N concurrent clients, requests/s (non-streaming and streaming chat);
   and, as the ceiling for any aiohttp proxy here, a bare relay (bench/bare_relay.py);
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
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (CHAT, ROOT, closed_loop, cloud_config, free_port, one, open_loop, pct, reset_peak,  # noqa: E402
                           rss_kib, start, start_proxy, start_upstream, stop)


async def main(quick: bool) -> None:
    rounds = 1 if quick else 3
    upstream, up_port = await start_upstream()
    proxy, proxy_port, _ = await start_proxy(cloud_config(up_port))
    bare_port = free_port()
    bare = await start([sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(bare_port),
                        f"http://127.0.0.1:{up_port}"], b"bare relay ready")
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
            if name == "non-streaming":
                plain_direct, plain_proxy = dm, pm
        # The ceiling for any aiohttp proxy here: a relay that does nothing but relay.
        b = [await closed_loop(f"http://127.0.0.1:{bare_port}/v1/chat/completions", plain, total, 32)
             for _ in range(rounds)]
        bm = statistics.median(b)
        print(f"{'bare relay':14} {bm:7.0f} req/s (aiohttp relay, no metering): {bm / plain_direct:5.1%} of "
              f"non-streaming direct; "
              f"Tollgate non-streaming is {plain_proxy / bm:5.1%} of it")

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
        await stop(proxy, bare, upstream)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round per figure")
    asyncio.run(main(parser.parse_args().quick))
