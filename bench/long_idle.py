"""Benchmark: what PPO does to the policy when no new votes come (a long idle period).

    python bench/long_idle.py [--votes 50] [--steps 200] [--every 20] [--set loop.ppo_steps_per_reward=0 ...]

Collects ``--votes`` votes from the ``concise`` labeler on a fresh database (one
simulation round's worth), trains the first reward model, and then lets the live
loop's own decision (``TrainingLoop.run_once``) run ``--steps`` times with no new
vote: each time it may run a PPO step or, once its bound says so, wait. Every
``--every`` iterations it prints the policy's KL to the reference (the last
step's) and its win-rate against the starting model, judged blind by the same
labeler on the simulation's held-out prompts.

Without a bound (``--set loop.ppo_steps_per_reward=0 --set loop.max_kl=0``) this
is the first version's loop: PPO against an 8-vote-old reward model for as long as
the idle lasts.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

from common import machine

from rlhf_chat.config import AppConfig, apply_overrides
from rlhf_chat.evaluation.labelers import load_labeler
from rlhf_chat.evaluation.simulate import collect_votes, evaluate_against_reference, load_prompts, split_prompts
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.learning.reward import reward_round_from_config
from rlhf_chat.learning.training_loop import TrainingLoop
from rlhf_chat.runtime import load_for_serving
from rlhf_chat.storage import store
from rlhf_chat.storage.arena import win_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE")
    parser.add_argument("--report", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="rlhf-chat-idle-")
    cfg = apply_overrides(AppConfig(), args.set)
    cfg.store.db_url, cfg.store.checkpoint_dir = f"sqlite:///{folder}/feedback.db", f"{folder}/checkpoints"
    print(machine())
    print(f"bound: {cfg.loop.ppo_steps_per_reward} PPO steps per reward version, max KL {cfg.loop.max_kl} "
          f"(0: none); {cfg.sampling.max_new_tokens} new tokens; database {cfg.store.db_url}")
    labeler = load_labeler("concise")
    train_prompts, eval_prompts = split_prompts(load_prompts())
    sessions = store.open_store(cfg.store.db_url)
    worker = ModelWorker(lambda: load_for_serving(cfg, sessions)).start()
    worker.ready.wait()
    start = time.perf_counter()
    rows = []
    try:
        collect_votes(worker, sessions, train_prompts, labeler, args.votes, cfg, random.Random(args.seed))
        result = reward_round_from_config(worker, sessions, cfg, seed=args.seed)
        print(f"reward v{result.version} on {result.votes} usable votes, held-out accuracy {result.heldout_accuracy}")
        loop = TrainingLoop(worker, sessions, cfg)
        loop._votes_at_last_round = result.votes
        ppo_steps = 0
        for i in range(1, args.steps + 1):
            if loop.run_once():
                ppo_steps += 1
            if i % args.every == 0 or i == args.steps:
                with sessions() as session:
                    steps = store.ppo_steps(session)
                kl = steps[-1].mean_kl if steps else 0.0
                if rows and rows[-1]["ppo_steps"] == ppo_steps:  # the policy did not change: same figures
                    judged = {k: rows[-1][k] for k in ("win_rate", "interval")}
                else:
                    outcome = evaluate_against_reference(worker, eval_prompts, labeler, cfg, seed=args.seed + 1)
                    interval = win_rate(outcome["wins"], outcome["ties"], outcome["losses"])
                    judged = {"win_rate": round(outcome["win_rate"], 3),
                              "interval": [round(interval.low, 2), round(interval.high, 2)]}
                row = {
                    "iteration": i, "ppo_steps": ppo_steps, "kl": round(kl, 2), **judged,
                    "state": loop.status.state, "detail": loop.status.detail,
                    "seconds": round(time.perf_counter() - start),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        worker.stop()
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"settings": args.set, "rows": rows, "db_url": cfg.store.db_url}, f, indent=2)


if __name__ == "__main__":
    main()
