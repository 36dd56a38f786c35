"""Codec settings benchmark: what each VP8 encoder option costs in latency, CPU and quality.

aiortc's ``Vp8Encoder`` configures libvpx (through PyAV) for real time: ``deadline=realtime``,
``cpu-used=-6``, ``lag-in-frames=0``, CBR at the target bitrate (500 kbps, moved by REMB
between 250 kbps and 1.5 Mbps), ``kf_max_dist`` 3000, one token partition. This script
encodes and decodes the same 512x512 moving picture (a smooth random texture panned a few
pixels per frame, so motion and detail are both present) with aiortc's settings and with one
setting changed at a time, in this process, and reports per variant: encode and decode time
per frame (p50 / p95: the latency each hop pays, and its CPU), bytes per frame, keyframe size,
and the luma PSNR of the decoded frames against the originals.

It measures the codec alone, not the relay: ``latency.py`` shows how much of a frame's trip
the codec is (encode + decode per hop).
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import av
from _common import Checks, Report, command_line, conclude, make_parser, make_report
from av import VideoFrame

BENCHMARK = "codec"
SIZE = 512
FPS = 30
FULL_FRAMES, QUICK_FRAMES = 300, 90
PSNR_EVERY = 5

AIORTC_OPTIONS = {
    "bufsize": "500000",
    "cpu-used": "-6",
    "deadline": "realtime",
    "lag-in-frames": "0",
    "minrate": "500000",
    "maxrate": "500000",
    "noise-sensitivity": "4",
    "overshoot-pct": "15",
    "partitions": "0",
    "static-thresh": "1",
    "undershoot-pct": "100",
}
"""What aiortc 1.15/1.16's ``Vp8Encoder`` sets (bit_rate 500 kbps, gop 3000, q 2-56)."""

VARIANTS: dict[str, dict[str, Any]] = {
    "aiortc default": {},
    "cpu-used -16 (fastest)": {"options": {"cpu-used": "-16"}},
    "cpu-used -4": {"options": {"cpu-used": "-4"}},
    "error-resilient": {"options": {"error-resilient": "1"}},
    "1.5 Mbps (REMB max)": {
        "bit_rate": 1_500_000,
        "options": {"bufsize": "1500000", "minrate": "1500000", "maxrate": "1500000"},
    },
    "2 threads": {"threads": 2},
    "keyframe every 30": {"gop": 30},
}


def texture(size: int, seed: int = 1) -> list[bytes]:
    """A smooth random luma texture, ``size`` rows of ``size`` bytes (sums of waves)."""
    rng = random.Random(seed)
    waves = [
        (rng.uniform(0.005, 0.06), rng.uniform(0.005, 0.06), rng.uniform(0, 6.3)) for _ in range(6)
    ]
    rows = []
    for y in range(size):
        row = bytearray(size)
        for x in range(size):
            v = sum(math.sin(fx * x + fy * y + p) for fx, fy, p in waves)
            row[x] = max(16, min(235, int(125 + 18 * v + rng.uniform(-6, 6))))
        rows.append(bytes(row))
    return rows


def picture(tex: list[bytes], n: int) -> tuple[VideoFrame, bytes]:
    """Frame ``n``: the texture panned (3, 2) pixels per frame; and its luma."""
    dx, dy = (3 * n) % SIZE, (2 * n) % SIZE
    luma = b"".join(tex[(y + dy) % (2 * SIZE)][dx : dx + SIZE] for y in range(SIZE))
    frame = VideoFrame(width=SIZE, height=SIZE, format="yuv420p")
    frame.planes[0].update(luma) if frame.planes[0].line_size == SIZE else None
    for plane in frame.planes[1:]:
        plane.update(bytes([128]) * plane.buffer_size)
    frame.pts = n * (90_000 // FPS)
    frame.time_base = __import__("fractions").Fraction(1, 90_000)
    return frame, luma


def psnr(a: bytes, b: bytes) -> float:
    sse = sum((x - y) * (x - y) for x, y in zip(a, b, strict=True))
    return 99.0 if sse == 0 else 10 * math.log10(255 * 255 * len(a) / sse)


def luma_of(frame: VideoFrame) -> bytes:
    plane = frame.planes[0]
    data = bytes(plane)
    if plane.line_size == SIZE:
        return data[: SIZE * SIZE]
    return b"".join(data[y * plane.line_size : y * plane.line_size + SIZE] for y in range(SIZE))


def run_variant(name: str, spec: dict[str, Any], frames: int, tex: list[bytes]) -> dict[str, Any]:
    enc = av.CodecContext.create("libvpx", "w")
    enc.width = enc.height = SIZE
    enc.bit_rate = spec.get("bit_rate", 500_000)
    enc.pix_fmt = "yuv420p"
    enc.gop_size = spec.get("gop", 3000)
    enc.qmin, enc.qmax = 2, 56
    enc.options = {**AIORTC_OPTIONS, **spec.get("options", {})}
    enc.thread_count = spec.get("threads", 1)  # aiortc: 1 thread below 640x480 pixels
    dec = av.CodecContext.create("libvpx", "r")
    enc_ms, dec_ms, sizes, psnrs, key_sizes = [], [], [], [], []
    for n in range(frames):
        frame, luma = picture(tex, n)
        t0 = time.perf_counter()
        packets = list(enc.encode(frame))
        t1 = time.perf_counter()
        data = b"".join(bytes(p) for p in packets)
        enc_ms.append(1000 * (t1 - t0))
        sizes.append(len(data))
        if packets and packets[0].is_keyframe:
            key_sizes.append(len(data))
        if not data:
            continue
        t2 = time.perf_counter()
        out = dec.decode(av.Packet(data))
        dec_ms.append(1000 * (time.perf_counter() - t2))
        if out and n % PSNR_EVERY == 0 and n >= FPS:  # after the rate control settled
            psnrs.append(psnr(luma, luma_of(out[-1])))

    def p(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2)

    return {
        "variant": name,
        "encode_ms": {"p50": p(enc_ms, 0.5), "p95": p(enc_ms, 0.95)},
        "decode_ms": {"p50": p(dec_ms, 0.5), "p95": p(dec_ms, 0.95)},
        "kbps": round(8 * sum(sizes[FPS:]) / max(1, frames - FPS) * FPS / 1000, 1),
        "keyframe_bytes": round(statistics.mean(key_sizes)) if key_sizes else None,
        "keyframes": len(key_sizes),
        "psnr_db": round(statistics.mean(psnrs), 2) if psnrs else None,
    }


def summary(results: dict[str, Any]) -> str:
    lines = [
        f"codec: VP8 {SIZE}x{SIZE}, {results['frames']} frames per variant",
        f"{'variant':<26}{'encode p50/p95 ms':>19}{'decode p50/p95':>16}{'kbps':>8}"
        f"{'key bytes':>10}{'keys':>6}{'PSNR dB':>9}",
    ]
    for r in results["variants"]:
        e, d = r["encode_ms"], r["decode_ms"]
        lines.append(
            f"{r['variant']:<26}{e['p50']:>10} / {e['p95']:<6}{d['p50']:>8} / {d['p95']:<5}"
            f"{r['kbps']:>8}{r['keyframe_bytes'] or '-':>10}{r['keyframes']:>6}{r['psnr_db']:>9}"
        )
    return "\n".join(lines)


def check(report: Report, baselines: dict[str, Report]) -> Checks:
    del baselines
    checks = Checks()
    default = report["results"]["variants"][0]
    checks.add("aiortc default PSNR dB", str(default["psnr_db"]), "-", "informational", None)
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(BENCHMARK, __doc__ or "")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    frames = QUICK_FRAMES if args.quick else FULL_FRAMES
    tex = texture(2 * SIZE)
    tex = [row + row for row in tex]  # wide enough to pan
    variants = [run_variant(name, spec, frames, tex) for name, spec in VARIANTS.items()]
    results = {"frames": frames, "variants": variants}
    report = make_report(BENCHMARK, command_line("codec.py", argv), {"frames": frames}, results)
    return conclude(args, report, summary(results), check)


if __name__ == "__main__":
    sys.exit(main())
