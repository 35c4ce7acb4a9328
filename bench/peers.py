"""Tollgate beside its peers: LiteLLM's proxy and Portkey's gateway, with the bare relay and the
direct call, against the same fake upstream, in one run.

    python bench/peers.py [--rounds 3] [--seconds 8] [--envs /tmp/tollgate-peers]

The peers are installed, when missing, into a throwaway directory outside the project (`--envs`):
LiteLLM from PyPI into a virtual environment of its own (run with telemetry off and its model
cost map read from the package, never fetched), Portkey's gateway from npm (pointed at the fake
upstream as a custom host). Each serves non-streaming and streaming chat to wrk (32 connections)
in interleaved rounds; CPU per call is read from /proc like bench/cpu.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import BODY, cpu_seconds, shipped, wrk  # noqa: E402
from bench.harness import ROOT, free_port, rss_kib, start, start_proxy, start_upstream, stop  # noqa: E402

PORTKEY = "@portkey-ai/gateway@1.15.2"


def install(envs: Path) -> tuple[Path, Path]:
    """LiteLLM's and Portkey's entry points, installed into `envs` the first time."""
    envs.mkdir(parents=True, exist_ok=True)
    venv = envs / "litellm"
    litellm = venv / "bin" / "litellm"
    if not litellm.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    node = envs / "portkey"
    gateway = node / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if not gateway.exists():
        node.mkdir(exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", PORTKEY], cwd=node, check=True,
                       capture_output=True)
    return litellm, gateway


def script(directory: Path, stream: bool, headers: dict[str, str], name: str) -> Path:
    path = directory / f"{name}-{'stream' if stream else 'plain'}.lua"
    body = BODY % (', "stream": true' if stream else "")
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path.write_text("\n".join(lines) + f"\nwrk.body = [[{body}]]\n")
    return path


async def main(rounds: int, seconds: int, envs: Path) -> None:
    litellm, gateway = install(envs)
    upstream, up_port = await start_upstream()
    up = f"http://127.0.0.1:{up_port}"
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-peers-"))
    (tmp / "litellm.yaml").write_text(
        "model_list:\n  - model_name: gpt-4o\n    litellm_params:\n      model: openai/gpt-4o\n"
        f"      api_base: {up}\n      api_key: fake\nlitellm_settings:\n  telemetry: false\n"
        "  drop_params: true\n")
    # LiteLLM's proxy will not start without a master key; callers then present it.
    master = "sk-tollgate-bench-" + secrets.token_hex(16)
    peers_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
                 "DISABLE_ADMIN_UI": "True", "LITELLM_MASTER_KEY": master}
    lite_port, key_port, bare_port = free_port(), free_port(), free_port()
    lite = await start([str(litellm), "--config", str(tmp / "litellm.yaml"), "--port", str(lite_port),
                        "--host", "127.0.0.1", "--num_workers", "1"], b"Uvicorn running", env=peers_env)
    portkey = await start(["node", str(gateway), f"--port={key_port}"], b"Ready", env=peers_env)
    bare = await start([sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(bare_port), up],
                       b"bare relay ready")
    proxy, proxy_port, _ = await start_proxy(shipped(up_port, limits=False))
    targets = {
        "direct": (f"{up}/chat/completions", None, {}),
        "bench/bare_relay.py": (f"http://127.0.0.1:{bare_port}/v1/chat/completions", bare.pid, {}),
        "Tollgate": (f"http://127.0.0.1:{proxy_port}/v1/chat/completions", proxy.pid, {}),
        "Portkey gateway (Node)": (f"http://127.0.0.1:{key_port}/v1/chat/completions", portkey.pid,
                                   {"x-portkey-provider": "openai", "x-portkey-custom-host": f"{up}/v1",
                                    "Authorization": "Bearer fake"}),
        "LiteLLM proxy": (f"http://127.0.0.1:{lite_port}/v1/chat/completions", lite.pid,
                          {"Authorization": f"Bearer {master}"}),
    }
    figures: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    peaks: dict[str, int] = {}
    failing: dict[tuple[str, str], str] = {}   # what a peer could not serve, and how it failed
    try:
        for kind in ("non-streaming", "streaming"):
            for name, (url, _, headers) in targets.items():   # warm-up, and each answers at all
                try:
                    await wrk(url, script(tmp, kind == "streaming", headers, str(abs(hash(name)))), 2, 32)
                except RuntimeError as exc:
                    failing[(kind, name)] = str(exc).splitlines()[0]
        for _ in range(rounds):
            for kind in ("non-streaming", "streaming"):
                for name, (url, pid, headers) in targets.items():
                    if (kind, name) in failing:
                        continue
                    lua = script(tmp, kind == "streaming", headers, str(abs(hash(name))))
                    before = cpu_seconds(pid) if pid else 0.0
                    done, rate, p50, p99 = await wrk(url, lua, seconds, 32)
                    cpu_us = (cpu_seconds(pid) - before) / done * 1e6 if pid else float("nan")
                    figures.setdefault((kind, name), []).append((rate, cpu_us, p50, p99))
                    if pid:
                        peaks[name] = max(peaks.get(name, 0), rss_kib(pid)[1])
    finally:
        await stop(proxy, bare, portkey, lite, upstream)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# Tollgate and its peers: {os.cpu_count()} cores, wrk -t2 -c32 -d{seconds}s, {rounds} interleaved "
          f"rounds, medians; CPU per call from /proc")
    print("| | non-streaming req/s | CPU µs/call | streaming req/s | CPU µs/call | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in targets:
        cells = []
        for kind in ("non-streaming", "streaming"):
            if (kind, name) in failing:
                cells += ["fails", "–"]
                continue
            rows = figures[(kind, name)]
            rate, cpu = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
            cells += [f"{rate:,.0f}", "–" if cpu != cpu else f"{cpu:,.0f}"]
        peak = f"{peaks[name] / 1024:.0f} MB" if name in peaks else "–"
        print(f"| {name} | {' | '.join(cells)} | {peak} |")
    for (kind, name), why in failing.items():
        print(f"{name}, {kind}: {why}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--envs", type=Path, default=Path(tempfile.gettempdir()) / "tollgate-peers")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.seconds, args.envs))
