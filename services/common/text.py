"""Prompt and response text -> model input, the one way every part of the pipeline does it.

SFT, the reward model, PPO and the reward service all tokenize `format_prompt(prompt)` and the response
separately, without special tokens, and end the response with EOS: prompt_ids + response_ids + [eos].
Tokenizing the two parts apart keeps the prompt/response boundary exact (BPE merges never cross it), so
the tokens the policy generated are the tokens that get scored and trained on.

A conversation (chat messages) is rendered by `render_messages`, on the policy and the reward service
alike, so the same conversation gives the same prompt tokens on both.

No torch here: the tokenizer is any object with the Hugging Face tokenizer interface.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from services.common.errors import InvalidArgument

MAX_MESSAGES = 256  # common.proto: ChatMessages.messages
# common.proto: ChatMessage.role. A template renders a role it does not know as bare text (or
# not at all), so an unknown one would reach the model as something else than the caller meant.
ROLES = ("system", "user", "assistant")
TRUNCATIONS = ("reject", "keep_end_of_prompt")  # the names every front end maps its own spelling to


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def render_messages(tokenizer, messages: Sequence[ChatMessage], field: str = "messages") -> str:
    """The conversation as the model reads it: the tokenizer's chat template with the generation
    prompt appended (the assistant turn opened), as vLLM's chat API renders it. Tokenize the result
    with add_special_tokens=False: the template already wrote the special tokens it wants."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument(f"{field}: the served model's tokenizer has no chat template; send text or token_ids")
    try:
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - templates raise on what they do not accept (roles, order)
        raise InvalidArgument(f"{field}: the chat template refused this conversation: {exc}") from None


def check_messages(messages: Sequence[ChatMessage], field: str, max_text_bytes: int) -> tuple[ChatMessage, ...]:
    """1 to MAX_MESSAGES turns, each with one of ROLES; all roles and contents together within
    max_text_bytes."""
    if not 1 <= len(messages) <= MAX_MESSAGES:
        raise InvalidArgument(f"{field} must hold 1 to {MAX_MESSAGES} messages, got {len(messages)}")
    total = 0
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            got = "it is empty" if not m.role else f"got {m.role[:40]!r}"
            raise InvalidArgument(f"{field}[{i}].role must be one of {', '.join(ROLES)}; {got}")
        total += utf8_size(m.role, f"{field}[{i}].role", max_text_bytes)
        total += utf8_size(m.content, f"{field}[{i}].content", max_text_bytes)
        if total > max_text_bytes:
            raise InvalidArgument(f"{field} holds {total} bytes of text or more, limit --max-text-bytes="
                                  f"{max_text_bytes}")
    return tuple(messages)


def utf8_size(text: str, field: str, limit: int | None = None) -> int:
    """Bytes of `text` in UTF-8; with a `limit`, a text longer than it in characters (each is a
    byte at least) counts as its length, without encoding a copy of a huge string. A str decoded
    from JSON may hold lone surrogates (\\ud800), which no tokenizer accepts: that is the caller's
    mistake, said here, not a crash later."""
    if limit is not None and len(text) > limit:
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{field} is not valid Unicode: a lone surrogate at character {exc.start}") from None


def format_prompt(tokenizer, prompt: str) -> str:
    """A text prompt as the model sees it: one user turn through the chat template when the tokenizer
    has one, else prompt + newline."""
    if getattr(tokenizer, "chat_template", None):
        return render_messages(tokenizer, [ChatMessage("user", prompt)], "prompt")
    return prompt + "\n"


def encode_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) with response_ids ending in exactly one EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    prompt_ids = list(tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if not response_ids or response_ids[-1] != eos:
        response_ids.append(eos)
    return prompt_ids, response_ids


def fit(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int, truncation: str = "reject",
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
