"""The answer cache through the proxy, driven by the real `openai` and `ollama` clients: a
repeated question is answered by Tollgate (the fake upstream counts what reaches it), in the
caller's shape, booked as a request that cost nothing and saved what the live call took."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.keys import CACHE
from proxy.ledger import COLUMNS, Filters

from .conftest import Clock, Proxy, settled
from .fake_upstream import Behavior, FakeUpstream

QUESTION = [{"role": "system", "content": "Eres el asistente de la tienda."},
            {"role": "user", "content": "¿Cuál es el horario?"}]


def cached(raw: dict[str, Any], **rule: Any) -> dict[str, Any]:
    raw["cache"] = {"rules": [{"upstreams": ["gpt4o_cloud", "ollama_local"], "ttl_s": 600, **rule}]}
    return raw


@pytest.fixture
async def proxy(raw_config: dict[str, Any]) -> AsyncIterator[Proxy]:
    p = Proxy(cached(raw_config))
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot-key", max_retries=0)
    yield c
    await c.close()


async def ask(client: openai.AsyncOpenAI, stream: bool = False, usage: bool = False,
              headers: dict[str, str] | None = None, messages: list[dict[str, str]] = QUESTION,
              **extra: Any) -> tuple[str, str, int | None, dict[str, str]]:
    """Ask as the bot does: the text, how it ended, the total tokens reported, the headers."""
    create: Any = client.chat.completions.with_raw_response.create   # (the SDK's overloads, by stream)
    raw = await create(model="gpt-4o", messages=messages, temperature=0, stream=stream,
                       **({"stream_options": {"include_usage": True}} if usage else {}),
                       extra_headers=headers or {}, **extra)
    got = dict(raw.headers)
    reply = raw.parse()
    if not stream:
        assert reply.usage is not None
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason, reply.usage.total_tokens, got
    text, finish, total = "", "", None
    async for chunk in reply:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            total = chunk.usage.total_tokens
    return text, finish, total, got


async def metrics(proxy: Proxy) -> dict[str, float]:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
    return {f"{sample.name}{sample.labels.get('result', '')}": sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith("tollgate_cache")}


async def test_a_repeated_question_is_answered_from_the_cache_in_every_shape(
        raw_config: dict[str, Any], fake: FakeUpstream) -> None:
    """Asked whole, then streamed with and without include_usage, then whole again: one upstream
    call; the SDK reads the same text, ending and usage each time; the hits are charged to no
    limit (rpm = 1), cost nothing, and /stats, the text and /metrics show what they saved."""
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 1}
    fake.behavior = Behavior(prompt_tokens=40, chunks=70, completion_per_chunk=1)   # a reply of several pieces
    proxy = Proxy(cached(raw_config))
    await proxy.start()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot-key", max_retries=0)
    try:
        first = await ask(client)
        assert first[3]["x-tollgate-cache"] == "miss" and fake.requests == 1
        live = first[:3]
        assert live[2] == 110
        for stream, usage in ((True, True), (True, False), (False, False)):
            text, finish, total, headers = await ask(client, stream=stream, usage=usage)
            assert (text, finish) == live[:2]
            assert total == (110 if usage or not stream else None)   # usage only where asked, as live
            assert headers["x-tollgate-cache"] == "hit" and int(headers["age"]) >= 0
            assert headers["x-tollgate-upstream"] == "gpt4o_cloud"
            assert "x-ratelimit-remaining-requests" not in headers
        assert fake.requests == 1
        stats = await settled(proxy)
        assert stats["total_requests"] == 4 and stats["errores"] == 0 and stats["tasa_exito"] == "100.0%"
        assert stats["tokens"]["gpt4o_cloud"] == 110                 # only the live call spent tokens
        assert stats["cache"]["hits"] == 3 and stats["cache"]["saved_tokens"] == 3 * 110
        one_call = (40 * 0.03 + 70 * 0.06) / 1000
        assert stats["cache"]["saved_usd"] == pytest.approx(3 * one_call)
        assert stats["costo_estimado_usd"] == f"${one_call:.4f}"
        assert stats["cache"]["since_start"] == {"hit": 3, "miss": 1, "bypass": 0, "hit_rate": 0.75}
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/stats?format=text") as r:
                text = await r.text()
        assert f"💾 Ahorro por caché: 330 tokens, ${3 * one_call:.4f}, 3 requests" in text
        figures = await metrics(proxy)
        assert (figures["tollgate_cache_lookups_totalhit"], figures["tollgate_cache_lookups_totalmiss"]) == (3, 1)
        assert figures["tollgate_cache_saved_tokens_total"] == 330 and figures["tollgate_cache_entries"] == 1
        assert figures["tollgate_cache_bytes"] > 0
    finally:
        await client.close()
        await proxy.stop()


async def test_hits_are_ledger_rows_that_survive_a_restart(proxy: Proxy, fake: FakeUpstream,
                                                          client: openai.AsyncOpenAI) -> None:
    fake.behavior = Behavior(prompt_tokens=10, chunks=2, completion_per_chunk=5)
    await ask(client)
    await ask(client, stream=True)
    recorded = await settled(proxy)
    assert recorded["cache"]["hits"] == 1
    await proxy.ledger.flush(timeout=10)
    rows = [dict(zip(COLUMNS, row)) for batch in proxy.ledger.export_rows(Filters()) for row in batch]
    hit = [r for r in rows if r["outcome"] == "cache_hit"]
    assert len(hit) == 1 and len(rows) == 2
    assert (hit[0]["prompt_tokens"], hit[0]["completion_tokens"], hit[0]["cost_usd"]) == (0, 0, 0.0)
    assert hit[0]["saved_tokens"] == 20 and hit[0]["saved_usd"] == pytest.approx((10 * 0.03 + 10 * 0.06) / 1000)
    await proxy.restart()
    again = await settled(proxy)
    assert (again["cache"]["hits"], again["cache"]["saved_tokens"]) == (1, 20)
    assert again["total_requests"] == 2 and again["tokens"]["gpt4o_cloud"] == 20


async def test_ollama_answers_are_replayed_streamed_or_whole(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(prompt_tokens=9, chunks=3, completion_per_chunk=2)
    oc = ollama.AsyncClient(host=proxy.url)
    messages = [{"role": "user", "content": "¿Abren el domingo?"}]
    options = {"temperature": 0}
    try:
        live = "".join([p.message.content or "" async for p in await oc.chat(model="llama3.2", messages=messages,
                                                                                stream=True, options=options)])
        whole = await oc.chat(model="llama3.2", messages=messages, options=options)
        assert whole.message.content == live and whole.prompt_eval_count == 9 and whole.eval_count == 6
        assert whole.done_reason == "stop"
        parts = [p async for p in await oc.chat(model="llama3.2", messages=messages, stream=True, options=options)]
        assert "".join(p.message.content or "" for p in parts) == live and parts[-1].done
        assert parts[-1].eval_count == 6
        assert fake.requests == 1
        first = await oc.generate(model="llama3.2", prompt="Di hola", options=options)
        second = [p async for p in await oc.generate(model="llama3.2", prompt="Di hola", options=options,
                                                     stream=True)]
        assert "".join(p.response or "" for p in second) == first.response and second[-1].prompt_eval_count == 9
        assert fake.requests == 2
    finally:
        await oc._client.aclose()
    stats = await settled(proxy)
    assert stats["cache"]["hits"] == 3 and stats["cache"]["saved_usd"] == 0.0   # the local model is free
    assert stats["cache"]["saved_tokens"] == 3 * 15


@pytest.mark.parametrize("trouble", ["length", "status", "broken", "too_large", "error_frame"])
async def test_only_complete_successful_answers_are_kept(raw_config: dict[str, Any], fake: FakeUpstream,
                                                        trouble: str) -> None:
    behavior = {"length": Behavior(finish_reason="length"), "status": Behavior(status=500),
                "broken": Behavior(drop_after_chunks=2), "too_large": Behavior(chunks=400),
                "error_frame": Behavior(error_after_chunks=2)}[trouble]
    fake.behavior = behavior
    raw = cached(raw_config)
    raw["cache"]["max_entry_bytes"] = 2000
    proxy = Proxy(raw)
    await proxy.start()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot-key", max_retries=0)
    try:
        for _ in range(2):
            try:
                await ask(client, stream=trouble in ("broken", "error_frame", "too_large"), usage=True)
            except (openai.APIError, aiohttp.ClientError):
                pass
        assert fake.requests == 2
        assert proxy.server is not None and await proxy.server.app[CACHE].store.size() == (0, 0)
    finally:
        await client.close()
        await proxy.stop()


async def test_a_caller_that_leaves_mid_stream_leaves_nothing_in_the_cache(proxy: Proxy, fake: FakeUpstream,
                                                                         client: openai.AsyncOpenAI) -> None:
    gate = asyncio.Event()
    fake.behavior = Behavior(chunks=4, gate_before_last=gate)
    create: Any = client.chat.completions.create
    stream = await create(model="gpt-4o", messages=QUESTION, temperature=0, stream=True)
    async for _ in stream:
        break
    await stream.close()
    await asyncio.wait_for(fake.cancelled.wait(), 10)
    gate.set()
    await proxy.settled()
    assert proxy.server is not None and await proxy.server.app[CACHE].store.size() == (0, 0)
    fake.behavior = Behavior(chunks=4)
    assert (await ask(client))[3]["x-tollgate-cache"] == "miss"


async def test_identical_misses_together_make_one_upstream_call(proxy: Proxy, fake: FakeUpstream,
                                                                client: openai.AsyncOpenAI) -> None:
    fake.behavior = Behavior(stall_before_headers=True, chunks=3)
    leader = asyncio.create_task(ask(client))
    await asyncio.wait_for(fake.arrived.wait(), 10)
    followers = [asyncio.create_task(ask(client, stream=n % 2 == 0, usage=True)) for n in range(4)]
    assert proxy.server is not None
    flights = proxy.server.app[CACHE].flights
    async with asyncio.timeout(10):
        while flights.followers < 4:
            flights.joined.clear()
            await flights.joined.wait()
    fake.stall.set()
    first = await leader
    answers = await asyncio.gather(*followers)
    assert fake.requests == 1
    assert all(a[:2] == first[:2] and a[2] == first[2] and a[3]["x-tollgate-cache"] == "hit" for a in answers)
    # A leader whose answer cannot be kept sends its followers on their own way.
    fake.behavior = Behavior(stall_before_headers=True, status=500)
    fake.stall.clear()
    fake.arrived.clear()
    other = [{"role": "user", "content": "otra pregunta"}]
    calls = [asyncio.create_task(ask(client, messages=other)) for _ in range(3)]
    async with asyncio.timeout(10):
        while flights.followers < 2:
            flights.joined.clear()
            await flights.joined.wait()
    fake.stall.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, openai.InternalServerError) for r in results)
    assert fake.requests == 1 + 3


@pytest.fixture
async def timed(raw_config: dict[str, Any], clock: Clock) -> AsyncIterator[Proxy]:
    p = Proxy(cached(raw_config), clock)
    await p.start()
    yield p
    await p.stop()


async def test_what_a_request_asks_of_the_cache(timed: Proxy, fake: FakeUpstream, clock: Clock) -> None:
    """no-store and X-Tollgate-Cache: off bypass it; no-cache and refresh ask again and keep the
    fresh answer; max-age takes only a young enough entry; the rule's time to live ends it; a
    sampled answer (no temperature), or several choices, is not cached unless the rule says so."""
    fake.behavior = Behavior(chunks=2)
    client = openai.AsyncOpenAI(base_url=timed.url + "/v1", api_key="bot-key", max_retries=0)
    try:
        async def status(headers: dict[str, str] | None = None, **extra: Any) -> str:
            return (await ask(client, headers=headers, **extra))[3]["x-tollgate-cache"]

        assert await status({"Cache-Control": "no-store"}) == "bypass"
        assert await status({"X-Tollgate-Cache": "off"}) == "bypass"
        assert fake.requests == 2 and await status() == "miss" and fake.requests == 3
        assert await status() == "hit"
        assert await status({"Cache-Control": "no-cache"}) == "miss" and fake.requests == 4
        assert await status({"X-Tollgate-Cache": "refresh"}) == "miss" and fake.requests == 5
        clock.advance(120)
        assert await status({"Cache-Control": "max-age=60"}) == "miss" and fake.requests == 6
        headers = (await ask(client, headers={"Cache-Control": "max-age=60"}))[3]
        assert headers["x-tollgate-cache"] == "hit" and headers["age"] == "0"
        clock.advance(30)
        assert (await ask(client))[3]["age"] == "30"
        clock.advance(600)                                          # the rule's ttl_s
        assert await status() == "miss" and fake.requests == 7
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=QUESTION)  # type: ignore[arg-type]
        assert raw.headers["x-tollgate-cache"] == "bypass"         # sampled: temperature left to the model
        assert await status(n=2) == "bypass"
    finally:
        await client.close()


async def test_rules_choose_calls_and_tenants_never_share(raw_config: dict[str, Any], fake: FakeUpstream,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_KEY_A", "key-a-0123456789")
    monkeypatch.setenv("TG_KEY_B", "key-b-0123456789")
    monkeypatch.setenv("TG_ADMIN", "admin-0123456789")
    raw_config["server"]["admin_token_env"] = "TG_ADMIN"
    raw_config["keys"] = {"a": {"key_env": "TG_KEY_A"}, "b": {"key_env": "TG_KEY_B"}}
    raw_config["cache"] = {"rules": [{"types": ["presentacion"], "ttl_s": 60},
                                     {"keys": ["b"], "upstreams": ["gpt4o_cloud"], "sampled": True}]}
    fake.behavior = Behavior(chunks=2)
    proxy = Proxy(raw_config)
    await proxy.start()
    clients = {name: openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=f"key-{name}-0123456789",
                                        max_retries=0) for name in "ab"}
    try:
        slides = [{"role": "user", "content": "Hazme una presentación"}]
        assert (await ask(clients["a"], messages=slides))[3]["x-tollgate-cache"] == "miss"
        assert (await ask(clients["a"], messages=slides))[3]["x-tollgate-cache"] == "hit"
        assert (await ask(clients["b"], messages=slides))[3]["x-tollgate-cache"] == "miss"   # b's own namespace
        assert "x-tollgate-cache" not in (await ask(clients["a"]))[3]                      # no rule: a chat of a
        sampled = await clients["b"].chat.completions.with_raw_response.create(
            model="gpt-4o", messages=QUESTION)  # type: ignore[arg-type]
        assert sampled.headers["x-tollgate-cache"] == "miss"                                 # b's rule keeps them
        assert fake.requests == 4
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/cache/purge") as r:
                assert r.status == 401
            admin = {"Authorization": "Bearer admin-0123456789"}
            async with s.post(proxy.url + "/cache/purge?namespace=nadie", headers=admin) as r:
                assert r.status == 400 and "No proxy key is named 'nadie'" in (await r.json())["error"]["message"]
            async with s.post(proxy.url + "/cache/purge?namespace=a", headers=admin) as r:
                assert (await r.json())["purged"] == 1
            assert (await ask(clients["b"], messages=slides))[3]["x-tollgate-cache"] == "hit"
            assert (await ask(clients["a"], messages=slides))[3]["x-tollgate-cache"] == "miss"
            async with s.post(proxy.url + "/cache/purge", headers=admin) as r:
                body = await r.json()
                assert body["purged"] == 3 and body["entries"] == 0 and body["bytes"] == 0
    finally:
        for c in clients.values():
            await c.close()
        await proxy.stop()


async def test_semantic_matching_finds_a_paraphrase_and_nothing_else(raw_config: dict[str, Any],
                                                                      fake: FakeUpstream) -> None:
    """Vectors from the fake: a paraphrase at cosine 0.95 hits, a question at 0.6 misses, the
    paraphrase under another system prompt never matches; each embedding is a metered call."""
    cached(raw_config, semantic=True, similarity=0.9)
    raw_config["upstreams"]["ollama_local"]["models"].append("nomic-embed-text")
    fake.vectors = {"¿Cuál es el horario?": [1.0, 0.0, 0.0], "¿A qué hora abren?": [0.95, 0.3122, 0.0],
                    "¿Venden pan?": [0.6, 0.8, 0.0]}
    fake.behavior = Behavior(chunks=2)
    proxy = Proxy(raw_config)
    await proxy.start()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot-key", max_retries=0)
    try:
        def asking(text: str, system: str = "Eres el asistente de la tienda.") -> list[dict[str, str]]:
            return [{"role": "system", "content": system}, {"role": "user", "content": text}]

        first = await ask(client, messages=asking("¿Cuál es el horario?"))
        assert first[3]["x-tollgate-cache"] == "miss"
        paraphrase = await ask(client, messages=asking("¿A qué hora abren?"))
        assert paraphrase[3]["x-tollgate-cache"] == "hit" and paraphrase[0] == first[0]
        assert (await ask(client, messages=asking("¿Venden pan?")))[3]["x-tollgate-cache"] == "miss"
        other = await ask(client, messages=asking("¿A qué hora abren?", system="Eres un pirata."))
        assert other[3]["x-tollgate-cache"] == "miss"
        # An exact repeat needs no embedding at all.
        assert (await ask(client, messages=asking("¿Cuál es el horario?")))[3]["x-tollgate-cache"] == "hit"
        paths = [seen.path for seen in fake.seen]
        assert paths.count("/api/embed") == 4 and paths.count("/chat/completions") == 3
        stats = await settled(proxy)
        assert stats["requests_por_tipo"]["cache"] == 4                  # the embeddings, booked as calls
        assert stats["tokens"]["ollama_local"] == 4 * 4
        assert stats["cache"]["hits"] == 2 and stats["cache"]["semantic_questions"] == 3
    finally:
        await client.close()
        await proxy.stop()


async def test_the_sqlite_store_keeps_answers_across_restarts_in_an_owner_only_file(
        raw_config: dict[str, Any], fake: FakeUpstream) -> None:
    raw = cached(raw_config)
    raw["cache"]["backend"] = "sqlite"
    fake.behavior = Behavior(chunks=2)
    proxy = Proxy(raw)
    await proxy.start()
    try:
        for expected in ("miss", "hit"):
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot-key", max_retries=0)
            assert (await ask(client))[3]["x-tollgate-cache"] == expected
            await client.close()
            await proxy.restart()
        assert fake.requests == 1
        path = Path(raw["server"]["data_dir"]) / "cache.sqlite3"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        await proxy.stop()


async def test_the_redis_store_is_shared_by_replicas(raw_config: dict[str, Any], fake: FakeUpstream,
                                                    redis_server: str, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("TOLLGATE_REDIS_URL", redis_server)
    raw = cached(raw_config)
    raw["cache"]["backend"] = "redis"
    raw["redis"] = {"prefix": f"cache-{os.getpid()}-{id(raw)}"}
    second = {**raw, "server": {**raw["server"], "data_dir": str(tmp_path / "second")}}
    fake.behavior = Behavior(chunks=2)
    replicas = [Proxy(raw), Proxy(second)]
    for replica in replicas:
        await replica.start()
    try:
        for replica, expected in zip(replicas, ("miss", "hit")):
            client = openai.AsyncOpenAI(base_url=replica.url + "/v1", api_key="bot-key", max_retries=0)
            assert (await ask(client))[3]["x-tollgate-cache"] == expected
            await client.close()
        assert fake.requests == 1
    finally:
        for replica in replicas:
            await replica.stop()


def test_a_redis_cache_without_its_url_is_refused_before_serving(raw_config: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import config as config_mod

    monkeypatch.delenv("TOLLGATE_REDIS_URL", raising=False)
    raw = cached(raw_config)
    raw["cache"]["backend"] = "redis"
    with pytest.raises(config_mod.ConfigError, match=r"cache.backend = 'redis': expected \$TOLLGATE_REDIS_URL"):
        config_mod.check_serve(config_mod.parse(raw))


@pytest.mark.parametrize("by", ["limit", "budget"])
async def test_an_embedding_refused_by_a_limit_leaves_an_exact_miss_and_no_ledger_row(
        raw_config: dict[str, Any], fake: FakeUpstream, by: str) -> None:
    cached(raw_config, semantic=True, similarity=0.9)
    raw_config["upstreams"]["ollama_local"]["models"].append("nomic-embed-text")
    if by == "limit":        # the first embedding is let through, the second refused
        raw_config["upstreams"]["ollama_local"]["limits"] = {"rpm": 1}
    else:                    # a priced embedding model under a budget too small for any
        raw_config["upstreams"]["ollama_local"]["free"] = False
        raw_config["prices"]["nomic-embed-text"] = {"input": 1.0}
        raw_config["budgets"] = {"embeddings": {"usd": 0.001, "period": "day", "upstream": "ollama_local"}}
    fake.vectors = {"¿Horario?": [1.0, 0.0], "¿A qué hora abren?": [0.99, 0.14]}
    fake.behavior = Behavior(chunks=2)
    proxy = Proxy(raw_config)
    await proxy.start()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot-key", max_retries=0)
    try:
        recorded = proxy.records()
        first = await ask(client, messages=[{"role": "user", "content": "¿Horario?"}])
        second = await ask(client, messages=[{"role": "user", "content": "¿A qué hora abren?"}])
        assert first[3]["x-tollgate-cache"] == second[3]["x-tollgate-cache"] == "miss"   # no vector, no match
        stats = await settled(proxy)
        let_through = 1 if by == "limit" else 0
        assert stats["detail"]["refused"]["rate_limited" if by == "limit" else "over_budget"] == 2 - let_through
        # The refused ones booked nothing: no ledger row, nothing at the upstream.
        assert [r.endpoint for r in recorded.rows].count("embed") == let_through
        assert [s.path for s in fake.seen].count("/api/embed") == let_through
    finally:
        await client.close()
        await proxy.stop()
