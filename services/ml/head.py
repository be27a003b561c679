"""The reward model: R(x, y) = a linear head on the hidden state of the last real token.

Shared by reward training, the reward service and the trainer's value model (the same head on
every position), so the head and its pooling exist once. No gRPC here.
"""
from __future__ import annotations

import json
import pathlib

import torch

from services.common.errors import InvalidArgument

META_FILE = "reward_meta.json"


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


def pad_batch(batch: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask). Right padding: with causal attention the real
    tokens never see the padding, so a padded pair scores as it would alone. (SFT pads its
    labels with it too, with -100.)"""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The score head on every hidden state [B, T]: V(s_t) of a value model started from the reward
    model; at the last real token it is R(x, y)."""
    head = getattr(model, "score", None)
    backbone = getattr(model, model.base_model_prefix, None)
    if head is None or backbone is None:
        raise InvalidArgument(f"{type(model).__name__} has no per-position score head (score + {model.base_model_prefix})")
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return head(hidden)[..., 0].float()


def rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """R(x, y) per row [B]: the score head at the last real token (the EOS).

    Pooled here from the attention mask rather than by HF's search for the last
    non-pad id, which picks the wrong token when pad id == EOS id or when a pad
    id occurs inside the text. Left or right padding alike.
    """
    if getattr(model, "score", None) is None or getattr(model, model.base_model_prefix, None) is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()  # its own pooling
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(-1)
    return values(model, input_ids, attention_mask).gather(1, last[:, None])[:, 0]


def score_batch(model, batch_of_id_lists: list[list[int]], pad_id: int) -> list[float]:
    """Raw scores of already-encoded pairs, one forward pass."""
    if not batch_of_id_lists:
        return []
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_batch(batch_of_id_lists, pad_id, device)
    with torch.inference_mode():
        return rewards(model, input_ids, attention_mask).tolist()
