"""Benchmark: time to the first streamed token and to both full candidates.

    python bench/generation.py [--runs 10] [--tokens 64] [--weights auto|int4|nf4|bf16|fp32] [--no-4bit]
                               [--int4-kernel auto|avx2|torch] [--no-baseline] [--no-kernel-baseline]
                               [--no-llama]

Two candidates of exactly ``--tokens`` new tokens each (EOS suppressed until
then), sampled in one batched call on the bundled model, as the UI does, on the
serving copy's own decoding loop (``model/decoder.py``). In the same run, as
yardsticks (absolute times drift by 30% over a day on this machine):

* the generic path: transformers' ``generate`` on the same copy
  (``sampling.fast_decoder`` off), the speed-up printed as a ratio;
* where the int4 path runs on the native kernels (``model.int4_kernel``), the
  same decoding loop on torch's int4 kernel, a second serving copy, as a ratio;
* llama.cpp on the same GGUF file, 2 threads, the two answers one after the
  other, when ``llama-cpp-python`` is installed (``make llama-anchor``; never
  a dependency of the app), with our pair's time as a ratio of its.

The paths take turns, one pair each per run, so that the machine's drift
reaches them alike. Start-up (load and warm-up) is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from common import PROMPTS as BENCH_PROMPTS
from common import machine, summary

from rlhf_chat.config import WEIGHT_PATHS, AppConfig
from rlhf_chat.generation.candidates import Sampling, generate_pair
from rlhf_chat.model.native import KERNELS
from rlhf_chat.runtime import load_for_serving
from rlhf_chat.text.chat import render_prompt

PROMPTS = BENCH_PROMPTS[:5]


def timed_pair(models, cfg: AppConfig, run: int, tokens: int, fast: bool) -> tuple[float, float]:
    """First-token and full-pair time of one pair (prompt ``run``) on one decoding path."""
    cfg.sampling.max_new_tokens = tokens
    cfg.sampling.stop_loops = False  # a yardstick: exactly --tokens tokens, even where a row loops
    cfg.sampling.fast_decoder = fast
    prompt = render_prompt(models.tokenizer, [{"role": "user", "content": PROMPTS[run % len(PROMPTS)]}])
    sampling = Sampling.from_config(cfg.sampling, seed=run, min_new_tokens=tokens)  # the app's scheme
    first: list[float] = []
    t0 = time.perf_counter()
    a, b = generate_pair(
        models.serving, models.tokenizer, prompt, sampling, 0,
        on_update=lambda texts: first.append(time.perf_counter() - t0) if not first else None,
    )
    total = time.perf_counter() - t0
    assert a.token_count == b.token_count == tokens, (a.token_count, b.token_count)
    return first[0], total


def llama_cpp_pair(models, tokens: int, temperature: float):
    """A function timing two answers of ``tokens`` tokens one after the other through
    llama.cpp on the bundled GGUF file (2 threads, EOS banned, each answer with its
    own prefill), warmed up; None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from rlhf_chat.model.loading import bundled_gguf_path

    llm = llama_cpp.Llama(
        model_path=str(bundled_gguf_path()), n_threads=torch.get_num_threads(), n_ctx=512, verbose=False, seed=0
    )
    eos = models.tokenizer.eos_token_id

    def pair(run: int) -> float:
        prompt = render_prompt(models.tokenizer, [{"role": "user", "content": PROMPTS[run % len(PROMPTS)]}])
        t0 = time.perf_counter()
        for _ in range(2):
            llm.reset()  # no prompt reuse between the two answers: each pays its prefill, as ours do
            out = llm.create_completion(
                prompt, max_tokens=tokens, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0,
                logit_bias={eos: float("-inf")}, seed=run,
            )
            assert out["usage"]["completion_tokens"] == tokens, out["usage"]
        return time.perf_counter() - t0

    pair(0)  # the first call warms up
    return pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-4bit", action="store_true", help="the same as --weights fp32")
    parser.add_argument("--weights", choices=("auto", *WEIGHT_PATHS), default="auto",
                        help="how the base holds its weights (scripts/gpu_check.sh: nf4 on the GPU)")
    parser.add_argument("--int4-kernel", choices=KERNELS, default="auto", help="model.int4_kernel")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers' generate")
    parser.add_argument("--no-kernel-baseline", action="store_true",
                        help="skip the pairs on torch's int4 kernel when the native one runs")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp even if installed")
    args = parser.parse_args()

    cfg = AppConfig()
    cfg.model.weights = "fp32" if args.no_4bit else args.weights
    cfg.model.int4_kernel = args.int4_kernel
    start = time.perf_counter()
    models = load_for_serving(cfg)  # includes the warm-up the app does before serving
    print(f"machine: {machine()}")
    print(f"model: bundled SmolLM2-135M-Instruct, weights: {cfg.model.weights}, "
          f"int4 kernel: {models.kernel or 'none'}; start-up (load and warm-up): {time.perf_counter() - start:.1f} s")

    # Every path pairs once per run, in turn, so that a drift of the machine's speed
    # (30% over a day here) reaches each of them alike and their ratios hold.
    paths = {"ours": lambda run: timed_pair(models, cfg, run, args.tokens, fast=True)}
    if not args.no_baseline:
        paths["generate"] = lambda run: timed_pair(models, cfg, run, args.tokens, fast=False)
    if models.kernel == "avx2" and not args.no_kernel_baseline:
        on_torch = load_for_serving(replace(cfg, model=replace(cfg.model, int4_kernel="torch")))
        paths["torch kernel"] = lambda run: timed_pair(on_torch, cfg, run, args.tokens, fast=True)
    anchor = None if args.no_llama else llama_cpp_pair(models, args.tokens, cfg.sampling.temperature)
    if anchor is not None:
        paths["llama.cpp"] = lambda run: (float("nan"), anchor(run))
    firsts: dict[str, list[float]] = {name: [] for name in paths}
    totals: dict[str, list[float]] = {name: [] for name in paths}
    for run in range(args.runs):
        for name, path in paths.items():
            first, total = path(run)
            firsts[name].append(first)
            totals[name].append(total)

    pair = statistics.median(totals["ours"])
    print(f"first streamed token: {summary(firsts['ours'])}")
    print(f"both candidates, {args.tokens} new tokens each: {summary(totals['ours'])}")
    print(f"tokens per second (2 rows): {2 * args.tokens / pair:.0f}")
    if "generate" in totals:
        base = statistics.median(totals["generate"])
        print(f"baseline, transformers' generate on the same copy: {summary(totals['generate'])}; speed-up {base / pair:.2f}x")
    if "torch kernel" in totals:
        base = statistics.median(totals["torch kernel"])
        print(f"baseline, the same loop on torch's int4 kernel: {summary(totals['torch kernel'])}; "
              f"first token {statistics.median(firsts['torch kernel']):.2f} s; speed-up {base / pair:.2f}x")
    if anchor is None:
        print("llama.cpp: not installed (make llama-anchor builds it), no anchor in this run")
    else:
        ref = statistics.median(totals["llama.cpp"])
        per_run = statistics.median(o / r for o, r in zip(totals["ours"], totals["llama.cpp"]))
        print(f"llama.cpp, the same GGUF, 2 answers one after the other: {summary(totals['llama.cpp'])}; "
              f"ours / llama.cpp = {pair / ref:.2f} (median of the runs' own ratios {per_run:.2f})")


if __name__ == "__main__":
    main()
