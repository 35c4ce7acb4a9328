"""Stream framing: whole SSE events and NDJSON lines out of bytes as they arrive.

Pure and byte-exact: a frame is handed on exactly as the upstream sent it, so the relay can
forward what it has read without re-encoding it.
"""

from __future__ import annotations

import re
from typing import Protocol


class Framer(Protocol):
    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by `data`, each exactly as it arrived."""

    def rest(self) -> bytes:
        """Whatever arrived after the last complete frame (a stream cut mid-frame)."""


class SeparatorFramer:
    """Splits arriving bytes into frames ending in a fixed separator (NDJSON: a newline)."""

    def __init__(self, separators: tuple[bytes, ...]) -> None:
        self._separators = separators
        self._buffer = bytearray()
        self._scan_from = 0

    def feed(self, data: bytes) -> list[bytes]:
        if not self._buffer and self._separators == (b"\n",) and data.endswith(b"\n"):
            # Whole lines, as Ollama writes them: split at once, nothing left over.
            return [line + b"\n" for line in data[:-1].split(b"\n")]
        self._buffer += data
        frames: list[bytes] = []
        start = 0
        while True:
            best, size = -1, 0
            for sep in self._separators:
                at = self._buffer.find(sep, max(start, self._scan_from - len(sep) + 1))
                if at != -1 and (best == -1 or at < best):
                    best, size = at, len(sep)
            if best == -1:
                break
            frames.append(bytes(self._buffer[start:best + size]))
            start = best + size
        del self._buffer[:start]
        self._scan_from = len(self._buffer)
        return frames

    def rest(self) -> bytes:
        """Whatever arrived after the last complete frame (a stream cut mid-frame)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scan_from = 0
        return rest


# SSE lines end in CRLF, LF or CR, mixed freely within one stream (WHATWG HTML, "Server-sent
# events", parsing an event stream).
_EOL = re.compile(rb"\r\n|\r|\n")


class SseFramer:
    """Splits an event stream into events: each ends at an empty line, whatever the line endings.

    A CR at the very end of what has arrived may be the first half of a CRLF, so that line is
    not judged until the next byte (or the end of the stream) says which it is.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._line = 0  # where the line not yet ended starts

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        if (not buffer and data.endswith(b"\n\n") and not data.startswith(b"\n") and b"\r" not in data
                and b"\n\n\n" not in data):
            # Most upstreams write whole events, one or several at a time: LF endings, no empty
            # line but the ones ending them, so each "\n\n" ends an event and nothing is left.
            end = data.find(b"\n\n")
            if end == len(data) - 2:
                return [data]  # one event: its own frame, uncopied
            return [event + b"\n\n" for event in data[:-2].split(b"\n\n")]
        buffer += data
        if b"\r" not in buffer:
            return self._feed_lf()
        frames: list[bytes] = []
        start, line, last = 0, self._line, len(buffer) - 1
        for match in _EOL.finditer(buffer, line):
            at, end = match.span()
            if at == last and buffer[at] == 0x0D:
                break
            if at == line:  # an empty line: the event is complete
                frames.append(bytes(buffer[start:end]))
                start = end
            line = end
        del buffer[:start]
        self._line = line - start
        return frames

    def _feed_lf(self) -> list[bytes]:
        """The common case, LF endings only: an empty line is exactly a "\n\n", or a "\n" where a
        line starts; found with bytes.find rather than line by line (streams are mostly this)."""
        buffer = self._buffer
        frames: list[bytes] = []
        start, search = 0, max(self._line - 1, 0)
        while True:
            if start == self._line and buffer.startswith(b"\n", start):
                frames.append(b"\n")  # an empty line right where a line starts
                start = search = self._line = start + 1
                continue
            at = buffer.find(b"\n\n", max(search, start))
            if at == -1:
                break
            frames.append(bytes(buffer[start:at + 2]))
            start = search = self._line = at + 2
        del buffer[:start]
        self._line = buffer.rfind(b"\n") + 1  # where the unfinished line starts (0: none ended)
        return frames

    def rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._line = 0
        return rest


def sse_framer() -> Framer:
    return SseFramer()


def ndjson_framer() -> Framer:
    return SeparatorFramer((b"\n",))


def sse_data(frame: bytes) -> tuple[str | None, bytes | None]:
    """The event name and the data of one SSE frame (None when it carries no data)."""
    if frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n") == 2 and b"\r" not in frame:
        return None, frame[6:-2]  # the common frame, one data line: what the loop below would find
    event: str | None = None
    data: list[bytes] = []
    for line in frame.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
    return event, (b"\n".join(data) if data else None)
