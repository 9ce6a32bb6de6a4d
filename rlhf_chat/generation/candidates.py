"""Candidates: sampling answers in one batched ``generate`` call, streamed as written.

The same function, with the same settings (``AppConfig.sampling``), samples the
two candidates people compare and the PPO rollouts, so what PPO learns from is
drawn exactly as what people see.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from rlhf_chat.generation.modes import PLAIN_DRAW, ModeDraw
from rlhf_chat.generation.nucleus import NucleusSampler, sample_next_tokens
from rlhf_chat.generation.repetition import LoopStop
from rlhf_chat.model.decoder import Decoder, decoder_for
from rlhf_chat.model.tensors import left_pad
from rlhf_chat.storage.records import Candidate
from rlhf_chat.text.behaviours import answer_head

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch: the reference


@dataclass
class Sampling:
    """Settings of one sampling call, recorded with every candidate."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    seed: int = 0
    min_new_tokens: int = 0  # benchmarks force full-length answers with this
    stop_loops: bool = True  # end a row that repeats itself (repetition.LoopStop), as cut off
    fast_decoder: bool = True  # model/decoder.py where the model allows it, else generate

    @classmethod
    def from_config(cls, cfg, seed: int, min_new_tokens: int = 0) -> Sampling:
        """The one sampling scheme (a ``config.SamplingConfig``) for one call."""
        return cls(
            cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed, min_new_tokens, cfg.stop_loops, cfg.fast_decoder
        )


@dataclass
class Samples:
    """A batch of sampled answers, left-padded prompts and right-padded responses."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded with pad_token_id
    texts: list[str]
    token_counts: list[int]  # real tokens in each response, EOS included; the rest of a row is padding
    finished: list[bool]  # ended with EOS before the length limit (a loop stopped is not finished)
    latency_s: float
    # (B, R) each drawn token's log-prob under the sampling distribution; 0 past the answer's end
    logprobs: torch.Tensor | None = None
    looped: list[bool] | None = None  # stopped by repetition.LoopStop, cut after the first copy
    # (B, P + R, H) the hidden states entering the first adapted layer at every
    # prompt and answer position (``keep_frozen``; None when not kept)
    frozen: torch.Tensor | None = None


class RowStreamer(BaseStreamer):
    """Streams each row of a batched ``generate`` call, decoded, to a callback.

    ``transformers``' own text streamers take one row only; the two candidates
    are two rows of one call, and each pane must fill as its row is written.
    """

    def __init__(
        self, tokenizer, batch_size: int, on_update: Callable[[list[str]], None], prefixes: list[list[int]] | None = None
    ):
        self.tokenizer = tokenizer
        # A row written in a mode starts with its prefilled opening, shown as part of the answer.
        self.rows: list[list[int]] = [list(p) for p in prefixes] if prefixes else [[] for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.on_update = on_update
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        """Receive one decoding step's tokens (B,) and push every row's text so far."""
        if not self.seen_prompt:  # generate first hands over the prompt itself
            self.seen_prompt = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token == self.tokenizer.eos_token_id:
                self.done[row] = True
            else:
                self.rows[row].append(token)
        self.on_update([self.tokenizer.decode(r, skip_special_tokens=True) for r in self.rows])

    def end(self) -> None:
        """Nothing to flush: every step was already pushed."""
        pass


class EachStep(StoppingCriteria):
    """Calls a function after every decoding step and never stops generation.

    PPO rollouts pass the worker's yield point here, so a person's request runs
    between two decoding steps instead of after the whole rollout.
    """

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.fn()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def encode_openings(tokenizer, openings: list[str] | None, rows: int) -> list[list[int]]:
    """Each row's prefilled opening as tokens, as :func:`sample` feeds them ([] for none)."""
    return [tokenizer.encode(o, add_special_tokens=False) if o else [] for o in (openings or [""] * rows)]


def count_response_tokens(response_ids: torch.Tensor, eos_id: int) -> tuple[list[int], list[bool]]:
    """Tokens up to and including the first EOS in each row, and whether there was one."""
    counts, finished = [], []
    for row in response_ids.tolist():
        if eos_id in row:
            counts.append(row.index(eos_id) + 1)
            finished.append(True)
        else:
            counts.append(len(row))
            finished.append(False)
    return counts, finished


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    adapter_names: list[str] | None = None,
    on_update: Callable[[list[str]], None] | None = None,
    on_step: Callable[[], None] | None = None,
    openings: list[str] | None = None,
    keep_frozen: bool = False,
) -> Samples:
    """Sample one answer per prompt in a single batched ``generate`` call.

    ``adapter_names`` gives each row its adapter (peft mixed batches), so the
    policy and the reference can answer side by side in the same call.
    ``openings`` prefill the start of each row's answer (a response mode,
    ``modes.py``; "" for none): the model continues it, and the row's text
    includes it, while ``response_ids`` and the log-probabilities hold only what
    the model wrote.
    Tokens are drawn by :class:`~rlhf_chat.generation.nucleus.NucleusSampler`: exactly
    softmax(logits / ``temperature``) within the ``top_p`` nucleus, no top-k,
    so with ``top_p`` 1.0 it is the distribution PPO's log-probabilities assume.
    ``keep_frozen`` keeps the frozen layers' output (``Samples.frozen``) where the
    model's own decoder runs (:meth:`Decoder.start`'s tap); else it stays None.
    """
    device = next(model.parameters()).device
    prefixes = encode_openings(tokenizer, openings, len(prompts))
    ids, mask = left_pad([p + q for p, q in zip(prompts, prefixes)], tokenizer.pad_token_id, device)
    sampler = NucleusSampler(sampling.temperature, sampling.top_p, sampling.seed, device)
    streamer = RowStreamer(tokenizer, len(prompts), on_update, prefixes) if on_update else None
    extra: dict = {"adapter_names": adapter_names} if adapter_names else {}
    loops = LoopStop(ids.shape[1], tokenizer.eos_token_id) if sampling.stop_loops else None
    criteria = [c for c in (loops, EachStep(on_step) if on_step is not None else None) if c is not None]
    if criteria:
        extra["stopping_criteria"] = StoppingCriteriaList(criteria)
    decoder = decoder_for(model) if sampling.fast_decoder else None
    start = time.perf_counter()
    frozen = None
    if decoder is not None:
        lora_rows = torch.tensor([name != BASE_ADAPTER for name in adapter_names or ["policy"] * len(prompts)])
        out, logprobs, frozen = decode(
            decoder, ids, mask, lora_rows, sampling, sampler, tokenizer, streamer, criteria, keep_frozen
        )
        sampler.logprobs = logprobs
    else:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,  # greedy over the sampler's one-hot scores: it draws the token
            logits_processor=LogitsProcessorList([sampler]),
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens or None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            **extra,
        )
    latency = time.perf_counter() - start
    response = out[:, ids.shape[1]:].clone()
    counts, finished = count_response_tokens(response, tokenizer.eos_token_id)
    logprobs = torch.stack(sampler.logprobs, dim=1) if sampler.logprobs else torch.zeros(response.shape)
    logprobs = logprobs[:, : response.shape[1]].clone()
    cuts = loops.cuts if loops is not None else {}
    for row, cut in cuts.items():  # keep the loop's first copy; the rest is padding, the answer cut off
        counts[row], finished[row] = cut, False
        response[row, cut:] = tokenizer.pad_token_id
    for row, n in enumerate(counts):  # past an answer's end only padding was drawn: nothing to score
        logprobs[row, n:] = 0.0
    texts = [
        tokenizer.decode(pre + row[:n], skip_special_tokens=True).strip()
        for pre, row, n in zip(prefixes, response.tolist(), counts)
    ]
    looped = [row in cuts for row in range(len(prompts))]
    return Samples(ids, mask, response, texts, counts, finished, latency, logprobs, looped, frozen)


def decode(
    decoder: Decoder,
    ids: torch.Tensor,
    mask: torch.Tensor,
    lora_rows: torch.Tensor,
    sampling: Sampling,
    sampler: NucleusSampler,
    tokenizer,
    streamer: RowStreamer | None,
    criteria: list[StoppingCriteria],
    keep_frozen: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """What ``generate`` does in :func:`sample`, on the serving copy's own decoding loop.

    The same rules, step for step: EOS is suppressed before ``min_new_tokens``;
    the sampler draws from the logits; a row that has ended (EOS, or a stopping
    criterion) gets padding from then on; the loop ends when every row has.
    Rows that have ended leave the decoder's batch once a quarter of it has
    (:func:`decoding_rows`), while the sampler still draws for every row, so the
    random stream, and with it every answer, is the one ``generate`` writes.
    With ``keep_frozen`` every drawn token runs through the frozen layers, the
    last ones included, and a row leaves the batch one step after it ended.
    Returns the prompt and answer ids (B, P + steps), each step's
    log-probabilities, and with ``keep_frozen`` the frozen layers' output
    (B, P + steps, H), else None.
    """
    rows, width = ids.shape
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sequences = torch.full((rows, width + sampling.max_new_tokens), pad, dtype=ids.dtype, device=ids.device)
    sequences[:, :width] = ids
    running = torch.ones(rows, dtype=torch.bool, device=ids.device)
    logprobs: list[torch.Tensor] = []
    if streamer is not None:
        streamer.put(ids)
    batch, logits = decoder.start(ids, mask, sampling.max_new_tokens, lora_rows, tap=keep_frozen)
    live = torch.arange(rows, device=ids.device)  # the rows still in the decoder's batch
    steps = 0
    while steps < sampling.max_new_tokens:
        if steps < sampling.min_new_tokens:
            logits[:, eos] = float("-inf")
        tokens, logprob = sample_next_tokens(logits, sampler.temperature, sampler.top_p, sampler.generator)
        tokens = torch.where(running, tokens, torch.full_like(tokens, pad))
        sequences[:, width + steps] = tokens
        logprobs.append(logprob)
        steps += 1
        if streamer is not None:
            streamer.put(tokens)
        done = tokens == eos
        for criterion in criteria:
            done |= criterion(sequences[:, : width + steps], logits)
        fed = running.clone()  # rows whose token this step is part of their answer
        running &= ~done
        if not bool(running.any()) or steps == sampling.max_new_tokens:
            if keep_frozen:
                decoder.tap_last(batch, tokens[live])
            break
        keep = decoding_rows((fed if keep_frozen else running)[live], sampling.max_new_tokens - steps)
        if keep is not None:
            batch.keep(keep)
            live = live[keep]
        if live.numel() == rows:
            logits = decoder.step(batch, tokens)
        else:  # the rows that ended keep their last logits: drawn from for the random stream, then padded
            logits[live] = decoder.step(batch, tokens[live])
    frozen = batch.tap.hidden[:, : width + steps] if keep_frozen else None
    return sequences[:, : width + steps], logprobs, frozen


def decoding_rows(running: torch.Tensor, steps_left: int) -> torch.Tensor | None:
    """Which of the decoder's rows to keep (indices), or None to keep them all.

    ``running`` (R,) says which of its R rows have not ended. Dropping rows
    copies the key/value cache, so it pays only once a quarter of the rows have
    ended and a few steps remain: the copies then shrink geometrically, and a
    step of 64 rows where 16 still write costs what a step of 16 does.
    """
    ended = int((~running).sum())
    if ended == 0 or ended * 4 < running.numel() or steps_left < 4:
        return None
    return running.nonzero().squeeze(-1)


def pair_sources(arena: bool, rng: random.Random) -> list[str]:
    """Who writes sides A and B: the policy twice, or in an arena pair the policy
    and the reference on a random side, so that people judge blind."""
    if not arena:
        return ["policy", "policy"]
    sources = ["policy", "reference"]
    rng.shuffle(sources)
    return sources


def adapter_names_for(sources: list[str]) -> list[str]:
    """peft ``adapter_names`` for rows written by these sources (the reference: adapters off)."""
    return [BASE_ADAPTER if s == "reference" else "policy" for s in sources]


PairModes = tuple[ModeDraw, ModeDraw]  # how sides A and B are written (modes.py)


def generate_pairs(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    policy_version: int,
    arena: list[bool] | None = None,
    modes: list[PairModes | None] | None = None,
    on_updates: list[Callable[[list[str]], None] | None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[tuple[Candidate, Candidate]]:
    """Two candidates for each prompt, all in one batched call (rows 2k and 2k+1 are prompt k's).

    Where ``arena[k]`` is true, prompt k gets an arena pair: the policy against
    the reference (peft mixed adapters in the same call), on a side drawn from
    the seed, so that people judge blind. Where ``modes[k]`` is set, prompt k's
    two sides are written in those modes (policy pairs only); an answer-first
    mode's side is written in two calls (:func:`continue_after_heads`).
    ``on_updates[k]`` receives prompt k's two texts as they are written, so
    several people's pairs can share a call and each person still watches their own.
    """
    arena = arena or [False] * len(prompts)
    modes = modes or [None] * len(prompts)
    if any(flag and pair for flag, pair in zip(arena, modes)):
        raise ValueError("arena pairs stay plain policy against the reference: no modes")
    rng = random.Random(sampling.seed)
    sources = [pair_sources(flag, rng) for flag in arena]
    names = [name for pair in sources for name in adapter_names_for(pair)] if any(arena) else None
    draws = [draw for pair in modes for draw in (pair or (PLAIN_DRAW, PLAIN_DRAW))]
    openings = [PLAIN_DRAW.opening if d.after_first_sentence else d.opening for d in draws]
    on_update = None
    if on_updates and any(on_updates):
        def on_update(texts: list[str]) -> None:
            for k, callback in enumerate(on_updates):
                if callback is not None:
                    callback(texts[2 * k: 2 * k + 2])

    rows = [ids for ids in prompts for _ in range(2)]
    out = sample(model, tokenizer, rows, sampling, names, on_update, on_step,
                 openings=openings if any(openings) else None)
    sources_by_row = [source for pair in sources for source in pair]
    written = [to_candidate(out, r, sampling, sources_by_row[r], policy_version, d.name) for r, d in enumerate(draws)]
    if any(d.after_first_sentence for d in draws):
        written = continue_after_heads(model, tokenizer, rows, written, draws, sampling, names, on_update, on_step)
    return [(written[2 * k], written[2 * k + 1]) for k in range(len(prompts))]


def continue_after_heads(
    model,
    tokenizer,
    rows: list[list[int]],
    written: list[Candidate],
    draws: list[ModeDraw],
    sampling: Sampling,
    adapter_names: list[str] | None,
    on_update: Callable[[list[str]], None] | None,
    on_step: Callable[[], None] | None,
) -> list[Candidate]:
    """The second call of answer-first modes: each such row's answer is cut after its
    first sentence (``behaviours.answer_head``), the mode's opening follows, and the
    model writes on from there, within what is left of ``max_new_tokens`` after the
    head and the opening (so that such an answer is no longer than a plain one: a vote
    between them is not a vote on length). A row whose answer has no sentence end near
    its start keeps what it wrote, stored as a plain answer (the mode was not followed)."""
    heads = {r: answer_head(written[r].text) for r, d in enumerate(draws) if d.after_first_sentence}
    written = list(written)
    for r, head in heads.items():
        if head is None:
            written[r].mode = PLAIN_DRAW.name
    again = [r for r, head in heads.items() if head is not None]
    if not again:
        return written
    shown = [c.text for c in written]
    prefixes = [f"{heads[r]} {draws[r].opening}" for r in again]
    used = max(len(ids) for ids in encode_openings(tokenizer, prefixes, len(prefixes)))
    # its own seed: the first call's random stream is not drawn again
    rest = replace(sampling, max_new_tokens=max(1, sampling.max_new_tokens - used), seed=sampling.seed + 1)

    def update_again(texts: list[str]) -> None:
        for r, text in zip(again, texts):
            shown[r] = text
        on_update(shown)

    out = sample(
        model, tokenizer, [rows[r] for r in again], rest,
        [adapter_names[r] for r in again] if adapter_names else None,
        update_again if on_update else None, on_step,
        openings=prefixes,
    )
    for i, r in enumerate(again):
        head_tokens = len(tokenizer.encode(heads[r], add_special_tokens=False))
        candidate = to_candidate(out, i, sampling, written[r].source, written[r].policy_version, draws[r].name)
        candidate.token_count += head_tokens  # the head is the model's own writing too
        candidate.latency_s += written[r].latency_s
        written[r] = candidate
    return written


def generate_pair(
    model,
    tokenizer,
    prompt: list[int],
    sampling: Sampling,
    policy_version: int,
    arena: bool = False,
    on_update: Callable[[list[str]], None] | None = None,
    modes: PairModes | None = None,
) -> tuple[Candidate, Candidate]:
    """Two candidates for one prompt, sampled together (``generate_pairs`` with one prompt)."""
    return generate_pairs(model, tokenizer, [prompt], sampling, policy_version, [arena], [modes], [on_update])[0]


def to_candidate(
    samples: Samples, row: int, sampling: Sampling, source: str, policy_version: int, mode: str = ""
) -> Candidate:
    """One row of a sampling call as a candidate; the reference is version 0 by definition."""
    return Candidate(
        text=samples.texts[row],
        source=source,
        policy_version=policy_version if source == "policy" else 0,
        seed=sampling.seed,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
        token_count=samples.token_counts[row],
        finished=samples.finished[row],
        latency_s=samples.latency_s,
        mode=mode,
    )
