"""The dev cloud's media side: one peer connection per answered offer.

This is the only module of the dev cloud that does WebRTC (through
:class:`scope_trio.rtc.PeerConnection`, never an aiortc object): creating and closing peer
connections, answering offers, adding ICE candidates, receiving and sending video, the
``parameters`` data channel and the datagram filter the network faults use. The rest of the
dev cloud sees a :class:`CloudSession` and plain values. What a frame becomes is
:mod:`.pipelines`' business; recording is :mod:`.recording`'s.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import trio
from av import VideoFrame

from scope_trio import rtc
from scope_trio.dev.devcloud.config import SESSION_CLOSE_TIMEOUT
from scope_trio.dev.devcloud.pipelines import (
    PATTERN_FPS,
    TEXT_PIPELINES,
    frame_size,
    pattern_frame,
    process,
    prompt_text,
)
from scope_trio.dev.devcloud.recording import Recorder

if TYPE_CHECKING:
    from scope_trio.dev.devcloud.protocol import DevCloud

__all__ = ["CloudSession", "open_media_loop", "open_session"]

logger = logging.getLogger("scope_trio.dev.devcloud")


def open_media_loop() -> AbstractAsyncContextManager[Any]:
    """The event loop the dev cloud's peer connections live in (open it around serving)."""
    return rtc.open_loop()


class CloudSession:
    """One answered offer: a peer connection sending the current pipeline's video (its
    input processed, or frames drawn from the prompt), honouring ``paused`` and
    ``recording``, and keeping the parameters the offer and the data channel carry."""

    def __init__(self, cloud: DevCloud, pc: rtc.PeerConnection, initial: Mapping[str, Any]) -> None:
        self.cloud = cloud
        self.id = uuid.uuid4().hex
        self.pc = pc
        self._input: rtc.RemoteTrack | None = None
        # Backlogs of its input (held by a hole) go out as late as one retransmission.
        self.source = rtc.TrioVideoSource(idle_timeout=None, max_lateness=self._lateness)
        self.parameters: dict[str, Any] = dict(initial)
        self.close_requested = trio.Event()
        self.blackhole_until = -math.inf
        self.recorder = Recorder()
        self.frames_in = 0
        self.frames_out = 0
        self.frames_processed = 0
        """Frames the pipeline made (processed input, or drawn): they stop while paused."""
        self._last_sent: VideoFrame | None = None
        self._pattern_clock = 0.0
        """Seconds of pattern time drawn so far: it stands still while paused."""

    @property
    def paused(self) -> bool:
        """The ``paused`` parameter: the pipeline stops and the last frame is repeated."""
        return bool(self.parameters.get("paused"))

    @property
    def recording(self) -> bool:
        """The ``recording`` parameter: sent frames also go into an MP4."""
        return bool(self.parameters.get("recording"))

    @property
    def connection_state(self) -> str:
        """The peer connection's state (``new``, ``connecting``, ``connected``, ...)."""
        return self.pc.state

    def blackholed(self) -> bool:
        until = max(self.blackhole_until, self.cloud.faults.blackhole_all_until)
        return time.monotonic() < until

    def latency(self) -> float:
        """Seconds to hold each datagram (the ``latency`` fault), 0 for none."""
        faults = self.cloud.faults
        return faults.latency if time.monotonic() < faults.latency_until else 0.0

    async def add_candidate(self, candidate: Any) -> bool:
        """Add one trickled candidate (the wire dict); False for end-of-candidates (null).

        Raises ValueError for a candidate that does not parse or apply.
        """
        parsed = rtc.parse_ice_candidate(candidate)
        if parsed is None:
            return False
        await self.pc.add_candidate(parsed)
        return True

    async def run(self) -> None:
        """Echo media and record parameters until closed (by either side or a fault).

        Always closes the peer connection before returning, even when cancelled.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tracks, nursery)
                nursery.start_soon(self._channels, nursery)
                nursery.start_soon(self._watch_state, nursery.cancel_scope)
                nursery.start_soon(self._draw)
                nursery.start_soon(self.recorder.run)
                await self.close_requested.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.source.stop()
            await self.pc.close()
            self.cloud.sessions.pop(self.id, None)
            logger.info("devcloud session %s closed", self.id)

    async def _watch_state(self, scope: trio.CancelScope) -> None:
        deadline = self.cloud.config.connect_deadline
        state: str | None = None
        with trio.move_on_after(deadline):
            state = await self.pc.wait_state("connected", "closed", "failed")
        if state is None:
            logger.warning(
                "devcloud session %s: not connected within %g s; closing it", self.id, deadline
            )
        else:
            if state == "connected":
                state = await self.pc.wait_state("closed", "failed")
            logger.info("devcloud session %s: connection %s", self.id, state)
        scope.cancel()

    async def _tracks(self, nursery: trio.Nursery) -> None:
        async for track in self.pc.tracks:
            if track.kind == "video":
                self._input = track
                nursery.start_soon(track.receive_video, self._on_frame)
            else:
                nursery.start_soon(track.drain)

    async def _channels(self, nursery: trio.Nursery) -> None:
        async for remote in self.pc.channels:
            if remote.label == "parameters":
                nursery.start_soon(self._parameters, remote.messages)

    async def _parameters(self, messages: trio.MemoryReceiveChannel[str | bytes]) -> None:
        async for message in messages:
            try:
                update = json.loads(message)
            except ValueError:
                logger.warning("devcloud: parameters message is not JSON: %.80r", message)
                continue
            if not isinstance(update, dict):
                logger.warning("devcloud: parameters message is not an object: %.80r", message)
                continue
            self.parameters.update(update)
            self.cloud.record_parameters(update)

    def _lateness(self) -> float:
        delay = None if self._input is None else self._input.retransmission_delay()
        return rtc.lateness_bound(delay)

    def _on_frame(self, frame: VideoFrame) -> None:
        """One input frame: through the video pipeline, or (paused) the last frame again.
        A text pipeline ignores input."""
        self.frames_in += 1
        self.cloud.frames_in += 1
        if time.monotonic() < self.cloud.faults.stall_media_until:
            return
        pipeline = self.cloud.pipeline
        if pipeline in TEXT_PIPELINES:
            return
        if self.paused and self._last_sent is not None:
            self._send(self._last_sent)
            return
        self.frames_processed += 1
        self._send(process(pipeline, frame))

    async def _draw(self) -> None:
        """While a text pipeline is loaded, send its frames at its rate, input or not;
        paused, the last frame again (the pattern's clock stands still)."""
        interval = 1 / PATTERN_FPS
        tick = trio.current_time()
        while True:
            tick = max(tick + interval, trio.current_time())
            await trio.sleep_until(tick)
            pipeline = self.cloud.pipeline
            if pipeline not in TEXT_PIPELINES:
                continue
            if time.monotonic() < self.cloud.faults.stall_media_until:
                continue
            if self.paused and self._last_sent is not None:
                self._send(self._last_sent)
                continue
            width, height = frame_size(pipeline, self.cloud.load_params)
            frame = pattern_frame(prompt_text(self.parameters), self._pattern_clock, width, height)
            self._pattern_clock += interval
            self.frames_processed += 1
            self._send(frame)

    def _send(self, frame: VideoFrame) -> None:
        self._last_sent = frame
        self.source.push(frame)
        if self.recording:
            self.recorder.add(frame)
        self.frames_out += 1
        self.cloud.frames_out += 1


async def open_session(
    cloud: DevCloud, sdp: str, sdp_type: str, initial: Mapping[str, Any]
) -> tuple[CloudSession, str, str]:
    """Answer one offer: ``(session, answer sdp, answer type)``; the caller runs the session.

    Raises ValueError for an offer that cannot be answered; the peer connection is closed
    (shielded, bounded) whenever this raises.
    """
    pc = rtc.PeerConnection([], close_timeout=SESSION_CLOSE_TIMEOUT)
    session = CloudSession(cloud, pc, initial)
    try:
        answer = await pc.answer(sdp, sdp_type, send_tracks=[session.source])
    except BaseException:
        await pc.close()
        raise
    pc.install_datagram_filter(session.blackholed, delay=session.latency)
    return session, answer.sdp, answer.type
