"""Supervised: the one language-model loss on answers people want, under their context.

PPO-ptx (InstructGPT eq. 2, the γ term) adds this loss to PPO's; learning from
chosen answers, and later from answers people write themselves, feed the same
loss. There is one implementation, here: an example is a (context, answer)
with whether the answer ended on its own, and the loss is the mean negative
log-likelihood per answer token under the policy adapter, at temperature 1
(the model's own distribution, not the sampling one).

Chosen answers come from votes: the answer a person preferred, in the layout
it was written in (its EOS only when it finished, as the reward model reads it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_chat import store
from rlhf_chat.candidates import left_pad
from rlhf_chat.chat import render_prompt, render_response, trim_to_budget
from rlhf_chat.preferences import preference_pairs


@dataclass
class SupervisedExample:
    """An answer to learn to write: the context it answers, its text, and how it ended."""

    context: list[dict]
    text: str
    finished: bool = True
    weight: float = 1.0  # how much this example counts in the loss's weighted mean


def chosen_answers(session, limit: int) -> list[SupervisedExample]:
    """The newest ``limit`` answers people chose in a vote (A or B better), oldest first."""
    pairs = preference_pairs(store.voted_comparisons(session))[-limit:] if limit > 0 else []
    return [SupervisedExample(p.context, p.chosen, p.chosen_finished) for p in pairs]


def encode_examples(tokenizer, examples: list[SupervisedExample], max_prompt_tokens: int, device) -> dict:
    """Left-padded prompts (B, P) and right-padded answers (B, R) with their masks."""
    prompts = [render_prompt(tokenizer, trim_to_budget(tokenizer, e.context, max_prompt_tokens)) for e in examples]
    answers = [render_response(tokenizer, e.text, e.finished) or [tokenizer.eos_token_id] for e in examples]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    width = max(len(a) for a in answers)
    answer_ids = torch.full((len(answers), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    answer_mask = torch.zeros_like(answer_ids, dtype=torch.float32)
    for row, ids in enumerate(answers):
        answer_ids[row, : len(ids)] = torch.tensor(ids, device=device)
        answer_mask[row, : len(ids)] = 1.0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "answer_ids": answer_ids, "answer_mask": answer_mask}


def weighted_nll(logprobs: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per answer token, each answer weighted.

    ``sum_b w_b * sum_t -logp[b, t] * mask[b, t]  /  sum_b w_b * n_b``: with
    equal weights, the plain mean over every answer token of the batch.
    Shapes: (B, R), (B, R), (B,) -> scalar.

    >>> weighted_nll(torch.tensor([[-1.0, -3.0], [-2.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.ones(2))
    tensor(2.)
    """
    token_weights = mask * weights.unsqueeze(-1).to(mask.dtype)  # (B, R)
    return -(logprobs * token_weights).sum() / token_weights.sum().clamp(min=1e-8)


def lm_loss(models, examples: list[SupervisedExample], max_prompt_tokens: int) -> torch.Tensor:
    """The language-model loss of the policy on the examples (differentiable)."""
    from rlhf_chat.ppo import full_prefix, policy_forward  # the policy's forward lives with PPO

    batch = encode_examples(models.tokenizer, examples, max_prompt_tokens, models.device)
    prefix = full_prefix(models, batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"], batch["answer_mask"])
    logprobs, _, _ = policy_forward(
        models, prefix, batch["prompt_ids"].shape[1], batch["answer_ids"], batch["answer_mask"], 1.0, with_values=False
    )
    weights = torch.tensor([e.weight for e in examples], dtype=torch.float32, device=models.device)
    return weighted_nll(logprobs, batch["answer_mask"], weights)
