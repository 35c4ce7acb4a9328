"""The pure protocol functions, without HTTP."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy import dialects, framing
from proxy.dialects import StreamState, Usage
from proxy.tokens import Estimator

SSE = (b'data: {"choices":[{"delta":{"content":"Ho"}}],"usage":null}\n\n'
       b'data: {"choices":[{"delta":{"content":"la"}}],"usage":null}\r\n\r\n'
       b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,'
       b'"prompt_tokens_details":{"cached_tokens":3}}}\n\n'
       b"data: [DONE]\n\n")


def test_framer_gives_the_same_frames_whatever_the_chunking() -> None:
    whole = framing.sse_framer().feed(SSE)
    assert len(whole) == 4 and b"".join(whole) == SSE
    for size in range(1, 40):
        framer = framing.sse_framer()
        frames = [f for i in range(0, len(SSE), size) for f in framer.feed(SSE[i:i + size])]
        assert frames == whole, size
        assert framer.rest() == b""


def test_framer_keeps_an_unterminated_tail() -> None:
    framer = framing.ndjson_framer()
    assert framer.feed(b'{"a":1}\n{"b"') == [b'{"a":1}\n']
    assert framer.rest() == b'{"b"'


def test_injected_usage_is_removed_and_read() -> None:
    state = StreamState()
    out = [dialects.scan_openai_frame(f, state, strip_usage=True) for f in framing.sse_framer().feed(SSE)]
    assert out[0] == b'data: {"choices":[{"delta":{"content":"Ho"}}]}\n\n'
    assert out[2] is None and out[3] == b"data: [DONE]\n\n"
    assert state.usage == Usage(5, 2, 3) and state.text == "Hola" and state.done


def test_usage_asked_by_the_client_is_left_alone() -> None:
    state = StreamState()
    frames = framing.sse_framer().feed(SSE)
    assert [dialects.scan_openai_frame(f, state, strip_usage=False) for f in frames] == frames
    assert state.usage == Usage(5, 2, 3)


def test_responses_completed_event_carries_usage() -> None:
    frame = b'event: response.completed\ndata: ' + orjson.dumps(
        {"type": "response.completed", "response": {"usage": {"input_tokens": 8, "output_tokens": 4,
                                                              "input_tokens_details": {"cached_tokens": 2}}}}) + b"\n\n"
    state = StreamState()
    dialects.scan_openai_frame(frame, state, strip_usage=False)
    assert state.usage == Usage(8, 4, 2) and state.done


def test_ollama_final_object_and_error_line() -> None:
    state = StreamState()
    dialects.scan_ollama_line(b'{"message":{"role":"assistant","content":"hi"},"done":false}\n', state)
    dialects.scan_ollama_line(b'{"done":true,"prompt_eval_count":9,"eval_count":3}\n', state)
    assert state.usage == Usage(9, 3) and state.text == "hi" and not state.prompt_missing
    broken = StreamState()
    dialects.scan_ollama_line(b'{"error":"model crashed"}\n', broken)
    assert broken.error == "model crashed"


def test_usage_found_in_the_tail_of_a_huge_body() -> None:
    tail = b'0.1, 0.2]}], "model": "m", "usage": {"prompt_tokens": 40, "total_tokens": 40}}'
    assert dialects.tail_usage("openai", tail) == Usage(40, 0)
    assert dialects.tail_usage("ollama", b'..."prompt_eval_count": 12, "eval_count": 30}') == Usage(12, 30)
    assert dialects.tail_usage("openai", b"no usage here") is None


def test_parse_request_reads_what_the_body_says() -> None:
    info = dialects.parse_request("ollama", "chat", b'{"model":"llama3","messages":[{"role":"user","content":"x","images":["AA"]}]}')
    assert info.stream and info.has_images and info.last_user_text == "x"
    info = dialects.parse_request("openai", "chat", b'{"model":"gpt-4o","max_tokens":50,"user":"u1","messages":[{"role":"system","content":"S"}]}')
    assert not info.stream and info.max_output_tokens == 50 and info.user == "u1" and info.system_text == "S"
    with pytest.raises(dialects.BadRequest, match="'stream' must be true or false"):
        dialects.parse_request("openai", "chat", b'{"model":"m","stream":"yes"}')


def test_prompt_estimates_count_token_ids_as_given() -> None:
    est = Estimator()
    info = dialects.parse_request("openai", "embedding", b'{"model":"m","input":[[1,2,3],[4,5]]}')
    assert info.estimate_prompt(est) == 5
    info = dialects.parse_request("openai", "chat", b'{"model":"gpt-4o","messages":[{"role":"user","content":"hola","name":"ana"}]}')
    # 3 framing + 1 for the name + the text + 3 priming the reply
    assert info.estimate_prompt(est) == 3 + 1 + est.text("hola", "gpt-4o") + 3


def test_error_bodies_per_dialect() -> None:
    assert orjson.loads(dialects.error_body("ollama", "boom")) == {"error": "boom"}
    assert orjson.loads(dialects.error_body("openai", "boom", "t", "c")) == {
        "error": {"message": "boom", "type": "t", "param": None, "code": "c"}}



_ENDINGS = [b"\n", b"\r\n", b"\r"]


def fed_in_pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    """The frames an SSE framer finds in `stream` fed in pieces of the sizes in `cuts`, in turn."""
    framer, frames, at, i = framing.sse_framer(), [], 0, 0
    while at < len(stream):
        size = cuts[i % len(cuts)]
        frames += framer.feed(stream[at:at + size])
        at, i = at + size, i + 1
    frames.append(framer.rest())
    return [f for f in frames if f]


@given(st.lists(st.tuples(st.lists(st.sampled_from([b"data: {\"a\":1}", b": ping", b"id: 7", b"event: x",
                                                      b"retry: 3000", b"data: [DONE]"]), min_size=1, max_size=4),
                          st.lists(st.sampled_from(_ENDINGS), min_size=5, max_size=5)), min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=30))
def test_sse_framer_finds_every_event_whatever_the_line_endings_and_chunking(
        events: list[tuple[list[bytes], list[bytes]]], cuts: list[int]) -> None:
    """Any mix of CRLF, LF and CR, cut anywhere (even between a CR and its LF): the same events,
    each byte for byte as sent."""
    def event(lines: list[bytes], ends: list[bytes]) -> bytes:
        body = b"".join(line + ends[i] for i, line in enumerate(lines))
        # A lone CR then an LF is one CRLF, not an empty line: end such an event with CRLF.
        blank = b"\r\n" if body.endswith(b"\r") and ends[-1] == b"\n" else ends[-1]
        return body + blank

    expected = [event(lines, ends) for lines, ends in events]
    stream = b"".join(expected)
    # A stream ending in a lone CR is only known to be complete at its end: rest() included.
    assert fed_in_pieces(stream, cuts) == expected


def test_sse_framer_waits_to_see_whether_a_cr_is_half_a_crlf() -> None:
    framer = framing.sse_framer()
    assert framer.feed(b"data: 1\r\n\r") == []
    assert framer.feed(b"\ndata: 2\n\n") == [b"data: 1\r\n\r\n", b"data: 2\n\n"]


@pytest.mark.parametrize("frame", [
    b'data: {"id":"c1","choices":[{"delta":{"content":"hi"}}],"usage":null}\r\n\r\n',
    b'id: 4\nevent: chunk\ndata: {"usage": null, "choices":[{"delta":{"content":"hi"}}]}\n\n',
    b': keep-alive\rdata: {"choices":[{"delta":{"content":"\\"usage\\":null"}}] , "usage" : null }\r\r',
])
def test_stripping_injected_usage_keeps_every_other_byte(frame: bytes) -> None:
    out = dialects.scan_openai_frame(frame, StreamState(), strip_usage=True)
    assert out is not None and b'"usage"' not in out.replace(b'\\"usage\\"', b"")
    # Exactly the member and its comma went; the rest is as the upstream wrote it.
    assert len(frame) - len(out) in range(len(b'"usage":null'), len(b' , "usage" : null ') + 1)
    _, data = framing.sse_data(out)
    assert data is not None and orjson.loads(data)["choices"][0]["delta"]["content"]


@given(st.lists(st.lists(st.sampled_from([b"data: {\"a\":1}", b": ping", b"id: 7", b"", b"data: [DONE]"]),
                         min_size=1, max_size=5), min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=30))
def test_sse_framer_lf_only_streams_frame_as_the_line_rule_says(events: list[list[bytes]], cuts: list[int]) -> None:
    """LF-only streams take a faster path; it must cut exactly where the general rule cuts
    (every empty line ends an event, including empty lines of their own)."""
    stream = b"".join(b"".join(line + b"\n" for line in lines) + b"\n" for lines in events)
    expected = framing.sse_framer().feed(stream.replace(b"\n", b"\r\n"))  # the line-by-line path
    assert fed_in_pieces(stream, cuts) == [f.replace(b"\r\n", b"\n") for f in expected]


@given(st.lists(st.lists(st.sampled_from([b"data: {\"a\":1}", b": ping", b"id: 7", b"", b"data: [DONE]", b"data:x"]),
                         min_size=1, max_size=4), min_size=1, max_size=6))
def test_whole_events_fed_one_at_a_time_are_framed_and_read_as_the_general_rule_says(events: list[list[bytes]]) -> None:
    """An upstream that writes one whole event per chunk takes the quickest path of all; its
    frames, and the data read from them, are the line-by-line path's."""
    pieces = [b"".join(line + b"\n" for line in lines) + b"\n" for lines in events]
    framer, frames = framing.sse_framer(), []
    for piece in pieces:
        frames += framer.feed(piece)
    expected = framing.sse_framer().feed(b"".join(pieces).replace(b"\n", b"\r\n"))
    assert frames == [f.replace(b"\r\n", b"\n") for f in expected]
    assert [framing.sse_data(f) for f in frames] == [framing.sse_data(f) for f in expected]


# Chunk payloads as upstreams write them, the plain and the less plain: usage null first or
# last, a nested "usage" that is not the proxy's, text that spells "usage", a tool call (its
# "type"), real usage, an error, the end.
_CHUNKS = [
    b'{"choices":[{"index":0,"delta":{"content":"Ho"}}],"usage":null}',
    b'{"choices":[{"index":0,"delta":{"content":"la \\"usage\\":null"}}],"usage":null}',
    b'{"usage":null,"choices":[{"delta":{"content":"!"}}]}',
    b'{"choices":[{"delta":{"content":"x","usage":null}}]}',
    b'{"choices":[{"delta":{"content":"y"}}]}',
    b'{"choices":[{"delta":{"tool_calls":[{"type":"function","function":{"name":"f","arguments":"{}"}}]}}],'
    b'"usage":null}',
    b'{"choices":[{"text":"z","finish_reason":null}],"usage":null}',
    b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}',
    b'{"error":{"message":"boom"}}',
    b'{"choices":[{"delta":{"content":"broken"}}],"usage":null',
    b'{"type":"response.output_text.delta","delta":"hi"}',
    b'{"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":2,"total_tokens":5}}}',
    b"[DONE]",
]


@given(st.lists(st.sampled_from(_CHUNKS), max_size=12), st.booleans())
def test_chunks_judged_by_their_bytes_are_forwarded_and_read_as_parsed_ones_are(chunks: list[bytes],
                                                                                strip: bool) -> None:
    """The common chunk is judged by its bytes and its text read later; the same chunk with CRLF
    endings is parsed at once. Both must forward the same bytes and learn the same things."""
    judged, parsed = StreamState(), StreamState()
    for data in chunks:
        frame = b"data: " + data + b"\n\n"
        out = dialects.scan_openai_frame(frame, judged, strip)
        reference = dialects.scan_openai_frame(frame.replace(b"\n", b"\r\n"), parsed, strip)
        assert out == (reference.replace(b"\r\n", b"\n") if reference is not None else None)
    assert (judged.text, judged.usage, judged.error, judged.done) == (parsed.text, parsed.usage, parsed.error,
                                                                      parsed.done)


@settings(max_examples=400)
@example([_CHUNKS[4], b"[DONE]", _CHUNKS[4]], [3], False)   # an end inside a run: not a common chunk
@given(st.lists(st.sampled_from(_CHUNKS), max_size=14), st.lists(st.integers(min_value=1, max_value=5), max_size=8),
       st.booleans())
def test_a_read_of_frames_is_forwarded_and_read_as_its_frames_one_by_one_are(
        chunks: list[bytes], sizes: list[int], strip: bool) -> None:
    """However a stream's frames come grouped into reads, judging each read's run of common
    chunks at once forwards the same bytes and learns the same things as parsing each frame: the
    reference takes the same frames with CRLF endings, which no byte check accepts."""
    frames = [b"data: " + data + b"\n\n" for data in chunks]
    together, alone = StreamState(), StreamState()
    forwarded, reference = b"", b""
    start = 0
    for size in [*sizes, len(frames)]:
        read = frames[start:start + size]
        start += size
        forwarded += dialects.scan_openai_frames(read, together, strip)
        for frame in read:
            parsed = dialects.scan_openai_frame(frame.replace(b"\n", b"\r\n"), alone, strip)
            reference += parsed.replace(b"\r\n", b"\n") if parsed is not None else b""
    assert forwarded == reference
    assert (together.text, together.usage, together.error, together.done) == (alone.text, alone.usage, alone.error,
                                                                              alone.done)


_LINES = [
    b'{"model":"m","message":{"role":"assistant","content":"ho"},"done":false}',
    b'{"model":"m","response":"la","done":false}',
    b'{"model":"m","message":{"role":"assistant","content":"","thinking":"hm"},"done":false}',
    b'{"model":"m","message":{"role":"assistant","content":"\\"done\\":false"},"done":false}',
    b'{"error":"model crashed","done":false}',
    b'{"model":"m","done":true,"prompt_eval_count":9,"eval_count":3}',
]


@given(st.lists(st.sampled_from(_LINES), max_size=10))
def test_ollama_lines_judged_by_their_bytes_are_read_as_parsed_ones_are(lines: list[bytes]) -> None:
    judged, parsed = StreamState(), StreamState()
    for line in lines:
        dialects.scan_ollama_line(line + b"\n", judged)
        dialects.scan_ollama_line(line.replace(b'"done":', b'"done": ') + b"\n", parsed)
    assert (judged.text, judged.usage, judged.error, judged.done) == (parsed.text, parsed.usage, parsed.error,
                                                                      parsed.done)


def test_a_long_stream_keeps_a_bounded_amount_unread() -> None:
    """Text frames wait unparsed only up to DEFER_BYTES: a long stream holds its text, not its frames."""
    state = StreamState()
    frame = b'data: {"choices":[{"index":0,"delta":{"content":"palabra "}}],"usage":null}\n\n'
    most = 0
    for _ in range(20_000):  # 1.6 MB of frames
        assert dialects.scan_openai_frame(frame, state, strip_usage=True) == frame.replace(b',"usage":null', b"")
        most = max(most, state.unread_bytes)
    assert 0 < most <= dialects.DEFER_BYTES
    assert state.text == "palabra " * 20_000 and state.unread_bytes == 0


@given(st.lists(st.lists(st.sampled_from([b"data: {\"a\":1}", b": ping", b"id: 7", b"", b"data: [DONE]"]),
                         min_size=1, max_size=4), min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=6))
def test_several_whole_events_in_one_chunk_are_framed_as_the_general_rule_says(
        events: list[list[bytes]], groups: list[int]) -> None:
    """Upstreams often deliver several whole events in one read: the split at once must give
    the frames the line-by-line path gives."""
    pieces = [b"".join(line + b"\n" for line in lines) + b"\n" for lines in events]
    framer, frames, at, i = framing.sse_framer(), [], 0, 0
    while at < len(pieces):
        frames += framer.feed(b"".join(pieces[at:at + groups[i % len(groups)]]))
        at, i = at + groups[i % len(groups)], i + 1
    frames.append(framer.rest())
    expected = framing.sse_framer().feed(b"".join(pieces).replace(b"\n", b"\r\n"))
    assert [f for f in frames if f] == [f.replace(b"\r\n", b"\n") for f in expected]


@given(st.lists(st.sampled_from([b'{"a":1}', b"", b'{"b":"x y"}', b"not json"]), min_size=1, max_size=8),
       st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8))
def test_ndjson_lines_are_the_same_however_they_arrive(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    framer, frames, at, i = framing.ndjson_framer(), [], 0, 0
    while at < len(stream):
        frames += framer.feed(stream[at:at + cuts[i % len(cuts)]])
        at, i = at + cuts[i % len(cuts)], i + 1
    assert frames == [line + b"\n" for line in lines] and framer.rest() == b""
