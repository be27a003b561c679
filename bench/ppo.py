"""PPO step time by phase, and the share of it spent in RPC and serialization.

    python bench/ppo.py [--steps 6] [--json]

Runs the trainer in this process against real policy and reward services (child processes)
at the demo's scale (64 prompts x 64 tokens, the tiny model). The servers' own
grpc_server_handling_seconds tell how long each RPC spent inside the server; what the
trainer waited beyond that is transport, and the protobuf encode/decode of the same
messages is timed here on both ends. A weight push counts whole as RPC (an upper bound:
an in-process trainer would also have to copy the weights into the engine).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
import urllib.request


def handling_seconds(metrics_port: int) -> dict[str, float]:
    """Seconds spent inside the server per gRPC method, plus the reward service's forward
    passes ("forward": their seconds, "batches": their count)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        value = float(line.rsplit(" ", 1)[-1]) if line and not line.startswith("#") else 0.0
        if line.startswith("grpc_server_handling_seconds_sum{"):
            method = line.split('grpc_method="')[1].split('"')[0]
            out[method] = out.get(method, 0.0) + value
        elif line.startswith("rlhf_reward_inference_seconds_sum"):
            out["forward"] = value
        elif line.startswith("rlhf_reward_inference_seconds_count"):
            out["batches"] = value
    return out


def codec_seconds(message, repeat: int = 20) -> float:
    """Encode + decode of one message, as a sender and a receiver each do once."""
    start = time.perf_counter()
    for _ in range(repeat):
        type(message).FromString(message.SerializeToString())
    return (time.perf_counter() - start) / repeat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps (one more warms up)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from rlhf.v1 import common_pb2, policy_pb2, reward_pb2
    from services.common.config import ClientConfig
    from services.demo.launch import ChildServer, free_port, rlhf_command
    from services.demo.data import write_demo_data
    from services.demo.pipeline import ppo_config
    from services.demo.tiny_model import build_model
    from services.trainer.loop import train

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    models = tmp / "models"
    build_model("policy", models / "sft")
    build_model("reward", models / "reward")
    data = write_demo_data(tmp / "data", num_sft=10, num_prefs=10, num_prompts=500)
    ports = {name: (free_port(), free_port()) for name in ("policy", "reward")}
    policy = ChildServer(rlhf_command("serve", "policy", "--model", str(models / "sft"), "--host", "127.0.0.1",
                                      "--port", str(ports["policy"][0]), "--metrics-port", str(ports["policy"][1]),
                                      "--kv-cache-gib", "1"),
                         port=ports["policy"][0], service="rlhf.v1.PolicyService", log_path=tmp / "policy.log",
                         env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    reward = ChildServer(rlhf_command("serve", "reward", "--model", str(models / "reward"), "--host", "127.0.0.1",
                                      "--port", str(ports["reward"][0]), "--metrics-port", str(ports["reward"][1])),
                         port=ports["reward"][0], service="rlhf.v1.RewardService", log_path=tmp / "reward.log")
    with policy, reward:
        config = ppo_config(tmp / "run", policy=policy.address, reward=reward.address, models=models,
                            prompts=data["prompts"], steps=1, seed=0, beta=0.05)
        train(config, ClientConfig(), handle_signals=False)  # warm-up step (first push, caches)
        before = {n: handling_seconds(m) for n, (_, m) in ports.items()}
        config.steps = 1 + args.steps
        config.out = str(tmp / "run")
        history = train(config, ClientConfig(), resume=True, handle_signals=False)[-args.steps:]
        after = {n: handling_seconds(m) for n, (_, m) in ports.items()}

    inside = {f"{n}.{m}": after[n].get(m, 0.0) - before[n].get(m, 0.0) for n in after for m in after[n]}
    phases = {p: sum(h["phase_seconds"][p] for h in history) for p in history[0]["phase_seconds"]}
    step_total = sum(sum(h["phase_seconds"].values()) for h in history)

    # Protobuf encode/decode of one step's messages, at their real sizes.
    batch, tokens = config.rollout.batch_size, config.rollout.max_tokens
    completion = policy_pb2.Completion(token_ids=list(range(tokens)), logprobs=[-1.5] * tokens, text="x" * 4 * tokens)
    gen_request = policy_pb2.GenerateRequest(prompts=[common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=list(range(20))))] * batch)
    gen_reply = policy_pb2.GenerateResponse(results=[policy_pb2.PromptResult(prompt_token_ids=list(range(20)),
                                                                              completions=[completion])] * batch)
    score_request = reward_pb2.ScoreRequest(pairs=[reward_pb2.ScorePair(prompt={"text": "q" * 60},
                                                                        response={"text": "x" * 4 * tokens})] * batch)
    score_reply = reward_pb2.ScoreResponse(results=[reward_pb2.ScoreResult(score=1.0)] * batch)
    codec = 2 * sum(codec_seconds(m) for m in (gen_request, gen_reply, score_request, score_reply)) * len(history)

    rpc = {
        "generate": max(phases["generate"] - inside.get("policy.Generate", 0.0), 0.0),
        "score": max(phases["score"] - inside.get("reward.Score", 0.0), 0.0),
        "push": phases["push"],
        "protobuf encode/decode": codec,
    }
    share = sum(rpc.values()) / step_total
    rows = [(f"{p} (s/step)", phases[p] / len(history)) for p in phases]
    rows += [("  of score: reward model forward passes (s/step)", inside.get("reward.forward", 0.0) / len(history)),
             ("  of score: forward passes per step", inside.get("reward.batches", 0.0) / len(history))]
    rows += [("step total (s/step)", step_total / len(history))]
    rows += [(f"RPC+serialization in {k} (s/step)", v / len(history)) for k, v in rpc.items()]
    rows += [("RPC+serialization share of a step", share), ("target share", 0.10)]
    if args.json:
        print(json.dumps(dict(rows)))
    else:
        print(f"PPO at demo scale: {batch} prompts x {tokens} tokens, {len(history)} measured steps\n")
        print(f"{'quantity':48s} {'value':>10s}")
        for name, value in rows:
            print(f"{name:48s} {value:10.4f}")
    return 0 if share <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
