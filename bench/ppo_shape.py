"""`bench/ppo.py --shape NAME`: the trainer's step at a real model's shape, in memory and time.

    python bench/ppo.py --shape qwen2.5-0.5b                     # GRPO and PPO steps, this tree
    python bench/ppo.py --shape qwen2.5-0.5b --compare 214f270   # and the same steps at another commit

The shape is a Hugging Face config kept in bench/shapes/NAME.json (the real model's values);
the policy and the reward model (the value model's start) are built from it here with random
weights, nothing is downloaded. The step is the trainer's own code (PPOState.build, then
make_experience and ppo_update of services.trainer.loop) on a synthetic rollout of token ids:
no policy or reward service runs, so there is no generate, score or push phase and no
tokenizer (a vLLM server and a reward server at this shape are more than a shared 2-core
machine carries next to the trainer). Each (tree, algorithm) is a process of its own, started
with that tree on PYTHONPATH, so that peaks do not mix.

What it reports, per step:
- per component, the bytes its tensors hold (parameters, gradients, AdamW moments), next to the
  bytes-per-parameter arithmetic (fp32 parameters 4, gradients 4, AdamW 8: 16 per trained
  parameter; the frozen reference in the compute dtype);
- the process's resident memory after the models are built, and the peak of each phase above
  what the process held before it (VmHWM, reset per phase through /proc/self/clear_refs):
  the activations, logits and temporaries of the phase, plus, in the update, the gradients and
  AdamW moments it allocates (reported apart);
- seconds of each phase (wall and CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import time

SHAPES = pathlib.Path(__file__).resolve().parent / "shapes"
GB = 1e9


# ---- the step, in a process of its own (this file run as a script) ---------------------------------

def _rss() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _grad_bytes(model) -> int:
    return _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def _optimizer_bytes(opt) -> int:
    import torch
    return _tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)


def step(args) -> dict:
    """One make_experience + ppo_update of `args.algo` on a synthetic rollout; what it held and took."""
    import torch

    from services.trainer import distributed
    from services.trainer.config import Config
    from services.trainer.experience import Rollout, Sample
    from services.trainer.loop import make_experience, ppo_update
    from services.trainer.state import PPOState

    torch.manual_seed(0)
    n = 4 if args.algo in ("grpo", "rloo") else 1
    work = pathlib.Path(args.work)
    prompts = work / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "unused"}) + "\n")
    config = Config.model_validate(dict(
        policy_addresses=["unused:1"], reward_address="unused:2", sft_model=args.policy, reward_model=args.reward,
        prompts=str(prompts), out=str(work / f"out-{args.algo}"), device="cpu", dtype=args.dtype, seed=0,
        rollout=dict(batch_size=args.batch // n, n=n, max_tokens=args.max_tokens),
        ppo=dict(advantage="gae" if args.algo == "ppo" else args.algo, epochs=1, minibatch_size=args.minibatch,
                 lr=1e-6)))
    before = _rss()["VmRSS"]
    d = distributed.init("cpu", args.dtype)
    state = PPOState.build(config, d)
    built = _rss()["VmRSS"]

    rng = random.Random(0)
    vocab = state.policy.config.vocab_size
    samples = []
    for i in range(args.batch):
        length = args.max_tokens if i % 4 else args.max_tokens // 2  # a quarter of the answers end early
        response = [rng.randrange(vocab) for _ in range(length)]
        samples.append(Sample(f"p{i // n}", [rng.randrange(vocab) for _ in range(args.prompt_tokens)], response, "",
                              [-1.0] * length, "eos", 1, rng.gauss(0, 1)))
    rollout = Rollout(samples, [s.prompt for s in samples], sum(len(s.response_ids) for s in samples),
                      group_sizes=[n] * (args.batch // n))

    phases = {}
    for name, run in (("reference", lambda: make_experience(state, rollout, config, pad_id=0, d=d)),
                      ("train", lambda: ppo_update(state, exp, config, d))):
        _reset_peak()
        start_rss, wall, cpu = _rss()["VmRSS"], time.perf_counter(), time.process_time()
        result = run()
        if name == "reference":
            exp = result
        end = _rss()
        phases[name] = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
                        "peak_above_start": end["VmHWM"] - start_rss, "peak_above_end": end["VmHWM"] - end["VmRSS"],
                        "held_after": end["VmRSS"] - start_rss}
    trained = state.trained()
    components = {
        "policy": {"parameters": sum(p.numel() for p in state.policy.parameters()),
                   "parameter_bytes": _tensor_bytes(state.policy.parameters()),
                   "gradient_bytes": _grad_bytes(state.policy),
                   "optimizer_bytes": _optimizer_bytes(trained["policy"][1])},
        "reference": {"parameters": sum(p.numel() for p in state.reference.parameters()),
                      "parameter_bytes": _tensor_bytes(state.reference.parameters())},
    }
    if state.value is not None:
        components["value"] = {"parameters": sum(p.numel() for p in state.value.parameters()),
                               "parameter_bytes": _tensor_bytes(state.value.parameters()),
                               "gradient_bytes": _grad_bytes(state.value),
                               "optimizer_bytes": _optimizer_bytes(trained["value"][1])}
    distributed.close()
    return {"algo": args.algo, "components": components, "phases": phases, "rss_models_built": built - before,
            "rss_before": before, "peak_rss": _rss()["VmHWM"], "batch": args.batch, "minibatch": args.minibatch,
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "vocab": vocab}


# ---- the orchestration (imported by bench/ppo.py) ---------------------------------------------------

def load_shape(name: str) -> tuple[str, dict]:
    path = pathlib.Path(name) if name.endswith(".json") else SHAPES / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SHAPES.glob("*.json")))
        raise SystemExit(f"--shape {name}: no {path} (known shapes: {known})")
    return path.stem, json.loads(path.read_text())


def build_models(shape: dict, out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The policy (causal LM) and the reward model (one-label classifier) of this shape, random
    weights, saved in the shape's dtype; a built pair is reused."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**shape)
    dtype = getattr(torch, shape.get("torch_dtype", "float32"))
    paths = out / "policy", out / "reward"
    for cls, path, extra in ((AutoModelForCausalLM, paths[0], {}),
                             (AutoModelForSequenceClassification, paths[1], dict(num_labels=1, pad_token_id=0))):
        if (path / "config.json").is_file():
            continue
        print(f"building {path.name} ({cls.__name__}) with random weights ...", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        model = cls.from_config(AutoConfig.for_model(**{**fields, **extra}), dtype=dtype)
        model.save_pretrained(path, safe_serialization=True)
        del model
    return paths


def run_steps(args, work: pathlib.Path, sides: dict[str, pathlib.Path]) -> dict:
    name, shape = load_shape(args.shape)
    models = work / f"shape-{name}"
    policy, reward = build_models(shape, models)
    results: dict[str, dict] = {}
    for side, root in sides.items():
        for algo in args.algo.split(","):
            print(f"{side}: one {algo} step at {name} ...", file=sys.stderr, flush=True)
            out = work / f"shape-{side}-{algo}.json"
            command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--algo", algo, "--policy", str(policy),
                       "--reward", str(reward), "--work", str(models), "--dtype", args.dtype, "--batch",
                       str(args.batch), "--minibatch", str(args.minibatch), "--prompt-tokens", str(args.prompt_tokens),
                       "--max-tokens", str(args.max_tokens), "--out", str(out)]
            env = {**os.environ, "PYTHONPATH": str(root)}
            code = subprocess.run(command, env=env, cwd=root).returncode
            if code != 0:
                raise SystemExit(f"{side}: the {algo} step failed ({code})")
            results.setdefault(algo, {})[side] = json.loads(out.read_text())
    return {"shape": name, "config": shape, "results": results}


def _arithmetic(component: str, c: dict, dtype_bytes: int) -> float:
    """Bytes per parameter: trained fp32 parameters + gradients + AdamW's two moments (16), the
    frozen reference in the compute dtype."""
    return c["parameters"] * (16 if component != "reference" else dtype_bytes)


def print_steps(result: dict, args) -> None:
    shape = result["config"]
    print(f"The trainer's step at {result['shape']}'s shape (hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, tied embeddings: "
          f"{shape.get('tie_word_embeddings', False)}), random weights, on a synthetic rollout: {args.batch} "
          f"completions of {args.prompt_tokens} prompt + up to "
          f"{args.max_tokens} response tokens, minibatches of {args.minibatch}, one epoch, dtype {args.dtype}, CPU\n")
    dtype_bytes = 2 if args.dtype == "bfloat16" else 4
    for algo, sides in result["results"].items():
        names = list(sides)
        print(f"== {algo}" + (f" ({' | '.join(names)})" if len(names) > 1 else ""))
        first = sides[names[0]]
        print(f"{'component':12s} {'parameters':>12s} {'arithmetic GB':>14s} {'held GB':>10s}   (parameters + "
              "gradients + AdamW moments, after the step)")
        for component, c in first["components"].items():
            held = c["parameter_bytes"] + c.get("gradient_bytes", 0) + c.get("optimizer_bytes", 0)
            print(f"{component:12s} {c['parameters'] / 1e6:11.1f}M {_arithmetic(component, c, dtype_bytes) / GB:14.2f} "
                  f"{held / GB:10.2f}")
        rows = [("models built (RSS growth, GB)", lambda r: r["rss_models_built"] / GB)]
        for phase in ("reference", "train"):
            rows += [(f"{phase}: seconds", lambda r, p=phase: r["phases"][p]["seconds"]),
                     (f"{phase}: CPU seconds", lambda r, p=phase: r["phases"][p]["cpu_seconds"]),
                     (f"{phase}: peak above its start (GB)",
                      lambda r, p=phase: r["phases"][p]["peak_above_start"] / GB),
                     (f"{phase}: of it transient (GB)",
                      lambda r, p=phase: r["phases"][p]["peak_above_end"] / GB)]
        rows += [("process peak RSS (GB)", lambda r: r["peak_rss"] / GB)]
        print(f"\n{'per step':40s}" + "".join(f"{n:>14s}" for n in names) + ("    ratio" if len(names) == 2 else ""))
        for label, get in rows:
            values = [get(sides[n]) for n in names]
            ratio = f" {values[0] / values[1]:8.3f}" if len(values) == 2 and values[1] else ""
            print(f"{label:40s}" + "".join(f"{v:14.3f}" for v in values) + ratio)
        print()


def main() -> int:
    parser = argparse.ArgumentParser(description="one PPO/GRPO step of the trainer (a process of its own)")
    parser.add_argument("--algo", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--minibatch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pathlib.Path(args.out).write_text(json.dumps(step(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
