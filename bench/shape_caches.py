"""Benchmark: what the native shape caches and glibc's heaps keep resident (issue 42).

    python bench/shape_caches.py caches [CAPACITY]   # one run; compare runs with different CAPACITY
    python bench/shape_caches.py heap                # freed memory before and after malloc_trim

``caches``: 60 token counts of one layer's six bf16 products (the training copy's
shapes), forward and backward, each process's resident growth printed; CAPACITY
sets oneDNN's and ideep's per-shape caches (model/memory.py) before the first
product, as the model loader does; none: the libraries' defaults (1024).
``heap``: 40 decoding calls' worth of big key/value caches freed while small
long-lived tensors (prefix-cache entries) are kept between them.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from common import machine

from rlhf_chat.model.memory import limit_shape_caches, release_freed_memory


def resident_mb() -> float:
    """This process's VmRSS in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def caches(capacity: int) -> None:
    """Resident growth over 60 token counts of forward and backward products."""
    limit_shape_caches(capacity)
    import torch

    torch.set_num_threads(1)
    shapes = ((576, 576), (192, 576), (1536, 576), (576, 1536), (16, 576), (576, 16))  # q, k/v, gate, down, LoRA
    weights = [torch.randn(o, i, dtype=torch.bfloat16, requires_grad=True) for o, i in shapes]
    start, before = time.perf_counter(), resident_mb()
    for tokens in range(200, 500, 5):
        for _ in range(3):  # three layers
            for w in weights:
                x = torch.randn(tokens, w.shape[1], dtype=torch.bfloat16, requires_grad=True)
                torch.nn.functional.linear(x, w).sum().backward()
    print(f"capacity {capacity or 'default'}: resident +{resident_mb() - before:.0f} MB "
          f"in {time.perf_counter() - start:.1f} s")


def heap() -> None:
    """Resident memory after the decoding pattern, then after malloc_trim."""
    import torch

    rng, kept, before = random.Random(0), [], resident_mb()
    for _ in range(40):
        rows, positions = rng.randint(2, 16), rng.randint(100, 800)
        cache = [torch.zeros(rows, 3, positions, 64) for _ in range(60)]
        for _ in range(3):
            kept.append(torch.zeros(rng.randint(50, 400), 576))
            rows = max(1, rows - 3)
            cache = [c[:rows].clone() for c in cache]
        del cache
    in_use = sum(t.numel() for t in kept) * 4 / 2**20
    print(f"kept {in_use:.0f} MB; resident +{resident_mb() - before:.0f} MB")
    start = time.perf_counter()
    release_freed_memory()
    print(f"after malloc_trim ({(time.perf_counter() - start) * 1000:.0f} ms): +{resident_mb() - before:.0f} MB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["heap"]:
        heap()
    else:
        caches(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"machine: {machine()}")  # after: its torch calls must not come before the caches' capacity
