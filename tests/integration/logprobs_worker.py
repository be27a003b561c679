"""next_token_logprobs on FSDP2-sharded models, as one rank of `torchrun --nproc-per-node N`.

Used by test_trainer_distributed.py. For each model directory given (tied and untied
embeddings), on the same batch on every rank: the logprobs, entropies and parameter gradients
of services.trainer.logprobs (in chunks of 5 positions, so the checkpointed path runs) equal
those of the model's own forward over full logits. Exits non-zero naming what differs.

    python tests/integration/logprobs_worker.py MODEL_DIR [MODEL_DIR ...]
"""
from __future__ import annotations

import sys

import torch
from torch.distributed.tensor import DTensor

from services.trainer import distributed
from services.trainer.logprobs import IGNORE_INDEX, next_token_logprobs
from services.trainer.ppo import entropy_from_logits, logprobs_from_logits


def full_gradients(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def check(path: str, d) -> list[str]:
    from transformers import AutoModelForCausalLM

    model = distributed.load_model(AutoModelForCausalLM, path, d)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (3, 14), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[2, :4] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    labels[0, -3:] = IGNORE_INDEX
    scored = labels[:, 1:] != IGNORE_INDEX
    temperature = 0.8

    def reference():
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits = logits[:, :-1].float() / temperature
        return (torch.where(scored, logprobs_from_logits(logits, ids[:, 1:]), 0.0),
                torch.where(scored, entropy_from_logits(logits), 0.0))

    def chunked():
        lp, h = next_token_logprobs(model, ids, attention_mask, position_ids, labels, temperature, entropy=True,
                                    entropy_grad=True, chunk_elements=5 * vocab)
        return lp[:, 1:], h[:, 1:]

    results = []
    for compute in (reference, chunked):
        model.zero_grad(set_to_none=True)
        lp, h = compute()
        (lp.sum() + 0.3 * h.sum()).backward()
        results.append((lp.detach(), h.detach(), full_gradients(model)))
    (ref_lp, ref_h, ref_g), (lp, h, grads) = results
    problems = []
    if not torch.allclose(lp, ref_lp, atol=1e-5, rtol=0):
        problems.append(f"{path}: logprobs differ by {(lp - ref_lp).abs().max():.3g}")
    if not torch.allclose(h, ref_h, atol=1e-5, rtol=0):
        problems.append(f"{path}: entropies differ by {(h - ref_h).abs().max():.3g}")
    for name, grad in grads.items():
        scale = ref_g[name].abs().max()
        if not scale > 0 or (grad - ref_g[name]).abs().max() > 1e-4 * scale:
            problems.append(f"{path}: the gradient of {name} differs by {(grad - ref_g[name]).abs().max():.3g} "
                            f"(largest element {scale:.3g})")
    return problems


def main() -> int:
    d = distributed.init("cpu", "float32")
    problems = [p for path in sys.argv[1:] for p in check(path, d)]
    distributed.close()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"rank {d.rank}/{d.world_size}: logprobs, entropies and gradients equal the full logits'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
