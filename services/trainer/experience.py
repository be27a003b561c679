"""A PPO step's data: the samples the services returned, and the tensors the update reads.

Shapes: B completions; prompts left-padded to P tokens, responses right-padded to R, so every
response starts at column P and one slice [P-1, P+R-1) of the logits predicts all response
tokens of the batch. Per-token tensors are [B, R] with `response_mask` 1.0 on real tokens.
"""
from __future__ import annotations

import dataclasses

import torch

from services.trainer.data import IGNORE_INDEX
from services.trainer.logprobs import next_token_logprobs


@dataclasses.dataclass(frozen=True)
class Sample:
    """One completion as the policy and reward services returned it."""
    prompt: str | list[dict]  # as the data set gave it: a string or a conversation
    prompt_ids: list[int]
    response_ids: list[int]  # EOS included when the completion ended on it
    response_text: str
    sampler_logprobs: list[float]  # per response token, from the policy service
    finish_reason: str  # "length" | "stop" | "eos" | "abort"
    weight_version: int  # the weights that sampled it
    score: float = 0.0  # the reward service's score (the weighted sum of its components)
    components: dict[str, float] = dataclasses.field(default_factory=dict)  # each component's value


@dataclasses.dataclass
class Rollout:
    """One step's samples in global order (the same list on every rank) and what was left out."""
    samples: list[Sample]
    prompts: list  # the step's prompts, before anything was dropped
    generated_tokens: int  # over every completion, dropped ones included
    group_sizes: list[int]  # the completions of one prompt are consecutive: len(samples) == sum(group_sizes)
    dropped_stale: int = 0  # sampled by weights off the trainer's version beyond the staleness bound
    dropped_empty: int = 0  # nothing to score (EOS at once)
    dropped_trim: int = 0  # cut so the batch splits into whole minibatches
    rollout_seconds: float = 0.0  # generating and scoring it took (the slowest rank)
    waited_seconds: float = 0.0  # the trainer waited for it (less than rollout_seconds when it ran in the background)
    reward_version: str = ""  # the reward model version of every score (collect.unify_reward_versions)
    reward_versions: dict[str, int] = dataclasses.field(default_factory=dict)  # scores by the version that made them first
    rescored_reward_version: int = 0  # scored again: another version had scored them
    dropped_reward_version: int = 0  # left out: the reward model kept changing while they were scored again


@dataclasses.dataclass
class Batch:
    """Token tensors of B samples (see the module docstring for the layout)."""
    input_ids: torch.Tensor  # [B, P + R] long
    attention_mask: torch.Tensor  # [B, P + R] long
    position_ids: torch.Tensor  # [B, P + R] long: positions count real tokens, as the sampler saw them
    response_ids: torch.Tensor  # [B, R] long
    response_mask: torch.Tensor  # [B, R] float
    prompt_width: int  # P

    @classmethod
    def of(cls, samples: list[Sample], pad_id: int, device: torch.device | str = "cpu") -> "Batch":
        P = max(len(s.prompt_ids) for s in samples)
        R = max(max(len(s.response_ids) for s in samples), 1)
        B = len(samples)
        input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, P + R), dtype=torch.long)
        for i, s in enumerate(samples):
            p, r = s.prompt_ids, s.response_ids
            input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, P - len(p):P + len(r)] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return cls(input_ids.to(device), attention_mask.to(device), position_ids.to(device),
                   input_ids[:, P:].to(device), attention_mask[:, P:].float().to(device), P)

    def rows(self, idx) -> "Batch":
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx], self.response_ids[idx],
                     self.response_mask[idx], self.prompt_width)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclasses.dataclass
class Experience:
    """What the PPO update reads: the batch and, all [B, R] (scores [B]), what was computed from it
    with the weights of the step's start. Identical on every rank."""
    batch: Batch
    old_logprobs: torch.Tensor  # log pi_old(a_t | s_t), recomputed by the trainer
    ref_logprobs: torch.Tensor  # log pi_ref(a_t | s_t), the frozen SFT policy
    sampler_logprobs: torch.Tensor  # what the policy service reported (0 where it reported none)
    values: torch.Tensor  # V(s_t) of the value model
    kl: torch.Tensor  # per-token KL estimate of pi_old against pi_ref
    rewards: torch.Tensor  # -beta * KL_t, plus the score at the last token
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor  # advantages + values (the value target)
    scores: torch.Tensor  # [B] the score after normalisation, clipping and the EOS penalty
    is_weights: torch.Tensor  # min(pi_old / pi_sampler, is_cap) per token (the mask when not corrected)
    is_capped: torch.Tensor  # bool: the weight hit the cap


def policy_forward(model, batch: Batch, temperature: float, entropy: bool = False,
                   entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs of the responses under `model` [B, R] (0 on padding), and the entropy
    of each token's distribution when asked for (with a gradient if entropy_grad). Computed at
    the positions that predict a response token only, never as [B, P + R, vocab] logits
    (services.trainer.logprobs)."""
    P = batch.prompt_width
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    labels[:, P:] = torch.where(batch.response_mask.bool(), batch.response_ids, IGNORE_INDEX)
    logprobs, entropies = next_token_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                              labels, temperature, entropy, entropy_grad)
    return logprobs[:, P:], (entropies[:, P:] if entropies is not None else None)


def value_forward(model, batch: Batch) -> torch.Tensor:
    """V(s_t) for every response position [B, R]: the reward model's head on every hidden state
    (of the Hugging Face model inside a LoRA wrapper, whose layers apply the adapter)."""
    from services.ml.head import values
    from services.trainer.lora import base_of

    P = batch.prompt_width
    return values(base_of(model), batch.input_ids, batch.attention_mask, batch.position_ids)[:, P - 1:-1]
