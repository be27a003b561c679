"""What a PPO step did (StepMetrics), and where it goes: Prometheus, a JSONL log, PNG plots."""
from __future__ import annotations

import dataclasses
import json
import pathlib

from prometheus_client import Counter, Gauge, Histogram


@dataclasses.dataclass
class StepMetrics:
    """One finished step. Means are over the step's whole batch (all ranks)."""
    step: int
    weight_version: int  # the version the step's completions were sampled with
    pushed_version: int  # the version the step pushed
    time: float  # unix seconds at the end of the step
    reward_mean: float  # mean score from the reward service, as returned
    reward_components: dict[str, float]  # mean of each reward component ("rm", then the reward functions)
    score_mean: float  # mean score after normalisation, clipping and the EOS penalty (what PPO optimises)
    kl: float  # mean per-sequence KL(policy || reference), nats
    entropy: float  # mean per-token policy entropy, nats
    clip_fraction: float
    approx_kl: float  # between the policy before and after the update
    policy_loss: float
    value_loss: float  # 0 without a critic
    kl_loss: float  # the KL term of the loss (ppo.kl_in loss), 0 when the KL shapes the reward
    beta: float  # KL coefficient used this step
    tokens_per_second: float  # generated tokens per second of step wall time
    logprob_gap: float  # mean |trainer logprob - sampler logprob| per token: engine mismatch or stale weights
    completions: int  # trained on
    completions_dropped: int  # sampled by other weights beyond services.max_staleness
    completions_empty: int  # EOS at once: nothing to score
    completions_trimmed: int  # cut so that the batch splits into whole minibatches
    generated_tokens: int
    missing_eos_share: float  # completions cut at max_tokens
    response_length: float  # mean tokens per trained completion
    replica_resyncs: int  # pushes so far that brought a restarted or stale replica back
    trained_versions: list[int]  # weight versions of the completions trained on
    staleness: dict[str, int]  # completions trained on, by how many versions behind the weights they were trained with
    is_weight_mean: float  # of min(pi_old / pi_sampler, is_cap) over tokens (1 without the correction)
    is_weight_max: float
    is_capped_share: float  # tokens whose weight hit ppo.is_cap
    rollout_seconds: float  # generating and scoring the step's completions took
    rollout_hidden: float  # share of rollout_seconds spent while the trainer trained (one_step_off)
    prompts_sha: str  # of the step's prompts: resume repeats or skips none
    phase_seconds: dict[str, float]  # generate, score, reference, train, push
    # (defaults: a checkpoint's history from before these fields still loads)
    reward_version: str = ""  # the reward model version of every score in the step (one: never two in one step)
    reward_versions: dict[str, int] = dataclasses.field(default_factory=dict)  # scores by the version that made
    # them first (two or more: the reward service swapped its model while the step was scored)
    completions_rescored: int = 0  # scored again by reward_version: another version had scored them
    completions_dropped_reward_version: int = 0  # left out: the reward model kept changing while they were rescored
    push: dict[str, float] = dataclasses.field(default_factory=dict)  # the step's weight push (push.PushStats)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


STEP = Gauge("rlhf_trainer_step", "Last finished PPO step.")
STEPS = Counter("rlhf_trainer_steps_total", "PPO steps finished by this process.")
WEIGHT_VERSION = Gauge("rlhf_trainer_weight_version", "Weight version last pushed to the policy replicas.")
REPLICAS_IN_SYNC = Gauge("rlhf_trainer_replicas_in_sync", "Policy replicas serving the trainer's weight version.")
GAUGES = {key: Gauge(f"rlhf_trainer_{key}", help) for key, help in [
    ("reward_mean", "Mean score of the step's completions, as the reward service returned it."),
    ("kl", "Mean per-sequence KL(policy || reference), nats."),
    ("entropy", "Mean per-token policy entropy, nats."),
    ("clip_fraction", "Share of tokens whose probability ratio was clipped."),
    ("approx_kl", "Approximate KL between the policy before and after the step."),
    ("policy_loss", "PPO clipped surrogate loss."),
    ("value_loss", "Clipped value loss."),
    ("beta", "KL coefficient."),
    ("logprob_gap", "Mean |trainer logprob - policy service logprob| per token: engine mismatch or stale weights."),
    ("is_weight_mean", "Mean truncated importance weight pi_old / pi_sampler over tokens."),
    ("is_weight_max", "Largest truncated importance weight of the step."),
    ("is_capped_share", "Share of tokens whose importance weight hit ppo.is_cap."),
    ("rollout_hidden", "Share of the step's rollout time hidden behind training (one_step_off)."),
]}
STALENESS = Histogram("rlhf_trainer_completion_staleness", "Weight versions between a trained completion's sampler "
                      "and the trainer.", buckets=(0, 1, 2, 3, 5, 10))
REWARD_COMPONENTS = Gauge("rlhf_trainer_reward_component", "Mean value of each reward component in the step.",
                          ["component"])
GENERATED_TOKENS = Counter("rlhf_trainer_generated_tokens_total", "Tokens generated for the trainer (rate() gives tokens/s).")
STEP_SECONDS = Histogram("rlhf_trainer_step_seconds", "Seconds per PPO step phase.", ["phase"],
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
DROPPED = Counter("rlhf_trainer_completions_dropped_total", "Completions sampled but not trained on, by reason "
                  "(stale: other weights; empty: nothing to score; trim: past the last whole minibatch; "
                  "reward_version: the reward model kept changing while they were scored).", ["reason"])
RESCORED = Counter("rlhf_trainer_completions_rescored_total", "Completions scored again because another reward model "
                   "version had scored them than the rest of their step.")
REWARD_VERSION = Gauge("rlhf_trainer_reward_model_info", "1 for the reward model version of the last step's scores.",
                       ["model_version"])
RESYNCS = Counter("rlhf_trainer_replica_resyncs_total", "Pushes made to bring a restarted or stale replica back.")
PUSHES = Counter("rlhf_trainer_weight_pushes_total", "Weight pushes to one replica, by result.", ["result"])
PUSH_WIRE_BYTES = Counter("rlhf_trainer_push_wire_bytes_total", "Bytes the trainer sent pushing weights (its egress).")
PUSH_PAYLOAD_BYTES = Counter("rlhf_trainer_push_payload_bytes_total", "Payload bytes of the weight pushes (tensor "
                             "bytes or delta entries).")
PUSH_CHANGED_SHARE = Gauge("rlhf_trainer_push_changed_share", "Share of the weight elements whose served bits the "
                           "last push changed.")
PUSH_PHASE_SECONDS = Histogram("rlhf_trainer_push_phase_seconds", "Seconds of a weight push by phase (gather, "
                               "encode, send, stage, apply, commit).", ["phase"],
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
PUSH_SECONDS = Histogram("rlhf_trainer_push_to_all_seconds", "Seconds from a push's first byte to every replica's "
                         "answer (and the commit).", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
PUSH_PAYLOAD_RATE = Gauge("rlhf_trainer_push_payload_bytes_per_second", "Payload bytes per second of the last push's "
                          "streams (compare with loopback or link bandwidth: bench/policy.py).")
CANARY_VERDICTS = Counter("rlhf_trainer_canary_verdicts_total", "Canary verdicts on pushed versions.", ["verdict"])
CANARY_KL = Gauge("rlhf_trainer_canary_kl", "Mean per-token KL(v-1 || v) on the canary's probes, last verdict.")
CANARY_SCORE = Gauge("rlhf_trainer_canary_score", "Mean probe score on the canary, last verdict: before and after "
                     "the push.", ["when"])


def export(m: StepMetrics, replicas_in_sync: int, new_resyncs: int) -> None:
    STEP.set(m.step)
    STEPS.inc()
    WEIGHT_VERSION.set(m.pushed_version)
    REPLICAS_IN_SYNC.set(replicas_in_sync)
    for key, gauge in GAUGES.items():
        gauge.set(getattr(m, key))
    GENERATED_TOKENS.inc(m.generated_tokens)
    for name, value in m.reward_components.items():
        REWARD_COMPONENTS.labels(name).set(value)
    for behind, n in m.staleness.items():
        for _ in range(n):
            STALENESS.observe(int(behind))
    for phase, seconds in m.phase_seconds.items():
        STEP_SECONDS.labels(phase).observe(seconds)
    for reason, n in (("stale", m.completions_dropped), ("empty", m.completions_empty),
                      ("trim", m.completions_trimmed), ("reward_version", m.completions_dropped_reward_version)):
        DROPPED.labels(reason).inc(n)
    RESCORED.inc(m.completions_rescored)
    REWARD_VERSION.clear()
    REWARD_VERSION.labels(m.reward_version).set(1)
    RESYNCS.inc(new_resyncs)
    if m.push:
        PUSH_WIRE_BYTES.inc(m.push["wire_bytes"])
        PUSH_PAYLOAD_BYTES.inc(m.push["payload_bytes"])
        PUSH_CHANGED_SHARE.set(m.push["changed_share"])
        PUSH_SECONDS.observe(m.push["to_all_seconds"])
        for phase in ("gather", "encode", "send", "stage", "apply", "commit"):
            PUSH_PHASE_SECONDS.labels(phase).observe(m.push[f"{phase}_seconds"])
        if m.push["to_all_seconds"] > 0:
            PUSH_PAYLOAD_RATE.set(m.push["payload_bytes"] / m.push["to_all_seconds"])


def export_verdict(v) -> None:
    """A canary verdict (services.trainer.canary.Verdict)."""
    CANARY_VERDICTS.labels("pass" if v.passed else "fail").inc()
    if v.kl == v.kl:  # not NaN: the canary could be probed
        CANARY_KL.set(v.kl)
        CANARY_SCORE.labels("before").set(v.score_before)
        CANARY_SCORE.labels("after").set(v.score_after)


def append_jsonl(path: pathlib.Path, m: StepMetrics) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(m.to_json()) + "\n")


def plot(history: list[StepMetrics], out: pathlib.Path) -> list[pathlib.Path]:
    """reward.png, kl.png, entropy.png, clip_fraction.png and phases.png from the step history."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m.step for m in history]
    paths = []
    for key, label in [("reward_mean", "mean reward"), ("kl", "KL(policy || SFT), nats / sequence"),
                       ("entropy", "entropy, nats / token"), ("clip_fraction", "clip fraction")]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [getattr(m, key) for m in history], marker=".")
        ax.set_xlabel("PPO step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / f"{key.replace('_mean', '')}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    phases = list(history[0].phase_seconds) if history else []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(steps)
    for phase in phases:
        values = [m.phase_seconds.get(phase, 0.0) for m in history]
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
