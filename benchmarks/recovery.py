"""Recovery: the time from a fault to its detection and to the first frame of the new session.

The same real stack as ``stop_latency.py`` (dev cloud in-process on loopback, a connected
:class:`~scope_trio.cloud.CloudManager`, real aiortc sessions, a 30 fps producer, the real
clock; ICE consent tuned with :func:`scope_trio.rtc.tune_ice_consent`). Scope's reconnect
policy (first backoff delay 1 s) and link policy (re-link after 1 s), except that the attempt
budget refills after 0.5 s up and nothing gives up (see ``stop_latency.POLICY``).

Faults, ``--runs`` times each (default 20, ``--quick`` 3), each run starting from a session
that has been connected for at least 0.6 s with frames flowing:

* ``close_pc``: the dev cloud closes its peer connection (``/control/faults``);
* ``blackhole``: the dev cloud drops every packet of the existing session for 4 s (seen by
  the session's path-silence signal: no datagram at all for 1 s);
* ``drop_ws``: the dev cloud aborts the signaling WebSocket's TCP connection;
* ``debug``: :meth:`CloudManager.simulate_media_loss`, the path ``POST
  /api/v1/debug/simulate-media-loss`` takes.

What is measured, all from ``t0`` = the moment just before the fault is requested (the
``/control/faults`` round trip, a few ms on loopback, is inside every figure); for ``drop_ws``
from the moment the dev cloud actually cut the TCP connection: its fault handler first finds
the socket by scanning the whole heap (``devcloud.faults.abort_tcp``, 15-80 ms in this process),
which is the injector's delay, not scope-trio's. That delay is reported as ``injection_lag``
(request to cut, not checked); the benchmark times the cut by wrapping ``_abort_tcp``:

* **detection**: the first CloudStatus, seen through ``CloudManager.version`` /
  ``wait_change`` (no polling), with ``webrtc_reconnecting`` true; for ``drop_ws`` (the
  link, not the media, is lost) the first one with ``connected`` false: the signaling link's
  loss is noticed (the media session is retired in the same step: ``webrtc_connected`` is
  false too);
* **first frame**: the first processed frame handed to ``on_frame`` after detection (the old
  session is cancelled when its loss is recorded, so any such frame is the new session's),
  timestamped in the callback;
* **recovery** = first frame - detection: backoff, reconnect and first decoded frame.

Targets (checked on p95 by ``--check``): detection within 1.5 s for ``blackhole`` and 0.1 s
for the closes (``close_pc``, ``drop_ws``, ``debug``); recovery within the first backoff delay
+ 1 s (for ``drop_ws``: the re-link delay + 1 s). The fault-to-first-frame time is reported
too; for the closes it has the same limit, for ``blackhole`` its limit is the detection
target + the delay + 1 s. Runs with the same configuration are also compared with the
baseline: a p95 more than twice the baseline's plus 0.25 s fails (wall time varies).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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
from stop_latency import LINK_POLICY, POLICY, Rig, open_rig, percentiles, quiet_logs

from scope_trio.dev.devcloud import faults as devcloud_faults

BENCHMARK = "recovery"
FAULTS = ("close_pc", "blackhole", "drop_ws", "debug")
FULL_RUNS, QUICK_RUNS = 20, 3
STABLE_WAIT = 0.6
"""Up this long before each fault: longer than POLICY.stable_period, so budgets refill."""
BLACKHOLE_SECONDS = 4.0
DETECTION_TARGET = {"close_pc": 0.1, "blackhole": 1.5, "drop_ws": 0.1, "debug": 0.1}
BASELINE_TOLERANCE = 2.0
BASELINE_SLACK = 0.25
WAIT = 20.0


def first_delay(fault: str) -> float:
    return float(LINK_POLICY.delay if fault == "drop_ws" else POLICY.delay(1))


def recovery_target(fault: str) -> float:
    return first_delay(fault) + 1.0


def first_frame_target(fault: str) -> float:
    base = DETECTION_TARGET[fault] if fault == "blackhole" else 0.0
    return base + first_delay(fault) + 1.0


def detected(fault: str) -> Callable[[dict[str, Any]], bool]:
    if fault == "drop_ws":
        return lambda s: not s["connected"]
    return lambda s: bool(s["webrtc_reconnecting"])


async def inject(r: Rig, fault: str) -> None:
    if fault == "debug":
        await r.manager.simulate_media_loss()
    elif fault == "blackhole":
        await r.control("blackhole", seconds=BLACKHOLE_SECONDS, scope="existing")
    else:
        await r.control(fault)


TCP_CUTS: list[float] = []
"""``trio.current_time()`` of every TCP connection the dev cloud cut (``drop_ws``)."""


@contextlib.contextmanager
def timing_tcp_cuts() -> Iterator[None]:
    """Record when the in-process dev cloud really cuts a TCP connection (see the docstring)."""
    abort_tcp = devcloud_faults.abort_tcp

    def timed(scope: Any) -> bool:
        cut = abort_tcp(scope)
        TCP_CUTS.append(trio.current_time())
        return cut

    devcloud_faults.abort_tcp = timed
    try:
        yield
    finally:
        devcloud_faults.abort_tcp = abort_tcp


async def one_run(r: Rig, fault: str) -> dict[str, float]:
    """One fault from a stable session: detection, first new frame, back to connected."""
    await r.connected_with_frames()
    if fault == "drop_ws":
        await r.until(lambda s: s["connected"] and s["webrtc_connected"])
    await trio.sleep(STABLE_WAIT)
    await r.frames.next_frame()
    times: dict[str, float] = {}
    seen = trio.Event()
    frame = trio.Event()
    predicate = detected(fault)

    def on_frame(at: float) -> None:
        if seen.is_set() and not frame.is_set():
            times["frame"] = at
            frame.set()

    async def watch(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        first = True
        with trio.fail_after(WAIT):
            while True:
                version = r.manager.version
                status = r.manager.status()
                if not first and predicate(status):
                    times["detected"] = trio.current_time()
                    seen.set()
                    return
                if first:
                    if predicate(status):
                        raise RuntimeError(f"{fault}: detected before the fault: {status}")
                    first = False
                    task_status.started()
                await r.manager.wait_change(version)

    r.frames.listeners.append(on_frame)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch)
            cuts = len(TCP_CUTS)
            t0 = trio.current_time()
            await inject(r, fault)
        with trio.fail_after(WAIT):
            await frame.wait()
        _, back = await r.until(lambda s: s["connected"] and s["webrtc_connected"])
    finally:
        r.frames.listeners.remove(on_frame)
    if fault == "blackhole":
        await r.control("clear")
    lag: dict[str, float] = {}
    if fault == "drop_ws":
        if len(TCP_CUTS) <= cuts:
            raise RuntimeError("drop_ws: the dev cloud did not cut a TCP connection")
        lag["injection_lag"] = TCP_CUTS[cuts] - t0
        t0 = TCP_CUTS[cuts]
    return {
        "detection": times["detected"] - t0,
        "first_frame": times["frame"] - t0,
        "recovery": times["frame"] - times["detected"],
        "connected_again": back - t0,
        **lag,
    }


async def bench(runs: int) -> dict[str, Any]:
    began = time.perf_counter()
    samples: dict[str, dict[str, list[float]]] = {}
    with timing_tcp_cuts():
        async with open_rig() as r:
            await r.connected_with_frames()  # warm-up
            for fault in FAULTS:
                samples[fault] = {}
                for _ in range(runs):
                    for metric, value in (await one_run(r, fault)).items():
                        samples[fault].setdefault(metric, []).append(value)
            sessions = r.manager.media_stats.offers_successful
            unhandled = list(r.unhandled)
    return {
        "asyncio_unhandled_errors": len(unhandled),
        "runs_per_fault": runs,
        "policy": {
            "first_backoff_s": POLICY.delay(1),
            "relink_delay_s": LINK_POLICY.delay,
            "stable_period_s": POLICY.stable_period,
        },
        "faults": {
            fault: {metric: percentiles(values) for metric, values in metrics.items()}
            for fault, metrics in samples.items()
        },
        "targets_s": {
            fault: {
                "detection": DETECTION_TARGET[fault],
                "recovery": recovery_target(fault),
                "first_frame": first_frame_target(fault),
            }
            for fault in FAULTS
        },
        "sessions_connected": sessions,
        "wall_seconds": round(time.perf_counter() - began, 1),
    }


def _s(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.3f}"


METRICS = ("detection", "first_frame", "recovery", "connected_again", "injection_lag")


def summary(results: dict[str, Any]) -> str:
    lines = [
        f"recovery: {results['runs_per_fault']} runs per fault, "
        f"{results['sessions_connected']} sessions connected, wall {results['wall_seconds']} s",
        "seconds from the fault (recovery: from detection); target applies to p95",
        "",
        f"{'fault':<10}{'metric':<17}{'p50':>8}{'p95':>8}{'max':>8}{'target':>9}",
    ]
    for fault, metrics in results["faults"].items():
        for metric in METRICS:
            if metric not in metrics:
                continue
            stats = metrics[metric]
            target = results["targets_s"][fault].get(metric)
            lines.append(
                f"{fault:<10}{metric:<17}{_s(stats['p50']):>8}{_s(stats['p95']):>8}"
                f"{_s(stats['max']):>8}{'-' if target is None else f'{target:g}':>9}"
            )
    return "\n".join(lines)


def check(report: Report, baselines: dict[str, Report]) -> Checks:
    results = report["results"]
    checks = Checks()
    same = baselines.get(config_key(report["config"]))
    for fault in FAULTS:
        for metric in ("detection", "first_frame", "recovery"):
            p95 = results["faults"][fault][metric]["p95"]
            target = results["targets_s"][fault][metric]
            checks.add(
                f"{fault} {metric} p95 (s)",
                _s(p95),
                "-",
                f"<= {target:g}",
                p95 is not None and p95 <= target,
            )
            if same is None or fault not in same["results"]["faults"]:
                continue
            base = same["results"]["faults"][fault][metric]["p95"]
            limit = BASELINE_TOLERANCE * base + BASELINE_SLACK
            checks.add(
                f"{fault} {metric} p95 vs baseline (s)",
                _s(p95),
                _s(base),
                f"<= {limit:.3f}",
                p95 is not None and p95 <= limit,
            )
    if same is None:
        checks.add("baseline", "-", "none", "same config only", None)
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(BENCHMARK, __doc__ or "")
    parser.add_argument(
        "--runs", type=int, help=f"runs per fault (default: {FULL_RUNS}; --quick: {QUICK_RUNS})"
    )
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = args.runs or (QUICK_RUNS if args.quick else FULL_RUNS)
    if runs < 1:
        parser.error("--runs must be at least 1")

    with quiet_logs():
        results = trio.run(bench, runs)
    report = make_report(BENCHMARK, command_line("recovery.py", argv), {"runs": runs}, results)
    return conclude(args, report, summary(results), check)


if __name__ == "__main__":
    sys.exit(main())
