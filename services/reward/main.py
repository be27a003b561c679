"""`rlhf serve reward`: the reward service on the shared server runtime."""
from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    from services.common.config import ServerConfig
    from services.common.server import run
    from services.reward.server import RewardServicer, RewardSettings

    cfg = ServerConfig.from_args(args)
    # The HTTP endpoint binds the same host and checks the same bearer token as gRPC.
    return run(cfg, RewardServicer(RewardSettings.from_args(args, auth_token=cfg.auth_token)))
