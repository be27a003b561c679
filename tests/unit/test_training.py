"""SFT and reward-model training pieces: loss masking, encoding, truncation, pooling, batching."""
import json
import math
import random

import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.text import fit
from services.ml import head as rm
from services.reward import tokens
from services.trainer.rm import bradley_terry_loss, noise_ceiling
from services.trainer import data as D
from services.trainer import formats
from services.trainer.sft import sft_nll


@pytest.fixture(scope="module")
def tokenizer():
    from services.demo.tiny_model import build_tokenizer
    return build_tokenizer(0)


@pytest.fixture(scope="module")
def reward_model(tiny_reward_dir):
    return rm.load_reward_model(tiny_reward_dir)


def test_sft_nll_counts_only_labelled_tokens_as_cross_entropy_of_the_full_logits_did(tiny_policy_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 1, 1]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[D.IGNORE_INDEX, D.IGNORE_INDEX, 7, 8, 9, 10],
                           [D.IGNORE_INDEX, 12, 13, 14, D.IGNORE_INDEX, D.IGNORE_INDEX]])
    nll, n = sft_nll(model, ids, attention_mask, labels)
    # before: every position's logits, shifted by one, cross-entropy over the labelled ones
    logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1].float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=D.IGNORE_INDEX, reduction="sum")
    assert n == 7
    assert nll.item() == pytest.approx(expected.item(), rel=1e-5)
    nll.backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_encode_sft_masks_the_prompt_and_ends_with_eos(tokenizer):
    from services.common.text import format_prompt
    row = {"prompt": "How do I prepare for my calculus exam?", "response": "Just relax, it will work out."}
    ids, labels, truncated = formats.sft_example(tokenizer, row, "prompt_completion", 256, "row")
    prompt_len = len(tokenizer(format_prompt(tokenizer, "How do I prepare for my calculus exam?"),
                               add_special_tokens=False)["input_ids"])
    assert not truncated and len(ids) == len(labels)
    assert labels[:prompt_len] == [D.IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == "Just relax, it will work out."
    ids2, labels2, truncated2 = formats.sft_example(tokenizer, row, "prompt_completion", prompt_len + 2, "row")
    assert truncated2 and len(ids2) == prompt_len + 2 == len(labels2)
    with pytest.raises(InvalidArgument, match="nothing to learn within max_length"):
        formats.sft_example(tokenizer, {**row, "response": "x"}, "prompt_completion", prompt_len, "row")


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for margins 1, 0, -2
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    assert bradley_terry_loss(chosen, rejected, "sum").item() == pytest.approx(expected * len(chosen), rel=1e-6)


def test_fit_truncation_modes():
    prompt, response = [1, 2, 3, 4], [7, 8, 0]
    assert fit(prompt, response, 7) == ([1, 2, 3, 4, 7, 8, 0], False)
    with pytest.raises(InvalidArgument, match="max_length 5"):
        fit(prompt, response, 5, "reject")
    assert fit(prompt, response, 5, "keep_end_of_prompt") == ([3, 4, 7, 8, 0], True)
    assert fit(prompt, response, 3, "keep_end_of_prompt") == ([7, 8, 0], True)
    with pytest.raises(InvalidArgument, match="response is 3 tokens"):
        fit(prompt, response, 2, "keep_end_of_prompt")
    with pytest.raises(InvalidArgument, match="truncation"):
        fit(prompt, response, 7, "cut_anywhere")


def test_encode_matches_text_helpers(tokenizer):
    from services.common.text import encode_pair
    p, r = encode_pair(tokenizer, "Any tips for my poetry debate next week?", "Don't worry, you will be fine.")
    ids, truncated = tokens.encode(tokenizer, "Any tips for my poetry debate next week?", "Don't worry, you will be fine.", 512)
    assert ids == p + r and not truncated and ids[-1] == tokenizer.eos_token_id


def test_score_batch_padded_equals_alone(reward_model, tokenizer):
    model, tok, _ = reward_model
    a, _ = tokens.encode(tok, "How do I prepare for my calculus exam?", "Just relax, it will work out.", 256)
    b, _ = tokens.encode(tok, "How do I prepare for my calculus exam?",
                     "Here is a plan: 1. Review the key calculus topics. 2. Solve practice problems every day. "
                     "3. Sleep well before the exam.", 256)
    alone = rm.score_batch(model, [a], tok.pad_token_id) + rm.score_batch(model, [b], tok.pad_token_id)
    together = rm.score_batch(model, [a, b], tok.pad_token_id)
    assert together == pytest.approx(alone, abs=1e-5)
    assert alone[0] != pytest.approx(alone[1], abs=1e-6)  # the model does tell them apart
    # Pooling follows the attention mask, so even padding with the EOS id (pad == eos) scores the same.
    assert rm.score_batch(model, [a, b], tok.eos_token_id) == pytest.approx(alone, abs=1e-5)
    assert rm.score_batch(model, [], tok.pad_token_id) == []


def test_score_batch_agrees_with_hf_pooling(reward_model, tokenizer):
    model, tok, _ = reward_model
    a, _ = tokens.encode(tok, "Any tips for my poetry debate next week?", "Don't worry, you will be fine.", 256)
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([a])).logits[0, 0].item()
    assert rm.score_batch(model, [a], tok.pad_token_id)[0] == pytest.approx(hf, abs=1e-5)


def test_load_reward_model_reads_meta(tiny_reward_dir, tmp_path):
    import shutil
    d = tmp_path / "rm"
    shutil.copytree(tiny_reward_dir, d)
    (d / rm.META_FILE).write_text(json.dumps({"score_mean": 1.5, "score_std": 2.0, "max_length": 128}))
    model, tok, meta = rm.load_reward_model(d, device="cpu", dtype="float32")
    assert meta["score_mean"] == 1.5 and model.config.pad_token_id == tok.pad_token_id
    assert not model.training
    with pytest.raises(InvalidArgument, match="dtype"):
        rm.load_reward_model(d, dtype="float7")


def test_split_train_eval_is_deterministic_and_disjoint():
    rows = list(range(100))
    train, ev = D.split_train_eval(rows, 0.1, seed=3)
    assert len(ev) == 10 and len(train) == 90 and sorted(train + ev) == rows
    assert D.split_train_eval(rows, 0.1, seed=3) == (train, ev)
    assert D.split_train_eval(rows, 0.1, seed=4) != (train, ev)
    assert D.split_train_eval(rows, 0.0, seed=3)[1] == []
    with pytest.raises(InvalidArgument, match="eval_fraction"):
        D.split_train_eval(rows, 1.0, seed=0)


def test_length_grouped_batches_cover_everything_once():
    rng = random.Random(0)
    lengths = [rng.randint(5, 160) for _ in range(1000)]
    batches = D.length_grouped_batches(lengths, 16, random.Random(1), group=8)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) <= 16 for b in batches)
    # Grouping by length wastes far less on padding than random batches.
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    rng.shuffle(flat)
    shuffled = [flat[i:i + 16] for i in range(0, 1000, 16)]
    assert padded < 0.8 * sum(len(b) * max(lengths[i] for i in b) for b in shuffled)


def test_lr_schedule_by_hand():
    f = D.lr_lambda(warmup_steps=4, total_steps=14, schedule="cosine", min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert f(14) == pytest.approx(0.1)
    g = D.lr_lambda(warmup_steps=1, total_steps=11, schedule="linear", min_ratio=0.0)
    assert g(6) == pytest.approx(0.5)


def test_unreadable_data_is_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(InvalidArgument, match=r"cannot read .*d.jsonl"):
        formats.load_rows(str(p))
    with pytest.raises(InvalidArgument, match="is not .jsonl, .json or .parquet"):
        (tmp_path / "d.csv").write_text("a,b\n")
        formats.load_rows(str(tmp_path / "d.csv"))


def test_noise_ceiling_from_meta_or_flags(tmp_path):
    rows = [{"flipped": True}] + [{"flipped": False}] * 3
    data = tmp_path / "prefs.jsonl"
    assert noise_ceiling(data, rows) == pytest.approx(0.75)
    (tmp_path / "meta.json").write_text(json.dumps({"noise_ceiling": 0.9}))
    assert noise_ceiling(data, rows) == pytest.approx(0.9)
    assert noise_ceiling(tmp_path / "other" / "prefs.jsonl", [{}]) is None


def test_models_load_with_dropout_off(tmp_path, tiny_policy_dir):
    """Dropout would make the trainer's logprobs of the same tokens differ between two passes."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from services.trainer import distributed
    d = tmp_path / "m"
    shutil.copytree(tiny_policy_dir, d)
    config = AutoConfig.from_pretrained(d)
    config.attention_dropout = 0.3
    config.save_pretrained(d)
    model = distributed.load_model(AutoModelForCausalLM, d, distributed.init("cpu", "float32"))
    assert model.config.attention_dropout == 0.0 and model.training
    frozen = distributed.load_model(AutoModelForCausalLM, d, distributed.init("cpu", "float32"), trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
