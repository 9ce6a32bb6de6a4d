"""Benchmark: time to the first streamed token and to both full candidates.

    python bench/generation.py [--runs 10] [--tokens 64] [--weights auto|int4|nf4|bf16|fp32] [--no-4bit]
                               [--no-baseline] [--no-llama]

Two candidates of exactly ``--tokens`` new tokens each (EOS suppressed until
then), sampled in one batched call on the bundled model, as the UI does, on the
serving copy's own decoding loop (``model/decoder.py``). In the same run, as
yardsticks (absolute times drift by 30% over a day on this machine):

* the generic path: transformers' ``generate`` on the same copy
  (``sampling.fast_decoder`` off), the speed-up printed as a ratio;
* llama.cpp on the same GGUF file, 2 threads, the two answers one after the
  other, when ``llama-cpp-python`` is installed (``make llama-anchor``; never
  a dependency of the app), with our pair's time as a ratio of its.

Start-up (load and warm-up) is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import PROMPTS as BENCH_PROMPTS
from common import machine, summary

from rlhf_chat.config import WEIGHT_PATHS, AppConfig
from rlhf_chat.serving.candidates import Sampling, generate_pair
from rlhf_chat.serving.chat import render_prompt
from rlhf_chat.serving.runtime import load_for_serving

PROMPTS = BENCH_PROMPTS[:5]


def time_pairs(models, cfg: AppConfig, runs: int, tokens: int, fast: bool) -> tuple[list[float], list[float]]:
    """First-token and full-pair times of ``runs`` pairs on one decoding path."""
    firsts, totals = [], []
    cfg.sampling.max_new_tokens = tokens
    cfg.sampling.stop_loops = False  # a yardstick: exactly --tokens tokens, even where a row loops
    cfg.sampling.fast_decoder = fast
    for run in range(runs):
        prompt = render_prompt(models.tokenizer, [{"role": "user", "content": PROMPTS[run % len(PROMPTS)]}])
        sampling = Sampling.from_config(cfg.sampling, seed=run, min_new_tokens=tokens)  # the app's scheme
        first: list[float] = []
        t0 = time.perf_counter()
        a, b = generate_pair(
            models.serving, models.tokenizer, prompt, sampling, 0,
            on_update=lambda texts: first.append(time.perf_counter() - t0) if not first else None,
        )
        totals.append(time.perf_counter() - t0)
        firsts.append(first[0])
        assert a.token_count == b.token_count == tokens, (a.token_count, b.token_count)
    return firsts, totals


def llama_cpp_pairs(models, runs: int, tokens: int, temperature: float) -> list[float] | None:
    """Two answers of ``tokens`` tokens one after the other through llama.cpp on the
    bundled GGUF file (2 threads, EOS banned, each answer with its own prefill),
    or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from rlhf_chat.model.loading import bundled_gguf_path

    llm = llama_cpp.Llama(
        model_path=str(bundled_gguf_path()), n_threads=torch.get_num_threads(), n_ctx=512, verbose=False, seed=0
    )
    eos = models.tokenizer.eos_token_id
    totals = []
    for run in range(runs + 1):  # the first call warms up and is dropped
        prompt = render_prompt(models.tokenizer, [{"role": "user", "content": PROMPTS[run % len(PROMPTS)]}])
        t0 = time.perf_counter()
        for _ in range(2):
            llm.reset()  # no prompt reuse between the two answers: each pays its prefill, as ours do
            out = llm.create_completion(
                prompt, max_tokens=tokens, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0,
                logit_bias={eos: float("-inf")}, seed=run,
            )
            assert out["usage"]["completion_tokens"] == tokens, out["usage"]
        if run:
            totals.append(time.perf_counter() - t0)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-4bit", action="store_true", help="the same as --weights fp32")
    parser.add_argument("--weights", choices=("auto", *WEIGHT_PATHS), default="auto",
                        help="how the base holds its weights (scripts/gpu_check.sh: nf4 on the GPU)")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers' generate")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp even if installed")
    args = parser.parse_args()

    cfg = AppConfig()
    cfg.model.weights = "fp32" if args.no_4bit else args.weights
    start = time.perf_counter()
    models = load_for_serving(cfg)  # includes the warm-up the app does before serving
    print(f"machine: {machine()}")
    print(f"model: bundled SmolLM2-135M-Instruct, weights: {cfg.model.weights}; "
          f"start-up (load and warm-up): {time.perf_counter() - start:.1f} s")
    firsts, totals = time_pairs(models, cfg, args.runs, args.tokens, fast=True)
    pair = statistics.median(totals)
    print(f"first streamed token: {summary(firsts)}")
    print(f"both candidates, {args.tokens} new tokens each: {summary(totals)}")
    print(f"tokens per second (2 rows): {2 * args.tokens / pair:.0f}")
    if not args.no_baseline:
        _, generic = time_pairs(models, cfg, args.runs, args.tokens, fast=False)
        base = statistics.median(generic)
        print(f"baseline, transformers' generate on the same copy: {summary(generic)}; speed-up {base / pair:.2f}x")
    anchor = None if args.no_llama else llama_cpp_pairs(models, args.runs, args.tokens, cfg.sampling.temperature)
    if anchor is None:
        print("llama.cpp: not installed (make llama-anchor builds it), no anchor in this run")
    else:
        ref = statistics.median(anchor)
        print(f"llama.cpp, the same GGUF, 2 answers one after the other: {summary(anchor)}; "
              f"ours / llama.cpp = {pair / ref:.2f}")


if __name__ == "__main__":
    main()
