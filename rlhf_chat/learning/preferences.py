"""Preferences: turning stored votes into (context, chosen, rejected) training pairs.

A vote for A or B is a pair whose chosen answer won. A tie is a pair too,
with target 1/2 (:func:`tie_pairs`): it says the two answers are worth the
same, which is how the reward model hears that whatever differs between them
(their length, most often) is not what the person cares about. "Both bad"
says nothing about which is better, so it never enters the loss (it is still
stored, and counted in exports).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from rlhf_chat.storage.tables import Comparison, Demonstration


@dataclass
class PreferencePair:
    """One usable vote: which of two answers to the same context a person preferred."""

    comparison_id: int
    context: list[dict]  # role/content messages, ending with the user's turn
    chosen: str
    rejected: str
    strength: str | None = None  # slightly | clearly | None (not stated)
    # Whether each answer ended on its own (EOS) or was cut at the length limit:
    # the reward model scores each one in the layout it was written in.
    chosen_finished: bool = True
    rejected_finished: bool = True
    weight: float = 1.0  # its share of the loss against one vote's (``loop.demonstration_weight``)
    source: str = "vote"  # vote | demonstration | tie
    # The probability that ``chosen`` is the better answer: 1 for a vote, 1/2 for
    # a tie (whose two sides are then in their shown order, a then b).
    target: float = 1.0


def finished_flags(comparison: Comparison) -> dict[str, bool]:
    """Side -> whether that candidate ended on its own; True where no candidate row says.

    Rows stored before candidates were recorded have no flags; they were shown
    as complete answers, so they are scored as finished.
    """
    flags = {"a": True, "b": True}
    for row in comparison.candidates:
        flags[row.side] = bool(row.finished)
    return flags


def modes_differ(comparison: Comparison) -> bool:
    """Whether the two candidates were written in two different response modes (modes.py)."""
    modes = {row.side: row.mode or "" for row in comparison.candidates}
    return len(modes) == 2 and modes["a"] != modes["b"]


def to_pair(comparison: Comparison) -> PreferencePair | None:
    """The preference a vote expresses, or None for tie / both bad / no vote."""
    finished = finished_flags(comparison)
    if comparison.choice == "a":
        chosen, rejected, sides = comparison.response_a, comparison.response_b, ("a", "b")
    elif comparison.choice == "b":
        chosen, rejected, sides = comparison.response_b, comparison.response_a, ("b", "a")
    else:
        return None
    return PreferencePair(
        comparison.id, list(comparison.context), chosen, rejected, comparison.strength,
        chosen_finished=finished[sides[0]], rejected_finished=finished[sides[1]],
    )


def preference_pairs(comparisons: list[Comparison]) -> list[PreferencePair]:
    """Every usable preference among the comparisons, in order."""
    return [pair for pair in map(to_pair, comparisons) if pair is not None]


def tie_pairs(comparisons: list[Comparison], weight: float) -> list[PreferencePair]:
    """Every tie as a pair of target 1/2 weighing ``weight`` (none when it is 0).

    A tie between a long and a short answer says length is not what this
    person prefers: without ties, a reward model fitted to a few decided votes
    learns whatever the winners share most, and on the bundled model that is
    length. The tie is a soft label of 1/2 in the same Bradley-Terry loss, the
    plainest use of a tie (Rao and Kupper 1967 model ties with a threshold on
    the score difference instead, which would add a parameter to fit).
    """
    if weight <= 0:
        return []
    finished_of = [(c, finished_flags(c)) for c in comparisons if c.choice == "tie"]
    return [
        PreferencePair(
            c.id, list(c.context), c.response_a, c.response_b, None,
            chosen_finished=f["a"], rejected_finished=f["b"], weight=weight, source="tie", target=0.5,
        )
        for c, f in finished_of
    ]


def demonstration_pairs(demonstrations: list[Demonstration], weight: float) -> list[PreferencePair]:
    """A written answer over each of the two answers it was written beside (FeeL:
    an edited reply is chosen over the original), each pair weighing ``weight``.

    Keyed by the pair's comparison id, so the held-out split keeps a written
    answer on the same side as any vote on that pair. A written answer is whole:
    it is scored as finished; each candidate as it was shown.
    """
    pairs = []
    for demo in demonstrations:
        finished = finished_flags(demo.comparison)
        shown = {"a": demo.comparison.response_a, "b": demo.comparison.response_b}
        for side, text in shown.items():
            pairs.append(PreferencePair(
                demo.comparison_id, list(demo.context), demo.text, text, None,
                chosen_finished=True, rejected_finished=finished[side], weight=weight, source="demonstration",
            ))
    return pairs


def is_heldout(comparison_id: int, fraction: float) -> bool:
    """Whether a comparison belongs to the held-out set.

    A hash of the id, not a random draw: the same vote stays on the same side
    across rounds, runs and restarts, so held-out accuracy is never measured on
    a vote the model once trained on.
    """
    digest = hashlib.sha256(f"heldout:{comparison_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction  # pragma: no mutate (equivalent mutants)


def split_pairs(pairs: list[PreferencePair], fraction: float) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out), split by comparison id."""
    train = [p for p in pairs if not is_heldout(p.comparison_id, fraction)]
    heldout = [p for p in pairs if is_heldout(p.comparison_id, fraction)]
    return train, heldout


def margin_for(strength: str | None, margin_slightly: float, margin_clearly: float) -> float:
    """The Bradley-Terry margin a stated strength asks for (Llama 2's margin loss, Touvron et al. 2023)."""
    return {"slightly": margin_slightly, "clearly": margin_clearly}.get(strength or "", 0.0)  # pragma: no mutate (any missing key)
