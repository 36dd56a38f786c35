"""Every private aiortc/aioice reach-in of scope-trio, and :func:`verify` that they still hold.

aiortc and aioice have no public way to do what several fixes need (cancel the unawaited
connect task, free sockets an interrupted ICE operation left, reap consent checks, tune
consent timing, watch or filter the ICE sockets' datagrams, request a keyframe). Those
reach-ins are all here and nowhere else. None of them falls back to a silent no-op: each
reads the private attribute directly and a missing one raises
:class:`AiortcInternalsChanged`; :func:`verify` checks every reliance up front (attribute
present, signature unchanged, the assignment or name still in the source), so a new aiortc
or aioice that changed one fails at start-up with a message naming it, instead of quietly
bringing back a leak the reach-in was fixing.

Checked against aiortc 1.15.0 with aioice 0.10.2 (Python 3.10) and aiortc 1.16.0 with
aioice 0.13.0 (3.11+). To add a reach-in: write the accessor here and add a
:class:`Reliance` to :data:`RELIANCES` saying what it relies on and why (a future
receive-side jitter buffer replacement is here the same way: :func:`install_frame_buffers`).

One concern, by design: every private reach-in in one place, so that :func:`verify`
covers them all. That is why the module runs past the usual ~500 lines.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aioice
import aioice.ice
import aioice.stun
import aiortc
import trio
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceGatherer
from aiortc.rtcrtpreceiver import NackGenerator, TimestampMapper

from scope_trio.rtc.receiver import FrameBuffer, h264_starts_nal, vp8_starts_frame

__all__ = [
    "RELIANCES",
    "AiortcInternalsChanged",
    "Reliance",
    "verify",
    "verify_once",
]


class AiortcInternalsChanged(RuntimeError):
    """The installed aiortc/aioice no longer have a private part scope-trio relies on.

    :attr:`problems` names each one (which attribute is missing, which signature changed).
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        versions = f"aiortc {aiortc.__version__}, aioice {aioice.__version__}"
        super().__init__(
            f"{versions} changed internals scope-trio relies on:\n- " + "\n- ".join(self.problems)
        )


@dataclass(frozen=True)
class Reliance:
    """One thing a reach-in relies on: ``check()`` returns what is wrong (empty: holds)."""

    what: str
    why: str
    check: Callable[[], list[str]]


def verify() -> None:
    """Check every :data:`RELIANCES` entry; raise :class:`AiortcInternalsChanged` naming
    every one that no longer holds (all of them, not just the first)."""
    problems = [
        f"{reliance.what} ({reliance.why}): {problem}"
        for reliance in RELIANCES
        for problem in reliance.check()
    ]
    if problems:
        raise AiortcInternalsChanged(problems)


@functools.cache
def verify_once() -> None:
    """:func:`verify`, once per process after it first passed (a failure is not cached:
    every later call raises again). Every loop that hosts peer connections runs it, so an
    embedding that never calls ``configure_process`` is still checked before the first peer
    connection exists."""
    verify()


# --------------------------------------------------------------------------------------------
# Checks


def _name(owner: Any) -> str:
    return f"{owner.__module__}.{getattr(owner, '__qualname__', owner.__name__)}"


def _method(
    owner: Any, attribute: str, params: tuple[str, ...], *, coroutine: bool
) -> Callable[[], list[str]]:
    """``owner.attribute`` is a (coroutine) function whose parameters are named ``params``."""

    def check() -> list[str]:
        function = getattr(owner, attribute, None)
        if function is None:
            return [f"{_name(owner)} has no attribute {attribute!r}"]
        if not callable(function):
            return [f"{_name(owner)}.{attribute} is not callable"]
        found = tuple(inspect.signature(function).parameters)
        problems = []
        if found != params:
            problems.append(
                f"{_name(owner)}.{attribute} signature changed: expected "
                f"({', '.join(params)}), found ({', '.join(found)})"
            )
        if inspect.iscoroutinefunction(function) != coroutine:
            kind = "a coroutine function" if coroutine else "a plain function"
            problems.append(f"{_name(owner)}.{attribute} is no longer {kind}")
        return problems

    return check


def _source(owner: Any, attribute: str, *needles: str) -> Callable[[], list[str]]:
    """The source of ``owner.attribute`` still contains every needle (instance attributes
    assigned in ``__init__``, module constants read at run time)."""

    def check() -> list[str]:
        function = getattr(owner, attribute, None)
        if function is None:
            return [f"{_name(owner)} has no attribute {attribute!r}"]
        try:
            text = inspect.getsource(function)
        except (OSError, TypeError) as exc:
            return [f"cannot read the source of {_name(owner)}.{attribute}: {exc}"]
        return [
            f"{_name(owner)}.{attribute} no longer contains {needle!r}"
            for needle in needles
            if needle not in text
        ]

    return check


def _number(module: Any, attribute: str) -> Callable[[], list[str]]:
    """``module.attribute`` is a number (a tunable module constant)."""

    def check() -> list[str]:
        if not hasattr(module, attribute):
            return [f"{module.__name__} has no attribute {attribute!r}"]
        value = getattr(module, attribute)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{module.__name__}.{attribute} is not a number: {value!r}"]
        return []

    return check


def _all(*checks: Callable[[], list[str]]) -> Callable[[], list[str]]:
    return lambda: [problem for check in checks for problem in check()]


def _get(obj: Any, attribute: str) -> Any:
    """``obj.attribute``, or :class:`AiortcInternalsChanged` naming it (never a default)."""
    try:
        return getattr(obj, attribute)
    except AttributeError:
        raise AiortcInternalsChanged(
            [f"{_name(type(obj))} has no attribute {attribute!r}"]
        ) from None


StunProtocol = aioice.ice.StunProtocol
Connection = aioice.ice.Connection
logger = logging.getLogger(__name__)

RELIANCES: tuple[Reliance, ...] = (
    Reliance(
        "RTCPeerConnection.__connect",
        "cancelled before every close, so it cannot fail unawaited or start consent checks",
        _all(
            _method(RTCPeerConnection, "_RTCPeerConnection__connect", ("self",), coroutine=True),
            _source(RTCPeerConnection, "setRemoteDescription", "ensure_future(self.__connect())"),
        ),
    ),
    Reliance(
        "RTCRtpSender.__rtp_task/__rtcp_task",
        "a close re-delivers a swallowed cancel to sender tasks",
        _source(RTCRtpSender, "__init__", "self.__rtp_task", "self.__rtcp_task"),
    ),
    Reliance(
        "RTCIceGatherer._connection",
        "the aioice connection behind each ICE transport: its sockets and consent task",
        _source(RTCIceGatherer, "__init__", "self._connection = Connection("),
    ),
    Reliance(
        "aioice Connection._protocols/_query_consent_task",
        "sockets closed and consent checks reaped after a close",
        _source(Connection, "__init__", "self._protocols", "self._query_consent_task"),
    ),
    Reliance(
        "aioice binds sockets with loop.create_datagram_endpoint(StunProtocol(self))",
        "sockets a cancelled gathering bound are recorded so the close can free them",
        _all(
            _source(
                Connection,
                "get_component_candidates",
                "create_datagram_endpoint",
                "StunProtocol(self)",
            ),
            _source(StunProtocol, "__init__", "self.receiver = receiver"),
        ),
    ),
    Reliance(
        "aioice StunProtocol datagram paths",
        "the tap that watches inbound datagrams and injects faults",
        _all(
            _method(StunProtocol, "send_stun", ("self", "message", "addr"), coroutine=False),
            _method(StunProtocol, "send_data", ("self", "data", "addr"), coroutine=True),
            _method(StunProtocol, "datagram_received", ("self", "data", "addr"), coroutine=False),
            _source(StunProtocol, "send_data", "self.transport.sendto(data, addr)"),
        ),
    ),
    Reliance(
        "RTCRtpReceiver._send_rtcp_pli",
        "keyframe requests; aiortc has no public API for a PLI",
        _method(RTCRtpReceiver, "_send_rtcp_pli", ("self", "media_ssrc"), coroutine=True),
    ),
    Reliance(
        "RTCRtpReceiver.__jitter_buffer.add(packet) and the decoder queue",
        "the receive buffer: aiortc reassembles through an object we replace, and frames go "
        "to the decoder as (codec, JitterFrame) through the timestamp mapper",
        _all(
            _source(
                RTCRtpReceiver,
                "__init__",
                "self.__jitter_buffer = JitterBuffer(",
                "self.__decoder_queue",
                "self.__timestamp_mapper = TimestampMapper()",
                "self.__nack_generator = NackGenerator()",
                "self.__codecs",
            ),
            _source(RTCRtpReceiver, "receive", "self.__decoder_thread = threading.Thread("),
            _method(
                RTCRtpReceiver,
                "_handle_rtp_packet",
                ("self", "packet", "arrival_time_ms"),
                coroutine=True,
            ),
            _source(
                RTCRtpReceiver,
                "_handle_rtp_packet",
                "self.__nack_generator.add(packet)",
                "packet._data = depayload(",
                "pli_flag, encoded_frame = self.__jitter_buffer.add(packet)",
                "self.__decoder_queue.put((codec, encoded_frame))",
            ),
            _source(RTCDtlsTransport, "_handle_rtp_data", "receiver._handle_rtp_packet("),
            _method(JitterFrame, "__init__", ("self", "data", "timestamp"), coroutine=False),
            _method(TimestampMapper, "map", ("self", "timestamp"), coroutine=False),
            _source(NackGenerator, "__init__", "self.missing"),
        ),
    ),
    Reliance(
        "RTCRtpReceiver._send_rtcp_nack",
        "the receive buffer re-NACKs holes on a timer; aiortc has no public API for a NACK",
        _method(RTCRtpReceiver, "_send_rtcp_nack", ("self", "media_ssrc", "lost"), coroutine=True),
    ),
    Reliance(
        "aioice consent constants CONSENT_INTERVAL/CONSENT_FAILURES/stun.RETRY_RTO",
        "ICE consent timing is tuned process-wide; the constants must be read at run time",
        _all(
            _number(aioice.ice, "CONSENT_INTERVAL"),
            _number(aioice.ice, "CONSENT_FAILURES"),
            _number(aioice.stun, "RETRY_RTO"),
            _source(Connection, "query_consent", "CONSENT_INTERVAL", "CONSENT_FAILURES"),
            _source(aioice.stun.Transaction, "__init__", "RETRY_RTO"),
        ),
    ),
)
"""What every reach-in below relies on; :func:`verify` checks them all."""


# --------------------------------------------------------------------------------------------
# ICE connections and their sockets


_bound_sockets: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
"""aioice connection → every socket (``StunProtocol``) bound for it, as soon as it is bound."""


def record_bound_sockets(loop: asyncio.AbstractEventLoop) -> None:
    """Note every UDP socket aioice binds in ``loop`` under its connection, at once.

    aioice binds one socket per local address and tells its connection about them only once
    all are bound (``get_component_candidates``): a cancel in between (a stop while the offer
    is made) loses the sockets bound so far, and ``close()`` can never close them. With this
    record :func:`close_left_over_sockets` can. Wraps the loop's own
    ``create_datagram_endpoint`` (an instance attribute of a loop we own); it adds a weak
    reference per socket and nothing else.
    """
    create = loop.create_datagram_endpoint

    async def create_datagram_endpoint(*args: Any, **kwargs: Any) -> Any:
        transport, protocol = await create(*args, **kwargs)
        if isinstance(protocol, StunProtocol):
            _bound_sockets.setdefault(_get(protocol, "receiver"), weakref.WeakSet()).add(protocol)
        return transport, protocol

    loop.create_datagram_endpoint = create_datagram_endpoint  # type: ignore[method-assign]


_known_connections: weakref.WeakKeyDictionary[RTCPeerConnection, list[Any]] = (
    weakref.WeakKeyDictionary()
)


def remember_ice_connections(pc: RTCPeerConnection) -> list[Any]:
    """Every aioice connection ``pc`` has had so far (those BUNDLE discarded included).

    Called before ``setRemoteDescription`` (BUNDLE may discard some there) and before close.
    """
    known = _known_connections.setdefault(pc, [])
    for connection in ice_connections(pc):
        if all(c is not connection for c in known):
            known.append(connection)
    return list(known)


def ice_connections(pc: RTCPeerConnection) -> list[Any]:
    """The aioice connections ``pc`` references now (one per ICE transport, deduplicated)."""
    transports: list[Any] = []
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        if dtls is not None:
            transports.append(dtls.transport)
    # A malformed offer can leave an SCTP transport without its DTLS transport.
    if pc.sctp is not None and pc.sctp.transport is not None:
        transports.append(pc.sctp.transport.transport)
    connections: list[Any] = []
    for ice_transport in transports:
        connection = _get(ice_transport.iceGatherer, "_connection")
        if all(c is not connection for c in connections):
            connections.append(connection)
    return connections


def ice_protocols(pc: RTCPeerConnection) -> list[Any]:
    """The aioice protocols (one per local socket) of every ICE connection of ``pc``."""
    return [
        protocol
        for connection in ice_connections(pc)
        for protocol in list(_get(connection, "_protocols"))
    ]


def _open_transport(protocol: Any) -> Any:
    """The protocol's transport if it is open, else None. (aioice 0.13 declares
    ``transport`` but sets it only in ``connection_made``: absent before is normal.)"""
    transport = getattr(protocol, "transport", None)
    if transport is not None and not transport.is_closing():
        return transport
    return None


def close_left_over_sockets(connections: list[Any]) -> int:
    """After ``close()``: close every UDP socket of these connections still open; how many.

    Two interrupted aioice operations leave sockets that ``close()`` never reaches (each kept
    its file descriptor and trio-asyncio's reader task forever):

    * BUNDLE: applying the answer replaces the data channel's transport by the video's and
      closes the replaced ICE connection inside ``setRemoteDescription``. A stop that cancels
      it there interrupts that close between two sockets, and the pc no longer references
      that connection: :func:`remember_ice_connections` kept it among ``connections``.
    * Gathering: a cancel while aioice binds the sockets loses those bound so far; the
      connection does not know them, :func:`record_bound_sockets` does.
    """
    closed = 0
    for connection in connections:
        for protocol in [*_get(connection, "_protocols"), *_bound_sockets.get(connection, ())]:
            transport = _open_transport(protocol)
            if transport is not None:
                transport.close()
                closed += 1
    return closed


def release_sockets(pc: RTCPeerConnection) -> int:
    """Close the UDP sockets of an abandoned peer connection, so it leaks no file descriptor
    (aiortc offers no way to tear a half-closed peer connection down); how many."""
    released = 0
    for protocol in ice_protocols(pc):
        transport = _open_transport(protocol)
        if transport is not None:
            transport.close()
            released += 1
    return released


# --------------------------------------------------------------------------------------------
# Tasks aiortc/aioice leave behind


def cancel_connect_tasks(pc: RTCPeerConnection, loop: asyncio.AbstractEventLoop) -> None:
    """Cancel ``pc``'s connect task before ``close()``, so it cannot fail unawaited.

    ``setLocalDescription``/``setRemoteDescription`` start aiortc's private
    ``RTCPeerConnection.__connect`` with ``ensure_future`` and nobody awaits it. It starts the
    transports one after the other (ICE, DTLS, then the next transport's ICE) and does not
    look at the closed flag between them: a close that lands after ICE completed, during the
    DTLS handshake, makes it start the SCTP transport's ICE, which close() has just stopped,
    and it fails with ``InvalidStateError('RTCIceTransport is closed')`` that no one
    retrieves (10 per 500 start/stop cycles in benchmarks/stop_latency.py, all from stops
    while connecting). Cancelled first, it ends at the await it is in; ``close()`` then stops
    whatever it had started. It is also the only task that runs aioice's ``connect()``, which
    starts the consent checks: cancelled, it can no longer start them after the close.
    Found among the loop's tasks by its code object.
    """
    connect_code = _get(RTCPeerConnection, "_RTCPeerConnection__connect").__code__
    for task in asyncio.all_tasks(loop):
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)  # a task may wrap a non-coroutine awaitable
        if (
            not task.done()
            and getattr(coro, "cr_code", None) is connect_code
            and frame is not None
            and frame.f_locals.get("self") is pc
        ):
            task.cancel()


SENDER_NUDGE_INTERVAL = 0.5
"""How often a close re-delivers the cancel to senders that are still running."""


async def recancel_stuck_senders(pc: RTCPeerConnection) -> None:
    """Re-deliver the cancel to sender tasks that outlive ``close()``'s first cancel; runs
    until cancelled.

    ``close()`` stops each sender by cancelling its RTP task and waiting for it to exit. Now
    and then (about 1 close in 40 under load, with frames flowing) that cancel is swallowed
    on the way through the asyncio/trio bridge and the task keeps encoding, so ``close()``
    would wait until its deadline. Cancelling again is harmless for a task that is exiting.
    """
    while True:
        await trio.sleep(SENDER_NUDGE_INTERVAL)
        for sender in pc.getSenders():
            for name in ("_RTCRtpSender__rtp_task", "_RTCRtpSender__rtcp_task"):
                task = _get(sender, name)
                if task is not None and not task.done():
                    task.cancel()


def reap_consent_checks(
    connections: list[Any],
    loop: asyncio.AbstractEventLoop,
    *,
    again: tuple[float, ...] = (0.25, 1.0),
) -> None:
    """Cancel consent checks that outlive ``close()``, now and a little later.

    aioice starts consent freshness checks when ICE completes. When a close lands between
    "completed" and the start of those checks, they begin after the connection closed and
    run forever (a task leak per such close, seen by benchmarks/stop_latency.py). Since
    :func:`cancel_connect_tasks` cancels the only task that starts them, this is a backstop.
    The later passes are plain asyncio timers, owned by the loop (cancelled with it).
    """
    for connection in connections:
        task = _get(connection, "_query_consent_task")
        if task is not None and not task.done():
            task.cancel()
    if again:
        loop.call_later(
            again[0],
            functools.partial(reap_consent_checks, connections, loop, again=again[1:]),
        )


# --------------------------------------------------------------------------------------------
# Keyframe requests


async def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """Send an RTCP PLI for ``media_ssrc`` from ``receiver`` (asyncio side: await via aio)."""
    await _get(receiver, "_send_rtcp_pli")(media_ssrc)


# --------------------------------------------------------------------------------------------
# The receive buffer of video receivers (scope_trio.rtc.receiver.FrameBuffer in aiortc's place)


_installed_buffers: weakref.WeakKeyDictionary[RTCRtpReceiver, InstalledFrameBuffer] = (
    weakref.WeakKeyDictionary()
)


class InstalledFrameBuffer:
    """Stands in for one video receiver's aiortc ``JitterBuffer``.

    aiortc's ``_handle_rtp_packet`` still does everything up to reassembly (statistics,
    REMB, RTX unwrapping, the first NACK of a new gap, depayloading) and calls
    ``add(packet)`` here. This hands the packet to a :class:`FrameBuffer`, puts every frame
    it completes straight into the receiver's decoder queue (through aiortc's timestamp
    mapper, exactly as aiortc does) and returns "no frame, no PLI" to aiortc. After each
    packet, and on a timer while holes or a keyframe request are pending, it sends the
    re-NACKs and PLIs the buffer asks for, and keeps aiortc's NACK generator from asking
    for holes the buffer gave up. :meth:`close` cancels the timer and its task.
    """

    def __init__(self, receiver: RTCRtpReceiver, loop: asyncio.AbstractEventLoop) -> None:
        self._receiver = receiver
        self._loop = loop
        self.buffer: FrameBuffer | None = None
        self._codec: Any = None
        self._ssrc: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Future[None] | None = None
        self._closed = False
        self.retransmission = False
        """The packet being handled came as RTX (set before aiortc unwraps it)."""

    def arrived(self, packet: Any) -> None:
        """A raw RTP packet reached the receiver (before aiortc unwraps RTX)."""
        codec = _get(self._receiver, "_RTCRtpReceiver__codecs").get(packet.payload_type)
        self.retransmission = codec is not None and str(codec.name).lower() == "rtx"

    def add(self, packet: Any) -> tuple[bool, None]:
        """aiortc's ``JitterBuffer.add``: takes the depayloaded packet (``packet._data``)."""
        codecs = _get(self._receiver, "_RTCRtpReceiver__codecs")
        codec = codecs.get(packet.payload_type)
        if codec is None:
            return False, None
        name = str(codec.name).lower()
        if self.buffer is None or self.buffer.codec != name:
            self.buffer = FrameBuffer(name)
        self._codec = codec
        self._ssrc = packet.ssrc
        payload = bytes(packet.payload)
        start = vp8_starts_frame(payload) if name == "vp8" else h264_starts_nal(payload)
        data = _get(packet, "_data")
        self.buffer.add(
            packet.sequence_number,
            packet.timestamp,
            bool(packet.marker),
            data,
            time.monotonic(),
            start=start,
            retransmission=self.retransmission,
        )
        self._deliver()
        return False, None

    def _deliver(self) -> None:
        assert self.buffer is not None
        frames = self.buffer.ready()
        if not frames or _get(self._receiver, "_RTCRtpReceiver__decoder_thread") is None:
            return
        mapper = _get(self._receiver, "_RTCRtpReceiver__timestamp_mapper")
        decoder_queue = _get(self._receiver, "_RTCRtpReceiver__decoder_queue")
        for frame in frames:
            timestamp = mapper.map(frame.timestamp)
            decoder_queue.put((self._codec, JitterFrame(data=frame.data, timestamp=timestamp)))

    async def act(self) -> None:
        """Send the NACKs and PLI due now; arm the timer for the next deadline."""
        buffer, ssrc = self.buffer, self._ssrc
        if buffer is None or ssrc is None or self._closed:
            return
        now = time.monotonic()
        actions = buffer.actions(now)
        self._deliver()  # a give-up can release a keyframe that waited behind the hole
        generator = _get(self._receiver, "_RTCRtpReceiver__nack_generator")
        if generator is not None:
            generator.missing.intersection_update(buffer.holes)
        if actions.nack:
            await _get(self._receiver, "_send_rtcp_nack")(ssrc, actions.nack)
        if actions.pli:
            await _get(self._receiver, "_send_rtcp_pli")(ssrc)
        self._arm(buffer.next_deadline(), now)

    def _arm(self, deadline: float | None, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None and not self._closed:
            self._timer = self._loop.call_later(max(0.0, deadline - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or (self._task is not None and not self._task.done()):
            return
        if _get(self._receiver, "_RTCRtpReceiver__decoder_thread") is None:
            return  # the receiver stopped
        self._task = asyncio.ensure_future(self._act_logged(), loop=self._loop)

    async def _act_logged(self) -> None:
        try:
            await self.act()
        except Exception:  # a timer's failure must not go unretrieved; packets retry it
            logger.exception("receive buffer timer failed")

    def close(self) -> None:
        """Stop the timer and its task (the receiver is being closed)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()


def install_frame_buffers(pc: RTCPeerConnection, loop: asyncio.AbstractEventLoop) -> int:
    """Give every video receiver of ``pc`` an :class:`InstalledFrameBuffer` (once each);
    returns how many were installed now. Call before media flows (right after applying the
    remote description: receivers start after ICE and DTLS)."""
    count = 0
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "video" or receiver in _installed_buffers:
            continue
        _get(receiver, "_RTCRtpReceiver__jitter_buffer")
        installed = InstalledFrameBuffer(receiver, loop)
        handle_rtp = _get(receiver, "_handle_rtp_packet")

        async def handle(
            packet: Any, arrival_time_ms: int, *, _h: Any = handle_rtp, _i: Any = installed
        ) -> None:
            _i.arrived(packet)
            await _h(packet, arrival_time_ms)
            await _i.act()

        receiver._RTCRtpReceiver__jitter_buffer = installed  # type: ignore[attr-defined]
        receiver._handle_rtp_packet = handle  # type: ignore[method-assign]
        _installed_buffers[receiver] = installed
        count += 1
    return count


def installed_frame_buffer(receiver: RTCRtpReceiver) -> InstalledFrameBuffer | None:
    """The buffer :func:`install_frame_buffers` gave ``receiver`` (None: aiortc's own)."""
    return _installed_buffers.get(receiver)


def close_frame_buffers(pc: RTCPeerConnection) -> None:
    """Stop the timers of every installed buffer of ``pc``."""
    for transceiver in pc.getTransceivers():
        installed = _installed_buffers.get(transceiver.receiver)
        if installed is not None:
            installed.close()


# --------------------------------------------------------------------------------------------
# ICE consent timing (process-global module constants of aioice)


def read_consent() -> tuple[float, int, float]:
    """aioice's ``(CONSENT_INTERVAL, CONSENT_FAILURES, stun.RETRY_RTO)`` now."""
    return (
        float(_get(aioice.ice, "CONSENT_INTERVAL")),
        int(_get(aioice.ice, "CONSENT_FAILURES")),
        float(_get(aioice.stun, "RETRY_RTO")),
    )


def write_consent(interval: float, failures: int, rto: float) -> None:
    """Set those constants for the whole process (read by aioice at run time)."""
    read_consent()  # all three exist: never create a constant aioice would not read
    aioice.ice.CONSENT_INTERVAL = interval  # type: ignore[assignment]  # declared int
    aioice.ice.CONSENT_FAILURES = failures
    aioice.stun.RETRY_RTO = rto


# --------------------------------------------------------------------------------------------
# The datagram tap: inbound watch and fault injection on the ICE sockets


def _never() -> bool:
    return False


def _no_delay() -> float:
    return 0.0


class DatagramTap:
    """The one wrapper around an aioice protocol's datagram paths, shared by all its users.

    aioice has no hook for this: the protocol instance's ``send_stun``, ``send_data`` and
    ``datagram_received`` are replaced once, and what users want is state of the tap:
    ``drop`` and ``delay`` (fault injection) and ``observers`` (the inbound watch), called
    for every datagram received after drop and delay. Delays are asyncio timers, owned by
    the loop.
    """

    def __init__(self, protocol: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.protocol = protocol
        self.loop = loop
        self.drop: Callable[[], bool] = _never
        self.delay: Callable[[], float] = _no_delay
        self.observers: list[Callable[[], None]] = []
        self._send_stun = _get(protocol, "send_stun")
        self._send_data = _get(protocol, "send_data")
        self._datagram_received = _get(protocol, "datagram_received")
        protocol.send_stun = self.send_stun
        protocol.send_data = self.send_data
        protocol.datagram_received = self.datagram_received

    def send_stun(self, message: Any, addr: tuple[str, int]) -> None:
        if self.drop():
            return
        delay = self.delay()
        if delay > 0:
            self.loop.call_later(delay, self._send_stun_later, message, addr)
        else:
            self._send_stun(message, addr)

    def _send_stun_later(self, message: Any, addr: tuple[str, int]) -> None:
        if _open_transport(self.protocol) is not None:
            self._send_stun(message, addr)

    async def send_data(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.drop():
            return
        delay = self.delay()
        if delay > 0:  # not awaited: the sender goes on, as it would on a long path
            self.loop.call_later(delay, self._send_data_later, data, addr)
        else:
            await self._send_data(data, addr)

    def _send_data_later(self, data: bytes, addr: tuple[str, int]) -> None:
        transport = _open_transport(self.protocol)
        if transport is not None:  # what StunProtocol.send_data does, without the coroutine
            transport.sendto(data, addr)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.drop():
            return
        delay = self.delay()
        if delay > 0:
            self.loop.call_later(delay, self._deliver_later, data, addr)
        else:
            self._deliver(data, addr)

    def _deliver_later(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if _open_transport(self.protocol) is not None:
            self._deliver(data, addr)

    def _deliver(self, data: bytes, addr: tuple[Any, ...]) -> None:
        for observer in self.observers:
            observer()
        self._datagram_received(data, addr)


def tap(protocol: Any, loop: asyncio.AbstractEventLoop) -> DatagramTap:
    """The protocol's :class:`DatagramTap`, installed on first use."""
    existing = getattr(protocol, "_scope_trio_tap", None)  # our own attribute
    if isinstance(existing, DatagramTap):
        return existing
    installed = DatagramTap(protocol, loop)
    protocol._scope_trio_tap = installed
    return installed


# --------------------------------------------------------------------------------------------
# Triggered checks (RFC 8445 section 7.3.1.4)

RELIANCES = (
    *RELIANCES,
    Reliance(
        "aioice StunProtocol.transactions and stun.Transaction.__request/__addr",
        "a check received from the remote resends our own unanswered check to it at once",
        _all(
            _source(StunProtocol, "__init__", "self.transactions"),
            _source(aioice.stun.Transaction, "__init__", "self.__request = ", "self.__addr = "),
        ),
    ),
)

_STUN_BINDING_REQUEST = b"\x00\x01"
_STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"


def _is_binding_request(data: bytes) -> bool:
    return len(data) >= 20 and data[:2] == _STUN_BINDING_REQUEST and data[4:8] == _STUN_MAGIC_COOKIE


def check_back_at_once(protocol: Any) -> None:
    """Make ``protocol`` answer a connectivity check with its own, at once (once per protocol).

    RFC 8445 (7.3.1.4): a check received on a pair whose own check is still in progress
    makes the agent check that pair again at once. aioice does not; its check waits for its
    STUN retransmission timer (the server's consent timing makes that 1 s, then doubling).
    So when the remote's check gets through before ours is answered (ours was lost, or sent
    into a path that has just returned), connecting waited for our timer: a rebuild that
    began during a 1.5 s blackout connected ~1 s after the path returned. After aioice has
    handled an incoming binding request, every binding request of ours that still waits for
    an answer from that address is sent again, as the same transaction, so the answer to it
    completes our check a round trip later. (Through :class:`DatagramTap` if one is
    installed later, its faults apply: the tap wraps this.)
    """
    if getattr(protocol, "_scope_trio_check_back", False):  # our own attribute
        return
    transactions: dict[bytes, Any] = _get(protocol, "transactions")
    datagram_received = _get(protocol, "datagram_received")

    def received(data: bytes, addr: tuple[Any, ...]) -> None:
        datagram_received(data, addr)
        if not _is_binding_request(data):
            return
        for transaction in list(transactions.values()):
            request = _get(transaction, "_Transaction__request")  # checked by verify()
            target = _get(transaction, "_Transaction__addr")
            if (
                tuple(target[:2]) == tuple(addr[:2])
                and request.message_method == aioice.stun.Method.BINDING
                and request.message_class == aioice.stun.Class.REQUEST
            ):
                protocol.send_stun(request, target)

    protocol.datagram_received = received
    protocol._scope_trio_check_back = True


# ============================================================================================
# BEGIN section "outgoing media receipt" (the server→cloud direction, issue 12)
#
# What the remote peer receives of our video: its RTCP receiver reports for our sender's
# SSRC, the send time of each RTP packet we put on the wire, our sender's round-trip
# estimate, and a keyframe forced on our encoder. Used by :mod:`scope_trio.rtc.uplink`. Keep
# this section last and self-contained (its reliances are appended to RELIANCES here).
# ============================================================================================

from aiortc.rtcdtlstransport import RTCDtlsTransport  # noqa: E402 - this section's imports
from aiortc.rtp import RtcpReceiverInfo, RtcpRrPacket, RtcpSrPacket  # noqa: E402

RELIANCES = (
    *RELIANCES,
    Reliance(
        "RTCRtpSender._handle_rtcp_packet, called per recipient by RTCDtlsTransport",
        "the remote's receiver reports of our video (highest sequence received), read by a "
        "wrapper on the sender instance",
        _all(
            _method(RTCRtpSender, "_handle_rtcp_packet", ("self", "packet"), coroutine=True),
            _source(RTCDtlsTransport, "_handle_rtcp_data", "recipient._handle_rtcp_packet(packet)"),
            _source(RTCRtpSender, "__init__", "self._ssrc = "),
            lambda: (
                []
                if "highest_sequence" in RtcpReceiverInfo.__dataclass_fields__
                else ["aiortc.rtp.RtcpReceiverInfo has no field 'highest_sequence'"]
            ),
        ),
    ),
    Reliance(
        "RTCRtpSender.__rtt",
        "the sender's round-trip estimate from receiver reports, subtracted from starvation",
        _source(RTCRtpSender, "_handle_rtcp_packet", "self.__rtt = "),
    ),
    Reliance(
        "RTCRtpSender._send_keyframe",
        "a keyframe forced on our encoder when a silent path returns (what a PLI does)",
        _method(RTCRtpSender, "_send_keyframe", ("self",), coroutine=False),
    ),
)


def sender_ssrc(sender: RTCRtpSender) -> int:
    """The SSRC of ``sender``'s RTP stream (fixed at construction)."""
    return int(_get(sender, "_ssrc"))


def sender_rtt(sender: RTCRtpSender) -> float | None:
    """``sender``'s smoothed round-trip estimate in seconds (None before the first)."""
    value = _get(sender, "_RTCRtpSender__rtt")
    return None if value is None else float(value)


def force_keyframe(sender: RTCRtpSender) -> None:
    """Make ``sender``'s encoder emit a keyframe next (what a received PLI does)."""
    _get(sender, "_send_keyframe")()


def observe_receiver_reports(sender: RTCRtpSender, on_report: Callable[[int], None]) -> None:
    """Call ``on_report(highest_sequence)`` for every receiver report block about ``sender``'s
    stream (in an RR or an SR), before the sender handles the packet.

    The DTLS transport routes each RTCP packet to ``recipient._handle_rtcp_packet``; the
    wrapper is an instance attribute, installed once per sender (later calls add observers).
    """
    observers: list[Callable[[int], None]] | None = getattr(sender, "_scope_trio_rr", None)
    if observers is not None:
        observers.append(on_report)
        return
    observers = [on_report]
    original = _get(sender, "_handle_rtcp_packet")
    ssrc = sender_ssrc(sender)

    async def handle_rtcp_packet(packet: Any) -> None:
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc == ssrc:
                    for observer in observers:
                        observer(int(report.highest_sequence) & 0xFFFF)
        await original(packet)

    sender._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]
    sender._scope_trio_rr = observers  # type: ignore[attr-defined]


def observe_sent_rtp(protocol: Any, on_sent: Callable[[int, int], None]) -> None:
    """Call ``on_sent(ssrc, sequence_number)`` for every RTP packet (not RTCP) the aioice
    protocol sends. SRTP leaves the RTP header in the clear, so it is read from the datagram.

    Wraps the protocol's ``send_data`` (as the datagram tap does; the two compose in either
    order), once per protocol; later calls add observers.
    """
    observers: list[Callable[[int, int], None]] | None = getattr(protocol, "_scope_trio_sent", None)
    if observers is not None:
        observers.append(on_sent)
        return
    observers = [on_sent]
    send_data = _get(protocol, "send_data")

    async def send_data_observed(data: bytes, addr: tuple[str, int]) -> None:
        # RTP version 2, and not RTCP (payload types 192-223 share the byte with the marker)
        if _is_rtp(data):
            ssrc = int.from_bytes(data[8:12], "big")
            seq = int.from_bytes(data[2:4], "big")
            for observer in observers:
                observer(ssrc, seq)
        await send_data(data, addr)

    protocol.send_data = send_data_observed
    protocol._scope_trio_sent = observers


def _is_rtp(data: bytes) -> bool:
    return len(data) >= 12 and data[0] >> 6 == 2 and not 192 <= data[1] <= 223


def observe_received_rtp(protocol: Any, on_received: Callable[[], None]) -> None:
    """Call ``on_received()`` for every RTP datagram (not RTCP, STUN or DTLS) the aioice
    protocol receives, on arrival (before a fault filter of the datagram tap, if that was
    installed later). Wraps ``datagram_received`` once per protocol; later calls add."""
    observers: list[Callable[[], None]] | None = getattr(protocol, "_scope_trio_rtp_in", None)
    if observers is not None:
        observers.append(on_received)
        return
    observers = [on_received]
    datagram_received = _get(protocol, "datagram_received")

    def datagram_received_observed(data: bytes, addr: tuple[Any, ...]) -> None:
        if _is_rtp(data):
            for observer in observers:
                observer()
        datagram_received(data, addr)

    protocol.datagram_received = datagram_received_observed
    protocol._scope_trio_rtp_in = observers


# END section "outgoing media receipt"
