"""log p(token) and the entropy of a causal LM at the positions a loss reads, without its logits.

A Hugging Face CausalLM's forward returns logits at every position: [rows, tokens, vocab]. At
Qwen2's 151,936-token vocabulary a 4 x 1,024-token minibatch's fp32 logits are 2.5 GB, its
softmax as much again, and PPO reads one number per response token. Here the backbone runs as
usual, and the head (lm_head, and the few transforms some architectures apply to its output) is
applied only at the positions that predict a labelled token (a response token, an SFT label;
the prompt's last position predicts the first response token), CHUNK_ELEMENTS logits at a time:

- a plain nn.Linear head (tied or not) goes through _LinearLogSoftmax, a fused linear +
  log-softmax: with several chunks the forward keeps no logits and the backward recomputes each
  chunk's, adding the head's weight gradient into one buffer, so a step holds one chunk of
  logits and one weight gradient (a single chunk is kept instead of recomputed);
- any other head (a LoRA-wrapped or quantised lm_head) is called as a module on each chunk, the
  chunks recomputed in the backward pass (activation checkpointing) when there are several.

The arithmetic per position is that of ppo.logprobs_from_logits and ppo.entropy_from_logits on
logits.float() / temperature: the same as computing the full logits first, up to the rounding
of a matrix product of another shape (tests/unit/test_logprobs.py).

Under FSDP2 the backbone and the head are called from a method registered as a forward method of
the root module (`register_fsdp_forward_method`), so the root's parameters (embeddings, final
norm, lm_head: tied or not) are gathered for it and its backward as for a forward call.
"""
from __future__ import annotations

import dataclasses
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
    if hasattr(model, "get_base_model"):
        # A peft wrapper (LoRA): FSDP2 shards the model inside it, whose root must run the
        # method; its adapter layers still follow the wrapper's disable_adapter().
        model = model.get_base_model()
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


@dataclasses.dataclass(frozen=True)
class _Transform:
    """What the model's own forward does to lm_head's output, then the sampling temperature:
    logits = cap * tanh(scale * z / cap) / temperature (Cohere's logit_scale, Granite's
    logits_scaling, Gemma 2/3's final soft-capping)."""
    scale: float = 1.0
    cap: float | None = None
    temperature: float = 1.0

    @classmethod
    def of(cls, model, temperature: float) -> "_Transform":
        config = getattr(model.config, "text_config", None) or model.config
        scale = 1.0
        if getattr(config, "logit_scale", None) is not None:
            scale *= config.logit_scale
        if getattr(config, "logits_scaling", None) is not None:
            scale /= config.logits_scaling
        return cls(scale, getattr(config, "final_logit_softcapping", None), temperature)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The head's raw output (any dtype) -> fp32 logits / temperature."""
        z = z.float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.cap is not None:
            z = torch.tanh(z / self.cap) * self.cap
        return z / self.temperature

    def backward(self, grad: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """d loss / d raw from d loss / d (the transformed logits), in place on grad."""
        grad /= self.temperature
        if self.cap is not None:
            grad *= 1 - torch.tanh(raw.float() * self.scale / self.cap) ** 2
        if self.scale != 1.0:
            grad *= self.scale
        return grad


def _forward(model, input_ids, attention_mask, position_ids, labels, temperature, entropy, entropy_grad,
             chunk_elements):
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head): not a causal LM")
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids).last_hidden_state
    scored = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    hidden, targets = hidden[:, :-1][scored], labels[:, 1:][scored]
    transform = _Transform.of(model, temperature)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else model.config.vocab_size
    size = max(1, chunk_elements // vocab)
    if type(head) is torch.nn.Linear:
        logprobs, entropies = _LinearLogSoftmax.apply(hidden, head.weight, head.bias, targets, transform, size,
                                                      entropy, entropy_grad)
    else:
        logprobs, entropies = _module_chunks(head, hidden, targets, transform, size, entropy, entropy_grad)
    return _place(logprobs, scored), (_place(entropies, scored) if entropy else None)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a Linear computes in here: autocast's, else the weight's (FSDP's param_dtype)."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _LinearLogSoftmax(torch.autograd.Function):
    """Fused chunks of linear + log-softmax (+ entropy) over [N, H] hidden states, [N] each.

    Gradients, per position with z the transformed logits, p = softmax(z), y the label:
        d log p_y / d z = onehot(y) - p
        d H / d z       = -p * (z - logsumexp(z) + H)
    then through the transform to the head's output, and to hidden (grad @ W) and the weight
    (grad^T @ hidden, added chunk by chunk into one fp32 buffer)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform: _Transform, size: int, entropy: bool,
                entropy_grad: bool):
        dtype = _compute_dtype(weight)
        w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
        logprobs = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        entropies = torch.zeros_like(logprobs)
        for i in range(0, len(targets), size):
            raw = torch.nn.functional.linear(hidden[i:i + size].to(dtype), w, b)
            z = transform(raw)
            logprobs[i:i + size] = logprobs_from_logits(z, targets[i:i + size])
            if entropy:
                entropies[i:i + size] = entropy_from_logits(z)
        # One chunk is kept for the backward pass rather than recomputed (it fits the budget).
        kept = raw if len(targets) <= size and any(ctx.needs_input_grad[:3]) else None
        ctx.save_for_backward(hidden, weight, bias, targets, kept)
        ctx.transform, ctx.size, ctx.dtype, ctx.entropy_grad = transform, size, dtype, entropy and entropy_grad
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropies)
        return logprobs, entropies

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropies):
        hidden, weight, bias, targets, kept = ctx.saved_tensors
        transform, size, dtype = ctx.transform, ctx.size, ctx.dtype
        w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if want_bias and bias is not None else None
        for i in range(0, len(targets), size):
            h = hidden[i:i + size].to(dtype)
            raw = kept if kept is not None else torch.nn.functional.linear(h, w, b)
            z = transform(raw)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            p = torch.exp(z - lse)
            g = grad_logprobs[i:i + size, None] if grad_logprobs is not None else torch.zeros_like(lse)
            grad = p * -g
            grad.scatter_add_(-1, targets[i:i + size, None], g)
            if ctx.entropy_grad and grad_entropies is not None:
                entropy = lse - (p * z).sum(-1, keepdim=True)
                grad -= grad_entropies[i:i + size, None] * p * (z - lse + entropy)
            del z, p
            grad = transform.backward(grad, raw).to(dtype)
            del raw
            if grad_hidden is not None:
                grad_hidden[i:i + size] = grad @ w
            if grad_weight is not None:
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h)
                else:
                    grad_weight.add_(grad.T @ h)  # a compute-dtype product, summed in fp32
            if grad_bias is not None:
                grad_bias.add_(grad.sum(0))
        return (grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(bias.dtype) if grad_bias is not None else None, None, None, None, None, None)


def _module_chunk(head, hidden, targets, transform, entropy, entropy_grad):
    logits = transform(head(hidden))
    logprobs = logprobs_from_logits(logits, targets)
    if not entropy:
        return logprobs, torch.zeros_like(logprobs)
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):  # else autograd would keep the softmax
        return logprobs, entropy_from_logits(logits)


def _module_chunks(head, hidden, targets, transform, size, entropy, entropy_grad):
    """Any head, called as a module on `size` positions at a time; recomputed in the backward
    pass when there are several chunks (at most one chunk's logits exist then)."""
    chunks = [(hidden[i:i + size], targets[i:i + size]) for i in range(0, max(len(targets), 1), size)]
    recompute = torch.is_grad_enabled() and hidden.requires_grad and len(chunks) > 1
    parts = [torch.utils.checkpoint.checkpoint(_module_chunk, head, h, y, transform, entropy, entropy_grad,
                                               use_reentrant=False)
             if recompute else _module_chunk(head, h, y, transform, entropy, entropy_grad) for h, y in chunks]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _place(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[N] values of the scored positions [B, T-1] back to [B, T] aligned with the labels, 0 elsewhere."""
    out = torch.zeros(scored.shape, dtype=values.dtype, device=values.device).masked_scatter(scored, values)
    return torch.nn.functional.pad(out, (1, 0))
