"""The `rlhf` command.

Every subcommand and flag is declared here, in one parser, so that docs, the
Kubernetes manifests and their tests can check against it. The work itself is
imported lazily: `rlhf --help` and the clients never import torch or vLLM.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import sys

from services.common.config import add_client_args, add_server_args, load_yaml, read_config, shorten


def _command(sub, name: str, target: str, help: str, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, **kwargs)
    p.set_defaults(target=target)
    # Also after the subcommand (`rlhf serve policy ... --log-level debug`); SUPPRESS keeps the
    # top-level one when this one is not given.
    p.add_argument("--log-level", default=argparse.SUPPRESS, help="logging level (default INFO)")
    return p


def _add_serve_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config file")
    g.add_argument("--config", metavar="FILE", help="YAML mapping of this command's flags (key: the flag without --, "
                                                    "underscores or dashes), applied before the command line's")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more such key")


def expand_serve_config(argv: list[str]) -> list[str]:
    """`rlhf serve SERVICE --config FILE --set KEY=VALUE ...` as plain flags: each key becomes
    --key value (true: the bare flag, a list: the flag once per item), placed before the command
    line's own flags so that those win. Unknown keys then fail as unknown flags do (exit 2)."""
    if len(argv) < 2 or argv[0] != "serve" or not ({"--config", "--set"} & {a.split("=", 1)[0] for a in argv}):
        return argv
    import yaml

    values, rest, i = {}, [], 2
    while i < len(argv):
        arg, _, inline = argv[i].partition("=")
        if arg in ("--config", "--set"):
            value = inline if inline or "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if inline or "=" in argv[i] else 2
            try:
                if arg == "--config":
                    loaded = load_yaml(read_config(value, "it"), "it") or {}
                    if not isinstance(loaded, dict):
                        raise ValueError("it must hold a mapping of flags")
                    values.update(loaded)
                else:
                    key, sep, raw = value.partition("=")
                    if not sep:
                        raise ValueError("--set wants KEY=VALUE")
                    values[key] = load_yaml(raw, "the value")
            except (OSError, ValueError, yaml.YAMLError) as e:  # a bad config: exit 2, as argparse does
                print(shorten(f"rlhf {' '.join(argv[:2])}: {arg} {value}: {e}"), file=sys.stderr)
                raise SystemExit(2) from None
            continue
        rest.append(argv[i])
        i += 1
    tokens = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                tokens.append(flag)
            elif item not in (False, None):
                tokens += [flag, str(item)]
    return argv[:2] + tokens + rest


def _add_job_args(p: argparse.ArgumentParser) -> None:
    """What every training job takes: its config file, overrides, where it runs."""
    p.add_argument("--config", help="YAML file of config keys; the flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (dotted, YAML value), e.g. --set ppo.beta=0.05")
    p.add_argument("--print-config", action="store_true", help="print the effective config (defaults included) and exit")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto: cuda:LOCAL_RANK when there is CUDA")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bfloat16 on GPUs that have it, else float32)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run N ranks on this machine: re-executes the command under torchrun --nproc-per-node N")
    p.add_argument("--export-merged", metavar="DIR",
                   help="with LoRA (--set lora.rank=N): also write base + adapter merged to DIR, a plain Hugging Face "
                        "model for serving without adapter support")


def _add_feedback_db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, metavar="URL",
                   help="database: sqlite:///FILE or postgresql://USER:PASSWORD@HOST/DB (default: $RLHF_FEEDBACK_DB, "
                        "else sqlite:///feedback.db)")


def _add_column_args(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    for name in names:
        p.add_argument(f"--{name}-key", metavar="COLUMN", help=f"the column holding the {name} (default {name})")


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


def version() -> str:
    try:
        return importlib.metadata.version("rlhf-services")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--version", action="version", version=f"rlhf {version()}")
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
    train = sub.add_parser("train", help="training jobs (one process per device under torchrun, or --nproc N)"
                           ).add_subparsers(dest="train_command", required=True, metavar="JOB")
    for name, target, help in [
        ("sft", "services.trainer.sft:main", "supervised fine-tuning on prompt/response JSONL"),
        ("rm", "services.trainer.rm:main", "reward model (Bradley-Terry) on prompt/chosen/rejected JSONL"),
    ]:
        p = _command(train, name, target, help)
        _add_job_args(p)
        p.add_argument("--model", help="Hugging Face model directory to start from" + (
            " (rm: or --init)" if name == "rm" else ""))
        p.add_argument("--data", help="JSONL, JSON or Parquet file, save_to_disk directory or hub id, in a TRL format")
        p.add_argument("--data-split", help="split of a directory or hub data set (default train)")
        _add_column_args(p, ("prompt", "completion", "response", "messages", "text") if name == "sft"
                         else ("prompt", "chosen", "rejected"))
        p.add_argument("--out", help="output directory (Hugging Face layout)")
        p.add_argument("--epochs", type=float)
        p.add_argument("--lr", type=float)
        p.add_argument("--batch-size", type=int, help="examples per optimizer step, over all ranks")
        p.add_argument("--max-length", type=int, help="tokens per example")
        p.add_argument("--eval-fraction", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
        if name == "rm":
            p.add_argument("--init", metavar="DIR",
                           help="refresh: continue from this trained reward model (the served one) on --data, e.g. "
                                "a feedback database (sqlite:///FILE, postgresql://...); mix in old comparisons with "
                                "--set replay.data=FILE --set replay.share=0.5")
    p = _command(train, "ppo", "services.trainer.loop:main", "online PPO against live policy and reward services")
    _add_job_args(p)
    p.add_argument("--policy", action="append", dest="policy_addresses", metavar="HOST:PORT",
                   help="policy replica address; repeat for several, or dns:///name:port for every replica behind a name")
    p.add_argument("--reward", dest="reward_address", metavar="HOST:PORT", help="reward service address")
    p.add_argument("--sft-model", help="policy and reference start (SFT output)")
    p.add_argument("--reward-model", help="value model start (reward model directory)")
    p.add_argument("--prompts", help="prompts data set (a \"prompt\" per row: a string or a conversation)")
    _add_column_args(p, ("prompt",))
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
    p.add_argument("--log-level", default=argparse.SUPPRESS, help="logging level (default INFO)")
    _add_serve_config_args(p)
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
    p.add_argument("--stage-timeout-s", type=float, default=300.0,
                   help="drop a push staged for CommitWeights after this long (default 300)")
    p.add_argument("--push-token-file", default=None,
                   help="file holding the push token that UpdateWeights, CommitWeights, AbortWeights and "
                        "RollbackWeights need on top of the bearer token (metadata rlhf-push-token); held by the "
                        "trainer and the replicas only (default: $RLHF_PUSH_TOKEN; neither = the bearer token is enough)")
    p.add_argument("--relay-auth-token-file", default=None,
                   help="bearer token this replica sends when it passes a push on (default: its own --auth-token-file "
                        "or $RLHF_AUTH_TOKEN)")
    p.add_argument("--relay-tls-ca", default=None, help="PEM CA of the other replicas' certificates, for relaying "
                   "(default: --tls-ca)")
    p.add_argument("--relay-tls-cert", default=None,
                   help="PEM client certificate for relaying under mTLS (default: --tls-cert)")
    p.add_argument("--relay-tls-key", default=None, help="PEM key of --relay-tls-cert (default: --tls-key)")
    add_server_args(p, port=50051, metrics_port=9101)

    p = _command(serve, "reward", "services.reward.main:main",
                 "serve RewardService: a reward model, reward functions, or a weighted mix of them")
    _add_serve_config_args(p)
    p.add_argument("--model", default=None, help="reward model directory (optional with --reward-function)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-length", type=int, default=None, help="tokens per pair (default: the model's)")
    p.add_argument("--max-pairs", type=int, default=256, help="limit of pairs per Score")
    p.add_argument("--max-text-bytes", type=int, default=65536,
                   help="limit of one prompt or response (a conversation: all its messages)")
    p.add_argument("--max-batch-size", type=int, default=64, help="pairs per forward pass")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, default=4096, help="pairs waiting; beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--reward-function", action="append", default=[], metavar="NAME=SPEC",
                   help="a reward function next to (or instead of) the model; repeat for several. SPEC is "
                        "module:function (a callable (prompt, response) -> float), builtin:length[:chars|words[:FREE]] "
                        "or builtin:regex:PATTERN (1.0 when the whole response matches)")
    p.add_argument("--reward-mix", default=None, metavar="NAME=WEIGHT,...",
                   help="weight of each component in the score, e.g. rm=1.0,length=-0.01 (rm is the model; "
                        "default: every weight 1)")
    p.add_argument("--reward-function-timeout-s", type=float, default=5.0, metavar="S",
                   help="time limit of one call of a module:function reward function (default 5); past it the "
                        "function's worker process is stopped and replaced, and the request fails with "
                        "INVALID_ARGUMENT naming the function")
    p.add_argument("--reward-function-workers", type=int, default=4, metavar="N",
                   help="processes that run the module:function reward functions, one request at a time each "
                        "(default 4)")
    p.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="a directory LoadModel may load new reward model versions from (a shared volume); repeat "
                        "for several. Without it LoadModel is off")
    p.add_argument("--admin-token-file", default=None, metavar="FILE",
                   help="a token of its own for LoadModel: then only it may swap the model (it works for every "
                        "other RPC too); default: LoadModel takes the scoring token")
    p.add_argument("--http-port", type=int, default=0, help="OpenRLHF-compatible POST /get_reward (0 = off)")
    p.add_argument("--http-input", choices=["openrlhf", "pairs"], default="openrlhf",
                   help="openrlhf (default): query is the templated sequence OpenRLHF decodes, scored as "
                        "OpenRLHF's own server scores it; pairs: query = raw prompt + response, the prompt "
                        "templated here")
    p.add_argument("--http-no-auth", action="store_true",
                   help="serve the HTTP port without the bearer token (OpenRLHF sends none); the gRPC port keeps "
                        "it. Guard the port with a NetworkPolicy")
    p.add_argument("--http-max-concurrency", type=int, default=64,
                   help="HTTP requests answered at once; beyond it 429 at once (default 64)")
    add_server_args(p, port=50052, metrics_port=9102)

    help = "serve the feedback page and its JSON API: people judge pairs of the live policy's answers"
    p = _command(serve, "feedback", "services.feedback.main:main", help)
    _add_serve_config_args(p)
    _add_feedback_db_arg(p)
    p.add_argument("--no-migrate", action="store_true",
                   help="do not migrate the schema at start; refuse to start when it is not current "
                        "(migrate with `rlhf feedback migrate`)")
    p.add_argument("--policy", required=True, metavar="HOST:PORT", help="policy service whose answers are judged")
    p.add_argument("--reward", default=None, metavar="HOST:PORT",
                   help="reward service that scores each pair when it is shown (the drift metric needs it)")
    p.add_argument("--prompts", required=True, help="prompts data set (a \"prompt\" per row: a string or a "
                                                    "conversation; JSONL, JSON, Parquet or save_to_disk)")
    _add_column_args(p, ("prompt",))
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the pairs (default 1)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--seed", type=int, default=None, help="seed of the prompt choice")
    p.add_argument("--rpc-timeout-s", type=float, default=60.0, help="time limit of a Generate or Score call")
    p.add_argument("--overlap", type=float, default=0.2,
                   help="share of pairs shown to a second labeller, for the agreement between labellers (default 0.2)")
    p.add_argument("--repeat-version-lag", type=int, default=10,
                   help="a pair shown again is at most this many policy weight versions old (default 10)")
    p.add_argument("--drift-window", type=int, default=200,
                   help="decisive judgments behind the reward model's agreement metric (default 200)")
    p.add_argument("--session-hours", type=float, default=12.0, help="how long a page log-in lasts (default 12)")
    p.add_argument("--rate-limit", type=float, default=5.0, help="requests per second and labeller (default 5)")
    p.add_argument("--rate-burst", type=int, default=30, help="requests a labeller may send at once (default 30)")
    p.add_argument("--login-attempts", type=int, default=10, help="failed log-ins per minute and address (default 10)")
    p.add_argument("--max-concurrency", type=int, default=32, help="pairs being sampled at once; beyond it 429")
    p.add_argument("--max-body-bytes", type=int, default=16384, help="largest request body (default 16 KiB)")
    p.add_argument("--cookie-secure", action="store_true",
                   help="Secure cookies (on with --tls-cert; set it behind an ingress that terminates HTTPS)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    g.add_argument("--port", type=int, default=8090, help="HTTP port of the page and the API (default 8090)")
    g.add_argument("--metrics-port", type=int, default=9104, help="Prometheus /metrics HTTP port (default 9104; 0 = off)")
    g.add_argument("--auth-token-file", default=None,
                   help="the service's own token, for GET /api/v1/export (default: $RLHF_AUTH_TOKEN; neither = "
                        "export over HTTP off). Labellers log in with their own tokens")
    g.add_argument("--tls-cert", default=None, help="PEM certificate: HTTPS")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--grace-seconds", type=float, default=20.0, help="on SIGTERM, time for requests in flight")
    g.add_argument("--drain-linger-s", type=float, default=0.0,
                   help="on SIGTERM, keep serving this long after /readyz fails (a load balancer's delay)")
    add_client_args(p)

    # rlhf feedback migrate|add-labeller|labellers|disable|enable|export
    feedback = sub.add_parser("feedback", help="the feedback database: schema, labellers, export").add_subparsers(
        dest="feedback_command", required=True, metavar="COMMAND")
    p = _command(feedback, "migrate", "services.feedback.main:admin", "create or upgrade the schema (Alembic)")
    _add_feedback_db_arg(p)
    p = _command(feedback, "add-labeller", "services.feedback.main:admin",
                 "add a labeller and print their token (once: only its hash is stored)")
    _add_feedback_db_arg(p)
    p.add_argument("name")
    p.add_argument("--rotate", action="store_true", help="give an existing labeller a new token (the old one and "
                                                         "their sessions stop working)")
    for name, help in (("disable", "stop a labeller from logging in (their judgments stay)"),
                       ("enable", "let a disabled labeller log in again")):
        p = _command(feedback, name, "services.feedback.main:admin", help)
        _add_feedback_db_arg(p)
        p.add_argument("name")
    p = _command(feedback, "labellers", "services.feedback.main:admin", "list the labellers and their judgments")
    _add_feedback_db_arg(p)
    p = _command(feedback, "export", "services.feedback.main:admin",
                 "write the judgments as TRL preference rows (prompt, chosen, rejected) to a JSONL file")
    _add_feedback_db_arg(p)
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--since-id", type=int, default=0, help="only judgments with a larger id (incremental export)")
    p.add_argument("--min-policy-version", type=int, default=0, help="only pairs of this policy version or later")

    # rlhf reward load-model
    reward = sub.add_parser("reward", help="operate running reward services").add_subparsers(
        dest="reward_command", required=True, metavar="ACTION")
    p = _command(reward, "load-model", "services.reward.admin:main",
                 "serve a new reward model version (LoadModel) on every replica, without a restart")
    p.add_argument("path", help="the model's directory on the servers' filesystem, under their --model-root")
    p.add_argument("--reward", dest="reward_address", required=True, metavar="ADDRESS",
                   help="host:port, or dns:///name:port for every replica behind a name (a headless Service)")
    p.add_argument("--expected-weights-version", default=None, metavar="V",
                   help="load only if the weights hash to V (refuses files still being written)")
    p.add_argument("--if-version", default=None, metavar="V", help="load only where version V is served now")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per replica (default 600)")
    add_client_args(p)

    # rlhf demo
    p = _command(sub, "demo", "services.demo.pipeline:main", "the whole pipeline on the embedded tiny model (CPU, minutes)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="PPO steps (default from the demo config)")
    p.add_argument("--algo", default="ppo", help="ppo, grpo, rloo or reinforce_pp, or several side by side: ppo,grpo (default ppo)")
    p.add_argument("--mode", default="sync", help="sync or one_step_off (generation behind training), or both: "
                                                  "sync,one_step_off (default sync)")
    p.add_argument("--with-no-kl", action="store_true", help="also run PPO with beta = 0, to show what the KL leash prevents")
    p.add_argument("--feedback-loop", action="store_true",
                   help="also run PPO with people in the loop: halfway, the gold labeller judges the policy's answers "
                        "on the feedback service, the reward model is refreshed from them and swapped in")
    p.add_argument("--quick", action="store_true", help="a shorter run (tests)")
    return parser


def torchrun_argv(argv: list[str], nproc: int) -> list[str]:
    """`rlhf ... --nproc N ...` as the torchrun command that starts N ranks of it."""
    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "services.cli", *rest]


# What each extra brings, for the message when a command finds one missing.
EXTRAS = {"torch": "trainer", "transformers": "trainer", "datasets": "trainer", "matplotlib": "trainer",
          "vllm": "policy (GPU) or cpu (vllm-cpu)", "aiohttp": "reward", "safetensors": "trainer",
          "prometheus_client": "server", "grpc_health": "server", "grpc_reflection": "server", "pydantic": "server",
          "yaml": "server", "tqdm": "server", "numpy": "trainer", "re2": "reward", "sqlalchemy": "feedback",
          "alembic": "feedback", "psycopg": "feedback", "peft": "trainer"}


def is_serve_policy_flag(flag: str) -> bool:
    """Whether `rlhf serve policy` accepts `flag` (e.g. "--max-num-batched-tokens" or
    "--port=1"): one of its own flags or a vLLM engine argument. For checks of command lines
    written elsewhere (the Kubernetes manifests); options.engine_args() also checks values.
    Imports vLLM."""
    from services.policy.options import ENGINE_SET, engine_parser

    name = flag.split("=", 1)[0]
    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    policy = next(a for a in serve._actions if isinstance(a, argparse._SubParsersAction)).choices["policy"]
    if name in policy._option_string_actions:
        return True
    vllm_flags = set(engine_parser()._option_string_actions) - set(ENGINE_SET.values())
    return name.replace("_", "-") in vllm_flags  # vLLM's parser takes either spelling


def main(argv: list[str] | None = None) -> int:
    argv = expand_serve_config(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    module, func = args.target.split(":")
    command = (" ".join(argv[:2]) if argv and argv[0] in ("train", "serve", "data", "reward", "feedback")
               else (argv[0] if argv else ""))
    try:
        job = importlib.import_module(module)
        if getattr(args, "nproc", None) and "RANK" not in os.environ:
            if args.nproc < 1:
                print("rlhf: --nproc must be >= 1", file=sys.stderr)
                return 2
            job.load_config(args)  # a bad config exits 2 here: under torchrun it would be exit 1 of a rank
            command_line = torchrun_argv(argv, args.nproc)
            os.execv(command_line[0], command_line)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return getattr(job, func)(args) or 0
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"rlhf {command}: {top} is not installed; this command needs the {EXTRAS[top]} extra, e.g. "
              f"pip install 'rlhf-services[{EXTRAS[top].split()[0]}]'", file=sys.stderr)
        return 1
    except Exception as e:
        from services.trainer.config import ConfigError
        if isinstance(e, ConfigError):
            print(f"rlhf {command}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
