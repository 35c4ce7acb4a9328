"""The answer cache's parts (issue 13, not yet wired in): what makes two questions the same, a
store bounded in bytes with its time to live, and identical misses sharing one upstream call."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.keys import IGNORED, deterministic, key
from proxy.cache.store import Entry, Flights, MemoryCache

from .conftest import Clock

CHAT: dict[str, Any] = {"model": "gpt-4o", "temperature": 0,
        "messages": [{"role": "system", "content": "Eres un asistente."}, {"role": "user", "content": "¿Horario?"}]}


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON with every object's keys in another order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


# Bodies as orjson reads them: it turns integers beyond 64 bits into floats.
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(extra=st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k not in IGNORED["openai"]),
                             json_values, max_size=4),
       seed=st.integers(0, 2**32))
def test_the_order_of_keys_never_changes_the_key(extra: dict[str, Any], seed: int) -> None:
    body = {**CHAT, **{k: v for k, v in extra.items() if k != "model"}}
    assert key("openai", "bot", "cloud", "gpt-4o", "chat", body) == \
        key("openai", "bot", "cloud", "gpt-4o", "chat", shuffled(body, random.Random(seed)))


def test_what_does_not_change_the_answer_is_left_out_and_what_does_is_not() -> None:
    base = key("openai", "bot", "cloud", "gpt-4o", "chat", CHAT)
    for field, value in (("stream", True), ("stream_options", {"include_usage": True}), ("user", "5215512345678"),
                         ("metadata", {"conversation": "x"}), ("store", False), ("service_tier", "flex")):
        assert key("openai", "bot", "cloud", "gpt-4o", "chat", {**CHAT, field: value}) == base, field
    different = [
        key("openai", "other-key", "cloud", "gpt-4o", "chat", CHAT),        # tenants never share answers
        key("openai", None, "cloud", "gpt-4o", "chat", CHAT),
        key("openai", "bot", "local", "gpt-4o", "chat", CHAT),
        key("openai", "bot", "cloud", "gpt-4o-mini", "chat", CHAT),
        key("openai", "bot", "cloud", "gpt-4o", "completion", CHAT),
        key("openai", "bot", "cloud", "gpt-4o", "chat", {**CHAT, "max_tokens": 10}),
        key("openai", "bot", "cloud", "gpt-4o", "chat", {**CHAT, "temperature": 0.2}),
        key("openai", "bot", "cloud", "gpt-4o", "chat",
            {**CHAT, "messages": [*CHAT["messages"][:1], {"role": "user", "content": "¿Horario? "}]}),
        key("openai", "bot", "cloud", "gpt-4o", "chat",
            {**CHAT, "messages": [{"role": "system", "content": "Otro."}, *CHAT["messages"][1:]]}),
    ]
    assert len({base, *different}) == 1 + len(different)
    ollama = {"model": "llama3.2", "messages": CHAT["messages"], "options": {"temperature": 0}}
    assert key("ollama", None, "local", "llama3.2", "chat", {**ollama, "keep_alive": "5m", "stream": False}) == \
        key("ollama", None, "local", "llama3.2", "chat", ollama)


def test_only_deterministic_questions_are_cached_by_default() -> None:
    assert deterministic("openai", CHAT) == (True, "")
    assert deterministic("openai", {**CHAT, "temperature": 0.7, "seed": 42})[0]
    assert not deterministic("openai", {k: v for k, v in CHAT.items() if k != "temperature"})[0]  # default is 1
    assert not deterministic("openai", {**CHAT, "temperature": 0.7})[0]
    assert deterministic("openai", {**CHAT, "n": 2}) == (False, "several choices (n > 1)")
    assert not deterministic("openai", {**CHAT, "tools": [{"type": "function"}]})[0]
    assert deterministic("ollama", {"options": {"temperature": 0}})[0]
    assert not deterministic("ollama", {"options": {}})[0]               # Ollama's default is 0.8
    assert deterministic("ollama", {"options": {"seed": 7}})[0]


def entry(key_: str, size: int, clock: Clock, ttl: float = 60.0, namespace: str = "bot") -> Entry:
    return Entry(key_, namespace, b"x" * size, 10, 5, clock(), ttl)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), max_size=60), reads=st.lists(st.integers(0, 59), max_size=60))
def test_the_store_never_holds_more_bytes_than_its_bound(sizes: list[int], reads: list[int]) -> None:
    clock = Clock()
    cache = MemoryCache(max_bytes=10_000, max_entry_bytes=4_000, clock=clock)
    for n, size in enumerate(sizes):
        stored = cache.put(entry(f"k{n}", size, clock))
        assert stored == (entry(f"k{n}", size, clock).size <= 4_000)
        assert cache.figures.bytes <= 10_000
        for r in reads[:n]:
            cache.get(f"k{r}")
    assert cache.figures.bytes == sum(e.size for e in cache._entries.values())
    assert cache.figures.entries == len(cache._entries)


def test_least_recently_used_leave_first_and_stale_answers_are_never_given() -> None:
    clock = Clock()
    size = entry("a", 1000, clock).size
    cache = MemoryCache(max_bytes=3 * size, max_entry_bytes=size, clock=clock)
    for name in "abc":
        assert cache.put(entry(name, 1000, clock, ttl=60 if name != "c" else 10))
    assert cache.get("a") is not None            # a is now the most recently used
    assert cache.put(entry("d", 1000, clock))    # b, the least recently used, makes room
    assert cache.get("b") is None and cache.get("a") is not None and cache.figures.evictions == 1
    clock.advance(10)
    assert cache.get("c") is None                # its ten seconds are over
    found = cache.get("d")
    assert found is not None and found.age(clock()) == 10
    assert not cache.put(entry("huge", 2000, clock)) and cache.figures.refused_too_large == 1
    cache.put(entry("e", 10, clock, namespace="other-key"))
    assert cache.purge("bot") == 2 and cache.get("e") is not None
    assert cache.purge() == 1 and cache.figures.bytes == 0


async def test_identical_misses_that_arrive_together_make_one_upstream_call() -> None:
    clock = Clock()
    flights = Flights()
    upstream_calls = 0
    release = asyncio.Event()

    async def ask(cacheable: bool) -> Entry | None:
        nonlocal upstream_calls
        flight = flights.join("k")
        if flight is not None:
            return await flight
        upstream_calls += 1
        await release.wait()
        answer = entry("k", 100, clock) if cacheable else None
        flights.land("k", answer)
        return answer

    callers = [asyncio.create_task(ask(True)) for _ in range(10)]
    await asyncio.sleep(0)   # all ten have joined: one leads, nine wait on it
    release.set()
    answers = await asyncio.gather(*callers)
    assert upstream_calls == 1 and all(a is not None and a.key == "k" for a in answers)
    # A leader whose answer cannot be cached lets each follower go on its own.
    release.clear()
    callers = [asyncio.create_task(ask(False)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*callers) == [None, None, None] and upstream_calls == 2


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 30), st.integers(0, 2)),
                      max_size=80), seed=st.integers(0, 2**32))
def test_the_semantic_index_finds_what_brute_force_finds(steps: list[tuple[str, int, int]], seed: int) -> None:
    """Adds, removals (a row's place taken by its context's last) and evictions at the bound
    never make the index answer other than a plain search over what it should hold."""
    import numpy as np

    from proxy.cache.semantic import SemanticIndex, unit

    rng = np.random.default_rng(seed)
    index = SemanticIndex(max_entries=12)
    held: dict[str, tuple[str, Any]] = {}      # key: (context, vector), oldest first
    for action, n, c in steps:
        key, context = f"k{n}", f"ctx{c}"
        if action == "add":
            vector = unit(list(rng.standard_normal(8)))
            assert vector is not None
            index.add(context, key, vector)
            held.pop(key, None)
            while len(held) >= 12:
                held.pop(next(iter(held)))
            held[key] = (context, vector)
        else:
            index.remove(key)
            held.pop(key, None)
        assert len(index) == len(held)
    for c in range(3):
        probe = unit(list(rng.standard_normal(8)))
        assert probe is not None
        mine = {k: float(v @ probe) for k, (ctx, v) in held.items() if ctx == f"ctx{c}"}
        found = index.nearest(f"ctx{c}", probe, -1.0)
        if not mine:
            assert found is None
        else:
            assert found is not None and found[1] == pytest.approx(max(mine.values()), abs=1e-5)


async def test_a_large_context_is_searched_off_the_loop_and_checked_again() -> None:
    """Past OFFLOAD_ROWS questions the search runs on a worker thread; its winner is the one a
    search on the loop finds, and a winner the store has let go is a miss that leaves the index."""
    import numpy as np

    from proxy.cache import OFFLOAD_ROWS, AnswerCache, Lookup
    from proxy.cache.semantic import unit
    from proxy.config import CachePolicy, CacheRule

    clock = Clock()
    rule = CacheRule(semantic=True, similarity=0.8)
    cache = AnswerCache(CachePolicy(rules=(rule,)), MemoryCache(1 << 30, 1 << 20, clock), clock)
    assert cache.index is not None
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((OFFLOAD_ROWS + 500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for n, vector in enumerate(vectors):
        cache.index.add("ctx", f"k{n}", vector)
        cache.store.put(entry(f"k{n}", 10, clock, namespace=""))  # type: ignore[attr-defined]
    lookup = Lookup(rule, "new", "", False, None, "¿?", "ctx")
    probe = unit(list(vectors[1234] + 0.01 * rng.standard_normal(32)))
    assert probe is not None
    found = await cache.similar(lookup, probe)
    assert found is not None and found.key == "k1234"
    await cache.store.drop("")
    assert await cache.similar(lookup, probe) is None
    assert cache.index.score("ctx", "k1234", probe) is None


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Any, clock: Clock) -> Any:
    """Each engine behind CacheStore, holding at most three entries of 1,000 bytes."""
    from proxy.cache.redis_store import RedisCache
    from proxy.cache.sqlite_store import SqliteCache

    size = entry("a", 1000, clock).size
    if request.param == "memory":
        made: Any = MemoryCache(3 * size, size, clock)
    elif request.param == "sqlite":
        made = SqliteCache(tmp_path / "cache.sqlite3", 3 * size, size, clock)
    else:
        url = request.getfixturevalue("redis_server")
        made = RedisCache(url, f"parts-{random.getrandbits(32)}", 3 * size, size, 2.0, clock)
    yield made
    await made.close()


async def test_every_store_keeps_its_bound_its_order_and_its_time_to_live(store: Any, clock: Clock) -> None:
    from proxy.cache.redis_store import RedisCache

    for name in "abc":
        assert await store.keep(entry(name, 1000, clock, ttl=60 if name != "c" else 10))
    assert await store.find("a") is not None          # a is now the most recently used
    kept = await store.keep(entry("d", 1000, clock))  # b, the least recently used, makes room
    assert kept is not None and kept == await store.size()   # the write says what is held
    assert await store.find("b") is None and await store.find("a") is not None
    entries, held = await store.size()
    assert entries == 3 and held == 3 * entry("a", 1000, clock).size
    found = await store.find("d")
    assert found is not None and found.body == b"x" * 1000 and found.prompt_tokens == 10
    assert not await store.keep(entry("huge", 2000, clock))
    await store.keep(entry("e", 10, clock, namespace="other-key"))
    assert await store.drop("bot") >= 2 and await store.find("e") is not None
    assert await store.drop(None) == 1 and (await store.size())[1] == 0
    if not isinstance(store, RedisCache):   # Redis expires on its own clock (as tested through the proxy)
        await store.keep(entry("f", 10, clock, ttl=10))
        clock.advance(11)
        assert await store.find("f") is None and await store.size() == (0, 0)
