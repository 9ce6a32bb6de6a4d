"""The alignment tax's measures and the ``context`` labeler: the answer key, the
content measure, question kinds (text/questions.py), the tax of a policy
(learning/tax.py) and the labeler that wants the right kind of answer per question."""

from __future__ import annotations

import doctest
import json

import pytest
import torch

from rlhf_chat.config import ModelConfig
from rlhf_chat.evaluation.labelers import context
from rlhf_chat.generation.candidates import Sampling
from rlhf_chat.learning import tax as tax_module
from rlhf_chat.learning.tax import answers_nll, measure_tax, pick_fact_questions
from rlhf_chat.model.loading import POLICY, load_models, sync_policy_weights
from rlhf_chat.text import questions
from rlhf_chat.text.questions import (
    CONCEPT,
    FACT,
    HOW_TO,
    gives_content,
    load_fact_key,
    load_reference_answers,
    question_kind,
    shipped_fact_key,
    states_fact,
)

# Answers quoted in issue 40 from final policies that "learned" a taste by dropping the
# answer: none of them says anything, and the content measure must fail every one.
ECHOES = [
    ("What is the capital of Australia?", "Could you tell me a bit more about Australia?"),
    ("What is the capital of Egypt?", "May I ask what your answer is?"),
    ("How do tides work?", "Hugging Maybes"),
    ("How do tides work?", "Tides!"),
    ("What is the square root of 2?", "1.411."),
    ("What is Hugging Face?", "*smol-hugging-face*"),
    ("What is the capital of Australia?",
     "Could you tell me a bit more about Australia? undersc underscnamed underscsystem"),
    ("What is the capital of Kenya?", "Thank you for asking! I'm glad you asked!"),
]
# Answers that say something, short and long, from the starting model and by hand.
ANSWERS = [
    ("What is the capital of Australia?", "Canberra."),
    ("What is the capital of Kenya?", "Let me give you an example. The capital of Kenya is Nairobi."),
    ("How do tides work?", "The Moon's gravity pulls on the oceans, which makes the water rise and fall."),
    ("What is the capital of Australia?", "Could you tell me which Australia you mean? The capital is Canberra."),
    ("Explain recursion.", "Imagine a set of nesting dolls: each one holds a smaller one, until the last."),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean."),
]


def test_the_module_examples_hold():
    assert doctest.testmod(questions).failed == 0


@pytest.mark.parametrize(("prompt", "answer"), ECHOES)
def test_an_echo_or_a_canned_phrase_is_not_content(prompt, answer):
    assert not gives_content(prompt, answer)


@pytest.mark.parametrize(("prompt", "answer"), ANSWERS)
def test_an_answer_that_says_something_is_content(prompt, answer):
    assert gives_content(prompt, answer)


def test_a_fact_is_found_as_a_whole_word_in_any_accepted_form():
    assert states_fact("It has seven days.", ["7", "seven"]) and states_fact("It has 7 days.", ["7", "seven"])
    assert not states_fact("It has 17 days.", ["7", "seven"])  # not inside another number
    assert not states_fact("Version 1.7 is out.", ["7", "seven"])  # nor after a decimal point
    assert states_fact("Washington, D.C. is the capital.", ["washington, d.c."])
    assert states_fact("There are 10,080 minutes in a week.", ["10080"])


def test_the_shipped_key_and_answers_load_and_a_wrong_shape_is_refused(tmp_path):
    key = shipped_fact_key()
    assert len({tuple(v) for v in key.values()}) >= 50 and len(key) >= 150  # 50+ facts, several phrasings
    assert all(a == a.lower() for accepted in key.values() for a in accepted)
    pairs = load_reference_answers()
    assert len(pairs) >= 50 and all(len(a.split()) >= 8 for _, a in pairs)
    bad = tmp_path / "bad.json"
    for shape in ([["q", "a"]], {"q": "a"}, {"q": []}, {}):
        bad.write_text(json.dumps(shape))
        with pytest.raises(ValueError, match="expected a JSON object"):
            load_fact_key(bad)
    bad.write_text(json.dumps({"q": ["a"]}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_reference_answers(bad)
    good = tmp_path / "key.json"
    good.write_text(json.dumps({"Who wrote Hamlet? ": ["Shakespeare"]}))
    assert load_fact_key(good) == {"Who wrote Hamlet?": ["shakespeare"]}


def test_question_kinds_come_from_the_key_the_shipped_lists_and_then_rules():
    assert question_kind("What is the capital of Canada?") == FACT
    assert question_kind("Who wrote Hamlet?", {"Who wrote Hamlet?": ["shakespeare"]}) == FACT
    assert question_kind("How should I prepare for a job interview?") == HOW_TO
    assert question_kind("How do I choose a good mattress?") == HOW_TO  # not shipped: a rule
    assert question_kind("What is entropy?") == CONCEPT
    assert question_kind("Write a haiku about rain.") is None


def test_pick_fact_questions_takes_one_phrasing_per_fact():
    key = {"A?": ["x"], "A again?": ["x"], "B?": ["y"], "C?": ["z"]}
    picked = pick_fact_questions(key, 0, seed=1)
    assert len(picked) == 3 and len({tuple(key[q]) for q in picked}) == 3
    assert pick_fact_questions(key, 2, seed=1) == picked[:2]


# --- the context labeler -----------------------------------------------------------------


def test_context_wants_the_fact_for_a_factual_question():
    q = "What is the capital of Australia?"
    assert context(q, "The capital of Australia is Canberra.", "Could you tell me a bit more about Australia?") == "a"
    assert context(q, "Let me give you an example. Sydney is big.", "It is Canberra.") == "b"
    assert context(q, "Canberra.", "Canberra is the capital, a planned city.") == "tie"  # length never wins
    assert context(q, "Sydney.", "Could you tell me more?") == "tie"  # neither states it


def test_context_wants_a_question_back_on_topic_for_a_request_that_depends_on_the_person():
    q = "How should I prepare for a job interview?"
    ask = "What kind of job is the interview for, and what worries you most?"
    assert context(q, "Practise common answers and research the company.", ask) == "b"
    assert context(q, ask, "Could you tell me more about yourself?") == "a"  # off topic: not a question back
    assert context(q, "Research the company.", "Dress well and arrive early.") == "tie"


def test_context_wants_an_example_on_topic_for_an_idea():
    q = "What is inflation?"
    example = "Inflation is rising prices: for example, a loaf that cost $2 last year costs $2.20 now."
    assert context(q, "Inflation is when prices rise over time.", example) == "b"
    assert context(q, "For example, imagine a cat.", "Prices rise.") == "tie"  # the example is off topic
    assert context("Tell me a joke.", example, "Why did the chicken cross the road?") == "tie"  # no kind: a tie


# --- the tax on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_path):
    return load_models(ModelConfig(name=str(tiny_path)))


KEY = {"What is the capital of Australia?": ["canberra"], "What is the capital of Kenya?": ["nairobi"]}
WELL_FORMED = [("What is rain?", "Rain is water that falls from clouds when droplets grow heavy enough.")]


def test_a_policy_equal_to_the_reference_shows_no_tax(models):
    """The policy adapter starts at zero: the same answers word for word, the same NLL."""
    tax = measure_tax(models, KEY, WELL_FORMED, Sampling(8, 0.7, seed=2), fact_questions=2, per_question=2,
                      content_prompts=["What is rain?"])
    assert tax.policy == tax.reference
    assert tax.fact_questions == 2 and tax.fact_answers == 4 and tax.nll_answers == 1


def test_a_policy_that_answers_with_a_canned_question_shows_the_loss(models, monkeypatch):
    """The policy's rows stubbed to a canned question back, the reference's to the fact:
    facts and content fall to zero, and every factual answer asks instead."""
    real = tax_module.sample

    def stubbed(model, tok, rows, sampling, adapter_names, **kwargs):
        out = real(model, tok, rows, sampling, adapter_names=adapter_names, **kwargs)
        canned = adapter_names[0] == "policy"
        texts = ["Could you tell me a bit more about that?" if canned else "It is Canberra, or Nairobi." for _ in rows]
        out.texts = texts
        return out

    monkeypatch.setattr(tax_module, "sample", stubbed)
    tax = measure_tax(models, KEY, WELL_FORMED, Sampling(4, 0.7, seed=2), fact_questions=2, per_question=1)
    assert tax.reference.facts == 1.0 and tax.reference.content == 1.0 and tax.reference.asks_instead == 0.0
    assert tax.policy.facts == 0.0 and tax.policy.content == 0.0 and tax.policy.asks_instead == 1.0


def test_the_nll_reads_the_policy_with_its_adapter_and_the_reference_without(models):
    before = answers_nll(models, WELL_FORMED, reference=True)
    assert answers_nll(models, WELL_FORMED, reference=False) == pytest.approx(before, abs=1e-6)
    saved = {n: p.clone() for n, p in models.trainer.named_parameters() if "lora_B" in n and f".{POLICY}." in n}
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for name, param in models.trainer.named_parameters():
                if name in saved:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        assert answers_nll(models, WELL_FORMED, reference=True) == pytest.approx(before, abs=1e-6)
        assert abs(answers_nll(models, WELL_FORMED, reference=False) - before) > 1e-2
    finally:
        with torch.no_grad():
            for name, param in models.trainer.named_parameters():
                if name in saved:
                    param.copy_(saved[name])
        sync_policy_weights(models.trainer, models.serving)


def test_the_nll_in_chunks_is_the_mean_over_every_answer_token(models, monkeypatch):
    """answers_nll runs NLL_CHUNK answers a forward (the whole set at once peaked at
    2 GB); chunks of one give the same per-token mean as one batch of all."""
    import rlhf_chat.learning.tax as tax_module

    answers = WELL_FORMED + [("Who wrote Hamlet?", "Shakespeare."), ("What is two and two?", "Two and two make four.")]
    monkeypatch.setattr(tax_module, "NLL_CHUNK", 100)
    whole = answers_nll(models, answers, reference=True)
    monkeypatch.setattr(tax_module, "NLL_CHUNK", 1)
    one_by_one = answers_nll(models, answers, reference=True)
    means = [answers_nll(models, [a], reference=True) for a in answers]
    assert one_by_one == pytest.approx(whole, rel=1e-4)
    assert max(means) - min(means) > 0.1  # unequal answers: a mean of the three means would differ
    assert whole != pytest.approx(sum(means) / 3, rel=1e-3)
