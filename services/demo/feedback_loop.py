"""`rlhf demo --feedback-loop`: people in the loop, played by the gold labeller.

    PPO for half the steps -> the feedback service (a child `rlhf serve feedback` over the live
    policy and reward services) -> two simulated people judge pairs of the current policy's answers
    through its JSON API -> `train rm --init` on those judgments plus a replay of the old
    comparisons -> the new reward model into the running reward service (LoadModel) -> PPO
    resumes for the other half

The reward model's agreement with the gold labeller is measured on one fixed set of pairs of the
policy's answers (held-out prompts) right before the refresh and right after the swap, so the two
numbers differ only by the reward model. Each simulated person picks the worse answer one time in
ten (FLIP), so their agreement on pairs judged twice is below 1, as people's is.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import pathlib
import random
import subprocess
import time
import urllib.request

log = logging.getLogger("rlhf.demo")

LABELLERS = ("gold-a", "gold-b")
FLIP = 0.1
OVERLAP = 0.25  # share of pairs the second person judges too
JUDGMENTS = 240  # both people together; --quick: half
EVAL_PROMPTS = 64  # held-out prompts for the before/after agreement ...
PAIRS_PER_PROMPT = 3  # ... with this many pairs of answers each
REPLAY_SHARE = 0.5  # as many old comparisons as new ones in the refresh


def person(seed: int):
    """A simulated labeller: the gold choice, flipped one time in ten."""
    from services.demo import gold

    rng = random.Random(seed)

    def judge(first: str, second: str) -> str:
        choice = gold.choice(first, second)
        if choice != "tie" and rng.random() < FLIP:
            return "second" if choice == "first" else "first"
        return choice
    return judge


def label_pairs(url: str, tokens: dict[str, str], total: int, seed: int) -> dict[str, int]:
    """The people judge `total` pairs through the JSON API, side by side (one thread each)."""
    from services.feedback.client import FeedbackClient

    def work(i: int, name: str) -> dict[str, int]:
        judge, counts = person(seed + i), {}
        with FeedbackClient(url, tokens[name]) as fb:
            for _ in range(total // len(tokens)):
                pair = fb.next_pair()
                choice = judge(pair["first"], pair["second"])
                fb.judge(pair["pair_id"], choice)
                counts[choice] = counts.get(choice, 0) + 1
        return counts

    with concurrent.futures.ThreadPoolExecutor(len(tokens)) as pool:
        done = list(pool.map(work, range(len(tokens)), tokens))
    return {c: sum(d.get(c, 0) for d in done) for c in ("first", "second", "tie", "skip")}


def eval_pairs(policy, prompts: list[str], max_tokens: int) -> list[tuple[str, str, str, str]]:
    """(prompt, first, second, gold choice) of the policy's current answers, PAIRS_PER_PROMPT pairs per
    prompt, where gold prefers one (a policy that mostly writes one kind gives many ties)."""
    from services.demo import gold
    from services.feedback.sampler import as_conversation

    results = policy.generate([as_conversation(p) for p in prompts], n=2 * PAIRS_PER_PROMPT, max_tokens=max_tokens,
                              temperature=1.0)
    pairs = []
    for prompt, result in zip(prompts, results):
        texts = [c.text for c in result.completions]
        for a, b in zip(texts[0::2], texts[1::2]):
            choice = gold.choice(a, b)
            if choice != "tie" and a.strip() and b.strip():
                pairs.append((prompt, a, b, choice))
    return pairs


def rm_agreement(reward, pairs) -> tuple[float, str]:
    """(share of pairs the served reward model orders as the gold labeller does, its version)."""
    flat = [(p, text) for p, a, b, _ in pairs for text in (a, b)]
    scores, version = [], None
    for i in range(0, len(flat), 128):  # within the service's --max-pairs
        reply = reward.score(flat[i:i + 128], truncation="keep_end_of_prompt")
        scores += [r.score for r in reply.results]
        version = reply.model_version
    agreed = 0.0
    for i, (_, _, _, choice) in enumerate(pairs):
        margin = scores[2 * i] - scores[2 * i + 1]
        margin = margin if choice == "first" else -margin
        agreed += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
    return agreed / len(pairs), version


@contextlib.contextmanager
def feedback_server(db: str, policy: str, reward: str, prompts: pathlib.Path, log_path: pathlib.Path, seed: int,
                    max_tokens: int):
    """`rlhf serve feedback` as a child process; yields its URL once /readyz answers."""
    from services.demo.launch import free_port, rlhf_command

    port = free_port()
    proc = subprocess.Popen(
        rlhf_command("serve", "feedback", "--db", db, "--policy", policy, "--reward", reward, "--prompts",
                     str(prompts), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                     "--max-tokens", str(max_tokens), "--overlap", str(OVERLAP), "--seed", str(seed),
                     "--rate-limit", "1000", "--rate-burst", "1000"),
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RLHF_AUTH_TOKEN": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/readyz", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the feedback service did not start: see {log_path}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def swap_reward_model(reward, path: pathlib.Path) -> dict:
    """The refreshed model into the running reward service (LoadModel: no restart; the service was
    started with --model-root above `path`)."""
    reply = reward.load_model(str(path.resolve()), timeout=600)
    return {"model_version": reply.model_version, "previous_version": reply.previous_version,
            "load_seconds": reply.load_seconds}


def run(out: pathlib.Path, *, config_for, policy, reward, reward_address: str, policy_address: str, models: pathlib.Path,
        paths: dict, eval_prompts: list[str], steps: int, seed: int, quick: bool, rm_settings: dict) -> dict:
    """The loop; returns the PPO history (both halves) and what the report shows of the loop."""
    from services.feedback.store import Store
    from services.trainer.config import RMConfig
    from services.trainer.loop import train
    from services.trainer.rm import train_reward_model
    from services.common.config import ClientConfig

    half = steps // 2
    log.info("feedback loop: PPO steps 1-%d", half)
    train(config_for(half), ClientConfig(), handle_signals=False)
    between = time.perf_counter()  # the time between the two halves is not PPO's

    pairs = eval_pairs(policy, eval_prompts[:EVAL_PROMPTS], max_tokens=64)
    before, version_before = rm_agreement(reward, pairs)
    log.info("reward model %s agrees with the gold labeller on %.2f of %d pairs of the current policy's answers",
             version_before, before, len(pairs))

    fb_dir = out / "feedback"
    fb_dir.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{fb_dir / 'feedback.db'}"
    store = Store(db)
    store.migrate()
    tokens = {name: store.add_labeller(name) for name in LABELLERS}
    total = JUDGMENTS // 2 if quick else JUDGMENTS
    t = time.perf_counter()
    with feedback_server(db, policy_address, reward_address, paths["prompts"], out / "logs" / "feedback.log",
                         seed, max_tokens=64) as url:
        log.info("feedback loop: %d judgments by %s through %s", total, ", ".join(LABELLERS), url)
        choices = label_pairs(url, tokens, total, seed)
    labelling_s = time.perf_counter() - t
    people = store.agreement()
    served_vs_people = store.rm_agreement(window=total)
    store.close()

    log.info("feedback loop: refreshing the reward model from %d judgments (+ replay of %s)", total, paths["prefs"])
    t = time.perf_counter()
    refreshed = models / "reward-refreshed"
    refresh = train_reward_model(RMConfig(init=str(models / "reward"), data=db, out=str(refreshed), seed=seed,
                                          replay={"data": str(paths["prefs"]), "share": REPLAY_SHARE},
                                          **rm_settings))
    refresh_s = time.perf_counter() - t
    swap = swap_reward_model(reward, refreshed)
    after, version_after = rm_agreement(reward, pairs)
    log.info("reward model %s (loaded in %.1f s, no restart) agrees with the gold labeller on %.2f of the same "
             "pairs (before: %.2f)", version_after, swap["load_seconds"], after, before)

    between = time.perf_counter() - between
    log.info("feedback loop: PPO steps %d-%d against the refreshed reward model", half + 1, steps)
    history = train(config_for(steps), ClientConfig(), resume=True, handle_signals=False)
    return {"history": history, "summary": {
        "steps_before_refresh": half, "seconds_between_halves": between, "judgments": total, "choices": choices, "labelling_seconds": labelling_s,
        "labeller_agreement": people.rate, "labeller_comparisons": people.compared,
        "served_rm_vs_people": served_vs_people.rate,
        "eval_pairs": len(pairs), "agreement_before": before, "agreement_after": after,
        "rm_version_before": version_before, "rm_version_after": version_after, "swap": swap,
        "refresh_seconds": refresh_s,
        "refresh": {k: refresh.get(k) for k in ("init_eval_accuracy_new", "eval_accuracy_new", "init_eval_accuracy_old",
                                                 "eval_accuracy_old", "noise_ceiling", "new_train_pairs",
                                                 "replay_train_pairs")}}}
