"""Tripwire: the live loop stops itself when what it learns turns bad.

Rate limits slow a flood and the guards (learning/guards.py) bound a few bad
contributors, but a patient adversary, or a reward model gone wrong, can still
steer PPO. Five signals, each read from the store after every piece of
training (``config.GuardConfig`` holds the thresholds):

* **Arena**: people judge the policy against the starting model blind. When the
  win-rate of the newest ``tripwire_arena_votes`` or more arena votes has its
  Wilson 95% interval entirely below 0.5, people prefer the starting model.
* **KL**: a PPO step whose policy sits more than ``tripwire_kl`` nats per answer
  from the starting model has left what the reward model was trained on.
* **Reward model**: a round whose held-out accuracy falls below
  ``tripwire_rm_accuracy`` (on at least 20 held-out pairs) would steer PPO by noise.
* **Trust** (:func:`trust_trip`), after each reward round, on the guards' weights
  as that round trained with them (feedback up to its ``trained_through``):

  - *silenced*: the feedback of flagged contributors (its weight before the
    guards) is at least ``tripwire_silenced_share`` of all feedback. The guards
    are meant to take out a few bad actors; when they silence most of the crowd,
    they are deciding whose taste wins, as when the first reward model flagged
    the honest labeler (issue 41). An admin's exclusions do not count: the admin
    knows of them.
  - *newly trusted*: at least ``tripwire_newly_trusted_share`` of the round's
    training weight (after the guards) comes from contributors the previous
    round did not trust: flagged or excluded then, or not there yet. A wave of
    fresh sessions, or a flag lifted because an attacker grew large enough to
    move the consensus, would decide the model. Checked only when the previous
    round trained on ``tripwire_min_weight`` or more, so that the first rounds,
    where everybody is new, do not trip it.

* **Tax** (:func:`tax_trip`): the newest policy measured for its alignment tax
  (learning/tax.py, stored with its checkpoint) finds well-formed answers much less
  likely, or states facts much less often, than the starting model: it is paying
  for its taste with what the model already knew (issue 40).

A trip pauses training, tells the admin why (an event and the status line),
and names the policy to go back to (:attr:`Trip.roll_back_to`): the newest saved
checkpoint from before the evidence, or the starting model (0) when there is
none. Training resumes only when an admin says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_chat.config import LoopConfig, RewardConfig
from rlhf_chat.learning.guards import CLIENT, SESSION, Feedback, Trust, assess_feedback
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


@dataclass
class TrustShift:
    """What the guards did to a round's feedback, against the round before (:func:`trust_shift`)."""

    silenced_share: float  # feedback weight (before the guards) of flagged contributors / all of it
    silenced: list[str]  # the flagged contributors, "kind:key"
    newly_trusted_share: float | None  # training weight of contributors the previous round did not trust / all
    newly_trusted: list[str]  # those contributors; None share: no previous round large enough to compare
    previous_weight: float  # the previous round's training weight (0: no previous round)


def _who(item: Feedback) -> list[tuple[str, str]]:
    return [(kind, key) for kind, key in ((SESSION, item.session), (CLIENT, item.client)) if key]


def silenced_by_flags(trust: Trust) -> tuple[float, list[str]]:
    """The share of the feedback's weight before the guards that flagged contributors
    gave (an admin's exclusions not counted), and who they are."""
    table = trust.contributors
    flagged = {who for who, c in table.items() if c.flagged and not c.excluded}
    total = sum(item.weight for item, _ in trust.weighed)
    silenced = sum(item.weight for item, _ in trust.weighed if flagged.intersection(_who(item)))
    return (silenced / total if total > 0 else 0.0), sorted(f"{k}:{v}" for k, v in flagged)


def newly_trusted(now: Trust, before: Trust) -> tuple[float, list[str]]:
    """The share of ``now``'s training weight (after the guards) on feedback whose session
    or address ``before`` did not trust (absent, flagged or excluded), and who they are."""
    def untrusted(who: tuple[str, str]) -> bool:
        c = before.contributors.get(who)
        return c is None or c.flagged or c.excluded

    total = sum(w for _, w in now.weighed)
    fresh = [(item, w) for item, w in now.weighed if w > 0 and any(untrusted(who) for who in _who(item))]
    names = sorted({f"{k}:{v}" for item, _ in fresh for k, v in _who(item) if untrusted((k, v))})
    return (sum(w for _, w in fresh) / total if total > 0 else 0.0), names


def trust_shift(session, cfg, through: int, previous_through: int | None,
                demonstration_weight: float, tie_weight: float) -> TrustShift:
    """The guards' weights on the feedback up to comparison ``through`` (a reward round's
    ``trained_through``) against those up to ``previous_through`` (the round before's;
    None: none). ``cfg``: a ``config.GuardConfig``."""
    now = assess_feedback(session, cfg, demonstration_weight, tie_weight, through=through)
    share, flagged = silenced_by_flags(now)
    if previous_through is None:
        return TrustShift(share, flagged, None, [], 0.0)
    before = assess_feedback(session, cfg, demonstration_weight, tie_weight, through=previous_through)
    previous_weight = sum(w for _, w in before.weighed)
    if previous_weight < cfg.tripwire_min_weight:
        return TrustShift(share, flagged, None, [], previous_weight)
    fresh_share, fresh = newly_trusted(now, before)
    return TrustShift(share, flagged, fresh_share, fresh, previous_weight)


def _names(who: list[str], most: int = 5) -> str:
    return ", ".join(who[:most]) + (f" and {len(who) - most} more" if len(who) > most else "")


# (database, reward checkpoint id, version, trained_through) -> its verdict; all four, so
# that a row id reused after a deletion never meets an old verdict
_SEEN: dict[tuple[str, int, int, int], Trip | None] = {}


def trust_trip(session, cfg, after_reward: int = 0, demonstration_weight: float = LoopConfig.demonstration_weight,
               tie_weight: float = RewardConfig.tie_weight) -> Trip | None:
    """A trip when the newest reward round (of a version after ``after_reward``) trained on
    feedback the flags had mostly silenced, or mostly from contributors the round before
    did not trust (``cfg.tripwire_silenced_share``, ``cfg.tripwire_newly_trusted_share``;
    the module docstring). The verdict on a round is worked out once: the check runs
    after every PPO step too, and the round's feedback does not change."""
    rounds = [c for c in store.checkpoints(session, "reward") if "trained_through" in (c.extra or {})]
    if not rounds or rounds[-1].version <= after_reward:
        return None
    if cfg.tripwire_silenced_share <= 0 and cfg.tripwire_newly_trusted_share <= 0:
        return None
    latest = rounds[-1]
    key = (str(session.get_bind().url), latest.id, latest.version, int(latest.extra["trained_through"]))
    if key not in _SEEN:
        previous = rounds[-2].extra["trained_through"] if len(rounds) > 1 else None
        shift = trust_shift(session, cfg, latest.extra["trained_through"], previous, demonstration_weight, tie_weight)
        _SEEN[key] = trust_verdict(shift, cfg, latest.version)
    return _SEEN[key]


def trust_verdict(shift: TrustShift, cfg, version: int) -> Trip | None:
    """The trip a :class:`TrustShift` calls for under ``cfg``'s thresholds, or None."""
    if 0 < cfg.tripwire_silenced_share <= shift.silenced_share:
        return Trip(
            f"the guards' flags silenced {shift.silenced_share:.0%} of the feedback reward model v{version} saw "
            f"(bound {cfg.tripwire_silenced_share:.0%}; flagged: {_names(shift.silenced)}): they would decide whose "
            "taste wins, not take out a few bad actors"
        )
    share = shift.newly_trusted_share
    if share is not None and 0 < cfg.tripwire_newly_trusted_share <= share:
        return Trip(
            f"{share:.0%} of reward model v{version}'s training weight came from contributors the round before did "
            f"not trust (bound {cfg.tripwire_newly_trusted_share:.0%}; {_names(shift.newly_trusted)})"
        )
    return None


def newest_policy_evidence(session) -> int:
    """The newest policy version any arena vote or PPO step speaks of: what a resume marks as seen."""
    versions = [r.version for r in arena_results(session)] + [s.version for s in store.ppo_steps(session)]
    return max(versions, default=0)


def tax_trip(session, max_nll_rise: float, max_facts_drop: float, after_version: int = 0) -> Trip | None:
    """A trip when the newest saved policy, measured for its alignment tax
    (``PPOTrainer.record_tax``; a version after ``after_version``), finds well-formed answers more than
    ``max_nll_rise`` nats per token less likely than the starting model does, or states
    facts in ``max_facts_drop`` fewer of its answers (either 0: that test off): it is
    forgetting what the starting model knew, whatever the reward model says."""
    saved = store.checkpoints(session, "policy")
    newest = saved[-1] if saved else None
    # only the newest checkpoint's figures: an older measurement (a restart before the
    # next one) says nothing of what training did since
    if newest is None or newest.version <= after_version or not (newest.extra or {}).get("tax"):
        return None
    policy, reference = newest.extra["tax"], newest.extra["tax_reference"]
    rise, drop = policy["nll"] - reference["nll"], reference["facts"] - policy["facts"]
    if max_nll_rise > 0 and rise > max_nll_rise:
        why = f"well-formed answers got {rise:.2f} nats per token less likely (bound {max_nll_rise:g})"
    elif max_facts_drop > 0 and drop > max_facts_drop:
        why = f"it stated facts in {drop:.0%} fewer answers (bound {max_facts_drop:.0%})"
    else:
        return None
    return Trip(f"policy v{newest.version} is forgetting what the starting model knew: {why}",
                checkpoint_before(session, newest.version))


def check(session, cfg, after_policy: int = 0, after_reward: int = 0,
          demonstration_weight: float = LoopConfig.demonstration_weight,
          tie_weight: float = RewardConfig.tie_weight) -> Trip | None:
    """The first of the five trips that holds (``cfg``: a ``config.GuardConfig``), or None.
    Evidence an admin has seen (policy versions up to ``after_policy``, reward versions
    up to ``after_reward``, the marks at the last resume) does not trip it again. The
    weights are the training's own (``loop.demonstration_weight``, ``reward.tie_weight``),
    so that the trust trip weighs the feedback as the round did."""
    return (
        arena_trip(session, cfg.tripwire_arena_votes, after_policy)
        or kl_trip(session, cfg.tripwire_kl, after_policy)
        or reward_trip(session, cfg.tripwire_rm_accuracy, after_reward)
        or trust_trip(session, cfg, after_reward, demonstration_weight, tie_weight)
        or tax_trip(session, cfg.tripwire_nll_rise, cfg.tripwire_facts_drop, after_policy)
    )
