"""Benchmark: does a reward model trained on more votes of the same kind get better?

    python bench/reward_transfer.py --train A.db B.db ... --test C.db [--steps 200]
    python bench/reward_transfer.py --checkpoint RUN-ckpt/reward-v00004 --test C.db D.db

Trains a fresh reward model (the app's loss, adapter and settings) on every
usable vote in the ``--train`` databases, and every 50 steps measures its
accuracy on every usable vote in the ``--test`` database, which it never
trains on. With databases left by independent simulation runs (different
seeds, so different sampled answers) the test set is a few hundred pairs:
a far steadier estimate than the ~10% held out of one run's 200 votes.

With ``--checkpoint`` it trains nothing: it measures a reward model a run
saved on every usable vote of other runs, split by how many of the pair's two
answers ended before the 64-token limit (a cut-off pair is the hard kind), and
into plain pairs and mode pairs (two answers in two response modes).
"""

from __future__ import annotations

import argparse
import time

from common import accuracy_interval, machine

from rlhf_chat.config import AppConfig
from rlhf_chat.learning.preferences import PreferencePair, modes_differ, preference_pairs
from rlhf_chat.learning.reward import evaluate, minibatches, reward_parameters, train_step
from rlhf_chat.model.loading import load_models
from rlhf_chat.storage import store


def usable_votes(db_path: str) -> list[PreferencePair]:
    """Every A-or-B vote stored in one database."""
    sessions = store.open_store(f"sqlite:///{db_path}")
    with sessions() as session:
        return preference_pairs(store.voted_comparisons(session))


def finished_answers(db_path: str) -> dict[int, int]:
    """Comparison id -> how many of its two answers ended before the length limit."""
    sessions = store.open_store(f"sqlite:///{db_path}")
    with sessions() as session:
        return {c.id: sum(x.finished for x in c.candidates) for c in store.voted_comparisons(session)}


def mode_pair_ids(db_path: str) -> set[int]:
    """Ids of the voted comparisons whose two answers were written in two different modes."""
    sessions = store.open_store(f"sqlite:///{db_path}")
    with sessions() as session:
        return {c.id for c in store.voted_comparisons(session) if modes_differ(c)}


def measure_checkpoint(path: str, tests: list[str]) -> None:
    """Accuracy of a saved reward model on other runs' votes, by kind of pair."""
    import torch

    from rlhf_chat.learning.reward import load_reward, pair_scores

    cfg = AppConfig()
    models = load_models(cfg.model)
    load_reward(models, path)
    for db in tests:
        pairs, finished = usable_votes(db), finished_answers(db)
        correct = []
        with torch.no_grad():
            for i in range(0, len(pairs), cfg.reward.batch_size):
                chosen, rejected = pair_scores(models, pairs[i : i + cfg.reward.batch_size], cfg.reward)
                correct += (chosen > rejected).tolist()
        parts = [f"{path} on {db}: accuracy {accuracy_interval(sum(correct) / len(correct), len(correct))}"]
        for n, kind in ((0, "both cut off"), (1, "one ended"), (2, "both ended")):
            hits = [ok for ok, p in zip(correct, pairs) if finished[p.comparison_id] == n]
            if hits:
                parts.append(f"{kind} {sum(hits)}/{len(hits)}")
        moded = mode_pair_ids(db)  # DESIGN.md: mode pairs are extra; plain pairs are what PPO's rollouts look like
        for kind, keep in (("plain pairs", False), ("mode pairs", True)):
            hits = [ok for ok, p in zip(correct, pairs) if (p.comparison_id in moded) == keep]
            if hits:
                parts.append(f"{kind} {sum(hits)}/{len(hits)} ({sum(hits) / len(hits):.2f})")
        print("; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="+", help="databases whose votes it trains on")
    parser.add_argument("--test", nargs="+", required=True, help="databases whose votes it is measured on")
    parser.add_argument("--checkpoint", help="measure this saved reward model instead of training one")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.checkpoint:
        print(f"machine: {machine()}")
        measure_checkpoint(args.checkpoint, args.test)
        return
    if not args.train or len(args.test) != 1:
        parser.error("training needs --train and exactly one --test database")

    import torch

    train = [pair for path in args.train for pair in usable_votes(path)]
    test = usable_votes(args.test[0])
    answers = {(p.chosen, p.rejected) for p in train}
    overlap = sum((p.chosen, p.rejected) in answers or (p.rejected, p.chosen) in answers for p in test)
    print(f"machine: {machine()}")
    print(f"train: {len(train)} usable votes from {len(args.train)} databases; test: {len(test)} from {args.test[0]}")
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
