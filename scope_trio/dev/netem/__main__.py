"""``python -m scope_trio.dev.netem --upstream ws://...``: the emulator as a process of its own.

Prints the signaling URL to give ``scope-trio serve --cloud-ws-url``; the flags impair both
directions from the start. Then reads commands, one per line, on stdin (each answered with
one JSON line on stdout)::

    set up|down|both delay=MS jitter=MS loss=PCT burst=PCT/LEN reorder=0|1
    blackout [up|down|both] [SECONDS|forever] [all|existing]
    blip MS
    restore
    stats

SIGINT or SIGTERM (or the end of stdin with ``--exit-on-eof``) stops it; every socket closes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import trio

from .impair import GilbertElliott, Impairment
from .proxy import serve_signaling_proxy
from .relay import Netem, Scope, open_netem


def impairment(spec: Sequence[str], base: Impairment | None = None) -> Impairment:
    """``delay=MS jitter=MS loss=PCT burst=PCT/LEN reorder=0|1`` as an :class:`Impairment`."""
    fields: dict[str, Any] = {}
    for item in spec:
        key, _, value = item.partition("=")
        if key in ("delay", "jitter"):
            fields[key] = float(value) / 1000
        elif key == "loss":
            fields["loss"] = float(value) / 100
        elif key == "burst":
            rate, _, length = value.partition("/")
            fields["burst"] = GilbertElliott.from_rate(float(rate) / 100, float(length or 1))
        elif key == "reorder":
            fields["reorder"] = value not in ("0", "false", "no")
        else:
            raise ValueError(f"unknown setting {key!r} (delay, jitter, loss, burst, reorder)")
    start = base or Impairment()
    return Impairment(**{**start.__dict__, **fields})


def command(netem: Netem, line: str) -> dict[str, Any]:
    """Run one stdin command; its JSON answer."""
    words = line.split()
    if not words:
        return {"ok": True}
    verb, rest = words[0], words[1:]
    if verb == "set" and rest:
        for d in netem.directions(cast("Any", rest[0])):
            netem.configure(d, impairment(rest[1:], netem.links[d].impairment))
        return {"ok": True, "set": rest[0]}
    if verb == "blackout":
        direction = rest[0] if rest else "both"
        seconds = None if len(rest) < 2 or rest[1] == "forever" else float(rest[1])
        scope = cast("Scope", rest[2] if len(rest) > 2 else "all")
        if scope not in ("all", "existing"):
            raise ValueError("scope must be 'all' or 'existing'")
        netem.blackout(cast("Any", direction), seconds, scope)
        return {"ok": True, "blackout": direction, "seconds": seconds, "scope": scope}
    if verb == "blip" and len(rest) == 1:
        netem.blip(float(rest[0]))
        return {"ok": True, "blip_ms": float(rest[0])}
    if verb == "restore":
        netem.restore()
        return {"ok": True}
    if verb == "stats":
        return {"ok": True, **netem.snapshot()}
    raise ValueError(f"unknown command {line.strip()!r}")


async def _commands(netem: Netem, exit_on_eof: bool, done: trio.CancelScope) -> None:
    buffer = b""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while chunk := await stdin.receive_some():
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                try:
                    answer = command(netem, raw.decode(errors="replace"))
                except ValueError as exc:
                    answer = {"ok": False, "error": str(exc)}
                print(json.dumps(answer), flush=True)
    if exit_on_eof:
        done.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scope_trio.dev.netem", description=__doc__)
    parser.add_argument("--upstream", required=True, help="the cloud's signaling URL (ws://)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--impair",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="both directions: delay=MS jitter=MS loss=PCT burst=PCT/LEN reorder=0|1",
    )
    parser.add_argument("--exit-on-eof", action="store_true", help="stop when stdin ends")
    args = parser.parse_args(argv)
    try:
        start = impairment(args.impair)
    except ValueError as exc:
        parser.error(str(exc))

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with (
                open_netem(up=start, down=start, seed=args.seed) as netem,
                trio.open_nursery() as nursery,
            ):
                url = await nursery.start(
                    partial(
                        serve_signaling_proxy,
                        netem,
                        args.upstream,
                        host=args.host,
                        port=args.port,
                    )
                )
                print(f"netem: signaling proxy on {url} (upstream {args.upstream})", flush=True)
                nursery.start_soon(_commands, netem, args.exit_on_eof, nursery.cancel_scope)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
