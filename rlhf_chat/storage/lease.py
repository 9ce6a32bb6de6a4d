"""The trainer lease: at most one training process per database.

Two trainers on one database would each publish policy versions from their
own weights, and the serving replicas would flip between them. So a
``--role train`` process takes the one row of ``trainer_lease`` before it
loads anything, renews it every ``deploy.heartbeat_s``, and gives it back when
it stops. A second trainer is refused with the holder's host and heartbeat
age. A holder killed with -9 cannot give it back; once its heartbeat is older
than ``deploy.lease_ttl_s`` the next trainer takes it over.

Taking and renewing are single conditional ``UPDATE`` statements, so two
processes racing for an expired lease cannot both win: the database
serialises the updates and re-checks the condition for the second one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rlhf_chat.storage.tables import TrainerLease

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another trainer holds the lease (its host, pid and heartbeat age are in the message)."""


@dataclass(frozen=True)
class Holder:
    """Who this process is, to the lease."""

    host: str
    pid: int
    token: str  # unique per process: a restarted process with a reused pid is someone else

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])


def current(session: Session) -> TrainerLease | None:
    """The lease row (None when no trainer ever ran, or the last one stopped cleanly)."""
    return session.scalar(select(TrainerLease).where(TrainerLease.id == 1))


def heartbeat_age(lease: TrainerLease | None, now: float | None = None) -> float | None:
    """Seconds since the holder's last heartbeat (None without a lease)."""
    if lease is None:
        return None
    return max(0.0, (time.time() if now is None else now) - lease.heartbeat_at)


def take(sessions: sessionmaker[Session], me: Holder, ttl_s: float, now: float | None = None) -> None:
    """Take the lease, or raise :class:`LeaseHeld` naming the trainer that holds it.

    Free when there is no row, when ``me`` holds it already, or when its
    heartbeat is older than ``ttl_s`` (a trainer that died without letting go).
    """
    now = time.time() if now is None else now
    values = {"holder": me.name, "host": me.host, "pid": me.pid, "taken_at": now, "heartbeat_at": now}
    for _ in range(2):  # a second pass when another process inserted the row first
        with sessions() as session, session.begin():
            expired = or_(TrainerLease.holder == me.name, TrainerLease.heartbeat_at < now - ttl_s)
            taken = session.execute(update(TrainerLease).where(TrainerLease.id == 1, expired).values(**values))
            if taken.rowcount == 1:
                return
            lease = current(session)
            if lease is not None:
                age = heartbeat_age(lease, now)
                raise LeaseHeld(
                    f"another trainer holds this database's lease: {lease.host} (pid {lease.pid}), "
                    f"last heartbeat {age:.0f} s ago. Stop it first, or, if it is dead, wait "
                    f"{max(0.0, ttl_s - age):.0f} s more for its lease to expire (deploy.lease_ttl_s {ttl_s:g})."
                )
        try:
            with sessions() as session, session.begin():
                session.add(TrainerLease(id=1, **values))
            return
        except IntegrityError:
            continue
    raise LeaseHeld("another trainer took the lease at the same moment; try again")


def renew(sessions: sessionmaker[Session], me: Holder, now: float | None = None) -> bool:
    """Refresh the heartbeat; False when the lease is no longer ours (it expired and
    another trainer took it over): this process must stop training."""
    now = time.time() if now is None else now
    with sessions() as session, session.begin():
        result = session.execute(
            update(TrainerLease).where(TrainerLease.id == 1, TrainerLease.holder == me.name).values(heartbeat_at=now)
        )
        return result.rowcount == 1


def release(sessions: sessionmaker[Session], me: Holder) -> None:
    """Give the lease back (a clean stop), so a new trainer can start at once."""
    with sessions() as session, session.begin():
        session.execute(delete(TrainerLease).where(TrainerLease.id == 1, TrainerLease.holder == me.name))


class LeaseKeeper:
    """Renews this process's lease in the background; calls ``on_lost`` once if it is lost.

    A database that cannot be reached is retried at every beat; the lease is
    only lost when another trainer has taken it (which needs our heartbeat to
    be ``lease_ttl_s`` old).
    """

    def __init__(self, sessions: sessionmaker[Session], me: Holder, every_s: float, on_lost: Callable[[str], None]):
        self.sessions = sessions
        self.me = me
        self.every_s = every_s
        self.on_lost = on_lost
        self.lost = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-lease", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self, release_lease: bool = True) -> None:
        """Stop renewing and, unless told otherwise, give the lease back."""
        self._stop.set()
        self._thread.join(self.every_s + 5)
        if release_lease and not self.lost:
            try:
                release(self.sessions, self.me)
            except OperationalError:
                log.warning("could not release the trainer lease; it expires by itself")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                still_ours = renew(self.sessions, self.me)
            except OperationalError as exc:
                log.warning("cannot renew the trainer lease (%s); retrying", exc)
                continue
            if not still_ours:
                with self.sessions() as session:
                    lease = current(session)
                by = f"{lease.host} (pid {lease.pid})" if lease is not None else "nobody (it was released)"
                self.lost = f"this process lost the trainer lease; it is now held by {by}"
                log.error("%s: training stops", self.lost)
                self.on_lost(self.lost)
                return
