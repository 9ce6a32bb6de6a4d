"""The numerical core of RLHF: reward-model loss, KL-shaped rewards, GAE and PPO losses.

Everything here is a small pure torch function (plus three tiny state-holding
dataclasses) so it can be unit-tested by hand with 3-token tensors, in the
spirit of nanoGPT / TRL / trlx.

Conventions used throughout:

* ``B`` is the batch size, ``T`` the number of *response* tokens, ``V`` the vocab.
* A ``mask`` is a float or bool tensor of shape ``(B, T)`` with 1 on real response
  tokens (up to and including the first EOS) and 0 on padding / after EOS.
  Every reduction goes through :func:`masked_mean` so padding never leaks into a
  loss or a gradient (minChatGPT built such a mask and then never applied it).
* Losses return ``(loss, stats)`` where ``stats`` is a dict of python floats that
  is safe to log.

References:

* Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (PPO).
* Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation" (GAE).
* Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
  (per-token KL penalty, adaptive KL controller).
* Ouyang et al. 2022, "Training language models to follow instructions with
  human feedback" (InstructGPT reward-model loss, eq. 1; RL objective, eq. 2).
* Schulman 2020, "Approximating KL Divergence" (blog: k1/k3 estimators).
* Chan, Golub & LeVeque 1979/1983, parallel variance algorithm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_chat.model.tensors import masked_mean

# --------------------------------------------------------------------------- #
# masked statistics
# --------------------------------------------------------------------------- #


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over entries where ``mask`` is non-zero (scalar).

    With ``unbiased=True`` applies Bessel's correction n / (n - 1). With fewer
    than 2 valid entries the unbiased variance is undefined; we return the biased
    one (0 for a single entry) instead of NaN.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()  # pragma: no mutate (a bool mask sums the same)
        if n.item() >= 2:
            var = var * n / (n - 1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise ``values`` to mean 0 / std 1 using only the masked entries.

    ``(x - mean) / sqrt(var + 1e-8)``, standard PPO advantage whitening (as in
    openai/lm-human-preferences and TRL). ``shift_mean=False`` only rescales
    (adds the mean back), which is what one wants for rewards. Masked-out
    positions are returned as exactly 0. With fewer than 2 valid entries the
    variance is meaningless, so we only centre (no division) to avoid NaN/blow-up.
    """
    mask = mask.to(values.dtype)  # pragma: no mutate (a bool mask whitens the same)
    mean = masked_mean(values, mask)
    if mask.sum().item() < 2:
        out = values - mean if shift_mean else values
        return out * mask
    var = masked_var(values, mask, unbiased=True)  # pragma: no mutate (True is the default; said for the reader)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros_like(whitened))


def length_mask(lengths: list[int], width: int, device=None) -> Tensor:
    """Float mask (B, width) of right-padded rows: 1 for the first ``lengths[b]`` columns.

    A row's length counts its real tokens, its EOS included when it finished;
    a row cut at the limit or stopped in a loop has none. (The pad token is
    the EOS token in our model, so the mask cannot be read off the ids.)

    >>> length_mask([2, 0, 3], 3).tolist()
    [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    columns = torch.arange(width, device=device)  # pragma: no mutate (devices: the tests run on the CPU)
    return (columns < torch.tensor(lengths, device=device).unsqueeze(1)).float()  # pragma: no mutate (as above)


# --------------------------------------------------------------------------- #
# KL and reward shaping
# --------------------------------------------------------------------------- #


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    Estimators from Schulman's "Approximating KL Divergence" blog, with
    r = p_ref(x) / p_policy(x) and x sampled from the policy:

    * ``"k1"``: ``-log r = logp - ref_logp``; unbiased but can be negative per token
      (the estimator used by Ziegler et al. 2019 / InstructGPT eq. 2).
    * ``"k3"``: ``(r - 1) - log r``; unbiased and always >= 0, lower variance.

    Shapes: (B, T), (B, T) -> (B, T). Raises ``ValueError`` on an unknown estimator.
    """
    log_ratio = ref_logprobs - logprobs  # log r, (B, T)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        # expm1 keeps precision when r ~ 1, i.e. exactly where the policy should stay
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty on every token plus the sequence score at the end.

    ``R(x, y) = r_phi(x, y) - beta * KL`` (Ziegler et al. 2019; InstructGPT eq. 2),
    spread over tokens as ``rewards[t] = -kl_coef * kl[t]`` with the scalar
    ``scores`` (B,) added at the last index where ``mask == 1``. Returns
    ``(rewards, kl)``, both (B, T) and exactly 0 on padding. Rows whose mask is all
    zero (empty response) get no score at all: there is no token to credit it to.
    """
    valid = mask != 0  # (B, T)
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    kl = torch.where(valid, kl, torch.zeros_like(kl))  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)  # pragma: no mutate (CPU tests)
    # largest valid position per row (0 for an all-zero row, dropped by the final where)
    last = torch.where(valid, positions, torch.zeros_like(positions)).argmax(dim=1)  # (B,)
    score_at_end = torch.zeros_like(rewards).scatter(
        1, last[:, None], scores.to(rewards.dtype)[:, None]
    )  # (B, T)
    rewards = torch.where(valid, rewards + score_at_end, torch.zeros_like(rewards))
    return rewards, kl


# --------------------------------------------------------------------------- #
# advantages
# --------------------------------------------------------------------------- #


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eqs. 11-16).

    ``delta_t = r_t + gamma * V(t+1) - V(t)``;
    ``A_t = delta_t + gamma * lam * A_{t+1}``, computed backward over T.
    The value after the last valid token is taken as 0 (the episode ends at EOS,
    nothing to bootstrap), and masked positions neither contribute nor propagate.
    Returns ``(advantages, returns)``, both (B, T), with
    ``returns = advantages + values`` (the value-function target) and both zeroed
    where ``mask == 0``. No whitening here: the caller decides (masked_whiten).
    Pass detached tensors; this is a target, not something to differentiate.
    """
    mask = mask.to(values.dtype)  # pragma: no mutate (a bool mask gives the same advantages)
    rewards = rewards * mask  # (B, T)
    values = values * mask  # (B, T): V = 0 past the end of each response
    T = rewards.shape[1]
    next_adv = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    advs_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = (delta + gamma * lam * next_adv) * mask[:, t]  # (B,)
        advs_reversed.append(adv)
        next_adv, next_value = adv, values[:, t]
    advantages = torch.stack(advs_reversed[::-1], dim=1)  # (B, T)
    returns = (advantages + values) * mask
    return advantages, returns


# --------------------------------------------------------------------------- #
# PPO losses
# --------------------------------------------------------------------------- #


def truncated_importance_weights(train_logprobs: Tensor, sample_logprobs: Tensor, cap: float) -> Tensor:
    """Per-token weights ``min(p_train / p_sampler, cap)`` for tokens drawn by another copy.

    The serving copy samples and the training copy scores; their numbers
    differ slightly (other kernels, bf16), so the rollout is a little off-policy
    for the distribution PPO optimises. Truncated importance sampling (Yao et
    al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training") reweights each token by that ratio, capped so a rare
    disagreement cannot blow a gradient up. (B, T), (B, T) -> (B, T), detached.

    >>> truncated_importance_weights(torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.1, 0.0]]), 2.0)
    tensor([[1.1052, 0.3679]])
    """
    return torch.exp(train_logprobs - sample_logprobs).clamp(max=cap).detach()


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss.

    ``ratio = exp(logp - old_logp)``;
    ``loss = masked_mean(w * max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``,
    with per-token importance ``weights`` w (1 when None; see
    :func:`truncated_importance_weights`).
    All inputs (B, T); only ``logprobs`` should carry gradient.
    Stats: ``policy_loss``; ``clip_fraction``, share of valid tokens where the
    clipped term won (those tokens get no gradient); ``approx_kl``,
    masked mean of ``0.5 * (logp - old_logp)^2`` (an early-stopping signal).
    """
    valid = mask != 0
    # zero the log-ratio on padding so a garbage logprob there cannot overflow exp()
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_loss1 = -advantages * ratio  # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.max(pg_loss1, pg_loss2)
    if weights is not None:
        per_token = per_token * weights
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "policy_loss": loss.item(),
            "clip_fraction": masked_mean((pg_loss2 > pg_loss1).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped value loss (baselines ppo2 / Ziegler et al. 2019 / TRL).

    The new value prediction may not move more than ``clip_range`` from the one
    used during rollout: ``v_clip = old + clamp(v - old, -eps, eps)``;
    ``loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))``. All inputs (B, T).
    Stats: ``value_loss``, ``value_clip_fraction`` (share of valid tokens where the
    clipped error won).
    """
    vpred_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    vf_loss1 = (values - returns) ** 2  # (B, T)
    vf_loss2 = (vpred_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        stats = {
            "value_loss": loss.item(),
            "value_clip_fraction": masked_mean((vf_loss2 > vf_loss1).float(), mask).item(),
        }
    return loss, stats


# --------------------------------------------------------------------------- #
# logits helpers
# --------------------------------------------------------------------------- #


def log_softmax_at(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of ``softmax(logits / temperature)`` over the last dim: (B, T, V) -> (B, T, V).

    Use the same temperature as at sampling time, otherwise the PPO ratio
    compares two different distributions.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(logits / temperature, dim=-1)


def gather_logprobs(logp: Tensor, labels: Tensor) -> Tensor:
    """The log-probability of each label: (B, T, V), (B, T) -> (B, T)."""
    return logp.gather(dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``: (B, T, V), (B, T) -> (B, T)."""
    return gather_logprobs(log_softmax_at(logits, temperature), labels)


def full_kl(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(reference || policy) over the whole vocabulary at each position: (N, V), (N, V) -> (N,).

    ``sum_v p_ref(v) * (log p_ref(v) - log p(v))``, at temperature 1. Unlike the
    log-likelihood of one sampled token, it has its minimum, zero, exactly at the
    reference's distribution: a loss on it pulls the policy back to what the
    starting model would say without making it surer of its own samples
    (distillation's target; GKD, Agarwal et al. 2024).

    >>> full_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
    tensor([0.])
    >>> round(full_kl(torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.9, 0.1]]))).item(), 4)
    0.5108
    """
    ref_logp = F.log_softmax(reference_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def entropy_from_logprobs(logp: Tensor) -> Tensor:
    """Entropy ``H = -sum_i p_i log p_i`` of a distribution given by its log-probabilities: (B, T, V) -> (B, T).

    It reuses the log-softmax a PPO update computes anyway: a second pass from
    the logits (softmax, logsumexp, a product over the 49k-word vocabulary)
    cost about a fifth of each minibatch update on the CPU. Log-probabilities
    of -inf (p = 0) contribute 0, not NaN.
    """
    finite = logp.clamp_min(torch.finfo(logp.dtype).min)
    return -(logp.exp() * finite).sum(dim=-1)


# --------------------------------------------------------------------------- #
# reward model
# --------------------------------------------------------------------------- #


def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
    weight: Tensor | None = None,
    target: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Pairwise reward-model loss (Bradley-Terry; InstructGPT Ouyang et al. 2022 eq. 1).

    ``-log sigmoid(r_c - r_r - margin)`` averaged over the batch (margin as in
    Llama 2 / TRL, optional (B,); a pair's ``weight``, optional (B,), is its
    share of the weighted mean: a written answer may weigh more than a vote), plus ``center_coef * mean((r_c + r_r)^2)``
    (TRL RewardTrainer ``center_rewards_coefficient``), which pins the otherwise
    shift-invariant scores near 0. Scores are (B,).

    ``target`` (B,), optional, is the probability that the chosen answer is
    better: 1 for a vote (the loss above), 1/2 for a tie, whose loss
    ``-(log sigmoid(z) + log sigmoid(-z)) / 2`` is least (log 2) when the two
    scores are equal. A tie's margin should be 0.
    Stats: ``loss``, ``accuracy`` (fraction with r_c > r_r, over the pairs of
    target 1 only: a tie has no right side; None when there are none),
    ``mean_margin`` (mean r_c - r_r over the same pairs, without the target margin).
    """
    diff = chosen_scores - rejected_scores  # (B,)
    logits = diff if margin is None else diff - margin
    if target is None:
        per_pair = -F.logsigmoid(logits)
    else:
        per_pair = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits))
    loss = per_pair.mean() if weight is None else (weight * per_pair).sum() / weight.sum()
    if center_coef:
        loss = loss + center_coef * ((chosen_scores + rejected_scores) ** 2).mean()
    with torch.no_grad():
        decided = diff if target is None else diff[target == 1]
        stats = {
            "loss": loss.item(),
            "accuracy": (decided > 0).float().mean().item() if decided.numel() else None,
            "mean_margin": decided.mean().item() if decided.numel() else 0.0,
        }
    return loss, stats


# --------------------------------------------------------------------------- #
# small stateful helpers
# --------------------------------------------------------------------------- #


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2).

    Proportional controller that steers the measured KL toward ``target``:
    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta *= 1 + e * n_steps / horizon``,
    where ``n_steps`` counts answers: at full error, beta moves by 20% over
    ``horizon`` answers.
    ``value`` is the current coefficient; assign it directly to restore a checkpoint.
    """

    init_kl_coef: float
    target: float
    horizon: int
    value: float = field(init=False)

    def __post_init__(self) -> None:
        self.value = self.init_kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust ``value`` after ``n_steps`` samples whose mean KL was ``current_kl``."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


@dataclass
class FixedKLController:
    """Constant KL coefficient with the same ``value`` / ``update`` interface."""

    kl_coef: float
    value: float = field(init=False)

    def __post_init__(self) -> None:
        self.value = self.kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the fixed ``value``."""
        return self.value


@dataclass
class RunningMoments:
    """Running mean / unbiased std of a scalar stream (e.g. reward-model scores).

    Batches are merged with Chan et al.'s parallel algorithm, which is exact and
    numerically stable (no sum-of-squares cancellation). State is three numbers
    (``mean``, ``m2`` = sum of squared deviations, ``count``) so it round-trips
    through ``to_dict`` / ``from_dict`` for checkpoints.
    """

    mean: float = 0.0
    m2: float = 0.0
    count: int = 0

    @property
    def var(self) -> float:
        """Unbiased variance; 1.0 until two values were seen (uninformative default)."""
        return self.m2 / (self.count - 1) if self.count >= 2 else 1.0

    @property
    def std(self) -> float:
        """Unbiased standard deviation; 1.0 until two values were seen."""
        return math.sqrt(self.var)

    def update(self, xs: Tensor) -> None:
        """Merge a batch of values (any shape, flattened) into the running moments."""
        xs = xs.detach().flatten().double()  # float64: the state lives for the whole run
        n_b = xs.numel()
        if n_b == 0:
            return
        mean_b = xs.mean().item()
        m2_b = ((xs - mean_b) ** 2).sum().item()
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.count * n_b / total
        self.count = total

    def normalize(self, xs: Tensor) -> Tensor:
        """``(xs - mean) / max(std, 1e-6)``; only centres while count < 2."""
        if self.count < 2:
            return xs - self.mean
        return (xs - self.mean) / max(self.std, 1e-6)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python state for JSON / torch.save."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunningMoments:
        """Inverse of :meth:`to_dict`."""
        return cls(mean=float(state["mean"]), m2=float(state["m2"]), count=int(state["count"]))
