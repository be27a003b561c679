"""The `rlhf` command.

Every subcommand and flag is declared here, in one parser, so that docs, the
Kubernetes manifests and their tests can check against it. The work itself is
imported lazily: `rlhf --help` and the clients never import torch or vLLM.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from services.common.config import add_client_args, add_server_args


def _command(sub, name: str, target: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(target=target)
    return p


class _ServeParser(argparse.ArgumentParser):
    """A `serve` subcommand's parser. With `engine_passthrough`, flags it does not declare
    are kept in args.engine_argv instead of refused: `serve policy` hands them to vLLM's
    own parser in the policy process (importing vLLM here would slow every command)."""

    def __init__(self, *args, engine_passthrough: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine_passthrough = engine_passthrough

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if self.engine_passthrough:
            namespace.engine_argv, extra = extra, []
        return namespace, extra


class _VllmHelp(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="list vLLM's engine arguments (imports vLLM) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from services.policy.options import engine_parser

        engine_parser().print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # rlhf init-model
    p = _command(sub, "init-model", "services.demo.tiny_model:main",
                 "build a tiny model and its tokenizer locally (no network)")
    p.add_argument("--kind", choices=["policy", "reward"], required=True)
    p.add_argument("--out", required=True, help="output directory (Hugging Face layout)")
    p.add_argument("--tie-embeddings", action="store_true", help="share input embeddings and lm_head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama", help="architecture (default llama)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=2, help="attention heads; head_dim = hidden/heads must be >= 32 for vLLM CPU")
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--max-position", type=int, default=512, help="context length in tokens")

    # rlhf data demo
    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True, metavar="DATASET")
    p = _command(data, "demo", "services.demo.data:main", "write the demo data set (sft/prefs/prompts JSONL)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flip-rate", type=float, default=0.1, help="share of preference pairs with flipped labels (default 0.1)")
    p.add_argument("--num-sft", type=int, default=3000)
    p.add_argument("--num-prefs", type=int, default=3000)
    p.add_argument("--num-prompts", type=int, default=1000, help="PPO prompts (train + eval)")

    # rlhf train sft|rm|ppo
    train = sub.add_parser("train", help="training jobs").add_subparsers(dest="train_command", required=True, metavar="JOB")
    for name, target, help in [
        ("sft", "services.trainer.sft:main", "supervised fine-tuning on prompt/response JSONL"),
        ("rm", "services.reward.training:main", "reward model (Bradley-Terry) on prompt/chosen/rejected JSONL"),
    ]:
        p = _command(train, name, target, help)
        p.add_argument("--model", required=True, help="Hugging Face model directory to start from")
        p.add_argument("--data", required=True, help="JSONL file")
        p.add_argument("--out", required=True)
        p.add_argument("--epochs", type=float, default=None)
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--batch-size", type=int, default=None)
        p.add_argument("--max-length", type=int, default=None, help="tokens per example")
        p.add_argument("--eval-fraction", type=float, default=0.1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p = _command(train, "ppo", "services.trainer.loop:main", "online PPO against live policy and reward services")
    p.add_argument("--config", help="YAML file; the flags below override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (dotted, YAML value), e.g. --set ppo.beta=0.05")
    p.add_argument("--policy", action="append", dest="policy_addresses", metavar="HOST:PORT",
                   help="policy replica address; repeat for several, or dns:///name:port for every replica behind a name")
    p.add_argument("--reward", dest="reward_address", metavar="HOST:PORT", help="reward service address")
    p.add_argument("--sft-model", help="policy and reference start (SFT output)")
    p.add_argument("--reward-model", help="value model start (reward model directory)")
    p.add_argument("--prompts", help="prompts JSONL")
    p.add_argument("--out", help="run directory: checkpoints, metrics.jsonl, plots")
    p.add_argument("--steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add_client_args(p)
    add_server_args(p, port=50053, metrics_port=9103)

    # rlhf serve policy|reward
    serve = sub.add_parser("serve", help="run a service").add_subparsers(
        dest="service", required=True, metavar="SERVICE", parser_class=_ServeParser)
    help = "serve PolicyService on vLLM"
    p = serve.add_parser("policy", help=help, description=help, engine_passthrough=True, allow_abbrev=False,
                         epilog="Every vLLM engine argument is accepted as well, by vLLM's own parser (e.g. --dtype, "
                                "--max-model-len, --max-num-batched-tokens, --enable-prefix-caching, --quantization, "
                                "--tensor-parallel-size, --served-model-name); --help-vllm lists them. Defaults that "
                                "differ from vLLM's: --gpu-memory-utilization 0.85, --max-num-seqs 256.")
    p.set_defaults(target="services.policy.main:main")
    p.add_argument("--help-vllm", action=_VllmHelp)
    p.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--max-n", type=int, default=64, help="limit of SamplingParams.n")
    p.add_argument("--max-prompts", type=int, default=1024, help="limit of prompts per Generate")
    p.add_argument("--max-text-bytes", type=int, default=65536,
                   help="limit of one text prompt, or of all messages of one prompt, checked before tokenizing")
    p.add_argument("--max-push-bytes", type=int, default=64 << 30, help="limit of one UpdateWeights")
    p.add_argument("--push-idle-timeout-s", type=float, default=60.0,
                   help="drop an UpdateWeights stream that sends nothing for this long (default 60)")
    p.add_argument("--staging-dir", default=None,
                   help="where weight pushes are written as they arrive and kept while current; needs room for "
                        "two full pushes, may be shared by servers (default: the temp dir; /dev/shm is faster but "
                        "holds them in RAM)")
    add_server_args(p, port=50051, metrics_port=9101)

    p = _command(serve, "reward", "services.reward.main:main", "serve RewardService")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-length", type=int, default=None, help="tokens per pair (default: the model's)")
    p.add_argument("--max-pairs", type=int, default=256, help="limit of pairs per Score")
    p.add_argument("--max-text-bytes", type=int, default=65536, help="limit of one prompt or response")
    p.add_argument("--max-batch-size", type=int, default=64, help="pairs per forward pass")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, default=4096, help="pairs waiting; beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--http-port", type=int, default=0, help="OpenRLHF-compatible POST /get_reward (0 = off)")
    add_server_args(p, port=50052, metrics_port=9102)

    # rlhf demo
    p = _command(sub, "demo", "services.demo.pipeline:main", "the whole pipeline on the embedded tiny model (CPU, minutes)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="PPO steps (default from the demo config)")
    p.add_argument("--with-no-kl", action="store_true", help="also run PPO with beta = 0, to show what the KL leash prevents")
    p.add_argument("--quick", action="store_true", help="a shorter run (tests)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module, func = args.target.split(":")
    return getattr(importlib.import_module(module), func)(args) or 0


if __name__ == "__main__":
    sys.exit(main())
