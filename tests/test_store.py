"""The database: schema, pairs, votes stored exactly once, stale and unknown pairs refused."""

from __future__ import annotations

import threading

import pytest

# The PostgreSQL plumbing lives with the PostgreSQL-only tests; pytest puts tests/ on sys.path.
from test_postgres import postgres_database

from rlhf_chat.generation.candidates import Candidate
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import SCHEMA_VERSION, Comparison, SchemaInfo


def cand(text: str, version: int = 0) -> Candidate:
    return Candidate(text, "policy", version, 1, 0.8, 0.95, 64, len(text.split()), True, 0.5)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """Every storage test runs on SQLite (the default) and on PostgreSQL (a shared
    deployment); the PostgreSQL run gets a database of its own and skips, saying
    why, where no server is available (see test_postgres.py)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def sessions(db_url):
    return store.open_store(db_url)


def new_pair(sessions, sid="s1", conversation_id=None, a="answer A", b="answer B") -> int:
    with sessions() as s, s.begin():
        if conversation_id == "new":
            conversation_id = store.start_conversation(s, sid).id
        ctx = [{"role": "user", "content": "hi"}]
        return store.save_pair(s, session_id=sid, context=ctx, a=cand(a), b=cand(b), conversation_id=conversation_id).id


def test_schema_version_recorded_and_wal_on(sessions):
    with sessions() as s:
        assert s.get(SchemaInfo, 1).version == SCHEMA_VERSION
        if s.bind.dialect.name == "sqlite":  # WAL is SQLite's; PostgreSQL has no such switch
            assert s.connection().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_pair_and_candidates_stored(sessions):
    pid = new_pair(sessions)
    with sessions() as s:
        c = s.get(Comparison, pid)
        assert c.choice is None and c.context == [{"role": "user", "content": "hi"}]
        assert [(r.side, r.text, r.seed, r.token_count) for r in c.candidates] == [("a", "answer A", 1, 2), ("b", "answer B", 1, 2)]


def test_vote_is_stored_once(sessions):
    pid = new_pair(sessions)
    with sessions() as s, s.begin():
        assert store.record_vote(s, pid, "a", "clearly", "s1").ok
    with sessions() as s, s.begin():
        second = store.record_vote(s, pid, "b", None, "s1")
    assert not second.ok and "already" in second.message
    with sessions() as s:
        c = s.get(Comparison, pid)
        assert (c.choice, c.strength) == ("a", "clearly") and c.voted_at is not None


def test_concurrent_double_click_stores_one_vote(sessions):
    pid = new_pair(sessions)
    results, errors = [], []
    start = threading.Barrier(8)

    def click():
        try:
            start.wait(5)  # all eight at the same moment
            with sessions() as s, s.begin():
                results.append(store.with_retry(lambda: store.record_vote(s, pid, "b", None, "s1")))
        except Exception as exc:  # an exception in a thread is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=click) for _ in range(8)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert errors == [] and len(results) == 8  # every click answered
    assert [r.ok for r in results].count(True) == 1
    assert sorted(r.message for r in results if not r.ok) == ["This pair already has your vote."] * 7
    with sessions() as s:
        assert store.count_votes(s) == 1


def test_stale_pair_refused(sessions):
    with sessions() as s, s.begin():
        conv = store.start_conversation(s, "s1").id
    old = new_pair(sessions, conversation_id=conv)
    new = new_pair(sessions, conversation_id=conv)
    with sessions() as s, s.begin():
        result = store.record_vote(s, old, "a", None, "s1")
    assert not result.ok and "no longer current" in result.message
    with sessions() as s, s.begin():
        assert store.record_vote(s, new, "a", None, "s1").ok


@pytest.mark.parametrize("pair_id, session_id", [(9999, "s1"), (None, "someone-else")])
def test_unknown_pair_or_other_session_refused(sessions, pair_id, session_id):
    pid = new_pair(sessions)
    with sessions() as s, s.begin():
        result = store.record_vote(s, pair_id or pid, "a", None, session_id)
    assert not result.ok and "unknown" in result.message


def test_bad_choice_refused(sessions):
    pid = new_pair(sessions)
    with sessions() as s, s.begin():
        assert not store.record_vote(s, pid, "c").ok


def test_user_contexts_deduplicated_newest_first(sessions):
    for text in ["one", "two", "one"]:
        with sessions() as s, s.begin():
            store.save_pair(s, session_id="x", context=[{"role": "user", "content": text}], a=cand("a"), b=cand("b"))
    with sessions() as s:
        assert store.user_contexts(s) == [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]


def test_checkpoints_latest(sessions):
    with sessions() as s, s.begin():
        store.add_checkpoint(s, "reward", 1, "/a")
        store.add_checkpoint(s, "reward", 2, "/b", {"mean": 0.5})
        store.add_checkpoint(s, "policy", 7, "/c")
    with sessions() as s:
        latest = store.latest_checkpoint(s, "reward")
        assert (latest.version, latest.path, latest.extra) == (2, "/b", {"mean": 0.5})
        assert store.latest_checkpoint(s, "none") is None
    with sessions() as s, s.begin():
        store.add_checkpoint(s, "reward", 1, "/late")  # named after v2 (a slow save): v2 is still the newest
    with sessions() as s:
        assert store.latest_checkpoint(s, "reward").path == "/b"
    with sessions() as s, s.begin():
        store.add_checkpoint(s, "reward", 2, "/b-again")  # v2 saved again (a retried save): the newer row wins
    with sessions() as s:
        assert store.latest_checkpoint(s, "reward").path == "/b-again"


def test_newer_schema_refused(sessions, db_url):
    with sessions() as s, s.begin():
        s.get(SchemaInfo, 1).version = SCHEMA_VERSION + 1
    with pytest.raises(RuntimeError, match="newer"):
        store.open_store(db_url)


def test_a_schema_1_database_upgrades_and_keeps_its_rows(tmp_path):
    """A database made by the previous version (schema 1: ppo_steps without the columns
    schema 2 added) opens, gains the columns, and keeps every row it had."""
    import sqlite3

    path = tmp_path / "old.db"
    connection = sqlite3.connect(path)
    connection.executescript("""
        CREATE TABLE schema_info (id INTEGER PRIMARY KEY, version INTEGER, updated_at DATETIME);
        INSERT INTO schema_info VALUES (1, 1, '2026-11-24 10:00:00');
        CREATE TABLE ppo_steps (
            id INTEGER PRIMARY KEY, version INTEGER, mean_reward FLOAT, mean_kl FLOAT, kl_coef FLOAT,
            policy_loss FLOAT, value_loss FLOAT, clip_fraction FLOAT, approx_kl FLOAT, entropy FLOAT,
            mean_length FLOAT, skipped BOOLEAN, seconds FLOAT, created_at DATETIME);
        INSERT INTO ppo_steps VALUES (1, 1, 0.5, 0.1, 0.05, 0.0, 0.1, 0.0, 0.0, 2.0, 30.0, 0, 7.0,
                                      '2026-11-24 10:01:00');
    """)
    connection.commit()
    connection.close()
    sessions = store.open_store(f"sqlite:///{path}")
    with sessions() as s:
        assert s.get(SchemaInfo, 1).version == SCHEMA_VERSION == 4
        [old] = store.ppo_steps(s)
        assert (old.version, old.mean_reward, old.reward_version, old.copy_gap) == (1, 0.5, None, None)
    with sessions() as s, s.begin():
        store.add_ppo_step(
            s, version=2, mean_reward=0.6, mean_kl=0.2, kl_coef=0.05, policy_loss=0.0, value_loss=0.1,
            clip_fraction=0.0, approx_kl=0.0, entropy=2.0, mean_length=20.0, skipped=False, seconds=7.0,
            reward_version=3, copy_gap=0.03, ptx_loss=None,
        )
    with sessions() as s:
        assert [p.reward_version for p in store.ppo_steps_on_reward(s, 3)] == [3]
    store.open_store(f"sqlite:///{path}")  # a second start finds nothing left to do


def test_vote_results_say_exactly_what_happened(sessions):
    """The four answers a vote can get, word for word and with ``ok`` a real bool:
    the UI shows these messages, and callers test ``ok``."""
    with sessions() as s, s.begin():
        conv = store.start_conversation(s, "s1").id
    old = new_pair(sessions, conversation_id=conv)
    new = new_pair(sessions, conversation_id=conv)
    with sessions() as s, s.begin():
        results = [
            store.record_vote(s, new, "c"),
            store.record_vote(s, 9999, "a", None, "s1"),
            store.record_vote(s, old, "a", None, "s1"),
            store.record_vote(s, new, "a", None, "s1"),
            store.record_vote(s, new, "b", None, "s1"),
        ]
    assert [(r.ok, r.message) for r in results] == [
        (False, "Unknown choice 'c'."),
        (False, "That pair is unknown; please send a message first."),
        (False, "That pair is no longer current; vote on the newest one."),
        (True, "Vote recorded."),
        (False, "This pair already has your vote."),
    ]


def test_an_unknown_strength_is_stored_as_not_stated(sessions):
    first, second = new_pair(sessions), new_pair(sessions)
    with sessions() as s, s.begin():
        assert store.record_vote(s, first, "a", "enormously", "s1").ok
        assert store.record_vote(s, second, "b", "slightly", "s1").ok
    with sessions() as s:
        assert s.get(Comparison, first).strength is None and s.get(Comparison, second).strength == "slightly"


def test_a_pair_keeps_its_arena_flag_versions_and_source(sessions):
    with sessions() as s, s.begin():
        ctx = [{"role": "user", "content": "hi"}]
        arena = store.save_pair(s, session_id="s1", context=ctx, a=cand("x", 3), b=cand("y", 0), arena=True,
                                source="simulate").id
        plain = store.save_pair(s, session_id="s1", context=ctx, a=cand("x", 2), b=cand("y", 2)).id
    with sessions() as s:
        a, p = s.get(Comparison, arena), s.get(Comparison, plain)
        assert (a.arena, a.policy_version_a, a.policy_version_b, a.source) == (True, 3, 0, "simulate")
        assert (p.arena, p.policy_version_a, p.policy_version_b, p.source) == (False, 2, 2, "ui")


def test_a_vote_becomes_the_preference_it_states(sessions):
    """preferences.to_pair: the chosen side first, each side's finished flag with it,
    the strength and context kept; ties and both-bad say nothing."""
    from rlhf_chat.learning.preferences import PreferencePair, preference_pairs, to_pair

    with sessions() as s, s.begin():
        ctx = [{"role": "user", "content": "hi"}]
        cut, whole = cand("cut answer"), cand("whole answer")
        cut.finished = False
        ids = [store.save_pair(s, session_id="s1", context=ctx, a=cut, b=whole).id for _ in range(4)]
        for pid, choice, strength in zip(ids, ["a", "b", "tie", "both_bad"], ["clearly", None, None, None]):
            assert store.record_vote(s, pid, choice, strength, "s1").ok
    with sessions() as s:
        rows = store.voted_comparisons(s)
        assert to_pair(rows[0]) == PreferencePair(ids[0], ctx, "cut answer", "whole answer", "clearly", False, True)
        assert to_pair(rows[1]) == PreferencePair(ids[1], ctx, "whole answer", "cut answer", None, True, False)
        assert to_pair(rows[2]) is None and to_pair(rows[3]) is None
        assert [p.comparison_id for p in preference_pairs(rows)] == ids[:2]
        rows[0].candidates.clear()  # stored before candidates were recorded: shown, and scored, as complete
        assert to_pair(rows[0]).chosen_finished is True and to_pair(rows[0]).rejected_finished is True


def test_voted_comparisons_are_the_voted_ones_after_an_id_oldest_first(sessions):
    ids = [new_pair(sessions) for _ in range(4)]
    with sessions() as s, s.begin():
        assert store.count_votes(s) == 0  # an empty count is 0, not None
        for pid in (ids[0], ids[2], ids[3]):
            assert store.record_vote(s, pid, "a", None, "s1").ok
    with sessions() as s:
        assert [c.id for c in store.voted_comparisons(s)] == [ids[0], ids[2], ids[3]]  # ids[1] has no vote
        assert [c.id for c in store.voted_comparisons(s, after_id=ids[2])] == [ids[3]]
        assert store.count_votes(s) == 3 and store.count_votes(s, ("b",)) == 0


def test_text_is_stored_without_nul_and_otherwise_as_it_is():
    assert store.storable_text("a\x00b\x00") == "ab"
    assert store.storable_text("plain  text\n") == "plain  text\n"


def test_a_schema_3_database_gains_the_guards_columns_and_keeps_its_votes(tmp_path):
    """Schema 4 added who voted from where (a salted hash) and the reward model's agreement."""
    import sqlite3

    path = tmp_path / "v3.db"
    sessions = store.open_store(f"sqlite:///{path}")
    with sessions() as s, s.begin():
        c = store.save_pair(s, session_id="old", context=[{"role": "user", "content": "hi"}], a=cand("x"), b=cand("y"))
        store.record_vote(s, c.id, "b")
    connection = sqlite3.connect(path)
    for table, column in (("comparisons", "client"), ("comparisons", "rm_agrees"), ("demonstrations", "client")):
        connection.execute(f"DROP INDEX IF EXISTS ix_{table}_{column}")
        connection.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    connection.execute("UPDATE schema_info SET version = 3")
    connection.commit()
    connection.close()
    sessions = store.open_store(f"sqlite:///{path}")
    with sessions() as s:
        [old] = store.voted_comparisons(s)
        assert (old.choice, old.client, old.rm_agrees) == ("b", None, None)
        assert s.get(SchemaInfo, 1).version == 4
    with sessions() as s, s.begin():
        store.set_rm_agreement(s, {old.id: True})
    with sessions() as s:
        assert store.voted_comparisons(s)[0].rm_agrees is True
