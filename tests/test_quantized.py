"""The int4 and int8 layers: they multiply by the shipped blocks, and say what they multiply by."""

from __future__ import annotations

import torch

from rlhf_chat.model.quantized import (
    Int4Linear,
    Int8OutputLayer,
    dense_weight,
    int4_groups,
    int4_values,
    int8_rows,
    int8_values,
)


def test_int4_groups_recover_q4_1_blocks_exactly():
    """A Q4_1 block is d * q + m with its smallest weight at q = 0 and its largest at
    q = 15: the groups found again are the shipped integers, scale and offset."""
    from rlhf_chat.model.quantized import int4_groups

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (8, 64), generator=gen)
    q[:, ::32], q[:, 1::32] = 0, 15  # every block holds its extremes, as ggml's quantizer makes them
    d = (torch.rand(8, 2, 1, generator=gen) * 0.01).half().float()
    m = (-torch.rand(8, 2, 1, generator=gen) * 0.05).half().float()
    weight = (q.reshape(8, 2, 32) * d + m).reshape(8, 64)
    found_q, found_d, found_m = int4_groups(weight)
    assert torch.equal(found_q, q.int())
    assert torch.allclose(found_d, d.squeeze(-1), rtol=1e-6) and torch.equal(found_m, m.squeeze(-1))


def test_int4_linear_multiplies_by_its_groups_and_adds_its_bias():
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    layer = Int4Linear(weight, bias)
    x = torch.randn(2, 3, 64, generator=gen)
    expected = x.to(torch.bfloat16).float() @ int4_values(*int4_groups(weight)).t() + bias
    out = layer(x)
    assert out.shape == (2, 3, 48) and out.dtype == torch.float32
    assert torch.allclose(out, expected, rtol=2**-7, atol=2e-3 * expected.abs().max().item())
    assert torch.equal(dense_weight(weight, "int4"), int4_values(*int4_groups(weight)).to(torch.bfloat16))
    # 4 bits a weight: the groups are a coarse copy, an int4 copy of random weights is ~5% off
    assert (int4_values(*int4_groups(weight)) - weight).norm() < 0.1 * weight.norm()


def test_int8_output_layer_multiplies_by_its_rows():
    gen = torch.Generator().manual_seed(2)
    weight, hidden = torch.randn(100, 64, generator=gen), torch.randn(5, 64, generator=gen)
    expected = hidden.to(torch.bfloat16).float() @ int8_values(*int8_rows(weight)).t()
    out = Int8OutputLayer(weight)(hidden)
    assert out.shape == (5, 100) and torch.allclose(out, expected, rtol=2**-7, atol=2e-3 * expected.abs().max().item())
    assert (int8_values(*int8_rows(weight)) - weight).norm() < 0.01 * weight.norm()
