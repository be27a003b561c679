"""Tiny models built locally: a byte-level BPE tokenizer trained on the demo corpus and a randomly
initialised Llama (or Qwen2) of any size, saved as a Hugging Face directory.

No model hub is reachable from tests or the demo, so every model starts here:

    rlhf init-model --kind policy --out models/policy
    rlhf init-model --kind reward --out models/reward --seed 1

Both kinds share one tokenizer (trained with a fixed corpus seed), so a policy and a reward model built
here always agree on token ids. The same arguments give the same files, weights bit for bit.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import pathlib
import sys

log = logging.getLogger(__name__)

EOS, PAD, USER, ASSISTANT = "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [EOS, PAD, USER, ASSISTANT]  # ids 0..3
VOCAB_SIZE = 1024
# A user turn renders as "<|user|>{content}<|assistant|>"; a finished assistant turn ends with EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + EOS +
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


@functools.lru_cache(maxsize=4)
def _tokenizer_json(seed: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from services.demo.data import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return tok.to_str()


def build_tokenizer(seed: int = 0):
    """A PreTrainedTokenizerFast trained on the demo corpus generated with `seed` (same seed, same file)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(seed)),
        eos_token=EOS, pad_token=PAD, additional_special_tokens=[USER, ASSISTANT],
        model_max_length=512, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(kind: str, out, *, arch: str = "llama", tie_embeddings: bool = False, seed: int = 0,
                hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 256,
                max_position: int = 512) -> pathlib.Path:
    """Write a randomly initialised policy (causal LM) or reward model (sequence classifier, one label)
    with the demo tokenizer to `out`; return `out` as a Path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    if kind not in ("policy", "reward"):
        raise ValueError(f"kind must be 'policy' or 'reward', got {kind!r}")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    if min(hidden_size, num_layers, num_heads, intermediate_size, max_position) < 1:
        raise ValueError("hidden_size, num_layers, num_heads, intermediate_size and max_position must be >= 1")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    head_dim = hidden_size // num_heads
    if head_dim < 32:
        log.warning("head_dim %d < 32: vLLM's CPU attention rejects it (64 works)", head_dim)

    import torch
    import transformers

    # The tokenizer always comes from the fixed corpus seed: every model built here shares token ids.
    tokenizer = build_tokenizer(0)
    tokenizer.model_max_length = max_position
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config_cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
        attention_dropout=0.0, initializer_range=0.02, tie_word_embeddings=tie_embeddings,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True,
    )
    if kind == "reward":
        config.num_labels = 1
        config.problem_type = "regression"
    name = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    model_cls = getattr(transformers, f"{name}ForCausalLM" if kind == "policy" else f"{name}ForSequenceClassification")

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    generation = transformers.GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if kind == "policy":
        model.generation_config = generation

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if kind == "reward":
        generation.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("wrote %s %s (%s, %.2fM params) to %s", arch, kind, model_cls.__name__, n_params / 1e6, out)
    return out


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = build_model(args.kind, args.out, arch=args.arch, tie_embeddings=args.tie_embeddings, seed=args.seed,
                          hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                          intermediate_size=args.intermediate_size, max_position=args.max_position)
    except ValueError as e:
        print(f"rlhf init-model: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
