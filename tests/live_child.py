"""A child process for tests/test_live.py: the app's services on the tiny model, with training.

    python tests/live_child.py run   MODEL DB CHECKPOINTS  # vote, train, print ACK lines, then keep training
    python tests/live_child.py check MODEL DB CHECKPOINTS  # restart: report what was restored, wait for training

Not a test module itself (pytest collects only test_*.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_chat.config import AppConfig  # noqa: E402
from rlhf_chat.learning.training_loop import TrainingLoop  # noqa: E402
from rlhf_chat.runtime import start_services  # noqa: E402
from rlhf_chat.serving.handlers import ChatState, respond, vote  # noqa: E402
from rlhf_chat.storage import store  # noqa: E402
from rlhf_chat.storage.tables import Message  # noqa: E402


def config(model: str, db: str, checkpoints: str) -> AppConfig:
    cfg = AppConfig()
    cfg.model.name = model
    cfg.store.db_url, cfg.store.checkpoint_dir = db, checkpoints
    cfg.sampling.max_new_tokens = 8
    cfg.loop.min_votes, cfg.loop.reward_every_votes = 4, 1000
    cfg.loop.ppo_steps_per_reward = 0  # no budget: training must be under way whenever the kill lands
    cfg.reward.steps_per_round, cfg.reward.min_pairs = 5, 2
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs, cfg.ppo.checkpoint_every = 4, 4, 1, 2
    return cfg


def say(line: str) -> None:
    print(line, flush=True)


def chat_and_vote(services, i: int) -> None:
    """One person's turn: a message, two answers, a vote; ACK once it is acknowledged."""
    *_, last = respond(services, f"question number {i}: " + "why " * (i % 4), ChatState())
    state = last[-1]
    pair = state.pair_id
    say(f"WRITING {pair}")  # the parent may kill now, while this vote is being written
    result = vote(services, "a" if i % 2 else "b", None, state)
    if result[3].startswith("Recorded"):
        say(f"ACK {pair}")  # acknowledged to the person: it must survive anything


def run(cfg: AppConfig) -> None:
    services = start_services(cfg)
    services.worker.ready.wait()
    for i in range(12):
        chat_and_vote(services, i)
    while True:
        with services.sessions() as session:
            if store.latest_checkpoint(session, "policy") is not None:
                break
        time.sleep(0.2)
    say("READY")
    i = 12
    while True:  # keep voting while training runs, until killed
        chat_and_vote(services, i)
        i += 1


def check(cfg: AppConfig) -> None:
    services = start_services(cfg, train=False)  # read what was restored before training moves it on
    services.worker.ready.wait()
    with services.sessions() as session:
        latest = store.latest_checkpoint(session, "policy")
        steps_before = len(store.ppo_steps(session))
        voted = store.voted_comparisons(session)
        # a vote and the answer it continues with are one transaction: never one without the other
        answered = {m.conversation_id for m in session.query(Message).filter(Message.role == "assistant")}
        torn = [c.id for c in voted if c.choice != "both_bad" and c.conversation_id not in answered]
    say(json.dumps({
        "voted": [c.id for c in voted],
        "votes_without_their_answer": torn,
        "serving_version": services.worker.serving_version,
        "latest_policy_checkpoint": latest.version if latest else None,
        "reward_version": services.worker.call(0, lambda m: m.reward_version),
    }))
    services.loop = TrainingLoop(services.worker, services.sessions, cfg).start()
    deadline = time.time() + 120
    while time.time() < deadline:
        with services.sessions() as session:
            if len(store.ppo_steps(session)) > steps_before:
                say("TRAINING_RESUMED")
                break
        time.sleep(0.2)
    services.stop()


if __name__ == "__main__":
    phase, model, db, checkpoints = sys.argv[1:5]
    (run if phase == "run" else check)(config(model, db, checkpoints))
