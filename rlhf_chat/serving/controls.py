"""Controls: what an admin may do to the live loop, as plain functions over the services.

Pause and resume; change β (the KL coefficient) and the learning rate; reset
the policy to the base model; roll back to a saved checkpoint; export the votes;
add and remove response modes.
Each returns a message for the UI and raises :class:`ControlError` with a clear
message for a bad request. The UI shows these only after :func:`check_admin`,
and checks the password again on every call.

Reset and rollback change the policy's weights, so they pause training first
and wait for the step under way to end (a step half-run on the old weights
would otherwise publish a mix), run as one model-worker job, give the result
a new, never-used version number (so candidates written afterwards are told
apart from earlier ones), save it as a checkpoint (so a restart serves it,
not the newest checkpoint from before), drop the optimizer's Adam state (it
describes weights that are gone), and resume if training was running. What
they do to the weights themselves is in ``learning/interventions.py``.
"""

from __future__ import annotations

import hmac
import math
import re
import threading
import time
from functools import partial
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from rlhf_chat.config import AppConfig
from rlhf_chat.generation.modes import active_modes
from rlhf_chat.generation.worker import CHAT
from rlhf_chat.learning import interventions
from rlhf_chat.learning.checkpoints import load_checkpoint, publish_checkpoint
from rlhf_chat.learning.export import demonstration_rows, preference_rows, write_rows
from rlhf_chat.model.loading import Models
from rlhf_chat.storage import store
from rlhf_chat.text.behaviours import DETECTORS

PAUSE_TIMEOUT_S = 600.0  # a PPO step on a 2-core CPU takes tens of seconds; an error back-off up to 300 s
_REPLACING = threading.Lock()  # two admins resetting at once would resume training under each other


class ControlError(ValueError):
    """A control request that cannot be carried out; the message says why."""


# --- who may ------------------------------------------------------------------------------


def check_admin(password: str | None, cfg: AppConfig) -> bool:
    """Whether ``password`` is the admin password; always False when none is configured.

    ``hmac.compare_digest`` takes the same time wherever the strings differ, so
    the response time does not leak how much of a guess was right.
    """
    expected = cfg.ui.admin_password
    if not expected or not password:
        return False
    return hmac.compare_digest(password.encode("utf-8"), expected.encode("utf-8"))


# --- training on and off ------------------------------------------------------------------


def _loop(services):
    _refuse_on_a_replica(services)
    if services.loop is None:
        raise ControlError("Training is not running in this process.")
    return services.loop


def _refuse_on_a_replica(services) -> None:
    """Training controls act on the training copy, which a serve replica does not
    have: a policy changed here would be overwritten by the trainer's next one."""
    config = getattr(services, "config", None)  # a stand-in without settings is no replica
    if config is not None and config.deploy.role == "serve":
        raise ControlError(
            "This replica only serves (role serve): pause, resume, reset, roll back and the training "
            "settings act on the trainer's process (role train, or all)."
        )


def pause(services) -> str:
    """Stop training after the step under way (chat goes on)."""
    _loop(services).pause()
    return "Training paused; it stops after the step under way."


def resume(services) -> str:
    """Carry on training."""
    _loop(services).resume()
    return "Training resumed."


def wait_until_paused(loop, timeout_s: float = PAUSE_TIMEOUT_S) -> None:
    """Pause the loop and return only once its thread is between steps.

    ``TrainingLoop.pause`` returns at once while a step may still be running,
    and a step only ever sets the state to "paused" at the top of the loop,
    after the step. So the state is first marked "pausing" here, and seeing
    "paused" again proves the thread has passed that point and will start no
    new step until resumed.
    """
    loop.pause()
    loop.status.state = "pausing"
    deadline = time.monotonic() + timeout_s
    while loop.status.state != "paused":
        if time.monotonic() > deadline:
            raise ControlError("Training did not stop in time (a long step or an error back-off); try again.")
        time.sleep(0.1)


class _Paused:
    """Context manager: training paused and idle inside, resumed after if it was running."""

    def __init__(self, loop):
        self.loop = loop
        self.was_running = loop is not None and not loop.paused

    def __enter__(self) -> _Paused:
        if self.loop is not None:
            try:
                wait_until_paused(self.loop)
            except BaseException:  # nothing was changed: leave training as it was
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc) -> None:
        if self.loop is not None and self.was_running:
            self.loop.resume()


# --- β and the learning rate ---------------------------------------------------------------


def _number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ControlError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ControlError(f"{name} must be finite, got {value!r}.")
    return number


def set_kl_coef(services, value) -> str:
    """Set β, the weight of the KL penalty to the reference, from the next PPO step on.

    With the adaptive controller on, β goes on adapting from this value.
    """
    beta = _number(value, "β")
    if beta < 0:
        raise ControlError(f"β must be >= 0 (0 turns the KL penalty off), got {beta}.")
    _loop(services).ppo.kl_ctl.value = beta
    return f"β set to {beta:g}."


def set_learning_rate(services, value) -> str:
    """Set PPO's learning rate (the value head keeps its multiple), from the next update on."""
    lr = _number(value, "The learning rate")
    if not 0 < lr < 1:
        raise ControlError(f"The learning rate must be between 0 and 1 (e.g. 1e-4), got {lr}.")
    trainer = _loop(services).ppo
    trainer.cfg.learning_rate = lr  # a fresh optimizer (after a reset) starts from it

    def apply(_models: Models) -> None:
        # In a worker job, so that no optimizer step runs half at the old rate.
        if trainer.optimizer is not None:  # groups as ppo.make_optimizer makes them: LoRA, value head
            lora, head = trainer.optimizer.param_groups
            lora["lr"], head["lr"] = lr, lr * trainer.cfg.value_head_lr_mult

    services.worker.call(CHAT, apply)
    return f"Learning rate set to {lr:g} (value head {lr * trainer.cfg.value_head_lr_mult:g})."


# --- reset and rollback (the model side is learning/interventions.py) -----------------------


def _replace_policy(services, change, extra: dict) -> int:
    """Pause, change the training copy's policy, publish it under a new version, save it; returns the version."""
    _refuse_on_a_replica(services)
    if services.worker.load_error is not None:
        raise ControlError(f"The model failed to load ({services.worker.load_error}); there is no policy to change.")
    loop = services.loop
    with _REPLACING, _Paused(loop):
        with services.sessions() as session:
            version = interventions.next_version(session, services.worker.serving_version)
        tensors = services.worker.call(CHAT, partial(interventions.replace_policy, change=change, version=version))
        if loop is not None:
            loop.ppo.optimizer = None  # Adam's moments describe weights that are gone
        kl_coef = loop.ppo.kl_ctl.value if loop is not None else services.config.ppo.kl_coef
        meta = {"version": version, "kl_coef": kl_coef, **extra}
        event = _describe(version, extra)
        try:
            publish_checkpoint(services.sessions, services.config.store.checkpoint_dir, "policy", version, tensors,
                               meta, also=lambda session: store.add_event(session, "info", event))
        except OSError as exc:  # the change is live; only its survival across a restart failed
            raise ControlError(
                f"The policy now serves as v{version}, but saving it failed ({exc}): "
                "a restart would serve the previous checkpoint."
            ) from exc
    return version


def _describe(version: int, extra: dict) -> str:
    if "rolled_back_to" in extra:
        return f"an admin rolled the policy back to v{extra['rolled_back_to']}; it now serves as v{version}"
    return f"an admin reset the policy to the base model; it now serves as v{version}"


def reset_policy(services) -> str:
    """Reset the policy to the base model (the reference), as a new version."""
    version = _replace_policy(services, interventions.zero_policy, {"reset": True})
    return f"Policy reset to the base model; now serving v{version}."


def rollback(services, version) -> str:
    """Serve the policy saved as checkpoint ``version`` again, as a new version."""
    _refuse_on_a_replica(services)
    try:
        wanted = int(version)
    except (TypeError, ValueError):
        raise ControlError(f"Pick a checkpoint version, got {version!r}.") from None
    with services.sessions() as session:
        saved = {c.version: c.path for c in store.checkpoints(session, "policy")}
    if wanted not in saved:
        known = ", ".join(f"v{v}" for v in sorted(saved)) or "none yet"
        raise ControlError(f"There is no policy checkpoint v{wanted} (saved: {known}).")
    try:
        tensors, _ = load_checkpoint(saved[wanted])  # read before pausing: a missing file changes nothing
    except (OSError, ValueError) as exc:  # missing, truncated or corrupt
        raise ControlError(f"Checkpoint v{wanted} cannot be read from {saved[wanted]}: {exc}") from None

    try:
        new = _replace_policy(services, partial(interventions.copy_policy, tensors=tensors), {"rolled_back_to": wanted})
    except KeyError as exc:  # nothing was changed
        raise ControlError(f"Checkpoint v{wanted} does not fit this model: {exc}") from None
    return f"Rolled back to v{wanted}; now serving it as v{new}."


def policy_versions(sessions: sessionmaker[Session]) -> list[int]:
    """Versions of the saved policy checkpoints, newest first: the rollback choices."""
    with sessions() as session:
        return sorted({c.version for c in store.checkpoints(session, "policy")}, reverse=True)


# --- export -------------------------------------------------------------------------------


def export_feedback(sessions: sessionmaker[Session], folder: str | Path, fmt: str = "jsonl") -> tuple[list[Path], str]:
    """Write the preferences and the written answers (as ``python -m rlhf_chat export``
    does) into ``folder``; returns the two files and a message counting what is in them."""
    with sessions() as session:
        rows, skipped = preference_rows(session)
        written = demonstration_rows(session)
    folder = Path(folder)
    paths = [write_rows(rows, folder / f"preferences.{fmt}", fmt), write_rows(written, folder / f"demonstrations.{fmt}", fmt)]
    from_written = sum(r["source"] == "demonstration" for r in rows)
    message = (
        f"{len(rows)} preferences ({from_written} from written answers); left out {skipped.get('tie', 0)} ties "
        f"and {skipped.get('both_bad', 0)} both-bad votes. {len(written)} written answers."
    )
    return paths, message


# --- response modes ---------------------------------------------------------------------

MODE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_OPENING_CHARS = 200  # an opening starts an answer; a paragraph would be the answer itself


def mode_names(sessions: sessionmaker[Session]) -> list[str]:
    """The names of the modes in use, for the admin's list."""
    with sessions() as session:
        return [m.name for m in active_modes(session)]


def add_mode(services, name, description, openings, behaviour) -> str:
    """Add a response mode (or replace one of that name): one opening per line.

    The next mode pair may use it. Its behaviour, if named, is what the
    Training tab and ``bench/modes.py`` check to see that it is followed.
    """
    name = (name or "").strip().lower()
    if not MODE_NAME.match(name):
        raise ControlError("A mode name is a lower-case word of at most 32 letters, digits or underscores.")
    lines = [line.strip() for line in (openings or "").splitlines() if line.strip()]
    if not lines:
        raise ControlError("Give at least one opening, one per line: the words an answer in this mode starts with.")
    if any(len(line) > MAX_OPENING_CHARS for line in lines):
        raise ControlError(f"An opening is at most {MAX_OPENING_CHARS} characters.")
    behaviour = (behaviour or "").strip()
    if behaviour and behaviour not in DETECTORS:
        raise ControlError(f"Unknown behaviour {behaviour!r}; one of: {', '.join(DETECTORS)}, or none.")
    store.write(services.sessions,
                lambda session: store.save_mode(session, name, (description or "").strip()[:500], lines, behaviour))
    return f"Mode {name!r} saved with {len(lines)} opening(s); mode pairs may use it from the next message."


def remove_mode(services, name) -> str:
    """Take a mode out of the mode pairs (stored; a built-in one can be added back)."""
    name = (name or "").strip()
    if name not in mode_names(services.sessions):
        raise ControlError(f"No mode {name!r} is in use.")
    store.write(services.sessions, lambda session: store.remove_mode(session, name))
    left = mode_names(services.sessions)
    note = "" if len(left) >= 2 else " Fewer than two modes are left: every pair is plain until one is added."
    return f"Mode {name!r} removed; in use: {', '.join(left) or 'none'}.{note}"


# --- contributors (learning/guards.py) -------------------------------------------------------


def contributors_table(services) -> list[list]:
    """Every session and client address with feedback, most votes first: what the guards
    made of it (agreement with the others' consensus, which flags; with the reward model,
    shown only, since that model learned from it; with the arena majority; weight, flag, why)."""
    from rlhf_chat.learning.guards import assess_feedback

    with services.sessions() as session:
        trust = assess_feedback(session, services.config.guards, services.config.loop.demonstration_weight,
                                services.config.reward.tie_weight)
    rows = []
    for c in sorted(trust.contributors.values(), key=lambda c: (-c.votes - c.written - c.ties, c.kind, c.key)):
        status = "excluded" if c.excluded else ("flagged" if c.flagged else "")
        rows.append([
            f"{c.kind}:{c.key}", c.votes, c.ties, c.written,
            "" if c.consensus_agreement is None else f"{c.consensus_agreement:.2f} of {c.consensus_scored}",
            "" if c.rm_agreement is None else f"{c.rm_agreement:.2f} of {c.rm_scored}",
            "" if c.majority_agreement is None else f"{c.majority_agreement:.2f} of {c.overlaps}",
            round(c.weight, 2), status, "; ".join(c.reasons),
        ])
    return rows


CONTRIBUTOR_COLUMNS = ["who", "votes", "ties", "written", "agrees with the others", "agrees with the reward model",
                       "agrees with the majority", "weight", "status", "why"]


def _who(who) -> tuple[str, str]:
    kind, _, key = str(who or "").strip().partition(":")
    if kind not in ("session", "client") or not key.strip():
        raise ControlError(f"Name a contributor as session:KEY or client:KEY (from the table), got {who!r}.")
    return kind, key.strip()


def exclude_contributor(services, who, reason="") -> str:
    """Leave a session or client out of training; its feedback stays, marked (export: ``excluded``)."""
    _refuse_on_a_replica(services)
    kind, key = _who(who)

    def exclude(session: Session) -> bool:
        added = store.add_exclusion(session, kind, key, str(reason or ""))
        if added:  # in the same transaction: an exclusion is never without its event
            store.add_event(session, "info", f"an admin excluded {kind} {key} from training: {reason or 'no reason given'}")
        return added

    if not store.write(services.sessions, exclude):
        return f"{kind} {key} was already excluded."
    return f"{kind} {key} is excluded from training from the next round on; retrain the reward model to drop it now."


def include_contributor(services, who) -> str:
    """Let an excluded session or client train again."""
    _refuse_on_a_replica(services)
    kind, key = _who(who)
    removed = store.write(services.sessions, lambda session: store.remove_exclusion(session, kind, key))
    return f"{kind} {key} trains again." if removed else f"{kind} {key} was not excluded."


def retrain_reward(services) -> str:
    """Train the reward model again from a fresh adapter on the feedback the guards keep
    (without excluded or flagged contributors), with training paused meanwhile."""
    from dataclasses import replace

    from rlhf_chat.learning.reward import full_fit_steps, reset_reward_model, reward_round_from_config, usable_feedback

    _refuse_on_a_replica(services)
    if services.worker.load_error is not None:
        raise ControlError(f"The model failed to load ({services.worker.load_error}).")
    cfg = services.config
    with services.sessions() as session:
        # the round's pairs: each vote (and tie, when ties train) one, each written answer two
        feedback = usable_feedback(session, cfg.reward.tie_weight) + store.count_demonstrations(session)
    # a fresh adapter, fitted in full: nothing of what it learned from the left-out votes remains
    fresh = replace(cfg.reward, steps_per_round=max(cfg.reward.steps_per_round, full_fit_steps(feedback, cfg.reward)))
    with _Paused(services.loop):
        services.worker.call(CHAT, lambda m: reset_reward_model(m, cfg.model.seed))
        result = None
        try:
            result = reward_round_from_config(
                services.worker, services.sessions, replace(cfg, reward=fresh), score_unseen=False
            )
        finally:
            if result is None:  # failed, or too few votes: serve the last reward model again
                from rlhf_chat.learning.checkpoints import restore_latest
                from rlhf_chat.learning.reward import load_reward

                services.worker.call(CHAT, lambda m: restore_latest(m, services.sessions, "reward", load_reward))
    if result is None:
        return "Too few votes to train a reward model; the last one is served again."
    acc = result.accuracy_text()
    event = f"an admin retrained the reward model: v{result.version}, held-out accuracy {acc}"
    store.write(services.sessions, lambda session: store.add_event(session, "info", event))
    return f"Reward model v{result.version} trained on {result.train_pairs} pairs; held-out accuracy {acc}."
