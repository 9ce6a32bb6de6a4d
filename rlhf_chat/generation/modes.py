"""Modes: ways to meet a question, so that two candidates differ in what people care about.

PPO only reinforces what it samples, and the bundled model rarely asks a
question back or gives an example on its own (1-3% of answers), so two plain
samples almost never differ in such a behaviour and a vote between them
carries no signal about it. A share of chat pairs therefore shows the policy
under two different modes. The bundled model ignores instructions in a system
prompt but continues an opening written into its answer (DESIGN.md), so a
mode is a set of prefilled openings (picked at random, so that no single canned
phrase is learned) and the model writes the rest. ``bench/modes.py`` measures how
often each mode is followed.

Where the opening goes matters as much as what it says. At the start of the
answer, "Could you tell me a bit more about" replaces the answer: a person who
asked for the capital of Australia gets a question back, and the supervised
term distils that into every answer (issue 40). So the question back and the
example are *answer-first* modes: the policy writes its answer's first sentence
(``behaviours.answer_head``), the opening follows it, and the model goes on
from there, adding to the answer instead of replacing it ("Preheat the oven to
220 C. Could you tell me which vegetables you have?"). ``loop.answer_first``
False puts every opening at the start again, as before.

The mode is stored with each candidate and never shown: the person sees the
whole answer, opening included, and votes on it as on any other. Learning
uses the plain context only (the reward model and the supervised term both
read the question without the mode), so what a vote teaches is "answers like
this one, to questions like this", which the plain policy can then write by itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import NamedTuple

from rlhf_chat.text.chat import prompt_text
from rlhf_chat.text.questions import question_kind

PLAIN = ""  # the stored mode of a candidate written with no opening


@dataclass(frozen=True)
class Mode:
    """A way to answer: its name, what it is for, the openings that produce it, and
    the behaviour (a ``behaviours.DETECTORS`` name) that shows it was followed."""

    name: str
    description: str
    openings: tuple[str, ...] = ()  # empty: the policy's own answer
    behaviour: str = ""
    after_first_sentence: bool = False  # answer-first: the opening follows the answer's first sentence

    def opening(self, rng: random.Random) -> str:
        """One of the mode's openings, at random ("" for a mode without any)."""
        return rng.choice(self.openings) if self.openings else PLAIN

    def draw(self, rng: random.Random) -> ModeDraw:
        """One side's mode for a pair: the name, an opening at random, and where it goes."""
        return ModeDraw(self.name, self.opening(rng), self.after_first_sentence and bool(self.openings))


class ModeDraw(NamedTuple):
    """How one side of a pair is written: the mode's name, its opening ("" for none),
    and whether the opening follows the answer's first sentence instead of starting it."""

    name: str
    opening: str
    after_first_sentence: bool = False


PLAIN_DRAW = ModeDraw(PLAIN, PLAIN)


def placed(modes: list[Mode], answer_first: bool) -> list[Mode]:
    """The modes as ``loop.answer_first`` places them: as defined, or (False) every
    opening at the start of the answer."""
    return list(modes) if answer_first else [replace(m, after_first_sentence=False) for m in modes]


# Openings chosen by measurement on the bundled model (bench/modes.py; the
# README's "Modes" table gives each one's take rate). The non-warm openings
# avoid the ``friendly`` labeler's markers, so that a mode pair measures one
# thing at a time.
BUILTIN_MODES: tuple[Mode, ...] = (
    Mode("direct", "the policy's own answer, no opening (the bundled model answers directly)"),
    Mode(
        "follow_up",
        "a follow-up question to clarify or to learn more, after the answer's first sentence",
        ("To help you further, could you tell me", "May I ask", "Could you tell me a bit more about"),
        "asks a question",
        after_first_sentence=True,
    ),
    Mode(
        "example",
        "an example that illustrates, after the answer's first sentence",
        ("For example,", "Here is an example:", "Let me give you an example."),
        "gives an example",
        after_first_sentence=True,
    ),
    Mode(
        "background",
        "a more general answer with background",
        ("To understand this, some background helps.", "In general,", "A little history first:"),
        "background",
    ),
    Mode(
        "warm",
        "a warm, friendly tone",
        ("I'm glad you asked!", "Thank you for asking!", "Of course! I'd be happy to help."),
        "warm",
    ),
    Mode("steps", "step by step", ("Here's how, step by step:\n\n1.", "Let's go step by step.\n\n1."), "list lines"),
)


def pick_pair(
    modes: list[Mode], rng: random.Random, record: dict[str, tuple[float, float]] | None = None
) -> tuple[Mode, Mode] | None:
    """Two different modes for the two sides of a pair, in random order; None with fewer than two.

    Without a ``record`` any two modes, uniformly. With one (each mode's wins
    and losses in earlier votes, ``store.mode_record``), a dueling-bandit choice:
    one side is the mode with the highest draw from Beta(1 + wins, 1 + losses),
    the other any other mode. The mode people keep choosing then shows up in
    most pairs, so most votes are about it and its chosen answers teach the
    plain policy, while a mode with few votes still wins draws now and then and
    every mode keeps meeting the favourite.
    """
    if len(modes) < 2:
        return None
    if record is None:
        a, b = rng.sample(modes, 2)
        return a, b
    favourite = thompson_favourite(modes, rng, record)
    other = rng.choice([m for m in modes if m is not favourite])
    return (favourite, other) if rng.random() < 0.5 else (other, favourite)


def thompson_favourite(modes: list[Mode], rng: random.Random, record: dict[str, tuple[int, int]]) -> Mode:
    """The mode with the highest draw from Beta(1 + wins, 1 + losses) over the votes so far."""
    draws = [rng.betavariate(1 + wins, 1 + losses) for wins, losses in (record.get(m.name, (0, 0)) for m in modes)]
    return modes[max(range(len(modes)), key=draws.__getitem__)]


def guided_openings(
    modes: list[Mode], fraction: float, rng: random.Random, records: list[dict[str, tuple[float, float]] | None]
) -> list[str]:
    """For PPO's guided rollouts (``PPOConfig.guided_fraction``): each rollout row,
    with probability ``fraction``, gets an opening of the mode a Thompson draw over
    its own ``records`` entry favours ("" otherwise, and for a mode without
    openings): the plain policy then tries, and the reward model scores, what
    people have been choosing, which it would almost never sample by itself.

    One record per row, as ``mode_record_for`` gives it for the row's prompt: with
    ``loop.mode_choice`` per_kind a how-to request is opened as people chose on
    how-to requests (asking back) and a factual question as they chose on facts
    (the direct answer). None (uniform) draws every mode alike.
    """
    if fraction <= 0 or not modes:
        return [PLAIN] * len(records)
    return [
        thompson_favourite(modes, rng, record or {}).opening(rng) if rng.random() < fraction else PLAIN
        for record in records
    ]


def by_name(modes: list[Mode] | tuple[Mode, ...]) -> dict[str, Mode]:
    """Modes keyed by name."""
    return {m.name: m for m in modes}


def active_modes(session, answer_first: bool = True) -> list[Mode]:
    """The modes in use: the built-ins, with an admin's additions and removals (stored)
    applied, placed as ``loop.answer_first`` says (:func:`placed`)."""
    from rlhf_chat.storage import store

    modes = by_name(BUILTIN_MODES)
    for row in store.mode_changes(session):
        if not row.enabled:
            modes.pop(row.name, None)
        else:
            # an edited built-in keeps its placement: follow_up stays answer-first
            builtin = by_name(BUILTIN_MODES).get(row.name)
            after = builtin.after_first_sentence if builtin is not None else False
            modes[row.name] = Mode(row.name, row.description, tuple(row.openings), row.behaviour, after)
    return placed(list(modes.values()), answer_first)


# How much the votes on other kinds of question count in a per-kind record: a
# quarter, so a mode people chose everywhere (a taste of tone) is tried early for
# every kind, while a kind's own votes soon outweigh the rest (asking back wins on
# how-to requests and loses on facts).
OTHER_KINDS_WEIGHT = 0.25


def mode_record_for(session, choice: str, prompt: str | None = None) -> dict[str, tuple[float, float]] | None:
    """What ``pick_pair`` needs for a ``loop.mode_choice``: None for "uniform"; the
    votes' record for "thompson"; for "per_kind", the record of the votes on questions
    of ``prompt``'s kind (``text.questions.question_kind``: a fact, a how-to request,
    an idea, or none of these), with the other kinds' votes at
    :data:`OTHER_KINDS_WEIGHT`, so that each kind of question gets its own favourite."""
    from rlhf_chat.config import MODE_CHOICES
    from rlhf_chat.storage import store

    if choice not in MODE_CHOICES:
        raise ValueError(f"loop.mode_choice {choice!r}: expected one of {', '.join(MODE_CHOICES)}")
    if choice == "uniform":
        return None
    if choice == "thompson" or prompt is None:
        return store.mode_record(session)
    return record_for_kind(store.mode_record_by(session, context_kind), question_kind(prompt))


def context_kind(context: list[dict]) -> str | None:
    """The kind of question a stored conversation's last user message asks."""
    return question_kind(prompt_text(context))


def record_for_kind(
    by_kind: dict[object, dict[str, tuple[int, int]]], kind: str | None
) -> dict[str, tuple[float, float]]:
    """One kind's (wins, losses) per mode, plus every other kind's at :data:`OTHER_KINDS_WEIGHT`.

    >>> record_for_kind({"fact": {"direct": (4, 0)}, "how_to": {"direct": (0, 8)}}, "fact")
    {'direct': (4.0, 2.0)}
    """
    record: dict[str, list[float]] = {}
    for group, modes in by_kind.items():
        weight = 1.0 if group == kind else OTHER_KINDS_WEIGHT
        for mode, (wins, losses) in modes.items():
            entry = record.setdefault(mode, [0.0, 0.0])
            entry[0] += weight * wins
            entry[1] += weight * losses
    return {mode: (wins, losses) for mode, (wins, losses) in record.items()}


def modes_for_pair(
    modes: list[Mode], fraction: float, rng: random.Random, record: dict[str, tuple[int, int]] | None = None
) -> tuple[ModeDraw, ModeDraw] | None:
    """With probability ``fraction``, two different modes drawn for sides A and B
    (picked by ``pick_pair`` with ``record``); else None (plain)."""
    if fraction <= 0 or rng.random() >= fraction:
        return None
    pair = pick_pair(modes, rng, record)
    if pair is None:
        return None
    return pair[0].draw(rng), pair[1].draw(rng)
