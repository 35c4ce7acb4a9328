"""/metrics: prometheus_client's exposition, parsed by its own parser, agreeing with /stats."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Proxy, settled, workload
from .fake_upstream import Behavior, FakeUpstream

ROOT = Path(__file__).resolve().parent.parent


async def exposition(proxy: Proxy) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=")
            return await r.text()


async def scrape(proxy: Proxy) -> dict[str, list[Any]]:
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(await exposition(proxy)):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def total(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return float(sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())))


async def test_metrics_agree_with_stats_after_a_known_workload(proxy: Proxy, fake: FakeUpstream) -> None:
    await workload(proxy, fake)
    fake.behavior = Behavior(prompt_tokens=8, chunks=3, completion_per_chunk=2)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "stream": True, "messages": []}) as r:
            await r.read()
    stats = await settled(proxy)
    m = await scrape(proxy)
    assert total(m, "tollgate_requests_total") == stats["total_requests"] == 5
    assert total(m, "tollgate_requests_total", outcome="bad_request") == stats["errores"] == 1
    assert total(m, "tollgate_requests_total", type="presentacion") == 1
    assert total(m, "tollgate_tokens_total") == stats["tokens"]["total"]
    for upstream in ("gpt4o_cloud", "ollama_local"):
        assert total(m, "tollgate_tokens_total", upstream=upstream) == stats["tokens"][upstream]
    assert total(m, "tollgate_tokens_total", kind="prompt") == stats["detail"]["tokens"]["prompt"]
    assert abs(total(m, "tollgate_cost_usd_total") - float(stats["costo_estimado_usd"][1:])) < 1e-4
    assert total(m, "tollgate_request_duration_seconds_count") == 5
    assert total(m, "tollgate_time_to_first_token_seconds_count") == stats["detail"]["ttft_s"]["count"] == 1
    assert total(m, "tollgate_in_flight_calls") == 0
    for row in stats["detail"]["limits"]:
        labels = {"scope": row["scope"], "limit": row["limit"]}
        assert total(m, "tollgate_limit_used", **labels) == row["used"]
        assert total(m, "tollgate_limit_max", **labels) == row["max"]
        assert total(m, "tollgate_limit_remaining", **labels) == row["max"] - row["used"]
    # Bounded labels: no user ids, ever.
    assert all("user" not in s.labels for samples in m.values() for s in samples)


async def test_grafana_dashboard_only_queries_exposed_metrics(proxy: Proxy) -> None:
    # Every series name the families declare, whether or not a call has produced samples yet.
    exposed = {family.name + suffix for family in text_string_to_metric_families(await exposition(proxy))
               for suffix in _SUFFIXES[family.type]}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "tollgate.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    queried = {name for e in exprs for name in re.findall(r"\btollgate_[a-z_]+", e)}
    assert queried and queried <= exposed, queried - exposed


async def test_in_flight_calls_are_counted_while_they_last(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(stall_before_headers=True)
    async with aiohttp.ClientSession() as s:
        calls = [asyncio.create_task(s.post(proxy.url + "/v1/chat/completions",
                                            json={"model": "gpt-4o", "messages": []})) for _ in range(2)]
        while fake.requests < 2:
            fake.arrived.clear()
            await fake.arrived.wait()
        assert total(await scrape(proxy), "tollgate_in_flight_calls") == 2
        fake.stall.set()
        for call in calls:
            (await call).release()
    await settled(proxy)
    assert total(await scrape(proxy), "tollgate_in_flight_calls") == 0
