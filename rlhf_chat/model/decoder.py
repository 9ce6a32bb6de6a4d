"""Decoder: the serving copy's decoding loop, in few and large operations.

``transformers``' ``generate`` runs every decoding step through the generic
model code: per layer, peft's LoRA wrapper, the cache object, separate q, k, v,
gate and up projections, a rotary embedding recomputed from the positions, and
the loop's own logits processors and stopping criteria. On the 2-core CPU a
step of the bundled model (30 layers, 2 rows, one token each) took about 31 ms,
where reading its 4-bit weights once takes about 8 ms: the rest was overhead.

:class:`Decoder` runs the same Llama-family computation on the serving copy's
own tensors, with

* a static key/value cache per layer, filled in place;
* the q, k and v projections fused into one int4 matmul, and the gate and up
  projections into another (:func:`fuse_int4`: the packed rows concatenated);
* the rotary tables computed once per call for every position;
* the LoRA adapter as two small matmuls beside its base layer, scaled per
  row, so that the policy and the reference (scale 0) share a step;
* RMSNorm as one fused op, and the output layer on the last position only;
* on request (a PPO rollout), the hidden states entering the first adapted
  layer kept for every position (:class:`Tap`): PPO's scoring needs the
  frozen layers' output over prompt and answer, and this is it.

It reads the peft LoRA parameters themselves, not copies, so an update the
worker syncs into the serving copy is what the next step uses. Numerics follow
the generic path (float32 residual stream and norms, bf16 into the int4
kernel), so what is sampled and what PPO scores stay one distribution:
``tests/test_decoder.py`` checks its logits against the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from rlhf_chat.model import native
from rlhf_chat.model.quantized import Int4Linear


@dataclass
class Lora:
    """One LoRA adapter on one projection: ``x @ A.T @ B.T * scaling``, the live peft tensors."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float


@dataclass
class Layer:
    """One decoder layer's tensors, as the step reads them."""

    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qkv: nn.Module  # fused q, k, v projections: (H + 2 KV) outputs
    o: nn.Module
    gate_up: nn.Module  # fused gate and up projections: 2 I outputs
    down: nn.Module
    lora: dict[str, Lora]  # target name ("q_proj", ...) -> adapter; empty for a frozen layer

    @cached_property
    def native_attention(self) -> bool:
        """Whether a decoding step's attention half runs as one native call
        (:func:`native.int4_attention_step`): q, k, v and o on the native int4
        kernel, and no LoRA on them (the layers below ``model.lora_top_layers``)."""
        return on_native_int4(self.qkv, self.o) and not self.lora.keys() & {"q_proj", "k_proj", "v_proj", "o_proj"}

    @cached_property
    def native_mlp(self) -> bool:
        """Whether the MLP half runs as one native call (:func:`native.int4_mlp`):
        its layers on the native int4 kernel, and no LoRA on them."""
        return on_native_int4(self.gate_up, self.down) and not self.lora.keys() & {"gate_proj", "up_proj", "down_proj"}


def on_native_int4(*layers: nn.Module) -> bool:
    """Whether these layers are unbiased int4 layers on the native kernel (what its
    one-call layer halves read: their packed weights and scales, no bias)."""
    return all(type(m) is Int4Linear and m.kernel == "avx2" and m.bias is None for m in layers)


INT4_ROW_BLOCK = 64  # the CPU int4 kernel packs output rows in interleaved blocks of 64


def fuse_int4(layers: list[Int4Linear]) -> Int4Linear:
    """One :class:`Int4Linear` whose outputs are ``layers``' outputs, concatenated.

    The native kernel's layout is row after row, so its layers concatenate as
    they are. Torch's CPU int4 kernel packs output rows in blocks of 64 ((N,
    K / 2) bytes, interleaved within a block; scales (K / group, N, 2)), so
    there concatenating layers of whole blocks concatenates their outputs
    exactly. Other widths are refused: their rows would land in the wrong block.
    """
    kernel = layers[0].kernel
    if any(layer.kernel != kernel for layer in layers):
        raise ValueError("fuse_int4: the layers run on different kernels")
    if kernel == "torch" and any(layer.out_features % INT4_ROW_BLOCK for layer in layers):
        raise ValueError(f"fuse_int4: output widths must be multiples of {INT4_ROW_BLOCK}")
    if any(layer.bias is not None for layer in layers):
        raise ValueError("fuse_int4: biased layers are not fused")
    fused = Int4Linear.__new__(Int4Linear)
    nn.Module.__init__(fused)
    fused.in_features = layers[0].in_features
    fused.out_features = sum(layer.out_features for layer in layers)
    fused.group, fused.kernel, fused.cache_dir = layers[0].group, kernel, layers[0].cache_dir
    fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
    fused.bias = None
    row_dim = 0 if kernel == "avx2" else 1
    fused.register_buffer("scales_and_zeros", torch.cat([layer.scales_and_zeros for layer in layers], dim=row_dim))
    return fused


class Concat(nn.Module):
    """Several linear layers on one input, outputs concatenated: the unfused fallback
    of :func:`fuse_int4` for weights held any other way (bf16, NF4, float32)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[layer(x) for layer in parts]``, concatenated on the last dimension."""
        return torch.cat([part(x) for part in self.parts], dim=-1)


def fuse(layers: list[nn.Module]) -> nn.Module:
    """The fused projection of ``layers`` (:func:`fuse_int4` where all are int4 on one
    kernel, and, on torch's, of whole row blocks)."""
    if all(type(layer) is Int4Linear for layer in layers) and len({layer.kernel for layer in layers}) == 1:
        if layers[0].kernel == "avx2" or all(layer.out_features % INT4_ROW_BLOCK == 0 for layer in layers):
            return fuse_int4(layers)
    return Concat(layers)


def split_lora(module: nn.Module, adapter: str) -> tuple[nn.Module, Lora | None]:
    """A projection's frozen base layer, and its LoRA adapter ``adapter`` if it has one."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module, None
    if adapter not in module.lora_A:
        return base, None
    return base, Lora(module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter]))


def is_supported(model: nn.Module) -> bool:
    """Whether :class:`Decoder` can run this model: a Llama-family decoder with
    plain LoRA (no DoRA, no dropout at serving), rotary positions and no biases."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in ("llama", "mistral", "qwen2") or getattr(config, "attention_bias", False):
        return False
    if getattr(config, "mlp_bias", False) or getattr(config, "sliding_window", None):
        return False
    layer = base.model.layers[0]
    return hasattr(layer.self_attn, "q_proj") and hasattr(layer.mlp, "gate_proj")


class Decoder:
    """Prefill and decoding steps of a (peft-wrapped) Llama-family serving copy.

    Build it once per serving copy (:func:`decoder_for`); :meth:`start` takes a
    left-padded batch and returns the first logits, :meth:`step` one token per
    row and returns the next logits.
    """

    def __init__(self, model: nn.Module, adapter: str = "policy"):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config
        self.embed = base.model.embed_tokens
        self.norm = base.model.norm
        self.lm_head = base.lm_head
        self.rotary = base.model.rotary_emb
        self.eps = float(self.config.rms_norm_eps)
        self.heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.heads
        self.adapter = adapter
        self.layers = [self._layer(layer, adapter) for layer in base.model.layers]
        # The first layer with an adapter: below it every row computes the base model
        self.split = next((i for i, layer in enumerate(self.layers) if layer.lora), len(self.layers))

    def _layer(self, layer: nn.Module, adapter: str) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        owner = {n: attn if n in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp for n in names}
        bases, loras = {}, {}
        for name in names:
            bases[name], lora = split_lora(getattr(owner[name], name), adapter)
            if lora is not None:
                loras[name] = lora
        return Layer(
            attn_norm=layer.input_layernorm.weight,
            mlp_norm=layer.post_attention_layernorm.weight,
            qkv=fuse([bases["q_proj"], bases["k_proj"], bases["v_proj"]]),
            o=bases["o_proj"],
            gate_up=fuse([bases["gate_proj"], bases["up_proj"]]),
            down=bases["down_proj"],
            lora=loras,
        )

    # -- one batch -------------------------------------------------------------------------

    def start(
        self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, lora_rows: torch.Tensor, tap: bool = False
    ) -> tuple[Batch, torch.Tensor]:
        """Prefill a left-padded batch ``ids`` (B, P) with its ``mask``.

        ``lora_rows`` (B,) is 1 where a row uses the adapter and 0 where it is the
        reference (adapters off). Returns the batch's state, which :meth:`step`
        continues, and the last position's logits (B, V). The state is the
        call's own: a PPO rollout yields to a person's request between two steps,
        and both decode on this one copy.

        Rows with the same prompt are computed once: the two candidates of a
        pair share their prompt, so its prefill, most of the wait for the first
        token, costs half. Rows that differ only in ``lora_rows`` (an arena pair)
        are one row through the layers below the first adapted one
        (``model.lora_top_layers``), and part there; every row's cache is filled.

        With ``tap``, the hidden states entering the first adapted layer are kept
        for every row and position (:class:`Tap`): the frozen layers' output,
        which PPO's scoring would otherwise compute again.
        """
        width = ids.shape[1]
        batch = Batch.empty(self, mask, max_new_tokens, lora_rows)
        if tap and self.split == len(self.layers):
            raise ValueError("tap: this model has no adapted layer, so no frozen layers' output to keep")
        if tap:
            batch.tap = Tap.empty(self.split, batch.keys_valid.shape, self.config.hidden_size, ids.device)
        causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
        attend = causal & mask.bool()[:, None, :]
        attend |= torch.eye(width, dtype=torch.bool, device=ids.device)  # padding attends to itself: no NaN rows
        prompts = Twins.of(torch.cat([ids, mask], dim=-1))
        scales = batch.lora_rows.view(-1, 1).double()  # exact: token ids and any scale, in float64
        adapted = Twins.of(torch.cat([ids.double(), mask.double(), scales], dim=-1))
        twins = prompts
        hidden = self.embed(ids.index_select(0, twins.first))
        for i, (layer, cache) in enumerate(zip(self.layers, batch.cache)):
            if batch.tap is not None and i == batch.tap.layer:
                batch.tap.hidden[:, :width] = hidden.index_select(0, twins.inverse)
            if layer.lora and twins is prompts and adapted.count > prompts.count:
                hidden = hidden.index_select(0, prompts.inverse[adapted.first])  # the rows part here
                twins = adapted
            first = twins.first
            cos, sin = batch.cos[:, :, :width].index_select(0, first), batch.sin[:, :, :width].index_select(0, first)
            scale, rows_attend = batch.lora_rows.index_select(0, first), attend.index_select(0, first).unsqueeze(1)
            hidden = hidden + self._attention(
                layer, hidden, *cache, 0, width, cos, sin, rows_attend, scale, twins.inverse
            )
            hidden = self._mlp(layer, hidden, scale)
        batch.length = width
        return batch, self._logits(hidden).index_select(0, twins.inverse)

    def step(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row of ``batch`` (its rows, in order) and return the next logits."""
        at = batch.length
        batch.length += 1
        attend = batch.keys_valid[:, None, None, : batch.length]
        return self._forward(batch, self.embed(tokens[:, None]), at, 1, attend)

    def tap_last(self, batch: Batch, tokens: torch.Tensor) -> None:
        """Run the batch's last tokens (one per row) through the layers below the tap
        only, to keep their states: nothing is sampled after them."""
        if batch.tap is None:
            raise ValueError("tap_last needs a batch started with tap=True")
        at = batch.length
        batch.length += 1
        attend = batch.keys_valid[:, None, None, : batch.length]
        self._run_layers(batch, self.embed(tokens[:, None]), at, 1, attend, batch.tap.layer)

    # -- the computation -------------------------------------------------------------------

    def _forward(self, batch: Batch, hidden: torch.Tensor, at: int, count: int, attend: torch.Tensor) -> torch.Tensor:
        return self._logits(self._run_layers(batch, hidden, at, count, attend, len(self.layers)))

    def _run_layers(
        self, batch: Batch, hidden: torch.Tensor, at: int, count: int, attend: torch.Tensor, until: int
    ) -> torch.Tensor:
        """The layers below ``until`` on ``count`` new positions from ``at``; their output."""
        cos, sin = batch.cos[:, :, at: at + count], batch.sin[:, :, at: at + count]
        scale = batch.lora_rows
        row_cos = row_sin = None  # (B, D): this position's rotary tables, for the native attention step
        for i, (layer, (keys, values)) in enumerate(zip(self.layers, batch.cache)):
            if batch.tap is not None and i == batch.tap.layer:
                batch.tap.hidden[batch.tap.rows, at: at + count] = hidden
            if i == until:
                return hidden
            if count == 1 and layer.native_attention:
                if row_cos is None:
                    row_cos, row_sin = cos[:, 0, 0].contiguous(), sin[:, 0, 0].contiguous()
                hidden = native.int4_attention_step(
                    layer.qkv.cache_dir, hidden, layer.attn_norm, self.eps, layer.qkv, layer.o, self.heads,
                    self.kv_heads, keys, values, at, batch.keys_valid, row_cos, row_sin,
                )
            else:
                hidden = hidden + self._attention(layer, hidden, keys, values, at, count, cos, sin, attend, scale)
            hidden = self._mlp(layer, hidden, scale)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        last = nn.functional.rms_norm(hidden[:, -1], (hidden.shape[-1],), self.norm.weight, self.eps)
        return self.lm_head(last).float()

    def _project(self, layer: Layer, base: nn.Module, x: torch.Tensor, names: tuple[str, ...], scale) -> torch.Tensor:
        out = base(x)
        if not layer.lora or not any(n in layer.lora for n in names):
            return out
        parts = list(out.split(self._widths(names), dim=-1)) if len(names) > 1 else [out]
        for i, name in enumerate(names):
            lora = layer.lora.get(name)
            if lora is not None:
                delta = (x @ lora.a.t()) @ lora.b.t()
                parts[i] = parts[i] + delta * (scale * lora.scaling)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def _widths(self, names: tuple[str, ...]) -> list[int]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        inner = self.config.intermediate_size
        sizes = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": inner, "up_proj": inner}
        return [sizes[n] for n in names]

    def _attention(self, layer, hidden, keys, values, at, count, cos, sin, attend, scale, spread=None) -> torch.Tensor:
        """Self-attention of ``hidden``'s rows; their keys and values go into the cache.

        ``spread`` (prefill only, ``at`` 0): the batch's rows as indices into
        ``hidden``'s, which are the distinct ones (:class:`Twins`); each batch
        row's cache gets its twin's keys and values.
        """
        rows = hidden.shape[0]
        x = nn.functional.rms_norm(hidden, (hidden.shape[-1],), layer.attn_norm, self.eps)
        qkv = self._project(layer, layer.qkv, x, ("q_proj", "k_proj", "v_proj"), scale)
        q, k, v = qkv.view(rows, count, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1
        )
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        end = at + count
        if spread is None:
            keys[:, :, at:end] = k
            values[:, :, at:end] = v
            k, v = keys[:, :, :end], values[:, :, :end]
        else:
            if at != 0:
                raise ValueError("spread rows only in a prefill, which starts at position 0")
            keys[:, :, at:end] = k.index_select(0, spread)
            values[:, :, at:end] = v.index_select(0, spread)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, enable_gqa=self.heads != self.kv_heads
        )
        out = out.transpose(1, 2).reshape(rows, count, self.heads * self.head_dim)
        return self._project(layer, layer.o, out, ("o_proj",), scale)

    def _mlp(self, layer: Layer, hidden: torch.Tensor, scale) -> torch.Tensor:
        """``hidden`` plus the layer's MLP of it."""
        if layer.native_mlp:
            return native.int4_mlp(layer.gate_up.cache_dir, hidden, layer.mlp_norm, self.eps, layer.gate_up, layer.down)
        x = nn.functional.rms_norm(hidden, (hidden.shape[-1],), layer.mlp_norm, self.eps)
        gate, up = self._project(layer, layer.gate_up, x, ("gate_proj", "up_proj"), scale).chunk(2, dim=-1)
        return hidden + self._project(layer, layer.down, nn.functional.silu(gate) * up, ("down_proj",), scale)


@dataclass
class Twins:
    """Rows that are one another's copies: ``first`` (U,) the first row of each of
    the U distinct ones, ``inverse`` (B,) which of them each row is."""

    first: torch.Tensor
    inverse: torch.Tensor

    @property
    def count(self) -> int:
        """How many distinct rows there are."""
        return self.first.numel()

    @classmethod
    def of(cls, rows: torch.Tensor) -> Twins:
        """The twins among ``rows`` (B, W), in the order of their first rows."""
        _, inverse = torch.unique(rows, dim=0, return_inverse=True)
        position = torch.arange(rows.shape[0], device=rows.device)
        first = torch.full((int(inverse.max()) + 1,), rows.shape[0], dtype=torch.long, device=rows.device)
        first = first.scatter_reduce(0, inverse, position, reduce="amin")
        order = first.argsort()  # distinct rows in the batch's own order
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=rows.device)
        return cls(first[order], rank[inverse])


@dataclass
class Tap:
    """The hidden states entering one layer at every position a batch has run,
    kept for each of its first rows even after the decoder drops them."""

    layer: int
    hidden: torch.Tensor  # (B, P + new, H) in the batch's first row order; 0 where nothing ran
    rows: torch.Tensor  # (live,) which first row each of the batch's current rows is

    @classmethod
    def empty(cls, layer: int, shape: torch.Size, width: int, device: torch.device) -> Tap:
        """A tap before ``layer`` for a batch of ``shape`` (B, P + new) and hidden ``width``."""
        rows, positions = shape
        hidden = torch.zeros(rows, positions, width, device=device)
        return cls(layer, hidden, torch.arange(rows, device=device))


@dataclass
class Batch:
    """One sampling call's state: its key/value cache, rotary tables and masks."""

    cache: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, KV, P + new, D)
    keys_valid: torch.Tensor  # (B, P + new): False at left padding
    cos: torch.Tensor  # (B, 1, P + new, D)
    sin: torch.Tensor
    lora_rows: torch.Tensor  # (B, 1, 1): 1 where the row uses the adapter, 0 for the reference
    length: int = 0  # positions filled so far
    tap: Tap | None = None  # the frozen layers' output, kept when asked (Decoder.start)

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with only these rows (indices into the current rows, in order).

        A step's cost grows with its rows (on the 2-core CPU, bundled model: 18 ms
        at 1 row, 36 ms at 8, 177 ms at 64), and rows that have ended only pad, so
        the sampling loop drops them (:func:`rlhf_chat.generation.candidates.decode`).
        """
        self.cache = [(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in self.cache]
        self.keys_valid = self.keys_valid.index_select(0, rows)
        self.cos, self.sin = self.cos.index_select(0, rows), self.sin.index_select(0, rows)
        self.lora_rows = self.lora_rows.index_select(0, rows)
        if self.tap is not None:
            self.tap.rows = self.tap.rows.index_select(0, rows)

    @classmethod
    def empty(cls, decoder: Decoder, mask: torch.Tensor, max_new_tokens: int, lora_rows: torch.Tensor) -> Batch:
        """The state for a left-padded batch with ``mask`` (B, P), before its prefill."""
        rows, width = mask.shape
        device = mask.device
        total = width + max_new_tokens
        keys_valid = torch.ones(rows, total, dtype=torch.bool, device=device)
        keys_valid[:, :width] = mask.bool()
        # Left padding: a row's positions count its real tokens only, as generate's do.
        prompt_positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
        after = prompt_positions[:, -1:] + torch.arange(1, max_new_tokens + 1, device=device)
        probe = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = decoder.rotary(probe, torch.cat([prompt_positions, after], -1))  # (B, total, D)
        shape = (rows, decoder.kv_heads, total, decoder.head_dim)
        cache = [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in decoder.layers]
        scale = lora_rows.float().view(rows, 1, 1).to(device)
        return cls(cache, keys_valid, cos.unsqueeze(1), sin.unsqueeze(1), scale)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (B, heads, T, D), Llama's half-split layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def decoder_for(model: nn.Module, adapter: str = "policy") -> Decoder | None:
    """The model's :class:`Decoder`, built on first use and kept on the model;
    None where the model is not one it supports (``generate`` is used then)."""
    decoder = getattr(model, "_rlhf_decoder", None)
    if decoder is None and is_supported(model):
        decoder = Decoder(model, adapter)
        object.__setattr__(model, "_rlhf_decoder", decoder)  # not a submodule: no state-dict entry
    return decoder
