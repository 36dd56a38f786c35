"""Latency benchmark: where each millisecond of a frame's trip goes, stage by stage.

The topology and the numbered frames of ``relay.py`` (browser → server → cloud passthrough →
server → browser, 512x512 at 30 fps), with both servers (scope-trio with its embedded dev
cloud, and the plain-asyncio aiortc relay) run under ``_stages.py``, which records, in every
process, when each aiortc receiver got the first packet of a frame, when its receive buffer
released the frame to the decoder, when the decoded frame reached the event loop (and its
number), and when each encoder started and finished a frame (and its number). The browser
(this process) records the same plus when each number left its camera. A frame's trip is then
cut into stages (p50 / p95 per stage, over every frame that came back):

==================  ===============================================================
camera → encode     the browser sender picked the frame up
encode              browser encoder
net                 last payload encoded → first packet at the next receiver
jitter              first packet → frame released to the decoder (receive buffer)
decode              release → decoded frame on the event loop
hand-off            decoded → the next encoder starts (relay, trio, pacing of the
                    outbound track; in the cloud: the pipeline too)
==================  ===============================================================

for each of the four hops (browser → server, server → cloud, cloud → server, server →
browser), then ``total`` (camera → decoded in the browser). Receivers and encoders of one
process are told apart by their order along the path (median delay after the camera).

``--check`` guards scope-trio's total p50 and p95 - p50 against the baseline and reports the
ratio to the plain relay (issue 13's targets: total p50 ≤ 100 ms, ratio ≤ 0.7, p95 - p50 ≤
40 ms) as notes.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _stages
import relay
from _common import Checks, Report, command_line, conclude, config_key, make_parser, make_report

BENCHMARK = "latency"
STAGES_SCRIPT = str(Path(_stages.__file__).resolve())
FULL_SECONDS, QUICK_SECONDS = 20.0, 6.0
SYSTEMS = relay.SYSTEMS
HOPS = ("browser→server", "server→cloud", "cloud→server", "server→browser")
TARGET_P50, TARGET_RATIO, TARGET_SPREAD = 0.100, 0.7, 0.040
LATENCY_SLACK, LATENCY_ALLOWANCE = 1.5, 0.020
"""--check: total p50 (and p95 - p50) may grow to 1.5x the baseline's + 20 ms."""


def stage_names() -> list[str]:
    names = ["camera→encode", "encode 0"]
    for i, hop in enumerate(HOPS):
        names += [f"net {hop}", f"jitter {i}", f"decode {i}"]
        if i < 3:
            names += [f"hand-off {i}", f"encode {i + 1}"]
    return [*names, "total"]


class Process:
    """One process's events, by role: receivers and encoders in path order."""

    def __init__(self, events: dict[str, list[list[Any]]], sent: dict[int, float]) -> None:
        first: dict[tuple[int, int], float] = {(r, ts): t for r, ts, t in events["first"]}
        release: dict[tuple[int, int], tuple[int, float]] = {}
        for rid, ts, mapped, t in events["release"]:
            release.setdefault((rid, mapped), (ts, t))
        # receiver → number → (first packet, release, decoded)
        self.receivers: dict[int, dict[int, tuple[float, float, float]]] = {}
        for rid, pts, n, t in events["decoded"]:
            if n is None:
                continue
            frames = self.receivers.setdefault(rid, {})
            if n in frames or (rid, pts) not in release:
                continue
            ts, released = release[(rid, pts)]
            frames[n] = (first.get((rid, ts), released), released, t)
        self.encoders: dict[int, dict[int, tuple[float, float]]] = {}
        for eid, n, start, end in events["enc"]:
            if n is not None:
                self.encoders.setdefault(eid, {}).setdefault(n, (start, end))

        def order(table: dict[int, dict[int, Any]], at: int) -> list[dict[int, Any]]:
            def key(frames: dict[int, Any]) -> float:
                delays = [v[at] - sent[n] for n, v in frames.items() if n in sent]
                return statistics.median(delays) if delays else float("inf")

            big = [f for f in table.values() if len(f) > 10]
            return sorted(big, key=key)

        self.rx = order(self.receivers, 2)
        self.enc = order(self.encoders, 0)


def stages(browser: Process, server: Process, sent: dict[int, float]) -> dict[str, list[float]]:
    """Stage durations (seconds) of every frame that went the whole way."""
    if len(server.rx) < 3 or len(server.enc) < 3 or not browser.rx or not browser.enc:
        raise RuntimeError(
            f"expected 3 receivers and 3 encoders in the server, found {len(server.rx)} and "
            f"{len(server.enc)}; browser {len(browser.rx)} and {len(browser.enc)}"
        )
    rxs = [*server.rx[:3], browser.rx[0]]
    encs = [browser.enc[0], *server.enc[:3]]
    out: dict[str, list[float]] = {name: [] for name in stage_names()}
    for n, camera in sent.items():
        if not all(n in e for e in encs) or not all(n in r for r in rxs):
            continue
        row = {"camera→encode": encs[0][n][0] - camera, "encode 0": encs[0][n][1] - encs[0][n][0]}
        for i, hop in enumerate(HOPS):
            first, released, decoded = rxs[i][n]
            row[f"net {hop}"] = first - encs[i][n][1]
            row[f"jitter {i}"] = released - first
            row[f"decode {i}"] = decoded - released
            if i < 3:
                start, end = encs[i + 1][n]
                row[f"hand-off {i}"] = start - decoded
                row[f"encode {i + 1}"] = end - start
        row["total"] = rxs[3][n][2] - camera
        for name, value in row.items():
            out[name].append(value)
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, int(q * len(ordered) + 0.999999) - 1)], 5)


async def measure(system: str, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stages.json"
        prefix = (STAGES_SCRIPT, str(out))
        _stages.reset()
        async with relay.streaming(system, prefix=prefix) as stream:
            start = time.monotonic()
            await asyncio.sleep(seconds)
            end = time.monotonic()
            await asyncio.sleep(relay.GRACE)
            sent = {n: t for n, t in stream.browser.camera.sent.items() if start <= t <= end}
            mine = _stages.events()
        server_events = json.loads(out.read_text(encoding="utf-8"))
    browser, server = Process(mine, sent), Process(server_events, sent)
    durations = stages(browser, server, sent)
    table = {
        name: {"p50": pct(v, 0.5), "p95": pct(v, 0.95), "count": len(v)}
        for name, v in durations.items()
    }
    return {"frames_sent": len(sent), "frames_traced": len(durations["total"]), "stages": table}


async def run(seconds: float) -> dict[str, Any]:
    _stages.install()
    systems: dict[str, Any] = {}
    errors: list[str] = []
    for system in SYSTEMS:
        print(f"{system} for {seconds:g} s ...", flush=True)
        try:
            systems[system] = await measure(system, seconds)
        except Exception as exc:
            errors.append(f"{system}: {type(exc).__name__}: {exc}")
            print(f"  ERROR {errors[-1]}", flush=True)
    ours = systems.get("scope-trio", {}).get("stages", {}).get("total", {})
    theirs = systems.get("asyncio", {}).get("stages", {}).get("total", {})
    return {
        "seconds": seconds,
        "errors": len(errors),
        "error_messages": errors,
        "systems": systems,
        "ratio_p50": relay.ratio(ours.get("p50"), theirs.get("p50")),
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def summary(results: dict[str, Any]) -> str:
    systems = results["systems"]
    lines = [f"latency: per stage, p50 / p95 ms ({results['seconds']:g} s per server)"]
    head = f"{'stage':<22}" + "".join(f"{s:>22}" for s in systems)
    lines.append(head)
    for name in stage_names():
        cells = []
        for s in systems.values():
            st = s["stages"][name]
            cells.append(f"{_ms(st['p50']) + ' / ' + _ms(st['p95']):>22}")
        lines.append(f"{name:<22}" + "".join(cells))
    for system, s in systems.items():
        lines.append(f"{system}: {s['frames_traced']} of {s['frames_sent']} frames traced")
    lines.append(f"ratio total p50 scope-trio / asyncio: {results['ratio_p50']}")
    lines += [f"error: {m.splitlines()[0]}" for m in results["error_messages"]]
    return "\n".join(lines)


def check(report: Report, baselines: dict[str, Report]) -> Checks:
    results = report["results"]
    checks = Checks()
    checks.add("errors", str(results["errors"]), "-", "0", results["errors"] == 0)
    total = results["systems"].get("scope-trio", {}).get("stages", {}).get("total", {})
    p50, p95 = total.get("p50"), total.get("p95")
    spread = None if p50 is None or p95 is None else p95 - p50
    same = baselines.get(config_key(report["config"]))
    if same is not None and p50 is not None and spread is not None:
        base = same["results"]["systems"]["scope-trio"]["stages"]["total"]
        limit = LATENCY_SLACK * base["p50"] + LATENCY_ALLOWANCE
        checks.add("total p50 ms", _ms(p50), _ms(base["p50"]), f"<= {_ms(limit)}", p50 <= limit)
        base_spread = base["p95"] - base["p50"]
        limit = LATENCY_SLACK * base_spread + LATENCY_ALLOWANCE
        checks.add(
            "total p95-p50 ms", _ms(spread), _ms(base_spread), f"<= {_ms(limit)}", spread <= limit
        )
    else:
        checks.add("total p50 ms", _ms(p50), "none", "-", None)
    ratio = results["ratio_p50"]
    note = "met" if ratio is not None and ratio <= TARGET_RATIO else "not met"
    checks.add("ratio to plain relay (target)", str(ratio), "-", f"<= {TARGET_RATIO} {note}", None)
    note = "met" if p50 is not None and p50 <= TARGET_P50 else "not met"
    checks.add("total p50 (target)", _ms(p50), "-", f"<= 100 {note}", None)
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(BENCHMARK, __doc__ or "")
    parser.add_argument("--seconds", type=float, help=f"per server (default {FULL_SECONDS:g})")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else FULL_SECONDS)
    results = asyncio.run(run(seconds))
    config = {"seconds": seconds, "size": f"{relay.WIDTH}x{relay.HEIGHT}", "fps": relay.FPS}
    report = make_report(BENCHMARK, command_line("latency.py", argv), config, results)
    failure = f"{results['errors']} errors" if results["errors"] else None
    return conclude(args, report, summary(results), check, failure=failure)


if __name__ == "__main__":
    sys.exit(main())
