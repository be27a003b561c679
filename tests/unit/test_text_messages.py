"""Chat messages -> prompt text, the one rendering both services use, on the real demo tokenizer."""
import pytest

from services.common.errors import InvalidArgument
from services.common.text import ChatMessage, check_messages, format_prompt, render_messages, utf8_size
from services.demo.tiny_model import build_tokenizer

CHAT = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"),
        ChatMessage("user", "Name a color."))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_render_is_the_chat_template_with_the_assistant_turn_opened(tokenizer):
    assert render_messages(tokenizer, CHAT) == (
        "Be brief.\n<|user|>Hi<|assistant|>Hello!<|eos|><|user|>Name a color.<|assistant|>")
    assert render_messages(tokenizer, CHAT[1:2]) == format_prompt(tokenizer, "Hi")


def test_no_template_or_a_refusing_template_is_invalid_argument(tokenizer):
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(InvalidArgument, match="pairs\\[2\\].prompt: .*no chat template"):
        render_messages(plain, CHAT, "pairs[2].prompt")
    strict = build_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(InvalidArgument, match="prompt: the chat template refused this conversation: unknown role tool"):
        render_messages(strict, (ChatMessage("tool", "x"),), "prompt")


def test_check_messages_limits():
    assert check_messages(list(CHAT), "m", 100) == CHAT
    size = sum(len(m.role) + len(m.content) for m in CHAT)
    with pytest.raises(InvalidArgument, match=f"m holds {size} bytes of text or more, limit --max-text-bytes={size - 1}"):
        check_messages(CHAT, "m", size - 1)
    with pytest.raises(InvalidArgument, match="m must hold 1 to 256 messages, got 0"):
        check_messages((), "m", 100)
    for role in ("", "hacker", "user\x00\n", "User", " user", "tool"):
        with pytest.raises(InvalidArgument, match="m\\[1\\].role must be one of system, user, assistant; (got|it is empty)"):
            check_messages((CHAT[0], ChatMessage(role, "x")), "m", 100)
    with pytest.raises(InvalidArgument, match="m\\[0\\].content is not valid Unicode: a lone surrogate at character 2"):
        check_messages((ChatMessage("user", "ab\ud800"),), "m", 100)


def test_utf8_size_counts_bytes():
    assert utf8_size("café ☕", "f") == len("café ☕".encode())
