"""The `tollgate` command: the real process, serving, then reading its ledger while stopped."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.ledger import CallRecord
from proxy.ledger.sqlite import Ledger

from .conftest import Proxy, Serve, to_toml, write_config
from .fake_upstream import Behavior, FakeUpstream


async def tollgate(*args: str, env_ok: bool = True) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def config_file(raw_config: dict[str, Any], tmp_path: Path) -> Path:
    return write_config(raw_config, tmp_path)


async def test_stats_and_reset_reach_the_server_where_it_really_listens(
        config_file: Path, raw_config: dict[str, Any], fake: FakeUpstream, tmp_path: Path) -> None:
    """The config names port 0; the server binds whatever port the kernel gives it. `stats` and
    `reset` still reach it there and say so; once it stops, they say no server is running."""
    fake.behavior = Behavior(prompt_tokens=10, chunks=2, completion_per_chunk=5)
    server = Serve(config_file)
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            for model, path in (("gpt-4o", "/v1/chat/completions"), ("llama3.2", "/api/generate")):
                async with s.post(server.url + path,
                                  json={"model": model, "prompt": "x", "messages": [], "stream": False}) as r:
                    assert r.status == 200
                    await r.read()
            code, out, err = await tollgate("-c", str(config_file), "stats")
            assert code == 0 and json.loads(out)["tokens"]["total"] == 40
            assert json.loads(out)["estado"] == "✅ Operativo"
            assert f"from the server at {server.url} (pid {server.proc.pid})" in err  # type: ignore[union-attr]
            code, out, err = await tollgate("-c", str(config_file), "stats", "--text", "--lang", "en")
            assert code == 0 and "• **Total**: 40" in out and "Operational" in out

            code, out, err = await tollgate("-c", str(config_file), "reset")
            assert code == 0 and json.loads(out)["message"] == "Métricas reiniciadas exitosamente"
            assert f"reset the server at {server.url}" in err
            async with s.get(server.url + "/stats") as r:
                assert (await r.json())["total_requests"] == 0  # the running server's own figures
            async with s.post(server.url + "/v1/chat/completions",
                              json={"model": "gpt-4o", "messages": [], "stream": False}) as r:
                assert r.status == 200
    finally:
        assert await server.signal(signal.SIGTERM) == 0
    assert not (Path(raw_config["server"]["data_dir"]) / "server.json").exists()

    code, out, err = await tollgate("-c", str(config_file), "stats")
    stopped = json.loads(out)
    assert code == 0 and stopped["estado"] == "⏹️ Detenido" and stopped["total_requests"] == 1
    assert "no server is running" in err
    code, out, _ = await tollgate("-c", str(config_file), "stats", "--text")
    assert "• **Total**: 20" in out and out.startswith("📊 **ESTADÍSTICAS DE RAYMUNDO**")
    assert "Detenido" in out and "Operativo" not in out

    csv_path = tmp_path / "out.csv"
    code, _, _ = await tollgate("-c", str(config_file), "export", "--csv", str(csv_path))
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert code == 0 and [r["upstream"] for r in rows] == ["gpt4o_cloud", "ollama_local", "gpt4o_cloud"]
    assert sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in rows) == 60
    code, out, _ = await tollgate("-c", str(config_file), "export", "--csv", "-", "--since", "2999-01-01")
    assert out.strip().count("\n") == 0  # header only

    snapshot = tmp_path / "metricas.csv"
    for _ in range(2):  # the seed's periodic append
        code, _, _ = await tollgate("-c", str(config_file), "export", "--snapshot", str(snapshot))
        assert code == 0
    with open(snapshot, newline="") as fh:
        lines = list(csv.reader(fh))
    assert [line[1:3] for line in lines] == [["1", "20"]] * 2

    code, out, err = await tollgate("-c", str(config_file), "reset")
    assert code == 0 and json.loads(out)["message"] == "Métricas reiniciadas exitosamente"
    assert "no server is running; wrote a new epoch" in err
    code, out, _ = await tollgate("-c", str(config_file), "stats")
    assert json.loads(out)["total_requests"] == 0
    code, out, _ = await tollgate("-c", str(config_file), "export", "--csv", "-")
    assert len(out.strip().splitlines()) == 4  # no reset deleted a row


async def test_a_server_that_died_without_a_word_is_not_running(config_file: Path, raw_config: dict[str, Any]) -> None:
    """SIGKILL leaves server.json behind; its process is gone, so the commands work offline."""
    server = Serve(config_file)
    await server.start()
    record = Path(raw_config["server"]["data_dir"]) / "server.json"
    assert record.stat().st_mode & 0o777 == 0o600
    assert await server.signal(signal.SIGKILL) == -signal.SIGKILL
    assert record.exists()
    code, out, err = await tollgate("-c", str(config_file), "stats")
    assert code == 0 and json.loads(out)["estado"] == "⏹️ Detenido" and "no server is running" in err


async def test_serve_refuses_a_public_address_without_an_admin_token(config_file: Path) -> None:
    code, _, err = await tollgate("-c", str(config_file), "serve", "--host", "0.0.0.0")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "non-loopback address needs an admin token" in err


async def test_check_probes_each_upstream(config_file: Path, raw_config: dict[str, Any], fake: FakeUpstream,
                                          tmp_path: Path, refused_port: int) -> None:
    code, out, _ = await tollgate("-c", str(config_file), "check")
    assert code == 0, out
    assert "gpt4o_cloud: openai" in out and "HTTP 200" in out and "(set)" in out
    raw_config["upstreams"]["ollama_local"]["base_url"] = f"http://127.0.0.1:{refused_port}"
    broken = tmp_path / "broken.toml"
    broken.write_text(to_toml(raw_config))
    code, out, _ = await tollgate("-c", str(broken), "check")
    assert code == 2 and "ollama_local" in out and "FAILED" in out and "unreachable" in out


async def test_check_asks_the_shared_stores(raw_config: dict[str, Any], fake: FakeUpstream, tmp_path: Path,
                                           redis_server: str, postgres_server: str, refused_port: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_TEST_REDIS", redis_server)
    monkeypatch.setenv("TOLLGATE_TEST_DSN", postgres_server)
    raw_config["limits"] = {"backend": "redis"}
    raw_config["redis"] = {"url_env": "TOLLGATE_TEST_REDIS"}
    raw_config["ledger"] = {"backend": "postgresql", "dsn_env": "TOLLGATE_TEST_DSN"}
    code, out, _ = await tollgate("-c", str(write_config(raw_config, tmp_path)), "check")
    assert code == 0, out
    assert "limits: Redis from $TOLLGATE_TEST_REDIS: reachable" in out
    assert "ledger: PostgreSQL from $TOLLGATE_TEST_DSN: reachable" in out
    monkeypatch.setenv("TOLLGATE_TEST_DSN", f"postgresql://tollgate:s3cret@127.0.0.1:{refused_port}/x")
    code, out, _ = await tollgate("-c", str(write_config(raw_config, tmp_path)), "check")
    assert code == 2 and "ledger: PostgreSQL from $TOLLGATE_TEST_DSN: FAILED" in out
    assert "s3cret" not in out


async def test_unset_secrets_are_loud(config_file: Path, raw_config: dict[str, Any], fake: FakeUpstream,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An admin token variable that is unset never silently opens the admin endpoints unnoticed:
    check fails and names it, /healthz warns; the same for an upstream's key."""
    raw_config["server"]["admin_token_env"] = "TG_TEST_UNSET_ADMIN"
    monkeypatch.delenv("TG_TEST_UNSET_ADMIN", raising=False)
    monkeypatch.delenv("TOLLGATE_TEST_CLOUD_KEY", raising=False)
    path = tmp_path / "unset.toml"
    path.write_text(to_toml(raw_config))
    code, out, _ = await tollgate("-c", str(path), "check")
    assert code == 2
    assert "$TG_TEST_UNSET_ADMIN, which is unset" in out and "$TOLLGATE_TEST_CLOUD_KEY, which is unset" in out
    proxy = Proxy(raw_config)
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/healthz") as r:
                body = await r.json()
    finally:
        await proxy.stop()
    assert r.status == 200 and len(body["warnings"]) == 2 and "open to every program" in body["warnings"][0]


async def test_config_after_the_subcommand(config_file: Path) -> None:
    for args in (("stats", "-c", str(config_file), "--text"), ("stats", "--config", str(config_file), "--text"),
                 ("-c", "/nonexistent.toml", "stats", "-c", str(config_file), "--text")):
        code, out, err = await tollgate(*args)
        assert code == 0 and "ESTADÍSTICAS" in out, (args, err)
    code, out, _ = await tollgate("serve", "--help")
    assert code == 0 and "--config" in out


def fill_ledger(raw_config: dict[str, Any], rows: int) -> None:
    """`rows` calls in the config's ledger, written as the server writes them."""
    ledger = Ledger(Path(raw_config["server"]["data_dir"]) / "ledger.sqlite3")
    ledger.open(1_700_000_000.0)
    for i in range(rows):
        ledger.append(CallRecord(ts=1_700_000_000.0 + i, upstream="gpt4o_cloud", model="gpt-4o", dialect="openai",
                                 endpoint="chat", type="chat", user=f"user-{i}", stream=False, status=200,
                                 outcome="ok", prompt_tokens=3, completion_tokens=2, cached_tokens=0,
                                 estimated=False, latency_s=0.01, ttft_s=None, cost_usd=0.0))
    ledger.close()


async def test_a_reader_that_stops_early_gets_no_traceback(config_file: Path, raw_config: dict[str, Any]) -> None:
    """`tollgate export --csv - | head -1`: the reader leaves long before the rows are written."""
    fill_ledger(raw_config, 5000)
    for _ in range(3):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "-c", str(config_file), "export", "--csv", "-",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        assert (await proc.stdout.readline()).startswith(b"ts,time,")  # like head -1
        proc._transport.get_pipe_transport(1).close()  # type: ignore[attr-defined]
        err = await proc.stderr.read()
        assert await proc.wait() == 0
        assert b"Traceback" not in err and b"BrokenPipe" not in err, err[-500:]


async def test_a_reader_gone_before_stats_writes_gets_no_traceback(config_file: Path) -> None:
    """`tollgate stats --text | head -0`: stdout's reader is gone before the first byte, so the
    write fails every time (not 8 runs in 15), and the command still ends quietly."""
    for args in (("stats", "--text"), ("stats",), ("export", "--snapshot", "/dev/stdout")):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "-c", str(config_file), *args,
                stdout=write_end, stderr=asyncio.subprocess.PIPE)
        finally:
            os.close(write_end)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (args, err)
        assert b"Traceback" not in err and b"BrokenPipe" not in err, (args, err[-500:])


async def test_ctrl_c_ends_a_command_without_a_traceback(config_file: Path, raw_config: dict[str, Any]) -> None:
    """SIGINT while `export` is blocked writing to a reader that does not read; and while `serve` runs."""
    fill_ledger(raw_config, 20_000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "-c", str(config_file), "export", "--csv", "-",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert (await proc.stdout.readline()).startswith(b"ts,time,")
    proc._transport.get_pipe_transport(1).pause_reading()  # type: ignore[attr-defined]  # it blocks
    proc.send_signal(signal.SIGINT)
    err = await asyncio.wait_for(proc.stderr.read(), 60)
    proc._transport.get_pipe_transport(1).close()  # type: ignore[attr-defined]
    assert await asyncio.wait_for(proc.wait(), 60) == 130
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err[-500:]

    server = Serve(config_file)
    await server.start()
    assert await server.signal(signal.SIGINT) == 0
    await asyncio.wait_for(server.proc.wait(), 60)  # type: ignore[union-attr]
    assert not any("Traceback" in line for line in server.log)


async def test_stats_of_a_stopped_server_on_an_older_ledger(config_file: Path, raw_config: dict[str, Any]) -> None:
    """A ledger an older version left (no rollups) and no server running: `tollgate stats` brings
    it up to date once, as `serve` would, and counts every call."""
    import sqlite3

    from proxy.ledger import sqlite_rollups as rollups

    fill_ledger(raw_config, 300)
    conn = sqlite3.connect(Path(raw_config["server"]["data_dir"]) / "ledger.sqlite3")
    for span in rollups.SPANS:
        for table in ("rollup", "users", "latency"):
            conn.execute(f"DROP TABLE {table}_{span}")
    conn.execute("DROP TABLE meta")
    conn.execute("PRAGMA user_version = 0")
    conn.commit()
    conn.close()
    code, out, err = await tollgate("-c", str(config_file), "stats")
    assert code == 0, err
    assert json.loads(out)["total_requests"] == 300
