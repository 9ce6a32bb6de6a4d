"""Scripted teachers: stand-ins for people who write the answer they wanted.

A teacher is ``(prompt, response_a, response_b) -> str | None``: the answer it
would have written beside the pair, or None to vote instead (the labeler
does). The simulation (``--teacher``) stores its answers as the UI stores a
written answer, up to ``simulation.demonstrations`` of them, so the effect of
a few written answers on what the policy learns can be measured without
people.

The built-in ``follow_up`` teacher writes what the strict ``follow_up``
labeler wants and the bundled model rarely samples: a short answer that ends
by asking the person something about their question.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from rlhf_chat.evaluation.labelers import load_callable
from rlhf_chat.text.behaviours import asks_question, sentences

Teacher = Callable[[str, str, str], "str | None"]

FOLLOW_UPS = (
    "What would you like to use it for?",
    "Could you tell me a bit more about what you need, so I can be more specific?",
    "Is there a part of this you would like me to explain further?",
    "What do you already know about it, so I can pitch my answer right?",
)


def follow_up(prompt: str, response_a: str, response_b: str) -> str | None:
    """The shorter answer's first sentence, then a question back to the person; None
    (vote instead) when either answer already asks one: then a vote says it."""
    if asks_question(response_a) or asks_question(response_b):
        return None
    shorter = min((response_a, response_b), key=len)
    first = next(iter(sentences(shorter)), "").strip()
    first = first if first.endswith((".", "!")) else (first + "." if first else "Good question.")
    question = FOLLOW_UPS[sum(map(ord, prompt)) % len(FOLLOW_UPS)]  # stable per prompt, varied across prompts
    return re.sub(r"\s+", " ", f"{first} {question}").strip()


BUILTIN_TEACHERS: dict[str, Teacher] = {"follow_up": follow_up}


def load_teacher(spec: str) -> Teacher:
    """A built-in teacher's name or ``package.module:function`` (``labelers.load_callable``)."""
    return load_callable(spec, BUILTIN_TEACHERS, "teacher")
