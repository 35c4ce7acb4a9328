"""Refresh the tokenizer data shipped in proxy/encodings/ from npm's `tiktoken` package.

    python tools/vendor_encodings.py [--version 1.0.22]

Tollgate estimates tokens offline, so the BPE ranks of o200k_base (gpt-4o and every model
tiktoken maps to it) and cl100k_base ship inside the Python package. PyPI's tiktoken does not
carry them (it downloads them on first use, which Tollgate never does); npm's `tiktoken` package
(MIT, the JS/WASM bindings of the same library) does, in its `encoders/*.json` files. This
script fetches that package with `npm pack`, rebuilds each `.tiktoken` file (one "base64-token
rank" line per token, the format tiktoken publishes), and keeps it only if its SHA-256 equals the
hash tiktoken itself checks (`tiktoken_ext/openai_public.py`). It writes the files gzipped and
records their origin in proxy/encodings/SOURCE.md, with each encoding's split pattern and special
tokens (from the same npm file) beside it in <name>.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "proxy" / "encodings"
# The hashes tiktoken checks its own downloads against (tiktoken_ext/openai_public.py).
PUBLISHED = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}


def rebuild(bpe_ranks: str) -> bytes:
    """npm's compact form ("<first> <start rank> tok tok ...", ranks counting up) back into the
    .tiktoken text tiktoken publishes."""
    ranks: dict[str, int] = {}
    for line in bpe_ranks.split("\n"):
        if not line:
            continue
        parts = line.split(" ")
        start = int(parts[1])
        for offset, token in enumerate(parts[2:]):
            ranks[token] = start + offset
    return "".join(f"{token} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])).encode()


def main(version: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", f"tiktoken@{version}", "--pack-destination", tmp], check=True,
                       capture_output=True)
        [tarball] = Path(tmp).glob("tiktoken-*.tgz")
        with tarfile.open(tarball) as tar:
            files = {name: tar.extractfile(f"package/encoders/{name}.json") for name in PUBLISHED}
            data = {name: json.load(fh) for name, fh in files.items() if fh is not None}
    lines = ["# Tokenizer data shipped with Tollgate\n",
             f"From npm's `tiktoken` package, version {version} (MIT licence, "
             f"https://github.com/dqbd/tiktoken), `encoders/<name>.json`, rebuilt into tiktoken's "
             f"`.tiktoken` format by `tools/vendor_encodings.py`. Each file's SHA-256 (uncompressed) "
             f"equals the hash tiktoken publishes for it, and Tollgate checks it again at every load.\n",
             "| encoding | sha256 (uncompressed) |", "|---|---|"]
    for name, expected in PUBLISHED.items():
        text = rebuild(data[name]["bpe_ranks"])
        actual = hashlib.sha256(text).hexdigest()
        if actual != expected:
            raise SystemExit(f"{name}: rebuilt data hashes to {actual}, tiktoken publishes {expected}")
        (OUT / f"{name}.tiktoken.gz").write_bytes(gzip.compress(text, compresslevel=9, mtime=0))
        # The split pattern and special tokens that go with the ranks, from the same file.
        meta = {"sha256": actual, "pat_str": data[name]["pat_str"], "special_tokens": data[name]["special_tokens"]}
        (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        lines.append(f"| {name} | `{actual}` |")
    (OUT / "SOURCE.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {', '.join(PUBLISHED)} to {OUT}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="1.0.22")
    main(parser.parse_args().version)
