"""`rlhf serve feedback` (the page and the API over the store and the sampler) and the operator's
commands on the database: `rlhf feedback migrate | add-labeller | labellers | disable | enable | export`.

The schema is migrated when the server starts (Alembic, `upgrade head`: a no-op when it is current;
on PostgreSQL replicas starting together wait for one another), unless --no-migrate: then a
database behind the release's schema stops the server with exit code 2, for operators who migrate
as a step of their own (`rlhf feedback migrate`).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys

log = logging.getLogger(__name__)

DB_ENV = "RLHF_FEEDBACK_DB"
DEFAULT_DB = "sqlite:///feedback.db"
STATS_EVERY_S = 15.0


def db_url(args: argparse.Namespace) -> str:
    """--db, else $RLHF_FEEDBACK_DB (a Kubernetes Secret holding a PostgreSQL URL), else a SQLite file."""
    return args.db or os.environ.get(DB_ENV) or DEFAULT_DB


def settings_from(args: argparse.Namespace):
    from services.common.config import read_token
    from services.feedback.server import Settings

    for flag, value, low in (("--overlap", args.overlap, 0.0), ("--rate-limit", args.rate_limit, 1e-9)):
        if not low <= value <= (1.0 if flag == "--overlap" else float("inf")):
            raise ValueError(f"{flag} is out of range: {value}")
    for flag in ("rate_burst", "login_attempts", "max_concurrency", "drift_window", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return Settings(host=args.host, port=args.port, admin_token=read_token(args.auth_token_file),
                    tls_cert=args.tls_cert, tls_key=args.tls_key, cookie_secure=args.cookie_secure or bool(args.tls_cert),
                    max_body_bytes=args.max_body_bytes, rate_limit=args.rate_limit, rate_burst=args.rate_burst,
                    login_attempts=args.login_attempts, max_concurrency=args.max_concurrency, overlap=args.overlap,
                    repeat_version_lag=args.repeat_version_lag, drift_window=args.drift_window,
                    session_hours=args.session_hours)


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    from aiohttp import web

    from services.common.config import ClientConfig
    from services.common.server import BUILD_INFO, _version, serve_metrics
    from services.feedback.sampler import Sampler, Sampling, load_prompts
    from services.feedback.server import FeedbackApp
    from services.feedback.store import Store
    from services.policy.client import AsyncPolicyClient
    from services.reward.client import AsyncRewardClient
    import grpc
    import platform

    settings = settings_from(args)
    store = Store(db_url(args), session_hours=args.session_hours)
    if args.no_migrate:
        store.check_schema()
    else:
        log.info("database schema at revision %s", store.migrate())
    prompts = load_prompts(args.prompts, args.prompt_key)
    client_config = ClientConfig.from_args(args)
    policy = AsyncPolicyClient(args.policy, client_config, timeout=args.rpc_timeout_s)
    reward = AsyncRewardClient(args.reward, client_config, timeout=args.rpc_timeout_s) if args.reward else None
    sampler = Sampler(prompts, policy, reward, Sampling(args.temperature, args.top_p, args.max_tokens), args.seed)
    front = FeedbackApp(store, sampler, settings)

    BUILD_INFO.labels("feedback", _version(), platform.python_version(), grpc.__version__).set(1)
    if args.metrics_port:
        serve_metrics(args.host, args.metrics_port)
    runner = web.AppRunner(front.app(), access_log=None, shutdown_timeout=args.grace_seconds)
    await runner.setup()
    ssl_context = None
    if settings.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.tls_cert, settings.tls_key)
    await web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context).start()
    ticker = asyncio.ensure_future(front.refresh_forever(STATS_EVERY_S))
    log.info("feedback service on %s://%s:%d (database %s, %d prompts, policy %s, reward %s, metrics %s)",
             "https" if ssl_context else "http", settings.host, settings.port, store.engine.url.render_as_string(
                 hide_password=True), len(prompts), args.policy, args.reward or "off", args.metrics_port or "off")

    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    # Drain: /readyz fails first so the Service stops sending; requests in flight get the grace period.
    front.draining = True
    log.info("draining (linger %.1f s, grace %.0f s)", args.drain_linger_s, args.grace_seconds)
    if args.drain_linger_s > 0:
        await asyncio.sleep(args.drain_linger_s)
    ticker.cancel()
    await runner.cleanup()
    await policy.close()
    if reward is not None:
        await reward.close()
    store.close()
    log.info("feedback service stopped")
    return 0


def main(args: argparse.Namespace) -> int:
    from services.common.errors import ServiceError

    try:
        return asyncio.run(serve(args))
    except (ServiceError, ValueError) as exc:
        print(f"rlhf serve feedback: error: {exc}", file=sys.stderr)
        return 2


def admin(args: argparse.Namespace) -> int:
    """`rlhf feedback COMMAND`: the operator's commands on the database."""
    from services.common.errors import ServiceError
    from services.feedback.store import Store, write_jsonl

    store = Store(db_url(args))
    try:
        if args.feedback_command == "migrate":
            print(f"schema at revision {store.migrate()}")
            return 0
        store.check_schema()
        if args.feedback_command == "add-labeller":
            token = store.rotate_token(args.name) if args.rotate else store.add_labeller(args.name)
            # The token alone on stdout (for a script or a Secret); the words on stderr.
            print(f"{'new token' if args.rotate else 'labeller'} {args.name!r}: give them this token; it is not "
                  f"stored and cannot be shown again", file=sys.stderr)
            print(token)
        elif args.feedback_command in ("disable", "enable"):
            store.set_active(args.name, args.feedback_command == "enable")
            print(f"labeller {args.name!r} {args.feedback_command}d")
        elif args.feedback_command == "labellers":
            for name, active, judged in store.labellers():
                print(f"{name}\t{'active' if active else 'disabled'}\t{judged} judgments")
        elif args.feedback_command == "export":
            rows = store.export_rows(since_id=args.since_id, min_policy_version=args.min_policy_version)
            write_jsonl(rows, args.out)
            agreement = store.agreement()
            print(f"{len(rows)} preference rows to {args.out}; labellers agree on "
                  f"{'-' if agreement.rate is None else f'{agreement.rate:.2f}'} of {agreement.compared} "
                  f"comparisons of pairs judged twice")
        return 0
    except ServiceError as exc:
        print(f"rlhf feedback {args.feedback_command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
