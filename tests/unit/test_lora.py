"""The lora config section and the adapters' layout (services.trainer.lora), on the tiny models.

Training with adapters is checked elsewhere: 2 ranks vs 1, the reference and resume in
tests/integration/test_trainer_distributed.py, SFT and RM in test_train_jobs.py, the merged push
against a served merged export in tests/e2e/test_ppo_distributed.py."""
from __future__ import annotations

import pytest
import torch

from services.trainer import distributed, lora
from services.trainer.config import Config, ConfigError, LoRA, SFTConfig, load

PPO = dict(policy_addresses=["p:1"], reward_address="r:2", sft_model="sft", reward_model="rm", prompts="p.jsonl")


def test_lora_is_off_by_default_and_named_after_the_output_directory():
    assert not SFTConfig(model="m", data="d", out="runs/sft").lora.enabled
    cfg = SFTConfig(model="m", data="d", out="runs/sft-lora/", lora=dict(rank=8))
    assert cfg.lora.enabled and cfg.lora.name == "sft-lora" and cfg.lora.target_modules == "all-linear"
    assert Config(**PPO, out="runs/job-a", lora=dict(rank=4, name="tenant-a")).lora.name == "tenant-a"
    assert Config(**PPO, out="runs/job-a", lora=dict(rank=4)).lora.push == "merged"


@pytest.mark.parametrize("tree, message", [
    (dict(**PPO, lora=dict(rank=8, dropout=0.1)), "lora.dropout must be 0 for ppo"),
    (dict(**PPO, export_merged="merged"), "export_merged needs lora.rank > 0"),
    (dict(**PPO, lora=dict(rank=-1)), "lora.rank: Input should be greater than or equal to 0"),
    (dict(**PPO, lora=dict(rank=8, push="adapter")), "lora.push: Input should be 'merged'"),
])
def test_bad_lora_settings_name_the_key(tmp_path, tree, message):
    import yaml
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=message):
        load(Config, str(path))


def test_all_linear_targets_every_projection_of_the_decoder_but_not_the_heads(tiny_policy_dir, tiny_reward_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    projections = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    assert lora.target_modules(policy, LoRA(rank=4)) == projections
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir, num_labels=1)
    assert lora.target_modules(reward, LoRA(rank=4)) == projections
    with pytest.raises(ConfigError, match="lora.target_modules"):
        lora.wrap(policy, LoRA(rank=4, target_modules=["no_such_proj"]), "causal_lm", seed=0)


def test_merged_parameters_are_peft_merge_under_the_full_models_names(tiny_policy_dir):
    """W + (alpha / r) B A per targeted weight, as peft's own merge_and_unload computes it, under
    the names and shapes of the model without adapters (what the policy server accepts)."""
    from transformers import AutoModelForCausalLM

    d = distributed.init("cpu", "float32")
    try:
        model = distributed.load_model(AutoModelForCausalLM, tiny_policy_dir, d, lora=LoRA(rank=4, alpha=8), seed=1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)  # B starts at zero: a trained adapter is not
        assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
        merged = dict(lora.merged_parameters(model, d))
        plain = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
        served = lora.served_tensors(model)  # what the trainer's image pushes: the same tensors, unsharded here
        assert [(name, shape) for name, shape, _ in served] == [(n, tuple(p.shape)) for n, p in plain.named_parameters()]
        assert list(merged) == [name for name, _ in plain.named_parameters()]
        for name, _, part in served:
            torch.testing.assert_close(part().float(), merged[name].float(), rtol=0, atol=0, msg=name)
        expected = model.merge_and_unload().state_dict()
        changed = 0
        for name, tensor in merged.items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
            changed += not torch.equal(tensor, plain.get_parameter(name))
        assert changed == 14  # the 7 projections of each of the 2 layers, nothing else
    finally:
        distributed.close()


def test_an_adapter_directory_where_a_model_is_expected_names_the_fix(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="sft_model: .* holds a LoRA adapter, not a model; .*--export-merged"):
        lora.check_not_adapter(tmp_path, "sft_model")
    (tmp_path / "config.json").write_text("{}")  # a model with an adapter next to it is a model
    lora.check_not_adapter(tmp_path, "sft_model")
