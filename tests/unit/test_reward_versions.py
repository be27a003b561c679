"""collect.unify_reward_versions: one step's scores come from one reward model version (issue 25,
item 4). The reward service here is a stand-in that swaps its model between calls as a script
says (a unit test of one function; the end-to-end test swaps a real service during a real run)."""
from __future__ import annotations

import types

import pytest

from services.trainer import distributed
from services.trainer.collect import RESCORE_ROUNDS, Share, unify_reward_versions


class SwappingService:
    """Serves `versions[k]` at its k-th call (model_info and score alike, the last one after that)."""

    def __init__(self, *versions: str):
        self.versions, self.calls, self.scored = list(versions), 0, []

    def _now(self) -> str:
        version = self.versions[min(self.calls, len(self.versions) - 1)]
        self.calls += 1
        return version

    def model_info(self):
        return types.SimpleNamespace(model_version=self._now())

    def score(self, pairs, normalize, on_wait=None):
        self.scored.append(list(pairs))
        version = self._now()
        return [types.SimpleNamespace(score=float(len(r)), components={"rm": float(len(r))}, model_version=version)
                for _, r in pairs]


@pytest.fixture(scope="module")
def d():
    return distributed.init("cpu", "float32")


def share_of(versions: list[str]) -> Share:
    """One prompt with a completion per entry of `versions`, scored by that version."""
    completions = [types.SimpleNamespace(index=k, text=f"answer {'x' * k}") for k in range(len(versions))]
    share = Share([types.SimpleNamespace(completions=completions)], {})
    share.scores = {(0, k): (0.5, {"rm": 0.5}, v) for k, v in enumerate(versions)}
    return share


CONFIG = types.SimpleNamespace(ppo=types.SimpleNamespace(normalize_scores=False))


def test_one_version_is_left_alone(d):
    service, share = SwappingService("v1"), share_of(["v1"] * 4)
    got = unify_reward_versions(service, CONFIG, ["a prompt"], share, d)
    assert (got.version, got.first, got.rescored, got.dropped_total) == ("v1", {"v1": 4}, 0, 0)
    assert service.calls == 0


def test_scores_of_the_old_version_are_made_again_by_the_served_one(d):
    """A swap v1 -> v2 in the middle of a step's scoring: the v1 scores are asked again (v1 is
    gone), every score is v2's, and the step says what it took."""
    service, share = SwappingService("v2"), share_of(["v1", "v1", "v1", "v2"])
    got = unify_reward_versions(service, CONFIG, ["a prompt"], share, d)
    assert (got.version, got.first, got.rescored, got.dropped_total) == ("v2", {"v1": 3, "v2": 1}, 3, 0)
    assert [r for _, r in service.scored[0]] == ["answer ", "answer x", "answer xx"]  # only those, once
    assert {v for _, _, v in share.scores.values()} == {"v2"} and len(share.scores) == 4
    assert share.scores[(0, 2)][0] == len("answer xx")  # the new score, not the old one


def test_a_service_that_keeps_swapping_leaves_the_step_one_version_by_dropping(d):
    """A service flapping between A and B between every two calls: after RESCORE_ROUNDS of scoring
    again, what is not of the version it serves last is dropped, counted, never trained on next to
    the rest."""
    assert RESCORE_ROUNDS == 3  # the script below is written for three rounds
    #       round 0: info, score | 1: info, score | 2: info, score | 3: info (then drop)
    service = SwappingService("A", "B", "B", "A", "B", "A", "A")
    share = share_of(["v1", "A", "A", "A"])
    got = unify_reward_versions(service, CONFIG, ["a prompt"], share, d)
    assert (got.version, got.first, got.rescored, got.dropped, got.dropped_total) == \
        ("A", {"v1": 1, "A": 3}, 1 + 3 + 3, {(0, 0)}, 1)
    assert {v for _, _, v in share.scores.values()} == {"A"} and (0, 0) not in share.scores
