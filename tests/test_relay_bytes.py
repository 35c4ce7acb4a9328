"""The relay is byte-faithful: what the upstream wrote is what the client reads.

Each stream is fetched twice, once straight from the fake and once through the proxy, and the
bytes compared. The only difference allowed is the usage Tollgate asked for on the client's
behalf, and then the client gets exactly the stream it would have got without asking.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib

import aiohttp
import orjson
import pytest

from .conftest import Proxy
from .fake_upstream import Behavior, FakeUpstream

AWKWARD = {
    "crlf": Behavior(line_ending="crlf"),
    "mixed": Behavior(line_ending="mixed"),
    "keepalive-and-fields": Behavior(keepalive=True, sse_fields=True),
    "split": Behavior(split_bytes=3, line_ending="mixed", keepalive=True),
    "gzip": Behavior(gzip=True, line_ending="crlf"),
}


async def _fetch(url: str, body: dict[str, object], **headers: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=orjson.dumps(body),
                                headers={"Content-Type": "application/json", **headers}) as response:
            return response.status, await response.read(), dict(response.headers)


def _chat(stream: bool, include_usage: bool | None = None) -> dict[str, object]:
    body: dict[str, object] = {"model": "openai/gpt-4o", "stream": stream,
                               "messages": [{"role": "user", "content": "hola"}]}
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return body


@pytest.mark.parametrize("awkward", AWKWARD, ids=list(AWKWARD))
@pytest.mark.parametrize("include_usage", [True, None], ids=["usage-asked", "usage-injected"])
async def test_chat_stream_reaches_the_client_byte_for_byte(proxy: Proxy, fake: FakeUpstream, awkward: str,
                                                           include_usage: bool | None) -> None:
    fake.behavior = AWKWARD[awkward]
    fake.behavior.prompt_tokens = 8
    status, direct, _ = await _fetch(fake.url + "/chat/completions", _chat(True, include_usage))  # type: ignore[attr-defined]
    assert status == 200 and (b"\r" in direct or awkward in ("keepalive-and-fields",))
    reported = fake.reported.total
    recorded = proxy.records()
    status, relayed, headers = await _fetch(proxy.url + "/v1/chat/completions", _chat(True, include_usage))
    assert status == 200
    assert relayed == direct
    assert "Content-Encoding" not in headers
    (row,) = await recorded.wait_for(1)
    assert (row.outcome, row.estimated) == ("ok", False)
    # The usage was counted even when the client never saw it.
    assert row.total_tokens == fake.reported.total - reported == 16


async def _fetch_in_two(url: str, body: dict[str, object], fake: FakeUpstream, with_end: bool) -> bytes:
    """A stream whose last frame lacks its line ending: sent with the end of the body in one
    write, or alone, its end held back until the client has read the frames before it (so the
    end comes in a read of its own)."""
    release = asyncio.Event()
    fake.behavior = Behavior(prompt_tokens=6, chunks=2, unterminated_last=True, last_with_end=with_end,
                             pause_before_eof=None if with_end else release)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            first = await r.content.readany()
            release.set()
            return first + await r.content.read()


@pytest.mark.parametrize("path,direct_path,body", [
    ("/v1/chat/completions", "/chat/completions", _chat(True, include_usage=True)),
    ("/api/chat", "/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "hola"}]}),
], ids=["openai", "ollama"])
@pytest.mark.parametrize("with_end", [True, False], ids=["last-read-ends-the-body", "body-ends-after"])
async def test_a_last_frame_without_its_line_ending_is_relayed_and_counted(
        proxy: Proxy, fake: FakeUpstream, path: str, direct_path: str, body: dict[str, object], with_end: bool) -> None:
    """The final frame (`data: [DONE]`, Ollama's done line) comes without the line ending that
    should close it, in the same read as the end of the body or before it: either way it is the
    upstream's, passed on, and the usage before it counted."""
    direct = await _fetch_in_two(fake.url + direct_path, body, fake, with_end)  # type: ignore[attr-defined]
    assert not direct.endswith(b"\n")
    reported = fake.reported.total
    recorded = proxy.records()
    relayed = await _fetch_in_two(proxy.url + path, body, fake, with_end)
    assert relayed == direct
    (row,) = await recorded.wait_for(1)
    assert (row.outcome, row.estimated) == ("ok", False)
    assert row.total_tokens == fake.reported.total - reported == 10


@pytest.mark.parametrize("awkward", AWKWARD, ids=list(AWKWARD))
async def test_responses_events_reach_the_client_byte_for_byte(proxy: Proxy, fake: FakeUpstream,
                                                               awkward: str) -> None:
    fake.behavior = AWKWARD[awkward]
    fake.behavior.prompt_tokens = 4
    body = {"model": "openai/gpt-4o", "input": "hola", "stream": True}
    _, direct, _ = await _fetch(fake.url + "/responses", body)  # type: ignore[attr-defined]
    recorded = proxy.records()
    status, relayed, _ = await _fetch(proxy.url + "/v1/responses", body)
    assert status == 200 and relayed == direct
    (row,) = await recorded.wait_for(1)
    assert (row.outcome, row.total_tokens, row.estimated) == ("ok", 12, False)


async def test_compressed_whole_reply_is_decoded_and_counted(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(gzip=True, prompt_tokens=10, chunks=3, completion_per_chunk=1)
    recorded = proxy.records()
    for path, body in (("/v1/chat/completions", _chat(False)),
                       ("/api/chat", {"model": "llama3", "stream": False, "messages": []})):
        status, relayed, headers = await _fetch(proxy.url + path, body, **{"Accept-Encoding": "identity"})
        assert status == 200 and "Content-Encoding" not in headers
        assert orjson.loads(relayed)["model"] in ("openai/gpt-4o", "llama3")
    rows = await recorded.wait_for(2)
    assert [(r.outcome, r.total_tokens, r.estimated) for r in rows] == [("ok", 13, False)] * 2


@pytest.mark.parametrize("coding,compress", [("gzip", gzip.compress), ("deflate", zlib.compress)])
async def test_compressed_request_reaches_the_upstream_decoded_and_labelled_so(
        proxy: Proxy, fake: FakeUpstream, coding: str, compress: object) -> None:
    raw = orjson.dumps(_chat(False))
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/chat/completions", data=compress(raw),  # type: ignore[operator]
                                headers={"Content-Type": "application/json", "Content-Encoding": coding}) as r:
            assert r.status == 200
    seen = fake.seen[-1]
    assert seen.body["messages"] == [{"role": "user", "content": "hola"}]
    assert "Content-Encoding" not in seen.headers


async def test_invalid_compressed_request_is_a_400(proxy: Proxy, fake: FakeUpstream) -> None:
    recorded = proxy.records()
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/chat/completions", data=b"\x1f\x8b not gzip at all",
                                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}) as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert "gzip" in error["message"] and error["type"] == "invalid_request_error"
    (row,) = await recorded.wait_for(1)
    assert row.outcome == "bad_request" and fake.requests == 0


async def test_the_upstreams_tighter_ratelimit_headers_are_not_replaced(proxy: Proxy, fake: FakeUpstream) -> None:
    """The fixture's cloud allows 10,000 a minute; when GitHub says 3 are left, the bot hears 3."""
    theirs = {"x-ratelimit-limit-requests": "50", "x-ratelimit-remaining-requests": "3",
              "x-ratelimit-reset-requests": "7h", "x-ratelimit-limit-tokens": "900000",
              "x-ratelimit-remaining-tokens": "899000", "x-ratelimit-reset-tokens": "1s"}
    for stream in (False, True):
        fake.behavior = Behavior(headers=theirs)
        _, _, headers = await _fetch(proxy.url + "/v1/chat/completions", _chat(stream))
        assert {k: headers[k] for k in theirs if "requests" in k} == {k: v for k, v in theirs.items() if "requests" in k}
        # Our 150,000 tokens a minute leave less than their 899,000: ours are the truthful ones.
        assert headers["x-ratelimit-limit-tokens"] == "150000"
        assert int(headers["x-ratelimit-remaining-tokens"]) < 150000


@pytest.mark.parametrize("model,sent,expected", [
    ("openai/o3-mini", {}, {"max_completion_tokens": 100}),
    ("openai/gpt-5", {}, {"max_completion_tokens": 100}),
    ("openai/gpt-4o", {}, {"max_tokens": 100}),
    ("openai/gpt-4o", {"max_completion_tokens": 500}, {"max_completion_tokens": 100}),
    ("openai/o3-mini", {"max_completion_tokens": 50}, {"max_completion_tokens": 50}),
])
async def test_output_cap_uses_the_field_the_model_takes(raw_config: dict[str, object], fake: FakeUpstream,
                                                         model: str, sent: dict[str, int],
                                                         expected: dict[str, int]) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"max_output_tokens": 100}  # type: ignore[index]
    proxy = Proxy(raw_config)
    await proxy.start()
    try:
        body = {"model": model, "messages": [{"role": "user", "content": "hola"}], **sent}
        status, _, _ = await _fetch(proxy.url + "/v1/chat/completions", body)
    finally:
        await proxy.stop()
    assert status == 200
    seen = fake.seen[-1].body
    assert {k: seen[k] for k in ("max_tokens", "max_completion_tokens") if k in seen} == expected
