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

from rlhf_chat.candidates import Sampling, generate_pair
from rlhf_chat.chat import render_prompt
from rlhf_chat.labelers import concise
from rlhf_chat.reward import run_round
from rlhf_chat.runtime import start_services
from rlhf_chat.simulate import collect_votes
from rlhf_chat.tables import CandidateRow
from rlhf_chat.training_loop import TrainingLoop
from rlhf_chat.ui import ChatState, respond
from rlhf_chat.worker import CHAT

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


def test_requests_finish_while_ppo_runs_and_versions_change_only_between_requests(training_services):
    services = training_services
    start_version = services.worker.serving_version
    seen = []
    for i in range(6):
        *_, last = respond(services, f"message {i}", ChatState())
        assert last[-1].phase == "vote"  # the person got two candidates
        # a request job sees one version from its start to its end, however often PPO publishes
        def job(models):
            before = models.serving_version
            prompt = render_prompt(models.tokenizer, [{"role": "user", "content": "hello"}])
            generate_pair(models.serving, models.tokenizer, prompt, Sampling(8, 1.0, seed=i), before)
            return before, models.serving_version

        before, after = services.worker.call(CHAT, job)
        assert before == after
        seen.append(before)
    assert services.loop.status.state == "running PPO"
    assert seen == sorted(seen) and services.worker.serving_version > start_version
    with services.sessions() as session:
        rows = session.query(CandidateRow).all()
        by_pair = {}
        for row in rows:
            if row.source == "policy":  # arena pairs put the reference (version 0) on one side
                by_pair.setdefault(row.comparison_id, set()).add(row.policy_version)
    assert all(len(versions) == 1 for versions in by_pair.values())  # both sides of a pair: one version


def test_hard_kill_mid_training_loses_no_acknowledged_vote(tiny_path, tmp_path):
    db = f"sqlite:///{tmp_path / 'live.db'}"
    ckpt = str(tmp_path / "checkpoints")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "run", str(tiny_path), db, ckpt],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    acked = []
    try:
        for line in child.stdout:
            if line.startswith("ACK "):
                acked.append(int(line.split()[1]))
            if line.strip() == "READY":
                break
        time.sleep(1.0)  # well inside PPO: rollouts, updates, checkpoints under way
        assert child.poll() is None, "the child died before it was killed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert len(acked) == 12

    restarted = subprocess.run(
        [sys.executable, str(CHILD), "check", str(tiny_path), db, ckpt],
        capture_output=True, text=True, env=env, timeout=300,
    )
    lines = restarted.stdout.splitlines()
    report = json.loads(lines[0])
    assert set(acked) <= set(report["voted"])
    assert report["latest_policy_checkpoint"] is not None
    assert report["serving_version"] == report["latest_policy_checkpoint"]
    assert report["reward_version"] >= 1
    assert "TRAINING_RESUMED" in lines
