"""A hostile run against the real `tollgate serve`, on loopback only: what got through.

    python bench/hostile.py [--each 500]

The proxy runs with an admin token and a proxy key; the fake upstream counts what reaches it.
Each class of attack is tried `--each` times (connections: 2,000 sockets), then the proxy is
stopped and its whole log searched for every secret the run used. Prints, per class: requests
tried, statuses seen, and how many reached the upstream; then the secrets found in the log and
the proxy's file descriptors while the sockets were open.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import fds, free_port, start_upstream, stop  # noqa: E402

ADMIN, KEY, CLOUD = "adm-secret-7f3a9c", "bot-secret-41d2e8", "ghp_cloud-secret-99aa"
STOLEN = "sk-stolen-secret-5b6c"
SECRETS = (ADMIN, KEY, CLOUD, STOLEN)
CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]})
JSON = {"Content-Type": "application/json"}


async def upstream_requests(up_port: int) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{up_port}/_tally") as r:
            return int((await r.json())["requests"])


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    reply = await reader.read(200)
    writer.close()
    return reply


async def run(each: int) -> None:
    upstream, up_port = await start_upstream()
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-hostile-"))
    port = free_port()
    (tmp / "config.toml").write_text(f"""
[server]
port = {port}
data_dir = "{tmp / 'data'}"
admin_token_env = "HOSTILE_ADMIN"
max_connections = 256
[keys.bot]
key_env = "HOSTILE_KEY"
[upstreams.cloud]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}"
api_key_env = "HOSTILE_CLOUD"
models = ["*"]
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOSTILE_ADMIN": ADMIN, "HOSTILE_KEY": KEY, "HOSTILE_CLOUD": CLOUD}
    proxy = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "-c", str(tmp / "config.toml"),
                                                 "serve", stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT, env=env)
    assert proxy.stdout is not None
    log: list[bytes] = []
    while b"tollgate ready" not in (line := await proxy.stdout.readline()):
        log.append(line)

    async def drain() -> None:
        assert proxy.stdout is not None
        while line := await proxy.stdout.readline():
            log.append(line)

    drainer = asyncio.create_task(drain())
    url = f"http://127.0.0.1:{port}"
    rows: list[tuple[str, int, Counter[int], int]] = []

    async def attempt(name: str, send: object) -> None:
        before = await upstream_requests(up_port)
        statuses: Counter[int] = Counter()
        async with aiohttp.ClientSession() as s:
            for _ in range(each):
                statuses[await send(s)] += 1  # type: ignore[operator]
        rows.append((name, each, statuses, await upstream_requests(up_port) - before))

    async def post(s: aiohttp.ClientSession, path: str, headers: dict[str, str], data: bytes = CHAT) -> int:
        async with s.post(url + path, data=data, headers=headers) as r:
            await r.read()
            return r.status

    async def malformed(_: aiohttp.ClientSession) -> int:
        reply = await raw(port, b"POST /v1/chat/completions?token=" + STOLEN.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1"
                          b"\r\nAuthorization: Bearer " + KEY.encode() + b"\x00\r\n\r\n")
        return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0

    await attempt("malformed requests carrying secrets", malformed)
    await attempt("metered calls without a key", lambda s: post(s, "/v1/chat/completions", JSON))
    await attempt("metered calls with a wrong key",
                  lambda s: post(s, "/v1/chat/completions", {**JSON, "Authorization": f"Bearer {STOLEN}"}))
    await attempt("a page's no-cors text/plain POST (cross-origin)",
                  lambda s: post(s, "/v1/chat/completions", {"Content-Type": "text/plain", "Origin": "https://evil.example",
                                                              "Authorization": f"Bearer {KEY}"}))
    await attempt("a page's JSON POST from another origin",
                  lambda s: post(s, "/v1/chat/completions", {**JSON, "Origin": "http://127.0.0.1:1",
                                                              "Authorization": f"Bearer {KEY}"}))
    await attempt("DNS rebinding (a foreign Host)",
                  lambda s: post(s, "/v1/chat/completions", {**JSON, "Host": "evil.example",
                                                              "Authorization": f"Bearer {KEY}"}))
    await attempt("cross-origin POST /metrics/reset with the admin token",
                  lambda s: post(s, "/metrics/reset", {"Origin": "https://evil.example",
                                                       "Authorization": f"Bearer {ADMIN}"}, b""))
    await attempt("unmetered paths (images, files, batches) with a key",
                  lambda s: post(s, "/v1/images/generations", {**JSON, "Authorization": f"Bearer {KEY}"}))
    await attempt("admin endpoints without the token", lambda s: post(s, "/metrics/reset", {}, b""))

    socks = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2000)]
    held = fds(proxy.pid)
    for _, writer in socks:
        writer.close()

    proxy.send_signal(signal.SIGTERM)
    await proxy.wait()
    await drainer
    await stop(upstream)
    text = b"".join(log).decode(errors="replace")
    print(f"{'class':<56} {'tried':>6} {'reached upstream':>17}  statuses")
    for name, tried, statuses, reached in rows:
        print(f"{name:<56} {tried:>6} {reached:>17}  {dict(statuses)}")
    print(f"secrets found in the log ({len(text):,} bytes): {sum(text.count(s) for s in SECRETS)}")
    print(f"2,000 idle sockets opened: the proxy held {held} file descriptors (max_connections = 256)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--each", type=int, default=500)
    asyncio.run(run(parser.parse_args().each))
