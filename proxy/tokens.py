"""Token estimates for calls whose upstream reported no usage.

Only used as a fallback: an upstream that ignores `include_usage`, Ollama's /api/embeddings,
a stream cut short, a client that hung up. Every figure from here is flagged `estimated`.

The encoding for a model is tiktoken's own choice (`tiktoken.encoding_name_for_model`): o200k_base
for the gpt-4o family and the o-series, cl100k_base for gpt-4 and gpt-3.5, and cl100k_base for
models tiktoken does not know (a local Llama's tokenizer is not shipped; it is an estimate).
Both encodings' data ship inside this package (proxy/encodings/, see SOURCE.md there): tiktoken
itself would download them on first use, and Tollgate never loads anything from the network. Each
file is checked against the SHA-256 tiktoken publishes for it every time it is loaded.

An encoding is built the first time a call needs an estimate from it, not at start: built, it
holds 20 MB (cl100k_base) or 42 MB (o200k_base) of the process for good, and a proxy whose
upstreams report usage, with no token limit or budget, may never need one. Where the need is
known before the call goes out (a token limit, a budget), the call awaits the build off the
event loop (`Estimator.ready`); where it is only known at the end (an upstream that gave no
usage, a client that hung up), the build runs there, on the loop, once per encoding and process
(0.3-0.7 s), and is logged.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import gzip
import hashlib
import io
import json
import logging
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.model import encoding_name_for_model

log = logging.getLogger("tollgate")

_DATA = Path(__file__).with_name("encodings")
SHIPPED = ("o200k_base", "cl100k_base")
_FALLBACK = "cl100k_base"

# The chat format's framing, as OpenAI's cookbook counts it for gpt-3.5/4/4o: every message
# costs 3 tokens of wrapper (plus 1 when it carries a name) and every reply is primed with 3.
_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3
# Characters of texts whose token counts are remembered (a few MB at most).
REMEMBER_CHARS = 1_000_000


_BUILT: dict[str, tiktoken.Encoding] = {}
_BUILDING = threading.Lock()  # one build at a time: two threads never build the same one


def encoding(name: str) -> tiktoken.Encoding:
    """A shipped encoding, built on the calling thread the first time it is asked for."""
    built = _BUILT.get(name)
    if built is not None:
        return built
    with _BUILDING:
        built = _BUILT.get(name)
        if built is None:
            began = time.perf_counter()
            built = _BUILT[name] = load_encoding(name, _DATA)
            _give_back_freed_memory()
            log.info("tokenizer %s built for the first estimate that needed it (%.2f s)", name,
                     time.perf_counter() - began)
    return built


async def ready(name: str) -> None:
    """Build `name` on a worker thread if it is not built yet, leaving the event loop free."""
    if name not in _BUILT:
        await asyncio.get_running_loop().run_in_executor(None, encoding, name)


def load_encoding(name: str, directory: Path) -> tiktoken.Encoding:
    """An encoding from `directory`'s <name>.json and <name>.tiktoken.gz, after checking its hash."""
    meta = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    data = gzip.decompress((directory / f"{name}.tiktoken.gz").read_bytes())
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise RuntimeError(f"{directory / name}.tiktoken.gz is corrupt: its SHA-256 is not tiktoken's published one")
    # Line by line from the bytes, not from a list of them all: the list alone would add 12 MB to
    # the build's peak (o200k_base), on top of these ranks and the Rust core built from them.
    ranks: dict[bytes, int] = {}
    for line in io.BytesIO(data):
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    del data
    built = tiktoken.Encoding(name, pat_str=meta["pat_str"], mergeable_ranks=ranks,
                              special_tokens=meta["special_tokens"])
    # The Rust core holds its own copy of the ranks; tiktoken keeps this Python dict only to
    # pickle an encoding, which we never do. Letting it go frees 40 MB for the two encodings.
    built._mergeable_ranks = {}
    return built


@lru_cache(maxsize=1024)
def encoding_name(model: str) -> str:
    """tiktoken's encoding for `model` (its publisher prefix dropped), if it is one we ship."""
    bare = model.rsplit("/", 1)[-1]
    try:
        name = encoding_name_for_model(bare)
    except KeyError:
        return _FALLBACK
    return name if name in SHIPPED else _FALLBACK


def encoding_for(model: str) -> tiktoken.Encoding:
    return encoding(encoding_name(model))


def _give_back_freed_memory() -> None:
    """Building the encodings frees tens of megabytes of temporaries (the ranks as Python
    objects, the Rust core's scratch); glibc keeps about 9 MB of it for the process instead of
    returning it to the system. malloc_trim returns it. Elsewhere (musl, macOS) nothing is done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Estimator:
    """Counts tokens of text, bounded in the work it does per call, whatever the call holds.

    At most `max_chars` characters are tokenised and at most `max_messages` messages read; the
    rest is extrapolated from what was read (its tokens per character, its tokens per message).
    A 10 MB body of 330,000 one-character messages costs what its first thousand do.
    """

    def __init__(self, max_chars: int = 200_000, max_messages: int = 1_000,
                 remember_chars: int = REMEMBER_CHARS) -> None:
        self.max_chars = max_chars
        self.max_messages = max_messages
        # Counts of texts seen before, by encoding. A bot sends its system prompt with every
        # call and a conversation's history again with each turn: their counts are looked up,
        # not encoded again. Bounded by the characters held; past it, forgotten all at once (the
        # texts still in use come back with their next call).
        self.remember_chars = remember_chars
        self._known: dict[tuple[str, str], int] = {}
        self._held = 0

    def is_ready(self, model: str) -> bool:
        """Whether `model`'s encoding is built: then `ready` has nothing to wait for."""
        return encoding_name(model) in _BUILT

    async def ready(self, model: str) -> None:
        """Have `model`'s encoding built before an estimate is asked of it on the event loop."""
        await ready(encoding_name(model))

    def text(self, text: str, model: str) -> int:
        return self.texts([text], model)

    def texts(self, texts: list[str], model: str) -> int:
        """Tokens of `texts`, each encoded on its own while the character budget lasts."""
        encoding = encoding_for(model)
        budget, count, read, unread = self.max_chars, 0, 0, 0
        for text in texts:
            if budget <= 0:
                unread += len(text)
                continue
            head = text[:budget]
            count += self._count(encoding, head)
            budget -= len(head)
            read += len(head)
            unread += len(text) - len(head)
        if unread and read:
            # Past the bound, scale by the density of what was read instead of encoding it all.
            count += round(count * unread / read)
        return count

    def _count(self, encoding: tiktoken.Encoding, text: str) -> int:
        key = (encoding.name, text)
        known = self._known.get(key)
        if known is not None:
            return known
        counted = len(encoding.encode(text, disallowed_special=()))
        if self._held + len(text) > self.remember_chars:
            self._known.clear()
            self._held = 0
        if len(text) <= self.remember_chars:
            self._known[key] = counted
            self._held += len(text)
        return counted

    def chat_prompt(self, messages: list[Any], model: str) -> int:
        """Prompt tokens of a chat call, with the per-message framing the upstream adds."""
        sample = messages[: self.max_messages]
        framing, texts = 0, []
        for message in sample:
            if not isinstance(message, dict):
                continue
            framing += _PER_MESSAGE + (_PER_NAME if message.get("name") else 0)
            texts.append(message_text(message))
        total = framing + self.texts(texts, model)
        if len(messages) > len(sample):
            total += round(total * (len(messages) - len(sample)) / len(sample))
        return _REPLY_PRIMING + total


def message_text(message: dict[str, Any]) -> str:
    """The text of one chat message, whatever shape its content takes."""
    content = message.get("content")
    if isinstance(content, str) and not message.get("tool_calls"):
        return content  # the common shape: nothing to gather
    parts: list[str] = []
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            fn = call["function"]
            parts.extend(str(fn.get(k, "")) for k in ("name", "arguments"))
    return "\n".join(parts)
