"""Behaviours: what an answer does, read from its text as a person would see it.

One detector per behaviour a person might prefer (the seed's list and a few
more): asks the reader a question, gives an example, writes list lines, sounds
warm, repeats itself. The simulation reports their shares per round, the
Training tab shows them for the policy against the reference, the strict
labelers vote on them, and ``bench/modes.py`` measures how often each response
mode is followed. The detectors only read words, never lengths, so a
behaviour's share cannot rise because answers got shorter or longer.
"""

from __future__ import annotations

import re
from typing import Callable

# Words and punctuation that make an answer read as warm and polite.  Matching
# is case-insensitive and each marker must start at a word boundary, so "sure"
# is not counted inside "ensure" or "measure", while stems such as "thank"
# still catch "thanks" and "thank you".  Every occurrence counts, so an answer
# that says "thanks" twice beats one that says it once: the simulated person
# responds to how much warmth there is, not merely whether there is any.
FRIENDLY_MARKERS: tuple[str, ...] = (
    "please",
    "thank",
    "glad",
    "happy to",
    "hope this helps",
    "great question",
    "!",
    "sure",
    "of course",
    "you're welcome",
)


def _marker_pattern(marker: str) -> str:
    """Regex for one marker: anchored at a word boundary when it starts with a letter."""
    escaped = re.escape(marker)
    # "\b" only makes sense before a word character; "!" must match anywhere.
    return r"\b" + escaped if marker[:1].isalnum() else escaped


_FRIENDLY_RE = re.compile(
    "|".join(_marker_pattern(m) for m in FRIENDLY_MARKERS), re.IGNORECASE
)


def friendliness_score(text: str) -> int:
    """Count the warmth/politeness markers (``FRIENDLY_MARKERS``) in ``text``."""
    # Typographic apostrophes are common in generated text; fold them so
    # "you’re welcome" counts the same as "you're welcome".
    return len(_FRIENDLY_RE.findall(text.replace("\u2019", "'")))



# Second-person words: a question that contains one is put to the reader
# ("could you tell me ...?"), not a rhetorical header ("What is DNA?").
_YOU = re.compile(r"\b(you|your|you're|yours)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"[^.!?\n]*[.!?\n]?")
_EXAMPLE = re.compile(r"\b(for example|for instance|e\.g\.|example|imagine|let's say|say you)\b", re.IGNORECASE)
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+\S", re.MULTILINE)
_BACKGROUND = re.compile(
    r"\b(background|history|historically|in general|generally|originally|dates back|the idea|the concept)\b",
    re.IGNORECASE,
)


def sentences(text: str) -> list[str]:
    """The sentences of a text, each with its closing mark ('.', '!', '?' or a line end)."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


# A sentence's end: a closing mark before white space or the end, not after a digit
# (a list's "1.") or in "e.g." / "i.e."; or a line end after a closing mark. A line
# that ends in ":" introduces what follows (a list, the answer itself): not an end.
_SENTENCE_END = re.compile(r"(?<![0-9])(?<!\be\.g)(?<!\bi\.e)[.!?](?=\s|$)")


def answer_head(text: str, min_words: int = 5, max_words: int = 40) -> str | None:
    r"""The answer's opening sentences, up to the first sentence end once they hold
    ``min_words`` words ("Sure!" alone is not yet an answer); None when no sentence
    ends within ``max_words`` words. Where an answer-first mode (``modes.py``) puts its
    opening, so that the question back or the example follows the answer instead of
    replacing it.

    >>> answer_head("Canberra is the capital of Australia. It is inland.")
    'Canberra is the capital of Australia.'
    >>> answer_head("Sure! To roast vegetables, heat the oven to 220 C. Then cut them.")
    'Sure! To roast vegetables, heat the oven to 220 C.'
    >>> answer_head("Pi is about 3.14 and it never ends") is None
    True
    >>> answer_head("Here is how to roast them:\n1. Heat the oven to 220 C.\n2. Cut them.")
    'Here is how to roast them:\n1. Heat the oven to 220 C.'
    >>> answer_head("Many cities, e.g. Canberra, were planned. They grew.")
    'Many cities, e.g. Canberra, were planned.'
    """
    for end in _SENTENCE_END.finditer(text):
        head = text[: end.end()].strip()
        words = len(head.split())
        if words > max_words:
            return None
        if words >= min_words:
            return head
    return None


def asks_question(text: str) -> bool:
    """Whether the answer asks the reader something: a sentence ending in '?' that says "you".

    >>> asks_question("What is DNA? DNA is a molecule.")
    False
    >>> asks_question("Happy to help. Could you tell me which city you mean?")
    True
    """
    return any(s.endswith("?") and _YOU.search(s) for s in sentences(text))


def gives_example(text: str) -> bool:
    """Whether the answer illustrates with an example ("for example", "imagine", "e.g.")."""
    return bool(_EXAMPLE.search(text))


def list_lines(text: str) -> int:
    """How many lines start as list items ("- ", "* ", "1. ", "2) ")."""
    return len(_LIST_LINE.findall(text))


def is_list(text: str) -> bool:
    """Whether the answer is laid out as a list: at least two list lines."""
    return list_lines(text) >= 2


def is_warm(text: str) -> bool:
    """Whether the answer has any of the warmth markers the ``friendly`` labeler counts."""
    return friendliness_score(text) > 0


def gives_background(text: str) -> bool:
    """Whether the answer sets the question in a wider frame (background, history, "in general")."""
    return bool(_BACKGROUND.search(text))


def loops(text: str) -> bool:
    """Whether an answer repeats itself, judged on its words: some run of four
    words occurs three times, or some sentence of four or more words twice.

    Independent of the token rule that stops rows (``repetition.py``): it also
    sees repeats that are not back to back ("I'm trying to ... I'm trying to ...").
    """
    words = re.findall(r"[a-z0-9']+", text.lower())
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if any(grams.count(g) >= 3 for g in set(grams)):
        return True
    parts = [s.strip() for s in re.split(r"[.!?\n]+", text.lower()) if len(s.split()) >= 4]
    return len(parts) != len(set(parts))


# Words too common to say what a question is about (four letters or more: shorter
# words are never topic words).
_COMMON = frozenset("""
about above after again also always among another answer anyone anything around because been before being below
best between both came come could does doing done down during each either else even ever every from give gives
have having here into just keep know like long made make makes many more most much must need never often only
other over same should some such tell than that their them then there these they thing things this those through
very want what when where which while will with without would your yours
""".split())


def topic_words(text: str) -> set[str]:
    """The words of four letters or more that are not common words, each cut to its
    first four letters, so that "sleeping" meets "sleep" and "bones" meets "bone"."""
    return {w[:4] for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4 and w not in _COMMON}


def on_topic(prompt: str, text: str) -> bool:
    """Whether the answer mentions what the question is about: it shares a topic word
    with it (:func:`topic_words`); a question without one cannot be judged, and counts.

    Crude on purpose, and independent of every labeler: an answer that is only a
    canned phrase ("Thank you for asking!") fails it, and the starting model's
    answers pass it 99% of the time (72 held-out prompts).

    >>> on_topic("What is the capital of Australia?", "Canberra is Australia's capital.")
    True
    >>> on_topic("What is the capital of Australia?", "Thank you for asking! I'm glad you asked!")
    False
    """
    words = topic_words(prompt)
    return not words or bool(words & topic_words(text))


# name -> detector; the order is the order reports and the Training tab show them in.
DETECTORS: dict[str, Callable[[str], bool]] = {
    "asks a question": asks_question,
    "gives an example": gives_example,
    "list lines": is_list,
    "warm": is_warm,
    "background": gives_background,
    "loops": loops,
}


ON_TOPIC = "on topic"  # the share that needs each answer's question (:func:`on_topic`)


def behaviour_shares(
    texts: list[str], finished: list[bool] | None = None, prompts: list[str] | None = None
) -> dict[str, float]:
    """Mean words, finished share and each detector's share over some answers.

    ``finished`` (whether each answer ended on its own) comes from the sampler,
    not the text; left out, the report has no finished share. With ``prompts``
    (each answer's question) the shares also say how many answers are
    :func:`on_topic`: what a labeler that only counts words cannot see.
    """
    n = max(1, len(texts))
    shares: dict[str, float] = {"answers": len(texts), "words": sum(len(t.split()) for t in texts) / n}
    if finished is not None:
        shares["finished"] = sum(bool(f) for f in finished) / n
    for name, detect in DETECTORS.items():
        shares[name] = sum(bool(detect(t)) for t in texts) / n
    if prompts is not None:
        shares[ON_TOPIC] = sum(on_topic(p, t) for p, t in zip(prompts, texts)) / n
    return shares
