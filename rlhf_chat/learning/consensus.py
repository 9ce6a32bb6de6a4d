"""Consensus: what the other contributors prefer, as evidence the suspect did not shape.

The guards (learning/guards.py) flag a contributor whose votes disagree with
what everyone else prefers. Issue 41 showed how that goes wrong when
"everyone else" is a reward model the suspect helped train: an adversary who
always votes for the longer answer is decisive, the first reward model learns
mostly from it, the honest labeler (who ties whenever the lengths are close)
then looks "wrong" against that model and is flagged, and the model is handed
to the attacker. An agreement test against a model the suspect shaped is
circular.

**What this module measures instead: a leave-one-contributor-out consensus.**
For each contributor under suspicion, a tiny logistic regression is fitted on
the decided votes of *everybody else* and then asked about the suspect's own
decided votes:

* **Features** (:func:`answer_features`), read from the two answers' text as a
  person sees them, chosen minus rejected: log word count, empty, finished,
  asks the reader a question, gives an example, a list, warmth markers,
  background, repeats itself, on topic (text/behaviours.py). Votes on
  different prompts never meet on the same pair, so a majority per pair is
  rarely available; these features let votes on different prompts speak to each
  other, at the cost of seeing only what the features see.
* **Left out**: the suspect's whole footprint, every vote of its session *and*
  of any address it used (for an address: of every session behind it), so that
  sibling sessions of one attacker never vouch for each other.
* **Weighted** as training weighs the votes: each other session and address
  holds at most ``guards.max_share`` of all the decided votes' weight (the
  influence cap, as in a reward round), so no single other contributor decides
  what "the others" prefer either; an admin's exclusions weigh nothing.
* **Ties** are no preference: they neither train the consensus nor count
  against anyone. (A crowd that ties everything could otherwise flatten the
  consensus and so unflag itself.)
* **Scored** only where the others have a preference: a vote counts when the
  consensus gives the chosen side at least ``0.5 + guards.consensus_margin`` (an
  agreement) or at most ``0.5 - guards.consensus_margin`` (a disagreement).
  The flag itself (the Wilson rule) stays in guards.py.

It is cheap: one fit on all votes, then one fit per contributor with at least
``guards.min_votes`` decided votes (nobody else can be flagged), each a few
Newton steps from the first fit over about ten features. Pure numpy, no model.

**How an attacker would game it, and what it cannot stop.**

* *One decisive person* (always longer, reversed): the others' consensus stands
  without it, its votes disagree with it, it is flagged. Its own weight in
  everybody else's consensus is capped, so it cannot flip an honest person's
  verdict either.
* *Many sessions behind one address*: a session's footprint includes its
  address, so the siblings are left out together, and the address cap holds
  all of them to one contributor's share of anyone else's consensus.
* *Votes the features cannot see*: where the others' consensus has no
  preference, a vote is not scored. An attacker decisive only there (which
  answer states the right fact, say) is never flagged; the influence cap is
  then what bounds it. A labeler whose taste the features cannot see is
  likewise never flagged: the flag fails towards trust, not towards suspicion.
* *Mimicry*: agreeing more than half the time never flags (the rule asks for
  agreement significantly below chance); what the disagreeing votes teach is
  diluted by the agreeing ones and capped.
* *A crowd of its own*: sessions from many addresses each count as a person.
  As large as a third of the crowd (and decisive where honest people often
  tie, so nearer half of the decided votes), it pulls the consensus towards
  its taste; where the two tastes oppose on a feature the consensus flattens,
  fewer votes are scored, and neither side is flagged. As the majority of the
  decided weight it *defines* the consensus and honest people are flagged: no
  rule of agreement with the others escapes that. The tripwire
  (learning/tripwire.py: most of the feedback silenced, or a jump in the
  weight of contributors the last round did not trust) and the admin are the
  defences then.
"""

from __future__ import annotations

import math

import numpy as np

from rlhf_chat.text.behaviours import (
    asks_question,
    friendliness_score,
    gives_background,
    gives_example,
    is_list,
    loops,
    on_topic,
)

FEATURES = ("log words", "empty", "finished", "asks a question", "gives an example", "list lines", "warmth",
            "background", "loops", "on topic")
MAX_WARMTH = 5  # warmth markers counted at most: a wall of "thanks!" is one feature, not a lever
NEWTON_STEPS = 50  # at most; a fit from a warm start converges in a handful


def answer_features(prompt: str, text: str, finished: bool) -> list[float]:
    """One answer as the consensus sees it, in the order of :data:`FEATURES`.

    Length as log(1 + words): a difference of logs is a relative difference,
    as a reader (and the ``concise`` labeler's 10% band) judges length.

    >>> [round(v, 3) for v in answer_features("Why is the sky blue?", "Could you say why you ask?", True)[:4]]
    [1.946, 0.0, 1.0, 1.0]
    """
    words = len(text.split())
    return [
        math.log1p(words), float(words == 0), float(finished), float(asks_question(text)),
        float(gives_example(text)), float(is_list(text)), float(min(friendliness_score(text), MAX_WARMTH)),
        float(gives_background(text)), float(loops(text)), float(on_topic(prompt, text)),
    ]


def vote_features(prompt: str, chosen: str, rejected: str, chosen_finished: bool = True,
                  rejected_finished: bool = True) -> tuple[float, ...]:
    """A decided vote's evidence: the chosen answer's features minus the rejected one's."""
    a, b = answer_features(prompt, chosen, chosen_finished), answer_features(prompt, rejected, rejected_finished)
    return tuple(x - y for x, y in zip(a, b))


def sigmoid(margin: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large margins."""
    return 0.5 * (1.0 + np.tanh(0.5 * margin))


def fit(x: np.ndarray, weights: np.ndarray, l2: float, start: np.ndarray | None = None) -> np.ndarray:
    """The weighted, L2-penalised logistic regression of "the chosen side wins" on the
    vote features ``x`` (n, d): no intercept, since A and B are shown in random order,
    so every target is 1 and the sign of a coefficient says which way the votes lean.

    Each feature is first scaled to unit root mean square over the votes, so that the
    penalty weighs a length difference (a few tenths of a log) and a behaviour
    difference (-1, 0 or 1) alike. Minimises, on the scaled features,
    -sum_i w_i log sigmoid(theta . x_i) + l2/2 |theta|^2 by Newton's method with step
    halving (the penalty keeps the Hessian positive definite and the optimum finite
    when the votes are separable). Returns theta (d,) on the original features; zeros
    for no votes.

    >>> theta = fit(np.array([[1.0], [1.0], [-1.0]]), np.ones(3), l2=1.0)
    >>> bool(theta[0] > 0)   # two of three votes chose the side with more of the feature
    True
    """
    d = x.shape[1]
    if len(x) == 0 or weights.sum() <= 0:
        return np.zeros(d)
    scale = np.sqrt((x**2).mean(axis=0))
    scale[scale == 0] = 1.0  # a feature no vote differs in stays at 0 through the penalty
    z = x / scale
    theta = np.zeros(d) if start is None else start.astype(float) * scale

    def loss(t: np.ndarray) -> float:
        return float(weights @ np.logaddexp(0.0, -(z @ t)) + 0.5 * l2 * t @ t)

    current = loss(theta)
    for _ in range(NEWTON_STEPS):
        p = sigmoid(z @ theta)
        grad = -(z.T @ (weights * (1.0 - p))) + l2 * theta
        hess = (z * (weights * p * (1.0 - p))[:, None]).T @ z + l2 * np.eye(d)
        step = np.linalg.solve(hess, grad)
        size = 1.0
        while size > 1e-4 and loss(theta - size * step) > current + 1e-12:
            size /= 2  # a full Newton step can overshoot on a logistic loss
        theta = theta - size * step
        new = loss(theta)
        if current - new < 1e-10:
            break
        current = new
    return theta / scale


def footprint(sessions: np.ndarray, clients: np.ndarray, kind: str, key) -> np.ndarray:
    """Which votes a contributor had a hand in: for a session, its own votes and every
    vote from an address it used; for an address, its votes and every vote of a
    session seen behind it. Those are what its consensus must be fitted without.
    Keys are strings or :func:`codes`; no address ("" or :data:`NOBODY`) links nobody.

    >>> sessions, clients = np.array(["s1", "s2", "s3", "s1"]), np.array(["c1", "c1", "c2", ""])
    >>> footprint(sessions, clients, "session", "s1").tolist(), footprint(sessions, clients, "client", "c2").tolist()
    ([True, True, False, True], [False, False, True, False])
    """
    mine, other = (sessions, clients) if kind == "session" else (clients, sessions)
    own = mine == key
    linked = [k for k in np.unique(other[own]) if k != NOBODY and k != ""]  # no address known links nobody
    return own | np.isin(other, linked)


NOBODY = -1  # the code of "" (no address known) in :func:`codes`


def codes(keys: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Keys as small integers (comparing those is what makes a few hundred leave-outs
    cheap), "" as :data:`NOBODY`; and the code of each key."""
    table = {k: i for i, k in enumerate(sorted(set(keys) - {""}))}
    return np.array([table.get(k, NOBODY) for k in keys], dtype=np.int64), table


def leave_out_agreement(
    x: np.ndarray,
    sessions: list[str],
    clients: list[str],
    suspects: list[tuple[str, str]],
    weights: np.ndarray,
    l2: float,
    margin: float,
) -> dict[tuple[str, str], tuple[int, int]]:
    """Per suspect (kind, key), (agreements, scored votes) of its own decided votes with
    the consensus of everyone outside its :func:`footprint`.

    ``x`` holds every decided vote's features (chosen minus rejected) with its session
    and client; ``weights`` what each vote weighs in any consensus: its weight in
    training under the influence cap (0: it trains nothing, an admin's exclusion). A
    vote is scored only where the consensus gives the chosen side ``0.5 + margin`` or
    more (it agrees) or ``0.5 - margin`` or less (it disagrees).
    """
    (session_codes, session_of), (client_codes, client_of) = codes(sessions), codes(clients)
    trusted = weights > 0
    warm = fit(x[trusted], weights[trusted], l2)  # every later fit starts from it: a few Newton steps each
    result = {}
    for kind, key in suspects:
        code = (session_of if kind == "session" else client_of)[key]
        others = trusted & ~footprint(session_codes, client_codes, kind, code)
        theta = fit(x[others], weights[others], l2, start=warm)
        own = (session_codes if kind == "session" else client_codes) == code
        p = sigmoid(x[own] @ theta)
        agreed, disagreed = int((p >= 0.5 + margin).sum()), int((p <= 0.5 - margin).sum())
        result[(kind, key)] = (agreed, agreed + disagreed)
    return result
