"""Benchmark: how far apart are the copy that samples and the copy that scores?

    python bench/copy_gap.py [--batches 4] [--tokens 64]

The serving copy draws each token and records its log-probability; the training
copy (bf16, a dense output layer) computes the log-probability of the same token
for PPO. This prints, for answers sampled on the decoder and on transformers'
``generate`` in the same run, their gap per sampled token on the bundled model (mean
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
from rlhf_chat.serving.runtime import load_for_serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    cfg = AppConfig()
    cfg.sampling.max_new_tokens = args.tokens
    models = load_for_serving(cfg)
    print(machine())
    contexts = [[{"role": "user", "content": p}] for p in PROMPTS]
    print(f"{args.batches} batches of {len(contexts)} x {args.tokens} tokens, "
          f"T={cfg.sampling.temperature}, top_p={cfg.sampling.top_p}")
    for path, fast in (("decoder (model/decoder.py)", True), ("baseline, transformers' generate", False)):
        cfg.sampling.fast_decoder = fast
        gap, w = copy_gap(models, cfg, contexts, args.batches)
        print(f"sampled on the {path}: {gap.numel()} tokens")
        print(f"  log p_train - log p_serving: mean |gap| {gap.abs().mean():.4f} nats, signed mean {gap.mean():+.4f}, "
              f"p99 |gap| {gap.abs().quantile(0.99):.3f}, max {gap.abs().max():.3f}")
        print(f"  importance weights (cap {cfg.ppo.importance_cap}): mean {w.mean():.4f}, "
              f"mean |w - 1| {(w - 1).abs().mean():.4f}, min {w.min():.3f}, "
              f"share at the cap {(w >= cfg.ppo.importance_cap).float().mean():.4%}")


def copy_gap(models, cfg: AppConfig, contexts: list, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sampled token: the training copy's log-prob minus the serving copy's, and
    the truncated importance weight PPO gives it, over ``batches`` rollouts."""
    gaps, weights = [], []
    for seed in range(batches):
        batch = rollout(models, contexts, cfg.ppo, cfg.sampling, seed)
        batch = score_rollout(models, batch, cfg.ppo, cfg.ppo.kl_coef, lambda m, b: torch.zeros(len(b.texts)))
        real = batch.response_mask.bool()
        gaps.append((batch.logprobs - batch.sample_logprobs)[real])
        weights.append(pm.truncated_importance_weights(batch.logprobs, batch.sample_logprobs, cfg.ppo.importance_cap)[real])
    return torch.cat(gaps), torch.cat(weights)

if __name__ == "__main__":
    main()
