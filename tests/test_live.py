"""The live loop: chat while PPO trains, versions that change only between requests,
and a hard kill in the middle of training."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_chat.evaluation.labelers import concise
from rlhf_chat.evaluation.simulate import collect_votes
from rlhf_chat.generation.worker import CHAT
from rlhf_chat.learning.reward import run_round
from rlhf_chat.learning.training_loop import TrainingLoop
from rlhf_chat.runtime import start_services
from rlhf_chat.serving.handlers import ChatState, respond
from rlhf_chat.storage.tables import CandidateRow

CHILD = Path(__file__).with_name("live_child.py")


@pytest.fixture
def training_services(tiny_config):
    """Services with a first reward model, and the training loop running PPO."""
    cfg = tiny_config
    cfg.loop.reward_every_votes = 1000
    cfg.reward.steps_per_round, cfg.reward.min_pairs = 5, 2
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs = 4, 2, 1
    services = start_services(cfg, train=False)
    services.worker.ready.wait()
    prompts = ["hi", "what is rain?", "name a bird", "tell me a joke", "how are you?"]
    collect_votes(services.worker, services.sessions, prompts, concise, 16, cfg, random.Random(0))
    assert run_round(services.worker, services.sessions, cfg.reward, cfg.store.checkpoint_dir) is not None
    services.loop = TrainingLoop(services.worker, services.sessions, cfg).start()
    deadline = time.time() + 60
    while services.loop.status.ppo_steps < 1 and time.time() < deadline:
        time.sleep(0.1)
    yield services
    services.stop()


def test_requests_finish_while_ppo_runs(training_services):
    services = training_services
    start_version = services.worker.serving_version
    deadline, i = time.time() + 90, 0
    while i < 3 or (services.worker.serving_version == start_version and time.time() < deadline):
        *_, last = respond(services, f"message {i}", ChatState())
        assert last[-1].phase == "vote"  # the person got two candidates
        i += 1
    assert services.loop.status.state == "running PPO" and services.worker.serving_version > start_version
    with services.sessions() as session:
        by_pair = {}
        for row in session.query(CandidateRow).all():
            if row.source == "policy":  # arena pairs put the reference (version 0) on one side
                by_pair.setdefault(row.comparison_id, set()).add(row.policy_version)
    assert by_pair and all(len(versions) == 1 for versions in by_pair.values())  # both sides: one version


def test_people_are_only_ever_served_a_completed_policy_version(tiny_config, monkeypatch):
    """While PPO trains, every chat job sees serving weights that are exactly those of a
    published version (the training copy's weights at publish time), never the
    training copy's half-updated ones, though many jobs run while those differ."""
    import torch

    from rlhf_chat.learning import ppo
    from rlhf_chat.model.loading import POLICY, adapter_state

    cfg = tiny_config
    cfg.loop.reward_every_votes, cfg.loop.ppo_steps_per_reward = 1000, 1000
    cfg.reward.steps_per_round, cfg.reward.min_pairs = 5, 2
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs = 4, 2, 2  # 4 minibatch updates a step
    services = start_services(cfg, train=False)
    services.worker.ready.wait()
    published = {}
    real_publish = ppo.publish

    def recording_publish(models):
        version = real_publish(models)
        published[version] = {k: v.clone() for k, v in adapter_state(models.trainer, POLICY).items()}
        return version

    monkeypatch.setattr(ppo, "publish", recording_publish)
    try:
        prompts = ["hi", "what is rain?", "name a bird", "tell me a joke", "how are you?"]
        collect_votes(services.worker, services.sessions, prompts, concise, 16, cfg, random.Random(0))
        assert run_round(services.worker, services.sessions, cfg.reward, cfg.store.checkpoint_dir) is not None
        published[0] = services.worker.call(CHAT, lambda m: {k: v.clone() for k, v in adapter_state(m.serving, POLICY).items()})
        services.loop = TrainingLoop(services.worker, services.sessions, cfg).start()

        def look(models):
            serving = adapter_state(models.serving, POLICY)
            trainer = adapter_state(models.trainer, POLICY)
            mid_update = any(not torch.equal(trainer[k], v) for k, v in serving.items())
            return models.serving_version, {k: v.clone() for k, v in serving.items()}, mid_update

        seen, deadline = [], time.time() + 120
        while (services.loop.status.ppo_steps < 4 or sum(m for *_, m in seen) < 3) and time.time() < deadline:
            seen.append(services.worker.call(CHAT, look))
            time.sleep(0.02)
    finally:
        services.stop()
    assert sum(mid for *_, mid in seen) >= 3, "no chat job ran while the training copy was mid-update"
    for version, weights, _ in seen:
        assert all(torch.equal(weights[k], v) for k, v in published[version].items()), f"v{version} half-updated"
    versions = [v for v, *_ in seen]
    assert versions == sorted(versions) and versions[-1] > 0


def test_hard_kill_mid_training_loses_no_acknowledged_vote(tiny_path, tmp_path):
    db = f"sqlite:///{tmp_path / 'live.db'}"
    ckpt = str(tmp_path / "checkpoints")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "run", str(tiny_path), db, ckpt],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    acked, kill_at = [], None
    try:
        ready, after_ready = False, 0
        for line in child.stdout:
            if line.startswith("ACK "):
                acked.append(int(line.split()[1]))
                after_ready += ready
            if line.strip() == "READY":
                ready = True  # training is under way; people keep voting
            if line.startswith("WRITING ") and ready and after_ready >= 3:
                kill_at = int(line.split()[1])
                break  # kill now: the child is writing this vote
        assert child.poll() is None, "the child died before it was killed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert len(acked) >= 15 and kill_at is not None and kill_at not in acked

    restarted = subprocess.run(
        [sys.executable, str(CHILD), "check", str(tiny_path), db, ckpt],
        capture_output=True, text=True, env=env, timeout=300,
    )
    lines = restarted.stdout.splitlines()
    report = json.loads(lines[0])
    assert set(acked) <= set(report["voted"])  # every acknowledged vote survived the kill
    assert report["votes_without_their_answer"] == []  # and none was torn from its answer
    assert report["latest_policy_checkpoint"] is not None
    assert report["serving_version"] == report["latest_policy_checkpoint"]
    assert report["reward_version"] >= 1
    assert "TRAINING_RESUMED" in lines
