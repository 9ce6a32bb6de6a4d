"""Faults a live deployment meets: a locked database, a full disk, a wiped checkpoint folder.

Each test checks the two things that matter to a person using the app: nothing
they did is stored twice or lost half-way, and an error that cannot be
handled reaches the caller (the UI) instead of being swallowed.
"""

from __future__ import annotations

import errno
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy.exc import OperationalError

from rlhf_chat.generation.candidates import Candidate
from rlhf_chat.learning import checkpoints
from rlhf_chat.learning.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import Comparison


def cand(text: str) -> Candidate:
    return Candidate(text, "policy", 0, 1, 0.8, 0.95, 64, len(text.split()), True, 0.5)


# --- (a) the database locked or briefly unavailable -----------------------------------


@pytest.fixture
def db_file(tmp_path) -> Path:
    return tmp_path / "feedback.db"


@pytest.fixture
def quick_sessions(db_file):
    """A store that gives up on a lock after 50 ms, so retries (not the busy wait) do the waiting."""
    return store.open_store(f"sqlite:///{db_file}", busy_timeout_ms=50)


def open_pair(sessions) -> int:
    with sessions() as s, s.begin():
        return store.save_pair(
            s, session_id="s1", context=[{"role": "user", "content": "hi"}], a=cand("A"), b=cand("B")
        ).id


def lock_exclusively(db_file: Path) -> sqlite3.Connection:
    """Another process's connection holding the write lock (a backup, a migration, a stuck writer)."""
    locker = sqlite3.connect(db_file, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    return locker


def counted_vote(sessions, pid: int, attempts: list[int]):
    """ui.vote's save(): the whole transaction is the unit that is retried."""

    def save() -> store.VoteResult:
        attempts.append(1)
        with sessions() as s, s.begin():
            return store.record_vote(s, pid, "a", "clearly", "s1")

    return save


def test_vote_waits_out_a_lock_and_is_stored_once(quick_sessions, db_file):
    pid = open_pair(quick_sessions)
    locker = lock_exclusively(db_file)
    release = threading.Timer(0.5, lambda: locker.execute("COMMIT"))
    release.start()
    attempts: list[int] = []
    started = time.monotonic()
    try:
        result = store.with_retry(counted_vote(quick_sessions, pid, attempts))  # the UI's default back-off
    finally:
        release.join()
        locker.close()
    assert result.ok
    assert len(attempts) >= 2, "the first attempt should have met the lock"
    assert time.monotonic() - started >= 0.45  # it really waited for the release
    with quick_sessions() as s:
        assert store.count_votes(s) == 1
        assert (s.get(Comparison, pid).choice, s.get(Comparison, pid).strength) == ("a", "clearly")


def test_retries_exhausted_raise_and_store_nothing(quick_sessions, db_file):
    """When the lock outlasts the retries the error reaches the caller (ui.vote then
    fails visibly and the person can vote again); no half-vote is left behind."""
    pid = open_pair(quick_sessions)
    locker = lock_exclusively(db_file)
    attempts: list[int] = []
    try:
        with pytest.raises(OperationalError, match="locked"):
            store.with_retry(counted_vote(quick_sessions, pid, attempts), attempts=3, first_wait_s=0.02)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert len(attempts) == 3
    with quick_sessions() as s:
        assert store.count_votes(s) == 0
    assert store.with_retry(counted_vote(quick_sessions, pid, attempts)).ok  # the pair is still open


def test_other_errors_are_not_retried():
    """Only a locked or unreachable database is worth waiting for; a bug is not."""
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        store.with_retry(broken, first_wait_s=0.01)
    assert calls == [1]


def test_unanswering_postgres_gives_up_instead_of_hanging():
    """A PostgreSQL host that accepts the connection but never answers (an overloaded
    or half-dead server, a stuck proxy) fails within the connect timeout, as an
    OperationalError with_retry knows, instead of holding a person's request forever.
    The "server" is a local socket that never reads, so no PostgreSQL is needed."""
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (it is in requirements.txt)")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        engine = store.make_engine(f"postgresql://nobody@127.0.0.1:{port}/none", busy_timeout_ms=1000)
        outcome: list[BaseException | None] = []

        def connect() -> None:
            try:
                with engine.connect():
                    outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=connect, daemon=True)  # daemon: a hang must not hang pytest
        started = time.monotonic()
        worker.start()
        worker.join(timeout=15)
        elapsed = time.monotonic() - started
    assert outcome, "connecting to a silent server hung instead of timing out"
    assert isinstance(outcome[0], OperationalError) and elapsed < 10
    engine.dispose()


# --- (b) disk full while saving a checkpoint -----------------------------------------


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {"lora.w": torch.full((4, 4), value), "head.b": torch.full((2,), value)}


def leftovers(root: Path) -> list[str]:
    """Temporary folders of an unfinished save (they start with a dot)."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def half_written_then_full(_tensors, filename, *_args, **_kwargs):
    """A more honest full disk: part of the file is on disk when the write fails."""
    Path(filename).write_bytes(b"\x00" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fake_save", [disk_full, half_written_then_full])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fake_save):
    root = tmp_path / "checkpoints"
    previous = save_checkpoint(root, "policy", 1, tensors(1.0), {"version": 1})
    monkeypatch.setattr(checkpoints, "save_file", fake_save)
    with pytest.raises(OSError) as raised:
        save_checkpoint(root, "policy", 2, tensors(2.0), {"version": 2})
    assert raised.value.errno == errno.ENOSPC
    assert not checkpoint_path(root, "policy", 2).exists()
    assert leftovers(root) == []
    loaded, meta = load_checkpoint(previous)
    assert meta == {"version": 1} and torch.equal(loaded["lora.w"], torch.full((4, 4), 1.0))


def test_full_disk_while_replacing_the_same_version_keeps_it(tmp_path, monkeypatch):
    """A retried save of a version that exists must not delete it before the new one is whole."""
    root = tmp_path / "checkpoints"
    path = save_checkpoint(root, "reward", 3, tensors(3.0), {"version": 3})
    monkeypatch.setattr(checkpoints, "save_file", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(root, "reward", 3, tensors(9.0), {"version": 3, "retry": True})
    assert leftovers(root) == []
    loaded, meta = load_checkpoint(path)
    assert meta == {"version": 3} and torch.equal(loaded["head.b"], torch.full((2,), 3.0))
    monkeypatch.undo()  # space is free again: the retry now replaces it whole
    save_checkpoint(root, "reward", 3, tensors(9.0), {"version": 3, "retry": True})
    assert load_checkpoint(path)[1] == {"version": 3, "retry": True}
    assert leftovers(root) == []


def test_full_disk_reported_only_at_fsync(tmp_path, monkeypatch):
    """On network and FUSE volumes (a Space's storage bucket) the write may succeed
    and only the flush report the full disk; that must fail the save too."""
    root = tmp_path / "checkpoints"
    previous = save_checkpoint(root, "policy", 1, tensors(1.0), {"version": 1})

    def fsync_full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", fsync_full)
    with pytest.raises(OSError):
        save_checkpoint(root, "policy", 2, tensors(2.0), {"version": 2})
    monkeypatch.undo()
    assert not checkpoint_path(root, "policy", 2).exists() and leftovers(root) == []
    assert load_checkpoint(previous)[1] == {"version": 1}


# --- (c) a checkpoint folder gone from disk -------------------------------------------


def fake_load(_models, path: str) -> int:
    """Stands in for reward.load_reward / ppo.load_policy: reads the files, returns the version."""
    _, meta = load_checkpoint(path)
    return int(meta["version"])


def test_restore_falls_back_past_wiped_and_corrupt_checkpoints(tmp_path):
    """A Space's own disk is wiped on restart while the database (elsewhere) still
    names the folders; a half-copied volume leaves a truncated file. The newest
    readable checkpoint is restored instead of failing the start."""
    from rlhf_chat.learning.checkpoints import restore_latest

    root = tmp_path / "checkpoints"
    sessions = store.open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    paths = [save_checkpoint(root, "policy", v, tensors(float(v)), {"version": v}) for v in (1, 2, 3, 4)]
    with sessions() as s, s.begin():
        for version, path in enumerate(paths, start=1):
            store.add_checkpoint(s, "policy", version, str(path))
    shutil.rmtree(paths[3])  # v4: wiped
    weights = paths[2] / checkpoints.WEIGHTS  # v3: truncated mid-copy
    weights.write_bytes(weights.read_bytes()[:40])
    assert restore_latest(None, sessions, "policy", fake_load) == 2


def test_restore_with_nothing_readable_starts_fresh(tmp_path):
    from rlhf_chat.learning.checkpoints import restore_latest

    sessions = store.open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    with sessions() as s, s.begin():
        store.add_checkpoint(s, "reward", 1, str(tmp_path / "gone"))
    assert restore_latest(None, sessions, "reward", fake_load) == 0
    assert restore_latest(None, sessions, "policy", fake_load) == 0  # none saved yet


def test_missing_and_corrupt_checkpoints_raise_what_restore_catches(tmp_path):
    """restore_latest catches OSError, KeyError and ValueError; safetensors' own
    error type is none of them, so load_checkpoint translates it."""
    with pytest.raises(OSError):
        load_checkpoint(tmp_path / "gone")
    path = save_checkpoint(tmp_path, "policy", 1, tensors(1.0), {"version": 1})
    (path / checkpoints.WEIGHTS).write_bytes(b"")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, "policy", 2, tensors(1.0), {"version": 2})
    (path / checkpoints.META).write_text('{"vers')
    with pytest.raises(ValueError):
        load_checkpoint(path)


def test_a_reward_checkpoint_with_an_older_head_is_skipped_on_restore(tmp_path, tiny_path):
    """A reward checkpoint saved when the head read the last token only (H inputs,
    not 2H) is refused, the newest loadable one is restored instead, and the
    live model is left untouched by the refused one."""
    from rlhf_chat.config import ModelConfig
    from rlhf_chat.learning.reward import load_reward, reward_tensors
    from rlhf_chat.model.loading import load_models
    from rlhf_chat.learning.checkpoints import restore_latest

    models = load_models(ModelConfig(name=str(tiny_path)))
    current = {k: v.detach().clone() for k, v in reward_tensors(models).items()}
    older = {k: v + 1 for k, v in current.items()} | {"head.weight": torch.ones(1, models.hidden_size)}
    meta = {"moments": {"mean": 0.0, "m2": 1.0, "count": 2}, "base": models.base}  # the same base: only the head differs
    root, sessions = tmp_path / "checkpoints", store.open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    paths = [save_checkpoint(root, "reward", 1, current, {**meta, "version": 1}),
             save_checkpoint(root, "reward", 2, older, {**meta, "version": 2})]
    with sessions() as s, s.begin():
        for version, path in enumerate(paths, start=1):
            store.add_checkpoint(s, "reward", version, str(path))
    with pytest.raises(ValueError, match="head.weight has shape"):
        load_reward(models, str(paths[1]))
    assert all(torch.equal(v, current[k]) for k, v in reward_tensors(models).items())
    assert restore_latest(models, sessions, "reward", load_reward) == 1


def published(tmp_path, kind: str, versions) -> tuple:
    """A store and checkpoint folder holding ``versions`` of ``kind``, published as the trainer does."""
    root = tmp_path / "checkpoints"
    sessions = store.open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    for v in versions:
        checkpoints.publish_checkpoint(sessions, root, kind, v, tensors(float(v)), {"version": v})
    return sessions, root


def test_pruning_keeps_the_newest_and_the_protected_and_a_restart_serves_the_newest(tmp_path):
    """Disk stays bounded: all but the newest ``keep`` go, row first, then folder, and a
    protected version (the tripwire's roll-back target) stays. A restart then loads the
    newest, and every checkpoint still named is whole, so a replica following the
    trainer (it loads the newest published one) never asks for a pruned one."""
    from rlhf_chat.learning.checkpoints import prune_checkpoints, restore_latest, verify_digest

    sessions, root = published(tmp_path, "policy", range(1, 9))
    assert prune_checkpoints(sessions, "policy", keep=3, protect={2}) == [1, 3, 4, 5]
    with sessions() as s:
        left = store.checkpoints(s, "policy")
        newest = store.latest_checkpoint(s, "policy")
    assert [c.version for c in left] == [2, 6, 7, 8] and newest.version == 8
    for c in left:
        verify_digest(c.path, c.extra["sha256"])  # whole, as published
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        checkpoint_path(root, "policy", v).name for v in (2, 6, 7, 8)
    ]
    assert restore_latest(None, sessions, "policy", fake_load) == 8
    assert prune_checkpoints(sessions, "policy", keep=3, protect={2}) == []  # nothing more to do
    assert prune_checkpoints(sessions, "policy", keep=0) == []  # 0 keeps everything


def test_the_loop_prunes_both_kinds_and_keeps_the_tripwires_target(tmp_path, monkeypatch):
    from rlhf_chat.config import AppConfig
    from rlhf_chat.learning import training_loop, tripwire

    sessions, _ = published(tmp_path, "policy", range(1, 7))
    for v in range(1, 5):
        checkpoints.publish_checkpoint(sessions, tmp_path / "checkpoints", "reward", v, tensors(v), {"version": v})
    monkeypatch.setattr(tripwire, "rollback_target", lambda session, min_votes: 1)
    cfg = AppConfig()
    cfg.store.keep_checkpoints = 2
    assert training_loop.prune_old_checkpoints(sessions, cfg) == [2, 3, 4, 1, 2]
    with sessions() as s:
        assert [c.version for c in store.checkpoints(s, "policy")] == [1, 5, 6]
        assert [c.version for c in store.checkpoints(s, "reward")] == [3, 4]
