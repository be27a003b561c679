"""One conversation, sent as chat messages to both services: the tokens the policy generated from
are exactly the prompt tokens the reward model scores (the same template, rendered the same way
by services.common.text), and a plain-text prompt means what each contract says it means."""
from __future__ import annotations

import pytest

from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command
from services.policy.client import PolicyClient
from services.reward.client import RewardClient

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

CONVERSATION = [{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "How do I prepare for my calculus exam?"},
                {"role": "assistant", "content": "Make a plan."},
                {"role": "user", "content": "And the night before?"}]


def test_the_same_conversation_is_the_same_tokens_on_both_services(tiny_policy_dir, tiny_reward_dir, tmp_path):
    from transformers import AutoTokenizer

    ports = free_port(), free_port()
    policy = ChildServer(rlhf_command("serve", "policy", "--model", str(tiny_policy_dir), "--host", "127.0.0.1",
                                      "--port", str(ports[0]), "--metrics-port", "0", "--kv-cache-gib", "1"),
                         port=ports[0], service="rlhf.v1.PolicyService", log_path=tmp_path / "policy.log",
                         env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    reward = ChildServer(rlhf_command("serve", "reward", "--model", str(tiny_reward_dir), "--host", "127.0.0.1",
                                      "--port", str(ports[1]), "--metrics-port", "0"),
                         port=ports[1], service="rlhf.v1.RewardService", log_path=tmp_path / "reward.log")
    with policy, reward, PolicyClient(policy.address, ClientConfig(), timeout=120) as pc, \
            RewardClient(reward.address, ClientConfig()) as rc:
        result = pc.generate([CONVERSATION], max_tokens=12, temperature=0.0)[0]
        seen = result.prompt_token_ids
        # What the policy read is the chat template with the assistant turn opened...
        tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
        rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
        assert seen == tokenizer(rendered, add_special_tokens=False).input_ids
        # ... and the reward service scores those very tokens: the conversation and the policy's
        # prompt ids, each with the same answer, read the same number of tokens to the same score.
        answer = result.completions[0].text or "Sleep early."
        by_messages, by_ids = rc.score([(CONVERSATION, answer)]).results[0], rc.score([(seen, answer)]).results[0]
        assert by_messages.num_tokens == by_ids.num_tokens
        assert by_messages.raw_score == by_ids.raw_score
        # Plain text: a completion prompt on the policy (no template), one user turn on the reward service.
        question = CONVERSATION[1]["content"]
        raw = pc.generate([question], max_tokens=1, temperature=0.0)[0].prompt_token_ids
        assert raw == tokenizer(question).input_ids
        one_turn = rc.score([(question, answer)]).results[0]
        as_messages = rc.score([([{"role": "user", "content": question}], answer)]).results[0]
        assert (one_turn.num_tokens, one_turn.raw_score) == (as_messages.num_tokens, as_messages.raw_score)
