"""The `cheapest` command: serve, model, accounts, retention, store.

`main()` reads the configuration once (`load_settings()`) and hands it to the command it runs: every command
is `func(args, settings)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cheapest.config import ConfigError, Settings, load_settings
from cheapest.vocabulary import AccountStatus


def _open_store(settings: Settings):
    from cheapest.store import open_configured_store
    from cheapest.store.secrets import load_pepper

    store = open_configured_store(settings.store)
    return store, load_pepper(settings.data_path, settings.store.key_pepper)


DEV_EMAIL = "dev@localhost"
# Granian's access log, when enabled: request metadata only. Pinned here rather than left to Granian's default
# so it can never grow a query string (%(query_string)s) or a header; bodies are never available to it.
ACCESS_LOG_FORMAT = '[%(time)s] %(addr)s - "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).3f'


def init_dev_account(settings: Settings) -> dict[str, str] | None:
    """On first start only: a local development account and one inference key, returned for printing once."""
    from cheapest.store import accounts

    store, pepper = _open_store(settings)
    try:
        if store.find_account_by_email(DEV_EMAIL) is not None:
            return None
        account, mk = accounts.create_account(store, DEV_EMAIL, settings.billing.default_plan, pepper)
        _, sk = accounts.create_key(store, account.id, "sk", "development key", pepper)
        return {"account_id": account.id, "management_key": mk, "api_key": sk}
    finally:
        store.close()  # the server's workers open their own environment after fork


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from functools import partial

    import msgspec
    from granian.constants import Interfaces

    from cheapest.metrics.exposition import open_for_server
    from cheapest.server import load_app
    from cheapest.server.state import operator_log
    from cheapest.server.supervisor import SupervisedServer

    overrides = {k: v for k in ("host", "port", "workers") if (v := getattr(args, k)) is not None}
    serving = msgspec.structs.replace(settings.serving, **overrides)
    settings = msgspec.structs.replace(settings, serving=serving)
    if args.init_dev_account:
        created = init_dev_account(settings)
        if created is not None:
            print("Created a local development account (these keys are shown once):")
            print(f"  account:          {created['account_id']}")
            print(f"  management key:   {created['management_key']}")
            print(f"  OPENAI_API_KEY=   {created['api_key']}")
            print(f"  OPENAI_BASE_URL=  http://{serving.host}:{serving.port}/v1", flush=True)
    operator_log()
    server = SupervisedServer(  # a crashed worker is replaced, a crash loop backs off; the others keep serving
        "cheapest.server:app",
        address=serving.host,
        port=serving.port,
        workers=serving.workers,
        interface=Interfaces.ASGI if args.interface == "asgi" else Interfaces.RSGI,
        log_access=args.access_log,
        log_access_format=ACCESS_LOG_FORMAT,
        respawn_failed_workers=True,  # a crashed worker is replaced (and counted: cheapest_worker_restarts_total)
    )
    close_metrics = open_for_server(settings)
    try:
        # Each worker builds its app from these settings (read here, once), not from the environment again.
        server.serve(target_loader=partial(load_app, settings))
    finally:
        if close_metrics is not None:
            close_metrics()
    return 0


def _accounts_create(args: argparse.Namespace, settings: Settings) -> int:
    from cheapest.store import StoreError, accounts

    store, pepper = _open_store(settings)
    try:
        plan = args.plan or settings.billing.default_plan
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


def _account_summary(store, account) -> dict[str, Any]:
    import msgspec

    out = msgspec.to_builtins(account)
    out["credit_balance_micro"] = store.ledger.balance(account.id)  # the ledger owns the balance
    return out


def _accounts_list(args: argparse.Namespace, settings: Settings) -> int:
    import json as _json

    store, _ = _open_store(settings)
    try:
        rows = [_account_summary(store, a) for a in store.list_accounts()]
    finally:
        store.close()
    if args.json:
        print(_json.dumps(rows))
    else:
        for a in rows:
            print(f"{a['id']}\t{a['email']}\t{a['plan']}\t{a['status']}\tsubscription={a['subscription_status']}"
                  f"\tcredit={int(a['credit_balance_micro']) / 1e6:.6f} USD")
    return 0


def _with_account(args: argparse.Namespace, settings: Settings, action) -> int:
    """Open the store, find the account by id or email, run `action(settings, store, pepper, account)`."""
    from cheapest.store import accounts

    store, pepper = _open_store(settings)
    try:
        account = accounts.find_account(store, args.account)
        if account is None:
            print("error: no such account", file=sys.stderr)
            return 1
        return int(action(settings, store, pepper, account) or 0)
    finally:
        store.close()


def _accounts_show(args: argparse.Namespace, settings: Settings) -> int:
    import msgspec

    def show(settings, store, pepper, account):
        out = _account_summary(store, account)
        sub = store.ledger.subscription(account.id)
        out["subscription"] = None if sub is None else msgspec.to_builtins(sub)
        out["subscriptions"] = [msgspec.to_builtins(s) for s in store.ledger.subscriptions(account.id)]
        out["keys"] = [_key_summary(k) for k in _every_key(store, account.id)]
        if args.json:
            print(json.dumps(out))
        else:
            for name in ("id", "email", "plan", "status", "subscription_status", "period_end",
                         "credit_balance_micro"):
                print(f"{name}: {out[name]}")
            for k in out["keys"]:
                print(f"key {k['id']} {k['kind']} {k['hint']} name={k['name']!r} disabled={k['disabled']}")
        return 0

    return _with_account(args, settings, show)


def _key_summary(k: Any) -> dict[str, Any]:
    """A key's metadata for printing: never its hash."""
    import msgspec

    return {"id": k.id, "kind": k.kind, "name": k.name, "hint": k.hint, "disabled": k.disabled,
            "created_at": k.created_at, "expires_at": k.expires_at, "limits": msgspec.to_builtins(k.limits)}


def _every_key(store, account_id: str, kind: Any = None):
    """The account's keys, read from the store a page at a time."""
    after = None
    while page := store.list_keys(account_id, after=after, limit=1000, kind=kind):
        yield from page
        after = page[-1].id


def _accounts_keys(args: argparse.Namespace, settings: Settings) -> int:
    def act(settings, store, pepper, account):
        keys = [_key_summary(k) for k in _every_key(store, account.id, args.kind)]
        if args.json:
            print(json.dumps(keys))
        else:
            for k in keys:
                print(f"{k['id']}\t{k['kind']}\t{k['hint']}\tname={k['name']!r}\tdisabled={k['disabled']}")
        return 0

    return _with_account(args, settings, act)


def _accounts_revoke_key(args: argparse.Namespace, settings: Settings) -> int:
    from cheapest.store import LastManagementKey, accounts

    def act(settings, store, pepper, account):
        key = store.get_key(args.key_id)
        if key is None or key.account_id != account.id:
            print("error: the account has no such key", file=sys.stderr)
            return 1
        replacement = None
        if args.replace:  # the replacement first: the account is never without a key of this kind
            replacement = accounts.create_key(store, account.id, key.kind, key.name, pepper, limits=key.limits,
                                              expires_at=key.expires_at, models=key.models)
        try:
            store.delete_key(key.id, keep_last_management=True)
        except LastManagementKey:
            print("error: this is the account's only management key; revoke it with --replace to issue a new "
                  "one in the same step", file=sys.stderr)
            return 1
        out: dict[str, Any] = {"account_id": account.id, "revoked": key.id}
        if replacement is not None:
            out.update(key_id=replacement[0].id, key=replacement[1])
        if args.json:
            print(json.dumps(out))
        else:
            print(f"revoked {key.id}" + (f"; replacement {out['key_id']} (shown once): {out['key']}"
                                           if replacement is not None else ""))
        return 0

    return _with_account(args, settings, act)


def _accounts_set_status(status: AccountStatus):
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from cheapest.store import accounts

        def act(settings, store, pepper, account):
            if account.status == "deleted":
                print("error: the account is deleted", file=sys.stderr)
                return 1
            accounts.set_status(store, account.id, status)
            print(f"account {account.id} {status}")
            return 0

        return _with_account(args, settings, act)

    return run


def _accounts_grant_credit(args: argparse.Namespace, settings: Settings) -> int:
    import secrets

    from cheapest.store import accounts
    from cheapest.vocabulary import usd_to_micro

    try:
        micro = usd_to_micro(args.usd)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if micro <= 0:
        print("error: the amount must be positive", file=sys.stderr)
        return 2
    ref = "grant:" + (args.ref or secrets.token_hex(8))

    def act(settings, store, pepper, account):
        applied = accounts.grant_credit(store, account.id, micro, ref)
        balance = store.ledger.balance(account.id)
        if args.json:
            print(json.dumps({"account_id": account.id, "ref": ref, "applied": applied, "balance_micro": balance}))
        else:
            print(f"{'granted' if applied else 'already granted (same --ref), nothing changed'}: "
                  f"balance {balance / 1e6:.6f} USD")
        return 0

    return _with_account(args, settings, act)


def _accounts_set_plan(args: argparse.Namespace, settings: Settings) -> int:
    from cheapest.store import accounts

    def act(settings, store, pepper, account):
        if args.plan not in settings.plans:
            print(f"unknown plan; configured plans: {', '.join(sorted(settings.plans))}", file=sys.stderr)
            return 2
        accounts.set_plan(store, account.id, args.plan)
        print(f"account {account.id} plan {args.plan}")
        return 0

    return _with_account(args, settings, act)


def _accounts_new_key(args: argparse.Namespace, settings: Settings) -> int:
    from cheapest.store import accounts

    def act(settings, store, pepper, account):
        record, secret = accounts.create_key(store, account.id, args.kind, args.name, pepper)
        if args.json:
            print(json.dumps({"account_id": account.id, "key_id": record.id, "key": secret}))
        else:
            print(f"key {record.id} ({args.kind}, shown once): {secret}")
        return 0

    return _with_account(args, settings, act)


def _retention_run(args: argparse.Namespace, settings: Settings) -> int:
    import time

    import msgspec

    from cheapest.privacy.retention import run_locked

    store, _ = _open_store(settings)
    try:  # waits for a server worker that is running the job right now, then runs regardless of the interval
        report = run_locked(store, settings.data_path, time.time() if args.now is None else args.now)
    finally:
        store.close()
    assert report is not None
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        print(f"usage rows rolled up into daily aggregates: {report.usage_rows_rolled_up} "
              f"(hours before {report.usage_cutoff}); deleted accounts purged: {report.accounts_purged}")
    return 0


def _store_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Copy an LMDB data directory's store into the configured PostgreSQL store (idempotent)."""
    from pathlib import Path

    import msgspec

    from cheapest.store import open_configured_store
    from cheapest.store.lmdb import LmdbStore
    from cheapest.store.postgres import PostgresStore
    from cheapest.store.postgres.from_lmdb import check_pepper, copy_from_lmdb
    from cheapest.store.secrets import load_pepper

    source = Path(args.source).expanduser()
    if not settings.store.store_url:
        print("error: set store_url (CHEAPEST_STORE_URL) to the PostgreSQL store to copy into", file=sys.stderr)
        return 2
    if not (source / "store" / "data.mdb").exists():
        print(f"error: no LMDB store in {source} (expected {source / 'store' / 'data.mdb'})", file=sys.stderr)
        return 2
    problem = check_pepper(source, load_pepper(settings.data_path, settings.store.key_pepper))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    src = LmdbStore(source / "store", map_size=settings.store.lmdb_map_size)
    dst = open_configured_store(settings.store)
    try:
        assert isinstance(dst, PostgresStore)
        report = copy_from_lmdb(src, dst)
    finally:
        dst.close()
        src.close()
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        for table, n in report.read.items():
            print(f"{table}: {n} read, {report.copied[table]} copied")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cheapest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API with Granian")
    serve.add_argument("--host", default=None, help="default: the configured `host` (127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="default: the configured `port` (8000)")
    serve.add_argument("--workers", type=int, default=None, help="default: the configured `workers` (1)")
    serve.add_argument("--interface", choices=("rsgi", "asgi"), default="rsgi")
    serve.add_argument("--access-log", action="store_true",
                       help="Granian's access log: method, path, status, latency (never query strings or bodies)")
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
    show = acc_sub.add_parser("show", help="an account: plan, subscription, credit balance, keys (never secrets)")
    show.add_argument("account", help="account id or email")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_accounts_show)
    switches: tuple[tuple[str, AccountStatus, str], ...] = (
        ("disable", "disabled", "refuse all of the account's keys (403) at once"), ("enable", "active", "undo disable"))
    for name, status, text in switches:
        p = acc_sub.add_parser(name, help=text)
        p.add_argument("account", help="account id or email")
        p.set_defaults(func=_accounts_set_status(status))
    grant = acc_sub.add_parser("grant-credit", help="add credit (USD) to the account's balance, once per --ref")
    grant.add_argument("account", help="account id or email")
    grant.add_argument("--usd", required=True, help="amount in dollars, up to 6 decimals")
    grant.add_argument("--ref", default=None, help="idempotency reference: a second grant with it does nothing")
    grant.add_argument("--json", action="store_true")
    grant.set_defaults(func=_accounts_grant_credit)
    setplan = acc_sub.add_parser("set-plan", help="assign a plan by hand (no Stripe subscription needed)")
    setplan.add_argument("account", help="account id or email")
    setplan.add_argument("plan")
    setplan.set_defaults(func=_accounts_set_plan)
    newkey = acc_sub.add_parser("new-key", help="a new key for the account (e.g. a lost management key), shown once")
    newkey.add_argument("account", help="account id or email")
    newkey.add_argument("--kind", choices=("mk", "sk"), default="mk")
    newkey.add_argument("--name", default="operator-issued key")
    newkey.add_argument("--json", action="store_true")
    newkey.set_defaults(func=_accounts_new_key)
    keys = acc_sub.add_parser("keys", help="the account's keys: metadata only, never secrets")
    keys.add_argument("account", help="account id or email")
    keys.add_argument("--kind", choices=("mk", "sk"), default=None)
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(func=_accounts_keys)
    revoke = acc_sub.add_parser("revoke-key", help="revoke a key (the last management key only with --replace)")
    revoke.add_argument("account", help="account id or email")
    revoke.add_argument("key_id")
    revoke.add_argument("--replace", action="store_true",
                        help="issue a replacement of the same kind first and print it once (e.g. a leaked mk_ key)")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=_accounts_revoke_key)

    ret = sub.add_parser("retention", help="data retention: anonymize old usage, purge deleted accounts")
    ret_sub = ret.add_subparsers(dest="retention_command", required=True)
    run = ret_sub.add_parser("run", help="one pass now (the server also runs it every retention_interval)")
    run.add_argument("--now", type=float, default=None, help=argparse.SUPPRESS)  # tests drive the clock
    run.add_argument("--json", action="store_true")
    run.set_defaults(func=_retention_run)

    st = sub.add_parser("store", help="the store: copy one host's LMDB store into PostgreSQL")
    st_sub = st.add_subparsers(dest="store_command", required=True)
    mig = st_sub.add_parser("migrate", help="copy an LMDB data directory into the configured store_url "
                                            "(idempotent: a second run copies nothing again)")
    mig.add_argument("--from", dest="source", required=True, help="the old host's data directory")
    mig.add_argument("--json", action="store_true")
    mig.set_defaults(func=_store_migrate)

    try:  # `model pull` / `model convert` live with the model-supply code
        from cheapest.convert import commands as model_commands
    except ImportError:
        pass
    else:
        model_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cheapest.privacy.hardening import owner_only_files

    owner_only_files()  # the store, secrets, models and locks any command creates are the owner's alone
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"cheapest: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
