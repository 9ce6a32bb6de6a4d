"""The native kernels (model/kernels.c, model/native.py): they multiply by the same
values as torch's int4 and int8 kernels, in float32, and say plainly when they cannot run."""

from __future__ import annotations

import pytest
import torch

from rlhf_chat.config import ModelConfig
from rlhf_chat.model import native
from rlhf_chat.model.decoder import fuse, fuse_int4
from rlhf_chat.model.quantized import Int4Linear, Int8OutputLayer, int4_groups, int4_values, int8_rows, int8_values

CACHE = ModelConfig().cache_dir


def native_or_skip() -> None:
    """Skip where the kernels cannot run here (no AVX2/FMA, no compiler), saying why."""
    try:
        native.library(CACHE)
    except native.NativeUnavailable as error:
        pytest.skip(f"native kernels unavailable: {error}")


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected).abs().max() / expected.abs().max()).item()


# the 4-row and 8-row register tiles, the 32-row cache block, and their edges; a width too
# wide for the 8-row tile (its activations would leave the L1 cache) takes the 4-row one only
@pytest.mark.parametrize("rows, width", [(1, 96), (2, 96), (3, 96), (5, 96), (8, 96), (13, 96), (37, 96), (13, 800)])
def test_int4_kernel_multiplies_by_the_int4_values_in_float32(rows, width):
    native_or_skip()
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(67, width, generator=gen), torch.randn(67, generator=gen)  # an odd number of outputs
    x = torch.randn(rows, width, generator=gen)
    expected = x.double() @ int4_values(*int4_groups(weight)).double().t() + bias.double()
    layer = Int4Linear(weight, bias, kernel="avx2", cache_dir=CACHE)
    out = layer(x)
    assert out.shape == (rows, 67) and out.dtype == torch.float32
    assert relative_error(out, expected) < 1e-5  # float32 sums; torch's kernel, bf16 activations, is ~3e-3 off
    on_torch = Int4Linear(weight[:64], bias[:64])(x)  # torch's kernel takes widths in multiples of 16
    assert relative_error(on_torch, expected[:, :64]) > 1e-4  # the check can tell bf16 activations from float32


@pytest.mark.parametrize("width", [96, 800])
def test_a_rows_int4_product_is_the_same_whatever_rows_share_its_tile(width):
    """Batching never changes an answer: rows in 8-row, 4-row and 1-row tiles add in one order."""
    native_or_skip()
    gen = torch.Generator().manual_seed(width)
    layer = Int4Linear(torch.randn(35, width, generator=gen), kernel="avx2", cache_dir=CACHE)
    x = torch.randn(45, width, generator=gen)  # a full 32-row block (four 8-row tiles), then 13 rows
    together = layer(x)
    alone = torch.cat([layer(row[None]) for row in x])
    assert torch.equal(together, alone)
    assert torch.equal(layer(x[3:12]), together[3:12])  # one 8-row tile, then one row


@pytest.mark.parametrize("rows", [1, 2, 7, 40])
def test_int8_kernel_multiplies_by_the_int8_values_in_float32(rows):
    native_or_skip()
    gen = torch.Generator().manual_seed(10 + rows)
    weight, hidden = torch.randn(101, 64, generator=gen), torch.randn(rows, 64, generator=gen)
    expected = hidden.double() @ int8_values(*int8_rows(weight)).double().t()
    out = Int8OutputLayer(weight, kernel="avx2", cache_dir=CACHE)(hidden)
    assert out.shape == (rows, 101) and relative_error(out, expected) < 1e-5


def test_native_int4_layers_of_any_width_fuse_exactly():
    """The native layout is row after row: q, k, v of any widths concatenate."""
    native_or_skip()
    gen = torch.Generator().manual_seed(3)
    layers = [Int4Linear(torch.randn(n, 64, generator=gen), kernel="avx2", cache_dir=CACHE) for n in (64, 32, 32)]
    x = torch.randn(3, 64, generator=gen)
    fused = fuse(layers)
    assert type(fused) is Int4Linear and fused.out_features == 128
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], -1))
    with pytest.raises(ValueError, match="different kernels"):
        fuse_int4([layers[0], Int4Linear(torch.randn(64, 64, generator=gen))])


def test_a_backward_through_the_native_kernels_fails_plainly():
    """As through torch's int4 kernel: the forward runs, a backward says why it cannot."""
    native_or_skip()
    layer = Int4Linear(torch.randn(32, 64), kernel="avx2", cache_dir=CACHE)
    x = torch.randn(2, 64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, layer(x.detach()))
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()


def test_a_cache_folder_it_cannot_write_means_torchs_kernel_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_CHAT_NATIVE", raising=False)  # make test-isa switches them off on one of its runs
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    kernel, why = native.resolve_kernel("auto", blocked)
    assert kernel == "torch" and "could not build or load" in why


def test_the_native_kernels_can_be_switched_off_with_the_reason(tmp_path, monkeypatch):
    """RLHF_CHAT_NATIVE=0 runs a machine without a C compiler's paths (make test-isa)."""
    monkeypatch.setenv("RLHF_CHAT_NATIVE", "0")
    with pytest.raises(native.NativeUnavailable, match="RLHF_CHAT_NATIVE=0"):
        native.library(str(tmp_path))
    assert native.resolve_kernel("auto", tmp_path) == ("torch", "native kernels unavailable: switched off by RLHF_CHAT_NATIVE=0")


def test_kernel_settings_resolve_and_say_why(tmp_path, monkeypatch):
    assert native.resolve_kernel("torch", tmp_path) == ("torch", "asked for by name")
    with pytest.raises(ValueError, match="expected one of auto, avx2, torch"):
        native.resolve_kernel("fast", tmp_path)
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    kernel, why = native.resolve_kernel("auto", tmp_path / "fresh")
    assert kernel == "torch" and "unavailable" in why
    with pytest.raises(native.NativeUnavailable, match="int4_kernel avx2"):
        native.resolve_kernel("avx2", tmp_path / "fresh")
    assert not list((tmp_path / "fresh").rglob("*.so"))  # a failed build leaves nothing to load later


def test_auto_matches_the_training_copys_activations():
    """float32 training (no native bf16): the native kernels, float32 activations too;
    bf16 training: torch's kernel, which rounds activations to bf16 as it does."""
    native_or_skip()
    assert native.resolve_kernel("auto", CACHE, torch.float32)[0] == "avx2"
    kernel, why = native.resolve_kernel("auto", CACHE, torch.bfloat16)
    assert kernel == "torch" and "bfloat16" in why
    assert native.resolve_kernel("avx2", CACHE, torch.bfloat16)[0] == "avx2"  # by name, it is what runs


@pytest.mark.parametrize("rows", [1, 6])
def test_the_native_mlp_is_the_llama_mlp_plus_its_input(rows):
    native_or_skip()
    gen = torch.Generator().manual_seed(20 + rows)
    width, inner = 64, 96
    gate_up = Int4Linear(torch.randn(2 * inner, width, generator=gen) * 0.2, kernel="avx2", cache_dir=CACHE)
    down = Int4Linear(torch.randn(width, inner, generator=gen) * 0.2, kernel="avx2", cache_dir=CACHE)
    hidden, norm = torch.randn(rows, 1, width, generator=gen) * 3, torch.rand(width, generator=gen) + 0.5
    eps = 1e-5
    h = hidden.double()
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    gate, up = (x @ native_values(gate_up, width).t()).chunk(2, dim=-1)
    expected = h + (torch.nn.functional.silu(gate) * up) @ native_values(down, inner).t()
    out = native.int4_mlp(CACHE, hidden, norm, eps, gate_up, down)
    assert out.shape == hidden.shape and relative_error(out, expected) < 1e-5


def native_values(layer: Int4Linear, width: int) -> torch.Tensor:
    """The float64 weights a native int4 layer multiplies by, read back from its own buffers."""
    low, high = layer.weight & 0x0F, layer.weight >> 4
    q = torch.stack([low, high], dim=-1).reshape(layer.out_features, width).double()
    scale, zero = layer.scales_and_zeros.double().unbind(-1)
    values = (q.reshape(layer.out_features, -1, 32) - 8) * scale[..., None] + zero[..., None]
    return values.reshape(layer.out_features, width)


@pytest.mark.parametrize(
    "heads, kv_heads, d, at",
    [(4, 2, 32, 5), (8, 2, 20, 0), (3, 3, 64, 8)],  # grouped or not; a head width off the 8 lanes; the first and last slot
)
def test_the_native_attention_step_is_the_llama_attention_plus_its_input(heads, kv_heads, d, at):
    """One new position per row against a cache with left padding, grouped heads and
    rotary positions, computed again here with torch's own operations in float64."""
    native_or_skip()
    from rlhf_chat.model.decoder import rotate

    gen = torch.Generator().manual_seed(30 + d)
    rows, width, total = 3, 64, 9
    qkv_weight = torch.randn((heads + 2 * kv_heads) * d, width, generator=gen) * 0.2
    qkv = Int4Linear(qkv_weight, kernel="avx2", cache_dir=CACHE)
    o = Int4Linear(torch.randn(width, heads * d, generator=gen) * 0.2, kernel="avx2", cache_dir=CACHE)
    hidden, norm = torch.randn(rows, 1, width, generator=gen) * 2, torch.rand(width, generator=gen) + 0.5
    keys = torch.randn(rows, kv_heads, total, d, generator=gen)
    values = torch.randn(rows, kv_heads, total, d, generator=gen)
    valid = torch.ones(rows, total, dtype=torch.bool)
    valid[1, : min(2, at)] = False  # row 1 is left-padded by two positions (where there are two before it)
    angles = torch.rand(rows, d // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    cached_keys, cached_values = keys.double().clone(), values.double().clone()
    before = keys.clone()

    out = native.int4_attention_step(
        CACHE, hidden, norm, 1e-5, qkv, o, heads, kv_heads, keys, values, at, valid, cos, sin
    )

    h = hidden.double()
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.double()
    q, k, v = (x @ native_values(qkv, width).t()).view(rows, 1, heads + 2 * kv_heads, d).transpose(1, 2).split(
        [heads, kv_heads, kv_heads], dim=1
    )
    c, s = cos.double()[:, None, None], sin.double()[:, None, None]
    q, k = rotate(q, c, s), rotate(k, c, s)
    cached_keys[:, :, at:at + 1], cached_values[:, :, at:at + 1] = k, v
    mask = valid[:, None, None, : at + 1]
    attended = torch.nn.functional.scaled_dot_product_attention(
        q, cached_keys[:, :, : at + 1], cached_values[:, :, : at + 1], attn_mask=mask, enable_gqa=True
    )
    expected = h + attended.transpose(1, 2).reshape(rows, 1, heads * d) @ native_values(o, heads * d).t()
    assert relative_error(out, expected) < 1e-5
    assert relative_error(keys[:, :, at], cached_keys[:, :, at]) < 1e-5  # the new keys and values are in the cache
    assert relative_error(values[:, :, at], cached_values[:, :, at]) < 1e-5
    others = torch.arange(total) != at
    assert torch.equal(keys[:, :, others], before[:, :, others])  # nothing else in the cache moved


def test_the_native_attention_step_refuses_what_does_not_fit():
    native_or_skip()
    qkv = Int4Linear(torch.randn(4 * 16, 64), kernel="avx2", cache_dir=CACHE)
    o = Int4Linear(torch.randn(64, 2 * 16), kernel="avx2", cache_dir=CACHE)
    hidden, keys = torch.randn(2, 1, 64), torch.zeros(2, 1, 5, 16)
    valid, cos = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 16)
    with pytest.raises(ValueError, match="a position within the cache"):
        native.int4_attention_step(CACHE, hidden, torch.ones(64), 1e-5, qkv, o, 2, 1, keys, keys.clone(), 5, valid, cos, cos)
    with pytest.raises(ValueError, match="one new position per row"):
        native.int4_attention_step(
            CACHE, torch.randn(2, 3, 64), torch.ones(64), 1e-5, qkv, o, 2, 1, keys, keys.clone(), 1, valid, cos, cos
        )
    with pytest.raises(ValueError, match="width 32 for a layer of width 64"):
        qkv(torch.randn(2, 32))


def test_the_kernels_are_built_once_and_no_request_shape_builds_them_again(tmp_path, monkeypatch):
    """Built into the cache on the first start; later starts, and requests of any number
    of rows or width, load that build: the compiler never runs again."""
    native_or_skip()
    import subprocess

    builds: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        if "-shared" in command:
            builds.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", counting_run)
    cache = str(tmp_path)
    native.library(cache)
    assert len(builds) == 1 and len(list(tmp_path.rglob("*.so"))) == 1
    native.library.cache_clear()  # a later start: a new process, the same cache
    for rows, width in ((1, 64), (7, 96), (40, 32)):
        layer = Int4Linear(torch.randn(48, width), kernel="avx2", cache_dir=cache)
        layer(torch.randn(rows, width))
    assert len(builds) == 1
