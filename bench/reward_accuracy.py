"""Benchmark: reward-model accuracy from scripted votes on the bundled 4-bit model.

    python bench/reward_accuracy.py [--comparisons 200] [--labeler concise] [--fresh 100]
    python bench/reward_accuracy.py --rounds 4 [--ppo-steps 60]

With ``--rounds 1`` (the default) it generates every pair from the starting
model on the shipped prompts, labels them with a scripted labeler, stores
them as the UI does, trains one reward round, and prints:

* the held-out accuracy the app records (votes split off by comparison id,
  about 10%, never trained on), and
* because ~10% of 200 votes is a handful of pairs, the accuracy on
  ``--fresh`` further pairs on prompts the training never saw, a steadier
  estimate of the same thing.

With ``--rounds N`` (N > 1) the votes arrive as in the live loop: the
simulation's rounds of pairs, a reward round and PPO steps, so later pairs
come from an improved policy; it prints every reward round's held-out
accuracy.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import accuracy_interval, machine

from rlhf_chat.config import AppConfig
from rlhf_chat.evaluation.labelers import load_labeler, normalize_choice
from rlhf_chat.evaluation.simulate import as_context, collect_votes, load_prompts, sample_pairs, split_prompts
from rlhf_chat.generation.candidates import Sampling
from rlhf_chat.generation.worker import CHAT, ModelWorker
from rlhf_chat.learning.reward import reward_round_from_config, score_texts
from rlhf_chat.runtime import load_for_serving
from rlhf_chat.storage import store


def fresh_accuracy(worker, prompts, labeler, n: int, cfg: AppConfig) -> tuple[int, int]:
    """(correct, total) over new non-tie pairs on unseen prompts."""
    correct = total = 0
    for i in range(0, n, 16):
        chunk = [prompts[(i + k) % len(prompts)] for k in range(min(16, n - i))]
        sampling = Sampling.from_config(cfg.sampling, seed=1000 + i)
        pairs = worker.call(CHAT, lambda m: sample_pairs(m, chunk, sampling))
        for prompt, (a, b) in zip(chunk, pairs):
            choice = normalize_choice(labeler(prompt, a.text, b.text))
            if choice not in ("a", "b"):
                continue
            scores = worker.call(CHAT, lambda m: score_texts(m, [as_context(prompt)] * 2, [a.text, b.text], 512))
            correct += int((scores[0] > scores[1]).item() == (choice == "a"))
            total += 1
    return correct, total


def rounds_benchmark(args: argparse.Namespace) -> None:
    """Votes from a policy that improves between rounds: the simulation, reporting its reward rounds."""
    from rlhf_chat.evaluation.simulate import simulate

    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    cfg = AppConfig()
    cfg.store.db_url = f"sqlite:///{tmp / 'bench.db'}"
    cfg.store.checkpoint_dir = str(tmp / "checkpoints")
    cfg.simulation.rounds = args.rounds
    print(f"machine: {machine()}")
    report = simulate(cfg, args.labeler, args.comparisons, args.ppo_steps, seed=args.seed, report_path=None)
    for r in report.reward_rounds:
        print(
            f"reward round {r['version']} after {r['after_ppo_steps']} PPO steps: {r['votes']} usable votes, "
            f"held-out accuracy {accuracy_interval(r['heldout_accuracy'], r['heldout_pairs'])}, {r['seconds']:.0f} s"
        )
    low, high = report.win_rate_interval
    print(
        f"votes {report.votes}; win-rate vs reference {report.win_rate_vs_reference:.3f} ({low:.2f}-{high:.2f}, "
        f"{report.eval_counts}); mean KL {report.mean_kl:.1f}; total {report.wall_seconds:.0f} s {report.seconds}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparisons", type=int, default=200)
    parser.add_argument("--labeler", default="concise")
    parser.add_argument("--fresh", type=int, default=100, help="further pairs on unseen prompts (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of votes, reward round and PPO (1: votes first)")
    parser.add_argument("--ppo-steps", type=int, default=60, help="PPO steps shared among the rounds (--rounds > 1)")
    args = parser.parse_args()
    if args.rounds > 1:
        return rounds_benchmark(args)

    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    cfg = AppConfig()
    cfg.store.db_url = f"sqlite:///{tmp / 'bench.db'}"
    cfg.store.checkpoint_dir = str(tmp / "checkpoints")
    sessions = store.open_store(cfg.store.db_url)
    start = time.perf_counter()
    worker = ModelWorker(lambda: load_for_serving(cfg)).start()
    worker.ready.wait()
    print(f"machine: {machine()}")
    labeler = load_labeler(args.labeler)
    train_prompts, eval_prompts = split_prompts(load_prompts())
    t0 = time.perf_counter()
    counts = collect_votes(worker, sessions, train_prompts, labeler, args.comparisons, cfg, random.Random(args.seed))
    t_votes = time.perf_counter() - t0
    print(f"{args.comparisons} comparisons ({args.labeler}): {counts} in {t_votes:.0f} s")
    result = reward_round_from_config(worker, sessions, cfg, seed=args.seed)
    print(
        f"reward round: held-out accuracy {accuracy_interval(result.heldout_accuracy, result.heldout_pairs)}, "
        f"train accuracy {result.train_accuracy:.3f} on {result.train_pairs}, {result.seconds:.0f} s"
    )
    if args.fresh:
        correct, total = fresh_accuracy(worker, eval_prompts, labeler, args.fresh, cfg)
        print(f"fresh pairs on unseen prompts: accuracy {accuracy_interval(correct / total if total else None, total)}")
    worker.stop()
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
