"""Tripwire: the live loop stops itself when what it learns turns bad.

Rate limits slow a flood and the guards (learning/guards.py) bound a few bad
contributors, but a patient adversary, or a reward model gone wrong, can still
steer PPO. Three signals, each read from the store after every piece of
training (``config.GuardConfig`` holds the thresholds):

* **Arena**: people judge the policy against the starting model blind. When the
  win-rate of the newest ``tripwire_arena_votes`` or more arena votes has its
  Wilson 95% interval entirely below 0.5, people prefer the starting model.
* **KL**: a PPO step whose policy sits more than ``tripwire_kl`` nats per answer
  from the starting model has left what the reward model was trained on.
* **Reward model**: a round whose held-out accuracy falls below
  ``tripwire_rm_accuracy`` (on at least 20 held-out pairs) would steer PPO by noise.

A trip pauses training, tells the admin why (an event and the status line),
and names the policy to go back to (:attr:`Trip.roll_back_to`): the newest saved
checkpoint from before the evidence, or the starting model (0) when there is
none. Training resumes only when an admin says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_chat.storage import store
from rlhf_chat.storage.arena import ArenaResult, arena_results, win_rate

MIN_HELDOUT = 20  # held-out pairs below which an accuracy is too noisy to trip on


@dataclass
class Trip:
    """Why the loop stopped, and the policy version to serve instead (None: keep the current one)."""

    reason: str
    roll_back_to: int | None = None


def newest_window(results: list[ArenaResult], min_votes: int) -> tuple[ArenaResult, int] | None:
    """The newest policy versions' arena votes pooled until there are ``min_votes``, and
    the first version in the pool; None when all the votes together are fewer."""
    pooled = ArenaResult(version=0, first_version=0)
    for result in sorted(results, key=lambda r: r.version, reverse=True):
        if pooled.n == 0:
            pooled.version = result.version
        pooled.wins += result.wins
        pooled.ties += result.ties
        pooled.losses += result.losses
        pooled.first_version = result.version
        if pooled.n >= min_votes:
            return pooled, pooled.first_version
    return None


def checkpoint_before(session, version: int) -> int:
    """The newest saved policy checkpoint older than ``version``; 0 (the starting model) if none."""
    older = [c.version for c in store.checkpoints(session, "policy") if c.version < version]
    return max(older, default=0)


def rollback_target(session, min_votes: int) -> int:
    """The policy checkpoint an arena trip would roll back to now: the newest saved one
    older than the newest ``min_votes`` arena votes' versions (0: the starting model).
    Pruning keeps it (``checkpoints.prune_checkpoints``)."""
    window = newest_window(arena_results(session), min_votes) if min_votes > 0 else None
    return checkpoint_before(session, window[1]) if window is not None else 0


def arena_trip(session, min_votes: int, after_version: int = 0) -> Trip | None:
    """A trip when people significantly prefer the starting model on the newest arena votes
    (only votes on versions after ``after_version``: those before were seen by an admin)."""
    if min_votes <= 0:
        return None
    results = [r for r in arena_results(session) if r.version > after_version]
    window = newest_window(results, min_votes)
    if window is None:
        return None
    pooled, first = window
    rate = win_rate(pooled.wins, pooled.ties, pooled.losses)
    if rate.high >= 0.5:
        return None
    return Trip(
        f"people preferred the starting model: the policy won {rate.rate:.0%} of the newest {pooled.n} arena votes "
        f"(v{first}-v{pooled.version}; 95% interval {rate.low:.2f}-{rate.high:.2f}, below 0.5)",
        checkpoint_before(session, first),
    )


def kl_trip(session, bound: float, after_version: int = 0) -> Trip | None:
    """A trip when the newest PPO step (of a version after ``after_version``) had a KL
    to the starting model past ``bound``."""
    steps = [s for s in store.ppo_steps(session) if s.version > after_version]
    if bound <= 0 or not steps or steps[-1].mean_kl <= bound:
        return None
    step = steps[-1]
    # The step's rollout was written by the policy being served before the step: version - 1.
    served = step.version - 1 if not step.skipped else step.version
    return Trip(
        f"the KL to the starting model was {step.mean_kl:.1f} nats per answer at v{served} (bound {bound:g})",
        checkpoint_before(session, served),
    )


def reward_trip(session, min_accuracy: float, after_version: int = 0) -> Trip | None:
    """A trip when the newest reward round (of a version after ``after_version``) had its
    held-out accuracy collapse below ``min_accuracy``."""
    rounds = [r for r in store.reward_rounds(session) if r.version > after_version]
    if min_accuracy <= 0 or not rounds:
        return None
    last = rounds[-1]
    if last.heldout_accuracy is None or last.heldout_pairs < MIN_HELDOUT or last.heldout_accuracy >= min_accuracy:
        return None
    return Trip(
        f"the reward model v{last.version} agreed with only {last.heldout_accuracy:.0%} of {last.heldout_pairs} "
        f"held-out votes (bound {min_accuracy:.0%}); PPO would follow noise"
    )


def newest_policy_evidence(session) -> int:
    """The newest policy version any arena vote or PPO step speaks of: what a resume marks as seen."""
    versions = [r.version for r in arena_results(session)] + [s.version for s in store.ppo_steps(session)]
    return max(versions, default=0)


def check(session, cfg, after_policy: int = 0, after_reward: int = 0) -> Trip | None:
    """The first of the three trips that holds (``cfg``: a ``config.GuardConfig``), or None.
    Evidence an admin has seen (policy versions up to ``after_policy``, reward versions
    up to ``after_reward``, the marks at the last resume) does not trip it again."""
    return (
        arena_trip(session, cfg.tripwire_arena_votes, after_policy)
        or kl_trip(session, cfg.tripwire_kl, after_policy)
        or reward_trip(session, cfg.tripwire_rm_accuracy, after_reward)
    )
