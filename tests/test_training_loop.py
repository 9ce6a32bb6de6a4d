"""The training loop's decisions: reward rounds on new votes, and PPO bounded per reward version."""

from __future__ import annotations

import random

import pytest

from rlhf_chat import store
from rlhf_chat.labelers import concise
from rlhf_chat.runtime import start_services
from rlhf_chat.simulate import collect_votes
from rlhf_chat.training_loop import TrainingLoop

PROMPTS = ["hi", "what is rain?", "name a bird", "tell me a joke", "how are you?"]


@pytest.fixture
def idle_loop(tiny_config):
    """Services with votes in the database and a training loop that is not started:
    the test calls run_once() itself, as the loop's thread would."""
    cfg = tiny_config
    cfg.loop.min_votes, cfg.loop.reward_every_votes = 4, 6
    cfg.loop.ppo_steps_per_reward, cfg.loop.max_kl = 3, 0.0
    cfg.reward.steps_per_round, cfg.reward.min_pairs = 3, 2
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs = 2, 2, 1
    services = start_services(cfg, train=False)
    services.worker.ready.wait()
    yield services, TrainingLoop(services.worker, services.sessions, cfg)
    services.stop()


def usable_votes(services, n, seed):
    """Add votes until ``n`` more of them chose A or B (concise ties equal lengths)."""
    def count():
        with services.sessions() as s:
            return store.count_votes(s, ("a", "b"))

    target, rng = count() + n, random.Random(seed)
    while count() < target:
        collect_votes(services.worker, services.sessions, PROMPTS, concise, 4, services.config, rng)


def test_ppo_stops_when_its_budget_for_a_reward_version_is_spent(idle_loop):
    services, loop = idle_loop
    usable_votes(services, 4, seed=0)
    assert loop.run_once() and loop.status.state == "training reward model"
    steps = 0
    while loop.run_once():
        steps += 1
        assert steps <= 3, "PPO went past its budget"
    assert steps == 3 and loop.status.state == "waiting for votes"
    assert "budget for reward v1 spent (3 steps)" in loop.status.detail and "more vote" in loop.status.detail
    assert not loop.run_once()  # idle: no more PPO on the same evidence
    usable_votes(services, 6, seed=1)  # new evidence: a new reward model, and a new budget
    assert loop.run_once() and loop.status.state == "training reward model"
    assert loop.run_once() and loop.status.state == "running PPO"
    with services.sessions() as s:
        assert [p.reward_version for p in store.ppo_steps(s)] == [1, 1, 1, 2]


def test_ppo_stops_once_the_kl_bound_is_passed(idle_loop):
    services, loop = idle_loop
    loop.cfg.loop.ppo_steps_per_reward, loop.cfg.loop.max_kl = 0, 1e-9  # no step budget; any KL is too much
    usable_votes(services, 4, seed=0)
    assert loop.run_once()  # the reward round
    # the first step starts at the reference (KL 0, within the bound); later ones have moved away
    ran = 0
    while loop.run_once():
        ran += 1
        assert ran < 10, "the KL bound never stopped PPO"
    assert ran >= 1 and loop.status.state == "waiting for votes" and "KL to the starting model" in loop.status.detail
