"""Benchmark: the native int4 kernel's 8-row tile against a build without it, in one process.

    python bench/int4_tiles.py [--trials 60] [--rollouts 30] [--rows 1,2,8,16,64,320]

``kernels.c`` meets eight activation rows with one weight row where they fit
the L1 cache; built with ``-DWIDE_BYTES=0`` it has only the two-row tile of up
to four activation rows. Both builds are loaded side by side and take turns:

1. a decoder layer's four int4 products (fused q/k/v, o, gate/up, down) at the
   bundled model's shapes, for each row count: the fastest of ``--trials``
   alternations of 10 calls each, so that the machine's drift reaches both alike;
2. ``--rollouts`` PPO rollouts of 8 prompts x 64 tokens on the bundled model,
   the two builds in turn (ABBA): the median of the paired ratios.

Both builds add in the same order, so their outputs are checked bitwise equal.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch
from common import machine

from rlhf_chat.config import AppConfig
from rlhf_chat.evaluation.simulate import as_context, load_prompts
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.learning.ppo import rollout
from rlhf_chat.model import native
from rlhf_chat.runtime import load_for_serving

# SmolLM2-135M: hidden 576, intermediate 1536, 9 query and 3 key/value heads of 64
LAYER = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}


def time_products(builds: dict, rows: int, trials: int) -> dict[str, float]:
    """Seconds for one layer's four products at ``rows`` activation rows, per build."""
    threads, total = torch.get_num_threads(), dict.fromkeys(builds, 0.0)
    for k, n in LAYER.values():
        gen = torch.Generator().manual_seed(k + n)
        nibbles = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        scales = torch.randn(n, k // 32, 2, generator=gen) * 0.01
        x = torch.randn(rows, k, generator=gen)
        outs = {name: torch.empty(rows, n) for name in builds}
        best = dict.fromkeys(builds, float("inf"))
        for _ in range(trials):
            for name, lib in builds.items():
                args = (x.data_ptr(), rows, k, nibbles.data_ptr(), scales.data_ptr(), n, outs[name].data_ptr(), threads)
                start = time.perf_counter()
                for _ in range(10):
                    lib.int4_matmul(*args)
                best[name] = min(best[name], (time.perf_counter() - start) / 10)
        first, *others = outs.values()
        if any(not torch.equal(first, other) for other in others):
            raise AssertionError(f"the builds' products differ at {rows} rows, shape {n} x {k}")
        for name in builds:
            total[name] += best[name]
    return total


def time_rollouts(builds: dict, count: int) -> dict[str, list[float]]:
    """Seconds of ``count`` PPO rollouts (8 x 64 tokens) per build, the builds taking turns."""
    cfg = AppConfig()
    cfg.model.int4_kernel = "avx2"
    cfg.ppo.batch_size, cfg.sampling.max_new_tokens, cfg.ppo.min_new_tokens = 8, 64, 64
    cfg.sampling.stop_loops = False  # every row exactly 64 tokens
    worker = ModelWorker(lambda: load_for_serving(cfg)).start()
    worker.ready.wait()
    contexts, draw = [as_context(p) for p in load_prompts()], random.Random(0)
    seconds: dict[str, list[float]] = {name: [] for name in builds}
    chosen = native.library
    try:
        warm = draw.sample(contexts, cfg.ppo.batch_size)
        for lib in builds.values():  # untimed: first calls' costs fall on neither build
            native.library = lambda cache_dir, lib=lib: lib
            worker.call(0, lambda m: rollout(m, warm, cfg.ppo, cfg.sampling, 0))
        for i in range(count):
            batch = draw.sample(contexts, cfg.ppo.batch_size)
            order = list(builds) if i % 2 == 0 else list(reversed(builds))
            for name in order:
                # every layer calls native.library(cache_dir) at each product: point it at this build
                native.library = lambda cache_dir, lib=builds[name]: lib
                start = time.perf_counter()
                worker.call(0, lambda m: rollout(m, batch, cfg.ppo, cfg.sampling, i))  # as a PPO step does
                seconds[name].append(time.perf_counter() - start)
    finally:
        native.library = chosen
        worker.stop()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--rollouts", type=int, default=30)
    parser.add_argument("--rows", default="1,2,8,16,64,320")
    args = parser.parse_args()

    cache = tempfile.mkdtemp(prefix="bench-tiles-")
    builds = {
        "8-row tile": native.load(native.build(cache)),
        "4-row tile only": native.load(native.build(cache, defines=("WIDE_BYTES=0",))),
    }
    print(f"machine: {machine()}")
    print("a layer's four int4 products (fastest of the alternations); outputs bitwise equal")
    for rows in (int(r) for r in args.rows.split(",")):
        t = time_products(builds, rows, args.trials)
        wide, narrow = t["8-row tile"], t["4-row tile only"]
        print(f"  {rows:4d} rows: 8-row tile {wide * 1e3:.3f} ms, 4-row tile only {narrow * 1e3:.3f} ms: "
              f"{narrow / wide:.2f}x")
    if args.rollouts:
        seconds = time_rollouts(builds, args.rollouts)
        ratios = [n / w for w, n in zip(seconds["8-row tile"], seconds["4-row tile only"])]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"PPO rollout, 8 x 64 tokens, {args.rollouts} pairs: 8-row tile "
              f"{statistics.median(seconds['8-row tile']):.2f} s, 4-row tile only "
              f"{statistics.median(seconds['4-row tile only']):.2f} s (medians); paired ratio "
              f"{statistics.median(ratios):.2f}x (quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f})")


if __name__ == "__main__":
    main()
