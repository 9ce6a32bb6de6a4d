"""Native: the C kernels of ``kernels.c``, built on first use and loaded through ctypes.

On a CPU with AVX2 and FMA but no AVX-512, torch's CPU int4 kernel took 55%
of a decoding step, about three times what reading the weights costs
(README, "Decoding"); ``kernels.c`` multiplies by the same 4-bit (and the
output layer's 8-bit) values with float32 activations, 1.7x faster per layer
there, and exact where torch's kernel rounds the activations to bf16.

The library is compiled once per source and compiler into the model cache
folder (``model.cache_dir``/kernels, about a second with ``cc``) and loaded
from there afterwards. Where it cannot be (no AVX2/FMA, no C compiler, a
failed build) :func:`resolve_kernel` says why, and the ``auto`` setting uses
torch's kernel instead; asking for ``avx2`` by name then fails with that reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNELS = ("auto", "avx2", "torch")  # the model.int4_kernel setting
SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBRARIES = ("-lm",)  # after the source, or the linker drops them


class NativeUnavailable(RuntimeError):
    """The native kernels cannot run here; the message says why."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compiler() -> str:
    """The C compiler's command: ``$CC``, else ``cc``."""
    return os.environ.get("CC", "cc")


def library_path(cache_dir: str | Path, defines: tuple[str, ...] = ()) -> Path:
    """Where the library built from this source, by this compiler (with these ``-D``
    ``defines``: a benchmark's variant), lives in the cache."""
    try:
        version = subprocess.run([compiler(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeUnavailable(f"no C compiler ({compiler()}: {error})") from error
    parts = [SOURCE.read_text(), " ".join(FLAGS + LIBRARIES + tuple(defines)), version, platform.machine()]
    key = hashlib.sha256("\n".join(parts).encode())
    return Path(cache_dir) / "kernels" / key.hexdigest()[:16] / "libkernels.so"


def build(cache_dir: str | Path, defines: tuple[str, ...] = ()) -> Path:
    """Compile ``kernels.c`` (with ``-D`` each of ``defines``) into the cache unless
    it is there already; its path.

    The library is written beside its final name and renamed into place, so two
    processes starting at once never load half a file.
    """
    target = library_path(cache_dir, defines)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    command = [compiler(), *FLAGS, *(f"-D{d}" for d in defines), "-o", partial, str(SOURCE), *LIBRARIES]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as error:
        os.unlink(partial)
        raise NativeUnavailable(f"could not run the C compiler: {error}") from error
    if done.returncode != 0:
        os.unlink(partial)
        raise NativeUnavailable(f"kernels.c did not compile ({' '.join(command)}): {done.stderr.strip()[-500:]}")
    os.replace(partial, target)
    log.info("built the native kernels: %s", target)
    return target


@functools.cache
def library(cache_dir: str) -> ctypes.CDLL:
    """The loaded kernels (built first if needed), once per process.

    Raises :class:`NativeUnavailable` where they cannot run. Loaded after torch,
    whose OpenMP runtime (``libgomp.so.1``) the library then shares: one
    thread pool, not two spinning against each other on two cores.
    ``RLHF_CHAT_NATIVE=0`` switches them off (``make test-isa`` runs the paths of a
    machine without a C compiler that way).
    """
    if os.environ.get("RLHF_CHAT_NATIVE", "1") == "0":
        raise NativeUnavailable("switched off by RLHF_CHAT_NATIVE=0")
    missing = {"avx2", "fma"} - cpu_flags()
    if missing:
        raise NativeUnavailable(f"the CPU lacks {', '.join(sorted(missing))}")
    if shutil.which(compiler()) is None and not Path(compiler()).exists():
        raise NativeUnavailable(f"no C compiler ({compiler()}) on this machine")
    try:  # a read-only cache, a failed rename, a library the loader refuses: not here, with the reason
        return load(build(cache_dir))
    except OSError as error:
        raise NativeUnavailable(f"could not build or load the kernels: {error}") from error


def load(path: str | Path) -> ctypes.CDLL:
    """A built kernels library, its functions' argument types declared."""
    lib = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name in ("int4_matmul", "int8_matmul"):
        function = getattr(lib, name)
        function.argtypes = [pointer, size, size, pointer, pointer, size, pointer, ctypes.c_int]
        function.restype = None
    lib.int4_mlp.argtypes = [pointer, size, size, pointer, ctypes.c_float, pointer, pointer, size, pointer, pointer,
                             pointer, ctypes.c_int]
    lib.int4_mlp.restype = ctypes.c_int
    lib.int4_attention_step.argtypes = [
        pointer, size, size, pointer, ctypes.c_float, pointer, pointer, pointer, pointer, size, size, size,
        pointer, pointer, size, size, pointer, pointer, pointer, pointer, ctypes.c_int,
    ]
    lib.int4_attention_step.restype = ctypes.c_int
    return lib


def resolve_kernel(choice: str, cache_dir: str | Path, training_dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """The int4 kernel a ``model.int4_kernel`` setting gives here, and why.

    ``avx2``: the native kernels, or :class:`NativeUnavailable`; ``torch``:
    torch's own int4 and int8 kernels (bf16 activations). ``auto`` keeps the two
    copies one distribution: where the training copy multiplies in float32
    (``training_dtype``, a CPU without native bf16) the native kernels, whose
    activations are float32 too, where they load; where it multiplies in bf16,
    torch's kernels, which round activations to bf16 as it does.
    """
    if choice not in KERNELS:
        raise ValueError(f"int4_kernel {choice!r}: expected one of {', '.join(KERNELS)}")
    if choice == "torch":
        return "torch", "asked for by name"
    if choice == "auto" and training_dtype != torch.float32:
        return "torch", f"the training copy multiplies in {training_dtype}, as torch's kernel rounds activations"
    try:
        library(str(cache_dir))
    except NativeUnavailable as error:
        if choice == "avx2":
            raise NativeUnavailable(f"int4_kernel avx2: {error}") from error
        return "torch", f"native kernels unavailable: {error}"
    return "avx2", "native kernels (kernels.c), float32 activations, as the training copy's"


class _NoBackward(torch.autograd.Function):
    """Marks a native kernel's output in a graph: a backward through it fails plainly,
    as through torch's int4 kernel, instead of dropping the gradient in silence."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ARG004
        raise RuntimeError("the native kernels have no backward: the serving copy does not train")


def _in_graph(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return _NoBackward.apply(x, out) if x.requires_grad and torch.is_grad_enabled() else out


def _float_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` as contiguous float32 rows of ``width``: as it comes, in a decoding step."""
    if x.shape[-1] != width:
        raise ValueError(f"native kernels: inputs of width {x.shape[-1]} for a layer of width {width}")
    flat = x.detach().reshape(-1, width)
    if flat.dtype is not torch.float32 or not flat.is_contiguous():
        flat = flat.to(torch.float32).contiguous()
    return flat


def int4_matmul(cache_dir: str, x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (..., K) @ W.T`` (..., N), float32, W the int4 layer held as ``nibbles``
    (N, K / 2) uint8 and ``scales`` (N, K / 32, 2) float32 (layouts in kernels.c)."""
    n, half = nibbles.shape
    flat = _float_rows(x, 2 * half)
    rows = flat.shape[0]
    out = torch.empty((*x.shape[:-1], n))
    library(cache_dir).int4_matmul(
        flat.data_ptr(), rows, 2 * half, nibbles.data_ptr(), scales.data_ptr(), n, out.data_ptr(),
        torch.get_num_threads(),
    )
    return _in_graph(x, out)


def int8_matmul(cache_dir: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (..., K) @ (scales[:, None] * weight).T`` (..., N), float32; ``weight`` (N, K)
    int8, ``scales`` (N,) float32."""
    n, k = weight.shape
    flat = _float_rows(x, k)
    out = torch.empty((*x.shape[:-1], n))
    library(cache_dir).int8_matmul(
        flat.data_ptr(), flat.shape[0], k, weight.data_ptr(), scales.data_ptr(), n, out.data_ptr(),
        torch.get_num_threads(),
    )
    return _in_graph(x, out)


def int4_mlp(
    cache_dir: str, hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up, down
) -> torch.Tensor:
    """``hidden`` plus a Llama MLP of it, in one call (float32, (..., H)):
    ``down(silu(gate) * up)`` with ``[gate, up] = gate_up(rms_norm(hidden) * norm_weight)``,
    ``gate_up`` and ``down`` native int4 layers (:class:`~rlhf_chat.model.quantized.Int4Linear`)."""
    width = hidden.shape[-1]
    if gate_up.in_features != width or down.out_features != width or down.in_features * 2 != gate_up.out_features:
        raise ValueError("int4_mlp: gate_up (2 I, H) and down (H, I) do not fit the hidden width")
    flat = _float_rows(hidden, width)
    weight = norm_weight.to(torch.float32).contiguous()
    out = torch.empty(hidden.shape)
    status = library(cache_dir).int4_mlp(
        flat.data_ptr(), flat.shape[0], width, weight.data_ptr(), eps,
        gate_up.weight.data_ptr(), gate_up.scales_and_zeros.data_ptr(), gate_up.out_features // 2,
        down.weight.data_ptr(), down.scales_and_zeros.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )
    if status:
        raise MemoryError("int4_mlp: no memory for its scratch buffers")
    return _in_graph(hidden, out)


def int4_attention_step(
    cache_dir: str, hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv, o, heads: int, kv_heads: int,
    keys: torch.Tensor, values: torch.Tensor, at: int, valid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> torch.Tensor:
    """``hidden`` (R, 1, H) plus a Llama layer's attention of it at position ``at``, in one call.

    ``qkv`` (fused q, k, v) and ``o`` are native int4 layers without LoRA; the new
    keys and values go into ``keys``/``values`` (R, KV, T, D), contiguous float32,
    at ``at``; each row attends to the positions up to ``at`` where ``valid`` (R, T)
    is true; ``cos``/``sin`` (R, D) are the rotary tables of each row's position.
    """
    rows, count, width = hidden.shape
    total, head_dim = keys.shape[2], keys.shape[-1]
    problems = [
        count != 1 and "one new position per row",
        not 0 <= at < total and f"a position within the cache (0..{total - 1}), not {at}",
        heads % kv_heads and "query heads in whole groups of key/value heads",
        head_dim % 2 and "an even head width (rotary halves)",
        qkv.out_features != (heads + 2 * kv_heads) * head_dim and "q, k, v widths that fit the heads",
        (o.in_features != heads * head_dim or o.out_features != width) and "an o projection that fits the heads",
        any(t.shape != (rows, kv_heads, total, head_dim) or t.dtype != torch.float32 for t in (keys, values))
        and f"a float32 cache of ({rows}, {kv_heads}, T, D)",
        any(t.shape != (rows, head_dim) for t in (cos, sin)) and f"rotary tables of ({rows}, {head_dim})",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"int4_attention_step needs {'; '.join(problems)}")
    flat = _float_rows(hidden, width)
    weight = norm_weight.to(torch.float32).contiguous()
    if not (keys.is_contiguous() and values.is_contiguous() and valid.is_contiguous()):
        raise ValueError("int4_attention_step: the cache and mask must be contiguous")
    if valid.dtype != torch.bool or tuple(valid.shape) != (rows, keys.shape[2]):
        raise ValueError(f"int4_attention_step: valid must be bool ({rows}, {keys.shape[2]}), not {tuple(valid.shape)}")
    cos, sin = cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()
    out = torch.empty(hidden.shape)
    status = library(cache_dir).int4_attention_step(
        flat.data_ptr(), rows, width, weight.data_ptr(), eps, qkv.weight.data_ptr(), qkv.scales_and_zeros.data_ptr(),
        o.weight.data_ptr(), o.scales_and_zeros.data_ptr(), heads, kv_heads, keys.shape[-1], keys.data_ptr(),
        values.data_ptr(), keys.shape[2], at, valid.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("int4_attention_step: no memory for its scratch buffers")
    return _in_graph(hidden, out)
