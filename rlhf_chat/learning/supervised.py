"""Supervised: the one language-model loss on answers people want, under their context.

PPO-ptx (InstructGPT eq. 2, the γ term) adds this loss to PPO's; learning from
chosen answers, and later from answers people write themselves, feed the same
loss. There is one implementation, here: an example is a (context, answer)
with whether the answer ended on its own, and the loss is the mean negative
log-likelihood per answer token under the policy adapter, at temperature 1
(the model's own distribution, not the sampling one).

Chosen answers come from votes: the answer a person preferred, in the layout
it was written in (its EOS only when it finished, as the reward model reads it).
Demonstrations are answers people wrote themselves; they are whole (EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_chat.learning.guards import Trust
from rlhf_chat.learning.ppo_math import full_kl, gather_logprobs, log_softmax_at
from rlhf_chat.learning.preferences import modes_differ, preference_pairs
from rlhf_chat.model.heads import frozen_prefix, top_hidden
from rlhf_chat.model.tensors import left_pad
from rlhf_chat.storage import store
from rlhf_chat.text.chat import render_prompt, render_response, trim_to_budget


@dataclass
class SupervisedExample:
    """An answer to learn to write: the context it answers, its text, and how it ended."""

    context: list[dict]
    text: str
    finished: bool = True
    weight: float = 1.0  # how much this example counts in the loss's weighted mean


def chosen_answers(session, limit: int, only_mode_pairs: bool = False, trust: Trust | None = None) -> list[SupervisedExample]:
    """The newest ``limit`` answers people chose in a vote (A or B better), oldest first.

    With ``only_mode_pairs``, only votes between two different response modes
    count: the winners that differ from what the policy writes anyway
    (AlpacaFarm: supervised updates on every pairwise winner did not beat SFT).
    With ``trust`` (learning/guards.py) each weighs what the guards gave its vote,
    and those that weigh nothing are left out.
    """
    comparisons = store.voted_comparisons(session)
    if only_mode_pairs:
        comparisons = [c for c in comparisons if modes_differ(c)]
    factor = trust.vote_weight if trust is not None else (lambda _id: 1.0)
    pairs = [p for p in preference_pairs(comparisons) if factor(p.comparison_id) > 0]
    pairs = pairs[-limit:] if limit > 0 else []
    return [SupervisedExample(p.context, p.chosen, p.chosen_finished, factor(p.comparison_id)) for p in pairs]


def demonstrated_answers(session, limit: int, weight: float, trust: Trust | None = None) -> list[SupervisedExample]:
    """The newest ``limit`` answers people wrote themselves, oldest first, each
    weighing ``weight`` against one chosen answer (``loop.demonstration_weight``).
    With ``trust``, held-back answers (a link, an address, a copy) are left out and
    the rest weigh what the guards gave them."""
    written = store.demonstrations(session)
    if trust is not None:
        written = [d for d in written if d.id not in trust.held_back and trust.written_weight(d.comparison_id) > 0]
    written = written[-limit:] if limit > 0 else []
    factor = trust.written_weight if trust is not None else (lambda _id: 1.0)
    return [SupervisedExample(list(d.context), d.text, True, weight * factor(d.comparison_id)) for d in written]


def reference_answers(session, limit: int) -> list[SupervisedExample]:
    """The newest ``limit`` answers the starting model wrote itself (the reference side
    of arena pairs), oldest first: PPO-ptx's anchor (``PPOConfig.ptx_reference_coef``),
    what the policy could already write, in the layout it was written in."""
    return [SupervisedExample(context, text, finished) for context, text, finished in store.reference_samples(session, limit)
            if text.strip()]


def example_sequences(tokenizer, examples: list[SupervisedExample], max_prompt_tokens: int) -> tuple[list, list]:
    """Each example as one token sequence (prompt + answer) and its answer's length."""
    sequences, answer_lens = [], []
    for e in examples:
        prompt = render_prompt(tokenizer, trim_to_budget(tokenizer, e.context, max_prompt_tokens))
        answer = render_response(tokenizer, e.text, e.finished) or [tokenizer.eos_token_id]
        sequences.append(prompt + answer)
        answer_lens.append(len(answer))
    return sequences, answer_lens


def answer_positions(answer_lens: list[int], width: int, device) -> torch.Tensor:
    """(B, width - 1) mask of the states that emit answer tokens, in a left-padded batch.

    Row b's answer fills the last ``answer_lens[b]`` of ``width`` positions; the
    state at position t predicts the token at t + 1.

    >>> answer_positions([2, 1], 4, "cpu")
    tensor([[0., 1., 1.],
            [0., 0., 1.]])
    """
    mask = torch.zeros(len(answer_lens), width - 1, device=device)
    for row, n in enumerate(answer_lens):
        mask[row, width - 1 - n :] = 1.0
    return mask


def weighted_token_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of a per-token quantity over the answer tokens, each answer weighted.

    ``sum_b w_b * sum_t v[b, t] * mask[b, t]  /  sum_b w_b * n_b``: with equal
    weights, the plain mean over every answer token of the batch.
    Shapes: (B, R), (B, R), (B,) -> scalar.

    >>> weighted_token_mean(torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.ones(2))
    tensor(2.)
    """
    token_weights = mask * weights.unsqueeze(-1).to(mask.dtype)  # (B, R)
    return (values * token_weights).sum() / token_weights.sum().clamp(min=1e-8)


def weighted_nll(logprobs: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per answer token, each answer weighted
    (:func:`weighted_token_mean` of ``-logprobs``). Shapes: (B, R), (B, R), (B,) -> scalar.

    >>> weighted_nll(torch.tensor([[-1.0, -3.0], [-2.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.ones(2))
    tensor(2.)
    """
    return weighted_token_mean(-logprobs, mask, weights)


@dataclass
class AnswerTokens:
    """A batch of examples laid out for a loss on their answer tokens."""

    prefix: object  # the frozen layers' output (model.heads.Prefix)
    ids: torch.Tensor  # (B, L) left-padded prompt + answer tokens
    mask: torch.Tensor  # (B, L-1) 1 at the states that emit an answer token
    weights: torch.Tensor  # (B,)


def answer_tokens(models, examples: list[SupervisedExample], max_prompt_tokens: int) -> AnswerTokens:
    """Lay the examples out as one left-padded batch, with the frozen layers run.

    The frozen layers' states of an example never change, and the same answers
    recur step after step, so they come from the worker's prefix cache (shared
    with the reward model, which reads the same sequences): only the adapted
    top layers run, forward and backward.
    """
    tok = models.tokenizer
    sequences, answer_lens = example_sequences(tok, examples, max_prompt_tokens)
    if models.prefix_cache is not None:
        prefix = models.prefix_cache.prefix(models, sequences)
    else:
        prefix = frozen_prefix(models.trainer, *left_pad(sequences, tok.pad_token_id, models.device))
    ids, _ = left_pad(sequences, tok.pad_token_id, models.device)
    mask = answer_positions(answer_lens, ids.shape[1], models.device)  # (B, L-1)
    weights = torch.tensor([e.weight for e in examples], dtype=torch.float32, device=models.device)
    return AnswerTokens(prefix, ids, mask, weights)


def answer_logits(models, batch: AnswerTokens) -> torch.Tensor:
    """(N, V) logits at the N answer tokens of the batch, under the active adapter."""
    hidden = top_hidden(models.trainer, batch.prefix, models.recompute_top_layers)  # (B, L, H)
    # None would index every position: the same loss (the mask zeroes the rest), at the
    # cost of the output layer over prompts too
    real = batch.mask.bool()  # pragma: no mutate (a cost mutant: one value either way)
    # the 49k-word output layer on the answer tokens only
    return models.trainer.get_base_model().lm_head(hidden[:, :-1][real]).float()


def placed(batch: AnswerTokens, values: torch.Tensor) -> torch.Tensor:
    """The (N,) per-answer-token values back in the batch's (B, L-1) layout (0 elsewhere)."""
    out = torch.zeros(batch.mask.shape, dtype=values.dtype, device=values.device)
    out[batch.mask.bool()] = values
    return out


def lm_loss(models, examples: list[SupervisedExample], max_prompt_tokens: int) -> torch.Tensor:
    """The language-model loss of the policy on the examples (differentiable), at
    temperature 1."""
    batch = answer_tokens(models, examples, max_prompt_tokens)
    logits = answer_logits(models, batch)
    logprobs = gather_logprobs(log_softmax_at(logits, 1.0), batch.ids[:, 1:][batch.mask.bool()])
    return weighted_nll(placed(batch, logprobs), batch.mask, batch.weights)


def reference_kl_loss(models, examples: list[SupervisedExample], max_prompt_tokens: int) -> torch.Tensor:
    """The policy's mean KL(reference || policy) per answer token over the whole
    vocabulary, at the examples' answers (differentiable in the policy).

    PPO-ptx's anchor as distillation: the target at each position is the starting
    model's whole distribution, not the token it happened to sample. The
    log-likelihood of the reference's own nucleus samples has its optimum at a
    sharper distribution than the reference (those samples leave out its tail),
    so an anchor on it pulls the policy away from the reference it is meant to
    keep; this one is zero exactly at the reference.
    """
    batch = answer_tokens(models, examples, max_prompt_tokens)
    with torch.no_grad(), models.trainer.disable_adapter():
        reference = answer_logits(models, batch)
    kl = full_kl(reference, answer_logits(models, batch))
    return weighted_token_mean(placed(batch, kl), batch.mask, batch.weights)
