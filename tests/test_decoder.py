"""The serving copy's own decoding loop (model/decoder.py): the model's function,
step for step, with live LoRA weights, per-row adapters, and calls nested inside
each other's steps as a PPO rollout nests a person's request."""

from __future__ import annotations

import pytest
import torch

from rlhf_chat.config import ModelConfig
from rlhf_chat.generation.candidates import BASE_ADAPTER, Sampling, sample
from rlhf_chat.model import native
from rlhf_chat.model.decoder import Concat, Decoder, Twins, decoder_for, fuse, fuse_int4, is_supported
from rlhf_chat.model.loading import load_models, sync_policy_weights
from rlhf_chat.model.quantized import Int4Linear
from rlhf_chat.model.tensors import left_pad
from rlhf_chat.text.chat import render_prompt


@pytest.fixture(
    scope="module",
    params=[("int4", "avx2"), ("int4", "torch"), ("nf4", "auto"), ("fp32", "auto")],
    ids=["int4-native", "int4-torch", "nf4", "fp32"],
)
def models(request, tiny_path):
    """The tiny model on the bundled model's CPU path (int4: the native kernels where
    they run, and torch's), on bitsandbytes (NF4) and dense float32, its policy
    adapter moved away from zero so that LoRA changes every answer. ``rounds`` says
    whether its serving path rounds activations to bf16 (:func:`rounds_to_bf16`)."""
    weights, kernel = request.param
    if kernel == "avx2":
        try:
            native.library(ModelConfig().cache_dir)
        except native.NativeUnavailable as error:
            pytest.skip(f"native kernels unavailable: {error}")
    loaded = with_a_moved_policy(ModelConfig(name=str(tiny_path), weights=weights, int4_kernel=kernel), seed=0)
    loaded.rounds = rounds_to_bf16(weights, loaded.kernel)
    return loaded


def rounds_to_bf16(weights: str, kernel: str) -> bool:
    """Whether the serving copy rounds activations to bf16: torch's int4 and int8 kernels
    do on every CPU, bitsandbytes' NF4 does where the CPU has AVX512-BF16. On such a path
    a product's last bit may depend on how many rows it multiplies (Intel's AMX tile
    path accumulates in another order than the one-row path), and this random model,
    drawn wide, turns one bf16 ulp in its first layers into relative gaps up to 4 two
    layers up (measured with a row-count-dependent stand-in for the int4 kernel). So
    what two layouts compute is compared there by its pattern (every position nearest
    its own), and exactly on the float32 paths (dense, and the native kernels), which
    every CPU runs."""
    return kernel == "torch" or weights == "nf4"


def nearest_is_own(found: torch.Tensor, expected: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per row (B,), the share of real positions (B, T) whose ``found`` vector (B, T, H)
    is at least as near ``expected`` at the same position as at either neighbour: one
    for values that are right up to rounding, far lower for an offset by one position.

    >>> e = torch.arange(4.0).view(1, 4, 1); m = torch.ones(1, 4, dtype=torch.bool)
    >>> nearest_is_own(e, e, m).tolist(), nearest_is_own(e.roll(1, 1), e, m).tolist()
    ([1.0], [0.0])
    """
    same = (found - expected).norm(dim=-1)
    inf = torch.full_like(same[:, :1], float("inf"))
    before = torch.cat([inf, (found[:, 1:] - expected[:, :-1]).norm(dim=-1)], 1)
    after = torch.cat([(found[:, :-1] - expected[:, 1:]).norm(dim=-1), inf], 1)
    own = (same <= torch.minimum(before, after)) & real
    return own.sum(1) / real.sum(1)


def with_a_moved_policy(cfg: ModelConfig, seed: int):
    """Models loaded from ``cfg``, the policy adapter's B matrices drawn away from zero
    (so that LoRA changes every answer) and synced into the serving copy."""
    loaded = load_models(cfg)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, param in loaded.trainer.named_parameters():
            if "lora_B" in name and ".policy." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    sync_policy_weights(loaded.trainer, loaded.serving)
    return loaded


def padded_prompts(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, left-padded as the sampler pads them."""
    rows = [
        render_prompt(tok, [{"role": "user", "content": "Explain how a rainbow forms, step by step."}]),
        render_prompt(tok, [{"role": "user", "content": "Hi"}]),
    ]
    return left_pad(rows, tok.pad_token_id, torch.device("cpu"))


def model_logits(model, ids, mask, adapters) -> torch.Tensor:
    """The peft model's own last-position logits, with generate's positions for left padding."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=adapters).logits[:, -1]


def assert_same_function(logits: torch.Tensor, expected: torch.Tensor, kernel: str) -> None:
    """The decoder's logits are the model's own, up to float32 rounding: exactly so on
    torch's kernels; on the native ones its MLP half is one call that adds in its own
    order and takes exp from a polynomial (up to 3.5e-4 seen on this random model's
    large logits; a wrong adapter or cache entry is off by more than 0.1)."""
    atol = 1e-3 if kernel == "avx2" else 1e-4
    torch.testing.assert_close(logits, expected.float(), atol=atol, rtol=1e-4)


def assert_continues(models, step: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, adapters) -> None:
    """A step's logits (B, V) continue the sequence ``ids`` as the model's full forward
    does. On the float32 paths to 1e-3 nats (the native kernels add in their own order:
    1e-2); on a bf16 path (:func:`rounds_to_bf16`) a 1-row and a 40-row product may round
    a key differently, so there each row must sit nearer the full forward's last
    position than the one before it, which a stale or misplaced cache entry gives."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = models.serving(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=adapters).logits
    own, before = (torch.log_softmax(full[:, i].float(), -1) for i in (-1, -2))
    found = torch.log_softmax(step.float(), -1)
    gap = (found - own).abs()
    if not models.rounds:
        assert gap.max() < (1e-2 if models.kernel == "avx2" else 1e-3), gap.max()
    else:
        assert torch.all(gap.mean(-1) < (found - before).abs().mean(-1)), (gap.mean(-1), (found - before).abs().mean(-1))


def test_fusing_int4_layers_concatenates_their_outputs_exactly():
    gen = torch.Generator().manual_seed(1)
    layers = [Int4Linear(torch.randn(n, 64, generator=gen)) for n in (128, 64, 64)]  # q, k, v of whole row blocks
    x = torch.randn(3, 64, generator=gen)
    fused = fuse(layers)
    assert type(fused) is Int4Linear and fused.out_features == 256
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], -1))


def test_int4_layers_that_do_not_fill_whole_row_blocks_are_not_fused():
    """Their packed rows interleave in blocks of 64: concatenated they would multiply wrong rows."""
    gen = torch.Generator().manual_seed(2)
    layers = [Int4Linear(torch.randn(n, 64, generator=gen)) for n in (64, 32, 32)]
    x = torch.randn(3, 64, generator=gen)
    with pytest.raises(ValueError, match="multiples of 64"):
        fuse_int4(layers)
    fallback = fuse(layers)
    assert type(fallback) is Concat
    assert torch.equal(fallback(x), torch.cat([layer(x) for layer in layers], -1))
    assert type(fuse([torch.nn.Linear(64, 8), torch.nn.Linear(64, 8)])) is Concat


@torch.no_grad()
def test_prefill_gives_the_models_own_logits_for_policy_and_reference_rows(models):
    ids, mask = padded_prompts(models.tokenizer)
    decoder = Decoder(models.serving)
    _, logits = decoder.start(ids, mask, 4, torch.tensor([1, 0]))
    expected = model_logits(models.serving, ids, mask, ["policy", BASE_ADAPTER])
    assert_same_function(logits, expected, models.kernel)
    # the adapter matters: the reference row is not the policy's
    policy_only = model_logits(models.serving, ids, mask, ["policy", "policy"])
    assert (policy_only[1] - expected[1]).abs().max() > 0.1


@torch.no_grad()
def test_rows_with_one_prompt_are_prefilled_once_and_get_the_models_own_logits(models):
    """A pair's two rows share their prompt: one row goes through the layers; an arena
    pair (policy and reference) is one row below the first adapted layer and two above."""
    tok = models.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "Name a colour."}])
    ids, mask = left_pad([prompt, prompt], tok.pad_token_id, torch.device("cpu"))
    decoder = Decoder(models.serving)
    bottom, top = decoder.layers[0], decoder.layers[-1]
    assert not bottom.lora and top.lora  # LoRA on the top layers only (model.lora_top_layers)
    seen: dict[str, list[int]] = {"bottom": [], "top": []}
    hooks = [
        layer.qkv.register_forward_hook(lambda _m, args, _o, key=key: seen[key].append(args[0].shape[0]))
        for key, layer in (("bottom", bottom), ("top", top))
    ]
    try:
        for lora_rows, adapters, top_rows in (([1, 1], ["policy", "policy"], 1), ([1, 0], ["policy", BASE_ADAPTER], 2)):
            seen["bottom"].clear(), seen["top"].clear()
            batch, logits = decoder.start(ids, mask, 3, torch.tensor(lora_rows))
            assert seen == {"bottom": [1], "top": [top_rows]}
            expected = model_logits(models.serving, ids, mask, adapters).float()
            assert_same_function(logits, expected, models.kernel)
            token = logits.argmax(-1)
            following = decoder.step(batch, token)  # every row's cache was filled
            longer_ids, longer_mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, mask[:, :1]], 1)
            assert_continues(models, following, longer_ids, longer_mask, adapters)
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def test_interleaved_twins_with_mixed_adapters_each_get_their_own_logits(models):
    """Prompts A, B, A, B with the adapter on, on, off, off: four distinct rows above the
    first adapted layer, two below; each row gets its own prompt's and adapter's logits."""
    ids, mask = padded_prompts(models.tokenizer)
    ids, mask = ids[[0, 1, 0, 1]], mask[[0, 1, 0, 1]]
    _, logits = Decoder(models.serving).start(ids, mask, 2, torch.tensor([1, 1, 0, 0]))
    adapters = ["policy", "policy", BASE_ADAPTER, BASE_ADAPTER]
    assert_same_function(logits, model_logits(models.serving, ids, mask, adapters), models.kernel)


def test_twins_find_the_distinct_rows_in_the_batchs_order():
    twins = Twins.of(torch.tensor([[3, 4], [1, 2], [3, 4], [1, 2], [5, 6]]))
    assert twins.first.tolist() == [0, 1, 4] and twins.inverse.tolist() == [0, 1, 0, 1, 2] and twins.count == 3


@torch.no_grad()
def test_each_step_continues_the_sequence_as_the_model_would(models):
    """Step by step against the full forward over the grown sequence: the same
    function (:func:`assert_continues` says how near, by path)."""
    ids, mask = padded_prompts(models.tokenizer)
    decoder = Decoder(models.serving)
    batch, logits = decoder.start(ids, mask, 6, torch.tensor([1, 0]))
    for _ in range(6):
        token = logits.argmax(-1)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = decoder.step(batch, token)
        assert_continues(models, logits, ids, mask, ["policy", BASE_ADAPTER])


@torch.no_grad()
def test_an_adapter_update_is_what_the_next_call_uses(models):
    """The decoder reads peft's LoRA tensors, not copies: a sync after a PPO update changes its answers."""
    ids, mask = padded_prompts(models.tokenizer)
    decoder = decoder_for(models.serving)
    _, before = decoder.start(ids, mask, 2, torch.tensor([1, 1]))
    saved = {n: p.clone() for n, p in models.trainer.named_parameters() if "lora_A" in n and ".policy." in n}
    try:
        for name, param in models.trainer.named_parameters():
            if name in saved:
                param.mul_(3.0)
        sync_policy_weights(models.trainer, models.serving)
        _, after = decoder.start(ids, mask, 2, torch.tensor([1, 1]))
        assert_same_function(after, model_logits(models.serving, ids, mask, None), models.kernel)
        assert (after - before).abs().max() > 0.1
    finally:
        for name, param in models.trainer.named_parameters():
            if name in saved:
                param.copy_(saved[name])
        sync_policy_weights(models.trainer, models.serving)


def test_sampling_on_the_decoder_draws_what_generate_draws(models):
    """Same seed, same settings: the decoder's loop and transformers' generate write the
    same answers, EOS suppressed before min_new_tokens, with the same log-probabilities.
    Draws are compared on the float32 paths; on a bf16 path the two loops' other matrix
    shapes may round a near-tie apart on some CPUs (:func:`rounds_to_bf16`), so there
    only what rounding cannot move is checked."""
    tok = models.tokenizer
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ("Name a colour.", "Count to three.")]
    settings = dict(max_new_tokens=10, temperature=0.7, seed=4, min_new_tokens=3, stop_loops=True)
    fast = sample(models.serving, tok, prompts, Sampling(**settings, fast_decoder=True), adapter_names=["policy", BASE_ADAPTER])
    slow = sample(models.serving, tok, prompts, Sampling(**settings, fast_decoder=False), adapter_names=["policy", BASE_ADAPTER])
    for out in (fast, slow):
        assert min(out.token_counts) >= 3 and max(out.token_counts) <= 10
        assert bool((out.logprobs <= 0).all()) and bool(out.logprobs.isfinite().all())
    if not models.rounds:
        assert fast.texts == slow.texts
        assert torch.equal(fast.response_ids, slow.response_ids)
        assert fast.token_counts == slow.token_counts and fast.finished == slow.finished
        torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=0.02, rtol=0)


class EosBias(torch.nn.Module):
    """An output layer that favours EOS by a fixed amount, so that the tiny random
    model's rows end at different steps (on its own it never writes EOS)."""

    def __init__(self, inner: torch.nn.Module, eos: int, bias: float):
        super().__init__()
        self.inner, self.eos, self.bias = inner, eos, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        out[..., self.eos] += self.bias
        return out


def test_rows_that_end_leave_the_batch_and_every_answer_stays_the_same(models, monkeypatch):
    """Eight rows ending at different steps: the loop drops ended rows from the decoder's
    batch (the cache shrinks), and, on the float32 paths, writes what it writes keeping
    every row, token for token, with the same log-probabilities. (On a bf16 path a
    smaller batch may round apart on some CPUs: :func:`rounds_to_bf16`.)"""
    import rlhf_chat.generation.candidates as candidates
    import rlhf_chat.model.decoder as decoder_module

    tok = models.tokenizer
    questions = ["Name a colour.", "Count to three.", "Hi", "What is rain?",
                 "Tell me a joke.", "Why?", "A bird?", "Tides?"]
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    adapters = ["policy", BASE_ADAPTER] * 4
    decoder = decoder_for(models.serving)  # it samples every row here: its output layer is the one to bias
    monkeypatch.setattr(decoder, "lm_head", EosBias(decoder.lm_head, tok.eos_token_id, 16.0))
    kept: list[int] = []
    keep = decoder_module.Batch.keep

    def counting_keep(self, rows):
        kept.append(rows.numel())
        keep(self, rows)

    monkeypatch.setattr(decoder_module.Batch, "keep", counting_keep)

    def run():
        return sample(models.serving, tok, prompts, Sampling(24, 0.7, seed=3), adapter_names=adapters)

    dropping = run()
    assert len(set(dropping.token_counts)) >= 4 and max(dropping.token_counts) >= 8  # they end apart
    assert kept and kept == sorted(kept, reverse=True) and kept[-1] < len(prompts)  # the batch shrank
    for row, n in enumerate(dropping.token_counts):
        assert not dropping.logprobs[row, n:].any()  # nothing scored past an answer's end
        assert dropping.logprobs[row, :n].ne(0).all()  # and every drawn token scored
    if models.rounds:
        return  # a smaller batch may round a bf16 product apart on some CPUs: the float32 paths compare draws
    with monkeypatch.context() as m:
        m.setattr(candidates, "decoding_rows", lambda running, steps_left: None)
        keeping = run()
    assert dropping.texts == keeping.texts and torch.equal(dropping.response_ids, keeping.response_ids)
    assert dropping.token_counts == keeping.token_counts and dropping.finished == keeping.finished
    # The same draws, their log-probs up to float32 rounding (a smaller batch adds in
    # another order: 8e-5 at most seen); an indexing bug moves them by far more.
    gap = (dropping.logprobs - keeping.logprobs).abs()
    assert gap.max() <= 1e-3, gap.max()


def test_the_kept_frozen_output_is_the_models_own_at_every_answer_token(models, monkeypatch):
    """PPO keeps the frozen layers' output while sampling (``keep_frozen``) instead of
    computing it again: rows that end apart and leave the batch, each row's last token
    included, policy and reference rows alike, it is the model's own at every real
    prompt and answer position; and keeping it changes no answer."""
    import rlhf_chat.model.decoder as decoder_module
    from rlhf_chat.model.heads import first_adapted_layer, frozen_prefix

    tok = models.tokenizer
    # an arena pair on one prompt (parts at the tap), two twins (one row below it), and others
    questions = ["Name a colour.", "Name a colour.", "Hi", "Hi", "What is rain?", "Tell me a joke.", "Why?", "Tides?"]
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    adapters = ["policy", BASE_ADAPTER, "policy", "policy", BASE_ADAPTER, "policy", "policy", BASE_ADAPTER]
    decoder = decoder_for(models.serving)  # it samples every row here: its output layer is the one to bias
    monkeypatch.setattr(decoder, "lm_head", EosBias(decoder.lm_head, tok.eos_token_id, 16.0))
    kept_rows: list[int] = []
    keep = decoder_module.Batch.keep
    monkeypatch.setattr(
        decoder_module.Batch, "keep", lambda self, rows: (kept_rows.append(rows.numel()), keep(self, rows))
    )
    run = lambda keep: sample(  # noqa: E731
        models.serving, tok, prompts, Sampling(8, 0.7, seed=3), adapter_names=adapters, keep_frozen=keep
    )
    kept, plain = run(True), run(False)
    assert plain.frozen is None
    if not models.rounds:  # keeping it changes no answer (a bf16 path may round the other layout apart)
        assert kept.texts == plain.texts and torch.equal(kept.response_ids, plain.response_ids)
    assert len(set(kept.token_counts)) >= 4 and 8 in kept.token_counts  # ended apart, one at the limit
    assert kept_rows and min(kept_rows) < len(prompts)  # rows left the batch
    counts = torch.tensor(kept.token_counts)
    answer_mask = (torch.arange(kept.response_ids.shape[1]) < counts[:, None]).long()
    ids = torch.cat([kept.prompt_ids, kept.response_ids], dim=1)
    mask = torch.cat([kept.prompt_mask, answer_mask], dim=1)
    assert decoder.split == first_adapted_layer(models.serving)
    with torch.no_grad():
        expected = frozen_prefix(models.serving, ids, mask).hidden
    real = mask.bool()
    assert kept.frozen.shape == expected.shape
    if not models.rounds:  # float32: the same values up to the order of additions (2.4e-4 seen)
        gap = (kept.frozen - expected)[real].abs() / (1.0 + expected[real].abs())
        assert gap.max() <= 1e-3, gap.max()
    # On every path each position is its own, not a neighbour's (an offset by one scores ~0).
    assert nearest_is_own(kept.frozen, expected, real).min() >= 0.9
    assert kept.frozen[real].abs().sum(-1).min() > 0  # every real position was run, the last ones too


def test_a_call_nested_in_another_calls_step_changes_neither(models):
    """A PPO rollout yields to a person's request between two of its steps, on the same copy."""
    tok = models.tokenizer
    outer_prompts = [render_prompt(tok, [{"role": "user", "content": "Tell me about owls."}])] * 2
    inner_prompt = [render_prompt(tok, [{"role": "user", "content": "Hello there"}])]
    alone_outer = sample(models.serving, tok, outer_prompts, Sampling(8, 0.9, seed=7, stop_loops=False))
    alone_inner = sample(models.serving, tok, inner_prompt, Sampling(5, 0.9, seed=8, stop_loops=False))
    inner: list = []

    def person_arrives() -> None:
        if len(inner) < 2:  # two requests, at the first two steps
            inner.append(sample(models.serving, tok, inner_prompt, Sampling(5, 0.9, seed=8, stop_loops=False)))

    outer = sample(models.serving, tok, outer_prompts, Sampling(8, 0.9, seed=7, stop_loops=False), on_step=person_arrives)
    assert outer.texts == alone_outer.texts
    assert [r.texts for r in inner] == [alone_inner.texts] * 2


def test_a_model_it_does_not_support_falls_back_to_generate(tmp_path, bundled_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf_chat.model.loading import load_tokenizer

    tok = load_tokenizer(str(bundled_path))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, attention_bias=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not is_supported(model) and decoder_for(model) is None
    prompt = render_prompt(tok, [{"role": "user", "content": "Hi"}])
    out = sample(model, tok, [prompt], Sampling(4, 1.0, seed=1, stop_loops=False))
    assert len(out.texts) == 1 and out.token_counts[0] >= 1


@torch.no_grad()
def test_lora_on_the_mlp_projections_is_applied_and_keeps_the_mlp_off_the_native_call(tiny_path):
    """Adapters may target gate, up and down too (model.lora_targets): the decoder adds
    them, as the model does, and those layers' MLP half stays on separate projections."""
    cfg = ModelConfig(name=str(tiny_path), lora_targets=("q_proj", "gate_proj", "up_proj", "down_proj"))
    loaded = with_a_moved_policy(cfg, seed=5)
    decoder = Decoder(loaded.serving)
    top = decoder.layers[-1]
    assert {"gate_proj", "up_proj", "down_proj"} <= set(top.lora) and not top.native_mlp
    ids, mask = padded_prompts(loaded.tokenizer)
    _, logits = decoder.start(ids, mask, 2, torch.tensor([1, 0]))
    assert_same_function(logits, model_logits(loaded.serving, ids, mask, ["policy", BASE_ADAPTER]), loaded.kernel)
