"""PPO math for RLHF, as pure functions on tensors: the advantage estimators (GAE with a
critic, and the critic-free GRPO, RLOO and REINFORCE++), the KL estimators, the clipped losses
and how a loss is averaged over tokens and sequences.

Shapes: per-token tensors are [batch, response_len], right-padded; `mask` is 1.0
on real response tokens and 0.0 on padding; per-sequence tensors are [batch]. A group is
the n completions of one prompt, consecutive in the batch. Nothing here knows about models,
services or gRPC, so every formula can be checked by hand in a unit test.

References: Ziegler et al. 2019 (adaptive KL), Ouyang et al. 2022 (InstructGPT:
per-token KL penalty, score at the last token), Zheng et al. 2023 ("Secrets of
RLHF": reward normalisation and clipping, whitened advantages), Huang et al. 2024
("The N+ implementation details of RLHF with PPO": EOS penalty), Schulman 2020
(the k1/k2/k3 KL estimators), CleanRL's ppo.py (clipped losses, approx_kl),
Shao et al. 2024 (DeepSeekMath: GRPO), Liu et al. 2025 ("Understanding R1-Zero-Like
Training": Dr. GRPO drops the std and the per-sequence length normalisation),
Ahmadian et al. 2024 (RLOO for RLHF), Hu 2025 (REINFORCE++).
"""
from __future__ import annotations

import torch


def _zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with padding set to 0; `where`, not `x * mask`, so inf/nan in padding cannot leak (0 * inf = nan)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over real tokens only: padding must not dilute a statistic."""
    if dim is None:
        return _zero_pad(x, mask).sum() / mask.sum().clamp(min=1)
    return _zero_pad(x, mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over real tokens; unbiased (Bessel) by default like torch.var."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale to unit variance over real tokens so the step size does not depend on the reward scale.

    shift_mean=False keeps the mean: whitening rewards that way keeps their sign
    ("Secrets of RLHF"); advantages are usually fully whitened. Padding stays 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_pad(whitened, mask)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}.
    The episode ends at the last real token: the value after it is 0 (no
    bootstrap), and padding neither receives nor passes on advantage.
    Returns (advantages, returns = advantages + values); both 0 on padding.
    """
    rewards, values = _zero_pad(rewards, mask), _zero_pad(values, mask)
    T = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(T)):
        # mask[t+1] = 0 means t is the last real token (or padding): nothing follows it.
        next_mask = mask[..., t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[..., t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[..., t] + gamma * next_value * next_mask - values[..., t]
        last = (delta + gamma * lam * last * next_mask) * mask[..., t]
        advantages[..., t] = last
    returns = _zero_pad(advantages + values, mask)
    return advantages, returns


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log p_ref: unbiased per-token estimate of KL(p || p_ref), can be negative.

    Its sum over a sampled sequence is the sequence's log-ratio, the penalty InstructGPT uses.
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = p_ref / p: unbiased, never negative, lower variance (Schulman 2020)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log p - log p_ref)^2 / 2: biased, never negative, low variance; its gradient is
    that of the true KL in expectation when used as a loss term (Schulman 2020)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded row (0 for an all-pad row)."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, beta: float, *, kl_estimator: str = "k1",
                  missing_eos: torch.Tensor | None = None, missing_eos_penalty: float | None = None,
                  score_mean: float = 0.0, score_std: float = 1.0, score_clip: float | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: r_t = -beta * KL_t, plus the sequence score at the last real token.

    The KL term keeps the policy near the SFT model where the reward model is
    still trustworthy (InstructGPT eq. 2). The score is first normalised with the
    reward model's training statistics and optionally clipped ("Secrets of
    RLHF"); then a completion that ran into max_tokens without EOS loses
    `missing_eos_penalty`, after clipping so the clip cannot soften it: otherwise
    the policy learns that rambling until cut off is free.

    Returns (rewards [B, T], kl [B, T], final scores [B]); 0 on padding.
    """
    kl = _zero_pad(KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs), mask)
    score = (scores.to(logprobs.dtype) - score_mean) / score_std
    if score_clip is not None:
        score = score.clamp(-score_clip, score_clip)
    if missing_eos_penalty is not None and missing_eos is not None:
        score = score - missing_eos_penalty * missing_eos.to(score.dtype)
    rewards = -beta * kl
    last = last_token_index(mask).unsqueeze(-1)
    rewards = _zero_pad(rewards.scatter_add(-1, last, score.unsqueeze(-1)), mask)
    return rewards, kl, score


class FixedKLController:
    """beta stays where it was set."""

    def __init__(self, init_kl_coef: float):
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: steer beta so the observed KL tracks a target.

    e_t = clip(KL_t / target - 1, -0.2, 0.2);  beta <- beta * (1 + e_t * n_steps / horizon).
    The clip keeps one noisy KL estimate from swinging beta; the horizon sets how
    many samples it takes to correct a given error.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


# ---- critic-free advantages -------------------------------------------------------------------

def _groups(scores: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    if sum(sizes) != scores.numel():
        raise ValueError(f"group sizes {sizes} do not add up to the {scores.numel()} scores")
    return list(torch.split(scores, sizes))


def grpo_advantages(scores: torch.Tensor, sizes: list[int], scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each completion against the other completions of its prompt (groups of `sizes`,
    consecutive in `scores`).

    A_i = (r_i - mean_group) / (std_group + eps)   scale="group" (Shao et al.)
    A_i = (r_i - mean_group) / (std_batch + eps)   scale="batch"
    A_i =  r_i - mean_group                        scale="none" (Dr. GRPO: dividing by a small
                                                   group std up-weights prompts that are too easy or too hard)
    std is the sample std (n - 1). A group of equal rewards, or of one completion, gets 0, never NaN.
    [B] -> [B].
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    batch_std = scores.std() if scores.numel() > 1 else scores.new_tensor(0.0)
    out = []
    for g in _groups(scores, sizes):
        centred = g - g.mean()
        std = g.std() if scale == "group" and len(g) > 1 else batch_std
        if len(g) < 2 or (scale != "none" and std == 0):
            centred = torch.zeros_like(g)  # no baseline, or nothing to tell apart
        elif scale != "none":
            centred = centred / (std + eps)
        out.append(centred)
    return torch.cat(out)


def rloo_advantages(scores: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """RLOO: A_i = r_i - mean of the other n - 1 rewards of its group = n / (n - 1) * (r_i - mean_group).
    The leave-one-out baseline does not depend on r_i, so the estimate stays unbiased. A group of
    one completion has no baseline: 0. [B] -> [B]."""
    out = []
    for g in _groups(scores, sizes):
        n = len(g)
        out.append(g - (g.sum() - g) / (n - 1) if n > 1 else torch.zeros_like(g))
    return torch.cat(out)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: the discounted return of every token, G_t = r_t + gamma * G_{t+1} (the rewards
    carry the per-token KL penalty and the score at the last token), whitened over the whole
    batch: the batch, not a critic or a group, is the baseline. [B, T] -> [B, T], 0 on padding."""
    rewards = _zero_pad(rewards, mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[..., t] + gamma * running) * mask[..., t]
        returns[..., t] = running
    return masked_whiten(returns, mask)


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence's advantage on each of its tokens: [B] -> [B, T]."""
    return _zero_pad(advantages.unsqueeze(-1).expand_as(mask).to(mask.dtype), mask)


# ---- losses ----------------------------------------------------------------------------------

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
              normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """A per-token loss [B, T] to a scalar.

    token_mean            sum over every token / number of tokens: each token counts the same,
                          so long answers weigh more than short ones (PPO's usual choice)
    seq_mean_token_sum    sum over each sequence's tokens, mean over sequences: a sequence's
                          weight grows with its length (Dr. GRPO, with a constant normaliser)
    seq_mean_token_mean   mean over each sequence's tokens, mean over sequences: every sequence
                          counts the same whatever its length, so a token of a short answer weighs
                          more (the original GRPO; it biases towards longer wrong answers)

    `normalizer` replaces the denominator (the token or sequence count) by one counted over
    more than these rows, e.g. a minibatch split over ranks; None: these rows' own count.
    """
    x = _zero_pad(x, mask)
    if mode == "token_mean":
        total, count = x.sum(), mask.sum()
    elif mode == "seq_mean_token_sum":
        total, count = x.sum(), torch.tensor(float(mask.shape[0]))
    elif mode == "seq_mean_token_mean":
        total, count = (x.sum(-1) / mask.sum(-1).clamp(min=1)).sum(), torch.tensor(float(mask.shape[0]))
    else:
        raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
    return total / (count.clamp(min=1) if normalizer is None else normalizer)


def loss_normalizer(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The denominator aggregate() uses for these rows: tokens for token_mean, sequences otherwise."""
    return mask.sum() if mode == "token_mean" else torch.tensor(float(mask.shape[0]), device=mask.device)


def truncated_is_weights(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w_t = min(pi_prox(a_t) / pi_behav(a_t), cap): how much more likely the trainer's weights at the
    start of the update (the proximal policy) make a token than the weights that sampled it (a
    version behind, or another engine's numerics). Truncated so that one stale token cannot
    dominate (truncated IS; decoupled PPO, Hilton et al. 2022). Returns (weights, capped) [B, T],
    0 on padding; no gradient flows through them."""
    ratio = torch.exp(_zero_pad(proximal_logprobs - behaviour_logprobs, mask)).detach()
    capped = (ratio > cap) & mask.bool()
    return _zero_pad(ratio.clamp(max=cap), mask), capped


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2, *, loss_agg: str = "token_mean",
                normalizer: float | torch.Tensor | None = None,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: -w * min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), aggregated over
    real tokens as `loss_agg` says (see aggregate).

    ratio is taken against `old_logprobs`, the proximal policy (the trainer's weights at the
    start of the update); `is_weights` (truncated_is_weights; None: 1) carry the correction from
    the behaviour policy that sampled the tokens to the proximal one. The clip removes the
    incentive to move the ratio further than eps in one update. Returns (loss, clip fraction,
    approx_kl); approx_kl is the k3 estimate mean((ratio - 1) - log ratio) of KL(old || new), for
    early stopping and monitoring (both token means of these rows).
    """
    log_ratio = _zero_pad(logprobs - old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_token_loss = torch.maximum(pg_losses, pg_losses_clipped)
    if is_weights is not None:
        per_token_loss = is_weights * per_token_loss
    loss = aggregate(per_token_loss, mask, loss_agg, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses_clipped > pg_losses).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range_value: float = 0.2, *,
               normalizer: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -eps, eps).

    Like the policy clip, it stops one batch from dragging the critic far from
    where the advantages were computed. Returns (loss, clip fraction).
    """
    values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(vf_losses, vf_losses_clipped), mask, "token_mean", normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses_clipped > vf_losses).float(), mask)
    return loss, clipfrac


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) = logit[label] - logsumexp(logits).

    Never materialises the full [B, T, vocab] log_softmax: for a large vocabulary
    that tensor (and its gradient) is the biggest allocation of a PPO step.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) * z per position; an entropy drop signals collapse."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)
