"""Repetition: stopping an answer that has fallen into a loop.

A small model at a moderate temperature sometimes repeats a phrase until the
length limit ("Canberra is Canberra is Canberra is ..."). Such a tail carries
nothing for the reader and nothing for the vote. :class:`LoopStop` ends a row of
a ``generate`` call as soon as its newest tokens are a span repeated back to
back; :func:`sample` then keeps the answer up to the end of the span's first
copy and marks it cut off, exactly like an answer that hit the length limit.

The tokens that are kept were drawn from the unchanged distribution, so PPO's
log-probabilities of them stay those of the sampler: stopping is a rule on the
tokens drawn so far, as the length limit is, and nothing is reweighted. A
cut-off answer gets the missing-EOS penalty, so PPO also learns to avoid loops.

The rule is on token ids and adjacent copies only. The quality benchmark
counts loops with an independent detector on words (``bench/quality.py``).
"""

from __future__ import annotations

import torch
from transformers.generation.stopping_criteria import StoppingCriteria

MAX_PERIOD = 24  # longest repeated span looked for, in tokens


def copies_at_end(tokens: list[int], period: int) -> int:
    """How many back-to-back copies of the last ``period`` tokens end ``tokens``.

    >>> copies_at_end([7, 1, 2, 1, 2, 1, 2], 2)
    3
    >>> copies_at_end([1, 2, 3], 2)
    1
    """
    if period <= 0 or len(tokens) < period:
        return 0
    span = tokens[-period:]
    copies = 1
    while len(tokens) >= (copies + 1) * period and tokens[-(copies + 1) * period : -copies * period] == span:
        copies += 1
    return copies


def is_loop(period: int, copies: int) -> bool:
    """Whether ``copies`` adjacent copies of a ``period``-token span are a loop.

    One token nine times (a digit string such as 1000000 is seven); a short
    span three times ("is Canberra is Canberra is Canberra"); a span of six or
    more tokens twice (a whole clause said again).
    """
    if period == 1:
        return copies >= 9
    if period < 6:
        return copies >= 3
    return copies >= 2


def is_primitive(span: list[int]) -> bool:
    """Whether ``span`` is not itself copies of a shorter span (``[0, 0]`` is ``[0]`` twice).

    >>> is_primitive([1, 2, 1, 2]), is_primitive([1, 2, 1])
    (False, True)
    """
    n = len(span)
    return not any(n % d == 0 and span == span[:d] * (n // d) for d in range(1, n))


def loop_cut(tokens: list[int], max_period: int = MAX_PERIOD) -> int | None:
    """Where to cut ``tokens`` if they end in a loop: the length that keeps the
    first copy of the repeated span; ``None`` when they do not.

    >>> loop_cut([5, 9, 1, 2, 1, 2, 1, 2])
    4
    >>> loop_cut([5, 9, 1, 2, 3]) is None
    True
    """
    for period in range(1, min(max_period, len(tokens) // 2) + 1):
        copies = copies_at_end(tokens, period)
        if is_loop(period, copies) and is_primitive(tokens[-period:]):
            return len(tokens) - (copies - 1) * period
    return None


class LoopStop(StoppingCriteria):
    """Stops each row of a ``generate`` call whose answer ends in a loop.

    ``cuts[row]`` is the answer length to keep for a row it stopped (see
    :func:`loop_cut`); rows it never stopped are absent.
    """

    def __init__(self, prompt_width: int, eos_token_id: int):
        self.prompt_width = prompt_width
        self.eos_token_id = eos_token_id
        self.cuts: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B,) True for the rows that are looping (and were not stopped before)."""
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        answers = input_ids[:, self.prompt_width :].tolist()
        for row, answer in enumerate(answers):
            if row in self.cuts or self.eos_token_id in answer:
                continue
            cut = loop_cut(answer)
            if cut is not None:
                self.cuts[row] = cut
                stop[row] = True
        return stop
