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
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import BODY, shipped  # noqa: E402
from bench.harness import ROOT, closed_loop, free_port, start, start_upstream, stop  # noqa: E402

WARM_UP = 200


async def counted(name: str, command: list[str], ready: bytes, url: str, body: bytes, calls: int,
                  env: dict[str, str]) -> tuple[float, float]:
    """(kIr a call on the main thread, kIr a call on every other thread) of `command` under load."""
    with tempfile.TemporaryDirectory(prefix="tollgate-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = await start(["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
                            *command], ready, env=env)
        try:
            await closed_loop(url, body, WARM_UP, 1)
            subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True)
            await closed_loop(url, body, calls, 1)
            subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
        finally:
            await stop(proc)
        main = rest = 0
        for dump in Path(tmp).glob("callgrind.out.1-*"):   # the first dump, one file a thread
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


async def main(rev: str | None, stream: bool, limits: bool, calls: int) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing (apt-get install valgrind)")
    body = (BODY % (', "stream": true' if stream else "")).encode()
    upstream, up_port = await start_upstream()
    config = shipped(up_port, limits=limits)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="tollgate-instructions-") as holder:
        trees = [("Tollgate, this tree", ROOT)]
        if rev is not None:
            tree = Path(holder) / "tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                           check=True, capture_output=True)
            trees.insert(0, (f"Tollgate at {rev}", tree))
        try:
            port = free_port()
            bare = [sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(port), f"http://127.0.0.1:{up_port}"]
            rows.append(("bare relay", *await counted("bare relay", bare, b"bare relay ready",
                                                      f"http://127.0.0.1:{port}/v1/chat/completions", body, calls,
                                                      dict(os.environ))))
            for name, tree in trees:
                port = free_port()
                data = Path(holder) / f"data-{len(rows)}"
                (Path(holder) / "config.toml").write_text(f"[server]\nport = {port}\ndata_dir = \"{data}\"\n{config}")
                # -P: the code of `tree`, not of the current directory.
                serve = [sys.executable, "-P", "-m", "proxy", "-c", str(Path(holder) / "config.toml"), "serve"]
                rows.append((name, *await counted(name, serve, b"tollgate ready",
                                                  f"http://127.0.0.1:{port}/v1/chat/completions", body, calls,
                                                  {**os.environ, "PYTHONPATH": str(tree)})))
        finally:
            await stop(upstream)
            if rev is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(holder) / "tree")],
                               capture_output=True)
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
