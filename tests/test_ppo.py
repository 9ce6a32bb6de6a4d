"""PPO on the tiny model: log-prob parity, masking, the guard, and learning a rule."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_chat import store
from rlhf_chat.config import ModelConfig, PPOConfig
from rlhf_chat.loading import POLICY, adapter_state, load_models
from rlhf_chat.ppo import PPOTrainer, full_prefix, load_policy, policy_forward, policy_tensors, rollout, score_rollout
from rlhf_chat.worker import ModelWorker

CONTEXTS = [[{"role": "user", "content": q}] for q in ("hi", "what is tea?", "name a colour", "tell me a story")]


def tiny_ppo_config(**overrides) -> PPOConfig:
    cfg = PPOConfig(batch_size=8, minibatch_size=4, epochs=2, max_new_tokens=10, learning_rate=1e-2, kl_coef=0.02)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def first_token_rule(models, batch) -> torch.Tensor:
    """A scripted reward: 1 when the answer opens with a token from the lower half of the
    vocabulary. On one fixed prompt this is a bandit over the first token: a random
    tiny model has no structure to generalise a rule across positions, but it can
    learn which openings pay, exactly as PPO must."""
    half = len(models.tokenizer) // 2
    return (batch.response_ids[:, 0] < half).float()


@pytest.fixture
def fresh_models(tiny_path):
    return load_models(ModelConfig(name=str(tiny_path)))


def test_logprobs_match_a_plain_forward_at_temperature(fresh_models):
    m = fresh_models
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), seed=3)
    with torch.no_grad():
        prefix = full_prefix(m, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        lp, values, _ = policy_forward(
            m, prefix, batch.prompt_ids.shape[1], batch.response_ids, batch.response_mask, 0.7
        )
        # row 0 alone, no padding at all, through the ordinary causal-LM forward
        p_len = int(batch.prompt_mask[0].sum())
        ids = torch.cat([batch.prompt_ids[0, -p_len:], batch.response_ids[0]])[None]
        logits = m.trainer(input_ids=ids).logits[0, p_len - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[0][:, None]).squeeze(-1)
    n = int(batch.response_mask[0].sum())
    assert torch.allclose(lp[0, :n], expected[:n], atol=1e-4)
    assert values.shape == batch.response_ids.shape


def test_score_rollout_masks_after_eos_and_places_score_at_the_end(fresh_models):
    m = fresh_models
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), seed=4)
    # force an early EOS in row 0 to check masking after it
    batch.response_ids[0, 3] = m.tokenizer.eos_token_id
    batch.response_mask[0] = torch.tensor([1.0] * 4 + [0.0] * (batch.response_ids.shape[1] - 4))
    batch.finished[0] = True
    scored = score_rollout(m, batch, tiny_ppo_config(), 0.1, lambda models, b: torch.arange(4.0))
    assert torch.all(scored.rewards[0, 4:] == 0) and torch.all(scored.advantages[0, 4:] == 0)
    # at start the policy is the reference (LoRA B = 0), so the KL is 0 and reward is just the score
    assert torch.allclose(scored.kl, torch.zeros_like(scored.kl), atol=1e-5)
    assert scored.rewards[0, 3].item() == pytest.approx(0.0, abs=1e-5)  # score 0, no cut penalty
    last = batch.response_ids.shape[1] - 1
    assert scored.rewards[1, last].item() == pytest.approx(1.0 - 1.0, abs=1e-5)  # score 1 + missing-EOS -1


def mean_rule_score(worker, cfg, n: int = 64) -> float:
    """The rule's average over many fresh answers of the serving policy (less noisy than one step)."""
    batch = worker.call(0, lambda m: rollout(m, CONTEXTS[:1] * n, cfg, seed=123))
    return worker.call(0, lambda m: first_token_rule(m, batch).mean().item())


def test_ppo_learns_a_rule_with_bounded_kl(tiny_config):
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    cfg = tiny_ppo_config(learning_rate=3e-4, kl_coef=0.05, epochs=4)
    try:
        before = mean_rule_score(worker, cfg)
        trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, first_token_rule)
        results = [trainer.step(CONTEXTS[:1] * cfg.batch_size) for _ in range(30)]
        after = mean_rule_score(worker, cfg)
    finally:
        worker.stop()
    assert after > before + 0.15, (before, after, [round(r.mean_reward, 2) for r in results])
    assert max(r.mean_kl for r in results) < 8.0  # nats over a 10-token answer
    assert all(math.isfinite(r.policy_loss) and not r.skipped for r in results)
    assert [r.version for r in results] == list(range(1, 31))
    with sessions() as s:
        steps = store.ppo_steps(s)
        assert len(steps) == 30 and steps[-1].version == 30
        assert [c.version for c in store.checkpoints(s, "policy")] == [5, 10, 15, 20, 25, 30]


def test_non_finite_step_is_skipped_and_adapter_kept(tiny_config):
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        trainer = PPOTrainer(worker, sessions, tiny_ppo_config(), tiny_config.store.checkpoint_dir, first_token_rule)
        trainer.step(CONTEXTS * 2)  # one good step, so Adam has state to protect
        before = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
        trainer.score_fn = lambda models, b: torch.full((len(b.texts),), float("nan"))
        result = trainer.step(CONTEXTS * 2)
        after = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
        serving_same = worker.call(
            0, lambda m: all(torch.equal(adapter_state(m.serving, POLICY)[k], v) for k, v in adapter_state(m.trainer, POLICY).items())
        )
    finally:
        worker.stop()
    assert result.skipped and result.version == 1
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert serving_same


def test_policy_checkpoint_reloads(tiny_config, tiny_path):
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        trainer = PPOTrainer(worker, sessions, tiny_ppo_config(), tiny_config.store.checkpoint_dir, first_token_rule)
        trainer.step(CONTEXTS * 2)
        path = trainer.save(1)
        saved = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
    finally:
        worker.stop()
    fresh = load_models(ModelConfig(name=str(tiny_path)))
    assert load_policy(fresh, path) == 1 and fresh.serving_version == 1
    assert all(torch.equal(saved[k], v) for k, v in policy_tensors(fresh).items())

