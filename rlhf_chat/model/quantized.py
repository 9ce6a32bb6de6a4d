"""Quantized: layers that multiply by the bundled model's own 4-bit values, fast.

The bundled GGUF stores each decoder matrix as Q4_1: blocks of 32 weights,
each block ``d * q + m`` with ``q`` in 0..15 and a scale ``d`` and offset
``m`` per block. Quantizing those values again to NF4 (bitsandbytes) moved
every weight by about 9% and cost 0.29 nats per token on the project's answer
set. They need no new quantization: torch's int4 CPU kernel
(``_weight_int4pack_mm_for_cpu``) multiplies groups of 32 four-bit integers,
each group ``(q - 8) * scale + zero``, which is a Q4_1 block with
``scale = d`` and ``zero = m + 8 d``. :func:`int4_groups` finds ``q``, ``d``
and ``m`` again from the de-quantized values (a block's smallest weight is
its ``q = 0``, its largest its ``q = 15``), so the kernel multiplies by the
shipped values, up to the bf16 rounding of each block's scale and offset.

The output layer shares the token embeddings, which ship as Q8_0 (blocks of
32 eight-bit integers); :class:`Int8OutputLayer` keeps them as eight-bit
integers with one scale per row, torch's int8 kernel.

Two kernels multiply by these values (the ``model.int4_kernel`` setting):
torch's own, which round the activations to bf16, and the native ones of
``kernels.c`` (:mod:`rlhf_chat.model.native`), float32 activations, for CPUs
with AVX2, where torch's int4 kernel was the slowest part of a decoding step.

Decoding reads every weight once per token: four bits a weight decode as
fast as NF4, where the same values in bf16 took twice as long. These kernels have no backward,
so the training copy holds the same values dense in bf16
(:func:`dense_weight`), which also multiplies long batches faster.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_chat.model import native

GROUP = 32  # weights per Q4_1 block, and per int4 group


def int4_groups(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups of ``weight`` (N, K): integers ``q`` (N, K) in 0..15,
    and a scale and minimum per group (N, K / group), so that
    ``weight ~= q * scale + minimum``, exactly for values that are Q4_1 blocks.

    >>> q, s, m = int4_groups(torch.tensor([[0.5, 2.0, 1.25, 0.5]]), group=4)
    >>> q.tolist(), s.tolist(), m.tolist()
    ([[0, 15, 7, 0]], [[0.10000000149011612]], [[0.5]])
    """
    n, k = weight.shape
    if k % group:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group}")
    blocks = weight.float().reshape(n, k // group, group)
    minimum = blocks.amin(-1)
    scale = (blocks.amax(-1) - minimum) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((blocks - minimum[..., None]) / safe[..., None]).clamp_(0, 15)
    return q.to(torch.int32).reshape(n, k), scale, minimum


def int4_values(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """What the int4 kernel multiplies by (N, K), float32: ``(q - 8) * scale + zero``
    with the scale and ``zero = minimum + 8 * scale`` rounded to bf16, as it stores them."""
    n, k = q.shape
    scale16, zero16 = (t.to(torch.bfloat16).float() for t in (scale, minimum + 8 * scale))
    blocks = (q.reshape(n, k // group, group).float() - 8) * scale16[..., None] + zero16[..., None]
    return blocks.reshape(n, k)


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit rows of ``weight`` (N, K): integers (N, K) in -127..127 and one scale per row (N,)."""
    scale = weight.float().abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(weight.float() / safe[:, None]).clamp_(-127, 127).to(torch.int8), scale


def int8_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel multiplies by (N, K), float32, with the scale rounded to bf16."""
    return q.float() * scale.to(torch.bfloat16).float()[:, None]


def int4_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``q`` (N, K) in 0..15 packed two to a byte, the first in the low nibble (N, K / 2),
    as ``kernels.c`` reads them."""
    n, k = q.shape
    pairs = q.reshape(n, k // 2, 2).to(torch.uint8)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


class Int4Linear(nn.Linear):
    """A frozen linear layer on a 4-bit kernel, float32 in and out.

    ``kernel`` (the ``model.int4_kernel`` setting, resolved by
    :func:`rlhf_chat.model.native.resolve_kernel`) says which:

    * ``torch``: torch's int4 CPU kernel, which rounds activations to bf16;
    * ``avx2``: the native kernel (``kernels.c``), float32 activations, the
      weights packed in its own layout (:func:`int4_nibbles`).

    Both multiply by :func:`int4_values`. A subclass of ``nn.Linear`` so that
    peft adds LoRA to it like any other; its ``weight`` is the packed uint8
    buffer (not a float, so peft keeps the LoRA weights in float32).
    Eval-only: the kernels have no backward.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int = GROUP,
                 kernel: str = "torch", cache_dir: str = ""):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.group, self.kernel, self.cache_dir = group, kernel, cache_dir
        q, scale, minimum = int4_groups(weight, group)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        zeros = minimum + 8 * scale
        if kernel == "avx2":
            self.weight = nn.Parameter(int4_nibbles(q), requires_grad=False)
            pairs = torch.stack([scale, zeros], dim=-1).to(torch.bfloat16).float().contiguous()
            self.register_buffer("scales_and_zeros", pairs)  # (N, K / group, 2), float32 of bf16 values
        elif kernel == "torch":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.weight = nn.Parameter(packed, requires_grad=False)
            pairs = torch.stack([scale.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
            self.register_buffer("scales_and_zeros", pairs)  # (K / group, N, 2), as the kernel reads them
        else:
            raise ValueError(f"Int4Linear: unknown kernel {kernel!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)`` with W the layer's 4-bit values, in ``x``'s dtype."""
        if self.kernel == "avx2":
            out = native.int4_matmul(self.cache_dir, x, self.weight, self.scales_and_zeros)
        else:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group, self.scales_and_zeros)
            out = out.float().reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out if out.dtype is x.dtype else out.to(x.dtype)


class Int8OutputLayer(nn.Module):
    """The frozen output layer on an 8-bit kernel (one scale per row): torch's, with
    bf16 activations, or the native one (``kernel="avx2"``), float32 activations."""

    def __init__(self, weight: torch.Tensor, kernel: str = "torch", cache_dir: str = ""):
        super().__init__()
        if kernel not in ("torch", "avx2"):
            raise ValueError(f"Int8OutputLayer: unknown kernel {kernel!r}")
        q, scale = int8_rows(weight)
        self.out_features, self.in_features = weight.shape
        if kernel == "avx2" and self.in_features % 8:
            raise ValueError(f"Int8OutputLayer: the native kernel needs a width divisible by 8, not {self.in_features}")
        self.kernel, self.cache_dir = kernel, cache_dir
        self.register_buffer("weight", q)
        scales = scale.to(torch.bfloat16)
        self.register_buffer("scales", scales.float() if kernel == "avx2" else scales)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states (..., H), in ``hidden``'s dtype."""
        if self.kernel == "avx2":
            return native.int8_matmul(self.cache_dir, hidden, self.weight, self.scales).to(hidden.dtype)
        flat = hidden.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        return out.reshape(*hidden.shape[:-1], self.out_features).to(hidden.dtype)


def dense_weight(weight: torch.Tensor, kind: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The values the serving copy's ``kind`` ("int4" | "int8") layer multiplies by, in ``dtype``.

    float32 holds them exactly (a bf16 scale times a small integer, plus a bf16
    offset); bf16 rounds them to 8 bits of mantissa, as the kernels round their
    activations. bf16 is faster only where the hardware multiplies it: on a CPU
    without AVX512-BF16 or AMX it is emulated, and a PPO update took 150 s
    instead of 1.5 s (``loading.fast_matmul_dtype`` chooses).
    """
    if kind == "int4":
        return int4_values(*int4_groups(weight)).to(dtype)
    if kind == "int8":
        return int8_values(*int8_rows(weight)).to(dtype)
    raise ValueError(f"unknown kind {kind!r}")
