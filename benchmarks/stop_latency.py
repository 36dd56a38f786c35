"""Stop latency with real sessions, and leaks over hundreds of start/stop/loss cycles.

The real stack in one process on loopback, with the real clock: the embedded dev cloud
(:func:`scope_trio.dev.devcloud.serve_devcloud`), a :class:`~scope_trio.cloud.CloudManager` with
its signaling link up, real :class:`~scope_trio.cloud.media.CloudMediaSession` peer connections
(aiortc under trio-asyncio, ICE consent tuned with :func:`scope_trio.rtc.tune_ice_consent`),
a 30 fps producer and an ``on_frame`` consumer. Faults go through the dev cloud's
``/control/faults`` API, or :meth:`CloudManager.simulate_media_loss` (the debug route's path).

Part 1, stop latency: ``CloudManager.stop_media()`` (the supervisor's ``stop()``) is timed
with the wall clock in five scenarios, ``--samples`` times each (default 30, ``--quick`` 4):

* ``connecting``: a start is making its first connect (stopped after a random 0-80 % of
  the median warm-up connect time);
* ``connected``: a session is connected and frames flow;
* ``backoff``: the cloud closed the peer connection, the supervisor waits before retrying;
* ``mid_attempt``: a reconnect attempt is under way (every other one has its offer stalled
  by the dev cloud, so the attempt is stuck awaiting the answer);
* ``blackholed``: connected, but the cloud's path went silent 0-0.5 s ago (before ICE consent
  notices), so closing happens over a dead path.

The phase the supervisor was actually in when ``stop`` was called is recorded too.

Part 2, leaks: ``--cycles`` start/stop/loss cycles (default 500, ``--quick`` 30), rotating
through: stop while connecting; lose the session by the debug route, by ``close_pc`` or by
a 1 s ``blackhole``, then stop 0-0.3 s later; a clean stop. Resources are counted once the
dev cloud is idle, after a warm-up cycle (first use creates lasting things: executor
threads, imports), and again at the end (allowed 10 s to settle): live
``RTCPeerConnection`` objects (gc scan, both sides, not ``closed``), file descriptors,
socket and UDP socket descriptors (``/proc/self/fd`` links matched with ``/proc/net/udp*``
inodes), asyncio tasks not done in our loop, and trio tasks outside the dev cloud's subtree.
Every count must return to its starting value.

``--check`` fails on any leak, on a stop p99 above the limit (``STOP_LIMIT`` s, the
supervisor's close bound), and, for the same configuration, on a p99 more than
``BASELINE_TOLERANCE`` times the baseline's plus 0.25 s (wall time varies).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio
from _common import (
    Checks,
    Report,
    command_line,
    conclude,
    config_key,
    make_parser,
    make_report,
)
from aiortc import RTCPeerConnection
from av import VideoFrame

from scope_trio import rtc
from scope_trio.cloud.manager import CloudManager, CloudSettings, LinkPolicy
from scope_trio.cloud.media import VideoInput
from scope_trio.core.supervisor import Phase, ReconnectPolicy, SupervisorError
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud, ws_url

BENCHMARK = "stop_latency"
SCENARIOS = ("connecting", "connected", "backoff", "mid_attempt", "blackholed")
FULL_SAMPLES, QUICK_SAMPLES = 30, 4
FULL_CYCLES, QUICK_CYCLES = 500, 30
STOP_LIMIT = 1.0
"""--check: every scenario's stop p99 must stay below this many seconds."""
BASELINE_TOLERANCE = 2.0
BASELINE_SLACK = 0.25
WAIT = 20.0
"""Deadline on every wait for the stack (a hang fails loudly instead of stalling the run)."""
SETTLE = 10.0
"""How long resources may take to return to their starting counts after the last stop."""

POLICY = ReconnectPolicy(stable_period=0.5, max_restarts=1_000_000)
"""Scope's reconnect policy (1 s, 2 s, 4 s; 3 attempts; 10 s attempt deadline), except that
the attempt budget refills after 0.5 s up and the restart-intensity cap is off, so every
measured loss starts from the same first backoff delay."""
LINK_POLICY = LinkPolicy(max_relinks=1_000_000)
"""Re-link after 1 s (the default), never giving up (a benchmark drops the link 20+ times)."""


# ---------------------------------------------------------------- the real stack


class FrameClock:
    """The ``on_frame`` consumer: timestamps every processed frame the cloud sends back."""

    def __init__(self) -> None:
        self.count = 0
        self.last_at = -math.inf
        self._next = trio.Event()
        self.listeners: list[Callable[[float], None]] = []

    def on_frame(self, frame: VideoFrame) -> None:
        now = trio.current_time()
        self.count += 1
        self.last_at = now
        for listener in list(self.listeners):
            listener(now)
        self._next.set()
        self._next = trio.Event()

    async def next_frame(self) -> float:
        with trio.fail_after(WAIT):
            await self._next.wait()
        return self.last_at


@dataclass
class Rig:
    manager: CloudManager
    http: httpx.AsyncClient
    video: VideoInput
    frames: FrameClock
    loop: asyncio.AbstractEventLoop
    nursery: trio.Nursery
    unhandled: list[str] = field(default_factory=list)
    """Errors of asyncio tasks nobody awaited (aiortc's), recorded instead of letting
    trio-asyncio re-raise them into the loop's nursery, which ends the whole run."""
    connect_seconds: float = 0.1
    """How long a first connect took in the warm-up: stops while connecting land inside it."""

    async def control(self, action: str, **fields: Any) -> None:
        response = await self.http.post("/control/faults", json={"action": action, **fields})
        if response.status_code != 200:
            raise RuntimeError(f"fault {action} refused: {response.text}")

    async def cloud_state(self) -> dict[str, Any]:
        response = await self.http.get("/control/state")
        result: dict[str, Any] = response.json()
        return result

    async def until(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = WAIT,  # noqa: ASYNC109 - a deadline on a wait, not an API option
    ) -> tuple[dict[str, Any], float]:
        """The first CloudStatus satisfying ``predicate`` and when it was seen (no polling)."""
        with trio.fail_after(timeout):
            while True:
                seen = self.manager.version
                status = self.manager.status()
                if predicate(status):
                    return status, trio.current_time()
                await self.manager.wait_change(seen)

    async def phase(self, *phases: Phase) -> float:
        """Wait until the supervisor is in one of ``phases``; when it was seen."""
        with trio.fail_after(WAIT):
            await self.manager.supervisor.wait_until(lambda s: s.phase in phases)
        return trio.current_time()

    async def start_media(self) -> None:
        await self.manager.start_media(
            {"prompts": ["bench"]}, video_input=self.video, on_frame=self.frames.on_frame
        )

    async def connected_with_frames(self) -> None:
        """A connected session whose processed frames are arriving."""
        if not self.manager.supervisor.status.webrtc_connected:
            with trio.fail_after(WAIT):
                await self.start_media()
        await self.frames.next_frame()

    async def cloud_idle(self) -> None:
        """Wait (polling the dev cloud's state, it lives on the other side) until the dev
        cloud has no peer connection left and only our signaling link."""
        with trio.fail_after(WAIT):
            while True:
                state = await self.cloud_state()
                if state["peer_connections"] == 0 and state["ws_connections"] == 1:
                    return
                await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def open_rig() -> AsyncIterator[Rig]:
    """The dev cloud, a connected CloudManager, a producer; torn down in order."""
    saved = rtc.tune_ice_consent()
    try:
        async with rtc.open_loop() as loop, trio.open_nursery() as outer:
            base_url = await outer.start(partial(serve_devcloud, DevCloudConfig()))
            async with (
                httpx.AsyncClient(base_url=base_url) as http,
                CloudManager.open(
                    CloudSettings(ws_url=ws_url(base_url)), policy=POLICY, link_policy=LINK_POLICY
                ) as manager,
                trio.open_nursery() as nursery,
            ):
                video = VideoInput()

                async def produce() -> None:
                    frame = rtc.black_frame(64, 48)
                    while True:
                        video.push(frame)
                        await trio.sleep(1 / 30)

                nursery.start_soon(produce)
                assert isinstance(loop, asyncio.AbstractEventLoop)
                r = Rig(manager, http, video, FrameClock(), loop, nursery)

                def unhandled(_: object, context: dict[str, Any]) -> None:
                    error = context.get("exception")
                    r.unhandled.append(repr(error) if error else str(context.get("message")))

                loop.set_exception_handler(unhandled)
                try:
                    await manager.connect()
                    await r.until(lambda s: s["connected"])
                    yield r
                finally:
                    with trio.move_on_after(30, shield=True):
                        await manager.disconnect()
                    nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        rtc.tune_ice_consent(saved.interval, saved.failures, saved.rto)


@contextlib.contextmanager
def quiet_logs() -> Any:
    """Thousands of expected losses: keep scope_trio, aiortc and aioice out of the output."""
    names = ("scope_trio", "aiortc", "aioice", "hypercorn", "trio-asyncio", "asyncio")
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


# ---------------------------------------------------------------- resources


def _socket_inodes() -> tuple[int, set[str]]:
    """(open file descriptors, inodes of the socket ones)."""
    fds, inodes = 0, set()
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory's own descriptor, closed by now
        fds += 1
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    return fds, inodes


def _udp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines, None)
            for line in lines:
                fields = line.split()
                if len(fields) > 9:
                    inodes.add(fields[9])
    return inodes


def trio_tasks() -> int:
    """Trio tasks in this run, except the dev cloud's subtree (the other side, in-process)."""

    def walk(task: trio.lowlevel.Task) -> int:
        if "serve_devcloud" in task.name:
            return 0
        children = (child for nursery in task.child_nurseries for child in nursery.child_tasks)
        return 1 + sum(walk(child) for child in children)

    root = trio.lowlevel.current_root_task()
    return 0 if root is None else walk(root)


def live_peer_connections() -> int:
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, RTCPeerConnection) and o.connectionState != "closed"
    )


RESOURCES = ("peer_connections", "fds", "sockets", "udp_sockets", "asyncio_tasks", "trio_tasks")


def count_resources(loop: asyncio.AbstractEventLoop) -> dict[str, int]:
    fds, sockets = _socket_inodes()
    return {
        "peer_connections": live_peer_connections(),
        "fds": fds,
        "sockets": len(sockets),
        "udp_sockets": len(sockets & _udp_inodes()),
        "asyncio_tasks": sum(1 for task in asyncio.all_tasks(loop) if not task.done()),
        "trio_tasks": trio_tasks(),
    }


async def settled_resources(r: Rig, start: dict[str, int]) -> dict[str, int]:
    """Counts once the dev cloud is idle; up to SETTLE s for them to reach ``start``."""
    await r.cloud_idle()
    with trio.move_on_after(SETTLE):
        while True:
            now = count_resources(r.loop)
            if all(now[k] <= start[k] for k in RESOURCES):
                return now
            await trio.sleep(0.1)
    return count_resources(r.loop)


# ---------------------------------------------------------------- stop latency


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, p50, p95, p99 and max (nearest rank: every figure is a value that occurred)."""
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 4)

    return {
        "count": len(ordered),
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": rank(1.0),
    }


async def _start_quietly(r: Rig) -> None:
    """A start that a stop supersedes raises StartAbortedError: expected here."""
    with contextlib.suppress(SupervisorError):
        await r.start_media()


async def timed_stop(r: Rig) -> tuple[float, str]:
    phase = r.manager.supervisor.status.phase.value
    began = trio.current_time()
    await r.manager.stop_media()
    return trio.current_time() - began, phase


async def stop_in(r: Rig, scenario: str, index: int, rng: random.Random) -> tuple[float, str]:
    """Bring the stack into ``scenario``, stop, return (wall seconds, phase at the call)."""
    if scenario == "connecting":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_start_quietly, r)
            await r.phase(Phase.CONNECTING)
            await trio.sleep(rng.uniform(0, 0.8 * r.connect_seconds))
            return await timed_stop(r)
    await r.connected_with_frames()
    if scenario == "connected":
        await trio.sleep(rng.uniform(0, 0.2))
    elif scenario == "backoff":
        await r.control("close_pc")
        await r.phase(Phase.BACKOFF)
        await trio.sleep(rng.uniform(0, 0.8))  # the first backoff delay is 1 s
    elif scenario == "mid_attempt":
        if index % 2:
            await r.control("stall_offers", count=1)
        await r.control("close_pc")
        await r.phase(Phase.RECONNECTING)
        await trio.sleep(rng.uniform(0, 0.3 if index % 2 else 0.05))
    elif scenario == "blackholed":
        await r.control("blackhole", seconds=3, scope="existing")
        await trio.sleep(rng.uniform(0, 0.5))
    else:  # pragma: no cover - SCENARIOS is closed
        raise ValueError(scenario)
    try:
        return await timed_stop(r)
    finally:
        await r.control("clear")


async def measure_stops(r: Rig, samples: int, rng: random.Random) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    phases: dict[str, Counter[str]] = {name: Counter() for name in SCENARIOS}
    for index in range(samples):
        for scenario in SCENARIOS:
            latency, phase = await stop_in(r, scenario, index, rng)
            latencies[scenario].append(latency)
            phases[scenario][phase] += 1
    every = [value for values in latencies.values() for value in values]
    return {
        "all": percentiles(every),
        "by_scenario": {
            name: {**percentiles(latencies[name]), "phase_at_stop": dict(phases[name])}
            for name in SCENARIOS
        },
    }


# ---------------------------------------------------------------- cycles


CYCLE_KINDS = ("stop_connecting", "debug_loss", "close_pc", "blackhole", "clean")


async def cycle(r: Rig, index: int, rng: random.Random) -> str:
    kind = CYCLE_KINDS[index % len(CYCLE_KINDS)]
    if kind == "stop_connecting":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_start_quietly, r)
            await r.phase(Phase.CONNECTING)
            await trio.sleep(rng.uniform(0, 0.8 * r.connect_seconds))
            await r.manager.stop_media()
        return kind
    with trio.fail_after(WAIT):
        await r.start_media()
    if kind == "debug_loss":
        await r.manager.simulate_media_loss()
    elif kind == "close_pc":
        await r.control("close_pc")
    elif kind == "blackhole":
        await r.control("blackhole", seconds=1, scope="existing")
    await trio.sleep(rng.uniform(0, 0.3))
    await r.manager.stop_media()
    return kind


async def run_cycles(r: Rig, cycles: int, rng: random.Random) -> dict[str, Any]:
    kinds: Counter[str] = Counter()
    for index in range(cycles):
        kinds[await cycle(r, index, rng)] += 1
    await r.control("clear")
    return {"cycles": cycles, "by_kind": dict(kinds)}


# ---------------------------------------------------------------- the run


async def bench(samples: int, cycles: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    began = time.perf_counter()
    async with open_rig() as r:
        # Warm up: the first session creates lasting things (executor threads, codecs).
        connects = []
        for _ in range(3):
            connecting = trio.current_time()
            await r.start_media()
            connects.append(trio.current_time() - connecting)
            await r.frames.next_frame()
            await r.manager.stop_media()
        r.connect_seconds = sorted(connects)[1]
        await r.cloud_state()  # the control API's keep-alive connection, opened already
        start = await settled_resources(r, dict.fromkeys(RESOURCES, 0))
        stops = await measure_stops(r, samples, rng)
        stops_wall = time.perf_counter() - began
        cycle_results = await run_cycles(r, cycles, rng)
        end = await settled_resources(r, start)
        sessions = r.manager.media_stats.offers_successful
        unhandled = list(r.unhandled)
    wall = time.perf_counter() - began
    leaks = {k: end[k] - start[k] for k in RESOURCES}
    return {
        "samples_per_scenario": samples,
        "stop_latency_s": stops,
        "cycles": cycle_results,
        "sessions_connected": sessions,
        "resources_start": start,
        "resources_end": end,
        "leaks": leaks,
        "leaked": sum(max(0, v) for v in leaks.values()),
        "asyncio_unhandled_errors": len(unhandled),
        "asyncio_unhandled_examples": sorted(set(unhandled))[:5],
        "stops_wall_seconds": round(stops_wall, 1),
        "wall_seconds": round(wall, 1),
    }


def _s(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary(results: dict[str, Any]) -> str:
    lines = [
        f"stop_latency: {results['samples_per_scenario']} stops per scenario, "
        f"{results['cycles']['cycles']} start/stop/loss cycles, "
        f"{results['sessions_connected']} sessions connected, wall {results['wall_seconds']} s",
        "",
        f"{'stop called in':<16}{'count':>6}{'p50 s':>9}{'p99 s':>9}{'max s':>9}  phase at stop",
    ]
    latency = results["stop_latency_s"]
    for name, stats in [("all", latency["all"]), *latency["by_scenario"].items()]:
        phases = ", ".join(f"{p} {n}" for p, n in sorted(stats.get("phase_at_stop", {}).items()))
        lines.append(
            f"  {name:<14}{stats['count']:>6}{_s(stats['p50']):>9}{_s(stats['p99']):>9}"
            f"{_s(stats['max']):>9}  {phases}"
        )
    lines += ["", f"{'resource':<18}{'start':>7}{'end':>7}{'leak':>6}"]
    for name in RESOURCES:
        lines.append(
            f"  {name:<16}{results['resources_start'][name]:>7}"
            f"{results['resources_end'][name]:>7}{results['leaks'][name]:>+6}"
        )
    lines.append(
        f"unhandled asyncio task errors: {results['asyncio_unhandled_errors']} "
        f"{results['asyncio_unhandled_examples']}"
    )
    return "\n".join(lines)


def check(report: Report, baselines: dict[str, Report]) -> Checks:
    results = report["results"]
    checks = Checks()
    for name in RESOURCES:
        leak = results["leaks"][name]
        checks.add(f"leak {name}", f"{leak:+d}", "-", "<= 0", leak <= 0)
    errors = results["asyncio_unhandled_errors"]
    checks.add("unhandled asyncio errors", str(errors), "-", "0", errors == 0)
    same = baselines.get(config_key(report["config"]))
    for name in ("all", *SCENARIOS):
        latency = results["stop_latency_s"]
        stats = latency["all"] if name == "all" else latency["by_scenario"][name]
        p99 = stats["p99"]
        checks.add(
            f"stop p99 {name} (s)",
            _s(p99),
            "-",
            f"< {STOP_LIMIT:g}",
            p99 is not None and p99 < STOP_LIMIT,
        )
        if same is None:
            continue
        base = same["results"]["stop_latency_s"]
        base_stats = base["all"] if name == "all" else base["by_scenario"].get(name, {})
        base_p99 = base_stats.get("p99")
        if p99 is None or base_p99 is None:
            continue
        limit = BASELINE_TOLERANCE * base_p99 + BASELINE_SLACK
        checks.add(
            f"stop p99 {name} vs baseline (s)",
            _s(p99),
            _s(base_p99),
            f"<= {limit:.3f}",
            p99 <= limit,
        )
    if same is None:
        checks.add("baseline", "-", "none", "same config only", None)
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(BENCHMARK, __doc__ or "")
    parser.add_argument(
        "--samples",
        type=int,
        help=f"stops per scenario (default: {FULL_SAMPLES}; --quick: {QUICK_SAMPLES})",
    )
    parser.add_argument(
        "--cycles",
        type=int,
        help=f"start/stop/loss cycles (default: {FULL_CYCLES}; --quick: {QUICK_CYCLES})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the random waits")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    samples = args.samples or (QUICK_SAMPLES if args.quick else FULL_SAMPLES)
    cycles = (
        args.cycles if args.cycles is not None else (QUICK_CYCLES if args.quick else FULL_CYCLES)
    )
    if samples < 1 or cycles < 0:
        parser.error("--samples must be at least 1 and --cycles at least 0")

    with quiet_logs():
        results = trio.run(bench, samples, cycles, args.seed)
    config = {"samples": samples, "cycles": cycles}
    report = make_report(BENCHMARK, command_line("stop_latency.py", argv), config, results)
    failure = None
    if results["leaked"]:
        failure = f"leaked: {results['leaks']}"
    elif results["asyncio_unhandled_errors"]:
        failure = f"{results['asyncio_unhandled_errors']} unhandled asyncio errors"
    return conclude(args, report, summary(results), check, failure=failure)


if __name__ == "__main__":
    sys.exit(main())
