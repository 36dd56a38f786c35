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
import contextlib
import dataclasses
import json
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
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
STATUS_PATH = "/api/v1/cloud/status"

FPS_RATIO_FLOOR = 0.8
"""--check: delivered fps under load must be at least this fraction of the unloaded fps."""
LATENCY_SLACK, LATENCY_ALLOWANCE = 3.0, 0.050
"""--check: poll p99 may grow to 3x the baseline's + 50 ms (wall clock varies)."""


# ---------------------------------------------------------------- the load process


@dataclass
class StreamResults:
    first: list[float] = field(default_factory=list)
    """Seconds to each subscriber's first event."""
    events: list[int] = field(default_factory=list)
    reconnects: list[int] = field(default_factory=list)
    """Per subscriber: reconnect episodes seen (``webrtc_reconnecting`` turning true)."""


SLOW_POLL = 0.25
"""Polls slower than this are listed with their start time (``time.monotonic()``: the same
clock in every process on Linux, so a caller can line them up with its own events)."""
MAX_SLOW_LISTED = 500


@dataclass
class PollResults:
    latencies: list[float] = field(default_factory=list)
    late: int = 0
    """Paced polls that could not start on time (the previous one was still waiting)."""
    slow: list[tuple[float, float]] = field(default_factory=list)
    """(start, latency) of polls slower than SLOW_POLL (at most MAX_SLOW_LISTED)."""


StatusGetter = Callable[[], Awaitable[int]]
"""One ``GET /api/v1/cloud/status`` on a simulated user's own connection: the status code."""


def httpx_getter(http: httpx.AsyncClient) -> StatusGetter:
    async def get() -> int:
        return (await http.get(STATUS_PATH)).status_code

    return get


class H11Getter:
    """A lean HTTP/1.1 keep-alive client (h11 over asyncio streams) for the pollers.

    httpx costs about as much CPU per request as the server does, and on a 2-core machine
    the load generator then takes the server's CPU; this costs a fraction of it. A
    connection the server closed is reopened once for the next request, as any client does.
    """

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.netloc = parsed.netloc
        self.reopened = 0
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._conn = h11.Connection(h11.CLIENT)

    async def __call__(self) -> int:
        if self._streams is None:
            await self._open()
        elif self._conn.our_state is not h11.IDLE:  # the server asked to close
            await self.close()
            await self._open()
            self.reopened += 1
        return await asyncio.wait_for(self._get(), REQUEST_TIMEOUT)

    async def _open(self) -> None:
        self._streams = await asyncio.open_connection(self.host, self.port)
        self._conn = h11.Connection(h11.CLIENT)

    async def _get(self) -> int:
        assert self._streams is not None
        reader, writer = self._streams
        conn = self._conn
        request = h11.Request(method="GET", target=STATUS_PATH, headers=[("Host", self.netloc)])
        writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
        await writer.drain()
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _poller(
    get: StatusGetter,
    deadline: float,
    results: PollResults,
    errors: list[str],
    *,
    interval: float = 0.0,
    phase: float = 0.0,
) -> None:
    """Poll the status until ``deadline``: back to back (``interval`` 0), or one poll every
    ``interval`` seconds starting ``phase`` seconds in, as an open UI does."""
    due = time.monotonic() + phase
    for _ in range(MAX_POLLS):
        if interval:
            now = time.monotonic()
            if now < due:
                await asyncio.sleep(due - now)
            elif now - due > interval:
                results.late += 1
                due = now
            due += interval
        if time.monotonic() >= deadline:
            return
        began = time.monotonic()
        try:
            status = await get()
        except (httpx.HTTPError, OSError, h11.ProtocolError, asyncio.TimeoutError) as exc:
            errors.append(f"poll: {type(exc).__name__}: {exc}")
            continue
        latency = time.monotonic() - began
        results.latencies.append(latency)
        if latency > SLOW_POLL and len(results.slow) < MAX_SLOW_LISTED:
            results.slow.append((round(began, 3), round(latency, 3)))
        if status != 200:
            errors.append(f"poll: HTTP {status}")


async def _subscriber(
    http: httpx.AsyncClient, deadline: float, results: StreamResults, errors: list[str]
) -> None:
    """Read the event stream until ``deadline``; count events and the reconnect episodes
    they show."""
    began = time.monotonic()
    count = episodes = 0
    reconnecting = False
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
                        results.first.append(time.monotonic() - began)
                    count += 1
                    now_reconnecting = bool(json.loads(line[5:]).get("webrtc_reconnecting"))
                    episodes += now_reconnecting and not reconnecting
                    reconnecting = now_reconnecting
    except httpx.HTTPError as exc:
        errors.append(f"sse: {type(exc).__name__}: {exc}")
    if count == 0:
        errors.append("sse: no event received")
    results.events.append(count)
    results.reconnects.append(episodes)


@dataclass(frozen=True)
class LoadSpec:
    """What the ``--load-worker`` process does (passed to it as JSON)."""

    url: str
    seconds: float
    pollers: int
    subscribers: int
    interval: float = 0.0
    """0: every poller polls back to back; else once per ``interval`` seconds each, their
    phases spread evenly over one interval (``benchmarks/load.py``)."""
    client: str = "shared-httpx"
    """"shared-httpx": every client on one httpx pool (this benchmark, as recorded in its
    baseline); "h11": a connection per simulated user, as each browser has its own, the
    pollers with the lean :class:`H11Getter`, the subscribers with httpx
    (``benchmarks/load.py``: at 250 connections httpx's shared pool, which costs
    O(connections) per request, made this process the bottleneck, not the server)."""


async def load_worker(spec: LoadSpec) -> None:
    """The ``--load-worker`` subprocess: prints STARTED, then one JSON line of results."""
    polls = PollResults()
    streams = StreamResults()
    errors: list[str] = []
    timeout = httpx.Timeout(REQUEST_TIMEOUT, read=spec.seconds + REQUEST_TIMEOUT)
    lean: list[H11Getter] = []
    async with contextlib.AsyncExitStack() as stack:

        async def client(connections: int) -> httpx.AsyncClient:
            limits = httpx.Limits(max_connections=connections)
            http = httpx.AsyncClient(base_url=spec.url, limits=limits, timeout=timeout)
            return await stack.enter_async_context(http)

        getters: list[StatusGetter] = []
        sse_clients: list[httpx.AsyncClient] = []
        if spec.client == "h11":
            for _ in range(spec.pollers):
                lean.append(H11Getter(spec.url))
                stack.push_async_callback(lean[-1].close)
                getters.append(lean[-1])
            sse_clients = [await client(1) for _ in range(spec.subscribers)]
        else:
            shared = await client(spec.pollers + spec.subscribers + 10)
            getters = [httpx_getter(shared)] * spec.pollers
            sse_clients = [shared] * spec.subscribers
        print(STARTED, flush=True)
        began = time.monotonic()
        deadline = began + spec.seconds
        interval = spec.interval
        await asyncio.gather(
            *(
                _poller(
                    get,
                    deadline,
                    polls,
                    errors,
                    interval=interval,
                    phase=interval * i / len(getters),
                )
                for i, get in enumerate(getters)
            ),
            *(_subscriber(http, deadline, streams, errors) for http in sse_clients),
        )
        wall = time.monotonic() - began
    result = {
        "polls": len(polls.latencies),
        "polls_per_second": round(len(polls.latencies) / wall, 1),
        "poll_interval_s": spec.interval,
        "poll_client": spec.client,
        "reopened_connections": sum(getter.reopened for getter in lean),
        "late_polls": polls.late,
        "slow_polls": sorted(polls.slow),
        "poll_latency_s": percentiles(polls.latencies, 5),
        "sse_first_event_s": percentiles(streams.first, 5),
        "sse_events": sum(streams.events),
        "sse_reconnects_seen": sorted(streams.reconnects),
        "errors": len(errors),
        "error_messages": sorted(set(errors))[:20],
    }
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- the benchmark


@contextlib.asynccontextmanager
async def load_running(spec: LoadSpec) -> AsyncIterator[dict[str, Any]]:
    """The load worker process (``spec``), started before the block runs; after the block,
    waits for the worker and fills the yielded dict with its results. The worker is killed
    if anything goes wrong."""
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--load-worker",
        json.dumps(dataclasses.asdict(spec)),
        stdout=asyncio.subprocess.PIPE,
    )
    seconds = spec.seconds
    assert worker.stdout is not None
    results: dict[str, Any] = {}
    try:
        line = await asyncio.wait_for(worker.stdout.readline(), 60)
        if line.decode().strip() != STARTED:
            raise RuntimeError(f"the load worker did not start: {line!r}")
        yield results
        out = await asyncio.wait_for(worker.stdout.read(), seconds + 60)
        await asyncio.wait_for(worker.wait(), 30)
        results.update(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


async def run_load(seconds: float, pollers: int, subscribers: int) -> dict[str, Any]:
    async with streaming("scope-trio") as stream:
        print(f"unloaded: {seconds:g} s ...", flush=True)
        unloaded = await stream.measure(seconds)
        print(
            f"loaded: {pollers} pollers + {subscribers} SSE subscribers, {seconds:g} s ...",
            flush=True,
        )
        url = stream.server.url  # type: ignore[attr-defined]  # a ScopeTrioServer
        spec = LoadSpec(url, seconds + LEAD, pollers, subscribers)
        async with load_running(spec) as load:
            loaded: Window = await stream.measure(seconds)
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
        asyncio.run(load_worker(LoadSpec(**json.loads(sys.argv[2]))))
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
