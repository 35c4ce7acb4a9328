"""The cost of one call: CPU per call and throughput of Tollgate against a bare relay, in one run.

    python bench/cpu.py [--rounds 3] [--seconds 10] [--connections 32] [--rate 800]

Starts the fake upstream (tests/fake_upstream.py), `bench/bare_relay.py`,
`bench/metering_floor.py` (the bare relay plus usage read and one SQLite row a call) and two
`tollgate serve` processes with the shipped config.toml pointed at the fake upstream: one with its tagging rules
and no limits, one with every limit the shipped config checks (rpm, rpd, tpm, concurrency, the
per-request caps; values scaled up so the load is admitted; no fallback). For non-streaming and
streaming chat, in interleaved rounds, wrk drives each target for a fixed time; each process's
CPU is read from /proc/PID/stat (utime + stime) before and after and divided by the calls wrk
completed. Medians of the rounds are printed, with each target's ratio to the bare relay.

With `--rate`, each target also takes the same calls a second from an open-loop client (this
script's aiohttp), in interleaved rounds. A process's CPU per call depends on its rate: at a
lower rate fewer calls share each turn of its event loop and each wake-up, so under wrk the
slower target pays for that too. At one rate for all, the ratio is the cost of the work alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import ROOT, free_port, open_loop, pct, start, start_proxy, start_upstream, stop  # noqa: E402
from tests.conftest import to_toml  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
BODY = '{"model": "gpt-4o", "messages": [{"role": "system", "content": "Eres el asistente de la tienda."}, ' \
       '{"role": "user", "content": "hola, ¿cómo estás?"}]%s}'


def cpu_seconds(pid: int, task: int | None = None) -> float:
    """utime + stime of a process (or of one of its threads), in seconds (fields 14 and 15 of stat)."""
    path = Path(f"/proc/{pid}/task/{task}/stat") if task is not None else Path(f"/proc/{pid}/stat")
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:   # a thread that has ended
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def round_by_round(cpu: list[float], bare: list[float]) -> float:
    """Each round's CPU a call over the bare relay's in the same round, then their median: the
    machine's speed drifts between rounds, and a ratio taken within one round cancels it."""
    return statistics.median(c / b for c, b in zip(cpu, bare))


def shipped(up_port: int, limits: bool) -> str:
    """config.toml as shipped, its upstreams at the fake; limits kept (scaled up) or dropped."""
    raw: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())
    raw.pop("server", None)
    for upstream in raw["upstreams"].values():
        upstream["base_url"] = f"http://127.0.0.1:{up_port}"
        upstream.pop("api_key_env", None)
        upstream.pop("fallback", None)
        upstream.pop("fallback_model", None)
        if not limits:
            upstream.pop("limits", None)
        else:
            upstream["limits"] = {k: v * 1000 for k, v in upstream.get("limits", {}).items()}
    if not limits:
        raw["limits"] = {k: v for k, v in raw.get("limits", {}).items() if k != "models"}
    else:
        for pattern in raw["limits"].get("models", {}).values():
            for name in ("rpm", "rpd", "tpm", "concurrency"):
                if name in pattern:
                    pattern[name] *= 100_000
    # Each table under its own header: start_proxy's [server] table comes first in the file.
    return "".join(to_toml(value, f'"{key}"') for key, value in raw.items())


def wrk_script(directory: Path, stream: bool) -> Path:
    path = directory / ("stream.lua" if stream else "plain.lua")
    body = BODY % (', "stream": true' if stream else "")
    path.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    f"wrk.body = [[{body}]]\n")
    return path


async def wrk(url: str, script: Path, seconds: int, connections: int) -> tuple[int, float, float, float]:
    """(completed calls, requests/s, p50 ms, p99 ms) from one wrk run."""
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"{url}: {bad.group(1)} failed responses\n{out}")
    return done, rate, _ms(out, "50%"), _ms(out, "99%")


def _ms(out: str, label: str) -> float:
    value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def at_rate(targets: dict[str, tuple[str, int | None]], rate: float, rounds: int, seconds: int) -> str:
    """Every target at the same `rate` (open loop): CPU a call, p50 and p99, medians of rounds."""
    lines = [f"\n# at one rate for all: {rate:,.0f} calls a second from an open-loop client, {rounds} interleaved "
          f"rounds of {seconds} s, medians"]
    for stream in (False, True):
        body = (BODY % (', "stream": true' if stream else "")).encode()
        figures: dict[str, list[tuple[float, float, float]]] = {}
        for _ in range(rounds):
            for name, (url, pid) in targets.items():
                if pid is None:
                    continue
                before = cpu_seconds(pid)
                times = await open_loop(url, body, rate, seconds)
                calls = len(times) + 20   # open_loop's 20 warm-up calls are counted in the CPU
                figures.setdefault(name, []).append(((cpu_seconds(pid) - before) / calls * 1e6,
                                                     pct(times, 0.5) * 1000, pct(times, 0.99) * 1000))
        bare_rows = figures["bare relay"]
        lines.append(f"\n## {'streaming' if stream else 'non-streaming'}, {rate:,.0f}/s\n"
              "| target | CPU µs/call | p50 ms | p99 ms | CPU vs bare | CPU vs bare, round by round |\n"
              "|---|---:|---:|---:|---:|---:|")
        bare_cpu = statistics.median(r[0] for r in bare_rows)
        for name, rows in figures.items():
            cpu = statistics.median(r[0] for r in rows)
            paired = round_by_round([r[0] for r in rows], [b[0] for b in bare_rows])
            lines.append(f"| {name} | {cpu:.0f} | {statistics.median(r[1] for r in rows):.2f} | "
                         f"{statistics.median(r[2] for r in rows):.2f} | {cpu / bare_cpu:.2f}× | {paired:.2f}× |")
    return "\n".join(lines)


async def main(rounds: int, seconds: int, connections: int, fixed_rate: float = 0.0) -> None:
    upstream, up_port = await start_upstream()
    bare_port = free_port()
    bare = await start([sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(bare_port),
                        f"http://127.0.0.1:{up_port}"], b"bare relay ready")
    floor_port, floor_dir = free_port(), tempfile.TemporaryDirectory()
    floor = await start([sys.executable, str(ROOT / "bench" / "metering_floor.py"), str(floor_port),
                         f"http://127.0.0.1:{up_port}", floor_dir.name], b"metering floor ready")
    plain_proxy, plain_port, _ = await start_proxy(shipped(up_port, limits=False))
    limited_proxy, limited_port, _ = await start_proxy(shipped(up_port, limits=True))
    targets = {
        "direct": (f"http://127.0.0.1:{up_port}/chat/completions", None),
        "bare relay": (f"http://127.0.0.1:{bare_port}/v1/chat/completions", bare.pid),
        "metering floor": (f"http://127.0.0.1:{floor_port}/v1/chat/completions", floor.pid),
        "Tollgate": (f"http://127.0.0.1:{plain_port}/v1/chat/completions", plain_proxy.pid),
        "Tollgate, limits on": (f"http://127.0.0.1:{limited_port}/v1/chat/completions", limited_proxy.pid),
    }
    figures: dict[tuple[str, str], list[tuple[float, float, float, float, float]]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scripts = {"non-streaming": wrk_script(Path(tmp), False), "streaming": wrk_script(Path(tmp), True)}
            for kind, script in scripts.items():           # warm-up: connections, tokenizers, caches
                for url, _ in targets.values():
                    await wrk(url, script, 2, connections)
            for _ in range(rounds):
                for kind, script in scripts.items():
                    for name, (url, pid) in targets.items():
                        before = cpu_seconds(pid) if pid else 0.0
                        loop_before = cpu_seconds(pid, pid) if pid else 0.0   # the main thread: the event loop
                        done, rate, p50, p99 = await wrk(url, script, seconds, connections)
                        cpu_us = (cpu_seconds(pid) - before) / done * 1e6 if pid else float("nan")
                        loop_us = (cpu_seconds(pid, pid) - loop_before) / done * 1e6 if pid else float("nan")
                        figures.setdefault((kind, name), []).append((rate, cpu_us, p50, p99, loop_us))
        same_rate = await at_rate(targets, fixed_rate, rounds, seconds) if fixed_rate else ""
    finally:
        await stop(plain_proxy, limited_proxy, floor, bare, upstream)
        floor_dir.cleanup()
    print(f"# cost of one call: {os.cpu_count()} cores, wrk -t2 -c{connections} -d{seconds}s, "
          f"{rounds} interleaved rounds, medians")
    for kind in ("non-streaming", "streaming"):
        bare_rate = statistics.median(f[0] for f in figures[(kind, "bare relay")])
        bare_cpu = statistics.median(f[1] for f in figures[(kind, "bare relay")])
        print(f"\n## {kind}\n| target | req/s | CPU µs/call | of which the event loop's thread | p50 ms | "
              f"p99 ms | req/s vs bare | CPU vs bare | CPU vs bare, round by round |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in targets:
            rows = figures[(kind, name)]
            rate, cpu = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
            p50, p99 = statistics.median(r[2] for r in rows), statistics.median(r[3] for r in rows)
            loop = statistics.median(r[4] for r in rows)
            cpu_text = "–" if cpu != cpu else f"{cpu:.0f}"
            loop_text = "–" if loop != loop else f"{loop:.0f}"
            ratio = "–" if cpu != cpu else f"{cpu / bare_cpu:.2f}×"
            paired = round_by_round([r[1] for r in rows], [b[1] for b in figures[(kind, "bare relay")]])
            paired_text = "–" if paired != paired else f"{paired:.2f}×"
            print(f"| {name} | {rate:,.0f} | {cpu_text} | {loop_text} | {p50:.2f} | {p99:.2f} | "
                  f"{rate / bare_rate:.0%} | {ratio} | {paired_text} |")
    if same_rate:
        print(same_rate)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="also measure every target at this many calls a second (open loop)")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.seconds, args.connections, args.rate))
