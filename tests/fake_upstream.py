"""A fake LLM server: a real aiohttp app on a loopback port, speaking OpenAI and Ollama.

It is the only fake in the suite. It answers the documented shapes of both protocols
(bodies, SSE with optional usage chunk, Responses events, NDJSON with a final `done` object,
error bodies) and can be told to misbehave: error statuses, no usage, stalls, dropped
connections, error lines inside a stream, a gate that holds the stream until the test opens it.
It keeps a tally of the usage it reported so tests can compare the proxy's books with it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Behavior:
    chunks: int = 4                     # streamed pieces of text (and words of a reply)
    prompt_tokens: int | None = None    # None: derived from the body size
    completion_per_chunk: int = 2
    cached_tokens: int = 0
    honor_include_usage: bool = True    # False: an upstream that ignores stream_options
    report_usage: bool = True           # False: no usage anywhere (bodies or final objects)
    omit_prompt_eval_count: bool = False
    status: int = 200                   # >= 400: answer with the protocol's error body
    retry_after: str | None = None
    stall_before_headers: bool = False  # never answer (until the test releases `stall`)
    stall_after_chunks: int | None = None
    drop_after_chunks: int | None = None
    error_after_chunks: int | None = None
    gate_before_last: asyncio.Event | None = None
    # A real server closes its stream a moment after the final frame: hold the end until set.
    pause_before_eof: asyncio.Event | None = None
    content_type: str | None = None     # override the reply's content type
    # The awkward parts of real event streams (SSE only; NDJSON is always one line per object):
    line_ending: str = "lf"             # "lf", "crlf", or "mixed" (LF, CRLF and CR in turn)
    keepalive: bool = False             # ": ping" comment events and ": keep-alive" lines
    sse_fields: bool = False            # id: and retry: lines beside data:
    split_bytes: int | None = None      # write every frame in pieces of this many bytes
    gzip: bool = False                  # compress replies (when the caller accepts gzip)
    headers: dict[str, str] | None = None  # extra reply headers (its own x-ratelimit-*, say)
    raw_body: bytes | None = None       # override the whole reply body
    finish_reason: str = "stop"         # "length": a reply cut by the output limit (Ollama's done_reason too)
    # The stream's last frame and the end of the body in one write (so they arrive in one read),
    # and that frame without the line ending that should close it.
    last_with_end: bool = False
    unterminated_last: bool = False


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Tally:
    calls: int = 0
    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


class FakeUpstream:
    def __init__(self) -> None:
        self.behavior = Behavior()
        self.by_model: dict[str, Behavior] = {}
        self.seen: list[Seen] = []
        self.requests = 0                 # LLM calls received, whatever happened to them
        self.arrived = asyncio.Event()    # set as each one arrives (a test clears it to wait for the next)
        self.reported = Tally()           # usage the fake told its callers about
        self.stall = asyncio.Event()      # set it to release stalled responses
        self.first_chunk_sent = asyncio.Event()
        self.app = web.Application(middlewares=[self._compress])
        for prefix in ("", "/v1"):
            self.app.router.add_post(prefix + "/chat/completions", self.openai_chat)
            self.app.router.add_post(prefix + "/completions", self.openai_completions)
            self.app.router.add_post(prefix + "/embeddings", self.openai_embeddings)
            self.app.router.add_post(prefix + "/responses", self.openai_responses)
            self.app.router.add_get(prefix + "/models", self.openai_models)
            self.app.router.add_get(prefix + "/echo/{rest:.*}", self.echo)
        self.app.router.add_post("/api/chat", self.ollama_chat)
        self.app.router.add_post("/api/generate", self.ollama_generate)
        self.app.router.add_post("/api/embed", self.ollama_embed)
        self.app.router.add_post("/api/embeddings", self.ollama_embeddings)
        self.app.router.add_get("/api/tags", self.ollama_tags)
        self.app.router.add_get("/api/version", self.ollama_version)
        self.app.router.add_get("/api/ps", self.ollama_ps)
        self.app.router.add_post("/api/show", self.ollama_show)
        self.app.router.add_route("*", "/api/echo/{rest:.*}", self.echo)
        self.app.router.add_get("/_tally", self.tally)
        # Anything else is recorded too, so a test sees every request that got this far.
        self.app.router.add_route("*", "/{rest:.*}", self.echo)
        self.cancelled = asyncio.Event()  # set when a caller hung up on a stream mid-way
        # Embeddings by input text, so a test controls which questions are close in meaning.
        self.vectors: dict[str, list[float]] = {}

    # --- helpers ---------------------------------------------------------------------

    @web.middleware
    async def _compress(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if not response.prepared:
            if self.behavior.gzip:
                response.enable_compression()
            response.headers.update(self.behavior.headers or {})
        return response

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], Behavior]:
        raw = await request.read()
        body = orjson.loads(raw) if raw else {}
        self.requests += 1
        self.arrived.set()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        behavior = self.by_model.get(body.get("model", ""), self.behavior)
        if behavior.stall_before_headers:
            await self.stall.wait()
        return body, behavior

    def _usage(self, body: dict[str, Any], b: Behavior) -> tuple[int, int]:
        prompt = b.prompt_tokens if b.prompt_tokens is not None else 7 + len(orjson.dumps(body)) % 41
        return prompt, b.chunks * b.completion_per_chunk

    def _count(self, prompt: int, completion: int) -> None:
        self.reported.calls += 1
        self.reported.prompt += prompt
        self.reported.completion += completion

    @staticmethod
    def words(b: Behavior) -> list[str]:
        return [f"w{i} " for i in range(b.chunks)]

    def _error(self, b: Behavior, ollama: bool) -> web.Response:
        headers = {"Retry-After": b.retry_after} if b.retry_after else {}
        body: Any = ({"error": f"fake upstream error {b.status}"} if ollama else
                     {"error": {"message": f"fake upstream error {b.status}", "type": "server_error",
                                "param": None, "code": str(b.status)}})
        return web.Response(status=b.status, body=orjson.dumps(body), headers=headers,
                            content_type="application/json")

    async def _stream(self, request: web.Request, b: Behavior, content_type: str,
                      frames: list[bytes], tail: list[bytes], count: Callable[[], None],
                      error_frame: bytes) -> web.StreamResponse:
        """Send `frames` (the text pieces) then `tail` (usage, done), misbehaving as told."""
        response = web.StreamResponse(headers={"Content-Type": b.content_type or content_type, **(b.headers or {})})
        if b.gzip:
            response.enable_compression()
        if content_type == "text/event-stream":
            # The usage-only chunk takes no number of its own, so a stream with it and one
            # without are dressed alike everywhere else.
            counted = [b'"choices":[],' not in f for f in frames + tail]
            dressed = [self._dress(b, f, n, alone=c)
                       for f, n, c in zip(frames + tail, itertools.accumulate(counted), counted)]
            frames, tail = dressed[:len(frames)], dressed[len(frames):]
        await response.prepare(request)
        try:
            return await self._frames(request, response, b, frames, tail, count, error_frame)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        except ConnectionResetError:  # the caller left before the end: so does a real server
            self.cancelled.set()
            return response

    async def _frames(self, request: web.Request, response: web.StreamResponse, b: Behavior,
                      frames: list[bytes], tail: list[bytes], count: Callable[[], None],
                      error_frame: bytes) -> web.StreamResponse:
        for i, frame in enumerate(frames):
            if b.drop_after_chunks == i:
                assert request.transport is not None
                request.transport.close()
                return response
            if b.stall_after_chunks == i:
                await self.stall.wait()
            if b.error_after_chunks == i:
                await response.write(error_frame)
                await response.write_eof()
                return response
            if b.gate_before_last is not None and i == len(frames) - 1:
                await b.gate_before_last.wait()
            await self._write(response, b, frame)
            if i == 0:
                self.first_chunk_sent.set()
        tail = list(tail)
        if b.unterminated_last:
            tail[-1] = tail[-1].rstrip(b"\r\n")
        last = tail.pop() if b.last_with_end else b""
        for frame in tail:
            await self._write(response, b, frame)
        count()
        if b.pause_before_eof is not None:
            await b.pause_before_eof.wait()
        await response.write_eof(last)
        return response

    @staticmethod
    async def _write(response: web.StreamResponse, b: Behavior, frame: bytes) -> None:
        step = b.split_bytes or len(frame)
        for at in range(0, len(frame), step):
            await response.write(frame[at:at + step])

    @staticmethod
    def _dress(b: Behavior, frame: bytes, i: int, alone: bool = True) -> bytes:
        """One SSE event as servers really write them: other line endings, comments, ids."""
        lines = frame.removesuffix(b"\n\n").split(b"\n")
        if b.sse_fields:
            lines = [b"id: %d" % i, *([b"retry: 3000"] if i == 0 else []), *lines]
        if b.keepalive:
            lines = [b": keep-alive", *lines]
        ending = {"lf": b"\n", "crlf": b"\r\n"}.get(b.line_ending) or (b"\n", b"\r\n", b"\r")[i % 3]
        # The empty line that ends the event, in another style when mixed (never LF after a
        # CR, which would read as one CRLF).
        blank = ending if b.line_ending != "mixed" else (b"\r\n", b"\r", b"\r\n")[i % 3]
        event = ending.join(lines) + ending + blank
        return (b": ping" + ending + ending + event) if b.keepalive and alone else event

    # --- OpenAI ----------------------------------------------------------------------

    def _openai_usage(self, prompt: int, completion: int, b: Behavior) -> dict[str, Any]:
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": b.cached_tokens}}

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai_text(request, chat=True)

    async def openai_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai_text(request, chat=False)

    async def _openai_text(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body, b = await self._begin(request)
        if b.status >= 400:
            return self._error(b, ollama=False)
        prompt, completion = self._usage(body, b)
        model = body.get("model", "fake")
        kind = "chat.completion" if chat else "text_completion"
        if b.raw_body is not None:
            return web.Response(body=b.raw_body, content_type=b.content_type or "application/json")
        if not body.get("stream"):
            text = "".join(self.words(b))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": b.finish_reason}
                      if chat else {"index": 0, "text": text, "finish_reason": b.finish_reason, "logprobs": None})
            reply: dict[str, Any] = {"id": "fake-1", "object": kind, "created": int(time.time()),
                                     "model": model, "choices": [choice]}
            if b.report_usage:
                reply["usage"] = self._openai_usage(prompt, completion, b)
                self._count(prompt, completion)
            return web.Response(body=orjson.dumps(reply), content_type="application/json")
        options = body.get("stream_options") or {}
        with_usage = bool(options.get("include_usage")) and b.honor_include_usage and b.report_usage

        def chunk(delta_text: str | None, finish: str | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": delta_text} if delta_text is not None else {}
            else:
                choice["text"] = delta_text or ""
            obj: dict[str, Any] = {"id": "fake-1", "object": kind + ".chunk" if chat else kind,
                                   "created": 1, "model": model, "choices": [choice]}
            if with_usage:
                obj["usage"] = None
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        frames = [chunk(word) for word in self.words(b)]
        tail = [chunk(None, b.finish_reason)]
        if with_usage:
            usage = {"id": "fake-1", "object": kind + ".chunk" if chat else kind, "created": 1,
                     "model": model, "choices": [],
                     "usage": self._openai_usage(prompt, completion, b)}
            tail.append(b"data: " + orjson.dumps(usage) + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        error = b'data: {"error": {"message": "fake failure mid-stream", "type": "server_error", "param": null, "code": null}}\n\n'
        return await self._stream(request, b, "text/event-stream", frames, tail,
                                  (lambda: self._count(prompt, completion)) if with_usage else (lambda: None),
                                  error)

    async def openai_embeddings(self, request: web.Request) -> web.Response:
        body, b = await self._begin(request)
        if b.status >= 400:
            return self._error(b, ollama=False)
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        prompt = b.prompt_tokens if b.prompt_tokens is not None else 3 * len(inputs)
        reply: dict[str, Any] = {
            "object": "list", "model": body.get("model"),
            "data": [{"object": "embedding", "index": i, "embedding": self.vectors.get(str(text), [0.1, 0.2, 0.3])}
                     for i, text in enumerate(inputs)],
        }
        if b.report_usage:
            reply["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
            self._count(prompt, 0)
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

    async def openai_responses(self, request: web.Request) -> web.StreamResponse:
        body, b = await self._begin(request)
        if b.status >= 400:
            return self._error(b, ollama=False)
        prompt, completion = self._usage(body, b)
        text = "".join(self.words(b))
        usage = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
                 "input_tokens_details": {"cached_tokens": b.cached_tokens},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        message = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        response: dict[str, Any] = {"id": "resp_1", "object": "response", "created_at": 1,
                                    "model": body.get("model"), "status": "completed",
                                    "output": [message], "parallel_tool_calls": True,
                                    "tool_choice": "auto", "tools": []}
        if b.report_usage:
            response["usage"] = usage
        if not body.get("stream"):
            if b.report_usage:
                self._count(prompt, completion)
            return web.Response(body=orjson.dumps(response), content_type="application/json")

        def event(obj: dict[str, Any]) -> bytes:
            return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

        created = {**response, "status": "in_progress", "output": []}
        created.pop("usage", None)
        frames = [event({"type": "response.created", "sequence_number": 0, "response": created})]
        frames += [event({"type": "response.output_text.delta", "sequence_number": i + 1,
                          "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": w})
                   for i, w in enumerate(self.words(b))]
        tail = [event({"type": "response.completed", "sequence_number": 99, "response": response})]
        return await self._stream(request, b, "text/event-stream", frames, tail,
                                  (lambda: self._count(prompt, completion)) if b.report_usage else (lambda: None),
                                  event({"type": "error", "code": "server_error", "message": "fake failure", "sequence_number": 5}))

    async def tally(self, request: web.Request) -> web.Response:
        """What this fake has reported: for checks from another process (benchmarks)."""
        return web.json_response({"calls": self.reported.calls, "prompt": self.reported.prompt,
                                  "completion": self.reported.completion, "requests": self.requests})

    async def openai_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "fake"}]})

    async def echo(self, request: web.Request) -> web.Response:
        """Tells what arrived: a pass-through target."""
        raw = await request.read()
        self.seen.append(Seen(request.path, dict(request.headers), raw.decode("utf-8", "replace")))
        return web.json_response({"method": request.method, "path": request.path,
                                  "query": request.query_string, "body": raw.decode("utf-8", "replace")})

    # --- Ollama ----------------------------------------------------------------------

    def _ollama_final(self, body: dict[str, Any], b: Behavior, prompt: int, completion: int) -> dict[str, Any]:
        final: dict[str, Any] = {"model": body.get("model"), "created_at": "2024-01-15T14:32:18Z",
                                 "done": True, "done_reason": b.finish_reason, "total_duration": 1000,
                                 "load_duration": 10, "prompt_eval_duration": 100, "eval_duration": 500}
        if b.report_usage:
            if not b.omit_prompt_eval_count:
                final["prompt_eval_count"] = prompt
            final["eval_count"] = completion
        return final

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama_text(request, chat=True)

    async def ollama_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama_text(request, chat=False)

    async def _ollama_text(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body, b = await self._begin(request)
        if b.status >= 400:
            return self._error(b, ollama=True)
        prompt, completion = self._usage(body, b)

        def count() -> None:
            if b.report_usage:
                self._count(0 if b.omit_prompt_eval_count else prompt, completion)

        def piece(text: str, done: bool = False) -> dict[str, Any]:
            obj: dict[str, Any] = {"model": body.get("model"), "created_at": "2024-01-15T14:32:18Z"}
            if chat:
                obj["message"] = {"role": "assistant", "content": text}
            else:
                obj["response"] = text
            obj["done"] = done
            return obj

        if body.get("stream") is False:
            final = {**piece("".join(self.words(b)), True), **self._ollama_final(body, b, prompt, completion)}
            count()
            return web.Response(body=orjson.dumps(final), content_type="application/json")
        frames = [orjson.dumps(piece(w)) + b"\n" for w in self.words(b)]
        final = {**piece(""), **self._ollama_final(body, b, prompt, completion)}
        return await self._stream(request, b, "application/x-ndjson", frames,
                                  [orjson.dumps(final) + b"\n"], count,
                                  b'{"error": "fake failure mid-stream"}\n')

    async def ollama_embed(self, request: web.Request) -> web.Response:
        body, b = await self._begin(request)
        if b.status >= 400:
            return self._error(b, ollama=True)
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        prompt = b.prompt_tokens if b.prompt_tokens is not None else 4 * len(inputs)
        reply: dict[str, Any] = {"model": body.get("model"),
                                 "embeddings": [self.vectors.get(str(text), [0.1, 0.2]) for text in inputs],
                                 "total_duration": 10, "load_duration": 1}
        if b.report_usage:
            reply["prompt_eval_count"] = prompt
            self._count(prompt, 0)
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

    async def ollama_embeddings(self, request: web.Request) -> web.Response:
        body, b = await self._begin(request)
        # The legacy endpoint reports no token counts at all.
        return web.json_response({"embedding": [0.1, 0.2, 0.3]})

    async def ollama_tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": "llama3.2:latest", "model": "llama3.2:latest", "modified_at": "2024-01-15T14:32:18Z",
             "size": 1, "digest": "abc", "details": {}},
            {"name": "qwen2.5:7b", "model": "qwen2.5:7b", "modified_at": "2024-01-15T14:32:18Z",
             "size": 1, "digest": "def", "details": {}},
        ]})

    async def ollama_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.5.7"})

    async def ollama_ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    async def ollama_show(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "expected an object"}, status=400)
        return web.json_response({"modelfile": "", "parameters": "", "template": "",
                                  "details": {"family": "llama"}, "model_info": {}, "name": body.get("model")})
