"""A checkpoint restores optimizer, scheduler, RNG, data position and KL controller exactly."""
from __future__ import annotations

import json
import random

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from services.trainer import checkpoint
from services.trainer.loop import Prompts
from services.trainer.ppo import AdaptiveKLController


def test_roundtrip_restores_everything(tmp_path, tiny_policy_dir, tiny_reward_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    value = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    policy(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    kl = AdaptiveKLController(0.1, 6.0, 100)
    kl.update(9.0, 16)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": f"p{i}", "split": "train"}) + "\n" for i in range(10)))
    prompts = Prompts(str(prompts_file), seed=3)
    prompts.next(7)

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = checkpoint.save(tmp_path / "run", 4, policy=policy, value=value, tokenizer=tokenizer,
                           state=dict(opt=opt.state_dict(), kl_ctl=kl.state_dict(), prompts=prompts.state_dict()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), prompts.next(5))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)

    assert checkpoint.latest(tmp_path / "run") == path
    state = checkpoint.load_state(path)
    restored = Prompts(str(prompts_file), seed=3)
    restored.load_state_dict(state["prompts"])
    assert (random.random(), np.random.rand(), torch.rand(1).item(), restored.next(5)) == expected
    assert state["step"] == 4
    kl2 = AdaptiveKLController(1.0, 1.0, 1)
    kl2.load_state_dict(state["kl_ctl"])
    assert kl2.value == kl.value and kl2.target == 6.0
    opt2 = torch.optim.AdamW(AutoModelForCausalLM.from_pretrained(path / "policy").parameters(), lr=1e-3)
    opt2.load_state_dict(state["opt"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    reloaded = AutoModelForCausalLM.from_pretrained(path / "policy")
    for (n, a), b in zip(policy.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), n
