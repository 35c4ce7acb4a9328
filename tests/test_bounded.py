"""Bounded cost per call, whatever a client sends: the estimator's work, name lengths, the size of
/stats and /metrics under many distinct users and models."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from proxy.ledger import CallRecord
from proxy.tokens import Estimator

from .conftest import Proxy
from .fake_upstream import FakeUpstream


class Untouchable(dict):  # type: ignore[type-arg]
    """A message the estimator must not read: past its bound, it extrapolates instead."""

    def get(self, *args: Any) -> Any:
        raise AssertionError("the estimator read a message past its bound")


def test_the_estimator_reads_a_bounded_number_of_messages() -> None:
    est = Estimator(max_chars=200_000, max_messages=1_000)
    head = [{"role": "user", "content": "a"}] * 1_000
    messages = head + [Untouchable(role="user", content="a")] * 329_000
    estimate = est.chat_prompt(messages, "gpt-4o")
    # Extrapolated from the first thousand, which are read exactly.
    assert estimate == 3 + 330 * (est.chat_prompt(head, "gpt-4o") - 3)


def test_the_estimator_tokenises_a_bounded_number_of_characters() -> None:
    est = Estimator(max_chars=1_000)
    text = "hola mundo " * 10_000
    exact = Estimator(max_chars=10**9).text(text, "gpt-4o")
    assert est.text(text, "gpt-4o") == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize("field,where", [("model", "body"), ("user", "body"), ("X-Tollgate-User", "header"),
                                         ("X-Tollgate-Type", "header")])
async def test_names_longer_than_256_characters_are_refused(proxy: Proxy, fake: FakeUpstream, field: str,
                                                            where: str) -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}
    headers = {}
    if where == "body":
        body[field] = "m" * 257
    else:
        headers[field] = "u" * 257
    recorded = proxy.records()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 400
            message = (await r.json())["error"]["message"]
    assert "257 characters" in message and "256" in message
    (row,) = await recorded.wait_for(1)
    assert row.outcome == "bad_request" and fake.requests == 0
    assert len(row.model) <= 256 and len(row.user or "") <= 256


async def test_stats_and_metrics_stay_small_under_many_users_and_models(proxy: Proxy) -> None:
    acc = proxy.accounting
    for i in range(20_000):
        acc.record(CallRecord(
            ts=acc.clock(), upstream="gpt4o_cloud", model=f"model-{i % 5_000}-" + "x" * 200, dialect="openai",
            endpoint="chat", type="chat", user=f"user-{i}-" + "y" * 200, stream=False, status=200,
            outcome="ok", prompt_tokens=3, completion_tokens=2, cached_tokens=0, estimated=False,
            latency_s=0.01, ttft_s=None, cost_usd=0.001))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/stats") as r:
            stats_body = await r.read()
            stats = await r.json()
        async with s.get(proxy.url + "/metrics") as r:
            metrics_body = await r.read()
        async with s.get(proxy.url + "/stats?format=text") as r:
            text = await r.read()
    assert stats["total_requests"] == 20_000 and stats["tokens"]["total"] == 100_000
    assert len(stats["conversaciones"]["usuarios"]) == 100 and stats["detail"]["distinct_users"] == 10_001
    by_model = stats["detail"]["by_model"]
    assert len(by_model) == 101 and sum(t["requests"] for t in by_model.values()) == 20_000
    # /metrics holds at most 50 model labels of at most 256 characters, whatever clients name.
    assert len(stats_body) < 150_000 and len(metrics_body) < 200_000 and len(text) < 5_000
