"""The headless simulation end to end on the tiny model, and its pieces."""

from __future__ import annotations

import json

import pytest

from rlhf_chat.cli import main as cli_main
from rlhf_chat.evaluation.simulate import (
    is_eval_prompt,
    load_prompts,
    sample_pairs,
    simulate,
    split_evenly,
    split_prompts,
)
from rlhf_chat.generation.candidates import Sampling
from rlhf_chat.generation.modes import ModeDraw
from rlhf_chat.storage import store

# For the command-line runs, which start from the defaults: short answers and a small
# tax measure, as tiny_config's, so that each run takes seconds (64-token answers of
# the tiny model, which never ends one, and 80 tax answers made them 14-29 s each).
QUICK = ["--set", "sampling.max_new_tokens=12", "--set", "simulation.tax_fact_questions=2",
         "--set", "simulation.tax_answers_per_question=1"]
REPORT_FIELDS = {
    "rm_heldout_accuracy", "win_rate_vs_reference", "mean_kl", "comparisons", "ppo_steps", "wall_seconds",
    "reward_curve", "kl_curve", "votes", "eval_counts", "win_rate_interval", "rounds", "reward_rounds",
    "eval_answers", "behaviour_reference", "behaviour_policy", "behaviour_rounds", "opening_repeats",
    "reward_length_corr", "mode_pairs", "ppo_seconds", "ppo_steps_run", "ppo_stops", "tripwire", "alignment_tax", "kinds",
}


def test_prompt_split_is_stable_and_disjoint():
    prompts = load_prompts()
    train, held = split_prompts(prompts)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(prompts)
    assert 0.1 < len(held) / len(prompts) < 0.3
    assert [p for p in prompts if is_eval_prompt(p)] == held


def test_split_evenly_shares_out_every_item_larger_shares_first():
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(60, 4) == [15, 15, 15, 15]
    assert split_evenly(3, 4) == [1, 1, 1, 0]
    assert split_evenly(0, 2) == [0, 0]


def test_sample_pairs_puts_the_reference_on_one_side_of_an_arena_pair(tiny_models):
    prompts = ["What is rain?", "Name a fruit.", "Why is the sky blue?"]
    pairs = sample_pairs(tiny_models, prompts, Sampling(max_new_tokens=4, temperature=1.0, seed=3), arena=[True, False, True])
    assert len(pairs) == 3
    assert sorted(c.source for c in pairs[0]) == ["policy", "reference"]
    assert [c.source for c in pairs[1]] == ["policy", "policy"]
    assert sorted(c.source for c in pairs[2]) == ["policy", "reference"]
    assert all(c.policy_version == 0 for pair in pairs for c in pair if c.source == "reference")


def test_simulation_end_to_end_on_the_tiny_model(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.reward.steps_per_round, cfg.reward.min_pairs = 4, 1
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs = 4, 4, 1
    cfg.simulation.rounds = 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"question {i} about topic {i % 3}?" for i in range(40)))
    report_path = tmp_path / "report.json"
    key, well_formed = tmp_path / "key.json", tmp_path / "answers.json"  # --fact-key, --reference-answers
    key.write_text(json.dumps({"What is the capital of Peru?": ["lima"], "Capital of Peru?": ["lima"],
                               "Who wrote Hamlet?": ["shakespeare"]}))
    well_formed.write_text(json.dumps([["What is rain?", "Rain is water that falls from the clouds."]]))
    cfg.simulation.tax_answers_per_question = 3
    report = simulate(cfg, "concise", comparisons=12, ppo_steps=3, prompts_file=str(prompts), report_path=report_path,
                      fact_key_path=str(key), reference_answers_path=str(well_formed))

    saved = json.loads(report_path.read_text())
    # the alignment tax beside the win-rate: two facts in that key, three answers to each, one answer's NLL
    tax = saved["alignment_tax"]
    assert (tax["fact_questions"], tax["fact_answers"], tax["nll_answers"]) == (2, 6, 1)
    for side in ("reference", "policy"):
        assert tax[side].keys() == {"facts", "nll", "content", "asks_instead"} and tax[side]["nll"] > 0
    assert saved["kinds"].keys() == {"fact", "how_to", "concept"}
    assert REPORT_FIELDS <= saved.keys()
    assert saved["comparisons"] == 12 and saved["ppo_steps"] == 3 and len(saved["reward_curve"]) == 3
    assert saved["ppo_steps_run"] == 3 and saved["ppo_stops"] == [] and saved["tripwire"] is None  # within the bounds
    assert 0.0 <= saved["win_rate_vs_reference"] <= 1.0 and saved["wall_seconds"] > 0
    assert saved["ppo_seconds"].keys() == {"rollout", "score", "update"}
    # the phases are timed inside the PPO stage; the stage's total is rounded to 0.1 s, each phase to 0.01 s
    assert 0 < sum(saved["ppo_seconds"].values()) <= saved["seconds"]["ppo"] + 0.05 + 3 * 0.005 + 1e-9
    assert sum(saved["eval_counts"].values()) == report.eval_prompts
    assert report_path.with_suffix(".png").stat().st_size > 1000  # the reward-curve plot
    sessions = store.open_store(cfg.store.db_url)
    with sessions() as session:
        voted = store.voted_comparisons(session)
        assert len(voted) == 12 and all(c.source == "simulate" for c in voted)
        assert sum(saved["votes"].values()) == 12
        assert {c.choice for c in voted} <= {"a", "b", "tie", "both_bad"}
        assert len(store.ppo_steps(session)) == 3
    # rounds, as the live loop takes turns: 3 pairs, a reward round, a PPO step; four times
    after = [r["after_ppo_steps"] for r in saved["reward_rounds"]]
    assert saved["rounds"] == 4 and len(after) >= 2
    assert after == sorted(set(after)) and after[-1] == 3  # PPO ran between reward rounds, not all at the end
    # what was learned, beyond a win-rate: behaviours, the answers themselves, opening repeats
    answers = saved["eval_answers"]
    assert len(answers) == report.eval_prompts
    assert all({"prompt", "policy", "reference", "choice"} <= a.keys() for a in answers)
    assert {a["choice"] for a in answers} <= {"policy", "reference", "tie", "both_bad"}
    verdicts = [a["choice"] for a in answers]
    assert verdicts.count("policy") == saved["eval_counts"]["wins"]
    assert verdicts.count("reference") == saved["eval_counts"]["losses"]
    for shares in (saved["behaviour_reference"], saved["behaviour_policy"]):
        assert {"words", "finished", "asks a question", "gives an example", "list lines", "warm", "loops",
                "on topic"} <= shares.keys()
    assert saved["behaviour_reference"]["words"] == pytest.approx(
        sum(len(a["reference"].split()) for a in answers) / len(answers))
    assert len(saved["behaviour_rounds"]) >= 1 and {"asks a question", "on topic"} <= saved["behaviour_rounds"][-1]["policy"].keys()
    assert {"policy", "reference"} <= saved["opening_repeats"].keys()
    assert saved["mode_pairs"]["pairs"] == 12 and saved["mode_pairs"]["mode_pairs"] >= 1  # half of the policy pairs
    assert report_path.with_suffix(".behaviours.png").stat().st_size > 1000


def test_later_rounds_collect_pairs_from_the_updated_policy(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config
    cfg.reward.steps_per_round, cfg.reward.min_pairs = 2, 1
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs = 2, 2, 1
    cfg.simulation.rounds, cfg.simulation.batch_prompts = 2, 4
    cfg.loop.arena_fraction = 1.0  # every pair after the first update is policy vs reference
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"question {i}?" for i in range(30)))
    # an always-"a" labeler: every vote is usable, so the first round always trains
    (tmp_path / "always_a_labeler.py").write_text("def always_a(prompt, a, b):\n    return 'a'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    simulate(cfg, "always_a_labeler:always_a", comparisons=8, ppo_steps=2, prompts_file=str(prompts), report_path=None)
    sessions = store.open_store(cfg.store.db_url)
    with sessions() as session:
        voted = store.voted_comparisons(session)
    first, second = voted[:4], voted[4:]
    assert all(not c.arena and c.policy_version_a == c.policy_version_b == 0 for c in first)
    assert all(c.arena for c in second)
    assert all(max(c.policy_version_a, c.policy_version_b) == 1 for c in second)  # after the round's PPO step


def test_sample_pairs_writes_mode_pairs_in_their_modes_and_refuses_modes_in_the_arena(tiny_models):
    prompts = ["What is rain?", "Name a fruit."]
    modes = [(ModeDraw("follow_up", "Could you tell me"), ModeDraw("warm", "Thank you for asking!")), None]
    sampling = Sampling(max_new_tokens=4, temperature=1.0, seed=3)
    (a, b), (c, d) = sample_pairs(tiny_models, prompts, sampling, modes=modes)
    assert (a.mode, b.mode, c.mode, d.mode) == ("follow_up", "warm", "", "")
    assert a.text.startswith("Could you tell me") and b.text.startswith("Thank you for asking!")
    with pytest.raises(ValueError, match="arena"):
        sample_pairs(tiny_models, prompts, sampling, arena=[True, False], modes=modes)


def test_pearson_and_opening_share_by_hand():
    from rlhf_chat.evaluation.simulate import opening_share, pearson
    from rlhf_chat.generation.modes import Mode

    assert pearson([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 1], [1, 2]) is None and pearson([1], [1]) is None
    modes = [Mode("m", "", ("Could you tell me",)), Mode("d", "")]
    assert opening_share(["Could you tell me more?", "Yes.", "I could you tell me"], modes) == pytest.approx(1 / 3)


def test_unknown_labeler_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="concise"):
        simulate(tiny_config, "no_such_labeler", comparisons=1, ppo_steps=0, report_path=None)


def test_cli_simulate_writes_the_report(tiny_config, tmp_path, capsys):
    report = tmp_path / "r.json"
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"ask {i}" for i in range(20)))
    with pytest.raises(SystemExit) as done:
        cli_main([
            "simulate", "--labeler", "rlhf_chat.evaluation.labelers:friendly", "--comparisons", "4", "--ppo-steps", "0",
            "--model", tiny_config.model.name, "--db", tiny_config.store.db_url,
            "--checkpoints", tiny_config.store.checkpoint_dir, "--prompts", str(prompts), "--report", str(report),
            *QUICK,
        ])
    assert done.value.code == 0
    assert json.loads(report.read_text())["comparisons"] == 4
    assert '"win_rate_vs_reference"' in capsys.readouterr().out


def test_simulate_refuses_a_database_with_votes_unless_told_to_continue(tiny_config, tmp_path):
    from rlhf_chat.evaluation.simulate import UsedDatabase

    cfg = tiny_config
    cfg.reward.min_pairs = 1000  # no reward round: only the database matters here
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"ask {i}" for i in range(20)))
    first = simulate(cfg, "concise", comparisons=4, ppo_steps=0, prompts_file=str(prompts), report_path=None)
    assert first.db_url == cfg.store.db_url and first.settings["sampling"]["top_p"] == 1.0
    with pytest.raises(UsedDatabase, match="already holds 4 votes.*--continue"):
        simulate(cfg, "concise", comparisons=4, ppo_steps=0, prompts_file=str(prompts), report_path=None)
    simulate(cfg, "concise", comparisons=4, ppo_steps=0, prompts_file=str(prompts), report_path=None, resume=True)
    with store.open_store(cfg.store.db_url)() as session:
        assert store.count_votes(session) == 8


def test_cli_simulate_defaults_to_a_fresh_database_named_in_the_report(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RLHF_CHAT_DB", raising=False)
    monkeypatch.delenv("RLHF_CHAT_CHECKPOINTS", raising=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"ask {i}" for i in range(20)))
    reports = []
    for k in range(2):  # twice: each run gets its own database, so neither is refused
        report = tmp_path / f"r{k}.json"
        with pytest.raises(SystemExit) as done:
            cli_main(["simulate", "--labeler", "concise", "--comparisons", "2", "--ppo-steps", "0",
                      "--model", tiny_config.model.name, "--prompts", str(prompts), "--report", str(report), *QUICK])
        assert done.value.code == 0
        reports.append(json.loads(report.read_text()))
    first, second = (r["db_url"] for r in reports)
    assert first != second and first.startswith("sqlite:///") and "rlhf-chat-simulation-" in first
    assert reports[0]["checkpoint_dir"].startswith(first.removeprefix("sqlite:///").rsplit("/", 1)[0])
    # pointing at a used database is refused with a clear message and exit code 2
    with pytest.raises(SystemExit) as refused:
        cli_main(["simulate", "--labeler", "concise", "--comparisons", "2", "--ppo-steps", "0", "--db", first,
                  "--model", tiny_config.model.name, "--prompts", str(prompts), "--report", str(tmp_path / "x.json")])
    assert refused.value.code == 2 and "--continue" in capsys.readouterr().err


def test_set_overrides_any_setting_and_refuses_unknown_ones():
    from rlhf_chat.config import AppConfig, apply_overrides

    cfg = apply_overrides(AppConfig(), ["ppo.missing_eos_penalty=0", "ppo.adaptive_kl=true", "sampling.temperature=0.9"])
    assert (cfg.ppo.missing_eos_penalty, cfg.ppo.adaptive_kl, cfg.sampling.temperature) == (0.0, True, 0.9)
    for bad in ("ppo.no_such=1", "nope.kl_coef=1", "ppo.kl_coef", "ppo.adaptive_kl=maybe", "ppo.epochs=two"):
        with pytest.raises(ValueError, match="--set"):
            apply_overrides(AppConfig(), [bad])


def test_cli_simulate_with_a_teacher_stores_its_written_answers_up_to_the_limit(tiny_config, tmp_path, capsys):
    report = tmp_path / "taught.json"
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"how do I fix thing {i}" for i in range(20)))
    with pytest.raises(SystemExit) as done:
        cli_main([
            "simulate", "--labeler", "concise", "--teacher", "rlhf_chat.evaluation.teachers:follow_up",
            "--comparisons", "6", "--ppo-steps", "0", "--set", "simulation.demonstrations=3", "--set", "loop.arena_fraction=0",
            "--model", tiny_config.model.name, "--db", tiny_config.store.db_url,
            "--checkpoints", tiny_config.store.checkpoint_dir, "--prompts", str(prompts), "--report", str(report),
            *QUICK,
        ])
    assert done.value.code == 0
    saved = json.loads(report.read_text())
    assert saved["teacher"] == "rlhf_chat.evaluation.teachers:follow_up" and saved["demonstrations"] == 3
    assert saved["votes"]["demonstration"] == 3 and sum(saved["votes"].values()) == 6
    sessions = store.open_store(tiny_config.store.db_url)
    with sessions() as session:
        written = store.demonstrations(session)
        assert len(written) == 3 and len(store.voted_comparisons(session)) == 3
    assert all(w.text.endswith("?") and w.comparison.choice is None for w in written)
    with pytest.raises(ValueError, match="unknown teacher 'nobody'; use a built-in teacher \\(follow_up\\)"):
        simulate(tiny_config, "concise", comparisons=1, ppo_steps=0, report_path=None, teacher_spec="nobody")


def test_round_behaviours_count_plain_rows_and_compare_the_guided_rows_scores():
    """A round's behaviour shares are the plain policy's (the guided rows' openings were
    prefilled); the guided rows only give how the reward model scored them."""
    from rlhf_chat.evaluation.simulate import round_behaviours
    from rlhf_chat.generation.modes import BUILTIN_MODES

    q = "What is the capital of France?"
    plain = [("Paris is the capital.", 0.0, 6, q), ("Thank you! Glad to help.", 1.0, 8, q), ("It is Paris.", 2.0, 5, q)]
    got = round_behaviours(plain, list(BUILTIN_MODES), 15, guided_scores=[2.0, 3.0])
    assert got["policy"]["warm"] == pytest.approx(1 / 3) and got["policy"]["answers"] == 3
    assert got["policy"]["on topic"] == pytest.approx(1 / 3)  # only the first names the capital
    assert got["guided_rows"] == 2 and got["guided_score_gap"] == pytest.approx(2.5 - 1.0)
    none = round_behaviours(plain, list(BUILTIN_MODES), 15)
    assert none["guided_rows"] == 0 and none["guided_score_gap"] is None


def small_run(cfg, tmp_path, monkeypatch, rounds: int):
    """A tiny-model config whose every reward round trains (an always-"a" labeler, one
    pair enough), with PPO steps of two rows; returns the labeler spec and prompts file."""
    cfg.reward.steps_per_round, cfg.reward.min_pairs = 2, 1
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs = 2, 2, 1
    cfg.simulation.rounds, cfg.simulation.batch_prompts = rounds, 4
    cfg.loop.arena_fraction = 0.0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"question {i}?" for i in range(30)))
    (tmp_path / "always_a_labeler.py").write_text("def always_a(prompt, a, b):\n    return 'a'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "always_a_labeler:always_a", str(prompts)


def test_the_simulation_stops_ppo_where_the_kl_bound_stops_the_live_loop(tiny_config, tmp_path, monkeypatch):
    """With loop.max_kl tiny, the first step (at the reference, KL 0) runs and the first
    that moved away stops PPO, as training_loop.ppo_budget_spent stops the live loop: the
    steps still owed are not run, and the report says when and why."""
    cfg = tiny_config
    labeler, prompts = small_run(cfg, tmp_path, monkeypatch, rounds=1)
    cfg.loop.ppo_steps_per_reward, cfg.loop.max_kl = 0, 1e-9  # no step budget; any KL is too much
    cfg.ppo.learning_rate = 1e-2  # the first update surely moves the policy
    report = simulate(cfg, labeler, comparisons=4, ppo_steps=5, prompts_file=prompts, report_path=None)
    assert 1 <= report.ppo_steps_run < 5 and report.ppo_steps == 5  # asked for 5, ran fewer
    assert len(report.reward_curve) == report.ppo_steps_run and report.kl_curve[-1] > cfg.loop.max_kl
    assert len(report.ppo_stops) == 1, report.ppo_stops
    stop = report.ppo_stops[0]
    assert stop["round"] == 1 and stop["after_ppo_steps"] == report.ppo_steps_run
    assert stop["reason"].startswith("KL to the starting model") and "> 1e-09 nats" in stop["reason"]
    with store.open_store(cfg.store.db_url)() as session:
        assert len(store.ppo_steps(session)) == report.ppo_steps_run
    # and the policy the run ends with is one whose own rollouts kept the bound
    assert report.served_kl is not None and report.served_kl <= cfg.loop.max_kl


def test_the_simulation_runs_at_most_the_loops_budget_of_ppo_steps_per_reward_version(
    tiny_config, tmp_path, monkeypatch
):
    """loop.ppo_steps_per_reward caps each reward version's steps in the simulation as in
    the live loop: 3 steps asked per round, 1 allowed, so each round stops after 1."""
    cfg = tiny_config
    labeler, prompts = small_run(cfg, tmp_path, monkeypatch, rounds=2)
    cfg.loop.ppo_steps_per_reward, cfg.loop.max_kl = 1, 0.0  # no KL bound: only the budget stops PPO
    report = simulate(cfg, labeler, comparisons=8, ppo_steps=6, prompts_file=prompts, report_path=None)
    assert [r["version"] for r in report.reward_rounds] == [1, 2]
    assert report.ppo_steps_run == 2 and len(report.reward_curve) == 2
    assert [(s["round"], s["after_ppo_steps"]) for s in report.ppo_stops] == [(1, 1), (2, 2)]
    assert [s["reason"] for s in report.ppo_stops] == [
        "PPO budget for reward v1 spent (1 steps)", "PPO budget for reward v2 spent (1 steps)"]
    with store.open_store(cfg.store.db_url)() as session:
        assert [s.reward_version for s in store.ppo_steps(session)] == [1, 2]


@pytest.mark.parametrize("turn, versions", [(3, [1]), (2, [1, 2])])
def test_the_simulations_next_reward_round_waits_for_ppos_turn_as_the_live_loop(
    tiny_config, tmp_path, monkeypatch, turn, versions
):
    """loop.ppo_steps_between_rewards holds in the simulation too: two rounds of two PPO
    steps each; with a turn of 3 the second round's votes train no new reward model
    (PPO took only 2 steps on v1), with a turn of 2 they do."""
    cfg = tiny_config
    labeler, prompts = small_run(cfg, tmp_path, monkeypatch, rounds=2)
    cfg.loop.ppo_steps_per_reward, cfg.loop.max_kl = 0, 0.0  # no bound: only the turn decides
    cfg.loop.ppo_steps_between_rewards = turn
    report = simulate(cfg, labeler, comparisons=8, ppo_steps=4, prompts_file=prompts, report_path=None)
    assert [r["version"] for r in report.reward_rounds] == versions
    assert report.ppo_steps_run == 4


def test_a_tripwire_trip_pauses_the_simulations_training_for_the_rest_of_the_run(tiny_config, tmp_path, monkeypatch):
    """The live loop's tripwire (guards on) runs after each reward round and PPO step of a
    simulation: a trip is reported and no PPO step or reward round follows it."""
    cfg = tiny_config
    labeler, prompts = small_run(cfg, tmp_path, monkeypatch, rounds=2)
    cfg.loop.ppo_steps_per_reward, cfg.loop.max_kl = 0, 0.0  # no bound of the budget's: only the trip stops PPO
    cfg.guards.tripwire_kl = 1e-9  # the first step that moves away from the reference trips it
    cfg.ppo.learning_rate = 1e-2
    report = simulate(cfg, labeler, comparisons=8, ppo_steps=8, prompts_file=prompts, report_path=None)
    assert report.tripwire is not None and report.tripwire["round"] == 1
    assert "KL to the starting model" in report.tripwire["reason"]
    assert 1 <= report.ppo_steps_run == report.tripwire["after_ppo_steps"] < 4  # round 1's share is 4
    assert len(report.reward_rounds) == 1 and report.ppo_stops == []  # round 2 trained nothing
    assert report.votes["a"] == 8  # people still voted
