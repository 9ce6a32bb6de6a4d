"""Nucleus: drawing the next token from softmax(logits / T) within the top-p nucleus.

``transformers`` samples by sorting the whole 49k-word vocabulary for top-p
and by drawing one exponential random number per word for the multinomial.
On the 2-core CPU, for the 64 rows of a simulation batch, those two took 43%
of each decoding step (97 ms for the sort, 60 ms for the draw; 24.3 s for 64
answers of 64 tokens). Here the same distribution is drawn in a few
milliseconds: a partial sort (``topk``) finds the nucleus, which is almost
always a few dozen words, and one uniform number per row picks a word by the
inverse of the cumulative distribution.

:class:`NucleusSampler` plugs this into ``generate`` as a logits processor: it
draws the token and returns scores that are 0 there and -inf elsewhere, and
``generate`` runs greedy, so its argmax takes the drawn token. Processors that
``generate`` builds itself (``min_new_tokens``) run before it.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import LogitsProcessor

NUCLEUS_CANDIDATES = 256  # words looked at first; more only when their mass falls short of top_p


def nucleus(
    probs: torch.Tensor, top_p: float, candidates: int = NUCLEUS_CANDIDATES
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of each row of ``probs`` (B, V): (word ids (B, K), weights (B, K)).

    A word is kept when the mass of the words more likely than it is below
    ``top_p``: the smallest set of most likely words whose mass reaches
    ``top_p``, as ``transformers``' ``TopPLogitsWarper`` keeps. Weights are the
    words' probabilities, 0 outside the nucleus, not renormalised. With
    ``top_p >= 1`` the nucleus is the whole vocabulary, in vocabulary order.
    """
    if top_p >= 1.0:
        ids = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
        return ids, probs
    top, ids = probs.topk(min(candidates, probs.shape[-1]), dim=-1)  # descending
    short = top.sum(-1) < top_p
    if bool(short.any()):
        top, ids = widen_rows(probs, top, ids, short, top_p)
    mass_before = top.cumsum(-1) - top
    return ids, torch.where(mass_before < top_p, top, torch.zeros_like(top))


def widen_rows(
    probs: torch.Tensor, top: torch.Tensor, ids: torch.Tensor, short: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates wide enough for every row's nucleus: the short rows (flat
    distributions, whose nucleus is wider than the candidates) sorted in full,
    the others as they were, padded with probability 0.

    Only the short rows are sorted, and the result is only as wide as the
    widest nucleus: in a 64-row batch at least one row is that flat at about a
    third of the steps (at T=0.8, top_p=0.95: median nucleus 6 words, 99th
    percentile 306, largest 790), and the full 49k-word width for every row
    cost 2.3 s of a 15.5 s call.
    """
    short_top, short_ids = probs[short].sort(dim=-1, descending=True)
    widest = int(((short_top.cumsum(-1) - short_top) < top_p).sum(-1).max())
    width = max(top.shape[-1], widest)
    wide_top = top.new_zeros(top.shape[0], width)
    wide_ids = ids.new_zeros(ids.shape[0], width)
    wide_top[:, : top.shape[-1]] = top
    wide_ids[:, : ids.shape[-1]] = ids
    wide_top[short] = short_top[:, :width]
    wide_ids[short] = short_ids[:, :width]
    return wide_top, wide_ids


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row (B,), with probability proportional to ``weights`` (B, K).

    Inverse-CDF sampling: one uniform number per row, scaled to the row's total,
    located in the cumulative sum (float64, so 49k small terms add up exactly
    enough). Words of weight 0 are never drawn.
    """
    u = torch.rand(weights.shape[0], 1, generator=generator, dtype=torch.float64, device=weights.device)
    return locate(weights, u)


def locate(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index (B,) where each row's uniform number ``u`` (B, 1) falls in its
    cumulative ``weights`` (B, K): :func:`draw` with its random numbers given."""
    cdf = weights.double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


# Rows sampled at a time: a row's float64 cumulative sum over 49k words is 0.4 MB,
# and 8 rows stay in the CPU's cache. On the 2-core CPU, 64 rows at once took
# 28.9 ms a step, eight blocks of 8 rows 5-6 ms.
SAMPLE_ROWS = 8


def sample_next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token ids (B,) drawn from softmax(logits / temperature) restricted to the
    top-p nucleus, and each drawn token's log-probability (B,) under the distribution
    it was drawn from (the nucleus renormalised; with ``top_p`` 1, the plain softmax).

    One uniform number per row, drawn for the whole batch first, then the rows in
    blocks of ``SAMPLE_ROWS``: each row's result is what it would be alone."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64, device=logits.device)
    tokens, logprobs = [], []
    for start in range(0, logits.shape[0], SAMPLE_ROWS):
        rows = slice(start, start + SAMPLE_ROWS)
        probs = torch.softmax(logits[rows].float() / temperature, dim=-1)
        ids, weights = nucleus(probs, top_p)
        picked = locate(weights, u[rows]).unsqueeze(-1)  # (b, 1)
        logprob = weights.gather(-1, picked).double().log() - weights.double().sum(-1, keepdim=True).log()
        tokens.append(ids.gather(-1, picked).squeeze(-1))
        logprobs.append(logprob.squeeze(-1).float())
    return torch.cat(tokens), torch.cat(logprobs)


class NucleusSampler(LogitsProcessor):
    """A logits processor that samples: ``generate(do_sample=False)`` then takes its token.

    Its own seeded generator makes a call reproducible from its seed without
    touching torch's global random state. It keeps the log-probability of every
    token it drew (``logprobs``, one (B,) tensor a step): what the sampling copy
    believed, which PPO compares with what the training copy computes.
    """

    def __init__(self, temperature: float, top_p: float, seed: int, device: torch.device):
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Scores (B, V) that are 0 at each row's drawn token and -inf elsewhere."""
        tokens, logprobs = sample_next_tokens(scores, self.temperature, self.top_p, self.generator)
        self.logprobs.append(logprobs)
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(-1, tokens.unsqueeze(-1), 0.0)
