"""What the command line shows: every line made printable, the progress line, the usage line.

Every line shown goes through `emit`, which escapes control characters: text from the server
or from a prompts file never drives the terminal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import TextIO

from atoma_images._usage import Usage

__all__ = ["PrintableFormatter", "Progress", "emit", "printable", "spent"]


# One character class, so the scan is linear in the text: the C0 controls, DEL and the C1
# controls (ESC, CSI, OSC, BEL, CR: what a terminal acts on), the Unicode line and paragraph
# separators, the bidirectional embeddings, overrides and isolates (they reorder what is
# shown), and lone surrogates (undecodable header bytes, which a strict stdout cannot encode).
_UNPRINTABLE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def printable(text: str, *, keep_newlines: bool = False) -> str:
    r"""``text`` with every control character escaped: ESC becomes ``\x1b``.

    Args:
        text: anything that may hold text from the server or from a file.
        keep_newlines: leave ``\n`` as it is (a traceback); otherwise the result is one line.
    """

    def escape(match: re.Match[str]) -> str:
        char = match[0]
        if keep_newlines and char == "\n":
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _UNPRINTABLE.sub(escape, text)


def emit(stream: TextIO, text: str, *, keep_newlines: bool = False) -> None:
    """Write ``text``, made `printable`, and a newline: the one way a line is shown.

    What the stream's encoding cannot hold is escaped (``é`` becomes ``\\xe9`` when output
    is redirected with ``PYTHONIOENCODING=ascii``): a path in a non-ASCII folder is shown,
    never a crash that drops the images still in memory. If the reader has gone (``| head
    -1``), the stream is pointed at the null device and the run goes on: the prompts in
    flight are paid for, and their images are still saved.
    """
    line = printable(text, keep_newlines=keep_newlines) + "\n"
    if stream.encoding:  # None for an in-memory stream, which holds any text
        line = line.encode(stream.encoding, "backslashreplace").decode(stream.encoding)
    try:
        # One write per line: unbuffered (PYTHONUNBUFFERED), print() makes two.
        stream.write(line)
        stream.flush()
    except BrokenPipeError:
        # As the Python docs advise for SIGPIPE, so the flush at exit stays quiet too.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)


class PrintableFormatter(logging.Formatter):
    """--debug log records, made `printable`: they may quote a request id from the server."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep_newlines=True)


class Progress:
    """Elapsed time (and done/total for a batch) on stderr, redrawn in place on a terminal.

    It also holds what the run left to report at its end: for the message shown on Ctrl-C,
    how many prompts were billed but not saved and how many were cancelled in flight; for the
    usage line, what the client's calls cost.
    """

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, stream: TextIO, total: int) -> None:
        self.stream = stream
        self.total = total
        self.done = 0
        self.in_flight = 0
        self.billed_unsaved = 0
        self.usage = Usage()
        self.tty = stream.isatty()
        self.started = time.monotonic()

    def line(self, frame: int = 0) -> str:
        elapsed = time.monotonic() - self.started
        count = f" {self.done}/{self.total} done," if self.total > 1 else ""
        return f"{self.FRAMES[frame % len(self.FRAMES)]} generating…{count} {elapsed:.1f}s"

    async def spin(self) -> None:
        if not self.tty:
            return
        frame = 0
        while True:
            self.stream.write("\r\033[K" + self.line(frame))
            self.stream.flush()
            frame += 1
            await asyncio.sleep(0.1)

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def advance(self, done: int, total: int | None) -> None:
        """One more prompt is settled: its images saved, or its error shown."""
        self.done = done
        if self.total > 1 and not self.tty:  # a log-friendly line per finished prompt
            emit(self.stream, f"{self.done}/{self.total} done")

    def interrupted(self, by: str | None = None) -> str:
        """The line for Ctrl-C (or the signal named ``by``): how far the batch got, and what
        may still be billed."""
        text = "atoma-images: interrupted" + (f" by {by}" if by else "")
        if self.total > 1:
            text += f" with {self.done}/{self.total} prompts done"
        if self.billed_unsaved:
            text += (
                "; 1 prompt was generated and billed but not saved"
                if self.billed_unsaved == 1
                else f"; {self.billed_unsaved} prompts were generated and billed but not saved"
            )
        if self.in_flight:
            text += (
                "; 1 request was in flight: if already sent, it may still be billed"
                if self.in_flight == 1
                else f"; {self.in_flight} requests were in flight: any already sent may "
                "still be billed"
            )
        return text


def spent(usage: Usage) -> str:
    """The last line of a run: the compute units it used, and those it may have used."""
    text = f"atoma-images: used {usage.compute_units:,} compute units"
    if usage.maybe_billed_compute_units:
        text += f"; {usage.maybe_billed_compute_units:,} more may have been billed"
    return text
