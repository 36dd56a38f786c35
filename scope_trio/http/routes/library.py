"""What the cloud has installed: LoRAs, plugins, assets, and the session's recordings.

While connected these are the cloud's (forwarded, with Scope's timeouts; installing a LoRA
from CivitAI gets the CivitAI token added here, as Scope does). Not connected, this server
keeps no files of its own: the lists are empty, a named file is not found, and installing
needs the cloud. Uploading an asset is not supported in either state: Scope uploads it to
Daydream's CDN with a token from the Daydream API, a service this server does not use.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

from quart import Response

from scope_trio.http.asgi import ApiError, parse_body
from scope_trio.http.models import (
    Assets,
    ErrorResponse,
    LoraDownloadRequest,
    LoraFiles,
    LoraInstallRequest,
    PluginReloadRequest,
    Plugins,
    ProvenanceRequest,
)
from scope_trio.http.openapi import Forward, Route
from scope_trio.http.routes.base import RouteGroup, needs_cloud, not_supported
from scope_trio.ops import logs

__all__ = ["CIVITAI_ENV", "LibraryRoutes"]

CIVITAI_ENV = "CIVITAI_API_TOKEN"
_ERR = ErrorResponse
_FWD_ERRORS = {400: _ERR, 404: _ERR, 502: _ERR}


def _civitai_host(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host == "civitai.com" or host.endswith(".civitai.com")


class LibraryRoutes(RouteGroup):
    ROUTES = (
        Route(
            "GET",
            "/api/v1/loras",
            "loras",
            "LoRA files (the cloud's; none locally)",
            {200: LoraFiles, 502: _ERR},
            forward=Forward(30.0),
        ),
        Route(
            "POST",
            "/api/v1/loras",
            "lora_install",
            "Install a LoRA from a CivitAI or Hugging Face URL (in the cloud)",
            {200: "application/json", **_FWD_ERRORS},
            LoraInstallRequest,
            forward=Forward(300.0, "json", prepare="add_civitai_token"),
        ),
        Route(
            "DELETE",
            "/api/v1/loras/{name}",
            "lora_delete",
            "Delete a LoRA file (in the cloud)",
            {200: "application/json", **_FWD_ERRORS},
            forward=Forward(30.0),
        ),
        Route(
            "POST",
            "/api/v1/lora/download",
            "lora_download",
            "Download a LoRA for a workflow (in the cloud)",
            {200: "application/json", **_FWD_ERRORS},
            LoraDownloadRequest,
            forward=Forward(300.0, "json", prepare="lora_download_body"),
        ),
        Route(
            "PUT",
            "/api/v1/lora/{filename:path}/provenance",
            "lora_provenance",
            "Record where a local LoRA file came from (no local files here)",
            {400: _ERR, 404: _ERR},
            ProvenanceRequest,
        ),
        Route(
            "GET",
            "/api/v1/assets",
            "assets",
            "Image and video assets (the cloud's; none locally)",
            {200: Assets, 502: _ERR},
            query=("type",),
            forward=Forward(30.0),
        ),
        Route(
            "POST",
            "/api/v1/assets",
            "asset_upload",
            "Upload an asset (not supported: needs Daydream's CDN)",
            {400: _ERR},
            query=("filename",),
        ),
        Route(
            "GET",
            "/api/v1/assets/{asset_path:path}",
            "asset_file",
            "An asset file kept locally (none here)",
            {404: _ERR},
        ),
        Route(
            "GET",
            "/api/v1/plugins",
            "plugins",
            "Plugins (the cloud's; none locally)",
            {200: Plugins, 502: _ERR},
            forward=Forward(30.0),
        ),
        Route(
            "POST",
            "/api/v1/plugins",
            "plugin_install",
            "Install a plugin (in the cloud, which allows only the packages it lists)",
            {200: "application/json", **_FWD_ERRORS},
            forward=Forward(60.0, "json"),
        ),
        Route(
            "DELETE",
            "/api/v1/plugins/{name}",
            "plugin_delete",
            "Uninstall a plugin (in the cloud)",
            {200: "application/json", **_FWD_ERRORS},
            forward=Forward(60.0),
        ),
        Route(
            "POST",
            "/api/v1/plugins/{name}/reload",
            "plugin_reload",
            "Reload an editable plugin (in the cloud)",
            {200: "application/json", **_FWD_ERRORS},
            PluginReloadRequest,
            request_required=False,
            forward=Forward(60.0, "json"),
        ),
        Route(
            "GET",
            "/api/v1/recordings/{session_id}",
            "recording",
            "Download the recording of the current cloud session (an MP4 file)",
            {200: "video/mp4", 404: _ERR, 502: _ERR},
            forward=Forward(120.0, prepare="recording_path"),
        ),
    )

    # ----------------------------------------------------------- answers while not connected

    async def loras(self) -> Response:
        return self.ctx.json({"lora_files": []})

    async def lora_install(self) -> Response:
        body, _ = await parse_body(LoraInstallRequest)
        host = (urlsplit(body.url).hostname or "").lower()
        if not any(host == h or host.endswith("." + h) for h in ("civitai.com", "huggingface.co")):
            raise ApiError(400, "URL must be from civitai.com or huggingface.co")
        raise needs_cloud("Installing a LoRA")

    async def lora_delete(self, name: str) -> Response:
        raise ApiError(404, f"LoRA file '{name}' not found (no LoRA files are kept locally)")

    async def lora_download(self) -> Response:
        raise needs_cloud("Downloading a LoRA")

    async def lora_provenance(self, filename: str) -> Response:
        await parse_body(ProvenanceRequest)
        raise ApiError(404, f"LoRA file '{filename}' not found (no LoRA files are kept locally)")

    async def assets(self) -> Response:
        return self.ctx.json({"assets": []})

    async def asset_upload(self) -> Response:
        raise not_supported(
            "Uploading assets",
            "Scope uploads them to Daydream's CDN with a token from the Daydream API, "
            "a service this server does not use",
        )

    async def asset_file(self, asset_path: str) -> Response:
        raise ApiError(404, "Asset not found")

    async def plugins(self) -> Response:
        return self.ctx.json({"plugins": [], "total": 0, "failed_plugins": []})

    async def plugin_install(self) -> Response:
        raise needs_cloud("Installing a plugin")

    async def plugin_delete(self, name: str) -> Response:
        raise ApiError(404, f"Plugin '{name}' not found (no plugins are installed locally)")

    async def plugin_reload(self, name: str) -> Response:
        raise ApiError(404, f"Plugin '{name}' not found (no plugins are installed locally)")

    async def recording(self, session_id: str) -> Response:
        raise ApiError(
            404,
            f"Recording not available for session {session_id}: recordings are made in the "
            "cloud, while connected",
        )

    # ------------------------------------------------------- rewriting forwarded requests

    def _civitai_token(self) -> str | None:
        return os.environ.get(CIVITAI_ENV) or self.ctx.keys.get("civitai")

    async def add_civitai_token(self, path: str, body: Any) -> tuple[str, Any]:
        """A CivitAI URL without a ``token`` gets the configured CivitAI token (as Scope)."""
        request = LoraInstallRequest.model_validate(body)
        url = request.url
        token = self._civitai_token()
        if token and _civitai_host(url) and "token" not in parse_qs(urlsplit(url).query):
            url += ("&" if urlsplit(url).query else "?") + f"token={token}"
            self.ctx.app.redact.add(token)
            logs.add_secret(token)
        return path, {"url": url, "filename": request.filename}

    async def lora_download_body(self, path: str, body: Any) -> tuple[str, Any]:
        """The request minus empty fields; for CivitAI, this server's token wins."""
        request = LoraDownloadRequest.model_validate(body)
        forwarded = request.model_dump(exclude_none=True)
        if request.source == "civitai":
            token = self._civitai_token() or request.civitai_token
            if token:
                forwarded["civitai_token"] = token
                self.ctx.app.redact.add(token)
                logs.add_secret(token)
        return path, forwarded

    async def recording_path(self, path: str, body: Any, session_id: str) -> tuple[str, Any]:
        """The cloud names the recording by its own session id, not the browser's."""
        cloud_session = getattr(self.ctx.manager.supervisor.session, "session_id", None)
        if not isinstance(cloud_session, str):
            raise ApiError(404, "No active cloud session for recording download")
        return f"/api/v1/recordings/{cloud_session}", None
