"""Interventions: what an admin's reset or rollback does to the model itself.

The admin-facing side (the password, pausing training around the change, the
messages, publishing the checkpoint) is ``serving/controls.py``; this module
holds the parts that touch the weights and the version numbers, as plain
functions over a session or over the worker's ``Models``:

* :func:`next_version`: a policy version number never used before;
* :func:`zero_policy`: the policy made equal to the reference (a reset);
* :func:`copy_policy`: a saved policy's tensors copied in (a rollback);
* :func:`replace_policy`: the one worker job that applies such a change to the
  training copy, syncs the serving copy and names the new version.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhf_chat.learning.checkpoints import copy_into
from rlhf_chat.learning.ppo import policy_tensors
from rlhf_chat.model.loading import POLICY, Models, adapter_state, sync_policy_weights
from rlhf_chat.storage.tables import Checkpoint, PPOStep


def next_version(session: Session, serving_version: int) -> int:
    """A policy version number never used before: one above every version seen anywhere."""
    used = [
        serving_version,
        session.scalar(select(func.max(Checkpoint.version)).where(Checkpoint.kind == "policy")) or 0,
        session.scalar(select(func.max(PPOStep.version))) or 0,
    ]
    return max(used) + 1


def zero_policy(models: Models) -> None:
    """Make the policy equal the reference: LoRA B = 0 makes each adapter's update B·A = 0,
    and the value head starts at 0 as a fresh one does (``heads.make_scalar_head``)."""
    with torch.no_grad():
        for name, param in adapter_state(models.trainer, POLICY).items():
            if "lora_B" in name:
                param.zero_()
        for param in models.value_head.parameters():
            param.zero_()


def copy_policy(models: Models, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a saved policy's ``tensors`` into the training copy; raises ``KeyError``,
    with nothing changed, when they do not fit this model (``checkpoints.copy_into``
    checks every name before copying any)."""
    copy_into(policy_tensors(models), tensors)


def replace_policy(models: Models, change: Callable[[Models], None], version: int) -> dict[str, torch.Tensor]:
    """Apply ``change`` to the training copy's policy, copy it to the serving copy, serve
    it as ``version``, and return a copy of its tensors (to be saved as the checkpoint).

    Run as one model-worker job, so no chat request sees the serving copy half-changed.
    """
    change(models)
    sync_policy_weights(models.trainer, models.serving)
    models.serving_version = version
    return {k: v.detach().clone() for k, v in policy_tensors(models).items()}
