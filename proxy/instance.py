"""Where the running server listens, recorded in its data directory.

`tollgate stats` and `tollgate reset` must reach the server that is really running, at the
address it really bound (`serve --port 23418`, or port 0), not the one the config names. So
`serve` writes `server.json` (owner-only) once it listens and removes it when it stops; the
other commands read it, and a record whose process is gone counts as no server at all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from .files import write_private_atomic

RECORD = "server.json"


@dataclass(frozen=True)
class Running:
    pid: int
    url: str          # where a local command reaches it: http://127.0.0.1:23418
    started: float

    def __str__(self) -> str:
        return f"the server at {self.url} (pid {self.pid})"


def _reachable_host(host: str) -> str:
    """The address a command on this machine connects to for a server bound to `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def record(data_dir: Path, host: str, port: int) -> None:
    body = orjson.dumps({"pid": os.getpid(), "url": f"http://{_reachable_host(host)}:{port}", "started": time.time()})
    write_private_atomic(data_dir / RECORD, body)  # a command never reads half a record


def forget(data_dir: Path) -> None:
    """Remove the record if it is this process's (another server may have taken the directory)."""
    found = _read(data_dir / RECORD)
    if found is not None and found.pid == os.getpid():
        (data_dir / RECORD).unlink(missing_ok=True)


def find(data_dir: Path) -> Running | None:
    """The server recorded in `data_dir`, if its process is still alive."""
    found = _read(data_dir / RECORD)
    if found is None:
        return None
    try:
        os.kill(found.pid, 0)
    except ProcessLookupError:
        return None  # it died without removing its record (SIGKILL, power loss)
    except PermissionError:
        pass  # alive, another user's
    return found


def _read(path: Path) -> Running | None:
    try:
        data = orjson.loads(path.read_bytes())
        return Running(int(data["pid"]), str(data["url"]), float(data["started"]))
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
