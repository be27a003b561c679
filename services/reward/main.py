"""`rlhf serve reward`: the core, its gRPC servicer and the OpenRLHF HTTP endpoint, wired together
on the shared server runtime. The two front ends know only the core, never each other."""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


class Service:
    """What the runtime serves: the gRPC servicer, with the core's lifecycle and the HTTP port around it."""

    def __init__(self, scorer, http_settings=None, admin_token: str | None = None):
        from services.reward.server import SERVICE_NAME, RewardServicer

        self.service_name = SERVICE_NAME
        self.scorer, self.http_settings = scorer, http_settings
        self.servicer = RewardServicer(scorer)
        # Swapping the reward model changes what every trainer optimises: with an admin token, the
        # scoring token (which every client holds) cannot (the runtime's interceptor checks it).
        self.admin_token, self.admin_methods = admin_token, (f"{SERVICE_NAME}/LoadModel",)
        self._http = None

    def add_to_server(self, server) -> None:
        self.servicer.add_to_server(server)

    async def start(self) -> None:
        from services.reward.http import start_http

        await self.scorer.start()
        if self.http_settings is not None:  # after the model: the port answers only once it can score
            self._http = await start_http(self.scorer, self.http_settings)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        await self.scorer.stop()


def main(args: argparse.Namespace) -> int:
    from services.common.config import ServerConfig
    from services.common.server import run
    from services.reward.http import HttpSettings
    from services.reward.rules import ConfigError, load_functions
    from services.reward.scorer import RewardSettings, Scorer

    from services.common.config import read_token

    cfg = ServerConfig.from_args(args)
    try:
        # Imported now: a function that cannot load stops the server before it binds a port.
        scorer = Scorer(RewardSettings.from_args(args, load_functions(args.reward_function)))
        if args.http_max_concurrency < 1:
            raise ConfigError(f"--http-max-concurrency must be >= 1, got {args.http_max_concurrency}")
        admin_token = read_token(args.admin_token_file) if args.admin_token_file else None
        if args.admin_token_file and not admin_token:
            raise ConfigError(f"--admin-token-file {args.admin_token_file} is empty")
    except (ConfigError, OSError) as exc:
        print(f"rlhf serve reward: error: {exc}", file=sys.stderr)
        return 2
    if args.model_root and not admin_token:
        log.info("LoadModel takes the same bearer token as scoring%s; --admin-token-file gives it a token of its own",
                 "" if cfg.auth_token else " (auth is off: anyone who reaches the port may swap the model)")
    http = None
    if args.http_port:
        if args.http_no_auth:
            log.warning("--http-no-auth: POST /get_reward on port %d answers ANYONE who can reach it, without a "
                        "bearer token%s. Guard that port with a NetworkPolicy that admits only the trainers.",
                        args.http_port, " (the gRPC port still requires one)" if cfg.auth_token else "")
        http = HttpSettings(port=args.http_port, host=cfg.host, input=args.http_input,
                            auth_token=None if args.http_no_auth else cfg.auth_token,
                            max_body_bytes=cfg.max_message_bytes, max_concurrency=args.http_max_concurrency,
                            tls_cert=cfg.tls_cert, tls_key=cfg.tls_key)
    return run(cfg, Service(scorer, http, admin_token))
