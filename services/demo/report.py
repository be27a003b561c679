"""The demo's report: a table, answer-kind shares before and after PPO, sample answers,
and the plots (reward and KL per step from the trainer; shares here)."""
from __future__ import annotations

import pathlib

KINDS = ("clear", "long", "vague", "other")


def summary(e: dict) -> str:
    return (f"clear {e['shares']['clear']:.2f} long {e['shares']['long']:.2f} vague {e['shares']['vague']:.2f} "
            f"other {e['shares']['other']:.2f} | reward {e['reward_mean']:.2f} | KL {e['kl']:.2f} | n {e['n']}")


def _columns(results: dict) -> list[tuple[str, dict]]:
    return [(label, results[key]) for key, label in
            (("sft", "SFT"), ("ppo", "PPO"), ("ppo-no-kl", "PPO, beta = 0")) if key in results]


def table(results: dict) -> str:
    cols = _columns(results)
    lines = ["| | " + " | ".join(label for label, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for kind in KINDS:
        lines.append(f"| {kind} share | " + " | ".join(f"{e['shares'][kind]:.2f}" for _, e in cols) + " |")
    lines.append("| mean reward-model score | " + " | ".join(f"{e['reward_mean']:.2f}" for _, e in cols) + " |")
    lines.append("| KL to SFT (nats / answer) | " + " | ".join(f"{e['kl']:.2f}" for _, e in cols) + " |")
    lines.append("| mean answer length (tokens) | " + " | ".join(f"{e['length']:.1f}" for _, e in cols) + " |")
    lines.append("| answers judged | " + " | ".join(str(e["n"]) for _, e in cols) + " |")
    return "\n".join(lines)


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
        f"Answers sampled at temperature 1 on held-out prompts, labelled by the gold labeller; PPO with beta = {beta}.",
        "", table(results), "",
        "![reward per step](ppo/reward.png) ![KL per step](ppo/kl.png)", "",
        "![answer kinds before and after](shares.png)", "",
        f"## Sample answers to \"{example_prompt}\"", "",
    ]
    for label, e in _columns(results):
        lines.append(f"**{label}**")
        lines.append("")
        for row in [r for r in e["rows"] if r["prompt"] == example_prompt][:3]:
            lines.append(f"- ({row['kind']}, score {row['score']:.2f}) {row['text']!r}")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
