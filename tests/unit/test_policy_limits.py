"""Request checks of the policy (services.policy.limits), without vLLM: each refusal names
the field and the limit; every default is filled in."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.policy import limits
from services.common.text import ChatMessage as Message
from services.policy.limits import Chat, Limits, Sampling

LIMITS = Limits(max_n=8, max_prompts=4, max_text_bytes=100, vocab_size=50, max_model_len=64)


def test_defaults():
    c = limits.check_sampling(Sampling(), LIMITS, longest_prompt=10)
    assert (c.n, c.temperature, c.top_p, c.top_k, c.max_tokens, c.seed) == (1, 1.0, 1.0, 0, 16, None)
    assert limits.check_sampling(Sampling(top_k=-1), LIMITS, 10).top_k == 0  # -1 is off, as 0


@pytest.mark.parametrize("sampling,words", [
    (Sampling(n=0), "params.n must be in [1, 8], got 0"),
    (Sampling(n=9), "params.n must be in [1, 8], got 9"),
    (Sampling(temperature=-0.5), "params.temperature must be >= 0"),
    (Sampling(temperature=float("nan")), "params.temperature must be >= 0"),
    (Sampling(temperature=2.5), "params.temperature must be <= 2.0"),
    (Sampling(n=2, temperature=0.0), "params.n must be 1 when params.temperature is 0"),
    (Sampling(top_p=0.0), "params.top_p must be in (0, 1]"),
    (Sampling(top_k=-2), "params.top_k must be 0 or -1 (off) or >= 1"),
    (Sampling(max_tokens=0), "params.max_tokens must be in [1, max_model_len - prompt length] = [1, 54]"),
    (Sampling(max_tokens=55), "= [1, 54], got 55"),
    (Sampling(stop=["x"] * 17), "params.stop holds at most 16"),
    (Sampling(stop=[""]), "params.stop[0] must be non-empty and at most 256 bytes"),
    (Sampling(stop=["é" * 129]), "params.stop[0] must be non-empty and at most 256 bytes, got 258"),
    (Sampling(stop_token_ids=[1] * 17), "params.stop_token_ids holds at most 16"),
    (Sampling(stop_token_ids=[50]), "params.stop_token_ids[0] must be in [0, 50), got 50"),
    # vLLM would take -1 as "unseeded": same seed, same completion must hold for every seed accepted
    (Sampling(seed=-1), "params.seed must be in [0, 2^63 - 1] = [0, 9223372036854775807], got -1"),
    (Sampling(seed=-2**63), "params.seed must be in [0, 2^63 - 1]"),
    (Sampling(seed=2**63), "params.seed must be in [0, 2^63 - 1]"),
])
def test_sampling_refusals(sampling, words):
    with pytest.raises(InvalidArgument) as e:
        limits.check_sampling(sampling, LIMITS, longest_prompt=10)
    assert words in str(e.value)


def test_seeds_in_range_are_kept():
    for seed in (0, 1, 2**63 - 1):
        assert limits.check_sampling(Sampling(seed=seed), LIMITS, 10).seed == seed


def test_seeded_n_above_one_only_where_the_backend_can():
    cpu = Limits(**{**LIMITS.__dict__, "seed_needs_single_n": True})
    with pytest.raises(InvalidArgument, match="params.seed needs params.n = 1 on the CPU backend, got n=2"):
        limits.check_sampling(Sampling(n=2, seed=3), cpu, 10)
    assert limits.check_sampling(Sampling(n=2, seed=3), LIMITS, 10).n == 2


def test_stream_needs_one_completion():
    with pytest.raises(InvalidArgument, match="params.n must be 1 for GenerateStream, got 2"):
        limits.check_sampling(Sampling(n=2), LIMITS, 10, stream=True)


@pytest.mark.parametrize("prompt,words", [
    ("", "prompts[0].text must not be empty"),
    ("x" * 101, "prompts[0].text is 101 bytes or more; the limit is 100 bytes (--max-text-bytes)"),
    ("é" * 51, "prompts[0].text is 102 bytes or more; the limit is 100"),  # bytes, not characters
    (Chat(()), "prompts[0].messages.messages must hold 1 to 256 messages, got 0"),
    (Chat((Message("user", "hi"),) * 257), "must hold 1 to 256 messages, got 257"),
    (Chat((Message("user", "hi"), Message("user\x00\n", "there"))),
     "prompts[0].messages.messages[1].role must be one of system, user, assistant"),
    (Chat((Message("user", "a" * 60), Message("assistant", "b" * 40))),
     "prompts[0].messages.messages holds 113 bytes of text or more, limit --max-text-bytes=100"),
])
def test_prompt_refusals_before_tokenizing(prompt, words):
    with pytest.raises(InvalidArgument) as e:
        limits.check_prompt_input(prompt, "prompts[0]", LIMITS)
    assert words in str(e.value)


def test_prompts_at_the_limits_pass():
    limits.check_prompt_input("x" * 100, "p", LIMITS)
    limits.check_prompt_input(Chat((Message("user", "a" * 46), Message("assistant", "b" * 41))), "p", LIMITS)
    limits.check_prompt_input([1, 2, 3], "p", LIMITS)  # token ids are checked once known


def test_a_huge_text_is_refused_without_encoding_it():
    class NoEncode(str):
        def encode(self, *a, **k):
            raise AssertionError("encoded a text that its length already puts over the limit")

    with pytest.raises(InvalidArgument, match="10000000 bytes or more"):
        limits.check_prompt_input(NoEncode("x" * 10_000_000), "prompt", LIMITS)


@pytest.mark.parametrize("ids,given,words", [
    ([1, 50], True, "prompts[0].token_ids must be in [0, 50), got 50"),
    ([1, -3], True, "prompts[0].token_ids must be in [0, 50), got -3"),
    ([], True, "prompts[0] must not be empty"),
    ([1] * 64, False, "prompts[0] has 64 tokens; it must be shorter than max_model_len 64"),
])
def test_token_id_refusals(ids, given, words):
    with pytest.raises(InvalidArgument) as e:
        limits.check_token_ids(ids, "prompts[0]", LIMITS, given=given)
    assert words in str(e.value)


def test_counts_and_request_id():
    with pytest.raises(InvalidArgument, match=r"prompts must hold \[1, 4\] prompts, got 0"):
        limits.check_prompt_count(0, LIMITS)
    with pytest.raises(InvalidArgument, match=r"prompts must hold \[1, 4\] prompts, got 5"):
        limits.check_prompt_count(5, LIMITS)
    with pytest.raises(InvalidArgument, match="request_id must be at most 128 bytes, got 129"):
        limits.check_request_id("r" * 129)
    limits.check_request_id("r" * 128)
