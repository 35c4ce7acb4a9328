"""Before and after in one run: Tollgate at an earlier commit beside the working tree and the bare relay.

    python bench/ab.py REV [--stream] [--limits] [--rounds 3] [--seconds 6]

Checks REV out into a temporary git worktree and starts `tollgate serve` from it and from this
tree (each with `python -P`, so the interpreter loads the code of the tree it is pointed at and
not the current directory's), both with the shipped config as bench/cpu.py sets it up, plus
`bench/bare_relay.py`. wrk drives each in interleaved rounds; CPU per call is read from
/proc/PID/stat. Prints medians and each target's ratio to the bare relay: a saving measured on a
shared machine only means something against a baseline taken in the same minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import cpu_seconds, round_by_round, shipped, wrk, wrk_script  # noqa: E402
from bench.harness import ROOT, checkout, free_port, serve_from, start, start_upstream, stop  # noqa: E402


def switches(pid: int) -> int:
    """Context switches of all a process's threads so far: each hand-off of the GIL between the
    event loop and the ledger's writer is a few, so they count what CPU time is too noisy to show."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if "ctxt_switches:" in line:   # voluntary and nonvoluntary
                total += int(line.split()[1])
    return total


async def main(rev: str, stream: bool, limits: bool, rounds: int, seconds: int) -> None:
    with checkout(rev) as tree:
        await _compare(rev, tree, stream, limits, rounds, seconds)


async def _compare(rev: str, tree: Path, stream: bool, limits: bool, rounds: int, seconds: int) -> None:
    upstream, up_port = await start_upstream()
    bare_port = free_port()
    bare = await start([sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(bare_port),
                        f"http://127.0.0.1:{up_port}"], b"bare relay ready")
    config = shipped(up_port, limits=limits)
    before, before_port = await serve_from(tree, config)
    after, after_port = await serve_from(ROOT, config)
    targets = {"bare relay": (bare, bare_port), f"Tollgate at {rev}": (before, before_port),
               "Tollgate, this tree": (after, after_port)}
    figures: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in targets}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = wrk_script(Path(tmp), stream)
            for _, port in targets.values():  # warm-up: connections, tokenizers
                await wrk(f"http://127.0.0.1:{port}/v1/chat/completions", script, 2, 32)
            for _ in range(rounds):
                for name, (proc, port) in targets.items():
                    used, loop, switched = cpu_seconds(proc.pid), cpu_seconds(proc.pid, proc.pid), switches(proc.pid)
                    done, rate, _, _ = await wrk(f"http://127.0.0.1:{port}/v1/chat/completions", script, seconds, 32)
                    figures[name].append(((cpu_seconds(proc.pid) - used) / done * 1e6, rate,
                                          (cpu_seconds(proc.pid, proc.pid) - loop) / done * 1e6,
                                          (switches(proc.pid) - switched) / done))
    finally:
        await stop(before, after, bare, upstream)
    base = statistics.median(cpu for cpu, *_ in figures["bare relay"])
    print(f"# {'streaming' if stream else 'non-streaming'} chat, shipped config "
          f"{'with its limits' if limits else 'without limits'}: {rounds} interleaved rounds of {seconds} s, medians")
    print("| target | CPU µs/call | of which other threads (the ledger writer) | context switches a call | "
          "× bare relay | × bare relay, round by round | req/s | each round's CPU |\n"
          "|---|---:|---:|---:|---:|---:|---:|---|")
    for name, rows in figures.items():
        cpu = statistics.median(c for c, *_ in rows)
        others = statistics.median(c - loop for c, _, loop, _ in rows)
        switches_a_call = statistics.median(s for *_, s in rows)
        paired = round_by_round([c for c, *_ in rows], [b for b, *_ in figures["bare relay"]])
        print(f"| {name} | {cpu:,.0f} | {others:,.0f} | {switches_a_call:.2f} | {cpu / base:.2f}× | {paired:.2f}× | "
              f"{statistics.median(r for _, r, *_ in rows):,.0f} | {', '.join(f'{c:.0f}' for c, *_ in rows)} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the commit to compare with (any git revision)")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--limits", action="store_true", help="with every shipped limit on (as bench/cpu.py)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(main(args.rev, args.stream, args.limits, args.rounds, args.seconds))
