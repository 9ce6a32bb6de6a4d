"""Tensors: small helpers on token batches and masks that the model's heads, sampling
and the learning code all use (the lowest layer that needs them)."""

from __future__ import annotations

import torch
from torch import Tensor


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into a left-padded (B, L) batch and its attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over entries where ``mask`` is non-zero.

    Returns 0 (not NaN) when the mask is empty, so a batch of empty responses
    cannot poison a loss. Masked-out entries are selected away with
    ``torch.where`` rather than only multiplied by 0, so a NaN/inf sitting in a
    padded position contributes neither to the value nor to the gradient.
    """
    mask = mask.to(values.dtype)
    summed = torch.where(mask != 0, values * mask, torch.zeros_like(values))
    if dim is None:
        return summed.sum() / mask.sum().clamp(min=1e-8)
    return summed.sum(dim) / mask.sum(dim).clamp(min=1e-8)
