"""The UDP relay: every media datagram between the server and the cloud passes through here.

A two-sided NAT on one host. For every endpoint (address:port) a peer names in its SDP, the
relay binds a *mirror* socket and tells the other peer the mirror's address instead (see
:mod:`.sdp`). A datagram arriving at the mirror of endpoint ``x`` from endpoint ``s`` is
forwarded to ``x`` from the mirror of ``s``: each side sees exactly one consistent address
per remote endpoint, ICE pairs them normally, and since neither side ever learns a real
address of the other, no direct path exists. A datagram from an address no SDP has named
*yet* is held for up to ``UNKNOWN_HOLD`` seconds and goes on, with its original arrival
time, once the SDP naming its source has passed the signaling proxy: an answerer's first
ICE check leaves as soon as it made its answer, before the proxy has rewritten that answer,
and a real network would deliver it (dropping it made every connect wait out a STUN
retransmission, 1 s with the server's consent timing). What is still unmatched then is
dropped (counted as ``unknown_source``).

Between arrival and departure a datagram goes through its direction's :class:`.impair.Link`
(delay, jitter with reordering, random and Gilbert-Elliott loss, blackouts) and waits in one
heap ordered by release time, served by one scheduler task. Guarantees:

* memory is bounded: at most ``max_queued`` datagrams wait (more are dropped and counted as
  ``overflow``), at most ``max_sessions`` sessions hold sockets (opening one more retires the
  oldest), and a session with no datagram for ``idle_timeout`` is retired;
* everything runs in the nursery of :func:`open_netem`; leaving its block cancels the
  scheduler and every receive loop and closes every socket;
* the controls (:meth:`Netem.configure`, :meth:`Netem.blackout`, :meth:`Netem.blip`,
  :meth:`Netem.restore`) are synchronous and take effect for the next arriving datagram.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import socket
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from . import sdp as sdp_text
from .impair import DIRECTIONS, Direction, Impairment, Link
from .sdp import Addr

Side = Literal["server", "cloud"]
"""Which peer an endpoint belongs to: ``server`` offers, ``cloud`` answers."""
Scope = Literal["all", "existing"]
"""A blackout of ``all`` sessions (new ones included) or only of those that exist now."""
MAX_DATAGRAM = 65536
JANITOR_INTERVAL = 1.0
UNKNOWN_HOLD = 1.0
"""Seconds a datagram from a source no SDP has named yet waits for that SDP."""
UNKNOWN_HELD_MAX = 256


@dataclass(eq=False)
class Endpoint:
    """A real endpoint of one side and the mirror socket that stands for it."""

    real: Addr
    side: Side
    session: Session
    sock: trio.socket.SocketType
    mirror: Addr
    closed: bool = False


@dataclass(eq=False)
class Session:
    """The endpoints of one offer/answer exchange (one peer connection on each side)."""

    netem: Netem
    id: int
    created: float
    last_activity: float
    blackout_until: dict[Direction, float] = field(
        default_factory=lambda: dict.fromkeys(DIRECTIONS, -math.inf)
    )
    endpoints: list[Endpoint] = field(default_factory=list)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: trio.Event = field(default_factory=trio.Event)
    _nursery: trio.Nursery | None = None

    async def add_endpoint(self, real: Addr, side: Side) -> Addr:
        """Bind the mirror of ``real`` (once per endpoint and side); its address."""
        for ep in self.endpoints:
            if ep.real == real and ep.side == side and not ep.closed:
                return ep.mirror
        if self._nursery is None or self.scope.cancel_called:
            raise RuntimeError("netem session is closed")
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            try:
                await sock.bind((self.netem.bind_host or real.host, 0))
            except OSError:  # not an address of this host (a server-reflexive candidate)
                if self.netem.bind_host:
                    raise
                await sock.bind(("127.0.0.1", 0))
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        ep = Endpoint(real, side, self, sock, Addr(host, port))
        self.endpoints.append(ep)
        self.netem._by_real[real] = ep  # a newer session's endpoint wins a reused port
        self._nursery.start_soon(self.netem._receive, ep)
        self.netem._release_held(real)
        return ep.mirror

    async def _mirror(self, text: str, side: Side) -> str:
        mapping = {real: await self.add_endpoint(real, side) for real in sdp_text.relayable(text)}
        return sdp_text.rewrite(text, mapping)

    async def rewrite_offer(self, sdp: str) -> str:
        """The server's SDP as the cloud must see it (relay addresses only)."""
        return await self._mirror(sdp, "server")

    async def rewrite_answer(self, sdp: str) -> str:
        """The cloud's SDP as the server must see it (relay addresses only)."""
        return await self._mirror(sdp, "cloud")

    async def rewrite_candidate(self, candidate: str, side: Side) -> str | None:
        """A trickled candidate of ``side`` on its mirror; None: not relayable, drop it."""
        real = sdp_text.candidate_endpoint(candidate)
        if real is None:
            return None
        mirror = await self.add_endpoint(real, side)
        return sdp_text.rewrite_candidate(candidate, {real: mirror})

    def close(self) -> None:
        """Retire the session: its sockets close and its datagrams stop (idempotent)."""
        self.scope.cancel()

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            for ep in self.endpoints:
                ep.closed = True
                ep.sock.close()
                if self.netem._by_real.get(ep.real) is ep:
                    del self.netem._by_real[ep.real]
            if self in self.netem.sessions:
                self.netem.sessions.remove(self)
            self.closed.set()


class Netem:
    """The emulator: two directions, the sessions, the release heap. Made by :func:`open_netem`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        up: Impairment | None = None,
        down: Impairment | None = None,
        seed: int | None = None,
        max_queued: int = 4096,
        max_sessions: int = 8,
        idle_timeout: float = 60.0,
        bind_host: str | None = None,
    ) -> None:
        self._nursery = nursery
        rng = random.Random(seed)
        self.links: dict[Direction, Link] = {
            "up": Link(up or Impairment(), random.Random(rng.random())),
            "down": Link(down or Impairment(), random.Random(rng.random())),
        }
        self.max_queued = max_queued
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.bind_host = bind_host
        """Address the mirror sockets bind (None: the address of the endpoint mirrored if it
        is one of this host's, else 127.0.0.1)."""
        self.sessions: list[Session] = []
        self.unknown_source = 0
        self.send_errors = 0
        self.receive_errors = 0
        self.lateness: dict[str, float] = {"max_s": 0.0, "over_5ms": 0, "over_20ms": 0}
        """How late datagrams left compared with their release time: the emulator's own
        accuracy (a busy process delays its timers; check it before trusting a figure)."""
        self._by_real: dict[Addr, Endpoint] = {}
        self._held: deque[tuple[float, Endpoint, bytes, Addr]] = deque()
        """Datagrams from sources no SDP has named yet: (arrival, mirror, data, source)."""
        self._heap: list[tuple[float, int, int, Direction, Endpoint, Addr, bytes]] = []
        self._order = itertools.count()
        self._session_ids = itertools.count(1)
        self._wake = trio.Event()

    # -- sessions ------------------------------------------------------------------------

    async def open_session(self) -> Session:
        """A new session (retiring the oldest one beyond ``max_sessions``)."""
        while len(self.sessions) >= self.max_sessions:
            self.sessions[0].close()
            self.sessions.pop(0)
        now = trio.current_time()
        session = Session(self, next(self._session_ids), now, now)
        self.sessions.append(session)
        await self._nursery.start(session._run)
        return session

    # -- controls ------------------------------------------------------------------------

    def configure(self, direction: Direction | Literal["both"], impairment: Impairment) -> None:
        """Impair ``direction`` (or both) like this from the next datagram on."""
        for d in self.directions(direction):
            self.links[d].impairment = impairment

    def blackout(
        self,
        direction: Direction | Literal["both"] = "both",
        seconds: float | None = None,
        scope: Scope = "all",
    ) -> float:
        """Drop every datagram of ``direction`` for ``seconds`` (None: until :meth:`restore`),
        on every session (``all``, new ones included) or on those that exist now
        (``existing``: a new session finds a working path). Returns when it ends."""
        until = math.inf if seconds is None else trio.current_time() + seconds
        for d in self.directions(direction):
            if scope == "all":
                self.links[d].blackout_until = until
            else:
                for session in self.sessions:
                    session.blackout_until[d] = until
        return until

    def blip(self, ms: float, direction: Direction | Literal["both"] = "both") -> float:
        """A blackout of ``ms`` milliseconds of every session; returns when it ends."""
        return self.blackout(direction, ms / 1000.0, "all")

    def restore(self) -> None:
        """End every blackout now (impairments stay)."""
        for link in self.links.values():
            link.blackout_until = -math.inf
        for session in self.sessions:
            session.blackout_until = dict.fromkeys(DIRECTIONS, -math.inf)

    def snapshot(self) -> dict[str, Any]:
        """Counters and settings, JSON-ready."""
        now = trio.current_time()
        return {
            **{d: self.links[d].counters.snapshot() for d in DIRECTIONS},
            "impairment": {d: self.links[d].impairment.describe() for d in DIRECTIONS},
            "blackout": {d: self.links[d].blacked_out(now) for d in DIRECTIONS},
            "sessions": len(self.sessions),
            "queued": len(self._heap),
            "unknown_source": self.unknown_source,
            "send_errors": self.send_errors,
            "receive_errors": self.receive_errors,
            "lateness": dict(self.lateness),
        }

    @staticmethod
    def directions(direction: Direction | Literal["both"]) -> tuple[Direction, ...]:
        """``up``, ``down`` or both of them; ValueError for anything else."""
        if direction == "both":
            return DIRECTIONS
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")
        return (direction,)

    # -- the datagram path ---------------------------------------------------------------

    async def _receive(self, ep: Endpoint) -> None:
        while True:
            try:
                data, source = await ep.sock.recvfrom(MAX_DATAGRAM)
            except OSError:  # an ICMP error reported on the socket: keep receiving
                self.receive_errors += 1
                await trio.lowlevel.checkpoint()
                continue
            self._arrived(ep, data, Addr(*source[:2]))

    def _arrived(
        self, ep: Endpoint, data: bytes, source: Addr, arrival: float | None = None
    ) -> None:
        now = trio.current_time() if arrival is None else arrival
        origin = self._by_real.get(source)
        if origin is None and arrival is None:
            self._hold(now, ep, data, source)
            return
        if origin is None or origin.closed or origin.side == ep.side:
            self.unknown_source += 1
            return
        direction: Direction = "up" if origin.side == "server" else "down"
        ep.session.last_activity = origin.session.last_activity = now
        blackout = (
            now < ep.session.blackout_until[direction]
            or now < origin.session.blackout_until[direction]
        )
        decision = self.links[direction].admit(
            now, len(data), blackout=blackout, queue_full=len(self._heap) >= self.max_queued
        )
        if isinstance(decision, str):
            return
        seq, release = decision
        item = (release, next(self._order), seq, direction, origin, ep.real, data)
        heapq.heappush(self._heap, item)
        if self._heap[0] is item:
            self._wake.set()

    def _hold(self, now: float, ep: Endpoint, data: bytes, source: Addr) -> None:
        held = self._held
        while held and (now - held[0][0] > UNKNOWN_HOLD or len(held) >= UNKNOWN_HELD_MAX):
            held.popleft()
            self.unknown_source += 1
        held.append((now, ep, data, source))

    def _release_held(self, real: Addr) -> None:
        """``real`` was just named: what it sent meanwhile goes on (as of its arrival)."""
        now = trio.current_time()
        keep: deque[tuple[float, Endpoint, bytes, Addr]] = deque()
        for item in self._held:
            arrival, ep, data, source = item
            if source != real:
                keep.append(item)
            elif now - arrival > UNKNOWN_HOLD or ep.closed:
                self.unknown_source += 1
            else:
                self._arrived(ep, data, source, arrival)
        self._held = keep

    async def _scheduler(self) -> None:
        while True:
            while self._heap and self._heap[0][0] <= (now := trio.current_time()):
                release, _, seq, direction, via, dest, data = heapq.heappop(self._heap)
                if via.closed:
                    continue
                self._record_lateness(now - release)
                try:
                    await via.sock.sendto(data, dest)
                except OSError:
                    self.send_errors += 1
                    continue
                self.links[direction].sent(seq, len(data))
            with trio.move_on_at(self._heap[0][0] if self._heap else math.inf):
                await self._wake.wait()
            self._wake = trio.Event()

    def _record_lateness(self, late: float) -> None:
        self.lateness["max_s"] = max(self.lateness["max_s"], late)
        if late > 0.005:
            self.lateness["over_5ms"] += 1
        if late > 0.020:
            self.lateness["over_20ms"] += 1

    async def _janitor(self) -> None:
        while True:
            await trio.sleep(JANITOR_INTERVAL)
            now = trio.current_time()
            for session in list(self.sessions):
                if now - session.last_activity > self.idle_timeout:
                    session.close()


@asynccontextmanager
async def open_netem(
    *,
    up: Impairment | None = None,
    down: Impairment | None = None,
    seed: int | None = None,
    max_queued: int = 4096,
    max_sessions: int = 8,
    idle_timeout: float = 60.0,
    bind_host: str | None = None,
) -> AsyncIterator[Netem]:
    """A running :class:`Netem` for the block; everything it opened is closed on the way out."""
    async with trio.open_nursery() as nursery:
        netem = Netem(
            nursery,
            up=up,
            down=down,
            seed=seed,
            max_queued=max_queued,
            max_sessions=max_sessions,
            idle_timeout=idle_timeout,
            bind_host=bind_host,
        )
        nursery.start_soon(netem._scheduler)
        nursery.start_soon(netem._janitor)
        try:
            yield netem
        finally:
            nursery.cancel_scope.cancel()
