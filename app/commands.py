"""``clipguard serve`` and ``clipguard keys``: the service side of the CLI (``clipguard remote`` is the
client's, in ``clipguard/remote_cli.py``).

The engine's CLI finds :func:`register` through the ``clipguard.commands`` entry point (pyproject.toml)
and never imports this module by name. Each command imports the web stack only when it runs, so an engine-only
install (no ``[service]`` extra) lists the commands and says what is missing.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from collections.abc import Callable


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the REST API and a worker on this machine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="API only (production: run `celery -A clipguard.worker.celery_app:celery_app worker -Q gpu` apart)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (uvicorn workers); one Python process uses at most one core, so about one "
        "per core for a busy API. Settings then come from the environment only.",
    )
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("keys", help="manage API keys")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys.add_parser("create", help="create an API key and print it (only the key) on stdout")
    k.add_argument("--tenant", required=True, help="tenant the key belongs to; tenants never see each other")
    k.set_defaults(func=cmd_keys_create)
    k = keys.add_parser(
        "revoke",
        help="revoke one key, or every key of a tenant (effective at once in new "
        "requests; running API processes may accept a key they know for up to "
        "CLIPGUARD_KEY_CACHE_TTL_S more seconds)",
    )
    which = k.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--key", help="the key as it was issued; '-' reads it from stdin (keeps it out of ps and the shell history)"
    )
    which.add_argument("--tenant", help="revoke every key of this tenant; its jobs and models stay")
    k.set_defaults(func=cmd_keys_revoke)


def _fail(message: str) -> int:
    print(f"clipguard: error: {message}", file=sys.stderr)
    return 1


def _service(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.startswith("clipguard"):
                raise
            return _fail(f"{exc.name} is not installed: the service needs pip install 'clipguard[service]'")

    return run


@_service
def cmd_serve(args: argparse.Namespace) -> int:
    """API in this process, plus (by default) one supervised Celery worker process consuming the ``gpu`` queue.

    The worker is restarted when it dies and dies with this process (``clipguard.app.supervise``); the HTTP
    protocol refuses a request head over ``max_header_bytes`` with 431 (``clipguard.app.server``).
    """
    import uvicorn
    from clipguard.app.main import create_app
    from clipguard.app.queues import worker_args
    from clipguard.app.server import BoundedHttpToolsProtocol
    from clipguard.app.settings import get_settings
    from clipguard.app.supervise import EmbeddedWorker

    if args.workers < 1:
        return _fail("--workers must be at least 1")
    settings = get_settings()
    worker = None
    if not args.no_worker:
        worker = EmbeddedWorker(
            settings.home,
            worker_args(f"embedded-{os.getpid()}@%h"),
        ).start()
    print(f"clipguard: serving on http://{args.host}:{args.port} (home {settings.home})", file=sys.stderr)
    bounded = {"http": BoundedHttpToolsProtocol, "h11_max_incomplete_event_size": settings.max_header_bytes}
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default action the
    # process would die before stopping the worker, so turn it into SystemExit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if args.workers > 1:  # uvicorn's worker processes each import the app by name and build their own
            from clipguard.app.migrate import upgrade

            upgrade(settings.database_url)  # once, here: workers starting together would race through it
            uvicorn.run(
                "clipguard.app.main:create_app",
                factory=True,
                workers=args.workers,
                host=args.host,
                port=args.port,
                log_level="info",
                **bounded,
            )
        else:
            uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info", **bounded)
    finally:
        if worker is not None:
            worker.stop()
    return 0


@_service
def cmd_keys_create(args: argparse.Namespace) -> int:
    from clipguard.app.auth import create_key
    from clipguard.app.db import make_sessionmaker
    from clipguard.app.settings import get_settings

    if not args.tenant.strip():
        return _fail("--tenant must not be empty")
    print(create_key(make_sessionmaker(get_settings().database_url), args.tenant))
    return 0


@_service
def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke through ``clipguard.app.auth``; exit 1 when nothing matched (a mistyped key or tenant)."""
    from clipguard.app.auth import revoke_key, revoke_tenant
    from clipguard.app.db import make_sessionmaker
    from clipguard.app.settings import get_settings

    sessions = make_sessionmaker(get_settings().database_url)
    if args.tenant is not None:
        count = revoke_tenant(sessions, args.tenant)
        if not count:
            return _fail(f"tenant {args.tenant!r} has no keys")
        print(f"clipguard: revoked {count} key(s) of tenant {args.tenant!r}", file=sys.stderr)
        return 0
    key = sys.stdin.readline().strip() if args.key == "-" else args.key.strip()
    if not key or not revoke_key(sessions, key):
        return _fail("no such key (already revoked, or never issued)")
    print("clipguard: revoked 1 key", file=sys.stderr)
    return 0
