"""Hand-checked tests for rlhf_chat.learning.ppo_math.

Every expected number is worked out in a comment next to the assertion, on
tensors small enough to do on paper.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_chat.learning.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logprobs,
    gae_advantages,
    kl_per_token,
    length_mask,
    log_softmax_at,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    penalized_rewards,
    truncated_importance_weights,
)


def close(
    actual: torch.Tensor | float, expected: torch.Tensor | list | float, atol: float = 1e-5
) -> None:
    """Elementwise |actual - expected| <= atol, same shape (torch.testing is slow to import)."""
    a = torch.as_tensor(actual, dtype=torch.float32).detach()
    e = torch.as_tensor(expected, dtype=torch.float32).detach()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.allclose(a, e, atol=atol, rtol=0), f"\n got      {a}\n expected {e}"


# --------------------------------------------------------------------------- #
# masked statistics
# --------------------------------------------------------------------------- #


def test_masked_mean_all_and_per_row() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # (1 + 2 + 4) / 3 = 7/3
    close(masked_mean(values, mask), 7 / 3)
    # row 0: (1 + 2) / 2 = 1.5 ; row 1: 4 / 1 = 4
    close(masked_mean(values, mask, dim=1), [1.5, 4.0])
    # bool masks work the same
    close(masked_mean(values, mask.bool()), 7 / 3)


def test_masked_mean_empty_mask_is_zero_and_padding_nan_does_not_leak() -> None:
    values = torch.tensor([[1.0, float("nan"), float("inf")]])
    close(masked_mean(values, torch.zeros(1, 3)), 0.0)
    # only position 0 is valid: mean = 1, the NaN / inf in padding are ignored
    close(masked_mean(values, torch.tensor([[1.0, 0.0, 0.0]])), 1.0)


def test_masked_var() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, squared deviations 1 + 0 + 1 = 2 ; biased 2/3 ; unbiased 2/2 = 1
    close(masked_var(values, mask, unbiased=False), 2 / 3)
    close(masked_var(values, mask), 1.0)
    # a single valid entry: no NaN
    close(masked_var(values, torch.tensor([[1.0, 0.0, 0.0, 0.0]])), 0.0)


def test_masked_whiten_valid_entries_mean0_std1_padding_zero() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=g) * 3.0 + 5.0
    mask = torch.ones(4, 6)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    values[mask == 0] = 1e6  # garbage in padding must not influence the stats
    out = masked_whiten(values, mask)
    valid = out[mask == 1]
    close(valid.mean(), 0.0, atol=1e-5)
    close(valid.std(), 1.0, atol=1e-4)  # unbiased, like masked_whiten
    assert torch.all(out[mask == 0] == 0)
    # shift_mean=False keeps the original mean, only rescales
    kept = masked_whiten(values, mask, shift_mean=False)[mask == 1]
    close(kept.mean(), values[mask == 1].mean(), atol=1e-4)
    close(kept.std(), 1.0, atol=1e-4)


def test_masked_whiten_single_valid_entry_only_centres() -> None:
    values = torch.tensor([[5.0, 7.0]])
    out = masked_whiten(values, torch.tensor([[1.0, 0.0]]))
    # one valid entry: 5 - mean(5) = 0, no division, no NaN ; padding 0
    close(out, [[0.0, 0.0]])


def test_length_mask_keeps_each_rows_real_tokens() -> None:
    # finished after 3 tokens (EOS included), only an EOS, cut at the limit of 5, stopped in a loop after 4
    close(
        length_mask([3, 1, 5, 4], 5),
        [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
    )
    close(length_mask([0, 2], 2), [[0, 0], [1, 1]])


def test_token_counts_and_length_mask_agree_with_the_eos_when_pad_is_eos() -> None:
    """The rollout's mask: up to and including the first EOS, pads (= EOS, id 2) after it."""
    from rlhf_chat.generation.candidates import count_response_tokens

    ids = torch.tensor([[5, 7, 2, 2, 2], [5, 2, 2, 2, 2], [2, 2, 2, 2, 2], [5, 6, 7, 8, 9]])
    counts, finished = count_response_tokens(ids, eos_id=2)
    assert counts == [3, 2, 1, 5] and finished == [True, True, True, False]
    close(length_mask(counts, 5), [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])


# --------------------------------------------------------------------------- #
# KL and rewards
# --------------------------------------------------------------------------- #


def test_kl_estimators_by_hand() -> None:
    ln2 = math.log(2.0)
    logp = torch.tensor([[0.0, ln2]])
    ref = torch.tensor([[ln2, 0.0]])
    # k1 = logp - ref = [-ln2, ln2]
    close(kl_per_token(logp, ref, "k1"), [[-ln2, ln2]])
    # k3: r = exp(ref - logp) = [2, 0.5]; (r - 1) - log r = [1 - ln2, -0.5 + ln2]
    close(kl_per_token(logp, ref, "k3"), [[1 - ln2, ln2 - 0.5]])
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k9")


def test_kl_k3_is_non_negative_and_zero_when_equal() -> None:
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(8, 16, generator=g) * 5
    ref = -torch.rand(8, 16, generator=g) * 5
    assert torch.all(kl_per_token(logp, ref, "k3") >= 0)
    assert torch.any(kl_per_token(logp, ref, "k1") < 0)  # k1 can be negative per token
    close(kl_per_token(logp, logp, "k3"), torch.zeros(8, 16))


def test_penalized_rewards_score_at_last_valid_token_zero_on_padding() -> None:
    scores = torch.tensor([1.0, 2.0, 5.0])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.zeros(3, 4)
    logp = torch.full((3, 4), 0.5)  # k1 = 0.5 everywhere, including padding
    rewards, kl = penalized_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # valid token: -0.1 * 0.5 = -0.05 ; last valid token also gets the score
    # row 0: [-0.05, -0.05, -0.05 + 1, 0] ; row 1: [-0.05 + 2, 0, 0, 0]
    # row 2: empty response -> no score, all zeros
    close(
        rewards,
        [[-0.05, -0.05, 0.95, 0.0], [1.95, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    )
    close(kl, [[0.5, 0.5, 0.5, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.all(rewards[mask == 0] == 0) and torch.all(kl[mask == 0] == 0)


# --------------------------------------------------------------------------- #
# GAE
# --------------------------------------------------------------------------- #


def test_gae_by_hand_gamma1_lam05_with_padding() -> None:
    # 3 valid tokens + 1 padded position holding garbage that must be ignored
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2: V(3) := 0 (episode over)  delta = 1 + 0 - 0.4 = 0.6       A2 = 0.6
    # t=1: delta = 0 + 0.4 - 0.2 = 0.2       A1 = 0.2 + 0.5 * 0.6 = 0.5
    # t=0: delta = 0 + 0.2 - 0.5 = -0.3      A0 = -0.3 + 0.5 * 0.5 = -0.05
    close(adv, [[-0.05, 0.5, 0.6, 0.0]])
    # returns = A + V = [0.45, 0.7, 1.0], padding 0
    close(ret, [[0.45, 0.7, 1.0, 0.0]])


def test_gae_lam1_gamma1_gives_monte_carlo_returns() -> None:
    # with gamma = lam = 1 the values telescope away: return_t = sum_{k>=t} r_k
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[3.0, -1.0, 0.5, 0.0], [0.7, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: [0.1 - 0.2 + 1, -0.2 + 1, 1] = [0.9, 0.8, 1.0] ; row 1: [2.0]
    close(ret, [[0.9, 0.8, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    # A = R - V: row 0 [0.9 - 3, 0.8 + 1, 1 - 0.5] ; row 1 [2 - 0.7]
    close(adv, [[-2.1, 1.8, 0.5, 0.0], [1.3, 0.0, 0.0, 0.0]])


# --------------------------------------------------------------------------- #
# PPO losses
# --------------------------------------------------------------------------- #


def test_clipped_policy_loss_by_hand() -> None:
    eps = 0.2
    old = torch.zeros(1, 3)
    # tokens 0 and 1 have ratio 1.5 > 1 + eps ; token 2 is padding with a huge ratio
    logp = torch.tensor([[math.log(1.5), math.log(1.5), 50.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = clipped_policy_loss(logp, old, adv, mask, eps)
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped term chosen)
    # A=-1: max(+1.5, +1.2) = +1.5 (unclipped: the pessimistic bound)
    # loss = (-1.2 + 1.5) / 2 = 0.15
    close(loss, 0.15)
    close(stats["policy_loss"], 0.15)
    close(stats["clip_fraction"], 0.5)
    # approx_kl = 0.5 * log(1.5)^2 = 0.5 * 0.164402 = 0.082201
    close(stats["approx_kl"], 0.5 * math.log(1.5) ** 2)
    assert all(isinstance(v, float) for v in stats.values())
    loss.backward()
    # clipped token: no gradient ; unclipped: d/dlogp(-A*ratio)/2 = 1.5/2 ; pad: 0
    close(logp.grad, [[0.0, 0.75, 0.0]])


def test_clipped_value_loss_by_hand() -> None:
    eps = 0.2
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1, 42.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = clipped_value_loss(values, old, returns, mask, eps)
    # token 0: unclipped (1 - 1)^2 = 0 ; clipped v = 0.2 -> (0.2 - 1)^2 = 0.64 -> 0.64
    # token 1: moved 0.1 < eps, both (0.1 - 1)^2 = 0.81 -> 0.81, not "clipped"
    # loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625
    close(loss, 0.3625)
    close(stats["value_loss"], 0.3625)
    close(stats["value_clip_fraction"], 0.5)
    loss.backward()
    # token 0: clipped branch is constant in v -> 0 ; token 1: 0.5*2*(0.1-1)/2 = -0.45
    close(values.grad, [[0.0, -0.45, 0.0]])


def test_mask_removes_gradient_of_masked_positions() -> None:
    """The minChatGPT bug: a response mask that was built but never applied."""
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    logp = (-torch.rand(2, 4, generator=g)).requires_grad_()
    adv = torch.randn(2, 4, generator=g)
    loss, _ = clipped_policy_loss(logp, logp.detach(), adv, mask, clip_range=0.2)
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0)
    assert torch.all(logp.grad[mask == 1] != 0)  # valid tokens really learn

    values = torch.randn(2, 4, generator=g).requires_grad_()
    returns = torch.randn(2, 4, generator=g)
    vloss, _ = clipped_value_loss(values, values.detach(), returns, mask, clip_range=0.2)
    vloss.backward()
    assert torch.all(values.grad[mask == 0] == 0)
    assert torch.all(values.grad[mask == 1] != 0)

    # and the padded tokens do not change the loss value at all
    logp2 = logp.detach().clone()
    logp2[mask == 0] = -100.0
    loss2, _ = clipped_policy_loss(logp2, logp.detach(), adv, mask, clip_range=0.2)
    close(loss2, loss.detach())


# --------------------------------------------------------------------------- #
# logits helpers
# --------------------------------------------------------------------------- #


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    return entropy_from_logprobs(log_softmax_at(logits))


def test_entropy_from_logprobs() -> None:
    # uniform over 4 -> log 4 ; near one-hot with huge logits -> ~0, no NaN
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0]]])
    close(entropy_from_logits(logits), [[math.log(4.0), 0.0]])
    # two-way [0, log 3]: p = [1/4, 3/4], H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335
    close(entropy_from_logits(torch.tensor([[[0.0, math.log(3.0)]]])), [[0.5623351]])
    # a token with probability exactly 0 (log-prob -inf) adds nothing
    close(entropy_from_logprobs(torch.tensor([[[0.0, -math.inf]]])), [[0.0]])
    g = torch.Generator().manual_seed(3)
    rand = torch.randn(2, 3, 11, generator=g) * 4
    expected = torch.distributions.Categorical(logits=rand).entropy()
    close(entropy_from_logits(rand), expected)
    close(entropy_from_logits(rand + 1e4), expected, atol=1e-2)  # shift-invariant
    # at temperature 2 it is the entropy of softmax(z / 2)
    close(entropy_from_logprobs(log_softmax_at(rand, 2.0)), torch.distributions.Categorical(logits=rand / 2).entropy())


def test_logprobs_from_logits() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    # softmax = [1/4, 3/4] -> [log 3/4, log 1/4]
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.25)]])
    # T = 2: logits [0, ln3 / 2] -> p1 = sqrt3 / (1 + sqrt3) = 0.6339746 -> -0.4557
    s3 = math.sqrt(3.0)
    close(
        logprobs_from_logits(logits, labels, temperature=2.0),
        [[math.log(s3 / (1 + s3)), math.log(1 / (1 + s3))]],
    )
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels, temperature=0.0)


# --------------------------------------------------------------------------- #
# reward model
# --------------------------------------------------------------------------- #


def test_bradley_terry_equal_scores_is_log2() -> None:
    s = torch.tensor([0.3, -1.0, 2.0])
    loss, stats = bradley_terry_loss(s, s.clone())
    # -log sigmoid(0) = log 2 ; no strict wins ; zero margin
    close(loss, math.log(2.0))
    assert stats == pytest.approx({"loss": math.log(2.0), "accuracy": 0.0, "mean_margin": 0.0})


def test_bradley_terry_margin_center_and_accuracy() -> None:
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([0.0, 1.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    # diffs [2, -1]: (log(1 + e^-2) + log(1 + e^1)) / 2 = (0.126928 + 1.313262) / 2
    close(loss, (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2)
    close(stats["accuracy"], 0.5)
    close(stats["mean_margin"], 0.5)  # (2 - 1) / 2
    # margin 2 on the first pair turns diff 2 into 0 -> log 2 ; margin 0 on the second
    loss_m, stats_m = bradley_terry_loss(chosen, rejected, margin=torch.tensor([2.0, 0.0]))
    close(loss_m, (math.log(2.0) + math.log1p(math.exp(1))) / 2)
    close(stats_m["mean_margin"], 0.5)  # reported without the target margin
    # centring: r_c = r_r = 1 -> log 2 + 0.01 * (1 + 1)^2 = log 2 + 0.04
    loss_c, _ = bradley_terry_loss(torch.ones(2), torch.ones(2), center_coef=0.01)
    close(loss_c, math.log(2.0) + 0.04)


def test_bradley_terry_weights_each_pair_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # per pair: log(1 + e^-2) = 0.126928, log(1 + e^1) = 1.313262; weights 3 and 1
    loss, stats = bradley_terry_loss(chosen, rejected, weight=torch.tensor([3.0, 1.0]))
    close(loss, (3 * math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 4)
    close(stats["accuracy"], 0.5)  # the stats stay per pair
    equal, _ = bradley_terry_loss(chosen, rejected, weight=torch.tensor([2.0, 2.0]))
    close(equal, bradley_terry_loss(chosen, rejected)[0].item())  # equal weights: the plain mean


def test_bradley_terry_a_tie_asks_for_equal_scores_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.0, 0.5, 0.0])
    target = torch.tensor([1.0, 0.5, 0.5])  # a vote, then two ties
    loss, stats = bradley_terry_loss(chosen, rejected, target=target)
    # vote: log(1 + e^-2); tie at equal scores: log 2; tie 1 apart:
    # -(log sigmoid(1) + log sigmoid(-1)) / 2 = (log(1 + e^-1) + log(1 + e^1)) / 2
    tie_apart = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    close(loss, (math.log1p(math.exp(-2)) + math.log(2.0) + tie_apart) / 3)
    # accuracy and margin over the votes only: a tie has no right side
    assert stats["accuracy"] == 1.0 and stats["mean_margin"] == 2.0
    # a tie's loss is least at equal scores, and its gradient pulls two scores together
    scores = torch.tensor([1.0, 0.0], requires_grad=True)
    tie, _ = bradley_terry_loss(scores[:1], scores[1:], target=torch.tensor([0.5]))
    tie.backward()
    close(scores.grad, [1 / (1 + math.exp(-1)) - 0.5, 0.5 - 1 / (1 + math.exp(-1))])  # sigmoid(1) - 1/2
    assert tie.item() > math.log(2.0)
    # ties alone: nothing to be right or wrong about
    _, only_ties = bradley_terry_loss(torch.zeros(2), torch.ones(2), target=torch.full((2,), 0.5))
    assert only_ties["accuracy"] is None
    # target 1 everywhere is the plain loss
    plain, _ = bradley_terry_loss(chosen, rejected)
    close(bradley_terry_loss(chosen, rejected, target=torch.ones(3))[0], plain.item())


# --------------------------------------------------------------------------- #
# controllers and running moments
# --------------------------------------------------------------------------- #


def test_adaptive_kl_controller_one_step_by_hand() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 12: e = clip(12/6 - 1, -0.2, 0.2) = 0.2 ; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    assert ctl.update(12.0, 256) == pytest.approx(0.2 * 1.00512)
    assert ctl.value == pytest.approx(0.201024)
    ctl2 = AdaptiveKLController(0.2, 6.0, 10000)
    # KL 3: e = clip(-0.5) = -0.2 ; mult = 1 - 0.00512 -> 0.198976
    assert ctl2.update(3.0, 256) == pytest.approx(0.198976)
    # KL 6.6: e = 0.1 (inside the clip) ; mult = 1 + 0.1 * 100 / 1000 = 1.01
    ctl3 = AdaptiveKLController(0.1, 6.0, 1000)
    assert ctl3.update(6.6, 100) == pytest.approx(0.101)


def test_fixed_kl_controller_never_changes() -> None:
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 256) == 0.05 and ctl.value == 0.05


def test_running_moments_matches_concatenated_batches() -> None:
    batches = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0]), torch.tensor([10.0])]
    rm = RunningMoments()
    assert rm.count == 0
    for b in batches:
        rm.update(b)
    allx = torch.cat(batches)
    # mean = 25 / 6 = 4.1667
    assert rm.mean == pytest.approx(25 / 6)
    assert rm.mean == pytest.approx(allx.mean().item())
    assert rm.std == pytest.approx(allx.std().item())  # unbiased
    assert rm.count == 6
    close(rm.normalize(allx), (allx - allx.mean()) / allx.std())
    # save / restore
    rm2 = RunningMoments.from_dict(rm.to_dict())
    assert rm2 == rm
    rm2.update(torch.tensor([[-3.0, 0.5]]))  # any shape is flattened
    full = torch.cat([allx, torch.tensor([-3.0, 0.5])])
    assert rm2.mean == pytest.approx(full.mean().item())
    assert rm2.std == pytest.approx(full.std().item())


def test_running_moments_few_values_only_centres() -> None:
    rm = RunningMoments()
    rm.update(torch.tensor([3.0]))
    # one value: std undefined -> just subtract the mean 3
    close(rm.normalize(torch.tensor([5.0, 1.0])), [2.0, -2.0])
    rm.update(torch.tensor([]))  # empty batch is a no-op
    assert rm.count == 1


def test_default_adaptive_kl_can_act_within_one_reward_version():
    """At the default horizon, a batch of 8 answers at twice the target KL moves beta by
    1 + 0.2 * 8 / 120 = 1.01333 a step, 1.01333^15 = 1.2197 over a reward version's 15 steps."""
    from rlhf_chat.config import PPOConfig

    cfg = PPOConfig()
    ctl = AdaptiveKLController(0.05, cfg.kl_target, cfg.kl_horizon)
    assert ctl.update(2 * cfg.kl_target, cfg.batch_size) == pytest.approx(0.05 * (1 + 0.2 * 8 / 120))
    for _ in range(14):
        ctl.update(2 * cfg.kl_target, cfg.batch_size)
    assert ctl.value == pytest.approx(0.05 * 1.0133333**15, rel=1e-5) == pytest.approx(0.06099, abs=1e-4)
    for _ in range(15):
        ctl.update(0.0, cfg.batch_size)  # KL far under the target: beta comes back down
    assert ctl.value < 0.05


def test_truncated_importance_weights_by_hand():
    train = torch.tensor([[-1.0, -2.0, -0.5]])
    sampled = torch.tensor([[-1.5, -1.0, -3.0]])
    # exp(0.5) = 1.6487, exp(-1) = 0.3679, exp(2.5) = 12.18 -> capped at 2
    assert truncated_importance_weights(train, sampled, 2.0)[0].tolist() == pytest.approx([1.6487213, 0.3678794, 2.0])
    assert not truncated_importance_weights(train.requires_grad_(), sampled, 2.0).requires_grad


def test_policy_loss_weights_each_token():
    """At ratio 1 the per-token loss is -A; weights w give masked_mean(-w * A)."""
    lp = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    plain, _ = clipped_policy_loss(lp, lp, adv, mask, 0.2)
    weighted, _ = clipped_policy_loss(lp, lp, adv, mask, 0.2, torch.tensor([[0.5, 2.0, 9.0]]))
    assert plain.item() == pytest.approx((-1.0 + 2.0) / 2)
    assert weighted.item() == pytest.approx((-0.5 + 4.0) / 2)  # the masked third token counts for nothing


def test_weighted_nll_by_hand():
    from rlhf_chat.learning.supervised import weighted_nll

    logprobs = torch.tensor([[-1.0, -3.0], [-2.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert weighted_nll(logprobs, mask, torch.ones(2)).item() == pytest.approx(6.0 / 3)
    # answer 2 weighs 3: (1 + 3 + 3 * 2) / (2 + 3 * 1)
    assert weighted_nll(logprobs, mask, torch.tensor([1.0, 3.0])).item() == pytest.approx(10.0 / 5)


# --------------------------------------------------------------------------- #
# boundaries and branches, computed by hand (each kills a surviving mutant)
# --------------------------------------------------------------------------- #


def test_two_entries_are_enough_for_the_unbiased_variance_and_whitening() -> None:
    values, mask = torch.tensor([[1.0, 3.0, 99.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    close(masked_var(values, mask), 2.0)  # mean 2, squared deviations 1 + 1, over n - 1 = 1
    close(masked_var(values, mask, unbiased=False), 1.0)
    close(masked_whiten(values, mask), [[-(0.5**0.5), 0.5**0.5, 0.0]])  # (x - 2) / sqrt(2)


def test_whitening_one_entry_only_centres_unless_told_not_to() -> None:
    values, mask = torch.tensor([[5.0, 7.0]]), torch.tensor([[1.0, 0.0]])
    close(masked_whiten(values, mask), [[0.0, 0.0]])
    close(masked_whiten(values, mask, shift_mean=False), [[5.0, 0.0]])


def test_whitening_constant_values_gives_zeros_not_nan() -> None:
    close(masked_whiten(torch.full((1, 3), 2.0), torch.ones(1, 3)), [[0.0, 0.0, 0.0]])


def test_kl_defaults_to_k1_and_names_an_unknown_estimator() -> None:
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    close(kl_per_token(logprobs, ref), [[0.5, -1.0]])
    with pytest.raises(ValueError, match="unknown KL estimator 'k2'; expected 'k1' or 'k3'"):
        kl_per_token(logprobs, ref, "k2")


def test_penalized_rewards_use_the_estimator_asked_for_and_any_score_dtype() -> None:
    logprobs, ref, mask = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), torch.ones(1, 2)
    rewards, kl = penalized_rewards(torch.tensor([1.0], dtype=torch.float64), logprobs, ref, mask, 0.1, "k3")
    # k3 = (r - 1) - log r with log r = ref - logp: 0.1065 and 0.7183
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    close(kl, [k3])
    close(rewards, [[-0.1 * k3[0], 1.0 - 0.1 * k3[1]]])


def test_gae_on_one_token_answers() -> None:
    advantages, returns = gae_advantages(torch.tensor([[2.0]]), torch.tensor([[0.5]]), torch.ones(1, 1), 1.0, 0.95)
    close(advantages, [[1.5]])  # r - V, nothing after
    close(returns, [[2.0]])


def test_policy_loss_clips_a_ratio_that_fell_below_one_minus_eps() -> None:
    # ratio 0.5 and advantage -1: max(-A r, -A clip(r, 0.8, 1.2)) = max(0.5, 0.8) = 0.8
    logprobs, old = torch.tensor([[math.log(0.5), 0.0]]), torch.zeros(1, 2)
    loss, stats = clipped_policy_loss(logprobs, old, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), 0.2)
    close(loss, (0.8 + -1.0) / 2)  # the second token: ratio 1, -A = -1
    assert stats["clip_fraction"] == 0.5  # only the first token was clipped; at ratio 1 nothing is


def test_value_loss_clips_a_prediction_that_fell_too_far() -> None:
    # v 0, old 1, return 0, eps 0.2: v_clip = 1 - 0.2 = 0.8; 0.5 * max(0^2, 0.8^2) = 0.32
    loss, stats = clipped_value_loss(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 0.2)
    close(loss, 0.32)
    assert stats["value_clip_fraction"] == 1.0


def test_running_moments_divide_by_a_std_below_one() -> None:
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0]))  # mean 1.5, unbiased std sqrt(0.5)
    close(moments.normalize(torch.tensor([2.5])), [1.0 / 0.5**0.5])


# --------------------------------------------------------------------------- #
# the scoring helpers of ppo.py and reward.py that need no model
# --------------------------------------------------------------------------- #


def test_missing_eos_penalty_lands_on_cut_off_answers_only() -> None:
    from rlhf_chat.learning.ppo import with_missing_eos_penalty

    scores = torch.tensor([0.5, 0.5, -2.0])
    close(with_missing_eos_penalty(scores, [True, False, False], -1.0), [0.5, -0.5, -3.0])
    close(with_missing_eos_penalty(scores, [True, False, False], 0.0), [0.5, 0.5, -2.0])


def test_rollout_layout_is_each_rows_real_prompt_then_answer_tokens() -> None:
    from rlhf_chat.learning.ppo import Rollout, rollout_layout

    batch = Rollout(
        contexts=[[], []], texts=["", ""], finished=[True, False],
        prompt_ids=torch.tensor([[0, 7, 8], [5, 6, 9]]), prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        response_ids=torch.tensor([[3, 2, 2], [4, 4, 4]]), response_mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
    )
    assert rollout_layout(batch) == [[7, 8, 3, 2], [5, 6, 9, 4, 4, 4]]  # left padding and the pads after EOS dropped


def test_answer_mask_and_pair_margins() -> None:
    from rlhf_chat.config import RewardConfig
    from rlhf_chat.learning.preferences import PreferencePair
    from rlhf_chat.learning.reward import answer_mask, pair_margins

    close(answer_mask([2, 1, 0], 4, "cpu"), [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    cfg = RewardConfig(margin_slightly=0.3, margin_clearly=1.2)
    pairs = [PreferencePair(i, [], "a", "b", strength) for i, strength in enumerate(["slightly", "clearly", None, "odd"])]
    margins = pair_margins(pairs, cfg, torch.device("cpu"))
    assert margins.dtype == torch.float32
    close(margins, [0.3, 1.2, 0.0, 0.0])
