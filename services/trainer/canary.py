"""The canary: a new weight version goes to one replica first, which is probed against the
version before it; only a version that passes goes to the rest of the fleet.

On a fixed set of probe prompts (the first services.canary.probes prompts of the data set):

    before the push, on the canary at v-1:  y ~ pi_{v-1}(. | x), seeded; log pi_{v-1}(y_t); the
                                             reward service's mean score of y
    after the push, on the canary at v:      log pi_v(y_t) of those same tokens (prompt logprobs of
                                             x + y); fresh seeded samples y' ~ pi_v, their mean score
    KL(pi_{v-1} || pi_v) per token ~ mean over the tokens of y of k3 = r - 1 - log r,
                                             r = pi_v(y_t) / pi_{v-1}(y_t)  (unbiased, never negative)

Over services.canary.max_kl, or a mean score lower by more than max_score_drop, and the
verdict is a failure: the caller rolls the canary back to v-1 and stops the run. What the
probes measure is the served weights, so a push or serving bug (or a broken update) shows,
not only a bad training step.
"""
from __future__ import annotations

import dataclasses
import math
import time

import grpc

from services.trainer.config import CanaryConfig

SEED = 1234  # the same samples before and after: the score comparison is paired


class CanaryFailed(RuntimeError):
    """A version failed its canary: the canary was rolled back and the run stops."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    version: int
    replica: str
    passed: bool
    kl: float  # mean per-token KL(v-1 || v) on the probes, nats
    score_before: float  # mean probe score at v-1
    score_after: float  # at v
    message: str
    time: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass
class Probe:
    """The canary's answers at v-1."""
    version: int
    completions: list[list[int]]
    logprobs: list[list[float]]
    score: float


class Canary:
    def __init__(self, config: CanaryConfig, prompts: list[str], prompt_ids: list[list[int]], score, normalize: bool):
        """score(pairs, normalize) -> ScoreResults: the trainer's Scorer.score."""
        self.config, self.prompts, self.prompt_ids = config, prompts, prompt_ids
        self.score_fn, self.normalize = score, normalize

    def _sample(self, client, version: int):
        results = client.generate(self.prompt_ids, require_weight_version=version, n=1, temperature=1.0, seed=SEED,
                                  max_tokens=self.config.max_tokens, logprobs=True)
        completions = [r.completions[0] for r in results]
        texts = [c.text for c in completions]
        scored = [i for i, t in enumerate(texts) if t.strip()]
        scores = self.score_fn([(self.prompts[i], texts[i]) for i in scored], self.normalize) if scored else []
        mean = sum(s.score for s in scores) / len(scores) if scores else 0.0
        return completions, mean

    def before(self, client, version: int) -> Probe:
        """Sample the probes on the canary, which serves `version` (v-1)."""
        completions, score = self._sample(client, version)
        return Probe(version, [list(c.token_ids) for c in completions], [list(c.logprobs) for c in completions], score)

    def after(self, client, address: str, version: int, probe: Probe) -> Verdict:
        """Probe the canary at `version` (v) against what it said at v-1."""
        scored = [(ids + y, len(ids), lp) for ids, y, lp in zip(self.prompt_ids, probe.completions, probe.logprobs) if y]
        results = client.generate([s[0] for s in scored], require_weight_version=version, max_tokens=1,
                                  temperature=1.0, prompt_logprobs=True)
        k3, tokens = 0.0, 0
        for (full, start, old), r in zip(scored, results):
            new = r.prompt_logprobs[start - 1:]  # prompt_logprobs[i] is of token i + 1
            for lp_old, lp_new in zip(old, new):
                log_r = max(min(lp_new - lp_old, 50.0), -50.0)
                k3 += math.exp(log_r) - 1.0 - log_r
                tokens += 1
        kl = k3 / max(tokens, 1)
        _, score_after = self._sample(client, version)
        c = self.config
        reasons = []
        if kl > c.max_kl:
            reasons.append(f"mean per-token KL to v{probe.version} {kl:.4g} nats > services.canary.max_kl {c.max_kl:g}")
        drop = probe.score - score_after
        if c.max_score_drop is not None and drop > c.max_score_drop:
            reasons.append(f"mean probe score fell by {drop:.4g} ({probe.score:.4g} -> {score_after:.4g}) > "
                           f"services.canary.max_score_drop {c.max_score_drop:g}")
        passed = not reasons
        message = (f"canary {address}: version {version} passed (KL {kl:.4g}, score {probe.score:.4g} -> "
                   f"{score_after:.4g})" if passed else
                   f"canary {address}: version {version} failed: {'; '.join(reasons)}")
        return Verdict(version, address, passed, kl, probe.score, score_after, message)


def unreachable(address: str, version: int, error: grpc.RpcError | Exception) -> Verdict:
    """The canary could not be probed: a failure too (a version nobody could check is not sent on)."""
    details = f"{error.code().name} {error.details()}" if isinstance(error, grpc.RpcError) else str(error)
    return Verdict(version, address, False, float("nan"), float("nan"), float("nan"),
                   f"canary {address}: version {version} could not be probed: {details}")
