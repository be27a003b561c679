"""PPO step time by phase, memory per rank, and the share of a step spent in RPC, for trainer
variants side by side against the same live services.

    python bench/ppo.py                         # one rank: phases and the RPC+serialization share
    python bench/ppo.py --nproc 1,2             # sharding: 1 rank vs 2 ranks on the same global batch
    python bench/ppo.py --algo ppo,grpo         # PPO with its critic vs critic-free GRPO, same sampled tokens
    python bench/ppo.py --mode sync,one_step_off --layout pinned,shared   # generation hidden behind training
    python bench/ppo.py --nproc 1,8 --device cuda --hidden-size 2048 --num-layers 16   # on a GPU node
    python bench/ppo.py --mode sync,one_step_off --device cuda --hidden-size 2048 --num-layers 16 --batch 256
    python bench/ppo.py --lora --learning           # LoRA next to full fine-tuning, on the demo's trained models

Each variant is a real `rlhf train ppo` process (under torchrun for N > 1) against one policy and
one reward service started here (child processes), on the demo's scale by default (64 prompts x
64 tokens). Every variant runs 1 warm-up step (first push, caches) and --steps measured steps;
the table compares each variant with the first one.

Per rank: `state bytes` are the parameters, gradients and AdamW moments of the policy and the
value model that the rank holds (what FSDP2 shards), `peak RSS` its VmHWM (the torch runtime's
few hundred MB included). Targets of the sharding issue, on this 2-core machine: state bytes at
N = 2 <= 0.55 x N = 1; step time at N = 2 <= 1.25 x N = 1 (the cores are shared, so no speed-up is
expected: the point is that sharding costs little).

Rollout modes: one_step_off generates the next batch while this one trains. On a GPU node the
two run on different devices; here the `pinned` layout mimics that (policy and reward servers
on CPU 0 with one torch thread, the trainer on CPU 1 with one), while `shared` lets every
process use both cores, where two compute-bound halves slow each other down instead of
overlapping. Targets: one_step_off >= 1.3 x the steps/s of sync in the pinned layout (>= 1.5 x
on a GPU node); the shared ratio is printed too, and is below 1 on 2 cores.

LoRA (--lora): every variant runs twice, with full fine-tuning and with adapters (rank
--lora-rank on every projection of the policy and the value model, the value model's score head
in full, at --lora-lr). Per rank, `state bytes` count every model the trainer holds (the full
run's reference model included; a LoRA run has none: its reference is the base with the adapter
off) with their gradients and AdamW moments; `trained state` the trained parameters alone.
`push` is what the policy server applied per UpdateWeights (its rlhf_policy_weight_update_bytes_
total over its updates): a LoRA run pushes the merged model, the same bytes as a full one, until
adapter pushes exist; `adapter push` is what those will move (the adapter's parameters in the
served dtype). --learning runs on the demo's trained SFT and reward models (trained here with the
demo's settings, or taken from --demo DIR, an `rlhf demo` output) for the demo's 30 steps and
reports the share of "clear" answers of the served policy afterwards (400 samples, as the demo's
report counts them).

The RPC share (of the single-variant run): the servers' grpc_server_handling_seconds tell how
long each RPC spent inside the server; what the trainer waited beyond that is transport; the
protobuf encode/decode of the same messages is timed here; a push counts whole as RPC.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

# The demo's PPO with LoRA (rank 8, alpha 16) on its tiny model, policy and value learning rates.
# Measured with --lora --learning (30 steps; clear share of the SFT policy 0.30, full fine-tuning
# at 3e-5 / 1e-4: 0.83-0.87): 3e-4 -> 0.52, 5e-4 -> 0.58, 1e-3 -> 0.57-0.62, 3e-3 -> 0.52 (KL 9.5);
# rank 32 at 3e-4: 0.55. See docs/training.md, "LoRA".
LORA_LR = 1e-3
LORA_VALUE_LR = 1e-3


def handling_seconds(metrics_port: int) -> dict[str, float]:
    """Seconds spent inside the server per gRPC method."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("grpc_server_handling_seconds_sum{"):
            method = line.split('grpc_method="')[1].split('"')[0]
            out[method] = out.get(method, 0.0) + float(line.rsplit(" ", 1)[-1])
    return out


def codec_seconds(message, repeat: int = 20) -> float:
    """Encode + decode of one message, as a sender and a receiver each do once."""
    start = time.perf_counter()
    for _ in range(repeat):
        type(message).FromString(message.SerializeToString())
    return (time.perf_counter() - start) / repeat


def serialization_seconds(batch: int, tokens: int) -> float:
    """Protobuf encode/decode of one step's Generate and Score messages, at their real sizes, both ends."""
    from rlhf.v1 import common_pb2, policy_pb2, reward_pb2
    completion = policy_pb2.Completion(token_ids=list(range(tokens)), logprobs=[-1.5] * tokens, text="x" * 4 * tokens)
    prompt = common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=list(range(20))))
    messages = [
        policy_pb2.GenerateRequest(prompts=[prompt] * batch),
        policy_pb2.GenerateResponse(results=[policy_pb2.PromptResult(prompt_token_ids=list(range(20)),
                                                                     completions=[completion])] * batch),
        reward_pb2.ScoreRequest(pairs=[reward_pb2.ScorePair(prompt={"text": "q" * 60},
                                                            response={"text": "x" * 4 * tokens})] * batch),
        reward_pb2.ScoreResponse(results=[reward_pb2.ScoreResult(score=1.0)] * batch),
    ]
    return 2 * sum(codec_seconds(m) for m in messages)


def run_variant(name: str, config: dict, nproc: int, work: pathlib.Path, pin: str | None = None,
                threads: int | None = None) -> dict:
    """One trainer process (or torchrun of nproc ranks) for the config; its measured steps and ranks.
    `pin`: the CPUs it may run on (taskset); `threads`: torch's intra-op threads."""
    out = work / name
    config = {**config, "out": str(out)}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["train", "ppo", "--config", str(path), "--port", "0", "--metrics-port", "0"]
    command = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "services.cli",
                *args] if nproc > 1 else [sys.executable, "-m", "services.cli", *args])
    if pin:
        command = ["taskset", "-c", pin, *command]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    with open(work / f"{name}.log", "wb") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise SystemExit(f"variant {name} failed ({code}); see {work / f'{name}.log'}")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"history": history[1:], "warmup_end": history[0]["time"],
            "ranks": json.loads((out / "ranks.json").read_text()), "wall_seconds": time.perf_counter() - start}


def push_counters(metrics_port: int) -> tuple[float, float]:
    """(bytes applied, successful updates) of a policy server so far."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {"bytes": 0.0, "updates": 0.0}
    for line in text.splitlines():
        if line.startswith("rlhf_policy_weight_update_bytes_total "):
            values["bytes"] += float(line.rsplit(" ", 1)[-1])
        elif line.startswith('rlhf_policy_weight_updates_total{result="ok"}'):
            values["updates"] += float(line.rsplit(" ", 1)[-1])
    return values["bytes"], values["updates"]


def adapter_push_bytes(model_dir: pathlib.Path, rank: int, served_dtype: str) -> int:
    """Bytes of the policy's adapter in the served dtype, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.trainer import lora
    from services.trainer.config import LoRA

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return lora.adapter_bytes(lora.wrap(model, LoRA(rank=rank), "causal_lm", seed=0, on_meta=True),
                              getattr(torch, served_dtype))


def train_demo_models(models: pathlib.Path, data: dict) -> None:
    """The demo's SFT policy and reward model, with the demo's settings (services.demo.pipeline)."""
    from services.demo.pipeline import RM, SFT
    from services.demo.tiny_model import build_model
    from services.trainer.config import RMConfig, SFTConfig
    from services.trainer.rm import train_reward_model
    from services.trainer.sft import train_sft

    build_model("policy", models / "init-policy")
    build_model("reward", models / "init-reward")
    train_sft(SFTConfig(model=str(models / "init-policy"), data=str(data["sft"]), out=str(models / "sft"), **SFT))
    train_reward_model(RMConfig(model=str(models / "init-reward"), data=str(data["prefs"]),
                                out=str(models / "reward"), **RM))


def clear_share(policy, reward, models: pathlib.Path, prompts_path: pathlib.Path) -> float:
    """Share of "clear" answers of the served policy: 50 held-out prompts x 8 samples, as the demo's report."""
    import json as json_
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.config import ClientConfig
    from services.demo import evaluate
    from services.policy.client import PolicyClient
    from services.reward.client import RewardClient

    prompts = [r["prompt"] for r in map(json_.loads, open(prompts_path)) if r["split"] == "eval"][:50]
    tokenizer = AutoTokenizer.from_pretrained(models / "sft")
    sft = AutoModelForCausalLM.from_pretrained(models / "sft", dtype=torch.float32).eval()
    with PolicyClient(policy.address, ClientConfig(), timeout=300) as p, \
            RewardClient(reward.address, ClientConfig(), timeout=300) as r:
        result = evaluate.evaluate(p, r, tokenizer, sft, prompts, samples_per_prompt=8, max_tokens=64, seed=0)
    return result["shares"]["clear"]


def summary(variant: dict) -> dict[str, float]:
    history = variant["history"]
    n = len(history)
    phases = {p: sum(h["phase_seconds"].get(p, 0.0) for h in history) / n for p in history[0]["phase_seconds"]}
    ranks = variant["ranks"]
    wall = history[-1]["time"] - variant["warmup_end"]  # from the end of the warm-up step to the last step
    return {
        **{f"{p} (s/step)": v for p, v in phases.items()},
        "step (s/step)": wall / n,
        "steps per second": n / wall,
        "rollout (generate + score, s/step)": sum(h["rollout_seconds"] for h in history) / n,
        "share of the rollout hidden behind training": sum(h["rollout_hidden"] for h in history) / n,
        "mean staleness (versions)": sum(sum(int(k) * v for k, v in h["staleness"].items()) / h["completions"]
                                         for h in history) / n,
        "mean IS weight": sum(h["is_weight_mean"] for h in history) / n,
        "state bytes per rank (MB, max)": max(r["state_bytes"] for r in ranks) / 1e6,
        "trained state per rank (MB, max)": max(r["trained_bytes"] for r in ranks) / 1e6,
        "peak RSS per rank (MB, max)": max(r.get("peak_rss_bytes", 0) for r in ranks) / 1e6,
        "push (MB per push)": variant["push_bytes"] / 1e6,
        **({"adapter push, later (MB per push)": variant["adapter_push_bytes"] / 1e6}
           if "adapter_push_bytes" in variant else {}),
        **({"clear share after the run": variant["clear"], "clear share of the SFT policy": variant["clear_sft"]}
           if "clear" in variant else {}),
        **({"CUDA peak per rank (MB, max)": max(r["cuda_peak_bytes"] for r in ranks) / 1e6}
           if "cuda_peak_bytes" in ranks[0] else {}),
        "generated tokens per step": sum(h["generated_tokens"] for h in history) / n,
    }


def shape_steps(args) -> int:
    """--shape: the step in-process at a real shape, this tree (and REF's with --compare)."""
    import ppo_compare  # bench/ppo_compare.py and bench/ppo_shape.py, next to this script
    import ppo_shape

    args.batch, args.max_tokens = args.batch or 16, args.max_tokens or 192
    args.algo = args.algo or "grpo,ppo"
    args.dtype = "float32" if args.dtype == "auto" and args.device == "cpu" else args.dtype
    root = pathlib.Path(__file__).resolve().parents[1]
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-ppo-shape-"))
    sides = {"this": root}
    if args.compare:
        sides[args.compare] = ppo_compare.worktree(args.compare, root, work)
    try:
        result = ppo_shape.run_steps(args, work, sides)
    finally:
        if args.compare:
            ppo_compare.remove_worktree(root, sides[args.compare])
    print(json.dumps(result, indent=2)) if args.json else ppo_shape.print_steps(result, args)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant (one more warms up)")
    parser.add_argument("--nproc", default="1", help="comma-separated rank counts to compare, e.g. 1,2")
    parser.add_argument("--algo", default=None, help="comma-separated: ppo, grpo, rloo, reinforce_pp (the demo's "
                                                      "settings: the same 64 completions a step)")
    parser.add_argument("--mode", default="sync", help="comma-separated rollout modes: sync, one_step_off")
    parser.add_argument("--layout", default="shared", help="comma-separated: shared (every process on every CPU), "
                        "pinned (policy and reward servers on CPU 0, the trainer on CPU 1 with one torch thread, "
                        "as generation and training on different devices of a GPU node)")
    parser.add_argument("--replicas", type=int, default=1, help="policy replicas")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--hidden-size", type=int, default=128, help="of the policy and value models built here")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="completions per step, over all ranks (default 64; "
                        "16 with --shape)")
    parser.add_argument("--max-tokens", type=int, default=None, help="response tokens (default 64; 192 with --shape)")
    parser.add_argument("--compare", metavar="REF", help="this tree's step against the git ref REF's, in alternating "
                        "runs (bench/ppo_compare.py); one epoch, one minibatch of --batch")
    parser.add_argument("--pairs", type=int, default=3, help="with --compare: alternating pairs of runs (>= 3)")
    parser.add_argument("--threads", type=int, default=None, help="with --compare: OMP_NUM_THREADS for every process "
                        "of both sides (1: CPU seconds count work alone, no OpenMP spin-waiting)")
    parser.add_argument("--shape", metavar="NAME", help="the trainer's GRPO and PPO steps at a real model's shape "
                        "(bench/shapes/NAME.json, random weights; bench/ppo_shape.py): memory per component and time "
                        "per phase; with --compare REF, REF's steps next to them")
    parser.add_argument("--minibatch", type=int, default=4, help="with --shape: completions per minibatch")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="with --shape: prompt tokens")
    parser.add_argument("--lora", action="store_true", help="run every variant with LoRA adapters too")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=LORA_LR, help=f"policy lr with LoRA (default {LORA_LR})")
    parser.add_argument("--lora-value-lr", type=float, default=LORA_VALUE_LR,
                        help=f"value-model lr with LoRA (default {LORA_VALUE_LR})")
    parser.add_argument("--learning", action="store_true",
                        help="on the demo's trained models for the demo's 30 steps: the clear share after each run")
    parser.add_argument("--demo", type=pathlib.Path, default=None,
                        help="with --learning: an `rlhf demo --out DIR` whose models and data to use (else trained here)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.shape:
        return shape_steps(args)
    args.batch, args.max_tokens, args.algo = args.batch or 64, args.max_tokens or 64, args.algo or "ppo"
    if args.learning and args.steps == parser.get_default("steps"):
        args.steps = 29  # 1 warm-up + 29: the demo's 30 steps

    from services.demo.data import write_demo_data
    from services.demo.launch import ChildServer, free_port, rlhf_command
    from services.demo.pipeline import ALGOS, MODES, PPO
    from services.demo.tiny_model import build_model

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    models = work / "models"
    if args.learning and args.demo:
        models, data = args.demo / "models", {"prompts": args.demo / "data" / "prompts.jsonl"}
    elif args.learning:
        data = write_demo_data(work / "data")
        train_demo_models(models, data)
    else:
        size = dict(hidden_size=args.hidden_size, num_layers=args.num_layers,
                    num_heads=max(2, args.hidden_size // 64), intermediate_size=2 * args.hidden_size)
        build_model("policy", models / "sft", **size)
        build_model("reward", models / "reward", **size)
        data = write_demo_data(work / "data", num_sft=10, num_prefs=10, num_prompts=2000)
    if args.compare:
        import ppo_compare  # bench/ppo_compare.py, next to this script

        result = ppo_compare.compare(args, work, models, data["prompts"])
        print(json.dumps(result, indent=2)) if args.json else ppo_compare.print_compare(result, args)
        return 0

    def server(kind: str, i: int, pinned: bool):
        """A policy or reward server; pinned: on CPU 0 with one torch thread (the trainer gets CPU 1)."""
        port, metrics = free_port(), free_port()
        extra = ["--kv-cache-gib", "1"] if kind == "policy" else []
        argv = rlhf_command("serve", kind, "--model", str(models / ("sft" if kind == "policy" else kind)),
                            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics), *extra)
        srv = ChildServer(["taskset", "-c", "0", *argv] if pinned else argv, port=port,
                          service=f"rlhf.v1.{kind.capitalize()}Service", log_path=work / f"{kind}{i}.log",
                          env={"VLLM_CPU_KVCACHE_SPACE": "1", **({"OMP_NUM_THREADS": "1"} if pinned else {})})
        srv.metrics_port = metrics
        return srv

    def config(algo: str, mode: str, policies, reward, adapters: bool) -> dict:
        """The demo's settings for `algo` and `mode`, at --batch completions a step (groups of n for grpo/rloo);
        with adapters, LoRA at its own learning rates."""
        variant, overlap = ALGOS[algo], MODES[mode]
        rollout = {**PPO["rollout"], **variant.get("rollout", {}), **overlap.get("rollout", {}),
                   "max_tokens": args.max_tokens}
        rollout["batch_size"] = args.batch // rollout.get("n", 1)
        ppo = {**PPO["ppo"], "beta": 0.05, **variant.get("ppo", {})}
        if adapters:
            ppo |= {"lr": args.lora_lr, "value_lr": args.lora_value_lr}
        return dict(policy_addresses=[p.address for p in policies], reward_address=reward.address,
                    sft_model=str(models / "sft"), reward_model=str(models / "reward"), prompts=str(data["prompts"]),
                    steps=1 + args.steps, seed=0, checkpoint_every=0, device=args.device, dtype=args.dtype,
                    rollout=rollout, ppo=ppo, services=overlap.get("services", {}),
                    **({"lora": {"rank": args.lora_rank, "alpha": 2 * args.lora_rank}} if adapters else {}))

    variants: dict[str, dict] = {}
    for layout in args.layout.split(","):
        pinned = layout == "pinned"
        policies = [server("policy", i, pinned) for i in range(args.replicas)]
        reward = server("reward", 0, pinned)
        servers = [*policies, reward]
        for s in servers:
            s.start()
        try:
            for s in servers:
                s.wait_ready()
            clear_sft = clear_share(policies[0], reward, models, data["prompts"]) if args.learning else None
            for algo in args.algo.split(","):
                for mode in args.mode.split(","):
                    for nproc in (int(n) for n in args.nproc.split(",")):
                        for adapters in (False, True) if args.lora else (False,):
                            name = " ".join(x for x in (algo, mode if mode != "sync" else "", f"x{nproc}",
                                                         layout if layout != "shared" else "",
                                                         "lora" if adapters else "") if x)
                            before = {s.address: handling_seconds(s.metrics_port) for s in servers}
                            pushed = push_counters(policies[0].metrics_port)
                            variant = run_variant(name.replace(" ", "-"),
                                                  config(algo, mode, policies, reward, adapters), nproc, work,
                                                  pin="1" if pinned else None, threads=1 if pinned else None)
                            after = {s.address: handling_seconds(s.metrics_port) for s in servers}
                            # Server time of all 1 + steps steps, scaled to the measured ones.
                            scale = args.steps / (1 + args.steps)
                            variant["inside"] = {m: scale * sum(after[a].get(m, 0.0) - before[a].get(m, 0.0)
                                                                for a in after) for m in ("Generate", "Score")}
                            moved, pushes = (b - a for a, b in zip(pushed, push_counters(policies[0].metrics_port)))
                            variant["push_bytes"] = moved / max(pushes, 1)
                            if adapters:
                                from services.policy.client import PolicyClient
                                with PolicyClient(policies[0].address) as client:
                                    served = client.model_info().dtype
                                variant["adapter_push_bytes"] = adapter_push_bytes(models / "sft", args.lora_rank,
                                                                                   served)
                            if args.learning:
                                variant["clear"], variant["clear_sft"] = (
                                    clear_share(policies[0], reward, models, data["prompts"]), clear_sft)
                            variants[name] = variant
        finally:
            for s in servers:
                s.terminate()

    rows = {name: summary(v) for name, v in variants.items()}
    names = list(rows)
    first = rows[names[0]]
    result = {"variants": rows, "ratios": {}}
    for name in names[1:]:
        result["ratios"][name] = {
            f"steps/s vs {names[0]}": rows[name]["steps per second"] / first["steps per second"],
            f"step time vs {names[0]}": rows[name]["step (s/step)"] / first["step (s/step)"],
            f"state bytes per rank vs {names[0]}": rows[name]["state bytes per rank (MB, max)"] /
            first["state bytes per rank (MB, max)"],
            f"peak RSS per rank vs {names[0]}": rows[name]["peak RSS per rank (MB, max)"] /
            first["peak RSS per rank (MB, max)"],
        }
    # With --lora, each LoRA run against its full fine-tuning twin (the first variant's ratios above
    # already compare it with the first twin).
    for name in names:
        base = name.removesuffix(" lora")
        if name != base and base in rows:
            keys = ["trained state per rank (MB, max)", "push (MB per push)"]
            keys += ["state bytes per rank (MB, max)", "peak RSS per rank (MB, max)",
                     "step (s/step)"] if base != names[0] else []
            result["ratios"].setdefault(name, {}).update(
                {f"{key} vs {base}": rows[name][key] / rows[base][key] for key in keys})
    # Within each layout, one_step_off against sync of the same algorithm and rank count.
    for name in names:
        if "one_step_off" in name:
            base = name.replace(" one_step_off", "")
            if base in rows:
                result["ratios"].setdefault(name, {})[f"steps/s vs {base}"] = (
                    rows[name]["steps per second"] / rows[base]["steps per second"])
    one = variants[names[0]]
    steps = len(one["history"])
    rpc = (max(first.get("generate (s/step)", 0.0) - one["inside"]["Generate"] / steps, 0.0)
           + max(first.get("score (s/step)", 0.0) - one["inside"]["Score"] / steps, 0.0)
           + first["push (s/step)"] + serialization_seconds(args.batch, args.max_tokens))
    result["rpc_share"] = rpc / first["step (s/step)"]

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"PPO: {args.batch} completions x {args.max_tokens} tokens, model hidden {args.hidden_size} x "
          f"{args.num_layers} layers, {args.device}, {args.replicas} policy replica(s), {args.steps} measured steps "
          f"per variant\n")
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    width = max(14, *(len(n) + 2 for n in names))
    print(f"{'quantity':44s}" + "".join(f"{n:>{width}s}" for n in names))
    for key in keys:
        print(f"{key:44s}" + "".join(f"{rows[n].get(key, float('nan')):{width}.4f}" for n in names))
    for name, ratios in result["ratios"].items():
        print()
        for key, value in ratios.items():
            print(f"{name + ': ' + key:72s} {value:8.3f}")
    print(f"\nRPC+serialization share of a step ({names[0]}): {result['rpc_share']:.3f} (target <= 0.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
