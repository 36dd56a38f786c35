"""The real cloud media session: one aiortc peer connection to the cloud, run from trio.

:class:`CloudMediaSession` implements :class:`scope_trio.core.session.MediaSession`, so the
reconnect supervisor drives it exactly as it drives the fake. Per session:

1. ``get_ice_servers`` over the signaling link; a new peer connection with exactly those;
2. an outgoing video track fed from :class:`VideoInput` (a short queue that never lags,
   see :class:`scope_trio.rtc.TrioVideoSource`; black after 1 s without input), the
   ordered data channel ``parameters``, and an offer carrying ``initialParameters``; the
   cloud's answer applied;
3. ``connected`` and the data channel open awaited (the supervisor's attempt deadline bounds
   the whole connect), the cloud's frames already handed on meanwhile; a keyframe requested
   on the inbound video;
4. inbound frames handed to ``on_frame`` until the session is lost.

Loss of packets is not loss of the session. Three failures are told apart:

* **the path is dead**: no datagram at all from the cloud for ``path_silence_timeout`` seconds
  (seen in ~1.05 s whatever the round trip). A silence shorter than that (a blip) is no loss:
  when datagrams return, a keyframe is requested from the cloud at once (and one forced on our
  encoder for the cloud's decoder), so live pictures come back a round trip later instead of
  after the stale backlog;
* **the server→cloud direction is dead**: the cloud's RTCP receiver reports say it has
  received nothing we sent for ``uplink_silence_timeout`` seconds beyond a round trip
  (:mod:`scope_trio.rtc.uplink`), while it still talks to us (after a two-way silence, only
  if its video does not follow within a round trip: that was a blip). While the cloud's
  video still reaches us, a starved report is taken for a path that just became slower (our
  round-trip estimate lags it) unless the cloud received nothing since its previous report;
* **the decoder is stuck while packets still flow**: no frame for ``stall_timeout`` seconds
  starts an in-place recovery (keyframe requests every 0.25 s; the receive path handles its
  own holes); only if no picture returns within ``stall_recovery_timeout`` more is it a loss.

Other loss signals: the peer connection going ``closed``/``failed`` without us closing it
(aiortc reports a lost path as ``closed``; with the server's consent timing,
:func:`scope_trio.rtc.configure_process`, ICE consent does so for a silent path in ~8 s), the
inbound track ending, no first frame within ``first_frame_timeout``. Each ends the session
once, with a typed reason. The peer connection is closed exactly once, shielded and under its
own deadline, on every way out.

Must run inside an open trio-asyncio loop (:func:`scope_trio.rtc.open_loop`).

One concern, a session and the watchers that decide when it is lost, kept together so the
loss policy reads in one place: that is why the module runs past the usual ~500 lines.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio
from av import VideoFrame

from scope_trio import rtc
from scope_trio.core.session import Loss, LossKind, SessionAttempt, SessionClosedError
from scope_trio.ops import logs

logger = logging.getLogger(__name__)

PARAMETERS_CHANNEL = "parameters"
SILENCE_CONFIRM = 0.05
"""Seconds a path-silence deadline is re-checked after it passed (see ``path_silence``)."""
RETURN_GAP = 0.2
"""A silence of the inbound direction at least this long, ended by a datagram, is a path that
returned: a keyframe is requested at once (video never leaves such a gap on a live path)."""
RETURN_POLL = 0.02
"""How often the inbound direction is looked at for a return (adds at most this much)."""
UPLINK_CONFIRM = 0.1
"""Beyond a round trip: how long the cloud's video is awaited before an ambiguous starved
report (after a silence of both directions) is taken as a dead server→cloud direction."""
CLOUD_VIDEO_QUIET = 0.2
"""A starved report is believed only once the cloud's video has been quiet this long (or
``uplink_silence_timeout`` if shorter), or when the cloud received nothing since its
previous report (see ``uplink``)."""
KEYFRAME_INTERVAL = 0.25
"""Pause between keyframe requests while pictures are awaited."""


class Signaling(Protocol):
    """The part of :class:`scope_trio.cloud.link.CloudLink` a media session needs."""

    async def request(
        self,
        msg_type: str,
        fields: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors CloudLink.request
    ) -> dict[str, Any]: ...


class CloudAnswerError(Exception):
    """The cloud's reply to our offer could not be used."""


@dataclass(frozen=True)
class MediaConfig:
    """Per-session media settings."""

    fps: float = 30.0
    """Rate at which frames are sent to the cloud."""
    idle_black_after: float = 1.0
    """Without input for this long, black frames are sent (as Scope did)."""
    stall_timeout: float = 2.0
    """No inbound frame for this long (after the first) starts an in-place recovery:
    keyframe requests, while the receive path resolves its own holes."""
    stall_recovery_timeout: float = 1.0
    """After ``stall_timeout``, pictures must return within this long, or the session is
    lost. A keyframe takes a round trip to be asked for and sent, plus a retransmission
    round trip when one of its packets is lost. Measured through the emulator (network
    benchmark, blip profiles at 100 ms RTT): live pictures 0.28-0.29 s after the request;
    at 300 ms RTT ±60 ms with one keyframe packet lost that becomes ~0.3 + 0.3 + 0.12 s of
    jitter ≈ 0.75 s, so 1 s covers one retransmission round at the longest round trips we
    target. ``0``: the stall is a loss at once, as before."""
    uplink_silence_timeout: float = 0.3
    """The cloud's receiver reports say it received nothing we sent for this long beyond a
    round trip: the server→cloud direction is dead, a loss. (When the report follows a
    silence of our inbound direction, it could also be a two-way blip reported just before
    our packets reached the cloud again: then the cloud's video is awaited a round trip
    + 0.1 s first. While the cloud's video still flows, one starved report is taken for a
    round trip that grew faster than our estimate of it; two in a row are a loss.) Healthy,
    the excess stays within ±0.1 s (measured: about 0 at 100 ms
    RTT). The cloud reports every 0.5-1.5 s, so a dead direction is seen at the first report
    0.3 s + RTT after the fault: 0.5-2 s, ~1 s typically. ``math.inf`` turns it off."""
    path_silence_timeout: float = 1.0
    """No datagram at all from the cloud (RTP, RTCP, STUN, anything) for this long, once
    connected, is a loss. A long round trip only delays packets; silence means the path is
    dead. Video never leaves such a gap; without video the answers to our consent checks
    arrive every consent interval (0.3 s, up to 0.36 s) + RTT, so this must stay above that
    (1 s covers round trips up to ~0.6 s even with no video and no RTCP at all). ``math.inf``
    turns it off."""
    first_frame_timeout: float = 10.0
    """No inbound frame at all for this long after connecting is a loss."""
    close_timeout: float = 5.0
    """Bound on closing the peer connection (shielded)."""
    request_timeout: float = 10.0
    """Deadline of each signaling request a session makes."""


@dataclass
class MediaStats:
    """Counters shared by every session of one owner (the relay or the server)."""

    offers_sent: int = 0
    offers_successful: int = 0
    frames_received_from_cloud: int = 0
    sessions: dict[str, str] = field(default_factory=dict)
    """Cloud session id → last connection state."""
    frames_sent_by_closed_sessions: int = 0
    stall_recoveries: int = 0
    """Stalls that pictures recovered from in place (no rebuild)."""
    path_returns: int = 0
    """Silences of the path shorter than a loss, ended by datagrams (a keyframe requested)."""
    retransmission_delay: float | None = None
    """How long a hole of the running session's cloud video typically waits for its
    retransmission (about the round trip); forwarding the cloud's frames allows backlogs
    this late (:func:`scope_trio.rtc.lateness_bound`)."""
    slower_path_reports: int = 0
    """Starved receiver reports taken for a round trip that grew faster than our estimate
    of it (the cloud's video still arrived), not for a dead server→cloud direction."""
    live_sources: set[rtc.TrioVideoSource] = field(default_factory=set, repr=False)
    """Outgoing tracks of the sessions running now; their count is read live."""

    @property
    def frames_sent_to_cloud(self) -> int:
        """Frames handed to the encoder for the cloud, by every session, the running one
        included (read from its track, so the status never lags a live session)."""
        live = sum(source.frames_sent for source in self.live_sources)
        return self.frames_sent_by_closed_sessions + live


class VideoInput:
    """Frames from the local producer (the browser, a test) to whichever session is live.

    Outlives sessions: a reconnect attaches the new session's track to the same input, so
    the producer never notices the cloud side was rebuilt.
    """

    def __init__(self) -> None:
        self._sink: rtc.TrioVideoSource | None = None
        self.frames_pushed = 0

    def push(self, frame: VideoFrame) -> None:
        """Offer a frame to the live session (dropped when there is none)."""
        self.frames_pushed += 1
        if self._sink is not None:
            self._sink.push(frame)

    def _attach(self, sink: rtc.TrioVideoSource) -> None:
        self._sink = sink

    def _detach(self, sink: rtc.TrioVideoSource) -> None:
        if self._sink is sink:
            self._sink = None


class CloudMediaSession:
    """One cloud media session (see the module docstring). Use once; make a new one per try."""

    def __init__(
        self,
        signaling: Signaling,
        *,
        video_input: VideoInput | None = None,
        on_frame: Callable[[VideoFrame], object] | None = None,
        config: MediaConfig | None = None,
        stats: MediaStats | None = None,
        user_id: str | None = None,
    ) -> None:
        self._signaling = signaling
        self._input = video_input or VideoInput()
        self._on_frame = on_frame
        self._config = config or MediaConfig()
        self.stats = stats or MediaStats()
        self._user_id = user_id
        self._channel: rtc.DataChannel | None = None
        self._pc: rtc.PeerConnection | None = None
        self._inbound: rtc.InboundDatagrams | None = None
        self._uplink: rtc.UplinkReceipts | None = None
        self._pc_close_requested = trio.Event()
        self._simulated = False
        self._open = False
        self.session_id: str | None = None

    def simulate_loss(self) -> None:
        """Close the peer connection as a dead path would (debug route), not as a stop.

        The loss then takes the real path: the state watcher sees ``closed`` and reports it.
        """
        if self._pc is not None and self._open:
            self._simulated = True
            self._pc_close_requested.set()

    # ------------------------------------------------------------------ protocol

    def send_parameters(self, update: Mapping[str, Any]) -> None:
        channel = self._channel
        if not self._open or channel is None or not channel.is_open:
            raise SessionClosedError("the cloud media session is not connected")
        try:
            channel.send(json.dumps(dict(update)))
        except rtc.ChannelClosedError as exc:  # closing under us, between check and send
            raise SessionClosedError("the parameters channel closed") from exc

    async def run(
        self,
        attempt: SessionAttempt,
        *,
        task_status: trio.TaskStatus[None],
    ) -> Loss:
        ice = await self._signaling.request("get_ice_servers", timeout=self._config.request_timeout)
        pc = rtc.PeerConnection(_ice_servers(ice), close_timeout=self._config.close_timeout)
        source = rtc.TrioVideoSource(
            fps=self._config.fps, idle_timeout=self._config.idle_black_after
        )
        self.stats.live_sources.add(source)
        try:
            return await self._run_with(pc, source, attempt, task_status)
        finally:
            self._open = False
            self._input._detach(source)
            source.stop()
            self.stats.live_sources.discard(source)
            self.stats.frames_sent_by_closed_sessions += source.frames_sent
            await pc.close()
            if self.session_id is not None:
                self.stats.sessions[self.session_id] = "closed"

    async def _run_with(
        self,
        pc: rtc.PeerConnection,
        source: rtc.TrioVideoSource,
        attempt: SessionAttempt,
        task_status: trio.TaskStatus[None],
    ) -> Loss:
        self._pc = pc
        pc.add_track(source)
        channel = pc.open_data_channel(PARAMETERS_CHANNEL, ordered=True)
        self._channel = channel
        self._input._attach(source)

        offer = await pc.create_offer()
        self._inbound = pc.watch_inbound()  # the ICE sockets exist once the offer is made
        self._uplink = pc.watch_uplink(source)
        fields: dict[str, Any] = {
            "sdp": offer.sdp,
            "sdp_type": offer.type,
            "initialParameters": attempt.parameters(),  # as they are now, not at creation
        }
        if self._user_id is not None:
            fields["user_id"] = self._user_id
        self.stats.offers_sent += 1
        answer = await self._signaling.request(
            "offer", fields, timeout=self._config.request_timeout
        )
        sdp, session_id = answer.get("sdp"), answer.get("sessionId")
        if not isinstance(sdp, str) or not isinstance(session_id, str):
            raise CloudAnswerError("the cloud's answer lacks 'sdp' or 'sessionId'")
        self.session_id = session_id
        logs.bind_session(session_id)  # this task and its loss watchers log for this session
        self.stats.offers_successful += 1
        await pc.apply_answer(sdp, str(answer.get("sdp_type", "answer")))
        # The answer announces the cloud's track, and its frames flow once DTLS is up, a few
        # round trips before the parameters channel opens (SCTP): they go to the user at
        # once (a rebuild shows live pictures ~0.25 s sooner at 100 ms RTT), while the
        # session still counts as connecting.
        track = await pc.tracks.receive()
        async with trio.open_nursery() as early:
            early.start_soon(track.receive_video, partial(self._hand_on, track))
            await pc.wait_state("connected")
            await channel.wait_open()
            early.cancel_scope.cancel()
        self._open = True
        self.stats.sessions[session_id] = "connected"
        logger.info("cloud media session %s connected", session_id)
        task_status.started()

        return await self._serve(pc, track, attempt.lost, source)

    def _hand_on(self, track: rtc.RemoteTrack, frame: VideoFrame) -> None:
        """Every frame from the cloud, from the first one on: counted and handed on."""
        self.stats.frames_received_from_cloud += 1
        self.stats.retransmission_delay = track.retransmission_delay()
        if self._on_frame is not None:
            self._on_frame(frame)

    async def _serve(
        self,
        pc: rtc.PeerConnection,
        track: rtc.RemoteTrack,
        on_lost: Callable[[Loss], None],
        source: rtc.TrioVideoSource,
    ) -> Loss:
        """Run the loss watchers until the first fires; report it at once, return it."""
        async with trio.open_nursery() as nursery:

            def lost(loss: Loss) -> None:
                self._open = False  # updates from now on are kept for the next session
                logger.warning("cloud media session %s lost: %s", self.session_id, loss)
                on_lost(loss)
                nursery.cancel_scope.cancel()

            watch = _LossWatch(self, pc, track, source=source, on_lost=lost)
            nursery.start_soon(watch.connection_state)
            nursery.start_soon(watch.inbound_frames)
            nursery.start_soon(watch.stall)
            nursery.start_soon(watch.path_silence)
            nursery.start_soon(watch.path_returns)
            nursery.start_soon(watch.uplink)
            nursery.start_soon(watch.keyframe_requests)
            nursery.start_soon(watch.close_on_request)
        return watch.loss or Loss(LossKind.OTHER, "session ended")


class _LossWatch:
    """The watchers of one connected session. The first loss signal wins; later ones are
    ignored, so the session ends exactly once with one reason."""

    def __init__(
        self,
        session: CloudMediaSession,
        pc: rtc.PeerConnection,
        track: rtc.RemoteTrack,
        *,
        source: rtc.TrioVideoSource,
        on_lost: Callable[[Loss], None],
    ) -> None:
        self.session = session
        self.source = source
        self.config = session._config
        self.pc = pc
        self.track = track
        self._on_lost = on_lost
        self.loss: Loss | None = None
        self.first_frame = trio.Event()
        self.new_frame = trio.Event()
        """Set by the next frame, then replaced."""
        self.last_frame_at = trio.current_time()

    def lost(self, kind: LossKind, detail: str) -> None:
        if self.loss is None:
            self.loss = Loss(kind, detail)
            self._on_lost(self.loss)

    def peer_connection_lost(self, state: str) -> None:
        kind = (
            LossKind.PEER_CONNECTION_FAILED
            if state == "failed"
            else LossKind.PEER_CONNECTION_CLOSED
        )
        self.lost(kind, f"peer connection {state}")

    def _deliver(self, frame: VideoFrame) -> None:
        self.last_frame_at = trio.current_time()
        self.first_frame.set()
        new_frame, self.new_frame = self.new_frame, trio.Event()
        new_frame.set()
        self.session._hand_on(self.track, frame)

    async def connection_state(self) -> None:
        """``closed``/``failed`` that we did not cause (aiortc has no ``disconnected``)."""
        async for state in self.pc.states:
            if state in ("closed", "failed"):
                self.peer_connection_lost(state)
                return

    async def inbound_frames(self) -> None:
        """Hand frames on; the inbound track ending is a loss."""
        await self.track.receive_video(self._deliver)
        state = self.pc.state
        if state in ("closed", "failed"):
            self.peer_connection_lost(state)
        else:
            self.lost(LossKind.TRACK_ENDED, "cloud video track ended")

    async def stall(self) -> None:
        """No first frame within ``first_frame_timeout``, or none for ``stall_timeout``."""
        config = self.config
        with trio.move_on_after(config.first_frame_timeout):
            await self.first_frame.wait()
        if not self.first_frame.is_set():
            detail = f"no video from the cloud within {config.first_frame_timeout:g} s"
            self.lost(LossKind.NO_VIDEO, detail)
            return
        while True:
            idle = trio.current_time() - self.last_frame_at
            if idle < config.stall_timeout:
                await trio.sleep(config.stall_timeout - idle)
                continue
            if await self.recover_in_place():
                continue
            total = config.stall_timeout + config.stall_recovery_timeout
            self.lost(LossKind.NO_VIDEO, f"no video from the cloud for {total:g} s")
            return

    async def recover_in_place(self) -> bool:
        """The decoder is stuck (or the cloud paused): ask for keyframes until a picture
        returns, within ``stall_recovery_timeout``. True when one did."""
        stalled_at = self.last_frame_at
        with trio.move_on_after(self.config.stall_recovery_timeout):
            while self.last_frame_at == stalled_at:
                await self.track.request_keyframe()
                with trio.move_on_after(KEYFRAME_INTERVAL):
                    await self.new_frame.wait()
        if self.last_frame_at == stalled_at:
            return False
        self.session.stats.stall_recoveries += 1
        logger.info("cloud media session %s: pictures returned in place", self.session.session_id)
        return True

    async def path_silence(self) -> None:
        """No datagram at all from the cloud for ``path_silence_timeout``: the path is dead.

        Independent of the round trip, unlike ICE consent (whose checks time out). A deadline
        that passed is judged only after :data:`SILENCE_CONFIRM` more seconds, so datagrams
        that arrived while this process was not scheduled (a loaded machine) are read first:
        silence is "nothing arrived", never "nothing was read yet".
        """
        inbound = self.session._inbound
        timeout = self.config.path_silence_timeout
        if inbound is None or not math.isfinite(timeout):
            return
        since = trio.current_time()
        while True:
            silent = trio.current_time() - max(inbound.last_at, since)
            if silent < timeout:
                await trio.sleep(timeout - silent)
                continue
            seen = inbound.count
            await trio.sleep(SILENCE_CONFIRM)
            if inbound.count == seen:
                detail = f"no packets from the cloud for {timeout:g} s (the path went silent)"
                self.lost(LossKind.PATH_SILENCE, detail)
                return

    async def path_returns(self) -> None:
        """A silence shorter than a loss (a blip) that datagrams end: request a keyframe at
        once, from the cloud (PLI) and from our encoder for the cloud, so live pictures
        return a round trip after the path does, not after a stale backlog."""
        inbound = self.session._inbound
        if inbound is None:
            return
        silent = False
        next_allowed = -math.inf
        while True:
            await trio.sleep(RETURN_POLL)
            now = trio.current_time()
            quiet = now - inbound.last_at
            if quiet >= RETURN_GAP:
                silent = True
            elif silent:
                silent = False
                if now < next_allowed:
                    continue  # sparse traffic (no video): one forced keyframe a second at most
                next_allowed = now + 1.0
                self.session.stats.path_returns += 1
                logger.info("cloud media session %s: the path returned", self.session.session_id)
                uplink = self.session._uplink
                if uplink is not None:
                    uplink.force_keyframe()
                await self.track.request_keyframe()

    async def uplink(self) -> None:
        """The cloud receives nothing we send although it talks to us: the server→cloud
        direction is dead (see :mod:`scope_trio.rtc.uplink`)."""
        receipts = self.session._uplink
        limit = self.config.uplink_silence_timeout
        if receipts is None or not math.isfinite(limit):
            return
        quiet = min(CLOUD_VIDEO_QUIET, limit)
        while True:
            report = await receipts.next_report()
            if report.beyond_rtt < limit:
                continue
            if report.rtp_quiet < quiet and not report.nothing_since_previous:
                # The cloud's video, made from ours, still reaches us: the path became
                # slower and our smoothed round trip lags it (a dead direction stops that
                # video a round trip later, or shows again in the next report).
                self.session.stats.slower_path_reports += 1
                continue
            if report.inbound_gap < RETURN_GAP or await self._sending_dead(receipts):
                detail = (
                    f"the cloud received nothing we sent for {report.starved_for:.1f} s "
                    "(the server→cloud direction is dead)"
                )
                self.lost(LossKind.UPLINK_DEAD, detail)
                return

    async def _sending_dead(self, receipts: rtc.UplinkReceipts) -> bool:
        """A starved report after a silence of our inbound direction is ambiguous: the
        server→cloud direction died (the cloud's video stopped with its input, only its
        sparse RTCP reaches us), or both directions blipped and the report was sent just
        before our packets reached the cloud again. After a blip the cloud's video follows
        within a round trip; wait that long (+ ``UPLINK_CONFIRM``) for its RTP."""
        report = receipts.latest
        assert report is not None
        with trio.move_on_after((report.rtt or 0.0) + UPLINK_CONFIRM):
            await receipts.wait_rtp()
            return False
        return True

    async def keyframe_requests(self) -> None:
        """PLI until a frame decodes: the sender's SSRC is known only once RTP arrives."""
        while not self.first_frame.is_set():
            await self.track.request_keyframe()
            with trio.move_on_after(0.25):
                await self.first_frame.wait()

    async def close_on_request(self) -> None:
        """:meth:`CloudMediaSession.simulate_loss`: close as a dead path would."""
        await self.session._pc_close_requested.wait()
        # End our outgoing track first, as every close does: the sender then finishes on its
        # own instead of being cancelled mid-frame (cancels there can get lost, see rtc/).
        self.source.stop()
        await self.pc.close()


def _ice_servers(reply: Mapping[str, Any]) -> list[dict[str, Any]]:
    data = reply.get("data")
    servers = data.get("iceServers") if isinstance(data, Mapping) else None
    if servers is None:
        return []
    if not isinstance(servers, list) or not all(isinstance(s, Mapping) for s in servers):
        raise CloudAnswerError("the cloud's ice_servers reply is not a list of objects")
    return [dict(s) for s in servers]
