"""Per-stage timestamps of numbered frames inside one process, for ``latency.py``.

Run as ``python benchmarks/_stages.py OUT.json <python args...>`` (e.g. ``-m scope_trio
serve ...`` or ``benchmarks/relay.py --serve-reference``): it wraps a few aiortc functions
(see :func:`install`), runs the program, and writes every event to ``OUT.json`` at exit.
``latency.py`` also installs it in its own process (the browser). Times are
``time.monotonic()``, the same clock in every process on Linux, so stages that cross
processes (the network hops) are differences of the same clock.

Events, per aiortc object (``id``):

* ``first``: the first RTP packet of an RTP timestamp reached a receiver;
* ``release``: the receive buffer gave the frame to the decoder queue;
* ``decoded``: the decoded frame reached the event loop (the track's queue), with its number;
* ``enc``: an encoder started and finished a frame, with its number.

Reading a frame's number costs the process ~0.3 ms per frame, so CPU is not measured here.
"""

from __future__ import annotations

import atexit
import functools
import json
import queue
import runpy
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

_events: dict[str, list[list[Any]]] = {"first": [], "release": [], "decoded": [], "enc": []}
_lock = threading.Lock()
_seen_first: set[tuple[int, int]] = set()


def _read_counter(frame: Any) -> int | None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from relay import read_counter

    try:
        return read_counter(frame)
    except Exception:  # an odd frame size or format: no number
        return None


def _record(kind: str, *values: Any) -> None:
    with _lock:
        _events[kind].append(list(values))


def reset() -> None:
    """Forget every event recorded so far."""
    with _lock:
        for values in _events.values():
            values.clear()
        _seen_first.clear()


_installed: list[bool] = []


def install() -> None:
    """Wrap aiortc's receiver, decoder hand-off and encoders to record events (once)."""
    if _installed:
        return
    _installed.append(True)
    import aiortc.rtcrtpreceiver as receiver_module
    import aiortc.rtcrtpsender as sender_module

    receiver_cls = receiver_module.RTCRtpReceiver
    original_init = receiver_cls.__init__
    original_handle = receiver_cls._handle_rtp_packet
    original_worker = receiver_module.decoder_worker
    original_get_encoder = sender_module.get_encoder

    class TracingQueue(queue.Queue):  # type: ignore[type-arg]
        def __init__(self, owner: Any) -> None:
            super().__init__()
            self.rid = id(owner)
            self.owner = weakref.ref(owner)

        def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
            if item is not None:
                owner = self.owner()
                mapper = getattr(owner, "_RTCRtpReceiver__timestamp_mapper", None)
                origin = getattr(mapper, "_origin", None) or 0
                stamp = (item[1].timestamp + origin) & 0xFFFFFFFF
                _record("release", self.rid, stamp, item[1].timestamp, time.monotonic())
            super().put(item, block, timeout)

    @functools.wraps(original_init)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._RTCRtpReceiver__decoder_queue = TracingQueue(self)

    @functools.wraps(original_handle)  # scope_trio's verify() reads the original's source
    async def handle(self: Any, packet: Any, arrival_time_ms: int) -> None:
        key = (id(self), packet.timestamp)
        if key not in _seen_first:
            _seen_first.add(key)
            _record("first", id(self), packet.timestamp, time.monotonic())
        await original_handle(self, packet, arrival_time_ms)

    class TracingOutput:
        def __init__(self, real: Any, rid: int) -> None:
            self.real, self.rid = real, rid

        async def put(self, frame: Any) -> None:
            if frame is not None:
                _record("decoded", self.rid, frame.pts, _read_counter(frame), time.monotonic())
            await self.real.put(frame)

    @functools.wraps(original_worker)
    def worker(loop: Any, input_q: Any, output_q: Any, *rest: Any) -> None:
        rid = getattr(input_q, "rid", 0)
        original_worker(loop, input_q, TracingOutput(output_q, rid), *rest)

    class TracingEncoder:
        def __init__(self, real: Any) -> None:
            self.real = real

        def encode(self, frame: Any, force_keyframe: bool = False) -> Any:
            start = time.monotonic()
            result = self.real.encode(frame, force_keyframe)
            _record("enc", id(self), _read_counter(frame), start, time.monotonic())
            return result

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    def get_encoder(codec: Any) -> Any:
        encoder = original_get_encoder(codec)
        return TracingEncoder(encoder) if codec.mimeType.lower().startswith("video/") else encoder

    receiver_cls.__init__ = init  # type: ignore[method-assign]
    receiver_cls._handle_rtp_packet = handle  # type: ignore[method-assign]
    receiver_module.decoder_worker = worker
    sender_module.get_encoder = get_encoder


def events() -> dict[str, list[list[Any]]]:
    with _lock:
        return {kind: list(values) for kind, values in _events.items()}


def dump(path: Path) -> None:
    path.write_text(json.dumps(events()), encoding="utf-8")


def main() -> None:
    out = Path(sys.argv[1])
    rest = sys.argv[2:]
    install()
    atexit.register(dump, out)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
