"""Benchmark: how far apart are the copy that samples and the copy that scores?

    python bench/copy_gap.py [--batches 4] [--tokens 64] [--int4-kernel auto|avx2|torch]

The serving copy draws each token and records its log-probability; the training
copy (dense, bf16 where the CPU multiplies it natively, else float32) computes the log-probability of the same token
for PPO. This prints, for answers sampled on the decoder and on transformers'
``generate`` in the same run, their gap per sampled token, and then both paths' gap on
the very same tokens (the decoder's rollouts teacher-forced through
``generate``'s cached steps) on the bundled model (mean
absolute, signed mean, 99th percentile), and what the truncated importance
weights ``min(p_train / p_serving, cap)`` that correct for it look like: their
spread and the share that hit the cap. The simulation records the same gap for
every PPO step (report ``copy_gap_curve``; the ``ppo_steps`` table; the Training tab).
"""

from __future__ import annotations

import argparse

import torch
from common import PROMPTS, machine

from rlhf_chat.config import AppConfig
from rlhf_chat.learning import ppo_math as pm
from rlhf_chat.learning.ppo import rollout, score_rollout
from rlhf_chat.model.native import KERNELS
from rlhf_chat.runtime import load_for_serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--int4-kernel", choices=KERNELS, default="auto", help="model.int4_kernel")
    args = parser.parse_args()
    cfg = AppConfig()
    cfg.sampling.max_new_tokens = args.tokens
    cfg.model.int4_kernel = args.int4_kernel
    models = load_for_serving(cfg)
    print(machine())
    print(f"int4 kernel of the serving copy: {models.kernel or 'none'}")
    contexts = [[{"role": "user", "content": p}] for p in PROMPTS]
    print(f"{args.batches} batches of {len(contexts)} x {args.tokens} tokens, "
          f"T={cfg.sampling.temperature}, top_p={cfg.sampling.top_p}")
    paths = (
        ("decoder (model/decoder.py), scored as PPO scores it (the frozen layers' output kept while sampling, "
         "where the serving copy computes it exactly)", True, True),
        ("decoder, scored by the whole training copy", True, False),
        ("baseline, transformers' generate", False, False),
    )
    for path, fast, keep in paths:
        cfg.sampling.fast_decoder = fast
        gap, w = copy_gap(models, cfg, contexts, args.batches, keep)
        print(f"sampled on the {path}: {gap.numel()} tokens")
        print(f"  log p_train - log p_serving: mean |gap| {gap.abs().mean():.2e} nats, signed mean {gap.mean():+.1e}, "
              f"p99 |gap| {gap.abs().quantile(0.99):.1e}, max {gap.abs().max():.1e}")
        print(f"  importance weights (cap {cfg.ppo.importance_cap}): mean {w.mean():.4f}, "
              f"mean |w - 1| {(w - 1).abs().mean():.4f}, min {w.min():.3f}, "
              f"share at the cap {(w >= cfg.ppo.importance_cap).float().mean():.4%}")
    # Each path's own samples differ (different texts, different tokens); on identical tokens:
    cfg.sampling.fast_decoder = True
    decoder, generic = same_token_gaps(models, cfg, contexts, args.batches)
    print(f"on the same {decoder.numel()} tokens (the decoder's rollouts): mean |train - decoder| "
          f"{decoder.abs().mean():.2e} nats, mean |train - generate's cached steps| {generic.abs().mean():.2e}")


@torch.no_grad()
def generate_step_logprobs(models, batch, temperature: float) -> torch.Tensor:
    """The log-probabilities (B, R) that transformers' own cached decoding steps give the
    tokens of ``batch`` (teacher-forced: the peft model, its cache, one token a step,
    positions as ``generate`` makes them), at the sampling temperature."""
    model, ids, mask, response = models.serving, batch.prompt_ids, batch.prompt_mask, batch.response_ids
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    steps, last = [], positions[:, -1:]
    for t in range(response.shape[1]):
        logits = out.logits[:, -1].float()
        steps.append(torch.log_softmax(logits / temperature, -1).gather(-1, response[:, t : t + 1]).squeeze(-1))
        mask, last = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), last + 1
        out = model(input_ids=response[:, t : t + 1], attention_mask=mask, position_ids=last,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(steps, 1)


def same_token_gaps(models, cfg: AppConfig, contexts: list, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """On the decoder's own rollouts, per token: training copy minus the decoder (what it
    recorded while sampling), and training copy minus generate's cached steps on the same tokens."""
    decoder, generic = [], []
    for seed in range(batches):
        batch = rollout(models, contexts, cfg.ppo, cfg.sampling, seed, keep_prefix=False)  # the whole training copy
        batch = score_rollout(models, batch, cfg.ppo, cfg.ppo.kl_coef, lambda m, b: torch.zeros(len(b.texts)))
        real = batch.response_mask.bool()
        decoder.append((batch.logprobs - batch.sample_logprobs)[real])
        generic.append((batch.logprobs - generate_step_logprobs(models, batch, cfg.sampling.temperature))[real])
    return torch.cat(decoder), torch.cat(generic)


def copy_gap(
    models, cfg: AppConfig, contexts: list, batches: int, keep_prefix: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sampled token: the training copy's log-prob minus the serving copy's, and
    the truncated importance weight PPO gives it, over ``batches`` rollouts
    (``keep_prefix``: as ``ppo.rollout``)."""
    gaps, weights = [], []
    for seed in range(batches):
        batch = rollout(models, contexts, cfg.ppo, cfg.sampling, seed, keep_prefix=keep_prefix)
        batch = score_rollout(models, batch, cfg.ppo, cfg.ppo.kl_coef, lambda m, b: torch.zeros(len(b.texts)))
        real = batch.response_mask.bool()
        gaps.append((batch.logprobs - batch.sample_logprobs)[real])
        weights.append(pm.truncated_importance_weights(batch.logprobs, batch.sample_logprobs, cfg.ppo.importance_cap)[real])
    return torch.cat(gaps), torch.cat(weights)

if __name__ == "__main__":
    main()
