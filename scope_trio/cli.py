"""``scope-trio``: the command line (also ``python -m scope_trio``).

Subcommands:

* ``devcloud`` runs the local stand-in for the cloud GPU runner (see :mod:`scope_trio.devcloud`).
* ``serve`` will run the drop-in HTTP server; until it lands it says so plainly and exits 2,
  rather than pretending.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: scope-trio {devcloud,serve} [options]

  devcloud   run the local dev cloud (a stand-in for the cloud GPU runner)
  serve      run the HTTP server (not built yet)
"""

SERVE_NOT_BUILT = (
    "scope-trio serve: the drop-in HTTP server is not built yet (it is the next milestone). "
    "What runs today: the reconnect supervisor, the real aiortc media session and the dev "
    "cloud -- try `scope-trio devcloud --port 8002`, and the tests."
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "devcloud":
        from scope_trio.devcloud import main as devcloud_main  # noqa: PLC0415 - keeps startup light

        return devcloud_main(rest)
    if command == "serve":
        print(SERVE_NOT_BUILT, file=sys.stderr)
        return 2
    print(f"scope-trio: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
