"""Checks of a generation request against the served model and the server's limits.

Pure functions over plain values, no vLLM: tests/unit/test_policy_limits.py runs them
without an engine. Every refusal names the field and the limit.
"""
from __future__ import annotations

import dataclasses
import math

from services.common.errors import InvalidArgument
from services.common.text import ChatMessage, check_messages, utf8_size

DEFAULT_MAX_TOKENS = 16
MAX_TEMPERATURE = 2.0  # vLLM refuses hotter sampling
GREEDY_BELOW = 1e-5  # vLLM samples greedily under this temperature
MAX_STOP = 16
MAX_STOP_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
MAX_SEED = 2**63 - 1  # vLLM takes -1 as "unseeded": negative seeds are refused instead


@dataclasses.dataclass(frozen=True)
class Chat:
    """A conversation, rendered by the served tokenizer's chat template (services.common.text)."""
    messages: tuple[ChatMessage, ...]


Prompt = str | list[int] | Chat  # raw completion text, token ids as given, or a conversation


@dataclasses.dataclass
class Sampling:
    """SamplingParams of the proto; None = the documented default."""
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class Limits:
    max_n: int
    max_prompts: int
    max_text_bytes: int
    vocab_size: int
    max_model_len: int
    # vLLM's CPU sampler kills the engine on a seeded request with n > 1 ("CPU Generator
    # does not use offset"): refused instead where it runs.
    seed_needs_single_n: bool = False


def check_request_id(request_id: str) -> None:
    size = len(request_id.encode())
    if size > MAX_REQUEST_ID_BYTES:
        raise InvalidArgument(f"request_id must be at most {MAX_REQUEST_ID_BYTES} bytes, got {size}")


def check_prompt_count(count: int, limits: Limits) -> None:
    if not 1 <= count <= limits.max_prompts:
        raise InvalidArgument(f"prompts must hold [1, {limits.max_prompts}] prompts, got {count}")


def check_prompt_input(prompt: Prompt, field: str, limits: Limits) -> None:
    """What can be checked before tokenizing: the text's bytes, the conversation's shape."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidArgument(f"{field}.text must not be empty")
        size = utf8_size(prompt, f"{field}.text", limits.max_text_bytes)
        if size > limits.max_text_bytes:
            raise InvalidArgument(f"{field}.text is {size} bytes or more; the limit is {limits.max_text_bytes} "
                                  f"bytes (--max-text-bytes)")
    elif isinstance(prompt, Chat):
        check_messages(prompt.messages, f"{field}.messages.messages", limits.max_text_bytes)


def check_token_ids(ids: list[int], field: str, limits: Limits, *, given: bool) -> None:
    """The prompt's tokens, given by the caller (`given`) or from the tokenizer."""
    if given:
        bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"{field}.token_ids must be in [0, {limits.vocab_size}), got {bad}")
    if not ids:
        raise InvalidArgument(f"{field} must not be empty")
    if len(ids) >= limits.max_model_len:
        raise InvalidArgument(f"{field} has {len(ids)} tokens; it must be shorter than max_model_len "
                              f"{limits.max_model_len}")


def check_sampling(s: Sampling, limits: Limits, longest_prompt: int, *, stream: bool = False) -> Sampling:
    """`s` with every default filled in (top_k 0 for off), once every value is in range."""
    n = 1 if s.n is None else s.n
    if not 1 <= n <= limits.max_n:
        raise InvalidArgument(f"params.n must be in [1, {limits.max_n}], got {n}")
    if stream and n != 1:
        raise InvalidArgument(f"params.n must be 1 for GenerateStream, got {n}")
    temperature = 1.0 if s.temperature is None else s.temperature
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InvalidArgument(f"params.temperature must be >= 0, got {temperature}")
    if temperature > MAX_TEMPERATURE:
        raise InvalidArgument(f"params.temperature must be <= {MAX_TEMPERATURE}, got {temperature}")
    if n > 1 and temperature < GREEDY_BELOW:  # n identical copies
        raise InvalidArgument(f"params.n must be 1 when params.temperature is 0 (greedy), got n={n}")
    if s.seed is not None:
        if not 0 <= s.seed <= MAX_SEED:
            raise InvalidArgument(f"params.seed must be in [0, 2^63 - 1] = [0, {MAX_SEED}], got {s.seed}")
        if n > 1 and limits.seed_needs_single_n:
            raise InvalidArgument(f"params.seed needs params.n = 1 on the CPU backend, got n={n}")
    top_p = 1.0 if s.top_p is None else s.top_p
    if not 0 < top_p <= 1:
        raise InvalidArgument(f"params.top_p must be in (0, 1], got {top_p}")
    top_k = 0 if s.top_k is None else s.top_k
    if top_k < -1:
        raise InvalidArgument(f"params.top_k must be 0 or -1 (off) or >= 1, got {top_k}")
    room = limits.max_model_len - longest_prompt
    max_tokens = DEFAULT_MAX_TOKENS if s.max_tokens is None else s.max_tokens
    if not 1 <= max_tokens <= room:
        raise InvalidArgument(f"params.max_tokens must be in [1, max_model_len - prompt length] = [1, {room}], "
                              f"got {max_tokens}")
    if len(s.stop) > MAX_STOP:
        raise InvalidArgument(f"params.stop holds at most {MAX_STOP} strings, got {len(s.stop)}")
    for i, stop in enumerate(s.stop):
        size = len(stop.encode())
        if not stop or size > MAX_STOP_BYTES:
            raise InvalidArgument(f"params.stop[{i}] must be non-empty and at most {MAX_STOP_BYTES} bytes, "
                                  f"got {size} bytes")
    if len(s.stop_token_ids) > MAX_STOP:
        raise InvalidArgument(f"params.stop_token_ids holds at most {MAX_STOP} ids, got {len(s.stop_token_ids)}")
    for i, t in enumerate(s.stop_token_ids):
        if not 0 <= t < limits.vocab_size:
            raise InvalidArgument(f"params.stop_token_ids[{i}] must be in [0, {limits.vocab_size}), got {t}")
    return Sampling(n=n, temperature=temperature, top_p=top_p, top_k=max(top_k, 0), max_tokens=max_tokens,
                    stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), seed=s.seed, ignore_eos=s.ignore_eos,
                    logprobs=s.logprobs, prompt_logprobs=s.prompt_logprobs)
