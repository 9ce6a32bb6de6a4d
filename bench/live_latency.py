"""Benchmark: two candidates while idle vs. while the loop trains, through the UI handler.

    python bench/live_latency.py [--requests 20] [--votes 24]

1. idle: the model worker does nothing else; a person sends messages.
2. training: after some scripted votes and a first reward round, the training
   loop runs (PPO steps, reward rounds) while the same person sends messages
   at random moments.
Target: median within 1.5x of idle, 95th percentile within 2x.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, percentile, summary

from rlhf_chat.config import AppConfig
from rlhf_chat.evaluation.labelers import concise
from rlhf_chat.evaluation.simulate import collect_votes, load_prompts
from rlhf_chat.learning.reward import reward_round_from_config
from rlhf_chat.learning.training_loop import TrainingLoop
from rlhf_chat.runtime import start_services
from rlhf_chat.serving.handlers import ChatState, respond


def timed_requests(services, prompts: list[str], n: int, rng: random.Random) -> list[float]:
    """Send n messages through the UI handler, each in a fresh conversation, with pauses between."""
    times = []
    for i in range(n):
        time.sleep(rng.uniform(0.2, 2.0))  # land at random moments of the training cycle
        start = time.perf_counter()
        *_, last = respond(services, rng.choice(prompts), ChatState())
        times.append(time.perf_counter() - start)
        assert last[-1].phase == "vote", last[3]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--votes", type=int, default=24)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
    cfg = AppConfig()
    cfg.store.db_url = f"sqlite:///{tmp / 'bench.db'}"
    cfg.store.checkpoint_dir = str(tmp / "checkpoints")
    cfg.loop.arena_fraction = 0.0  # every request the same kind of work
    services = start_services(cfg, train=False)
    services.worker.ready.wait()
    print(f"machine: {machine()}")
    prompts = load_prompts()
    rng = random.Random(0)

    idle = timed_requests(services, prompts, args.requests, rng)
    print(f"idle:     {summary(idle)}")

    collect_votes(services.worker, services.sessions, prompts, concise, args.votes, cfg, random.Random(1))
    reward_round_from_config(services.worker, services.sessions, cfg)
    loop = TrainingLoop(services.worker, services.sessions, cfg).start()
    while loop.status.ppo_steps < 1:  # measure only once PPO is under way
        time.sleep(0.5)
    busy = timed_requests(services, prompts, args.requests, rng)
    steps = loop.status.ppo_steps
    loop.stop()
    services.worker.stop()
    print(f"training: {summary(busy)} ({steps} PPO steps ran meanwhile)")
    idle_median = statistics.median(idle)
    print(
        f"training vs idle median: median {statistics.median(busy) / idle_median:.2f}x (target <= 1.5x), "
        f"p95 {percentile(busy, 0.95) / idle_median:.2f}x (target <= 2x)"
    )


if __name__ == "__main__":
    main()
