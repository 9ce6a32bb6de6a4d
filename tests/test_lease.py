"""The trainer lease: one trainer per database, refused with a clear message, taken
over once a dead holder's heartbeat expires; on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest

from rlhf_chat.storage import lease
from rlhf_chat.storage.lease import Holder, LeaseHeld, LeaseKeeper
from tests.test_store import db_url, sessions  # noqa: F401 (fixtures: SQLite and PostgreSQL)

TTL = 30.0


def holder(name: str) -> Holder:
    return Holder(f"host-{name}", 100 + len(name), f"token-{name}")


def test_a_second_trainer_is_refused_with_the_holders_host_and_heartbeat_age(sessions):
    first, second = holder("a"), holder("b")
    lease.take(sessions, first, TTL, now=1000.0)
    with pytest.raises(LeaseHeld, match=r"host-a \(pid 101\), last heartbeat 4 s ago.*wait 26 s"):
        lease.take(sessions, second, TTL, now=1004.0)
    with sessions() as session:
        assert lease.current(session).holder == first.name  # the refusal changed nothing


def test_a_lease_whose_holder_stopped_beating_is_taken_over_and_the_old_holder_learns_it(sessions):
    dead, fresh = holder("dead"), holder("fresh")
    lease.take(sessions, dead, TTL, now=1000.0)
    assert lease.renew(sessions, dead, now=1020.0)
    with pytest.raises(LeaseHeld):  # 29 s after its last beat: still alive
        lease.take(sessions, fresh, TTL, now=1049.0)
    lease.take(sessions, fresh, TTL, now=1051.0)  # 31 s: expired
    with sessions() as session:
        row = lease.current(session)
        assert (row.holder, row.heartbeat_at, row.taken_at) == (fresh.name, 1051.0, 1051.0)
    assert not lease.renew(sessions, dead, now=1052.0)  # it must stop training
    assert lease.renew(sessions, fresh, now=1052.0)


def test_a_clean_stop_releases_the_lease_at_once_and_only_the_holders(sessions):
    a, b = holder("a"), holder("b")
    lease.take(sessions, a, TTL, now=1000.0)
    lease.release(sessions, b)  # not b's to give
    with sessions() as session:
        assert lease.current(session).holder == a.name
    lease.release(sessions, a)
    with sessions() as session:
        assert lease.current(session) is None
    lease.take(sessions, b, TTL, now=1001.0)


def test_the_holder_may_take_its_own_lease_again(sessions):
    a = holder("a")
    lease.take(sessions, a, TTL, now=1000.0)
    lease.take(sessions, a, TTL, now=1001.0)
    with sessions() as session:
        assert lease.current(session).heartbeat_at == 1001.0


def test_trainers_racing_for_a_free_lease_get_exactly_one(sessions):
    racers = [holder(f"r{i}") for i in range(6)]
    won, refused, errors = [], [], []
    start = threading.Barrier(len(racers))

    def race(me: Holder) -> None:
        start.wait()
        try:
            lease.take(sessions, me, TTL)
            won.append(me.name)
        except LeaseHeld:
            refused.append(me.name)
        except Exception as exc:  # anything else is a failure of the test, not a lost thread
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(r,)) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(won) == 1 and len(refused) == len(racers) - 1
    with sessions() as session:
        assert lease.current(session).holder == won[0]


def test_the_keeper_renews_and_calls_back_once_when_another_trainer_took_over(sessions):
    me, usurper = holder("me"), holder("usurper")
    lease.take(sessions, me, TTL)
    lost = []
    keeper = LeaseKeeper(sessions, me, every_s=0.05, on_lost=lost.append).start()
    with sessions() as session:
        before = lease.current(session).heartbeat_at
    time.sleep(0.3)
    with sessions() as session:
        assert lease.current(session).heartbeat_at > before  # renewed
    lease.take(sessions, usurper, TTL, now=time.time() + TTL + 1)  # as if our heartbeat had expired
    deadline = time.time() + 5
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    keeper.stop()
    assert len(lost) == 1 and "host-usurper" in lost[0]
    with sessions() as session:  # stopping a keeper that lost the lease leaves the new holder's alone
        assert lease.current(session).holder == usurper.name


def test_heartbeat_age_is_none_without_a_lease():
    assert lease.heartbeat_age(None) is None
