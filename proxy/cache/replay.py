"""A cached answer replayed in the shape the caller asked for.

An answer is stored as the upstream gave it: one JSON body, SSE frames or NDJSON lines. `read`
turns any of them into an `Answer` (the text, how it ended, its usage, its id and model), and
`json_body` and `stream` write it back as a whole body or as the dialect's stream, so a caller
that streams can be answered from a body that was not streamed, and the other way round. Only
plain text answers with one choice are replayable; anything else (tool calls, several choices,
a reply cut off by the length limit, the Responses API's items) reads as None and is not cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..dialects import Dialect
from ..framing import ndjson_framer, sse_data, sse_framer

# Pieces a replayed stream is cut into: as a live stream would come, a few words at a time.
PIECE_CHARS = 64


@dataclass(frozen=True)
class Answer:
    dialect: Dialect
    endpoint: str           # chat, completion (OpenAI); chat, generate (Ollama)
    model: str
    id: str
    created: int            # unix seconds (OpenAI) ...
    created_at: str         # ... or Ollama's timestamp
    text: str
    finish_reason: str      # "stop" (OpenAI) or Ollama's done_reason
    prompt_tokens: int
    completion_tokens: int
    extra: tuple[tuple[str, Any], ...] = ()   # Ollama's timing fields, OpenAI's system_fingerprint


def read(dialect: Dialect, endpoint: str, body: bytes, streamed: bool) -> Answer | None:
    """The answer in `body` (a whole JSON body, or the frames of a stream), or None if it is not
    one a cache may replay."""
    try:
        if dialect == "openai":
            return _openai_stream(endpoint, body) if streamed else _openai_json(endpoint, orjson.loads(body))
        return _ollama_stream(endpoint, body) if streamed else _ollama_json(endpoint, orjson.loads(body))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


def _openai_json(endpoint: str, body: dict[str, Any]) -> Answer | None:
    choices = body.get("choices") or []
    if endpoint not in ("chat", "completion") or len(choices) != 1:
        return None
    choice = choices[0]
    if endpoint == "chat":
        message = choice["message"]
        if message.get("tool_calls") or message.get("function_call") or not isinstance(message.get("content"), str):
            return None
        text = message["content"]
    else:
        text = choice["text"]
    usage = body.get("usage") or {}
    return _openai_answer(endpoint, body, text, choice.get("finish_reason"), usage)


def _openai_answer(endpoint: str, first: dict[str, Any], text: str, finish: Any,
                   usage: dict[str, Any]) -> Answer | None:
    if finish != "stop" or "prompt_tokens" not in usage:
        return None  # cut short, or with no usage to account a hit by
    extra = (("system_fingerprint", first["system_fingerprint"]),) if first.get("system_fingerprint") else ()
    return Answer("openai", endpoint, str(first["model"]), str(first["id"]), int(first["created"]), "", text, finish,
                  int(usage["prompt_tokens"]), int(usage.get("completion_tokens", 0)), extra)


def _openai_stream(endpoint: str, body: bytes) -> Answer | None:
    framer = sse_framer()
    frames = framer.feed(body) + ([framer.rest()] if framer.rest().strip() else [])
    first: dict[str, Any] | None = None
    parts: list[str] = []
    finish, done = None, False
    usage: dict[str, Any] = {}
    for frame in frames:
        _, data = sse_data(frame)
        if data is None:
            continue
        if data.strip() == b"[DONE]":
            done = True
            continue
        chunk = orjson.loads(data)
        first = first or chunk
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                return None
            if endpoint == "chat":
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    return None
                parts.append(delta.get("content") or "")
            else:
                parts.append(choice.get("text") or "")
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
    if first is None or not done:
        return None  # a stream that never finished
    return _openai_answer(endpoint, first, "".join(parts), finish, usage)


def _ollama_json(endpoint: str, body: dict[str, Any]) -> Answer | None:
    if endpoint == "chat":
        message = body["message"]
        if message.get("tool_calls") or not isinstance(message.get("content"), str):
            return None
        text = message["content"]
    elif endpoint == "generate":
        text = body["response"]
    else:
        return None
    return _ollama_answer(endpoint, body, text)


def _ollama_answer(endpoint: str, last: dict[str, Any], text: str) -> Answer | None:
    if not last.get("done") or last.get("done_reason", "stop") != "stop" or "prompt_eval_count" not in last:
        return None
    timings = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
    return Answer("ollama", endpoint, str(last["model"]), "", 0, str(last.get("created_at", "")), text, "stop",
                  int(last["prompt_eval_count"]), int(last.get("eval_count", 0)),
                  tuple((k, last[k]) for k in timings if k in last))


def _ollama_stream(endpoint: str, body: bytes) -> Answer | None:
    framer = ndjson_framer()
    lines = [line for line in framer.feed(body) + [framer.rest()] if line.strip()]
    parts: list[str] = []
    last: dict[str, Any] = {}
    for line in lines:
        piece = orjson.loads(line)
        if endpoint == "chat":
            message = piece.get("message") or {}
            if message.get("tool_calls"):
                return None
            parts.append(message.get("content") or "")
        else:
            parts.append(piece.get("response") or "")
        last = piece
    return _ollama_answer(endpoint, last, "".join(parts)) if last else None


# --- writing -------------------------------------------------------------------------------


def json_body(answer: Answer) -> bytes:
    """The answer as one JSON body, as the upstream would have sent it unstreamed."""
    if answer.dialect == "ollama":
        return orjson.dumps(_ollama_piece(answer, answer.text, done=True))
    usage = _openai_usage(answer)
    if answer.endpoint == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                                  "logprobs": None, "finish_reason": answer.finish_reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
        kind = "text_completion"
    return orjson.dumps({"id": answer.id, "object": kind, "created": answer.created, "model": answer.model,
                         **dict(answer.extra), "choices": [choice], "usage": usage})


def stream(answer: Answer, include_usage: bool) -> list[bytes]:
    """The answer as the dialect's stream: SSE frames ending in `[DONE]` (with a usage chunk when
    the caller asked for one), or NDJSON lines ending with Ollama's final line."""
    pieces = [answer.text[i:i + PIECE_CHARS] for i in range(0, len(answer.text), PIECE_CHARS)] or [""]
    if answer.dialect == "ollama":
        lines = [orjson.dumps(_ollama_piece(answer, piece, done=False)) + b"\n" for piece in pieces]
        return lines + [orjson.dumps(_ollama_piece(answer, "", done=True)) + b"\n"]
    head = {"id": answer.id, "created": answer.created, "model": answer.model, **dict(answer.extra)}
    frames: list[dict[str, Any]] = []
    for n, piece in enumerate(pieces):
        if answer.endpoint == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": piece} if n == 0 else {"content": piece}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
        frames.append(choice)
    frames[-1] = {**frames[-1], "finish_reason": answer.finish_reason}
    kind = "chat.completion.chunk" if answer.endpoint == "chat" else "text_completion"
    out = [{**head, "object": kind, "choices": [choice]} for choice in frames]
    if include_usage:
        # As OpenAI sends it: every chunk says usage null, and one last chunk has no choices.
        out = [{**chunk, "usage": None} for chunk in out]
        out.append({**head, "object": kind, "choices": [], "usage": _openai_usage(answer)})
    return [b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in out] + [b"data: [DONE]\n\n"]


def _openai_usage(answer: Answer) -> dict[str, int]:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def _ollama_piece(answer: Answer, text: str, done: bool) -> dict[str, Any]:
    piece: dict[str, Any] = {"model": answer.model, "created_at": answer.created_at}
    if answer.endpoint == "chat":
        piece["message"] = {"role": "assistant", "content": text}
    else:
        piece["response"] = text
    piece["done"] = done
    if done:
        piece.update({"done_reason": answer.finish_reason, **dict(answer.extra),
                      "prompt_eval_count": answer.prompt_tokens, "eval_count": answer.completion_tokens})
    return piece
