"""Arena: how often people prefer the current policy to the starting model.

A share of the pairs shown in the chat (``cfg.loop.arena_fraction``) puts the
policy against the reference, blind, on a side drawn at random (see
``candidates.generate_pair``). Which side was the policy is stored with each
candidate (``CandidateRow.source``), so every arena vote is a win, a loss or a
tie for the policy of that version. The votes train the reward model like any
other; here they only give the win-rate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf_chat.storage.tables import CandidateRow, Comparison


@dataclass(frozen=True)
class WinRate:
    """A win-rate with its confidence interval; ``rate`` is NaN when ``n`` is 0."""

    rate: float  # (wins + ties / 2) / n
    low: float
    high: float
    n: int  # wins + ties + losses


def win_rate(wins: int, ties: int, losses: int, z: float = 1.96) -> WinRate:
    """The policy's win-rate, a tie counting as half a win, with the Wilson score interval.

    With p = (wins + ties/2) / n, the Wilson (1927) interval is

        centre = (p + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) · sqrt(p(1 - p)/n + z²/4n²)

    (Wilson, "Probable inference, the law of succession, and statistical
    inference", JASA 22, 1927; recommended over the normal interval for small n
    by Brown, Cai & DasGupta, Statistical Science 16, 2001). Unlike p ± z·sqrt(p(1-p)/n)
    it stays inside [0, 1] and is not zero-width at 0 or n wins, which matters
    here: each policy version gets few arena votes. Counting a tie as half is
    the usual convention of pairwise evaluation (Chatbot Arena, AlpacaEval).
    ``z = 1.96`` gives a 95% interval.

    >>> round(win_rate(0, 0, 10).high, 4)  # z²/n / (1 + z²/n) = 0.38416 / 1.38416
    0.2775
    """
    if min(wins, ties, losses) < 0:
        raise ValueError(f"counts must be >= 0, got {wins}, {ties}, {losses}")
    n = wins + ties + losses
    if n == 0:  # no evidence at all: the interval is the whole range
        return WinRate(float("nan"), 0.0, 1.0, 0)
    p = (wins + ties / 2) / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return WinRate(p, max(0.0, centre - half), min(1.0, centre + half), n)


@dataclass
class ArenaResult:
    """The arena votes on one policy version (or a run of versions, see :func:`bucket_results`)."""

    version: int  # the (last) policy version these votes judged
    first_version: int
    wins: int = 0
    ties: int = 0  # ties and "both bad" alike: neither side was preferred
    losses: int = 0

    @property
    def n(self) -> int:
        """Arena votes counted."""
        return self.wins + self.ties + self.losses

    def win_rate(self, z: float = 1.96) -> WinRate:
        """:func:`win_rate` of these counts."""
        return win_rate(self.wins, self.ties, self.losses, z)


def outcome(choice: str, policy_side: str) -> str:
    """``win``, ``loss`` or ``tie`` for the policy, given the vote and the policy's side.

    "Both bad" counts as a tie: it prefers neither side (Chatbot Arena scores
    its "tie (bothbad)" the same way).

    >>> outcome("a", "a"), outcome("a", "b"), outcome("both_bad", "a")
    ('win', 'loss', 'tie')
    """
    if choice in ("tie", "both_bad"):
        return "tie"
    return "win" if choice == policy_side else "loss"


def arena_results(session: Session) -> list[ArenaResult]:
    """Wins, ties and losses of the policy against the reference, per policy version, oldest first.

    A pair counts only when exactly one side is the policy and the other the
    reference, so a malformed row can never be counted twice.
    """
    query = (
        select(Comparison.id, Comparison.choice, CandidateRow.side, CandidateRow.source, CandidateRow.policy_version)
        .join(CandidateRow, CandidateRow.comparison_id == Comparison.id)
        .where(Comparison.arena.is_(True), Comparison.choice.is_not(None))
    )
    pairs: dict[int, list] = defaultdict(list)
    for comparison_id, choice, side, source, version in session.execute(query):
        pairs[comparison_id].append((choice, side, source, version))
    by_version: dict[int, ArenaResult] = {}
    for rows in pairs.values():
        policy = [r for r in rows if r[2] == "policy"]
        if len(rows) != 2 or len(policy) != 1:
            continue
        choice, side, _, version = policy[0]
        result = by_version.setdefault(version, ArenaResult(version, version))
        kind = outcome(choice, side)
        if kind == "win":
            result.wins += 1
        elif kind == "loss":
            result.losses += 1
        else:
            result.ties += 1
    return [by_version[v] for v in sorted(by_version)]


def bucket_results(results: list[ArenaResult], min_votes: int = 10) -> list[ArenaResult]:
    """Merge consecutive versions until each bucket holds at least ``min_votes`` votes.

    PPO makes a new version every step, so a single version often gets one or
    two arena votes and an interval as wide as [0.2, 1]; pooling neighbours
    gives a readable curve. The last bucket may hold fewer (it is still filling).

    >>> [(r.first_version, r.version, r.n) for r in bucket_results(
    ...     [ArenaResult(1, 1, wins=2), ArenaResult(2, 2, losses=1), ArenaResult(3, 3, ties=3)], min_votes=3)]
    [(1, 2, 3), (3, 3, 3)]
    """
    buckets: list[ArenaResult] = []
    current: ArenaResult | None = None
    for r in results:
        if current is None:
            current = ArenaResult(r.version, r.first_version)
        current.version = r.version
        current.wins += r.wins
        current.ties += r.ties
        current.losses += r.losses
        if current.n >= min_votes:
            buckets.append(current)
            current = None
    if current is not None:
        buckets.append(current)
    return buckets


def total(results: list[ArenaResult]) -> ArenaResult:
    """All the results pooled into one (versions from the first to the last)."""
    pooled = bucket_results(results, min_votes=10**12)
    return pooled[0] if pooled else ArenaResult(0, 0)
