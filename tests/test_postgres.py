"""PostgreSQL: the storage contract on a real server, where a shared deployment keeps its votes.

The generic storage tests in test_store.py run on SQLite *and* PostgreSQL (its
``db_url`` fixture uses :func:`postgres_database` from here). This file holds
what only a server with real concurrency can show: a vote stays exactly-once
when eight transactions race under READ COMMITTED (SQLite simply has one
writer at a time), and a dropped connection is replaced, not reported.

The server comes from ``RLHF_CHAT_TEST_PG_URL`` (``make test`` starts a
throwaway one with scripts/postgres.sh and sets it). Without it these tests
skip and say why; with it, a server that refuses connections is a failure,
not a skip. Each test gets a database of its own, created from that URL and
dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, make_url, text

from rlhf_chat.generation.candidates import Candidate
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import Comparison

PG_URL_ENV = "RLHF_CHAT_TEST_PG_URL"
PG_SKIP_ENV = "RLHF_CHAT_TEST_PG_SKIP"  # why make could not start the server


def postgres_url() -> str:
    """The server's URL, or a skip that says why there is none."""
    url = os.environ.get(PG_URL_ENV, "").strip()
    if not url:
        reason = os.environ.get(PG_SKIP_ENV, "").strip() or (
            f"{PG_URL_ENV} is not set: run `make test` (it starts a throwaway server with "
            f"scripts/postgres.sh), or set it to postgresql+psycopg://user@host:port/db"
        )
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests skipped: the psycopg driver is not installed (it is in requirements.txt)")
    return url


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database on the test server for one test; dropped afterwards.

    A fresh database (not drop_all/create_all on a shared one) means a test that
    fails half-way, or leaves a connection open, cannot leak rows into the next.
    """
    base = make_url(postgres_url())
    name = f"rlhf_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")  # CREATE DATABASE refuses a transaction
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE (PostgreSQL 13+) ends the pooled connections the test's engines still hold.
        with contextlib.suppress(Exception), admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def pg_sessions(pg_url):
    return store.open_store(pg_url)


def cand(text_: str) -> Candidate:
    return Candidate(text_, "policy", 0, 1, 0.8, 0.95, 64, len(text_.split()), True, 0.5)


def new_pair(sessions, sid: str = "s1") -> int:
    with sessions() as s, s.begin():
        conversation_id = store.start_conversation(s, sid).id
        context = [{"role": "user", "content": "hi"}]
        return store.save_pair(
            s, session_id=sid, context=context, a=cand("A"), b=cand("B"), conversation_id=conversation_id
        ).id


def vote_in_own_transaction(sessions, pid: int, choice: str) -> store.VoteResult:
    """A vote the way ui.vote stores one: a whole transaction, retried as a whole."""

    def save() -> store.VoteResult:
        with sessions() as s, s.begin():
            return store.record_vote(s, pid, choice, None, "s1")

    return store.with_retry(save)


def test_engine_uses_psycopg_and_pings(pg_url):
    """Plain ``postgresql://`` URLs (as providers hand them out) get the installed driver."""
    bare = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    for url in (pg_url, bare, bare.replace("postgresql://", "postgres://", 1)):
        engine = store.make_engine(url)
        assert engine.dialect.driver == "psycopg" and engine.pool._pre_ping
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        engine.dispose()


def test_default_isolation_is_read_committed(pg_sessions):
    """record_vote's exactly-once argument below is made for READ COMMITTED; fail loudly if that changes."""
    with pg_sessions() as s, s.begin():
        assert s.execute(text("SHOW transaction_isolation")).scalar() == "read committed"


def test_eight_racing_transactions_store_one_vote(pg_sessions):
    """Eight tabs vote on the same pair at the same instant, each choosing differently:
    exactly one succeeds, and the stored choice is the winner's, not a later one's."""
    pid = new_pair(pg_sessions)
    choices = ["a", "b", "tie", "both_bad"] * 2
    start = threading.Barrier(len(choices))
    results: dict[int, store.VoteResult] = {}
    errors: list[BaseException] = []

    def click(i: int) -> None:
        try:
            start.wait(timeout=10)
            results[i] = vote_in_own_transaction(pg_sessions, pid, choices[i])
        except BaseException as exc:  # an error must fail the test, not vanish in a thread
            errors.append(exc)

    threads = [threading.Thread(target=click, args=(i,)) for i in range(len(choices))]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert not errors, errors
    winners = [i for i, r in results.items() if r.ok]
    assert len(winners) == 1 and len(results) == len(choices)
    assert all("already" in r.message for i, r in results.items() if i != winners[0])
    with pg_sessions() as s:
        assert store.count_votes(s) == 1
        assert s.get(Comparison, pid).choice == choices[winners[0]]


def test_second_vote_waits_for_the_first_and_then_sees_it(pg_sessions, pg_url):
    """The race made deterministic: the first vote's transaction holds the row; the
    second UPDATE must wait on that row lock, and once the first commits,
    PostgreSQL re-checks ``choice IS NULL`` on the new row version and updates
    nothing. (Were the WHERE evaluated on the old snapshot, both would succeed.)"""
    pid = new_pair(pg_sessions)
    second: list[store.VoteResult] = []
    first = pg_sessions()
    first.begin()
    try:
        assert store.record_vote(first, pid, "a", None, "s1").ok  # row locked, not committed
        waiter = threading.Thread(target=lambda: second.append(vote_in_own_transaction(pg_sessions, pid, "b")))
        waiter.start()
        # Proof that the second vote is blocked on a lock (not merely slow): the server says so.
        probe = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        deadline = time.monotonic() + 10
        with probe.connect() as conn:
            while True:
                waiting = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                ).scalar()
                if waiting or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        probe.dispose()
        assert waiting == 1 and not second, "the second vote should be waiting on the first one's row lock"
        first.commit()
    finally:
        first.close()
    waiter.join(timeout=10)
    assert len(second) == 1 and not second[0].ok and "already" in second[0].message
    with pg_sessions() as s:
        assert s.get(Comparison, pid).choice == "a"


def test_dropped_connections_are_replaced(pg_sessions, pg_url):
    """The server ends every connection (a restart, a failover, an idle timeout):
    the next vote still goes through, because the pool pings before use."""
    pid = new_pair(pg_sessions)
    killer = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with killer.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    killer.dispose()
    assert killed >= 1  # the store's pooled connection was among them
    with pg_sessions() as s, s.begin():  # no with_retry: the ping alone must cope
        assert store.record_vote(s, pid, "b", None, "s1").ok
    with pg_sessions() as s:
        assert store.count_votes(s) == 1


def test_unicode_and_json_round_trip(pg_sessions):
    """Emoji, right-to-left text and markup survive the server's encoding unchanged."""
    texts = ["👨‍👩‍👧 ok 🏳️‍🌈", "مرحبا بالعالم", "שלום", "<script>alert(1)</script>", "a\u200db"]
    with pg_sessions() as s, s.begin():
        pid = store.save_pair(
            s,
            session_id="s1",
            context=[{"role": "user", "content": t} for t in texts],
            a=cand(texts[0]),
            b=cand(texts[1]),
        ).id
    with pg_sessions() as s:
        c = s.get(Comparison, pid)
        assert [m["content"] for m in c.context] == texts
        assert (c.response_a, c.response_b) == (texts[0], texts[1])


def test_model_answer_with_nul_is_stored(pg_sessions):
    """PostgreSQL refuses NUL in text; a model's answer can decode to one. The pair,
    and the chosen answer continuing the conversation, must still be stored."""
    with pg_sessions() as s, s.begin():
        conversation_id = store.start_conversation(s, "s1").id
        pid = store.save_pair(
            s,
            session_id="s1",
            context=[{"role": "user", "content": "hi"}],
            a=cand("bad\x00answer"),
            b=cand("B"),
            conversation_id=conversation_id,
        ).id
    with pg_sessions() as s, s.begin():
        assert store.record_vote(s, pid, "a", None, "s1").ok
        store.add_message(s, conversation_id, "assistant", "bad\x00answer")
    with pg_sessions() as s:
        c = s.get(Comparison, pid)
        assert c.response_a == c.candidates[0].text == "badanswer"
        assert c.conversation.messages[-1].content == "badanswer"
