"""The `cheapest` command: serve, model, accounts, retention."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _settings(args: argparse.Namespace | None = None):  # type: ignore[no-untyped-def]
    from cheapest.config import get_settings

    return get_settings()


def _open_store():  # type: ignore[no-untyped-def]
    from cheapest.store import open_store
    from cheapest.store.secrets import load_pepper

    s = _settings()
    return s, open_store(s.data_path, s.lmdb_map_size), load_pepper(s.data_path, s.key_pepper)


DEV_EMAIL = "dev@localhost"


def init_dev_account() -> dict[str, str] | None:
    """On first start only: a local development account and one inference key, returned for printing once."""
    from cheapest.store import accounts

    settings, store, pepper = _open_store()
    try:
        if store.find_account_by_email(DEV_EMAIL) is not None:
            return None
        account, mk = accounts.create_account(store, DEV_EMAIL, settings.default_plan, pepper)
        _, sk = accounts.create_key(store, account.id, "sk", "development key", pepper)
        return {"account_id": account.id, "management_key": mk, "api_key": sk}
    finally:
        store.close()  # the server's workers open their own environment after fork


def _serve(args: argparse.Namespace) -> int:
    from granian.constants import Interfaces
    from granian.server import Server

    if args.init_dev_account:
        created = init_dev_account()
        if created is not None:
            print("Created a local development account (these keys are shown once):")
            print(f"  account:          {created['account_id']}")
            print(f"  management key:   {created['management_key']}")
            print(f"  OPENAI_API_KEY=   {created['api_key']}")
            print(f"  OPENAI_BASE_URL=  http://{args.host}:{args.port}/v1", flush=True)
    server = Server(
        "cheapest.server:app",
        address=args.host,
        port=args.port,
        workers=args.workers,
        interface=Interfaces.ASGI if args.interface == "asgi" else Interfaces.RSGI,
        log_access=False,
    )
    server.serve()
    return 0


def _accounts_create(args: argparse.Namespace) -> int:
    from cheapest.store import StoreError, accounts

    settings, store, pepper = _open_store()
    try:
        plan = args.plan or settings.default_plan
        if plan not in settings.plans:
            print(f"unknown plan; configured plans: {', '.join(sorted(settings.plans))}", file=sys.stderr)
            return 2
        try:
            account, mk = accounts.create_account(store, args.email, plan, pepper)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    finally:
        store.close()
    if args.json:
        print(json.dumps({"account_id": account.id, "management_key": mk}))
    else:
        print(f"account {account.id} ({account.email}, plan {account.plan})")
        print(f"management key (shown once): {mk}")
    return 0


def _accounts_list(args: argparse.Namespace) -> int:
    import msgspec

    _, store, _ = _open_store()
    try:
        rows = list(store.list_accounts())
    finally:
        store.close()
    if args.json:
        print(msgspec.json.encode(rows).decode())
    else:
        for a in rows:
            print(f"{a.id}\t{a.email}\t{a.plan}\t{a.status}\tcredit={a.credit_micro / 1e6:.6f} USD")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cheapest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API with Granian")
    serve.add_argument("--host", default=os.environ.get("CHEAPEST_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("CHEAPEST_PORT", "8000")))
    serve.add_argument("--workers", type=int, default=int(os.environ.get("CHEAPEST_WORKERS", "1")))
    serve.add_argument("--interface", choices=("rsgi", "asgi"), default="rsgi")
    serve.add_argument("--init-dev-account", action="store_true",
                       help="create a local development account on first start and print its keys once")
    serve.set_defaults(func=_serve)

    acc = sub.add_parser("accounts", help="operator commands for accounts")
    acc_sub = acc.add_subparsers(dest="accounts_command", required=True)
    create = acc_sub.add_parser("create", help="create an account and print its management key once")
    create.add_argument("--email", required=True)
    create.add_argument("--plan", default=None, help="plan name from the configuration (default: default_plan)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=_accounts_create)
    lst = acc_sub.add_parser("list", help="list accounts")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_accounts_list)

    try:  # `model pull` / `model convert` live with the model-supply code
        from cheapest.inference import commands as model_commands
    except ImportError:
        model_commands = None  # type: ignore[assignment]
    if model_commands is not None:
        model_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
