"""The log ring behind ``/api/v1/logs/*``: Scope's offsets, the byte bound, redaction."""

from __future__ import annotations

import logging
import threading

import pytest

from scope_trio.ops import logs
from scope_trio.ops.logring import LogRing


def record(message: str, *args: object, name: str = "scope_trio.test") -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(name, logging.INFO, __file__, 1, message, args, None)


def test_offsets_are_bytes_written_and_give_exactly_the_lines_since() -> None:
    ring = LogRing()
    assert ring.tail() == ([], 0), "no log yet"
    for n in range(5):
        ring.handle(record("line %d", n))
    lines, offset = ring.tail(200, 0)
    assert [line.rsplit(" - ", 1)[1] for line in lines] == [f"line {n}" for n in range(5)]
    assert offset == sum(len(line.encode()) + 1 for line in lines), "as a file's size"
    assert ring.tail(200, offset) == ([], offset), "nothing new"
    assert ring.tail(200, offset + 100) == ([], offset), "past the end: nothing, same offset"
    ring.handle(record("line 5"))
    ring.handle(record("ünïcode 6"))
    new, newer = ring.tail(200, offset)
    assert [line.rsplit(" - ", 1)[1] for line in new] == ["line 5", "ünïcode 6"]
    assert newer == offset + sum(len(line.encode()) + 1 for line in new)
    last_two, _ = ring.tail(2, 0)
    assert last_two == new, "the last `lines` of them"
    assert ring.tail(1, offset)[0] == new[-1:]


def test_a_multiline_record_is_several_lines_and_blank_ones_are_dropped() -> None:
    ring = LogRing()
    ring.handle(record("first\n\n   \nsecond   "))
    lines, _ = ring.tail()
    assert lines[0].endswith(" - INFO - first")
    assert lines[1:] == ["second"], "right-stripped; blank lines dropped"


def test_the_ring_holds_at_most_max_bytes_dropping_the_oldest() -> None:
    ring = LogRing(max_bytes=2_000)
    for n in range(1_000):
        ring.handle(record("message number %d", n))
    assert ring.held_bytes <= 2_000
    lines, offset = ring.tail(1000, 0)
    assert lines[-1].endswith("message number 999")
    assert 10 < len(lines) < 100
    assert offset > 40_000, "offsets keep counting what was written, not what is held"
    assert ring.text().count("\n") == len(lines)
    huge = LogRing(max_bytes=100)
    huge.handle(record("x" * 1_000))
    assert huge.held_bytes <= 100, "one line longer than the ring is cut to fit"
    with pytest.raises(ValueError, match="max_bytes"):
        LogRing(max_bytes=0)


def test_secrets_are_redacted_configured_and_added_at_run_time() -> None:
    ring = LogRing(secrets=["sk-configured-1234"])
    logs.add_secret("sk-posted-at-runtime-5678")
    ring.handle(record("keys %s and %s", "sk-configured-1234", "sk-posted-at-runtime-5678"))
    text = ring.text()
    assert "sk-configured" not in text
    assert "sk-posted" not in text
    assert text.count("***") == 2


def test_records_from_other_threads_are_safe() -> None:
    ring = LogRing(max_bytes=50_000)

    def write(tag: str) -> None:
        for n in range(500):
            ring.handle(record("%s %d", tag, n))

    threads = [threading.Thread(target=write, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines, offset = ring.tail(1000, 0)
    assert offset == ring.size
    assert sum(len(line.encode()) + 1 for line in ring.text().splitlines()) == ring.held_bytes
    assert all(" - INFO - t" in line for line in lines)
