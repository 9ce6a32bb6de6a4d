"""End to end on the tiny model: scripted votes -> reward model -> PPO must teach the
policy what the labeler prefers. Replacing any stage by a stub fails this test."""

from __future__ import annotations

import collections
import random

import torch

from rlhf_chat.config import SamplingConfig
from rlhf_chat.evaluation.simulate import collect_votes
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.learning.ppo import PPOTrainer, rollout
from rlhf_chat.learning.reward import reward_round_from_config
from rlhf_chat.model.loading import load_models
from rlhf_chat.storage import store

PROMPT = "tell me something"


def likes_an_opening(word: str):
    """Prefers the answer that opens with ``word``; "tie" unless exactly one of the two
    does (a strict labeler: length and everything else cannot win a vote)."""

    def label(prompt: str, a: str, b: str) -> str:
        if a.startswith(word) == b.startswith(word):
            return "tie"
        return "a" if a.startswith(word) else "b"

    return label


def answers(worker, cfg, n: int = 96, seed: int = 77) -> list[str]:
    """Fresh answers of the serving policy to the one prompt."""
    batch = worker.call(0, lambda m: rollout(m, [[{"role": "user", "content": PROMPT}]] * n, cfg.ppo, cfg.sampling, seed))
    return batch.texts


def an_opening_it_writes_now_and_then(worker, cfg) -> str:
    """The starting model's most frequent opening word: a taste the labeler can ask for
    that the policy can learn to write more often."""
    words = collections.Counter(text.split()[0] for text in answers(worker, cfg, seed=5) if text.split())
    return words.most_common(1)[0][0]


def test_votes_train_a_reward_model_that_teaches_ppo_the_labelers_taste(tiny_config):
    cfg = tiny_config
    cfg.sampling = SamplingConfig(max_new_tokens=6, temperature=0.7)
    cfg.reward.steps_per_round, cfg.reward.min_pairs, cfg.reward.learning_rate = 40, 4, 2e-3
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs, cfg.ppo.learning_rate = 8, 8, 4, 1e-3
    sessions = store.open_store(cfg.store.db_url)
    worker = ModelWorker(lambda: load_models(cfg.model)).start()
    try:
        word = an_opening_it_writes_now_and_then(worker, cfg)
        before = sum(t.startswith(word) for t in answers(worker, cfg)) / 96
        collect_votes(worker, sessions, [PROMPT], likes_an_opening(word), 96, cfg, random.Random(0))
        result = reward_round_from_config(worker, sessions, cfg)
        assert result is not None and result.train_pairs >= 8
        trainer = PPOTrainer.from_config(worker, sessions, cfg)
        context = [{"role": "user", "content": PROMPT}]
        steps = [trainer.step([context] * cfg.ppo.batch_size) for _ in range(20)]
        after = sum(t.startswith(word) for t in answers(worker, cfg)) / 96
    finally:
        worker.stop()
    assert result.train_accuracy is not None and result.train_accuracy > 0.8
    assert after > before + 0.2, (word, before, after, result, [round(s.mean_reward, 2) for s in steps])
    assert torch.isfinite(torch.tensor([s.mean_kl for s in steps])).all()
