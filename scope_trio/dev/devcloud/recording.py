"""Recording a session's output as a real MP4 (H.264 in an MP4 container, via PyAV).

A :class:`Recorder` takes the frames a session sends (:meth:`Recorder.add`, synchronous and
never blocking: a full queue drops the frame and counts it) and encodes them in a worker
thread, one at a time, so the event loop never waits on the encoder. :meth:`Recorder.take`
finishes the current file and returns its bytes; recording goes on into a new file, as on
the real runner.

:meth:`Recorder.add` copies each frame's pixels (raw plane bytes, no ``reformat``) before
queueing it: the frame objects are shared with the outgoing video track, whose encoder
converts them in its own worker thread, and two threads converting one PyAV frame at once
deadlock in its per-frame converter (seen). The copy belongs to the recorder alone. Timestamps are wall-clock milliseconds since the
file's first frame, strictly increasing.
"""

from __future__ import annotations

import fractions
import io
import logging
import time

import av
import trio
from av import VideoFrame
from av.video.stream import VideoStream

__all__ = ["CODEC", "QUEUE_FRAMES", "Recorder", "copy_frame"]

logger = logging.getLogger("scope_trio.dev.devcloud")

QUEUE_FRAMES = 30
"""Frames waiting for the encoder at most; more are dropped (counted in ``dropped``)."""

CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
"""H.264 (playable everywhere) when PyAV's FFmpeg has x264, as its wheels do; else MPEG-4."""

_TIME_BASE = fractions.Fraction(1, 1000)


def copy_frame(frame: VideoFrame) -> VideoFrame:
    """A new frame with ``frame``'s format, size and pixels, copied plane by plane as raw
    bytes (reading memory only: safe while another thread converts ``frame``)."""
    out = VideoFrame(width=frame.width, height=frame.height, format=frame.format.name)
    for source, target in zip(frame.planes, out.planes, strict=True):
        data = bytes(source)
        if source.line_size == target.line_size and len(data) == target.buffer_size:
            target.update(data)
            continue
        row = min(source.line_size, target.line_size)
        rows = bytearray(target.buffer_size)
        for y in range(target.height):
            rows[y * target.line_size : y * target.line_size + row] = data[
                y * source.line_size : y * source.line_size + row
            ]
        target.update(bytes(rows))
    return out


class _File:
    """One MP4 being written into memory; sized by its first frame."""

    def __init__(self, width: int, height: int) -> None:
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        stream = self.container.add_stream(CODEC, rate=30)
        if not isinstance(stream, VideoStream):  # pragma: no cover - a video codec gives one
            raise TypeError(f"{CODEC} did not give a video stream")
        stream.width, stream.height = width, height
        stream.pix_fmt = "nv12" if CODEC == "libx264" else "yuv420p"
        stream.time_base = _TIME_BASE
        stream.codec_context.time_base = _TIME_BASE
        if CODEC == "libx264":
            stream.options = {"preset": "veryfast", "crf": "30", "bf": "0"}
        self.stream = stream
        self.size = (width, height)
        self.t0: float | None = None
        self.last_pts = -1
        self.frames = 0

    def encode(self, frame: VideoFrame, at: float) -> None:
        """Encode ``frame`` captured at monotonic time ``at`` (worker thread)."""
        width, height = self.size
        copy = frame.reformat(width=width, height=height, format=self.stream.pix_fmt)
        if self.t0 is None:
            self.t0 = at
        pts = max(int((at - self.t0) * 1000), self.last_pts + 1)
        self.last_pts = pts
        copy.pts, copy.time_base = pts, _TIME_BASE
        for packet in self.stream.encode(copy):
            self.container.mux(packet)
        self.frames += 1

    def finish(self) -> bytes:
        """Flush the encoder, write the trailer, return the file (worker thread)."""
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        return self.buffer.getvalue()

    def abandon(self) -> None:
        try:
            self.container.close()
        except Exception:  # a file nobody will read: closing is best effort
            logger.debug("devcloud: closing an abandoned recording failed", exc_info=True)


class Recorder:
    """Encodes the frames given to :meth:`add` into MP4 files; run :meth:`run` in a nursery."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[tuple[VideoFrame, float]](QUEUE_FRAMES)
        self._lock = trio.Lock()
        self._file: _File | None = None
        self.frames = 0
        """Frames encoded, over every file."""
        self.dropped = 0
        """Frames dropped because the encoder fell behind."""

    def add(self, frame: VideoFrame) -> None:
        """Queue a copy of one sent frame for the recording (never blocks; drops when full)."""
        at = time.monotonic()
        try:
            self._send.send_nowait((copy_frame(frame), at))
        except trio.WouldBlock:
            self.dropped += 1

    @property
    def pending_frames(self) -> int:
        """Frames in the current file (0: nothing to download yet)."""
        return 0 if self._file is None else self._file.frames

    async def run(self) -> None:
        """Encode queued frames until cancelled; the current file is then discarded.

        A cancel does not wait for a frame being encoded: that worker thread is abandoned
        (it finishes on its own, on a file nobody keeps), so stopping is never held up by
        the encoder.
        """
        busy = False
        try:
            async for frame, at in self._receive:
                async with self._lock:
                    busy = True
                    await trio.to_thread.run_sync(self._encode, frame, at, abandon_on_cancel=True)
                    busy = False
        finally:
            current, self._file = self._file, None
            if current is not None and not busy:
                current.abandon()

    def _encode(self, frame: VideoFrame, at: float) -> None:
        if self._file is None:
            width, height = max(2, frame.width // 2 * 2), max(2, frame.height // 2 * 2)
            self._file = _File(width, height)
        self._file.encode(frame, at)
        self.frames += 1

    async def take(self) -> bytes | None:
        """Finish the current file and return it (None if it has no frame yet); the next
        frame starts a new file."""
        async with self._lock:
            current, self._file = self._file, None
            if current is None or current.frames == 0:
                return None
            return await trio.to_thread.run_sync(current.finish, abandon_on_cancel=True)
