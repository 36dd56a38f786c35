"""The cloud proxy and the local answers of Scope's API, route by route.

The cloud is a real WebSocket server playing the cloud's side (``tests/fake_cloud_ws.py``)
that answers ``api`` requests from a table and records what it received; the manager and
its link are the real ones; requests go through the app's own test client (no socket: the
mechanics of the mapping are what is tested here; ``tests/test_http_dropin.py`` runs the
frontend's sequence against a whole server).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from fake_cloud_ws import FakeCloud, FakeCloudConnection, serve_fake_cloud, standard_reply
from quart.typing import TestClientProtocol as QuartClient

from scope_trio.cloud.manager import CloudManager, CloudSettings
from scope_trio.dev.fakes import NoRelay
from scope_trio.http.app import ROUTES, ScopeApp, create_app
from scope_trio.http.routes.pipeline import NOT_LOADED
from scope_trio.ops.logring import LogRing


@dataclass
class Cloud:
    """What the fake cloud answers to ``api`` requests, and what it received."""

    answers: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """(method, path without query) → the reply's fields (``status``, ``data``, ...)."""
    received: list[dict[str, Any]] = field(default_factory=list)
    silent: bool = False

    def reply(self, message: dict[str, Any]) -> dict[str, Any] | None:
        if message.get("type") != "api":
            return standard_reply(message)
        self.received.append(message)
        if self.silent:
            return None
        key = (message["method"], str(message["path"]).split("?", 1)[0])
        fields = self.answers.get(key, {"status": 200, "data": {"echo": message}})
        return {"type": "api_response", "request_id": message["request_id"], **fields}

    async def script(self, conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.serve(self.reply)


@dataclass
class Rig:
    client: QuartClient
    app: ScopeApp
    manager: CloudManager
    cloud: Cloud
    fake: FakeCloud

    async def connect(self) -> None:
        await self.manager.connect()
        with trio.fail_after(10):
            await self.manager.wait_until(lambda s: s["connected"])


@asynccontextmanager
async def rig(**app_options: Any) -> AsyncIterator[Rig]:
    cloud = Cloud()
    async with serve_fake_cloud(cloud.script) as fake, trio.open_nursery() as nursery:
        manager = CloudManager(nursery, CloudSettings(ws_url=fake.url))
        app = create_app(manager, NoRelay(), debug_endpoints=False, **app_options)
        yield Rig(app.test_client(), app, manager, cloud, fake)
        with trio.move_on_after(5, shield=True):
            await manager.disconnect()
        nursery.cancel_scope.cancel()


FORWARDED = [route for route in ROUTES if route.forward is not None]
EXAMPLE_PARAMS = {"name": "a b", "session_id": "s1"}
EXAMPLE_BODIES: dict[str, Any] = {
    "/api/v1/pipeline/load": {"pipeline_ids": ["invert"], "load_params": {"height": 320}},
    "/api/v1/models/download": {"pipeline_id": "invert"},
    "/api/v1/workflow/resolve": {"pipelines": [], "extra": 1},
    "/api/v1/loras": {"url": "https://huggingface.co/x/y.safetensors"},
    "/api/v1/lora/download": {"source": "url", "url": "https://example.com/a.safetensors"},
    "/api/v1/plugins": {"package": "scope-plugin"},
    "/api/v1/plugins/{name}/reload": {"force": True},
    "/api/v1/restart": {},
}


def with_json(body: Any) -> dict[str, Any]:
    """The test client's arguments for a JSON body, or for none at all."""
    return {} if body is None else {"json": body}


def example_path(path: str) -> str:
    for name, value in EXAMPLE_PARAMS.items():
        path = path.replace("{" + name + "}", value)
    return path


async def test_every_forwarded_route_goes_to_the_cloud_with_path_query_and_body() -> None:
    """One table drives them all: method, path with the raw query, the JSON body only for
    POST/PATCH/PUT, and the cloud's ``data`` comes back as the answer (status 200)."""
    async with rig() as r:
        await r.connect()
        for route in FORWARDED:
            if route.path == "/api/v1/recordings/{session_id}":
                continue  # resolved to the cloud's session id: its own test
            path = example_path(route.path)
            query = (
                "pipeline_id=a%20b&x=1"
                if route.forward and route.forward.required_query
                else "x=%2F1&y"
            )
            body = EXAMPLE_BODIES.get(route.path) if route.method in ("POST", "PUT") else None
            response = await r.client.open(
                f"{path}?{query}", method=route.method, **with_json(body)
            )
            assert response.status_code == 200, (route.path, await response.get_data())
            sent = r.cloud.received[-1]
            assert sent["method"] == route.method
            assert sent["path"] == f"{path}?{query}", "the raw query, still percent-encoded"
            if route.method in ("GET", "DELETE"):
                assert "body" not in sent
            elif route.path == "/api/v1/lora/download":
                assert sent["body"] == {"source": "url", "url": EXAMPLE_BODIES[route.path]["url"]}
            elif route.path == "/api/v1/loras":
                assert sent["body"] == {"url": EXAMPLE_BODIES[route.path]["url"], "filename": None}
            elif body:
                assert sent["body"] == body, "the body as the client sent it"
            data = await response.get_json()
            if route.path == "/api/v1/hardware/info":
                assert data == {
                    "vram_gb": None,
                    "spout_available": False,
                    "ndi_available": False,
                    "syphon_available": False,
                }
            elif route.path == "/api/v1/pipeline/status":
                assert data == {**NOT_LOADED, "echo": sent}, "every field, as Scope's model"
            else:
                assert data == {"echo": sent}
        assert len(r.cloud.received) == len(FORWARDED) - 1
        assert r.manager.status()["stats"]["api_requests_sent"] == len(FORWARDED) - 1


async def test_a_cloud_error_status_is_passed_through_with_its_detail() -> None:
    async with rig() as r:
        await r.connect()
        r.cloud.answers[("POST", "/api/v1/pipeline/load")] = {
            "status": 400,
            "data": {"detail": "Unknown pipeline: nope"},
        }
        r.cloud.answers[("POST", "/api/v1/plugins")] = {"status": 403, "error": "not allowed"}
        r.cloud.answers[("DELETE", "/api/v1/plugins/p")] = {
            "status": 409,
            "data": {"detail": {"message": "busy", "loaded_pipelines": ["a"]}},
        }
        r.cloud.answers[("GET", "/api/v1/loras")] = {"status": 504}
        r.cloud.answers[("GET", "/api/v1/assets")] = {"status": "teapot"}
        load = await r.client.post("/api/v1/pipeline/load", json={"pipeline_ids": ["nope"]})
        assert (load.status_code, await load.get_json()) == (
            400,
            {"detail": "Unknown pipeline: nope"},
        )
        plugin = await r.client.post("/api/v1/plugins", json={"package": "evil"})
        assert (plugin.status_code, await plugin.get_json()) == (403, {"detail": "not allowed"})
        busy = await r.client.delete("/api/v1/plugins/p")
        assert busy.status_code == 409
        assert (await busy.get_json())["detail"] == {"message": "busy", "loaded_pipelines": ["a"]}
        loras = await r.client.get("/api/v1/loras")
        assert (loras.status_code, await loras.get_json()) == (
            504,
            {"detail": "Cloud request failed"},
        )
        assets = await r.client.get("/api/v1/assets")
        assert assets.status_code == 502
        assert "no valid status" in (await assets.get_json())["detail"]


async def test_a_cloud_success_status_becomes_200_and_missing_data_an_empty_object() -> None:
    async with rig() as r:
        await r.connect()
        r.cloud.answers[("DELETE", "/api/v1/loras/x")] = {"status": 204}
        response = await r.client.delete("/api/v1/loras/x")
        assert (response.status_code, await response.get_json()) == (200, {})


async def test_a_binary_answer_is_a_file_download() -> None:
    content = b"\x00\x00\x00\x18ftypmp42 not really a movie"
    encoded = base64.b64encode(content).decode()
    async with rig() as r:
        await r.connect()
        r.cloud.answers[("GET", "/api/v1/assets")] = {
            "status": 200,
            "data": {"_base64_content": encoded, "_content_type": "image/png"},
        }
        response = await r.client.get("/api/v1/assets")
        assert response.status_code == 200
        assert await response.get_data() == content
        assert response.headers["Content-Type"] == "image/png"
        assert response.headers["Content-Length"] == str(len(content))
        disposition = response.headers["Content-Disposition"]
        assert disposition.startswith('attachment; filename="recording-')
        r.cloud.answers[("GET", "/api/v1/assets")] = {
            "status": 200,
            "_base64_content": "not base64!",
        }
        broken = await r.client.get("/api/v1/assets")
        assert broken.status_code == 502


async def test_the_recording_is_asked_for_by_the_cloud_sessions_id() -> None:
    async with rig() as r:
        await r.connect()
        response = await r.client.get("/api/v1/recordings/browser-1")
        assert (response.status_code, await response.get_json()) == (
            404,
            {"detail": "No active cloud session for recording download"},
        )
        assert not r.cloud.received, "nothing to ask the cloud without a cloud session"


async def test_a_link_that_stops_answering_is_a_502_after_the_routes_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with rig() as r:
        await r.connect()
        r.cloud.silent = True
        real_api = r.manager.api

        async def short(*args: Any, **kwargs: Any) -> Any:
            assert kwargs["timeout"] == 30.0, "Scope's timeout for this route"
            kwargs["timeout"] = 0.2
            return await real_api(*args, **kwargs)

        monkeypatch.setattr(r.manager, "api", short)
        response = await r.client.get("/api/v1/plugins")
        assert (response.status_code, await response.get_json()) == (
            502,
            {"detail": "Cloud request failed: Request timeout after 0.2s"},
        )


async def test_health_falls_back_to_this_servers_when_the_cloud_fails() -> None:
    async with rig() as r:
        await r.connect()
        r.cloud.answers[("GET", "/health")] = {
            "status": 200,
            "data": {"status": "healthy", "server_start_time": 1.0, "version": "cloud"},
        }
        assert (await (await r.client.get("/health")).get_json())["version"] == "cloud"
        r.cloud.answers[("GET", "/health")] = {"status": 500, "error": "boom"}
        local = await r.client.get("/health")
        assert local.status_code == 200
        assert (await local.get_json())["version"] != "cloud"


async def test_civitai_installs_get_the_stored_token_and_it_never_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CIVITAI_API_TOKEN", raising=False)
    token = "civitai-SECRET-123"
    async with rig() as r:
        await r.connect()
        stored = await r.client.put("/api/v1/keys/civitai", json={"value": token})
        assert (await stored.get_json()) == {"success": True, "message": "CivitAI token saved"}
        url = "https://civitai.com/api/download/models/1?type=Model"
        response = await r.client.post("/api/v1/loras", json={"url": url})
        assert response.status_code == 200
        assert r.cloud.received[-1]["body"]["url"] == f"{url}&token={token}"
        assert token not in (await response.get_data()).decode(), "the echo is redacted"
        await r.client.post("/api/v1/lora/download", json={"source": "civitai", "model_id": "1"})
        assert r.cloud.received[-1]["body"] == {
            "source": "civitai",
            "model_id": "1",
            "civitai_token": token,
        }
        keys = await (await r.client.get("/api/v1/keys")).get_json()
        civitai = next(k for k in keys["keys"] if k["id"] == "civitai")
        assert (civitai["is_set"], civitai["source"]) == (True, "stored")


# ------------------------------------------------------------------------ not connected

LOCAL_OK: list[tuple[str, str, Any]] = [
    ("GET", "/api/v1/pipeline/status", NOT_LOADED),
    ("GET", "/api/v1/pipelines/schemas", {"pipelines": {}}),
    ("GET", "/api/v1/loras", {"lora_files": []}),
    ("GET", "/api/v1/assets?type=image", {"assets": []}),
    ("GET", "/api/v1/plugins", {"plugins": [], "total": 0, "failed_plugins": []}),
    ("GET", "/api/v1/models/status?pipeline_id=invert", {"downloaded": False, "progress": None}),
    (
        "GET",
        "/api/v1/hardware/info",
        {
            "vram_gb": None,
            "spout_available": False,
            "ndi_available": False,
            "syphon_available": False,
        },
    ),
    ("GET", "/api/v1/input-sources", {"input_sources": []}),
    (
        "GET",
        "/api/v1/osc/status",
        {
            "enabled": False,
            "listening": False,
            "port": None,
            "host": None,
            "log_all_messages": False,
        },
    ),
    ("GET", "/api/v1/osc/paths", {"active": [], "available": [], "active_pipeline_ids": []}),
]

LOCAL_REFUSED: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/api/v1/pipeline/load", {"pipeline_ids": ["invert"]}, 400, "needs the cloud"),
    ("POST", "/api/v1/models/download", {"pipeline_id": "invert"}, 400, "needs the cloud"),
    ("POST", "/api/v1/plugins", {"package": "x"}, 400, "needs the cloud"),
    ("POST", "/api/v1/loras", {"url": "https://civitai.com/x"}, 400, "needs the cloud"),
    (
        "POST",
        "/api/v1/loras",
        {"url": "https://evil.example/x"},
        400,
        "civitai.com or huggingface.co",
    ),
    ("POST", "/api/v1/lora/download", {"source": "url", "url": "u"}, 400, "needs the cloud"),
    ("POST", "/api/v1/restart", None, 400, "not supported"),
    ("POST", "/api/v1/assets?filename=a.png", None, 400, "not supported"),
    ("PUT", "/api/v1/osc/settings", {"log_all_messages": True}, 400, "OSC server not running"),
    ("GET", "/api/v1/input-sources/ndi/sources", None, 400, "not available"),
    ("GET", "/api/v1/input-sources/ndi/sources/a/b/resolution", None, 400, "not available"),
    ("GET", "/api/v1/input-sources/syphon/sources/x/stream?fps=2", None, 400, "not available"),
    ("DELETE", "/api/v1/loras/x", None, 404, "LoRA file 'x' not found"),
    ("PUT", "/api/v1/lora/sub/x.safetensors/provenance", {"source": "local"}, 404, "not found"),
    ("DELETE", "/api/v1/plugins/p", None, 404, "Plugin 'p' not found"),
    ("POST", "/api/v1/plugins/p/reload", None, 404, "Plugin 'p' not found"),
    ("GET", "/api/v1/assets/images/a.png", None, 404, "Asset not found"),
    ("GET", "/api/v1/recordings/s1", None, 404, "Recording not available"),
    ("GET", "/api/v1/models/status", None, 400, "pipeline_id: query parameter required"),
    ("PUT", "/api/v1/keys/nope", {"value": "v"}, 404, "Unknown service: nope"),
    ("DELETE", "/api/v1/keys/huggingface", None, 404, "No stored HuggingFace token"),
]


async def test_not_connected_every_read_route_answers_200_in_scopes_shape() -> None:
    async with rig() as r:
        for method, path, expected in LOCAL_OK:
            response = await r.client.open(path, method=method)
            assert response.status_code == 200, path
            assert await response.get_json() == expected, path
        workflow = await r.client.post(
            "/api/v1/workflow/resolve",
            json={"pipelines": [{"pipeline_id": "longlive", "source": {"type": "builtin"}}]},
        )
        resolved = await workflow.get_json()
        assert resolved["can_apply"] is False
        assert [(i["kind"], i["name"], i["status"]) for i in resolved["items"]] == [
            ("pipeline", "longlive", "missing")
        ]
        docs = await r.client.get("/api/v1/osc/docs")
        assert docs.status_code == 200
        assert docs.headers["Content-Type"].startswith("text/html")
        assert not r.cloud.received


async def test_not_connected_what_cannot_work_here_says_why() -> None:
    async with rig() as r:
        for method, path, body, status, words in LOCAL_REFUSED:
            response = await r.client.open(path, method=method, **with_json(body))
            assert response.status_code == status, (method, path, await response.get_data())
            assert words in str((await response.get_json())["detail"]), (method, path)


async def test_keys_are_stored_in_memory_and_an_environment_variable_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf-from-env")
    monkeypatch.delenv("CIVITAI_API_TOKEN", raising=False)
    async with rig() as r:
        keys = (await (await r.client.get("/api/v1/keys")).get_json())["keys"]
        assert [k["id"] for k in keys] == ["huggingface", "civitai"]
        assert (keys[0]["is_set"], keys[0]["source"], keys[0]["env_var"]) == (
            True,
            "env_var",
            "HF_TOKEN",
        )
        assert (keys[1]["is_set"], keys[1]["source"]) == (False, None)
        refused = await r.client.put("/api/v1/keys/huggingface", json={"value": "x"})
        assert refused.status_code == 409
        empty = await r.client.put("/api/v1/keys/civitai", json={"value": ""})
        assert empty.status_code == 400
        assert (
            await r.client.put("/api/v1/keys/civitai", json={"value": "tok-1"})
        ).status_code == 200
        removed = await r.client.delete("/api/v1/keys/civitai")
        assert await removed.get_json() == {"success": True, "message": "CivitAI token removed"}


# ------------------------------------------------------------------------------- stats


async def test_signalling_counters_count_from_each_connect_frame_counters_never() -> None:
    async with rig() as r:
        await r.connect()
        assert (await r.client.get("/api/v1/plugins")).status_code == 200
        r.manager.media_stats.offers_sent += 2  # as two cloud offers would
        r.manager.media_stats.frames_received_from_cloud += 7
        stats = r.manager.status()["stats"]
        assert (stats["api_requests_sent"], stats["api_requests_successful"]) == (1, 1)
        assert (stats["webrtc_offers_sent"], stats["frames_received_from_cloud"]) == (2, 7)
        await r.manager.disconnect()
        assert r.manager.status()["stats"] is None, "only while connected"
        await r.connect()
        stats = r.manager.status()["stats"]
        assert (stats["api_requests_sent"], stats["webrtc_offers_sent"]) == (0, 0)
        assert stats["frames_received_from_cloud"] == 7


# ------------------------------------------------------------------------------ the UI


async def test_a_frontend_is_served_as_scope_serves_it(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>Scope</title>")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "app-1234.js").write_text("console.log(1)")
    (tmp_path.parent / "secret.txt").write_text("no")
    async with rig(frontend_dir=tmp_path) as r:
        for path in ("/", "/some/client/route", "/assets/missing.js", "/../secret.txt"):
            response = await r.client.get(path)
            assert response.status_code == 200, path
            assert "<title>Scope</title>" in (await response.get_data()).decode(), path
            assert response.headers["Cache-Control"] == "no-cache, no-store, must-revalidate"
        asset = await r.client.get("/assets/app-1234.js")
        assert (await asset.get_data()) == b"console.log(1)"
        assert "no-store" not in asset.headers.get("Cache-Control", "")
        status_page = await r.client.get("/status")
        assert "/api/v1/cloud/events" in (await status_page.get_data()).decode()
        unknown_api = await r.client.get("/api/v1/nope")
        assert unknown_api.status_code == 404, "an unknown API path is not a page"
        assert (await r.client.post("/some/client/route")).status_code == 405


async def test_without_a_frontend_the_status_page_is_at_the_root_too() -> None:
    async with rig() as r:
        for path in ("/", "/status"):
            page = await r.client.get(path)
            assert "/api/v1/cloud/events" in (await page.get_data()).decode(), path
        assert (await r.client.get("/some/client/route")).status_code == 404


# ------------------------------------------------------------------------------- logs


async def test_logs_tail_and_current_come_from_the_ring() -> None:
    ring = LogRing(max_bytes=10_000)
    async with rig(log_ring=ring) as r:
        record = __import__("logging").getLogger("scope.cloud")
        ring.handle(
            record.makeRecord("scope.cloud", 30, __file__, 1, "cloud says %s", ("hi",), None)
        )
        first = await (await r.client.get("/api/v1/logs/tail?lines=200&since_offset=0")).get_json()
        assert len(first["lines"]) == 1
        assert " - scope.cloud - WARNING - cloud says hi" in first["lines"][0]
        again = await (
            await r.client.get(f"/api/v1/logs/tail?since_offset={first['offset']}")
        ).get_json()
        assert again == {"lines": [], "offset": first["offset"]}
        bad = await r.client.get("/api/v1/logs/tail?lines=0")
        assert bad.status_code == 400
        current = await r.client.get("/api/v1/logs/current")
        assert current.headers["Content-Disposition"].startswith("attachment; filename=")
        assert (await current.get_data()).decode().endswith("cloud says hi\n")


async def test_the_osc_stream_stays_open_with_keepalives_and_ends_at_shutdown() -> None:
    async with rig(sse_keepalive=0.05) as r, r.client.request("/api/v1/osc/stream") as stream:
        await stream.send_complete()
        with trio.fail_after(5):
            chunks = [await stream.receive() for _ in range(3)]
        assert chunks == [b": keep-alive\n\n"] * 3
        r.app.begin_shutdown()
        rest: list[bytes] = []
        ended = False
        with trio.fail_after(5):
            while not ended:
                try:
                    rest.append(await stream.receive())
                except trio.EndOfChannel:  # the response is complete: the stream is over
                    ended = True
        assert set(rest) <= {b"", b": keep-alive\n\n"}
