"""The training loop's decisions: reward rounds on new votes, and PPO bounded per reward version."""

from __future__ import annotations

import random

import pytest

from rlhf_chat.evaluation.labelers import concise
from rlhf_chat.evaluation.simulate import collect_votes
from rlhf_chat.generation.candidates import Candidate
from rlhf_chat.learning import training_loop
from rlhf_chat.learning.ppo import rollout
from rlhf_chat.learning.training_loop import TrainingLoop
from rlhf_chat.runtime import start_services
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import CandidateRow

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


def test_ties_alone_count_as_feedback_but_start_no_reward_model_and_say_so(idle_loop, monkeypatch):
    services, loop = idle_loop
    cand = lambda t: Candidate(t, "policy", 0, 0, 0.7, 1.0, 8, 2, True, 0.1)  # noqa: E731
    for i in range(loop.cfg.loop.min_votes + 2):
        with services.sessions() as s, s.begin():
            pair = store.save_pair(s, session_id="t", context=[{"role": "user", "content": f"q{i}"}],
                                   a=cand("short"), b=cand("a longer answer"))
            store.record_vote(s, pair.id, "tie")
    assert loop._count_votes() >= loop.cfg.loop.min_votes  # ties train, so they count
    assert not loop.run_once()  # ... but a round needs votes that rank
    assert services.worker.call(0, lambda m: m.reward_version) == 0
    assert loop.status.state == "waiting for votes" and "A/B votes" in loop.status.detail
    calls = []
    monkeypatch.setattr(training_loop, "reward_round_from_config", lambda *a, **k: calls.append(1))
    assert not loop.run_once() and calls == []  # the same votes: no second try


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


def test_a_crash_mid_update_restores_the_policy_and_retries_with_back_off(idle_loop, monkeypatch):
    """An out-of-memory error in the second minibatch, after a real optimizer step:
    the adapter, value head and Adam's state are put back as before the step, the
    error is shown and stored, and the loop retries with doubling waits."""
    import time

    import torch

    from rlhf_chat.learning import ppo
    from rlhf_chat.storage.tables import TrainingEvent

    services, loop = idle_loop
    loop.cfg.loop.ppo_steps_per_reward = 0  # no budget: only the crash stops PPO
    loop.cfg.loop.retry_backoff_s, loop.cfg.loop.max_backoff_s = 0.2, 0.8
    loop.cfg.ppo.batch_size, loop.cfg.ppo.minibatch_size = 4, 2  # two minibatches a step
    usable_votes(services, 4, seed=0)
    assert loop.run_once()  # reward round
    assert loop.run_once()  # one good PPO step: Adam has state
    before = services.worker.call(0, lambda m: {k: v.clone() for k, v in ppo.policy_tensors(m).items()})
    adam_before = {k: {n: t.clone() for n, t in v.items()} for k, v in loop.ppo.optimizer.state_dict()["state"].items()}
    real_update, calls, attempts = ppo.minibatch_update, [], []

    def out_of_memory_on_the_second(models, *args, **kwargs):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise RuntimeError("out of memory (injected)")
        return real_update(models, *args, **kwargs)

    real_step = loop.ppo.step

    def timed_step(contexts):
        attempts.append(time.monotonic())
        return real_step(contexts)

    monkeypatch.setattr(ppo, "minibatch_update", out_of_memory_on_the_second)
    monkeypatch.setattr(loop.ppo, "step", timed_step)
    loop.start()
    deadline = time.time() + 120  # generous: a loaded machine runs each attempt slowly
    while len(attempts) < 4 and time.time() < deadline:
        time.sleep(0.05)
    loop.stop()
    assert len(attempts) >= 4, "the loop did not retry"
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8 * 0.99  # 0.2, 0.4, 0.8 (capped) s
    after = services.worker.call(0, lambda m: {k: v.clone() for k, v in ppo.policy_tensors(m).items()})
    assert all(torch.equal(before[k], after[k]) for k in before)  # the first minibatch's step was undone
    adam_after = loop.ppo.optimizer.state_dict()["state"]
    assert all(torch.equal(adam_before[k][n], adam_after[k][n]) for k in adam_before for n in adam_before[k])
    assert loop.status.state == "error" and "out of memory" in loop.status.last_error
    with services.sessions() as s:
        assert any("out of memory" in e.message for e in s.query(TrainingEvent).all())
        assert len(store.ppo_steps(s)) == 1  # the failed steps were never recorded as steps


def test_a_full_disk_publishes_no_reward_version_without_its_checkpoint(idle_loop, monkeypatch):
    import errno

    from rlhf_chat.learning import checkpoints

    services, loop = idle_loop
    usable_votes(services, 4, seed=0)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", disk_full)
    with pytest.raises(OSError):
        loop.run_once()
    with services.sessions() as s:
        assert store.latest_checkpoint(s, "reward") is None and store.reward_rounds(s) == []
    assert services.worker.call(0, lambda m: m.reward_version) == 0  # nothing new is served
    monkeypatch.undo()  # space again: the retry trains and publishes version 1, checkpoint first
    assert loop.run_once() and services.worker.call(0, lambda m: m.reward_version) == 1
    with services.sessions() as s:
        assert store.latest_checkpoint(s, "reward").version == 1


def test_a_full_disk_publishes_no_policy_version_without_its_checkpoint(idle_loop, monkeypatch):
    import errno

    import torch

    from rlhf_chat.learning import checkpoints, ppo

    services, loop = idle_loop
    loop.cfg.ppo.checkpoint_every = 1  # every version is a checkpoint version
    usable_votes(services, 4, seed=0)
    assert loop.run_once()  # the reward round
    before = services.worker.call(0, lambda m: {k: v.clone() for k, v in ppo.policy_tensors(m).items()})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", disk_full)
    with pytest.raises(OSError):
        loop.run_once()
    after = services.worker.call(0, lambda m: {k: v.clone() for k, v in ppo.policy_tensors(m).items()})
    assert services.worker.serving_version == 0  # nothing new was served ...
    assert all(torch.equal(before[k], after[k]) for k in before)  # ... and the step was undone
    with services.sessions() as s:
        assert store.latest_checkpoint(s, "policy") is None and store.ppo_steps(s) == []
    monkeypatch.undo()
    assert loop.run_once() and services.worker.serving_version == 1
    with services.sessions() as s:
        assert store.latest_checkpoint(s, "policy").version == 1


def test_ppo_samples_with_the_scheme_people_vote_on(idle_loop):
    """One sampling scheme: the loop's PPO trainer draws rollouts with AppConfig.sampling,
    the settings every candidate people see is drawn (and stored) with."""
    services, loop = idle_loop
    assert loop.ppo.sampling is services.config.sampling and services.config.sampling.top_p == 1.0
    usable_votes(services, 4, seed=0)
    with services.sessions() as s:
        shown = {(c.temperature, c.top_p, c.max_new_tokens) for c in s.query(CandidateRow)}
    assert loop.run_once() and loop.run_once()  # a reward round, then a PPO step
    batch = services.worker.call(0, lambda m: rollout(m, [[{"role": "user", "content": "hi"}]], loop.ppo.cfg,
                                                      loop.ppo.sampling, seed=0))
    sampling = services.config.sampling
    assert shown == {(sampling.temperature, sampling.top_p, sampling.max_new_tokens)}
    assert batch.temperature == sampling.temperature and batch.response_ids.shape[1] <= sampling.max_new_tokens


@pytest.mark.parametrize("turn", [2, 0])
def test_votes_due_wait_for_ppos_turn_before_the_next_reward_round(idle_loop, turn):
    """Under load votes are always due (ten arrive while a reward round runs), so a
    reward round first on due votes left PPO no step at all: the next round waits
    for ``loop.ppo_steps_between_rewards`` PPO steps on the current reward model
    (0: the old order, a reward round whenever votes are due)."""
    services, loop = idle_loop
    loop.cfg.loop.ppo_steps_between_rewards = turn
    usable_votes(services, 4, seed=0)
    assert loop.run_once() and loop.status.state == "training reward model"
    usable_votes(services, 6, seed=1)  # due at once, as under load
    states = []
    for _ in range(3):
        assert loop.run_once()
        states.append(loop.status.state)
    expected = ["running PPO", "running PPO", "training reward model"] if turn else [
        "training reward model", "running PPO", "running PPO"]
    assert states == expected
