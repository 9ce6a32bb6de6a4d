"""Benchmark: the peak resident memory of each kind of model-worker job, on long conversations.

    python bench/job_memory.py [--people 8] [--votes 120] [--turns 12] [--repeats 2] [--jobs chat,reward,ppo]

A Space's memory is the models plus whatever the worker's biggest job holds
at once. The soak (``bench/soak.py``) reads the process's memory every few
minutes and cannot say which job reached the peak; this script runs each kind
alone, on conversations long enough to meet every token budget (chat's
``sampling.context_tokens``, the reward model's ``reward.max_length``, PPO's
``ppo.max_prompt_tokens``), and prints, for each, the peak above the resident
memory between jobs (Linux: ``VmHWM``, reset through ``/proc/self/clear_refs``).
The jobs: one chat batch of ``--people`` pairs, a reward round over ``--votes``
stored votes between two modes (a quarter of them arena pairs, whose reference
side PPO-ptx's anchor reads), and a PPO step with both PPO-ptx terms.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import machine

from rlhf_chat.config import AppConfig, apply_overrides
from rlhf_chat.evaluation.simulate import load_prompts
from rlhf_chat.generation.candidates import Sampling, generate_pairs
from rlhf_chat.generation.worker import CHAT, ModelWorker
from rlhf_chat.learning.ppo import PPOTrainer
from rlhf_chat.learning.reward import reward_round_from_config
from rlhf_chat.model.memory import release_freed_memory
from rlhf_chat.runtime import load_for_serving
from rlhf_chat.storage import store
from rlhf_chat.storage.records import Candidate
from rlhf_chat.text.chat import render_prompt, trim_to_budget

FILLER = (
    "Here is a longer answer with several sentences, so that the conversation grows the way a person's "
    "does when they keep asking. It explains the idea, gives a small example, and ends with a summary. "
)


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Start VmHWM again from the current resident memory (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def long_conversation(prompts: list[str], turns: int, rng: random.Random) -> list[dict]:
    """``turns`` exchanges of a person's questions and long answers, ending on a question."""
    messages = []
    for _ in range(turns):
        messages += [{"role": "user", "content": rng.choice(prompts)}, {"role": "assistant", "content": FILLER * 2}]
    return messages + [{"role": "user", "content": rng.choice(prompts)}]


def candidate(text: str, source: str, mode: str) -> Candidate:
    """A stored answer as the app would store it (64 tokens, finished)."""
    return Candidate(text, source, 0, 0, 0.7, 1.0, 64, 64, True, 0.0, mode)


def store_votes(sessions, conversations: list[list[dict]], n: int, rng: random.Random) -> None:
    """``n`` votes between an example-mode answer and a plain one on long conversations;
    every fourth an arena pair (a reference side for the anchor)."""
    with sessions() as session, session.begin():
        for i in range(n):
            arena = i % 4 == 0
            a = candidate(FILLER + f" ({i}a)", "policy", "" if arena else "example")
            b = candidate(FILLER[:120] + f" ({i}b)", "reference" if arena else "policy", "")
            c = store.save_pair(session, session_id=f"person-{i % 8}", context=rng.choice(conversations),
                                a=a, b=b, arena=arena, source="bench", client=f"address-{i % 8}")
            store.record_vote(session, c.id, rng.choice(("a", "b")))


def measure(worker: ModelWorker, name: str, fn) -> None:
    """Run ``fn`` (it calls the worker) after a trim, and print its peak above the resident memory before it."""
    worker.call(CHAT, lambda m: (release_freed_memory(), reset_peak()))
    before = status_mb("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak, after = status_mb("VmHWM"), status_mb("VmRSS")
    print(f"{name:<44} before {before:7.0f} MB  peak {peak:7.0f} MB (+{peak - before:5.0f})  "
          f"after {after:7.0f} MB  {seconds:6.1f} s", flush=True)


def chat_batch(worker: ModelWorker, cfg: AppConfig, conversations: list[list[dict]], people: int) -> None:
    """One chat job writing ``people`` pairs, each prompt trimmed to ``sampling.context_tokens``."""

    def job(models):
        tok = models.tokenizer
        prompts = [render_prompt(tok, trim_to_budget(tok, c, cfg.sampling.context_tokens)) for c in conversations[:people]]
        return generate_pairs(models.serving, tok, prompts, Sampling.from_config(cfg.sampling, 1), models.serving_version)

    worker.call(CHAT, job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=8)
    parser.add_argument("--votes", type=int, default=120)
    parser.add_argument("--turns", type=int, default=12, help="exchanges in each conversation")
    parser.add_argument("--repeats", type=int, default=2, help="times each job runs")
    parser.add_argument("--jobs", default="chat,reward,ppo", help="which jobs, comma-separated (the PPO step "
                        "reads the prefix cache the reward round filled)")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE", help="a setting to change")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    cfg = AppConfig()
    cfg.store.db_url, cfg.store.checkpoint_dir = f"sqlite:///{tmp / 'bench.db'}", str(tmp / "checkpoints")
    cfg.reward.steps_per_round = 20  # enough to meet every batch shape; the peak does not grow with steps
    cfg = apply_overrides(cfg, args.set)
    rng = random.Random(0)
    conversations = [long_conversation(load_prompts(), args.turns, rng) for _ in range(max(args.people, 16))]
    sessions = store.open_store(cfg.store.db_url)
    store_votes(sessions, conversations, args.votes, rng)
    worker = ModelWorker(lambda: load_for_serving(cfg), trim_every_s=cfg.model.trim_memory_every_s).start()
    worker.ready.wait()
    print(f"machine: {machine()}")
    print(f"settings: {' '.join(args.set) or 'defaults'}; {args.people} people, {args.votes} votes, "
          f"{args.turns} exchanges a conversation")
    print(f"models loaded: resident {status_mb('VmRSS'):.0f} MB")
    trainer = PPOTrainer.from_config(worker, sessions, cfg)
    jobs = set(args.jobs.split(","))
    for i in range(args.repeats):
        if "chat" in jobs:
            measure(worker, f"chat: {args.people} pairs", lambda: chat_batch(worker, cfg, conversations, args.people))
        if "reward" in jobs:
            measure(worker, f"reward round ({cfg.reward.steps_per_round} steps)",
                    lambda: reward_round_from_config(worker, sessions, cfg, seed=i))
        if "ppo" in jobs:
            measure(worker, f"PPO step ({cfg.ppo.batch_size} rows, PPO-ptx, anchor {cfg.ppo.anchor_loss})",
                    lambda: trainer.step(trainer.sample_contexts(conversations)))
    cache = worker.call(CHAT, lambda m: m.prefix_cache)
    print(f"prefix cache: {cache.tokens} tokens ({len(cache.hidden)} sequences) of {cache.max_tokens}")
    print(f"end: resident {status_mb('VmRSS'):.0f} MB, peak of the run {status_mb('VmHWM'):.0f} MB since the last reset")
    worker.stop()


if __name__ == "__main__":
    main()
