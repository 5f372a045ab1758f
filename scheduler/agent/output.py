"""How one pipe of a task's output becomes log lines.

A line ends at a newline. Carriage returns inside a line are a progress bar redrawing it (tqdm,
Keras): each frame overwrites the line as on a terminal. While a line is being redrawn its
current state is sent at once, then at most every PROGRESS_LINE_SECONDS, and at its newline
the final state; so a bar is watched live without a log line per frame. The run's log files
keep every byte, every frame included.

A line longer than MAX_LINE_BYTES is sent as consecutive pieces of at most that many bytes, cut
between UTF-8 characters: joined, the pieces are the line, however the reads fell.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

MAX_LINE_BYTES = 8192
PROGRESS_LINE_SECONDS = 5.0


def overwrite(shown: str, frame: str) -> str:
    """The line a terminal shows once `frame` is written over `shown` after a carriage return."""
    return frame + shown[len(frame) :]


def _text(raw: bytes | bytearray) -> str:
    # NUL is no character a log keeps (nor can the server's database store it).
    return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def _piece_end(data: bytes | bytearray, start: int) -> int:
    """Where the piece of a long line beginning at `start` ends: MAX_LINE_BYTES on, or a little
    before so as not to cut a UTF-8 character in two (data that is no UTF-8 is cut anywhere)."""
    end = start + MAX_LINE_BYTES
    for back in range(4):  # a UTF-8 character has at most 3 continuation bytes (0b10xxxxxx)
        if end - back <= start:
            break
        if data[end - back] & 0xC0 != 0x80:
            return end - back
    return end


class LineAssembler:
    """Turns the bytes of one pipe, as they are read, into lines passed to `send`."""

    def __init__(self, send: Callable[[str], None]) -> None:
        self._send = send
        self._partial = bytearray()  # the current line since its last carriage return
        self._shown = ""  # the current line as its frames so far have drawn it
        self._redrawn = False  # the current line has had a carriage return
        self._continued = False  # the current line was begun in pieces already
        self._progress_timer: asyncio.TimerHandle | None = None
        self._progress_sent = ""
        self._progress_sent_at = -math.inf

    def feed(self, data: bytes) -> None:
        self._partial.extend(data)
        *lines, rest = self._partial.split(b"\n")
        for line in lines:
            self._end_line(line)
        if b"\r" in rest:
            *frames, rest = rest.split(b"\r")
            for frame in frames:
                self._shown = overwrite(self._shown, _text(frame))
            self._redrawn = True
            self._partial[:] = rest
            self._progress()
        else:
            self._partial[:] = rest
        if len(self._partial) > MAX_LINE_BYTES:
            self._cut_pieces()

    def close(self) -> None:
        """The pipe closed: what is left is the last line."""
        if self._partial or self._redrawn:
            self._end_line(bytes(self._partial))
            self._partial.clear()
        self._stop_progress()

    def _end_line(self, raw: bytes) -> None:
        frames = raw.split(b"\r")
        text = self._shown
        for frame in frames:
            text = overwrite(text, _text(frame))
        continued, self._continued = self._continued, False
        already_sent = bool(self._progress_sent) and text == self._progress_sent
        self._shown, self._redrawn = "", False
        self._stop_progress()
        if (continued and not text) or already_sent:
            return  # the line ended right after its last piece, or as its last progress state showed it
        self._send_text(text)

    def _cut_pieces(self) -> None:
        """An endless line is passed on in pieces rather than held."""
        if self._redrawn:  # what the frames drew goes first, then the endless frame after them
            if self._shown and self._shown != self._progress_sent:
                self._send_text(self._shown)
            self._shown, self._redrawn = "", False
            self._stop_progress()
        partial, start = self._partial, 0
        while len(partial) - start > MAX_LINE_BYTES:
            end = _piece_end(partial, start)
            self._send(_text(partial[start:end]))
            start = end
        del partial[:start]
        self._continued = True

    def _send_text(self, text: str) -> None:
        data = text.encode()
        start = 0
        while len(data) - start > MAX_LINE_BYTES:
            end = _piece_end(data, start)
            self._send(data[start:end].decode())
            start = end
        self._send(data[start:].decode())

    def _progress(self) -> None:
        """The line was redrawn: send its state now if none went lately, else when the interval is up."""
        if self._progress_timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._progress_sent_at + PROGRESS_LINE_SECONDS - loop.time()
        if wait <= 0:
            self._send_progress()
        else:
            self._progress_timer = loop.call_later(wait, self._send_progress)

    def _send_progress(self) -> None:
        self._progress_timer = None
        text = overwrite(self._shown, _text(self._partial))
        if text and text != self._progress_sent:
            self._progress_sent = text
            self._progress_sent_at = asyncio.get_running_loop().time()
            self._send_text(text)

    def _stop_progress(self) -> None:
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        self._progress_sent, self._progress_sent_at = "", -math.inf
