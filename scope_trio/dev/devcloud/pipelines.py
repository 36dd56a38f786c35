"""The dev cloud's pipelines: what each does to a frame (plain PyAV, no aiortc, no numpy)."""

from __future__ import annotations

from av import VideoFrame

__all__ = ["PIPELINES", "invert_frame"]

PIPELINES = ("passthrough", "invert")
"""Pipelines the devcloud can load: the first of ``pipeline_ids`` in a load request is used."""

_INVERT_TABLE = bytes(range(255, -1, -1))


def invert_frame(frame: VideoFrame) -> VideoFrame:
    """Every pixel inverted in RGB (255 - value per channel), as a new ``rgb24`` frame.

    Uses ``bytes.translate`` on the packed plane (no numpy: it is not installed with av).
    """
    rgb = frame.reformat(format="rgb24")
    out = VideoFrame(width=rgb.width, height=rgb.height, format="rgb24")
    source, target = rgb.planes[0], out.planes[0]
    data = bytes(source)
    if source.line_size == target.line_size:
        target.update(data.translate(_INVERT_TABLE))
    else:  # pragma: no cover - same width and format give the same line size in practice
        row = 3 * rgb.width
        rows = bytearray(target.buffer_size)
        for y in range(rgb.height):
            start = y * source.line_size
            rows[y * target.line_size : y * target.line_size + row] = data[
                start : start + row
            ].translate(_INVERT_TABLE)
        target.update(bytes(rows))
    return out


def process(pipeline: str, frame: VideoFrame) -> VideoFrame:
    """``frame`` through ``pipeline`` (one of :data:`PIPELINES`)."""
    return invert_frame(frame) if pipeline == "invert" else frame
