"""Questions: what kind of answer a question calls for, the answer key of factual
questions, and whether an answer says something at all.

Three measures read from words alone, so that a learned taste can be weighed
against what it costs (the "alignment tax", InstructGPT section 3.5):

* :func:`states_fact`: an answer to a factual question names an accepted answer
  from the shipped key (``data/facts.json``: 109 facts, three phrasings each);
* :func:`gives_content`: an answer says something the question did not, in a
  sentence that is not a question: an echo of the topic ("Could you tell me a
  bit more about Australia?"), a bare exclamation ("Tides!") or a string of
  made-up words fails it;
* :func:`question_kind`: which kind of answer a person wants (the seed's list):
  the fact for a factual question, a question back about their situation for a
  request that depends on it, an example for an abstract idea.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from functools import lru_cache
from pathlib import Path

from rlhf_chat.text.behaviours import FRIENDLY_MARKERS, sentences, topic_words

FACT, HOW_TO, CONCEPT = "fact", "how_to", "concept"
KINDS = (FACT, HOW_TO, CONCEPT)


def _data(name: str) -> str:
    return (importlib.resources.files("rlhf_chat") / "data" / name).read_text(encoding="utf-8")


def load_fact_key(path: str | Path | None = None) -> dict[str, list[str]]:
    """The answer key: question -> accepted answers (lowercase words or numbers). The
    shipped one, or a JSON file ``{"question": ["accepted", ...]}`` (``--fact-key``).
    Raises ValueError with the reason for a file of another shape."""
    text = Path(path).read_text(encoding="utf-8") if path else _data("facts.json")
    key = json.loads(text)
    if not isinstance(key, dict) or not key or not all(
        isinstance(q, str) and isinstance(a, list) and a and all(isinstance(x, str) and x.strip() for x in a)
        for q, a in key.items()
    ):
        raise ValueError(f"{path or 'facts.json'}: expected a JSON object {{\"question\": [\"accepted\", ...]}}")
    return {q.strip(): [a.strip().lower() for a in accepted] for q, accepted in key.items()}


@lru_cache(maxsize=1)
def shipped_fact_key() -> dict[str, list[str]]:
    """The shipped answer key, read once."""
    return load_fact_key()


def load_reference_answers(path: str | Path | None = None) -> list[tuple[str, str]]:
    """Well-formed answers, as (question, answer) pairs: the shipped set of 60, or a
    JSON file ``[["question", "answer"], ...]`` (``--reference-answers``)."""
    text = Path(path).read_text(encoding="utf-8") if path else _data("reference_answers.json")
    pairs = json.loads(text)
    if not isinstance(pairs, list) or not pairs or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) and x.strip() for x in p) for p in pairs
    ):
        raise ValueError(f"{path or 'reference_answers.json'}: expected a JSON list [[\"question\", \"answer\"], ...]")
    return [(q.strip(), a.strip()) for q, a in pairs]


def _normalise(text: str) -> str:
    """Lowercase, typographic apostrophes folded, thousands separators dropped ("1,440" -> "1440")."""
    text = text.lower().replace("\u2019", "'")
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def states_fact(answer: str, accepted: list[str]) -> bool:
    """Whether ``answer`` names one of the ``accepted`` answers, as a whole word or phrase.

    >>> states_fact("The capital of Australia is Canberra.", ["canberra"])
    True
    >>> states_fact("There are 1,440 minutes in a day.", ["1440"])
    True
    >>> states_fact("Could you tell me a bit more about Australia?", ["canberra"])
    False
    >>> states_fact("A week has seventy days.", ["seven", "7"])
    False
    """
    text = _normalise(answer)
    return any(re.search(r"(?<![\w.])" + re.escape(_normalise(a)) + r"(?![\w])", text) for a in accepted)


# Words that carry no content of their own: the warm markers, and what an answer
# says about answering ("let me give you an example", "happy to help").
_FILLER = frozenset(
    w[:4] for w in re.findall(r"[a-z]+", " ".join(FRIENDLY_MARKERS) + """
    thanks asking asked question questions help helpful happy glad great sure certainly course welcome
    example instance imagine tell little more details detail know like love share explain information answer
    maybe perhaps hello okay well really something someone""")
)
# Function words: a sentence of English almost always has one; a string of made-up
# or glued words ("undersc underscnamed underscsystem") has none.
_FUNCTION = frozenset("""
a an the is are was were be been being am of to in on at by for with from as and or but not no it its this that
these those there here can could will would should may might must has have had do does did you your we our they
their he she his her i my me than then so if about into over after before
""".split())


def _new_words(sentence: str, asked: set[str]) -> set[str]:
    """The sentence's topic words (:func:`behaviours.topic_words`) the question did not
    use, less filler."""
    return {w for w in topic_words(sentence) if w not in asked and w not in _FILLER}


def gives_content(prompt: str, text: str) -> bool:
    """Whether the answer says something: a sentence that is not a question, with a
    topic word the question did not use (not filler), written as English (with a
    function word such as "is", "the", "of"), or a bare answer of one or two words
    with no filler in it ("Canberra.") when that is the whole answer.

    Validated on the answers quoted in issue 40 and on the starting model's (see
    tests/test_questions.py):

    >>> gives_content("What is the capital of Australia?", "Could you tell me a bit more about Australia?")
    False
    >>> gives_content("What is the capital of Australia?", "Canberra is the capital of Australia.")
    True
    >>> gives_content("How do tides work?", "Tides!")
    False
    >>> gives_content("What is the capital of Australia?", "Canberra.")
    True
    >>> gives_content("What is 2+2?", "Could you tell me a bit more? undersc underscnamed underscsystem")
    False
    """
    asked = topic_words(prompt)
    parts = sentences(text)
    for part in parts:
        if part.endswith("?"):
            continue
        words = re.findall(r"[a-z']+", part.lower())
        if not _new_words(part, asked):
            continue
        if any(w in _FUNCTION for w in words):
            return True
        bare = len(parts) == 1 and 1 <= len(words) <= 2  # "Canberra.", but not "Hugging Maybes"
        if bare and not any(w[:4] in _FILLER for w in words):
            return True
    return False


@lru_cache(maxsize=4)
def _shipped_kinds() -> dict[str, str]:
    """prompt -> kind for the shipped prompts (``data/question_kinds.json``)."""
    lists = json.loads(_data("question_kinds.json"))
    return {prompt: kind for kind in KINDS for prompt in lists.get(kind, [])}


# Rules for prompts outside the shipped lists: how-to requests that depend on the
# person (their plans, their situation), and questions about an idea.
_HOW_TO = re.compile(
    r"^(how (do|can|should) i\b|what should i\b|should i\b|which .* should i\b|help me\b|can you help me\b|"
    r"i want to\b|i need to\b|i'm trying to\b|any tips\b|what .* (do you )?recommend)", re.IGNORECASE)
_CONCEPT = re.compile(
    r"^(what (is|are) (a |an |the )?\w+( \w+)?\??$|explain\b|how does\b|how do \w+ work|what does .* mean|"
    r"what is the difference between)", re.IGNORECASE)


def question_kind(prompt: str, fact_key: dict[str, list[str]] | None = None) -> str | None:
    """Which kind of answer ``prompt`` calls for: :data:`FACT` (it is in the answer
    key), :data:`HOW_TO` (a request that depends on the person's situation),
    :data:`CONCEPT` (an abstract idea, where an example helps), or None.

    The shipped prompts have their kind listed (``data/question_kinds.json``, read by
    a person); others are judged by the key, then by a few opening phrases.

    >>> question_kind("What is the capital of Australia?")
    'fact'
    >>> question_kind("How should I prepare for a job interview?")
    'how_to'
    >>> question_kind("Explain recursion.")
    'concept'
    >>> question_kind("Tell me a joke.") is None
    True
    """
    prompt = prompt.strip()
    key = shipped_fact_key() if fact_key is None else fact_key
    if prompt in key:
        return FACT
    if prompt in _shipped_kinds():
        return _shipped_kinds()[prompt]
    if _HOW_TO.search(prompt):
        return HOW_TO
    if _CONCEPT.search(prompt):
        return CONCEPT
    return None
