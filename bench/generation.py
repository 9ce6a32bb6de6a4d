"""Benchmark: time to the first streamed token and to both full candidates.

    python bench/generation.py [--runs 10] [--tokens 64] [--weights auto|int4|nf4|bf16|fp32] [--no-4bit]

Two candidates of exactly ``--tokens`` new tokens each (EOS suppressed until
then), sampled in one batched call on the bundled model, as the UI does.
Target on a 2-core CPU: both complete in under 3 s.
"""

from __future__ import annotations

import argparse
import time

from common import PROMPTS as BENCH_PROMPTS
from common import machine, summary

from rlhf_chat.config import WEIGHT_PATHS, AppConfig
from rlhf_chat.serving.candidates import Sampling, generate_pair
from rlhf_chat.serving.chat import render_prompt
from rlhf_chat.serving.runtime import load_for_serving

PROMPTS = BENCH_PROMPTS[:5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-4bit", action="store_true", help="the same as --weights fp32")
    parser.add_argument("--weights", choices=("auto", *WEIGHT_PATHS), default="auto",
                        help="how the base holds its weights (scripts/gpu_check.sh: nf4 on the GPU)")
    args = parser.parse_args()

    cfg = AppConfig()
    cfg.model.weights = "fp32" if args.no_4bit else args.weights
    start = time.perf_counter()
    models = load_for_serving(cfg)  # includes the warm-up the app does before serving
    print(f"machine: {machine()}")
    print(f"model: bundled SmolLM2-135M-Instruct, weights: {cfg.model.weights}, loaded in {time.perf_counter() - start:.1f} s")
    firsts, totals = [], []
    for run in range(args.runs):
        prompt = render_prompt(models.tokenizer, [{"role": "user", "content": PROMPTS[run % len(PROMPTS)]}])
        cfg.sampling.max_new_tokens = args.tokens
        cfg.sampling.stop_loops = False  # a yardstick: exactly --tokens tokens, even where a row loops
        sampling = Sampling.from_config(cfg.sampling, seed=run, min_new_tokens=args.tokens)  # the app's scheme
        first: list[float] = []
        t0 = time.perf_counter()
        a, b = generate_pair(
            models.serving, models.tokenizer, prompt, sampling, 0,
            on_update=lambda texts: first.append(time.perf_counter() - t0) if not first else None,
        )
        totals.append(time.perf_counter() - t0)
        firsts.append(first[0])
        assert a.token_count == b.token_count == args.tokens, (a.token_count, b.token_count)
    print(f"first streamed token: {summary(firsts)}")
    print(f"both candidates, {args.tokens} new tokens each: {summary(totals)}")


if __name__ == "__main__":
    main()
