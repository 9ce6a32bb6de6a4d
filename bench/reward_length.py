"""Benchmark: how much of a reward model's score is length, and how much the behaviour voted on.

    python bench/reward_length.py [--labeler friendly] [--comparisons 100] [--tie-weights 0,1] [--seed 0]

Collects ``--comparisons`` scripted votes from the starting model as a
simulation's first rounds do (mode pairs included, ``loop.mode_fraction``),
then, for each reward setting in ``--tie-weights`` (``reward.tie_weight``: how
much a tie weighs in the loss), trains one reward round on the same votes, on
a copy of the database, and scores one set of fresh plain answers of the
policy (the rollouts PPO would score) to unseen prompts. It prints, per
setting:

* the Pearson correlation of the score with the answer's length in words,
  over the plain answers (what a reward model that learned length shows);
* how well the score tells answers the labeler's behaviour shows in from the
  others, over those and as many answers written in a random response mode
  (the AUC of the score for "warm" answers with ``friendly``, "asks a
  question" with ``follow_up``; 0.5 is chance), and the mean score gap;
* the accuracy on the decided votes of fresh pairs on unseen prompts.

The first reward rounds of a run rest on a few dozen votes; what they learn
decides what PPO reinforces before better ones come (README, "Learning
beyond length").
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from common import accuracy_interval, machine

from rlhf_chat.config import AppConfig
from rlhf_chat.evaluation.labelers import load_labeler, normalize_choice
from rlhf_chat.evaluation.simulate import as_context, collect_votes, load_prompts, pearson, sample_pairs, split_prompts
from rlhf_chat.generation.candidates import Sampling, sample
from rlhf_chat.generation.modes import active_modes
from rlhf_chat.generation.worker import CHAT, ModelWorker
from rlhf_chat.learning.reward import reward_round_from_config, score_texts
from rlhf_chat.runtime import load_for_serving
from rlhf_chat.storage import store
from rlhf_chat.text.behaviours import asks_question, gives_example, is_warm
from rlhf_chat.text.chat import render_prompt

BEHAVIOUR = {"friendly": ("warm", is_warm), "follow_up": ("asks a question", asks_question),
             "example": ("gives an example", gives_example), "concise": ("warm", is_warm)}


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database in WAL mode (its last writes may still be in the -wal file)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def auc(positive: list[float], negative: list[float]) -> float | None:
    """P(a random positive scores above a random negative), ties half (Mann-Whitney)."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def answers_to(worker, prompts: list[str], openings: list[str], cfg: AppConfig, seed: int) -> tuple[list[str], list[bool]]:
    """One answer of the policy per prompt, each after its opening ("" for a plain answer)."""
    texts, finished = [], []
    for i in range(0, len(prompts), 32):
        chunk, opened = prompts[i : i + 32], openings[i : i + 32]
        sampling = Sampling.from_config(cfg.sampling, seed + i)

        def job(m, chunk=chunk, opened=opened, sampling=sampling):
            rendered = [render_prompt(m.tokenizer, as_context(p)) for p in chunk]
            return sample(m.serving, m.tokenizer, rendered, sampling, openings=opened)

        out = worker.call(CHAT, job)
        texts += out.texts
        finished += out.finished
    return texts, finished


def fresh_votes(worker, prompts: list[str], labeler, n: int, cfg: AppConfig, seed: int) -> list[tuple[str, str, str, str]]:
    """(prompt, a, b, choice) of ``n`` plain pairs on unseen prompts, decided ones only."""
    rng = random.Random(seed)
    chunk = [rng.choice(prompts) for _ in range(n)]
    sampling = Sampling.from_config(cfg.sampling, seed)
    pairs = worker.call(CHAT, lambda m: sample_pairs(m, chunk, sampling))
    votes = [(p, a.text, b.text, normalize_choice(labeler(p, a.text, b.text))) for p, (a, b) in zip(chunk, pairs)]
    return [v for v in votes if v[3] in ("a", "b")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labeler", default="friendly")
    parser.add_argument("--comparisons", type=int, default=100)
    parser.add_argument("--tie-weights", default="0,1", help="reward.tie_weight values to compare, comma-separated")
    parser.add_argument("--answers", type=int, default=128, help="fresh plain answers scored per setting")
    parser.add_argument("--fresh-pairs", type=int, default=96, help="fresh plain pairs for the accuracy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-length-"))
    cfg = AppConfig()
    cfg.store.db_url = f"sqlite:///{tmp / 'votes.db'}"
    sessions = store.open_store(cfg.store.db_url)
    worker = ModelWorker(lambda: load_for_serving(cfg)).start()
    worker.ready.wait()
    print(f"machine: {machine()}")
    labeler = load_labeler(args.labeler)
    name, detect = BEHAVIOUR.get(args.labeler, ("warm", is_warm))
    train_prompts, eval_prompts = split_prompts(load_prompts())
    with sessions() as session:
        modes = active_modes(session)
    counts = collect_votes(
        worker, sessions, train_prompts, labeler, args.comparisons, cfg, random.Random(args.seed),
        session_id="bench", modes=modes, mode_fraction=cfg.loop.mode_fraction,
    )
    print(f"{args.comparisons} comparisons ({args.labeler}, mode pairs as in a run): {counts}")
    # Plain answers (what PPO scores) and as many written in a random mode (so that
    # the behaviour shows in enough of them to tell apart), on unseen prompts.
    rng = random.Random(args.seed)
    prompts = [eval_prompts[k % len(eval_prompts)] for k in range(2 * args.answers)]
    opened = [m for m in modes if m.openings]  # "direct" has none: it is the plain answer
    openings = [""] * args.answers + [rng.choice(rng.choice(opened).openings) for _ in range(args.answers)]
    texts, finished = answers_to(worker, prompts, openings, cfg, args.seed + 7)
    contexts = [as_context(p) for p in prompts]
    lengths = [len(t.split()) for t in texts]
    shows = [bool(detect(t)) for t in texts]
    votes = fresh_votes(worker, eval_prompts, labeler, args.fresh_pairs, cfg, args.seed + 11)
    plain = slice(0, args.answers)
    print(f"{args.answers} fresh plain answers ({sum(shows[plain])} {name}, mean {sum(lengths[plain]) / args.answers:.0f} "
          f"words) and {args.answers} in modes ({sum(shows[args.answers:])} {name}); {len(votes)} decided fresh pairs")

    for tie_weight in (float(w) for w in args.tie_weights.split(",")):
        folder = tmp / f"tie-{tie_weight:g}"
        folder.mkdir()
        copy_database(tmp / "votes.db", folder / "votes.db")
        copy_sessions = store.open_store(f"sqlite:///{folder / 'votes.db'}")
        cfg.reward.tie_weight, cfg.store.checkpoint_dir = tie_weight, str(folder / "checkpoints")
        # each setting from scratch: no earlier model scores the votes
        result = reward_round_from_config(worker, copy_sessions, cfg, seed=args.seed, score_unseen=False)
        scores = worker.call(CHAT, lambda m: score_texts(m, contexts, texts, cfg.reward.max_length, finished=finished))
        scores = scores.tolist()
        pos = [s for s, d in zip(scores, shows) if d]
        neg = [s for s, d in zip(scores, shows) if not d]
        gap = sum(pos) / len(pos) - sum(neg) / len(neg) if pos and neg else float("nan")
        std = (sum((s - sum(scores) / len(scores)) ** 2 for s in scores) / len(scores)) ** 0.5
        right = 0
        for prompt, a, b, choice in votes:
            pair = worker.call(CHAT, lambda m, p=prompt, a=a, b=b: score_texts(m, [as_context(p)] * 2, [a, b], 512))
            right += int((pair[0] > pair[1]).item() == (choice == "a"))
        r = pearson(scores[plain], [float(n) for n in lengths[plain]])
        area = auc(pos, neg)
        print(
            f"tie_weight {tie_weight:g}: {result.train_pairs} training pairs; score-length r (plain) {r:+.2f}; "
            f"{name} AUC {area if area is None else round(area, 2)}, gap {gap / std if std else 0:+.2f} std; "
            f"fresh decided pairs {accuracy_interval(right / len(votes) if votes else None, len(votes))}; "
            f"held-out {result.heldout_accuracy}; {result.seconds:.0f} s"
        )
    worker.stop()
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
