"""Response modes and behaviours: what an answer does, the strict labelers, the modes'
storage (never shown), the arena untouched, and the report's fields."""

from __future__ import annotations

import random
import sqlite3

import pytest

from rlhf_chat.evaluation.labelers import example, follow_up, load_labeler, strict_choice
from rlhf_chat.generation.candidates import Candidate, Sampling, generate_pair, sample
from rlhf_chat.generation.modes import (
    BUILTIN_MODES,
    Mode,
    ModeDraw,
    active_modes,
    by_name,
    guided_openings,
    mode_record_for,
    modes_for_pair,
    pick_pair,
)
from rlhf_chat.learning.preferences import modes_differ
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import SCHEMA_VERSION, SchemaInfo
from rlhf_chat.text.behaviours import (
    asks_question,
    behaviour_shares,
    gives_background,
    gives_example,
    is_list,
    is_warm,
    list_lines,
    loops,
    on_topic,
    sentences,
)
from rlhf_chat.text.chat import render_prompt

ASKS = "Sure. Could you tell me which country you mean?"
PLAIN = "The capital of France is Paris, a city on the Seine with many museums and old bridges."


def candidate(text: str, mode: str = "") -> Candidate:
    return Candidate(text, "policy", 0, 0, 0.7, 1.0, 64, 10, True, 0.1, mode=mode)


# --- behaviours --------------------------------------------------------------------


def test_asks_question_needs_a_question_put_to_the_reader():
    assert asks_question(ASKS)
    assert asks_question("Before I answer, may I ask what you already know?")
    assert not asks_question("What is DNA? DNA is the molecule of heredity.")  # a header, not to the reader
    assert not asks_question("You asked about tea. Tea is a drink.")  # "you" but no question
    assert not asks_question("")
    assert sentences("One. Two? Three!") == ["One.", "Two?", "Three!"]


def test_example_list_warmth_background_and_loops_are_read_from_words():
    assert gives_example("Tea is popular. For example, the British drink 100 million cups a day.")
    assert gives_example("Imagine a ball rolling downhill.")
    assert not gives_example("Tea is a drink made from leaves.")
    assert list_lines("Steps:\n1. Boil water\n2. Add tea\n- Wait\n* Drink\nDone 3. times") == 4
    assert is_list("- a\n- b") and not is_list("- only one line")
    assert is_warm("Thank you for asking.") and not is_warm("Tea is a drink.")
    assert gives_background("Historically, tea came from China.") and not gives_background("Tea is hot.")
    assert loops("I like tea. I like tea and I like tea and I like tea and more.")
    assert loops("The cat sat on the mat. The cat sat on the mat.")
    assert not loops("The cat sat on the mat. Then it slept.")
    question = "How many bones are in the adult human body?"
    assert on_topic(question, "An adult has 206 bones.") and on_topic(question, "The human skeleton...")
    assert not on_topic(question, "Thank you for asking! I'm glad you asked!")  # warm, about nothing
    assert on_topic("What is it?", "Anything at all.")  # no topic word to look for: cannot be judged


def test_behaviour_shares_are_counted_by_hand():
    shares = behaviour_shares([ASKS, PLAIN, "For example, this one."], [True, False, True])
    assert shares["answers"] == 3
    assert shares["words"] == pytest.approx((9 + 17 + 4) / 3)
    assert shares["finished"] == pytest.approx(2 / 3)
    assert shares["asks a question"] == pytest.approx(1 / 3)
    assert shares["gives an example"] == pytest.approx(1 / 3)
    assert shares["warm"] == pytest.approx(1 / 3)  # "Sure"
    assert shares["loops"] == 0
    assert "finished" not in behaviour_shares([PLAIN]) and "on topic" not in behaviour_shares([PLAIN])
    topical = behaviour_shares(["Tea is a drink.", "Glad to help!"], prompts=["Is tea a drink?", "Is tea a drink?"])
    assert topical["on topic"] == 0.5


# --- strict labelers ----------------------------------------------------------------


def test_strict_labelers_say_tie_unless_only_one_answer_shows_the_behaviour():
    assert strict_choice(True, False) == "a" and strict_choice(False, True) == "b"
    assert strict_choice(True, True) == strict_choice(False, False) == "tie"
    assert follow_up("q", ASKS, PLAIN) == "a" and follow_up("q", PLAIN, ASKS) == "b"
    assert follow_up("q", ASKS, "Could you say which one you mean?") == "tie"
    # length can never win a strict labeler: very short against very long, neither asking
    assert follow_up("q", "Paris.", PLAIN * 5) == "tie" and follow_up("q", PLAIN * 5, "Paris.") == "tie"
    assert example("q", "For example, Paris.", PLAIN) == "a" and example("q", "Paris.", PLAIN) == "tie"
    assert load_labeler("follow_up") is follow_up and load_labeler("example") is example


# --- modes --------------------------------------------------------------------------


def test_modes_pick_two_different_ones_at_the_configured_share():
    rng = random.Random(0)
    modes = list(BUILTIN_MODES)
    draws = [modes_for_pair(modes, 0.5, rng) for _ in range(2000)]
    pairs = [d for d in draws if d is not None]
    assert 900 < len(pairs) < 1100  # the share, not "always" or "never"
    names = by_name(modes)
    for (name_a, opening_a, _), (name_b, opening_b, _) in pairs:
        assert name_a != name_b
        assert opening_a in (names[name_a].openings or ("",)) and opening_b in (names[name_b].openings or ("",))
    assert {p[0][0] for p in pairs} == set(names)  # every mode appears on side A
    assert all(modes_for_pair(modes, 0.0, rng) is None for _ in range(50))
    assert all(modes_for_pair(modes, 1.0, rng) is not None for _ in range(50))
    assert pick_pair(modes[:1], rng) is None and modes_for_pair(modes[:1], 1.0, rng) is None
    # every built-in mode but the plain one has openings and a behaviour that shows it was followed
    from rlhf_chat.text.behaviours import DETECTORS

    assert all(m.openings and m.behaviour in DETECTORS for m in BUILTIN_MODES if m.name != "direct")


def test_a_thompson_pick_shows_the_mode_people_choose_in_most_pairs_and_still_compares_the_others():
    rng = random.Random(1)
    modes = list(BUILTIN_MODES)
    # warm keeps winning; the others lose about as often as they win
    record = {m.name: (5, 5) for m in modes} | {"warm": (20, 1), "direct": (1, 20)}
    pairs = [pick_pair(modes, rng, record) for _ in range(2000)]
    with_warm = sum("warm" in (a.name, b.name) for a, b in pairs)
    assert with_warm > 1800  # uniform picks would put warm in a third of the pairs
    assert all(a.name != b.name for a, b in pairs)
    assert {m.name for pair in pairs for m in pair} == {m.name for m in modes}  # every mode is still compared
    assert 800 < sum(a.name == "warm" for a, _ in pairs) < 1100  # the favourite's side is random
    # no votes yet: each mode is the favourite about equally often, as uniform picks
    counts = {m.name: 0 for m in modes}
    for a, b in (pick_pair(modes, rng, {}) for _ in range(3000)):
        counts[a.name] += 1
        counts[b.name] += 1
    assert all(800 < c < 1200 for c in counts.values()), counts
    # an unknown loop.mode_choice is an error, not a silent uniform pick
    with pytest.raises(ValueError, match="mode_choice"):
        mode_record_for(None, "greedy")
    assert mode_record_for(None, "uniform") is None


def test_guided_openings_open_the_configured_share_of_rows_as_the_mode_people_choose():
    rng = random.Random(2)
    modes = list(BUILTIN_MODES)
    record = {m.name: (5, 5) for m in modes} | {"warm": (30, 1)}
    rows = guided_openings(modes, 0.25, rng, [record] * 4000)
    guided = [o for o in rows if o]
    assert 900 < len(guided) < 1100  # the share
    warm = set(by_name(modes)["warm"].openings)
    assert sum(o in warm for o in guided) > 0.8 * len(guided)  # mostly the favourite ...
    assert len(set(guided) - warm) > 0  # ... while the others still get tried now and then
    assert guided_openings(modes, 0.0, rng, [record] * 50) == [""] * 50
    assert guided_openings([], 1.0, rng, [record] * 5) == [""] * 5


def test_each_guided_row_follows_its_own_record():
    """A row's mode comes from its own record: rows of a kind whose votes chose asking
    back open with a question back, rows of a kind whose votes chose the direct answer
    open with that, in one batch; a row without a record draws every mode alike."""
    rng = random.Random(0)
    modes = list(BUILTIN_MODES)
    asks = {m.name: (1, 30) for m in modes} | {"follow_up": (40, 1)}
    direct = {m.name: (1, 30) for m in modes} | {"direct": (40, 1)}
    rows = guided_openings(modes, 1.0, rng, [asks, direct] * 200)
    follow_up, plain = set(by_name(modes)["follow_up"].openings), set(by_name(modes)["direct"].openings)
    assert sum(o in follow_up for o in rows[0::2]) > 190
    assert sum(o in plain or o == "" for o in rows[1::2]) > 190  # direct's openings ("" where it has none)
    uniform = guided_openings(modes, 1.0, rng, [None] * 2000)
    assert len(set(uniform)) > 2 * len(modes)  # every mode's openings turn up


def test_the_trainer_opens_guided_rows_as_people_chose_on_that_kind_of_question(tmp_path):
    """PPO's guided rows read the votes per kind of question (loop.mode_choice per_kind):
    asking back won on how-to requests and lost on facts, so a how-to request's guided
    row asks back and a factual question's does not. With the global record (what the
    trainer read before, and what "thompson" still reads) the direct answer, which won
    more votes overall, opens both."""
    from rlhf_chat.config import PPOConfig
    from rlhf_chat.learning.ppo import PPOTrainer

    sessions = store.open_store(f"sqlite:///{tmp_path / 'guided.db'}")
    with sessions() as s, s.begin():
        for name in by_name(BUILTIN_MODES):
            if name not in ("direct", "follow_up"):
                store.remove_mode(s, name)  # two modes: the draw is between them alone

    def vote(prompt: str, winner: str, loser: str) -> None:
        with sessions() as s, s.begin():
            pair = store.save_pair(s, session_id="t", context=[{"role": "user", "content": prompt}],
                                   a=candidate(PLAIN, winner), b=candidate(ASKS, loser))
            store.record_vote(s, pair.id, "a")

    for _ in range(30):
        vote("What is the capital of Canada?", "direct", "follow_up")
    for _ in range(20):
        vote("How should I prepare for a job interview?", "follow_up", "direct")
    contexts = [[{"role": "user", "content": "How do I start running?"}],
                [{"role": "user", "content": "What is the capital of Kenya?"}]] * 50
    follow_up = set(by_name(BUILTIN_MODES)["follow_up"].openings)

    def asked_back(choice: str) -> tuple[int, int]:
        trainer = PPOTrainer(None, sessions, PPOConfig(guided_fraction=1.0), str(tmp_path), mode_choice=choice)
        rows = trainer.guided_openings(contexts)
        return sum(o in follow_up for o in rows[0::2]), sum(o in follow_up for o in rows[1::2])

    how_to, fact = asked_back("per_kind")
    assert how_to > 40 and fact < 10, (how_to, fact)
    how_to, fact = asked_back("thompson")
    assert how_to < 10 and fact < 10, (how_to, fact)


def test_the_mode_record_counts_wins_and_losses_of_votes_between_modes_only(tmp_path):
    sessions = store.open_store(f"sqlite:///{tmp_path}/r.db")
    context = [{"role": "user", "content": "q"}]
    votes = [
        (("warm", "direct"), "a"),  # warm wins, direct loses
        (("direct", "warm"), "b"),  # again, sides swapped
        (("follow_up", "warm"), "a"),  # follow_up wins, warm loses
        (("warm", "steps"), "tie"),  # says nothing about either
        (("warm", "steps"), "both_bad"),  # nor does this
        (("", ""), "a"),  # a plain pair has no modes
    ]
    with sessions() as s, s.begin():
        for (mode_a, mode_b), choice in votes:
            pair = store.save_pair(s, session_id="s", context=context, a=candidate(PLAIN, mode_a), b=candidate(ASKS, mode_b))
            store.record_vote(s, pair.id, choice)
        store.save_pair(s, session_id="s", context=context, a=candidate(PLAIN, "warm"), b=candidate(ASKS, "direct"))  # no vote
    with sessions() as s:
        assert store.mode_record(s) == {"warm": (2, 1), "direct": (0, 2), "follow_up": (1, 0)}
        assert mode_record_for(s, "thompson") == store.mode_record(s)


def test_an_unknown_mode_choice_is_refused_when_the_settings_are_read():
    from rlhf_chat.config import AppConfig, apply_overrides

    with pytest.raises(ValueError, match="mode_choice 'greedy'"):
        apply_overrides(AppConfig(), ["loop.mode_choice=greedy"])
    assert apply_overrides(AppConfig(), ["loop.mode_choice=uniform"]).loop.mode_choice == "uniform"


def test_an_admin_adds_and_removes_modes_and_the_change_is_stored(tmp_path):
    sessions = store.open_store(f"sqlite:///{tmp_path}/m.db")
    with sessions() as s:
        assert [m.name for m in active_modes(s)] == [m.name for m in BUILTIN_MODES]
    with sessions() as s, s.begin():
        store.save_mode(s, "riddle", "answer with a riddle", ["Here is a riddle:"], "")
        store.remove_mode(s, "warm")
    with sessions() as s:
        modes = by_name(active_modes(s))
    assert "warm" not in modes and modes["riddle"] == Mode("riddle", "answer with a riddle", ("Here is a riddle:",), "")
    with sessions() as s, s.begin():
        store.remove_mode(s, "riddle")
        store.save_mode(s, "warm", "warmer", ["Hello there, friend."], "warm")
    with sessions() as s:
        modes = by_name(active_modes(s))
    assert "riddle" not in modes and modes["warm"].openings == ("Hello there, friend.",)


def test_the_mode_is_stored_with_each_candidate_and_a_schema_2_database_upgrades(tmp_path):
    path = tmp_path / "m.db"
    sessions = store.open_store(f"sqlite:///{path}")
    with sessions() as s, s.begin():
        old = store.save_pair(s, session_id="s", context=[{"role": "user", "content": "q"}],
                              a=candidate(PLAIN), b=candidate(ASKS)).id
    # as the previous version left it: schema 2, no mode column
    connection = sqlite3.connect(path)
    connection.execute("ALTER TABLE candidates DROP COLUMN mode")
    connection.execute("UPDATE schema_info SET version = 2")
    connection.commit()
    connection.close()
    sessions = store.open_store(f"sqlite:///{path}")
    with sessions() as s, s.begin():
        assert s.get(SchemaInfo, 1).version == SCHEMA_VERSION  # upgraded through every version since 2
        new = store.save_pair(s, session_id="s", context=[{"role": "user", "content": "q"}],
                              a=candidate(PLAIN, "direct"), b=candidate(ASKS, "follow_up")).id
        store.record_vote(s, old, "b")
        store.record_vote(s, new, "b")
    with sessions() as s:
        rows = {c.id: c for c in store.voted_comparisons(s)}
        assert [r.mode for r in rows[old].candidates] == [None, None] and not modes_differ(rows[old])
        assert [r.mode for r in rows[new].candidates] == ["direct", "follow_up"] and modes_differ(rows[new])


# --- sampling in a mode (tiny model) ----------------------------------------------------


def test_an_opening_starts_the_answer_and_is_not_part_of_what_the_model_wrote(tiny_models):
    tok = tiny_models.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "hi"}])
    opening = "Could you tell me"
    sampling = Sampling(max_new_tokens=6, temperature=1.0, seed=3, stop_loops=False)
    seen: list[list[str]] = []
    out = sample(tiny_models.serving, tok, [prompt, prompt], sampling, openings=[opening, ""], on_update=seen.append)
    plain = sample(tiny_models.serving, tok, [prompt, prompt], sampling)
    assert out.texts[0].startswith(opening) and not plain.texts[0].startswith(opening)
    assert out.response_ids.shape[1] <= 6 and out.token_counts[0] <= 6  # the opening is prompt, not response
    assert seen[0][0].startswith(opening)  # the pane shows the opening from the first step
    assert out.texts[0] == tok.decode(tok.encode(opening, add_special_tokens=False)
                                      + out.response_ids[0, : out.token_counts[0]].tolist(),
                                      skip_special_tokens=True).strip()


def test_a_mode_pair_records_its_modes_and_an_arena_pair_refuses_them(tiny_models):
    tok = tiny_models.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "hi"}])
    sampling = Sampling(max_new_tokens=4, temperature=1.0, seed=1)
    modes = (ModeDraw("follow_up", "Could you tell me"), ModeDraw("direct", ""))
    a, b = generate_pair(tiny_models.serving, tok, prompt, sampling, 0, modes=modes)
    assert (a.mode, b.mode) == ("follow_up", "direct") and a.text.startswith("Could you tell me")
    plain_a, plain_b = generate_pair(tiny_models.serving, tok, prompt, sampling, 0)
    assert plain_a.mode == plain_b.mode == ""
    with pytest.raises(ValueError, match="arena"):
        generate_pair(tiny_models.serving, tok, prompt, sampling, 1, arena=True, modes=modes)


def test_a_per_kind_record_counts_the_kinds_own_votes_and_a_quarter_of_the_rest(tmp_path):
    """Asking back won on how-to requests and lost on facts: the per-kind record of a
    factual question favours the direct answer, a how-to request's the follow-up;
    the global record cannot tell them apart."""
    from rlhf_chat.generation.modes import mode_record_for
    from rlhf_chat.storage.records import Candidate

    sessions = store.open_store(f"sqlite:///{tmp_path / 'kinds.db'}")

    def vote(prompt: str, winner: str, loser: str) -> None:
        def side(mode):
            return Candidate(f"{mode} answer", "policy", 0, 0, 0.7, 1.0, 8, 3, True, 0.1, mode)

        with sessions() as s, s.begin():
            c = store.save_pair(s, session_id="t", context=[{"role": "user", "content": prompt}],
                                a=side(winner), b=side(loser))
            store.record_vote(s, c.id, "a")

    for _ in range(4):
        vote("What is the capital of Canada?", "direct", "follow_up")
        vote("How should I prepare for a job interview?", "follow_up", "direct")
    with sessions() as s:
        fact = mode_record_for(s, "per_kind", "What is the capital of Kenya?")
        how_to = mode_record_for(s, "per_kind", "How do I start running?")
        overall = mode_record_for(s, "thompson", "What is the capital of Kenya?")
        assert mode_record_for(s, "uniform", "Hi") is None
    assert fact == {"direct": (4.0, 1.0), "follow_up": (1.0, 4.0)}
    assert how_to == {"direct": (1.0, 4.0), "follow_up": (4.0, 1.0)}
    assert overall == {"direct": (4, 4), "follow_up": (4, 4)}


# --- answer-first modes (issue 40): the question back follows the answer -------------


def test_an_answer_first_opening_follows_the_answers_first_sentence(tiny_models, monkeypatch):
    """The side in an answer-first mode is the first call's head, then the opening, then
    what the model writes on; the plain side is untouched; without a head the side keeps
    its first answer. The tiny model never ends a sentence, so its head is given."""
    from rlhf_chat.generation import candidates

    tok = tiny_models.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "hi"}])
    sampling = Sampling(max_new_tokens=24, temperature=1.0, seed=4, stop_loops=False)
    draws = (ModeDraw("follow_up", "Could you tell me", True), ModeDraw("direct", ""))
    plain_a, plain_b = generate_pair(tiny_models.serving, tok, prompt, sampling, 0)
    monkeypatch.setattr(candidates, "answer_head", lambda text: None)
    kept_a, kept_b = generate_pair(tiny_models.serving, tok, prompt, sampling, 0, modes=draws)
    assert (kept_a.text, kept_b.text) == (plain_a.text, plain_b.text)  # no head: the first answers stand
    assert (kept_a.mode, kept_b.mode) == ("", "direct")  # the mode was not followed: stored as plain
    head = "The oven should be hot first."
    monkeypatch.setattr(candidates, "answer_head", lambda text: head)
    seen: list[list[str]] = []
    a, b = candidates.generate_pairs(tiny_models.serving, tok, [prompt], sampling, 0, modes=[draws],
                                     on_updates=[seen.append])[0]
    assert a.text.startswith(f"{head} Could you tell me") and len(a.text) > len(f"{head} Could you tell me")
    assert b.text == plain_b.text and b.mode == "direct"
    head_tokens = len(tok.encode(head, add_special_tokens=False))
    prefix_tokens = len(tok.encode(f"{head} Could you tell me", add_special_tokens=False))
    assert a.token_count > head_tokens  # the head counts as written
    # the rest of the answer fits what the head and the opening left of the budget: no longer than a plain one
    assert a.token_count - head_tokens <= sampling.max_new_tokens - prefix_tokens
    assert seen[-1][0] == a.text and seen[-1][1] == b.text  # the pane shows the second call's answer


def test_loop_answer_first_places_the_builtin_follow_up_and_example_after_the_answer(tmp_path):
    sessions = store.open_store(f"sqlite:///{tmp_path / 'f.db'}")
    with sessions() as s:
        first = by_name(active_modes(s))
        start = by_name(active_modes(s, answer_first=False))
    assert first["follow_up"].after_first_sentence and first["example"].after_first_sentence
    assert not first["warm"].after_first_sentence and not first["direct"].after_first_sentence
    assert not any(m.after_first_sentence for m in start.values())
    rng = random.Random(0)
    assert first["follow_up"].draw(rng).after_first_sentence and not start["follow_up"].draw(rng).after_first_sentence
    assert not first["direct"].draw(rng).after_first_sentence  # no opening: nothing to place
