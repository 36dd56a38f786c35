"""HTTP proxy benchmark: what forwarding a request to the cloud costs, and the log ring.

1. **Proxy overhead.** An in-process dev cloud, the real :class:`CloudManager` connected to
   it, and the app on a real Hypercorn socket. Interleaved, for each of N rounds:

   * ``link``: ``GET /api/v1/pipeline/status`` as an ``api`` request straight over the
     signaling link: the dev cloud's own handling plus the WebSocket round trip;
   * ``proxied``: the same route through the app over HTTP (the route table, validation,
     the link, the reply mapping, HTTP both ways);
   * ``local``: ``GET /api/v1/osc/status`` over HTTP, answered by the app itself: the HTTP
     part alone.

   The target is the median of ``proxied - link`` per round ≤ 2 ms: what a client pays over
   asking the cloud directly. The median of ``proxied - link - local`` is the proxy's own
   share beyond serving any HTTP request (a note).
2. **Log ring.** A :class:`~scope_trio.ops.logring.LogRing` at its default bound (4 MiB),
   filled with realistic lines; ``tail(200, 0)`` and ``tail(200, <an offset 100 lines
   back>)`` timed; target p99 ≤ 5 ms. Also: lines written per second, bytes held.

Everything runs in one process on loopback (the dev cloud shares the trio loop: its cost is
in ``link`` and ``proxied`` alike). ``--quick`` does fewer rounds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
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
from relay import percentiles

from scope_trio import rtc
from scope_trio.cloud.manager import CloudManager, CloudSettings
from scope_trio.config import ServerConfig
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud, ws_url
from scope_trio.dev.fakes import NoRelay
from scope_trio.ops.logring import DEFAULT_MAX_BYTES, LogRing
from scope_trio.server import open_server

BENCHMARK = "http_proxy"
ROUNDS, QUICK_ROUNDS = 2000, 300
TAILS, QUICK_TAILS = 2000, 300
OVERHEAD_LIMIT_MS = 2.0
TAIL_LIMIT_MS = 5.0
WARMUP = 50


@asynccontextmanager
async def server() -> AsyncIterator[tuple[CloudManager, httpx.AsyncClient]]:
    """The real server (``open_server``) connected to a dev cloud in this process."""
    async with trio.open_nursery() as nursery:
        base = await nursery.start(serve_cloud, DevCloudConfig(pipeline="passthrough"))
        config = ServerConfig(port=0, cloud=CloudSettings(ws_url=ws_url(base)))
        async with open_server(config, relay_factory=no_relay) as running:
            manager = running.manager
            await manager.connect()
            with trio.fail_after(20):
                await manager.wait_until(lambda s: s["connected"])
            async with httpx.AsyncClient(base_url=running.url, timeout=10) as http:
                yield manager, http
        nursery.cancel_scope.cancel()


async def serve_cloud(config: DevCloudConfig, *, task_status: trio.TaskStatus[str]) -> None:
    async with rtc.open_loop():
        await serve_devcloud(config, task_status=task_status)


@asynccontextmanager
async def no_relay(manager: CloudManager, config: ServerConfig) -> AsyncIterator[NoRelay]:
    yield NoRelay()


async def measure_proxy(rounds: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"link": [], "proxied": [], "local": []}
    errors = 0
    async with server() as (manager, http):
        link = manager.link
        assert link is not None
        path = "/api/v1/pipeline/status"
        for n in range(WARMUP + rounds):
            t0 = time.perf_counter()
            reply = await link.request("api", {"method": "GET", "path": path})
            t1 = time.perf_counter()
            proxied = await http.get(path)
            t2 = time.perf_counter()
            local = await http.get("/api/v1/osc/status")
            t3 = time.perf_counter()
            if reply.get("status") != 200 or proxied.status_code != 200 or local.status_code != 200:
                errors += 1
            if n >= WARMUP:
                samples["link"].append((t1 - t0) * 1000)
                samples["proxied"].append((t2 - t1) * 1000)
                samples["local"].append((t3 - t2) * 1000)
    link, proxied, local = samples["link"], samples["proxied"], samples["local"]
    overhead = [p - k for p, k in zip(proxied, link, strict=True)]
    share = [p - k - c for p, k, c in zip(proxied, link, local, strict=True)]
    return {
        "rounds": rounds,
        "errors": errors,
        "latency_ms": {name: percentiles(values) for name, values in samples.items()},
        "overhead_p50_ms": percentiles(overhead)["p50"],
        "proxy_share_p50_ms": percentiles(share)["p50"],
    }


def measure_ring(tails: int) -> dict[str, Any]:
    ring = LogRing()
    logger = logging.getLogger("scope_trio.cloud.manager")
    message = "cloud link up (connection_id=%s) after %d attempts; stage %s"
    lines = 0
    t0 = time.perf_counter()
    while ring.size < 3 * DEFAULT_MAX_BYTES:  # wrapped around, more than once
        record = logger.makeRecord(
            logger.name, logging.INFO, __file__, 1, message, ("c-1234", lines, "ready"), None
        )
        ring.handle(record)
        lines += 1
    write_seconds = time.perf_counter() - t0
    recent_offset = ring.size - 100 * (ring.size // lines)
    full, since = [], []
    for _ in range(tails):
        t1 = time.perf_counter()
        got, _ = ring.tail(200, 0)
        t2 = time.perf_counter()
        ring.tail(200, recent_offset)
        t3 = time.perf_counter()
        assert len(got) == 200
        full.append((t2 - t1) * 1000)
        since.append((t3 - t2) * 1000)
    return {
        "max_bytes": DEFAULT_MAX_BYTES,
        "held_bytes": ring.held_bytes,
        "lines_written": lines,
        "lines_per_second": round(lines / write_seconds),
        "tail_200_ms": percentiles(full),
        "tail_200_since_ms": percentiles(since),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def check(report: Report, baselines: dict[str, Report]) -> Checks:
    results = report["results"]
    proxy, ring = results["proxy"], results["ring"]
    checks = Checks()
    checks.add("errors", str(proxy["errors"]), "-", "0", proxy["errors"] == 0)
    base = baselines.get(config_key(report["config"]))
    base_proxy = base["results"]["proxy"] if base else None
    overhead = proxy["overhead_p50_ms"]
    checks.add(
        "proxy overhead p50 ms",
        _ms(overhead),
        _ms(base_proxy["overhead_p50_ms"]) if base_proxy else "none",
        f"<= {OVERHEAD_LIMIT_MS}",
        overhead <= OVERHEAD_LIMIT_MS,
    )
    checks.add(
        "proxy's own share p50 ms",
        _ms(proxy["proxy_share_p50_ms"]),
        _ms(base_proxy["proxy_share_p50_ms"]) if base_proxy else "none",
        "-",
        None,
    )
    p99 = ring["tail_200_ms"]["p99"]
    checks.add("ring tail(200) p99 ms", _ms(p99), "-", f"<= {TAIL_LIMIT_MS}", p99 <= TAIL_LIMIT_MS)
    held_ok = ring["held_bytes"] <= ring["max_bytes"]
    checks.add("ring bytes held", str(ring["held_bytes"]), "-", f"<= {ring['max_bytes']}", held_ok)
    return checks


def summary(results: dict[str, Any]) -> str:
    proxy, ring = results["proxy"], results["ring"]
    lat = proxy["latency_ms"]
    return "\n".join(
        [
            f"proxy: {proxy['rounds']} rounds, {proxy['errors']} errors",
            *(
                f"  {name:8} p50 {_ms(lat[name]['p50'])} ms  p99 {_ms(lat[name]['p99'])} ms"
                for name in ("link", "proxied", "local")
            ),
            f"  overhead (proxied - link) p50 {_ms(proxy['overhead_p50_ms'])} ms;"
            f" the proxy's own share {_ms(proxy['proxy_share_p50_ms'])} ms",
            f"ring: {ring['lines_written']} lines at {ring['lines_per_second']}/s,"
            f" {ring['held_bytes']} bytes held of {ring['max_bytes']}",
            f"  tail(200) p50 {_ms(ring['tail_200_ms']['p50'])} ms"
            f" p99 {_ms(ring['tail_200_ms']['p99'])} ms;"
            f" since an offset p99 {_ms(ring['tail_200_since_ms']['p99'])} ms",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(BENCHMARK, __doc__ or "")
    args = parser.parse_args(argv)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    tails = QUICK_TAILS if args.quick else TAILS
    config = {"rounds": rounds, "tails": tails}
    results = {"proxy": trio.run(measure_proxy, rounds), "ring": measure_ring(tails)}
    report = make_report(
        BENCHMARK, command_line("http_proxy.py", argv or sys.argv[1:]), config, results
    )
    failure = f"{results['proxy']['errors']} errors" if results["proxy"]["errors"] else None
    return conclude(args, report, summary(results), check, failure=failure)


if __name__ == "__main__":
    sys.exit(main())
