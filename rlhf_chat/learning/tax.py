"""Tax: what a learned taste costs, measured on the policy against the reference.

A win-rate against a labeler that counts markers cannot see a bot that stops
answering. InstructGPT (Ouyang et al. 2022, section 3.5) calls the regressions
on what the model could already do the "alignment tax", and measures it on
held-out tasks. Here, in small, reference -> policy, three figures:

* **facts kept**: the share of sampled answers to factual questions (the shipped
  answer key, ``text/questions.py``) that state the accepted answer;
* **language kept**: the mean negative log-likelihood per token of a shipped set
  of well-formed answers (lower is better; a policy that drifted into a canned
  phrase finds ordinary answers less likely);
* **answers, not echoes**: the share of answers that say something the question
  did not (:func:`rlhf_chat.text.questions.gives_content`).

Both sides are measured in the same call, on the same prompts, with the same
sampling settings, so the difference is the policy's doing.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from rlhf_chat.generation.candidates import BASE_ADAPTER, Sampling, sample
from rlhf_chat.generation.worker import yield_point
from rlhf_chat.learning.ppo_math import gather_logprobs, log_softmax_at
from rlhf_chat.learning.supervised import SupervisedExample, answer_logits, answer_tokens
from rlhf_chat.model.loading import POLICY
from rlhf_chat.text.chat import render_prompt
from rlhf_chat.text.questions import gives_content, states_fact


@dataclass
class SideTax:
    """The three figures for one side (the reference or the policy)."""

    facts: float  # share of answers to factual questions that state the fact
    nll: float  # mean NLL per token of the well-formed answers
    content: float  # share of answers that say something (gives_content)
    asks_instead: float  # share of factual answers that are a question and state no fact


@dataclass
class Tax:
    """Reference and policy side by side, with how many questions and answers each figure read."""

    reference: SideTax
    policy: SideTax
    fact_questions: int
    fact_answers: int
    nll_answers: int

    def as_dict(self) -> dict:
        """Plain fields for a report."""
        return asdict(self)


def pick_fact_questions(key: dict[str, list[str]], count: int, seed: int) -> list[str]:
    """``count`` questions of the key, one phrasing per distinct accepted list (so that
    one fact is not counted three times), drawn with ``seed``."""
    by_fact: dict[tuple[str, ...], list[str]] = {}
    for question, accepted in key.items():
        by_fact.setdefault(tuple(accepted), []).append(question)
    rng = random.Random(seed)
    picked = [rng.choice(sorted(questions)) for _, questions in sorted(by_fact.items())]
    rng.shuffle(picked)
    return picked[:count] if count > 0 else picked


# Answers per forward in answers_nll: the output layer's 49k logits at every answer
# token of all 60 shipped answers at once (and their log-softmax) peaked at 2.1 GB
# above the model, the largest transient of a PPO step that measures the tax.
NLL_CHUNK = 8


@torch.no_grad()
def answers_nll(models, pairs: list[tuple[str, str]], reference: bool, max_prompt_tokens: int = 256) -> float:
    """Mean NLL per answer token of the (question, answer) pairs under the training
    copy's policy adapter, or with adapters off (the reference); :data:`NLL_CHUNK`
    answers at a time."""
    examples = [SupervisedExample([{"role": "user", "content": q}], a) for q, a in pairs]
    models.trainer.set_adapter(POLICY)
    total, tokens = 0.0, 0
    for i in range(0, len(examples), NLL_CHUNK):
        batch = answer_tokens(models, examples[i : i + NLL_CHUNK], max_prompt_tokens)
        with models.trainer.disable_adapter() if reference else nullcontext():
            logits = answer_logits(models, batch)
        logprobs = gather_logprobs(log_softmax_at(logits, 1.0), batch.ids[:, 1:][batch.mask.bool()])
        total, tokens = total - logprobs.sum().item(), tokens + logprobs.numel()
    return total / max(tokens, 1)


def fact_shares(questions: list[str], answers: list[str], key: dict[str, list[str]], per_question: int) -> tuple[float, float]:
    """(share stating the fact, share that asks a question instead and states none)."""
    stated = asked = 0
    for k, answer in enumerate(answers):
        accepted = key[questions[k // per_question]]
        hit = states_fact(answer, accepted)
        stated += hit
        asked += (not hit) and answer.rstrip().endswith("?")
    n = max(1, len(answers))
    return stated / n, asked / n


def measure_side(
    models,
    key: dict[str, list[str]],
    reference_answers: list[tuple[str, str]],
    sampling: Sampling,
    questions: list[str],
    per_question: int = 2,
    content_prompts: list[str] | None = None,
    reference: bool = False,
) -> SideTax:
    """The three figures of one side: the policy the models hold now, or (``reference``)
    the starting model. Facts: ``per_question`` sampled answers to each of ``questions``.
    Content: the same answers, plus ``content_prompts`` answered once each. NLL: the
    well-formed answers. One side's call has the layout and seed of the other's, so a
    policy equal to the reference writes the reference's answers and shows no tax."""
    tok = models.tokenizer
    name = BASE_ADAPTER if reference else "policy"
    extra = list(content_prompts or [])
    asked = [q for q in questions for _ in range(per_question)]
    answers = []
    for prompts in (asked, extra):  # two calls, each side alike, so that the layouts match
        if prompts:
            rows = [render_prompt(tok, [{"role": "user", "content": q}]) for q in prompts]
            # yield_point: a person's request runs between two decoding steps, as in a rollout
            answers += sample(models.serving, tok, rows, sampling, adapter_names=[name] * len(rows),
                              on_step=yield_point).texts
    facts, asks = fact_shares(questions, answers[: len(asked)], key, per_question)
    content = sum(gives_content(p, a) for p, a in zip(asked + extra, answers)) / max(1, len(answers))
    nll = answers_nll(models, reference_answers, reference=reference)
    return SideTax(facts=round(facts, 4), nll=round(nll, 4), content=round(content, 4), asks_instead=round(asks, 4))


def measure_tax(
    models,
    key: dict[str, list[str]],
    reference_answers: list[tuple[str, str]],
    sampling: Sampling,
    fact_questions: int = 40,
    per_question: int = 2,
    seed: int = 0,
    content_prompts: list[str] | None = None,
    reference: SideTax | None = None,
) -> Tax:
    """The alignment tax of the policy the models hold now (run it as a model-worker job):
    :func:`measure_side` for the reference (or the ``reference`` figures measured before
    with the same arguments) and for the policy, on ``fact_questions`` questions of
    ``key`` drawn with ``seed``."""
    questions = pick_fact_questions(key, fact_questions, seed)
    args = (models, key, reference_answers, sampling, questions, per_question, content_prompts)
    if reference is None:
        reference = measure_side(*args, reference=True)
    policy = measure_side(*args, reference=False)
    return Tax(reference=reference, policy=policy, fact_questions=len(questions),
               fact_answers=len(questions) * per_question, nll_answers=len(reference_answers))


def tax_markdown(version: int, policy: dict, reference: dict, questions: int) -> str:
    """The Training tab's line on what policy ``version`` has paid for its taste (the
    figures :meth:`PPOTrainer.record_tax` stores with a checkpoint), starting model
    first, so that a win-rate is never read without its cost.

    >>> print(tax_markdown(5, {"facts": 0.4, "nll": 2.5, "content": 0.9, "asks_instead": 0.1},
    ...                    {"facts": 0.5, "nll": 2.4, "content": 0.95, "asks_instead": 0.0}, 16))
    **What the taste costs** (policy v5 against the starting model, 16 factual questions): facts stated 0.50 → 0.40; NLL of well-formed answers 2.40 → 2.50 (lower is better); answers that say something 0.95 → 0.90.
    """
    return (
        f"**What the taste costs** (policy v{version} against the starting model, {questions} factual questions): "
        f"facts stated {reference['facts']:.2f} → {policy['facts']:.2f}; "
        f"NLL of well-formed answers {reference['nll']:.2f} → {policy['nll']:.2f} (lower is better); "
        f"answers that say something {reference['content']:.2f} → {policy['content']:.2f}."
    )
