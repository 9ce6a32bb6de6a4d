"""Services: what a role's process holds, and what every handler is given.

``runtime.start_services`` builds one :class:`Services` per process (the
database, the model worker, and, by role, the training loop, the follower and
the trainer's lease); the chat and admin handlers take it as their first
argument, and ``ui.build_demo`` binds it to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from rlhf_chat.config import AppConfig
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.serving.admission import AdminGuard, Admission, client_address
from rlhf_chat.serving.batcher import PairBatcher


@dataclass
class Services:
    """What the handlers need: settings, the model worker, the database, the training loop."""

    config: AppConfig
    worker: ModelWorker
    sessions: sessionmaker[Session]
    loop: object | None = None  # training_loop.TrainingLoop, when training runs
    batcher: PairBatcher | None = None  # people's pairs written together; made from the config when None
    admission: Admission | None = None  # generation and vote limits, per session and per address
    admin_guard: AdminGuard | None = None  # wrong admin passwords, per address
    follower: object | None = None  # follower.PolicyFollower, on a serve replica
    lease_keeper: object | None = None  # lease.LeaseKeeper, on the trainer

    def __post_init__(self) -> None:
        ui = self.config.ui
        if self.batcher is None:
            self.batcher = PairBatcher(self.worker, self.config.sampling, ui.batch_people, ui.batch_wait_s, ui.max_waiting)
        self.admission = self.admission or Admission(ui)
        self.admin_guard = self.admin_guard or AdminGuard(ui)

    def address(self, request) -> str:
        """Who sent this event (``admission.client_address``)."""
        return client_address(request, self.config.ui.trust_proxy)

    def stop(self) -> None:
        """Stop training, then the worker (each after the slice under way); a trainer
        gives its lease back last, once nothing of it trains any more."""
        if self.follower is not None:
            self.follower.stop()
        if self.loop is not None:
            self.loop.stop()
        self.worker.stop()
        if self.lease_keeper is not None:
            self.lease_keeper.stop()
