"""Stopping a looping answer: the rule on token ids, and what ``sample`` keeps."""

from __future__ import annotations

import pytest
import torch

from rlhf_chat.generation.repetition import LoopStop, copies_at_end, is_loop, loop_cut


def test_copies_at_end_counts_adjacent_copies_only():
    assert copies_at_end([1, 2, 1, 2, 1, 2], 2) == 3
    assert copies_at_end([1, 2, 9, 1, 2], 2) == 1  # not adjacent
    assert copies_at_end([3, 3, 3], 1) == 3
    assert copies_at_end([1], 2) == 0


def test_loop_rule_spares_digits_and_short_repeats():
    assert not is_loop(1, 8) and is_loop(1, 9)  # "10000000" is eight zeros
    assert not is_loop(2, 2) and is_loop(2, 3)
    assert not is_loop(5, 2) and is_loop(6, 2)


def test_loop_cut_keeps_the_first_copy():
    canberra = [10, 11, 12, 13, 20, 21, 20, 21, 20, 21]  # "... Canberra is Canberra is Canberra is"
    assert loop_cut(canberra) == 6  # up to the end of the first "Canberra is"
    clause = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7]  # a 7-token clause said twice
    assert loop_cut(clause) == 7
    assert loop_cut([1, 2, 3, 4, 5, 6, 7, 8]) is None
    assert loop_cut([0] * 8) is None and loop_cut([0] * 9) == 1


def test_loop_stop_stops_only_looping_rows_once():
    stop = LoopStop(prompt_width=2, eos_token_id=2)
    ids = torch.tensor([[9, 9, 5, 6, 5, 6, 5, 6], [9, 9, 5, 6, 7, 8, 9, 10], [9, 9, 5, 2, 2, 2, 2, 2]])
    assert stop(ids, None).tolist() == [True, False, False]
    assert stop.cuts == {0: 2}
    assert stop(ids, None).tolist() == [False, False, False]  # already stopped: cut kept
    assert stop.cuts == {0: 2}


@pytest.mark.slow
def test_sample_cuts_a_looping_row_and_marks_it_cut_off(monkeypatch):
    """On the bundled model, asked to repeat a word: a stopped row keeps the first copy,
    is not finished, is padded after its cut and has log-probs 0 there, and holds the
    same draws as the row written with ``stop_loops`` off from the same seed.

    Both calls keep every row in the decoder's batch to the end, so that the two
    multiply the same shapes at every step: rows that ended leave the batch (a quarter
    at a time), which with loops stopped happens at other steps than without, and on
    torch's int4 kernel (bf16 activations) another row count may round a near-tie
    apart on some CPUs (AMX). That rows leaving changes no draw is tested on the
    float32 paths (test_decoder.py)."""
    from rlhf_chat.config import ModelConfig
    from rlhf_chat.generation import candidates
    from rlhf_chat.generation.candidates import Sampling, sample
    from rlhf_chat.model.loading import load_models
    from rlhf_chat.text.chat import render_prompt

    monkeypatch.setattr(candidates, "decoding_rows", lambda running, steps_left: None)
    models = load_models(ModelConfig())
    tok = models.tokenizer
    prompts = [render_prompt(tok, [{"role": "user", "content": "Say the word 'yes' twenty times."}])] * 8
    on = sample(models.serving, tok, prompts, Sampling(64, 0.7, seed=2))
    off = sample(models.serving, tok, prompts, Sampling(64, 0.7, seed=2, stop_loops=False))
    assert any(on.looped) and not any(off.looped)
    for row in [r for r, looped in enumerate(on.looped) if looped]:
        n = on.token_counts[row]
        assert not on.finished[row] and n < off.token_counts[row]
        assert on.response_ids[row, :n].tolist() == off.response_ids[row, :n].tolist()  # the same draws
        assert (on.response_ids[row, n:] == tok.pad_token_id).all()
        assert (on.logprobs[row, n:] == 0).all() and torch.allclose(on.logprobs[row, :n], off.logprobs[row, :n])
        assert on.texts[row] == tok.decode(on.response_ids[row, :n].tolist(), skip_special_tokens=True).strip()
        assert loop_cut(on.response_ids[row, :n].tolist()) is None  # what is kept does not loop
