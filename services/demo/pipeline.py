"""`rlhf demo`: the whole pipeline on the embedded tiny model, on CPU, in minutes.

    demo data -> tiny models -> SFT -> reward model -> reward + policy services (child
    processes) -> evaluate SFT -> PPO against the services -> evaluate PPO -> report.md + plots

With --feedback-loop, one more run: people in the loop (services/demo/feedback_loop.py).

Every child is stopped on the way out, also on Ctrl-C, SIGTERM or an error.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import signal
import sys
import time

log = logging.getLogger("rlhf.demo")

EXAMPLE_PROMPT = "How do I prepare for my calculus exam?"


# The demo's tuned values: a tiny model from random init learns at learning rates that would
# wreck a real one (the library's defaults in services.trainer.config are for real models).
# SFT: well-formed answers of all three kinds in ~1-2 min on 2 CPU cores; RM: eval accuracy at
# the noise ceiling in about a minute.
SFT = dict(epochs=4.0, lr=3e-3, batch_size=32, max_length=256, warmup_ratio=0.05, eval_fraction=0.1, device="cpu")
RM = dict(epochs=1.0, lr=1e-3, batch_size=32, max_length=256, warmup_ratio=0.05, eval_fraction=0.1, device="cpu")
PPO = dict(rollout=dict(batch_size=64, max_tokens=64, temperature=1.0),
           ppo=dict(epochs=2, minibatch_size=16, lr=3e-5, value_lr=1e-4, vf_coef=0.5, missing_eos_penalty=1.0,
                    normalize_scores=True, score_clip=5.0))
# The critic-free runs sample the same 64 completions a step (GRPO and RLOO as 16 prompts x 4);
# without a critic to lag behind, the policy takes a larger learning rate. Measured here (30
# steps, one policy replica, 2 busy cores): clear share 0.85 (GRPO), 0.91 (RLOO), 0.91
# (REINFORCE++) against PPO's 0.83, in 0.4-0.6 of its wall time.
ALGOS = {
    "ppo": {},
    "grpo": dict(rollout=dict(batch_size=16, n=4), ppo=dict(advantage="grpo", lr=6e-5)),
    "rloo": dict(rollout=dict(batch_size=16, n=4), ppo=dict(advantage="rloo", lr=6e-5)),
    "reinforce_pp": dict(ppo=dict(advantage="reinforce_pp", lr=6e-5)),
}
# one_step_off: the next step's rollout runs while this one trains (services.max_staleness 1).
MODES = {"sync": {}, "one_step_off": dict(rollout=dict(mode="one_step_off"), services=dict(max_staleness=1))}


def run_name(algo: str, mode: str) -> str:
    return algo if mode == "sync" else f"{algo}-{mode}"


def ppo_config(out: pathlib.Path, *, policy: str, reward: str, models: pathlib.Path, prompts: pathlib.Path,
               steps: int, seed: int, beta: float, algo: str = "ppo", mode: str = "sync"):
    from services.trainer.config import Config
    variant, overlap = ALGOS[algo], MODES[mode]
    return Config.model_validate(dict(
        policy_addresses=[policy], reward_address=reward, sft_model=str(models / "sft"),
        reward_model=str(models / "reward"), prompts=str(prompts), out=str(out), steps=steps, seed=seed,
        checkpoint_every=0, device="cpu",
        rollout={**PPO["rollout"], **variant.get("rollout", {}), **overlap.get("rollout", {})},
        ppo={**PPO["ppo"], "beta": beta, **variant.get("ppo", {})}, services=overlap.get("services", {})))


def deployed_cpus(modes) -> tuple[list[int], list[int]] | None:
    """(the services' CPUs, the trainer's) when the runs compare rollout modes: generation on one
    CPU, training (one torch thread) on another, as on a GPU node where they run on different
    devices. Both modes then run in that layout. On 2 shared cores the two compute-bound halves
    would otherwise slow each other down instead of overlapping (docs/training.md). None with a
    single mode or fewer than 2 CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if "one_step_off" not in modes or len(cpus) < 2:
        return None
    return cpus[:1], cpus[1:2]


@contextlib.contextmanager
def trainer_on(cpus: list[int] | None):
    """This process (the trainer) on `cpus` with one torch thread, for the with block."""
    import torch

    from services.demo.launch import pin

    if not cpus:
        yield
        return
    everything, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    pin(os.getpid(), cpus)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        pin(os.getpid(), everything)
        torch.set_num_threads(threads)


def stage(n: int, total: int, what: str) -> float:
    log.info("[%d/%d] %s", n, total, what)
    return time.perf_counter()


def main(args) -> int:
    choices = {}
    for flag, value, known in (("--algo", args.algo, ALGOS), ("--mode", args.mode, MODES)):
        choices[flag] = [v.strip() for v in value.split(",") if v.strip()]
        if not choices[flag] or set(choices[flag]) - set(known):
            print(f"rlhf demo: {flag} takes {', '.join(known)} (comma-separated), got {value!r}", file=sys.stderr)
            return 2
    if args.feedback_loop and "ppo" not in choices["--algo"]:
        print("rlhf demo: --feedback-loop is compared with the plain PPO run: keep ppo in --algo", file=sys.stderr)
        return 2
    run_demo(pathlib.Path(args.out), seed=args.seed, steps=args.steps, with_no_kl=args.with_no_kl, quick=args.quick,
             algos=choices["--algo"], modes=choices["--mode"], feedback_loop=args.feedback_loop)
    return 0


def run_stats(out: pathlib.Path, history, wall: float) -> dict:
    """What the report's table shows of a run besides the evaluation."""
    import numpy as np

    ranks = json.loads((out / "ranks.json").read_text())
    return dict(seconds=wall, seconds_per_step=wall / max(len(history), 1),
                # what training adds: the trained weights, their gradients and AdamW moments (the
                # frozen reference, in state_bytes too, is the same for every algorithm)
                state_mb=sum(r["trained_bytes"] for r in ranks) / 1e6,
                staleness=float(np.mean([sum(int(k) * v for k, v in m.staleness.items()) / m.completions
                                         for m in history])),
                is_weight=float(np.mean([m.is_weight_mean for m in history])),
                hidden=float(np.mean([m.rollout_hidden for m in history])))


def run_demo(out: pathlib.Path, *, seed: int = 0, steps: int | None = None, with_no_kl: bool = False,
             quick: bool = False, algos: list[str] = ("ppo",), modes: list[str] = ("sync",),
             feedback_loop: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.config import ClientConfig
    from services.demo.launch import ChildServer, free_port, rlhf_command
    from services.demo import evaluate, report
    from services.demo.report import label
    from services.demo.data import write_demo_data
    from services.demo.tiny_model import build_model
    from services.policy.client import PolicyClient
    from services.reward.client import RewardClient
    from services.trainer.config import RMConfig, SFTConfig
    from services.trainer.rm import train_reward_model
    from services.trainer.loop import train
    from services.trainer.sft import train_sft

    started = time.perf_counter()
    steps = steps or (20 if quick else 30)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    runs = [(run_name(algo, mode), algo, mode, 0.05) for algo in algos for mode in modes]
    runs += [("ppo-no-kl", "ppo", "sync", 0.0)] if with_no_kl else []
    total = 6 + len(runs) + feedback_loop

    stage(1, total, "demo data and tiny models")
    paths = write_demo_data(out / "data", seed=seed)
    models = out / "models"
    build_model("policy", models / "init-policy", seed=seed)
    build_model("reward", models / "init-reward", seed=seed)

    t = stage(2, total, "supervised fine-tuning (stage 1)")
    sft = train_sft(SFTConfig(model=str(models / "init-policy"), data=str(paths["sft"]), out=str(models / "sft"),
                              seed=seed, **SFT))
    log.info("SFT done in %.0f s: %s", time.perf_counter() - t, {k: sft[k] for k in sft if "loss" in k})

    t = stage(3, total, "reward model (stage 2)")
    rm = train_reward_model(RMConfig(model=str(models / "init-reward"), data=str(paths["prefs"]),
                                     out=str(models / "reward"), seed=seed, **RM))
    log.info("reward model done in %.0f s: eval accuracy %.3f (noise ceiling %.2f)", time.perf_counter() - t,
             rm["eval_accuracy"], rm["noise_ceiling"])

    eval_prompts = [json.loads(line)["prompt"] for line in open(paths["prompts"])
                    if json.loads(line)["split"] == "eval"]
    eval_prompts = [EXAMPLE_PROMPT] + [p for p in eval_prompts if p != EXAMPLE_PROMPT][:(24 if quick else 49)]
    samples = 8
    results: dict = {"rm": rm, "sft_train": sft}

    # SIGTERM ends the demo like Ctrl-C: through the finally blocks that stop the children.
    def interrupt(*_):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with contextlib.ExitStack() as stack:
            layout = deployed_cpus(modes)
            stage(4, total, "starting the reward and policy services"
                  + (f" on CPU {layout[0]}, the trainer on CPU {layout[1]}" if layout else ""))
            server_cpus = layout[0] if layout else None
            server_env = {"OMP_NUM_THREADS": "1"} if layout else {}  # one torch thread on its one CPU
            reward_port, policy_port = free_port(), free_port()
            # --feedback-loop swaps a refreshed reward model in from under models/ (LoadModel).
            swappable = ("--model-root", str(models.resolve())) if feedback_loop else ()
            reward_srv = ChildServer(rlhf_command("serve", "reward", "--model", str(models / "reward"),
                                                  "--host", "127.0.0.1", "--port", str(reward_port),
                                                  "--metrics-port", "0", *swappable),
                                     port=reward_port, service="rlhf.v1.RewardService",
                                     log_path=out / "logs" / "reward.log", cpus=server_cpus, env=server_env)
            policy_srv = ChildServer(rlhf_command("serve", "policy", "--model", str(models / "sft"),
                                                  "--host", "127.0.0.1", "--port", str(policy_port),
                                                  "--metrics-port", "0", "--kv-cache-gib", "1"),
                                     port=policy_port, service="rlhf.v1.PolicyService",
                                     log_path=out / "logs" / "policy.log", cpus=server_cpus,
                                     env={"VLLM_CPU_KVCACHE_SPACE": "1", **server_env})
            for server in (reward_srv, policy_srv):
                stack.callback(server.terminate)
                server.start()
            for server in (reward_srv, policy_srv):
                server.wait_ready()
            policy = stack.enter_context(PolicyClient(policy_srv.address, ClientConfig(), timeout=300))
            reward = stack.enter_context(RewardClient(reward_srv.address, ClientConfig(), timeout=300))
            tokenizer = AutoTokenizer.from_pretrained(models / "sft")
            sft_model = AutoModelForCausalLM.from_pretrained(models / "sft", dtype=torch.float32).eval()
            judge = lambda: evaluate.evaluate(policy, reward, tokenizer, sft_model, eval_prompts,  # noqa: E731
                                              samples_per_prompt=samples, max_tokens=64, seed=seed)

            stage(5, total, f"evaluating the SFT policy on {len(eval_prompts)} held-out prompts x {samples}")
            results["sft"] = judge()
            log.info("SFT policy: %s", report.summary(results["sft"]))

            for i, (name, algo, mode, beta) in enumerate(runs):
                t = stage(6 + i, total, f"{label(name)} (stage 3), beta = {beta}, {steps} steps, against the "
                                        f"live services")
                config = ppo_config(out / name, policy=policy_srv.address, reward=reward_srv.address,
                                    models=models, prompts=paths["prompts"], steps=steps, seed=seed, beta=beta,
                                    algo=algo, mode=mode)
                with trainer_on(layout[1] if layout else None):
                    history = train(config, ClientConfig(), handle_signals=False)
                wall = time.perf_counter() - t
                results[f"{name}_history"] = history
                results[name] = judge()
                results[name]["run"] = run_stats(out / name, history, wall)
                log.info("%s done in %.0f s: %s", name, wall, report.summary(results[name]))

            if feedback_loop:  # last: it swaps the reward model the runs above were scored by
                from services.demo import feedback_loop as people

                name = "ppo-feedback"
                t = stage(total - 1, total, f"{label(name)}: PPO, people (the gold labeller) judge the policy's "
                                            f"answers, the reward model is refreshed and swapped in, PPO goes on")
                config_for = lambda n: ppo_config(out / name, policy=policy_srv.address,  # noqa: E731
                                                  reward=reward_srv.address, models=models, prompts=paths["prompts"],
                                                  steps=n, seed=seed, beta=0.05)
                loop = people.run(out, config_for=config_for, policy=policy, reward=reward,
                                  reward_address=reward_srv.address, policy_address=policy_srv.address,
                                  models=models, paths=paths,
                                  eval_prompts=eval_prompts, steps=steps, seed=seed, quick=quick,
                                  rm_settings={k: v for k, v in RM.items() if k != "epochs"} | {"epochs": 2.0})
                wall = time.perf_counter() - t
                results[f"{name}_history"] = loop["history"]
                results["feedback_loop"] = loop["summary"]
                results[name] = judge()
                results[name]["run"] = run_stats(out / name, loop["history"], wall)
                # seconds per PPO step: without the labelling, the refresh and the measurements between the halves
                results[name]["run"]["seconds_per_step"] = ((wall - loop["summary"]["seconds_between_halves"])
                                                            / max(len(loop["history"]), 1))
                log.info("%s done in %.0f s: %s", name, wall, report.summary(results[name]))
    finally:
        signal.signal(signal.SIGTERM, previous)

    stage(total, total, "report")
    results["seconds"] = time.perf_counter() - started
    path = report.write(out, results, beta=0.05, example_prompt=EXAMPLE_PROMPT)
    summary = {k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if isinstance(v, dict) else v)
               for k, v in results.items() if not k.endswith("_history")}
    summary["max_kl"] = {name: max((m.kl for m in results[f"{name}_history"]), default=0.0)
                         for name in [r[0] for r in runs] + (["ppo-feedback"] if feedback_loop else [])}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(report.table(results))
    print(f"\nreport: {path}  ({results['seconds']:.0f} s)")
    return results
