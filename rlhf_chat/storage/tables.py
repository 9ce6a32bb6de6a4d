"""Tables: the database schema (SQLAlchemy 2.0 ORM).

A *comparison* is created when two candidates are shown, with ``choice`` NULL;
the vote fills ``choice`` once (see ``store.record_vote``). So an unanswered
pair, a double click and a vote on a stale pair are all questions about one row.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 4  # bump with a migration in store.MIGRATIONS when a table changes
CHOICES = ("a", "b", "tie", "both_bad")  # what a vote can say
STRENGTHS = ("slightly", "clearly")  # how much better, optional (Anthropic's comparison interface)


def utcnow() -> datetime:
    """Timezone-aware now, so timestamps compare across SQLite and PostgreSQL."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of every table."""


class SchemaInfo(Base):
    """One row: the schema version this database is at (see store.migrate)."""

    __tablename__ = "schema_info"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Conversation(Base):
    """One conversation of one browser session."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    messages: Mapped[list[Message]] = relationship(back_populates="conversation", order_by="Message.position")
    comparisons: Mapped[list[Comparison]] = relationship(back_populates="conversation")

    def __repr__(self) -> str:
        return f"Conversation(id={self.id}, session_id={self.session_id!r})"


class Message(Base):
    """A turn of a conversation: what the person typed, or the answer they chose."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")

    def __repr__(self) -> str:
        return f"Message(id={self.id}, role={self.role!r}, content={self.content[:30]!r})"


class Comparison(Base):
    """Two candidates shown together, and the vote on them once it is cast."""

    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id"), index=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    context: Mapped[list] = mapped_column(JSON)  # role/content messages the candidates answer
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    choice: Mapped[str | None] = mapped_column(String(16), index=True)  # a | b | tie | both_bad
    strength: Mapped[str | None] = mapped_column(String(16))  # slightly | clearly
    arena: Mapped[bool] = mapped_column(Boolean, default=False)  # policy vs reference, blind
    policy_version_a: Mapped[int] = mapped_column(Integer, default=0)
    policy_version_b: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[str] = mapped_column(String(16), default="ui")  # ui | simulate
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    voted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # schema 4 (learning/guards.py)
    client: Mapped[str | None] = mapped_column(String(16), index=True)  # salted hash of the address; never the address
    # Whether the reward model of the round before preferred the chosen answer, scored
    # before any round trained on this vote; NULL until scored (or a tie, or no model yet).
    rm_agrees: Mapped[bool | None] = mapped_column(Boolean)

    conversation: Mapped[Conversation | None] = relationship(back_populates="comparisons")
    candidates: Mapped[list[CandidateRow]] = relationship(back_populates="comparison", order_by="CandidateRow.side")

    def __repr__(self) -> str:
        return f"Comparison(id={self.id}, choice={self.choice!r}, arena={self.arena})"


class CandidateRow(Base):
    """How one candidate was made: who wrote it, with which settings, how fast."""

    __tablename__ = "candidates"

    id: Mapped[int] = mapped_column(primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    side: Mapped[str] = mapped_column(String(1))  # a | b
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))  # policy | reference
    policy_version: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    temperature: Mapped[float] = mapped_column(Float)
    top_p: Mapped[float] = mapped_column(Float)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    token_count: Mapped[int] = mapped_column(Integer)
    finished: Mapped[bool] = mapped_column(Boolean)
    latency_s: Mapped[float] = mapped_column(Float)
    # schema 3
    mode: Mapped[str | None] = mapped_column(String(32))  # response mode (modes.py); "" or NULL: plain. Never shown.

    comparison: Mapped[Comparison] = relationship(back_populates="candidates")

    def __repr__(self) -> str:
        return f"CandidateRow(comparison={self.comparison_id}, side={self.side!r}, source={self.source!r})"


class ResponseMode(Base):
    """An admin's change to the response modes: a mode added, or a built-in one removed."""

    __tablename__ = "response_modes"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    openings: Mapped[list] = mapped_column(JSON, default=list)  # prefilled openings, one picked per answer
    behaviour: Mapped[str] = mapped_column(String(32), default="")  # a behaviours.DETECTORS name, or ""
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)  # False: removed (a built-in one too)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Checkpoint(Base):
    """A saved adapter + head; the weights live in ``path`` on disk."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # reward | policy
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    extra: Mapped[dict] = mapped_column(JSON, default=dict)  # e.g. reward statistics, KL coefficient
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def __repr__(self) -> str:
        return f"Checkpoint(kind={self.kind!r}, version={self.version}, path={self.path!r})"


class RewardRound(Base):
    """Metrics of one reward-model training round."""

    __tablename__ = "reward_rounds"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(Float)
    heldout_accuracy: Mapped[float | None] = mapped_column(Float)
    mean_margin: Mapped[float] = mapped_column(Float)
    train_pairs: Mapped[int] = mapped_column(Integer)
    heldout_pairs: Mapped[int] = mapped_column(Integer)
    votes: Mapped[int] = mapped_column(Integer)  # usable votes when the round began
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PPOStep(Base):
    """Metrics of one PPO step."""

    __tablename__ = "ppo_steps"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer)  # policy version this step produced
    mean_reward: Mapped[float] = mapped_column(Float)  # raw reward-model score
    mean_kl: Mapped[float] = mapped_column(Float)
    kl_coef: Mapped[float] = mapped_column(Float)
    policy_loss: Mapped[float] = mapped_column(Float)
    value_loss: Mapped[float] = mapped_column(Float)
    clip_fraction: Mapped[float] = mapped_column(Float)
    approx_kl: Mapped[float] = mapped_column(Float)
    entropy: Mapped[float] = mapped_column(Float)
    mean_length: Mapped[float] = mapped_column(Float)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)  # non-finite loss: adapter kept
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # schema 2
    reward_version: Mapped[int | None] = mapped_column(Integer, index=True)  # the reward model it optimised
    copy_gap: Mapped[float | None] = mapped_column(Float)  # mean |log p_train - log p_serving| per token
    ptx_loss: Mapped[float | None] = mapped_column(Float)  # PPO-ptx's LM loss on chosen answers, when on


class TrainingEvent(Base):
    """Errors and state changes of the background loop, shown in the UI."""

    __tablename__ = "training_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # error | info
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Demonstration(Base):
    """An answer a person wrote for a pair on screen, editing one of the two or from
    scratch: what good looks like, beyond which of two is better (FeeL's edited
    replies). It continues the conversation as a chosen answer does, and teaches
    both learners (``preferences.demonstration_pairs``, ``supervised.demonstrated_answers``).
    """

    __tablename__ = "demonstrations"

    id: Mapped[int] = mapped_column(primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), unique=True, index=True)  # one per pair
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    context: Mapped[list] = mapped_column(JSON)  # the conversation it answers (the pair's context)
    text: Mapped[str] = mapped_column(Text)
    started_from: Mapped[str] = mapped_column(String(1), default="")  # a | b: the candidate edited; "": from scratch
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    client: Mapped[str | None] = mapped_column(String(16), index=True)  # schema 4, as Comparison.client

    comparison: Mapped[Comparison] = relationship()


class Exclusion(Base):
    """A session or client an admin left out of training (learning/guards.py). Its
    feedback stays in the database and the export, marked; deleting this row undoes it."""

    __tablename__ = "exclusions"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # session | client
    key: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainerLease(Base):
    """One row: which process trains (at most one per database), and its last heartbeat.

    Times are the holder's clock in seconds since the epoch (``time.time()``):
    the hosts of one deployment are assumed to keep their clocks in sync (NTP).
    """

    __tablename__ = "trainer_lease"

    id: Mapped[int] = mapped_column(primary_key=True)  # always 1
    holder: Mapped[str] = mapped_column(String(200))  # host:pid:random, unique per process
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    taken_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
