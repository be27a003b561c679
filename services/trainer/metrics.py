"""Where a PPO step's numbers go: Prometheus, a JSONL log, and PNG plots at the end."""
from __future__ import annotations

import json
import pathlib

from prometheus_client import Counter, Gauge, Histogram

STEP = Gauge("rlhf_trainer_step", "Last finished PPO step.")
WEIGHT_VERSION = Gauge("rlhf_trainer_weight_version", "Weight version last pushed to the policy replicas.")
REPLICAS_IN_SYNC = Gauge("rlhf_trainer_replicas_in_sync", "Policy replicas serving the trainer's weight version.")
GAUGES = {key: Gauge(f"rlhf_trainer_{key}", help) for key, help in [
    ("reward_mean", "Mean reward-model score of the step's completions."),
    ("kl", "Mean per-sequence KL(policy || reference), nats."),
    ("entropy", "Mean per-token policy entropy, nats."),
    ("clip_fraction", "Share of tokens whose probability ratio was clipped."),
    ("approx_kl", "Approximate KL between the policy before and after the step."),
    ("policy_loss", "PPO clipped surrogate loss."),
    ("value_loss", "Clipped value loss."),
    ("beta", "KL coefficient."),
    ("tokens_per_second", "Generated tokens per second of step wall time."),
    ("logprob_gap", "Mean |trainer logprob - policy service logprob| per token: engine mismatch or stale weights."),
]}
STEP_SECONDS = Histogram("rlhf_trainer_step_seconds", "Seconds per PPO step phase.", ["phase"],
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
DROPPED = Counter("rlhf_trainer_completions_dropped_total", "Completions dropped because their weight version was off.")
RESYNCS = Counter("rlhf_trainer_replica_resyncs_total", "Pushes made to bring a restarted or stale replica back.")


def export(m: dict) -> None:
    STEP.set(m["step"])
    WEIGHT_VERSION.set(m["pushed_version"])
    for key, gauge in GAUGES.items():
        gauge.set(m[key])
    for phase, seconds in m["phase_seconds"].items():
        STEP_SECONDS.labels(phase).observe(seconds)
    DROPPED.inc(m["completions_dropped"])


def append_jsonl(path: pathlib.Path, m: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(m) + "\n")


def plot(history: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    """reward.png, kl.png, entropy.png, clip_fraction.png and phases.png from the step history."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    paths = []
    for key, label in [("reward_mean", "mean reward-model score"), ("kl", "KL(policy || SFT), nats / sequence"),
                       ("entropy", "entropy, nats / token"), ("clip_fraction", "clip fraction")]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [m[key] for m in history], marker=".")
        ax.set_xlabel("PPO step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / f"{key.replace('_mean', '')}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    phases = list(history[0]["phase_seconds"]) if history else []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(steps)
    for phase in phases:
        values = [m["phase_seconds"].get(phase, 0.0) for m in history]
        ax.bar(steps, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("PPO step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "phases.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
