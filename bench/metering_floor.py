"""The least a metering relay can do: the bare relay, plus each call's usage read and one row a
call committed to SQLite.

    python bench/metering_floor.py PORT UPSTREAM_URL DATA_DIR

What any proxy that meters must pay on top of `bench/bare_relay.py`, and nothing else: the body
parsed for its model (a stream's re-serialized to ask for usage), the usage read from the reply
(a whole JSON body parsed; a stream's last usage frame found and parsed), and a row with the
model, tokens and latency queued to a writer thread that commits whatever has gathered at most
every 20 ms, in WAL mode with synchronous=NORMAL, as Tollgate's ledger does. No tagging, no
limits, no rollups, no access log, no metrics, no error handling. bench/cpu.py measures it in
the same run as the bare relay and Tollgate: Tollgate's cost over this floor is what its
features cost; this floor's over the bare relay is what counting and keeping each call costs.
"""

from __future__ import annotations

import queue
import sqlite3
import sys
import threading
import time
from pathlib import Path

import orjson
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bare_relay import SESSION, session_ctx  # noqa: E402

ROWS: queue.SimpleQueue[tuple[float, str, int, int, float]] = queue.SimpleQueue()
PACE_S = 0.02


def writer(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, ts REAL NOT NULL, model TEXT NOT NULL, "
                 "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, latency_s REAL NOT NULL)")
    conn.execute("CREATE INDEX IF NOT EXISTS calls_ts ON calls(ts)")
    while True:
        rows = [ROWS.get()]
        began = time.monotonic()
        while True:
            try:
                rows.append(ROWS.get_nowait())
            except queue.Empty:
                break
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO calls (ts, model, prompt_tokens, completion_tokens, latency_s) "
                         "VALUES (?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
        time.sleep(max(0.0, began + PACE_S - time.monotonic()))


def usage_of(frames: bytes) -> dict[str, int]:
    """The usage in the last SSE frame that carries one."""
    at = frames.rfind(b'"usage":{')
    if at < 0:
        return {}
    start = frames.rfind(b"data: ", 0, at) + len(b"data: ")
    end = frames.find(b"\n", at)
    usage = orjson.loads(frames[start:end if end >= 0 else len(frames)]).get("usage") or {}
    return usage if isinstance(usage, dict) else {}


async def relay(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    body = await request.read()
    sent = orjson.loads(body)
    if sent.get("stream"):
        body = orjson.dumps({**sent, "stream_options": {"include_usage": True}})
    async with request.app[SESSION].post(UPSTREAM + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"}) as r:
        if r.content_type != "text/event-stream":
            reply = await r.read()
            usage = orjson.loads(reply).get("usage") or {}
            out: web.StreamResponse = web.Response(body=reply, status=r.status, content_type=r.content_type)
        else:
            out = web.StreamResponse(status=r.status, headers={"Content-Type": r.content_type})
            await out.prepare(request)
            tail = b""
            async for chunk in r.content.iter_any():
                await out.write(chunk)
                tail = (tail + chunk)[-4096:]   # the usage frame is the last but one
            await out.write_eof()
            usage = usage_of(tail)
    ROWS.put((time.time(), str(sent.get("model")), int(usage.get("prompt_tokens", 0)),
              int(usage.get("completion_tokens", 0)), time.perf_counter() - started))
    return out


if __name__ == "__main__":
    PORT, UPSTREAM, DATA = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    threading.Thread(target=writer, args=(DATA / "floor.sqlite3",), daemon=True).start()
    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", relay)
    web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, loop=uvloop.new_event_loop(),
                print=lambda _: print("metering floor ready", flush=True))
