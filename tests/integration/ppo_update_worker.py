"""One PPO update on a fixed batch, as one rank of `torchrun --nproc-per-node N` (or alone).

Used by test_trainer_distributed.py: the same global batch and seed at N = 1 and N = 2 must give
the same parameters. Writes rank 0's full policy and value parameters, the update's statistics
and the full optimizer state to OUT/params.pt.

    python tests/integration/ppo_update_worker.py SFT_DIR REWARD_DIR OUT OPTIMIZER [save|load|update] [ADVANTAGE] \
        [DTYPE] [LORA_RANK]

With `save` the state after the update is checkpointed in OUT; with `load` the update is skipped
and the state is loaded from the checkpoint in OUT instead (at whatever world size this runs).
With LORA_RANK > 0 the policy and value model train adapters; the file then also holds the
logprobs of the reference (the policy with its adapter off) and of the policy, on the batch.
"""
from __future__ import annotations

import json
import pathlib
import random
import sys

import torch

from services.trainer import checkpoint, distributed, lora
from services.trainer.config import Config
from services.trainer.experience import Batch, Rollout, Sample, policy_forward
from services.trainer.loop import make_experience, ppo_update
from services.trainer.state import PPOState


def fixed_rollout(vocab: int, n: int = 16, seed: int = 0, group: int = 1) -> Rollout:
    """n samples with prompts and responses of varied lengths, scores and finish reasons, in
    groups of `group` completions of one prompt."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(3, 10))]
        response = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 12))]
        samples.append(Sample(f"p{i}", prompt, response, "text", [-rng.random() * 3 for _ in response],
                              rng.choice(["eos", "length"]), 1, rng.gauss(0, 1)))
    return Rollout(samples, [s.prompt for s in samples], generated_tokens=sum(len(s.response_ids) for s in samples),
                   group_sizes=[group] * (n // group))


def full_optimizer_state(state: PPOState) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: get_optimizer_state_dict(model, opt, options=options).get("state", {})
            for name, (model, opt) in state.trained().items()}


def main() -> None:
    sft, reward, out, optimizer = sys.argv[1:5]
    action = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "update" else ""
    advantage = sys.argv[6] if len(sys.argv) > 6 else "gae"
    dtype = sys.argv[7] if len(sys.argv) > 7 else "float32"
    rank = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    group = 1 if advantage in ("gae", "reinforce_pp") else 2
    out = pathlib.Path(out)
    prompts = out / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(4)))
    config = Config.model_validate(dict(
        policy_addresses=["unused:1"], reward_address="unused:2", sft_model=sft, reward_model=reward,
        prompts=str(prompts), out=str(out), device="cpu", seed=3,
        rollout=dict(batch_size=16 // group, n=group),
        ppo=dict(epochs=2, minibatch_size=8, lr=1e-4, beta=0.1, max_grad_norm=1e9, advantage=advantage),
        lora=dict(rank=rank, alpha=2 * rank or 16)))
    d = distributed.init("cpu", dtype)
    state = PPOState.build(config, d)
    if optimizer == "sgd":  # the update is then the gradient itself: equal parameters mean equal gradients
        state.policy_opt = torch.optim.SGD(lora.trainable(state.policy), lr=1e-3)
        state.policy_sched = torch.optim.lr_scheduler.LambdaLR(state.policy_opt, lambda s: 1.0)
        if state.value is not None:
            state.value_opt = torch.optim.SGD(lora.trainable(state.value), lr=1e-3)
            state.value_sched = torch.optim.lr_scheduler.LambdaLR(state.value_opt, lambda s: 1.0)
    # The dtype the models' linear layers really computed in (their outputs), for the bf16 test.
    compute_dtypes: set[str] = set()
    for model in (state.policy, state.value):
        for module in (model.modules() if model is not None else []):
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(
                    lambda module, inputs, output: compute_dtypes.add(str(output.dtype).removeprefix("torch.")))
    stats, advantages = {}, None
    rollout = fixed_rollout(lora.base_of(state.policy).config.vocab_size, group=group)
    # B starts at zero, where A's gradient is zero too: LoRA starts from a trained-looking adapter.
    if rank:
        for model in state.trained():
            set_adapters(getattr(state, model), seed=7)

    def parameters() -> dict:
        """policy.NAME and value.NAME -> a copy of each trained parameter in full (rank 0; None
        elsewhere): the whole models, or with LoRA their adapters and the value model's head."""
        out = {}
        for prefix, (model, _) in state.trained().items():
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            for n, t in distributed.full_parameters(model, d):
                if n in trained:
                    out[f"{prefix}.{n}"] = None if t is None else t.clone()
        return out

    initial = parameters() if rank else None
    if action == "load":
        state.load(checkpoint.latest(out), d)
    else:
        exp = make_experience(state, rollout, config, pad_id=1, d=d)
        stats, advantages = ppo_update(state, exp, config, d), exp.advantages
        state.step = 1
        state.prompts.next(5)  # a position inside the second pass over the 4 prompts
    if action == "save":
        state.save(out, tokenizer=None, d=d)
    optimizer_state = full_optimizer_state(state)
    params = parameters()
    result = {"params": params, "stats": stats, "advantages": advantages, "optimizer": optimizer_state,
              "step": state.step, "prompts": state.prompts.state_dict(), "reference": state.reference is not None}
    if rank:
        result |= logprobs(state, rollout, config, d) | {"initial": initial}
    if d.main:
        torch.save(result | {"compute_dtypes": sorted(compute_dtypes)}, out / f"params-{action or 'update'}-{d.world_size}.pt")
    distributed.close()


def set_adapters(model, seed: int) -> None:
    """Every lora_B to N(0, 0.02) drawn from `seed`, the same full tensors on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    generator = torch.Generator().manual_seed(seed)
    values = {name: 0.02 * torch.randn(p.shape, generator=generator)
              for name, p in model.named_parameters() if ".lora_B." in name}
    set_model_state_dict(model, values, options=StateDictOptions(full_state_dict=True, strict=False))


@torch.no_grad()
def logprobs(state: PPOState, rollout: Rollout, config: Config, d) -> dict:
    """The reference's and the policy's logprobs of the batch (on every rank, as a step computes
    them), and those of the SFT model loaded as a plain Hugging Face model (rank 0)."""
    from transformers import AutoModelForCausalLM

    batch = Batch.of(rollout.samples, pad_id=1)
    with state.reference_model() as reference:
        ref = policy_forward(reference, batch, 1.0)[0]
    policy = policy_forward(state.policy, batch, 1.0)[0]
    plain = (policy_forward(AutoModelForCausalLM.from_pretrained(config.sft_model), batch, 1.0)[0] if d.main
             else None)
    return {"ref_logprobs": ref, "policy_logprobs": policy, "plain_logprobs": plain, "mask": batch.response_mask}


if __name__ == "__main__":
    main()
