"""Where the cloud is, and how a dropped signaling link is re-established.

Plain values that the configuration (``scope_trio.config``) builds and the manager reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scope_trio.core.retry import Backoff, RestartWindow

__all__ = ["CloudSettings", "LinkPolicy"]


@dataclass(frozen=True)
class CloudSettings:
    """Where the cloud is (``[cloud]``; the ``SCOPE_CLOUD_*`` variables are read by
    :meth:`scope_trio.config.ServerConfig.with_env`). ``api_key`` is never shown."""

    app_id: str | None = None
    api_key: str | None = field(default=None, repr=False)
    ws_url: str | None = None

    @property
    def credentials_configured(self) -> bool:
        return bool(self.app_id or self.ws_url)


@dataclass(frozen=True)
class LinkPolicy:
    """How an established link that dropped is re-established.

    Each re-link runs the link's own connect retries (3 attempts with backoff). At most
    ``max_relinks`` re-links in ``window`` seconds, so a flapping cloud ends in an error.
    """

    max_relinks: int = 3
    window: float = 60.0
    delay: float = 1.0
    """Pause before the first connect of a re-link."""

    @property
    def backoff(self) -> Backoff:
        """The pause before each re-link, as the project's one retry type."""
        return Backoff.constant(self.delay, attempts=self.max_relinks)

    @property
    def intensity(self) -> RestartWindow:
        return RestartWindow(self.max_relinks, self.window)
