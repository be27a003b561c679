"""What the reward model reads: the token ids of a (prompt, response) pair or of an OpenRLHF
query, fitted to the max length. No torch and no gRPC: the tokenizer is any object with the
Hugging Face tokenizer interface.

Every form ends the same way, as training encodes a pair: prompt tokens + response tokens + one
EOS, the prompt templated exactly once.
"""
from __future__ import annotations

from typing import Union

from services.common.errors import InvalidArgument
from services.common.text import ChatMessage, encode_pair, fit, format_prompt, render_messages


# A prompt is text, token ids (a list) or a conversation (a tuple of ChatMessage).
Input = Union[str, list[int], tuple[ChatMessage, ...]]


def is_chat(x) -> bool:
    return isinstance(x, tuple)


def encode(tokenizer, prompt: str, response: str, max_length: int, truncation: str = "reject",
           ) -> tuple[list[int], bool]:
    """Token ids the reward model reads for a text pair: format_prompt(prompt) + response + EOS."""
    prompt_ids, response_ids = encode_pair(tokenizer, prompt, response)
    return fit(prompt_ids, response_ids, max_length, truncation)


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_text(tokenizer, prompt: Input, field: str) -> str:
    """The prompt as the model reads it, as text: a text prompt is one user turn through the chat
    template, a conversation is rendered by it, token ids are decoded as they are."""
    if isinstance(prompt, str):
        return format_prompt(tokenizer, prompt)
    if is_chat(prompt):
        return render_messages(tokenizer, prompt, field)
    return tokenizer.decode(prompt, skip_special_tokens=False)


def prompt_ids(tokenizer, prompt: Input, field: str) -> list[int]:
    """Token ids are used as they are (already templated); text and conversations are templated here."""
    if isinstance(prompt, list):
        return list(prompt)
    return _tokens(tokenizer, prompt_text(tokenizer, prompt, field))


def response_ids(tokenizer, response: Union[str, list[int]]) -> list[int]:
    """The response's ids ending in one EOS: a completion that stopped on EOS already has it."""
    ids = _tokens(tokenizer, response) if isinstance(response, str) else list(response)
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids


def response_text(tokenizer, response: Union[str, list[int]]) -> str:
    """The response as text, without the EOS that ends it (what a reward function reads)."""
    if isinstance(response, str):
        return response
    ids = list(response)
    while ids and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
    return tokenizer.decode(ids, skip_special_tokens=False)


def strip_padding(tokenizer, text: str) -> str:
    """`text` without pad and EOS token text at either end, as OpenRLHF's own reward server strips
    a query before it appends one EOS (a decoded batch is left-padded before the prompt and
    right-padded after the response's EOS). Linear in the text, whatever it holds."""
    marks = [t for t in (tokenizer.eos_token, tokenizer.pad_token) if t]
    start, end, moved = 0, len(text), True
    while moved:
        moved = False
        for mark in marks:
            if text.startswith(mark, start, end):
                start, moved = start + len(mark), True
            if text.endswith(mark, start, end):
                end, moved = end - len(mark), True
    return text[start:end]


def query_ids(tokenizer, query: str, prompt: str | None, max_length: int, truncation: str,
              ) -> tuple[list[int], bool]:
    """An OpenRLHF query, already stripped of its padding (strip_padding), as OpenRLHF's server
    reads it: one EOS appended, tokenized as it is (no second template). Cutting a too-long query
    needs to know where its prompt ends: `prompt`, the stripped prompt it starts with, or None
    when it does not start with one."""
    ids = _tokens(tokenizer, query + tokenizer.eos_token)
    if len(ids) <= max_length:
        return ids, False
    if truncation == "reject":
        raise InvalidArgument(f"the query is {len(ids)} tokens, more than max_length {max_length} "
                              f"(truncation=reject; keep_end_of_prompt drops the start of the prompt)")
    if prompt is None:
        raise InvalidArgument(f"the query is {len(ids)} tokens, more than max_length {max_length}, and does not "
                              f"start with its prompt, so keep_end_of_prompt cannot tell which tokens to drop")
    n = len(_tokens(tokenizer, prompt))
    return fit(ids[:n], ids[n:], max_length, truncation)
