"""What the reward model reads from an OpenRLHF query: padding stripped the way OpenRLHF's server strips it."""
import time

import pytest

from services.demo.tiny_model import build_tokenizer
from services.reward.tokens import strip_padding


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("text, want", [
    ("<|pad|><|pad|><|user|>Hi<|assistant|>Yo<|eos|><|pad|><|pad|>", "<|user|>Hi<|assistant|>Yo"),
    ("<|eos|><|user|>Hi<|assistant|>Yo<|eos|><|eos|>", "<|user|>Hi<|assistant|>Yo"),
    ("<|user|>Hi<|pad|><|assistant|>Yo", "<|user|>Hi<|pad|><|assistant|>Yo"),  # inside: kept
    ("<|pad|><|eos|>", ""),
    ("plain text", "plain text"),
])
def test_strip_padding(tok, text, want):
    assert strip_padding(tok, text) == want


def test_strip_padding_is_linear_on_hostile_text(tok):
    """A regex like (eos|pad)+$ backtracks quadratically over a long run of pads that is not at
    the end; the stripping runs in the one thread that prepares every request."""
    text = "<|pad|>" * 50_000 + "x" + "<|pad|>" * 50_000
    start = time.perf_counter()
    assert strip_padding(tok, text) == "x"
    assert time.perf_counter() - start < 1.0
