"""`rlhf serve policy`'s vLLM engine arguments, from vLLM's own definitions
(AsyncEngineArgs.add_cli_args), not copies of them.

The `rlhf` parser declares only our flags and keeps every other one in
`args.engine_argv`; this module parses those in the policy process. It imports vLLM
(seconds), which `rlhf --help` and the clients must never need.
"""
from __future__ import annotations

# Our defaults where they differ from vLLM's (as `rlhf serve policy` had them before).
DEFAULTS = dict(gpu_memory_utilization=0.85, max_num_seqs=256)
# vLLM arguments the engine sets itself: the weight loader is what pushes rely on.
ENGINE_SET = {"worker_extension_cls": "--worker-extension-cls"}


def engine_parser():
    """vLLM's parser of its engine arguments, with our defaults."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="rlhf serve policy", description="vLLM engine arguments, accepted by "
                                    "`rlhf serve policy` next to its own flags (see `rlhf serve policy --help`)")
    AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(**DEFAULTS)
    return parser


def engine_args(argv: list[str], model: str):
    """vLLM's AsyncEngineArgs for `model` (rlhf's own --model) from the vLLM flags of a
    `serve policy` command line. A flag vLLM does not know, or a bad value, exits 2 with
    vLLM's message before anything loads."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = engine_parser()
    namespace = parser.parse_args(argv)
    for dest, flag in ENGINE_SET.items():
        if getattr(namespace, dest) != parser.get_default(dest):
            parser.error(f"{flag} is set by rlhf serve policy itself (its weight loader)")
    namespace.model = model
    return AsyncEngineArgs.from_cli_args(namespace)

