"""Arena: the win-rate with its Wilson interval (against hand-worked numbers), and the
counting of arena votes per policy version from the database."""

from __future__ import annotations

import math

import pytest

from rlhf_chat.generation.candidates import Candidate
from rlhf_chat.storage import store
from rlhf_chat.storage.arena import ArenaResult, arena_results, bucket_results, outcome, total, win_rate

# --- win_rate: hand-worked ---------------------------------------------------------------
#
# Wilson interval, z = 1.96, z² = 3.8416:
#   centre = (p + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)


def test_win_rate_counts_a_tie_as_half_with_the_wilson_interval():
    # 7 wins, 2 ties, 1 loss: n = 10, p = (7 + 1) / 10 = 0.8
    # 1 + z²/n = 1.38416; centre = (0.8 + 0.19208) / 1.38416 = 0.716738
    # p(1-p)/n + z²/4n² = 0.016 + 0.009604 = 0.025604; sqrt = 0.160012
    # half = 1.96 · 0.160012 / 1.38416 = 0.226581
    r = win_rate(7, 2, 1)
    assert r.n == 10
    assert r.rate == pytest.approx(0.8)
    assert r.low == pytest.approx(0.716738 - 0.226581, abs=1e-5)  # 0.490157
    assert r.high == pytest.approx(0.716738 + 0.226581, abs=1e-5)  # 0.943319


def test_win_rate_at_zero_wins_is_not_a_zero_width_interval():
    # p = 0: centre = half = (z²/2n) / (1 + z²/n), so low = 0 and high = (z²/n) / (1 + z²/n)
    # = 0.38416 / 1.38416 = 0.277540
    r = win_rate(0, 0, 10)
    assert r.rate == 0.0
    assert r.low == pytest.approx(0.0, abs=1e-12)
    assert r.high == pytest.approx(0.277540, abs=1e-6)


def test_even_record_is_centred_and_ties_equal_split_wins():
    # 5 wins, 5 losses: p = 0.5, centre = 0.5;
    # half = 1.96 / 1.38416 · sqrt(0.025 + 0.009604) = 1.416021 · 0.186022 = 0.263410
    even = win_rate(5, 0, 5)
    assert even.rate == 0.5
    assert (even.low, even.high) == (pytest.approx(0.5 - 0.263410, abs=1e-6), pytest.approx(0.5 + 0.263410, abs=1e-6))
    assert win_rate(0, 10, 0) == even  # ten ties say exactly what five wins and five losses say


def test_win_rate_edge_cases():
    empty = win_rate(0, 0, 0)
    assert math.isnan(empty.rate) and (empty.low, empty.high, empty.n) == (0.0, 1.0, 0)
    assert win_rate(10, 0, 0).high == 1.0 and win_rate(10, 0, 0).low == pytest.approx(1 - 0.277540, abs=1e-6)
    few, many = win_rate(3, 0, 1), win_rate(300, 0, 100)
    assert few.rate == many.rate and many.high - many.low < few.high - few.low  # more votes, narrower
    assert win_rate(3, 0, 1, z=2.576).low < few.low  # 99% is wider than 95%
    with pytest.raises(ValueError):
        win_rate(-1, 0, 3)


def test_outcome_and_buckets():
    assert [outcome(c, "b") for c in ("a", "b", "tie", "both_bad")] == ["loss", "win", "tie", "tie"]
    results = [ArenaResult(1, 1, wins=4), ArenaResult(2, 2, losses=7), ArenaResult(5, 5, ties=1, wins=1)]
    buckets = bucket_results(results, min_votes=10)
    summary = [(b.first_version, b.version, b.wins, b.ties, b.losses) for b in buckets]
    assert summary == [(1, 2, 4, 0, 7), (5, 5, 1, 1, 0)]
    assert (total(results).n, total(results).wins) == (13, 5) and total([]).n == 0


# --- arena_results: from the database ----------------------------------------------------


def candidate(text: str, source: str, version: int) -> Candidate:
    return Candidate(text, source, version, 0, 0.8, 0.95, 16, 3, True, 0.1)


def add_pair(session, policy_side: str, version: int, choice: str | None, arena: bool = True) -> None:
    policy, reference = candidate("policy says", "policy", version), candidate("reference says", "reference", 0)
    if not arena:
        reference = candidate("policy again", "policy", version)
    a, b = (policy, reference) if policy_side == "a" else (reference, policy)
    pair = store.save_pair(session, session_id="s", context=[{"role": "user", "content": "hi"}], a=a, b=b, arena=arena)
    if choice is not None:
        assert store.record_vote(session, pair.id, choice).ok


def test_arena_results_per_version_from_the_policy_side(tmp_path):
    sessions = store.open_store(f"sqlite:///{tmp_path / 'arena.db'}")
    with sessions() as session, session.begin():
        add_pair(session, "a", 1, "a")  # v1: the policy (A) won
        add_pair(session, "b", 1, "b")  # v1: the policy (B) won
        add_pair(session, "b", 1, "a")  # v1: the reference (A) won
        add_pair(session, "a", 3, "tie")  # v3: tie
        add_pair(session, "b", 3, "both_bad")  # v3: neither preferred, a tie
        add_pair(session, "a", 3, None)  # no vote yet: not counted
        add_pair(session, "a", 3, "a", arena=False)  # policy vs policy: not arena
    with sessions() as session:
        results = arena_results(session)
    assert [(r.version, r.wins, r.ties, r.losses) for r in results] == [(1, 2, 0, 1), (3, 0, 2, 0)]
    assert results[0].win_rate() == win_rate(2, 0, 1)
