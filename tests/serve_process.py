"""Test helpers: ``scope-trio serve`` as a real process, and a real aiortc browser for it.

:func:`serve_process` starts ``python -m scope_trio serve --port 0 ...`` with a clean
environment (no ``SCOPE_*`` from the caller unless given), waits for the one line that names
the URL, and yields a :class:`ServeProcess` holding everything the process printed so far
(stdout and stderr are drained while it runs, so a chatty server never blocks on a full
pipe). On the way out, whatever happened in the block, the process gets SIGTERM (its
graceful shutdown), then SIGKILL if it has not exited within ``stop_timeout``, and is waited
for; the exit status is kept for the caller to assert on.

:func:`browser_session` is a browser as the relay sees one: a real aiortc peer that offers
through the HTTP API (:func:`browser_peer.http_browser`), sends video and waits until frames
processed by the dev cloud come back (its ``invert`` pipeline). Both work against any
server URL, the in-process :func:`scope_trio.server.serve` too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio
from browser_peer import Browser, http_browser
from devcloud_client import eventually

from scope_trio import rtc
from scope_trio.rtc import raw

URL_LINE = re.compile(r"(?:open|serving on) (http://[^\s;]+)")
CONNECT_TIMEOUT = 20.0
FIRST_FRAME_TIMEOUT = 30.0


@dataclass
class ServeProcess:
    """A running ``scope-trio serve``: its URL, its output so far, its exit status at the end."""

    url: str
    process: trio.Process
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    returncode: int | None = None
    """Set once the process has exited (after the ``serve_process`` block)."""

    @property
    def output(self) -> str:
        """stdout and stderr so far, decoded (stderr is the log)."""
        return (self.stdout + self.stderr).decode(errors="replace")

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``SCOPE_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _complete_lines(data: bytearray) -> str:
    return data[: data.rfind(b"\n") + 1].decode(errors="replace")


async def _drain(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    async with stream:
        while chunk := await stream.receive_some():
            into.extend(chunk)


@asynccontextmanager
async def serve_process(
    *args: str,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 30.0,
    stop_timeout: float = 20.0,
) -> AsyncIterator[ServeProcess]:
    """``scope-trio serve --port 0 *args`` for the block (see the module docstring)."""
    command = [sys.executable, "-m", "scope_trio", "serve", "--port", "0", *args]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                env=clean_env(env),
            )
        )
        served = ServeProcess(url="", process=process)
        assert process.stdout is not None
        assert process.stderr is not None
        nursery.start_soon(_drain, process.stderr, served.stderr)
        try:
            with trio.fail_after(start_timeout):
                while not (match := URL_LINE.search(_complete_lines(served.stdout))):
                    chunk = await process.stdout.receive_some()
                    if not chunk:
                        raise AssertionError(f"scope-trio serve exited early:\n{served.output}")
                    served.stdout.extend(chunk)
            nursery.start_soon(_drain, process.stdout, served.stdout)
            served.url = match.group(1)
            yield served
        finally:
            with trio.move_on_after(stop_timeout + 10, shield=True):
                if served.alive():
                    process.send_signal(signal.SIGTERM)
                with trio.move_on_after(stop_timeout):
                    await process.wait()
                if served.alive():
                    process.kill()
                await process.wait()
                served.returncode = process.returncode


# ---------------------------------------------------------------------------- the browser


async def wait_connected(http: httpx.AsyncClient) -> dict[str, Any]:
    """The server's status lives in another process: polled under a deadline."""
    status: dict[str, Any] = {}

    async def connected() -> bool:
        nonlocal status
        status = (await http.get("/api/v1/cloud/status")).json()
        return bool(status["connected"])

    await eventually(connected, timeout=CONNECT_TIMEOUT)
    return status


async def real_offer() -> tuple[str, str]:
    """A real aiortc offer (video and the ``parameters`` channel) and one candidate line."""
    pc = raw.new_peer_connection([])
    try:
        pc.addTrack(rtc.TrioVideoSource(fps=30))
        pc.createDataChannel("parameters", ordered=True)
        offer = await raw.create_offer(pc)
    finally:
        await raw.close_peer_connection(pc, 5)
    candidates = [line[2:] for line in offer.sdp.split("\r\n") if line.startswith("a=candidate:")]
    assert candidates, offer.sdp
    return offer.sdp, candidates[0]


@asynccontextmanager
async def browser_session(http: httpx.AsyncClient) -> AsyncIterator[Browser]:
    """A streaming browser for the block (see the module docstring), once a frame the dev
    cloud processed came back; ``DELETE``s its session on the way out (the peer connection
    is closed either way). Needs an open trio-asyncio loop."""
    async with http_browser(http, deadline=FIRST_FRAME_TIMEOUT) as browser:
        await browser.inverted_frame()
        yield browser
        closed = await http.delete(f"/api/v1/webrtc/offer/{browser.session_id}")
        assert closed.status_code == 204, closed.text


async def browser_round_trip(http: httpx.AsyncClient) -> None:
    """A browser offers, gets frames the dev cloud processed, and closes its session."""
    async with browser_session(http):
        pass
