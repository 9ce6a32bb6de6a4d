"""Simulate: the whole loop headless, with a scripted labeler standing in for people.

pairs -> votes -> reward model -> PPO -> evaluation against the reference,
through the same store, worker, reward and PPO code the app uses. The result
is a JSON report; see :func:`simulate`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlhf_chat import store
from rlhf_chat.candidates import Candidate, Sampling, sample
from rlhf_chat.chat import render_prompt
from rlhf_chat.config import AppConfig
from rlhf_chat.labelers import Labeler, normalize_choice
from rlhf_chat.worker import CHAT, ModelWorker

log = logging.getLogger(__name__)
EVAL_FRACTION = 0.2  # prompts kept out of pair collection and PPO, for the final evaluation


def load_prompts(path: str | None = None) -> list[str]:
    """The shipped prompt set (a few hundred everyday questions), or a file of one prompt per line."""
    if path:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = (importlib.resources.files("rlhf_chat") / "data" / "prompts.txt").read_text(encoding="utf-8")
    prompts = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not prompts:
        raise ValueError(f"no prompts in {path or 'the shipped prompt set'}")
    return prompts


def is_eval_prompt(prompt: str, fraction: float = EVAL_FRACTION) -> bool:
    """A stable split by the prompt's text: evaluation prompts are never trained on."""
    digest = hashlib.sha256(f"eval:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_prompts(prompts: list[str], fraction: float = EVAL_FRACTION) -> tuple[list[str], list[str]]:
    """(training prompts, evaluation prompts)."""
    train = [p for p in prompts if not is_eval_prompt(p, fraction)]
    held = [p for p in prompts if is_eval_prompt(p, fraction)]
    if not train or not held:  # tiny prompt files: split by position instead
        cut = max(1, int(len(prompts) * (1 - fraction)))
        train, held = prompts[:cut], prompts[cut:] or prompts[-1:]
    return train, held


def as_context(prompt: str) -> list[dict]:
    """A one-turn conversation."""
    return [{"role": "user", "content": prompt}]


def sample_pairs(models, prompts: list[str], sampling: Sampling) -> list[tuple[Candidate, Candidate]]:
    """Two candidates for each prompt, all in one batched call (as in the UI, 2 rows per prompt)."""
    rendered = [render_prompt(models.tokenizer, as_context(p)) for p in prompts]
    rows = [ids for ids in rendered for _ in range(2)]
    out = sample(models.serving, models.tokenizer, rows, sampling)

    def candidate(i: int) -> Candidate:
        return Candidate(
            text=out.texts[i],
            source="policy",
            policy_version=models.serving_version,
            seed=sampling.seed,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            token_count=out.token_counts[i],
            finished=out.finished[i],
            latency_s=out.latency_s,
        )

    return [(candidate(2 * k), candidate(2 * k + 1)) for k in range(len(prompts))]


def collect_votes(
    worker: ModelWorker,
    sessions,
    prompts: list[str],
    labeler: Labeler,
    n: int,
    cfg: AppConfig,
    seed: int = 0,
    batch_prompts: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Generate ``n`` pairs, ask the labeler, and store pairs and votes as the UI does."""
    rng = random.Random(seed)
    counts = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
    done = 0
    while done < n:
        chunk = [rng.choice(prompts) for _ in range(min(batch_prompts, n - done))]
        sampling = Sampling(cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p, rng.randrange(2**31))
        pairs = worker.call(CHAT, lambda m: sample_pairs(m, chunk, sampling))
        for prompt, (a, b) in zip(chunk, pairs):
            choice = normalize_choice(labeler(prompt, a.text, b.text))
            with sessions() as session, session.begin():
                comparison = store.save_pair(
                    session, session_id=f"simulate-{seed}", context=as_context(prompt), a=a, b=b, source="simulate"
                )
                store.record_vote(session, comparison.id, choice)
            counts[choice] += 1
        done += len(chunk)
        if progress:
            progress(len(chunk))
    return counts


@dataclass
class Report:
    """The JSON report of a simulation run."""

    labeler: str
    comparisons: int
    ppo_steps: int
    rm_heldout_accuracy: float | None = None
    rm_train_accuracy: float | None = None
    win_rate_vs_reference: float | None = None
    mean_kl: float | None = None
    wall_seconds: float = 0.0
    votes: dict = field(default_factory=dict)
    reward_curve: list[float] = field(default_factory=list)
    kl_curve: list[float] = field(default_factory=list)
    length_curve: list[float] = field(default_factory=list)
    eval_prompts: int = 0
    eval_counts: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def write(self, path: str | Path) -> None:
        """Save as JSON."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.__dict__, indent=2))
