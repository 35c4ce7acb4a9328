"""Broken storage at start stops `tollgate serve` with one line naming the path and the cause."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import to_toml
from .disks import fill, read_only, tmpfs


async def serve_once(config: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "-c", str(config), "serve",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, (out + err).decode()


@pytest.mark.parametrize("fault", ["read-only filesystem", "full disk", "data dir is a file"])
async def test_broken_storage_stops_serve_with_one_line(raw_config: dict[str, Any], tmp_path: Path,
                                                        fault: str) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        data = disk / "data"
        raw_config["server"].update(data_dir=str(data), port=0)
        if fault == "read-only filesystem":
            # A ledger that existed and was fine, then its filesystem went read-only.
            data.mkdir(mode=0o700)
            (data / "ledger.sqlite3").write_bytes(b"")
            read_only(disk)
        elif fault == "full disk":
            fill(disk)
        else:
            data.write_text("not a directory")
        config = tmp_path / "config.toml"
        config.write_text(to_toml(raw_config))
        code, output = await serve_once(config)
    assert code == 1
    [line] = [line for line in output.splitlines() if line.startswith("tollgate:")]
    assert str(data) in line and "Traceback" not in output
    assert {"read-only filesystem": "Read-only file system", "full disk": "full",
            "data dir is a file": "File exists"}[fault].lower() in line.lower()
