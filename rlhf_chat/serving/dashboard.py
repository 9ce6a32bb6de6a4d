"""Dashboard: what the Training tab shows, read from the database and the loop's status.

Every plot is a pandas DataFrame in the long layout ``gr.LinePlot`` reads, made
by a pure function of a database session, so tests check the numbers a person
would see. :func:`refresh` gathers them, and :func:`training_tick` adds the
tables, for the UI's timer.

The before/after probes are the one part that needs the model: a fixed set of
prompts answered by the reference and by the serving policy, recomputed in the
background (:class:`ProbeBoard`) when the policy version changes.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from rlhf_chat.config import AppConfig
from rlhf_chat.generation.candidates import BASE_ADAPTER, Sampling, sample
from rlhf_chat.generation.worker import PPO, ModelWorker
from rlhf_chat.learning.preferences import is_heldout
from rlhf_chat.learning.reward import usable_feedback
from rlhf_chat.learning.tax import tax_markdown
from rlhf_chat.model.loading import Models
from rlhf_chat.serving.services import Services
from rlhf_chat.storage import store
from rlhf_chat.storage.arena import ArenaResult, arena_results, bucket_results, total
from rlhf_chat.storage.tables import CandidateRow, Comparison, PPOStep, TrainingEvent
from rlhf_chat.text.behaviours import DETECTORS, ON_TOPIC, behaviour_shares
from rlhf_chat.text.chat import prompt_text, render_prompt

log = logging.getLogger(__name__)

MAX_POINTS = 300  # a browser draws a few hundred points per plot smoothly; more only slows the page
ARENA_MIN_VOTES = 10  # arena votes pooled per point of the win-rate curve (see arena.bucket_results)

# What refresh() returns, in order; the UI wires its outputs in the same order.
REFRESH_OUTPUTS = (
    "loop", "votes", "accuracy", "reward", "kl", "version", "copy_gap", "arena", "arena_summary", "events",
)


# --- plot data ---------------------------------------------------------------------------


def _times(values: list[datetime]) -> pd.Series:
    """Timestamps as naive UTC (SQLite drops the time zone, PostgreSQL keeps it)."""
    return pd.Series(pd.to_datetime(values, utc=True).tz_localize(None), dtype="datetime64[ns]")


def thin(frame: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """At most ``max_points`` evenly spaced rows, always keeping the first and the last.

    >>> thin(pd.DataFrame({"x": range(10)}), 4)["x"].tolist()
    [0, 3, 6, 9]
    """
    if len(frame) <= max_points:
        return frame.reset_index(drop=True)
    step = (len(frame) - 1) / (max_points - 1)
    rows = sorted({round(i * step) for i in range(max_points)})
    return frame.iloc[rows].reset_index(drop=True)


def votes_over_time(session: Session, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Columns ``time``, ``votes``: the running count of votes (every choice) as they came in."""
    times = list(
        session.scalars(
            select(Comparison.voted_at).where(Comparison.choice.is_not(None)).order_by(Comparison.voted_at)
        )
    )
    frame = pd.DataFrame({"time": _times(times), "votes": pd.Series(range(1, len(times) + 1), dtype="int64")})
    return thin(frame, max_points)


def reward_accuracy(session: Session) -> pd.DataFrame:
    """Columns ``time``, ``version``, ``accuracy``, ``votes``: held-out accuracy of each reward round.

    Rounds with no held-out pair (too few votes yet) have no accuracy and are left out.
    """
    rounds = [r for r in store.reward_rounds(session) if r.heldout_accuracy is not None]
    return pd.DataFrame(
        {
            "time": _times([r.created_at for r in rounds]),
            "version": pd.Series([r.version for r in rounds], dtype="int64"),
            "accuracy": pd.Series([r.heldout_accuracy for r in rounds], dtype="float64"),
            "votes": pd.Series([r.votes for r in rounds], dtype="int64"),
        }
    )


def ppo_metrics(session: Session, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Columns ``time``, ``version``, ``mean_reward``, ``mean_kl``, ``kl_coef``, ``copy_gap``:
    one row per PPO step.

    ``mean_reward`` is the raw reward-model score of the step's answers,
    ``mean_kl`` the KL of whole answers to the reference (as TRL reports it),
    and ``copy_gap`` the mean absolute gap per sampled token between the serving
    copy's log-probabilities and the training copy's (NaN for steps recorded
    before it was measured).
    """
    # The plotted columns only: a step's row also holds its answers and prompts, and a
    # Space that trains for days has thousands, read again at every refresh.
    columns = (PPOStep.created_at, PPOStep.version, PPOStep.mean_reward, PPOStep.mean_kl, PPOStep.kl_coef,
               PPOStep.copy_gap)
    steps = session.execute(select(*columns).order_by(PPOStep.id)).all()
    frame = pd.DataFrame(
        {
            "time": _times([s.created_at for s in steps]),
            "version": pd.Series([s.version for s in steps], dtype="int64"),
            "mean_reward": pd.Series([s.mean_reward for s in steps], dtype="float64"),
            "mean_kl": pd.Series([s.mean_kl for s in steps], dtype="float64"),
            "kl_coef": pd.Series([s.kl_coef for s in steps], dtype="float64"),
            "copy_gap": pd.Series([s.copy_gap for s in steps], dtype="float64"),
        }
    )
    return thin(frame, max_points)


def arena_curve(results: list[ArenaResult], min_votes: int = ARENA_MIN_VOTES) -> pd.DataFrame:
    """Columns ``version``, ``win_rate``, ``series``, ``votes``: the policy's win-rate against the
    reference and its 95% interval, one point per bucket of versions, in the long layout
    (``series`` is "win rate", "95% low" or "95% high") so that one LinePlot draws all three."""
    rows = []
    for bucket in bucket_results(results, min_votes):
        rate = bucket.win_rate()
        for series, value in (("win rate", rate.rate), ("95% low", rate.low), ("95% high", rate.high)):
            rows.append({"version": bucket.version, "win_rate": value, "series": series, "votes": bucket.n})
    return pd.DataFrame(
        {
            "version": pd.Series([r["version"] for r in rows], dtype="int64"),
            "win_rate": pd.Series([r["win_rate"] for r in rows], dtype="float64"),
            "series": pd.Series([r["series"] for r in rows], dtype="str"),
            "votes": pd.Series([r["votes"] for r in rows], dtype="int64"),
        }
    )


def feedback_counts(session: Session) -> str:
    """One line: the votes by choice, and the answers people wrote themselves."""
    votes = {c: store.count_votes(session, (c,)) for c in ("a", "b", "tie", "both_bad")}
    written = store.count_demonstrations(session)
    return (f"**Feedback:** {sum(votes.values())} votes ({votes['a'] + votes['b']} for A or B, {votes['tie']} ties, "
            f"{votes['both_bad']} both bad) and {written} written answer{'' if written == 1 else 's'}.")


def arena_summary(results: list[ArenaResult]) -> str:
    """One line on the win-rate of all arena votes so far, with its interval."""
    pooled = total(results)
    if pooled.n == 0:
        return "No arena votes yet: blind policy-vs-reference pairs start once the policy has been updated."
    rate = pooled.win_rate()
    return (
        f"People preferred the policy to the starting model in **{rate.rate:.0%}** of {pooled.n} blind arena votes "
        f"(95% interval {rate.low:.0%}–{rate.high:.0%}; a tie counts as half; 50% means no better than the start)."
    )


def tax_summary(session: Session) -> str:
    """What the newest measured policy has paid for its taste (``learning/tax.py``): the
    figures stored with its checkpoint, beside the win-rate, so that a rising win-rate
    is never read without its cost; else why there are none yet."""
    measured = [c for c in store.checkpoints(session, "policy") if (c.extra or {}).get("tax")]
    if not measured:
        return ("**What the taste costs:** measured with each saved policy (facts stated, NLL of well-formed "
                "answers, answers that say something, against the starting model); no policy saved with it yet.")
    newest = measured[-1]
    extra = newest.extra
    return tax_markdown(newest.version, extra["tax"], extra["tax_reference"], extra.get("tax_questions", 0))


# --- the loop's state and its events -----------------------------------------------------


def loop_state(loop, follower=None) -> str:
    """What the training loop is doing, in one Markdown line (training, paused, waiting,
    error); on a serve replica, what it knows of the trainer (``follower.state_markdown``)."""
    if loop is None and follower is not None:
        return follower.state_markdown()
    if loop is None:
        return "**Training:** off in this process."
    status = loop.status
    state = status.state
    if getattr(loop, "paused", False) and state != "paused":
        state = "pausing (finishing the current step)"
    text = f"**Training:** {state}"
    if status.detail:
        text += f" — {status.detail}"
    if status.state == "error" and status.last_error:
        text += f"\n\n**Last error:** {status.last_error} (retrying with back-off)"
    return text


def recent_events(session: Session, limit: int = 5, details: bool = False) -> str:
    """The newest training events (errors, admin actions) as a Markdown list, newest first.

    An error's text (an exception, perhaps with paths) is shown only with
    ``details``, on the admin panel; the public Training tab says there was one.
    """
    events = list(session.scalars(select(TrainingEvent).order_by(TrainingEvent.id.desc()).limit(limit)))
    if not events:
        return ""

    def text(e: TrainingEvent) -> str:
        if e.kind == "error" and not details:
            return "training hit an error and retries (details in the admin panel and the log)"
        return e.message.splitlines()[0][:200]

    lines = [f"- {e.created_at:%Y-%m-%d %H:%M:%S} UTC · {e.kind}: {text(e)}" for e in events]
    return "**Recent events**\n\n" + "\n".join(lines)


def not_yet(session: Session, cfg: AppConfig) -> str:
    """Why each chart or table that is still empty is empty, and what it waits for,
    one Markdown line each ("" when everything has something to show)."""
    lines = []
    if reward_accuracy(session).empty:
        # preferences.is_heldout: the same votes stay held out across rounds and restarts
        voted = session.scalars(select(Comparison.id).where(Comparison.choice.in_(("a", "b"))))
        held = sum(is_heldout(i, cfg.reward.heldout_fraction) for i in voted)
        lines.append(
            f"**Held-out accuracy:** n/a: needs 1 held-out vote and a reward round after it; {held} so far "
            f"(one A/B vote in {round(1 / cfg.reward.heldout_fraction)} is held out, never trained on)."
            if cfg.reward.heldout_fraction > 0 else "**Held-out accuracy:** n/a: no votes are held out "
            "(reward.heldout_fraction is 0)."
        )
    if session.scalar(select(func.count()).select_from(PPOStep)) == 0:
        usable = usable_feedback(session, cfg.reward.tie_weight)
        lines.append(
            f"**PPO charts:** empty until the first PPO step, which follows the first reward model "
            f"(needs {cfg.loop.min_votes} votes; {usable} so far)."
        )
    if not store.mode_record(session):
        lines.append("**Ways of answering:** no vote between two response modes yet.")
    return "\n\n".join(lines)


def refresh(sessions: sessionmaker[Session], loop, follower=None, cfg: AppConfig | None = None) -> tuple:
    """Everything the Training tab shows, in the order of :data:`REFRESH_OUTPUTS`;
    with ``cfg``, the first part also says why an empty chart is empty (:func:`not_yet`).

    One database session per refresh; every part is a plain value (Markdown or
    a DataFrame), so the UI's ``gr.Timer`` hands them straight to its components.
    """
    with sessions() as session:
        ppo = ppo_metrics(session)
        arena = arena_results(session)
        missing = not_yet(session, cfg) if cfg is not None else ""
        return (
            "\n\n".join(filter(None, (loop_state(loop, follower), feedback_counts(session), missing))),
            votes_over_time(session),
            reward_accuracy(session),
            ppo[["time", "mean_reward"]],
            ppo[["time", "mean_kl"]],
            ppo[["time", "version"]],
            ppo[["time", "copy_gap"]].dropna(),
            arena_curve(arena),
            arena_summary(arena) + "\n\n" + tax_summary(session),
            recent_events(session),
        )


# --- before and after: probe prompts -----------------------------------------------------

PROBE_PROMPTS = (
    "Give me three tips for sleeping better.",
    "Explain what a black hole is to a ten-year-old.",
    "Write a short, friendly reply declining a meeting invitation.",
    "What should I pack for a weekend hiking trip?",
)


PROBE_SEED = 1234  # one fixed draw: the two columns differ by the weights, not the dice


@torch.no_grad()
def probe_answers(
    models: Models, prompts: list[str], reference: bool, max_new_tokens: int, temperature: float = 0.7
) -> list[str]:
    """The serving copy's answers, with its policy adapter or without (the reference),
    sampled the way the chat samples (``sampling.temperature`` 0.7, loops stopped), with
    one fixed seed.

    Greedy decoding loops on the bundled model ("1. **1.1.1.1..."), so greedy probes
    showed a worse model than people meet. The seed is fixed and the layout the same
    for both columns, so a difference between them is the policy's doing, and a policy
    equal to the reference (version 0, or after a reset) answers word for word as it does.
    """
    tok = models.tokenizer
    prompt_ids = [render_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    adapter = BASE_ADAPTER if reference else "policy"
    settings = Sampling(max_new_tokens, temperature, seed=PROBE_SEED, stop_loops=True)
    return [t.strip() for t in sample(models.serving, tok, prompt_ids, settings, adapter_names=[adapter] * len(prompts)).texts]


@dataclass
class ProbeAnswers:
    """The probes answered by the reference and by one policy version."""

    version: int
    prompts: list[str]
    reference: list[str]
    policy: list[str]

    def table(self) -> pd.DataFrame:
        """Columns ``prompt``, ``reference (start)``, ``policy vN``: the side-by-side view."""
        return pd.DataFrame(
            {"prompt": self.prompts, "reference (start)": self.reference, f"policy v{self.version}": self.policy}
        )


class ProbeBoard:
    """Before/after answers to :data:`PROBE_PROMPTS`, kept current without blocking anyone.

    :meth:`answers` returns the latest finished answers at once and, when the
    serving version has changed, queues one job to recompute them. The job
    runs at the lowest worker priority, so a person waiting for a chat answer
    always goes first; and at most once per ``min_interval_s``, because PPO
    makes a new version every few seconds and the probes must not eat its time.
    The reference never changes, so its answers are computed once.
    """

    def __init__(
        self, prompts: tuple[str, ...] = PROBE_PROMPTS, max_new_tokens: int = 48, min_interval_s: float = 60.0
    ):
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()  # several browsers' timers call answers() at once
        self._latest: ProbeAnswers | None = None
        self._reference: list[str] | None = None
        self._future: Future | None = None
        self._started = float("-inf")

    def _job(self, models: Models) -> ProbeAnswers:
        if self._reference is None:
            self._reference = probe_answers(models, self.prompts, True, self.max_new_tokens)
        policy = probe_answers(models, self.prompts, False, self.max_new_tokens)
        return ProbeAnswers(models.serving_version, self.prompts, self._reference, policy)

    def answers(self, worker: ModelWorker, wait: bool = False) -> ProbeAnswers | None:
        """The newest finished answers (None before the first); ``wait`` blocks for a fresh set."""
        if not worker.ready.is_set() or worker.load_error is not None:
            return self._latest
        with self._lock:
            self._collect()
            stale = self._latest is None or self._latest.version != worker.serving_version
            due = time.monotonic() - self._started >= self.min_interval_s or self._latest is None
            if stale and self._future is None and (due or wait):
                self._started = time.monotonic()
                self._future = worker.submit(PPO, self._job)
            future = self._future
        if wait and future is not None:
            future.exception()  # wait; a failure is logged by _collect
            with self._lock:
                self._collect()
        return self._latest

    def _collect(self) -> None:
        """Take the finished job's answers (caller holds the lock)."""
        if self._future is None or not self._future.done():
            return
        future, self._future = self._future, None
        if future.exception() is not None:
            log.warning("probe answers failed: %s", future.exception())
            return
        self._latest = future.result()


def arena_answers(session: Session, limit: int = 100) -> dict[str, tuple[list[str], list[bool], list[str]]]:
    """The texts, finished flags and questions (the context's last user turn) of the
    newest ``limit`` arena pairs' answers, by source."""
    query = (
        select(CandidateRow.source, CandidateRow.text, CandidateRow.finished, Comparison.context)
        .join(Comparison, CandidateRow.comparison_id == Comparison.id)
        .where(Comparison.arena.is_(True))
        .order_by(Comparison.id.desc())
        .limit(2 * limit)
    )
    out: dict[str, tuple[list[str], list[bool], list[str]]] = {"reference": ([], [], []), "policy": ([], [], [])}
    for source, text, finished, context in session.execute(query):
        if source in out:
            out[source][0].append(text)
            out[source][1].append(bool(finished))
            out[source][2].append(prompt_text(context or []))
    return out


def behaviour_table(session: Session, probes: ProbeAnswers | None, limit: int = 100) -> pd.DataFrame:
    """What the policy learned, behaviour by behaviour: its share of answers against the reference's.

    From the newest arena pairs (sampled, as people see them) and from the
    probe answers (sampled with one seed: no finished flags). A column with no answers yet is left out. "on topic"
    (``behaviours.on_topic``) says how many answers still mention what they were
    asked, which no labeler that counts markers sees.
    """
    columns: dict[str, dict[str, float]] = {}
    arena = arena_answers(session, limit)
    for source in ("reference", "policy"):
        texts, finished, questions = arena[source]
        if texts:
            columns[f"{source} (arena, {len(texts)} answers)"] = behaviour_shares(texts, finished, questions)
    if probes is not None:
        columns["reference (probes)"] = behaviour_shares(probes.reference, prompts=probes.prompts)
        columns[f"policy v{probes.version} (probes)"] = behaviour_shares(probes.policy, prompts=probes.prompts)
    names = ["words", "finished", *DETECTORS, ON_TOPIC]
    table = {"behaviour": names}
    for label, shares in columns.items():
        table[label] = [round(shares[n], 2) if n in shares else None for n in names]
    return pd.DataFrame(table)


def mode_table(session: Session) -> pd.DataFrame:
    """Which ways of answering people chose: each mode's wins and losses in votes
    between two modes (``store.mode_record``), the most chosen first."""
    record = store.mode_record(session)
    rows = sorted(record.items(), key=lambda item: (-(item[1][0] / max(1, sum(item[1]))), item[0]))
    return pd.DataFrame(
        {
            "mode": [name for name, _ in rows],
            "chosen": [wins for _, (wins, _) in rows],
            "not chosen": [losses for _, (_, losses) in rows],
            "share chosen": [round(wins / max(1, wins + losses), 2) for _, (wins, losses) in rows],
        }
    )


def probe_table(answers: ProbeAnswers | None) -> pd.DataFrame:
    """The side-by-side table, or the prompts with a note while the first answers are written."""
    if answers is None:
        waiting = ["(writing...)"] * len(PROBE_PROMPTS)
        return pd.DataFrame({"prompt": list(PROBE_PROMPTS), "reference (start)": waiting, "policy": waiting})
    return answers.table()


# --- the tab's timer ------------------------------------------------------------------------


def training_tick(services: Services, board: ProbeBoard) -> tuple:
    """Everything the Training tab shows: :func:`refresh`'s outputs, then the probe,
    behaviour and mode tables.

    The probes are read from the board without waiting; a changed policy
    version only queues their recomputation (see :class:`ProbeBoard`).
    """
    probes = board.answers(services.worker)
    with services.sessions() as session:
        behaviours = behaviour_table(session, probes)
        modes = mode_table(session)
    refreshed = refresh(services.sessions, services.loop, services.follower, services.config)
    return (*refreshed, probe_table(probes), behaviours, modes)
