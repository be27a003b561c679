"""`rlhf serve policy`: build the engine from the flags and hand it to the shared runtime."""
from __future__ import annotations

import argparse

from services.common.config import ClientConfig, ServerConfig, read_push_token, read_token
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
        staging_dir=args.staging_dir, stage_timeout_s=args.stage_timeout_s,
    ))
    server = ServerConfig.from_args(args)
    # Passing a push on to another replica: this replica's credentials, as the trainer's.
    relay = ClientConfig(auth_token=read_token(args.relay_auth_token_file) or server.auth_token,
                         tls_ca=args.relay_tls_ca or server.tls_ca, tls_cert=args.relay_tls_cert or server.tls_cert,
                         tls_key=args.relay_tls_key or server.tls_key)
    return run(server, PolicyServicer(engine, push_idle_timeout_s=args.push_idle_timeout_s,
                                      push_token=read_push_token(args.push_token_file), relay_config=relay))
