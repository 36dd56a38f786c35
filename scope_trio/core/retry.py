"""One retry type for every retry loop: how long to wait before attempt ``n``, how many
attempts an outage gets, and how many restarts a time window allows.

Three loops use it: the supervisor's reconnects (:class:`~scope_trio.core.supervisor.
ReconnectPolicy`), the link keeper's re-links (:class:`~scope_trio.cloud.manager.LinkPolicy`)
and one link's connect attempts (:class:`~scope_trio.cloud.link.LinkConfig`). Each keeps its
own documented fields and defaults and derives its :class:`Backoff` (and, where it caps
restarts, its :class:`RestartWindow`) from them, so there is one implementation of the
arithmetic and each loop's settings stay where users already set them.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts.

    Exponential by default: the delay before retry ``n`` (1-based) is
    ``min(cap, base * factor ** (n - 1))``, spread by ``jitter`` (a fraction: 0.1 means
    ±10 %) when a random generator is given. With ``steps`` the delays are that table
    instead (the last entry repeats). ``attempts`` is how many retries an outage gets.
    """

    base: float = 1.0
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.0
    attempts: int = 3
    steps: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("base", "cap", "factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Backoff.{name} must be a number >= 0, got {value!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"Backoff.jitter must be in [0, 1), got {self.jitter!r}")
        if self.attempts < 0:
            raise ValueError(f"Backoff.attempts must be >= 0, got {self.attempts!r}")
        if any(not (math.isfinite(step) and step >= 0) for step in self.steps):
            raise ValueError("Backoff.steps must not be negative")

    @classmethod
    def constant(cls, delay: float, attempts: int = 3) -> Backoff:
        """The same pause before every attempt."""
        return cls(base=delay, cap=delay, factor=1.0, attempts=attempts)

    @classmethod
    def table(cls, steps: tuple[float, ...], attempts: int = 3) -> Backoff:
        """Delays read from ``steps`` (the last repeats; an empty table: no pause)."""
        return cls(base=0.0, cap=0.0, attempts=attempts, steps=tuple(steps))

    def delay(self, n: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry ``n`` (1-based; ``n < 1`` waits nothing)."""
        if n < 1:
            return 0.0
        if self.steps:
            value = self.steps[min(n, len(self.steps)) - 1]
        else:
            value = min(self.cap, self.base * self.factor ** (n - 1))
        if self.jitter and rng is not None:
            value *= 1 + rng.uniform(-self.jitter, self.jitter)
        return value


@dataclass(frozen=True)
class RestartWindow:
    """Restart intensity, as in Erlang/OTP: at most ``max_restarts`` in ``window`` seconds."""

    max_restarts: int
    window: float

    def tracker(self) -> RestartTracker:
        return RestartTracker(self)


class RestartTracker:
    """The restart times of one loop, judged against its :class:`RestartWindow`."""

    def __init__(self, limit: RestartWindow) -> None:
        self.limit = limit
        self._times: deque[float] = deque()

    def exhausted(self, now: float) -> bool:
        """True when another restart now would exceed the window's allowance."""
        while self._times and now - self._times[0] > self.limit.window:
            self._times.popleft()
        return len(self._times) >= self.limit.max_restarts

    def record(self, now: float) -> None:
        self._times.append(now)

    def clear(self) -> None:
        self._times.clear()


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a lost session is rebuilt: 3 attempts; the first at once, then 1 s, 2 s, 4 s ...

    The first reconnect attempt of an outage starts at once (``immediate_first_attempt``): a
    silent loss has already waited out its detection threshold (path silence, stall), and a
    clean loss (a closed peer connection, an ended track, the debug route) says by itself
    that the session is gone, so waiting a further second only lengthens the user's freeze.
    The backoff, ``min(max_delay, base_delay * 2 ** (k - 1))`` before the ``k``-th *delayed*
    attempt, optionally spread by ``jitter`` (a fraction: 0.1 means ±10 %), applies from the
    second attempt, so a cloud that keeps failing is still not hammered. With
    ``immediate_first_attempt=False`` the timing is exactly Scope's (1 s before attempt 1,
    2 s before attempt 2, 4 s before attempt 3). :attr:`backoff` is the project's one
    :class:`~scope_trio.core.retry.Backoff`; :attr:`intensity` is the restart window.
    """

    max_attempts: int = 3
    base_delay: float = 1.0
    max_delay: float = 30.0
    jitter: float = 0.0
    attempt_timeout: float = 10.0
    """Deadline over one whole connect (signaling, ICE, DTLS, first readiness)."""
    stable_period: float = 10.0
    """A reconnected session must stay up this long before the attempt budget refills."""
    max_restarts: int = 6
    restart_window: float = 60.0
    """Restart intensity (as in Erlang/OTP): at most ``max_restarts`` attempts in this window."""
    close_timeout: float = 5.0
    """A session's own close deadline. ``stop`` (or a replacing ``start``) waits twice this
    for a superseded run, then abandons it (counted; reaped in the background)."""
    immediate_first_attempt: bool = True
    """Start an outage's first reconnect attempt at once; the backoff applies from the second.
    ``False`` waits ``base_delay`` before the first attempt too, as Scope does."""

    def __post_init__(self) -> None:
        positive = {
            "base_delay": self.base_delay,
            "max_delay": self.max_delay,
            "attempt_timeout": self.attempt_timeout,
            "restart_window": self.restart_window,
            "close_timeout": self.close_timeout,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ReconnectPolicy.{name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.stable_period) and self.stable_period >= 0):
            raise ValueError(
                f"ReconnectPolicy.stable_period must be >= 0, got {self.stable_period!r}"
            )
        if self.max_attempts < 0:
            raise ValueError(
                f"ReconnectPolicy.max_attempts must be >= 0, got {self.max_attempts!r}"
            )
        if self.max_restarts < 1:
            raise ValueError(
                f"ReconnectPolicy.max_restarts must be >= 1, got {self.max_restarts!r}"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"ReconnectPolicy.jitter must be in [0, 1), got {self.jitter!r}")

    @property
    def backoff(self) -> Backoff:
        return Backoff(
            base=self.base_delay,
            cap=self.max_delay,
            jitter=self.jitter,
            attempts=self.max_attempts,
        )

    @property
    def intensity(self) -> RestartWindow:
        return RestartWindow(self.max_restarts, self.restart_window)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (1-based)."""
        if self.immediate_first_attempt:
            return 0.0 if attempt <= 1 else self.backoff.delay(attempt - 1, rng)
        return self.backoff.delay(attempt, rng)
