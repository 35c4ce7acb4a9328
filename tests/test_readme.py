"""The README's first screen does what it says: its calls work through the proxy as written,
its commands are the ones CI runs, and its layout names every module."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import Proxy
from .fake_upstream import Behavior, FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(section: str, language: str) -> list[str]:
    start = README.index(f"## {section}")
    end = README.index("\n## ", start + 1)
    return re.findall(rf"```{language}\n(.*?)```", README[start:end], flags=re.S)


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_the_first_screen_calls_work_as_written(raw_config: dict[str, Any], fake: FakeUpstream,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The curl and openai SDK examples, run as they are but for the proxy's port, reach the
    upstream with the operator's key; then the stats call shows both."""
    monkeypatch.setenv("TG_README_ADMIN", "readme-admin-token")
    raw_config["server"]["admin_token_env"] = "TG_README_ADMIN"
    proxy = Proxy(raw_config)
    await proxy.start()
    try:
        fake.behavior = Behavior(prompt_tokens=7, chunks=2, completion_per_chunk=3)
        [call, stats] = [b.strip() for b in blocks("One call through it", "bash")]
        [sdk] = blocks("One call through it", "python")
        local = "http://127.0.0.1:5000"
        assert local in call and local in sdk and local in stats

        code, out = await run("bash", "-c", call.replace(local, proxy.url))
        assert code == 0 and json.loads(out)["choices"][0]["message"]["content"] == "w0 w1 ", out
        code, out = await run(sys.executable, "-c", sdk.replace(local, proxy.url))
        assert code == 0 and out.strip() == "w0 w1", out
        assert [seen.headers["Authorization"] for seen in fake.seen] == [f"Bearer {os.environ['TOLLGATE_TEST_CLOUD_KEY']}"] * 2

        await proxy.settled()
        env = {**os.environ, "TOLLGATE_ADMIN_TOKEN": "readme-admin-token"}
        code, out = await run("bash", "-c", stats.replace(local, proxy.url), env=env)
        assert code == 0 and "Total requests: 2" in out and "**Total**: 26" in out, out
    finally:
        await proxy.stop()


def test_ci_runs_the_readmes_test_command() -> None:
    [command] = [b.strip() for b in blocks("Test", "bash")]
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    [install] = [b.strip() for b in blocks("Install and run", "bash") if "pip install" in b]
    # The same locked install, then serve instead of the suite.
    assert install.replace("requirements.lock", "requirements-test.lock").replace(
        ".venv/bin/tollgate serve", ".venv/bin/python -m pytest -n auto") == command


def test_the_layout_names_every_module() -> None:
    listed = set(re.findall(r"^  \| `([a-z0-9_/]+\.py)` \|", README, flags=re.M))
    modules = {str(p.relative_to(ROOT / "proxy")) for p in (ROOT / "proxy").rglob("*.py")}
    assert listed == modules - {"__init__.py"}
