"""Prompt formatting and prompt/response tokenization, on the real demo tokenizer."""
import pytest

from services.common.text import encode_pair, format_prompt
from services.demo.tiny_model import build_tokenizer

PROMPT = "How do I prepare for my calculus exam?"
RESPONSE = "Here is a plan: 1. Review the key calculus topics. 2. Sleep well before the exam."


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def plain_tokenizer():
    tok = build_tokenizer()
    tok.chat_template = None
    return tok


def test_format_prompt_uses_the_chat_template(tokenizer):
    assert format_prompt(tokenizer, PROMPT) == f"<|user|>{PROMPT}<|assistant|>"


def test_format_prompt_without_template_adds_a_newline(plain_tokenizer):
    assert format_prompt(plain_tokenizer, PROMPT) == PROMPT + "\n"


def test_encode_pair_splits_at_the_boundary_and_ends_with_one_eos(tokenizer):
    prompt_ids, response_ids = encode_pair(tokenizer, PROMPT, RESPONSE)
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert prompt_ids[0] == user and prompt_ids[-1] == assistant
    assert response_ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in response_ids[:-1]
    assert tokenizer.decode(response_ids[:-1]) == RESPONSE
    assert tokenizer.decode(prompt_ids) == format_prompt(tokenizer, PROMPT)
    # no BOS or other special token is added to the response
    assert not set(response_ids[:-1]) & set(tokenizer.all_special_ids)


def test_encode_pair_does_not_double_eos(tokenizer):
    _, with_eos = encode_pair(tokenizer, PROMPT, RESPONSE + tokenizer.eos_token)
    _, without = encode_pair(tokenizer, PROMPT, RESPONSE)
    assert with_eos == without


def test_encode_pair_empty_response_is_just_eos(tokenizer):
    _, response_ids = encode_pair(tokenizer, PROMPT, "")
    assert response_ids == [tokenizer.eos_token_id]


def test_encode_pair_without_template(plain_tokenizer):
    prompt_ids, response_ids = encode_pair(plain_tokenizer, PROMPT, RESPONSE)
    assert plain_tokenizer.decode(prompt_ids) == PROMPT + "\n"
    assert response_ids[-1] == plain_tokenizer.eos_token_id


def test_text_module_imports_no_torch():
    import subprocess
    import sys
    code = "import sys, services.common.text; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
