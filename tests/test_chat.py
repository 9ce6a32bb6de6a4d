"""Cleaning messages and fitting conversations into the token budget."""

from __future__ import annotations

import pytest

from rlhf_chat.text.chat import EmptyMessage, clean_message, prompt_text, render_prompt, trim_to_budget


@pytest.mark.parametrize("raw", ["", "   ", "\n\t", None, "\x00\x07"])
def test_empty_messages_are_refused(raw):
    with pytest.raises(EmptyMessage, match="type a message"):
        clean_message(raw, 100)


def test_long_message_is_trimmed_with_a_notice():
    cleaned = clean_message("x" * 150, 100)
    assert cleaned.text == "x" * 100
    assert "150" in cleaned.notice and "100" in cleaned.notice


def test_control_characters_removed_newlines_kept():
    assert clean_message("a\x1b[31mb\x00c\nd\te", 100).text == "a[31mbc\nd\te"


def test_invalid_utf8_is_replaced_not_crashing():
    assert clean_message(b"caf\xe9 ok", 100).text == "caf\ufffd ok"


def test_trim_drops_oldest_turns_and_keeps_the_last_question(tokenizer):
    turns = []
    for i in range(10):
        turns += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": "answer " * 20}]
    turns.append({"role": "user", "content": "the last question"})
    budget = 200
    trimmed = trim_to_budget(tokenizer, turns, budget)
    assert trimmed[-1]["content"] == "the last question"
    assert trimmed[0]["role"] == "user"
    assert len(render_prompt(tokenizer, trimmed)) <= budget
    assert len(trimmed) < len(turns)
    assert trimmed == turns[-len(trimmed):]


def test_trim_keeps_system_prompt(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}] + [{"role": "user", "content": "word " * 300}]
    assert trim_to_budget(tokenizer, msgs, 50)[0]["role"] == "system"


def test_prompt_text_is_the_last_user_message():
    msgs = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]
    assert prompt_text(msgs) == "three"


def test_rendered_prompt_ends_with_assistant_turn(tokenizer):
    ids = render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
