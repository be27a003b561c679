"""The tiny-model factory: Hugging Face loads what it writes, by seed, tied or not, Llama or Qwen2; vLLM's
CPU engine serves the policy."""
import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from services.common.text import encode_pair, format_prompt
from services.demo.tiny_model import build_model

PROMPT = "How do I prepare for my calculus exam?"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "policy": build_model("policy", root / "policy", seed=0),
        "policy_seed1": build_model("policy", root / "policy_seed1", seed=1),
        "reward": build_model("reward", root / "reward", seed=1),
    }


def tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_policy_loads_and_runs(models):
    path = models["policy"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert cfg["eos_token_id"] == tok.eos_token_id != tok.pad_token_id == cfg["pad_token_id"]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    ids = tok([format_prompt(tok, PROMPT)] * 2, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    assert model.config.attention_dropout == 0.0 and not model.training


def test_reward_loads_scores_shape_b1_and_ignores_padding(models):
    path = models["reward"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    short = sum(encode_pair(tok, PROMPT, "Just relax."), [])
    long = sum(encode_pair(tok, PROMPT, "Here is a plan: 1. Review the key calculus topics."), [])
    pad = tok.pad_token_id
    batch = torch.tensor([short + [pad] * (len(long) - len(short)), long])
    mask = (batch != pad).long()
    with torch.no_grad():
        scores = model(input_ids=batch, attention_mask=mask).logits
        alone = model(input_ids=torch.tensor([short])).logits
    assert scores.shape == (2, 1)
    # the score is read at the last real token, not at the padding
    torch.testing.assert_close(scores[0], alone[0], rtol=1e-4, atol=1e-5)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, models):
    # built again in a fresh process: tokenizer training and weight init are deterministic, not cached
    code = "import sys; from services.demo.tiny_model import build_model; build_model('policy', sys.argv[1], seed=0)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, capture_output=True)
    a, b, c = models["policy"], tmp_path / "again", models["policy_seed1"]
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()  # shared token ids
    ta, tc = tensors(a), tensors(c)
    assert not torch.equal(ta["model.embed_tokens.weight"], tc["model.embed_tokens.weight"])


def test_tied_and_untied_embeddings(tmp_path, models):
    untied = tensors(models["policy"])
    assert "lm_head.weight" in untied
    assert not torch.equal(untied["lm_head.weight"], untied["model.embed_tokens.weight"])
    tied_path = build_model("policy", tmp_path / "tied", tie_embeddings=True)
    assert "lm_head.weight" not in tensors(tied_path)
    model = AutoModelForCausalLM.from_pretrained(tied_path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_qwen2_both_kinds(tmp_path):
    policy = AutoModelForCausalLM.from_pretrained(build_model("policy", tmp_path / "p", arch="qwen2"))
    reward = AutoModelForSequenceClassification.from_pretrained(build_model("reward", tmp_path / "r", arch="qwen2"))
    assert policy.config.model_type == reward.config.model_type == "qwen2"
    ids = torch.tensor([[2, 300, 301, 3]])
    with torch.no_grad():
        assert policy(ids).logits.shape == (1, 4, policy.config.vocab_size)
        assert reward(ids).logits.shape == (1, 1)


def test_other_sizes_and_cli(tmp_path, capsys):
    from services.demo import tiny_model
    args = argparse.Namespace(kind="policy", out=str(tmp_path / "m"), tie_embeddings=False, seed=0, arch="llama",
                              hidden_size=256, num_layers=3, num_heads=4, intermediate_size=512, max_position=1024)
    assert tiny_model.main(args) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (3, 4)
    assert model.config.max_position_embeddings == 1024
    assert AutoTokenizer.from_pretrained(tmp_path / "m").model_max_length == 1024
    with pytest.raises(ValueError, match="multiple of num_heads"):
        build_model("policy", tmp_path / "bad", hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="kind"):
        build_model("critic", tmp_path / "bad")


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from transformers import AutoTokenizer

    if __name__ == "__main__":
        path = sys.argv[1]
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok(tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], tokenize=False,
                                          add_generation_prompt=True), add_special_tokens=False).input_ids
        llm = LLM(model=path, dtype="float32", max_model_len=512, gpu_memory_utilization=0.1,
                  enforce_eager=True, seed=0)
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=0, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0]
        markers = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
        print("RESULT " + json.dumps({"prompt_ids": ids, "token_ids": list(out.token_ids), "vocab": len(tok),
                                      "markers": markers}))
""")


@pytest.mark.vllm
def test_vllm_cpu_generates_from_the_tiny_policy(tmp_path, models):
    script = tmp_path / "gen.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(models["policy"]), PROMPT], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert [result["prompt_ids"][0], result["prompt_ids"][-1]] == result["markers"]  # <|user|> ... <|assistant|>
    assert len(result["token_ids"]) == 12
    assert all(0 <= t < result["vocab"] for t in result["token_ids"])
