"""Prompt and response text -> model input, the one way every part of the pipeline does it.

SFT, the reward model, PPO and the reward service all tokenize `format_prompt(prompt)` and the response
separately, without special tokens, and end the response with EOS: prompt_ids + response_ids + [eos].
Tokenizing the two parts apart keeps the prompt/response boundary exact (BPE merges never cross it), so
the tokens the policy generated are the tokens that get scored and trained on.

No torch here: the tokenizer is any object with the Hugging Face tokenizer interface.
"""
from __future__ import annotations


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: the chat template when the tokenizer has one, else prompt + newline."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
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
