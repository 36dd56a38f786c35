"""What a client sends us before aiortc sees it: SDP text and trickled ICE candidates.

aiortc takes a lot of malformed input and fails later, in a background task nobody awaits
(or answers it with nothing useful). These checks turn every such input into a
:class:`ValueError` with the reason, so the HTTP layer can answer 400 instead of crashing
or leaking a peer connection.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from aiortc import RTCIceCandidate, RTCPeerConnection
from aiortc.sdp import SessionDescription, candidate_from_sdp

__all__ = [
    "MALFORMED_SDP_ERRORS",
    "InvalidCandidateError",
    "check_candidate_target",
    "check_remote_sdp",
    "malformed",
    "parse_ice_candidate",
]

MALFORMED_SDP_ERRORS = (
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    AssertionError,
    AttributeError,
    StopIteration,
)
"""What aiortc raises on an SDP it cannot use (AttributeError: a section missing parts it
dereferences, e.g. a truncated offer; StopIteration: a ``next()`` for a codec the offer
lacks); all of them are the client's error. Inside an aiortc coroutine that StopIteration
becomes ``RuntimeError("coroutine raised StopIteration")``: see :func:`malformed`."""

_SDP_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_remote_sdp(sdp: object) -> None:
    """Refuse (``ValueError``) a remote SDP that aiortc would take and then fail on later."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise ValueError("empty SDP")
    # aiortc accepts text without any media section (and answers it with nothing useful).
    if not sdp.lstrip().startswith("v=") or "\nm=" not in sdp:
        raise ValueError("malformed SDP: no session or media section")
    # SDP is text lines (RFC 8866): a NUL or another control character is never valid, and
    # aiortc takes some of them into identifiers it later fails on in a background task.
    if _SDP_CONTROL_CHARACTERS.search(sdp):
        raise ValueError("malformed SDP: control characters")
    try:
        media_sections = SessionDescription.parse(sdp).media
    except MALFORMED_SDP_ERRORS as exc:
        raise malformed(exc, "malformed SDP") from exc
    # Without these DTLS can never start: aiortc would fail later, in a background task.
    for media in media_sections:
        if media.dtls is None or not media.dtls.fingerprints:
            raise ValueError(
                f"malformed SDP: the {media.kind} section has no DTLS fingerprint or setup"
            )


def malformed(exc: Exception, what: str) -> ValueError:
    """``exc`` from aiortc, on a bad SDP, as the ValueError to raise; re-raises anything
    else (a RuntimeError that is not a StopIteration in a coroutine is not the SDP's)."""
    if isinstance(exc, RuntimeError) and not isinstance(exc.__cause__, StopIteration):
        raise exc
    return ValueError(f"{what}: {str(exc) or type(exc).__name__}")


class InvalidCandidateError(ValueError):
    """A trickled ICE candidate that is not valid; the message says why."""


def parse_ice_candidate(data: Mapping[str, Any] | None) -> RTCIceCandidate | None:
    """Parse a trickled ``{candidate, sdpMid, sdpMLineIndex}`` dict.

    Returns None for end-of-candidates (``None`` or an empty ``candidate`` string). Raises
    :class:`InvalidCandidateError` (a ``ValueError``) with the reason on anything else that
    is not a valid candidate. The result is opaque to callers: give it to
    :meth:`scope_trio.rtc.PeerConnection.add_candidate`.
    """
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise InvalidCandidateError(f"ICE candidate must be an object, got {type(data).__name__}")
    text = data.get("candidate")
    if not isinstance(text, str):
        raise InvalidCandidateError("ICE candidate needs a 'candidate' string")
    text = text.strip()
    if text.startswith("a="):
        text = text[2:]
    if text.startswith("candidate:"):
        text = text[len("candidate:") :]
    if not text:
        return None
    sdp_mid = data.get("sdpMid")
    index = data.get("sdpMLineIndex")
    if sdp_mid is not None and not isinstance(sdp_mid, str):
        raise InvalidCandidateError("ICE candidate 'sdpMid' must be a string")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
        raise InvalidCandidateError("ICE candidate 'sdpMLineIndex' must be an integer")
    if sdp_mid is None and index is None:
        raise InvalidCandidateError("ICE candidate needs 'sdpMid' or 'sdpMLineIndex'")
    try:
        candidate = candidate_from_sdp(text)
    except (ValueError, IndexError, AssertionError) as exc:  # aiortc asserts the field count
        raise InvalidCandidateError(f"malformed ICE candidate {text!r}: {exc}") from exc
    problem = _candidate_problem(text, candidate)
    if problem is not None:
        raise InvalidCandidateError(f"malformed ICE candidate {text!r}: {problem}")
    candidate.sdpMid = sdp_mid
    candidate.sdpMLineIndex = index
    return candidate


_ICE_FOUNDATION = re.compile(r"[A-Za-z0-9+/]{1,32}")
_MDNS_HOST = re.compile(r"[A-Za-z0-9-]+\.local")


def _candidate_problem(text: str, candidate: RTCIceCandidate) -> str | None:
    """What makes a parsed candidate invalid (RFC 8839 section 5.1), or None.

    aiortc's parser reads any eight words; aioice then drops what it cannot use without a
    word, so a candidate that will never be tried would still be "accepted". The address must
    be an IP address or an mDNS ``.local`` name (aioice resolves nothing else).
    """
    words = text.split()
    ports = (candidate.port, candidate.relatedPort)
    checks = (
        (words[6] == "typ", "expected 'typ' before the candidate type"),
        (len(words) % 2 == 0, "an extension attribute has no value"),
        (
            _ICE_FOUNDATION.fullmatch(candidate.foundation) is not None,
            "the foundation must be 1-32 letters, digits, '+' or '/'",
        ),
        (1 <= candidate.component <= 256, "the component id must be 1-256"),
        (candidate.protocol.lower() in ("udp", "tcp"), "the transport must be udp or tcp"),
        (1 <= candidate.priority <= 2**31 - 1, "the priority must be 1 to 2^31-1"),
        (
            _MDNS_HOST.fullmatch(candidate.ip) is not None or _is_ip_address(candidate.ip),
            "the address must be an IP address or an mDNS .local name",
        ),
        (all(p is None or 0 <= p <= 65535 for p in ports), "a port must be 0-65535"),
        (
            candidate.type in ("host", "srflx", "prflx", "relay"),
            "the type must be host, srflx, prflx or relay",
        ),
    )
    return next((problem for ok, problem in checks if not ok), None)


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_candidate_target(pc: RTCPeerConnection, candidate: RTCIceCandidate) -> None:
    """Refuse a candidate for a media section the session does not have (aiortc ignores it
    without a word)."""
    sections = pc.remoteDescription.sdp.count("\nm=") if pc.remoteDescription else 0
    mids = {t.mid for t in pc.getTransceivers()} | {pc.sctp.mid if pc.sctp else None}
    if candidate.sdpMid is not None and candidate.sdpMid not in mids:
        raise InvalidCandidateError(f"ICE candidate for unknown sdpMid {candidate.sdpMid!r}")
    if candidate.sdpMid is None and not 0 <= (candidate.sdpMLineIndex or 0) < sections:
        raise InvalidCandidateError(
            f"ICE candidate for media section {candidate.sdpMLineIndex} of {sections}"
        )
