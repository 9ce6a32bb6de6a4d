"""The others' consensus (learning/consensus.py): the features, the fit checked by hand,
the footprint a leave-out removes, and agreement scored only where the others lean."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_chat.learning.consensus import (
    FEATURES,
    answer_features,
    fit,
    footprint,
    leave_out_agreement,
    sigmoid,
    vote_features,
)


def test_a_votes_features_are_the_chosen_answers_minus_the_rejected_ones():
    prompt = "How do I bake bread?"
    chosen, rejected = "Mix flour, water and yeast. What flour do you have?", "Bake it."
    diff = dict(zip(FEATURES, vote_features(prompt, chosen, rejected, True, False)))
    assert diff["log words"] == pytest.approx(math.log(11) - math.log(3))
    assert diff["asks a question"] == 1.0 and diff["finished"] == 1.0 and diff["empty"] == 0.0
    assert answer_features(prompt, "", True)[FEATURES.index("empty")] == 1.0
    assert vote_features(prompt, rejected, chosen, False, True) == tuple(-v for v in diff.values())


def test_the_fit_solves_its_first_order_condition_by_hand():
    # One feature, votes at x = 1, 1, -1 and penalty 0.5; the feature's root mean square is
    # 1, so no scaling. With weights w1, w2, w3 the optimum t solves
    # d/dt [w1 log(1 + e^-t) + w2 log(1 + e^-t) + w3 log(1 + e^t) + 0.25 t^2] = 0, i.e.
    # -(w1 + w2)(1 - s(t)) + w3 s(t) + 0.5 t = 0.
    # Weights 1, 1, 2: -2 + 4 s(t) + 0.5 t = 0, root t = 0 (as many weighted votes each way).
    x, w = np.array([[1.0], [1.0], [-1.0]]), np.array([1.0, 1.0, 2.0])
    assert fit(x, w, l2=0.5)[0] == pytest.approx(0.0, abs=1e-9)
    # weights 2, 1, 1: -3 + 4 s(t) + 0.5 t = 0, whose root (bisection by hand) is 0.68362
    t = fit(x, np.array([2.0, 1.0, 1.0]), l2=0.5)[0]
    assert 4 * float(sigmoid(np.array(t))) - 3 + 0.5 * t == pytest.approx(0.0, abs=1e-9)
    assert t == pytest.approx(0.68362, abs=1e-5)
    # scaled features: the same votes at x = 0.1 give the same verdict (margin t x unchanged)
    assert fit(x * 0.1, np.array([2.0, 1.0, 1.0]), l2=0.5)[0] * 0.1 == pytest.approx(t, abs=1e-6)
    # separable votes stay finite under the penalty; no votes, no lean
    assert np.isfinite(fit(np.array([[1.0], [2.0]]), np.ones(2), l2=1.0)).all()
    assert fit(np.zeros((0, 3)), np.zeros(0), l2=1.0).tolist() == [0.0, 0.0, 0.0]


def test_a_footprint_takes_a_session_with_its_addresses_and_an_address_with_its_sessions():
    sessions = np.array(["s1", "s2", "s3", "s1", "s4"])
    clients = np.array(["c1", "c1", "c2", "", ""])
    assert footprint(sessions, clients, "session", "s1").tolist() == [True, True, False, True, False]
    assert footprint(sessions, clients, "client", "c1").tolist() == [True, True, False, True, False]
    assert footprint(sessions, clients, "session", "s4").tolist() == [False, False, False, False, True]


def test_a_suspect_is_judged_without_itself_and_only_where_the_others_lean():
    # three people prefer the shorter answer (feature: log-length difference, chosen minus
    # rejected, negative); "long" always chose the longer one, with more votes than all of them
    rng = np.random.default_rng(0)
    rows, sessions = [], []
    for who, n, sign in (("p1", 20, -1), ("p2", 20, -1), ("p3", 20, -1), ("long", 100, 1)):
        for _ in range(n):
            rows.append([sign * rng.uniform(0.2, 1.0)])
            sessions.append(who)
    x, clients = np.array(rows), [f"addr-{s}" for s in sessions]
    suspects = [("session", "long"), ("session", "p1")]
    result = leave_out_agreement(x, sessions, clients, suspects, np.ones(len(x)), l2=1.0, margin=0.1)
    assert result[("session", "long")] == (0, 100)  # the others all lean short: every vote disagrees
    # p1's others: p2, p3 and "long", whose 100 votes outweigh 40 here (no cap given): p1
    # disagrees wherever they lean far enough (its smallest differences fall inside the margin)
    agreed, scored = result[("session", "p1")]
    assert agreed == 0 and 10 <= scored <= 20
    # capped as in training (long weighs what one person does), p1 agrees with the others
    capped = np.array([0.2 if s == "long" else 1.0 for s in sessions])
    agreed, scored = leave_out_agreement(x, sessions, clients, suspects, capped, 1.0, 0.1)[("session", "p1")]
    assert agreed == scored >= 10
    # a vote the others have no lean on (no feature differs) is not scored, either way
    flat = leave_out_agreement(np.zeros_like(x), sessions, clients, suspects, capped, 1.0, 0.1)
    assert flat[("session", "long")] == (0, 0)
