"""Scripted labelers: stand-ins for people voting between two chatbot answers.

In the live demo a person reads two candidate answers to a prompt and picks
the better one (or says they are equally good, or both bad).  The headless
simulation and the test suite cannot wait for a person, so they plug in a
*labeler* instead: a plain callable

    labeler(prompt, response_a, response_b) -> "a" | "b" | "tie" | "both_bad"

Each built-in labeler has a simple, deliberately visible taste, so that a run
can show the policy drifting towards it:

* ``concise`` prefers the shorter answer;
* ``friendly`` prefers the warmer, more polite answer (something other than
  length, so the two built-ins pull the model in different directions);
* ``follow_up`` and ``example`` are strict: the answer that asks the person a
  question (or gives an example) wins, and anything else is a tie, so length
  can never win them;
* ``context`` is strict per question: the fact for a factual question, a
  question back for a request that depends on the person, an example for an
  idea (the seed's "which one is right depends on the question").

Two built-in *adversaries* (``BUILTIN_ADVERSARIES``) stand in for a bad actor
in the simulation's crowd (``--adversary``): ``longer`` always votes for the
longer answer and ``shorter`` for the shorter one, decisively, whatever the
question. A decisive voter is what captured the first reward model in issue 41.

Your own labeler can be plugged in with ``load_labeler("package.module:func")``.
Whatever a labeler returns should be passed through ``normalize_choice`` before
it is recorded, so a sloppy custom labeler fails loudly instead of silently
corrupting the preference data.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal

from rlhf_chat.storage import tables
from rlhf_chat.text.behaviours import FRIENDLY_MARKERS, asks_question, friendliness_score, gives_example, on_topic
from rlhf_chat.text.questions import CONCEPT, FACT, HOW_TO, question_kind, shipped_fact_key, states_fact

__all__ = [
    "BUILTIN_ADVERSARIES",
    "BUILTIN_LABELERS",
    "CHOICES",
    "CONCISE_TIE_FRACTION",
    "Choice",
    "FRIENDLY_MARKERS",
    "Labeler",
    "concise",
    "context",
    "example",
    "follow_up",
    "friendly",
    "friendliness_score",
    "load_labeler",
    "longer",
    "normalize_choice",
    "shorter",
    "strict_choice",
]

Choice = Literal["a", "b", "tie", "both_bad"]
"""One vote: answer A wins, answer B wins, no real difference, or neither is usable."""

CHOICES: tuple[Choice, ...] = tables.CHOICES  # type: ignore[assignment]  # one definition, with the schema

Labeler = Callable[[str, str, str], str]
"""``(prompt, response_a, response_b) -> choice``.  Typed as returning ``str``
rather than ``Choice`` because custom labelers are untrusted: their output goes
through ``normalize_choice``."""

# Two answers whose lengths differ by no more than this fraction of the longer
# one count as a tie for ``concise``: a person skimming two answers does not
# notice that one is a few words shorter, and voting on such noise would
# teach the model nothing but noise.
CONCISE_TIE_FRACTION = 0.10

def concise(prompt: str, response_a: str, response_b: str) -> Choice:
    """Prefer the shorter answer, as a person who wants the gist quickly would.

    Length is the number of words, as a reader judges it; characters would
    make two answers cut off at the same token limit differ only by how long
    their words happen to be, a difference no reader would vote on.  Returns
    ``"tie"`` when the lengths differ by at most 10% of the longer one, and
    ``"both_bad"`` when both answers are empty.
    An empty answer never wins against a non-empty one: it does not answer the
    question at all, and rewarding it would teach the model to say nothing.
    """
    del prompt  # This taste ignores the question; only the answers matter.
    len_a = len(response_a.split())
    len_b = len(response_b.split())
    if len_a == 0 and len_b == 0:
        return "both_bad"
    if len_a == 0:
        return "b"
    if len_b == 0:
        return "a"
    longer = max(len_a, len_b)
    # Compare in whole percent (diff * 100 <= longer * 10) so the band edge
    # is exact instead of depending on float rounding.
    if abs(len_a - len_b) * 100 <= longer * round(CONCISE_TIE_FRACTION * 100):
        return "tie"
    return "a" if len_a < len_b else "b"


def friendly(prompt: str, response_a: str, response_b: str) -> Choice:
    """Prefer the warmer, more polite answer, whatever its length.

    Scores each answer with ``friendliness_score`` and picks the higher one;
    equal scores are a ``"tie"``.  Two empty answers are ``"both_bad"``, as
    for ``concise``: there is nothing to be friendly about.
    """
    del prompt  # Warmth is judged on the answers alone.
    if not response_a.strip() and not response_b.strip():
        return "both_bad"
    score_a = friendliness_score(response_a)
    score_b = friendliness_score(response_b)
    if score_a == score_b:
        return "tie"
    return "a" if score_a > score_b else "b"


def strict_choice(has_a: bool, has_b: bool) -> Choice:
    """The answer that shows the behaviour wins; "tie" when both or neither do.

    No length tie-break, nothing else: a strict labeler can only be won by the
    behaviour itself, so a policy that just got shorter or longer gains nothing.
    """
    if has_a == has_b:
        return "tie"
    return "a" if has_a else "b"


def follow_up(prompt: str, response_a: str, response_b: str) -> Choice:
    """Prefer the answer that follows up with a question to the person (the seed's
    "follow up with a related question"; ``behaviours.asks_question``), strictly."""
    del prompt
    return strict_choice(asks_question(response_a), asks_question(response_b))


def example(prompt: str, response_a: str, response_b: str) -> Choice:
    """Prefer the answer that illustrates with an example (``behaviours.gives_example``), strictly."""
    del prompt
    return strict_choice(gives_example(response_a), gives_example(response_b))


def context(prompt: str, response_a: str, response_b: str) -> Choice:
    """Prefer the kind of answer the question calls for (the seed's list: answer
    directly, follow up with a question, give an example), strictly:

    * a factual question (in the answer key, ``text/questions.py``): the answer that
      states the accepted fact wins;
    * a request that depends on the person's situation (how-to, advice, plans): the
      answer that asks the person a question back, on topic, wins;
    * a question about an idea: the answer that gives an example, on topic, wins;
    * any other question, or both or neither answer doing what its kind calls for:
      a tie. So neither length nor a canned opening can win it: an answer must do
      the right thing for this question (an example opening before a fact does not
      state the fact; a question back to a factual question states nothing).
    """
    kind = question_kind(prompt)
    if kind == FACT:
        accepted = shipped_fact_key()[prompt.strip()]
        return strict_choice(states_fact(response_a, accepted), states_fact(response_b, accepted))
    if kind == HOW_TO:
        asks = [asks_question(r) and on_topic(prompt, r) for r in (response_a, response_b)]
        return strict_choice(*asks)
    if kind == CONCEPT:
        shows = [gives_example(r) and on_topic(prompt, r) for r in (response_a, response_b)]
        return strict_choice(*shows)
    return "tie"


def by_length(response_a: str, response_b: str, longer_wins: bool) -> Choice:
    """The answer with more words wins (``longer_wins``) or the one with fewer;
    "tie" only when both have as many words. No tie band and no exception for an
    empty answer: an adversary is decisive wherever it can be."""
    len_a, len_b = len(response_a.split()), len(response_b.split())
    if len_a == len_b:
        return "tie"
    return "a" if (len_a > len_b) == longer_wins else "b"


def longer(prompt: str, response_a: str, response_b: str) -> Choice:
    """An adversary: always the longer answer (by words), as a bad actor who wants
    the model to ramble would vote."""
    del prompt
    return by_length(response_a, response_b, longer_wins=True)


def shorter(prompt: str, response_a: str, response_b: str) -> Choice:
    """An adversary: always the shorter answer (by words), an empty one included."""
    del prompt
    return by_length(response_a, response_b, longer_wins=False)


BUILTIN_ADVERSARIES: dict[str, Labeler] = {"longer": longer, "shorter": shorter}

BUILTIN_LABELERS: dict[str, Labeler] = {
    "concise": concise,
    "context": context,
    "friendly": friendly,
    "follow_up": follow_up,
    "example": example,
}


def _spec_help(builtins: dict | None = None, kind: str = "labeler") -> str:
    """The part of every error message that says what a valid spec looks like."""
    names = ", ".join(sorted(BUILTIN_LABELERS if builtins is None else builtins))
    return f"use a built-in {kind} ({names}) or 'package.module:function'"


def load_labeler(spec: str) -> Labeler:
    """Resolve a labeler from a command-line style spec (:func:`load_callable`)."""
    return load_callable(spec, BUILTIN_LABELERS, "labeler")


def load_callable(spec: str, builtins: dict, kind: str):
    """Resolve a scripted person (a labeler, a teacher) from a command-line style spec.

    ``spec`` is either a built-in name (a key of ``builtins``) or
    ``"package.module:function"``, which is imported with ``importlib``; the
    part after the colon may be dotted (``"module:Class.method"``).

    Raises ``ValueError`` with a message naming the built-ins when the name is
    unknown, the module cannot be imported, the attribute is missing or the
    object found is not callable.  ``ValueError`` (not ``ImportError`` etc.) so
    a CLI can catch one exception type and show the message as-is.
    """
    name = spec.strip()
    if name in builtins:
        return builtins[name]
    helps = _spec_help(builtins, kind)
    if ":" not in name:
        raise ValueError(f"unknown {kind} {spec!r}; {helps}")

    module_name, _, attr_path = name.partition(":")
    module_name = module_name.strip()
    attr_path = attr_path.strip()
    if not module_name or not attr_path:
        raise ValueError(
            f"malformed {kind} spec {spec!r}: both a module and a function "
            f"name are needed; {helps}"
        )

    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure while importing user code means "cannot import"
        raise ValueError(
            f"cannot import module {module_name!r} for {kind} {spec!r}: "
            f"{type(exc).__name__}: {exc}; {helps}"
        ) from exc

    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ValueError(
                f"{kind} {spec!r}: {module_name!r} has no attribute "
                f"{attr_path!r}; {helps}"
            ) from exc

    if not callable(obj):
        raise ValueError(
            f"{kind} {spec!r} is not callable (got {type(obj).__name__}); "
            f"{helps}"
        )
    return obj


def normalize_choice(value: str) -> Choice:
    """Validate and canonicalise one labeler vote.

    Accepts ``"a"``, ``"b"``, ``"tie"`` and ``"both_bad"`` in any case and
    with surrounding whitespace; ``"both bad"`` and ``"both-bad"`` are also
    accepted because people (and hand-written labelers) spell it all three
    ways.  Anything else, including non-strings such as ``None``, raises
    ``ValueError`` listing the valid choices.
    """
    if isinstance(value, str):
        canonical = value.strip().lower().replace("-", "_").replace(" ", "_")
        for choice in CHOICES:
            if canonical == choice:
                return choice
    raise ValueError(
        f"invalid labeler choice {value!r}; expected one of: {', '.join(CHOICES)}"
    )
