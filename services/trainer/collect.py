"""Rollouts: draw a step's prompts, generate rollout.n completions of each on the policy replicas,
score them on the reward service, and gather every rank's samples into the step's batch.

Each rank generates and scores its own share (Dist.rows), with gRPC calls only and no
collective, so that one_step_off can run a share in a background thread while the main thread
trains; finish_rollout() is where the ranks meet again.

Every score names the reward model version that made it, and a step's advantages never mix two:
when the reward service swapped its model while a step was being scored (LoadModel), the scores
of other versions are made again by the version it serves now, and dropped if that keeps changing
(unify_reward_versions).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import time

from services.trainer import distributed, formats
from services.trainer.config import Config
from services.trainer.control import Control, Phase, phase
from services.trainer.distributed import Dist
from services.trainer.experience import Rollout, Sample
from services.trainer.rollout import DependencyDown, PolicyReplicas, RequestRefused, Scorer, Stopped
from services.trainer.state import PPOState


@dataclasses.dataclass
class Share:
    """What this rank's share of a rollout came to: a PromptResult per prompt (None where it
    failed: generated again when the rollout is finished), the scores of the completions, and
    how long generating and scoring took."""
    results: list
    # (prompt, completion) -> score, components, the reward model version that scored it
    scores: dict[tuple[int, int], tuple[float, dict[str, float], str]]
    generate_seconds: float = 0.0
    score_seconds: float = 0.0


@dataclasses.dataclass
class PendingRollout:
    """A rollout on its way: the prompts are drawn; this rank's share is generated and scored
    in the background (one_step_off) or when the rollout is finished (sync)."""
    prompts: list[str]
    mine: list[int]  # this rank's prompts
    prompt_ids: list[list[int]]  # of this rank's prompts
    sampling: dict
    run: functools.partial  # -> Share
    future: concurrent.futures.Future | None = None
    launched: float = dataclasses.field(default_factory=time.perf_counter)


def score_share(scorer: Scorer, config: Config, prompts: list[str], results: list, which: list[int]) -> dict:
    """Scores of the non-empty completions of the prompts `which` (an empty answer has nothing to score)."""
    return score_keys(scorer, config, prompts, results,
                      [(j, c.index) for j in which for c in results[j].completions if c.text.strip()])


def score_keys(scorer: Scorer, config: Config, prompts: list[str], results: list, keys: list[tuple[int, int]]) -> dict:
    """{(prompt, completion): (score, components, reward model version)} of those completions."""
    texts = {(j, c.index): c.text for j, _ in keys for c in results[j].completions}
    scored = scorer.score([(prompts[j], texts[(j, k)]) for j, k in keys],
                          normalize=config.ppo.normalize_scores) if keys else []
    return {key: (r.score, dict(r.components), r.model_version) for key, r in zip(keys, scored)}


RESCORE_ROUNDS = 3  # then what another swap left behind is dropped


@dataclasses.dataclass
class RewardVersions:
    """What a step's scores came to: one reward model version, and what it took (over all ranks)."""
    version: str  # of every score trained on ("" from a reward service older than versions)
    first: dict[str, int]  # scores by the version that made them first
    rescored: int
    dropped: set[tuple[int, int]]  # this rank's completions left out: never scored by `version`
    dropped_total: int


def unify_reward_versions(scorer: Scorer, config: Config, prompts: list[str], share: Share, d: Dist) -> RewardVersions:
    """Make every rank's scores of one step come from one reward model version: the one the service
    serves now (an older one cannot be asked again), by scoring again what another version scored;
    after RESCORE_ROUNDS of it with the service still swapping, drop what is not of the last one.
    A collective: every rank calls it."""
    errors = (DependencyDown, Stopped, RequestRefused)
    first = collections.Counter(v for _, _, v in share.scores.values())
    rescored, dropped = 0, set()
    for round_ in range(RESCORE_ROUNDS + 1):
        counts = sum(distributed.all_gather_object(collections.Counter(v for _, _, v in share.scores.values())),
                     collections.Counter())
        if len(counts) <= 1:
            break
        served = distributed.agree(lambda: scorer.model_info().model_version if d.main else None, d, errors)[0]
        others = [key for key, (_, _, v) in share.scores.items() if v != served]
        if round_ == RESCORE_ROUNDS:
            for key in others:
                del share.scores[key]
            dropped.update(others)
            break
        share.scores |= distributed.agree(lambda: score_keys(scorer, config, prompts, share.results, others), d,
                                          errors)[d.rank]
        rescored += len(others)
    parts = distributed.all_gather_object((first, rescored, len(dropped), {v for _, _, v in share.scores.values()}))
    versions = set().union(*(p[3] for p in parts))
    return RewardVersions(next(iter(versions), ""), dict(sum((p[0] for p in parts), collections.Counter())),
                          sum(p[1] for p in parts), dropped, sum(p[2] for p in parts))


def run_share(replicas: PolicyReplicas, scorer: Scorer, config: Config, prompts: list[str], prompt_ids, sampling,
              version: int) -> Share:
    """Generate and score this rank's prompts once, against the replicas serving `version`. No
    collective: it may run in a background thread while the main thread trains."""
    start = time.perf_counter()
    results: list = [None] * len(prompt_ids)
    replicas.generate(prompt_ids, sampling, list(range(len(prompt_ids))), results, version=version)
    generated = time.perf_counter()
    scores = score_share(scorer, config, prompts, results, [j for j, r in enumerate(results) if r is not None])
    return Share(results, scores, generated - start, time.perf_counter() - generated)


def launch_rollout(state: PPOState, config: Config, replicas: PolicyReplicas, scorer: Scorer, tokenizer, d: Dist,
                   pool: concurrent.futures.Executor | None) -> PendingRollout:
    """Draw the next prompts and start this rank's share (in `pool`, or later when finished)."""
    state.prompts_in_flight = state.prompts.state_dict()  # a checkpoint taken meanwhile redraws these prompts
    prompts = state.prompts.next(config.rollout.batch_size)
    mine = d.rows(len(prompts))
    mine_prompts = [prompts[i] for i in mine]
    prompt_ids = [tokenizer(formats.render_prompt(tokenizer, p), add_special_tokens=False).input_ids
                  for p in mine_prompts]
    sampling = dict(n=config.rollout.n, max_tokens=config.rollout.max_tokens, temperature=config.rollout.temperature,
                    top_p=config.rollout.top_p, logprobs=True)
    run = functools.partial(run_share, replicas, scorer, config, mine_prompts, prompt_ids, sampling, replicas.version)
    return PendingRollout(prompts, mine, prompt_ids, sampling, run, pool.submit(run) if pool else None)


def finish_rollout(pending: PendingRollout, state: PPOState, config: Config, replicas: PolicyReplicas,
                   scorer: Scorer, d: Dist, seconds: dict, control: Control, sync) -> Rollout:
    """Wait for every rank's share, generate again what failed (after resyncing the replicas),
    and gather the samples on every rank: in prompt order, the rollout.n completions of a prompt
    (its group) next to each other."""
    mine_prompts = [pending.prompts[i] for i in pending.mine]
    with phase(seconds, Phase.GENERATING, control):
        waited = time.perf_counter()
        share = distributed.agree(lambda: pending.future.result() if pending.future else pending.run(), d,
                                  (DependencyDown, Stopped, RequestRefused))[d.rank]
        waited = time.perf_counter() - waited
        failed = [j for j, r in enumerate(share.results) if r is None]
        if distributed.all_max([bool(failed)], d)[0]:
            again = replicas.generate_all([pending.prompt_ids[j] for j in failed], pending.sampling, sync)
            for j, r in zip(failed, again):
                share.results[j] = r
    with phase(seconds, Phase.SCORING, control):
        share.scores |= distributed.agree(lambda: score_share(scorer, config, mine_prompts, share.results, failed), d,
                                          (DependencyDown, Stopped, RequestRefused))[d.rank]
        reward = unify_reward_versions(scorer, config, mine_prompts, share, d)
    state.prompts_in_flight = None
    if pending.future is None:  # sync: the time was spent here, in these phases
        seconds[Phase.GENERATING.value] = seconds.get(Phase.GENERATING.value, 0.0) - waited + share.generate_seconds
        seconds[Phase.SCORING.value] = seconds.get(Phase.SCORING.value, 0.0) + share.score_seconds

    # Never train on completions sampled by weights further behind than services.max_staleness:
    # they leave the batch here, counted, as do empty answers (nothing was scored).
    version, staleness = replicas.version, config.services.max_staleness
    groups, stale, empty, tokens = [], 0, 0, 0
    for j, result in enumerate(share.results):
        group = []
        for c in result.completions:
            tokens += len(c.token_ids)
            if not 0 <= version - c.weight_version <= staleness:
                stale += 1
            elif (j, c.index) in reward.dropped:  # counted by unify_reward_versions
                pass
            elif (j, c.index) not in share.scores:
                empty += 1
            else:
                score, components, _ = share.scores[(j, c.index)]
                group.append(Sample(mine_prompts[j], pending.prompt_ids[j], list(c.token_ids), c.text,
                                    list(c.logprobs), c.finish_reason, c.weight_version, score, components))
        groups.append(group)
    parts = distributed.all_gather_object((groups, tokens, stale, empty, share.generate_seconds + share.score_seconds))
    groups = [g for g in distributed.interleave([p[0] for p in parts]) if g]
    # Whole minibatches only (each split evenly over the ranks), cut at group boundaries when the
    # estimator compares a group's completions; what is cut is counted too.
    total, M = sum(map(len, groups)), config.ppo.minibatch_size
    if config.ppo.advantage in ("grpo", "rloo"):
        while sum(map(len, groups)) % M:
            groups.pop()
    else:
        samples = [s for g in groups for s in g]
        groups = [[s] for s in samples[:len(samples) - len(samples) % M]]
    return Rollout([s for g in groups for s in g], pending.prompts, generated_tokens=sum(p[1] for p in parts),
                   group_sizes=[len(g) for g in groups], dropped_stale=sum(p[2] for p in parts),
                   dropped_empty=sum(p[3] for p in parts), dropped_trim=total - sum(map(len, groups)),
                   rollout_seconds=max(p[4] for p in parts), waited_seconds=waited, reward_version=reward.version,
                   reward_versions=reward.first, rescored_reward_version=reward.rescored,
                   dropped_reward_version=reward.dropped_total)


def abandon(pending: PendingRollout | None) -> None:
    """A rollout the run will not train on (it stops): its prompts are drawn again after a resume
    (PPOState.prompts_in_flight), its completions are dropped."""
    if pending is not None and pending.future is not None:
        pending.future.cancel()
