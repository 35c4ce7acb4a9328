"""What a hostile body costs everyone else: event-loop lag and /healthz latency while clients
send worst-case bodies.

    python bench/worst_bodies.py [--seconds 10] [--clients 2]

The worst case for the estimator is a 10 MB chat body of one-character messages (about 330,000
of them): every message is a separate piece of text to tokenise. Two clients send such bodies
back to back, through a proxy whose limits need an estimate of every call (tpm, as the shipped
config has), while a third probes /healthz every 20 ms. The proxy runs in its own process with a
monitor in its event loop that wakes every 10 ms and records how late it woke (the lag every
other call on that loop suffers); it prints the lag's percentiles when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import free_port, pct, start_upstream, stop  # noqa: E402

_TICK = 0.01


def serve_proxy(config_path: str) -> None:
    """The real app, as `tollgate serve` runs it, plus a lag monitor in its loop."""
    import uvloop
    from aiohttp import web

    from proxy import config as config_mod
    from proxy.app import create_app

    config = config_mod.load(config_path)
    app = create_app(config)
    lags: list[float] = []

    async def monitor(app: web.Application):  # type: ignore[no-untyped-def]
        async def run() -> None:
            loop = asyncio.get_running_loop()
            while True:
                before = loop.time()
                await asyncio.sleep(_TICK)
                lags.append(loop.time() - before - _TICK)

        task = asyncio.create_task(run())
        yield
        task.cancel()
        if lags:
            print(f"lag n={len(lags)} p50={pct(lags, 0.5) * 1000:.2f}ms p99={pct(lags, 0.99) * 1000:.2f}ms "
                  f"max={max(lags) * 1000:.2f}ms", flush=True)

    app.cleanup_ctx.append(monitor)
    web.run_app(app, host="127.0.0.1", port=config.server.port, access_log=None,
                loop=uvloop.new_event_loop(), print=lambda _: print("tollgate ready", flush=True))


def worst_body() -> bytes:
    messages = [{"role": "user", "content": "a"}] * 330_000
    return orjson.dumps({"model": "gpt-4o", "messages": messages})


async def run(seconds: float, clients: int) -> None:
    upstream, up_port = await start_upstream()
    port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    (tmp / "config.toml").write_text(f"""
[server]
port = {port}
data_dir = "{tmp / 'data'}"
max_body_bytes = 11000000
[upstreams.cloud]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}"
models = ["*"]
[upstreams.cloud.limits]
tpm = 1000000000000
""")
    proxy = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__)), "--serve-proxy", str(tmp / "config.toml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proxy.stdout is not None
    while b"tollgate ready" not in await asyncio.wait_for(proxy.stdout.readline(), 60):
        pass
    body = worst_body()
    print(f"body: {len(body) / 1e6:.1f} MB, 330,000 messages; {clients} clients; {seconds:g} s")
    url = f"http://127.0.0.1:{port}"
    stop_at = time.perf_counter() + seconds
    sent = [0]

    async def hostile() -> None:
        async with aiohttp.ClientSession() as session:
            while time.perf_counter() < stop_at:
                async with session.post(url + "/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    sent[0] += 1

    async def probe() -> list[float]:
        took: list[float] = []
        async with aiohttp.ClientSession() as session:
            while time.perf_counter() < stop_at:
                before = time.perf_counter()
                async with session.get(url + "/healthz") as r:
                    await r.read()
                took.append(time.perf_counter() - before)
                await asyncio.sleep(0.02)
        return took

    try:
        results = await asyncio.gather(probe(), *(hostile() for _ in range(clients)))
    finally:
        proxy.send_signal(signal.SIGINT)
        for line in (await proxy.stdout.read()).decode().splitlines():
            if line.startswith("lag"):
                print("event-loop " + line)
        await proxy.wait()
        await stop(upstream)
    healthz = results[0]
    assert healthz is not None
    print(f"hostile calls served: {sent[0]}")
    print(f"/healthz latency: n={len(healthz)} p50={pct(healthz, 0.5) * 1000:.2f}ms "
          f"p99={pct(healthz, 0.99) * 1000:.2f}ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--serve-proxy", metavar="CONFIG")
    args = parser.parse_args()
    if args.serve_proxy:
        serve_proxy(args.serve_proxy)
    else:
        asyncio.run(run(args.seconds, args.clients))
