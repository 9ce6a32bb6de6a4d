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
