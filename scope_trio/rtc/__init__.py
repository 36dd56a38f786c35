"""The one package where trio meets asyncio/aiortc. Everything else in scope-trio is plain
trio and never touches an aiortc object: it uses the trio-facing API re-exported here.

Modules, one concern each:

* :mod:`~scope_trio.rtc.bridge`: the trio-asyncio loop (:func:`open_loop`), ``aio`` to
  await asyncio coroutines from trio, the executor that does not lose cancels.
* :mod:`~scope_trio.rtc.peer`: :class:`PeerConnection`, :class:`DataChannel`,
  :class:`RemoteTrack`: a peer connection in trio terms, closed exactly once.
* :mod:`~scope_trio.rtc.tracks`: :class:`TrioVideoSource` (outbound video fed from trio),
  inbound frames into trio, keyframe requests.
* :mod:`~scope_trio.rtc.receiver`: the receive buffer every video receiver we build gets in
  place of aiortc's (frames out when whole, re-NACKs on a timer, bounded waits, keyframe
  requests); installed by :mod:`~scope_trio.rtc.raw` when a remote description is applied.
* :mod:`~scope_trio.rtc.sdp`: checks of client SDP and trickled ICE candidates.
* :mod:`~scope_trio.rtc.datagrams`: the ICE sockets' inbound activity and fault injection.
* :mod:`~scope_trio.rtc.uplink`: what the remote receives of our video (its receiver
  reports), for a dead sending direction.
* :mod:`~scope_trio.rtc.consent`: ICE consent timing and :func:`configure_process`, the
  one place process-global WebRTC settings are applied (at server start).
* :mod:`~scope_trio.rtc.raw`: the same operations on plain aiortc peer connections, for
  :class:`PeerConnection` and for tests that play an outside peer.
* :mod:`~scope_trio.rtc._aiortc_internals`: every private aiortc/aioice reach-in, with
  :func:`verify` that fails loudly when an upgrade changed one.

Rules the package enforces so callers do not have to know them: every aiortc object is
created, and every aiortc coroutine awaited, inside an open ``trio_asyncio.open_loop()``;
callbacks become ``send_nowait`` on trio memory channels; a peer connection is closed once,
shielded and under a deadline; peer connections always get an explicit ``iceServers`` list
(aiortc's default would contact a public STUN server).
"""

from __future__ import annotations

from scope_trio.rtc._aiortc_internals import AiortcInternalsChanged, verify
from scope_trio.rtc.bridge import open_loop
from scope_trio.rtc.consent import (
    AIOICE_DEFAULT_CONSENT,
    FAST_CONSENT,
    ConsentTiming,
    configure_process,
    get_ice_consent,
    tune_ice_consent,
)
from scope_trio.rtc.datagrams import InboundDatagrams
from scope_trio.rtc.peer import (
    ChannelClosedError,
    DataChannel,
    PeerConnection,
    RemoteTrack,
    SessionDescription,
)
from scope_trio.rtc.sdp import InvalidCandidateError, parse_ice_candidate
from scope_trio.rtc.tracks import VIDEO_TIME_BASE, TrioVideoSource, black_frame, lateness_bound
from scope_trio.rtc.uplink import UplinkReceipts, UplinkReport

__all__ = [
    "AIOICE_DEFAULT_CONSENT",
    "FAST_CONSENT",
    "VIDEO_TIME_BASE",
    "AiortcInternalsChanged",
    "ChannelClosedError",
    "ConsentTiming",
    "DataChannel",
    "InboundDatagrams",
    "InvalidCandidateError",
    "PeerConnection",
    "RemoteTrack",
    "SessionDescription",
    "TrioVideoSource",
    "UplinkReceipts",
    "UplinkReport",
    "black_frame",
    "configure_process",
    "get_ice_consent",
    "lateness_bound",
    "open_loop",
    "parse_ice_candidate",
    "tune_ice_consent",
    "verify",
]
