"""Benchmark: one PPO step on the bundled 4-bit model, split into rollout, scoring and update.

    python bench/ppo_step.py [--steps 3] [--prompts 8] [--tokens 64] [--weights auto|int4|nf4|bf16|fp32]
                             [--int4-kernel auto|avx2|torch] [--no-baseline] [--reuse-baseline]

Answers are forced to the full ``--tokens`` length (the worst case). The same
steps then run with rollouts on transformers' ``generate`` (the generic path,
``sampling.fast_decoder`` off), as the same-run baseline. Target on a 2-core
CPU: at most 5 s a step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import machine

from rlhf_chat.config import WEIGHT_PATHS, AppConfig
from rlhf_chat.evaluation.simulate import as_context, load_prompts
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.learning.ppo import PPOTrainer
from rlhf_chat.model.native import KERNELS
from rlhf_chat.runtime import load_for_serving
from rlhf_chat.storage.store import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=None, help="override PPOConfig.epochs")
    parser.add_argument("--minibatch", type=int, default=None, help="override PPOConfig.minibatch_size")
    parser.add_argument("--weights", choices=("auto", *WEIGHT_PATHS), default="auto",
                        help="how the base holds its weights (scripts/gpu_check.sh: nf4 on the GPU)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the steps on transformers' generate")
    parser.add_argument("--int4-kernel", choices=KERNELS, default="auto", help="model.int4_kernel")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="alternate steps that compute the frozen layers' output and the policy's scoring pass "
                             "anew (the same-run baseline of reusing them)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    cfg = AppConfig()
    cfg.model.weights = args.weights
    cfg.model.int4_kernel = args.int4_kernel
    cfg.ppo.batch_size, cfg.sampling.max_new_tokens, cfg.ppo.min_new_tokens = args.prompts, args.tokens, args.tokens
    cfg.sampling.stop_loops = False  # a yardstick: every row exactly --tokens tokens
    cfg.ppo.epochs = args.epochs or cfg.ppo.epochs
    cfg.ppo.minibatch_size = args.minibatch or cfg.ppo.minibatch_size
    cfg.store.checkpoint_dir = str(tmp / "checkpoints")
    sessions = open_store(f"sqlite:///{tmp / 'bench.db'}")
    worker = ModelWorker(lambda: load_for_serving(cfg)).start()
    worker.ready.wait()
    print(f"machine: {machine()}")
    print(f"weights: {cfg.model.weights}, int4 kernel: {worker.call(0, lambda models: models.kernel) or 'none'}")
    print(f"PPO step: {args.prompts} prompts x {args.tokens} new tokens, {cfg.ppo.epochs} epochs of minibatches of {cfg.ppo.minibatch_size}")
    trainer = PPOTrainer.from_config(worker, sessions, cfg)
    contexts = [as_context(p) for p in load_prompts()]
    runs = {}
    paths = {"decoder": True} if args.no_baseline else {"decoder": True, "baseline (transformers' generate)": False}
    for path, fast in paths.items():
        cfg.sampling.fast_decoder = fast  # the trainer reads this config at every rollout
        # Interleaved step by step, so that the machine's drift reaches both alike
        variants = [(path, True)] + ([(f"{path}, computed anew", False)] if args.reuse_baseline else [])
        print(f"-- rollouts on the {path}")
        for i in range(args.steps):
            for name, reuse in variants:
                trainer.keep_prefix = trainer.reuse_first_forward = reuse
                r = trainer.step(trainer.sample_contexts(contexts))
                runs.setdefault(name, []).append(r)
                print(f"step {i + 1}{'' if reuse else ' (computed anew)'}: rollout {r.rollout_s:.2f} s, "
                      f"scoring {r.score_s:.2f} s, update {r.update_s:.2f} s, total {r.seconds:.2f} s")
    worker.stop()

    def med(rows, key: str) -> float:
        return statistics.median(getattr(r, key) for r in rows)

    for path, rows in runs.items():
        print(
            f"median, {path}: rollout {med(rows, 'rollout_s'):.2f} s, scoring {med(rows, 'score_s'):.2f} s, "
            f"update {med(rows, 'update_s'):.2f} s, total {med(rows, 'seconds'):.2f} s a step"
        )
    if args.reuse_baseline:
        for path in paths:
            reused, apart = runs[path], runs[f"{path}, computed anew"]
            print(f"reusing the kept prefix and the first update's forward ({path}): scoring + update "
                  f"{med(apart, 'score_s') + med(apart, 'update_s'):.2f} s -> "
                  f"{med(reused, 'score_s') + med(reused, 'update_s'):.2f} s, step "
                  f"{med(apart, 'seconds') / med(reused, 'seconds'):.2f}x")
    if not args.no_baseline:
        fast_rows, generic_rows = runs["decoder"], runs["baseline (transformers' generate)"]
        print(f"speed-up of the step: {med(generic_rows, 'seconds') / med(fast_rows, 'seconds'):.2f}x, "
              f"of the rollout: {med(generic_rows, 'rollout_s') / med(fast_rows, 'rollout_s'):.2f}x")


if __name__ == "__main__":
    main()
