"""The chat handlers end to end on the tiny model: message, two candidates, vote, database."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from rlhf_chat.runtime import start_services
from rlhf_chat.serving.handlers import (
    CUT_LABEL,
    CUT_MARK,
    ChatState,
    continue_answer,
    new_conversation,
    regenerate,
    respond,
    vote,
)
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import Comparison, Message

OUT_CHATBOT, OUT_A, OUT_B, OUT_NOTICE, OUT_TEXTBOX = 0, 1, 2, 3, 4
OUT_VOTE_A, OUT_REGEN, OUT_CONTINUE, OUT_STATE = 5, 9, 10, 11


@pytest.fixture
def services(tiny_config):
    services = start_services(tiny_config, train=False)
    assert services.worker.ready.wait(120)
    yield services
    services.worker.stop()


def last(updates):
    updates = list(updates)
    assert updates, "a handler must yield at least once"
    return updates, updates[-1]


def send(services, text, state=None):
    return last(respond(services, text, state))


def test_message_gives_two_streamed_candidates_and_vote_is_stored(services, monkeypatch):
    from rlhf_chat.generation.candidates import RowStreamer

    real_put = RowStreamer.put

    def slow_put(self, value):  # a decoding step as slow as the bundled model's, so the UI sees it
        real_put(self, value)
        time.sleep(0.03)

    monkeypatch.setattr(RowStreamer, "put", slow_put)
    updates, final = send(services, "What is a good breakfast?")
    state = final[OUT_STATE]
    assert state.phase == "vote" and state.pair_id is not None
    assert final[OUT_A]["value"] == state.pair[0] and final[OUT_B]["value"] == state.pair[1]
    assert final[OUT_VOTE_A]["interactive"] is True
    # while writing, the vote buttons are off and the input is closed
    assert updates[0][OUT_VOTE_A]["interactive"] is False and updates[0][OUT_TEXTBOX]["interactive"] is False
    assert updates[0][OUT_TEXTBOX]["value"] == ""  # the message is stored, so the box may clear
    # the panes fill while the answers are written: partial text before the whole
    partial = [u[OUT_A]["value"] for u in updates[:-1] if u[OUT_A]["value"]]
    assert partial and len(partial[0]) < len(final[OUT_A]["value"]) and partial[0] != final[OUT_A]["value"]

    shown = state.pair
    after = vote(services, "b", "clearly better", state)
    assert "Recorded" in after[OUT_NOTICE]
    with services.sessions() as s:
        row = s.scalars(select(Comparison)).one()
        assert (row.choice, row.strength) == ("b", "clearly")
        assert (row.response_a, row.response_b) == shown and all(shown)
        assert row.context[-1] == {"role": "user", "content": "What is a good breakfast?"}
        assert {c.side for c in row.candidates} == {"a", "b"}
        msgs = s.scalars(select(Message).order_by(Message.position)).all()
        assert [m.role for m in msgs] == ["user", "assistant"]
        assert msgs[-1].content == shown[1]  # the chosen answer (B) continues the conversation
    assert after[OUT_STATE].history[-1]["role"] == "assistant"
    assert after[OUT_STATE].phase == "chat"


def test_double_vote_and_stale_vote_refused(services):
    import copy

    _, final = send(services, "Tell me a joke.")
    state = final[OUT_STATE]
    second_tab = copy.deepcopy(state)  # the same pair, open in another tab: the UI's phase still says "vote"
    vote(services, "a", None, state)
    again = vote(services, "b", None, second_tab)
    assert "already has your vote" in again[OUT_NOTICE]  # refused by the store, not by the UI
    assert second_tab.phase == "vote" and len(second_tab.history) == 1  # nothing continued in that tab
    with services.sessions() as s:
        assert store.count_votes(s) == 1 and s.scalars(select(Comparison)).one().choice == "a"
        assert [m.role for m in s.scalars(select(Message).order_by(Message.position))] == ["user", "assistant"]

    _, final = send(services, "Another one?", state)
    state = final[OUT_STATE]
    stale = state.pair_id
    _, final = last(regenerate(services, state))
    state = final[OUT_STATE]
    assert state.pair_id != stale
    refused = vote(services, "a", None, state, pair_id=stale)
    assert "no longer current" in refused[OUT_NOTICE]
    after_tie = vote(services, "tie", None, state)[OUT_STATE]
    with services.sessions() as s:
        current = s.scalars(select(Comparison).order_by(Comparison.id.desc())).first()
        assert current.choice == "tie"
        assert after_tie.history[-1] == {"role": "assistant", "content": current.response_a}  # a tie continues with A
        stored = s.scalars(select(Message).order_by(Message.position.desc())).first()
        assert stored.content == current.response_a


def test_empty_message_refused_and_kept(services):
    _, final = send(services, "   ")
    assert "type a message" in final[OUT_NOTICE]
    assert "value" not in final[OUT_TEXTBOX]  # nothing the person typed is wiped
    with services.sessions() as s:
        assert s.scalars(select(Message)).first() is None


def test_long_message_trimmed_with_notice(services):
    text = "word " * 1000
    _, final = send(services, text)
    assert "only the first" in final[OUT_NOTICE]
    assert len(final[OUT_STATE].history[0]["content"]) == services.config.sampling.max_message_chars


def test_both_bad_asks_for_regenerate(services):
    _, final = send(services, "Hi")
    after = vote(services, "both_bad", None, final[OUT_STATE])
    state = after[OUT_STATE]
    assert state.phase == "regenerate" and "Regenerate" in after[OUT_NOTICE]
    assert after[OUT_REGEN]["interactive"] is True and after[OUT_VOTE_A]["interactive"] is False
    blocked = list(respond(services, "ignored", state))[-1]
    assert "vote" in blocked[OUT_NOTICE].lower()
    _, final = last(regenerate(services, state))
    assert final[OUT_STATE].phase == "vote"


def test_sessions_are_separate(services):
    _, one = send(services, "first person")
    _, two = send(services, "second person")
    s1, s2 = one[OUT_STATE], two[OUT_STATE]
    assert s1.session_id != s2.session_id and s1.conversation_id != s2.conversation_id
    refused = vote(services, "a", None, s2, pair_id=s1.pair_id)
    assert not refused[OUT_NOTICE].startswith("Recorded")


def test_new_conversation_resets(services):
    _, final = send(services, "Hi")
    fresh = new_conversation(services, final[OUT_STATE])[OUT_STATE]
    assert fresh.history == [] and fresh.pair_id is None and fresh.session_id == final[OUT_STATE].session_id


def test_database_down_is_told_and_nothing_is_lost(services, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from rlhf_chat.serving import handlers

    _, final = send(services, "Hello there")
    state = final[OUT_STATE]

    def down(fn, *args, **kwargs):
        raise OperationalError("UPDATE comparisons", {}, Exception("database is locked"))

    monkeypatch.setattr(handlers.store, "with_retry", down)
    refused = vote(services, "a", None, state)
    assert "not saved" in refused[OUT_NOTICE] and refused[OUT_STATE].phase == "vote"
    blocked = list(respond(services, "x", ChatState()))[-1]
    assert "not sent" in blocked[OUT_NOTICE] and "value" not in blocked[OUT_TEXTBOX]
    monkeypatch.undo()
    assert vote(services, "a", None, state)[OUT_NOTICE].startswith("Recorded")  # the retry works


def test_votes_beyond_the_per_minute_limit_are_refused_and_not_stored(services):
    services.config.ui.votes_per_minute = 3
    state = None
    for i in range(3):
        _, final = send(services, f"question {i}?", state)
        state = final[OUT_STATE]
        assert "Recorded" in vote(services, "a", None, state)[OUT_NOTICE]
    _, final = send(services, "one more?", state)
    state = final[OUT_STATE]
    refused = vote(services, "a", None, state)
    assert "voting very fast" in refused[OUT_NOTICE] and state.phase == "vote"  # the pair stays open
    with services.sessions() as s:
        assert store.count_votes(s) == 3


def test_a_cut_off_answer_is_marked_and_continues_into_the_conversation(services, monkeypatch):
    """At 12 tokens the tiny model's answers are cut off: both panes say so; the chosen
    one is marked in the conversation, and Continue streams on and stores the longer
    answer, which the next message's context then holds."""
    import rlhf_chat.generation.candidates as candidates

    _, final = send(services, "Tell me about the sea.")
    state = final[OUT_STATE]
    assert state.pair_finished == (False, False)  # 12 tokens: no answer of the random model ends
    assert final[OUT_A]["label"] == "Response A" + CUT_LABEL and final[OUT_B]["label"] == "Response B" + CUT_LABEL
    assert final[OUT_CONTINUE]["interactive"] is False  # nothing chosen yet
    after = vote(services, "b", None, state)
    state = after[OUT_STATE]
    chosen = state.history[-1]["content"]
    assert after[OUT_CHATBOT][-1]["content"] == chosen + CUT_MARK and "Continue" in after[OUT_NOTICE]
    assert after[OUT_CONTINUE]["interactive"] is True

    seen: list[list[int]] = []
    real_sample = candidates.sample

    def watched(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real_sample(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr("rlhf_chat.serving.handlers.sample", watched)
    updates, done = last(continue_answer(services, state))
    state = done[OUT_STATE]
    longer = state.history[-1]["content"]
    assert longer.startswith(chosen) and len(longer) > len(chosen)
    tok = services.worker.call(0, lambda m: m.tokenizer)
    assert tok.decode(seen[0]).endswith(chosen)  # it writes on from the answer itself, in its turn
    assert tok.eos_token_id not in seen[0][-len(tok.encode(chosen)):]
    assert any(u[OUT_CONTINUE]["interactive"] is False for u in updates[:-1])  # off while writing
    with services.sessions() as s:
        stored = s.scalars(select(Message).order_by(Message.position)).all()
        assert [m.role for m in stored] == ["user", "assistant"] and stored[-1].content == longer
    if state.cut_turns:  # cut off again at 12 more tokens: marked, and can go on
        assert done[OUT_CHATBOT][-1]["content"] == longer + CUT_MARK and done[OUT_CONTINUE]["interactive"] is True
    _, final = send(services, "And the mountains?", state)
    with services.sessions() as s:
        row = s.scalars(select(Comparison).order_by(Comparison.id.desc())).first()
        assert row.context[-2] == {"role": "assistant", "content": longer}


def test_continue_is_refused_without_a_cut_off_answer(services):
    assert "no cut-off answer" in last(continue_answer(services, ChatState()))[1][OUT_NOTICE]
    _, final = send(services, "Hello?")
    state = final[OUT_STATE]
    assert "no cut-off answer" in last(continue_answer(services, state))[1][OUT_NOTICE]  # still voting
    state.pair_finished = (True, True)  # as if A had ended on its own
    after = vote(services, "a", None, state)
    assert after[OUT_CONTINUE]["interactive"] is False and after[OUT_CHATBOT][-1]["content"] == state.history[-1]["content"]
    assert "no cut-off answer" in last(continue_answer(services, after[OUT_STATE]))[1][OUT_NOTICE]


def test_mode_pairs_store_their_modes_never_show_them_and_arena_pairs_have_none(services):
    """A mode pair: the answers start with their modes' openings, the modes are stored
    with the candidates, and nothing the person sees names a mode. Arena pairs stay plain."""
    from rlhf_chat.generation.modes import BUILTIN_MODES, by_name

    services.config.loop.mode_fraction = 1.0
    services.config.loop.answer_first = False  # every opening starts its answer (answer-first: test below)
    names = by_name(BUILTIN_MODES)
    seen_modes = set()
    for k in range(4):
        updates, final = send(services, f"Question number {k}?")
        state = final[OUT_STATE]
        with services.sessions() as s:
            row = s.get(Comparison, state.pair_id)
            modes = [c.mode for c in row.candidates]
        assert modes[0] != modes[1] and set(modes) <= set(names)
        seen_modes |= set(modes)
        for side, mode in zip((OUT_A, OUT_B), modes):
            openings = names[mode].openings
            assert not openings or any(final[side]["value"].startswith(o.strip()) for o in openings)
        shown = repr([u[:OUT_STATE] for u in updates])  # every pane, label, notice and button the person saw
        assert not any(f"'{m}'" in shown or f"({m})" in shown for m in modes)
        vote(services, "tie", None, state)
    assert len(seen_modes) > 2
    # arena pairs (policy against reference) never get modes, even at mode_fraction 1
    services.config.loop.arena_fraction = 1.0
    services.worker.call(0, lambda m: setattr(m, "serving_version", 1))  # as after a PPO step
    _, final = send(services, "An arena question?")
    with services.sessions() as s:
        row = s.get(Comparison, final[OUT_STATE].pair_id)
        assert row.arena and [c.mode or "" for c in row.candidates] == ["", ""]


def test_with_answer_first_the_ui_puts_the_question_back_after_the_answers_first_sentence(services, monkeypatch):
    """loop.answer_first reaches the chat: a follow-up side is the answer's first
    sentence, then the opening (the tiny model never ends a sentence: its head is given)."""
    from rlhf_chat.generation import candidates
    from rlhf_chat.generation.modes import BUILTIN_MODES, by_name

    head = "Here is the short answer first."
    monkeypatch.setattr(candidates, "answer_head", lambda text: head)
    services.config.loop.mode_fraction = 1.0
    openings = by_name(BUILTIN_MODES)["follow_up"].openings
    for k in range(12):
        _, final = send(services, f"How should I plan week {k}?")
        state = final[OUT_STATE]
        with services.sessions() as s:
            modes = [c.mode for c in s.get(Comparison, state.pair_id).candidates]
        vote(services, "tie", None, state)
        if "follow_up" in modes:
            text = final[(OUT_A, OUT_B)[modes.index("follow_up")]]["value"]
            assert any(text.startswith(f"{head} {o}") for o in openings), text
            return
    raise AssertionError("no follow-up side in 12 mode pairs")
