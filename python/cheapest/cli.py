"""The `cheapest` command: serve, model, accounts, retention."""

from __future__ import annotations

import argparse
import os
import sys


def _serve(args: argparse.Namespace) -> int:
    from granian.constants import Interfaces
    from granian.server import Server

    server = Server(
        "cheapest.server:app",
        address=args.host,
        port=args.port,
        workers=args.workers,
        interface=Interfaces.RSGI,
        log_access=False,
    )
    server.serve()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cheapest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API with Granian")
    serve.add_argument("--host", default=os.environ.get("CHEAPEST_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("CHEAPEST_PORT", "8000")))
    serve.add_argument("--workers", type=int, default=int(os.environ.get("CHEAPEST_WORKERS", "1")))
    serve.add_argument("--init-dev-account", action="store_true",
                       help="create a local development account on first start and print its keys once")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
