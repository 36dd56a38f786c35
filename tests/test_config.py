"""``ServerConfig`` from a TOML file, the environment and flags; each reaches a real server.

Unit tests check loading (types, unknown keys, the policy types' own validation, precedence,
redaction, the generated reference). The ``system`` test runs ``scope-trio serve --config``
as a real process against a dev cloud and shows that the link deadlines, the stall and
path-silence thresholds and the reconnect policy set in the file change what it does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from browser_peer import http_browser
from devcloud_client import eventually, fault, running_devcloud
from serve_process import ServeProcess, clean_env, serve_process, wait_connected

from scope_trio import rtc
from scope_trio.config import (
    DOCS,
    ConfigError,
    ServerConfig,
    all_keys,
    effective,
    load_config,
    reference_markdown,
    to_toml,
)
from scope_trio.dev.devcloud import ws_url

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scope.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_file_sets_every_section(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [server]
            port = 9001
            cors_origins = ["http://a.example"]
            [cloud]
            ws_url = "ws://127.0.0.1:1/ws"
            [reconnect]
            max_attempts = 5
            base_delay = 0.5
            [relink]
            max_relinks = 1
            [link]
            ready_timeout = 7
            connect_backoff = [0.5, 1]
            ping_interval = 2.5
            [media]
            stall_timeout = 3
            path_silence_timeout = 0.8
            [ice]
            rto = 0.7
            """,
        )
    )
    assert config.port == 9001
    assert config.cors_origins == ("http://a.example",)
    assert config.cloud.ws_url == "ws://127.0.0.1:1/ws"
    assert not config.embedded_cloud
    assert (config.reconnect.max_attempts, config.reconnect.base_delay) == (5, 0.5)
    assert config.relink.max_relinks == 1
    assert config.link == {
        "ready_timeout": 7.0,
        "connect_backoff": (0.5, 1.0),
        "ping_interval": 2.5,
    }
    assert (config.media.stall_timeout, config.media.path_silence_timeout) == (3.0, 0.8)
    assert config.ice.rto == 0.7
    # Untouched keys keep their defaults.
    assert config.reconnect.max_delay == ServerConfig().reconnect.max_delay
    assert config.media.fps == ServerConfig().media.fps


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[reconect]\nmax_attempts = 1\n", "reconect: unknown section"),
        ("[reconnect]\nmax_atempts = 1\n", "reconnect.max_atempts: unknown key"),
        ("[link]\napi_key = 'x'\n", "link.api_key: unknown key"),
        ("[server]\ncloud = 1\n", "server.cloud: unknown key"),
        ("[media]\nstall_timeout = 'two'\n", "media.stall_timeout: expected a number, got 'two'"),
        ("[reconnect]\nmax_attempts = 2.5\n", "reconnect.max_attempts: expected an integer"),
        ("[server]\ndebug_endpoints = 1\n", "server.debug_endpoints: expected true or false"),
        ("[server]\ncors_origins = 'x'\n", "server.cors_origins: expected an array"),
        (
            "[reconnect]\nbase_delay = -1\n",
            "reconnect: ReconnectPolicy.base_delay must be a positive",
        ),
        ("[link]\nping_interval = 0\n", "link: ping_interval must be positive"),
        ("[server]\nport = 70000\n", "server.port: must be 0-65535"),
        ("[server]\ndevcloud_pipeline = 'x'\n", "server.devcloud_pipeline: must be one of"),
        ("[ice]\nfailures = 0\n", "ice: "),
        ("reconnect = 3\n", "reconnect: must be a table"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text))
    assert message in str(raised.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_precedence_is_defaults_file_environment_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nhost = '::1'\nport = 9001\ndebug_endpoints = false\n")
    from_file = load_config(path)
    env = {"SCOPE_PORT": "9002", "SCOPE_DEBUG_ENDPOINTS": "1", "SCOPE_CLOUD_APP_ID": "a/b"}
    with_env = from_file.with_env(env)
    assert (with_env.host, with_env.port, with_env.debug_endpoints) == ("::1", 9002, True)
    assert with_env.cloud.app_id == "a/b"
    flags = with_env.with_overrides(port=9003, host=None)
    assert (flags.host, flags.port) == ("::1", 9003)
    with pytest.raises(ConfigError, match="SCOPE_PORT"):
        ServerConfig().with_env({"SCOPE_PORT": "eighty"})


def test_print_config_shows_the_effective_values_and_never_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[reconnect]\nmax_attempts = 4\n[media]\nstall_timeout = 2.5\n")
    key = "sk-config-secret-123"
    result = subprocess.run(
        [sys.executable, "-m", "scope_trio", "serve", "--config", str(path), "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env({"SCOPE_CLOUD_API_KEY": key, "SCOPE_PORT": "9004"}),
    )
    assert result.returncode == 0, result.stderr
    assert key not in result.stdout + result.stderr
    assert 'api_key = "***"' in result.stdout
    assert "port = 9004" in result.stdout
    assert "max_attempts = 4" in result.stdout
    assert "stall_timeout = 2.5" in result.stdout
    # The output is a configuration file that loads back to the same values.
    printed = write(tmp_path, result.stdout)
    again = load_config(printed)
    assert (again.port, again.reconnect.max_attempts, again.media.stall_timeout) == (9004, 4, 2.5)


def test_the_cli_refuses_a_bad_file_before_starting(tmp_path: Path) -> None:
    path = write(tmp_path, "[media]\nstall_timout = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "scope_trio", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
    )
    assert result.returncode == 2
    assert "media.stall_timout: unknown key" in result.stderr


def test_the_reference_is_generated_from_the_model() -> None:
    assert set(DOCS) == set(all_keys()), "every key documented, no stale entries"
    assert all(DOCS.values())
    reference = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert reference == reference_markdown(), (
        "docs/configuration.md is stale: python -m scope_trio.config > docs/configuration.md"
    )
    assert "docs/configuration.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    assert effective(load_config(write(tmp_path, to_toml(ServerConfig())))) == effective(
        ServerConfig()
    )


# ------------------------------------------------------------------ a real `scope-trio serve`


async def status_where(http: httpx.AsyncClient, key: str, needle: str) -> dict[str, Any]:
    """The first status whose ``key`` contains ``needle`` (the server is another process)."""
    found: dict[str, Any] = {}

    async def seen() -> bool:
        nonlocal found
        found = (await http.get("/api/v1/cloud/status")).json()
        return needle in (found.get(key) or "")

    try:
        await eventually(seen, timeout=20)
    except trio.TooSlowError:
        raise AssertionError(f"no {key} containing {needle!r}; last status: {found}") from None
    return found


async def logged(server: ServeProcess, needle: str) -> None:
    """The server logged ``needle`` (its log is lossless, unlike polling a status)."""

    async def seen() -> bool:
        await trio.lowlevel.checkpoint()
        return needle in server.log

    try:
        await eventually(seen, timeout=20)
    except trio.TooSlowError:
        raise AssertionError(f"not logged: {needle!r}\n{server.log[-3000:]}") from None


@pytest.mark.system
async def test_settings_in_a_file_take_effect_in_a_real_server(tmp_path: Path) -> None:
    async with running_devcloud(pipeline="invert") as cloud:
        path = write(
            tmp_path,
            f"""
            [cloud]
            ws_url = "{ws_url(cloud)}"
            [link]
            ready_timeout = 0.6
            connect_attempts = 1
            [media]
            stall_timeout = 0.7
            stall_recovery_timeout = 0
            path_silence_timeout = 0.45
            [reconnect]
            max_attempts = 1
            base_delay = 0.1
            stable_period = 0.5
            """,
        )
        async with (
            serve_process("--config", str(path)) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10) as http,
            rtc.open_loop(),
        ):
            # Link deadline: no `ready` within 0.6 s (the default waits 180 s).
            await fault(cloud, "withhold_ready", count=1)
            assert (await http.post("/api/v1/cloud/connect")).status_code == 200
            await status_where(http, "error", "did not send 'ready' within 0.6 s")
            assert (await http.post("/api/v1/cloud/connect")).status_code == 200
            await wait_connected(http)

            async with http_browser(http, deadline=30) as browser:
                await browser.inverted_frame(timeout=30)
                # Stall threshold: the cloud keeps the path alive but sends no frame.
                await fault(cloud, "stall_media", seconds=1.5)
                await logged(server, "lost: no video from the cloud for 0.7 s")
                await eventually(_connected(http), timeout=20)
                await browser.inverted_frame(timeout=30)
                # Path silence: nothing at all arrives from the cloud.
                await fault(cloud, "blackhole", seconds=1.0, scope="existing")
                await logged(server, "lost: no packets from the cloud for 0.45 s")
                await eventually(_connected(http), timeout=20)
                await browser.inverted_frame(timeout=30)
                # Reconnect policy: one attempt, and it is refused.
                await fault(cloud, "refuse_offers", count=5)
                await fault(cloud, "close_pc")
                await status_where(http, "webrtc_error", "Reconnection failed after 1 attempts")


def _connected(http: httpx.AsyncClient) -> Any:
    async def connected() -> bool:
        status = (await http.get("/api/v1/cloud/status")).json()
        return bool(status["webrtc_connected"])

    return connected
