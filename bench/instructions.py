"""Instructions per call, counted by callgrind: a before/after that the machine's noise cannot move.

    python bench/instructions.py [REV] [--stream] [--limits] [--calls 400]

CPU time on a shared 2-core machine moves ±20% between minutes, so a saving of 2% cannot be seen
in it. `valgrind --tool=callgrind` counts the instructions a process executes instead, the same
for the same code and the same work whatever else runs. Each target runs under callgrind (about
50 times slower) behind the fake upstream: `bench/bare_relay.py`, `tollgate serve` from this tree
with the shipped config as bench/cpu.py sets it up, and, given REV, Tollgate at REV from a
temporary git worktree. One client sends the calls one after another (with more at once, how
many arrive in one turn of the event loop varies and so does the count); counting starts after
a warm-up (`callgrind_control --zero`) and ends with a dump. The event loop's thread is the
figure to compare; the others (the ledger's writer) are shown, but how many calls share one of
its transactions depends on timing, so their count moves from run to run. Instructions are not time (a cache miss or a
system call costs more than it counts): this is for comparing two versions of the same code, and
bench/cpu.py and bench/ab.py remain the measure of what a call costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import BODY, shipped  # noqa: E402
from bench.harness import ROOT, checkout, closed_loop, free_port, serve_from, start, start_upstream, stop  # noqa: E402

WARM_UP = 200


async def counted(name: str, proc: asyncio.subprocess.Process, out: Path, url: str, body: bytes,
                  calls: int) -> tuple[float, float]:
    """(kIr a call on the main thread, kIr a call on every other thread) of `proc`, started under
    callgrind writing to `out`, for `calls` calls after a warm-up."""
    try:
        await closed_loop(url, body, WARM_UP, 1)
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True)
        await closed_loop(url, body, calls, 1)
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
    finally:
        await stop(proc)
    main = rest = 0
    for dump in out.parent.glob(f"{out.name}.1-*"):   # the first dump, one file a thread
        text = dump.read_text(errors="replace")
        thread = re.search(r"^thread: (\d+)", text, re.M)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if thread is None or total is None:
            raise RuntimeError(f"{name}: {dump} is not a callgrind dump")
        if thread.group(1) == "1":
            main += int(total.group(1))
        else:
            rest += int(total.group(1))
    return main / calls / 1000, rest / calls / 1000


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}"]


async def main(rev: str | None, stream: bool, limits: bool, calls: int) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing (apt-get install valgrind)")
    body = (BODY % (', "stream": true' if stream else "")).encode()
    upstream, up_port = await start_upstream()
    config = shipped(up_port, limits=limits)
    rows: list[tuple[str, float, float]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="tollgate-callgrind-") as tmp:
            out = Path(tmp) / "bare.out"
            port = free_port()
            bare = await start([*callgrind(out), sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(port),
                                f"http://127.0.0.1:{up_port}"], b"bare relay ready")
            rows.append(("bare relay", *await counted("bare relay", bare, out,
                                                      f"http://127.0.0.1:{port}/v1/chat/completions", body, calls)))
            with contextlib.ExitStack() as trees:
                targets = [("Tollgate, this tree", ROOT)]
                if rev is not None:
                    targets.insert(0, (f"Tollgate at {rev}", trees.enter_context(checkout(rev))))
                for index, (name, tree) in enumerate(targets):
                    out = Path(tmp) / f"tollgate-{index}.out"
                    proc, port = await serve_from(tree, config, callgrind(out))
                    rows.append((name, *await counted(name, proc, out, f"http://127.0.0.1:{port}/v1/chat/completions",
                                                      body, calls)))
    finally:
        await stop(upstream)
    print(f"# instructions a call (callgrind), {'streaming' if stream else 'non-streaming'} chat, "
          f"{'shipped limits on' if limits else 'no limits'}, {calls} calls one at a time")
    # The writer's count is not comparable between runs: one call at a time, whether two calls
    # share a transaction depends on timing, and a transaction costs as much as many rows.
    print("| target | event loop kIr/call | event loop vs bare | other threads kIr/call (varies) |\n"
          "|---|---:|---:|---:|")
    for name, loop, rest in rows:
        print(f"| {name} | {loop:,.0f} | {loop / rows[0][1]:.3f}× | {rest:,.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", help="an earlier commit to count beside this tree")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--limits", action="store_true", help="with every shipped limit on (as bench/cpu.py)")
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    asyncio.run(main(args.rev, args.stream, args.limits, args.calls))
