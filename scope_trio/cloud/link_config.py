"""Where the signaling link goes and how patiently: the URL rule and :class:`LinkConfig`.

The URL and the deadlines of the cloud protocol are described in ``docs/cloud-protocol.md``.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

from scope_trio.core.retry import Backoff

__all__ = ["LinkConfig", "cloud_ws_url", "safe_url"]


def cloud_ws_url(app_id: str | None, ws_url: str | None) -> str:
    """The signaling URL: ``ws_url`` verbatim if set, else ``wss://fal.run/{app_id}/ws``.

    Slashes around ``app_id`` are stripped and ``/ws`` appended unless already there.
    Raises ValueError naming what to configure when neither is usable.
    """
    if ws_url:
        return ws_url
    app = (app_id or "").strip().strip("/")
    if not app:
        raise ValueError(
            "No cloud app configured: set an app id (SCOPE_CLOUD_APP_ID) "
            "or a signaling URL (SCOPE_CLOUD_WS_URL)"
        )
    if not app.endswith("/ws"):
        app += "/ws"
    return f"wss://fal.run/{app}"


_API_KEY = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class LinkConfig:
    """Everything needed to open one signaling link. Validated at construction.

    ``api_key`` is excluded from ``repr``/``str`` so the config can be logged safely.
    ``connect_attempts`` counts the first try; ``connect_backoff[i]`` is the pause before
    attempt ``i + 2`` (the last entry repeats). ``ping_interval=None`` disables the heartbeat.
    """

    app_id: str | None = None
    api_key: str | None = field(default=None, repr=False)
    ws_url: str | None = None
    user_id: str | None = None
    connect_timeout: float = 30.0
    ready_timeout: float = 180.0
    request_timeout: float = 30.0
    ping_interval: float | None = 10.0
    pong_timeout: float = 5.0
    close_timeout: float = 2.0
    connect_attempts: int = 3
    connect_backoff: tuple[float, ...] = (1.0, 2.0, 4.0)

    def __post_init__(self) -> None:
        url = self.url  # raises ValueError when neither app id nor ws url is set
        if urllib.parse.urlsplit(url).scheme not in ("ws", "wss"):
            raise ValueError(
                f"cloud signaling URL must start with ws:// or wss://: {safe_url(url)}"
            )
        # It goes out as a header value: the HTTP layer would reject a control character or
        # an edge space with an error that quotes the header, escaped, so no redaction of
        # the key itself would catch it (a key read from a CRLF file ends in "\r").
        if self.api_key and not _API_KEY.fullmatch(self.api_key):
            raise ValueError(
                "the cloud api key must be printable ASCII without spaces (check for a "
                "trailing newline or carriage return)"
            )
        for name in ("connect_timeout", "ready_timeout", "request_timeout", "pong_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.close_timeout < 0:
            raise ValueError("close_timeout must not be negative")
        if self.ping_interval is not None and self.ping_interval <= 0:
            raise ValueError("ping_interval must be positive (or None to disable the heartbeat)")
        if self.connect_attempts < 1:
            raise ValueError("connect_attempts must be at least 1")
        if any(delay < 0 for delay in self.connect_backoff):
            raise ValueError("connect_backoff delays must not be negative")

    @property
    def url(self) -> str:
        """The signaling URL (see :func:`cloud_ws_url`)."""
        return cloud_ws_url(self.app_id, self.ws_url)

    @property
    def connect_retry(self) -> Backoff:
        """``connect_attempts`` and ``connect_backoff`` as the project's one retry type."""
        return Backoff.table(self.connect_backoff, attempts=self.connect_attempts - 1)

    def backoff_before(self, attempt: int) -> float:
        """Seconds to wait before connect attempt number ``attempt`` (2, 3, ...)."""
        return self.connect_retry.delay(attempt - 1)


def safe_url(url: str) -> str:
    """The URL without user info and query, which may carry credentials."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
