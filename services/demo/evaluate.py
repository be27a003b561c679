"""Judge a policy served by the policy service: gold-label shares, reward-model score and
KL to the SFT model, on held-out prompts."""
from __future__ import annotations

import numpy as np
import torch

from services.common.text import format_prompt
from services.demo import gold


def sft_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
    """Sum of log p_SFT(response tokens), one per sample."""
    sums = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, response_ids):
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
            sums.append(lp.sum().item())
    return sums


def evaluate(policy, reward, tokenizer, sft_model, prompts: list[str], *, samples_per_prompt: int,
             max_tokens: int, seed: int) -> dict:
    """Sample `samples_per_prompt` completions per prompt at temperature 1 from the served
    policy; KL(policy || SFT) per sequence is estimated as mean(log p_policy - log p_SFT)."""
    prompt_ids = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]
    # Unseeded: vLLM's CPU sampler refuses a seed with n > 1.
    reply = policy.generate(prompt_ids, n=samples_per_prompt, max_tokens=max_tokens, temperature=1.0,
                            logprobs=True)
    rows = []
    for prompt, ids, result in zip(prompts, prompt_ids, reply):
        for c in result.completions:
            rows.append(dict(prompt=prompt, prompt_ids=ids, token_ids=list(c.token_ids), text=c.text,
                             logprob=float(sum(c.logprobs)), version=c.weight_version))
    # An empty answer (EOS first) cannot be scored (the service refuses empty text); it still
    # counts in the shares, as "other", and stays out of the mean score.
    scored = [r for r in rows if r["text"].strip()]
    pairs = [(r["prompt"], r["text"]) for r in scored]
    values = [s for i in range(0, len(pairs), 128)  # within the service's --max-pairs
              for s in reward.scores(pairs[i:i + 128], truncation="keep_end_of_prompt")]
    by_id = {id(r): v for r, v in zip(scored, values)}
    scores = [by_id.get(id(r), float("nan")) for r in rows]
    ref = sft_logprobs(sft_model, [r["prompt_ids"] for r in rows], [r["token_ids"] for r in rows])
    for r, s, lp_ref in zip(rows, scores, ref):
        r.update(score=s, kind=gold.label(r["text"]), kl=r["logprob"] - lp_ref)
    shares = gold.shares(r["text"] for r in rows)
    return dict(n=len(rows), shares=shares, reward_mean=float(np.nanmean(scores)) if scored else 0.0,
                kl=float(np.mean([r["kl"] for r in rows])),
                length=float(np.mean([len(r["token_ids"]) for r in rows])),
                weight_version=rows[0]["version"] if rows else 0, rows=rows)
