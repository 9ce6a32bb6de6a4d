"""Benchmark: reward-model held-out accuracy from scripted votes on the bundled model.

    python bench/reward_accuracy.py [--comparisons 200] [--labeler concise] [--rounds 1]

Generates pairs on the shipped prompts with the bundled 4-bit model, labels
them with a scripted labeler, stores them, trains reward rounds, and prints
the held-out accuracy and the time each phase took.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_chat import store  # noqa: E402
from rlhf_chat.config import AppConfig  # noqa: E402
from rlhf_chat.labelers import load_labeler  # noqa: E402
from rlhf_chat.reward import run_round  # noqa: E402
from rlhf_chat.runtime import load_for_serving  # noqa: E402
from rlhf_chat.simulate import collect_votes, load_prompts, split_prompts  # noqa: E402
from rlhf_chat.worker import ModelWorker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparisons", type=int, default=200)
    parser.add_argument("--labeler", default="concise")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    cfg = AppConfig()
    cfg.store.db_url = f"sqlite:///{tmp / 'bench.db'}"
    sessions = store.open_store(cfg.store.db_url)
    start = time.perf_counter()
    worker = ModelWorker(lambda: load_for_serving(cfg)).start()
    worker.ready.wait()
    t_load = time.perf_counter() - start

    train_prompts, _ = split_prompts(load_prompts())
    start = time.perf_counter()
    counts = collect_votes(worker, sessions, train_prompts, load_labeler(args.labeler), args.comparisons, cfg, args.seed)
    t_votes = time.perf_counter() - start
    print(f"votes: {counts} in {t_votes:.1f} s")
    for _ in range(args.rounds):
        result = run_round(worker, sessions, cfg.reward, str(tmp / "checkpoints"), seed=args.seed)
        print(
            f"reward round v{result.version}: held-out accuracy {result.heldout_accuracy:.3f} "
            f"on {result.heldout_pairs} pairs, train accuracy {result.train_accuracy:.3f} on {result.train_pairs}, "
            f"loss {result.loss:.3f}, {result.seconds:.1f} s"
        )
    worker.stop()
    print(f"load {t_load:.1f} s, pairs+votes {t_votes:.1f} s, total {time.perf_counter() - start + t_load:.1f} s")


if __name__ == "__main__":
    main()
