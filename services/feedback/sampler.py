"""Pairs to judge: a prompt, two answers sampled from the live policy, and the reward model's
score of each at that moment. A core: the policy and reward clients are handed in (anything
with their asyncio methods), so this module imports no transport.

Both answers come from one Generate call with n = 2, so they share the weight version: a pair
never compares two policies. Prompts are drawn uniformly from the prompt set (TRL's prompt-only
format, read by services.trainer.formats: a string or a conversation per row; a string is one user
turn, as in PPO).
"""
from __future__ import annotations

import dataclasses
import logging
import random

from services.common.errors import Unavailable
from services.feedback.store import NewPair

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What the policy is asked for; stored with every pair."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_prompts(path: str, prompt_key: str | None = None) -> list:
    """Every training prompt of a data set (JSONL/JSON/Parquet/save_to_disk, `prompt` per row)."""
    from services.trainer import formats

    rows = formats.load_rows(path, {"prompt": prompt_key} if prompt_key else None)
    return formats.prompts(rows, path)


def as_conversation(prompt) -> list[dict]:
    """What the policy is sent: a string prompt is one user turn, rendered by the served chat
    template, as the trainer renders it (services.common.text.format_prompt); a text prompt to the
    policy service would be raw completion text."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class Sampler:
    def __init__(self, prompts: list, policy, reward, sampling: Sampling, seed: int | None = None):
        if not prompts:
            raise ValueError("no prompts to sample from")
        self.prompts, self.policy, self.reward, self.sampling = prompts, policy, reward, sampling
        self.rng = random.Random(seed)

    async def sample(self) -> NewPair:
        """A new pair; Unavailable when the policy cannot answer (the page says so and retries)."""
        prompt = self.rng.choice(self.prompts)
        try:
            (result,) = await self.policy.generate([as_conversation(prompt)], n=2, **self.sampling.as_dict())
        except Exception as e:  # noqa: BLE001 - an RPC error of any kind: the policy is not there for us
            raise Unavailable(f"the policy service did not answer: {_brief(e)}") from None
        first, second = result.completions[:2]
        scores, version = await self._score(prompt, first.text, second.text)
        return NewPair(prompt=prompt, first=first.text, second=second.text, policy_version=first.weight_version,
                       sampling=self.sampling.as_dict(), first_finish=first.finish_reason,
                       second_finish=second.finish_reason, rm_score_first=scores[0], rm_score_second=scores[1],
                       rm_version=version)

    async def _score(self, prompt, first: str, second: str) -> tuple[tuple[float | None, float | None], str | None]:
        """The reward model's scores and version; (None, None), None when it cannot score (an empty
        answer, the service down): people still judge the pair, the drift metric leaves it out."""
        if self.reward is None or not first.strip() or not second.strip():
            return (None, None), None
        try:
            reply = await self.reward.score([(prompt, first), (prompt, second)], truncation="keep_end_of_prompt")
        except Exception as e:  # noqa: BLE001
            log.warning("the reward service did not score a pair: %s", _brief(e))
            return (None, None), None
        return (reply.results[0].score, reply.results[1].score), reply.model_version


def _brief(e: Exception) -> str:
    details = getattr(e, "details", None)
    return f"{type(e).__name__}: {details() if callable(details) else e}"[:300]
