"""What happens to one datagram on one direction of the emulated path: the impairment model.

Pure and deterministic given its random generator and the times it is told, so it is tested
without sockets or clocks. :class:`Link` is one direction's state: its :class:`Impairment`,
its Gilbert-Elliott chain, its blackout, its counters. The relay (:mod:`.relay`) asks it,
per arriving datagram, either for the moment to forward it or for the reason it is dropped,
and tells it when a datagram actually left (to count reordering).

Order of the decisions for one datagram: blackout (of the direction, or of the datagram's
session), bursty loss (Gilbert-Elliott), random loss, then the queue cap; a datagram that
survives leaves after ``delay + uniform(-jitter, +jitter)`` (at least 0). Each datagram gets
its own delay, so with jitter larger than the spacing of two datagrams the later one may
overtake the earlier: reordering, as on a real path with several routes or queues.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Direction = Literal["up", "down"]
"""``up``: server → cloud (the offerer's datagrams); ``down``: cloud → server."""
DIRECTIONS: tuple[Direction, Direction] = ("up", "down")
DropReason = Literal["blackout", "burst", "loss", "overflow"]


@dataclass(frozen=True)
class GilbertElliott:
    """A two-state Markov loss chain, stepped once per datagram.

    In the good state a datagram is lost with ``loss_good``, in the bad state with
    ``loss_bad``; after each datagram the chain moves good → bad with probability ``p`` and
    bad → good with ``r``. With ``loss_good=0, loss_bad=1`` (the default) the stationary loss
    rate is ``p / (p + r)`` and the mean burst length ``1 / r`` datagrams.
    """

    p: float
    r: float
    loss_good: float = 0.0
    loss_bad: float = 1.0

    def __post_init__(self) -> None:
        for name in ("p", "r", "loss_good", "loss_bad"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Gilbert-Elliott {name} must be in [0, 1], not {value}")
        if self.r == 0.0:
            raise ValueError("Gilbert-Elliott r must be > 0 (a bad state must end)")

    @classmethod
    def from_rate(cls, loss: float, mean_burst: float) -> GilbertElliott:
        """The chain losing ``loss`` of all datagrams in bursts of ``mean_burst`` on average."""
        if not 0.0 <= loss < 1.0 or mean_burst < 1.0:
            raise ValueError("loss must be in [0, 1) and mean_burst at least 1")
        r = 1.0 / mean_burst
        return cls(p=loss * r / (1.0 - loss), r=r)

    @property
    def mean_loss(self) -> float:
        """The stationary loss rate."""
        bad = self.p / (self.p + self.r)
        return bad * self.loss_bad + (1.0 - bad) * self.loss_good


@dataclass(frozen=True)
class Impairment:
    """One direction's impairments. All times in seconds; the default impairs nothing."""

    delay: float = 0.0
    jitter: float = 0.0
    """Each datagram's delay is ``delay + uniform(-jitter, +jitter)``, at least 0."""
    loss: float = 0.0
    """Independent random loss probability per datagram."""
    burst: GilbertElliott | None = None
    """Bursty loss, on top of ``loss``."""
    reorder: bool = True
    """False: datagrams leave in arrival order (a later one waits for an earlier one)."""

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0 or not math.isfinite(self.delay + self.jitter):
            raise ValueError("delay and jitter must be finite and >= 0")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be in [0, 1], not {self.loss}")

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Counters:
    """What one direction (or one session's direction) saw. Only ever grows."""

    datagrams_in: int = 0
    forwarded: int = 0
    dropped_blackout: int = 0
    dropped_burst: int = 0
    dropped_loss: int = 0
    dropped_overflow: int = 0
    reordered: int = 0
    """Forwarded after a datagram that arrived later than it had already left."""
    bytes_in: int = 0
    bytes_forwarded: int = 0

    @property
    def dropped(self) -> int:
        return (
            self.dropped_blackout + self.dropped_burst + self.dropped_loss + self.dropped_overflow
        )

    def drop(self, reason: DropReason) -> None:
        name = f"dropped_{reason}"
        setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> dict[str, int]:
        return {**asdict(self), "dropped": self.dropped}


@dataclass
class Link:
    """One direction of the path: impairment, loss-chain state, blackout, counters."""

    impairment: Impairment = field(default_factory=Impairment)
    rng: random.Random = field(default_factory=random.Random)
    blackout_until: float = -math.inf
    """No datagram passes while ``now < blackout_until`` (``math.inf``: until restored)."""
    counters: Counters = field(default_factory=Counters)
    _bad: bool = False
    _next_seq: int = 0
    _highest_sent: int = -1
    _last_release: float = -math.inf

    def blacked_out(self, now: float) -> bool:
        return now < self.blackout_until

    def admit(
        self, now: float, size: int, *, blackout: bool = False, queue_full: bool = False
    ) -> tuple[int, float] | DropReason:
        """Decide one arriving datagram: ``(seq, release time)`` or why it is dropped.

        ``blackout``: the datagram's session is blacked out on this direction;
        ``queue_full``: the relay holds as many datagrams as it may. ``seq`` numbers the
        datagrams of this direction in arrival order (give it back to :meth:`sent`).
        """
        counters = self.counters
        counters.datagrams_in += 1
        counters.bytes_in += size
        imp = self.impairment
        reason: DropReason | None = None
        if blackout or self.blacked_out(now):
            reason = "blackout"
        elif imp.burst is not None and self._step_burst(imp.burst):
            reason = "burst"
        elif imp.loss > 0 and self.rng.random() < imp.loss:
            reason = "loss"
        elif queue_full:
            reason = "overflow"
        if reason is not None:
            counters.drop(reason)
            return reason
        delay = imp.delay
        if imp.jitter > 0:
            delay = max(0.0, delay + self.rng.uniform(-imp.jitter, imp.jitter))
        release = now + delay
        if not imp.reorder:
            release = max(release, self._last_release)
        self._last_release = max(self._last_release, release)
        seq = self._next_seq
        self._next_seq += 1
        return seq, release

    def _step_burst(self, chain: GilbertElliott) -> bool:
        lost = self.rng.random() < (chain.loss_bad if self._bad else chain.loss_good)
        if self._bad:
            self._bad = self.rng.random() >= chain.r
        else:
            self._bad = self.rng.random() < chain.p
        return lost

    def sent(self, seq: int, size: int) -> None:
        """A datagram admitted as ``seq`` left the relay."""
        counters = self.counters
        counters.forwarded += 1
        counters.bytes_forwarded += size
        if seq < self._highest_sent:
            counters.reordered += 1
        else:
            self._highest_sent = seq
