"""Soak: one healthy stream through the real stack for a long time; count false losses.

A cloud media session (real aiortc, fast ICE-consent tuning as the server uses it, the
default loss signals: path silence 1 s, stall 2 s) streams 512x512 at 30 fps to the
in-process dev cloud and back for ``--seconds`` (default 600). Nothing that loses packets is
injected, so every loss the supervisor reports is a false one. ``--latency-ms M`` has the dev
cloud hold every datagram M ms in each direction (its ``latency`` fault: a round trip of
2M ms, as to a distant cloud GPU). Reports losses (must be 0), delivered fps and the longest
gap between two frames from the cloud.

    python benchmarks/soak.py [--seconds 600] [--latency-ms M] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from av import VideoFrame

from scope_trio import rtc
from scope_trio.cloud.link import LinkConfig, connect_cloud_link
from scope_trio.cloud.media import CloudMediaSession, MediaStats, VideoInput
from scope_trio.core.supervisor import SessionSupervisor
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud, ws_url


async def soak(seconds: float, latency_ms: float = 0.0) -> dict[str, Any]:
    consent = rtc.tune_ice_consent()
    consent_in_effect = rtc.get_ice_consent()
    frames = 0
    longest_gap = 0.0
    last = [trio.current_time()]

    def on_frame(frame: VideoFrame) -> None:
        nonlocal frames, longest_gap
        now = trio.current_time()
        longest_gap = max(longest_gap, now - last[0])
        last[0] = now
        frames += 1

    try:
        async with rtc.open_loop(), trio.open_nursery() as outer:
            base_url = await outer.start(partial(serve_devcloud, DevCloudConfig()))
            config = LinkConfig(ws_url=ws_url(base_url))
            async with connect_cloud_link(config) as link, trio.open_nursery() as nursery:
                video, stats = VideoInput(), MediaStats()

                def factory() -> CloudMediaSession:
                    return CloudMediaSession(
                        link, video_input=video, on_frame=on_frame, stats=stats
                    )

                async def produce() -> None:
                    frame = rtc.black_frame(512, 512)
                    while True:
                        video.push(frame)
                        await trio.sleep(1 / 30)

                nursery.start_soon(produce)
                supervisor = SessionSupervisor(nursery, factory)
                await supervisor.start({"prompts": ["soak"]})
                if latency_ms > 0:
                    async with httpx.AsyncClient(base_url=base_url) as http:
                        fault = {"action": "latency", "ms": latency_ms, "seconds": seconds + 60}
                        response = await http.post("/control/faults", json=fault)
                        response.raise_for_status()
                started = trio.current_time()
                frames, longest_gap, last[0] = 0, 0.0, started
                await trio.sleep(seconds)  # the stream under test runs meanwhile
                elapsed = trio.current_time() - started
                status = supervisor.status
                await supervisor.stop()
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        rtc.tune_ice_consent(consent.interval, consent.failures, consent.rto)
    return {
        "seconds": round(elapsed, 1),
        "latency_ms_each_way": latency_ms,
        "consent": dataclasses.asdict(consent_in_effect),
        "false_losses": status.sessions_lost,
        "last_loss_reason": status.last_loss_reason,
        "frames_from_cloud": frames,
        "fps": round(frames / elapsed, 2),
        "longest_gap_s": round(longest_gap, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="held by the dev cloud in each direction"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = trio.run(soak, args.seconds, args.latency_ms)
    report = {
        "benchmark": "soak",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "benchmarks/soak.py", *(argv or sys.argv[1:])]),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = results["false_losses"] == 0 and not math.isnan(float(results["fps"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
