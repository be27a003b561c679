"""log p(token) and the entropy of a causal LM at the positions a loss reads, without its logits.

A Hugging Face CausalLM's forward returns logits at every position: [rows, tokens, vocab]. At
Qwen2's 151,936-token vocabulary a 4 x 1,024-token minibatch's fp32 logits are 2.5 GB, its
softmax as much again, and PPO reads one number per response token. Here the backbone runs as
usual, and the head (lm_head, and the few transforms some architectures apply to its output) is
applied only at the positions that predict a labelled token (a response token, an SFT label;
the prompt's last position predicts the first response token), in chunks of at most
CHUNK_ELEMENTS logits. With autograd on and more than one chunk, each chunk is recomputed in the
backward pass (activation checkpointing), so at most one chunk of logits exists at any time;
a single chunk is kept, as autograd would keep it anyway.

The arithmetic per position is that of ppo.logprobs_from_logits and ppo.entropy_from_logits on
logits.float() / temperature: the same as computing the full logits first, up to the rounding
of a matrix product of another shape (tests/unit/test_logprobs.py).

Under FSDP2 the backbone and the head are called from a method registered as a forward method of
the root module (`register_fsdp_forward_method`), so the root's parameters (embeddings, final
norm, lm_head: tied or not) are gathered for it and its backward as for a forward call.
"""
from __future__ import annotations

import types

import torch

from services.trainer.data import IGNORE_INDEX
from services.trainer.ppo import entropy_from_logits, logprobs_from_logits

# Logits of one chunk: 32 Mi elements, 128 MiB in fp32 (220 positions at a vocabulary of 151,936;
# 32,768 at the demo's 1,024, where a whole batch is one chunk).
CHUNK_ELEMENTS = 1 << 25
_METHOD = "_rlhf_next_token_logprobs"


def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None, labels: torch.Tensor, temperature: float = 1.0,
                        entropy: bool = False, entropy_grad: bool = False, chunk_elements: int = CHUNK_ELEMENTS
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(labels[b, t] | tokens < t), the entropy of that distribution), both [B, T], 0 where
    labels is IGNORE_INDEX (and at t = 0, which nothing predicts); p is softmax(logits / temperature).
    labels are aligned with input_ids, as Hugging Face's are. The entropy is None unless asked
    for, and carries a gradient only with entropy_grad (an entropy bonus in the loss)."""
    method = getattr(model, _METHOD, None)
    if method is None:
        method = _install(model)
    return method(input_ids, attention_mask, position_ids, labels, float(temperature), bool(entropy),
                  bool(entropy_grad), int(chunk_elements))


def _install(model):
    """Bind the computation to the model as a method, registered with FSDP when it is sharded."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, _METHOD, types.MethodType(_forward, model))
    register_fsdp_forward_method(model, _METHOD)  # a no-op for a module FSDP does not manage
    return getattr(model, _METHOD)


def _forward(model, input_ids, attention_mask, position_ids, labels, temperature, entropy, entropy_grad,
             chunk_elements):
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head): not a causal LM")
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids).last_hidden_state
    scored = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    targets = labels[:, 1:][scored]
    vocab = head.weight.shape[0] if hasattr(head, "weight") else model.config.vocab_size
    logprobs, entropies = _chunked(lambda h: _logits(model, head, h), hidden[:, :-1][scored], targets,
                                   temperature, (entropy, entropy_grad), max(1, chunk_elements // vocab))
    return _place(logprobs, scored), (_place(entropies, scored) if entropy else None)


def _logits(model, head, hidden: torch.Tensor) -> torch.Tensor:
    """What the model's own forward makes of the head's output: lm_head, then the scaling or
    soft-capping its architecture applies (Cohere, Granite, Gemma 2/3)."""
    config = getattr(model.config, "text_config", None) or model.config
    logits = head(hidden)
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk(logits_of, hidden, targets, temperature, entropy):
    logits = logits_of(hidden).float() / temperature
    logprobs = logprobs_from_logits(logits, targets)
    wanted, trained = entropy
    if not wanted:
        return logprobs, torch.zeros_like(logprobs)
    with torch.set_grad_enabled(torch.is_grad_enabled() and trained):  # else autograd would keep the softmax
        return logprobs, entropy_from_logits(logits)


def _chunked(logits_of, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
             entropy: tuple[bool, bool], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_chunk over [N, H] hidden states, `size` positions at a time: [N] each."""
    chunks = [(hidden[i:i + size], targets[i:i + size]) for i in range(0, max(len(targets), 1), size)]
    recompute = torch.is_grad_enabled() and hidden.requires_grad and len(chunks) > 1
    parts = [torch.utils.checkpoint.checkpoint(_chunk, logits_of, h, y, temperature, entropy, use_reentrant=False)
             if recompute else _chunk(logits_of, h, y, temperature, entropy) for h, y in chunks]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _place(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[N] values of the scored positions [B, T-1] back to [B, T] aligned with the labels, 0 elsewhere."""
    out = torch.zeros(scored.shape, dtype=values.dtype, device=values.device).masked_scatter(scored, values)
    return torch.nn.functional.pad(out, (1, 0))
