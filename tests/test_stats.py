"""/stats keeps the seed's contract, survives restarts and resets, and adds up exactly."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai


from .conftest import Clock, Proxy, chat, settled, workload
from .fake_upstream import Behavior, FakeUpstream

SEED_SCRIPTS = Path(__file__).parent / "seed_scripts"


async def test_seed_json_contract(timed: Proxy, fake: FakeUpstream, clock: Clock) -> None:
    clock.advance(2 * 86400 + 5 * 3600 + 34 * 60)
    await workload(timed, fake)
    stats = await settled(timed)
    seed_keys = ["estado", "inicio", "uptime", "total_requests", "tokens", "requests_por_tipo", "tier",
                 "rate_limits", "errores", "tasa_exito", "tiempo_promedio_respuesta", "ultimo_request",
                 "costo_estimado_usd", "conversaciones"]
    assert list(stats)[:len(seed_keys)] == seed_keys
    assert stats["estado"] == "✅ Operativo"
    assert stats["inicio"] == "2024-01-15T14:32:18"
    assert stats["uptime"] == "2d 5h 34m"
    assert stats["total_requests"] == 4
    assert stats["tokens"] == {"gpt4o_cloud": 300, "ollama_local": 150, "total": 450}
    assert stats["requests_por_tipo"] == {"chat": 3, "presentacion": 1, "documento": 0, "vision": 0}
    assert stats["tier"] == "🆓 Gratuito"
    assert stats["rate_limits"] == {"tokens_pm": "300 / 150,000 TPM", "requests_dia": "2 / 150 RPD",
                                    "uso_tpm": "0.2%", "uso_rpd": "1.3%"}
    assert stats["errores"] == 1
    assert stats["tasa_exito"] == "75.0%"
    assert re.fullmatch(r"\d+\.\d\ds", stats["tiempo_promedio_respuesta"])
    assert stats["ultimo_request"] == "2024-01-17T20:06:18"
    assert stats["costo_estimado_usd"] == f"${2 * (100 * 0.03 + 50 * 0.06) / 1000:.4f}"
    assert stats["conversaciones"] == {"activas": 0, "total_mensajes": 3, "usuarios": []}
    detail = stats["detail"]
    assert detail["latency_s"]["count"] == 4 and detail["latency_s"]["p99"] >= detail["latency_s"]["p50"] > 0
    assert detail["by_type"]["presentacion"]["total_tokens"] == 150
    assert detail["by_upstream"]["gpt4o_cloud"]["label"] == "GPT-4o (cloud)"


async def test_whatsapp_text_has_the_seed_layout_with_live_numbers(timed: Proxy, fake: FakeUpstream,
                                                                   clock: Clock) -> None:
    clock.advance(2 * 86400 + 5 * 3600 + 34 * 60)
    await workload(timed, fake)
    async with aiohttp.ClientSession() as s:
        async with s.get(timed.url + "/stats?format=text") as r:
            assert r.content_type == "text/plain"
            text = await r.text()
        async with s.get(timed.url + "/stats?format=text&lang=en") as r:
            english = await r.text()
    latency = re.search(r"Tiempo promedio: (\d+\.\d\ds)", text)
    assert latency is not None
    assert text == f"""📊 **ESTADÍSTICAS DE RAYMUNDO**

🟢 **Estado:** ✅ Operativo
⏰ **Uptime:** 2d 5h 34m
🆓 **Plan:** GitHub Models Free + Ollama Local

📈 **Uso General:**
• Total requests: 4
• Errores: 1
• Tasa de éxito: 75.0%
• Tiempo promedio: {latency.group(1)}

🤖 **Tokens Consumidos:**
• GPT-4o (cloud): 300 🆓
• Ollama (local): 150 🆓
• **Total**: 450

📊 **Rate Limits (GitHub Models Free):**
• Tokens/Minuto: 300 / 150,000 TPM (0.2%)
• Requests/Día: 2 / 150 RPD (1.3%)

📋 **Requests por Tipo:**
• Chat: 3
• Presentaciones: 1
• Documentos: 0
• Visión/Imágenes: 0

🕐 **Último request:** 2024-01-17T20:06:18

💡 **Nota:** Todo el uso es gratuito dentro de los límites del Free Tier"""
    assert english.startswith("📊 **RAYMUNDO STATISTICS**\n\n🟢 **Status:** ✅ Operational")
    assert "• Requests/Day: 2 / 150 RPD (1.3%)" in english


async def test_seed_client_scripts_run_unchanged(proxy: Proxy, fake: FakeUpstream, tmp_path: Path) -> None:
    """The seed's alert and CSV scripts call http://localhost:5000/stats. They run as they are;
    HTTP_PROXY (which requests honours) takes their request to the proxy's own port, so no test
    needs port 5000 free."""
    fake.behavior = Behavior(prompt_tokens=100, chunks=5, completion_per_chunk=10)
    for _ in range(3):
        assert await chat(proxy.url, "gpt-4o") == 200
    await proxy.settled()
    env = {**os.environ, "HTTP_PROXY": proxy.url, "NO_PROXY": ""}
    for script in ("alert.py", "export_csv.py"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SEED_SCRIPTS / script), cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        if script == "alert.py":
            assert out.decode().strip() == "Costo acumulado: $0.02 USD"
    with open(tmp_path / "metricas.csv", newline="") as fh:
        [row] = list(csv.reader(fh))
    assert row[1:] == ["3", "450", "$0.0180", "100.0%"]


async def test_restart_keeps_stats_and_snapshot(timed: Proxy, fake: FakeUpstream, clock: Clock,
                                                raw_config: dict[str, Any]) -> None:
    await workload(timed, fake)
    before = await settled(timed)
    await timed.restart()
    after = await settled(timed)
    # The ledger's writer state is live, not history: rows still queued before, none after.
    assert after["detail"].pop("ledger")["unwritten_rows"] == 0
    before["detail"].pop("ledger")
    assert after == before
    await timed.stop()
    data_dir = Path(raw_config["server"]["data_dir"])
    snapshot = json.loads((data_dir / "metrics.json").read_text())
    assert snapshot == {
        "inicio": "2024-01-15T14:32:18", "total_requests": 4,
        "total_tokens_gpt4o": 300, "total_tokens_ollama": 150,
        "requests_por_tipo": {"chat": 3, "presentacion": 1, "documento": 0, "vision": 0},
        "errores": 1, "tiempo_promedio_respuesta": snapshot["tiempo_promedio_respuesta"],
        "usuarios_unicos": 0, "ultimo_request": "2024-01-15T14:32:18",
    }
    assert isinstance(snapshot["tiempo_promedio_respuesta"], float)
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    for name in os.listdir(data_dir):
        assert stat.S_IMODE(os.stat(data_dir / name).st_mode) == 0o600, name


async def test_reset_starts_an_epoch_and_keeps_ledger_and_windows(timed: Proxy, fake: FakeUpstream,
                                                                  clock: Clock) -> None:
    await workload(timed, fake)
    clock.advance(90)
    async with aiohttp.ClientSession() as s:
        async with s.post(timed.url + "/metrics/reset") as r:
            assert r.status == 200
            assert await r.json() == {"message": "Métricas reiniciadas exitosamente",
                                      "nuevo_inicio": "2024-01-15T14:33:48"}
    stats = await settled(timed)
    assert stats["total_requests"] == 0 and stats["tokens"]["total"] == 0
    assert stats["inicio"] == "2024-01-15T14:33:48"
    # The day's requests still count against the daily limit.
    assert stats["rate_limits"]["requests_dia"] == "2 / 150 RPD"
    await timed.restart()
    stats = await settled(timed)
    assert stats["total_requests"] == 0 and stats["rate_limits"]["requests_dia"] == "2 / 150 RPD"
    assert timed.ledger.count() == 4


async def test_tagging_and_users(timed: Proxy, fake: FakeUpstream, clock: Clock) -> None:
    url = timed.url
    assert await chat(url, "gpt-4o", {"X-Tollgate-Type": "documento", "X-Tollgate-User": "ana"}) == 200
    clock.advance(20 * 60)
    assert await chat(url + "/t/presentacion", "gpt-4o", user="luis") == 200
    async with aiohttp.ClientSession() as s:
        for body in (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hazme una presentación"}]},
            {"model": "gpt-4o", "messages": [{"role": "system", "content": "Eres experto en documentos"},
                                             {"role": "user", "content": "hola"}]},
            {"model": "gpt-4o", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "¿qué ves? presentación"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
            {"model": "llama3.2", "stream": False,
             "messages": [{"role": "user", "content": "mira", "images": ["AAAA"]}]},
        ):
            path = "/api/chat" if body["model"] == "llama3.2" else "/v1/chat/completions"
            async with s.post(url + path, json=body) as r:
                assert r.status == 200
    clock.advance(15 * 60)
    stats = await settled(timed)
    assert stats["requests_por_tipo"] == {"chat": 0, "presentacion": 2, "documento": 2, "vision": 2}
    # ana was last seen 35 minutes ago: outside the 30-minute window, still a known user.
    assert stats["conversaciones"] == {"activas": 1, "total_mensajes": 6, "usuarios": ["luis", "ana"]}
    assert stats["detail"]["by_user"]["ana"]["requests"] == 1
    # The /t/ prefix and our headers never reach the upstream.
    assert all(not k.lower().startswith("x-tollgate") for seen in fake.seen for k in seen.headers)
    assert fake.seen[1].path == "/chat/completions"


async def test_two_hundred_concurrent_mixed_calls_add_up_exactly(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.by_model = {m: Behavior(prompt_tokens=None, chunks=n, completion_per_chunk=k)
                     for m, n, k in (("gpt-4o", 3, 7), ("gpt-4o-mini", 5, 1),
                                     ("llama3.2", 4, 3), ("qwen2.5", 2, 11))}
    oa = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    ol = ollama.AsyncClient(host=proxy.url)

    async def one(i: int) -> None:
        messages = [{"role": "user", "content": "m" * (i % 37)}]
        kind = i % 4
        if kind == 0:
            await oa.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
        elif kind == 1:
            stream = await oa.chat.completions.create(model="gpt-4o-mini", messages=messages,  # type: ignore[arg-type]
                                                      stream=True)
            assert isinstance(stream, openai.AsyncStream)
            assert all([c.choices async for c in stream])
        elif kind == 2:
            assert [p async for p in await ol.chat(model="llama3.2", messages=messages, stream=True)][-1].done
        else:
            await ol.generate(model="qwen2.5", prompt="p" * (i % 29))

    await asyncio.gather(*(one(i) for i in range(200)))
    await oa.close()
    await ol.close()  # type: ignore[no-untyped-call]  # ollama's close() has no annotations
    stats = await settled(proxy)
    assert stats["total_requests"] == 200 and stats["errores"] == 0
    assert fake.reported.calls == 200
    assert stats["tokens"]["total"] == fake.reported.total
    assert stats["detail"]["tokens"]["prompt"] == fake.reported.prompt
    assert stats["detail"]["tokens"]["completion"] == fake.reported.completion
    assert stats["detail"]["tokens"]["estimated"] == 0
    assert stats["detail"]["ttft_s"]["count"] == 100
    await proxy.ledger.flush()
    rows = list(proxy.ledger.rows())
    assert len(rows) == 200 and sum(r.total_tokens for r in rows) == fake.reported.total


async def test_healthz(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/healthz") as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}
