"""PPO: online updates of the 4-bit policy against the reward model (InstructGPT, sec. 3.5).

One step, each phase a job on the model worker so that a person waits at most
one slice:

1. rollout   - the serving copy samples answers to prompts people typed, with
               the sampling scheme people vote on (``AppConfig.sampling``)
2. score     - the training copy computes reference log-probs (adapters
               off), reward-model scores, and the policy's log-probs and
               values; the gap between its log-probs and the serving copy's
               is recorded. When one minibatch holds every row, the first
               update's forward is that policy pass (nothing has moved yet)
3. advantage - reward = normalised score at the last token - β·KL per token;
               GAE; whitened advantages
4. update    - epochs x minibatches of clipped surrogate (importance-weighted
               for the copy gap) + clipped value loss (+ PPO-ptx's
               language-model loss on chosen answers, :mod:`rlhf_chat.learning.supervised`)
5. publish   - the updated adapter is copied into the serving copy and the
               version goes up; a non-finite step restores the old adapter

The math is in :mod:`rlhf_chat.learning.ppo_math`; this module only moves tensors.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from rlhf_chat.config import AppConfig, GuardConfig, LoopConfig, PPOConfig, RewardConfig, SamplingConfig
from rlhf_chat.generation.candidates import Sampling, encode_openings, sample
from rlhf_chat.generation.modes import PLAIN, active_modes, guided_openings, mode_record_for
from rlhf_chat.generation.worker import PPO as PPO_PRIORITY
from rlhf_chat.generation.worker import yield_point
from rlhf_chat.learning import ppo_math as pm
from rlhf_chat.learning.checkpoints import check_base, copy_into, load_verified, publish_checkpoint
from rlhf_chat.learning.guards import assess_feedback
from rlhf_chat.learning.reward import encode, score_prefix, score_sequences, stored_fields
from rlhf_chat.learning.supervised import (
    SupervisedExample,
    chosen_answers,
    demonstrated_answers,
    lm_loss,
    reference_answers,
    reference_kl_loss,
)
from rlhf_chat.learning.tax import SideTax, measure_tax
from rlhf_chat.model.decoder import decoder_for
from rlhf_chat.model.heads import Prefix, first_adapted_layer, frozen_prefix, top_hidden
from rlhf_chat.model.loading import POLICY, Models, adapter_state, fast_matmul_dtype, sync_policy_weights
from rlhf_chat.model.tensors import left_pad
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import PPOStep
from rlhf_chat.text.chat import prompt_text, render_prompt, trim_to_budget
from rlhf_chat.text.questions import load_reference_answers, question_kind, shipped_fact_key

log = logging.getLogger(__name__)
# One seed for every live tax measurement, so that versions are compared on the same draws.
TAX_SEED = 7

# (models, rollout) -> raw scores (B,). The reward model by default; tests pass
# a rule, the way a scripted labeler stands in for people.
ScoreFn = Callable[[Models, "Rollout"], torch.Tensor]


@dataclass
class Rollout:
    """A batch of sampled answers and everything PPO computes about them."""

    contexts: list[list[dict]]  # as the prompts were rendered (trimmed to max_prompt_tokens)
    texts: list[str]
    finished: list[bool]
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS
    temperature: float = 1.0  # of the distribution the tokens were drawn from
    sample_logprobs: torch.Tensor | None = None  # (B, R) the serving copy's log-probs of its draws
    # (B, R) 1 at the tokens of a guided row's prefilled opening: the policy did not
    # draw them, so they carry no sampling log-prob (None: no guided row)
    forced: torch.Tensor | None = None
    # filled in by score_rollout; the policy's log-probs, values, rewards, KL and
    # advantages, with policy_pass=False, by the first minibatch_update instead
    # frozen layers' output over prompt + response, shared by every pass: kept
    # by the rollout where the serving copy computes it exactly, else by score_rollout
    prefix: Prefix | None = None
    logprobs: torch.Tensor | None = None  # (B, R) the training copy's, at the sampling temperature
    # mean |logprobs - sample_logprobs| per sampled token (nats): with the prefix
    # kept while sampling, the gap of the adapted top layers and the output layer
    copy_gap: float = 0.0
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    values: torch.Tensor | None = None  # (B, R)
    raw_scores: torch.Tensor | None = None  # (B,) reward-model output
    scores: torch.Tensor | None = None  # (B,) normalised, with the missing-EOS penalty
    rewards: torch.Tensor | None = None  # (B, R)
    kl: torch.Tensor | None = None  # (B, R)
    kl_coef: float = 0.0  # the KL penalty's beta the rewards are computed with
    advantages: torch.Tensor | None = None  # (B, R) whitened
    returns: torch.Tensor | None = None  # (B, R)


# --- 1) rollout ----------------------------------------------------------------------------


def rollout(
    models: Models,
    contexts: list[list[dict]],
    cfg: PPOConfig,
    sampling: SamplingConfig,
    seed: int,
    openings: list[str] | None = None,
    keep_prefix: bool = True,
) -> Rollout:
    """Sample one answer per context from the serving copy (the last completed policy),
    with the scheme the candidates people vote on are sampled with.

    The serving copy holds exactly the training copy's policy weights between
    steps, and samples in fast eval mode. PPO's log-probabilities are those of
    softmax(logits / temperature), so the scheme must not cut the distribution.
    ``openings`` (guided rows, ``PPOConfig.guided_fraction``; "" for a plain row)
    start a row's answer: the opening is part of the answer PPO scores and
    updates, under the plain context, marked in ``forced``. With ``keep_prefix``
    the frozen layers' output is kept as the batch's prefix where the serving
    copy computes it exactly (:func:`serving_prefix_is_exact`).
    """
    if sampling.top_p < 1.0:
        raise ValueError(
            f"PPO needs top_p 1.0 (got {sampling.top_p}): its log-probabilities are those of the whole "
            "softmax at the temperature, and a nucleus cut would make them another distribution's"
        )
    tok = models.tokenizer
    contexts = [trim_to_budget(tok, c, cfg.max_prompt_tokens) for c in contexts]
    prompts = [render_prompt(tok, c) for c in contexts]
    drawn = Sampling.from_config(sampling, seed, cfg.min_new_tokens)
    guided = openings if openings and any(openings) else None
    keep_frozen = keep_prefix and guided is None and serving_prefix_is_exact(models)
    # people first, per token
    out = sample(models.serving, tok, prompts, drawn, on_step=yield_point, openings=guided, keep_frozen=keep_frozen)
    batch = Rollout(
        contexts=contexts,
        texts=out.texts,
        finished=out.finished,
        prompt_ids=out.prompt_ids,
        prompt_mask=out.prompt_mask,
        response_ids=out.response_ids,
        response_mask=pm.length_mask(out.token_counts, out.response_ids.shape[1], out.response_ids.device),
        temperature=sampling.temperature,
        sample_logprobs=out.logprobs.to(out.response_ids.device),
    )
    if out.frozen is not None:
        mask = torch.cat([batch.prompt_mask, batch.response_mask.to(batch.prompt_mask.dtype)], dim=1)
        batch.prefix = Prefix(out.frozen, mask, first_adapted_layer(models.trainer))
    if guided is not None:
        move_openings_into_answers(batch, prompts, encode_openings(tok, guided, len(prompts)), out.token_counts, tok.pad_token_id)
    return batch


def serving_prefix_is_exact(models: Models) -> bool:
    """Whether the serving copy's frozen layers compute the training copy's
    function: the native kernels multiply float32 activations by exactly the
    training copy's weights (``bench/copy_gap.py``: 3.8e-6 nats end to end), so
    the frozen layers' output kept while sampling is the scoring prefix, and
    scoring skips two thirds of the model (``bench/ppo_step.py``). torch's int4
    kernel rounds activations to bf16, and a training copy on native bf16
    multiplies in bf16: there the training copy computes its own."""
    if models.kernel != "avx2" or fast_matmul_dtype(models.device) != torch.float32:
        return False  # (an avx2 kernel named by hand beside a bf16 training copy: not its function)
    decoder = decoder_for(models.serving)
    if decoder is None or decoder.split == len(decoder.layers):  # no adapted layer to split at
        return False
    return decoder.split == first_adapted_layer(models.trainer)


def move_openings_into_answers(
    batch: Rollout, prompts: list[list[int]], openings: list[list[int]], counts: list[int], pad_id: int
) -> None:
    """Re-lay a batch sampled after prefilled openings so that each opening opens the
    answer rather than ends the prompt: PPO then scores and updates the opening's
    tokens as the plain policy's own (under the plain context), marked in ``forced``.

    A forced token's sampling log-prob is 0 here; ``score_rollout`` sets it to the
    training copy's, so its importance weight is 1 and the copy gap counts only draws.
    """
    device = batch.response_ids.device
    rows = [o + r[:n] for o, r, n in zip(openings, batch.response_ids.tolist(), counts)]
    width = max(len(r) for r in rows)
    response = torch.full((len(rows), width), pad_id, dtype=batch.response_ids.dtype)
    sample_logprobs = torch.zeros((len(rows), width), dtype=batch.sample_logprobs.dtype)
    forced = torch.zeros((len(rows), width))
    for k, (opening, row, n) in enumerate(zip(openings, rows, counts)):
        response[k, : len(row)] = torch.tensor(row, dtype=response.dtype)
        sample_logprobs[k, len(opening) : len(row)] = batch.sample_logprobs[k, :n].cpu()
        forced[k, : len(opening)] = 1.0
    batch.prompt_ids, batch.prompt_mask = left_pad(prompts, pad_id, device)
    batch.response_ids, batch.sample_logprobs = response.to(device), sample_logprobs.to(device)
    batch.forced = forced.to(device)
    batch.response_mask = pm.length_mask([len(r) for r in rows], width, device)


# --- 2) score ------------------------------------------------------------------------------


def full_prefix(models: Models, prompt_ids, prompt_mask, response_ids, response_mask) -> Prefix:
    """The frozen layers' output over prompt + response (computed once per rollout)."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+R)
    mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return frozen_prefix(models.trainer, ids, mask)


def policy_forward(
    models: Models,
    prefix: Prefix,
    prompt_len: int,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    with_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Under the active adapter of the training copy: log-probs (B, R) of the
    response tokens at ``temperature`` (0 past each answer's end), values (B, R),
    and the log-softmax (N, V) at the N real response tokens.

    The 49k-word output layer and log-softmax run on the real tokens only: once
    the policy learns to stop early, most of a batch's R columns are padding.
    """
    hidden = top_hidden(models.trainer, prefix, models.recompute_top_layers)  # (B, P+R, H)
    before_each = hidden[:, prompt_len - 1 : -1]  # (B, R, H): the state that emitted each response token
    real = response_mask.bool()
    logits = models.trainer.get_base_model().lm_head(before_each[real]).float()  # (N, V)
    logp = pm.log_softmax_at(logits, temperature)  # (N, V)
    logprobs = torch.zeros(response_ids.shape, dtype=logp.dtype, device=logp.device)
    logprobs[real] = pm.gather_logprobs(logp, response_ids[real])
    values = models.value_head(before_each).squeeze(-1).float() if with_values else None
    return logprobs, values, logp


def stored_layout(models: Models, batch: Rollout) -> list:
    """Each rollout answer encoded as a stored vote's answer is (``reward.encode``):
    its context, its text, an EOS only if it finished."""
    no_cut = 1 << 30  # pragma: no mutate (any bound past every prompt + answer, and 0 = [-0:], keep all)
    return [encode(models.tokenizer, c, t, no_cut, f) for c, t, f in zip(batch.contexts, batch.texts, batch.finished)]


def rollout_layout(batch: Rollout) -> list[list[int]]:
    """The real tokens of each rollout row: its prompt, then its answer up to its end."""
    rows = []
    for k in range(batch.prompt_ids.shape[0]):
        prompt = batch.prompt_ids[k][batch.prompt_mask[k].bool()].tolist()
        rows.append(prompt + batch.response_ids[k][batch.response_mask[k].bool()].tolist())
    return rows


def reward_model_scores(models: Models, batch: Rollout) -> torch.Tensor:
    """Raw reward-model scores of the rollout's answers; the default :data:`ScoreFn`.

    The reward model learned from stored votes: an answer's text re-encoded,
    with an EOS only if it finished. Each answer is scored in exactly that
    layout. A row whose layout is the sampled tokens themselves is scored on
    the rollout's prefix; a row where decoding and re-encoding changed a token
    (``"1."`` after a line break is one token sampled, two re-encoded: 7 of 48
    rows of the bundled model) is scored through a prefix of its own.
    """
    stored = stored_layout(models, batch)
    same = torch.tensor([s.ids == r for s, r in zip(stored, rollout_layout(batch))])
    scores = torch.zeros(len(stored), device=batch.response_ids.device)
    if same.any():
        rows = same.nonzero().squeeze(-1).to(scores.device)
        mask = batch.response_mask[rows].to(batch.prompt_mask.dtype)
        answers = torch.cat([torch.zeros_like(batch.prompt_mask[rows]), mask], dim=1)
        scores[rows] = score_prefix(models, batch.prefix.rows(rows), answers)
    if not same.all():
        rows = (~same).nonzero().squeeze(-1).to(scores.device)
        scores[rows] = score_sequences(models, [stored[k] for k in rows.tolist()])
    return scores


@dataclass
class ScoreNormalizer:
    """Running mean and std of the reward model's scores on PPO's own rollouts,
    started again for each reward version (each scores on its own scale).

    Statistics of the rollouts PPO is scored on, not of the reward model's
    training answers: those are in-sample (the model fit them), from older
    policies, and in the live loop the oldest votes.
    """

    reward_version: int = 0
    moments: pm.RunningMoments = field(default_factory=pm.RunningMoments)

    def normalize(self, raw: torch.Tensor, reward_version: int) -> torch.Tensor:
        """Merge this batch's scores into the statistics, then return them normalised."""
        if reward_version != self.reward_version:
            self.reward_version, self.moments = reward_version, pm.RunningMoments()
        self.moments.update(raw)
        return self.moments.normalize(raw)

    def to_dict(self) -> dict:
        """Plain state for a checkpoint."""
        return {"reward_version": self.reward_version, **self.moments.to_dict()}

    @classmethod
    def from_dict(cls, state: dict) -> ScoreNormalizer:
        """Inverse of :meth:`to_dict`."""
        return cls(int(state["reward_version"]), pm.RunningMoments.from_dict(state))


@torch.no_grad()
def score_rollout(
    models: Models,
    batch: Rollout,
    cfg: PPOConfig,
    kl_coef: float,
    score_fn: ScoreFn,
    normalizer: ScoreNormalizer | None = None,
    policy_pass: bool = True,
) -> Rollout:
    """Fill in the prefix, reference log-probs and scores; with ``policy_pass``
    also the policy's log-probs and values, rewards and advantages.

    Without ``policy_pass`` the first update's forward supplies the policy's
    terms (:func:`fill_policy_terms`): when one minibatch holds every row, the
    first epoch runs before any parameter moves, so that forward is exactly
    the scoring pass, and doing both costs a 10-layer pass and an output layer
    over the batch for nothing (bench/ppo_step.py). Without a ``normalizer``
    the raw scores are used as they are (tests).
    """
    if batch.prefix is None:  # else the rollout kept it (serving_prefix_is_exact)
        batch.prefix = full_prefix(models, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    args = (batch.prefix, batch.prompt_ids.shape[1], batch.response_ids, batch.response_mask, batch.temperature)
    with models.trainer.disable_adapter():  # the reference: the same base, no adapter
        # pragma: no mutate (with_values: saves work only)
        batch.ref_logprobs, _, _ = policy_forward(models, *args, with_values=False)  # pragma: no mutate
    # A waiting person goes first (nested jobs only use the serving copy).
    yield_point()  # pragma: no mutate (scheduling, tested in test_worker)
    batch.raw_scores = score_fn(models, batch).float()
    models.trainer.set_adapter(POLICY)
    scores = normalizer.normalize(batch.raw_scores, models.reward_version) if normalizer else batch.raw_scores
    batch.scores = with_missing_eos_penalty(scores, batch.finished, cfg.missing_eos_penalty)
    batch.scores = with_empty_answer_score(batch.scores, batch.texts, cfg.empty_answer_score)
    batch.kl_coef = kl_coef
    # The first update fills these when they are None: never leave an older scoring's
    batch.logprobs = batch.values = batch.rewards = batch.kl = batch.advantages = batch.returns = None
    if policy_pass:
        yield_point()  # pragma: no mutate (scheduling, as above)
        score_policy(models, batch, cfg)
    return batch


@torch.no_grad()
def score_policy(models: Models, batch: Rollout, cfg: PPOConfig) -> None:
    """The policy's scoring pass on its own: log-probs and values under the
    policy adapter, then :func:`fill_policy_terms`."""
    models.trainer.set_adapter(POLICY)
    args = (batch.prefix, batch.prompt_ids.shape[1], batch.response_ids, batch.response_mask, batch.temperature)
    logprobs, values, _ = policy_forward(models, *args)
    fill_policy_terms(batch, logprobs, values, cfg)


@torch.no_grad()
def fill_policy_terms(batch: Rollout, logprobs: torch.Tensor, values: torch.Tensor, cfg: PPOConfig) -> None:
    """From the policy's log-probs and values (B, R) before any update: the copy
    gap, the KL-penalised rewards and the whitened GAE advantages (phase 3)."""
    batch.logprobs, batch.values = logprobs.detach(), values.detach()
    if batch.sample_logprobs is not None:
        drawn = batch.response_mask
        if batch.forced is not None:  # an opening's tokens were not drawn: weight 1, no gap to measure
            batch.sample_logprobs = torch.where(batch.forced.bool(), batch.logprobs, batch.sample_logprobs)
            drawn = drawn * (1 - batch.forced)
        batch.copy_gap = pm.masked_mean((batch.logprobs - batch.sample_logprobs).abs(), drawn).item()
    mask = batch.response_mask
    batch.rewards, batch.kl = pm.penalized_rewards(
        batch.scores, batch.logprobs, batch.ref_logprobs, mask, batch.kl_coef, cfg.kl_estimator
    )
    advantages, batch.returns = pm.gae_advantages(batch.rewards, batch.values, mask, cfg.gamma, cfg.lam)
    batch.advantages = pm.masked_whiten(advantages, mask)


def with_empty_answer_score(scores: torch.Tensor, texts: list[str], value: float) -> torch.Tensor:
    """Scores with ``value`` for answers that show no text at all.

    Nobody votes on an empty answer, so the reward model never learns that it
    is the worst answer there is; fitted to "shorter wins" it extrapolates the
    other way, and a `concise` run's policy answered nothing to 29% of
    held-out prompts. A fixed score (in units of the normalised reward) says
    what no vote can.

    >>> with_empty_answer_score(torch.tensor([0.5, 0.5, 0.5]), ["Hi.", " ", ""], -3.0).tolist()
    [0.5, -3.0, -3.0]
    """
    empty = torch.tensor([not t.strip() for t in texts], device=scores.device)
    return torch.where(empty, torch.full_like(scores, value), scores)


def with_missing_eos_penalty(scores: torch.Tensor, finished: list[bool], penalty: float) -> torch.Tensor:
    """Scores with a fixed ``penalty`` added for answers cut at the length limit
    (TRL ``missing_eos_penalty``; Huang et al. 2024).

    >>> with_missing_eos_penalty(torch.tensor([0.5, 0.5]), [True, False], -1.0).tolist()
    [0.5, -0.5]
    """
    cut = torch.tensor([not f for f in finished], device=scores.device)  # pragma: no mutate (CPU tests)
    return torch.where(cut, scores + penalty, scores)


# --- 4) update -----------------------------------------------------------------------------


def policy_parameters(models: Models) -> list[torch.nn.Parameter]:
    """What PPO trains: the policy's LoRA adapter and the value head."""
    return [*adapter_state(models.trainer, POLICY).values(), *models.value_head.parameters()]


def make_optimizer(models: Models, cfg: PPOConfig) -> torch.optim.Optimizer:
    """AdamW with a faster rate for the fresh value head (it starts knowing nothing)."""
    return torch.optim.AdamW(
        [
            {"params": list(adapter_state(models.trainer, POLICY).values()), "lr": cfg.learning_rate},
            {"params": list(models.value_head.parameters()), "lr": cfg.learning_rate * cfg.value_head_lr_mult},
        ],
        weight_decay=0.0,
    )


def minibatch_update(
    models: Models,
    optimizer: torch.optim.Optimizer,
    batch: Rollout,
    rows: list[int],
    cfg: PPOConfig,
    ptx_examples: list[SupervisedExample] | None = None,
    anchor_examples: list[SupervisedExample] | None = None,
) -> dict:
    """One gradient step on a minibatch of the rollout, with PPO-ptx's terms on
    ``ptx_examples`` (answers people chose) and ``anchor_examples`` (the starting
    model's own answers). Returns stats, with ``finite=False`` (and no step taken)
    when the loss or a gradient is not finite.

    A batch scored without its policy pass (``score_rollout(policy_pass=False)``)
    gets its policy terms from this forward, which must then cover every row.
    """
    models.trainer.train()  # pragma: no mutate (the training copy never leaves train mode; its dropout is 0)
    models.trainer.set_adapter(POLICY)
    idx = torch.tensor(rows, device=batch.response_ids.device)
    mask = batch.response_mask[idx]
    logprobs, values, logp = policy_forward(
        models, batch.prefix.rows(idx), batch.prompt_ids.shape[1], batch.response_ids[idx], mask, batch.temperature
    )
    if batch.logprobs is None:
        fill_policy_terms(batch, *in_row_order(idx, batch.response_ids.shape[0], logprobs, values), cfg)
    weights = None
    if cfg.importance_cap > 0 and batch.sample_logprobs is not None:
        weights = pm.truncated_importance_weights(batch.logprobs[idx], batch.sample_logprobs[idx], cfg.importance_cap)
    pg_loss, pg_stats = pm.clipped_policy_loss(
        logprobs, batch.logprobs[idx], batch.advantages[idx], mask, cfg.clip_range, weights
    )
    vf_loss, vf_stats = pm.clipped_value_loss(
        values, batch.values[idx], batch.returns[idx], mask, cfg.clip_range_value
    )
    with torch.no_grad():  # pragma: no mutate (memory only: a float is kept)
        entropy = pm.entropy_from_logprobs(logp).mean().item()  # logp holds real tokens only
    del logp  # (N, V): 12 MB a 64-token row, not needed past the entropy
    optimizer.zero_grad(set_to_none=True)  # pragma: no mutate (every update ends with one: a safeguard)
    stats = {**pg_stats, **vf_stats, "entropy": entropy, "finite": False}
    # Each term goes back on its own: the gradients add up to those of the sum,
    # and only one term's graph is alive at a time. On long conversations the
    # PPO rows' and the PPO-ptx answers' graphs held together were the biggest
    # job of a Space under load (bench/job_memory.py, docs/performance.md).
    total = backward_if_finite(pg_loss + cfg.vf_coef * vf_loss)
    del logprobs, values, pg_loss, vf_loss
    if total is not None and cfg.ptx_coef > 0 and ptx_examples:
        ptx = lm_loss(models, ptx_examples, cfg.max_prompt_tokens)
        stats["ptx_loss"] = ptx.item()
        total = add_if_finite(total, backward_if_finite(cfg.ptx_coef * ptx))
    if total is not None and cfg.ptx_reference_coef > 0 and anchor_examples:
        anchor_loss = reference_kl_loss if cfg.anchor_loss == "kl" else lm_loss
        anchor = anchor_loss(models, anchor_examples, cfg.max_prompt_tokens)
        stats["ptx_reference_loss"] = anchor.item()
        total = add_if_finite(total, backward_if_finite(cfg.ptx_reference_coef * anchor))
    stats["loss"] = float("nan") if total is None else total
    if total is None:
        optimizer.zero_grad(set_to_none=True)  # a term that went back before a non-finite one
        return stats
    grad_norm = torch.nn.utils.clip_grad_norm_(policy_parameters(models), cfg.max_grad_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)  # pragma: no mutate (the next update starts with one, too)
        return stats
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # pragma: no mutate (the next update starts with one, too)
    return {**stats, "finite": True, "grad_norm": grad_norm.item()}


def backward_if_finite(loss: torch.Tensor) -> float | None:
    """Backpropagate ``loss`` (its gradients add to those already there) and return
    its value; None, with nothing backpropagated, when it is not finite.

    >>> w = torch.ones(1, requires_grad=True)
    >>> backward_if_finite((2 * w).sum()), w.grad.tolist()
    (2.0, [2.0])
    >>> backward_if_finite(w.sum() * float("nan")), w.grad.tolist()
    (None, [2.0])
    """
    value = loss.item()
    if not math.isfinite(value):
        return None
    loss.backward()
    return value


def add_if_finite(total: float, part: float | None) -> float | None:
    """``total + part``, or None when ``part`` is None (a term that was not finite).

    >>> add_if_finite(1.0, 0.5), add_if_finite(1.0, None)
    (1.5, None)
    """
    return None if part is None else total + part


def in_row_order(idx: torch.Tensor, rows: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Tensors of a minibatch (rows ``idx``, a permutation of all ``rows`` rows of
    the batch) put back in the batch's row order.

    >>> in_row_order(torch.tensor([2, 0, 1]), 3, torch.tensor([20.0, 0.0, 10.0]))[0].tolist()
    [0.0, 10.0, 20.0]
    """
    if sorted(idx.tolist()) != list(range(rows)):
        raise ValueError("a batch scored without its policy pass needs one first minibatch of every row")
    order = torch.argsort(idx)
    return [t.detach()[order] for t in tensors]


# --- the trainer ---------------------------------------------------------------------------


@dataclass
class StepResult:
    """Metrics of one PPO step; also stored in the ``ppo_steps`` table."""

    version: int
    mean_reward: float
    mean_kl: float
    kl_coef: float
    policy_loss: float
    value_loss: float
    clip_fraction: float
    approx_kl: float
    entropy: float
    mean_length: float
    skipped: bool
    seconds: float
    reward_version: int = 0  # the reward model this step optimised
    copy_gap: float = 0.0  # mean |log p_train - log p_serving| per sampled token (nats)
    ptx_loss: float | None = None  # the language-model term on chosen answers, when on
    rollout_s: float = 0.0
    score_s: float = 0.0
    update_s: float = 0.0
    texts: list[str] | None = None
    scores: list[float] | None = None  # each rollout's raw reward-model score
    lengths: list[int] | None = None  # each rollout's length in tokens
    guided: list[bool] | None = None  # each rollout row: opened by a mode's opening (PPOConfig.guided_fraction)
    prompts: list[str] | None = None  # each rollout row's question (its context's last user turn)

    def row(self) -> dict:
        """The ``ppo_steps`` row of this step (``reward.stored_fields``: its metrics, a NaN as 0)."""
        return stored_fields(self, PPOStep)


def plain_rows(guided: list[bool]) -> list[int]:
    """The rows a step reports on: the plain policy's own samples (a guided row's opening
    was prefilled); every row when all are guided.

    >>> plain_rows([True, False, False]), plain_rows([True])
    ([1, 2], [0])
    """
    return [k for k, g in enumerate(guided) if not g] or list(range(len(guided)))


def mean_stat(stats: list[dict], key: str) -> float:
    """The mean of ``key`` over the minibatches' stats that have it; NaN when none has.

    >>> mean_stat([{"loss": 1.0}, {"loss": 3.0}, {}], "loss"), mean_stat([], "loss")
    (2.0, nan)
    """
    values = [s[key] for s in stats if key in s]
    return float(sum(values) / len(values)) if values else float("nan")


def step_result(
    batch: Rollout,
    stats: list[dict],
    examples: list[SupervisedExample],
    guided: list[bool],
    version: int,
    finite: bool,
    reward_version: int,
    times: dict[str, float],
) -> StepResult:
    """A step's metrics (``finite``: whether its update was published, not skipped).
    What it reports (KL of whole answers, as TRL reports it; reward; length) is of the
    plain policy's own samples (:func:`plain_rows`); the per-row lists cover every row.
    ``times``: perf_counter marks at the start and after each phase."""
    plain = plain_rows(guided)
    return StepResult(
        version=version,
        mean_reward=batch.raw_scores[plain].mean().item(),
        mean_kl=batch.kl.sum(-1)[plain].mean().item(),
        kl_coef=batch.kl_coef,  # the beta the rewards were computed with
        policy_loss=mean_stat(stats, "policy_loss"),
        value_loss=mean_stat(stats, "value_loss"),
        clip_fraction=mean_stat(stats, "clip_fraction"),
        approx_kl=mean_stat(stats, "approx_kl"),
        entropy=mean_stat(stats, "entropy"),
        mean_length=batch.response_mask.sum(-1)[plain].mean().item(),
        skipped=not finite,
        seconds=times["update"] - times["start"],
        reward_version=reward_version,
        copy_gap=batch.copy_gap,
        ptx_loss=mean_stat(stats, "ptx_loss") if examples else None,
        rollout_s=times["rollout"] - times["start"],
        score_s=times["score"] - times["rollout"],
        update_s=times["update"] - times["score"],
        texts=batch.texts,
        scores=batch.raw_scores.tolist(),
        lengths=batch.response_mask.sum(-1).long().tolist(),
        guided=guided,
        prompts=[prompt_text(c) for c in batch.contexts],
    )


def snapshot(models: Models, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Copies of the policy weights and optimizer state, to restore after a bad step."""
    weights = {k: v.detach().clone() for k, v in policy_tensors(models).items()}
    return weights, copy.deepcopy(optimizer.state_dict())


def policy_tensors(models: Models) -> dict[str, torch.Tensor]:
    """Everything a policy checkpoint holds (LoRA adapter and value head), keyed by name."""
    lora = {f"lora.{k}": v for k, v in adapter_state(models.trainer, POLICY).items()}
    return {**lora, **{f"head.{k}": v for k, v in models.value_head.named_parameters()}}


def restore(models: Models, optimizer: torch.optim.Optimizer, saved: tuple[dict, dict]) -> None:
    """Put the policy back as it was before the step."""
    weights, opt_state = saved
    copy_into(policy_tensors(models), weights)
    optimizer.load_state_dict(opt_state)


def publish(models: Models) -> int:
    """Make the trained policy the one people talk to; returns the new version.

    Runs as one worker job, so no request ever sees a half-copied adapter.
    """
    sync_policy_weights(models.trainer, models.serving)
    models.serving_version += 1
    return models.serving_version


class PPOTrainer:
    """Runs PPO steps through the model worker and records them.

    ``sampling`` is the scheme rollouts are drawn with: the app passes
    ``AppConfig.sampling``, the one people's candidates are drawn with.
    """

    def __init__(
        self,
        worker,
        sessions,
        cfg: PPOConfig,
        checkpoint_dir: str,
        score_fn: ScoreFn | None = None,
        sampling: SamplingConfig | None = None,
        demonstration_weight: float | None = None,
        guard_cfg: GuardConfig | None = None,
        tie_weight: float | None = None,
        max_kl: float = 0.0,
        mode_choice: str | None = None,
    ):
        self.worker = worker
        # loop.max_kl: a policy whose own rollouts pass it is never served on (:meth:`step`)
        self.max_kl = max_kl
        self.within_bound: tuple[dict, dict] | None = None  # the newest policy whose rollouts kept it
        self.served_kl: float | None = None  # the KL of the served policy's newest rollouts within it
        # Settings left out are the config's own defaults (never a second default here);
        # the app's entry points pass them all through from_config.
        loop_default, reward_default = LoopConfig(), RewardConfig()
        if demonstration_weight is None:
            demonstration_weight = loop_default.demonstration_weight
        self.demonstration_weight = demonstration_weight
        # reward.tie_weight: ties count in a contributor's influence, as in reward rounds
        self.tie_weight = reward_default.tie_weight if tie_weight is None else tie_weight
        # loop.mode_choice: whose votes pick a guided row's mode (:meth:`guided_openings`)
        self.mode_choice = loop_default.mode_choice if mode_choice is None else mode_choice
        self.guard_cfg = guard_cfg or GuardConfig()
        self.sessions = sessions
        self.cfg = cfg
        self.sampling = sampling or SamplingConfig()
        self.checkpoint_dir = checkpoint_dir
        self.score_fn = score_fn or reward_model_scores
        self.kl_ctl = (
            pm.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.adaptive_kl
            else pm.FixedKLController(cfg.kl_coef)
        )
        self.normalizer = ScoreNormalizer()
        self.optimizer: torch.optim.Optimizer | None = None
        self.reference_tax: SideTax | None = None  # the starting model's side of the tax, measured once
        if cfg.ptx_from not in ("modes", "all"):
            raise ValueError(f"ppo.ptx_from {cfg.ptx_from!r}: expected 'modes' or 'all'")
        self.rng = random.Random(0)
        # Work a step need not do twice (bench/ppo_step.py --reuse-baseline turns
        # both off, as its same-run baseline): the frozen layers' output kept
        # while sampling (rollout's keep_prefix), and with one minibatch of every
        # row the first update's forward as the policy's scoring pass.
        self.keep_prefix = True
        self.reuse_first_forward = True

    @classmethod
    def from_config(cls, worker, sessions, cfg: AppConfig, score_fn: ScoreFn | None = None) -> PPOTrainer:
        """A trainer with every setting taken from ``cfg``: PPO's, the checkpoint folder,
        the sampling scheme people vote on, ``loop.demonstration_weight``, the guards and
        ``reward.tie_weight``. The one way the live loop, the simulation and the command
        line build one, so that a ``--set`` reaches each alike."""
        return cls(
            worker, sessions, cfg.ppo, cfg.store.checkpoint_dir, score_fn=score_fn, sampling=cfg.sampling,
            demonstration_weight=cfg.loop.demonstration_weight, guard_cfg=cfg.guards, tie_weight=cfg.reward.tie_weight,
            max_kl=cfg.loop.max_kl, mode_choice=cfg.loop.mode_choice,
        )

    def _call(self, fn):
        return self.worker.call(PPO_PRIORITY, fn)

    def supervised_examples(self) -> list[SupervisedExample]:
        """What PPO-ptx's language-model term learns from: the newest chosen answers
        (of votes between two modes, or of every vote: ``PPOConfig.ptx_from``), and
        the answers people wrote themselves, each weighing ``demonstration_weight``,
        all as the guards weigh them (learning/guards.py)."""
        if self.cfg.ptx_coef <= 0:
            return []
        cfg = self.cfg
        with self.sessions() as session:
            trust = assess_feedback(session, self.guard_cfg, self.demonstration_weight, self.tie_weight)
            chosen = chosen_answers(session, cfg.ptx_examples, only_mode_pairs=cfg.ptx_from == "modes", trust=trust)
            return chosen + demonstrated_answers(session, cfg.ptx_examples, self.demonstration_weight, trust)

    def guided_openings(self, contexts: list[list[dict]]) -> list[str]:
        """Each rollout row's opening ("" for a plain row): ``PPOConfig.guided_fraction``
        of them open as the mode people have been choosing on questions like the row's
        (``modes.guided_openings``, the votes as ``loop.mode_choice`` reads them)."""
        if self.cfg.guided_fraction <= 0:
            return [PLAIN] * len(contexts)
        with self.sessions() as session:
            modes = active_modes(session, answer_first=False)
            kinds = [question_kind(prompt_text(context)) for context in contexts]
            one_prompt_of = {kind: prompt_text(c) for kind, c in zip(kinds, contexts)}  # a kind's record is one
            records = {kind: mode_record_for(session, self.mode_choice, p) for kind, p in one_prompt_of.items()}
        return guided_openings(modes, self.cfg.guided_fraction, self.rng, [records[kind] for kind in kinds])

    def step(self, contexts: list[list[dict]]) -> StepResult:
        """One PPO step on a batch of contexts, phase by phase (the module docstring)."""
        start = time.perf_counter()
        if self.optimizer is None:
            self.optimizer = self._call(lambda m: make_optimizer(m, self.cfg))
        seed = self.rng.randrange(2**31)
        openings = self.guided_openings(contexts)
        # 1) rollout on the serving copy
        batch = self._call(lambda m: rollout(m, contexts, self.cfg, self.sampling, seed, openings, self.keep_prefix))
        times = {"start": start, "rollout": time.perf_counter()}
        # 2-3) scores, KL-penalised rewards, advantages
        kl_coef = self.kl_ctl.value
        batch = self._score(batch, kl_coef, len(contexts))
        times["score"] = time.perf_counter()
        # 4) epochs x minibatches, one worker job each (the policy as it was, should one fail)
        examples = self.supervised_examples()
        saved = self._call(lambda m: snapshot(m, self.optimizer))
        stats, finite = self._update_or_restore(batch, len(contexts), examples, saved)
        times["update"] = time.perf_counter()
        # 5) publish, or restore the adapter as it was; or, where the served policy's own
        # rollouts passed loop.max_kl (known once the first update's forward scored them),
        # serve the newest policy whose rollouts kept it instead of going on from here
        guided = [bool(o) for o in openings]
        mean_kl = batch.kl.sum(-1)[plain_rows(guided)].mean().item()
        if self.max_kl > 0 and mean_kl > self.max_kl and self.within_bound is not None:
            # published, so recorded as a step: its KL is what stops the next one (the loop's budget)
            version, finite = self._serve_within_bound(mean_kl), True
        else:
            self.within_bound, self.served_kl = saved, mean_kl  # this policy's rollouts kept the bound
            version = self._publish_or_restore(finite, saved, mean_kl, len(contexts))
        # 6) record
        result = step_result(batch, stats, examples, guided, version, finite, self.normalizer.reward_version, times)
        self._record(result)
        return result

    def _score(self, batch: Rollout, kl_coef: float, n: int) -> Rollout:
        """Phases 2-3 as one worker job. With one minibatch of every row, the first
        update's forward is the policy's scoring pass (``score_rollout``'s ``policy_pass``)."""
        cfg = self.cfg
        pass_now = cfg.minibatch_size < n or cfg.epochs < 1 or not self.reuse_first_forward
        return self._call(lambda m: score_rollout(m, batch, cfg, kl_coef, self.score_fn, self.normalizer, pass_now))

    def _update_or_restore(
        self, batch: Rollout, n: int, examples: list[SupervisedExample], saved: tuple[dict, dict]
    ) -> tuple[list[dict], bool]:
        """Phase 4 (:meth:`_update`); a crash mid-update (out of memory) restores ``saved``
        and re-raises: the step never happened. A batch no update filled gets its policy
        terms from a scoring pass of their own (a non-finite minibatch fills them)."""
        try:
            stats, finite = self._update(batch, n, examples)
        except BaseException:
            self._call(lambda m: restore(m, self.optimizer, saved))
            raise
        if batch.logprobs is None:
            self._call(lambda m: score_policy(m, batch, self.cfg))
        return stats, finite

    def _publish_or_restore(self, finite: bool, saved: tuple[dict, dict], mean_kl: float, n: int) -> int:
        """Phase 5: after a finite update, save a checkpoint version first (none is served
        without its checkpoint on disk and in the database), then publish and move the KL
        controller; else restore the adapter as it was. Returns the version served."""
        if not finite:
            log.warning("PPO step skipped: non-finite loss or gradient; adapter restored")
            self._call(lambda m: restore(m, self.optimizer, saved))
            return self.worker.serving_version
        upcoming = self.worker.serving_version + 1
        if upcoming % self.cfg.checkpoint_every == 0:
            try:
                self.save(upcoming)
            except BaseException:  # a full disk: the step never happened, retry later
                self._call(lambda m: restore(m, self.optimizer, saved))
                raise
        version = self._call(publish)
        self.kl_ctl.update(mean_kl, n)
        if upcoming % self.cfg.checkpoint_every == 0:
            try:
                self.record_tax(version)
            except Exception:  # a measurement, not the step: the step stands and is recorded
                log.exception("could not measure the alignment tax of policy v%d", version)
        return version

    def record_tax(self, version: int) -> SideTax | None:
        """Measure the alignment tax of the policy just published as ``version`` and store
        it with its checkpoint (``extra["tax"]``, ``extra["tax_reference"]``): facts kept on
        ``tax_questions`` factual questions, NLL of the well-formed answers, content
        (learning/tax.py). The reference's side is measured once and kept. Returns the
        policy's figures (None when ``ppo.tax_questions`` is 0)."""
        if self.cfg.tax_questions <= 0:
            return None
        sampling = Sampling.from_config(self.sampling, TAX_SEED)
        key, answers, count = shipped_fact_key(), load_reference_answers(), self.cfg.tax_questions
        reference = self.reference_tax
        tax = self._call(lambda m: measure_tax(m, key, answers, sampling, count, 1, TAX_SEED, reference=reference))
        self.reference_tax = tax.reference

        def write() -> None:
            with self.sessions() as session, session.begin():
                store.add_checkpoint_facts(session, "policy", version, tax=asdict(tax.policy),
                                           tax_reference=asdict(tax.reference), tax_questions=tax.fact_questions)

        store.with_retry(write)
        return tax.policy

    def _serve_within_bound(self, mean_kl: float) -> int:
        """Put back the newest policy whose own rollouts kept ``max_kl`` and serve it as a
        new version, checkpointed first (a restart serves it too); returns the version.

        The live loop's bound refuses the next step once a step's KL passes it, but one
        update can overshoot: without this the policy people meet, and the one a
        simulation reports, would sit past the bound (31 nats seen against 12)."""
        log.warning("rollouts at KL %.1f > %g nats: serving the last policy within the bound", mean_kl, self.max_kl)
        # this step's update is dropped with the policy it started from
        saved = self.within_bound
        self._call(lambda m: restore(m, self.optimizer, saved))
        self.save(self.worker.serving_version + 1)
        return self._call(publish)

    def reference_examples(self) -> list[SupervisedExample]:
        """PPO-ptx's anchor: the starting model's newest own answers (``ptx_examples`` of
        them; none when ``ptx_reference_coef`` is 0)."""
        if self.cfg.ptx_reference_coef <= 0:
            return []
        with self.sessions() as session:
            return reference_answers(session, self.cfg.ptx_examples)

    def _update(self, batch: Rollout, n: int, examples: list[SupervisedExample]) -> tuple[list[dict], bool]:
        """Epochs x minibatches, one worker job each; stops at the first non-finite one.
        Each minibatch's LM terms (PPO-ptx) draw ``ptx_batch`` chosen answers and
        ``ptx_batch`` of the starting model's own."""
        cfg, stats = self.cfg, []
        anchors = self.reference_examples()
        for _ in range(cfg.epochs):
            order = list(range(n))
            self.rng.shuffle(order)
            for i in range(0, n, cfg.minibatch_size):
                rows = order[i : i + cfg.minibatch_size]
                ptx = self.rng.sample(examples, min(len(examples), cfg.ptx_batch)) if examples else None
                anchor = self.rng.sample(anchors, min(len(anchors), cfg.ptx_batch)) if anchors else None
                s = self._call(lambda m, r=rows, x=ptx, a=anchor: minibatch_update(m, self.optimizer, batch, r, cfg, x, a))
                stats.append(s)
                if not s["finite"]:
                    return stats, False
        return stats, True

    def _record(self, result: StepResult) -> None:
        """Store the step's row (:meth:`StepResult.row`) in the ``ppo_steps`` table."""
        row = result.row()

        def write() -> None:
            with self.sessions() as session, session.begin():
                store.add_ppo_step(session, **row)

        store.with_retry(write)

    def save(self, version: int) -> str:
        """Save the training copy's policy adapter and value head as checkpoint ``version``
        (folder first, then the database row that names it)."""
        tensors, base = self._call(lambda m: ({k: v.detach().clone() for k, v in policy_tensors(m).items()}, m.base))
        meta = {
            "version": version,
            "kl_coef": self.kl_ctl.value,
            "score_normalizer": self.normalizer.to_dict(),
            "base": base,
        }
        return str(publish_checkpoint(self.sessions, self.checkpoint_dir, "policy", version, tensors, meta))

    def sample_contexts(self, contexts: list[list[dict]]) -> list[list[dict]]:
        """A batch of prompts drawn from what people typed (with replacement when few)."""
        if len(contexts) >= self.cfg.batch_size:
            return self.rng.sample(contexts, self.cfg.batch_size)
        return [self.rng.choice(contexts) for _ in range(self.cfg.batch_size)]


def load_policy(models: Models, path: str, sha256: str | None = None) -> int:
    """Load a saved policy checkpoint (checked against its published ``sha256``
    when given) into the models and return its version (:func:`install_policy`)."""
    return install_policy(models, *load_verified(path, sha256), path)


def install_policy(models: Models, tensors: dict[str, torch.Tensor], meta: dict, path: str) -> int:
    """Put a policy checkpoint's tensors into the models (in the worker, as one job)
    and return its version.

    With a training copy, the adapter and value head go there and the adapter is
    published to the serving copy; a serve replica has only the serving copy, and
    the adapter goes straight into it. Every name is checked before anything is
    copied, so a checkpoint that does not fit changes nothing.
    """
    check_base(meta, models.base, path)
    if models.trainer is None:
        copy_into({f"lora.{k}": v for k, v in adapter_state(models.serving, POLICY).items()}, tensors)
    else:
        copy_into(policy_tensors(models), tensors)
        sync_policy_weights(models.trainer, models.serving)
    models.serving_version = int(meta["version"])
    return models.serving_version
