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


# ------------------------------------------------- the rest of Scope's API (request bodies)


class ModelsDownloadRequest(BaseModel):
    """``POST /api/v1/models/download``."""

    model_config = ConfigDict(extra="allow")

    pipeline_id: str = Field(min_length=1)


class WorkflowSource(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    plugin_name: str | None = None
    plugin_version: str | None = None
    package_spec: str | None = None


class WorkflowLora(BaseModel):
    model_config = ConfigDict(extra="allow")

    filename: str
    provenance: dict[str, Any] | None = None


class WorkflowPipeline(BaseModel):
    model_config = ConfigDict(extra="allow")

    pipeline_id: str
    source: WorkflowSource
    loras: list[WorkflowLora] = []


class WorkflowRequest(BaseModel):
    """``POST /api/v1/workflow/resolve``."""

    model_config = ConfigDict(extra="allow")

    pipelines: list[WorkflowPipeline]
    min_scope_version: str | None = None


class LoraInstallRequest(BaseModel):
    """``POST /api/v1/loras``."""

    model_config = ConfigDict(extra="allow")

    url: str
    filename: str | None = None


class LoraDownloadRequest(BaseModel):
    """``POST /api/v1/lora/download``."""

    model_config = ConfigDict(extra="allow")

    source: Literal["huggingface", "civitai", "url"]
    repo_id: str | None = None
    hf_filename: str | None = None
    model_id: str | None = None
    version_id: str | None = None
    url: str | None = None
    subfolder: str | None = None
    expected_sha256: str | None = None
    civitai_token: str | None = None


class ProvenanceRequest(BaseModel):
    """``PUT /api/v1/lora/{filename}/provenance``."""

    model_config = ConfigDict(extra="allow")

    source: Literal["huggingface", "civitai", "url", "local"]


class PluginReloadRequest(BaseModel):
    """``POST /api/v1/plugins/{name}/reload``."""

    force: bool = False


class OscSettingsRequest(BaseModel):
    """``PUT /api/v1/osc/settings``."""

    log_all_messages: bool


class KeyRequest(BaseModel):
    """``PUT /api/v1/keys/{service_id}``."""

    value: str = Field(min_length=1)


# ------------------------------------------------ the rest of Scope's API (response shapes)


class PipelineSchemas(BaseModel):
    pipelines: dict[str, dict[str, Any]]
    """Pipeline id → its schema (the cloud's; none locally)."""


class ModelsStatus(BaseModel):
    downloaded: bool
    progress: dict[str, Any] | None = None


class HardwareInfo(BaseModel):
    vram_gb: float | None = None
    spout_available: bool = False
    ndi_available: bool = False
    syphon_available: bool = False


class LoraFiles(BaseModel):
    lora_files: list[dict[str, Any]]


class Assets(BaseModel):
    assets: list[dict[str, Any]]


class Plugins(BaseModel):
    plugins: list[dict[str, Any]]
    total: int
    failed_plugins: list[dict[str, Any]] = []


class WorkflowItem(BaseModel):
    kind: Literal["pipeline", "plugin", "lora"]
    name: str
    status: Literal["ok", "missing", "version_mismatch"]
    detail: str | None = None
    action: str | None = None
    can_auto_resolve: bool


class WorkflowResolution(BaseModel):
    can_apply: bool
    items: list[WorkflowItem]
    warnings: list[str]


class Message(BaseModel):
    message: str


class OscStatus(BaseModel):
    enabled: bool
    listening: bool
    port: int | None
    host: str | None
    log_all_messages: bool


class OscPaths(BaseModel):
    active: list[dict[str, Any]]
    available: list[dict[str, Any]]
    active_pipeline_ids: list[str]


class InputSources(BaseModel):
    input_sources: list[dict[str, Any]]


class ApiKeyInfo(BaseModel):
    id: str
    name: str
    description: str
    is_set: bool
    source: Literal["env_var", "stored"] | None
    env_var: str | None
    key_url: str | None


class ApiKeys(BaseModel):
    keys: list[ApiKeyInfo]


class KeyResult(BaseModel):
    success: bool
    message: str


class LogTail(BaseModel):
    lines: list[str]
    offset: int
