"""Network: the real stack through the network emulator, under the profiles of a real WAN.

A real ``scope-trio serve`` (subprocess) talks to a real ``scope-trio devcloud`` (subprocess,
``passthrough`` pipeline) through :mod:`scope_trio.dev.netem`, which runs in this process:
its signaling proxy is the server's ``--cloud-ws-url`` and rewrites the candidates of every
offer and answer, so all media datagrams between server and cloud pass through its relay
(the browser ↔ server leg stays on loopback, unimpaired). A browser (a real aiortc peer in
this process, offering through ``POST /api/v1/webrtc/offer``) sends 512x512 numbered frames
at 30 fps (the grid of ``relay.py``: 12 bits of counter and 4 check bits) and reads the
number back from every frame that returns. Each profile gets a fresh server.

Impaired profiles (``--duration`` seconds each, default 60; ``--long``: 30 minutes;
``--quick``: 15 s): an unimpaired reference through the relay, 100 ms RTT ±20 ms with 1 %
loss, 300 ms RTT ±60 ms with 3 % loss, and 300 ms RTT ±60 ms with 2 % bursty loss
(Gilbert-Elliott, mean burst 4 datagrams). Delay is half the RTT in each direction; jitter
and loss apply to each direction on their own. Fault profiles, on a path of 100 ms RTT
(50 ms each way, nothing lost): blips of 300 ms, 700 ms and 1.5 s (both directions, every
session), a permanent blackout of the session's path (both ways; a new session finds a
working path), the server→cloud direction dead (permanently, the session's path), and two
clean losses: the dev cloud closes its peer connection (``close_pc``), and the server's
debug route.

Reported per profile:

* **false losses**: sessions the server declared lost (``scope_trio_media_losses_total``
  by reason, from ``/metrics``, before and after; in an impaired profile every loss is false)
  and the reason the server logged for each;
* **live fps**: distinct frame numbers that came back, per second of the window;
* **latency** (glass to glass): arrival of a number - the moment its frame was pushed into
  the browser's camera track, p50 / p95 / max; **drift**: p50 of the window's last quarter
  minus p50 of its first quarter;
* **freezes**: every gap of more than 0.2 s between two frames that advance the picture;
* the emulator's counters per direction (datagrams in, forwarded, dropped by cause,
  reordered) and its own accuracy: how late datagrams left against their release time (it
  runs in this process, next to the browser's codecs);
* for faults, from ``t0`` (the moment just before the fault): **detection** (the first
  server status on ``GET /api/v1/cloud/events`` with ``webrtc_reconnecting`` or without
  ``webrtc_connected``), **first live frame** (the first arrival of a frame pushed after
  ``t0``), for blips also that arrival minus the moment the path returned, and rebuilds.

One file like the other benchmarks (about 700 lines: the profiles, the processes, the
browser, the figures and the check serve one measurement and are read together).

``--check`` compares with the baseline of the same configuration (regressions only, with
wide tolerances: wall time on a shared machine varies) and shows issue 12's targets beside
each figure as notes, so the gap stays visible until the receive path is fixed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio
from _common import Checks, Report, command_line, conclude, config_key, make_parser, make_report
from relay import COUNTER_MASK, FPS, counter_frame, read_counter

from scope_trio import rtc
from scope_trio.dev.netem import (
    GilbertElliott,
    Impairment,
    Netem,
    open_netem,
    serve_signaling_proxy,
)
from scope_trio.rtc import raw, tracks

BENCHMARK = "network"
FULL_SECONDS, QUICK_SECONDS, LONG_SECONDS = 60.0, 15.0, 1800.0
PRE_FAULT = 3.0
"""Seconds of steady streaming before a fault."""
OBSERVE = 10.0
"""Seconds watched after a fault (recovery included)."""
SETTLE = 2.0
FREEZE_GAP = 0.2
START_TIMEOUT = 60.0
FIRST_FRAME_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
URL_LINE = re.compile(r"(?:open|serving on) (http://[^\s;]+)")
DEVCLOUD_LINE = re.compile(r"listening on (http://\S+) \(signaling: (ws://[^\s)]+)\)")
LOSS_LINE = re.compile(r"lost: (.*)$")
LOSSES_METRIC = re.compile(r'^scope_trio_media_losses_total\{reason="([^"]+)"\} ([0-9.e+]+)$', re.M)
FAULT_PATH = Impairment(delay=0.05)


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    path: Impairment
    fault: str | None = None
    blip_ms: float = 0.0
    target: str = ""


PROFILES = (
    Profile("clean", "unimpaired (through the relay)", Impairment(), target="reference"),
    Profile(
        "rtt100_loss1",
        "100 ms RTT ±20 ms, 1 % loss",
        Impairment(delay=0.05, jitter=0.02, loss=0.01),
        target="0 false losses; live fps >= 27; p95 <= clean p95 + 200 ms; no drift",
    ),
    Profile(
        "rtt300_loss3",
        "300 ms RTT ±60 ms, 3 % loss",
        Impairment(delay=0.15, jitter=0.06, loss=0.03),
        target="0 false losses; live fps >= 20",
    ),
    Profile(
        "rtt300_bursty2",
        "300 ms RTT ±60 ms, 2 % bursty loss",
        Impairment(delay=0.15, jitter=0.06, burst=GilbertElliott.from_rate(0.02, 4)),
        target="0 false losses; live fps >= 20",
    ),
    Profile("blip300", "blip 300 ms", FAULT_PATH, "blip", 300, "no rebuild; live <= 0.3 s"),
    Profile("blip700", "blip 700 ms", FAULT_PATH, "blip", 700, "no rebuild; live <= 0.3 s"),
    Profile("blip1500", "blip 1.5 s", FAULT_PATH, "blip", 1500, "freeze <= 2.0 s"),
    Profile(
        "blackout",
        "permanent blackout, both ways",
        FAULT_PATH,
        "blackout",
        target="detection <= 1.1 s; first live <= 2.0 s",
    ),
    Profile("up_dead", "server→cloud dead", FAULT_PATH, "up_dead", target="detection <= 1.2 s"),
    Profile("close_pc", "clean loss: close_pc", FAULT_PATH, "close_pc", target="live <= 0.5 s"),
    Profile("debug", "clean loss: debug route", FAULT_PATH, "debug", target="live <= 0.5 s"),
)
BY_NAME = {p.name: p for p in PROFILES}


# ---------------------------------------------------------------- processes


@dataclass
class Process:
    process: trio.Process
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")


async def _drain(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    with contextlib.suppress(trio.ClosedResourceError):
        while chunk := await stream.receive_some():
            into.extend(chunk)


@contextlib.asynccontextmanager
async def run_process(
    args: Sequence[str], line: re.Pattern[str]
) -> AsyncIterator[tuple[Process, re.Match[str]]]:
    """``python -m scope_trio *args`` until ``line`` shows on its stdout; SIGTERM (then
    SIGKILL) and wait on the way out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPE_")}
    env["PYTHONUNBUFFERED"] = "1"
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "scope_trio", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                env=env,
            )
        )
        p = Process(proc)
        assert proc.stdout is not None
        assert proc.stderr is not None
        nursery.start_soon(_drain, proc.stderr, p.stderr)
        try:
            with trio.fail_after(START_TIMEOUT):
                while not (match := line.search(p.stdout.decode(errors="replace"))):
                    chunk = await proc.stdout.receive_some()
                    if not chunk:
                        raise RuntimeError(f"{args[0]} exited early:\n{p.log[-3000:]}")
                    p.stdout.extend(chunk)
            nursery.start_soon(_drain, proc.stdout, p.stdout)
            yield p, match
        finally:
            with trio.move_on_after(STOP_TIMEOUT + 5, shield=True):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    await proc.wait()
                if proc.poll() is None:
                    proc.kill()
                await proc.wait()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- the browser


@dataclass
class Browser:
    """Numbered frames out, numbers back; everything in this process's trio clock."""

    count: int = 0
    sent: dict[int, float] = field(default_factory=dict)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """(arrival time, full frame number) of every readable frame that came back."""
    unreadable: int = 0
    first: trio.Event = field(default_factory=trio.Event)

    async def produce(self, camera: rtc.TrioVideoSource) -> None:
        start = trio.current_time()
        while True:
            self.count += 1
            camera.push(counter_frame(self.count))
            self.sent[self.count] = trio.current_time()
            await trio.sleep_until(start + self.count / FPS)

    def on_frame(self, frame: Any) -> None:
        n = read_counter(frame)
        if n is None:
            self.unreadable += 1
            return
        full = self.count - ((self.count - n) & COUNTER_MASK)  # the latest frame with that number
        if full in self.sent:
            self.arrivals.append((trio.current_time(), full))
            self.first.set()


@contextlib.asynccontextmanager
async def streaming_browser(http: httpx.AsyncClient) -> AsyncIterator[Browser]:
    pc = raw.new_peer_connection([])
    events = raw.PeerEvents(pc)
    camera = rtc.TrioVideoSource(fps=FPS, idle_timeout=None)
    pc.addTrack(camera)
    browser = Browser()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(browser.produce, camera)
            offer = await raw.create_offer(pc)
            with trio.fail_after(START_TIMEOUT):
                response = await http.post(
                    "/api/v1/webrtc/offer", json={"sdp": offer.sdp, "type": offer.type}
                )
            response.raise_for_status()
            await raw.apply_answer(pc, response.json()["sdp"], "answer")
            with trio.fail_after(FIRST_FRAME_TIMEOUT):
                track = await events.tracks.receive()
                nursery.start_soon(tracks.receive_video, track, browser.on_frame)
                await browser.first.wait()
            yield browser
            nursery.cancel_scope.cancel()
    finally:
        camera.stop()
        await raw.close_peer_connection(pc)


# ---------------------------------------------------------------- the server


async def watch_events(http: httpx.AsyncClient, into: list[tuple[float, dict[str, Any]]]) -> None:
    async with http.stream(
        "GET", "/api/v1/cloud/events", timeout=httpx.Timeout(10, read=None)
    ) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                into.append((trio.current_time(), json.loads(line[5:])))  # noqa: PERF401 - live


async def losses(http: httpx.AsyncClient) -> dict[str, int]:
    text = (await http.get("/metrics")).text
    return {m.group(1): int(float(m.group(2))) for m in LOSSES_METRIC.finditer(text)}


async def connected(http: httpx.AsyncClient) -> None:
    (await http.post("/api/v1/cloud/connect")).raise_for_status()
    with trio.fail_after(START_TIMEOUT):
        while True:
            if (await http.get("/api/v1/cloud/status")).json()["connected"]:
                return
            await trio.sleep(0.05)


# ---------------------------------------------------------------- measuring


def _rank(ordered: list[float], q: float) -> float:
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 4)


def stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50": _rank(ordered, 0.5),
        "p95": _rank(ordered, 0.95),
        "max": _rank(ordered, 1.0),
    }


def window(browser: Browser, start: float, end: float) -> dict[str, Any]:
    """What came back in [start, end]: live fps, latency, drift, freezes."""
    first_seen: dict[int, float] = {}
    for at, n in browser.arrivals:
        first_seen.setdefault(n, at)
    delivered = sorted((at, n) for n, at in first_seen.items() if start <= at <= end)
    latencies = [(browser.sent[n], at - browser.sent[n]) for at, n in delivered]
    freezes: list[list[float]] = []
    newest, last = -1, start
    for at, n in delivered:
        if n > newest:  # advances the picture
            if at - last > FREEZE_GAP:
                freezes.append([round(last - start, 3), round(at - last, 3)])
            newest, last = n, at
    if end - last > FREEZE_GAP:
        freezes.append([round(last - start, 3), round(end - last, 3)])
    quarter = max(1, len(latencies) // 4)
    head = [lat for _, lat in latencies[:quarter]]
    tail = [lat for _, lat in latencies[-quarter:]]
    drift = statistics.median(tail) - statistics.median(head) if latencies else None
    seconds = end - start
    return {
        "window_s": round(seconds, 2),
        "frames_sent": sum(1 for t in browser.sent.values() if start <= t <= end),
        "frames_delivered": len(delivered),
        "live_fps": round(len(delivered) / seconds, 2) if seconds > 0 else 0.0,
        "latency_s": stats([lat for _, lat in latencies]),
        "drift_s": None if drift is None else round(drift, 4),
        "freezes": {
            "count": len(freezes),
            "total_s": round(sum(d for _, d in freezes), 3),
            "longest_s": round(max((d for _, d in freezes), default=0.0), 3),
            "list": freezes[:50],
        },
    }


def _netem_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    keys = ("datagrams_in", "forwarded", "dropped", "dropped_loss", "dropped_burst",
            "dropped_blackout", "reordered")  # fmt: skip
    return {d: {k: after[d][k] - before[d][k] for k in keys} for d in ("up", "down")}


async def inject(
    profile: Profile, netem: Netem, http: httpx.AsyncClient, cloud_url: str
) -> float | None:
    """Apply the fault; returns when the path returns (blips) or None."""
    if profile.fault == "blip":
        return netem.blip(profile.blip_ms)
    if profile.fault == "blackout":
        netem.blackout("both", None, "existing")
    elif profile.fault == "up_dead":
        netem.blackout("up", None, "existing")
    elif profile.fault == "close_pc":
        async with httpx.AsyncClient(base_url=cloud_url, timeout=10) as cloud:
            (await cloud.post("/control/faults", json={"action": "close_pc"})).raise_for_status()
    elif profile.fault == "debug":
        (await http.post("/api/v1/cloud/debug/disconnect-webrtc")).raise_for_status()
    return None


def fault_figures(
    browser: Browser,
    events: list[tuple[float, dict[str, Any]]],
    t0: float,
    back: float | None,
) -> dict[str, Any]:
    detection = next(
        (
            at
            for at, s in events
            if at >= t0 and (s.get("webrtc_reconnecting") or not s.get("webrtc_connected"))
        ),
        None,
    )
    live = next((at for at, n in browser.arrivals if at >= t0 and browser.sent[n] >= t0), None)
    live_back = None
    if back is not None:
        live_back = next(
            (at for at, n in browser.arrivals if at >= back and browser.sent[n] >= back), None
        )
    return {
        "detection_s": None if detection is None else round(detection - t0, 3),
        "first_live_s": None if live is None else round(live - t0, 3),
        "live_after_return_s": None
        if live_back is None or back is None
        else round(live_back - back, 3),
        "first_frame_after_return_s": None
        if back is None
        else next((round(at - back, 3) for at, _ in browser.arrivals if at >= back), None),
    }


async def run_profile(
    profile: Profile,
    netem: Netem,
    proxy_url: str,
    cloud_url: str,
    seconds: float,
    *,
    observe: float = OBSERVE,
) -> dict[str, Any]:
    netem.restore()
    netem.configure("both", profile.path)
    args = [
        "serve",
        "--port",
        "0",
        "--cloud-ws-url",
        proxy_url,
        "--debug-endpoints",
        "--log-level",
        "INFO",
    ]
    async with (
        run_process(args, URL_LINE) as (server, match),
        httpx.AsyncClient(base_url=match.group(1), timeout=30) as http,
    ):
        await connected(http)
        events: list[tuple[float, dict[str, Any]]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_events, http, events)
            async with streaming_browser(http) as browser:
                await trio.sleep(SETTLE)
                losses_before = await losses(http)
                netem_before = netem.snapshot()
                netem.lateness.update(max_s=0.0, over_5ms=0, over_20ms=0)
                log_mark = len(server.stderr)
                start = trio.current_time()
                result: dict[str, Any] = {"title": profile.title, "target": profile.target}
                if profile.fault is None:
                    await trio.sleep(seconds)
                    end = trio.current_time()
                else:
                    await trio.sleep(min(PRE_FAULT, seconds))
                    t0 = trio.current_time()
                    back = await inject(profile, netem, http, cloud_url)
                    await trio.sleep(observe)
                    end = trio.current_time()
                    result["fault"] = fault_figures(browser, events, t0, back)
                    result["fault"]["at_s"] = round(t0 - start, 3)
                netem.restore()
                result.update(window(browser, start, end))
                result["unreadable_frames"] = browser.unreadable
                after = await losses(http)
                result["losses"] = {
                    k: v - losses_before.get(k, 0)
                    for k, v in after.items()
                    if v - losses_before.get(k, 0)
                }
                result["false_losses"] = (
                    sum(result["losses"].values()) if profile.fault is None else None
                )
                result["rebuilds"] = sum(result["losses"].values())
                log = server.stderr[log_mark:].decode(errors="replace")
                reasons = [m.group(1) for line in log.splitlines() if (m := LOSS_LINE.search(line))]
                result["loss_log"] = list(dict.fromkeys(reasons))[:20]  # session and supervisor
                result["netem"] = _netem_delta(netem_before, netem.snapshot())
                result["netem"]["lateness"] = dict(netem.lateness)  # the emulator's accuracy
            nursery.cancel_scope.cancel()
    return result


async def bench(names: list[str], seconds: float, seed: int, observe: float) -> dict[str, Any]:
    began = time.perf_counter()
    consent = rtc.get_ice_consent()
    results: dict[str, Any] = {}
    errors: list[str] = []
    async with rtc.open_loop(), open_netem(seed=seed) as netem, trio.open_nursery() as nursery:
        async with run_process(
            ["devcloud", "--port", "0", "--pipeline", "passthrough"], DEVCLOUD_LINE
        ) as (_, match):
            cloud_url, cloud_ws = match.group(1), match.group(2)
            proxy_url = await nursery.start(partial(serve_signaling_proxy, netem, cloud_ws))
            for name in names:
                profile = BY_NAME[name]
                print(f"{name}: {profile.title} ...", flush=True)
                try:
                    results[name] = await run_profile(
                        profile, netem, proxy_url, cloud_url, seconds, observe=observe
                    )
                except Exception as exc:  # one failed profile is reported, the rest go on
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    print(f"  ERROR {errors[-1]}", flush=True)
        nursery.cancel_scope.cancel()
    return {
        "seconds_per_profile": seconds,
        "seed": seed,
        "ice_consent_in_benchmark_process": {
            "interval": consent.interval,
            "failures": consent.failures,
        },
        "errors": len(errors),
        "error_messages": errors[:20],
        "profiles": results,
        "wall_seconds": round(time.perf_counter() - began, 1),
    }


# ---------------------------------------------------------------- report and check


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary(results: dict[str, Any]) -> str:
    lines = [
        f"network: {results['seconds_per_profile']:g} s per impaired profile, "
        f"errors: {results['errors']}, wall {results['wall_seconds']} s",
        "",
        f"{'profile':<16}{'losses':>7}{'fps':>7}{'p50 ms':>8}{'p95 ms':>8}{'max ms':>8}"
        f"{'drift':>7}{'freezes':>8}{'longest':>8}{'detect':>8}{'live':>7}{'return':>7}  reasons",
    ]
    for name, r in results["profiles"].items():
        lat, fault = r["latency_s"], r.get("fault", {})
        lines.append(
            f"{name:<16}{r['rebuilds']:>7}{r['live_fps']:>7.1f}{_ms(lat['p50']):>8}"
            f"{_ms(lat['p95']):>8}{_ms(lat['max']):>8}{_ms(r['drift_s']):>7}"
            f"{r['freezes']['count']:>8}{_s(r['freezes']['longest_s']):>8}"
            f"{_s(fault.get('detection_s')):>8}{_s(fault.get('first_live_s')):>7}"
            f"{_s(fault.get('live_after_return_s')):>7}  {','.join(r['losses']) or '-'}"
        )
    lines.append("ms: latency glass to glass; drift: last-quarter p50 - first-quarter p50 (ms);")
    lines.append("detect/live: s from the fault; return: s from the path's return to a live frame")
    lines += [f"error: {m.splitlines()[0]}" for m in results["error_messages"]]
    return "\n".join(lines)


FPS_FLOOR = 0.7
LATENCY_SLACK, LATENCY_ALLOWANCE = 2.0, 0.25
TIME_SLACK, TIME_ALLOWANCE = 2.0, 1.0
LOSS_ALLOWANCE = 2


def _targets(
    name: str, r: dict[str, Any], clean_p95: float | None
) -> list[tuple[str, str, str, bool | None]]:
    """Issue 12's targets as (metric, value, target, met)."""
    fault = r.get("fault", {})
    out: list[tuple[str, str, str, bool | None]] = []
    if r.get("false_losses") is not None and name != "clean":
        out.append(("false losses", str(r["false_losses"]), "0", r["false_losses"] == 0))
        floor = 27 if name == "rtt100_loss1" else 20
        out.append(("live fps", f"{r['live_fps']:g}", f">= {floor}", r["live_fps"] >= floor))
    if name == "rtt100_loss1" and clean_p95 is not None and r["latency_s"]["p95"] is not None:
        limit = clean_p95 + 0.2
        out.append(
            (
                "latency p95 s",
                _s(r["latency_s"]["p95"]),
                f"<= {limit:.2f}",
                r["latency_s"]["p95"] <= limit,
            )
        )
        drift = r["drift_s"]
        out.append(("drift s", _s(drift), "<= 0.05", drift is not None and drift <= 0.05))
    if name in ("blip300", "blip700"):
        out.append(("rebuilds", str(r["rebuilds"]), "0", r["rebuilds"] == 0))
        live = fault.get("live_after_return_s")
        out.append(("live after return s", _s(live), "<= 0.3", live is not None and live <= 0.3))
    if name == "blip1500":
        longest = r["freezes"]["longest_s"]
        out.append(("longest freeze s", _s(longest), "<= 2.0", longest <= 2.0))
    if name == "blackout":
        det, live = fault.get("detection_s"), fault.get("first_live_s")
        out.append(("detection s", _s(det), "<= 1.1", det is not None and det <= 1.1))
        out.append(("first live s", _s(live), "<= 2.0", live is not None and live <= 2.0))
    if name == "up_dead":
        det = fault.get("detection_s")
        out.append(("detection s", _s(det), "<= 1.2", det is not None and det <= 1.2))
    if name in ("close_pc", "debug"):
        live = fault.get("first_live_s")
        out.append(("first live s", _s(live), "<= 0.5", live is not None and live <= 0.5))
    return out


def check(report: Report, baselines: dict[str, Report]) -> Checks:
    results = report["results"]
    checks = Checks()
    checks.add("errors", str(results["errors"]), "-", "0", results["errors"] == 0)
    same = baselines.get(config_key(report["config"]))
    base_profiles = same["results"]["profiles"] if same else {}
    clean = results["profiles"].get("clean", {}).get("latency_s", {}).get("p95")
    for name, r in results["profiles"].items():
        b = base_profiles.get(name)
        if b is not None:
            floor = FPS_FLOOR * b["live_fps"]
            checks.add(
                f"{name} live fps",
                f"{r['live_fps']:g}",
                f"{b['live_fps']:g}",
                f">= {floor:.1f}",
                r["live_fps"] >= floor,
            )
            p95, bp95 = r["latency_s"]["p95"], b["latency_s"]["p95"]
            if p95 is not None and bp95 is not None:
                limit = LATENCY_SLACK * bp95 + LATENCY_ALLOWANCE
                checks.add(
                    f"{name} latency p95 s", _s(p95), _s(bp95), f"<= {limit:.2f}", p95 <= limit
                )
            limit_losses = 2 * b["rebuilds"] + LOSS_ALLOWANCE
            if r.get("fault") is None:
                checks.add(
                    f"{name} false losses",
                    str(r["rebuilds"]),
                    str(b["rebuilds"]),
                    f"<= {limit_losses}",
                    r["rebuilds"] <= limit_losses,
                )
            for metric in ("detection_s", "first_live_s"):
                now, was = r.get("fault", {}).get(metric), (b.get("fault") or {}).get(metric)
                if was is not None:
                    limit = TIME_SLACK * was + TIME_ALLOWANCE
                    checks.add(
                        f"{name} {metric}",
                        _s(now),
                        _s(was),
                        f"<= {limit:.2f}",
                        now is not None and now <= limit,
                    )
        for metric, value, target, met in _targets(name, r, clean):
            checks.add(
                f"{name} {metric} [issue 12 target: {'met' if met else 'not met'}]",
                value,
                "-",
                target,
                None,
            )
    if same is None:
        checks.add("baseline", "-", "none", "same config only", None)
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(BENCHMARK, __doc__ or "")
    parser.add_argument(
        "--duration",
        type=float,
        help=f"seconds per impaired profile (default {FULL_SECONDS:g}; --quick {QUICK_SECONDS:g})",
    )
    parser.add_argument(
        "--long", action="store_true", help=f"{LONG_SECONDS:g} s per impaired profile"
    )
    parser.add_argument("--profiles", help="comma-separated subset of: " + ", ".join(BY_NAME))
    parser.add_argument("--seed", type=int, default=0, help="the emulator's random seed")
    parser.add_argument(
        "--observe",
        type=float,
        default=OBSERVE,
        help="seconds watched after each fault (default %(default)g); steady seconds before"
        f" it: min({PRE_FAULT:g}, --duration)",
    )
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    seconds = args.duration or (
        LONG_SECONDS if args.long else QUICK_SECONDS if args.quick else FULL_SECONDS
    )
    names = args.profiles.split(",") if args.profiles else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or seconds <= 0:
        parser.error(f"unknown profiles {unknown}" if unknown else "--duration must be > 0")
    results = trio.run(bench, names, seconds, args.seed, args.observe)
    config: dict[str, Any] = {"seconds": seconds, "profiles": ",".join(names), "seed": args.seed}
    if args.observe != OBSERVE:
        config["observe"] = args.observe
    report = make_report(BENCHMARK, command_line("network.py", argv), config, results)
    failure = f"{results['errors']} errors" if results["errors"] else None
    return conclude(args, report, summary(results), check, failure=failure)


if __name__ == "__main__":
    sys.exit(main())
