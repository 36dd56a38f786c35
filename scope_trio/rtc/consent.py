"""ICE consent-freshness timing, a process-global setting of aioice, and the one place the
server applies it: :func:`configure_process`.

aioice reads its consent timing from module constants at run time, so it is shared by every
peer connection of the process. Production code sets it only through
:func:`configure_process`, once, at server start; :func:`tune_ice_consent` stays for tests
and benchmarks that need another timing for a while (and restore it).
"""

from __future__ import annotations

from dataclasses import dataclass

from scope_trio.rtc import _aiortc_internals as internals

__all__ = [
    "AIOICE_DEFAULT_CONSENT",
    "FAST_CONSENT",
    "ConsentTiming",
    "configure_process",
    "get_ice_consent",
    "tune_ice_consent",
]


@dataclass(frozen=True)
class ConsentTiming:
    """aioice's ICE consent-freshness timing.

    aioice sends one check every ``interval`` (± 20 %), waits for the answer, and gives up
    on it after ``rto`` seconds with no retransmission (``query_consent`` uses
    ``retransmissions=0``): every check on a path whose round trip exceeds ``rto`` fails.
    ``failures`` failed checks in a row close the connection (``connectionState`` →
    ``closed``), about ``failures * (interval + rto)`` seconds after a path went silent.
    ``rto`` is also the first STUN retransmission timeout of the connectivity checks, so it
    sets how long a first connect to an unreachable peer takes to fail (``127 * rto``).
    """

    interval: float
    failures: int
    rto: float


AIOICE_DEFAULT_CONSENT = ConsentTiming(interval=5.0, failures=6, rto=0.5)
"""aioice's own defaults: a silent path is detected after about 31 s."""

FAST_CONSENT = ConsentTiming(interval=0.3, failures=6, rto=1.0)
"""Frequent checks with a timeout safe for real round trips: what the server uses.

The checks go out every ~0.3 s, so even without video the peer's answers arrive every
0.3 s + RTT: that keeps :class:`scope_trio.cloud.media.CloudMediaSession`'s path-silence signal
(no datagram for 1 s: the path is dead, detected in ~1.05 s whatever the RTT) from firing
during a pause. The 1 s timeout lets every check pass on paths with up to 1 s of round trip;
consent then closes a silent path after ~7-8 s, a backstop behind path silence. (The
previous tuning, 0.2 s, failed every check once the RTT passed 200 ms: a healthy stream to
a distant cloud was declared lost ~1.5 s after it connected, again and again.)

Six failures in a row, not three: on a lossy path a check fails whenever it or its answer
is lost (~6 % each at 3 % loss per direction), and three in a row then happen about once
in 5,000 checks, i.e. about once an hour at 300 ms RTT (a check and its answer take
~0.6 s). That closed a healthy stream once in a 30-minute run at 300 ms RTT with 3 % loss;
six in a row is about once in 4,000 hours there.
"""


def get_ice_consent() -> ConsentTiming:
    """The consent timing currently in effect for this process."""
    interval, failures, rto = internals.read_consent()
    return ConsentTiming(interval=interval, failures=failures, rto=rto)


def tune_ice_consent(
    interval: float = FAST_CONSENT.interval,
    failures: int = FAST_CONSENT.failures,
    rto: float = FAST_CONSENT.rto,
) -> ConsentTiming:
    """Set aioice's consent timing for the WHOLE PROCESS; returns the previous timing.

    These are module constants of aioice read at run time: the interval applies to running
    connections from their next check on, ``rto`` to STUN transactions started afterwards.
    Keep ``rto`` above the longest round trip a path may have (see :class:`ConsentTiming`).
    Restore with ``tune_ice_consent(**dataclasses.asdict(previous))``.
    """
    if interval <= 0 or rto <= 0 or failures < 1:
        raise ValueError("consent interval and rto must be positive, failures at least 1")
    previous = get_ice_consent()
    internals.write_consent(interval, failures, rto)
    return previous


def configure_process(consent: ConsentTiming | None = FAST_CONSENT) -> ConsentTiming:
    """Check the installed aiortc/aioice and apply the process-wide WebRTC settings.

    The one call a server makes at start, before any peer connection exists:

    1. ``verify()`` of the internals: raises
       :class:`~scope_trio.rtc._aiortc_internals.AiortcInternalsChanged` naming what changed
       if the installed aiortc/aioice no longer have a private part scope-trio relies on
       (better to refuse to start than to run with a leak fix silently gone);
    2. ``consent`` timing for every peer connection of the process (None: leave aioice's).

    Returns the consent timing in effect before, so a caller that must restore it (tests,
    an embedded server) can: ``configure_process(previous)``.
    """
    internals.verify()
    previous = get_ice_consent()
    if consent is not None:
        tune_ice_consent(consent.interval, consent.failures, consent.rto)
    return previous
