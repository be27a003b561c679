"""PPO math against numbers worked out by hand in each test (not by calling the code under test)."""
import math

import pytest
import torch

from services.trainer import ppo


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert close(ppo.masked_mean(x, mask), (1 + 2 + 3) / 3)
    # Bessel: ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 1
    assert close(ppo.masked_var(x, mask), 1.0)
    assert close(ppo.masked_var(x, mask, unbiased=False), 2 / 3)
    assert close(ppo.masked_mean(x, mask, dim=1), [2.0])


def test_masked_whiten_by_hand():
    x = torch.tensor([[2.0, 4.0], [6.0, 8.0], [50.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    mean = (2 + 4 + 6 + 8) / 4  # 5
    std = math.sqrt(((2 - 5) ** 2 + (4 - 5) ** 2 + (6 - 5) ** 2 + (8 - 5) ** 2) / 3)  # sqrt(20/3)
    expected = [[(2 - mean) / std, (4 - mean) / std], [(6 - mean) / std, (8 - mean) / std], [0.0, 0.0]]
    assert close(ppo.masked_whiten(x, mask), expected)
    # shift_mean=False rescales but keeps the mean (and the padding at 0)
    expected_keep = [[e + mean for e in expected[0]], [e + mean for e in expected[1]], [0.0, 0.0]]
    assert close(ppo.masked_whiten(x, mask, shift_mean=False), expected_keep)


def test_gae_by_hand_with_padding():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 100.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=gamma, lam=lam)
    # row 0, backwards; no value after the last token
    d2 = 2.0 + 0.0 - 1.5                   # 0.5
    a2 = d2
    d1 = 0.0 + 0.9 * 1.5 - 1.0             # 0.35
    a1 = d1 + 0.9 * 0.8 * a2               # 0.71
    d0 = 1.0 + 0.9 * 1.0 - 0.5             # 1.4
    a0 = d0 + 0.9 * 0.8 * a1               # 1.9112
    # row 1: token 2 is padding (its 100 reward and 50 value must not leak in)
    e1 = 1.0 + 0.0 - 2.0                   # -1
    e0 = 0.5 + 0.9 * 2.0 - 1.0 + 0.9 * 0.8 * e1   # 1.3 - 0.72 = 0.58
    assert close(adv, [[a0, a1, a2], [e0, e1, 0.0]])
    assert close(ret, [[a0 + 0.5, a1 + 1.0, a2 + 1.5], [e0 + 1.0, e1 + 2.0, 0.0]])
    assert abs(a0 - 1.9112) < 1e-9 and abs(e0 - 0.58) < 1e-9  # the hand arithmetic itself


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 3.0]])
    values = torch.tensor([[1.0, 2.0, 0.5]])
    mask = torch.ones(1, 3)
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # Monte-Carlo: every token's return is the final reward 3
    assert close(ret, [[3.0, 3.0, 3.0]])
    assert close(adv, [[3.0 - 1.0, 3.0 - 2.0, 3.0 - 0.5]])


def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.4]))
    # k1 = log p - log p_ref
    assert close(ppo.kl_k1(logp, ref), [math.log(0.5 / 0.25), math.log(0.2 / 0.4)])
    # k3 = (r - 1) - log r, r = p_ref / p: r = 0.5 and r = 2
    assert close(ppo.kl_k3(logp, ref), [(0.5 - 1) - math.log(0.5), (2 - 1) - math.log(2)])
    assert (ppo.kl_k3(logp, ref) >= 0).all()


def test_kl_estimators_are_unbiased_over_the_whole_distribution():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    kl = 0.7 * math.log(0.7 / 0.4) + 0.2 * math.log(0.2 / 0.4) + 0.1 * math.log(0.1 / 0.2)
    assert close((p * ppo.kl_k1(p.log(), q.log())).sum(), kl)
    assert close((p * ppo.kl_k3(p.log(), q.log())).sum(), kl)


def test_shape_rewards_kl_score_and_eos_penalty():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.5, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 1.0], [0.4, 0.5, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([1.0, 2.0])
    missing_eos = torch.tensor([True, False])  # row 0 ran into max_tokens
    beta = 0.1
    rewards, kl, final = ppo.shape_rewards(scores, logp, ref, mask, beta,
                                           missing_eos=missing_eos, missing_eos_penalty=1.0)
    k = [[math.log(2), 0.0, math.log(0.5)], [math.log(0.5), 0.0, 0.0]]
    assert close(kl, k)
    expected = [[-0.1 * k[0][0], -0.1 * k[0][1], -0.1 * k[0][2] + (1.0 - 1.0)],
                [-0.1 * k[1][0], -0.1 * k[1][1] + 2.0, 0.0]]
    assert close(rewards, expected)
    assert close(final, [0.0, 2.0])
    # without the penalty row 0 gets its score back
    rewards2, _, _ = ppo.shape_rewards(scores, logp, ref, mask, beta)
    assert close(rewards2[0, 2], -0.1 * math.log(0.5) + 1.0)


def test_shape_rewards_normalises_then_clips_then_penalises():
    logp = torch.zeros(3, 2)
    mask = torch.ones(3, 2)
    scores = torch.tensor([1.0, 9.0, -9.0])
    missing_eos = torch.tensor([False, True, False])
    rewards, _, final = ppo.shape_rewards(scores, logp, logp, mask, 0.5, score_mean=1.0, score_std=2.0,
                                          score_clip=3.0, missing_eos=missing_eos, missing_eos_penalty=2.0)
    # (1-1)/2 = 0; (9-1)/2 = 4 -> clip 3 -> minus 2 = 1; (-9-1)/2 = -5 -> clip -3
    assert close(final, [0.0, 1.0, -3.0])
    assert close(rewards, [[0.0, 0.0], [0.0, 1.0], [0.0, -3.0]])


def test_shape_rewards_k3():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    rewards, kl, _ = ppo.shape_rewards(torch.tensor([0.0]), logp, ref, torch.ones(1, 2), 2.0, kl_estimator="k3")
    k3 = [(0.5 - 1) - math.log(0.5), (2 - 1) - math.log(2)]
    assert close(kl, [k3])
    assert close(rewards, [[-2.0 * k3[0], -2.0 * k3[1]]])


def test_adaptive_kl_controller_by_hand():
    c = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=9.0, n_steps=256)   # error 9/6 - 1 = 0.5, clipped to 0.2
    after_one = 0.1 * (1 + 0.2 * 256 / 10000)
    assert c.value == pytest.approx(after_one)
    c.update(current_kl=5.4, n_steps=256)   # error 5.4/6 - 1 = -0.1, inside the clip
    after_two = after_one * (1 - 0.1 * 256 / 10000)
    assert c.value == pytest.approx(after_two)
    c.update(current_kl=0.0, n_steps=100)   # error -1, clipped to -0.2
    assert c.value == pytest.approx(after_two * (1 - 0.2 * 100 / 10000))
    # checkpoints restore it exactly
    d = ppo.AdaptiveKLController(1.0, target=1.0, horizon=1)
    d.load_state_dict(c.state_dict())
    assert (d.value, d.target, d.horizon) == (c.value, 6.0, 10000)


def test_fixed_kl_controller():
    c = ppo.FixedKLController(0.05)
    c.update(current_kl=100.0, n_steps=1000)
    assert c.value == 0.05
    d = ppo.FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


def test_policy_loss_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 7.0, 7.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -3.0]])
    new = old + ratios.log()
    adv = torch.tensor([[2.0, -1.0, 3.0], [-1.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, clipfrac, approx_kl = ppo.policy_loss(new, old, adv, mask, clip_range=0.2)
    # per token: max(-A * r, -A * clip(r, 0.8, 1.2))
    t = [max(-2.0 * 1.5, -2.0 * 1.2),      # -2.4 (clipped)
         max(1.0 * 0.5, 1.0 * 0.8),        # 0.8 (clipped)
         max(-3.0 * 1.1, -3.0 * 1.1),      # -3.3
         max(1.0 * 1.5, 1.0 * 1.2)]        # 1.5: ratio outside the range, but the pessimistic side is unclipped
    assert close(loss, sum(t) / 4)
    assert close(clipfrac, 2 / 4)
    kl = [(1.5 - 1) - math.log(1.5), (0.5 - 1) - math.log(0.5), (1.1 - 1) - math.log(1.1), (1.5 - 1) - math.log(1.5)]
    assert close(approx_kl, sum(kl) / 4)


def test_policy_loss_gradient_vanishes_when_clipped():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0]])
    loss, _, _ = ppo.policy_loss(new, old, adv, torch.ones(1, 2), clip_range=0.2)
    loss.backward()
    # token 0 is past 1 + eps with positive advantage: no push further; token 1: d/dlogp (-r * A / 2) = -1.1 / 2
    assert close(new.grad, [[0.0, -1.1 / 2]])


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.5, 9.0]])
    old = torch.tensor([[0.5, 2.1, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = ppo.value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: V_clip = 0.5 + 0.2 = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69
    # token 1: V - V_old = -0.1, inside: (2-1)^2 = 1;  token 2: 0.5^2 = 0.25
    assert close(loss, 0.5 * (1.69 + 1.0 + 0.25) / 3)
    assert close(clipfrac, 1 / 3)


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0]])
    z = math.exp(1) + math.exp(2) + math.exp(3)
    assert close(ppo.logprobs_from_logits(logits, labels), [[3.0 - math.log(z), -math.log(3)]])
    p = [math.exp(1) / z, math.exp(2) / z, math.exp(3) / z]
    h = -sum(pi * math.log(pi) for pi in p)
    assert close(ppo.entropy_from_logits(logits), [[h, math.log(3)]])


def test_padding_contributes_nothing():
    """Whatever sits in padded positions, no output on real tokens (or scalar) changes."""
    B, T = 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)

    def tensors(garbage: float):
        torch.manual_seed(1)
        base = {k: torch.randn(B, T) for k in
                ["rewards", "values", "old_values", "returns", "logp", "old_logp", "ref_logp", "adv"]}
        return {k: torch.where(mask.bool(), v, torch.full_like(v, garbage)) for k, v in base.items()}

    outs = []
    for garbage in (0.0, 1e3, float("inf"), float("nan")):
        t = tensors(garbage)
        adv, ret = ppo.gae(t["rewards"], t["values"], mask, 0.99, 0.95)
        rewards, kl, _ = ppo.shape_rewards(torch.tensor([1.0, -1.0, 0.5]), t["logp"], t["ref_logp"], mask, 0.1)
        outs.append([
            adv, ret, rewards, kl,
            ppo.masked_whiten(t["adv"], mask),
            *ppo.policy_loss(t["logp"], t["old_logp"], t["adv"], mask),
            *ppo.value_loss(t["values"], t["old_values"], t["returns"], mask),
        ])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert a.isfinite().all() and b.isfinite().all()
            assert torch.allclose(a, b, atol=1e-5)
    for x in outs[-1][:5]:  # per-token outputs are exactly 0 on padding
        assert (x[mask == 0] == 0).all()


# ---- critic-free estimators and loss aggregation -----------------------------------------------

def test_grpo_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 5.0, 2.0, 2.0, 2.0])  # two groups of 3; the second all equal
    std = math.sqrt(((1 - 3) ** 2 + 0 + (5 - 3) ** 2) / 2)  # sample std of (1, 3, 5) = 2
    got = ppo.grpo_advantages(scores, [3, 3], scale="group", eps=0.0)
    assert close(got, [-2 / std, 0.0, 2 / std, 0.0, 0.0, 0.0])  # equal rewards: 0, not NaN
    assert not torch.isnan(ppo.grpo_advantages(scores, [3, 3], scale="group")).any()
    # Dr. GRPO: no division at all
    assert close(ppo.grpo_advantages(scores, [3, 3], scale="none"), [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    # batch: one std for the whole batch (mean 2.5; sample std over the 6 scores)
    batch_std = math.sqrt(sum((x - 2.5) ** 2 for x in [1, 3, 5, 2, 2, 2]) / 5)
    assert close(ppo.grpo_advantages(scores, [3, 3], scale="batch", eps=0.0),
                 [-2 / batch_std, 0.0, 2 / batch_std, 0.0, 0.0, 0.0])
    # groups of different sizes (a completion dropped); a group of one has no baseline
    assert close(ppo.grpo_advantages(torch.tensor([1.0, 3.0, 7.0]), [2, 1], scale="none"), [-1.0, 1.0, 0.0])


def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0])  # groups of 3 and 2
    # leave-one-out: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; 4 - 4 = 0 twice
    assert close(ppo.rloo_advantages(scores, [3, 2]), [-3.0, -1.5, 4.5, 0.0, 0.0])
    assert close(ppo.rloo_advantages(torch.tensor([5.0]), [1]), [0.0])
    with pytest.raises(ValueError, match="do not add up"):
        ppo.rloo_advantages(scores, [3, 3])


def test_reinforce_pp_returns_then_batch_whitening_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 1.0], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # gamma 0.5: row 0: G2 = 1, G1 = -0.1 + 0.5 = 0.4, G0 = 0 + 0.2 = 0.2; row 1: G0 = 0.5 (padding ignored)
    returns = [0.2, 0.4, 1.0, 0.5]
    mean = sum(returns) / 4
    std = math.sqrt(sum((g - mean) ** 2 for g in returns) / 3)
    got = ppo.reinforce_pp_advantages(rewards, mask, gamma=0.5)
    assert close(got, [[(0.2 - mean) / std, (0.4 - mean) / std, (1.0 - mean) / std], [(0.5 - mean) / std, 0.0, 0.0]])


def test_per_token_broadcast_keeps_padding_at_zero():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert close(ppo.per_token(torch.tensor([2.0, -1.0]), mask), [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


def test_loss_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert close(ppo.aggregate(x, mask, "token_mean"), (1 + 2 + 3 + 10) / 4)  # 4
    assert close(ppo.aggregate(x, mask, "seq_mean_token_sum"), ((1 + 2 + 3) + 10) / 2)  # 8
    assert close(ppo.aggregate(x, mask, "seq_mean_token_mean"), ((1 + 2 + 3) / 3 + 10 / 1) / 2)  # 6
    # A normaliser counted over more rows (a minibatch split over ranks) replaces the local count.
    assert close(ppo.aggregate(x, mask, "token_mean", normalizer=8.0), 16 / 8)
    assert close(ppo.loss_normalizer(mask, "token_mean"), 4.0)
    assert close(ppo.loss_normalizer(mask, "seq_mean_token_mean"), 2.0)
    with pytest.raises(ValueError, match="loss aggregation"):
        ppo.aggregate(x, mask, "sum")


def test_split_rows_with_the_global_normaliser_add_up_to_the_whole():
    """What two ranks compute on halves of a minibatch sums to what one computes on all of it."""
    x, mask = torch.rand(4, 5), (torch.rand(4, 5) > 0.3).float()
    mask[:, 0] = 1.0
    for mode in ppo.LOSS_AGGREGATIONS:
        whole = ppo.aggregate(x, mask, mode)
        norm = ppo.loss_normalizer(mask, mode)
        halves = ppo.aggregate(x[:2], mask[:2], mode, norm) + ppo.aggregate(x[2:], mask[2:], mode, norm)
        assert close(whole, halves), mode


def test_k2_by_hand():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert close(ppo.kl_k2(lp, ref), [0.5 * 0.25, 0.5 * 1.0])


# ---- one-step-off-policy correction ------------------------------------------------------------

def test_truncated_is_weights_by_hand():
    proximal = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    behaviour = torch.tensor([[-1.0, -3.0, -0.1], [-2.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w, capped = ppo.truncated_is_weights(proximal, behaviour, mask, cap=2.0)
    # exp(0) = 1, exp(1) = 2.718 -> capped at 2, exp(-0.4) = 0.670, exp(1.5) = 4.48 -> 2; padding 0
    assert close(w, [[1.0, 2.0, math.exp(-0.4)], [2.0, 0.0, 0.0]])
    assert capped.tolist() == [[False, True, False], [True, False, False]]
    assert not w.requires_grad


def test_policy_loss_with_is_weights_by_hand():
    logprobs = torch.log(torch.tensor([[0.5, 0.25]]))
    old = torch.log(torch.tensor([[0.4, 0.25]]))
    adv = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2)
    w = torch.tensor([[0.5, 2.0]])
    # ratios 1.25 (clipped to 1.2 for A > 0) and 1.0: per-token losses -1.2 and 2.0, weighted -0.6 and 4.0
    loss, clipfrac, _ = ppo.policy_loss(logprobs, old, adv, mask, clip_range=0.2, is_weights=w)
    assert close(loss, (-0.6 + 4.0) / 2)
    assert close(clipfrac, 0.5)


def test_all_fresh_completions_give_exactly_the_sync_loss():
    """Sampled by the proximal weights themselves, every IS weight is exp(0) = 1: the corrected loss
    is the uncorrected one, bit for bit."""
    torch.manual_seed(0)
    old = -torch.rand(4, 6) * 3
    logprobs = old + 0.1 * torch.randn(4, 6)
    adv, mask = torch.randn(4, 6), (torch.rand(4, 6) > 0.2).float()
    w, capped = ppo.truncated_is_weights(old, old.clone(), mask, cap=2.0)
    assert torch.equal(w, mask) and not capped.any()
    plain = ppo.policy_loss(logprobs, old, adv, mask, 0.2)[0]
    corrected = ppo.policy_loss(logprobs, old, adv, mask, 0.2, is_weights=w)[0]
    assert torch.equal(plain, corrected)
