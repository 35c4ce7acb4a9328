"""Everything that differs between the OpenAI and the Ollama protocol, as pure functions.

What a request body says (model, streaming, user, images, the text to estimate from), where
usage sits in a body or a stream, how streams are framed (SSE events vs NDJSON lines), and
the shape of an error body. Nothing here does I/O, so all of it is tested without HTTP.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Any, Literal

import orjson

from .framing import sse_data
from .tokens import Estimator, message_text

Dialect = Literal["openai", "ollama"]

# Endpoints that are LLM calls (metered); every other path is passed through uncounted.
OPENAI_ENDPOINTS = {
    "chat/completions": "chat",
    "completions": "completion",
    "embeddings": "embedding",
    "responses": "responses",
}
OLLAMA_ENDPOINTS = {
    "chat": "chat",
    "generate": "generate",
    "embed": "embed",
    "embeddings": "embeddings",
}
# Which endpoints stream by default when the body says nothing: Ollama's chat and generate.
_OLLAMA_STREAM_DEFAULT = {"chat", "generate"}
# OpenAI endpoints that accept stream_options.include_usage.
_INCLUDE_USAGE_ENDPOINTS = {"chat", "completion"}


@dataclass
class Usage:
    prompt: int = 0
    completion: int = 0
    cached: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


@dataclass
class CallInfo:
    """What one LLM request body says, read once."""

    dialect: Dialect
    endpoint: str
    model: str | None
    stream: bool
    user: str | None
    has_images: bool
    system_text: str
    last_user_text: str
    max_output_tokens: int | None
    body: dict[str, Any] = field(repr=False)
    # The prompt's estimate, once worked out: admission (a token limit, a budget) and the books
    # (an upstream that reported no usage) may each ask, and tokenizing is the costly part.
    _prompt_estimate: int | None = field(default=None, init=False, repr=False, compare=False)

    def estimate_prompt(self, estimator: Estimator) -> int:
        """The prompt's tokens as tiktoken counts them (the app has one estimator)."""
        if self._prompt_estimate is None:
            self._prompt_estimate = self._estimate_prompt(estimator)
        return self._prompt_estimate

    def _estimate_prompt(self, estimator: Estimator) -> int:
        model = self.model or ""
        body = self.body
        if self.endpoint == "chat":
            messages = body.get("messages")
            return estimator.chat_prompt(messages if isinstance(messages, list) else [], model)
        if self.endpoint == "responses":
            text = _responses_input_text(body.get("input"))
            if isinstance(body.get("instructions"), str):
                text = body["instructions"] + "\n" + text
            return estimator.text(text, model)
        if self.endpoint == "generate":
            return estimator.text(_join(body.get("system"), body.get("prompt")), model)
        key = "prompt" if self.endpoint in ("completion", "embeddings") else "input"
        value = body.get(key)
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return len(value)  # already token ids
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return sum(len(v) for v in value)
        return estimator.text(_join(value), model)


# Names become ledger values and metric labels: a model, user or type longer than this is refused.
MAX_NAME_LEN = 256
# How many messages from each end of a conversation are read for its system prompt, its last
# user message and its images (the estimator has its own bound).
_SCAN_MESSAGES = 256


class BadRequest(ValueError):
    """The client's body is not what the endpoint takes; the message says why."""


def _join(*values: Any) -> str:
    out: list[str] = []
    for value in values:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out.extend(v for v in value if isinstance(v, str))
    return "\n".join(out)


def _responses_input_text(value: Any) -> str:
    """The Responses API's `input`: a string, or items shaped like chat messages."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        return ""
    return "\n".join(message_text(item) for item in value if isinstance(item, dict))


def _has_images(body: dict[str, Any], messages: list[Any]) -> bool:
    if isinstance(body.get("images"), list) and body["images"]:
        return True  # Ollama /api/generate
    for message in messages:
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("images"), list) and message["images"]:
            return True  # Ollama /api/chat
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                    return True
    return False


def parse_request(dialect: Dialect, endpoint: str, raw: bytes) -> CallInfo:
    """Read an LLM request body; raise BadRequest with a message a person understands."""
    if not raw.strip():
        raise BadRequest("The request body is empty; this endpoint takes a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON ({exc}).") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string.")
    stream_value = body.get("stream")
    if stream_value is not None and not isinstance(stream_value, bool):
        raise BadRequest("'stream' must be true or false.")
    if dialect == "ollama":
        stream = endpoint in _OLLAMA_STREAM_DEFAULT if stream_value is None else stream_value
    else:
        stream = bool(stream_value)
    raw_messages = body.get("input") if endpoint == "responses" else body.get("messages")
    messages: list[Any] = raw_messages if isinstance(raw_messages, list) else []
    # Bounded work whatever the body holds: the system prompt is read from the first messages,
    # the last user message (and any image) from the last ones.
    system_parts, last_user = [], ""
    for message in messages[:_SCAN_MESSAGES]:
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            system_parts.append(message_text(message))
    for message in reversed(messages[-_SCAN_MESSAGES:]):
        if isinstance(message, dict) and message.get("role") == "user":
            last_user = message_text(message)
            break
    if isinstance(body.get("system"), str):
        system_parts.append(body["system"])
    if isinstance(body.get("instructions"), str):
        system_parts.append(body["instructions"])
    if not messages:
        for key in ("prompt", "input"):
            if isinstance(body.get(key), str):
                last_user = body[key]
    user = body.get("user") if isinstance(body.get("user"), str) else None
    for name, value in (("model", model), ("user", user)):
        if value is not None and len(value) > MAX_NAME_LEN:
            raise BadRequest(f"'{name}' is {len(value):,} characters long; at most {MAX_NAME_LEN} are accepted.")
    return CallInfo(
        dialect=dialect, endpoint=endpoint, model=model, stream=stream, user=user or None,
        has_images=_has_images(body, messages[-_SCAN_MESSAGES:]),
        system_text="\n".join(system_parts), last_user_text=last_user,
        max_output_tokens=_max_output(dialect, body), body=body,
    )


def _max_output(dialect: Dialect, body: dict[str, Any]) -> int | None:
    if dialect == "ollama":
        options = body.get("options")
        value = options.get("num_predict") if isinstance(options, dict) else None
    else:
        value = None
        for key in _OUTPUT_FIELDS:   # a loop, not next() over a generator: every call reads this
            value = body.get(key)
            if value is not None:
                break
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def wants_injected_usage(info: CallInfo) -> bool:
    """True when the proxy must ask for the usage chunk the client did not ask for."""
    if info.dialect != "openai" or not info.stream or info.endpoint not in _INCLUDE_USAGE_ENDPOINTS:
        return False
    options = info.body.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def with_injected_usage(info: CallInfo) -> dict[str, Any]:
    body = dict(info.body)
    options = dict(body["stream_options"]) if isinstance(body.get("stream_options"), dict) else {}
    options["include_usage"] = True
    body["stream_options"] = options
    return body


def with_max_output(info: CallInfo, body: dict[str, Any], cap: int) -> dict[str, Any]:
    """`body` with its requested output tokens set to `cap`, in the field the endpoint reads."""
    body = dict(body)
    if info.dialect == "ollama":
        options = dict(body["options"]) if isinstance(body.get("options"), dict) else {}
        options["num_predict"] = cap
        body["options"] = options
        return body
    capped = False
    for key in _OUTPUT_FIELDS:
        if body.get(key) is not None:
            body[key] = cap
            capped = True
    if not capped:
        body[_output_field(info.endpoint, str(body.get("model") or ""))] = cap
    return body


# The fields a body may cap its output with, in the order they are read.
_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Reasoning models take only max_completion_tokens on chat and refuse max_tokens (OpenAI's
# reference: max_tokens "is not compatible with o-series models").
_COMPLETION_TOKENS_ONLY = re.compile(r"^(o\d|gpt-5)")


@functools.lru_cache(maxsize=256)
def _output_field(endpoint: str, model: str) -> str:
    """The field to add when capping output the client did not cap: the one the model takes."""
    if endpoint == "responses":
        return "max_output_tokens"
    if endpoint == "chat" and _COMPLETION_TOKENS_ONLY.match(model.rsplit("/", 1)[-1].lower()):
        return "max_completion_tokens"
    return "max_tokens"


# --- usage ------------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def openai_usage(usage: Any) -> Usage | None:
    """Usage from an OpenAI `usage` object, chat/completions/embeddings or responses style."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage or "output_tokens" in usage:
        details = usage.get("input_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        return Usage(_int(usage.get("input_tokens")), _int(usage.get("output_tokens")), cached)
    if "prompt_tokens" not in usage:
        return None
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    prompt = _int(usage.get("prompt_tokens"))
    completion = usage.get("completion_tokens")
    if completion is None:  # embeddings report only prompt and total
        completion = _int(usage.get("total_tokens")) - prompt
    return Usage(prompt, max(_int(completion), 0), cached)


def ollama_usage(obj: dict[str, Any]) -> tuple[Usage, bool] | None:
    """Usage from Ollama's final object; the flag is True when the prompt count was missing.

    Ollama leaves `prompt_eval_count` out when the whole prompt came from its cache, so its
    absence does not mean zero tokens were sent: the caller estimates that part.
    """
    if "eval_count" not in obj and "prompt_eval_count" not in obj:
        return None
    missing_prompt = "prompt_eval_count" not in obj
    return Usage(_int(obj.get("prompt_eval_count")), _int(obj.get("eval_count"))), missing_prompt


def body_usage(dialect: Dialect, body: Any) -> tuple[Usage | None, bool]:
    """The usage of a whole (non-streamed) reply, and whether its prompt count is missing (an
    Ollama reply whose prompt came from its cache: the caller estimates that part)."""
    if not isinstance(body, dict):
        return None, False
    if dialect == "openai":
        return openai_usage(body.get("usage")), False
    return ollama_usage(body) or (None, False)


def body_text(dialect: Dialect, body: Any) -> str:
    """The generated text of a non-streamed reply, for an estimate when usage is missing."""
    if not isinstance(body, dict):
        return ""
    if dialect == "ollama":
        message = body.get("message")
        text = message_text(message) if isinstance(message, dict) else ""
        return _join(text, body.get("response"), body.get("thinking"))
    parts = []
    for choice in body.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            if isinstance(message, dict):
                parts.append(message_text(message))
            if isinstance(choice.get("text"), str):
                parts.append(choice["text"])
    parts.extend(message_text(item) for item in body.get("output") or () if isinstance(item, dict))
    return "\n".join(parts)


_OLLAMA_COUNT = re.compile(rb'"(prompt_eval_count|eval_count)"\s*:\s*(\d+)')


def tail_usage(dialect: Dialect, tail: bytes) -> Usage | None:
    """Usage from the last bytes of a body too large to keep whole.

    Both protocols put usage at the end of a reply (OpenAI's `usage` object, Ollama's counts),
    so the relay keeps only a bounded tail of a huge body and looks there.
    """
    if dialect == "ollama":
        counts = {m.group(1): int(m.group(2)) for m in _OLLAMA_COUNT.finditer(tail)}
        if b"prompt_eval_count" in counts or b"eval_count" in counts:
            return Usage(counts.get(b"prompt_eval_count", 0), counts.get(b"eval_count", 0))
        return None
    at = tail.rfind(b'"usage"')
    start = tail.find(b"{", at)
    if at == -1 or start == -1:
        return None
    depth = 0
    for end in range(start, len(tail)):
        depth += {ord("{"): 1, ord("}"): -1}.get(tail[end], 0)
        if depth == 0:
            try:
                return openai_usage(orjson.loads(tail[start:end + 1]))
            except orjson.JSONDecodeError:
                return None
    return None


# A stream's frames whose only news is their text are parsed for it only when it is needed (the
# upstream reported no usage) or once this many bytes of them are waiting: a metered stream
# with usage (nearly all) never parses its text frames, and one without holds no more than this.
DEFER_BYTES = 64 << 10


@dataclass
class StreamState:
    """What a stream has told us so far: usage, generated text, an error."""

    usage: Usage | None = None
    prompt_missing: bool = False
    text_parts: list[str] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    # Frames not parsed yet, in order, and what reads their text (a stream is of one dialect).
    _unread: list[bytes] = field(default_factory=list, repr=False)
    _unread_bytes: int = field(default=0, repr=False)
    _read: Callable[[bytes, StreamState], None] | None = field(default=None, repr=False)

    def defer(self, frame: bytes, read: Callable[[bytes, StreamState], None]) -> None:
        """Keep a text-only frame to read later (`read` appends its text to text_parts)."""
        self._read = read
        self._unread.append(frame)
        self._unread_bytes += len(frame)
        if self._unread_bytes > DEFER_BYTES:
            self.catch_up()

    def catch_up(self) -> None:
        """Read the frames kept so far: called before any later text is appended, so the
        parts stay in the order they came."""
        if self._unread and self._read is not None:
            unread, self._unread, self._unread_bytes = self._unread, [], 0
            for frame in unread:
                self._read(frame, self)

    @property
    def unread_bytes(self) -> int:
        return self._unread_bytes

    @property
    def text(self) -> str:
        self.catch_up()
        return "".join(self.text_parts)


def scan_openai_frame(frame: bytes, state: StreamState, strip_usage: bool) -> bytes | None:
    """Learn from one SSE frame; return the bytes to forward (None to drop the frame).

    With `strip_usage`, the proxy asked for usage the client did not: the usage-only chunk is
    dropped and the `usage: null` the upstream adds to every other chunk is removed, so the
    client receives the stream it asked for.
    """
    if _common_run(frame, 1):
        # The common chunk, judged by its bytes, its text read only if ever needed (DEFER_BYTES).
        # A `usage: null` just before the object's final brace belongs to the outermost object:
        # it is the one the proxy caused, and only it is cut.
        state.defer(frame, _read_openai_texts)
        return frame.replace(_LAST_NULL_USAGE, b"}\n\n") if strip_usage else frame
    event, data = sse_data(frame)
    if data is None:
        return frame
    if data.strip() == b"[DONE]":
        state.done = True
        return frame
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return frame
    if not isinstance(obj, dict):
        return frame
    kind = obj.get("type") if isinstance(obj.get("type"), str) else event
    if "error" in obj and obj["error"]:
        err = obj["error"]
        state.error = str(err.get("message") if isinstance(err, dict) else err)
        return frame
    if kind and kind.startswith("response."):
        _scan_responses_event(kind, obj, state)
        return frame
    choices = obj.get("choices")
    if choices:
        state.catch_up()
        _learn_choices(choices, state)
    usage = openai_usage(obj.get("usage"))
    if usage is not None:
        state.usage = usage
    if not strip_usage or "usage" not in obj:
        return frame
    if not obj.get("choices") and usage is not None:
        return None
    return _without_usage(frame, obj)


_LAST_NULL_USAGE = b',"usage":null}\n\n'


def scan_openai_frames(frames: list[bytes], state: StreamState, strip_usage: bool) -> bytes:
    """Learn from the frames of one read; return the bytes to forward, joined.

    Most reads of a stream are common chunks only (scan_openai_frame's first case), but for the
    last, which ends with the usage chunk and [DONE]. Such a run of frames is judged as a whole:
    the same checks, each one pass over the run rather than one per frame (three quarters of a
    stream's scanning went on checks frame by frame), its text kept in one piece for later. The
    last two frames, if they look like the usage chunk or [DONE], are left out of the run; they,
    and any read that is not such a run, go frame by frame."""
    end = len(frames)
    while end and end > len(frames) - 2 and (b'"usage":{' in frames[end - 1] or b"[DONE]" in frames[end - 1]):
        end -= 1
    out: list[bytes] = []
    if end:
        run = frames[0] if end == 1 else b"".join(frames[:end])
        if _common_run(run, end):
            state.defer(run, _read_openai_texts)
            out.append(run.replace(_LAST_NULL_USAGE, b"}\n\n") if strip_usage else run)
        else:
            end = 0
    for frame in frames[end:]:
        forwarded = scan_openai_frame(frame, state, strip_usage)
        if forwarded:
            out.append(forwarded)
    return out[0] if len(out) == 1 else b"".join(out)


def _common_run(run: bytes, frames: int) -> bool:
    """Whether `run`, `frames` whole frames, is common chunks only: each one compact data line
    ('}\\n\\ndata: {' can only join two frames, so every frame starts and ends as it must), no
    error, no event type, and every "usage" the outermost object's last member, null."""
    return (run.startswith(b"data: {") and run.endswith(b"}\n\n")
            and run.count(b'"usage"') in (0, run.count(_LAST_NULL_USAGE)) and run.count(b"\n") == 2 * frames
            and run.count(b"}\n\ndata: {") == frames - 1 and b"\r" not in run and b'"error"' not in run
            and b'"type"' not in run)


def _learn_choices(choices: Any, state: StreamState) -> None:
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                state.text_parts.append(message_text(delta))
            elif isinstance(choice.get("text"), str):
                state.text_parts.append(choice["text"])


def _read_openai_texts(run: bytes, state: StreamState) -> None:
    """The text of deferred chunks (each one data line of a JSON object, checked when kept)."""
    for frame in run.split(b"\n\n"):
        if not frame:
            continue
        try:
            obj = orjson.loads(frame[6:])
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            _learn_choices(obj.get("choices"), state)


# `"usage": null` as a member of an object, with the comma that joins it to its neighbours.
_NULL_USAGE = re.compile(rb'\s*,\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')


def _without_usage(frame: bytes, obj: dict[str, Any]) -> bytes:
    """`frame` without the `usage` member the proxy caused, every other byte as it came.

    The upstream adds `"usage": null` to each chunk once usage is asked for; cutting exactly
    those bytes leaves the chunk the client would have got had we not asked. Anything less
    plain (usage beside choices, or the text found twice) is re-encoded without it.
    """
    if obj.get("usage") is None:
        # The upstreams' own compact spelling first, found by a plain byte search: the pattern
        # below tries every position of the frame (7% of a streamed call's time, bench/profile.py).
        if frame.count(b'"usage":null') == 1:
            for spelled in (b',"usage":null', b'"usage":null,'):
                if spelled in frame:
                    return frame.replace(spelled, b"", 1)
        cut, found = _NULL_USAGE.subn(b"", frame, count=2)
        if found == 1:
            return cut
    del obj["usage"]
    out, data_done = [], False
    for line in frame.splitlines(keepends=True):
        if not line.startswith(b"data:"):
            out.append(line)
        elif not data_done:
            data_done = True
            ending = line[len(line.rstrip(b"\r\n")):]
            out.append(b"data: " + orjson.dumps(obj) + ending)
    return b"".join(out)


def _scan_responses_event(kind: str, obj: dict[str, Any], state: StreamState) -> None:
    if kind == "response.output_text.delta" and isinstance(obj.get("delta"), str):
        state.catch_up()
        state.text_parts.append(obj["delta"])
    elif kind in ("response.completed", "response.incomplete", "response.failed"):
        response = obj.get("response")
        if isinstance(response, dict):
            usage = openai_usage(response.get("usage"))
            if usage is not None:
                state.usage = usage
            if kind == "response.failed":
                err = response.get("error")
                state.error = str(err.get("message") if isinstance(err, dict) else err or "failed")
        state.done = True


def scan_ollama_line(line: bytes, state: StreamState) -> None:
    """Learn from one NDJSON line of an Ollama stream (always forwarded as is)."""
    if (line.startswith(b"{") and line.endswith(b',"done":false}\n') and line.count(b'"done"') == 1
            and b'"error"' not in line):
        # A line before the last, compact as Ollama writes it: only its text is news.
        state.defer(line, _read_ollama_text)
        return
    if not line.strip():
        return
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return
    if not isinstance(obj, dict):
        return
    if obj.get("error"):
        state.error = str(obj["error"])
        return
    state.catch_up()
    _learn_ollama_text(obj, state)
    if obj.get("done") is True:
        state.done = True
        found = ollama_usage(obj)
        if found is not None:
            state.usage, state.prompt_missing = found


def _read_ollama_text(line: bytes, state: StreamState) -> None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return
    if isinstance(obj, dict):
        _learn_ollama_text(obj, state)


def _learn_ollama_text(obj: dict[str, Any], state: StreamState) -> None:
    message = obj.get("message")
    if isinstance(message, dict):
        state.text_parts.append(message_text(message))
        if isinstance(message.get("thinking"), str):
            state.text_parts.append(message["thinking"])
    for key in ("response", "thinking"):
        if isinstance(obj.get(key), str):
            state.text_parts.append(obj[key])


# --- replies the proxy writes itself ------------------------------------------------------


def reply(info: CallInfo, text: str, now: float) -> tuple[bytes, str]:
    """A complete assistant reply in the shape the request asked for, and its content type.

    Used for chat commands the proxy answers itself: a real client must read it as a normal
    reply, streamed (SSE or NDJSON) or whole, so every field the protocols require is present.
    """
    model = info.model or "tollgate"
    created_at = datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z")
    if info.dialect == "ollama":
        key = "message" if info.endpoint == "chat" else "response"
        content: Any = {"role": "assistant", "content": text} if key == "message" else text
        empty: Any = {"role": "assistant", "content": ""} if key == "message" else ""
        final = {"model": model, "created_at": created_at, key: empty, "done": True, "done_reason": "stop",
                 "total_duration": 0, "load_duration": 0, "prompt_eval_count": 0, "prompt_eval_duration": 0,
                 "eval_count": 0, "eval_duration": 0}
        if not info.stream:
            return orjson.dumps({**final, key: content}), "application/json"
        first = {"model": model, "created_at": created_at, key: content, "done": False}
        return orjson.dumps(first) + b"\n" + orjson.dumps(final) + b"\n", "application/x-ndjson"
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    base = {"id": "chatcmpl-tollgate", "created": int(now), "model": model, "system_fingerprint": None}
    if not info.stream:
        return orjson.dumps({**base, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
             "logprobs": None}]}), "application/json"
    chunk = {**base, "object": "chat.completion.chunk"}
    frames = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                     "finish_reason": None, "logprobs": None}]},
              {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]}]
    options = info.body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        frames.append({**chunk, "choices": [], "usage": usage})
    body = b"".join(b"data: " + orjson.dumps(f) + b"\n\n" for f in frames) + b"data: [DONE]\n\n"
    return body, "text/event-stream"


# --- errors -----------------------------------------------------------------------------


def error_body(dialect: Dialect, message: str, type_: str = "invalid_request_error",
               code: str | None = None, param: str | None = None) -> bytes:
    if dialect == "ollama":
        return orjson.dumps({"error": message})
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def stream_error_frame(dialect: Dialect, message: str, type_: str, code: str) -> bytes:
    """An error told inside a stream whose status line has already gone out."""
    if dialect == "ollama":
        return orjson.dumps({"error": message}) + b"\n"
    return b"data: " + error_body(dialect, message, type_, code) + b"\n\n"
