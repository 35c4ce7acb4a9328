"""Where the time of one call goes: py-spy samples of a `tollgate serve` under load, by part.

    python bench/profile.py [--stream] [--gil] [--limits] [--seconds 10] [--raw stacks.txt]

Starts the fake upstream and Tollgate with the shipped config (tagging rules, no limits), drives
it with wrk (32 connections), records py-spy raw stacks for `--seconds` (with `--gil`: only
samples holding the GIL, what the event loop waits for), and prints µs per call for each part:
each sample goes to the innermost frame that names a part, the rest to the event loop. py-spy
must be installed (pip install py-spy) and allowed to read the process (root, or ptrace scope 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import shipped, wrk, wrk_script  # noqa: E402
from bench.harness import start_proxy, start_upstream, stop  # noqa: E402

RATE = 250  # samples per second
# Innermost match wins: (part, pattern over "function (file)").
PARTS = [
    ("ledger writer (its thread)", r"Ledger\._writer|Ledger\._write|add_range|write_many|add_rows"),
    ("access log", r"\(access\.py\)|logging/__init__"),
    ("metrics", r"\(metrics\.py\)|prometheus_client"),
    ("accounting", r"\(accounting\.py\)|Call\.record|\(call\.py\)|\(books\.py\)"),
    ("admission and limits", r"\(admission\.py\)|limits/|\(tickets\.py\)"),
    ("tagging", r"\(tagging\.py\)"),
    ("parsing the request", r"parse_request|\(inbound\.py\)|\(dialects\.py\)|\(endpoints\.py\)|\(auth\.py\)"),
    ("relaying the reply", r"\(reply\.py\)|\(framing\.py\)"),
    ("upstream client", r"\(http1\.py\)|httptools|UpstreamClient|\(upstream\.py\)"),
    ("Tollgate's handler (rest)", r"\(relay\.py\)|\(guard\.py\)|\(app\.py\)|\(caching\.py\)"),
    ("server (aiohttp web)", r"aiohttp/web_|aiohttp/http_|aiohttp/streams"),
]


def parts(raw: Path) -> tuple[collections.Counter[str], int]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]   # without line numbers
        total += int(n)
        part = next((name for frame in reversed(frames) for name, pattern in PARTS if re.search(pattern, frame)),
                    "event loop and the rest")
        counts[part] += int(n)
    return counts, total


def writer_share(raw: Path) -> tuple[int, int]:
    """(samples of the ledger writer's thread, all samples) in py-spy's raw stacks: recorded with
    --gil, the writer's part of the time anyone held the GIL, which the event loop waited for."""
    writer = total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            total += int(n)
            writer += int(n) if "Ledger._writer" in stack else 0
    return writer, total


async def record(pid: int, seconds: int, out: Path, gil: bool) -> bool:
    """py-spy's raw stacks of `pid` for `seconds` into `out` (with `gil`: only samples holding the
    GIL); False if py-spy is missing or could not read the process."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return False
    recording = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "-d", str(seconds), "-r", str(RATE), "--format", "raw",
        "-o", str(out), "--nonblocking", *(["--gil"] if gil else []),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await recording.wait() == 0 and out.exists()


async def main(stream: bool, gil: bool, seconds: int, limits: bool = False, raw: Path | None = None) -> None:
    upstream, up_port = await start_upstream()
    proxy, port, _ = await start_proxy(shipped(up_port, limits=limits))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with tempfile.TemporaryDirectory() as tmp:
        script = wrk_script(Path(tmp), stream)
        await wrk(url, script, 3, 32)
        load = asyncio.create_task(wrk(url, script, seconds + 3, 32))
        await asyncio.sleep(1.5)
        out = Path(tmp) / "raw.txt"
        recorded = await record(proxy.pid, seconds, out, gil)
        done, rate, _, _ = await load
        if not recorded:
            await stop(proxy, upstream)
            raise SystemExit("py-spy is missing or may not read the proxy (pip install py-spy; root, or ptrace scope 0)")
        counts, total = parts(out)
        if raw is not None:
            shutil.copyfile(out, raw)
    await stop(proxy, upstream)
    calls = rate * seconds
    print(f"# {'streaming' if stream else 'non-streaming'} chat at {rate:,.0f} req/s under py-spy"
          f"{' --gil' if gil else ''}: {total:,} samples in {seconds} s, µs per call")
    print("| part | µs/call | share |\n|---|---:|---:|")
    for name, n in counts.most_common():
        print(f"| {name} | {n / RATE / calls * 1e6:.0f} | {n / total:.0%} |")
    print(f"| **all** | {total / RATE / calls * 1e6:.0f} | 100% |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--gil", action="store_true")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--limits", action="store_true", help="with every shipped limit on (as bench/cpu.py)")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here, to look deeper than the parts")
    args = parser.parse_args()
    asyncio.run(main(args.stream, args.gil, args.seconds, args.limits, args.raw))
