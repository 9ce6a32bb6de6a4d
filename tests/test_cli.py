"""The command line's training commands take every setting from the config: a ``--set``
reaches the reward round and the PPO trainer as it reaches the live loop's."""

from __future__ import annotations

import pytest

from rlhf_chat.cli import main as cli_main
from rlhf_chat.config import AppConfig, apply_overrides
from rlhf_chat.generation.candidates import Candidate
from rlhf_chat.storage import store

# Settings whose defaults differ from what a component would assume on its own
# (guards on with a 0.1 cap, ties weighing 1, written answers weighing 1).
SETTINGS = ["reward.tie_weight=0.25", "guards.enabled=false", "guards.max_share=0.5", "loop.demonstration_weight=2"]
WANTED = (False, 0.5, 2.0, 0.25)  # guards.enabled, guards.max_share, demonstration weight, tie weight
# A round and a step small enough for the tiny model to run in seconds.
SMALL = ["reward.steps_per_round=2", "reward.min_pairs=1", "ppo.batch_size=2", "ppo.minibatch_size=2", "ppo.epochs=1",
         "sampling.max_new_tokens=6"]


def store_votes(db_url: str) -> None:
    """Twelve votes from three sessions, every fourth a tie: what a round and PPO-ptx read."""
    sessions = store.open_store(db_url)
    shown = lambda text: Candidate(text, "policy", 0, 0, 0.7, 1.0, 8, 2, True, 0.1)  # noqa: E731
    with sessions() as s, s.begin():
        for i in range(12):
            pair = store.save_pair(s, session_id=f"person-{i % 3}", context=[{"role": "user", "content": f"q {i}?"}],
                                   a=shown("Yes."), b=shown(f"No, {i} times no."))
            store.record_vote(s, pair.id, "tie" if i % 4 == 3 else "a")


def record_assessments(monkeypatch) -> list[tuple]:
    """Every call of the guards' assessment (the reward round's and PPO-ptx's), as
    (guards.enabled, guards.max_share, demonstration weight, tie weight)."""
    from rlhf_chat.learning import guards, ppo

    calls, real = [], guards.assess_feedback

    def recording(session, cfg, demonstration_weight=1.0, tie_weight=0.0):
        calls.append((cfg.enabled, cfg.max_share, demonstration_weight, tie_weight))
        return real(session, cfg, demonstration_weight, tie_weight)

    monkeypatch.setattr(guards, "assess_feedback", recording)
    monkeypatch.setattr(ppo, "assess_feedback", recording)
    return calls


def test_train_reward_and_train_policy_use_every_set_setting(tiny_config, monkeypatch, capsys):
    """``train-reward`` and ``train-policy`` once ran with the guards' defaults, and PPO
    with ties weighing 0, whatever ``--set`` said: every assessment they make must see
    the settings given on the command line."""
    store_votes(tiny_config.store.db_url)
    calls = record_assessments(monkeypatch)
    common = ["--model", tiny_config.model.name, "--db", tiny_config.store.db_url,
              "--checkpoints", tiny_config.store.checkpoint_dir]
    for item in SMALL + SETTINGS:
        common += ["--set", item]
    with pytest.raises(SystemExit) as done:
        cli_main(["train-reward", *common])
    assert done.value.code == 0, capsys.readouterr().err
    assert calls and set(calls) == {WANTED}, calls  # the round's pairs were weighed as configured
    calls.clear()
    with pytest.raises(SystemExit) as done:
        cli_main(["train-policy", "--steps", "1", *common])
    assert done.value.code == 0, capsys.readouterr().err
    assert calls and set(calls) == {WANTED}, calls  # PPO-ptx's examples were weighed as configured
    with store.open_store(tiny_config.store.db_url)() as s:
        assert len(store.reward_rounds(s)) == 1 and len(store.ppo_steps(s)) == 1


def test_a_trainer_from_the_config_takes_each_setting_from_it():
    """``PPOTrainer.from_config`` names every setting (no worker needed to build one)."""
    from rlhf_chat.learning.ppo import PPOTrainer

    cfg = apply_overrides(AppConfig(), SETTINGS + ["ppo.kl_coef=0.2", "store.checkpoint_dir=elsewhere"])
    trainer = PPOTrainer.from_config(None, None, cfg)
    guards = trainer.guard_cfg
    assert (guards.enabled, guards.max_share, trainer.demonstration_weight, trainer.tie_weight) == WANTED
    assert trainer.cfg is cfg.ppo and trainer.sampling is cfg.sampling and trainer.checkpoint_dir == "elsewhere"
    assert trainer.kl_ctl.value == 0.2


def test_a_component_left_without_a_setting_takes_the_configs_default():
    """No second default: a trainer built without ``tie_weight`` or ``demonstration_weight``
    gets the config's (reward.tie_weight is 1, not 0)."""
    from rlhf_chat.config import PPOConfig
    from rlhf_chat.learning.ppo import PPOTrainer

    trainer, defaults = PPOTrainer(None, None, PPOConfig(), "checkpoints"), AppConfig()
    assert trainer.tie_weight == defaults.reward.tie_weight == 1.0
    assert trainer.demonstration_weight == defaults.loop.demonstration_weight
    assert trainer.guard_cfg == defaults.guards and trainer.sampling == defaults.sampling


# --- simulate: every flag reaches the simulation ---------------------------------------------

SIMULATE_FLAGS = {  # flag -> (its value on the command line, what the simulation must see)
    "--labeler": ("friendly", lambda cfg, kw: kw["labeler_spec"] == "friendly"),
    "--comparisons": ("17", lambda cfg, kw: kw["comparisons"] == 17),
    "--ppo-steps": ("5", lambda cfg, kw: kw["ppo_steps"] == 5),
    "--prompts": ("prompts.txt", lambda cfg, kw: kw["prompts_file"] == "prompts.txt"),
    "--seed": ("7", lambda cfg, kw: kw["seed"] == 7),
    "--rounds": ("3", lambda cfg, kw: cfg.simulation.rounds == 3),
    "--continue": (None, lambda cfg, kw: kw["resume"] is True),
    "--teacher": ("follow_up", lambda cfg, kw: kw["teacher_spec"] == "follow_up"),
    "--adversary": ("longer", lambda cfg, kw: kw["adversary_spec"] == "longer"),
    "--adversary-share": ("0.25", lambda cfg, kw: kw["adversary_share"] == 0.25),
    "--people": ("13", lambda cfg, kw: cfg.simulation.people == 13),
    "--adversary-sessions": ("10", lambda cfg, kw: cfg.simulation.adversary_sessions == 10),
    "--adversary-addresses": ("5", lambda cfg, kw: cfg.simulation.adversary_addresses == 5),
    "--label-noise": ("0.2", lambda cfg, kw: cfg.simulation.label_noise == 0.2),
    "--no-guards": (None, lambda cfg, kw: cfg.guards.enabled is False),
    "--fact-key": ("key.json", lambda cfg, kw: kw["fact_key_path"] == "key.json"),
    "--reference-answers": ("answers.json", lambda cfg, kw: kw["reference_answers_path"] == "answers.json"),
    "--report": ("out.json", lambda cfg, kw: kw["report_path"] == "out.json"),
    "--plot": ("out.png", lambda cfg, kw: kw["plot_path"] == "out.png"),
}


def test_every_simulate_flag_reaches_the_simulation(tmp_path, monkeypatch, capsys):
    """Each of ``simulate``'s own flags, given a value other than its default, arrives in
    the simulation's arguments or its config; a flag added without a line here fails."""
    from rlhf_chat.cli import build_parser
    from rlhf_chat.evaluation import simulate as simulation

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["simulate"]
    common = {"--model", "--db", "--checkpoints", "--weights", "--no-4bit", "--set", "-h", "--help"}
    own = {s for action in sub._actions for s in action.option_strings} - common
    assert own == set(SIMULATE_FLAGS), own ^ set(SIMULATE_FLAGS)
    seen = []

    def recording(cfg, **kwargs):
        seen.append((cfg, kwargs))
        return simulation.Report(labeler=kwargs["labeler_spec"], comparisons=kwargs["comparisons"],
                                 ppo_steps=kwargs["ppo_steps"])

    monkeypatch.setattr(simulation, "simulate", recording)
    argv = ["simulate", "--db", f"sqlite:///{tmp_path / 'sim.db'}", "--checkpoints", str(tmp_path / "ck")]
    for flag, (value, _) in SIMULATE_FLAGS.items():
        argv += [flag] if value is None else [flag, value]
    with pytest.raises(SystemExit) as done:
        cli_main(argv)
    assert done.value.code == 0, capsys.readouterr().err
    (cfg, kwargs), = seen
    assert [flag for flag, (_, reached) in SIMULATE_FLAGS.items() if not reached(cfg, kwargs)] == []
    assert cfg.store.db_url.endswith("sim.db")
