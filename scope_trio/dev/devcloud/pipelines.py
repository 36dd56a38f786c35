"""The dev cloud's pipelines: what each does, and how each describes itself.

Three pipelines, all plain PyAV (no aiortc, no numpy):

* ``passthrough`` (video mode): every input frame goes back unchanged.
* ``invert`` (video mode): every input frame goes back with each RGB value inverted, so a
  viewer can see the video really went through the cloud.
* ``pattern`` (text mode): needs no input video; it draws moving diagonal stripes whose
  colours, stripe width and direction come from the prompt text, at :data:`PATTERN_FPS`.

:func:`pipeline_schemas` is what ``GET /api/v1/pipelines/schemas`` answers: per pipeline,
the fields Scope's web frontend reads to build its pipeline picker and settings (modes, the
default mode, per-mode defaults, whether models must be downloaded, a JSON schema of the
load/runtime settings with their defaults). ``docs/devcloud.md`` lists them.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any

from av import VideoFrame

__all__ = [
    "PATTERN_FPS",
    "PIPELINES",
    "TEXT_PIPELINES",
    "frame_size",
    "invert_frame",
    "pattern_frame",
    "pipeline_schemas",
    "process",
    "prompt_text",
]

PIPELINES = ("passthrough", "invert", "pattern")
"""Pipelines the devcloud can load: the first of ``pipeline_ids`` in a load request is used."""

TEXT_PIPELINES = frozenset({"pattern"})
"""Pipelines that make their own frames from the prompt and ignore input video."""

PATTERN_FPS = 15.0
"""Frames per second the ``pattern`` pipeline draws (cheap enough for a loaded machine)."""

PATTERN_SPEED = 40.0
"""Pixels per second the pattern's stripes move."""

DEFAULT_SIZE = {"passthrough": (512, 512), "invert": (512, 512), "pattern": (320, 240)}
"""(width, height) each pipeline's schema offers by default; only ``pattern`` uses it itself
(the video pipelines keep the input's size)."""

MIN_SIZE, MAX_SIZE = 16, 1920
"""Bounds on the pattern's frame size (load params outside them are clamped)."""

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
    """An input ``frame`` through a video pipeline (``passthrough`` or ``invert``)."""
    return invert_frame(frame) if pipeline == "invert" else frame


def prompt_text(parameters: Mapping[str, Any]) -> str:
    """The prompt the parameters carry: the first ``prompts[].text``, else ``prompt``, else ""."""
    prompts = parameters.get("prompts")
    if isinstance(prompts, list):
        for prompt in prompts:
            if isinstance(prompt, Mapping) and isinstance(prompt.get("text"), str):
                return str(prompt["text"])
    prompt = parameters.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def frame_size(pipeline: str, load_params: Mapping[str, Any] | None) -> tuple[int, int]:
    """(width, height) the pattern draws: the load params' ``width``/``height`` if they are
    numbers, clamped to [16, 1920] and made even (video encoders need even sizes)."""
    width, height = DEFAULT_SIZE.get(pipeline, (512, 512))
    params = load_params or {}

    def pick(key: str, default: int) -> int:
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return default
        return int(min(max(value, MIN_SIZE), MAX_SIZE)) // 2 * 2

    return pick("width", width), pick("height", height)


def pattern_frame(text: str, seconds: float, width: int, height: int) -> VideoFrame:
    """The ``pattern`` pipeline's frame for prompt ``text`` at ``seconds`` into the stream.

    Diagonal stripes: the prompt's SHA-256 picks the two colours, the period (16-63 px) and
    the direction; the stripes move :data:`PATTERN_SPEED` pixels per second. The same
    prompt and time always give the same frame; an ``rgb24`` frame of ``width`` x ``height``.
    """
    digest = hashlib.sha256(text.encode()).digest()
    background, stripe = digest[0:3], digest[3:6]
    period = 16 + digest[6] % 48
    direction = 1 if digest[7] % 2 else -1
    shift = int(seconds * PATTERN_SPEED) % period
    unit = stripe * (period // 2) + background * (period - period // 2)
    long_row = unit * ((width + height) // period + 3)
    out = VideoFrame(width=width, height=height, format="rgb24")
    plane = out.planes[0]
    pad = bytes(plane.line_size - 3 * width)
    rows = []
    for y in range(height):
        start = 3 * ((shift + direction * y) % period)
        rows.append(long_row[start : start + 3 * width])
        rows.append(pad)
    plane.update(b"".join(rows))
    return out


# -- schemas -------------------------------------------------------------------------------


def _property(
    kind: str,
    default: Any,
    description: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    category: str = "configuration",
    order: int | None = None,
    is_load_param: bool = False,
    label: str | None = None,
) -> dict[str, Any]:
    """One ``config_schema`` property with the ``ui`` hints the frontend's widgets read."""
    prop: dict[str, Any] = {"type": kind, "default": default, "description": description}
    if minimum is not None:
        prop["minimum"] = minimum
    if maximum is not None:
        prop["maximum"] = maximum
    ui: dict[str, Any] = {"category": category, "is_load_param": is_load_param}
    if order is not None:
        ui["order"] = order
    if label is not None:
        ui["label"] = label
    prop["ui"] = ui
    return prop


def _nullable(branch: dict[str, Any]) -> dict[str, Any]:
    """A property that may be null (default null), accepted and ignored here."""
    return {"anyOf": [branch, {"type": "null"}], "default": None, "description": "Ignored."}


def _config_schema(title: str, width: int, height: int, *, text: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "height": _property(
            "integer", height, "Output height in pixels.", minimum=1, order=1, is_load_param=True
        ),
        "width": _property(
            "integer", width, "Output width in pixels.", minimum=1, order=2, is_load_param=True
        ),
        "manage_cache": _property("boolean", True, "Accepted and ignored (no cache here)."),
        "base_seed": _property("integer", 42, "Accepted and ignored (nothing random).", minimum=0),
        "denoising_steps": _nullable({"type": "array", "items": {"type": "integer"}}),
        "noise_scale": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "noise_controller": _nullable({"type": "boolean"}),
        "input_size": _property("integer", 1, "Frames per step (always 1 here).", minimum=1),
    }
    return {
        "type": "object",
        "title": title,
        "description": "Text mode: draws from the prompt." if text else "Video mode.",
        "properties": properties,
    }


def _schema(
    pipeline_id: str, name: str, description: str, mode: str, *, mode_defaults: bool
) -> dict[str, Any]:
    width, height = DEFAULT_SIZE[pipeline_id]
    text = mode == "text"
    schema: dict[str, Any] = {
        "id": pipeline_id,
        "name": name,
        "description": description,
        "version": "1.0.0",
        "supported_modes": [mode],
        "default_mode": mode,
        "supports_prompts": text,
        "default_temporal_interpolation_method": "slerp",
        "default_temporal_interpolation_steps": 0,
        "default_spatial_interpolation_method": "linear",
        "docs_url": None,
        "estimated_vram_gb": None,
        "requires_models": False,
        "supports_lora": False,
        "supports_vace": False,
        "supports_cache_management": False,
        "supports_kv_cache_bias": False,
        "supports_quantization": False,
        "min_dimension": MIN_SIZE,
        "recommended_quantization_vram_threshold": None,
        "modified": False,
        "usage": [],
        "plugin_name": None,
        "config_schema": _config_schema(f"{name}Config", width, height, text=text),
    }
    if mode_defaults:
        schema["mode_defaults"] = {mode: {"width": width, "height": height}}
    return schema


_SCHEMAS: dict[str, dict[str, Any]] = {
    "passthrough": _schema(
        "passthrough",
        "Passthrough",
        "Sends every input frame back unchanged.",
        "video",
        mode_defaults=False,
    ),
    "invert": _schema(
        "invert",
        "Invert",
        "Sends every input frame back with its colours inverted.",
        "video",
        mode_defaults=False,
    ),
    "pattern": _schema(
        "pattern",
        "Pattern",
        "Draws moving stripes from the prompt text; needs no input video.",
        "text",
        mode_defaults=True,
    ),
}


def pipeline_schemas() -> dict[str, dict[str, Any]]:
    """Every pipeline's schema by id, in :data:`PIPELINES` order (a fresh copy)."""
    return {pipeline_id: copy.deepcopy(_SCHEMAS[pipeline_id]) for pipeline_id in PIPELINES}
