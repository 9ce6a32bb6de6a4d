"""Simulate: the whole loop headless, with a scripted labeler standing in for people.

pairs -> votes -> reward model -> PPO, in rounds as the live loop takes turns,
then a blind evaluation against the reference, through the same store,
worker, reward and PPO code the app uses. The result is a JSON report; see
:func:`simulate`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from rlhf_chat import store
from rlhf_chat.arena import win_rate
from rlhf_chat.candidates import BASE_ADAPTER, Candidate, Sampling, adapter_names_for, pair_sources, sample, to_candidate
from rlhf_chat.chat import render_prompt
from rlhf_chat.config import AppConfig
from rlhf_chat.labelers import Labeler, load_labeler, normalize_choice
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


def sample_pairs(
    models, prompts: list[str], sampling: Sampling, arena: list[bool] | None = None
) -> list[tuple[Candidate, Candidate]]:
    """Two candidates for each prompt, all in one batched call (2 rows per prompt, as in the UI).

    Where ``arena[k]`` is true, prompt k gets an arena pair: the policy against
    the reference, on a random side (peft mixed adapters in the same call).
    """
    arena = arena or [False] * len(prompts)
    rng = random.Random(sampling.seed)
    sources = [pair_sources(flag, rng) for flag in arena]
    rendered = [render_prompt(models.tokenizer, as_context(p)) for p in prompts]
    rows = [ids for ids in rendered for _ in range(2)]
    names = [name for pair in sources for name in adapter_names_for(pair)] if any(arena) else None
    out = sample(models.serving, models.tokenizer, rows, sampling, adapter_names=names)
    version = models.serving_version
    return [
        tuple(to_candidate(out, 2 * k + side, sampling, sources[k][side], version) for side in (0, 1))
        for k in range(len(prompts))
    ]


def collect_votes(
    worker: ModelWorker,
    sessions,
    prompts: list[str],
    labeler: Labeler,
    n: int,
    cfg: AppConfig,
    rng: random.Random,
    session_id: str = "simulate",
    arena_fraction: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Generate ``n`` pairs from the serving policy, ask the labeler, and store pairs
    and votes as the UI does.

    As in the UI, a share ``arena_fraction`` of the pairs puts the policy
    against the reference, once the policy differs from it.
    """
    counts = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
    done = 0
    while done < n:
        chunk = [rng.choice(prompts) for _ in range(min(cfg.simulation.batch_prompts, n - done))]
        arena = [rng.random() < arena_fraction for _ in chunk]
        sampling = Sampling.from_config(cfg.sampling, rng.randrange(2**31))

        def job(models, chunk=chunk, arena=arena, sampling=sampling):
            flags = arena if models.serving_version > 0 else None  # before any update, both sides are the reference
            return sample_pairs(models, chunk, sampling, flags), flags or [False] * len(chunk)

        pairs, flags = worker.call(CHAT, job)
        for prompt, (a, b), is_arena in zip(chunk, pairs, flags):
            choice = normalize_choice(labeler(prompt, a.text, b.text))
            with sessions() as session, session.begin():
                comparison = store.save_pair(
                    session, session_id=session_id, context=as_context(prompt), a=a, b=b, arena=is_arena, source="simulate"
                )
                store.record_vote(session, comparison.id, choice)
            counts[choice] += 1
        done += len(chunk)
        if progress:
            progress(len(chunk))
    return counts


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal whole shares, the larger ones first: 10, 3 -> 4, 3, 3."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass
class Report:
    """The JSON report of a simulation run."""

    labeler: str
    comparisons: int
    ppo_steps: int
    rm_heldout_accuracy: float | None = None
    rm_train_accuracy: float | None = None
    win_rate_vs_reference: float | None = None
    win_rate_interval: list[float] = field(default_factory=list)  # Wilson 95%
    mean_kl: float | None = None
    wall_seconds: float = 0.0
    votes: dict = field(default_factory=dict)
    reward_curve: list[float] = field(default_factory=list)
    kl_curve: list[float] = field(default_factory=list)
    length_curve: list[float] = field(default_factory=list)
    rounds: int = 1
    reward_rounds: list[dict] = field(default_factory=list)  # one entry per reward round, in order
    eval_prompts: int = 0
    eval_counts: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    copy_gap_curve: list[float] = field(default_factory=list)  # serving vs training log-prob gap per step
    db_url: str = ""  # where this run's votes are: other runs' votes for bench/reward_transfer.py
    checkpoint_dir: str = ""
    settings: dict = field(default_factory=dict)  # the sampling, PPO and reward settings it ran with

    def write(self, path: str | Path) -> None:
        """Save as JSON."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.__dict__, indent=2))


class UsedDatabase(ValueError):
    """The simulation was pointed at a database that already holds votes."""


def fresh_store_location() -> tuple[str, str]:
    """A new database URL and checkpoint folder under a new temporary folder.

    Kept after the run (the report names it), so later runs and
    ``bench/reward_transfer.py`` can read this run's votes.
    """
    folder = tempfile.mkdtemp(prefix="rlhf-chat-simulation-")
    return f"sqlite:///{folder}/feedback.db", f"{folder}/checkpoints"


def refuse_used_database(sessions, db_url: str) -> None:
    """Raise :class:`UsedDatabase` when the database already holds votes: a run there
    would restore the earlier run's checkpoints and train on its votes."""
    with sessions() as session:
        votes = store.count_votes(session)
    if votes:
        raise UsedDatabase(
            f"{db_url} already holds {votes} votes: a simulation there would restore the earlier run's reward "
            "model and policy and train on its votes. Leave out --db for a fresh database, or pass --continue "
            "to build on that run on purpose."
        )


def evaluate_against_reference(
    worker: ModelWorker, prompts: list[str], labeler: Labeler, cfg: AppConfig, seed: int
) -> dict[str, float]:
    """Win-rate of the current policy against the reference, judged blind by the labeler.

    For each prompt, one answer from each (one batched call, peft mixed
    adapters), shown in random order. A tie or "both bad" counts as half a win:
    neither was preferred.
    """
    rng = random.Random(seed)
    wins = ties = losses = 0
    batch = cfg.simulation.batch_prompts
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        sampling = Sampling.from_config(cfg.sampling, rng.randrange(2**31))

        def job(models, chunk=chunk, sampling=sampling) -> list[str]:
            rendered = [render_prompt(models.tokenizer, as_context(p)) for p in chunk]
            rows = [ids for ids in rendered for _ in range(2)]
            names = ["policy", BASE_ADAPTER] * len(chunk)
            return sample(models.serving, models.tokenizer, rows, sampling, adapter_names=names).texts

        texts = worker.call(CHAT, job)
        for k, prompt in enumerate(chunk):
            policy, reference = texts[2 * k], texts[2 * k + 1]
            policy_first = rng.random() < 0.5
            a, b = (policy, reference) if policy_first else (reference, policy)
            choice = normalize_choice(labeler(prompt, a, b))
            if choice in ("tie", "both_bad"):
                ties += 1
            elif (choice == "a") == policy_first:
                wins += 1
            else:
                losses += 1
    n = wins + ties + losses
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": (wins + 0.5 * ties) / n if n else 0.0}


def plot_curve(report: Report, path: str | Path) -> Path:
    """A PNG of the PPO reward and KL per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = range(1, len(report.reward_curve) + 1)
    ax1.plot(steps, report.reward_curve, marker=".", color="tab:blue")
    ax1.set(xlabel="PPO step", ylabel="mean reward-model score", title=f"Reward ({report.labeler} labeler)")
    ax2.plot(steps, report.kl_curve, marker=".", color="tab:red")
    ax2.set(xlabel="PPO step", ylabel="KL to reference (nats / answer)", title="KL to the starting model")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        # A new reward model (trained on more votes) scores on its own scale.
        for entry in report.reward_rounds[1:]:
            ax.axvline(entry["after_ppo_steps"] + 0.5, color="grey", linestyle="--", linewidth=0.8)
    if len(report.reward_rounds) > 1:
        ax1.set_title(f"Reward ({report.labeler} labeler); dashed: new reward model")
    fig.suptitle(
        f"{report.comparisons} comparisons, reward-model held-out accuracy {report.rm_heldout_accuracy or 0:.2f}, "
        f"win-rate vs reference {report.win_rate_vs_reference or 0:.2f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def simulate(
    cfg: AppConfig,
    labeler_spec: str,
    comparisons: int = 200,
    ppo_steps: int = 60,
    prompts_file: str | None = None,
    seed: int = 0,
    report_path: str | Path | None = "simulation.json",
    plot_path: str | Path | None = None,
    resume: bool = False,
) -> Report:
    """Pairs, votes, reward model, PPO and evaluation, headless; returns (and writes) the report.

    The work runs in ``cfg.simulation.rounds`` rounds, in the live loop's
    order: a share of the pairs and votes, a reward round (continuing the last
    adapter, on every vote so far), a share of the PPO steps. Then the final
    policy is judged blind against the reference on held-out prompts.

    A database that already holds votes is refused (:class:`UsedDatabase`)
    unless ``resume`` says to build on the run that left them.
    """
    from tqdm import tqdm

    from rlhf_chat.ppo import PPOTrainer
    from rlhf_chat.reward import run_round
    from rlhf_chat.runtime import load_for_serving

    start = time.perf_counter()
    labeler = load_labeler(labeler_spec)
    train_prompts, eval_prompts = split_prompts(load_prompts(prompts_file))
    rounds = max(1, min(cfg.simulation.rounds, comparisons))
    report = Report(
        labeler=labeler_spec, comparisons=comparisons, ppo_steps=ppo_steps, rounds=rounds, eval_prompts=len(eval_prompts)
    )
    report.votes = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
    report.db_url, report.checkpoint_dir = cfg.store.db_url, cfg.store.checkpoint_dir
    report.settings = {"sampling": asdict(cfg.sampling), "ppo": asdict(cfg.ppo), "reward": asdict(cfg.reward)}
    sessions = store.open_store(cfg.store.db_url, cfg.store.busy_timeout_ms)
    if not resume:
        refuse_used_database(sessions, cfg.store.db_url)
    worker = ModelWorker(lambda: load_for_serving(cfg, sessions)).start()
    seconds = {"load": 0.0, "votes": 0.0, "reward": 0.0, "ppo": 0.0, "eval": 0.0}
    try:
        worker.ready.wait()
        if worker.load_error is not None:
            raise RuntimeError(f"the model failed to load: {worker.load_error}")
        seconds["load"] = time.perf_counter() - start
        trainer = PPOTrainer(worker, sessions, cfg.ppo, cfg.store.checkpoint_dir, sampling=cfg.sampling)
        trainer.rng.seed(seed)
        rng = random.Random(seed)
        owed = 0  # PPO steps planned before a reward model existed
        with tqdm(total=comparisons + ppo_steps, desc="simulate", unit="item") as bar:
            for pairs, steps in zip(split_evenly(comparisons, rounds), split_evenly(ppo_steps, rounds)):
                # 1) pairs and votes, stored as the UI stores them
                mark = time.perf_counter()
                bar.set_description("pairs + votes")
                counts = collect_votes(
                    worker, sessions, train_prompts, labeler, pairs, cfg, rng,
                    session_id=f"simulate-{seed}", arena_fraction=cfg.loop.arena_fraction, progress=bar.update,
                )
                report.votes = {k: report.votes[k] + v for k, v in counts.items()}
                seconds["votes"] += time.perf_counter() - mark
                # 2) a reward round on every vote so far
                mark = time.perf_counter()
                bar.set_description("reward model")
                result = run_round(worker, sessions, cfg.reward, cfg.store.checkpoint_dir, seed=seed)
                if result is not None:
                    report.rm_heldout_accuracy, report.rm_train_accuracy = result.heldout_accuracy, result.train_accuracy
                    report.reward_rounds.append(round_summary(result, len(report.reward_curve)))
                    bar.set_postfix(rm_heldout=f"{result.heldout_accuracy or 0:.2f}")
                seconds["reward"] += time.perf_counter() - mark
                # 3) PPO on the prompts the "people" typed
                mark = time.perf_counter()
                owed += steps
                if owed and report.reward_rounds:
                    bar.set_description("PPO")
                    with sessions() as session:
                        contexts = store.user_contexts(session)
                    for _ in range(owed):
                        step = trainer.step(trainer.sample_contexts(contexts))
                        report.reward_curve.append(step.mean_reward)
                        report.kl_curve.append(step.mean_kl)
                        report.length_curve.append(step.mean_length)
                        report.copy_gap_curve.append(round(step.copy_gap, 5))
                        bar.set_postfix(reward=f"{step.mean_reward:+.2f}", kl=f"{step.mean_kl:.2f}")
                        bar.update(1)
                    owed = 0
                seconds["ppo"] += time.perf_counter() - mark
        if report.reward_curve:
            trainer.save(worker.serving_version)
            tail = report.kl_curve[-10:]
            report.mean_kl = sum(tail) / len(tail)
        # 4) blind evaluation against the starting model on held-out prompts
        mark = time.perf_counter()
        outcome = evaluate_against_reference(worker, eval_prompts, labeler, cfg, seed + 1)
        report.win_rate_vs_reference = outcome.pop("win_rate")
        report.eval_counts = outcome
        interval = win_rate(outcome["wins"], outcome["ties"], outcome["losses"])
        report.win_rate_interval = [round(interval.low, 3), round(interval.high, 3)]
        seconds["eval"] = time.perf_counter() - mark
    finally:
        worker.stop()
    report.wall_seconds = time.perf_counter() - start
    report.seconds = {k: round(v, 1) for k, v in seconds.items()}
    if report_path:
        report.write(report_path)
        if report.reward_curve:
            plot_curve(report, plot_path or Path(report_path).with_suffix(".png"))
    return report


def round_summary(result, after_ppo_steps: int) -> dict:
    """The report's record of one reward round."""
    return {
        "version": result.version,
        "after_ppo_steps": after_ppo_steps,
        "votes": result.votes,
        "train_pairs": result.train_pairs,
        "heldout_pairs": result.heldout_pairs,
        "heldout_accuracy": result.heldout_accuracy,
        "train_accuracy": result.train_accuracy,
        "seconds": round(result.seconds, 1),
    }
