"""API load benchmark: status pollers and SSE subscribers against scope-trio while it relays.

One ``scope-trio serve`` subprocess (embedded dev cloud, passthrough) relays one 512x512,
30 fps stream from the benchmark's aiortc browser, exactly as in ``benchmarks/relay.py``
(same numbered frames, same measurements). The same run measures two windows:

1. unloaded: the stream alone;
2. loaded: the stream while a load process runs 50 status pollers (``GET
   /api/v1/cloud/status`` in a loop, each waiting for its answer before asking again) and 10
   Server-Sent Events subscribers (``GET /api/v1/cloud/events``, read until the window ends).

The load runs in a subprocess of its own (this script with ``--load-worker``, plain asyncio
and httpx), so it competes with the server for the machine but not with the browser's
decoding for this process's GIL. Every poll and subscription is bounded in count and time;
everything is on loopback.

Reported: poll latency p50 / p99 / max, time to the first SSE event, errors (non-200
answers, failed requests, SSE streams that ended early or never sent an event: must be 0),
delivered fps loaded / unloaded (a ratio), and the server's CPU per frame in both windows.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx
from _common import (
    Checks,
    Report,
    command_line,
    conclude,
    config_key,
    make_parser,
    make_report,
)
from relay import SCRIPT as RELAY_SCRIPT
from relay import Window, add_duration_options, percentiles, ratio, streaming

BENCHMARK = "api_load"
SCRIPT = RELAY_SCRIPT.with_name("api_load.py")
POLLERS, SUBSCRIBERS = 50, 10
FULL_SECONDS, QUICK_SECONDS = 30.0, 5.0
MAX_POLLS = 100_000
"""Per poller: a bound on the loop, whatever the clock does."""
REQUEST_TIMEOUT = 10.0
LEAD = 1.0
"""The load runs this long past the loaded window (it starts before the window does)."""
STARTED = "load started"

FPS_RATIO_FLOOR = 0.8
"""--check: delivered fps under load must be at least this fraction of the unloaded fps."""
LATENCY_SLACK, LATENCY_ALLOWANCE = 3.0, 0.050
"""--check: poll p99 may grow to 3x the baseline's + 50 ms (wall clock varies)."""


# ---------------------------------------------------------------- the load process


async def _poller(
    http: httpx.AsyncClient, deadline: float, latencies: list[float], errors: list[str]
) -> None:
    for _ in range(MAX_POLLS):
        if time.monotonic() >= deadline:
            return
        began = time.monotonic()
        try:
            response = await http.get("/api/v1/cloud/status")
        except httpx.HTTPError as exc:
            errors.append(f"poll: {type(exc).__name__}: {exc}")
            continue
        latencies.append(time.monotonic() - began)
        if response.status_code != 200:
            errors.append(f"poll: HTTP {response.status_code}")


async def _subscriber(
    http: httpx.AsyncClient,
    deadline: float,
    first: list[float],
    events: list[int],
    errors: list[str],
) -> None:
    began = time.monotonic()
    count = 0
    try:
        async with http.stream("GET", "/api/v1/cloud/events") as response:
            if response.status_code != 200:
                errors.append(f"sse: HTTP {response.status_code}")
                return
            lines = response.aiter_lines()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    line = await asyncio.wait_for(lines.__anext__(), left)
                except asyncio.TimeoutError:
                    break
                except StopAsyncIteration:
                    errors.append("sse: the stream ended before the window did")
                    break
                if line.startswith("data:"):
                    if count == 0:
                        first.append(time.monotonic() - began)
                    count += 1
    except httpx.HTTPError as exc:
        errors.append(f"sse: {type(exc).__name__}: {exc}")
    if count == 0:
        errors.append("sse: no event received")
    events.append(count)


async def load_worker(url: str, seconds: float, pollers: int, subscribers: int) -> None:
    """The ``--load-worker`` subprocess: prints STARTED, then one JSON line of results."""
    latencies: list[float] = []
    first: list[float] = []
    events: list[int] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=pollers + subscribers + 10)
    timeout = httpx.Timeout(REQUEST_TIMEOUT, read=seconds + REQUEST_TIMEOUT)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        print(STARTED, flush=True)
        began = time.monotonic()
        deadline = began + seconds
        await asyncio.gather(
            *(_poller(http, deadline, latencies, errors) for _ in range(pollers)),
            *(_subscriber(http, deadline, first, events, errors) for _ in range(subscribers)),
        )
        wall = time.monotonic() - began
    result = {
        "polls": len(latencies),
        "polls_per_second": round(len(latencies) / wall, 1),
        "poll_latency_s": percentiles(latencies, 5),
        "sse_first_event_s": percentiles(first, 5),
        "sse_events": sum(events),
        "errors": len(errors),
        "error_messages": sorted(set(errors))[:20],
    }
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- the benchmark


async def run_load(seconds: float, pollers: int, subscribers: int) -> dict[str, Any]:
    async with streaming("scope-trio") as stream:
        print(f"unloaded: {seconds:g} s ...", flush=True)
        unloaded = await stream.measure(seconds)
        print(
            f"loaded: {pollers} pollers + {subscribers} SSE subscribers, {seconds:g} s ...",
            flush=True,
        )
        url = stream.server.url  # type: ignore[attr-defined]  # a ScopeTrioServer
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--load-worker",
            url,
            str(seconds + LEAD),
            str(pollers),
            str(subscribers),
            stdout=asyncio.subprocess.PIPE,
        )
        assert worker.stdout is not None
        try:
            line = await asyncio.wait_for(worker.stdout.readline(), 60)
            if line.decode().strip() != STARTED:
                raise RuntimeError(f"the load worker did not start: {line!r}")
            loaded: Window = await stream.measure(seconds)
            out = await asyncio.wait_for(worker.stdout.read(), seconds + 60)
            await asyncio.wait_for(worker.wait(), 30)
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
        load: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        if loaded.frames_delivered == 0 or load["errors"]:
            print("the server's log:\n" + "\n".join(stream.server.log), flush=True)
    before, during = unloaded.summary(), loaded.summary()
    stream_errors = (unloaded.frames_delivered == 0) + (loaded.frames_delivered == 0)
    return {
        "seconds": seconds,
        "pollers": pollers,
        "subscribers": subscribers,
        "errors": load["errors"] + stream_errors,
        "load": load,
        "unloaded": before,
        "loaded": during,
        "ratios": {
            "delivered_fps": ratio(during["delivered_fps"], before["delivered_fps"]),
            "cpu_per_frame": ratio(during["cpu_ms_per_frame"], before["cpu_ms_per_frame"]),
            "latency_p50": ratio(during["latency_s"]["p50"], before["latency_s"]["p50"]),
        },
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def _num(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def summary(results: dict[str, Any]) -> str:
    load = results["load"]
    poll, first = load["poll_latency_s"], load["sse_first_event_s"]
    lines = [
        f"api_load: {results['pollers']} status pollers + {results['subscribers']} SSE "
        f"subscribers for {results['seconds']:g} s while relaying 512x512 at 30 fps",
        f"errors: {results['errors']}",
        f"polls: {load['polls']:,} ({load['polls_per_second']:,.0f}/s), latency ms p50 "
        f"{_ms(poll['p50'])}, p99 {_ms(poll['p99'])}, max {_ms(poll['max'])}",
        f"SSE: {load['sse_events']} events, first event ms p50 {_ms(first['p50'])}, "
        f"p99 {_ms(first['p99'])}",
        "",
        f"{'window':<10}{'fps':>8}{'deliv':>7}{'lost':>6}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU s':>8}{'CPU ms/frame':>14}",
    ]
    for name in ("unloaded", "loaded"):
        s = results[name]
        lines.append(
            f"{name:<10}{s['delivered_fps']:>8.2f}{s['frames_delivered']:>7}"
            f"{s['frames_lost']:>6}{_ms(s['latency_s']['p50']):>9}{_ms(s['latency_s']['p99']):>9}"
            f"{s['server_cpu_seconds']:>8.2f}{_num(s['cpu_ms_per_frame']):>14}"
        )
    r = results["ratios"]
    lines.append(
        f"loaded / unloaded: fps {_num(r['delivered_fps'])}, frame latency p50 "
        f"{_num(r['latency_p50'])}, CPU per frame {_num(r['cpu_per_frame'])}"
    )
    lines += [f"error: {message}" for message in load["error_messages"]]
    return "\n".join(lines)


def check(report: Report, baselines: dict[str, Report]) -> Checks:
    results = report["results"]
    checks = Checks()
    checks.add("errors", str(results["errors"]), "-", "0", results["errors"] == 0)
    fps = results["ratios"]["delivered_fps"]
    checks.add(
        "fps loaded/unloaded",
        _num(fps),
        "-",
        f">= {FPS_RATIO_FLOOR:g}",
        fps is not None and fps >= FPS_RATIO_FLOOR,
    )
    p99 = results["load"]["poll_latency_s"]["p99"]
    same = baselines.get(config_key(report["config"]))
    if same is None:
        checks.add("poll p99 ms", _ms(p99), "none", "-", None)
        return checks
    base_p99 = same["results"]["load"]["poll_latency_s"]["p99"]
    if p99 is None or base_p99 is None:
        checks.add("poll p99 ms", _ms(p99), _ms(base_p99), "-", None)
    else:
        limit = LATENCY_SLACK * base_p99 + LATENCY_ALLOWANCE
        checks.add("poll p99 ms", _ms(p99), _ms(base_p99), f"<= {_ms(limit)}", p99 <= limit)
    base_rate = same["results"]["load"]["polls_per_second"]
    checks.add(
        "polls/s",
        _num(results["load"]["polls_per_second"]),
        _num(base_rate),
        "informational",
        None,
    )
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--load-worker"]:  # the load subprocess
        url, duration, pollers, subscribers = sys.argv[2:6]
        asyncio.run(load_worker(url, float(duration), int(pollers), int(subscribers)))
        return 0
    parser = make_parser(BENCHMARK, __doc__ or "")
    add_duration_options(parser, FULL_SECONDS, QUICK_SECONDS)
    parser.add_argument("--pollers", type=int, default=POLLERS, help="(default %(default)s)")
    parser.add_argument(
        "--subscribers", type=int, default=SUBSCRIBERS, help="(default %(default)s)"
    )
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else FULL_SECONDS)
    if not 0 < seconds < 100 or args.pollers < 0 or args.subscribers < 0:
        parser.error("--seconds must be in (0, 100); --pollers and --subscribers >= 0")

    results = asyncio.run(run_load(seconds, args.pollers, args.subscribers))
    config = {"seconds": seconds, "pollers": args.pollers, "subscribers": args.subscribers}
    report = make_report(BENCHMARK, command_line("api_load.py", argv), config, results)
    failure = f"{results['errors']} errors" if results["errors"] else None
    return conclude(args, report, summary(results), check, failure=failure)


if __name__ == "__main__":
    sys.exit(main())
