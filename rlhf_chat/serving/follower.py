"""Following the trainer: a serve replica loads each policy the trainer publishes.

On a replica (``--role serve``) nothing trains. The trainer publishes a
policy checkpoint as a folder first, then the database row that names it,
with the checksum of its files. Every ``deploy.follow_every_s`` this thread
reads the newest row; when it names a newer version, it reads the files,
checks them against the checksum, and swaps the adapter in as one job of
the model worker. The worker runs one job at a time, so a batch of pairs in
flight finishes on the version it started with, and the next one starts on
the new version: nobody's request is dropped, nobody sees a half-loaded
adapter.

A checkpoint whose files are missing, partial or corrupt (a shared volume
still copying, a bucket that lost a file) is not loaded: the replica keeps
serving what it has, logs why, shows it on the Training tab, and tries again
at the next look (the files may still arrive).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy.exc import OperationalError

from rlhf_chat.config import DeployConfig
from rlhf_chat.generation.worker import CHAT, ModelWorker
from rlhf_chat.learning.checkpoints import load_verified
from rlhf_chat.learning.ppo import install_policy
from rlhf_chat.storage import lease, store

log = logging.getLogger(__name__)


@dataclass
class FollowStatus:
    """What the replica knows of the trainer (read from any thread)."""

    published: int = 0  # newest policy version named in the database
    reward_version: int = 0  # newest reward version named in the database
    problem: str = ""  # why the newest published policy is not served ("" when it is, or none is)
    problem_detail: str = ""  # the same, with the exception (the admin panel and the log)
    trainer_host: str = ""
    trainer_heartbeat_age_s: float | None = None  # None: no trainer has the lease
    checked_at: float = 0.0  # time.time() of the last look


class PolicyFollower:
    """The background thread of a serve replica that keeps its policy current."""

    def __init__(self, worker: ModelWorker, sessions, cfg: DeployConfig):
        self.worker = worker
        self.sessions = sessions
        self.cfg = cfg
        self.status = FollowStatus()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-follower", daemon=True)

    def start(self) -> PolicyFollower:
        """Start following in the background (returns at once)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the look under way."""
        self._stop.set()
        self._thread.join(self.cfg.follow_every_s + 30)

    def _run(self) -> None:
        self.worker.ready.wait()
        while not self._stop.is_set():
            try:
                self.check_once()
            except OperationalError as exc:  # the database is away: serve what we have, look again
                log.warning("cannot read the published versions: %s", exc)
            except Exception:  # never let following take the chat down
                log.exception("following the trainer failed")
            self._stop.wait(self.cfg.follow_every_s)

    def check_once(self) -> bool:
        """Look at the database once; load the newest published policy when it is
        newer than the one served. True when it swapped one in."""
        with self.sessions() as session:
            policy = store.latest_checkpoint(session, "policy")
            reward = store.latest_checkpoint(session, "reward")
            holder = lease.current(session)
        s = self.status
        s.checked_at = time.time()
        s.published = policy.version if policy is not None else 0
        s.reward_version = reward.version if reward is not None else 0
        s.trainer_host = holder.host if holder is not None else ""
        s.trainer_heartbeat_age_s = lease.heartbeat_age(holder)
        served = self.worker.serving_version
        if policy is None or policy.version == served or self.worker.load_error is not None:
            s.problem = s.problem_detail = ""
            return False
        try:
            tensors, meta = load_verified(policy.path, policy.extra.get("sha256"))  # outside the worker: disk time
            self.worker.call(CHAT, lambda models: install_policy(models, tensors, meta, policy.path))
        except (OSError, KeyError, ValueError) as exc:
            kind = "its files are missing" if isinstance(exc, OSError) else "its files are partial, corrupt or do not fit"
            problem = f"policy v{policy.version} was published but {kind}; this replica keeps serving v{served}"
            if problem != s.problem:
                log.warning("%s: %s", problem, exc)
            s.problem, s.problem_detail = problem, f"{problem}: {exc}"
            return False
        log.info("now serving policy v%d (was v%d)", policy.version, served)
        s.problem = s.problem_detail = ""
        return True

    def trainer_online(self) -> bool:
        """Whether a trainer holds the lease with a fresh heartbeat."""
        age = self.status.trainer_heartbeat_age_s
        return age is not None and age <= self.cfg.lease_ttl_s

    def state_markdown(self, details: bool = False) -> str:
        """The Training tab's line on a replica: where training runs, whether the
        trainer is there, and any published policy this replica could not load."""
        s = self.status
        if self.trainer_online():
            text = (f"**Training:** on the trainer ({s.trainer_host}, heartbeat {s.trainer_heartbeat_age_s:.0f} s ago); "
                    f"this replica serves what it publishes (newest: policy v{s.published}, reward v{s.reward_version}).")
        else:
            last = (f"last heartbeat {s.trainer_heartbeat_age_s:.0f} s ago from {s.trainer_host}"
                    if s.trainer_heartbeat_age_s is not None else "no trainer holds the lease")
            text = (f"**Training:** the trainer is offline ({last}). Votes are still stored, "
                    "and it trains on them when it is back.")
        if s.problem:
            text += f"\n\n**Policy update held back:** {s.problem_detail if details else s.problem}."
        return text
