"""The trainer's batch layout, prompt order and configuration."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from services.trainer.config import Config, ConfigError, RMConfig, SFTConfig, load
from services.trainer.experience import Batch, Sample, policy_forward, value_forward
from services.trainer.state import Prompts


def sample(prompt_ids, response_ids) -> Sample:
    return Sample("p", prompt_ids, response_ids, "r", [0.0] * len(response_ids), "eos", 1, 0.0)


def test_left_padded_batch_gives_each_sequence_its_unpadded_logprobs_and_values(tiny_policy_dir, tiny_reward_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    value = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    responses = [[20, 21], [22, 23, 24, 25]]
    batch = Batch.of([sample(p, r) for p, r in zip(prompts, responses)], pad_id=policy.config.pad_token_id)
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.prompt_width == 5 and len(batch) == 2
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
        # A subset of rows keeps the global widths, so each row computes the same numbers.
        half = batch.rows([1])
        torch.testing.assert_close(policy_forward(policy, half, 1.0)[0], logprobs[1:2])


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


REQUIRED = ["policy_addresses=[a:1]", "reward_address=r:2", "sft_model=s", "reward_model=m", "prompts=p"]


def test_config_file_then_set_then_flags(tmp_path):
    file = tmp_path / "ppo.yaml"
    file.write_text("policy_addresses: [a:1]\nreward_address: r:2\nsft_model: s\nreward_model: rm\nprompts: p\n"
                    "steps: 5\nppo: {beta: 0.1, kl_estimator: k1, lr: 3e-6}\n")
    config = load(Config, str(file), ["ppo.beta=0.2", "ppo.kl_estimator=k3"], {"steps": 7,
                                                                              "policy_addresses": ["x:1", "y:2"]})
    assert (config.ppo.beta, config.ppo.kl_estimator, config.steps) == (0.2, "k3", 7)
    assert config.policy_addresses == ["x:1", "y:2"] and config.reward_address == "r:2"
    assert config.ppo.lr == 3e-6  # YAML 1.1 reads "3e-6" as a string; the config reads it as the number it is


@pytest.mark.parametrize("override, message", [
    ("ppo.betta=1", "ppo.betta: Extra inputs are not permitted"),
    ("ppo.kl_estimator=k4", "ppo.kl_estimator: Input should be 'k1', 'k2' or 'k3'"),
    ("ppo.advantage=grpo", "ppo.advantage grpo compares the completions of a prompt: rollout.n must be >= 2, got 1"),
    ("ppo.advantage=ppo", "ppo.advantage: Input should be 'gae', 'grpo', 'rloo' or 'reinforce_pp'"),
    ("ppo.minibatch_size=24", "rollout.batch_size x rollout.n (64 x 1) must be a multiple of ppo.minibatch_size (24)"),
    ("rollout.batch_size=10", "multiple of ppo.minibatch_size"),
    ("steps=abc", "steps: Input should be a valid integer"),
    ("ppo.lr=-1", "ppo.lr: Input should be greater than 0"),
    ("rollout.temperature=3", "rollout.temperature: Input should be less than or equal to 2"),
    ("services=7", "services: Input should be a valid dictionary"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(Config, None, [override, *REQUIRED])


def test_a_missing_key_is_named():
    with pytest.raises(ConfigError, match="reward_address is required"):
        load(Config, None, [s for s in REQUIRED if not s.startswith("reward_address")])
    with pytest.raises(ConfigError, match="model is required"):
        load(SFTConfig, None, ["data=d", "out=o"])


def test_a_critic_free_run_needs_no_reward_model_and_a_critic_one_does():
    without = [s for s in REQUIRED if not s.startswith("reward_model")]
    config = load(Config, None, [*without, "ppo.advantage=rloo", "rollout.n=4"])
    assert not config.critic and config.reward_model is None
    assert load(Config, None, REQUIRED).critic
    with pytest.raises(ConfigError, match="reward_model is required with ppo.advantage gae"):
        load(Config, None, without)


def test_defaults_are_for_real_models():
    """The library's defaults are the peers' (TRL, OpenRLHF) for real checkpoints; the demo keeps
    its tiny-model values to itself."""
    assert load(SFTConfig, None, ["model=m", "data=d", "out=o"]).lr == 1e-5
    assert load(RMConfig, None, ["model=m", "data=d", "out=o"]).lr == 1e-5
    assert load(Config, None, REQUIRED).ppo.lr == 1e-6


@pytest.mark.parametrize("job, args, key", [
    ("ppo", ["--set", "steps=abc"], "steps"),
    ("ppo", ["--set", "ppo.clip=0"], "ppo.clip"),
    ("sft", ["--set", "epochs=-1", "--model", "m", "--data", "d", "--out", "o"], "epochs"),
    ("rm", ["--set", "unknown_key=1", "--model", "m", "--data", "d", "--out", "o"], "unknown_key"),
])
def test_a_bad_config_exits_2_naming_the_key_before_any_model_loads(tmp_path, job, args, key):
    extra = [] if job != "ppo" else ["--policy", "a:1", "--reward", "r:2", "--sft-model", str(tmp_path / "nothing"),
                                     "--reward-model", "m", "--prompts", "p"]
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "services.cli", "train", job, *extra, *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"{key}:" in result.stderr and "invalid config" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60  # no model was loaded (there is none at these paths anyway)


def test_print_config_shows_every_default(tmp_path):
    result = subprocess.run([sys.executable, "-m", "services.cli", "train", "ppo", "--print-config", *sum(
        (["--set", s] for s in REQUIRED), [])], capture_output=True, text=True, timeout=120, check=True)
    import yaml
    printed = yaml.safe_load(result.stdout)
    assert printed["ppo"]["clip"] == 0.2 and printed["rollout"]["batch_size"] == 64
    assert Config.model_validate(printed) == load(Config, None, REQUIRED)


def _fleet_config(**rollout):
    from services.trainer.config import Config
    return Config.model_validate(dict(policy_addresses=["a:1"], reward_address="r:1", sft_model="m", prompts="p",
                                      rollout={"batch_size": 64, "max_tokens": 64, **rollout},
                                      ppo=dict(advantage="grpo", minibatch_size=16)))


def test_the_fleet_check_names_each_limit_and_the_replica():
    """`--set rollout.n=100000` used to pass --print-config and every check until the first
    Generate; what the live services will refuse is now said before the first step."""
    import types

    from services.trainer.config import ConfigError, check_fleet

    policy = types.SimpleNamespace(max_n=64, max_prompts=1024, max_model_len=512)
    small = types.SimpleNamespace(max_n=64, max_prompts=16, max_model_len=100)
    reward = types.SimpleNamespace(max_pairs=256, max_length=512)
    check_fleet(_fleet_config(n=2), 1, {"a:1": policy}, reward, (40, 0))  # fits
    with pytest.raises(ConfigError) as e:
        check_fleet(_fleet_config(n=100000), 2, {"a:1": policy, "b:2": small}, reward, (40, 7))
    text = str(e.value)
    assert "rollout.n is 100000, above policy replica a:1's limit of 64 completions per prompt (its --max-n)" in text
    assert "32 prompts per Generate call, above policy replica b:2's limit of 16 (its --max-prompts)" in text
    assert "prompt 7 of p is 40 tokens, and with rollout.max_tokens 64 that is more than policy replica b:2's " \
           "max_model_len 100" in text
    assert "pairs per Score call" not in text  # the trainer cuts its Score calls to the service's --max-pairs
    with pytest.raises(ConfigError, match="rollout.max_tokens 600 \\(\\+ EOS\\) is more than the reward model's max "
                                          "length 512"):
        check_fleet(_fleet_config(n=2, max_tokens=600), 1, {}, reward, (40, 0))
    check_fleet(_fleet_config(n=2, max_tokens=600), 1, {}, types.SimpleNamespace(max_pairs=256, max_length=0),
                (40, 0))  # a rules-only reward service has no length limit
