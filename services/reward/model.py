"""The reward model: R(x, y) = a linear head on the hidden state of the last real token.

Shared by reward training and the reward service, so a pair is encoded and
pooled the same way in both. No gRPC here.
"""
from __future__ import annotations

import json
import pathlib

import torch

from services.common.errors import InvalidArgument
from services.common.text import encode_pair

META_FILE = "reward_meta.json"
TRUNCATIONS = ("reject", "keep_end_of_prompt")


def _dtype(dtype) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise InvalidArgument(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    return getattr(torch, str(dtype))


def load_reward_model(path, device="cpu", dtype=None):
    """(model, tokenizer, meta) from a Hugging Face directory; meta is reward_meta.json or {}.

    The model is in eval mode; its config carries a pad id so that HF's own
    forward (which pools at the last non-pad token) also works on batches.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = pathlib.Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_dtype(dtype))
    if model.config.num_labels != 1:
        raise InvalidArgument(f"a reward model has one label; {path} has num_labels={model.config.num_labels}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    meta_path = path / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    return model, tokenizer, meta


def fit(prompt_ids: list[int], response_ids: list[int], max_length: int, truncation: str = "reject",
        ) -> tuple[list[int], bool]:
    """(prompt_ids + response_ids, truncated) within max_length tokens.

    "keep_end_of_prompt" drops tokens from the start of the prompt: the end of
    the prompt is what the response answers. A response that does not fit
    alone is rejected in either mode: cutting it would score a different answer.
    """
    if truncation not in TRUNCATIONS:
        raise InvalidArgument(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    n = len(prompt_ids) + len(response_ids)
    if n <= max_length:
        return list(prompt_ids) + list(response_ids), False
    if truncation == "reject":
        raise InvalidArgument(f"prompt + response is {n} tokens, more than max_length {max_length} "
                              f"(truncation=reject; keep_end_of_prompt drops the start of the prompt)")
    if len(response_ids) > max_length:
        raise InvalidArgument(f"response is {len(response_ids)} tokens, more than max_length {max_length} "
                              f"even without the prompt")
    keep = max_length - len(response_ids)
    return (list(prompt_ids[len(prompt_ids) - keep:]) if keep else []) + list(response_ids), True


def encode(tokenizer, prompt: str, response: str, max_length: int, truncation: str = "reject",
           ) -> tuple[list[int], bool]:
    """Token ids the reward model reads for (prompt, response): format_prompt(prompt) + response + EOS."""
    prompt_ids, response_ids = encode_pair(tokenizer, prompt, response)
    return fit(prompt_ids, response_ids, max_length, truncation)


def pad_batch(batch: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask). Right padding: with causal attention the real
    tokens never see the padding, so a padded pair scores as it would alone."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """R(x, y) per row [B]: the score head at the last real token (the EOS).

    Pooled here from the attention mask rather than by HF's search for the last
    non-pad id, which picks the wrong token when pad id == EOS id or when a pad
    id occurs inside the text.
    """
    head = getattr(model, "score", None)
    backbone = getattr(model, model.base_model_prefix, None)
    if head is None or backbone is None:  # not a decoder-style classifier: trust its own pooling
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(-1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(pooled)[:, 0].float()


def score_batch(model, batch_of_id_lists: list[list[int]], pad_id: int) -> list[float]:
    """Raw scores of already-encoded pairs, one forward pass."""
    if not batch_of_id_lists:
        return []
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_batch(batch_of_id_lists, pad_id, device)
    with torch.inference_mode():
        return rewards(model, input_ids, attention_mask).tolist()
