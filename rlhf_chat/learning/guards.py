"""Guards: what one contributor, or a few bad ones, can teach the model everyone is served.

On a public demo the votes and written answers train the model, so a person
who votes for the worse answer on purpose, or a handful of scripted clients,
could teach it rudeness within minutes. Three guards, each a plain function
of the stored feedback (no vote is ever changed or deleted by them; they only
decide how much each one weighs in training):

* **Bounded influence** (:func:`cap_factors`): no session and no client
  address carries more than ``guards.max_share`` of a round's training weight.
  With k contributors the bound is at least 1/k, so one person alone (a local
  demo) still trains the model; the excess is down-weighted, not dropped.
* **Agreement with the others** (:func:`agreement_table`): every decided vote is
  compared with the consensus of the *other* contributors (learning/consensus.py:
  a small model of what the others' votes prefer, fitted without the suspect's
  session and address, each other contributor capped at ``guards.max_share``),
  and where votes overlap (arena pairs on the same prompt) with the other
  contributors' majority. A contributor whose agreement is significantly below
  chance (the upper end of its Wilson 95% interval under ``guards.flag_below``)
  after ``guards.min_votes`` scored votes is flagged; its weight becomes
  ``guards.flagged_weight`` (FastChat drops outlier judges the same way). Ties
  say "no preference": they are never scored as disagreement.
  Agreement with the reward model of the round before (``Comparison.rm_agrees``)
  is still shown to the admin, but never flags anyone: that model was trained on
  the suspect's earlier votes, so a decisive attacker captures it and the honest
  crowd then looks wrong against it (issue 41: the honest labeler was flagged and
  the always-longer adversary kept). An agreement test against evidence the
  suspect shaped is circular; consensus.py says how the new one can be gamed.
* **Exclusion** by an admin (``tables.Exclusion``): a session or address whose
  feedback leaves training; it stays in the database and the export, marked.

Written answers pass :func:`written_answer_problems` before they train
anything. The tripwire that pauses the loop is :mod:`rlhf_chat.learning.tripwire`.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from rlhf_chat.config import GuardConfig
from rlhf_chat.learning import consensus
from rlhf_chat.storage.arena import win_rate
from rlhf_chat.text.chat import prompt_text

SESSION, CLIENT = "session", "client"


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of ``successes`` in ``n`` (arena.win_rate's, no ties);
    (0, 1) for no trials.

    >>> [round(v, 3) for v in wilson_interval(2, 20)]
    [0.028, 0.301]
    """
    rate = win_rate(successes, 0, n - successes)
    return rate.low, rate.high


def client_key(address: str | None, salt: str) -> str:
    """A client address as stored: a salted hash (16 hex digits), never the address
    itself; "" when unknown. The same address gives the same key under one salt."""
    if not address:
        return ""
    return hashlib.sha256(f"{salt}:{address}".encode()).hexdigest()[:16]


def cap_level(amounts: list[float], share: float) -> float:
    """The largest level L with ``L <= share * sum(min(a, L))``: capped at L, no
    amount is more than ``share`` of the capped total. ``share`` is raised to
    1 / len(amounts) first (k contributors can each hold 1/k). Returns the largest
    amount when nobody needs capping.

    >>> cap_level([10, 10, 80], 0.5)   # 80 capped to 20: 20 is half of 10 + 10 + 20
    20.0
    >>> cap_level([30, 30, 40], 0.5)   # nobody above half: no cap
    40.0
    """
    positive = [a for a in amounts if a > 0]
    if not positive:
        return 0.0
    share = max(share, 1.0 / len(positive))
    top = max(positive)
    if top <= share * sum(positive) + 1e-12:
        return float(top)
    low, high = 0.0, top  # low satisfies the bound (slope share*k - 1 >= 0 near 0), high does not
    for _ in range(100):
        mid = (low + high) / 2
        if mid <= share * sum(min(a, mid) for a in positive):
            low = mid
        else:
            high = mid
    return low


def cap_factors(amounts: dict[str, float], share: float) -> dict[str, float]:
    """Per contributor, the factor (0..1] that brings its amount down to the cap level.

    >>> cap_factors({"x": 10, "y": 10, "z": 80}, 0.5)
    {'x': 1.0, 'y': 1.0, 'z': 0.25}
    """
    level = cap_level(list(amounts.values()), share)
    return {key: (1.0 if amount <= level or amount <= 0 else level / amount) for key, amount in amounts.items()}


@dataclass
class Feedback:
    """One piece of feedback as the guards see it: who gave it and what it weighs."""

    comparison_id: int
    session: str
    client: str = ""
    weight: float = 1.0  # before the guards: a vote 1, a written answer's pairs loop.demonstration_weight


def influence_factors(items: list[Feedback], share: float) -> list[float]:
    """Per item, the factor that keeps every session's and every client's share of the
    total weight within ``share`` (the smaller of its session's and its client's factor)."""
    factors = [1.0] * len(items)
    for kind in (SESSION, CLIENT):
        totals: dict[str, float] = defaultdict(float)
        for item in items:
            key = getattr(item, kind)
            if key:
                totals[key] += item.weight
        caps = cap_factors(totals, share)
        for i, item in enumerate(items):
            key = getattr(item, kind)
            if key:
                factors[i] = min(factors[i], caps[key])
    return factors


@dataclass
class Vote:
    """A decided vote (A or B better), for the agreement estimates."""

    comparison_id: int
    session: str
    client: str
    prompt: str
    arena: bool
    chose_policy: bool | None  # arena pairs: whether the policy's side won; else None
    rm_agrees: bool | None  # whether the previous reward model preferred the chosen answer; None: not scored
    features: tuple[float, ...] = ()  # consensus.vote_features: chosen minus rejected; () leaves it out


@dataclass
class Contributor:
    """One session or client address: how much it gave, how far others agree with it, and its weight."""

    kind: str  # session | client
    key: str
    votes: int = 0
    written: int = 0
    ties: int = 0  # ties that train (reward.tie_weight > 0)
    rm_scored: int = 0
    rm_agreement: float | None = None  # shown to the admin only: that model learned from the suspect (circular)
    consensus_scored: int = 0  # decided votes where the others' consensus has a preference
    consensus_agreement: float | None = None
    overlaps: int = 0
    majority_agreement: float | None = None
    flagged: bool = False
    excluded: bool = False
    weight: float = 1.0  # what its feedback weighs in training (before the influence cap)
    reasons: list[str] = field(default_factory=list)


def majority_agreement(votes: list[Vote]) -> dict[str, tuple[int, int]]:
    """Per session, (agreements, overlaps) with the other contributors' majority on
    arena pairs of the same prompt. Left out of a vote's majority: its own session and
    every vote from its address, so that sessions behind one address never vouch for
    each other. A prompt where the others are split evenly, or absent, gives no overlap."""
    by_prompt: dict[str, list[Vote]] = defaultdict(list)
    for v in votes:
        if v.arena and v.chose_policy is not None:
            by_prompt[v.prompt].append(v)
    result: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for group in by_prompt.values():
        for v in group:
            others = [o.chose_policy for o in group if o.session != v.session and not (v.client and o.client == v.client)]
            for_policy = sum(others)
            if 2 * for_policy == len(others):
                continue
            result[v.session][1] += 1
            result[v.session][0] += int(v.chose_policy == (2 * for_policy > len(others)))
    return {k: (a, n) for k, (a, n) in result.items()}


@dataclass
class GuardRules:
    """The thresholds (``config.GuardConfig`` carries the defaults, and is their one source)."""

    min_votes: int = GuardConfig.min_votes
    flag_below: float = GuardConfig.flag_below
    flagged_weight: float = GuardConfig.flagged_weight
    max_share: float = GuardConfig.max_share  # each other contributor's cap in a consensus, as in training
    consensus_margin: float = GuardConfig.consensus_margin
    consensus_l2: float = GuardConfig.consensus_l2

    @classmethod
    def from_config(cls, cfg: GuardConfig) -> GuardRules:
        """The rules a ``GuardConfig`` sets."""
        return cls(cfg.min_votes, cfg.flag_below, cfg.flagged_weight, cfg.max_share, cfg.consensus_margin,
                   cfg.consensus_l2)


def assess(agreements: int, n: int, rules: GuardRules) -> bool:
    """Whether ``agreements`` of ``n`` is significantly below ``rules.flag_below``
    (the Wilson interval's upper end under it), with at least ``rules.min_votes``."""
    return n >= rules.min_votes and wilson_interval(agreements, n)[1] < rules.flag_below


def contributions(votes: list[Vote], written: dict[str, int], ties: list[tuple[str, str]]) -> dict:
    """Every contributor (by session and by client) with what it gave: decided votes,
    written answers, ties, and the reward model's agreement tallied (not yet a share)."""
    table: dict[tuple[str, str], Contributor] = {}

    def entry(kind: str, key: str) -> Contributor:
        return table.setdefault((kind, key), Contributor(kind, key))

    for v in votes:
        for kind, key in ((SESSION, v.session), (CLIENT, v.client)):
            if not key:
                continue
            c = entry(kind, key)
            c.votes += 1
            if v.rm_agrees is not None:
                c.rm_scored += 1
                c.rm_agreement = (c.rm_agreement or 0.0) + float(v.rm_agrees)
    for session, n in written.items():
        entry(SESSION, session).written += n
    for session, client in ties:
        for kind, key in ((SESSION, session), (CLIENT, client)):
            if key:
                entry(kind, key).ties += 1
    return table


def consensus_agreement(
    votes: list[Vote], excluded: set[tuple[str, str]], rules: GuardRules
) -> dict[tuple[str, str], tuple[int, int]]:
    """Per contributor with at least ``rules.min_votes`` decided votes (nobody else can
    be flagged), (agreements, scored) with the consensus of everyone outside its
    footprint (consensus.leave_out_agreement). Each vote weighs in a consensus what
    the influence cap (``rules.max_share``) gives it among all decided votes; an
    admin's exclusions weigh nothing."""
    known = [v for v in votes if v.features]
    if not known:
        return {}
    sessions, clients = [v.session for v in known], [v.client for v in known]
    decided = Counter((SESSION, s) for s in sessions) + Counter((CLIENT, c) for c in clients if c)
    suspects = sorted(who for who, n in decided.items() if n >= rules.min_votes)
    capped = influence_factors([Feedback(v.comparison_id, v.session, v.client) for v in known], rules.max_share)
    kept = [(SESSION, s) not in excluded and (CLIENT, c) not in excluded for s, c in zip(sessions, clients)]
    weights = np.array(capped, dtype=float) * np.array(kept, dtype=float)
    x = np.array([v.features for v in known], dtype=float)
    return consensus.leave_out_agreement(x, sessions, clients, suspects, weights, rules.consensus_l2,
                                         rules.consensus_margin)


def agreement_table(
    votes: list[Vote], written: dict[str, int], excluded: set[tuple[str, str]], rules: GuardRules,
    ties: list[tuple[str, str]] = (),
) -> dict[tuple[str, str], Contributor]:
    """Every contributor (by session and by client), its agreement, flag and weight.

    ``written`` counts written answers per session; ``ties`` holds (session, client)
    of each tie that trains, so that somebody who only ties is a contributor too
    (an exclusion must reach their ties); ``excluded`` holds the (kind, key) an
    admin excluded. A flagged contributor's weight is ``rules.flagged_weight``; an
    excluded one's is 0. Agreement is judged on decided votes only, against the
    others (their consensus, their majority on shared arena prompts); the reward
    model's agreement is shown, never acted on (this module's docstring says why).
    """
    table = contributions(votes, written, ties)
    majority = majority_agreement(votes)
    others = consensus_agreement(votes, excluded, rules)
    for (kind, key), c in table.items():
        c.rm_agreement = c.rm_agreement / c.rm_scored if c.rm_scored else None
        if (kind, key) in others:
            agreed, c.consensus_scored = others[(kind, key)]
            c.consensus_agreement = agreed / c.consensus_scored if c.consensus_scored else None
            if assess(agreed, c.consensus_scored, rules):
                c.reasons.append(f"agrees with the other contributors' consensus on {agreed} of its "
                                 f"{c.consensus_scored} votes where they have a preference")
        if kind == SESSION and key in majority:
            agreed, c.overlaps = majority[key]
            c.majority_agreement = agreed / c.overlaps if c.overlaps else None
            if assess(agreed, c.overlaps, rules):
                c.reasons.append(f"agrees with the others' majority on {agreed} of {c.overlaps} shared arena prompts")
        c.flagged = bool(c.reasons)
        c.excluded = (kind, key) in excluded
        c.weight = 0.0 if c.excluded else (rules.flagged_weight if c.flagged else 1.0)
    return table


def feedback_weights(
    items: list[Feedback], table: dict[tuple[str, str], Contributor], share: float, enabled: bool = True
) -> list[float]:
    """The training weight of each item: its own weight times its contributors' weights
    (flags, exclusions) times the influence cap. With ``enabled`` False, exclusions by
    an admin still hold; flags and the cap do not (the simulation's guards-off arm)."""
    weights = []
    for item in items:
        w = item.weight
        for kind in (SESSION, CLIENT):
            c = table.get((kind, getattr(item, kind)))
            if c is not None:
                w *= (0.0 if c.excluded else 1.0) if not enabled else c.weight
        weights.append(w)
    if not enabled:
        return weights
    kept = [Feedback(i.comparison_id, i.session, i.client, w) for i, w in zip(items, weights)]
    return [w * f for w, f in zip(weights, influence_factors(kept, share))]


# --- written answers -----------------------------------------------------------------

LINK = re.compile(r"(https?://|www\.|\b[a-z0-9-]+\.(com|net|org|io|ru|cn|info|biz|xyz|ly)\b)", re.IGNORECASE)
EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")
PHONE = re.compile(r"(?<!\w)\+?\d[\d\s().-]{7,}\d(?!\w)")


def normalized(text: str) -> str:
    """A written answer as compared for duplicates: case-folded, spaces collapsed."""
    return " ".join(text.casefold().split())


def written_answer_problems(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Why a written answer must not train anything ([] when it may): too short or
    too long, or it holds a link, an e-mail address or a phone number (kept for the
    admin, never learned: a model that learns them repeats them to everyone)."""
    problems = []
    stripped = text.strip()
    if len(stripped) < min_chars:
        problems.append(f"shorter than {min_chars} characters")
    if len(stripped) > max_chars:
        problems.append(f"longer than {max_chars} characters")
    if LINK.search(stripped):
        problems.append("holds a link")
    if EMAIL.search(stripped):
        problems.append("holds an e-mail address")
    if PHONE.search(stripped):
        problems.append("holds a phone number")
    return problems


def duplicate_sessions(answers: list[tuple[str, str]]) -> set[int]:
    """Indices of written answers (session, text) whose text another session also
    wrote: the same words from several sessions is one voice, or a script."""
    sessions_of: dict[str, set[str]] = defaultdict(set)
    for session, text in answers:
        sessions_of[normalized(text)].add(session)
    return {i for i, (_, text) in enumerate(answers) if len(sessions_of[normalized(text)]) > 1}


# --- from the store ------------------------------------------------------------------


@dataclass
class Trust:
    """What the guards decided for the feedback in the store, for one round."""

    contributors: dict[tuple[str, str], Contributor]
    vote_factor: dict[int, float]  # comparison id -> factor on its vote's weight (0: left out)
    written_factor: dict[int, float]  # comparison id -> factor on its written answer's weight
    held_back: dict[int, list[str]]  # demonstration id -> why it trains nothing
    excluded_comparisons: set[int] = field(default_factory=set)  # feedback of excluded contributors
    # every piece of feedback (its weight before the guards) with its weight after them: the tripwire reads it
    weighed: list[tuple[Feedback, float]] = field(default_factory=list)

    def vote_weight(self, comparison_id: int) -> float:
        """The factor on one vote (1 where the guards know nothing of it)."""
        return self.vote_factor.get(comparison_id, 1.0)

    def written_weight(self, comparison_id: int) -> float:
        """The factor on the written answer of one pair (1 where the guards know nothing of it)."""
        return self.written_factor.get(comparison_id, 1.0)


def policy_won(comparison) -> bool | None:
    """On an arena pair, whether the vote chose the policy's side; None elsewhere."""
    if not comparison.arena or comparison.choice not in ("a", "b"):
        return None
    sources = {row.side: row.source for row in comparison.candidates}
    return sources.get(comparison.choice) == "policy"


def prompt_of(context: list[dict]) -> str:
    """The last user turn of a context: what an overlap between two votes is keyed on."""
    return normalized(prompt_text(context))


def vote_of(comparison) -> Vote:
    """A decided comparison as the guards see it, with its consensus features."""
    sides = {row.side: row for row in comparison.candidates}
    finished = {side: bool(sides[side].finished) if side in sides else True for side in ("a", "b")}
    texts = {"a": comparison.response_a, "b": comparison.response_b}
    chosen, rejected = comparison.choice, "b" if comparison.choice == "a" else "a"
    prompt = prompt_text(comparison.context)
    features = consensus.vote_features(prompt, texts[chosen], texts[rejected], finished[chosen], finished[rejected])
    return Vote(comparison.id, comparison.session_id, comparison.client or "", prompt_of(comparison.context),
                bool(comparison.arena), policy_won(comparison), comparison.rm_agrees, features)


def held_back_answers(written, cfg) -> dict[int, list[str]]:
    """Written answer id -> why it trains nothing: :func:`written_answer_problems`, or
    another session wrote the same text."""
    duplicates = duplicate_sessions([(d.session_id, d.text) for d in written])
    held_back: dict[int, list[str]] = {}
    for i, d in enumerate(written):
        problems = written_answer_problems(d.text, cfg.written_min_chars, cfg.written_max_chars)
        if i in duplicates:
            problems.append("another session wrote the same text")
        if problems:
            held_back[d.id] = problems
    return held_back


def assess_feedback(
    session, cfg, demonstration_weight: float = 1.0, tie_weight: float = 0.0, through: int | None = None
) -> Trust:
    """The guards over every vote and written answer in the store (``cfg``: a ``config.GuardConfig``),
    or, with ``through``, over those on comparisons up to that id (what a reward round
    with that ``trained_through`` mark saw: the tripwire compares two rounds).

    Ties train the reward model too when ``tie_weight`` is above 0: each then
    counts in its contributor's influence (so nobody flattens the reward model
    with ties past the cap) and its factor is in ``vote_factor``; agreement is
    judged on decided votes only.

    Exclusions by an admin always hold; flags and the influence cap only with
    ``cfg.enabled``. Written answers that fail :func:`written_answer_problems`,
    or that another session wrote word for word, are held back whatever the setting.
    """
    from rlhf_chat.storage import store

    limit = float("inf") if through is None else through
    voted = [c for c in store.voted_comparisons(session) if c.id <= limit]
    decided = [c for c in voted if c.choice in ("a", "b")]
    ties = [c for c in voted if c.choice == "tie"] if tie_weight > 0 else []
    written = [d for d in store.demonstrations(session) if d.comparison_id <= limit]
    excluded = {(e.kind, e.key) for e in store.exclusions(session)}
    held_back = held_back_answers(written, cfg)
    trained_written = [d for d in written if d.id not in held_back]
    per_session = Counter(d.session_id for d in trained_written)
    table = agreement_table([vote_of(c) for c in decided], dict(per_session), excluded, GuardRules.from_config(cfg),
                            [(c.session_id, c.client or "") for c in ties])
    items = [Feedback(c.id, c.session_id, c.client or "", 1.0) for c in decided]
    items += [Feedback(c.id, c.session_id, c.client or "", tie_weight) for c in ties]
    n_votes = len(items)
    # a written answer is two reward pairs (over each candidate) of demonstration_weight each
    items += [Feedback(d.comparison_id, d.session_id, d.client or "", 2 * demonstration_weight) for d in trained_written]
    weights = feedback_weights(items, table, cfg.max_share, cfg.enabled)
    factors = [w / item.weight if item.weight else 0.0 for item, w in zip(items, weights)]
    vote_factor = {item.comparison_id: f for item, f in zip(items[:n_votes], factors[:n_votes])}
    written_factor = {item.comparison_id: f for item, f in zip(items[n_votes:], factors[n_votes:])}
    left_out = {
        item.comparison_id for item in items
        for kind in (SESSION, CLIENT) if (kind, getattr(item, kind)) in excluded
    }
    return Trust(table, vote_factor, written_factor, held_back, left_out, list(zip(items, weights)))
