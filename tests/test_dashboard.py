"""Dashboard: the Training tab's refresh on a database with known metrics; what each plot shows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import gradio as gr
import pandas as pd
import pytest
from sqlalchemy import select, update

from rlhf_chat.config import AppConfig
from rlhf_chat.learning.reward import RoundResult
from rlhf_chat.learning.training_loop import LoopStatus
from rlhf_chat.serving.dashboard import (
    REFRESH_OUTPUTS,
    loop_state,
    not_yet,
    recent_events,
    refresh,
    thin,
)
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import Comparison
from tests.test_arena import add_pair

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


class FakeLoop:
    """What the dashboard reads of a TrainingLoop: its status and whether it is paused."""

    def __init__(self, state: str, detail: str = "", last_error: str = "", paused: bool = False):
        self.status = LoopStatus(state=state, detail=detail, last_error=last_error)
        self.paused = paused


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
def sessions(tmp_path):
    return store.open_store(f"sqlite:///{tmp_path / 'dash.db'}")


def fill(sessions) -> None:
    """3 votes, 2 reward rounds (one without held-out pairs), 3 PPO steps, 3 arena votes on v2."""
    with sessions() as session, session.begin():
        add_pair(session, "a", 2, "a")  # arena: the policy won
        add_pair(session, "b", 2, "a")  # arena: the policy lost
        add_pair(session, "a", 2, "tie")  # arena: tie
        add_pair(session, "a", 2, None)  # shown, not voted
        for minute, comparison_id in ((1, 1), (2, 2), (4, 3)):
            session.execute(update(Comparison).where(Comparison.id == comparison_id).values(voted_at=at(minute)))
        common = dict(loss=0.5, mean_margin=0.1, train_pairs=8, seconds=1.0)
        store.add_reward_round(session, version=1, heldout_accuracy=None, heldout_pairs=0, votes=8,
                               created_at=at(5), **common)
        store.add_reward_round(session, version=2, heldout_accuracy=0.75, heldout_pairs=4, votes=20,
                               created_at=at(6), **common)
        for version, reward, kl, gap in ((1, -0.5, 0.0, None), (2, 0.25, 0.4, 0.031), (3, 1.0, 1.5, 0.035)):
            store.add_ppo_step(  # version 1 as recorded before the copy gap was measured
                session, version=version, mean_reward=reward, mean_kl=kl, kl_coef=0.05, policy_loss=0.0,
                value_loss=0.0, clip_fraction=0.0, approx_kl=0.0, entropy=1.0, mean_length=10.0,
                seconds=1.0, created_at=at(6 + version), copy_gap=gap,
            )
        store.add_event(session, "error", "RuntimeError: out of memory\ntraceback")


def naive(minutes: float) -> pd.Timestamp:
    return pd.Timestamp(at(minutes)).tz_localize(None)


def test_refresh_plots_the_known_metrics(sessions):
    fill(sessions)
    out = dict(zip(REFRESH_OUTPUTS, refresh(sessions, FakeLoop("running PPO", "policy v3"))))

    assert out["votes"]["votes"].tolist() == [1, 2, 3]
    assert out["votes"]["time"].tolist() == [naive(1), naive(2), naive(4)]
    # the round without held-out pairs has no accuracy to plot
    assert out["accuracy"][["version", "accuracy", "votes"]].values.tolist() == [[2, 0.75, 20]]
    assert out["accuracy"]["time"].tolist() == [naive(6)]
    assert out["reward"]["mean_reward"].tolist() == [-0.5, 0.25, 1.0]
    assert out["kl"]["mean_kl"].tolist() == [0.0, 0.4, 1.5]
    assert out["version"]["version"].tolist() == [1, 2, 3]
    assert out["version"]["time"].tolist() == [naive(7), naive(8), naive(9)]
    assert out["copy_gap"]["copy_gap"].tolist() == [0.031, 0.035]  # the step without a figure is left out
    assert out["copy_gap"]["time"].tolist() == [naive(8), naive(9)]

    # arena: 1 win, 1 tie, 1 loss on v2 -> p = 0.5; Wilson, n = 3: 1 + z²/n = 2.280533, centre 0.5,
    # half = 1.96 / 2.280533 · sqrt(0.25/3 + 3.8416/36) = 0.859448 · 0.435941 = 0.374669
    arena = out["arena"].set_index("series")
    assert arena.loc["win rate", "win_rate"] == pytest.approx(0.5)
    assert arena.loc["95% low", "win_rate"] == pytest.approx(0.5 - 0.374669, abs=1e-5)
    assert arena.loc["95% high", "win_rate"] == pytest.approx(0.5 + 0.374669, abs=1e-5)
    assert set(arena["version"]) == {2} and set(arena["votes"]) == {3}
    assert "50%" in out["arena_summary"] and "3 blind arena votes" in out["arena_summary"]

    assert "running PPO" in out["loop"] and "policy v3" in out["loop"]
    with sessions() as session:  # what the votes were, and the answers people wrote
        choices = [c.choice for c in session.scalars(select(Comparison).where(Comparison.choice.is_not(None)))]
    a_or_b = sum(c in ("a", "b") for c in choices)
    assert f"**Feedback:** {len(choices)} votes ({a_or_b} for A or B" in out["loop"]
    assert "and 0 written answers." in out["loop"]
    # the public tab says that training hit an error; what it was is for the admin panel
    assert "error" in out["events"] and "out of memory" not in out["events"]
    with sessions() as session:
        full = recent_events(session, details=True)
    assert "out of memory" in full and "traceback" not in full  # the first line only


def test_every_plot_is_drawable_even_on_an_empty_database(sessions):
    plots = {
        "votes": gr.LinePlot(x="time", y="votes"),
        "accuracy": gr.LinePlot(x="time", y="accuracy"),
        "reward": gr.LinePlot(x="time", y="mean_reward"),
        "kl": gr.LinePlot(x="time", y="mean_kl"),
        "version": gr.LinePlot(x="time", y="version"),
        "copy_gap": gr.LinePlot(x="time", y="copy_gap"),
        "arena": gr.LinePlot(x="version", y="win_rate", color="series"),
    }
    empty = dict(zip(REFRESH_OUTPUTS, refresh(sessions, None)))
    assert "off" in empty["loop"] and "No arena votes yet" in empty["arena_summary"]
    fill(sessions)
    full = dict(zip(REFRESH_OUTPUTS, refresh(sessions, None)))
    for name, plot in plots.items():
        for out in (empty, full):
            data = plot.postprocess(out[name])  # raises on a column type the plot cannot draw
            assert data.columns == list(out[name].columns)
    assert full["votes"].dtypes["time"].kind == "M"  # drawn on a time axis


def test_loop_state_shows_pausing_paused_and_errors():
    assert "paused" in loop_state(FakeLoop("paused", paused=True))
    assert "pausing" in loop_state(FakeLoop("running PPO", paused=True))  # the step under way still runs
    text = loop_state(FakeLoop("error", last_error="ValueError: bad"))
    assert "error" in text and "ValueError: bad" in text
    assert "waiting for votes" in loop_state(FakeLoop("waiting for votes", "3/8 votes"))


def test_thin_keeps_ends_and_bounds_points():
    frame = pd.DataFrame({"x": range(1000)})
    thinned = thin(frame, 50)
    assert len(thinned) == 50 and thinned["x"].iloc[0] == 0 and thinned["x"].iloc[-1] == 999
    assert thin(frame.head(3), 50)["x"].tolist() == [0, 1, 2]


def test_behaviour_table_shows_the_policy_against_the_reference(sessions):
    """Shares per behaviour from arena answers (by source) and from the probes, as a person reads them."""
    from rlhf_chat.generation.candidates import Candidate
    from rlhf_chat.serving.dashboard import ProbeAnswers, behaviour_table

    def cand(text, source, finished=True):
        return Candidate(text, source, 2 if source == "policy" else 0, 0, 0.7, 1.0, 64, 5, finished, 0.1)

    with sessions() as session:
        assert list(behaviour_table(session, None).columns) == ["behaviour"]  # nothing to show yet
    with sessions() as session, session.begin():
        for policy_text in ("Could you tell me which one you mean?", "Paris is the capital."):
            store.save_pair(session, session_id="s", context=[{"role": "user", "content": "What is the capital of France?"}], arena=True,
                            a=cand(policy_text, "policy"), b=cand("The capital is Paris, a big city.", "reference", False))
        store.save_pair(session, session_id="s", context=[{"role": "user", "content": "q"}],  # not arena: left out
                        a=cand("Could you tell me more?", "policy"), b=cand("Could you say?", "policy"))
    probes = ProbeAnswers(3, ["p"], ["A dog."], ["Thank you! A dog, for example."])
    with sessions() as session:
        table = behaviour_table(session, probes).set_index("behaviour")
    policy, reference = table["policy (arena, 2 answers)"], table["reference (arena, 2 answers)"]
    assert policy["asks a question"] == 0.5 and reference["asks a question"] == 0.0
    assert policy["finished"] == 1.0 and reference["finished"] == 0.0
    assert reference["words"] == 7.0
    assert table["policy v3 (probes)"]["gives an example"] == 1.0 and table["reference (probes)"]["warm"] == 0.0
    assert pd.isna(table["policy v3 (probes)"]["finished"])  # probes: no finished flags
    # the canned question back never names the capital; both reference answers do
    assert policy["on topic"] == 0.5 and reference["on topic"] == 1.0


def test_mode_table_shows_which_ways_of_answering_people_chose(sessions):
    """Wins and losses per mode from votes between two modes, the most chosen first."""
    from rlhf_chat.generation.candidates import Candidate
    from rlhf_chat.serving.dashboard import mode_table

    def cand(mode):
        return Candidate("An answer.", "policy", 0, 0, 0.7, 1.0, 64, 5, True, 0.1, mode=mode)

    with sessions() as session:
        assert mode_table(session).empty  # no votes between modes yet
    with sessions() as session, session.begin():
        for mode_a, mode_b, choice in [("warm", "direct", "a"), ("warm", "steps", "a"), ("steps", "warm", "a"),
                                       ("direct", "steps", "tie")]:
            pair = store.save_pair(session, session_id="s", context=[{"role": "user", "content": "q"}],
                                   a=cand(mode_a), b=cand(mode_b))
            store.record_vote(session, pair.id, choice)
    with sessions() as session:
        table = mode_table(session)
    assert table.to_dict("list") == {
        "mode": ["warm", "steps", "direct"], "chosen": [2, 1, 0], "not chosen": [1, 1, 1],
        "share chosen": [0.67, 0.5, 0.0],
    }


def test_every_empty_chart_says_why_and_what_it_waits_for(sessions):
    cfg = AppConfig()
    with sessions() as session:
        empty = not_yet(session, cfg)
    assert "Held-out accuracy:** n/a: needs 1 held-out vote" in empty and "0 so far" in empty
    assert f"needs {cfg.loop.min_votes} votes; 0 so far" in empty
    assert "no vote between two response modes" in empty
    loop_md = dict(zip(REFRESH_OUTPUTS, refresh(sessions, FakeLoop("waiting for votes"), cfg=cfg)))["loop"]
    assert empty in loop_md  # shown on the tab, under the loop's state
    fill(sessions)  # a round with a held-out accuracy, PPO steps
    with sessions() as session:
        full = not_yet(session, cfg)
    assert "Held-out accuracy" not in full and "PPO charts" not in full
    # a reward round with no held-out vote says so, wherever its accuracy is shown
    result = RoundResult(version=1, loss=0.5, heldout_accuracy=None, mean_margin=0.0, train_pairs=8,
                         heldout_pairs=0, votes=8, seconds=1.0)
    assert result.accuracy_text() == "n/a (needs 1 held-out vote; 0 so far)"
    result.heldout_accuracy, result.heldout_pairs = 0.75, 4
    assert result.accuracy_text() == "0.75 on 4 held-out votes"


def test_the_win_rate_is_shown_with_what_the_newest_measured_policy_paid_for_it(sessions):
    """The Training tab's arena line carries the tax stored with the newest checkpoint
    that has one (PPOTrainer.record_tax); before any, it says so."""
    empty = dict(zip(REFRESH_OUTPUTS, refresh(sessions, None)))
    assert "no policy saved with it yet" in empty["arena_summary"]
    ref = {"facts": 0.5, "nll": 2.43, "content": 0.93, "asks_instead": 0.0}
    with sessions() as s, s.begin():
        store.add_checkpoint(s, "policy", 5, "/x/5", {"tax": {**ref, "facts": 0.45}, "tax_reference": ref,
                                                       "tax_questions": 16})
        store.add_checkpoint(s, "policy", 10, "/x/10", {"tax": {**ref, "facts": 0.31, "nll": 2.61},
                                                        "tax_reference": ref, "tax_questions": 16})
        store.add_checkpoint(s, "policy", 11, "/x/11", {})  # saved by a rollback: not measured
    shown = dict(zip(REFRESH_OUTPUTS, refresh(sessions, None)))["arena_summary"]
    assert "policy v10" in shown and "facts stated 0.50 → 0.31" in shown and "2.43 → 2.61" in shown
    assert "16 factual questions" in shown
