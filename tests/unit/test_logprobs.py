"""Logprobs and entropy at the scored positions only (services.trainer.logprobs) against what the
trainer computed before: the full [rows, tokens, vocab] logits of the model's forward, then
ppo.logprobs_from_logits / entropy_from_logits on logits.float() / temperature.

Tolerances. The arithmetic per position is the same; what differs is the shape of the head's
matrix product ([N, H] scored positions, in chunks, instead of [B, T, H]), which may round a
logit differently:
- fp32: a logit differs by a few ulp (~1e-6 at |z| ~ 10) and log-sum-exp carries that over, so
  logprobs and entropies agree to 1e-5 absolute; gradients to 1e-4 of their largest element
  (they sum the per-position terms in another order). Measured: 1e-6 and 1.8e-5.
- bf16 (autocast): the head's output is rounded to bf16 (8 bits of mantissa), so one rounding
  step of a logit is 2^-8 of its magnitude; we allow two steps of the largest |logit| on a
  logprob (the label's logit and the log-sum-exp can each move by one), and gradients to 2^-6
  of their largest element (each chunk's weight gradient is rounded to bf16 before it is added
  up). Measured: equal logprobs, gradients within 2.7e-4.
An error in the method (a position shifted by one, the temperature applied twice, a missing
transform of the head) is of order 1 on these numbers.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from services.trainer.logprobs import IGNORE_INDEX, next_token_logprobs
from services.trainer.ppo import entropy_from_logits, logprobs_from_logits

QWEN_VOCAB = 151_936


def qwen2(vocab: int, seed: int = 0):
    """Qwen2's layout (tied embeddings) at a small hidden size: 9.7 M parameters at vocab 151,936."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="module")
def model():
    return qwen2(QWEN_VOCAB)


def batch(vocab: int, rows: int = 2, tokens: int = 12, seed: int = 0):
    """Left-padded rows (as the trainer's batches), labels on the last tokens of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, tokens), generator=g)
    attention_mask = torch.ones(rows, tokens, dtype=torch.long)
    attention_mask[1, :3] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt
    labels[1, -2:] = IGNORE_INDEX  # a response shorter than the batch's
    return ids, attention_mask, position_ids, labels


def full_logits_reference(model, ids, attention_mask, position_ids, labels, temperature):
    """The trainer's computation before: every position's logits, then the scored ones kept."""
    logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, :-1].float() / temperature
    scored = labels[:, 1:] != IGNORE_INDEX
    logprobs = torch.where(scored, logprobs_from_logits(logits, ids[:, 1:]), 0.0)
    entropy = torch.where(scored, entropy_from_logits(logits), 0.0)
    return torch.nn.functional.pad(logprobs, (1, 0)), torch.nn.functional.pad(entropy, (1, 0))


def values_and_grads(model, compute, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logprobs, entropy = compute()
    (logprobs.sum() + 0.3 * entropy.sum()).backward()  # an entropy bonus: its gradient is checked too
    return logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_elements", [1 << 25, 3 * QWEN_VOCAB], ids=["one-chunk", "chunks-of-3"])
def test_logprobs_entropy_and_gradients_equal_the_full_logits_at_qwen2_vocab(model, dtype, chunk_elements):
    ids, attention_mask, position_ids, labels = batch(QWEN_VOCAB)
    temperature = 0.7
    ref_lp, ref_h, ref_g = values_and_grads(model, lambda: full_logits_reference(
        model, ids, attention_mask, position_ids, labels, temperature), dtype)
    lp, h, g = values_and_grads(model, lambda: next_token_logprobs(
        model, ids, attention_mask, position_ids, labels, temperature, entropy=True, entropy_grad=True,
        chunk_elements=chunk_elements), dtype)
    assert lp.shape == ids.shape and (lp[labels == IGNORE_INDEX] == 0).all()
    if dtype == torch.float32:
        atol, grad_rtol = 1e-5, 1e-4
    else:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            biggest = model(input_ids=ids, attention_mask=attention_mask).logits.float().abs().max().item()
        atol, grad_rtol = 2 * 2 ** -8 * biggest / temperature, 2 ** -6
    torch.testing.assert_close(lp, ref_lp, atol=atol, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=atol, rtol=0)
    assert g.keys() == ref_g.keys()
    for name in g:
        scale = ref_g[name].abs().max()
        assert scale > 0, name
        assert (g[name] - ref_g[name]).abs().max() <= grad_rtol * scale, name


def test_temperature_scales_the_distribution_before_the_log_softmax():
    """log p at temperature t is log_softmax(z / t): t = 0.5 is not t = 1 halved."""
    model = qwen2(512)
    ids, attention_mask, position_ids, labels = batch(512)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
        expected = torch.log_softmax(logits / 0.5, -1).gather(-1, ids[:, 1:, None])[..., 0]
        lp, _ = next_token_logprobs(model, ids, attention_mask, position_ids, labels, 0.5)
    scored = labels[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(lp[:, 1:][scored], expected[scored], atol=1e-5, rtol=0)
    with torch.no_grad():
        at_one, _ = next_token_logprobs(model, ids, attention_mask, position_ids, labels, 1.0)
    assert (lp[:, 1:][scored] - at_one[:, 1:][scored]).abs().max() > 0.01


class VocabRows(TorchDispatchMode):
    """The most positions any operator's output holds a vocabulary-wide row for: the leading
    dimensions of a [..., vocab] tensor (logits, softmax, their gradients). The head's weight,
    transposed for its matrix product ([hidden, vocab]), is a parameter, not a row per position."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.most = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab \
                    and tuple(t.shape) != (self.hidden, self.vocab):
                self.most = max(self.most, t.numel() // self.vocab)
        return out


def test_no_rows_x_tokens_x_vocab_tensor_exists_in_forward_or_backward(model):
    """Before: [2, 11, vocab] logits (and softmax, gradients). Now, in chunks of 3 positions, no
    operator of the forward or the backward returns more than 3 positions' worth of vocabulary."""
    model.zero_grad(set_to_none=True)
    ids, attention_mask, position_ids, labels = batch(QWEN_VOCAB)
    with VocabRows(QWEN_VOCAB, model.config.hidden_size) as before:
        lp, h = full_logits_reference(model, ids, attention_mask, position_ids, labels, 1.0)
        (lp.sum() + h.sum()).backward()
    model.zero_grad(set_to_none=True)
    with VocabRows(QWEN_VOCAB, model.config.hidden_size) as after:
        lp, h = next_token_logprobs(model, ids, attention_mask, position_ids, labels, entropy=True,
                                    entropy_grad=True, chunk_elements=3 * QWEN_VOCAB)
        (lp.sum() + h.sum()).backward()
    assert before.most >= 2 * 11
    assert after.most == 3


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite"])
def test_the_head_transforms_of_an_architecture_are_applied_as_its_forward_does(arch):
    """Soft-capping (Gemma 2), logit_scale (Cohere), logits_scaling (Granite) come after lm_head in
    those models' forward: the logprobs, entropies and gradients must include them."""
    import transformers
    cls, config_cls, extra = {
        "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(final_logit_softcapping=2.0, head_dim=32)),
        "cohere": ("CohereForCausalLM", "CohereConfig", dict(logit_scale=0.25)),
        "granite": ("GraniteForCausalLM", "GraniteConfig", dict(logits_scaling=4.0)),
    }[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=256, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=64, **extra)
    model = getattr(transformers, cls)(config)
    with torch.no_grad():  # a larger head: logits of tens of units, where the transforms matter (the norm
        model.get_output_embeddings().weight.mul_(30.0)  # before each layer undoes it on tied input embeddings)
    ids, attention_mask, position_ids, labels = batch(256)
    ref_lp, ref_h, ref_g = values_and_grads(model, lambda: full_logits_reference(
        model, ids, attention_mask, position_ids, labels, 0.7), torch.float32)
    lp, h, g = values_and_grads(model, lambda: next_token_logprobs(
        model, ids, attention_mask, position_ids, labels, 0.7, entropy=True, entropy_grad=True,
        chunk_elements=5 * 256), torch.float32)
    torch.testing.assert_close(lp, ref_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h, ref_h, atol=1e-4, rtol=1e-4)
    for name in g:
        assert (g[name] - ref_g[name]).abs().max() <= 1e-4 * ref_g[name].abs().max(), name


class WrappedHead(torch.nn.Module):
    """An lm_head that is not a plain nn.Linear (as a LoRA-wrapped or quantised one is): the
    module itself is called on each chunk, recomputed in the backward pass."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.base = linear
        self.delta = torch.nn.Parameter(torch.randn(linear.out_features) * 0.1)

    def forward(self, x):
        return self.base(x) + self.delta


@pytest.mark.parametrize("chunk_elements", [1 << 25, 3 * 512], ids=["one-chunk", "chunks-of-3"])
def test_a_head_that_is_not_a_linear_is_called_as_a_module_with_the_same_results(chunk_elements):
    model = qwen2(512)
    model.config.tie_word_embeddings = False
    model.lm_head = WrappedHead(torch.nn.Linear(64, 512, bias=False))
    ids, attention_mask, position_ids, labels = batch(512)
    ref_lp, ref_h, ref_g = values_and_grads(model, lambda: full_logits_reference(
        model, ids, attention_mask, position_ids, labels, 0.7), torch.float32)
    lp, h, g = values_and_grads(model, lambda: next_token_logprobs(
        model, ids, attention_mask, position_ids, labels, 0.7, entropy=True, entropy_grad=True,
        chunk_elements=chunk_elements), torch.float32)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=0)
    assert g["lm_head.delta"].abs().max() > 0
    for name in g:
        assert (g[name] - ref_g[name]).abs().max() <= 1e-4 * ref_g[name].abs().max(), name
