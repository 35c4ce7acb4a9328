"""The right tokenizer, shipped: estimates equal tiktoken's own counts with tiktoken's own choice
of encoding, with no network and nothing in tiktoken's cache."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from typing import Any, cast

import aiohttp
import pytest
import tiktoken

from proxy import tokens

from .conftest import Serve, write_config
from .fake_upstream import Behavior, FakeUpstream

TEXTS = [
    "hola, ¿cómo estás? Necesito una presentación para mañana 🙂",
    "Corrige la ortografía: 'haiga' no existe; it's 'haya'. We'll see.",
    "def f(x):\n    return x ** 2  # 12345678901234567890\n\n\n",
    "東京の天気は？ Привет! مرحبا   tabs\tand   spaces   ",
    "https://example.com/a?b=c&d=e — precio: $5.7803 (85.6%)",
]
MODELS = {"gpt-4o": "o200k_base", "openai/gpt-4o-mini": "o200k_base", "o3-mini": "o200k_base",
          "gpt-4": "cl100k_base", "gpt-3.5-turbo": "cl100k_base", "llama3.2": "cl100k_base"}
_URLS = {"o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
         "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"}


def test_the_encoding_is_tiktokens_own_choice() -> None:
    for model, name in MODELS.items():
        assert tokens.encoding_for(model).name == name, model


def _estimates_offline(cache: Path) -> dict[str, list[int]]:
    """Our estimates in a fresh process whose tiktoken cache is empty and which cannot download."""
    script = ("import json, sys\n"
              "import tiktoken.load\n"
              "def refuse(*a, **k): raise SystemExit('tried to download ' + repr(a))\n"
              "tiktoken.load.read_file = refuse\n"
              "from proxy.tokens import Estimator\n"
              "est = Estimator()\n"
              "texts, models = json.loads(sys.stdin.read())\n"
              "print(json.dumps({m: [est.text(t, m) for t in texts] for m in models}))\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps([TEXTS, list(MODELS)]),
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)})
    assert list(cache.iterdir()) == []
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_estimates_equal_tiktokens_own_counts_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    ours = _estimates_offline(empty)
    # tiktoken's own encodings, from its own code: it finds our data in its cache and checks it
    # against the hash it publishes (a mismatch would make it try a download, which fails here).
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, url in _URLS.items():
        data = gzip.decompress((Path(tokens.__file__).parent / "encodings" / f"{name}.tiktoken.gz").read_bytes())
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    for model, name in MODELS.items():
        reference = tiktoken.get_encoding(name)
        assert ours[model] == [len(reference.encode(text, disallowed_special=())) for text in TEXTS], model


def test_corrupt_data_is_refused(tmp_path: Path) -> None:
    real = Path(tokens.__file__).parent / "encodings"
    (tmp_path / "cl100k_base.json").write_text((real / "cl100k_base.json").read_text())
    (tmp_path / "cl100k_base.tiktoken.gz").write_bytes(gzip.compress(b"IQ== 0\n"))
    with pytest.raises(RuntimeError, match="corrupt"):
        tokens.load_encoding("cl100k_base", tmp_path)
    # The shipped data itself passes the same check.
    assert tokens.load_encoding("cl100k_base", real).n_vocab == tokens.encoding("cl100k_base").n_vocab


def test_remembered_counts_are_the_counts_under_every_encoding_and_the_memory_stays_bounded() -> None:
    """A text's count is remembered per encoding (the same words are fewer o200k tokens than
    cl100k ones), and a full memory starts again rather than growing."""
    fresh = tokens.Estimator(remember_chars=0)
    remembering = tokens.Estimator(remember_chars=150)
    for _ in range(3):
        for model in MODELS:
            for text in TEXTS:
                assert remembering.text(text, model) == fresh.text(text, model), (model, text)
                assert remembering._held <= 150
    assert fresh.text(TEXTS[3], "gpt-4o") != fresh.text(TEXTS[3], "gpt-4")


async def test_a_tokenizer_is_built_when_an_estimate_first_needs_it(raw_config: dict[str, Any], fake: FakeUpstream,
                                                                     tmp_path: Path) -> None:
    """The real process holds no tokenizer until a call needs an estimate: a call whose upstream
    reports usage needs none; a token limit needs the model's before the call goes out; an
    upstream that reports nothing needs one at the end. Each is built once, and the counts are
    tiktoken's."""
    async with Serve(write_config(raw_config, tmp_path)) as serve, aiohttp.ClientSession() as s:
        async def stats() -> dict[str, Any]:
            async with s.get(serve.url + "/stats") as r:
                return cast(dict[str, Any], await r.json())

        async with s.post(serve.url + "/api/chat", json={"model": "llama3.2", "stream": False,
                                                          "messages": [{"role": "user", "content": "hola"}]}) as r:
            assert r.status == 200
        await serve.logged('"endpoint":"chat"')  # its access-log line, written once it is booked
        assert (await stats())["total_requests"] == 1
        assert not [line for line in serve.log if "built for the first estimate" in line]

        # The shipped limits on gpt-4o count tokens: its estimate is made before forwarding.
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}
        async with s.post(serve.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
        await serve.logged("tokenizer o200k_base built")

        fake.by_model["llama3.2"] = Behavior(report_usage=False)
        async with s.post(serve.url + "/api/generate", json={"model": "llama3.2", "prompt": "hola mundo",
                                                              "stream": False}) as r:
            assert r.status == 200
        await serve.logged("tokenizer cl100k_base built")
        await serve.logged('"endpoint":"generate"')
        assert (await stats())["detail"]["tokens"]["estimated_calls"] == 1
    assert sum("built for the first estimate" in line for line in serve.log) == 2
