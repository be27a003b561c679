"""The demo's report: a table, answer-kind shares before and after PPO, sample answers,
and the plots (reward and KL per step from the trainer; shares here)."""
from __future__ import annotations

import pathlib

KINDS = ("clear", "long", "vague", "other")
LABELS = {"sft": "SFT", "ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++",
          "ppo-no-kl": "PPO, beta = 0", "ppo-feedback": "PPO + feedback loop"}


def label(name: str) -> str:
    algo, _, mode = name.partition("-")
    return LABELS.get(name) or f"{LABELS[algo]}, {mode.replace('_', '-')}"


def summary(e: dict) -> str:
    return (f"clear {e['shares']['clear']:.2f} long {e['shares']['long']:.2f} vague {e['shares']['vague']:.2f} "
            f"other {e['shares']['other']:.2f} | reward {e['reward_mean']:.2f} | KL {e['kl']:.2f} | n {e['n']}")


def _columns(results: dict) -> list[tuple[str, dict]]:
    names = ["sft"] + [key.removesuffix("_history") for key in results if key.endswith("_history")]
    return [(label(name), results[name]) for name in names if name in results]


def table(results: dict) -> str:
    cols = _columns(results)
    lines = ["| | " + " | ".join(label for label, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for kind in KINDS:
        lines.append(f"| {kind} share | " + " | ".join(f"{e['shares'][kind]:.2f}" for _, e in cols) + " |")
    lines.append("| mean reward-model score | " + " | ".join(f"{e['reward_mean']:.2f}" for _, e in cols) + " |")
    lines.append("| KL to SFT (nats / answer) | " + " | ".join(f"{e['kl']:.2f}" for _, e in cols) + " |")
    lines.append("| mean answer length (tokens) | " + " | ".join(f"{e['length']:.1f}" for _, e in cols) + " |")
    lines.append("| answers judged | " + " | ".join(str(e["n"]) for _, e in cols) + " |")
    for key, label, fmt in (("seconds", "wall time of the run (s)", "{:.0f}"),
                            ("seconds_per_step", "seconds per step", "{:.2f}"),
                            ("state_mb", "trained state (MB: trained weights, gradients, AdamW)", "{:.1f}"),
                            ("staleness", "mean staleness of trained completions (versions)", "{:.2f}"),
                            ("is_weight", "mean importance weight", "{:.3f}"),
                            ("hidden", "share of the rollout hidden behind training", "{:.2f}")):
        lines.append(f"| {label} | " + " | ".join(fmt.format(e["run"][key]) if "run" in e else "-"
                                                    for _, e in cols) + " |")
    return "\n".join(lines)


def feedback_section(loop: dict) -> list[str]:
    """--feedback-loop: what people (the gold labeller) did to the reward model."""
    refresh, swap = loop["refresh"], loop["swap"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return [
        "## People in the loop", "",
        f"After {loop['steps_before_refresh']} PPO steps, two simulated people (the gold labeller, each wrong one "
        f"time in ten) judged {loop['judgments']} pairs of the policy's answers through the feedback service's API "
        f"({loop['labelling_seconds']:.0f} s; {', '.join(f'{k} {v}' for k, v in loop['choices'].items())}). They "
        f"agreed with each other on {fmt(loop['labeller_agreement'])} of {loop['labeller_comparisons']} pairs judged "
        f"twice (ties included); the served reward model agreed with their choices of an answer on "
        f"{fmt(loop['served_rm_vs_people'])}. The reward model "
        f"was refreshed from the judgments with a replay of the old comparisons ({loop['refresh_seconds']:.0f} s) "
        f"and loaded into the running reward service without a restart (LoadModel, {swap['load_seconds']:.1f} s: "
        f"version {swap['previous_version']} -> {swap['model_version']}); PPO went on against it.", "",
        "| | before the refresh | after |", "|---|---|---|",
        f"| reward model agrees with the gold labeller on the policy's current answers ({loop['eval_pairs']} pairs) "
        f"| {fmt(loop['agreement_before'])} | {fmt(loop['agreement_after'])} |",
        f"| held-out accuracy on the new judgments | {fmt(refresh['init_eval_accuracy_new'])} "
        f"| {fmt(refresh['eval_accuracy_new'])} |",
        f"| held-out accuracy on the old comparisons | {fmt(refresh['init_eval_accuracy_old'])} "
        f"| {fmt(refresh['eval_accuracy_old'])} |",
        f"| noise ceiling: the people's agreement where both preferred an answer | {fmt(refresh['noise_ceiling'])} "
        f"| |", "",
    ]


def plot_shares(results: dict, path: pathlib.Path) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _columns(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(cols)
    for j, (label, e) in enumerate(cols):
        ax.bar([i + j * width for i in range(len(KINDS))], [e["shares"][k] for k in KINDS], width, label=label)
    ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(KINDS))], KINDS)
    ax.set_ylabel("share of answers (gold labeller)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out: pathlib.Path, results: dict, *, beta: float, example_prompt: str) -> pathlib.Path:
    plot_shares(results, out / "shares.png")
    rm = results["rm"]
    lines = [
        "# RLHF demo report", "",
        f"Whole pipeline in {results['seconds']:.0f} s. Reward model: held-out pairwise accuracy "
        f"{rm['eval_accuracy']:.3f} against a noise ceiling of {rm['noise_ceiling']:.2f}.", "",
        f"Answers sampled at temperature 1 on held-out prompts, labelled by the gold labeller; KL coefficient "
        f"beta = {beta}.", "", table(results), "",
        *[f"![{name} reward per step]({name}/reward.png) ![{name} KL per step]({name}/kl.png)"
          for name in results if f"{name}_history" in results], "",
        "![answer kinds before and after](shares.png)", "",
        f"## Sample answers to \"{example_prompt}\"", "",
    ]
    for label, e in _columns(results):
        lines.append(f"**{label}**")
        lines.append("")
        for row in [r for r in e["rows"] if r["prompt"] == example_prompt][:3]:
            lines.append(f"- ({row['kind']}, score {row['score']:.2f}) {row['text']!r}")
        lines.append("")
    if "feedback_loop" in results:
        lines += feedback_section(results["feedback_loop"])
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
