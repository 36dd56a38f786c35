"""The server's recent log lines in memory, for ``/api/v1/logs/tail`` and ``/logs/current``.

Scope's frontend polls ``logs/tail`` every 2 s and downloads ``logs/current`` for bug reports;
Scope serves both from its log file. scope-trio keeps no log file, so :class:`LogRing`, a
:class:`logging.Handler`, keeps the newest lines in a ring bounded in bytes, and answers with
Scope's offset semantics: an offset is the number of bytes (UTF-8, one newline per line) ever
written, as the size of a log file that is never truncated would be. A client that stores the
offset it was given and passes it back gets exactly the lines written since.

Lines are formatted as Scope formats its own (``time - logger - LEVEL - message``), because
the frontend reads the level from `` - LEVEL - `` and tags ``- scope.cloud -`` lines as the
cloud's. Secrets are redacted by :class:`scope_trio.ops.logs.TextFormatter` (the configured
ones and every key posted at run time).

Thread-safe (the handler's lock), so records from any thread are fine; reads are O(lines
returned), not O(lines held).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from scope_trio.ops import logs

__all__ = ["DEFAULT_MAX_BYTES", "RING_FORMAT", "LogRing"]

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
RING_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


class LogRing(logging.Handler):
    """The newest log lines, at most ``max_bytes`` of them (oldest dropped first).

    A single line longer than ``max_bytes`` is cut to fit. The ids of
    :class:`~scope_trio.ops.logs.ContextFilter` are added to each line when known.
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        level: int = logging.NOTSET,
        secrets: Iterable[str | None] = (),
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        super().__init__(level)
        self.max_bytes = max_bytes
        self.addFilter(logs.ContextFilter())
        self.setFormatter(logs.TextFormatter(secrets, fmt=RING_FORMAT))
        self._lines: deque[tuple[int, str, int]] = deque()
        """(offset where the line starts, the line, its size in bytes with the newline)."""
        self._held = 0
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes ever written: the offset just past the newest line."""
        return self._size

    @property
    def held_bytes(self) -> int:
        return self._held

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        for line in text.splitlines() or [""]:
            self._append(line)

    def _append(self, line: str) -> None:
        encoded = line.encode("utf-8", "replace")
        if len(encoded) + 1 > self.max_bytes:
            line = encoded[: self.max_bytes - 1].decode("utf-8", "ignore")
            encoded = line.encode()
        cost = len(encoded) + 1
        self._lines.append((self._size, line, cost))
        self._size += cost
        self._held += cost
        while self._held > self.max_bytes:
            self._held -= self._lines.popleft()[2]

    def tail(self, lines: int = 200, since_offset: int = 0) -> tuple[list[str], int]:
        """Scope's ``logs/tail``: ``(lines, offset)``.

        ``since_offset > 0``: the non-blank lines that start at or after that offset (the
        last ``lines`` of them); nothing when it is at or past the end. Otherwise the last
        ``lines`` non-blank lines. Lines are right-stripped. ``offset`` is :attr:`size`.
        """
        self.acquire()
        try:
            size = self._size
            if since_offset > 0 and since_offset >= size:
                return [], size
            picked: list[str] = []
            for start, line, _ in reversed(self._lines):
                if len(picked) >= lines or (since_offset > 0 and start < since_offset):
                    break
                stripped = line.rstrip()
                if stripped:
                    picked.append(stripped)
        finally:
            self.release()
        picked.reverse()
        return picked, size

    def text(self) -> str:
        """Every line held, newline-terminated (Scope's ``logs/current``)."""
        self.acquire()
        try:
            return "".join(f"{line}\n" for _, line, _ in self._lines)
        finally:
            self.release()
