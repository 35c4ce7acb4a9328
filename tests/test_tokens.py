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

import pytest
import tiktoken

from proxy import tokens

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
