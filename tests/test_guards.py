"""The guards against a few bad actors (learning/guards.py) and the tripwire
(learning/tripwire.py): bounded influence, agreement flags, exclusions, checks
on written answers, and the loop pausing itself on a scripted drop."""

from __future__ import annotations

import random
import time

import pytest
from sqlalchemy import select

from rlhf_chat.config import AppConfig, GuardConfig
from rlhf_chat.evaluation import labelers
from rlhf_chat.generation.candidates import Candidate
from rlhf_chat.learning import guards, training_loop, tripwire
from rlhf_chat.learning.consensus import vote_features
from rlhf_chat.learning.export import demonstration_rows, preference_rows
from rlhf_chat.learning.guards import (
    Feedback,
    GuardRules,
    Vote,
    agreement_table,
    cap_factors,
    cap_level,
    feedback_weights,
    influence_factors,
    wilson_interval,
    written_answer_problems,
)
from rlhf_chat.learning.reward import guarded_pairs
from rlhf_chat.learning.supervised import chosen_answers, demonstrated_answers
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import TrainingEvent

# --- the arithmetic, by hand ---------------------------------------------------------------


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 3.8416/20) / 1.38416 = 0.71676;
    # half 1.96 sqrt(0.016 + 3.8416/400) / 1.38416 = 0.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_the_cap_level_solves_its_equation():
    # 10, 10, 80 at share 0.5: L = 0.5 (10 + 10 + L) -> L = 20
    assert cap_level([10, 10, 80], 0.5) == pytest.approx(20.0)
    # 5 x 10 and 50 at share 0.2: L = 0.2 (50 + L) -> L = 12.5
    assert cap_level([10] * 5 + [50], 0.2) == pytest.approx(12.5)
    # nobody above the share: the largest amount, no cap
    assert cap_level([30, 30, 40], 0.5) == 40
    # two contributors can each hold a half, whatever the share asks: never an empty round
    assert cap_level([10, 90], 0.1) == pytest.approx(10.0)
    assert cap_level([100], 0.1) == 100  # one person alone still teaches the model


def test_cap_factors_bring_every_share_within_the_bound():
    amounts = {"a": 3.0, "b": 5.0, "c": 7.0, "d": 60.0, "e": 25.0}
    factors = cap_factors(amounts, 0.25)
    capped = {k: v * factors[k] for k, v in amounts.items()}
    total = sum(capped.values())
    assert all(v <= 0.25 * total + 1e-9 for v in capped.values())
    assert factors["a"] == factors["b"] == factors["c"] == 1.0  # the small ones untouched
    assert capped["d"] == pytest.approx(capped["e"])  # both capped at the one level


def test_influence_is_capped_by_session_and_by_client():
    # four sessions of 10; sessions s3 and s4 come from one address, which would hold half
    items = [Feedback(i, f"s{i % 4 + 1}", "shared" if i % 4 >= 2 else f"c{i % 4}") for i in range(40)]
    factors = influence_factors(items, share=0.3)
    by_client: dict[str, float] = {}
    for item, f in zip(items, factors):
        by_client[item.client] = by_client.get(item.client, 0.0) + f
    total = sum(factors)
    # three clients: each may hold max(0.3, 1/3) of the total; "shared" had 20 of 40
    assert by_client["shared"] == pytest.approx(total / 3)
    assert by_client["shared"] == pytest.approx(10.0)
    assert factors[0] == factors[1] == 1.0


# --- agreement with the others: who votes against the crowd ----------------------------------
# Synthetic votes on pairs of answers of random lengths: an honest crowd voting as the
# concise labeler does (the shorter answer; a tie within 10%), and a bad actor.

WORDS = [f"word{k}" for k in range(40)]


def answer_of(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def crowd_votes(rng: random.Random, voters: list[tuple[str, str, str, int]], noise: float = 0.0):
    """Rows (session, client, prompt, a, b, choice): each voter (session, client, taste, n)
    votes n times on fresh pairs. Tastes: ``concise``, ``noisy`` (concise with ``noise`` of
    its decided votes flipped at random, as AlpacaFarm's noisy annotators), ``longer``,
    ``reversed`` (concise's decided votes flipped). Ties stay ties."""
    flip = {"a": "b", "b": "a"}
    rows = []
    for session, client, taste, n in voters:
        for i in range(n):
            prompt = f"{session} asks question {i}?"
            words = rng.randint(8, 50)  # two answers of similar lengths, as two samples of one policy are
            a, b = answer_of(words, rng), answer_of(max(1, round(words * rng.uniform(0.8, 1.25))), rng)
            choice = labelers.longer(prompt, a, b) if taste == "longer" else labelers.concise(prompt, a, b)
            if taste == "reversed" or (taste == "noisy" and rng.random() < noise):
                choice = flip.get(choice, choice)
            rows.append((session, client, prompt, a, b, choice))
    return rows


def as_votes(rows) -> list[Vote]:
    """The decided rows as the guards see them, with their consensus features."""
    return [
        Vote(i, session, client, prompt, False, None, None,
             vote_features(prompt, *((a, b) if choice == "a" else (b, a))))
        for i, (session, client, prompt, a, b, choice) in enumerate(rows) if choice in ("a", "b")
    ]


def honest_crowd(people: int, each: int, taste: str = "concise") -> list[tuple[str, str, str, int]]:
    return [(f"person{k}", f"addr{k}", taste, each) for k in range(people)]


def test_a_reversed_labeler_is_flagged_and_weighs_nothing_noisy_honest_people_are_not():
    rows = crowd_votes(random.Random(0), honest_crowd(8, 40, "noisy") + [("bad", "addr-bad", "reversed", 80)],
                       noise=0.25)
    votes = as_votes(rows)
    table = agreement_table(votes, {}, set(), GuardRules(min_votes=10, flag_below=0.5, flagged_weight=0.0))
    bad = table[("session", "bad")]
    assert bad.flagged and bad.weight == 0.0 and bad.consensus_agreement < 0.2
    assert "consensus" in bad.reasons[0] and table[("client", "addr-bad")].flagged
    for k in range(8):  # 25% of their decided votes flipped: about 0.75 agreement, never flagged
        person = table[("session", f"person{k}")]
        assert not person.flagged and person.consensus_scored >= 10 and person.consensus_agreement > 0.5
    # the flag reaches training: the bad actor's feedback weighs nothing
    items = [Feedback(v.comparison_id, v.session, v.client) for v in votes]
    weights = feedback_weights(items, table, share=1.0)
    assert all(w == 0 for v, w in zip(votes, weights) if v.session == "bad")
    assert all(w == 1 for v, w in zip(votes, weights) if v.session != "bad")


def test_an_always_longer_voter_is_flagged_and_the_honest_crowd_that_ties_often_is_not():
    """Issue 41's case: the adversary is decisive, the honest people tie whenever the
    lengths are close. Nobody honest is flagged, the adversary is."""
    rows = crowd_votes(random.Random(1), honest_crowd(20, 7) + [("longer", "addr-longer", "longer", 60)])
    ties = sum(r[-1] == "tie" for r in rows if r[0] != "longer")
    assert ties > 40  # the honest people do tie often (about half their votes)
    table = agreement_table(as_votes(rows), {}, set(), GuardRules())
    assert table[("session", "longer")].flagged and table[("client", "addr-longer")].flagged
    assert not any(c.flagged for (kind, key), c in table.items() if "longer" not in key)


def test_ten_sessions_behind_one_address_do_not_vouch_for_each_other():
    """The adversary's sessions share an address: each is judged against a consensus
    without all of them, and the address is flagged as well as every session."""
    bad = [(f"tab{j}", "one-address", "longer", 12) for j in range(10)]
    rows = crowd_votes(random.Random(2), honest_crowd(20, 14) + bad)
    table = agreement_table(as_votes(rows), {}, set(), GuardRules())
    assert table[("client", "one-address")].flagged
    assert sum(table[("session", f"tab{j}")].flagged for j in range(10)) >= 8  # 12 votes each: some few scored
    assert not any(c.flagged for (kind, key), c in table.items() if key.startswith(("person", "addr")))


def test_ties_are_never_disagreement_and_one_person_alone_is_never_flagged():
    rows = crowd_votes(random.Random(3), [("alone", "addr", "longer", 60)])
    table = agreement_table(as_votes(rows), {}, set(), GuardRules())
    assert not table[("session", "alone")].flagged  # nobody else: no consensus to disagree with
    assert table[("session", "alone")].consensus_scored == 0
    # a tie-only contributor beside a crowd: a contributor, never scored, never flagged
    crowd = as_votes(crowd_votes(random.Random(4), honest_crowd(10, 20)))
    table = agreement_table(crowd, {}, set(), GuardRules(), ties=[("tier", "addr-tier")] * 40)
    assert table[("session", "tier")].ties == 40 and not table[("session", "tier")].flagged
    assert table[("session", "tier")].consensus_scored == 0


def test_few_votes_are_never_flagged():
    rows = crowd_votes(random.Random(5), honest_crowd(10, 20) + [("bad", "addr-bad", "reversed", 9)])
    table = agreement_table(as_votes(rows), {}, set(), GuardRules(min_votes=10))
    assert table[("session", "bad")].votes < 10 and not table[("session", "bad")].flagged


def test_majority_agreement_on_shared_arena_prompts_flags_the_odd_one_out():
    votes = []
    for i in range(24):  # three sessions agree the policy wins each prompt; "odd" always says it loses
        for session in ("p1", "p2", "p3"):
            votes.append(Vote(len(votes), session, "", f"q{i}", True, True, None))
        votes.append(Vote(len(votes), "odd", "", f"q{i}", True, False, None))
    table = agreement_table(votes, {}, set(), GuardRules(min_votes=10))
    assert table[("session", "odd")].flagged and table[("session", "odd")].majority_agreement == 0.0
    assert table[("session", "p1")].majority_agreement == 1.0 and not table[("session", "p1")].flagged


# --- written answers -------------------------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ("Write to me at someone@example.com for more.", "e-mail"),
    ("See https://bad.example/x for the answer.", "link"),
    ("Visit www.example.org today.", "link"),
    ("Call +1 (555) 123-4567 now.", "phone"),
    ("", "shorter"),
])
def test_written_answers_with_contact_details_or_links_are_held_back(text, problem):
    assert any(problem in p for p in written_answer_problems(text, 2, 2000))


def test_an_ordinary_written_answer_passes():
    assert written_answer_problems("Photosynthesis turns light, water and CO2 into sugar and oxygen.", 2, 2000) == []
    assert written_answer_problems("It takes 3 to 4 days, about 72 hours.", 2, 2000) == []


# --- on the store ------------------------------------------------------------------------------


def candidate(text: str, source: str = "policy") -> Candidate:
    return Candidate(text, source, 1, 0, 0.7, 1.0, 64, len(text.split()), True, 0.1)


def add_vote(sessions, session_id: str, client: str, choice: str = "a", prompt: str = "Hi?") -> int:
    with sessions() as session, session.begin():
        comparison = store.save_pair(
            session, session_id=session_id, context=[{"role": "user", "content": prompt}],
            a=candidate(f"answer A for {prompt}"), b=candidate(f"answer B for {prompt}"), client=client,
        )
        assert store.record_vote(session, comparison.id, choice).ok
        return comparison.id


def add_written(sessions, session_id: str, text: str, prompt: str = "Hi?") -> int:
    with sessions() as session, session.begin():
        comparison = store.save_pair(
            session, session_id=session_id, context=[{"role": "user", "content": prompt}],
            a=candidate("one"), b=candidate("two"),
        )
        assert store.add_demonstration(session, comparison.id, session_id, text).ok
        return comparison.id


@pytest.fixture
def sessions(tmp_path):
    return store.open_store(f"sqlite:///{tmp_path / 'guards.db'}")


def test_the_influence_cap_holds_in_a_reward_rounds_pairs(sessions):
    for i in range(40):
        add_vote(sessions, "flood", "client-flood", prompt=f"f{i}")
    for person in range(6):
        for i in range(5):
            add_vote(sessions, f"person{person}", f"client{person}", prompt=f"p{person}-{i}")
    cfg = GuardConfig(max_share=0.1)
    with sessions() as session:
        pairs, _ = guarded_pairs(session, cfg, 1.0)
        owner = {c.id: c.session_id for c in store.voted_comparisons(session)}
    total = sum(p.weight for p in pairs)
    flood = sum(p.weight for p in pairs if owner[p.comparison_id] == "flood")
    # 7 contributors: the bound is max(0.1, 1/7) of the round's weight
    assert flood <= total / 7 + 1e-9
    assert flood < 40 and all(p.weight == 1.0 for p in pairs if owner[p.comparison_id] != "flood")
    with sessions() as session:  # the votes themselves are untouched
        assert store.count_votes(session, ("a", "b")) == 70
    with sessions() as session:
        off, _ = guarded_pairs(session, GuardConfig(enabled=False), 1.0)
    assert sum(p.weight for p in off) == 70


def test_excluded_votes_leave_training_but_stay_in_the_database_and_the_export(sessions):
    kept = [add_vote(sessions, "honest", "c1", prompt=f"h{i}") for i in range(5)]
    dropped = [add_vote(sessions, "troll", "c2", prompt=f"t{i}") for i in range(5)]
    with sessions() as session, session.begin():
        assert store.add_exclusion(session, "session", "troll", "voted nonsense")
        assert not store.add_exclusion(session, "session", "troll")
    with sessions() as session:
        pairs, _ = guarded_pairs(session, GuardConfig(), 1.0)
        examples = chosen_answers(session, 100, trust=guards.assess_feedback(session, GuardConfig()))
        assert {p.comparison_id for p in pairs} == set(kept)
        assert len(examples) == 5
        assert store.count_votes(session, ("a", "b")) == 10
        rows, _ = preference_rows(session)
    marked = {r["comparison_id"]: r["excluded"] for r in rows}
    assert all(marked[i] for i in dropped) and not any(marked[i] for i in kept)
    with sessions() as session:  # even with the guards off, an admin's exclusion holds
        off, _ = guarded_pairs(session, GuardConfig(enabled=False), 1.0)
    assert {p.comparison_id for p in off} == set(kept)
    with sessions() as session, session.begin():
        assert store.remove_exclusion(session, "session", "troll")
    with sessions() as session:
        back, _ = guarded_pairs(session, GuardConfig(), 1.0)
    assert len(back) == 10


def test_an_exclusion_reaches_the_ties_of_somebody_who_only_ties(sessions):
    kept = [add_vote(sessions, "honest", "c1", prompt=f"h{i}") for i in range(5)]
    ties = [add_vote(sessions, "tier", "c2", choice="tie", prompt=f"t{i}") for i in range(5)]
    with sessions() as session:
        before, _ = guarded_pairs(session, GuardConfig(), 1.0, 1.0)
    assert {p.comparison_id for p in before} == set(kept + ties)
    for kind, key in (("client", "c2"), ("session", "tier")):  # either exclusion is enough
        with sessions() as session, session.begin():
            assert store.add_exclusion(session, kind, key, "ties everything")
        with sessions() as session:
            after, _ = guarded_pairs(session, GuardConfig(), 1.0, 1.0)
        assert {p.comparison_id for p in after} == set(kept)
        with sessions() as session, session.begin():
            assert store.remove_exclusion(session, kind, key)
    with sessions() as session:  # and the admin's table shows who ties
        table = guards.assess_feedback(session, GuardConfig(), tie_weight=1.0).contributors
    assert [table.get(who) and table[who].ties for who in (("session", "tier"), ("client", "c2"))] == [5, 5]


def test_written_answers_with_an_address_or_a_link_are_never_trained_on(sessions):
    good = add_written(sessions, "s1", "Plants make sugar from light.", prompt="plants?")
    mail = add_written(sessions, "s2", "Mail me: troll@example.com", prompt="mail?")
    link = add_written(sessions, "s3", "Read http://spam.example now", prompt="link?")
    copy_a = add_written(sessions, "s4", "Buy cheap watches today", prompt="x?")
    copy_b = add_written(sessions, "s5", "buy cheap  watches today", prompt="y?")
    cfg = GuardConfig()
    with sessions() as session:
        pairs, _ = guarded_pairs(session, cfg, 1.0)
        trust = guards.assess_feedback(session, cfg)
        examples = demonstrated_answers(session, 100, 1.0, trust)
        rows = demonstration_rows(session)
    assert {p.comparison_id for p in pairs} == {good}
    assert [e.text for e in examples] == ["Plants make sugar from light."]
    held = {r["comparison_id"]: r["held_back"] for r in rows}
    assert held[good] == [] and "holds an e-mail address" in held[mail] and "holds a link" in held[link]
    assert "another session wrote the same text" in held[copy_a] and held[copy_b]
    assert len(rows) == 5  # all kept for the admin


# --- the tripwire --------------------------------------------------------------------------------


def add_arena_votes(sessions, n: int, policy_wins: int, version: int) -> None:
    for i in range(n):
        with sessions() as session, session.begin():
            policy, reference = candidate(f"policy answer {i}"), candidate(f"reference answer {i}", "reference")
            policy.policy_version = version
            comparison = store.save_pair(session, session_id=f"judge{i % 5}", context=[{"role": "user", "content": f"q{i}"}],
                                         a=policy, b=reference, arena=True)
            store.record_vote(session, comparison.id, "a" if i < policy_wins else "b")


def test_the_arena_trip_needs_enough_votes_and_a_significant_drop(sessions):
    add_arena_votes(sessions, 12, policy_wins=2, version=5)
    with sessions() as session:
        assert tripwire.arena_trip(session, 20) is None  # 12 votes: too few
    add_arena_votes(sessions, 12, policy_wins=3, version=6)
    with sessions() as session:
        trip = tripwire.arena_trip(session, 20)
        assert trip is not None and "preferred the starting model" in trip.reason
        assert trip.roll_back_to == 0  # no checkpoint before v5: the starting model
        assert tripwire.arena_trip(session, 20, after_version=6) is None  # seen at a resume


def test_an_even_arena_does_not_trip(sessions):
    add_arena_votes(sessions, 30, policy_wins=13, version=3)
    with sessions() as session:
        assert tripwire.arena_trip(session, 20) is None


def test_the_tripwire_pauses_the_live_loop_rolls_back_and_keeps_serving(tiny_config):
    """A scripted drop in the arena: the loop pauses itself, the policy goes back to the
    last checkpoint before the evidence, and people still get answers."""
    from rlhf_chat.generation.candidates import Sampling, generate_pair
    from rlhf_chat.generation.worker import CHAT
    from rlhf_chat.runtime import start_services
    from rlhf_chat.text.chat import render_prompt

    cfg: AppConfig = tiny_config
    cfg.loop.min_votes = 10_000  # no training of its own: only the tripwire acts
    services = start_services(cfg)
    try:
        assert services.worker.ready.wait(120)
        loop = services.loop
        # a checkpoint v2 exists (as PPO saves them); then v4 and v5 lose the arena
        loop.ppo.save(2)
        add_arena_votes(services.sessions, 24, policy_wins=2, version=4)
        trip = loop.check_tripwire()
        assert trip is not None and trip.roll_back_to == 2
        assert loop.paused and "tripwire" in loop.status.detail
        deadline = time.monotonic() + 60
        while services.worker.serving_version <= 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # the rollback's event is written after the new version is live
        with services.sessions() as session:
            events = [e.message for e in session.scalars(select(TrainingEvent))]
        assert any("training paused" in m for m in events)
        assert any("Rolled back to v2" in m for m in events), events
        assert loop.paused  # the rollback did not resume training: an admin does

        def chat(models):
            prompt = render_prompt(models.tokenizer, [{"role": "user", "content": "Still there?"}])
            return generate_pair(models.serving, models.tokenizer, prompt, Sampling(4, 1.0, seed=1), 0)

        a, b = services.worker.call(CHAT, chat)
        assert a.token_count > 0 and b.token_count > 0
        loop.resume()  # the admin resumes: the evidence already acted on does not trip again
        assert loop.check_tripwire() is None
    finally:
        services.stop()


def add_pair_vote(sessions, session_id: str, client: str, prompt: str, a: str, b: str, choice: str) -> int:
    with sessions() as session, session.begin():
        comparison = store.save_pair(session, session_id=session_id, context=[{"role": "user", "content": prompt}],
                                     a=candidate(a), b=candidate(b), client=client)
        assert store.record_vote(session, comparison.id, choice).ok
        return comparison.id


def store_rows(sessions, rows) -> dict[int, tuple]:
    return {add_pair_vote(sessions, *row): row for row in rows}


def test_the_stored_flag_trusts_the_crowd_not_a_captured_reward_model(sessions):
    """Issue 41 in the store: an always-longer adversary, decisive; honest people who tie
    often; and ``rm_agrees`` as the first reward model, fitted mostly on the adversary's
    decided votes, scored them: it prefers the longer answer. Judged against that model
    the honest people disagree and the adversary agrees (the old, circular flag would
    flag them and keep it); judged against the others' consensus, only the adversary is."""
    rows = store_rows(sessions, crowd_votes(random.Random(6), honest_crowd(5, 30) + [("longer", "addr-longer", "longer", 60)]))
    with sessions() as session, session.begin():
        captured = {i: len(a.split()) > len(b.split()) if choice == "a" else len(b.split()) > len(a.split())
                    for i, (_, _, _, a, b, choice) in rows.items() if choice in ("a", "b")}
        store.set_rm_agreement(session, captured)
    with sessions() as session:
        trust = guards.assess_feedback(session, GuardConfig())
        pairs, _ = guarded_pairs(session, GuardConfig(), 1.0)
        off, _ = guarded_pairs(session, GuardConfig(enabled=False), 1.0)
        assert [c.choice for c in store.voted_comparisons(session)] == [r[-1] for r in rows.values()]  # none altered
    table = trust.contributors
    for k in range(5):
        person = table[("session", f"person{k}")]
        assert not person.flagged and person.weight == 1.0
        assert person.rm_agreement < 0.1 and person.rm_scored >= 10  # what the circular flag would have acted on
    adversary = table[("session", "longer")]
    assert adversary.flagged and table[("client", "addr-longer")].flagged and adversary.rm_agreement > 0.9
    assert {rows[p.comparison_id][0] for p in pairs} == {f"person{k}" for k in range(5)}
    assert len(off) == len(captured)  # with the guards off everything trains


def add_reward_round(sessions, version: int) -> None:
    """A reward checkpoint as a round publishes it: trained on every vote so far."""
    with sessions() as session, session.begin():
        through = max(c.id for c in store.voted_comparisons(session))
        store.add_checkpoint(session, "reward", version, f"reward-v{version}", {"trained_through": through})


def test_the_tripwire_pauses_when_the_flags_silence_most_of_the_feedback(sessions):
    """Three always-longer sessions from three addresses outnumber the one honest person
    who casts most of the votes: the others' consensus is theirs, and the honest person
    is flagged. Most of the feedback is then silenced: the loop must pause and say so."""
    rows = crowd_votes(random.Random(7), [("honest", "addr-h", "concise", 80)]
                       + [(f"long{j}", f"addr-l{j}", "longer", 15) for j in range(3)])
    store_rows(sessions, rows)
    add_reward_round(sessions, 1)
    cfg = AppConfig()
    cfg.store.db_url = str(sessions.kw["bind"].url)
    with sessions() as session:
        trust = guards.assess_feedback(session, cfg.guards, tie_weight=cfg.reward.tie_weight)
        assert trust.contributors[("session", "honest")].flagged  # captured: no agreement rule escapes a majority
        share, flagged = tripwire.silenced_by_flags(trust)
        assert share > 0.5 and flagged == ["client:addr-h", "session:honest"]
        trip = training_loop.tripwire_trip(session, cfg)  # as the live loop and the simulation ask it
        assert trip is not None and "silenced" in trip.reason and "session:honest" in trip.reason
        assert trip.roll_back_to is None  # the policy did not learn from that round yet
        assert tripwire.check(session, cfg.guards, after_reward=1) is None  # an admin saw it and resumed
        cfg.guards.tripwire_silenced_share = 0  # off
        assert tripwire.trust_verdict(tripwire.trust_shift(session, cfg.guards, 10**6, None, 1.0, 1.0),
                                      cfg.guards, 1) is None


def test_a_flagged_adversary_at_30_percent_does_not_trip_the_tripwire(sessions):
    rows = crowd_votes(random.Random(8), honest_crowd(10, 14) + [("longer", "addr-longer", "longer", 60)])
    store_rows(sessions, rows)
    add_reward_round(sessions, 1)
    with sessions() as session:
        assert guards.assess_feedback(session, GuardConfig()).contributors[("session", "longer")].flagged
        assert tripwire.check(session, GuardConfig()) is None


def test_the_tripwire_pauses_when_contributors_the_last_round_did_not_trust_carry_the_next(sessions):
    store_rows(sessions, crowd_votes(random.Random(9), honest_crowd(6, 10)))
    add_reward_round(sessions, 1)
    with sessions() as session:
        assert tripwire.check(session, GuardConfig()) is None  # a first round: everybody is new
    store_rows(sessions, crowd_votes(random.Random(10), [("newcomer", "addr-n", "concise", 10)]))
    add_reward_round(sessions, 2)
    with sessions() as session:
        shift = tripwire.trust_shift(session, GuardConfig(), 10**6, 60, 1.0, 1.0)
        assert shift.newly_trusted_share == pytest.approx(10 / 70) and shift.newly_trusted == [
            "client:addr-n", "session:newcomer"]
        assert tripwire.check(session, GuardConfig()) is None  # ordinary traffic: one newcomer
    store_rows(sessions, crowd_votes(random.Random(11), [(f"wave{j}", f"addr-w{j}", "concise", 10) for j in range(8)]))
    add_reward_round(sessions, 3)
    with sessions() as session:
        trip = tripwire.check(session, GuardConfig())
        assert trip is not None and "did not trust" in trip.reason and "53%" in trip.reason
        small = GuardConfig(tripwire_min_weight=1000)  # the previous round too small to compare with
        assert tripwire.trust_shift(session, small, 10**6, 70, 1.0, 1.0).newly_trusted_share is None


def test_a_reward_round_scores_only_the_votes_no_round_trained_on(tiny_config):
    """Round 1 has no model to score with; round 2 scores exactly the votes that came after round 1."""
    from rlhf_chat.generation.worker import ModelWorker
    from rlhf_chat.learning.reward import run_round
    from rlhf_chat.model.loading import load_models

    sessions = store.open_store(tiny_config.store.db_url)
    first = [add_vote(sessions, "s", "", prompt=f"first {i}") for i in range(12)]
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        assert run_round(worker, sessions, tiny_config.reward, tiny_config.store.checkpoint_dir) is not None
        later = [add_vote(sessions, "s", "", "b", prompt=f"later {i}") for i in range(6)]
        assert run_round(worker, sessions, tiny_config.reward, tiny_config.store.checkpoint_dir) is not None
    finally:
        worker.stop()
    with sessions() as session:
        scored = {c.id: c.rm_agrees for c in store.voted_comparisons(session)}
        latest = store.latest_checkpoint(session, "reward")
    assert all(scored[i] is None for i in first)
    assert all(scored[i] is not None for i in later)
    assert latest.extra["trained_through"] == max(later)


def test_the_tax_trip_rolls_back_a_policy_that_forgets_what_the_starting_model_knew(sessions):
    """tripwire.tax_trip reads the tax stored with the newest measured checkpoint: NLL past
    its bound or facts dropped past theirs trips it (through check, with the config's
    bounds), back to the checkpoint before; within both, or seen at a resume, it does not."""
    from rlhf_chat.config import GuardConfig

    ref = {"facts": 0.5, "nll": 2.4, "content": 0.9, "asks_instead": 0.0}

    def save(version: int, **policy) -> None:
        with sessions() as session, session.begin():
            store.add_checkpoint(session, "policy", version, f"/ckpt/{version}",
                                 {"tax": {**ref, **policy}, "tax_reference": ref})

    save(5, nll=2.5, facts=0.45)
    with sessions() as session:
        assert tripwire.tax_trip(session, 0.3, 0.25) is None  # within both bounds
    save(10, nll=2.8, facts=0.45)
    with sessions() as session:
        trip = tripwire.check(session, GuardConfig())
        assert trip is not None and "v10 is forgetting" in trip.reason and "0.40 nats" in trip.reason
        assert trip.roll_back_to == 5
        assert tripwire.tax_trip(session, 0.0, 0.25) is None  # the NLL test off
        assert tripwire.tax_trip(session, 0.3, 0.25, after_version=10) is None  # seen at a resume
    save(15, nll=2.45, facts=0.19)
    with sessions() as session:
        trip = tripwire.tax_trip(session, 0.3, 0.25)
        assert trip is not None and "facts in 31% fewer answers" in trip.reason and trip.roll_back_to == 10
