"""`rlhf serve policy`: build the engine from the flags and hand it to the shared runtime."""
from __future__ import annotations

import argparse

from services.common.config import ServerConfig
from services.common.malloc import reuse_large_buffers
from services.common.server import run
from services.policy.engine import EngineConfig, PolicyEngine
from services.policy.server import PolicyServicer


def main(args: argparse.Namespace) -> int:
    reuse_large_buffers()  # weight pushes arrive as a stream of 1 MiB buffers
    engine = PolicyEngine(EngineConfig(
        model=args.model, served_model_name=args.served_model_name, max_model_len=args.max_model_len,
        dtype=args.dtype, seed=args.seed, max_num_seqs=args.max_num_seqs, kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager, max_n=args.max_n, max_prompts=args.max_prompts,
        max_push_bytes=args.max_push_bytes, staging_dir=args.staging_dir,
    ))
    return run(ServerConfig.from_args(args), PolicyServicer(engine))
