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


def _busy_share_under_chat_load(training_share: float, seconds: float = 1.5) -> tuple[float, int]:
    """Chat jobs always waiting (a feeder keeps three queued) while a training loop
    submits one slice after another (four 5 ms steps with a yield point between, as a
    rollout does); returns training's share of the busy time and its finished slices."""
    worker = ModelWorker(lambda: SimpleNamespace(serving_version=0), training_share=training_share).start()
    busy = {"chat": 0.0, "training": 0.0}
    slices, stop = [0], threading.Event()

    def chat_job(models):
        t = time.perf_counter()
        time.sleep(0.005)
        busy["chat"] += time.perf_counter() - t

    def training_slice(models):
        for _ in range(4):
            t = time.perf_counter()
            time.sleep(0.005)
            busy["training"] += time.perf_counter() - t  # nested chat time is not counted here
            yield_point()
        slices[0] += 1

    def feed_chat():
        while not stop.is_set():
            if worker.pending(CHAT) < 3:
                worker.submit(CHAT, chat_job)
            time.sleep(0.001)

    def train():  # the next slice once the last is done, as the training loop does
        while not stop.is_set():
            done = worker.submit(PPO, training_slice)
            while not stop.is_set() and not done.done():
                time.sleep(0.001)

    threads = [threading.Thread(target=feed_chat), threading.Thread(target=train)]
    try:
        threads[0].start()
        time.sleep(0.1)  # chat alone first: the worker is busy before training asks
        threads[1].start()
        time.sleep(seconds)
    finally:
        stop.set()
        threads[0].join(5)
        worker.stop()  # the last slice finishes first
        threads[1].join(5)
    return busy["training"] / (busy["chat"] + busy["training"]), slices[0]


def test_training_gets_its_share_of_a_worker_that_chat_keeps_busy(monkeypatch):
    """Strict priority starved training under load (a 20-minute soak with 8 people ran
    no reward round): with chat always waiting, training still gets about
    ``training_share`` of the busy time, and a share of 0 restores strict priority."""
    import rlhf_chat.generation.worker as w

    monkeypatch.setattr(w, "SHARE_HALF_LIFE_S", 0.5)  # "recent" on the test's time scale
    share, slices = _busy_share_under_chat_load(0.25)
    assert slices >= 5 and 0.15 <= share <= 0.45, (share, slices)
    strict_share, strict_slices = _busy_share_under_chat_load(0.0)
    assert strict_slices <= 1 and strict_share < 0.05, (strict_share, strict_slices)


def test_the_share_is_charged_to_the_nested_job_not_the_slice_around_it():
    """A chat job run at a training slice's yield point is chat time, not training time."""
    worker = ModelWorker(lambda: SimpleNamespace(serving_version=0), training_share=0.25).start()
    started, release, nested = threading.Event(), threading.Event(), []

    def slice_(models):
        started.set()
        time.sleep(0.05)
        release.wait(5)
        yield_point()  # the chat job waiting runs here, nested
        return worker.recent_busy_s()

    try:
        future = worker.submit(PPO, slice_)
        started.wait(5)  # the slice is under way before the chat job is queued
        worker.submit(CHAT, lambda m: (nested.append(worker._running[:]), time.sleep(0.2)))
        release.set()
        chat_s, training_s = future.result(10)
    finally:
        worker.stop()
    assert nested == [[PPO, CHAT]]  # it did run inside the slice
    assert 0.15 <= chat_s <= 0.4 and 0.04 <= training_s < 0.15, (chat_s, training_s)


def test_freed_memory_is_given_back_while_jobs_keep_waiting():
    """Under sustained chat the queue is never empty; the worker still trims (at most
    every ``trim_memory_every_s``), or a Space with training on grows by gigabytes."""
    from rlhf_chat.model.memory import MemoryTrimmer

    worker = ModelWorker(lambda: SimpleNamespace(serving_version=0)).start()
    trims = []
    worker.trimmer = MemoryTrimmer(0.05, release=lambda: trims.append(time.monotonic()) or True)
    try:
        futures = [worker.submit(CHAT, lambda m: time.sleep(0.01)) for _ in range(60)]  # 0.6 s, never idle
        for f in futures:
            f.result(10)
    finally:
        worker.stop()
    assert len(trims) >= 5 and min(b - a for a, b in zip(trims, trims[1:])) >= 0.05, trims


def _share_with_gaps(gap_s: float = 0.02, seconds: float = 2.0) -> float:
    """Chat jobs of 100 ms always waiting; a training loop that does 20 ms of its own
    work between its 10 ms jobs (as a reward round between steps). Returns training's
    share of the busy time."""
    worker = ModelWorker(lambda: SimpleNamespace(serving_version=0), training_share=0.25).start()
    busy, stop = {"chat": 0.0, "training": 0.0}, threading.Event()

    def job(kind: str, s: float):
        def run(models):
            t = time.perf_counter()
            time.sleep(s)
            busy[kind] += time.perf_counter() - t
        return run

    def feed_chat():
        while not stop.is_set():
            if worker.pending(CHAT) < 2:
                worker.submit(CHAT, job("chat", 0.1))
            time.sleep(0.001)

    def train():
        while not stop.is_set():
            done = worker.submit(REWARD, job("training", 0.01))
            while not stop.is_set() and not done.done():
                time.sleep(0.001)
            time.sleep(gap_s)  # the loop's own work before its next job

    threads = [threading.Thread(target=feed_chat), threading.Thread(target=train)]
    try:
        threads[0].start()
        time.sleep(0.2)
        threads[1].start()
        time.sleep(seconds)
    finally:
        stop.set()
        threads[0].join(5)
        worker.stop()
        threads[1].join(5)
    return busy["training"] / (busy["chat"] + busy["training"])


def test_a_training_loop_that_submits_one_job_at_a_time_still_gets_its_share(monkeypatch):
    """The loop submits its next job a moment after the last ends; the worker waits that
    moment (TRAINING_GRACE_S) while training is owed, instead of starting a person's
    100 ms job in every gap (which held training near 10 ms in 110)."""
    import rlhf_chat.generation.worker as w

    monkeypatch.setattr(w, "SHARE_HALF_LIFE_S", 0.5)
    share = _share_with_gaps()
    assert 0.16 <= share <= 0.4, share  # without the wait: 0.09
