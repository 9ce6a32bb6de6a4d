"""The simulation's crowd (issue 41): honest votes from many people, the adversary from
one session, from sessions behind one address, or from many addresses; the built-in
adversaries ``longer`` and ``shorter``."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rlhf_chat.evaluation.labelers import longer, shorter
from rlhf_chat.evaluation.simulate import ADVERSARY, Crowd, load_adversary, simulate
from rlhf_chat.learning.guards import client_key
from rlhf_chat.storage import store


def test_the_built_in_adversaries_are_decisive_by_length():
    short, long_ = "Rain is water.", "Rain is water that falls from the clouds above us."
    assert (longer("q", short, long_), longer("q", long_, short)) == ("b", "a")
    assert (shorter("q", short, long_), shorter("q", long_, short)) == ("a", "b")
    # no tie band: one word more decides it; only equal word counts tie
    assert longer("q", "one two three four five six seven eight nine ten", "one two three four five six seven "
                  "eight nine ten eleven") == "b"
    assert longer("q", "a b", "c d") == shorter("q", "a b", "c d") == "tie"
    assert shorter("q", "", "Something.") == "a"  # an empty answer is the shortest: a bad actor takes it
    assert load_adversary("longer", shorter) is longer and load_adversary("shorter", longer) is shorter
    assert load_adversary("reversed", shorter)("q", short, long_) == "b"
    with pytest.raises(ValueError, match="longer, reversed|adversary"):
        load_adversary("nobody", shorter)


def test_a_crowd_spreads_the_votes_over_its_people_and_the_adversarys_sessions_over_its_addresses():
    crowd = Crowd("sim", people=20, adversary_sessions=10, adversary_addresses=1, salt="s", seed=3)
    honest = Counter(crowd.honest() for _ in range(2000))
    assert len(honest) == 20 and min(honest.values()) > 50  # every person votes, about 100 each
    assert len({session for session, _ in honest}) == len({client for _, client in honest}) == 20
    assert all(client == client_key(f"person-{int(session[-2:])}", "s") for session, client in honest)
    tabs = Counter(crowd.adversary() for _ in range(500))
    assert len({session for session, _ in tabs}) == 10 and {client for _, client in tabs} == {client_key(f"{ADVERSARY}-0", "s")}
    spread = Crowd("sim", adversary_sessions=10, adversary_addresses=10, salt="s")
    pairs = {spread.adversary() for _ in range(500)}
    assert len(pairs) == 10 and len({client for _, client in pairs}) == 10  # one address each
    assert Crowd("sim").honest() == ("sim", "")  # one person: the single voice of old
    assert Crowd("sim").adversary() == ("sim-adversary", client_key("adversary-0", ""))
    for bad in ({"people": 0}, {"adversary_sessions": 0}, {"adversary_sessions": 2, "adversary_addresses": 3}):
        with pytest.raises(ValueError):
            Crowd("sim", **bad)


def test_the_crowd_draw_leaves_the_runs_own_random_stream_alone():
    """Who votes comes from a stream of its own: the pairs and votes of a seed stay the
    single voice's, so a crowd run differs from the old one only in who cast each vote."""
    a, b = Crowd("x", people=20, seed=1), Crowd("x", people=20, seed=1)
    assert [a.honest() for _ in range(30)] == [b.honest() for _ in range(30)]
    assert [Crowd("x", people=20, seed=2).honest() for _ in range(5)] != [a.honest() for _ in range(5)]


def test_a_simulated_crowd_stores_each_vote_under_its_person_and_reports_them(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.reward.steps_per_round, cfg.reward.min_pairs = 2, 1
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs = 2, 2, 1
    cfg.simulation.rounds, cfg.simulation.batch_prompts = 1, 8
    cfg.simulation.tax_fact_questions, cfg.simulation.tax_answers_per_question = 1, 1
    cfg.simulation.people, cfg.simulation.adversary_sessions, cfg.simulation.adversary_addresses = 4, 3, 1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"question {i} about topic {i % 3}?" for i in range(30)))
    report = simulate(cfg, "concise", comparisons=24, ppo_steps=0, prompts_file=str(prompts), report_path=None,
                      adversary_spec="longer", adversary_share=0.5, seed=5)
    with store.open_store(cfg.store.db_url)() as session:
        voted = store.voted_comparisons(session)
    honest = {(c.session_id, c.client) for c in voted if ADVERSARY not in c.session_id}
    bad = {(c.session_id, c.client) for c in voted if ADVERSARY in c.session_id}
    assert 1 < len(honest) <= 4 and all(s.startswith("simulate-5-person") and len(c) == 16 for s, c in honest)
    assert 1 < len(bad) <= 3 and len({c for _, c in bad}) == 1  # three tabs, one address
    assert report.votes["adversary"] == sum(ADVERSARY in c.session_id for c in voted) > 0
    assert {r["key"] for r in report.contributors} == {s for s, _ in honest | bad}
    assert {r["key"] for r in report.addresses} == {c for _, c in honest | bad}
    assert report.settings["simulation"]["people"] == 4 and "consensus_margin" in report.settings["guards"]


def test_label_noise_flips_a_share_of_decided_votes_and_keeps_ties_and_voters():
    noisy, clean = Crowd("x", people=20, seed=4, label_noise=0.25), Crowd("x", people=20, seed=4)
    cast = [noisy.noisy("a") for _ in range(2000)]
    assert 0.22 < cast.count("b") / 2000 < 0.28 and noisy.flipped == cast.count("b")
    assert {noisy.noisy(c) for c in ("tie", "both_bad", "demonstration") for _ in range(50)} == {
        "tie", "both_bad", "demonstration"}
    assert [noisy.honest() for _ in range(30)] == [clean.honest() for _ in range(30)]  # the same people vote
    assert [clean.noisy("a") for _ in range(100)] == ["a"] * 100 and clean.flipped == 0
    for bad in (-0.1, 0.5, 1.0):
        with pytest.raises(ValueError, match="label_noise"):
            Crowd("x", label_noise=bad)


def always_a(prompt: str, a: str, b: str) -> str:
    """A labeler for the noise test: always A."""
    return "a"


def test_label_noise_set_on_the_command_line_flips_stored_honest_votes(tiny_config, tmp_path, capsys):
    from rlhf_chat.cli import main as cli_main

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"question {i}?" for i in range(30)))
    report = tmp_path / "noisy.json"
    with pytest.raises(SystemExit) as done:
        cli_main(["simulate", "--labeler", "tests.test_crowd:always_a", "--comparisons", "40", "--ppo-steps", "0",
                  "--label-noise", "0.25", "--set", "reward.min_pairs=1000", "--set", "sampling.max_new_tokens=4",
                  "--set", "simulation.tax_fact_questions=1", "--set", "simulation.tax_answers_per_question=1",
                  "--set", "loop.arena_fraction=0", "--set", "loop.mode_fraction=0",
                  "--model", tiny_config.model.name, "--db", tiny_config.store.db_url,
                  "--checkpoints", tiny_config.store.checkpoint_dir, "--prompts", str(prompts), "--report", str(report)])
    assert done.value.code == 0
    saved = json.loads(report.read_text())
    with store.open_store(tiny_config.store.db_url)() as session:
        choices = Counter(c.choice for c in store.voted_comparisons(session))
    assert saved["settings"]["simulation"]["label_noise"] == 0.25
    assert 0 < choices["b"] == saved["flipped_votes"] == saved["votes"]["b"] < choices["a"] == saved["votes"]["a"]
    with pytest.raises(SystemExit) as refused:
        cli_main(["simulate", "--labeler", "concise", "--comparisons", "2", "--label-noise", "0.7",
                  "--model", tiny_config.model.name, "--db", f"sqlite:///{tmp_path / 'other.db'}",
                  "--prompts", str(prompts), "--report", str(tmp_path / "x.json")])
    assert refused.value.code == 2 and "label_noise" in capsys.readouterr().err
