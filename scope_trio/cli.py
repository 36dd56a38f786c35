"""``scope-trio``: the command line (also ``python -m scope_trio``).

Subcommands:

* ``serve`` runs the drop-in HTTP server (:func:`scope_trio.server.serve`). Settings come
  from a TOML file (--config, docs/configuration.md) and Scope's environment variables; flags win. With no cloud configured
  it runs the dev cloud in-process and says so in one line. SIGINT/SIGTERM shut it down
  gracefully within a bounded time; a second signal stops it at once.
* ``devcloud`` runs the local stand-in for the cloud GPU runner (see :mod:`scope_trio.dev.devcloud`).

``serve`` logs to stderr as text, or with ``--log-json`` one JSON object per line
(:mod:`scope_trio.ops.logs`); either way each line carries its connection and session ids and
the api key is redacted from all of it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

USAGE = """usage: scope-trio {serve,devcloud} [options]

  serve      run the HTTP server (Scope's API; `scope-trio serve --help`)
  devcloud   run the local dev cloud (a stand-in for the cloud GPU runner)
"""

EXIT_USAGE = 2
FORCED_EXIT_GRACE = 5.0
"""Seconds past the server's own shutdown bound before the CLI cancels everything."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command == "devcloud":
        from scope_trio.dev.devcloud import main as devcloud_main  # noqa: PLC0415 - keeps startup light

        return devcloud_main(rest)
    if command == "serve":
        return serve_main(rest)
    print(f"scope-trio: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scope-trio serve",
        description=(
            "Serve Daydream Scope's HTTP API with remote inference (relay mode). "
            "Environment: SCOPE_HOST, SCOPE_PORT, SCOPE_CLOUD_APP_ID, SCOPE_CLOUD_API_KEY, "
            "SCOPE_CLOUD_WS_URL, SCOPE_DEBUG_ENDPOINTS; flags win."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML file with any setting (docs/configuration.md); environment and flags win",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML (api key redacted) and exit",
    )
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000; 0: any)")
    parser.add_argument("--cloud-app-id", default=None, help="cloud app id (fal app)")
    parser.add_argument("--cloud-api-key", default=None, help="cloud api key (never shown)")
    parser.add_argument("--cloud-ws-url", default=None, help="cloud signaling URL (ws/wss)")
    parser.add_argument(
        "--debug-endpoints",
        action="store_true",
        default=None,
        help="enable POST /api/v1/cloud/debug/disconnect-webrtc",
    )
    parser.add_argument(
        "--devcloud-pipeline",
        choices=["invert", "passthrough", "pattern"],
        default=None,
        help="pipeline of the embedded dev cloud used when no cloud is configured (invert)",
    )
    parser.add_argument(
        "--frontend",
        metavar="DIR",
        default=None,
        help="serve a built Scope frontend (its dist folder) at /; our status page is at /status",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="default INFO",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="log one JSON object per line (time, level, logger, message, connection_id, "
        "session_id, exception) instead of text",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow this origin cross-origin (repeatable; '*' for any); off by default",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        default=None,
        help="allow binding a non-loopback address (the API has no authentication)",
    )
    return parser


def serve_main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """``scope-trio serve``: parse, check, serve until SIGINT/SIGTERM; the exit status."""
    import trio  # noqa: PLC0415 - keeps `scope-trio --help` light

    from scope_trio.cloud.manager import CloudSettings  # noqa: PLC0415
    from scope_trio.config import load_config, to_toml  # noqa: PLC0415
    from scope_trio.ops import logs  # noqa: PLC0415
    from scope_trio.server import is_loopback, serve  # noqa: PLC0415

    args = _parser().parse_args(list(argv))
    env = os.environ if environ is None else environ
    try:
        config = load_config(args.config).with_env(env)
        cloud = CloudSettings(
            app_id=args.cloud_app_id or config.cloud.app_id,
            api_key=args.cloud_api_key or config.cloud.api_key,
            ws_url=args.cloud_ws_url or config.cloud.ws_url,
        )
        config = config.with_overrides(
            host=args.host,
            port=args.port,
            allow_remote=args.allow_remote,
            cloud=cloud,
            debug_endpoints=args.debug_endpoints,
            cors_origins=tuple(args.cors_origin) or None,
            devcloud_pipeline=args.devcloud_pipeline,
            log_level=args.log_level,
            frontend=args.frontend,
            log_json=args.log_json,
        )
    except ValueError as exc:  # ConfigError, or a CloudSettings value
        print(f"scope-trio serve: bad setting: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    if not is_loopback(config.host) and not config.allow_remote:
        print(
            f"scope-trio serve: refusing to bind {config.host!r}: it is not a loopback address "
            "and the API has no authentication. Pass --allow-remote to do it anyway.",
            file=sys.stderr,
        )
        return EXIT_USAGE

    # Text or JSON; either way the api key is redacted from all of each line (exception
    # text and extra fields included), and every line carries its connection/session ids.
    logs.configure(config.log_level, json_lines=config.log_json, secrets=[cloud.api_key])
    log = logging.getLogger("scope_trio.cli")
    if not is_loopback(config.host):
        log.warning(
            "binding %s: the API (no authentication) is reachable from other machines",
            config.host,
        )

    async def run() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signals() -> None:
                    async for signum in signals:
                        if stop.is_set():
                            log.warning("second signal: stopping now")
                            nursery.cancel_scope.cancel()
                            return
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        stop.set()
                        nursery.cancel_scope.deadline = (
                            trio.current_time() + config.shutdown_timeout + FORCED_EXIT_GRACE
                        )

                async def run_server(*, task_status: trio.TaskStatus[str]) -> None:
                    await serve(config, shutdown_trigger=stop.wait, task_status=task_status)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(on_signals)
                url = await nursery.start(run_server)
                if config.embedded_cloud:
                    print(
                        "scope-trio: no cloud configured (SCOPE_CLOUD_APP_ID / "
                        "SCOPE_CLOUD_WS_URL), using the embedded dev cloud; open "
                        f"{url} in your browser",
                        flush=True,
                    )
                else:
                    print(f"scope-trio: serving on {url}; open it in your browser", flush=True)

    try:
        trio.run(run)
    except Exception as exc:
        error = _find_os_error(exc)
        if error is None:
            raise
        print(f"scope-trio serve: cannot serve: {error}", file=sys.stderr)
        return 1
    return 0


def _find_os_error(exc: BaseException) -> OSError | None:
    """The OSError (a port in use, a bad address) in ``exc`` or its exception group."""
    if isinstance(exc, OSError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find_os_error(inner)
        if found is not None:
            return found
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
