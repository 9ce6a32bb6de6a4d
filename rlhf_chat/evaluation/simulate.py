"""Simulate: the whole loop headless, with a scripted labeler standing in for people.

pairs -> votes -> reward model -> PPO, in rounds as the live loop takes turns,
then a blind evaluation against the reference, through the same store,
worker, reward and PPO code the app uses. PPO runs under the live loop's own
decisions (learning/training_loop.py: the step budget per reward version, the
KL bound, the tripwire), so that the figures describe a policy the app would
serve; the report says where a bound stopped PPO (``ppo_stops``). As in the app, a share of the pairs
are arena pairs and a share of the others mode pairs (``modes.py``). The
result is a JSON report (see :func:`simulate`): the figures, and what the
policy learned behaviour by behaviour (``behaviours.py``), per round, with
every evaluation answer, so that anyone can measure any behaviour.
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

from rlhf_chat.config import AppConfig
from rlhf_chat.evaluation.labelers import (
    BUILTIN_ADVERSARIES,
    BUILTIN_LABELERS,
    Labeler,
    load_callable,
    load_labeler,
    normalize_choice,
)
from rlhf_chat.evaluation.teachers import Teacher, load_teacher
from rlhf_chat.generation.candidates import BASE_ADAPTER, Candidate, Sampling, generate_pairs, sample
from rlhf_chat.generation.modes import Mode, active_modes, mode_record_for, modes_for_pair
from rlhf_chat.generation.worker import CHAT, REWARD, ModelWorker
from rlhf_chat.learning import training_loop
from rlhf_chat.learning.guards import CLIENT, SESSION, assess_feedback, client_key
from rlhf_chat.learning.ppo import PPOTrainer
from rlhf_chat.learning.preferences import modes_differ
from rlhf_chat.learning.reward import reward_round_from_config
from rlhf_chat.learning.tax import measure_tax
from rlhf_chat.storage import store
from rlhf_chat.storage.arena import win_rate
from rlhf_chat.text.behaviours import DETECTORS, ON_TOPIC, asks_question, behaviour_shares, gives_example, on_topic
from rlhf_chat.text.chat import clean_message, render_prompt
from rlhf_chat.text.questions import (
    FACT,
    HOW_TO,
    KINDS,
    gives_content,
    load_fact_key,
    load_reference_answers,
    question_kind,
    states_fact,
)

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
    models,
    prompts: list[str],
    sampling: Sampling,
    arena: list[bool] | None = None,
    modes: list[tuple[tuple[str, str], tuple[str, str]] | None] | None = None,
) -> list[tuple[Candidate, Candidate]]:
    """Two candidates for each prompt, all in one batched call (2 rows per prompt, as in the UI).

    Where ``arena[k]`` is true, prompt k gets an arena pair: the policy against
    the reference, on a random side (peft mixed adapters in the same call).
    Where ``modes[k]`` is set, prompt k's two sides are written in those two
    (mode name, opening)s, as the UI's mode pairs are; arena pairs never are.
    """
    rendered = [render_prompt(models.tokenizer, as_context(p)) for p in prompts]
    return generate_pairs(models.serving, models.tokenizer, rendered, sampling, models.serving_version, arena, modes)


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
    modes: list[Mode] | None = None,
    mode_fraction: float = 0.0,
    teacher: Teacher | None = None,
    teach_limit: int = 0,
    adversary: Labeler | None = None,
    adversary_share: float = 0.0,
    crowd: Crowd | None = None,
) -> dict[str, int]:
    """Generate ``n`` pairs from the serving policy, ask the labeler, and store pairs
    and votes as the UI does.

    As in the UI, a share ``arena_fraction`` of the pairs puts the policy
    against the reference, once the policy differs from it, and a share
    ``mode_fraction`` of the others shows the policy in two different ``modes``,
    picked as ``loop.mode_choice`` says. With a ``teacher``, up to
    ``teach_limit`` policy pairs get the answer it writes instead of a vote,
    stored as the UI stores a written answer (counted as ``demonstration``).
    With an ``adversary``, a share ``adversary_share`` of the pairs is voted on by
    it instead, under its own sessions and addresses, as a bad actor among the
    people would (counted under ``adversary``). Who casts each vote is the
    ``crowd``'s draw (:class:`Crowd`; by default one honest voice, ``session_id``),
    and an honest decided vote is flipped as the crowd's ``label_noise`` says
    (counted under the choice cast).
    """
    crowd = crowd or Crowd(session_id)
    counts = {"a": 0, "b": 0, "tie": 0, "both_bad": 0, "demonstration": 0, "adversary": 0}
    done = 0
    while done < n:
        chunk = [rng.choice(prompts) for _ in range(min(cfg.simulation.batch_prompts, n - done))]
        pairs, flags = draw_pairs(worker, sessions, chunk, cfg, rng, arena_fraction, modes, mode_fraction)
        for prompt, (a, b), is_arena in zip(chunk, pairs, flags):
            teach = teacher is not None and not is_arena and counts["demonstration"] < teach_limit
            written = written_answer(teacher, prompt, a.text, b.text, cfg) if teach else None
            bad = adversary is not None and not written and rng.random() < adversary_share
            voter = adversary if bad else labeler
            choice = "demonstration" if written else normalize_choice(voter(prompt, a.text, b.text))
            if not bad and not written:
                choice = crowd.noisy(choice)
            who = crowd.adversary() if bad else crowd.honest()
            store_feedback(sessions, who, prompt, (a, b), is_arena, choice, written)
            counts["adversary" if bad else choice] += 1
        done += len(chunk)
        if progress:
            progress(len(chunk))
    return counts


def draw_pairs(
    worker: ModelWorker,
    sessions,
    chunk: list[str],
    cfg: AppConfig,
    rng: random.Random,
    arena_fraction: float,
    modes: list[Mode] | None,
    mode_fraction: float,
) -> tuple[list[tuple[Candidate, Candidate]], list[bool]]:
    """One batched call's pairs for the prompts in ``chunk``, and which are arena pairs
    (none before the policy's first update: there is nothing to compare yet)."""
    arena = [rng.random() < arena_fraction for _ in chunk]
    sampling = Sampling.from_config(cfg.sampling, rng.randrange(2**31))
    # The record is read per batch (per prompt where it depends on the question's
    # kind), as the UI reads it per message: votes already cast steer which modes
    # the next pairs show (loop.mode_choice).
    mode_draws = [None] * len(chunk)
    if modes and mode_fraction > 0:
        with sessions() as session:
            records = {p: mode_record_for(session, cfg.loop.mode_choice, p) for p in dict.fromkeys(chunk)}
        mode_draws = [modes_for_pair(modes, mode_fraction, rng, records[p]) for p in chunk]

    def job(models):
        flags = arena if models.serving_version > 0 else [False] * len(chunk)
        pair_modes = [None if flag else draw for flag, draw in zip(flags, mode_draws)]
        return sample_pairs(models, chunk, sampling, flags, pair_modes), flags

    return worker.call(CHAT, job)


def written_answer(teacher: Teacher, prompt: str, a: str, b: str, cfg: AppConfig) -> str | None:
    """The teacher's answer to a pair, trimmed as the UI trims a message; None when it writes none."""
    written = teacher(prompt, a, b)
    return clean_message(written, cfg.sampling.max_message_chars).text if written else None


def store_feedback(
    sessions,
    who: tuple[str, str],
    prompt: str,
    pair: tuple[Candidate, Candidate],
    arena: bool,
    choice: str,
    written: str | None = None,
) -> None:
    """Store a pair and its vote, or the answer written instead (``written``), as the UI
    does, under ``who``: the (session, client key) that cast it (:class:`Crowd`)."""
    session_id, client = who
    with sessions() as session, session.begin():
        comparison = store.save_pair(
            session, session_id=session_id, context=as_context(prompt), a=pair[0], b=pair[1], arena=arena,
            source="simulate", client=client,
        )
        if written:
            store.add_demonstration(session, comparison.id, session_id, written)
        else:
            store.record_vote(session, comparison.id, choice)


ADVERSARY = "adversary"  # the session suffix of the simulation's bad actor, and its addresses' name


@dataclass
class Crowd:
    """Who casts a simulation's votes (issue 41): ``people`` honest people, each with a
    session and an address of their own, and the adversary's ``adversary_sessions``
    sessions behind ``adversary_addresses`` addresses (session j at address j mod
    that). Addresses are stored as the app stores them (``guards.client_key``).

    One person (``people`` 1) is the single voice of old: one session, ``base``, and
    no address. Who casts each vote is drawn uniformly from a random stream of its
    own, so that the pairs, arena and mode draws, and votes of a seed stay those of
    the single-voice run whatever the crowd.
    """

    base: str
    people: int = 1
    adversary_sessions: int = 1
    adversary_addresses: int = 1
    salt: str = ""
    seed: int = 0
    label_noise: float = 0.0  # the share of honest decided votes flipped (simulation.label_noise)
    flipped: int = 0  # how many were
    rng: random.Random = field(init=False, repr=False)
    noise_rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.people < 1 or self.adversary_sessions < 1:
            raise ValueError(f"--people ({self.people}) and --adversary-sessions ({self.adversary_sessions}) "
                             "must be at least 1")
        if not 1 <= self.adversary_addresses <= self.adversary_sessions:
            raise ValueError(f"--adversary-addresses ({self.adversary_addresses}) must be between 1 and "
                             f"--adversary-sessions ({self.adversary_sessions})")
        if not 0 <= self.label_noise < 0.5:
            raise ValueError(f"simulation.label_noise must be at least 0 and below 0.5, got {self.label_noise}")
        self.rng = random.Random(f"crowd-{self.seed}")
        self.noise_rng = random.Random(f"noise-{self.seed}")  # its own stream: the same voters with or without noise

    @classmethod
    def from_config(cls, base: str, cfg: AppConfig, seed: int) -> Crowd:
        """The crowd ``cfg.simulation`` describes, its addresses salted as the app salts them."""
        sim = cfg.simulation
        return cls(base, sim.people, sim.adversary_sessions, sim.adversary_addresses, cfg.guards.client_salt, seed,
                   sim.label_noise)

    def noisy(self, choice: str) -> str:
        """An honest person's ``choice`` as a noisy annotator casts it: a decided vote
        ("a" or "b") flipped with probability ``label_noise``; any other kept."""
        if choice in ("a", "b") and self.label_noise and self.noise_rng.random() < self.label_noise:
            self.flipped += 1
            return "b" if choice == "a" else "a"
        return choice

    def honest(self) -> tuple[str, str]:
        """(session, client key) of the honest person who casts the next honest vote."""
        if self.people == 1:
            return self.base, ""
        k = self.rng.randrange(self.people)
        return f"{self.base}-person{k:02d}", client_key(f"person-{k}", self.salt)

    def adversary(self) -> tuple[str, str]:
        """(session, client key) of the adversary's session that casts its next vote."""
        j = self.rng.randrange(self.adversary_sessions)
        session = f"{self.base}-{ADVERSARY}" + (f"{j:02d}" if self.adversary_sessions > 1 else "")
        return session, client_key(f"{ADVERSARY}-{j % self.adversary_addresses}", self.salt)


def load_adversary(spec: str, honest: Labeler) -> Labeler:
    """The bad actor of ``--adversary``: ``reversed`` (the honest labeler's choice
    reversed: A for B, B for A, ties kept), a built-in adversary (``longer``,
    ``shorter``: labelers.BUILTIN_ADVERSARIES), a built-in labeler, or a labeler
    spec (``MODULE:CALLABLE``)."""
    if spec.strip() == "reversed":
        flip = {"a": "b", "b": "a"}

        def reversed_labeler(prompt: str, a: str, b: str) -> str:
            choice = normalize_choice(honest(prompt, a, b))
            return flip.get(choice, choice)

        return reversed_labeler
    return load_callable(spec, {**BUILTIN_LABELERS, **BUILTIN_ADVERSARIES}, "adversary")


def contributor_rows(sessions, cfg: AppConfig) -> tuple[list[dict], list[dict]]:
    """What the guards made of each session, and of each address, at the end of a run
    (learning/guards.py): a vote weighs its session's weight times its address's, so
    sessions behind one flagged address weigh nothing though none of them is flagged."""
    with sessions() as session:
        trust = assess_feedback(session, cfg.guards, cfg.loop.demonstration_weight, cfg.reward.tie_weight)
    rows = {SESSION: [], CLIENT: []}
    for (kind, _), c in sorted(trust.contributors.items()):
        rows[kind].append({k: v for k, v in asdict(c).items() if k != "kind"})
    return rows[SESSION], rows[CLIENT]


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
    # Where the PPO time went, summed over the steps (ppo.StepResult): rollout on the
    # serving copy, scoring (reference, policy, reward model), the minibatch updates.
    ppo_seconds: dict = field(default_factory=dict)
    copy_gap_curve: list[float] = field(default_factory=list)  # serving vs training log-prob gap per step
    db_url: str = ""  # where this run's votes are: other runs' votes for bench/reward_transfer.py
    checkpoint_dir: str = ""
    settings: dict = field(default_factory=dict)  # the sampling, PPO and reward settings it ran with
    # What the policy learned, beyond a win-rate (behaviours.py): shares of each
    # behaviour in the reference's and the final policy's held-out answers, and
    # per round in that round's PPO rollouts (the plain policy as it trained).
    behaviour_reference: dict = field(default_factory=dict)
    behaviour_policy: dict = field(default_factory=dict)
    behaviour_rounds: list[dict] = field(default_factory=list)
    # Share of answers that start with a mode's prefilled opening word for word:
    # a canned phrase is not a learned taste, so the README quotes this beside the shares.
    opening_repeats: dict = field(default_factory=dict)
    reward_length_corr: float | None = None  # Pearson r of reward and length, last round's rollouts
    teacher: str = ""  # --teacher: who wrote answers instead of voting on some pairs
    demonstrations: int = 0  # how many answers it wrote
    mode_pairs: dict = field(default_factory=dict)  # how many pairs were mode pairs, and their votes
    eval_answers: list[dict] = field(default_factory=list)  # {"prompt", "policy", "reference", "choice", ...}
    adversary: str = ""  # --adversary: who voted for a share of the pairs under its own session
    adversary_share: float = 0.0
    flipped_votes: int = 0  # honest decided votes flipped at random (simulation.label_noise)
    guards: bool = True  # whether the guards weighed the feedback (guards.enabled)
    contributors: list[dict] = field(default_factory=list)  # guards.Contributor rows at the end, by session
    addresses: list[dict] = field(default_factory=list)  # the same by client address (salted hash)
    # What the learned taste cost (learning/tax.py), reference and final policy: facts
    # kept on the answer key, NLL per token of well-formed answers, the share of answers
    # that say something; and the same per kind of held-out question (text/questions.py).
    alignment_tax: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)
    # The KL of the final policy's own rollouts (nats per answer): within loop.max_kl,
    # since a policy whose rollouts pass it gives way to the last one within it.
    served_kl: float | None = None
    # PPO runs under the live loop's bounds (training_loop.ppo_budget_spent): the steps
    # that ran, and each time a bound stopped a round's PPO before its share of
    # ppo_steps: {"round" (from 1), "after_ppo_steps", "reason"}.
    ppo_steps_run: int = 0
    ppo_stops: list[dict] = field(default_factory=list)
    # When the tripwire tripped (guards on): {"round", "after_ppo_steps", "reason",
    # "roll_back_to"}; training then pauses for the rest of the run, as the live loop
    # does. The final evaluation is of the policy at the trip: the live loop would
    # serve checkpoint "roll_back_to" (0: the starting model) instead, where it is set.
    tripwire: dict | None = None

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
    neither was preferred. ``answers`` lists every prompt's two answers and the
    verdict ("policy", "reference", "tie" or "both_bad").
    """
    rng = random.Random(seed)
    answers: list[dict] = []
    batch = cfg.simulation.batch_prompts
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        sampling = Sampling.from_config(cfg.sampling, rng.randrange(2**31))

        def job(models, chunk=chunk, sampling=sampling):
            rendered = [render_prompt(models.tokenizer, as_context(p)) for p in chunk]
            rows = [ids for ids in rendered for _ in range(2)]
            names = ["policy", BASE_ADAPTER] * len(chunk)
            return sample(models.serving, models.tokenizer, rows, sampling, adapter_names=names)

        out = worker.call(CHAT, job)
        for k, prompt in enumerate(chunk):
            policy, reference = out.texts[2 * k], out.texts[2 * k + 1]
            policy_first = rng.random() < 0.5
            a, b = (policy, reference) if policy_first else (reference, policy)
            answers.append({
                "prompt": prompt, "policy": policy, "reference": reference,
                "choice": blind_verdict(normalize_choice(labeler(prompt, a, b)), policy_first),
                "policy_finished": out.finished[2 * k], "reference_finished": out.finished[2 * k + 1],
            })
    verdicts = [a["choice"] for a in answers]
    wins, losses = verdicts.count("policy"), verdicts.count("reference")
    ties = len(verdicts) - wins - losses
    win = (wins + 0.5 * ties) / len(verdicts) if verdicts else 0.0
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": win, "answers": answers}


def blind_verdict(choice: str, policy_first: bool) -> str:
    """A labeler's choice between two answers shown in random order, as what it chose:
    "policy", "reference", or the "tie" / "both_bad" it said.

    >>> blind_verdict("a", policy_first=False), blind_verdict("both_bad", True)
    ('reference', 'both_bad')
    """
    if choice in ("tie", "both_bad"):
        return choice
    return "policy" if (choice == "a") == policy_first else "reference"


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


def behaviour_series(report: Report) -> tuple[list[str], dict[str, list[float | None]]]:
    """The x labels and, per behaviour, its share (None where a report lacks it): the
    reference's held-out answers, each round's PPO rollouts, then the final policy's
    held-out answers."""
    columns = [report.behaviour_reference, *(r["policy"] for r in report.behaviour_rounds), report.behaviour_policy]
    labels = ["reference", *(f"round {i + 1}" for i in range(len(report.behaviour_rounds))), "final policy"]
    series = {name: [c.get(name) for c in columns] for name in (*DETECTORS, ON_TOPIC)}
    return labels, series


def plot_behaviours(report: Report, path: str | Path) -> Path:
    """A PNG of each behaviour's share, from the reference over the rounds to the final policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, series = behaviour_series(report)
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    for name, values in series.items():
        if any(v is not None for v in values):  # a share a report lacks is a gap, not a 0
            points = [float("nan") if v is None else v for v in values]
            ax.plot(range(len(labels)), points, marker="o", label=name, linestyle=":" if name == ON_TOPIC else "-")
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylabel="share of answers", ylim=(-0.02, 1.02),
           title=f"Behaviours ({report.labeler} labeler): held-out answers at the ends, PPO rollouts between")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside: no point hidden
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
    teacher_spec: str | None = None,
    adversary_spec: str | None = None,
    adversary_share: float = 0.0,
    fact_key_path: str | None = None,
    reference_answers_path: str | None = None,
) -> Report:
    """Pairs, votes, reward model, PPO and evaluation, headless; returns (and writes) the report.

    The work runs in ``cfg.simulation.rounds`` rounds, in the live loop's
    order: a share of the pairs and votes, a reward round (on every vote so
    far), a share of the PPO steps, each step only where the live loop would
    take it (:meth:`SimulationRun.ppo_round`). Then the final policy is judged
    blind against the reference on held-out prompts.

    The report holds the alignment tax beside the win-rate (:func:`measure_final_tax`):
    facts kept on ``fact_key_path`` (default: the shipped key), the NLL of
    ``reference_answers_path``'s answers (default: the shipped set), the content share.

    A database that already holds votes is refused (:class:`UsedDatabase`)
    unless ``resume`` says to build on the run that left them. The honest votes come
    from ``cfg.simulation.people`` people (:class:`Crowd`). With an ``adversary_spec``
    (:func:`load_adversary`), a share ``adversary_share`` of the votes comes from a
    bad actor, from ``cfg.simulation.adversary_sessions`` sessions behind
    ``adversary_addresses`` addresses; ``cfg.guards.enabled`` says whether the guards
    (learning/guards.py, learning/tripwire.py) weigh it down and watch the run.
    """
    from tqdm import tqdm

    from rlhf_chat.runtime import load_for_serving

    start = time.perf_counter()
    people = Voters.load(labeler_spec, teacher_spec, adversary_spec, adversary_share)
    crowd = Crowd.from_config(f"simulate-{seed}", cfg, seed)  # a bad --people refused before the model loads
    fact_key, well_formed = load_fact_key(fact_key_path), load_reference_answers(reference_answers_path)
    train_prompts, eval_prompts = split_prompts(load_prompts(prompts_file))
    rounds = max(1, min(cfg.simulation.rounds, comparisons))
    report = new_report(cfg, people, comparisons, ppo_steps, rounds, len(eval_prompts))
    sessions = store.open_store(cfg.store.db_url, cfg.store.busy_timeout_ms)
    if not resume:
        refuse_used_database(sessions, cfg.store.db_url)
    with sessions() as session:
        modes = active_modes(session, cfg.loop.answer_first)
    worker = ModelWorker(
        lambda: load_for_serving(cfg, sessions), cfg.model.trim_memory_every_s, cfg.model.training_share
    ).start()
    try:
        run = SimulationRun.start(cfg, worker, sessions, report, people, train_prompts, modes, seed, crowd)
        run.seconds["load"] = time.perf_counter() - start
        with tqdm(total=comparisons + ppo_steps, desc="simulate", unit="item") as run.bar:
            shares = zip(split_evenly(comparisons, rounds), split_evenly(ppo_steps, rounds))
            for round_no, (pairs, steps) in enumerate(shares, start=1):
                run.collect_votes(pairs)
                run.reward_round(round_no)
                run.ppo_round(round_no, steps)
        run.finish_training()
        run.evaluate(eval_prompts)
        measure_final_tax(run, fact_key, well_formed, eval_prompts)
    finally:
        worker.stop()
    report.wall_seconds = time.perf_counter() - start
    report.seconds = {k: round(v, 1) for k, v in run.seconds.items()}
    # summed unrounded: rounding each step's running total drifts past the phase's own total
    report.ppo_seconds = {k: round(v, 2) for k, v in run.phase_seconds.items()}
    write_outputs(report, report_path, plot_path)
    return report


@dataclass
class Voters:
    """Who gives the feedback of a run: the labeler, and the teacher and adversary when named."""

    labeler_spec: str
    labeler: Labeler
    teacher_spec: str = ""
    teacher: Teacher | None = None
    adversary_spec: str = ""
    adversary: Labeler | None = None
    adversary_share: float = 0.0

    @classmethod
    def load(cls, labeler_spec: str, teacher_spec: str | None, adversary_spec: str | None, share: float) -> Voters:
        """Load each spec (a clear error for an unknown one) and check the adversary's share."""
        labeler = load_labeler(labeler_spec)
        teacher = load_teacher(teacher_spec) if teacher_spec else None
        adversary = load_adversary(adversary_spec, labeler) if adversary_spec else None
        if adversary is not None and not 0 < share < 1:
            raise ValueError(f"--adversary-share must be between 0 and 1, got {share}")
        return cls(labeler_spec, labeler, teacher_spec or "", teacher, adversary_spec or "", adversary,
                   share if adversary_spec else 0.0)


def new_report(
    cfg: AppConfig, people: Voters, comparisons: int, ppo_steps: int, rounds: int, eval_prompts: int
) -> Report:
    """The report before anything ran: what was asked for, and the settings it runs with."""
    report = Report(labeler=people.labeler_spec, comparisons=comparisons, ppo_steps=ppo_steps, rounds=rounds,
                    eval_prompts=eval_prompts)
    report.votes = {"a": 0, "b": 0, "tie": 0, "both_bad": 0, "demonstration": 0, "adversary": 0}
    report.teacher = people.teacher_spec
    report.adversary, report.adversary_share = people.adversary_spec, people.adversary_share
    report.guards = cfg.guards.enabled
    report.db_url, report.checkpoint_dir = cfg.store.db_url, cfg.store.checkpoint_dir
    # the loop's settings too: PPO runs under its bounds (ppo_steps_per_reward, max_kl)
    # the guards' thresholds and the crowd (simulation.people, adversary_sessions, adversary_addresses) too
    report.settings = {name: asdict(getattr(cfg, name))
                       for name in ("sampling", "ppo", "reward", "loop", "guards", "simulation")}
    return report


@dataclass
class SimulationRun:
    """A simulation under way: its parts, and each phase of :func:`simulate` as a method."""

    cfg: AppConfig
    worker: ModelWorker
    sessions: Callable
    report: Report
    people: Voters
    prompts: list[str]  # the training prompts pairs are collected on
    modes: list[Mode]
    trainer: PPOTrainer
    seed: int
    rng: random.Random
    crowd: Crowd  # who casts each vote: the honest people and the adversary's sessions
    bar: object = None  # the tqdm bar, set by simulate
    owed: int = 0  # PPO steps planned before a reward model existed
    seconds: dict = field(default_factory=lambda: {"load": 0.0, "votes": 0.0, "reward": 0.0, "ppo": 0.0, "eval": 0.0})
    phase_seconds: dict = field(default_factory=dict)  # a PPO step's rollout, scoring and update, summed over steps

    @classmethod
    def start(cls, cfg: AppConfig, worker: ModelWorker, sessions, report: Report, people: Voters,
              prompts: list[str], modes: list[Mode], seed: int, crowd: Crowd) -> SimulationRun:
        """Setup: wait for the model, then build the PPO trainer as the live loop does
        (``prompts`` and ``modes``: what pairs are collected on, and in; ``crowd``: who votes)."""
        worker.ready.wait()
        if worker.load_error is not None:
            raise RuntimeError(f"the model failed to load: {worker.load_error}")
        trainer = PPOTrainer.from_config(worker, sessions, cfg)
        trainer.rng.seed(seed)
        return cls(cfg, worker, sessions, report, people, prompts, modes, trainer, seed, random.Random(seed), crowd)

    def collect_votes(self, pairs: int) -> None:
        """Phase 1 of a round: ``pairs`` pairs and their votes, stored as the UI stores them."""
        mark, cfg, people, report = time.perf_counter(), self.cfg, self.people, self.report
        self.bar.set_description("pairs + votes")
        counts = collect_votes(
            self.worker, self.sessions, self.prompts, people.labeler, pairs, cfg, self.rng,
            arena_fraction=cfg.loop.arena_fraction, progress=self.bar.update,
            modes=self.modes, mode_fraction=cfg.loop.mode_fraction,
            teacher=people.teacher, teach_limit=cfg.simulation.demonstrations - report.votes["demonstration"],
            adversary=people.adversary, adversary_share=people.adversary_share, crowd=self.crowd,
        )
        report.votes = {k: report.votes[k] + v for k, v in counts.items()}
        report.flipped_votes = self.crowd.flipped
        report.demonstrations = report.votes["demonstration"]
        self.seconds["votes"] += time.perf_counter() - mark

    def reward_round(self, round_no: int) -> None:
        """Phase 2: a reward round on every vote so far, as the live loop runs one, then
        the tripwire; none once the tripwire has paused training, nor before PPO has had
        its turn on the reward model before (``loop.ppo_steps_between_rewards``)."""
        if self.report.tripwire is not None:
            return
        version = self.worker.call(REWARD, lambda m: m.reward_version)
        with self.sessions() as session:
            if not training_loop.ppo_had_its_turn(session, self.cfg, version):
                return
        mark, report = time.perf_counter(), self.report
        self.bar.set_description("reward model")
        result = reward_round_from_config(self.worker, self.sessions, self.cfg, seed=self.seed)
        if result is not None:
            report.rm_heldout_accuracy, report.rm_train_accuracy = result.heldout_accuracy, result.train_accuracy
            report.reward_rounds.append(round_summary(result, len(report.reward_curve)))
            self.bar.set_postfix(rm_heldout=f"{result.heldout_accuracy or 0:.2f}")
            self.check_tripwire(round_no)
        self.seconds["reward"] += time.perf_counter() - mark

    def ppo_round(self, round_no: int, steps: int) -> None:
        """Phase 3: the round's share of PPO steps (with any owed from rounds before the
        first reward model), on the prompts the "people" typed. Before each step the
        live loop's own bounds (:meth:`ppo_stop_reason`); after each, the tripwire. A
        bound stops the round's PPO, and the steps it stopped are not owed."""
        mark = time.perf_counter()
        self.owed += steps
        if self.owed and self.report.reward_rounds and self.report.tripwire is None:
            self.bar.set_description("PPO")
            with self.sessions() as session:
                contexts = store.user_contexts(session)
            rollouts: list[tuple[str, float, int, str]] = []
            guided: list[float] = []  # raw scores of the guided rows
            ran = 0
            while ran < self.owed and not self.stopped(round_no):
                self.record_step(self.trainer.step(self.trainer.sample_contexts(contexts)), rollouts, guided)
                ran += 1
                self.check_tripwire(round_no)
            self.bar.update(self.owed - ran)  # the steps a bound stopped are done with too
            self.owed = 0
            if ran:
                report = self.report
                report.behaviour_rounds.append(round_behaviours(rollouts, self.modes, len(report.reward_curve), guided))
                report.reward_length_corr = report.behaviour_rounds[-1]["reward_length_corr"]
        self.seconds["ppo"] += time.perf_counter() - mark

    def stopped(self, round_no: int) -> bool:
        """Whether PPO must stop here: the tripwire paused training, or a bound of the live
        loop holds (:meth:`ppo_stop_reason`, then recorded in ``report.ppo_stops``)."""
        if self.report.tripwire is not None:
            return True
        reason = self.ppo_stop_reason()
        if reason:
            self.report.ppo_stops.append(
                {"round": round_no, "after_ppo_steps": len(self.report.reward_curve), "reason": reason}
            )
        return bool(reason)

    def ppo_stop_reason(self) -> str:
        """Why the live loop would take no PPO step now ("" when it would): PPO is off
        (``loop.ppo_enabled``), or the reward version's budget or the KL bound says so
        (:func:`training_loop.ppo_budget_spent`, the loop's own check)."""
        if not self.cfg.loop.ppo_enabled:
            return "PPO is off (loop.ppo_enabled)"
        version = self.worker.call(REWARD, lambda m: m.reward_version)
        with self.sessions() as session:
            return training_loop.ppo_budget_spent(session, self.cfg, version)

    def check_tripwire(self, round_no: int) -> None:
        """After a reward round or a PPO step: the live loop's tripwire
        (:func:`training_loop.tripwire_trip`); a trip is recorded and pauses training."""
        if self.report.tripwire is not None:
            return
        with self.sessions() as session:
            trip = training_loop.tripwire_trip(session, self.cfg)
        if trip is not None:
            log.warning("the tripwire tripped; training paused for the rest of the run: %s", trip.reason)
            self.report.tripwire = {"round": round_no, "after_ppo_steps": len(self.report.reward_curve),
                                    "reason": trip.reason, "roll_back_to": trip.roll_back_to}

    def record_step(self, step, rollouts: list[tuple[str, float, int, str]], guided: list[float]) -> None:
        """Add a PPO step (``ppo.StepResult``) to the report's curves and the round's rollouts:
        the plain policy as it trained (a guided row's opening was prefilled)."""
        rows = zip(step.texts or [], step.scores or [], step.lengths or [], step.guided or [], step.prompts or [])
        for text, score, length, was_guided, prompt in rows:
            if was_guided:
                guided.append(score)
            else:
                rollouts.append((text, score, length, prompt))
        report = self.report
        report.reward_curve.append(step.mean_reward)
        report.kl_curve.append(step.mean_kl)
        report.length_curve.append(step.mean_length)
        report.copy_gap_curve.append(round(step.copy_gap, 5))
        report.ppo_steps_run = len(report.reward_curve)
        for phase in ("rollout", "score", "update"):
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + getattr(step, f"{phase}_s")
        self.bar.set_postfix(reward=f"{step.mean_reward:+.2f}", kl=f"{step.mean_kl:.2f}")
        self.bar.update(1)

    def finish_training(self) -> None:
        """Save the final policy as a checkpoint, and the mean KL of the last ten steps."""
        report = self.report
        if report.reward_curve:
            self.trainer.save(self.worker.serving_version)
            tail = report.kl_curve[-10:]
            report.mean_kl = sum(tail) / len(tail)
            report.served_kl = self.trainer.served_kl

    def evaluate(self, eval_prompts: list[str]) -> None:
        """Phase 4: the final policy judged blind against the starting model on held-out
        prompts; what it learned, behaviour by behaviour; the guards' view of each session."""
        mark, report = time.perf_counter(), self.report
        outcome = evaluate_against_reference(self.worker, eval_prompts, self.people.labeler, self.cfg, self.seed + 1)
        report.win_rate_vs_reference = outcome.pop("win_rate")
        report.eval_answers = outcome.pop("answers")
        report.eval_counts = outcome
        describe_final_answers(report, self.modes)
        report.mode_pairs = count_mode_pairs(self.sessions)
        report.contributors, report.addresses = contributor_rows(self.sessions, self.cfg)
        interval = win_rate(outcome["wins"], outcome["ties"], outcome["losses"])
        report.win_rate_interval = [round(interval.low, 3), round(interval.high, 3)]
        self.seconds["eval"] = time.perf_counter() - mark


def measure_final_tax(run: SimulationRun, key: dict[str, list[str]], well_formed: list[tuple[str, str]],
                      eval_prompts: list[str]) -> None:
    """Phase 5: the alignment tax of the final policy against the reference (learning/tax.py),
    and what each kind of held-out question got (:func:`kind_shares`)."""
    mark, cfg = time.perf_counter(), run.cfg
    sampling = Sampling.from_config(cfg.sampling, run.seed + 2)

    def job(models):
        return measure_tax(models, key, well_formed, sampling, cfg.simulation.tax_fact_questions,
                           cfg.simulation.tax_answers_per_question, run.seed, content_prompts=eval_prompts)

    run.report.alignment_tax = run.worker.call(CHAT, job).as_dict()
    run.report.kinds = kind_shares(run.report.eval_answers, key)
    run.seconds["tax"] = time.perf_counter() - mark


def kind_shares(answers: list[dict], key: dict[str, list[str]]) -> dict:
    """Per kind of held-out question (text/questions.py), reference and policy: how many
    questions, and the share of answers that do what the kind calls for: state the fact
    (and ask instead), ask back on topic, give an example on topic; and say something."""
    out: dict = {}
    for kind in KINDS:
        rows = [a for a in answers if question_kind(a["prompt"], key) == kind]
        entry: dict = {"questions": len(rows)}
        for side in ("reference", "policy"):
            texts = [(a["prompt"], a[side]) for a in rows]
            n = max(1, len(texts))
            shares = {"content": sum(gives_content(p, t) for p, t in texts) / n}
            if kind == FACT:
                shares["states the fact"] = sum(states_fact(t, key[p.strip()]) for p, t in texts) / n
                shares["asks instead"] = sum(
                    (not states_fact(t, key[p.strip()])) and asks_question(t) for p, t in texts) / n
            elif kind == HOW_TO:
                shares["asks back on topic"] = sum(asks_question(t) and on_topic(p, t) for p, t in texts) / n
            else:
                shares["example on topic"] = sum(gives_example(t) and on_topic(p, t) for p, t in texts) / n
            entry[side] = {k: round(v, 4) for k, v in shares.items()}
        out[kind] = entry
    return out


def write_outputs(report: Report, report_path: str | Path | None, plot_path: str | Path | None) -> None:
    """Write the JSON report and, when PPO ran, the reward-curve and behaviour plots beside it."""
    if not report_path:
        return
    report.write(report_path)
    if report.reward_curve:
        plot_curve(report, plot_path or Path(report_path).with_suffix(".png"))
        plot_behaviours(report, Path(plot_path or report_path).with_suffix(".behaviours.png"))


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's correlation coefficient; None when either side does not vary.

    >>> round(pearson([1, 2, 3], [2, 4, 7]), 6)
    0.993399
    """
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def opening_share(texts: list[str], modes: list[Mode]) -> float:
    """Share of answers that start with one of the modes' openings, word for word."""
    openings = [o.strip() for m in modes for o in m.openings if o.strip()]
    return sum(any(t.startswith(o) for o in openings) for t in texts) / max(1, len(texts))


def round_behaviours(
    rollouts: list[tuple[str, float, int, str]], modes: list[Mode], after_ppo_steps: int,
    guided_scores: list[float] = (),
) -> dict:
    """Behaviour shares, opening repeats and the reward-length correlation of one round's
    PPO rollouts (the plain rows: text, raw score, length, question), and how the reward
    model scored the guided rows against them (``guided_score_gap``: mean raw score,
    guided minus plain)."""
    texts = [t for t, _, _, _ in rollouts]
    scores = [float(s) for _, s, _, _ in rollouts]
    corr = pearson(scores, [float(n) for _, _, n, _ in rollouts])
    gap = sum(guided_scores) / len(guided_scores) - sum(scores) / len(scores) if guided_scores and scores else None
    return {
        "after_ppo_steps": after_ppo_steps,
        "policy": behaviour_shares(texts, prompts=[q for _, _, _, q in rollouts]),
        "opening_repeats": round(opening_share(texts, modes), 4),
        "reward_length_corr": None if corr is None else round(corr, 4),
        "guided_rows": len(guided_scores),
        "guided_score_gap": None if gap is None else round(gap, 4),
    }


def describe_final_answers(report: Report, modes: list[Mode]) -> None:
    """Fill the report's behaviour shares and opening repeats from the evaluation answers."""
    answers = report.eval_answers
    for side, target in (("reference", report.behaviour_reference), ("policy", report.behaviour_policy)):
        texts, finished = [a[side] for a in answers], [a[f"{side}_finished"] for a in answers]
        target.update(behaviour_shares(texts, finished, [a["prompt"] for a in answers]))
        report.opening_repeats[side] = round(opening_share([a[side] for a in answers], modes), 4)


def count_mode_pairs(sessions) -> dict:
    """How many voted pairs were mode pairs, and how many of those a vote decided."""
    with sessions() as session:
        comparisons = store.voted_comparisons(session)
    mode_pairs = [c for c in comparisons if modes_differ(c)]
    decided = [c for c in mode_pairs if c.choice in ("a", "b")]
    return {"pairs": len(comparisons), "mode_pairs": len(mode_pairs), "mode_pairs_decided": len(decided)}


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
