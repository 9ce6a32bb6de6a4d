"""Heads: scalar heads on hidden states, and the forward passes that feed them.

The value head reads every response token of the policy; the reward head reads
the last real token of (context, answer) under the reward adapter. Both start
at zero, so a fresh head says nothing until it has learned.
"""

from __future__ import annotations

import torch
from torch import nn


def make_scalar_head(hidden_size: int, device: torch.device) -> nn.Linear:
    """A linear map from a hidden state to one number, starting at exactly 0.

    The first step's gradient still moves it (that gradient is the hidden state).
    """
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head.to(device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them.

    >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist()
    [[0, 0, 0, 1], [0, 1, 2, 3]]
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, whichever side the padding is on.

    >>> last_token_index(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist()
    [2, 1]
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def backbone(peft_model: nn.Module) -> nn.Module:
    """The transformer without its language-model head (LoRA layers included)."""
    causal_lm = peft_model.get_base_model()
    return getattr(causal_lm, causal_lm.base_model_prefix)


def hidden_states(peft_model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states (B, T, H) under the active adapter."""
    out = backbone(peft_model)(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return out.last_hidden_state
