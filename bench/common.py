"""Shared helpers of the benchmark scripts: loading the bundled model once, timing, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine() -> str:
    """One line naming the machine, for the README tables."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, {device}"


def summary(values: list[float]) -> str:
    """median / p95 / min / max of timings, in seconds."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"median {statistics.median(ordered):.2f} s, p95 {p95:.2f} s, "
        f"min {ordered[0]:.2f} s, max {ordered[-1]:.2f} s (n={len(ordered)})"
    )


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# Everyday questions for the speed benchmarks (generation uses the first five).
PROMPTS = [
    "What are three tips for sleeping better?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a short poem about the sea.",
    "How do I make a good cup of tea?",
    "What is the difference between weather and climate?",
    "Give me a name for a small bakery.",
    "Why is the sky blue?",
    "How can I learn to juggle?",
]


def accuracy_interval(accuracy: float | None, n: int) -> str:
    """An accuracy on n pairs with its Wilson 95% interval, e.g. "0.917 on 12 pairs (95% interval 0.65-0.99)"."""
    from rlhf_chat.storage.arena import win_rate

    correct = round((accuracy or 0.0) * n)
    interval = win_rate(correct, 0, n - correct)
    return f"{accuracy or 0.0:.3f} on {n} pairs (95% interval {interval.low:.2f}-{interval.high:.2f})"
