"""The request and response models of the HTTP API (pydantic), in one place.

Request models validate bodies (a problem is a 400 naming the field, see
:func:`scope_trio.http.asgi.parse_body`). Response models document the answers in the OpenAPI
document; answers themselves are built as plain JSON. CloudStatus is not redefined here: it
is :class:`scope_trio.cloud.status.CloudStatus`, the dataclass the cloud manager builds, and
the OpenAPI schema is derived from that very class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from scope_trio.cloud.status import CloudStats, CloudStatus

__all__ = [
    "CandidatesRequest",
    "CloudStats",
    "CloudStatus",
    "CloudStatusWithStats",
    "ConnectRequest",
    "ErrorResponse",
    "HealthResponse",
    "IceCandidateInit",
    "IceServer",
    "IceServersResponse",
    "OfferAnswer",
    "OfferRequest",
    "Parameters",
    "PipelineLoadRequest",
    "PipelineStatus",
    "PromptItem",
    "ServerInfo",
    "WebRTCStats",
]

# --------------------------------------------------------------------------- request models


class ConnectRequest(BaseModel):
    """``POST /api/v1/cloud/connect``: every field optional (defaults from the environment)."""

    app_id: str | None = None
    api_key: SecretStr | None = None
    user_id: str | None = None


class PromptItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: str
    weight: float = 1.0


class Parameters(BaseModel):
    """Pipeline parameters; keys beyond these are passed through unchanged."""

    model_config = ConfigDict(extra="allow")

    prompts: list[PromptItem] | None = None
    noise_scale: float | None = None
    denoising_step_list: list[int] | None = None
    input_mode: str | None = None


class OfferRequest(BaseModel):
    """``POST /api/v1/webrtc/offer``."""

    sdp: str
    type: Literal["offer"]
    initialParameters: Parameters | None = None  # Scope's field name
    user_id: str | None = None
    connection_id: str | None = None
    connection_info: dict[str, Any] | None = None


class IceCandidateInit(BaseModel):
    candidate: str
    sdpMid: str | None = None  # Scope's field name
    sdpMLineIndex: int | None = None  # Scope's field name


class CandidatesRequest(BaseModel):
    """``PATCH /api/v1/webrtc/offer/{session_id}``."""

    candidates: list[IceCandidateInit]


class PipelineLoadRequest(BaseModel):
    """``POST /api/v1/pipeline/load`` (validated here, then passed to the cloud verbatim)."""

    model_config = ConfigDict(extra="allow")

    pipeline_ids: list[str] = Field(min_length=1)
    load_params: dict[str, Any] | None = None


# -------------------------------------------------------------------------- response models


class ErrorResponse(BaseModel):
    detail: str


class HealthResponse(BaseModel):
    status: Literal["healthy"]
    timestamp: str
    server_start_time: float
    version: str
    git_commit: str


class WebRTCStats(BaseModel):
    sessions: dict[str, dict[str, Any]]
    """Browser sessions of the relay, by session id."""
    cloud_session: dict[str, Any]
    """The cloud media supervisor: phase, attempts, sessions started and lost."""


@dataclass(frozen=True)
class CloudStatusWithStats(CloudStatus):
    """CloudStatus plus the relay's and the media supervisor's session stats."""

    webrtc_stats: WebRTCStats


class IceServer(BaseModel):
    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class IceServersResponse(BaseModel):
    iceServers: list[IceServer]  # Scope's field name


class OfferAnswer(BaseModel):
    sdp: str
    type: Literal["answer"]
    sessionId: str  # Scope's field name


class PipelineStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["not_loaded", "loading", "loaded", "error"]
    pipeline_id: str | None = None
    load_params: dict[str, Any] | None = None
    loaded_lora_adapters: list[dict[str, Any]] | None = None
    error: str | None = None
    loading_stage: str | None = None


class ServerInfo(BaseModel):
    version: str
    debug_endpoints: bool
