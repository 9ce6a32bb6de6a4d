"""PPO on the tiny model: log-prob parity, masking, the reference, the guard, and learning a rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_chat.config import ModelConfig, PPOConfig, SamplingConfig
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.learning import ppo as ppo_module
from rlhf_chat.learning.ppo import (
    PPOTrainer,
    ScoreNormalizer,
    full_prefix,
    load_policy,
    policy_forward,
    policy_tensors,
    rollout,
    score_rollout,
)
from rlhf_chat.model.heads import first_adapted_layer
from rlhf_chat.model.loading import POLICY, adapter_state, fast_matmul_dtype, load_models, sync_policy_weights
from rlhf_chat.storage import store

CONTEXTS = [[{"role": "user", "content": q}] for q in ("hi", "what is tea?", "name a colour", "tell me a story")]
SAMPLING = SamplingConfig(max_new_tokens=10, temperature=0.9)


def tiny_ppo_config(**overrides) -> PPOConfig:
    # Plain rollouts unless a test asks for guided rows (its own tests below).
    cfg = PPOConfig(batch_size=8, minibatch_size=4, epochs=2, learning_rate=1e-2, kl_coef=0.02, guided_fraction=0.0)
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


def perturb_policy(models, seed: int = 0, std: float = 0.5) -> None:
    """Give the policy adapter non-zero weights (LoRA B starts at 0: policy == reference)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_state(models.trainer, POLICY).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


@pytest.fixture
def fresh_models(tiny_path):
    return load_models(ModelConfig(name=str(tiny_path)))


def test_the_tiny_model_runs_the_frozen_prefix_split(fresh_models):
    """Production adapts the top 8 layers and runs the ones below once, without autograd."""
    layers = fresh_models.trainer.config.num_hidden_layers
    assert first_adapted_layer(fresh_models.trainer) == layers - ModelConfig().lora_top_layers > 0


def test_logprobs_match_a_plain_forward_at_temperature(tiny_path):
    """The batch's log-probs (frozen prefix, adapted layers, temperature, masks) are
    row 0's through a plain forward of its own. Compared on float32 weights: on the
    default path (NF4, bf16 on AVX-512 CPUs) a batch of 4 and a row alone may round
    apart (AMX), and this random model turns that into nats (conftest.tiny_fp32_models)."""
    m = load_models(ModelConfig(name=str(tiny_path), weights="fp32"))
    perturb_policy(m)  # so the adapted layers matter
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=3)
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
    assert torch.allclose(lp[0, :n], expected[:n], atol=1e-3)
    assert values.shape == batch.response_ids.shape
    # An answer that ended after 4 tokens: 0 past its end, and the output layer ran on the real tokens only.
    ended = batch.response_mask.clone()
    ended[0, 4:] = 0
    with torch.no_grad():
        lp_ended, _, logp = policy_forward(m, prefix, batch.prompt_ids.shape[1], batch.response_ids, ended, 0.7)
    assert torch.equal(lp_ended[0, 4:], torch.zeros_like(lp_ended[0, 4:]))
    assert torch.allclose(lp_ended[0, :4], expected[:4], atol=1e-3)
    assert logp.shape == (int(ended.sum()), m.trainer.config.vocab_size)


def test_rollout_is_drawn_with_the_sampling_scheme_and_records_its_log_probs(fresh_models):
    """The serving copy's log-probs of its own draws are kept, at the scheme's temperature,
    and their gap to the training copy's is measured. (The random tiny model's logits
    are huge, so bf16 rounding makes its gap large; the bundled model's is measured in
    test_bundled.py.)"""
    m = fresh_models
    perturb_policy(m)
    from rlhf_chat.model.loading import sync_policy_weights

    sync_policy_weights(m.trainer, m.serving)
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=5)
    assert batch.temperature == SAMPLING.temperature and batch.response_ids.shape[1] <= SAMPLING.max_new_tokens
    scored = score_rollout(m, batch, tiny_ppo_config(), 0.0, lambda models, b: torch.zeros(len(b.texts)))
    gap = (scored.logprobs - scored.sample_logprobs).abs()[scored.response_mask.bool()]
    assert scored.copy_gap == pytest.approx(gap.mean().item())
    assert scored.copy_gap > 0  # two copies (float32 / bf16 kernels): close, not equal
    with pytest.raises(ValueError, match="top_p 1.0"):
        rollout(m, CONTEXTS, tiny_ppo_config(), SamplingConfig(max_new_tokens=4, top_p=0.9), seed=5)


def test_score_rollout_masks_after_eos_and_places_score_minus_kl_at_the_end(fresh_models):
    m = fresh_models
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=4)
    perturb_policy(m)  # after sampling: the policy now differs from the reference, KL != 0
    # force an early EOS in row 0 to check masking after it
    batch.response_ids[0, 3] = m.tokenizer.eos_token_id
    batch.response_mask[0] = torch.tensor([1.0] * 4 + [0.0] * (batch.response_ids.shape[1] - 4))
    batch.finished = [True, False, False, False]
    raw = torch.tensor([2.0, 3.0, 5.0, 7.0])
    cfg, beta = tiny_ppo_config(missing_eos_penalty=-1.5), 0.1
    scored = score_rollout(m, batch, cfg, beta, lambda models, b: raw)
    assert torch.all(scored.rewards[0, 4:] == 0) and torch.all(scored.advantages[0, 4:] == 0)
    kl = scored.logprobs - scored.ref_logprobs  # k1, by hand
    assert kl[scored.response_mask.bool()].abs().max() > 1e-2  # the reference really is another model
    assert torch.allclose(scored.kl, kl * scored.response_mask, atol=1e-6)
    # row 0 finished: its score alone at its EOS; the cut rows pay the missing-EOS penalty
    assert scored.rewards[0, 3].item() == pytest.approx(2.0 - beta * kl[0, 3].item(), abs=1e-5)
    last = batch.response_ids.shape[1] - 1
    for row, score in ((1, 3.0), (2, 5.0), (3, 7.0)):
        assert scored.rewards[row, last].item() == pytest.approx(score - 1.5 - beta * kl[row, last].item(), abs=1e-5)
        assert scored.rewards[row, 0].item() == pytest.approx(-beta * kl[row, 0].item(), abs=1e-6)


def test_score_rollout_reads_the_policy_adapter_whatever_ran_before(fresh_models):
    """A reward round leaves the reward adapter active in the training copy; the next
    rollout must still be scored under the policy's own adapter, and leave it active."""
    from rlhf_chat.model.loading import REWARD

    m = fresh_models
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=8)
    perturb_policy(m, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a reward adapter unlike the policy's
        for name, p in adapter_state(m.trainer, REWARD).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    zero = lambda models, b: torch.zeros(len(b.texts))  # noqa: E731
    under_policy = score_rollout(m, batch, tiny_ppo_config(), 0.0, zero).logprobs.clone()
    m.trainer.set_adapter(REWARD)  # what a reward round leaves behind
    again = score_rollout(m, batch, tiny_ppo_config(), 0.0, ppo_module.reward_model_scores)  # which reads REWARD
    assert torch.allclose(again.logprobs, under_policy, atol=1e-5)
    assert m.trainer.active_adapter == POLICY  # and hands the policy's adapter back to the update


def scored_batch(m, seed: int = 9):
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=seed)
    perturb_policy(m, seed=seed)
    return score_rollout(m, batch, tiny_ppo_config(), 0.05, lambda models, b: torch.tensor([1.0, -1.0, 2.0, -2.0]))


def test_a_minibatch_update_moves_the_policy_adapter_whatever_was_active(fresh_models):
    """Only the policy's LoRA and the value head move, even when the reward adapter was
    the active one (as a reward round leaves it)."""
    from rlhf_chat.learning.ppo import make_optimizer, minibatch_update
    from rlhf_chat.model.loading import REWARD

    m = fresh_models
    batch = scored_batch(m)
    optimizer = make_optimizer(m, tiny_ppo_config())
    before = {k: v.detach().clone() for k, v in m.trainer.named_parameters() if "lora_" in k}
    m.trainer.set_adapter(REWARD)
    stats = minibatch_update(m, optimizer, batch, [0, 1, 2, 3], tiny_ppo_config())
    assert stats["finite"]
    after = dict(m.trainer.named_parameters())
    moved = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert moved and all(f".{POLICY}." in k for k in moved), sorted(moved)[:3]
    # the LM term runs only with a positive coefficient: at 0 it costs nothing and reports nothing
    from rlhf_chat.learning.supervised import SupervisedExample

    examples = [SupervisedExample(CONTEXTS[0], "Blue is calm.")]
    assert "ptx_loss" not in minibatch_update(m, optimizer, batch, [0, 1], tiny_ppo_config(ptx_coef=0.0), examples)
    assert minibatch_update(m, optimizer, batch, [0, 1], tiny_ppo_config(ptx_coef=0.5), examples)["ptx_loss"] > 0


class SavedTensorPeak:
    """The most bytes autograd held saved for backward at any one time, while active
    (each saved tensor counted by its own size, so views overcount alike everywhere)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        import weakref

        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        holder = _Held(tensor)
        weakref.finalize(holder, self.free, size)
        return holder

    def free(self, size: int) -> None:
        self.live -= size

    def unpack(self, holder):
        return holder.tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class _Held:
    def __init__(self, tensor):
        self.tensor = tensor


def test_a_minibatch_update_sends_each_term_back_alone_with_the_gradients_of_their_sum(fresh_models, monkeypatch):
    """PPO's term and PPO-ptx's two terms go back one at a time: the update is the one
    their sum would make, and autograd never holds the three graphs at once (the
    biggest job of a Space under load, bench/job_memory.py)."""
    from rlhf_chat.learning.ppo import make_optimizer, minibatch_update, restore, snapshot
    from rlhf_chat.learning.supervised import SupervisedExample

    m = fresh_models
    batch = scored_batch(m)
    cfg = tiny_ppo_config(ptx_coef=0.5, ptx_reference_coef=0.5)
    optimizer = make_optimizer(m, cfg)
    chosen = [SupervisedExample(c, "Blue is calm and the sea is wide.") for c in CONTEXTS]
    anchors = [SupervisedExample(c, "Tea is a drink made from leaves.") for c in CONTEXTS]
    saved = snapshot(m, optimizer)
    real_step, real_clip, held, grads = optimizer.step, torch.nn.utils.clip_grad_norm_, [], []

    def record_then_step(*args, **kwargs):  # the gradients the update applies
        grads.append(torch.cat([p.grad.flatten() for p in ppo_module.policy_parameters(m)]).clone())
        return real_step(*args, **kwargs)

    def update() -> tuple[dict, int]:
        restore(m, optimizer, saved)
        with SavedTensorPeak() as peak:
            stats = minibatch_update(m, optimizer, batch, [0, 1, 2, 3], cfg, chosen, anchors)
        return stats, peak.peak

    def hold(loss):  # the sum's way: every graph kept until one backward of the total
        held.append(loss)
        return loss.item()

    def backward_the_sum_then_clip(params, max_norm):
        sum(held).backward()
        held.clear()
        return real_clip(params, max_norm)

    monkeypatch.setattr(optimizer, "step", record_then_step)
    split, split_peak = update()
    monkeypatch.setattr(ppo_module, "backward_if_finite", hold)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", backward_the_sum_then_clip)
    summed, summed_peak = update()
    assert split["finite"] and summed["finite"] and split["loss"] == pytest.approx(summed["loss"], rel=1e-6)
    assert split["ptx_loss"] > 0 and split["ptx_reference_loss"] > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6 * grads[1].abs().max().item())
    assert split_peak < 0.75 * summed_peak, (split_peak, summed_peak)


def test_recomputing_the_top_layers_makes_the_same_update_with_less_kept_for_backward(fresh_models, monkeypatch):
    """model.recompute_top_layers: PPO's update and PPO-ptx's term keep only each adapted
    layer's input for the backward pass and run the layer again there: the same
    gradients, and far fewer bytes held by autograd at once."""
    from rlhf_chat.learning.ppo import make_optimizer, minibatch_update, restore, snapshot
    from rlhf_chat.learning.supervised import SupervisedExample

    m = fresh_models
    batch = scored_batch(m)
    cfg = tiny_ppo_config(ptx_coef=0.5)
    optimizer = make_optimizer(m, cfg)
    chosen = [SupervisedExample(c, "Blue is calm and the sea is wide.") for c in CONTEXTS]
    saved, real_step, grads = snapshot(m, optimizer), optimizer.step, []

    def record_then_step(*args, **kwargs):
        grads.append(torch.cat([p.grad.flatten() for p in ppo_module.policy_parameters(m)]).clone())
        return real_step(*args, **kwargs)

    def update(recompute: bool) -> int:
        restore(m, optimizer, saved)
        monkeypatch.setattr(m, "recompute_top_layers", recompute)
        with SavedTensorPeak() as peak:
            assert minibatch_update(m, optimizer, batch, [0, 1, 2, 3], cfg, chosen)["finite"]
        return peak.peak

    monkeypatch.setattr(optimizer, "step", record_then_step)
    kept, recomputed = update(False), update(True)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6 * grads[0].abs().max().item())
    assert recomputed < 0.9 * kept, (recomputed, kept)  # 0.76 on the tiny model: its vocabulary dominates
    assert ModelConfig().recompute_top_layers  # the default


def test_a_minibatch_update_weights_tokens_by_the_truncated_importance_ratio(fresh_models):
    """Tokens sampled by the serving copy are weighted by min(p_train / p_serving, cap)
    in the policy loss: with the serving log-probs 0.5 below the training copy's, every
    weight is e^0.5, so the loss is e^0.5 times the unweighted one."""
    import copy

    from rlhf_chat.learning.ppo import make_optimizer, minibatch_update

    m = fresh_models
    batch = scored_batch(m)
    state = {k: v.detach().clone() for k, v in policy_tensors(m).items()}

    def loss_with(sample_logprobs, cap: float) -> float:
        with torch.no_grad():
            for k, v in policy_tensors(m).items():
                v.copy_(state[k])
        b = copy.copy(batch)
        b.sample_logprobs = sample_logprobs
        b.advantages = torch.ones_like(batch.advantages)  # whitened ones average 0: the loss would be 0 too
        cfg = tiny_ppo_config(importance_cap=cap)
        return minibatch_update(m, make_optimizer(m, cfg), b, [0, 1, 2, 3], cfg)["policy_loss"]

    plain = loss_with(None, 2.0)
    assert plain == pytest.approx(-1.0, rel=1e-4)  # ratio 1 at the rollout's own weights
    assert loss_with(batch.logprobs - 0.5, 2.0) == pytest.approx(math.exp(0.5) * plain, rel=1e-4)
    assert loss_with(batch.logprobs - 0.5, 0.0) == pytest.approx(plain, rel=1e-6)  # cap 0: no weights
    assert loss_with(batch.logprobs - 5.0, 2.0) == pytest.approx(2.0 * plain, rel=1e-4)  # truncated at the cap
    assert loss_with(batch.logprobs - 0.5, 0.5) == pytest.approx(0.5 * plain, rel=1e-4)  # a cap below 1 too


def test_the_first_update_forward_is_the_scoring_pass_it_replaces(fresh_models):
    """Scored without its policy pass, a batch gets the policy's log-probs, values,
    rewards and advantages from the first minibatch's forward (rows in any order):
    the same numbers as the separate pass, and the same update."""
    import copy

    from rlhf_chat.learning.ppo import make_optimizer, minibatch_update

    m = fresh_models
    perturb_policy(m, seed=5)
    drawn = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=5)
    start = {k: v.detach().clone() for k, v in policy_tensors(m).items()}
    cfg = tiny_ppo_config(minibatch_size=4, epochs=1)
    rule = lambda models, b: torch.tensor([1.0, -1.0, 2.0, -2.0])  # noqa: E731

    def updated(policy_pass: bool):
        with torch.no_grad():
            for k, v in policy_tensors(m).items():
                v.copy_(start[k])
        batch = score_rollout(m, copy.deepcopy(drawn), cfg, 0.05, rule, policy_pass=policy_pass)
        assert (batch.logprobs is None) != policy_pass
        stats = minibatch_update(m, make_optimizer(m, cfg), batch, [2, 0, 3, 1], cfg)
        return batch, stats, {k: v.detach().clone() for k, v in policy_tensors(m).items()}

    separate, separate_stats, separate_after = updated(True)
    fused, fused_stats, fused_after = updated(False)
    for name in ("logprobs", "values", "kl", "rewards", "advantages", "returns", "sample_logprobs"):
        assert torch.allclose(getattr(fused, name), getattr(separate, name), atol=1e-6), name
    assert fused.copy_gap == pytest.approx(separate.copy_gap, abs=1e-7) and fused.copy_gap > 0
    assert fused_stats["policy_loss"] == pytest.approx(separate_stats["policy_loss"], abs=1e-6)
    assert all(torch.allclose(fused_after[k], separate_after[k], atol=1e-6) for k in start)
    assert any(not torch.equal(fused_after[k], start[k]) for k in start)  # it did update
    # a first minibatch short of some rows cannot supply them
    batch = score_rollout(m, copy.deepcopy(drawn), cfg, 0.05, rule, policy_pass=False)
    with pytest.raises(ValueError, match="every row"):
        minibatch_update(m, make_optimizer(m, cfg), batch, [0, 1], cfg)


@pytest.mark.parametrize("kernel", ["avx2", "torch"])
def test_a_rollout_keeps_the_frozen_layers_output_only_where_the_serving_copy_computes_it_exactly(
    tiny_path, kernel, monkeypatch
):
    """On the native kernels (float32, the training copy's weights) the rollout keeps
    the frozen layers' output as its prefix, and scoring does not compute it again:
    it is the training copy's own at every real position. On torch's int4 kernel
    (bf16 activations) the training copy computes its own."""
    from rlhf_chat.model import native

    if kernel == "avx2":
        try:
            native.library(ModelConfig().cache_dir)
        except native.NativeUnavailable as error:
            pytest.skip(f"native kernels unavailable: {error}")
    m = load_models(ModelConfig(name=str(tiny_path), weights="int4", int4_kernel=kernel))
    perturb_policy(m, seed=2)
    sync_policy_weights(m.trainer, m.serving)
    contexts = [CONTEXTS[0], *CONTEXTS, CONTEXTS[2]]  # rows with one prompt are prefilled once: twins
    batch = rollout(m, contexts, tiny_ppo_config(), SAMPLING, seed=2)
    assert rollout(m, contexts, tiny_ppo_config(), SAMPLING, seed=2, keep_prefix=False).prefix is None
    if kernel == "torch" or fast_matmul_dtype(m.device) != torch.float32:  # (a bf16 training copy: not its function)
        assert batch.prefix is None
        return
    with torch.no_grad():
        expected = full_prefix(m, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    real = expected.mask.bool()
    assert torch.equal(batch.prefix.mask, expected.mask) and batch.prefix.split == expected.split
    gap = (batch.prefix.hidden - expected.hidden)[real].abs() / (1.0 + expected.hidden[real].abs())
    assert gap.max() <= 1e-3, gap.max()
    computed = []
    monkeypatch.setattr(ppo_module, "full_prefix", lambda *a: computed.append(1))
    scored = score_rollout(m, batch, tiny_ppo_config(), 0.05, lambda models, b: torch.zeros(len(b.texts)))
    assert not computed and scored.prefix is batch.prefix and 0 < scored.copy_gap < 1e-3


def test_a_minibatchs_rows_go_back_in_the_batchs_order_and_only_a_whole_batch_fills_it():
    """The first update's forward fills the policy's terms only from a minibatch of every row."""
    from rlhf_chat.learning.ppo import in_row_order

    lp, values = torch.tensor([[20.0], [0.0], [10.0]]), torch.tensor([[2.0], [0.0], [1.0]])
    ordered = in_row_order(torch.tensor([2, 0, 1]), 3, lp, values)
    assert [t.flatten().tolist() for t in ordered] == [[0.0, 10.0, 20.0], [0.0, 1.0, 2.0]]
    with pytest.raises(ValueError, match="every row"):
        in_row_order(torch.tensor([2, 0]), 3, lp[:2])
    with pytest.raises(ValueError, match="every row"):
        in_row_order(torch.tensor([0, 0, 1]), 3, lp)


def test_a_step_of_one_minibatch_runs_one_policy_pass_fewer(tiny_config, monkeypatch):
    """With one minibatch of every row, a step's policy forwards are the reference's
    and one per epoch; with two minibatches, the scoring pass comes back."""
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    calls, real_forward = [], ppo_module.policy_forward

    def count(*args, **kwargs):
        calls.append(1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(ppo_module, "policy_forward", count)
    try:
        counts = []
        for minibatch in (8, 4):
            cfg = tiny_ppo_config(minibatch_size=minibatch, epochs=2)
            trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
            calls.clear()
            result = trainer.step(CONTEXTS * 2)
            assert not result.skipped and math.isfinite(result.mean_kl) and result.copy_gap > 0
            counts.append(len(calls))
    finally:
        worker.stop()
    assert counts == [1 + 2, 1 + 1 + 2 * 2]


def test_a_step_whose_update_never_ran_still_scores_its_policy(tiny_config):
    """With no epoch (nothing to fill the policy's terms on the way), the step still
    reports a KL and a copy gap, and publishes."""
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        cfg = tiny_ppo_config(minibatch_size=8, epochs=0)
        trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
        result = trainer.step(CONTEXTS * 2)
    finally:
        worker.stop()
    assert not result.skipped and math.isfinite(result.mean_kl) and result.copy_gap > 0


def test_a_non_finite_first_minibatch_of_every_row_still_fills_the_steps_report(tiny_config, monkeypatch):
    """The first minibatch both fills the policy's terms and updates: when its loss is
    NaN the step is skipped, the adapter stays, and the report still has its KL and gap."""
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    real_loss = ppo_module.pm.clipped_policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(ppo_module.pm, "clipped_policy_loss", nan_loss)
    try:
        cfg = tiny_ppo_config(minibatch_size=8, epochs=2)
        trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
        before = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
        result = trainer.step(CONTEXTS * 2)
        after = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
    finally:
        worker.stop()
    assert result.skipped and result.version == 0
    assert math.isfinite(result.mean_kl) and result.copy_gap > 0
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_empty_answer_scores_the_fixed_empty_answer_score(fresh_models):
    """An answer with no text gets ``empty_answer_score`` whatever the reward model says."""
    m = fresh_models
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=4)
    batch.finished = [True] * 4
    batch.texts[2] = "  "
    cfg = tiny_ppo_config(empty_answer_score=-3.0)
    scored = score_rollout(m, batch, cfg, 0.1, lambda models, b: torch.tensor([2.0, 3.0, 5.0, 7.0]))
    assert scored.scores.tolist() == [2.0, 3.0, -3.0, 7.0]


def test_reference_pass_runs_without_the_adapter(fresh_models):
    """The reference log-probs are the base model's (no adapter), and differ from the policy's."""
    m = fresh_models
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=6)
    with torch.no_grad():
        prefix = full_prefix(m, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        args = (prefix, batch.prompt_ids.shape[1], batch.response_ids, batch.response_mask, batch.temperature)
        base, _, _ = policy_forward(m, *args, with_values=False)  # LoRA B = 0: the base model
    perturb_policy(m)
    scored = score_rollout(m, batch, tiny_ppo_config(), 0.05, lambda models, b: torch.zeros(len(b.texts)))
    assert torch.allclose(scored.ref_logprobs, base, atol=1e-5)
    assert not torch.allclose(scored.logprobs, base, atol=1e-2)


def test_scores_are_normalised_by_running_statistics_of_rollouts_per_reward_version():
    norm = ScoreNormalizer()
    first = norm.normalize(torch.tensor([1.0, 3.0]), reward_version=1)
    assert first.tolist() == pytest.approx([-2**-0.5, 2**-0.5])  # mean 2, std sqrt(2)
    second = norm.normalize(torch.tensor([5.0, 7.0]), reward_version=1)
    everything = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert second.tolist() == pytest.approx(((torch.tensor([5.0, 7.0]) - everything.mean()) / everything.std()).tolist())
    # a new reward model scores on its own scale: its statistics start again
    third = norm.normalize(torch.tensor([10.0, 20.0]), reward_version=2)
    assert third.tolist() == pytest.approx([-2**-0.5, 2**-0.5]) and norm.moments.count == 2
    assert ScoreNormalizer.from_dict(norm.to_dict()) == norm


def mean_rule_score(worker, cfg, n: int = 64) -> float:
    """The rule's average over many fresh answers of the serving policy (less noisy than one step)."""
    batch = worker.call(0, lambda m: rollout(m, CONTEXTS[:1] * n, cfg, SAMPLING, seed=123))
    return worker.call(0, lambda m: first_token_rule(m, batch).mean().item())


def test_ppo_learns_a_rule_with_bounded_kl(tiny_config):
    STEPS = 20  # noqa: N806  (0.75 -> 0.97 on the rule by step 20; 30 steps added time, not evidence)
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    cfg = tiny_ppo_config(learning_rate=3e-4, kl_coef=0.05, epochs=4)
    try:
        before = mean_rule_score(worker, cfg)
        trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
        results = [trainer.step(CONTEXTS[:1] * cfg.batch_size) for _ in range(STEPS)]
        after = mean_rule_score(worker, cfg)
    finally:
        worker.stop()
    # Half the way to always at least: where the random model starts depends on the
    # CPU's kernels (0.75 on AVX-512, 0.875 on an AVX2-only CPU); without learning the
    # same seeded measurement gives the same figure again.
    assert after - before >= 0.5 * (1 - before) and after > before, (before, after, [round(r.mean_reward, 2) for r in results])
    kls = [r.mean_kl for r in results]
    assert kls[0] == pytest.approx(0.0, abs=1e-3) and max(kls[-5:]) > 0.05  # the policy moved away ...
    assert max(kls) < 8.0  # ... by a bounded amount (nats over a 10-token answer)
    assert all(math.isfinite(r.policy_loss) and not r.skipped for r in results)
    assert [r.version for r in results] == list(range(1, STEPS + 1))
    with sessions() as s:
        steps = store.ppo_steps(s)
        assert len(steps) == STEPS and steps[-1].version == STEPS
        assert all(step.copy_gap is not None and step.copy_gap > 0 for step in steps)
        assert [c.version for c in store.checkpoints(s, "policy")] == list(range(5, STEPS + 1, 5))


def test_non_finite_step_after_a_real_update_restores_adapter_and_optimizer(tiny_config, monkeypatch):
    """The third minibatch's loss turns NaN after two real optimizer steps of the same
    PPO step: the adapter, the value head and Adam's state go back to before the step."""
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        trainer = PPOTrainer(worker, sessions, tiny_ppo_config(), tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
        trainer.step(CONTEXTS * 2)  # one good step, so Adam has state to protect
        before = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
        adam_before = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
        real_loss, calls = ppo_module.pm.clipped_policy_loss, []

        def nan_on_third_call(*args, **kwargs):
            calls.append(1)
            loss, stats = real_loss(*args, **kwargs)
            return (loss * float("nan") if len(calls) == 3 else loss), stats

        moved = []
        real_update = ppo_module.minibatch_update

        def watch(models, *args, **kwargs):
            stats = real_update(models, *args, **kwargs)
            moved.append(any(not torch.equal(before[k], v) for k, v in policy_tensors(models).items()))
            return stats

        monkeypatch.setattr(ppo_module.pm, "clipped_policy_loss", nan_on_third_call)
        monkeypatch.setattr(ppo_module, "minibatch_update", watch)
        result = trainer.step(CONTEXTS * 2)
        after = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
        serving_same = worker.call(
            0, lambda m: all(torch.equal(adapter_state(m.serving, POLICY)[k], v) for k, v in adapter_state(m.trainer, POLICY).items())
        )
    finally:
        worker.stop()
    assert moved[:2] == [True, True] and len(moved) == 3  # two real steps, then the NaN one stopped it
    assert result.skipped and result.version == 1
    assert all(torch.equal(before[k], after[k]) for k in before)
    adam_after = trainer.optimizer.state_dict()["state"][0]
    assert all(torch.equal(adam_before[k], adam_after[k]) for k in adam_before)
    assert serving_same


def test_policy_checkpoint_reloads_into_both_copies(tiny_config, tiny_path):
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        trainer = PPOTrainer(worker, sessions, tiny_ppo_config(), tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
        trainer.step(CONTEXTS * 2)
        path = trainer.save(1)
        saved = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
        texts = worker.call(0, lambda m: rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=9).texts)
    finally:
        worker.stop()
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # the step moved the adapter
    fresh = load_models(ModelConfig(name=str(tiny_path)))
    assert load_policy(fresh, path) == 1 and fresh.serving_version == 1
    assert all(torch.equal(saved[k], v) for k, v in policy_tensors(fresh).items())
    serving = adapter_state(fresh.serving, POLICY)
    assert all(torch.equal(serving[k], v) for k, v in adapter_state(fresh.trainer, POLICY).items())
    # the serving copy answers as the saved policy did, token for token
    assert rollout(fresh, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=9).texts == texts

    # a checkpoint names the base it was trained on; another base refuses it, whole
    other = load_models(ModelConfig(name=str(tiny_path), weights="bf16"))
    before = {k: v.clone() for k, v in policy_tensors(other).items()}
    with pytest.raises(ValueError, match=r"trained on model .* with nf4 weights; this process runs .* with bf16"):
        load_policy(other, path)
    assert other.serving_version == 0 and all(torch.equal(before[k], v) for k, v in policy_tensors(other).items())
    meta = json.loads((Path(path) / "meta.json").read_text())
    del meta["base"]  # as an older version wrote it
    (Path(path) / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not name the base"):
        load_policy(fresh, path)


def test_ptx_term_learns_the_chosen_answers_and_changes_the_update(tiny_config):
    """PPO-ptx: with ptx_coef > 0 the update also lowers the policy's loss on the answers
    people chose (drawn from the stored votes); with 0 the same steps leave it alone."""
    from rlhf_chat.generation.candidates import Candidate
    from rlhf_chat.learning.supervised import chosen_answers, lm_loss

    sessions = store.open_store(tiny_config.store.db_url)
    with sessions() as s, s.begin():
        for i, ctx in enumerate(CONTEXTS):
            shown = [Candidate(t, "policy", 0, 0, 0.7, 1.0, 10, 3, True, 0.1) for t in ("Blue is calm.", f"no {i}")]
            s.flush()
            store.record_vote(s, store.save_pair(s, session_id="t", context=ctx, a=shown[0], b=shown[1]).id, "a")
    with sessions() as s:
        examples = chosen_answers(s, 100)
        assert chosen_answers(s, 100, only_mode_pairs=True) == []  # plain pairs: not winners that differ
    assert [e.text for e in examples] == ["Blue is calm."] * 4 and all(e.finished for e in examples)

    def run(ptx_coef: float) -> tuple[float, float, dict]:
        worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
        try:
            cfg = tiny_ppo_config(ptx_coef=ptx_coef, learning_rate=3e-3, ptx_from="all", ptx_batch=4)
            trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
            trainer.rng.seed(0)
            before = worker.call(0, lambda m: lm_loss(m, examples, 256).item())
            results = [trainer.step(CONTEXTS * 2) for _ in range(4)]
            after = worker.call(0, lambda m: lm_loss(m, examples, 256).item())
            weights = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
        finally:
            worker.stop()
        assert all(r.ptx_loss is not None for r in results) == (ptx_coef > 0)
        return before, after, weights

    before, with_ptx, w_ptx = run(1.0)
    _, without, w_plain = run(0.0)
    assert with_ptx < before - 0.5, (before, with_ptx)  # it learned to write the chosen answer
    assert with_ptx < without - 0.5, (with_ptx, without)
    assert any(not torch.equal(w_ptx[k], w_plain[k]) for k in w_ptx)


def test_votes_between_modes_teach_the_plain_policy_the_chosen_behaviour(tiny_config):
    """Learning from the chosen answers: votes between a follow-up answer (chosen) and a
    direct one teach the *plain* policy, with no mode in its context, to ask a question
    on prompts it never saw. The same steps without the supervised term (a stub that
    learns nothing from the winners) leave it at zero."""
    from rlhf_chat.generation.candidates import Candidate
    from rlhf_chat.text.behaviours import asks_question

    # Short questions to the reader: a random tiny model learns which words to write
    # long before it learns their order, and this behaviour survives any order.
    asked = "Could you? Would you? Can you? Do you?"
    sessions = store.open_store(tiny_config.store.db_url)
    with sessions() as s, s.begin():
        for ctx in CONTEXTS:
            shown = [Candidate(asked, "policy", 0, 0, 0.7, 1.0, 10, 11, True, 0.1, mode="follow_up"),
                     Candidate("Tea is a drink.", "policy", 0, 0, 0.7, 1.0, 10, 5, True, 0.1, mode="direct")]
            store.record_vote(s, store.save_pair(s, session_id="t", context=ctx, a=shown[0], b=shown[1]).id, "a")
    unseen = [[{"role": "user", "content": q}] for q in ("why is the sea salty?", "how do birds fly?")]

    def share_after(ptx_coef: float) -> tuple[float, float]:
        worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
        try:
            cfg = tiny_ppo_config(ptx_coef=ptx_coef, learning_rate=1e-2, ptx_batch=4)
            trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, no_reward, SAMPLING)
            trainer.rng.seed(0)
            sampling = SamplingConfig(max_new_tokens=14, temperature=0.7)

            def share() -> float:
                texts = worker.call(0, lambda m: rollout(m, unseen * 8, tiny_ppo_config(), sampling, seed=5).texts)
                return sum(map(asks_question, texts)) / len(texts)

            before = share()
            for _ in range(12):
                trainer.step(CONTEXTS * 2)
            return before, share()
        finally:
            worker.stop()

    def no_reward(models, batch):  # the reward model is not what is tested: only the winners teach
        return torch.zeros(batch.response_ids.shape[0])

    before, with_winners = share_after(5.0)
    _, stub = share_after(0.0)
    assert before == 0.0 and stub == 0.0
    assert with_winners >= 0.3, with_winners


def row_alone(batch, row: int):
    """Row ``row`` of an unscored rollout as a batch of its own, without padding."""
    import dataclasses

    prompt = batch.prompt_mask[row].bool()
    n = int(batch.response_mask[row].sum())
    answer = lambda t: None if t is None else t[row : row + 1, :n].clone()  # noqa: E731
    return dataclasses.replace(
        batch, contexts=[batch.contexts[row]], texts=[batch.texts[row]], finished=[batch.finished[row]],
        prompt_ids=batch.prompt_ids[row : row + 1, prompt], prompt_mask=batch.prompt_mask[row : row + 1, prompt],
        response_ids=answer(batch.response_ids), response_mask=answer(batch.response_mask),
        sample_logprobs=answer(batch.sample_logprobs), forced=answer(batch.forced), prefix=None,
    )


@pytest.mark.parametrize("weights", ["nf4", "fp32"])
def test_a_guided_row_opens_its_answer_with_the_opening_scored_as_the_policys_own(tiny_path, weights):
    """A guided row's opening is part of the answer, after the plain prompt: the
    training copy scores its tokens as the plain policy's, their importance weight
    is 1 (nothing drew them), and the copy gap counts only what was drawn. A plain
    row beside guided ones stays a plain row.

    What two batch layouts compute (with and without guided rows beside a row, a
    batch against one row alone) is compared on float32 weights only: on the default
    path (NF4, bf16 on AVX-512 CPUs) a product's last bit may depend on its row count
    (AMX), and this wide random model turns one bf16 ulp into nats, so there only
    what rounding cannot move is checked (ids, masks, which tokens were forced)."""
    m = load_models(ModelConfig(name=str(tiny_path), weights=weights))
    rounds = weights != "fp32"
    tok = m.tokenizer
    perturb_policy(m)
    sync_policy_weights(m.trainer, m.serving)
    opening = "For example,"
    opening_ids = tok.encode(opening, add_special_tokens=False)
    openings = ["", opening, "", opening]
    plain = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=6)
    batch = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=6, openings=openings)
    assert torch.equal(batch.prompt_ids, plain.prompt_ids)  # the plain context: no opening in the prompt
    for k, o in enumerate(openings):
        n = len(opening_ids) if o else 0
        assert batch.response_ids[k, :n].tolist() == (opening_ids if o else [])
        assert batch.forced[k].tolist() == [1.0] * n + [0.0] * (batch.forced.shape[1] - n)
        assert batch.texts[k].startswith(opening) == bool(o)
        assert batch.sample_logprobs[k, n] < 0  # the first token after the opening (or the first of all) was drawn
    row0 = row_alone(batch, 0)  # (the layout check below scores row 0 in a batch of its own)
    scored = score_rollout(m, batch, tiny_ppo_config(), 0.0, lambda models, b: torch.zeros(len(b.texts)))
    forced = scored.forced.bool()
    assert torch.equal(scored.sample_logprobs[forced], scored.logprobs[forced])  # weight exp(0) = 1
    drawn = scored.response_mask.bool() & ~forced
    gap = (scored.logprobs - scored.sample_logprobs).abs()[drawn]
    assert scored.copy_gap == pytest.approx(gap.mean().item())
    if rounds:
        return
    # float32: row 0 draws what it draws without guided rows beside it, with the same log-probs ...
    n0 = int(batch.response_mask[0].sum())
    assert batch.texts[0] == plain.texts[0] and n0 == int(plain.response_mask[0].sum())
    assert torch.equal(batch.response_ids[0, :n0], plain.response_ids[0, :n0])
    assert (batch.sample_logprobs[0, :n0] - plain.sample_logprobs[0, :n0]).abs().max() <= 1e-3
    # ... and is scored as when it is alone, without padding
    alone = score_rollout(m, row0, tiny_ppo_config(), 0.0, lambda models, b: torch.zeros(1))
    assert (scored.logprobs[0, :n0] - alone.logprobs[0]).abs().max() <= 1e-3
    # the opening's log-probs are the plain policy's, after the plain prompt
    p_len = int(batch.prompt_mask[1].sum())
    with torch.no_grad():
        ids = torch.cat([batch.prompt_ids[1, -p_len:], batch.response_ids[1]])[None]
        logits = m.trainer(input_ids=ids).logits[0, p_len - 1 : -1] / SAMPLING.temperature
    expected = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[1][:, None]).squeeze(-1)
    n = len(opening_ids)
    assert torch.allclose(scored.logprobs[1, :n], expected[:n], atol=1e-3)


def test_guided_rollouts_teach_the_plain_policy_an_opening_it_never_samples(tiny_config):
    """Guided rows reach what plain sampling cannot: a reward for answers that open
    with one admin-added mode's opening, which the random tiny model never writes by
    itself. With guided rows PPO raises the plain policy's log-probability of that
    opening; the same steps without them (the stub) leave it where it was."""
    from rlhf_chat.generation.modes import BUILTIN_MODES

    sessions = store.open_store(tiny_config.store.db_url)
    opening = " riddle"
    with sessions() as s, s.begin():
        for mode in BUILTIN_MODES:
            store.remove_mode(s, mode.name)
        store.save_mode(s, "riddle", "answer with a riddle", [opening], "")
    first = None

    def opens_with_it(models, batch):
        return (batch.response_ids[:, 0] == first).float()

    def opening_logprob(worker) -> float:
        def measure(m):
            batch = rollout(m, CONTEXTS, tiny_ppo_config(), SAMPLING, seed=0, openings=[opening] * len(CONTEXTS))
            scored = score_rollout(m, batch, tiny_ppo_config(), 0.0, lambda models, b: torch.zeros(len(b.texts)))
            return scored.logprobs[:, 0].mean().item()  # the opening's first token, after each plain prompt

        return worker.call(0, measure)

    def run(guided_fraction: float) -> tuple[float, float, float]:
        worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
        try:
            cfg = tiny_ppo_config(guided_fraction=guided_fraction, learning_rate=3e-3, kl_coef=0.01)
            trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, opens_with_it, SAMPLING)
            trainer.rng.seed(0)
            before = opening_logprob(worker)
            steps = [trainer.step(CONTEXTS * 2) for _ in range(8)]
            plain_reward = sum(r.mean_reward for r in steps) / len(steps)
            return before, opening_logprob(worker), plain_reward
        finally:
            worker.stop()

    from transformers import AutoTokenizer

    first = AutoTokenizer.from_pretrained(tiny_config.model.name).encode(opening, add_special_tokens=False)[0]
    before, guided_after, _ = run(0.5)
    _, stub_after, _ = run(0.0)
    assert guided_after > before + 2.0, (before, guided_after)  # nats: the opening became far likelier
    # Without guided rows it does not rise with them: it drifts as the other updates move
    # the adapter, by an amount the CPU's rounding decides (this random model amplifies
    # it): -0.9 to +0.07 nats seen here, +0.7 with a row-count-dependent stand-in for
    # AMX's rounding. So the drift is bounded by what the same steps with them add.
    assert guided_after > stub_after + 2.0, (before, guided_after, stub_after)
    assert stub_after - before < 0.25 * (guided_after - before), (before, guided_after, stub_after)


def test_lm_loss_is_the_mean_nll_of_the_answer_tokens_under_the_whole_model(tiny_fp32_models):
    """The supervised term through the prefix cache equals the plain computation: the
    whole model's logits over prompt + answer, the answer tokens' mean negative log-likelihood.
    On float32 weights: the two are other batch layouts, which on a bf16 path may round
    apart on some CPUs (conftest.tiny_fp32_models)."""
    from rlhf_chat.learning.supervised import SupervisedExample, lm_loss
    from rlhf_chat.text.chat import render_prompt, render_response

    tiny_models = tiny_fp32_models
    tok = tiny_models.tokenizer
    examples = [SupervisedExample(CONTEXTS[0], "Blue is calm.", True), SupervisedExample(CONTEXTS[3], "Once", False)]
    with torch.no_grad():
        nll, count = 0.0, 0
        for e in examples:
            prompt = render_prompt(tok, e.context)
            answer = render_response(tok, e.text, e.finished)
            ids = torch.tensor([prompt + answer])
            logits = tiny_models.trainer(input_ids=ids).logits[0].float()  # (T, V)
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
            nll -= logp.gather(-1, torch.tensor(answer)[:, None]).sum().item()
            count += len(answer)
        for _ in range(2):  # the second time from the cache
            assert lm_loss(tiny_models, examples, 256).item() == pytest.approx(nll / count, rel=2e-3)
        cache, tiny_models.prefix_cache = tiny_models.prefix_cache, None  # a serve replica's models have none
        try:
            assert lm_loss(tiny_models, examples, 256).item() == pytest.approx(nll / count, rel=2e-3)
        finally:
            tiny_models.prefix_cache = cache


def test_a_steps_stored_row_is_every_ppo_steps_column_it_has_with_nan_as_zero():
    """_record stores StepResult.row(): each field the ppo_steps table has a column for
    (none copied by hand), a NaN (no minibatch gave the metric) as 0, the per-row lists left out."""
    from dataclasses import fields

    from rlhf_chat.learning.ppo import StepResult
    from rlhf_chat.storage.tables import PPOStep

    metrics = {f.name: float(k) for k, f in enumerate(fields(StepResult)) if f.type == "float"}
    result = StepResult(**{**metrics, "version": 4, "skipped": False, "reward_version": 2, "ptx_loss": None,
                           "policy_loss": float("nan"), "texts": ["hi"], "scores": [1.0]})
    row = result.row()
    assert row.keys() == set(PPOStep.__table__.columns.keys()) - {"id", "created_at"}
    assert row["policy_loss"] == 0.0 and row["ptx_loss"] is None and row["version"] == 4 and row["reward_version"] == 2
    assert all(row[k] == getattr(result, k) for k in row if k != "policy_loss")


def test_a_policy_whose_rollouts_pass_the_kl_bound_gives_way_to_the_last_one_within_it(tiny_config, monkeypatch):
    """loop.max_kl holds for the policy people meet: when the served policy's own
    rollouts read past it, the step does not update from there; the newest policy
    whose rollouts kept the bound is served again, as a new version with its checkpoint."""
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        trainer = PPOTrainer(worker, sessions, tiny_ppo_config(), tiny_config.store.checkpoint_dir, first_token_rule,
                             SAMPLING, max_kl=5.0)
        first = trainer.step(CONTEXTS * 2)  # the starting policy's rollouts: KL 0, within the bound
        within = {k: v.clone() for k, v in trainer.within_bound[0].items()}
        moved = worker.call(0, lambda m: any(not torch.equal(within[k], v) for k, v in policy_tensors(m).items()))
        real_score = trainer._score

        def past_the_bound(batch, kl_coef, n):  # the next rollouts read 1 nat a token more
            scored = real_score(batch, kl_coef, n)
            scored.kl = scored.kl + 1.0
            return scored

        monkeypatch.setattr(trainer, "_score", past_the_bound)
        second = trainer.step(CONTEXTS * 2)
        served = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
        synced = worker.call(
            0, lambda m: all(torch.equal(adapter_state(m.serving, POLICY)[k], v) for k, v in adapter_state(m.trainer, POLICY).items())
        )
        with sessions() as s:
            saved = [c.version for c in store.checkpoints(s, "policy")]
    finally:
        worker.stop()
    assert first.version == 1 and moved  # the first update moved the policy
    assert second.mean_kl > 5.0 and not second.skipped and second.version == 2  # published: the loop reads its KL
    assert all(torch.equal(within[k], served[k]) for k in within) and synced
    assert 2 in saved and trainer.served_kl == pytest.approx(first.mean_kl)


def test_each_checkpointed_policy_stores_its_alignment_tax_against_the_starting_model(tiny_config):
    """Every ``checkpoint_every``-th version carries its tax (facts, NLL, content) and the
    reference's, measured on the same draws; a policy the step moved reads another NLL."""
    sessions = store.open_store(tiny_config.store.db_url)
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        cfg = tiny_ppo_config(checkpoint_every=1, tax_questions=3)
        trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
        first = trainer.step(CONTEXTS * 2)
        reference = trainer.reference_tax
        # one small step may leave a rounded NLL where it was: move the policy for sure
        worker.call(0, lambda m: perturb_policy(m, seed=3))
        trainer.step(CONTEXTS * 2)
        assert trainer.reference_tax is reference  # measured once
        trainer.cfg.tax_questions = 0
        trainer.step(CONTEXTS * 2)
    finally:
        worker.stop()
    with sessions() as s:
        rows = {c.version: c.extra for c in store.checkpoints(s, "policy")}
    assert sorted(rows) == [1, 2, 3] and first.version == 1
    for version in (1, 2):
        assert {"tax", "tax_reference", "tax_questions"} <= set(rows[version]), rows[version]
        tax, ref = rows[version]["tax"], rows[version]["tax_reference"]
        assert set(tax) == set(ref) == {"facts", "nll", "content", "asks_instead"}
        assert 0 <= tax["facts"] <= 1 and 0 <= tax["content"] <= 1 and tax["nll"] > 0
    assert rows[2]["tax"]["nll"] != rows[2]["tax_reference"]["nll"]  # the policy moved; the reference did not
    assert rows[1]["tax_reference"] == rows[2]["tax_reference"]
    assert "tax" not in rows[3]  # ppo.tax_questions 0: not measured


def test_ptx_anchor_keeps_the_starting_models_own_answers_likely(tiny_config):
    """PPO-ptx's anchor: with ptx_reference_coef > 0 the update also lowers the policy's
    loss on the starting model's answers in arena pairs; with 0 the same steps do not."""
    from rlhf_chat.generation.candidates import Candidate
    from rlhf_chat.learning.supervised import lm_loss, reference_answers

    sessions = store.open_store(tiny_config.store.db_url)
    with sessions() as s, s.begin():
        for i, ctx in enumerate(CONTEXTS):
            a = Candidate("Tea is a drink.", "reference", 0, 0, 0.7, 1.0, 10, 3, True, 0.1)
            b = Candidate(f"policy {i}", "policy", 1, 0, 0.7, 1.0, 10, 3, True, 0.1)
            store.save_pair(s, session_id="t", context=ctx, a=a, b=b, arena=True)
    with sessions() as s:
        anchors = reference_answers(s, 100)
        assert [e.text for e in reference_answers(s, 2)] == ["Tea is a drink."] * 2 and reference_answers(s, 0) == []
    assert [e.text for e in anchors] == ["Tea is a drink."] * 4 and [e.context for e in anchors] == CONTEXTS
    with sessions() as s, s.begin():
        store.add_exclusion(s, "session", "t", "test")
    with sessions() as s:
        assert reference_answers(s, 100) == []  # an admin's exclusion reaches the anchor too
    with sessions() as s, s.begin():
        for row in store.exclusions(s):
            s.delete(row)

    def run(coef: float) -> tuple[float, float]:
        worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
        try:
            cfg = tiny_ppo_config(
                ptx_reference_coef=coef, anchor_loss="nll", ptx_coef=0.0, learning_rate=3e-3, ptx_batch=4
            )
            trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
            trainer.rng.seed(0)
            before = worker.call(0, lambda m: lm_loss(m, anchors, 256).item())
            for _ in range(4):
                trainer.step(CONTEXTS * 2)
            return before, worker.call(0, lambda m: lm_loss(m, anchors, 256).item())
        finally:
            worker.stop()

    before, anchored = run(1.0)
    _, free = run(0.0)
    assert anchored < before - 0.5 and anchored < free - 0.5, (before, anchored, free)


def test_a_kl_anchor_keeps_the_policy_near_the_starting_model_at_its_answers(tiny_config):
    """``ppo.anchor_loss = "kl"``: the anchor is KL(reference || policy) over the whole
    vocabulary at the starting model's answers. After the same PPO steps, the policy's
    KL there is far lower with the anchor on than off; at the start it is 0."""
    from rlhf_chat.generation.candidates import Candidate
    from rlhf_chat.learning.supervised import reference_answers, reference_kl_loss

    sessions = store.open_store(tiny_config.store.db_url)
    with sessions() as s, s.begin():
        for i, ctx in enumerate(CONTEXTS):
            a = Candidate(f"Tea is a drink, {i}.", "reference", 0, 0, 0.7, 1.0, 10, 3, True, 0.1)
            b = Candidate(f"policy {i}", "policy", 1, 0, 0.7, 1.0, 10, 3, True, 0.1)
            store.save_pair(s, session_id="t", context=ctx, a=a, b=b, arena=True)
    with sessions() as s:
        anchors = reference_answers(s, 100)

    def run(coef: float) -> tuple[float, float]:
        worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
        try:
            cfg = tiny_ppo_config(
                ptx_reference_coef=coef, anchor_loss="kl", ptx_coef=0.0, learning_rate=3e-3, ptx_batch=4
            )
            trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir, first_token_rule, SAMPLING)
            trainer.rng.seed(0)
            before = worker.call(0, lambda m: reference_kl_loss(m, anchors, 256).item())
            for _ in range(4):
                trainer.step(CONTEXTS * 2)
            return before, worker.call(0, lambda m: reference_kl_loss(m, anchors, 256).item())
        finally:
            worker.stop()

    before, anchored = run(1.0)
    _, free = run(0.0)
    assert before == pytest.approx(0.0, abs=1e-5) and free > 0.01, (before, free)
    assert anchored < 0.5 * free, (anchored, free)
