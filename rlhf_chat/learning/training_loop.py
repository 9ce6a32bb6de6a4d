"""Training loop: the background thread that turns votes into a better policy, live.

It decides what to train next and hands the work to the model worker in
slices (one reward step, one rollout, one PPO minibatch), so that people
chatting wait at most one slice:

* a reward round after every ``reward_every_votes`` new votes (and at start
  when there are enough and no reward model yet);
* otherwise PPO steps while a reward model exists and people have typed
  prompts, at most ``ppo_steps_per_reward`` of them per reward version and none
  once the KL to the reference passes ``max_kl``: a reward model fitted to a
  few votes is evidence for a few steps, not for an idle night. Then it waits
  for votes;
* pause/resume at any time; an exception is logged, shown in the UI, and
  retried with exponential back-off; it never takes the chat down;
* after every reward round and PPO step the tripwire (learning/tripwire.py)
  looks at the arena, the KL, the reward model and whom the guards trust: when it trips, training
  pauses, the admin is told why, and the policy being served goes back to the
  last good one (``on_trip``, wired to the admin's rollback by the runtime).
"""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

from rlhf_chat.config import AppConfig
from rlhf_chat.generation.worker import REWARD, ModelWorker
from rlhf_chat.learning import tripwire
from rlhf_chat.learning.checkpoints import prune_checkpoints
from rlhf_chat.learning.ppo import PPOTrainer, ScoreNormalizer
from rlhf_chat.learning.reward import reward_round_from_config, usable_feedback
from rlhf_chat.storage import store

log = logging.getLogger(__name__)


# --- the decisions, shared with the simulation (evaluation/simulate.py) ------------------------
# Module functions of (session, config), so that a simulated run stops where the
# live loop would, and its figures describe a policy the app would serve.


def ppo_budget_spent(session, cfg: AppConfig, reward_version: int) -> str:
    """Why no more PPO steps may run on ``reward_version`` ("" when one may): the
    version's budget of ``loop.ppo_steps_per_reward`` completed steps is spent, or the
    last of them had a KL to the starting model past ``loop.max_kl`` (0: no bound)."""
    loop = cfg.loop
    steps = store.ppo_steps_on_reward(session, reward_version)
    if loop.ppo_steps_per_reward > 0 and len(steps) >= loop.ppo_steps_per_reward:
        return f"PPO budget for reward v{reward_version} spent ({len(steps)} steps)"
    if loop.max_kl > 0 and steps and steps[-1].mean_kl > loop.max_kl:
        return f"KL to the starting model {steps[-1].mean_kl:.1f} > {loop.max_kl:g} nats"
    return ""


def ppo_had_its_turn(session, cfg: AppConfig, reward_version: int) -> bool:
    """Whether new votes may start the next reward round: PPO has taken
    ``loop.ppo_steps_between_rewards`` steps on ``reward_version``, or can take none
    (off, its budget spent, past the KL bound), or there is no reward model yet."""
    turn = cfg.loop.ppo_steps_between_rewards
    if reward_version == 0 or turn <= 0 or not cfg.loop.ppo_enabled:
        return True
    taken = len(store.ppo_steps_on_reward(session, reward_version))
    return taken >= turn or bool(ppo_budget_spent(session, cfg, reward_version))


def tripwire_trip(session, cfg: AppConfig, after_policy: int = 0, after_reward: int = 0) -> tripwire.Trip | None:
    """The tripwire's verdict after a reward round or a PPO step (learning/tripwire.py),
    or None; never a trip with the guards off (``guards.enabled``). Evidence up to
    ``after_policy`` / ``after_reward`` was seen by an admin at a resume."""
    if not cfg.guards.enabled:
        return None
    return tripwire.check(session, cfg.guards, after_policy, after_reward,
                          cfg.loop.demonstration_weight, cfg.reward.tie_weight)


@dataclass
class LoopStatus:
    """What the loop is doing, for the UI (read from any thread)."""

    state: str = "starting"  # starting | waiting for votes | training reward model | running PPO | paused | error
    detail: str = ""
    last_error: str = ""
    reward_rounds: int = 0
    ppo_steps: int = 0
    history: list[str] = field(default_factory=list)


def prune_old_checkpoints(sessions, cfg: AppConfig) -> list[int]:
    """Keep ``store.keep_checkpoints`` of each kind, newest first, and the policy the
    tripwire would roll back to (``tripwire.rollback_target``); returns what went.
    An admin's rollback can reach the kept ones; older versions live on only in the
    arena's records, which need no files."""
    with sessions() as session:
        protect = {tripwire.rollback_target(session, cfg.guards.tripwire_arena_votes)}
    removed = prune_checkpoints(sessions, "policy", cfg.store.keep_checkpoints, protect)
    return removed + prune_checkpoints(sessions, "reward", cfg.store.keep_checkpoints)


class TrainingLoop:
    """The background trainer. One per app, beside the one model worker."""

    def __init__(self, worker: ModelWorker, sessions, cfg: AppConfig, on_trip: Callable[[int], str] | None = None):
        self.worker = worker
        self.sessions = sessions
        self.cfg = cfg
        self.status = LoopStatus()
        self.ppo = PPOTrainer.from_config(worker, sessions, cfg)
        # Called with the version to serve again when the tripwire trips (0: the starting
        # model); returns what it did. The runtime wires it to controls.rollback / reset.
        self.on_trip = on_trip
        self.tripped: tripwire.Trip | None = None
        self._after_policy = 0  # tripwire evidence up to these versions was seen at a resume
        self._after_reward = 0
        self._votes_at_last_round = 0
        self._too_few_at: int | None = None  # feedback count at which a first round found too few votes
        self._paused = threading.Event()
        self._stop = threading.Event()
        self._halted = ""
        self._thread = threading.Thread(target=self._run, name="training-loop", daemon=True)

    # --- control ----------------------------------------------------------------------

    def start(self) -> TrainingLoop:
        """Start training in the background (returns at once)."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the slice under way."""
        self._stop.set()
        self._thread.join(timeout)

    def halt(self, why: str) -> None:
        """Stop training for good, after the slice under way, and say why (the
        trainer lease was lost to another process: two trainers must never
        publish side by side)."""
        self._halted = why
        self._stop.set()
        self.status.state, self.status.detail, self.status.last_error = "error", "stopped", why

    def pause(self) -> None:
        """Finish the current step, then train no more until resumed."""
        self._paused.set()
        self.status.state = "paused"

    def resume(self) -> None:
        """Carry on training. Evidence the tripwire acted on (or that was there when
        an admin resumed) does not trip it again: only new votes and steps count."""
        if self.tripped is not None:
            with self.sessions() as session:
                self._after_policy = max(self.worker.serving_version, tripwire.newest_policy_evidence(session))
                latest = store.latest_checkpoint(session, "reward")
            self._after_reward = latest.version if latest is not None else 0
            self.tripped = None
        self._paused.clear()

    @property
    def paused(self) -> bool:
        """Whether training is paused (by an admin or for a reset)."""
        return self._paused.is_set()

    def state_text(self, details: bool = False) -> str:
        """One line for the status bar; the error itself only with ``details`` (the
        admin panel): the public header says that training hit an error, not what."""
        s = self.status
        text = f"training: **{s.state}**"
        if s.detail:
            text += f" ({s.detail})"
        if s.state == "error" and s.last_error:
            text += f" — last error: {s.last_error}" if details else " — details in the admin panel and the log"
        return text

    # --- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        self.worker.ready.wait()
        if self.worker.load_error is not None:
            self.status.state, self.status.last_error = "error", str(self.worker.load_error)
            return
        self._restore_counters()
        backoff = self.cfg.loop.retry_backoff_s
        while not self._stop.is_set():
            if self._paused.is_set():
                self.status.state = "paused"
                self._stop.wait(0.5)
                continue
            try:
                did_work = self.run_once()
                backoff = self.cfg.loop.retry_backoff_s
                if not did_work:
                    self._stop.wait(2.0)
            except Exception as exc:  # never let training take the chat down
                log.exception("training failed; retrying in %.0f s", backoff)
                self._record_error(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.cfg.loop.max_backoff_s)
        if self._halted:  # the slice that was under way may have set its own state
            self.status.state, self.status.detail, self.status.last_error = "error", "stopped", self._halted

    def run_once(self) -> bool:
        """Do the next piece of training; False when there is nothing to do yet."""
        votes = self._count_votes()
        reward_version = self.worker.call(REWARD, lambda m: m.reward_version)
        due = votes - self._votes_at_last_round >= self.cfg.loop.reward_every_votes and self._ppo_had_its_turn(
            reward_version
        )
        first_due = votes >= self.cfg.loop.min_votes and votes != self._too_few_at  # no retry on the same votes
        if (reward_version == 0 and first_due) or (reward_version > 0 and due):
            self.status.state, self.status.detail = "training reward model", f"{votes} votes"
            result = reward_round_from_config(self.worker, self.sessions, self.cfg)
            self._votes_at_last_round = votes
            self._too_few_at = votes if result is None else None
            if result is not None:
                self.status.reward_rounds += 1
                self.status.detail = f"reward v{result.version}, held-out accuracy {result.accuracy_text()}"
                self.check_tripwire()
                prune_old_checkpoints(self.sessions, self.cfg)
                return True
        if reward_version == 0:
            self.status.state = "waiting for votes"
            if votes >= self.cfg.loop.min_votes:  # enough feedback, but the round found too few votes to rank by
                self.status.detail = (f"{votes} votes, but fewer than {self.cfg.reward.min_pairs} A/B votes to "
                                      "train on (ties rank nothing; some votes are held out or left out by "
                                      "the guards): more A or B votes, please")
            else:
                self.status.detail = f"{votes}/{self.cfg.loop.min_votes} votes before the first reward model"
            return False
        if not self.cfg.loop.ppo_enabled:
            self.status.state, self.status.detail = "waiting for votes", "PPO is off"
            return False
        spent = self.ppo_budget_spent(reward_version)
        if spent:
            self.status.state, self.status.detail = "waiting for votes", spent
            return False
        with self.sessions() as session:
            contexts = store.user_contexts(session)
        if not contexts:
            self.status.state, self.status.detail = "waiting for votes", "no prompts yet"
            return False
        self.status.state = "running PPO"
        result = self.ppo.step(self.ppo.sample_contexts(contexts))
        self.status.ppo_steps += 1
        self.status.detail = f"policy v{result.version}, reward {result.mean_reward:+.2f}, KL {result.mean_kl:.2f}"
        self.check_tripwire()
        prune_old_checkpoints(self.sessions, self.cfg)
        return True

    def check_tripwire(self) -> tripwire.Trip | None:
        """Pause training when the tripwire trips (arena, KL, reward model), tell the
        admin why, and have the last good policy served (``on_trip``, in the background:
        a rollback waits for this thread to be idle). Returns the trip, if any."""
        if self.tripped is not None:
            return None
        with self.sessions() as session:
            trip = tripwire_trip(session, self.cfg, self._after_policy, self._after_reward)
        if trip is None:
            return None
        self.tripped = trip
        self.pause()
        self.status.detail = f"tripwire: {trip.reason}"
        log.warning("training paused by the tripwire: %s", trip.reason)
        self._record_event("tripwire", f"training paused: {trip.reason}")
        if trip.roll_back_to is not None and self.on_trip is not None:
            threading.Thread(target=self._roll_back, args=(trip.roll_back_to,), name="tripwire-rollback",
                             daemon=True).start()
        return trip

    def _roll_back(self, version: int) -> None:
        try:
            done = self.on_trip(version)
            self._record_event("tripwire", done)
            self.status.detail = f"tripwire: {self.tripped.reason if self.tripped else ''}; {done}"
        except Exception as exc:  # the policy being served stays; the admin can still roll back by hand
            log.exception("the tripwire could not roll the policy back")
            self._record_event("error", f"the tripwire could not roll back to v{version}: {exc}")

    def _record_event(self, kind: str, message: str) -> None:
        try:
            with self.sessions() as session, session.begin():
                store.add_event(session, kind, message)
        except Exception:  # the database itself may be what failed
            log.exception("could not record a training event")

    def _ppo_had_its_turn(self, reward_version: int) -> bool:
        """:func:`ppo_had_its_turn` on this loop's database and settings."""
        with self.sessions() as session:
            return ppo_had_its_turn(session, self.cfg, reward_version)

    def ppo_budget_spent(self, reward_version: int) -> str:
        """Why PPO must wait for new votes ("" when it may run): :func:`ppo_budget_spent`'s
        reason, and how many more votes train the next reward model."""
        with self.sessions() as session:
            spent = ppo_budget_spent(session, self.cfg, reward_version)
        if not spent:
            return ""
        due = self.cfg.loop.reward_every_votes - (self._count_votes() - self._votes_at_last_round)
        return f"{spent}; {max(1, due)} more vote{'s' if due != 1 else ''} train the next reward model"

    def _count_votes(self) -> int:
        """Usable feedback (``reward.usable_feedback``): A/B votes, written answers, and ties where they train."""
        with self.sessions() as session:
            return usable_feedback(session, self.cfg.reward.tie_weight)

    def _restore_counters(self) -> None:
        """After a restart: votes already used by the last reward round, and the KL coefficient."""
        with self.sessions() as session:
            rounds = store.reward_rounds(session)
            policy = store.latest_checkpoint(session, "policy")
        if rounds:
            self._votes_at_last_round = rounds[-1].votes
        if policy is not None and "kl_coef" in policy.extra:
            self.ppo.kl_ctl.value = float(policy.extra["kl_coef"])
        if policy is not None and "score_normalizer" in policy.extra:
            self.ppo.normalizer = ScoreNormalizer.from_dict(policy.extra["score_normalizer"])

    def _record_error(self, exc: Exception) -> None:
        self.status.state = "error"
        self.status.last_error = f"{type(exc).__name__}: {exc}"
        self._record_event("error", "".join(traceback.format_exception_only(type(exc), exc)).strip())
