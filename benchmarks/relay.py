"""Relay benchmark: browser → relay → dev cloud → relay → browser, scope-trio against asyncio.

A "browser" (a plain-asyncio aiortc peer in this process; it is not what is measured) sends
512x512 video at 30 fps and receives the relayed video back. Every frame carries its own
number as a 4x4 grid of black and white 128-pixel blocks (12 bits of counter and 4 check
bits, robust to lossy VP8; a black, white or garbled frame fails the check), and the
browser keeps a table of when each number left its camera track. Per run it reports:

* delivered fps: distinct frame numbers that came back, per second of the window;
* latency per frame: receive time - send time of each number (camera → encode → relay →
  cloud → relay → decode), p50 / p99 / mean;
* CPU seconds per frame of the server process: utime + stime from ``/proc/<pid>/stat`` over
  the window, divided by the frames delivered in it (Linux only).

Two servers with the same topology and the same media path run as subprocesses, so each CPU
figure is exactly one server process (relay plus its embedded cloud, as in ``scope-trio
serve`` with no cloud configured):

* ``scope-trio``: ``python -m scope_trio serve --port 0`` (trio + trio-asyncio, Quart, the
  embedded dev cloud with the passthrough pipeline). The browser signals through the HTTP
  API (``POST /api/v1/cloud/connect``, ``POST /api/v1/webrtc/offer``); the relay reaches the
  dev cloud through its WebSocket protocol.
* ``asyncio``: this script with ``--serve-reference``: a plain-asyncio aiortc relay with its
  own aiortc "cloud" peer in the same process, signalled directly (no WebSocket, no HTTP:
  signaling is set-up cost, not per-frame cost). Browser offer and answer go over the
  subprocess's stdin/stdout. Media path: browser pc → relay pc (answer) → decode → relay's
  own pc to the cloud (offer) → cloud pc: decode, passthrough, encode → relay pc → decode →
  browser pc. Its outbound tracks are :class:`TickedVideoSource` (newest frame only, sent on
  a fixed 30 fps tick) and its receivers keep aiortc's own jitter buffer: it is the plain
  aiortc relay, as scope-trio itself was before issue 13 (scope-trio now releases frames when
  whole and forwards them at once: ``scope_trio.rtc.receiver``, ``rtc.TrioVideoSource``).
  ICE consent timing is tuned the same way in both (``rtc.tune_ice_consent``).

Each round measures both servers, alternating which goes first (round 1: scope-trio first,
round 2: asyncio first, ...). Ratios are scope-trio / asyncio over all rounds: CPU per frame
(> 1: trio-asyncio costs more), delivered fps, latency p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import math
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from scope_trio import rtc

BENCHMARK = "relay"
SCRIPT = Path(__file__).resolve()
WIDTH = HEIGHT = 512
FPS = 30.0
GRID, BLOCK = 4, 128
COUNTER_MASK = 0xFFF
FULL_SECONDS, QUICK_SECONDS = 30.0, 5.0
FULL_ROUNDS, QUICK_ROUNDS = 2, 1
SYSTEMS = ("scope-trio", "asyncio")

SETTLE = 1.0
"""Seconds between the first frame back and the start of the measured window."""
GRACE = 1.0
"""Seconds after the window in which late frames still count for latency."""
START_TIMEOUT = 60.0
FIRST_FRAME_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
READY = "reference relay ready"
URL_LINE = re.compile(r"^scope-trio: .*?(http://[^\s;]+)")
"""The line ``scope-trio serve`` prints once it serves (embedded dev cloud or not)."""
DEVCLOUD_LINE = re.compile(r"\(signaling: (ws://[^\s)]+)\)")
"""The line ``scope-trio devcloud`` prints once it serves."""

FPS_RATIO_FLOOR = 0.8
"""--check: scope-trio's delivered fps must be at least this fraction of asyncio's."""
CPU_RATIO_SLACK = 1.5
"""--check: the CPU-per-frame ratio may grow to this multiple of the baseline's."""
FPS_BASELINE_FLOOR = 0.7
LATENCY_SLACK, LATENCY_ALLOWANCE = 2.0, 0.020
"""--check: latency p50 may grow to 2x the baseline's + 20 ms (wall clock varies)."""

_ON, _OFF = 235, 16
_TIME_BASE = fractions.Fraction(1, 90_000)


# ---------------------------------------------------------------- frames with a number


def _check_bits(n: int) -> int:
    """4 check bits; 0x5 makes an all-black (and an all-white) frame invalid."""
    return (n ^ (n >> 4) ^ (n >> 8) ^ 0x5) & 0xF


def counter_frame(n: int) -> VideoFrame:
    """A 512x512 yuv420p frame whose 16 blocks spell ``n`` (12 bits) and its check bits."""
    n &= COUNTER_MASK
    value = n | (_check_bits(n) << 12)
    frame = VideoFrame(width=WIDTH, height=HEIGHT, format="yuv420p")
    luma = frame.planes[0]
    on, off = bytes([_ON]) * BLOCK, bytes([_OFF]) * BLOCK
    pad = bytes(luma.line_size - WIDTH)
    band = []
    for r in range(GRID):
        row = b"".join(on if value >> (r * GRID + c) & 1 else off for c in range(GRID)) + pad
        band.append(row * BLOCK)
    luma.update(b"".join(band))
    for chroma in frame.planes[1:]:
        chroma.update(bytes([128]) * chroma.buffer_size)
    return frame


def luma_of(frame: VideoFrame) -> bytes:
    """The luma plane of a frame, rows without padding."""
    if frame.format.name != "yuv420p" or frame.width != WIDTH or frame.height != HEIGHT:
        frame = frame.reformat(width=WIDTH, height=HEIGHT, format="yuv420p")
    plane = frame.planes[0]
    data, stride = bytes(plane), plane.line_size
    return b"".join(data[y * stride : y * stride + WIDTH] for y in range(HEIGHT))


def psnr(a: bytes, b: bytes) -> float:
    """Luma PSNR in dB of two equally sized planes (99 for identical ones)."""
    sse = sum((x - y) * (x - y) for x, y in zip(a, b, strict=True))
    return 99.0 if sse == 0 else 10 * math.log10(255 * 255 * len(a) / sse)


def read_counter(frame: VideoFrame) -> int | None:
    """The number a received frame carries, or None (black, held, garbled)."""
    if frame.format.name != "yuv420p" or frame.width != WIDTH or frame.height != HEIGHT:
        frame = frame.reformat(width=WIDTH, height=HEIGHT, format="yuv420p")
    luma = frame.planes[0]
    data, stride = bytes(luma), luma.line_size
    value = 0
    for r in range(GRID):
        for c in range(GRID):
            cy, cx = r * BLOCK + BLOCK // 2, c * BLOCK + BLOCK // 2
            total = count = 0
            for y in range(cy - 24, cy + 24, 8):
                sample = data[y * stride + cx - 24 : y * stride + cx + 24]
                total += sum(sample)
                count += len(sample)
            if total > 128 * count:
                value |= 1 << (r * GRID + c)
    n = value & COUNTER_MASK
    return n if value >> 12 == _check_bits(n) else None


class CounterCamera(MediaStreamTrack):
    """The browser's camera: numbered frames at ``FPS``; remembers when each one left."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[int, float] = {}
        self._count = 0
        self._t0: float | None = None

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        due = self._t0 + self._count / FPS
        if due > now:
            await asyncio.sleep(due - now)
        self._count += 1
        frame = counter_frame(self._count)
        frame.pts = self._count * int(90_000 / FPS)
        frame.time_base = _TIME_BASE
        self.sent[self._count & COUNTER_MASK] = time.monotonic()
        return frame


# ---------------------------------------------------------------- statistics


def percentiles(values: Sequence[float], digits: int = 4) -> dict[str, float | int | None]:
    """count, p50, p99, max (nearest rank) and mean."""
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], digits)

    return {
        "count": len(ordered),
        "p50": rank(0.5),
        "p99": rank(0.99),
        "max": rank(1.0),
        "mean": round(sum(ordered) / len(ordered), digits),
    }


def ratio(a: float | int | None, b: float | int | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/<pid>/stat (Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return ticks / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the browser


@dataclass
class Window:
    """What one measured window saw."""

    seconds: float
    frames_received: int
    frames_delivered: int
    unreadable: int
    sent: int
    lost: int
    latencies: list[float]
    cpu: float

    def summary(self) -> dict[str, Any]:
        return {
            "window_seconds": round(self.seconds, 3),
            "frames_sent": self.sent,
            "frames_delivered": self.frames_delivered,
            "frames_received": self.frames_received,
            "unreadable_frames": self.unreadable,
            "frames_lost": self.lost,
            "delivered_fps": round(self.frames_delivered / self.seconds, 2),
            "received_fps": round(self.frames_received / self.seconds, 2),
            "latency_s": percentiles(self.latencies),
            "server_cpu_seconds": round(self.cpu, 3),
            "cpu_ms_per_frame": (
                round(1000 * self.cpu / self.frames_delivered, 3) if self.frames_delivered else None
            ),
        }


@dataclass
class Browser:
    """The browser's peer connection and every frame it got back (time, number)."""

    pc: RTCPeerConnection
    camera: CounterCamera
    arrivals: list[tuple[float, int | None]] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    keep_every: int = 0
    """Keep the luma of the first arrival of every ``keep_every``-th number (0: none)."""
    kept: dict[int, bytes] = field(default_factory=dict)

    def on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            task = asyncio.ensure_future(self._receive(track))
            self.tasks.add(task)

    async def _receive(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            n = read_counter(frame) if isinstance(frame, VideoFrame) else None
            self.arrivals.append((time.monotonic(), n))
            if n is not None and self.keep_every and n % self.keep_every == 0:
                self.kept.setdefault(n, luma_of(frame))
            if n is not None:
                self.first.set()

    def window(self, start: float, end: float, cpu: float) -> Window:
        first_seen: dict[int, float] = {}
        received = unreadable = 0
        for at, n in self.arrivals:
            if start <= at <= end:
                received += 1
                unreadable += n is None
            if n is not None and n not in first_seen:
                first_seen[n] = at
        delivered = sum(1 for at in first_seen.values() if start <= at <= end)
        sent = {n: t for n, t in self.camera.sent.items() if start <= t <= end}
        latencies = [first_seen[n] - t for n, t in sent.items() if n in first_seen]
        return Window(
            seconds=end - start,
            frames_received=received,
            frames_delivered=delivered,
            unreadable=unreadable,
            sent=len(sent),
            lost=len(sent) - len(latencies),
            latencies=latencies,
            cpu=cpu,
        )


# ---------------------------------------------------------------- the servers


class Server:
    """A relay server subprocess: start it, offer to it, stop it."""

    name = ""
    prefix: tuple[str, ...] = ()
    """Arguments before the server's own (``latency.py``: its stage tracer)."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.log: deque[str] = deque(maxlen=40)
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def _spawn(self, *args: str, stdin: int | None = None) -> asyncio.subprocess.Process:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in ("SCOPE_CLOUD_APP_ID", "SCOPE_CLOUD_WS_URL", "SCOPE_CLOUD_API_KEY"):
            env.pop(name, None)  # both servers use their embedded cloud
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.prefix,
            *args,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        assert self.proc.stderr is not None
        self._drain = asyncio.ensure_future(self._keep_log(self.proc.stderr))
        return self.proc

    async def _keep_log(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.log.append(line.decode(errors="replace").rstrip())

    async def _line(self) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} server exited early:\n" + "\n".join(self.log))
        return line.decode(errors="replace").rstrip()

    async def start(self) -> None:
        raise NotImplementedError

    async def offer(self, sdp: str) -> str:
        raise NotImplementedError

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drain, 5)


class DevCloudProcess(Server):
    """``python -m scope_trio devcloud --port 0``, passthrough: the cloud in its own process."""

    name = "devcloud"

    def __init__(self) -> None:
        super().__init__()
        self.ws_url = ""

    async def start(self) -> None:
        await self._spawn(
            "-m", "scope_trio", "devcloud", "--port", "0", "--pipeline", "passthrough"
        )
        while not (match := DEVCLOUD_LINE.search(await self._line())):
            pass
        self.ws_url = match.group(1)


class ScopeTrioServer(Server):
    """``python -m scope_trio serve --port 0``: the embedded dev cloud, passthrough, or with
    ``cloud`` the dev cloud as a process of its own (as the real cloud is elsewhere: the
    server process then does only the relay's work)."""

    name = "scope-trio"

    def __init__(self, cloud: DevCloudProcess | None = None) -> None:
        super().__init__()
        self.url = ""
        self.http: httpx.AsyncClient | None = None
        self.cloud = cloud

    async def start(self) -> None:
        cloud_args: list[str] = []
        if self.cloud is not None:
            await self.cloud.start()
            cloud_args = ["--cloud-ws-url", self.cloud.ws_url]
        await self._spawn(
            "-m",
            "scope_trio",
            "serve",
            "--port",
            "0",
            "--log-level",
            "WARNING",
            "--devcloud-pipeline",
            "passthrough",  # the same media work as the reference
            *cloud_args,
        )
        while not (match := URL_LINE.search(await self._line())):
            pass
        self.url = match.group(1)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=30)
        response = await self.http.post("/api/v1/cloud/connect")
        response.raise_for_status()
        deadline = time.monotonic() + START_TIMEOUT
        while not (await self.http.get("/api/v1/cloud/status")).json()["connected"]:
            if time.monotonic() > deadline:
                raise RuntimeError("scope-trio did not connect to its dev cloud")
            await asyncio.sleep(0.05)

    async def offer(self, sdp: str) -> str:
        assert self.http is not None
        response = await self.http.post("/api/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
        if response.status_code != 200:
            raise RuntimeError(f"offer refused: {response.status_code} {response.text}")
        answer: str = response.json()["sdp"]
        return answer

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        await super().stop()
        if self.cloud is not None:
            await self.cloud.stop()


class ReferenceServer(Server):
    """``python benchmarks/relay.py --serve-reference``: the plain-asyncio relay."""

    name = "asyncio"

    async def start(self) -> None:
        await self._spawn(str(SCRIPT), "--serve-reference", stdin=asyncio.subprocess.PIPE)
        while await self._line() != READY:
            pass

    async def offer(self, sdp: str) -> str:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"sdp": sdp}).encode() + b"\n")
        await self.proc.stdin.drain()
        answer: str = json.loads(await self._line())["sdp"]
        return answer

    async def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF: the reference closes its peers and exits
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        await super().stop()


def make_server(system: str, *, separate_cloud: bool = False) -> Server:
    if system != "scope-trio":
        return ReferenceServer()
    return ScopeTrioServer(DevCloudProcess() if separate_cloud else None)


class Stream:
    """One browser streaming through one server; :meth:`measure` takes a window."""

    def __init__(self, server: Server, browser: Browser) -> None:
        self.server = server
        self.browser = browser

    async def measure(self, seconds: float) -> Window:
        start, cpu0 = time.monotonic(), cpu_seconds(self.server.pid)
        await asyncio.sleep(seconds)
        end, cpu1 = time.monotonic(), cpu_seconds(self.server.pid)
        await asyncio.sleep(GRACE)  # frames sent at the end of the window still arrive
        return self.browser.window(start, end, cpu1 - cpu0)


@contextlib.asynccontextmanager
async def streaming(
    system: str,
    *,
    separate_cloud: bool = False,
    prefix: tuple[str, ...] = (),
    keep_every: int = 0,
) -> AsyncIterator[Stream]:
    """Start ``system``'s server, connect a browser, wait for frames back (and settle).

    ``separate_cloud``: scope-trio's dev cloud runs as a process of its own. ``prefix``:
    arguments before the server's own on its command line (``latency.py``'s tracer).
    ``keep_every``: see :attr:`Browser.keep_every` (for PSNR).
    """
    server = make_server(system, separate_cloud=separate_cloud)
    server.prefix = prefix
    pc = RTCPeerConnection()
    camera = CounterCamera()
    browser = Browser(pc, camera, keep_every=keep_every)
    try:
        await asyncio.wait_for(server.start(), START_TIMEOUT)
        pc.on("track", browser.on_track)
        pc.addTrack(camera)
        await pc.setLocalDescription(await pc.createOffer())
        answer = await asyncio.wait_for(server.offer(pc.localDescription.sdp), START_TIMEOUT)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        try:
            await asyncio.wait_for(browser.first.wait(), FIRST_FRAME_TIMEOUT)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"{system}: no numbered frame came back within {FIRST_FRAME_TIMEOUT:g} s "
                f"({len(browser.arrivals)} frames)\n" + "\n".join(server.log)
            ) from None
        await asyncio.sleep(SETTLE)
        yield Stream(server, browser)
    finally:
        camera.stop()
        await asyncio.wait_for(pc.close(), STOP_TIMEOUT)
        for task in browser.tasks:
            task.cancel()
        await server.stop()


# ---------------------------------------------------------------- the reference relay


class TickedVideoSource(rtc.TrioVideoSource):
    """The reference's outbound track: newest frame only, sent on a fixed ``fps`` tick.

    That is how :class:`scope_trio.rtc.TrioVideoSource` sent until it learned to forward a
    frame at once (issue 13); the reference keeps the tick so that it stays the plain
    aiortc relay every earlier figure was measured against (a typical asyncio relay paces
    its outbound track the same way, as aiortc's own ``VideoStreamTrack`` does).
    """

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = self._next_slot = now
        if self._next_slot > now:
            await asyncio.sleep(self._next_slot - now)
        if await self._wait_for_input():  # idle: a black frame is due
            frame = rtc.black_frame(*self._size)
        else:
            self._skip(len(self._queue) - 1)  # the newest frame only, as aiortc relays do
            frame = self._queue.popleft()[1]
        now = time.monotonic()
        self._next_slot = max(self._next_slot + self._interval, now)
        pts = max(int((now - self._t0) * 90_000), self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = _TIME_BASE
        self.frames_sent += 1
        return frame


class ReferenceRelay:
    """Plain asyncio: browser pc (answer) → own pc to an in-process cloud pc (offer) → back."""

    def __init__(self) -> None:
        self.browser_pc = RTCPeerConnection()
        self.cloud_link = RTCPeerConnection()  # the relay's side of the cloud session
        self.cloud_pc = RTCPeerConnection()  # the cloud's side
        self.to_cloud = TickedVideoSource(fps=FPS, idle_timeout=None)
        self.cloud_out = TickedVideoSource(fps=FPS, idle_timeout=None)
        self.to_browser = TickedVideoSource(fps=FPS, idle_timeout=None)
        self.tasks: set[asyncio.Task[None]] = set()

    def _pump(self, track: MediaStreamTrack, sink: Callable[[VideoFrame], None]) -> None:
        async def run() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                if isinstance(frame, VideoFrame):
                    sink(frame)

        if track.kind == "video":
            self.tasks.add(asyncio.ensure_future(run()))

    async def answer(self, sdp: str) -> str:
        # The cloud session: the relay offers, the cloud answers and sends every frame back.
        self.cloud_pc.on("track", lambda track: self._pump(track, self.cloud_out.push))
        self.cloud_link.on("track", lambda track: self._pump(track, self.to_browser.push))
        self.cloud_link.addTrack(self.to_cloud)
        await self.cloud_link.setLocalDescription(await self.cloud_link.createOffer())
        await self.cloud_pc.setRemoteDescription(self.cloud_link.localDescription)
        self.cloud_pc.addTrack(self.cloud_out)
        await self.cloud_pc.setLocalDescription(await self.cloud_pc.createAnswer())
        await self.cloud_link.setRemoteDescription(self.cloud_pc.localDescription)
        # The browser session: its video goes to the cloud, the cloud's comes back.
        self.browser_pc.on("track", lambda track: self._pump(track, self.to_cloud.push))
        await self.browser_pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        self.browser_pc.addTrack(self.to_browser)
        await self.browser_pc.setLocalDescription(await self.browser_pc.createAnswer())
        answer: str = self.browser_pc.localDescription.sdp
        return answer

    async def close(self) -> None:
        for track in (self.to_cloud, self.cloud_out, self.to_browser):
            track.stop()
        for pc in (self.browser_pc, self.cloud_link, self.cloud_pc):
            await asyncio.wait_for(pc.close(), 10)
        for task in self.tasks:
            task.cancel()


async def serve_reference() -> None:
    """The ``--serve-reference`` subprocess: one offer in on stdin, its answer out on stdout;
    streams until stdin closes (or SIGINT)."""
    rtc.tune_ice_consent()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print(READY, flush=True)
    line = await stdin.readline()
    if not line:
        return
    relay = ReferenceRelay()
    try:
        answer = await relay.answer(json.loads(line)["sdp"])
        print(json.dumps({"sdp": answer}), flush=True)
        while await stdin.read(4096):
            pass
    finally:
        await relay.close()


# ---------------------------------------------------------------- the benchmark


async def run_rounds(seconds: float, rounds: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    windows: dict[str, list[Window]] = {system: [] for system in SYSTEMS}
    errors: list[str] = []
    for index in range(rounds):
        order = SYSTEMS if index % 2 == 0 else SYSTEMS[::-1]
        for system in order:
            print(f"round {index + 1}/{rounds}: {system} for {seconds:g} s ...", flush=True)
            try:
                async with streaming(system) as stream:
                    window = await stream.measure(seconds)
            except Exception as exc:  # a failed stream is reported as an error, the rest go on
                errors.append(f"round {index + 1} {system}: {type(exc).__name__}: {exc}")
                print(f"  ERROR {errors[-1]}", flush=True)
                continue
            windows[system].append(window)
            runs.append({"round": index + 1, "system": system, **window.summary()})
            if window.frames_delivered == 0:
                errors.append(f"round {index + 1} {system}: no frame delivered")
    totals = {system: combine(windows[system]) for system in SYSTEMS}
    ours, theirs = totals["scope-trio"], totals["asyncio"]
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "target_fps": FPS,
        "seconds": seconds,
        "rounds": rounds,
        "errors": len(errors),
        "error_messages": errors[:20],
        "systems": totals,
        "ratios": {
            "cpu_per_frame": ratio(ours["cpu_ms_per_frame"], theirs["cpu_ms_per_frame"]),
            "delivered_fps": ratio(ours["delivered_fps"], theirs["delivered_fps"]),
            "latency_p50": ratio(ours["latency_s"]["p50"], theirs["latency_s"]["p50"]),
            "latency_p99": ratio(ours["latency_s"]["p99"], theirs["latency_s"]["p99"]),
        },
        "runs": runs,
    }


def combine(windows: list[Window]) -> dict[str, Any]:
    """One system's windows over all rounds, as if they were one window."""
    if not windows:
        return Window(0.0, 0, 0, 0, 0, 0, [], 0.0).summary() | {
            "delivered_fps": 0.0,
            "received_fps": 0.0,
        }
    total = Window(
        seconds=sum(w.seconds for w in windows),
        frames_received=sum(w.frames_received for w in windows),
        frames_delivered=sum(w.frames_delivered for w in windows),
        unreadable=sum(w.unreadable for w in windows),
        sent=sum(w.sent for w in windows),
        lost=sum(w.lost for w in windows),
        latencies=[x for w in windows for x in w.latencies],
        cpu=sum(w.cpu for w in windows),
    )
    return total.summary()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def _num(value: float | int | None, fmt: str = "g") -> str:
    return "-" if value is None else format(value, fmt)


def summary(results: dict[str, Any]) -> str:
    lines = [
        f"relay: {results['width']}x{results['height']} at {results['target_fps']:g} fps, "
        f"{results['rounds']} round(s) of {results['seconds']:g} s per server, "
        f"errors: {results['errors']}",
        "",
        f"{'server':<12}{'fps':>8}{'sent':>7}{'deliv':>7}{'lost':>6}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'mean ms':>9}{'CPU s':>8}{'CPU ms/frame':>14}",
    ]
    for system, s in results["systems"].items():
        lat = s["latency_s"]
        lines.append(
            f"{system:<12}{s['delivered_fps']:>8.2f}{s['frames_sent']:>7}"
            f"{s['frames_delivered']:>7}{s['frames_lost']:>6}{_ms(lat['p50']):>9}"
            f"{_ms(lat['p99']):>9}{_ms(lat['mean']):>9}{s['server_cpu_seconds']:>8.2f}"
            f"{_num(s['cpu_ms_per_frame'], '.2f'):>14}"
        )
    r = results["ratios"]
    lines.append(
        f"scope-trio / asyncio: CPU per frame {_num(r['cpu_per_frame'])}, "
        f"fps {_num(r['delivered_fps'])}, latency p50 {_num(r['latency_p50'])}, "
        f"p99 {_num(r['latency_p99'])}"
    )
    lines += [f"error: {message.splitlines()[0]}" for message in results["error_messages"]]
    return "\n".join(lines)


def check(report: Report, baselines: dict[str, Report]) -> Checks:
    results = report["results"]
    checks = Checks()
    checks.add("errors", str(results["errors"]), "-", "0", results["errors"] == 0)
    ratios = results["ratios"]
    fps_ratio = ratios["delivered_fps"]
    checks.add(
        "fps ratio (scope-trio/asyncio)",
        _num(fps_ratio),
        "-",
        f">= {FPS_RATIO_FLOOR:g}",
        fps_ratio is not None and fps_ratio >= FPS_RATIO_FLOOR,
    )
    same = baselines.get(config_key(report["config"]))
    if same is None:
        checks.add("CPU/frame ratio", _num(ratios["cpu_per_frame"]), "none", "-", None)
        return checks
    base = same["results"]
    base_cpu = base["ratios"]["cpu_per_frame"]
    cpu = ratios["cpu_per_frame"]
    if cpu is None or base_cpu is None:
        checks.add("CPU/frame ratio", _num(cpu), _num(base_cpu), "-", None)
    else:
        limit = CPU_RATIO_SLACK * base_cpu
        checks.add("CPU/frame ratio", _num(cpu), _num(base_cpu), f"<= {limit:.2f}", cpu <= limit)
    ours, then = results["systems"]["scope-trio"], base["systems"]["scope-trio"]
    floor = FPS_BASELINE_FLOOR * then["delivered_fps"]
    checks.add(
        "scope-trio delivered fps",
        f"{ours['delivered_fps']:g}",
        f"{then['delivered_fps']:g}",
        f">= {floor:.1f}",
        ours["delivered_fps"] >= floor,
    )
    p50, base_p50 = ours["latency_s"]["p50"], then["latency_s"]["p50"]
    if p50 is None or base_p50 is None:
        checks.add("scope-trio latency p50 ms", _ms(p50), _ms(base_p50), "-", None)
    else:
        limit = LATENCY_SLACK * base_p50 + LATENCY_ALLOWANCE
        checks.add(
            "scope-trio latency p50 ms", _ms(p50), _ms(base_p50), f"<= {_ms(limit)}", p50 <= limit
        )
    for system in SYSTEMS:
        now, was = results["systems"][system]["cpu_ms_per_frame"], base["systems"][system]
        checks.add(
            f"{system} CPU ms/frame",
            _num(now, ".2f"),
            _num(was["cpu_ms_per_frame"], ".2f"),
            "informational",
            None,
        )
    return checks


def add_duration_options(parser: argparse.ArgumentParser, full: float, quick: float) -> None:
    parser.add_argument(
        "--seconds",
        type=float,
        help=f"length of each measured window (default {full:g}; --quick: {quick:g})",
    )
    parser.add_argument("--serve-reference", action="store_true", help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(BENCHMARK, __doc__ or "")
    add_duration_options(parser, FULL_SECONDS, QUICK_SECONDS)
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"rounds, each server once per round (default {FULL_ROUNDS}; --quick: {QUICK_ROUNDS})",
    )
    args = parser.parse_args(argv)
    if args.serve_reference:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_reference())
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else FULL_SECONDS)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    if not 0 < seconds * FPS < 3000 or rounds < 1:
        parser.error("--seconds must be in (0, 100) and --rounds at least 1")

    results = asyncio.run(run_rounds(seconds, rounds))
    config = {"seconds": seconds, "rounds": rounds, "size": f"{WIDTH}x{HEIGHT}", "fps": FPS}
    report = make_report(BENCHMARK, command_line("relay.py", argv), config, results)
    failure = f"{results['errors']} errors" if results["errors"] else None
    return conclude(args, report, summary(results), check, failure=failure)


if __name__ == "__main__":
    sys.exit(main())
