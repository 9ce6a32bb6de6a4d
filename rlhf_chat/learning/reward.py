"""Reward model: a ``reward`` LoRA adapter plus a scalar head, trained on the votes.

The head reads the last token's state beside the mean state over the answer
(:func:`rlhf_chat.model.heads.answer_summary`).

The loss is Bradley-Terry, -log σ(r_chosen - r_rejected - margin) (InstructGPT,
Ouyang et al. 2022, eq. 1), with a margin that grows with the stated strength
and TRL's optional centering term; a tie asks the two scores to be equal
(``reward.tie_weight``, preferences.tie_pairs). Training runs in rounds: each round trains
on every usable vote (new ones included) for a few epochs, from a new adapter
while that fits in a bounded number of steps and from the last one beyond,
measures accuracy on held-out votes, and saves a versioned checkpoint. Every
step is one job on the model worker, so a person waiting for an answer waits
at most one step.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from rlhf_chat.config import AppConfig, GuardConfig, LoopConfig, RewardConfig
from rlhf_chat.generation.worker import REWARD as REWARD_PRIORITY
from rlhf_chat.generation.worker import yield_point
from rlhf_chat.learning import guards
from rlhf_chat.learning.checkpoints import (
    check_base,
    copy_into,
    load_verified,
    module_state,
    publish_checkpoint,
)
from rlhf_chat.learning.ppo_math import bradley_terry_loss
from rlhf_chat.learning.preferences import (
    PreferencePair,
    demonstration_pairs,
    margin_for,
    preference_pairs,
    split_pairs,
    tie_pairs,
)
from rlhf_chat.model.heads import Prefix, PrefixCache, answer_summary, frozen_prefix, top_hidden
from rlhf_chat.model.loading import REWARD, Models, adapter_state
from rlhf_chat.model.tensors import left_pad
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import RewardRound
from rlhf_chat.text.chat import render_prompt, render_response

log = logging.getLogger(__name__)


# --- scoring -------------------------------------------------------------------------------


class Encoded(NamedTuple):
    """A (context, answer) as token ids, and how many of the last ids are the answer."""

    ids: list[int]
    answer_len: int  # the answer's tokens, its EOS included


def encode(tokenizer, context: list[dict], response: str, max_length: int, finished: bool = True) -> Encoded:
    """Token ids of (context, answer) as the chat template writes them, the answer
    ending with EOS only if it ``finished`` (see :func:`chat.render_response`).

    Cut from the left when too long: the score is read at the end of the
    answer, so the end is what must survive.
    """
    answer = render_response(tokenizer, response, finished)
    ids = (render_prompt(tokenizer, context) + answer)[-max_length:]
    return Encoded(ids, min(len(answer), len(ids)))


def answer_mask(answer_lens: list[int], width: int, device) -> torch.Tensor:
    """(B, width) mask of the answer tokens of left-padded sequences: the last ``answer_len`` columns.

    >>> answer_mask([2, 1], 4, "cpu").tolist()
    [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    """
    columns = torch.arange(width, device=device)  # pragma: no mutate (devices: the tests run on the CPU)
    starts = width - torch.tensor(answer_lens, device=device)  # pragma: no mutate (as above)
    return (columns >= starts.unsqueeze(1)).float()


def score_prefix(models: Models, prefix: Prefix, answers: torch.Tensor) -> torch.Tensor:
    """Reward scores (B,) of the sequences in a prefix whose answer tokens are
    ``answers`` (B, T); differentiable when grad is enabled."""
    models.trainer.set_adapter(REWARD)
    hidden = top_hidden(models.trainer, prefix)  # (B, T, H)
    scores = models.reward_head(answer_summary(hidden, prefix.mask, answers))  # (B, 1)
    return scores.squeeze(-1).float()  # pragma: no mutate (-1 and 1 are one axis of a (B, 1) tensor)


def score_sequences(models: Models, sequences: list[Encoded], cache: PrefixCache | None = None) -> torch.Tensor:
    """Reward scores (B,) of encoded sequences; differentiable when grad is enabled."""
    ids = [s.ids for s in sequences]
    if cache is not None:
        prefix = cache.prefix(models, ids)
    else:
        padded, mask = left_pad(ids, models.tokenizer.pad_token_id, models.device)
        prefix = frozen_prefix(models.trainer, padded, mask)
    answers = answer_mask([s.answer_len for s in sequences], prefix.mask.shape[1], models.device)
    return score_prefix(models, prefix, answers)


@torch.no_grad()
def score_texts(
    models: Models,
    contexts: list[list[dict]],
    responses: list[str],
    max_length: int,
    batch_size: int = 16,
    finished: list[bool] | None = None,
) -> torch.Tensor:
    """Raw reward scores (B,) of answers to contexts (finished answers unless ``finished`` says)."""
    finished = finished if finished is not None else [True] * len(responses)
    sequences = [encode(models.tokenizer, c, r, max_length, f) for c, r, f in zip(contexts, responses, finished)]
    chunks = [score_sequences(models, sequences[i : i + batch_size]) for i in range(0, len(sequences), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0)


# --- training ------------------------------------------------------------------------------


def reward_parameters(models: Models) -> list[torch.nn.Parameter]:
    """What the reward model trains: its LoRA adapter and its head."""
    return [*adapter_state(models.trainer, REWARD).values(), *models.reward_head.parameters()]


def reward_tensors(models: Models) -> dict[str, torch.Tensor]:
    """Everything a reward checkpoint holds, keyed by name."""
    lora = {f"lora.{k}": v for k, v in adapter_state(models.trainer, REWARD).items()}
    return {**lora, **module_state("head.", models.reward_head)}


def pair_margins(pairs: list[PreferencePair], cfg: RewardConfig, device: torch.device) -> torch.Tensor:
    """Per-pair Bradley-Terry margins (B,) from the stated strengths."""
    values = [margin_for(p.strength, cfg.margin_slightly, cfg.margin_clearly) for p in pairs]
    return torch.tensor(values, dtype=torch.float32, device=device)  # pragma: no mutate (float32 is the default)


def pair_weights(pairs: list[PreferencePair], device: torch.device) -> torch.Tensor | None:
    """Per-pair loss weights (B,), or None when every pair weighs one vote (the plain mean)."""
    if all(p.weight == 1.0 for p in pairs):
        return None
    return torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=device)  # pragma: no mutate (default dtype)


def pair_targets(pairs: list[PreferencePair], device: torch.device) -> torch.Tensor | None:
    """Per-pair targets (B,): 1 for a vote, 1/2 for a tie; None when every pair is a vote."""
    if all(p.target == 1.0 for p in pairs):
        return None
    return torch.tensor([p.target for p in pairs], dtype=torch.float32, device=device)  # pragma: no mutate (default dtype)


def pair_sequences(tok, pairs: list[PreferencePair], cfg: RewardConfig) -> list[Encoded]:
    """The 2B encoded sequences of the pairs: every chosen answer, then every rejected one."""
    chosen = [encode(tok, p.context, p.chosen, cfg.max_length, p.chosen_finished) for p in pairs]
    rejected = [encode(tok, p.context, p.rejected, cfg.max_length, p.rejected_finished) for p in pairs]
    return chosen + rejected


def pair_scores(
    models: Models, pairs: list[PreferencePair], cfg: RewardConfig, cache: PrefixCache | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores, both (B,), from one forward over the 2B sequences."""
    scores = score_sequences(models, pair_sequences(models.tokenizer, pairs, cfg), cache)
    return scores[: len(pairs)], scores[len(pairs) :]


def token_chunks(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of sequences grouped so that each group, left-padded to its longest,
    holds at most ``max_tokens`` tokens (one sequence at least); longest first, so
    that sequences of like length share a group. ``max_tokens`` 0: one group.

    >>> token_chunks([100, 500, 120, 480], 1000)
    [[1, 3], [2, 0]]
    >>> token_chunks([100, 500], 0)
    [[0, 1]]
    """
    if max_tokens <= 0:
        return [list(range(len(lengths)))]
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        # the group's longest is its first: a new member pads to that length
        if chunks and lengths[chunks[-1][0]] * (len(chunks[-1]) + 1) <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def backward_through_scores(
    models: Models, sequences: list[Encoded], score_grads: torch.Tensor, max_tokens: int, cache: PrefixCache | None
) -> None:
    """Accumulate ``sum_i score_grads[i] * d score_i / d weights`` a chunk of sequences
    at a time (:func:`token_chunks`): the gradient a backward pass of the whole
    batch would give (the chain rule through the scores), holding one chunk's
    activations instead of the whole batch's."""
    for chunk in token_chunks([len(s.ids) for s in sequences], max_tokens):
        scores = score_sequences(models, [sequences[i] for i in chunk], cache)
        scores.backward(score_grads[chunk])


def train_step(
    models: Models,
    optimizer: torch.optim.Optimizer,
    pairs: list[PreferencePair],
    cfg: RewardConfig,
    cache: PrefixCache | None = None,
) -> dict:
    """One minibatch of Bradley-Terry training. A non-finite loss, or a finite loss
    with a non-finite gradient, is skipped: no optimizer step, the weights as they were."""
    models.trainer.train()  # never eval: see loading.py  # pragma: no mutate (dropout 0: train() changes nothing)
    sequences = pair_sequences(models.tokenizer, pairs, cfg)
    chunked = len(token_chunks([len(s.ids) for s in sequences], cfg.max_batch_tokens)) > 1
    # A batch too long for one backward pass (reward.max_batch_tokens) is scored once
    # without gradients, and its loss's gradient with respect to the scores is then
    # carried back a chunk at a time.
    with torch.no_grad() if chunked else nullcontext():
        scores = score_sequences(models, sequences, cache)
    if chunked:
        scores.requires_grad_(True)  # a leaf: loss.backward() stops at the scores
    margins, weights = pair_margins(pairs, cfg, models.device), pair_weights(pairs, models.device)
    targets = pair_targets(pairs, models.device)
    n = len(pairs)
    loss, stats = bradley_terry_loss(scores[:n], scores[n:], margins, cfg.center_coef, weights, targets)
    # Each of the three zero_grad calls is a safeguard for the others (no mutant of one changes a step).
    optimizer.zero_grad(set_to_none=True)  # pragma: no mutate
    if not torch.isfinite(loss):
        return {**stats, "skipped": True}
    loss.backward()  # chunked: as far as the scores only
    if chunked:
        backward_through_scores(models, sequences, scores.grad, cfg.max_batch_tokens, cache)
    grad_norm = torch.nn.utils.clip_grad_norm_(reward_parameters(models), 1.0)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)  # pragma: no mutate
        return {**stats, "skipped": True}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # pragma: no mutate
    return {**stats, "skipped": False}


@torch.no_grad()
def evaluate(models: Models, pairs: list[PreferencePair], cfg: RewardConfig, cache: PrefixCache | None = None) -> dict:
    """Loss, accuracy and mean margin over pairs (no training; accuracy and margin
    over the votes, not the ties), plus every score seen."""
    if not pairs:
        return {"loss": float("nan"), "accuracy": None, "mean_margin": 0.0, "scores": []}
    chosen, rejected = [], []
    for i in range(0, len(pairs), cfg.batch_size):
        c, r = pair_scores(models, pairs[i : i + cfg.batch_size], cfg, cache)
        chosen.append(c)
        rejected.append(r)
        yield_point()  # a person waits one batch, not the whole evaluation (256 votes: a minute under load)
    c, r = torch.cat(chosen), torch.cat(rejected)
    device = models.device
    _, stats = bradley_terry_loss(c, r, pair_margins(pairs, cfg, device), cfg.center_coef, None, pair_targets(pairs, device))
    return {**stats, "scores": torch.cat([c, r]).tolist()}


def full_fit_steps(n_train: int, cfg: RewardConfig) -> int:
    """Steps for ``max_epochs_per_round`` epochs over ``n_train`` votes."""
    return max(1, math.ceil(cfg.max_epochs_per_round * n_train / cfg.batch_size))


def round_steps(n_train: int, cfg: RewardConfig) -> int:
    """Steps in a round: bounded by ``steps_per_round`` and by ``max_epochs_per_round``."""
    return min(cfg.steps_per_round, full_fit_steps(n_train, cfg))


def starts_fresh(n_train: int, cfg: RewardConfig) -> bool:
    """Whether a round fits a new adapter instead of continuing the last one.

    Fresh while a full fit fits in one round: continuing shows the oldest votes
    again every round (in a 4-round simulation ~17 times each), and the model
    overfits them. Once the votes outgrow a round, each round continues, and
    sees each vote fewer times the more there are.
    """
    return cfg.fresh_each_round and full_fit_steps(n_train, cfg) <= cfg.steps_per_round


def reset_reward_model(models: Models, seed: int) -> None:
    """A new reward adapter and head, initialised as peft and :func:`make_scalar_head`
    do (LoRA A as ``nn.Linear``'s default, B and the head at zero), from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in models.trainer.modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and REWARD in lora_a:
                weight = lora_a[REWARD].weight
                fresh = torch.nn.init.kaiming_uniform_(torch.empty(weight.shape), a=math.sqrt(5), generator=generator)
                weight.copy_(fresh)
                module.lora_B[REWARD].weight.zero_()
        models.reward_head.weight.zero_()
        models.reward_head.bias.zero_()


def minibatches(pairs: list[PreferencePair], batch_size: int, steps: int, seed: int) -> list[list[PreferencePair]]:
    """``steps`` minibatches drawn epoch by epoch in a shuffled order."""
    rng = random.Random(seed)
    order: list[PreferencePair] = []
    while len(order) < steps * batch_size:  # pragma: no mutate (<= adds an epoch nobody reads)
        epoch = list(pairs)
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


@dataclass
class RoundResult:
    """What one reward round did; also stored in the ``reward_rounds`` table."""

    version: int
    loss: float
    heldout_accuracy: float | None
    mean_margin: float
    train_pairs: int
    heldout_pairs: int
    votes: int
    seconds: float
    checkpoint: str = ""
    train_accuracy: float | None = None

    def row(self) -> dict:
        """The ``reward_rounds`` row of this round (:func:`stored_fields`)."""
        return stored_fields(self, RewardRound)

    def accuracy_text(self) -> str:
        """The held-out accuracy for a status line, or why there is none yet.

        >>> RoundResult(1, 0.5, None, 0.0, 8, 0, 8, 1.0).accuracy_text()
        'n/a (needs 1 held-out vote; 0 so far)'
        """
        if self.heldout_accuracy is None:
            return f"n/a (needs 1 held-out vote; {self.heldout_pairs} so far)"
        return f"{self.heldout_accuracy:.2f} on {self.heldout_pairs} held-out votes"


def stored_fields(result, table) -> dict:
    """The fields of a result dataclass that ``table`` has columns for, a NaN stored as 0.

    One helper for a PPO step's row and a reward round's: a field added to a
    result and to its table is stored without a second list of names to update.
    A NaN becomes 0 because the columns are NOT NULL and SQLite stores a NaN as NULL.
    """
    columns = set(table.__table__.columns.keys())
    values = {f.name: getattr(result, f.name) for f in fields(result) if f.name in columns}
    return {k: (0.0 if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


@torch.no_grad()
def agreement_of(models: Models, pairs: list[PreferencePair], cfg: RewardConfig) -> dict[int, bool]:
    """Per comparison id, whether the reward model scores the chosen answer above the rejected one."""
    agrees = {}
    for i in range(0, len(pairs), cfg.batch_size):
        batch = pairs[i : i + cfg.batch_size]
        chosen, rejected = pair_scores(models, batch, cfg, models.prefix_cache)
        agrees.update({p.comparison_id: bool(c > r) for p, c, r in zip(batch, chosen.tolist(), rejected.tolist())})
        yield_point()  # as in evaluate
    return agrees


def score_unseen_votes(worker, sessions, cfg: RewardConfig) -> int:
    """Score, with the reward model being served, the votes no reward round has
    trained on yet, and store whether it agrees with each (``Comparison.rm_agrees``):
    out-of-sample evidence of who votes as the rest do (learning/guards.py).
    Returns how many were scored (0 before the first reward model)."""
    with sessions() as session:
        previous = store.latest_checkpoint(session, "reward")
        through = (previous.extra or {}).get("trained_through") if previous is not None else None
        if through is None:  # no reward model, or one from before the guards: nothing is known unseen
            return 0
        unseen = [c for c in store.voted_comparisons(session, after_id=int(through)) if c.rm_agrees is None]
        pairs = preference_pairs(unseen)
    if not pairs or worker.call(REWARD_PRIORITY, lambda m: m.reward_version) != previous.version:
        return 0
    agrees = worker.call(REWARD_PRIORITY, lambda m: agreement_of(m, pairs, cfg))
    store.with_retry(lambda: _store_agreement(sessions, agrees))
    return len(agrees)


def _store_agreement(sessions, agrees: dict[int, bool]) -> None:
    with sessions() as session, session.begin():
        store.set_rm_agreement(session, agrees)


def guarded_pairs(
    session, guard_cfg: GuardConfig, demonstration_weight: float, tie_weight: float = 0.0
) -> tuple[list[PreferencePair], int]:
    """Every vote's pair, every tie's (weighing ``tie_weight``) and every written
    answer's two pairs, weighted by the guards (learning/guards.py); pairs that
    weigh nothing are left out. Also returns how many comparisons the round's
    feedback reaches (its ``trained_through`` mark)."""
    trust = guards.assess_feedback(session, guard_cfg, demonstration_weight, tie_weight)
    comparisons = store.voted_comparisons(session)
    pairs = []
    for pair in preference_pairs(comparisons) + tie_pairs(comparisons, tie_weight):
        pair.weight *= trust.vote_weight(pair.comparison_id)
        pairs.append(pair)
    written = [d for d in store.demonstrations(session) if d.id not in trust.held_back]
    for pair in demonstration_pairs(written, demonstration_weight):
        pair.weight *= trust.written_weight(pair.comparison_id)
        pairs.append(pair)
    through = max((c.id for c in comparisons), default=0)
    return [p for p in pairs if p.weight > 0], through


def usable_feedback(session, tie_weight: float = 0.0) -> int:
    """How much a reward round learns from: A/B votes and written answers, and ties
    when they weigh something in the loss (``reward.tie_weight``). The live loop
    trains a new reward model every ``loop.reward_every_votes`` of these."""
    choices = ("a", "b", "tie") if tie_weight > 0 else ("a", "b")
    return store.count_votes(session, choices) + store.count_demonstrations(session)


def reward_round_from_config(
    worker, sessions, cfg: AppConfig, seed: int = 0, score_unseen: bool = True
) -> RoundResult | None:
    """One reward round with every setting taken from ``cfg``: the reward settings,
    the checkpoint folder, ``loop.demonstration_weight`` and the guards.

    The one way the live loop, the simulation and the command line run a round,
    so that a ``--set`` reaches each alike (a setting left to :func:`run_round`'s
    defaults would silently do nothing on one of them). ``score_unseen``: as in
    :func:`run_round`; a caller with other settings passes
    ``dataclasses.replace(cfg, reward=...)``.
    """
    return run_round(
        worker, sessions, cfg.reward, cfg.store.checkpoint_dir, seed=seed,
        demonstration_weight=cfg.loop.demonstration_weight, guard_cfg=cfg.guards, score_unseen=score_unseen,
    )


def run_round(
    worker,
    sessions,
    cfg: RewardConfig,
    checkpoint_dir: str,
    seed: int = 0,
    demonstration_weight: float | None = None,
    guard_cfg: GuardConfig | None = None,
    score_unseen: bool = True,
) -> RoundResult | None:
    """Train one reward round on every usable vote and every written answer (each
    over both answers it was written beside, weighing ``demonstration_weight``),
    as the guards weigh them (``guard_cfg``); None when there are too few. Settings
    left out are the config's defaults; a caller holding an ``AppConfig`` uses
    :func:`reward_round_from_config`.

    First the reward model being served scores the votes no round has trained on
    (:func:`score_unseen_votes`), which is how the guards see who disagrees;
    ``score_unseen`` False skips that (an admin's retraining from a reset adapter,
    which must not score anything).
    Each step is a worker job at reward priority, so chat requests cut in
    between steps. The new adapter is only named in the database once its
    checkpoint is completely on disk.
    """
    start = time.perf_counter()
    guard_cfg = guard_cfg or GuardConfig()
    weight = LoopConfig().demonstration_weight if demonstration_weight is None else demonstration_weight
    if score_unseen:
        score_unseen_votes(worker, sessions, cfg)
    # 1) votes -> weighted pairs -> (train, held-out)
    pairs = round_pairs(sessions, cfg, guard_cfg, weight)
    if pairs is None:
        return None
    # 2) fit; 3) measure on held-out votes and on the fit
    loss = fit_round(worker, pairs.train, cfg, seed + pairs.version, pairs.version)
    held, fit = measure_round(worker, pairs, cfg)
    tensors, base = worker.call(REWARD_PRIORITY, trained_tensors)
    result = RoundResult(
        version=pairs.version,
        loss=loss,
        heldout_accuracy=held["accuracy"],
        mean_margin=fit["mean_margin"],
        train_pairs=len(pairs.train),
        heldout_pairs=len(pairs.heldout),
        votes=pairs.feedback,  # the feedback TrainingLoop counts (usable_feedback), guarded or not
        seconds=time.perf_counter() - start,
        train_accuracy=fit["accuracy"],
    )
    # 4) checkpoint (atomic), then name it in the database, then serve it
    meta = {"version": result.version, "train_pairs": len(pairs.train), "base": base,
            "trained_through": pairs.trained_through}
    publish_round(worker, sessions, checkpoint_dir, result, tensors, meta)
    return result


@dataclass
class RoundPairs:
    """What a reward round trains and measures on."""

    train: list[PreferencePair]
    heldout: list[PreferencePair]  # votes only: held-out accuracy is on votes, as without ties
    trained_through: int  # the newest comparison the round's feedback reaches
    feedback: int  # usable_feedback when the round began
    version: int  # the version the round will publish


def round_pairs(sessions, cfg: RewardConfig, guard_cfg: GuardConfig, demonstration_weight: float) -> RoundPairs | None:
    """The round's weighted pairs split into (train, held-out), stable by comparison id;
    None when fewer than ``min_pairs`` training votes rank anything (ties alone cannot)."""
    with sessions() as session:
        pairs, trained_through = guarded_pairs(session, guard_cfg, demonstration_weight, cfg.tie_weight)
        feedback = usable_feedback(session, cfg.tie_weight)
        previous = store.latest_checkpoint(session, "reward")
    train, heldout = split_pairs(pairs, cfg.heldout_fraction)
    heldout = [p for p in heldout if p.target == 1.0]
    if sum(p.target == 1.0 for p in train) < cfg.min_pairs:
        return None
    return RoundPairs(train, heldout, trained_through, feedback, (previous.version if previous else 0) + 1)


def fit_round(worker, train: list[PreferencePair], cfg: RewardConfig, seed: int, version: int) -> float:
    """Train the round's steps on ``train`` (a new adapter while a full fit fits in the
    round, else the last one; a fresh optimizer either way); returns the mean loss of
    the last ten steps. A non-finite loss raises: nothing is saved, and a fresh round
    starts clean next time."""

    def make_optimizer(models: Models) -> torch.optim.Optimizer:
        if starts_fresh(len(train), cfg):
            reset_reward_model(models, seed)
        return torch.optim.AdamW(reward_parameters(models), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    optimizer = worker.call(REWARD_PRIORITY, make_optimizer)
    losses = []
    for batch in minibatches(train, cfg.batch_size, round_steps(len(train), cfg), seed):
        # the worker's prefix cache: a vote's frozen layers run once, not once a round
        stats = worker.call(REWARD_PRIORITY, lambda m, b=batch: train_step(m, optimizer, b, cfg, m.prefix_cache))
        losses.append(stats["loss"])
    loss = float(sum(losses[-10:]) / len(losses[-10:]))
    if not math.isfinite(loss):
        raise FloatingPointError(f"reward round {version}: the loss was not finite, nothing was saved")
    return loss


def measure_round(worker, pairs: RoundPairs, cfg: RewardConfig) -> tuple[dict, dict]:
    """(held-out, fit): :func:`evaluate` on the held-out votes and on (some of) the
    training votes. The fit is read on votes: a tie has no right side. PPO normalises
    scores by running statistics of its own rollouts' scores (ppo.ScoreNormalizer),
    not of these in-sample training answers."""
    held = worker.call(REWARD_PRIORITY, lambda m: evaluate(m, pairs.heldout, cfg, m.prefix_cache))
    voted = [p for p in pairs.train if p.target == 1.0]
    fit = worker.call(REWARD_PRIORITY, lambda m: evaluate(m, voted[:256], cfg, m.prefix_cache))
    return held, fit


def trained_tensors(models: Models) -> tuple[dict[str, torch.Tensor], dict]:
    """Copies of the reward model's tensors (:func:`reward_tensors`) and the base they fit."""
    return {k: v.detach().clone() for k, v in reward_tensors(models).items()}, models.base


def publish_round(worker, sessions, checkpoint_dir: str, result: RoundResult, tensors: dict, meta: dict) -> None:
    """Save the trained tensors as checkpoint ``result.version`` (atomic), name it and the
    round's row in the database, then serve it; sets ``result.checkpoint``."""

    def record_round(session) -> None:
        store.add_reward_round(session, **result.row())

    path = publish_checkpoint(sessions, checkpoint_dir, "reward", result.version, tensors, meta, record_round)
    result.checkpoint = str(path)
    worker.call(REWARD_PRIORITY, lambda m: set_reward_version(m, result.version))


# --- restoring -----------------------------------------------------------------------------


def set_reward_version(models: Models, version: int) -> None:
    """Mark the reward model in the worker as trained, at this version (PPO reads it)."""
    models.reward_version = version


def load_reward(models: Models, path: str, sha256: str | None = None) -> int:
    """Load a saved reward adapter and head into the models (checked against its
    published ``sha256`` when given); returns its version."""
    tensors, meta = load_verified(path, sha256)
    check_base(meta, models.base, path)
    copy_into(reward_tensors(models), tensors)  # all or nothing: checked before anything is copied
    set_reward_version(models, int(meta["version"]))
    return models.reward_version
