"""The next-token sampler: the same nucleus as transformers, the right frequencies,
and through ``generate`` the same answers a plain decoding gives."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from rlhf_chat.generation.candidates import Sampling, sample
from rlhf_chat.generation.nucleus import NucleusSampler, draw, nucleus, sample_next_tokens
from rlhf_chat.text.chat import render_prompt


def transformers_nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Which words transformers' own warpers keep (B, V) bool."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    return torch.isfinite(TopPLogitsWarper(top_p)(None, scores))


def kept_words(logits: torch.Tensor, temperature: float, top_p: float, candidates: int) -> torch.Tensor:
    """Which words :func:`nucleus` keeps, as a (B, V) bool mask."""
    ids, weights = nucleus(torch.softmax(logits / temperature, -1), top_p, candidates)
    kept = torch.zeros_like(logits, dtype=torch.bool)
    return kept.scatter_(-1, ids, weights > 0)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_nucleus_keeps_the_words_transformers_keeps(top_p):
    gen = torch.Generator().manual_seed(0)
    # peaked rows and flat rows (no exact ties: which of two equal words is kept is arbitrary)
    logits = torch.randn(6, 300, generator=gen) * torch.tensor([[8.0], [4.0], [2.0], [0.5], [0.1], [0.01]])
    for candidates in (16, 1000):
        assert torch.equal(kept_words(logits, 0.8, top_p, candidates), transformers_nucleus(logits, 0.8, top_p))


def test_nucleus_by_hand():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    # sorted: 0.5, 0.3, 0.1, ...; mass before each: 0, 0.5, 0.8, 0.9 -> keep the first three at top_p 0.85
    ids, weights = nucleus(probs, 0.85, candidates=2)  # 2 candidates hold 0.8 < 0.85: widened
    kept = {int(i): float(w) for i, w in zip(ids[0], weights[0]) if w > 0}
    assert kept == pytest.approx({1: 0.5, 3: 0.3, 0: 0.1})
    ids, weights = nucleus(probs, 1.0)
    assert torch.equal(weights, probs) and ids[0].tolist() == [0, 1, 2, 3, 4]


def test_draw_follows_the_weights_and_never_draws_a_zero():
    weights = torch.tensor([[0.2, 0.0, 1.2, 0.6]]).expand(40_000, 4)  # unnormalised on purpose
    counts = torch.bincount(draw(weights, torch.Generator().manual_seed(1)), minlength=4).float()
    assert counts[1] == 0
    # expected 0.1, 0.6, 0.3; the standard error at n=40k is under 0.0025
    assert (counts / counts.sum()).tolist() == pytest.approx([0.1, 0.0, 0.6, 0.3], abs=0.01)


def test_full_vocabulary_sampling_is_the_softmax_at_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    expected = torch.softmax(logits / 0.7, -1)
    tokens, logprobs = sample_next_tokens(logits.expand(40_000, 4), 0.7, 1.0, torch.Generator().manual_seed(2))
    freq = torch.bincount(tokens, minlength=4).float() / 40_000
    assert freq.tolist() == pytest.approx(expected.tolist(), abs=0.01)
    # each drawn token's log-prob is that of the distribution it came from
    assert torch.allclose(logprobs, expected.log()[tokens], atol=1e-6)


def test_a_nucleus_draw_reports_the_renormalised_log_prob():
    """Probabilities 0.5, 0.3, 0.15, 0.05 at top_p 0.75: the nucleus is the first two
    words (0.5 before the second is below 0.75, 0.8 before the third is not), so a
    drawn word's probability is 0.5/0.8 or 0.3/0.8."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    tokens, logprobs = sample_next_tokens(logits.expand(1000, 4), 1.0, 0.75, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    expected = torch.where(tokens == 0, torch.tensor(0.5 / 0.8), torch.tensor(0.3 / 0.8)).log()
    assert torch.allclose(logprobs, expected, atol=1e-6)


def test_sampler_hands_generate_a_one_hot_row_and_is_reproducible():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    first = NucleusSampler(0.8, 0.95, seed=7, device=torch.device("cpu"))(None, logits)
    again = NucleusSampler(0.8, 0.95, seed=7, device=torch.device("cpu"))(None, logits)
    assert torch.equal(first, again)
    assert ((first == 0).sum(-1) == 1).all() and torch.isinf(first).sum() == 3 * 49


def test_a_vanishing_nucleus_decodes_greedily(tiny_models):
    """top_p -> 0 keeps only the most likely word, so sampling must equal greedy decoding.

    Through ``generate`` it is compared with generate's own greedy search: the same
    model calls on the same batch, so the same logits on every CPU. On the decoder
    no seed changes an answer, twin rows write the same one, and every drawn word had
    probability 1 in its nucleus. (The decoder against ``generate`` is compared in
    test_decoder.py on the float32 paths: on this bf16 path their other matrix shapes
    may round apart on some CPUs (AMX), and this random model turns that into other words.)"""
    model, tok = tiny_models.serving, tiny_models.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "Name a colour."}])

    def vanishing(seed: int, fast: bool) -> Sampling:
        return Sampling(max_new_tokens=8, temperature=0.8, top_p=1e-6, seed=seed, stop_loops=False, fast_decoder=fast)

    sampled = sample(model, tok, [prompt, prompt], vanishing(5, fast=False))
    ids = torch.tensor([prompt, prompt])
    greedy = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    assert torch.equal(sampled.response_ids, greedy[:, ids.shape[1]:])
    fast = [sample(model, tok, [prompt, prompt], vanishing(seed, fast=True)) for seed in (5, 6)]
    assert torch.equal(fast[0].response_ids, fast[1].response_ids)  # no randomness left
    assert torch.equal(fast[0].response_ids[0], fast[0].response_ids[1])
    assert not any(out.logprobs.any() for out in (sampled, *fast))  # log 1 = 0 at every drawn word


def test_same_seed_same_answers(tiny_models):
    model, tok = tiny_models.serving, tiny_models.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "Say hello."}])
    runs = [sample(model, tok, [prompt, prompt], Sampling(max_new_tokens=8, temperature=1.0, seed=s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert not torch.equal(runs[0].response_ids, runs[2].response_ids)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_in_blocks_of_rows_draws_what_one_block_draws(monkeypatch, top_p):
    """Blocks of SAMPLE_ROWS keep the rows in the CPU's cache; a row's draw must not
    depend on the block it fell in (21 rows: two whole blocks and a part)."""
    from rlhf_chat.generation import nucleus

    logits = torch.randn(21, 49152, generator=torch.Generator().manual_seed(3)) * 4
    results = []
    for rows in (1, nucleus.SAMPLE_ROWS, 1000):
        monkeypatch.setattr(nucleus, "SAMPLE_ROWS", rows)
        results.append(sample_next_tokens(logits, 0.7, top_p, torch.Generator().manual_seed(9)))
    for tokens, logprobs in results[1:]:
        assert torch.equal(tokens, results[0][0]) and torch.equal(logprobs, results[0][1])
