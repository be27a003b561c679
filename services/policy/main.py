"""`rlhf serve policy`: build the engine from the flags and hand it to the shared runtime."""
from __future__ import annotations

import argparse

from services.common.config import ServerConfig
from services.common.malloc import reuse_large_buffers
from services.common.server import run
from services.policy.engine import EngineConfig, PolicyEngine
from services.policy.server import PolicyServicer


def main(args: argparse.Namespace) -> int:
    from services.policy.options import engine_args  # imports vLLM: in the policy process only

    vllm_args = engine_args(getattr(args, "engine_argv", []), args.model)  # a bad vLLM flag exits 2, before loading
    reuse_large_buffers()  # weight pushes arrive as a stream of 1 MiB buffers
    engine = PolicyEngine(EngineConfig(
        model=args.model, engine_args=vllm_args, kv_cache_gib=args.kv_cache_gib, max_n=args.max_n,
        max_prompts=args.max_prompts, max_text_bytes=args.max_text_bytes, max_push_bytes=args.max_push_bytes,
        staging_dir=args.staging_dir,
    ))
    return run(ServerConfig.from_args(args), PolicyServicer(engine, push_idle_timeout_s=args.push_idle_timeout_s))
