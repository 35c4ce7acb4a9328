"""Mixed load against the real process: memory and file descriptors stay flat, books stay exact.

    python bench/soak.py [--minutes 10] [--rate 200]
    python bench/soak.py --minutes 1 --rate 500      # the 60-second load check

Starts the fake upstream and the real `tollgate serve` as processes, then sends an open-loop
mix at `--rate` calls per second: OpenAI and Ollama dialects, streaming and not, plus faults
(upstream 500s, streams cut mid-way, an upstream that ignores include_usage). Every minute it
prints the proxy's RSS and open file descriptors. At the end it compares /stats with the fake
upstream's own tally: requests, and tokens the upstream reported, to the token.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import fds, rss_kib, start_proxy, start_upstream, stop  # noqa: E402
from bench.profile import record, writer_share  # noqa: E402

MESSAGES = [{"role": "user", "content": "hola, ¿qué tal?"}]
# (weight, path, body): what a WhatsApp bot and its operator's tests would send.
MIX = [
    (30, "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}),
    (25, "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "stream": True}),
    (20, "/api/chat", {"model": "llama3.2", "messages": MESSAGES}),
    (15, "/api/generate", {"model": "llama3.2", "prompt": "hola", "stream": False}),
    (4, "/v1/chat/completions", {"model": "fault-500", "messages": MESSAGES}),
    (3, "/v1/chat/completions", {"model": "fault-drop", "messages": MESSAGES, "stream": True}),
    (3, "/v1/chat/completions", {"model": "fault-nousage", "messages": MESSAGES, "stream": True}),
]


async def main(minutes: float, rate: float) -> int:
    upstream, up_port = await start_upstream()
    proxy, port, _ = await start_proxy(f"""
[upstreams.cloud]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}"
models = ["gpt-4o", "fault-*"]
[upstreams.local]
kind = "ollama"
base_url = "http://127.0.0.1:{up_port}"
models = ["*"]
[prices."gpt-4o"]
input = 0.03
output = 0.06
""")
    assert proxy.pid is not None
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(1)
    weights = [w for w, _, _ in MIX]
    statuses: Counter[int] = Counter()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one(path: str, body: bytes) -> None:
                try:
                    async with session.post(base + path, data=body, headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        statuses[r.status] += 1
                except aiohttp.ClientPayloadError:
                    statuses[-1] += 1  # a cut stream the client saw as cut: expected for fault-drop

            bodies = [(path, orjson.dumps(body)) for _, path, body in MIX]
            # Warm up (tiktoken's tables load on the first estimate, pools fill) before the
            # first reading, so "flat" compares steady states. Warm-up calls are in the totals.
            warm = 50 * len(bodies)
            await asyncio.gather(*(one(*bodies[i % len(bodies)]) for i in range(warm)))
            total = int(minutes * 60 * rate)
            start_t = time.perf_counter()
            next_report = 0.0
            tasks: set[asyncio.Task[None]] = set()
            print(f"# soak: {minutes:g} min at {rate:g} calls/s ({total:,} calls), proxy pid {proxy.pid}")
            # The GIL the ledger's writer takes, sampled by py-spy over the first minute at most.
            gil_raw = Path(tempfile.mkdtemp(prefix="tollgate-soak-")) / "gil.txt"
            gil = asyncio.create_task(record(proxy.pid, max(5, min(60, int(minutes * 30))), gil_raw, gil=True))
            for i in range(total):
                elapsed = time.perf_counter() - start_t
                if elapsed >= next_report:
                    rss, _ = rss_kib(proxy.pid)
                    print(f"t={elapsed:6.0f}s sent={i:>8,} RSS={rss / 1024:6.1f} MiB fds={fds(proxy.pid)}", flush=True)
                    next_report += 60.0
                delay = start_t + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                path, body = bodies[rng.choices(range(len(MIX)), weights)[0]]
                task = asyncio.create_task(one(path, body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start_t
            if await gil:
                writer, held = writer_share(gil_raw)
                print(f"ledger writer: {writer / max(1, held):.1%} of the time the GIL was held "
                      f"({writer:,} of {held:,} py-spy --gil samples)")
            else:
                print("ledger writer's GIL share: not measured (py-spy missing or not allowed)")
            rss, peak = rss_kib(proxy.pid)
            print(f"t={elapsed:6.0f}s sent={total:>8,} RSS={rss / 1024:6.1f} MiB (peak {peak / 1024:.1f}) "
                  f"fds={fds(proxy.pid)}")
            async with session.get(base + "/stats") as r:
                stats = await r.json()
            async with session.get(f"http://127.0.0.1:{up_port}/_tally") as r:
                tally = await r.json()
        detail = stats["detail"]
        print(f"achieved {total / elapsed:,.0f} calls/s; client saw {dict(sorted(statuses.items()))}")
        print(f"proxy errors by kind: { {k: v for k, v in detail['errors_by_kind'].items() if v} }")
        reported = detail["tokens"]["total"] - detail["tokens"]["estimated"]
        checks = {
            "every call in /stats": stats["total_requests"] == total + warm,
            "every call reached the upstream once": tally["requests"] == total + warm,
            "tokens the upstream reported, to the token": reported == tally["prompt"] + tally["completion"],
            "no error the upstream did not cause": set(k for k, v in detail["errors_by_kind"].items() if v)
            <= {"upstream_status", "broken_stream"},
        }
        for name, ok in checks.items():
            print(f"{'OK  ' if ok else 'FAIL'} {name}")
        print(f"/stats tokens {reported:,} (+{detail['tokens']['estimated']:,} estimated); "
              f"upstream reported {tally['prompt'] + tally['completion']:,}")
        return 0 if all(checks.values()) else 1
    finally:
        await stop(proxy, upstream)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=200)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.minutes, args.rate)))
