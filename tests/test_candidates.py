"""Candidates: the row streamer that fills each pane as its row is written."""

from __future__ import annotations

import torch

from rlhf_chat.generation.candidates import RowStreamer, count_response_tokens


def test_row_streamer_pushes_each_rows_text_so_far_and_stops_a_row_at_its_eos(tokenizer):
    hello, world, there = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Hello", " world", " there"))
    eos = tokenizer.eos_token_id
    pushed = []
    streamer = RowStreamer(tokenizer, 2, pushed.append)
    streamer.put(torch.tensor([[1, 2, 3], [1, 2, 3]]))  # generate hands over the prompt first: not shown
    assert pushed == []
    streamer.put(torch.tensor([hello, world]))
    streamer.put(torch.tensor([eos, there]))
    streamer.put(torch.tensor([hello, hello]))  # row 0 ended: what generate writes after its EOS is padding
    streamer.end()
    decode = tokenizer.decode
    assert pushed == [
        [decode([hello]), decode([world])],
        [decode([hello]), decode([world, there])],
        [decode([hello]), decode([world, there, hello])],
    ]


def test_count_response_tokens_counts_up_to_the_first_eos():
    counts, finished = count_response_tokens(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9, 9, 9]]), eos_id=2)
    assert counts == [2, 4, 1] and finished == [True, False, True]
