"""The answer cache's costs and savings, in one run.

    python bench/cache.py [--quick]

1. latency, one caller at a time (p50, p99): a hit, a live call through Tollgate (the same
   request with `X-Tollgate-Cache: off`), the bare relay (bench/bare_relay.py) and the fake
   upstream directly, in interleaved rounds;
2. semantic lookup: the nearest of 1,000 and 100,000 questions (768 dimensions, one context),
   numpy's matrix-vector product against sqlite-vec's vec0 table (when it is installed);
3. memory per 10,000 entries: the memory store (answers of about 600 bytes) and the semantic
   index (768-dimension vectors), by tracemalloc;
4. a replayed workload through the real app (in-process, against the fake upstream): 50% new
   questions, 30% exact repeats, 20% paraphrases (vectors at cosine about 0.97 to an earlier
   question's): the hit rate and the tokens saved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import ROOT, cloud_config, free_port, pct, start, start_proxy, start_upstream, stop  # noqa: E402

SYSTEM = {"role": "system", "content": "Eres el asistente de la tienda."}
QUESTION: dict[str, Any] = {"model": "gpt-4o", "temperature": 0,
                            "messages": [SYSTEM, {"role": "user", "content": "¿Cuál es el horario?"}]}


async def timed(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> float:
    start_at = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status} from {url}")
    return time.perf_counter() - start_at


async def latency(rounds: int, count: int) -> None:
    upstream, up_port = await start_upstream()
    proxy, proxy_port, _ = await start_proxy(cloud_config(up_port) + "[[cache.rules]]\nttl_s = 3600\n")
    bare_port = free_port()
    bare = await start([sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(bare_port),
                        f"http://127.0.0.1:{up_port}"], b"bare relay ready")
    body = orjson.dumps(QUESTION)
    kinds = {
        "direct": (f"http://127.0.0.1:{up_port}/chat/completions", {}),
        "bare relay": (f"http://127.0.0.1:{bare_port}/v1/chat/completions", {}),
        "Tollgate, live": (f"http://127.0.0.1:{proxy_port}/v1/chat/completions", {"X-Tollgate-Cache": "off"}),
        "Tollgate, hit": (f"http://127.0.0.1:{proxy_port}/v1/chat/completions", {}),
    }
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        async with aiohttp.ClientSession() as session:
            for url, headers in kinds.values():  # warm up; the first proxied call fills the cache
                for _ in range(50):
                    await timed(session, url, body, headers)
            for _ in range(rounds):
                for name, (url, headers) in kinds.items():
                    samples[name] += [await timed(session, url, body, headers) for _ in range(count)]
    finally:
        await stop(proxy, bare, upstream)
    print(f"\n## 1. latency, one caller, {rounds} interleaved rounds of {count} (ms)")
    print("| path | p50 | p99 |\n|---|---:|---:|")
    for name, values in samples.items():
        print(f"| {name} | {pct(values, .5) * 1000:.3f} | {pct(values, .99) * 1000:.3f} |")
    hit, bare_p50 = pct(samples["Tollgate, hit"], .5), pct(samples["bare relay"], .5)
    live = pct(samples["Tollgate, live"], .5)
    print(f"hit / bare relay p50: {hit / bare_p50:.2f}x; hit / live through Tollgate: {hit / live:.2f}x")


def semantic(sizes: list[int], dims: int = 768, queries: int = 200) -> None:
    from proxy.cache.semantic import SemanticIndex, unit

    rng = random.Random(7)
    import numpy as np

    gen = np.random.default_rng(7)
    print(f"\n## 2. semantic lookup, nearest of N questions ({dims} dimensions, one context), median of {queries}")
    print("| N | numpy (ms) | sqlite-vec (ms) |\n|---:|---:|---:|")
    for size in sizes:
        vectors = gen.standard_normal((size, dims), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index = SemanticIndex(size)
        for n in range(size):
            index.add("ctx", f"k{n}", vectors[n])
        probes = [unit(list(vectors[rng.randrange(size)] + 0.05 * gen.standard_normal(dims, dtype=np.float32)))
                  for _ in range(queries)]
        times = []
        for probe in probes:
            assert probe is not None
            began = time.perf_counter()
            index.nearest("ctx", probe, 0.9)
            times.append(time.perf_counter() - began)
        numpy_ms = statistics.median(times) * 1000
        vec_ms = _sqlite_vec(vectors, probes)
        print(f"| {size:,} | {numpy_ms:.3f} | {'not installed (sqlite-vec, pysqlite3-binary)' if vec_ms is None else f'{vec_ms:.3f}'} |")


def _sqlite_vec(vectors: Any, probes: list[Any]) -> float | None:
    # This Python's sqlite3 may not load extensions (pyenv builds do not): pysqlite3-binary
    # bundles a SQLite that does. Neither is one of Tollgate's dependencies: pip install both
    # beside sqlite-vec to compare.
    try:
        import sqlite_vec  # type: ignore[import-not-found, import-untyped, unused-ignore]
        import pysqlite3 as sqlite3  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None

    conn = sqlite3.connect(":memory:")
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.execute(f"CREATE VIRTUAL TABLE q USING vec0(embedding float[{vectors.shape[1]}] distance_metric=cosine)")
    conn.executemany("INSERT INTO q(rowid, embedding) VALUES (?, ?)",
                     ((n, vectors[n].tobytes()) for n in range(vectors.shape[0])))
    times = []
    for probe in probes:
        began = time.perf_counter()
        conn.execute("SELECT rowid, distance FROM q WHERE embedding MATCH ? AND k = 1", (probe.tobytes(),)).fetchall()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def memory(entries: int = 10_000, dims: int = 768) -> None:
    from proxy.cache import replay
    from proxy.cache.semantic import SemanticIndex, unit
    from proxy.cache.store import Entry, MemoryCache

    import numpy as np

    answer = replay.Answer("openai", "chat", "gpt-4o-2024-08-06", "chatcmpl-x", 1, "",
                           "Abrimos de lunes a sábado de 9:00 a 19:00 y los domingos de 10:00 a 14:00. " * 5,
                           "stop", 60, 120)
    body = replay.json_body(answer)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = MemoryCache(1 << 32, 1 << 20)
    for n in range(entries):
        cache.put(Entry(f"{n:064x}", "bot", bytes(bytearray(body)), 60, 120, time.time(), 3600))
    store_bytes = tracemalloc.get_traced_memory()[0] - before
    gen = np.random.default_rng(3)
    before = tracemalloc.get_traced_memory()[0]
    index = SemanticIndex(entries)
    for n in range(entries):
        vector = unit(list(gen.standard_normal(dims)))
        assert vector is not None
        index.add(f"ctx{n % 10}", f"{n:064x}", vector)
    index_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"\n## 3. memory per {entries:,} entries")
    print(f"memory store: {store_bytes / 2**20:.1f} MiB ({store_bytes / entries:,.0f} B an entry, answers of "
          f"{len(body)} B; the store counts {cache.figures.bytes / entries:,.0f} B an entry against max_bytes)")
    print(f"semantic index ({dims} dimensions): {index_bytes / 2**20:.1f} MiB ({index_bytes / entries:,.0f} B a question)")


async def workload(total: int) -> None:
    from aiohttp.test_utils import TestServer

    from proxy import config as config_mod
    from proxy.app import create_app
    from tests.conftest import base_config
    from tests.fake_upstream import Behavior, FakeUpstream

    rng = random.Random(11)
    fake = FakeUpstream()
    fake.behavior = Behavior(chunks=30, completion_per_chunk=3, prompt_tokens=45)
    upstream = TestServer(fake.app, host="127.0.0.1")
    await upstream.start_server()
    os.environ.setdefault("TOLLGATE_TEST_CLOUD_KEY", "bench")
    raw = base_config(str(upstream.make_url("")).rstrip("/"), Path(tempfile.mkdtemp()) / "data")
    raw["upstreams"]["gpt4o_cloud"]["limits"] = {}
    raw["upstreams"]["ollama_local"]["models"].append("nomic-embed-text")
    raw["cache"] = {"rules": [{"upstreams": ["gpt4o_cloud"], "semantic": True, "similarity": 0.9}]}
    app = create_app(config_mod.parse(raw))
    proxy = TestServer(app, host="127.0.0.1")
    await proxy.start_server()
    dims = 64
    asked: list[str] = []
    kinds = {"new": 0, "repeat": 0, "paraphrase": 0}

    def vector() -> list[float]:
        return [rng.gauss(0, 1) for _ in range(dims)]

    try:
        async with aiohttp.ClientSession() as session:
            for n in range(total):
                roll = rng.random()
                if not asked or roll < 0.5:
                    text, kind = f"pregunta nueva {n}", "new"
                    fake.vectors[text] = vector()
                elif roll < 0.8:
                    text, kind = rng.choice(asked), "repeat"
                else:
                    original = rng.choice(asked)
                    text, kind = f"{original} (dicho de otro modo {n})", "paraphrase"
                    fake.vectors[text] = [x + rng.gauss(0, 0.25) for x in fake.vectors[original]]
                kinds[kind] += 1
                if kind == "new":
                    asked.append(text)
                body = {**QUESTION, "messages": [SYSTEM, {"role": "user", "content": text}]}
                async with session.post(str(proxy.make_url("/v1/chat/completions")), json=body) as r:
                    await r.read()
            async with session.get(str(proxy.make_url("/stats"))) as r:
                stats = await r.json()
    finally:
        await proxy.close()
        await upstream.close()
    cache = stats["cache"]
    print(f"\n## 4. replayed workload: {total} questions ({kinds['new']} new, {kinds['repeat']} exact repeats, "
          f"{kinds['paraphrase']} paraphrases)")
    print(f"hits {cache['hits']} ({cache['hits'] / total:.1%}), upstream chat calls {total - cache['hits']}, "
          f"tokens saved {cache['saved_tokens']:,}, cost saved ${cache['saved_usd']:.4f}; "
          f"embedding calls {stats['requests_por_tipo'].get('cache', 0)}")


async def main(quick: bool) -> None:
    print(f"# answer cache benchmark, {os.cpu_count()} cores")
    await latency(1 if quick else 3, 300 if quick else 1000)
    semantic([1_000, 10_000] if quick else [1_000, 100_000])
    memory()
    await workload(300 if quick else 1000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
