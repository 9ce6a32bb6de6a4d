"""Store: data access over the tables, for the UI, the trainers and the tools.

Functions take a SQLAlchemy ``Session`` and leave its lifecycle to the caller,
except :func:`record_vote`-style writes the caller wraps in ``session.begin()``.
The engine is SQLite by default (WAL, busy timeout); any SQLAlchemy URL works.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, inspect, make_url, or_, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from rlhf_chat.storage.records import Candidate
from rlhf_chat.storage.tables import (
    CHOICES,
    SCHEMA_VERSION,
    STRENGTHS,
    Base,
    CandidateRow,
    Checkpoint,
    Comparison,
    Conversation,
    Demonstration,
    Exclusion,
    Message,
    PPOStep,
    ResponseMode,
    RewardRound,
    SchemaInfo,
    TrainingEvent,
    utcnow,
)

T = TypeVar("T")


def make_engine(url: str, busy_timeout_ms: int = 10_000) -> Engine:
    """An engine for ``url``; SQLite gets WAL (readers never block the writer) and a busy timeout.

    PostgreSQL URLs without a driver (``postgresql://``, and ``postgres://`` as
    hosting providers write it) get psycopg 3, the driver in requirements.txt;
    SQLAlchemy would otherwise look for psycopg2, which is not installed. The
    pool pings a connection before handing it out, so a server restart or an
    idle connection closed by a proxy costs one reconnect, not an error, and
    connecting gives up after the busy timeout instead of hanging on an
    unreachable host (``with_retry`` then tries again).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            if ":memory:" not in url:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    connect_args = {}
    if backend in ("postgres", "postgresql"):
        driver = driver or "psycopg"
        parsed = parsed.set(drivername=f"postgresql+{driver}")
        if driver in ("psycopg", "psycopg2") and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = max(1, round(busy_timeout_ms / 1000))  # libpq: whole seconds
    return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)


# Columns each schema version added to tables that already existed: (table, column, SQL type).
# create_all makes new tables whole, but never alters an existing one.
MIGRATIONS: dict[int, list[tuple[str, str, str]]] = {
    2: [
        ("ppo_steps", "reward_version", "INTEGER"),
        ("ppo_steps", "copy_gap", "FLOAT"),
        ("ppo_steps", "ptx_loss", "FLOAT"),
    ],
    3: [("candidates", "mode", "VARCHAR(32)")],  # the response_modes table is new: create_all makes it
    4: [  # the guards (learning/guards.py); the exclusions table is new
        ("comparisons", "client", "VARCHAR(16)"),
        ("comparisons", "rm_agrees", "BOOLEAN"),
        ("demonstrations", "client", "VARCHAR(16)"),
    ],
    # Tables added without touching an existing one need no new version: create_all
    # makes them on start (trainer_lease, demonstrations).
}


def add_missing_columns(engine: Engine, from_version: int) -> None:
    """Run the ``ALTER TABLE ... ADD COLUMN`` of every schema after ``from_version``
    (skipping a column that is already there, so an interrupted upgrade can rerun,
    and a table that is not there yet)."""
    for version in sorted(v for v in MIGRATIONS if v > from_version):
        for table, column, sql_type in MIGRATIONS[version]:
            if not inspect(engine).has_table(table):
                continue  # a table the old database never had: create_all makes it whole
            present = {c["name"] for c in inspect(engine).get_columns(table)}
            if column not in present:
                with engine.begin() as connection:
                    connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))


def migrate(engine: Engine) -> None:
    """Create missing tables, upgrade an older schema, and record the schema version.

    An old database upgrades on start: the columns later versions added
    (:data:`MIGRATIONS`) are added, keyed on the stored version.
    """
    with Session(engine) as session:
        had_schema = inspect(engine).has_table(SchemaInfo.__tablename__)
        stored = session.get(SchemaInfo, 1) if had_schema else None
        stored_version = stored.version if stored is not None else None
    if stored_version is not None and stored_version > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema {stored_version} is newer than this code ({SCHEMA_VERSION}); upgrade rlhf-chat"
        )
    if stored_version is not None and stored_version < SCHEMA_VERSION:
        add_missing_columns(engine, stored_version)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        info = session.get(SchemaInfo, 1)
        if info is None:
            session.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
        elif info.version < SCHEMA_VERSION:
            info.version = SCHEMA_VERSION
            info.updated_at = utcnow()


def open_store(url: str, busy_timeout_ms: int = 10_000) -> sessionmaker[Session]:
    """Engine, schema and one session factory: what the app makes once at start-up."""
    engine = make_engine(url, busy_timeout_ms)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def with_retry(fn: Callable[[], T], attempts: int = 5, first_wait_s: float = 0.2) -> T:
    """Run a database operation, retrying while the database is locked or unreachable."""
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(first_wait_s * 2**attempt)
    raise AssertionError("unreachable")


def write(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """Run ``work(session)`` in one transaction and return what it returns, retried
    as a whole (:func:`with_retry`) while the database is busy.

    The whole transaction is the unit that is retried: a write that failed part
    way was rolled back, so running ``work`` again never stores anything twice.
    Past the retries the ``OperationalError`` reaches the caller, which tells the
    person that nothing was stored.
    """

    def attempt() -> T:
        with sessions() as session, session.begin():
            return work(session)

    return with_retry(attempt)


def storable_text(text: str) -> str:
    """Text as every supported database stores it: without NUL characters.

    PostgreSQL refuses NUL in text columns (a DataError, which no retry fixes),
    and a byte-level tokenizer can decode one from a model's answer; SQLite would
    keep it, so removing it everywhere keeps both databases' contents the same.
    What people type has no NUL already (``chat.clean_message``).
    """
    return text.replace("\x00", "") if "\x00" in text else text  # pragma: no mutate (the test only skips a no-op)


# --- conversations -------------------------------------------------------------------


def start_conversation(session: Session, session_id: str) -> Conversation:
    """A new conversation for one browser session."""
    conversation = Conversation(session_id=session_id)
    session.add(conversation)
    session.flush()
    return conversation


def add_message(session: Session, conversation_id: int, role: str, content: str) -> Message:
    """Append a message to a conversation."""
    position = session.scalar(
        select(func.count()).select_from(Message).where(Message.conversation_id == conversation_id)
    )
    message = Message(
        conversation_id=conversation_id, position=position or 0, role=role, content=storable_text(content)
    )
    session.add(message)
    session.flush()
    return message


def set_message_content(session: Session, message_id: int, content: str) -> None:
    """Replace a stored message's text (a chosen answer that the person had continued)."""
    message = session.get(Message, message_id)
    if message is None:
        raise KeyError(f"no message {message_id}")
    message.content = storable_text(content)
    session.flush()


# --- comparisons and votes -----------------------------------------------------------


def save_pair(
    session: Session,
    *,
    session_id: str,
    context: list[dict],
    a: Candidate,
    b: Candidate,
    conversation_id: int | None = None,
    arena: bool = False,
    source: str = "ui",
    client: str = "",
) -> Comparison:
    """Store two candidates as an open comparison (no choice yet); ``client`` is the
    salted hash of the person's address (``guards.client_key``), "" when unknown."""
    comparison = Comparison(
        conversation_id=conversation_id,
        session_id=session_id,
        client=client or None,
        context=context,
        response_a=storable_text(a.text),
        response_b=storable_text(b.text),
        arena=arena,
        policy_version_a=a.policy_version,
        policy_version_b=b.policy_version,
        source=source,
    )
    comparison.candidates = [
        CandidateRow(side=side, **{**c.to_record(), "text": storable_text(c.text)}) for side, c in (("a", a), ("b", b))
    ]
    session.add(comparison)
    session.flush()
    return comparison


@dataclass
class VoteResult:
    """Whether a vote was stored, and the message for the person."""

    ok: bool
    message: str


def record_vote(
    session: Session, comparison_id: int, choice: str, strength: str | None = None, session_id: str | None = None
) -> VoteResult:
    """Store a vote exactly once.

    The ``UPDATE ... WHERE choice IS NULL`` is atomic in every database, so a
    double click (or two tabs) stores one vote and the second is told so. A
    vote on a pair that was replaced by a newer one in its conversation is
    refused: the person was looking at something else.
    """
    if choice not in CHOICES:
        return VoteResult(False, f"Unknown choice {choice!r}.")
    if strength is not None and strength not in STRENGTHS:
        strength = None
    comparison = session.get(Comparison, comparison_id)
    if comparison is None or (session_id is not None and comparison.session_id != session_id):
        return VoteResult(False, "That pair is unknown; please send a message first.")
    if comparison.conversation_id is not None:
        newer = session.scalar(
            select(func.max(Comparison.id)).where(Comparison.conversation_id == comparison.conversation_id)
        )
        if newer != comparison.id:
            return VoteResult(False, "That pair is no longer current; vote on the newest one.")
    result = session.execute(
        update(Comparison)
        .where(Comparison.id == comparison_id, Comparison.choice.is_(None))
        .values(choice=choice, strength=strength, voted_at=utcnow())
        .execution_options(synchronize_session=False)  # pragma: no mutate (None also means no sync)
    )
    if result.rowcount != 1:
        return VoteResult(False, "This pair already has your vote.")
    return VoteResult(True, "Vote recorded.")


def add_demonstration(
    session: Session, comparison_id: int, session_id: str, text: str, started_from: str = ""
) -> VoteResult:
    """Store an answer a person wrote for a pair on screen, at most one per pair.

    The same checks as a vote: the pair must be this session's and the newest of
    its conversation. A text identical to the candidate it started from teaches
    nothing (that is a vote for it) and is refused. The unique index on the pair
    makes a double click store one answer, whatever the timing.
    """
    comparison = session.get(Comparison, comparison_id)
    if comparison is None or comparison.session_id != session_id:
        return VoteResult(False, "That pair is unknown; please send a message first.")
    newer = session.scalar(select(func.max(Comparison.id)).where(Comparison.conversation_id == comparison.conversation_id))
    if comparison.conversation_id is not None and newer != comparison.id:
        return VoteResult(False, "That pair is no longer current; write your answer for the newest one.")
    started_from = started_from if started_from in ("a", "b") else ""
    original = {"a": comparison.response_a, "b": comparison.response_b}.get(started_from)
    if original is not None and text.strip() == original.strip():
        return VoteResult(False, f"That is answer {started_from.upper()} unchanged; edit it, or vote for it instead.")
    if session.scalar(select(Demonstration.id).where(Demonstration.comparison_id == comparison_id)) is not None:
        return VoteResult(False, "You already wrote an answer for this pair.")
    try:
        with session.begin_nested():  # a racing second click hits the unique index: refused, not an error
            session.add(Demonstration(comparison_id=comparison_id, session_id=session_id, context=list(comparison.context),
                                      text=storable_text(text), started_from=started_from, client=comparison.client))
    except IntegrityError:
        return VoteResult(False, "You already wrote an answer for this pair.")
    return VoteResult(True, "Answer recorded.")


def demonstrations(session: Session) -> list[Demonstration]:
    """Every written answer, oldest first, with the pair it was written for (and its candidates)."""
    query = (select(Demonstration).order_by(Demonstration.id)
             .options(selectinload(Demonstration.comparison).selectinload(Comparison.candidates)))
    return list(session.scalars(query))


def count_demonstrations(session: Session) -> int:
    """How many answers people wrote."""
    return session.scalar(select(func.count()).select_from(Demonstration)) or 0


def set_rm_agreement(session: Session, agrees: dict[int, bool]) -> None:
    """Record, per comparison id, whether the reward model preferred the chosen answer
    (``guards``: scored once, before any round trains on the vote). The vote is untouched."""
    for comparison_id, value in agrees.items():
        session.execute(update(Comparison).where(Comparison.id == comparison_id).values(rm_agrees=bool(value)))


def exclusions(session: Session) -> list[Exclusion]:
    """Every session or client an admin left out of training, oldest first."""
    return list(session.scalars(select(Exclusion).order_by(Exclusion.id)))


def add_exclusion(session: Session, kind: str, key: str, reason: str = "") -> bool:
    """Leave a session (``kind`` "session") or client ("client") out of training;
    False when it already is. Its feedback stays, marked."""
    if kind not in ("session", "client") or not key:
        raise ValueError(f"exclude a session or a client by its key, not {kind!r} {key!r}")
    if session.scalar(select(Exclusion.id).where(Exclusion.kind == kind, Exclusion.key == key)) is not None:
        return False
    session.add(Exclusion(kind=kind, key=key, reason=reason))
    return True


def remove_exclusion(session: Session, kind: str, key: str) -> bool:
    """Let an excluded session or client train again; False when it was not excluded."""
    rows = list(session.scalars(select(Exclusion).where(Exclusion.kind == kind, Exclusion.key == key)))
    for row in rows:
        session.delete(row)
    return bool(rows)


def pair_texts(session: Session, comparison_id: int) -> tuple[str, str]:
    """The two answers of a stored pair, as they were shown: (A, B)."""
    row = session.get(Comparison, comparison_id)
    if row is None:
        raise KeyError(f"no comparison {comparison_id}")
    return row.response_a, row.response_b


def voted_comparisons(session: Session, after_id: int = 0) -> list[Comparison]:
    """Every comparison with a vote, oldest first, with its candidates (their ``finished`` flags)."""
    query = (
        select(Comparison)
        .where(Comparison.choice.is_not(None), Comparison.id > after_id)
        .order_by(Comparison.id)  # pragma: no mutate (SQLite returns id order without it; PostgreSQL need not)
        .options(selectinload(Comparison.candidates))
    )
    return list(session.scalars(query))


def reference_samples(session: Session, limit: int) -> list[tuple[list, str, bool]]:
    """The newest ``limit`` answers the starting model wrote in arena pairs, oldest
    first, as (context, text, finished): its own writing on what people ask. Pairs
    of sessions or addresses an admin left out of training are left out here too."""
    if limit <= 0:
        return []
    sessions_out = select(Exclusion.key).where(Exclusion.kind == "session")
    clients_out = select(Exclusion.key).where(Exclusion.kind == "client")
    query = (
        select(Comparison.context, CandidateRow.text, CandidateRow.finished)
        .join(CandidateRow, CandidateRow.comparison_id == Comparison.id)
        .where(CandidateRow.source == "reference", Comparison.session_id.not_in(sessions_out))
        .where(or_(Comparison.client.is_(None), Comparison.client.not_in(clients_out)))
        .order_by(CandidateRow.id.desc())
        .limit(limit)
    )
    return [(list(context), text, bool(finished)) for context, text, finished in reversed(session.execute(query).all())]


def count_votes(session: Session, choices: tuple[str, ...] = CHOICES) -> int:
    """How many comparisons have a vote among ``choices``."""
    return session.scalar(select(func.count()).select_from(Comparison).where(Comparison.choice.in_(choices))) or 0


def delete_session_data(session: Session, session_id: str) -> int:
    """Delete everything a browser session wrote: its conversations and messages,
    its pairs and their candidates, votes and written answers. Returns how many rows went.

    Models already trained on those votes keep what they learned; no later
    reward round or PPO prompt will see them.
    """
    comparisons = select(Comparison.id).where(Comparison.session_id == session_id)
    conversations = select(Conversation.id).where(Conversation.session_id == session_id)
    removed = 0
    for statement in (
        delete(Demonstration).where(Demonstration.comparison_id.in_(comparisons)),
        delete(CandidateRow).where(CandidateRow.comparison_id.in_(comparisons)),
        delete(Comparison).where(Comparison.session_id == session_id),
        delete(Message).where(Message.conversation_id.in_(conversations)),
        delete(Conversation).where(Conversation.session_id == session_id),
    ):
        removed += session.execute(statement.execution_options(synchronize_session=False)).rowcount or 0
    return removed


def user_contexts(session: Session, limit: int = 2000) -> list[list[dict]]:
    """The contexts people actually typed, newest first, without duplicates: PPO's prompts."""
    seen: set[str] = set()
    contexts = []
    for context in session.scalars(select(Comparison.context).order_by(Comparison.id.desc()).limit(limit * 2)):
        key = repr(context)
        if key not in seen:
            seen.add(key)
            contexts.append(context)
    return contexts[:limit]


def save_mode(session: Session, name: str, description: str, openings: list[str], behaviour: str = "") -> None:
    """Add (or replace) a response mode, enabled."""
    row = session.get(ResponseMode, name) or ResponseMode(name=name)
    row.description, row.openings, row.behaviour, row.enabled = description, list(openings), behaviour, True
    row.updated_at = utcnow()
    session.add(row)
    session.flush()


def remove_mode(session: Session, name: str) -> None:
    """Take a response mode out of use (a built-in one is remembered as removed)."""
    row = session.get(ResponseMode, name) or ResponseMode(name=name, description="", openings=[], behaviour="")
    row.enabled, row.updated_at = False, utcnow()
    session.add(row)
    session.flush()


def mode_changes(session: Session) -> list[ResponseMode]:
    """Every admin change to the response modes, by name."""
    return list(session.scalars(select(ResponseMode).order_by(ResponseMode.name)))


def mode_record(session: Session) -> dict[str, tuple[int, int]]:
    """Each response mode's (wins, losses) in the votes between two modes.

    Only "a" and "b" votes count: a tie or "both bad" says nothing about which
    of the two modes people prefer. Arena pairs have no modes and never count.
    """
    won = CandidateRow.side == Comparison.choice
    query = (
        select(CandidateRow.mode, won, func.count())
        .join(Comparison, CandidateRow.comparison_id == Comparison.id)
        .where(Comparison.choice.in_(("a", "b")), CandidateRow.mode.is_not(None), CandidateRow.mode != "")
        .group_by(CandidateRow.mode, won)
    )
    record: dict[str, list[int]] = {}
    for mode, is_win, count in session.execute(query):
        record.setdefault(mode, [0, 0])[0 if is_win else 1] += count
    return {mode: (wins, losses) for mode, (wins, losses) in record.items()}


def mode_record_by(session: Session, group: Callable[[list], object]) -> dict[object, dict[str, tuple[int, int]]]:
    """:func:`mode_record` split by ``group(context)`` of each vote's conversation
    (for instance the kind of question its last message asks)."""
    won = CandidateRow.side == Comparison.choice
    query = (
        select(Comparison.context, CandidateRow.mode, won)
        .join(Comparison, CandidateRow.comparison_id == Comparison.id)
        .where(Comparison.choice.in_(("a", "b")), CandidateRow.mode.is_not(None), CandidateRow.mode != "")
    )
    records: dict[object, dict[str, list[int]]] = {}
    for context, mode, is_win in session.execute(query):
        records.setdefault(group(context), {}).setdefault(mode, [0, 0])[0 if is_win else 1] += 1
    return {key: {m: (w, lo) for m, (w, lo) in record.items()} for key, record in records.items()}


# --- checkpoints, metrics and events --------------------------------------------------


def add_checkpoint(session: Session, kind: str, version: int, path: str, extra: dict | None = None) -> Checkpoint:
    """Name a saved checkpoint in the database."""
    checkpoint = Checkpoint(kind=kind, version=version, path=path, extra=extra or {})
    session.add(checkpoint)
    session.flush()
    return checkpoint


def latest_checkpoint(session: Session, kind: str) -> Checkpoint | None:
    """The newest checkpoint of a kind (``reward`` or ``policy``)."""
    return session.scalar(
        select(Checkpoint).where(Checkpoint.kind == kind).order_by(Checkpoint.version.desc(), Checkpoint.id.desc())
    )


def add_checkpoint_facts(session: Session, kind: str, version: int, **facts) -> bool:
    """Add measured facts to a checkpoint's ``extra`` (its alignment tax); False when
    no checkpoint has that version (pruned meanwhile)."""
    row = session.scalar(select(Checkpoint).where(Checkpoint.kind == kind, Checkpoint.version == version))
    if row is None:
        return False
    row.extra = {**(row.extra or {}), **facts}  # a new dict: the JSON column sees the change
    return True


def remove_checkpoint(session: Session, checkpoint_id: int) -> None:
    """Forget a checkpoint (its folder is the caller's to remove, after this commits)."""
    session.execute(delete(Checkpoint).where(Checkpoint.id == checkpoint_id))


def checkpoints(session: Session, kind: str) -> list[Checkpoint]:
    """Every checkpoint of a kind, oldest first."""
    return list(session.scalars(select(Checkpoint).where(Checkpoint.kind == kind).order_by(Checkpoint.version)))


def add_reward_round(session: Session, **metrics) -> RewardRound:
    """Record a reward-model round's metrics."""
    row = RewardRound(**metrics)
    session.add(row)
    session.flush()
    return row


def add_ppo_step(session: Session, **metrics) -> PPOStep:
    """Record a PPO step's metrics."""
    row = PPOStep(**metrics)
    session.add(row)
    session.flush()
    return row


def reward_rounds(session: Session) -> list[RewardRound]:
    """Every reward round, oldest first."""
    return list(session.scalars(select(RewardRound).order_by(RewardRound.id)))


def ppo_steps(session: Session) -> list[PPOStep]:
    """Every PPO step, oldest first."""
    return list(session.scalars(select(PPOStep).order_by(PPOStep.id)))


def ppo_steps_on_reward(session: Session, reward_version: int) -> list[PPOStep]:
    """The completed (not skipped) PPO steps that optimised one reward version, oldest first."""
    query = select(PPOStep).where(PPOStep.reward_version == reward_version, PPOStep.skipped.is_(False))
    return list(session.scalars(query.order_by(PPOStep.id)))


def add_event(session: Session, kind: str, message: str) -> None:
    """Log a training event (an error, a pause) for the UI."""
    session.add(TrainingEvent(kind=kind, message=message[:4000]))
