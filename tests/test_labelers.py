"""Fast tests for the scripted labelers and the bundled prompt list."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest

from rlhf_chat.evaluation import labelers
from rlhf_chat.evaluation.labelers import (
    BUILTIN_LABELERS,
    CHOICES,
    FRIENDLY_MARKERS,
    concise,
    context,
    example,
    follow_up,
    friendliness_score,
    friendly,
    load_labeler,
    normalize_choice,
)

PROMPT = "How do I boil an egg?"


# --- concise -----------------------------------------------------------------


def test_concise_prefers_shorter_answer() -> None:
    short = "Boil it for 7 minutes."
    long = "Put the egg in boiling water, wait about seven minutes, then cool it in ice water."
    assert concise(PROMPT, short, long) == "a"
    assert concise(PROMPT, long, short) == "b"


def words(n: int) -> str:
    return " ".join(["word"] * n)


def test_concise_tie_band_is_ten_percent_of_longer() -> None:
    # 100 vs 90 words: difference is exactly 10% of the longer -> tie.
    assert concise(PROMPT, words(100), words(90)) == "tie"
    assert concise(PROMPT, words(90), words(100)) == "tie"
    # 100 vs 89: just outside the band -> the shorter one wins.
    assert concise(PROMPT, words(100), words(89)) == "b"
    assert concise(PROMPT, words(89), words(100)) == "a"
    # Identical lengths are a tie too.
    assert concise(PROMPT, "abc", "xyz") == "tie"


def test_concise_counts_words_not_characters() -> None:
    # Two answers cut at the same token limit: long words do not make one "longer".
    assert concise(PROMPT, "extraordinarily " * 10, "a " * 10) == "tie"
    assert concise(PROMPT, "   " + words(10) + "\n\n\n", words(10)) == "tie"
    assert concise(PROMPT, words(20), words(40)) == "a"


def test_concise_both_empty_is_both_bad() -> None:
    assert concise(PROMPT, "", "") == "both_bad"
    assert concise(PROMPT, "  \n\t", " ") == "both_bad"


def test_concise_never_rewards_an_empty_answer() -> None:
    assert concise(PROMPT, "", "Boil it.") == "b"
    assert concise(PROMPT, "Boil it.", "   ") == "a"


# --- friendly ----------------------------------------------------------------


def test_friendly_prefers_warmer_answer() -> None:
    cold = "Boil it for 7 minutes."
    warm = "Sure! Boil it for 7 minutes. Hope this helps!"
    assert friendly(PROMPT, cold, warm) == "b"
    assert friendly(PROMPT, warm, cold) == "a"


def test_friendly_orders_by_marker_count_not_length() -> None:
    # The shorter answer is friendlier, so friendly and concise agree here ...
    short_warm = "Glad to help, thanks!"
    long_neutral = "Place the egg in boiling water and leave it there for seven minutes."
    assert friendly(PROMPT, short_warm, long_neutral) == "a"
    # ... but a longer, warmer answer beats a shorter, less warm one.
    one = "Of course. Boil it."
    three = "Of course! Boil it for seven minutes, then cool it. Thank you for asking."
    assert friendliness_score(one) < friendliness_score(three)
    assert friendly(PROMPT, one, three) == "b"
    assert concise(PROMPT, one, three) == "a"


def test_friendly_is_case_insensitive_and_counts_every_marker() -> None:
    assert friendliness_score("PLEASE try it. THANK you. You're Welcome.") == 3
    assert friendliness_score("You\u2019re welcome") == 1  # typographic apostrophe
    assert friendliness_score("Great question!!") == 3
    for marker in FRIENDLY_MARKERS:
        assert friendliness_score(marker.upper()) >= 1, marker


def test_friendly_does_not_count_markers_inside_other_words() -> None:
    # "sure" inside "ensure"/"measure" is not politeness.
    assert friendliness_score("Ensure you measure the water.") == 0


def test_friendly_equal_counts_is_tie() -> None:
    assert friendly(PROMPT, "Boil it.", "Cook it in water.") == "tie"
    assert friendly(PROMPT, "Thanks, boil it.", "Boil it, please.") == "tie"


def test_friendly_both_empty_is_both_bad() -> None:
    assert friendly(PROMPT, "", "   ") == "both_bad"


def test_builtin_outputs_are_valid_choices() -> None:
    samples = ["", "ok", "Sure! Happy to help.", "x" * 50]
    for labeler in BUILTIN_LABELERS.values():
        for a in samples:
            for b in samples:
                assert labeler(PROMPT, a, b) in CHOICES


# --- load_labeler ------------------------------------------------------------


def test_builtin_labelers_mapping() -> None:
    assert BUILTIN_LABELERS == {
        "concise": concise, "friendly": friendly, "follow_up": follow_up, "example": example, "context": context
    }


@pytest.mark.parametrize("name", ["concise", "friendly"])
def test_load_labeler_builtin(name: str) -> None:
    assert load_labeler(name) is BUILTIN_LABELERS[name]


def test_load_labeler_import_path() -> None:
    assert load_labeler("rlhf_chat.evaluation.labelers:concise") is concise
    assert load_labeler("rlhf_chat.evaluation.labelers:friendly") is friendly


def test_load_labeler_custom_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_votes_for_test.py").write_text(
        "def always_a(prompt, a, b):\n    return 'A'\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    labeler = load_labeler("my_votes_for_test:always_a")
    assert normalize_choice(labeler(PROMPT, "x", "y")) == "a"


def test_load_labeler_unknown_name_lists_builtins() -> None:
    with pytest.raises(ValueError, match="unknown labeler 'nope'") as info:
        load_labeler("nope")
    message = str(info.value)
    assert "concise" in message and "friendly" in message
    assert "package.module:function" in message


def test_load_labeler_missing_module() -> None:
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'") as info:
        load_labeler("no_such_module_xyz:func")
    assert "concise" in str(info.value)


def test_load_labeler_module_that_fails_on_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_labeler_for_test.py").write_text(
        "raise RuntimeError('boom')\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="cannot import module.*RuntimeError: boom"):
        load_labeler("broken_labeler_for_test:f")


def test_load_labeler_missing_attribute() -> None:
    with pytest.raises(ValueError, match="has no attribute 'does_not_exist'") as info:
        load_labeler("rlhf_chat.evaluation.labelers:does_not_exist")
    assert "concise" in str(info.value)


def test_load_labeler_not_callable() -> None:
    with pytest.raises(ValueError, match="is not callable") as info:
        load_labeler("rlhf_chat.evaluation.labelers:CHOICES")
    assert "concise" in str(info.value)


@pytest.mark.parametrize("spec", [":concise", "rlhf_chat.evaluation.labelers:", ":"])
def test_load_labeler_malformed_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="malformed labeler spec"):
        load_labeler(spec)


# --- normalize_choice ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a", "a"),
        ("A", "a"),
        (" b\n", "b"),
        ("TIE", "tie"),
        ("both_bad", "both_bad"),
        ("Both Bad", "both_bad"),
        ("both-bad", "both_bad"),
        ("BOTH_BAD", "both_bad"),
    ],
)
def test_normalize_choice_accepts(raw: str, expected: str) -> None:
    assert normalize_choice(raw) == expected


@pytest.mark.parametrize("raw", ["", "c", "ab", "neither", "both", "a or b"])
def test_normalize_choice_rejects(raw: str) -> None:
    with pytest.raises(ValueError, match="expected one of: a, b, tie, both_bad"):
        normalize_choice(raw)


def test_normalize_choice_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="invalid labeler choice None"):
        normalize_choice(None)  # type: ignore[arg-type]


def test_choices_constant() -> None:
    assert CHOICES == ("a", "b", "tie", "both_bad")
    assert labelers.Choice.__args__ == CHOICES  # type: ignore[attr-defined]


# --- prompts.txt ---------------------------------------------------------------


def test_prompts_file_has_enough_unique_lines() -> None:
    resource = importlib.resources.files("rlhf_chat") / "data" / "prompts.txt"
    text = resource.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert all(line.strip() for line in lines), "prompts.txt must have no blank lines"
    assert len(set(lines)) == len(lines), "prompts.txt must have no duplicates"
    assert len(set(lines)) >= 250
    assert text.isascii()
