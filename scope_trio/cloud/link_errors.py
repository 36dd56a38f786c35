"""The errors the signaling link raises on purpose, and how a failed connect becomes one.

Every error here is a :class:`CloudLinkError`; their messages never contain the api key or
the URL's user info and query (see :func:`~scope_trio.cloud.link_config.safe_url`).
"""

from __future__ import annotations

from typing import Any

import trio_websocket

__all__ = [
    "CloudAccessDeniedError",
    "CloudConnectError",
    "CloudLinkClosedError",
    "CloudLinkError",
    "CloudReadyTimeoutError",
    "CloudRequestError",
    "CloudRequestTimeoutError",
    "as_connect_error",
    "clip",
]

RETRYABLE_HTTP_STATUSES = frozenset({408, 425, 429})
"""HTTP answers to the WebSocket upgrade that another attempt may get past."""
SHOWN_CHARS = 200
"""How much of an unexpected message is quoted in logs and errors."""


def clip(text: str) -> str:
    """``text`` cut to :data:`SHOWN_CHARS` for a log line or an error message."""
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


class CloudLinkError(Exception):
    """Root of every error this module raises on purpose."""


class CloudConnectError(CloudLinkError):
    """Establishing the link failed (connect, ``ready``, or ``set_user_id``).

    ``retryable`` says whether another attempt could succeed; ``close_code`` and
    ``close_reason`` are set when the cloud closed the WebSocket during the attempt.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        close_code: int | None = None,
        close_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.close_code = close_code
        self.close_reason = close_reason


class CloudReadyTimeoutError(CloudConnectError):
    """The cloud accepted the WebSocket but sent no ``ready`` within ``ready_timeout``."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the cloud did not send 'ready' within {timeout:g} s", retryable=True)
        self.timeout = timeout


class CloudAccessDeniedError(CloudConnectError):
    """The cloud refused this user or key. Never retried: retrying cannot help."""

    def __init__(
        self, message: str, *, close_code: int | None = None, close_reason: str | None = None
    ) -> None:
        super().__init__(message, retryable=False, close_code=close_code, close_reason=close_reason)


class CloudLinkClosedError(CloudLinkError):
    """The link ended; ``code``/``reason`` say why (``code`` is None if it never opened)."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        shown = f" (code {code})" if code is not None else ""
        super().__init__(f"cloud link closed{shown}: {reason or 'no reason given'}")
        self.code = code
        self.reason = reason


class CloudRequestError(CloudLinkError):
    """The cloud answered a request with an ``error`` message."""

    def __init__(
        self, request_type: str, message: str, *, code: str | None = None, detail: Any = None
    ) -> None:
        text = f"cloud rejected {request_type!r}: {message}"
        if code:
            text += f" ({code})"
        if isinstance(detail, str) and detail and detail != message:
            text += f": {clip(detail)}"
        super().__init__(text)
        self.request_type = request_type
        self.message = message
        self.code = code
        self.detail = detail


class CloudRequestTimeoutError(CloudLinkError):
    """No reply to a request within its deadline (the link itself may still be up)."""

    def __init__(self, request_type: str, timeout: float) -> None:
        super().__init__(f"no reply to {request_type!r} from the cloud within {timeout:g} s")
        self.request_type = request_type
        self.timeout = timeout


def as_connect_error(error: BaseException, url: str) -> CloudConnectError:
    if isinstance(error, CloudConnectError):
        return error
    if isinstance(error, trio_websocket.ConnectionRejected):
        status = error.status_code
        if status in (401, 403):
            return CloudAccessDeniedError(
                f"the cloud rejected the connection with HTTP {status}: check the api key"
            )
        return CloudConnectError(
            f"the cloud rejected the connection with HTTP {status}",
            retryable=status >= 500 or status in RETRYABLE_HTTP_STATUSES,
        )
    return CloudConnectError(
        f"could not connect to {url}: {type(error).__name__}: {clip(str(error))}",
        retryable=True,
    )
