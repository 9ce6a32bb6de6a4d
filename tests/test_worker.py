"""The model worker: a waiting person's job runs first, and inside a long training
slice at the next yield point (each decoding step of a PPO rollout)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from rlhf_chat.config import PPOConfig, SamplingConfig
from rlhf_chat.generation.worker import CHAT, PPO, REWARD, ModelWorker, yield_point
from rlhf_chat.learning.ppo import rollout


def test_queued_jobs_run_most_urgent_first():
    worker = ModelWorker(lambda: SimpleNamespace(serving_version=0)).start()
    release, order = threading.Event(), []
    try:
        busy = worker.submit(PPO, lambda m: release.wait(10))
        time.sleep(0.05)  # the PPO job is under way; the rest queue behind it
        futures = [worker.submit(p, lambda m, p=p, n=n: order.append((p, n))) for p, n in
                   ((PPO, 1), (REWARD, 1), (CHAT, 1), (PPO, 2), (CHAT, 2))]
        release.set()
        busy.result(5)
        for f in futures:
            f.result(5)
    finally:
        worker.stop()
    assert order == [(CHAT, 1), (CHAT, 2), (REWARD, 1), (PPO, 1), (PPO, 2)]  # FIFO among equals


def test_a_person_waits_at_most_one_step_of_a_training_slice():
    """A chat job submitted during a 40-step training slice runs at the slice's next
    yield point, not after the slice."""
    worker = ModelWorker(lambda: SimpleNamespace(serving_version=0)).start()
    step, started, ran_at = [0], threading.Event(), []

    def slice_(models):
        for i in range(40):
            step[0] = i
            started.set()
            time.sleep(0.01)  # one "decoding step"
            yield_point()
        return "slice done"

    try:
        long_job = worker.submit(PPO, slice_)
        started.wait(5)
        time.sleep(0.05)
        submitted_at = step[0]
        worker.call(CHAT, lambda m: ran_at.append(step[0]), timeout=5)
        assert long_job.result(5) == "slice done"
    finally:
        worker.stop()
    assert ran_at and ran_at[0] <= submitted_at + 1 < 39


def test_a_chat_job_runs_inside_a_real_rollout(tiny_models):
    """On the tiny model: a person's pair submitted while a PPO rollout decodes is
    answered before the rollout ends (the rollout yields after each decoding step)."""
    worker = ModelWorker(lambda: tiny_models).start()
    started, done = threading.Event(), {}
    sampling = SamplingConfig(max_new_tokens=48)
    cfg = PPOConfig(min_new_tokens=48)  # a long rollout: 48 steps for 8 rows
    contexts = [[{"role": "user", "content": "tell me a story"}]] * 8

    def long_rollout(models):
        started.set()
        batch = rollout(models, contexts, cfg, sampling, seed=1)
        done["rollout"] = time.perf_counter()
        return batch

    try:
        future = worker.submit(PPO, long_rollout)
        started.wait(10)
        time.sleep(0.02)
        worker.call(CHAT, lambda m: done.setdefault("chat", time.perf_counter()), timeout=30)
        batch = future.result(60)
    finally:
        worker.stop()
    assert batch.response_ids.shape[1] == 48
    assert done["chat"] < done["rollout"]
