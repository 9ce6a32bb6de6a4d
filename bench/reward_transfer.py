"""Benchmark: does a reward model trained on more votes of the same kind get better?

    python bench/reward_transfer.py --train A.db B.db ... --test C.db [--steps 200]

Trains a fresh reward model (the app's loss, adapter and settings) on every
usable vote in the ``--train`` databases, and every 50 steps measures its
accuracy on every usable vote in the ``--test`` database, which it never
trains on. With databases left by independent simulation runs (different
seeds, so different sampled answers) the test set is a few hundred pairs:
a far steadier estimate than the ~10% held out of one run's 200 votes.
"""

from __future__ import annotations

import argparse
import time

from common import accuracy_interval, machine

from rlhf_chat import store
from rlhf_chat.config import AppConfig
from rlhf_chat.loading import load_models
from rlhf_chat.preferences import PreferencePair, preference_pairs
from rlhf_chat.reward import evaluate, minibatches, reward_parameters, train_step


def usable_votes(db_path: str) -> list[PreferencePair]:
    """Every A-or-B vote stored in one database."""
    sessions = store.open_store(f"sqlite:///{db_path}")
    with sessions() as session:
        return preference_pairs(store.voted_comparisons(session))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="+", required=True, help="databases whose votes it trains on")
    parser.add_argument("--test", required=True, help="database whose votes it is measured on")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    train = [pair for path in args.train for pair in usable_votes(path)]
    test = usable_votes(args.test)
    answers = {(p.chosen, p.rejected) for p in train}
    overlap = sum((p.chosen, p.rejected) in answers or (p.rejected, p.chosen) in answers for p in test)
    print(f"machine: {machine()}")
    print(f"train: {len(train)} usable votes from {len(args.train)} databases; test: {len(test)} from {args.test}")
    if overlap:
        print(f"warning: {overlap} test pairs also appear in the training votes")
    cfg = AppConfig()
    models = load_models(cfg.model)
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(reward_parameters(models), lr=cfg.reward.learning_rate)
    cache = models.prefix_cache  # test pairs are distinct sequences, so sharing it mixes nothing
    start = time.perf_counter()
    for step, batch in enumerate(minibatches(train, cfg.reward.batch_size, args.steps, args.seed), start=1):
        train_step(models, optimizer, batch, cfg.reward, cache)
        if step % 50 == 0 or step == args.steps:
            result = evaluate(models, test, cfg.reward, cache)
            epochs = step * cfg.reward.batch_size / len(train)
            print(
                f"step {step} ({epochs:.1f} epochs): test accuracy {accuracy_interval(result['accuracy'], len(test))}, "
                f"{time.perf_counter() - start:.0f} s"
            )


if __name__ == "__main__":
    main()
