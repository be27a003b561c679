"""The trainer's batch layout, prompt order and config handling."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from services.trainer import config as config_mod
from services.trainer.loop import Prompts, make_batch, policy_forward, value_forward


def test_left_padded_batch_gives_each_sequence_its_unpadded_logprobs_and_values(tiny_policy_dir, tiny_reward_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    value = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    responses = [[20, 21], [22, 23, 24, 25]]
    batch = make_batch(prompts, responses, pad_id=policy.config.pad_token_id)
    assert batch["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    with torch.no_grad():
        logprobs, _ = policy_forward(policy, batch, temperature=1.0)
        values = value_forward(value, batch)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            alone = torch.log_softmax(policy(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
            expected = alone.gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(logprobs[row, :len(r)], expected, atol=1e-5, rtol=1e-5)
            hidden = value.base_model(input_ids=ids).last_hidden_state
            expected_v = value.score(hidden[0, len(p) - 1:-1]).squeeze(-1)
            torch.testing.assert_close(values[row, :len(r)], expected_v, atol=1e-5, rtol=1e-5)


def test_prompts_are_seeded_cover_an_epoch_and_resume_from_their_position(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"p{i}", "split": "train"} for i in range(10)] + [{"prompt": "held out", "split": "eval"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = Prompts(str(path), seed=1)
    first_epoch = a.next(4) + a.next(4) + a.next(2)
    assert sorted(first_epoch) == sorted(f"p{i}" for i in range(10))  # every train prompt once, no eval prompt
    b = Prompts(str(path), seed=1)
    b.next(3)
    c = Prompts(str(path), seed=1)
    c.load_state_dict(b.state_dict())
    assert b.next(12) == c.next(12)
    assert Prompts(str(path), seed=2).next(10) != Prompts(str(path), seed=1).next(10)


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(config=None, set=[], policy_addresses=None, reward_address=None, sft_model=None, reward_model=None,
                prompts=None, out=None, steps=None)
    return argparse.Namespace(**{**base, **kw})


def test_config_file_then_set_then_flags(tmp_path):
    file = tmp_path / "ppo.yaml"
    file.write_text("policy_addresses: [a:1]\nreward_address: r:2\nsft_model: s\nreward_model: rm\nprompts: p\n"
                    "steps: 5\nppo: {beta: 0.1, kl_estimator: k1}\n")
    config = config_mod.load(_args(tmp_path, config=str(file), set=["ppo.beta=0.2", "ppo.kl_estimator=k3"], steps=7,
                                   policy_addresses=["x:1", "y:2"]))
    assert (config.ppo.beta, config.ppo.kl_estimator, config.steps) == (0.2, "k3", 7)
    assert config.policy_addresses == ["x:1", "y:2"] and config.reward_address == "r:2"


@pytest.mark.parametrize("override, message", [
    ("ppo.betta=1", "unknown config key 'ppo.betta'"),
    ("ppo.kl_estimator=k2", "kl_estimator must be k1 or k3"),
    ("rollout.batch_size=10", "multiple of ppo.minibatch_size"),
])
def test_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(SystemExit, match=message):
        config_mod.load(_args(tmp_path, set=[override, "policy_addresses=[a:1]", "reward_address=r", "sft_model=s",
                                             "reward_model=m", "prompts=p"]))
