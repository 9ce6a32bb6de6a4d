"""On a CUDA machine (scripts/gpu_check.sh): the bundled model in 4-bit NF4 on the
GPU samples real answers, and one reward round and one PPO step train it, with
the serving and training copies one distribution. Skipped without CUDA (marked
``gpu`` and ``slow``; no GPU in CI or on the 2-core default machine)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf_chat.config import AppConfig
from rlhf_chat.evaluation.labelers import concise
from rlhf_chat.evaluation.simulate import collect_votes
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.learning.ppo import PPOTrainer
from rlhf_chat.learning.reward import run_round
from rlhf_chat.model.loading import POLICY, adapter_state
from rlhf_chat.runtime import load_for_serving
from rlhf_chat.storage import store

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: scripts/gpu_check.sh runs these on one"),
]


@pytest.fixture(scope="module")
def on_the_gpu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    cfg = AppConfig()
    cfg.model.weights = "nf4"
    cfg.store.db_url = f"sqlite:///{tmp / 'db.sqlite'}"
    cfg.store.checkpoint_dir = str(tmp / "checkpoints")
    cfg.sampling.max_new_tokens = 32
    cfg.reward.steps_per_round = 8
    sessions = store.open_store(cfg.store.db_url)
    worker = ModelWorker(lambda: load_for_serving(cfg, sessions)).start()
    assert worker.ready.wait(600) and worker.load_error is None, worker.load_error
    yield cfg, sessions, worker
    worker.stop()


def test_nf4_on_the_gpu_trains_and_serves_one_distribution(on_the_gpu):
    cfg, sessions, worker = on_the_gpu
    assert worker.call(0, lambda m: (m.device.type, m.base["weights"])) == ("cuda", "nf4")
    prompts = ["Name a fruit.", "Say hello.", "What is 2 + 2?", "Name a colour.", "What is the capital of France?"]
    collect_votes(worker, sessions, prompts, concise, 24, cfg, random.Random(0))
    result = run_round(worker, sessions, cfg.reward, cfg.store.checkpoint_dir)
    assert result is not None and math.isfinite(result.loss)
    trainer = PPOTrainer(worker, sessions, cfg.ppo, cfg.store.checkpoint_dir, sampling=cfg.sampling)
    before = worker.call(0, lambda m: {k: v.clone() for k, v in adapter_state(m.trainer, POLICY).items()})
    step = trainer.step(trainer.sample_contexts([[{"role": "user", "content": p}] for p in prompts]))
    assert not step.skipped and math.isfinite(step.policy_loss) and math.isfinite(step.mean_kl)
    moved = worker.call(0, lambda m: any(not torch.equal(before[k], v) for k, v in adapter_state(m.trainer, POLICY).items()))
    assert moved
    assert 0 < step.copy_gap < 0.1  # what is sampled and what PPO scores stay one distribution
